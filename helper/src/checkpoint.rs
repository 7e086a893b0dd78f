//! Dumping a running container's process tree.

use crate::criu::{self, Invocation, CRIU_CAPS};
use crate::error::{fail, Context, EngineError, Result};
use crate::manifest::{self, JobIds, Manifest, Owner};
use crate::procfs::{self, Pid};
use crate::runtime::ContainerCommand;
use crate::storage::{self, Staging, DUMP_LOG};
use crate::streamer::{Capture, Summing};
use ckpt_config::{ContainerNetwork, Settings};
use std::fs::File;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub struct CheckpointRequest {
    /// Root of the tree to dump: the user's program inside the container.
    pub pid: Pid,
    /// Where the committed checkpoint goes (replaced atomically).
    pub target: PathBuf,
    /// The command that started the container (as the user gave it).
    pub container: ContainerCommand,
    /// The container image as root may read it: a path only root can
    /// change (the agent's staged bind of what the user opened).
    pub image: PathBuf,
    /// The image's path as recorded in the manifest.
    pub image_name: String,
    pub job: JobIds,
    /// Refuse unless the process belongs to this uid (the plugin passes the
    /// job's user).
    pub expected_uid: Option<u32>,
    /// Keep the container running after the dump (default: CRIU ends it).
    pub leave_running: bool,
    /// How Apptainer was started (cwd, environment); read from the
    /// container's runtime parent when not given.
    pub started_in: Option<(String, Vec<(String, String)>)>,
    /// The container's ends of Slurm's PMI-2 relays: one for a task's
    /// container that has one, one per rank (in order) for `ranks`.
    pub slurm_pmi: Vec<crate::pmi::Flowing>,
    /// The tree is the ranks launcher of a step (agent/ranks.rs): its
    /// status pipe and each rank's stdio, keyed as `manifest::Process::stdio`.
    pub ranks: Option<(String, Vec<Vec<String>>)>,
}

