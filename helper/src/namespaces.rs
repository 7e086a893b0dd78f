//! The namespaces a protected container runs in.
//!
//! Every container root starts (a first start, and restore's placeholder)
//! gets a PID namespace of its own, so the pids a checkpoint needs are free
//! on any node at restore, and, unless the site says `container_network =
//! node`, a network namespace with only loopback up, so TCP between its
//! processes is checkpointed without touching the node's network.
//!
//! PID 1 there is `checkpoint-container container-init` ([`run_init`]), the
//! node's root-owned helper, never the user's program: it makes the
//! namespace's session, its /proc, brings loopback up, reserves the pids a
//! restore needs, runs the site's Apptainer, reaps, forwards signals, and
//! exits with Apptainer's status. When it ends, the kernel kills whatever is
//! left in the namespace: nothing of the container can outlive it.

use crate::error::{fail, Context, Result};
use crate::procfs::Pid;
use ckpt_config::ContainerNetwork;
use std::fs::File;
use std::io;
use std::process::{Child, Command};

/// The hidden subcommand that is the container's PID 1.
pub const INIT_SUBCOMMAND: &str = "container-init";

/// Signals PID 1 passes on to Apptainer, which passes them to the container
/// (what `kill` of the container's top process meant before it had an
/// init). SIGKILL cannot be caught: it ends the init, and with it the
/// whole namespace.
const FORWARDED: &[nix::sys::signal::Signal] = {
    use nix::sys::signal::Signal::*;
    &[SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM, SIGWINCH, SIGCONT]
};

/// `helper container-init … -- apptainer…`: what root runs instead of
/// `apptainer` itself. `last_pid`: every pid up to it stays free in the
/// namespace (restore's placeholder; CRIU then gives them back).
pub fn init_argv(helper: &str, network: ContainerNetwork, last_pid: Option<Pid>, apptainer: &[String]) -> Vec<String> {
    let mut argv = vec![helper.to_string(), INIT_SUBCOMMAND.into()];
    if network == ContainerNetwork::Isolated {
        argv.push("--loopback".into());
    }
    if let Some(n) = last_pid {
        argv.extend(["--last-pid".into(), n.to_string()]);
    }
    argv.push("--".into());
    argv.extend(apptainer.iter().cloned());
    argv
}

/// A new network namespace for a container, held by fd: made before the
/// container starts, so that a socket it is given can be made in it
/// (pmi.rs), where CRIU, which runs in it, finds it.
pub fn new_net_ns() -> io::Result<File> {
    in_thread(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        File::open("/proc/thread-self/ns/net")
    })
}

/// Runs `f` in network namespace `ns`.
pub fn in_net_ns<T: Send>(ns: &File, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    use std::os::fd::AsRawFd;
    let fd = ns.as_raw_fd();
    in_thread(move || {
        crate::sys::setns(fd, libc::CLONE_NEWNET)?;
        f()
    })
}

/// Runs `f` in a thread of its own: unshare and setns of a network or PID
/// namespace change only the calling thread's (its children's, for PID),
/// never the caller's.
fn in_thread<T: Send>(f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|s| s.spawn(f).join().unwrap_or_else(|_| Err(io::Error::other("the spawning thread panicked"))))
}

/// Spawns `cmd` as PID 1 of a new PID namespace, in network namespace `net`
/// ([`new_net_ns`]; None: the node's).
pub fn spawn_init(cmd: &mut Command, net: Option<&File>) -> io::Result<Child> {
    use std::os::fd::AsRawFd;
    let net = net.map(|f| f.as_raw_fd());
    in_thread(|| {
        if let Some(fd) = net {
            crate::sys::setns(fd, libc::CLONE_NEWNET)?;
        }
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)?;
        cmd.spawn()
    })
}

/// A network namespace of its own for a container when `network` says so.
pub fn net_ns_for(network: ContainerNetwork) -> io::Result<Option<File>> {
    (network == ContainerNetwork::Isolated).then(new_net_ns).transpose()
}

