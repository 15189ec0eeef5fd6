//! Errors of the sandbox: programs that cannot be found or started.

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    #[error("program {command:?} not found in PATH ({path})")]
    NotFound { command: String, path: String },
    #[error("{path:?} is not an executable file")]
    NotExecutable { path: String },
    #[error("working directory {cwd:?} does not exist or is not a directory")]
    BadCwd { cwd: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
