//! What each step kind does for one unit of work (the step, an item of its `for_each` or an iteration of its
//! `loop`). Each returns the unit's output, or a message saying why it failed; the executor records either.

use crate::def::{Step, StepKind};
use crate::engine::Inner;
use crate::expr::{Scope, to_text};
use crate::state::Output;
use bytes::Bytes;
use noa_policy::Principal;
use noa_store::VPath;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Everything a unit needs to run.
pub(crate) struct UnitCtx {
    pub engine: Arc<Inner>,
    pub run_id: String,
    pub step: Step,
    /// The step's position in the workflow (for ids that step names cannot make ambiguous).
    pub step_pos: usize,
    pub index: Option<u32>,
    pub attempt: u32,
    pub key: String,
    pub scope: Scope,
    pub principal: Principal,
    /// VFS files of the steps this one needs (their artifacts), to put back in the working folder if missing.
    pub restore: Vec<String>,
    /// For `wait_for`: the subscription, made when the unit was dispatched, before any sibling step could
    /// publish what it waits for (or why it could not be made).
    pub subscription: parking_lot::Mutex<Option<Result<noa_bus::Subscription, String>>>,
}

/// Cancels a sub-workflow run if the unit that waits for it is dropped first (timeout, cancel, shutdown).
struct ChildGuard {
    engine: crate::engine::WorkflowEngine,
    id: Option<String>,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let engine = self.engine.clone();
            if *engine.inner().shutdown.borrow() {
                // The node is stopping: the child resumes with its parent at the next start.
                return;
            }
            tokio::spawn(async move {
                let _ = engine.cancel(&Principal::Node, &id).await;
            });
        }
    }
}

/// What a unit that succeeded leaves: its output and the VFS paths of the artifacts it kept.
pub(crate) type Outcome = (Output, Vec<String>);

impl UnitCtx {
    fn label(&self) -> String {
        match self.index {
            Some(i) => format!("{}.{i}", self.step.id),
            None => self.step.id.clone(),
        }
    }

    fn render(&self, t: &crate::expr::Template, what: &str) -> Result<String, String> {
        t.render(&self.scope).map_err(|e| format!("{what}: {e}"))
    }

    /// Keeps a large output in the VFS under the run's folder, a small one in the history.
    async fn output(&self, text: String) -> Result<Output, String> {
        if text.len() <= self.engine.opts.inline_output {
            return Ok(Output::Text(text));
        }
        let path = format!("/runs/{}/out/{}.txt", self.run_id, self.label());
        let vpath = VPath::parse(&path).map_err(|e| e.to_string())?;
        let size = text.len() as u64;
        self.engine
            .kernel
            .store()
            .fs_write(
                &format!("workflow:{}", self.run_id),
                &vpath,
                text.as_bytes(),
            )
            .await
            .map_err(|e| format!("cannot keep the output in {path}: {e}"))?;
        Ok(Output::File { path, size })
    }

    async fn keep_log(&self, log: &[u8]) {
        if log.is_empty() {
            return;
        }
        let path = format!(
            "/runs/{}/logs/{}.{}.log",
            self.run_id,
            self.label(),
            self.attempt
        );
        if let Ok(vpath) = VPath::parse(&path)
            && let Err(e) = self
                .engine
                .kernel
                .store()
                .fs_write(&format!("workflow:{}", self.run_id), &vpath, log)
                .await
        {
            tracing::warn!(error = %e, path, "Could not keep a step's log.");
        }
    }
}

/// Runs one unit to its end.
pub(crate) async fn execute(ctx: UnitCtx) -> Result<Outcome, String> {
    match ctx.step.kind.clone() {
        StepKind::Run { command } => run(&ctx, &command).await,
        other => execute_kind(&ctx, other).await.map(|o| (o, Vec::new())),
    }
}

