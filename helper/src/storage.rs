//! Checkpoint directories: written aside (behind a root-only directory),
//! sealed, then swapped in atomically,
//! so a failed or interrupted checkpoint never replaces a good one and a
//! half-written one is never used.
//!
//! Layout of a committed checkpoint directory (root:root, 0700):
//!   manifest.toml   what was dumped, by whom, and a BLAKE3 digest per file
//!   *.img           CRIU's images (root:root, 0600)
//!   dump.log        CRIU's log of the dump
//!
//! CRIU writes the images as the job user; sealing hands every file to root
//! so that the user cannot change images between dump and restore (a
//! tampered image would be restored by a CRIU holding capabilities).

use crate::error::{fail, Context, Result};
use crate::manifest::{ImageFile, Manifest, FILE_NAME};
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

pub const DUMP_LOG: &str = "dump.log";

/// Checks a checkpoint path given on the command line or by the plugin:
/// absolute, no `..`, and a parent that is a real directory (not a symlink).
fn checked_target(path: &Path) -> Result<(PathBuf, String)> {
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return fail(format!("checkpoint directory {} must be an absolute path without \"..\"", path.display()));
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| crate::error::EngineError(format!("checkpoint directory {} has no name", path.display())))?;
    let meta = fs::symlink_metadata(parent).context(|| format!("checkpoint directory parent {}", parent.display()))?;
    if !meta.is_dir() {
        return fail(format!("checkpoint directory parent {} is not a directory", parent.display()));
    }
    Ok((parent.to_path_buf(), name.to_string()))
}

pub struct Staging {
    /// Root-only directory around the images while they are written: the
    /// user's other processes cannot reach them (and keep a writable fd to
    /// change them after sealing). Removed on drop, with whatever it holds
    /// then: a partial dump, or the checkpoint a commit replaced.
    fence: PathBuf,
    /// Where CRIU writes, owned by the user it runs as.
    pub path: PathBuf,
    target: PathBuf,
}

impl Staging {
    /// A fresh directory next to `target`, for CRIU running as `uid`.
    pub fn create(target: &Path, uid: u32, gid: u32) -> Result<Staging> {
        let (parent, name) = checked_target(target)?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let fence = parent.join(format!(".{name}.partial-{}-{nanos}", std::process::id()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&fence)
            .context(|| format!("cannot create {}", fence.display()))?;
        let staging = Staging { path: fence.join("images"), fence, target: target.to_path_buf() };
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging.path)
            .context(|| format!("cannot create {}", staging.path.display()))?;
        nix::unistd::chown(&staging.path, Some(uid.into()), Some(gid.into()))
            .context(|| format!("cannot hand {} to uid {uid}", staging.path.display()))?;
        Ok(staging)
    }

