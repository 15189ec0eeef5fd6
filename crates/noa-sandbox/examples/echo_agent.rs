//! A minimal echo agent in Rust (agent protocol v0), used by the spawn benchmark. It answers `initialize`,
//! echoes every `message` request and exits on `shutdown`.
//! Run: `cargo build --release -p noa-sandbox --example echo_agent`, then
//! `noa spawn --name fast -- target/release/examples/echo_agent`.
//! With `--oneshot` it answers the first request line on stdin without the protocol handshake (the benchmark's peer).

use serde_json::{Value, json};
use std::io::{BufRead, Write};

fn main() {
    let oneshot = std::env::args().any(|a| a == "--oneshot");
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let id = msg.get("id").cloned();
        let reply = match msg.get("method").and_then(Value::as_str) {
            Some("initialize") => json!({}),
            Some("message") => msg["params"].get("data").cloned().unwrap_or(Value::Null),
            Some("shutdown") => {
                let _ = writeln!(out, "{}", json!({"jsonrpc": "2.0", "id": id, "result": {}}));
                return;
            }
            _ => continue,
        };
        if let Some(id) = id {
            let _ = writeln!(
                out,
                "{}",
                json!({"jsonrpc": "2.0", "id": id, "result": reply})
            );
            let _ = out.flush();
        }
        if oneshot {
            return;
        }
    }
}
