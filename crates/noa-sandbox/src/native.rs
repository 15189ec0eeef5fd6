//! The native runtime: an OS child process in any language, isolated and driven over the agent protocol.
//!
//! The child gets a cleared environment (plus `NOA_*` and what its spec grants), its own process group,
//! rlimits, and SIGKILL if the daemon dies. Its stdout carries the protocol, its stderr is its log.
//! It is always reaped, and after it ends its whole process group is killed, so nothing is left behind.

use crate::lines::{Line, next_line};
use crate::os::{self, ChildLimits};
use crate::protocol::{self, Incoming, code};
use crate::{Error, Result};
use noa_bus::{BoxFuture, Delivery, Message, Subject};
use noa_kernel::{ProcessContext, Runtime, StopRequest, Syscalls};
use noa_types::{ExitReason, Limits, ProcessKind, ProcessSpec};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Lines queued for a child's stdin before it counts as not reading.
const OUT_QUEUE: usize = 1024;

/// Settings of the native runtime.
#[derive(Clone, Debug)]
pub struct NativeOptions {
    /// The longest protocol line accepted from a child, in bytes.
    pub max_line_bytes: usize,
    /// How long a child has to answer `initialize`.
    pub init_timeout: Duration,
    /// Requests delivered to a child and not yet answered, before its mailbox is left to fill.
    pub max_inflight: usize,
    /// Where bare program names are looked up (the daemon's `PATH`); the child itself gets no `PATH` unless granted.
    pub search_path: String,
}

impl Default for NativeOptions {
    fn default() -> Self {
        NativeOptions {
            max_line_bytes: 1024 * 1024,
            init_timeout: Duration::from_secs(10),
            max_inflight: 64,
            search_path: std::env::var("PATH")
                .unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        }
    }
}

/// Runs `native` processes.
#[derive(Debug, Default)]
pub struct NativeRuntime {
    opts: Arc<NativeOptions>,
}

impl NativeRuntime {
    pub fn new(opts: NativeOptions) -> Self {
        NativeRuntime {
            opts: Arc::new(opts),
        }
    }
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds the program a spec names.
pub fn resolve(command: &str, cwd: Option<&str>, search_path: &str) -> Result<PathBuf> {
    if let Some(cwd) = cwd
        && !Path::new(cwd).is_dir()
    {
        return Err(Error::BadCwd {
            cwd: cwd.to_owned(),
        });
    }
    if command.contains('/') {
        let p = match cwd {
            Some(cwd) if !command.starts_with('/') => Path::new(cwd).join(command),
            _ => PathBuf::from(command),
        };
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(Error::NotExecutable {
                path: p.display().to_string(),
            })
        };
    }
    search_path
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(command))
        .find(|p| is_executable(p))
        .ok_or_else(|| Error::NotFound {
            command: command.to_owned(),
            path: search_path.to_owned(),
        })
}

impl Runtime for NativeRuntime {
    fn kind(&self) -> ProcessKind {
        ProcessKind::Native
    }

