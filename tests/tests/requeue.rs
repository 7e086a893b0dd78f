//! Checkpoint on preemption and `scontrol requeue`, restore on the requeued
//! run, with real slurmctld/slurmd, munge, Apptainer and CRIU.

use cluster_tests::{cluster, job_mem_per_cpu_mib, BatchJob, Cluster, PlugstackOverride, HELPER, TEST_SIF};
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);
const ONE_STEP: &[&str] = &["srun {W} --out /data/out.txt"];

fn requeue(c: &Cluster, job: &BatchJob) {
    c.exec("ctl", "root", &["scontrol", "requeue", &job.id.to_string()]).ok();
}

/// Requeues once the program has made progress; returns the lines written
/// before the checkpoint.
fn requeue_after(c: &Cluster, job: &BatchJob, file: &str, lines: usize) -> usize {
    job.wait_lines(file, lines);
    requeue(c, job);
    c.wait_state(job.id, &["PENDING"], MINUTE);
    job.lines(file).len()
}

fn assert_restored_and_cleaned(c: &Cluster, job: &BatchJob, restarts: u32) {
    assert_eq!(c.wait_job(job.id, 2 * MINUTE), "COMPLETED", "{}", job.output());
    assert_eq!(c.job_field(job.id, "Restarts").as_deref(), Some(restarts.to_string().as_str()));
    let out = job.output();
    assert_eq!(out.matches("checkpoint-container: checkpointed task 0 of step").count(), restarts as usize, "{out}");
    assert_eq!(out.matches("checkpoint-container: restored process").count(), restarts as usize, "{out}");
    job.assert_no_checkpoints_left(c, "node1");
}

/// Waits for the job to complete after a run that started over: the counter
/// restarted from 1, and the run ended right. Returns the job's output.
fn completed_from_the_start(c: &Cluster, job: &BatchJob) -> String {
    assert_eq!(c.wait_job(job.id, 2 * MINUTE), "COMPLETED", "{}", job.output());
    let lines = job.lines("out.txt");
    assert_eq!(lines.iter().filter(|l| l.starts_with("counter=1 ")).count(), 2, "started over: {lines:?}");
    assert_eq!(lines.last().unwrap(), &job.expected_done());
    job.output()
}

#[test]
fn scontrol_requeue_checkpoints_and_the_requeued_job_restores() {
    let c = cluster();
    let job = c.submit_workload_job(&["-w", "node1"], ONE_STEP, 256, 80);
    let saved = requeue_after(c, &job, "out.txt", 10);
    assert!(saved < 80, "checkpointed mid-run");
    let manifest = c.exec("node1", "root", &[HELPER, "inspect", "--verify", &job.checkpoint_of(0, 0)]).ok().stdout;
    assert!(manifest.contains(&format!("job_id = {}", job.id)), "{manifest}");
    c.release(job.id, None);
    assert_restored_and_cleaned(c, &job, 1);
    job.assert_continued("out.txt");
    job.cleanup(c);
}

/// With a supplementary group, as most users have: CRIU runs unprivileged
/// and cannot setgroups, so it must already have hers, or the restore fails
/// (`Can't setgroups([2 gids])`).
#[test]
fn requeued_job_restores_on_the_other_node() {
    let c = cluster();
    c.give_alice_a_second_group();
    let job = c.submit_workload_job(&["-w", "node1"], ONE_STEP, 256, 80);
    requeue_after(c, &job, "out.txt", 10);
    c.release(job.id, Some("node2"));
    assert_restored_and_cleaned(c, &job, 1);
    assert!(job.output().contains("run restart=1 on node2"), "{}", job.output());
    job.assert_continued("out.txt");
    job.cleanup(c);
}

/// What the program printed before its checkpoint reaches the job's output
/// file, though Slurm SIGKILLs the script's srun (which writes it there)
/// once the requeue's SIGTERM has ended the script: a program printing a
/// numbered line every few milliseconds, requeued, shows each line once.
/// Its tree is stopped while the checkpoint lists it, with children
/// forking and exiting throughout.
#[test]
fn a_requeued_programs_output_loses_and_repeats_no_line() {
    let c = cluster();
    let printer = format!("srun apptainer -s exec {TEST_SIF} bash -c 'for ((i=0;i<1500;i++)); do echo \"line $i\"; sleep 0.004; done'");
    let job = c.submit_job(&["-w", "node1"], None, |_| (printer, 0, 0));
    job.wait_lines("job.out", 300);
    requeue(c, &job);
    c.release(job.id, None);
    assert_restored_and_cleaned(c, &job, 1);
    let printed: Vec<u32> = job.lines("job.out").iter().filter_map(|l| l.strip_prefix("line ")?.parse().ok()).collect();
    assert_eq!(printed, (0..1500).collect::<Vec<u32>>(), "{}", job.output());
    job.cleanup(c);
}

