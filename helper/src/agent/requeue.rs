//! Checkpointing the container when the job is requeued, and restoring it
//! on the requeued run, for one task or all tasks of a step together.

use super::layout::list_checkpoint;
use super::messages::tell_user;
use super::ranks::Gathered;
use super::spawn::{spawn_for_task, task_cgroups, Running, Start, RESTORE_NET_NS_FD, RESTORE_PMI_FD, RESTORE_STATUS_FD};
use super::*;
use crate::checkpoint::{dump, CheckpointRequest};
use crate::error::{Context, EngineError, Result};
use crate::launch::{Launch, SYSTEM_PATH};
use crate::manifest::JobIds;
use crate::procfs::{self, Pid};
use crate::runtime::ContainerCommand;
use crate::step::{self, Barrier};
use crate::storage;
use crate::storage::Staging;
use crate::task_view::TaskView;
use ckpt_config::Settings;
use std::fs::File;
use std::io::{BufRead, Read};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

/// Restores the task's checkpoint through `checkpoint-container restore`
/// (so the restored tree has a parent of its own in the task's cgroups;
/// it re-creates the container from the manifest through the same policy
/// as a fresh start). Returns None, after telling the user why, when there
/// is nothing usable.
#[allow(clippy::too_many_arguments)]
pub(super) fn try_restore(
    settings_args: &[String],
    t: &Task,
    task: &procfs::PidFd,
    dir: &Path,
    argv: &[String],
    stdio: &[OwnedFd; 3],
    slurm_pmi: Option<&OwnedFd>,
    ranks: Option<&Gathered>,
    stderr: &mut File,
) -> Result<Option<Running>> {
    if let Some(from) = storage::wait_for_move(dir, MOVE_TIMEOUT) {
        log::info!("{}: waited for the checkpoint staged on {from}", t.name());
    }
    let m = match storage::open_checkpoint(dir, false) {
        Ok(m) => m,
        Err(e) => {
            let why = match e {
                EngineError::NoCheckpoint { .. } => "no checkpoint was taken when the job was requeued".into(),
                e => e.to_string(),
            };
            tell_user(stderr, &format!("{} starts fresh: {why}", t.name()));
            return Ok(None);
        }
    };
    if m.container.argv != argv {
        tell_user(stderr, &format!("{} starts fresh: its command differs from the checkpointed one", t.name()));
        return Ok(None);
    }
    let mismatch = match (&m.process.ranks, ranks) {
        (Some(r), Some(g)) if r.ranks.len() != g.ranks.len() => {
            Some(format!("its checkpoint has {} ranks, and this run's step {}", r.ranks.len(), g.ranks.len()))
        }
        (Some(_), None) => Some("its checkpoint is of a step's ranks in one container, and this run's step is not".into()),
        (None, Some(_)) => Some("its checkpoint is not of the step's ranks in one container".into()),
        _ => None,
    };
    if let Some(why) = mismatch {
        tell_user(stderr, &format!("{} starts fresh: {why}", t.name()));
        return Ok(None);
    }
    // The restored program talks to this run's slurmstepd through a new
    // relay per rank, which lets it through only once it is restored
    // (`serve` has checked each socket is slurmstepd's). Every rank in one
    // container gets one, even a rank that held none (it had ended).
    let wanted: Vec<(Option<crate::manifest::SlurmPmi>, &OwnedFd)> = match (&m.process.ranks, ranks) {
        (Some(r), Some(g)) => r.ranks.iter().zip(&g.ranks).map(|(r, g)| (r.slurm_pmi, &g.pmi.1)).collect(),
        _ => match (&m.process.slurm_pmi, slurm_pmi) {
            (None, _) => vec![],
            (Some(_), None) => {
                let why = "its program held Slurm's PMI socket, and this run gives the task none (not `srun --mpi=pmi2` this time?)";
                tell_user(stderr, &format!("{} starts fresh: {why}", t.name()));
                return Ok(None);
            }
            (Some(p), Some(fd)) => vec![(Some(*p), fd)],
        },
    };
    // Made in the namespace the restore then makes the container in.
    let net_ns = match wanted.is_empty() {
        true => None,
        false => crate::namespaces::net_ns_for(m.container.network).context(|| "network namespace".into())?,
    };
    let mut relays = Vec::new();
    for (recorded, fd) in &wanted {
        let said = recorded.and_then(|p| p.init_version).map(|[version, subversion]| crate::pmi::Version { version, subversion });
        relays.push(crate::pmi::Relay::new(fd, said, net_ns.as_ref()).context(|| "PMI relay".into())?);
    }
    let (status_r, status_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context(|| "pipe".into())?;
    let helper = std::env::current_exe().context(|| "own path".into())?.to_string_lossy().into_owned();
    let mut restore_argv = vec![helper];
    restore_argv.extend_from_slice(settings_args);
    restore_argv.extend(["restore", "--images"].map(String::from));
    restore_argv.push(dir.to_string_lossy().into_owned());
    restore_argv.extend(["--uid".into(), t.uid.to_string(), "--job-id".into(), t.job_id.to_string()]);
    restore_argv.extend(["--status-fd".into(), RESTORE_STATUS_FD.to_string()]);
    let cgroups = task_cgroups(t, task)?;
    let mut fds = Vec::new();
    let ends = crate::pmi::Relay::container_ends(&relays).context(|| "dup".into())?;
    let launcher_status = match ranks {
        Some(g) => {
            restore_argv.extend(["--ranks".into(), g.ranks.len().to_string()]);
            let (given, status) = g.launcher_fds(t.uid, ends, true)?;
            fds.extend(given);
            Some(status)
        }
        None => {
            if let Some(end) = ends.into_iter().next() {
                restore_argv.extend(["--pmi-fd".into(), RESTORE_PMI_FD.to_string()]);
                fds.push((RESTORE_PMI_FD, end));
            }
            None
        }
    };
    if let Some(n) = &net_ns {
        restore_argv.extend(["--net-ns-fd".into(), RESTORE_NET_NS_FD.to_string()]);
        fds.push((RESTORE_NET_NS_FD, OwnedFd::from(n.try_clone().context(|| "dup".into())?)));
    }
    let how = Start::Restore { status_fd: status_w, fds };
    let child = spawn_for_task(&restore_argv, stdio, cgroups, &[("PATH".into(), SYSTEM_PATH.into())], &how)?;
    drop(how);
    // "restored PID LINE": the program's pid on the node, and the line for
    // the user (told once its step goes on).
    let mut line = String::new();
    let _ = std::io::BufReader::new(File::from(status_r).take(4096)).read_line(&mut line);
    if let Some(rest) = line.trim().strip_prefix("restored ") {
        let (pid, said) = rest.split_once(' ').unwrap_or((rest, ""));
        // The restore names the program by its node pid once it found it;
        // else it is the process below with the dumped pid in its own
        // namespace (never the placeholder, also the user's and contained).
        let pid = pid.parse::<Pid>().ok().filter(|&p| p > 0).or_else(|| {
            (0..100).find_map(|_| {
                let found = procfs::find_ns_pid(child.id() as Pid, m.process.root_pid);
                if found.is_none() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                found
            })
        });
        // CRIU leaves the restored program its own CPU affinity; this
        // run's task is bound where this run's allocation is.
        // A step's ranks in one container: on every rank's task's CPUs
        // (which rank is which process is the user's program's to know).
        let on_step_cpus = |v: TaskView| match ranks.map(Gathered::all_cpus) {
            Some(cpus) if !cpus.is_empty() => v.on_cpus(&cpus),
            _ => v,
        };
        match TaskView::read(task).map(on_step_cpus).and_then(|v| v.bind_restored(child.id() as Pid, t.uid)) {
            Ok(n) => log::info!("{}: {n} restored processes bound to the task's CPUs", t.name()),
            Err(e) => log::warn!("{}: restored processes keep CRIU's CPU affinity: {e}", t.name()),
        }
        let mut running = Running::new(child, pid, t.uid)?;
        running.restored = Some(said.to_string()).filter(|s| !s.is_empty());
        running.launcher_status = launcher_status;
        for (k, relay) in relays.into_iter().enumerate() {
            match relay.go(true) {
                Ok(flowing) => running.slurm_pmi.push(flowing),
                // One relay per rank, in order, or the next checkpoint
                // would record one rank's socket as another's.
                Err(e) if ranks.is_some() => {
                    running.kill(t.uid);
                    let _ = running.child.wait();
                    tell_user(stderr, &format!("{} starts fresh: Slurm's PMI does not take rank {k} back ({e})", t.name()));
                    return Ok(None);
                }
                Err(e) => tell_user(
                    stderr,
                    &format!("warning: {}: Slurm's PMI does not take it back ({e}): its next MPI call to Slurm fails", t.name()),
                ),
            }
        }
        return Ok(Some(running));
    }
    // The restore command has told the user why; start fresh.
    let mut child = child;
    let _ = child.wait();
    tell_user(stderr, &format!("{} starts fresh after the failed restore", t.name()));
    Ok(None)
}

/// What the user asked for and how root started it: the manifest records
/// the request (a restore re-checks it), the checkpoint reads the image
/// through the launch's staged path.
pub(super) struct StartedAs<'a> {
    pub(super) argv: &'a [String],
    pub(super) cwd: &'a str,
    pub(super) env: &'a [(String, String)],
    pub(super) launch: &'a Launch,
}

