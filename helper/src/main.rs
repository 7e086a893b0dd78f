//! `checkpoint-container`: the helper the SPANK plugin runs, and the admin CLI.
//!
//! Exit codes follow the usual convention: 0 success, 1 the operation
//! failed (the message says why), 2 bad usage.

use checkpoint_container::criu;
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
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("checkpoint-container: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
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
            Ok(())
        }
    }
}