/// Working directory and environment of the process that started
/// the container (Apptainer's runtime parent, the program's parent).
fn started_in(pid: Pid) -> Result<(String, Vec<(String, String)>)> {
    let status = std::fs::read_to_string(procfs::proc_path(pid, "status")).context(|| format!("process {pid}"))?;
    let ppid: Pid = status.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    let cwd = std::fs::read_link(procfs::proc_path(ppid, "cwd")).context(|| format!("working directory of process {ppid}"))?;
    let environ = std::fs::read(procfs::proc_path(ppid, "environ")).context(|| format!("environment of process {ppid}"))?;
    let env: Vec<(String, String)> = environ
        .split(|&b| b == 0)
        .filter_map(|kv| String::from_utf8_lossy(kv).split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    Ok((cwd.to_string_lossy().into_owned(), env))
}

/// Why Apptainer's default (non-setuid) mode cannot be dumped: documented in
/// docs/checkpoint-engine.md, shown whenever it is met.
pub const USERNS_REFUSAL: &str = "runs in an unprivileged user namespace (Apptainer without setuid or root): \
CRIU cannot dump it because no uid 0 is mapped in that namespace (CRIU issues #562, #2315); \
start the container root-started for the user, as --checkpoint-container jobs do";

/// The checks that need no CRIU run: who owns the process and whether it is
/// a container this engine can dump.
pub fn check_target(pid: Pid, expected_uid: Option<u32>) -> Result<(u32, u32)> {
    let (uid, gid) = procfs::ids(pid).context(|| format!("process {pid} is not running"))?;
    if let Some(expected) = expected_uid {
        if uid != expected {
            return fail(format!("process {pid} belongs to uid {uid}, not to uid {expected}: refusing to dump it"));
        }
    }
    if uid == 0 {
        return fail(format!("process {pid} runs as root: only users' containers are checkpointed"));
    }
    let me = std::process::id() as Pid;
    if procfs::ns_inode(pid, "user").context(|| format!("process {pid}"))?
        != procfs::ns_inode(me, "user").context(|| "own namespaces".into())?
    {
        return fail(format!("process {pid} {USERNS_REFUSAL}"));
    }
    if procfs::ns_inode(pid, "mnt").context(|| format!("process {pid}"))?
        == procfs::ns_inode(me, "mnt").context(|| "own namespaces".into())?
    {
        return fail(format!("process {pid} is not in a container: it shares this node's mount namespace"));
    }
    Ok((uid, gid))
}

/// How CRIU names a file opened on a mount outside the dumped mount
/// namespace (`--external`, `--inherit-fd`).
pub fn external_file_key(mnt_id: u64, ino: u64) -> String {
    format!("file[{mnt_id:x}:{ino:x}]")
}

/// Files the tree has open on mounts outside the container, keyed the way
/// CRIU names external files (`file[MNT_ID:INODE]`, hex). Slurm opens a batch
/// job's output file before the container exists, so its stdout is one.
/// Only stdio may be such a file: restore hands the restored program new
/// stdio, and anything else could not be reopened.
fn external_files(root: Pid, pids: &[Pid]) -> Result<Vec<(Pid, i32, String)>> {
    let visible = procfs::mount_ids(root).context(|| format!("cannot read the mounts of process {root}"))?;
    let mut out = Vec::new();
    for &pid in pids {
        for fd in procfs::fds(pid).context(|| format!("cannot list the files of process {pid}"))? {
            let Ok(Some((mnt_id, ino))) = procfs::regular_file_fd(pid, fd) else { continue };
            if visible.contains(&mnt_id) {
                continue;
            }
            let target = procfs::fd_target(pid, fd).unwrap_or_default();
            if fd > 2 {
                return fail(format!(
                    "process {pid} has {target} open (fd {fd}) from outside its container: only stdin, stdout and stderr may come from outside"
                ));
            }
            out.push((pid, fd, external_file_key(mnt_id, ino)));
        }
    }
    Ok(out)
}

/// The tree's end of Slurm's PMI relay, if a process of the (frozen) tree
/// holds it: CRIU dumps it as external, and the restore gives the next
/// run's relay in its place. A PMI exchange under way cannot be carried
/// over (the restored program would wait for an answer that never comes).
/// Also what had crossed the relay then, to tell once CRIU is done that
/// nothing crossed meanwhile.
/// A relay's end as the tree holds it, and what had crossed it then.
type HeldPmi = (manifest::SlurmPmi, (u64, u64));

/// One entry per relay of `req.slurm_pmi`, None for one the tree no longer
/// holds (a rank that ended).
fn slurm_pmi(req: &CheckpointRequest, pids: &[Pid]) -> Result<Vec<Option<HeldPmi>>> {
    let held: Vec<String> = pids
        .iter()
        .flat_map(|&pid| procfs::fds(pid).unwrap_or_default().into_iter().map(move |fd| (pid, fd)))
        .filter_map(|(pid, fd)| procfs::fd_target(pid, fd).ok())
        .collect();
    let mut out = Vec::new();
    for relay in &req.slurm_pmi {
        if !held.contains(&format!("socket:[{}]", relay.inode)) {
            out.push(None);
            continue;
        }
        let not_now = |why: String| EngineError::Failed(format!("the program {why}: its restore would wait for Slurm forever"));
        let crossed = relay.quiet().map_err(not_now)?;
        let said = relay.said_init().map_err(not_now)?;
        out.push(Some((manifest::SlurmPmi { inode: relay.inode, init_version: said.map(|v| [v.version, v.subversion]) }, crossed)));
    }
    Ok(out)
}

/// SysV shared memory lives in the node's IPC namespace, which CRIU could
/// dump only with `CAP_SYS_ADMIN`: refused in one line that says so, where
/// CRIU would say `doesn't live in IPC ns`.
fn refuse_sysv_shm(pids: &[Pid]) -> Result<()> {
    for &pid in pids {
        let maps = std::fs::read_to_string(procfs::proc_path(pid, "maps")).context(|| format!("memory map of process {pid}"))?;
        if maps.lines().any(|l| l.split_whitespace().nth(5).is_some_and(|path| path.starts_with("/SYSV"))) {
            return fail(format!(
                "process {pid} has SysV shared memory attached (shmget), which lives in the node's IPC namespace and cannot be \
                 checkpointed (for UCX, MPICH's transport, keep sysv out of UCX_TLS)"
            ));
        }
    }
    Ok(())
}

/// Whether the container has a network namespace of its own (made by its
/// init) or uses the node's.
fn container_network(pid: Pid) -> Result<ContainerNetwork> {
    let me = std::process::id() as Pid;
    let theirs = procfs::ns_inode(pid, "net").context(|| format!("process {pid}"))?;
    Ok(if theirs == procfs::ns_inode(me, "net").context(|| "own namespaces".into())? {
        ContainerNetwork::Node
    } else {
        ContainerNetwork::Isolated
    })
}

/// In the node's network namespace a TCP connection cannot be checkpointed
/// (repairing it would take `CAP_NET_ADMIN` over the node's network, and
/// its peer is outside the tree): refused with the peer named, before CRIU
/// would fail without naming it.
fn refuse_tcp_connections(pids: &[Pid]) -> Result<()> {
    let connections = procfs::tcp_connections(pids).context(|| "cannot read the TCP sockets of the container".into())?;
    match connections.first() {
        None => Ok(()),
        Some(c) => fail(format!(
            "process {} has a TCP connection to {} open (fd {}): the container uses the node's network (container_network = node), \
             where connections cannot be checkpointed",
            c.pid, c.peer, c.fd
        )),
    }
}

/// How long CRIU may take to dump: past it, it is killed and the
/// checkpoint fails like any other (the job goes on under the usual rules).
pub const DUMP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Waits for CRIU, killing it after `timeout`; its stderr is collected.
fn wait_with_timeout(mut child: std::process::Child, timeout: std::time::Duration) -> Result<std::process::Output> {
    use std::io::Read;
    let mut stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.take(1 << 20).read_to_end(&mut buf);
        }
        buf
    });
    let status = procfs::wait_or_kill(&mut child, timeout).context(|| "waiting for CRIU".into())?;
    let stderr = reader.join().unwrap_or_default();
    let Some(status) = status else {
        return fail(format!("CRIU did not finish within {} s and was stopped", timeout.as_secs()));
    };
    Ok(std::process::Output { status, stdout: Vec::new(), stderr })
}

