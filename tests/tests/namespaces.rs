//! A protected container's PID and network namespaces: its pids are free at
//! restore whatever runs on the target node, TCP between its processes is
//! checkpointed, the restored program keeps a valid session in the task's
//! cgroups; with `container_network=node`, a connection to outside refuses
//! the checkpoint with its peer named, and the job goes on.

use cluster_tests::{cluster, gcc, unique, Cluster, PlugstackOverride, TEST_SIF};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const MINUTE: Duration = Duration::from_secs(60);

/// `pingpong OUT STEPS MS`: two processes pass a counter over a loopback TCP
/// connection, the child adding one each time; the parent appends
/// `counter=N pid=P sid=S` per step, then `done N`. A reset or a lost
/// connection shows as a counter that restarts, repeats or stops.
/// `hold OUT STEPS MS IP PORT`: the same lines, with a connection to IP:PORT
/// held open. `listen PORT`: accepts connections and keeps them.
const PROGRAM: &str = r#"
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int full(int fd, void *b, size_t n, int wr) {
    char *p = b;
    while (n) {
        ssize_t r = wr ? write(fd, p, n) : read(fd, p, n);
        if (r <= 0) return 0;
        p += r; n -= r;
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "listen")) {
        int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[2])) };
        if (bind(l, (void *)&a, sizeof a) || listen(l, 16)) return 1;
        for (;;) accept(l, 0, 0);
    }
    int steps = atoi(argv[3]), ms = atoi(argv[4]);
    int out = open(argv[2], O_WRONLY | O_APPEND | O_CREAT, 0644);
    int s = -1;
    pid_t child = 0;
    if (!strcmp(argv[1], "hold")) {
        s = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[6])) };
        inet_pton(AF_INET, argv[5], &a.sin_addr);
        if (connect(s, (void *)&a, sizeof a)) { dprintf(out, "cannot connect\n"); return 1; }
    } else {
        int l = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        socklen_t len = sizeof a;
        if (bind(l, (void *)&a, len) || listen(l, 1) || getsockname(l, (void *)&a, &len)) return 1;
        child = fork();
        if (child == 0) {
            int c = socket(AF_INET, SOCK_STREAM, 0);
            if (connect(c, (void *)&a, len)) _exit(1);
            close(l);
            uint32_t n;
            while (full(c, &n, 4, 0)) {
                n = htonl(ntohl(n) + 1);
                if (!full(c, &n, 4, 1)) break;
            }
            _exit(0);
        }
        s = accept(l, 0, 0);
        close(l);
    }
    uint32_t n = 0;
    for (int i = 1; i <= steps; i++) {
        if (child) {
            uint32_t x = htonl(n), m;
            if (!full(s, &x, 4, 1) || !full(s, &m, 4, 0)) { dprintf(out, "connection lost at %u\n", n); return 1; }
            m = ntohl(m);
            if (m != n + 1) { dprintf(out, "sent %u got %u\n", n, m); return 1; }
            n = m;
        } else {
            n = i;
        }
        dprintf(out, "counter=%u pid=%d sid=%d\n", n, getpid(), getsid(0));
        usleep(ms * 1000);
    }
    dprintf(out, "done %u\n", n);
    if (child) kill(child, SIGKILL);
    return 0;
}
"#;

/// A directory of alice's in /shared holding the program.
struct Dir {
    path: String,
    host: PathBuf,
}

impl Dir {
    fn new(c: &Cluster) -> Dir {
        let name = format!("ns-{}", unique());
        let path = format!("/shared/{name}");
        c.sh("node1", "root", &format!("install -d -o alice -g alice -m 0755 {path}")).ok();
        let host = c.shared.join(&name);
        gcc(PROGRAM, &host.join("tcpc"), &["-static", "-O2"]);
        Dir { path, host }
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.host.join("out.txt")).unwrap_or_default().lines().map(String::from).collect()
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.host.join("job.out")).unwrap_or_default()
    }

    fn wait_lines(&self, n: usize) {
        let deadline = Instant::now() + 2 * MINUTE;
        while self.lines().len() < n {
            assert!(Instant::now() < deadline, "out.txt stuck at {} lines:\n{}", self.lines().len(), self.output());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Submits, as alice on node1, a protected job running `tcpc ARGS`.
    fn submit(&self, c: &Cluster, args: &str) -> u32 {
        let script = format!(
            "#!/bin/bash\n#SBATCH --checkpoint-container\n#SBATCH -o {0}/job.out\n#SBATCH --open-mode=append\n\
             echo \"run restart=${{SLURM_RESTART_COUNT:-0}} on $(hostname)\"\n\
             srun apptainer -s exec --bind {0}:/data {TEST_SIF} /data/tcpc {args}\n",
            self.path
        );
        c.sbatch("alice", &["-w", "node1"], &script)
    }
}

/// `field=value` of a `counter=` line.
fn field(line: &str, key: &str) -> i64 {
    line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))).and_then(|v| v.parse().ok()).unwrap_or(-1)
}

/// Requeues `job` and waits until it is pending again.
fn requeue(c: &Cluster, job: u32) {
    c.exec("ctl", "root", &["scontrol", "requeue", &job.to_string()]).ok();
    wait_state(c, job, "PENDING");
}

fn wait_state(c: &Cluster, job: u32, state: &str) {
    let deadline = Instant::now() + MINUTE;
    while c.job_field(job, "JobState").as_deref() != Some(state) {
        assert!(Instant::now() < deadline, "job {job} never {state}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn release(c: &Cluster, job: u32, node: &str) {
    let id = format!("jobid={job}");
    c.exec("ctl", "root", &["scontrol", "update", &id, &format!("NodeList={node}")]).ok();
    c.exec("ctl", "root", &["scontrol", "update", &id, "StartTime=now"]).ok();
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
    let dir = Dir::new(c);
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
    release(c, job, "node2");
    wait_state(c, job, "RUNNING");
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
    let task = c.sh("node2", "root", "pgrep -u alice -f '^/opt/checkpoint-container/bin/checkpoint-container task'").ok().stdout;
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
    let dir = Dir::new(c);
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
    release(c, job, "node1");
    assert_eq!(c.wait_job(job, 2 * MINUTE), "COMPLETED", "{}", dir.output());
    let lines = dir.lines();
    assert_eq!(lines.iter().filter(|l| field(l, "counter") == 1).count(), 2, "{lines:?}");
    assert_eq!(lines.last().unwrap(), &format!("done {steps}"));
    c.exec("ctl", "root", &["kill", listener.trim()]);
    let _ = std::fs::remove_dir_all(&dir.host);
}
