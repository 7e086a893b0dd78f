//! The credentials CRIU will give the restored threads, read from the
//! checkpoint's own images before anything is started.
//!
//! CRIU restores every thread with the uids, gids, groups and capabilities
//! its `core-TID.img` names (`thread_core.creds`). Those images are written
//! by root and checked against the manifest, but restore trusts nothing a
//! user could have shaped: whatever they say, the restored tree must get
//! exactly the checkpoint owner's ids, none of root's groups and no
//! capabilities. This module reads what CRIU will read — `pstree.img` for
//! the processes and their threads, then the core image of each thread —
//! and refuses the restore otherwise.
//!
//! Image layout (CRIU 4.2.1, checked on images of this cluster's CRIU with
//! its own `pycriu` descriptors): two little-endian u32 magics (the common
//! one, then the image's), then entries, each a little-endian u32 size and
//! that many bytes of protobuf. A core image holds one `core_entry`;
//! `pstree.img` one `pstree_entry` per process.
//!
//! How CRIU picks the credentials (criu/cr-restore.c, `rst_prep_creds`,
//! `restore_one_task`): a process whose core says it is dead (a zombie) is
//! restored without credentials; for any other, each thread listed in
//! pstree gets the `creds` of its own core image; a leader core without
//! `thread_core` keeps CRIU's own credentials and one without `creds` makes
//! CRIU read a `creds-PID.img` instead (formats older than CRIU 2). Both are
//! refused here: CRIU 4 never writes them.

use crate::error::{fail, Context, Result};
use crate::manifest::{Checksum, ImageFile, Manifest};
use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// `IMG_COMMON_MAGIC`, the first u32 of every image but raw ones.
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const CORE_MAGIC: u32 = 0x5505_3847;
const PSTREE_MAGIC: u32 = 0x5027_3030;
/// `TASK_DEAD` (compel's task states): a zombie, restored without creds.
const TASK_DEAD: u32 = 2;
/// Largest image read: a core image is a few KiB (registers, signal state),
/// pstree.img about 12 bytes per process.
pub const MAX_IMAGE_BYTES: u64 = 4 << 20;

pub const PSTREE_IMAGE: &str = "pstree.img";

/// `core_entry` (core.proto), only the fields read here.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CoreEntry {
    #[prost(message, optional, tag = "3")]
    pub tc: Option<TaskCoreEntry>,
    #[prost(message, optional, tag = "5")]
    pub thread_core: Option<ThreadCoreEntry>,
}

/// `task_core_entry`: per process, in the leader's core image.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TaskCoreEntry {
    #[prost(uint32, required, tag = "1")]
    pub task_state: u32,
    #[prost(string, optional, tag = "6")]
    pub comm: Option<String>,
}

/// `thread_core_entry`: per thread.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ThreadCoreEntry {
    #[prost(message, optional, tag = "10")]
    pub creds: Option<CredsEntry>,
    #[prost(string, optional, tag = "13")]
    pub comm: Option<String>,
}

/// `creds_entry` (creds.proto). Capability sets are arrays of 32-bit words,
/// lowest first; repeated fields are proto2's unpacked encoding, as CRIU
/// writes them (prost reads packed ones too, as protobuf-c does).
#[derive(Clone, PartialEq, prost::Message)]
pub struct CredsEntry {
    #[prost(uint32, required, tag = "1")]
    pub uid: u32,
    #[prost(uint32, required, tag = "2")]
    pub gid: u32,
    #[prost(uint32, required, tag = "3")]
    pub euid: u32,
    #[prost(uint32, required, tag = "4")]
    pub egid: u32,
    #[prost(uint32, required, tag = "5")]
    pub suid: u32,
    #[prost(uint32, required, tag = "6")]
    pub sgid: u32,
    #[prost(uint32, required, tag = "7")]
    pub fsuid: u32,
    #[prost(uint32, required, tag = "8")]
    pub fsgid: u32,
    #[prost(uint32, repeated, packed = "false", tag = "9")]
    pub cap_inh: Vec<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "10")]
    pub cap_prm: Vec<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "11")]
    pub cap_eff: Vec<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "12")]
    pub cap_bnd: Vec<u32>,
    #[prost(uint32, required, tag = "13")]
    pub secbits: u32,
    #[prost(uint32, repeated, packed = "false", tag = "14")]
    pub groups: Vec<u32>,
    #[prost(uint32, optional, tag = "18")]
    pub no_new_privs: Option<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "19")]
    pub cap_amb: Vec<u32>,
}

