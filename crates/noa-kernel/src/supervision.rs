//! Supervision: starting incarnations, deciding restarts (strategy, restart policy, intensity, backoff),
//! escalating to the parent, and stopping subtrees in reverse start order.

use crate::context::{ProcessContext, Syscalls};
use crate::table::{Intent, Proc, Table};
use crate::{Kernel, StopRequest};
use noa_bus::Sink;
use noa_policy::{Action, Principal, Resource};
use noa_store::AuditRecord;
use noa_types::{ExitReason, Pid, ProcessState, RestartPolicy, Strategy, SupervisorSpec, now_ms};
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tokio::sync::watch;

/// What to redact from a process's log: each secret value, longest first, and each line of length 4 or more
/// of a multi-line one (stderr is logged line by line).
fn redactions(secret_env: &[(String, String)]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (_, v) in secret_env {
        if !v.is_empty() {
            out.push(v.clone());
        }
        if v.contains('\n') {
            out.extend(
                v.lines()
                    .map(|l| l.trim_end_matches('\r'))
                    .filter(|l| l.len() >= 4)
                    .map(str::to_owned),
            );
        }
    }
    out.sort_by_key(|v| std::cmp::Reverse(v.len()));
    out.dedup();
    out
}

impl Kernel {
    /// Starts a new incarnation of `pid` (and, for a supervisor, of its wanted children, in start order).
    pub(crate) fn start_locked(&self, t: &mut Table, pid: Pid) {
        let Some(p) = t.procs.get_mut(&pid) else {
            return;
        };
        let Some(runtime) = self.inner.runtimes.get(&p.spec.kind).cloned() else {
            p.state = ProcessState::Failed;
            p.exit = Some(ExitReason::Error {
                message: format!("no runtime for {} processes", p.spec.kind),
            });
            return;
        };
        p.incarnation += 1;
        p.state = ProcessState::Starting;
        p.exit = None;
        p.intent = None;
        p.os_pid = None;
        p.started_ms = now_ms();
        p.started_at = Instant::now();
        p.pending_restart = false;
        p.wanted = true;
        let (stop_tx, stop_rx) = watch::channel(StopRequest::Run);
        p.stop_tx = Some(stop_tx);
        let spec = p.spec.clone();
        let incarnation = p.incarnation;
        let (sink, mailbox) = Sink::channel(spec.limits.mailbox());
        let mut sids = Vec::new();
        match self.inner.bus.subscribe_sink(
            &format!("agent.{}.inbox", spec.name),
            None,
            sink.clone(),
        ) {
            Ok(sid) => sids.push(sid),
            Err(e) => {
                tracing::error!(name = %spec.name, error = %e, "Cannot subscribe the process inbox.")
            }
        }
        let subs = Arc::new(Mutex::new(sids));
        // Secrets are read at each start, so a restarted process gets their current values.
        let secrets = self.resolve_secrets(&spec);
        let secret_env = secrets.as_ref().cloned().unwrap_or_default();
        let ctx = ProcessContext {
            pid,
            spec: spec.clone(),
            mailbox,
            stop: stop_rx,
            sys: Syscalls::new(
                pid,
                spec.clone(),
                incarnation,
                self.clone(),
                sink,
                subs.clone(),
                redactions(&secret_env),
            ),
            secret_env,
        };
        let children = if spec.is_supervisor() {
            p.children.clone()
        } else {
            Vec::new()
        };
        self.emit(
            pid,
            &spec.name,
            "starting",
            serde_json::json!({ "incarnation": incarnation }),
        );
        let kernel = self.clone();
        tokio::spawn(async move {
            // Run the incarnation in its own task so that a panic in a runtime ends this process, not the kernel.
            let reason = match secrets {
                Err(message) => ExitReason::Error { message },
                Ok(_) => match tokio::spawn(runtime.run(ctx)).await {
                    Ok(reason) => reason,
                    Err(e) => ExitReason::Error {
                        message: format!("the process task panicked: {e}"),
                    },
                },
            };
            for sid in subs.lock().drain(..) {
                kernel.inner.bus.unsubscribe(sid);
            }
            kernel.on_exit(pid, incarnation, reason);
        });
        for child in children {
            if t.procs
                .get(&child)
                .is_some_and(|c| c.wanted && c.state.is_terminal())
            {
                self.start_locked(t, child);
            }
        }
    }

