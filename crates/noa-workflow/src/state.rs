//! A run's state, rebuilt by replaying its history of events. The executor changes state only by
//! appending an event and applying it here, so what it does after a restart is what it would have done.

use crate::def::Workflow;
use noa_store::RunEvent;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

/// Event kinds (the `kind` column of a run's history). Normative list: `docs/specs/workflow.md` §6.
pub mod kind {
    pub const RUN_CREATED: &str = "run.created";
    pub const RUN_PAUSED: &str = "run.paused";
    pub const RUN_RESUMED: &str = "run.resumed";
    pub const RUN_CANCELLED: &str = "run.cancelled";
    pub const RUN_RETRIED: &str = "run.retried";
    pub const RUN_FINISHED: &str = "run.finished";
    pub const STEP_SCHEDULED: &str = "step.scheduled";
    pub const STEP_STARTED: &str = "step.started";
    pub const STEP_TIMER: &str = "step.timer";
    pub const STEP_WAITING: &str = "step.waiting";
    pub const STEP_APPROVED: &str = "step.approved";
    pub const ATTEMPT_FAILED: &str = "attempt.failed";
    pub const ITEM_FINISHED: &str = "item.finished";
    pub const STEP_FINISHED: &str = "step.finished";
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepStatus {
    Pending,
    Running,
    Waiting,
    Succeeded,
    Failed,
    Skipped,
    Cancelled,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running => "running",
            StepStatus::Waiting => "waiting",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
            StepStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> StepStatus {
        match s {
            "running" => StepStatus::Running,
            "waiting" => StepStatus::Waiting,
            "succeeded" => StepStatus::Succeeded,
            "failed" => StepStatus::Failed,
            "skipped" => StepStatus::Skipped,
            "cancelled" => StepStatus::Cancelled,
            _ => StepStatus::Pending,
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StepStatus::Succeeded
                | StepStatus::Failed
                | StepStatus::Skipped
                | StepStatus::Cancelled
        )
    }
}

/// A step's output: text kept in the history, or a VFS file when it is large.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    Text(String),
    File { path: String, size: u64 },
}

impl Output {
    pub fn to_json(&self) -> (String, Value) {
        match self {
            Output::Text(t) => ("output".into(), Value::String(t.clone())),
            Output::File { path, size } => {
                ("output_file".into(), json!({ "path": path, "size": size }))
            }
        }
    }

    fn from_data(d: &Value) -> Option<Output> {
        if let Some(t) = d.get("output").and_then(Value::as_str) {
            return Some(Output::Text(t.to_owned()));
        }
        let f = d.get("output_file")?;
        Some(Output::File {
            path: f.get("path")?.as_str()?.to_owned(),
            size: f.get("size").and_then(Value::as_u64).unwrap_or(0),
        })
    }
}

/// One unit of work of a step: the step itself, an item of its `for_each`, or an iteration of its `loop`.
#[derive(Clone, Debug, Default)]
pub struct Unit {
    /// The number of the newest attempt started (1 for the first).
    pub attempt: u32,
    /// An attempt was started and has not ended (in the history).
    pub in_flight: bool,
    /// When a retry is due (ms since the epoch), after a failed attempt.
    pub retry_at: Option<u64>,
    /// When the attempt in flight times out (ms since the epoch), if the step has a timeout.
    pub deadline: Option<u64>,
    pub done: Option<(StepStatus, Option<Output>, Option<String>)>,
}

#[derive(Clone, Debug)]
pub struct StepState {
    pub status: StepStatus,
    /// The items of `for_each`, fixed when the step starts.
    pub items: Option<Vec<Value>>,
    pub units: BTreeMap<u32, Unit>,
    pub output: Option<Output>,
    pub outputs: Map<String, Value>,
    pub error: Option<String>,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// A sleep's wake-up time, once set.
    pub wake_at: Option<u64>,
    pub approved_by: Option<String>,
    /// VFS paths of the files the step's units kept from `$NOA_ARTIFACTS`.
    pub artifacts: Vec<String>,
}

