//! Containers that a protected job's scripts start, not its tasks: in the
//! batch script itself, in a wrapper script that `srun` runs, one after the
//! other. The runtime shim first on the script's PATH hands each to the
//! task's agent; requeued, the script runs again from its top and each
//! container finds its own checkpoint (docs/architecture.md).

use cluster_tests::{cluster, BatchJob, Cluster, TEST_SIF, WORKLOAD};
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);

fn requeue_after(c: &Cluster, job: &BatchJob, file: &str, lines: usize) {
    job.wait_lines(file, lines);
    c.exec("ctl", "root", &["scontrol", "requeue", &job.id.to_string()]).ok();
    c.wait_state(job.id, &["PENDING"], MINUTE);
}

fn completes(c: &Cluster, job: &BatchJob) -> String {
    assert_eq!(c.wait_job(job.id, 2 * MINUTE), "COMPLETED", "{}", job.output());
    job.output()
}

/// `apptainer exec …` right in the batch script, the most common
/// single-node pattern: checkpointed at the requeue, restored on the next
/// run on the other node, and the step's lines say so truthfully.
#[test]
fn a_container_in_the_batch_script_is_restored_after_a_requeue() {
    let c = cluster();
    let job = c.submit_workload_job(&["-w", "node1"], &["{W} --out /data/out.txt"], 256, 80);
    requeue_after(c, &job, "out.txt", 10);
    c.release(job.id, Some("node2"));
    let out = completes(c, &job);
    job.assert_continued("out.txt");
    let batch = format!("step {}.batch", job.id);
    assert_eq!(out.matches(&format!("in {batch} is protected (CRIU 4.")).count(), 2, "{out}");
    assert_eq!(out.matches(&format!("checkpointed container 0 of task 0 of {batch}")).count(), 1, "{out}");
    assert_eq!(out.matches("restored process").count(), 1, "{out}");
    assert!(!out.contains("starts fresh") && !out.contains("unprotected"), "{out}");
    job.assert_no_checkpoints_left(c, "node1");
    job.cleanup(c);
}

/// Two containers one after the other; the first finished before the
/// requeue, and the script skips it on the next run with
/// SLURM_RESTART_COUNT (as the README shows). The second still finds its
/// checkpoint, though it is now the script's first container.
#[test]
fn a_finished_container_skipped_on_the_next_run_leaves_the_next_its_checkpoint() {
    let c = cluster();
    let job = c.submit_job(&["-w", "node1"], None, |dir| {
        let w = |steps: u32, out: &str| {
            format!(
                "apptainer -s exec --bind /opt/checkpoint-container --bind {dir}:/data {TEST_SIF} {WORKLOAD} --mem-mib 64 --steps {steps} --interval-ms 100 --out /data/{out}"
            )
        };
        let body = format!(
            "if [ \"${{SLURM_RESTART_COUNT:-0}}\" -eq 0 ]; then {}; echo first-done; fi\n{}",
            w(5, "first.txt"),
            w(80, "out.txt")
        );
        (body, 64, 80)
    });
    requeue_after(c, &job, "out.txt", 10);
    c.release(job.id, None);
    let out = completes(c, &job);
    job.assert_continued("out.txt");
    assert_eq!(job.lines("first.txt").len(), 6, "the first container ran once: {:?}", job.lines("first.txt"));
    assert_eq!(out.matches("first-done").count(), 1, "{out}");
    assert_eq!(out.matches(&format!("checkpointed container 1 of task 0 of step {}.batch", job.id)).count(), 1, "{out}");
    assert_eq!(out.matches("restored process").count(), 1, "{out}");
    job.cleanup(c);
}

/// `srun ./run.sh`, where run.sh starts the container as a child (the
/// shell, the task, dies of the requeue's SIGTERM at once) and where it
/// execs it (the shim is then the task): both steps restore.
#[test]
fn containers_in_wrapper_scripts_run_by_srun_are_restored() {
    let c = cluster();
    let setup = "printf '#!/bin/bash\\n\"$@\"\\necho wrapper-ended\\n' > child.sh && printf '#!/bin/sh\\nexec \"$@\"\\n' > exec.sh && chmod +x child.sh exec.sh";
    let job = c.submit_job(&["-w", "node1", "-n2"], Some(setup), |dir| {
        let w = |out: &str| {
            format!(
                "apptainer -s exec --bind /opt/checkpoint-container --bind {dir}:/data {TEST_SIF} {WORKLOAD} --mem-mib 64 --steps 80 --interval-ms 100 --out /data/{out}"
            )
        };
        let body = format!(
            // One after the other: steps started at once take their ids in
            // whatever order slurmctld gets them, and a checkpoint belongs
            // to its step id.
            "srun -n1 --exact {dir}/child.sh {} &\nsleep 3\nsrun -n1 --exact {dir}/exec.sh {} &\nwait",
            w("out.txt"),
            w("exec.txt")
        );
        (body, 64, 80)
    });
    job.wait_lines("exec.txt", 10);
    requeue_after(c, &job, "out.txt", 10);
    c.release(job.id, None);
    let out = completes(c, &job);
    job.assert_continued("out.txt");
    job.assert_continued("exec.txt");
    assert_eq!(out.matches("restored process").count(), 2, "{out}");
    assert_eq!(out.matches("checkpointed container 0 of task 0 of step").count(), 2, "{out}");
    job.cleanup(c);
}

/// A protected step that starts no container is told so when it would have
/// mattered: at the requeue, in one line naming its command. The batch
/// script that started it says nothing of itself.
#[test]
fn a_step_that_starts_no_container_says_so_when_requeued() {
    let c = cluster();
    let job = c.submit_job(&["-w", "node1"], None, |_| ("echo started; srun sleep 300".into(), 0, 0));
    job.wait_lines("job.out", 2);
    std::thread::sleep(Duration::from_secs(2));
    c.exec("ctl", "root", &["scontrol", "requeue", &job.id.to_string()]).ok();
    c.wait_state(job.id, &["PENDING"], MINUTE);
    let out = job.output();
    assert_eq!(
        out.matches(&format!("task 0 of step {}.0 ran `sleep 300`, which started no Apptainer container: it starts over", job.id)).count(),
        1,
        "{out}"
    );
    assert!(!out.contains(".batch ran"), "{out}");
    assert!(!out.contains("is protected"), "{out}");
    job.cleanup(c);
}
