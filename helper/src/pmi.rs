//! Slurm's PMI-2 socket (`srun --mpi=pmi2`: `PMI_FD`) across a checkpoint.
//!
//! The container does not get slurmstepd's socket itself but one end of a
//! socketpair, whose other end the agent relays to slurmstepd's, byte for
//! byte, both ways. Two reasons:
//! - CRIU dumps that end as an external socket (`--external unix[INO]`),
//!   and the restore puts a new relay's end in its place (`--inherit-fd`):
//!   the restored program talks to the slurmstepd of the run it is
//!   restored in.
//! - slurmstepd's pmi2 plugin takes the first bytes a task sends as its PMI
//!   init (`cmd=init pmi_version=V pmi_subversion=S`, which also chooses
//!   PMI-1.1 or PMI-2.0 for what follows; `mpi/pmi2/agent.c`). A program
//!   dumped after its `MPI_Init` never says init again; one dumped before
//!   it still will. The relay knows which, and which version it chose (MPICH
//!   chooses 1.1), the checkpoint records it, and before a restored program
//!   that had said it is let through, the agent says the same to the new
//!   slurmstepd.
//!
//! The bytes are the user's and go where they went without the option, to
//! her own step's slurmstepd (the socket is checked to be its), and nothing
//! more reaches slurmstepd: the relay never closes or shuts down
//! slurmstepd's socket (slurmstepd takes an end of file before an init as
//! a broken init and then aborts: `fatal: this is impossible`), which
//! closes, as without the option, when the task ends. Root keeps only the
//! program's first line, and uses it only when it is exactly an init line.

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, send, MsgFlags};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The most of a program's init line slurmstepd reads (one read of 64).
const INIT_MAX: usize = 64;
/// slurmstepd answers an init at once; a step that does not is broken.
const INIT_TIMEOUT: Duration = Duration::from_secs(5);

/// The PMI version a program chose in its init line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub version: u32,
    pub subversion: u32,
}

impl Version {
    /// `cmd=init pmi_version=V pmi_subversion=S\n`, exactly.
    fn parse(line: &[u8]) -> Option<Version> {
        let line = std::str::from_utf8(line).ok()?.strip_suffix('\n')?;
        let rest = line.strip_prefix("cmd=init pmi_version=")?;
        let (v, s) = rest.split_once(" pmi_subversion=")?;
        let number = |t: &str| (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit())).then(|| t.parse().ok()).flatten();
        Some(Version { version: number(v)?, subversion: number(s)? })
    }

    fn line(&self) -> String {
        format!("cmd=init pmi_version={} pmi_subversion={}\n", self.version, self.subversion)
    }
}

/// What crossed the relay, under one lock, so that a stopped program's
/// checkpoint sees a consistent picture.
#[derive(Default)]
struct Talk {
    /// The program's first bytes, up to the end of its first line.
    first: Vec<u8>,
    begun: bool,
    /// The program's bytes not yet whole requests, and slurmstepd's not
    /// yet whole answers.
    request: Vec<u8>,
    answer: Vec<u8>,
    /// Whole requests and whole answers passed so far: a program may send
    /// the next request before the last answer.
    requests: u64,
    answers: u64,
    /// Bytes read from one side and not yet written to the other.
    in_transit: usize,
    /// Bytes passed each way, for telling whether anything crossed while
    /// a checkpoint was taken.
    crossed: (u64, u64),
}

impl Talk {
    fn said(&self) -> Option<Version> {
        Version::parse(&self.first)
    }

    fn requested(&mut self, bytes: &[u8]) {
        if !self.first.ends_with(b"\n") && self.first.len() < INIT_MAX {
            let line = bytes.iter().position(|&b| b == b'\n').map_or(bytes.len(), |i| i + 1);
            let room = INIT_MAX - self.first.len();
            self.first.extend_from_slice(&bytes[..line.min(room)]);
        }
        self.begun = true;
        self.crossed.0 += bytes.len() as u64;
        let frames = self.frames();
        self.requests += whole_messages(&mut self.request, bytes, frames);
    }

