//! A protected container sees what the same command sees unprotected: a
//! probe runs in the test SIF both ways, as alice, and the two outputs may
//! differ only in the lines docs/transparency.md lists (so a new difference
//! fails, and so does one that is gone but still documented).

use cluster_tests::{cluster, repo_root, unique, Cluster, TEST_SIF};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// What the container reports about itself, one `== section` at a time.
const PROBE: &str = r#"#!/bin/sh
echo "== env"; env | sort
echo "== id"; id -a
echo "== umask"; umask
echo "== limits"; cat /proc/self/limits
echo "== cwd"; pwd
echo "== home"; echo "HOME=$HOME"; stat -c "%A %u %g %n" "$HOME"
echo "== home-content"; ls -a "$HOME/$PROBE_DIR"
echo "== status"; grep -E '^(Cpus_allowed_list|Mems_allowed_list|Groups|NoNewPrivs|Seccomp|Cap...):' /proc/self/status
echo "== cgroup"; cat /proc/self/cgroup
echo "== sys-fs-cgroup"; ls /sys/fs/cgroup
echo "== hostname"; hostname
echo "== mounts"; awk '{ for (i = 7; $i != "-"; i++); print $5, $(i + 1) }' /proc/self/mountinfo | sort
echo "== uid_map"; cat /proc/self/uid_map
echo "== pid1"; cat /proc/1/comm
echo "== net"; ls /sys/class/net
echo "== sched"; nice; cat /proc/self/oom_score_adj
"#;

/// Variables whose values belong to one job or step, not to how it ran.
const PER_RUN: &[&str] = &[
    "SLURM_JOB_ID",
    "SLURM_JOBID",
    "SLURM_JOB_SLUID",
    "SLURM_JOB_START_TIME",
    "SLURM_JOB_END_TIME",
    "SLURM_STEP_ID",
    "SLURM_STEPID",
    "SLURM_SRUN_COMM_PORT",
    "SLURM_STEP_LAUNCHER_PORT",
    "SLURM_TASK_PID",
    "SLURM_JOB_NAME",
];

/// Slurm's record of `#SBATCH --checkpoint-container`: only a job that
/// asked for it with sbatch shows it.
const SBATCH_OPTION: &str = "env:SLURM_SPANK__SLURM_SPANK_OPTION_checkpoint_container_checkpoint_container";

/// The job script's settings before srun, all different from the node's
/// defaults, so that a container that does not get them shows it.
const SETTINGS: &str = "ulimit -n 777 && ulimit -S -c 1234 && ulimit -S -s 4096 && umask 027";

/// The probe's output as `key → lines`: one key per environment variable
/// (`env:NAME`), one per other section; per-run values masked.
fn parse(output: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in output.lines() {
        if let Some(name) = line.strip_prefix("== ") {
            section = name.to_string();
            out.entry(section.clone()).or_default();
            continue;
        }
        assert!(!section.is_empty(), "probe output starts with {line:?}:\n{output}");
        if section == "env" {
            let (name, value) = line.split_once('=').unwrap_or((line, ""));
            let value = if PER_RUN.contains(&name) { "<per run>" } else { value };
            out.insert(format!("env:{name}"), vec![value.to_string()]);
        } else if section == "status" {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            out.insert(format!("status:{field}"), vec![value.trim().to_string()]);
        } else {
            let masked: String = line
                .split('/')
                .map(|part| match part.split_once('_') {
                    Some(("job" | "step", n)) if n.parse::<u32>().is_ok() => format!("{}_N", part.split('_').next().unwrap()),
                    _ => part.to_string(),
                })
                .collect::<Vec<_>>()
                .join("/");
            out.get_mut(&section).unwrap().push(masked);
        }
    }
    out.remove("env");
    out.remove("status");
    out
}

