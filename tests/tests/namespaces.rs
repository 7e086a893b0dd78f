//! A protected container's PID and network namespaces: its pids are free at
//! restore whatever runs on the target node, TCP between its processes is
//! checkpointed, the restored program keeps a valid session in the task's
//! cgroups; with `container_network=node`, a connection to outside refuses
//! the checkpoint with its peer named, and the job goes on.

use cluster_tests::{cluster, counter_field as field, Cluster, PlugstackOverride, TcpCounter};
use std::time::{Duration, Instant};

const MINUTE: Duration = Duration::from_secs(60);

/// Requeues `job` and waits until it is pending again.
fn requeue(c: &Cluster, job: u32) {
    c.exec("ctl", "root", &["scontrol", "requeue", &job.to_string()]).ok();
    c.wait_state(job, &["PENDING"], MINUTE);
}

/// The pids a checkpoint needs, from its manifest.
fn checkpoint_pids(c: &Cluster, dir: &str) -> Vec<i32> {
    let manifest = c.exec("node1", "root", &[cluster_tests::HELPER, "inspect", dir]).ok().stdout;
    let start = manifest.find("pids = [").expect("pids in the manifest") + "pids = [".len();
    let end = start + manifest[start..].find(']').unwrap();
    manifest[start..end].split(|ch: char| !ch.is_ascii_digit()).filter_map(|p| p.parse().ok()).collect()
}

/// Makes every pid in `pids` used on `node` (by a root sleeper when free);
/// returns the sleepers' pids.
fn occupy(c: &Cluster, node: &str, pids: &[i32]) -> Vec<i32> {
    let list = pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" ");
    let script = format!(
        "for p in {list}; do kill -0 $p 2>/dev/null && continue; echo $((p - 1)) > /proc/sys/kernel/ns_last_pid; \
         nohup sleep 600 >/dev/null 2>&1 & echo $!; done"
    );
    let sleepers: Vec<i32> = c.sh(node, "root", &script).ok().stdout.split_whitespace().filter_map(|p| p.parse().ok()).collect();
    for p in pids {
        assert!(c.exec(node, "root", &["kill", "-0", &p.to_string()]).success(), "pid {p} could not be taken on {node}");
    }
    sleepers
}

