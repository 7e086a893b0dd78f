//! Joining another process's cgroups, so the containers the agent starts are
//! part of the Slurm step (accounted, and killed with it by
//! proctrack/cgroup).

use std::ffi::CString;

/// Where a hybrid host (v1 hierarchies and v2) mounts its v2 hierarchy.
const HYBRID_V2: &str = "/sys/fs/cgroup/unified";

/// `cgroup.procs` files of every hierarchy `pid` belongs to.
pub fn procs_files(pid: i32) -> std::io::Result<Vec<CString>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => continue,
        };
        let mount = match controllers {
            // The v2 hierarchy: beside the v1 ones on a hybrid host, the
            // whole of /sys/fs/cgroup on a pure v2 one.
            "" if std::path::Path::new(HYBRID_V2).is_dir() => HYBRID_V2.to_string(),
            "" => "/sys/fs/cgroup".to_string(),
            c => format!("/sys/fs/cgroup/{}", c.strip_prefix("name=").unwrap_or(c)),
        };
        let file = format!("{mount}{path}/cgroup.procs");
        if std::path::Path::new(&file).exists() {
            out.push(CString::new(file).expect("no NUL in cgroup paths"));
        }
    }
    Ok(out)
}

/// Moves the calling process into the cgroups whose `cgroup.procs` files are
/// given. Allocation-free: safe between fork and exec.
pub fn join_in_child(files: &[CString]) -> std::io::Result<()> {
    for file in files {
        crate::sys::write_file(file, b"0")?;
    }
    Ok(())
}
