//! The runtime shim (docs/security.md, "Who may talk to root"): the agent
//! of a task that is no container serves only the task's own processes,
//! and root puts on users' PATH only a directory root alone can change.

use cluster_tests::{cluster, BatchJob, Cluster, HELPER, TEST_SIF};

fn shim_dir() -> String {
    format!("{}/shim", HELPER.rsplit_once('/').unwrap().0)
}

/// A protected job of `user`'s whose batch script sleeps; its agent's
/// socket.
fn sleeping_job(c: &Cluster, user: &str) -> (u32, String) {
    let job = c.sbatch(user, &["-w", "node1", "-o", "/dev/null"], "#!/bin/bash\n#SBATCH --checkpoint-container\nsleep 300\n");
    c.wait_state(job, &["RUNNING"], std::time::Duration::from_secs(60));
    let socket = format!("/run/checkpoint-container/{job}.4294967291.0.sock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !c.exec("node1", "root", &["test", "-S", &socket]).success() {
        assert!(std::time::Instant::now() < deadline, "no agent socket {socket}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    (job, socket)
}

/// Runs, as alice on node1 outside any job, the shim pointed at `socket`;
/// the container must run all the same (unprotected). Returns its output.
fn shim_pointed_at(c: &Cluster, socket: &str) -> cluster_tests::Output {
    let out = c
        .sh("node1", "alice", &format!("CHECKPOINT_CONTAINER_SOCKET={socket} {}/apptainer -s exec {TEST_SIF} echo ran-anyway", shim_dir()))
        .ok();
    assert!(out.stdout.contains("ran-anyway"), "{out:#?}");
    out
}

/// Another job of hers (or no job) pointing the shim at this job's agent:
/// its parent chain does not reach the task, so the container runs
/// unprotected, as she could run it herself, and is told so.
#[test]
fn a_process_outside_the_task_cannot_hand_its_container_to_the_tasks_agent() {
    let c = cluster();
    let (job, socket) = sleeping_job(c, "alice");
    let out = shim_pointed_at(c, &socket);
    assert!(out.stderr.contains(&format!("is not a process of task 0 of step {job}.batch: its container runs unprotected")), "{out:#?}");
    c.exec("ctl", "root", &["scancel", &job.to_string()]).ok();
}

/// bob's job's agent socket is bob's alone: alice's shim cannot even
/// connect, and her container runs unprotected, saying so.
#[test]
fn another_users_agent_is_out_of_reach() {
    let c = cluster();
    let (job, socket) = sleeping_job(c, "bob");
    let out = shim_pointed_at(c, &socket);
    assert!(out.stderr.contains("does not answer (Permission denied"), "{out:#?}");
    assert!(out.stderr.contains("this container runs unprotected"), "{out:#?}");
    c.exec("ctl", "root", &["scancel", &job.to_string()]).ok();
}

/// A shim directory others may write to would let them put programs on
/// every protected user's PATH: the plugin leaves it off, says why in the
/// node's log, and the script's container runs unprotected.
#[test]
fn a_shim_directory_others_can_write_is_not_put_on_users_path() {
    let c = cluster();
    let dir = shim_dir();
    c.exec("node1", "root", &["chmod", "0777", &dir]).ok();
    let job =
        c.submit_job(&["-w", "node1"], None, |_| (format!("echo \"PATH=$PATH\"; apptainer -s exec {TEST_SIF} echo ran-unprotected"), 0, 0));
    let state = c.wait_job(job.id, std::time::Duration::from_secs(120));
    c.exec("node1", "root", &["chmod", "0755", &dir]).ok();
    let out = job.output();
    assert_eq!(state, "COMPLETED", "{out}");
    assert!(out.contains("ran-unprotected") && !out.contains(&dir) && !out.contains("is protected"), "{out}");
    assert!(c.daemon_log("node1").contains(&format!("runtime shim {dir} is unusable: writable by group or others")));
    BatchJob::cleanup(&job, c);
}

/// A script that leaves a process ignoring SIGTERM in its process group
/// keeps the batch step's end waiting for its output, but only for the
/// output's grace once the checkpoint is done, well before slurmd's
/// SIGKILL (KillWait, 30 s here) would end the wait: the requeue goes
/// through, the container is checkpointed and restored, and the node is
/// not drained.
#[test]
fn a_process_that_ignores_sigterm_cannot_hold_the_batch_steps_end_past_its_bound() {
    let c = cluster();
    let job = c.submit_workload_job(&["-w", "node1"], &["( trap '' TERM; exec sleep 1000 ) &", "{W} --out /data/out.txt"], 64, 80);
    job.wait_lines("out.txt", 10);
    c.exec("ctl", "root", &["scontrol", "requeue", &job.id.to_string()]).ok();
    c.wait_state(job.id, &["PENDING"], std::time::Duration::from_secs(120));
    let node = c.exec("ctl", "root", &["scontrol", "-o", "show", "node", "node1"]).ok().stdout;
    assert!(!node.contains("DRAIN"), "{node}");
    let waited: Vec<f64> = c
        .daemon_log("node1")
        .lines()
        .filter(|l| l.contains(&format!("job {}: the batch script's end waited", job.id)))
        .filter_map(|l| l.split("waited ").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert!(!waited.is_empty() && waited.iter().all(|&s| s < 20.0), "{waited:?}");
    c.release(job.id, None);
    assert_eq!(c.wait_job(job.id, std::time::Duration::from_secs(120)), "COMPLETED", "{}", job.output());
    job.assert_continued("out.txt");
    job.cleanup(c);
}

/// Root relays the PMI socket a container is given (helper/src/pmi.rs), so
/// it must be the step's slurmstepd's: a script that names a descriptor of
/// its own in `PMI_FD` (here a file it appends to; a socket to a daemon
/// that trusts its senders' credentials would be the attack) gets its
/// container run unprotected, with the reason, and root writes nothing
/// into it.
#[test]
fn a_pmi_fd_that_is_not_slurmstepds_socket_is_not_relayed() {
    let c = cluster();
    let job =
        c.submit_job(&["-w", "node1"], None, |dir| (format!("PMI_FD=7 apptainer -s exec {TEST_SIF} echo ran 7>>{dir}/mine.txt"), 0, 0));
    let state = c.wait_job(job.id, std::time::Duration::from_secs(120));
    let out = job.output();
    assert_eq!(state, "COMPLETED", "{out}");
    assert!(out.contains("runs unprotected: PMI_FD names no socket of this step's slurmstepd") && out.contains("ran"), "{out}");
    assert_eq!(std::fs::metadata(job.host_dir.join("mine.txt")).map(|m| m.len()).ok(), Some(0), "{out}");
    BatchJob::cleanup(&job, c);
}

/// Root writes into a container's stdout and stderr (lines for the user, a
/// restored program's output), so they must be what a task's are: a
/// script that gives its container a /proc file as stderr (one whose write
/// checks the writer's capabilities: here its own `oom_score_adj`, which
/// root could lower below what she may) gets the container run
/// unprotected, and the file keeps its value.
#[test]
fn a_container_whose_stderr_is_a_proc_file_runs_unprotected_and_root_writes_nothing_there() {
    let c = cluster();
    let job = c.submit_job(&["-w", "node1"], None, |dir| {
        let script = format!(
            "before=$(cat /proc/$$/oom_score_adj)\napptainer -s exec {TEST_SIF} echo ran 2>/proc/$$/oom_score_adj\n\
             echo \"slack $before $(cat /proc/$$/oom_score_adj)\" > {dir}/slack.txt"
        );
        (script, 0, 0)
    });
    let state = c.wait_job(job.id, std::time::Duration::from_secs(120));
    let out = job.output();
    assert_eq!(state, "COMPLETED", "{out}");
    assert!(out.contains("ran") && !out.contains("is protected"), "{out}");
    let slack = job.lines("slack.txt");
    let values: Vec<&str> = slack.first().map(|l| l.split(' ').skip(1).collect()).unwrap_or_default();
    assert!(values.len() == 2 && values[0] == values[1], "the file changed: {slack:?}");
    let log = c.exec("node1", "root", &["grep", "-c", "its fd 2 is neither a pipe", "/var/log/slurm/checkpoint-container.log"]).stdout;
    assert!(log.trim().parse::<u32>().unwrap_or(0) >= 1, "no refusal in the agent's log");
    BatchJob::cleanup(&job, c);
}
