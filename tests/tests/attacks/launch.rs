//! What root starts for alice: only the site's Apptainer, only with options
//! that add nothing to her rights, and only with paths she opened herself.

use super::{alices_dir, as_alice, assert_not_leaked, bobs_secret, marker_library, UNPROTECTED};
use cluster_tests::{cluster, unique, TEST_SIF};

/// alice's home as this machine sees it (homes are shared by the nodes).
fn host_path(node_path: &str) -> std::path::PathBuf {
    cluster().shared.parent().unwrap().join(node_path.trim_start_matches('/'))
}

#[test]
fn a_program_alice_names_apptainer_runs_as_alice_not_as_root() {
    let c = cluster();
    let d = alices_dir(c);
    as_alice(c, &format!("mkdir {d}/x && printf '#!/bin/sh\\nid -u >> {d}/ran-as\\n' > {d}/x/apptainer && chmod 755 {d}/x/apptainer")).ok();
    // By path, and through her PATH.
    let out = as_alice(c, &format!("srun -w node1 --checkpoint-container {d}/x/apptainer exec {TEST_SIF} true")).ok();
    assert!(out.stderr.contains(UNPROTECTED) && out.stderr.contains("is not the site's Apptainer"), "{out:#?}");
    as_alice(c, &format!("PATH={d}/x:$PATH srun -w node1 --checkpoint-container apptainer exec {TEST_SIF} true")).ok();
    assert_eq!(c.read_file("alice", &format!("{d}/ran-as")), "2001\n2001\n", "her program ran with another uid");
}

#[test]
fn roots_apptainer_never_touches_the_home_alice_points_it_at() {
    let c = cluster();
    let d = alices_dir(c);
    let root_dir = format!("/var/tmp/root-owned-{}", unique());
    c.sh("node1", "root", &format!("install -d -m 0755 {root_dir}")).ok();
    as_alice(c, &format!("mkdir {d}/h && ln -s {root_dir} {d}/h/.apptainer")).ok();
    let out =
        as_alice(c, &format!("HOME={d}/h srun -w node1 --checkpoint-container apptainer -s exec {TEST_SIF} sh -c 'echo home=$HOME'")).ok();
    assert!(!out.stderr.contains(UNPROTECTED), "the container should be protected: {out:#?}");
    // The container sees her passwd home, as it does without the option.
    assert_eq!(out.stdout.trim(), "home=/home/alice", "{out:#?}");
    let mode = c.sh("node1", "root", &format!("stat -c %a:%U {root_dir}")).ok().stdout;
    assert_eq!(mode.trim(), "755:root", "root changed a directory alice chose");
}

/// Binds alice writes so that a check and Apptainer would read different
/// paths, or that only root could resolve: none may show bob's file.
#[test]
fn binds_that_apptainer_would_read_differently_are_refused() {
    let c = cluster();
    let (bob, token) = bobs_secret(c);
    let d = alices_dir(c);
    as_alice(c, &format!("ln -s {bob} '{d}/l,Y' && ln -s {bob} {d}/link")).ok();
    for bind in [
        format!("' {bob}:/mnt'"),
        format!("'{bob} :/mnt'"),
        format!("'{d}/l\\,Y:/mnt'"),
        format!("{d}/link:/mnt"),
        format!("=/proc/1/root{bob}:/mnt"),
        format!("/proc/self/root{bob}:/mnt"),
    ] {
        let flag = if bind.starts_with('=') { "--bind" } else { "--bind " };
        let out =
            as_alice(c, &format!("srun -w node1 --checkpoint-container apptainer -s exec {flag}{bind} {TEST_SIF} cat /mnt/secret.txt"));
        assert_not_leaked(&out, &token);
        assert!(out.stderr.contains(UNPROTECTED), "{bind}: {out:#?}");
    }
}

#[test]
fn binds_through_the_environment_pass_the_same_rules() {
    let c = cluster();
    let (bob, token) = bobs_secret(c);
    for var in ["APPTAINER_BIND", "SINGULARITY_BINDPATH"] {
        let out = as_alice(
            c,
            &format!("{var}='{bob}:/mnt' srun -w node1 --checkpoint-container apptainer -s exec {TEST_SIF} cat /mnt/secret.txt"),
        );
        assert_not_leaked(&out, &token);
        assert!(out.stderr.contains(UNPROTECTED) && out.stderr.contains("cannot be opened by you"), "{var}: {out:#?}");
    }
}

