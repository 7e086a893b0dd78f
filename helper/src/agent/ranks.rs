//! A protected `srun --mpi=pmi2 -n N` step on one node. Its ranks share
//! memory (MPI's `/dev/shm` segments) and connections, which one CRIU per
//! container could not dump consistently; so they run in one container, as
//! children of the ranks launcher (the `checkpoint-container-ranks` crate),
//! and one CRIU dumps them at one cut, and restores them together or not at
//! all.
//!
//! Task 0's agent (the leader) starts, checkpoints and restores that
//! container, relays every rank's PMI socket to slurmstepd, and tells every
//! task how its rank ended. Every other task's agent (a follower) hands the
//! leader its task's stdio, Slurm's PMI socket, command, environment and
//! CPUs over a root-only socket, and passes on what the leader says.
//!
//! Each rank gets what its task had: its stdio, its PMI socket (relayed) at
//! the number `PMI_FD` names, its CPUs, and the variables in which its
//! environment differs from rank 0's. What differs from unprotected ranks
//! is listed in docs/transparency.md (all ranks are in task 0's cgroups).

use super::messages::tell_user;
use super::session_file::SessionFile;
use super::spawn::LauncherStatus;
use super::*;
use crate::error::{fail, Context, Result};
use crate::protocol::{self, Channel, ToTask};
use crate::restore::{rank_fds, RANKS_STATUS_FD};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the leader waits for every other task's agent, and a follower
/// for the leader's socket: slurmstepd starts a node's tasks together.
const GATHER_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether task `t` is one of the ranks of a step run in one container:
/// a task (not a container a script starts) of a one-node step of several
/// tasks, with Slurm's PMI socket.
pub(super) fn in_one_container(t: &Task, has_pmi: bool) -> bool {
    t.container.is_none() && t.step_nodes == 1 && t.step().is_coupled() && has_pmi
}

/// What a follower hands over, besides its descriptors.
#[derive(Debug, Serialize, Deserialize)]
enum ToLeader {
    Rank {
        task_id: u32,
        argv: Vec<String>,
        cwd: String,
        env: Vec<(String, String)>,
        runtime: Option<String>,
        cpus: Vec<usize>,
        /// The number the task's `PMI_FD` names.
        pmi_at: RawFd,
    },
    /// The follower cannot hand its task over (the line says why).
    Unprotected { task_id: u32, why: String },
}

#[derive(Debug, Serialize, Deserialize)]
enum ToFollower {
    /// The step runs unprotected: the task runs its command itself.
    Unprotected(String),
    Exited(i32),
    /// Checkpointed (or not) at a requeue: the task ends.
    Stopped,
    /// Task 0 ended without its container ending (it was killed).
    Failed(String),
}

/// A task's rank as the leader holds it.
pub(super) struct Rank {
    pub(super) stdio: [OwnedFd; 3],
    /// Slurm's PMI socket, and the number `PMI_FD` names.
    pub(super) pmi: (RawFd, OwnedFd),
    env: Vec<(String, String)>,
    cpus: Vec<usize>,
}

impl Rank {
    /// Rank 0: the leader's own task's (copies: `serve` keeps its own).
    fn own(own: &Own) -> std::result::Result<Rank, String> {
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| format!("dup: {e}"));
        let [i, o, e] = own.stdio;
        Ok(Rank { stdio: [dup(i)?, dup(o)?, dup(e)?], pmi: (own.pmi.0, dup(&own.pmi.1)?), env: own.env.to_vec(), cpus: own.cpus.clone() })
    }
}

struct Follower {
    task_id: u32,
    channel: Channel,
}

/// Says `msg(task id)` to each follower (one that is gone hears nothing).
fn tell_all(followers: &mut [Follower], msg: impl Fn(usize) -> ToFollower) {
    for f in followers {
        let _ = f.channel.send(&msg(f.task_id as usize));
    }
}