async fn execute_kind(ctx: &UnitCtx, kind: StepKind) -> Result<Output, String> {
    match kind {
        StepKind::Run { .. } => Err("a run step has no other way to run".to_owned()),
        StepKind::Llm {
            model,
            prompt,
            system,
            max_tokens,
            temperature,
            seed,
        } => {
            let mut req = json!({ "prompt": ctx.render(&prompt, "llm.prompt")? });
            if let Some(m) = model {
                req["model"] = json!(ctx.render(&m, "llm.model")?);
            }
            if let Some(s) = system {
                req["system"] = json!(ctx.render(&s, "llm.system")?);
            }
            if let Some(m) = max_tokens {
                req["max_tokens"] = json!(m);
            }
            if let Some(t) = temperature {
                req["temperature"] = json!(t);
            }
            if let Some(s) = seed {
                req["seed"] = json!(s);
            }
            let timeout = ctx.step.timeout.unwrap_or(Duration::from_secs(600));
            let reply = ctx
                .engine
                .kernel
                .request(
                    &ctx.principal,
                    "ai.infer",
                    Bytes::from(req.to_string()),
                    None,
                    timeout,
                )
                .await
                .map_err(|e| format!("the model did not answer: {e}"))?;
            let v: Value = serde_json::from_slice(&reply.payload)
                .map_err(|e| format!("the model's answer is not JSON: {e}"))?;
            if let Some(e) = v.get("error").and_then(Value::as_str) {
                return Err(format!("the model failed: {e}"));
            }
            ctx.output(v["text"].as_str().unwrap_or_default().to_owned())
                .await
        }
        StepKind::Http {
            method,
            url,
            headers,
            body,
        } => {
            let url = ctx.render(&url, "http.url")?;
            let headers = headers
                .iter()
                .map(|(k, t)| Ok((k.clone(), ctx.render(t, "http.headers")?)))
                .collect::<Result<Vec<_>, String>>()?;
            let body = match body {
                Some(b) => Some(
                    match b
                        .render(&ctx.scope)
                        .map_err(|e| format!("http.body: {e}"))?
                    {
                        Value::String(s) => s,
                        other => other.to_string(),
                    },
                ),
                None => None,
            };
            let limit = ctx.engine.opts.output_limit;
            let timeout = ctx.step.timeout.unwrap_or(Duration::from_secs(60));
            let text = tokio::task::spawn_blocking(move || {
                http(&method, &url, &headers, body, limit, timeout)
            })
            .await
            .map_err(|e| format!("the HTTP request failed: {e}"))??;
            ctx.output(text).await
        }
        StepKind::WaitFor { subject, timeout } => {
            let subject = ctx.render(&subject, "wait_for")?;
            let mut sub = match ctx.subscription.lock().take() {
                Some(made) => made?,
                None => ctx
                    .engine
                    .kernel
                    .subscribe(&ctx.principal, &subject, 16)
                    .map_err(|e| e.to_string())?,
            };
            let wait = async {
                sub.recv()
                    .await
                    .ok_or_else(|| "the bus closed while waiting".to_owned())
            };
            let msg = match timeout {
                Some(t) => tokio::time::timeout(t, wait).await.map_err(|_| {
                    format!(
                        "no message on {subject} within {}",
                        crate::engine::show_duration(t)
                    )
                })??,
                None => wait.await?,
            };
            ctx.output(String::from_utf8_lossy(&msg.payload).into_owned())
                .await
        }
        StepKind::Publish { subject, payload } => {
            let subject = ctx.render(&subject, "publish.subject")?;
            let payload = payload
                .render(&ctx.scope)
                .map_err(|e| format!("publish.payload: {e}"))?;
            let bytes = match &payload {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                v => v.to_string(),
            };
            let n = ctx
                .engine
                .kernel
                .publish(&ctx.principal, &subject, Bytes::from(bytes), None)
                .map_err(|e| e.to_string())?;
            Ok(Output::Text(n.to_string()))
        }
        StepKind::Workflow { def, inputs, .. } => {
            let mut given = std::collections::BTreeMap::new();
            for (k, v) in &inputs {
                given.insert(
                    k.clone(),
                    v.render(&ctx.scope)
                        .map_err(|e| format!("workflow.inputs.{k}: {e}"))?,
                );
            }
            // The child's id follows from the step's position, the item and the attempt, so a resumed parent
            // finds the child it started (and no two units can share one).
            let child_id = format!(
                "{}-s{}-i{}-a{}",
                ctx.run_id,
                ctx.step_pos,
                ctx.index.unwrap_or(0),
                ctx.attempt
            );
            let engine = crate::engine::WorkflowEngine::from_inner(ctx.engine.clone());
            engine
                .start_child(
                    &ctx.principal,
                    (*def).clone(),
                    given,
                    &child_id,
                    &ctx.run_id,
                )
                .await
                .map_err(|e| e.to_string())?;
            let mut guard = ChildGuard {
                engine: engine.clone(),
                id: Some(child_id.clone()),
            };
            let view = engine.wait(&child_id).await.map_err(|e| e.to_string())?;
            guard.id = None;
            if view.status == "succeeded" {
                Ok(Output::Text(view.outputs.to_string()))
            } else {
                Err(format!(
                    "sub-workflow run {child_id} {}: {}",
                    view.status,
                    view.error.unwrap_or_default()
                ))
            }
        }
        // Sleeps and approvals are timers and gates kept by the executor, not units that run.
        StepKind::Sleep { .. } | StepKind::Approval { .. } => Ok(Output::Text(String::new())),
    }
}