/// What to dump of the task's container: its payload's tree, recorded
/// with this run's cut (the job's restart count).
pub(super) fn checkpoint_request(
    t: &Task,
    running: &mut Running,
    started: &StartedAs,
    ckpt: &Path,
    leave_running: bool,
) -> std::result::Result<CheckpointRequest, String> {
    let Some(pid) = running.payload(t.uid).map(|p| p.pid) else {
        return Err(format!("{}: no running container to checkpoint", t.name()));
    };
    Ok(CheckpointRequest {
        pid,
        target: ckpt.to_path_buf(),
        container: ContainerCommand::parse(started.argv.to_vec()).map_err(|e| e.to_string())?,
        image: started.launch.image.clone(),
        image_name: started.launch.image_name.clone(),
        job: JobIds {
            job_id: Some(t.job_id),
            step_id: Some(t.step_id),
            task_id: Some(t.task_id),
            step_tasks: Some(t.step_tasks),
            cut: Some(t.restart_count),
        },
        expected_uid: Some(t.uid),
        leave_running,
        started_in: Some((started.cwd.to_string(), started.env.to_vec())),
        slurm_pmi: running.slurm_pmi.clone(),
        ranks: running.launcher_status.as_ref().map(|l| (l.key.clone(), l.stdio_keys.clone())),
    })
}