#[test]
fn options_that_use_roots_rights_are_refused_in_every_spelling() {
    let c = cluster();
    let marker = format!("root-marker-{}", unique());
    c.sh("node1", "root", &format!("echo {marker} > /root/marker && chmod 0644 /root/marker")).ok();
    for opts in ["--security uid:0,gid:0", "--security=uid:0", "-B/root:/mnt", "--add-caps=CAP_DAC_OVERRIDE", "--fakeroot", "--writable"] {
        // A file created inside shows who the container really ran as on the
        // node (a user namespace may call alice uid 0; the node does not).
        let probe = format!("/tmp/owner-probe-{}", unique());
        let out = as_alice(c, &format!("srun -w node1 --checkpoint-container apptainer -s exec {opts} {TEST_SIF} sh -c 'touch {probe}; cat /mnt/marker /root/marker'"));
        assert!(!out.stdout.contains(&marker), "{opts}: {out:#?}");
        let owner = c.sh("node1", "root", &format!("stat -c %u {probe} 2>/dev/null; rm -f {probe}")).stdout;
        assert!(owner.trim() != "0", "{opts} ran as root: {out:#?}");
        assert!(out.stderr.contains(UNPROTECTED), "{opts}: {out:#?}");
    }
    c.sh("node1", "root", "rm -f /root/marker").ok();
}

#[test]
fn a_fifo_as_the_image_does_not_hang_root() {
    let c = cluster();
    let d = alices_dir(c);
    as_alice(c, &format!("mkfifo {d}/img.sif")).ok();
    let name = format!("fifo-{}", unique());
    // Unprotected, her own Apptainer then waits on her FIFO as it would
    // without the option; root must have said why and moved on.
    let out = as_alice(c, &format!("timeout -s KILL 40 srun -J {name} -w node1 --checkpoint-container apptainer -s exec {d}/img.sif true"));
    c.exec("node1", "alice", &["scancel", "-n", &name]);
    assert!(out.stderr.contains("is not a regular file"), "{out:#?}");
    assert!(out.stderr.contains(UNPROTECTED), "{out:#?}");
}

#[test]
fn alices_own_image_is_not_mounted_by_root() {
    // Hers, she can rewrite it under the kernel's squashfs driver: it runs
    // exactly as it does without the option, and root never attaches it.
    let c = cluster();
    let d = alices_dir(c);
    as_alice(c, &format!("cp {TEST_SIF} {d}/mine.sif && chmod 0444 {d}/mine.sif")).ok();
    let run = |flag: &str| {
        as_alice(
            c,
            &format!(
                "srun -w node1 {flag} apptainer -s exec {d}/mine.sif sh -c 'echo ran; grep -c \" squashfs \" /proc/self/mountinfo || true'"
            ),
        )
    };
    let (with, without) = (run("--checkpoint-container"), run(""));
    assert!(with.stderr.contains("is yours, writable by you") && with.stderr.contains(UNPROTECTED), "{with:#?}");
    assert_eq!((with.code, with.stdout.as_str()), (Some(0), "ran\n0\n"), "{with:#?}");
    assert_eq!(with.stdout, without.stdout);
    let loops = c.sh("node1", "root", "losetup -a").stdout;
    assert!(!loops.contains("mine.sif"), "root attached alice's image: {loops}");
}

#[test]
fn a_site_that_forbids_kernel_squashfs_mounts_is_obeyed() {
    let c = cluster();
    let conf = "/etc/apptainer/apptainer.conf";
    let set = |value: &str| {
        for node in ["node1", "node2"] {
            c.sh(node, "root", &format!("sed -i 's/^allow setuid-mount squashfs = .*/allow setuid-mount squashfs = {value}/' {conf}")).ok();
        }
    };
    set("no");
    let out = as_alice(c, &format!("srun -w node1 --checkpoint-container apptainer -s exec {TEST_SIF} echo ran"));
    set("yes");
    assert!(out.stderr.contains("does not let users have root mount a squashfs") && out.stderr.contains(UNPROTECTED), "{out:#?}");
    assert_eq!(out.stdout, "ran\n", "{out:#?}");
}

