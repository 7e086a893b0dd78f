//! The helper's raw system calls: the one module with `unsafe` blocks (the
//! crate root denies `unsafe_code` everywhere else), each behind a small
//! safe function named for what it does. nix is used where it has a safe
//! wrapper; what is here is what it lacks or what must not allocate.
//!
//! "Async-signal-safe" below means: system calls only, no allocation, no
//! lock. Only such functions may run between fork and exec (the agent has
//! other threads, which may hold the allocator's lock at the fork). Errors
//! are `io::Error::last_os_error()`, which does not allocate either.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The calling thread's errno. Async-signal-safe.
pub fn errno() -> i32 {
    // SAFETY: errno is thread-local; reading it has no side effect.
    unsafe { *libc::__errno_location() }
}

// ---- Between fork and exec (all async-signal-safe) ----

/// setns(2): joins the namespace `fd` (an open /proc/PID/ns/*) of type
/// `nstype` (a CLONE_NEW* flag).
pub fn setns(fd: RawFd, nstype: libc::c_int) -> io::Result<()> {
    // SAFETY: a syscall on integers; a bad fd is an error, not UB.
    check(unsafe { libc::setns(fd, nstype) }).map(drop)
}

/// setsid(2): a new session led by the calling process.
pub fn setsid() -> io::Result<()> {
    // SAFETY: no arguments.
    check(unsafe { libc::setsid() }).map(drop)
}

/// Bytes a socket has received and not yet read (`SIOCINQ`), and bytes it
/// has sent that its peer has not yet read (`SIOCOUTQ`).
pub fn socket_queues(fd: RawFd) -> io::Result<(usize, usize)> {
    let (mut inq, mut outq): (libc::c_int, libc::c_int) = (0, 0);
    // SAFETY: ioctl(FIONREAD/TIOCOUTQ, = SIOCINQ/SIOCOUTQ) write one c_int
    // into the pointed-to local.
    check(unsafe { libc::ioctl(fd, libc::FIONREAD, &mut inq) })?;
    check(unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outq) })?;
    Ok((inq as usize, outq as usize))
}

/// A close-on-exec copy of `fd` at the lowest free number >= `min`.
pub fn dup_cloexec_above(fd: RawFd, min: RawFd) -> io::Result<RawFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on integers.
    check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) })
}

/// Puts each `(from, to)` descriptor at number `to`, inherited across
/// exec: all are first moved out of the way (close-on-exec copies above
/// every target and above 99), so that no target overwrites another's
/// source. `scratch` has one entry per pair, allocated before the fork.
/// Async-signal-safe.
///
/// Any other descriptor the child still uses after this (an fd it will
/// exec) must first be moved to [`above_targets`] or higher: a target may
/// land on its number.
pub fn place_fds(pairs: &[(RawFd, RawFd)], scratch: &mut [RawFd]) -> io::Result<()> {
    let above = above_targets(pairs);
    for ((from, _), moved) in pairs.iter().zip(scratch.iter_mut()) {
        *moved = dup_cloexec_above(*from, above)?;
    }
    for ((_, to), moved) in pairs.iter().zip(scratch.iter()) {
        dup2(*moved, *to)?;
    }
    Ok(())
}

/// The lowest number no target of `pairs` (and nothing below 100) uses.
pub fn above_targets(pairs: &[(RawFd, RawFd)]) -> RawFd {
    pairs.iter().map(|(_, to)| *to + 1).fold(100, RawFd::max)
}

/// A copy of `fd` (inherited across exec) at the lowest free number >= `min`.
pub fn dup_above(fd: RawFd, min: RawFd) -> io::Result<RawFd> {
    // SAFETY: fcntl(F_DUPFD) on integers.
    check(unsafe { libc::fcntl(fd, libc::F_DUPFD, min) })
}

/// dup2(2): `from` also at number `to` (whatever was there is closed).
pub fn dup2(from: RawFd, to: RawFd) -> io::Result<()> {
    // SAFETY: a syscall on integers. It may close a number some Rust object
    // owns: callers use it in forked children, on numbers they chose.
    check(unsafe { libc::dup2(from, to) }).map(drop)
}

