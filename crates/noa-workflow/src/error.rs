//! Errors of the workflow engine.

use crate::def::Diagnostic;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("NOA-E0900 the workflow is not valid:\n{}", render(.0))]
    Invalid(Vec<Diagnostic>),
    #[error("NOA-E0901 no workflow run {0}; `noa workflow list` shows the runs")]
    NoRun(String),
    #[error("NOA-E0902 {0}")]
    Conflict(String),
    #[error("NOA-E0903 {0}")]
    Inputs(String),
    #[error("NOA-E0904 no workflow named {0} is registered; `noa workflow registered` lists them")]
    NotRegistered(String),
    #[error("NOA-E0905 the workflow engine has stopped (the node is shutting down)")]
    Stopped,
    #[error("NOA-E0906 run {run} has no step {step}")]
    NoStep { run: String, step: String },
    #[error("NOA-E0907 the stored run {run} cannot be read: {message}")]
    Corrupt { run: String, message: String },
    #[error(transparent)]
    Store(#[from] noa_store::Error),
    #[error(transparent)]
    Kernel(#[from] noa_kernel::Error),
}

fn render(d: &[Diagnostic]) -> String {
    d.iter()
        .map(|d| format!("  {d}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl From<noa_policy::Error> for Error {
    fn from(e: noa_policy::Error) -> Self {
        Error::Kernel(noa_kernel::Error::Policy(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
