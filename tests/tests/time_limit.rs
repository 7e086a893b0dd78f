//! Checkpoint before the time limit (`--checkpoint-before-time-limit`):
//! the job is requeued that many minutes before its limit, its containers
//! are checkpointed, and the next run restores them; a job requeued as
//! often as the site allows runs into its limit and says so.

use cluster_tests::{cluster, BatchJob, PlugstackOverride};
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);
const ONE_STEP: &[&str] = &["srun {W} --out /data/out.txt"];
/// A 2-minute limit, requeued 1 minute before it.
const TIME_LIMITED: &[&str] = &["-w", "node1", "--time=2", "--checkpoint-before-time-limit=1"];

/// Waits until the job, which has started, is pending again (requeued);
/// returns the lines `file` had then.
fn requeued(c: &cluster_tests::Cluster, job: &BatchJob, file: &str) -> usize {
    job.wait_lines(file, 5);
    c.wait_state(job.id, &["PENDING"], 2 * MINUTE);
    job.lines(file).len()
}

fn no_checkpoint_left(c: &cluster_tests::Cluster, job: &BatchJob) {
    let left = c.exec("node1", "root", &["ls", "-A", "/shared/checkpoints"]).ok().stdout;
    assert!(!left.split_whitespace().any(|d| d == job.id.to_string()), "checkpoints left: {left}");
}

/// 90 s of work under a 2-minute limit: the first run is requeued a minute
/// in, and the second finishes from where the first was checkpointed.
#[test]
fn a_job_checkpointed_before_its_time_limit_completes_on_its_next_run() {
    let c = cluster();
    let job = c.submit_workload_job(TIME_LIMITED, ONE_STEP, 64, 900);
    let saved = requeued(c, &job, "out.txt");
    assert!(saved < 900, "requeued mid-run: {saved} lines");
    let step = format!("checkpoint-container: step {}.0", job.id);
    let out = job.output();
    assert!(out.contains(&format!("{step}: checkpoint and requeue at ")), "{out}");
    assert!(out.contains(", 1 min before the time limit (restart 1 of at most 5)"), "{out}");
    let requeued_at = out.find(&format!("{step}: requeued the job 1 min before its time limit")).expect(&out);
    let checkpointed_at = out.find("checkpoint-container: checkpointed task 0 of step").expect(&out);
    assert!(requeued_at < checkpointed_at, "{out}");
    c.release(job.id, None);
    assert_eq!(c.wait_job(job.id, 2 * MINUTE), "COMPLETED", "{}", job.output());
    assert_eq!(c.job_field(job.id, "Restarts").as_deref(), Some("1"));
    let out = job.output();
    assert_eq!(out.matches("checkpoint-container: restored process").count(), 1, "{out}");
    // The next run is watched again, and ends before its time comes.
    assert!(out.contains("(restart 2 of at most 5)"), "{out}");
    assert_eq!(out.matches("requeued the job 1 min before its time limit").count(), 1, "{out}");
    job.assert_continued("out.txt");
    no_checkpoint_left(c, &job);
    job.cleanup(c);
}

/// With `time_limit_max_restarts=1`, the run after the first time-limit
/// requeue is not requeued again: one line says so, and the job ends at its
/// time limit, its restored program having gone on until then.
#[test]
fn a_job_requeued_as_often_as_the_site_allows_runs_into_its_time_limit_and_says_so() {
    let c = cluster();
    let _site = PlugstackOverride::new(c, |line| format!("{line} time_limit_max_restarts=1"));
    let job = c.submit_workload_job(TIME_LIMITED, ONE_STEP, 64, 3000);
    requeued(c, &job, "out.txt");
    c.release(job.id, None);
    assert_eq!(c.wait_job(job.id, 4 * MINUTE), "TIMEOUT", "{}", job.output());
    assert_eq!(c.job_field(job.id, "Restarts").as_deref(), Some("1"));
    let out = job.output();
    assert_eq!(out.matches("requeued the job 1 min before its time limit").count(), 1, "{out}");
    assert_eq!(out.matches("checkpoint-container: restored process").count(), 1, "{out}");
    let last = format!(
        "checkpoint-container: step {}.0 is not checkpointed before the time limit: the job was requeued once, \
         the most the site allows (time_limit_max_restarts=1); this run ends at its time limit",
        job.id
    );
    assert_eq!(out.matches(&last).count(), 1, "{out}");
    // Continued, not started over, until the limit stopped it.
    let lines = job.lines("out.txt");
    for (i, line) in lines.iter().enumerate() {
        assert!(line.starts_with(&format!("counter={} ", i + 1)), "line {}: {line}", i + 1);
    }
    no_checkpoint_left(c, &job);
    job.cleanup(c);
}

/// A job Slurm may not requeue is not watched, and says why; values srun
/// and sbatch cannot honour are refused before anything is submitted.
#[test]
fn a_job_that_may_not_be_requeued_says_so_and_bad_values_are_refused() {
    let c = cluster();
    let job = c.submit_workload_job(&["-w", "node2", "--time=5", "--no-requeue", "--checkpoint-before-time-limit=1"], ONE_STEP, 64, 600);
    job.wait_lines("out.txt", 5);
    let why = format!(
        "checkpoint-container: step {}.0 is not checkpointed before the time limit: the job may not be requeued (sbatch --no-requeue",
        job.id
    );
    let deadline = std::time::Instant::now() + MINUTE;
    while !job.output().contains(&why) {
        assert!(std::time::Instant::now() < deadline, "{}", job.output());
        std::thread::sleep(Duration::from_millis(300));
    }
    job.cleanup(c);
    for (args, says) in [
        ("--checkpoint-before-time-limit=1", "--checkpoint-before-time-limit applies to protected containers: add --checkpoint-container"),
        (
            "--checkpoint-container --checkpoint-before-time-limit=soon",
            "--checkpoint-before-time-limit=soon is invalid: expected a whole number",
        ),
        ("--checkpoint-container --checkpoint-before-time-limit=-5", "--checkpoint-before-time-limit=-5 is invalid"),
    ] {
        let out = c.sh("node1", "alice", &format!("sbatch {args} --wrap true")).failed();
        assert!(out.stderr.contains(says), "{args}: {out:#?}");
        let out = c.sh("node1", "alice", &format!("srun {args} true")).failed();
        assert!(out.stderr.contains(says), "{args}: {out:#?}");
    }
}
