//! Checkpoint directories: written aside (behind a root-only directory),
//! sealed, then swapped in atomically,
//! so a failed or interrupted checkpoint never replaces a good one and a
//! half-written one is never used.
//!
//! Layout of a committed checkpoint directory (root:root, 0700):
//!   manifest.toml   what was dumped, by whom, and a checksum per file
//!   *.img           CRIU's images (root:root, 0600), `pages-*` possibly zstd
//!   dump.log        CRIU's log of the dump
//!
//! CRIU runs as the job user but never writes an image: it streams them to
//! the helper (streamer.rs), which writes them as root, so the user cannot
//! change images between dump and restore (a tampered image would be
//! restored by a CRIU holding capabilities).

use crate::error::{fail, Context, Result};
use crate::manifest::{ImageFile, Manifest, FILE_NAME};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

pub const DUMP_LOG: &str = "dump.log";

/// Checks a checkpoint path given on the command line or by the plugin:
/// absolute, no `..`, and a parent that is a real directory (not a symlink).
/// `cause` as a checkpoint for `target` not taken, naming the earlier one
/// there if any (what the caller says the task runs again from).
pub fn not_taken(target: &Path, cause: crate::error::EngineError) -> crate::error::EngineError {
    crate::error::EngineError::NotTaken { cause: Box::new(cause), kept: target.exists().then(|| target.to_path_buf()) }
}

fn checked_target(path: &Path) -> Result<(PathBuf, String)> {
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return fail(format!("checkpoint directory {} must be an absolute path without \"..\"", path.display()));
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| crate::error::EngineError::Failed(format!("checkpoint directory {} has no name", path.display())))?;
    let meta = fs::symlink_metadata(parent).context(|| format!("checkpoint directory parent {}", parent.display()))?;
    if !meta.is_dir() {
        return fail(format!("checkpoint directory parent {} is not a directory", parent.display()));
    }
    Ok((parent.to_path_buf(), name.to_string()))
}

pub struct Staging {
    /// Root-only directory around the checkpoint while it is written:
    /// nothing of the user's can reach into it. Removed on drop, with
    /// whatever it holds then: a partial dump, or the checkpoint a commit
    /// replaced.
    fence: PathBuf,
    /// CRIU's directory (`-D`), owned by the user it runs as: the streamer
    /// socket and CRIU's log; never an image.
    pub work: PathBuf,
    /// The checkpoint being built (root only): the images the streamer
    /// writes, then the manifest.
    pub images: PathBuf,
    target: PathBuf,
    /// Written on node-local staging storage: commit copies it next to
    /// `target` first.
    staged: bool,
}

/// Room staging must leave free besides the images: tmpfs pages are RAM,
/// and the node's jobs need theirs.
const STAGING_RESERVE: u64 = 512 << 20;

/// Whether `dir` can take `bytes` of images now: free space on its
/// filesystem, and, since tmpfs is RAM, available memory too.
fn staging_room(dir: &Path, bytes: u64) -> std::result::Result<(), String> {
    let fs = nix::sys::statvfs::statvfs(dir).map_err(|e| format!("cannot stat {}: {e}", dir.display()))?;
    let free = fs.blocks_available() as u64 * fs.fragment_size() as u64;
    let need = bytes + STAGING_RESERVE;
    if free < need {
        return Err(format!("{} has {} MiB free, {} MiB needed", dir.display(), free >> 20, need >> 20));
    }
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available = crate::procfs::kib_field(&meminfo, "MemAvailable").unwrap_or(u64::MAX);
    if available < need {
        return Err(format!("the node has {} MiB of memory available, {} MiB needed", available >> 20, need >> 20));
    }
    Ok(())
}

fn private_dir(path: &Path) -> Result<()> {
    fs::DirBuilder::new().mode(0o700).create(path).context(|| format!("cannot create {}", path.display()))
}

/// A fresh root-only (0700) directory `PREFIX<pid>-<nanos>` in `root`, a
/// directory only root can change: a name no other run uses.
pub fn private_dir_in(root: &Path, prefix: &str) -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let dir = root.join(format!("{prefix}{}-{nanos}", std::process::id()));
    private_dir(&dir)?;
    Ok(dir)
}

