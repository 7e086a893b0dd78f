//! `--checkpoint-container` as users meet it: listed in --help, accepted by
//! srun, sbatch and salloc, and inert when not given.

use cluster_tests::{cluster, TEST_SIF};
use std::time::Duration;

const PROTECTED: &str = "is protected (CRIU 4.";

#[test]
fn option_is_listed_in_srun_sbatch_and_salloc_help() {
    let c = cluster();
    for tool in ["srun", "sbatch", "salloc"] {
        let out = c.exec("node1", "alice", &[tool, "--help"]).ok();
        assert!(out.stdout.contains("--checkpoint-container"), "{tool} --help:\n{}", out.stdout);
    }
}

#[test]
fn srun_runs_an_apptainer_container_with_the_option_on_both_nodes() {
    let c = cluster();
    // One step per node (a step spanning nodes runs unprotected: requeue.rs).
    for node in ["node1", "node2"] {
        let script = format!(
            "srun --checkpoint-container -w {node} -n2 apptainer -s exec {TEST_SIF} \
             sh -c 'echo \"rank $SLURM_PROCID on $(hostname) os=$(. /etc/os-release; echo $ID) \
             ckpt=$SLURM_CHECKPOINT_CONTAINER\"' | sort"
        );
        let out = c.sh("node1", "alice", &script).ok();
        assert_eq!(
            out.stdout.lines().collect::<Vec<_>>(),
            [format!("rank 0 on {node} os=debian ckpt=1"), format!("rank 1 on {node} os=debian ckpt=1")],
            "{out:#?}"
        );
        // One line per step, from rank 0, naming the CRIU the node checked.
        assert_eq!(out.stderr.matches(PROTECTED).count(), 1, "{}", out.stderr);
    }
}

#[test]
fn sbatch_directive_enables_the_batch_step_and_its_srun_steps() {
    let c = cluster();
    for node in ["node1", "node2"] {
        let out_file = format!("/home/alice/sbatch-{node}-{}.out", cluster_tests::unique());
        let job = c.sbatch(
            "alice",
            &["-w", node, "-o", &out_file],
            &format!(
                "#!/bin/bash\n#SBATCH --checkpoint-container\n\
                 echo \"batch on $(hostname) ckpt=$SLURM_CHECKPOINT_CONTAINER\"\n\
                 srun apptainer -s exec {TEST_SIF} sh -c 'echo \"step in container on $(hostname) ckpt=$SLURM_CHECKPOINT_CONTAINER\"'\n"
            ),
        );
        assert_eq!(c.wait_job(job, Duration::from_secs(60)), "COMPLETED");
        let out = c.read_file("alice", &out_file);
        // The batch script is no container and says nothing; its step does.
        assert!(!out.contains(&format!("{job}.batch")), "{out}");
        assert!(out.contains(&format!("step {job}.0 {PROTECTED}")), "{out}");
        assert!(out.contains(&format!("batch on {node} ckpt=1")), "{out}");
        assert!(out.contains(&format!("step in container on {node} ckpt=1")), "{out}");
    }
}

#[test]
fn salloc_accepts_the_option() {
    let c = cluster();
    let out = c.sh("node1", "alice", "salloc --checkpoint-container -N1 srun sh -c 'echo ckpt=$SLURM_CHECKPOINT_CONTAINER'").ok();
    assert!(out.stdout.contains("ckpt=1"), "{out:#?}");
}

#[test]
fn without_the_option_the_plugin_does_nothing_to_the_job() {
    let c = cluster();
    let out =
        c.sh("node1", "alice", &format!("srun -N2 apptainer -s exec {TEST_SIF} sh -c 'echo \"ckpt=[$SLURM_CHECKPOINT_CONTAINER]\"'")).ok();
    assert_eq!(out.stdout, "ckpt=[]\nckpt=[]\n", "{out:#?}");
    assert!(!out.stderr.contains("checkpoint-container"), "{}", out.stderr);
}

#[test]
fn a_step_that_runs_no_container_says_it_is_not_protected() {
    let c = cluster();
    let out = c.sh("node1", "alice", "srun --checkpoint-container -N1 -n2 hostname").ok();
    assert_eq!(
        out.stderr.matches("runs hostname, not an Apptainer container: it will start over if the job is requeued").count(),
        1,
        "{out:#?}"
    );
    assert!(!out.stderr.contains("protected ("), "{out:#?}");
}
