//! Long-lived responses: bus subscriptions as Server-Sent Events and WebSocket, and followed process logs.
//! Every stream ends when the client goes away (its subscription is dropped) or when the node shuts down.

use crate::api::delivery_json;
use crate::{ApiError, ApiResult, AppState};
use axum::Json;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, Path, Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use noa_bus::Subscription;
use noa_kernel::LogLine;
use noa_policy::Principal;
use serde::Deserialize;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::watch;

/// Buffer of a streaming subscription; a client slower than this loses messages (counted as drops).
const STREAM_BUFFER: usize = 4096;

#[derive(Debug, Deserialize)]
pub struct StreamParams {
    /// The subject pattern to follow (default `sys.events.>`).
    subject: Option<String>,
    #[allow(dead_code)]
    access_token: Option<String>,
}

async fn next_or_shutdown(
    sub: &mut Subscription,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<noa_bus::Message> {
    if *shutdown.borrow() {
        return None;
    }
    tokio::select! {
        m = sub.recv() => m,
        _ = shutdown.changed() => None,
    }
}

fn sse_stream(
    sub: Subscription,
    shutdown: watch::Receiver<bool>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold((sub, shutdown), |(mut sub, mut shutdown)| async move {
        let msg = next_or_shutdown(&mut sub, &mut shutdown).await?;
        let event = SseEvent::default()
            .event("message")
            .data(delivery_json(&msg).to_string());
        Some((Ok(event), (sub, shutdown)))
    })
}

/// `GET /api/v1/events/stream?subject=…`: a bus subscription as Server-Sent Events.
pub async fn sse(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Query(q): Query<StreamParams>,
) -> ApiResult<Response> {
    let subject = q.subject.unwrap_or_else(|| "sys.events.>".into());
    let sub = state.kernel.subscribe(&p, &subject, STREAM_BUFFER)?;
    Ok(Sse::new(sse_stream(sub, state.shutdown.clone()))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// `GET /api/v1/events/ws?subject=…`: a bus subscription over WebSocket, one JSON text frame per message.
pub async fn ws(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Query(q): Query<StreamParams>,
    upgrade: WebSocketUpgrade,
) -> ApiResult<Response> {
    let subject = q.subject.unwrap_or_else(|| "sys.events.>".into());
    let sub = state.kernel.subscribe(&p, &subject, STREAM_BUFFER)?;
    let shutdown = state.shutdown.clone();
    Ok(upgrade.on_upgrade(move |socket| pump_ws(socket, sub, shutdown)))
}

async fn pump_ws(
    mut socket: WebSocket,
    mut sub: Subscription,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            msg = next_or_shutdown(&mut sub, &mut shutdown) => {
                let Some(msg) = msg else { break };
                // A client that stops reading is dropped rather than allowed to pin this task.
                let send = socket.send(WsMessage::Text(delivery_json(&msg).to_string().into()));
                if !matches!(tokio::time::timeout(Duration::from_secs(10), send).await, Ok(Ok(()))) {
                    return;
                }
            }
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(WsMessage::Close(_))) => return,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = socket.send(WsMessage::Close(None)).await;
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogParams {
    tail: Option<usize>,
    follow: Option<bool>,
    #[allow(dead_code)]
    access_token: Option<String>,
}

/// `GET /api/v1/processes/{name}/logs?tail=N&follow=true`: the last lines as JSON, or with `follow` as SSE
/// (the last lines first, then new ones as they are written).
pub async fn logs(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    Query(q): Query<LogParams>,
) -> ApiResult<Response> {
    let tail = q.tail.unwrap_or(100).min(100_000);
    if !q.follow.unwrap_or(false) {
        return Ok(Json(state.kernel.logs(&p, &name, tail)?).into_response());
    }
    // Subscribe before reading the file so no line falls between the two; skip lines seen in both.
    let subject = format!("sys.logs.{name}");
    noa_types::validate_name(&name).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let sub = state.kernel.subscribe(&p, &subject, STREAM_BUFFER)?;
    let past = state.kernel.logs(&p, &name, tail)?;
    let last_ts = past.last().map(|l| l.ts_ms).unwrap_or(0);
    let seen: Vec<LogLine> = past
        .iter()
        .filter(|l| l.ts_ms == last_ts)
        .cloned()
        .collect();
    let head = stream::iter(past.into_iter().map(|l| {
        Ok(SseEvent::default()
            .event("log")
            .data(serde_json::to_string(&l).unwrap_or_default()))
    }));
    let live = stream::unfold(
        (sub, state.shutdown.clone()),
        move |(mut sub, mut shutdown)| {
            let seen = seen.clone();
            async move {
                loop {
                    let msg = next_or_shutdown(&mut sub, &mut shutdown).await?;
                    let Ok(line) = serde_json::from_slice::<LogLine>(&msg.payload) else {
                        continue;
                    };
                    if line.ts_ms < last_ts || (line.ts_ms == last_ts && seen.contains(&line)) {
                        continue;
                    }
                    let ev = SseEvent::default()
                        .event("log")
                        .data(String::from_utf8_lossy(&msg.payload));
                    return Some((Ok::<_, Infallible>(ev), (sub, shutdown)));
                }
            }
        },
    );
    use futures_util::StreamExt;
    Ok(Sse::new(head.chain(live))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
