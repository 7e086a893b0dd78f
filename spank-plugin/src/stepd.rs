//! Remote context: slurmstepd on each node of the step. `init_post_opt` runs
//! as root; `task_init` runs in the forked task, as the job user, just before
//! exec.
//!
//! Errors found as root are deferred to `task_init`, where the task's stderr
//! is the job's: an error returned earlier only shows up in the slurmd log,
//! not to the user (the same lesson pyxis learned, SchedMD bug 7573).

use crate::{log_error, log_info, LOG_PREFIX};
use ckpt_config::{agent_files, ConfigError, Settings};
use slurm_spank::SpankHandle;
use std::error::Error;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

/// Environment variable set in every task of a step that has checkpointing on.
pub const TASK_ENV: &str = "SLURM_CHECKPOINT_CONTAINER";

/// An error the plugin has already shown the user and logged; Slurm only
/// needs to learn that the callback failed.
#[derive(Debug)]
pub struct AlreadyReported;

impl std::fmt::Display for AlreadyReported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("error already reported")
    }
}

impl Error for AlreadyReported {}

/// Tasks whose command is an Apptainer container are the ones wrapped.
fn is_container_command(argv: &[&str]) -> bool {
    argv.first().is_some_and(|a| ckpt_config::runtime::is_container_program(a))
}

#[derive(Default)]
pub struct StepState {
    /// Why checkpointing cannot work for this step, if it cannot.
    failure: Option<String>,
    /// Why this node cannot checkpoint (no usable CRIU, untrusted helper):
    /// the task then runs unprotected, and says so.
    unprotected: Option<String>,
    settings: Option<Settings>,
    /// The job's `--checkpoint-before-time-limit`, for its agents.
    before_time_limit: Option<u32>,
    /// The runtime shim's directory, once it proved to be root's alone:
    /// tasks that are no container get it first on their PATH.
    shim: Option<std::path::PathBuf>,
    /// When the step's task ends stop waiting for their agents (task_exit).
    task_end_deadline: Option<std::time::Instant>,
}

/// What a task of a protected step gets.
#[derive(PartialEq)]
enum Protection {
    /// Its command is a container: the task hands it to its agent.
    Container,
    /// A script or another program, alone in its step on this node: the
    /// runtime shim hands each container it starts to the task's agent.
    Watch,
    /// Nothing (a step of several tasks that are no container).
    None,
}

impl StepState {
    pub fn init_post_opt(&mut self, spank: &mut SpankHandle, settings: &Result<Settings, ConfigError>, lead: Result<Option<u32>, String>) {
        let step = step_name(spank);
        match lead {
            Ok(lead) => self.before_time_limit = lead,
            Err(why) => {
                // Only a client other than srun/sbatch sends a bad value.
                log_error(&format!("step {step}: {why}"));
                self.failure = Some(why);
                return;
            }
        }
        let settings = match settings {
            Err(e) => {
                // A broken site configuration refuses the job (srun and
                // sbatch already refused it where they read the same file).
                let why = crate::refusal(e);
                log_error(&format!("step {step}: {why}"));
                self.failure = Some(why);
                return;
            }
            Ok(s) => s,
        };
        match check_node(settings) {
            Ok(report) => {
                log_info(&format!("step {step}: this node can checkpoint containers: {report}"));
                self.shim = trusted_shim(&ckpt_config::shim::dir(&settings.helper)).map_err(|why| log_error(&why)).ok();
                self.settings = Some(settings.clone());
            }
            Err(why) => {
                log_error(&format!("step {step} runs without checkpointing: {why}"));
                self.unprotected = Some(why);
            }
        }
    }

