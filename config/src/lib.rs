//! Site configuration shared by the SPANK plugin and the helper.
//!
//! Admins configure the product in two places, as Slurm admins expect:
//! arguments on the plugin's `plugstack.conf` line, and an optional TOML file
//! (`/etc/slurm/checkpoint-container.toml` unless `config=` names another).
//! Precedence: built-in defaults < TOML file < plugstack.conf arguments.
//!
//! Parsing is strict on purpose: a typo in a site file must not silently turn
//! checkpointing off, so every unknown or malformed entry is an error that
//! names the offending argument.

use serde::Deserialize;
use std::fmt;
use std::path::{Component, Path, PathBuf};

/// Where the admin TOML file is looked for when `config=` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/slurm/checkpoint-container.toml";
/// Where packages install the helper.
pub const DEFAULT_HELPER: &str = "/usr/libexec/checkpoint-container/checkpoint-container";
/// Root of the per-job checkpoint directories (a parallel filesystem in production).
pub const DEFAULT_CHECKPOINT_DIR: &str = "/var/spool/checkpoint-container";
/// The CRIU binary the helper drives: a statically linked one shipped with
/// the helper (a distribution's dynamically linked /usr/sbin/criu is refused,
/// see docs/security.md).
pub const DEFAULT_CRIU: &str = "/usr/libexec/checkpoint-container/criu";
/// The site's Apptainer: the only container runtime the helper ever starts
/// (never the program a job names).
pub const DEFAULT_APPTAINER: &str = "/usr/bin/apptainer";
/// Its configuration, whose setuid-mode rules root-started containers obey.
pub const DEFAULT_APPTAINER_CONF: &str = "/etc/apptainer/apptainer.conf";
/// Bound on the node-local (tmpfs) files one checkpoint carries: far above
/// what programs keep there (Open MPI's shared-memory segment of a node's
/// ranks is a few MiB to some hundreds), far below what a user could make
/// the checkpoint storage absorb by filling /dev/shm (RAM, up to half the
/// node's memory by default).
pub const DEFAULT_NODE_LOCAL_FILES_MAX: u64 = 1 << 30;
/// How many times a job may have been requeued (Slurm's `Restarts`, all
/// causes) and still be requeued before its time limit: Slurm's default
/// `MaxBatchRequeue`, so the plugin never pushes a job into the hold Slurm
/// puts a job in beyond that.
pub const DEFAULT_TIME_LIMIT_MAX_RESTARTS: u32 = 5;
/// The longest lead before a time limit a site or a job may ask for, in
/// minutes (a year): anything larger is a typo.
pub const MAX_LEAD_MINUTES: u32 = 525_600;
/// Shortest interval between periodic checkpoints a job may ask for: each
/// one writes the container's memory to the checkpoint storage.
pub const DEFAULT_CHECKPOINT_INTERVAL_MIN: u64 = 600;
/// The job's environment variable asking for periodic checkpoints every
/// that many seconds (0: none); the plugin takes only a number from it.
pub const INTERVAL_ENV: &str = "CHECKPOINT_CONTAINER_INTERVAL";

/// Which tasks are container commands: the plugin wraps only those, the
/// helper parses them (its `runtime` module).
pub mod runtime {
    /// Programs whose command line is Apptainer's (argv[0]'s last component).
    pub const APPTAINER_PROGRAMS: &[&str] = &["apptainer", "singularity"];

    /// Whether `program` (a path or a name) is a container runtime's.
    pub fn is_container_program(program: &str) -> bool {
        let base = program.rsplit('/').next().unwrap_or(program);
        APPTAINER_PROGRAMS.contains(&base)
    }
}

/// Slurm's step id of a batch script.
pub const BATCH_STEP: u32 = 0xFFFF_FFFB;

/// `JOB.STEP` as Slurm shows it: its special step ids (batch, extern,
/// interactive) are the top of the u32 range and have names.
pub fn step_name(job: u32, step: u32) -> String {
    match step {
        BATCH_STEP => format!("{job}.batch"),
        0xFFFF_FFFC => format!("{job}.extern"),
        0xFFFF_FFFA => format!("{job}.interactive"),
        step => format!("{job}.{step}"),
    }
}

/// The runtime shim: in a protected task that is not itself a container (a
/// batch script, a wrapper script), a directory placed first on its PATH
/// whose `apptainer` and `singularity` are the helper, which hands each
/// container the task's processes start to the task's agent.
pub mod shim {
    use std::path::{Path, PathBuf};

    /// The task's agent socket, for the shim (only a path to connect to:
    /// the agent checks who connects).
    pub const SOCKET_ENV: &str = "CHECKPOINT_CONTAINER_SOCKET";

    /// `shim/` next to the helper: packages install it with the helper,
    /// so one setting (`helper`) names both.
    pub fn dir(helper: &Path) -> PathBuf {
        helper.parent().unwrap_or(Path::new("/")).join("shim")
    }

