//! CRIU runs with CAP_CHECKPOINT_RESTORE and CAP_SYS_PTRACE inside the
//! user's container's mount namespace, where the user decides what every
//! path holds (binds). Each test plants code there the way a user can, then
//! checkpoints and restores, and checks that none of it ran with CRIU's
//! capabilities while the checkpoint and restore still worked.

use super::marker_library;
use cluster_tests::{cluster, counter_field, unique, Cluster, TcpCounter, Workload, WorkloadSpec};
use std::time::Duration;

/// Lines of a marker that show code run with capabilities (a CapEff other
/// than zero) or inside CRIU.
fn privileged_lines(w: &Workload, marker: &str) -> Vec<String> {
    let text = std::fs::read_to_string(w.host_dir.join(marker)).unwrap_or_default();
    text.lines().filter(|l| l.contains("criu") || !l.trim_end().ends_with("CapEff:\t0000000000000000")).map(String::from).collect()
}

/// Checkpoints (CRIU ends the container), restores on the same node and
/// checks the program ended exactly as an uninterrupted run would.
fn checkpoint_and_restore(c: &Cluster, w: &Workload) {
    w.wait_steps(5);
    let out = w.checkpoint(c, &["--job-id", "7"]);
    assert!(out.success(), "checkpoint failed: {out:#?}");
    assert!(!w.is_running(c), "CRIU should have ended the container after the dump");
    let out = w.restore(c, &w.node, "--uid 2001");
    assert!(out.success(), "restore failed: {out:#?}");
    w.assert_finished_correctly();
}

fn spec(binds: &[&str], setup: &str) -> WorkloadSpec {
    WorkloadSpec {
        mem_mib: 16,
        steps: 40,
        interval_ms: 100,
        binds: binds.iter().map(|b| b.to_string()).collect(),
        setup: Some(setup.into()),
        ..Default::default()
    }
}

#[test]
fn plugin_in_the_containers_criu_library_directory_is_not_loaded() {
    // CRIU dlopen()s every *.so of its plugin directory (default
    // /usr/lib/criu), which the user can bind over.
    let c = cluster();
    let w = c.start_workload("node1", spec(&["plugins:/usr/lib/criu"], "mkdir plugins"));
    marker_library(&w.host_dir.join("plugins/evil.so"), "/data/plugin-ran");
    checkpoint_and_restore(c, &w);
    assert!(!w.host_dir.join("plugin-ran").exists(), "CRIU loaded the user's plugin: {:?}", privileged_lines(&w, "plugin-ran"));
    w.cleanup(c);
}

#[test]
fn containers_ld_so_preload_is_not_read() {
    // glibc's dynamic loader reads /etc/ld.so.preload of the process's root:
    // the container's, which the user can bind over. The user's own
    // programs in the container load the library too (harmless: no
    // capabilities); only a line with capabilities, or from CRIU, counts.
    let c = cluster();
    // Built before the container starts, so its own loader finds it too.
    let lib_dir = format!("attack-{}", unique());
    std::fs::create_dir_all(c.shared.join(&lib_dir)).unwrap();
    marker_library(&c.shared.join(&lib_dir).join("preload.so"), "/data/preload-ran");
    let setup = format!("cp /shared/{lib_dir}/preload.so . && echo /data/preload.so > preload");
    let w = c.start_workload("node1", spec(&["preload:/etc/ld.so.preload"], &setup));
    let _ = std::fs::remove_dir_all(c.shared.join(&lib_dir));
    checkpoint_and_restore(c, &w);
    let privileged = privileged_lines(&w, "preload-ran");
    assert!(privileged.is_empty(), "a process with capabilities loaded the user's preload library: {privileged:?}");
    w.cleanup(c);
}

#[test]
fn programs_in_the_container_are_not_run_even_without_the_kernel_feature_cache() {
    // Without a cached criu.kdat, CRIU's kernel probe runs
    // `sh -c "iptables -n -w -L"` by name through PATH; network locking
    // runs iptables(-save/-restore), tmpfs mounts tar, network namespaces
    // ip. The user binds a directory of such programs over the container's
    // /usr/sbin, which comes first in the PATH CRIU was given.
    let c = cluster();
    let names = [
        "sh",
        "iptables",
        "iptables-save",
        "iptables-restore",
        "iptables-legacy",
        "iptables-legacy-save",
        "iptables-legacy-restore",
        "ip6tables",
        "tar",
        "ip",
        "nft",
    ];
    let script = "#!/bin/sh\\necho \\\"$0 $(grep CapEff /proc/$$/status)\\\" >> /data/program-ran\\nexit 0\\n";
    let setup = format!("mkdir sbin && for p in {}; do printf '{script}' > sbin/$p; chmod 755 sbin/$p; done", names.join(" "));
    let w = c.start_workload("node1", spec(&["sbin:/usr/sbin"], &setup));
    // As root, the way a reboot or a new CRIU binary leaves the node.
    c.sh("node1", "root", "rm -rf /run/checkpoint-container/criu-kdat").ok();
    checkpoint_and_restore(c, &w);
    let ran = std::fs::read_to_string(w.host_dir.join("program-ran")).unwrap_or_default();
    assert!(ran.is_empty(), "CRIU ran the user's programs: {ran}");
    let cached = c.sh("node1", "root", "ls /run/checkpoint-container/criu-kdat/*/criu.kdat").stdout;
    assert!(!cached.trim().is_empty(), "no kernel-feature cache was made");
    // The dump inside the container used the cache made outside it, and
    // tried to run nothing.
    let log = std::fs::read_to_string(w.host_checkpoint_dir().join("dump.log")).unwrap();
    assert!(log.contains("Loaded kdat cache from /proc/"), "{log}");
    assert!(!log.contains("execvp"), "{log}");
    w.cleanup(c);
}

