//! Container runtimes: what the helper knows of a runtime's command line.
//!
//! A runtime provides, in its own module here:
//! - which programs it is (`ckpt_config::runtime`, shared with the plugin,
//!   which wraps only such tasks);
//! - its flag table: which flags take a value and what root does with each
//!   (`apptainer::FLAGS`), and the parse that finds subcommand and image
//!   (`apptainer::ContainerCommand`);
//! - the launch policy applies that table (`policy.rs`), `launch.rs` builds
//!   the command root starts, `restore.rs` the placeholder a restore starts.
//!
//! Apptainer is the one implementation. A second one (SingularityCE's
//! `singularity`, whose flags differ) gets a module next to `apptainer.rs`
//! with its own `FLAGS`, its program name moves from Apptainer's list to its
//! own in `ckpt_config::runtime`, and `ContainerCommand::parse` picks the
//! table by program.

pub mod apptainer;

pub use apptainer::{ContainerCommand, ParseError};
