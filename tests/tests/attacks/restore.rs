//! Restore trusts nothing the user could have shaped: not even the sealed
//! images, which only root writes. A checkpoint whose core images would
//! bring a thread back as root, or with capabilities, is refused before
//! anything starts, even when its manifest vouches for the tampered file.

use checkpoint_container::core_images::{decode_core, decode_pstree};
use checkpoint_container::manifest::{Manifest, FILE_NAME};
use cluster_tests::{cluster, WorkloadSpec};
use std::path::Path;

/// Replaces a field (number, wire type, value) with other bytes, or keeps it.
type FieldEdit<'a> = dyn FnMut(u32, u8, &[u8]) -> Option<Vec<u8>> + 'a;

fn varint(b: &[u8], at: &mut usize) -> u64 {
    let mut v = 0;
    for shift in (0..64).step_by(7) {
        let byte = b[*at];
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            break;
        }
    }
    v
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// One encoded protobuf field: a varint (wire type 0) or length-delimited
/// bytes (wire type 2).
fn varint_field(n: u32, v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    put_varint(&mut out, u64::from(n) << 3);
    put_varint(&mut out, v);
    out
}

fn bytes_field(n: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_varint(&mut out, u64::from(n) << 3 | 2);
    put_varint(&mut out, payload.len() as u64);
    out.extend_from_slice(payload);
    out
}

/// Copies a protobuf message field by field; `edit` may replace a field
/// (number, wire type, value: the varint's bytes or the delimited payload)
/// with other encoded bytes. Everything else stays byte for byte.
fn map_fields(msg: &[u8], edit: &mut FieldEdit<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < msg.len() {
        let start = at;
        let key = varint(msg, &mut at);
        let (n, wire) = ((key >> 3) as u32, (key & 7) as u8);
        let value = match wire {
            0 => {
                let s = at;
                varint(msg, &mut at);
                &msg[s..at]
            }
            1 => {
                at += 8;
                &msg[at - 8..at]
            }
            2 => {
                let len = varint(msg, &mut at) as usize;
                at += len;
                &msg[at - len..at]
            }
            5 => {
                at += 4;
                &msg[at - 4..at]
            }
            w => panic!("wire type {w} in a CRIU image"),
        };
        match edit(n, wire, value) {
            Some(replacement) => out.extend(replacement),
            None => out.extend_from_slice(&msg[start..at]),
        }
    }
    out
}

/// Rewrites the `creds_entry` of a core image (core_entry.thread_core = 5,
/// thread_core_entry.creds = 10), keeping every other byte: registers,
/// signals and all stay CRIU's.
fn edit_creds(image: &[u8], edit: &mut FieldEdit<'_>) -> Vec<u8> {
    let size = u32::from_le_bytes(image[8..12].try_into().unwrap()) as usize;
    assert_eq!(image.len(), 12 + size, "one entry after the two magics");
    let entry = map_fields(&image[12..], &mut |n, wire, thread_core| {
        (n == 5 && wire == 2).then(|| {
            bytes_field(
                5,
                &map_fields(thread_core, &mut |n, wire, creds| (n == 10 && wire == 2).then(|| bytes_field(10, &map_fields(creds, edit)))),
            )
        })
    });
    let mut out = image[..8].to_vec();
    out.extend((entry.len() as u32).to_le_bytes());
    out.extend(entry);
    out
}

/// Replaces one image of a sealed checkpoint and makes its manifest vouch
/// for the new bytes (size and checksum), as only root could: the storage
/// checks then pass, and only the credentials check is left to catch it.
/// Returns what to put back.
fn tamper(dir: &Path, name: &str, bytes: &[u8]) -> (Vec<u8>, String) {
    let (image, manifest) = (dir.join(name), dir.join(FILE_NAME));
    let original = (std::fs::read(&image).unwrap(), std::fs::read_to_string(&manifest).unwrap());
    std::fs::write(&image, bytes).unwrap();
    let mut m = Manifest::parse(&manifest, &original.1).unwrap();
    let file = m.files.iter_mut().find(|f| f.name == name).unwrap();
    file.size = bytes.len() as u64;
    file.xxh3 = checkpoint_container::storage::checksum(&image).unwrap();
    std::fs::write(&manifest, m.to_toml()).unwrap();
    original
}

