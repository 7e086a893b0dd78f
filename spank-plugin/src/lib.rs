//! SPANK plugin `checkpoint-container`.
//!
//! This file only dispatches Slurm's callbacks by context, the way pyxis does,
//! so that every line says which process and which uid it runs as:
//! - local (srun) and allocator (sbatch/salloc): `client.rs`, as the user;
//! - remote (slurmstepd): `stepd.rs`, as root (or the user in task_init).
//!
//! All the plugin's `unsafe` lives in the `slurm-spank` crate's bindings.

mod batch;
mod client;
mod stepd;

use ckpt_config::{ConfigError, Settings};
use slurm_spank::{spank_log, Context, LogLevel, Plugin, SpankHandle, SpankOption, SLURM_VERSION_NUMBER, SPANK_PLUGIN};
use std::error::Error;

SPANK_PLUGIN!(b"checkpoint-container", SLURM_VERSION_NUMBER, CheckpointContainer);

/// The user-facing option: `srun --checkpoint-container …` or
/// `#SBATCH --checkpoint-container`.
pub const OPTION: &str = "checkpoint-container";

/// With it: `--checkpoint-before-time-limit=MINUTES`, checkpoint and
/// requeue the job that long before its time limit (0: not this job).
pub const TIME_LIMIT_OPTION: &str = "checkpoint-before-time-limit";

/// Prefix of every line the plugin prints or logs, so admins can grep for it.
pub const LOG_PREFIX: &str = "checkpoint-container";

#[derive(Default)]
struct CheckpointContainer {
    /// Site settings, or why they could not be read. Kept as a result so a bad
    /// configuration only fails jobs that ask for checkpointing.
    settings: Option<Result<Settings, ConfigError>>,
    /// Whether the user asked for checkpointing for this job or step.
    requested: bool,
    stepd: stepd::StepState,
}

pub(crate) fn log_error(msg: &str) {
    spank_log(LogLevel::Error, &format!("{LOG_PREFIX}: {msg}"));
}

/// The one line a user sees when checkpointing was asked for but the site
/// configuration is broken.
pub(crate) fn refusal(e: &ConfigError) -> String {
    format!("--{OPTION} cannot be honoured, the site configuration is invalid: {e}")
}

/// The job's `--checkpoint-before-time-limit`, if given. Its value is the
/// user's (in slurmstepd too: any client can send it), so only a number
/// within bounds is taken.
fn before_time_limit(spank: &SpankHandle) -> Result<Option<u32>, String> {
    let max = ckpt_config::MAX_LEAD_MINUTES;
    let bad = |value: &str| format!("--{TIME_LIMIT_OPTION}={value} is invalid: expected a whole number of minutes, at most {max}");
    match spank.get_option_value(TIME_LIMIT_OPTION) {
        Ok(None) => Ok(None),
        Ok(Some(v)) => ckpt_config::parse_count(TIME_LIMIT_OPTION, &v, max).map(Some).map_err(|_| bad(&v)),
        Err(_) => Err(bad("?")),
    }
}

pub(crate) fn log_info(msg: &str) {
    spank_log(LogLevel::Info, &format!("{LOG_PREFIX}: {msg}"));
}

unsafe impl Plugin for CheckpointContainer {
    /// The default installs a `tracing` subscriber; this plugin logs through
    /// Slurm's own log functions only.
    fn setup(&mut self, _spank: &mut SpankHandle) -> Result<(), Box<dyn Error>> {
        Ok(())
    }

    fn report_error(&self, _spank: &mut SpankHandle, error: &dyn Error) {
        // Slurm hands us a non-'static error, so it cannot be downcast.
        if error.to_string() != stepd::AlreadyReported.to_string() {
            log_error(&error.to_string());
        }
    }

    fn init(&mut self, spank: &mut SpankHandle) -> Result<(), Box<dyn Error>> {
        let context = spank.context()?;
        if !matches!(context, Context::Local | Context::Remote | Context::Allocator) {
            return Ok(());
        }
        // Registered from init (not a static table) so that sbatch and salloc
        // accept the option too.
        spank.register_option(SpankOption::new(OPTION).usage(
            "Checkpoint this job's Apptainer containers with CRIU when it is preempted \
             or requeued, and restore them when it runs again",
        ))?;
        spank.register_option(SpankOption::new(TIME_LIMIT_OPTION).takes_value("MINUTES").usage(
            "With --checkpoint-container: checkpoint this batch job's containers and requeue it \
             MINUTES before its time limit (0: do not; default: the site's setting)",
        ))?;
        let args: Vec<String> = spank.plugin_argv()?.iter().map(|s| s.to_string()).collect();
        let settings = Settings::load(&args, ckpt_config::read_optional_file);
        if let (Err(e), Context::Remote) = (&settings, context) {
            // The slurmd log gets every configuration error, whether or not
            // this job asked for checkpointing: the admin must see it.
            log_error(&e.to_string());
        }
        self.settings = Some(settings);
        Ok(())
    }

    fn init_post_opt(&mut self, spank: &mut SpankHandle) -> Result<(), Box<dyn Error>> {
        self.requested = spank.is_option_set(OPTION);
        let lead = before_time_limit(spank);
        let settings = self.settings.as_ref().expect("init ran before init_post_opt");
        match spank.context()? {
            Context::Local | Context::Allocator => {
                let lead = lead?;
                if lead.is_some() && !self.requested {
                    return Err(format!("--{TIME_LIMIT_OPTION} applies to protected containers: add --{OPTION}").into());
                }
                if !self.requested {
                    return Ok(());
                }
                client::init_post_opt(settings)
            }
            Context::Remote if self.requested => {
                self.stepd.init_post_opt(spank, settings, lead);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn task_init(&mut self, spank: &mut SpankHandle) -> Result<(), Box<dyn Error>> {
        if !self.requested {
            return Ok(());
        }
        self.stepd.task_init(spank)
    }

    fn task_post_fork(&mut self, spank: &mut SpankHandle) -> Result<(), Box<dyn Error>> {
        if !self.requested {
            return Ok(());
        }
        self.stepd.task_post_fork(spank)
    }

    /// For every job, asked for or not: `srun --checkpoint-container` in a
    /// script without the `#SBATCH` option protects a step all the same.
    fn task_exit(&mut self, spank: &mut SpankHandle) -> Result<(), Box<dyn Error>> {
        if !matches!(spank.context()?, Context::Remote) {
            return Ok(());
        }
        let dir = std::path::Path::new(ckpt_config::agent_files::DIR);
        match spank.job_stepid()? {
            ckpt_config::BATCH_STEP => batch::after_script(dir, spank.job_id()?, spank.task_pid()?),
            // A task that is its container ends only once its agent is
            // done; a script's task may leave containers being ended.
            step if self.requested && self.stepd.watches(spank)? => {
                let deadline = self.stepd.task_end_deadline();
                batch::after_task(dir, spank.job_id()?, step, spank.task_global_id()?, deadline);
            }
            _ => {}
        }
        Ok(())
    }
}
