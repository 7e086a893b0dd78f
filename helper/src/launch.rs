//! Starting a user's container as root without root doing anything for the
//! user that the user could not do.
//!
//! - The runtime is the site's Apptainer (`apptainer` setting), never the
//!   program the job names; the command line passes `policy.rs` first.
//! - Every host path the user names (image, bind sources, working
//!   directory, home) is opened **once, by a process that is the user**
//!   (`open-as-user`), and passed back as a file descriptor. Root bind-mounts
//!   each descriptor (`/proc/self/fd/N`) into a fresh root-only directory and
//!   gives Apptainer those paths: what Apptainer resolves as root is then a
//!   path nobody else can change, naming exactly what the user opened. No
//!   path is checked by one resolution and used by another.
//! - The image must be a regular SIF file that Apptainer's own setuid mode
//!   would let this user mount under the site's `apptainer.conf`.
//! - Root's Apptainer gets a built environment; the job's environment
//!   reaches the container only as `APPTAINERENV_*` data.
//!
//! Processes using this live in a mount namespace of their own
//! ([`private_mount_namespace`]) so the staging mounts never reach the node.

use crate::error::{fail, Context, EngineError, Result};
use crate::policy::{self, Plan};
use crate::runtime::ContainerCommand;
use crate::user::User;
use ckpt_config::Settings;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Root-only directory of the per-launch staging directories.
const STAGING_ROOT: &str = "/run/checkpoint-container/launch";
/// PATH of every program root starts.
pub const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long opening the user's paths may take (a hung NFS or FUSE server
/// must not hang the step).
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// fd on which `open-as-user` sends what it opened.
const OPENER_FD: RawFd = 3;
/// Filesystems root will not read a container image from: a FUSE server is
/// the user's process and can stall every read forever.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// What the task asked for: its command line, working directory and
/// environment, all of them the user's.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub argv: &'a [String],
    pub cwd: &'a str,
    pub env: &'a [(String, String)],
}

/// A container ready to be started by root.
pub struct Launch {
    /// What root runs: the site's Apptainer, staged paths only.
    pub argv: Vec<String>,
    /// Root's environment for it.
    pub env: Vec<(String, String)>,
    /// The user's image as root may read it (the staged bind of what the
    /// user opened).
    pub image: PathBuf,
    /// The image's path as the user resolved it (recorded in manifests).
    pub image_name: String,
    /// The mounts behind those paths; unmounted when the launch is dropped.
    _staging: Staging,
}

/// Makes this process's mount namespace its own, receiving the node's
/// mounts but sending none back. Call while single-threaded.
pub fn private_mount_namespace() -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context(|| "cannot create a private mount namespace".into())?;
    nix::mount::mount(None::<&str>, "/", None::<&str>, nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_SLAVE, None::<&str>)
        .context(|| "cannot make the mount namespace a slave of the node's".into())
}

/// What `open-as-user` is asked to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The container image: read-only, non-blocking (a FIFO must not hang).
    Image,
    /// A bind source, the working directory or home: `O_PATH`, any type.
    Path,
}

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Kind::Image => "image",
            Kind::Path => "path",
        }
    }
}

/// `checkpoint-container open-as-user KIND=PATH…`, run as the user by
/// [`open_as_user`]: opens each path with the user's rights and sends the
/// descriptor (or why it could not) over fd 3, in order.
pub fn serve_open_as_user(requests: &[String]) -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        return fail("open-as-user must not run as root");
    }
    let sock = UnixStream::from(crate::sys::take_inherited_fd(OPENER_FD).context(|| format!("fd {OPENER_FD}"))?);
    for request in requests {
        let (kind, path) = request.split_once('=').ok_or_else(|| EngineError::Failed(format!("bad request {request:?}")))?;
        let flags = match kind {
            "image" => libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC,
            "path" => libc::O_PATH | libc::O_CLOEXEC,
            _ => return fail(format!("bad request {request:?}")),
        };
        let cpath = CString::new(path).map_err(|_| EngineError::Failed(format!("{path:?} contains a NUL byte")))?;
        let sent = match crate::sys::open(&cpath, flags) {
            Err(why) => send_with_fd(&sock, format!("E{why}").as_bytes(), None),
            Ok(fd) => {
                // Whether the user could change it (mode, ACLs, read-only
                // mounts all count), asked as the user.
                let proc_path = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL");
                let writable = crate::sys::writable_by_effective_ids(&proc_path);
                send_with_fd(&sock, if writable { b"Fw" } else { b"Fr" }, Some(fd.as_raw_fd()))
            }
        };
        sent.context(|| "cannot answer the helper".into())?;
    }
    Ok(())
}