/// A directory of the user's (`path`, where CRIU running as the user keeps
/// its log and sockets) inside a fresh root-only one in `root`: CRIU
/// reaches it through an fd, none of the user's other processes can.
/// Removed with its fence when dropped, unless `keep` (its log is named in
/// an error).
pub struct UserWorkDir {
    fence: PathBuf,
    pub path: PathBuf,
    pub keep: bool,
}

impl UserWorkDir {
    pub fn create(root: &Path, uid: u32, gid: u32) -> Result<UserWorkDir> {
        trusted_dir(root, Some(0o700))?;
        let fence = private_dir_in(root, "")?;
        let work = UserWorkDir { path: fence.join("work"), fence, keep: false };
        private_dir(&work.path)?;
        nix::unistd::chown(&work.path, Some(uid.into()), Some(gid.into())).context(|| format!("cannot chown {}", work.path.display()))?;
        Ok(work)
    }
}

impl Drop for UserWorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.fence);
        }
    }
}

impl Staging {
    /// A fresh checkpoint under construction for `target`, dumped by CRIU
    /// running as `uid`. With `staging_dir`, it is written there first if
    /// `expected_bytes` fit (else directly, and the reason is returned).
    pub fn create(target: &Path, uid: u32, gid: u32, staging_dir: Option<&Path>, expected_bytes: u64) -> Result<(Staging, Option<String>)> {
        let (parent, name) = checked_target(target)?;
        trusted_dir(&parent, None)?;
        if let Some(dir) = staging_dir {
            trusted_dir(dir, None)?;
        }
        let mut fallback = None;
        let mut at = parent.clone();
        if let Some(dir) = staging_dir {
            match staging_room(dir, expected_bytes) {
                Ok(()) => at = dir.to_path_buf(),
                Err(why) => {
                    fallback =
                        Some(format!("not staging the checkpoint in {}: {why}; writing it to {} directly", dir.display(), parent.display()))
                }
            }
        }
        let fence = private_dir_in(&at, &format!(".{name}.partial-"))?;
        let staging =
            Staging { work: fence.join("work"), images: fence.join("images"), fence, target: target.to_path_buf(), staged: at != parent };
        private_dir(&staging.images)?;
        private_dir(&staging.work)?;
        nix::unistd::chown(&staging.work, Some(uid.into()), Some(gid.into()))
            .context(|| format!("cannot hand {} to uid {uid}", staging.work.display()))?;
        Ok((staging, fallback))
    }

    /// Completes the image set the streamer wrote: checks the directory
    /// holds exactly those files, makes them durable (only now: the
    /// container is already released), and adds CRIU's log.
    pub fn seal(&self, streamed: &[ImageFile]) -> Result<()> {
        let mut paths = Vec::new();
        for entry in fs::read_dir(&self.images).context(|| format!("cannot list {}", self.images.display()))? {
            let entry = entry.context(|| format!("cannot list {}", self.images.display()))?;
            let name = entry.file_name();
            if !streamed.iter().any(|f| f.name.as_str() == name) {
                return fail(format!("unexpected file {} in the checkpoint", name.to_string_lossy()));
            }
            paths.push(entry.path());
        }
        sync_all(&paths)?;
        // The log is the user's file (CRIU wrote it): copied, never moved,
        // and only if it is a plain file of a sane size.
        if let Ok(log) = open_nofollow(&self.work.join(DUMP_LOG)) {
            if log.metadata().is_ok_and(|m| m.is_file() && m.len() < 64 << 20) {
                let mut copy = create_private(&self.images.join(DUMP_LOG))?;
                std::io::copy(&mut &log, &mut copy).context(|| "cannot copy CRIU's log".into())?;
            }
        }
        Ok(())
    }

    pub fn write_manifest(&self, manifest: &Manifest) -> Result<()> {
        let path = self.images.join(FILE_NAME);
        let mut f = create_private(&path)?;
        f.write_all(manifest.to_toml().as_bytes()).and_then(|_| f.sync_all()).context(|| format!("cannot write {}", path.display()))?;
        sync_dir(&self.images)
    }