/// Keys whose lines differ between the two runs, with both sides.
fn differences(unprotected: &str, protected: &str) -> BTreeMap<String, (Vec<String>, Vec<String>)> {
    let (a, b) = (parse(unprotected), parse(protected));
    assert!(a.contains_key("uid_map") && b.contains_key("uid_map"), "probe incomplete:\n{unprotected}\n----\n{protected}");
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| (k.clone(), (a.get(k).cloned().unwrap_or_default(), b.get(k).cloned().unwrap_or_default())))
        .collect()
}

/// The probe keys of the table in docs/transparency.md's "Differences that
/// remain" section: its rows' first cells.
fn documented() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(repo_root().join("docs/transparency.md")).unwrap();
    let start = doc.find("\n## Differences that remain").expect("docs/transparency.md: no \"Differences that remain\" section");
    let section = &doc[start + 1..];
    let section = &section[..section[1..].find("\n## ").map_or(section.len(), |e| e + 1)];
    section.lines().filter_map(|l| l.strip_prefix("| `")?.split_once('`').map(|(key, _)| key.to_string())).collect()
}

/// The soft value of one line of /proc/self/limits in the probe's output.
fn soft_limit<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines().find_map(|l| l.strip_prefix(name)).and_then(|rest| rest.split_whitespace().next()).unwrap_or("")
}

/// `not_shown`: documented keys this run cannot show (the plugin's variable
/// under `--cleanenv`).
#[track_caller]
fn assert_only_documented(what: &str, unprotected: &str, protected: &str, not_shown: &[&str]) {
    let diff = differences(unprotected, protected);
    let found: BTreeSet<String> = diff.keys().cloned().collect();
    let mut documented = documented();
    for key in not_shown {
        assert!(documented.remove(*key), "{key} is not documented");
    }
    assert!(!documented.is_empty(), "docs/transparency.md lists no differences");
    let report: String = diff.iter().map(|(k, (a, b))| format!("{k}:\n  unprotected: {a:?}\n  protected:   {b:?}\n")).collect();
    assert_eq!(
        found, documented,
        "{what}: the differences between an unprotected and a protected run are not the documented ones:\n{report}"
    );
}

/// A fresh directory in alice's home (visible in both kinds of container)
/// holding the probe; its name as seen from $HOME.
fn probe_dir(c: &Cluster) -> String {
    c.give_alice_a_second_group();
    let name = format!("transp-{}", unique());
    let script = format!("mkdir ~/{name} && cat > ~/{name}/probe.sh <<'PROBE_EOF'\n{PROBE}PROBE_EOF\ntouch ~/{name}/marker");
    c.sh("node1", "alice", &script).ok();
    name
}

fn cleanup(c: &Cluster, name: &str) {
    c.sh("node1", "alice", &format!("rm -rf ~/{name}"));
}

/// Runs `apptainer -s exec OPTIONS SIF sh /probe/probe.sh` (the probe's
/// directory bound at /probe) with srun, without and with the option;
/// returns both outputs.
fn srun_probe(c: &Cluster, name: &str, apptainer_opts: &str, home_shown: bool) -> (String, String) {
    let run = |option: &str| {
        let out = c
            .sh(
                "node1",
                "alice",
                &format!(
                    "cd ~/{name} && {SETTINGS} && PROBE_DIR={name} srun -N1 -n1 -w node1 {option} \
                     apptainer -s exec {apptainer_opts} --bind /home/alice/{name}:/probe {TEST_SIF} sh /probe/probe.sh"
                ),
            )
            .ok();
        out.stdout
    };
    let outputs = (run(""), run("--checkpoint-container"));
    // The settings reached both (otherwise the comparison proves nothing).
    for out in [&outputs.0, &outputs.1] {
        assert!(out.contains("\n0027\n") && soft_limit(out, "Max open files") == "777", "{out}");
        assert_eq!(out.contains("marker"), home_shown, "home content shown or not:\n{out}");
    }
    outputs
}

