//! `checkpoint-container list`, run by users: each sees her own
//! checkpoints (job, step, task, size, age, node, state), nobody else's.

use cluster_tests::{cluster, unique, Cluster, HELPER, TEST_SIF};
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);

/// A job of `user` whose container sleeps, requeued once it runs: it is
/// pending again with a checkpoint.
fn checkpointed_job(c: &Cluster, user: &str) -> u32 {
    let script = format!(
        "#!/bin/bash\n#SBATCH --checkpoint-container\n#SBATCH -o /tmp/list-{}.out\nsrun apptainer -s exec {TEST_SIF} sleep 600\n",
        unique()
    );
    let job = c.sbatch(user, &["-w", "node1"], &script);
    c.wait_state(job, &["RUNNING"], MINUTE);
    // The container must be up before the requeue.
    std::thread::sleep(Duration::from_secs(3));
    c.exec("ctl", "root", &["scontrol", "requeue", &job.to_string()]).ok();
    c.wait_state(job, &["PENDING"], MINUTE);
    job
}

fn list(c: &Cluster, node: &str, user: &str) -> String {
    c.exec(node, user, &[HELPER, "--checkpoint-dir", "/shared/checkpoints", "list"]).ok().stdout
}

fn row_of(table: &str, job: u32) -> Option<Vec<String>> {
    table.lines().find(|l| l.split_whitespace().next() == Some(&job.to_string())).map(|l| l.split_whitespace().map(String::from).collect())
}

#[test]
fn users_list_their_own_checkpoints_and_nobody_elses() {
    let c = cluster();
    let alices = checkpointed_job(c, "alice");
    let bobs = checkpointed_job(c, "bob");
    // Any node sees the list: it lives next to the checkpoints.
    let table = list(c, "node2", "alice");
    let row = row_of(&table, alices).unwrap_or_else(|| panic!("alice's job {alices} missing:\n{table}"));
    assert_eq!(&row[1..4], ["0", "0", "-"], "step, task, container: {table}");
    assert_eq!(row[5], "MiB", "{table}");
    assert!(row[4].parse::<f64>().unwrap() > 0.0, "size: {table}");
    assert_eq!(&row[7..], ["node1", "complete"], "{table}");
    assert!(row_of(&table, bobs).is_none(), "alice sees bob's job:\n{table}");
    let table = list(c, "node1", "bob");
    assert!(row_of(&table, bobs).is_some() && row_of(&table, alices).is_none(), "{table}");
    // Nor can she look into his list directly.
    let out = c.exec("node1", "alice", &["ls", "/shared/checkpoints/.by-user/2002"]).failed();
    assert!(out.stderr.contains("Permission denied"), "{out:#?}");
    // Once the job is over for good, its entry goes with its checkpoint.
    for job in [alices, bobs] {
        c.exec("ctl", "root", &["scancel", &job.to_string()]).ok();
    }
    c.wait_state(alices, &["CANCELLED"], MINUTE);
    c.exec("node1", "root", &[HELPER, "--checkpoint-dir", "/shared/checkpoints", "gc"]).ok();
    let table = list(c, "node1", "alice");
    assert!(row_of(&table, alices).is_none(), "{table}");
}
