//! What a running process gets from the kernel: its mailbox, its stop signal, and policy-checked system calls.

use crate::{Error, Kernel, Result};
use bytes::Bytes;
use noa_bus::{Delivery, Headers, Message, Sink, SubId, Subject};
use noa_policy::{Action, Principal, Resource};
use noa_types::{Pid, ProcessSpec, ProcessState};
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// What the kernel asks of a running process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopRequest {
    /// Keep running.
    Run,
    /// End gracefully within `grace`, then be killed.
    Stop { grace: Duration },
    /// End now (SIGKILL for native processes).
    Kill,
}

/// Protocol or rule violations tolerated before a process is failed.
pub const MAX_VIOLATIONS: u32 = 10;

/// Handed to a [`crate::Runtime`] to run one incarnation of a process.
pub struct ProcessContext {
    pub pid: Pid,
    pub spec: Arc<ProcessSpec>,
    /// Messages for the process's subscriptions (its inbox `agent.<name>.inbox` is subscribed from the start).
    pub mailbox: mpsc::Receiver<Delivery>,
    /// Changes when the kernel wants the process to stop.
    pub stop: watch::Receiver<StopRequest>,
    pub(crate) incarnation: u64,
    pub(crate) kernel: Kernel,
    pub(crate) sink: Sink,
    pub(crate) subs: Arc<Mutex<Vec<SubId>>>,
    pub(crate) violations: AtomicU32,
}

impl std::fmt::Debug for ProcessContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessContext")
            .field("pid", &self.pid)
            .field("name", &self.spec.name)
            .finish()
    }
}

impl ProcessContext {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    fn principal(&self) -> Principal {
        Principal::Agent(self.spec.name.clone())
    }

    /// The process's inbox subject.
    pub fn inbox(&self) -> String {
        format!("agent.{}.inbox", self.spec.name)
    }

    /// Reports that the process is up (e.g. answered `initialize`): `starting → running`.
    pub fn ready(&self) {
        self.kernel.set_state(
            self.pid,
            self.incarnation,
            ProcessState::Running,
            serde_json::Value::Null,
        );
    }

    /// Reports the OS process the runtime started, for `ps` and for cleanup after a daemon crash.
    pub fn set_os_pid(&self, os_pid: u32) {
        self.kernel.set_os_pid(self.pid, self.incarnation, os_pid);
    }

    /// Appends a line to the process's log (its file, and `sys.logs.<name>` on the bus).
    pub fn log(&self, level: &str, line: &str) {
        self.kernel
            .inner
            .logs
            .append(self.pid, &self.spec.name, level, line);
    }

    /// Counts a violation of the protocol or the rules and logs it. Returns true when the process has
    /// now broken the rules too often and must be ended.
    pub fn violation(&self, what: &str) -> bool {
        let n = self.violations.fetch_add(1, Ordering::Relaxed) + 1;
        self.log(
            "error",
            &format!("protocol violation {n}/{MAX_VIOLATIONS}: {what}"),
        );
        self.kernel.emit(
            self.pid,
            &self.spec.name,
            "violation",
            serde_json::json!({ "count": n, "what": what }),
        );
        n >= MAX_VIOLATIONS
    }

    fn granted_publish(&self, subject: &str) -> bool {
        self.spec
            .publish
            .iter()
            .any(|g| noa_bus::covers(g, subject))
    }

    /// Publishes as this process, if the policy allows.
    pub fn publish(
        &self,
        subject: &str,
        payload: Bytes,
        headers: Option<Headers>,
    ) -> Result<usize> {
        let subject = Subject::new(subject)?;
        self.kernel.authorize(
            &self.principal(),
            Action::Publish,
            &Resource::Subject(subject.to_string()),
            self.granted_publish(subject.as_str()),
        )?;
        let mut msg = Message::new(subject, payload);
        if let Some(h) = headers {
            msg = msg.with_headers(h)?;
        }
        Ok(self.kernel.inner.bus.publish(msg)?)
    }

    /// Sends a request as this process and waits for the reply, if the policy allows.
    pub async fn request(
        &self,
        subject: &str,
        payload: Bytes,
        headers: Option<Headers>,
        timeout: Duration,
    ) -> Result<Message> {
        let subject = Subject::new(subject)?;
        self.kernel.authorize(
            &self.principal(),
            Action::Request,
            &Resource::Subject(subject.to_string()),
            self.granted_publish(subject.as_str()),
        )?;
        let mut msg = Message::new(subject, payload);
        if let Some(h) = headers {
            msg = msg.with_headers(h)?;
        }
        Ok(self.kernel.inner.bus.request(msg, timeout).await?)
    }

    /// Subscribes this process's mailbox to `pattern`, if the policy allows.
    pub fn subscribe(&self, pattern: &str, queue: Option<&str>) -> Result<SubId> {
        noa_bus::Pattern::new(pattern)?;
        let granted = self
            .spec
            .subscribe
            .iter()
            .any(|g| noa_bus::covers(g, pattern));
        self.kernel.authorize(
            &self.principal(),
            Action::Subscribe,
            &Resource::Subject(pattern.to_owned()),
            granted,
        )?;
        let sid = self
            .kernel
            .inner
            .bus
            .subscribe_sink(pattern, queue, self.sink.clone())?;
        self.subs.lock().push(sid);
        Ok(sid)
    }

    /// Removes one of this process's own subscriptions.
    pub fn unsubscribe(&self, sid: SubId) -> Result<()> {
        let mut subs = self.subs.lock();
        let Some(i) = subs.iter().position(|s| *s == sid) else {
            return Err(Error::NotYourSubscription { sid });
        };
        subs.remove(i);
        self.kernel.inner.bus.unsubscribe(sid);
        Ok(())
    }

    /// Answers a request delivered to this process (replies go to reply inboxes, which every process may use).
    pub fn respond(&self, request: &Message, payload: Bytes) -> Result<bool> {
        Ok(self.kernel.inner.bus.respond(request, payload)?)
    }

    /// The current stop request.
    pub fn stop_requested(&self) -> StopRequest {
        *self.stop.borrow()
    }
}
