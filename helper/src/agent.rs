//! `checkpoint-container agent`: root's side of one `--checkpoint-container`
//! task, started by the plugin from slurmstepd (root) for that task alone.
//!
//! It serves exactly one client — the task process Slurm forked, proven by
//! the socket's peer credentials (uid and pid) — and then:
//! - on the first run, starts the task's container root-started for the
//!   user (policy.rs decides what is allowed), in the task's cgroups;
//! - on a requeued run (SLURM_RESTART_COUNT > 0) with a checkpoint of the
//!   same step, task and command, restores it instead (falling back to a
//!   fresh start, with the reason in the job's stderr, if that fails);
//! - when the task gets SIGTERM, asks slurmctld whether the job is being
//!   requeued (its restart count went up) and if so checkpoints the
//!   container; otherwise (scancel) passes the SIGTERM on;
//! - when the container ends on its own, the job is finished for good with
//!   this task: its checkpoint is removed.

use crate::checkpoint::{dump, CheckpointRequest};
use crate::error::{fail, Context, Result};
use crate::launch::{self, Launch, SYSTEM_PATH};
use crate::manifest::JobIds;
use crate::procfs::{self, Pid};
use crate::protocol::{self, Channel, ToAgent, ToTask};
use crate::runtime::ContainerCommand;
use crate::step::{self, Barrier, StepTask};
use crate::storage::Staging;
use crate::task_view::TaskView;
use crate::user::User;
use crate::{cgroup, listing, namespaces, storage};
use ckpt_config::{ContainerNetwork, Settings};
use std::fs::File;
use std::io::{BufRead, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const ACCEPT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a restore waits for a staged checkpoint another node is moving
/// into checkpoint_dir.
const MOVE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long appending a line to the job's output file may take.
const TELL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a checkpointed container may take to exit before the task ends.
const CONTAINER_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Task {
    pub socket: PathBuf,
    pub job_id: u32,
    pub step_id: u32,
    pub task_id: u32,
    /// Tasks in the step, and the nodes it spans.
    pub step_tasks: u32,
    pub step_nodes: u32,
    pub uid: u32,
    pub gid: u32,
    pub restart_count: u32,
    /// The task process the plugin saw forked: the only accepted client.
    pub task_pid: Pid,
}

impl Task {
    fn name(&self) -> String {
        format!("task {} of step {}.{}", self.task_id, self.job_id, self.step_id)
    }

    fn step(&self) -> StepTask {
        StepTask { step_id: self.step_id, task_id: self.task_id, tasks: self.step_tasks }
    }
}

/// `<checkpoint_dir>/<job>`: created by root, private. A directory there that
/// root did not create (a user may be able to write to checkpoint_dir) is
/// refused rather than used.
pub fn job_dir(settings: &Settings, job_id: u32) -> Result<PathBuf> {
    storage::trusted_dir(&settings.checkpoint_dir, Some(0o755))?;
    let dir = settings.checkpoint_dir.join(job_id.to_string());
    // Private from its creation: another task's agent on this node may
    // check it before the chmod below (created 0755, it was refused as not
    // ours, and that task's agent failed).
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).context(|| format!("cannot chmod {}", dir.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return fail(format!("cannot create {}: {e}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(&dir).context(|| format!("{}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return fail(format!("{} was not created by the checkpoint agent: refusing to use it", dir.display()));
    }
    Ok(dir)
}

fn task_checkpoint_dir(settings: &Settings, t: &Task) -> Result<PathBuf> {
    Ok(job_dir(settings, t.job_id)?.join(format!("step{}.task{}", t.step_id, t.task_id)))
}

/// Removes the checkpoints of jobs that are over for good: the user
/// cancelled a requeued job before it ran again, or the agent that would
/// have cleaned up never ran. A job slurmctld still knows as pending,
/// running or requeued keeps its checkpoints; if slurmctld cannot be asked,
/// nothing is removed. Returns the job ids removed.
pub fn collect_garbage(settings: &Settings) -> Vec<u32> {
    if storage::trusted_dir(&settings.checkpoint_dir, None).is_err() {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir(&settings.checkpoint_dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let Some(job) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let path = entry.path();
        // Only directories the agent made (root, private) are ever removed.
        let ours = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir() && m.uid() == 0 && m.mode() & 0o077 == 0);
        if ours && job_is_over(job) && std::fs::remove_dir_all(&path).is_ok() {
            listing::forget_job(settings, job);
            removed.push(job);
        }
    }
    removed
}

/// What `scontrol show job` says of a job, stdout and stderr together
/// (empty when scontrol cannot be run).
fn show_job(job: u32) -> String {
    let out = Command::new("scontrol").args(["-o", "show", "job", &job.to_string()]).env_clear().env("PATH", SYSTEM_PATH).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)).unwrap_or_default()
}

/// The `key=value` fields of `scontrol show job` output.
fn job_fields(text: &str) -> std::collections::HashMap<String, String> {
    text.split_whitespace().filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect()
}

/// Whether slurmctld says the job will not run again.
fn job_is_over(job: u32) -> bool {
    let text = show_job(job);
    if text.contains("Invalid job id") {
        return true;
    }
    let fields = job_fields(&text);
    let state = fields.get("JobState").map(String::as_str).unwrap_or("");
    matches!(state, "COMPLETED" | "CANCELLED" | "FAILED" | "TIMEOUT" | "OUT_OF_MEMORY" | "DEADLINE" | "BOOT_FAIL" | "NODE_FAIL")
}

/// Removes the task's checkpoint, and the job's directory once it is empty.
fn forget_checkpoint(settings: &Settings, t: &Task) {
    listing::forget(settings, t.uid, t.gid, t.job_id, Some((t.step_id, t.task_id)));
    let job = settings.checkpoint_dir.join(t.job_id.to_string());
    let _ = std::fs::remove_dir_all(job.join(format!("step{}.task{}", t.step_id, t.task_id)));
    let _ = std::fs::remove_dir(job);
}

/// `scontrol show job` fields of the task's job.
fn job_info(t: &Task) -> std::collections::HashMap<String, String> {
    job_fields(&show_job(t.job_id))
}

/// Whether the job is being requeued. `scontrol requeue` counts the restart
/// before the task gets its SIGTERM; a preemption marks the job with a
/// PreemptTime first and requeues it (if it may be requeued) when the grace
/// time is over. scancel does neither.
fn is_requeue(t: &Task, info: &std::collections::HashMap<String, String>) -> bool {
    let restarted = info.get("Restarts").and_then(|v| v.parse::<u32>().ok()).is_some_and(|r| r > t.restart_count);
    let preempted = info.get("PreemptTime").is_some_and(|v| !matches!(v.as_str(), "None" | "Unknown" | ""))
        && info.get("Requeue").map(String::as_str) == Some("1");
    restarted || preempted
}

/// The job's fields once a SIGTERM arrived. When srun forwards the SIGTERM
/// of a preemption, the task can get it before slurmctld has counted the
/// requeue: ask again for a few seconds before taking it for a scancel.
fn requeue_info(t: &Task) -> std::collections::HashMap<String, String> {
    const SETTLE: Duration = Duration::from_secs(5);
    let deadline = Instant::now() + SETTLE;
    loop {
        let info = job_info(t);
        if is_requeue(t, &info) || Instant::now() > deadline {
            return info;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A line for the user while the job is being requeued: srun's I/O is being
/// torn down then, so a batch job gets it appended to its stderr file (by
/// the user, with the user's rights); other jobs on the task's stderr.
fn tell_requeued_job(user: &User, info: &std::collections::HashMap<String, String>, stderr: &mut File, msg: &str) {
    // StdErr is empty when stderr goes where stdout goes.
    let file = info.get("StdErr").filter(|p| !p.is_empty()).or_else(|| info.get("StdOut"));
    if let (Some("1"), Some(path)) = (info.get("BatchFlag").map(String::as_str), file) {
        let child = user.command("/usr/bin/tee").arg("-a").arg(path).stdin(Stdio::piped()).spawn();
        if let Ok(mut child) = child {
            let _ = writeln!(child.stdin.take().unwrap(), "checkpoint-container: {msg}");
            // The path is the user's: a FIFO or a FUSE file could hold tee
            // (and this agent) forever.
            if procfs::wait_or_kill(&mut child, TELL_TIMEOUT).ok().flatten().is_some_and(|s| s.success()) {
                return;
            }
        }
    }
    tell_user(stderr, msg);
}

/// A line in the job's stderr.
fn tell_user(stderr: &mut File, msg: &str) {
    let _ = writeln!(stderr, "checkpoint-container: {msg}");
}

/// The process to dump: the user's program, the first process below
/// `child` that lives in another mount namespace (Apptainer's runtime parent
/// stays in the node's).
fn find_payload(child: Pid) -> Option<Pid> {
    let own = procfs::ns_inode(std::process::id() as Pid, "mnt").ok()?;
    procfs::tree(child)
        .ok()?
        .into_iter()
        .find(|&p| procfs::ns_inode(p, "mnt").map(|n| n != own).unwrap_or(false) && procfs::ids(p).map(|(u, _)| u != 0).unwrap_or(false))
}

struct Running {
    child: Child,
    /// Held from the spawn: the waiting thread reaps the child, after which
    /// its bare pid could name any process.
    child_fd: procfs::PidFd,
    /// The user's program, once known.
    payload: Option<procfs::PidFd>,
    /// What the restore that started it said, for the user.
    restored: Option<String>,
}

impl Running {
    fn new(child: Child, payload: Option<Pid>, uid: u32) -> Result<Running> {
        let child_fd = procfs::PidFd::open(child.id() as Pid).context(|| "pidfd of the container".into())?;
        let mut r = Running { child, child_fd, payload: None, restored: None };
        r.payload = payload.and_then(|p| checked_payload(p, uid));
        Ok(r)
    }

    fn payload(&mut self, uid: u32) -> Option<&procfs::PidFd> {
        if self.payload.is_none() {
            self.payload = find_payload(self.child.id() as Pid).and_then(|p| checked_payload(p, uid));
        }
        self.payload.as_ref()
    }

    fn signal_payload(&mut self, uid: u32, sig: i32) {
        if let Some(p) = self.payload(uid) {
            let _ = p.signal(sig);
        }
    }

    fn kill(&mut self, uid: u32) {
        self.signal_payload(uid, libc::SIGKILL);
        let _ = self.child_fd.signal(libc::SIGKILL);
    }
}

/// A pidfd of `pid` if, once held, it is still the user's process in a
/// container (not a process that took a recycled pid).
fn checked_payload(pid: Pid, uid: u32) -> Option<procfs::PidFd> {
    let fd = procfs::PidFd::of_user(pid, uid)?;
    let own = procfs::ns_inode(std::process::id() as Pid, "mnt").ok()?;
    procfs::ns_inode(pid, "mnt").is_ok_and(|n| n != own).then_some(fd)
}

/// How the agent starts a program for the task.
// One value per start, on the stack: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Start<'a> {
    /// The restore command, which makes the container's namespaces itself.
    Restore { status_fd: OwnedFd },
    /// A container: under our init, in namespaces of its own, with the
    /// task's groups, limits, umask and CPU affinity (`view`), and the
    /// descriptors Slurm gave the task beyond stdio (at their numbers).
    Container { network: ContainerNetwork, view: TaskView, slurm_fds: &'a [(RawFd, OwnedFd)] },
}

/// Spawns `argv` as root for the task, in its cgroups, with its stdio, in
/// `/` (what the container sees as its working directory is an Apptainer
/// option, never a path root resolves).
fn spawn_for_task(
    argv: &[String],
    stdio: &[OwnedFd; 3],
    cgroups: Vec<std::ffi::CString>,
    env: &[(String, String)],
    how: &Start,
) -> Result<Child> {
    let argv = match how {
        Start::Container { network, .. } => {
            let helper = std::env::current_exe().context(|| "own path".into())?.to_string_lossy().into_owned();
            namespaces::init_argv(&helper, *network, None, argv)
        }
        Start::Restore { .. } => argv.to_vec(),
    };
    // Further descriptors the child gets, each at the number given; what
    // it takes from the task (the restore itself is root's and keeps root's
    // settings).
    let (extra, view): (Vec<(RawFd, RawFd)>, _) = match how {
        Start::Restore { status_fd } => (vec![(3, status_fd.as_raw_fd())], None),
        Start::Container { view, slurm_fds, .. } => (slurm_fds.iter().map(|(n, fd)| (*n, fd.as_raw_fd())).collect(), Some(view.clone())),
    };
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear().envs(env.iter().cloned()).current_dir("/");
    let fd = |i: usize| stdio[i].try_clone().map(Stdio::from);
    cmd.stdin(fd(0).context(|| "dup".into())?).stdout(fd(1).context(|| "dup".into())?).stderr(fd(2).context(|| "dup".into())?);
    // SAFETY: allocation-free calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            cgroup::join_in_child(&cgroups)?;
            // Out of the way first (close-on-exec copies), so that no target
            // number overwrites another's source.
            let mut moved = [-1; 8];
            for (i, (_, from)) in extra.iter().enumerate().take(moved.len()) {
                moved[i] = libc::fcntl(*from, libc::F_DUPFD_CLOEXEC, 100);
                if moved[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, (to, _)) in extra.iter().enumerate().take(moved.len()) {
                if libc::dup2(moved[i], *to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            view.as_ref().map_or(Ok(()), TaskView::apply_in_child)
        });
    }
    match how {
        Start::Container { network, .. } => namespaces::spawn_init(&mut cmd, *network),
        Start::Restore { .. } => cmd.spawn(),
    }
    .context(|| format!("cannot start {}", argv[0]))
}

/// Restores the task's checkpoint through `checkpoint-container restore`
/// (so the restored tree has a parent of its own in the task's cgroups;
/// it re-creates the container from the manifest through the same policy
/// as a fresh start). Returns None, after telling the user why, when there
/// is nothing usable.
fn try_restore(
    settings_args: &[String],
    t: &Task,
    task: &procfs::PidFd,
    dir: &Path,
    argv: &[String],
    stdio: &[OwnedFd; 3],
    stderr: &mut File,
) -> Result<Option<Running>> {
    if let Some(from) = storage::wait_for_move(dir, MOVE_TIMEOUT) {
        log::info!("{}: waited for the checkpoint staged on {from}", t.name());
    }
    let m = match storage::open_checkpoint(dir, false) {
        Ok(m) => m,
        Err(e) => {
            let why = if dir.exists() { e.to_string() } else { "no checkpoint was taken when the job was requeued".into() };
            tell_user(stderr, &format!("{} starts fresh: {why}", t.name()));
            return Ok(None);
        }
    };
    if m.container.argv != argv {
        tell_user(stderr, &format!("{} starts fresh: its command differs from the checkpointed one", t.name()));
        return Ok(None);
    }
    let (status_r, status_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context(|| "pipe".into())?;
    let helper = std::env::current_exe().context(|| "own path".into())?.to_string_lossy().into_owned();
    let mut restore_argv = vec![helper];
    restore_argv.extend_from_slice(settings_args);
    restore_argv.extend(["restore", "--images"].map(String::from));
    restore_argv.push(dir.to_string_lossy().into_owned());
    restore_argv.extend(["--uid".into(), t.uid.to_string(), "--job-id".into(), t.job_id.to_string(), "--status-fd".into(), "3".into()]);
    let cgroups = task_cgroups(t, task)?;
    let how = Start::Restore { status_fd: status_w };
    let child = spawn_for_task(&restore_argv, stdio, cgroups, &[("PATH".into(), SYSTEM_PATH.into())], &how)?;
    drop(how);
    // "restored PID LINE": the program's pid on the node, and the line for
    // the user (told once its step goes on).
    let mut line = String::new();
    let _ = std::io::BufReader::new(File::from(status_r).take(4096)).read_line(&mut line);
    if let Some(rest) = line.trim().strip_prefix("restored ") {
        let (pid, said) = rest.split_once(' ').unwrap_or((rest, ""));
        let pid = pid.parse::<Pid>().ok().filter(|&p| p > 0);
        // CRIU leaves the restored program its own CPU affinity; this
        // run's task is bound where this run's allocation is.
        match TaskView::read(task).and_then(|v| v.bind_restored(child.id() as Pid, t.uid)) {
            Ok(n) => log::info!("{}: {n} restored processes bound to the task's CPUs", t.name()),
            Err(e) => log::warn!("{}: restored processes keep CRIU's CPU affinity: {e}", t.name()),
        }
        let mut running = Running::new(child, pid, t.uid)?;
        running.restored = Some(said.to_string()).filter(|s| !s.is_empty());
        return Ok(Some(running));
    }
    // The restore command has told the user why; start fresh.
    let mut child = child;
    let _ = child.wait();
    tell_user(stderr, &format!("{} starts fresh after the failed restore", t.name()));
    Ok(None)
}

/// The task's cgroups, read while its pidfd proves the pid is still the task.
fn task_cgroups(t: &Task, task: &procfs::PidFd) -> Result<Vec<std::ffi::CString>> {
    let files = cgroup::procs_files(t.task_pid).context(|| "task cgroups".into())?;
    task.signal(0).context(|| format!("{}: the task has ended", t.name()))?;
    Ok(files)
}

enum Event {
    Message(Option<ToAgent>),
    Exited(i32),
}

pub fn run(settings: &Settings, settings_args: &[String], t: &Task) -> Result<()> {
    let socket = &t.socket;
    if let Some(dir) = socket.parent() {
        // Users must reach their task's socket in it: 0755.
        storage::trusted_dir(dir, Some(0o755))?;
    }
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).context(|| format!("cannot listen on {}", socket.display()))?;
    nix::unistd::chown(socket, Some(t.uid.into()), Some(t.gid.into())).context(|| "chown socket".into())?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).context(|| "chmod socket".into())?;

    // One client, soon, or nobody.
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
    let _ = std::fs::remove_file(socket);
    stream.set_nonblocking(false).context(|| "socket".into())?;
    let cred = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials).context(|| "peer credentials".into())?;
    if cred.uid() != t.uid || cred.pid() != t.task_pid {
        return fail(format!(
            "{}: refused a client with uid {} pid {} (expected the task, pid {})",
            t.name(),
            cred.uid(),
            cred.pid(),
            t.task_pid
        ));
    }
    // Held from here: the task's cgroups are read from /proc/<pid> later
    // (a restore may first wait minutes), and that pid must still be it.
    let task = procfs::PidFd::open(t.task_pid).context(|| "pidfd of the task".into())?;
    let protocol::TaskFds { stdio, extra: slurm_fds } = protocol::recv_task_fds(&stream)?;
    // Every new task also sweeps what finished jobs left behind.
    for job in collect_garbage(settings) {
        log::info!("{}: removed the checkpoints of job {job}, which is over", t.name());
    }
    let mut stderr = File::from(stdio[2].try_clone().context(|| "dup".into())?);
    let mut channel = Channel::new(stream.try_clone().context(|| "dup".into())?)?;
    let Some(ToAgent::Start { argv, cwd, env, runtime }) = channel.recv()? else {
        return fail(format!("{}: the task did not say what to run", t.name()));
    };
    if argv.is_empty() {
        return fail(format!("{}: the task sent an empty command", t.name()));
    }

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
        // The ranks of an `srun --mpi=pmi2` step live in one container each
        // and share memory and connections across containers, which one
        // CRIU per container cannot dump; mpirun inside one container can.
        _ if t.step().is_coupled() && !slurm_fds.is_empty() => fail(format!(
            "its {} MPI ranks run in separate containers (srun --mpi=pmi2), which cannot be checkpointed together; \
             to protect an MPI program, start it with mpirun inside one container (srun -n1 … apptainer exec IMAGE mpirun -np N …)",
            t.step_tasks
        )),
        Some(r) if launch::is_site_runtime(settings, r) => {
            task_checkpoint_dir(settings, t).and_then(|ckpt| Ok((ckpt, launch::prepare(settings, &user, &request, None)?)))
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
            tell_user(&mut stderr, &msg);
            channel.send(&ToTask::RunUnprotected(msg))?;
            return Ok(());
        }
    };
    let restored = if t.restart_count == 0 {
        None
    } else if t.step().is_coupled() {
        restore_step(settings, settings_args, t, &task, &ckpt, &argv, &stdio, &mut stderr)?
    } else {
        try_restore(settings_args, t, &task, &ckpt, &argv, &stdio, &mut stderr)?
    };
    let mut running = match restored {
        Some(r) => {
            r.restored.iter().for_each(|line| tell_user(&mut stderr, line));
            r
        }
        None => {
            let cgroups = task_cgroups(t, &task)?;
            // The task's groups (the view sets them), not the node's lookup.
            let view = TaskView::read(&task).context(|| format!("{}: the task's settings", t.name()))?;
            let how = Start::Container { network: settings.container_network, view, slurm_fds: &slurm_fds };
            let child = spawn_for_task(&launched.argv, &stdio, cgroups, &launched.env, &how)?;
            Running::new(child, None, t.uid)?
        }
    };

    // One line per step, from its first task: what is protected, truly.
    if t.task_id == 0 {
        let criu = crate::criu::check(&settings.criu).map(|v| format!(" (CRIU {v})")).unwrap_or_default();
        tell_user(
            &mut stderr,
            &format!(
                "step {}.{} is protected{criu}: its containers are checkpointed if the job is preempted or requeued",
                t.job_id, t.step_id
            ),
        );
    }
    // Hash the container image now, while nothing waits for it: the
    // checkpoint then finds the digest in the node's cache.
    {
        let image = launched.image.clone();
        std::thread::spawn(move || storage::image_digest(&image));
    }
    let (tx, rx) = mpsc::channel();
    let messages = tx.clone();
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
                channel.send(&ToTask::Exited(code))?;
                return Ok(());
            }
            Event::Message(Some(ToAgent::Signal(sig))) => {
                if nix::sys::signal::Signal::try_from(sig).is_ok() {
                    running.signal_payload(t.uid, sig);
                }
            }
            Event::Message(Some(ToAgent::Terminate)) => {
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
                tell_requeued_job(&user, &info, &mut stderr, &msg);
                // Let Apptainer finish going away first: slurmstepd waits a
                // whole second more for anything left in the step's cgroups.
                let deadline = Instant::now() + CONTAINER_EXIT_TIMEOUT;
                while let Ok(event) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    if matches!(event, Event::Exited(_)) {
                        break;
                    }
                }
                channel.send(&ToTask::Stopped)?;
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
                            tell_requeued_job(&user, &info, &mut stderr, &msg);
                        }
                    }
                }
                return Ok(());
            }
            Event::Message(Some(ToAgent::Start { .. })) => {}
            Event::Message(None) => {
                // The task is gone (killed): so is its container.
                running.kill(t.uid);
                return Ok(());
            }
        }
    }
    Ok(())
}

