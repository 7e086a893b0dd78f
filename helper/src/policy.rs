//! What a user may have root start for them: the rules, without effects.
//!
//! A `--checkpoint-container` task's container is started by root (so CRIU
//! can dump it) with the user's identity (`--security uid:U,gid:G`). Root
//! must add nothing to the user's rights, so the user's command line is
//! taken apart here into a [`Plan`]: only options that keep the container
//! within what the user can do are accepted, and every host path the user
//! names comes out as a path for `launch.rs` to open *as the user*.
//!
//! Anything Apptainer's own parser could read differently from this one
//! (escapes, whitespace it trims, options it ignores) is refused rather than
//! interpreted: the check and the use must see the same thing.

use crate::error::{EngineError, Result};
use crate::runtime::apptainer::{flag, ContainerCommand, Use, FLAGS, GLOBAL_FLAGS};

/// Every failure here is a refusal (matched as such by callers).
fn refused<T>(msg: impl Into<String>) -> Result<T> {
    Err(EngineError::Refused(msg.into()))
}

/// Environment variables Apptainer reads as binds (sites' modules set them).
pub const BIND_ENV: &[&str] = &["APPTAINER_BIND", "APPTAINER_BINDPATH", "SINGULARITY_BIND", "SINGULARITY_BINDPATH"];
/// One `--bind` entry: a host path the user names and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// As the user wrote it (relative to their working directory or
    /// absolute): opened by the user, never by root.
    pub src: String,
    /// Inside the container (absolute); the source's own path when not given.
    pub dest: Option<String>,
    pub read_only: bool,
}

/// The user's command, checked and taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub globals: Vec<String>,
    /// `exec` or `run`.
    pub subcommand: String,
    /// Accepted options that name no host path, flag and value as given.
    pub options: Vec<String>,
    pub binds: Vec<Bind>,
    /// As the user wrote it.
    pub image: String,
    /// The program and its arguments (after the image).
    pub args: Vec<String>,
    /// The host environment is not passed into the container.
    pub cleanenv: bool,
    /// Neither home nor working directory is shared with the container.
    pub contain: bool,
    pub no_home: bool,
    /// The user chose the working directory inside the container.
    pub pwd_given: bool,
}

/// Splits `--flag=value` and `--flag value` forms between `start` and the
/// image; a value flag missing its value is an error.
fn options(argv: &[String], start: usize, image: usize) -> Result<Vec<(String, Option<String>)>> {
    let mut out = Vec::new();
    let mut i = start;
    while i < image {
        let arg = &argv[i];
        if let Some((flag, value)) = arg.split_once('=').filter(|_| arg.starts_with("--")) {
            out.push((flag.to_string(), Some(value.to_string())));
        } else if crate::runtime::apptainer::takes_value(arg) {
            if i + 1 >= image {
                return refused(format!("apptainer option {arg} has no value"));
            }
            out.push((arg.clone(), Some(argv[i + 1].clone())));
            i += 1;
        } else {
            out.push((arg.clone(), None));
        }
        i += 1;
    }
    Ok(out)
}

/// Parses a bind value (`src[:dest[:ro|rw]][,…]`) the way Apptainer does,
/// refusing every form where Apptainer would see something else: escapes
/// (`\,` `\:`), whitespace it trims, relative destinations, other options.
pub fn parse_binds(value: &str) -> Result<Vec<Bind>> {
    let refuse = |why: &str| refused(format!("bind {value:?} cannot be used with --checkpoint-container: {why}"));
    if value.contains('\\') {
        return refuse("escaped characters are not accepted");
    }
    // Apptainer also splits binds at '^'.
    if value.contains('^') {
        return refuse("'^' separates binds for Apptainer");
    }
    let mut out = Vec::new();
    for spec in value.split(',') {
        let parts: Vec<&str> = spec.split(':').collect();
        if parts.iter().any(|p| p.trim() != *p || p.is_empty()) {
            return refuse("empty parts or leading/trailing whitespace");
        }
        if parts.iter().any(|p| p.chars().any(char::is_control)) {
            return refuse("control characters");
        }
        let (src, dest, opts) = match parts.as_slice() {
            [src] => (*src, None, None),
            [src, dest] => (*src, Some(*dest), None),
            [src, dest, opts] => (*src, Some(*dest), Some(*opts)),
            _ => return refuse("too many ':'"),
        };
        if dest.is_some_and(|d| !d.starts_with('/')) {
            return refuse("the destination must be an absolute path");
        }
        let read_only = match opts {
            None | Some("rw") => false,
            Some("ro") => true,
            Some(other) => return refuse(&format!("bind option {other} (only ro and rw)")),
        };
        out.push(Bind { src: src.to_string(), dest: dest.map(str::to_string), read_only });
    }
    Ok(out)
}

/// Whether `s` can be written into an Apptainer bind or home spec as one
/// path: Apptainer splits specs at `,` `:` `^`, un-escapes `\` and trims
/// whitespace, so a path holding any of them (a working directory alice
/// named `/tmp/e,/home/bob:/mnt`) would become other binds, resolved by root.
pub fn fits_in_bind_spec(s: &str) -> bool {
    s.starts_with('/') && s.trim() == s && !s.chars().any(|c| matches!(c, ',' | ':' | '^' | '\\') || c.is_control())
}

