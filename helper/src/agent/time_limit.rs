//! Checkpoint before the time limit: when the job asked
//! (`--checkpoint-before-time-limit=MINUTES`) or the site does
//! (`checkpoint_before_time_limit`), the job is requeued that many minutes
//! before its time limit, and the requeue path checkpoints every protected
//! step and restores them on the next run, as for any `scontrol requeue`.
//!
//! - Task 0 of each protected step watches: slurmctld's `TimeLimit` minus
//!   `RunTime`, two durations, so no clock or time zone is compared across
//!   hosts, and a suspended job's clock stops as Slurm's does. It asks again
//!   at least every few minutes (an admin may change the limit).
//! - The requeue is `scontrol requeue JOB` run as the job's user: what she
//!   could run herself, so root lends it no right (a job Slurm may not
//!   requeue, `--no-requeue` or `JobRequeue=0`, is refused as it would be
//!   for her; such a job is not watched, and one line says why).
//! - One requeue per run, however many steps watch: slurmctld requeues a
//!   running job once, and a second `scontrol requeue` finds it completing
//!   or pending and fails without counting a restart (measured, Slurm
//!   26.05: "Job is pending execution"); the step that lost sees the job's
//!   `Restarts` moved and says nothing.
//! - Never forever: a job slurmctld has requeued `time_limit_max_restarts`
//!   times (its `Restarts`, every cause: the count slurmctld keeps with the
//!   job, which `MaxBatchRequeue` holds jobs by) is not requeued again; it
//!   runs into its time limit, and one line says so.

use super::messages::tell_user;
use super::slurmctld::job_info;
use super::*;
use crate::launch::SYSTEM_PATH;
use crate::user::User;
use ckpt_config::Settings;
use std::collections::HashMap;
use std::fs::File;
use std::process::Stdio;
use std::time::{Duration, SystemTime};

/// How long the watch sleeps at most before asking slurmctld again.
const RECHECK: Duration = Duration::from_secs(300);

/// Starts watching the job's time limit for the task's step, if the job or
/// the site asked for it; only task 0 of a step watches.
pub(super) fn watch(settings: &Settings, t: &Task, user: &User, stderr: &File) {
    let lead = t.before_time_limit.unwrap_or(settings.checkpoint_before_time_limit);
    if lead == 0 || t.task_id != 0 {
        return;
    }
    let Ok(mut stderr) = stderr.try_clone() else { return };
    let (t, user, max) = (t.clone(), user.clone(), settings.time_limit_max_restarts);
    std::thread::spawn(move || run(&t, &user, lead, max, &mut stderr));
}

#[derive(Debug, PartialEq)]
enum Plan {
    /// Requeue in this long; the job's restarts so far.
    At(Duration, u32),
    /// Not watched, and why.
    Not(String),
    /// Not requeued again: the job was requeued as often as the site allows.
    Spent(String),
}

/// What to do for a job, from its `scontrol show job` fields.
fn plan(info: &HashMap<String, String>, lead_minutes: u32, max_restarts: u32) -> Plan {
    let field = |k: &str| info.get(k).map(String::as_str).unwrap_or("");
    if field("BatchFlag") != "1" {
        return Plan::Not("only batch jobs can be requeued".into());
    }
    if field("Requeue") != "1" {
        return Plan::Not("the job may not be requeued (sbatch --no-requeue, or the site's JobRequeue=0 without --requeue)".into());
    }
    let Some(limit) = slurm_duration(field("TimeLimit")) else {
        return Plan::Not("the job has no time limit".into());
    };
    let lead = Duration::from_secs(u64::from(lead_minutes) * 60);
    if limit <= lead {
        return Plan::Not(format!("its time limit ({} min) is not longer than the {lead_minutes} min asked for", limit.as_secs() / 60));
    }
    let Some(restarts) = field("Restarts").parse::<u32>().ok() else {
        return Plan::Not("slurmctld did not say how often the job was requeued".into());
    };
    if restarts >= max_restarts {
        let times = if restarts == 1 { "once".to_string() } else { format!("{restarts} times") };
        return Plan::Spent(format!(
            "the job was requeued {times}, the most the site allows (time_limit_max_restarts={max_restarts}); \
             this run ends at its time limit"
        ));
    }
    let Some(ran) = slurm_duration(field("RunTime")) else {
        return Plan::Not("slurmctld did not say how long the job has run".into());
    };
    Plan::At(limit.saturating_sub(lead).saturating_sub(ran), restarts)
}

/// A duration as `scontrol` prints one: `[D-]HH:MM:SS` or `MM:SS`; None
/// for `UNLIMITED`, `Partition_Limit` and anything else.
fn slurm_duration(text: &str) -> Option<Duration> {
    let (days, clock) = match text.split_once('-') {
        Some((d, c)) => (d.parse::<u64>().ok()?, c),
        None => (0, text),
    };
    let parts = clock.split(':').map(|p| p.parse::<u64>().ok()).collect::<Option<Vec<_>>>()?;
    let secs = match parts[..] {
        [h, m, s] => h * 3600 + m * 60 + s,
        [m, s] => m * 60 + s,
        _ => return None,
    };
    Some(Duration::from_secs(days * 86400 + secs))
}

/// The node's wall-clock time `after` from now, as `HH:MM`.
fn clock_in(after: Duration) -> String {
    let at = (SystemTime::now() + after).duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    match crate::sys::local_hour_minute(at as i64) {
        Some((hour, minute)) => format!("{hour:02}:{minute:02}"),
        None => "?".into(),
    }
}

fn restarts(info: &HashMap<String, String>) -> Option<u32> {
    info.get("Restarts").and_then(|r| r.parse().ok())
}

