//! A step's tasks are checkpointed at one cut and restored all or none.
//!
//! Each task of a step has its own agent (and, on several nodes, its own
//! slurmstepd), but the tasks of an MPI step talk to each other: a task
//! dumped while its peers still run, or restored while a peer starts over,
//! leaves the step with two pasts. So for a step of several tasks:
//! - **Checkpoint**: every agent stops its container's processes (SIGSTOP:
//!   a stopped process sends nothing and CRIU dumps and restores it
//!   stopped), then all agents meet at a barrier; only when every task is
//!   stopped does any agent dump. A task that does not arrive in time makes
//!   every agent give up this checkpoint (the earlier one, if any, stays).
//!   Each manifest records the cut (the job's restart count when it was
//!   taken), so a checkpoint one task failed to write can never be mixed
//!   with its peers' newer ones.
//! - **Restore**: an agent restores only when every task of the step has a
//!   complete checkpoint of the same cut. The restored processes stay
//!   stopped until all agents meet at a second barrier; then all continue,
//!   or, if any task failed, all discard what they restored and start
//!   fresh.
//!
//! The barriers are files in the job's checkpoint directory (root-only, on
//! the filesystem every node shares). The outcome of a barrier is decided
//! once, by whichever agent first `link`s its decision into place (atomic,
//! also on NFS), and every agent follows that file: two agents can never
//! act on different outcomes, whatever their timing.

use crate::error::{fail, Context, Result};
use crate::procfs::{self, Pid};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the agents of a step wait for each other to stop their
/// containers: all of it comes out of the job's GraceTime + KillWait.
pub const STOP_BARRIER_TIMEOUT: Duration = Duration::from_secs(20);
/// How long restored tasks wait for their peers (a peer may first wait for
/// its checkpoint to be moved off another node's staging directory).
pub const RESTORE_BARRIER_TIMEOUT: Duration = Duration::from_secs(300);

const POLL: Duration = Duration::from_millis(50);

/// One task's place in its step.
#[derive(Debug, Clone, Copy)]
pub struct StepTask {
    pub step_id: u32,
    pub task_id: u32,
    /// Tasks in the step (all nodes).
    pub tasks: u32,
}

impl StepTask {
    pub fn is_coupled(&self) -> bool {
        self.tasks > 1
    }
}

/// A meeting point of every task of a step, in the job's directory.
pub struct Barrier {
    dir: PathBuf,
    me: StepTask,
}

impl Barrier {
    /// `job_dir/stepS.NAME`: NAME says which phase of which run (e.g.
    /// `stop-2`, the checkpoint taken in the job's third run), so a barrier
    /// is never met twice.
    pub fn new(job_dir: &Path, me: StepTask, name: &str) -> Result<Barrier> {
        let dir = job_dir.join(format!("step{}.{name}", me.step_id));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return fail(format!("cannot create {}: {e}", dir.display())),
        }
        Ok(Barrier { dir, me })
    }

    /// Says how this task stands (`Ok`, or why it cannot go on) and waits
    /// for the step's decision: `Ok` when every task is ready, otherwise the
    /// reason every agent of the step acts on.
    pub fn meet(&self, mine: std::result::Result<(), String>, timeout: Duration) -> std::result::Result<(), String> {
        let state = match &mine {
            Ok(()) => "ready".to_string(),
            Err(why) => format!("failed: {why}"),
        };
        if let Err(e) = self.write_atomically(&format!("task{}", self.me.task_id), &state) {
            // Peers cannot learn this task's state: they will time out.
            log::warn!("barrier {}: {e}", self.dir.display());
        }
        if let Err(why) = mine {
            self.decide(&format!("task {} {why}", self.me.task_id));
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(decision) = self.decision() {
                return if decision == "go" { Ok(()) } else { Err(decision.trim_start_matches("abort: ").to_string()) };
            }
            let (ready, failed) = self.states();
            if let Some((task, why)) = failed.first() {
                self.decide(&format!("task {task} {why}"));
            } else if ready.len() as u32 == self.me.tasks {
                self.decide("go");
            } else if Instant::now() > deadline {
                let missing: Vec<String> = (0..self.me.tasks).filter(|t| !ready.contains(t)).map(|t| t.to_string()).collect();
                self.decide(&format!("task {} did not get there within {timeout:?}", missing.join(", ")));
            }
            std::thread::sleep(POLL);
        }
    }

    /// The step's decision, once some agent has made it.
    fn decision(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("decision")).ok().filter(|d| !d.is_empty())
    }

    /// Proposes a decision; the first one linked into place wins.
    fn decide(&self, what: &str) {
        let what = if what == "go" { what.to_string() } else { format!("abort: {what}") };
        let tmp = self.dir.join(format!(".decision.task{}", self.me.task_id));
        if std::fs::write(&tmp, &what).is_ok() {
            // EEXIST: another agent decided first, which is fine.
            let _ = std::fs::hard_link(&tmp, self.dir.join("decision"));
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// Tasks that are ready, and those that failed with their reason.
    fn states(&self) -> (Vec<u32>, Vec<(u32, String)>) {
        let (mut ready, mut failed) = (Vec::new(), Vec::new());
        for t in 0..self.me.tasks {
            match std::fs::read_to_string(self.dir.join(format!("task{t}"))) {
                Ok(s) if s == "ready" => ready.push(t),
                Ok(s) => failed.push((t, s.trim_start_matches("failed: ").to_string())),
                Err(_) => {}
            }
        }
        (ready, failed)
    }

    fn write_atomically(&self, name: &str, content: &str) -> Result<()> {
        let tmp = self.dir.join(format!(".{name}"));
        std::fs::write(&tmp, content).context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, self.dir.join(name)).context(|| format!("cannot write {}", self.dir.join(name).display()))
    }
}

