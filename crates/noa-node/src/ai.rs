//! The inference engine on the bus: requests on `ai.infer` (queue group `ai`) are chat completions, so agents
//! and workflows use models by name without HTTP.
//!
//! Request: `{"model"?: "smollm2", "messages"?: [{"role","content"}], "prompt"?: "...", "system"?: "...",
//! "max_tokens"?, "temperature"?, "top_p"?, "top_k"?, "min_p"?, "seed"?, "stop"?: [..]}` (a `prompt` is one user
//! message). Reply: `{"model", "text", "usage": {...}}`, or `{"error": "..."}` with a `noa-error` header.

use noa_bus::{Bus, Message};
use noa_infer::{ChatMessage, Engine, GenerateParams};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Reads the API keys of remote models from the secret store, as the node (each read is audited). A key is
/// kept for a minute, so a busy remote model does not fill the audit log with one read per request (so a
/// changed key takes up to a minute to be used). Failed reads are not kept: each is audited.
pub fn key_source(store: noa_store::Store) -> noa_infer::KeySource {
    type Cache = HashMap<String, (String, Instant)>;
    let cache: Arc<Mutex<Cache>> = Arc::default();
    Arc::new(move |secret: &str, model: &str| {
        if let Some((key, at)) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(secret)
            && at.elapsed() < Duration::from_secs(60)
        {
            return Ok(key.clone());
        }
        let bytes = store
            .secret_read(
                "node",
                secret,
                &format!("the API key of the remote model {model}"),
            )
            .map_err(|e| e.to_string())?;
        let key = String::from_utf8(bytes)
            .map_err(|_| format!("the secret {secret} is not UTF-8 text"))?
            .trim()
            .to_owned();
        cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(secret.to_owned(), (key.clone(), Instant::now()));
        Ok(key)
    })
}

/// The subject the engine answers on.
pub const SUBJECT: &str = "ai.infer";

/// The model used when a request names none.
pub const DEFAULT_MODEL: &str = "smollm2";

fn parse(v: &Value) -> Result<(String, Vec<ChatMessage>, GenerateParams), String> {
    let model = v
        .get("model")
        .map(|m| {
            m.as_str()
                .map(str::to_owned)
                .ok_or("model must be a string")
        })
        .transpose()?
        .unwrap_or_else(|| DEFAULT_MODEL.to_owned());
    let mut messages = Vec::new();
    if let Some(s) = v.get("system") {
        let s = s.as_str().ok_or("system must be a string")?;
        messages.push(ChatMessage {
            role: "system".into(),
            content: s.into(),
        });
    }
    if let Some(list) = v.get("messages") {
        for (i, m) in list
            .as_array()
            .ok_or("messages must be an array")?
            .iter()
            .enumerate()
        {
            let role = m["role"]
                .as_str()
                .ok_or(format!("messages[{i}].role must be a string"))?;
            let content = m["content"]
                .as_str()
                .ok_or(format!("messages[{i}].content must be a string"))?;
            messages.push(ChatMessage {
                role: role.into(),
                content: content.into(),
            });
        }
    }
    if let Some(p) = v.get("prompt") {
        messages.push(ChatMessage {
            role: "user".into(),
            content: p.as_str().ok_or("prompt must be a string")?.into(),
        });
    }
    let mut params = GenerateParams::default();
    let num = |k: &str| v.get(k).and_then(Value::as_f64);
    if let Some(m) = v.get("max_tokens") {
        params.max_tokens =
            m.as_u64()
                .filter(|m| (1..=32_768).contains(m))
                .ok_or("max_tokens must be a whole number from 1 to 32768")? as u32;
    }
    if let Some(t) = num("temperature") {
        params.temperature = t as f32;
    }
    if let Some(t) = num("top_p") {
        params.top_p = t as f32;
    }
    if let Some(t) = num("min_p") {
        params.min_p = t as f32;
    }
    if let Some(t) = v.get("top_k").and_then(Value::as_i64) {
        params.top_k = t as i32;
    }
    if let Some(s) = v.get("seed").and_then(Value::as_u64) {
        params.seed = s as u32;
    }
    if let Some(stop) = v.get("stop") {
        params.stop = stop
            .as_array()
            .ok_or("stop must be an array of strings")?
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_owned)
                    .ok_or("stop must be an array of strings")
            })
            .collect::<Result<_, _>>()?;
    }
    Ok((model, messages, params))
}

/// The subject embeddings are answered on: `{"model"?, "input": "text" | ["text", ...]}` →
/// `{"model", "embeddings": [[f32, ...], ...], "usage": {"prompt_tokens"}}`.
pub const EMBED_SUBJECT: &str = "ai.embed";

fn parse_embed(v: &Value) -> Result<(String, Vec<String>), String> {
    let model = match v.get("model") {
        Some(m) => m.as_str().ok_or("model must be a string")?.to_owned(),
        None => DEFAULT_MODEL.to_owned(),
    };
    let inputs = match v.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .ok_or("input must hold only strings")
            })
            .collect::<Result<_, _>>()?,
        _ => return Err("input must be a string or a list of strings".into()),
    };
    Ok((model, inputs))
}

/// Answers `ai.embed` until the bus closes.
pub fn serve_embeddings(bus: Bus, engine: Engine) -> Result<(), noa_bus::Error> {
    answer_on(bus, EMBED_SUBJECT, move |v| {
        let engine = engine.clone();
        async move {
            let (model, inputs) = parse_embed(&v)?;
            let e = engine
                .embed(&model, inputs)
                .await
                .map_err(|e| e.to_string())?;
            Ok(
                json!({ "model": model, "embeddings": e.vectors, "usage": { "prompt_tokens": e.prompt_tokens } }),
            )
        }
    })
}

/// Answers `ai.infer` until the bus closes.
pub fn serve(bus: Bus, engine: Engine) -> Result<(), noa_bus::Error> {
    answer_on(bus, SUBJECT, move |v| {
        let engine = engine.clone();
        async move {
            let (model, messages, params) = parse(&v)?;
            let (text, usage) = engine
                .chat_text(&model, messages, params)
                .await
                .map_err(|e| e.to_string())?;
            Ok(json!({ "model": model, "text": text, "usage": usage }))
        }
    })
}

/// Answers JSON requests on `subject` (queue group `ai`) with `handle`, each in its own task: the result as
/// JSON, or `{"error": "..."}` with a `noa-error` header.
fn answer_on<F, Fut>(bus: Bus, subject: &str, handle: F) -> Result<(), noa_bus::Error>
where
    F: Fn(Value) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Value, String>> + Send + 'static,
{
    let mut sub = bus.subscribe(subject, Some("ai"), 256)?;
    tokio::spawn(async move {
        while let Some(msg) = sub.recv().await {
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            let bus = bus.clone();
            let request: Result<Value, String> = serde_json::from_slice(&msg.payload)
                .map_err(|e| format!("the request is not JSON: {e}"));
            let work = request.map(&handle);
            tokio::spawn(async move {
                let outcome = match work {
                    Ok(fut) => fut.await,
                    Err(e) => Err(e),
                };
                let answer = match outcome {
                    Ok(v) => Message::new(reply, v.to_string()),
                    Err(e) => {
                        let m = Message::new(reply, json!({ "error": e }).to_string());
                        let header = e.replace(['\r', '\n'], " ");
                        m.clone()
                            .with_headers([("noa-error".to_string(), header)].into())
                            .unwrap_or(m)
                    }
                };
                let _ = bus.publish(answer);
            });
        }
    });
    Ok(())
}