#[test]
fn srun_with_and_without_the_option_shows_the_container_the_same() {
    let c = cluster();
    let name = probe_dir(c);
    let (unprotected, protected) = srun_probe(c, &name, "", true);
    assert_only_documented("srun", &unprotected, &protected, &[SBATCH_OPTION]);
    // Contained: an empty home of hers (root's Apptainer made it /root).
    let (unprotected, protected) = srun_probe(c, &name, "-c", false);
    assert!(protected.contains("HOME=/home/alice\n") && protected.contains("/home/alice tmpfs\n"), "{protected}");
    assert_only_documented("srun with --contain", &unprotected, &protected, &[SBATCH_OPTION]);
    // A cleaned environment and a bind of her own (Apptainer names its
    // destination in APPTAINER_BIND, and drops USER_PATH with -e).
    let (unprotected, protected) = srun_probe(c, &name, &format!("-e --env PROBE_DIR={name} --bind /tmp:/mnt"), true);
    assert!(protected.contains("APPTAINER_BIND=/mnt,/probe\n") && !protected.contains("SLURM_JOB_ID"), "{protected}");
    assert_only_documented("srun with -e and --bind", &unprotected, &protected, &["env:SLURM_CHECKPOINT_CONTAINER", SBATCH_OPTION]);
    cleanup(c, &name);
}

/// Runs the probe unprotected then protected as two steps of one batch job
/// (`sbatch_opts` in `#SBATCH` lines, `srun_opts` on both sruns); returns
/// both outputs.
fn batch_probe(c: &Cluster, sbatch_opts: &str, srun_opts: &str) -> (String, String) {
    let name = probe_dir(c);
    let srun = |option: &str, out: &str| {
        // Outputs go below out/, which exists before either run.
        format!("PROBE_DIR={name} srun -n1 {srun_opts} {option} apptainer -s exec {TEST_SIF} sh ./probe.sh > out/{out} 2> out/{out}.err")
    };
    let script = format!(
        "#!/bin/bash\n#SBATCH {sbatch_opts} -t 5 -o /dev/null\n\
         cd ~/{name} && mkdir out && {SETTINGS}\n{}\n{}\n",
        srun("", "unprotected.out"),
        srun("--checkpoint-container", "protected.out")
    );
    let job = c.sbatch("alice", &[], &script);
    assert_eq!(c.wait_job(job, Duration::from_secs(120)), "COMPLETED");
    let read = |out: &str| c.read_file("alice", &format!("/home/alice/{name}/out/{out}"));
    let outputs = (read("unprotected.out"), read("protected.out"));
    for out in [&outputs.0, &outputs.1] {
        assert!(out.contains("\n0027\n") && soft_limit(out, "Max stack size") == "4194304", "{out}");
    }
    cleanup(c, &name);
    outputs
}

#[test]
fn a_batch_job_with_resource_options_shows_its_steps_the_same() {
    let c = cluster();
    let (unprotected, protected) = batch_probe(c, "-N1 -n1 --cpus-per-task=2 --mem-per-cpu=1000", "");
    assert!(protected.contains("SLURM_CPUS_PER_TASK=2"), "{protected}");
    assert_only_documented("sbatch", &unprotected, &protected, &[SBATCH_OPTION]);
}

/// A container started right in the batch script (through the runtime
/// shim first on the script's PATH) sees what it sees in a job without the
/// option: the shim is out of its PATH, the agent's socket out of its
/// environment.
#[test]
fn a_container_in_the_batch_script_sees_what_it_sees_without_the_option() {
    let c = cluster();
    let name = probe_dir(c);
    let run = |option: &str, out: &str| {
        let script = format!(
            "#!/bin/bash\n#SBATCH -N1 -n1 -w node1 -t 5 -o /dev/null {option}\n\
             cd ~/{name} && mkdir -p out && {SETTINGS}\n\
             PROBE_DIR={name} apptainer -s exec {TEST_SIF} sh ./probe.sh > out/{out} 2> out/{out}.err\n"
        );
        let job = c.sbatch("alice", &[], &script);
        assert_eq!(c.wait_job(job, Duration::from_secs(120)), "COMPLETED");
        c.read_file("alice", &format!("/home/alice/{name}/out/{out}"))
    };
    let (unprotected, protected) = (run("", "unprotected.out"), run("--checkpoint-container", "protected.out"));
    for out in [&unprotected, &protected] {
        assert!(out.contains("\n0027\n") && soft_limit(out, "Max open files") == "777", "{out}");
    }
    assert!(protected.contains("== pid1\ncheckpoint-cont"), "the container was not protected:\n{protected}");
    assert!(!protected.contains("shim") && !protected.contains("CHECKPOINT_CONTAINER_SOCKET"), "{protected}");
    assert_only_documented("a batch script's container", &unprotected, &protected, &[]);
    cleanup(c, &name);
}

