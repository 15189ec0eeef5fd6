//! What the HTTP API adds to inference: time to first token through `POST /v1/chat/completions` (streamed) of a
//! running daemon, beside time to first token from the same engine code called in process, same model, prompt and
//! threads, alternated in one run. The prompt is the same every time, so its prefix is cached on both sides and
//! the figure is not lost in prompt processing: what remains is one decode, plus the API's own path (auth, policy,
//! JSON, the engine queue, SSE framing, loopback TCP) on the HTTP side.
//! Then generation speed through the API (one streamed request of 128 tokens), alternated with llama.cpp's own
//! `llama-bench` when bench/llama_peers.sh has built it.
//! Run: `cargo bench -p noa --bench api_overhead` (needs the model wheel cached by scripts/setup.sh).

#[path = "../../noa-infer/benches/peers/mod.rs"]
mod peers;

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

/// Sends a chat request to the daemon; its (streamed) answer, to read line by line.
fn post_chat(
    agent: &ureq::Agent,
    addr: &str,
    token: &str,
    body: &serde_json::Value,
) -> BufReader<impl std::io::Read> {
    let resp = agent
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("Authorization", format!("Bearer {token}"))
        .send_json(body)
        .unwrap();
    BufReader::new(resp.into_body().into_reader())
}

/// Milliseconds from sending a streamed chat request to reading the first chunk that carries text, on a
/// kept-alive connection (as API clients do).
fn http_ttft(agent: &ureq::Agent, addr: &str, token: &str) -> f64 {
    let body = serde_json::json!({"model": "smollm2", "stream": true, "max_tokens": 4, "temperature": 0,
                                  "messages": [{"role": "user", "content": PROMPT}]});
    let started = Instant::now();
    let mut r = post_chat(agent, addr, token, &body);
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

/// Generation speed of one streamed request of `TG_TOKENS` tokens through the API, as a client sees it: the
/// tokens after the first over the time from the first text chunk to the last (`None` if it stopped early).
fn http_tg(agent: &ureq::Agent, addr: &str, token: &str, i: usize) -> Option<f64> {
    let body = serde_json::json!({"model": "smollm2", "stream": true, "max_tokens": TG_TOKENS, "temperature": 0,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": format!("Write a long story about a dragon who learns to code. ({i})")}]});
    let mut r = post_chat(agent, addr, token, &body);
    let (mut line, mut first, mut last, mut tokens) = (String::new(), None, None, 0u64);
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if line.starts_with("data: ") && line.contains("\"content\"") {
            first.get_or_insert_with(Instant::now);
            last = Some(Instant::now());
        }
        if let Some(v) = line
            .strip_prefix("data: ")
            .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            && let Some(n) = v["usage"]["completion_tokens"].as_u64()
        {
            tokens = n;
        }
    }
    let secs = last?.duration_since(first?).as_secs_f64();
    (tokens == TG_TOKENS).then(|| (tokens - 1) as f64 / secs)
}

const TG_TOKENS: u64 = 128;

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
    // Each round's two measures are taken back to back, so their difference cancels most of the machine's noise.
    let paired = median(http.iter().zip(&local).map(|(h, l)| h - l).collect());
    let (h, l) = (median(http), median(local));
    println!(
        "time to first token, cached prompt prefix, {ROUNDS} rounds: HTTP (streamed, loopback, kept-alive connection) {h:.2} ms vs in process {l:.2} ms: the API adds {paired:.2} ms (median of the rounds' differences; target < 2 ms)"
    );
    // Generation through the API against llama.cpp's own llama-bench (built by bench/llama_peers.sh, or named
    // by NOA_LLAMA_BENCH), alternated so that both see the same spells of this shared machine.
    engine.unload("smollm2");
    let bench = peers::llama_bench();
    match bench {
        Some(bin) => {
            let model = dir.path().join("models").join("smollm2.gguf");
            let (mut api, mut peer, mut ratios) = (vec![], vec![], vec![]);
            for i in 0..9 {
                let a = http_tg(&agent, &addr, &token, i);
                let b = peers::llama_bench_tg(&bin, &model, TG_TOKENS as u32, 2);
                api.extend(a);
                peer.extend(b);
                if let (Some(a), Some(b)) = (a, b) {
                    ratios.push(a / b);
                }
            }
            if !api.is_empty() && !peer.is_empty() && !ratios.is_empty() {
                println!(
                    "generation, {TG_TOKENS} tokens, 2 threads: through the API (streamed) {:.1} tokens/s vs llama-bench {:.1} tokens/s: median of {} paired ratios {:.2} (target >= 0.97)",
                    median(api),
                    median(peer),
                    ratios.len(),
                    median(ratios)
                );
            }
        }
        None => println!(
            "(llama-bench not found: run bench/llama_peers.sh once, or set NOA_LLAMA_BENCH, to compare generation through the API with it)"
        ),
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
}