/// Puts the artifacts of earlier steps back into the run's working folder when it lost them (a retry after
/// the run had ended, or another node).
async fn restore_artifacts(ctx: &UnitCtx, cwd: &std::path::Path) -> Result<(), String> {
    let prefix = format!("/runs/{}/artifacts/", ctx.run_id);
    for path in &ctx.restore {
        let Some(rel) = path.strip_prefix(&prefix) else {
            continue;
        };
        let local = cwd.join("artifacts").join(rel);
        if local.exists() {
            continue;
        }
        let store = ctx.engine.kernel.store().clone();
        let vpath = VPath::parse(path).map_err(|e| e.to_string())?;
        let data = tokio::task::spawn_blocking(move || store.fs_open(&vpath, None)?.read_all())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot read the artifact {path}: {e}"))?;
        if let Some(parent) = local.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        std::fs::write(&local, data)
            .map_err(|e| format!("cannot restore {}: {e}", local.display()))?;
    }
    Ok(())
}

/// Keeps every regular file under `dir` in the VFS under `/runs/<run>/artifacts/<unit>/`, in one transaction.
async fn keep_artifacts(ctx: &UnitCtx, dir: &std::path::Path) -> Result<Vec<String>, String> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            // Symlinks are not followed: an artifact is what the step wrote, nothing it points at.
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.is_file() {
                files.push(e.path());
            }
        }
    }
    if files.is_empty() {
        return Ok(Vec::new());
    }
    files.sort();
    let base = format!("/runs/{}/artifacts/{}", ctx.run_id, ctx.label());
    let store = ctx.engine.kernel.store().clone();
    let dir = dir.to_owned();
    let limit = ctx.engine.opts.output_limit as u64;
    let (ops, paths) = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let mut ops = Vec::new();
        let mut paths = Vec::new();
        for f in files {
            let rel = f
                .strip_prefix(&dir)
                .unwrap_or(&f)
                .to_string_lossy()
                .into_owned();
            let path = format!("{base}/{rel}");
            VPath::parse(&path).map_err(|e| format!("artifact {rel}: {e}"))?;
            let mut file = std::fs::File::open(&f).map_err(|e| format!("artifact {rel}: {e}"))?;
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            if size > limit {
                return Err(format!(
                    "artifact {rel} has {} bytes, more than workflow.max_output ({limit})",
                    size
                ));
            }
            let mut w = store.blob_writer().map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = std::io::Read::read(&mut file, &mut buf)
                    .map_err(|e| format!("artifact {rel}: {e}"))?;
                if n == 0 {
                    break;
                }
                w.write(&buf[..n]).map_err(|e| e.to_string())?;
            }
            let blob = w.finish().map_err(|e| e.to_string())?;
            ops.push(noa_store::FsOp::Put {
                path: path.clone(),
                blob,
            });
            paths.push(path);
        }
        Ok((ops, paths))
    })
    .await
    .map_err(|e| e.to_string())??;
    ctx.engine
        .kernel
        .store()
        .fs_commit(&format!("workflow:{}", ctx.run_id), ops)
        .await
        .map_err(|e| format!("cannot keep the artifacts: {e}"))?;
    Ok(paths)
}

