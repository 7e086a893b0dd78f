//! Apptainer command lines: where the subcommand and the image are, which
//! flags take values and what root does with each (one table, `FLAGS`).
//! `policy.rs` applies it and decides what of a command root may
//! run and `launch.rs` builds what root runs (for a restore: the same
//! container with a placeholder as its program, since Apptainer has no
//! "re-create this container" command).

use std::fmt;

/// What root does with a flag of the user's command (`policy.rs` applies it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Refused: it would use root's rights or name what root would open.
    Refused,
    /// Accepted, no value: it only restricts or shapes the container.
    Shape { cleanenv: bool, contain: bool, no_home: bool },
    /// Accepted, its value names no host path (`pwd`: it chooses the
    /// working directory inside).
    Value { pwd: bool },
    /// Its value names host paths, as `src[:dst[:opts]][,…]`.
    Bind,
    /// Refused unless its value is the identity root adds anyway.
    Security,
}

/// One Apptainer flag: its spelling (`--bind`, `-B`), whether it takes a
/// value, and what root does with it.
pub struct Flag {
    pub name: &'static str,
    pub value: bool,
    pub used: Use,
}

const fn refused(name: &'static str) -> Flag {
    Flag { name, value: true, used: Use::Refused }
}

const fn shape(name: &'static str, cleanenv: bool, contain: bool) -> Flag {
    Flag { name, value: false, used: Use::Shape { cleanenv, contain, no_home: false } }
}

/// `apptainer exec|run` flags: every one that takes a value (Apptainer
/// 1.3/1.4: every flag whose `--help` type is string, stringArray,
/// stringToString or int), and those without a value root accepts (any
/// other is refused).
pub const FLAGS: &[Flag] = &[
    refused("--add-caps"),
    refused("--app"),
    refused("--apply-cgroups"),
    refused("--authfile"),
    Flag { name: "--bind", value: true, used: Use::Bind },
    Flag { name: "-B", value: true, used: Use::Bind },
    refused("--blkio-weight"),
    refused("--blkio-weight-device"),
    refused("--cpu-shares"),
    refused("--cpus"),
    refused("--cpuset-cpus"),
    refused("--cpuset-mems"),
    Flag { name: "--cwd", value: true, used: Use::Value { pwd: true } },
    refused("--dns"),
    refused("--docker-host"),
    refused("--drop-caps"),
    Flag { name: "--env", value: true, used: Use::Value { pwd: false } },
    refused("--env-file"),
    refused("--fusemount"),
    refused("--home"),
    refused("-H"),
    refused("--hostname"),
    refused("--memory"),
    refused("--memory-reservation"),
    refused("--memory-swap"),
    refused("--mount"),
    refused("--netns-path"),
    refused("--network"),
    refused("--network-args"),
    refused("--no-mount"),
    refused("--overlay"),
    refused("-o"),
    refused("--pem-path"),
    refused("--pids-limit"),
    Flag { name: "--pwd", value: true, used: Use::Value { pwd: true } },
    refused("--scratch"),
    refused("-S"),
    Flag { name: "--security", value: true, used: Use::Security },
    refused("--workdir"),
    refused("-W"),
    shape("-e", true, false),
    shape("--cleanenv", true, false),
    shape("-c", false, true),
    shape("--contain", false, true),
    shape("-C", true, true),
    shape("--containall", true, true),
    Flag { name: "--no-home", value: false, used: Use::Shape { cleanenv: false, contain: false, no_home: true } },
    shape("--writable-tmpfs", false, false),
    shape("--nv", false, false),
    shape("--no-init", false, false),
    shape("--no-umask", false, false),
    shape("--compat", true, true),
    shape("--no-eval", false, false),
];

/// Global flags (before the subcommand): those that take a value, and
/// those root accepts.
pub const GLOBAL_FLAGS: &[Flag] = &[
    refused("--config"),
    refused("-c"),
    shape("-s", false, false),
    shape("--silent", false, false),
    shape("-q", false, false),
    shape("--quiet", false, false),
    shape("--nocolor", false, false),
];

/// A flag of `table` as written (`--bind`, `-B`).
pub fn flag(table: &'static [Flag], name: &str) -> Option<&'static Flag> {
    table.iter().find(|f| f.name == name)
}

/// Whether `name` (`--bind`, `-B`) of `table` takes a value.
fn value_flag(table: &[Flag], name: &str) -> bool {
    table.iter().any(|f| f.value && f.name == name)
}

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

impl From<ParseError> for crate::error::EngineError {
    fn from(e: ParseError) -> Self {
        crate::error::EngineError::Failed(e.to_string())
    }
}

/// Index of the first operand at or after `start`, skipping flags and their
/// values. `--` ends the flags.
fn first_operand(argv: &[String], start: usize, table: &[Flag]) -> Option<usize> {
    let mut i = start;
    while i < argv.len() {
        let arg = &argv[i];
        if arg == "--" {
            return (i + 1 < argv.len()).then_some(i + 1);
        }
        if let Some(name) = arg.strip_prefix("--") {
            if !name.contains('=') && value_flag(table, &format!("--{name}")) {
                i += 1;
            }
        } else if let Some(flags) = arg.strip_prefix('-').filter(|f| !f.is_empty()) {
            // Combined short flags: a value flag takes the rest of the token,
            // or the next token when it is last.
            if let Some(pos) = flags.find(|c| value_flag(table, &format!("-{c}"))) {
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
    value_flag(FLAGS, flag)
}

impl ContainerCommand {
    pub fn parse(argv: Vec<String>) -> Result<Self, ParseError> {
        let program = argv.first().ok_or_else(|| ParseError("empty command".into()))?;
        if !ckpt_config::runtime::is_container_program(program) {
            return Err(ParseError(format!("{program:?} is not apptainer or singularity")));
        }
        let subcommand = first_operand(&argv, 1, GLOBAL_FLAGS).ok_or_else(|| ParseError("no subcommand".into()))?;
        if !matches!(argv[subcommand].as_str(), "exec" | "run") {
            return Err(ParseError(format!("subcommand {:?} (only exec and run can be checkpointed)", argv[subcommand])));
        }
        let image = first_operand(&argv, subcommand + 1, FLAGS).ok_or_else(|| ParseError("no image".into()))?;
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
    fn each_flag_is_in_its_table_once() {
        for table in [FLAGS, GLOBAL_FLAGS] {
            for f in table {
                assert_eq!(table.iter().filter(|g| g.name == f.name).count(), 1, "{}", f.name);
                assert!(f.name.starts_with("--") || f.name.len() == 2, "{}", f.name);
            }
        }
        assert!(takes_value("-B") && takes_value("--workdir") && !takes_value("-c") && !takes_value("--nv"));
    }

    #[test]
    fn refuses_other_programs_and_subcommands() {
        assert!(parse("python3 sim.py").unwrap_err().0.contains("is not apptainer"));
        assert!(parse("apptainer shell app.sif").unwrap_err().0.contains("only exec and run"));
        assert!(parse("apptainer exec --bind /a").unwrap_err().0.contains("no image"));
        assert!(ContainerCommand::parse(vec![]).is_err());
    }
}
