//! The task session: accept the task process; start or restore its
//! container, or serve the containers its processes start
//! (descendants.rs); serve each one's messages and signals until it ends.

use super::layout::{forget_checkpoint, list_checkpoint, task_checkpoint_dir};
use super::messages::{tell_requeued_job, tell_user};
use super::periodic::Timer;
use super::ranks;
use super::requeue::{checkpoint_for_requeue, go_on_restored, restore_step, stop_step, try_restore, StartedAs};
use super::session_file::SessionFile;
use super::slurmctld::{is_requeue, requeue_info};
use super::spawn::{spawn_for_task, task_cgroups, Running, Start};
use super::time_limit;
use super::*;
use crate::error::{fail, Context, Result};
use crate::launch::{self, Launch};
use crate::procfs;
use crate::protocol::{self, Channel, ToAgent, ToTask};
use crate::storage;
use crate::task_view::TaskView;
use crate::user::User;
use ckpt_config::Settings;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

pub(super) enum Event {
    Message(Option<ToAgent>),
    Exited(i32),
    /// Time for a periodic checkpoint (periodic.rs).
    Periodic,
}

pub fn run(settings: &Settings, settings_args: &[String], t: &Task) -> Result<()> {
    let socket = &t.socket;
    for dir in [socket, &t.session_file].iter().filter_map(|p| p.parent()) {
        // Users must reach their task's socket in it: 0755.
        storage::trusted_dir(dir, Some(0o755))?;
    }
    let session = SessionFile::hold(&t.session_file).map(Arc::new);
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).context(|| format!("cannot listen on {}", socket.display()))?;
    nix::unistd::chown(socket, Some(t.uid.into()), Some(t.gid.into())).context(|| "chown socket".into())?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).context(|| "chmod socket".into())?;

    // The task first, soon, or nobody.
    listener.set_nonblocking(true).context(|| "socket".into())?;
    let deadline = Instant::now() + ACCEPT_TIMEOUT;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                let _ = std::fs::remove_file(socket);
                return fail(format!("{}: the task never connected: {e}", t.name()));
            }
        }
    };
    stream.set_nonblocking(false).context(|| "socket".into())?;
    let peer = protocol::peer_of_user(&stream, t.uid).and_then(|pid| match pid == t.task_pid {
        true => Ok(pid),
        false => Err(format!("refused pid {pid} of uid {}", t.uid)),
    });
    if let Err(why) = peer {
        let _ = std::fs::remove_file(socket);
        return fail(format!("{}: {why} (expected the task, pid {})", t.name(), t.task_pid));
    }
    // Held from here: the task's cgroups are read from /proc/<pid> later
    // (a restore may first wait minutes), and that pid must still be it.
    let task = procfs::PidFd::open(t.task_pid).context(|| "pidfd of the task".into())?;
    let fds = protocol::recv_task_fds(&stream)?;
    // Every new task also sweeps what finished jobs left behind.
    for job in collect_garbage(settings) {
        log::info!("{}: removed the checkpoints of job {job}, which is over", t.name());
    }
    let mut channel = Channel::new(stream.try_clone().context(|| "dup".into())?)?;
    match channel.recv()? {
        Some(ToAgent::Start { argv, cwd, env, runtime }) if !t.watch => {
            let _ = std::fs::remove_file(socket);
            let start = Started { argv, cwd, env, runtime };
            let client = Client { stream, channel, process: task, fds };
            let mut stderr = client.stderr()?;
            let restore = if t.restart_count == 0 { Restore::No } else { Restore::IfThere };
            let container = Container { restore, session, time_limit: &Once::new() };
            serve(settings, settings_args, t, client, start, container, &mut stderr, mpsc::channel())
        }
        Some(ToAgent::Watch { argv }) if t.watch => {
            channel.send(&ToTask::Go)?;
            let watched = Watched { listener, task, stdio: fds.stdio, argv };
            super::descendants::serve_descendants(settings, settings_args, t, watched, session)
        }
        _ => {
            let _ = std::fs::remove_file(socket);
            let expected = if t.watch { "its command's containers to be served" } else { "a container to start" };
            fail(format!("{}: the task did not ask for {expected}, as the plugin said it would", t.name()))
        }
    }
}