#[test]
fn job_requeued_twice_finishes_correctly() {
    let c = cluster();
    let job = c.submit_workload_job(&["-w", "node1"], ONE_STEP, 64, 80);
    let first = requeue_after(c, &job, "out.txt", 10);
    c.release(job.id, None);
    c.wait_state(job.id, &["RUNNING"], MINUTE);
    requeue_after(c, &job, "out.txt", first + 10);
    c.release(job.id, Some("node2"));
    assert_restored_and_cleaned(c, &job, 2);
    job.assert_continued("out.txt");
    job.cleanup(c);
}

#[test]
fn preemption_by_a_high_priority_job_checkpoints_and_restores_on_the_other_node() {
    let c = cluster();
    let job = c.submit_workload_job(&["-w", "node1", "-c", "2"], ONE_STEP, 256, 80);
    job.wait_lines("out.txt", 10);
    let high = c.sbatch("bob", &["-p", "high", "-w", "node1", "-c", "2"], "#!/bin/bash\nsleep 3\n");
    assert_eq!(c.wait_job(high, 2 * MINUTE), "COMPLETED");
    // The low job was preempted (not cancelled): it is waiting to run again.
    c.wait_state(job.id, &["PENDING"], MINUTE);
    c.release(job.id, Some("node2"));
    assert_restored_and_cleaned(c, &job, 1);
    assert!(job.output().contains("run restart=1 on node2"), "{}", job.output());
    job.assert_continued("out.txt");
    job.cleanup(c);
}

#[test]
fn staged_compressed_checkpoint_is_moved_after_the_job_lets_go_and_restores_elsewhere() {
    let c = cluster();
    for node in ["node1", "node2"] {
        c.exec(node, "root", &["mkdir", "-p", "/dev/shm/ckpt-staging"]).ok();
    }
    let _site = PlugstackOverride::new(c, |line| format!("{line} staging_dir=/dev/shm/ckpt-staging compression=zstd"));
    let job = c.submit_workload_job(&["-w", "node1"], ONE_STEP, 256, 80);
    let saved = requeue_after(c, &job, "out.txt", 10);
    assert!(saved < 80, "checkpointed mid-run");
    c.release(job.id, Some("node2"));
    assert_restored_and_cleaned(c, &job, 1);
    job.assert_continued("out.txt");
    let log = c.exec("node1", "root", &["cat", "/var/log/slurm/checkpoint-container.log"]).ok().stdout;
    assert!(log.contains(&format!("task 0 of step {}.0: checkpoint moved to /shared/checkpoints/{}/step0.task0", job.id, job.id)), "{log}");
    assert_eq!(c.exec("node1", "root", &["ls", "-A", "/dev/shm/ckpt-staging"]).ok().stdout, "", "staging area left behind");
    job.cleanup(c);
}

#[test]
fn scancel_takes_no_checkpoint_and_leaves_nothing() {
    let c = cluster();
    let job = c.submit_workload_job(&["-w", "node2"], ONE_STEP, 64, 600);
    job.wait_lines("out.txt", 5);
    c.exec("node1", "alice", &["scancel", &job.id.to_string()]).ok();
    assert_eq!(c.wait_job(job.id, MINUTE), "CANCELLED");
    std::thread::sleep(Duration::from_secs(2));
    job.assert_no_checkpoints_left(c, "node1");
    assert!(!job.output().contains("checkpointed task"), "{}", job.output());
    let ps = c.exec("node2", "root", &["pgrep", "-u", "alice", "-f", "ckpt-workload"]);
    assert!(!ps.success(), "the container outlived scancel: {}", ps.stdout);
    job.cleanup(c);
}

