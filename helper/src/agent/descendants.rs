//! A task that is no container itself: a batch script, a wrapper script,
//! `bash -c …`. The task hands the agent its stdio and becomes its own
//! command (task.rs `watch`); the runtime shim first on its PATH (shim.rs)
//! hands the agent each container the task's processes start, and the
//! agent serves each like a task's own container (session.rs `serve`),
//! until the task ends.
//!
//! - **Who may hand over a container:** a process of the job's user that is
//!   the task or below it (its parent chain reaches the task), held by
//!   pidfd from the check on. The socket is the user's alone (0600); the
//!   chain keeps another job of hers on this node from putting a container
//!   in this job's place. Anyone else's request runs unprotected, and one
//!   line says why.
//! - **Which checkpoint is whose:** a requeued script runs again from its
//!   top. Each container takes the earliest checkpoint of this task, not yet
//!   taken in this run, whose command is its own (so a script that skips a
//!   finished container, `[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]`, still
//!   finds the next one's); a container with none starts fresh under a
//!   number of its own. A container that ended by itself has no checkpoint
//!   left: it runs again unless the script skips it.
//! - **The end:** when the task's process ends (the batch shell dies of
//!   Slurm's SIGTERM at once) every container still running is told to end,
//!   as a task's SIGTERM tells its own: checkpointed if the job is being
//!   requeued, else passed the SIGTERM. Containers that run at once are
//!   checkpointed each at its own moment, not at one cut.

use super::layout::job_dir;
use super::messages::tell_requeued_job;
use super::session::{serve, Client, Container, Event, Restore, Started, Watched};
use super::session_file::SessionFile;
use super::slurmctld::{is_requeue, job_info};
use super::*;
use crate::error::{Context, Result};
use crate::procfs::{self, PidFd};
use crate::protocol::{self, Channel, ToAgent, ToTask};
use crate::storage;
use crate::user::User;
use ckpt_config::Settings;
use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once};
use std::time::Duration;

