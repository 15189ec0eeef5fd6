//! What the HTTP API adds to inference: time to first token through `POST /v1/chat/completions` (streamed) of a
//! running daemon, beside time to first token from the same engine code called in process, same model, prompt and
//! threads, alternated in one run. The prompt is the same every time, so its prefix is cached on both sides and
//! the figure is not lost in prompt processing: what remains is one decode, plus the API's own path (auth, policy,
//! JSON, the engine queue, SSE framing, loopback TCP) on the HTTP side.
//! Run: `cargo bench -p noa --bench api_overhead` (needs the model wheel cached by scripts/setup.sh).

use noa_node::infer::{ChatMessage, Engine, EngineOptions, Event, GenerateParams, ModelStore};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: usize = 40;
const PROMPT: &str = "Name a color.";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Milliseconds from sending a streamed chat request to reading the first chunk that carries text, on a
/// kept-alive connection (as API clients do).
fn http_ttft(agent: &ureq::Agent, addr: &str, token: &str) -> f64 {
    let body = serde_json::json!({"model": "smollm2", "stream": true, "max_tokens": 4, "temperature": 0,
                                  "messages": [{"role": "user", "content": PROMPT}]});
    let started = Instant::now();
    let resp = agent
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("Authorization", format!("Bearer {token}"))
        .send_json(&body)
        .unwrap();
    let mut r = BufReader::new(resp.into_body().into_reader());
    let mut line = String::new();
    let mut first = None;
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if first.is_none() && line.starts_with("data: ") && line.contains("\"content\"") {
            first = Some(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    first.expect("a chunk with text")
}

/// Milliseconds from asking the engine to receiving its first piece of text.
fn engine_ttft(rt: &tokio::runtime::Runtime, engine: &Engine) -> f64 {
    let params = GenerateParams {
        max_tokens: 4,
        temperature: 0.0,
        ..Default::default()
    };
    let msgs = vec![ChatMessage {
        role: "user".into(),
        content: PROMPT.into(),
    }];
    rt.block_on(async {
        let started = Instant::now();
        let mut rx = engine.chat("smollm2", msgs, params).unwrap();
        let mut first = None;
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Text(_) => {
                    first.get_or_insert(started.elapsed());
                }
                Event::Done(_) => break,
                Event::Error(e) => panic!("{e}"),
            }
        }
        first.unwrap().as_secs_f64() * 1000.0
    })
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let noa = env!("CARGO_BIN_EXE_noa");
    let pulled = Command::new(noa)
        .args(["model", "pull", "smollm2", "--data-dir"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(pulled.success(), "the bundled model (run scripts/setup.sh)");
    let mut daemon = Command::new(noa)
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--set", "infer.threads=2"])
        .env("NOA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr_file = dir.path().join("noa.addr");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !addr_file.exists() {
        assert!(Instant::now() < deadline, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let addr = std::fs::read_to_string(&addr_file)
        .unwrap()
        .trim()
        .to_owned();
    let token = std::fs::read_to_string(dir.path().join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    // The same engine code in this process, on the same model file, with the daemon's defaults.
    let store = ModelStore::new(&dir.path().join("models"));
    let engine = Engine::new(
        store,
        EngineOptions {
            threads: 2,
            ..Default::default()
        },
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    // Warm both: the model loads, and the prompt's prefix is cached in a slot.
    for _ in 0..3 {
        http_ttft(&agent, &addr, &token);
        engine_ttft(&rt, &engine);
    }
    let (mut http, mut local) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        http.push(http_ttft(&agent, &addr, &token));
        local.push(engine_ttft(&rt, &engine));
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    // Each round's two measures are taken back to back, so their difference cancels most of the machine's noise.
    let paired = median(http.iter().zip(&local).map(|(h, l)| h - l).collect());
    let (h, l) = (median(http), median(local));
    println!(
        "time to first token, cached prompt prefix, {ROUNDS} rounds: HTTP (streamed, loopback, kept-alive connection) {h:.2} ms vs in process {l:.2} ms: the API adds {paired:.2} ms (median of the rounds' differences; target < 2 ms)"
    );
}