/// A task that is no container: what the agent keeps of it to serve the
/// containers its processes start (descendants.rs).
pub(super) struct Watched {
    pub(super) listener: UnixListener,
    pub(super) task: procfs::PidFd,
    pub(super) stdio: [std::os::fd::OwnedFd; 3],
    pub(super) argv: Vec<String>,
}

/// The process that handed the agent a container: the task, or a process
/// below it (the runtime shim), held by pidfd; what it sent.
pub(super) struct Client {
    pub(super) stream: UnixStream,
    pub(super) channel: Channel,
    pub(super) process: procfs::PidFd,
    pub(super) fds: protocol::TaskFds,
}

impl Client {
    /// Its stderr, for lines to the user.
    pub(super) fn stderr(&self) -> Result<File> {
        Ok(File::from(self.fds.stdio[2].try_clone().context(|| "dup".into())?))
    }
}

/// The container command as the client sent it.
pub(super) struct Started {
    pub(super) argv: Vec<String>,
    pub(super) cwd: String,
    pub(super) env: Vec<(String, String)>,
    pub(super) runtime: Option<String>,
}

/// How the agent serves one container.
pub(super) struct Container<'a> {
    pub(super) restore: Restore,
    /// Shared by the task's containers: says when one is being ended.
    pub(super) session: Option<Arc<SessionFile>>,
    /// Once per task: the watch of the job's time limit starts with the
    /// first container that is protected.
    pub(super) time_limit: &'a Once,
}

/// Whether to look for a checkpoint to restore.
pub(super) enum Restore {
    No,
    /// A requeued run: restore the checkpoint if there is one.
    IfThere,
}

