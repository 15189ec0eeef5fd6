//! The virtual file system: paths over encrypted, content-addressed, deduplicated blobs, with history.
//!
//! Namespaces: `/agents/<name>/…`, `/runs/<id>/…`, `/shared/…` live in the store; `/host/<mount>/…` maps to a
//! host folder granted by a mount. A stored file is a row in `fs_files` naming its current version; every
//! write, delete and rollback adds a row to `fs_versions`, so history is complete and rollback is a new version.
//! Contents are blobs named by a keyed BLAKE3 hash of the plaintext (so equal contents are stored once):
//! small ones inline in the database, larger ones as files under `blobs/`, written and fsynced before the
//! transaction that references them commits. Quotas are per namespace (`/agents/<name>`, `/runs/<id>`,
//! `/shared`) over the current size of its files, kept in `fs_usage` inside the same transaction.

use crate::crypto::{self, BlobFileOpener, BlobFileSealer, BlobOpener, BlobSealer, DataKey};
use crate::{Error, Result};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Longest path, in bytes.
pub const MAX_PATH: usize = 4096;
/// Longest path component, in bytes.
pub const MAX_NAME: usize = 255;

/// A validated VFS path: absolute, normalized, no `.`/`..`, no NUL, within a known namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VPath {
    path: String,
    kind: Namespace,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Namespace {
    /// The namespace key (`/agents/x`, `/runs/y`, `/shared`) of a stored path.
    Stored(String),
    /// A host mount and the path below it (components, possibly empty).
    Host { mount: String, rest: Vec<String> },
    /// `/`, `/agents`, `/runs`, `/host`: directories that only list.
    Root,
}

fn bad(path: &str, message: impl Into<String>) -> Error {
    Error::Path {
        path: path.chars().take(200).collect(),
        message: message.into(),
    }
}

impl VPath {
    pub fn parse(path: &str) -> Result<VPath> {
        if path.is_empty() {
            return Err(bad(path, "empty path"));
        }
        if path.len() > MAX_PATH {
            return Err(bad(
                path,
                format!("longer than {MAX_PATH} bytes ({})", path.len()),
            ));
        }
        if path.contains('\0') {
            return Err(bad(path, "contains a NUL byte"));
        }
        if !path.starts_with('/') {
            return Err(bad(path, "must be absolute (start with /)"));
        }
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for p in &parts {
            if *p == "." || *p == ".." {
                return Err(bad(path, format!("contains {p:?}; paths may not step out")));
            }
            if p.len() > MAX_NAME {
                return Err(bad(
                    path,
                    format!("a component is longer than {MAX_NAME} bytes"),
                ));
            }
            if p.chars().any(|c| c.is_control()) {
                return Err(bad(path, "contains a control character"));
            }
        }
        let normal = format!("/{}", parts.join("/"));
        let kind = match parts.as_slice() {
            [] | ["agents"] | ["runs"] | ["host"] => Namespace::Root,
            ["shared", ..] => Namespace::Stored("/shared".into()),
            [top @ ("agents" | "runs"), name, ..] => {
                noa_types::validate_name(name).map_err(|e| bad(path, e.to_string()))?;
                Namespace::Stored(format!("/{top}/{name}"))
            }
            ["host", mount, rest @ ..] => Namespace::Host {
                mount: (*mount).to_owned(),
                rest: rest.iter().map(|s| (*s).to_owned()).collect(),
            },
            [top, ..] => {
                return Err(bad(
                    path,
                    format!(
                        "unknown top-level folder {top:?}; use /agents/<name>, /runs/<id>, /shared or /host/<mount>"
                    ),
                ));
            }
        };
        Ok(VPath { path: normal, kind })
    }

    pub fn as_str(&self) -> &str {
        &self.path
    }

    pub fn namespace(&self) -> &Namespace {
        &self.kind
    }

    /// The path, required to name a stored file (not a namespace root or host path).
    pub fn stored_file(&self) -> Result<&str> {
        match &self.kind {
            Namespace::Stored(ns) if self.path.len() > ns.len() => Ok(&self.path),
            Namespace::Stored(_) | Namespace::Root => Err(bad(
                &self.path,
                "is a folder, not a file (write files below it)",
            )),
            Namespace::Host { .. } => Err(bad(&self.path, "is on a host mount")),
        }
    }
}

impl std::fmt::Display for VPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.path)
    }
}

