//! Node-local files that travel with a checkpoint: regular files on tmpfs
//! (/dev/shm, a tmpfs /tmp) that the dumped tree maps or holds open.
//!
//! CRIU records only the path of a file that still exists at dump time, so
//! a program restored on another node finds nothing there (Open MPI's
//! shared-memory segment in /dev/shm, even for one rank). Their content is
//! saved into the checkpoint and written back before CRIU restores.
//!
//! Root never resolves a user path: a forked child enters the container's
//! mount namespace, becomes the user (uid, gid, groups, no capability) and
//! opens the path without following any symlink; root only moves bytes
//! through a pipe. At dump the child checks that the path still names the
//! inode the program maps; at restore it writes only a file of the user's.
//!
//! Which files: regular, linked (CRIU dumps deleted ones itself), on a
//! tmpfs of the container's mount table. Files of other users: refused,
//! unless their tmpfs is one Apptainer shows only in parts — its session
//! directory, whose files (/etc/passwd, /etc/group, /etc/resolv.conf) it
//! writes again for the restored container.

use crate::error::{fail, Context, EngineError, Result};
use crate::manifest::{Checksum, ImageFile, Manifest, NodeLocalFile};
use crate::procfs::{self, Pid};
use crate::user::User;
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long copying all of a checkpoint's node-local files may take: each
/// copier is the user's, who can stop it; files of the default size limit
/// copy in about a second.
const TIMEOUT: Duration = Duration::from_secs(60);
const CHUNK: usize = 1 << 20;

/// A file found through /proc (the program's own descriptor or mapping).
#[derive(Debug, Clone)]
struct Found {
    path: String,
    dev: u64,
    ino: u64,
    size: u64,
}

/// The tmpfs mounts of a mount table: device, the filesystem path mounted
/// (`/` for the whole filesystem) and the mount point.
fn tmpfs_mounts(mountinfo: &str) -> Vec<(u64, &str, &str)> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else { continue };
        if fields.get(sep + 1) != Some(&"tmpfs") {
            continue;
        }
        let (Some(majmin), Some(root), Some(point)) = (fields.get(2), fields.get(3), fields.get(4)) else { continue };
        let Some((major, minor)) = majmin.split_once(':').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?))) else { continue };
        out.push((libc::makedev(major, minor), *root, *point));
    }
    out
}

/// The tmpfs filesystems of a mount table, by device: whether one of its
/// mounts shows the whole filesystem (root `/`), as for the node's
/// /dev/shm, rather than parts of it, as for Apptainer's session files.
fn tmpfs_devices(mountinfo: &str) -> HashMap<u64, bool> {
    let mut out = HashMap::new();
    for (dev, root, _) in tmpfs_mounts(mountinfo) {
        *out.entry(dev).or_insert(false) |= root == "/";
    }
    out
}

/// Mount points of the whole-filesystem tmpfs mounts of a mount table, with
/// their device.
fn tmpfs_mount_points(mountinfo: &str) -> Vec<(String, u64)> {
    tmpfs_mounts(mountinfo).into_iter().filter(|(_, root, _)| *root == "/").map(|(dev, _, point)| (point.to_string(), dev)).collect()
}

/// The directories between the tmpfs mount point holding `path` and `path`
/// itself (both excluded), shallowest first; none when `path` is on no
/// such tmpfs (`dev`: its device, when known).
fn dirs_below_mount(mounts: &[(String, u64)], path: &str, dev: Option<u64>) -> Vec<String> {
    let Some((point, _)) = mounts
        .iter()
        .filter(|(point, d)| dev.is_none_or(|dev| dev == *d) && path.strip_prefix(point.as_str()).is_some_and(|rest| rest.starts_with('/')))
        .max_by_key(|(point, _)| point.len())
    else {
        return Vec::new();
    };
    let mut dirs: Vec<String> =
        Path::new(path).ancestors().skip(1).map(|a| a.to_string_lossy().into_owned()).take_while(|a| a.len() > point.len()).collect();
    dirs.reverse();
    dirs
}