    /// `path` (a PATH value) without `dir`: what the task would have had.
    pub fn strip(path: &str, dir: &Path) -> String {
        let dir = dir.to_string_lossy();
        path.split(':').filter(|d| *d != dir).collect::<Vec<_>>().join(":")
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn strip_takes_out_every_occurrence_and_nothing_else() {
            let dir = std::path::Path::new("/usr/libexec/checkpoint-container/shim");
            let path = "/usr/libexec/checkpoint-container/shim:/usr/bin:/usr/libexec/checkpoint-container/shim2:/usr/libexec/checkpoint-container/shim";
            assert_eq!(super::strip(path, dir), "/usr/bin:/usr/libexec/checkpoint-container/shim2");
        }
    }
}

/// Where a task's root agent and slurmstepd meet on a node: a root-owned
/// directory (0755, users reach their task's socket in it) holding, per
/// protected task, the agent's socket and its session file. The plugin
/// names both; the agent creates them.
pub mod agent_files {
    pub const DIR: &str = "/run/checkpoint-container";
    /// Suffix of a session file: its agent holds a lock on it while it
    /// serves its task.
    pub const SESSION_SUFFIX: &str = ".session";
    /// What a session file says once its task was told to end (SIGTERM):
    /// the container is being checkpointed or ended.
    pub const ENDING: &str = "ending";

    pub fn socket(job: u32, step: u32, task: u32) -> String {
        format!("{DIR}/{job}.{step}.{task}.sock")
    }

    /// Where the agent of task 0 of an `srun --mpi=pmi2 -n N` step gathers
    /// the other tasks' agents (root only), in run `restart` of the job.
    pub fn ranks(job: u32, step: u32, restart: u32) -> String {
        format!("{DIR}/{job}.{step}.r{restart}.ranks")
    }

    pub fn session(job: u32, step: u32, task: u32) -> String {
        format!("{DIR}/{job}.{step}.{task}{SESSION_SUFFIX}")
    }

    /// A protected task's agent, as its session file shows it.
    #[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
    pub enum Agent {
        Serving,
        Ending,
    }

