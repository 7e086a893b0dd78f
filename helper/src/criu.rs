//! Finding CRIU and checking that it can work on this kernel.
//!
//! CRIU older than 4 fails at start on the kernels we run on (vDSO layout),
//! so a node without a recent CRIU must be reported clearly, with the version
//! found, instead of failing obscurely at checkpoint time.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The oldest CRIU this product supports.
pub const MIN_VERSION: Version = Version { major: 4, minor: 0, patch: 0 };

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[derive(Debug)]
pub enum CriuError {
    /// The binary could not be executed at all.
    NotRunnable { path: PathBuf, why: String },
    /// `criu --version` printed nothing we understand.
    UnknownVersion { path: PathBuf, output: String },
    /// Found, but too old for this kernel.
    TooOld { path: PathBuf, found: Version },
    /// Not a statically linked executable: it would load code from the
    /// container it runs in.
    NotStatic { path: PathBuf, why: String },
}

impl fmt::Display for CriuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CriuError::NotRunnable { path, why } => {
                write!(f, "CRIU at {} cannot be run: {why}", path.display())
            }
            CriuError::UnknownVersion { path, output } => {
                write!(f, "CRIU at {} printed no version we understand: {:?}", path.display(), output.lines().next().unwrap_or(""))
            }
            CriuError::TooOld { path, found } => {
                write!(f, "CRIU at {} is version {found}, but {MIN_VERSION} or newer is required", path.display())
            }
            CriuError::NotStatic { path, why } => write!(
                f,
                "CRIU at {} {why}: it runs with capabilities inside users' containers, where a dynamic loader would \
read the container's /etc/ld.so.preload and libraries; use a statically linked CRIU (docs/security.md)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for CriuError {}

impl From<CriuError> for crate::error::EngineError {
    fn from(e: CriuError) -> Self {
        crate::error::EngineError::Failed(e.to_string())
    }
}

/// Parses the output of `criu --version` ("Version: 4.2.1", then optional lines
/// such as "GitID: …"). Two-part versions ("Version: 4.1") have patch 0.
pub fn parse_version(output: &str) -> Option<Version> {
    let line = output.lines().find_map(|l| l.trim().strip_prefix("Version:"))?;
    let mut parts = line.trim().split('.');
    let mut num = || -> Option<u32> {
        match parts.next() {
            None => Some(0),
            Some(p) => p.trim().parse().ok(),
        }
    };
    let version = Version { major: num()?, minor: num()?, patch: num()? };
    Some(version)
}

/// Why an executable cannot be CRIU: not an ELF executable, or one that
/// names a program interpreter (dynamic loader).
fn static_elf(elf: &[u8]) -> Result<(), String> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return Err("is not a 64-bit ELF executable".into());
    }
    match elf_interpreter(elf) {
        Some(interp) => Err(format!("is dynamically linked (program interpreter {interp})")),
        None => Ok(()),
    }
}

/// Opens the CRIU binary and checks it is a statically linked ELF file,
/// reading the very file that will be executed (through the returned fd).
fn open_static(criu: &Path) -> Result<std::fs::File, CriuError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let not_runnable = |why: String| CriuError::NotRunnable { path: criu.to_path_buf(), why };
    let mut file = std::fs::File::options().read(true).custom_flags(libc::O_CLOEXEC).open(criu).map_err(|e| not_runnable(e.to_string()))?;
    let mut elf = Vec::new();
    (&mut file).take(1 << 26).read_to_end(&mut elf).map_err(|e| not_runnable(e.to_string()))?;
    static_elf(&elf).map_err(|why| CriuError::NotStatic { path: criu.to_path_buf(), why })?;
    Ok(file)
}