/// `pstree_entry` (pstree.proto): a process and its threads.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PstreeEntry {
    #[prost(uint32, required, tag = "1")]
    pub pid: u32,
    #[prost(uint32, required, tag = "2")]
    pub ppid: u32,
    #[prost(uint32, required, tag = "3")]
    pub pgid: u32,
    #[prost(uint32, required, tag = "4")]
    pub sid: u32,
    #[prost(uint32, repeated, packed = "false", tag = "5")]
    pub threads: Vec<u32>,
}

/// The ids a restored thread may have: the checkpoint owner's.
#[derive(Debug, Clone)]
struct Allowed {
    uid: u32,
    gid: u32,
    /// The owner's gid and the groups this node gives the owner.
    groups: BTreeSet<u32>,
}

/// The groups this node gives `uid`: `getgrouplist` of its passwd entry.
pub fn groups_of(uid: u32) -> std::result::Result<BTreeSet<u32>, String> {
    let user = nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .ok_or_else(|| format!("uid {uid}, the checkpoint's owner, has no passwd entry on this node"))?;
    let name = std::ffi::CString::new(user.name.as_bytes()).map_err(|e| format!("user name of uid {uid}: {e}"))?;
    let list = nix::unistd::getgrouplist(&name, user.gid).map_err(|e| format!("cannot list the groups of {}: {e}", user.name))?;
    Ok(list.into_iter().map(|g| g.as_raw()).collect())
}

/// Splits an image into its entries, after checking its two magics.
fn entries<'a>(name: &str, bytes: &'a [u8], magic: u32) -> std::result::Result<Vec<&'a [u8]>, String> {
    let u32_at = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    if u32_at(0) != Some(IMG_COMMON_MAGIC) || u32_at(4) != Some(magic) {
        return Err(format!("{name} is not a CRIU image of the expected kind (bad magic)"));
    }
    let mut at = 8;
    let mut out = Vec::new();
    while at < bytes.len() {
        let size = u32_at(at).ok_or_else(|| format!("{name} is truncated (partial entry size at byte {at})"))? as usize;
        let entry = bytes.get(at + 4..at + 4 + size).ok_or_else(|| format!("{name} is truncated (entry at byte {at})"))?;
        out.push(entry);
        at += 4 + size;
    }
    Ok(out)
}

/// Decodes a core image: exactly one `core_entry`.
pub fn decode_core(name: &str, bytes: &[u8]) -> std::result::Result<CoreEntry, String> {
    use prost::Message;
    match entries(name, bytes, CORE_MAGIC)?[..] {
        [entry] => CoreEntry::decode(entry).map_err(|e| format!("{name} is garbled: {e}")),
        [] => Err(format!("{name} holds no entry")),
        _ => Err(format!("{name} holds more than one entry")),
    }
}

/// Decodes pstree.img: one `pstree_entry` per process.
pub fn decode_pstree(bytes: &[u8]) -> std::result::Result<Vec<PstreeEntry>, String> {
    use prost::Message;
    let name = PSTREE_IMAGE;
    let list: Vec<PstreeEntry> = entries(name, bytes, PSTREE_MAGIC)?
        .into_iter()
        .map(|e| PstreeEntry::decode(e).map_err(|e| format!("{name} is garbled: {e}")))
        .collect::<std::result::Result<_, _>>()?;
    if list.is_empty() {
        return Err(format!("{name} lists no process"));
    }
    Ok(list)
}