/// Checkpoints the task's container; returns the line for the user, and a
/// staged checkpoint still to be moved into place (announced to restores)
/// with its manifest.
pub(super) fn checkpoint_for_requeue(
    settings: &Settings,
    t: &Task,
    running: &mut Running,
    started: &StartedAs,
    ckpt: &Path,
) -> (String, Option<(Staging, crate::manifest::Manifest)>) {
    let request = match checkpoint_request(t, running, started, ckpt, false) {
        Ok(r) => r,
        Err(why) => return (why, None),
    };
    let sealed = dump(settings, &request).and_then(|(m, sealed)| {
        if !sealed.staged() {
            sealed.commit()?;
            list_checkpoint(settings, t, &m, "complete");
            return Ok((m, None));
        }
        sealed.announce_move()?;
        list_checkpoint(settings, t, &m, "moving");
        Ok((m, Some(sealed)))
    });
    match sealed {
        Ok((m, to_move)) => (
            format!(
                "checkpointed {} ({:.1} MiB in {:.2} s); it resumes from here when the job runs again",
                t.name(),
                m.stats.images_bytes as f64 / 1048576.0,
                m.stats.dump_seconds
            ),
            to_move.map(|staged| (staged, m)),
        ),
        Err(e) => {
            running.kill(t.uid);
            let from = if e.kept_checkpoint().is_some() { "from its previous checkpoint" } else { "from the start" };
            (format!("checkpoint of {} failed: {e}; it will run again {from}", t.name()), None)
        }
    }
}

/// Stops this task's container, so that what the checkpoint lists of it
/// (processes, files, node-local state) holds still until CRIU has it; for
/// a step of several tasks, then waits until every task of the step has
/// stopped its own (step.rs), so that all are dumped at one cut. The
/// restored processes are stopped in turn until [`go_on`].
pub(super) fn stop_step(settings: &Settings, t: &Task, running: &mut Running) -> std::result::Result<(), String> {
    let mine = match running.payload(t.uid).map(|p| p.pid) {
        Some(pid) => step::stop_tree(pid, t.uid, step::STOP_BARRIER_TIMEOUT).map(|_| ()).map_err(|e| format!("could not be stopped: {e}")),
        None => Err("has no running container".into()),
    };
    if !t.cut_across_agents() {
        return mine;
    }
    let barrier = Barrier::new(&job_dir(settings, t.job_id).map_err(|e| e.to_string())?, t.step(), &format!("stop-{}", t.restart_count))
        .map_err(|e| e.to_string())?;
    barrier.meet(mine, step::STOP_BARRIER_TIMEOUT)
}

