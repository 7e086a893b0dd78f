//! Apptainer command lines: where the subcommand and the image are, and
//! which flags take values. `policy.rs` decides what of a command root may
//! run and `launch.rs` builds what root runs (for a restore: the same
//! container with a placeholder as its program, since Apptainer has no
//! "re-create this container" command).

use std::fmt;

/// `apptainer exec|run` flags that take a value (Apptainer 1.3/1.4: every
/// flag whose `--help` type is string, stringArray, stringToString or int).
const VALUE_FLAGS: &[&str] = &[
    "add-caps",
    "app",
    "apply-cgroups",
    "authfile",
    "bind",
    "blkio-weight",
    "blkio-weight-device",
    "cpu-shares",
    "cpus",
    "cpuset-cpus",
    "cpuset-mems",
    "cwd",
    "dns",
    "docker-host",
    "drop-caps",
    "env",
    "env-file",
    "fusemount",
    "home",
    "hostname",
    "memory",
    "memory-reservation",
    "memory-swap",
    "mount",
    "netns-path",
    "network",
    "network-args",
    "no-mount",
    "overlay",
    "pem-path",
    "pids-limit",
    "pwd",
    "scratch",
    "security",
    "workdir",
];
const VALUE_SHORT: &[char] = &['B', 'H', 'o', 'S', 'W'];
/// Global flags (before the subcommand) that take a value.
const GLOBAL_VALUE_FLAGS: &[&str] = &["config"];
const GLOBAL_VALUE_SHORT: &[char] = &['c'];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerCommand {
    argv: Vec<String>,
    subcommand: usize,
    image: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not an Apptainer container command: {}", self.0)
    }
}

impl std::error::Error for ParseError {}

/// Index of the first operand at or after `start`, skipping flags and their
/// values. `--` ends the flags.
fn first_operand(argv: &[String], start: usize, long: &[&str], short: &[char]) -> Option<usize> {
    let mut i = start;
    while i < argv.len() {
        let arg = &argv[i];
        if arg == "--" {
            return (i + 1 < argv.len()).then_some(i + 1);
        }
        if let Some(name) = arg.strip_prefix("--") {
            if !name.contains('=') && long.contains(&name) {
                i += 1;
            }
        } else if let Some(flags) = arg.strip_prefix('-').filter(|f| !f.is_empty()) {
            // Combined short flags: a value flag takes the rest of the token,
            // or the next token when it is last.
            if let Some(pos) = flags.find(|c| short.contains(&c)) {
                if pos + 1 == flags.len() {
                    i += 1;
                }
            }
        } else {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Whether an `exec`/`run` option takes a value (`--bind X`, `-B X`).
pub fn takes_value(flag: &str) -> bool {
    match flag.strip_prefix("--") {
        Some(long) => VALUE_FLAGS.contains(&long),
        None => flag.len() == 2 && flag.strip_prefix('-').is_some_and(|c| c.chars().all(|c| VALUE_SHORT.contains(&c))),
    }
}

impl ContainerCommand {
    pub fn parse(argv: Vec<String>) -> Result<Self, ParseError> {
        let program = argv.first().ok_or_else(|| ParseError("empty command".into()))?;
        let base = program.rsplit('/').next().unwrap_or(program);
        if base != "apptainer" && base != "singularity" {
            return Err(ParseError(format!("{program:?} is not apptainer or singularity")));
        }
        let subcommand =
            first_operand(&argv, 1, GLOBAL_VALUE_FLAGS, GLOBAL_VALUE_SHORT).ok_or_else(|| ParseError("no subcommand".into()))?;
        if !matches!(argv[subcommand].as_str(), "exec" | "run") {
            return Err(ParseError(format!("subcommand {:?} (only exec and run can be checkpointed)", argv[subcommand])));
        }
        let image = first_operand(&argv, subcommand + 1, VALUE_FLAGS, VALUE_SHORT).ok_or_else(|| ParseError("no image".into()))?;
        Ok(ContainerCommand { argv, subcommand, image })
    }

    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    pub fn subcommand_index(&self) -> usize {
        self.subcommand
    }

    pub fn image_index(&self) -> usize {
        self.image
    }

    pub fn image(&self) -> &str {
        &self.argv[self.image]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ContainerCommand, ParseError> {
        ContainerCommand::parse(s.split_whitespace().map(String::from).collect())
    }

    #[test]
    fn finds_the_image_after_flags_with_values() {
        let c = parse("apptainer -s exec --bind /a:/b -B /c --cleanenv --env X=1 app.sif ./sim --steps 3").unwrap();
        assert_eq!(c.image(), "app.sif");
        let c = parse("/usr/bin/apptainer --config /x.conf run --bind=/a:/b -eB /c /shared/app.sif").unwrap();
        assert_eq!(c.image(), "/shared/app.sif");
        let c = parse("singularity exec -- app.sif cmd").unwrap();
        assert_eq!(c.image(), "app.sif");
    }

    #[test]
    fn refuses_other_programs_and_subcommands() {
        assert!(parse("python3 sim.py").unwrap_err().0.contains("is not apptainer"));
        assert!(parse("apptainer shell app.sif").unwrap_err().0.contains("only exec and run"));
        assert!(parse("apptainer exec --bind /a").unwrap_err().0.contains("no image"));
        assert!(ContainerCommand::parse(vec![]).is_err());
    }
}
