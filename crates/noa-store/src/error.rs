//! Errors of the store.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("NOA-E0300 cannot open the store at {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "NOA-E0301 the store at {path} has schema version {found}, newer than this noa knows ({known}); upgrade noa"
    )]
    TooNew {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    #[error("NOA-E0302 store error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("NOA-E0303 stored record {what} is corrupt: {message}")]
    Corrupt { what: String, message: String },
    #[error("NOA-E0304 the store's writer has stopped")]
    WriterGone,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
