//! Periodic checkpoints: a running container is checkpointed every interval
//! and left running; a job whose node dies is requeued by Slurm and restores
//! the last one on another node.

use cluster_tests::{cluster, with_arg, BatchJob, PlugstackOverride, HELPER};
use std::path::Path;
use std::time::{Duration, Instant};

const MINUTE: Duration = Duration::from_secs(60);
/// The job's interval (CHECKPOINT_CONTAINER_INTERVAL), in seconds; the site
/// lets jobs ask for as little as 2.
const INTERVAL: u64 = 4;
/// The workload's steps per second (--interval-ms 100).
const STEPS_PER_SECOND: u64 = 10;

fn site_allows_short_intervals(line: &str) -> String {
    with_arg(line, "checkpoint_interval_min", "2")
}

/// The job's script asks for INTERVAL in its environment.
const ASK: &str = "export CHECKPOINT_CONTAINER_INTERVAL=4";

/// The counters of `file`'s step lines, in file order.
fn counters(job: &BatchJob, file: &str) -> Vec<u64> {
    job.lines(file).iter().filter_map(|l| l.strip_prefix("counter=")?.split_whitespace().next()?.parse().ok()).collect()
}

/// When the task's checkpoint was created (manifest), once there is one.
fn checkpoint_created(manifest: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(manifest).ok()?;
    text.lines().find_map(|l| l.strip_prefix("created_unix = ")?.trim().parse().ok())
}

#[test]
fn a_job_whose_node_dies_is_requeued_and_restores_its_last_periodic_checkpoint_on_the_other_node() {
    node_dies_mid_job(&[], "srun {W} --out /data/out.txt", "step0.task0", &["out.txt"]);
}

/// The same with the container started right in the batch script (the
/// runtime shim's): the requeued script finds its checkpoint again.
#[test]
fn a_batch_scripts_container_restores_its_last_periodic_checkpoint_after_its_node_died() {
    node_dies_mid_job(&[], "{W} --out /data/out.txt", "step4294967291.task0.c0", &["out.txt"]);
}

/// The ranks of an `srun --mpi=pmi2 -n 2` step run in one container
/// (helper/src/agent/ranks.rs): one tree, checkpointed every interval as one
/// task's, and both go on from the last checkpoint after their node died.
#[test]
fn the_ranks_of_a_pmi2_step_restore_their_last_periodic_checkpoint_after_their_node_died() {
    let line = "srun -n2 --mpi=pmi2 {W} --out /data/a-%t.txt";
    node_dies_mid_job(&["-n2"], line, "step0.task0", &["a-0.txt", "a-1.txt"]);
}

