//! What the task wrapper (the job user) and the agent (root) say to each
//! other over the task's Unix socket: newline-delimited JSON, and the task's
//! stdio passed once as SCM_RIGHTS.

use crate::error::{fail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

#[derive(Debug, Serialize, Deserialize)]
pub enum ToAgent {
    /// Run (or restore) this container command for the task. `runtime` is
    /// argv[0] as the user's PATH resolves it (the agent only compares it
    /// with the site's Apptainer: it never runs it).
    Start { argv: Vec<String>, cwd: String, env: Vec<(String, String)>, runtime: Option<String> },
    /// The task is no container itself (a batch or wrapper script running
    /// `argv`): serve the containers its processes start through the
    /// runtime shim. Only the task process may say this, first.
    Watch { argv: Vec<String> },
    /// Slurm is ending the task (SIGTERM): checkpoint if this is a requeue.
    Terminate,
    /// Pass a signal to the container (srun's Ctrl-C, scancel --signal).
    Signal(i32),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ToTask {
    /// After `Watch`: the agent serves the task's containers; run the command.
    Go,
    /// The container ended; the task exits with this code.
    Exited(i32),
    /// The agent is done with the container after `Terminate`; exit.
    Stopped,
    /// The agent refused or failed; the message has been shown to the user.
    Failed(String),
    /// Root will not start this command for the user (the message, for the
    /// task to print, says why): the task runs it itself, as the user,
    /// unprotected.
    RunUnprotected(String),
}

/// The longest message either side accepts: a command line and an
/// environment fit many times over.
pub const MAX_MESSAGE: usize = 4 << 20;

pub struct Channel {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Channel {
    pub fn new(stream: UnixStream) -> Result<Channel> {
        let writer = stream.try_clone().context(|| "cannot duplicate the socket".into())?;
        Ok(Channel { reader: BufReader::new(stream), writer })
    }

    pub fn send<T: Serialize>(&mut self, msg: &T) -> Result<()> {
        let mut line = serde_json::to_string(msg).expect("message serializes");
        line.push('\n');
        self.writer.write_all(line.as_bytes()).context(|| "the other side of the task socket is gone".into())
    }

    /// The next message, or None when the other side closed the socket.
    /// A message longer than [`MAX_MESSAGE`] is an error, not a buffer that
    /// grows as long as the sender likes.
    pub fn recv<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>> {
        let mut line = Vec::new();
        let mut bounded = (&mut self.reader).take(MAX_MESSAGE as u64 + 1);
        if bounded.read_until(b'\n', &mut line).context(|| "cannot read the task socket".into())? == 0 {
            return Ok(None);
        }
        if line.len() > MAX_MESSAGE || line.last() != Some(&b'\n') {
            return fail(format!("a message on the task socket is longer than {MAX_MESSAGE} bytes or cut short"));
        }
        serde_json::from_slice(&line).map(Some).context(|| "garbled message on the task socket".into())
    }
}

/// The descriptors a task hands its agent: its stdio, and the ones Slurm
/// gave it beyond stdio (today Slurm's PMI-2 socket, named by `PMI_FD`),
/// which the container gets at the same numbers. Nothing else of the
/// agent's (or slurmstepd's) ever reaches the container.
pub struct TaskFds {
    pub stdio: [OwnedFd; 3],
    pub extra: Vec<(RawFd, OwnedFd)>,
}

/// Filesystems whose files act on what is written to them (a write to
/// /proc/PID/oom_score_adj or timerslack_ns checks the writer's
/// capabilities): root never writes into a file of theirs.
const PSEUDO_FILESYSTEMS: &[nix::sys::statfs::FsType] = {
    use nix::sys::statfs::*;
    &[
        PROC_SUPER_MAGIC,
        SYSFS_MAGIC,
        CGROUP_SUPER_MAGIC,
        CGROUP2_SUPER_MAGIC,
        DEBUGFS_MAGIC,
        TRACEFS_MAGIC,
        SECURITYFS_MAGIC,
        BPF_FS_MAGIC,
        SELINUX_MAGIC,
        SMACK_MAGIC,
        RDTGROUP_SUPER_MAGIC,
        NSFS_MAGIC,
        FsType(0x6265_6570), // configfs
        FsType(0xde5e_81e4), // efivarfs
        FsType(0x6165_676c), // pstore
    ]
};

/// Whether the task's stdout and stderr are what a task's are (a pipe, a
/// terminal or /dev/null, a file on a real filesystem): root writes into
/// them (lines for the user; a restored program's output), and the task,
/// which is the user's, may hand over any descriptor of hers. A socket's
/// receiver could take root's bytes for root's (`SO_PASSCRED`), a /proc
/// file would act on them with root's capabilities.
pub fn plain_output(stdio: &[OwnedFd; 3]) -> std::result::Result<(), String> {
    stdio.iter().enumerate().skip(1).try_for_each(|(n, fd)| plain_output_fd(fd, n))
}

/// [`plain_output`] for one descriptor, fd `n` of the task.
pub fn plain_output_fd(fd: &impl AsFd, n: usize) -> std::result::Result<(), String> {
    let raw = fd.as_fd().as_raw_fd();
    let kind = nix::sys::stat::fstat(raw).map(|st| st.st_mode & libc::S_IFMT).map_err(|e| format!("fd {n}: {e}"))?;
    let pseudo = || nix::sys::statfs::fstatfs(fd).is_ok_and(|fs| PSEUDO_FILESYSTEMS.contains(&fs.filesystem_type()));
    let plain = match kind {
        libc::S_IFIFO | libc::S_IFCHR => true,
        libc::S_IFREG => !pseudo(),
        _ => false,
    };
    match plain {
        true => Ok(()),
        false => Err(format!("its fd {n} is neither a pipe, a terminal nor a file (root writes into it)")),
    }
}

/// At most this many descriptors beyond stdio.
const MAX_EXTRA_FDS: usize = 4;

/// The pid of the process at the other end of `stream` (`SO_PEERCRED`, as
/// it connected), when it runs as `uid`; the kernel's word, not the peer's.
pub fn peer_of_user(stream: &UnixStream, uid: u32) -> std::result::Result<libc::pid_t, String> {
    let cred =
        nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials).map_err(|e| format!("peer credentials: {e}"))?;
    if cred.uid() != uid {
        return Err(format!("refused a client with uid {} pid {}", cred.uid(), cred.pid()));
    }
    Ok(cred.pid())
}

/// Sends fds 0, 1, 2 and `extra` of this process; the payload names the
/// numbers of the extra ones.
pub fn send_task_fds(stream: &UnixStream, extra: &[RawFd]) -> Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let extra = &extra[..extra.len().min(MAX_EXTRA_FDS)];
    let fds: Vec<RawFd> = [0, 1, 2].iter().chain(extra).copied().collect();
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let payload = format!("S{}", extra.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(","));
    let iov = [std::io::IoSlice::new(payload.as_bytes())];
    sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).context(|| "cannot pass stdio to the agent".into())?;
    Ok(())
}

