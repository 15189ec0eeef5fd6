//! REST handlers of workflows: validate, start, list and show runs, their histories and logs, and the controls
//! (cancel, pause, resume, retry, approve), and registrations for triggers.
//!
//! A workflow is sent as its text (`source`), the name it is known by (`file`) and the texts of the
//! sub-workflow files it names (`includes`), so the server needs no access to the client's files.

use crate::{ApiError, ApiResult, AppState};
use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use noa_policy::Principal;
use noa_store::RunQuery;
use noa_workflow::{Error as WfError, Workflow, WorkflowEngine, def};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;

impl From<WfError> for ApiError {
    fn from(e: WfError) -> Self {
        let status = match &e {
            WfError::Kernel(_) => {
                let WfError::Kernel(k) = e else {
                    return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
                };
                return ApiError::from(k);
            }
            WfError::Invalid(_) | WfError::Inputs(_) => StatusCode::UNPROCESSABLE_ENTITY,
            WfError::NoRun(_) | WfError::NotRegistered(_) | WfError::NoStep { .. } => {
                StatusCode::NOT_FOUND
            }
            WfError::Conflict(_) => StatusCode::CONFLICT,
            WfError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            WfError::Store(_) | WfError::Corrupt { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "A workflow operation failed inside the node.");
        }
        ApiError::new(status, e.to_string())
    }
}

fn engine(state: &AppState) -> Result<&WorkflowEngine, ApiError> {
    state.workflows.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "NOA-E0905 this node runs no workflow engine",
        )
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowBody {
    /// The name the file is known by, for messages (e.g. `examples/workflows/triage.yaml`).
    #[serde(default = "default_file")]
    file: String,
    source: String,
    #[serde(default)]
    includes: BTreeMap<String, String>,
    #[serde(default)]
    inputs: BTreeMap<String, Value>,
}

fn default_file() -> String {
    "workflow.yaml".into()
}

fn body<T: serde::de::DeserializeOwned>(bytes: &[u8], shape: &str) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("NOA-E0908 the body must be {shape}: {e}")))
}

const WORKFLOW_SHAPE: &str = "{\"file\": \"name.yaml\", \"source\": \"<yaml>\", \"includes\": {\"sub.yaml\": \"<yaml>\"}, \"inputs\": {..}}";

/// The diagnostics as data, for clients that show them their own way.
fn diagnostics(e: &WfError) -> Value {
    match e {
        WfError::Invalid(d) => Value::Array(
            d.iter()
                .map(|d| json!({ "file": d.file, "line": d.pos.line, "column": d.pos.col, "message": d.message, "hint": d.hint }))
                .collect(),
        ),
        _ => Value::Array(Vec::new()),
    }
}

fn parse(b: &WorkflowBody) -> Result<Workflow, WfError> {
    def::parse(&b.file, &b.source, &def::BundleLoader(&b.includes)).map_err(WfError::Invalid)
}

fn describe(w: &Workflow) -> Value {
    json!({
        "name": w.name,
        "description": w.description,
        "inputs": w.inputs.iter().map(|i| json!({ "name": i.name, "type": i.ty.name(), "default": i.default })).collect::<Vec<_>>(),
        "steps": w.steps.iter().map(|s| json!({ "id": s.id, "kind": s.kind.name(), "needs": s.needs })).collect::<Vec<_>>(),
        "triggers": { "cron": w.on.cron.iter().map(|c| c.0.clone()).collect::<Vec<_>>(), "subjects": w.on.subjects },
    })
}

pub async fn validate(bytes: axum::body::Bytes) -> Result<Json<Value>, (StatusCode, Json<Value>)> {
    let b: WorkflowBody = body(&bytes, WORKFLOW_SHAPE)
        .map_err(|e| (e.status, Json(json!({ "error": { "message": e.message } }))))?;
    match parse(&b) {
        Ok(w) => Ok(Json(json!({ "valid": true, "workflow": describe(&w) }))),
        Err(e) => Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(
                json!({ "valid": false, "error": { "message": e.to_string() }, "diagnostics": diagnostics(&e) }),
            ),
        )),
    }
}

