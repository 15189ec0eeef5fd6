//! REST handlers of the VFS (`/api/v1/fs/...`), its transactions and host mounts. Bodies stream both ways.

use crate::{ApiError, ApiResult, AppState};
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures_util::StreamExt;
use noa_policy::{Action, Principal, Resource};
use noa_store::{FsOp, Namespace, Store, VPath};
use serde::Deserialize;
use serde_json::{Value, json};

fn vpath(raw: Option<&str>) -> ApiResult<VPath> {
    let p = format!("/{}", raw.unwrap_or_default());
    Ok(VPath::parse(&p)?)
}

fn check(state: &AppState, p: &Principal, action: Action, path: &VPath) -> ApiResult<()> {
    state
        .kernel
        .authorize(p, action, &Resource::File(path.to_string()), false)?;
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadQuery {
    #[serde(default)]
    list: Option<String>,
    #[serde(default)]
    history: Option<String>,
    #[serde(default)]
    version: Option<u64>,
}

pub async fn get_root(
    state: State<AppState>,
    p: Extension<Principal>,
    q: Query<ReadQuery>,
) -> ApiResult<Response> {
    read_inner(state, p, None, q).await
}

pub async fn get(
    state: State<AppState>,
    p: Extension<Principal>,
    Path(path): Path<String>,
    q: Query<ReadQuery>,
) -> ApiResult<Response> {
    read_inner(state, p, Some(path), q).await
}

/// Sends chunks produced on a blocking thread as a streamed body.
fn stream_body(
    produce: impl FnOnce(&dyn Fn(Vec<u8>) -> Result<(), ()>) -> Result<(), String> + Send + 'static,
) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    tokio::task::spawn_blocking(move || {
        let send = |chunk: Vec<u8>| tx.blocking_send(Ok(Bytes::from(chunk))).map_err(|_| ());
        if let Err(e) = produce(&send) {
            tracing::warn!(error = %e, "A streamed file read failed midway.");
            let _ = tx.blocking_send(Err(std::io::Error::other(e)));
        }
    });
    Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
}

async fn read_inner(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    raw: Option<String>,
    Query(q): Query<ReadQuery>,
) -> ApiResult<Response> {
    let path = vpath(raw.as_deref())?;
    check(&state, &p, Action::ReadFile, &path)?;
    let store = state.kernel.store().clone();
    let is_folder = matches!(path.namespace(), Namespace::Root)
        || matches!(path.namespace(), Namespace::Stored(ns) if ns == path.as_str())
        || matches!(path.namespace(), Namespace::Host { rest, .. } if rest.is_empty());
    if q.list.is_some() || is_folder {
        let entries = store.fs_list(&path)?;
        return Ok(Json(json!({ "path": path.to_string(), "entries": entries })).into_response());
    }
    if q.history.is_some() {
        return Ok(
            Json(json!({ "path": path.to_string(), "versions": store.fs_history(&path)? }))
                .into_response(),
        );
    }
    if let Namespace::Host { .. } = path.namespace() {
        let entry = store.host_entry(&path, false)?;
        if entry.is_dir() {
            let entries = entry.list()?;
            return Ok(
                Json(json!({ "path": path.to_string(), "entries": entries })).into_response(),
            );
        }
        let (file, size) = entry.open_read()?;
        let body = stream_body(move |send| {
            use std::io::Read;
            let mut file = file;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = file.read(&mut buf).map_err(|e| e.to_string())?;
                if n == 0 || send(buf[..n].to_vec()).is_err() {
                    return Ok(());
                }
            }
        });
        let mut res = Response::new(body);
        res.headers_mut()
            .insert(header::CONTENT_LENGTH, size.into());
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        return Ok(res);
    }
    let reader = match store.fs_open(&path, q.version) {
        Err(noa_store::Error::NotFound { .. }) if q.version.is_none() => {
            // A folder made of deeper paths lists; a path that is neither file nor folder is missing.
            let entries = store.fs_list(&path)?;
            if entries.is_empty() {
                return Err(noa_store::Error::NotFound {
                    path: path.to_string(),
                }
                .into());
            }
            return Ok(
                Json(json!({ "path": path.to_string(), "entries": entries })).into_response(),
            );
        }
        other => other?,
    };
    let info = reader.info.clone();
    let body = stream_body(move |send| reader.for_each_chunk(send).map_err(|e| e.to_string()));
    let mut res = Response::new(body);
    let h = res.headers_mut();
    h.insert(header::CONTENT_LENGTH, info.size.into());
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert("x-noa-version", info.version.into());
    Ok(res)
}

