//! The writer thread: owns the write connection and commits queued writes in batches (group commit).
//!
//! Each command runs inside its own savepoint of the batch transaction, so one failing command (a quota,
//! a missing file) is rolled back alone and the others still commit. Commands that carry an audit record
//! append it to the chain in the same transaction, with the command's outcome.

use crate::audit::{AuditRecord, Chain};
use crate::vfs::{FileInfo, FsOp, Quotas};
use crate::{Error, Result};
use noa_types::Event;
use rusqlite::{Connection, params};
use std::sync::mpsc;
use tokio::sync::oneshot;

pub(crate) enum Command {
    Append {
        event: Event,
        ack: Option<oneshot::Sender<Result<u64>>>,
    },
    PutSpec {
        name: String,
        json: String,
        ack: oneshot::Sender<Result<()>>,
    },
    RemoveSpec {
        name: String,
        ack: oneshot::Sender<Result<bool>>,
    },
    SetOsPid {
        name: String,
        os: Option<(u32, u64)>,
    },
    Flush {
        ack: oneshot::Sender<Result<()>>,
    },
    Audit {
        record: AuditRecord,
        ack: Option<oneshot::Sender<Result<u64>>>,
    },
    Fs {
        ops: Vec<FsOp>,
        principal: String,
        ack: oneshot::Sender<Result<Vec<FileInfo>>>,
    },
    /// Any other change: `sql` statements with parameters, run in one savepoint, then the audit record.
    Exec {
        statements: Vec<(&'static str, Vec<rusqlite::types::Value>)>,
        /// Whether at least one row must change (else the command fails with `missing`).
        must_change: Option<Error>,
        audit: Option<AuditRecord>,
        ack: oneshot::Sender<Result<usize>>,
    },
}

/// What to tell each waiter once the batch has committed.
enum Reply {
    Seq(oneshot::Sender<Result<u64>>, u64),
    Unit(oneshot::Sender<Result<()>>),
    Bool(oneshot::Sender<Result<bool>>, bool),
    Files(
        oneshot::Sender<Result<Vec<FileInfo>>>,
        Result<Vec<FileInfo>>,
    ),
    Count(oneshot::Sender<Result<usize>>, Result<usize>),
}

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 1024;

pub(crate) struct WriterState {
    pub chain: Chain,
    pub quotas: Quotas,
    /// Where the newest signed checkpoint is published after its batch commits.
    pub head_file: std::path::PathBuf,
}

pub(crate) fn start(conn: Connection, state: WriterState) -> Result<mpsc::Sender<Command>> {
    let (tx, rx) = mpsc::channel::<Command>();
    std::thread::Builder::new()
        .name("noa-store-writer".into())
        .spawn(move || run(conn, rx, state))
        .map_err(|e| Error::Corrupt {
            what: "store writer thread".into(),
            message: e.to_string(),
        })?;
    Ok(tx)
}

fn run(mut conn: Connection, rx: mpsc::Receiver<Command>, mut state: WriterState) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        let mut replies = Vec::with_capacity(batch.len());
        // The chain head moves only if the batch commits.
        let chain_before = state.chain.clone();
        let outcome = conn.transaction().map_err(Error::from).and_then(|mut tx| {
            for cmd in batch {
                apply(&mut tx, cmd, &mut replies, &mut state)?;
            }
            tx.commit().map_err(Error::from)
        });
        if outcome.is_err() {
            state.chain = chain_before;
        } else if let Some(head) = state.chain.pending_head.take() {
            head.write(&state.head_file);
        }
        match outcome {
            Ok(()) => {
                for r in replies {
                    match r {
                        Reply::Seq(tx, seq) => drop(tx.send(Ok(seq))),
                        Reply::Unit(tx) => drop(tx.send(Ok(()))),
                        Reply::Bool(tx, b) => drop(tx.send(Ok(b))),
                        Reply::Files(tx, r) => drop(tx.send(r)),
                        Reply::Count(tx, r) => drop(tx.send(r)),
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "A store write batch failed and was rolled back.");
                let msg = e.to_string();
                for r in replies {
                    let err = || Error::Corrupt {
                        what: "write batch".into(),
                        message: msg.clone(),
                    };
                    match r {
                        Reply::Seq(tx, _) => drop(tx.send(Err(err()))),
                        Reply::Unit(tx) => drop(tx.send(Err(err()))),
                        Reply::Bool(tx, _) => drop(tx.send(Err(err()))),
                        Reply::Files(tx, _) => drop(tx.send(Err(err()))),
                        Reply::Count(tx, _) => drop(tx.send(Err(err()))),
                    }
                }
            }
        }
    }
}