fn not_watched(t: &Task, stderr: &mut File, step: &str, why: &str, tell: bool) {
    let msg = format!("{step} is not checkpointed before the time limit: {why}");
    log::info!("{}: {msg}", t.name());
    if tell {
        tell_user(stderr, &msg);
    }
}

fn run(t: &Task, user: &User, lead: u32, max: u32, stderr: &mut File) {
    let step = format!("step {}.{}", t.job_id, t.step_id);
    let (mut wait, armed) = match plan(&job_info(t), lead, max) {
        Plan::At(wait, restarts) => (wait, restarts),
        // A job that did not ask (the site's default) hears why only when
        // its requeues are spent: the rest (no or a short time limit,
        // --no-requeue, not a batch job) it chose itself.
        Plan::Spent(why) => return not_watched(t, stderr, &step, &why, true),
        Plan::Not(why) => return not_watched(t, stderr, &step, &why, t.before_time_limit.is_some()),
    };
    let msg = format!(
        "{step}: checkpoint and requeue at {}, {lead} min before the time limit (restart {} of at most {max})",
        clock_in(wait),
        armed + 1
    );
    log::info!("{}: {msg}", t.name());
    tell_user(stderr, &msg);
    loop {
        std::thread::sleep(wait.min(RECHECK));
        let info = job_info(t);
        if restarts(&info) != Some(armed) {
            return; // Requeued already (preempted, or by another step).
        }
        match info.get("JobState").map(String::as_str) {
            Some("RUNNING") => {}
            Some("SUSPENDED") => {
                wait = RECHECK;
                continue;
            }
            _ => return,
        }
        match plan(&info, lead, max) {
            Plan::At(w, _) if !w.is_zero() => wait = w,
            Plan::At(..) => break,
            Plan::Not(why) | Plan::Spent(why) => {
                log::info!("{}: no longer requeued before the time limit: {why}", t.name());
                return;
            }
        }
    }
    let out = user
        .command("scontrol")
        .args(["requeue", &t.job_id.to_string()])
        .env("PATH", SYSTEM_PATH)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output();
    let why = match out {
        Ok(o) if o.status.success() => {
            let msg = format!("{step}: requeued the job {lead} min before its time limit; its protected steps are checkpointed now");
            log::info!("{}: {msg}", t.name());
            tell_user(stderr, &msg);
            return;
        }
        Ok(o) => String::from_utf8_lossy(&o.stderr).lines().next().unwrap_or("").chars().take(200).collect(),
        Err(e) => format!("cannot run scontrol: {e}"),
    };
    if restarts(&job_info(t)) != Some(armed) {
        log::info!("{}: the job was requeued by another step first ({why})", t.name());
        return;
    }
    let msg = format!("{step}: the job could not be requeued before its time limit ({why}); this run ends at its time limit");
    log::warn!("{}: {msg}", t.name());
    tell_user(stderr, &msg);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::slurmctld::job_fields;

    const RUNNING: &str = "JobId=7 JobName=job.sh UserId=alice(2001) JobState=RUNNING Reason=None Requeue=1 Restarts=0 \
                           BatchFlag=1 RunTime=00:00:20 TimeLimit=00:02:00 TimeMin=N/A";

    fn with(changes: &[(&str, &str)]) -> HashMap<String, String> {
        let mut info = job_fields(RUNNING, 7);
        for (k, v) in changes {
            info.insert(k.to_string(), v.to_string());
        }
        info
    }

    #[test]
    fn requeue_comes_lead_minutes_before_the_limit_counted_in_run_time() {
        assert_eq!(plan(&with(&[]), 1, 5), Plan::At(Duration::from_secs(40), 0));
        assert_eq!(plan(&with(&[("RunTime", "00:01:30"), ("Restarts", "2")]), 1, 5), Plan::At(Duration::ZERO, 2));
        let day = with(&[("TimeLimit", "1-00:00:00"), ("RunTime", "10:00")]);
        assert_eq!(plan(&day, 10, 5), Plan::At(Duration::from_secs(86400 - 600 - 600), 0));
    }

    #[test]
    fn jobs_that_cannot_or_must_not_be_requeued_are_not_watched() {
        let why = |changes: &[(&str, &str)]| match plan(&with(changes), 1, 2) {
            Plan::Not(why) | Plan::Spent(why) => why,
            other => panic!("{other:?}"),
        };
        assert!(why(&[("Requeue", "0")]).contains("--no-requeue"));
        assert!(why(&[("BatchFlag", "0")]).contains("only batch jobs"));
        assert!(why(&[("TimeLimit", "UNLIMITED")]).contains("no time limit"));
        assert!(why(&[("TimeLimit", "Partition_Limit")]).contains("no time limit"));
        assert!(why(&[("TimeLimit", "00:01:00")]).contains("not longer than the 1 min"));
        assert!(why(&[("Restarts", "3")]).contains("requeued 3 times, the most the site allows (time_limit_max_restarts=2)"));
        assert!(matches!(plan(&with(&[("Restarts", "2")]), 1, 2), Plan::Spent(_)));
        assert!(why(&[("Restarts", "x")]).contains("how often"));
    }

    #[test]
    fn slurm_durations() {
        assert_eq!(slurm_duration("00:02:00"), Some(Duration::from_secs(120)));
        assert_eq!(slurm_duration("2-03:04:05"), Some(Duration::from_secs(2 * 86400 + 3 * 3600 + 4 * 60 + 5)));
        assert_eq!(slurm_duration("05:06"), Some(Duration::from_secs(306)));
        for bad in ["UNLIMITED", "Partition_Limit", "", "1:2:3:4", "a-00:00:00", "-1"] {
            assert_eq!(slurm_duration(bad), None, "{bad}");
        }
    }
}