/// Two steps of two tasks on one node, the way an MPI job runs: every task
/// is stopped before any is dumped, and all restore on the other node.
#[test]
fn multi_task_steps_and_two_steps_all_restore() {
    let c = cluster();
    let job = c.submit_workload_job(
        &["-w", "node1", "-n2"],
        &["srun --overlap -n2 {W} --out /data/a-%t.txt &", "sleep 2", "srun --overlap -n2 {W} --out /data/b-%t.txt &", "wait"],
        64,
        120,
    );
    for f in ["a-0.txt", "a-1.txt", "b-0.txt", "b-1.txt"] {
        job.wait_lines(f, 5);
    }
    requeue(c, &job);
    c.release(job.id, Some("node2"));
    assert_eq!(c.wait_job(job.id, 2 * MINUTE), "COMPLETED", "{}", job.output());
    let out = job.output();
    assert_eq!(out.matches("checkpoint-container: restored process").count(), 4, "{out}");
    for f in ["a-0.txt", "a-1.txt", "b-0.txt", "b-1.txt"] {
        job.assert_continued(f);
    }
    job.cleanup(c);
}

/// Starts a two-task step, requeues it once both tasks have made progress,
/// and returns the job once it is pending again.
fn requeued_two_task_step(c: &Cluster) -> BatchJob {
    requeued_two_task_step_of(c, "srun -n2")
}

/// The same, started with `srun`: `srun -n2 --mpi=pmi2` runs both tasks'
/// programs in one container (helper/src/agent/ranks.rs).
fn requeued_two_task_step_of(c: &Cluster, srun: &str) -> BatchJob {
    let job = c.submit_workload_job(&["-w", "node1", "-n2"], &[&format!("{srun} {{W}} --out /data/a-%t.txt")], 64, 40);
    job.wait_lines("a-0.txt", 5);
    job.wait_lines("a-1.txt", 5);
    requeue(c, &job);
    c.wait_state(job.id, &["PENDING"], MINUTE);
    job
}

/// Both tasks ran again from their first step, and to the right end.
fn both_tasks_started_over(c: &Cluster, job: &BatchJob) -> String {
    assert_eq!(c.wait_job(job.id, 2 * MINUTE), "COMPLETED", "{}", job.output());
    for f in ["a-0.txt", "a-1.txt"] {
        let lines = job.lines(f);
        assert_eq!(lines.iter().filter(|l| l.starts_with("counter=1 ")).count(), 2, "{f} started over: {lines:?}");
        assert_eq!(lines.last().unwrap(), &job.expected_done(), "{f}");
    }
    job.output()
}

#[test]
fn a_step_missing_one_tasks_checkpoint_starts_fresh_as_a_whole() {
    let c = cluster();
    let job = requeued_two_task_step(c);
    c.exec("node1", "root", &["rm", "-rf", &job.checkpoint_of(0, 1)]).ok();
    c.release(job.id, Some("node2"));
    let out = both_tasks_started_over(c, &job);
    assert!(out.contains(&format!("checkpoint-container: step {}.0 starts fresh: task ", job.id)), "{out}");
    assert!(out.contains("finds no complete checkpoint of task 1"), "{out}");
    assert!(!out.contains("checkpoint-container: restored process"), "{out}");
    job.cleanup(c);
}

/// Task 0 restores, task 1's restore fails: task 0 must not go on alone.
#[test]
fn a_step_whose_task_fails_to_restore_discards_the_restored_tasks() {
    let c = cluster();
    let job = requeued_two_task_step(c);
    let pages = c.sh("node1", "root", &format!("ls {}/pages-*.img | head -1", job.checkpoint_of(0, 1))).ok().stdout;
    c.sh("node1", "root", &format!("printf '\\xff' | dd of={} bs=1 seek=4096 conv=notrunc status=none", pages.trim())).ok();
    c.release(job.id, Some("node2"));
    let out = both_tasks_started_over(c, &job);
    assert!(out.contains(&format!("checkpoint-container: step {}.0 starts fresh: task 1 could not be restored", job.id)), "{out}");
    job.cleanup(c);
}

