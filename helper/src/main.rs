//! `checkpoint-container`: the helper the SPANK plugin runs, and the admin CLI.
//!
//! Exit codes: 0 success, 1 the operation failed (one line on stderr says
//! why), 2 bad usage. `restore` waits for the restored program and exits
//! with its exit code.

#![deny(unsafe_code)]

use checkpoint_container::checkpoint::{checkpoint, CheckpointRequest};
use checkpoint_container::manifest::JobIds;
use checkpoint_container::restore::{restore, RestoreRequest};
use checkpoint_container::runtime::ContainerCommand;
use checkpoint_container::{agent, criu, launch, listing, namespaces, shim, storage, sys, task};
use ckpt_config::{read_optional_file, Settings};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// The site settings' flags (`--criu-path`, `--checkpoint-dir`, …) are not
/// here: they come from `ckpt_config::SETTINGS` (see `with_setting_flags`).
#[derive(Parser)]
#[command(name = "checkpoint-container", version, about, long_about = None)]
struct Cli {
    /// Admin TOML file (default /etc/slurm/checkpoint-container.toml if it exists)
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check that this node can checkpoint containers (CRIU present and >= 4)
    Check {
        /// CRIU binary to check instead of the configured one
        #[arg(long, value_name = "PATH")]
        criu: Option<PathBuf>,
    },
    /// Dump a running container's process tree into a checkpoint directory
    ///
    /// CONTAINER_COMMAND is the apptainer command line that started the
    /// container (restore starts the same container again). The directory is
    /// written aside and swapped in only when complete.
    Checkpoint {
        /// The user's program inside the container (root of the dumped tree)
        #[arg(long)]
        pid: i32,
        /// Checkpoint directory to create or replace
        #[arg(long, value_name = "DIR")]
        images: PathBuf,
        #[command(flatten)]
        job: JobArgs,
        /// Refuse unless the process belongs to this uid
        #[arg(long)]
        uid: Option<u32>,
        /// Leave the container running after the dump
        #[arg(long)]
        leave_running: bool,
        #[arg(last = true, required = true, value_name = "CONTAINER_COMMAND")]
        container: Vec<String>,
    },
    /// Restore a checkpoint and wait for the restored program to end
    Restore {
        #[arg(long, value_name = "DIR")]
        images: PathBuf,
        /// Refuse unless the checkpoint belongs to this uid
        #[arg(long)]
        uid: Option<u32>,
        /// Refuse unless the checkpoint belongs to this job
        #[arg(long)]
        job_id: Option<u32>,
        /// Write "restored" to this fd once the program runs again
        #[arg(long, value_name = "FD")]
        status_fd: Option<i32>,
        /// The socket the restored program gets in place of the Slurm
        /// PMI-2 socket it had (the agent's relay)
        #[arg(long, value_name = "FD")]
        pmi_fd: Option<i32>,
        /// The network namespace to restore in (where that socket was made)
        #[arg(long, value_name = "FD")]
        net_ns_fd: Option<i32>,
        /// A step's ranks in one container: how many; their descriptors
        /// (the agent's) are at fixed numbers (restore::rank_fds)
        #[arg(long, value_name = "N")]
        ranks: Option<usize>,
    },
    /// Remove the checkpoints of jobs that will not run again (agents also
    /// do this whenever a task starts); prints the job ids removed
    Gc,
    /// Show your own checkpoints: job, step, task, size, age, node, state
    /// (for users; needs no privilege and shows nobody else's)
    List,
    /// Run a --checkpoint-container task (the plugin puts this in front of
    /// the task's command; runs as the job user)
    Task {
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// The command is no container: hand the agent the task's stdio,
        /// then run it; the runtime shim on its PATH hands the agent each
        /// container it starts
        #[arg(long)]
        watch: bool,
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Serve one --checkpoint-container task as root (started by the plugin)
    Agent {
        #[command(flatten)]
        task: agent::Task,
        /// Where the agent logs (appended)
        #[arg(long, value_name = "FILE", default_value = "/var/log/slurm/checkpoint-container.log")]
        log: PathBuf,
    },
    /// PID 1 of a protected container's PID namespace: runs the site's
    /// Apptainer there (the helper starts this as root; not for people)
    #[command(hide = true)]
    ContainerInit {
        /// Bring the loopback interface of a fresh network namespace up
        #[arg(long)]
        loopback: bool,
        /// Keep every pid up to this one free in the namespace
        #[arg(long)]
        last_pid: Option<i32>,
        #[arg(last = true, required = true, value_name = "APPTAINER_COMMAND")]
        command: Vec<String>,
    },
    /// Open paths with the caller's rights and pass them back on fd 3 (the
    /// helper runs this as the job user; not for people)
    #[command(hide = true)]
    OpenAsUser {
        #[arg(value_name = "KIND=PATH")]
        requests: Vec<String>,
    },
    /// Show a checkpoint's manifest
    Inspect {
        #[arg(value_name = "DIR")]
        images: PathBuf,
        /// Also verify every image file against its recorded digest
        #[arg(long)]
        verify: bool,
    },
}

#[derive(clap::Args)]
struct JobArgs {
    /// Slurm job id recorded in the manifest
    #[arg(long)]
    job_id: Option<u32>,
    /// Slurm step id recorded in the manifest
    #[arg(long)]
    step_id: Option<u32>,
    /// Slurm task id recorded in the manifest
    #[arg(long)]
    task_id: Option<u32>,
}

/// Adds one global flag per site setting that has one: a command-line
/// override, checked exactly like the plugstack.conf argument.
fn with_setting_flags(mut cmd: clap::Command) -> clap::Command {
    for def in ckpt_config::SETTINGS {
        if let Some(flag) = def.flag {
            cmd = cmd.arg(
                clap::Arg::new(flag)
                    .long(flag)
                    .global(true)
                    .value_name(def.value_name)
                    .help(format!("{} (overrides the configuration)", def.help)),
            );
        }
    }
    cmd
}

fn main() -> ExitCode {
    // Started as `apptainer` or `singularity`: the runtime shim, which takes
    // the runtime's command line, not ours.
    let args: Vec<String> = std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect();
    if args.first().is_some_and(|a| shim::started_as_runtime(a)) {
        return match shim::run(args) {
            Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
            Err(e) => {
                eprintln!("checkpoint-container: {e}");
                ExitCode::from(127)
            }
        };
    }
    let matches = with_setting_flags(Cli::command()).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // Command-line overrides, as plugstack.conf arguments (key=value).
    let overrides: Vec<(&str, String)> = ckpt_config::SETTINGS
        .iter()
        .filter_map(|def| def.flag.and_then(|flag| matches.get_one::<String>(flag)).map(|v| (def.key, v.clone())))
        .collect();
    // The container's init reads no configuration and logs nothing: it only
    // runs what it was given.
    if let Command::ContainerInit { loopback, last_pid, command } = &cli.command {
        return match namespaces::run_init(*loopback, *last_pid, command) {
            Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
            Err(e) => {
                eprintln!("checkpoint-container: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // Agents write the node's agent log: every line with its time, level,
    // pid and task (job.step.task), whichever module logs it. Commands
    // people run print warnings and errors only.
    let agent = match &cli.command {
        Command::Agent { task: t, .. } => Some(format!(" {}.{}.{}", t.job_id, t.step_id, t.task_id)),
        _ => None,
    };
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(if agent.is_some() { "info" } else { "warn" }));
    let task = agent.unwrap_or_default();
    logger.format(move |buf, record| {
        use std::io::Write;
        writeln!(buf, "{} {} checkpoint-container[{}]{task} {}", buf.timestamp_micros(), record.level(), std::process::id(), record.args())
    });
    logger.init();
    match run(cli, &overrides) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("checkpoint-container: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Leaves slurmstepd's process tree (it reaps its own children only) and
/// sends our output to the agent log: the plugin waits only for the parent.
fn daemonize(log: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    use std::os::fd::AsRawFd;
    sys::fork_exit_parent()?;
    nix::unistd::setsid()?;
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).or_else(|_| std::fs::File::create("/dev/null"))?;
    let null = std::fs::File::open("/dev/null")?;
    nix::unistd::dup2(null.as_raw_fd(), 0)?;
    nix::unistd::dup2(out.as_raw_fd(), 1)?;
    nix::unistd::dup2(out.as_raw_fd(), 2)?;
    drop((out, null));
    // slurmstepd's own descriptors (its sockets, other tasks' PMI sockets)
    // stop here: nothing the agent starts for the user may inherit them.
    // No Rust object owns any of them any more.
    sys::close_range_from(3)?;
    Ok(())
}

fn run(cli: Cli, overrides: &[(&str, String)]) -> Result<u8, Box<dyn std::error::Error>> {
    // The agent passes the same overrides on to the commands it runs.
    let mut args: Vec<String> = Vec::new();
    let mut settings_args = Vec::new();
    if let Some(p) = &cli.config {
        args.push(format!("{}={}", ckpt_config::CONFIG_KEY, p.display()));
        settings_args.extend(["--config".to_string(), p.display().to_string()]);
    }
    for (key, value) in overrides {
        args.push(format!("{key}={value}"));
        let flag = ckpt_config::SETTINGS.iter().find(|d| d.key == *key).and_then(|d| d.flag).expect("overrides come from flags");
        settings_args.extend([format!("--{flag}"), value.clone()]);
    }
    let settings = Settings::load(&args, read_optional_file)?;
    match cli.command {
        Command::Check { criu } => {
            let criu = criu.unwrap_or(settings.criu.clone());
            let version = criu::check(&criu)?;
            // Everything root will use on this node only root can change.
            storage::trusted_file(&settings.apptainer)?;
            storage::trusted_file(&settings.apptainer_conf)?;
            storage::trusted_dir(&settings.checkpoint_dir, Some(0o755))?;
            if let Some(dir) = &settings.staging_dir {
                storage::trusted_dir(dir, None)?;
            }
            println!("criu {} at {}: ok", version, criu.display());
            Ok(0)
        }
        Command::Checkpoint { pid, images, job, uid, leave_running, container } => {
            let container = ContainerCommand::parse(container)?;
            let image = container.image().to_string();
            if !image.starts_with('/') {
                return Err(format!("container image {image} must be given as an absolute path").into());
            }
            let req = CheckpointRequest {
                pid,
                target: images,
                image: image.clone().into(),
                image_name: image,
                container,
                job: JobIds { job_id: job.job_id, step_id: job.step_id, task_id: job.task_id, ..Default::default() },
                expected_uid: uid,
                leave_running,
                started_in: None,
                slurm_pmi: vec![],
                ranks: None,
            };
            let m = checkpoint(&settings, &req)?;
            eprintln!(
                "checkpoint-container: checkpointed process {} ({} processes, {:.1} MiB) in {:.2} s into {}",
                pid,
                m.process.pids.len(),
                m.stats.images_bytes as f64 / 1048576.0,
                m.stats.dump_seconds,
                req.target.display()
            );
            Ok(0)
        }
        Command::Restore { images, uid, job_id, status_fd, pmi_fd, net_ns_fd, ranks } => {
            // The container is re-created through staged mounts that must
            // not reach the node (single-threaded still, as unshare needs).
            launch::private_mount_namespace()?;
            // The descriptors the agent left at these numbers are for this
            // process alone (close-on-exec from here): the status pipe, and
            // the PMI relay's end and its network namespace, of which CRIU
            // gets a copy by number; the container gets none of them.
            let adopt = |fd: Option<i32>| -> std::io::Result<Option<std::fs::File>> {
                let Some(fd) = fd else { return Ok(None) };
                let file = std::fs::File::from(sys::take_inherited_fd(fd)?);
                nix::fcntl::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
                Ok(Some(file))
            };
            let (status, slurm_pmi, net_ns) = (adopt(status_fd)?, adopt(pmi_fd)?, adopt(net_ns_fd)?);
            let must = |fd: i32| adopt(Some(fd)).and_then(|f| f.ok_or_else(|| std::io::Error::other("not given")));
            let ranks = match ranks {
                None => None,
                Some(n) => {
                    let mut given = Vec::new();
                    for k in 0..n {
                        let [i, o, e, pmi] = checkpoint_container::restore::rank_fds(k);
                        // A rank without a PMI relay has nothing at its number.
                        given.push(([must(i)?, must(o)?, must(e)?], adopt(Some(pmi)).ok().flatten()));
                    }
                    Some(checkpoint_container::restore::RanksFds {
                        status: must(checkpoint_container::restore::RANKS_STATUS_FD)?,
                        ranks: given,
                    })
                }
            };
            let req = RestoreRequest { images, expected_uid: uid, expected_job: job_id, slurm_pmi, net_ns, ranks };
            let done = restore(&settings, &req, |m, secs, pid| {
                let line = format!("restored process {} of {} in {secs:.2} s", m.process.root_pid, req.images.display());
                match status {
                    // The agent signals and dumps the program by this pid
                    // (the container's namespace numbers it differently),
                    // and tells the user once the step goes on. Closed
                    // once written: the line is all the fd is for.
                    Some(mut f) => {
                        use std::io::Write;
                        let _ = writeln!(f, "restored {} {line}", pid.unwrap_or(0));
                    }
                    None => eprintln!("checkpoint-container: {line}"),
                }
            })?;
            Ok(done.exit_code.clamp(0, 255) as u8)
        }
        Command::Gc => {
            for job in agent::collect_garbage(&settings) {
                println!("{job}");
            }
            Ok(0)
        }
        Command::List => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            print!("{}", listing::table(&listing::own_entries(&settings)?, now));
            Ok(0)
        }
        Command::Task { socket, watch: true, command } => Err(task::watch(&socket, command).into()),
        Command::Task { socket, watch: false, command } => Ok(task::run(&socket, command)?.clamp(0, 255) as u8),
        Command::Agent { task: t, log } => {
            daemonize(&log)?;
            // slurmstepd hands on the job's umask: the modes of what root
            // creates (the socket directory users must reach) are root's.
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
            launch::private_mount_namespace()?;
            if let Err(e) = agent::run(&settings, &settings_args, &t) {
                log::error!("agent {}.{}.{}: {e}", t.job_id, t.step_id, t.task_id);
                return Ok(1);
            }
            Ok(0)
        }
        Command::ContainerInit { .. } => unreachable!("handled in main"),
        Command::OpenAsUser { requests } => {
            launch::serve_open_as_user(&requests)?;
            Ok(0)
        }
        Command::Inspect { images, verify } => {
            let m = storage::open_checkpoint(&images, verify)?;
            print!("{}", m.to_toml());
            Ok(0)
        }
    }
}