pub async fn start(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    bytes: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let b: WorkflowBody = body(&bytes, WORKFLOW_SHAPE)?;
    let w = parse(&b)?;
    let name = w.name.clone();
    let id = engine(&state)?.start(&p, w, b.inputs, "manual").await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "workflow": name })),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    workflow: Option<String>,
    limit: Option<usize>,
}

pub async fn list(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let runs = engine(&state)?.list(
        &p,
        &RunQuery {
            status: q.status,
            workflow: q.workflow,
            unfinished: false,
            limit: Some(q.limit.unwrap_or(100).min(10_000)),
        },
    )?;
    Ok(Json(json!({ "runs": runs })))
}

pub async fn show(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!(engine(&state)?.show(&p, &id)?)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AfterQuery {
    after: Option<u64>,
}

pub async fn events(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    Query(q): Query<AfterQuery>,
) -> ApiResult<Json<Value>> {
    let events: Vec<Value> = engine(&state)?
        .history(&p, &id, q.after.unwrap_or(0))?
        .into_iter()
        .map(|e| {
            json!({ "seq": e.seq, "ts_ms": e.ts_ms, "kind": e.kind, "step": e.step,
                    "data": serde_json::from_str::<Value>(&e.data).unwrap_or(Value::Null) })
        })
        .collect();
    Ok(Json(json!({ "events": events })))
}

pub async fn logs(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path((id, step)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let (output, logs) = engine(&state)?.logs(&p, &id, &step)?;
    let logs: Vec<Value> = logs
        .into_iter()
        .map(|(name, text)| json!({ "name": name, "text": text }))
        .collect();
    Ok(Json(
        json!({ "run": id, "step": step, "output": output, "logs": logs }),
    ))
}

pub async fn control(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path((id, what)): Path<(String, String)>,
    bytes: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let e = engine(&state)?;
    match what.as_str() {
        "cancel" => e.cancel(&p, &id).await?,
        "pause" => e.pause(&p, &id).await?,
        "resume" => e.resume(&p, &id).await?,
        "retry" => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Retry {
                from: Option<String>,
            }
            let r: Retry = if bytes.is_empty() {
                Retry { from: None }
            } else {
                body(&bytes, "{\"from\": \"<step id>\"} or empty")?
            };
            let reset = e.retry(&p, &id, r.from.as_deref()).await?;
            return Ok(Json(json!({ "run": id, "retried": reset })));
        }
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "NOA-E0909 no run action {other:?}; the actions are cancel, pause, resume, retry"
                ),
            ));
        }
    }
    Ok(Json(json!({ "run": id, "done": what })))
}

pub async fn approve(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path((id, step)): Path<(String, String)>,
    bytes: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Approve {
        comment: Option<String>,
    }
    let a: Approve = if bytes.is_empty() {
        Approve { comment: None }
    } else {
        body(&bytes, "{\"comment\": \"<text>\"} or empty")?
    };
    engine(&state)?.approve(&p, &id, &step, a.comment).await?;
    Ok(Json(
        json!({ "run": id, "step": step, "approved_by": p.id() }),
    ))
}

pub async fn registered(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Value>> {
    Ok(Json(
        json!({ "registered": engine(&state)?.registered(&p)? }),
    ))
}

pub async fn register(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    bytes: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let b: WorkflowBody = body(&bytes, WORKFLOW_SHAPE)?;
    let w = parse(&b)?;
    let r = engine(&state)?.register(&p, &w).await?;
    Ok((StatusCode::CREATED, Json(json!(r))))
}

pub async fn unregister(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    engine(&state)?.unregister(&p, &name).await?;
    Ok(Json(json!({ "unregistered": name })))
}
