//! What slurmctld says of the task's job: requeue or preemption (a
//! SIGTERM that is not a scancel), and whether the job is over for good.

use super::*;
use crate::launch::SYSTEM_PATH;
use std::process::Command;
use std::time::{Duration, Instant};

/// What `scontrol show job` says of a job, stdout and stderr together
/// (empty when scontrol cannot be run).
pub(super) fn show_job(job: u32) -> String {
    let out = Command::new("scontrol").args(["-o", "show", "job", &job.to_string()]).env_clear().env("PATH", SYSTEM_PATH).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)).unwrap_or_default()
}

/// The `key=value` fields of job `job` in `scontrol -o show job` output:
/// its own line only (an array's or a heterogeneous job's id prints one
/// line per job of it), or nothing if it has not exactly one. Values the
/// user wrote (the job's name, comment, command, paths) may hold spaces and
/// `Key=` text of their own, so a key seen twice is not believed either
/// way and left out: such a job is taken for one that is not being
/// requeued (its own loss: it starts over).
pub(super) fn job_fields(text: &str, job: u32) -> std::collections::HashMap<String, String> {
    let own = format!("JobId={job}");
    let mut lines = text.lines().filter(|l| l.split_whitespace().next() == Some(own.as_str()));
    let (Some(line), None) = (lines.next(), lines.next()) else { return Default::default() };
    let mut fields = std::collections::HashMap::new();
    let mut doubtful = std::collections::HashSet::new();
    for (k, v) in line.split_whitespace().filter_map(|kv| kv.split_once('=')) {
        if fields.insert(k.to_string(), v.to_string()).is_some() {
            doubtful.insert(k.to_string());
        }
    }
    fields.retain(|k, _| !doubtful.contains(k));
    fields
}

/// Whether slurmctld says the job will not run again.
pub(super) fn job_is_over(job: u32) -> bool {
    let text = show_job(job);
    if text.contains("Invalid job id") {
        return true;
    }
    let fields = job_fields(&text, job);
    let state = fields.get("JobState").map(String::as_str).unwrap_or("");
    matches!(state, "COMPLETED" | "CANCELLED" | "FAILED" | "TIMEOUT" | "OUT_OF_MEMORY" | "DEADLINE" | "BOOT_FAIL" | "NODE_FAIL")
}

/// `scontrol show job` fields of the task's job.
pub(super) fn job_info(t: &Task) -> std::collections::HashMap<String, String> {
    job_fields(&show_job(t.job_id), t.job_id)
}

/// Whether the job is being requeued. `scontrol requeue` counts the restart
/// before the task gets its SIGTERM; a preemption marks the job with a
/// PreemptTime first and requeues it (if it may be requeued) when the grace
/// time is over. scancel does neither.
pub(super) fn is_requeue(t: &Task, info: &std::collections::HashMap<String, String>) -> bool {
    let restarted = info.get("Restarts").and_then(|v| v.parse::<u32>().ok()).is_some_and(|r| r > t.restart_count);
    let preempted = info.get("PreemptTime").is_some_and(|v| !matches!(v.as_str(), "None" | "Unknown" | ""))
        && info.get("Requeue").map(String::as_str) == Some("1");
    restarted || preempted
}

/// The job's fields once a SIGTERM arrived. When srun forwards the SIGTERM
/// of a preemption, the task can get it before slurmctld has counted the
/// requeue: ask again for a few seconds before taking it for a scancel.
pub(super) fn requeue_info(t: &Task) -> std::collections::HashMap<String, String> {
    const SETTLE: Duration = Duration::from_secs(5);
    let deadline = Instant::now() + SETTLE;
    loop {
        let info = job_info(t);
        if is_requeue(t, &info) || Instant::now() > deadline {
            return info;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use super::job_fields;

    #[test]
    fn a_key_the_user_repeats_in_her_text_is_not_believed() {
        let f = job_fields("JobId=7 JobName=x Restarts=9 UserId=alice(2001) Requeue=1 Restarts=0 BatchFlag=1 Comment=a Restarts=5", 7);
        assert_eq!(f.get("Restarts"), None);
        assert_eq!(f.get("Requeue").map(String::as_str), Some("1"));
        assert_eq!(f.get("JobId").map(String::as_str), Some("7"));
    }

    #[test]
    fn only_the_jobs_own_line_counts() {
        let text = "JobId=7 ArrayJobId=5 Restarts=2\nJobId=5 ArrayJobId=5 Restarts=0\n";
        assert_eq!(job_fields(text, 5).get("Restarts").map(String::as_str), Some("0"));
        assert_eq!(job_fields(text, 7).get("Restarts").map(String::as_str), Some("2"));
        assert!(job_fields(text, 70).is_empty());
        assert!(job_fields("JobId=5 Restarts=1\nJobId=5 Restarts=0\n", 5).is_empty());
    }
}