    /// The secret environment of a spec: each secret checked against the policy for the agent and decrypted.
    fn resolve_secrets(
        &self,
        spec: &noa_types::ProcessSpec,
    ) -> std::result::Result<Vec<(String, String)>, String> {
        let agent = Principal::Agent(spec.name.clone());
        let mut out = Vec::with_capacity(spec.secrets.len());
        for (var, name) in &spec.secrets {
            // The policy directly, not `Kernel::authorize`: the caller holds the process table's lock.
            let resource = Resource::Secret(name.clone());
            if let Err(e) = self
                .inner
                .policy
                .authorize(&agent, Action::ReadSecret, &resource, true)
            {
                self.inner.store.audit(AuditRecord::new(
                    agent.id(),
                    "policy.deny",
                    name.clone(),
                    "denied",
                    serde_json::json!({"action": "read_secret", "reason": e.to_string()}),
                ));
                return Err(e.to_string());
            }
            let value = self
                .inner
                .store
                .secret_read(&agent.id(), name, "inject into the process environment")
                .map_err(|e| format!("secret {name} for {var}: {e}"))?;
            let value = String::from_utf8(value)
                .map_err(|_| format!("secret {name} for {var} is not UTF-8 text"))?;
            out.push((var.clone(), value));
        }
        Ok(out)
    }

    /// Called when an incarnation ends, however it ended.
    pub(crate) fn on_exit(&self, pid: Pid, incarnation: u64, reason: ExitReason) {
        let mut t = self.inner.table.lock();
        let has_live_children = t.procs.get(&pid).is_some_and(|p| {
            p.children
                .iter()
                .any(|c| t.procs.get(c).is_some_and(|c| !c.state.is_terminal()))
        });
        let Some(p) = t.procs.get_mut(&pid) else {
            return;
        };
        if p.incarnation != incarnation {
            return;
        }
        self.inner.metrics.exits.fetch_add(1, Ordering::Relaxed);
        p.state = if reason.is_normal() {
            ProcessState::Exited
        } else {
            ProcessState::Failed
        };
        p.exit = Some(reason.clone());
        p.os_pid = None;
        p.stop_tx = None;
        p.exited.send_replace(incarnation);
        let name = p.spec.name.clone();
        let state = p.state;
        let intent = p.intent;
        let restart = match p.spec.restart {
            RestartPolicy::Permanent => true,
            RestartPolicy::Transient => !reason.is_normal(),
            RestartPolicy::Temporary => false,
        };
        let is_supervisor = p.spec.is_supervisor();
        let parent = p.parent;
        self.inner.store.set_os_pid(&name, None);
        self.emit(
            pid,
            &name,
            state.as_str(),
            serde_json::json!({ "reason": reason, "message": reason.to_string() }),
        );
        if intent.is_some() || self.inner.shutting_down.load(Ordering::SeqCst) {
            // Whoever stopped it decides what comes next.
            return;
        }
        if is_supervisor && has_live_children {
            // A supervisor's children do not outlive it: stop them, then decide about the supervisor.
            let kernel = self.clone();
            tokio::spawn(async move {
                let children = kernel
                    .inner
                    .table
                    .lock()
                    .procs
                    .get(&pid)
                    .map(|p| p.children.clone())
                    .unwrap_or_default();
                for c in children.into_iter().rev() {
                    kernel.stop_tree(c, Intent::Group, false).await;
                }
                let mut t = kernel.inner.table.lock();
                // Someone else may have taken over meanwhile (`noa stop`, `noa restart`, shutdown).
                if t.procs.get(&pid).is_none_or(|p| {
                    p.incarnation != incarnation || p.intent.is_some() || p.pending_restart
                }) || kernel.inner.shutting_down.load(Ordering::SeqCst)
                {
                    return;
                }
                if restart {
                    kernel.plan_restart(&mut t, parent, pid);
                } else if let Some(p) = t.procs.get_mut(&pid) {
                    p.wanted = false;
                }
            });
            return;
        }
        if !restart {
            if let Some(p) = t.procs.get_mut(&pid) {
                p.wanted = false;
            }
            return;
        }
        self.plan_restart(&mut t, parent, pid);
    }