/// Reads an image of a sealed checkpoint into memory, as root: a plain
/// root-owned file (no symlink, no fifo), of the size and checksum the
/// manifest records, stored uncompressed. What is decoded afterwards is
/// exactly the bytes checked here.
fn read_verified(dir: &Path, f: &ImageFile) -> Result<Vec<u8>> {
    let path = dir.join(&f.name);
    if f.name.contains('/') {
        return fail(format!("checkpoint {}: bad image name {:?}", dir.display(), f.name));
    }
    if f.zstd {
        return fail(format!("checkpoint {}: {} is stored compressed, which only page images may be", dir.display(), f.name));
    }
    if f.size > MAX_IMAGE_BYTES {
        return fail(format!("checkpoint {}: {} is {} bytes, more than a CRIU image of its kind can be", dir.display(), f.name, f.size));
    }
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)
        .context(|| format!("cannot open {}", path.display()))?;
    let meta = file.metadata().context(|| format!("cannot stat {}", path.display()))?;
    if !meta.is_file() || meta.uid() != 0 {
        return fail(format!("checkpoint {}: {} is not a root-owned file", dir.display(), f.name));
    }
    let mut bytes = Vec::with_capacity(f.size as usize);
    (&file).take(MAX_IMAGE_BYTES + 1).read_to_end(&mut bytes).context(|| format!("cannot read {}", path.display()))?;
    let mut sum = Checksum::default();
    sum.update(&bytes);
    if bytes.len() as u64 != f.size || sum.hex() != f.xxh3 {
        return Err(crate::error::EngineError::Damaged(format!(
            "checkpoint {} is damaged: checksum of {} does not match the manifest",
            dir.display(),
            f.name
        )));
    }
    Ok(bytes)
}

/// What the check needs of a checkpoint's images: pstree and the core image
/// of every thread, by name.
pub struct Images {
    pub pstree: Vec<u8>,
    pub cores: std::collections::BTreeMap<u32, Vec<u8>>,
}

impl Images {
    /// Every core image, decoded, by thread id.
    fn decode_cores(&self) -> std::result::Result<std::collections::BTreeMap<u32, CoreEntry>, String> {
        self.cores.iter().map(|(&tid, bytes)| Ok((tid, decode_core(&format!("core-{tid}.img"), bytes)?))).collect()
    }
}

/// Reads pstree.img and every core image the manifest lists.
fn read_images(dir: &Path, files: &[ImageFile]) -> Result<Images> {
    let Some(pstree) = files.iter().find(|f| f.name == PSTREE_IMAGE) else {
        return fail(format!("checkpoint {} has no {PSTREE_IMAGE}", dir.display()));
    };
    let pstree = read_verified(dir, pstree)?;
    let mut cores = std::collections::BTreeMap::new();
    for f in files {
        let Some(tid) = f.name.strip_prefix("core-").and_then(|r| r.strip_suffix(".img")) else { continue };
        // CRIU names them core-%d.img: a decimal, no sign or padding.
        match tid.parse::<u32>() {
            Ok(t) if t.to_string() == tid => {
                cores.insert(t, read_verified(dir, f)?);
            }
            _ => return fail(format!("checkpoint {} holds {}, not a core image name CRIU writes", dir.display(), f.name)),
        }
    }
    Ok(Images { pstree, cores })
}

fn caps_hex(words: &[u32]) -> String {
    words.iter().rev().map(|w| format!("{w:08x}")).collect::<Vec<_>>().concat()
}

/// A thread's name as the image gives it, safe to print on one line.
fn shown(comm: Option<&str>) -> String {
    comm.map(|c| format!(" ({})", c.chars().take(16).collect::<String>().escape_debug())).unwrap_or_default()
}

