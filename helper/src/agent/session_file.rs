//! The agent's session file (`ckpt_config::agent_files`): locked for as
//! long as the agent serves its task, saying `ENDING` once the task was
//! told to end. The batch step's slurmstepd reads it to keep the job
//! script's `srun` alive until this task's checkpoint and last output are
//! through (the plugin's batch.rs).

use crate::error::{Context, Result};
use ckpt_config::agent_files::ENDING;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub(super) struct SessionFile {
    path: PathBuf,
    file: File,
    ending: bool,
}

impl SessionFile {
    /// Creates and locks `path`, in the root-owned directory the caller has
    /// checked (a file left by an earlier agent of the same task is reused).
    pub(super) fn hold(path: &Path) -> Result<SessionFile> {
        let file = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .context(|| format!("cannot create {}", path.display()))?;
        // SAFETY: flock(2) on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return crate::error::fail(format!("{} is held by another agent", path.display()));
        }
        Ok(SessionFile { path: path.to_path_buf(), file, ending: false })
    }

    /// The task was told to end: its container is checkpointed or ended.
    pub(super) fn ending(&mut self) {
        self.ending = true;
        if let Err(e) = self.file.write_all(ENDING.as_bytes()) {
            log::warn!("cannot write {}: {e}", self.path.display());
        }
    }

    pub(super) fn is_ending(&self) -> bool {
        self.ending
    }
}

impl Drop for SessionFile {
    /// Removed while still locked: a reader never finds it unlocked and in
    /// use.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