/// Checks the command for user `uid`/`gid` and takes it apart. `env` is the
/// task's environment (binds Apptainer would read from it are part of the
/// command).
pub fn plan(cmd: &ContainerCommand, uid: u32, gid: u32, env: &[(String, String)]) -> Result<Plan> {
    let argv = cmd.argv();
    let sub = cmd.subcommand_index();
    let image = cmd.image_index();
    for f in &argv[1..sub] {
        if !flag(GLOBAL_FLAGS, f).is_some_and(|d| matches!(d.used, Use::Shape { .. })) {
            return refused(format!("apptainer option {f} cannot be used with --checkpoint-container"));
        }
    }
    let mut p = Plan {
        globals: argv[1..sub].to_vec(),
        subcommand: argv[sub].clone(),
        options: Vec::new(),
        binds: Vec::new(),
        image: argv[image].clone(),
        args: argv[image + 1..].to_vec(),
        cleanenv: false,
        contain: false,
        no_home: false,
        pwd_given: false,
    };
    if p.image.is_empty() || p.image.chars().any(char::is_control) {
        return refused("the container image name is empty or has control characters");
    }
    let identity = format!("uid:{uid},gid:{gid}");
    for (given, value) in options(argv, sub + 1, image)? {
        match (flag(FLAGS, &given).map(|d| d.used), value) {
            (Some(Use::Shape { cleanenv, contain, no_home }), None) => {
                p.cleanenv |= cleanenv;
                p.contain |= contain;
                p.no_home |= no_home;
                p.options.push(given);
            }
            (Some(Use::Value { pwd }), Some(v)) => {
                p.pwd_given |= pwd;
                p.options.extend([given, v]);
            }
            (Some(Use::Bind), Some(v)) => p.binds.extend(parse_binds(&v)?),
            // What an admin passes for a container started by hand: the
            // identity root adds anyway, nothing else.
            (Some(Use::Security), Some(v)) if v == identity => {}
            _ => {
                return refused(format!(
                    "apptainer option {given} cannot be used with --checkpoint-container (the container is started by root for you)"
                ))
            }
        }
    }
    for (name, value) in env {
        if BIND_ENV.contains(&name.as_str()) && !value.is_empty() {
            p.binds.extend(parse_binds(value)?);
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(s: &str) -> ContainerCommand {
        ContainerCommand::parse(s.split_whitespace().map(String::from).collect()).unwrap()
    }

    fn plan_of(s: &str) -> Result<Plan> {
        plan(&cmd(s), 5, 6, &[])
    }

    #[test]
    fn takes_the_command_apart() {
        let p = plan_of("apptainer -s exec -B /data:/d:ro --bind=x --cleanenv --env A=1 app.sif ./sim 3").unwrap();
        assert_eq!(p.globals, ["-s"]);
        assert_eq!(p.subcommand, "exec");
        assert_eq!(p.options, ["--cleanenv", "--env", "A=1"]);
        assert_eq!(
            p.binds,
            [
                Bind { src: "/data".into(), dest: Some("/d".into()), read_only: true },
                Bind { src: "x".into(), dest: None, read_only: false }
            ]
        );
        assert_eq!((p.image.as_str(), p.args.join(" ")), ("app.sif", "./sim 3".into()));
        assert!(p.cleanenv && !p.contain && !p.no_home && !p.pwd_given);
        assert!(plan_of("apptainer run --containall app.sif").unwrap().contain);
    }

    #[test]
    fn refuses_options_that_would_use_roots_rights() {
        for bad in [
            "apptainer exec --add-caps CAP_SYS_ADMIN app.sif x",
            "apptainer exec --security uid:0 app.sif x",
            "apptainer exec --security uid:5,gid:6,uid:0 app.sif x",
            "apptainer exec --writable app.sif x",
            "apptainer exec --fakeroot app.sif x",
            "apptainer --config /tmp/x.conf exec app.sif x",
            "apptainer exec --overlay /x.img app.sif x",
            "apptainer exec --home /root app.sif x",
            "apptainer exec -eB /x app.sif x",
            "apptainer exec --mount type=bind,src=/root,dst=/r app.sif x",
            "apptainer exec --env-file /root/x app.sif x",
        ] {
            let e = plan_of(bad).unwrap_err();
            assert!(e.to_string().contains("cannot be used with --checkpoint-container"), "{bad}: {e}");
        }
        // The identity root adds anyway is accepted (and not repeated).
        assert!(plan_of("apptainer exec --security uid:5,gid:6 app.sif x").unwrap().options.is_empty());
    }

    #[test]
    fn refuses_binds_apptainer_would_read_differently() {
        for bad in [
            " /home/bob/p:/mnt",
            "/home/alice/l\\,Y:/mnt",
            "/a:/b\\:c",
            "/a :/b",
            "/a:rel",
            "/a:/b:nosuid",
            "/a:/b:ro:x",
            "/a,",
            ",/a",
            "/a:",
        ] {
            assert!(parse_binds(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_binds("/a,/b:/c").unwrap().len(), 2);
        assert!(parse_binds("/home/alice/d:/x^/home/bob/proj").is_err());
        assert!(fits_in_bind_spec("/home/alice/my dir"));
        for bad in ["/tmp/e,/home/bob:/mnt", "/a^b", "/a\\b", " /a", "/a\n", "rel"] {
            assert!(!fits_in_bind_spec(bad), "{bad:?}");
        }
        // A bind through the environment is a bind like any other.
        let env = [("APPTAINER_BIND".to_string(), " /root:/r".to_string())];
        assert!(plan(&cmd("apptainer exec app.sif x"), 5, 6, &env).is_err());
        let env = [("SINGULARITY_BINDPATH".to_string(), "/scratch".to_string())];
        assert_eq!(plan(&cmd("apptainer exec app.sif x"), 5, 6, &env).unwrap().binds[0].src, "/scratch");
    }
}
