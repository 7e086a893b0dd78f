//! The on-disk layout of checkpoints under `checkpoint_dir`, the user's
//! list entries (listing.rs), and garbage collection.

use super::slurmctld::job_is_over;
use super::*;
use crate::error::{fail, Context, Result};
use crate::{listing, storage};
use ckpt_config::Settings;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;

/// `<checkpoint_dir>/<job>`: created by root, private. A directory there that
/// root did not create (a user may be able to write to checkpoint_dir) is
/// refused rather than used.
pub fn job_dir(settings: &Settings, job_id: u32) -> Result<PathBuf> {
    storage::trusted_dir(&settings.checkpoint_dir, Some(0o755))?;
    let dir = settings.checkpoint_dir.join(job_id.to_string());
    // Private from its creation: another task's agent on this node may
    // check it before the chmod below (created 0755, it was refused as not
    // ours, and that task's agent failed).
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).context(|| format!("cannot chmod {}", dir.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return fail(format!("cannot create {}: {e}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(&dir).context(|| format!("{}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return fail(format!("{} was not created by the checkpoint agent: refusing to use it", dir.display()));
    }
    Ok(dir)
}

pub(super) fn task_checkpoint_dir(settings: &Settings, t: &Task) -> Result<PathBuf> {
    Ok(job_dir(settings, t.job_id)?.join(t.checkpoint_name()))
}

/// Removes the checkpoints of jobs that are over for good: the user
/// cancelled a requeued job before it ran again, or the agent that would
/// have cleaned up never ran. A job slurmctld still knows as pending,
/// running or requeued keeps its checkpoints; if slurmctld cannot be asked,
/// nothing is removed. Returns the job ids removed.
pub fn collect_garbage(settings: &Settings) -> Vec<u32> {
    if storage::trusted_dir(&settings.checkpoint_dir, None).is_err() {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir(&settings.checkpoint_dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let Some(job) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let path = entry.path();
        // Only directories the agent made (root, private) are ever removed.
        let ours = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir() && m.uid() == 0 && m.mode() & 0o077 == 0);
        if ours && job_is_over(job) && std::fs::remove_dir_all(&path).is_ok() {
            listing::forget_job(settings, job);
            removed.push(job);
        }
    }
    removed
}

/// Removes the task's checkpoint, and the job's directory once it is empty.
pub(super) fn forget_checkpoint(settings: &Settings, t: &Task) {
    listing::forget(settings, t.uid, t.gid, t.job_id, Some((t.step_id, t.task_id, t.container)));
    let job = settings.checkpoint_dir.join(t.job_id.to_string());
    let _ = std::fs::remove_dir_all(job.join(t.checkpoint_name()));
    let _ = std::fs::remove_dir(job);
}

/// Leaves the user an entry for the checkpoint just written (listing.rs);
/// a failure costs her only the entry.
pub(super) fn list_checkpoint(settings: &Settings, t: &Task, m: &crate::manifest::Manifest, state: &str) {
    let entry = listing::Entry {
        job: t.job_id,
        step: t.step_id,
        task: t.task_id,
        container: t.container,
        node: m.node.clone(),
        created_unix: m.created_unix,
        bytes: m.stats.images_bytes,
        state: state.into(),
    };
    if let Err(e) = listing::record(settings, t.uid, t.gid, &entry) {
        log::warn!("{}: no list entry for the checkpoint: {e}", t.name());
    }
}
