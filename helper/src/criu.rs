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
}

impl fmt::Display for CriuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CriuError::NotRunnable { path, why } => {
                write!(f, "CRIU at {} cannot be run: {why}", path.display())
            }
            CriuError::UnknownVersion { path, output } => write!(
                f,
                "CRIU at {} printed no version we understand: {:?}",
                path.display(),
                output.lines().next().unwrap_or("")
            ),
            CriuError::TooOld { path, found } => write!(
                f,
                "CRIU at {} is version {found}, but {MIN_VERSION} or newer is required",
                path.display()
            ),
        }
    }
}

impl std::error::Error for CriuError {}

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

/// Runs `criu --version` and checks the version is supported.
pub fn check(criu: &Path) -> Result<Version, CriuError> {
    let out = Command::new(criu)
        .arg("--version")
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
    let found = parse_version(&stdout)
        .ok_or_else(|| CriuError::UnknownVersion { path: criu.to_path_buf(), output: stdout })?;
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

/// fd number at which CRIU receives the directory it works in (the image
/// streamer's socket, its log); it is told `-D /proc/self/fd/IMAGES_FD`,
/// which resolves in any mount namespace.
pub const IMAGES_FD: i32 = 100;

/// One CRIU run inside a container's mount namespace, as the container's
/// user.
///
/// Why inside: CRIU then sees the container's mounts as its own and neither
/// dumps nor rebuilds them (Apptainer's session mounts are what stopped every
/// attempt to dump the mount namespace, see docs/checkpoint-engine.md). Why
/// as the user: prlimit, /proc and file reopening then work with the user's
/// rights, and the restored files are opened with them.
pub struct Invocation<'a> {
    pub criu: &'a Path,
    /// A process whose mount namespace CRIU joins.
    pub mnt_ns_of: i32,
    pub uid: u32,
    pub gid: u32,
    pub caps: &'a [caps::Capability],
    pub images_dir: &'a std::fs::File,
    pub args: Vec<String>,
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

impl Invocation<'_> {
    /// The command, ready to spawn. CRIU's binary and libraries are the
    /// node's, reached through /proc/<this helper>/root once inside the
    /// container, with the node's dynamic loader.
    pub fn command(&self) -> Result<std::process::Command, CriuError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let not_runnable = |why: String| CriuError::NotRunnable { path: self.criu.to_path_buf(), why };
        let elf = std::fs::read(self.criu).map_err(|e| not_runnable(e.to_string()))?;
        let host_root = format!("/proc/{}/root", std::process::id());
        let criu_path = format!("{host_root}{}", self.criu.display());
        let mut cmd = match elf_interpreter(&elf) {
            Some(interp) => {
                let mut c = std::process::Command::new(format!("{host_root}{interp}"));
                let libs = ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"]
                    .map(|d| format!("{host_root}{d}"))
                    .join(":");
                c.arg("--library-path").arg(libs).arg(&criu_path);
                c
            }
            None => std::process::Command::new(&criu_path),
        };
        // CRIU reads /etc/criu/default.conf of the mount namespace it runs
        // in, which is the user's container: a user's config there could
        // name an action script that CRIU would run with its capabilities.
        cmd.arg("--no-default-config");
        cmd.args(&self.args).env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        cmd.env("XDG_RUNTIME_DIR", kdat_location(self.criu));
        let mnt = std::fs::File::open(format!("/proc/{}/ns/mnt", self.mnt_ns_of))
            .map_err(|e| not_runnable(format!("cannot open the mount namespace of process {}: {e}", self.mnt_ns_of)))?;
        let (uid, gid) = (self.uid, self.gid);
        let caps: caps::CapsHashSet = self.caps.iter().copied().collect();
        let images_fd = self.images_dir.as_raw_fd();
        // SAFETY: runs in the forked child before exec: syscalls only, no
        // allocation unless one fails (the agent has other threads, which
        // may hold the allocator's lock at the fork).
        unsafe {
            cmd.pre_exec(move || {
                use std::io::Error;
                let check = |rc: libc::c_int| if rc == -1 { Err(Error::last_os_error()) } else { Ok(()) };
                check(libc::setns(mnt.as_raw_fd(), libc::CLONE_NEWNS))?;
                check(libc::dup2(images_fd, IMAGES_FD))?;
                check(libc::setgroups(1, &gid))?;
                check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0))?;
                check(libc::setresgid(gid, gid, gid))?;
                check(libc::setresuid(uid, uid, uid))?;
                let to_io = |e: caps::errors::CapsError| Error::other(e.to_string());
                caps::set(None, caps::CapSet::Effective, &caps).map_err(to_io)?;
                caps::set(None, caps::CapSet::Permitted, &caps).map_err(to_io)?;
                caps::set(None, caps::CapSet::Inheritable, &caps).map_err(to_io)?;
                for cap in &caps {
                    caps::raise(None, caps::CapSet::Ambient, *cap).map_err(to_io)?;
                }
                Ok(())
            });
        }
        Ok(cmd)
    }
}