    /// The supervisor `sup` restarts `child` (and siblings, by its strategy) after a backoff, unless its
    /// restart intensity is exceeded, in which case it gives up and escalates to its own parent.
    pub(crate) fn plan_restart(&self, t: &mut Table, sup: Pid, child: Pid) {
        let Some(sup_proc) = t.procs.get(&sup) else {
            return;
        };
        if sup_proc.state.is_terminal() || sup_proc.intent.is_some() {
            return;
        }
        let policy: SupervisorSpec = sup_proc.spec.supervisor.clone().unwrap_or_default();
        let siblings = sup_proc.children.clone();
        let now = Instant::now();
        // The root supervisor counts intensity per child: one crashing process must not bring down the others.
        let history = if sup == Pid::ROOT {
            t.procs.get_mut(&child).map(|c| &mut c.own_history)
        } else {
            t.procs.get_mut(&sup).map(|s| &mut s.child_history)
        };
        let Some(history) = history else {
            return;
        };
        let within = std::time::Duration::from_millis(policy.within_ms);
        while history
            .front()
            .is_some_and(|at| now.duration_since(*at) >= within)
        {
            history.pop_front();
        }
        history.push_back(now);
        let n = history.len() as u32;
        let child_name = t
            .procs
            .get(&child)
            .map(|c| c.spec.name.clone())
            .unwrap_or_default();
        if n > policy.max_restarts {
            let reason = format!(
                "restart intensity exceeded: more than {} restarts within {} ms (last: {child_name})",
                policy.max_restarts, policy.within_ms
            );
            if sup == Pid::ROOT {
                if let Some(c) = t.procs.get_mut(&child) {
                    c.wanted = false;
                    c.exit = Some(ExitReason::Error {
                        message: format!("{reason}; not restarted"),
                    });
                }
                self.emit(
                    child,
                    &child_name,
                    "gave_up",
                    serde_json::json!({ "reason": reason }),
                );
            } else {
                self.escalate(t, sup, reason);
            }
            return;
        }
        let delay = policy.backoff(n);
        let mut targets: Vec<Pid> = match policy.strategy {
            Strategy::OneForOne => vec![child],
            Strategy::OneForAll => siblings.clone(),
            Strategy::RestForOne => siblings
                .iter()
                .skip_while(|s| **s != child)
                .copied()
                .collect(),
        };
        targets.retain(|s| {
            *s == child
                || t.procs.get(s).is_some_and(|p| {
                    p.wanted && !matches!(p.intent, Some(Intent::User | Intent::Shutdown))
                })
        });
        let mut to_stop = Vec::new();
        for s in &targets {
            if let Some(p) = t.procs.get_mut(s) {
                p.pending_restart = true;
                if *s != child && !p.state.is_terminal() {
                    p.intent = Some(Intent::Group);
                    to_stop.push(*s);
                }
            }
        }
        let names: Vec<String> = targets
            .iter()
            .filter_map(|s| t.procs.get(s).map(|p| p.spec.name.clone()))
            .collect();
        self.emit(
            child,
            &child_name,
            "restarting",
            serde_json::json!({ "attempt": n, "delay_ms": delay.as_millis() as u64, "strategy": policy.strategy.to_string(), "restarting": names }),
        );
        let kernel = self.clone();
        tokio::spawn(async move {
            for s in to_stop.into_iter().rev() {
                kernel.stop_tree(s, Intent::Group, false).await;
            }
            tokio::time::sleep(delay).await;
            let mut t = kernel.inner.table.lock();
            let abandoned = kernel.inner.shutting_down.load(Ordering::SeqCst)
                || t.procs
                    .get(&sup)
                    .is_none_or(|p| p.state.is_terminal() || p.intent.is_some());
            for s in targets {
                let Some(p) = t.procs.get_mut(&s) else {
                    continue;
                };
                if abandoned || !p.pending_restart || !p.wanted || !p.state.is_terminal() {
                    // Not restarted after all: it must not stay reserved.
                    if p.state.is_terminal() {
                        p.pending_restart = false;
                    }
                    continue;
                }
                p.restarts += 1;
                kernel
                    .inner
                    .metrics
                    .restarts
                    .fetch_add(1, Ordering::Relaxed);
                kernel.start_locked(&mut t, s);
            }
        });
    }

    /// A supervisor gives up: its children are stopped, it fails, and its parent decides about it.
    fn escalate(&self, t: &mut Table, sup: Pid, reason: String) {
        let Some(p) = t.procs.get_mut(&sup) else {
            return;
        };
        p.intent = Some(Intent::Escalation);
        let incarnation = p.incarnation;
        let name = p.spec.name.clone();
        self.emit(
            sup,
            &name,
            "escalated",
            serde_json::json!({ "reason": reason }),
        );
        let kernel = self.clone();
        tokio::spawn(async move {
            kernel.stop_tree(sup, Intent::Escalation, false).await;
            let mut t = kernel.inner.table.lock();
            // Someone else may have taken over meanwhile (`noa stop`, `noa restart`, shutdown).
            let Some(p) = t
                .procs
                .get_mut(&sup)
                .filter(|p| p.incarnation == incarnation && p.intent == Some(Intent::Escalation))
            else {
                return;
            };
            p.state = ProcessState::Failed;
            p.exit = Some(ExitReason::Error {
                message: reason.clone(),
            });
            p.intent = None;
            p.child_history.clear();
            let restart = p.spec.restart != RestartPolicy::Temporary;
            let parent = p.parent;
            kernel.emit(sup, &name, "failed", serde_json::json!({ "reason": { "type": "error", "message": reason }, "message": reason }));
            if restart && !kernel.inner.shutting_down.load(Ordering::SeqCst) {
                kernel.plan_restart(&mut t, parent, sup);
            } else {
                p_unwanted(&mut t, sup);
            }
        });
    }

