//! The store's side of durable workflows: runs, their event histories and registered (triggered) workflows.
//!
//! The store does not know what the events mean; `noa-workflow` does. It keeps each run's events in order,
//! commits the ones the engine waits for before it acts (group commit, `synchronous=FULL`), and answers queries.

use crate::audit::AuditRecord;
use crate::writer::Command;
use crate::{Error, Result, Store};
use rusqlite::OptionalExtension;
use rusqlite::types::Value;

/// One run, as listed.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRecord {
    pub id: String,
    pub workflow: String,
    pub status: String,
    pub parent: Option<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// What the engine needs to resume the run (JSON).
    pub spec: String,
    /// The run's result once it has one (JSON).
    pub summary: String,
}

/// One event of a run's history.
#[derive(Clone, Debug, PartialEq)]
pub struct RunEvent {
    pub seq: u64,
    pub ts_ms: u64,
    pub kind: String,
    pub step: Option<String>,
    /// JSON.
    pub data: String,
}

/// Which runs to list.
#[derive(Clone, Debug, Default)]
pub struct RunQuery {
    pub status: Option<String>,
    pub workflow: Option<String>,
    /// Only runs that have not finished (`running`, `paused`, `waiting`).
    pub unfinished: bool,
    pub limit: Option<usize>,
}

/// A workflow registered for its triggers.
#[derive(Clone, Debug, PartialEq)]
pub struct RegisteredWorkflow {
    pub name: String,
    pub spec: String,
    pub registered_ms: u64,
    pub state: String,
}

const INSERT_EVENT: &str =
    "INSERT INTO wf_events (run, seq, ts_ms, kind, step, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
const UPDATE_STATUS: &str = "UPDATE wf_runs SET status = ?2, updated_ms = ?3, summary = COALESCE(?4, summary) WHERE id = ?1";

fn event_values(run: &str, e: RunEvent) -> Vec<Value> {
    vec![
        Value::Text(run.to_owned()),
        Value::Integer(e.seq as i64),
        Value::Integer(e.ts_ms as i64),
        Value::Text(e.kind),
        e.step.map(Value::Text).unwrap_or(Value::Null),
        Value::Text(e.data),
    ]
}

fn run_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
    Ok(RunRecord {
        id: r.get(0)?,
        workflow: r.get(1)?,
        status: r.get(2)?,
        parent: r.get(3)?,
        created_ms: r.get::<_, i64>(4)? as u64,
        updated_ms: r.get::<_, i64>(5)? as u64,
        spec: r.get(6)?,
        summary: r.get(7)?,
    })
}

const RUN_COLUMNS: &str = "id, workflow, status, parent, created_ms, updated_ms, spec, summary";

