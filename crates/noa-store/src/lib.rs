//! The embedded store of NOA ARK OS: one SQLite database in WAL mode with `synchronous=FULL`.
//!
//! Writes go through a single writer thread that commits whatever is queued in one transaction
//! (group commit) and acknowledges each write only after that transaction is durable. Reads use their
//! own connection, which WAL lets run beside the writer. The schema is versioned by [`migrations`].
//!
//! What it holds: the lifecycle `journal`, the `processes` registry of spawned specs, the [`vfs`] (encrypted
//! blobs with history, host mounts), secrets, and the hash-chained [`audit`] log; [`backup`] snapshots it all.
//! Files around the database in its folder: `blobs/` (encrypted file contents), `store.key` (the key that wraps
//! the data key, see [`crypto`]) and `node.key` (the node's ed25519 key that signs audit checkpoints).

pub mod audit;
pub mod backup;
pub mod crypto;
mod error;
pub mod host;
mod keyring;
mod migrations;
pub mod vfs;
pub mod workflows;
mod writer;

pub use audit::{AuditEntry, AuditQuery, AuditRecord, AuditReport};
pub use crypto::KeySource;
pub use error::{Error, Result};
pub use host::{HostEntry, HostWrite};
pub use vfs::{DirEntry, FileInfo, FileReader, FsOp, Mount, Namespace, Quotas, StagedBlob, VPath};
pub use workflows::{RegisteredWorkflow, RunEvent, RunQuery, RunRecord};

use crypto::DataKey;
use noa_types::{Event, Pid, ProcessSpec};
use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, params};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;
use writer::Command;

/// How to open a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// What unlocks the data key (default: the key file `store.key` beside the database).
    pub key: KeySource,
    /// The node's signing key file (default: `node.key` beside the database); created on first open.
    pub node_key: PathBuf,
    /// A signed checkpoint every this many audit records (default 1000).
    pub checkpoint_every: u64,
    pub quotas: Quotas,
}

impl StoreOptions {
    /// The defaults for a database in `dir`.
    pub fn for_dir(dir: &Path) -> StoreOptions {
        StoreOptions {
            key: KeySource::File(dir.join("store.key")),
            node_key: dir.join("node.key"),
            checkpoint_every: 1000,
            quotas: Quotas::default(),
        }
    }
}

/// A secret's name and when it was last set; the value is never part of a listing.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SecretInfo {
    pub name: String,
    pub updated_ms: u64,
}

/// Where a key file that was rotated away is kept: `<key file>.<its key id>`.
pub fn retired_key_path(key_file: &Path, key_id: &str) -> PathBuf {
    let mut name = key_file.as_os_str().to_owned();
    name.push(format!(".{key_id}"));
    PathBuf::from(name)
}

/// Checks a secret name: 1 to 128 of `A-Z a-z 0-9 _ . -`.
pub fn validate_secret_name(name: &str) -> Result<()> {
    noa_types::check_secret_name(name).map_err(|m| Error::SecretName {
        name: name.chars().take(140).collect(),
        message: m.into(),
    })
}

/// A stored process spec with its registry order and the OS process it last ran as.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredSpec {
    /// Spawn order: parents come before children.
    pub seq: i64,
    pub spec: ProcessSpec,
    /// OS pid of the process group leader while it ran, to clean up after a crash of the daemon.
    pub os_pid: Option<u32>,
    /// Start time of that OS process (clock ticks since boot, from /proc), to tell it from a reused pid.
    pub os_start: Option<u64>,
}

/// Filters for reading the journal.
#[derive(Clone, Debug, Default)]
pub struct EventQuery {
    /// Only events after this sequence number.
    pub after: Option<u64>,
    pub name: Option<String>,
    pub pid: Option<Pid>,
    /// At most this many (the newest ones), default 100.
    pub limit: Option<u32>,
}

