//! Node-local files (tmpfs) travel with the checkpoint: a program that keeps
//! its state in a /dev/shm file it maps, as every Open MPI program does,
//! continues from its saved step on the other node, and on the same node
//! whatever the killed run left there.

use cluster_tests::{cluster, Cluster, PlugstackOverride, ShmJob};
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);

/// Requeues once the program has written `lines` steps.
fn requeue_after(c: &Cluster, job: &ShmJob, lines: usize) {
    job.job.wait_lines("out.txt", lines);
    c.exec("ctl", "root", &["scontrol", "requeue", &job.job.id.to_string()]).ok();
    c.wait_state(job.job.id, &["PENDING"], MINUTE);
}

#[test]
fn a_program_mapping_a_dev_shm_file_continues_on_the_other_node() {
    let c = cluster();
    let job = c.submit_shm_job(&["-w", "node1"], 60, 1 << 20, 16);
    requeue_after(c, &job, 10);
    let manifest = c.exec("node1", "root", &[cluster_tests::HELPER, "inspect", "--verify", &job.job.checkpoint_of(0, 0)]).ok().stdout;
    assert!(manifest.contains(&format!("path = \"{}\"", job.shm)), "{manifest}");
    assert!(manifest.contains(&format!("path = \"{}.fd\"", job.shm)), "{manifest}");
    assert!(manifest.contains("size = 1048576"), "{manifest}");
    c.release(job.job.id, Some("node2"));
    assert_eq!(c.wait_job(job.job.id, 2 * MINUTE), "COMPLETED", "{}", job.job.output());
    let out = job.job.output();
    assert!(out.contains("run restart=1 on node2") && out.contains("checkpoint-container: restored process"), "{out}");
    job.assert_continued();
    // Recreated with the owner and mode it had.
    let st = c.sh("node2", "alice", &format!("stat -c '%U %a %s' {}", job.shm)).ok().stdout;
    assert_eq!(st.trim(), "alice 600 1048576");
    job.cleanup(c);
}

/// MPI libraries delete their /dev/shm segments once mapped (UCX, under
/// MPICH): CRIU carries deleted files itself, up to the site's
/// `node_local_files_max` each (its own default, 1 MiB, failed NWChem).
#[test]
fn a_program_mapping_a_deleted_dev_shm_file_continues_on_the_other_node() {
    let c = cluster();
    let job = c.submit_shm_job_holding(&["-w", "node1"], 60, 4 << 20, 16, "--unlink");
    requeue_after(c, &job, 10);
    c.release(job.job.id, Some("node2"));
    assert_eq!(c.wait_job(job.job.id, 2 * MINUTE), "COMPLETED", "{}", job.job.output());
    let out = job.job.output();
    assert!(out.contains("run restart=1 on node2") && out.contains("checkpoint-container: restored process"), "{out}");
    job.assert_continued();
    job.cleanup(c);
}

#[test]
fn on_the_same_node_the_checkpoints_copy_replaces_a_stale_one() {
    let c = cluster();
    let job = c.submit_shm_job(&["-w", "node1"], 60, 4096, 16);
    requeue_after(c, &job, 10);
    // The killed run left its files; they are changed after the checkpoint
    // (as a run that went on after it would have): a restore that kept them
    // would make the program see another counter than its memory.
    c.sh("node1", "alice", &format!("printf 'garbage-state-garbage' | dd of={0} conv=notrunc status=none && printf '\\377\\377' | dd of={0}.fd conv=notrunc status=none", job.shm)).ok();
    c.release(job.job.id, Some("node1"));
    assert_eq!(c.wait_job(job.job.id, 2 * MINUTE), "COMPLETED", "{}", job.job.output());
    assert!(job.job.output().contains("checkpoint-container: restored process"), "{}", job.job.output());
    job.assert_continued();
    job.cleanup(c);
}

#[test]
fn node_local_files_over_the_site_limit_fail_the_checkpoint_in_one_line() {
    let c = cluster();
    let _limit = PlugstackOverride::new(c, |line| format!("{line} node_local_files_max=64KiB"));
    let job = c.submit_shm_job(&["-w", "node1"], 40, 1 << 20, 16);
    requeue_after(c, &job, 5);
    let out = job.job.output();
    let line = out.lines().find(|l| l.contains("checkpoint of task 0 of step")).unwrap_or_default();
    // One line: the total, the limit and the biggest file, then what happens.
    assert!(line.contains(" failed: node-local and deleted files of process ") && line.contains(" take 1.0 MiB, more than "), "{out}");
    let tail = format!("node_local_files_max (64.0 KiB); the biggest is {} (1.0 MiB); it will run again from the start", job.shm);
    assert!(line.ends_with(&tail), "{line}");
    c.release(job.job.id, Some("node1"));
    assert_eq!(c.wait_job(job.job.id, 2 * MINUTE), "COMPLETED", "{}", job.job.output());
    job.assert_started_over();
    job.cleanup(c);
}

/// Deleted files count too: CRIU would copy them into the checkpoint.
#[test]
fn deleted_files_over_the_site_limit_fail_the_checkpoint_in_one_line() {
    let c = cluster();
    let _limit = PlugstackOverride::new(c, |line| format!("{line} node_local_files_max=64KiB"));
    let job = c.submit_shm_job_holding(&["-w", "node1"], 40, 1 << 20, 16, "--unlink");
    requeue_after(c, &job, 5);
    let out = job.job.output();
    let line = out.lines().find(|l| l.contains("checkpoint of task 0 of step")).unwrap_or_default();
    let tail = format!("the biggest is {} (deleted) (1.0 MiB); it will run again from the start", job.shm);
    assert!(line.contains(" take 1.0 MiB, more than node_local_files_max (64.0 KiB)") && line.ends_with(&tail), "{out}");
    job.cleanup(c);
}

#[test]
fn another_users_file_on_tmpfs_held_open_fails_the_checkpoint_naming_it() {
    let c = cluster();
    // bob's file alice may read: carrying it would copy bob's data, and
    // writing it back would need bob's rights.
    let bobs = format!("/dev/shm/bob-{}", cluster_tests::unique());
    c.sh("node1", "bob", &format!("echo bob > {bobs} && chmod 0644 {bobs}")).ok();
    let job = c.submit_shm_job_holding(&["-w", "node1"], 40, 4096, 16, &bobs);
    requeue_after(c, &job, 5);
    let out = job.job.output();
    let line = out.lines().find(|l| l.contains("checkpoint of task 0 of step")).unwrap_or_default();
    assert!(line.contains(" failed: process "), "{out}");
    let why = format!(
        "maps or holds open {bobs}, a file on tmpfs owned by uid 2002: only the job user's own node-local files can travel \
with a checkpoint; it will run again from the start"
    );
    assert!(line.ends_with(&why), "{line}");
    c.release(job.job.id, Some("node1"));
    assert_eq!(c.wait_job(job.job.id, 2 * MINUTE), "COMPLETED", "{}", job.job.output());
    job.assert_started_over();
    c.sh("node1", "root", &format!("rm -f {bobs}"));
    job.cleanup(c);
}