    fn check(&self, spec: &ProcessSpec) -> std::result::Result<(), String> {
        let native = spec
            .native
            .as_ref()
            .ok_or("a native process needs a command")?;
        resolve(
            &native.command,
            native.cwd.as_deref(),
            &self.opts.search_path,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    fn run(&self, ctx: ProcessContext) -> BoxFuture<'static, ExitReason> {
        Box::pin(run(self.opts.clone(), ctx))
    }

    fn reap_stale(&self, os_pid: u32, os_start: u64) {
        if os::start_time(os_pid) == Some(os_start) {
            tracing::warn!(
                os_pid,
                "Killing the process group left behind by a previous daemon."
            );
            os::kill_group(os_pid, libc::SIGKILL);
        }
    }

    fn os_start_time(&self, os_pid: u32) -> Option<u64> {
        os::start_time(os_pid)
    }
}

/// What a request sent to the child is waiting for.
enum Pending {
    Initialize,
    Message { reply: Option<Subject> },
    Shutdown,
}

/// The kernel's side of one protocol session.
struct Session {
    sys: Syscalls,
    out: mpsc::Sender<String>,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    initialized: bool,
    /// Set when the child must be ended for breaking the rules.
    failure: Option<String>,
}

/// The most bytes one `fs.read` or `fs.write` carries: its line, base64 included, stays under the line limit.
const FS_MAX: u64 = 512 * 1024;

fn kernel_error_code(e: &noa_kernel::Error) -> i64 {
    match e {
        noa_kernel::Error::Policy(_) => code::DENIED,
        noa_kernel::Error::Store(
            noa_store::Error::Path { .. }
            | noa_store::Error::NotFound { .. }
            | noa_store::Error::NoVersion { .. }
            | noa_store::Error::NoMount { .. },
        ) => code::INVALID_PARAMS,
        noa_kernel::Error::Invalid(_)
        | noa_kernel::Error::Bus(
            noa_bus::Error::InvalidSubject { .. } | noa_bus::Error::InvalidHeader { .. },
        ) => code::INVALID_PARAMS,
        _ => code::FAILED,
    }
}

fn str_param<'a>(
    params: &'a Map<String, Value>,
    key: &str,
) -> std::result::Result<&'a str, String> {
    params
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("params.{key} must be a string"))
}

