//! What the engine reads about processes from /proc.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

pub type Pid = i32;

pub fn proc_path(pid: Pid, rest: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{rest}"))
}

/// Real uid and gid of a process (from /proc/PID/status).
pub fn ids(pid: Pid) -> io::Result<(u32, u32)> {
    let status = fs::read_to_string(proc_path(pid, "status"))?;
    let field = |name: &str| -> io::Result<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no {name} in /proc/{pid}/status")))
    };
    Ok((field("Uid:")?, field("Gid:")?))
}

/// Identity of one of a process's namespaces ("mnt", "user", "pid", …).
pub fn ns_inode(pid: Pid, ns: &str) -> io::Result<u64> {
    Ok(fs::metadata(proc_path(pid, &format!("ns/{ns}")))?.ino())
}

pub fn comm(pid: Pid) -> io::Result<String> {
    Ok(fs::read_to_string(proc_path(pid, "comm"))?.trim_end().to_string())
}

/// Direct children of every thread of a process.
pub fn children(pid: Pid) -> io::Result<Vec<Pid>> {
    let mut out = Vec::new();
    for task in fs::read_dir(proc_path(pid, "task"))? {
        let task = task?.file_name();
        let path = proc_path(pid, &format!("task/{}/children", task.to_string_lossy()));
        if let Ok(text) = fs::read_to_string(path) {
            out.extend(text.split_whitespace().filter_map(|p| p.parse::<Pid>().ok()));
        }
    }
    Ok(out)
}

/// A process and all its descendants, parents before children.
pub fn tree(root: Pid) -> io::Result<Vec<Pid>> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Ok(kids) = children(out[i]) {
            out.extend(kids);
        }
        i += 1;
    }
    Ok(out)
}

/// Where a process's file descriptor points ("/path", "pipe:[123]", …).
pub fn fd_target(pid: Pid, fd: i32) -> io::Result<String> {
    Ok(fs::read_link(proc_path(pid, &format!("fd/{fd}")))?.to_string_lossy().into_owned())
}

/// The parent of a process (the fourth field of /proc/PID/stat, after the
/// ")" that ends its name, which may itself hold spaces and parentheses).
pub fn ppid(pid: Pid) -> io::Result<Pid> {
    let stat = fs::read_to_string(proc_path(pid, "stat"))?;
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
        .ok_or_else(|| io::Error::other(format!("unreadable /proc/{pid}/stat")))
}

/// Whether `pid` is `ancestor` or below it, following parents up to init.
/// A process whose parent ended has been handed to a reaper, which breaks
/// the chain: it counts as no descendant.
pub fn is_descendant(pid: Pid, ancestor: Pid) -> bool {
    let mut p = pid;
    // A chain longer than pid_max cannot be; the bound only stops a loop.
    for _ in 0..4_194_304 {
        if p == ancestor {
            return true;
        }
        match ppid(p) {
            Ok(parent) if parent > 0 && parent != p => p = parent,
            _ => return false,
        }
    }
    false
}

/// A process's state letter in /proc/PID/stat (`R`, `S`, `T` stopped by
/// a signal, `t` traced, `Z` a zombie, …).
pub fn state(pid: Pid) -> Option<char> {
    fs::read_to_string(proc_path(pid, "stat")).ok()?.rsplit_once(')')?.1.split_whitespace().next()?.chars().next()
}

/// Whether a process is stopped (by a signal; not traced): state `T`.
pub fn is_stopped(pid: Pid) -> bool {
    state(pid) == Some('T')
}

pub fn exists(pid: Pid) -> bool {
    proc_path(pid, "stat").exists()
}

/// Ids of the mounts a process sees (first field of /proc/PID/mountinfo).
pub fn mount_ids(pid: Pid) -> io::Result<Vec<u64>> {
    Ok(fs::read_to_string(proc_path(pid, "mountinfo"))?.lines().filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect())
}

/// Open file descriptors of a process.
pub fn fds(pid: Pid) -> io::Result<Vec<i32>> {
    let mut out: Vec<i32> = fs::read_dir(proc_path(pid, "fd"))?.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    out.sort();
    Ok(out)
}

