//! The engine's error: one line that says what failed and why, and which
//! kind of failure it is, for the callers that act on it (the agent starts
//! a task fresh when there is no checkpoint, names the checkpoint a failed
//! one leaves in place). Most failures are `Failed`, built by `fail` and
//! `Context`. Other modules' errors convert next to their own types (this
//! module imports none of the crate's).

use std::fmt;
use std::path::PathBuf;

#[derive(Debug)]
pub enum EngineError {
    /// Nothing at `path`: no checkpoint was ever completed there.
    NoCheckpoint { path: PathBuf },
    /// A checkpoint is there but unusable: incomplete, truncated, altered,
    /// or not written by this helper.
    Damaged(String),
    /// A security or policy check said no (another user's checkpoint or
    /// process, a container option root does not run).
    Refused(String),
    /// CRIU ran and failed (its own words).
    Criu(String),
    /// A checkpoint was not taken (`cause`). A failed checkpoint never
    /// touches its target: `kept` is the earlier checkpoint there, if any.
    NotTaken { cause: Box<EngineError>, kept: Option<PathBuf> },
    /// Anything else.
    Failed(String),
}

impl EngineError {
    /// The checkpoint a failed one left in place, if any.
    pub fn kept_checkpoint(&self) -> Option<&PathBuf> {
        match self {
            EngineError::NotTaken { kept, .. } => kept.as_ref(),
            _ => None,
        }
    }
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineError::NoCheckpoint { path } => {
                write!(f, "checkpoint {}: {}", path.display(), std::io::Error::from_raw_os_error(libc::ENOENT))
            }
            EngineError::Damaged(m) | EngineError::Refused(m) | EngineError::Criu(m) | EngineError::Failed(m) => f.write_str(m),
            // Only a CRIU failure names the one left in place: other
            // causes say enough on their own, and the caller says what
            // happens next.
            EngineError::NotTaken { cause, kept } => match (cause.as_ref(), kept) {
                (EngineError::Criu(_), Some(kept)) => write!(f, "{cause} (the checkpoint already at {} is untouched)", kept.display()),
                _ => write!(f, "{cause}"),
            },
        }
    }
}

impl std::error::Error for EngineError {}

pub type Result<T> = std::result::Result<T, EngineError>;

/// Builds an error from a message; `context` wraps a lower-level error.
pub fn fail<T>(msg: impl Into<String>) -> Result<T> {
    Err(EngineError::Failed(msg.into()))
}

pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| EngineError::Failed(format!("{}: {e}", what())))
    }
}
