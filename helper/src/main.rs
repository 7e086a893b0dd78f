//! `checkpoint-container`: the helper the SPANK plugin runs, and the admin CLI.
//!
//! Exit codes: 0 success, 1 the operation failed (one line on stderr says
//! why), 2 bad usage. `restore` waits for the restored program and exits
//! with its exit code.

use checkpoint_container::apptainer::ContainerCommand;
use checkpoint_container::checkpoint::{checkpoint, CheckpointRequest};
use checkpoint_container::manifest::JobIds;
use checkpoint_container::restore::{restore, RestoreRequest};
use checkpoint_container::{criu, storage};
use ckpt_config::{read_optional_file, Settings};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

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

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("checkpoint-container: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<u8, Box<dyn std::error::Error>> {
    let args: Vec<String> = match &cli.config {
        Some(p) => vec![format!("config={}", p.display())],
        None => vec![],
    };
    let settings = Settings::load(&args, read_optional_file)?;
    match cli.command {
        Command::Check { criu } => {
            let criu = criu.unwrap_or(settings.criu);
            let version = criu::check(&criu)?;
            println!("criu {} at {}: ok", version, criu.display());
            Ok(0)
        }
        Command::Checkpoint { pid, images, job, uid, leave_running, container } => {
            let req = CheckpointRequest {
                pid,
                target: images,
                container: ContainerCommand::parse(container)?,
                job: JobIds { job_id: job.job_id, step_id: job.step_id, task_id: job.task_id },
                expected_uid: uid,
                leave_running,
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
        Command::Restore { images, uid, job_id } => {
            let req = RestoreRequest { images, expected_uid: uid, expected_job: job_id };
            let done = restore(&settings, &req, |m, secs| {
                eprintln!(
                    "checkpoint-container: restored process {} of {} in {secs:.2} s",
                    m.process.root_pid,
                    req.images.display()
                );
            })?;
            Ok(done.exit_code.clamp(0, 255) as u8)
        }
        Command::Inspect { images, verify } => {
            let m = storage::open_checkpoint(&images, verify)?;
            print!("{}", m.to_toml());
            Ok(0)
        }
    }
}
