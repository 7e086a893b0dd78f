//! `checkpoint-container task`: what a `--checkpoint-container` task runs,
//! as the job user, in place of the user's `apptainer …` command (the plugin
//! prepends it). It hands the command, its environment and its stdio to the
//! task's root agent, then stays the task process Slurm signals: SIGTERM
//! (preemption, requeue, scancel) becomes a request to the agent, which
//! decides whether to checkpoint; the task exits only once the agent is done,
//! because Slurm kills the whole step as soon as the task has exited.

use crate::error::{fail, Result};
use crate::protocol::{self, Channel, ToAgent, ToTask};
use nix::sys::signal::{SigSet, Signal};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
const FORWARDED: &[Signal] = &[Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGUSR1, Signal::SIGUSR2];

fn connect(socket: &Path) -> Result<UnixStream> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => {
                return fail(format!("the node's checkpoint agent did not answer at {}: {e}", socket.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

enum Event {
    Signal(Signal),
    Message(Option<ToTask>),
}

/// Where `program` is, as `execvp` would find it with `path` (the user's
/// PATH).
pub(crate) fn find_program(program: &str, path: Option<&str>) -> Option<std::path::PathBuf> {
    if program.contains('/') {
        return Some(std::path::PathBuf::from(program));
    }
    let path = path.unwrap_or("/usr/bin:/bin");
    std::env::split_paths(path).map(|d| d.join(program)).find(|p| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// [`find_program`], with symlinks resolved.
fn resolve_program(program: &str, path: Option<&str>) -> Option<String> {
    find_program(program, path).and_then(|p| std::fs::canonicalize(p).ok()).map(|p| p.to_string_lossy().into_owned())
}

/// Becomes the user's own command, as it would have run without
/// `--checkpoint-container` (signals unblocked: the mask survives exec),
/// with environment `env` (argv[0] looked up in its PATH), or this
/// process's.
pub(crate) fn exec_unprotected(argv: &[String], env: Option<&[(String, String)]>, blocked: SigSet) -> crate::error::EngineError {
    use std::os::unix::process::CommandExt;
    let _ = blocked.thread_unblock();
    let mut cmd = std::process::Command::new(&argv[0]);
    if let Some(env) = env {
        cmd.env_clear().envs(env.iter().cloned());
    }
    let e = cmd.args(&argv[1..]).exec();
    crate::error::EngineError::Failed(format!("cannot run {}: {e}", argv[0]))
}

/// This process's environment (what is not UTF-8 cannot be sent, and is
/// left out).
pub(crate) fn own_env() -> Vec<(String, String)> {
    std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))).collect()
}

/// The signals the task takes over, blocked in every thread (they inherit
/// the mask) for the signal thread's sigwait.
pub(crate) fn block_signals() -> Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    for s in FORWARDED {
        set.add(*s);
    }
    set.thread_block().map_err(|e| crate::error::EngineError::Failed(format!("cannot block signals: {e}")))?;
    Ok(set)
}

/// Descriptors Slurm gives the task beyond stdio that the program needs:
/// the PMI-2 socket of `srun --mpi=pmi2` (`PMI_FD`), when it is open.
fn slurm_fds() -> Vec<std::os::fd::RawFd> {
    let pmi = std::env::var("PMI_FD").ok().and_then(|v| v.parse::<std::os::fd::RawFd>().ok()).filter(|&fd| fd > 2);
    // F_GETFD only asks whether the number is an open descriptor.
    pmi.into_iter().filter(|&fd| nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_ok()).collect()
}

/// Runs the task; returns its exit code.
pub fn run(socket: &Path, argv: Vec<String>) -> Result<i32> {
    // Block the signals first: every thread inherits the mask.
    let set = block_signals()?;
    let stream = connect(socket)?;
    hand_over(stream, argv, own_env(), set)
}

/// A task that is no container itself (a batch script, a wrapper script):
/// hands the agent its stdio, so that the agent can speak to the job, then
/// becomes its own command, whose processes' containers the runtime shim
/// hands to the agent (shim.rs). Returns only if that exec failed.
pub fn watch(socket: &Path, argv: Vec<String>) -> crate::error::EngineError {
    let said = connect(socket).and_then(|stream| {
        protocol::send_task_fds(&stream, &[])?;
        let mut channel = Channel::new(stream)?;
        channel.send(&ToAgent::Watch { argv: argv.clone() })?;
        match channel.recv::<ToTask>()? {
            Some(ToTask::Go) => Ok(()),
            other => fail(format!("the node's checkpoint agent answered {other:?}")),
        }
    });
    if let Err(e) = said {
        // The task runs all the same; each container it starts then says
        // that it runs unprotected (shim.rs).
        say(&format!("warning: {e}"));
    }
    exec_unprotected(&argv, None, SigSet::empty())
}

/// A line for the user on this process's stderr, whatever that is (a
/// failed write must not keep the command from running, as `eprintln!`'s
/// panic would).
pub(crate) fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "checkpoint-container: {line}");
}

