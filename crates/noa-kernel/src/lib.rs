//! The NOA kernel: a process table, Erlang/OTP-style supervision trees, and the policy-checked
//! system calls that processes and API callers use.
//!
//! Every running thing is a process with a NOA pid, a name, a parent supervisor and a kind. A [`Runtime`] per kind
//! runs one incarnation of a process (the builtin runtime is here; the native one lives in `noa-sandbox`).
//! When an incarnation ends, its supervisor decides, by the child's restart policy and its own strategy and
//! intensity, whether to restart it, its siblings, or to give up and escalate to its own parent.
//!
//! Every state change is journaled in the store and published on `sys.events.<pid>.<event>`.
//! Every operation asks the policy engine first; a denial is an error and a `denied` event.
//!
//! **Invariant:** the kernel knows nothing of HTTP or any wire format.

mod builtin;
mod context;
mod error;
mod logs;
mod supervision;
mod table;

pub use builtin::BuiltinRuntime;
pub use context::{MAX_VIOLATIONS, ProcessContext, StopRequest, Syscalls};
pub use error::{Error, Result};
pub use logs::{LogLine, MAX_LOG_LINE};
pub use table::ProcessInfo;

use bytes::Bytes;
use noa_bus::{BoxFuture, Bus, Headers, Message, Subject, Subscription};
use noa_policy::{Action, Policy, Principal, Resource};
use noa_store::{EventQuery, Store};
use noa_types::{Event, ExitReason, Pid, ProcessKind, ProcessSpec, ProcessState};
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use table::{Intent, Proc, Table};

/// Runs processes of one kind.
pub trait Runtime: Send + Sync + 'static {
    fn kind(&self) -> ProcessKind;

    /// Checks, before anything is recorded, that the spec can run here (the program exists, the built-in is known).
    fn check(&self, spec: &ProcessSpec) -> std::result::Result<(), String>;

    /// Runs one incarnation to its end. It must honour `ctx.stop`: end within the grace period of a
    /// [`StopRequest::Stop`], at once on [`StopRequest::Kill`], and leave nothing running behind.
    fn run(&self, ctx: ProcessContext) -> BoxFuture<'static, ExitReason>;

    /// After a crash of the daemon: ends what is left of an OS process group that was recorded as running.
    /// `os_start` tells the recorded process from a later one that reuses its pid.
    fn reap_stale(&self, _os_pid: u32, _os_start: u64) {}

    /// An identifier of the running OS process (its start time) to record beside its pid.
    fn os_start_time(&self, _os_pid: u32) -> Option<u64> {
        None
    }
}

/// Kernel settings.
#[derive(Clone, Debug)]
pub struct KernelOptions {
    /// Where process logs are written.
    pub logs_dir: PathBuf,
    /// A process log is rotated past this size (one old file is kept).
    pub log_max_bytes: u64,
    /// Intensity and backoff of the root supervisor; it counts intensity per child and never escalates.
    pub root: noa_types::SupervisorSpec,
}

impl KernelOptions {
    pub fn new(logs_dir: PathBuf) -> Self {
        KernelOptions {
            logs_dir,
            log_max_bytes: 8 * 1024 * 1024,
            root: Default::default(),
        }
    }
}

/// Counters since start, for `/metrics`.
#[derive(Debug, Default)]
pub struct KernelMetrics {
    pub spawns: AtomicU64,
    pub restarts: AtomicU64,
    pub exits: AtomicU64,
    pub policy_allowed: AtomicU64,
    pub policy_denied: AtomicU64,
}

/// The kernel's state for `noa status`.
#[derive(Clone, Debug, Serialize)]
pub struct KernelStatus {
    pub uptime_ms: u64,
    pub processes: usize,
    pub by_state: HashMap<String, usize>,
    pub policy: String,
    pub bus: BusStatus,
}

#[derive(Clone, Debug, Serialize)]
pub struct BusStatus {
    pub published: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub subscriptions: u64,
}

/// The kernel handle: cheap to clone, shared by the server, the node and every process context.
#[derive(Clone)]
pub struct Kernel {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel").finish_non_exhaustive()
    }
}

struct Inner {
    bus: Bus,
    store: Store,
    policy: Policy,
    runtimes: HashMap<ProcessKind, Arc<dyn Runtime>>,
    table: Mutex<Table>,
    logs: logs::Logs,
    started: Instant,
    metrics: KernelMetrics,
    shutting_down: AtomicBool,
}