#[test]
fn tcp_inside_a_container_survives_a_restore_on_a_node_where_its_pids_are_taken() {
    let c = cluster();
    let dir = TcpCounter::new(c, &[]);
    let steps = 80;
    let job = dir.submit(c, &format!("pingpong /data/out.txt {steps} 100"));
    dir.wait_lines(10);
    let first = dir.lines();
    // Its own PID namespace: our init is 1 and leads the session.
    assert_eq!(field(&first[0], "sid"), 1, "{first:?}");
    assert!(field(&first[0], "pid") > 1, "{first:?}");
    requeue(c, job);
    let before = dir.lines().len();
    let out = dir.output();
    assert!(out.contains("checkpoint-container: checkpointed task 0 of step"), "{out}");

    // The program's pids are in use on node2, by the node's own processes.
    let pids = checkpoint_pids(c, &format!("/shared/checkpoints/{job}/step0.task0"));
    assert!(!pids.is_empty());
    let sleepers = occupy(c, "node2", &pids);
    c.release(job, Some("node2"));
    c.wait_state(job, &["RUNNING"], MINUTE);
    let deadline = Instant::now() + MINUTE;
    while dir.lines().len() < before + 5 {
        assert!(Instant::now() < deadline, "no progress after the restore:\n{}", dir.output());
        std::thread::sleep(Duration::from_millis(100));
    }

    // The restored program: not PID 1 of its namespace, a session it can
    // see, and in the task's cgroups (those of the task process).
    let pid = field(&first[0], "pid");
    let probe = format!(
        "for p in $(pgrep -u alice -f '/data/tcpc pingpong'); do grep -q \"^NSpid:.*[[:space:]]{pid}$\" /proc/$p/status && echo $p; done; true"
    );
    let node_pid = c.sh("node2", "root", &probe).ok().stdout.trim().to_string();
    assert!(!node_pid.is_empty() && !node_pid.contains('\n'), "restored program not found: {node_pid:?}");
    let nspid = c.sh("node2", "root", &format!("grep NSpid /proc/{node_pid}/status")).ok().stdout;
    assert_eq!(nspid.split_whitespace().count(), 3, "in a PID namespace of its own: {nspid}");
    let task = c.sh("node2", "root", &format!("pgrep -u alice -f '^{} task'", cluster_tests::HELPER)).ok().stdout;
    let task = task.split_whitespace().next().expect("the task process");
    let cgroups = |p: &str| c.sh("node2", "root", &format!("cat /proc/{p}/cgroup")).ok().stdout;
    let restored_cgroups = cgroups(&node_pid);
    assert!(restored_cgroups.contains(&format!("job_{job}/step_0")), "{restored_cgroups}");
    assert_eq!(restored_cgroups, cgroups(task), "the restored program left the task's cgroups");

    assert_eq!(c.wait_job(job, 2 * MINUTE), "COMPLETED", "{}", dir.output());
    let out = dir.output();
    assert!(out.contains("run restart=1 on node2") && out.contains("checkpoint-container: restored process"), "{out}");
    let lines = dir.lines();
    assert_eq!(lines.len(), steps + 1, "{lines:?}\n{out}");
    for (i, line) in lines[..steps].iter().enumerate() {
        assert_eq!(field(line, "counter"), i as i64 + 1, "line {}: {line}", i + 1);
        assert_eq!(field(line, "pid"), pid, "line {}: {line}", i + 1);
        assert!(field(line, "sid") > 0, "line {}: {line}", i + 1);
    }
    assert_eq!(lines[steps], format!("done {steps}"));
    assert!(field(&lines[before], "sid") != 1, "the restored tree is in CRIU's session: {}", lines[before]);
    for s in sleepers {
        c.exec("node2", "root", &["kill", &s.to_string()]);
    }
    let _ = std::fs::remove_dir_all(&dir.host);
}

#[test]
fn with_the_nodes_network_a_connection_outside_refuses_the_checkpoint_naming_the_peer() {
    let c = cluster();
    let _node_network = PlugstackOverride::new(c, |line| format!("{line} container_network=node"));
    let dir = TcpCounter::new(c, &[]);
    let ip = c.sh("ctl", "root", "hostname -I").ok().stdout.split_whitespace().next().unwrap().to_string();
    let port = 7000 + std::process::id() % 1000;
    let listener = c.sh("ctl", "root", &format!("nohup {}/tcpc listen {port} >/dev/null 2>&1 & echo $!", dir.path)).ok().stdout;
    std::thread::sleep(Duration::from_millis(300));
    let steps = 40;
    let job = dir.submit(c, &format!("hold /data/out.txt {steps} 100 {ip} {port}"));
    dir.wait_lines(5);
    requeue(c, job);
    let out = dir.output();
    let refusals: Vec<&str> = out.lines().filter(|l| l.contains("failed:")).collect();
    assert_eq!(refusals.len(), 1, "{out}");
    assert!(refusals[0].contains(&format!("has a TCP connection to {ip}:{port} open")), "{out}");
    assert!(refusals[0].contains("container_network = node"), "{out}");
    // The job goes on: it runs again, from the start.
    c.release(job, None);
    assert_eq!(c.wait_job(job, 2 * MINUTE), "COMPLETED", "{}", dir.output());
    let lines = dir.lines();
    assert_eq!(lines.iter().filter(|l| field(l, "counter") == 1).count(), 2, "{lines:?}");
    assert_eq!(lines.last().unwrap(), &format!("done {steps}"));
    c.exec("ctl", "root", &["kill", listener.trim()]);
    let _ = std::fs::remove_dir_all(&dir.host);
}
