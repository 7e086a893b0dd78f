//! `checkpoint-container agent`: root's side of one `--checkpoint-container`
//! task, started by the plugin from slurmstepd (root) for that task alone.
//!
//! Its first client is the task process Slurm forked, proven by the socket's
//! peer credentials (uid and pid). A task that is not a container itself
//! (a batch script, a wrapper script) then becomes its own command, and the
//! agent serves each container its processes start through the runtime
//! shim (descendants.rs). For each container:
//! - on the first run, starts the task's container root-started for the
//!   user (policy.rs decides what is allowed), in the task's cgroups;
//! - on a requeued run (SLURM_RESTART_COUNT > 0) with a checkpoint of the
//!   same step, task and command, restores it instead (falling back to a
//!   fresh start, with the reason in the job's stderr, if that fails);
//! - when the task gets SIGTERM, asks slurmctld whether the job is being
//!   requeued (its restart count went up) and if so checkpoints the
//!   container; otherwise (scancel) passes the SIGTERM on;
//! - if the job asked (or the site does), requeues the job a few minutes
//!   before its time limit, which checkpoints it the same way;
//! - when the container ends on its own, the job is finished for good with
//!   this task: its checkpoint is removed.

mod descendants;
mod layout;
mod messages;
mod periodic;
mod ranks;
mod requeue;
mod session;
mod session_file;
mod slurmctld;
mod spawn;
mod time_limit;

pub use layout::{collect_garbage, job_dir};
pub use session::run;

use crate::procfs::Pid;
use crate::step::StepTask;
use std::path::PathBuf;
use std::time::Duration;

/// `stepS.taskT`, or `stepS.taskT.cN` for a container the task's processes
/// started.
fn checkpoint_name(step: u32, task: u32, container: Option<u32>) -> String {
    match container {
        None => format!("step{step}.task{task}"),
        Some(n) => format!("step{step}.task{task}.c{n}"),
    }
}

pub(super) const ACCEPT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a restore waits for a staged checkpoint another node is moving
/// into checkpoint_dir.
pub(super) const MOVE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long appending a line to the job's output file may take.
pub(super) const TELL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a checkpointed container may take to exit before the task ends.
pub(super) const CONTAINER_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// One task, as the plugin names it on the agent's command line (the
/// `agent` subcommand's arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct Task {
    /// Socket to serve the task on (created; its directory too)
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Session file, locked while the task is served (session_file.rs)
    #[arg(long, value_name = "PATH")]
    pub session_file: PathBuf,
    #[arg(long)]
    pub job_id: u32,
    #[arg(long)]
    pub step_id: u32,
    #[arg(long)]
    pub task_id: u32,
    /// Tasks in the step
    #[arg(long, default_value_t = 1)]
    pub step_tasks: u32,
    /// Nodes the step spans
    #[arg(long, default_value_t = 1)]
    pub step_nodes: u32,
    #[arg(long)]
    pub uid: u32,
    #[arg(long)]
    pub gid: u32,
    #[arg(long, default_value_t = 0)]
    pub restart_count: u32,
    /// The task process the plugin saw forked: the only client accepted
    #[arg(long)]
    pub task_pid: Pid,
    /// The step's slurmstepd (the plugin's process): the only peer of a PMI
    /// socket the agent relays (pmi.rs)
    #[arg(long)]
    pub stepd_pid: Option<u32>,
    /// Minutes before its time limit the job asked to be checkpointed and
    /// requeued (its --checkpoint-before-time-limit; none: the site's
    /// checkpoint_before_time_limit)
    #[arg(long, value_name = "MINUTES")]
    pub before_time_limit: Option<u32>,
    /// Seconds between periodic checkpoints the job asked for (0: none; the
    /// site's settings bound it; periodic.rs)
    #[arg(long)]
    pub interval_request: Option<u64>,
    /// The task is no container (a script): it hands over its stdio, then
    /// the containers its processes start come through the runtime shim
    /// (descendants.rs). The plugin decides; the task cannot ask otherwise.
    #[arg(long)]
    pub watch: bool,
    /// Which of the containers the task's processes started this is (the
    /// runtime shim's: descendants.rs); None: the task is the container.
    #[arg(skip)]
    pub container: Option<u32>,
    /// Task 0 of a step whose ranks run in one container (ranks.rs), once
    /// it is started: the step is one tree, cut without the agents' barrier.
    #[arg(skip)]
    pub ranks_in_one_container: bool,
}

impl Task {
    fn name(&self) -> String {
        let step = ckpt_config::step_name(self.job_id, self.step_id);
        match self.container {
            // What happens to it happens to every rank.
            None if self.ranks_in_one_container => format!("step {step} ({} ranks in one container)", self.step_tasks),
            None => format!("task {} of step {step}", self.task_id),
            Some(n) => format!("container {n} of task {} of step {step}", self.task_id),
        }
    }

    /// The checkpoint's directory name in the job's (layout.rs).
    fn checkpoint_name(&self) -> String {
        checkpoint_name(self.step_id, self.task_id, self.container)
    }

    /// Whether the step's cut needs every task's agent at a barrier
    /// (step.rs): several tasks, each in a container of its own.
    fn cut_across_agents(&self) -> bool {
        self.step().is_coupled() && !self.ranks_in_one_container
    }

    fn step(&self) -> StepTask {
        StepTask { step_id: self.step_id, task_id: self.task_id, tasks: self.step_tasks }
    }
}