/// Whether the core images say `pid` is a zombie: CRIU restores it as a
/// process that only exits, without threads (its pstree entry's thread ids
/// are not meaningful: seen as 469011808 for a pid of 356).
fn is_zombie(pid: u32, cores: &std::collections::BTreeMap<u32, CoreEntry>) -> bool {
    cores.get(&pid).and_then(|c| c.tc.as_ref()).is_some_and(|tc| tc.task_state == TASK_DEAD)
}

/// The ids a process of the tree is restored with: its pid, and its
/// threads' unless it is a zombie.
fn restored_ids(p: &PstreeEntry, cores: &std::collections::BTreeMap<u32, CoreEntry>) -> Vec<u32> {
    if is_zombie(p.pid, cores) {
        return vec![p.pid];
    }
    std::iter::once(p.pid).chain(p.threads.iter().copied()).collect()
}

/// Checks the credentials of one thread against the owner's.
fn check_creds(who: &str, c: &CredsEntry, allowed: &Allowed) -> std::result::Result<(), String> {
    let uids = [("uid", c.uid), ("euid", c.euid), ("suid", c.suid), ("fsuid", c.fsuid)];
    for (field, v) in uids {
        if v != allowed.uid {
            return Err(format!("{who} would be restored with {field} {v}, not the owner's uid {}", allowed.uid));
        }
    }
    let gids = [("gid", c.gid), ("egid", c.egid), ("sgid", c.sgid), ("fsgid", c.fsgid)];
    for (field, v) in gids {
        if v != allowed.gid {
            return Err(format!("{who} would be restored with {field} {v}, not the owner's gid {}", allowed.gid));
        }
    }
    if let Some(g) = c.groups.iter().find(|g| !allowed.groups.contains(g)) {
        return Err(format!("{who} would be restored in group {g}, which uid {} is not a member of on this node", allowed.uid));
    }
    let sets = [("cap_eff", &c.cap_eff), ("cap_prm", &c.cap_prm), ("cap_inh", &c.cap_inh), ("cap_amb", &c.cap_amb)];
    for (field, words) in sets {
        if words.iter().any(|&w| w != 0) {
            return Err(format!("{who} would be restored with capabilities ({field} {})", caps_hex(words)));
        }
    }
    Ok(())
}

/// The check on decoded images: every thread CRIU will restore has a core
/// image whose credentials are the owner's, no more. `owner_groups` gives
/// the owner's groups on this node (`groups_of`), asked only if some thread
/// has supplementary groups at all.
pub fn check_images(
    images: &Images,
    owner_uid: u32,
    owner_gid: u32,
    owner_groups: impl FnOnce() -> std::result::Result<BTreeSet<u32>, String>,
) -> std::result::Result<(), String> {
    let tree = decode_pstree(&images.pstree)?;
    let cores = images.decode_cores()?;
    let mut listed = BTreeSet::new();
    for p in &tree {
        for tid in restored_ids(p, &cores) {
            if !cores.contains_key(&tid) {
                return Err(format!("process {} has no core image for thread {tid}", p.pid));
            }
            listed.insert(tid);
        }
    }
    if let Some(tid) = cores.keys().find(|t| !listed.contains(t)) {
        return Err(format!("core-{tid}.img is not a thread of the checkpointed tree"));
    }
    let need_groups = cores.values().filter_map(|c| c.thread_core.as_ref()?.creds.as_ref()).any(|c| !c.groups.is_empty());
    let mut groups = BTreeSet::from([owner_gid]);
    if need_groups {
        groups.extend(owner_groups()?);
    }
    let allowed = Allowed { uid: owner_uid, gid: owner_gid, groups };
    for p in &tree {
        let leader = &cores[&p.pid];
        let Some(tc) = &leader.tc else {
            return Err(format!("process {} has no task state in core-{}.img", p.pid, p.pid));
        };
        // A zombie: CRIU restores it without credentials (it only exits).
        if tc.task_state == TASK_DEAD {
            continue;
        }
        for tid in restored_ids(p, &cores) {
            let core = &cores[&tid];
            let comm = core.thread_core.as_ref().and_then(|t| t.comm.as_deref()).or(tc.comm.as_deref());
            let who = if tid == p.pid {
                format!("process {}{}", p.pid, shown(comm))
            } else {
                format!("thread {tid} of process {}{}", p.pid, shown(comm))
            };
            let Some(creds) = core.thread_core.as_ref().and_then(|t| t.creds.as_ref()) else {
                return Err(format!("{who} has no credentials in core-{tid}.img (an image format CRIU 4 does not write)"));
            };
            check_creds(&who, creds, &allowed)?;
        }
    }
    Ok(())
}

