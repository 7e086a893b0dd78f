//! The runtime shim (runs as the job user): `apptainer` and `singularity`
//! first on the PATH of a protected task that is no container itself (a
//! batch script, a wrapper script; the plugin puts `shim/`, next to the
//! helper, there). Each container the task's processes start this way is
//! handed to the task's root agent, which starts it and checkpoints it
//! like a task's own container (agent/descendants.rs).
//!
//! The container sees the environment it would have seen without the
//! option: the shim's directory is taken out of PATH and the agent's
//! socket out of the environment, for the container as for a command that
//! runs unprotected. Without an agent to hand it to, the real runtime runs
//! as if the shim were not there (and says so when an agent was meant to
//! be there).

use crate::error::Result;
use crate::task::{block_signals, exec_unprotected, find_program, hand_over, own_env};
use ckpt_config::shim::SOCKET_ENV;
use nix::sys::signal::SigSet;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Whether `dir/name` is this very program: a shim directory on PATH.
fn is_shim_dir(dir: &str, name: &str, me: &Path) -> bool {
    std::fs::canonicalize(Path::new(dir).join(name)).is_ok_and(|p| p == me)
}

/// The environment the command would have had without the shim: PATH
/// without the shim's directory, no agent socket, and `_` (the shell's
/// record of the program it ran) naming the real runtime.
fn unshimmed_env(name: &str) -> Vec<(String, String)> {
    let me = std::env::current_exe().and_then(std::fs::canonicalize).ok();
    let mut env: Vec<(String, String)> = own_env()
        .into_iter()
        .filter(|(k, _)| k != SOCKET_ENV)
        .map(|(k, v)| match (&me, k.as_str()) {
            (Some(me), "PATH") => {
                let kept: Vec<&str> = v.split(':').filter(|d| !is_shim_dir(d, name, me)).collect();
                (k, kept.join(":"))
            }
            _ => (k, v),
        })
        .collect();
    let path = env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.clone());
    if let Some(real) = find_program(name, path.as_deref()) {
        for (_, v) in env.iter_mut().filter(|(k, _)| k == "_") {
            *v = real.to_string_lossy().into_owned();
        }
    }
    env
}

/// Runs `argv` (`apptainer …` as the user typed it): through the task's
/// agent, or as it would run without the option. Returns the container's
/// exit code.
pub fn run(mut argv: Vec<String>) -> Result<i32> {
    let name = argv[0].rsplit('/').next().unwrap_or("apptainer").to_string();
    // Found again in the PATH without the shim: the real one.
    argv[0] = name.clone();
    let env = unshimmed_env(&name);
    let Some(socket) = std::env::var_os(SOCKET_ENV) else {
        return Err(exec_unprotected(&argv, Some(&env), SigSet::empty()));
    };
    let set = block_signals()?;
    // The agent listens from before the task ran (task.rs's `watch`): one
    // try, no waiting.
    match UnixStream::connect(&socket) {
        Ok(stream) => hand_over(stream, argv, env, set),
        Err(e) => {
            crate::task::say(&format!(
                "warning: {name} {}: the task's checkpoint agent does not answer ({e}): this container runs unprotected and starts over if the job is requeued",
                argv[1..].first().map(String::as_str).unwrap_or("")
            ));
            Err(exec_unprotected(&argv, Some(&env), set))
        }
    }
}

/// Whether this process was started as a container runtime (the shim's
/// names are links to the helper).
pub fn started_as_runtime(argv0: &str) -> bool {
    ckpt_config::runtime::is_container_program(argv0)
}
