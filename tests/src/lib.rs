//! Harness for the integration tests: drives the real dev cluster
//! (`cluster/devcluster`) — slurmctld, slurmd, munge, Apptainer and CRIU in
//! namespaced hosts — through its CLI, exactly as a person would.
//!
//! The tests change cluster-wide files (plugstack.conf), so they run one at
//! a time (`--test-threads=1`, set by `./dev test`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What a command run inside a node produced.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Panics with everything the command printed unless it succeeded.
    #[track_caller]
    pub fn ok(self) -> Output {
        assert!(self.success(), "command failed: {self:#?}");
        self
    }

    #[track_caller]
    pub fn failed(self) -> Output {
        assert!(!self.success(), "command unexpectedly succeeded: {self:#?}");
        self
    }
}

pub struct Cluster {
    devcluster: PathBuf,
    pub shared: PathBuf,
    pub etc: PathBuf,
    pub state: PathBuf,
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The running cluster; started on first use if it is not up (a warm start
/// takes about a second).
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let devcluster = repo_root().join("cluster/devcluster");
        let up = Command::new(&devcluster).arg("up").output().expect("run devcluster up");
        assert!(up.status.success(), "devcluster up failed: {}", String::from_utf8_lossy(&up.stderr));
        let paths = Command::new(&devcluster).arg("paths").output().expect("devcluster paths");
        let paths = String::from_utf8(paths.stdout).unwrap();
        let path = |key: &str| -> PathBuf {
            paths.lines().find_map(|l| l.strip_prefix(&format!("{key} "))).unwrap_or_else(|| panic!("devcluster paths: no {key}")).into()
        };
        Cluster { shared: path("shared"), etc: path("etc"), state: path("state"), devcluster }
    })
}

impl Cluster {
    /// Runs `argv` inside `node` as `user` ("root", "alice", "bob").
    pub fn exec(&self, node: &str, user: &str, argv: &[&str]) -> Output {
        let mut cmd = Command::new(&self.devcluster);
        cmd.arg("exec").arg(node);
        if user != "root" {
            cmd.args(["--user", user]);
        }
        cmd.arg("--").args(argv);
        let out = cmd.output().expect("run devcluster exec");
        Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs a bash script inside `node` as `user`, in the user's home.
    pub fn sh(&self, node: &str, user: &str, script: &str) -> Output {
        self.exec(node, user, &["bash", "-c", script])
    }

    /// Submits a batch script as `user` from node1; returns the job id.
    pub fn sbatch(&self, user: &str, args: &[&str], script: &str) -> u32 {
        let mut argv = vec!["sbatch", "--parsable"];
        argv.extend_from_slice(args);
        let path = format!("/tmp/job-{}.sh", unique());
        let submit = format!("cat > {path} <<'CLUSTER_TESTS_EOF'\n{script}\nCLUSTER_TESTS_EOF\n{} {path}", argv.join(" "));
        let out = self.sh("node1", user, &submit).ok();
        out.stdout.trim().split(';').next().unwrap().parse().expect("job id from sbatch")
    }

    /// `scontrol show job` fields of a job, one `key=value` per entry.
    pub fn job_field(&self, job: u32, key: &str) -> Option<String> {
        let out = self.exec("ctl", "root", &["scontrol", "-o", "show", "job", &job.to_string()]);
        out.stdout.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{key}="))).map(str::to_string)
    }

    /// Waits until the job has ended and returns its final state.
    pub fn wait_job(&self, job: u32, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.job_field(job, "JobState").unwrap_or_default();
            if ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"].contains(&state.as_str()) {
                return state;
            }
            assert!(Instant::now() < deadline, "job {job} still {state} after {timeout:?}\n{}", self.diagnosis(job));
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// What a test that timed out on `job` shows: the job as slurmctld
    /// sees it, the agents' last log lines and alice's and bob's processes
    /// on each node.
    pub fn diagnosis(&self, job: u32) -> String {
        let mut out = self.exec("ctl", "root", &["scontrol", "-o", "show", "job", &job.to_string()]).stdout;
        for node in ["node1", "node2"] {
            let log = self.exec(node, "root", &["tail", "-n", "25", "/var/log/slurm/checkpoint-container.log"]).stdout;
            let ps = self.exec(node, "root", &["ps", "-o", "pid,ppid,stat,user,etime,args", "-u", "alice,bob"]).stdout;
            out.push_str(&format!("--- {node}: agent log\n{log}--- {node}: processes\n{ps}"));
        }
        out
    }

    /// The Slurm daemon log of a node (slurmctld's for "ctl").
    pub fn daemon_log(&self, node: &str) -> String {
        let out = Command::new(&self.devcluster).args(["logs", node]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Reads a file of a node's user through the node (homes are shared).
    pub fn read_file(&self, user: &str, path: &str) -> String {
        self.exec("node1", user, &["cat", path]).ok().stdout
    }
}

/// Replaces the plugin's arguments on the plugstack.conf line for as long as
/// it lives; the original file comes back on drop, even when a test fails.
pub struct PlugstackOverride {
    path: PathBuf,
    original: String,
}

impl PlugstackOverride {
    /// `edit` receives the original line and returns the new one.
    pub fn new(cluster: &Cluster, edit: impl FnOnce(&str) -> String) -> Self {
        let path = cluster.etc.join("plugstack.conf");
        let original = std::fs::read_to_string(&path).unwrap();
        let edited = edit(original.trim_end());
        // Written in place: the node's /etc/slurm is a bind of this directory.
        std::fs::write(&path, format!("{edited}\n")).unwrap();
        PlugstackOverride { path, original }
    }
}

impl Drop for PlugstackOverride {
    fn drop(&mut self) {
        std::fs::write(&self.path, &self.original).unwrap();
    }
}

/// A compute node stopped hard (`devcluster crash`) for as long as it
/// lives; started again and back in Slurm on drop, even when a test fails,
/// so later tests have both nodes.
pub struct CrashedNode<'a> {
    cluster: &'a Cluster,
    node: String,
}

impl Cluster {
    /// Stops `node` as a power loss would: its link goes down, every process
    /// in it dies at once.
    pub fn crash(&self, node: &str) -> CrashedNode<'_> {
        let out = Command::new(&self.devcluster).args(["crash", node]).output().unwrap();
        let crashed = CrashedNode { cluster: self, node: node.to_string() };
        assert!(out.status.success(), "devcluster crash {node}: {}", String::from_utf8_lossy(&out.stderr));
        crashed
    }
}

impl Drop for CrashedNode<'_> {
    fn drop(&mut self) {
        let out = Command::new(&self.cluster.devcluster).args(["revive", &self.node]).output().unwrap();
        if !out.status.success() && !std::thread::panicking() {
            panic!("devcluster revive {}: {}", self.node, String::from_utf8_lossy(&out.stderr));
        }
    }
}

