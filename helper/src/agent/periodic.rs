//! Periodic checkpoints: while the job runs, its container is checkpointed
//! every interval and left running, so a node that dies takes at most one
//! interval of work with it (the requeued run restores the last one, as
//! after a requeue). Each replaces the previous one atomically in
//! checkpoint_dir (storage.rs); a failed one leaves it in place.
//!
//! Steps of several tasks, each in a container of its own, are left to the
//! requeue path: a periodic cut would need every task stopped at one
//! barrier while the job runs. The ranks of an `srun --mpi=pmi2` step in one
//! container (ranks.rs) are one tree, checkpointed as one task's.

use super::layout::list_checkpoint;
use super::messages::tell_user;
use super::requeue::{checkpoint_request, go_on, StartedAs};
use super::session::Event;
use super::spawn::Running;
use super::*;
use crate::checkpoint::dump_frozen;
use crate::step;
use ckpt_config::Settings;
use std::fs::File;
use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

/// Ticks the agent's event loop every interval, counted from the end of the
/// previous checkpoint (a slow one never queues the next behind it).
pub(super) struct Timer {
    done: mpsc::Sender<()>,
}

impl Timer {
    /// The timer for this task, if it takes periodic checkpoints; says why
    /// not when the job asked for them in vain.
    pub(super) fn start(settings: &Settings, t: &Task, events: mpsc::Sender<Event>, stderr: &mut File) -> Option<Timer> {
        let asked = settings.checkpoint_interval_for(t.interval_request);
        if asked > 0 && t.cut_across_agents() && t.task_id == 0 {
            tell_user(
                stderr,
                &format!(
                    "step {}.{} runs {} tasks: it is checkpointed when the job is preempted or requeued, not every {asked} s",
                    t.job_id, t.step_id, t.step_tasks
                ),
            );
        }
        let seconds = interval(settings, t)?;
        let interval = Duration::from_secs(seconds);
        let (done, next) = mpsc::channel();
        std::thread::spawn(move || loop {
            std::thread::sleep(interval);
            if events.send(Event::Periodic).is_err() || next.recv().is_err() {
                break;
            }
        });
        log::info!("{}: checkpointed every {seconds} s", t.name());
        Some(Timer { done })
    }

    /// "every N s and " for the step's first line, if it takes them.
    pub(super) fn interval_text(settings: &Settings, t: &Task) -> Option<String> {
        interval(settings, t).map(|s| format!("every {s} s and "))
    }

    /// Takes the periodic checkpoint, then starts the next interval.
    pub(super) fn tick(&self, settings: &Settings, t: &Task, running: &mut Running, started: &StartedAs, ckpt: &Path, stderr: &mut File) {
        // A suspended job's processes are frozen (proctrack/cgroup): CRIU
        // could not seize them, and nothing changed since the last one.
        if super::slurmctld::job_info(t).get("JobState").is_some_and(|s| s == "SUSPENDED") {
            log::info!("{}: suspended, no periodic checkpoint this time", t.name());
            let _ = self.done.send(());
            return;
        }
        match checkpoint(settings, t, running, started, ckpt) {
            Ok(Some(line)) => log::info!("{}: {line}", t.name()),
            Ok(None) => {}
            // The program ended meanwhile: its exit is the agent's next event.
            Err(_) if running.payload.as_ref().is_some_and(|p| p.signal(0).is_err()) => {}
            Err(why) => {
                let kept = if ckpt.exists() { "its previous checkpoint stays" } else { "it has no checkpoint yet" };
                let msg = format!("periodic checkpoint of {} failed: {why}; it goes on, and {kept}", t.name());
                log::warn!("{msg}");
                tell_user(stderr, &msg);
            }
        }
        let _ = self.done.send(());
    }
}

/// Seconds between this task's periodic checkpoints, if it takes them.
fn interval(settings: &Settings, t: &Task) -> Option<u64> {
    Some(settings.checkpoint_interval_for(t.interval_request)).filter(|&s| s > 0 && !t.cut_across_agents())
}

/// Stops the tree, dumps it leaving it running, lets it go on, and puts the
/// checkpoint in checkpoint_dir (a staged one is copied there now: the node
/// may die before the job ends). None: no container to checkpoint (it is
/// ending).
fn checkpoint(settings: &Settings, t: &Task, running: &mut Running, started: &StartedAs, ckpt: &Path) -> Result<Option<String>, String> {
    if running.payload(t.uid).is_none() {
        return Ok(None);
    }
    let request = checkpoint_request(t, running, started, ckpt, true)?;
    // Stopped once the dump is ready to start: the job pays every interval
    // only for what happens between the stop and the SIGCONT.
    let mut stopped = None;
    let dumped = dump_frozen(settings, &request, || {
        stopped = Some(Instant::now());
        step::stop_tree(request.pid, t.uid, step::STOP_BARRIER_TIMEOUT)
            .map(drop)
            .map_err(|e| crate::error::EngineError::Failed(format!("could not be stopped: {e}")))
    });
    // Whatever happened: dump continues the tree too, not a failed stop.
    if stopped.is_some() {
        go_on(t, running);
    }
    let (m, sealed, frozen) = dumped.map_err(|e| e.to_string())?;
    sealed.commit().map_err(|e| format!("could not be put in place: {e}"))?;
    let in_place = stopped.map_or(Duration::ZERO, |at| at.elapsed()).saturating_sub(frozen);
    list_checkpoint(settings, t, &m, "complete");
    Ok(Some(format!(
        "periodic checkpoint ({:.1} MiB, tree stopped {:.2} s, in place {:.2} s later)",
        m.stats.images_bytes as f64 / 1048576.0,
        frozen.as_secs_f64(),
        in_place.as_secs_f64()
    )))
}