/// Paths of the UNIX sockets bound by the tree (`inodes`: its sockets), from
/// its network namespace's table.
fn bound_socket_paths(root: Pid, inodes: &HashSet<u64>) -> Vec<String> {
    let table = std::fs::read_to_string(procfs::proc_path(root, "net/unix")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (inode, path) = (f.get(6)?.parse::<u64>().ok()?, f.get(7)?);
            (inodes.contains(&inode) && path.starts_with('/')).then(|| path.to_string())
        })
        .collect()
}

/// Bytes as the user reads them in a message.
fn human(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / 1048576.0)
    }
}

fn too_big(root: Pid, total: u64, limit: u64, biggest: (&str, u64)) -> EngineError {
    EngineError(format!(
        "node-local files of process {root} take {}, more than node_local_files_max ({}); the biggest is {} ({})",
        human(total),
        human(limit),
        biggest.0,
        human(biggest.1)
    ))
}

/// The node-local files of a tree about to be dumped, and what copying them
/// later needs: the container's mount namespace (held: after a dump that
/// ends the tree, no process is left in it) and the user.
pub struct Pending {
    root: Pid,
    files: Vec<Found>,
    /// Directories to recreate (see `Manifest::node_local_dirs`).
    pub dirs: Vec<String>,
    mnt: Option<(File, User)>,
}

