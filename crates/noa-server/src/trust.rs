//! REST handlers of secrets, the audit log, backups and the effective configuration.

use crate::{ApiError, ApiResult, AppState};
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use noa_policy::{Action, Principal, Resource};
use noa_store::{AuditQuery, AuditRecord};
use serde::Deserialize;
use serde_json::{Value, json};

pub async fn secrets(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Value>> {
    state
        .kernel
        .authorize(&p, Action::Read, &Resource::System, false)?;
    Ok(Json(json!({ "secrets": state.kernel.store().secrets()? })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretBody {
    value: String,
}

pub async fn set_secret(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: Result<Json<SecretBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Json<Value>> {
    // The rejection text could quote the body, which holds the value: keep it out of the answer.
    let Json(body) = body.map_err(|_| {
        ApiError::bad_request("NOA-E0604 the body must be {\"value\": \"<the secret>\"}")
    })?;
    state.kernel.authorize(
        &p,
        Action::WriteSecret,
        &Resource::Secret(name.clone()),
        false,
    )?;
    state
        .kernel
        .store()
        .secret_set(&p.id(), &name, body.value.as_bytes())
        .await?;
    Ok(Json(json!({ "name": name, "set": true })))
}

pub async fn delete_secret(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    state.kernel.authorize(
        &p,
        Action::WriteSecret,
        &Resource::Secret(name.clone()),
        false,
    )?;
    state.kernel.store().secret_delete(&p.id(), &name).await?;
    Ok(Json(json!({ "name": name, "deleted": true })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    after: Option<u64>,
    limit: Option<u32>,
    principal: Option<String>,
    action: Option<String>,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
}

pub async fn audit(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Query(q): Query<AuditParams>,
) -> ApiResult<Json<Value>> {
    state
        .kernel
        .authorize(&p, Action::ReadAudit, &Resource::System, false)?;
    let records = state.kernel.store().audit_query(&AuditQuery {
        after: q.after,
        principal: q.principal,
        action: q.action,
        since_ms: q.since_ms,
        until_ms: q.until_ms,
        limit: q.limit,
    })?;
    Ok(Json(json!({ "records": records })))
}

pub async fn audit_verify(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Value>> {
    state
        .kernel
        .authorize(&p, Action::ReadAudit, &Resource::System, false)?;
    let store = state.kernel.store().clone();
    let report = tokio::task::spawn_blocking(move || store.audit_verify())
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(json!(report)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupParams {
    #[serde(default)]
    include_keys: bool,
}

/// Writes into the response body from a blocking thread.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 256 << 10 {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client left"))
    }
}

/// `GET /api/v1/backup`: a consistent archive of the running store, streamed as it is made.
pub async fn backup(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Query(q): Query<BackupParams>,
) -> ApiResult<Response> {
    state
        .kernel
        .authorize(&p, Action::Backup, &Resource::System, false)?;
    let store = state.kernel.store().clone();
    let estimate = store.backup_estimate();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let who = p.id();
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::new(),
        };
        let result = store.backup_to(
            &mut w,
            std::path::Path::new("<download>"),
            q.include_keys,
            &mut |_, _| {},
        );
        let result = result.and_then(|m| {
            use std::io::Write;
            w.flush().map_err(noa_store::Error::BlobIo)?;
            Ok(m)
        });
        let record = match &result {
            Ok(m) => AuditRecord::new(
                who,
                "backup.create",
                "system",
                "ok",
                json!({ "entries": m.entries.len(), "bytes": m.total_bytes(), "include_keys": m.includes_keys }),
            ),
            Err(e) => AuditRecord::new(
                who,
                "backup.create",
                "system",
                "failed",
                json!({ "error": e.to_string() }),
            ),
        };
        store.audit(record);
        if let Err(e) = result {
            tracing::warn!(error = %e, "A backup download failed.");
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let mut res = Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-tar"),
    );
    h.insert("x-noa-backup-estimate", estimate.into());
    Ok(res)
}

pub async fn config(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Value>> {
    state
        .kernel
        .authorize(&p, Action::Read, &Resource::System, false)?;
    Ok(Json(json!({ "settings": state.opts.config })))
}
