//! `checkpoint-container list`: a user's own checkpoints, as she may see them.
//!
//! Checkpoints are root-only (their images hold the process's memory, and
//! restore trusts only what root wrote), so a user cannot look into
//! `checkpoint_dir`. Instead, whenever the agent commits a checkpoint it
//! also leaves a short entry (job, step, task, node, time, size, state) in a
//! directory of the user's own, `checkpoint_dir/.by-user/UID/`: created by
//! root, owned by the user, mode 0700, so that nobody else can list or read
//! it. `list` runs as the user and reads only her directory; it needs no
//! privilege at all.
//!
//! Root writes into a directory the user owns here, so it does so the way
//! one writes into /tmp: the directory is opened once without following
//! links (its parent `.by-user` is root's, so the user cannot swap it), and
//! each entry is created under a fresh name with `O_EXCL|O_NOFOLLOW`, handed
//! to the user, and renamed into place. Nothing in the directory is ever
//! read or followed by root; the worst a user can do there is lie to
//! herself.

use crate::error::{fail, Context, Result};
use ckpt_config::Settings;
use nix::fcntl::{renameat, OFlag};
use nix::sys::stat::{fstat, mkdirat, Mode};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

/// What a user sees of one of her checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub job: u32,
    pub step: u32,
    pub task: u32,
    /// Which container the task's processes started (the runtime shim's),
    /// if the task was not itself the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<u32>,
    /// Where the checkpoint was taken.
    pub node: String,
    pub created_unix: u64,
    pub bytes: u64,
    /// `complete`, or `moving` while a staged checkpoint is still being
    /// copied to checkpoint_dir (a restore elsewhere waits for it).
    pub state: String,
}

impl Entry {
    fn file_name(&self) -> String {
        entry_name(self.job, self.step, self.task, self.container)
    }
}

fn entry_name(job: u32, step: u32, task: u32, container: Option<u32>) -> String {
    let container = container.map(|n| format!(".c{n}")).unwrap_or_default();
    format!("{job}.step{step}.task{task}{container}")
}

fn by_user(settings: &Settings) -> PathBuf {
    settings.checkpoint_dir.join(".by-user")
}

fn open_dir_at(parent: Option<&OwnedFd>, path: &std::path::Path) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    crate::sys::openat(parent.map(|p| p.as_raw_fd()), path, flags, Mode::empty())
}

/// The user's entry directory, created on first use (as root).
fn user_dir(settings: &Settings, uid: u32, gid: u32) -> Result<OwnedFd> {
    let base = by_user(settings);
    crate::storage::trusted_dir(&base, Some(0o755))?;
    let base = open_dir_at(None, &base).context(|| format!("cannot open {}", base.display()))?;
    let name = uid.to_string();
    match mkdirat(Some(base.as_raw_fd()), name.as_str(), Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => return fail(format!("cannot create the checkpoint list of uid {uid}: {e}")),
    }
    let dir = open_dir_at(Some(&base), std::path::Path::new(&name)).context(|| format!("cannot open the checkpoint list of uid {uid}"))?;
    let st = fstat(dir.as_raw_fd()).context(|| "stat".into())?;
    if st.st_uid == 0 {
        // Just made: hand it to the user, private.
        nix::unistd::fchown(dir.as_raw_fd(), Some(uid.into()), Some(gid.into())).context(|| "chown".into())?;
        nix::sys::stat::fchmod(dir.as_raw_fd(), Mode::from_bits_truncate(0o700)).context(|| "chmod".into())?;
    } else if st.st_uid != uid {
        return fail(format!("the checkpoint list of uid {uid} belongs to uid {}: not used", st.st_uid));
    }
    Ok(dir)
}

/// Records (or replaces) the entry of one checkpoint for its owner.
pub fn record(settings: &Settings, uid: u32, gid: u32, entry: &Entry) -> Result<()> {
    let dir = user_dir(settings, uid, gid)?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let tmp = format!(".{}.{}-{nanos}", entry.file_name(), std::process::id());
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = crate::sys::openat(Some(dir.as_raw_fd()), tmp.as_str(), flags, Mode::from_bits_truncate(0o600))
        .context(|| "cannot create a list entry".into())?;
    let mut file = std::fs::File::from(fd);
    let text = toml::to_string(entry).map_err(|e| crate::error::EngineError::Failed(e.to_string()))?;
    file.write_all(text.as_bytes()).context(|| "cannot write a list entry".into())?;
    nix::unistd::fchown(file.as_raw_fd(), Some(uid.into()), Some(gid.into())).context(|| "chown".into())?;
    renameat(Some(dir.as_raw_fd()), tmp.as_str(), Some(dir.as_raw_fd()), entry.file_name().as_str())
        .context(|| "cannot put a list entry in place".into())
}