/// Closes `fd`, which the caller owns and no object will close again.
pub fn close(fd: RawFd) {
    // SAFETY: a syscall on an integer.
    unsafe { libc::close(fd) };
}

/// close_range(2): closes every descriptor from `first` up. The caller
/// makes sure no object still owns one of them (a forked child about to
/// become someone else, or a daemon dropping what it inherited).
pub fn close_range_from(first: u32) -> io::Result<()> {
    // SAFETY: a syscall on integers.
    check(unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) } as libc::c_int).map(drop)
}

/// setgroups(2): the supplementary groups.
pub fn setgroups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: the pointer and length come from one live slice.
    check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) }).map(drop)
}

/// setresgid(2): real, effective and saved gid all `gid`.
pub fn setresgid(gid: libc::gid_t) -> io::Result<()> {
    // SAFETY: a syscall on integers.
    check(unsafe { libc::setresgid(gid, gid, gid) }).map(drop)
}

/// setresuid(2): real, effective and saved uid all `uid` (from root to
/// another uid this clears every capability, unless `keep_caps`).
pub fn setresuid(uid: libc::uid_t) -> io::Result<()> {
    // SAFETY: a syscall on integers.
    check(unsafe { libc::setresuid(uid, uid, uid) }).map(drop)
}

/// PR_SET_KEEPCAPS: the permitted capabilities survive the next setresuid.
pub fn keep_caps() -> io::Result<()> {
    // SAFETY: prctl on integers.
    check(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) }).map(drop)
}

/// PR_SET_DUMPABLE 0: not ptrace-able nor readable through /proc by the
/// process's (future) uid. Before the uid change, so that there is no
/// moment it is the user's and traceable.
pub fn set_not_dumpable() -> io::Result<()> {
    // SAFETY: prctl on integers.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) }).map(drop)
}

/// PR_SET_NO_NEW_PRIVS: no exec can grant privileges any more.
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: prctl on integers.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }).map(drop)
}

/// The limit of `resource` (a libc::RLIMIT_* as an index).
pub fn getrlimit(resource: usize) -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit(2) into a valid rlimit.
    check(unsafe { libc::getrlimit(resource as _, &mut limit) })?;
    Ok(limit)
}

pub fn setrlimit(resource: usize, limit: &libc::rlimit) -> io::Result<()> {
    // SAFETY: setrlimit(2) from a valid rlimit.
    check(unsafe { libc::setrlimit(resource as _, limit) }).map(drop)
}

pub fn umask(mask: libc::mode_t) {
    // SAFETY: a syscall on an integer; it cannot fail.
    unsafe { libc::umask(mask) };
}

/// The CPU affinity of `pid` (0: the calling thread).
pub fn sched_getaffinity(pid: libc::pid_t) -> io::Result<libc::cpu_set_t> {
    // SAFETY: a zeroed cpu_set_t is an empty set.
    let mut cpus: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity(2) into a set of the size given.
    check(unsafe { libc::sched_getaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &mut cpus) })?;
    Ok(cpus)
}

/// Binds thread `tid` (0: the calling thread) to `cpus`.
/// The CPUs in `set`, in order.
pub fn cpu_list(set: &libc::cpu_set_t) -> Vec<usize> {
    // SAFETY: CPU_ISSET reads the set within its size.
    (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, set) }).collect()
}

/// The set of `cpus` (those beyond CPU_SETSIZE left out).
pub fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET indexes the set
    // without a check, so only numbers below CPU_SETSIZE reach it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    set
}

pub fn sched_setaffinity(tid: libc::pid_t, cpus: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: sched_setaffinity(2) with a set of the size given.
    check(unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), cpus) }).map(drop)
}

/// Opens `path` write-only and writes `bytes` to it in one write(2) (a
/// cgroup's `cgroup.procs`, for instance).
pub fn write_file(path: &CStr, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: a NUL-terminated path.
    let fd = check(unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) })?;
    // SAFETY: the pointer and length come from one live slice.
    let rc = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    let err = io::Error::last_os_error();
    close(fd);
    if rc < 0 {
        return Err(err);
    }
    Ok(())
}