#[test]
fn the_jobs_environment_never_reaches_a_root_process() {
    let c = cluster();
    let d = alices_dir(c);
    let so = host_path(&format!("{d}/evil.so"));
    let marker = format!("{d}/loaded-by");
    marker_library(&so, &marker);
    c.sh("node1", "root", &format!("chown alice:alice {d}/evil.so {d}/evil.c && chmod 0755 {d}/evil.so")).ok();
    let env = format!("LD_PRELOAD={d}/evil.so GCONV_PATH={d} LOCPATH={d} GLIBC_TUNABLES=glibc.malloc.check=3 TMPDIR={d}");
    let out = as_alice(c, &format!("{env} srun -w node1 --checkpoint-container apptainer -s exec {TEST_SIF} true")).ok();
    assert!(!out.stderr.contains(UNPROTECTED), "{out:#?}");
    let seen = c.read_file("alice", &marker);
    // Loaded into her own processes (srun, the task, the container), as her.
    assert!(seen.contains("uid=2001 "), "the marker library never loaded: {seen}");
    for line in seen.lines() {
        assert!(
            line.contains("uid=2001 ") && line.trim_end().ends_with("CapEff:\t0000000000000000"),
            "loaded into a privileged process: {seen}"
        );
    }
}

#[test]
fn swapping_a_bind_source_for_a_symlink_while_jobs_start_never_shows_bobs_file() {
    let c = cluster();
    let (bob, token) = bobs_secret(c);
    let d = alices_dir(c);
    as_alice(c, &format!("mkdir {d}/real && echo mine > {d}/real/secret.txt && ln -s {bob} {d}/evil")).ok();
    // A loop renames the bind source between her directory and a symlink
    // to bob's while three protected jobs start.
    let script = format!(
        "( end=$((SECONDS+40)); while [ $SECONDS -lt $end ]; do \
           ln -sfn {d}/real {d}/src.new && mv -T {d}/src.new {d}/src; ln -sfn {bob} {d}/src.new && mv -T {d}/src.new {d}/src; done ) & \
         for i in 1 2 3; do srun -w node1 --checkpoint-container apptainer -s exec --bind {d}/src:/mnt {TEST_SIF} cat /mnt/secret.txt; done; kill %1; wait"
    );
    let out = as_alice(c, &script);
    assert_not_leaked(&out, &token);
}

/// Apptainer splits bind specs at `,` `:` `^`: a working directory or a
/// destination holding them would smuggle binds root resolves (found by the
/// adversarial review).
#[test]
fn separators_in_the_working_directory_or_a_bind_cannot_add_binds() {
    let c = cluster();
    let (bob, token) = bobs_secret(c);
    let d = alices_dir(c);
    let cwd = format!("{d}/e,{bob}:/mnt");
    as_alice(c, &format!("mkdir -p '{cwd}' {d}/src")).ok();
    for (dir, opts) in [(cwd.as_str(), "--pwd /".to_string()), (d.as_str(), format!("--bind {d}/src:/x^{bob}"))] {
        let out = as_alice(c, &format!("cd '{dir}' && srun -w node1 --checkpoint-container apptainer -s exec {opts} {TEST_SIF} sh -c 'cat /mnt/secret.txt {bob}/secret.txt'"));
        assert_not_leaked(&out, &token);
        assert!(out.stderr.contains(UNPROTECTED), "{dir} {opts}: {out:#?}");
    }
}

/// An image alice can write could be rewritten between root's checks and
/// the kernel's mount, or under it (found by the adversarial review).
#[test]
fn an_image_alice_can_change_is_not_mounted_by_root() {
    let c = cluster();
    let img = format!("/shared/images/shared-{}.sif", unique());
    // Root's copy in the curated directory, but group-writable for alice.
    c.sh("node1", "root", &format!("cp {TEST_SIF} {img} && chgrp alice {img} && chmod 0664 {img}")).ok();
    let out = as_alice(c, &format!("srun -w node1 --checkpoint-container apptainer -s exec {img} true"));
    assert!(out.stderr.contains("is yours, writable by you") && out.stderr.contains(UNPROTECTED), "{out:#?}");
    c.sh("node1", "root", &format!("rm -f {img}")).ok();
}