/// Feeds a request body, chunk by chunk, to `consume` on a blocking thread. A body larger than `room` (what
/// the quota leaves), or one that breaks off, is an error, and `consume` is told (its flag is set) so that it
/// abandons what it wrote instead of keeping it.
async fn pump_body<T: Send + 'static>(
    body: Body,
    path: &VPath,
    room: Option<u64>,
    consume: impl FnOnce(
        tokio::sync::mpsc::Receiver<Bytes>,
        &std::sync::atomic::AtomicBool,
    ) -> Result<T, noa_store::Error>
    + Send
    + 'static,
) -> ApiResult<T> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let abandoned = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = abandoned.clone();
    let worker = tokio::task::spawn_blocking(move || consume(rx, &flag));
    let mut stream = body.into_data_stream();
    let mut received = 0u64;
    let mut failure = None;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                failure = Some(ApiError::bad_request(format!(
                    "NOA-E0603 the request body broke off: {e}"
                )));
                break;
            }
        };
        received += chunk.len() as u64;
        if let Some(room) = room
            && received > room
        {
            failure = Some(ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                format!(
                    "NOA-E0311 quota exceeded: {path} may bring at most {room} more bytes within its namespace's quota; delete files or raise fs.quota_* in noa.toml"
                ),
            ));
            break;
        }
        if tx.send(chunk).await.is_err() {
            break;
        }
    }
    if failure.is_some() {
        abandoned.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    drop(tx);
    let result = worker
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match failure {
        Some(f) => Err(f),
        None => Ok(result?),
    }
}

/// Streams a request body into a staged blob (stored paths); an abandoned one is dropped unfinished, which
/// removes its staging file.
async fn stage_body(
    store: &Store,
    path: &VPath,
    room: Option<u64>,
    body: Body,
) -> ApiResult<noa_store::StagedBlob> {
    let store = store.clone();
    let staged = pump_body(body, path, room, move |mut rx, abandoned| {
        let mut w = store.blob_writer()?;
        while let Some(chunk) = rx.blocking_recv() {
            w.write(&chunk)?;
        }
        if abandoned.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(None);
        }
        w.finish().map(Some)
    })
    .await?;
    staged.ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the upload was abandoned",
        )
    })
}

/// Streams a request body into a host file: a temporary file beside it, put in place when complete (an
/// abandoned one is dropped, which removes it).
async fn write_host(store: &Store, p: &Principal, path: &VPath, body: Body) -> ApiResult<u64> {
    let mut w = store.host_create(path)?;
    let shown = path.to_string();
    let w = pump_body(body, path, None, move |mut rx, _| {
        use std::io::Write;
        while let Some(chunk) = rx.blocking_recv() {
            w.file()
                .write_all(&chunk)
                .map_err(|e| noa_store::Error::Host {
                    path: shown.clone(),
                    message: e.to_string(),
                })?;
        }
        Ok(w)
    })
    .await?;
    Ok(store.host_commit(&p.id(), w).await?)
}

/// Reads and drops up to 64 MiB of a body that will not be used, so that a client still sending it gets the
/// error response instead of a broken connection.
async fn drain(body: Body) {
    let mut stream = body.into_data_stream();
    let mut n = 0usize;
    while let Some(Ok(chunk)) = stream.next().await {
        n += chunk.len();
        if n > 64 << 20 {
            break;
        }
    }
}

pub async fn put(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(raw): Path<String>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let store = state.kernel.store();
    // Everything that can be refused is checked before the body is read.
    let checked = vpath(Some(&raw)).and_then(|path| {
        check(&state, &p, Action::WriteFile, &path)?;
        match path.namespace() {
            Namespace::Host { .. } => {
                store.host_writable(&path)?;
            }
            _ => {
                path.stored_file()?;
            }
        }
        Ok(path)
    });
    let path = match checked {
        Ok(path) => path,
        Err(e) => {
            drain(body).await;
            return Err(e);
        }
    };
    if let Namespace::Host { .. } = path.namespace() {
        let size = write_host(store, &p, &path, body).await?;
        return Ok(Json(json!({ "path": path.to_string(), "size": size })));
    }
    let file = path.stored_file()?.to_owned();
    let room = store.fs_room(&path)?;
    // A declared size over the quota is refused before a byte is read.
    if let (Some(room), Some(len)) = (
        room,
        headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok()),
    ) && len > room
    {
        drain(body).await;
        return Err(ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            format!(
                "NOA-E0311 quota exceeded: {path} is {len} bytes but may be at most {room} within its namespace's quota; delete files or raise fs.quota_* in noa.toml"
            ),
        ));
    }
    let blob = stage_body(store, &path, room, body).await?;
    let mut infos = store
        .fs_commit(&p.id(), vec![FsOp::Put { path: file, blob }])
        .await?;
    Ok(Json(json!(infos.remove(0))))
}

