//! The one listener of NOA ARK OS: REST under `/api/v1`, event streams over SSE and WebSocket,
//! the OpenAPI document, Prometheus `/metrics`, and health checks.
//!
//! **Invariant:** this is the only crate that knows wire formats; everything below it speaks Rust types.
//! Every request except `/healthz` and `/readyz` needs the bearer token; it binds to loopback unless told otherwise.

mod api;
mod error;
mod files;
mod metrics;
mod openai;
mod openapi;
mod streams;
mod trust;
mod workflows;

pub use error::{ApiError, ApiResult};
pub use openapi::{ROUTES, openapi};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use noa_kernel::Kernel;
use noa_policy::Principal;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
    /// What `noa status` reports as the data directory.
    pub data_dir: String,
    /// The effective configuration, for `GET /api/v1/config`.
    pub config: Vec<ConfigEntry>,
}

/// One effective setting and where it came from.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConfigEntry {
    pub key: String,
    pub value: String,
    pub source: String,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            body_limit: 8 * 1024 * 1024,
            data_dir: String::new(),
            config: Vec::new(),
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub(crate) kernel: Kernel,
    pub(crate) admin_token: Arc<str>,
    pub(crate) opts: Arc<ServerOptions>,
    pub(crate) started: Instant,
    pub(crate) http: Arc<metrics::HttpMetrics>,
    /// Flips to true when the node shuts down, ending long-lived streams so that shutdown is not held up.
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) listen: Arc<str>,
    /// When a successful login was last audited (ms since the epoch).
    pub(crate) last_login_audit: Arc<std::sync::atomic::AtomicU64>,
    /// The inference engine, when the node runs one.
    pub(crate) engine: Option<noa_infer::Engine>,
    /// The workflow engine, when the node runs one.
    pub(crate) workflows: Option<noa_workflow::WorkflowEngine>,
}

impl AppState {
    /// Serves the OpenAI API and the model manager from `engine`.
    pub fn with_engine(mut self, engine: noa_infer::Engine) -> Self {
        self.engine = Some(engine);
        self
    }

    /// Serves `/api/v1/workflows` from `workflows`.
    pub fn with_workflows(mut self, workflows: noa_workflow::WorkflowEngine) -> Self {
        self.workflows = Some(workflows);
        self
    }

    pub fn new(
        kernel: Kernel,
        admin_token: &str,
        opts: ServerOptions,
        listen: SocketAddr,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        AppState {
            kernel,
            admin_token: Arc::from(admin_token),
            opts: Arc::new(opts),
            started: Instant::now(),
            http: Arc::new(metrics::HttpMetrics::default()),
            shutdown,
            listen: Arc::from(listen.to_string()),
            last_login_audit: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            engine: None,
            workflows: None,
        }
    }
}

/// Compares in constant time, so the token cannot be guessed byte by byte from response times.
fn token_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The principal a request acts as: the admin token is `User("admin")`.
async fn authenticate(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Browsers cannot set headers on EventSource or WebSocket: streams also take `?access_token=`.
    let query_token =
        if req.uri().path().starts_with("/api/v1/events/") || req.uri().path().ends_with("/logs") {
            req.uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("access_token=")))
                .map(str::to_owned)
        } else {
            None
        };
    let token = header.map(str::to_owned).or(query_token);
    match token {
        Some(t) if token_eq(t.trim().as_bytes(), state.admin_token.as_bytes()) => {
            let principal = Principal::User("admin".into());
            // Logins are audited, but not every request: at most once a minute per principal.
            let now = noa_types::now_ms();
            let last = state
                .last_login_audit
                .load(std::sync::atomic::Ordering::Relaxed);
            if now.saturating_sub(last) >= 60_000
                && state
                    .last_login_audit
                    .compare_exchange(
                        last,
                        now,
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                    )
                    .is_ok()
            {
                state.kernel.store().audit(noa_store::AuditRecord::new(
                    principal.id(),
                    "auth.login",
                    "api",
                    "ok",
                    serde_json::json!({ "method": "admin token" }),
                ));
            }
            req.extensions_mut().insert(principal);
            Ok(next.run(req).await)
        }
        Some(_) => {
            state.kernel.store().audit(noa_store::AuditRecord::new(
                "anonymous",
                "auth.login",
                "api",
                "failed",
                serde_json::json!({ "reason": "invalid token", "path": req.uri().path() }),
            ));
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "NOA-E0600 the bearer token is not valid; use the one in <data-dir>/admin.token",
            ))
        }
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "NOA-E0601 this endpoint needs `Authorization: Bearer <token>`; the admin token is in <data-dir>/admin.token",
        )),
    }
}