    /// Whether the checkpoint sits on node-local staging storage.
    pub fn staged(&self) -> bool {
        self.staged
    }

    /// Announces that this staged checkpoint is on its way to `target`
    /// (a restore elsewhere waits for it); `commit` ends the announcement.
    pub fn announce_move(&self) -> Result<()> {
        let marker = moving_marker(&self.target);
        let written = create_private(&marker).and_then(|mut f| {
            writeln!(f, "{} {}", node_name(), std::process::id())
                .and_then(|_| f.sync_all())
                .context(|| format!("cannot write {}", marker.display()))
        });
        written.map_err(|cause| self.not_taken(cause))
    }

    /// `cause` as a checkpoint not taken, naming the earlier one at the
    /// target: neither the dump nor a failed commit touches it.
    pub fn not_taken(&self, cause: crate::error::EngineError) -> crate::error::EngineError {
        not_taken(&self.target, cause)
    }

    /// Puts the sealed checkpoint in place of `target`, atomically: an
    /// earlier checkpoint there is swapped out and deleted only afterwards.
    /// A staged checkpoint is first copied next to `target` (same
    /// filesystem, so the swap stays atomic).
    pub fn commit(mut self) -> Result<()> {
        let marker = moving_marker(&self.target);
        let result = self.commit_inner().map_err(|cause| self.not_taken(cause));
        let _ = fs::remove_file(marker);
        result
    }

    fn commit_inner(&mut self) -> Result<()> {
        if self.staged {
            let (parent, name) = checked_target(&self.target)?;
            let fence = private_dir_in(&parent, &format!(".{name}.partial-"))?;
            let copy = fence.join("images");
            let staged_fence = std::mem::replace(&mut self.fence, fence);
            let copied = copy_dir(&self.images, &copy);
            let _ = fs::remove_dir_all(&staged_fence);
            copied?;
            self.images = copy;
        }
        let flags = if self.target.exists() { libc::RENAME_EXCHANGE } else { libc::RENAME_NOREPLACE };
        nix::fcntl::renameat2(None, &self.images, None, &self.target, nix::fcntl::RenameFlags::from_bits_truncate(flags))
            .context(|| format!("cannot move the checkpoint into {}", self.target.display()))?;
        sync_dir(self.target.parent().unwrap_or(Path::new("/")))
    }
}

/// Asks the kernel to drop the cached pages of a file already on disk
/// (clean pages; a no-op on tmpfs).
fn drop_cached(file: &File) {
    use std::os::fd::AsRawFd;
    let _ = nix::fcntl::posix_fadvise(file.as_raw_fd(), 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
}

/// `drop_cached` for every file of a checkpoint directory: the one a new
/// checkpoint is about to replace, whose cached copy would otherwise crowd
/// out the memory the new images are written to (measured: a cached 4 GiB
/// checkpoint made the next 4 GiB dump 10 s instead of 2 s on the dev VM).
pub fn drop_cached_dir(dir: &Path) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if let Ok(f) = open_nofollow(&entry.path()) {
            drop_cached(&f);
        }
    }
}

/// This node's name, as checkpoints and move markers record it.
pub fn node_name() -> String {
    nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default()
}

/// `TARGET.moving`: a staged checkpoint for TARGET is being copied there.
fn moving_marker(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_os_string();
    name.push(".moving");
    PathBuf::from(name)
}

/// Waits while a staged checkpoint is on its way to `target` (another
/// node's agent is copying it), at most `timeout`; returns the node it comes
/// from if it was waited for.
pub fn wait_for_move(target: &Path, timeout: std::time::Duration) -> Option<String> {
    let marker = moving_marker(target);
    let text = fs::read_to_string(&marker).ok()?;
    let mut fields = text.split_whitespace();
    let from = fields.next().unwrap_or("another node").to_string();
    let mover: Option<i32> = fields.next().and_then(|p| p.parse().ok());
    let here = node_name();
    let deadline = std::time::Instant::now() + timeout;
    while marker.exists() && std::time::Instant::now() < deadline {
        // A mover of this node that is gone will not finish.
        if from == here && mover.is_some_and(|p| !crate::procfs::exists(p)) {
            let _ = fs::remove_file(&marker);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Some(from)
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.fence);
    }
}

