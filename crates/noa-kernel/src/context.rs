//! What a running process gets from the kernel: its mailbox, its stop signal, and policy-checked system calls.

use crate::{Error, Kernel, Result};
use bytes::Bytes;
use noa_bus::{Delivery, Headers, Message, Sink, SubId};
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
#[derive(Debug)]
pub struct ProcessContext {
    pub pid: Pid,
    pub spec: Arc<ProcessSpec>,
    /// Messages for the process's subscriptions (its inbox `agent.<name>.inbox` is subscribed from the start).
    pub mailbox: mpsc::Receiver<Delivery>,
    /// Changes when the kernel wants the process to stop.
    pub stop: watch::Receiver<StopRequest>,
    /// The process's system calls; clone it into tasks that act for the process.
    pub sys: Syscalls,
    /// Secrets granted by the spec, as environment variables (name, value). Never log these.
    pub secret_env: Vec<(String, String)>,
}

/// The policy-checked system calls of one process incarnation. Cheap to clone.
#[derive(Clone)]
pub struct Syscalls {
    inner: Arc<SyscallsInner>,
}

struct SyscallsInner {
    /// Secret values this process holds: replaced by `[REDACTED]` in its log lines.
    redact: Vec<String>,
    pid: Pid,
    spec: Arc<ProcessSpec>,
    incarnation: u64,
    kernel: Kernel,
    sink: Sink,
    subs: Arc<Mutex<Vec<SubId>>>,
    violations: AtomicU32,
}

impl std::fmt::Debug for Syscalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Syscalls")
            .field("pid", &self.inner.pid)
            .field("name", &self.inner.spec.name)
            .finish()
    }
}

impl Syscalls {
    pub(crate) fn new(
        pid: Pid,
        spec: Arc<ProcessSpec>,
        incarnation: u64,
        kernel: Kernel,
        sink: Sink,
        subs: Arc<Mutex<Vec<SubId>>>,
        redact: Vec<String>,
    ) -> Self {
        Syscalls {
            inner: Arc::new(SyscallsInner {
                pid,
                spec,
                incarnation,
                kernel,
                sink,
                subs,
                redact,
                violations: AtomicU32::new(0),
            }),
        }
    }

    pub fn pid(&self) -> Pid {
        self.inner.pid
    }

    pub fn name(&self) -> &str {
        &self.inner.spec.name
    }

    fn principal(&self) -> Principal {
        Principal::Agent(self.inner.spec.name.clone())
    }

    /// The process's inbox subject.
    pub fn inbox(&self) -> String {
        format!("agent.{}.inbox", self.inner.spec.name)
    }

    /// Reports that the process is up (e.g. answered `initialize`): `starting → running`.
    pub fn ready(&self) {
        self.inner.kernel.set_state(
            self.inner.pid,
            self.inner.incarnation,
            ProcessState::Running,
            serde_json::Value::Null,
        );
    }

    /// Reports the OS process the runtime started, for `ps` and for cleanup after a daemon crash.
    pub fn set_os_pid(&self, os_pid: u32) {
        self.inner
            .kernel
            .set_os_pid(self.inner.pid, self.inner.incarnation, os_pid);
    }

    /// Appends a line to the process's log (its file, and `sys.logs.<name>` on the bus).
    pub fn log(&self, level: &str, line: &str) {
        let line = self.redact(line);
        self.inner
            .kernel
            .inner
            .logs
            .append(self.inner.pid, &self.inner.spec.name, level, &line);
    }

