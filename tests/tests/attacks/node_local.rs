//! Node-local files travel with a checkpoint, copied and written back as
//! alice, never by root: swapping a path for a symlink at checkpoint or
//! restore time gets her nothing of bob's or root's, and root writes nowhere.

use cluster_tests::{cluster, unique, Cluster, ShmJob};
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);

fn requeue_after(c: &Cluster, job: &ShmJob, lines: usize) {
    job.job.wait_lines("out.txt", lines);
    c.exec("ctl", "root", &["scontrol", "requeue", &job.job.id.to_string()]).ok();
}

/// Every byte of the job's checkpoint directory (and of anything left
/// beside it), as root on this machine sees it.
fn checkpoint_bytes(c: &Cluster, job: &ShmJob) -> String {
    let dir = c.shared.join("checkpoints");
    let mut all = String::new();
    let mut stack = vec![dir.join(job.job.id.to_string())];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            } else if let Ok(bytes) = std::fs::read(e.path()) {
                all.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
    }
    all
}

#[test]
fn a_mapped_file_swapped_for_a_symlink_while_checkpointed_copies_nothing_of_bobs_or_roots() {
    let c = cluster();
    let token = format!("bob-shm-secret-{}", unique());
    let secret = format!("/dev/shm/bob-{}", unique());
    c.sh("node1", "bob", &format!("umask 077 && echo {token} > {secret}")).ok();
    // Enough memory that the dump takes a while: the swap lands between
    // root listing the files (before CRIU) and copying them (after).
    let job = c.submit_shm_job(&["-w", "node1"], 200, 4096, 256);
    job.job.wait_lines("out.txt", 5);
    let swapper = {
        let shm = job.shm.clone();
        let secret = secret.clone();
        let c = cluster();
        std::thread::spawn(move || {
            // Once CRIU has seized the program (its tracer), alice swaps
            // both of its files for symlinks to bob's and root's secrets.
            let script = format!(
                "for i in $(seq 6000); do p=$(pgrep -u alice -x shmprog); \
                 if [ -n \"$p\" ] && grep -q 'TracerPid:[[:space:]]*[1-9]' /proc/$p/status; then \
                 mv {shm} {shm}.moved && ln -s {secret} {shm} && mv {shm}.fd {shm}.fd.moved && ln -s /etc/shadow {shm}.fd && echo swapped; exit 0; fi; \
                 sleep 0.005; done; echo never seized"
            );
            c.sh("node1", "alice", &script).stdout
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    requeue_after(c, &job, 5);
    assert_eq!(swapper.join().unwrap().trim(), "swapped");
    c.wait_state(job.job.id, &["PENDING"], MINUTE);
    let out = job.job.output();
    assert!(out.contains(&format!("failed: cannot save node-local file {}: a symlink is in its path (not followed)", job.shm)), "{out}");
    let saved = checkpoint_bytes(c, &job);
    assert!(!saved.contains(&token) && !saved.contains("root:"), "bob's or root's secret in the checkpoint");
    assert_eq!(c.sh("node1", "root", &format!("cat {secret}")).ok().stdout.trim(), token, "bob's file unchanged");
    c.exec("ctl", "root", &["scancel", &job.job.id.to_string()]);
    c.sh("node1", "root", &format!("rm -f {secret} {0}.moved {0}.fd.moved", job.shm));
    job.cleanup(c);
}

#[test]
fn a_symlink_placed_at_a_node_local_path_before_restore_makes_root_write_nothing() {
    let c = cluster();
    let job = c.submit_shm_job(&["-w", "node1"], 200, 4096, 16);
    requeue_after(c, &job, 5);
    c.wait_state(job.job.id, &["PENDING"], MINUTE);
    assert!(job.job.output().contains("checkpointed task 0"), "{}", job.job.output());
    // In place of the files the killed run left, alice's symlinks: to a file
    // only root could create, and to bob's file. Only the restore may touch
    // them (a fresh run stops at once). Same node: other tests change
    // alice's groups on node1 only, which a restore elsewhere refuses.
    let marker = format!("/etc/ckpt-marker-{}", unique());
    let bobs = format!("/dev/shm/bob-{}", unique());
    c.sh("node1", "bob", &format!("echo bob > {bobs} && chmod 0644 {bobs}")).ok();
    c.sh("node1", "alice", &format!("rm {0} {0}.fd && ln -s {marker} {0} && ln -s {bobs} {0}.fd", job.shm)).ok();
    job.stop_fresh_starts(c);
    c.release(job.job.id, Some("node1"));
    c.wait_job(job.job.id, 2 * MINUTE);
    let out = job.job.output();
    assert!(out.contains(&format!("cannot recreate node-local file {}: a symlink is in its path (not followed)", job.shm)), "{out}");
    assert!(out.contains("starts fresh after the failed restore"), "{out}");
    assert!(!c.sh("node1", "root", &format!("ls {marker}")).success(), "root created {marker}");
    assert_eq!(c.sh("node1", "root", &format!("cat {bobs}")).ok().stdout, "bob\n", "bob's file unchanged");
    c.sh("node1", "root", &format!("rm -f {bobs}"));
    job.cleanup(c);
}

#[test]
fn another_users_file_at_a_node_local_path_is_not_overwritten_at_restore() {
    let c = cluster();
    let job = c.submit_shm_job(&["-w", "node1"], 200, 4096, 16);
    requeue_after(c, &job, 5);
    c.wait_state(job.job.id, &["PENDING"], MINUTE);
    // Once the killed run's file is gone, bob takes its path, with a file
    // alice may write. Only the restore may touch it (a fresh run stops at
    // once).
    c.sh("node1", "alice", &format!("rm {}", job.shm)).ok();
    c.sh("node1", "bob", &format!("echo bob > {0} && chmod 0666 {0}", job.shm)).ok();
    job.stop_fresh_starts(c);
    c.release(job.job.id, Some("node1"));
    c.wait_job(job.job.id, 2 * MINUTE);
    let out = job.job.output();
    // With fs.protected_regular set, the kernel refuses her the open itself.
    let refused = [": it exists and is not a regular file of uid 2001", ": cannot open it as uid 2001: Permission denied"]
        .iter()
        .any(|why| out.contains(&format!("cannot recreate node-local file {}{why}", job.shm)));
    assert!(refused, "{out}");
    assert_eq!(c.sh("node1", "root", &format!("cat {}", job.shm)).ok().stdout, "bob\n", "bob's file unchanged");
    job.cleanup(c);
}