/// The step's ranks, gathered by the leader: rank 0 is its own task's.
pub(super) struct Gathered {
    pub(super) ranks: Vec<Rank>,
    followers: Vec<Follower>,
    /// Every follower was told how its rank ended (or to run unprotected).
    settled: bool,
}

impl Drop for Gathered {
    /// The leader failed on the way (its log says why): the followers'
    /// tasks end with it rather than wait for a word that never comes.
    fn drop(&mut self) {
        if !self.settled {
            self.failed("task 0's agent failed to run the step's container (the node's checkpoint-container log says why)");
        }
    }
}

/// The leader's own task, as `serve` received it.
pub(super) struct Own<'a> {
    pub(super) argv: &'a [String],
    pub(super) cwd: &'a str,
    pub(super) env: &'a [(String, String)],
    pub(super) stdio: &'a [OwnedFd; 3],
    pub(super) pmi: &'a (RawFd, OwnedFd),
    pub(super) cpus: Vec<usize>,
}

/// Leader: waits for every other task's agent and takes its rank. Err: the
/// line why the step runs unprotected (every follower that came was told).
pub(super) fn gather(t: &Task, own: Own, is_site_runtime: impl Fn(&str) -> bool) -> std::result::Result<Gathered, String> {
    let path = ckpt_config::agent_files::ranks(t.job_id, t.step_id, t.restart_count);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| format!("cannot listen on {path}: {e}"))?;
    // Root's directory (checked in `session::run`), root's socket.
    let _ = std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
    let followers = accept_followers(t, &listener);
    let _ = std::fs::remove_file(&path);
    let (mut followers, handed) = followers?;
    let ranks = handed
        .and_then(|handed| check_ranks(t, &own, handed, is_site_runtime))
        .and_then(|others| room_for(others.len() + 1).map(|()| others))
        .and_then(|others| Ok(std::iter::once(Rank::own(&own)?).chain(others).collect()));
    match ranks {
        Ok(ranks) => Ok(Gathered { ranks, followers, settled: false }),
        Err(why) => {
            tell_all(&mut followers, |_| ToFollower::Unprotected(why.clone()));
            Err(why)
        }
    }
}

/// A follower's handover, as received.
struct Handed {
    rank: Rank,
    argv: Vec<String>,
    cwd: String,
    runtime: Option<String>,
}

/// Followers that came (in task order), and their ranks or why the step
/// runs unprotected.
type Came = (Vec<Follower>, std::result::Result<Vec<Handed>, String>);

fn accept_followers(t: &Task, listener: &UnixListener) -> std::result::Result<Came, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + GATHER_TIMEOUT;
    let mut came: Vec<(Follower, Option<Handed>)> = Vec::new();
    let mut refusal = None;
    while came.len() + 1 < t.step_tasks as usize {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(_) => {
                let missing: Vec<String> =
                    (1..t.step_tasks).filter(|k| !came.iter().any(|(f, _)| f.task_id == *k)).map(|k| k.to_string()).collect();
                refusal = Some(format!("task {} of the step did not reach task 0 within {GATHER_TIMEOUT:?}", missing.join(", ")));
                break;
            }
        };
        match take_follower(t, stream) {
            Ok((f, handed)) if !came.iter().any(|(c, _)| c.task_id == f.task_id) => {
                if let Err(why) = &handed {
                    refusal.get_or_insert_with(|| why.clone());
                }
                came.push((f, handed.ok()));
            }
            Ok(_) => refusal = Some("two agents said they were the same task".into()),
            Err(e) => log::warn!("{}: a rank's agent was refused: {e}", t.name()),
        }
    }
    came.sort_by_key(|(f, _)| f.task_id);
    let (followers, handed): (Vec<Follower>, Vec<Option<Handed>>) = came.into_iter().unzip();
    Ok((followers, refusal.map_or_else(|| Ok(handed.into_iter().flatten().collect()), Err)))
}