    /// Replaces the process's secret values (and each line of a multi-line one) with `[REDACTED]`.
    pub fn redact<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        if !self.inner.redact.iter().any(|v| text.contains(v.as_str())) {
            return std::borrow::Cow::Borrowed(text);
        }
        let mut out = text.to_owned();
        for v in &self.inner.redact {
            out = out.replace(v.as_str(), "[REDACTED]");
        }
        std::borrow::Cow::Owned(out)
    }

    /// Counts a violation of the protocol or the rules and logs it. Returns true when the process has
    /// now broken the rules too often and must be ended.
    pub fn violation(&self, what: &str) -> bool {
        let what = &*self.redact(what);
        let n = self.inner.violations.fetch_add(1, Ordering::Relaxed) + 1;
        self.log(
            "error",
            &format!("protocol violation {n}/{MAX_VIOLATIONS}: {what}"),
        );
        self.inner.kernel.emit(
            self.inner.pid,
            &self.inner.spec.name,
            "violation",
            serde_json::json!({ "count": n, "what": what }),
        );
        n >= MAX_VIOLATIONS
    }

    fn granted_publish(&self, subject: &str) -> bool {
        self.inner
            .spec
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
        let granted = self.granted_publish(subject);
        let msg = self.inner.kernel.outgoing(
            &self.principal(),
            Action::Publish,
            subject,
            payload,
            headers,
            granted,
        )?;
        Ok(self.inner.kernel.inner.bus.publish(msg)?)
    }

    /// Answers a request that was delivered to this process: `msg.subject` must be that request's reply
    /// subject, which the runtime kept. Agents never see reply subjects, so they cannot answer for others.
    pub fn reply(&self, msg: Message) -> Result<usize> {
        let subject = msg.subject.as_str();
        self.inner.kernel.authorize(
            &self.principal(),
            Action::Reply,
            &Resource::Subject(subject.to_owned()),
            false,
        )?;
        Ok(self.inner.kernel.inner.bus.publish(msg)?)
    }

    /// Sends a request as this process and waits for the reply, if the policy allows.
    pub async fn request(
        &self,
        subject: &str,
        payload: Bytes,
        headers: Option<Headers>,
        timeout: Duration,
    ) -> Result<Message> {
        let granted = self.granted_publish(subject);
        let msg = self.inner.kernel.outgoing(
            &self.principal(),
            Action::Request,
            subject,
            payload,
            headers,
            granted,
        )?;
        Ok(self.inner.kernel.inner.bus.request(msg, timeout).await?)
    }

    /// Subscribes this process's mailbox to `pattern`, if the policy allows.
    pub fn subscribe(&self, pattern: &str, queue: Option<&str>) -> Result<SubId> {
        noa_bus::Pattern::new(pattern)?;
        let granted = self
            .inner
            .spec
            .subscribe
            .iter()
            .any(|g| noa_bus::covers(g, pattern));
        self.inner.kernel.authorize(
            &self.principal(),
            Action::Subscribe,
            &Resource::Subject(pattern.to_owned()),
            granted,
        )?;
        let sid =
            self.inner
                .kernel
                .inner
                .bus
                .subscribe_sink(pattern, queue, self.inner.sink.clone())?;
        self.inner.subs.lock().push(sid);
        Ok(sid)
    }

    /// Checks a VFS access by this process against the policy (its own `/agents/<name>`, `/shared`, or what
    /// the policy grants).
    fn fs_check(&self, action: Action, path: &str) -> Result<noa_store::VPath> {
        let vpath = noa_store::VPath::parse(path)?;
        self.inner.kernel.authorize(
            &self.principal(),
            action,
            &Resource::File(vpath.to_string()),
            false,
        )?;
        Ok(vpath)
    }

    /// Reads a file (at most `max` bytes) as this process.
    pub fn fs_read(
        &self,
        path: &str,
        version: Option<u64>,
        max: u64,
    ) -> Result<(noa_store::FileInfo, Vec<u8>)> {
        let vpath = self.fs_check(Action::ReadFile, path)?;
        let store = &self.inner.kernel.inner.store;
        let too_big = |size: u64| {
            Error::Invalid(noa_types::Error::invalid(
                "path",
                format!("{vpath} is {size} bytes; one call carries at most {max}"),
            ))
        };
        if let noa_store::Namespace::Host { .. } = vpath.namespace() {
            let (file, size) = store.host_open(&vpath)?;
            if size > max {
                return Err(too_big(size));
            }
            let mut data = Vec::with_capacity(size as usize);
            std::io::Read::read_to_end(&mut std::io::Read::take(file, max + 1), &mut data)
                .map_err(|e| noa_store::Error::Host {
                    path: vpath.to_string(),
                    message: e.to_string(),
                })?;
            let info = noa_store::FileInfo {
                path: vpath.to_string(),
                version: 0,
                size: data.len() as u64,
                mtime_ms: 0,
                op: "host".into(),
                principal: String::new(),
            };
            return Ok((info, data));
        }
        let reader = store.fs_open(&vpath, version)?;
        if reader.info.size > max {
            return Err(too_big(reader.info.size));
        }
        let info = reader.info.clone();
        Ok((info, reader.read_all()?))
    }

    /// Writes a whole file as this process: a new version, encrypted, audited.
    pub async fn fs_write(&self, path: &str, data: &[u8]) -> Result<noa_store::FileInfo> {
        let vpath = self.fs_check(Action::WriteFile, path)?;
        let store = &self.inner.kernel.inner.store;
        if let noa_store::Namespace::Host { .. } = vpath.namespace() {
            let mut w = store.host_create(&vpath)?;
            std::io::Write::write_all(w.file(), data).map_err(|e| noa_store::Error::Host {
                path: vpath.to_string(),
                message: e.to_string(),
            })?;
            store.host_commit(&self.principal().id(), w).await?;
            return Ok(noa_store::FileInfo {
                path: vpath.to_string(),
                version: 0,
                size: data.len() as u64,
                mtime_ms: noa_types::now_ms(),
                op: "write".into(),
                principal: self.principal().id(),
            });
        }
        Ok(store.fs_write(&self.principal().id(), &vpath, data).await?)
    }

    /// Deletes a stored file as this process (its history stays).
    pub async fn fs_delete(&self, path: &str) -> Result<noa_store::FileInfo> {
        let vpath = self.fs_check(Action::WriteFile, path)?;
        let file = vpath.stored_file()?.to_owned();
        let mut infos = self
            .inner
            .kernel
            .inner
            .store
            .fs_commit(
                &self.principal().id(),
                vec![noa_store::FsOp::Delete { path: file }],
            )
            .await?;
        Ok(infos.remove(0))
    }

    /// Lists a folder as this process.
    pub fn fs_list(&self, path: &str) -> Result<Vec<noa_store::DirEntry>> {
        let vpath = self.fs_check(Action::ReadFile, path)?;
        Ok(self.inner.kernel.inner.store.fs_list(&vpath)?)
    }

    /// Removes one of this process's own subscriptions.
    pub fn unsubscribe(&self, sid: SubId) -> Result<()> {
        let mut subs = self.inner.subs.lock();
        let Some(i) = subs.iter().position(|s| *s == sid) else {
            return Err(Error::NotYourSubscription { sid });
        };
        subs.remove(i);
        self.inner.kernel.inner.bus.unsubscribe(sid);
        Ok(())
    }
}