/// mkdir(2); an existing entry is not an error.
pub fn mkdir_if_missing(path: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::mkdir(path.as_ptr(), mode) } != 0 && errno() != libc::EEXIST {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// openat2(2) of an absolute path from the mount namespace's root, following
/// no symlink in any component (nor /proc magic links). The caller owns the
/// descriptor returned.
pub fn open_no_symlinks(path: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<RawFd> {
    // struct open_how of openat2(2) (libc's is non-exhaustive).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow { flags: flags as u64, mode: mode as u64, resolve: libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS };
    // SAFETY: a NUL-terminated path and an open_how of the size given.
    let fd =
        unsafe { libc::syscall(libc::SYS_openat2, libc::AT_FDCWD, path.as_ptr(), &how as *const OpenHow, std::mem::size_of::<OpenHow>()) };
    check(fd as libc::c_int)
}

pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: any bytes are a valid stat (plain integers).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat(2) into a valid stat.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

pub fn truncate_to_zero(fd: RawFd) -> io::Result<()> {
    // SAFETY: a syscall on integers.
    check(unsafe { libc::ftruncate(fd, 0) }).map(drop)
}

pub fn fchmod(fd: RawFd, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: a syscall on integers.
    check(unsafe { libc::fchmod(fd, mode) }).map(drop)
}

/// Changes the group of `fd`'s file only.
pub fn fchown_group(fd: RawFd, gid: libc::gid_t) -> io::Result<()> {
    // SAFETY: a syscall on integers (uid -1: unchanged).
    check(unsafe { libc::fchown(fd, u32::MAX, gid) }).map(drop)
}

/// read(2) into `buf`; 0 at end of file.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length come from one live mutable slice.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// write(2) of `buf`; how many bytes were written.
pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length come from one live slice.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// sendfile(2) of up to `count` bytes from `from`'s offset to `to`.
pub fn sendfile(to: RawFd, from: RawFd, count: usize) -> io::Result<usize> {
    // SAFETY: a syscall on integers (no offset pointer: the file's own).
    let n = unsafe { libc::sendfile(to, from, std::ptr::null_mut(), count) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Ends the calling (forked) process at once: no atexit handler, no flush
/// of buffers copied from the parent.
fn exit_now(code: i32) -> ! {
    // SAFETY: _exit(2) never returns and runs nothing of this process.
    unsafe { libc::_exit(code) }
}

/// argv and envp for `execveat_fd`: the strings and their NULL-terminated
/// pointer arrays, built before the fork (the child may not allocate).
pub struct ExecArgs {
    argv: Vec<CString>,
    envp: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
}

// SAFETY: the pointers point into the heap buffers of the CStrings held
// alongside (moving the struct moves no buffer), never changed or freed
// while it lives.
unsafe impl Send for ExecArgs {}
unsafe impl Sync for ExecArgs {}

impl ExecArgs {
    pub fn new(argv: Vec<CString>, envp: Vec<CString>) -> ExecArgs {
        let ptrs = |v: &[CString]| v.iter().map(|c| c.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        let (argv_ptrs, envp_ptrs) = (ptrs(&argv), ptrs(&envp));
        ExecArgs { argv, envp, argv_ptrs, envp_ptrs }
    }

    /// execveat(2) of the open binary `fd` itself (no path resolved);
    /// returns only on failure.
    pub fn execveat_fd(&self, fd: RawFd) -> io::Error {
        let _ = (&self.argv, &self.envp);
        // SAFETY: NULL-terminated arrays of pointers to the NUL-terminated
        // strings held by self, an empty path with AT_EMPTY_PATH.
        unsafe {
            libc::syscall(libc::SYS_execveat, fd, c"".as_ptr(), self.argv_ptrs.as_ptr(), self.envp_ptrs.as_ptr(), libc::AT_EMPTY_PATH)
        };
        io::Error::last_os_error()
    }
}

/// Makes `cmd`'s child take `uid`, `gid` and `groups` (all of them, real,
/// effective and saved) before it executes.
pub fn on_exec_become(cmd: &mut Command, uid: libc::uid_t, gid: libc::gid_t, groups: Vec<libc::gid_t>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook only calls async-signal-safe functions of this module
    // on a list built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            setgroups(&groups)?;
            setresgid(gid)?;
            setresuid(uid)
        });
    }
}

/// Makes `cmd`'s child take the supplementary `groups` before it executes.
pub fn on_exec_setgroups(cmd: &mut Command, groups: Vec<libc::gid_t>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: one async-signal-safe call on a list built before the fork.
    unsafe { cmd.pre_exec(move || setgroups(&groups)) };
}

/// Makes `cmd`'s child have `fd` at number `to` too before it executes
/// (`fd` must stay open until the spawn).
pub fn on_exec_dup2(cmd: &mut Command, fd: RawFd, to: RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: one async-signal-safe call on integers.
    unsafe { cmd.pre_exec(move || dup2(fd, to)) };
}

/// Forks; the child runs `body` and _exits with its result, the parent gets
/// the child's pid.
///
/// # Safety
/// `body` runs in the child of a multi-threaded process: it may only call
/// the async-signal-safe functions of this module (no allocation, no lock,
/// no drop of anything that frees memory).
pub unsafe fn fork_child(body: impl FnOnce() -> i32) -> io::Result<libc::pid_t> {
    match libc::fork() {
        -1 => Err(io::Error::last_os_error()),
        0 => exit_now(body()),
        pid => Ok(pid),
    }
}

// ---- Anywhere ----

/// Forks a daemon: the parent exits 0 at once, the child returns. Refused
/// unless this process has a single thread (the child goes on running any
/// Rust code, which would be unsound after forking a multi-threaded one).
pub fn fork_exit_parent() -> io::Result<()> {
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads != 1 {
        return Err(io::Error::other(format!("cannot fork a daemon from {threads} threads")));
    }
    // SAFETY: single-threaded (checked above): the child may run anything.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { .. } => std::process::exit(0),
        nix::unistd::ForkResult::Child => Ok(()),
    }
}

/// Takes ownership of descriptor `fd`, which our parent left open for us at
/// exec (a number given on the command line or agreed on). Call once per
/// number, before anything else could have opened or closed it.
pub fn take_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // F_GETFD: only an open descriptor is adopted.
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)?;
    // SAFETY: open (checked), and no object of this process owns it: it was
    // inherited, and the caller takes it once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// openat(2) (nix's), owned. `dir` None: relative to the working directory.