/// Quota of each kind of namespace, in bytes (0: unlimited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quotas {
    pub agent: u64,
    pub run: u64,
    pub shared: u64,
}

impl Default for Quotas {
    fn default() -> Quotas {
        Quotas {
            agent: 256 << 20,
            run: 256 << 20,
            shared: 1 << 30,
        }
    }
}

impl Quotas {
    /// The quota of the namespace `ns` (`/shared`, `/agents/<name>`, `/runs/<id>`).
    pub fn limit(&self, ns: &str) -> u64 {
        if ns == "/shared" {
            self.shared
        } else if ns.starts_with("/agents/") {
            self.agent
        } else {
            self.run
        }
    }
}

/// A blob written and made durable, ready to be referenced by a transaction.
#[derive(Clone, Debug)]
pub struct StagedBlob {
    pub id: String,
    pub size: u64,
    /// The sealed bytes when the blob fits one chunk and is kept in the database.
    pub(crate) inline: Option<Vec<u8>>,
}

/// A file writer that starts the disk flush early: every 32 MiB a background thread asks the kernel to
/// write what it has (`fdatasync` on a second handle), so the final fsync has little left to do.
struct WriteBehind {
    file: std::fs::File,
    written: u64,
    flushed_at: u64,
    kick: Option<std::sync::mpsc::SyncSender<()>>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

const WRITE_BEHIND_EVERY: u64 = 32 << 20;

impl WriteBehind {
    fn new(file: std::fs::File) -> WriteBehind {
        WriteBehind {
            file,
            written: 0,
            flushed_at: 0,
            kick: None,
            flusher: None,
        }
    }

    fn start_flusher(&mut self) {
        let Ok(twin) = self.file.try_clone() else {
            return;
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        self.kick = Some(tx);
        self.flusher = std::thread::Builder::new()
            .name("noa-blob-flush".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    let _ = twin.sync_data();
                }
            })
            .ok();
    }

    /// Makes everything durable and returns the file.
    fn finish(mut self) -> std::io::Result<std::fs::File> {
        self.kick = None;
        if let Some(f) = self.flusher.take() {
            let _ = f.join();
        }
        self.file.sync_all()?;
        Ok(self.file)
    }
}

impl Write for WriteBehind {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.flushed_at >= WRITE_BEHIND_EVERY {
            self.flushed_at = self.written;
            if self.kick.is_none() {
                self.start_flusher();
            }
            if let Some(k) = &self.kick {
                // Full means a flush is already under way: it will cover this too.
                let _ = k.try_send(());
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Streams plaintext into an encrypted blob. Small blobs end up inline in the database.
pub struct BlobWriter<'k> {
    key: &'k DataKey,
    /// The first bytes, kept in memory: a blob that never outgrows one chunk never touches a file.
    head: Vec<u8>,
    /// Once it has: the sealer writing the staging file, and the file's path.
    file: Option<(BlobFileSealer<WriteBehind>, PathBuf)>,
    blobs_dir: PathBuf,
}

impl<'k> BlobWriter<'k> {
    pub(crate) fn new(key: &'k DataKey, blobs_dir: &Path) -> Result<BlobWriter<'k>> {
        Ok(BlobWriter {
            key,
            head: Vec::new(),
            file: None,
            blobs_dir: blobs_dir.to_owned(),
        })
    }

    fn spill(&mut self) -> Result<()> {
        let tmp_dir = self.blobs_dir.join("tmp");
        std::fs::create_dir_all(&tmp_dir).map_err(Error::BlobIo)?;
        let mut name = [0u8; 12];
        getrandom::fill(&mut name).map_err(|e| Error::Crypto(e.to_string()))?;
        let tmp = tmp_dir.join(crate::crypto::hex(&name));
        let file = std::fs::File::create(&tmp).map_err(Error::BlobIo)?;
        let mut sealer = BlobFileSealer::new(self.key, WriteBehind::new(file))?;
        sealer.write(&std::mem::take(&mut self.head))?;
        self.file = Some((sealer, tmp));
        Ok(())
    }

    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        if self.file.is_none() {
            if self.head.len() + data.len() <= crate::crypto::CHUNK {
                self.head.extend_from_slice(data);
                return Ok(());
            }
            self.spill()?;
        }
        match &mut self.file {
            Some((sealer, _)) => sealer.write(data),
            None => Err(Error::Crypto("the blob writer lost its file".into())),
        }
    }