/// Refuses a checkpoint whose core images would restore any thread with
/// other ids than its owner's, foreign groups, or capabilities. `dir` has
/// passed `storage::open_checkpoint` (root-only, exactly the listed files).
pub fn check(dir: &Path, m: &Manifest) -> Result<()> {
    let images = read_images(dir, &m.files)?;
    check_images(&images, m.owner.uid, m.owner.gid, || groups_of(m.owner.uid))
        .map_err(|why| crate::error::EngineError::Refused(format!("checkpoint {}: {why}: refusing to restore it", dir.display())))
}

/// Every id the dumped tree is restored with (pids and thread ids as the
/// container's PID namespace numbers them), read from the images just
/// written: the tree CRIU froze, including a child forked after the caller
/// last listed the tree.
pub fn dumped_ids(dir: &Path, files: &[ImageFile]) -> Result<Vec<i32>> {
    let images = read_images(dir, files)?;
    let tree = decode_pstree(&images.pstree).or_else(fail)?;
    let cores = images.decode_cores().or_else(fail)?;
    let mut ids: Vec<i32> = tree.iter().flat_map(|p| restored_ids(p, &cores)).map(|id| id as i32).collect();
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// The supplementary groups the checkpoint's root process is restored with
/// (after [`check`]: they are among the owner's). CRIU runs with exactly
/// these, so it never calls setgroups(2), which it may not.
pub fn restored_groups(dir: &Path, m: &Manifest) -> Result<Vec<u32>> {
    let images = read_images(dir, &m.files)?;
    let tree = decode_pstree(&images.pstree).or_else(fail)?;
    let root = tree.first().map(|p| p.pid).ok_or_else(|| crate::error::EngineError::Failed("empty process tree".into()))?;
    let core = images.cores.get(&root).map(|b| decode_core(&format!("core-{root}.img"), b)).transpose().or_else(fail)?;
    Ok(core.and_then(|c| c.thread_core?.creds).map(|c| c.groups).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    const OWNER: u32 = 2001;

    fn framed(magic: u32, entries: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(IMG_COMMON_MAGIC.to_le_bytes());
        out.extend(magic.to_le_bytes());
        for e in entries {
            out.extend((e.len() as u32).to_le_bytes());
            out.extend(e);
        }
        out
    }

    fn clean_creds() -> CredsEntry {
        CredsEntry {
            uid: OWNER,
            gid: OWNER,
            euid: OWNER,
            egid: OWNER,
            suid: OWNER,
            sgid: OWNER,
            fsuid: OWNER,
            fsgid: OWNER,
            cap_inh: vec![0, 0],
            cap_prm: vec![0, 0],
            cap_eff: vec![0, 0],
            cap_bnd: vec![0xffff_ffff, 0x1ff],
            secbits: 0,
            groups: vec![],
            no_new_privs: Some(1),
            cap_amb: vec![0, 0],
        }
    }

    fn core(leader: bool, creds: Option<CredsEntry>) -> Vec<u8> {
        let entry = CoreEntry {
            tc: leader.then(|| TaskCoreEntry { task_state: 1, comm: Some("sim".into()) }),
            thread_core: Some(ThreadCoreEntry { creds, comm: Some("sim".into()) }),
        };
        framed(CORE_MAGIC, &[entry.encode_to_vec()])
    }

    fn pstree(procs: &[(u32, &[u32])]) -> Vec<u8> {
        let entries: Vec<Vec<u8>> = procs
            .iter()
            .map(|&(pid, threads)| PstreeEntry { pid, ppid: 0, pgid: pid, sid: pid, threads: threads.to_vec() }.encode_to_vec())
            .collect();
        framed(PSTREE_MAGIC, &entries)
    }

    /// Process 10 with threads 10 and 11, its child 12: every thread clean
    /// but `tid`, whose credentials `edit` changes.
    fn tree_with(tid: u32, edit: impl FnOnce(&mut CredsEntry)) -> Images {
        let mut cores = std::collections::BTreeMap::new();
        let mut edit = Some(edit);
        for (t, leader) in [(10, true), (11, false), (12, true)] {
            let mut c = clean_creds();
            if t == tid {
                (edit.take().unwrap())(&mut c);
            }
            cores.insert(t, core(leader, Some(c)));
        }
        Images { pstree: pstree(&[(10, &[10, 11]), (12, &[12])]), cores }
    }

    /// The owner's groups on the node, as the tests' passwd would say.
    fn owner_groups() -> std::result::Result<BTreeSet<u32>, String> {
        Ok(BTreeSet::from([OWNER, 3000]))
    }

    fn accepted(images: &Images) {
        check_images(images, OWNER, OWNER, owner_groups).unwrap()
    }

    fn refused(images: &Images) -> String {
        check_images(images, OWNER, OWNER, owner_groups).expect_err("must be refused")
    }

    #[test]
    fn clean_tree_is_accepted() {
        accepted(&tree_with(0, |_| {}));
    }

    /// A zombie's pstree entry lists a meaningless thread id and no core
    /// image for it (CRIU 4.2.1, a shell's exited child): not a thread.
    #[test]
    fn a_zombies_thread_ids_are_not_threads() {
        let mut images = tree_with(0, |_| {});
        let zombie = CoreEntry { tc: Some(TaskCoreEntry { task_state: TASK_DEAD, comm: None }), thread_core: None };
        images.cores.insert(13, framed(CORE_MAGIC, &[zombie.encode_to_vec()]));
        images.pstree = pstree(&[(10, &[10, 11]), (12, &[12]), (13, &[469011808])]);
        accepted(&images);
        images.cores.insert(13, core(true, Some(clean_creds())));
        assert_eq!(refused(&images), "process 13 has no core image for thread 469011808");
    }

    #[test]
    fn root_ids_are_refused_in_any_thread() {
        let why = refused(&tree_with(11, |c| c.euid = 0));
        assert_eq!(why, "thread 11 of process 10 (sim) would be restored with euid 0, not the owner's uid 2001");
        assert!(refused(&tree_with(10, |c| c.uid = 0)).starts_with("process 10 (sim) would be restored with uid 0"));
        assert!(refused(&tree_with(12, |c| c.fsuid = 0)).contains("fsuid 0"));
        assert!(refused(&tree_with(12, |c| c.suid = 2002)).contains("suid 2002"));
        assert!(refused(&tree_with(10, |c| c.sgid = 0)).contains("sgid 0, not the owner's gid 2001"));
        assert!(refused(&tree_with(11, |c| c.fsgid = 0)).contains("fsgid 0"));
    }

    #[test]
    fn capabilities_are_refused() {
        let why = refused(&tree_with(12, |c| c.cap_eff = vec![u32::MAX, u32::MAX]));
        assert_eq!(why, "process 12 (sim) would be restored with capabilities (cap_eff ffffffffffffffff)");
        assert!(refused(&tree_with(11, |c| c.cap_prm = vec![0, 1])).contains("cap_prm 0000000100000000"));
        assert!(refused(&tree_with(10, |c| c.cap_inh = vec![1 << 21])).contains("cap_inh"));
        assert!(refused(&tree_with(10, |c| c.cap_amb = vec![0, 0, 4])).contains("cap_amb"));
        // The bounding set only limits what could be gained: left as dumped.
        accepted(&tree_with(10, |c| c.cap_bnd = vec![u32::MAX, u32::MAX]));
    }

    #[test]
    fn foreign_groups_are_refused() {
        let why = refused(&tree_with(11, |c| c.groups = vec![OWNER, 0]));
        assert_eq!(why, "thread 11 of process 10 (sim) would be restored in group 0, which uid 2001 is not a member of on this node");
        accepted(&tree_with(11, |c| c.groups = vec![OWNER, 3000]));
        // The owner's gid is always theirs, whatever passwd says.
        let no_passwd = || Err("no passwd entry".to_string());
        check_images(&tree_with(11, |c| c.groups = vec![]), OWNER, OWNER, no_passwd).unwrap();
        assert_eq!(check_images(&tree_with(11, |c| c.groups = vec![OWNER]), OWNER, OWNER, no_passwd).unwrap_err(), "no passwd entry");
    }

    #[test]
    fn the_owners_groups_come_from_this_nodes_passwd() {
        assert!(groups_of(0).unwrap().contains(&0), "root is in its own group");
        let why = groups_of(4_000_000).unwrap_err();
        assert_eq!(why, "uid 4000000, the checkpoint's owner, has no passwd entry on this node");
    }

    #[test]
    fn missing_core_images_and_credentials_are_refused() {
        let mut images = tree_with(0, |_| {});
        images.cores.remove(&11);
        assert_eq!(refused(&images), "process 10 has no core image for thread 11");

        let mut images = tree_with(0, |_| {});
        images.cores.insert(11, core(false, None));
        assert!(refused(&images).starts_with("thread 11 of process 10 (sim) has no credentials in core-11.img"));

        let mut images = tree_with(0, |_| {});
        images.cores.insert(99, core(true, Some(clean_creds())));
        assert_eq!(refused(&images), "core-99.img is not a thread of the checkpointed tree");

        // A leader without task state: CRIU cannot tell what to restore.
        let mut images = tree_with(0, |_| {});
        let no_tc = CoreEntry { tc: None, thread_core: Some(ThreadCoreEntry { creds: Some(clean_creds()), comm: None }) };
        images.cores.insert(12, framed(CORE_MAGIC, &[no_tc.encode_to_vec()]));
        assert_eq!(refused(&images), "process 12 has no task state in core-12.img");
    }

    #[test]
    fn a_zombie_needs_no_credentials() {
        let mut images = tree_with(0, |_| {});
        let zombie = CoreEntry { tc: Some(TaskCoreEntry { task_state: TASK_DEAD, comm: None }), thread_core: None };
        images.cores.insert(12, framed(CORE_MAGIC, &[zombie.encode_to_vec()]));
        accepted(&images);
    }

    #[test]
    fn truncated_and_garbled_images_are_refused() {
        let good = tree_with(0, |_| {});
        let whole = good.cores[&11].clone();
        for cut in [0, 3, 7, 10, whole.len() - 1] {
            let mut images = tree_with(0, |_| {});
            images.cores.insert(11, whole[..cut].to_vec());
            let why = refused(&images);
            assert!(why.contains("core-11.img"), "cut at {cut}: {why}");
        }
        // Bad magic: another image kind.
        let mut images = tree_with(0, |_| {});
        images.cores.insert(11, good.pstree.clone());
        assert_eq!(refused(&images), "core-11.img is not a CRIU image of the expected kind (bad magic)");
        // Garbage protobuf of the right length.
        let mut images = tree_with(0, |_| {});
        images.cores.insert(11, framed(CORE_MAGIC, &[vec![0xff; 40]]));
        assert!(refused(&images).starts_with("core-11.img is garbled"));
        // A second entry (CRIU would read only the first).
        let mut images = tree_with(0, |_| {});
        let mut two = whole.clone();
        two.extend_from_slice(&whole[8..]);
        images.cores.insert(11, two);
        assert_eq!(refused(&images), "core-11.img holds more than one entry");
        // Truncated or empty pstree.
        let mut images = tree_with(0, |_| {});
        images.pstree.pop();
        assert!(refused(&images).starts_with("pstree.img is truncated"));
        let mut images = tree_with(0, |_| {});
        images.pstree.truncate(8);
        assert_eq!(refused(&images), "pstree.img lists no process");
    }

    /// Images CRIU 4.2.1 wrote on the dev cluster (a workload of uid 2001:
    /// process 88 with threads 88 and 107, its child 106): the field
    /// numbers above read them as `crit` does.
    #[test]
    fn reads_real_criu_images() {
        let real = |name: &str| std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/criu-4.2.1").join(name)).unwrap();
        let tree = decode_pstree(&real("pstree.img")).unwrap();
        let shape: Vec<(u32, u32, Vec<u32>)> = tree.iter().map(|p| (p.pid, p.ppid, p.threads.clone())).collect();
        assert_eq!(shape, [(88, 0, vec![88, 107]), (106, 88, vec![106])]);
        for tid in [88, 107, 106] {
            let core = decode_core("core", &real(&format!("core-{tid}.img"))).unwrap();
            let tcore = core.thread_core.unwrap();
            assert_eq!(tcore.comm.as_deref(), Some("ckpt-workload"));
            let c = tcore.creds.unwrap();
            assert_eq!([c.uid, c.gid, c.euid, c.egid, c.suid, c.sgid, c.fsuid, c.fsgid], [2001; 8]);
            assert_eq!([&c.cap_inh, &c.cap_prm, &c.cap_eff, &c.cap_bnd, &c.cap_amb], [&vec![0, 0]; 5]);
            assert_eq!((c.secbits, c.no_new_privs, c.groups.len()), (0, Some(1), 0));
            assert_eq!(core.tc.map(|t| t.task_state), (tid != 107).then_some(1));
        }
        let cores = [88, 106, 107].into_iter().map(|t| (t, real(&format!("core-{t}.img")))).collect();
        accepted(&Images { pstree: real("pstree.img"), cores });
        // Re-encoded by our structs, the credentials are byte for byte CRIU's.
        let raw = real("core-107.img");
        let creds = decode_core("core", &raw).unwrap().thread_core.unwrap().creds.unwrap();
        let encoded = creds.encode_to_vec();
        assert!(raw.windows(encoded.len()).any(|w| w == encoded), "CRIU's creds_entry differs from ours");
    }

    #[test]
    fn images_are_read_only_if_they_match_the_manifest() {
        let dir = std::env::temp_dir().join(format!("core-images-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let bytes = core(true, Some(clean_creds()));
        std::fs::write(dir.join("core-5.img"), &bytes).unwrap();
        let mut sum = Checksum::default();
        sum.update(&bytes);
        let entry = ImageFile { name: "core-5.img".into(), size: bytes.len() as u64, xxh3: sum.hex(), zstd: false };
        let root = nix::unistd::geteuid().is_root();
        if root {
            assert_eq!(read_verified(&dir, &entry).unwrap(), bytes);
        }
        let other = ImageFile { xxh3: "00".into(), ..entry.clone() };
        let why = read_verified(&dir, &other).unwrap_err().to_string();
        assert!(why.contains(if root { "checksum of core-5.img does not match" } else { "not a root-owned file" }), "{why}");
        let compressed = ImageFile { zstd: true, ..entry.clone() };
        assert!(read_verified(&dir, &compressed).unwrap_err().to_string().contains("stored compressed"));
        std::os::unix::fs::symlink(dir.join("core-5.img"), dir.join("core-6.img")).unwrap();
        let link = ImageFile { name: "core-6.img".into(), ..entry };
        assert!(read_verified(&dir, &link).unwrap_err().to_string().starts_with("cannot open"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