/// Hands the container command `argv` to the agent on `stream`, with this
/// process's stdio, working directory and the environment `env`, and
/// serves the signals and messages until the container ends (then returns
/// its exit code) or the agent tells it to run the command itself.
/// `signals` are blocked already.
pub(crate) fn hand_over(stream: UnixStream, argv: Vec<String>, env: Vec<(String, String)>, set: SigSet) -> Result<i32> {
    let mut channel = Channel::new(stream.try_clone().map_err(|e| crate::error::EngineError::Failed(e.to_string()))?)?;
    let cwd = std::env::current_dir().map(|p| p.to_string_lossy().into_owned()).unwrap_or_else(|_| "/".into());
    let path = env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str());
    let runtime = resolve_program(&argv[0], path);
    let sent = protocol::send_task_fds(&stream, &slurm_fds())
        .and_then(|()| channel.send(&ToAgent::Start { argv: argv.clone(), cwd, env: env.clone(), runtime }));
    if let Err(e) = sent {
        // The agent closed the connection before it read what to run (it
        // serves too many, say; it has said why): nothing was started.
        if let Ok(Some(ToTask::RunUnprotected(why))) = channel.recv::<ToTask>() {
            say(&why);
        } else {
            say(&format!("warning: {e}: this container runs unprotected"));
        }
        return Err(exec_unprotected(&argv, Some(&env), set));
    }

    let (tx, rx) = mpsc::channel();
    let signals = tx.clone();
    std::thread::spawn(move || loop {
        if let Ok(sig) = set.wait() {
            if signals.send(Event::Signal(sig)).is_err() {
                break;
            }
        }
    });
    let mut reader = Channel::new(stream).map_err(|e| crate::error::EngineError::Failed(e.to_string()))?;
    std::thread::spawn(move || loop {
        let msg = reader.recv::<ToTask>().unwrap_or(None);
        let end = msg.is_none();
        if tx.send(Event::Message(msg)).is_err() || end {
            break;
        }
    });

    for event in rx {
        match event {
            Event::Signal(Signal::SIGTERM) => channel.send(&ToAgent::Terminate)?,
            Event::Signal(sig) => channel.send(&ToAgent::Signal(sig as i32))?,
            Event::Message(Some(ToTask::Exited(code))) => return Ok(code),
            Event::Message(Some(ToTask::Stopped)) => return Ok(128 + libc::SIGTERM),
            Event::Message(Some(ToTask::Failed(_))) => return Ok(1),
            Event::Message(Some(ToTask::RunUnprotected(why))) => {
                // Said by the user's own process: root never writes to a
                // descriptor of hers that might not be read.
                say(&why);
                return Err(exec_unprotected(&argv, Some(&env), set));
            }
            Event::Message(Some(ToTask::Go)) => {}
            Event::Message(None) => break,
        }
    }
    fail("the node's checkpoint agent ended unexpectedly")
}
