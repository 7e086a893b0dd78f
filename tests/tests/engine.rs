//! The checkpoint engine on real Apptainer containers: dump a running
//! container with CRIU, kill it, restore it on the same or the other node,
//! and check it ends exactly as an uninterrupted run would.

use cluster_tests::{cluster, gcc, Mode, Stdout, Workload, WorkloadSpec, HELPER};

const GIB: u32 = 1024;

/// Site options the dump runs with: `--compression`, `--staging-dir`.
fn checkpoint_then_restore_on(node: &str, stdout: Stdout, options: &[&str]) {
    let c = cluster();
    let w = c.start_workload("node1", WorkloadSpec { mem_mib: GIB, steps: 60, stdout, ..Default::default() });
    w.wait_steps(10);
    let mut args = vec!["--job-id", "42", "--step-id", "0", "--task-id", "0"];
    args.extend_from_slice(options);
    let out = w.checkpoint(c, &args).ok();
    assert!(out.stderr.contains(&format!("checkpointed process {}", w.pid)), "{}", out.stderr);
    let saved = w.out_lines().len();
    assert!(!w.is_running(c), "CRIU should have ended the container after the dump");
    assert!((10..60).contains(&saved), "checkpoint taken mid-run: {saved} lines");

    let manifest = c.exec(node, "root", &[HELPER, "inspect", "--verify", &w.checkpoint_dir()]).ok().stdout;
    for field in ["job_id = 42", "uid = 2001", "node = \"node1\"", "criu_version = \"4.", "image = \"/shared/images/test.sif\""] {
        assert!(manifest.contains(field), "manifest lacks {field}:\n{manifest}");
    }
    // Page images compressed only when asked; half the workload's memory is
    // a repeating pattern, so compression must shrink the checkpoint.
    let images_bytes: u64 = manifest.lines().find_map(|l| l.strip_prefix("images_bytes = ")).unwrap().parse().unwrap();
    if options.contains(&"zstd") {
        assert!(manifest.contains("zstd = true"), "{manifest}");
        assert!(images_bytes < 800 << 20, "compressed 1 GiB to {images_bytes} bytes");
    } else {
        assert!(!manifest.contains("zstd"), "{manifest}");
        assert!(images_bytes > 1 << 30, "{images_bytes} bytes");
    }
    // Written by root alone, and nothing left behind in the staging area.
    let owners = c.sh(node, "root", &format!("stat -c %U:%a {}/* | sort -u", w.checkpoint_dir())).ok().stdout;
    assert_eq!(owners.trim(), "root:600");
    if let Some(i) = options.iter().position(|o| *o == "--staging-dir") {
        assert!(!out.stderr.contains("not staging"), "{}", out.stderr);
        assert_eq!(c.sh("node1", "root", &format!("ls -A {}", options[i + 1])).ok().stdout, "");
    }

    let out = w.restore(c, node, "--uid 2001 --job-id 42");
    assert!(out.success(), "restore failed: {out:#?}");
    assert!(out.stderr.contains(&format!("restored process {}", w.pid)), "{}", out.stderr);
    // Every step exactly once (it went on from the saved counter, not from
    // zero), the checksum and memory of an uninterrupted run, and the output
    // in the same files.
    w.assert_finished_correctly();
    w.cleanup(c);
}

#[test]
fn one_gib_container_restores_on_the_same_node_as_if_never_stopped() {
    checkpoint_then_restore_on("node1", Stdout::Pipe, &[]);
}

#[test]
fn one_gib_container_restores_on_the_other_node_from_shared() {
    checkpoint_then_restore_on("node2", Stdout::File, &[]);
}

#[test]
fn compressed_checkpoint_staged_in_tmpfs_restores_on_the_other_node() {
    let c = cluster();
    c.exec("node1", "root", &["mkdir", "-p", "/dev/shm/ckpt-staging"]).ok();
    checkpoint_then_restore_on("node2", Stdout::File, &["--compression", "zstd", "--staging-dir", "/dev/shm/ckpt-staging"]);
}

fn small(c: &cluster_tests::Cluster) -> Workload {
    let w = c.start_workload("node1", WorkloadSpec { mem_mib: 16, steps: 600, interval_ms: 50, ..Default::default() });
    w.wait_steps(3);
    w
}