fn send_with_fd(sock: &UnixStream, payload: &[u8], fd: Option<RawFd>) -> nix::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds = fd.map(|f| [f]);
    let cmsgs: Vec<ControlMessage> = fds.as_ref().map(|f| vec![ControlMessage::ScmRights(f)]).unwrap_or_default();
    sendmsg::<()>(sock.as_raw_fd(), &[std::io::IoSlice::new(payload)], &cmsgs, MsgFlags::empty(), None)
}

/// Opens `paths` as `user` (a separate process that is the user); one
/// result per path, in order: the descriptor, or why the user cannot open it.
fn open_as_user(user: &User, paths: &[(Kind, String)]) -> Result<Vec<std::result::Result<Opened, String>>> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (ours, theirs) =
        socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).context(|| "socketpair".into())?;
    let helper = std::env::current_exe().context(|| "own path".into())?;
    let mut cmd = user.command(&helper);
    cmd.arg("open-as-user").args(paths.iter().map(|(k, p)| format!("{}={p}", k.tag())));
    // Runs after the identity change registered by `User::command`.
    crate::sys::on_exec_dup2(&mut cmd, theirs.as_raw_fd(), OPENER_FD);
    let mut child = cmd.spawn().context(|| "cannot start a process as the user".into())?;
    drop(theirs);
    let sock = UnixStream::from(ours);
    let deadline = std::time::Instant::now() + OPEN_TIMEOUT;
    let mut out = Vec::new();
    for (_, path) in paths {
        // One deadline for all the paths, not one per path.
        let left = deadline.saturating_duration_since(std::time::Instant::now()).max(Duration::from_millis(1));
        sock.set_read_timeout(Some(left)).context(|| "socket".into())?;
        let mut buf = [0u8; 4096];
        let (bytes, fds) = match crate::sys::recv_with_fds::<1>(&sock, &mut buf) {
            Ok((bytes, fds)) if bytes > 0 => (bytes, fds),
            other => {
                let _ = child.kill();
                let _ = child.wait();
                return fail(format!(
                    "could not open {path} as the user: {}",
                    other.map(|_| "no answer".to_string()).unwrap_or_else(|e| e.to_string())
                ));
            }
        };
        let fd = fds.into_iter().next();
        let text = String::from_utf8_lossy(&buf[..bytes]).into_owned();
        out.push(match (text.as_bytes().first(), fd) {
            (Some(b'F'), Some(fd)) => Ok(Opened { fd, writable_by_user: text.as_bytes().get(1) != Some(&b'r') }),
            (Some(b'E'), None) => Err(text[1..].to_string()),
            _ => Err("garbled answer".to_string()),
        });
    }
    // It has answered everything; it must not outlive this call.
    let _ = child.kill();
    let _ = child.wait();
    Ok(out)
}

/// What `open-as-user` opened.
struct Opened {
    fd: OwnedFd,
    /// The user could write to it (the image must not be).
    writable_by_user: bool,
}

/// The kernel's path of what `fd` refers to.
fn fd_path(fd: &OwnedFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default()
}

fn fstat(fd: &OwnedFd) -> Result<nix::sys::stat::FileStat> {
    nix::sys::stat::fstat(fd.as_raw_fd()).context(|| "fstat".into())
}

/// A root-only directory holding bind mounts of what the user opened.
struct Staging {
    dir: PathBuf,
    mounts: Vec<PathBuf>,
}