impl Cluster {
    /// Gives alice a second group (3001) on every host, as a site's group
    /// database is (a group she had on one node only would make her
    /// checkpoints unrestorable on the other, rightly), and has slurmctld,
    /// which gives tasks their groups, forget the ones it cached. Once.
    pub fn give_alice_a_second_group(&self) {
        let has = |h: &str| self.sh(h, "root", "id -G alice").ok().stdout.split_whitespace().any(|g| g == "3001");
        if ["ctl", "node1", "node2"].iter().all(|h| has(h)) && self.sh("node1", "alice", "srun -w node1 id -G").ok().stdout.contains("3001")
        {
            return;
        }
        for host in ["ctl", "node1", "node2"] {
            self.sh(host, "root", "getent group ckpt-test >/dev/null || groupadd -g 3001 ckpt-test; usermod -aG ckpt-test alice").ok();
        }
        self.reconfigure("");
    }

    /// Whether both nodes are up for jobs.
    fn nodes_take_jobs(&self) -> bool {
        let nodes = self.exec("ctl", "root", &["sinfo", "-h", "-N", "-p", "low", "-o", "%t"]).stdout;
        nodes.lines().filter(|t| ["idle", "mix", "alloc"].contains(&t.trim())).count() == 2
    }

    /// `scontrol reconfigure` (the daemons restart: slurmctld forgets the
    /// groups it cached), then waits until `scontrol show config` has a
    /// line starting with `expect` (spaces squeezed; "" for any) and both
    /// nodes take jobs again.
    pub fn reconfigure(&self, expect: &str) {
        self.exec("ctl", "root", &["scontrol", "reconfigure"]).ok();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let config = self.exec("ctl", "root", &["scontrol", "show", "config"]).stdout;
            let applied = config.lines().any(|l| l.split_whitespace().collect::<Vec<_>>().join(" ").starts_with(expect));
            if applied && self.nodes_take_jobs() {
                return;
            }
            assert!(Instant::now() < deadline, "slurm.conf change not applied: {expect}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// Compiles C `source` with this machine's gcc into `out` (a path on this
/// machine, e.g. below `Cluster::shared`), with `flags` ("-static",
/// "-shared -fPIC"); the result is readable and executable by everyone.
pub fn gcc(source: &str, out: &Path, flags: &[&str]) {
    let src = out.with_extension("c");
    std::fs::write(&src, source).unwrap();
    let built = Command::new("gcc").args(flags).arg("-o").arg(out).arg(&src).output().expect("run gcc");
    assert!(built.status.success(), "gcc failed: {}", String::from_utf8_lossy(&built.stderr));
    std::fs::set_permissions(out, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// A plugstack.conf line with its `criu=` argument replaced (or added).
pub fn with_criu(line: &str, criu: &str) -> String {
    with_arg(line, "criu", criu)
}

/// A plugstack.conf line with argument `key` replaced (or added).
pub fn with_arg(line: &str, key: &str, value: &str) -> String {
    let mut words: Vec<String> = line.split_whitespace().filter(|w| !w.starts_with(&format!("{key}="))).map(String::from).collect();
    words.push(format!("{key}={value}"));
    words.join(" ")
}

/// A string no other test run uses, for file and job names.
pub fn unique() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{}-{}-{}", std::process::id(), nanos, N.fetch_add(1, Ordering::Relaxed))
}

/// The test SIF image every node sees.
pub const TEST_SIF: &str = "/shared/images/test.sif";
const APPS_SIF: &str = "/shared/images/apps.sif";

/// What an uninterrupted run of the workload prints last (computed by the
/// same program with `--expect`).
pub fn expected_done(mem_mib: u32, steps: u32) -> String {
    let bin = repo_root().join("target/release/ckpt-workload");
    let out = Command::new(bin).args(["--expect", "--mem-mib", &mem_mib.to_string(), "--steps", &steps.to_string()]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The helper as installed on every node.
/// Where the package installs the helper (the cluster installs the .deb).
pub const HELPER: &str = "/usr/libexec/checkpoint-container/checkpoint-container";
pub const WORKLOAD: &str = "/opt/checkpoint-container/bin/ckpt-workload";

/// How a test starts the workload container.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// Started by root for the user (`--security uid:…`), as setuid
    /// Apptainer would: the mode the engine checkpoints.
    RootStarted,
    /// Started by the user: Apptainer's default user-namespace mode.
    Unprivileged,
}

/// Where the container's stdout goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Stdout {
    /// A pipe to a `tee` appending to stdout.txt.
    Pipe,
    /// stdout.txt itself, opened for appending.
    File,
}

pub struct WorkloadSpec {
    pub mem_mib: u32,
    pub steps: u32,
    pub interval_ms: u32,
    pub mode: Mode,
    pub stdout: Stdout,
    /// Image to run (default: the test SIF).
    pub image: String,
    /// Extra `--bind` arguments, relative sources taken in the workload's
    /// directory ("criu-conf:/etc/criu"); a source `setup` did not create is
    /// created as an empty directory of alice's.
    pub binds: Vec<String>,
    /// Shell script run as alice in the workload's directory (the node's
    /// path) before the container starts.
    pub setup: Option<String>,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec {
            mem_mib: 64,
            steps: 60,
            interval_ms: 100,
            mode: Mode::RootStarted,
            stdout: Stdout::Pipe,
            image: TEST_SIF.into(),
            binds: vec![],
            setup: None,
        }
    }
}

/// The workload running in a container, in a fresh directory of /shared
/// owned by alice (bound into the container at /data).
pub struct Workload {
    pub node: String,
    /// The directory as the nodes see it.
    pub dir: String,
    /// The same directory on this machine.
    pub host_dir: PathBuf,
    pub pid: i32,
    pub argv: Vec<String>,
    pub spec: WorkloadSpec,
}

/// Shell pipeline printing the pids of the workload whose /data is `dir`,
/// the root of its tree first.
fn workload_pids(dir: &str) -> String {
    format!(
        "for p in $(pgrep -u alice -f '^{WORKLOAD} '); do [ -e /proc/$p/root/data/.workload ] && \
         [ /proc/$p/root/data/.workload -ef {dir}/.workload ] && echo $p; done | sort -n"
    )
}

impl Cluster {
    pub fn start_workload(&self, node: &str, spec: WorkloadSpec) -> Workload {
        let name = format!("wl-{}", unique());
        let dir = format!("/shared/{name}");
        self.sh(
            node,
            "root",
            &format!("install -d -o alice -g alice -m 0755 {dir} && runuser -u alice -- touch {dir}/stdout.txt {dir}/.workload"),
        )
        .ok();
        let mut argv: Vec<String> = ["apptainer", "-s", "exec"].map(String::from).into();
        if spec.mode == Mode::RootStarted {
            argv.extend(["--security".into(), "uid:2001,gid:2001".into()]);
        }
        argv.extend(["--bind".into(), "/opt/checkpoint-container".into(), "--bind".into(), format!("{dir}:/data")]);
        if let Some(setup) = &spec.setup {
            self.sh(node, "alice", &format!("cd {dir} && {setup}")).ok();
        }
        for bind in &spec.binds {
            let source = format!("{dir}/{}", bind.split(':').next().unwrap());
            self.sh(node, "root", &format!("[ -e {source} ] || install -d -o alice -g alice {source}")).ok();
            argv.extend(["--bind".into(), format!("{dir}/{bind}")]);
        }
        argv.push(spec.image.clone());
        argv.extend([WORKLOAD.into(), "--mem-mib".into(), spec.mem_mib.to_string(), "--steps".into(), spec.steps.to_string()]);
        argv.extend(["--interval-ms".into(), spec.interval_ms.to_string(), "--out".into(), "/data/out.txt".into()]);
        let cmd = argv.join(" ");
        let cmd = match spec.mode {
            Mode::RootStarted => cmd,
            Mode::Unprivileged => format!("runuser -u alice -- {cmd}"),
        };
        let launch = match spec.stdout {
            Stdout::Pipe => format!("{cmd} < /dev/null 2>&1 | runuser -u alice -- tee -a {dir}/stdout.txt > /dev/null"),
            Stdout::File => format!("exec {cmd} < /dev/null >> {dir}/stdout.txt 2>&1"),
        };
        // Detached from our pipes, or `exec` would wait for the workload to end.
        assert!(!launch.contains('\''));
        self.sh(node, "root", &format!("setsid -f bash -c '{launch}' < /dev/null > /dev/null 2>&1")).ok();
        // Wait until the program has filled its memory and printed a step.
        let deadline = Instant::now() + Duration::from_secs(30);
        let pid = loop {
            let out = self.sh(node, "root", &format!("test -s {dir}/out.txt && {}", workload_pids(&dir)));
            if let Some(pid) = out.stdout.lines().next().and_then(|l| l.trim().parse().ok()) {
                break pid;
            }
            if Instant::now() > deadline {
                let diag =
                    self.sh(node, "root", &format!("set -x; pgrep -a -u alice -f ckpt-workload; ls -la {dir}; {}", workload_pids(&dir)));
                panic!("workload did not start on {node}: {out:#?} {diag:#?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        Workload { node: node.into(), host_dir: self.shared.join(&name), dir, pid, argv, spec }
    }
}

impl Workload {
    /// Lines the program appended to /data/out.txt so far.
    pub fn out_lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.host_dir.join("out.txt")).unwrap_or_default().lines().map(String::from).collect()
    }

    /// Waits until the program has printed at least `n` steps.
    pub fn wait_steps(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.out_lines().len() < n {
            assert!(Instant::now() < deadline, "workload stuck at {} lines", self.out_lines().len());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn expected_done(&self) -> String {
        expected_done(self.spec.mem_mib, self.spec.steps)
    }

    /// Asserts out.txt holds every step exactly once, in order, then the done
    /// line of an uninterrupted run; the same text went to stdout.
    pub fn assert_finished_correctly(&self) {
        let lines = self.out_lines();
        let steps = self.spec.steps as usize;
        assert_eq!(lines.len(), steps + 1, "out.txt: {lines:?}");
        for (i, line) in lines[..steps].iter().enumerate() {
            assert!(line.starts_with(&format!("counter={} ", i + 1)), "line {}: {line}", i + 1);
        }
        assert_eq!(lines[steps], self.expected_done());
        let stdout = std::fs::read_to_string(self.host_dir.join("stdout.txt")).unwrap();
        assert_eq!(stdout.lines().collect::<Vec<_>>(), lines, "stdout.txt differs from out.txt");
    }

    /// In the cluster's checkpoint_dir: root writes only into directories
    /// only root can change (the workload's own directory is alice's).
    pub fn checkpoint_dir(&self) -> String {
        format!("/shared/checkpoints/{}", self.name())
    }

    /// The same directory on this machine.
    pub fn host_checkpoint_dir(&self) -> PathBuf {
        self.host_dir.parent().unwrap().join("checkpoints").join(self.name())
    }

    fn name(&self) -> String {
        self.host_dir.file_name().unwrap().to_string_lossy().into_owned()
    }

    /// Runs `checkpoint-container checkpoint` for this workload on its node.
    pub fn checkpoint(&self, cluster: &Cluster, extra: &[&str]) -> Output {
        let pid = self.pid.to_string();
        let target = self.checkpoint_dir();
        let mut argv = vec![HELPER, "checkpoint", "--pid", &pid, "--images", &target, "--uid", "2001"];
        argv.extend_from_slice(extra);
        argv.push("--");
        argv.extend(self.argv.iter().map(String::as_str));
        cluster.exec(&self.node, "root", &argv)
    }

    /// Runs `checkpoint-container restore` on `node`, appending the restored
    /// program's output to the same stdout.txt; waits for the program to end.
    /// `args` are the identity checks and other options ("--uid 2001").
    pub fn restore(&self, cluster: &Cluster, node: &str, args: &str) -> Output {
        cluster.sh(node, "root", &format!("{HELPER} restore --images {} {args} >> {}/stdout.txt", self.checkpoint_dir(), self.dir))
    }

    pub fn is_running(&self, cluster: &Cluster) -> bool {
        cluster.exec(&self.node, "root", &["kill", "-0", &self.pid.to_string()]).success()
    }

    /// Pids of this workload's processes on `node` (root of the tree first).
    pub fn pids_on(&self, cluster: &Cluster, node: &str) -> Vec<i32> {
        cluster.sh(node, "root", &workload_pids(&self.dir)).stdout.lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    /// Ends the workload wherever it runs and removes its directory.
    pub fn cleanup(&self, cluster: &Cluster) {
        for node in ["node1", "node2"] {
            for pid in self.pids_on(cluster, node) {
                cluster.exec(node, "root", &["kill", "-KILL", &pid.to_string()]);
            }
        }
        let _ = std::fs::remove_dir_all(&self.host_dir);
        let _ = std::fs::remove_dir_all(self.host_checkpoint_dir());
    }
}

/// Memory a workload job asks for, as sites require it (CR_CPU_Memory,
/// ConstrainRAMSpace), per CPU of the job, so a restored program must fit in
/// the new job's limit: the workload's own plus room for Apptainer, whose
/// unprivileged mode (no squashfuse here) extracts the test image, ~250 MB,
/// into the node's tmpfs, charged to the job.
pub fn job_mem_per_cpu_mib(mem_mib: u32) -> u32 {
    mem_mib + 768
}

/// A batch job whose steps run the workload in containers with
/// `--checkpoint-container`, with its files in a fresh /shared directory.
pub struct BatchJob {
    pub id: u32,
    pub dir: String,
    pub host_dir: PathBuf,
    pub mem_mib: u32,
    pub steps: u32,
}

impl Cluster {
    /// Submits, as alice, a batch script whose body runs `srun_lines` (each
    /// `{W}` is replaced by the containerised workload command writing to
    /// /data/<name>).
    pub fn submit_workload_job(&self, sbatch_args: &[&str], srun_lines: &[&str], mem_mib: u32, steps: u32) -> BatchJob {
        self.submit_job(sbatch_args, None, |dir| {
            let workload = format!(
                "apptainer -s exec --bind /opt/checkpoint-container --bind {dir}:/data {TEST_SIF} {WORKLOAD} --mem-mib {mem_mib} --steps {steps} --interval-ms 100"
            );
            let body: Vec<String> = srun_lines.iter().map(|l| l.replace("{W}", &workload)).collect();
            (body.join("\n"), mem_mib, steps)
        })
    }

    /// Submits, as alice, a `--checkpoint-container` batch script running
    /// in a fresh /shared directory of hers (its output: job.out there,
    /// appended to by every run). `setup` (shell, as alice) runs in the
    /// directory first; `body` gets the directory and returns the script's
    /// commands and the workload's memory and step count (0 if not the
    /// workload).
    pub fn submit_job(&self, sbatch_args: &[&str], setup: Option<&str>, body: impl FnOnce(&str) -> (String, u32, u32)) -> BatchJob {
        let name = format!("job-{}", unique());
        let dir = format!("/shared/{name}");
        self.sh("node1", "root", &format!("install -d -o alice -g alice -m 0755 {dir}")).ok();
        if let Some(setup) = setup {
            self.sh("node1", "alice", &format!("cd {dir} && {setup}")).ok();
        }
        let (body, mem_mib, steps) = body(&dir);
        let script = format!(
            "#!/bin/bash\n#SBATCH --checkpoint-container\n#SBATCH -o {dir}/job.out\n#SBATCH --open-mode=append\n\
             echo \"run restart=${{SLURM_RESTART_COUNT:-0}} on $(hostname)\"\n{body}\n"
        );
        let mem = format!("--mem-per-cpu={}M", job_mem_per_cpu_mib(mem_mib));
        let args: Vec<&str> = std::iter::once(mem.as_str()).chain(sbatch_args.iter().copied()).collect();
        let id = self.sbatch("alice", &args, &script);
        BatchJob { id, host_dir: self.shared.join(&name), dir, mem_mib, steps }
    }

    /// The application SIF (LAMMPS, GROMACS, Open MPI; `cluster/apps.sh`),
    /// put in /shared/images on first use (built once, cached on this
    /// machine: minutes when cold).
    pub fn apps_sif(&self) -> &'static str {
        static READY: OnceLock<()> = OnceLock::new();
        READY.get_or_init(|| {
            let out = Command::new(&self.devcluster).arg("apps").output().expect("run devcluster apps");
            assert!(out.status.success(), "devcluster apps failed: {}", String::from_utf8_lossy(&out.stderr));
        });
        APPS_SIF
    }

    /// Waits until the job is in one of `states`.
    pub fn wait_state(&self, job: u32, states: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.job_field(job, "JobState").unwrap_or_default();
            if states.contains(&state.as_str()) {
                return state;
            }
            assert!(Instant::now() < deadline, "job {job} is {state}, not {states:?}, after {timeout:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Lets a requeued job start now instead of after Slurm's requeue delay,
    /// optionally on other nodes.
    pub fn release(&self, job: u32, nodes: Option<&str>) {
        self.wait_state(job, &["PENDING"], Duration::from_secs(90));
        let id = job.to_string();
        if let Some(nodes) = nodes {
            self.exec("ctl", "root", &["scontrol", "update", &format!("jobid={id}"), &format!("NodeList={nodes}")]).ok();
        }
        self.exec("ctl", "root", &["scontrol", "update", &format!("jobid={id}"), "StartTime=now"]).ok();
    }
}

impl BatchJob {
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.host_dir.join("job.out")).unwrap_or_default()
    }

    pub fn lines(&self, file: &str) -> Vec<String> {
        std::fs::read_to_string(self.host_dir.join(file)).unwrap_or_default().lines().map(String::from).collect()
    }

    /// Waits until `file` has at least `n` lines.
    pub fn wait_lines(&self, file: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.lines(file).len() < n {
            assert!(Instant::now() < deadline, "{file} stuck at {} lines; job output:\n{}", self.lines(file).len(), self.output());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The checkpoint directory of one task, as the nodes see it.
    pub fn checkpoint_of(&self, step: u32, task: u32) -> String {
        format!("/shared/checkpoints/{}/step{step}.task{task}", self.id)
    }

    pub fn expected_done(&self) -> String {
        expected_done(self.mem_mib, self.steps)
    }

    /// `file` holds every step exactly once, in order, and the final line of
    /// an uninterrupted run: the program went on from its saved state.
    #[track_caller]
    pub fn assert_continued(&self, file: &str) {
        let lines = self.lines(file);
        let steps = self.steps as usize;
        assert_eq!(lines.len(), steps + 1, "{file}: {} lines; job output:\n{}", lines.len(), self.output());
        for (i, line) in lines[..steps].iter().enumerate() {
            assert!(line.starts_with(&format!("counter={} ", i + 1)), "{file} line {}: {line}", i + 1);
        }
        assert_eq!(lines[steps], self.expected_done(), "{file}");
    }

    /// Finished for good: nothing of the job is left in the checkpoint
    /// area, as `node` sees it.
    #[track_caller]
    pub fn assert_no_checkpoints_left(&self, cluster: &Cluster, node: &str) {
        let left = cluster.exec(node, "root", &["ls", "-A", "/shared/checkpoints"]).ok().stdout;
        assert!(!left.split_whitespace().any(|d| d == self.id.to_string()), "checkpoints left: {left}");
    }

    pub fn cleanup(&self, cluster: &Cluster) {
        cluster.exec("ctl", "root", &["scancel", &self.id.to_string()]);
        let _ = std::fs::remove_dir_all(&self.host_dir);
    }
}

/// `pingpong OUT STEPS MS`: two processes pass a counter over a loopback TCP
/// connection, the child adding one each time; the parent appends
/// `counter=N pid=P sid=S` per step, then `done N`. A reset or a lost
/// connection shows as a counter that restarts, repeats or stops.
/// `hold OUT STEPS MS IP PORT`: the same lines, with a connection to IP:PORT
/// held open. `listen PORT`: accepts connections and keeps them.
pub const TCP_COUNTER: &str = r#"
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int full(int fd, void *b, size_t n, int wr) {
    char *p = b;
    while (n) {
        ssize_t r = wr ? write(fd, p, n) : read(fd, p, n);
        if (r <= 0) return 0;
        p += r; n -= r;
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "listen")) {
        int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[2])) };
        if (bind(l, (void *)&a, sizeof a) || listen(l, 16)) return 1;
        for (;;) accept(l, 0, 0);
    }
    int steps = atoi(argv[3]), ms = atoi(argv[4]);
    int out = open(argv[2], O_WRONLY | O_APPEND | O_CREAT, 0644);
    int s = -1;
    pid_t child = 0;
    if (!strcmp(argv[1], "hold")) {
        s = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[6])) };
        inet_pton(AF_INET, argv[5], &a.sin_addr);
        if (connect(s, (void *)&a, sizeof a)) { dprintf(out, "cannot connect\n"); return 1; }
    } else {
        int l = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        socklen_t len = sizeof a;
        if (bind(l, (void *)&a, len) || listen(l, 1) || getsockname(l, (void *)&a, &len)) return 1;
        child = fork();
        if (child == 0) {
            int c = socket(AF_INET, SOCK_STREAM, 0);
            if (connect(c, (void *)&a, len)) _exit(1);
            close(l);
            uint32_t n;
            while (full(c, &n, 4, 0)) {
                n = htonl(ntohl(n) + 1);
                if (!full(c, &n, 4, 1)) break;
            }
            _exit(0);
        }
        s = accept(l, 0, 0);
        close(l);
    }
    uint32_t n = 0;
    for (int i = 1; i <= steps; i++) {
        if (child) {
            uint32_t x = htonl(n), m;
            if (!full(s, &x, 4, 1) || !full(s, &m, 4, 0)) { dprintf(out, "connection lost at %u\n", n); return 1; }
            m = ntohl(m);
            if (m != n + 1) { dprintf(out, "sent %u got %u\n", n, m); return 1; }
            n = m;
        } else {
            n = i;
        }
        dprintf(out, "counter=%u pid=%d sid=%d\n", n, getpid(), getsid(0));
        usleep(ms * 1000);
    }
    dprintf(out, "done %u\n", n);
    if (child) kill(child, SIGKILL);
    return 0;
}
"#;

/// A directory of alice's in /shared holding [`TCP_COUNTER`] (built as
/// `tcpc`) and what a job running it writes (`out.txt`, `job.out`), plus
/// the `--bind` options the job's container gets.
pub struct TcpCounter {
    pub path: String,
    pub host: PathBuf,
    binds: Vec<String>,
}

impl TcpCounter {
    /// `binds`: extra Apptainer binds, sources relative to the directory.
    pub fn new(c: &Cluster, binds: &[&str]) -> TcpCounter {
        let name = format!("ns-{}", unique());
        let path = format!("/shared/{name}");
        c.sh("node1", "root", &format!("install -d -o alice -g alice -m 0755 {path}")).ok();
        let host = c.shared.join(&name);
        gcc(TCP_COUNTER, &host.join("tcpc"), &["-static", "-O2"]);
        let binds = binds.iter().map(|b| format!("--bind {path}/{b}")).collect();
        TcpCounter { path, host, binds }
    }

