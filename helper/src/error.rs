//! The engine's error: one line that says what failed and why.

use std::fmt;

#[derive(Debug)]
pub struct EngineError(pub String);

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EngineError {}

pub type Result<T> = std::result::Result<T, EngineError>;

/// Builds an error from a message; `context` wraps a lower-level error.
pub fn fail<T>(msg: impl Into<String>) -> Result<T> {
    Err(EngineError(msg.into()))
}

pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| EngineError(format!("{}: {e}", what())))
    }
}

impl From<crate::criu::CriuError> for EngineError {
    fn from(e: crate::criu::CriuError) -> Self {
        EngineError(e.to_string())
    }
}

impl From<crate::runtime::ParseError> for EngineError {
    fn from(e: crate::runtime::ParseError) -> Self {
        EngineError(e.to_string())
    }
}