pub fn openat<P: ?Sized + nix::NixPath>(
    dir: Option<RawFd>,
    path: &P,
    flags: nix::fcntl::OFlag,
    mode: nix::sys::stat::Mode,
) -> nix::Result<OwnedFd> {
    let fd = nix::fcntl::openat(dir, path, flags, mode)?;
    // SAFETY: just returned by openat, owned here only.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// open(2) of `path` with `flags`, owned (no O_CREAT: no mode).
pub fn open(path: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated path.
    let fd = check(unsafe { libc::open(path.as_ptr(), flags) })?;
    // SAFETY: just returned by open, owned here only.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// recvmsg(2) of one message into `buf` with at most `N` descriptors
/// (SCM_RIGHTS, close-on-exec): its length and the descriptors, owned.
pub fn recv_with_fds<const N: usize>(sock: &impl AsRawFd, buf: &mut [u8]) -> nix::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; N]);
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(got) = c {
            // SAFETY: the kernel just installed these descriptors for us.
            fds.extend(got.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    Ok((msg.bytes, fds))
}

/// flock(2) LOCK_EX | LOCK_NB: false if another holder has it.
pub fn flock_exclusive_nonblocking(file: &impl AsRawFd) -> bool {
    // SAFETY: flock(2) on a descriptor the caller holds.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Starts writing back `len` bytes of `file` from `offset` (no wait; a
/// failure surfaces in a later fsync).
pub fn start_writeback(file: &impl AsRawFd, offset: u64, len: u64) {
    // SAFETY: a syscall on integers.
    unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE) };
}

/// Runs `f` with the calling thread's filesystem uid `uid` (files it
/// creates are `uid`'s, permissions are checked as `uid`), then root's again.
/// Other threads keep theirs: the fsuid is per thread.
pub fn with_fsuid<T>(uid: u32, f: impl FnOnce() -> T) -> T {
    nix::unistd::setfsuid(nix::unistd::Uid::from_raw(uid));
    let out = f();
    nix::unistd::setfsuid(nix::unistd::Uid::from_raw(0));
    out
}