/// Flushes files to disk all at once: the filesystem can then commit them
/// in one journal transaction instead of one each.
fn sync_all(paths: &[PathBuf]) -> Result<()> {
    std::thread::scope(|scope| {
        let flushes: Vec<_> = paths
            .iter()
            .map(|path| {
                scope.spawn(move || {
                    open_nofollow(path).and_then(|f| f.sync_all()).context(|| format!("cannot flush {} to disk", path.display()))
                })
            })
            .collect();
        flushes.into_iter().try_for_each(|f| f.join().unwrap_or_else(|_| fail("flush thread panicked")))
    })
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).context(|| format!("cannot flush {}", dir.display()))
}

/// A new root-only file; never follows or reuses an existing one.
pub fn create_private(path: &Path) -> Result<File> {
    File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .context(|| format!("cannot create {}", path.display()))
}

/// Copies a sealed checkpoint's files (all plain files) into a new private
/// directory, durably.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    private_dir(to)?;
    let mut copied = Vec::new();
    for entry in fs::read_dir(from).context(|| format!("cannot list {}", from.display()))? {
        let entry = entry.context(|| format!("cannot list {}", from.display()))?;
        let src = open_nofollow(&entry.path()).context(|| format!("cannot open {}", entry.path().display()))?;
        let dst_path = to.join(entry.file_name());
        let dst = create_private(&dst_path)?;
        copy_file(&src, &dst).context(|| format!("cannot copy the checkpoint to {}", dst_path.display()))?;
        copied.push(dst_path);
    }
    sync_all(&copied)?;
    sync_dir(to)
}

/// Copies `src` into the empty `dst` in the kernel (sendfile), starting the
/// writeback of each step as it goes.
fn copy_file(src: &File, dst: &File) -> std::io::Result<()> {
    let size = src.metadata()?.len();
    let mut writeback = Writeback::new(dst);
    let mut offset: i64 = 0;
    while (offset as u64) < size {
        let step = Writeback::STEP.min(size - offset as u64) as usize;
        if nix::sys::sendfile::sendfile(dst, src, Some(&mut offset), step)? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        writeback.progress(offset as u64);
    }
    Ok(())
}

/// Starts writing a file to storage while it is still being written (an
/// image as it is received, a staged checkpoint as it is copied): the fsync
/// that seals it then finds little left to write, where CRIU's own images
/// (and `dd`) are written back only at the end.
pub struct Writeback<'a> {
    file: &'a File,
    started: u64,
}

impl<'a> Writeback<'a> {
    /// Bytes gathered before their writeback is started: large enough for
    /// big requests, small enough to overlap most of the dump.
    pub const STEP: u64 = 8 << 20;

    pub fn new(file: &'a File) -> Self {
        Writeback { file, started: 0 }
    }

    /// The file is written up to `upto`.
    pub fn progress(&mut self, upto: u64) {
        if upto >= self.started + Self::STEP {
            // A failure surfaces in the sealing fsync.
            crate::sys::start_writeback(self.file, self.started, upto - self.started);
            self.started = upto;
        }
    }
}

