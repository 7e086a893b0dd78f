//! The agent's session file (`ckpt_config::agent_files`): locked for as
//! long as the agent serves its task, saying `ENDING` once the task was
//! told to end. The batch step's slurmstepd reads it to keep the job
//! script's `srun` alive until this task's checkpoint and last output are
//! through (the plugin's batch.rs).

use ckpt_config::agent_files::ENDING;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(super) struct SessionFile {
    path: PathBuf,
    file: File,
}

/// How long the agent retries its lock: the batch step's reader holds a
/// shared lock for a moment to test it.
const LOCK_RETRIES: u32 = 100;
const LOCK_RETRY: Duration = Duration::from_millis(10);

impl SessionFile {
    /// Creates and locks `path`, in the root-owned directory the caller has
    /// checked; emptied only once locked (a file left by an earlier agent of
    /// the same task is reused). None, after a warning, if another agent
    /// still holds it: the task is protected all the same, and only the
    /// batch step's wait for its output is lost.
    pub(super) fn hold(path: &Path) -> Option<SessionFile> {
        let opened = File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path);
        let file = match opened {
            Ok(f) => f,
            Err(e) => {
                log::warn!("cannot create {}: {e}", path.display());
                return None;
            }
        };
        for _ in 0..LOCK_RETRIES {
            if crate::sys::flock_exclusive_nonblocking(&file) {
                let _ = file.set_len(0);
                return Some(SessionFile { path: path.to_path_buf(), file });
            }
            std::thread::sleep(LOCK_RETRY);
        }
        log::warn!("{} is held by another agent: the batch step will not wait for this task's output", path.display());
        None
    }

    /// The task was told to end: its container is checkpointed or ended.
    /// Written at the start of the file, so saying it again changes nothing.
    pub(super) fn ending(&self) {
        if let Err(e) = self.file.write_all_at(ENDING.as_bytes(), 0) {
            log::warn!("cannot write {}: {e}", self.path.display());
        }
    }
}

impl Drop for SessionFile {
    /// Removed while still locked: a reader never finds it unlocked and in
    /// use.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