/// The ranks of an `srun --mpi=pmi2 -n 2` step (here programs that never
/// talk PMI, as any program under `MpiDefault=pmi2`) are one tree: each
/// goes on where it was after the requeue, on the other node; with their
/// checkpoint damaged, both start over together and one line says why.
#[test]
fn the_ranks_of_a_pmi2_step_restore_together_or_start_over_together() {
    let c = cluster();
    let job = requeued_two_task_step_of(c, "srun -n2 --mpi=pmi2");
    c.release(job.id, Some("node2"));
    assert_eq!(c.wait_job(job.id, 2 * MINUTE), "COMPLETED", "{}", job.output());
    assert_eq!(job.output().matches("checkpoint-container: restored process").count(), 1, "{}", job.output());
    job.assert_continued("a-0.txt");
    job.assert_continued("a-1.txt");
    job.cleanup(c);

    let job = requeued_two_task_step_of(c, "srun -n2 --mpi=pmi2");
    let pages = c.sh("node1", "root", &format!("ls {}/pages-*.img | head -1", job.checkpoint_of(0, 0))).ok().stdout;
    c.sh("node1", "root", &format!("printf '\\xff' | dd of={} bs=1 seek=4096 conv=notrunc status=none", pages.trim())).ok();
    c.release(job.id, Some("node2"));
    let out = both_tasks_started_over(c, &job);
    // One line, for the step as a whole.
    let fresh = format!("checkpoint-container: step {}.0 (2 ranks in one container) starts fresh", job.id);
    assert_eq!(out.matches(&fresh).count(), 1, "{out}");
    assert!(!out.contains("checkpoint-container: restored process"), "{out}");
    job.cleanup(c);
}

/// Task 0's agent starts the ranks' one container: when root will not
/// start it (here a bind below bob's home, which alice cannot open), every task runs its own rank
/// unprotected, each saying why, as each would alone.
#[test]
fn a_pmi2_step_that_root_will_not_start_runs_every_rank_unprotected_and_says_why() {
    let c = cluster();
    let srun =
        format!("srun -w node1 -n2 -l --mpi=pmi2 --checkpoint-container apptainer -s exec --bind /home/bob/data:/mnt {TEST_SIF} true");
    let out = c.sh("node1", "alice", &srun);
    let lines: Vec<&str> =
        out.stderr.lines().filter(|l| l.contains("runs unprotected:") && l.contains("cannot be opened by you")).collect();
    assert_eq!(lines.len(), 2, "{out:#?}");
    assert!(lines.iter().any(|l| l.contains("task 0 of step")) && lines.iter().any(|l| l.contains("task 1 of step")), "{out:#?}");
    assert!(!out.stderr.contains("is protected"), "{out:#?}");
}

/// The ranks of an `srun --mpi=pmi2 -n 2` step run in one protected
/// container (helper/src/agent/ranks.rs), each as its own task: its own
/// stdout (srun labels it), its rank's variables, its own PMI socket at
/// the number `PMI_FD` names, and its own exit code for srun.
#[test]
fn an_srun_mpi_step_of_several_ranks_runs_each_rank_as_its_task_in_one_container() {
    let c = cluster();
    let probe = "echo rank=$PMI_RANK procid=$SLURM_PROCID pmi=$(readlink /proc/self/fd/$PMI_FD | cut -c1-7); exit $((3 + SLURM_PROCID))";
    let srun = format!("srun -w node1 -n2 -l --mpi=pmi2 --checkpoint-container apptainer -s exec {TEST_SIF} sh -c '{probe}'");
    let out = c.sh("node1", "alice", &srun);
    assert!(out.stdout.contains("0: rank=0 procid=0 pmi=socket:") && out.stdout.contains("1: rank=1 procid=1 pmi=socket:"), "{out:#?}");
    assert!(out.stderr.contains("is protected") && !out.stderr.contains("unprotected"), "{out:#?}");
    assert!(out.stderr.contains("task 0: Exited with exit code 3") && out.stderr.contains("task 1: Exited with exit code 4"), "{out:#?}");
}

#[test]
fn a_step_on_several_nodes_runs_unprotected_and_says_why() {
    let c = cluster();
    let job = c.submit_workload_job(&["-N2", "-n2"], &["srun -N2 -n2 {W} --out /data/a-%t.txt"], 64, 5);
    assert_eq!(c.wait_job(job.id, 2 * MINUTE), "COMPLETED", "{}", job.output());
    let out = job.output();
    assert!(out.contains("runs unprotected: the step spans 2 nodes, and connections between nodes cannot be checkpointed"), "{out}");
    assert!(!out.contains("is protected"), "{out}");
    job.cleanup(c);
}