/// One follower: root (the kernel's word), then its descriptors and rank.
fn take_follower(t: &Task, stream: UnixStream) -> Result<(Follower, std::result::Result<Handed, String>)> {
    stream.set_nonblocking(false).context(|| "socket".into())?;
    protocol::peer_of_user(&stream, 0).map_err(crate::error::EngineError::Failed)?;
    stream.set_read_timeout(Some(GATHER_TIMEOUT)).context(|| "socket".into())?;
    let fds = protocol::recv_fds::<4>(&stream)?;
    let mut channel = Channel::new(stream)?;
    let said: Option<ToLeader> = channel.recv()?;
    let (task_id, handed) = match said {
        Some(ToLeader::Rank { task_id, argv, cwd, env, runtime, cpus, pmi_at }) if fds.len() == 4 => {
            let mut fds = fds.into_iter();
            let mut next = || fds.next().expect("four");
            let stdio = [next(), next(), next()];
            let rank = Rank { stdio, pmi: (pmi_at, next()), env, cpus };
            (task_id, Ok(Handed { rank, argv, cwd, runtime }))
        }
        Some(ToLeader::Unprotected { task_id, why }) => (task_id, Err(format!("task {task_id}: {why}"))),
        _ => return fail("a rank's agent sent no rank"),
    };
    if task_id == 0 || task_id >= t.step_tasks {
        return fail(format!("a rank's agent said it was task {task_id}"));
    }
    Ok((Follower { task_id, channel }, handed))
}

/// Every rank runs task 0's command, through the site's Apptainer, and
/// talks to this step's slurmstepd.
fn check_ranks(t: &Task, own: &Own, handed: Vec<Handed>, is_site_runtime: impl Fn(&str) -> bool) -> std::result::Result<Vec<Rank>, String> {
    for (k, h) in handed.iter().enumerate() {
        let task = k + 1;
        if h.argv != own.argv || h.cwd != own.cwd {
            return Err(format!("task {task} runs another command or in another directory than task 0 (all ranks run in one container)"));
        }
        if !h.runtime.as_deref().is_some_and(&is_site_runtime) {
            return Err(format!("task {task} does not run the site's Apptainer"));
        }
        crate::pmi::check_slurm_socket(&h.rank.pmi.1, t.stepd_pid).map_err(|e| format!("task {task}: {e}"))?;
    }
    Ok(handed.into_iter().map(|h| h.rank).collect())
}

/// Descriptors the agent and the restore hold per rank (its task's four,
/// copies, a relay's sockets and stop pipe, CRIU's), and beyond the ranks.
const FDS_PER_RANK: u64 = 16;
const FDS_BESIDES: u64 = 256;

/// Raises this agent's open-file limit (within its hard limit) so that
/// every rank's descriptors fit, at the numbers they are placed at
/// (restore::rank_fds, CRIU's above 110); or says why they cannot.
fn room_for(ranks: usize) -> std::result::Result<(), String> {
    const NOFILE: usize = libc::RLIMIT_NOFILE as usize;
    let needed = FDS_BESIDES + FDS_PER_RANK * ranks as u64;
    let limit = crate::sys::getrlimit(NOFILE).map_err(|e| format!("open-file limit: {e}"))?;
    if limit.rlim_cur >= needed {
        return Ok(());
    }
    if limit.rlim_max < needed {
        return Err(format!("{ranks} ranks need {needed} open files, above this node's limit for slurmstepd ({})", limit.rlim_max));
    }
    crate::sys::setrlimit(NOFILE, &libc::rlimit { rlim_cur: needed, rlim_max: limit.rlim_max }).map_err(|e| format!("open-file limit: {e}"))
}