/// Drops the entries of `job` (of one step, task and container, or all of
/// them).
pub fn forget(settings: &Settings, uid: u32, gid: u32, job: u32, which: Option<(u32, u32, Option<u32>)>) {
    let Ok(dir) = user_dir(settings, uid, gid) else { return };
    forget_in(&dir, job, which);
}

fn forget_in(dir: &OwnedFd, job: u32, which: Option<(u32, u32, Option<u32>)>) {
    let names: Vec<String> = match which {
        Some((step, task, container)) => vec![entry_name(job, step, task, container)],
        None => names_in(dir).into_iter().filter(|n| n.starts_with(&format!("{job}.step"))).collect(),
    };
    for name in names {
        let _ = nix::unistd::unlinkat(Some(dir.as_raw_fd()), name.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
    }
}

/// Drops the entries of a job that is over, whoever owned it (gc).
pub fn forget_job(settings: &Settings, job: u32) {
    let Ok(base) = open_dir_at(None, &by_user(settings)) else { return };
    for name in names_in(&base) {
        if name.parse::<u32>().is_ok() {
            if let Ok(dir) = open_dir_at(Some(&base), std::path::Path::new(&name)) {
                forget_in(&dir, job, None);
            }
        }
    }
}

/// Entry names in an opened directory (read through its descriptor, so no
/// path is resolved again).
fn names_in(dir: &OwnedFd) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())) else { return Vec::new() };
    rd.flatten().filter_map(|e| e.file_name().into_string().ok()).filter(|n| !n.starts_with('.')).collect()
}

/// The calling user's entries (run as the user), oldest first.
pub fn own_entries(settings: &Settings) -> Result<Vec<Entry>> {
    let dir = by_user(settings).join(nix::unistd::getuid().to_string());
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return fail(format!("cannot read {}: {e}", dir.display())),
    };
    let mut entries: Vec<Entry> = rd
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|text| toml::from_str(&text).ok())
        .collect();
    entries.sort_by_key(|e| (e.created_unix, e.job, e.step, e.task, e.container));
    Ok(entries)
}

/// The table `list` prints.
pub fn table(entries: &[Entry], now_unix: u64) -> String {
    let row = |cells: [&str; 8]| {
        format!(
            "{:<10} {:<6} {:<6} {:<10} {:>10} {:>8}  {:<12} {}\n",
            cells[0], cells[1], cells[2], cells[3], cells[4], cells[5], cells[6], cells[7]
        )
    };
    let mut out = row(["JOB", "STEP", "TASK", "CONTAINER", "SIZE", "AGE", "NODE", "STATE"]);
    for e in entries {
        // The batch script's step is "batch", as Slurm shows it.
        let step = ckpt_config::step_name(e.job, e.step);
        let step = step.split_once('.').map_or("?", |(_, s)| s);
        // The task itself, or the container it started (in order).
        let container = e.container.map_or("-".to_string(), |n| n.to_string());
        out.push_str(&row([
            &e.job.to_string(),
            step,
            &e.task.to_string(),
            &container,
            &format!("{:.1} MiB", e.bytes as f64 / 1048576.0),
            &age(now_unix.saturating_sub(e.created_unix)),
            &e.node,
            &e.state,
        ]));
    }
    out
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_size_age_node_and_state() {
        let e = Entry {
            job: 42,
            step: 0,
            task: 1,
            container: None,
            node: "node1".into(),
            created_unix: 1000,
            bytes: 64 << 20,
            state: "complete".into(),
        };
        let b = Entry { step: ckpt_config::BATCH_STEP, task: 0, container: Some(2), ..e.clone() };
        let t = table(&[e, b], 1000 + 300);
        assert!(t.lines().nth(1).unwrap().split_whitespace().eq(["42", "0", "1", "-", "64.0", "MiB", "5m", "node1", "complete"]), "{t}");
        assert!(
            t.lines().nth(2).unwrap().split_whitespace().eq(["42", "batch", "0", "2", "64.0", "MiB", "5m", "node1", "complete"]),
            "{t}"
        );
        assert_eq!(age(59), "59s");
        assert_eq!(age(3 * 86400), "3d");
    }

    #[test]
    fn entries_round_trip_and_refuse_unknown_fields() {
        let e = Entry { job: 1, step: 2, task: 3, container: None, node: "n".into(), created_unix: 4, bytes: 5, state: "moving".into() };
        assert_eq!(toml::from_str::<Entry>(&toml::to_string(&e).unwrap()).unwrap(), e);
        let c = Entry { container: Some(1), ..e };
        assert_eq!(toml::from_str::<Entry>(&toml::to_string(&c).unwrap()).unwrap(), c);
        assert!(toml::from_str::<Entry>("job = 1\nevil = 2").is_err());
    }
}