/// Checks CRIU is a statically linked executable, runs `criu --version`
/// and checks the version is supported.
pub fn check(criu: &Path) -> Result<Version, CriuError> {
    open_static(criu)?;
    let out = Command::new(criu)
        .arg("--version")
        .env_clear()
        .output()
        .map_err(|e| CriuError::NotRunnable { path: criu.to_path_buf(), why: e.to_string() })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(CriuError::NotRunnable {
            path: criu.to_path_buf(),
            why: format!("`--version` exited with {}: {}", out.status, stderr.trim()),
        });
    }
    let found = parse_version(&stdout).ok_or_else(|| CriuError::UnknownVersion { path: criu.to_path_buf(), output: stdout })?;
    if found < MIN_VERSION {
        return Err(CriuError::TooOld { path: criu.to_path_buf(), found });
    }
    Ok(found)
}

/// Capabilities CRIU keeps when it runs as the job user (`--unprivileged`):
/// enough to seize and dump that user's processes, restore their pids and
/// memory layout, and nothing more. Images pass through the helper's
/// streamer, so CRIU never reads or writes the checkpoint directory.
pub const CRIU_CAPS: &[caps::Capability] = &[caps::Capability::CAP_CHECKPOINT_RESTORE, caps::Capability::CAP_SYS_PTRACE];

/// fd numbers at which CRIU receives the directory it works in (the image
/// streamer's socket, its log), the empty directory (its plugin directory
/// and `PATH`) and its kernel-feature cache. It is given them as
/// `/proc/self/fd/N`, which resolves in any mount and PID namespace: the
/// container's /proc does not show the helper when the container has a PID
/// namespace of its own.
pub const IMAGES_FD: i32 = 100;
const EMPTY_FD: i32 = 101;
const KDAT_FD: i32 = 102;
/// Where a restore's CRIU holds the socket that stands for Slurm's PMI one.
pub const PMI_FD: i32 = 103;

/// One CRIU run inside a container's namespaces, as the container's user.
///
/// Why inside its mount namespace: CRIU then sees the container's mounts as
/// its own and neither dumps nor rebuilds them (Apptainer's session mounts
/// are what stopped every attempt to dump the mount namespace, see
/// docs/checkpoint-engine.md). Its PID namespace: CRIU restores pids and
/// checks sessions in its own one. Its network namespace (when it has one):
/// TCP connections are repaired in place. Why as the user: prlimit, /proc
/// and file reopening then work with the user's rights, and the restored
/// files are opened with them.
pub struct Invocation<'a> {
    pub criu: &'a Path,
    /// A process whose namespaces CRIU joins.
    pub ns_of: i32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups. CRIU restores a thread's groups with
    /// setgroups(2), which it may not call (no CAP_SETGID), unless they are
    /// its own already: a restore runs it with the restored ones.
    pub groups: Vec<u32>,
    pub caps: &'a [caps::Capability],
    pub images_dir: &'a std::fs::File,
    /// Further files CRIU holds, at their numbers (`--inherit-fd`'s).
    pub inherited: Vec<(std::fs::File, i32)>,
    pub options: Options,
}

/// CRIU's command line for a dump or a restore: the options both share,
/// then the action's own (`Invocation::command` adds those of the
/// container's network namespace).
pub struct Options {
    action: Action,
    log: &'static str,
    own: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    Dump,
    Restore,
}

impl Options {
    /// Dumps the tree rooted at `root_pid`, logging to `log` in the images
    /// directory.
    pub fn dump(root_pid: i32, log: &'static str) -> Options {
        Options { action: Action::Dump, log, own: vec!["-t".into(), root_pid.to_string()] }
    }

    /// Restores, logging to `log` and writing the root's pid to `pidfile`,
    /// both in the images directory.
    pub fn restore(log: &'static str, pidfile: &str) -> Options {
        Options { action: Action::Restore, log, own: vec!["--pidfile".into(), pidfile.into()] }
    }

    /// Dump: a resource outside the tree, recorded under `key`.
    pub fn external(&mut self, key: &str) {
        self.own.extend(["--external".into(), key.into()]);
    }

    /// Restore: our `fd` stands for the resource recorded under `key`.
    pub fn inherit_fd(&mut self, fd: i32, key: &str) {
        self.own.extend(["--inherit-fd".into(), format!("fd[{fd}]:{key}")]);
    }