/// What the user asked for and how root started it: the manifest records
/// the request (a restore re-checks it), the checkpoint reads the image
/// through the launch's staged path.
struct StartedAs<'a> {
    argv: &'a [String],
    cwd: &'a str,
    env: &'a [(String, String)],
    launch: &'a Launch,
}

/// Checkpoints the task's container; returns the line for the user, and a
/// staged checkpoint still to be moved into place (announced to restores)
/// with its manifest.
fn checkpoint_for_requeue(
    settings: &Settings,
    t: &Task,
    running: &mut Running,
    started: &StartedAs,
    ckpt: &Path,
) -> (String, Option<(Staging, crate::manifest::Manifest)>) {
    let Some(pid) = running.payload(t.uid).map(|p| p.pid) else {
        return (format!("{}: no running container to checkpoint", t.name()), None);
    };
    let request = CheckpointRequest {
        pid,
        target: ckpt.to_path_buf(),
        container: match ContainerCommand::parse(started.argv.to_vec()) {
            Ok(c) => c,
            Err(e) => return (e.to_string(), None),
        },
        image: started.launch.image.clone(),
        image_name: started.launch.image_name.clone(),
        job: JobIds {
            job_id: Some(t.job_id),
            step_id: Some(t.step_id),
            task_id: Some(t.task_id),
            step_tasks: Some(t.step_tasks),
            cut: Some(t.restart_count),
        },
        expected_uid: Some(t.uid),
        leave_running: false,
        started_in: Some((started.cwd.to_string(), started.env.to_vec())),
    };
    let sealed = dump(settings, &request).and_then(|(m, sealed)| {
        if !sealed.staged() {
            sealed.commit()?;
            list_checkpoint(settings, t, &m, "complete");
            return Ok((m, None));
        }
        sealed.announce_move()?;
        list_checkpoint(settings, t, &m, "moving");
        Ok((m, Some(sealed)))
    });
    match sealed {
        Ok((m, to_move)) => (
            format!(
                "checkpointed {} ({:.1} MiB in {:.2} s); it resumes from here when the job runs again",
                t.name(),
                m.stats.images_bytes as f64 / 1048576.0,
                m.stats.dump_seconds
            ),
            to_move.map(|staged| (staged, m)),
        ),
        Err(e) => {
            running.kill(t.uid);
            let from = if ckpt.exists() { "from its previous checkpoint" } else { "from the start" };
            (format!("checkpoint of {} failed: {e}; it will run again {from}", t.name()), None)
        }
    }
}

