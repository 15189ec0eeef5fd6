//! The process table: every process the kernel knows, its place in the supervision tree, and its state.

use crate::StopRequest;
use noa_types::{ExitReason, Pid, ProcessKind, ProcessSpec, ProcessState, RestartPolicy, now_ms};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// Why the kernel is stopping a process; a process stopped on purpose is not restarted by its supervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Intent {
    /// `noa stop`: gone for good.
    User,
    /// The daemon is shutting down; the registry keeps it.
    Shutdown,
    /// A sibling's restart under one-for-all or rest-for-one.
    Group,
    /// Its supervisor gave up (restart intensity exceeded).
    Escalation,
    /// `noa restart`.
    Restart,
}

pub(crate) struct Proc {
    pub pid: Pid,
    pub spec: Arc<ProcessSpec>,
    pub parent: Pid,
    /// In start order.
    pub children: Vec<Pid>,
    pub state: ProcessState,
    pub restarts: u32,
    pub os_pid: Option<u32>,
    pub started_ms: u64,
    pub started_at: Instant,
    pub exit: Option<ExitReason>,
    pub incarnation: u64,
    pub stop_tx: Option<watch::Sender<StopRequest>>,
    /// The last incarnation that has ended.
    pub exited: watch::Sender<u64>,
    pub intent: Option<Intent>,
    /// Whether its supervisor should (re)start it.
    pub wanted: bool,
    /// As a supervisor: restart times of its children inside its intensity window.
    pub child_history: VecDeque<Instant>,
    /// As a child of root (which counts intensity per child): this process's own restart times.
    pub own_history: VecDeque<Instant>,
    pub pending_restart: bool,
}

impl Proc {
    pub fn new(pid: Pid, spec: Arc<ProcessSpec>, parent: Pid) -> Proc {
        Proc {
            pid,
            spec,
            parent,
            children: Vec::new(),
            state: ProcessState::Exited,
            restarts: 0,
            os_pid: None,
            started_ms: now_ms(),
            started_at: Instant::now(),
            exit: None,
            incarnation: 0,
            stop_tx: None,
            exited: watch::channel(0).0,
            intent: None,
            wanted: true,
            child_history: VecDeque::new(),
            own_history: VecDeque::new(),
            pending_restart: false,
        }
    }
}

#[derive(Default)]
pub(crate) struct Table {
    pub procs: BTreeMap<Pid, Proc>,
    pub names: HashMap<String, Pid>,
    pub next_pid: u64,
}

impl Table {
    pub fn by_name(&self, name: &str) -> Option<&Proc> {
        self.names.get(name).and_then(|p| self.procs.get(p))
    }

    /// `pid` and everything below it, parents first.
    pub fn subtree(&self, pid: Pid) -> Vec<Pid> {
        let mut out = vec![pid];
        let mut i = 0;
        while i < out.len() {
            if let Some(p) = self.procs.get(&out[i]) {
                out.extend(p.children.iter().copied());
            }
            i += 1;
        }
        out
    }

    /// Removes `pid` and its subtree from the table and from its parent's children.
    pub fn remove_subtree(&mut self, pid: Pid) {
        let parent = self.procs.get(&pid).map(|p| p.parent);
        if let Some(parent) = parent.and_then(|pp| self.procs.get_mut(&pp)) {
            parent.children.retain(|c| *c != pid);
        }
        for p in self.subtree(pid) {
            if let Some(proc) = self.procs.remove(&p) {
                self.names.remove(&proc.spec.name);
            }
        }
    }

    pub fn info(&self, p: &Proc) -> ProcessInfo {
        let live = !p.state.is_terminal();
        ProcessInfo {
            pid: p.pid,
            name: p.spec.name.clone(),
            kind: p.spec.kind,
            state: p.state,
            restart: p.spec.restart,
            restarts: p.restarts,
            os_pid: p.os_pid,
            parent: self
                .procs
                .get(&p.parent)
                .filter(|_| p.pid != Pid::ROOT)
                .map(|pp| pp.spec.name.clone()),
            parent_pid: (p.pid != Pid::ROOT).then_some(p.parent),
            started_ms: p.started_ms,
            uptime_ms: if live {
                p.started_at.elapsed().as_millis() as u64
            } else {
                0
            },
            exit: p.exit.as_ref().map(|e| e.to_string()),
            command: describe(&p.spec),
            strategy: p.spec.supervisor.as_ref().map(|s| s.strategy.to_string()),
            children: p.children.len(),
        }
    }
}

fn describe(spec: &ProcessSpec) -> String {
    match spec.kind {
        ProcessKind::Native => spec
            .native
            .as_ref()
            .map(|n| {
                std::iter::once(n.command.as_str())
                    .chain(n.args.iter().map(String::as_str))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default(),
        ProcessKind::Builtin => spec.builtin.clone().unwrap_or_default(),
    }
}

/// One row of `noa ps`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ProcessInfo {
    pub pid: Pid,
    pub name: String,
    pub kind: ProcessKind,
    pub state: ProcessState,
    pub restart: RestartPolicy,
    /// Times it was restarted (by its supervisor or by `noa restart`).
    pub restarts: u32,
    pub os_pid: Option<u32>,
    pub parent: Option<String>,
    pub parent_pid: Option<Pid>,
    pub started_ms: u64,
    pub uptime_ms: u64,
    /// How its last incarnation ended.
    pub exit: Option<String>,
    pub command: String,
    pub strategy: Option<String>,
    pub children: usize,
}
