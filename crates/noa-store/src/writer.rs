//! The writer thread: owns the write connection and commits queued writes in batches (group commit).

use crate::{Error, Result};
use noa_types::Event;
use rusqlite::{Connection, Transaction, params};
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
}

/// What to tell each waiter once the batch has committed.
enum Reply {
    Seq(oneshot::Sender<Result<u64>>, u64),
    Unit(oneshot::Sender<Result<()>>),
    Bool(oneshot::Sender<Result<bool>>, bool),
}

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 1024;

pub(crate) fn start(conn: Connection) -> Result<mpsc::Sender<Command>> {
    let (tx, rx) = mpsc::channel::<Command>();
    std::thread::Builder::new()
        .name("noa-store-writer".into())
        .spawn(move || run(conn, rx))
        .map_err(|e| Error::Corrupt {
            what: "store writer thread".into(),
            message: e.to_string(),
        })?;
    Ok(tx)
}

fn run(mut conn: Connection, rx: mpsc::Receiver<Command>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        let mut replies = Vec::with_capacity(batch.len());
        let outcome = conn.transaction().map_err(Error::from).and_then(|tx| {
            for cmd in batch {
                apply(&tx, cmd, &mut replies)?;
            }
            tx.commit().map_err(Error::from)
        });
        match outcome {
            Ok(()) => {
                for r in replies {
                    match r {
                        Reply::Seq(tx, seq) => drop(tx.send(Ok(seq))),
                        Reply::Unit(tx) => drop(tx.send(Ok(()))),
                        Reply::Bool(tx, b) => drop(tx.send(Ok(b))),
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
                    }
                }
            }
        }
    }
}

fn apply(tx: &Transaction<'_>, cmd: Command, replies: &mut Vec<Reply>) -> Result<()> {
    match cmd {
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
