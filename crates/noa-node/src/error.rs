//! Errors of starting and running a node.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("NOA-E0700 cannot use data directory {path}: {message}")]
    DataDir { path: PathBuf, message: String },
    #[error(
        "NOA-E0701 another noa is already running with data directory {path} (it holds {path}/noa.lock); stop it or use another --data-dir"
    )]
    Locked { path: PathBuf },
    #[error("NOA-E0702 cannot listen on {addr}: {message}; pick another address with --listen")]
    Listen { addr: String, message: String },
    #[error(transparent)]
    Store(#[from] noa_store::Error),
    #[error(transparent)]
    Policy(#[from] noa_policy::Error),
    #[error(transparent)]
    Kernel(#[from] noa_kernel::Error),
    #[error("NOA-E0704 configuration error at {place}: key `{key}`: {message}")]
    Config {
        place: String,
        key: String,
        message: String,
    },
    #[error("NOA-E0703 the server failed: {0}")]
    Serve(std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