impl Kernel {
    /// A kernel with the root supervisor (pid 1) running and no other process.
    pub fn new(
        opts: KernelOptions,
        bus: Bus,
        store: Store,
        policy: Policy,
        runtimes: Vec<Arc<dyn Runtime>>,
    ) -> Kernel {
        let mut table = Table {
            next_pid: 2,
            ..Default::default()
        };
        let mut root = Proc::new(
            Pid::ROOT,
            Arc::new(ProcessSpec::supervisor("root", opts.root.clone())),
            Pid::ROOT,
        );
        root.state = ProcessState::Running;
        root.incarnation = 1;
        table.names.insert("root".into(), Pid::ROOT);
        table.procs.insert(Pid::ROOT, root);
        let logs = logs::Logs::new(opts.logs_dir, opts.log_max_bytes, bus.clone());
        Kernel {
            inner: Arc::new(Inner {
                bus,
                store,
                policy,
                runtimes: runtimes.into_iter().map(|r| (r.kind(), r)).collect(),
                table: Mutex::new(table),
                logs,
                started: Instant::now(),
                metrics: KernelMetrics::default(),
                shutting_down: AtomicBool::new(false),
            }),
        }
    }

    pub fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn metrics(&self) -> &KernelMetrics {
        &self.inner.metrics
    }

    /// The one choke point: asks the policy engine; a denial is journaled and published as a `denied` event.
    pub fn authorize(
        &self,
        principal: &Principal,
        action: Action,
        resource: &Resource,
        granted: bool,
    ) -> Result<()> {
        match self
            .inner
            .policy
            .authorize(principal, action, resource, granted)
        {
            Ok(()) => {
                self.inner
                    .metrics
                    .policy_allowed
                    .fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.inner
                    .metrics
                    .policy_denied
                    .fetch_add(1, Ordering::Relaxed);
                let (pid, name) = match principal {
                    Principal::Agent(n) => (
                        self.inner
                            .table
                            .lock()
                            .names
                            .get(n)
                            .copied()
                            .unwrap_or(Pid(0)),
                        n.clone(),
                    ),
                    Principal::User(n) => (Pid(0), format!("user:{n}")),
                    Principal::Node => (Pid(0), "node".into()),
                };
                self.inner.store.audit(noa_store::AuditRecord::new(
                    principal.id(),
                    "policy.deny",
                    resource.id(),
                    "denied",
                    serde_json::json!({ "action": action.as_str(), "reason": e.to_string() }),
                ));
                self.emit(
                    pid,
                    &name,
                    "denied",
                    serde_json::json!({ "principal": principal.to_string(), "action": action.as_str(), "resource": resource.to_string(), "error": e.to_string() }),
                );
                Err(e.into())
            }
        }
    }

    /// Journals an event and publishes it on `sys.events.<pid>.<event>`.
    pub(crate) fn emit(&self, pid: Pid, name: &str, event: &str, detail: serde_json::Value) {
        let ev = Event::new(pid, name, event, detail);
        if let (Ok(subject), Ok(json)) = (Subject::new(&ev.subject()), serde_json::to_vec(&ev)) {
            let _ = self.inner.bus.publish(Message::new(subject, json));
        }
        self.inner.store.append(ev);
    }

    pub(crate) fn set_state(
        &self,
        pid: Pid,
        incarnation: u64,
        state: ProcessState,
        detail: serde_json::Value,
    ) {
        let mut t = self.inner.table.lock();
        let Some(p) = t.procs.get_mut(&pid) else {
            return;
        };
        if p.incarnation != incarnation
            || p.state == state
            || p.state.is_terminal()
            || p.state == ProcessState::Stopping
        {
            return;
        }
        p.state = state;
        let name = p.spec.name.clone();
        drop(t);
        self.emit(pid, &name, state.as_str(), detail);
    }

    pub(crate) fn set_os_pid(&self, pid: Pid, incarnation: u64, os_pid: u32) {
        let mut t = self.inner.table.lock();
        let Some(p) = t.procs.get_mut(&pid) else {
            return;
        };
        if p.incarnation != incarnation {
            return;
        }
        p.os_pid = Some(os_pid);
        let start = self
            .inner
            .runtimes
            .get(&p.spec.kind)
            .and_then(|r| r.os_start_time(os_pid))
            .unwrap_or(0);
        self.inner
            .store
            .set_os_pid(&p.spec.name, Some((os_pid, start)));
    }