/// Finds the node-local files of the tree (`pids`, rooted at `root`, of
/// `uid`) and checks them against `limit` bytes. Call before the dump.
pub fn find(root: Pid, pids: &[Pid], uid: u32, gid: u32, limit: u64) -> Result<Pending> {
    let mountinfo = std::fs::read_to_string(procfs::proc_path(root, "mountinfo")).context(|| format!("mounts of process {root}"))?;
    let tmpfs = tmpfs_devices(&mountinfo);
    let visible = procfs::mount_ids(root).context(|| format!("mounts of process {root}"))?;
    let mounts = tmpfs_mount_points(&mountinfo);
    let mut seen = HashSet::new();
    let mut files = Vec::new();
    let (mut dirs, mut sockets) = (Vec::new(), HashSet::new());
    for &pid in pids {
        for kind in ["map_files", "fd"] {
            for entry in std::fs::read_dir(procfs::proc_path(pid, kind)).into_iter().flatten().flatten() {
                if kind == "fd" {
                    if let Some(inode) = std::fs::read_link(entry.path())
                        .ok()
                        .and_then(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse::<u64>().ok())
                    {
                        sockets.insert(inode);
                        continue;
                    }
                }
                // Root stats the process's own mapping or descriptor: the
                // kernel's object, no path resolved.
                let Ok(meta) = std::fs::metadata(entry.path()) else { continue };
                // A directory of hers it holds open on tmpfs (a session
                // directory): recreated, with the ones above it.
                if meta.is_dir() && meta.uid() == uid && tmpfs.contains_key(&meta.dev()) {
                    if let Some(path) = std::fs::read_link(entry.path()).ok().and_then(|l| l.to_str().map(str::to_string)) {
                        let mut these = dirs_below_mount(&mounts, &path, Some(meta.dev()));
                        if !these.is_empty() {
                            these.push(path);
                        }
                        dirs.extend(these);
                    }
                    continue;
                }
                let Some(&whole) = tmpfs.get(&meta.dev()) else { continue };
                // An fd opened outside the container (a batch job's output
                // file, restored onto the helper's own fd) is not the
                // container's file, even on the same tmpfs.
                if kind == "fd" {
                    let fd = entry.file_name().to_str().and_then(|n| n.parse().ok()).unwrap_or(-1);
                    if !procfs::regular_file_fd(pid, fd).ok().flatten().is_some_and(|(mnt, _)| visible.contains(&mnt)) {
                        continue;
                    }
                }
                if !meta.is_file() || meta.nlink() == 0 || !seen.insert((meta.dev(), meta.ino())) {
                    continue;
                }
                let link = std::fs::read_link(entry.path()).context(|| format!("{}", entry.path().display()))?;
                let Some(path) = link.to_str().filter(|p| p.starts_with('/')).map(str::to_string) else {
                    return fail(format!("process {pid} has a file on tmpfs whose path cannot be recorded: {}", link.display()));
                };
                if meta.uid() != uid {
                    if !whole {
                        continue;
                    }
                    return fail(format!(
                        "process {pid} maps or holds open {path}, a file on tmpfs owned by uid {}: only the job user's own \
node-local files can travel with a checkpoint",
                        meta.uid()
                    ));
                }
                dirs.extend(dirs_below_mount(&mounts, &path, Some(meta.dev())));
                files.push(Found { path, dev: meta.dev(), ino: meta.ino(), size: meta.len() });
            }
        }
    }
    for path in bound_socket_paths(root, &sockets) {
        dirs.extend(dirs_below_mount(&mounts, &path, None));
    }
    // Shallowest first, once each.
    dirs.sort_by_key(|d| (d.matches('/').count(), d.clone()));
    dirs.dedup();
    let total: u64 = files.iter().map(|f| f.size).sum();
    if total > limit {
        let biggest = files.iter().max_by_key(|f| f.size).map(|f| (f.path.as_str(), f.size)).unwrap_or(("?", 0));
        return Err(too_big(root, total, limit, biggest));
    }
    let mnt = if files.is_empty() && dirs.is_empty() {
        None
    } else {
        let mnt = crate::namespaces::open_checked(root)
            .map(|joined| joined.mnt)
            .map_err(|why| EngineError(format!("refusing to read the node-local files of process {root}: {why}")))?;
        Some((mnt, User::lookup(uid, gid)?))
    };
    Ok(Pending { root, files, dirs, mnt })
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.dirs.is_empty()
    }

    /// Copies each file, as the user, into `dir` (root-only): call once
    /// the tree is frozen or gone, so content and memory agree. Returns the
    /// manifest's entries and the files to seal.
    pub fn save(&self, dir: &Path, limit: u64) -> Result<(Vec<NodeLocalFile>, Vec<ImageFile>)> {
        let Some((mnt, user)) = &self.mnt else { return Ok((Vec::new(), Vec::new())) };
        let (mut listed, mut sealed) = (Vec::new(), Vec::new());
        let mut used = 0;
        let deadline = Instant::now() + TIMEOUT;
        for (i, f) in self.files.iter().enumerate() {
            let name = format!("node-local-{i}.data");
            let mut dest = crate::storage::create_private(&dir.join(&name))?;
            let copied = read_as_user(mnt, user, f, &mut dest, limit - used, deadline).map_err(|e| match e {
                Copy::TooBig(size) => too_big(self.root, used + size, limit, (&f.path, size)),
                Copy::Failed(why) => EngineError(format!("cannot save node-local file {}: {why}", f.path)),
            })?;
            used += copied.size;
            sealed.push(ImageFile { name: name.clone(), size: copied.size, xxh3: copied.xxh3, zstd: false });
            listed.push(NodeLocalFile {
                path: f.path.clone(),
                data: name,
                size: copied.size,
                mode: copied.mode,
                uid: user.uid,
                gid: copied.gid,
            });
        }
        Ok((listed, sealed))
    }
}