/// Sends `fds` (at most `N` of the receiver's [`recv_fds`]), with one
/// byte of payload: a stream socket then never delivers them glued to
/// what follows.
pub fn send_fds(stream: &UnixStream, fds: &[RawFd]) -> Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let cmsg = [ControlMessage::ScmRights(fds)];
    let iov = [std::io::IoSlice::new(b"F")];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(stream.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).context(|| "cannot pass descriptors".into())?;
    Ok(())
}

/// Receives what [`send_fds`] sent.
pub fn recv_fds<const N: usize>(stream: &UnixStream) -> Result<Vec<OwnedFd>> {
    let mut payload = [0u8; 1];
    let (len, fds) = crate::sys::recv_with_fds::<N>(stream, &mut payload).context(|| "cannot receive descriptors".into())?;
    if len != 1 || payload != *b"F" {
        return fail("no descriptors came");
    }
    Ok(fds)
}

/// Receives what `send_task_fds` sent.
pub fn recv_task_fds(stream: &UnixStream) -> Result<TaskFds> {
    let mut payload = [0u8; 64];
    let (len, mut received) =
        crate::sys::recv_with_fds::<{ 3 + MAX_EXTRA_FDS }>(stream, &mut payload).context(|| "cannot receive the task's stdio".into())?;
    let text = std::str::from_utf8(&payload[..len]).ok().and_then(|t| t.strip_prefix('S'));
    let numbers: Option<Vec<RawFd>> =
        // Below the numbers the agent moves descriptors to (spawn.rs).
        text.and_then(|t| t.split(',').filter(|n| !n.is_empty()).map(|n| n.parse::<RawFd>().ok().filter(|&n| n > 2 && n < 100)).collect());
    match numbers {
        Some(numbers) if received.len() == 3 + numbers.len() => {
            let extra_fds = received.split_off(3);
            let stdio: [OwnedFd; 3] = received.try_into().map_err(|_| crate::error::EngineError::Failed("stdio".into()))?;
            Ok(TaskFds { stdio, extra: numbers.into_iter().zip(extra_fds).collect() })
        }
        _ => fail("the task did not pass its stdio"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_descriptors_arrive_with_the_numbers_they_had() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, _w) = nix::unistd::pipe().unwrap();
        send_task_fds(&a, &[r.as_raw_fd()]).unwrap();
        let got = recv_task_fds(&b).unwrap();
        assert_eq!(got.extra.len(), 1);
        assert_eq!(got.extra[0].0, r.as_raw_fd());
        send_task_fds(&a, &[]).unwrap();
        assert!(recv_task_fds(&b).unwrap().extra.is_empty());
    }

    #[test]
    fn a_message_longer_than_the_bound_is_refused_not_buffered() {
        let (a, b) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let mut a = a;
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..8 {
                if a.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let mut channel = Channel::new(b).unwrap();
        let e = channel.recv::<ToAgent>().unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
        drop(channel);
        writer.join().unwrap();
    }

    #[test]
    fn root_writes_only_into_pipes_terminals_and_real_files() {
        let stdio = |out: OwnedFd| [OwnedFd::from(std::fs::File::open("/dev/null").unwrap()), out.try_clone().unwrap(), out];
        let open = |path: &str| OwnedFd::from(std::fs::OpenOptions::new().write(true).open(path).unwrap());
        assert!(plain_output(&stdio(nix::unistd::pipe().unwrap().1)).is_ok());
        assert!(plain_output(&stdio(open("/dev/null"))).is_ok());
        let file = std::env::temp_dir().join(format!("plain-output-{}", std::process::id()));
        std::fs::write(&file, "").unwrap();
        assert!(plain_output(&stdio(open(file.to_str().unwrap()))).is_ok());
        std::fs::remove_file(&file).unwrap();
        assert!(plain_output(&stdio(UnixStream::pair().unwrap().0.into())).is_err());
        assert!(plain_output(&stdio(open("/proc/self/timerslack_ns"))).is_err());
    }

    #[test]
    fn messages_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut tx = Channel::new(a).unwrap();
        let mut rx = Channel::new(b).unwrap();
        tx.send(&ToAgent::Signal(10)).unwrap();
        assert!(matches!(rx.recv::<ToAgent>().unwrap(), Some(ToAgent::Signal(10))));
        drop(tx);
        assert!(rx.recv::<ToAgent>().unwrap().is_none());
    }
}