    /// Hands every file to root (0600), flushes it to disk and digests it.
    pub fn seal(&self) -> Result<Vec<ImageFile>> {
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.path).context(|| format!("cannot list {}", self.path.display()))? {
            let entry = entry.context(|| format!("cannot list {}", self.path.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let file = open_nofollow(&path).context(|| format!("cannot open {}", path.display()))?;
            let meta = file.metadata().context(|| format!("cannot stat {}", path.display()))?;
            if !meta.is_file() {
                return fail(format!("unexpected non-file {} in the checkpoint", path.display()));
            }
            nix::unistd::fchown(file.as_raw_fd(), Some(0.into()), Some(0.into())).context(|| format!("cannot chown {}", path.display()))?;
            file.set_permissions(fs::Permissions::from_mode(0o600)).context(|| format!("cannot chmod {}", path.display()))?;
            file.sync_all().context(|| format!("cannot flush {} to disk", path.display()))?;
            if name == DUMP_LOG {
                continue;
            }
            let (size, blake3) = digest_open(file, &path)?;
            files.push(ImageFile { name, size, blake3 });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        nix::unistd::chown(&self.path, Some(0.into()), Some(0.into())).context(|| format!("cannot chown {}", self.path.display()))?;
        Ok(files)
    }

    pub fn write_manifest(&self, manifest: &Manifest) -> Result<()> {
        let path = self.path.join(FILE_NAME);
        let mut f = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .context(|| format!("cannot create {}", path.display()))?;
        f.write_all(manifest.to_toml().as_bytes())
            .and_then(|_| f.sync_all())
            .context(|| format!("cannot write {}", path.display()))?;
        File::open(&self.path).and_then(|d| d.sync_all()).context(|| format!("cannot flush {}", self.path.display()))
    }

    /// Puts the sealed directory in place of `target`, atomically: an earlier
    /// checkpoint there is swapped out and deleted only afterwards.
    pub fn commit(self) -> Result<()> {
        let flags = if self.target.exists() { libc::RENAME_EXCHANGE } else { libc::RENAME_NOREPLACE };
        nix::fcntl::renameat2(None, &self.path, None, &self.target, nix::fcntl::RenameFlags::from_bits_truncate(flags))
            .context(|| format!("cannot move the checkpoint into {}", self.target.display()))?;
        let parent = self.target.parent().unwrap_or(Path::new("/"));
        File::open(parent).and_then(|d| d.sync_all()).context(|| format!("cannot flush {}", parent.display()))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.fence);
    }
}

/// Opens a file for reading, refusing a symlink in its last component.
fn open_nofollow(path: &Path) -> std::io::Result<File> {
    File::options().read(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

pub fn digest(path: &Path) -> Result<(u64, String)> {
    let f = open_nofollow(path).context(|| format!("cannot open {}", path.display()))?;
    digest_open(f, path)
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
/// whole and untouched: root-owned and private, manifest readable, every
/// image file present with its recorded size and digest, nothing extra.
pub fn open_checkpoint(dir: &Path, verify_images: bool) -> Result<Manifest> {
    let meta = fs::symlink_metadata(dir).context(|| format!("checkpoint {}", dir.display()))?;
    if !meta.is_dir() {
        return fail(format!("checkpoint {} is not a directory", dir.display()));
    }
    if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return fail(format!(
            "checkpoint {} was not written by this helper (owner uid {}, mode {:o}; expected root, 0700)",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    let manifest_path = dir.join(FILE_NAME);
    let mf = open_nofollow(&manifest_path).context(|| format!("checkpoint {} is incomplete: no manifest", dir.display()))?;
    let mmeta = mf.metadata().context(|| format!("cannot stat {}", manifest_path.display()))?;
    if !mmeta.is_file() || mmeta.uid() != 0 {
        return fail(format!("{} is not a root-owned file", manifest_path.display()));
    }
    let text = std::io::read_to_string(mf).context(|| format!("cannot read {}", manifest_path.display()))?;
    let manifest = Manifest::parse(&manifest_path, &text)?;
    if !verify_images {
        return Ok(manifest);
    }
    for f in &manifest.files {
        let path = dir.join(&f.name);
        if f.name.contains('/') || f.name == FILE_NAME {
            return fail(format!("{}: bad file name {:?}", manifest_path.display(), f.name));
        }
        let fmeta = fs::symlink_metadata(&path)
            .context(|| format!("checkpoint {} is incomplete: {} is missing", dir.display(), f.name))?;
        if !fmeta.is_file() || fmeta.uid() != 0 {
            return fail(format!("checkpoint {}: {} is not a root-owned file", dir.display(), f.name));
        }
        if fmeta.len() != f.size {
            return fail(format!(
                "checkpoint {} is truncated or altered: {} is {} bytes, the manifest says {}",
                dir.display(), f.name, fmeta.len(), f.size
            ));
        }
        let (_, blake3) = digest(&path)?;
        if blake3 != f.blake3 {
            return fail(format!("checkpoint {} was tampered with: digest of {} does not match the manifest", dir.display(), f.name));
        }
    }
    for entry in fs::read_dir(dir).context(|| format!("cannot list {}", dir.display()))? {
        let name = entry.context(|| format!("cannot list {}", dir.display()))?.file_name().to_string_lossy().into_owned();
        if name != FILE_NAME && name != DUMP_LOG && !manifest.files.iter().any(|f| f.name == name) {
            return fail(format!("checkpoint {} holds {name}, which the manifest does not list", dir.display()));
        }
    }
    Ok(manifest)
}