async fn count(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    state.http.record(res.status());
    res
}

/// The whole HTTP API.
pub fn router(state: AppState) -> Router {
    let limit = state.opts.body_limit;
    let authed = Router::new()
        .route("/api/v1/status", get(api::status))
        .route("/api/v1/processes", get(api::list).post(api::spawn))
        .route("/api/v1/processes/{name}", get(api::get_process))
        .route("/api/v1/processes/{name}/stop", post(api::stop))
        .route("/api/v1/processes/{name}/kill", post(api::kill))
        .route("/api/v1/processes/{name}/restart", post(api::restart))
        .route("/api/v1/processes/{name}/logs", get(streams::logs))
        .route("/api/v1/bus/publish", post(api::publish))
        .route("/api/v1/bus/request", post(api::request))
        .route("/api/v1/events", get(api::events))
        .route("/api/v1/events/stream", get(streams::sse))
        .route("/api/v1/events/ws", get(streams::ws))
        .route("/api/v1/fs", get(files::get_root))
        .route(
            "/api/v1/fs/{*path}",
            get(files::get)
                .put(files::put)
                .delete(files::delete)
                .post(files::post),
        )
        .route("/api/v1/fs-txn", post(files::txn))
        .route("/api/v1/fs-usage", get(files::usage))
        .route("/api/v1/mounts", get(files::mounts).post(files::mount))
        .route(
            "/api/v1/mounts/{name}",
            axum::routing::delete(files::unmount),
        )
        .route("/api/v1/secrets", get(trust::secrets))
        .route(
            "/api/v1/secrets/{name}",
            axum::routing::put(trust::set_secret).delete(trust::delete_secret),
        )
        .route("/api/v1/audit", get(trust::audit))
        .route("/api/v1/audit/verify", get(trust::audit_verify))
        .route("/api/v1/backup", get(trust::backup))
        .route("/api/v1/config", get(trust::config))
        .route("/api/v1/models", get(openai::installed))
        .route("/api/v1/models/{name}/load", post(openai::load))
        .route("/api/v1/models/{name}/unload", post(openai::unload))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/api/v1/workflows/validate", post(workflows::validate))
        .route(
            "/api/v1/workflows/runs",
            get(workflows::list).post(workflows::start),
        )
        .route("/api/v1/workflows/runs/{id}", get(workflows::show))
        .route("/api/v1/workflows/runs/{id}/events", get(workflows::events))
        .route(
            "/api/v1/workflows/runs/{id}/{action}",
            post(workflows::control),
        )
        .route(
            "/api/v1/workflows/runs/{id}/steps/{step}/logs",
            get(workflows::logs),
        )
        .route(
            "/api/v1/workflows/runs/{id}/steps/{step}/approve",
            post(workflows::approve),
        )
        .route(
            "/api/v1/workflows/registered",
            get(workflows::registered).post(workflows::register),
        )
        .route(
            "/api/v1/workflows/registered/{name}",
            axum::routing::delete(workflows::unregister),
        )
        .route("/api/v1/openapi.json", get(api::openapi_doc))
        .route("/metrics", get(metrics::render))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .merge(authed)
        .fallback(api::not_found)
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets open requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Streams (tokens, events) are many small writes: each goes out at once instead of waiting on Nagle's
    // algorithm for the previous one's acknowledgement.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("Cannot set TCP_NODELAY on a connection: {e}.");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests;