fn apply(
    tx: &mut rusqlite::Transaction<'_>,
    cmd: Command,
    replies: &mut Vec<Reply>,
    state: &mut WriterState,
) -> Result<()> {
    match cmd {
        Command::Audit { record, ack } => {
            let seq = state.chain.append(tx, &record)?;
            if let Some(ack) = ack {
                replies.push(Reply::Seq(ack, seq));
            }
        }
        Command::Fs {
            ops,
            principal,
            ack,
        } => {
            let result = {
                let sp = tx.savepoint()?;
                match crate::vfs::apply(&sp, &ops, &principal, &state.quotas) {
                    Ok(files) => sp.commit().map(|_| files).map_err(Error::from),
                    Err(e) => Err(e),
                }
            };
            for (i, op) in ops.iter().enumerate() {
                let (action, detail) = match op {
                    FsOp::Put { blob, .. } => ("fs.write", serde_json::json!({"size": blob.size})),
                    FsOp::Delete { .. } => ("fs.delete", serde_json::Value::Null),
                    FsOp::Rollback { to, .. } => ("fs.rollback", serde_json::json!({"to": to})),
                };
                let (outcome, detail) = match &result {
                    Ok(files) => (
                        "ok",
                        serde_json::json!({"version": files.get(i).map(|f| f.version), "op": detail, "ops": ops.len()}),
                    ),
                    Err(e) => (
                        "failed",
                        serde_json::json!({"error": e.to_string(), "op": detail}),
                    ),
                };
                state.chain.append(
                    tx,
                    &AuditRecord::new(principal.clone(), action, op.path(), outcome, detail),
                )?;
            }
            replies.push(Reply::Files(ack, result));
        }
        Command::Exec {
            statements,
            must_change,
            audit,
            ack,
        } => {
            let result = {
                let sp = tx.savepoint()?;
                let mut changed = 0usize;
                let mut failed = None;
                for (sql, values) in &statements {
                    match sp
                        .prepare_cached(sql)
                        .and_then(|mut st| st.execute(rusqlite::params_from_iter(values.iter())))
                    {
                        Ok(n) => changed += n,
                        Err(e) => {
                            failed = Some(Error::from(e));
                            break;
                        }
                    }
                }
                match (failed, must_change) {
                    (Some(e), _) => Err(e),
                    (None, Some(missing)) if changed == 0 => Err(missing),
                    (None, _) => sp.commit().map(|_| changed).map_err(Error::from),
                }
            };
            if let Some(mut record) = audit {
                if let Err(e) = &result {
                    record.outcome = "failed".into();
                    record.detail =
                        serde_json::json!({"error": e.to_string(), "detail": record.detail});
                }
                state.chain.append(tx, &record)?;
            }
            replies.push(Reply::Count(ack, result));
        }
        Command::Append { event, ack } => {
            let detail = event.detail.to_string();
            tx.prepare_cached(
                "INSERT INTO journal (ts_ms, pid, name, event, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                event.ts_ms as i64,
                event.pid.0 as i64,
                event.name,
                event.event,
                detail
            ])?;
            if let Some(ack) = ack {
                replies.push(Reply::Seq(ack, tx.last_insert_rowid() as u64));
            }
        }
        Command::PutSpec { name, json, ack } => {
            // A re-spawn keeps its place in the start order only if it was never removed.
            tx.prepare_cached(
                "INSERT INTO processes (name, seq, spec, created_ms)
                 VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM processes), ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET spec = excluded.spec",
            )?
            .execute(params![name, json, noa_types::now_ms() as i64])?;
            replies.push(Reply::Unit(ack));
        }
        Command::RemoveSpec { name, ack } => {
            let n = tx
                .prepare_cached("DELETE FROM processes WHERE name = ?1")?
                .execute(params![name])?;
            replies.push(Reply::Bool(ack, n > 0));
        }
        Command::SetOsPid { name, os } => {
            tx.prepare_cached("UPDATE processes SET os_pid = ?2, os_start = ?3 WHERE name = ?1")?
                .execute(params![name, os.map(|o| o.0), os.map(|o| o.1 as i64)])?;
        }
        Command::Flush { ack } => replies.push(Reply::Unit(ack)),
    }
    Ok(())
}