/// Writes the checkpoint's node-local files back at their paths, as the
/// user, in the mount namespace of `pid` (the placeholder container), before
/// CRIU reopens them. `dir` is the verified checkpoint.
pub fn recreate(m: &Manifest, dir: &Path, placeholder: &procfs::PidFd) -> Result<()> {
    if m.node_local.is_empty() && m.node_local_dirs.is_empty() {
        return Ok(());
    }
    let pid = placeholder.pid;
    let mnt = crate::namespaces::open_checked(pid).map_err(|why| EngineError(format!("refusing to write node-local files: {why}")))?.mnt;
    // Still the placeholder once its namespace is open: a pid freed and
    // reused by another container would have its namespace opened.
    placeholder.signal(0).map_err(|_| EngineError(format!("refusing to write node-local files: process {pid} has ended")))?;
    let user = User::lookup(m.owner.uid, m.owner.gid)?;
    let deadline = Instant::now() + TIMEOUT;
    make_dirs_as_user(&mnt, &user, &m.node_local_dirs, deadline)?;
    for f in &m.node_local {
        let entry = m.files.iter().find(|e| e.name == f.data && !e.zstd && e.size == f.size);
        let Some(entry) = entry.filter(|_| f.uid == m.owner.uid && f.data.starts_with("node-local-")) else {
            return fail(format!("checkpoint {}: bad node-local entry for {}", dir.display(), f.path));
        };
        let path = dir.join(&f.data);
        // Whole before anything is written: a damaged copy must not
        // replace what the user has.
        let src =
            File::options().read(true).custom_flags(libc::O_NOFOLLOW).open(&path).context(|| format!("cannot open {}", path.display()))?;
        if crate::storage::checksum(&path)? != entry.xxh3 || src.metadata().map(|md| md.len()).ok() != Some(f.size) {
            return fail(format!("checkpoint {} is damaged: checksum of {} does not match the manifest", dir.display(), f.data));
        }
        write_as_user(&mnt, &user, f, src, deadline)
            .map_err(|why| EngineError(format!("cannot recreate node-local file {}: {why}", f.path)))?;
    }
    Ok(())
}

// What the child reports: a stage (0 done) and an errno.
const DONE: u32 = 0;
const ENTER: u32 = 1;
const BECOME: u32 = 2;
const OPEN: u32 = 3;
const REPLACED: u32 = 4;
const NOT_HERS: u32 = 5;
const IO: u32 = 6;
const ATTRS: u32 = 7;
const MKDIR: u32 = 8;

/// The child's report: stage, errno, then size, mode, gid of the file.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Report {
    stage: u32,
    errno: i32,
    size: u64,
    mode: u32,
    gid: u32,
}

impl Report {
    fn why(&self, uid: u32) -> String {
        let err = std::io::Error::from_raw_os_error(self.errno);
        match self.stage {
            ENTER => format!("cannot enter the container's mount namespace: {err}"),
            BECOME => format!("cannot become uid {uid}: {err}"),
            OPEN if self.errno == libc::ELOOP => "a symlink is in its path (not followed)".into(),
            OPEN => format!("cannot open it as uid {uid}: {err}"),
            REPLACED => "it is no longer the file the program used (replaced since)".into(),
            NOT_HERS => format!("it exists and is not a regular file of uid {uid}"),
            IO => format!("cannot copy it as uid {uid}: {err}"),
            ATTRS => format!("cannot set its mode or group as uid {uid}: {err}"),
            s => format!("the copier ended at stage {s}"),
        }
    }
}

/// Identity the child takes, prepared before the fork (no allocation after).
struct Ids<'a> {
    uid: u32,
    gid: u32,
    groups: &'a [libc::gid_t],
}