/// Starts or restores one container and serves it until it ends, or until
/// it is checkpointed or ended at Slurm's SIGTERM. `events` are the
/// container's: the caller may keep a sender to tell it the task ended.
#[allow(clippy::too_many_arguments)]
pub(super) fn serve(
    settings: &Settings,
    settings_args: &[String],
    t: &Task,
    client: Client,
    start: Started,
    Container { restore, session, time_limit }: Container,
    stderr: &mut File,
    (tx, rx): (mpsc::Sender<Event>, mpsc::Receiver<Event>),
) -> Result<()> {
    let Client { stream, mut channel, process: task, fds } = client;
    let protocol::TaskFds { stdio, extra: mut slurm_fds } = fds;
    let Started { argv, cwd, env, runtime } = start;
    if argv.is_empty() {
        return fail(format!("{}: the task sent an empty command", t.name()));
    }
    // Root writes into the task's stdout and stderr (lines for the user, a
    // restored program's output): only into what a task's may be.
    let plain_output = protocol::plain_output(&stdio);
    // The ranks of an `srun --mpi=pmi2 -n N` step run in one container,
    // which task 0's agent starts (ranks.rs).
    let one_container = ranks::in_one_container(t, !slurm_fds.is_empty());
    let cpus = || TaskView::read(&task).map(|v| v.cpus()).unwrap_or_default();
    if one_container && t.task_id != 0 {
        let pmi = slurm_fds.swap_remove(0);
        let follower = ranks::FollowerTask { channel, stream, stdio, pmi, argv, cwd, env, runtime, cpus: cpus(), plain_output };
        return ranks::follow(t, follower, session, stderr);
    }
    let gathered = one_container.then(|| {
        let own = ranks::Own { argv: &argv, cwd: &cwd, env: &env, stdio: &stdio, pmi: &slurm_fds[0], cpus: cpus() };
        ranks::gather(t, own, |r| launch::is_site_runtime(settings, r))
    });
    let (mut gathered, not_gathered) = match gathered {
        Some(Ok(g)) => (Some(g), None),
        Some(Err(why)) => (None, Some(why)),
        None => (None, None),
    };
    let launcher_args = gathered.as_ref().map(ranks::Gathered::launcher_args);
    let payload = match &launcher_args {
        Some(args) => launch::Payload::Ranks(args),
        None => launch::Payload::Program,
    };
    // What Slurm gives beyond stdio is its PMI-2 socket (task.rs sends only that).
    let slurm_pmi = slurm_fds.first();

    // Root starts the container only through the site's Apptainer and the
    // launch policy; anything else runs as the user would run it without
    // the option, and the user is told so.
    let user = User::lookup(t.uid, t.gid)?;
    let request = launch::Request { argv: &argv, cwd: &cwd, env: &env };
    let launched = match runtime.as_deref() {
        // Each task is checkpointed in its own container, and connections
        // between nodes are not: a step that spans nodes could only be
        // restored with its ranks out of step.
        _ if t.step_nodes > 1 => fail(format!(
            "the step spans {} nodes, and connections between nodes cannot be checkpointed (run one step per node to protect it)",
            t.step_nodes
        )),
        // The containers a script's processes start for the ranks of an
        // `srun --mpi=pmi2` step are one per rank and share memory and
        // connections, which one CRIU per container cannot dump (a step
        // whose tasks are the containers runs its ranks in one: ranks.rs).
        _ if plain_output.is_err() => fail(plain_output.clone().err().unwrap_or_default()),
        _ if not_gathered.is_some() => fail(not_gathered.clone().unwrap_or_default()),
        _ if t.step().is_coupled() && !slurm_fds.is_empty() && !one_container => fail(format!(
            "its {} MPI ranks run in separate containers started by a script, which cannot be checkpointed together; \
             to protect an MPI program, let srun start the container itself (srun --mpi=pmi2 … apptainer exec IMAGE PROGRAM: \
             its ranks then share one) or start mpirun inside one container",
            t.step_tasks
        )),
        // Root relays the PMI socket (pmi.rs), for a fresh start and a
        // restore alike: it must be this step's slurmstepd's.
        _ if slurm_pmi.is_some_and(|(_, fd)| crate::pmi::check_slurm_socket(fd, t.stepd_pid).is_err()) => {
            fail("PMI_FD names no socket of this step's slurmstepd")
        }
        Some(r) if launch::is_site_runtime(settings, r) => {
            task_checkpoint_dir(settings, t).and_then(|ckpt| Ok((ckpt, launch::prepare(settings, &user, &request, payload)?)))
        }
        _ => fail(format!(
            "{} is not the site's Apptainer ({}): only containers started with it are checkpointed",
            argv[0],
            settings.apptainer.display()
        )),
    };
    let (ckpt, launched): (PathBuf, Launch) = match launched {
        Ok(l) => l,
        Err(e) => {
            let msg = format!("{} runs unprotected: {e}", t.name());
            log::warn!("{msg}");
            if let Some(g) = gathered.as_mut() {
                g.unprotected(&format!("task 0: {e}"));
            }
            channel.send(&ToTask::RunUnprotected(msg))?;
            return Ok(());
        }
    };
    let t = &Task { ranks_in_one_container: gathered.is_some(), ..t.clone() };
    let restored = match restore {
        Restore::No => None,
        Restore::IfThere if t.cut_across_agents() => restore_step(settings, settings_args, t, &task, &ckpt, &argv, &stdio, stderr)?,
        Restore::IfThere => {
            try_restore(settings_args, t, &task, &ckpt, &argv, &stdio, slurm_pmi.map(|(_, fd)| fd), gathered.as_ref(), stderr)?.map(
                |mut r| {
                    go_on_restored(t, &mut r);
                    r
                },
            )
        }
    };
    let mut running = match restored {
        Some(r) => {
            r.restored.iter().for_each(|line| tell_user(stderr, line));
            r
        }
        None => {
            let cgroups = task_cgroups(t, &task)?;
            // The task's groups (the view sets them), not the node's lookup.
            let view = TaskView::read(&task).context(|| format!("{}: the task's settings", t.name()))?;
            let net_ns = crate::namespaces::net_ns_for(settings.container_network).context(|| "network namespace".into())?;
            // Slurm's PMI socket (each rank's) reaches the container through a relay.
            let sockets: Vec<&(std::os::fd::RawFd, std::os::fd::OwnedFd)> = match &gathered {
                Some(g) => g.ranks.iter().map(|r| &r.pmi).collect(),
                None => slurm_pmi.into_iter().collect(),
            };
            let relays =
                sockets.iter().map(|(_, fd)| crate::pmi::Relay::new(fd, None, net_ns.as_ref())).collect::<std::io::Result<Vec<_>>>();
            let relays = relays.context(|| "PMI relay".into())?;
            let ends = crate::pmi::Relay::container_ends(&relays).context(|| "dup".into())?;
            let mut launcher_status = None;
            let (given, view) = match &gathered {
                Some(g) => {
                    let (given, status) = g.launcher_fds(t.uid, ends, false)?;
                    launcher_status = Some(status);
                    let cpus = g.all_cpus();
                    (given, if cpus.is_empty() { view } else { view.on_cpus(&cpus) })
                }
                None => (sockets.iter().map(|(n, _)| *n).zip(ends).collect(), view),
            };
            let how = Start::Container { network: settings.container_network, net_ns: net_ns.as_ref(), view, slurm_fds: &given };
            let child = spawn_for_task(&launched.argv, &stdio, cgroups, &launched.env, &how)?;
            drop(how);
            drop(given);
            let mut running = Running::new(child, None, t.uid)?;
            running.launcher_status = launcher_status;
            running.slurm_pmi = relays.into_iter().map(|r| r.go(false)).collect::<std::io::Result<_>>().context(|| "PMI relay".into())?;
            running
        }
    };

    // One line per step, from its first task, or per container the task's
    // processes start: what is protected, truly.
    let criu = || crate::criu::check(&settings.criu).map(|v| format!(" (CRIU {v})")).unwrap_or_default();
    let every = Timer::interval_text(settings, t).unwrap_or_default();
    let step = ckpt_config::step_name(t.job_id, t.step_id);
    match t.container {
        None if t.task_id == 0 => tell_user(
            stderr,
            &format!("step {step} is protected{}: its containers are checkpointed {every}if the job is preempted or requeued", criu()),
        ),
        None => {}
        Some(_) => tell_user(
            stderr,
            &format!(
                "`{}` in step {step} is protected{}: it is checkpointed {every}if the job is preempted or requeued",
                shown_command(&argv),
                criu()
            ),
        ),
    }
    time_limit.call_once(|| time_limit::watch(settings, t, &user, stderr));
    // Hash the container image now, while nothing waits for it: the
    // checkpoint then finds the digest in the node's cache.
    {
        let image = launched.image.clone();
        std::thread::spawn(move || storage::image_digest(&image));
    }
    let messages = tx.clone();
    let timer = Timer::start(settings, t, tx.clone(), stderr);
    // Once the task got SIGTERM (scancel, or a requeue being served).
    let mut told_to_end = false;
    let mut reader = Channel::new(stream).context(|| "socket".into())?;
    std::thread::spawn(move || loop {
        let msg = reader.recv::<ToAgent>().unwrap_or(None);
        let end = msg.is_none();
        if messages.send(Event::Message(msg)).is_err() || end {
            break;
        }
    });
    let child_pid = running.child.id() as i32;
    std::thread::spawn(move || {
        // Reap only this child; the main thread keeps its pidfd for kill().
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child_pid), None);
        let code = match status {
            Ok(nix::sys::wait::WaitStatus::Exited(_, c)) => c,
            Ok(nix::sys::wait::WaitStatus::Signaled(_, s, _)) => 128 + s as i32,
            _ => 1,
        };
        let _ = tx.send(Event::Exited(code));
    });

    for event in rx.iter() {
        match event {
            Event::Exited(code) => {
                // The program ended by itself (or by a passed-on signal): the
                // job is done with this task, for good.
                forget_checkpoint(settings, t);
                let code = match gathered.as_mut() {
                    Some(g) => g.exited(running.launcher_status.take().map(|s| s.pipe), code),
                    None => code,
                };
                channel.send(&ToTask::Exited(code))?;
                return Ok(());
            }
            Event::Message(Some(ToAgent::Signal(sig))) => {
                if nix::sys::signal::Signal::try_from(sig).is_ok() {
                    running.signal_payload(t.uid, sig);
                }
            }
            Event::Message(Some(ToAgent::Terminate)) => {
                // Said once: a second SIGTERM changes nothing.
                if !told_to_end {
                    if let Some(s) = session.as_ref() {
                        s.ending();
                    }
                }
                told_to_end = true;
                let info = requeue_info(t);
                if !is_requeue(t, &info) {
                    // scancel or the end of the time limit: the program gets
                    // the SIGTERM the task got; its exit ends the task.
                    running.signal_payload(t.uid, libc::SIGTERM);
                    continue;
                }
                let started = StartedAs { argv: &argv, cwd: &cwd, env: &env, launch: &launched };
                let (msg, to_move) = match stop_step(settings, t, &mut running) {
                    Ok(()) => checkpoint_for_requeue(settings, t, &mut running, &started, &ckpt),
                    Err(why) => {
                        running.kill(t.uid);
                        let from = if ckpt.exists() { "from its previous checkpoint" } else { "from the start" };
                        (format!("step {}.{} was not checkpointed: {why}; it will run again {from}", t.job_id, t.step_id), None)
                    }
                };
                log::info!("{}: {msg}", t.name());
                tell_requeued_job(&user, &info, stderr, &msg);
                // Let Apptainer finish going away first: slurmstepd waits a
                // whole second more for anything left in the step's cgroups.
                let deadline = Instant::now() + CONTAINER_EXIT_TIMEOUT;
                while let Ok(event) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    if matches!(event, Event::Exited(_)) {
                        break;
                    }
                }
                // The container is dumped or gone: root's copy of
                // slurmstepd's PMI socket goes before the task ends.
                running.slurm_pmi.drain(..).for_each(|p| p.stop());
                if let Some(g) = gathered.as_mut() {
                    g.stopped();
                }
                channel.send(&ToTask::Stopped)?;
                // The task ends: its output is through. The batch step must
                // not wait for the move below (security.md, principle 6).
                drop(session);
                // A staged checkpoint goes to checkpoint_dir now, while the
                // node is already free for whatever preempted the job.
                if let Some((staged, moved)) = to_move {
                    let started = Instant::now();
                    match staged.commit() {
                        Ok(()) => {
                            list_checkpoint(settings, t, &moved, "complete");
                            log::info!("{}: checkpoint moved to {} in {:.2} s", t.name(), ckpt.display(), started.elapsed().as_secs_f64())
                        }
                        Err(e) => {
                            let msg = format!("checkpoint of {} could not be moved to {}: {e}", t.name(), ckpt.display());
                            log::warn!("{}: {msg}", t.name());
                            tell_requeued_job(&user, &info, stderr, &msg);
                        }
                    }
                }
                return Ok(());
            }
            Event::Periodic => {
                // Not once the task was told to end (scancel): the program
                // is ending, and the checkpoint would be removed with it.
                if let Some(timer) = timer.as_ref().filter(|_| !told_to_end) {
                    let started = StartedAs { argv: &argv, cwd: &cwd, env: &env, launch: &launched };
                    timer.tick(settings, t, &mut running, &started, &ckpt, stderr);
                }
            }
            Event::Message(Some(ToAgent::Start { .. } | ToAgent::Watch { .. })) => {}
            Event::Message(None) => {
                // The task is gone (killed): so is its container.
                running.kill(t.uid);
                if let Some(g) = gathered.as_mut() {
                    g.failed("task 0 was killed, and with it the container of the step's ranks");
                }
                return Ok(());
            }
        }
    }
    Ok(())
}

/// A container command as the user sees it in a line: its words, shortened.
pub(super) fn shown_command(argv: &[String]) -> String {
    let line = argv.join(" ");
    match line.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line,
    }
}
