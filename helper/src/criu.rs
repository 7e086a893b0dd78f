//! Finding CRIU and checking that it can work on this kernel.
//!
//! CRIU older than 4 fails at start on the kernels we run on (vDSO layout),
//! so a node without a recent CRIU must be reported clearly, with the version
//! found, instead of failing obscurely at checkpoint time.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The oldest CRIU this product supports.
pub const MIN_VERSION: Version = Version { major: 4, minor: 0, patch: 0 };

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[derive(Debug)]
pub enum CriuError {
    /// The binary could not be executed at all.
    NotRunnable { path: PathBuf, why: String },
    /// `criu --version` printed nothing we understand.
    UnknownVersion { path: PathBuf, output: String },
    /// Found, but too old for this kernel.
    TooOld { path: PathBuf, found: Version },
}

impl fmt::Display for CriuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CriuError::NotRunnable { path, why } => {
                write!(f, "CRIU at {} cannot be run: {why}", path.display())
            }
            CriuError::UnknownVersion { path, output } => write!(
                f,
                "CRIU at {} printed no version we understand: {:?}",
                path.display(),
                output.lines().next().unwrap_or("")
            ),
            CriuError::TooOld { path, found } => write!(
                f,
                "CRIU at {} is version {found}, but {MIN_VERSION} or newer is required",
                path.display()
            ),
        }
    }
}

impl std::error::Error for CriuError {}

/// Parses the output of `criu --version` ("Version: 4.2.1", then optional lines
/// such as "GitID: …"). Two-part versions ("Version: 4.1") have patch 0.
pub fn parse_version(output: &str) -> Option<Version> {
    let line = output.lines().find_map(|l| l.trim().strip_prefix("Version:"))?;
    let mut parts = line.trim().split('.');
    let mut num = || -> Option<u32> {
        match parts.next() {
            None => Some(0),
            Some(p) => p.trim().parse().ok(),
        }
    };
    let version = Version { major: num()?, minor: num()?, patch: num()? };
    Some(version)
}

/// Runs `criu --version` and checks the version is supported.
pub fn check(criu: &Path) -> Result<Version, CriuError> {
    let out = Command::new(criu)
        .arg("--version")
        .output()
        .map_err(|e| CriuError::NotRunnable { path: criu.to_path_buf(), why: e.to_string() })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(CriuError::NotRunnable {
            path: criu.to_path_buf(),
            why: format!("`--version` exited with {}: {}", out.status, stderr.trim()),
        });
    }
    let found = parse_version(&stdout)
        .ok_or_else(|| CriuError::UnknownVersion { path: criu.to_path_buf(), output: stdout })?;
    if found < MIN_VERSION {
        return Err(CriuError::TooOld { path: criu.to_path_buf(), found });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_release_and_git_builds() {
        assert_eq!(
            parse_version("Version: 4.2.1\n"),
            Some(Version { major: 4, minor: 2, patch: 1 })
        );
        assert_eq!(
            parse_version("Version: 4.1\nGitID: v4.1-12-gdeadbee\n"),
            Some(Version { major: 4, minor: 1, patch: 0 })
        );
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("criu 4.2"), None);
        assert_eq!(parse_version("Version: four"), None);
    }

    #[test]
    fn old_versions_compare_below_minimum() {
        let old = parse_version("Version: 3.17.1").unwrap();
        assert!(old < MIN_VERSION);
        assert!(parse_version("Version: 4.0").unwrap() >= MIN_VERSION);
    }

    #[test]
    fn missing_binary_names_the_path() {
        let e = check(Path::new("/nonexistent/criu")).unwrap_err();
        assert!(e.to_string().starts_with("CRIU at /nonexistent/criu cannot be run"), "{e}");
    }

    #[test]
    fn too_old_binary_names_the_version() {
        let dir = std::env::temp_dir().join(format!("criu-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("criu");
        std::fs::write(&fake, "#!/bin/sh\necho 'Version: 3.17.1'\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let e = check(&fake).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(e.to_string(), format!("CRIU at {} is version 3.17.1, but 4.0.0 or newer is required", fake.display()));
    }
}