/// Lets a restored container go on: it was dumped stopped.
pub(super) fn go_on(t: &Task, running: &mut Running) {
    if let Some(root) = running.payload(t.uid).map(|p| p.pid) {
        step::continue_tree(root, t.uid);
    }
}

/// How long a restored tree is watched for a stop that comes after it was
/// let go.
const RESTORED_STOP_WATCH: Duration = Duration::from_secs(2);

/// Lets a restored tree go on. It was dumped stopped, and CRIU stops such
/// a task again as it lets go of it, which can come after the pid file
/// and the end of its tracing, so after this SIGCONT (measured: a restored
/// AutoDock Vina left stopped, its job hanging): the root is continued
/// again whenever it shows stopped within [`RESTORED_STOP_WATCH`].
pub(super) fn go_on_restored(t: &Task, running: &mut Running) {
    let Some(root) = running.payload(t.uid).map(|p| p.pid) else { return };
    let started = std::time::Instant::now();
    step::continue_tree(root, t.uid);
    while started.elapsed() < RESTORED_STOP_WATCH {
        std::thread::sleep(Duration::from_millis(20));
        if procfs::is_stopped(root) {
            log::info!("{}: the restored program was stopped again; continued", t.name());
            step::continue_tree(root, t.uid);
        }
    }
}

/// Whether every task of the step has a complete checkpoint of one cut.
pub(super) fn step_checkpoints_agree(settings: &Settings, t: &Task) -> std::result::Result<(), String> {
    let job = job_dir(settings, t.job_id).map_err(|e| e.to_string())?;
    let mut cut = None;
    for task in 0..t.step_tasks {
        let dir = job.join(checkpoint_name(t.step_id, task, None));
        let _ = storage::wait_for_move(&dir, MOVE_TIMEOUT);
        let m = storage::open_checkpoint(&dir, false).map_err(|_| format!("finds no complete checkpoint of task {task}"))?;
        if m.job.step_tasks != Some(t.step_tasks) {
            return Err(format!("finds the checkpoint of task {task} taken with another number of tasks"));
        }
        match cut {
            None => cut = Some(m.job.cut),
            Some(c) if c != m.job.cut => return Err(format!("finds the checkpoint of task {task} taken at another time than task 0's")),
            Some(_) => {}
        }
    }
    Ok(())
}

/// Restores a task of a step of several tasks: only if every task has a
/// checkpoint of one cut, and then all together or none (step.rs). The
/// restored processes are stopped (they were dumped stopped) until every
/// task is restored.
#[allow(clippy::too_many_arguments)]
pub(super) fn restore_step(
    settings: &Settings,
    settings_args: &[String],
    t: &Task,
    task: &procfs::PidFd,
    ckpt: &Path,
    argv: &[String],
    stdio: &[OwnedFd; 3],
    stderr: &mut File,
) -> Result<Option<Running>> {
    let barrier = Barrier::new(&job_dir(settings, t.job_id)?, t.step(), &format!("restore-{}", t.restart_count))?;
    let checked = step_checkpoints_agree(settings, t);
    let mut restored = None;
    let mine = match checked {
        Ok(()) => match try_restore(settings_args, t, task, ckpt, argv, stdio, None, None, stderr)? {
            Some(r) => {
                restored = Some(r);
                Ok(())
            }
            None => Err("could not be restored".into()),
        },
        Err(why) => Err(why),
    };
    match barrier.meet(mine, step::RESTORE_BARRIER_TIMEOUT) {
        Ok(()) => {
            let mut running = restored.expect("a step goes on only when every task was restored");
            go_on_restored(t, &mut running);
            Ok(Some(running))
        }
        Err(why) => {
            if let Some(mut running) = restored {
                running.kill(t.uid);
                let _ = running.child.wait();
            }
            if t.task_id == 0 {
                tell_user(stderr, &format!("step {}.{} starts fresh: {why}", t.job_id, t.step_id));
            }
            Ok(None)
        }
    }
}
