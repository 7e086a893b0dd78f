//! What a user may have root start for them.
//!
//! A `--checkpoint-container` task's container is started by root (so CRIU
//! can dump it) with the user's identity (`--security uid:U,gid:G`). Root
//! must not become a way around the user's own rights: only options that
//! keep the container within what the user can do are accepted, every path
//! the user names must be readable by the user (checked as the user), and the
//! environment root runs Apptainer with is cleaned.

use crate::apptainer::ContainerCommand;
use crate::error::{fail, Result};
use std::path::Path;

const GLOBAL_FLAGS: &[&str] = &["-s", "--silent", "-q", "--quiet", "--nocolor"];
const BOOL_FLAGS: &[&str] = &[
    "-e", "--cleanenv", "-c", "--contain", "-C", "--containall", "--no-home", "--writable-tmpfs", "--nv",
    "--no-init", "--no-umask", "--compat", "--no-eval",
];
/// Value flags whose value is not a host path.
const VALUE_FLAGS: &[&str] = &["--env", "--cwd", "--pwd"];
/// Value flags naming host paths, as `src[:dst[:opts]][,…]`.
const PATH_FLAGS: &[&str] = &["-B", "--bind"];

/// Environment variables root must not inherit from the job when it runs
/// Apptainer: loader hooks, and Apptainer's own settings (they are options by
/// another name; `APPTAINERENV_*` only sets the container's environment and
/// is kept).
fn env_is_safe(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    if upper.starts_with("APPTAINERENV_") || upper.starts_with("SINGULARITYENV_") {
        return true;
    }
    !(upper.starts_with("LD_") || upper.starts_with("APPTAINER") || upper.starts_with("SINGULARITY") || upper == "GCONV_PATH")
}

pub fn clean_env(env: &[(String, String)]) -> Vec<(String, String)> {
    env.iter().filter(|(k, _)| env_is_safe(k)).cloned().collect()
}

/// Splits `--flag=value` and `--flag value` forms, returning each option with
/// its value and the index of the image.
fn options(argv: &[String], start: usize, image: usize) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut i = start;
    while i < image {
        let arg = &argv[i];
        if let Some((flag, value)) = arg.split_once('=').filter(|_| arg.starts_with("--")) {
            out.push((flag.to_string(), Some(value.to_string())));
        } else if VALUE_FLAGS.contains(&arg.as_str()) || PATH_FLAGS.contains(&arg.as_str()) {
            out.push((arg.clone(), argv.get(i + 1).cloned()));
            i += 1;
        } else {
            out.push((arg.clone(), None));
        }
        i += 1;
    }
    out
}

/// Checks the command and returns it as root will run it: the user's
/// identity added, every host path checked with `readable(path)`.
pub fn root_started(
    cmd: &ContainerCommand,
    uid: u32,
    gid: u32,
    cwd: &Path,
    readable: impl Fn(&Path) -> bool,
) -> Result<Vec<String>> {
    let argv = cmd.argv();
    let sub = cmd.subcommand_index();
    let image = cmd.image_index();
    for flag in &argv[1..sub] {
        if !GLOBAL_FLAGS.contains(&flag.as_str()) {
            return fail(format!("apptainer option {flag} cannot be used with --checkpoint-container"));
        }
    }
    for (flag, value) in options(argv, sub + 1, image) {
        if BOOL_FLAGS.contains(&flag.as_str()) && value.is_none() {
            continue;
        }
        if VALUE_FLAGS.contains(&flag.as_str()) && value.is_some() {
            continue;
        }
        if PATH_FLAGS.contains(&flag.as_str()) {
            let value = value.unwrap_or_default();
            for spec in value.split(',') {
                let src = spec.split(':').next().unwrap_or("");
                let path = cwd.join(src);
                if src.is_empty() || !readable(&path) {
                    return fail(format!("bind source {src} is not readable by you"));
                }
            }
            continue;
        }
        return fail(format!(
            "apptainer option {flag} cannot be used with --checkpoint-container (the container is started by root for you)"
        ));
    }
    let image_path = cwd.join(&argv[image]);
    if !readable(&image_path) {
        return fail(format!("container image {} is not readable by you", argv[image]));
    }
    let mut out: Vec<String> = argv[..=sub].to_vec();
    out.extend(["--security".into(), format!("uid:{uid},gid:{gid}")]);
    out.extend_from_slice(&argv[sub + 1..image]);
    out.push(image_path.to_string_lossy().into_owned());
    out.extend_from_slice(&argv[image + 1..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(s: &str) -> ContainerCommand {
        ContainerCommand::parse(s.split_whitespace().map(String::from).collect()).unwrap()
    }

    fn all_readable(_: &Path) -> bool {
        true
    }

    #[test]
    fn adds_identity_and_makes_the_image_absolute() {
        let out = root_started(&cmd("apptainer -s exec -B /data:/d --cleanenv app.sif ./sim 3"), 5, 6, Path::new("/home/u"), all_readable).unwrap();
        assert_eq!(out.join(" "), "apptainer -s exec --security uid:5,gid:6 -B /data:/d --cleanenv /home/u/app.sif ./sim 3");
    }

    #[test]
    fn refuses_options_that_would_use_roots_rights() {
        for bad in [
            "apptainer exec --add-caps CAP_SYS_ADMIN app.sif x",
            "apptainer exec --security uid:0 app.sif x",
            "apptainer exec --writable app.sif x",
            "apptainer exec --fakeroot app.sif x",
            "apptainer --config /tmp/x.conf exec app.sif x",
            "apptainer exec --overlay /x.img app.sif x",
        ] {
            let e = root_started(&cmd(bad), 5, 5, Path::new("/"), all_readable).unwrap_err();
            assert!(e.0.contains("cannot be used with --checkpoint-container"), "{bad}: {e}");
        }
    }

    #[test]
    fn paths_must_be_readable_by_the_user() {
        let only_data = |p: &Path| p.starts_with("/data") || p.ends_with("app.sif");
        assert!(root_started(&cmd("apptainer exec --bind /data,/data/x:/y app.sif x"), 5, 5, Path::new("/"), only_data).is_ok());
        let e = root_started(&cmd("apptainer exec --bind /data,/root:/r app.sif x"), 5, 5, Path::new("/"), only_data).unwrap_err();
        assert_eq!(e.0, "bind source /root is not readable by you");
        let e = root_started(&cmd("apptainer exec other.sif x"), 5, 5, Path::new("/"), |p: &Path| p.starts_with("/data")).unwrap_err();
        assert_eq!(e.0, "container image other.sif is not readable by you");
    }

    #[test]
    fn environment_loses_loader_hooks_and_apptainer_settings() {
        let env: Vec<(String, String)> = [("PATH", "/bin"), ("LD_PRELOAD", "/x.so"), ("APPTAINER_BIND", "/"), ("APPTAINERENV_FOO", "1"), ("HOME", "/h")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let names: Vec<String> = clean_env(&env).into_iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["PATH", "APPTAINERENV_FOO", "HOME"]);
    }
}
