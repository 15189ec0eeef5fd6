//! Errors of the policy engine: denials and bad policy files.

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    #[error("NOA-E0400 permission denied: {principal} may not {action} {resource} ({reason})")]
    Denied {
        principal: String,
        action: String,
        resource: String,
        reason: String,
    },
    #[error("NOA-E0401 invalid policy in {file} at line {line}, column {column}: {message}")]
    Parse {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("NOA-E0402 cannot read policy file {file}: {message}")]
    Io { file: String, message: String },
    #[error("NOA-E0403 policy request could not be built: {0}")]
    Request(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