    /// Dump: files the tree holds open or mapped after deleting them (MPI
    /// libraries' shared-memory segments in /dev/shm are) are carried in
    /// the checkpoint up to this many bytes each; CRIU's own default is
    /// 1 MiB.
    pub fn ghost_limit(&mut self, bytes: u64) {
        self.own.extend(["--ghost-limit".into(), bytes.to_string()]);
    }

    /// Dump: the tree stays stopped afterwards.
    pub fn leave_stopped(&mut self) {
        self.own.push("--leave-stopped".into());
    }

    /// The arguments after CRIU's own configuration options; `own_net`:
    /// the tree has a network namespace of its own.
    fn args(&self, own_net: bool) -> Vec<String> {
        let action = match self.action {
            Action::Dump => "dump",
            Action::Restore => "restore",
        };
        let mut args: Vec<String> = [action, "--stream", "--unprivileged", "--shell-job", "--manage-cgroups=ignore", "-v3", "-o", self.log]
            .map(String::from)
            .into();
        args.extend(self.own.iter().cloned());
        args.extend(["-D".into(), format!("/proc/self/fd/{IMAGES_FD}")]);
        if own_net {
            args.push("--tcp-established".into());
            if self.action == Action::Dump {
                args.extend(["--network-lock".into(), "skip".into()]);
            }
        }
        args
    }
}

/// CRIU ready to start in the container's namespaces: [`CriuCommand::cmd`]
/// to set stdio, then [`CriuCommand::spawn`].
pub struct CriuCommand {
    cmd: std::process::Command,
    pid_ns: Option<std::fs::File>,
}

impl CriuCommand {
    pub fn cmd(&mut self) -> &mut std::process::Command {
        &mut self.cmd
    }

    pub fn spawn(mut self) -> std::io::Result<std::process::Child> {
        crate::namespaces::spawn_in_pid_ns(&mut self.cmd, self.pid_ns.as_ref())
    }
}

/// The program interpreter (dynamic loader) named in an ELF executable.
fn elf_interpreter(elf: &[u8]) -> Option<String> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return None;
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize);
    let (phoff, phentsize, phnum) = (u64_at(0x20)?, u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32::from_le_bytes(elf.get(ph..ph + 4)?.try_into().ok()?) == 3 {
            let (off, size) = (u64_at(ph + 8)?, u64_at(ph + 32)?);
            let raw = elf.get(off..off + size)?;
            return Some(String::from_utf8_lossy(raw).trim_end_matches('\0').to_string());
        }
    }
    None
}

// What the helper keeps on the node for CRIU runs is in /run, so a reboot
// (a new kernel) drops it.
/// A root-owned empty directory: CRIU's plugin directory (`-L`) and its only
/// `PATH` entry, so that it loads no plugin and finds no program to run.
const EMPTY_DIR: &str = "/run/checkpoint-container/empty";
/// Root-owned cache of CRIU's kernel-feature file, per CRIU binary and boot.
const KDAT_CACHE: &str = "/run/checkpoint-container/criu-kdat";
const KDAT_FILE: &str = "criu.kdat";
/// Where `criu check` writes the kernel-feature file it makes.
const KDAT_WORK: &str = "/run/checkpoint-container/kdat-work";
/// How long making it may take (it probes the kernel: well under a second).
const KDAT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Creates (once) and checks the empty directory: root-owned, writable by
/// root only, with nothing in it.
fn empty_dir() -> Result<&'static str, String> {
    crate::storage::trusted_dir(Path::new(EMPTY_DIR), Some(0o555)).map_err(|e| e.to_string())?;
    if std::fs::read_dir(EMPTY_DIR).map_err(|e| format!("cannot read {EMPTY_DIR}: {e}"))?.next().is_some() {
        return Err(format!("{EMPTY_DIR} must be empty"));
    }
    Ok(EMPTY_DIR)
}

