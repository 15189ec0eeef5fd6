//! Versioned schema migrations. Each runs once, in order, inside one transaction with its version row.

use crate::{Error, Result};
use rusqlite::Connection;
use std::path::Path;

/// Every migration, in order. Never edit a released one: add a new one.
pub(crate) const MIGRATIONS: &[(u32, &str)] = &[(
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
)];

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