/// In the forked child: moves `keep` to fds 0.. and closes every other fd
/// (root's, inherited), enters `mnt`, and becomes the user with no
/// capability (setresuid away from 0 clears them all). Syscalls only.
unsafe fn enter_as_user(mnt: RawFd, keep: &[RawFd], ids: &Ids) -> std::result::Result<(), (u32, i32)> {
    let errno = || *libc::__errno_location();
    let mut high = [-1; 3];
    for (i, &fd) in keep.iter().chain([&mnt]).enumerate() {
        high[i] = libc::fcntl(fd, libc::F_DUPFD, 100);
    }
    let n = keep.len() + 1;
    for (i, &fd) in high[..n].iter().enumerate() {
        if fd < 0 || libc::dup2(fd, i as RawFd) < 0 {
            return Err((ENTER, errno()));
        }
    }
    libc::syscall(libc::SYS_close_range, n as u32, u32::MAX, 0u32);
    if libc::setns(keep.len() as RawFd, libc::CLONE_NEWNS) != 0 {
        return Err((ENTER, errno()));
    }
    libc::close(keep.len() as RawFd);
    // Not traceable by the user once it is hers (it carries a copy of the
    // root agent's memory), whatever fs.suid_dumpable says.
    if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
        return Err((BECOME, errno()));
    }
    if libc::setgroups(ids.groups.len(), ids.groups.as_ptr()) != 0
        || libc::setresgid(ids.gid, ids.gid, ids.gid) != 0
        || libc::setresuid(ids.uid, ids.uid, ids.uid) != 0
        || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
    {
        return Err((BECOME, errno()));
    }
    Ok(())
}

/// openat2 of an absolute path from the namespace's root, following no
/// symlink in any component (nor /proc magic links).
unsafe fn open_no_symlinks(path: &CString, flags: i32, mode: u32) -> RawFd {
    // struct open_how of openat2(2) (libc's is non-exhaustive).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow { flags: flags as u64, mode: mode as u64, resolve: libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS };
    libc::syscall(libc::SYS_openat2, libc::AT_FDCWD, path.as_ptr(), &how as *const OpenHow, std::mem::size_of::<OpenHow>()) as RawFd
}

unsafe fn send_report(fd: RawFd, r: &Report) {
    libc::write(fd, r as *const Report as *const libc::c_void, std::mem::size_of::<Report>());
}

/// Forks; the child runs `body` and exits with its result.
fn fork(body: impl FnOnce() -> i32) -> Result<libc::pid_t> {
    // SAFETY: the child only runs `body`, which makes syscalls on data
    // prepared before the fork, then _exit.
    match unsafe { libc::fork() } {
        -1 => fail(format!("cannot fork: {}", std::io::Error::last_os_error())),
        0 => unsafe { libc::_exit(body()) },
        pid => Ok(pid),
    }
}

/// Reaps the child, killing it first if it outlives `deadline`.
fn reap(pid: libc::pid_t, deadline: Instant) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc != 0 {
            return;
        }
        if Instant::now() > deadline {
            // SAFETY: our unreaped child: the pid cannot have been reused.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn pipe() -> Result<(File, File)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context(|| "pipe".into())?;
    Ok((File::from(r), File::from(w)))
}

/// Waits until `fd` is ready for `events`, at most until `deadline`.
fn wait_ready(fd: &File, events: i16, deadline: Instant) -> std::io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
    // SAFETY: poll on one fd we own.
    let rc = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
    match rc {
        0 => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("not done within {} s", TIMEOUT.as_secs()))),
        n if n < 0 => Err(std::io::Error::last_os_error()),
        _ => Ok(()),
    }
}

/// Reads into `buf` from a non-blocking pipe, waiting at most until
/// `deadline`; 0 at end of file.
fn read_by(fd: &mut File, buf: &mut [u8], deadline: Instant) -> std::io::Result<usize> {
    loop {
        match std::io::Read::read(fd, buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_ready(fd, libc::POLLIN, deadline)?,
            r => return r,
        }
    }
}

fn read_report(fd: &mut File, deadline: Instant) -> std::io::Result<Option<Report>> {
    let mut r = Report::default();
    // SAFETY: Report is plain integers; any bytes are a valid value.
    let bytes = unsafe { std::slice::from_raw_parts_mut(&mut r as *mut Report as *mut u8, std::mem::size_of::<Report>()) };
    let mut got = 0;
    while got < bytes.len() {
        match read_by(fd, &mut bytes[got..], deadline)? {
            0 => return Ok(None),
            n => got += n,
        }
    }
    Ok(Some(r))
}