    /// Authorizes `action` on the process `name` and finds it; the root supervisor is not a target.
    fn target(&self, principal: &Principal, action: Action, name: &str, verb: &str) -> Result<Pid> {
        self.authorize(
            principal,
            action,
            &Resource::Process(name.to_owned()),
            false,
        )?;
        let pid = self.find(name)?;
        if pid == Pid::ROOT {
            return Err(Error::Protected {
                name: name.into(),
                action: verb.into(),
            });
        }
        Ok(pid)
    }

    fn find(&self, name: &str) -> Result<Pid> {
        self.inner
            .table
            .lock()
            .names
            .get(name)
            .copied()
            .ok_or_else(|| Error::NotFound {
                name: name.to_owned(),
            })
    }

    /// Starts a process. It is recorded in the registry (durably) before it starts.
    pub async fn spawn(&self, principal: &Principal, spec: ProcessSpec) -> Result<ProcessInfo> {
        self.authorize(
            principal,
            Action::Spawn,
            &Resource::Process(spec.name.clone()),
            false,
        )?;
        spec.validate()?;
        // Whoever spawns a process hands it its secrets, so they must be allowed to read them.
        if !spec.secrets.is_empty() {
            let known: std::collections::HashSet<String> = self
                .inner
                .store
                .secrets()?
                .into_iter()
                .map(|s| s.name)
                .collect();
            for name in spec.secrets.values() {
                self.authorize(
                    principal,
                    Action::ReadSecret,
                    &Resource::Secret(name.clone()),
                    false,
                )?;
                if !known.contains(name) {
                    return Err(Error::Launch {
                        name: spec.name.clone(),
                        message: format!(
                            "secret {name:?} does not exist; set it first with `noa secret set {name}`"
                        ),
                    });
                }
            }
        }
        let runtime = self
            .inner
            .runtimes
            .get(&spec.kind)
            .ok_or_else(|| Error::NoRuntime {
                kind: spec.kind.to_string(),
            })?;
        runtime.check(&spec).map_err(|message| Error::Launch {
            name: spec.name.clone(),
            message,
        })?;
        let pid = {
            let mut t = self.inner.table.lock();
            if self.inner.shutting_down.load(Ordering::SeqCst) {
                return Err(Error::ShuttingDown);
            }
            let mut replaced = Vec::new();
            if let Some(old) = t.by_name(&spec.name) {
                // The old entry may go only when it and everything below it has ended for good.
                let busy = t
                    .subtree(old.pid)
                    .into_iter()
                    .filter_map(|p| t.procs.get(&p))
                    .find(|p| !p.state.is_terminal() || p.pending_restart || p.pid == Pid::ROOT);
                if let Some(busy) = busy {
                    return Err(Error::AlreadyExists {
                        name: busy.spec.name.clone(),
                        pid: busy.pid.0,
                        state: if busy.pending_restart && busy.state.is_terminal() {
                            "about to (re)start".into()
                        } else {
                            busy.state.to_string()
                        },
                    });
                }
                let old = old.pid;
                replaced = t
                    .subtree(old)
                    .into_iter()
                    .skip(1)
                    .filter_map(|p| t.procs.get(&p).map(|p| p.spec.name.clone()))
                    .collect();
                t.remove_subtree(old);
            }
            let parent = match &spec.parent {
                None => Pid::ROOT,
                Some(parent) => {
                    let p = t.by_name(parent).ok_or_else(|| Error::NotFound {
                        name: parent.clone(),
                    })?;
                    if !p.spec.is_supervisor() {
                        return Err(Error::NotASupervisor {
                            name: parent.clone(),
                        });
                    }
                    if p.state.is_terminal() {
                        return Err(Error::SupervisorNotRunning {
                            name: parent.clone(),
                            state: p.state.to_string(),
                        });
                    }
                    p.pid
                }
            };
            let pid = Pid(t.next_pid);
            t.next_pid += 1;
            let mut proc = Proc::new(pid, Arc::new(spec.clone()), parent);
            // Reserved until it starts: other calls see it as about to start and leave it alone.
            proc.pending_restart = true;
            t.procs.insert(pid, proc);
            t.names.insert(spec.name.clone(), pid);
            if let Some(p) = t.procs.get_mut(&parent) {
                p.children.push(pid);
            }
            (pid, replaced)
        };
        let (pid, replaced) = pid;
        // The children of a replaced supervisor are gone with it, from the registry too.
        for name in &replaced {
            self.inner.store.remove_spec(name).await?;
        }
        if let Err(e) = self.inner.store.put_spec(&spec).await {
            let mut t = self.inner.table.lock();
            if t.names.get(&spec.name) == Some(&pid) {
                t.remove_subtree(pid);
            }
            return Err(e.into());
        }
        let interrupted = {
            let mut t = self.inner.table.lock();
            let parent_ok = |t: &Table, p: Pid| {
                t.procs
                    .get(&p)
                    .is_some_and(|pp| !pp.state.is_terminal() && pp.intent.is_none())
            };
            match t.procs.get(&pid) {
                Some(p)
                    if p.pending_restart
                        && p.intent.is_none()
                        && !self.inner.shutting_down.load(Ordering::SeqCst)
                        && parent_ok(&t, p.parent) =>
                {
                    self.inner.metrics.spawns.fetch_add(1, Ordering::Relaxed);
                    self.inner.store.audit(noa_store::AuditRecord::new(
                        principal.id(),
                        "process.spawn",
                        spec.name.clone(),
                        "ok",
                        serde_json::json!({
                            "kind": spec.kind.as_str(),
                            "command": spec.native.as_ref().map(|n| &n.command),
                            "secrets": spec.secrets.values().collect::<Vec<_>>(),
                        }),
                    ));
                    self.start_locked(&mut t, pid);
                    return self.info_locked(&t, pid);
                }
                Some(_) => {
                    t.remove_subtree(pid);
                    "was stopped, or its supervisor or the kernel was, while it was being spawned"
                }
                None => "was replaced while it was being spawned",
            }
        };
        let _ = self.inner.store.remove_spec(&spec.name).await;
        Err(Error::Interrupted {
            name: spec.name.clone(),
            what: interrupted.into(),
        })
    }