/// What a CRIU child gets: its binary (an fd, executed with execveat, so no
/// path is resolved in the container), the mount and network namespaces to
/// join (none: the node's), the identity, the directories it is given by fd
/// (`fds`: source, number in CRIU), argv and the whole environment.
struct Spawn {
    binary: std::fs::File,
    mnt: Option<std::fs::File>,
    net: Option<std::fs::File>,
    uid: u32,
    gid: u32,
    /// Supplementary groups. CRIU restores a process's groups only by
    /// finding them already its own (it cannot setgroups without
    /// CAP_SETGID): a restore runs it with the restored ones.
    groups: Vec<libc::gid_t>,
    caps: caps::CapsHashSet,
    fds: Vec<(std::fs::File, i32)>,
    argv: Vec<std::ffi::CString>,
    envp: Vec<std::ffi::CString>,
}

impl Spawn {
    // `unsafe` outside crate::sys: what must be async-signal-safe is this
    // hook's body, so only here can it be checked.
    #[allow(unsafe_code)]
    fn command(self) -> std::process::Command {
        use crate::sys;
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let Spawn { binary, mnt, net, uid, gid, groups, caps, fds, argv, envp } = self;
        // Built before the fork: the child may not allocate.
        let exec_args = sys::ExecArgs::new(argv, envp);
        let pairs: Vec<(i32, i32)> = fds.iter().map(|(from, to)| (from.as_raw_fd(), *to)).collect();
        let mut scratch = vec![-1; pairs.len()];
        let above = sys::above_targets(&pairs);
        // Never executed by path: the pre_exec hook below execs the fd.
        let mut cmd = std::process::Command::new("/nonexistent/criu");
        cmd.env_clear();
        // SAFETY: runs in the forked child before exec: async-signal-safe
        // functions of crate::sys, and caps' capset/prctl, which allocate
        // only when one fails (the agent has other threads, which may hold
        // the allocator's lock at the fork).
        unsafe {
            cmd.pre_exec(move || {
                use std::io::Error;
                if let Some(net) = &net {
                    sys::setns(net.as_raw_fd(), libc::CLONE_NEWNET)?;
                }
                if let Some(mnt) = &mnt {
                    sys::setns(mnt.as_raw_fd(), libc::CLONE_NEWNS)?;
                }
                // A session of its own, led inside its PID namespace: with
                // --shell-job the restored tree joins CRIU's session, which
                // must not be one the namespace cannot see (getsid 0).
                sys::setsid()?;
                // `fds` is held by this closure until the spawn: `pairs` names them.
                let _held = &fds;
                // The binary is executed after the descriptors are placed:
                // out of their way first, or a target number (one given to
                // CRIU from the user's task) could replace what is executed.
                let exe = sys::dup_cloexec_above(binary.as_raw_fd(), above)?;
                sys::place_fds(&pairs, &mut scratch)?;
                sys::setgroups(&groups)?;
                sys::keep_caps()?;
                sys::setresgid(gid)?;
                sys::setresuid(uid)?;
                let to_io = |e: caps::errors::CapsError| Error::other(e.to_string());
                caps::set(None, caps::CapSet::Effective, &caps).map_err(to_io)?;
                caps::set(None, caps::CapSet::Permitted, &caps).map_err(to_io)?;
                caps::set(None, caps::CapSet::Inheritable, &caps).map_err(to_io)?;
                for cap in &caps {
                    caps::raise(None, caps::CapSet::Ambient, *cap).map_err(to_io)?;
                }
                Err(exec_args.execveat_fd(exe))
            });
        }
        cmd
    }
}