    pub fn task_init(&mut self, spank: &mut SpankHandle) -> Result<(), Box<dyn Error>> {
        if let Some(why) = &self.failure {
            // The task's stderr is the job's stderr: the user sees this line,
            // and the task fails instead of running unprotected.
            eprintln!("{LOG_PREFIX}: error: {why}");
            return Err(Box::new(AlreadyReported));
        }
        if let Some(why) = &self.unprotected {
            // A node fault must not cost the user the job: it runs, fresh and
            // unprotected, and the job's stderr and the slurmd log say why.
            if spank.task_global_id()? == 0 {
                eprintln!("{LOG_PREFIX}: warning: {why}; this step runs without checkpointing");
            }
            return Ok(());
        }
        spank.setenv(TASK_ENV, "1", true)?;
        let argv = spank.job_argv()?;
        let Some(settings) = self.settings.as_ref() else { return Ok(()) };
        let protection = self.protection(spank)?;
        // A step's tasks inherit the batch script's shim: only a watched
        // task keeps it (its own), so the environment is what it was.
        let path = spank.getenv("PATH")?.unwrap_or_default();
        let path = match &self.shim {
            Some(shim) => ckpt_config::shim::strip(&path, shim),
            None => path,
        };
        spank.unsetenv(ckpt_config::shim::SOCKET_ENV)?;
        spank.setenv("PATH", &path, true)?;
        let socket = agent_files::socket(spank.job_id()?, spank.job_stepid()?, spank.task_global_id()?);
        let helper = settings.helper.to_string_lossy().into_owned();
        match protection {
            Protection::None => {
                // Only containers are protected: say so, once per step,
                // where the user may think otherwise. The batch script's
                // steps speak for themselves.
                if spank.task_global_id()? == 0 && spank.job_stepid()? != ckpt_config::BATCH_STEP {
                    let program = argv.first().copied().unwrap_or("?");
                    eprintln!(
                        "{LOG_PREFIX}: warning: step {} runs {program}, not an Apptainer container: it will start over if the job is requeued",
                        step_name(spank)
                    );
                }
                return Ok(());
            }
            Protection::Watch => {
                // Each container the task's processes start finds the shim
                // first, which hands it to the task's agent; the task hands
                // the agent its stdio first, then runs its own command.
                let shim = self.shim.as_ref().expect("Watch needs the shim").to_string_lossy().into_owned();
                spank.setenv("PATH", format!("{shim}:{path}"), true)?;
                spank.setenv(ckpt_config::shim::SOCKET_ENV, &socket, true)?;
                spank.prepend_task_argv(vec![&helper, "task", "--socket", &socket, "--watch", "--"])?;
                return Ok(());
            }
            Protection::Container => {}
        }
        if spank.task_global_id()? == 0 {
            if let Some(Err(why)) = interval_request(spank) {
                eprintln!("{LOG_PREFIX}: warning: {why}");
            }
        }
        // The task becomes our wrapper, which hands the container command to
        // the task's root agent (started in task_post_fork).
        spank.prepend_task_argv(vec![&helper, "task", "--socket", &socket, "--"])?;
        Ok(())
    }

    /// Whether this task's agent serves the containers its processes start.
    pub fn watches(&self, spank: &SpankHandle) -> Result<bool, Box<dyn Error>> {
        Ok(self.settings.is_some() && self.protection(spank)? == Protection::Watch)
    }

    /// One deadline for all the step's task ends on this node: slurmstepd
    /// calls them one after the other, and their waits together must stay
    /// within [`crate::batch::WAIT_LIMIT`].
    pub fn task_end_deadline(&mut self) -> std::time::Instant {
        *self.task_end_deadline.get_or_insert_with(|| std::time::Instant::now() + crate::batch::WAIT_LIMIT)
    }

    /// What this task gets, in task_init and task_post_fork alike.
    fn protection(&self, spank: &SpankHandle) -> Result<Protection, Box<dyn Error>> {
        if is_container_command(&spank.job_argv()?) {
            return Ok(Protection::Container);
        }
        let alone = spank.job_stepid()? == ckpt_config::BATCH_STEP || (spank.job_total_task_count()? == 1 && spank.job_nnodes()? == 1);
        Ok(if alone && self.shim.is_some() { Protection::Watch } else { Protection::None })
    }