pub async fn delete(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(raw): Path<String>,
) -> ApiResult<Json<Value>> {
    let path = vpath(Some(&raw))?;
    check(&state, &p, Action::WriteFile, &path)?;
    let store = state.kernel.store();
    if let Namespace::Host { .. } = path.namespace() {
        let entry = store.host_entry(&path, true)?;
        let result = entry.remove();
        store
            .audit_durable(noa_store::AuditRecord::new(
                p.id(),
                "fs.delete",
                path.to_string(),
                if result.is_ok() { "ok" } else { "failed" },
                json!({ "host": true }),
            ))
            .await?;
        result?;
        return Ok(Json(json!({ "path": path.to_string(), "deleted": true })));
    }
    let file = path.stored_file()?.to_owned();
    let mut infos = store
        .fs_commit(&p.id(), vec![FsOp::Delete { path: file }])
        .await?;
    Ok(Json(json!(infos.remove(0))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostBody {
    rollback_to: u64,
}

/// `POST /api/v1/fs/{path}` with `{"rollback_to": N}`: a new version with the contents of version N.
pub async fn post(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(raw): Path<String>,
    body: Result<Json<PostBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(body) =
        body.map_err(|e| ApiError::bad_request(format!("NOA-E0604 {}", e.body_text())))?;
    let path = vpath(Some(&raw))?;
    check(&state, &p, Action::WriteFile, &path)?;
    let file = path.stored_file()?.to_owned();
    let mut infos = state
        .kernel
        .store()
        .fs_commit(
            &p.id(),
            vec![FsOp::Rollback {
                path: file,
                to: body.rollback_to,
            }],
        )
        .await?;
    Ok(Json(json!(infos.remove(0))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "op", rename_all = "snake_case")]
pub enum TxnOp {
    Put {
        path: String,
        #[serde(default)]
        content: Option<String>,
        #[serde(default)]
        content_base64: Option<String>,
    },
    Delete {
        path: String,
    },
    Rollback {
        path: String,
        to: u64,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Txn {
    ops: Vec<TxnOp>,
}

/// `POST /api/v1/fs-txn`: several changes that commit together or not at all.
pub async fn txn(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: Result<Json<Txn>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(txn) =
        body.map_err(|e| ApiError::bad_request(format!("NOA-E0604 {}", e.body_text())))?;
    if txn.ops.is_empty() {
        return Err(ApiError::bad_request(
            "NOA-E0604 ops: a transaction needs at least one operation",
        ));
    }
    let store = state.kernel.store().clone();
    let mut ops = Vec::with_capacity(txn.ops.len());
    for (i, op) in txn.ops.into_iter().enumerate() {
        let at = |e: noa_store::Error| ApiError::from(e).with_prefix(&format!("ops[{i}]: "));
        let raw = match &op {
            TxnOp::Put { path, .. } | TxnOp::Delete { path } | TxnOp::Rollback { path, .. } => {
                path.clone()
            }
        };
        let path = VPath::parse(&raw).map_err(at)?;
        check(&state, &p, Action::WriteFile, &path)?;
        let file = path.stored_file().map_err(at)?.to_owned();
        ops.push(match op {
            TxnOp::Put {
                content,
                content_base64,
                ..
            } => {
                let bytes = match (content, content_base64) {
                    (Some(t), None) => t.into_bytes(),
                    (None, Some(b)) => base64::engine::general_purpose::STANDARD
                        .decode(b.trim())
                        .map_err(|e| {
                        ApiError::bad_request(format!(
                            "NOA-E0604 ops[{i}].content_base64: not base64: {e}"
                        ))
                    })?,
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "NOA-E0604 ops[{i}]: give exactly one of content, content_base64"
                        )));
                    }
                };
                let s = store.clone();
                let blob = tokio::task::spawn_blocking(move || {
                    let mut w = s.blob_writer()?;
                    w.write(&bytes)?;
                    w.finish()
                })
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
                .map_err(at)?;
                FsOp::Put { path: file, blob }
            }
            TxnOp::Delete { .. } => FsOp::Delete { path: file },
            TxnOp::Rollback { to, .. } => FsOp::Rollback { path: file, to },
        });
    }
    let files = store.fs_commit(&p.id(), ops).await?;
    Ok(Json(json!({ "committed": files })))
}

pub async fn usage(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Value>> {
    state
        .kernel
        .authorize(&p, Action::Read, &Resource::System, false)?;
    let usage: Vec<Value> = state
        .kernel
        .store()
        .fs_usage()?
        .into_iter()
        .map(|(ns, bytes, limit)| json!({ "namespace": ns, "bytes": bytes, "limit": limit }))
        .collect();
    Ok(Json(json!({ "usage": usage })))
}

pub async fn mounts(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Value>> {
    state
        .kernel
        .authorize(&p, Action::ReadFile, &Resource::File("/host".into()), false)?;
    Ok(Json(json!({ "mounts": state.kernel.store().mounts()? })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountBody {
    name: String,
    host_path: String,
    #[serde(default)]
    read_only: bool,
}

pub async fn mount(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: Result<Json<MountBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(m) =
        body.map_err(|e| ApiError::bad_request(format!("NOA-E0604 {}", e.body_text())))?;
    state.kernel.authorize(
        &p,
        Action::Mount,
        &Resource::File(format!("/host/{}", m.name)),
        false,
    )?;
    let mounted = state
        .kernel
        .store()
        .mount(
            &p.id(),
            &m.name,
            std::path::Path::new(&m.host_path),
            m.read_only,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(json!(mounted))))
}

pub async fn unmount(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    state.kernel.authorize(
        &p,
        Action::Mount,
        &Resource::File(format!("/host/{name}")),
        false,
    )?;
    state.kernel.store().unmount(&p.id(), &name).await?;
    Ok(Json(json!({ "unmounted": name })))
}