/// For an fd open on a regular file: the id of the mount it was opened on
/// and its inode.
pub fn regular_file_fd(pid: Pid, fd: i32) -> io::Result<Option<(u64, u64)>> {
    use std::os::unix::fs::FileTypeExt;
    let meta = fs::metadata(proc_path(pid, &format!("fd/{fd}")))?;
    let ft = meta.file_type();
    if !ft.is_file() || ft.is_fifo() {
        return Ok(None);
    }
    let info = fs::read_to_string(proc_path(pid, &format!("fdinfo/{fd}")))?;
    let mnt_id = info
        .lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other(format!("no mnt_id in /proc/{pid}/fdinfo/{fd}")))?;
    Ok(Some((mnt_id, meta.ino())))
}

/// The pid a process has in its own PID namespace (the last `NSpid` of
/// its status; the same as ours when it shares our namespace). `rest` is
/// "status" or "task/TID/status".
fn ns_id(pid: Pid, rest: &str) -> io::Result<Pid> {
    let status = fs::read_to_string(proc_path(pid, rest))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last()?.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no NSpid in /proc/{pid}/{rest}")))
}

/// The pid a process has in its own PID namespace.
pub fn ns_pid(pid: Pid) -> io::Result<Pid> {
    ns_id(pid, "status")
}

/// The process of `root`'s tree (ours in ours) whose pid in its own PID
/// namespace is `ns_pid`.
pub fn find_ns_pid(root: Pid, ns_pid: Pid) -> Option<Pid> {
    tree(root).ok()?.into_iter().find(|&p| self::ns_pid(p).is_ok_and(|n| n == ns_pid))
}

/// Thread ids of a process, as the node numbers them.
pub fn node_tids(pid: Pid) -> io::Result<Vec<Pid>> {
    Ok(fs::read_dir(proc_path(pid, "task"))?.filter_map(|t| t.ok()?.file_name().to_str()?.parse::<Pid>().ok()).collect())
}

/// A connected TCP socket of a process: its fd and the peer's address.
#[derive(Debug, PartialEq, Eq)]
pub struct TcpConnection {
    pub pid: Pid,
    pub fd: i32,
    pub peer: String,
}

/// Connected TCP sockets (any state but listening or closed) the processes
/// hold, read from /proc/PID/net/tcp{,6} of their network namespace.
pub fn tcp_connections(pids: &[Pid]) -> io::Result<Vec<TcpConnection>> {
    let Some(&first) = pids.first() else { return Ok(Vec::new()) };
    let mut peers = std::collections::HashMap::new();
    for table in ["net/tcp", "net/tcp6"] {
        let Ok(text) = fs::read_to_string(proc_path(first, table)) else { continue };
        peers.extend(text.lines().skip(1).filter_map(parse_tcp_line));
    }
    let mut out = Vec::new();
    for &pid in pids {
        for fd in fds(pid).unwrap_or_default() {
            let Ok(target) = fd_target(pid, fd) else { continue };
            let Some(ino) = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']')).and_then(|i| i.parse::<u64>().ok()) else {
                continue;
            };
            if let Some(peer) = peers.get(&ino) {
                out.push(TcpConnection { pid, fd, peer: peer.clone() });
            }
        }
    }
    Ok(out)
}

/// (inode, peer address) of a line of /proc/net/tcp{,6} whose socket is
/// connected: not listening (0A) or closed (07).
fn parse_tcp_line(line: &str) -> Option<(u64, String)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let (remote, state, inode) = (f.get(2)?, f.get(3)?, f.get(9)?.parse::<u64>().ok()?);
    if matches!(*state, "0A" | "07") {
        return None;
    }
    let (addr, port) = remote.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // Each 32-bit word is in the host's (little-endian) byte order.
    let words: Vec<u32> = (0..addr.len() / 8).filter_map(|i| u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).ok()).collect();
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some((inode, std::net::SocketAddr::new(ip, port).to_string()))
}

/// Resident memory of a process tree (bytes): about what its page images
/// will take, before compression.
pub fn memory_bytes(pids: &[Pid]) -> u64 {
    pids.iter()
        .filter_map(|&pid| std::fs::read_to_string(proc_path(pid, "status")).ok())
        .filter_map(|status| kib_field(&status, "VmRSS"))
        .sum()
}