impl Gathered {
    /// The launcher's arguments: the descriptors each rank finds in the
    /// container (restore::rank_fds; rank 0's stdio is the container's
    /// own), its CPUs, and the variables in which its environment differs
    /// from rank 0's.
    pub(super) fn launcher_args(&self) -> Vec<String> {
        let mut args = vec!["--status-fd".to_string(), RANKS_STATUS_FD.to_string()];
        let zero = &self.ranks[0].env;
        for (k, rank) in self.ranks.iter().enumerate() {
            let [i, o, e, pmi] = rank_fds(k);
            let stdio = if k == 0 { "0,1,2".to_string() } else { format!("{i},{o},{e}") };
            args.extend(["--rank".into(), format!("{k}:{stdio},{pmi},{}", rank.pmi.0)]);
            if !rank.cpus.is_empty() {
                let cpus: Vec<String> = rank.cpus.iter().map(usize::to_string).collect();
                args.extend(["--cpus".into(), format!("{k}:{}", cpus.join(","))]);
            }
            if k > 0 {
                for (name, value) in rank.env.iter().filter(|var| !zero.contains(var)) {
                    args.extend(["--env".into(), format!("{k}:{name}={value}")]);
                }
            }
        }
        args
    }

    /// Every rank's CPUs: where the container runs.
    pub(super) fn all_cpus(&self) -> Vec<usize> {
        let mut cpus: Vec<usize> = self.ranks.iter().flat_map(|r| r.cpus.iter().copied()).collect();
        cpus.sort();
        cpus.dedup();
        cpus
    }

    /// The descriptors the container (`restore == false`) or the restore
    /// command gets at rank_fds' numbers: each rank's stdio (rank 0's only
    /// for the restore: the container's own is rank 0's) and its relay's
    /// end, and the write end of a new status pipe for the launcher; and
    /// what the leader keeps of that pipe. The pipe is the user's: CRIU
    /// reopens it as her.
    pub(super) fn launcher_fds(
        &self,
        uid: u32,
        relay_ends: Vec<OwnedFd>,
        restore: bool,
    ) -> Result<(Vec<(RawFd, OwnedFd)>, LauncherStatus)> {
        let (status_r, status_w) = crate::restore::user_pipe(uid)?;
        let key = fd_key(&status_r);
        let mut out = vec![(RANKS_STATUS_FD, OwnedFd::from(status_w))];
        for (k, (rank, relay)) in self.ranks.iter().zip(relay_ends).enumerate() {
            let [i, o, e, pmi] = rank_fds(k);
            if k > 0 || restore {
                for (n, fd) in [i, o, e].into_iter().zip(&rank.stdio) {
                    out.push((n, fd.try_clone().context(|| "dup".into())?));
                }
            }
            out.push((pmi, relay));
        }
        let stdio_keys = self.ranks.iter().map(|r| r.stdio.iter().map(fd_key).collect()).collect();
        Ok((out, LauncherStatus { pipe: status_r, key, stdio_keys }))
    }

    fn tell(&mut self, msg: impl Fn(usize) -> ToFollower) {
        tell_all(&mut self.followers, msg);
        self.settled = true;
    }

    pub(super) fn unprotected(&mut self, why: &str) {
        self.tell(|_| ToFollower::Unprotected(why.to_string()));
    }

    pub(super) fn stopped(&mut self) {
        self.tell(|_| ToFollower::Stopped);
    }

    pub(super) fn failed(&mut self, why: &str) {
        self.tell(|_| ToFollower::Failed(why.to_string()));
    }

    /// Tells every follower its rank's exit code (from the launcher's
    /// status pipe; `fallback`, the container's, when it said nothing) and
    /// returns rank 0's.
    pub(super) fn exited(&mut self, status: Option<File>, fallback: i32) -> i32 {
        let codes = status.and_then(|s| read_codes(s, self.ranks.len())).unwrap_or_else(|| vec![fallback; self.ranks.len()]);
        self.tell(|k| ToFollower::Exited(codes[k]));
        codes[0]
    }
}