/// Whether the effective ids (not the real ones) may write `path`.
pub fn writable_by_effective_ids(path: &CStr) -> bool {
    // SAFETY: faccessat(2) on a NUL-terminated path.
    unsafe { libc::faccessat(libc::AT_FDCWD, path.as_ptr(), libc::W_OK, libc::AT_EACCESS) == 0 }
}

/// Whether `fd`'s file carries the extended attribute `name` (non-empty).
pub fn has_xattr(fd: &impl AsRawFd, name: &CStr) -> bool {
    // SAFETY: fgetxattr(2) size query (no buffer) of a NUL-terminated name.
    unsafe { libc::fgetxattr(fd.as_raw_fd(), name.as_ptr(), std::ptr::null_mut(), 0) > 0 }
}

/// Waits until `fd` is ready for `events` (POLLIN, POLLOUT), at most
/// `timeout_ms`; false on timeout.
pub fn poll_one(fd: &impl AsRawFd, events: i16, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
    // SAFETY: poll(2) on one valid pollfd.
    Ok(check(unsafe { libc::poll(&mut p, 1, timeout_ms) })? > 0)
}

/// pidfd_open(2).
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: a syscall on integers; returns a new fd or -1.
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int)?;
    // SAFETY: just returned by the kernel, owned here only.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// pidfd_send_signal(2), no siginfo (0: only checks the process lives).
pub fn pidfd_send_signal(pidfd: &impl AsRawFd, sig: i32) -> io::Result<()> {
    // SAFETY: a syscall on an fd and integers, a NULL siginfo.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), sig, std::ptr::null::<libc::siginfo_t>(), 0) };
    check(rc as libc::c_int).map(drop)
}

/// An ioctl on a namespace fd that returns a new fd (NS_GET_USERNS,
/// NS_GET_PARENT).
pub fn ns_ioctl_fd(ns: &impl AsRawFd, request: libc::c_ulong) -> io::Result<OwnedFd> {
    // SAFETY: these ioctls take no argument and return a new fd or -1.
    let fd = check(unsafe { libc::ioctl(ns.as_raw_fd(), request) })?;
    // SAFETY: just returned by the kernel, owned here only.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Brings the calling thread's network namespace's `lo` up.
pub fn set_loopback_up() -> io::Result<()> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: an ifreq is plain integers and arrays: zeroed is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills the ifreq we own.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) })?;
    // SAFETY: SIOCGIFFLAGS set the flags member of the union.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) }).map(drop)
}

/// The hour and minute of the node's local time at `unix_secs`.
pub fn local_hour_minute(unix_secs: i64) -> Option<(i32, i32)> {
    let secs = unix_secs as libc::time_t;
    // SAFETY: an all-zero tm is a valid value; localtime_r writes only into
    // the tm we own and reads only `secs`.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&secs, &mut tm) }.is_null() {
        return None;
    }
    Some((tm.tm_hour, tm.tm_min))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// What a child execs after placing its descriptors survives a target
    /// that lands on its number (criu.rs moves the binary first).
    #[test]
    fn a_descriptor_moved_above_the_targets_is_not_replaced_by_one() {
        let kept = std::fs::File::open("/dev/null").unwrap();
        let (r, _w) = nix::unistd::pipe().unwrap();
        let pairs = [(r.as_raw_fd(), kept.as_raw_fd())];
        let moved = dup_cloexec_above(kept.as_raw_fd(), above_targets(&pairs)).unwrap();
        assert!(moved >= 100 && moved > kept.as_raw_fd());
        let mut scratch = [-1];
        place_fds(&pairs, &mut scratch).unwrap();
        use std::os::unix::fs::FileTypeExt;
        let kind = |fd: RawFd| std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().file_type();
        assert!(kind(kept.as_raw_fd()).is_fifo(), "the target now holds the pipe");
        assert!(kind(moved).is_char_device(), "the moved copy still holds /dev/null");
        nix::unistd::close(moved).unwrap();
        nix::unistd::close(scratch[0]).unwrap();
    }

    #[test]
    fn cpus_beyond_the_set_are_left_out_not_written_past_it() {
        let set = cpu_set(&[1, 3, libc::CPU_SETSIZE as usize, usize::MAX]);
        assert_eq!(cpu_list(&set), [1, 3]);
    }
}
