//! Local (srun) and allocator (sbatch, salloc) context: runs as the user,
//! before anything is submitted.

use ckpt_config::{ConfigError, Settings};
use std::error::Error;

/// Refuses to submit a job that asks for checkpointing when the site
/// configuration is broken: running it without checkpointing would lose work
/// the user expects to keep. The error reaches the user's terminal through
/// `report_error` ("srun: error: checkpoint-container: …").
pub fn init_post_opt(settings: &Result<Settings, ConfigError>) -> Result<(), Box<dyn Error>> {
    match settings {
        Ok(_) => Ok(()),
        Err(e) => Err(crate::refusal(e).into()),
    }
}