fn nonblocking(f: &File) -> Result<()> {
    nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK)).context(|| "pipe".into())?;
    Ok(())
}

enum Copy {
    TooBig(u64),
    Failed(String),
}

struct Copied {
    size: u64,
    xxh3: String,
    mode: u32,
    gid: u32,
}

/// The user's copier reads `f.path` in the container and checks it is the
/// inode found; root writes what it sends into `dest`, at most `room` bytes.
fn read_as_user(mnt: &File, user: &User, f: &Found, dest: &mut File, room: u64, deadline: Instant) -> std::result::Result<Copied, Copy> {
    let failed = |e: String| Copy::Failed(e);
    let path = CString::new(f.path.clone()).map_err(|_| failed("its path contains a NUL byte".into()))?;
    let (mut from_child, to_root) = pipe().map_err(|e| failed(e.0))?;
    let ids = Ids { uid: user.uid, gid: user.gid, groups: &user.groups };
    let (dev, ino, out, mnt_fd) = (f.dev, f.ino, to_root.as_raw_fd(), mnt.as_raw_fd());
    // SAFETY: in the forked child: syscalls on fds and data prepared before
    // the fork; the report is plain integers.
    let child = fork(|| unsafe {
        let mut r = Report::default();
        if let Err((stage, errno)) = enter_as_user(mnt_fd, &[out], &ids) {
            r.stage = stage;
            r.errno = errno;
            send_report(0, &r);
            return 1;
        }
        let fd = open_no_symlinks(&path, libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC, 0);
        let mut st: libc::stat = std::mem::zeroed();
        if fd < 0 {
            r.stage = OPEN;
        } else if libc::fstat(fd, &mut st) != 0 {
            r.stage = IO;
        } else if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_dev != dev || st.st_ino != ino {
            r.stage = REPLACED;
        }
        if r.stage != DONE {
            r.errno = *libc::__errno_location();
            send_report(0, &r);
            return 1;
        }
        (r.size, r.mode, r.gid) = (st.st_size as u64, st.st_mode & 0o7777, st.st_gid);
        send_report(0, &r);
        let mut sent = 0u64;
        while sent < r.size {
            let n = libc::sendfile(0, fd, std::ptr::null_mut(), (r.size - sent).min(CHUNK as u64) as usize);
            if n <= 0 {
                return 1;
            }
            sent += n as u64;
        }
        0
    })
    .map_err(|e| failed(e.0))?;
    drop(to_root);
    let result = (|| {
        nonblocking(&from_child).map_err(|e| failed(e.0))?;
        let io = |e: std::io::Error| failed(format!("reading it from the copier: {e}"));
        let report = read_report(&mut from_child, deadline).map_err(io)?.ok_or_else(|| failed("the copier ended without a word".into()))?;
        if report.stage != DONE {
            return Err(failed(report.why(user.uid)));
        }
        if report.size > room {
            return Err(Copy::TooBig(report.size));
        }
        let mut sum = Checksum::default();
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        while got < report.size {
            let want = (report.size - got).min(CHUNK as u64) as usize;
            let n = read_by(&mut from_child, &mut buf[..want], deadline).map_err(io)?;
            if n == 0 {
                return Err(failed(format!("it shrank while copied ({} of {} bytes)", got, report.size)));
            }
            sum.update(&buf[..n]);
            dest.write_all(&buf[..n]).map_err(|e| failed(format!("cannot write the checkpoint: {e}")))?;
            got += n as u64;
        }
        Ok(Copied { size: got, xxh3: sum.hex(), mode: report.mode, gid: report.gid })
    })();
    reap(child, if result.is_ok() { deadline } else { Instant::now() });
    result
}

