//! The engine: llama.cpp in process, one worker thread per loaded model, and the model manager around them.
//!
//! A loaded model lives on its own OS thread, which owns the `LlamaModel` and its context (a context borrows
//! its model, so both stay on that thread's stack), and a ggml thread pool attached to its contexts. Requests
//! reach it through a channel and are served in parallel slots with continuous batching; tokens go back through
//! a bounded async channel as they are made, and a request whose receiver is gone (the client disconnected)
//! stops at the next token. The manager loads a model
//! on its first request (requests that arrive meanwhile queue behind the load instead of loading it twice),
//! unloads it after `keep_alive` idle unless pinned, and evicts the least recently used unpinned model when
//! `max_loaded` would be passed.

use crate::models::{ModelInfo, ModelStore};
use crate::remote::RemoteModel;
use crate::{Error, Result};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use serde::Serialize;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};
use tokio::sync::mpsc as tmpsc;

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Context length per model (tokens); 0 uses the model's training context, capped at 8192.
    pub context: u32,
    /// CPU threads for generation; 0 uses every core.
    pub threads: u32,
    /// A model unused this long is unloaded (unless pinned).
    pub keep_alive: Duration,
    /// Most models loaded at once; the least recently used unpinned one makes room.
    pub max_loaded: usize,
    /// Most bytes the loaded models may take together (0: no fixed budget). Whatever the budget, a model is
    /// loaded only if the system's available memory can hold it, so loading never gets the node OOM-killed.
    pub memory_budget: u64,
    /// Requests one model serves at once (slots, decoded together in one batch: continuous batching).
    pub parallel: u32,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            context: 4096,
            threads: 0,
            keep_alive: Duration::from_secs(300),
            max_loaded: 2,
            memory_budget: 0,
            parallel: 4,
        }
    }
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// How a model's chat template handles tools ([`Engine::template_tools`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplateTools {
    /// It does not lay them out: they go in a system message.
    None,
    /// It lays them out itself, and the tools go to it.
    Listed,
    /// It lays them out and asks for calls in `<tool_call>` tags (Hermes style: Qwen, Hermes, SmolLM3 and
    /// others): the model answers in that form rather than NOA's JSON shape.
    Tags,
}

/// Sampling and limits of one request.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateParams {
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: i32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub seed: u32,
    pub stop: Vec<String>,
    /// A GBNF grammar (root rule `root`) the output must follow; see [`crate::grammar`].
    pub grammar: Option<String>,
    /// Makes the grammar lazy: the output is free until this text appears, and from there on (the text
    /// included) it follows the grammar. How a model that writes tool calls in tags may still answer in prose.
    pub grammar_trigger: Option<String>,
    /// OpenAI-shaped tools, given to a chat template that takes them ([`Engine::template_tools`]).
    pub tools: Option<serde_json::Value>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 256,
            temperature: 0.7,
            top_p: 0.95,
            top_k: 40,
            min_p: 0.05,
            repeat_penalty: 1.1,
            seed: 0xC0FFEE,
            stop: Vec::new(),
            grammar: None,
            grammar_trigger: None,
            tools: None,
        }
    }
}

/// What a request produces, in order: pieces of text, then one `Done` (or an `Error`).
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Text(String),
    Done(Usage),
    Error(String),
}

/// Token counts and why generation ended (`stop`: end of turn or a stop sequence; `length`: max_tokens).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub finish_reason: String,
    /// Time to first token and generation speed, for metrics.
    pub ttft_ms: f64,
    pub tokens_per_second: f64,
    /// Prompt tokens whose keys and values were already in the slot's cache (a reused prefix).
    pub cached_tokens: u32,
}

impl Usage {
    /// Token counts with the timings derived from them: `elapsed` since the request began, `ttft` to its first
    /// text (the whole time when none came), and the speed of the tokens after the first.
    pub fn measured(
        prompt_tokens: u32,
        completion_tokens: u32,
        finish_reason: String,
        elapsed: Duration,
        ttft: Option<Duration>,
        cached_tokens: u32,
    ) -> Usage {
        let ttft = ttft.unwrap_or(elapsed).min(elapsed);
        let gen_secs = (elapsed - ttft).as_secs_f64();
        Usage {
            prompt_tokens,
            completion_tokens,
            finish_reason,
            ttft_ms: ttft.as_secs_f64() * 1000.0,
            tokens_per_second: if gen_secs > 0.0 {
                completion_tokens.saturating_sub(1) as f64 / gen_secs
            } else {
                0.0
            },
            cached_tokens,
        }
    }
}

enum Job {
    Chat {
        messages: Vec<ChatMessage>,
        /// A prompt used as it is, without the chat template (for plain completions).
        raw_prompt: Option<String>,
        params: GenerateParams,
        events: tmpsc::Sender<Event>,
        /// The model's count of requests queued or running; the worker lowers it when this one ends.
        in_flight: Arc<std::sync::atomic::AtomicUsize>,
    },
    Embed {
        inputs: Vec<String>,
        reply: tokio::sync::oneshot::Sender<std::result::Result<Embeddings, String>>,
        in_flight: Arc<std::sync::atomic::AtomicUsize>,
    },
}

/// Embedding vectors (L2-normalized, one per input, in order) and the tokens they took.
#[derive(Clone, Debug, PartialEq)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: u32,
}

struct Loaded {
    jobs: mpsc::Sender<Job>,
    pinned: bool,
    last_used: Instant,
    size: u64,
    /// Set by the worker once the model is in memory (or failed to load).
    ready: Arc<OnceLock<std::result::Result<(), String>>>,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

/// A loaded model as `noa model ps` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct LoadedInfo {
    pub name: String,
    pub size: u64,
    pub pinned: bool,
    pub state: String,
    pub idle_ms: u64,
    pub busy: usize,
}