/// The launcher's `codes C0 C1 …`, read once it has ended (the status pipe
/// is closed then, or holds nothing if it never wrote).
fn read_codes(status: File, ranks: usize) -> Option<Vec<i32>> {
    let mut line = String::new();
    let _ = nix::fcntl::fcntl(status.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK));
    let _ = status.take(4096).read_to_string(&mut line);
    let codes: Vec<i32> = line.trim().strip_prefix("codes ")?.split(' ').map(|c| c.parse().ok()).collect::<Option<_>>()?;
    (codes.len() == ranks).then_some(codes)
}

/// How a checkpoint names a descriptor of this process (a task's stdio):
/// a pipe by its inode, a file opened outside the container as CRIU names
/// an external file.
fn fd_key(fd: &impl AsRawFd) -> String {
    let me = std::process::id() as crate::procfs::Pid;
    match crate::procfs::regular_file_fd(me, fd.as_raw_fd()) {
        Ok(Some((mnt_id, ino))) => crate::checkpoint::external_file_key(mnt_id, ino),
        _ => crate::procfs::fd_target(me, fd.as_raw_fd()).unwrap_or_default(),
    }
}

/// What a follower's task sent it.
pub(super) struct FollowerTask {
    pub(super) channel: Channel,
    pub(super) stream: UnixStream,
    pub(super) stdio: [OwnedFd; 3],
    pub(super) pmi: (RawFd, OwnedFd),
    pub(super) argv: Vec<String>,
    pub(super) cwd: String,
    pub(super) env: Vec<(String, String)>,
    pub(super) runtime: Option<String>,
    pub(super) cpus: Vec<usize>,
    /// Whether root may write into its stdout and stderr (protocol::plain_output).
    pub(super) plain_output: std::result::Result<(), String>,
}

/// Follower: hands the task over to the leader, then passes on what the
/// leader says until the rank is over. Its own task's messages only mark
/// the session ending (the leader's task gets the same signals).
pub(super) fn follow(t: &Task, task: FollowerTask, session: Option<Arc<SessionFile>>, stderr: &mut File) -> Result<()> {
    let FollowerTask { mut channel, stream, stdio, pmi, argv, cwd, env, runtime, cpus, plain_output } = task;
    let mut stderr = match plain_output {
        Ok(()) => Some(stderr),
        Err(_) => None,
    };
    let leader = match reach_leader(t) {
        Ok(s) => s,
        Err(why) => {
            let msg = format!("{} runs unprotected: {why}", t.name());
            log::warn!("{msg}");
            return channel.send(&ToTask::RunUnprotected(msg));
        }
    };
    let own_check = plain_output.and_then(|()| crate::pmi::check_slurm_socket(&pmi.1, t.stepd_pid));
    let said = match own_check {
        Ok(()) => {
            let fds = [&stdio[0], &stdio[1], &stdio[2], &pmi.1].map(|f| f.as_raw_fd());
            protocol::send_fds(&leader, &fds)?;
            ToLeader::Rank { task_id: t.task_id, argv, cwd, env, runtime, cpus, pmi_at: pmi.0 }
        }
        Err(why) => {
            protocol::send_fds(&leader, &[])?;
            ToLeader::Unprotected { task_id: t.task_id, why }
        }
    };
    let mut to_leader = Channel::new(leader)?;
    to_leader.send(&said)?;
    drop((stdio, pmi));
    // The task's SIGTERM: the step is ending (the batch step waits for it).
    let ending = session.clone();
    let mut from_task = Channel::new(stream).context(|| "socket".into())?;
    std::thread::spawn(move || {
        while let Ok(Some(msg)) = from_task.recv::<protocol::ToAgent>() {
            if let (protocol::ToAgent::Terminate, Some(s)) = (msg, ending.as_ref()) {
                s.ending();
            }
        }
    });
    let to_task = match to_leader.recv::<ToFollower>() {
        Ok(Some(ToFollower::Unprotected(why))) => {
            let msg = format!("{} runs unprotected: {why}", t.name());
            log::warn!("{msg}");
            ToTask::RunUnprotected(msg)
        }
        Ok(Some(ToFollower::Exited(code))) => ToTask::Exited(code),
        Ok(Some(ToFollower::Stopped)) => ToTask::Stopped,
        Ok(Some(ToFollower::Failed(why))) => {
            stderr.iter_mut().for_each(|e| tell_user(e, &format!("{}: {why}", t.name())));
            ToTask::Exited(1)
        }
        Ok(None) | Err(_) => {
            let why = format!("{}: task 0's agent, which ran the step's ranks, is gone", t.name());
            stderr.iter_mut().for_each(|e| tell_user(e, &why));
            ToTask::Exited(1)
        }
    };
    log::info!("{}: {to_task:?}", t.name());
    channel.send(&to_task)?;
    drop(session);
    Ok(())
}