#[test]
fn another_user_cannot_read_or_restore_the_images() {
    let c = cluster();
    let job = c.submit_workload_job(&["-w", "node1"], ONE_STEP, 64, 600);
    requeue_after(c, &job, "out.txt", 5);
    let images = job.checkpoint_of(0, 0);
    let out = c.exec("node1", "bob", &["cat", &format!("{images}/manifest.toml")]).failed();
    assert!(out.stderr.contains("Permission denied"), "{}", out.stderr);
    let out = c.exec("node1", "bob", &["ls", &images]).failed();
    assert!(out.stderr.contains("Permission denied"), "{}", out.stderr);
    // Not even alice can take her images outside Slurm: only root restores.
    let out = c.exec("node1", "alice", &[HELPER, "restore", "--images", &images]).failed();
    assert!(out.stderr.contains("Permission denied") || out.stderr.contains("not permitted"), "{}", out.stderr);
    // And root refuses it for bob.
    let out = c.exec("node1", "root", &[HELPER, "restore", "--images", &images, "--uid", "2002"]).failed();
    assert!(out.stderr.contains("belongs to uid 2001, not to uid 2002"), "{}", out.stderr);
    job.cleanup(c);
}

#[test]
fn failed_checkpoint_still_requeues_and_the_job_starts_fresh() {
    let c = cluster();
    // A checkpoint area too small for the container: the dump fails.
    let small = "/var/tmp/small-checkpoints";
    c.sh("node1", "root", &format!("mkdir -p {small} && mount -t tmpfs -o size=16m,mode=755 tmpfs {small}")).ok();
    let job = {
        let _guard = cluster_tests::PlugstackOverride::new(c, |line| {
            line.replace("checkpoint_dir=/shared/checkpoints", &format!("checkpoint_dir={small}"))
        });
        let job = c.submit_workload_job(&["-w", "node1"], ONE_STEP, 64, 40);
        job.wait_lines("out.txt", 5);
        requeue(c, &job);
        c.wait_state(job.id, &["PENDING"], MINUTE);
        job
    };
    c.sh("node1", "root", &format!("umount {small}")).ok();
    let out = job.output();
    assert!(out.contains(&format!("checkpoint-container: checkpoint of task 0 of step {}.0 failed", job.id)), "{out}");
    assert!(out.contains("it will run again from the start"), "{out}");
    c.release(job.id, None);
    let out = completed_from_the_start(c, &job);
    assert!(out.contains(&format!("task 0 of step {}.0 starts fresh: no checkpoint was taken", job.id)), "{out}");
    job.cleanup(c);
}

#[test]
fn restore_failure_on_the_requeued_run_starts_fresh_and_says_why() {
    let c = cluster();
    let job = c.submit_workload_job(&["-w", "node1"], ONE_STEP, 64, 40);
    requeue_after(c, &job, "out.txt", 5);
    // The checkpoint is damaged while the job waits (one byte of memory).
    let pages = c.sh("node1", "root", &format!("ls {}/pages-*.img | head -1", job.checkpoint_of(0, 0))).ok().stdout;
    c.sh("node1", "root", &format!("printf '\\xff' | dd of={} bs=1 seek=4096 conv=notrunc status=none", pages.trim())).ok();
    c.release(job.id, Some("node2"));
    let out = completed_from_the_start(c, &job);
    assert!(out.contains("is damaged: checksum of pages-"), "{out}");
    assert!(out.contains(&format!("task 0 of step {}.0 starts fresh after the failed restore", job.id)), "{out}");
    job.cleanup(c);
}