/// How often the agent looks whether the task has ended while no
/// container is handed over.
const TASK_POLL_MS: i32 = 100;
/// The most containers served at once for one task.
const MAX_CLIENTS: usize = 64;
/// How long a client may take to send its descriptors and command, and
/// the agent to write to it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) fn serve_descendants(
    settings: &Settings,
    settings_args: &[String],
    t: &Task,
    watched: Watched,
    session: Option<Arc<SessionFile>>,
) -> Result<()> {
    let Watched { listener, task, stdio, argv } = watched;
    let mut t = t.clone();
    if t.step_id == ckpt_config::BATCH_STEP {
        // The batch step's environment has no SLURM_RESTART_COUNT when the
        // plugin starts its agent: slurmctld's count is this run's.
        if let Some(n) = job_info(&t).get("Restarts").and_then(|v| v.parse().ok()) {
            t.restart_count = n;
        }
    }
    let t = &t;
    // Lines for the user go to the script's stderr only if root may write there.
    let mut stderr = match crate::protocol::plain_output(&stdio) {
        Ok(()) => File::from(stdio[2].try_clone().context(|| "dup".into())?),
        Err(why) => {
            log::warn!("{}: says nothing to the job: {why}", t.name());
            File::options().write(true).open("/dev/null").context(|| "/dev/null".into())?
        }
    };
    let claims = Arc::new(Mutex::new(Claims::scan(settings, t)));
    log::info!(
        "{}: serves the containers of `{}` (run {}, checkpoints of containers {:?})",
        t.name(),
        argv.join(" "),
        t.restart_count,
        claims.lock().unwrap_or_else(|e| e.into_inner()).on_disk
    );
    let time_limit = Arc::new(Once::new());
    let task_cgroup = std::fs::read(procfs::proc_path(task.pid, "cgroup")).context(|| "the task's cgroups".into())?;
    let task_cgroup = Arc::new(task_cgroup);
    let task = Arc::new(task);
    let mut running: Vec<(std::thread::JoinHandle<()>, mpsc::Sender<Event>)> = Vec::new();
    let handed = Arc::new(AtomicU32::new(0));
    let mut waiting: Vec<Arc<Mutex<Option<UnixStream>>>> = Vec::new();
    loop {
        if task.wait_exit(0).unwrap_or(true) {
            break;
        }
        if !crate::sys::poll_one(&listener, libc::POLLIN, TASK_POLL_MS).unwrap_or(false) {
            continue;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: the connection stays pending, so
                // do not spin on it.
                log::warn!("{}: cannot accept a client: {e}", t.name());
                std::thread::sleep(Duration::from_millis(TASK_POLL_MS as u64));
                continue;
            }
        };
        running.retain(|(thread, _)| !thread.is_finished());
        waiting.retain(|w| w.lock().is_ok_and(|s| s.is_some()));
        if running.len() >= MAX_CLIENTS {
            // Its shim runs the container unprotected, and says why (a
            // fresh socket's buffer takes the line without waiting).
            let msg = format!("{} serves {MAX_CLIENTS} containers already: this one runs unprotected", t.name());
            log::warn!("{msg}");
            let _ = stream.set_nonblocking(true);
            if let Ok(mut channel) = Channel::new(stream) {
                let _ = channel.send(&ToTask::RunUnprotected(msg));
            }
            continue;
        }
        let (tx, rx) = mpsc::channel();
        let events = tx.clone();
        let (settings, settings_args, t) = (settings.clone(), settings_args.to_vec(), t.clone());
        let (claims, time_limit, session, handed) = (claims.clone(), time_limit.clone(), session.clone(), handed.clone());
        let (task, task_cgroup) = (task.clone(), task_cgroup.clone());
        // Until it has said what to run, shut down when the task ends: a
        // client that trickles its bytes holds nothing past the task.
        let pending = Arc::new(Mutex::new(stream.try_clone().ok()));
        waiting.push(pending.clone());
        let thread = std::thread::spawn(move || {
            let client = match admit(&t, &task, &task_cgroup, stream) {
                Ok(c) => c,
                Err(e) => return log::warn!("{}: {e}", t.name()),
            };
            let served = serve_one(&settings, &settings_args, &t, client, &claims, &time_limit, session, &handed, &pending, (tx, rx));
            if let Err(e) = served {
                log::warn!("{}: {e}", t.name());
            }
        });
        running.push((thread, events));
    }
    let _ = std::fs::remove_file(&t.socket);
    for pending in waiting {
        if let Some(stream) = pending.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
    // The task is gone: its containers end with it, checkpointed if this
    // is a requeue (each asks slurmctld, as for a task's SIGTERM).
    for (_, events) in &running {
        let _ = events.send(Event::Message(Some(ToAgent::Terminate)));
    }
    drop(session);
    if handed.load(Ordering::SeqCst) == 0 && t.step_id != ckpt_config::BATCH_STEP {
        // Truthful about what asked for protection and had none. A batch
        // script that starts no container says nothing: its steps speak.
        let info = job_info(t);
        if is_requeue(t, &info) {
            let msg = format!(
                "{} ran `{}`, which started no Apptainer container: it starts over when the job runs again",
                t.name(),
                super::session::shown_command(&argv)
            );
            log::info!("{msg}");
            tell_requeued_job(&User::lookup(t.uid, t.gid)?, &info, &mut stderr, &msg);
        }
    }
    for (thread, _) in running {
        let _ = thread.join();
    }
    Ok(())
}

