//! Generation speed of the engine beside llama.cpp's C API driven directly (through `llama-cpp-2`) in the same
//! run: same model (the bundled SmolLM2-135M Q4_1), same prompt, same threads, greedy decoding, same token count.
//! Then four concurrent streams through the engine's slots (continuous batching): their aggregate speed beside
//! one stream's.
//! Run: `cargo bench -p noa-infer --bench generate` (median of 5 runs; needs the wheel cached by scripts/setup.sh).

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use noa_infer::{ChatMessage, Engine, EngineOptions, GenerateParams, ModelStore};
mod peers;

use std::num::NonZeroU32;
use std::path::Path;
use std::time::Instant;

const TOKENS: u32 = 128;
const THREADS: i32 = 2;
const QUESTION: &str = "Write a long story about a dragon who learns to code.";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Prompt processing then `TOKENS` greedy tokens with llama.cpp alone; returns (time to first token, tokens/s).
fn raw(backend: &LlamaBackend, model: &LlamaModel) -> (f64, f64) {
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(2048))
        .with_n_batch(512)
        .with_n_threads(THREADS)
        .with_n_threads_batch(THREADS);
    // On a kept ggml thread pool, as llama.cpp's own tools and the engine compute.
    let mut ctx = noa_infer::PooledContext::new(
        model.new_context(backend, params).unwrap(),
        noa_infer::ThreadPool::new(THREADS),
    );
    let template = model.chat_template(None).unwrap();
    let prompt = model
        .apply_chat_template(
            &template,
            &[LlamaChatMessage::new("user".into(), QUESTION.into()).unwrap()],
            true,
        )
        .unwrap();
    let vocab = model.vocab();
    let tokens = vocab.tokenize(prompt.as_bytes(), true, true);
    let started = Instant::now();
    let mut batch = LlamaBatch::new(512, 1);
    for (i, t) in tokens.iter().enumerate() {
        batch
            .add(*t, i as i32, &[0], i + 1 == tokens.len())
            .unwrap();
    }
    ctx.decode(&mut batch).unwrap();
    let mut sampler = LlamaSampler::chain_simple([
        LlamaSampler::penalties(vocab.n_tokens(), 64, 1.1, 0.0, 0.0),
        LlamaSampler::greedy(),
    ]);
    let mut first = None;
    for (n, pos) in (0..TOKENS).zip(tokens.len() as i32..) {
        let token = sampler.sample(&ctx, batch.n_tokens() - 1);
        let _ = vocab.token_to_piece(token, false, None);
        if n == 0 {
            first = Some(started.elapsed());
        }
        batch.clear();
        batch.add(token, pos, &[0], true).unwrap();
        ctx.decode(&mut batch).unwrap();
    }
    let first = first.unwrap();
    let generating = (started.elapsed() - first).as_secs_f64();
    (
        first.as_secs_f64() * 1000.0,
        (TOKENS - 1) as f64 / generating,
    )
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::new(&dir.path().join("models"));
    let (info, _) = store
        .pull("smollm2", &mut |_, _| {})
        .expect("the bundled model (run scripts/setup.sh)");
    let backend = noa_infer::backend().unwrap();
    let model =
        LlamaModel::load_from_file(backend, &info.file, &LlamaModelParams::default()).unwrap();
    let engine = Engine::new(
        store.clone(),
        EngineOptions {
            context: 2048,
            threads: THREADS as u32,
            ..Default::default()
        },
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // A different prompt each time, so no run reuses a cached prefix of the one before.
    let ask = |i: usize| {
        vec![ChatMessage {
            role: "user".into(),
            content: format!("{QUESTION} ({i})"),
        }]
    };
    // A stop condition would end early: the penalty keeps the greedy text going, and max_tokens bounds it.
    let params = GenerateParams {
        max_tokens: TOKENS,
        temperature: 0.0,
        ..Default::default()
    };
    rt.block_on(engine.load("smollm2", true)).unwrap();
    // llama.cpp's own llama-bench, run between the engine's runs so that both see the same machine (it is
    // shared and noisy): built by bench/llama_peers.sh, or named by NOA_LLAMA_BENCH.
    let llama_bench = peers::llama_bench();
    let runs = 9;
    let (mut raw_tps, mut raw_ttft, mut eng_tps, mut eng_ttft) = (vec![], vec![], vec![], vec![]);
    let (mut peer_tps, mut paired) = (vec![], vec![]);
    for i in 0..runs {
        let (t, s) = raw(backend, &model);
        raw_ttft.push(t);
        raw_tps.push(s);
        let (_, usage) = rt
            .block_on(engine.chat_text("smollm2", ask(i), params.clone()))
            .unwrap();
        let full = usage.completion_tokens == TOKENS;
        if full {
            eng_tps.push(usage.tokens_per_second);
            eng_ttft.push(usage.ttft_ms);
        }
        if let Some(tg) = llama_bench.as_ref().and_then(|bin| {
            peers::llama_bench_tg(bin, Path::new(&info.file), TOKENS, THREADS as u32)
        }) {
            peer_tps.push(tg);
            if full {
                // Adjacent in time, so a slow spell of the machine touches both sides of the pair.
                paired.push(usage.tokens_per_second / tg);
            }
        }
    }
    let (r, e) = (median(raw_tps), median(eng_tps));
    println!(
        "generation, {TOKENS} tokens, {THREADS} threads (median of {runs} alternating runs): engine {e:.1} tokens/s vs llama.cpp C API {r:.1} tokens/s: ratio {:.2}; time to first token {:.1} ms vs {:.1} ms",
        e / r,
        median(eng_ttft),
        median(raw_ttft)
    );
    match &llama_bench {
        Some(bin) if !peer_tps.is_empty() => {
            let n = peer_tps.len();
            let b = median(peer_tps);
            println!(
                "  vs llama-bench ({}), run between them ({n} runs): {b:.1} tokens/s: ratio {:.2}; median of the paired ratios {:.2}",
                bin.display(),
                e / b,
                median(paired)
            );
        }
        _ => println!(
            "  (llama-bench not found: run bench/llama_peers.sh once, or set NOA_LLAMA_BENCH, to measure it here too)"
        ),
    }
    // Four streams at once: every round decodes one token of each in one batch. Time to first token is taken
    // from each request's start to its first piece of text, as a client sees it.
    let mut aggregate = Vec::new();
    let mut ttfts = Vec::new();
    for round in 0..3 {
        let started = Instant::now();
        let results: Vec<(u32, f64)> = rt.block_on(async {
            let tasks: Vec<_> = (0..4)
                .map(|k| {
                    let engine = engine.clone();
                    let msgs = ask(100 + round * 4 + k);
                    let params = params.clone();
                    tokio::spawn(async move {
                        let begun = Instant::now();
                        let mut rx = engine.chat("smollm2", msgs, params).unwrap();
                        let (mut first, mut n) = (None, 0);
                        while let Some(ev) = rx.recv().await {
                            match ev {
                                noa_infer::Event::Text(_) => {
                                    first.get_or_insert(begun.elapsed());
                                }
                                noa_infer::Event::Done(u) => n = u.completion_tokens,
                                noa_infer::Event::Error(e) => panic!("{e}"),
                            }
                        }
                        (n, first.unwrap().as_secs_f64() * 1000.0)
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        let tokens: u32 = results.iter().map(|r| r.0).sum();
        ttfts.extend(results.iter().map(|r| r.1));
        aggregate.push(tokens as f64 / started.elapsed().as_secs_f64());
    }
    let a = median(aggregate);
    ttfts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p95 = ttfts[(ttfts.len() * 95).div_ceil(100) - 1];
    println!(
        "4 concurrent streams, {TOKENS} tokens each: aggregate {a:.1} tokens/s (prompt processing included) vs one stream {e:.1} tokens/s: {:.2}x; vs the C API's one stream {:.2}x; time to first token p50 {:.1} ms, p95 {p95:.1} ms",
        a / e,
        a / r,
        median(ttfts.clone()),
    );
}
