//! Lines for the user: in the job's stderr, or appended to a batch job's
//! output file by the user while the job is being requeued.

use super::*;
use crate::procfs;
use crate::user::User;
use std::fs::File;
use std::io::Write;
use std::process::Stdio;

/// A line for the user while the job is being requeued: srun's I/O is being
/// torn down then, so a batch job gets it appended to its stderr file (by
/// the user, with the user's rights); other jobs on the task's stderr.
pub(super) fn tell_requeued_job(user: &User, info: &std::collections::HashMap<String, String>, stderr: &mut File, msg: &str) {
    // StdErr is empty when stderr goes where stdout goes.
    let file = info.get("StdErr").filter(|p| !p.is_empty()).or_else(|| info.get("StdOut"));
    if let (Some("1"), Some(path)) = (info.get("BatchFlag").map(String::as_str), file) {
        let child = user.command("/usr/bin/tee").arg("-a").arg(path).stdin(Stdio::piped()).spawn();
        if let Ok(mut child) = child {
            let _ = writeln!(child.stdin.take().unwrap(), "checkpoint-container: {msg}");
            // The path is the user's: a FIFO or a FUSE file could hold tee
            // (and this agent) forever.
            if procfs::wait_or_kill(&mut child, TELL_TIMEOUT).ok().flatten().is_some_and(|s| s.success()) {
                return;
            }
        }
    }
    tell_user(stderr, msg);
}

/// How long the agent waits for a line to be written to the job's stderr.
const LINE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// A line in the job's stderr. The descriptor is the user's: a pipe, pty
/// or FUSE file nobody reads would hold whoever writes to it, so a thread
/// of its own does, and the agent waits for it a second at most (a thread
/// left blocked ends with the agent).
pub(super) fn tell_user(stderr: &mut File, msg: &str) {
    let line = format!("checkpoint-container: {msg}\n");
    let Ok(mut out) = stderr.try_clone() else { return };
    let (done, wrote) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = out.write_all(line.as_bytes());
        let _ = done.send(());
    });
    let _ = wrote.recv_timeout(LINE_TIMEOUT);
}