/// Where CRIU keeps its kernel-feature cache (`criu.kdat`, looked for in
/// `$XDG_RUNTIME_DIR` when not root), per CRIU binary and boot: CRIU probes
/// the kernel for 20-30 ms at every start without it.
fn kdat_dir(criu: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(criu).ok()?;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let mut key = crate::manifest::Checksum::default();
    key.update(format!("{}:{}:{}:{}:{}", m.ino(), m.size(), m.mtime(), m.ctime(), boot.trim()).as_bytes());
    Some(Path::new(KDAT_CACHE).join(key.hex()))
}

/// Root-owned, in /run so that a reboot (a new kernel) drops it.
const KDAT_CACHE: &str = "/run/checkpoint-container/criu-kdat";
const KDAT_FILE: &str = "criu.kdat";

/// `$XDG_RUNTIME_DIR` for a CRIU run: the cached file, through this
/// helper's root (CRIU runs in the container's mount namespace), or else
/// CRIU's own directory (`-D`, the user's), from which `remember_kdat`
/// takes the file CRIU writes there into the cache. The user never writes
/// the cache: only CRIU, behind the helper's root-only directories.
fn kdat_location(criu: &Path) -> String {
    match kdat_dir(criu) {
        Some(dir) if dir.join(KDAT_FILE).is_file() => format!("/proc/{}/root{}", std::process::id(), dir.display()),
        _ => format!("/proc/self/fd/{IMAGES_FD}"),
    }
}

/// After a CRIU run without a cached `criu.kdat`: caches the one CRIU wrote
/// in `criu_dir`, if it is a plain file of the right kind.
pub fn remember_kdat(criu: &Path, criu_dir: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let Some(dir) = kdat_dir(criu) else { return };
    if dir.join(KDAT_FILE).exists() {
        return;
    }
    let Ok(written) = std::fs::File::options().read(true).custom_flags(libc::O_NOFOLLOW).open(criu_dir.join(KDAT_FILE)) else { return };
    if !written.metadata().is_ok_and(|m| m.is_file() && m.len() < 1 << 20) {
        return;
    }
    let mut bytes = Vec::new();
    if std::io::Read::read_to_end(&mut &written, &mut bytes).is_ok() {
        crate::storage::write_cache_file(&dir, KDAT_FILE, &bytes, 0o755);
    }
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
    fn parses_release_and_git_builds() {
        assert_eq!(
            parse_version("Version: 4.2.1\n"),
            Some(Version { major: 4, minor: 2, patch: 1 })
        );
        assert_eq!(
            parse_version("Version: 4.1\nGitID: v4.1-12-gdeadbee\n"),
            Some(Version { major: 4, minor: 1, patch: 0 })
        );
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
    fn too_old_binary_names_the_version() {
        let dir = std::env::temp_dir().join(format!("criu-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("criu");
        std::fs::write(&fake, "#!/bin/sh\necho 'Version: 3.17.1'\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let e = check(&fake).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(e.to_string(), format!("CRIU at {} is version 3.17.1, but 4.0.0 or newer is required", fake.display()));
    }
}