impl Session {
    /// Queues a line for the child's stdin without waiting: a child that does not read its stdin must not
    /// stall the session (it could then not be stopped). A full queue drops the line and counts a violation.
    async fn send(&mut self, line: String) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.out.try_send(line) {
            self.violation(&format!(
                "not reading its stdin ({OUT_QUEUE} lines waiting); a line was dropped"
            ));
        }
    }

    /// Handles one line read from the child's stdout.
    async fn handle_line(&mut self, line: Line, max_line: usize) {
        match line {
            // Blank lines carry nothing; they are not worth a violation.
            Line::Full(l) if l.iter().all(u8::is_ascii_whitespace) => {}
            Line::Full(l) => self.handle(&l).await,
            Line::TooLong { len, .. } => {
                let what =
                    format!("a line of {len} bytes is longer than the limit of {max_line} bytes");
                self.send(protocol::error(&Value::Null, code::INVALID_REQUEST, &what))
                    .await;
                self.violation(&what);
            }
        }
    }

    async fn request(&mut self, method: &str, params: Value, pending: Pending) {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, pending);
        self.send(protocol::request(id, method, params)).await;
    }

    fn messages_in_flight(&self) -> usize {
        self.pending
            .values()
            .filter(|p| matches!(p, Pending::Message { .. }))
            .count()
    }

    fn violation(&mut self, what: &str) {
        if self.sys.violation(what) && self.failure.is_none() {
            self.failure = Some(format!(
                "ended after {} protocol violations; the last: {what}",
                noa_kernel::MAX_VIOLATIONS
            ));
        }
    }

    async fn deliver(&mut self, d: Delivery) {
        let mut params = Map::new();
        params.insert("subject".into(), json!(d.msg.subject.as_str()));
        params.insert("sid".into(), json!(d.sid));
        if let Some(h) = &d.msg.headers {
            params.insert("headers".into(), json!(**h));
        }
        protocol::put_payload(&mut params, &d.msg.payload);
        match d.msg.reply {
            Some(reply) => {
                self.request(
                    "message",
                    Value::Object(params),
                    Pending::Message { reply: Some(reply) },
                )
                .await
            }
            None => {
                self.send(protocol::notification("message", Value::Object(params)))
                    .await
            }
        }
    }

    async fn handle(&mut self, line: &[u8]) {
        match protocol::parse(line) {
            Err(inv) => {
                self.send(protocol::error(&inv.id, inv.code, &inv.message))
                    .await;
                self.violation(&inv.message);
            }
            Ok(Incoming::Response { id, result }) => {
                let pending = id.as_u64().and_then(|n| self.pending.remove(&n));
                match pending {
                    None => self.violation(&format!("a response to unknown id {id}")),
                    Some(Pending::Initialize) => {
                        if let Err(e) = result {
                            self.failure = Some(format!("initialize failed: {e}"));
                        } else {
                            self.initialized = true;
                            self.sys.ready();
                        }
                    }
                    Some(Pending::Shutdown) => {}
                    Some(Pending::Message { reply }) => {
                        if let Some(reply) = reply {
                            self.answer(reply, result);
                        }
                    }
                }
            }
            Ok(Incoming::Request { id, method, params }) => {
                let params = params.as_object().cloned().unwrap_or_default();
                self.call(Some(id), &method, params).await;
            }
            Ok(Incoming::Notification { method, params }) => {
                let params = params.as_object().cloned().unwrap_or_default();
                self.call(None, &method, params).await;
            }
        }
    }

    /// Publishes the child's answer to a request it was delivered.
    fn answer(&self, reply: Subject, result: std::result::Result<Value, Value>) {
        let msg = match result {
            Ok(v) => Message::new(
                reply,
                if v.is_null() {
                    Vec::new()
                } else {
                    v.to_string().into_bytes()
                },
            ),
            Err(e) => {
                let text = e
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("the agent answered with an error")
                    .replace(['\r', '\n'], " ");
                let msg = Message::new(reply, json!({ "error": e }).to_string());
                msg.clone()
                    .with_headers([("noa-error".to_string(), text)].into())
                    .unwrap_or(msg)
            }
        };
        if let Err(e) = self.sys.reply(msg) {
            self.sys
                .log("warn", &format!("cannot deliver the reply: {e}"));
        }
    }

    async fn call(&mut self, id: Option<Value>, method: &str, params: Map<String, Value>) {
        let outcome: std::result::Result<Value, (i64, String)> = match method {
            "publish" => (|| {
                let subject = str_param(&params, "subject")?;
                let payload = protocol::take_payload(&params)?;
                let headers = protocol::take_headers(&params)?;
                Ok((subject.to_owned(), payload, headers))
            })()
            .map_err(|e: String| (code::INVALID_PARAMS, e))
            .and_then(|(s, p, h)| {
                self.sys
                    .publish(&s, p, h)
                    .map(|n| json!({ "delivered": n }))
                    .map_err(|e| (kernel_error_code(&e), e.to_string()))
            }),
            "request" => {
                let parsed = (|| {
                    let subject = str_param(&params, "subject")?.to_owned();
                    let payload = protocol::take_payload(&params)?;
                    let headers = protocol::take_headers(&params)?;
                    let timeout = params
                        .get("timeout_ms")
                        .and_then(Value::as_u64)
                        .unwrap_or(5_000)
                        .clamp(1, 300_000);
                    Ok::<_, String>((subject, payload, headers, timeout))
                })();
                match parsed {
                    Err(e) => Err((code::INVALID_PARAMS, e)),
                    Ok((subject, payload, headers, timeout)) => {
                        // Answered from its own task: the session goes on while the request waits.
                        let sys = self.sys.clone();
                        let out = self.out.clone();
                        tokio::spawn(async move {
                            let line = match sys
                                .request(&subject, payload, headers, Duration::from_millis(timeout))
                                .await
                            {
                                Ok(reply) => {
                                    let mut r = Map::new();
                                    r.insert("subject".into(), json!(reply.subject.as_str()));
                                    if let Some(h) = &reply.headers {
                                        r.insert("headers".into(), json!(**h));
                                    }
                                    protocol::put_payload(&mut r, &reply.payload);
                                    id.as_ref().map(|id| protocol::result(id, Value::Object(r)))
                                }
                                Err(e) => id.as_ref().map(|id| {
                                    protocol::error(id, kernel_error_code(&e), &e.to_string())
                                }),
                            };
                            if let Some(line) = line {
                                let _ = out.send(line).await;
                            }
                        });
                        return;
                    }
                }
            }
            "subscribe" => match str_param(&params, "subject") {
                Err(e) => Err((code::INVALID_PARAMS, e)),
                Ok(subject) => {
                    let queue = params.get("queue").and_then(Value::as_str);
                    self.sys
                        .subscribe(subject, queue)
                        .map(|sid| json!({ "sid": sid }))
                        .map_err(|e| (kernel_error_code(&e), e.to_string()))
                }
            },
            "unsubscribe" => match params.get("sid").and_then(Value::as_u64) {
                None => Err((code::INVALID_PARAMS, "params.sid must be a number".into())),
                Some(sid) => self
                    .sys
                    .unsubscribe(sid)
                    .map(|_| json!({}))
                    .map_err(|e| (code::INVALID_PARAMS, e.to_string())),
            },
            "fs.read" => match str_param(&params, "path") {
                Err(e) => Err((code::INVALID_PARAMS, e)),
                Ok(path) => {
                    let version = params.get("version").and_then(Value::as_u64);
                    self.sys
                        .fs_read(path, version, FS_MAX)
                        .map(|(info, data)| {
                            let mut r = Map::new();
                            r.insert("path".into(), json!(info.path));
                            r.insert("version".into(), json!(info.version));
                            r.insert("size".into(), json!(info.size));
                            protocol::put_payload(&mut r, &data);
                            Value::Object(r)
                        })
                        .map_err(|e| (kernel_error_code(&e), e.to_string()))
                }
            },
            "fs.write" => {
                let parsed = str_param(&params, "path")
                    .map(str::to_owned)
                    .and_then(|p| protocol::take_payload(&params).map(|d| (p, d)));
                match parsed {
                    Err(e) => Err((code::INVALID_PARAMS, e)),
                    Ok((_, data)) if data.len() as u64 > FS_MAX => Err((
                        code::INVALID_PARAMS,
                        format!("the contents are {} bytes; one call carries at most {FS_MAX}", data.len()),
                    )),
                    Ok((path, data)) => self
                        .sys
                        .fs_write(&path, &data)
                        .await
                        .map(|info| json!({ "path": info.path, "version": info.version, "size": info.size }))
                        .map_err(|e| (kernel_error_code(&e), e.to_string())),
                }
            }
            "fs.delete" => match str_param(&params, "path") {
                Err(e) => Err((code::INVALID_PARAMS, e)),
                Ok(path) => self
                    .sys
                    .fs_delete(path)
                    .await
                    .map(|info| json!({ "path": info.path, "version": info.version }))
                    .map_err(|e| (kernel_error_code(&e), e.to_string())),
            },
            "fs.list" => match str_param(&params, "path") {
                Err(e) => Err((code::INVALID_PARAMS, e)),
                Ok(path) => self
                    .sys
                    .fs_list(path)
                    .map(|entries| json!({ "entries": entries }))
                    .map_err(|e| (kernel_error_code(&e), e.to_string())),
            },
            "log" => {
                let level = params
                    .get("level")
                    .and_then(Value::as_str)
                    .unwrap_or("info");
                match str_param(&params, "message") {
                    Ok(m) => {
                        self.sys.log(level, m);
                        Ok(json!({}))
                    }
                    Err(e) => Err((code::INVALID_PARAMS, e)),
                }
            }
            other => {
                let what = format!("unknown method {other:?}");
                self.violation(&what);
                Err((
                    code::METHOD_NOT_FOUND,
                    format!(
                        "{what}; the methods are publish, request, subscribe, unsubscribe, log, fs.read, fs.write, fs.delete, fs.list"
                    ),
                ))
            }
        };
        if let Some(id) = id {
            let line = match outcome {
                Ok(v) => protocol::result(&id, v),
                Err((c, m)) => protocol::error(&id, c, &m),
            };
            self.send(line).await;
        } else if let Err((_, m)) = outcome {
            self.sys
                .log("warn", &format!("notification {method:?} failed: {m}"));
        }
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn run(opts: Arc<NativeOptions>, mut ctx: ProcessContext) -> ExitReason {
    let Some(native) = ctx.spec.native.clone() else {
        return ExitReason::Error {
            message: "a native process needs a command".into(),
        };
    };
    let program = match resolve(&native.command, native.cwd.as_deref(), &opts.search_path) {
        Ok(p) => p,
        Err(e) => {
            return ExitReason::Error {
                message: format!("cannot start: {e}"),
            };
        }
    };
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(&native.args)
        .env_clear()
        .envs(&ctx.spec.env)
        .envs(ctx.secret_env.iter().map(|(k, v)| (k, v)))
        .env("NOA_PID", ctx.pid.to_string())
        .env("NOA_NAME", &ctx.spec.name)
        .env("NOA_INBOX", ctx.sys.inbox())
        .env("NOA_PROTOCOL", protocol::PROTOCOL)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    if let Some(cwd) = &native.cwd {
        cmd.current_dir(cwd);
    }
    os::apply_in_child(
        &mut cmd,
        ChildLimits {
            memory_bytes: ctx.spec.limits.memory_bytes,
            cpu_seconds: ctx.spec.limits.cpu_seconds,
            open_files: Some(
                ctx.spec
                    .limits
                    .open_files
                    .unwrap_or(Limits::DEFAULT_OPEN_FILES),
            ),
        },
    );
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return ExitReason::Error {
                message: format!("cannot start {}: {e}", program.display()),
            };
        }
    };
    let pgid = child.id().unwrap_or(0);
    ctx.sys.set_os_pid(pgid);
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        os::kill_group(pgid, libc::SIGKILL);
        let _ = child.wait().await;
        return ExitReason::Error {
            message: "the child's pipes could not be set up".into(),
        };
    };

    // stdin: lines from the session, flushed whenever the queue is empty.
    let (out_tx, mut out_rx) = mpsc::channel::<String>(OUT_QUEUE);
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::new(stdin);
        while let Some(line) = out_rx.recv().await {
            if w.write_all(line.as_bytes()).await.is_err() || w.write_all(b"\n").await.is_err() {
                break;
            }
            if out_rx.is_empty() && w.flush().await.is_err() {
                break;
            }
        }
    });
    // stderr: the process's log.
    let log_sys = ctx.sys.clone();
    let stderr_task = tokio::spawn(async move {
        let mut r = BufReader::new(stderr);
        while let Ok(Some(line)) = next_line(&mut r, noa_kernel::MAX_LOG_LINE - 64).await {
            match line {
                Line::Full(l) => log_sys.log("stderr", &lossy(&l)),
                Line::TooLong { head, len } => {
                    log_sys.log("stderr", &format!("{} …[{len} bytes, cut]", lossy(&head)))
                }
            }
        }
    });
    // stdout: protocol lines, read in their own task so that a partial line is never lost.
    let (line_tx, mut lines) = mpsc::channel::<Line>(64);
    let max_line = opts.max_line_bytes;
    let reader = tokio::spawn(async move {
        let mut r = BufReader::new(stdout);
        while let Ok(Some(line)) = next_line(&mut r, max_line).await {
            if line_tx.send(line).await.is_err() {
                break;
            }
        }
    });

    let mut session = Session {
        sys: ctx.sys.clone(),
        out: out_tx,
        next_id: 1,
        pending: HashMap::new(),
        initialized: false,
        failure: None,
    };
    let init = json!({ "protocol": protocol::PROTOCOL, "pid": ctx.pid, "name": ctx.spec.name, "inbox": ctx.sys.inbox() });
    session
        .request("initialize", init, Pending::Initialize)
        .await;

    let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let init_deadline = Instant::now() + opts.init_timeout;
    let mut term_at = far;
    let mut kill_at = far;
    let mut stop: StopRequest = StopRequest::Run;
    let mut stdout_open = true;
    let mut failure_killed = false;
    let status = loop {
        if let Some(reason) = &session.failure
            && !failure_killed
        {
            session.sys.log("error", reason);
            os::kill_group(pgid, libc::SIGKILL);
            failure_killed = true;
        }
        let accepting = session.initialized
            && stop == StopRequest::Run
            && session.failure.is_none()
            && session.messages_in_flight() < opts.max_inflight;
        tokio::select! {
            status = child.wait() => break status,
            // A kill may still come while a graceful stop is under way.
            changed = ctx.stop.changed(), if stop != StopRequest::Kill => {
                let req = if changed.is_ok() { *ctx.stop.borrow_and_update() } else { StopRequest::Kill };
                match req {
                    StopRequest::Run => {}
                    StopRequest::Kill => {
                        stop = req;
                        os::kill_group(pgid, libc::SIGKILL);
                    }
                    StopRequest::Stop { grace } if stop == StopRequest::Run => {
                        stop = req;
                        session.request("shutdown", json!({}), Pending::Shutdown).await;
                        term_at = Instant::now() + grace / 2;
                        kill_at = Instant::now() + grace;
                    }
                    StopRequest::Stop { .. } => {}
                }
            }
            line = lines.recv(), if stdout_open => match line {
                None => stdout_open = false,
                Some(line) => session.handle_line(line, max_line).await,
            },
            d = ctx.mailbox.recv(), if accepting => if let Some(d) = d { session.deliver(d).await },
            _ = tokio::time::sleep_until(init_deadline), if !session.initialized && session.failure.is_none() && stop == StopRequest::Run => {
                session.failure = Some(format!("did not answer initialize within {} ms", opts.init_timeout.as_millis()));
            }
            _ = tokio::time::sleep_until(term_at), if term_at != far => {
                session.sys.log("warn", "did not exit after shutdown; sending SIGTERM");
                os::kill_group(pgid, libc::SIGTERM);
                term_at = far;
            }
            _ = tokio::time::sleep_until(kill_at), if kill_at != far => {
                session.sys.log("warn", "did not exit within its stop grace period; sending SIGKILL");
                os::kill_group(pgid, libc::SIGKILL);
                kill_at = far;
            }
        }
    };
    // What the child wrote before it ended still counts (a last publish, a last answer): read stdout to its end.
    // The process group is killed first so that no grandchild can hold the pipe open.
    os::kill_group(pgid, libc::SIGKILL);
    if stdout_open {
        let drain_until = Instant::now() + Duration::from_millis(500);
        while let Ok(Some(line)) = tokio::time::timeout_at(drain_until, lines.recv()).await {
            session.handle_line(line, max_line).await;
        }
    }
    // Whatever the child left in its process group goes with it.
    os::kill_group(pgid, libc::SIGKILL);
    // Requests it never answered get an error reply now rather than a timeout later.
    for p in std::mem::take(&mut session.pending) {
        if let (_, Pending::Message { reply: Some(reply) }) = p {
            session.answer(
                reply,
                Err(json!({ "code": code::FAILED, "message": "the agent exited before replying" })),
            );
        }
    }
    let failure = session.failure.take();
    drop(session);
    reader.abort();
    writer.abort();
    let _ = tokio::time::timeout(Duration::from_millis(500), stderr_task).await;

    if let Some(message) = failure {
        return ExitReason::Error { message };
    }
    match status {
        Err(e) => ExitReason::Error {
            message: format!("waiting for the process failed: {e}"),
        },
        Ok(st) => {
            if matches!(stop, StopRequest::Stop { .. }) {
                return ExitReason::Stopped;
            }
            match (st.code(), st.signal()) {
                (Some(code), _) => ExitReason::Code { code },
                (None, Some(sig)) => ExitReason::Signal {
                    signal: sig,
                    name: os::signal_name(sig).to_owned(),
                },
                _ => ExitReason::Error {
                    message: format!("ended with {st}"),
                },
            }
        }
    }
}