#[test]
fn checkpoints_of_a_requeued_job_cancelled_while_pending_are_collected() {
    let c = cluster();
    let job = c.submit_workload_job(&["-w", "node1"], ONE_STEP, 64, 600);
    let waiting = c.submit_workload_job(&["-w", "node2"], ONE_STEP, 64, 600);
    requeue_after(c, &job, "out.txt", 5);
    requeue_after(c, &waiting, "out.txt", 5);
    let gc = [HELPER, "--checkpoint-dir", "/shared/checkpoints", "gc"];
    // Both are pending: their checkpoints stay.
    assert_eq!(c.exec("node1", "root", &gc).ok().stdout, "");
    c.exec("node1", "alice", &["scancel", &job.id.to_string()]).ok();
    c.wait_state(job.id, &["CANCELLED"], MINUTE);
    assert_eq!(c.exec("node1", "root", &gc).ok().stdout, format!("{}\n", job.id));
    let left = c.exec("node1", "root", &["ls", "-A", "/shared/checkpoints"]).ok().stdout;
    assert!(!left.split_whitespace().any(|d| d == job.id.to_string()), "{left}");
    assert!(left.split_whitespace().any(|d| d == waiting.id.to_string()), "the pending job lost its checkpoint: {left}");
    job.cleanup(c);
    waiting.cleanup(c);
}

/// Under task/cgroup (the dev cluster's default, as on production sites) the
/// restored program is confined like any task of the new job: it sits in that
/// job's step cgroups, whose memory limit is the job's request and whose
/// cpuset holds the job's one CPU.
#[test]
fn the_restored_program_is_confined_to_the_new_jobs_cgroups() {
    let c = cluster();
    let job = c.submit_workload_job(&["-w", "node1"], ONE_STEP, 64, 600);
    requeue_after(c, &job, "out.txt", 5);
    c.release(job.id, Some("node2"));
    let deadline = std::time::Instant::now() + MINUTE;
    while !job.output().contains("checkpoint-container: restored process ") {
        assert!(std::time::Instant::now() < deadline, "not restored: {}", job.output());
        std::thread::sleep(Duration::from_millis(300));
    }
    // The restored program as the node numbers it (the line gives its pid
    // in the container's own PID namespace).
    let pid = c.exec("node2", "root", &["pgrep", "-o", "-u", "alice", "-x", "ckpt-workload"]).ok().stdout.trim().to_string();
    assert!(!pid.is_empty() && !pid.contains('\n'), "the restored program: {pid:?}");
    let cgroups = c.exec("node2", "root", &["cat", &format!("/proc/{pid}/cgroup")]).ok().stdout;
    // Slurm's cgroup/v1 path: /slurm[_NODE]/uid_U/job_J/step_S/task_T.
    let job_dir = format!("/uid_2001/job_{}", job.id);
    let job_cgroup = |controller: &str| -> String {
        // Lines are "ID:CONTROLLER:PATH".
        let path = cgroups.lines().map(|l| l.splitn(3, ':').collect::<Vec<_>>()).find(|f| f[1] == controller).map_or("", |f| f[2]);
        assert!(path.contains(&format!("{job_dir}/step_0")), "{controller}: {cgroups}");
        format!("/sys/fs/cgroup/{controller}{}{job_dir}", path.split(&job_dir).next().unwrap())
    };
    job_cgroup("devices");
    let limit = c.exec("node2", "root", &["cat", &format!("{}/memory.limit_in_bytes", job_cgroup("memory"))]).ok().stdout;
    assert_eq!(limit.trim(), (u64::from(job_mem_per_cpu_mib(64)) << 20).to_string());
    let cpus = c.exec("node2", "root", &["cat", &format!("{}/cpuset.cpus", job_cgroup("cpuset"))]).ok().stdout;
    assert!(cpus.trim().parse::<u32>().is_ok(), "one CPU: {cpus}");
    job.cleanup(c);
}

/// Under `--mpi=pmi2` (a site's `MpiDefault=pmi2` gives every step this) a
/// program that never talks to Slurm's PMI still holds its socket: the
/// relay's end is carried over, and the restored program gets the new
/// run's, with nothing said for it.
#[test]
fn a_one_task_pmi2_step_of_a_program_that_never_talks_pmi_restores_on_the_other_node() {
    let c = cluster();
    let job = c.submit_workload_job(&["-w", "node1"], &["srun --mpi=pmi2 {W} --out /data/out.txt"], 64, 80);
    requeue_after(c, &job, "out.txt", 10);
    let manifest = c.exec("node1", "root", &[HELPER, "inspect", "--verify", &job.checkpoint_of(0, 0)]).ok().stdout;
    assert!(manifest.contains("[process.slurm_pmi]") && !manifest.contains("init_version"), "{manifest}");
    c.release(job.id, Some("node2"));
    assert_restored_and_cleaned(c, &job, 1);
    job.assert_continued("out.txt");
    job.cleanup(c);
}
