//! The embedded store of NOA ARK OS: one SQLite database in WAL mode with `synchronous=FULL`.
//!
//! Writes go through a single writer thread that commits whatever is queued in one transaction
//! (group commit) and acknowledges each write only after that transaction is durable. Reads use their
//! own connection, which WAL lets run beside the writer. The schema is versioned by [`migrations`].
//!
//! Tables now: the lifecycle `journal` and the `processes` registry of spawned specs.

mod error;
mod migrations;
mod writer;

pub use error::{Error, Result};

use noa_types::{Event, Pid, ProcessSpec};
use rusqlite::{Connection, OpenFlags, params};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tokio::sync::oneshot;
use writer::Command;

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
    writer: std::sync::mpsc::Sender<Command>,
    reader: Mutex<Connection>,
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
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store> {
        let mut conn = open_conn(path)?;
        migrations::migrate(&mut conn, path)?;
        let reader = open_conn(path)?;
        let writer = writer::start(conn)?;
        Ok(Store {
            inner: std::sync::Arc::new(Inner {
                path: path.to_owned(),
                writer,
                reader: Mutex::new(reader),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
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
        let conn = self.inner.reader.lock().unwrap_or_else(|e| e.into_inner());
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
