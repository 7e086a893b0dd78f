//! `checkpoint-container-ranks`: the first process of the user's program in
//! a protected `srun --mpi=pmi2 -n N` step's one container (run by
//! Apptainer, as the user, from a read-only bind of the root-owned file).
//! It starts every rank of the step on this node as a child of its own, so
//! that the ranks, which share memory and connections, are one process tree
//! that CRIU dumps at one cut; then it waits for them, passes on the signals
//! it gets, and reports their exit codes.
//!
//! Each rank gets what its own Slurm task had, handed over by the agents:
//! its stdio, its (relayed) PMI socket at the number its `PMI_FD` names, its
//! CPUs, and the variables in which its environment differs from rank 0's
//! (`PMI_RANK`, `SLURM_PROCID`, …). It holds no privilege: it runs as the
//! user, and everything it does the user could do herself.
//!
//! `checkpoint-container-ranks --status-fd N (--rank K:IN,OUT,ERR[,PMI,PMI_AT])...
//!   [--cpus K:C,C...]... [--env K:NAME=VALUE]... -- COMMAND [ARGS...]`
//!
//! When every rank has ended it writes `codes C0 C1 ...` (each rank's exit
//! code, 128 + the signal for one a signal ended) to the status fd, and
//! exits with rank 0's code. The codes live in this process's memory, so a
//! checkpoint and restore carries them (the agent gives the restored
//! process a new status pipe).

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

/// Signals passed on to every rank (as Slurm would have signalled each
/// task); SIGKILL cannot be caught and ends the container as a whole.
const FORWARDED: &[libc::c_int] =
    &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGALRM, libc::SIGWINCH, libc::SIGCONT];

#[derive(Default, Debug, PartialEq)]
struct Rank {
    /// None until `--rank` names them.
    stdio: Option<[RawFd; 3]>,
    /// The PMI socket, and the number the rank's `PMI_FD` names.
    pmi: Option<(RawFd, RawFd)>,
    cpus: Vec<usize>,
    env: Vec<(String, String)>,
}

#[derive(Debug, PartialEq)]
struct Plan {
    status_fd: RawFd,
    ranks: Vec<Rank>,
    command: Vec<String>,
}

fn numbers<T: std::str::FromStr>(list: &str) -> Result<Vec<T>, String> {
    list.split(',').map(|n| n.parse::<T>().map_err(|_| format!("not a number: {n:?}"))).collect()
}