#[test]
fn unprivileged_user_namespace_container_is_refused_with_the_reason() {
    let c = cluster();
    let w = c
        .start_workload("node1", WorkloadSpec { mem_mib: 16, steps: 600, interval_ms: 50, mode: Mode::Unprivileged, ..Default::default() });
    let out = w.checkpoint(c, &[]).failed();
    assert!(out.stderr.contains("runs in an unprivileged user namespace"), "{}", out.stderr);
    assert!(w.is_running(c), "a refused checkpoint must leave the container running");
    // The reason, shown by CRIU itself: dumping the tree from outside its user
    // namespace fails on the uid mapping.
    let log = c
        .sh(
            "node1",
            "root",
            &format!(
                "d=$(mktemp -d); criu dump -t {} --shell-job --leave-running -D $d -o dump.log -v4; cat $d/dump.log; rm -rf $d",
                w.pid
            ),
        )
        .stdout;
    assert!(
        log.contains("Unable to convert uid or gid") || log.contains("doesn't belong to the target user namespace"),
        "CRIU's own error changed:\n{}",
        log.lines().filter(|l| l.contains("Error")).collect::<Vec<_>>().join("\n")
    );
    assert!(w.is_running(c));
    w.cleanup(c);
}

/// Flips the middle byte of the checkpoint's first page image; returns its
/// path and original bytes.
fn flip_a_byte_of_the_pages_image(checkpoint: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let pages = std::fs::read_dir(checkpoint).unwrap().map(|e| e.unwrap().path()).find(|p| p.to_string_lossy().contains("pages-")).unwrap();
    let original = std::fs::read(&pages).unwrap();
    let mut damaged = original.clone();
    damaged[original.len() / 2] ^= 0xff;
    std::fs::write(&pages, &damaged).unwrap();
    (pages, original)
}