/// Stops every process of the tree below `root` that is still `uid`'s in
/// the container's PID namespace (re-listing until every process listed is
/// stopped and no new one appears: a stopped process cannot fork), for at
/// most `limit`. Returns how many.
///
/// A process already stopped gets no second SIGSTOP: it would stay pending,
/// and CRIU's parasite, once it runs there, takes it for an interruption
/// (measured: MPICH's `mpiexec`, with a SIGSTOP and a SIGCHLD pending,
/// `Unexpected 13 task interruption, aborting`). A process that has one
/// pending and has not stopped yet may get another: pending SIGSTOPs are one.
pub fn stop_tree(root: Pid, uid: u32, limit: Duration) -> Result<usize> {
    let pid_ns = procfs::ns_inode(root, "pid").context(|| format!("process {root}"))?;
    let deadline = Instant::now() + limit;
    let mut listed = usize::MAX;
    loop {
        let members = procfs::tree_members(root, uid, pid_ns);
        // Stopped already, traced (a debugger's), or ended: none to send.
        let settled = |fd: &procfs::PidFd| matches!(procfs::state(fd.pid), Some('T' | 't' | 'Z' | 'X') | None);
        let sent = members.iter().filter(|fd| !settled(fd) && fd.signal(libc::SIGSTOP).is_ok()).count();
        let members = members.len();
        if sent == 0 && members == listed {
            return Ok(members);
        }
        if Instant::now() > deadline {
            return fail(format!("its processes kept changing for {limit:?}"));
        }
        listed = members;
        // Let the stops land before listing children again.
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Continues every process of the tree below `root` still `uid`'s in its
/// PID namespace.
pub fn continue_tree(root: Pid, uid: u32) {
    if let Ok(pid_ns) = procfs::ns_inode(root, "pid") {
        procfs::signal_tree(root, uid, pid_ns, libc::SIGCONT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn barrier(dir: &Path, task: u32, tasks: u32) -> Barrier {
        Barrier::new(dir, StepTask { step_id: 0, task_id: task, tasks }, "stop-0").unwrap()
    }

    #[test]
    fn all_ready_go_together() {
        let dir = tempdir();
        let threads: Vec<_> = (0..3)
            .map(|t| {
                let dir = dir.clone();
                std::thread::spawn(move || barrier(&dir, t, 3).meet(Ok(()), Duration::from_secs(5)))
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), Ok(()));
        }
    }

    #[test]
    fn one_failure_stops_everyone_with_its_reason() {
        let dir = tempdir();
        let other = {
            let dir = dir.clone();
            std::thread::spawn(move || barrier(&dir, 0, 2).meet(Ok(()), Duration::from_secs(5)))
        };
        let mine = barrier(&dir, 1, 2).meet(Err("has no checkpoint".into()), Duration::from_secs(5));
        assert_eq!(mine, Err("task 1 has no checkpoint".into()));
        assert_eq!(other.join().unwrap(), Err("task 1 has no checkpoint".into()));
    }

    #[test]
    fn a_missing_task_times_out_and_a_late_one_follows_the_decision() {
        let dir = tempdir();
        let early = barrier(&dir, 0, 2).meet(Ok(()), Duration::from_millis(200));
        assert_eq!(early, Err("task 1 did not get there within 200ms".into()));
        // The late task is ready, but the step has already given up.
        assert_eq!(barrier(&dir, 1, 2).meet(Ok(()), Duration::from_secs(5)), early);
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("step-barrier-{}-{:?}", std::process::id(), Instant::now()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
