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
use crate::sys;
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
    EngineError::Failed(format!(
        "node-local and deleted files of process {root} take {}, more than node_local_files_max ({}); the biggest is {} ({})",
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
    // Deleted files (path, size), once each.
    let mut ghosts: Vec<(String, u64)> = Vec::new();
    let mut ghosts_seen = HashSet::new();
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
                // A deleted file it still maps or holds, on any filesystem:
                // CRIU copies its content into the checkpoint (a ghost
                // file), which counts against the same limit.
                if meta.is_file() && meta.nlink() == 0 && ghosts_seen.insert((meta.dev(), meta.ino())) {
                    let path = std::fs::read_link(entry.path()).map(|l| l.display().to_string()).unwrap_or_default();
                    // Shared anonymous memory and SysV segments show as
                    // deleted files too; CRIU dumps them as memory.
                    if !path.starts_with("/dev/zero") && !path.starts_with("/SYSV") {
                        ghosts.push((path, meta.len()));
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
    let all = || files.iter().map(|f| (f.path.as_str(), f.size)).chain(ghosts.iter().map(|(p, n)| (p.as_str(), *n)));
    let total: u64 = all().map(|(_, n)| n).sum();
    if total > limit {
        let biggest = all().max_by_key(|&(_, n)| n).unwrap_or(("?", 0));
        return Err(too_big(root, total, limit, biggest));
    }
    let mnt = if files.is_empty() && dirs.is_empty() {
        None
    } else {
        let mnt = crate::namespaces::open_checked(root)
            .map(|joined| joined.mnt)
            .map_err(|why| EngineError::Failed(format!("refusing to read the node-local files of process {root}: {why}")))?;
        Some((mnt, User::lookup(uid, gid)?))
    };
    Ok(Pending { root, files, dirs, mnt })
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.dirs.is_empty()
    }

    /// Bytes of the node-local files found (what `save` copies).
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
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
                Copy::Failed(why) => EngineError::Failed(format!("cannot save node-local file {}: {why}", f.path)),
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
    let mnt =
        crate::namespaces::open_checked(pid).map_err(|why| EngineError::Failed(format!("refusing to write node-local files: {why}")))?.mnt;
    // Still the placeholder once its namespace is open: a pid freed and
    // reused by another container would have its namespace opened.
    placeholder.signal(0).map_err(|_| EngineError::Failed(format!("refusing to write node-local files: process {pid} has ended")))?;
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
            return Err(EngineError::Damaged(format!(
                "checkpoint {} is damaged: checksum of {} does not match the manifest",
                dir.display(),
                f.data
            )));
        }
        write_as_user(&mnt, &user, f, src, deadline)
            .map_err(|why| EngineError::Failed(format!("cannot recreate node-local file {}: {why}", f.path)))?;
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
#[derive(Default, Clone, Copy)]
struct Report {
    stage: u32,
    errno: i32,
    size: u64,
    mode: u32,
    gid: u32,
}

const REPORT_LEN: usize = 24;

impl Report {
    /// Sent as is through a pipe (allocation-free: the child's side).
    fn to_bytes(self) -> [u8; REPORT_LEN] {
        let mut b = [0u8; REPORT_LEN];
        b[0..4].copy_from_slice(&self.stage.to_ne_bytes());
        b[4..8].copy_from_slice(&self.errno.to_ne_bytes());
        b[8..16].copy_from_slice(&self.size.to_ne_bytes());
        b[16..20].copy_from_slice(&self.mode.to_ne_bytes());
        b[20..24].copy_from_slice(&self.gid.to_ne_bytes());
        b
    }

    fn from_bytes(b: &[u8; REPORT_LEN]) -> Report {
        let u32_at = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        Report {
            stage: u32_at(0),
            errno: u32_at(4) as i32,
            size: u64::from_ne_bytes(b[8..16].try_into().expect("8 bytes")),
            mode: u32_at(16),
            gid: u32_at(20),
        }
    }

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
/// capability (setresuid away from 0 clears them all). Async-signal-safe.
fn enter_as_user(mnt: RawFd, keep: &[RawFd], ids: &Ids) -> std::result::Result<(), (u32, i32)> {
    let at = |stage: u32| move |e: std::io::Error| (stage, e.raw_os_error().unwrap_or(0));
    let mut high = [-1; 3];
    for (i, &fd) in keep.iter().chain([&mnt]).enumerate() {
        high[i] = sys::dup_above(fd, 100).map_err(at(ENTER))?;
    }
    let n = keep.len() + 1;
    for (i, &fd) in high[..n].iter().enumerate() {
        sys::dup2(fd, i as RawFd).map_err(at(ENTER))?;
    }
    let _ = sys::close_range_from(n as u32);
    sys::setns(keep.len() as RawFd, libc::CLONE_NEWNS).map_err(at(ENTER))?;
    sys::close(keep.len() as RawFd);
    // Not traceable by the user once it is hers (it carries a copy of the
    // root agent's memory), whatever fs.suid_dumpable says.
    sys::set_not_dumpable().map_err(at(BECOME))?;
    sys::setgroups(ids.groups)
        .and_then(|()| sys::setresgid(ids.gid))
        .and_then(|()| sys::setresuid(ids.uid))
        .and_then(|()| sys::set_no_new_privs())
        .map_err(at(BECOME))
}

fn send_report(fd: RawFd, r: &Report) {
    let _ = sys::write(fd, &r.to_bytes());
}

fn forked(child: std::io::Result<libc::pid_t>) -> Result<libc::pid_t> {
    child.or_else(|e| fail(format!("cannot fork: {e}")))
}

/// Reaps the child, killing it first if it outlives `deadline`.
fn reap(pid: libc::pid_t, deadline: Instant) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let pid = nix::unistd::Pid::from_raw(pid);
    loop {
        if !matches!(waitpid(pid, Some(WaitPidFlag::WNOHANG)), Ok(WaitStatus::StillAlive)) {
            return;
        }
        if Instant::now() > deadline {
            // Our unreaped child: the pid cannot have been reused.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = waitpid(pid, None);
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
    match sys::poll_one(fd, events, left.as_millis().min(i32::MAX as u128) as i32)? {
        false => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("not done within {} s", TIMEOUT.as_secs()))),
        true => Ok(()),
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
    let mut bytes = [0u8; REPORT_LEN];
    let mut got = 0;
    while got < bytes.len() {
        match read_by(fd, &mut bytes[got..], deadline)? {
            0 => return Ok(None),
            n => got += n,
        }
    }
    Ok(Some(Report::from_bytes(&bytes)))
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
    let (mut from_child, to_root) = pipe().map_err(|e| failed(e.to_string()))?;
    let ids = Ids { uid: user.uid, gid: user.gid, groups: &user.groups };
    let (dev, ino, out, mnt_fd) = (f.dev, f.ino, to_root.as_raw_fd(), mnt.as_raw_fd());
    #[allow(unsafe_code)]
    // SAFETY: the child calls only async-signal-safe functions of sys, on
    // fds and data prepared before the fork; the report is plain integers.
    let child = forked(unsafe {
        sys::fork_child(|| {
            let mut r = Report::default();
            if let Err((stage, errno)) = enter_as_user(mnt_fd, &[out], &ids) {
                (r.stage, r.errno) = (stage, errno);
                send_report(0, &r);
                return 1;
            }
            let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC;
            let opened = sys::open_no_symlinks(&path, flags, 0).map_err(|e| (OPEN, e)).and_then(|fd| {
                let st = sys::fstat(fd).map_err(|e| (IO, e))?;
                Ok((fd, st))
            });
            let (fd, st) = match opened {
                Ok((_, st)) if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_dev != dev || st.st_ino != ino => {
                    (r.stage, r.errno) = (REPLACED, 0);
                    send_report(0, &r);
                    return 1;
                }
                Ok(found) => found,
                Err((stage, e)) => {
                    (r.stage, r.errno) = (stage, e.raw_os_error().unwrap_or(0));
                    send_report(0, &r);
                    return 1;
                }
            };
            (r.size, r.mode, r.gid) = (st.st_size as u64, st.st_mode & 0o7777, st.st_gid);
            send_report(0, &r);
            let mut sent = 0u64;
            while sent < r.size {
                match sys::sendfile(0, fd, (r.size - sent).min(CHUNK as u64) as usize) {
                    Ok(n) if n > 0 => sent += n as u64,
                    _ => return 1,
                }
            }
            0
        })
    })
    .map_err(|e| failed(e.to_string()))?;
    drop(to_root);
    let result = (|| {
        nonblocking(&from_child).map_err(|e| failed(e.to_string()))?;
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
    #[allow(unsafe_code)]
    // SAFETY: the child calls only async-signal-safe functions of sys, on
    // fds and data prepared before the fork.
    let child = forked(unsafe {
        sys::fork_child(|| {
            let mut r = Report::default();
            if let Err((stage, errno)) = enter_as_user(mnt_fd, &keep, &ids) {
                (r.stage, r.errno) = (stage, errno);
                send_report(0, &r);
                return 1;
            }
            for (i, p) in paths.iter().enumerate() {
                if let Err(e) = sys::mkdir_if_missing(p, 0o700) {
                    (r.stage, r.errno, r.size) = (MKDIR, e.raw_os_error().unwrap_or(0), i as u64);
                    send_report(0, &r);
                    return 1;
                }
            }
            send_report(0, &r);
            0
        })
    })?;
    drop(status_w);
    let report = nonblocking(&status_r).and_then(|()| read_report(&mut status_r, deadline).map_err(|e| EngineError::Failed(e.to_string())));
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
    let (from_root, mut to_child) = pipe().map_err(|e| e.to_string())?;
    let (mut status_r, status_w) = pipe().map_err(|e| e.to_string())?;
    let ids = Ids { uid: user.uid, gid: user.gid, groups: &user.groups };
    let mut buf = vec![0u8; CHUNK];
    let (mode, gid, mnt_fd) = (f.mode & 0o7777, f.gid, mnt.as_raw_fd());
    let keep = [from_root.as_raw_fd(), status_w.as_raw_fd()];
    #[allow(unsafe_code)]
    // SAFETY: the child calls only async-signal-safe functions of sys, on
    // fds and data prepared before the fork (`buf` is the child's copy).
    let child = forked(unsafe {
        sys::fork_child(|| {
            let mut r = Report::default();
            let fail_with = |mut r: Report, stage: u32, errno: i32| {
                (r.stage, r.errno) = (stage, errno);
                send_report(1, &r);
                1
            };
            let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(0);
            if let Err((stage, errno)) = enter_as_user(mnt_fd, &keep, &ids) {
                return fail_with(r, stage, errno);
            }
            let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC;
            let fd = match sys::open_no_symlinks(&path, flags, 0o600) {
                Ok(fd) => fd,
                Err(e) => return fail_with(r, OPEN, errno(e)),
            };
            let st = match sys::fstat(fd) {
                Ok(st) => st,
                Err(e) => return fail_with(r, IO, errno(e)),
            };
            if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_uid != ids.uid {
                return fail_with(r, NOT_HERS, 0);
            }
            if let Err(e) = sys::truncate_to_zero(fd) {
                return fail_with(r, IO, errno(e));
            }
            loop {
                let n = match sys::read(0, &mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => return fail_with(r, IO, errno(e)),
                };
                let mut done = 0;
                while done < n {
                    match sys::write(fd, &buf[done..n]) {
                        Ok(w) if w > 0 => done += w,
                        Ok(_) => return fail_with(r, IO, 0),
                        Err(e) => return fail_with(r, IO, errno(e)),
                    }
                }
                r.size += n as u64;
            }
            if let Err(e) = sys::fchmod(fd, mode).and_then(|()| if st.st_gid != gid { sys::fchown_group(fd, gid) } else { Ok(()) }) {
                return fail_with(r, ATTRS, errno(e));
            }
            send_report(1, &r);
            0
        })
    })
    .map_err(|e| e.to_string())?;
    drop((from_root, status_w));
    let result = (|| {
        nonblocking(&to_child).map_err(|e| e.to_string())?;
        nonblocking(&status_r).map_err(|e| e.to_string())?;
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
            e.to_string(),
            "node-local and deleted files of process 42 take 5.0 MiB, more than node_local_files_max (1.0 MiB); the biggest is /dev/shm/big (4.0 MiB)"
        );
    }
}