    fn info_locked(&self, t: &Table, pid: Pid) -> Result<ProcessInfo> {
        t.procs
            .get(&pid)
            .map(|p| t.info(p))
            .ok_or_else(|| Error::NotFound {
                name: pid.to_string(),
            })
    }

    /// Stops a process (and, for a supervisor, its children first, in reverse start order) and forgets its spec.
    pub async fn stop(&self, principal: &Principal, name: &str) -> Result<ProcessInfo> {
        let pid = self.target(principal, Action::Stop, name, "stopped")?;
        self.stop_tree(pid, Intent::User, false).await;
        let names: Vec<String> = {
            let mut t = self.inner.table.lock();
            let subtree = t.subtree(pid);
            subtree
                .into_iter()
                .filter_map(|p| {
                    let proc = t.procs.get_mut(&p)?;
                    proc.wanted = false;
                    proc.pending_restart = false;
                    Some(proc.spec.name.clone())
                })
                .collect()
        };
        for n in names.iter().rev() {
            self.inner.store.remove_spec(n).await?;
        }
        self.info(pid)
    }

    /// Kills a process at once (SIGKILL for native ones). Its supervisor treats this as a crash.
    pub async fn kill(&self, principal: &Principal, name: &str) -> Result<ProcessInfo> {
        let pid = self.target(principal, Action::Kill, name, "killed")?;
        let (tx, mut exited, inc) = {
            let t = self.inner.table.lock();
            let p = t.procs.get(&pid).ok_or_else(|| Error::NotFound {
                name: name.to_owned(),
            })?;
            (p.stop_tx.clone(), p.exited.subscribe(), p.incarnation)
        };
        if let Some(tx) = tx {
            let _ = tx.send(StopRequest::Kill);
            let _ =
                tokio::time::timeout(Duration::from_secs(5), exited.wait_for(|v| *v >= inc)).await;
        }
        self.info(pid)
    }

    /// Stops a process and starts it again at once.
    pub async fn restart(&self, principal: &Principal, name: &str) -> Result<ProcessInfo> {
        let pid = self.target(principal, Action::Restart, name, "restarted")?;
        self.stop_tree(pid, Intent::Restart, false).await;
        let mut t = self.inner.table.lock();
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        let p = t.procs.get(&pid).ok_or_else(|| Error::NotFound {
            name: name.to_owned(),
        })?;
        if !p.state.is_terminal() || p.pending_restart {
            // Another restart (or its supervisor) got there first: it is running again.
            return self.info_locked(&t, pid);
        }
        if p.intent != Some(Intent::Restart) {
            return Err(Error::Interrupted {
                name: name.to_owned(),
                what: "was stopped (by `noa stop`, its supervisor or shutdown); spawn it again"
                    .into(),
            });
        }
        let parent = p.parent;
        if let Some(pp) = t
            .procs
            .get(&parent)
            .filter(|pp| pp.state.is_terminal() || pp.intent.is_some())
        {
            return Err(Error::SupervisorNotRunning {
                name: pp.spec.name.clone(),
                state: pp.state.to_string(),
            });
        }
        if let Some(p) = t.procs.get_mut(&pid) {
            p.restarts += 1;
            p.wanted = true;
        }
        self.inner.metrics.restarts.fetch_add(1, Ordering::Relaxed);
        self.start_locked(&mut t, pid);
        self.info_locked(&t, pid)
    }