/// Creates the directories that are missing (mode 0700, as the user would
/// with `mkdir -p`), in the container's mount namespace: a forked child that
/// is the user, so it can create only what she can.
fn make_dirs_as_user(mnt: &File, user: &User, dirs: &[String], deadline: Instant) -> Result<()> {
    if dirs.is_empty() {
        return Ok(());
    }
    let paths: Vec<CString> =
        dirs.iter().map(|d| CString::new(d.as_str())).collect::<std::result::Result<_, _>>().context(|| "a directory path".into())?;
    let (mut status_r, status_w) = pipe()?;
    let ids = Ids { uid: user.uid, gid: user.gid, groups: &user.groups };
    let (mnt_fd, keep) = (mnt.as_raw_fd(), [status_w.as_raw_fd()]);
    // SAFETY: in the forked child: syscalls on fds and data prepared before
    // the fork.
    let child = fork(|| unsafe {
        let mut r = Report::default();
        if let Err((stage, errno)) = enter_as_user(mnt_fd, &keep, &ids) {
            (r.stage, r.errno) = (stage, errno);
            send_report(0, &r);
            return 1;
        }
        for (i, p) in paths.iter().enumerate() {
            if libc::mkdir(p.as_ptr(), 0o700) != 0 && *libc::__errno_location() != libc::EEXIST {
                (r.stage, r.errno, r.size) = (MKDIR, *libc::__errno_location(), i as u64);
                send_report(0, &r);
                return 1;
            }
        }
        send_report(0, &r);
        0
    })?;
    drop(status_w);
    let report = nonblocking(&status_r).and_then(|()| read_report(&mut status_r, deadline).map_err(|e| EngineError(e.to_string())));
    reap(child, deadline);
    match report? {
        Some(r) if r.stage == DONE => Ok(()),
        Some(r) if r.stage == MKDIR => {
            fail(format!("cannot recreate node-local directory {}: {}", dirs[r.size as usize], std::io::Error::from_raw_os_error(r.errno)))
        }
        Some(r) => fail(format!("cannot recreate node-local directories: {}", r.why(user.uid))),
        None => fail("cannot recreate node-local directories: the writer ended without a word"),
    }
}

