//! Where root writes: only into directories only root can change, so that
//! nothing alice makes there can cost bob his job or steer root's writes.

use super::{as_alice, UNPROTECTED};
use cluster_tests::{cluster, unique, PlugstackOverride, TEST_SIF};

const NO_CHECKPOINTING: &str = "runs without checkpointing";

#[test]
fn alice_cannot_create_the_directories_of_other_jobs() {
    let c = cluster();
    // The next job ids: what she pre-created in a world-writable
    // checkpoint_dir made bob's protected step fail.
    let next: u32 = c
        .exec("ctl", "root", &["scontrol", "show", "config"])
        .ok()
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("NEXT_JOB_ID").and_then(|v| v.split('=').nth(1)).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(1);
    for job in next..next + 3 {
        let out = as_alice(c, &format!("mkdir /shared/checkpoints/{job}"));
        assert!(!out.success(), "alice created /shared/checkpoints/{job}");
    }
    // bob's protected step runs protected.
    let out = c.sh("node1", "bob", &format!("srun -w node1 --checkpoint-container apptainer -s exec {TEST_SIF} echo ok")).ok();
    assert_eq!(out.stdout.trim(), "ok");
    assert!(!out.stderr.contains(UNPROTECTED) && !out.stderr.contains(NO_CHECKPOINTING), "{out:#?}");
}

#[test]
fn a_checkpoint_dir_others_can_write_to_is_refused_with_the_reason() {
    let c = cluster();
    let dir = format!("/shared/world-writable-{}", unique());
    c.sh("node1", "root", &format!("install -d -m 1777 {dir}")).ok();
    let _site = PlugstackOverride::new(c, |line| line.replace("checkpoint_dir=/shared/checkpoints", &format!("checkpoint_dir={dir}")));
    let out = c.sh("node1", "bob", &format!("srun -w node1 --checkpoint-container apptainer -s exec {TEST_SIF} echo ok")).ok();
    // The step runs, unprotected, and says why.
    assert_eq!(out.stdout.trim(), "ok");
    assert!(out.stderr.contains(NO_CHECKPOINTING) && out.stderr.contains(&format!("{dir} is owned by uid 0 with mode 1777")), "{out:#?}");
    assert_eq!(c.sh("node1", "root", &format!("ls -A {dir}")).ok().stdout, "", "root wrote into it");
    c.sh("node1", "root", &format!("rmdir {dir}")).ok();
}

#[test]
fn a_staging_dir_alice_created_first_is_never_written_by_root() {
    let c = cluster();
    let dir = format!("/dev/shm/ckpt-staging-{}", unique());
    as_alice(c, &format!("mkdir -m 0777 {dir}")).ok();
    let _site = PlugstackOverride::new(c, |line| format!("{line} staging_dir={dir}"));
    let out = c.sh("node1", "bob", &format!("srun -w node1 --checkpoint-container apptainer -s exec {TEST_SIF} echo ok")).ok();
    assert_eq!(out.stdout.trim(), "ok");
    assert!(out.stderr.contains(NO_CHECKPOINTING) && out.stderr.contains("is owned by uid 2001"), "{out:#?}");
    assert_eq!(c.sh("node1", "root", &format!("ls -A {dir}")).ok().stdout, "");
    c.sh("node1", "root", &format!("rm -rf {dir}")).ok();
}