    fn answered(&mut self, bytes: &[u8]) {
        self.crossed.1 += bytes.len() as u64;
        let frames = self.frames();
        self.answers += whole_messages(&mut self.answer, bytes, frames);
    }

    /// PMI-2 frames its messages, after the init line; PMI-1.1 has lines.
    fn frames(&self) -> bool {
        self.said().is_some_and(|v| v.version == 2)
    }

    /// A request without its whole answer, or part of a message.
    fn under_way(&self) -> bool {
        self.requests != self.answers || !self.request.is_empty() || !self.answer.is_empty() || self.in_transit > 0
    }
}

/// Adds `bytes` to the message `partial` holds the start of, and returns
/// how many whole messages they completed (`partial` keeps the rest):
/// lines (PMI-1.1, and any init and its answer), or with `frames` PMI-2's
/// (a 6-character length, then as many bytes). What cannot be read as
/// either stays partial for good: the checkpoint is then refused rather
/// than risk a restored program waiting forever.
fn whole_messages(partial: &mut Vec<u8>, bytes: &[u8], frames: bool) -> u64 {
    partial.extend_from_slice(bytes);
    let mut whole = 0;
    loop {
        let end = if !frames || partial.starts_with(b"cmd=") {
            partial.iter().position(|&b| b == b'\n').map(|i| i + 1)
        } else {
            partial
                .get(..6)
                .and_then(|h| std::str::from_utf8(h).ok()?.trim().parse::<usize>().ok())
                .map(|len| 6 + len)
                .filter(|&end| end <= partial.len())
        };
        match end {
            Some(end) if end > 0 => {
                partial.drain(..end);
                whole += 1;
            }
            _ => return whole,
        }
    }
}

struct Shared {
    ours: UnixStream,
    slurm: UnixStream,
    talk: Mutex<Talk>,
    /// Readable (at its end) once the relay is to stop: closing the
    /// writing end wakes every thread waiting on it.
    stop_r: OwnedFd,
    stop_w: Mutex<Option<OwnedFd>>,
}

