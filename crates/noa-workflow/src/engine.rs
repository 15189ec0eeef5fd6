//! The durable executor: one driver task per run, a node-wide limit on steps in flight, and the handle that
//! the server and the CLI call.
//!
//! A driver changes its run only by appending events (see `state.rs`). It handles what arrived (finished
//! units, controls, timers), decides what that means, commits the resulting events in one durable append
//! (one fsync, shared with other runs by the store's group commit), and only then starts new work.
//! So nothing is started on the strength of a fact that could still be lost. After a crash, `resume_all`
//! replays each unfinished run: finished steps stay finished; an attempt that was in flight is run again
//! with the same attempt key.

use crate::def::{self, ForEach, Step, StepKind, Workflow};
use crate::error::{Error, Result};
use crate::expr::{Scope, truthy};
use crate::state::{Output, RunState, RunStatus, StepStatus, kind};
use crate::steps::{self, UnitCtx};
use noa_kernel::Kernel;
use noa_policy::{Action, Principal, Resource};
use noa_store::{AuditRecord, RunEvent, RunQuery, RunRecord, VPath};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

/// How the engine runs.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Most units of work (commands, requests, model calls) in flight on this node.
    pub max_concurrent_steps: usize,
    /// Most bytes a step may output (stdout of `run`, a response body).
    pub output_limit: usize,
    /// Outputs up to this size are kept in the history; larger ones are VFS files under `/runs/<id>/out/`.
    pub inline_output: usize,
    /// Most bytes of a command's stderr kept as its log.
    pub log_limit: usize,
    /// Where `run` steps get a working folder, one per run (removed when the run ends).
    pub work_dir: PathBuf,
}

impl EngineOptions {
    pub fn new(work_dir: PathBuf) -> EngineOptions {
        EngineOptions {
            max_concurrent_steps: 64,
            output_limit: 16 << 20,
            inline_output: 64 << 10,
            log_limit: 1 << 20,
            work_dir,
        }
    }
}

/// What is kept with a run so that it can resume without its files.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct RunSpec {
    file: String,
    source: String,
    #[serde(default)]
    includes: BTreeMap<String, String>,
    inputs: Value,
    by: String,
    trigger: String,
}

enum Control {
    Cancel {
        by: String,
    },
    Pause {
        by: String,
    },
    Resume {
        by: String,
    },
    Approve {
        step: String,
        by: String,
        comment: Option<String>,
    },
}

/// Where the answer to a control goes.
type ControlReply = oneshot::Sender<Result<(), String>>;

struct RunHandle {
    /// Which driver this is: a retried run gets a new driver while the old one may still be cleaning up.
    generation: u64,
    ctl: mpsc::UnboundedSender<(Control, oneshot::Sender<Result<(), String>>)>,
    status: watch::Receiver<RunStatus>,
}

pub(crate) struct Inner {
    pub kernel: Kernel,
    pub opts: EngineOptions,
    slots: Arc<Semaphore>,
    runs: Mutex<HashMap<String, RunHandle>>,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) triggers_changed: tokio::sync::Notify,
    generation: std::sync::atomic::AtomicU64,
}

/// The workflow engine: cheap to clone; every clone drives the same runs.
#[derive(Clone)]
pub struct WorkflowEngine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for WorkflowEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkflowEngine").finish()
    }
}

/// A run as shown to people and clients.
#[derive(Clone, Debug, Serialize)]
pub struct RunView {
    pub id: String,
    pub workflow: String,
    pub status: String,
    pub trigger: String,
    pub by: String,
    pub parent: Option<String>,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
    pub inputs: Value,
    pub outputs: Value,
    pub error: Option<String>,
    pub steps: Vec<StepView>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StepView {
    pub id: String,
    pub kind: String,
    pub needs: Vec<String>,
    pub status: String,
    /// Attempts started, over all units.
    pub attempts: u32,
    /// For `for_each`: items in all; for `loop`: iterations so far.
    pub units_total: Option<usize>,
    pub units_done: usize,
    pub output: Option<String>,
    pub output_file: Option<String>,
    pub outputs: Map<String, Value>,
    /// VFS paths of the files the step kept from `$NOA_ARTIFACTS`.
    pub artifacts: Vec<String>,
    pub error: Option<String>,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// What a waiting step waits for: `approval`, `timer`, `retry`.
    pub waiting_for: Option<String>,
}

/// A short line per run, for lists.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub id: String,
    pub workflow: String,
    pub status: String,
    pub parent: Option<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub error: Option<String>,
}

/// A registered workflow and its triggers.
#[derive(Clone, Debug, Serialize)]
pub struct Registration {
    pub name: String,
    pub file: String,
    pub cron: Vec<String>,
    pub subjects: Vec<String>,
    pub registered_ms: u64,
    pub by: String,
}

/// The principal a stored id (`user:x`, `agent:x`, `node`) stands for.
pub fn principal_from_id(id: &str) -> Principal {
    match id.split_once(':') {
        Some(("user", n)) => Principal::User(n.to_owned()),
        Some(("agent", n)) => Principal::Agent(n.to_owned()),
        _ => Principal::Node,
    }
}

pub fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

pub fn show_bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} bytes")
    }
}

fn new_run_id() -> String {
    let mut r = [0u8; 3];
    let _ = getrandom::fill(&mut r);
    format!(
        "{:011x}{:06x}",
        noa_types::now_ms(),
        u32::from_be_bytes([0, r[0], r[1], r[2]])
    )
}

/// The attempt key of a unit: the same for every try of one attempt (also after a crash), new for each retry.
pub fn attempt_key(run: &str, step: &str, index: Option<u32>, attempt: u32) -> String {
    match index {
        Some(i) => format!("{run}.{step}.{i}.{attempt}"),
        None => format!("{run}.{step}.{attempt}"),
    }
}

fn parse_spec(rec: &RunRecord) -> Result<(RunSpec, Workflow)> {
    let spec: RunSpec = serde_json::from_str(&rec.spec).map_err(|e| Error::Corrupt {
        run: rec.id.clone(),
        message: e.to_string(),
    })?;
    let def = def::parse(&spec.file, &spec.source, &def::BundleLoader(&spec.includes))
        .map_err(Error::Invalid)?;
    Ok((spec, def))
}

