//! Remote context: slurmstepd on each node of the step. `init_post_opt` runs
//! as root; `task_init` runs in the forked task, as the job user, just before
//! exec.
//!
//! Errors found as root are deferred to `task_init`, where the task's stderr
//! is the job's: an error returned earlier only shows up in the slurmd log,
//! not to the user (the same lesson pyxis learned, SchedMD bug 7573).

use crate::{log_error, log_info, LOG_PREFIX};
use ckpt_config::{ConfigError, Settings};
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

#[derive(Default)]
pub struct StepState {
    /// Why checkpointing cannot work for this step, if it cannot.
    failure: Option<String>,
    /// What the node check found (e.g. the CRIU version), for the user's line.
    node_report: String,
}

impl StepState {
    pub fn init_post_opt(&mut self, spank: &mut SpankHandle, settings: &Result<Settings, ConfigError>) {
        let step = step_name(spank);
        let result = match settings {
            Err(e) => Err(crate::refusal(e)),
            Ok(s) => check_node(s),
        };
        match result {
            Ok(report) => {
                log_info(&format!("enabled for step {step}: {report}"));
                self.node_report = report;
            }
            Err(why) => {
                log_error(&format!("step {step}: {why}"));
                self.failure = Some(why);
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
        spank.setenv(TASK_ENV, "1", true)?;
        if spank.task_global_id()? == 0 {
            eprintln!("{LOG_PREFIX}: enabled for step {}: {}", step_name(spank), self.node_report);
        }
        Ok(())
    }
}

fn step_name(spank: &SpankHandle) -> String {
    let job = spank.job_id().unwrap_or(0);
    match spank.job_stepid() {
        // Slurm's special step ids (batch, extern, interactive) are the top
        // of the u32 range; show them the way Slurm does.
        Ok(0xFFFF_FFFB) => format!("{job}.batch"),
        Ok(0xFFFF_FFFC) => format!("{job}.extern"),
        Ok(0xFFFF_FFFA) => format!("{job}.interactive"),
        Ok(step) => format!("{job}.{step}"),
        Err(_) => format!("{job}.?"),
    }
}

/// Checks, as root, that this node can checkpoint: the helper is safe to run
/// with root's privileges and reports a usable CRIU.
fn check_node(settings: &Settings) -> Result<String, String> {
    trusted_root_executable(&settings.helper)?;
    let out = Command::new(&settings.helper)
        .arg("check")
        .arg("--criu")
        .arg(&settings.criu)
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

/// Root runs the helper, so only a file root alone can change is acceptable:
/// a regular file owned by root, writable by nobody else, and executable.
fn trusted_root_executable(path: &Path) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| format!("helper {} is unusable: {e}", path.display()))?;
    let why = if !meta.file_type().is_file() {
        Some("not a regular file")
    } else if meta.uid() != 0 {
        Some("not owned by root")
    } else if meta.mode() & 0o022 != 0 {
        Some("writable by group or others")
    } else if meta.mode() & 0o100 == 0 {
        Some("not executable")
    } else {
        None
    };
    match why {
        Some(why) => Err(format!("helper {} is unusable: {why}", path.display())),
        None => Ok(()),
    }
}
