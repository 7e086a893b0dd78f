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

/// After the batch script of `job` (process group `pgid`) ended: waits
/// while a protected step of the job on this node is ending and the
/// script's processes (its `srun`s) live to deliver its output, then for
/// them to deliver it. Returns at once for a job with no protected task
/// here; after [`NOTICE`] when none of its steps is being ended.
pub fn after_script(dir: &Path, job: u32, pgid: i32) {
    let started = Instant::now();
    let mut saw_agents = false;
    loop {
        let now = agents(dir, &format!("{job}."));
        if now.is_empty() {
            break;
        }
        saw_agents = true;
        let ending = now.contains(&Agent::Ending);
        // A script that ended on its own leaves its steps to Slurm; with no
        // srun left, there is no output to wait for.
        if (!ending && started.elapsed() > NOTICE) || !group_alive(pgid) || started.elapsed() > WAIT_LIMIT {
            return;
        }
        std::thread::sleep(POLL);
    }
    if !saw_agents {
        return;
    }
    let steps_over = Instant::now();
    while group_alive(pgid) && steps_over.elapsed() < OUTPUT_GRACE && started.elapsed() < WAIT_LIMIT {
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
    let prefix = format!("{job}.{step}.{task}.");
    loop {
        let now = agents(dir, &prefix);
        let ending = now.contains(&Agent::Ending);
        if now.is_empty() || (!ending && started.elapsed() > AGENT_NOTICE) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(POLL);
    }
    if started.elapsed() > AGENT_NOTICE {
        log_info(&format!(
            "task {task} of step {job}.{step}: its end waited {:.2} s for its containers' checkpoints",
            started.elapsed().as_secs_f64()
        ));
    }
}
