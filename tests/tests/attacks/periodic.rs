//! The periodic checkpoint interval is the one value root takes from the
//! job's environment (CHECKPOINT_CONTAINER_INTERVAL): only a number, never
//! more often than the site allows.

use super::alices_dir;
use cluster_tests::{cluster, TEST_SIF};

fn protected_line(value: &str, marker_dir: &str) -> String {
    let c = cluster();
    let out = c
        .sh(
            "node1",
            "alice",
            &format!("CHECKPOINT_CONTAINER_INTERVAL='{value}' srun -w node1 --checkpoint-container apptainer -s exec {TEST_SIF} true"),
        )
        .ok();
    // Her own processes may expand it (it is her environment: the marker
    // appeared, owned by alice, on the dev cluster); root never does.
    let by_root = c.sh("node1", "root", &format!("find {marker_dir} -name pwned -user root")).ok().stdout;
    assert_eq!(by_root, "", "root ran the value as a command: {value}");
    out.stderr
}

#[test]
fn an_interval_that_is_not_a_number_is_refused_in_one_line_and_the_sites_applies() {
    let dir = alices_dir(cluster());
    for value in [format!("$(touch {dir}/pwned)"), "/etc/shadow".into(), format!("5;touch {dir}/pwned")] {
        let err = protected_line(&value, &dir);
        assert_eq!(err.matches("warning: setting CHECKPOINT_CONTAINER_INTERVAL=").count(), 1, "{value}: {err}");
        assert!(err.contains("expected a number of seconds; the site's interval applies"), "{value}: {err}");
        assert!(err.contains("are checkpointed if the job is preempted or requeued"), "{value}: {err}");
    }
}

#[test]
fn a_job_cannot_ask_for_checkpoints_more_often_than_the_site_allows() {
    let dir = alices_dir(cluster());
    let err = protected_line("1", &dir);
    assert!(err.contains("are checkpointed every 600 s and if the job is preempted or requeued"), "{err}");
}