/// Why the container's /proc cannot be trusted to lead CRIU out of the
/// container, if it cannot: every path given to CRIU (`-D`, `-L`, `PATH`,
/// `XDG_RUNTIME_DIR`) goes through /proc/self or /proc/<this helper>. The
/// container's mounts were made by root when it started (binds the user
/// asked for included) and cannot change after, so reading them once from
/// the node is enough.
fn untrusted_proc(mountinfo: &str) -> Option<String> {
    let mut proc_fstype = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else { continue };
        let (Some(mount_point), Some(fstype)) = (fields.get(4), fields.get(sep + 1)) else { continue };
        if *mount_point == "/proc" {
            proc_fstype = Some(fstype.to_string());
        } else if let Some(below) = mount_point.strip_prefix("/proc/") {
            let first = below.split('/').next().unwrap_or("");
            if first == "self" || first == "thread-self" || (!first.is_empty() && first.bytes().all(|b| b.is_ascii_digit())) {
                return Some(format!("something is mounted on {mount_point}"));
            }
        }
    }
    match proc_fstype.as_deref() {
        Some("proc") => None,
        Some(other) => Some(format!("its /proc is a {other} mount, not procfs")),
        None => Some("it has no /proc mount".into()),
    }
}

fn cstrings(v: impl IntoIterator<Item = String>) -> Result<Vec<std::ffi::CString>, String> {
    v.into_iter().map(|s| std::ffi::CString::new(s).map_err(|_| "an argument contains a NUL byte".to_string())).collect()
}

impl Invocation<'_> {
    /// The command, ready to spawn. Nothing of the container is executed,
    /// loaded or read as configuration by it:
    /// - CRIU is a static binary (checked), opened here and executed by fd;
    /// - `--no-default-config`, and no `HOME` or `CRIU_CONFIG_FILE`: the
    ///   container's /etc/criu/default.conf and ~/.criu are not read (they
    ///   could name action scripts);
    /// - `-L` and `PATH` name a root-owned empty directory of the node, so
    ///   no plugin is loaded and every program CRIU would run by name
    ///   (`cr_system`: iptables, sh, tar, ip) is not found;
    /// - its kernel-feature cache was made in the node's mount namespace
    ///   (`ensure_kdat`), so it does not probe (which runs `sh -c iptables`).
    ///
    /// In a network namespace of the container's own, CRIU also gets
    /// `CAP_NET_ADMIN` (TCP repair needs it in the namespace's owning user
    /// namespace, the node's) and `--tcp-established`, with no network lock
    /// (`--network-lock skip`: every process using that namespace is in the
    /// frozen tree or is our init and Apptainer, and locking would run
    /// iptables). docs/security.md says why that capability stays there.
    pub fn command(&self) -> Result<CriuCommand, CriuError> {
        let not_runnable = |why: String| CriuError::NotRunnable { path: self.criu.to_path_buf(), why };
        let mut caps: caps::CapsHashSet = self.caps.iter().copied().collect();
        let kdat = ensure_kdat(self.criu, self.uid, self.gid, &caps).map_err(|e| not_runnable(format!("no kernel-feature cache: {e}")))?;
        let kdat_dir = std::fs::File::open(&kdat).map_err(|e| not_runnable(format!("cannot open {}: {e}", kdat.display())))?;
        let empty =
            std::fs::File::open(empty_dir().map_err(not_runnable)?).map_err(|e| not_runnable(format!("cannot open {EMPTY_DIR}: {e}")))?;
        let binary = open_static(self.criu)?;
        let refuse = |why: String| not_runnable(format!("refusing to run it in the container of process {}: {why}", self.ns_of));
        // The process is the user's and may switch namespaces at any time:
        // what CRIU joins are the namespaces just opened, each one only root
        // can have made or changed (owned by our user namespace; a PID
        // namespace a child of ours), and the mount namespace the one whose
        // mounts are read below.
        let joined = crate::namespaces::open_checked(self.ns_of).map_err(refuse)?;
        let mountinfo = std::fs::read_to_string(format!("/proc/{}/mountinfo", self.ns_of))
            .map_err(|e| not_runnable(format!("cannot read the mounts of process {}: {e}", self.ns_of)))?;
        let still = std::fs::File::open(format!("/proc/{}/ns/mnt", self.ns_of)).is_ok_and(|f| same_file(&f, &joined.mnt));
        if !still {
            return Err(refuse("it changed mount namespace while being checked".into()));
        }
        if let Some(why) = untrusted_proc(&mountinfo) {
            return Err(refuse(why));
        }
        if joined.net.is_some() {
            caps.insert(caps::Capability::CAP_NET_ADMIN);
        }
        let fd_path = |fd: i32| format!("/proc/self/fd/{fd}");
        let mut argv = vec!["criu".to_string(), "--no-default-config".into(), "-L".into(), fd_path(EMPTY_FD)];
        argv.extend(self.options.args(joined.net.is_some()));
        let envp = vec![format!("PATH={}", fd_path(EMPTY_FD)), format!("XDG_RUNTIME_DIR={}", fd_path(KDAT_FD))];
        let images = self.images_dir.try_clone().map_err(|e| not_runnable(format!("dup: {e}")))?;
        let mut fds = vec![(images, IMAGES_FD), (empty, EMPTY_FD), (kdat_dir, KDAT_FD)];
        for (file, n) in &self.inherited {
            fds.push((file.try_clone().map_err(|e| not_runnable(format!("dup: {e}")))?, *n));
        }
        let cmd = Spawn {
            binary,
            mnt: Some(joined.mnt),
            net: joined.net,
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
            caps,
            fds,
            argv: cstrings(argv).map_err(not_runnable)?,
            envp: cstrings(envp).map_err(not_runnable)?,
        }
        .command();
        Ok(CriuCommand { cmd, pid_ns: joined.pid })
    }
}