/// Checks that only root can change what `path` names, walking it from `/`
/// one component at a time without following symlinks: every directory is
/// root-owned and not writable by group or others (a sticky directory such
/// as /tmp is accepted on the way, not as the last one: there users could
/// create the entries root is about to use). With `create_mode`, missing
/// components are created (0755, the last with that mode). Every directory root
/// writes into passes this first, so nothing a user made can be in it.
pub fn trusted_dir(path: &Path, create_mode: Option<u32>) -> Result<()> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::{fstat, Mode};
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return fail(format!("{} must be an absolute path without \"..\"", path.display()));
    }
    let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut dir = File::from(crate::sys::openat(None, "/", flags, Mode::empty()).context(|| "cannot open /".into())?);
    let names: Vec<_> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    let mut so_far = PathBuf::from("/");
    for (i, name) in names.iter().enumerate() {
        let last = i + 1 == names.len();
        so_far.push(name);
        let next = match crate::sys::openat(Some(std::os::fd::AsRawFd::as_raw_fd(&dir)), *name, flags, Mode::empty()) {
            Err(nix::errno::Errno::ENOENT) if create_mode.is_some() => {
                let mode = if last { create_mode.unwrap_or(0o700) } else { 0o755 };
                nix::sys::stat::mkdirat(Some(std::os::fd::AsRawFd::as_raw_fd(&dir)), *name, Mode::from_bits_truncate(mode))
                    .or_else(|e| if e == nix::errno::Errno::EEXIST { Ok(()) } else { Err(e) })
                    .context(|| format!("cannot create {}", so_far.display()))?;
                crate::sys::openat(Some(std::os::fd::AsRawFd::as_raw_fd(&dir)), *name, flags, Mode::empty())
            }
            other => other,
        };
        let next = File::from(next.map_err(|e| match e {
            nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR => {
                crate::error::EngineError::Failed(format!("{} is not a directory (a symlink?): root does not use it", so_far.display()))
            }
            e => crate::error::EngineError::Failed(format!("cannot open {}: {e}", so_far.display())),
        })?);
        let st = fstat(std::os::fd::AsRawFd::as_raw_fd(&next)).context(|| format!("cannot stat {}", so_far.display()))?;
        let writable = st.st_mode & 0o022 != 0;
        let sticky = st.st_mode & libc::S_ISVTX != 0;
        if st.st_uid != 0 || (writable && (last || !sticky)) {
            return fail(format!(
                "{} is owned by uid {} with mode {:o}: root writes only into directories that only root can change",
                so_far.display(),
                st.st_uid,
                st.st_mode & 0o7777
            ));
        }
        dir = next;
    }
    Ok(())
}

/// Checks that only root can change the file at `path` (the site's
/// Apptainer, its configuration): a regular root-owned file, writable by
/// nobody else, in directories that pass [`trusted_dir`].
pub fn trusted_file(path: &Path) -> Result<()> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    trusted_dir(parent, None)?;
    let m = fs::symlink_metadata(path).context(|| format!("{}", path.display()))?;
    if !m.is_file() || m.uid() != 0 || m.mode() & 0o022 != 0 {
        return fail(format!("{} is not a regular root-owned file writable only by root: root does not use it", path.display()));
    }
    Ok(())
}

