//! Starting a program for the task as root: in its cgroups, with its
//! stdio, under our init in namespaces of its own; and finding the
//! payload (the user's program) in what was started.

use super::*;
use crate::error::{Context, Result};
use crate::procfs::{self, Pid};
use crate::task_view::TaskView;
use crate::{cgroup, namespaces, sys};
use ckpt_config::ContainerNetwork;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

/// The process to dump: the user's program, the first process below
/// `child` that lives in another mount namespace (Apptainer's runtime parent
/// stays in the node's).
pub(super) fn find_payload(child: Pid) -> Option<Pid> {
    let own = procfs::ns_inode(std::process::id() as Pid, "mnt").ok()?;
    procfs::tree(child)
        .ok()?
        .into_iter()
        .find(|&p| procfs::ns_inode(p, "mnt").map(|n| n != own).unwrap_or(false) && procfs::ids(p).map(|(u, _)| u != 0).unwrap_or(false))
}

pub(super) struct Running {
    pub(super) child: Child,
    /// Held from the spawn: the waiting thread reaps the child, after which
    /// its bare pid could name any process.
    pub(super) child_fd: procfs::PidFd,
    /// The user's program, once known.
    pub(super) payload: Option<procfs::PidFd>,
    /// What the restore that started it said, for the user.
    pub(super) restored: Option<String>,
    /// Its ends of Slurm's PMI-2 relays: the task's, when it has that
    /// socket; one per rank for a step's ranks in one container (ranks.rs).
    pub(super) slurm_pmi: Vec<crate::pmi::Flowing>,
    /// A step's ranks in one container (ranks.rs): the launcher's status.
    pub(super) launcher_status: Option<LauncherStatus>,
}

/// The ranks launcher's status pipe (read end, and its key in a
/// checkpoint), and each rank's stdio as a checkpoint names it.
pub(super) struct LauncherStatus {
    pub(super) pipe: std::fs::File,
    pub(super) key: String,
    pub(super) stdio_keys: Vec<Vec<String>>,
}

impl Drop for Running {
    /// The container is over for this agent: its PMI relay too, even if the
    /// container's end of it lives on elsewhere.
    fn drop(&mut self) {
        self.slurm_pmi.iter().for_each(crate::pmi::Flowing::stop);
    }
}

impl Running {
    pub(super) fn new(child: Child, payload: Option<Pid>, uid: u32) -> Result<Running> {
        let child_fd = procfs::PidFd::open(child.id() as Pid).context(|| "pidfd of the container".into())?;
        let mut r = Running { child, child_fd, payload: None, restored: None, slurm_pmi: vec![], launcher_status: None };
        r.payload = payload.and_then(|p| checked_payload(p, uid));
        Ok(r)
    }

    pub(super) fn payload(&mut self, uid: u32) -> Option<&procfs::PidFd> {
        if self.payload.is_none() {
            self.payload = find_payload(self.child.id() as Pid).and_then(|p| checked_payload(p, uid));
        }
        self.payload.as_ref()
    }

    pub(super) fn signal_payload(&mut self, uid: u32, sig: i32) {
        if let Some(p) = self.payload(uid) {
            let _ = p.signal(sig);
        }
    }

    pub(super) fn kill(&mut self, uid: u32) {
        self.signal_payload(uid, libc::SIGKILL);
        let _ = self.child_fd.signal(libc::SIGKILL);
    }
}

/// A pidfd of `pid` if, once held, it is still the user's process in a
/// container (not a process that took a recycled pid).
pub(super) fn checked_payload(pid: Pid, uid: u32) -> Option<procfs::PidFd> {
    let fd = procfs::PidFd::of_user(pid, uid)?;
    let own = procfs::ns_inode(std::process::id() as Pid, "mnt").ok()?;
    procfs::ns_inode(pid, "mnt").is_ok_and(|n| n != own).then_some(fd)
}

/// Where the restore command gets its status pipe, the PMI relay's end
/// and the network namespace that end was made in.
pub(super) const RESTORE_STATUS_FD: RawFd = 3;
pub(super) const RESTORE_PMI_FD: RawFd = 4;
pub(super) const RESTORE_NET_NS_FD: RawFd = 5;

/// How the agent starts a program for the task.
// One value per start, on the stack: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub(super) enum Start<'a> {
    /// The restore command, which makes the container's namespaces itself;
    /// its status fd at 3, and `fds` at their numbers: the PMI relay's end
    /// at 4 (pmi.rs) and the network namespace that end was made in at 5,
    /// or a ranks launcher's (restore::rank_fds).
    Restore { status_fd: OwnedFd, fds: Vec<(RawFd, OwnedFd)> },
    /// A container: under our init, in namespaces of its own, with the
    /// task's groups, limits, umask and CPU affinity (`view`), and the
    /// descriptors Slurm gave the task beyond stdio (at their numbers).
    Container { network: ContainerNetwork, net_ns: Option<&'a std::fs::File>, view: TaskView, slurm_fds: &'a [(RawFd, OwnedFd)] },
}

/// Spawns `argv` as root for the task, in its cgroups, with its stdio, in
/// `/` (what the container sees as its working directory is an Apptainer
/// option, never a path root resolves).
pub(super) fn spawn_for_task(
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
        Start::Restore { status_fd, fds } => {
            let mut given = vec![(RESTORE_STATUS_FD, status_fd.as_raw_fd())];
            given.extend(fds.iter().map(|(n, fd)| (*n, fd.as_raw_fd())));
            (given, None)
        }
        Start::Container { view, slurm_fds, .. } => (slurm_fds.iter().map(|(n, fd)| (*n, fd.as_raw_fd())).collect(), Some(view.clone())),
    };
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear().envs(env.iter().cloned()).current_dir("/");
    let fd = |i: usize| stdio[i].try_clone().map(Stdio::from);
    cmd.stdin(fd(0).context(|| "dup".into())?).stdout(fd(1).context(|| "dup".into())?).stderr(fd(2).context(|| "dup".into())?);
    // Allocated before the fork: nothing between fork and exec allocates.
    let pairs: Vec<(RawFd, RawFd)> = extra.iter().map(|(to, from)| (*from, *to)).collect();
    let mut scratch = vec![-1; pairs.len()];
    // SAFETY: between fork and exec: async-signal-safe functions of
    // crate::sys only (join_in_child and apply_in_child are made of them).
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            cgroup::join_in_child(&cgroups)?;
            sys::place_fds(&pairs, &mut scratch)?;
            view.as_ref().map_or(Ok(()), TaskView::apply_in_child)
        });
    }
    match how {
        Start::Container { net_ns, .. } => namespaces::spawn_init(&mut cmd, *net_ns),
        Start::Restore { .. } => cmd.spawn(),
    }
    .context(|| format!("cannot start {}", argv[0]))
}

/// The cgroups of the task (or of the process below it that started the
/// container), read while its pidfd proves the pid is still that process.
pub(super) fn task_cgroups(t: &Task, task: &procfs::PidFd) -> Result<Vec<std::ffi::CString>> {
    let files = cgroup::procs_files(task.pid).context(|| "task cgroups".into())?;
    task.signal(0).context(|| format!("{}: the task has ended", t.name()))?;
    Ok(files)
}
