//! What the task wrapper (the job user) and the agent (root) say to each
//! other over the task's Unix socket: newline-delimited JSON, and the task's
//! stdio passed once as SCM_RIGHTS.

use crate::error::{fail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

#[derive(Debug, Serialize, Deserialize)]
pub enum ToAgent {
    /// Run (or restore) this container command for the task.
    Start { argv: Vec<String>, cwd: String, env: Vec<(String, String)> },
    /// Slurm is ending the task (SIGTERM): checkpoint if this is a requeue.
    Terminate,
    /// Pass a signal to the container (srun's Ctrl-C, scancel --signal).
    Signal(i32),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ToTask {
    /// The container ended; the task exits with this code.
    Exited(i32),
    /// The agent is done with the container after `Terminate`; exit.
    Stopped,
    /// The agent refused or failed; the message has been shown to the user.
    Failed(String),
}

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
    pub fn recv<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).context(|| "cannot read the task socket".into())? == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line).map(Some).context(|| "garbled message on the task socket".into())
    }

    pub fn raw_fd(&self) -> RawFd {
        self.writer.as_raw_fd()
    }
}

/// Sends fds 0, 1 and 2 of this process (one byte of payload carries them).
pub fn send_stdio(stream: &UnixStream) -> Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds = [0, 1, 2];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [std::io::IoSlice::new(b"S")];
    sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).context(|| "cannot pass stdio to the agent".into())?;
    Ok(())
}

/// Receives the task's three stdio fds.
pub fn recv_stdio(stream: &UnixStream) -> Result<[OwnedFd; 3]> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 3]);
    let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .context(|| "cannot receive the task's stdio".into())?;
    for c in msg.cmsgs().context(|| "bad control message".into())? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if fds.len() == 3 {
                // SAFETY: the kernel just installed these descriptors for us.
                let owned: Vec<OwnedFd> = fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect();
                return Ok(owned.try_into().unwrap());
            }
        }
    }
    fail("the task did not pass its stdio")
}