/// Whether two open files are the same inode (namespaces compare so).
fn same_file(a: &std::fs::File, b: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    matches!((a.metadata(), b.metadata()), (Ok(x), Ok(y)) if x.ino() == y.ino() && x.dev() == y.dev())
}

/// Where CRIU's kernel-feature cache (`criu.kdat`, looked for in
/// `$XDG_RUNTIME_DIR` when not root) is kept for this CRIU binary and boot.
fn kdat_dir(criu: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(criu).ok()?;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let mut key = crate::manifest::Checksum::default();
    key.update(format!("{}:{}:{}:{}:{}", m.ino(), m.size(), m.mtime(), m.ctime(), boot.trim()).as_bytes());
    Some(Path::new(KDAT_CACHE).join(key.hex()))
}

/// The directory holding a `criu.kdat` for this CRIU binary and boot,
/// produced first if missing.
///
/// Without that file CRIU probes the kernel at start, and the probe runs
/// `sh -c "iptables -n -w -L"` by name. So the file is always made here, in
/// the node's mount namespace, by `criu check` as the user with the same
/// capabilities (the file then describes what that unprivileged CRIU sees),
/// with the same empty `PATH` and plugin directory, writing into a
/// directory only that CRIU reaches (a user-owned directory inside a
/// root-only one, passed by fd). The helper copies the file, if it is a
/// plain one of sane size, into its root-owned cache; the user never
/// writes the cache, and CRIU in the container only reads it.
pub fn ensure_kdat(criu: &Path, uid: u32, gid: u32, caps: &caps::CapsHashSet) -> Result<PathBuf, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = kdat_dir(criu).ok_or_else(|| format!("cannot key the cache for {}", criu.display()))?;
    if dir.join(KDAT_FILE).is_file() {
        return Ok(dir);
    }
    let empty = empty_dir()?;
    let work_dir = crate::storage::UserWorkDir::create(Path::new(KDAT_WORK), uid, gid).map_err(|e| e.to_string())?;
    let work = &work_dir.path;
    let work_fd = std::fs::File::open(work).map_err(|e| format!("cannot open {}: {e}", work.display()))?;
    let binary = open_static(criu).map_err(|e| e.to_string())?;
    let here = format!("/proc/self/fd/{IMAGES_FD}");
    let empty_path = format!("/proc/self/fd/{EMPTY_FD}");
    let argv =
        ["criu", "--no-default-config", "-L", &empty_path, "check", "--unprivileged", "-v4", "-o", "check.log", "-D", &here, "-W", &here]
            .map(String::from);
    let envp = [format!("PATH={empty_path}"), format!("XDG_RUNTIME_DIR={here}")];
    let empty = std::fs::File::open(empty).map_err(|e| format!("cannot open {empty}: {e}"))?;
    let spawn = Spawn {
        binary,
        mnt: None,
        net: None,
        uid,
        gid,
        groups: vec![gid],
        caps: caps.clone(),
        fds: vec![(work_fd, IMAGES_FD), (empty, EMPTY_FD)],
        argv: cstrings(argv)?,
        envp: cstrings(envp)?,
    };
    let mut child = spawn
        .command()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {} check: {e}", criu.display()))?;
    // It runs as the user, who may stop it: not waited for without end.
    let status = crate::procfs::wait_or_kill(&mut child, KDAT_TIMEOUT)
        .map_err(|e| format!("waiting for {} check: {e}", criu.display()))?
        .ok_or_else(|| format!("{} check did not finish within {} s", criu.display(), KDAT_TIMEOUT.as_secs()))?;
    let written = std::fs::File::options().read(true).custom_flags(libc::O_NOFOLLOW).open(work.join(KDAT_FILE));
    let written = match written {
        Ok(f) if f.metadata().is_ok_and(|m| m.is_file() && m.len() < 1 << 20) => f,
        _ => {
            let log = std::fs::read_to_string(work.join("check.log")).unwrap_or_default();
            let why = first_error(&log).unwrap_or_else(|| format!("exit status {status}"));
            return Err(format!("`criu check` in the node's namespace wrote no {KDAT_FILE}: {why}"));
        }
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut &written, &mut bytes).map_err(|e| format!("cannot read {KDAT_FILE}: {e}"))?;
    crate::storage::write_cache_file(&dir, KDAT_FILE, &bytes, 0o755);
    if !dir.join(KDAT_FILE).is_file() {
        return Err(format!("cannot write {}", dir.join(KDAT_FILE).display()));
    }
    Ok(dir)
}