    /// The agents serving a task on this node whose session file name
    /// starts with `prefix` (`JOB.`: the job's; `JOB.STEP.TASK.`: one
    /// task's): root-owned session files in `dir` that someone holds locked.
    pub fn agents(dir: &Path, prefix: &str) -> Vec<Agent> {
        // Root's directory, which only root can add to (agents create it
        // so: `storage::trusted_dir`), or nothing is read from it.
        let trusted = std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir() && m.uid() == 0 && m.mode() & 0o022 == 0);
        let Some(entries) = std::fs::read_dir(dir).ok().filter(|_| trusted) else { return Vec::new() };
        entries
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(prefix) && n.ends_with(SESSION_SUFFIX)))
            .filter_map(|e| agent(&e.path()))
            .collect()
    }

    fn agent(path: &Path) -> Option<Agent> {
        let file = File::options().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY).open(path).ok()?;
        let meta = file.metadata().ok()?;
        if !meta.is_file() || meta.uid() != 0 {
            return None;
        }
        // SAFETY: flock(2) on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
            return None; // Nobody holds it: that agent is gone.
        }
        let mut state = String::new();
        let _ = (&file).take(64).read_to_string(&mut state);
        Some(if state.trim() == ENDING { Agent::Ending } else { Agent::Serving })
    }

    use std::fs::File;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    use std::path::Path;

    #[cfg(test)]
    mod tests {
        use super::*;

        fn held(path: &Path, state: &str) -> File {
            std::fs::write(path, state).unwrap();
            let f = File::open(path).unwrap();
            // SAFETY: flock(2) on a descriptor we own.
            assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
            f
        }

        #[test]
        fn only_locked_root_session_files_of_the_job_count() {
            let dir = std::env::temp_dir().join(format!("ckpt-agent-files-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let _a = held(&dir.join("7.0.0.session"), "");
            let _b = held(&dir.join("7.1.0.session"), ENDING);
            let _other_job = held(&dir.join("71.0.0.session"), ENDING);
            std::fs::write(dir.join("7.2.0.session"), ENDING).unwrap(); // its agent is gone
            std::fs::write(dir.join("7.0.0.sock"), "").unwrap();
            assert_eq!(agents(&dir, "7.1.0."), if unsafe { libc::getuid() } == 0 { vec![Agent::Ending] } else { vec![] });
            let mut found = agents(&dir, "7.");
            found.sort();
            // SAFETY: getuid(2) cannot fail.
            if unsafe { libc::getuid() } == 0 {
                assert_eq!(found, vec![Agent::Serving, Agent::Ending]);
            } else {
                assert!(found.is_empty(), "files not owned by root are ignored: {found:?}");
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

/// Effective settings after defaults, the TOML file and plugstack.conf
/// arguments are combined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub helper: PathBuf,
    pub checkpoint_dir: PathBuf,
    pub criu: PathBuf,
    pub apptainer: PathBuf,
    pub apptainer_conf: PathBuf,
    /// How page images are stored.
    pub compression: Compression,
    /// Node-local directory (tmpfs) where a checkpoint is written first and
    /// then moved to `checkpoint_dir` once the container is released; none:
    /// written to `checkpoint_dir` directly.
    pub staging_dir: Option<PathBuf>,
    /// Which network namespace protected containers run in.
    pub container_network: ContainerNetwork,
    /// Most bytes of node-local (tmpfs) files a checkpoint may carry; more
    /// fails the checkpoint.
    pub node_local_files_max: u64,
    /// Minutes before its time limit a protected batch job is checkpointed
    /// and requeued when the job does not say (`--checkpoint-before-time-limit`);
    /// 0: only jobs that ask.
    pub checkpoint_before_time_limit: u32,
    /// A job requeued this many times (Slurm's `Restarts`) is no longer
    /// requeued before its time limit: it runs into it.
    pub time_limit_max_restarts: u32,
    /// Seconds between periodic checkpoints of a running container, for
    /// jobs that do not ask (`INTERVAL_ENV`); 0: none.
    pub checkpoint_interval: u64,
    /// Shortest interval a job may ask for; a shorter one is raised to it.
    pub checkpoint_interval_min: u64,
    /// The TOML file these settings were read from, if one was read.
    pub config_file: Option<PathBuf>,
}

/// The network a protected container sees: a namespace of its own with only
/// loopback (TCP inside the container is checkpointed), or the node's (the
/// container reaches the network; a connected TCP socket makes the
/// checkpoint fail).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerNetwork {
    #[default]
    Isolated,
    Node,
}

impl ContainerNetwork {
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerNetwork::Isolated => "isolated",
            ContainerNetwork::Node => "node",
        }
    }

    pub fn parse(key: &str, value: &str) -> Result<ContainerNetwork, ConfigError> {
        match value {
            "isolated" => Ok(ContainerNetwork::Isolated),
            "node" => Ok(ContainerNetwork::Node),
            _ => Err(ConfigError::BadValue { key: key.to_string(), value: value.to_string(), why: "expected isolated or node" }),
        }
    }
}

/// How page images are stored: as CRIU writes them, or compressed with
/// multi-threaded zstd (smaller images, fewer bytes to a slow shared
/// filesystem, more CPU).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Zstd,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
        }
    }

    fn parse(key: &str, value: &str) -> Result<Compression, ConfigError> {
        match value {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd),
            _ => Err(ConfigError::BadValue { key: key.to_string(), value: value.to_string(), why: "expected none or zstd" }),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            helper: DEFAULT_HELPER.into(),
            checkpoint_dir: DEFAULT_CHECKPOINT_DIR.into(),
            criu: DEFAULT_CRIU.into(),
            apptainer: DEFAULT_APPTAINER.into(),
            apptainer_conf: DEFAULT_APPTAINER_CONF.into(),
            compression: Compression::None,
            staging_dir: None,
            container_network: ContainerNetwork::Isolated,
            node_local_files_max: DEFAULT_NODE_LOCAL_FILES_MAX,
            checkpoint_before_time_limit: 0,
            time_limit_max_restarts: DEFAULT_TIME_LIMIT_MAX_RESTARTS,
            checkpoint_interval: 0,
            checkpoint_interval_min: DEFAULT_CHECKPOINT_INTERVAL_MIN,
            config_file: None,
        }
    }
}

