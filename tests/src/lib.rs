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
            paths
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{key} ")))
                .unwrap_or_else(|| panic!("devcluster paths: no {key}"))
                .into()
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
        let submit = format!(
            "cat > {path} <<'CLUSTER_TESTS_EOF'\n{script}\nCLUSTER_TESTS_EOF\n{} {path}",
            argv.join(" ")
        );
        let out = self.sh("node1", user, &submit).ok();
        out.stdout.trim().split(';').next().unwrap().parse().expect("job id from sbatch")
    }

    /// `scontrol show job` fields of a job, one `key=value` per entry.
    pub fn job_field(&self, job: u32, key: &str) -> Option<String> {
        let out = self.exec("ctl", "root", &["scontrol", "-o", "show", "job", &job.to_string()]);
        out.stdout
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
    }

    /// Waits until the job has ended and returns its final state.
    pub fn wait_job(&self, job: u32, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.job_field(job, "JobState").unwrap_or_default();
            if ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"]
                .contains(&state.as_str())
            {
                return state;
            }
            assert!(Instant::now() < deadline, "job {job} still {state} after {timeout:?}");
            std::thread::sleep(Duration::from_millis(300));
        }
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

/// A string no other test run uses, for file and job names.
pub fn unique() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{}-{}-{}", std::process::id(), nanos, N.fetch_add(1, Ordering::Relaxed))
}

/// The test SIF image every node sees.
pub const TEST_SIF: &str = "/shared/images/test.sif";
