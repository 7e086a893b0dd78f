//! The task's own process settings, given to the container root starts for
//! it: unprotected, the user's Apptainer inherits them from the task; the
//! agent (forked by slurmstepd before Slurm set up the task) has its own.
//!
//! Everything here is read from the task process, which is the user's:
//! she could set these herself (lower a hard limit, change her umask or
//! affinity) and nothing else; its groups are Slurm's, which she cannot
//! change without CAP_SETGID. Root applies exactly those values, so no
//! limit ends up above what the task had (docs/transparency.md).

use crate::error::{Context, Result};
use crate::procfs::{self, Pid, PidFd};
use crate::sys;

/// RLIMIT_CPU … RLIMIT_RTTIME: every limit Linux has.
const LIMITS: usize = 16;

#[derive(Clone)]
pub struct TaskView {
    limits: [libc::rlimit; LIMITS],
    umask: libc::mode_t,
    cpus: libc::cpu_set_t,
    /// Supplementary groups Slurm gave the task (its group cache, which
    /// may differ from a lookup now); the task cannot change them.
    groups: Vec<libc::gid_t>,
}

impl std::fmt::Debug for TaskView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let limits: Vec<_> = self.limits.iter().map(|l| (l.rlim_cur, l.rlim_max)).collect();
        f.debug_struct("TaskView").field("limits", &limits).field("umask", &format_args!("{:04o}", self.umask)).finish()
    }
}

impl TaskView {
    /// Reads the settings of `task`, checking afterwards through its pidfd
    /// that the pid still names the task (so nothing was read from a
    /// process that took a recycled pid).
    pub fn read(task: &PidFd) -> Result<TaskView> {
        let pid = task.pid;
        // From /proc, not prlimit(2): reading another user's limits that
        // way needs CAP_SYS_RESOURCE, which a node may not grant root.
        let text = std::fs::read_to_string(procfs::proc_path(pid, "limits")).context(|| format!("/proc/{pid}/limits"))?;
        let limits = limits_of(&text).ok_or_else(|| crate::error::EngineError::Failed(format!("cannot parse /proc/{pid}/limits")))?;
        let status = std::fs::read_to_string(procfs::proc_path(pid, "status")).context(|| format!("/proc/{pid}/status"))?;
        let umask = umask_of(&status).ok_or_else(|| crate::error::EngineError::Failed(format!("no Umask in /proc/{pid}/status")))?;
        let groups = groups_of(&status).ok_or_else(|| crate::error::EngineError::Failed(format!("no Groups in /proc/{pid}/status")))?;
        let cpus = sys::sched_getaffinity(pid).context(|| format!("cannot read the CPU affinity of the task (pid {pid})"))?;
        task.signal(0).context(|| format!("the task (pid {pid}) has ended"))?;
        Ok(TaskView { limits, umask, cpus, groups })
    }

    /// The CPUs the task may run on.
    pub fn cpus(&self) -> Vec<usize> {
        sys::cpu_list(&self.cpus)
    }

    /// This view, on `cpus` instead (a step's ranks in one container run
    /// on all of their tasks' CPUs, each rank then on its own).
    pub fn on_cpus(mut self, cpus: &[usize]) -> TaskView {
        self.cpus = sys::cpu_set(cpus);
        self
    }

    /// Makes the calling process's settings the task's. Allocation-free:
    /// for use between fork and exec, last (a low open-file limit must not
    /// stop the descriptor set-up before it).
    pub fn apply_in_child(&self) -> std::io::Result<()> {
        sys::setgroups(&self.groups)?;
        for (resource, limit) in self.limits.iter().enumerate() {
            if sys::setrlimit(resource, limit).is_err() {
                // Without CAP_SYS_RESOURCE root cannot raise a hard
                // limit above its own: the lower of the two, then.
                let own = sys::getrlimit(resource)?;
                let max = limit.rlim_max.min(own.rlim_max);
                sys::setrlimit(resource, &libc::rlimit { rlim_cur: limit.rlim_cur.min(max), rlim_max: max })?;
            }
        }
        sys::umask(self.umask);
        sys::sched_setaffinity(0, &self.cpus)
    }