/// Dumps and commits: the checkpoint is in place when this returns.
pub fn checkpoint(settings: &Settings, req: &CheckpointRequest) -> Result<Manifest> {
    let (manifest, sealed) = dump(settings, req)?;
    sealed.commit()?;
    Ok(manifest)
}

/// Dumps into a sealed checkpoint not yet in place: the caller commits it
/// (a staged one may be moved after the job has let go of the node). A
/// failure is `NotTaken`, naming the earlier checkpoint at the target: the
/// dump writes only into its staging directory, so that one is untouched.
pub fn dump(settings: &Settings, req: &CheckpointRequest) -> Result<(Manifest, Staging)> {
    dump_frozen(settings, req, || Ok(())).map(|(m, staging, _)| (m, staging))
}

/// `dump`, calling `freeze` (which stops the tree) once what does not depend
/// on the tree's state is ready, and before anything that does: a tree kept
/// running meanwhile is stopped no longer than its dump needs. Also says
/// how long after `freeze` was called the tree was continued (or ended).
pub fn dump_frozen(
    settings: &Settings,
    req: &CheckpointRequest,
    freeze: impl FnOnce() -> Result<()>,
) -> Result<(Manifest, Staging, Duration)> {
    dump_staged(settings, req, freeze).map_err(|cause| storage::not_taken(&req.target, cause))
}