/// Opens a file for reading, refusing a symlink in its last component.
fn open_nofollow(path: &Path) -> std::io::Result<File> {
    File::options().read(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// Device, inode, size, mtime and ctime of a file: what any change to it
/// changes (ctime cannot be set by users), wherever it is mounted.
pub fn stamp(path: &Path) -> Result<String> {
    let m = fs::metadata(path).context(|| format!("cannot stat {}", path.display()))?;
    Ok(format!("{}:{}:{}:{}.{:09}:{}.{:09}", m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()))
}

/// Where digests of container images are kept per node (root only), keyed
/// by stamp: an image is hashed once, not at every checkpoint, whatever
/// path it is reached by (the agent reads it through a per-launch mount).
const IMAGE_DIGESTS: &str = "/var/cache/checkpoint-container/image-digests";

/// Size and BLAKE3 digest of a container image, from the node's cache when
/// the image has not changed since it was hashed.
pub fn image_digest(path: &Path) -> Result<(u64, String)> {
    let stamp = stamp(path)?;
    let mut key = crate::manifest::Checksum::default();
    key.update(stamp.as_bytes());
    let cached = Path::new(IMAGE_DIGESTS).join(key.hex());
    if let Ok(f) = open_nofollow(&cached) {
        if f.metadata().is_ok_and(|m| m.uid() == 0 && m.mode() & 0o022 == 0) {
            let text = std::io::read_to_string(f).unwrap_or_default();
            if let Some((size, digest)) = text.trim().split_once(' ').and_then(|(s, d)| Some((s.parse().ok()?, d.to_string()))) {
                return Ok((size, digest));
            }
        }
    }
    let (size, digest) = digest(path)?;
    // Only if the image did not change while it was read.
    if self::stamp(path)? == stamp {
        write_cache_file(Path::new(IMAGE_DIGESTS), &key.hex(), format!("{size} {digest}\n").as_bytes(), 0o700);
    }
    Ok((size, digest))
}

/// Puts a small file into one of root's caches: its directory created with
/// `dir_mode` if missing, the file written aside and renamed into place so
/// no reader sees half of it. A cache that cannot be written is only a cache
/// miss next time.
pub fn write_cache_file(dir: &Path, name: &str, bytes: &[u8], dir_mode: u32) {
    if fs::DirBuilder::new().recursive(true).mode(dir_mode).create(dir).is_err() {
        return;
    }
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    if fs::write(&tmp, bytes).and_then(|_| fs::rename(&tmp, dir.join(name))).is_err() {
        let _ = fs::remove_file(&tmp);
    }
}

pub fn digest(path: &Path) -> Result<(u64, String)> {
    let f = open_nofollow(path).context(|| format!("cannot open {}", path.display()))?;
    digest_open(f, path)
}

/// The manifest's checksum of an image file.
pub fn checksum(path: &Path) -> Result<String> {
    let mut f = open_nofollow(path).context(|| format!("cannot open {}", path.display()))?;
    let mut sum = crate::manifest::Checksum::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match std::io::Read::read(&mut f, &mut buf).context(|| format!("cannot read {}", path.display()))? {
            0 => return Ok(sum.hex()),
            n => sum.update(&buf[..n]),
        }
    }
}

/// Size and BLAKE3 digest of a file already open (`path` names it in errors).
fn digest_open(mut f: File, path: &Path) -> Result<(u64, String)> {
    use std::io::Seek;
    f.rewind().context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    let size = std::io::copy(&mut f, &mut hasher).context(|| format!("cannot read {}", path.display()))?;
    Ok((size, hasher.finalize().to_hex().to_string()))
}

/// Opens a committed checkpoint for restore or inspection and proves it is
/// whole: root-owned and private, manifest readable, every image file
/// present with its recorded size, nothing extra; with `verify_digests`,
/// every file's digest too (restore verifies them while serving instead).
pub fn open_checkpoint(dir: &Path, verify_digests: bool) -> Result<Manifest> {
    use crate::error::EngineError::{Damaged, NoCheckpoint};
    // Nothing there (nor perhaps its parent): no checkpoint, which callers
    // tell apart from an unusable one.
    if dir.is_absolute() && !dir.components().any(|c| c == Component::ParentDir) && matches!(dir.try_exists(), Ok(false)) {
        return Err(NoCheckpoint { path: dir.to_path_buf() });
    }
    let (parent, _) = checked_target(dir)?;
    trusted_dir(&parent, None)?;
    let meta = fs::symlink_metadata(dir).context(|| format!("checkpoint {}", dir.display()))?;
    if !meta.is_dir() {
        return fail(format!("checkpoint {} is not a directory", dir.display()));
    }
    if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return Err(Damaged(format!(
            "checkpoint {} was not written by this helper (owner uid {}, mode {:o}; expected root, 0700)",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    let manifest_path = dir.join(FILE_NAME);
    let mf = open_nofollow(&manifest_path).map_err(|e| Damaged(format!("checkpoint {} is incomplete: no manifest: {e}", dir.display())))?;
    let mmeta = mf.metadata().context(|| format!("cannot stat {}", manifest_path.display()))?;
    if !mmeta.is_file() || mmeta.uid() != 0 {
        return Err(Damaged(format!("{} is not a root-owned file", manifest_path.display())));
    }
    let text = std::io::read_to_string(mf).context(|| format!("cannot read {}", manifest_path.display()))?;
    let manifest = Manifest::parse(&manifest_path, &text)?;
    for f in &manifest.files {
        let path = dir.join(&f.name);
        if f.name.contains('/') || f.name == FILE_NAME {
            return Err(Damaged(format!("{}: bad file name {:?}", manifest_path.display(), f.name)));
        }
        let fmeta = fs::symlink_metadata(&path)
            .map_err(|e| Damaged(format!("checkpoint {} is incomplete: {} is missing: {e}", dir.display(), f.name)))?;
        if !fmeta.is_file() || fmeta.uid() != 0 {
            return Err(Damaged(format!("checkpoint {}: {} is not a root-owned file", dir.display(), f.name)));
        }
        if fmeta.len() != f.size {
            return Err(Damaged(format!(
                "checkpoint {} is truncated or altered: {} is {} bytes, the manifest says {}",
                dir.display(),
                f.name,
                fmeta.len(),
                f.size
            )));
        }
        if verify_digests && checksum(&path)? != f.xxh3 {
            return Err(Damaged(format!("checkpoint {} is damaged: checksum of {} does not match the manifest", dir.display(), f.name)));
        }
    }
    for entry in fs::read_dir(dir).context(|| format!("cannot list {}", dir.display()))? {
        let name = entry.context(|| format!("cannot list {}", dir.display()))?.file_name().to_string_lossy().into_owned();
        if name != FILE_NAME && name != DUMP_LOG && !manifest.files.iter().any(|f| f.name == name) {
            return Err(Damaged(format!("checkpoint {} holds {name}, which the manifest does not list", dir.display())));
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("storage-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn staged_files_are_copied_whole_across_writeback_steps() {
        let dir = scratch("copy");
        let bytes: Vec<u8> = (0..(2 * Writeback::STEP + 4097)).map(|i| (i % 251) as u8).collect();
        fs::write(dir.join("src"), &bytes).unwrap();
        let dst = File::create(dir.join("dst")).unwrap();
        copy_file(&File::open(dir.join("src")).unwrap(), &dst).unwrap();
        assert!(fs::read(dir.join("dst")).unwrap() == bytes);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_checkpoint_is_told_apart_from_an_incomplete_one() {
        use crate::error::EngineError;
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("kinds");
        let ckpt = dir.join("step0.task0");
        let missing = open_checkpoint(&ckpt, false).unwrap_err();
        assert!(matches!(&missing, EngineError::NoCheckpoint { path } if *path == ckpt), "{missing:?}");
        assert!(open_checkpoint(&dir.join("none/step0.task0"), false).is_err_and(|e| matches!(e, EngineError::NoCheckpoint { .. })));
        fs::create_dir(&ckpt).unwrap();
        fs::set_permissions(&ckpt, fs::Permissions::from_mode(0o700)).unwrap();
        let empty = open_checkpoint(&ckpt, false).unwrap_err();
        assert!(matches!(&empty, EngineError::Damaged(m) if m.contains("is incomplete: no manifest")), "{empty:?}");
        let kept = not_taken(&ckpt, EngineError::Criu("CRIU could not dump process 7: x".into()));
        assert_eq!(kept.kept_checkpoint(), Some(&ckpt));
        assert_eq!(
            kept.to_string(),
            format!("CRIU could not dump process 7: x (the checkpoint already at {} is untouched)", ckpt.display())
        );
        fs::remove_dir_all(&dir).unwrap();
        let none = not_taken(&ckpt, EngineError::Failed("full".into()));
        assert_eq!((none.kept_checkpoint(), none.to_string().as_str()), (None, "full"));
    }

    #[test]
    fn a_restore_waits_while_a_staged_checkpoint_is_moved_in() {
        let dir = scratch("wait");
        let target = dir.join("step0.task0");
        assert_eq!(wait_for_move(&target, Duration::from_secs(5)), None, "nothing announced: no wait");
        fs::write(moving_marker(&target), "node7 1\n").unwrap();
        let marker = moving_marker(&target);
        let mover = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            fs::remove_file(marker).unwrap();
        });
        let started = Instant::now();
        assert_eq!(wait_for_move(&target, Duration::from_secs(5)).as_deref(), Some("node7"));
        assert!(started.elapsed() >= Duration::from_millis(300));
        mover.join().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_mover_of_this_node_that_died_is_not_waited_for() {
        let dir = scratch("stale");
        let target = dir.join("step0.task0");
        let host = nix::unistd::gethostname().unwrap().to_string_lossy().into_owned();
        // A pid that cannot be running: above pid_max.
        fs::write(moving_marker(&target), format!("{host} 99999999\n")).unwrap();
        let started = Instant::now();
        assert_eq!(wait_for_move(&target, Duration::from_secs(30)), Some(host));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!moving_marker(&target).exists(), "the stale marker is removed");
        fs::remove_dir_all(&dir).unwrap();
    }
}