/// The user's writer creates or replaces `f.path` in the container (only a
/// regular file of hers) with the bytes root sends from `src`.
fn write_as_user(mnt: &File, user: &User, f: &NodeLocalFile, mut src: File, deadline: Instant) -> std::result::Result<(), String> {
    let path = CString::new(f.path.clone()).map_err(|_| "its path contains a NUL byte".to_string())?;
    let (from_root, mut to_child) = pipe().map_err(|e| e.0)?;
    let (mut status_r, status_w) = pipe().map_err(|e| e.0)?;
    let ids = Ids { uid: user.uid, gid: user.gid, groups: &user.groups };
    let mut buf = vec![0u8; CHUNK];
    let (mode, gid, mnt_fd) = (f.mode & 0o7777, f.gid, mnt.as_raw_fd());
    let keep = [from_root.as_raw_fd(), status_w.as_raw_fd()];
    let bufp = buf.as_mut_ptr();
    // SAFETY: in the forked child: syscalls on fds and data prepared before
    // the fork (`bufp` is CHUNK bytes, the parent's copy untouched).
    let child = fork(|| unsafe {
        let mut r = Report::default();
        let fail_with = |mut r: Report, stage: u32| {
            r.stage = stage;
            r.errno = *libc::__errno_location();
            send_report(1, &r);
            1
        };
        if let Err((stage, errno)) = enter_as_user(mnt_fd, &keep, &ids) {
            r.stage = stage;
            r.errno = errno;
            send_report(1, &r);
            return 1;
        }
        let fd = open_no_symlinks(
            &path,
            libc::O_WRONLY | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC,
            0o600,
        );
        if fd < 0 {
            return fail_with(r, OPEN);
        }
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return fail_with(r, IO);
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_uid != ids.uid {
            return fail_with(r, NOT_HERS);
        }
        if libc::ftruncate(fd, 0) != 0 {
            return fail_with(r, IO);
        }
        loop {
            let n = libc::read(0, bufp as *mut libc::c_void, CHUNK);
            if n < 0 {
                return fail_with(r, IO);
            }
            if n == 0 {
                break;
            }
            let mut done = 0isize;
            while done < n {
                let w = libc::write(fd, bufp.offset(done) as *const libc::c_void, (n - done) as usize);
                if w <= 0 {
                    return fail_with(r, IO);
                }
                done += w;
            }
            r.size += n as u64;
        }
        if libc::fchmod(fd, mode) != 0 || (st.st_gid != gid && libc::fchown(fd, u32::MAX, gid) != 0) {
            return fail_with(r, ATTRS);
        }
        send_report(1, &r);
        0
    })
    .map_err(|e| e.0)?;
    drop((from_root, status_w));
    let result = (|| {
        nonblocking(&to_child).map_err(|e| e.0)?;
        nonblocking(&status_r).map_err(|e| e.0)?;
        let io = |e: std::io::Error| format!("sending it to the writer: {e}");
        'send: loop {
            let n = std::io::Read::read(&mut src, &mut buf).map_err(|e| format!("cannot read the checkpoint: {e}"))?;
            if n == 0 {
                break;
            }
            let mut done = 0;
            while done < n {
                match to_child.write(&buf[done..n]) {
                    Ok(w) => done += w,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_ready(&to_child, libc::POLLOUT, deadline).map_err(io)?,
                    // The writer stopped: its report says why.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break 'send,
                    Err(e) => return Err(io(e)),
                }
            }
        }
        drop(to_child);
        let report = read_report(&mut status_r, deadline)
            .map_err(|e| format!("waiting for the writer: {e}"))?
            .ok_or_else(|| "the writer ended without a word".to_string())?;
        if report.stage != DONE {
            return Err(report.why(user.uid));
        }
        if report.size != f.size {
            return Err(format!("{} of {} bytes written", report.size, f.size));
        }
        Ok(())
    })();
    reap(child, if result.is_ok() { deadline } else { Instant::now() });
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmpfs_mounts_are_told_whole_or_in_parts() {
        let info = "339 336 0:86 / /dev/shm rw,relatime master:30 - tmpfs shm rw\n\
349 334 0:99 /etc/passwd /etc/passwd rw,nosuid,relatime master:34 - tmpfs tmpfs rw\n\
350 334 0:99 /etc/group /etc/group rw,nosuid,relatime master:34 - tmpfs tmpfs rw\n\
341 334 254:0 /x /etc/hosts ro - ext4 /dev/vda rw\n\
346 334 0:88 / /tmp rw - tmpfs tmp rw\n\
347 334 0:88 /sub /scratch rw - tmpfs tmp rw\n";
        let devs = tmpfs_devices(info);
        assert_eq!(devs.len(), 3);
        assert!(devs[&libc::makedev(0, 86)]);
        assert!(!devs[&libc::makedev(0, 99)], "Apptainer's session files");
        assert!(devs[&libc::makedev(0, 88)], "whole somewhere counts");
        let points = tmpfs_mount_points(info);
        assert_eq!(points, [("/dev/shm".to_string(), libc::makedev(0, 86)), ("/tmp".to_string(), libc::makedev(0, 88))]);
    }

    #[test]
    fn the_size_message_names_size_limit_and_biggest_file() {
        let e = too_big(42, 5 << 20, 1 << 20, ("/dev/shm/big", 4 << 20));
        assert_eq!(
            e.0,
            "node-local files of process 42 take 5.0 MiB, more than node_local_files_max (1.0 MiB); the biggest is /dev/shm/big (4.0 MiB)"
        );
    }
}