/// One bad configuration entry. `Display` is a single line that names the
/// entry and says what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// A plugstack.conf argument that is not `key=value`.
    Malformed { arg: String },
    /// A key this plugin does not know.
    UnknownKey { arg: String },
    /// The same key given twice on the plugstack.conf line.
    Duplicate { key: String },
    /// A value that is empty, relative, or contains `..`.
    BadPath { key: String, value: String, why: &'static str },
    /// A value that is not one of the allowed words.
    BadValue { key: String, value: String, why: &'static str },
    /// The TOML file could not be read (only an error when named by `config=`).
    Unreadable { path: PathBuf, why: String },
    /// The TOML file is not valid or has unknown keys.
    BadToml { path: PathBuf, why: String },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Malformed { arg } => {
                write!(f, "plugstack.conf argument \"{arg}\" is malformed: expected key=value with key one of {}", known_keys())
            }
            ConfigError::UnknownKey { arg } => {
                write!(f, "plugstack.conf argument \"{arg}\" is unknown: known keys are {}", known_keys())
            }
            ConfigError::Duplicate { key } => {
                write!(f, "plugstack.conf argument \"{key}\" is given more than once")
            }
            ConfigError::BadPath { key, value, why } | ConfigError::BadValue { key, value, why } => {
                write!(f, "setting {key}=\"{value}\" is invalid: {why}")
            }
            ConfigError::Unreadable { path, why } => {
                write!(f, "config file {} cannot be read: {why}", path.display())
            }
            ConfigError::BadToml { path, why } => {
                // toml's messages span several lines; keep ours to one.
                let why = why.split_whitespace().collect::<Vec<_>>().join(" ");
                write!(f, "config file {} is invalid: {why}", path.display())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// A size in bytes: a number, optionally followed by KiB, MiB, GiB or TiB
/// (binary units only: "1GB" would leave the admin guessing which).
pub fn parse_size(key: &str, value: &str) -> Result<u64, ConfigError> {
    let bad =
        || ConfigError::BadValue { key: key.to_string(), value: value.to_string(), why: "expected a size such as 1GiB, 512MiB or 1048576" };
    let digits = value.bytes().take_while(u8::is_ascii_digit).count();
    let number: u64 = value[..digits].parse().map_err(|_| bad())?;
    let shift = match &value[digits..] {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        _ => return Err(bad()),
    };
    number.checked_mul(1 << shift).ok_or_else(bad)
}

/// A count of minutes or restarts: decimal digits only (no sign, no
/// spaces), at most `max`. Also what the plugin accepts from a job's
/// option, whose value is the user's.
pub fn parse_count(key: &str, value: &str, max: u32) -> Result<u32, ConfigError> {
    let bad = || ConfigError::BadValue { key: key.to_string(), value: value.to_string(), why: "expected a whole number" };
    if value.is_empty() || value.len() > 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match value.parse::<u64>() {
        Ok(n) if n <= u64::from(max) => Ok(n as u32),
        Ok(_) => Err(ConfigError::BadValue { key: key.to_string(), value: value.to_string(), why: "the number is too large" }),
        Err(_) => Err(bad()),
    }
}

/// A size as `parse_size` reads it back: the largest exact binary unit.
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes != 0 && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// A number of seconds (digits only, at most a year).
pub fn parse_seconds(key: &str, value: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadValue { key: key.to_string(), value: value.to_string(), why: "expected a number of seconds" };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    value.parse::<u64>().ok().filter(|&n| n <= 366 * 86400).ok_or_else(bad)
}

/// What a job asked for in `INTERVAL_ENV`: a number of seconds, nothing
/// else (the value is the user's). The error is the warning the user gets.
pub fn interval_request(value: &str) -> Result<u64, String> {
    parse_seconds(INTERVAL_ENV, value.trim()).map_err(|e| format!("{e}; the site's interval applies"))
}

/// The plugstack.conf key (and helper flag) naming the TOML file: not a
/// setting of its own, it says where the others are read from.
pub const CONFIG_KEY: &str = "config";

/// One site setting, described once: its plugstack.conf argument and TOML
/// key, the helper's command-line flag, how a value is checked and how it is
/// written back for the helper. Adding a setting = a `Settings` field and
/// one entry in `SETTINGS`.
pub struct Setting {
    /// plugstack.conf argument and TOML key.
    pub key: &'static str,
    /// The helper's long flag (without `--`); `None`: not a helper flag.
    pub flag: Option<&'static str>,
    pub value_name: &'static str,
    pub help: &'static str,
    /// Checks a value and stores it.
    set: fn(&mut Settings, &str, &str) -> Result<(), ConfigError>,
    /// The value as `set` reads it back; `None`: unset.
    get: fn(&Settings) -> Option<String>,
    /// The TOML file may give it as a plain integer too.
    toml_integer: bool,
}

fn path_text(p: &Path) -> Option<String> {
    Some(p.display().to_string())
}

/// A setting that is a site path (checked by `checked_path`).
macro_rules! path_setting {
    ($key:literal, $flag:expr, $value_name:literal, $help:literal, $field:ident) => {
        Setting {
            key: $key,
            flag: $flag,
            value_name: $value_name,
            help: $help,
            set: |s, k, v| {
                s.$field = checked_path(k, v)?;
                Ok(())
            },
            get: |s| path_text(&s.$field),
            toml_integer: false,
        }
    };
}

/// Every setting, in the order error messages list them.
pub const SETTINGS: &[Setting] = &[
    path_setting!("helper", None, "PATH", "The helper the plugin runs", helper),
    path_setting!("checkpoint_dir", Some("checkpoint-dir"), "DIR", "Root of the per-job checkpoint directories", checkpoint_dir),
    path_setting!("criu", Some("criu-path"), "PATH", "CRIU binary", criu),
    path_setting!("apptainer", Some("apptainer"), "PATH", "The site's Apptainer, the only runtime started for users", apptainer),
    path_setting!("apptainer_conf", Some("apptainer-conf"), "FILE", "Apptainer's configuration file", apptainer_conf),
    Setting {
        key: "compression",
        flag: Some("compression"),
        value_name: "HOW",
        help: "How page images are stored: none or zstd",
        set: |s, k, v| {
            s.compression = Compression::parse(k, v)?;
            Ok(())
        },
        get: |s| Some(s.compression.as_str().to_string()),
        toml_integer: false,
    },
    Setting {
        key: "staging_dir",
        flag: Some("staging-dir"),
        value_name: "DIR",
        help: "Node-local directory (tmpfs) to write checkpoints to first",
        set: |s, k, v| {
            s.staging_dir = Some(checked_path(k, v)?);
            Ok(())
        },
        get: |s| s.staging_dir.as_deref().and_then(path_text),
        toml_integer: false,
    },
    Setting {
        key: "container_network",
        flag: Some("container-network"),
        value_name: "WHICH",
        help: "Network of protected containers: isolated (loopback only) or node",
        set: |s, k, v| {
            s.container_network = ContainerNetwork::parse(k, v)?;
            Ok(())
        },
        get: |s| Some(s.container_network.as_str().to_string()),
        toml_integer: false,
    },
    Setting {
        key: "node_local_files_max",
        flag: Some("node-local-files-max"),
        value_name: "SIZE",
        help: "Most bytes of node-local (tmpfs) files a checkpoint may carry, e.g. 1GiB",
        set: |s, k, v| {
            s.node_local_files_max = parse_size(k, v)?;
            Ok(())
        },
        get: |s| Some(format_size(s.node_local_files_max)),
        toml_integer: true,
    },
    Setting {
        key: "checkpoint_before_time_limit",
        flag: Some("checkpoint-before-time-limit"),
        value_name: "MINUTES",
        help: "Checkpoint and requeue protected batch jobs this many minutes before their time limit (0: only jobs that ask)",
        set: |s, k, v| {
            s.checkpoint_before_time_limit = parse_count(k, v, MAX_LEAD_MINUTES)?;
            Ok(())
        },
        get: |s| Some(s.checkpoint_before_time_limit.to_string()),
        toml_integer: true,
    },
    Setting {
        key: "time_limit_max_restarts",
        flag: Some("time-limit-max-restarts"),
        value_name: "N",
        help: "A job requeued this many times (any cause) is no longer requeued before its time limit",
        set: |s, k, v| {
            s.time_limit_max_restarts = parse_count(k, v, u32::MAX)?;
            Ok(())
        },
        get: |s| Some(s.time_limit_max_restarts.to_string()),
        toml_integer: true,
    },
    Setting {
        key: "checkpoint_interval",
        flag: Some("checkpoint-interval"),
        value_name: "SECONDS",
        help: "Seconds between periodic checkpoints of running containers, for jobs that do not ask; 0: none",
        set: |s, k, v| {
            s.checkpoint_interval = parse_seconds(k, v)?;
            Ok(())
        },
        get: |s| Some(s.checkpoint_interval.to_string()),
        toml_integer: true,
    },
    Setting {
        key: "checkpoint_interval_min",
        flag: Some("checkpoint-interval-min"),
        value_name: "SECONDS",
        help: "Shortest interval between periodic checkpoints a job may ask for (CHECKPOINT_CONTAINER_INTERVAL)",
        set: |s, k, v| {
            s.checkpoint_interval_min = parse_seconds(k, v)?;
            Ok(())
        },
        get: |s| Some(s.checkpoint_interval_min.to_string()),
        toml_integer: true,
    },
];

fn known_keys() -> String {
    SETTINGS.iter().map(|s| s.key).chain([CONFIG_KEY]).collect::<Vec<_>>().join(", ")
}

fn setting(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}

/// Arguments from the plugstack.conf line, validated but not yet merged.
#[derive(Default)]
struct PlugstackArgs<'a> {
    values: Vec<(&'static Setting, &'a str)>,
    config: Option<PathBuf>,
}

fn parse_plugstack_args<S: AsRef<str>>(args: &[S]) -> Result<PlugstackArgs<'_>, ConfigError> {
    let mut out = PlugstackArgs::default();
    // Values are checked here, before any file is read, on a scratch copy.
    let mut scratch = Settings::default();
    for arg in args {
        let arg = arg.as_ref();
        let (key, value) = arg.split_once('=').ok_or_else(|| ConfigError::Malformed { arg: arg.to_string() })?;
        let duplicate = || ConfigError::Duplicate { key: key.to_string() };
        if key == CONFIG_KEY {
            if out.config.replace(checked_path(key, value)?).is_some() {
                return Err(duplicate());
            }
            continue;
        }
        let def = setting(key).ok_or_else(|| ConfigError::UnknownKey { arg: arg.to_string() })?;
        (def.set)(&mut scratch, key, value)?;
        if out.values.iter().any(|(d, _)| d.key == key) {
            return Err(duplicate());
        }
        out.values.push((def, value));
    }
    Ok(out)
}

/// Site paths are used by root: they must be absolute and free of `..`, so
/// that what the admin wrote is what gets opened.
pub fn checked_path(key: &str, value: &str) -> Result<PathBuf, ConfigError> {
    let bad = |why| ConfigError::BadPath { key: key.to_string(), value: value.to_string(), why };
    if value.is_empty() {
        return Err(bad("the value is empty"));
    }
    let path = Path::new(value);
    if !path.is_absolute() {
        return Err(bad("it must be an absolute path"));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(bad("it must not contain \"..\""));
    }
    Ok(path.to_path_buf())
}

impl Settings {
    /// Combines defaults, the TOML file and the plugstack.conf arguments.
    ///
    /// `read_file` is how the TOML file is read (the plugin and the helper
    /// read it with their own privileges); it returns `Ok(None)` when the file
    /// does not exist.
    pub fn load<S, R>(plugstack_args: &[S], read_file: R) -> Result<Settings, ConfigError>
    where
        S: AsRef<str>,
        R: Fn(&Path) -> std::io::Result<Option<String>>,
    {
        let args = parse_plugstack_args(plugstack_args)?;
        let mut settings = Settings::default();

        let (config_path, required) = match &args.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_FILE), false),
        };
        let text = read_file(&config_path).map_err(|e| ConfigError::Unreadable { path: config_path.clone(), why: e.to_string() })?;
        match text {
            Some(text) => {
                settings.apply_toml(&config_path, &text)?;
                settings.config_file = Some(config_path);
            }
            None if required => return Err(ConfigError::Unreadable { path: config_path, why: "no such file".into() }),
            None => {}
        }
        for (def, value) in args.values {
            (def.set)(&mut settings, def.key, value)?;
        }
        Ok(settings)
    }

    fn apply_toml(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let bad = |why: String| ConfigError::BadToml { path: path.to_path_buf(), why };
        let table: toml::Table = toml::from_str(text).map_err(|e| bad(e.message().to_string()))?;
        // Unknown keys are refused, like unknown arguments, before any value
        // is applied.
        let mut found = Vec::new();
        for (key, value) in &table {
            let Some(def) = setting(key) else {
                let known = SETTINGS.iter().map(|s| format!("`{}`", s.key)).collect::<Vec<_>>().join(", ");
                return Err(bad(format!("unknown field `{key}`, expected one of {known}")));
            };
            let text = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(n) if def.toml_integer && *n >= 0 => n.to_string(),
                other => return Err(bad(format!("invalid type: {} for `{key}`, expected a string", other.type_str()))),
            };
            found.push((def, text));
        }
        // Applied in table order, so the first bad value named is the same
        // whatever the file's order.
        found.sort_by_key(|(def, _)| SETTINGS.iter().position(|s| s.key == def.key));
        for (def, text) in found {
            (def.set)(self, def.key, &text)?;
        }
        Ok(())
    }

    /// Seconds between periodic checkpoints for a job that asked for
    /// `request` (0: none): the site's default when it did not ask, never
    /// more often than the site's minimum.
    pub fn checkpoint_interval_for(&self, request: Option<u64>) -> u64 {
        match request.unwrap_or(self.checkpoint_interval) {
            0 => 0,
            n => n.max(self.checkpoint_interval_min),
        }
    }

    /// The helper's command-line flags that give these settings (what the
    /// plugin passes to the helper it starts).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(config) = &self.config_file {
            args.extend([format!("--{CONFIG_KEY}"), config.display().to_string()]);
        }
        for def in SETTINGS {
            if let (Some(flag), Some(value)) = (def.flag, (def.get)(self)) {
                args.extend([format!("--{flag}"), value]);
            }
        }
        args
    }
}