async fn run(ctx: &UnitCtx, command: &crate::expr::Template) -> Result<Outcome, String> {
    let script = ctx.render(command, "run")?;
    let cwd = ctx.engine.opts.work_dir.join(&ctx.run_id);
    std::fs::create_dir_all(&cwd)
        .map_err(|e| format!("cannot create the working folder {}: {e}", cwd.display()))?;
    restore_artifacts(ctx, &cwd).await?;
    // An attempt starts with an empty artifacts folder of its own (an interrupted one may have left files).
    let artifacts = cwd.join("artifacts").join(ctx.label());
    let _ = std::fs::remove_dir_all(&artifacts);
    std::fs::create_dir_all(&artifacts)
        .map_err(|e| format!("cannot create {}: {e}", artifacts.display()))?;
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
        ("HOME".into(), cwd.display().to_string()),
        ("LANG".into(), "C.UTF-8".into()),
        ("NOA_RUN_ID".into(), ctx.run_id.clone()),
        ("NOA_STEP_ID".into(), ctx.step.id.clone()),
        ("NOA_ATTEMPT".into(), ctx.attempt.to_string()),
        ("NOA_ATTEMPT_KEY".into(), ctx.key.clone()),
        ("NOA_ARTIFACTS".into(), artifacts.display().to_string()),
    ];
    if let Some(item) = ctx.scope.vars.get("item") {
        env.push(("NOA_ITEM".into(), to_text(item)));
    }
    if let Some(i) = ctx.scope.vars.get("iteration") {
        env.push(("NOA_ITERATION".into(), to_text(i)));
    }
    if let Some(Value::Object(vars)) = ctx.scope.vars.get("env") {
        for (k, v) in vars {
            env.push((k.clone(), to_text(v)));
        }
    }
    let spec = noa_sandbox::command::CommandSpec {
        script,
        env,
        cwd,
        limits: noa_sandbox::ChildLimits {
            open_files: Some(4096),
            ..Default::default()
        },
        output_limit: ctx.engine.opts.output_limit,
        log_limit: ctx.engine.opts.log_limit,
    };
    match noa_sandbox::command::run(spec).await {
        Ok(out) => {
            ctx.keep_log(&out.stderr).await;
            match out.exit {
                noa_sandbox::command::Exit::Code(0) => {
                    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                    if text.ends_with('\n') {
                        text.pop();
                    }
                    let kept = keep_artifacts(ctx, &artifacts).await?;
                    Ok((ctx.output(text).await?, kept))
                }
                exit => {
                    let how = match exit {
                        noa_sandbox::command::Exit::Code(127) => {
                            "exited with 127 (command not found)".to_owned()
                        }
                        noa_sandbox::command::Exit::Code(c) => format!("exited with {c}"),
                        noa_sandbox::command::Exit::Signal(_, name) => {
                            format!("was killed by {name}")
                        }
                    };
                    let tail = String::from_utf8_lossy(&out.stderr);
                    let tail = tail.trim_end();
                    let last = tail.lines().last().unwrap_or("");
                    Err(if last.is_empty() {
                        format!("the command {how}")
                    } else {
                        format!("the command {how}: {last}")
                    })
                }
            }
        }
        Err(noa_sandbox::command::CommandError::OutputTooLarge { limit, stderr }) => {
            ctx.keep_log(&stderr).await;
            Err(format!(
                "the command printed more than {} to stdout and was stopped (workflow.max_output)",
                crate::engine::show_bytes(limit as u64)
            ))
        }
        Err(e) => Err(e.to_string()),
    }
}

fn http(
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: Option<String>,
    limit: usize,
    timeout: Duration,
) -> Result<String, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into();
    let uri: ureq::http::Uri = url.parse().map_err(|e| format!("bad url {url:?}: {e}"))?;
    let mut req = ureq::http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req
        .body(body.unwrap_or_default())
        .map_err(|e| format!("bad request: {e}"))?;
    let resp = agent
        .run(req)
        .map_err(|e| format!("{method} {url} failed: {e}"))?;
    let status = resp.status().as_u16();
    let text = resp
        .into_body()
        .with_config()
        .limit(limit as u64)
        .read_to_string()
        .map_err(|e| format!("reading the response of {url} failed: {e}"))?;
    if status >= 400 {
        let shown: String = text.chars().take(200).collect();
        return Err(format!("{method} {url} answered HTTP {status}: {shown}"));
    }
    Ok(text)
}
