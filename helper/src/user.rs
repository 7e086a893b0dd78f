//! The job user, as root looks them up, and commands run as them.
//!
//! Root's processes never act on a user's path with root's rights: whatever
//! must be done with the user's rights is done by a process that *is* the
//! user (uid, gid and supplementary groups all set, no capability left),
//! not by a root thread with a changed fsuid (which keeps CAP_SYS_PTRACE,
//! and with it the right to follow /proc/<pid>/root of any process).

use crate::error::{fail, Context, Result};
use std::ffi::CString;
use std::process::{Command, Stdio};

#[derive(Debug, Clone)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub name: String,
    /// Home directory from the passwd entry (never from the job's `HOME`).
    pub home: String,
    /// Supplementary groups, computed before any fork (initgroups between
    /// fork and exec of a multi-threaded process could deadlock in NSS).
    pub groups: Vec<libc::gid_t>,
}

impl User {
    /// Looks the user up in the node's passwd and group databases.
    pub fn lookup(uid: u32, gid: u32) -> Result<User> {
        let entry = nix::unistd::User::from_uid(uid.into())
            .context(|| format!("cannot look up uid {uid}"))?
            .ok_or_else(|| crate::error::EngineError::Failed(format!("uid {uid} has no passwd entry on this node")))?;
        if uid == 0 {
            return fail("refusing to act for root");
        }
        let cname = CString::new(entry.name.clone()).context(|| "user name".into())?;
        let groups = nix::unistd::getgrouplist(&cname, gid.into())
            .context(|| format!("cannot list the groups of {}", entry.name))?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        Ok(User { uid, gid, name: entry.name, home: entry.dir.to_string_lossy().into_owned(), groups })
    }

    /// Makes `cmd` (which keeps root's uid) carry this user's groups, for
    /// root-started Apptainer: with one gid in `--security` it sets no
    /// groups itself, and the container would keep root's.
    pub fn give_groups(&self, cmd: &mut Command) {
        crate::sys::on_exec_setgroups(cmd, self.groups.clone());
    }

    /// `program` run as this user, with an empty environment and stdio on
    /// /dev/null (callers set what they need).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear().stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        crate::sys::on_exec_become(&mut cmd, self.uid, self.gid, self.groups.clone());
        cmd
    }
}