/// Spawns `cmd` in the PID namespace `pid_ns` (an open /proc/PID/ns/pid),
/// or in ours when None: setns(CLONE_NEWPID) only moves the children of the
/// thread that calls it, so a thread of its own does.
pub fn spawn_in_pid_ns(cmd: &mut Command, pid_ns: Option<&File>) -> io::Result<Child> {
    use std::os::fd::AsRawFd;
    let Some(ns) = pid_ns else { return cmd.spawn() };
    let fd = ns.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(|| {
            crate::sys::setns(fd, libc::CLONE_NEWPID)?;
            cmd.spawn()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the spawning thread panicked")))
    })
}

/// Brings the namespace's `lo` up (its only interface).
fn loopback_up() -> io::Result<()> {
    crate::sys::set_loopback_up()
}

/// The namespace's own /proc, in a mount namespace of the init's (a slave
/// of the one it was started in, so nothing propagates back): Apptainer
/// finds its processes by their pids in /proc, and shows the container this
/// /proc; CRIU, which runs in the container's PID namespace, reads it.
fn own_proc() -> Result<()> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context(|| "cannot create a mount namespace".into())?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
        .context(|| "cannot make the mount namespace a slave".into())?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), "/proc", Some("proc"), flags, None::<&str>).context(|| "cannot mount the namespace's /proc".into())
}