#[test]
fn restore_refuses_missing_truncated_tampered_and_foreign_images() {
    let c = cluster();
    let w = small(c);
    w.checkpoint(c, &["--job-id", "7"]).ok();
    let dir = w.host_checkpoint_dir();
    let restore_fails_with = |extra: &str, expected: &str| {
        let out = w.restore(c, "node1", extra).failed();
        assert!(out.stderr.contains(expected), "{extra}: {}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);
        assert!(w.pids_on(c, "node1").is_empty(), "a refused restore left processes running");
    };
    // Another user's or job's checkpoint.
    restore_fails_with("--uid 2002", "belongs to uid 2001, not to uid 2002");
    restore_fails_with("--uid 2001 --job-id 8", "belongs to job 7, not to job 8");
    let out = c.exec("node1", "root", &[HELPER, "restore", "--images", &w.checkpoint_dir(), "--uid", "2001", "--job-id", "7"]);
    assert!(!out.stderr.contains("refusing"), "the right user and job pass these checks: {out:#?}");

    // Tampered: same size, one byte changed.
    let (pages, original) = flip_a_byte_of_the_pages_image(&dir);
    restore_fails_with("--uid 2001", "is damaged: checksum of pages-");

    // Truncated.
    std::fs::write(&pages, &original[..original.len() / 2]).unwrap();
    restore_fails_with("--uid 2001", "is truncated or altered: pages-");
    std::fs::write(&pages, &original).unwrap();
    // Written by someone else than the helper (a user-owned directory).
    c.exec("node1", "root", &["chown", "alice", &w.checkpoint_dir()]).ok();
    restore_fails_with("--uid 2001", "was not written by this helper (owner uid 2001");
    c.exec("node1", "root", &["chown", "root", &w.checkpoint_dir()]).ok();
    // Missing.
    std::fs::rename(&dir, dir.with_extension("moved")).unwrap();
    restore_fails_with("--uid 2001", "No such file or directory");
    let _ = std::fs::remove_dir_all(dir.with_extension("moved"));
    w.cleanup(c);
}

#[test]
fn compressed_images_are_verified_while_they_are_decompressed() {
    let c = cluster();
    let w = small(c);
    w.checkpoint(c, &["--compression", "zstd"]).ok();
    flip_a_byte_of_the_pages_image(&w.host_checkpoint_dir());
    let out = w.restore(c, "node1", "--uid 2001").failed();
    assert!(out.stderr.contains("is damaged: checksum of pages-"), "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);
    assert!(w.pids_on(c, "node1").is_empty(), "a refused restore left processes running");
    w.cleanup(c);
}

#[test]
fn restore_refuses_a_missing_or_changed_sif_image() {
    let c = cluster();
    let own_sif = format!("/shared/images/sif-{}.sif", cluster_tests::unique());
    c.exec("node1", "root", &["cp", cluster_tests::TEST_SIF, &own_sif]).ok();
    let w =
        c.start_workload("node1", WorkloadSpec { mem_mib: 16, steps: 600, interval_ms: 50, image: own_sif.clone(), ..Default::default() });
    w.wait_steps(3);
    w.checkpoint(c, &[]).ok();
    c.sh("node1", "root", &format!("printf x >> {own_sif}")).ok();
    let out = w.restore(c, "node2", "--uid 2001").failed();
    assert!(out.stderr.contains(&format!("container image {own_sif} changed since the checkpoint")), "{}", out.stderr);
    c.exec("node1", "root", &["rm", &own_sif]).ok();
    let out = w.restore(c, "node2", "--uid 2001").failed();
    assert!(out.stderr.contains(&format!("{own_sif} cannot be opened by you: No such file")), "{}", out.stderr);
    assert!(w.pids_on(c, "node2").is_empty());
    w.cleanup(c);
}

#[test]
fn failed_dump_keeps_the_container_running_and_the_earlier_checkpoint() {
    let c = cluster();
    let w = small(c);
    // The checkpoint directory on a small filesystem of its own.
    let fs = format!("{}-smallfs", w.checkpoint_dir());
    c.sh("node1", "root", &format!("mkdir {fs} && mount -t tmpfs -o size=64m tmpfs {fs} && chmod 755 {fs}")).ok();
    let target = format!("{fs}/ckpt");
    let pid = w.pid.to_string();
    let checkpoint = |extra: &[&str]| {
        let mut argv = vec![HELPER, "checkpoint", "--pid", &pid, "--images", &target, "--leave-running"];
        argv.extend_from_slice(extra);
        argv.push("--");
        argv.extend(w.argv.iter().map(String::as_str));
        c.exec("node1", "root", &argv)
    };
    checkpoint(&["--job-id", "1"]).ok();
    let good = c.exec("node1", "root", &[HELPER, "inspect", "--verify", &target]).ok().stdout;
    // Fill the filesystem: the next dump cannot fit.
    c.sh("node1", "root", &format!("dd if=/dev/zero of={fs}/filler bs=1M count=40 status=none")).ok();
    let out = checkpoint(&["--job-id", "2"]).failed();
    assert!(
        out.stderr.contains("CRIU could not dump process")
            && out.stderr.contains(&format!("(the checkpoint already at {target} is untouched)")),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    let before = w.out_lines().len();
    w.wait_steps(before + 3);
    assert!(w.is_running(c));
    let still = c.exec("node1", "root", &[HELPER, "inspect", "--verify", &target]).ok().stdout;
    assert_eq!(still, good, "the earlier checkpoint changed");
    let leftovers = c.sh("node1", "root", &format!("ls -A {fs}")).ok().stdout;
    assert_eq!(leftovers.split_whitespace().collect::<Vec<_>>(), ["ckpt", "filler"], "partial dump left behind");
    c.sh("node1", "root", &format!("umount {fs} && rmdir {fs}")).ok();
    w.cleanup(c);
}

#[test]
fn criu_ignores_a_configuration_file_inside_the_container() {
    // CRIU runs in the container's mount namespace, where the user decides
    // what /etc/criu/default.conf says; an action script named there would
    // run with CRIU's capabilities.
    let c = cluster();
    let spec = WorkloadSpec { mem_mib: 16, steps: 600, interval_ms: 50, binds: vec!["criu-conf:/etc/criu".into()], ..Default::default() };
    let w = c.start_workload("node1", spec);
    let script = "#!/bin/sh\ngrep Cap /proc/self/status > /data/action-script-ran\n";
    c.sh(
        "node1",
        "alice",
        &format!(
            "printf '{script}' > {0}/evil.sh; chmod 755 {0}/evil.sh; echo 'action-script /data/evil.sh' > {0}/criu-conf/default.conf",
            w.dir
        ),
    )
    .ok();
    w.checkpoint(c, &["--leave-running"]).ok();
    assert!(!w.host_dir.join("action-script-ran").exists(), "CRIU ran the user's action script");
    w.cleanup(c);
}

#[test]
fn checkpoint_refuses_other_users_processes_and_old_criu() {
    let c = cluster();
    let w = small(c);
    let pid = w.pid.to_string();
    let target = w.checkpoint_dir();
    let mut argv = vec![HELPER, "checkpoint", "--pid", &pid, "--images", &target, "--uid", "2002", "--"];
    argv.extend(w.argv.iter().map(String::as_str));
    let out = c.exec("node1", "root", &argv).failed();
    assert!(out.stderr.contains(&format!("process {pid} belongs to uid 2001, not to uid 2002")), "{}", out.stderr);

    let fake = format!("{}/old-criu", w.dir);
    gcc("#include <stdio.h>\nint main(void) { puts(\"Version: 3.17.1\"); return 0; }\n", &w.host_dir.join("old-criu"), &["-static"]);
    c.sh("node1", "root", &format!("chown root:root {fake}; printf 'criu = \"{fake}\"\\n' > {}/site.toml", w.dir)).ok();
    let conf = format!("{}/site.toml", w.dir);
    let mut argv = vec![HELPER, "--config", &conf, "checkpoint", "--pid", &pid, "--images", &target, "--"];
    argv.extend(w.argv.iter().map(String::as_str));
    let out = c.exec("node1", "root", &argv).failed();
    assert_eq!(out.stderr.trim(), format!("checkpoint-container: CRIU at {fake} is version 3.17.1, but 4.0.0 or newer is required"));
    assert!(w.is_running(c));
    w.cleanup(c);
}
