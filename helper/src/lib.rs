//! The helper's engine, usable as a library by tests and by the CLI in
//! `main.rs`. One module per concern.

pub mod apptainer;
pub mod checkpoint;
pub mod criu;
pub mod error;
pub mod manifest;
pub mod procfs;
pub mod restore;
pub mod storage;
