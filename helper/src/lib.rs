//! The helper's engine, usable as a library by tests and by the CLI in
//! `main.rs`. One module per concern.

pub mod criu;