/// A client that may hand over a container: the job's user, the task or a
/// process below it, in the task's cgroups, while the task lives. Anyone
/// else is told to run it unprotected, and why. Every read and write on
/// the connection is bounded until it has said what to run.
fn admit(t: &Task, task: &PidFd, task_cgroup: &[u8], stream: UnixStream) -> std::result::Result<Client, String> {
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(|e| e.to_string())?;
    // The socket is the user's (0600): only root gets past it otherwise.
    let pid = protocol::peer_of_user(&stream, t.uid)?;
    // Held first, then checked: a pid that ended and was reused before the
    // pidfd was opened fails the checks as another process.
    let process = PidFd::of_user(pid, t.uid).ok_or_else(|| format!("client pid {pid} is gone"))?;
    let fds = protocol::recv_task_fds(&stream).map_err(|e| e.to_string())?;
    let mut channel = Channel::new(stream.try_clone().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    // The parent chain is read pid by pid: the task still living and the
    // client in its cgroups (which only root moves processes between) make
    // a reused pid along the way no way in from another job.
    let ours = procfs::is_descendant(pid, task.pid)
        && task.wait_exit(0).is_ok_and(|ended| !ended)
        && std::fs::read(procfs::proc_path(pid, "cgroup")).is_ok_and(|c| c == task_cgroup)
        && process.signal(0).is_ok();
    if !ours {
        let msg = format!(
            "pid {} is not a process of {}: its container runs unprotected (the job's environment was carried elsewhere?)",
            pid,
            t.name()
        );
        let _ = channel.send(&ToTask::RunUnprotected(msg.clone()));
        return Err(msg);
    }
    Ok(Client { stream, channel, process, fds })
}

/// Reads what the client asks for, finds its checkpoint, and serves it.
#[allow(clippy::too_many_arguments)]
fn serve_one(
    settings: &Settings,
    settings_args: &[String],
    t: &Task,
    mut client: Client,
    claims: &Mutex<Claims>,
    time_limit: &Once,
    session: Option<Arc<SessionFile>>,
    handed: &AtomicU32,
    pending: &Mutex<Option<UnixStream>>,
    events: (mpsc::Sender<Event>, mpsc::Receiver<Event>),
) -> Result<()> {
    let Some(ToAgent::Start { argv, cwd, env, runtime }) = client.channel.recv()? else {
        return crate::error::fail(format!("{}: a client did not say what to run", t.name()));
    };
    // Said: from here the container is served, and ended with the task.
    pending.lock().unwrap_or_else(|e| e.into_inner()).take();
    handed.fetch_add(1, Ordering::SeqCst);
    // From here the container's own time: its messages come when they come.
    client.stream.set_read_timeout(None).context(|| "socket".into())?;
    let (n, restore) = Claims::claim(claims, settings, t, &argv);
    let mut t = Task { container: Some(n), ..t.clone() };
    let mut stderr = client.stderr()?;
    // A script sets the interval it asks for where it runs the container
    // (`export CHECKPOINT_CONTAINER_INTERVAL=…`), after its task started:
    // taken from the container's environment, a number only, as the plugin
    // takes a step's.
    match env.iter().find(|(k, _)| k == ckpt_config::INTERVAL_ENV).map(|(_, v)| ckpt_config::interval_request(v)) {
        Some(Ok(seconds)) => t.interval_request = Some(seconds),
        Some(Err(why)) => super::messages::tell_user(&mut stderr, &format!("warning: {why}")),
        None => {}
    }
    let container = Container { restore, session, time_limit };
    serve(settings, settings_args, &t, client, Started { argv, cwd, env, runtime }, container, &mut stderr, events)
}

/// The task's container numbers: the ones with a checkpoint (from earlier
/// runs), and those taken in this run.
struct Claims {
    /// Numbers with a checkpoint (or one on its way from another node).
    on_disk: BTreeSet<u32>,
    taken: BTreeSet<u32>,
}

impl Claims {
    fn scan(settings: &Settings, t: &Task) -> Claims {
        if t.restart_count == 0 {
            // A first run has none: what is there is another job's, under
            // the same id (a Slurm whose job ids started again), and is
            // replaced.
            return Claims { on_disk: BTreeSet::new(), taken: BTreeSet::new() };
        }
        let prefix = format!("{}.c", t.checkpoint_name());
        let on_disk = job_dir(settings, t.job_id)
            .ok()
            .and_then(|dir| std::fs::read_dir(dir).ok())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let rest = name.strip_prefix(&prefix)?;
                rest.strip_suffix(".moving").unwrap_or(rest).parse::<u32>().ok()
            })
            .collect();
        Claims { on_disk, taken: BTreeSet::new() }
    }

    /// The number of the container running `argv`, and whether it has a
    /// checkpoint to restore: the earliest one not yet taken whose command
    /// is the same; or a new number.
    fn claim(claims: &Mutex<Claims>, settings: &Settings, t: &Task, argv: &[String]) -> (u32, Restore) {
        let lock = || claims.lock().unwrap_or_else(|e| e.into_inner());
        let candidates: Vec<u32> = {
            let c = lock();
            c.on_disk.difference(&c.taken).copied().collect()
        };
        for n in candidates {
            let Ok(dir) = super::layout::task_checkpoint_dir(settings, &Task { container: Some(n), ..t.clone() }) else { continue };
            // Not under the lock: a checkpoint on its way from another
            // node holds up this container only.
            storage::wait_for_move(&dir, MOVE_TIMEOUT);
            match storage::open_checkpoint(&dir, false) {
                Ok(m) if m.container.argv == argv => {
                    if lock().taken.insert(n) {
                        return (n, Restore::IfThere);
                    }
                }
                Ok(_) => log::info!("{}: container {n}'s checkpoint is of another command", t.name()),
                Err(e) => log::info!("{}: container {n}'s checkpoint: {e}", t.name()),
            }
        }
        let mut c = lock();
        let n = c.on_disk.iter().chain(&c.taken).max().map_or(0, |m| m + 1);
        c.taken.insert(n);
        (n, Restore::No)
    }
}