/// Reads a file, mapping "does not exist" to `None`.
pub fn read_optional_file(path: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_file(_: &Path) -> std::io::Result<Option<String>> {
        Ok(None)
    }

    fn load(args: &[&str]) -> Result<Settings, ConfigError> {
        Settings::load(args, no_file)
    }

    #[test]
    fn no_arguments_gives_defaults() {
        assert_eq!(load(&[]).unwrap(), Settings::default());
    }

    #[test]
    fn every_known_argument_is_applied() {
        let s = load(&["helper=/opt/h", "checkpoint_dir=/shared/ckpt", "criu=/opt/criu"]).unwrap();
        assert_eq!(s.helper, PathBuf::from("/opt/h"));
        assert_eq!(s.checkpoint_dir, PathBuf::from("/shared/ckpt"));
        assert_eq!(s.criu, PathBuf::from("/opt/criu"));
    }

    #[test]
    fn performance_options_are_parsed_strictly() {
        let s = load(&["compression=zstd", "staging_dir=/dev/shm/ckpt"]).unwrap();
        assert_eq!(s.compression, Compression::Zstd);
        assert_eq!(s.staging_dir, Some(PathBuf::from("/dev/shm/ckpt")));
        let e = load(&["compression=gzip"]).unwrap_err();
        assert_eq!(e.to_string(), "setting compression=\"gzip\" is invalid: expected none or zstd");
        assert!(matches!(load(&["compression=none", "compression=zstd"]), Err(ConfigError::Duplicate { .. })));
        assert!(matches!(load(&["staging_dir=shm"]), Err(ConfigError::BadPath { .. })));
        let read = |_: &Path| Ok(Some("compression = \"zstd\"\nstaging_dir = \"/run/ckpt\"\n".to_string()));
        let s = Settings::load(&["compression=none"], read).unwrap();
        assert_eq!((s.compression, s.staging_dir), (Compression::None, Some(PathBuf::from("/run/ckpt"))));
    }

    #[test]
    fn container_network_is_isolated_unless_the_site_says_node() {
        assert_eq!(load(&[]).unwrap().container_network, ContainerNetwork::Isolated);
        assert_eq!(load(&["container_network=node"]).unwrap().container_network, ContainerNetwork::Node);
        let e = load(&["container_network=host"]).unwrap_err();
        assert_eq!(e.to_string(), "setting container_network=\"host\" is invalid: expected isolated or node");
        assert!(matches!(load(&["container_network=node", "container_network=node"]), Err(ConfigError::Duplicate { .. })));
        let read = |_: &Path| Ok(Some("container_network = \"node\"\n".to_string()));
        assert_eq!(Settings::load(&[] as &[&str], read).unwrap().container_network, ContainerNetwork::Node);
        let s = Settings::load(&["container_network=isolated"], read).unwrap();
        assert_eq!(s.container_network, ContainerNetwork::Isolated);
    }

    #[test]
    fn node_local_files_max_is_a_binary_size() {
        assert_eq!(load(&[]).unwrap().node_local_files_max, 1 << 30);
        assert_eq!(load(&["node_local_files_max=64MiB"]).unwrap().node_local_files_max, 64 << 20);
        assert_eq!(load(&["node_local_files_max=4096"]).unwrap().node_local_files_max, 4096);
        for bad in ["1GB", "1 GiB", "GiB", "-1", "99999999999TiB"] {
            let e = load(&[&format!("node_local_files_max={bad}")]).unwrap_err();
            assert!(e.to_string().contains("expected a size such as 1GiB"), "{bad}: {e}");
        }
        let read = |_: &Path| Ok(Some("node_local_files_max = \"2GiB\"\n".to_string()));
        assert_eq!(Settings::load(&[] as &[&str], read).unwrap().node_local_files_max, 2 << 30);
        let read = |_: &Path| Ok(Some("node_local_files_max = 1000\n".to_string()));
        assert_eq!(Settings::load(&[] as &[&str], read).unwrap().node_local_files_max, 1000);
        for n in [0, 1000, 1 << 20, 3 << 30, (1 << 20) + 1] {
            assert_eq!(parse_size("k", &format_size(n)).unwrap(), n);
        }
    }

    #[test]
    fn time_limit_settings_are_whole_numbers() {
        let s = load(&[]).unwrap();
        assert_eq!((s.checkpoint_before_time_limit, s.time_limit_max_restarts), (0, DEFAULT_TIME_LIMIT_MAX_RESTARTS));
        let s = load(&["checkpoint_before_time_limit=10", "time_limit_max_restarts=2"]).unwrap();
        assert_eq!((s.checkpoint_before_time_limit, s.time_limit_max_restarts), (10, 2));
        for bad in ["", "-1", "+1", " 1", "1m", "0x10", "99999999999"] {
            let e = load(&[&format!("checkpoint_before_time_limit={bad}")]).unwrap_err();
            assert!(matches!(e, ConfigError::BadValue { .. }), "{bad}: {e}");
        }
        assert!(load(&["checkpoint_before_time_limit=525601"]).unwrap_err().to_string().contains("too large"));
        let read = |_: &Path| Ok(Some("checkpoint_before_time_limit = 15\ntime_limit_max_restarts = \"3\"\n".to_string()));
        let s = Settings::load(&[] as &[&str], read).unwrap();
        assert_eq!((s.checkpoint_before_time_limit, s.time_limit_max_restarts), (15, 3));
    }

    #[test]
    fn checkpoint_interval_is_the_sites_default_and_a_job_asks_no_more_often_than_the_minimum() {
        let s = load(&[]).unwrap();
        assert_eq!((s.checkpoint_interval, s.checkpoint_interval_min), (0, DEFAULT_CHECKPOINT_INTERVAL_MIN));
        assert_eq!(s.checkpoint_interval_for(None), 0);
        let s = load(&["checkpoint_interval=3600", "checkpoint_interval_min=60"]).unwrap();
        assert_eq!(s.checkpoint_interval_for(None), 3600);
        assert_eq!(s.checkpoint_interval_for(Some(0)), 0);
        assert_eq!(s.checkpoint_interval_for(Some(5)), 60);
        assert_eq!(s.checkpoint_interval_for(Some(120)), 120);
        for bad in ["1h", "-1", " 5", "", "99999999999"] {
            let e = load(&[&format!("checkpoint_interval={bad}")]).unwrap_err();
            assert!(e.to_string().contains("expected a number of seconds"), "{bad}: {e}");
        }
        let read = |_: &Path| Ok(Some("checkpoint_interval = 900\n".to_string()));
        assert_eq!(Settings::load(&[] as &[&str], read).unwrap().checkpoint_interval, 900);
        assert_eq!(interval_request(" 30\n"), Ok(30));
        assert!(interval_request("/etc/shadow").is_err());
        assert!(interval_request("1e9").is_err());
    }

    #[test]
    fn unknown_argument_is_named() {
        let e = load(&["helper=/opt/h", "frobnicate=1"]).unwrap_err();
        assert_eq!(e, ConfigError::UnknownKey { arg: "frobnicate=1".into() });
        assert!(e.to_string().contains("\"frobnicate=1\" is unknown"), "{e}");
    }

    #[test]
    fn argument_without_equals_is_malformed() {
        let e = load(&["checkpoint_dir"]).unwrap_err();
        assert_eq!(e, ConfigError::Malformed { arg: "checkpoint_dir".into() });
        assert!(e.to_string().starts_with("plugstack.conf argument \"checkpoint_dir\" is malformed"));
    }

    #[test]
    fn relative_empty_and_dotdot_paths_are_refused() {
        for (arg, why) in [("checkpoint_dir=ckpt", "absolute"), ("helper=", "empty"), ("criu=/usr/../tmp/criu", "..")] {
            let e = load(&[arg]).unwrap_err();
            assert!(matches!(e, ConfigError::BadPath { .. }), "{arg}: {e:?}");
            assert!(e.to_string().contains(why), "{arg}: {e}");
        }
    }

    #[test]
    fn duplicate_argument_is_refused() {
        let e = load(&["criu=/a", "criu=/b"]).unwrap_err();
        assert_eq!(e, ConfigError::Duplicate { key: "criu".into() });
    }

    #[test]
    fn key_matching_is_exact() {
        // Prefixes, case variants and stray spaces are typos, not aliases.
        for arg in ["Helper=/x", "helper =/x", "checkpoint=/x", "criu_path=/x"] {
            assert!(matches!(load(&[arg]), Err(ConfigError::UnknownKey { .. })), "{arg}");
        }
    }

    #[test]
    fn toml_file_is_applied_and_arguments_win() {
        let read = |p: &Path| {
            assert_eq!(p, Path::new("/etc/site.toml"));
            Ok(Some("checkpoint_dir = \"/from/toml\"\ncriu = \"/toml/criu\"\n".to_string()))
        };
        let s = Settings::load(&["config=/etc/site.toml", "criu=/arg/criu"], read).unwrap();
        assert_eq!(s.checkpoint_dir, PathBuf::from("/from/toml"));
        assert_eq!(s.criu, PathBuf::from("/arg/criu"));
        assert_eq!(s.config_file, Some(PathBuf::from("/etc/site.toml")));
    }

    #[test]
    fn default_toml_file_is_optional_but_named_one_is_not() {
        assert!(load(&[]).is_ok());
        let e = load(&["config=/etc/missing.toml"]).unwrap_err();
        assert!(matches!(e, ConfigError::Unreadable { .. }));
        assert!(e.to_string().contains("/etc/missing.toml"), "{e}");
    }

    #[test]
    fn toml_unknown_key_and_bad_value_are_refused_in_one_line() {
        let read = |_: &Path| Ok(Some("checkpoint_directory = \"/x\"\n".to_string()));
        let e = Settings::load(&[] as &[&str], read).unwrap_err();
        assert!(matches!(e, ConfigError::BadToml { .. }), "{e:?}");
        assert!(e.to_string().contains("checkpoint_directory"), "{e}");
        assert!(!e.to_string().contains('\n'), "{e}");

        let read = |_: &Path| Ok(Some("criu = \"criu\"\n".to_string()));
        let e = Settings::load(&[] as &[&str], read).unwrap_err();
        assert!(matches!(e, ConfigError::BadPath { .. }), "{e:?}");
    }

    #[test]
    fn helper_flags_give_back_the_same_settings() {
        let read = |_: &Path| Ok(Some("staging_dir = \"/run/ckpt\"\n".to_string()));
        let s = Settings::load(
            &["config=/etc/site.toml", "compression=zstd", "node_local_files_max=3GiB", "checkpoint_before_time_limit=7"],
            read,
        )
        .unwrap();
        // What the helper does with its flags: each one a plugstack argument.
        let args = s.to_args();
        let mut back = Vec::new();
        for pair in args.chunks(2) {
            let flag = pair[0].trim_start_matches("--");
            let key = SETTINGS.iter().find(|d| d.flag == Some(flag)).map_or(CONFIG_KEY, |d| d.key);
            back.push(format!("{key}={}", pair[1]));
        }
        let again = Settings::load(&back, read).unwrap();
        assert_eq!(again, Settings { helper: again.helper.clone(), ..s });
        assert!(args.starts_with(&["--config".into(), "/etc/site.toml".into()]), "{args:?}");
        assert!(args.contains(&"--criu-path".to_string()), "{args:?}");
    }

    #[test]
    fn unreadable_file_is_an_error_not_a_default() {
        let read = |_: &Path| Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        let e = Settings::load(&[] as &[&str], read).unwrap_err();
        assert!(matches!(e, ConfigError::Unreadable { .. }), "{e:?}");
    }
}