fn untamper(dir: &Path, name: &str, original: (Vec<u8>, String)) {
    std::fs::write(dir.join(name), original.0).unwrap();
    std::fs::write(dir.join(FILE_NAME), original.1).unwrap();
}

#[test]
fn restore_refuses_core_images_that_would_raise_a_threads_privileges() {
    let c = cluster();
    // A process with a second thread and a child process (ckpt-workload).
    let w = c.start_workload("node1", WorkloadSpec { mem_mib: 16, steps: 100, interval_ms: 50, ..Default::default() });
    w.wait_steps(3);
    w.checkpoint(c, &["--job-id", "7"]).ok();
    let dir = w.host_checkpoint_dir();
    let tree = decode_pstree(&std::fs::read(dir.join("pstree.img")).unwrap()).unwrap();
    let root = tree.iter().find(|p| p.pid as i32 == w.pid).expect("the workload in pstree.img");
    let thread = *root.threads.iter().find(|&&t| t != root.pid).expect("the workload's second thread");
    let child = tree.iter().find(|p| p.ppid == root.pid).expect("the workload's child").pid;

    let refused = |tampered: &str, expected: &str| {
        let out = w.restore(c, "node1", "--uid 2001 --job-id 7").failed();
        assert!(out.stderr.contains(expected), "{tampered}: {}", out.stderr);
        assert!(out.stderr.contains("refusing to restore it"), "{}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);
        // Refused before anything started: no placeholder container, no
        // process of the workload.
        assert!(w.pids_on(c, "node1").is_empty(), "{tampered}: a refused restore left processes running");
        let placeholders = c.sh("node1", "root", "pgrep -f _checkpoint_container_placeholder").stdout;
        assert_eq!(placeholders, "", "{tampered}: a placeholder container was started");
    };

    // The second thread of the workload would come back with euid 0.
    let name = format!("core-{thread}.img");
    let original = std::fs::read(dir.join(&name)).unwrap();
    let euid_0 = edit_creds(&original, &mut |n, wire, _| (n == 3 && wire == 0).then(|| varint_field(3, 0)));
    let creds = decode_core(&name, &euid_0).unwrap().thread_core.unwrap().creds.unwrap();
    assert_eq!((creds.uid, creds.euid), (2001, 0), "the tampering itself");
    let saved = tamper(&dir, &name, &euid_0);
    refused(
        "euid 0",
        &format!("thread {thread} of process {} (ckpt-workload) would be restored with euid 0, not the owner's uid 2001", root.pid),
    );
    untamper(&dir, &name, saved);

    // The child process would come back with every capability effective.
    let name = format!("core-{child}.img");
    let original = std::fs::read(dir.join(&name)).unwrap();
    let all_caps = edit_creds(&original, &mut |n, wire, _| (n == 11 && wire == 0).then(|| varint_field(11, u64::from(u32::MAX))));
    let creds = decode_core(&name, &all_caps).unwrap().thread_core.unwrap().creds.unwrap();
    assert_eq!(creds.cap_eff, [u32::MAX, u32::MAX], "the tampering itself");
    let saved = tamper(&dir, &name, &all_caps);
    refused("cap_eff", &format!("process {child} (ckpt-workload) would be restored with capabilities (cap_eff ffffffffffffffff)"));
    untamper(&dir, &name, saved);

    // Untampered, the same checkpoint restores and runs to its end.
    let out = w.restore(c, "node1", "--uid 2001 --job-id 7");
    assert!(out.success(), "restore failed: {out:#?}");
    w.assert_finished_correctly();
    w.cleanup(c);
}
