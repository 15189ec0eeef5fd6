//! Versioned schema migrations. Each runs once, in order, inside one transaction with its version row.

use crate::{Error, Result};
use rusqlite::Connection;
use std::path::Path;

/// Every migration, in order. Never edit a released one: add a new one.
pub(crate) const MIGRATIONS: &[(u32, &str)] = &[
    (
        1,
        "CREATE TABLE journal (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ms INTEGER NOT NULL,
        pid INTEGER NOT NULL,
        name TEXT NOT NULL,
        event TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT 'null'
    );
    CREATE INDEX journal_name ON journal(name, seq);
    CREATE TABLE processes (
        name TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        spec TEXT NOT NULL,
        os_pid INTEGER,
        os_start INTEGER,
        created_ms INTEGER NOT NULL
    );",
    ),
    (
        2,
        "CREATE TABLE keyring (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        kek_id TEXT NOT NULL,
        kek_kind TEXT NOT NULL,
        salt BLOB,
        wrapped BLOB NOT NULL,
        created_ms INTEGER NOT NULL,
        rotated_ms INTEGER
    );
    CREATE TABLE blobs (
        id TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        inline BLOB,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE fs_versions (
        path TEXT NOT NULL,
        version INTEGER NOT NULL,
        blob TEXT REFERENCES blobs(id),
        size INTEGER NOT NULL,
        op TEXT NOT NULL,
        principal TEXT NOT NULL,
        ts_ms INTEGER NOT NULL,
        PRIMARY KEY (path, version)
    );
    CREATE TABLE fs_files (
        path TEXT PRIMARY KEY,
        ns TEXT NOT NULL,
        version INTEGER NOT NULL,
        blob TEXT NOT NULL REFERENCES blobs(id),
        size INTEGER NOT NULL,
        mtime_ms INTEGER NOT NULL
    );
    CREATE TABLE fs_usage (ns TEXT PRIMARY KEY, bytes INTEGER NOT NULL);
    CREATE TABLE fs_mounts (
        name TEXT PRIMARY KEY,
        host_path TEXT NOT NULL,
        read_only INTEGER NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE secrets (
        name TEXT PRIMARY KEY,
        sealed BLOB NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        ts_ms INTEGER NOT NULL,
        principal TEXT NOT NULL,
        action TEXT NOT NULL,
        resource TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev BLOB NOT NULL,
        hash BLOB NOT NULL
    );
    CREATE INDEX audit_action ON audit(action, seq);
    CREATE TABLE audit_checkpoints (
        seq INTEGER PRIMARY KEY,
        prev_seq INTEGER NOT NULL,
        hash BLOB NOT NULL,
        key_id TEXT NOT NULL,
        signature BLOB NOT NULL,
        ts_ms INTEGER NOT NULL
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    ),
    (
        3,
        "CREATE TABLE wf_runs (
        id TEXT PRIMARY KEY,
        workflow TEXT NOT NULL,
        status TEXT NOT NULL,
        parent TEXT,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        spec TEXT NOT NULL,
        summary TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX wf_runs_status ON wf_runs(status, created_ms);
    CREATE INDEX wf_runs_created ON wf_runs(created_ms);
    CREATE TABLE wf_events (
        run TEXT NOT NULL,
        seq INTEGER NOT NULL,
        ts_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        step TEXT,
        data TEXT NOT NULL,
        PRIMARY KEY (run, seq)
    ) WITHOUT ROWID;
    CREATE TABLE wf_registered (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        registered_ms INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT '{}'
    );",
    ),
];

pub(crate) fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL)",
    )?;
    let current: u32 = conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    let known = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    if current > known {
        return Err(Error::TooNew {
            path: path.to_owned(),
            found: current,
            known,
        });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_ms) VALUES (?1, ?2)",
            rusqlite::params![version, noa_types::now_ms() as i64],
        )?;
        tx.commit()?;
        tracing::info!(version, "Applied store migration.");
    }
    Ok(())
}
