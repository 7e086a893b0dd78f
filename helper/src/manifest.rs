//! The self-describing record written next to CRIU's images.

use crate::error::{fail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const FILE_NAME: &str = "manifest.toml";
pub const FORMAT: u32 = 2;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub job: JobIds,
    pub owner: Owner,
    pub node: String,
    pub created_unix: u64,
    pub criu_version: String,
    pub container: Container,
    pub process: Process,
    pub stats: Stats,
    pub files: Vec<ImageFile>,
    /// Files on tmpfs the tree mapped or held open, recreated before CRIU
    /// restores (node_local.rs); their content is one of `files`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_local: Vec<NodeLocalFile>,
    /// Directories on tmpfs the tree needs at restore (those of its
    /// node-local files, the ones it holds open, those its UNIX sockets are
    /// bound in: an MPI launcher's session directory), shallowest first;
    /// created as the user when missing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_local_dirs: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeLocalFile {
    /// Where the program saw it, in its container.
    pub path: String,
    /// The entry of `files` holding its content.
    pub data: String,
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Which Slurm job, step and task the checkpoint belongs to (absent when an
/// admin checkpoints a container by hand).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobIds {
    pub job_id: Option<u32>,
    pub step_id: Option<u32>,
    pub task_id: Option<u32>,
    /// Tasks in the step, and the cut: the job's restart count when the
    /// step was checkpointed. A step restores only from checkpoints of one
    /// cut, of all its tasks (step.rs).
    pub step_tasks: Option<u32>,
    pub cut: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Container {
    /// The command that started the container; restore re-runs it with a
    /// placeholder payload.
    pub argv: Vec<String>,
    /// Working directory and environment Apptainer was started with (its
    /// own settings removed): the placeholder is started the same way, so
    /// the container gets the same home, binds and working directory.
    pub cwd: String,
    pub env: Vec<(String, String)>,
    pub image: String,
    pub image_size: u64,
    pub image_blake3: String,
    /// Inode, size, mtime and ctime of the image when dumped: a restore that
    /// finds the same needs not re-digest it (only root can set a ctime).
    #[serde(default)]
    pub image_stamp: String,
    /// The network namespace it ran in: a restore gives it the same kind
    /// (checkpoints older than this field used the node's).
    #[serde(default = "node_network")]
    pub network: ckpt_config::ContainerNetwork,
}

fn node_network() -> ckpt_config::ContainerNetwork {
    ckpt_config::ContainerNetwork::Node
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Process {
    /// Pids as the container's PID namespace numbers them (the node's for
    /// a container started by hand).
    pub root_pid: i32,
    pub comm: String,
    /// Every pid and thread id of the dumped tree: restore needs them free.
    pub pids: Vec<i32>,
    /// What fds 0, 1 and 2 of the root process pointed to.
    pub stdio: Vec<String>,
    /// Slurm's PMI-2 socket as the tree held it (pmi.rs), when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm_pmi: Option<SlurmPmi>,
    /// The ranks of an `srun --mpi=pmi2 -n N` step, when the tree is the
    /// ranks launcher's (agent/ranks.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks: Option<Ranks>,
}

/// A step's ranks in one container: the launcher's status pipe and what
/// each rank's stdio and PMI socket were, as CRIU names them; the restore
/// gives this run's tasks' in their place.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Ranks {
    pub status: String,
    pub ranks: Vec<Rank>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rank {
    /// fds 0, 1 and 2, keyed as `Process::stdio`.
    pub stdio: Vec<String>,
    /// None: the rank had ended, or never talked to Slurm's PMI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm_pmi: Option<SlurmPmi>,
}

/// The tree's end of the PMI relay (`socket:[inode]`) and the PMI version
/// the program's init chose, if it had said it (pmi.rs).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SlurmPmi {
    pub inode: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_version: Option<[u32; 2]>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    pub dump_seconds: f64,
    pub images_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageFile {
    pub name: String,
    /// Bytes as stored, and their checksum.
    pub size: u64,
    pub xxh3: String,
    /// Stored as one zstd stream (page images with `compression = "zstd"`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zstd: bool,
}

/// XXH3-128 of an image file as stored, the checksum the manifest records.
/// It detects damage (truncation, flipped bits, a partial copy) at memory
/// speed; keeping images from being changed on purpose is the job of their
/// ownership (root only), not of a checksum stored next to them.
#[derive(Default)]
pub struct Checksum(xxhash_rust::xxh3::Xxh3);

impl Checksum {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub fn hex(&self) -> String {
        format!("{:032x}", self.0.digest128())
    }
}

impl Manifest {
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("manifest serializes")
    }

    pub fn parse(path: &Path, text: &str) -> Result<Manifest> {
        let m: Manifest = toml::from_str(text).context(|| format!("{} is not a valid manifest", path.display()))?;
        if m.format != FORMAT {
            return fail(format!("{}: manifest format {} is not supported (this helper reads {FORMAT})", path.display(), m.format));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: FORMAT,
            job: JobIds { job_id: Some(7), step_id: Some(0), task_id: Some(1), step_tasks: Some(2), cut: Some(0) },
            owner: Owner { uid: 2001, gid: 2001 },
            node: "node1".into(),
            created_unix: 1,
            criu_version: "4.2.1".into(),
            container: Container {
                argv: vec!["apptainer".into(), "exec".into(), "/x.sif".into(), "sim".into()],
                cwd: "/home/u".into(),
                env: vec![("HOME".into(), "/home/u".into())],
                image: "/x.sif".into(),
                image_size: 3,
                image_blake3: "ab".into(),
                image_stamp: "1:3:4:5".into(),
                network: ckpt_config::ContainerNetwork::Isolated,
            },
            process: Process {
                root_pid: 42,
                comm: "sim".into(),
                pids: vec![42, 43],
                stdio: vec!["/dev/null".into()],
                slurm_pmi: None,
                ranks: None,
            },
            stats: Stats { dump_seconds: 0.5, images_bytes: 10 },
            files: vec![
                ImageFile { name: "core-42.img".into(), size: 10, xxh3: "cd".into(), zstd: false },
                ImageFile { name: "pages-1.img".into(), size: 5, xxh3: "ef".into(), zstd: true },
                ImageFile { name: "node-local-0.data".into(), size: 3, xxh3: "01".into(), zstd: false },
            ],
            node_local: vec![NodeLocalFile {
                path: "/dev/shm/seg".into(),
                data: "node-local-0.data".into(),
                size: 3,
                mode: 0o600,
                uid: 2001,
                gid: 2001,
            }],
            node_local_dirs: vec!["/tmp/ompi.13".into(), "/tmp/ompi.13/1".into()],
        }
    }

    #[test]
    fn round_trips_through_toml() {
        let m = sample();
        assert_eq!(Manifest::parse(Path::new("m"), &m.to_toml()).unwrap(), m);
    }

    #[test]
    fn checkpoints_without_a_network_field_used_the_nodes() {
        let text = sample().to_toml().replace("network = \"isolated\"\n", "");
        assert_eq!(Manifest::parse(Path::new("m"), &text).unwrap().container.network, ckpt_config::ContainerNetwork::Node);
    }

    #[test]
    fn refuses_unknown_fields_and_formats() {
        let text = sample().to_toml().replace(&format!("format = {FORMAT}"), "format = 9");
        assert!(Manifest::parse(Path::new("m"), &text).unwrap_err().to_string().contains("format 9"));
        let text = format!("extra = 1\n{}", sample().to_toml());
        assert!(Manifest::parse(Path::new("m"), &text).is_err());
        assert!(Manifest::parse(Path::new("m"), "garbage").unwrap_err().to_string().starts_with("m is not a valid manifest"));
    }
}