impl Store {
    /// Creates a run with its first event, durably.
    pub async fn wf_create(
        &self,
        run: &RunRecord,
        first: RunEvent,
        audit: Option<AuditRecord>,
    ) -> Result<()> {
        let statements = vec![
            (
                "INSERT INTO wf_runs (id, workflow, status, parent, created_ms, updated_ms, spec, summary)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                vec![
                    Value::Text(run.id.clone()),
                    Value::Text(run.workflow.clone()),
                    Value::Text(run.status.clone()),
                    run.parent.clone().map(Value::Text).unwrap_or(Value::Null),
                    Value::Integer(run.created_ms as i64),
                    Value::Integer(run.updated_ms as i64),
                    Value::Text(run.spec.clone()),
                    Value::Text(run.summary.clone()),
                ],
            ),
            (INSERT_EVENT, event_values(&run.id, first)),
        ];
        self.exec(statements, None, audit).await.map(|_| ())
    }

    fn wf_statements(
        run: &str,
        events: Vec<RunEvent>,
        status: Option<(&str, Option<String>)>,
    ) -> Vec<(&'static str, Vec<Value>)> {
        let mut statements: Vec<(&'static str, Vec<Value>)> = events
            .into_iter()
            .map(|e| (INSERT_EVENT, event_values(run, e)))
            .collect();
        if let Some((status, summary)) = status {
            statements.push((
                UPDATE_STATUS,
                vec![
                    Value::Text(run.to_owned()),
                    Value::Text(status.to_owned()),
                    Value::Integer(noa_types::now_ms() as i64),
                    summary.map(Value::Text).unwrap_or(Value::Null),
                ],
            ));
        }
        statements
    }

    /// Appends events to a run (and optionally sets its status and summary) and waits until they are durable.
    pub async fn wf_append(
        &self,
        run: &str,
        events: Vec<RunEvent>,
        status: Option<(&str, Option<String>)>,
        audit: Option<AuditRecord>,
    ) -> Result<()> {
        self.exec(Self::wf_statements(run, events, status), None, audit)
            .await
            .map(|_| ())
    }

    /// Appends events without waiting: they commit in order with everything sent after them. The returned
    /// receiver says when they are durable (or that they are not), for whoever must not act before that.
    pub fn wf_append_deferred(
        &self,
        run: &str,
        events: Vec<RunEvent>,
    ) -> tokio::sync::oneshot::Receiver<Result<usize>> {
        let (ack, rx) = tokio::sync::oneshot::channel();
        let statements = Self::wf_statements(run, events, None);
        if self
            .inner
            .writer
            .send(Command::Exec {
                statements,
                must_change: None,
                audit: None,
                ack,
            })
            .is_err()
        {
            tracing::error!("The store writer has stopped; a workflow event was lost.");
        }
        rx
    }

    /// One run.
    pub fn wf_run(&self, id: &str) -> Result<Option<RunRecord>> {
        let conn = self.reader();
        let mut st =
            conn.prepare_cached(&format!("SELECT {RUN_COLUMNS} FROM wf_runs WHERE id = ?1"))?;
        Ok(st.query_row([id], run_from_row).optional()?)
    }

    /// Runs, newest first.
    pub fn wf_runs(&self, q: &RunQuery) -> Result<Vec<RunRecord>> {
        let conn = self.reader();
        let mut sql = format!("SELECT {RUN_COLUMNS} FROM wf_runs WHERE 1 = 1");
        let mut params: Vec<Value> = Vec::new();
        if let Some(s) = &q.status {
            params.push(Value::Text(s.clone()));
            sql.push_str(&format!(" AND status = ?{}", params.len()));
        }
        if let Some(w) = &q.workflow {
            params.push(Value::Text(w.clone()));
            sql.push_str(&format!(" AND workflow = ?{}", params.len()));
        }
        if q.unfinished {
            sql.push_str(" AND status IN ('running', 'paused', 'waiting')");
        }
        sql.push_str(" ORDER BY created_ms DESC, id DESC");
        if let Some(l) = q.limit {
            sql.push_str(&format!(" LIMIT {l}"));
        }
        let mut st = conn.prepare(&sql)?;
        let rows = st.query_map(rusqlite::params_from_iter(params.iter()), run_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// A run's events after `after` (0 for all), in order.
    pub fn wf_events(&self, run: &str, after: u64) -> Result<Vec<RunEvent>> {
        let conn = self.reader();
        let mut st = conn.prepare_cached(
            "SELECT seq, ts_ms, kind, step, data FROM wf_events WHERE run = ?1 AND seq > ?2 ORDER BY seq",
        )?;
        let rows = st.query_map(rusqlite::params![run, after as i64], |r| {
            Ok(RunEvent {
                seq: r.get::<_, i64>(0)? as u64,
                ts_ms: r.get::<_, i64>(1)? as u64,
                kind: r.get(2)?,
                step: r.get(3)?,
                data: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Registers (or replaces) a workflow for its triggers.
    pub async fn wf_register(&self, name: &str, spec: &str, audit: AuditRecord) -> Result<()> {
        self.exec(
            vec![(
                "INSERT INTO wf_registered (name, spec, registered_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, registered_ms = excluded.registered_ms",
                vec![
                    Value::Text(name.to_owned()),
                    Value::Text(spec.to_owned()),
                    Value::Integer(noa_types::now_ms() as i64),
                ],
            )],
            None,
            Some(audit),
        )
        .await
        .map(|_| ())
    }

    /// Forgets a registered workflow.
    pub async fn wf_unregister(&self, name: &str, audit: AuditRecord) -> Result<()> {
        self.exec(
            vec![(
                "DELETE FROM wf_registered WHERE name = ?1",
                vec![Value::Text(name.to_owned())],
            )],
            Some(Error::Path {
                path: name.to_owned(),
                message: "no workflow of this name is registered".into(),
            }),
            Some(audit),
        )
        .await
        .map(|_| ())
    }

    /// Remembers a registered workflow's trigger state (e.g. when its schedule last fired).
    pub async fn wf_set_registered_state(&self, name: &str, state: &str) -> Result<()> {
        self.exec(
            vec![(
                "UPDATE wf_registered SET state = ?2 WHERE name = ?1",
                vec![Value::Text(name.to_owned()), Value::Text(state.to_owned())],
            )],
            None,
            None,
        )
        .await
        .map(|_| ())
    }

    /// Every registered workflow, by name.
    pub fn wf_registered(&self) -> Result<Vec<RegisteredWorkflow>> {
        let conn = self.reader();
        let mut st = conn.prepare_cached(
            "SELECT name, spec, registered_ms, state FROM wf_registered ORDER BY name",
        )?;
        let rows = st.query_map([], |r| {
            Ok(RegisteredWorkflow {
                name: r.get(0)?,
                spec: r.get(1)?,
                registered_ms: r.get::<_, i64>(2)? as u64,
                state: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}
