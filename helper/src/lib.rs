//! The helper's engine, usable as a library by tests and by the CLI in
//! `main.rs`. One module per concern.

// Raw system calls live in `sys`, each behind a safe function; anything
// else that needs `unsafe` says why with an `allow` a reviewer sees.
#![deny(unsafe_code)]

pub mod agent;
pub mod cgroup;
pub mod checkpoint;
pub mod core_images;
pub mod criu;
pub mod error;
pub mod launch;
pub mod listing;
pub mod manifest;
pub mod namespaces;
pub mod node_local;
pub mod pmi;
pub mod policy;
pub mod procfs;
pub mod protocol;
pub mod restore;
pub mod runtime;
pub mod shim;
pub mod step;
pub mod storage;
pub mod streamer;
#[allow(unsafe_code)]
pub mod sys;
pub mod task;
pub mod task_view;
pub mod user;
