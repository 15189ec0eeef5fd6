//! REST handlers: status, processes, bus publish and request, journal events.

use crate::{ApiError, ApiResult, AppState};
use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use noa_bus::json_payload;
use noa_kernel::ProcessInfo;
use noa_policy::Principal;
use noa_store::EventQuery;
use noa_types::{Event, ProcessSpec};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::time::Duration;

pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the store answers and the kernel is not shutting down.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let store = state.kernel.store().schema_version();
    let shutting_down = *state.shutdown.borrow();
    match store {
        Ok(_) if !shutting_down => (StatusCode::OK, Json(json!({ "status": "ready" }))),
        Ok(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "shutting down" })),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "store unavailable", "error": e.to_string() })),
        ),
    }
}

pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NOA-E0602 no such endpoint; the API is described at /api/v1/openapi.json",
    )
}

pub async fn openapi_doc() -> Json<Value> {
    Json(crate::openapi())
}

pub async fn status(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Value>> {
    state.kernel.authorize(
        &p,
        noa_policy::Action::Read,
        &noa_policy::Resource::System,
        false,
    )?;
    let store = state.kernel.store();
    let schema = store.schema_version().map_err(noa_kernel::Error::from)?;
    Ok(Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_ms": state.started.elapsed().as_millis() as u64,
        "data_dir": state.opts.data_dir,
        "listen": &*state.listen,
        "kernel": state.kernel.status(),
        "store": { "path": store.path().display().to_string(), "schema_version": schema, "status": "ok" },
        "server": { "status": "ok", "requests": state.http.total() },
        "memory": { "rss_bytes": crate::metrics::rss_bytes() },
    })))
}

pub async fn list(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Vec<ProcessInfo>>> {
    Ok(Json(state.kernel.list(&p)?))
}

/// The body of `POST /api/v1/processes` is a process spec; serde names the field that is wrong.
pub async fn spawn(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<ProcessInfo>)> {
    let spec: ProcessSpec = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("NOA-E0100 invalid process spec: {e}")))?;
    let info = state.kernel.spawn(&p, spec).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

pub async fn get_process(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<ProcessInfo>> {
    Ok(Json(state.kernel.get(&p, &name)?))
}

pub async fn stop(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<ProcessInfo>> {
    Ok(Json(state.kernel.stop(&p, &name).await?))
}

pub async fn kill(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<ProcessInfo>> {
    Ok(Json(state.kernel.kill(&p, &name).await?))
}

pub async fn restart(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<ProcessInfo>> {
    Ok(Json(state.kernel.restart(&p, &name).await?))
}

/// A message as JSON: `subject`, optional `headers`, and the payload as `data`, `text` or `base64`.
fn message_json(msg: &noa_bus::Message) -> Value {
    let mut m = Map::new();
    m.insert("subject".into(), json!(msg.subject.as_str()));
    if let Some(h) = &msg.headers {
        m.insert("headers".into(), json!(**h));
    }
    json_payload::put_payload(&mut m, &msg.payload);
    Value::Object(m)
}

pub(crate) fn delivery_json(msg: &noa_bus::Message) -> Value {
    message_json(msg)
}

struct Outgoing {
    subject: String,
    payload: bytes::Bytes,
    headers: Option<noa_bus::Headers>,
    timeout_ms: u64,
}

fn outgoing(body: &[u8]) -> ApiResult<Outgoing> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("NOA-E0100 the body is not valid JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| {
        ApiError::bad_request("NOA-E0100 the body must be a JSON object with `subject`")
    })?;
    for key in obj.keys() {
        if !["subject", "data", "text", "base64", "headers", "timeout_ms"].contains(&key.as_str()) {
            return Err(ApiError::bad_request(format!(
                "NOA-E0100 unknown field `{key}`; expected subject, data, text, base64, headers, timeout_ms"
            )));
        }
    }
    let subject = obj
        .get("subject")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("NOA-E0100 field `subject` (a string) is required"))?;
    let payload = json_payload::take_payload(obj)
        .map_err(|e| ApiError::bad_request(format!("NOA-E0100 {e}")))?;
    let headers = match obj.get("headers") {
        None | Some(Value::Null) => None,
        Some(Value::Object(h)) => Some(
            h.iter()
                .map(|(k, v)| {
                    v.as_str()
                        .map(|v| (k.clone(), v.to_owned()))
                        .ok_or_else(|| {
                            ApiError::bad_request(format!(
                                "NOA-E0100 header `{k}` must be a string"
                            ))
                        })
                })
                .collect::<ApiResult<_>>()?,
        ),
        Some(_) => {
            return Err(ApiError::bad_request(
                "NOA-E0100 field `headers` must be an object of strings",
            ));
        }
    };
    let timeout_ms = match obj.get("timeout_ms") {
        None => 5_000,
        Some(v) => v
            .as_u64()
            .filter(|t| (1..=300_000).contains(t))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "NOA-E0100 field `timeout_ms` must be a number from 1 to 300000",
                )
            })?,
    };
    Ok(Outgoing {
        subject: subject.to_owned(),
        payload,
        headers,
        timeout_ms,
    })
}

pub async fn publish(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let o = outgoing(&body)?;
    let n = state.kernel.publish(&p, &o.subject, o.payload, o.headers)?;
    Ok(Json(json!({ "delivered": n })))
}

pub async fn request(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: axum::body::Bytes,
) -> ApiResult<impl IntoResponse> {
    let o = outgoing(&body)?;
    let reply = state
        .kernel
        .request(
            &p,
            &o.subject,
            o.payload,
            o.headers,
            Duration::from_millis(o.timeout_ms),
        )
        .await?;
    Ok(Json(message_json(&reply)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventParams {
    after: Option<u64>,
    name: Option<String>,
    pid: Option<u64>,
    limit: Option<u32>,
}

pub async fn events(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Query(q): Query<EventParams>,
) -> ApiResult<Json<Vec<Event>>> {
    let query = EventQuery {
        after: q.after,
        name: q.name,
        pid: q.pid.map(noa_types::Pid),
        limit: q.limit,
    };
    Ok(Json(state.kernel.events(&p, &query)?))
}
