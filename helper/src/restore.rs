//! Bringing a checkpoint back: a fresh container from the same command line,
//! then CRIU restores the process tree into its mount namespace.

use crate::criu::{self, Invocation, CRIU_CAPS};
use crate::error::{fail, Context, EngineError, Result};
use crate::launch::{self, Launch};
use crate::manifest::Manifest;
use crate::namespaces;
use crate::procfs::{self, Pid};
use crate::storage;
use crate::streamer::Serve;
use crate::user::User;
use ckpt_config::Settings;
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RestoreRequest {
    pub images: PathBuf,
    /// Refuse images whose manifest names another user or job.
    pub expected_uid: Option<u32>,
    pub expected_job: Option<u32>,
    /// What the restored program gets in place of the Slurm PMI socket it
    /// had, if it had one (pmi.rs).
    pub slurm_pmi: Option<File>,
    /// The network namespace to restore in (the one `slurm_pmi` was made
    /// in); None: a new one, if the container had its own.
    pub net_ns: Option<File>,
    /// For a step's ranks in one container (agent/ranks.rs): what this
    /// run's tasks give each restored rank.
    pub ranks: Option<RanksFds>,
}

/// This run's descriptors for a restored ranks launcher: a new status pipe
/// (the user's, as the one it replaces), and per rank, in order, its task's
/// stdin, stdout, stderr and the end of its new PMI relay (None when the
/// rank held none).
pub struct RanksFds {
    pub status: File,
    pub ranks: Vec<([File; 3], Option<File>)>,
}

/// The numbers of a ranks launcher's descriptors, the same in its container
/// (agent/ranks.rs) and for `checkpoint-container restore --ranks N`: its
/// status pipe, and rank K's stdin, stdout, stderr and PMI socket at
/// [`rank_fds`]`(K)` (rank 0's stdio is the container's own 0, 1 and 2).
pub const RANKS_STATUS_FD: i32 = 9;
pub fn rank_fds(k: usize) -> [i32; 4] {
    let first = 10 + 4 * k as i32;
    [first, first + 1, first + 2, first + 3]
}

/// Where a restore's CRIU holds the descriptors it is given for a ranks
/// launcher's (`--inherit-fd`), above `criu::PMI_FD`.
const RANKS_INHERITED_FROM: i32 = 110;

/// CRIU's log and the restored root's pid, in the work directory.
const RESTORE_LOG: &str = "restore.log";
const RESTORE_PID: &str = "restore.pid";
/// What the placeholder container runs until the restored tree replaces it:
/// `read` is a shell builtin and Apptainer needs /bin/sh in every image, so
/// it works in any image; it ends when the helper closes its stdin.
const PLACEHOLDER: &[&str] = &["/bin/sh", "-c", "read _checkpoint_container_placeholder"];
const PLACEHOLDER_TIMEOUT: Duration = Duration::from_secs(60);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(600);

/// Checks everything that can be checked before anything is started.
pub fn verify(settings: &Settings, req: &RestoreRequest) -> Result<Manifest> {
    criu::check(&settings.criu)?;
    // Digests are verified while the images are served.
    let m = storage::open_checkpoint(&req.images, false)?;
    if let Some(uid) = req.expected_uid {
        if m.owner.uid != uid {
            return Err(EngineError::Refused(format!(
                "checkpoint {} belongs to uid {}, not to uid {uid}: refusing to restore it",
                req.images.display(),
                m.owner.uid
            )));
        }
    }
    if let Some(job) = req.expected_job {
        if m.job.job_id != Some(job) {
            return Err(EngineError::Refused(format!(
                "checkpoint {} belongs to job {}, not to job {job}: refusing to restore it",
                req.images.display(),
                m.job.job_id.map_or("none".into(), |j| j.to_string())
            )));
        }
    }
    // What CRIU will give each restored thread, read from the images
    // themselves (whose checksums are checked first).
    crate::core_images::check(&req.images, &m)?;
    Ok(m)
}

/// The pids the checkpoint needs are free in the placeholder's fresh PID
/// namespace by construction (its init moved the namespace's pid counter
/// past them before starting anything); says which one is not, if one is.
fn pids_free(placeholder: &Placeholder, m: &Manifest) -> Result<()> {
    for p in procfs::tree(placeholder.child.id() as Pid).unwrap_or_default() {
        let Ok(taken) = procfs::ns_pid(p) else { continue };
        if m.process.pids.contains(&taken) {
            let comm = procfs::comm(p).unwrap_or_default();
            return fail(format!("pid {taken} needed by the checkpoint is in use in the container's PID namespace (by {comm})"));
        }
    }
    Ok(())
}