/// Runs `line` with periodic checkpoints (into `checkpoint`, below the
/// job's directory) on node1, in a job of `sbatch_args`, kills node1
/// mid-interval, and checks that the requeued run restores the last one on
/// node2 and ends right, in each of `files`.
fn node_dies_mid_job(sbatch_args: &[&str], line: &str, checkpoint: &str, files: &[&str]) {
    let c = cluster();
    let _site = PlugstackOverride::new(c, site_allows_short_intervals);
    let args = [&["-w", "node1"], sbatch_args].concat();
    let job = c.submit_workload_job(&args, &[ASK, line], 64, 300);
    let manifest = c.shared.join(format!("checkpoints/{}/{checkpoint}/manifest.toml", job.id));
    // Two periodic checkpoints, the second replacing the first.
    let deadline = Instant::now() + MINUTE;
    let first = loop {
        if let Some(t) = checkpoint_created(&manifest) {
            break t;
        }
        assert!(Instant::now() < deadline, "no periodic checkpoint within a minute; job output:\n{}", job.output());
        std::thread::sleep(Duration::from_millis(200));
    };
    while checkpoint_created(&manifest).is_none_or(|t| t == first) {
        assert!(Instant::now() < deadline, "no second periodic checkpoint; job output:\n{}", job.output());
        std::thread::sleep(Duration::from_millis(200));
    }
    let path = format!("/shared/checkpoints/{}/{checkpoint}", job.id);
    let verified = c.exec("node2", "root", &[HELPER, "inspect", "--verify", &path]).ok().stdout;
    assert!(verified.contains(&format!("job_id = {}", job.id)), "{verified}");
    // Mid-interval, so the work since the last checkpoint is lost with the node.
    std::thread::sleep(Duration::from_millis(INTERVAL * 1000 / 2));

    let crashed = c.crash("node1");
    let done_before = counters(&job, files[0]).last().copied().unwrap_or(0);
    assert!(done_before < 250, "the crash came too late to test anything: {done_before} steps done");
    // Slurm notices (SlurmdTimeout) and requeues the batch job.
    c.wait_state(job.id, &["PENDING"], 3 * MINUTE);
    c.release(job.id, Some("node2"));
    assert_eq!(c.wait_job(job.id, 2 * MINUTE), "COMPLETED", "{}", job.output());
    drop(crashed);

    let out = job.output();
    assert!(out.contains("run restart=1 on node2"), "{out}");
    assert!(out.contains("checkpointed every 4 s and if the job is preempted or requeued"), "{out}");
    assert_eq!(out.matches("checkpoint-container: restored process").count(), 1, "{out}");
    // Every step up to the crash, then again from the last checkpoint, on to
    // the uninterrupted run's end.
    for file in files {
        let seen = counters(&job, file);
        let resumed_at = seen.windows(2).position(|w| w[1] != w[0] + 1).map(|i| i + 1).expect("the run went on from a checkpoint");
        let (before, after) = seen.split_at(resumed_at);
        assert_eq!(before, (1..=before.len() as u64).collect::<Vec<_>>(), "{file} before the crash");
        let from = after[0];
        assert!(from > 1, "{file} restored, not started over: {seen:?}");
        assert_eq!(after, (from..=job.steps as u64).collect::<Vec<_>>(), "{file} after the restore");
        let redone = before.len() as u64 + 1 - from;
        // One interval, and the second the checkpoint itself may take.
        assert!(redone <= (INTERVAL + 1) * STEPS_PER_SECOND, "{file}: {redone} steps redone, more than one interval");
        assert_eq!(job.lines(file).last().unwrap(), &job.expected_done());
    }
    job.assert_no_checkpoints_left(c, "node2");
    job.cleanup(c);
}

/// A periodic checkpoint that fails (here: the program holds more node-local
/// files than the site lets a checkpoint carry) is one line in the job's
/// output each time, and the job goes on to its uninterrupted result.
#[test]
fn a_failed_periodic_checkpoint_is_one_line_and_the_job_goes_on() {
    let c = cluster();
    let _site = PlugstackOverride::new(c, |line| with_arg(&site_allows_short_intervals(line), "node_local_files_max", "4KiB"));
    let srun = "srun apptainer -s exec --bind /opt/checkpoint-container --bind {DIR}:/data {SIF} bash -c \
                'f=/dev/shm/held-$$; head -c 65536 /dev/urandom > $f && exec 7<$f && \
                 {WL} --mem-mib 64 --steps 100 --interval-ms 100 --out /data/out.txt; rc=$?; rm -f $f; exit $rc'";
    let job = c.submit_job(&["-w", "node1"], None, |dir| {
        let srun = srun.replace("{DIR}", dir).replace("{SIF}", cluster_tests::TEST_SIF).replace("{WL}", cluster_tests::WORKLOAD);
        (format!("{ASK}\n{srun}"), 64, 100)
    });
    assert_eq!(c.wait_job(job.id, 2 * MINUTE), "COMPLETED", "{}", job.output());
    let out = job.output();
    let failed = format!("checkpoint-container: periodic checkpoint of task 0 of step {}.0 failed: ", job.id);
    assert!(out.matches(&failed).count() >= 1, "{out}");
    for line in out.lines().filter(|l| l.starts_with(&failed)) {
        assert!(line.ends_with("; it goes on, and it has no checkpoint yet"), "{line}");
    }
    job.assert_continued("out.txt");
    job.cleanup(c);
}

/// A step of several tasks is left to the requeue path (its cut needs every
/// task stopped at one barrier), and says so once.
#[test]
fn a_step_of_several_tasks_says_it_takes_no_periodic_checkpoints() {
    let c = cluster();
    let _site = PlugstackOverride::new(c, site_allows_short_intervals);
    let out = c
        .sh(
            "node1",
            "alice",
            &format!("{ASK} && srun -w node1 -n2 --checkpoint-container apptainer -s exec {} true", cluster_tests::TEST_SIF),
        )
        .ok();
    let line = "runs 2 tasks: it is checkpointed when the job is preempted or requeued, not every 4 s";
    assert_eq!(out.stderr.matches(line).count(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("are checkpointed if the job is preempted or requeued"), "{}", out.stderr);
}