fn parse(args: &[String]) -> Result<Plan, String> {
    let mut status_fd = None;
    let mut ranks: HashMap<usize, Rank> = HashMap::new();
    let mut it = args.iter();
    let command: Vec<String> = loop {
        let Some(flag) = it.next() else { return Err("no -- COMMAND".into()) };
        if flag == "--" {
            break it.cloned().collect();
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        if flag == "--status-fd" {
            status_fd = Some(value.parse::<RawFd>().map_err(|_| format!("--status-fd {value:?}"))?);
            continue;
        }
        let (k, rest) = value.split_once(':').ok_or_else(|| format!("{flag} {value:?}: no RANK:"))?;
        let k: usize = k.parse().map_err(|_| format!("{flag} {value:?}: rank"))?;
        let rank = ranks.entry(k).or_default();
        match flag.as_str() {
            "--rank" => {
                let fds = numbers::<RawFd>(rest)?;
                match fds[..] {
                    [i, o, e] => rank.stdio = Some([i, o, e]),
                    [i, o, e, p, at] => (rank.stdio, rank.pmi) = (Some([i, o, e]), Some((p, at))),
                    _ => return Err(format!("--rank {value:?}: IN,OUT,ERR[,PMI,PMI_AT]")),
                }
            }
            "--cpus" => rank.cpus = numbers(rest)?,
            "--env" => {
                let (name, v) = rest.split_once('=').ok_or_else(|| format!("--env {value:?}: NAME=VALUE"))?;
                rank.env.push((name.to_string(), v.to_string()));
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    };
    let status_fd = status_fd.ok_or("no --status-fd")?;
    let count = ranks.len();
    let ranks: Vec<Rank> = (0..count).map(|k| ranks.remove(&k).ok_or(format!("rank {k} is missing"))).collect::<Result<_, _>>()?;
    if let Some(k) = ranks.iter().position(|r| r.stdio.is_none()) {
        return Err(format!("rank {k} has no --rank"));
    }
    if ranks.is_empty() || command.is_empty() {
        return Err("nothing to start".into());
    }
    Ok(Plan { status_fd, ranks, command })
}

/// The rank's variables that the container's environment has (a variable
/// Apptainer did not pass on, `--cleanenv`, stays out for every rank).
fn rank_env(rank: &Rank) -> impl Iterator<Item = &(String, String)> {
    rank.env.iter().filter(|(name, _)| std::env::var_os(name).is_some())
}

fn start(plan: &Plan, rank: &Rank, stdio: [RawFd; 3]) -> std::io::Result<u32> {
    // Each stdio fd becomes the child's own (dup'd: one fd may serve two).
    let fd = |n: RawFd| -> std::io::Result<Stdio> {
        // SAFETY: n is an fd handed to this process and open (checked by
        // dup failing otherwise); the copy is ours to own.
        let copy = unsafe { libc::fcntl(n, libc::F_DUPFD_CLOEXEC, 3) };
        if copy < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `copy` was just made and belongs to nobody else.
        Ok(Stdio::from(unsafe { OwnedFd::from_raw_fd(copy) }))
    };
    let mut cmd = Command::new(&plan.command[0]);
    cmd.args(&plan.command[1..]).stdin(fd(stdio[0])?).stdout(fd(stdio[1])?).stderr(fd(stdio[2])?);
    cmd.envs(rank_env(rank).cloned());
    let pmi = rank.pmi;
    let mut cpus: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in rank.cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
        // SAFETY: CPU_SET indexes the set without a check: below CPU_SETSIZE only.
        unsafe { libc::CPU_SET(c, &mut cpus) };
    }
    let bind = !rank.cpus.is_empty();
    // SAFETY: between fork and exec only dup2 and sched_setaffinity,
    // which are async-signal-safe and allocate nothing.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((from, at)) = pmi {
                if from != at && libc::dup2(from, at) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if from == at {
                    let flags = libc::fcntl(at, libc::F_GETFD);
                    libc::fcntl(at, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                }
            }
            if bind && libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &cpus) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().map(|c| c.id())
}

fn run(plan: &Plan) -> i32 {
    // SAFETY: plain system calls on this process's own state.
    unsafe {
        // Orphans of the ranks stay in this tree (and in the checkpoint).
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        // No rank inherits another's descriptors: each gets its own at exec.
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
    }
    let mut waited: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigset operations on a local set, then this thread's mask
    // (the only thread); std resets the mask in each child.
    unsafe {
        libc::sigemptyset(&mut waited);
        libc::sigaddset(&mut waited, libc::SIGCHLD);
        for &s in FORWARDED {
            libc::sigaddset(&mut waited, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &waited, std::ptr::null_mut());
    }
    let mut codes: Vec<Option<i32>> = vec![None; plan.ranks.len()];
    let mut pids: Vec<Option<libc::pid_t>> = vec![None; plan.ranks.len()];
    for (k, rank) in plan.ranks.iter().enumerate() {
        let stdio = rank.stdio.expect("parse checked every rank's stdio");
        match start(plan, rank, stdio) {
            Ok(pid) => pids[k] = Some(pid as libc::pid_t),
            Err(e) => {
                let line = format!("checkpoint-container-ranks: rank {k}: cannot start {}: {e}\n", plan.command[0]);
                // SAFETY: a write to the rank's stderr, which is open.
                unsafe { libc::write(stdio[2], line.as_ptr().cast(), line.len()) };
                codes[k] = Some(127);
            }
        }
    }
    // The ranks hold their descriptors now; this process keeps only stdio
    // and the status fd.
    for rank in &plan.ranks {
        let fds = rank.stdio.iter().flatten().chain(rank.pmi.iter().map(|(p, _)| p));
        for &fd in fds.filter(|&&fd| fd > 2 && fd != plan.status_fd) {
            // SAFETY: closing a descriptor this process owns and no longer uses.
            unsafe { libc::close(fd) };
        }
    }
    while codes.iter().any(Option::is_none) {
        let mut sig = 0;
        // SAFETY: waits for one of the blocked signals.
        if unsafe { libc::sigwait(&waited, &mut sig) } != 0 {
            continue;
        }
        if sig != libc::SIGCHLD {
            for pid in pids.iter().zip(&codes).filter(|(_, c)| c.is_none()).filter_map(|(p, _)| *p) {
                // SAFETY: a signal to a rank, this process's child.
                unsafe { libc::kill(pid, sig) };
            }
            continue;
        }
        loop {
            let mut status = 0;
            // SAFETY: reaps any ended child (orphans of the ranks too).
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if let Some(k) = pids.iter().position(|&p| p == Some(pid)) {
                codes[k] = Some(if libc::WIFSIGNALED(status) { 128 + libc::WTERMSIG(status) } else { libc::WEXITSTATUS(status) });
            }
        }
    }
    let codes: Vec<i32> = codes.into_iter().map(|c| c.unwrap_or(1)).collect();
    let line = format!("codes {}\n", codes.iter().map(i32::to_string).collect::<Vec<_>>().join(" "));
    // SAFETY: the status fd is this process's, handed over for this line.
    let mut status = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(plan.status_fd) });
    let _ = status.write_all(line.as_bytes());
    codes[0]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse(&args) {
        Ok(plan) => std::process::exit(run(&plan)),
        Err(e) => {
            eprintln!("checkpoint-container-ranks: {e}");
            std::process::exit(127);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn every_rank_gets_its_own_descriptors_cpus_and_variables() {
        let plan = parse(&args("--status-fd 9 --rank 0:0,1,2,13,5 --rank 1:10,11,12,17,5 --cpus 1:2,3 --env 1:PMI_RANK=1 -- nwchem x.nw"))
            .unwrap();
        assert_eq!(plan.status_fd, 9);
        assert_eq!(plan.ranks[0], Rank { stdio: Some([0, 1, 2]), pmi: Some((13, 5)), ..Default::default() });
        assert_eq!(plan.ranks[1].stdio, Some([10, 11, 12]));
        assert_eq!(plan.ranks[1].cpus, [2, 3]);
        assert_eq!(plan.ranks[1].env, [("PMI_RANK".to_string(), "1".to_string())]);
        assert_eq!(plan.command, ["nwchem", "x.nw"]);
    }

    #[test]
    fn a_missing_rank_or_command_is_an_error() {
        assert!(parse(&args("--status-fd 9 --rank 1:10,11,12 -- x")).is_err());
        assert!(parse(&args("--status-fd 9 --rank 0:0,1,2 --")).is_err());
        assert!(parse(&args("--rank 0:0,1,2 -- x")).is_err());
    }
}