    fn info(&self, pid: Pid) -> Result<ProcessInfo> {
        let t = self.inner.table.lock();
        t.procs
            .get(&pid)
            .map(|p| t.info(p))
            .ok_or_else(|| Error::NotFound {
                name: pid.to_string(),
            })
    }

    /// Every process, in pid order.
    pub fn list(&self, principal: &Principal) -> Result<Vec<ProcessInfo>> {
        self.authorize(principal, Action::Read, &Resource::System, false)?;
        let t = self.inner.table.lock();
        Ok(t.procs.values().map(|p| t.info(p)).collect())
    }

    pub fn get(&self, principal: &Principal, name: &str) -> Result<ProcessInfo> {
        self.authorize(
            principal,
            Action::Read,
            &Resource::Process(name.to_owned()),
            false,
        )?;
        let t = self.inner.table.lock();
        t.by_name(name)
            .map(|p| t.info(p))
            .ok_or_else(|| Error::NotFound {
                name: name.to_owned(),
            })
    }

    pub fn status(&self) -> KernelStatus {
        let t = self.inner.table.lock();
        let mut by_state = HashMap::new();
        for p in t.procs.values() {
            *by_state.entry(p.state.to_string()).or_insert(0) += 1;
        }
        let s = self.inner.bus.stats();
        KernelStatus {
            uptime_ms: self.inner.started.elapsed().as_millis() as u64,
            processes: t.procs.len(),
            by_state,
            policy: self.inner.policy.source().to_owned(),
            bus: BusStatus {
                published: s.published,
                delivered: s.delivered,
                dropped: s.dropped,
                subscriptions: s.subscriptions,
            },
        }
    }

    /// The last `tail` log lines of a process.
    pub fn logs(&self, principal: &Principal, name: &str, tail: usize) -> Result<Vec<LogLine>> {
        self.authorize(
            principal,
            Action::Read,
            &Resource::Process(name.to_owned()),
            false,
        )?;
        noa_types::validate_name(name)?;
        Ok(self.inner.logs.read(name, tail))
    }

    /// Journal events.
    pub fn events(&self, principal: &Principal, query: &EventQuery) -> Result<Vec<Event>> {
        self.authorize(principal, Action::Read, &Resource::System, false)?;
        Ok(self.inner.store.events(query)?)
    }

    /// Publishes for an API caller.
    pub fn publish(
        &self,
        principal: &Principal,
        subject: &str,
        payload: Bytes,
        headers: Option<Headers>,
    ) -> Result<usize> {
        let msg = self.outgoing(principal, Action::Publish, subject, payload, headers, false)?;
        Ok(self.inner.bus.publish(msg)?)
    }

    /// Validates a message that `principal` wants to send, asks the policy, and builds it.
    /// `granted` says whether the principal's own grants cover the subject.
    pub(crate) fn outgoing(
        &self,
        principal: &Principal,
        action: Action,
        subject: &str,
        payload: Bytes,
        headers: Option<Headers>,
        granted: bool,
    ) -> Result<Message> {
        let subject = Subject::new(subject)?;
        self.authorize(
            principal,
            action,
            &Resource::Subject(subject.to_string()),
            granted,
        )?;
        let msg = Message::new(subject, payload);
        Ok(match headers {
            Some(h) => msg.with_headers(h)?,
            None => msg,
        })
    }

    /// Sends a request for an API caller and waits for the reply.
    pub async fn request(
        &self,
        principal: &Principal,
        subject: &str,
        payload: Bytes,
        headers: Option<Headers>,
        timeout: Duration,
    ) -> Result<Message> {
        let msg = self.outgoing(principal, Action::Request, subject, payload, headers, false)?;
        Ok(self.inner.bus.request(msg, timeout).await?)
    }

    /// Subscribes for an API caller (event streams, `noa sub`).
    pub fn subscribe(
        &self,
        principal: &Principal,
        pattern: &str,
        capacity: usize,
    ) -> Result<Subscription> {
        noa_bus::Pattern::new(pattern)?;
        self.authorize(
            principal,
            Action::Subscribe,
            &Resource::Subject(pattern.to_owned()),
            false,
        )?;
        Ok(self.inner.bus.subscribe(pattern, None, capacity)?)
    }
}

#[cfg(test)]
mod tests;
