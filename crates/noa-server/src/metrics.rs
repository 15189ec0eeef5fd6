//! Prometheus text exposition of the node's counters: `noa_<subsystem>_<name>_<unit>[_total]`.

use crate::AppState;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct HttpMetrics {
    by_class: [AtomicU64; 6],
    /// Tokens used per principal: (prompt, completion).
    tokens: std::sync::Mutex<std::collections::BTreeMap<String, (u64, u64)>>,
    /// Completed inference requests, the sum of their times to first token (µs), and the last generation speed
    /// (tokens/s × 1000).
    infer_requests: AtomicU64,
    infer_ttft_us: AtomicU64,
    infer_last_tps_milli: AtomicU64,
}

impl HttpMetrics {
    pub fn record(&self, status: StatusCode) {
        let class = (status.as_u16() / 100).min(5) as usize;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Records one completed inference request of `principal`: its tokens and its timing.
    pub fn record_usage(&self, principal: &str, u: &noa_infer::Usage) {
        {
            let mut t = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
            let e = t.entry(principal.to_owned()).or_default();
            e.0 += u.prompt_tokens as u64;
            e.1 += u.completion_tokens as u64;
        }
        self.infer_requests.fetch_add(1, Ordering::Relaxed);
        self.infer_ttft_us
            .fetch_add((u.ttft_ms * 1000.0) as u64, Ordering::Relaxed);
        self.infer_last_tps_milli
            .store((u.tokens_per_second * 1000.0) as u64, Ordering::Relaxed);
    }

    /// Records the tokens of an embedding request of `principal` (prompt tokens only).
    pub fn record_embedding(&self, principal: &str, prompt_tokens: u32) {
        let mut t = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        t.entry(principal.to_owned()).or_default().0 += prompt_tokens as u64;
    }

    pub fn total(&self) -> u64 {
        self.by_class
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// Resident memory of this process, from /proc/self/statm.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

pub async fn render(State(state): State<AppState>) -> impl IntoResponse {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {v}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {v}");
            }
        }
    };
    let k = state.kernel.metrics();
    let status = state.kernel.status();
    let bus = state.kernel.bus().stats();
    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    metric(
        "noa_build_info",
        "gauge",
        "Version of this node.",
        &[(&version, 1)],
    );
    metric(
        "noa_uptime_seconds",
        "gauge",
        "Seconds since the node started.",
        &[("", state.started.elapsed().as_secs())],
    );
    metric(
        "noa_process_resident_memory_bytes",
        "gauge",
        "Resident memory of the daemon.",
        &[("", rss_bytes())],
    );
    let states: Vec<(String, u64)> = [
        "starting", "running", "waiting", "stopping", "exited", "failed",
    ]
    .iter()
    .map(|s| {
        (
            format!("state=\"{s}\""),
            *status.by_state.get(*s).unwrap_or(&0) as u64,
        )
    })
    .collect();
    let states: Vec<(&str, u64)> = states.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(
        "noa_kernel_processes",
        "gauge",
        "Processes in the table, by state.",
        &states,
    );
    metric(
        "noa_kernel_spawns_total",
        "counter",
        "Processes spawned.",
        &[("", k.spawns.load(Ordering::Relaxed))],
    );
    metric(
        "noa_kernel_restarts_total",
        "counter",
        "Processes restarted by supervisors or on request.",
        &[("", k.restarts.load(Ordering::Relaxed))],
    );
    metric(
        "noa_kernel_exits_total",
        "counter",
        "Process incarnations that ended.",
        &[("", k.exits.load(Ordering::Relaxed))],
    );
    metric(
        "noa_policy_decisions_total",
        "counter",
        "Policy decisions, by outcome.",
        &[
            (
                "decision=\"allow\"",
                k.policy_allowed.load(Ordering::Relaxed),
            ),
            ("decision=\"deny\"", k.policy_denied.load(Ordering::Relaxed)),
        ],
    );
    metric(
        "noa_bus_published_total",
        "counter",
        "Messages published on the bus.",
        &[("", bus.published)],
    );
    metric(
        "noa_bus_delivered_total",
        "counter",
        "Messages delivered to subscriptions.",
        &[("", bus.delivered)],
    );
    metric(
        "noa_bus_dropped_total",
        "counter",
        "Messages dropped because a subscriber's buffer was full.",
        &[("", bus.dropped)],
    );
    metric(
        "noa_bus_subscriptions",
        "gauge",
        "Live subscriptions.",
        &[("", bus.subscriptions)],
    );
    let classes: Vec<(String, u64)> = (1..6)
        .map(|c| {
            (
                format!("class=\"{c}xx\""),
                state.http.by_class[c].load(Ordering::Relaxed),
            )
        })
        .collect();
    let classes: Vec<(&str, u64)> = classes.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(
        "noa_http_requests_total",
        "counter",
        "HTTP responses, by status class.",
        &classes,
    );
    let tokens: Vec<(String, u64)> = state
        .http
        .tokens
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .flat_map(|(who, (p, c))| {
            let who = who.replace(['"', '\\', '\n'], "_");
            [
                (format!("principal=\"{who}\",kind=\"prompt\""), *p),
                (format!("principal=\"{who}\",kind=\"completion\""), *c),
            ]
        })
        .collect();
    let tokens: Vec<(&str, u64)> = tokens.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(
        "noa_infer_tokens_total",
        "counter",
        "Tokens processed by the inference engine, by principal and kind.",
        &tokens,
    );
    let mut extra = String::new();
    if let Some(engine) = &state.engine {
        let loaded = engine.loaded();
        let busy: u64 = loaded.iter().map(|l| l.busy as u64).sum();
        metric(
            "noa_infer_models_loaded",
            "gauge",
            "Models in memory.",
            &[("", loaded.len() as u64)],
        );
        let _ = writeln!(
            extra,
            "# HELP noa_infer_time_to_first_token_seconds Time from request to the first generated text.\n# TYPE noa_infer_time_to_first_token_seconds summary\nnoa_infer_time_to_first_token_seconds_sum {:.6}\nnoa_infer_time_to_first_token_seconds_count {}",
            state.http.infer_ttft_us.load(Ordering::Relaxed) as f64 / 1e6,
            state.http.infer_requests.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            extra,
            "# HELP noa_infer_tokens_per_second Generation speed of the last completed request.\n# TYPE noa_infer_tokens_per_second gauge\nnoa_infer_tokens_per_second {:.3}",
            state.http.infer_last_tps_milli.load(Ordering::Relaxed) as f64 / 1000.0
        );
        metric(
            "noa_infer_requests_in_flight",
            "gauge",
            "Inference requests queued or generating.",
            &[("", busy)],
        );
    }
    out.push_str(&extra);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