impl Staging {
    fn new() -> Result<Staging> {
        crate::storage::trusted_dir(Path::new(STAGING_ROOT), Some(0o700))?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let dir = Path::new(STAGING_ROOT).join(format!("{}-{nanos}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir).context(|| format!("cannot create {}", dir.display()))?;
        Ok(Staging { dir, mounts: Vec::new() })
    }

    /// Bind-mounts what `fd` refers to at `name` in the staging directory
    /// (the kernel follows the descriptor, not a path) and returns that path.
    fn mount(&mut self, fd: &OwnedFd, name: &str) -> Result<PathBuf> {
        let target = self.dir.join(name);
        let is_dir = fstat(fd)?.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if is_dir {
            std::fs::DirBuilder::new().mode(0o700).create(&target)
        } else {
            std::fs::OpenOptions::new().write(true).create_new(true).open(&target).map(drop)
        }
        .context(|| format!("cannot create {}", target.display()))?;
        let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let flags = nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC;
        nix::mount::mount(Some(source.as_str()), &target, None::<&str>, flags, None::<&str>)
            .context(|| format!("cannot stage {}", fd_path(fd)))?;
        self.mounts.push(target.clone());
        Ok(target)
    }
}

/// Size of the contained home root mounts for the user: Apptainer's own
/// default `sessiondir max size`, which bounds hers unprotected.
const CONTAINED_HOME_SIZE: &str = "64m";

impl Staging {
    /// A fresh, empty tmpfs owned by `user` at `name` (its size bounded:
    /// it lives in the node's memory).
    fn tmpfs(&mut self, name: &str, user: &User) -> Result<PathBuf> {
        let target = self.dir.join(name);
        std::fs::DirBuilder::new().mode(0o700).create(&target).context(|| format!("cannot create {}", target.display()))?;
        let options = format!("size={CONTAINED_HOME_SIZE},mode=0755,uid={},gid={}", user.uid, user.gid);
        let flags = nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV;
        nix::mount::mount(Some("tmpfs"), &target, Some("tmpfs"), flags, Some(options.as_str()))
            .context(|| format!("cannot mount a tmpfs at {}", target.display()))?;
        self.mounts.push(target.clone());
        Ok(target)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Only the entries made here, each once unmounted: a mount point
        // still mounted is the user's directory (or one she reached), and
        // root must never recurse into it.
        for m in self.mounts.iter().rev() {
            if nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH).is_ok() {
                let _ = std::fs::remove_dir(m).or_else(|_| std::fs::remove_file(m));
            }
        }
        let config = self.dir.join("config");
        let _ = std::fs::remove_dir_all(&config);
        let _ = std::fs::remove_dir(self.dir.join("no-home"));
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The parts of the site's `apptainer.conf` that decide what setuid mode
/// lets a user mount.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApptainerConf {
    pub allow_sif: bool,
    /// Kernel squashfs mounts in setuid mode (`allow setuid-mount squashfs`,
    /// `iflimited` resolved).
    pub squashfs_kernel_mount: bool,
    pub extfs_kernel_mount: bool,
    pub limit_owners: Vec<String>,
    pub limit_groups: Vec<String>,
    pub limit_paths: Vec<String>,
    pub mount_home: bool,
    /// `mount sys`: Apptainer gives containers a /sys.
    pub mount_sys: bool,
    /// `allow setuid`: whether the site lets users have root start
    /// containers at all.
    pub allow_setuid: bool,
    /// `use nvidia-container-cli`: `--nv` would then run that tool as root
    /// on the user's image, which setuid mode refuses.
    pub nvidia_container_cli: bool,
}

impl ApptainerConf {
    pub fn parse(text: &str) -> ApptainerConf {
        let mut values = std::collections::HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            if let Some((k, v)) = line.split_once('=') {
                values.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let get = |k: &str, default: &str| values.get(k).cloned().unwrap_or_else(|| default.to_string());
        let list = |k: &str| -> Vec<String> {
            let v = get(k, "");
            v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty() && s != "NULL").collect()
        };
        let (limit_owners, limit_groups, limit_paths) =
            (list("limit container owners"), list("limit container groups"), list("limit container paths"));
        let limited = !(limit_owners.is_empty() && limit_groups.is_empty() && limit_paths.is_empty());
        let squashfs = match get("allow setuid-mount squashfs", "iflimited").as_str() {
            "yes" => true,
            "iflimited" => limited,
            _ => false,
        };
        ApptainerConf {
            allow_sif: get("allow container sif", "yes") == "yes",
            squashfs_kernel_mount: squashfs,
            extfs_kernel_mount: get("allow setuid-mount extfs", "no") == "yes",
            limit_owners,
            limit_groups,
            limit_paths,
            mount_home: get("mount home", "yes") == "yes",
            mount_sys: get("mount sys", "yes") == "yes",
            allow_setuid: get("allow setuid", "yes") == "yes",
            nvidia_container_cli: get("use nvidia-container-cli", "no") == "yes",
        }
    }

    fn read(settings: &Settings) -> Result<ApptainerConf> {
        let text = std::fs::read_to_string(&settings.apptainer_conf)
            .context(|| format!("cannot read the site's Apptainer configuration {}", settings.apptainer_conf.display()))?;
        Ok(ApptainerConf::parse(&text))
    }
}

/// The largest image root reads (to hash it for the manifest).
const MAX_IMAGE_BYTES: i64 = 64 << 30;

/// SIF partition filesystem types (github.com/apptainer/sif `FSType`).
const SIF_FS_SQUASH: i32 = 1;
const SIF_FS_EXT3: i32 = 2;
const SIF_DATA_PARTITION: i32 = 0x4004;
const SIF_DESCRIPTOR_SIZE: usize = 585;

/// Filesystem types of the partitions of a SIF file, read from its header
/// (root reads the bytes of the user's file through the descriptor the
/// user opened; nothing is mounted).
pub fn sif_partitions(file: &File) -> Result<Vec<i32>> {
    use std::os::unix::fs::FileExt;
    let mut header = [0u8; 128];
    file.read_exact_at(&mut header, 0).map_err(|_| EngineError::Failed("the container image is not a SIF file (too short)".into()))?;
    if &header[32..41] != b"SIF_MAGIC" {
        return fail("the container image is not a SIF file");
    }
    let i64_at = |b: &[u8], o: usize| i64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let (total, offset) = (i64_at(&header, 88), i64_at(&header, 96));
    if !(0..=4096).contains(&total) || offset < 0 {
        return fail("the container image has a malformed SIF header");
    }
    let mut descriptors = vec![0u8; total as usize * SIF_DESCRIPTOR_SIZE];
    file.read_exact_at(&mut descriptors, offset as u64)
        .map_err(|_| EngineError::Failed("the container image's SIF descriptors are truncated".into()))?;
    let mut out = Vec::new();
    for d in descriptors.chunks(SIF_DESCRIPTOR_SIZE) {
        let datatype = i32::from_le_bytes(d[0..4].try_into().unwrap());
        let used = d[4] != 0;
        if used && datatype == SIF_DATA_PARTITION {
            out.push(i32::from_le_bytes(d[201..205].try_into().unwrap()));
        }
    }
    Ok(out)
}

/// Whether setuid Apptainer would let `user` run `image` (opened by them)
/// under `conf`; the reason if not.
fn check_image(conf: &ApptainerConf, user: &User, opened: &Opened, real_path: &str) -> Result<()> {
    let image = &opened.fd;
    let st = fstat(image)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return fail(format!("container image {real_path} is not a regular file (only SIF files are checkpointed)"));
    }
    // Checked here, read again by root's Apptainer and mounted by the
    // kernel: the user must not be able to change it in between, or while
    // it is mounted (a filesystem image rewritten under the kernel).
    let group_writable = st.st_mode & 0o020 != 0 && (st.st_gid == user.gid || user.groups.contains(&st.st_gid));
    let has_acl = crate::sys::has_xattr(image, c"system.posix_acl_access");
    // Decided here from the inode, whatever mount she opened it through;
    // her own answer (`writable_by_user`) only adds to it.
    if opened.writable_by_user || st.st_uid == user.uid || group_writable || st.st_mode & 0o002 != 0 || has_acl {
        return fail(format!(
            "container image {real_path} is yours, writable by you or carries an ACL: root mounts only images you cannot change"
        ));
    }
    if st.st_size > MAX_IMAGE_BYTES {
        return fail(format!("container image {real_path} is larger than {} GiB", MAX_IMAGE_BYTES >> 30));
    }
    let fs = nix::sys::statfs::fstatfs(image).context(|| "fstatfs".into())?;
    if fs.filesystem_type().0 as i64 == FUSE_SUPER_MAGIC {
        return fail(format!("container image {real_path} is on a FUSE filesystem, which root does not read"));
    }
    let file = File::from(image.try_clone().context(|| "dup".into())?);
    let partitions = sif_partitions(&file)?;
    if !conf.allow_sif {
        return fail("the site's apptainer.conf does not allow SIF containers (allow container sif)");
    }
    for fs in partitions {
        let allowed = match fs {
            SIF_FS_SQUASH => conf.squashfs_kernel_mount,
            SIF_FS_EXT3 => conf.extfs_kernel_mount,
            _ => false,
        };
        if !allowed {
            let what = match fs {
                SIF_FS_SQUASH => "squashfs (allow setuid-mount squashfs is no, or iflimited without a limit container setting)".to_string(),
                SIF_FS_EXT3 => "ext3 (allow setuid-mount extfs)".to_string(),
                other => format!("of type {other} (encrypted or unknown)"),
            };
            return fail(format!(
                "the site's apptainer.conf does not let users have root mount a {what} partition like the one in {real_path}"
            ));
        }
    }
    let name_of_uid = |uid: u32| nix::unistd::User::from_uid(uid.into()).ok().flatten().map(|u| u.name).unwrap_or_default();
    let name_of_gid = |gid: u32| nix::unistd::Group::from_gid(gid.into()).ok().flatten().map(|g| g.name).unwrap_or_default();
    if !conf.limit_owners.is_empty() && !conf.limit_owners.contains(&name_of_uid(st.st_uid)) {
        return fail(format!("container image {real_path} is not owned by a user in the site's limit container owners"));
    }
    if !conf.limit_groups.is_empty() && !conf.limit_groups.contains(&name_of_gid(st.st_gid)) {
        return fail(format!("container image {real_path} is not owned by a group in the site's limit container groups"));
    }
    if !conf.limit_paths.is_empty() && !conf.limit_paths.iter().any(|p| Path::new(real_path).starts_with(p)) {
        return fail(format!("container image {real_path} is outside the site's limit container paths"));
    }
    Ok(())
}

/// Names Apptainer never passes from the host into the container, or sets
/// itself: not turned into `APPTAINERENV_*`.
const NOT_PASSED: &[&str] = &["PATH", "HOME", "PWD", "PS1", "TERM_PROGRAM"];

/// What Apptainer (1.3, 1.4) appends to its own `PATH` when it starts; the
/// container's `USER_PATH` is that `PATH`.
const APPTAINER_PATH_SUFFIX: &str = ":/bin:/usr/bin:/sbin:/usr/sbin:/usr/local/bin:/usr/local/sbin";

fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_') && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// What a protected container's environment has unless the job gives the
/// container its own value: MPI runtimes' choices CRIU can checkpoint
/// (docs/transparency.md lists each, with why).
pub const CHECKPOINTABLE_DEFAULTS: &[(&str, &str)] = &[
    // UCX (MPICH's transport) keeps shared-memory FIFOs in SysV segments,
    // which live in the node's IPC namespace, which CRIU could dump only
    // with CAP_SYS_ADMIN; without them it uses /dev/shm files, which travel.
    ("UCX_TLS", "^sysv"),
];

/// Root's environment for Apptainer: built, not inherited. The job's
/// variables become `APPTAINERENV_*` (Apptainer puts them into the
/// container; nothing running as root interprets them: not the loader,
/// not glibc's locale or iconv, not Go's runtime); Apptainer's own settings
/// (`APPTAINER_*`, options by another name) are dropped, except binds,
/// which `policy.rs` has taken in as binds.
pub fn root_env(user_env: &[(String, String)], cleanenv: bool, config_dir: &Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = vec![
        ("PATH".into(), SYSTEM_PATH.into()),
        ("HOME".into(), config_dir.display().to_string()),
        ("APPTAINER_CONFIGDIR".into(), config_dir.display().to_string()),
        ("LANG".into(), "C".into()),
    ];
    let explicit: Vec<&str> =
        user_env.iter().filter_map(|(k, _)| k.strip_prefix("APPTAINERENV_").or_else(|| k.strip_prefix("SINGULARITYENV_"))).collect();
    for (k, v) in user_env {
        if !valid_env_name(k) {
            continue;
        }
        if k.starts_with("APPTAINERENV_") || k.starts_with("SINGULARITYENV_") {
            out.push((k.clone(), v.clone()));
        } else if k.starts_with("APPTAINER_") || k.starts_with("SINGULARITY_") || cleanenv || NOT_PASSED.contains(&k.as_str()) {
            continue;
        } else if !explicit.contains(&k.as_str()) {
            out.push((format!("APPTAINERENV_{k}"), v.clone()));
        }
    }
    // Unprotected, `USER_PATH` shows the user's PATH (unless the
    // environment is cleaned); root's Apptainer runs with the system's.
    let path = user_env.iter().find(|(k, _)| k == "PATH");
    if let (Some((_, path)), false) = (path, cleanenv || explicit.contains(&"USER_PATH")) {
        out.push(("APPTAINERENV_USER_PATH".into(), format!("{path}{APPTAINER_PATH_SUFFIX}")));
    }
    for (name, value) in CHECKPOINTABLE_DEFAULTS {
        let passed = !cleanenv && user_env.iter().any(|(k, _)| k == name);
        if !passed && !explicit.contains(name) {
            out.push((format!("APPTAINERENV_{name}"), value.to_string()));
        }
    }
    out
}

fn absolute(cwd: &str, path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{path}", cwd.trim_end_matches('/'))
    }
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Whether something is mounted at `path` (its device differs from its
/// parent's).
fn is_mount_point(path: &Path) -> bool {
    let dev = |p: &Path| std::fs::symlink_metadata(p).map(|m| m.dev()).ok();
    path.parent().is_some_and(|parent| dev(path).is_some() && dev(path) != dev(parent))
}

/// Where the ranks launcher (the `checkpoint-container-ranks` crate) is
/// inside a container of several ranks: a read-only bind of the root-owned
/// file next to the helper, added by root for a protected `srun --mpi=pmi2
/// -n N` step (agent/ranks.rs) and for the restore of such a step.
pub const RANKS_IN_CONTAINER: &str = "/.checkpoint-container-ranks";
const RANKS_BINARY: &str = "checkpoint-container-ranks";

/// What the container runs.
#[derive(Clone, Copy)]
pub enum Payload<'a> {
    /// The user's command.
    Program,
    /// The ranks launcher with these arguments, starting the user's command
    /// once per rank.
    Ranks(&'a [String]),
    /// Restore's placeholder; `ranks`: the checkpointed container had the
    /// ranks launcher (the restored one finds it where it was).
    Placeholder { argv: &'a [&'a str], ranks: bool },
}

/// The ranks launcher on this node: next to the helper, root's, in a
/// directory only root can change (the plugin checked the helper's).
fn ranks_binary() -> Result<PathBuf> {
    let helper = std::env::current_exe().context(|| "own path".into())?;
    let path = helper.with_file_name(RANKS_BINARY);
    let md = std::fs::metadata(&path).context(|| format!("{} (the ranks launcher)", path.display()))?;
    if md.uid() != 0 || md.mode() & 0o022 != 0 || !md.is_file() {
        return fail(format!("{} is not a root-owned file only root can change", path.display()));
    }
    Ok(path)
}

/// Checks the user's request and stages it for root. `payload`: what the
/// container runs. Any error means the
/// container cannot be started by root for this user: the caller runs the
/// command unprotected, as the user, and says why.
pub fn prepare(settings: &Settings, user: &User, req: &Request, payload: Payload) -> Result<Launch> {
    let cmd = ContainerCommand::parse(req.argv.to_vec())?;
    let plan: Plan = policy::plan(&cmd, user.uid, user.gid, req.env)?;
    // Both are written into bind specs below.
    if !policy::fits_in_bind_spec(req.cwd) {
        return fail(format!("working directory {:?} has characters Apptainer reads as bind separators", req.cwd));
    }
    if !policy::fits_in_bind_spec(&user.home) {
        return fail(format!("home directory {:?} has characters Apptainer reads as bind separators", user.home));
    }
    let conf = ApptainerConf::read(settings)?;
    if !conf.allow_setuid {
        return fail("the site's apptainer.conf does not allow setuid (root-started) containers");
    }
    if conf.nvidia_container_cli && plan.options.iter().any(|o| o == "--nv") {
        return fail("--nv with the site's use nvidia-container-cli = yes would run that tool as root on your image");
    }
    let share_home = !plan.contain && !plan.no_home && conf.mount_home;
    // The working directory, when the home mount does not already show it.
    let under_home = share_home && Path::new(req.cwd).starts_with(&user.home);
    let share_cwd = !plan.contain && !["/", "/tmp", "/var/tmp"].iter().any(|d| Path::new(req.cwd) == Path::new(d)) && !under_home;

    let mut wanted = vec![(Kind::Image, absolute(req.cwd, &plan.image))];
    wanted.extend(plan.binds.iter().map(|b| (Kind::Path, absolute(req.cwd, &b.src))));
    if share_home {
        wanted.push((Kind::Path, user.home.clone()));
    }
    if share_cwd {
        wanted.push((Kind::Path, req.cwd.to_string()));
    }
    let mut opened = open_as_user(user, &wanted)?
        .into_iter()
        .zip(&wanted)
        .map(|(r, (_, p))| r.map_err(|why| EngineError::Failed(format!("{p} cannot be opened by you: {why}"))));
    let mut next = || opened.next().expect("one answer per path");

    let image_opened = next()?;
    let image_fd = &image_opened.fd;
    let image_name = fd_path(image_fd);
    check_image(&conf, user, &image_opened, &image_name)?;
    let mut staging = Staging::new()?;
    // Apptainer checks `limit container paths` on the path it is given, so
    // the image keeps its own path where only root can change what that
    // path names; elsewhere Apptainer gets the staged bind of what the user
    // opened, which a site that limits paths does not allow.
    let same_file =
        std::fs::metadata(&image_name).is_ok_and(|m| fstat(image_fd).is_ok_and(|st| st.st_dev == m.dev() && st.st_ino == m.ino()));
    let in_root_only_dir = same_file && Path::new(&image_name).parent().is_some_and(|p| crate::storage::trusted_dir(p, None).is_ok());
    let image = if in_root_only_dir {
        PathBuf::from(&image_name)
    } else if conf.limit_paths.is_empty() {
        staging.mount(image_fd, "image.sif")?
    } else {
        return fail(format!(
            "container image {image_name} is in a directory users can change, and the site limits container paths: \
             only images in directories only root can change are started by root"
        ));
    };

    let mut argv: Vec<String> = vec![settings.apptainer.display().to_string()];
    argv.extend(plan.globals.iter().cloned());
    argv.push(if matches!(payload, Payload::Program) { plan.subcommand.clone() } else { "exec".into() });
    argv.extend(["--security".into(), format!("uid:{},gid:{}", user.uid, user.gid)]);
    argv.extend(plan.options.iter().cloned());
    let mut dests = Vec::new();
    for (i, bind) in plan.binds.iter().enumerate() {
        let staged = staging.mount(&next()?.fd, &format!("bind{i}"))?;
        let dest = bind.dest.clone().unwrap_or_else(|| absolute(req.cwd, &bind.src));
        dests.push(dest.clone());
        if !policy::fits_in_bind_spec(&dest) {
            return fail(format!("bind destination {dest:?} has characters Apptainer reads as separators"));
        }
        let ro = if bind.read_only { ":ro" } else { "" };
        argv.extend(["--bind".into(), format!("{}:{dest}{ro}", staged.display())]);
    }
    // Root-started with --security, Apptainer ignores a --home source and
    // binds the target user's passwd home, resolved as root (1.4, measured;
    // contained, too). So it mounts no home (--no-home), --home only names
    // HOME (its source root's, empty, never mounted), and the home is a
    // bind of what the user opened.
    let no_home = staging.dir.join("no-home");
    std::fs::DirBuilder::new().mode(0o755).create(&no_home).context(|| format!("cannot create {}", no_home.display()))?;
    argv.extend(["--no-home".into(), "--home".into(), format!("{}:{}", no_home.display(), user.home)]);
    if share_home {
        let staged = staging.mount(&next()?.fd, "home")?;
        argv.extend(["--bind".into(), format!("{}:{}", staged.display(), user.home)]);
    } else if plan.contain && !plan.no_home && conf.mount_home {
        // Contained, the user's Apptainer gives her an empty home of her
        // own in its session.
        let empty = staging.tmpfs("home", user)?;
        argv.extend(["--bind".into(), format!("{}:{}", empty.display(), user.home)]);
    }
    if share_cwd {
        let staged = staging.mount(&next()?.fd, "cwd")?;
        argv.extend(["--bind".into(), format!("{}:{}", staged.display(), req.cwd)]);
    }
    if !plan.contain && !plan.pwd_given {
        argv.extend(["--pwd".into(), req.cwd.to_string()]);
    }
    // Unprivileged Apptainer binds the node's /sys with what is mounted
    // below it; root-started, it mounts a fresh sysfs, whose
    // /sys/fs/cgroup is empty. The node's hierarchies show the container
    // what the user sees outside it (her cgroups' files keep their modes).
    if conf.mount_sys && is_mount_point(Path::new(CGROUP_ROOT)) {
        argv.extend(["--bind".into(), format!("{CGROUP_ROOT}:{CGROUP_ROOT}")]);
    }
    if matches!(payload, Payload::Ranks(_) | Payload::Placeholder { ranks: true, .. }) {
        argv.extend(["--bind".into(), format!("{}:{RANKS_IN_CONTAINER}:ro", ranks_binary()?.display())]);
    }
    argv.push(image.display().to_string());
    match payload {
        Payload::Placeholder { argv: p, .. } => argv.extend(p.iter().map(|s| s.to_string())),
        Payload::Program => argv.extend(plan.args.iter().cloned()),
        Payload::Ranks(launcher) => {
            argv.push(RANKS_IN_CONTAINER.into());
            argv.extend(launcher.iter().cloned());
            argv.push("--".into());
            // What `apptainer run` runs, started once per rank.
            if plan.subcommand == "run" {
                argv.push("/.singularity.d/runscript".into());
            }
            argv.extend(plan.args.iter().cloned());
        }
    }
    // Apptainer's per-user state (remote.yaml, caches) goes to a fresh
    // root-owned directory: root never writes under a path the user chose.
    let config_dir = staging.dir.join("config");
    std::fs::DirBuilder::new().mode(0o700).create(&config_dir).context(|| format!("cannot create {}", config_dir.display()))?;
    let mut env = root_env(req.env, plan.cleanenv, &config_dir);
    // Apptainer tells the container the destinations of its binds; the
    // user's Apptainer would name hers only, not the ones added here.
    for name in ["APPTAINER_BIND", "SINGULARITY_BIND"] {
        let var = format!("APPTAINERENV_{name}");
        if !env.iter().any(|(k, _)| *k == var) {
            env.push((var, dests.join(",")));
        }
    }
    Ok(Launch { argv, env, image, image_name, _staging: staging })
}

/// Whether `claimed` (the task's argv[0] as the user's PATH resolved it)
/// is the site's Apptainer, compared by file identity.
pub fn is_site_runtime(settings: &Settings, claimed: &str) -> bool {
    let ident = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    let site = ident(&settings.apptainer);
    site.is_some() && ident(Path::new(claimed)) == site
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setuid_mount_rules_follow_apptainer() {
        let c = ApptainerConf::parse("# allow setuid-mount squashfs = yes\nallow container sif = yes\n");
        assert!(c.allow_sif && !c.squashfs_kernel_mount && !c.extfs_kernel_mount && c.mount_home && c.allow_setuid);
        assert!(!c.nvidia_container_cli);
        let c = ApptainerConf::parse("allow setuid = no\nuse nvidia-container-cli = yes\n");
        assert!(!c.allow_setuid && c.nvidia_container_cli);
        let c = ApptainerConf::parse("limit container paths = /shared/images, /apps\n");
        assert!(c.squashfs_kernel_mount);
        assert_eq!(c.limit_paths, ["/shared/images", "/apps"]);
        let c = ApptainerConf::parse("allow setuid-mount squashfs = yes\nallow setuid-mount extfs = yes\nmount home = no\n");
        assert!(c.squashfs_kernel_mount && c.extfs_kernel_mount && !c.mount_home && c.mount_sys);
        assert!(!ApptainerConf::parse("mount sys = no\n").mount_sys);
        let c = ApptainerConf::parse("allow setuid-mount squashfs = no\nlimit container owners = root\n");
        assert!(!c.squashfs_kernel_mount);
    }

    #[test]
    fn the_job_environment_reaches_only_the_container() {
        let env: Vec<(String, String)> = [
            ("LD_PRELOAD", "/x.so"),
            ("GLIBC_TUNABLES", "x"),
            ("LANG", "../../home/a/l"),
            ("APPTAINER_CONFIGDIR", "/root"),
            ("APPTAINERENV_FOO", "1"),
            ("FOO", "2"),
            ("PATH", "/home/a/bin"),
            ("HOME", "/home/a"),
            ("BAD NAME", "x"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let out = root_env(&env, false, Path::new("/run/x/config"));
        let get = |k: &str| out.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PATH"), Some(SYSTEM_PATH));
        assert_eq!(get("HOME"), Some("/run/x/config"));
        assert_eq!(get("APPTAINER_CONFIGDIR"), Some("/run/x/config"));
        assert_eq!(get("LANG"), Some("C"));
        assert_eq!(get("APPTAINERENV_LD_PRELOAD"), Some("/x.so"));
        assert_eq!(get("APPTAINERENV_LANG"), Some("../../home/a/l"));
        // An explicit APPTAINERENV_ wins over the host variable.
        assert_eq!(get("APPTAINERENV_FOO"), Some("1"));
        assert_eq!(out.iter().filter(|(k, _)| k == "APPTAINERENV_FOO").count(), 1);
        assert_eq!(get("APPTAINERENV_USER_PATH"), Some("/home/a/bin:/bin:/usr/bin:/sbin:/usr/sbin:/usr/local/bin:/usr/local/sbin"));
        for k in ["LD_PRELOAD", "GLIBC_TUNABLES", "FOO", "APPTAINERENV_PATH", "APPTAINERENV_HOME", "BAD NAME", "APPTAINERENV_BAD NAME"] {
            assert_eq!(get(k), None, "{k}");
        }
        let clean = root_env(&env, true, Path::new("/c"));
        let defaults: Vec<String> = CHECKPOINTABLE_DEFAULTS.iter().map(|(k, _)| format!("APPTAINERENV_{k}")).collect();
        assert!(clean.iter().all(|(k, _)| !k.starts_with("APPTAINERENV_") || k == "APPTAINERENV_FOO" || defaults.contains(k)), "{clean:?}");
    }

    #[test]
    fn checkpointable_defaults_yield_to_the_jobs_own_values() {
        let owned = |v: &[(&str, &str)]| v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        let get =
            |out: &[(String, String)]| out.iter().filter(|(k, _)| k == "APPTAINERENV_UCX_TLS").map(|(_, v)| v.clone()).collect::<Vec<_>>();
        let c = Path::new("/c");
        assert_eq!(get(&root_env(&[], false, c)), ["^sysv"]);
        assert_eq!(get(&root_env(&owned(&[("UCX_TLS", "sm,self")]), false, c)), ["sm,self"]);
        assert_eq!(get(&root_env(&owned(&[("APPTAINERENV_UCX_TLS", "tcp")]), true, c)), ["tcp"]);
        // A cleaned environment does not pass hers: the container gets ours.
        assert_eq!(get(&root_env(&owned(&[("UCX_TLS", "sm,self")]), true, c)), ["^sysv"]);
    }

    #[test]
    fn sif_partitions_are_read_from_the_descriptors() {
        let dir = std::env::temp_dir().join(format!("sif-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.sif");
        let mut bytes = vec![0u8; 128 + 3 * SIF_DESCRIPTOR_SIZE];
        bytes[32..42].copy_from_slice(b"SIF_MAGIC\0");
        bytes[88..96].copy_from_slice(&3i64.to_le_bytes());
        bytes[96..104].copy_from_slice(&128i64.to_le_bytes());
        let mut put = |i: usize, datatype: i32, used: bool, fs: i32| {
            let d = 128 + i * SIF_DESCRIPTOR_SIZE;
            bytes[d..d + 4].copy_from_slice(&datatype.to_le_bytes());
            bytes[d + 4] = used as u8;
            bytes[d + 201..d + 205].copy_from_slice(&fs.to_le_bytes());
        };
        put(0, SIF_DATA_PARTITION, true, SIF_FS_SQUASH);
        put(1, SIF_DATA_PARTITION, true, SIF_FS_EXT3);
        put(2, SIF_DATA_PARTITION, false, 5);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(sif_partitions(&File::open(&path).unwrap()).unwrap(), [SIF_FS_SQUASH, SIF_FS_EXT3]);
        std::fs::write(&path, b"#!/bin/sh\n").unwrap();
        assert!(sif_partitions(&File::open(&path).unwrap()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