/// A `Key:   N kB` line of a /proc file (status, meminfo), in bytes.
pub fn kib_field(text: &str, key: &str) -> Option<u64> {
    let value = text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?;
    value.trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|kib| kib << 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_peers_are_read_from_proc_net_tcp() {
        let est = "   1: 0B0BD50A:9C40 0A0BD50A:0016 01 00000000:00000000 00:00000000 00000000  2001        0 4242 1 0 20 4 30 10 -1";
        assert_eq!(parse_tcp_line(est), Some((4242, "10.213.11.10:22".to_string())));
        let listen = "   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0 100 0 0 10 0";
        assert_eq!(parse_tcp_line(listen), None);
        let v6 = "   0: 00000000000000000000000001000000:9C40 00000000000000000000000001000000:1F90 01 0:0 00:0 0 2001 0 7 1";
        assert_eq!(parse_tcp_line(v6), Some((7, "[::1]:8080".to_string())));
    }

    #[test]
    fn kib_fields_are_read_in_bytes_by_exact_key() {
        let text = "MemTotal:       24683520 kB\nMemAvailable:   19747560 kB\nVmRSS:\t    2048 kB\n";
        assert_eq!(kib_field(text, "MemAvailable"), Some(19747560 << 10));
        assert_eq!(kib_field(text, "VmRSS"), Some(2048 << 10));
        assert_eq!(kib_field(text, "Mem"), None, "a prefix of a key is not the key");
        assert_eq!(kib_field(text, "Swap"), None);
    }
}

/// A process held by a pidfd: a signal reaches it or fails, never a process
/// that was given its pid after it ended.
#[derive(Debug)]
pub struct PidFd {
    pub pid: Pid,
    fd: std::os::fd::OwnedFd,
}

impl PidFd {
    pub fn open(pid: Pid) -> io::Result<PidFd> {
        Ok(PidFd { pid, fd: crate::sys::pidfd_open(pid)? })
    }

    /// A pidfd of `pid` if, once held, that process belongs to `uid`: a pid
    /// freed and reused between finding and opening fails the check.
    pub fn of_user(pid: Pid, uid: u32) -> Option<PidFd> {
        let fd = PidFd::open(pid).ok()?;
        ids(pid).is_ok_and(|(u, _)| u == uid).then_some(fd)
    }

    pub fn signal(&self, sig: i32) -> io::Result<()> {
        crate::sys::pidfd_send_signal(&self.fd, sig)
    }

    /// Waits up to `timeout_ms` (-1: for ever) for the process to end;
    /// whether it has.
    pub fn wait_exit(&self, timeout_ms: i32) -> io::Result<bool> {
        crate::sys::poll_one(&self.fd, libc::POLLIN, timeout_ms)
    }
}

/// Signals every process of the tree below `root` that is, once held by
/// pidfd, still `uid`'s and in the PID namespace `pid_ns` (an inode from
/// [`ns_inode`]): a pid freed and taken by anyone else's process meanwhile
/// is left alone. Returns how many were signalled.
pub fn signal_tree(root: Pid, uid: u32, pid_ns: u64, sig: i32) -> usize {
    tree_members(root, uid, pid_ns).iter().filter(|fd| fd.signal(sig).is_ok()).count()
}

/// The processes of the tree below `root` still `uid`'s and in PID
/// namespace `pid_ns`, each held by its pidfd.
pub fn tree_members(root: Pid, uid: u32, pid_ns: u64) -> Vec<PidFd> {
    tree(root)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|pid| PidFd::of_user(pid, uid))
        .filter(|fd| ns_inode(fd.pid, "pid").is_ok_and(|n| n == pid_ns))
        .collect()
}

/// Waits for `child` at most `timeout`, then kills and reaps it: root never
/// waits without end on a process the user can stop or stall. None when it
/// had to be killed.
pub fn wait_or_kill(child: &mut std::process::Child, timeout: std::time::Duration) -> io::Result<Option<std::process::ExitStatus>> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
