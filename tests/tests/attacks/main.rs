//! A hostile user against the privilege boundary, on the real cluster.
//!
//! alice controls her job script, argv, environment, image, bind sources,
//! her home and every process in her container. Each test tries one way to
//! gain root, a capability, or bob's data through `--checkpoint-container`,
//! with a harmless marker, and asserts the marker shows nothing was gained:
//! no file written or changed by root, no code loaded with privilege, no
//! byte of bob's printed, bob's jobs unaffected. docs/security.md lists
//! which rule each one covers.

mod criu;
mod launch;
mod restore;
mod storage;

use cluster_tests::{cluster, unique, Cluster, Output};

/// A secret of bob's, behind his 0700 home: what alice must never read.
/// Returns the directory holding it and its content.
pub fn bobs_secret(c: &Cluster) -> (String, String) {
    let token = format!("bob-secret-{}", unique());
    let dir = format!("/home/bob/proj-{}", unique());
    c.sh("node1", "bob", &format!("chmod 0700 /home/bob && mkdir -p {dir} && echo {token} > {dir}/secret.txt && chmod 0755 {dir} && chmod 0644 {dir}/secret.txt"))
        .ok();
    (dir, token)
}

/// A fresh directory of alice's in her home, for the attack's files.
pub fn alices_dir(c: &Cluster) -> String {
    let dir = format!("/home/alice/attack-{}", unique());
    c.sh("node1", "alice", &format!("mkdir -p {dir}")).ok();
    dir
}

/// Runs `script` as alice on node1 (a shell script that may call srun).
pub fn as_alice(c: &Cluster, script: &str) -> Output {
    c.sh("node1", "alice", script)
}

pub fn assert_not_leaked(out: &Output, token: &str) {
    assert!(!out.stdout.contains(token) && !out.stderr.contains(token), "bob's secret leaked: {out:#?}");
}

/// The one line a task that root will not start says.
pub const UNPROTECTED: &str = "runs unprotected:";

#[allow(dead_code)]
fn _cluster_is_used() -> &'static Cluster {
    cluster()
}