/// The engine handle. Cloning shares it.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    store: ModelStore,
    opts: EngineOptions,
    loaded: Mutex<HashMap<String, Loaded>>,
    /// Reads the API keys of remote models (set by the node).
    keys: std::sync::RwLock<Option<crate::KeySource>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("models", &self.inner.store.dir())
            .finish_non_exhaustive()
    }
}

/// llama.cpp's backend, initialized once per process (a second `LlamaBackend::init` fails).
pub fn backend() -> std::result::Result<&'static LlamaBackend, String> {
    static BACKEND: OnceLock<std::result::Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(
                llama_cpp_2::LogOptions::default().with_logs_enabled(false),
            );
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

impl Engine {
    pub fn new(store: ModelStore, opts: EngineOptions) -> Engine {
        let engine = Engine {
            inner: Arc::new(Inner {
                store,
                opts,
                loaded: Mutex::new(HashMap::new()),
                keys: std::sync::RwLock::new(None),
            }),
        };
        // The idle reaper holds only a weak reference, so the engine can be dropped.
        let weak = Arc::downgrade(&engine.inner);
        let _ = std::thread::Builder::new()
            .name("noa-infer-reaper".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    let Some(inner) = weak.upgrade() else {
                        return;
                    };
                    let keep = inner.opts.keep_alive;
                    let mut loaded = inner.loaded.lock().unwrap_or_else(|e| e.into_inner());
                    loaded.retain(|name, l| {
                        let idle = l.last_used.elapsed() >= keep
                            && l.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0;
                        if idle && !l.pinned {
                            tracing::info!(model = %name, "Unloading an idle model.");
                            false
                        } else {
                            true
                        }
                    });
                }
            });
        engine
    }

    pub fn store(&self) -> &ModelStore {
        &self.inner.store
    }

    /// Sets how the API keys of remote models are read.
    pub fn set_key_source(&self, keys: crate::KeySource) {
        *self.inner.keys.write().unwrap_or_else(|e| e.into_inner()) = Some(keys);
    }

    /// How `model`'s chat template handles tools (read from its record once per call).
    pub fn template_tools(&self, model: &str) -> TemplateTools {
        let template = self
            .inner
            .store
            .get(model)
            .ok()
            .and_then(|i| i.chat_template);
        match template.as_deref() {
            Some(t) if t.contains("tools") && t.contains("<tool_call>") => TemplateTools::Tags,
            Some(t) if t.contains("tools") => TemplateTools::Listed,
            _ => TemplateTools::None,
        }
    }

    /// The remote model named `name`, if it is one.
    pub fn remote(&self, name: &str) -> Result<Option<RemoteModel>> {
        self.inner.store.remote(name)
    }

    fn remote_key(&self, m: &RemoteModel) -> Result<Option<String>> {
        let Some(secret) = &m.secret else {
            return Ok(None);
        };
        let keys = self.inner.keys.read().unwrap_or_else(|e| e.into_inner());
        let read = keys.as_ref().ok_or_else(|| {
            Error::Engine(format!(
                "{} needs the secret {secret}, and this engine has no secret store",
                m.name
            ))
        })?;
        read(secret, &m.name).map(Some).map_err(|e| Error::Remote {
            name: m.name.clone(),
            url: m.url.clone(),
            status: None,
            message: format!("cannot read its key from the secret {secret}: {e}"),
        })
    }

    /// Sends an OpenAI-shaped request body as it is to a remote model's `path` (`chat/completions`,
    /// `completions`, `embeddings`), for callers that speak the API themselves (the HTTP proxy).
    pub async fn remote_request(
        &self,
        m: &RemoteModel,
        path: &'static str,
        body: serde_json::Value,
        stream: bool,
    ) -> Result<crate::Reply> {
        let key = self.remote_key(m)?;
        crate::remote::send(m.clone(), key, path, body, stream).await
    }

    /// Starts a generation through a remote model.
    fn remote_generate(
        &self,
        m: RemoteModel,
        messages: Vec<ChatMessage>,
        raw_prompt: Option<String>,
        params: GenerateParams,
    ) -> Result<tmpsc::Receiver<Event>> {
        if params.grammar.is_some() {
            return Err(Error::BadRequest(format!(
                "{} is a remote model: it takes no GBNF grammar (use the remote API's own response_format)",
                m.name
            )));
        }
        let key = self.remote_key(&m)?;
        // Only the sampling fields every OpenAI-compatible server accepts.
        let mut body = serde_json::json!({
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": params.seed,
        });
        if !params.stop.is_empty() {
            body["stop"] = serde_json::json!(params.stop);
        }
        let chat = raw_prompt.is_none();
        match raw_prompt {
            Some(p) => body["prompt"] = serde_json::json!(p),
            None => {
                body["messages"] = messages
                    .iter()
                    .map(|m| serde_json::json!({ "role": m.role, "content": m.content }))
                    .collect()
            }
        }
        let (tx, rx) = tmpsc::channel(1024);
        crate::remote::generate(m, key, body, chat, tx);
        Ok(rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Loaded>> {
        self.inner.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The loaded models.
    pub fn loaded(&self) -> Vec<LoadedInfo> {
        let mut out: Vec<LoadedInfo> = self
            .lock()
            .iter()
            .map(|(name, l)| LoadedInfo {
                name: name.clone(),
                size: l.size,
                pinned: l.pinned,
                state: match l.ready.get() {
                    None => "loading".into(),
                    Some(Ok(())) => "ready".into(),
                    Some(Err(e)) => format!("failed: {e}"),
                },
                idle_ms: l.last_used.elapsed().as_millis() as u64,
                busy: l.in_flight.load(std::sync::atomic::Ordering::SeqCst),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Loads a model now (and pins it if asked); waits until it is in memory.
    pub async fn load(&self, name: &str, pin: bool) -> Result<()> {
        if let Some(m) = self.remote(name)? {
            return Err(Error::BadRequest(format!(
                "{name} is a remote model (served by {}); there is nothing to load",
                m.url
            )));
        }
        let ready = {
            let mut loaded = self.lock();
            self.ensure_locked(&mut loaded, name)?;
            let l = loaded
                .get_mut(name)
                .ok_or_else(|| Error::Engine("lost a loading model".into()))?;
            l.pinned |= pin;
            l.last_used = Instant::now();
            l.ready.clone()
        };
        loop {
            match ready.get() {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) => {
                    self.lock().remove(name);
                    return Err(Error::Load {
                        name: name.to_owned(),
                        message: e.clone(),
                    });
                }
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Unloads a model (pinned or not); false when it was not loaded.
    pub fn unload(&self, name: &str) -> bool {
        self.lock().remove(name).is_some()
    }

    /// Starts the worker of `name` if it is not loaded, making room under `max_loaded`.
    fn ensure_locked(&self, loaded: &mut HashMap<String, Loaded>, name: &str) -> Result<()> {
        if loaded.contains_key(name) {
            return Ok(());
        }
        let info = self.inner.store.get(name)?;
        // Every slot has a context of its own length.
        let need = memory_needed(
            info.size,
            self.inner
                .opts
                .context
                .saturating_mul(self.inner.opts.parallel.clamp(1, 64)),
        );
        let budget = self.inner.opts.memory_budget;
        if budget > 0 && need > budget {
            return Err(Error::Memory {
                name: name.to_owned(),
                need,
                limit: budget,
                what: "the memory budget (infer.memory_budget)".into(),
            });
        }
        // Room under the budget: evict least recently used unpinned idle models.
        while budget > 0 && loaded.values().map(|l| l.size).sum::<u64>() + need > budget {
            let victim = loaded
                .iter()
                .filter(|(_, l)| {
                    !l.pinned && l.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0
                })
                .min_by_key(|(_, l)| l.last_used)
                .map(|(n, _)| n.clone());
            match victim {
                Some(v) => {
                    tracing::info!(model = %v, "Unloading the least recently used model to stay within the memory budget.");
                    loaded.remove(&v);
                }
                None => {
                    return Err(Error::Memory {
                        name: name.to_owned(),
                        need,
                        limit: budget - loaded.values().map(|l| l.size).sum::<u64>().min(budget),
                        what: "what the memory budget leaves beside pinned and busy models".into(),
                    });
                }
            }
        }
        if let Some(available) = available_memory()
            && need > available
        {
            return Err(Error::Memory {
                name: name.to_owned(),
                need,
                limit: available,
                what: "the memory the system has available (MemAvailable)".into(),
            });
        }
        while loaded.len() >= self.inner.opts.max_loaded.max(1) {
            let victim = loaded
                .iter()
                .filter(|(_, l)| {
                    !l.pinned && l.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0
                })
                .min_by_key(|(_, l)| l.last_used)
                .map(|(n, _)| n.clone());
            match victim {
                Some(v) => {
                    tracing::info!(model = %v, "Unloading the least recently used model to make room.");
                    loaded.remove(&v);
                }
                None => {
                    return Err(Error::Busy {
                        name: name.to_owned(),
                        max: self.inner.opts.max_loaded,
                    });
                }
            }
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let ready = Arc::new(OnceLock::new());
        let opts = self.inner.opts.clone();
        let worker_ready = ready.clone();
        let worker_info = info.clone();
        std::thread::Builder::new()
            .name(format!("noa-model-{name}"))
            .spawn(move || worker(worker_info, opts, rx, worker_ready))
            .map_err(|e| Error::Engine(format!("cannot start the model thread: {e}")))?;
        loaded.insert(
            name.to_owned(),
            Loaded {
                jobs: tx,
                pinned: false,
                last_used: Instant::now(),
                size: need,
                ready,
                in_flight: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            },
        );
        Ok(())
    }

    /// Starts a chat completion; events arrive on the returned receiver. Dropping it cancels the request.
    pub fn chat(
        &self,
        model: &str,
        messages: Vec<ChatMessage>,
        params: GenerateParams,
    ) -> Result<tmpsc::Receiver<Event>> {
        if messages.is_empty() {
            return Err(Error::BadRequest(
                "messages: at least one message is needed".into(),
            ));
        }
        self.submit(model, messages, None, params)
    }

    /// Starts a plain completion of `prompt` (no chat template); events as for [`Engine::chat`].
    pub fn complete(
        &self,
        model: &str,
        prompt: String,
        params: GenerateParams,
    ) -> Result<tmpsc::Receiver<Event>> {
        if prompt.is_empty() {
            return Err(Error::BadRequest("prompt must not be empty".into()));
        }
        self.submit(model, Vec::new(), Some(prompt), params)
    }

    fn submit(
        &self,
        model: &str,
        messages: Vec<ChatMessage>,
        raw_prompt: Option<String>,
        params: GenerateParams,
    ) -> Result<tmpsc::Receiver<Event>> {
        if params.max_tokens == 0 {
            return Err(Error::BadRequest("max_tokens must be at least 1".into()));
        }
        if let Some(m) = self.remote(model)? {
            return self.remote_generate(m, messages, raw_prompt, params);
        }
        // Room for a burst: the worker never waits for a slow client while other slots generate.
        let (tx, rx) = tmpsc::channel(1024);
        self.enqueue(model, |in_flight| Job::Chat {
            messages,
            raw_prompt,
            params,
            events: tx,
            in_flight,
        })?;
        Ok(rx)
    }

    /// Loads `model` if needed and queues a job for its worker, counting it in flight until the worker is done.
    fn enqueue(
        &self,
        model: &str,
        job: impl FnOnce(Arc<std::sync::atomic::AtomicUsize>) -> Job,
    ) -> Result<()> {
        let mut loaded = self.lock();
        self.ensure_locked(&mut loaded, model)?;
        let l = loaded
            .get_mut(model)
            .ok_or_else(|| Error::Engine("lost a loading model".into()))?;
        l.last_used = Instant::now();
        let counter = l.in_flight.clone();
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if l.jobs.send(job(counter.clone())).is_err() {
            counter.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            loaded.remove(model);
            return Err(Error::Engine(format!(
                "the worker of {model} has stopped; try again"
            )));
        }
        Ok(())
    }

    /// Embeds each input with `model` (mean of the last hidden states over the input's tokens, L2-normalized).
    pub async fn embed(&self, model: &str, inputs: Vec<String>) -> Result<Embeddings> {
        if inputs.is_empty() {
            return Err(Error::BadRequest(
                "input: at least one text is needed".into(),
            ));
        }
        if let Some(i) = inputs.iter().position(String::is_empty) {
            return Err(Error::BadRequest(format!("input[{i}] is empty")));
        }
        if let Some(m) = self.remote(model)? {
            let key = self.remote_key(&m)?;
            return crate::remote::embed(m, key, inputs).await;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.enqueue(model, |in_flight| Job::Embed {
            inputs,
            reply: tx,
            in_flight,
        })?;
        match rx.await {
            Ok(Ok(e)) => Ok(e),
            Ok(Err(e)) => Err(worker_error(e)),
            Err(_) => Err(Error::Engine("the model stopped without answering".into())),
        }
    }

    /// Runs a chat to the end and returns the whole text.
    pub async fn chat_text(
        &self,
        model: &str,
        messages: Vec<ChatMessage>,
        params: GenerateParams,
    ) -> Result<(String, Usage)> {
        let mut rx = self.chat(model, messages, params)?;
        let mut text = String::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Text(t) => text.push_str(&t),
                Event::Done(u) => return Ok((text, u)),
                Event::Error(e) => return Err(worker_error(e)),
            }
        }
        Err(Error::Engine("the model stopped without finishing".into()))
    }
}

/// A worker's error as the caller's: the ones that begin with a code word are the request's fault.
fn worker_error(e: String) -> Error {
    if let Some(m) = e.strip_prefix("REMOTE ") {
        return Error::Relayed(m.to_owned());
    }
    for code in ["CONTEXT ", "GRAMMAR ", "NOTCHAT "] {
        if let Some(m) = e.strip_prefix(code) {
            return Error::BadRequest(m.to_owned());
        }
    }
    Error::Generate(e)
}

/// Memory a model needs once loaded: its weights, plus its KV cache and compute buffers (estimated generously
/// for the context length).
pub fn memory_needed(file_size: u64, context: u32) -> u64 {
    file_size + file_size / 10 + (context.max(512) as u64) * 64 * 1024 + (64 << 20)
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The longest suffix of `text` that is a proper prefix of one of `stops` (held back until it is decided).
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut keep = 0;
    for s in stops {
        for k in (1..s.len()).rev() {
            if k > keep && text.ends_with(&s[..k]) && s.is_char_boundary(k) {
                keep = k;
                break;
            }
        }
    }
    keep
}

/// One request being served in a slot.
struct Active {
    events: tmpsc::Sender<Event>,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    params: GenerateParams,
    sampling: Sampling,
    prompt: Vec<LlamaToken>,
    /// The next prompt token to feed (prompt tokens before it are in the KV cache).
    next_prompt: usize,
    /// The token sampled last, to feed in the next batch.
    last_token: Option<LlamaToken>,
    /// Where this slot's logits are in the batch just decoded.
    batch_index: Option<i32>,
    pending_bytes: Vec<u8>,
    text: String,
    sent: usize,
    produced: u32,
    started: Instant,
    ttft: Option<Duration>,
    reused: usize,
}

/// A sequence of the shared context: its cached tokens survive between requests, for prefix reuse.
struct Slot {
    seq: i32,
    /// The tokens whose keys and values are in the cache for this sequence, in order.
    cached: Vec<LlamaToken>,
    active: Option<Active>,
}

fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn prompt_text(
    model: &LlamaModel,
    jinja: Option<&crate::template::ChatTemplate>,
    template: Option<&llama_cpp_2::model::LlamaChatTemplate>,
    messages: &[ChatMessage],
    raw_prompt: Option<String>,
    tools: Option<&serde_json::Value>,
) -> std::result::Result<String, String> {
    if let Some(p) = raw_prompt {
        return Ok(p);
    }
    // The model's Jinja template itself, rendered as transformers and llama-server do, when the request has
    // tools and the template lays them out. Otherwise llama.cpp's rendering of the formats it knows (which
    // leaves out defaults some templates add, such as a stock system prompt), and the Jinja template for a
    // format it does not know.
    let render_jinja = |tools: Option<&serde_json::Value>| {
        let j = jinja.ok_or_else(|| "the model has no chat template".to_owned())?;
        let list: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| serde_json::json!({ "role": m.role, "content": m.content }))
            .collect();
        let text = j.render(&serde_json::Value::Array(list), tools)?;
        // A template that prints the BOS token itself would get a second one from the tokenizer.
        Ok::<_, String>(match text.strip_prefix(j.bos()) {
            Some(rest) if !j.bos().is_empty() && model.vocab().should_add_bos() => rest.to_owned(),
            _ => text,
        })
    };
    if let Some(tools) = tools.filter(|_| jinja.is_some_and(|j| j.takes_tools())) {
        match render_jinja(Some(tools)) {
            Ok(text) => return Ok(text),
            // Falling back to a prompt without the tools would leave the model blind to them.
            Err(e) => return Err(format!("the chat template cannot lay out the tools: {e}")),
        }
    }
    let builtin = template.map(|t| {
        let chat: Vec<LlamaChatMessage> = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| format!("a message holds a NUL byte: {e}"))?;
        model
            .apply_chat_template(t, &chat, true)
            .map_err(|e| format!("the chat template failed: {e}"))
    });
    match builtin {
        Some(Ok(text)) => Ok(text),
        Some(Err(e)) => render_jinja(None).map_err(|j| format!("{e}; {j}")),
        None => {
            let mut p = String::new();
            for m in messages {
                p.push_str(&format!("{}: {}\n", m.role, m.content));
            }
            p.push_str("assistant: ");
            Ok(p)
        }
    }
}

/// How one request picks its tokens. The repeat penalty is applied here, to a copy of the logits, rather than
/// by llama.cpp's penalties sampler, which looks every one of the vocabulary's tokens up in a hash map for
/// every token generated (49,152 lookups for the bundled model, about a tenth of the time of a token); greedy
/// decoding without a grammar then needs no candidate array at all. The results are the same: the penalty of
/// each distinct token among the last 64 generated (logit times the penalty when not positive, divided by it
/// otherwise), then the first token with the highest logit.
struct Sampling {
    /// The rest of the chain (grammar, then greedy or top-k/top-p/min-p/temperature/seeded draw).
    chain: LlamaSampler,
    /// Greedy without a grammar: the highest penalized logit, no chain.
    greedy: bool,
    repeat_penalty: f32,
    /// The last tokens generated, oldest first (at most `PENALTY_WINDOW`).
    recent: std::collections::VecDeque<LlamaToken>,
    /// The logits being penalized, reused from token to token.
    scratch: Vec<f32>,
}

/// How many of the last generated tokens the repeat penalty looks at (llama.cpp's default `penalty_last_n`).
const PENALTY_WINDOW: usize = 64;

fn sampler_for(
    model: &LlamaModel,
    params: &GenerateParams,
) -> std::result::Result<Sampling, String> {
    let mut chain = Vec::new();
    if let Some(g) = &params.grammar {
        let sampler = match &params.grammar_trigger {
            // Watched as a plain pattern, and as a token too when it is one (as `<tool_call>` is for Qwen and
            // Hermes). llama.cpp's trigger *words* would become `[\s\S]*?(word)[\s\S]*`, which its regex engine
            // searches with recursion as deep as the output is long.
            Some(trigger) => {
                let tokens = model.vocab().tokenize(trigger.as_bytes(), false, true);
                let token: &[LlamaToken] = if tokens.len() == 1 { &tokens } else { &[] };
                LlamaSampler::grammar_lazy_patterns(
                    model,
                    g,
                    "root",
                    &[regex_escape(trigger)],
                    token,
                )
            }
            None => LlamaSampler::grammar(model, g, "root"),
        };
        chain.push(sampler.map_err(|e| format!("GRAMMAR the grammar is not valid GBNF: {e}"))?);
    }
    let greedy = params.temperature <= 0.0;
    if greedy {
        chain.push(LlamaSampler::greedy());
    } else {
        chain.push(LlamaSampler::top_k(params.top_k.max(1)));
        chain.push(LlamaSampler::top_p(params.top_p.clamp(0.0, 1.0), 1));
        chain.push(LlamaSampler::min_p(params.min_p.clamp(0.0, 1.0), 1));
        chain.push(LlamaSampler::temp(params.temperature));
        chain.push(LlamaSampler::dist(params.seed));
    }
    Ok(Sampling {
        chain: LlamaSampler::chain_simple(chain),
        greedy: greedy && params.grammar.is_none(),
        repeat_penalty: params.repeat_penalty,
        recent: std::collections::VecDeque::with_capacity(PENALTY_WINDOW),
        scratch: Vec::new(),
    })
}

/// `text` as a regular expression that matches it literally (ECMAScript syntax, as llama.cpp's triggers use).
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if ".^$|()*+?[]{}\\/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Picks the token at batch index `idx`: the repeat penalty on a copy of the logits, then either the first
/// highest logit (greedy, no grammar) or the chain over all candidates. The chain's choice is accepted through
/// llama-cpp-2's shim that catches C++ exceptions: a grammar that throws while accepting (its stack emptied)
/// ends this request with an error instead of aborting the process.
fn sample(
    sampling: &mut Sampling,
    ctx: &llama_cpp_2::context::LlamaContext<'_>,
    idx: i32,
) -> std::result::Result<LlamaToken, String> {
    let Sampling {
        chain,
        greedy,
        repeat_penalty,
        recent,
        scratch,
    } = sampling;
    scratch.clear();
    scratch.extend_from_slice(ctx.get_logits_ith(idx));
    penalize(scratch, recent, *repeat_penalty);
    let token = if *greedy {
        LlamaToken(first_max(scratch).ok_or("the model produced no logits")? as i32)
    } else {
        let mut candidates = llama_cpp_2::token::data_array::LlamaTokenDataArray::from_iter(
            scratch.iter().enumerate().map(|(i, &logit)| {
                llama_cpp_2::token::data::LlamaTokenData::new(LlamaToken(i as i32), logit, 0.0)
            }),
            false,
        );
        candidates.apply_sampler(chain);
        let token = candidates
            .selected_token()
            .ok_or("the sampler chain selected no token")?;
        chain.try_accept(token).map_err(|e| {
            format!(
                "GRAMMAR the constrained output could not go on ({e}); nothing more was generated"
            )
        })?;
        token
    };
    if recent.len() == PENALTY_WINDOW {
        recent.pop_front();
    }
    recent.push_back(token);
    Ok(token)
}

/// Applies the repeat penalty once to each distinct token in `recent`, as llama.cpp's penalties sampler does.
fn penalize(logits: &mut [f32], recent: &std::collections::VecDeque<LlamaToken>, penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    for (i, t) in recent.iter().enumerate() {
        // Once per distinct token: skip one seen earlier in the window.
        if recent.iter().take(i).any(|u| u == t) {
            continue;
        }
        if let Some(l) = usize::try_from(t.0).ok().and_then(|k| logits.get_mut(k)) {
            if *l <= 0.0 {
                *l *= penalty;
            } else {
                *l /= penalty;
            }
        }
    }
}

/// The index of the first highest value (llama.cpp's greedy sampler keeps the first on a tie).
fn first_max(values: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in values.iter().enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// Sends what is ready; `false` if the client has gone. A full channel keeps the text for the next round,
/// so one slow client never holds up the other slots.
fn flush(a: &mut Active, upto: usize) -> bool {
    if upto <= a.sent {
        return !a.events.is_closed();
    }
    match a
        .events
        .try_send(Event::Text(a.text[a.sent..upto].to_owned()))
    {
        Ok(()) => {
            a.ttft.get_or_insert_with(|| a.started.elapsed());
            a.sent = upto;
            true
        }
        Err(tmpsc::error::TrySendError::Full(_)) => true,
        Err(tmpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// Ends a request: the rest of its text and its usage, or an error.
fn finish(mut a: Active, outcome: std::result::Result<&str, String>) {
    let result = match outcome {
        Ok(reason) => {
            if reason != "cancelled" && a.text.len() > a.sent {
                a.ttft.get_or_insert_with(|| a.started.elapsed());
                let _ = a
                    .events
                    .blocking_send(Event::Text(a.text[a.sent..].to_owned()));
            }
            Event::Done(Usage::measured(
                a.prompt.len() as u32,
                a.produced,
                reason.into(),
                a.started.elapsed(),
                a.ttft,
                a.reused as u32,
            ))
        }
        Err(e) => Event::Error(e),
    };
    // The slot is free before the client hears that its request ended.
    a.in_flight
        .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    let _ = a.events.blocking_send(result);
}

fn worker(
    info: ModelInfo,
    opts: EngineOptions,
    jobs: mpsc::Receiver<Job>,
    ready: Arc<OnceLock<std::result::Result<(), String>>>,
) {
    let backend = match backend() {
        Ok(b) => b,
        Err(e) => {
            let _ = ready.set(Err(format!("llama.cpp did not start: {e}")));
            return;
        }
    };
    // A corrupt or truncated file fails here, with llama.cpp's reason; the daemon stays up.
    let model = match LlamaModel::load_from_file(backend, &info.file, &LlamaModelParams::default())
    {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.set(Err(format!("{e} (file {})", info.file)));
            return;
        }
    };
    let n_ctx = if opts.context == 0 {
        model.n_ctx_train().min(8192)
    } else {
        opts.context.min(model.n_ctx_train().max(512))
    };
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get() as i32)
            .unwrap_or(2)
    } else {
        opts.threads as i32
    };
    let n_slots = opts.parallel.clamp(1, 64);
    const N_BATCH: usize = 512;
    // One context, one sequence per slot, each with the whole context length of its own.
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx * n_slots))
        .with_n_seq_max(n_slots)
        .with_n_batch(N_BATCH as u32)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    // An encoder (a BERT sentence-embedding model: non-causal attention) only embeds; it gets no chat context.
    let encoder_only = model
        .meta_val_str("general.architecture")
        .and_then(|arch| model.meta_val_str(&format!("{arch}.attention.causal")))
        .is_ok_and(|causal| causal == "false");
    let pool = crate::ffi::ThreadPool::new(threads);
    if pool.is_none() {
        tracing::warn!(model = %info.name, "No ggml thread pool; llama.cpp starts its threads for every token.");
    }
    let mut chat_ctx = if encoder_only {
        None
    } else {
        match model.new_context(backend, params) {
            Ok(c) => Some(crate::ffi::PooledContext::new(c, pool.clone())),
            Err(e) => {
                let _ = ready.set(Err(format!("cannot create a context: {e}")));
                return;
            }
        }
    };
    let template = model.chat_template(None).ok();
    let jinja = info.chat_template.as_deref().and_then(|source| {
        let vocab = model.vocab();
        let text = |t| {
            vocab
                .text(t)
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        crate::template::ChatTemplate::new(source, &text(vocab.bos()), &text(vocab.eos()))
            .inspect_err(|e| tracing::warn!(model = %info.name, "{e}; llama.cpp's built-in formats are used."))
            .ok()
    });
    // Embeddings need a context of their own (pooled outputs); made on the first embedding request.
    let embed_ctx_len = n_ctx.min(2048);
    let mut embed_ctx: Option<crate::ffi::PooledContext<'_>> = None;
    let _ = ready.set(Ok(()));
    tracing::info!(model = %info.name, n_ctx, slots = n_slots, threads, "Model loaded.");
    let vocab = model.vocab();
    let mut slots: Vec<Slot> = (0..n_slots as i32)
        .map(|seq| Slot {
            seq,
            cached: Vec::new(),
            active: None,
        })
        .collect();
    let mut waiting: std::collections::VecDeque<Job> = std::collections::VecDeque::new();
    let mut batch = LlamaBatch::new(N_BATCH.max(n_slots as usize), 1);
    let mut open = true;
    // Continuous batching: every round admits waiting requests into free slots, feeds one token of each
    // generating slot and as much prompt as fits, decodes them in one batch, and samples every slot that has
    // logits. The worker ends when the manager drops its sender (unload, eviction, shutdown) and nothing is left.
    loop {
        let busy = slots.iter().any(|s| s.active.is_some());
        if !busy && waiting.is_empty() {
            if !open {
                break;
            }
            match jobs.recv() {
                Ok(j) => waiting.push_back(j),
                Err(_) => break,
            }
        }
        while open {
            match jobs.try_recv() {
                Ok(j) => waiting.push_back(j),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => open = false,
            }
        }
        // Admit.
        while let Some(job) = waiting.pop_front() {
            match job {
                Job::Embed {
                    inputs,
                    reply,
                    in_flight,
                } => {
                    let r = embed(
                        &model,
                        backend,
                        &mut embed_ctx,
                        pool.clone(),
                        embed_ctx_len,
                        threads,
                        &inputs,
                    );
                    in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = reply.send(r);
                }
                Job::Chat {
                    messages,
                    raw_prompt,
                    params,
                    events,
                    in_flight,
                } => {
                    if encoder_only {
                        in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        let _ = events.blocking_send(Event::Error(format!(
                            "NOTCHAT {} is an embedding model: it answers /v1/embeddings, not chat or completions",
                            info.name
                        )));
                        continue;
                    }
                    if !slots.iter().any(|s| s.active.is_none()) {
                        waiting.push_front(Job::Chat {
                            messages,
                            raw_prompt,
                            params,
                            events,
                            in_flight,
                        });
                        break;
                    }
                    let started = Instant::now();
                    let prepared = prompt_text(
                        &model,
                        jinja.as_ref(),
                        template.as_ref(),
                        &messages,
                        raw_prompt,
                        params.tools.as_ref(),
                    )
                        .and_then(|p| {
                            let tokens = vocab.tokenize(p.as_bytes(), true, true);
                            if tokens.is_empty() {
                                return Err("the prompt has no tokens".to_owned());
                            }
                            if tokens.len() as u32 + params.max_tokens > n_ctx {
                                return Err(format!(
                                    "CONTEXT the prompt is {} tokens and max_tokens is {}; together they must fit the context of {n_ctx} tokens",
                                    tokens.len(),
                                    params.max_tokens
                                ));
                            }
                            Ok((tokens, sampler_for(&model, &params)?))
                        });
                    let (prompt, sampling) = match prepared {
                        Ok(x) => x,
                        Err(e) => {
                            in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                            let _ = events.blocking_send(Event::Error(e));
                            continue;
                        }
                    };
                    // The free slot whose cache shares the longest prefix with this prompt.
                    let Some(slot) = slots
                        .iter_mut()
                        .filter(|s| s.active.is_none())
                        .max_by_key(|s| common_prefix(&s.cached, &prompt))
                    else {
                        continue;
                    };
                    // At least the last prompt token is fed again, for its logits.
                    let keep = common_prefix(&slot.cached, &prompt).min(prompt.len() - 1);
                    if let Some(ctx) = chat_ctx.as_mut() {
                        let _ =
                            ctx.clear_kv_cache_seq(Some(slot.seq as u32), Some(keep as u32), None);
                    }
                    slot.cached.truncate(keep);
                    slot.active = Some(Active {
                        events,
                        in_flight,
                        params,
                        sampling,
                        prompt,
                        next_prompt: keep,
                        last_token: None,
                        batch_index: None,
                        pending_bytes: Vec::new(),
                        text: String::new(),
                        sent: 0,
                        produced: 0,
                        started,
                        ttft: None,
                        reused: keep,
                    });
                }
            }
        }
        // Only a model with a chat context ever has an active slot.
        let Some(ctx) = chat_ctx.as_mut() else {
            continue;
        };
        // Build one batch: a token per generating slot first (they stream), then prompt chunks.
        batch.clear();
        let mut room = N_BATCH.max(n_slots as usize);
        for slot in slots.iter_mut() {
            let Some(a) = slot.active.as_mut() else {
                continue;
            };
            a.batch_index = None;
            if a.events.is_closed() {
                continue;
            }
            if let Some(t) = a.last_token.take() {
                let pos = slot.cached.len() as i32;
                if batch.add(t, pos, &[slot.seq], true).is_ok() {
                    a.batch_index = Some(batch.n_tokens() - 1);
                    slot.cached.push(t);
                    room -= 1;
                }
            }
        }
        for slot in slots.iter_mut() {
            let Some(a) = slot.active.as_mut() else {
                continue;
            };
            if a.events.is_closed() {
                continue;
            }
            while a.next_prompt < a.prompt.len() && room > 0 {
                let t = a.prompt[a.next_prompt];
                let last = a.next_prompt + 1 == a.prompt.len();
                if batch
                    .add(t, slot.cached.len() as i32, &[slot.seq], last)
                    .is_err()
                {
                    break;
                }
                if last {
                    a.batch_index = Some(batch.n_tokens() - 1);
                }
                slot.cached.push(t);
                a.next_prompt += 1;
                room -= 1;
            }
        }
        if batch.n_tokens() > 0
            && let Err(e) = ctx.decode(&mut batch)
        {
            // The batch failed as a whole: every request in it fails, and its cache is dropped.
            let msg = format!("decode failed: {e}");
            for slot in slots.iter_mut() {
                if slot
                    .active
                    .as_ref()
                    .is_some_and(|a| a.batch_index.is_some())
                {
                    let _ = ctx.clear_kv_cache_seq(Some(slot.seq as u32), None, None);
                    slot.cached.clear();
                    if let Some(a) = slot.active.take() {
                        finish(a, Err(msg.clone()));
                    }
                }
            }
            continue;
        }
        // Sample every slot with logits; end the ones that are done.
        for slot in slots.iter_mut() {
            let Some(a) = slot.active.as_mut() else {
                continue;
            };
            if a.events.is_closed() {
                if let Some(a) = slot.active.take() {
                    finish(a, Ok("cancelled"));
                }
                continue;
            }
            let Some(idx) = a.batch_index.take() else {
                // Still filling its prompt, or waiting for a slow client's channel.
                let upto = a.text.len() - held_back(&a.text, &a.params.stop);
                if !flush(a, upto)
                    && let Some(a) = slot.active.take()
                {
                    finish(a, Ok("cancelled"));
                }
                continue;
            };
            let token = match sample(&mut a.sampling, ctx, idx) {
                Ok(t) => t,
                Err(e) => {
                    if let Some(a) = slot.active.take() {
                        finish(a, Err(e));
                    }
                    continue;
                }
            };
            a.produced += 1;
            let mut reason = None;
            if vocab.is_eog(token) {
                reason = Some("stop");
            } else {
                a.pending_bytes
                    .extend(vocab.token_to_piece(token, false, None));
                // Hold back bytes until they are whole UTF-8 characters.
                match std::str::from_utf8(&a.pending_bytes) {
                    Ok(s) => {
                        a.text.push_str(s);
                        a.pending_bytes.clear();
                    }
                    Err(e) if e.error_len().is_none() => {
                        let ok = e.valid_up_to();
                        let head = std::str::from_utf8(&a.pending_bytes[..ok])
                            .unwrap_or_default()
                            .to_owned();
                        a.text.push_str(&head);
                        a.pending_bytes.drain(..ok);
                    }
                    Err(_) => {
                        let lossy = String::from_utf8_lossy(&a.pending_bytes).into_owned();
                        a.text.push_str(&lossy);
                        a.pending_bytes.clear();
                    }
                }
                let sent = a.sent;
                if let Some(at) = a
                    .params
                    .stop
                    .iter()
                    .filter(|s| !s.is_empty())
                    .filter_map(|s| {
                        a.text[sent.min(a.text.len())..]
                            .find(s.as_str())
                            .map(|i| i + sent)
                    })
                    .min()
                {
                    a.text.truncate(at);
                    reason = Some("stop");
                } else if a.produced >= a.params.max_tokens {
                    reason = Some("length");
                } else {
                    let upto = a.text.len() - held_back(&a.text, &a.params.stop);
                    if !flush(a, upto) {
                        reason = Some("cancelled");
                    }
                }
            }
            match reason {
                Some(r) => {
                    if let Some(a) = slot.active.take() {
                        if a.reused > 0 {
                            tracing::debug!(
                                seq = slot.seq,
                                reused = a.reused,
                                "A prompt prefix was reused from the cache."
                            );
                        }
                        finish(a, Ok(r));
                    }
                }
                None => a.last_token = Some(token),
            }
        }
    }
    tracing::info!(model = %info.name, "Model unloaded.");
}

/// Embeds each input in the embedding context (made on first use): mean-pooled and L2-normalized.
fn embed<'m>(
    model: &'m LlamaModel,
    backend: &LlamaBackend,
    embed_ctx: &mut Option<crate::ffi::PooledContext<'m>>,
    pool: Option<std::rc::Rc<crate::ffi::ThreadPool>>,
    len: u32,
    threads: i32,
    inputs: &[String],
) -> std::result::Result<Embeddings, String> {
    if embed_ctx.is_none() {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(len))
            .with_n_batch(len)
            .with_n_ubatch(len)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_embeddings(true)
            .with_pooling_type(llama_cpp_2::context::params::LlamaPoolingType::Mean);
        let ctx = model
            .new_context(backend, params)
            .map_err(|e| format!("cannot create an embedding context: {e}"))?;
        *embed_ctx = Some(crate::ffi::PooledContext::new(ctx, pool));
    }
    let Some(ectx) = embed_ctx.as_mut() else {
        return Err("no embedding context".into());
    };
    let mut vectors = Vec::with_capacity(inputs.len());
    let mut prompt_tokens = 0u32;
    for (i, text) in inputs.iter().enumerate() {
        let tokens = model.vocab().tokenize(text.as_bytes(), true, false);
        if tokens.len() as u32 > len {
            return Err(format!(
                "CONTEXT input[{i}] is {} tokens; embeddings take at most {len}",
                tokens.len()
            ));
        }
        prompt_tokens += tokens.len() as u32;
        ectx.clear_kv_cache();
        let mut batch = LlamaBatch::new(tokens.len().max(1), 1);
        for (j, t) in tokens.iter().enumerate() {
            batch
                .add(*t, j as i32, &[0], true)
                .map_err(|e| e.to_string())?;
        }
        ectx.decode(&mut batch)
            .map_err(|e| format!("decode failed: {e}"))?;
        let v = ectx
            .embeddings_seq_ith(0)
            .map_err(|e| format!("no embedding: {e}"))?;
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        vectors.push(if norm > 0.0 {
            v.iter().map(|x| x / norm).collect()
        } else {
            v.to_vec()
        });
    }
    Ok(Embeddings {
        vectors,
        prompt_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repeat_penalty_counts_each_token_once_and_greedy_keeps_the_first_maximum() {
        let recent: std::collections::VecDeque<LlamaToken> =
            [1, 3, 1, 1].into_iter().map(LlamaToken).collect();
        let mut logits = vec![0.5, 2.2, 0.0, -1.0, 9.0];
        penalize(&mut logits, &recent, 1.1);
        assert_eq!(logits, vec![0.5, 2.2 / 1.1, 0.0, -1.1, 9.0]);
        let mut same = logits.clone();
        penalize(&mut same, &recent, 1.0);
        assert_eq!(same, logits);
        assert_eq!(first_max(&[1.0, 3.0, 3.0, 2.0]), Some(1));
        assert_eq!(first_max(&[]), None);
    }

    #[test]
    fn triggers_are_escaped_for_the_regex() {
        assert_eq!(regex_escape("<tool_call>"), "<tool_call>");
        assert_eq!(regex_escape("[TOOL_CALLS]"), "\\[TOOL_CALLS\\]");
        assert_eq!(regex_escape("a.b*"), "a\\.b\\*");
    }

    #[test]
    fn stop_prefixes_are_held_back() {
        let stops = vec!["</s>".to_owned(), "END".to_owned()];
        assert_eq!(held_back("hello </", &stops), 2);
        assert_eq!(held_back("hello E", &stops), 1);
        assert_eq!(held_back("hello", &stops), 0);
    }
}
