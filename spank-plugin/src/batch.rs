//! Remote context: the end of a task, in slurmstepd (root), between the
//! task's exit and Slurm's SIGKILL of what it leaves; mostly the end of
//! the batch script.
//!
//! When Slurm requeues or preempts a job, the script's shell dies of the
//! SIGTERM at once, and its slurmstepd then SIGKILLs everything the script
//! started, `srun` included. But `srun` is what writes a step's output into
//! the job's output file: what the protected program printed just before
//! its checkpoint would be lost, and the restored program goes on after it
//! (measured: the last 30-50 ms of output, every time, for a program
//! printing every few milliseconds). So while a protected step of this job
//! is being checkpointed on this node, the batch step waits for it to end
//! and for the script's `srun`s to deliver its output, within bounds.
//!
//! Every agent (`checkpoint-container agent`, root) holds a lock on its
//! session file in the root-owned socket directory for as long as it serves
//! its task, and says so in it once its task got SIGTERM
//! (`ckpt_config::agent_files`). Only root writes there; this only reads.

use crate::log_info;
use ckpt_config::agent_files::{agents, Agent};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long the steps' tasks may take to get their SIGTERM after the
/// script's: slurmd signals all steps of the job at once.
const NOTICE: Duration = Duration::from_secs(2);
/// The most this ever waits. Past KillWait (30 s by default) slurmd has
/// SIGKILLed the script's processes, srun too, and there is no output left
/// to save; slurmstepd drains the node if its step outlives KillWait by
/// UnkillableStepTimeout (60 s at least).
pub(crate) const WAIT_LIMIT: Duration = Duration::from_secs(45);
/// How long the script's remaining processes get to deliver the steps'
/// last output once the steps are over (srun needs milliseconds; a process
/// the script left in the background only delays the end this long).
const OUTPUT_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);

/// Whether any process is still in process group `pgid`.
fn group_alive(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else { return false };
    entries.flatten().filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))).any(|e| {
        // pgrp is the third field after the ")" that ends the name.
        std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(2)?.parse::<i32>().ok()))
            == Some(pgid)
    })
}

/// How a wait for agents ended.
#[derive(PartialEq)]
enum Waited {
    /// None was there.
    NoAgents,
    /// Each ended.
    AgentsDone,
    /// `go_on` said stop, none said it is ending within the notice, or
    /// the deadline passed.
    Cut,
}

/// Waits while agents whose session files start with `prefix` serve their
/// tasks, as long as one of them says it is ending (or `notice` has not yet
/// passed), `go_on` holds and `deadline` has not passed.
fn while_agents_end(dir: &Path, prefix: &str, notice: Duration, deadline: Instant, go_on: impl Fn() -> bool) -> Waited {
    let started = Instant::now();
    let mut waited = Waited::NoAgents;
    loop {
        let now = agents(dir, prefix);
        if now.is_empty() {
            return waited;
        }
        waited = Waited::AgentsDone;
        let ending = now.contains(&Agent::Ending);
        if (!ending && started.elapsed() > notice) || !go_on() || Instant::now() > deadline {
            return Waited::Cut;
        }
        std::thread::sleep(POLL);
    }
}

/// After the batch script of `job` (process group `pgid`) ended: waits
/// while a protected step of the job on this node is ending and the
/// script's processes (its `srun`s) live to deliver its output, then for
/// them to deliver it. Returns at once for a job with no protected task
/// here; after [`NOTICE`] when none of its steps is being ended (a script
/// that ended on its own leaves its steps to Slurm); at once when no
/// process of the script is left to deliver output.
pub fn after_script(dir: &Path, job: u32, pgid: i32) {
    let started = Instant::now();
    let deadline = started + WAIT_LIMIT;
    if while_agents_end(dir, &format!("{job}."), NOTICE, deadline, || group_alive(pgid)) != Waited::AgentsDone {
        return;
    }
    let steps_over = Instant::now();
    while group_alive(pgid) && steps_over.elapsed() < OUTPUT_GRACE && Instant::now() < deadline {
        std::thread::sleep(POLL);
    }
    log_info(&format!(
        "job {job}: the batch script's end waited {:.2} s for its protected steps' checkpoints and output",
        started.elapsed().as_secs_f64()
    ));
}

/// How long a task's agent may take to say it is ending once the task has
/// ended (it watches the task's pidfd, and looks every 100 ms).
const AGENT_NOTICE: Duration = Duration::from_millis(500);

/// After task `task` of step `job.step` (not the batch script), a script
/// whose agent serves the containers its processes start, ended: waits
/// while that agent is checkpointing or ending them, which slurmstepd would
/// otherwise SIGKILL as soon as this returns; until `deadline` at most,
/// which all the step's tasks on this node share.
pub fn after_task(dir: &Path, job: u32, step: u32, task: u32, deadline: Instant) {
    let started = Instant::now();
    while_agents_end(dir, &format!("{job}.{step}.{task}."), AGENT_NOTICE, deadline, || true);
    if started.elapsed() > AGENT_NOTICE {
        log_info(&format!(
            "task {task} of step {job}.{step}: its end waited {:.2} s for its containers' checkpoints",
            started.elapsed().as_secs_f64()
        ));
    }
}