/// `checkpoint-container container-init`: PID 1 of a container's PID
/// namespace. Returns the exit code to end with: Apptainer's (128 + the
/// signal if a signal ended it).
pub fn run_init(loopback: bool, last_pid: Option<Pid>, argv: &[String]) -> Result<i32> {
    use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    if std::process::id() != 1 {
        return fail("container-init must be the first process of a new PID namespace");
    }
    let Some(program) = argv.first() else { return fail("container-init: no command") };
    // The container's session leader must be inside its PID namespace:
    // CRIU refuses a tree whose session leader it cannot see.
    nix::unistd::setsid().context(|| "setsid".into())?;
    own_proc()?;
    if loopback {
        loopback_up().context(|| "cannot bring the loopback interface up".into())?;
    }
    if let Some(n) = last_pid {
        // Acts on the writer's PID namespace: this one.
        std::fs::write("/proc/sys/kernel/ns_last_pid", n.to_string())
            .context(|| format!("cannot reserve pids up to {n} (is it below /proc/sys/kernel/pid_max?)"))?;
    }
    let mut waited = SigSet::empty();
    waited.add(Signal::SIGCHLD);
    for &s in FORWARDED {
        waited.add(s);
    }
    // Blocked here and taken with sigwait; the child starts with the usual
    // mask (std resets it between fork and exec).
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&waited), None).context(|| "sigprocmask".into())?;
    let child = Command::new(program).args(&argv[1..]).spawn().context(|| format!("cannot start {program}"))?;
    let apptainer = nix::unistd::Pid::from_raw(child.id() as i32);
    loop {
        let sig = waited.wait().context(|| "sigwait".into())?;
        if sig != Signal::SIGCHLD {
            let _ = kill(apptainer, sig);
            continue;
        }
        // Everything orphaned in the namespace is ours to reap.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == apptainer => return Ok(code),
                Ok(WaitStatus::Signaled(pid, s, _)) if pid == apptainer => return Ok(128 + s as i32),
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

/// The namespaces of a process CRIU joins, each checked to be one only root
/// can have made: see [`crate::criu`] for why each matters.
pub struct Joined {
    pub mnt: File,
    /// None: the node's PID namespace (a container started by hand).
    pub pid: Option<File>,
    /// None: the node's network namespace (`container_network = node`, or
    /// a container started by hand).
    pub net: Option<File>,
}

const NS_GET_USERNS: libc::c_ulong = 0xb701;
const NS_GET_PARENT: libc::c_ulong = 0xb702;

/// The namespace `ioctl` (NS_GET_USERNS, NS_GET_PARENT) returns for `ns`.
fn related(ns: &File, request: libc::c_ulong) -> std::result::Result<u64, String> {
    use std::os::unix::fs::MetadataExt;
    let file = File::from(crate::sys::ns_ioctl_fd(ns, request).map_err(|e| e.to_string())?);
    file.metadata().map(|m| m.ino()).map_err(|e| e.to_string())
}

/// Opens the mount, PID and network namespaces of `pid` and checks them:
/// the mount namespace is another than ours, owned by our user namespace;
/// the PID namespace is ours or a child of ours owned by our user namespace
/// (the one a container-init made); the network namespace is ours or one
/// owned by our user namespace; and `pid` is still in all three once they
/// are open (the process is the user's and may switch at any time).
pub fn open_checked(pid: Pid) -> std::result::Result<Joined, String> {
    use std::os::unix::fs::MetadataExt;
    let ino = |p: String| std::fs::metadata(&p).map(|m| m.ino()).map_err(|e| format!("cannot read {p}: {e}"));
    let open = |ns: &str| File::open(format!("/proc/{pid}/ns/{ns}")).map_err(|e| format!("cannot open its {ns} namespace: {e}"));
    let (mnt, pid_ns, net) = (open("mnt")?, open("pid")?, open("net")?);
    let inode = |f: &File| f.metadata().map(|m| m.ino()).map_err(|e| e.to_string());
    let own_user = ino("/proc/self/ns/user".into())?;
    if inode(&mnt)? == ino("/proc/self/ns/mnt".into())? {
        return Err("it shares this node's mount namespace".into());
    }
    if related(&mnt, NS_GET_USERNS).map_err(|e| format!("cannot tell who owns its mount namespace: {e}"))? != own_user {
        return Err("its mount namespace belongs to a user namespace of its own".into());
    }
    let own_pid = ino("/proc/self/ns/pid".into())?;
    let pid_joined = if inode(&pid_ns)? == own_pid {
        None
    } else {
        let parent = related(&pid_ns, NS_GET_PARENT).map_err(|e| format!("cannot tell the parent of its PID namespace: {e}"))?;
        let owner = related(&pid_ns, NS_GET_USERNS).map_err(|e| format!("cannot tell who owns its PID namespace: {e}"))?;
        if parent != own_pid || owner != own_user {
            return Err("it runs in a PID namespace root did not make (Apptainer's --pid, --containall, or one of its own)".into());
        }
        Some(pid_ns)
    };
    let own_net = ino("/proc/self/ns/net".into())?;
    let net_joined = if inode(&net)? == own_net {
        None
    } else {
        if related(&net, NS_GET_USERNS).map_err(|e| format!("cannot tell who owns its network namespace: {e}"))? != own_user {
            return Err("its network namespace belongs to a user namespace of its own".into());
        }
        Some(net)
    };
    let expected = [
        ("mnt", inode(&mnt)?),
        ("pid", pid_joined.as_ref().map(inode).transpose()?.unwrap_or(own_pid)),
        ("net", net_joined.as_ref().map(inode).transpose()?.unwrap_or(own_net)),
    ];
    for (ns, want) in expected {
        if ino(format!("/proc/{pid}/ns/{ns}"))? != want {
            return Err("it changed namespaces while being checked".into());
        }
    }
    Ok(Joined { mnt, pid: pid_joined, net: net_joined })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_runs_apptainer_after_its_options() {
        let argv = init_argv("/h", ContainerNetwork::Isolated, Some(857), &["apptainer".into(), "exec".into()]);
        assert_eq!(argv, ["/h", "container-init", "--loopback", "--last-pid", "857", "--", "apptainer", "exec"]);
        let argv = init_argv("/h", ContainerNetwork::Node, None, &["apptainer".into()]);
        assert_eq!(argv, ["/h", "container-init", "--", "apptainer"]);
    }

    #[test]
    fn a_process_in_our_mount_namespace_is_refused() {
        let e = open_checked(std::process::id() as Pid).err().unwrap();
        assert!(e.contains("shares this node's mount namespace"), "{e}");
    }
}