impl Default for StepState {
    fn default() -> Self {
        StepState {
            status: StepStatus::Pending,
            items: None,
            units: BTreeMap::new(),
            output: None,
            outputs: Map::new(),
            error: None,
            started_ms: None,
            finished_ms: None,
            wake_at: None,
            approved_by: None,
            artifacts: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    Running,
    Paused,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Paused => "paused",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> RunStatus {
        match s {
            "paused" => RunStatus::Paused,
            "succeeded" => RunStatus::Succeeded,
            "failed" => RunStatus::Failed,
            "cancelled" => RunStatus::Cancelled,
            _ => RunStatus::Running,
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled
        )
    }
}

#[derive(Clone, Debug)]
pub struct RunState {
    pub status: RunStatus,
    pub steps: Vec<StepState>,
    pub outputs: Value,
    pub error: Option<String>,
    /// The sequence number of the newest event.
    pub seq: u64,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
}

fn artifacts_of(d: &Value) -> Vec<String> {
    d.get("artifacts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect()
}

fn num(d: &Value, k: &str) -> Option<u64> {
    d.get(k).and_then(Value::as_u64)
}

impl RunState {
    pub fn new(def: &Workflow) -> RunState {
        RunState {
            status: RunStatus::Running,
            steps: def.steps.iter().map(|_| StepState::default()).collect(),
            outputs: Value::Null,
            error: None,
            seq: 0,
            created_ms: 0,
            finished_ms: None,
        }
    }

    /// Rebuilds the state from a history.
    pub fn replay(def: &Workflow, events: &[RunEvent]) -> RunState {
        let mut s = RunState::new(def);
        for e in events {
            let data: Value = serde_json::from_str(&e.data).unwrap_or(Value::Null);
            s.apply(def, &e.kind, e.step.as_deref(), &data, e.ts_ms);
            s.seq = e.seq;
        }
        s
    }

    /// Applies one event.
    pub fn apply(&mut self, def: &Workflow, kind: &str, step: Option<&str>, d: &Value, ts: u64) {
        let index = step.and_then(|id| def.step_index(id));
        let unit_no = num(d, "index").unwrap_or(0) as u32;
        match (kind, index) {
            (kind::RUN_CREATED, _) => self.created_ms = ts,
            (kind::RUN_PAUSED, _) => self.status = RunStatus::Paused,
            (kind::RUN_RESUMED, _) => self.status = RunStatus::Running,
            (kind::RUN_CANCELLED, _) => {}
            (kind::RUN_RETRIED, _) => {
                for id in d["reset"].as_array().into_iter().flatten() {
                    if let Some(i) = id.as_str().and_then(|id| def.step_index(id)) {
                        // Attempt numbers carry on, so that a retried step gets new attempt keys.
                        let mut units = std::mem::take(&mut self.steps[i].units);
                        for u in units.values_mut() {
                            u.in_flight = false;
                            u.retry_at = None;
                            u.done = None;
                        }
                        self.steps[i] = StepState {
                            units,
                            ..StepState::default()
                        };
                    }
                }
                self.status = RunStatus::Running;
                self.outputs = Value::Null;
                self.error = None;
                self.finished_ms = None;
            }
            (kind::RUN_FINISHED, _) => {
                self.status = RunStatus::parse(d["status"].as_str().unwrap_or("failed"));
                self.outputs = d.get("outputs").cloned().unwrap_or(Value::Null);
                self.error = d.get("error").and_then(Value::as_str).map(str::to_owned);
                self.finished_ms = Some(ts);
            }
            (kind::STEP_SCHEDULED, Some(i)) => {
                let st = &mut self.steps[i];
                st.status = StepStatus::Running;
                st.started_ms = Some(ts);
                if let Some(items) = d.get("items").and_then(Value::as_array) {
                    st.items = Some(items.clone());
                }
            }
            (kind::STEP_STARTED, Some(i)) => {
                let u = self.steps[i].units.entry(unit_no).or_default();
                u.attempt = num(d, "attempt").unwrap_or(1) as u32;
                u.in_flight = true;
                u.retry_at = None;
                u.deadline = num(d, "deadline_ms");
            }
            (kind::STEP_TIMER, Some(i)) => self.steps[i].wake_at = num(d, "wake_at_ms"),
            (kind::STEP_WAITING, Some(i)) => self.steps[i].status = StepStatus::Waiting,
            (kind::STEP_APPROVED, Some(i)) => {
                self.steps[i].approved_by = d["by"].as_str().map(str::to_owned);
            }
            (kind::ATTEMPT_FAILED, Some(i)) => {
                let u = self.steps[i].units.entry(unit_no).or_default();
                u.attempt = u.attempt.max(num(d, "attempt").unwrap_or(1) as u32);
                u.in_flight = false;
                u.retry_at = num(d, "retry_at_ms");
            }
            (kind::ITEM_FINISHED, Some(i)) => {
                self.steps[i].artifacts.extend(artifacts_of(d));
                let u = self.steps[i].units.entry(unit_no).or_default();
                u.in_flight = false;
                u.retry_at = None;
                u.done = Some((
                    StepStatus::parse(d["status"].as_str().unwrap_or("failed")),
                    Output::from_data(d),
                    d.get("error").and_then(Value::as_str).map(str::to_owned),
                ));
            }
            (kind::STEP_FINISHED, Some(i)) => {
                let st = &mut self.steps[i];
                st.artifacts.extend(artifacts_of(d));
                st.status = StepStatus::parse(d["status"].as_str().unwrap_or("failed"));
                st.output = Output::from_data(d);
                st.outputs = d
                    .get("outputs")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                st.error = d.get("error").and_then(Value::as_str).map(str::to_owned);
                st.finished_ms = Some(ts);
                let status = st.status;
                for u in st.units.values_mut() {
                    // The unit whose result ended the step (a loop's last iteration, a plain step's one unit).
                    if u.in_flight && u.done.is_none() {
                        u.done = Some((status, None, None));
                    }
                    u.in_flight = false;
                    u.retry_at = None;
                }
            }
            _ => {}
        }
    }
}