#[test]
fn criu_configuration_in_the_users_home_is_not_read() {
    // CRIU reads $HOME/.criu/default.conf unless told not to; an
    // action-script named there would run with its capabilities. The user
    // plants one in the container's view of both homes (root-started
    // containers see /root as HOME) and in their real home.
    let c = cluster();
    let conf = "mkdir -p dotcriu && printf '#!/bin/sh\\necho \"$(grep CapEff /proc/$$/status)\" >> /data/action-ran\\n' > evil.sh && \
                chmod 755 evil.sh && echo 'action-script /data/evil.sh' > dotcriu/default.conf";
    let w = c.start_workload("node1", spec(&["dotcriu:/root/.criu"], conf));
    c.sh("node1", "alice", &format!("mkdir -p ~/.criu && cp {}/dotcriu/default.conf ~/.criu/default.conf", w.dir)).ok();
    checkpoint_and_restore(c, &w);
    c.sh("node1", "alice", "rm -rf ~/.criu").ok();
    let ran = std::fs::read_to_string(w.host_dir.join("action-ran")).unwrap_or_default();
    assert!(ran.is_empty(), "CRIU ran the user's action script: {ran}");
    w.cleanup(c);
}

#[test]
fn tcp_checkpoint_with_net_admin_runs_and_loads_nothing_of_the_container() {
    // In a protected job's own network namespace CRIU also holds
    // CAP_NET_ADMIN and dumps TCP connections, for which it would by default
    // lock the network by running iptables. The user binds programs of
    // those names over /usr/sbin, a plugin directory over /usr/lib/criu and
    // a preload list over /etc/ld.so.preload, and keeps a loopback TCP
    // connection open; the job is requeued and restored on the other node.
    let c = cluster();
    let job = TcpCounter::new(c, &["sbin:/usr/sbin", "plugins:/usr/lib/criu", "preload:/etc/ld.so.preload"]);
    let names =
        "sh iptables iptables-save iptables-restore iptables-legacy iptables-legacy-save iptables-legacy-restore ip6tables ip nft tar";
    let script = "#!/bin/sh\\necho \\\"$0 $(grep CapEff /proc/$$/status)\\\" >> /data/program-ran\\nexit 0\\n";
    c.sh(
        "node1",
        "alice",
        &format!("cd {} && mkdir sbin plugins && for p in {names}; do printf '{script}' > sbin/$p; chmod 755 sbin/$p; done", job.path),
    )
    .ok();
    marker_library(&job.host.join("plugins/evil.so"), "/data/plugin-ran");
    marker_library(&job.host.join("preload.so"), "/data/preload-ran");
    std::fs::write(job.host.join("preload"), "/data/preload.so\n").unwrap();
    for node in ["node1", "node2"] {
        c.sh(node, "root", "rm -rf /run/checkpoint-container/criu-kdat").ok();
    }
    let steps = 60;
    let id = job.submit(c, &format!("pingpong /data/out.txt {steps} 100"));
    job.wait_lines(8);
    c.exec("ctl", "root", &["scontrol", "requeue", &id.to_string()]).ok();
    c.release(id, Some("node2"));
    assert_eq!(c.wait_job(id, Duration::from_secs(120)), "COMPLETED", "{}", job.output());
    let out = job.output();
    assert!(out.contains("checkpointed task 0") && out.contains("restored process"), "{out}");
    let lines = job.lines();
    assert_eq!(lines.len(), steps + 1, "{lines:?}");
    assert!(lines[..steps].iter().enumerate().all(|(i, l)| counter_field(l, "counter") == i as i64 + 1), "{lines:?}");
    let ran = std::fs::read_to_string(job.host.join("program-ran")).unwrap_or_default();
    assert!(ran.is_empty(), "CRIU ran the user's programs: {ran}");
    assert!(!job.host.join("plugin-ran").exists(), "CRIU loaded the user's plugin");
    let preloaded = std::fs::read_to_string(job.host.join("preload-ran")).unwrap_or_default();
    let privileged: Vec<&str> =
        preloaded.lines().filter(|l| l.contains("criu") || !l.trim_end().ends_with("CapEff:\t0000000000000000")).collect();
    assert!(privileged.is_empty(), "a process with capabilities loaded the user's preload library: {privileged:?}");
    let _ = std::fs::remove_dir_all(&job.host);
}