    pub fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.host.join("out.txt")).unwrap_or_default().lines().map(String::from).collect()
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(self.host.join("job.out")).unwrap_or_default()
    }

    pub fn wait_lines(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.lines().len() < n {
            assert!(Instant::now() < deadline, "out.txt stuck at {} lines:\n{}", self.lines().len(), self.output());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Submits, as alice on node1, a protected job running `tcpc ARGS`.
    pub fn submit(&self, c: &Cluster, args: &str) -> u32 {
        let script = format!(
            "#!/bin/bash\n#SBATCH --checkpoint-container\n#SBATCH -o {0}/job.out\n#SBATCH --open-mode=append\n\
             echo \"run restart=${{SLURM_RESTART_COUNT:-0}} on $(hostname)\"\n\
             srun apptainer -s exec --bind {0}:/data {1} {TEST_SIF} /data/tcpc {args}\n",
            self.path,
            self.binds.join(" ")
        );
        c.sbatch("alice", &["-w", "node1"], &script)
    }
}

/// `key=value` of a line the TCP counter wrote (-1 if absent).
pub fn counter_field(line: &str, key: &str) -> i64 {
    line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))).and_then(|v| v.parse().ok()).unwrap_or(-1)
}

/// A program that keeps its state in node-local files, as Open MPI does: it
/// maps `SHM` (MAP_SHARED, `size` bytes) for its counter and accumulator and
/// holds `SHM.fd` open for a copy of the counter, checks both against its
/// own memory every step, and appends `step=N acc=X` to `out` (then `done
/// steps=N acc=X`, or `MISMATCH …` and exit 3 when a file lost its state).
/// `mem_mib` of touched memory make the dump take a while. A run that starts
/// fresh exits at once if `/data/stop-before-start` exists. An optional
/// sixth argument names one more file it holds open, read-only.
const SHM_PROGRAM: &str = r#"#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#define K 6364136223846793005ULL
struct state { uint64_t counter, acc; };
int main(int argc, char **argv) {
    if (argc < 6) return 2;
    /* A test that wants only the restore to touch the files stops a fresh run. */
    if (access("/data/stop-before-start", F_OK) == 0) return 4;
    const char *path = argv[1];
    uint64_t steps = strtoull(argv[2], 0, 10);
    long size = atol(argv[3]);
    int out = open(argv[4], O_WRONLY | O_APPEND | O_CREAT, 0644);
    size_t mem = (size_t)atol(argv[5]) << 20;
    char *ballast = malloc(mem + 1);
    for (size_t i = 0; i < mem; i += 4096) ballast[i] = (char)i;
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    char side[4096];
    snprintf(side, sizeof side, "%s.fd", path);
    int held = open(side, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (out < 0 || fd < 0 || held < 0 || ftruncate(fd, size)) { perror("open"); return 2; }
    /* "--unlink": both files are deleted once open, as MPI libraries do with their segments. */
    int unlinked = argc > 6 && strcmp(argv[6], "--unlink") == 0;
    if (argc > 6 && !unlinked && open(argv[6], O_RDONLY) < 0) { perror(argv[6]); return 2; }
    struct state *s = mmap(0, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (s == MAP_FAILED) { perror("mmap"); return 2; }
    close(fd);
    if (unlinked && (unlink(path) || unlink(side))) { perror("unlink"); return 2; }
    s->counter = 0; s->acc = 1;
    uint64_t mine = 0, acc = 1, seen;
    pwrite(held, &mine, sizeof mine, 0);
    while (mine < steps) {
        if (pread(held, &seen, sizeof seen, 0) != sizeof seen) seen = ~0ULL;
        if (s->counter != mine || s->acc != acc || seen != mine) {
            dprintf(out, "MISMATCH after step %llu: shared counter %llu acc %016llx, held %llu\n", (unsigned long long)mine,
                    (unsigned long long)s->counter, (unsigned long long)s->acc, (unsigned long long)seen);
            return 3;
        }
        mine++;
        acc = acc * K + mine;
        s->acc = s->acc * K + mine;
        s->counter = mine;
        pwrite(held, &mine, sizeof mine, 0);
        dprintf(out, "step=%llu acc=%016llx\n", (unsigned long long)mine, (unsigned long long)acc);
        usleep(100000);
    }
    dprintf(out, "done steps=%llu acc=%016llx\n", (unsigned long long)steps, (unsigned long long)acc);
    return 0;
}
"#;

/// A batch job running [`SHM_PROGRAM`] in a container with
/// `--checkpoint-container`; its state lives in `/dev/shm/<shm name>`.
pub struct ShmJob {
    pub job: BatchJob,
    /// The mapped file, as the node and the container see it.
    pub shm: String,
}

impl Cluster {
    pub fn submit_shm_job(&self, sbatch_args: &[&str], steps: u32, size: u64, mem_mib: u32) -> ShmJob {
        self.submit_shm_job_holding(sbatch_args, steps, size, mem_mib, "")
    }

    /// The same, also holding `extra` open (read-only) if not empty; with
    /// `--unlink`, the files are deleted once open.
    pub fn submit_shm_job_holding(&self, sbatch_args: &[&str], steps: u32, size: u64, mem_mib: u32, extra: &str) -> ShmJob {
        let name = format!("job-{}", unique());
        let dir = format!("/shared/{name}");
        self.sh("node1", "root", &format!("install -d -o alice -g alice -m 0755 {dir}")).ok();
        let host_dir = self.shared.join(&name);
        gcc(SHM_PROGRAM, &host_dir.join("shmprog"), &["-static", "-O1"]);
        let shm = format!("/dev/shm/ckpt-test-{}", unique());
        let script = format!(
            "#!/bin/bash\n#SBATCH --checkpoint-container\n#SBATCH -o {dir}/job.out\n#SBATCH --open-mode=append\n\
             echo \"run restart=${{SLURM_RESTART_COUNT:-0}} on $(hostname)\"\n\
             srun apptainer -s exec --bind {dir}:/data {TEST_SIF} /data/shmprog {shm} {steps} {size} /data/out.txt {mem_mib} {extra}\n"
        );
        let id = self.sbatch("alice", sbatch_args, &script);
        ShmJob { job: BatchJob { id, host_dir, dir, mem_mib, steps }, shm }
    }
}

impl ShmJob {
    /// The last line of an uninterrupted run.
    pub fn expected_done(&self) -> String {
        let mut acc: u64 = 1;
        for step in 1..=u64::from(self.job.steps) {
            acc = acc.wrapping_mul(6364136223846793005).wrapping_add(step);
        }
        format!("done steps={} acc={acc:016x}", self.job.steps)
    }

    /// out.txt holds every step once, in order, and the right result: the
    /// program went on from its saved state, with its node-local files.
    #[track_caller]
    pub fn assert_continued(&self) {
        let lines = self.job.lines("out.txt");
        let steps = self.job.steps as usize;
        assert_eq!(lines.len(), steps + 1, "out.txt: {lines:?}; job output:\n{}", self.job.output());
        for (i, line) in lines[..steps].iter().enumerate() {
            assert!(line.starts_with(&format!("step={} ", i + 1)), "out.txt line {}: {line}", i + 1);
        }
        assert_eq!(lines[steps], self.expected_done());
    }

    /// out.txt shows a second run from step 1 that ended right.
    #[track_caller]
    pub fn assert_started_over(&self) {
        let lines = self.job.lines("out.txt");
        assert_eq!(lines.iter().filter(|l| l.starts_with("step=1 ")).count(), 2, "started over: {lines:?}");
        assert!(!lines.iter().any(|l| l.starts_with("MISMATCH")), "{lines:?}");
        assert_eq!(lines.last().unwrap(), &self.expected_done());
    }

    /// Makes a fresh start of the program exit before it opens anything.
    pub fn stop_fresh_starts(&self, cluster: &Cluster) {
        cluster.sh("node1", "alice", &format!("touch {}/stop-before-start", self.job.dir)).ok();
    }

    pub fn cleanup(&self, cluster: &Cluster) {
        for node in ["node1", "node2"] {
            cluster.sh(node, "root", &format!("rm -f {0} {0}.fd", self.shm));
        }
        self.job.cleanup(cluster);
    }
}
