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
mod node_local;
mod periodic;
mod restore;
mod shim;
mod storage;

use cluster_tests::{gcc, unique, Cluster, Output};
use std::path::Path;

/// A secret of bob's, behind his 0700 home: what alice must never read.
/// Returns the directory holding it and its content.
pub fn bobs_secret(c: &Cluster) -> (String, String) {
    let token = format!("bob-secret-{}", unique());
    let dir = format!("/home/bob/proj-{}", unique());
    c.sh(
        "node1",
        "bob",
        &format!(
            "chmod 0700 /home/bob && mkdir -p {dir} && echo {token} > {dir}/secret.txt && chmod 0755 {dir} && chmod 0644 {dir}/secret.txt"
        ),
    )
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

/// A shared library whose constructor appends a line naming the process and
/// its effective capabilities to `marker` (a path inside the container).
pub fn marker_library(out: &Path, marker: &str) {
    let source = format!(
        r#"#include <stdio.h>
#include <string.h>
#include <unistd.h>
__attribute__((constructor)) static void mark(void) {{
    char exe[256] = "?", line[256];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) exe[n] = 0;
    FILE *m = fopen("{marker}", "a"), *s = fopen("/proc/self/status", "r");
    if (!m) return;
    fprintf(m, "pid=%d uid=%d exe=%s ", (int)getpid(), (int)getuid(), exe);
    while (s && fgets(line, sizeof line, s))
        if (!strncmp(line, "CapEff:", 7)) fputs(line, m);
    fclose(m);
}}
"#
    );
    gcc(&source, out, &["-shared", "-fPIC"]);
}
