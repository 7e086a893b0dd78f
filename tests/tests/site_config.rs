//! Admin mistakes in plugstack.conf and broken nodes: one clear line naming
//! the problem, and a job that asked for checkpointing never runs without it.

use cluster_tests::{cluster, gcc, unique, with_criu, PlugstackOverride};

#[test]
fn unknown_plugstack_argument_refuses_checkpointed_jobs_only() {
    let c = cluster();
    let _guard = PlugstackOverride::new(c, |line| format!("{line} frobnicate=1"));
    let marker = format!("/home/alice/ran-{}", unique());

    let out = c.sh("node1", "alice", &format!("srun --checkpoint-container touch {marker}")).failed();
    assert!(
        out.stderr.contains("checkpoint-container: --checkpoint-container cannot be honoured")
            && out.stderr.contains("\"frobnicate=1\" is unknown"),
        "{}",
        out.stderr
    );
    assert!(!c.sh("node1", "alice", &format!("test -e {marker}")).success(), "the job ran");

    let out = c.sh("node1", "alice", "sbatch --checkpoint-container --wrap true").failed();
    assert!(out.stderr.contains("\"frobnicate=1\" is unknown"), "{}", out.stderr);

    // A job that did not ask for checkpointing still runs, and the slurmd log
    // tells the admin what is wrong.
    let out = c.sh("node1", "alice", "srun -w node2 echo fine").ok();
    assert_eq!(out.stdout, "fine\n");
    let log = c.daemon_log("node2");
    assert!(
        log.lines().any(|l| l.contains("error: checkpoint-container: plugstack.conf argument \"frobnicate=1\" is unknown")),
        "slurmd log has no line naming the argument"
    );
}

#[test]
fn malformed_and_relative_arguments_are_named() {
    let c = cluster();
    for (arg, expected) in [
        ("checkpoint_dir", "argument \"checkpoint_dir\" is malformed"),
        ("criu=criu", "criu=\"criu\" is invalid: it must be an absolute path"),
        ("config=/etc/slurm/missing.toml", "config file /etc/slurm/missing.toml cannot be read"),
    ] {
        let _guard = PlugstackOverride::new(c, |line| match arg.strip_prefix("criu=") {
            Some(criu) => with_criu(line, criu),
            None => format!("{line} {arg}"),
        });
        let out = c.sh("node1", "alice", "srun --checkpoint-container true").failed();
        assert!(out.stderr.contains(expected), "{arg}: {}", out.stderr);
        assert_eq!(
            out.stderr.lines().filter(|l| l.contains("checkpoint-container:")).count(),
            1,
            "{arg}: one line, not a cascade: {}",
            out.stderr
        );
    }
}

#[test]
fn node_without_usable_criu_runs_the_step_unprotected_and_says_why() {
    let c = cluster();
    // An old CRIU, as Debian bookworm ships: the version must be named.
    let fake = c.shared.join(format!("fake-criu-{}", unique()));
    gcc("#include <stdio.h>\nint main(void) { puts(\"Version: 3.17.1\"); return 0; }\n", &fake, &["-static"]);
    let in_node = format!("/shared/{}", fake.file_name().unwrap().to_str().unwrap());
    let marker = format!("/home/alice/ran-{}", unique());
    {
        let _guard = PlugstackOverride::new(c, |line| with_criu(line, &in_node));
        let out = c.sh("node1", "alice", &format!("srun -w node2 --checkpoint-container touch {marker}")).ok();
        assert!(
            out.stderr.contains(&format!(
                "checkpoint-container: warning: this node cannot checkpoint containers: \
                 CRIU at {in_node} is version 3.17.1, but 4.0.0 or newer is required; this step runs without checkpointing"
            )),
            "{}",
            out.stderr
        );
        assert!(c.sh("node1", "alice", &format!("test -e {marker}")).success(), "the task did not run");
        assert!(c
            .daemon_log("node2")
            .contains(&format!("runs without checkpointing: this node cannot checkpoint containers: CRIU at {in_node} is version 3.17.1")));
    }
    std::fs::remove_file(&fake).unwrap();
    let _ = std::fs::remove_file(fake.with_extension("c"));

    let _guard = PlugstackOverride::new(c, |line| with_criu(line, "/usr/sbin/no-criu"));
    let out = c.sh("node1", "alice", "srun --checkpoint-container true").ok();
    assert!(out.stderr.contains("CRIU at /usr/sbin/no-criu cannot be run"), "{}", out.stderr);
}

#[test]
fn helper_that_root_should_not_trust_is_never_run() {
    let c = cluster();
    // A helper in a directory users can write to, owned by a user.
    let helper = format!("/home/alice/helper-{}", unique());
    c.sh("node1", "alice", &format!("cp {} {helper}", cluster_tests::HELPER)).ok();
    {
        let _guard = PlugstackOverride::new(c, |line| cluster_tests::with_arg(line, "helper", &helper));
        let out = c.sh("node1", "alice", &format!("srun --checkpoint-container apptainer -s exec {} true", cluster_tests::TEST_SIF)).ok();
        assert!(out.stderr.contains(&format!("helper {helper} is unusable: not owned by root")), "{}", out.stderr);
        assert!(out.stderr.contains("this step runs without checkpointing"), "{}", out.stderr);
    }
    c.sh("node1", "alice", &format!("rm -f {helper}")).ok();
}