/// The most telling line of a CRIU log: the first error that is neither a
/// summary ("Dumping FAILED.") nor a known harmless one, without timestamp
/// and source location.
pub fn first_error(log: &str) -> Option<String> {
    const NOISE: &[&str] = &["FAILED.", "killed by signal", "RLIMIT_NOFILE for self"];
    let errors = log.lines().filter(|l| l.contains("Error ("));
    let strip = |l: &str| l.split_once("): ").map(|(_, m)| m).unwrap_or(l).trim().to_string();
    let mut fallback = None;
    for line in errors {
        if NOISE.iter().any(|n| line.contains(n)) {
            fallback.get_or_insert_with(|| strip(line));
        } else {
            return Some(strip(line));
        }
    }
    fallback
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_and_restore_share_their_common_options() {
        let mut dump = Options::dump(42, "dump.log");
        dump.external("unix[7]");
        let dump = dump.args(true);
        let mut restore = Options::restore("restore.log", "restore.pid");
        restore.inherit_fd(1, "pipe:[9]");
        let restore = restore.args(true);
        let common = ["--stream", "--unprivileged", "--shell-job", "--manage-cgroups=ignore", "-v3"];
        assert_eq!(&dump[1..6], &common);
        assert_eq!(&restore[1..6], &common);
        assert_eq!(dump.join(" ").split(" -D ").nth(1), Some("/proc/self/fd/100 --tcp-established --network-lock skip"));
        assert!(restore.join(" ").ends_with("--inherit-fd fd[1]:pipe:[9] -D /proc/self/fd/100 --tcp-established"), "{restore:?}");
        assert!(!Options::dump(42, "dump.log").args(false).contains(&"--tcp-established".to_string()));
    }

    #[test]
    fn parses_release_and_git_builds() {
        assert_eq!(parse_version("Version: 4.2.1\n"), Some(Version { major: 4, minor: 2, patch: 1 }));
        assert_eq!(parse_version("Version: 4.1\nGitID: v4.1-12-gdeadbee\n"), Some(Version { major: 4, minor: 1, patch: 0 }));
    }

    #[test]
    fn finds_the_dynamic_loader_of_an_executable() {
        let elf = std::fs::read("/bin/sh").unwrap();
        assert!(elf_interpreter(&elf).unwrap().contains("ld-linux"));
        assert_eq!(elf_interpreter(b"#!/bin/sh"), None);
    }

    #[test]
    fn first_error_is_the_cause_without_location() {
        let log = "(00.0) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n(00.1) Warn  (criu/a.c:1): meh\n(00.2) Error (criu/files-reg.c:2353): Can't open file x on restore: Permission denied\n(00.3) Error (criu/cr-restore.c:2331): Restoring FAILED.\n";
        assert_eq!(first_error(log).unwrap(), "Can't open file x on restore: Permission denied");
        assert_eq!(first_error("(1) Error (criu/cr-dump.c:1975): Dumping FAILED.").unwrap(), "Dumping FAILED.");
        assert_eq!(first_error("all fine"), None);
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("criu 4.2"), None);
        assert_eq!(parse_version("Version: four"), None);
    }

    #[test]
    fn old_versions_compare_below_minimum() {
        let old = parse_version("Version: 3.17.1").unwrap();
        assert!(old < MIN_VERSION);
        assert!(parse_version("Version: 4.0").unwrap() >= MIN_VERSION);
    }

    #[test]
    fn missing_binary_names_the_path() {
        let e = check(Path::new("/nonexistent/criu")).unwrap_err();
        assert!(e.to_string().starts_with("CRIU at /nonexistent/criu cannot be run"), "{e}");
    }

    #[test]
    fn refuses_a_dynamically_linked_or_non_elf_criu() {
        let e = check(Path::new("/bin/sh")).unwrap_err();
        assert!(
            e.to_string().starts_with(
                "CRIU at /bin/sh is dynamically linked (program interpreter /lib64/ld-linux-x86-64.so.2): it runs with capabilities"
            ),
            "{e}"
        );
        assert_eq!(e.to_string().lines().count(), 1);
        let dir = std::env::temp_dir().join(format!("criu-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("criu");
        std::fs::write(&fake, "#!/bin/sh\necho 'Version: 4.2.1'\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let e = check(&fake).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(e.to_string().starts_with(&format!("CRIU at {} is not a 64-bit ELF executable:", fake.display())), "{e}");
    }

    #[test]
    fn a_container_proc_that_is_not_procfs_is_refused() {
        let line = |mp: &str, fs: &str| format!("22 1 0:5 / {mp} rw,nosuid shared:1 - {fs} x rw\n");
        let good = line("/", "overlay") + &line("/proc", "proc") + &line("/proc/sys/fs/binfmt_misc", "autofs");
        assert_eq!(untrusted_proc(&good), None);
        assert_eq!(untrusted_proc(&(good.clone() + &line("/proc", "ext4"))).unwrap(), "its /proc is a ext4 mount, not procfs");
        assert_eq!(untrusted_proc(&(good.clone() + &line("/proc/1234", "ext4"))).unwrap(), "something is mounted on /proc/1234");
        assert_eq!(untrusted_proc(&(good + &line("/proc/self/fd", "tmpfs"))).unwrap(), "something is mounted on /proc/self/fd");
        assert_eq!(untrusted_proc(&line("/", "overlay")).unwrap(), "it has no /proc mount");
    }

    #[test]
    fn too_old_version_is_named() {
        let e = CriuError::TooOld { path: "/x/criu".into(), found: parse_version("Version: 3.17.1").unwrap() };
        assert_eq!(e.to_string(), "CRIU at /x/criu is version 3.17.1, but 4.0.0 or newer is required");
    }
}