/// Apptainer sets no groups when given one gid: a root-started container
/// kept root's (slurmstepd's) groups (found by the second review).
#[test]
fn the_container_has_alices_groups_not_roots() {
    let c = cluster();
    c.give_alice_a_second_group();
    let sorted = |s: &str| {
        let mut g: Vec<String> = s.split_whitespace().map(String::from).collect();
        g.sort();
        g
    };
    let expected = sorted(&c.sh("node1", "root", "id -G alice").ok().stdout);
    assert!(expected.contains(&"3001".to_string()), "{expected:?}");
    // The task's groups (Slurm's), as unprotected.
    assert_eq!(sorted(&as_alice(c, "srun -w node1 id -G").ok().stdout), expected);
    let out = as_alice(c, &format!("srun -w node1 --checkpoint-container apptainer -s exec {TEST_SIF} id -G")).ok();
    assert!(!out.stderr.contains(UNPROTECTED), "{out:#?}");
    assert_eq!(sorted(&out.stdout), expected, "{out:#?}");
}

/// slurmstepd's own descriptors (its sockets, other tasks' PMI sockets) are
/// root's: the agent it starts must not hand them to alice's container. The
/// container holds the descriptors the same command holds unprotected: its
/// stdio, and with `--mpi=pmi2` its own PMI socket at the same number.
#[test]
fn the_container_gets_the_tasks_descriptors_and_none_of_slurmstepds() {
    let c = cluster();
    let fds = "ls /proc/self/fd | sort -n | xargs echo; echo PMI_FD=$PMI_FD";
    // Several PMI ranks share one container (agent/ranks.rs): each still
    // holds only its own task's.
    for (mpi, tasks) in [("none", 2), ("pmi2", 1), ("pmi2", 2)] {
        let run = |flag: &str| {
            let out = as_alice(c, &format!("srun -w node1 -n{tasks} --mpi={mpi} {flag} apptainer -s exec {TEST_SIF} sh -c '{fds}'")).ok();
            let mut lines: Vec<String> = out.stdout.lines().map(String::from).collect();
            lines.sort();
            (lines, out)
        };
        let (unprotected, _) = run("");
        let (protected, out) = run("--checkpoint-container");
        assert!(!out.stderr.contains(UNPROTECTED), "{out:#?}");
        assert_eq!(protected, unprotected, "--mpi={mpi}: descriptors differ from the unprotected run");
    }
}

/// The agent inherited the job's umask from slurmstepd: alice's `umask 077`
/// made the node's socket directory 0700, and every later protected task on
/// the node, bob's too, failed to reach its agent (found while testing
/// transparency). Her settings now reach her container only; and the limits
/// root gives it are hers, never more.
#[test]
fn alices_umask_and_limits_reach_her_container_not_the_node() {
    let c = cluster();
    let probe = "umask; ulimit -S -n; ulimit -S -c; ulimit -H -n; ulimit -H -c";
    // Her task must be the one that creates the directory (moved aside, not
    // removed: root never recurses into what may hold mounts).
    c.sh("node1", "root", &format!("[ ! -e /run/checkpoint-container ] || mv /run/checkpoint-container /run/ckpt-aside-{}", unique())).ok();
    let run = |option: &str| {
        as_alice(
            c,
            &format!("umask 077 && ulimit -n 500 && ulimit -c 0 && srun -w node1 {option} apptainer -s exec {TEST_SIF} sh -c '{probe}'"),
        )
        .ok()
    };
    let protected = run("--checkpoint-container");
    assert!(!protected.stderr.contains(UNPROTECTED), "{protected:#?}");
    assert!(protected.stdout.starts_with("0077\n500\n0\n"), "{protected:#?}");
    // Slurm passes soft limits on; hard ones are the node's, as unprotected.
    assert_eq!(protected.stdout, run("").stdout);
    let dir = c.sh("node1", "root", "stat -c '%a %U' /run/checkpoint-container").ok().stdout;
    assert_eq!(dir.trim(), "755 root", "the node's agent directory took alice's umask");
    let bobs =
        c.sh("node1", "bob", &format!("srun -w node1 --checkpoint-container apptainer -s exec {TEST_SIF} sh -c 'echo ok; umask'")).ok();
    assert_eq!(bobs.stdout, "ok\n0022\n", "{bobs:#?}");
}