/// The store handle. Cloning shares it.
#[derive(Clone)]
pub struct Store {
    inner: std::sync::Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    dir: PathBuf,
    writer: std::sync::mpsc::Sender<Command>,
    reader: Mutex<Connection>,
    key: Arc<DataKey>,
    kek_id: Mutex<String>,
    key_source: Mutex<KeySource>,
    node_key: ed25519_dalek::VerifyingKey,
    quotas: Quotas,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn open_conn(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

impl Store {
    /// Opens (creating if needed) the database at `path` with the default keys beside it.
    pub fn open(path: &Path) -> Result<Store> {
        let dir = path.parent().unwrap_or(Path::new("."));
        Store::open_with(path, StoreOptions::for_dir(dir))
    }

    /// Opens (creating if needed) the database at `path`, unlocks its data key and brings its schema up to date.
    pub fn open_with(path: &Path, opts: StoreOptions) -> Result<Store> {
        let mut conn = open_conn(path)?;
        migrations::migrate(&mut conn, path)?;
        let (key, kek_id) = keyring::unlock(&conn, &opts.key)?;
        let data_dir = path.parent().unwrap_or(Path::new("."));
        match vfs::collect_garbage(&conn, &data_dir.join("blobs")) {
            Ok(0) => {}
            Ok(n) => tracing::info!(n, "Removed blob files no file refers to."),
            Err(e) => tracing::warn!(error = %e, "Could not look for unreferenced blob files."),
        }
        let signer = audit::load_or_create_node_key(&opts.node_key)?;
        let node_key = signer.verifying_key();
        let chain = audit::Chain::load(&conn, signer, opts.checkpoint_every)?;
        let reader = open_conn(path)?;
        let writer = writer::start(
            conn,
            writer::WriterState {
                chain,
                quotas: opts.quotas,
                head_file: data_dir.join(audit::HEAD_FILE),
            },
        )?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_owned();
        // Blobs staged by a writer, and snapshots staged by a backup, that crashed before finishing are garbage.
        let _ = std::fs::remove_dir_all(dir.join("blobs").join("tmp"));
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".backup-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                dir,
                writer,
                reader: Mutex::new(reader),
                key: Arc::new(key),
                kek_id: Mutex::new(kek_id),
                key_source: Mutex::new(opts.key),
                node_key,
                quotas: opts.quotas,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The folder of the database (the data directory).
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn blobs_dir(&self) -> PathBuf {
        self.inner.dir.join("blobs")
    }

    fn reader(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.inner.reader.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The id of the key that currently wraps the data key.
    pub fn kek_id(&self) -> String {
        self.inner
            .kek_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The node's public key (hex), which signs audit checkpoints.
    pub fn node_public_key(&self) -> String {
        crypto::hex(self.inner.node_key.as_bytes())
    }

    pub fn quotas(&self) -> Quotas {
        self.inner.quotas
    }

    async fn exec(
        &self,
        statements: Vec<(&'static str, Vec<Value>)>,
        must_change: Option<Error>,
        audit: Option<AuditRecord>,
    ) -> Result<usize> {
        self.send_acked(|ack| Command::Exec {
            statements,
            must_change,
            audit,
            ack,
        })
        .await
    }

    // ----- small settings -----

    /// A value of the `meta` table.
    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        use rusqlite::OptionalExtension;
        Ok(self
            .reader()
            .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
            .query_row(params![key], |r| r.get(0))
            .optional()?)
    }

    /// Sets a value of the `meta` table, with an audit record in the same transaction.
    pub async fn set_meta(&self, key: &str, value: &str, audit: Option<AuditRecord>) -> Result<()> {
        self.exec(
            vec![(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                vec![Value::Text(key.to_owned()), Value::Text(value.to_owned())],
            )],
            None,
            audit,
        )
        .await
        .map(|_| ())
    }

    // ----- audit -----

    /// Appends an audit record without waiting (it commits in order with every other write).
    pub fn audit(&self, record: AuditRecord) {
        if self.send(Command::Audit { record, ack: None }).is_err() {
            tracing::error!("The store writer has stopped; an audit record was lost.");
        }
    }

    /// Appends an audit record and waits until it is durable; returns its sequence number.
    pub async fn audit_durable(&self, record: AuditRecord) -> Result<u64> {
        self.send_acked(|tx| Command::Audit {
            record,
            ack: Some(tx),
        })
        .await
    }

    pub fn audit_query(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>> {
        audit::query(&self.reader(), q)
    }

    /// Recomputes the audit chain on its own connection (the shared reader stays free).
    pub fn audit_verify(&self) -> Result<AuditReport> {
        let conn = open_conn(&self.inner.path)?;
        let trusted: Vec<_> = std::fs::read_to_string(self.inner.dir.join(audit::TRUSTED_KEYS))
            .unwrap_or_default()
            .lines()
            .filter_map(audit::parse_public_key)
            .collect();
        let head: Option<audit::SignedHead> = std::fs::read(self.inner.dir.join(audit::HEAD_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        audit::verify(&conn, &self.inner.node_key, &trusted, head.as_ref())
    }

    // ----- files -----

    /// Starts writing a blob; finish it and reference it in [`Store::fs_commit`].
    pub fn blob_writer(&self) -> Result<vfs::BlobWriter<'_>> {
        vfs::BlobWriter::new(&self.inner.key, &self.blobs_dir())
    }

    /// Applies all `ops` in one transaction (all or nothing), each audited with its outcome.
    pub async fn fs_commit(&self, principal: &str, ops: Vec<FsOp>) -> Result<Vec<FileInfo>> {
        for op in &ops {
            VPath::parse(op.path())?.stored_file()?;
        }
        let principal = principal.to_owned();
        self.send_acked(|ack| Command::Fs {
            ops,
            principal,
            ack,
        })
        .await
    }

    /// Writes a whole file from memory.
    pub async fn fs_write(&self, principal: &str, path: &VPath, data: &[u8]) -> Result<FileInfo> {
        let file = path.stored_file()?.to_owned();
        let mut w = self.blob_writer()?;
        w.write(data)?;
        let blob = w.finish()?;
        let mut infos = self
            .fs_commit(principal, vec![FsOp::Put { path: file, blob }])
            .await?;
        Ok(infos.remove(0))
    }

    /// Opens a stored file (its current version, or `version`).
    pub fn fs_open(&self, path: &VPath, version: Option<u64>) -> Result<FileReader> {
        let file = path.stored_file()?;
        let (info, loc) = vfs::locate(&self.reader(), &self.blobs_dir(), file, version)?;
        Ok(FileReader::new(self.inner.key.clone(), info, loc))
    }

    pub fn fs_history(&self, path: &VPath) -> Result<Vec<FileInfo>> {
        vfs::history(&self.reader(), path.stored_file()?)
    }

    /// Lists a folder: namespaces at the top, stored entries, mounts, or a host folder.
    pub fn fs_list(&self, path: &VPath) -> Result<Vec<DirEntry>> {
        let folder = |name: &str| DirEntry {
            name: name.to_owned(),
            dir: true,
            size: 0,
            version: None,
            mtime_ms: None,
        };
        match path.namespace() {
            Namespace::Root if path.as_str() == "/" => Ok(["agents", "host", "runs", "shared"]
                .iter()
                .map(|n| folder(n))
                .collect()),
            Namespace::Root if path.as_str() == "/host" => {
                Ok(self.mounts()?.iter().map(|m| folder(&m.name)).collect())
            }
            Namespace::Root | Namespace::Stored(_) => {
                vfs::list_stored(&self.reader(), path.as_str())
            }
            Namespace::Host { mount, rest } => {
                HostEntry::resolve(&self.mount_named(mount)?, rest, false)?.list()
            }
        }
    }

    /// How many bytes a write of `path` may bring at most without passing its namespace's quota
    /// (`None`: unlimited). Counts the file's current size as free, since a write replaces it.
    pub fn fs_room(&self, path: &VPath) -> Result<Option<u64>> {
        use rusqlite::OptionalExtension;
        let Namespace::Stored(ns) = path.namespace() else {
            return Ok(None);
        };
        let limit = self.inner.quotas.limit(ns);
        if limit == 0 {
            return Ok(None);
        }
        let conn = self.reader();
        let used: i64 = conn
            .prepare_cached("SELECT COALESCE((SELECT bytes FROM fs_usage WHERE ns = ?1), 0)")?
            .query_row(params![ns], |r| r.get(0))?;
        let current: i64 = conn
            .prepare_cached("SELECT size FROM fs_files WHERE path = ?1")?
            .query_row(params![path.as_str()], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        Ok(Some(
            limit.saturating_sub(used.max(0) as u64) + current.max(0) as u64,
        ))
    }

    /// Bytes used and the limit, per namespace that holds files.
    pub fn fs_usage(&self) -> Result<Vec<(String, u64, u64)>> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached("SELECT ns, bytes FROM fs_usage ORDER BY ns")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (ns, bytes) = row?;
            let limit = self.inner.quotas.limit(&ns);
            out.push((ns, bytes as u64, limit));
        }
        Ok(out)
    }

    // ----- host mounts -----

    pub fn mounts(&self) -> Result<Vec<Mount>> {
        let conn = self.reader();
        let mut stmt =
            conn.prepare_cached("SELECT name, host_path, read_only FROM fs_mounts ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok(Mount {
                name: r.get(0)?,
                host_path: r.get(1)?,
                read_only: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn mount_named(&self, name: &str) -> Result<Mount> {
        self.mounts()?
            .into_iter()
            .find(|m| m.name == name)
            .ok_or_else(|| Error::NoMount {
                name: name.to_owned(),
            })
    }

    /// Mounts the host folder `host_path` (made absolute and canonical) at `/host/<name>`.
    pub async fn mount(
        &self,
        principal: &str,
        name: &str,
        host_path: &Path,
        read_only: bool,
    ) -> Result<Mount> {
        noa_types::validate_name(name).map_err(|e| Error::Path {
            path: format!("/host/{name}"),
            message: e.to_string(),
        })?;
        let canonical = std::fs::canonicalize(host_path).map_err(|e| Error::Host {
            path: host_path.display().to_string(),
            message: e.to_string(),
        })?;
        if !canonical.is_dir() {
            return Err(Error::Host {
                path: host_path.display().to_string(),
                message: "not a folder".into(),
            });
        }
        let m = Mount {
            name: name.to_owned(),
            host_path: canonical.display().to_string(),
            read_only,
        };
        self.exec(
            vec![(
                "INSERT INTO fs_mounts (name, host_path, read_only, created_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET host_path = excluded.host_path, read_only = excluded.read_only",
                vec![
                    Value::Text(m.name.clone()),
                    Value::Text(m.host_path.clone()),
                    Value::Integer(read_only as i64),
                    Value::Integer(noa_types::now_ms() as i64),
                ],
            )],
            None,
            Some(AuditRecord::new(
                principal,
                "fs.mount",
                format!("/host/{name}"),
                "ok",
                serde_json::json!({"host_path": m.host_path, "read_only": read_only}),
            )),
        )
        .await?;
        Ok(m)
    }

    pub async fn unmount(&self, principal: &str, name: &str) -> Result<()> {
        self.exec(
            vec![(
                "DELETE FROM fs_mounts WHERE name = ?1",
                vec![Value::Text(name.to_owned())],
            )],
            Some(Error::NoMount {
                name: name.to_owned(),
            }),
            Some(AuditRecord::new(
                principal,
                "fs.unmount",
                format!("/host/{name}"),
                "ok",
                serde_json::Value::Null,
            )),
        )
        .await
        .map(|_| ())
    }

    /// Checks that `path` names a file of a writable mount (no file system access): what a write or delete
    /// is refused for before anything is read or made.
    pub fn host_writable(&self, path: &VPath) -> Result<Mount> {
        self.host_mount(path, true).map(|(m, _)| m)
    }

    /// The mount a `/host/...` path is on and the components below it; with `for_write`, the mount must be
    /// writable and the path must name something below it.
    fn host_mount<'p>(&self, path: &'p VPath, for_write: bool) -> Result<(Mount, &'p [String])> {
        let Namespace::Host { mount, rest } = path.namespace() else {
            return Err(Error::Path {
                path: path.to_string(),
                message: "not a host path".into(),
            });
        };
        let m = self.mount_named(mount)?;
        if for_write && m.read_only {
            return Err(Error::ReadOnly {
                path: path.to_string(),
            });
        }
        if for_write && rest.is_empty() {
            return Err(Error::Path {
                path: path.to_string(),
                message: "is the mount itself, not a file".into(),
            });
        }
        Ok((m, rest))
    }

    /// The host entry a `/host/...` path names: its folder opened without following a link at any step
    /// (see [`host`]). With `for_write`, the mount must be writable (see [`Store::host_writable`]); missing
    /// folders on the way are never made here (only [`Store::host_create`] makes them).
    pub fn host_entry(&self, path: &VPath, for_write: bool) -> Result<HostEntry> {
        let (m, rest) = self.host_mount(path, for_write)?;
        HostEntry::resolve(&m, rest, false)
    }

    /// Opens a host file for reading (see [`HostEntry::open_read`]). Returns the file and its size.
    pub fn host_open(&self, path: &VPath) -> Result<(std::fs::File, u64)> {
        self.host_entry(path, false)?.open_read()
    }

    /// Starts writing a host file: a new temporary file beside it (missing folders on the way are made).
    /// Write to it, then [`Store::host_commit`] it.
    pub fn host_create(&self, path: &VPath) -> Result<HostWrite> {
        let (m, rest) = self.host_mount(path, true)?;
        HostEntry::resolve(&m, rest, true)?.create()
    }

    /// Makes a host write durable and puts it in place (replacing the file, or a link at its name, never
    /// writing through one), then audits it.
    pub async fn host_commit(&self, principal: &str, w: HostWrite) -> Result<u64> {
        let shown = w.shown().to_owned();
        let size = tokio::task::spawn_blocking(move || w.commit())
            .await
            .map_err(|e| Error::Host {
                path: shown.clone(),
                message: format!("the write was interrupted: {e}"),
            })??;
        self.audit_durable(AuditRecord::new(
            principal,
            "fs.write",
            shown,
            "ok",
            serde_json::json!({ "size": size, "host": true }),
        ))
        .await?;
        Ok(size)
    }

    // ----- secrets -----

    pub async fn secret_set(&self, principal: &str, name: &str, value: &[u8]) -> Result<()> {
        validate_secret_name(name)?;
        let sealed = self.inner.key.seal_secret(name, value)?;
        self.exec(
            vec![(
                "INSERT INTO secrets (name, sealed, updated_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET sealed = excluded.sealed, updated_ms = excluded.updated_ms",
                vec![
                    Value::Text(name.to_owned()),
                    Value::Blob(sealed),
                    Value::Integer(noa_types::now_ms() as i64),
                ],
            )],
            None,
            Some(AuditRecord::new(
                principal,
                "secret.write",
                name,
                "ok",
                serde_json::Value::Null,
            )),
        )
        .await
        .map(|_| ())
    }

    pub async fn secret_delete(&self, principal: &str, name: &str) -> Result<()> {
        validate_secret_name(name)?;
        self.exec(
            vec![(
                "DELETE FROM secrets WHERE name = ?1",
                vec![Value::Text(name.to_owned())],
            )],
            Some(Error::NoSecret {
                name: name.to_owned(),
            }),
            Some(AuditRecord::new(
                principal,
                "secret.delete",
                name,
                "ok",
                serde_json::Value::Null,
            )),
        )
        .await
        .map(|_| ())
    }

    pub fn secrets(&self) -> Result<Vec<SecretInfo>> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached("SELECT name, updated_ms FROM secrets ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok(SecretInfo {
                name: r.get(0)?,
                updated_ms: r.get::<_, i64>(1)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Decrypts a secret for `principal` (who it is read for, and why, go to the audit log).
    pub fn secret_read(&self, principal: &str, name: &str, purpose: &str) -> Result<Vec<u8>> {
        validate_secret_name(name)?;
        let sealed: Option<Vec<u8>> = {
            use rusqlite::OptionalExtension;
            self.reader()
                .prepare_cached("SELECT sealed FROM secrets WHERE name = ?1")?
                .query_row(params![name], |r| r.get(0))
                .optional()?
        };
        let result = match sealed {
            None => Err(Error::NoSecret {
                name: name.to_owned(),
            }),
            Some(sealed) => {
                self.inner
                    .key
                    .open_secret(name, &sealed)
                    .ok_or_else(|| Error::Corrupt {
                        what: format!("secret {name}"),
                        message: "it fails authentication".into(),
                    })
            }
        };
        self.audit(AuditRecord::new(
            principal,
            "secret.read",
            name,
            if result.is_ok() { "ok" } else { "failed" },
            serde_json::json!({"purpose": purpose}),
        ));
        result
    }

    // ----- keys -----

    /// Wraps the data key with a new key-encryption key from `new`; no blob is rewritten.
    /// The old key file is kept as `<key file>.<old key id>`: backups taken before need it to be restored.
    /// Returns the new key id.
    pub async fn rekey(&self, principal: &str, new: KeySource) -> Result<String> {
        let old_id = self.kek_id();
        let old = self.key_source();
        if let KeySource::File(old_path) = &old
            && old_path.exists()
        {
            let keep = retired_key_path(old_path, &old_id);
            if !keep.exists() {
                let bytes = crypto::read_key_file(old_path)?.ok_or_else(|| Error::Key {
                    path: old_path.clone(),
                    message: "the key file disappeared".into(),
                })?;
                crypto::write_key_file(&keep, &bytes)?;
            }
        }
        let (kek, salt) = keyring::new_kek(&new)?;
        let id = crypto::kek_id(&kek);
        let wrapped = keyring::wrap(&kek, &self.inner.key)?;
        self.exec(
            vec![(
                "UPDATE keyring SET kek_id = ?1, kek_kind = ?2, salt = ?3, wrapped = ?4, rotated_ms = ?5 WHERE id = 1",
                vec![
                    Value::Text(id.clone()),
                    Value::Text(new.kind().into()),
                    salt.map(Value::Blob).unwrap_or(Value::Null),
                    Value::Blob(wrapped),
                    Value::Integer(noa_types::now_ms() as i64),
                ],
            )],
            None,
            Some(AuditRecord::new(
                principal,
                "store.rekey",
                "keyring",
                "ok",
                serde_json::json!({"kind": new.kind(), "key_id": id, "previous_key_id": old_id}),
            )),
        )
        .await?;
        keyring::commit_key_file(&new)?;
        // A key file that no longer unlocks the store would only confuse whoever finds it (a copy is kept).
        if let (KeySource::File(old_path), KeySource::Passphrase(_)) = (&old, &new) {
            let _ = std::fs::remove_file(old_path);
        }
        *self
            .inner
            .key_source
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = new;
        *self.inner.kek_id.lock().unwrap_or_else(|e| e.into_inner()) = id.clone();
        Ok(id)
    }

    /// A connection of its own on the database, for long reads (backups, verification).
    pub(crate) fn own_connection(&self) -> Result<Connection> {
        open_conn(&self.inner.path)
    }

    /// The key source this store was opened with.
    pub fn key_source(&self) -> KeySource {
        self.inner
            .key_source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn send(&self, cmd: Command) -> Result<()> {
        self.inner.writer.send(cmd).map_err(|_| Error::WriterGone)
    }

    async fn send_acked<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T>>) -> Command,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| Error::WriterGone)?
    }

    /// Appends a journal event without waiting; it is committed in order with every other write.
    pub fn append(&self, event: Event) {
        if self.send(Command::Append { event, ack: None }).is_err() {
            tracing::error!("The store writer has stopped; a journal event was lost.");
        }
    }

    /// Appends a journal event and waits until it is durable; returns its sequence number.
    pub async fn append_durable(&self, event: Event) -> Result<u64> {
        self.send_acked(|tx| Command::Append {
            event,
            ack: Some(tx),
        })
        .await
    }

    /// Records a spawned spec (replacing one of the same name) and waits until it is durable.
    pub async fn put_spec(&self, spec: &ProcessSpec) -> Result<()> {
        let json = serde_json::to_string(spec).map_err(|e| Error::Corrupt {
            what: spec.name.clone(),
            message: e.to_string(),
        })?;
        let name = spec.name.clone();
        self.send_acked(|ack| Command::PutSpec { name, json, ack })
            .await
    }

    /// Forgets a spec; returns whether it was there.
    pub async fn remove_spec(&self, name: &str) -> Result<bool> {
        let name = name.to_owned();
        self.send_acked(|ack| Command::RemoveSpec { name, ack })
            .await
    }

    /// Remembers which OS process group a spec runs as (`None` once it has ended).
    pub fn set_os_pid(&self, name: &str, os: Option<(u32, u64)>) {
        let _ = self.send(Command::SetOsPid {
            name: name.to_owned(),
            os,
        });
    }

    /// Waits until everything sent before is durable.
    pub async fn flush(&self) -> Result<()> {
        self.send_acked(|ack| Command::Flush { ack }).await
    }

    /// Every registered spec in spawn order.
    pub fn specs(&self) -> Result<Vec<StoredSpec>> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT seq, name, spec, os_pid, os_start FROM processes ORDER BY seq",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<u32>>(3)?,
                r.get::<_, Option<i64>>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, name, json, os_pid, os_start) = row?;
            let spec: ProcessSpec = serde_json::from_str(&json).map_err(|e| Error::Corrupt {
                what: format!("process spec {name:?}"),
                message: e.to_string(),
            })?;
            out.push(StoredSpec {
                seq,
                spec,
                os_pid,
                os_start: os_start.map(|v| v as u64),
            });
        }
        Ok(out)
    }

    /// Reads journal events, oldest first.
    pub fn events(&self, q: &EventQuery) -> Result<Vec<Event>> {
        let conn = self.inner.reader.lock().unwrap_or_else(|e| e.into_inner());
        let limit = q.limit.unwrap_or(100).min(10_000);
        let mut stmt = conn.prepare_cached(
            "SELECT seq, ts_ms, pid, name, event, detail FROM journal
             WHERE seq > ?1 AND (?2 IS NULL OR name = ?2) AND (?3 IS NULL OR pid = ?3)
             ORDER BY seq DESC LIMIT ?4",
        )?;
        let rows = stmt.query_map(
            params![
                q.after.unwrap_or(0) as i64,
                q.name,
                q.pid.map(|p| p.0 as i64),
                limit
            ],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                ))
            },
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, ts, pid, name, event, detail) = row?;
            let detail = serde_json::from_str(&detail).map_err(|e| Error::Corrupt {
                what: format!("journal event {seq}"),
                message: e.to_string(),
            })?;
            out.push(Event {
                seq: seq as u64,
                ts_ms: ts as u64,
                pid: Pid(pid as u64),
                name,
                event,
                detail,
            });
        }
        out.reverse();
        Ok(out)
    }

    /// The schema version, and a cheap check that the database answers.
    pub fn schema_version(&self) -> Result<u32> {
        let conn = self.inner.reader.lock().unwrap_or_else(|e| e.into_inner());
        Ok(conn.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )?)
    }
}

#[cfg(test)]
mod tests;
