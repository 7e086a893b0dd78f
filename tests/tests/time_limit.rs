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
    job.assert_no_checkpoints_left(c, "node1");
}

/// Lets the job start again at once whenever it is requeued, until it
/// ends; returns its final state.
fn run_to_the_end(c: &cluster_tests::Cluster, job: &BatchJob) -> String {
    let deadline = std::time::Instant::now() + 6 * MINUTE;
    loop {
        let state = c.job_field(job.id, "JobState").unwrap_or_default();
        match state.as_str() {
            // Not `release`, which insists on PENDING for a while: the
            // state read a moment ago may be gone already.
            "PENDING" => {
                let _ = c.exec("ctl", "root", &["scontrol", "update", &format!("jobid={}", job.id), "StartTime=now"]);
            }
            "COMPLETED" | "FAILED" | "CANCELLED" | "TIMEOUT" | "NODE_FAIL" | "OUT_OF_MEMORY" => return state,
            _ => {}
        }
        assert!(std::time::Instant::now() < deadline, "job {} still {state}: {}", job.id, job.output());
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Work that outlasts a minute under a 2-minute limit, in two steps: each
/// run is requeued a minute in, once (both steps watch), and the next goes
/// on from where the last was checkpointed, until both steps finish.
#[test]
fn a_job_checkpointed_before_its_time_limit_completes_on_a_later_run() {
    let c = cluster();
    let args: Vec<&str> = TIME_LIMITED.iter().copied().chain(["-n2"]).collect();
    // The pause keeps each step's id on each run (a restore matches both).
    let two_steps = ["srun --overlap -n1 {W} --out /data/a.txt &", "sleep 2", "srun --overlap -n1 {W} --out /data/b.txt &", "wait"];
    let job = c.submit_workload_job(&args, &two_steps, 64, 900);
    job.wait_lines("b.txt", 5);
    let saved = requeued(c, &job, "a.txt");
    assert!(saved < 900, "requeued mid-run: {saved} lines");
    let out = job.output();
    for step in [0, 1] {
        let armed = format!("checkpoint-container: step {}.{step}: checkpoint and requeue at ", job.id);
        assert!(out.contains(&armed), "{out}");
    }
    assert_eq!(out.matches(", 1 min before the time limit (restart 1 of at most 5)").count(), 2, "{out}");
    let requeued_at = out.find("requeued the job 1 min before its time limit; its protected steps are checkpointed now").expect(&out);
    let checkpointed_at = out.find("checkpoint-container: checkpointed task 0 of step").expect(&out);
    assert!(requeued_at < checkpointed_at, "{out}");
    assert_eq!(run_to_the_end(c, &job), "COMPLETED", "{}", job.output());
    let restarts: usize = c.job_field(job.id, "Restarts").unwrap().parse().unwrap();
    let out = job.output();
    // One requeue per run, though two steps watched.
    assert_eq!(out.matches("requeued the job 1 min before its time limit").count(), restarts, "{out}");
    assert_eq!(out.matches("checkpoint-container: checkpointed task 0 of step").count(), 2 * restarts, "{out}");
    assert_eq!(out.matches("checkpoint-container: restored process").count(), 2 * restarts, "{out}");
    // The next run is watched again.
    assert_eq!(out.matches("(restart 2 of at most 5)").count(), 2, "{out}");
    job.assert_continued("a.txt");
    job.assert_continued("b.txt");
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