    /// Stops `pid`: first its children in reverse start order, then itself; waits until all have ended.
    pub(crate) fn stop_tree(
        &self,
        pid: Pid,
        intent: Intent,
        kill: bool,
    ) -> noa_bus::BoxFuture<'static, ()> {
        let kernel = self.clone();
        Box::pin(async move {
            let children = {
                let mut t = kernel.inner.table.lock();
                let Some(p) = t.procs.get_mut(&pid) else {
                    return;
                };
                if p.intent.is_none() || intent == Intent::User || intent == Intent::Shutdown {
                    p.intent = Some(intent);
                }
                if matches!(intent, Intent::User | Intent::Shutdown) {
                    p.pending_restart = false;
                }
                p.children.clone()
            };
            for c in children.into_iter().rev() {
                kernel.stop_tree(c, intent, kill).await;
            }
            let (tx, mut exited, inc, grace) = {
                let mut t = kernel.inner.table.lock();
                let Some(p) = t.procs.get_mut(&pid) else {
                    return;
                };
                if p.state.is_terminal() {
                    return;
                }
                p.state = ProcessState::Stopping;
                let name = p.spec.name.clone();
                let out = (
                    p.stop_tx.clone(),
                    p.exited.subscribe(),
                    p.incarnation,
                    p.spec.limits.stop_grace(),
                );
                kernel.emit(
                    pid,
                    &name,
                    "stopping",
                    serde_json::json!({ "grace_ms": out.3.as_millis() as u64 }),
                );
                out
            };
            if let Some(tx) = tx {
                let _ = tx.send(if kill {
                    StopRequest::Kill
                } else {
                    StopRequest::Stop { grace }
                });
            }
            let _ = exited.wait_for(|v| *v >= inc).await;
        })
    }

    /// Loads the registry after a (re)start: cleans up OS processes left by a crashed daemon, puts every spec
    /// back in the tree, and starts the `permanent` ones. Returns how many were started.
    pub async fn restore(&self) -> crate::Result<usize> {
        let stored = self.inner.store.specs()?;
        for s in &stored {
            if let (Some(os_pid), Some(start)) = (s.os_pid, s.os_start) {
                if let Some(rt) = self.inner.runtimes.get(&s.spec.kind) {
                    rt.reap_stale(os_pid, start);
                }
                self.inner.store.set_os_pid(&s.spec.name, None);
            }
        }
        let mut t = self.inner.table.lock();
        for s in stored {
            if t.names.contains_key(&s.spec.name) {
                continue;
            }
            let parent = s
                .spec
                .parent
                .as_ref()
                .and_then(|n| t.names.get(n).copied())
                .unwrap_or(Pid::ROOT);
            let pid = Pid(t.next_pid);
            t.next_pid += 1;
            let mut p = Proc::new(pid, Arc::new(s.spec.clone()), parent);
            p.wanted = s.spec.restart == RestartPolicy::Permanent;
            if !p.wanted {
                p.exit = Some(ExitReason::Error {
                    message: format!(
                        "not restarted after the daemon restarted (restart = {})",
                        s.spec.restart
                    ),
                });
            }
            t.names.insert(s.spec.name.clone(), pid);
            t.procs.insert(pid, p);
            if let Some(pp) = t.procs.get_mut(&parent) {
                pp.children.push(pid);
            }
        }
        let top: Vec<Pid> = t.procs[&Pid::ROOT].children.clone();
        let mut started = 0;
        for pid in top {
            if t.procs.get(&pid).is_some_and(|p| p.wanted) {
                self.start_locked(&mut t, pid);
                started += 1;
            }
        }
        Ok(started)
    }

    /// Stops every process in reverse start order (the registry keeps them) and flushes the store.
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        let top: Vec<Pid> = self.inner.table.lock().procs[&Pid::ROOT].children.clone();
        for pid in top.into_iter().rev() {
            self.stop_tree(pid, Intent::Shutdown, false).await;
        }
        if let Err(e) = self.inner.store.flush().await {
            tracing::error!(error = %e, "The store could not be flushed at shutdown.");
        }
    }
}

fn p_unwanted(t: &mut Table, pid: Pid) {
    if let Some(p) = t.procs.get_mut(&pid) {
        p.wanted = false;
    }
}