    /// Gives every thread of the user's restored processes below `root`
    /// (processes of `uid` in a mount namespace other than ours, as in
    /// `agent::find_payload`) the task's CPU affinity: they would keep
    /// CRIU's, and the requeued job may be bound to other CPUs. Limits and
    /// umask stay the dumped ones (docs/transparency.md).
    pub fn bind_restored(&self, root: Pid, uid: u32) -> Result<usize> {
        let own = procfs::ns_inode(std::process::id() as Pid, "mnt").context(|| "own mount namespace".into())?;
        let mut done = 0;
        for pid in procfs::tree(root).context(|| "restored tree".into())? {
            // Held while changed: the pid must stay the user's process.
            let Some(held) = PidFd::of_user(pid, uid) else { continue };
            if procfs::ns_inode(pid, "mnt").map_or(true, |n| n == own) {
                continue;
            }
            // The node's thread ids (not the container's numbering).
            for tid in procfs::node_tids(pid).unwrap_or_default() {
                sys::sched_setaffinity(tid, &self.cpus).context(|| format!("cannot bind restored thread {tid}"))?;
            }
            held.signal(0).context(|| format!("restored pid {pid} ended while being bound"))?;
            done += 1;
        }
        Ok(done)
    }
}

/// The soft and hard limits of /proc/PID/limits, in resource order (the
/// kernel prints them so): "unlimited" is RLIM_INFINITY.
fn limits_of(text: &str) -> Option<[libc::rlimit; LIMITS]> {
    let mut out = [libc::rlimit { rlim_cur: 0, rlim_max: 0 }; LIMITS];
    let mut lines = text.lines().skip(1);
    let value = |v: &str| if v == "unlimited" { Some(libc::RLIM_INFINITY) } else { v.parse().ok() };
    for limit in out.iter_mut() {
        // Names are padded to 25 columns and may contain spaces.
        let mut fields = lines.next()?.get(25..)?.split_whitespace();
        limit.rlim_cur = value(fields.next()?)?;
        limit.rlim_max = value(fields.next()?)?;
    }
    Some(out)
}

/// The `Groups:` field of /proc/PID/status.
fn groups_of(status: &str) -> Option<Vec<libc::gid_t>> {
    let v = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    v.split_whitespace().map(|g| g.parse().ok()).collect()
}

/// The `Umask:` field of /proc/PID/status (octal).
fn umask_of(status: &str) -> Option<libc::mode_t> {
    let v = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
    libc::mode_t::from_str_radix(v.trim(), 8).ok().filter(|m| *m <= 0o777)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_read_from_status() {
        assert_eq!(groups_of("Umask:\t0022\nGroups:\t2001 3001 \n"), Some(vec![2001, 3001]));
        assert_eq!(groups_of("Groups:\t\n"), Some(vec![]));
        assert_eq!(groups_of("Groups:\t12 x\n"), None);
        assert_eq!(groups_of("Umask:\t0022\n"), None);
    }

    #[test]
    fn umask_is_read_in_octal() {
        assert_eq!(umask_of("Name:\tx\nUmask:\t0027\nState:\tR\n"), Some(0o027));
        assert_eq!(umask_of("Umask:\t0777\n"), Some(0o777));
        assert_eq!(umask_of("Umask:\t1000\n"), None);
        assert_eq!(umask_of("State:\tR\n"), None);
    }

    #[test]
    fn limits_are_read_in_resource_order() {
        let text = std::fs::read_to_string("/proc/self/limits").unwrap();
        let limits = limits_of(&text).unwrap();
        for (resource, limit) in limits.iter().enumerate() {
            let own = sys::getrlimit(resource).unwrap();
            assert_eq!((limit.rlim_cur, limit.rlim_max), (own.rlim_cur, own.rlim_max), "resource {resource}");
        }
        assert!(limits_of("Limit   Soft Limit   Hard Limit   Units\n").is_none());
    }

    #[test]
    #[allow(unsafe_code)] // pre_exec
    fn a_child_gets_what_was_read_from_its_parent() {
        use std::os::unix::process::CommandExt;
        let me = PidFd::open(std::process::id() as Pid).unwrap();
        let mut view = TaskView::read(&me).unwrap();
        let nofile = libc::RLIMIT_NOFILE as usize;
        view.limits[nofile].rlim_cur = view.limits[nofile].rlim_cur.min(333);
        view.umask = 0o027;
        let v = view.clone();
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", "ulimit -n; umask"]);
        // SAFETY: apply_in_child is allocation-free.
        unsafe { cmd.pre_exec(move || v.apply_in_child()) };
        let out = String::from_utf8(cmd.output().unwrap().stdout).unwrap();
        assert_eq!(out, format!("{}\n0027\n", view.limits[nofile].rlim_cur));
    }
}