impl Shared {
    fn talk(&self) -> MutexGuard<'_, Talk> {
        self.talk.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A relay, made but not yet flowing: what the container gets is
/// `container_end`; nothing reaches slurmstepd before [`Relay::go`].
pub struct Relay {
    pub container_end: OwnedFd,
    shared: Arc<Shared>,
}

/// A flowing relay, as the agent and the checkpoint see it.
#[derive(Clone)]
pub struct Flowing {
    /// The inode of the container's end (`socket:[INO]`).
    pub inode: u64,
    shared: Arc<Shared>,
}

/// Whether `fd` is this step's slurmstepd's end of a PMI socketpair: a
/// UNIX stream socket whose peer is `stepd` (its pid, from the plugin that
/// runs in it), as root. The task
/// (or a script's process, through the shim) names it by `PMI_FD`: root
/// must not write for the user into a socket of her choosing (a receiver
/// with `SO_PASSCRED` would take each message as root's).
pub fn check_slurm_socket(fd: &OwnedFd, stepd: Option<u32>) -> Result<(), String> {
    use nix::sys::socket::{getsockopt, sockopt, SockType};
    let stream = getsockopt(fd, sockopt::SockType).is_ok_and(|t| t == SockType::Stream);
    let peer = getsockopt(fd, sockopt::PeerCredentials).ok().filter(|c| c.uid() == 0 && Some(c.pid() as u32) == stepd);
    // A socketpair's peer has no address; a connection to one of
    // slurmstepd's listening sockets has that socket's (and its
    // credentials, taken at listen()).
    let unnamed = nix::sys::socket::getpeername::<nix::sys::socket::UnixAddr>(fd.as_raw_fd())
        .is_ok_and(|a| a.path().is_none() && a.as_abstract().is_none());
    if !stream || peer.is_none() || !unnamed {
        return Err("PMI_FD names no socket of this step's slurmstepd".into());
    }
    Ok(())
}

impl Relay {
    /// A relay for slurmstepd's socket `slurm` (checked with
    /// [`check_slurm_socket`]); `said`: the init the program had said
    /// already (a restored one). Its sockets are made in the container's
    /// network namespace `net` (None: the node's), where CRIU, which runs
    /// there, looks for the sockets it dumps.
    pub fn new(slurm: &OwnedFd, said: Option<Version>, net: Option<&std::fs::File>) -> io::Result<Relay> {
        let (ours, theirs) = match net {
            Some(ns) => crate::namespaces::in_net_ns(ns, UnixStream::pair)?,
            None => UnixStream::pair()?,
        };
        let talk = Talk { first: said.map(|v| v.line().into_bytes()).unwrap_or_default(), begun: said.is_some(), ..Default::default() };
        let (stop_r, stop_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let slurm = UnixStream::from(slurm.try_clone()?);
        let shared = Shared { ours, slurm, talk: Mutex::new(talk), stop_r, stop_w: Mutex::new(Some(stop_w)) };
        Ok(Relay { container_end: theirs.into(), shared: Arc::new(shared) })
    }

    /// Copies of the container's ends of `relays`, in order.
    pub fn container_ends(relays: &[Relay]) -> io::Result<Vec<OwnedFd>> {
        relays.iter().map(|r| r.container_end.try_clone()).collect()
    }

    /// Starts copying, after saying init to slurmstepd for a restored
    /// program that had said it. The container's end is closed here: the
    /// container (or CRIU) holds its own copy by now, and the relay ends
    /// when the last of those closes, or at [`Flowing::stop`].
    pub fn go(self, restored: bool) -> io::Result<Flowing> {
        let Relay { container_end, shared } = self;
        let inode = nix::sys::stat::fstat(container_end.as_raw_fd()).map_err(io::Error::from)?.st_ino;
        drop(container_end);
        let said = shared.talk().said();
        if let (true, Some(v)) = (restored, said) {
            say_init(&shared.slurm, v)?;
        }
        let up = shared.clone();
        std::thread::spawn(move || relay(&up, &up.ours, &up.slurm, None, Talk::requested));
        let down = shared.clone();
        std::thread::spawn(move || relay(&down, &down.slurm, &down.ours, Some(&down.ours), Talk::answered));
        Ok(Flowing { inode, shared })
    }
}

impl Flowing {
    /// With the program stopped: the init it said to slurmstepd (None: it
    /// has said nothing), or why it cannot be carried over.
    pub fn said_init(&self) -> Result<Option<Version>, String> {
        let talk = self.shared.talk();
        match (talk.begun, talk.said()) {
            (false, _) => Ok(None),
            (true, Some(v)) => Ok(Some(v)),
            (true, None) => {
                Err("began its talk with Slurm's PMI other than with a PMI init line, which cannot be said again for it".into())
            }
        }
    }

    /// With the program stopped: whether nothing is under way between it
    /// and slurmstepd, so that a restored one can go on with a new relay
    /// (else what is under way), and what has crossed so far, for
    /// [`Flowing::still`] once the dump is done.
    pub fn quiet(&self) -> Result<(u64, u64), String> {
        let talk = self.shared.talk();
        let queues = |s: &UnixStream| crate::sys::socket_queues(s.as_raw_fd()).map_err(|e| format!("PMI relay: {e}"));
        let (unread_by_us, unread_by_it) = queues(&self.shared.ours)?;
        let (unread_from_slurm, _) = queues(&self.shared.slurm)?;
        if talk.under_way() || unread_by_us > 0 || unread_by_it > 0 || unread_from_slurm > 0 {
            return Err("was in the middle of an exchange with Slurm's PMI (MPI_Init, a fence, MPI_Finalize)".into());
        }
        Ok(talk.crossed)
    }

    /// Whether nothing crossed since [`Flowing::quiet`] said `crossed`: a
    /// process the stop did not reach (one continued from outside, or one
    /// outside the container holding its end) may have talked meanwhile.
    pub fn still(&self, crossed: (u64, u64)) -> Result<(), String> {
        match self.shared.talk().crossed == crossed {
            true => Ok(()),
            false => Err("talked to Slurm's PMI while it was being checkpointed".into()),
        }
    }