fn dump_staged(settings: &Settings, req: &CheckpointRequest, freeze: impl FnOnce() -> Result<()>) -> Result<(Manifest, Staging, Duration)> {
    let entered = Instant::now();
    let phase = |what: &str| log::debug!("{what} at {:.3} s", entered.elapsed().as_secs_f64());
    let version = criu::check(&settings.criu)?;
    let (uid, gid) = check_target(req.pid, req.expected_uid)?;
    // Held from here: while it answers, `req.pid` is this process, so the
    // namespaces opened by that pid below are its own (a pid freed and
    // reused by anyone else's container fails the re-check).
    let held = procfs::PidFd::of_user(req.pid, uid).ok_or_else(|| EngineError::Failed(format!("process {} has ended", req.pid)))?;
    let pid_ns = procfs::ns_inode(req.pid, "pid").context(|| format!("process {}", req.pid))?;
    let image = req.image.as_path();
    let image_stamp = storage::stamp(image)?;
    let root_pid = procfs::ns_pid(req.pid).context(|| format!("process {}", req.pid))?;
    let network = container_network(req.pid)?;
    let (cwd, env) = match &req.started_in {
        Some(x) => x.clone(),
        None => started_in(req.pid)?,
    };
    // Only to size the staging: the tree's memory now is close enough.
    let expected_bytes = procfs::memory_bytes(&procfs::tree(req.pid).context(|| format!("process {}", req.pid))?);
    let (staging, fallback) = Staging::create(&req.target, uid, gid, settings.staging_dir.as_deref(), expected_bytes)?;
    if let Some(why) = fallback {
        log::warn!("{why}");
    }
    let criu_dir = File::open(&staging.work).context(|| format!("cannot open {}", staging.work.display()))?;
    let listener = Capture::bind(&staging.work, uid, gid)?;
    // The checkpoint this one replaces is not needed in memory any more: its
    // pages leave the cache before the new ones arrive. A tree left running
    // is stopped only after (freeing them would take a core from CRIU).
    if req.leave_running {
        storage::drop_cached_dir(&req.target);
    }
    phase("ready");
    let frozen_at = Instant::now();
    freeze()?;
    // From here what the tree has (processes, open files) is what CRIU dumps.
    let pids = procfs::tree(req.pid).context(|| format!("process {}", req.pid))?;
    if network == ContainerNetwork::Node {
        refuse_tcp_connections(&pids)?;
    }
    let comm = procfs::comm(req.pid).context(|| format!("process {}", req.pid))?;
    refuse_sysv_shm(&pids)?;
    let externals = external_files(req.pid, &pids)?;
    let slurm_pmi = slurm_pmi(req, &pids)?;
    let node_local = crate::node_local::find(req.pid, &pids, uid, gid, settings.node_local_files_max)?;
    let node_local_pending_dirs = node_local.dirs.clone();
    let stdio = (0..3)
        .map(|fd| match externals.iter().find(|(p, f, _)| *p == req.pid && *f == fd) {
            Some((_, _, key)) => key.clone(),
            None => procfs::fd_target(req.pid, fd).unwrap_or_default(),
        })
        .collect();

    let mut options = criu::Options::dump(root_pid, DUMP_LOG);
    options.ghost_limit(settings.node_local_files_max);
    for (p, _) in slurm_pmi.iter().flatten() {
        options.external(&format!("unix[{}]", p.inode));
    }
    let mut keys: Vec<&String> = externals.iter().map(|(_, _, k)| k).collect();
    keys.dedup();
    for key in keys {
        options.external(key);
    }
    // CRIU always leaves the tree stopped; it is continued or ended here
    // once CRIU is gone. The streamer may still be reading the last pages
    // (pipes hold references to the tree's own pages) when CRIU lets go of
    // the tree. And CRIU runs in the container's PID namespace: ending the
    // tree ends Apptainer and then the namespace's init, whose death kills
    // every process left in the namespace, CRIU too if it is still
    // finishing (seen as "CRIU could not dump: signal 9" under load).
    options.leave_stopped();
    let invocation = Invocation {
        criu: &settings.criu,
        ns_of: req.pid,
        uid,
        gid,
        groups: vec![gid],
        caps: CRIU_CAPS,
        images_dir: &criu_dir,
        inherited: vec![],
        options,
    };
    phase("CRIU starts");
    let started = Instant::now();
    let mut criu_cmd = invocation.command()?;
    held.signal(0).map_err(|_| EngineError::Failed(format!("process {} ended while its checkpoint was prepared", req.pid)))?;
    criu_cmd.cmd().stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let child = criu_cmd.spawn().context(|| "cannot run CRIU".into())?;
    // Threads only once CRIU is forked: the images, and meanwhile the
    // container image's digest (the manifest pins what restore must find).
    // A tree left running waits only for its bytes to be moved.
    let summing = if req.leave_running { Summing::AfterDrain } else { Summing::WhileWriting };
    let ghost_budget = settings.node_local_files_max.saturating_sub(node_local.bytes());
    let capture = Capture::start(listener, staging.images.clone(), settings.compression, summing, ghost_budget);
    let image_path = req.image.clone();
    let image_digest = std::thread::spawn(move || storage::image_digest(&image_path));
    // A tree that ends: the replaced checkpoint leaves the cache while CRIU starts.
    let replaced = req.target.clone();
    let uncached = (!req.leave_running).then(|| std::thread::spawn(move || storage::drop_cached_dir(&replaced)));
    let out = wait_with_timeout(child, DUMP_TIMEOUT);
    phase("CRIU done");
    // What crossed the PMI relay meanwhile would be in neither run.
    let pmi_moved =
        slurm_pmi.iter().zip(&req.slurm_pmi).find_map(|(seen, relay)| seen.as_ref().and_then(|(_, crossed)| relay.still(*crossed).err()));
    let drained = capture.finish();
    phase("images written");
    // Node-local files are copied while the tree is stopped (or gone):
    // their content is then the one its memory refers to.
    let saved = match (&out, &drained) {
        (Ok(o), Ok(_)) if o.status.success() && !node_local.is_empty() => {
            Some(node_local.save(&staging.images, settings.node_local_files_max))
        }
        _ => None,
    };
    let dumped = pmi_moved.is_none() && matches!((&out, &drained), (Ok(o), Ok(_)) if o.status.success());
    // Ended as CRIU ends a dumped tree by default, or continued (also after
    // a failed dump, which CRIU itself undoes).
    let then = if dumped && !req.leave_running { nix::sys::signal::Signal::SIGKILL } else { nix::sys::signal::Signal::SIGCONT };
    // The tree as it is now (a child forked before CRIU froze it is in it),
    // each process only while it is still the user's in the container.
    procfs::signal_tree(req.pid, uid, pid_ns, then as i32);
    let dump_seconds = started.elapsed().as_secs_f64();
    let frozen = frozen_at.elapsed();
    let streamed = drained.and_then(|d| d.checksums());
    phase("images summed");
    let out = out?;
    if !out.status.success() || streamed.is_err() {
        let log = std::fs::read_to_string(staging.work.join(DUMP_LOG)).unwrap_or_default();
        let why = streamed
            .err()
            .map(|e| e.to_string())
            .or_else(|| criu::first_error(&log))
            .or_else(|| String::from_utf8_lossy(&out.stderr).lines().last().map(str::to_string))
            .unwrap_or_else(|| format!("exit status {}", out.status));
        // What happens to the container is the caller's to say; `dump`
        // names the earlier checkpoint, if there is one.
        return Err(EngineError::Criu(format!("CRIU could not dump process {}: {why}", req.pid)));
    }
    if let Some(why) = pmi_moved {
        return Err(EngineError::Failed(format!("the program {why}")));
    }
    let mut files = streamed?;
    // The pids restore must keep free: those CRIU dumped. A listing of the
    // running tree misses a child forked meanwhile, whose pid the restore's
    // own processes could then take ("Can't fork for 353: File exists").
    let ids = crate::core_images::dumped_ids(&staging.images, &files)?;
    let (node_local, node_local_files) = saved.transpose()?.unwrap_or_default();
    let node_local_dirs = node_local_pending_dirs;
    files.extend(node_local_files);
    let (image_size, image_blake3) = image_digest.join().unwrap_or_else(|_| fail("image digest thread panicked"))?;
    if storage::stamp(image)? != image_stamp {
        return fail(format!("container image {} changed while the checkpoint was taken", req.image_name));
    }
    phase("image digest done");
    let _ = uncached.map(|t| t.join());
    staging.seal(&files)?;
    let pmi: Vec<Option<manifest::SlurmPmi>> = slurm_pmi.into_iter().map(|p| p.map(|(p, _)| p)).collect();
    let (single_pmi, ranks) = match &req.ranks {
        None => (pmi.first().copied().flatten(), None),
        Some((status, stdio)) => {
            let ranks = stdio
                .iter()
                .zip(pmi.iter().chain(std::iter::repeat(&None)))
                .map(|(stdio, p)| manifest::Rank { stdio: stdio.clone(), slurm_pmi: *p });
            (None, Some(manifest::Ranks { status: status.clone(), ranks: ranks.collect() }))
        }
    };
    let manifest = Manifest {
        format: manifest::FORMAT,
        job: req.job.clone(),
        owner: Owner { uid, gid },
        node: storage::node_name(),
        created_unix: SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs(),
        criu_version: version.to_string(),
        container: manifest::Container {
            argv: req.container.argv().to_vec(),
            cwd,
            env,
            image: req.image_name.clone(),
            image_size,
            image_blake3,
            image_stamp,
            network,
        },
        process: manifest::Process { root_pid, comm, pids: ids, stdio, slurm_pmi: single_pmi, ranks },
        stats: manifest::Stats { dump_seconds, images_bytes: files.iter().map(|f| f.size).sum() },
        files,
        node_local,
        node_local_dirs,
    };
    staging.write_manifest(&manifest)?;
    phase("sealed");
    Ok((manifest, staging, frozen))
}