/// The leader's socket, once it is there; root's (the kernel's word).
fn reach_leader(t: &Task) -> std::result::Result<UnixStream, String> {
    let path = ckpt_config::agent_files::ranks(t.job_id, t.step_id, t.restart_count);
    let deadline = Instant::now() + GATHER_TIMEOUT;
    loop {
        match UnixStream::connect(&path) {
            Ok(s) => {
                protocol::peer_of_user(&s, 0)?;
                return Ok(s);
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("task 0 of the step, which runs all its ranks, did not answer within {GATHER_TIMEOUT:?}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(env: &[(&str, &str)], cpus: &[usize]) -> Rank {
        let (r, _w) = nix::unistd::pipe().unwrap();
        let fd = || r.try_clone().unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Rank { stdio: [fd(), fd(), fd()], pmi: (5, fd()), env, cpus: cpus.to_vec() }
    }

    #[test]
    fn each_rank_finds_its_descriptors_cpus_and_own_variables_in_the_launchers_arguments() {
        let ranks = vec![rank(&[("PMI_RANK", "0"), ("A", "x")], &[0]), rank(&[("PMI_RANK", "1"), ("A", "x"), ("B", "y")], &[1])];
        let g = Gathered { ranks, followers: vec![], settled: false };
        let args = g.launcher_args();
        let expected = "--status-fd 9 --rank 0:0,1,2,13,5 --cpus 0:0 --rank 1:14,15,16,17,5 --cpus 1:1 --env 1:PMI_RANK=1 --env 1:B=y";
        assert_eq!(args.join(" "), expected);
        assert_eq!(g.all_cpus(), [0, 1]);
        // The container's own stdio is rank 0's; the restore command gets it too.
        let ends = || vec![nix::unistd::pipe().unwrap().0, nix::unistd::pipe().unwrap().0];
        let numbers = |restore| {
            let (fds, status) = g.launcher_fds(nix::unistd::getuid().as_raw(), ends(), restore).unwrap();
            assert!(status.key.starts_with("pipe:[") && status.stdio_keys.len() == 2, "{}", status.key);
            fds.into_iter().map(|(n, _)| n).collect::<Vec<_>>()
        };
        assert_eq!(numbers(false), [9, 13, 14, 15, 16, 17]);
        assert_eq!(numbers(true), [9, 10, 11, 12, 13, 14, 15, 16, 17]);
    }

    #[test]
    fn exit_codes_come_from_the_launchers_line_for_every_rank_or_not_at_all() {
        let line = |text: &str, ranks| {
            let (r, w) = nix::unistd::pipe().unwrap();
            nix::unistd::write(&w, text.as_bytes()).unwrap();
            drop(w);
            read_codes(File::from(r), ranks)
        };
        assert_eq!(line("codes 0 3\n", 2), Some(vec![0, 3]));
        assert_eq!(line("codes 0\n", 2), None);
        assert_eq!(line("codes 0 x\n", 2), None);
        assert_eq!(line("", 2), None);
    }
}