/// With task/affinity (the dev cluster's default, as on production sites)
/// the task is bound to CPU 1 of its two: so must its container be (the
/// agent, forked by slurmstepd before the binding, has both).
#[test]
fn a_task_bound_to_a_cpu_has_its_container_bound_the_same() {
    let c = cluster();
    let (unprotected, protected) = batch_probe(c, "-N1 -n1 -c2", "-c2 --cpu-bind=map_cpu:1");
    for out in [&unprotected, &protected] {
        assert!(out.contains("Cpus_allowed_list:\t1\n"), "{out}");
    }
    assert_only_documented("sbatch with a CPU binding", &unprotected, &protected, &[SBATCH_OPTION]);
}

/// Limits, umask and CPUs of alice's workload processes on `node`, one
/// line each (empty when none runs).
fn workload_view(c: &Cluster, node: &str) -> String {
    let script = "for p in $(pgrep -u alice -f '^/opt/checkpoint-container/bin/ckpt-workload '); do \
                  grep -E '^Max (open files|core file size|stack size)' /proc/$p/limits | tr -s ' '; \
                  grep -E '^(Umask|Cpus_allowed_list|Groups):' /proc/$p/status; done";
    c.sh(node, "root", script).ok().stdout
}

/// The restored program keeps the dumped limits, umask and groups (the
/// first run's task's, the same job script's) and gets this run's CPU
/// binding: the job script binds the first run to CPU 0 and the requeued
/// one to CPU 1.
#[test]
fn a_restored_program_has_the_settings_of_the_job_script_and_the_new_binding() {
    let c = cluster();
    // CRIU, which may not call setgroups(2), must restore her second group
    // (it hung restores).
    c.give_alice_a_second_group();
    let line = format!("{SETTINGS} && srun -c2 --cpu-bind=map_cpu:$((${{SLURM_RESTART_COUNT:-0}} % 2)) {{W}} --out /data/out.txt");
    let job = c.submit_workload_job(&["-w", "node1", "-c2"], &[&line], 64, 80);
    job.wait_lines("out.txt", 5);
    let before = workload_view(c, "node1");
    assert!(before.contains("Max open files 777 ") && before.contains("Umask:\t0027"), "{before}");
    assert!(before.contains("Cpus_allowed_list:\t0\n") && !before.contains("Cpus_allowed_list:\t1"), "{before}");
    assert!(before.contains("Groups:\t2001 3001"), "{before}");
    c.exec("ctl", "root", &["scontrol", "requeue", &job.id.to_string()]).ok();
    c.wait_state(job.id, &["PENDING"], Duration::from_secs(60));
    c.release(job.id, None);
    c.wait_state(job.id, &["RUNNING"], Duration::from_secs(60));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !job.output().contains("checkpoint-container: restored process") {
        assert!(std::time::Instant::now() < deadline, "no restore:\n{}", job.output());
        std::thread::sleep(Duration::from_millis(200));
    }
    // The agent binds the restored processes once the restore reports back,
    // just after that line.
    let rebound = before.replace("Cpus_allowed_list:\t0\n", "Cpus_allowed_list:\t1\n");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut after = workload_view(c, "node1");
    while after != rebound && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        after = workload_view(c, "node1");
    }
    assert_eq!(after, rebound, "after the restore; job output:\n{}", job.output());
    assert_eq!(c.wait_job(job.id, Duration::from_secs(120)), "COMPLETED", "{}", job.output());
    job.assert_continued("out.txt");
    job.cleanup(c);
}