    /// Ends the relay (the container is gone): its threads return, closing
    /// root's copies of both sockets; slurmstepd's is closed, never shut
    /// down, so the task's own copy keeps it as it was.
    pub fn stop(&self) {
        self.shared.stop_w.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Copies from `from` to `to` until `from` ends, the relay is stopped, or
/// `watch` hangs up (the container's end, watched while waiting on
/// slurmstepd's, which may stay silent for the rest of the step). Each read
/// is noted in the talk under its lock, with the bytes counted in transit
/// until written. Nothing here waits but in poll with the stop pipe, so no
/// peer that stops reading holds a thread (and root's copy of slurmstepd's
/// socket) past the stop.
fn relay(shared: &Shared, from: &UnixStream, to: &UnixStream, watch: Option<&UnixStream>, note: fn(&mut Talk, &[u8])) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut fds = vec![PollFd::new(shared.stop_r.as_fd(), PollFlags::POLLIN), PollFd::new(from.as_fd(), PollFlags::POLLIN)];
        if let Some(w) = watch {
            fds.push(PollFd::new(w.as_fd(), PollFlags::empty()));
        }
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
            Ok(_) => {}
        }
        let woke = |f: &PollFd, flags: PollFlags| f.revents().is_some_and(|r| r.intersects(flags));
        let gone = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL;
        if woke(&fds[0], gone) || fds.get(2).is_some_and(|f| woke(f, gone)) {
            return;
        }
        let n = {
            let mut talk = shared.talk();
            match recv(from.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => return,
                Ok(n) => {
                    note(&mut talk, &buf[..n]);
                    talk.in_transit += n;
                    n
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(_) => return,
            }
        };
        let written = write_all(shared, to, &buf[..n]);
        shared.talk().in_transit -= n;
        if !written {
            return;
        }
    }
}

/// Writes all of `bytes` to `to`, waiting for room in poll with the stop
/// pipe; false once stopped, or when `to` fails.
fn write_all(shared: &Shared, to: &UnixStream, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        match send(to.as_raw_fd(), bytes, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => bytes = &bytes[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::EAGAIN) => {
                let mut fds = [PollFd::new(shared.stop_r.as_fd(), PollFlags::POLLIN), PollFd::new(to.as_fd(), PollFlags::POLLOUT)];
                match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(_) => return false,
                    Ok(_) if fds[0].revents().is_some_and(|r| !r.is_empty()) => return false,
                    Ok(_) => {}
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// Says the program's init to slurmstepd on behalf of the restored program
/// and checks the answer (`cmd=response_to_init rc=0 …`), within
/// [`INIT_TIMEOUT`] whatever slurmstepd does.
fn say_init(slurm: &UnixStream, said: Version) -> io::Result<()> {
    let deadline = Instant::now() + INIT_TIMEOUT;
    let wait = |flags: PollFlags| -> io::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::ZERO);
        match nix::poll::poll(&mut [PollFd::new(slurm.as_fd(), flags)], ms) {
            Ok(0) => Err(io::Error::new(io::ErrorKind::TimedOut, "slurmstepd did not answer PMI init")),
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    };
    let line = said.line();
    let mut out = line.as_bytes();
    while !out.is_empty() {
        wait(PollFlags::POLLOUT)?;
        match send(slurm.as_raw_fd(), out, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => out = &out[n..],
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while answer.len() < 256 && !answer.ends_with(b"\n") {
        wait(PollFlags::POLLIN)?;
        match recv(slurm.as_raw_fd(), &mut byte, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => break,
            Ok(_) => answer.push(byte[0]),
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    if answer.starts_with("cmd=response_to_init") && answer.split_whitespace().any(|w| w == "rc=0") {
        Ok(())
    } else {
        Err(io::Error::other(format!("slurmstepd answered PMI init with `{}`", answer.trim())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A slurmstepd stand-in: answers an init line, then echoes.
    fn stepd(mut s: UnixStream, answer: &'static [u8]) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            loop {
                let n = s.read(&mut buf).unwrap_or(0);
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                if got.starts_with(b"cmd=init") {
                    if got.ends_with(b"\n") {
                        s.write_all(answer).unwrap();
                        got.clear();
                    }
                } else {
                    s.write_all(&buf[..n]).unwrap();
                }
            }
            got
        })
    }

    const ANSWER_1_1: &[u8] = b"cmd=response_to_init rc=0 pmi_version=1 pmi_subversion=1\n";

    #[test]
    fn a_fresh_program_speaks_first_and_its_init_is_kept() {
        let (slurm, far) = UnixStream::pair().unwrap();
        let seen = stepd(far, ANSWER_1_1);
        let relay = Relay::new(&slurm.into(), None, None).unwrap();
        let mut container = UnixStream::from(relay.container_end.try_clone().unwrap());
        let flowing = relay.go(false).unwrap();
        assert_eq!(flowing.said_init(), Ok(None));
        // MPICH's init, split as a reader may see it.
        container.write_all(b"cmd=init pmi_vers").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        container.write_all(b"ion=1 pmi_subversion=1\n").unwrap();
        let mut line = [0u8; ANSWER_1_1.len()];
        container.read_exact(&mut line).unwrap();
        assert_eq!(flowing.said_init(), Ok(Some(Version { version: 1, subversion: 1 })));
        barrier_then_end(container, flowing, seen);
    }

    /// A PMI-1 barrier through the relay, echoed by the stand-in, then the
    /// container's end closes. The stand-in got the barrier alone (an init
    /// is answered and cleared), and saw its socket end only once the
    /// relay's copy went with its threads: the relay never closes it.
    fn barrier_then_end(mut container: UnixStream, flowing: Flowing, seen: std::thread::JoinHandle<Vec<u8>>) {
        container.write_all(b"cmd=barrier_in\n").unwrap();
        let mut back = [0u8; 15];
        container.read_exact(&mut back).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(flowing.quiet().is_ok());
        drop(container);
        std::thread::sleep(Duration::from_millis(50));
        drop(flowing);
        assert_eq!(seen.join().unwrap(), b"cmd=barrier_in\n");
    }

    #[test]
    fn a_restored_program_that_had_said_init_is_introduced_with_its_own_version() {
        let (slurm, far) = UnixStream::pair().unwrap();
        let seen = stepd(far, ANSWER_1_1);
        let said = Version { version: 1, subversion: 1 };
        let relay = Relay::new(&slurm.into(), Some(said), None).unwrap();
        let container = UnixStream::from(relay.container_end.try_clone().unwrap());
        let flowing = relay.go(true).unwrap();
        assert_eq!(flowing.said_init(), Ok(Some(said)));
        barrier_then_end(container, flowing, seen);
    }

    #[test]
    fn a_refused_or_unanswered_init_is_an_error() {
        let (slurm, far) = UnixStream::pair().unwrap();
        let _seen = stepd(far, b"cmd=response_to_init rc=1 pmi_version=2 pmi_subversion=0\n");
        let relay = Relay::new(&slurm.into(), Some(Version { version: 2, subversion: 0 }), None).unwrap();
        assert!(relay.go(true).is_err());
    }

    #[test]
    fn a_request_not_yet_wholly_answered_is_under_way() {
        let (slurm, mut far) = UnixStream::pair().unwrap();
        let relay = Relay::new(&slurm.into(), Some(Version { version: 2, subversion: 0 }), None).unwrap();
        let mut container = UnixStream::from(relay.container_end.try_clone().unwrap());
        let flowing = relay.go(false).unwrap();
        container.write_all(b"14    cmd=kvs-fence;").unwrap();
        let mut got = [0u8; 20];
        far.read_exact(&mut got).unwrap();
        assert!(flowing.quiet().is_err(), "no answer yet");
        // slurmstepd writes a PMI-2 answer's length and body separately.
        far.write_all(b"28    ").unwrap();
        let mut header = [0u8; 6];
        container.read_exact(&mut header).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(flowing.quiet().is_err(), "the length is there, not the body");
        far.write_all(b"cmd=kvs-fence-response;rc=0;").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(flowing.quiet().is_err(), "answered, not yet read by the program");
        let mut body = [0u8; 28];
        container.read_exact(&mut body).unwrap();
        let crossed = flowing.quiet().unwrap();
        assert_eq!(flowing.still(crossed), Ok(()));
        // The next request before the answer to one sent with it.
        container.write_all(b"12    cmd=kvs-get;12    cmd=kvs-get;").unwrap();
        far.read_exact(&mut [0u8; 36]).unwrap();
        far.write_all(b"21    cmd=kvs-get-response;").unwrap();
        container.read_exact(&mut [0u8; 27]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(flowing.quiet().is_err(), "one request of two answered");
        assert!(flowing.still(crossed).is_err(), "bytes crossed since");
    }

    #[test]
    fn whole_messages_are_lines_or_frames() {
        let count = |bytes: &[u8], frames| {
            let mut partial = Vec::new();
            (whole_messages(&mut partial, bytes, frames), partial)
        };
        assert_eq!(count(b"cmd=response_to_init rc=0\n", true), (1, vec![]));
        assert_eq!(count(b"cmd=barrier_out", false), (0, b"cmd=barrier_out".to_vec()));
        assert_eq!(count(b"11    cmd=x;rc=0;5     cmd=y", true), (2, vec![]));
        assert_eq!(count(b"11    cmd=x;rc=0;5     cmd", true), (1, b"5     cmd".to_vec()));
        assert_eq!(count(b"junk!!", true).0, 0);
        // Split anywhere, counted once whole.
        let mut partial = Vec::new();
        assert_eq!(whole_messages(&mut partial, b"11   ", true), 0);
        assert_eq!(whole_messages(&mut partial, b" cmd=x;rc=0;", true), 1);
        assert!(partial.is_empty());
    }

    #[test]
    fn only_an_init_line_is_said_again() {
        assert_eq!(Version::parse(b"cmd=init pmi_version=2 pmi_subversion=0\n"), Some(Version { version: 2, subversion: 0 }));
        for bad in [&b"cmd=init pmi_version=2 pmi_subversion=0"[..], b"cmd=init pmi_version= pmi_subversion=0\n", b"000012cmd=finalize;"] {
            assert_eq!(Version::parse(bad), None);
        }
    }

    #[test]
    fn only_slurmstepds_own_socket_is_relayed() {
        // A socketpair's peer is its maker: here this test, as root.
        let (mine, _peer) = UnixStream::pair().unwrap();
        let mine: OwnedFd = mine.into();
        let dir = std::env::temp_dir().join(format!("pmi-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let listener = std::os::unix::net::UnixListener::bind(&dir).unwrap();
        let connected: OwnedFd = UnixStream::connect(&dir).unwrap().into();
        let _ = std::fs::remove_file(&dir);
        drop(listener);
        assert!(check_slurm_socket(&connected, Some(std::process::id())).is_err(), "a connection to a listening socket of its");
        assert!(check_slurm_socket(&mine, Some(std::process::id() + 1)).is_err(), "another process's pair");
        if nix::unistd::geteuid().is_root() {
            assert_eq!(check_slurm_socket(&mine, Some(std::process::id())), Ok(()));
        }
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        assert!(check_slurm_socket(&a.into(), Some(std::process::id())).is_err(), "not a stream");
    }

    #[test]
    fn stop_ends_a_relay_whose_container_end_lives_on() {
        let (slurm, _far) = UnixStream::pair().unwrap();
        let relay = Relay::new(&slurm.into(), None, None).unwrap();
        let _kept = relay.container_end.try_clone().unwrap();
        let flowing = relay.go(false).unwrap();
        flowing.stop();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(Arc::strong_count(&flowing.shared), 1, "both threads returned");
    }
}