/// For a step of several tasks: stops this task's container and waits until
/// every task of the step has stopped its own (step.rs), so that all are
/// dumped at one cut. A single task goes straight on.
fn stop_step(settings: &Settings, t: &Task, running: &mut Running) -> std::result::Result<(), String> {
    if !t.step().is_coupled() {
        return Ok(());
    }
    let barrier = Barrier::new(&job_dir(settings, t.job_id).map_err(|e| e.to_string())?, t.step(), &format!("stop-{}", t.restart_count))
        .map_err(|e| e.to_string())?;
    let mine = match running.payload(t.uid).map(|p| p.pid) {
        Some(pid) => step::stop_tree(pid).map(|_| ()).map_err(|e| format!("could not be stopped: {e}")),
        None => Err("has no running container".into()),
    };
    barrier.meet(mine, step::STOP_BARRIER_TIMEOUT)
}

/// Whether every task of the step has a complete checkpoint of one cut.
fn step_checkpoints_agree(settings: &Settings, t: &Task) -> std::result::Result<(), String> {
    let job = job_dir(settings, t.job_id).map_err(|e| e.to_string())?;
    let mut cut = None;
    for task in 0..t.step_tasks {
        let dir = job.join(format!("step{}.task{task}", t.step_id));
        let _ = storage::wait_for_move(&dir, MOVE_TIMEOUT);
        let m = storage::open_checkpoint(&dir, false).map_err(|_| format!("finds no complete checkpoint of task {task}"))?;
        if m.job.step_tasks != Some(t.step_tasks) {
            return Err(format!("finds the checkpoint of task {task} taken with another number of tasks"));
        }
        match cut {
            None => cut = Some(m.job.cut),
            Some(c) if c != m.job.cut => return Err(format!("finds the checkpoint of task {task} taken at another time than task 0's")),
            Some(_) => {}
        }
    }
    Ok(())
}