impl WorkflowEngine {
    pub fn new(kernel: Kernel, opts: EngineOptions, shutdown: watch::Receiver<bool>) -> Self {
        WorkflowEngine {
            inner: Arc::new(Inner {
                slots: Arc::new(Semaphore::new(opts.max_concurrent_steps.max(1))),
                kernel,
                opts,
                runs: Mutex::new(HashMap::new()),
                shutdown,
                triggers_changed: tokio::sync::Notify::new(),
                generation: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    pub(crate) fn from_inner(inner: Arc<Inner>) -> Self {
        WorkflowEngine { inner }
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Resumes every unfinished run and starts the triggers of registered workflows. Returns how many runs resumed.
    pub async fn start_service(&self) -> Result<usize> {
        let store = self.inner.kernel.store();
        let unfinished = store.wf_runs(&RunQuery {
            unfinished: true,
            ..Default::default()
        })?;
        let mut resumed = 0;
        // Newest first: a sub-workflow run is newer than its parent, so its driver exists before the
        // parent's unit looks for it (and `wait` tolerates the other order anyway).
        for rec in unfinished {
            match parse_spec(&rec) {
                Ok((spec, def)) => {
                    let events = store.wf_events(&rec.id, 0)?;
                    let state = RunState::replay(&def, &events);
                    self.spawn_driver(rec.id.clone(), Arc::new(def), spec, state);
                    resumed += 1;
                }
                Err(e) => {
                    tracing::error!(run = rec.id, error = %e, "A stored workflow run cannot resume; it is marked failed.");
                    let seq = store
                        .wf_events(&rec.id, 0)?
                        .last()
                        .map(|e| e.seq)
                        .unwrap_or(0);
                    let data = json!({"status": "failed", "error": e.to_string()});
                    store
                        .wf_append(
                            &rec.id,
                            vec![RunEvent {
                                seq: seq + 1,
                                ts_ms: noa_types::now_ms(),
                                kind: kind::RUN_FINISHED.into(),
                                step: None,
                                data: data.to_string(),
                            }],
                            Some(("failed", Some(data.to_string()))),
                            None,
                        )
                        .await?;
                }
            }
        }
        if resumed > 0 {
            tracing::info!(resumed, "Resumed unfinished workflow runs.");
        }
        crate::triggers::start(self.clone());
        Ok(resumed)
    }

    /// Validates a workflow file's text. `base` is where its sub-workflow files are.
    pub fn validate(file: &str, source: &str, base: &std::path::Path) -> Result<Workflow> {
        def::parse(
            file,
            source,
            &def::FsLoader {
                base: base.to_owned(),
            },
        )
        .map_err(Error::Invalid)
    }

    /// Starts a run; returns its id once the run is durable.
    pub async fn start(
        &self,
        principal: &Principal,
        def: Workflow,
        inputs: BTreeMap<String, Value>,
        trigger: &str,
    ) -> Result<String> {
        let id = new_run_id();
        self.start_with_id(principal, def, inputs, trigger, &id, None)
            .await?;
        Ok(id)
    }

    /// Starts a sub-workflow run with a known id; does nothing if it exists already.
    pub(crate) async fn start_child(
        &self,
        principal: &Principal,
        def: Workflow,
        inputs: BTreeMap<String, Value>,
        id: &str,
        parent: &str,
    ) -> Result<()> {
        if self.inner.kernel.store().wf_run(id)?.is_some() {
            return Ok(());
        }
        self.start_with_id(
            principal,
            def,
            inputs,
            &format!("parent:{parent}"),
            id,
            Some(parent),
        )
        .await
    }

    async fn start_with_id(
        &self,
        principal: &Principal,
        def: Workflow,
        inputs: BTreeMap<String, Value>,
        trigger: &str,
        id: &str,
        parent: Option<&str>,
    ) -> Result<()> {
        if *self.inner.shutdown.borrow() {
            return Err(Error::Stopped);
        }
        self.inner.kernel.authorize(
            principal,
            Action::RunWorkflow,
            &Resource::Workflow(def.name.clone()),
            false,
        )?;
        let inputs = def.resolve_inputs(&inputs).map_err(Error::Inputs)?;
        let spec = RunSpec {
            file: def.file.clone(),
            source: def.source.clone(),
            includes: def.includes.clone(),
            inputs: inputs.clone(),
            by: principal.id(),
            trigger: trigger.to_owned(),
        };
        let now = noa_types::now_ms();
        let rec = RunRecord {
            id: id.to_owned(),
            workflow: def.name.clone(),
            status: "running".into(),
            parent: parent.map(str::to_owned),
            created_ms: now,
            updated_ms: now,
            spec: serde_json::to_string(&spec).unwrap_or_default(),
            summary: "{}".into(),
        };
        let data = json!({ "workflow": def.name, "file": def.file, "inputs": inputs, "by": spec.by, "trigger": trigger, "parent": parent });
        let first = RunEvent {
            seq: 1,
            ts_ms: now,
            kind: kind::RUN_CREATED.into(),
            step: None,
            data: data.to_string(),
        };
        let audit = AuditRecord::new(
            principal.id(),
            "workflow.run",
            &def.name,
            "ok",
            json!({ "run": id, "trigger": trigger }),
        );
        self.inner
            .kernel
            .store()
            .wf_create(&rec, first.clone(), Some(audit))
            .await?;
        publish_event(&self.inner, id, &first);
        let mut state = RunState::new(&def);
        state.apply(&def, kind::RUN_CREATED, None, &data, now);
        state.seq = 1;
        self.spawn_driver(id.to_owned(), Arc::new(def), spec, state);
        Ok(())
    }

    fn spawn_driver(&self, id: String, def: Arc<Workflow>, spec: RunSpec, state: RunState) {
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let (status_tx, status_rx) = watch::channel(state.status);
        let generation = self
            .inner
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.runs.lock().insert(
            id.clone(),
            RunHandle {
                generation,
                ctl: ctl_tx,
                status: status_rx,
            },
        );
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let refs = def.steps.iter().map(|s| step_refs(&def, s)).collect();
        let out_refs = outputs_refs(&def);
        let (publisher, mut to_publish) =
            mpsc::unbounded_channel::<(Option<Durable>, Vec<RunEvent>)>();
        let publish_inner = self.inner.clone();
        let publish_id = id.clone();
        tokio::spawn(async move {
            while let Some((durable, events)) = to_publish.recv().await {
                if let Some(rx) = durable
                    && !matches!(rx.await, Ok(Ok(_)))
                {
                    continue;
                }
                for ev in &events {
                    publish_event(&publish_inner, &publish_id, ev);
                }
            }
        });
        let driver = Driver {
            publisher,
            inner: self.inner.clone(),
            principal: principal_from_id(&spec.by),
            inputs: spec.inputs.clone(),
            id: id.clone(),
            def,
            state,
            pending: Vec::new(),
            durable: false,
            audit: None,
            replies: Vec::new(),
            ready: VecDeque::new(),
            tasks: HashMap::new(),
            timers: Vec::new(),
            done_tx,
            done_rx,
            ctl_rx,
            status_tx,
            refs,
            out_refs,
            output_cache: HashMap::new(),
            committed_status: None,
        };
        let inner = self.inner.clone();
        tokio::spawn(async move {
            driver.run().await;
            let mut runs = inner.runs.lock();
            if runs.get(&id).is_some_and(|h| h.generation == generation) {
                runs.remove(&id);
            }
        });
    }

    async fn control(&self, id: &str, ctl: Control) -> Result<()> {
        let tx = {
            let runs = self.inner.runs.lock();
            runs.get(id)
                .filter(|h| !h.status.borrow().is_terminal())
                .map(|h| h.ctl.clone())
        };
        let Some(tx) = tx else {
            return match self.inner.kernel.store().wf_run(id)? {
                None => Err(Error::NoRun(id.to_owned())),
                Some(r) => Err(Error::Conflict(format!(
                    "run {id} is {}, not running",
                    r.status
                ))),
            };
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        tx.send((ctl, reply_tx)).map_err(|_| Error::Stopped)?;
        reply_rx
            .await
            .map_err(|_| Error::Stopped)?
            .map_err(Error::Conflict)
    }

    fn check(&self, principal: &Principal, id: &str, action: Action) -> Result<RunRecord> {
        let rec = self
            .inner
            .kernel
            .store()
            .wf_run(id)?
            .ok_or_else(|| Error::NoRun(id.to_owned()))?;
        self.inner.kernel.authorize(
            principal,
            action,
            &Resource::Workflow(rec.workflow.clone()),
            false,
        )?;
        Ok(rec)
    }

    /// Cancels a run: its steps in flight are stopped (their processes killed) and it ends `cancelled`.
    pub async fn cancel(&self, principal: &Principal, id: &str) -> Result<()> {
        self.check(principal, id, Action::RunWorkflow)?;
        self.control(id, Control::Cancel { by: principal.id() })
            .await?;
        // Sub-workflow runs started by this one are cancelled too.
        let children: Vec<String> = self
            .inner
            .runs
            .lock()
            .keys()
            .filter(|k| k.starts_with(&format!("{id}-")))
            .cloned()
            .collect();
        for c in children {
            let _ = self
                .control(&c, Control::Cancel { by: principal.id() })
                .await;
        }
        Ok(())
    }

    /// Pauses a run: steps in flight finish, no new step starts until `resume`.
    pub async fn pause(&self, principal: &Principal, id: &str) -> Result<()> {
        self.check(principal, id, Action::RunWorkflow)?;
        self.control(id, Control::Pause { by: principal.id() })
            .await
    }

    pub async fn resume(&self, principal: &Principal, id: &str) -> Result<()> {
        self.check(principal, id, Action::RunWorkflow)?;
        self.control(id, Control::Resume { by: principal.id() })
            .await
    }

    /// Approves a step that waits for approval.
    pub async fn approve(
        &self,
        principal: &Principal,
        id: &str,
        step: &str,
        comment: Option<String>,
    ) -> Result<()> {
        self.check(principal, id, Action::Approve)?;
        self.control(
            id,
            Control::Approve {
                step: step.to_owned(),
                by: principal.id(),
                comment,
            },
        )
        .await
    }

    /// Runs a finished run again from `from` (and every step after it); without `from`, from its failed,
    /// cancelled and skipped steps. Steps before stay as they were.
    pub async fn retry(
        &self,
        principal: &Principal,
        id: &str,
        from: Option<&str>,
    ) -> Result<Vec<String>> {
        let rec = self.check(principal, id, Action::RunWorkflow)?;
        let active = self
            .inner
            .runs
            .lock()
            .get(id)
            .is_some_and(|h| !h.status.borrow().is_terminal());
        if active {
            return Err(Error::Conflict(format!(
                "run {id} is still {}; cancel it or wait for it to end before retrying",
                rec.status
            )));
        }
        let (spec, def) = parse_spec(&rec)?;
        let store = self.inner.kernel.store();
        let events = store.wf_events(id, 0)?;
        let state = RunState::replay(&def, &events);
        let roots: Vec<usize> = match from {
            Some(s) => vec![def.step_index(s).ok_or_else(|| Error::NoStep {
                run: id.to_owned(),
                step: s.to_owned(),
            })?],
            None => state
                .steps
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    matches!(
                        s.status,
                        StepStatus::Failed | StepStatus::Cancelled | StepStatus::Skipped
                    )
                })
                .map(|(i, _)| i)
                .collect(),
        };
        if roots.is_empty() {
            return Err(Error::Conflict(format!(
                "run {id} has no failed, cancelled or skipped step; name one with --from"
            )));
        }
        // Everything downstream of a reset step must run again too.
        let mut reset: HashSet<usize> = roots.iter().copied().collect();
        loop {
            let before = reset.len();
            for (i, s) in def.steps.iter().enumerate() {
                if s.needs
                    .iter()
                    .any(|n| def.step_index(n).is_some_and(|j| reset.contains(&j)))
                {
                    reset.insert(i);
                }
            }
            if reset.len() == before {
                break;
            }
        }
        let mut names: Vec<String> = reset.iter().map(|i| def.steps[*i].id.clone()).collect();
        names.sort_by_key(|n| def.step_index(n));
        let data = json!({ "from": from, "reset": names, "by": principal.id() });
        let ev = RunEvent {
            seq: state.seq + 1,
            ts_ms: noa_types::now_ms(),
            kind: kind::RUN_RETRIED.into(),
            step: None,
            data: data.to_string(),
        };
        let audit = AuditRecord::new(
            principal.id(),
            "workflow.retry",
            &def.name,
            "ok",
            json!({"run": id, "reset": names}),
        );
        store
            .wf_append(id, vec![ev.clone()], Some(("running", None)), Some(audit))
            .await?;
        publish_event(&self.inner, id, &ev);
        let mut state = state;
        state.apply(&def, kind::RUN_RETRIED, None, &data, ev.ts_ms);
        state.seq = ev.seq;
        self.spawn_driver(id.to_owned(), Arc::new(def), spec, state);
        Ok(names)
    }

    /// Runs, newest first.
    pub fn list(&self, principal: &Principal, q: &RunQuery) -> Result<Vec<RunSummary>> {
        self.inner
            .kernel
            .authorize(principal, Action::Read, &Resource::System, false)?;
        Ok(self
            .inner
            .kernel
            .store()
            .wf_runs(q)?
            .into_iter()
            .map(|r| {
                let summary: Value = serde_json::from_str(&r.summary).unwrap_or(Value::Null);
                RunSummary {
                    id: r.id,
                    workflow: r.workflow,
                    status: r.status,
                    parent: r.parent,
                    created_ms: r.created_ms,
                    updated_ms: r.updated_ms,
                    error: summary
                        .get("error")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                }
            })
            .collect())
    }

    /// A run with every step.
    pub fn show(&self, principal: &Principal, id: &str) -> Result<RunView> {
        let rec = self.check(principal, id, Action::Read)?;
        self.view(&rec)
    }

    fn view(&self, rec: &RunRecord) -> Result<RunView> {
        let (spec, def) = parse_spec(rec)?;
        let events = self.inner.kernel.store().wf_events(&rec.id, 0)?;
        let state = RunState::replay(&def, &events);
        let steps = def
            .steps
            .iter()
            .zip(&state.steps)
            .map(|(d, s)| {
                let (output, output_file) = match &s.output {
                    Some(Output::Text(t)) => (Some(t.clone()), None),
                    Some(Output::File { path, .. }) => (None, Some(path.clone())),
                    None => (None, None),
                };
                let waiting_for = match (s.status, &d.kind) {
                    (StepStatus::Waiting, _) => Some("approval".to_owned()),
                    (StepStatus::Running, StepKind::Sleep { .. }) => Some("timer".to_owned()),
                    (StepStatus::Running, _) if s.units.values().any(|u| u.retry_at.is_some()) => {
                        Some("retry".to_owned())
                    }
                    _ => None,
                };
                StepView {
                    id: d.id.clone(),
                    kind: d.kind.name().to_owned(),
                    needs: d.needs.clone(),
                    status: s.status.as_str().to_owned(),
                    attempts: s.units.values().map(|u| u.attempt).sum(),
                    units_total: match (&s.items, &d.loop_spec) {
                        (Some(items), _) => Some(items.len()),
                        (None, Some(_)) => Some(
                            s.units
                                .values()
                                .filter(|u| u.done.is_some() || u.in_flight)
                                .count(),
                        ),
                        _ => None,
                    },
                    units_done: s.units.values().filter(|u| u.done.is_some()).count(),
                    output,
                    output_file,
                    outputs: s.outputs.clone(),
                    artifacts: s.artifacts.clone(),
                    error: s.error.clone(),
                    started_ms: s.started_ms,
                    finished_ms: s.finished_ms,
                    waiting_for,
                }
            })
            .collect();
        Ok(RunView {
            id: rec.id.clone(),
            workflow: rec.workflow.clone(),
            status: rec.status.clone(),
            trigger: spec.trigger,
            by: spec.by,
            parent: rec.parent.clone(),
            created_ms: rec.created_ms,
            finished_ms: state.finished_ms,
            inputs: spec.inputs,
            outputs: state.outputs,
            error: state.error,
            steps,
        })
    }

    /// A run's history after `after`.
    pub fn history(&self, principal: &Principal, id: &str, after: u64) -> Result<Vec<RunEvent>> {
        self.check(principal, id, Action::Read)?;
        Ok(self.inner.kernel.store().wf_events(id, after)?)
    }

    /// A step's output and logs (each attempt's stderr) as text.
    pub fn logs(
        &self,
        principal: &Principal,
        id: &str,
        step: &str,
    ) -> Result<(String, Vec<(String, String)>)> {
        let view = self.show(principal, id)?;
        let s = view
            .steps
            .iter()
            .find(|s| s.id == step)
            .ok_or_else(|| Error::NoStep {
                run: id.to_owned(),
                step: step.to_owned(),
            })?;
        let store = self.inner.kernel.store();
        let output = match (&s.output, &s.output_file) {
            (Some(t), _) => t.clone(),
            (None, Some(path)) => read_vfs(store, path).unwrap_or_default(),
            _ => String::new(),
        };
        let mut logs = Vec::new();
        let dir = format!("/runs/{id}/logs");
        if let Ok(vdir) = VPath::parse(&dir)
            && let Ok(entries) = store.fs_list(&vdir)
        {
            for e in entries {
                let matches = e
                    .name
                    .strip_prefix(step)
                    .is_some_and(|rest| rest.starts_with('.'));
                if matches && !e.dir {
                    let path = format!("{dir}/{}", e.name);
                    logs.push((e.name.clone(), read_vfs(store, &path).unwrap_or_default()));
                }
            }
        }
        Ok((output, logs))
    }

    /// Waits until a run has ended and shows it.
    pub async fn wait(&self, id: &str) -> Result<RunView> {
        loop {
            let rx = self.inner.runs.lock().get(id).map(|h| h.status.clone());
            if let Some(mut rx) = rx {
                while !rx.borrow().is_terminal() {
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
            }
            let rec = self
                .inner
                .kernel
                .store()
                .wf_run(id)?
                .ok_or_else(|| Error::NoRun(id.to_owned()))?;
            if RunStatus::parse(&rec.status).is_terminal() {
                return self.view(&rec);
            }
            if *self.inner.shutdown.borrow() {
                return Err(Error::Stopped);
            }
            // Not ended and not driven yet (being resumed, or its driver being replaced): look again soon.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Registers a workflow so that its `on:` triggers start runs.
    pub async fn register(&self, principal: &Principal, def: &Workflow) -> Result<Registration> {
        self.inner.kernel.authorize(
            principal,
            Action::RunWorkflow,
            &Resource::Workflow(def.name.clone()),
            false,
        )?;
        if def.on.cron.is_empty() && def.on.subjects.is_empty() {
            return Err(Error::Conflict(format!(
                "workflow {} has no triggers: add `on: {{ cron: \"*/5 * * * *\" }}` or `on: {{ subject: \"files.uploaded\" }}`",
                def.name
            )));
        }
        if let Some(i) = def
            .inputs
            .iter()
            .find(|i| i.default.is_none() && (i.name != "event" || !def.on.cron.is_empty()))
        {
            return Err(Error::Inputs(format!(
                "a triggered workflow starts without inputs, so input {} needs a default",
                i.name
            )));
        }
        let spec = json!({
            "file": def.file, "source": def.source, "includes": def.includes, "by": principal.id(),
        });
        self.inner
            .kernel
            .store()
            .wf_register(
                &def.name,
                &spec.to_string(),
                AuditRecord::new(
                    principal.id(),
                    "workflow.register",
                    &def.name,
                    "ok",
                    json!({"file": def.file}),
                ),
            )
            .await?;
        self.inner.triggers_changed.notify_one();
        Ok(Registration {
            name: def.name.clone(),
            file: def.file.clone(),
            cron: def.on.cron.iter().map(|c| c.0.clone()).collect(),
            subjects: def.on.subjects.clone(),
            registered_ms: noa_types::now_ms(),
            by: principal.id(),
        })
    }

    pub async fn unregister(&self, principal: &Principal, name: &str) -> Result<()> {
        self.inner.kernel.authorize(
            principal,
            Action::RunWorkflow,
            &Resource::Workflow(name.to_owned()),
            false,
        )?;
        self.inner
            .kernel
            .store()
            .wf_unregister(
                name,
                AuditRecord::new(
                    principal.id(),
                    "workflow.unregister",
                    name,
                    "ok",
                    Value::Null,
                ),
            )
            .await
            .map_err(|e| match e {
                noa_store::Error::Path { .. } => Error::NotRegistered(name.to_owned()),
                e => Error::Store(e),
            })?;
        self.inner.triggers_changed.notify_one();
        Ok(())
    }

    /// Every registered workflow.
    pub fn registered(&self, principal: &Principal) -> Result<Vec<Registration>> {
        self.inner
            .kernel
            .authorize(principal, Action::Read, &Resource::System, false)?;
        Ok(crate::triggers::load(self.inner.kernel.store())?
            .into_iter()
            .map(|(r, def, by)| Registration {
                name: r.name,
                file: def.file.clone(),
                cron: def.on.cron.iter().map(|c| c.0.clone()).collect(),
                subjects: def.on.subjects.clone(),
                registered_ms: r.registered_ms,
                by,
            })
            .collect())
    }

    /// How many runs are being driven now.
    pub fn active_runs(&self) -> usize {
        self.inner.runs.lock().len()
    }
}

fn read_vfs(store: &noa_store::Store, path: &str) -> Option<String> {
    let p = VPath::parse(path).ok()?;
    let bytes = store.fs_open(&p, None).ok()?.read_all().ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

fn subject_for(run: &str, ev: &RunEvent) -> String {
    match &ev.step {
        Some(step) => {
            let what = ev
                .kind
                .strip_prefix("step.")
                .map(str::to_owned)
                .unwrap_or_else(|| ev.kind.replace('.', "_"));
            format!("wf.{run}.step.{step}.{what}")
        }
        None => format!("wf.{run}.{}", ev.kind),
    }
}

fn publish_event(inner: &Inner, run: &str, ev: &RunEvent) {
    let data: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
    let payload = json!({ "run": run, "seq": ev.seq, "ts_ms": ev.ts_ms, "kind": ev.kind, "step": ev.step, "data": data });
    let _ = inner
        .kernel
        .bus()
        .publish_bytes(&subject_for(run, ev), payload.to_string());
}

/// The steps whose results a step's expressions read (all of them when an expression reads `steps` whole).
fn step_refs(def: &Workflow, step: &Step) -> Option<Vec<usize>> {
    let mut refs = Vec::new();
    for t in def::step_all_templates(step) {
        t.exprs().for_each(|e| e.refs(&mut refs));
    }
    collect_steps(def, refs)
}

fn outputs_refs(def: &Workflow) -> Option<Vec<usize>> {
    let mut refs = Vec::new();
    for (_, t) in &def.outputs {
        t.exprs().for_each(|e| e.refs(&mut refs));
    }
    collect_steps(def, refs)
}

fn collect_steps(def: &Workflow, refs: Vec<(String, Option<String>)>) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for (root, name) in refs {
        if root != "steps" {
            continue;
        }
        match name {
            None => return None,
            Some(n) => {
                if let Some(i) = def.step_index(&n)
                    && !out.contains(&i)
                {
                    out.push(i);
                }
            }
        }
    }
    Some(out)
}

/// Sends a unit's result; if dropped unsent (the task panicked or was aborted), sends a failure instead.
struct DoneGuard {
    tx: mpsc::UnboundedSender<UnitDone>,
    step: usize,
    index: u32,
    attempt: u32,
    sent: bool,
}

impl DoneGuard {
    fn send(&mut self, result: Result<steps::Outcome, String>) {
        self.sent = true;
        let _ = self.tx.send(UnitDone {
            step: self.step,
            index: self.index,
            attempt: self.attempt,
            result,
        });
    }
}

impl Drop for DoneGuard {
    fn drop(&mut self) {
        if !self.sent {
            let what = if std::thread::panicking() {
                "the step failed inside noa (a panic); see the daemon's log"
            } else {
                "the step was stopped"
            };
            self.send(Err(what.to_owned()));
        }
    }
}

struct UnitDone {
    step: usize,
    index: u32,
    attempt: u32,
    result: Result<steps::Outcome, String>,
}

enum Timer {
    Retry(usize, u32),
    Sleep(usize),
}

struct Driver {
    inner: Arc<Inner>,
    principal: Principal,
    inputs: Value,
    id: String,
    def: Arc<Workflow>,
    state: RunState,
    /// Events decided but not yet committed.
    pending: Vec<RunEvent>,
    /// Whether `pending` holds an event that must be durable before the driver acts on it.
    durable: bool,
    audit: Option<AuditRecord>,
    /// Answers to controls, sent once their events are durable.
    replies: Vec<(ControlReply, Result<(), String>)>,
    ready: VecDeque<(usize, u32)>,
    tasks: HashMap<(usize, u32), tokio::task::AbortHandle>,
    timers: Vec<(u64, Timer)>,
    done_tx: mpsc::UnboundedSender<UnitDone>,
    done_rx: mpsc::UnboundedReceiver<UnitDone>,
    ctl_rx: mpsc::UnboundedReceiver<(Control, oneshot::Sender<Result<(), String>>)>,
    status_tx: watch::Sender<RunStatus>,
    refs: Vec<Option<Vec<usize>>>,
    out_refs: Option<Vec<usize>>,
    output_cache: HashMap<String, Arc<String>>,
    committed_status: Option<RunStatus>,
    /// Publishes committed events on the bus, in order, each batch only once it is durable.
    publisher: mpsc::UnboundedSender<(Option<Durable>, Vec<RunEvent>)>,
}

/// Says when a batch of events appended without waiting is durable.
type Durable = oneshot::Receiver<noa_store::Result<usize>>;

/// What a unit index means for a step: `None` for a plain step.
fn unit_index(step: &Step, u: u32) -> Option<u32> {
    (step.for_each.is_some() || step.loop_spec.is_some()).then_some(u)
}

impl Driver {
    async fn run(mut self) {
        let mut shutdown = self.inner.shutdown.clone();
        self.committed_status = Some(self.state.status);
        self.recover();
        if self.step_and_commit().await.is_err() {
            return;
        }
        while !self.state.status.is_terminal() {
            let next_timer = self.timers.iter().map(|t| t.0).min();
            let sleep = async {
                match next_timer {
                    Some(at) => {
                        let now = noa_types::now_ms();
                        tokio::time::sleep(Duration::from_millis(at.saturating_sub(now))).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(done) = self.done_rx.recv() => {
                    self.on_done(done);
                    while let Ok(more) = self.done_rx.try_recv() {
                        self.on_done(more);
                    }
                }
                Some((ctl, reply)) = self.ctl_rx.recv() => self.on_control(ctl, reply),
                _ = sleep => self.on_timers(),
                _ = shutdown.changed() => {
                    // The node is stopping: the run resumes at the next start. Units in flight are stopped
                    // (their processes killed) and will run again with the same attempt keys.
                    for (_, t) in self.tasks.drain() {
                        t.abort();
                    }
                    let _ = self.commit().await;
                    return;
                }
            }
            if self.step_and_commit().await.is_err() {
                return;
            }
        }
    }

    /// Decides what can happen next, makes it durable, then starts it.
    async fn step_and_commit(&mut self) -> Result<(), ()> {
        self.advance();
        if let Err(e) = self.commit().await {
            tracing::error!(run = self.id, error = %e, "A workflow run could not record its progress; it stops here and resumes at the next start.");
            for (_, t) in self.tasks.drain() {
                t.abort();
            }
            return Err(());
        }
        self.dispatch();
        // The `step.started` records of what was just started need not be waited for.
        if self.commit().await.is_err() {
            return Err(());
        }
        Ok(())
    }

    fn push(&mut self, kind: &str, step: Option<usize>, data: Value, durable: bool) {
        let step_id = step.map(|i| self.def.steps[i].id.clone());
        let ts = noa_types::now_ms();
        self.state
            .apply(&self.def, kind, step_id.as_deref(), &data, ts);
        self.state.seq += 1;
        self.pending.push(RunEvent {
            seq: self.state.seq,
            ts_ms: ts,
            kind: kind.to_owned(),
            step: step_id,
            data: data.to_string(),
        });
        self.durable |= durable;
    }

    async fn commit(&mut self) -> Result<(), noa_store::Error> {
        if self.pending.is_empty() {
            // A control that changed nothing (a refusal) is answered at once.
            for (tx, r) in self.replies.drain(..) {
                let _ = tx.send(r);
            }
            return Ok(());
        }
        let events = std::mem::take(&mut self.pending);
        let store = self.inner.kernel.store();
        let status_changed = self.committed_status != Some(self.state.status);
        if self.durable || status_changed || self.audit.is_some() {
            let summary = self.state.status.is_terminal().then(|| {
                json!({ "outputs": self.state.outputs, "error": self.state.error }).to_string()
            });
            store
                .wf_append(
                    &self.id,
                    events.clone(),
                    Some((self.state.status.as_str(), summary)),
                    self.audit.take(),
                )
                .await?;
            self.committed_status = Some(self.state.status);
            let _ = self.publisher.send((None, events));
        } else {
            let durable = store.wf_append_deferred(&self.id, events.clone());
            let _ = self.publisher.send((Some(durable), events));
        }
        self.durable = false;
        // The working folder goes before anyone hears that the run ended.
        if self.state.status.is_terminal() {
            let _ = std::fs::remove_dir_all(self.inner.opts.work_dir.join(&self.id));
        }
        for (tx, r) in self.replies.drain(..) {
            let _ = tx.send(r);
        }
        let _ = self.status_tx.send(self.state.status);
        Ok(())
    }

    /// After a restart (or a retry): picks up every step that had started.
    fn recover(&mut self) {
        let now = noa_types::now_ms();
        for i in 0..self.def.steps.len() {
            let st = &self.state.steps[i];
            if st.status != StepStatus::Running && st.status != StepStatus::Waiting {
                continue;
            }
            let step = self.def.steps[i].clone();
            match &step.kind {
                StepKind::Approval { .. } => {
                    if let Some(by) = st.approved_by.clone() {
                        self.finish_with_outputs(i, Output::Text(by), Vec::new());
                    }
                }
                StepKind::Sleep { duration } => {
                    let wake = st.wake_at.unwrap_or(now + duration.as_millis() as u64);
                    if st.wake_at.is_none() {
                        self.push(
                            kind::STEP_TIMER,
                            Some(i),
                            json!({ "wake_at_ms": wake }),
                            true,
                        );
                    }
                    self.timers.push((wake, Timer::Sleep(i)));
                }
                _ => {
                    let units: Vec<u32> = match (&st.items, &step.loop_spec) {
                        (Some(items), _) => (0..items.len() as u32).collect(),
                        (None, Some(_)) => {
                            // Iterations run in order: resume at the first one not done (units from before
                            // a `retry` are kept, cleared, for their attempt numbers).
                            let mut k = 1;
                            while st.units.get(&k).is_some_and(|u| u.done.is_some()) {
                                k += 1;
                            }
                            vec![k]
                        }
                        _ => vec![0],
                    };
                    for u in units {
                        let unit = st.units.get(&u).cloned().unwrap_or_default();
                        if unit.done.is_some() {
                            continue;
                        }
                        match unit.retry_at {
                            Some(at) => self.timers.push((at, Timer::Retry(i, u))),
                            None => self.ready.push_back((i, u)),
                        }
                    }
                    if step.for_each.is_some() {
                        self.maybe_finish_items(i);
                    }
                }
            }
        }
    }

    /// Whether every step a step needs has ended well (or failed with `continue_on_error`).
    fn needs_ok(&self, i: usize) -> bool {
        self.def.steps[i]
            .needs
            .iter()
            .all(|n| self.need_ok(self.def.step_index(n).unwrap_or(0)))
    }

    /// Whether step `j` ended so that the steps that need it may run.
    fn need_ok(&self, j: usize) -> bool {
        match self.state.steps[j].status {
            StepStatus::Succeeded => true,
            StepStatus::Failed => self.def.steps[j].continue_on_error,
            _ => false,
        }
    }

    fn advance(&mut self) {
        if self.state.status != RunStatus::Running {
            return;
        }
        loop {
            let mut changed = false;
            for i in 0..self.def.steps.len() {
                if self.state.steps[i].status != StepStatus::Pending {
                    continue;
                }
                let ready = self.def.steps[i].needs.iter().all(|n| {
                    self.def
                        .step_index(n)
                        .is_some_and(|j| self.state.steps[j].status.is_terminal())
                });
                if ready {
                    self.start_step(i);
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        let all_done = self.state.steps.iter().all(|s| s.status.is_terminal());
        if all_done && self.tasks.is_empty() {
            self.finish_run(None);
        }
    }

    fn start_step(&mut self, i: usize) {
        let step = self.def.steps[i].clone();
        let scope = self.scope(i, None);
        let go = match &step.condition {
            Some(t) => match t.value(&scope) {
                Ok(v) => truthy(&v),
                Err(e) => {
                    self.finish_step(
                        i,
                        StepStatus::Failed,
                        None,
                        Some(format!("if: {e}")),
                        Map::new(),
                    );
                    return;
                }
            },
            None => self.needs_ok(i),
        };
        if !go {
            let reason = if step.condition.is_some() {
                "its `if` was false".to_owned()
            } else {
                let bad: Vec<&str> = step
                    .needs
                    .iter()
                    .filter(|n| {
                        let j = self.def.step_index(n).unwrap_or(0);
                        !self.need_ok(j)
                    })
                    .map(String::as_str)
                    .collect();
                format!("a step it needs did not succeed: {}", bad.join(", "))
            };
            self.push(
                kind::STEP_FINISHED,
                Some(i),
                json!({ "status": "skipped", "reason": reason }),
                true,
            );
            return;
        }
        match &step.kind {
            StepKind::Approval { message } => {
                let message = message.as_ref().and_then(|m| m.render(&scope).ok());
                self.push(kind::STEP_SCHEDULED, Some(i), json!({}), false);
                self.push(
                    kind::STEP_WAITING,
                    Some(i),
                    json!({ "for": "approval", "message": message }),
                    false,
                );
            }
            StepKind::Sleep { duration } => {
                let wake = noa_types::now_ms() + duration.as_millis() as u64;
                self.push(kind::STEP_SCHEDULED, Some(i), json!({}), false);
                self.push(
                    kind::STEP_TIMER,
                    Some(i),
                    json!({ "wake_at_ms": wake }),
                    true,
                );
                self.timers.push((wake, Timer::Sleep(i)));
            }
            _ => {
                let items = match &step.for_each {
                    None => None,
                    Some(ForEach::List(v)) => Some(v.clone()),
                    Some(ForEach::Expr(t)) => match t.value(&scope) {
                        Ok(Value::Array(a)) => Some(a),
                        Ok(Value::String(s)) if s.trim_start().starts_with('[') => {
                            match serde_json::from_str::<Vec<Value>>(&s) {
                                Ok(a) => Some(a),
                                Err(e) => {
                                    self.finish_step(
                                        i,
                                        StepStatus::Failed,
                                        None,
                                        Some(format!("for_each: the text is not a JSON list: {e}")),
                                        Map::new(),
                                    );
                                    return;
                                }
                            }
                        }
                        Ok(other) => {
                            let shown: String = other.to_string().chars().take(80).collect();
                            self.finish_step(
                                i,
                                StepStatus::Failed,
                                None,
                                Some(format!("for_each must give a list, not {shown}")),
                                Map::new(),
                            );
                            return;
                        }
                        Err(e) => {
                            self.finish_step(
                                i,
                                StepStatus::Failed,
                                None,
                                Some(format!("for_each: {e}")),
                                Map::new(),
                            );
                            return;
                        }
                    },
                };
                let data = match &items {
                    Some(items) => json!({ "items": items }),
                    None => json!({}),
                };
                self.push(kind::STEP_SCHEDULED, Some(i), data, false);
                match items {
                    Some(items) if items.is_empty() => {
                        self.finish_step(
                            i,
                            StepStatus::Succeeded,
                            Some(Output::Text("[]".into())),
                            None,
                            Map::new(),
                        );
                    }
                    Some(items) => {
                        for u in 0..items.len() as u32 {
                            self.ready.push_back((i, u));
                        }
                    }
                    None if step.loop_spec.is_some() => self.ready.push_back((i, 1)),
                    None => self.ready.push_back((i, 0)),
                }
            }
        }
    }

    fn dispatch(&mut self) {
        if self.state.status != RunStatus::Running {
            return;
        }
        let run_limit = self.def.max_parallel.unwrap_or(usize::MAX);
        let mut deferred = Vec::new();
        while let Some((i, u)) = self.ready.pop_front() {
            if self.tasks.len() >= run_limit {
                self.ready.push_front((i, u));
                break;
            }
            if self.state.steps[i].status.is_terminal() || self.tasks.contains_key(&(i, u)) {
                continue;
            }
            if let Some(limit) = self.def.steps[i].max_parallel
                && self.tasks.keys().filter(|(s, _)| *s == i).count() >= limit
            {
                deferred.push((i, u));
                continue;
            }
            self.spawn_unit(i, u);
        }
        for d in deferred.into_iter().rev() {
            self.ready.push_front(d);
        }
    }

    fn spawn_unit(&mut self, i: usize, u: u32) {
        let step = self.def.steps[i].clone();
        let unit = self.state.steps[i]
            .units
            .get(&u)
            .cloned()
            .unwrap_or_default();
        // An attempt that was in flight when the node stopped runs again as the same attempt.
        let attempt = if unit.in_flight {
            unit.attempt.max(1)
        } else {
            unit.attempt + 1
        };
        let index = unit_index(&step, u);
        let key = attempt_key(&self.id, &step.id, index, attempt);
        let mut data = json!({ "attempt": attempt, "key": key });
        if let Some(ix) = index {
            data["index"] = json!(ix);
        }
        // A timeout is a timer too: an attempt resumed after a restart gets what was left of it.
        let now = noa_types::now_ms();
        let deadline = match (unit.in_flight, unit.deadline, step.timeout) {
            (true, Some(d), Some(_)) => Some(d),
            (_, _, Some(t)) => Some(now + t.as_millis() as u64),
            _ => None,
        };
        if let Some(d) = deadline {
            data["deadline_ms"] = json!(d);
        }
        self.push(kind::STEP_STARTED, Some(i), data, false);
        let scope = self.scope(i, Some(u));
        let needs_slot = matches!(
            step.kind,
            StepKind::Run { .. }
                | StepKind::Http { .. }
                | StepKind::Llm { .. }
                | StepKind::Publish { .. }
        );
        let subscription = match &step.kind {
            StepKind::WaitFor { subject, .. } => Some(
                subject
                    .render(&scope)
                    .map_err(|e| format!("wait_for: {e}"))
                    .and_then(|subject| {
                        self.inner
                            .kernel
                            .subscribe(&self.principal, &subject, 16)
                            .map_err(|e| e.to_string())
                    }),
            ),
            _ => None,
        };
        let ctx = UnitCtx {
            engine: self.inner.clone(),
            run_id: self.id.clone(),
            step_pos: i,
            subscription: parking_lot::Mutex::new(subscription),
            step: step.clone(),
            index,
            attempt,
            key,
            scope,
            principal: self.principal.clone(),
            restore: step
                .needs
                .iter()
                .filter_map(|n| self.def.step_index(n))
                .flat_map(|j| self.state.steps[j].artifacts.clone())
                .collect(),
        };
        let slots = self.inner.slots.clone();
        let done = self.done_tx.clone();
        let timeout = step.timeout.map(|t| {
            (
                t,
                Duration::from_millis(deadline.unwrap_or(now).saturating_sub(now)),
            )
        });
        let handle = tokio::spawn(async move {
            // Whatever happens to this task (a panic in a step included), the driver hears that the unit ended.
            let mut guard = DoneGuard {
                tx: done,
                step: i,
                index: u,
                attempt,
                sent: false,
            };
            let _permit = if needs_slot {
                slots.acquire_owned().await.ok()
            } else {
                None
            };
            let work = steps::execute(ctx);
            let result = match timeout {
                Some((t, left)) => match tokio::time::timeout(left, work).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("timed out after {}", show_duration(t))),
                },
                None => work.await,
            };
            guard.send(result);
        });
        self.tasks.insert((i, u), handle.abort_handle());
    }

    fn on_done(&mut self, d: UnitDone) {
        self.tasks.remove(&(d.step, d.index));
        let i = d.step;
        if self.state.steps[i].status.is_terminal() {
            return;
        }
        let step = self.def.steps[i].clone();
        let index = unit_index(&step, d.index);
        match d.result {
            Ok((output, artifacts)) => {
                if step.for_each.is_some() {
                    let (k, v) = output.to_json();
                    let mut data = json!({ "index": d.index, "status": "succeeded" });
                    data[k] = v;
                    if !artifacts.is_empty() {
                        data["artifacts"] = json!(artifacts);
                    }
                    self.push(kind::ITEM_FINISHED, Some(i), data, true);
                    self.maybe_finish_items(i);
                } else if let Some(l) = &step.loop_spec {
                    let mut scope = self.scope(i, Some(d.index));
                    scope.set("output", Value::String(self.output_text(&output)));
                    match l.until.value(&scope) {
                        Err(e) => self.finish_step(
                            i,
                            StepStatus::Failed,
                            Some(output),
                            Some(format!("loop.until: {e}")),
                            Map::new(),
                        ),
                        Ok(v) if truthy(&v) => self.finish_with_outputs(i, output, artifacts),
                        Ok(_) if d.index >= l.max_iterations => self.finish_step(
                            i,
                            StepStatus::Failed,
                            Some(output),
                            Some(format!(
                                "the loop did not end: `until` was still false after {} iterations",
                                l.max_iterations
                            )),
                            Map::new(),
                        ),
                        Ok(_) => {
                            let (k, v) = output.to_json();
                            let mut data = json!({ "index": d.index, "status": "succeeded" });
                            data[k] = v;
                            if !artifacts.is_empty() {
                                data["artifacts"] = json!(artifacts);
                            }
                            self.push(kind::ITEM_FINISHED, Some(i), data, true);
                            self.ready.push_back((i, d.index + 1));
                        }
                    }
                } else {
                    self.finish_with_outputs(i, output, artifacts);
                }
            }
            Err(error) => {
                let mut data = json!({ "attempt": d.attempt, "error": error });
                if let Some(ix) = index {
                    data["index"] = json!(ix);
                }
                if d.attempt < step.retry.attempts {
                    let at =
                        noa_types::now_ms() + step.retry.delay(d.attempt + 1).as_millis() as u64;
                    data["retry_at_ms"] = json!(at);
                    self.push(kind::ATTEMPT_FAILED, Some(i), data, true);
                    self.timers.push((at, Timer::Retry(i, d.index)));
                } else {
                    self.push(kind::ATTEMPT_FAILED, Some(i), data, true);
                    if step.for_each.is_some() {
                        self.push(
                            kind::ITEM_FINISHED,
                            Some(i),
                            json!({ "index": d.index, "status": "failed", "error": error }),
                            true,
                        );
                        self.maybe_finish_items(i);
                    } else {
                        let error = if step.retry.attempts > 1 {
                            format!("{error} (after {} attempts)", d.attempt)
                        } else {
                            error
                        };
                        self.finish_step(i, StepStatus::Failed, None, Some(error), Map::new());
                    }
                }
            }
        }
    }

    fn maybe_finish_items(&mut self, i: usize) {
        let st = &self.state.steps[i];
        let Some(items) = &st.items else { return };
        let n = items.len() as u32;
        if st.status.is_terminal()
            || !(0..n).all(|u| st.units.get(&u).is_some_and(|x| x.done.is_some()))
        {
            return;
        }
        let mut outputs = Vec::new();
        let mut failed = Vec::new();
        for u in 0..n {
            let (status, out, err) =
                st.units[&u]
                    .done
                    .clone()
                    .unwrap_or((StepStatus::Failed, None, None));
            outputs.push(match out {
                Some(Output::Text(t)) => Value::String(t),
                Some(Output::File { path, .. }) => json!({ "file": path }),
                None => Value::Null,
            });
            if status != StepStatus::Succeeded {
                failed.push((u, err.unwrap_or_default()));
            }
        }
        let text = Value::Array(outputs).to_string();
        if text.len() > self.inner.opts.output_limit {
            let error = format!(
                "the outputs of the {n} items together are {} bytes, more than workflow.max_output ({})",
                text.len(),
                self.inner.opts.output_limit
            );
            self.finish_step(i, StepStatus::Failed, None, Some(error), Map::new());
            return;
        }
        if failed.is_empty() {
            self.finish_with_outputs(i, Output::Text(text), Vec::new());
        } else {
            let (u, first) = &failed[0];
            let error = format!("{} of {n} items failed; item {u}: {first}", failed.len());
            self.finish_step(
                i,
                StepStatus::Failed,
                Some(Output::Text(text)),
                Some(error),
                Map::new(),
            );
        }
    }

    fn finish_with_outputs(&mut self, i: usize, output: Output, artifacts: Vec<String>) {
        let step = self.def.steps[i].clone();
        let mut outputs = Map::new();
        if !step.outputs.is_empty() {
            let mut scope = self.scope(i, None);
            scope.set("output", Value::String(self.output_text(&output)));
            for (k, t) in &step.outputs {
                match t.value(&scope) {
                    Ok(v) => {
                        outputs.insert(k.clone(), v);
                    }
                    Err(e) => {
                        self.finish_step(
                            i,
                            StepStatus::Failed,
                            Some(output),
                            Some(format!("outputs.{k}: {e}")),
                            Map::new(),
                        );
                        return;
                    }
                }
            }
        }
        self.finish_step_with(
            i,
            StepStatus::Succeeded,
            Some(output),
            None,
            outputs,
            artifacts,
        );
    }

    fn finish_step(
        &mut self,
        i: usize,
        status: StepStatus,
        output: Option<Output>,
        error: Option<String>,
        outputs: Map<String, Value>,
    ) {
        self.finish_step_with(i, status, output, error, outputs, Vec::new());
    }

    /// Records that a step ended, with the artifacts of its last unit.
    fn finish_step_with(
        &mut self,
        i: usize,
        status: StepStatus,
        output: Option<Output>,
        error: Option<String>,
        outputs: Map<String, Value>,
        artifacts: Vec<String>,
    ) {
        let mut data = json!({ "status": status.as_str() });
        if let Some(o) = &output {
            let (k, v) = o.to_json();
            data[k] = v;
        }
        if !artifacts.is_empty() {
            data["artifacts"] = json!(artifacts);
        }
        if !outputs.is_empty() {
            data["outputs"] = Value::Object(outputs);
        }
        if let Some(e) = error {
            data["error"] = json!(e);
        }
        self.push(kind::STEP_FINISHED, Some(i), data, true);
    }

    fn finish_run(&mut self, cancelled_by: Option<String>) {
        let (status, mut error) = match &cancelled_by {
            Some(by) => (RunStatus::Cancelled, Some(format!("cancelled by {by}"))),
            None => {
                let failed = self
                    .def
                    .steps
                    .iter()
                    .zip(&self.state.steps)
                    .find(|(d, s)| s.status == StepStatus::Failed && !d.continue_on_error);
                match failed {
                    Some((d, s)) => (
                        RunStatus::Failed,
                        Some(format!(
                            "step `{}` failed: {}",
                            d.id,
                            s.error.clone().unwrap_or_default()
                        )),
                    ),
                    None => (RunStatus::Succeeded, None),
                }
            }
        };
        let mut outputs = Map::new();
        let mut status = status;
        if status == RunStatus::Succeeded {
            let scope = self.scope_for(self.out_refs.clone(), None, None);
            for (k, t) in self.def.outputs.clone() {
                match t.value(&scope) {
                    Ok(v) => {
                        outputs.insert(k, v);
                    }
                    Err(e) => {
                        status = RunStatus::Failed;
                        error = Some(format!("outputs.{k}: {e}"));
                    }
                }
            }
        }
        self.push(
            kind::RUN_FINISHED,
            None,
            json!({ "status": status.as_str(), "outputs": outputs, "error": error }),
            true,
        );
    }

    fn on_control(&mut self, ctl: Control, reply: oneshot::Sender<Result<(), String>>) {
        let result = match ctl {
            Control::Cancel { by } => {
                if self.state.status.is_terminal() {
                    Err("the run has already ended".to_owned())
                } else {
                    for (_, t) in self.tasks.drain() {
                        t.abort();
                    }
                    self.ready.clear();
                    self.timers.clear();
                    self.push(kind::RUN_CANCELLED, None, json!({ "by": by }), true);
                    for i in 0..self.def.steps.len() {
                        if !self.state.steps[i].status.is_terminal() {
                            self.push(kind::STEP_FINISHED, Some(i), json!({ "status": "cancelled", "error": format!("cancelled by {by}") }), true);
                        }
                    }
                    self.audit = Some(AuditRecord::new(
                        by.clone(),
                        "workflow.cancel",
                        &self.def.name,
                        "ok",
                        json!({ "run": self.id }),
                    ));
                    self.finish_run(Some(by));
                    Ok(())
                }
            }
            Control::Pause { by } => match self.state.status {
                RunStatus::Running => {
                    self.push(kind::RUN_PAUSED, None, json!({ "by": by }), true);
                    Ok(())
                }
                RunStatus::Paused => Err("the run is already paused".to_owned()),
                _ => Err("the run has already ended".to_owned()),
            },
            Control::Resume { by } => match self.state.status {
                RunStatus::Paused => {
                    self.push(kind::RUN_RESUMED, None, json!({ "by": by }), true);
                    Ok(())
                }
                RunStatus::Running => Err("the run is not paused".to_owned()),
                _ => Err("the run has already ended".to_owned()),
            },
            Control::Approve { step, by, comment } => match self.def.step_index(&step) {
                None => Err(format!("the workflow has no step `{step}`")),
                Some(i) if self.state.steps[i].status == StepStatus::Waiting => {
                    self.push(
                        kind::STEP_APPROVED,
                        Some(i),
                        json!({ "by": by, "comment": comment }),
                        true,
                    );
                    self.audit = Some(AuditRecord::new(
                        by.clone(),
                        "workflow.approve",
                        &self.def.name,
                        "ok",
                        json!({ "run": self.id, "step": step, "comment": comment }),
                    ));
                    self.finish_with_outputs(i, Output::Text(by), Vec::new());
                    Ok(())
                }
                Some(i) => Err(format!(
                    "step `{step}` is not waiting for approval (it is {})",
                    self.state.steps[i].status.as_str()
                )),
            },
        };
        self.replies.push((reply, result));
    }

    fn on_timers(&mut self) {
        let now = noa_types::now_ms();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.timers)
            .into_iter()
            .partition(|t| t.0 <= now);
        self.timers = later;
        for (_, t) in due {
            match t {
                Timer::Retry(i, u) => {
                    if !self.state.steps[i].status.is_terminal() {
                        self.ready.push_back((i, u));
                    }
                }
                Timer::Sleep(i) => {
                    if !self.state.steps[i].status.is_terminal() {
                        self.finish_with_outputs(i, Output::Text(String::new()), Vec::new());
                    }
                }
            }
        }
    }

    fn output_text(&mut self, o: &Output) -> String {
        match o {
            Output::Text(t) => t.clone(),
            Output::File { path, .. } => {
                if let Some(t) = self.output_cache.get(path) {
                    return t.as_str().to_owned();
                }
                let t = read_vfs(self.inner.kernel.store(), path).unwrap_or_default();
                self.output_cache.insert(path.clone(), Arc::new(t.clone()));
                t
            }
        }
    }

    /// The names a unit's expressions see.
    fn scope(&mut self, i: usize, unit: Option<u32>) -> Scope {
        self.scope_for(self.refs[i].clone(), Some(i), unit)
    }

    fn scope_for(
        &mut self,
        refs: Option<Vec<usize>>,
        step: Option<usize>,
        unit: Option<u32>,
    ) -> Scope {
        let mut scope = Scope::default();
        scope.set("inputs", self.inputs.clone());
        scope.set("run", json!({ "id": self.id, "workflow": self.def.name }));
        let which: Vec<usize> = refs.unwrap_or_else(|| (0..self.def.steps.len()).collect());
        let mut steps = Map::new();
        for j in which {
            let st = self.state.steps[j].clone();
            let output = st.output.as_ref().map(|o| self.output_text(o));
            steps.insert(
                self.def.steps[j].id.clone(),
                json!({ "status": st.status.as_str(), "output": output, "outputs": st.outputs, "error": st.error }),
            );
        }
        scope.set("steps", Value::Object(steps));
        if let (Some(i), Some(u)) = (step, unit) {
            let st = &self.state.steps[i];
            if let Some(items) = &st.items {
                scope.set(
                    "item",
                    items.get(u as usize).cloned().unwrap_or(Value::Null),
                );
                scope.set("index", json!(u));
            } else if self.def.steps[i].loop_spec.is_some() {
                scope.set("iteration", json!(u));
            }
        }
        // Environment: the workflow's, then the step's (which may read everything above).
        let mut env = Map::new();
        for (k, t) in &self.def.env {
            env.insert(
                k.clone(),
                Value::String(t.render(&scope).unwrap_or_default()),
            );
        }
        scope.set("env", Value::Object(env.clone()));
        if let Some(i) = step {
            for (k, t) in &self.def.steps[i].env {
                env.insert(
                    k.clone(),
                    Value::String(t.render(&scope).unwrap_or_default()),
                );
            }
            scope.set("env", Value::Object(env));
        }
        scope
    }
}