/// A pipe whose inode belongs to `uid`: CRIU, running as that user, must
/// reopen the restored stdio through /proc/self/fd, which a root-owned pipe
/// refuses (runc#1333).
pub fn user_pipe(uid: u32) -> Result<(File, File)> {
    match crate::sys::with_fsuid(uid, || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)) {
        Ok((r, w)) => Ok((File::from(r), File::from(w))),
        Err(e) => fail(format!("cannot create a pipe: {}", std::io::Error::from(e))),
    }
}

/// Copies the restored program's output to ours until it closes it.
fn relay(mut from: File, mut to: File) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
    })
}

struct Placeholder {
    child: Child,
    /// The container's payload: the process whose mount namespace CRIU
    /// joins. It runs the user's /bin/sh, so it is hers: held by pidfd.
    payload: procfs::PidFd,
    /// Its staged mounts, kept until the restore is over.
    _launch: Launch,
}

impl Placeholder {
    /// Re-creates the checkpointed container from the manifest's request,
    /// through the same policy as a fresh start (the manifest is root's,
    /// but everything in it came from the user), running the placeholder.
    fn start(settings: &Settings, m: &Manifest, net_ns: Option<&File>) -> Result<Placeholder> {
        let user = User::lookup(m.owner.uid, m.owner.gid)?;
        let request = launch::Request { argv: &m.container.argv, cwd: &m.container.cwd, env: &m.container.env };
        let placeholder = launch::Payload::Placeholder { argv: PLACEHOLDER, ranks: m.process.ranks.is_some() };
        let launch = launch::prepare(settings, &user, &request, placeholder)?;
        if storage::stamp(&launch.image)? != m.container.image_stamp && storage::digest(&launch.image)?.1 != m.container.image_blake3 {
            return fail(format!(
                "container image {} changed since the checkpoint (digest differs): refusing to restore",
                launch.image_name
            ));
        }
        // Under our init, in fresh PID and (as it was) network namespaces,
        // with every pid up to the largest the checkpoint needs kept free.
        let helper = std::env::current_exe().context(|| "own path".into())?.to_string_lossy().into_owned();
        let last_pid = m.process.pids.iter().copied().max();
        let argv = namespaces::init_argv(&helper, m.container.network, last_pid, &launch.argv);
        let mut cmd = Command::new(&argv[0]);
        user.give_groups(&mut cmd);
        cmd.args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_clear()
            .envs(launch.env.iter().cloned())
            .current_dir("/");
        let made;
        let net_ns = match net_ns {
            Some(ns) => Some(ns),
            None => {
                made = namespaces::net_ns_for(m.container.network).context(|| "network namespace".into())?;
                made.as_ref()
            }
        };
        let mut child = namespaces::spawn_init(&mut cmd, net_ns).context(|| format!("cannot start {}", launch.argv[0]))?;
        let me = std::process::id() as Pid;
        let own_mnt = procfs::ns_inode(me, "mnt").context(|| "own namespaces".into())?;
        let own_user = procfs::ns_inode(me, "user").context(|| "own namespaces".into())?;
        let deadline = Instant::now() + PLACEHOLDER_TIMEOUT;
        loop {
            // The owner's `sh` in the container's mount namespace and in no
            // user namespace of its own (one the user made would do too).
            let found = procfs::tree(child.id() as Pid).unwrap_or_default().into_iter().find_map(|p| {
                let fd = procfs::PidFd::of_user(p, m.owner.uid)?;
                let ok = procfs::comm(p).is_ok_and(|c| c == "sh")
                    && procfs::ns_inode(p, "user").is_ok_and(|n| n == own_user)
                    && procfs::ns_inode(p, "mnt").is_ok_and(|n| n != own_mnt);
                ok.then_some(fd)
            });
            if let Some(payload) = found {
                return Ok(Placeholder { child, payload, _launch: launch });
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                child.stderr.take().map(|e| e.take(1 << 20).read_to_string(&mut err));
                let last = err.lines().rfind(|l| !l.starts_with("INFO")).unwrap_or("").to_string();
                return fail(format!("cannot re-create the container ({status}): {last}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return fail(format!("the container did not start within {PLACEHOLDER_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Lets the placeholder end (its stdin closes) and reaps its init (which
    /// ends with Apptainer, and the namespace with it).
    fn finish(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }

    /// Kills the init, and so everything in its PID namespace (whatever
    /// CRIU may have restored there too).
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.payload.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Where restores keep CRIU's directory while they run (root-only, not
/// /tmp: root creates directories only where only root can).
const RESTORE_ROOT: &str = "/run/checkpoint-container/restore";

/// `--inherit-fd` for a stdio fd whose target was a pipe or a file: the
/// restored program gets ours instead.
fn inherit_key(target: &str) -> Option<String> {
    if target.starts_with("pipe:[") || target.starts_with("file[") {
        Some(target.to_string())
    } else if let Some(path) = target.strip_prefix('/') {
        (!target.starts_with("/dev/")).then(|| path.to_string())
    } else {
        None
    }
}

/// CRIU's fds 1 and 2, and the read ends to relay, each with where to.
type RestoredStdio = ([File; 2], Vec<(File, File)>);

/// What CRIU is given for `original` (a restored process's stdout or
/// stderr as the checkpoint recorded it) from `ours`: a file opened outside
/// the container is given as it is (CRIU restores its offset, so it must be
/// a file too); a pipe gets a pipe of the user's, whose read end is
/// returned to relay to `ours`.
fn given_for(original: &str, ours: File, uid: u32, fd: i32) -> Result<(File, Option<(File, File)>)> {
    if original.starts_with("file[") {
        if !ours.metadata().map(|md| md.is_file()).unwrap_or(false) {
            return fail(format!(
                "fd {fd} of the checkpointed program was a file opened outside its container; restore's fd {fd} must be a file too"
            ));
        }
        return Ok((ours, None));
    }
    // Root copies the program's output into it: only into what a task's
    // may be (the agent checked it already; a restore run by hand gets the
    // same rule).
    if let Err(why) = crate::protocol::plain_output_fd(&ours, fd as usize) {
        return fail(format!("this run's task: {why}: the restored output is not copied into it"));
    }
    let (r, w) = user_pipe(uid)?;
    Ok((w, Some((r, ours))))
}

/// The restored program's stdout and stderr, given to CRIU as its own fds 1
/// and 2 and named with `--inherit-fd`:
/// - a pipe in the checkpoint gets a pipe of the user's, relayed to ours;
/// - a file opened outside the container (a batch job's output file) gets
///   our own fd, which must then be a file too (CRIU restores its offset).
///
/// Returns CRIU's fds 1 and 2 and the read ends to relay, by fd.
fn restored_stdio(m: &Manifest, options: &mut criu::Options) -> Result<RestoredStdio> {
    use std::os::fd::AsFd;
    let shared = m.process.stdio.get(1) == m.process.stdio.get(2);
    let mut given: Vec<File> = Vec::new();
    let mut relays = Vec::new();
    for fd in [1, 2] {
        if fd == 2 && shared {
            let first = given[0].try_clone().context(|| "cannot duplicate stdout".into())?;
            given.push(first);
            continue;
        }
        let original = m.process.stdio.get(fd as usize).cloned().unwrap_or_default();
        let ours: OwnedFd =
            if fd == 1 { std::io::stdout().as_fd().try_clone_to_owned() } else { std::io::stderr().as_fd().try_clone_to_owned() }
                .context(|| format!("cannot duplicate fd {fd}"))?;
        let (write_end, relayed) = given_for(&original, File::from(ours), m.owner.uid, fd)?;
        relays.extend(relayed);
        if let Some(key) = inherit_key(&original) {
            options.inherit_fd(fd, &key);
        }
        given.push(write_end);
    }
    let err = given.pop().unwrap();
    let out = given.pop().unwrap();
    Ok(([out, err], relays))
}

/// A ranks launcher's descriptors (agent/ranks.rs): each rank's stdout and
/// stderr, its PMI relay's end and the launcher's status pipe, each given
/// to CRIU at a number of its own and named with `--inherit-fd`; a key two
/// ranks shared is given once. Returns the read ends to relay.
fn ranks_inherited(
    recorded: &crate::manifest::Ranks,
    given: &RanksFds,
    uid: u32,
    options: &mut criu::Options,
    inherited: &mut Vec<(File, i32)>,
) -> Result<Vec<(File, File)>> {
    if recorded.ranks.len() != given.ranks.len() {
        return fail(format!("the checkpoint has {} ranks, and this run's step {}", recorded.ranks.len(), given.ranks.len()));
    }
    let mut next = RANKS_INHERITED_FROM;
    let mut keys: Vec<String> = Vec::new();
    let mut give = |key: String, file: File, options: &mut criu::Options, inherited: &mut Vec<(File, i32)>| {
        if !keys.contains(&key) {
            options.inherit_fd(next, &key);
            inherited.push((file, next));
            keys.push(key);
            next += 1;
        }
    };
    let mut relays = Vec::new();
    for (rank, (stdio, pmi)) in recorded.ranks.iter().zip(&given.ranks) {
        for fd in [1, 2] {
            let original = rank.stdio.get(fd).cloned().unwrap_or_default();
            let Some(key) = inherit_key(&original) else { continue };
            let ours = stdio[fd].try_clone().context(|| format!("cannot duplicate fd {fd}"))?;
            let (write_end, relayed) = given_for(&original, ours, uid, fd as i32)?;
            relays.extend(relayed);
            give(key, write_end, options, inherited);
        }
        match (&rank.slurm_pmi, pmi) {
            (Some(p), Some(ours)) => give(format!("socket:[{}]", p.inode), ours.try_clone().context(|| "dup".into())?, options, inherited),
            (Some(_), None) => return fail("a rank held Slurm's PMI socket, and this run's task has none"),
            (None, _) => {}
        }
    }
    give(recorded.status.clone(), given.status.try_clone().context(|| "dup".into())?, options, inherited);
    Ok(relays)
}

/// Whether CRIU has let go of the restored root task: it writes its pid file
/// before the final resume, while the task is still traced.
fn released(pid: Pid) -> bool {
    match std::fs::read_to_string(procfs::proc_path(pid, "status")) {
        Ok(status) => status.lines().find_map(|l| l.strip_prefix("TracerPid:")).is_some_and(|v| v.trim() == "0"),
        // Already gone: it ran and ended.
        Err(_) => true,
    }
}

/// How the restored program ended, once it has.
pub struct Restored {
    pub exit_code: i32,
}

/// Restores and waits for the restored program to end. `on_restored` is
/// called once the tree runs again (with the seconds the restore took, and
/// the restored root's pid in this helper's PID namespace, if still alive).
pub fn restore(settings: &Settings, req: &RestoreRequest, on_restored: impl FnOnce(&Manifest, f64, Option<Pid>)) -> Result<Restored> {
    let mut on_restored = Some(on_restored);
    let entered = Instant::now();
    let phase = |what: &str| log::debug!("{what} at {:.3} s", entered.elapsed().as_secs_f64());
    let m = verify(settings, req)?;
    phase("verified");
    let started = Instant::now();
    let mut work_dir = storage::UserWorkDir::create(Path::new(RESTORE_ROOT), m.owner.uid, m.owner.gid)?;
    let work = work_dir.path.clone();
    let work_file = File::open(&work).context(|| format!("cannot open {}", work.display()))?;
    let listener = Serve::bind(&work, m.owner.uid, m.owner.gid)?;
    let placeholder = Placeholder::start(settings, &m, req.net_ns.as_ref())?;
    phase("placeholder runs");
    // CRIU reopens them by path: node-local files first (node_local.rs).
    let ready = pids_free(&placeholder, &m).and_then(|()| crate::node_local::recreate(&m, &req.images, &placeholder.payload));
    if let Err(e) = ready {
        placeholder.kill();
        return Err(e);
    }

    let mut options = criu::Options::restore(RESTORE_LOG, RESTORE_PID);
    let mut inherited = Vec::new();
    if let Some(p) = &m.process.slurm_pmi {
        let Some(ours) = req.slurm_pmi.as_ref().and_then(|f| f.try_clone().ok()) else {
            placeholder.kill();
            return fail("the checkpointed program held Slurm's PMI socket, and this run's task has none (is it still `srun --mpi=pmi2`?)");
        };
        options.inherit_fd(criu::PMI_FD, &format!("socket:[{}]", p.inode));
        inherited.push((ours, criu::PMI_FD));
    }
    let stdio = match (&m.process.ranks, &req.ranks) {
        (None, _) => restored_stdio(&m, &mut options),
        (Some(recorded), Some(given)) => ranks_inherited(recorded, given, m.owner.uid, &mut options, &mut inherited).and_then(|relays| {
            let own = |f: std::io::Result<OwnedFd>| f.map(File::from).context(|| "cannot duplicate stdio".into());
            use std::os::fd::AsFd;
            Ok(([own(std::io::stdout().as_fd().try_clone_to_owned())?, own(std::io::stderr().as_fd().try_clone_to_owned())?], relays))
        }),
        (Some(_), None) => fail("the checkpoint is of a step's ranks, and this restore was given no ranks"),
    };
    let (stdio, relay_ends) = match stdio {
        Ok(x) => x,
        Err(e) => {
            placeholder.kill();
            return Err(e);
        }
    };
    let invocation = Invocation {
        criu: &settings.criu,
        ns_of: placeholder.payload.pid,
        uid: m.owner.uid,
        gid: m.owner.gid,
        groups: crate::core_images::restored_groups(&req.images, &m)?,
        caps: CRIU_CAPS,
        images_dir: &work_file,
        inherited,
        options,
    };
    // The namespace CRIU joins is opened by pid: it must still be the
    // placeholder's once opened (a pid freed meanwhile fails this).
    let spawned = invocation.command().map_err(EngineError::from).and_then(|c| {
        placeholder
            .payload
            .signal(0)
            .map(|_| c)
            .map_err(|_| EngineError::Failed("the placeholder container ended before CRIU could join it".into()))
    });
    let spawned = spawned.and_then(|mut c| {
        let [out, err] = stdio;
        c.cmd().stdin(Stdio::null()).stdout(out).stderr(err);
        c.spawn().context(|| "cannot run CRIU".into())
    });
    let mut criu_child = match spawned {
        Ok(c) => c,
        Err(e) => {
            placeholder.kill();
            return Err(e);
        }
    };
    // CRIU holds its own copies now: ours of the pipes it was given would
    // keep their relays below from ever seeing the restored program close them.
    drop(invocation);
    phase("CRIU starts");
    let serve = Serve::start(listener, req.images.clone(), &m.files);
    let relays: Vec<_> = relay_ends.into_iter().map(|(r, to)| relay(r, to)).collect();

    // The pid file appears once the tree is restored and running. The
    // restored root is CRIU's child, known here by its pid in the
    // container's namespace.
    let pidfile = work.join(RESTORE_PID);
    let mut announced = false;
    let mut root = None;
    let status = loop {
        if let Some(status) = criu_child.try_wait().context(|| "waiting for CRIU".into())? {
            break status;
        }
        if !announced && pidfile.exists() {
            root = root.or_else(|| procfs::find_ns_pid(criu_child.id() as Pid, m.process.root_pid));
            if root.is_none_or(released) {
                announced = true;
                if let Some(f) = on_restored.take() {
                    phase("restored tree runs");
                    f(&m, started.elapsed().as_secs_f64(), root);
                }
            }
        }
        if !announced && started.elapsed() > RESTORE_TIMEOUT {
            let _ = criu_child.kill();
        }
        std::thread::sleep(Duration::from_millis(if announced { 200 } else { 5 }));
    };
    let restore_seconds = started.elapsed().as_secs_f64();
    if !announced && status.success() {
        // The program ran and ended between two polls.
        announced = true;
        if let Some(f) = on_restored.take() {
            f(&m, restore_seconds, None);
        }
    }
    let placeholder = if !announced && !status.success() {
        // Whatever CRIU had recreated may still hold the relayed pipes:
        // gone first (with the namespace), and the relays are not waited for.
        placeholder.kill();
        None
    } else {
        for r in relays {
            let _ = r.join();
        }
        Some(placeholder)
    };
    let served = serve.finish();
    let Some(placeholder) = placeholder else {
        let log = std::fs::read_to_string(work.join(RESTORE_LOG)).unwrap_or_default();
        if let Err(e) = served {
            return fail(format!("{e} (nothing was left running)"));
        }
        // Its log is named in the error: kept.
        work_dir.keep = true;
        let why = criu::first_error(&log).unwrap_or_else(|| format!("CRIU exited with {status}"));
        return Err(EngineError::Criu(format!(
            "CRIU could not restore {}: {why} (nothing was left running; log in {})",
            req.images.display(),
            work.display()
        )));
    };
    placeholder.finish();
    use std::os::unix::process::ExitStatusExt;
    let exit_code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok(Restored { exit_code })
}
