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
    #[error("NOA-E0305 cannot use the key file {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("NOA-E0306 {source_desc} does not unlock this store (it needs key {needed}); {hint}")]
    WrongKey {
        source_desc: String,
        needed: String,
        hint: String,
    },
    #[error("NOA-E0307 encryption error: {0}")]
    Crypto(String),
    #[error("NOA-E0308 blob storage failed: {0}")]
    BlobIo(std::io::Error),
    #[error("NOA-E0309 bad path {path:?}: {message}")]
    Path { path: String, message: String },
    #[error("NOA-E0310 no such file: {path}")]
    NotFound { path: String },
    #[error(
        "NOA-E0311 quota exceeded for {namespace}: {used} of {limit} bytes used, this change needs {needed} more; delete files or raise fs.quota_* in noa.toml"
    )]
    Quota {
        namespace: String,
        limit: u64,
        used: u64,
        needed: u64,
    },
    #[error("NOA-E0312 {path} is on a read-only mount")]
    ReadOnly { path: String },
    #[error("NOA-E0313 host file error at {path}: {message}")]
    Host { path: String, message: String },
    #[error("NOA-E0314 no such secret: {name}")]
    NoSecret { name: String },
    #[error("NOA-E0315 bad secret name {name:?}: {message}")]
    SecretName { name: String, message: String },
    #[error("NOA-E0316 backup {path}: {message}")]
    Backup { path: PathBuf, message: String },
    #[error("NOA-E0317 no such mount: {name}")]
    NoMount { name: String },
    #[error("NOA-E0318 {path} has no version {version} (it has 1..={latest})")]
    NoVersion {
        path: String,
        version: u64,
        latest: u64,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