/// Restores a task of a step of several tasks: only if every task has a
/// checkpoint of one cut, and then all together or none (step.rs). The
/// restored processes are stopped (they were dumped stopped) until every
/// task is restored.
#[allow(clippy::too_many_arguments)]
fn restore_step(
    settings: &Settings,
    settings_args: &[String],
    t: &Task,
    task: &procfs::PidFd,
    ckpt: &Path,
    argv: &[String],
    stdio: &[OwnedFd; 3],
    stderr: &mut File,
) -> Result<Option<Running>> {
    let barrier = Barrier::new(&job_dir(settings, t.job_id)?, t.step(), &format!("restore-{}", t.restart_count))?;
    let checked = step_checkpoints_agree(settings, t);
    let mut restored = None;
    let mine = match checked {
        Ok(()) => match try_restore(settings_args, t, task, ckpt, argv, stdio, stderr)? {
            Some(r) => {
                restored = Some(r);
                Ok(())
            }
            None => Err("could not be restored".into()),
        },
        Err(why) => Err(why),
    };
    match barrier.meet(mine, step::RESTORE_BARRIER_TIMEOUT) {
        Ok(()) => {
            let mut running = restored.expect("a step goes on only when every task was restored");
            if let Some(root) = running.payload(t.uid).map(|p| p.pid) {
                step::continue_tree(root);
            }
            Ok(Some(running))
        }
        Err(why) => {
            if let Some(mut running) = restored {
                running.kill(t.uid);
                let _ = running.child.wait();
            }
            if t.task_id == 0 {
                tell_user(stderr, &format!("step {}.{} starts fresh: {why}", t.job_id, t.step_id));
            }
            Ok(None)
        }
    }
}

/// Leaves the user an entry for the checkpoint just written (listing.rs);
/// a failure costs her only the entry.
fn list_checkpoint(settings: &Settings, t: &Task, m: &crate::manifest::Manifest, state: &str) {
    let entry = listing::Entry {
        job: t.job_id,
        step: t.step_id,
        task: t.task_id,
        node: m.node.clone(),
        created_unix: m.created_unix,
        bytes: m.stats.images_bytes,
        state: state.into(),
    };
    if let Err(e) = listing::record(settings, t.uid, t.gid, &entry) {
        log::warn!("{}: no list entry for the checkpoint: {e}", t.name());
    }
}