    /// Seals the blob and makes it durable under its id. (Dropping the writer instead abandons the blob.)
    pub fn finish(mut self) -> Result<StagedBlob> {
        let key = self.key;
        let head = std::mem::take(&mut self.head);
        let blobs_dir = std::mem::take(&mut self.blobs_dir);
        let Some((sealer, tmp)) = self.file.take() else {
            // One chunk at most: sealed in memory and kept in the database.
            let mut sealer = BlobSealer::new(key, Vec::with_capacity(head.len() + 64))?;
            sealer.write(&head)?;
            let (sealed, id, size, _) = sealer.finish()?;
            return Ok(StagedBlob {
                id,
                size,
                inline: Some(sealed),
            });
        };
        let result = (|| {
            let (file, id, size) = sealer.finish()?;
            let dest = blob_path(&blobs_dir, &id);
            if dest.exists() {
                // Same contents already stored: deduplicated.
                let _ = std::fs::remove_file(&tmp);
            } else {
                drop(file.finish().map_err(Error::BlobIo)?);
                let dir = dest.parent().unwrap_or(&blobs_dir);
                let new_dir = !dir.exists();
                std::fs::create_dir_all(dir).map_err(Error::BlobIo)?;
                std::fs::rename(&tmp, &dest).map_err(Error::BlobIo)?;
                crate::crypto::sync_dir(dir);
                if new_dir {
                    // The new folder's own entry must be durable too, or the blob could vanish after a crash.
                    crate::crypto::sync_dir(&blobs_dir);
                    if let Some(data_dir) = blobs_dir.parent() {
                        crate::crypto::sync_dir(data_dir);
                    }
                }
            }
            Ok(StagedBlob {
                id,
                size,
                inline: None,
            })
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

impl Drop for BlobWriter<'_> {
    fn drop(&mut self) {
        // Not finished: the staged file is garbage.
        if let Some((_, tmp)) = self.file.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Removes blob files that no database row references (left by writes that failed or were cut off after
/// their blob was staged). Only safe while nothing else writes: the store runs it when it opens.
pub(crate) fn collect_garbage(conn: &Connection, blobs_dir: &Path) -> Result<usize> {
    let Ok(top) = std::fs::read_dir(blobs_dir) else {
        return Ok(0);
    };
    let mut known = std::collections::HashSet::new();
    {
        let mut st = conn.prepare("SELECT id FROM blobs WHERE inline IS NULL")?;
        for id in st.query_map([], |r| r.get::<_, String>(0))? {
            known.insert(id?);
        }
    }
    let mut removed = 0;
    for sub in top.flatten() {
        let name = sub.file_name().to_string_lossy().into_owned();
        if name.len() != 2 || !sub.path().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(sub.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let id = f.file_name().to_string_lossy().into_owned();
            if !known.contains(&id) && std::fs::remove_file(f.path()).is_ok() {
                removed += 1;
            }
        }
    }
    Ok(removed)
}

pub(crate) fn blob_path(blobs_dir: &Path, id: &str) -> PathBuf {
    blobs_dir.join(id.get(..2).unwrap_or(id)).join(id)
}

/// One change in a VFS transaction.
#[derive(Clone, Debug)]
pub enum FsOp {
    Put { path: String, blob: StagedBlob },
    Delete { path: String },
    Rollback { path: String, to: u64 },
}

impl FsOp {
    pub fn path(&self) -> &str {
        match self {
            FsOp::Put { path, .. } | FsOp::Delete { path } | FsOp::Rollback { path, .. } => path,
        }
    }
}

/// A file's current state, or one version of it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FileInfo {
    pub path: String,
    pub version: u64,
    pub size: u64,
    pub mtime_ms: u64,
    pub op: String,
    pub principal: String,
}

/// An entry of a folder listing.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DirEntry {
    pub name: String,
    pub dir: bool,
    pub size: u64,
    pub version: Option<u64>,
    pub mtime_ms: Option<u64>,
}

fn namespace_of(path: &str) -> Result<String> {
    match VPath::parse(path)?.kind {
        Namespace::Stored(ns) => Ok(ns),
        _ => Err(bad(path, "not a stored path")),
    }
}

/// Applies one transaction's operations (inside the writer's savepoint). Returns the new states.
pub(crate) fn apply(
    conn: &Connection,
    ops: &[FsOp],
    principal: &str,
    quotas: &Quotas,
) -> Result<Vec<FileInfo>> {
    let now = noa_types::now_ms() as i64;
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        let path = op.path();
        let ns = namespace_of(path)?;
        let current: Option<(i64, i64, String)> = conn
            .prepare_cached("SELECT version, size, blob FROM fs_files WHERE path = ?1")?
            .query_row(params![path], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        let latest: i64 = conn
            .prepare_cached("SELECT COALESCE(MAX(version), 0) FROM fs_versions WHERE path = ?1")?
            .query_row(params![path], |r| r.get(0))?;
        let version = latest + 1;
        let old_size = current.as_ref().map(|c| c.1).unwrap_or(0);
        let (new_blob, new_size, op_name): (Option<String>, i64, &str) = match op {
            FsOp::Put { blob, .. } => {
                conn.prepare_cached(
                    "INSERT INTO blobs (id, size, inline, created_ms) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(id) DO NOTHING",
                )?
                .execute(params![blob.id, blob.size as i64, blob.inline, now])?;
                (Some(blob.id.clone()), blob.size as i64, "write")
            }
            FsOp::Delete { .. } => {
                if current.is_none() {
                    return Err(Error::NotFound {
                        path: path.to_owned(),
                    });
                }
                (None, 0, "delete")
            }
            FsOp::Rollback { to, .. } => {
                let row: Option<(Option<String>, i64)> = conn
                    .prepare_cached(
                        "SELECT blob, size FROM fs_versions WHERE path = ?1 AND version = ?2",
                    )?
                    .query_row(params![path, *to as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                match row {
                    Some((blob, size)) => (blob, size, "rollback"),
                    None if latest == 0 => {
                        return Err(Error::NotFound {
                            path: path.to_owned(),
                        });
                    }
                    None => {
                        return Err(Error::NoVersion {
                            path: path.to_owned(),
                            version: *to,
                            latest: latest as u64,
                        });
                    }
                }
            }
        };
        let delta = new_size - old_size;
        if delta > 0 {
            let used: i64 = conn
                .prepare_cached("SELECT COALESCE((SELECT bytes FROM fs_usage WHERE ns = ?1), 0)")?
                .query_row(params![ns], |r| r.get(0))?;
            let limit = quotas.limit(&ns);
            if limit > 0 && (used + delta) as u64 > limit {
                return Err(Error::Quota {
                    namespace: ns,
                    limit,
                    used: used as u64,
                    needed: delta as u64,
                });
            }
        }
        if delta != 0 {
            conn.prepare_cached(
                "INSERT INTO fs_usage (ns, bytes) VALUES (?1, ?2)
                 ON CONFLICT(ns) DO UPDATE SET bytes = bytes + excluded.bytes",
            )?
            .execute(params![ns, delta])?;
        }
        conn.prepare_cached(
            "INSERT INTO fs_versions (path, version, blob, size, op, principal, ts_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            path, version, new_blob, new_size, op_name, principal, now
        ])?;
        match &new_blob {
            Some(blob) => {
                conn.prepare_cached(
                    "INSERT INTO fs_files (path, ns, version, blob, size, mtime_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT(path) DO UPDATE SET version = excluded.version, blob = excluded.blob,
                       size = excluded.size, mtime_ms = excluded.mtime_ms",
                )?
                .execute(params![path, ns, version, blob, new_size, now])?;
            }
            None => {
                conn.prepare_cached("DELETE FROM fs_files WHERE path = ?1")?
                    .execute(params![path])?;
            }
        }
        out.push(FileInfo {
            path: path.to_owned(),
            version: version as u64,
            size: new_size as u64,
            mtime_ms: now as u64,
            op: op_name.to_owned(),
            principal: principal.to_owned(),
        });
    }
    Ok(out)
}

/// Where a stored file's contents are.
pub(crate) enum BlobLocation {
    Inline(String, Vec<u8>),
    File(String, PathBuf),
}

pub(crate) fn locate(
    conn: &Connection,
    blobs_dir: &Path,
    path: &str,
    version: Option<u64>,
) -> Result<(FileInfo, BlobLocation)> {
    let row: Option<(i64, Option<String>, i64, i64, String, String)> = match version {
        None => conn
            .prepare_cached(
                "SELECT f.version, f.blob, f.size, f.mtime_ms, v.op, v.principal FROM fs_files f
                 JOIN fs_versions v ON v.path = f.path AND v.version = f.version WHERE f.path = ?1",
            )?
            .query_row(params![path], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })
            .optional()?,
        Some(v) => conn
            .prepare_cached(
                "SELECT version, blob, size, ts_ms, op, principal FROM fs_versions WHERE path = ?1 AND version = ?2",
            )?
            .query_row(params![path, v as i64], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })
            .optional()?,
    };
    let Some((version, blob, size, mtime, op, principal)) = row else {
        if let Some(v) = version {
            let latest: i64 = conn.query_row(
                "SELECT COALESCE(MAX(version), 0) FROM fs_versions WHERE path = ?1",
                params![path],
                |r| r.get(0),
            )?;
            if latest > 0 {
                return Err(Error::NoVersion {
                    path: path.to_owned(),
                    version: v,
                    latest: latest as u64,
                });
            }
        }
        return Err(Error::NotFound {
            path: path.to_owned(),
        });
    };
    let info = FileInfo {
        path: path.to_owned(),
        version: version as u64,
        size: size as u64,
        mtime_ms: mtime as u64,
        op,
        principal,
    };
    let Some(blob) = blob else {
        // A version that records a deletion has no contents.
        return Err(Error::NotFound {
            path: format!("{path} (version {version} is a deletion)"),
        });
    };
    let inline: Option<Option<Vec<u8>>> = conn
        .prepare_cached("SELECT inline FROM blobs WHERE id = ?1")?
        .query_row(params![blob], |r| r.get(0))
        .optional()?;
    match inline {
        Some(Some(bytes)) => Ok((info, BlobLocation::Inline(blob, bytes))),
        Some(None) => {
            let path = blob_path(blobs_dir, &blob);
            Ok((info, BlobLocation::File(blob, path)))
        }
        None => Err(Error::Corrupt {
            what: format!("file {path}"),
            message: format!("its blob {blob} is not in the blob table"),
        }),
    }
}

/// Reads a stored file chunk by chunk.
#[derive(Debug)]
pub struct FileReader {
    key: std::sync::Arc<DataKey>,
    source: ReaderSource,
    id: String,
    pub info: FileInfo,
}

#[derive(Debug)]
enum ReaderSource {
    Inline(Option<Vec<u8>>),
    File(PathBuf),
}

impl FileReader {
    pub(crate) fn new(key: std::sync::Arc<DataKey>, info: FileInfo, loc: BlobLocation) -> Self {
        let (id, source) = match loc {
            BlobLocation::Inline(id, b) => (id, ReaderSource::Inline(Some(b))),
            BlobLocation::File(id, p) => (id, ReaderSource::File(p)),
        };
        FileReader {
            key,
            info,
            source,
            id,
        }
    }

    /// Calls `each` with the plaintext in order, a piece at a time (up to about 1 MiB); stops at the first error it
    /// returns.
    pub fn for_each_chunk(
        self,
        mut each: impl FnMut(Vec<u8>) -> std::result::Result<(), ()>,
    ) -> Result<()> {
        let what = format!("file {}", self.info.path);
        match self.source {
            ReaderSource::Inline(b) => {
                let b = b.unwrap_or_default();
                let mut o = BlobOpener::new(&self.key, &b[..], &self.id, &what)?;
                while let Some(c) = o.next_chunk()? {
                    if each(c).is_err() {
                        break;
                    }
                }
            }
            ReaderSource::File(p) => {
                let f = std::fs::File::open(&p).map_err(|e| Error::Corrupt {
                    what: what.clone(),
                    message: format!("its blob file {} cannot be read: {e}", p.display()),
                })?;
                let size = f.metadata().map(|m| m.len()).unwrap_or(0);
                if size <= (crypto::HEADER + crypto::BLOCK) as u64 {
                    let mut o = BlobOpener::new(&self.key, f, &self.id, &what)?;
                    while let Some(c) = o.next_chunk()? {
                        if each(c).is_err() {
                            break;
                        }
                    }
                } else {
                    // Larger blobs are read and decrypted on threads of their own, a block ahead.
                    let mut o = BlobFileOpener::new(&self.key, f, &self.id, &what)?;
                    while let Some(c) = o.next_block()? {
                        if each(c).is_err() {
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The whole contents.
    pub fn read_all(self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.info.size as usize);
        self.for_each_chunk(|c| {
            out.extend_from_slice(&c);
            Ok(())
        })?;
        Ok(out)
    }

    /// Copies the contents into `w`.
    pub fn copy_to(self, w: &mut impl Write) -> Result<()> {
        let mut err = None;
        self.for_each_chunk(|c| {
            w.write_all(&c).map_err(|e| {
                err = Some(e);
            })
        })?;
        match err {
            Some(e) => Err(Error::BlobIo(e)),
            None => Ok(()),
        }
    }
}

pub(crate) fn history(conn: &Connection, path: &str) -> Result<Vec<FileInfo>> {
    let mut stmt = conn.prepare_cached(
        "SELECT version, size, ts_ms, op, principal FROM fs_versions WHERE path = ?1 ORDER BY version",
    )?;
    let rows = stmt.query_map(params![path], |r| {
        Ok(FileInfo {
            path: path.to_owned(),
            version: r.get::<_, i64>(0)? as u64,
            size: r.get::<_, i64>(1)? as u64,
            mtime_ms: r.get::<_, i64>(2)? as u64,
            op: r.get(3)?,
            principal: r.get(4)?,
        })
    })?;
    let out = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    if out.is_empty() {
        return Err(Error::NotFound {
            path: path.to_owned(),
        });
    }
    Ok(out)
}

/// Lists the stored entries directly under `dir` (files, and folders derived from deeper paths).
pub(crate) fn list_stored(conn: &Connection, dir: &str) -> Result<Vec<DirEntry>> {
    let prefix = if dir == "/" {
        "/".to_owned()
    } else {
        format!("{dir}/")
    };
    // Every path that starts with `prefix`: those in [prefix, prefix with its last byte '/' raised to '0').
    let upper = format!("{}0", &prefix[..prefix.len() - 1]);
    let mut stmt = conn.prepare_cached(
        "SELECT path, size, version, mtime_ms FROM fs_files WHERE path >= ?1 AND path < ?2 ORDER BY path",
    )?;
    let rows = stmt.query_map(params![prefix, upper], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    let mut out: Vec<DirEntry> = Vec::new();
    for row in rows {
        let (path, size, version, mtime) = row?;
        let rest = &path[prefix.len()..];
        match rest.split_once('/') {
            None => out.push(DirEntry {
                name: rest.to_owned(),
                dir: false,
                size: size as u64,
                version: Some(version as u64),
                mtime_ms: Some(mtime as u64),
            }),
            Some((folder, _)) => match out.last_mut() {
                Some(e) if e.dir && e.name == folder => e.size += size as u64,
                _ => out.push(DirEntry {
                    name: folder.to_owned(),
                    dir: true,
                    size: size as u64,
                    version: None,
                    mtime_ms: None,
                }),
            },
        }
    }
    Ok(out)
}

/// A host folder mounted at `/host/<name>`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Mount {
    pub name: String,
    pub host_path: String,
    pub read_only: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn paths_are_validated_and_normalized() {
        let ok = VPath::parse("/shared//notes.md/").unwrap();
        assert_eq!(ok.as_str(), "/shared/notes.md");
        assert_eq!(ok.namespace(), &Namespace::Stored("/shared".into()));
        assert_eq!(
            VPath::parse("/agents/bot/x").unwrap().namespace(),
            &Namespace::Stored("/agents/bot".into())
        );
        for (p, msg) in [
            ("shared/x", "absolute"),
            ("/shared/../etc/passwd", "\"..\""),
            ("/shared/./x", "\".\""),
            ("/shared/a\0b", "NUL"),
            ("/etc/passwd", "unknown top-level folder \"etc\""),
            ("/agents/Bad Name/x", "agents"),
        ] {
            let e = VPath::parse(p).unwrap_err().to_string();
            assert!(e.contains("NOA-E0309"), "{p}: {e}");
            assert!(e.contains(msg) || p.contains("Bad"), "{p}: {e}");
        }
        let long = format!("/shared/{}", "a".repeat(300));
        assert!(VPath::parse(&long).unwrap_err().to_string().contains("255"));
        let deep = format!("/shared{}", "/a".repeat(3000));
        assert!(
            VPath::parse(&deep)
                .unwrap_err()
                .to_string()
                .contains("4096")
        );
        assert!(VPath::parse("/shared").unwrap().stored_file().is_err());
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_never_keeps_dots(s in "\\PC{0,64}") {
            if let Ok(p) = VPath::parse(&s) {
                prop_assert!(p.as_str().starts_with('/'));
                prop_assert!(!p.as_str().split('/').any(|c| c == ".." || c == "."));
            }
        }
    }
}
