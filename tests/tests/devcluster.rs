//! The dev cluster's own promises: real separate hosts, a shared /shared,
//! the documented CLI, and a `down` that leaves nothing behind.

use cluster_tests::{cluster, repo_root};
use std::process::Command;

fn devcluster(args: &[&str]) -> std::process::Output {
    Command::new(repo_root().join("cluster/devcluster")).args(args).output().unwrap()
}

#[test]
fn hosts_are_separate_machines_on_a_private_network() {
    let c = cluster();
    for node in ["ctl", "node1", "node2"] {
        assert_eq!(c.exec(node, "root", &["hostname"]).ok().stdout.trim(), node);
        // Each host has its own PID namespace whose init is PID 1 …
        let init = c.exec(node, "root", &["cat", "/proc/1/cmdline"]).ok().stdout;
        assert!(init.contains("node_services"), "{node}: {init}");
        // … and sees only its own network devices.
        let links = c.exec(node, "root", &["ip", "-o", "link"]).ok().stdout;
        let names: Vec<_> = links.lines().filter_map(|l| l.split(':').nth(1)).map(|s| s.trim()).collect();
        assert!(names.len() == 2 && names[0] == "lo" && names[1].starts_with("eth0@"), "{node}: {links}");
    }
    c.exec("node1", "root", &["ping", "-c1", "-W2", "node2"]).ok();
    c.exec("node2", "root", &["ping", "-c1", "-W2", "ctl"]).ok();
}

#[test]
fn shared_directory_is_the_same_on_the_machine_and_every_host() {
    let c = cluster();
    let name = format!("probe-{}", cluster_tests::unique());
    std::fs::write(c.shared.join(&name), "from the machine\n").unwrap();
    for node in ["ctl", "node1", "node2"] {
        assert_eq!(c.exec(node, "root", &["cat", &format!("/shared/{name}")]).ok().stdout, "from the machine\n");
    }
    std::fs::remove_file(c.shared.join(&name)).unwrap();
}

#[test]
fn status_and_exec_errors_are_clear() {
    cluster();
    let status = devcluster(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success());
    for node in ["ctl", "node1", "node2"] {
        assert!(text.lines().any(|l| l.starts_with(node) && l.contains(" up ")), "{text}");
    }
    assert!(text.contains("/shared: "), "{text}");

    let bad = devcluster(&["exec", "node9", "--", "true"]);
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&bad.stderr).trim(), "devcluster: exec: unknown node 'node9' (one of ctl node1 node2)");
    let bad = devcluster(&["launch"]);
    assert_eq!(bad.status.code(), Some(2));
    // Exit codes of the command inside come back unchanged.
    assert_eq!(devcluster(&["exec", "node1", "--", "sh", "-c", "exit 7"]).status.code(), Some(7));
}

/// Everything `down` must remove, as seen from the machine.
/// Only this cluster's: others may run side by side (CKPT_DEVCLUSTER_PREFIX).
fn leftovers(state: &str) -> Vec<String> {
    let prefix = std::env::var("CKPT_DEVCLUSTER_PREFIX").unwrap_or_else(|_| "ckptdev".into());
    let mut found = Vec::new();
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    for line in String::from_utf8_lossy(&netns.stdout).lines() {
        if line.starts_with(&format!("{prefix}-")) {
            found.push(format!("netns {line}"));
        }
    }
    for line in std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines() {
        if line.contains(state) {
            found.push(format!("mount {line}"));
        }
    }
    let loops = Command::new("losetup").args(["-nO", "NAME,BACK-FILE"]).output().unwrap();
    for line in String::from_utf8_lossy(&loops.stdout).lines() {
        if line.contains(state) {
            found.push(format!("loop {line}"));
        }
    }
    let ps = Command::new("ps").args(["-eo", "pid,args"]).output().unwrap();
    for line in String::from_utf8_lossy(&ps.stdout).lines() {
        // A host's processes sit in its cgroup below .../PREFIX/HOST.
        let pid = line.split_whitespace().next().unwrap_or("");
        let ours = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.contains(&format!("/{prefix}/")));
        if ours && ["slurmd", "slurmctld", "munged", "node_services", "devcluster _init"].iter().any(|p| line.contains(p)) {
            found.push(format!("process {line}"));
        }
    }
    for entry in std::fs::read_dir("/sys/fs/cgroup").unwrap() {
        let ctrl = entry.unwrap().path();
        let own = Command::new("find").arg(&ctrl).args(["-maxdepth", "4", "-type", "d", "-name", &prefix]).output().unwrap();
        for line in String::from_utf8_lossy(&own.stdout).lines() {
            found.push(format!("cgroup {line}"));
        }
    }
    found
}

#[test]
fn down_leaves_nothing_behind_and_up_comes_back() {
    let c = cluster();
    // Leave a running job and a container behind on purpose: down must still
    // clean up everything.
    c.sh("node1", "alice", &format!("sbatch -w node2 --wrap 'apptainer -s exec {} sleep 300'", cluster_tests::TEST_SIF)).ok();
    let state = c.state.parent().unwrap().to_str().unwrap().to_string();
    assert!(devcluster(&["down"]).status.success());
    assert_eq!(leftovers(&state), Vec::<String>::new());
    let up = devcluster(&["up"]);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    c.exec("node2", "alice", &["srun", "-N2", "true"]).ok();
}