    /// Runs in slurmstepd as root once per task, before tasks exec: starts
    /// the task's agent (it detaches at once).
    pub fn task_post_fork(&mut self, spank: &mut SpankHandle) -> Result<(), Box<dyn Error>> {
        let Some(settings) = &self.settings else { return Ok(()) };
        let protection = self.protection(spank)?;
        if protection == Protection::None {
            return Ok(());
        }
        let (job, step, task) = (spank.job_id()?, spank.job_stepid()?, spank.task_global_id()?);
        // The batch script is one task on one node, whatever the job's size.
        let (tasks, nodes) = match step {
            ckpt_config::BATCH_STEP => (1, 1),
            _ => (spank.job_total_task_count()?, spank.job_nnodes()?),
        };
        // The batch step's environment lacks it here: its agent asks
        // slurmctld (agent/descendants.rs).
        let restarts = spank.getenv("SLURM_RESTART_COUNT")?.unwrap_or_else(|| "0".into());
        let mut cmd = helper_command(settings);
        cmd.args(["agent", "--socket", &agent_files::socket(job, step, task), "--session-file", &agent_files::session(job, step, task)]);
        cmd.args(["--job-id", &job.to_string(), "--step-id", &step.to_string(), "--task-id", &task.to_string()]);
        cmd.args(["--step-tasks", &tasks.to_string(), "--step-nodes", &nodes.to_string()]);
        cmd.args(["--uid", &spank.job_uid()?.to_string(), "--gid", &spank.job_gid()?.to_string()]);
        cmd.args(["--restart-count", restarts.trim(), "--task-pid", &spank.task_pid()?.to_string()]);
        cmd.args(["--stepd-pid", &std::process::id().to_string()]);
        if protection == Protection::Watch {
            cmd.arg("--watch");
        }
        if let Some(minutes) = self.before_time_limit {
            cmd.args(["--before-time-limit", &minutes.to_string()]);
        }
        if let Some(Ok(seconds)) = interval_request(spank) {
            cmd.args(["--interval-request", &seconds.to_string()]);
        }
        let status = cmd.env_clear().stdin(std::process::Stdio::null()).status();
        match status {
            Ok(s) if s.success() => Ok(()),
            other => {
                let why = format!("cannot start the checkpoint agent for task {task} of step {job}.{step}: {other:?}");
                log_error(&why);
                Err(Box::new(AlreadyReported))
            }
        }
    }
}

/// The periodic checkpoint interval the job asks for in its environment:
/// only a number is taken from what the user controls.
fn interval_request(spank: &SpankHandle) -> Option<Result<u64, String>> {
    let value = spank.getenv(ckpt_config::INTERVAL_ENV).ok()??;
    Some(ckpt_config::interval_request(&value))
}

fn step_name(spank: &SpankHandle) -> String {
    let job = spank.job_id().unwrap_or(0);
    spank.job_stepid().map(|step| ckpt_config::step_name(job, step)).unwrap_or_else(|_| format!("{job}.?"))
}

/// The helper with every site setting on its command line: what it checks
/// and uses is exactly what the plugin read.
fn helper_command(settings: &Settings) -> Command {
    let mut cmd = Command::new(&settings.helper);
    cmd.args(settings.to_args());
    cmd
}

/// Checks, as root, that this node can checkpoint: the helper is safe to run
/// with root's privileges and reports a usable CRIU.
fn check_node(settings: &Settings) -> Result<String, String> {
    trusted_root_executable(&settings.helper)?;
    let out = helper_command(settings)
        .arg("check")
        .env_clear()
        .output()
        .map_err(|e| format!("cannot run helper {}: {e}", settings.helper.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let why = stderr.lines().last().unwrap_or("no message").trim();
        let why = why.strip_prefix("checkpoint-container: ").unwrap_or(why);
        return Err(format!("this node cannot checkpoint containers: {why}"));
    }
    Ok(stdout.trim().to_string())
}

/// The users' PATH gets the shim's directory first, so only a directory
/// root alone can change is acceptable (its links lead to the helper,
/// itself checked).
fn trusted_shim(dir: &Path) -> Result<std::path::PathBuf, String> {
    match not_roots_alone(dir, Kind::Directory) {
        Some(why) => Err(format!(
            "runtime shim {} is unusable: {why}; containers started by batch and wrapper scripts are not protected",
            dir.display()
        )),
        None => Ok(dir.to_path_buf()),
    }
}

/// Root runs the helper, so only a file root alone can change is
/// acceptable, and it must be executable.
fn trusted_root_executable(path: &Path) -> Result<(), String> {
    match not_roots_alone(path, Kind::Executable) {
        Some(why) => Err(format!("helper {} is unusable: {why}", path.display())),
        None => Ok(()),
    }
}

enum Kind {
    Directory,
    Executable,
}

/// Why `path` is not a `kind` that root alone can change: owned by root,
/// writable by nobody else, and itself (lstat: no symlink); None if it is.
fn not_roots_alone(path: &Path, kind: Kind) -> Option<String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) => return Some(e.to_string()),
    };
    let why = match kind {
        Kind::Directory if !meta.file_type().is_dir() => "not a directory",
        Kind::Executable if !meta.file_type().is_file() => "not a regular file",
        _ if meta.uid() != 0 => "not owned by root",
        _ if meta.mode() & 0o022 != 0 => "writable by group or others",
        Kind::Executable if meta.mode() & 0o100 == 0 => "not executable",
        _ => return None,
    };
    Some(why.to_string())
}
