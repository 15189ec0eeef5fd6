//! The OpenAI-compatible API at `/v1`: models and chat completions (streamed as Server-Sent Events or whole),
//! with OpenAI-shaped errors, over the local engine. Also the model manager's REST (`/api/v1/models/...`).

use crate::AppState;
use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use noa_infer::{ChatMessage, Engine, Event, GenerateParams};
use noa_policy::{Action, Principal, Resource};
use serde::Deserialize;
use serde_json::{Value, json};

/// An error in OpenAI's shape: `{"error":{"message","type","param","code"}}`.
#[derive(Debug)]
pub struct OpenAiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    param: Option<String>,
    message: String,
}

impl OpenAiError {
    fn bad(param: Option<&str>, message: impl Into<String>) -> Self {
        OpenAiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: "invalid_value",
            param: param.map(str::to_owned),
            message: message.into(),
        }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "error": {
                "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })),
        )
            .into_response()
    }
}

impl From<noa_infer::Error> for OpenAiError {
    fn from(e: noa_infer::Error) -> Self {
        use noa_infer::Error as I;
        let (status, kind, code) = match &e {
            I::UnknownModel { .. } | I::BadName { .. } => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
            ),
            I::BadRequest(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_value",
            ),
            I::Busy { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "model_busy",
            ),
            I::Load { .. } | I::BadModel { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "server_error",
                "model_load_failed",
            ),
            // The remote's verdict on the request itself passes through; its key or its failure is ours (502).
            I::Remote {
                status: Some(s @ (400 | 404 | 409 | 413 | 422 | 429)),
                ..
            } => (
                StatusCode::from_u16(*s).unwrap_or(StatusCode::BAD_GATEWAY),
                if *s == 429 {
                    "rate_limit_error"
                } else {
                    "invalid_request_error"
                },
                "remote_rejected",
            ),
            I::Remote { .. } => (StatusCode::BAD_GATEWAY, "server_error", "remote_failed"),
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
            ),
        };
        OpenAiError {
            status,
            kind,
            code,
            param: matches!(e, I::UnknownModel { .. }).then(|| "model".to_owned()),
            message: e.to_string(),
        }
    }
}

impl From<noa_kernel::Error> for OpenAiError {
    fn from(e: noa_kernel::Error) -> Self {
        let api = crate::ApiError::from(e);
        OpenAiError {
            status: api.status,
            kind: if api.status == StatusCode::FORBIDDEN {
                "permission_error"
            } else {
                "server_error"
            },
            code: "noa_error",
            param: None,
            message: api.message,
        }
    }
}

/// What a request for a model says before it is read in full: which model, and whether to stream.
enum Body<T> {
    /// A remote model's request, to be sent on as it came (the remote judges the rest).
    Remote(noa_infer::RemoteModel, Value, bool),
    Local(T),
}

/// Reads a JSON request body of a principal that may ask the models. A remote model's request is kept as it
/// came; any other is read into its typed form, with an error that names the field
/// (`messages[0].role: invalid type ...`).
fn parse_body<T: serde::de::DeserializeOwned>(
    state: &AppState,
    p: &Principal,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Body<T>, OpenAiError> {
    let Json(raw) = body.map_err(|e| OpenAiError::bad(None, e.body_text()))?;
    if !raw.is_object() {
        return Err(OpenAiError::bad(None, "the body must be a JSON object"));
    }
    let model = raw["model"]
        .as_str()
        .ok_or_else(|| OpenAiError::bad(Some("model"), "model must be a string"))?;
    if let Some(remote) = engine(state)?.remote(model)? {
        may_ask_models(state, p)?;
        let stream = match &raw["stream"] {
            Value::Null => false,
            Value::Bool(b) => *b,
            _ => {
                return Err(OpenAiError::bad(
                    Some("stream"),
                    "stream must be true or false",
                ));
            }
        };
        return Ok(Body::Remote(remote, raw, stream));
    }
    let req = serde_path_to_error::deserialize(&raw).map_err(|e| {
        let path = e.path().to_string();
        let param = (path != ".").then_some(path.as_str());
        OpenAiError::bad(param, format!("{path}: {}", e.inner()))
    })?;
    may_ask_models(state, p)?;
    Ok(Body::Local(req))
}

/// Sends a chat or completion request for a remote model on as it came, and its answer back as it comes, under
/// the model's NOA name. Usage is counted from the remote's own figures.
async fn proxy(
    state: &AppState,
    who: String,
    remote: noa_infer::RemoteModel,
    path: &'static str,
    mut raw: Value,
    stream: bool,
) -> Result<Response, OpenAiError> {
    let name = remote.name.clone();
    let started = std::time::Instant::now();
    let usage = move |u: &Value, ttft: Option<std::time::Duration>| {
        let count = |k: &str| u[k].as_u64().unwrap_or(0) as u32;
        noa_infer::Usage::measured(
            count("prompt_tokens"),
            count("completion_tokens"),
            String::new(),
            started.elapsed(),
            ttft,
            0,
        )
    };
    // Usage is asked for so it can be counted; a client that did not ask for it does not get it.
    let client_wants_usage = raw["stream_options"]["include_usage"].as_bool() == Some(true);
    if stream {
        raw["stream_options"] = json!({ "include_usage": true });
    }
    let reply = engine(state)?
        .remote_request(&remote, path, raw, stream)
        .await?;
    match reply {
        noa_infer::Reply::Json(mut v) => {
            v["model"] = json!(name);
            state.http.record_usage(&who, &usage(&v["usage"], None));
            Ok(Json(v).into_response())
        }
        noa_infer::Reply::Stream(rx) => {
            use futures_util::StreamExt;
            let http = state.http.clone();
            let mut ttft = None;
            let chunks = tokio_stream::wrappers::ReceiverStream::new(rx).filter_map(move |item| {
                let out = match item {
                    Ok(mut chunk) => {
                        chunk["model"] = json!(name);
                        if chunk["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                            ttft.get_or_insert_with(|| started.elapsed());
                        }
                        let counted = chunk.get("usage").is_some_and(Value::is_object);
                        if counted {
                            http.record_usage(&who, &usage(&chunk["usage"], ttft));
                        }
                        if counted && !client_wants_usage {
                            if chunk["choices"].as_array().is_none_or(|c| c.is_empty()) {
                                None
                            } else {
                                chunk.as_object_mut().map(|o| o.remove("usage"));
                                Some(chunk.to_string())
                            }
                        } else {
                            Some(chunk.to_string())
                        }
                    }
                    Err(e) => Some(
                        json!({ "error": { "message": e, "type": "server_error", "code": "remote_failed" } })
                            .to_string(),
                    ),
                };
                std::future::ready(out.map(|d| Ok::<_, std::convert::Infallible>(SseEvent::default().data(d))))
            });
            let done = futures_util::stream::once(std::future::ready(Ok(
                SseEvent::default().data("[DONE]")
            )));
            Ok(Sse::new(chunks.chain(done))
                .keep_alive(KeepAlive::default())
                .into_response())
        }
    }
}

/// The models are asked as `ai.infer` is on the bus: the same policy decides for HTTP and bus callers.
fn may_ask_models(state: &AppState, p: &Principal) -> Result<(), OpenAiError> {
    state.kernel.authorize(
        p,
        Action::Request,
        &Resource::Subject("ai.infer".into()),
        false,
    )?;
    Ok(())
}

fn engine(state: &AppState) -> Result<&Engine, OpenAiError> {
    state.engine.as_ref().ok_or(OpenAiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "server_error",
        code: "no_engine",
        param: None,
        message: "this node runs no inference engine".into(),
    })
}

pub async fn models(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Value>, OpenAiError> {
    state
        .kernel
        .authorize(&p, Action::Read, &Resource::System, false)?;
    let store = engine(&state)?.store();
    let data: Vec<Value> = store
        .list()?
        .iter()
        .map(|m| json!({ "id": m.name, "object": "model", "created": m.added_ms / 1000, "owned_by": "noa" }))
        .chain(store.remotes()?.iter().map(|m| {
            json!({ "id": m.name, "object": "model", "created": m.added_ms / 1000, "owned_by": "remote" })
        }))
        .collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    /// An assistant message's earlier tool calls (OpenAI shape).
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields NOA uses; others that OpenAI clients send are accepted and ignored.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// Functions the model may call: `[{"type": "function", "function": {"name", "description", "parameters"}}]`.
    #[serde(default)]
    tools: Option<Vec<Value>>,
    /// `"auto"` (default), `"none"`, `"required"`, or `{"type": "function", "function": {"name"}}`.
    #[serde(default)]
    tool_choice: Option<Value>,
    /// `false`: at most one call per answer.
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    sampling: Sampling,
}

/// `POST /v1/completions`: a prompt completed as it is, without the chat template.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    model: String,
    prompt: String,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    sampling: Sampling,
}

/// Sampling and output settings shared by both endpoints.
#[derive(Debug, Deserialize)]
pub struct Sampling {
    #[serde(default, alias = "max_completion_tokens")]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<i32>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    repeat_penalty: Option<f32>,
    #[serde(default)]
    seed: Option<u32>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    response_format: Option<Value>,
    /// A NOA extension: a GBNF grammar (root rule `root`) the answer must follow.
    #[serde(default)]
    grammar: Option<String>,
}

/// Most tokens one request may ask for.
const MAX_TOKENS_LIMIT: u32 = 32_768;

fn params(r: &Sampling) -> Result<GenerateParams, OpenAiError> {
    let mut p = GenerateParams::default();
    if let Some(m) = r.max_tokens {
        if m == 0 || m > MAX_TOKENS_LIMIT {
            return Err(OpenAiError::bad(
                Some("max_tokens"),
                format!("max_tokens must be from 1 to {MAX_TOKENS_LIMIT}, not {m}"),
            ));
        }
        p.max_tokens = m;
    }
    if let Some(t) = r.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(OpenAiError::bad(
                Some("temperature"),
                "temperature must be from 0 to 2",
            ));
        }
        p.temperature = t;
    }
    if let Some(v) = r.top_p {
        if !(0.0..=1.0).contains(&v) {
            return Err(OpenAiError::bad(Some("top_p"), "top_p must be from 0 to 1"));
        }
        p.top_p = v;
    }
    if let Some(v) = r.min_p {
        if !(0.0..=1.0).contains(&v) {
            return Err(OpenAiError::bad(Some("min_p"), "min_p must be from 0 to 1"));
        }
        p.min_p = v;
    }
    if let Some(v) = r.top_k {
        p.top_k = v.max(1);
    }
    if let Some(v) = r.repeat_penalty {
        p.repeat_penalty = v;
    }
    if let Some(s) = r.seed {
        p.seed = s;
    }
    p.stop = match &r.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if p.stop.len() > 4 {
        return Err(OpenAiError::bad(Some("stop"), "at most 4 stop sequences"));
    }
    p.grammar =
        match (&r.response_format, &r.grammar) {
            (Some(_), Some(_)) => {
                return Err(OpenAiError::bad(
                    Some("grammar"),
                    "give response_format or grammar, not both",
                ));
            }
            (None, g) => g.clone(),
            (Some(f), None) => match f["type"].as_str() {
                Some("text") => None,
                Some("json_object") => Some(noa_infer::grammar::JSON_OBJECT.to_owned()),
                Some("json_schema") => {
                    let schema = f["json_schema"].get("schema").ok_or_else(|| {
                        OpenAiError::bad(
                            Some("response_format.json_schema.schema"),
                            "a json_schema response format needs json_schema.schema",
                        )
                    })?;
                    Some(noa_infer::grammar::from_json_schema(schema).map_err(|e| {
                        OpenAiError::bad(Some("response_format.json_schema.schema"), e)
                    })?)
                }
                _ => {
                    return Err(OpenAiError::bad(
                        Some("response_format.type"),
                        "response_format.type must be text, json_object or json_schema",
                    ));
                }
            },
        };
    if r.n.is_some_and(|n| n != 1) {
        return Err(OpenAiError::bad(Some("n"), "only n = 1 is supported"));
    }
    Ok(p)
}

/// `tags`: earlier tool calls are written as the model writes them, in `<tool_call>` tags (see [`tool_mode`]).
fn messages(r: &ChatRequest, tags: bool) -> Result<Vec<ChatMessage>, OpenAiError> {
    if r.messages.is_empty() {
        return Err(OpenAiError::bad(
            Some("messages"),
            "messages must not be empty",
        ));
    }
    r.messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !matches!(
                m.role.as_str(),
                "system" | "user" | "assistant" | "tool" | "developer"
            ) {
                return Err(OpenAiError::bad(
                    Some(&format!("messages[{i}].role")),
                    format!("unknown role {:?}", m.role),
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => parts
                    .iter()
                    .filter(|p| p.kind == "text")
                    .filter_map(|p| p.text.clone())
                    .collect::<Vec<_>>()
                    .join(""),
            };
            let role = if m.role == "developer" {
                "system".into()
            } else {
                m.role.clone()
            };
            // Earlier tool calls are shown to the model in the form it is asked to write them in.
            let content = match &m.tool_calls {
                Some(calls) if !calls.is_empty() => {
                    let calls: Vec<Value> = calls
                        .iter()
                        .map(|c| {
                            let args = c["function"]["arguments"]
                                .as_str()
                                .and_then(|a| serde_json::from_str::<Value>(a).ok())
                                .unwrap_or(json!({}));
                            json!({ "name": c["function"]["name"], "arguments": args })
                        })
                        .collect();
                    if tags {
                        // What the model said before its calls, then the calls, as it wrote them.
                        let said = content.trim();
                        calls
                            .iter()
                            .map(|c| format!("<tool_call>\n{c}\n</tool_call>"))
                            .fold(said.to_owned(), |acc, t| {
                                if acc.is_empty() {
                                    t
                                } else {
                                    format!("{acc}\n{t}")
                                }
                            })
                    } else {
                        json!({ "tool_calls": calls }).to_string()
                    }
                }
                _ => content,
            };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

/// Which OpenAI object an answer is.
#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Text,
}

impl Kind {
    fn id(self) -> String {
        let mut b = [0u8; 12];
        let _ = getrandom::fill(&mut b);
        let prefix = match self {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        };
        format!(
            "{prefix}-{}",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        )
    }

    fn object(self, streaming: bool) -> &'static str {
        match (self, streaming) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    /// The one choice of an answer or chunk; `text` is `None` in the final chunk of a stream.
    fn choice(self, text: Option<&str>, finish: Option<&str>, streaming: bool) -> Value {
        match (self, streaming) {
            (Kind::Chat, false) => json!({ "index": 0, "finish_reason": finish,
                "message": { "role": "assistant", "content": text.unwrap_or_default() } }),
            (Kind::Chat, true) => json!({ "index": 0, "finish_reason": finish,
                "delta": text.map(|t| json!({ "role": "assistant", "content": t })).unwrap_or(json!({})) }),
            (Kind::Text, _) => json!({ "index": 0, "finish_reason": finish, "logprobs": null,
                "text": text.unwrap_or_default() }),
        }
    }
}

fn usage_json(u: &noa_infer::Usage) -> Value {
    json!({ "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": { "cached_tokens": u.cached_tokens } })
}

/// Answers from the engine's events: one JSON object, or Server-Sent Events chunks ending in `[DONE]`.
async fn respond(
    state: &AppState,
    who: String,
    model: String,
    mut rx: tokio::sync::mpsc::Receiver<Event>,
    kind: Kind,
    stream: bool,
    include_usage: bool,
) -> Result<Response, OpenAiError> {
    let id = kind.id();
    let created = noa_types::now_ms() / 1000;
    if !stream {
        let mut text = String::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Text(t) => text.push_str(&t),
                Event::Done(u) => {
                    state.http.record_usage(&who, &u);
                    return Ok(Json(json!({
                        "id": id, "object": kind.object(false), "created": created, "model": model,
                        "choices": [kind.choice(Some(&text), Some(&u.finish_reason), false)],
                        "usage": usage_json(&u),
                    }))
                    .into_response());
                }
                Event::Error(e) => return Err(generation_error(e)),
            }
        }
        return Err(generation_error(
            "the model stopped without finishing".into(),
        ));
    }
    // The first event decides between an error response and a stream.
    let first = rx.recv().await;
    if let Some(Event::Error(e)) = first {
        return Err(generation_error(e));
    }
    let http = state.http.clone();
    let chunk = move |text: Option<&str>, finish: Option<&str>| {
        json!({ "id": id, "object": kind.object(true), "created": created, "model": model,
                "choices": [kind.choice(text, finish, true)] })
    };
    let events = async_stream(first, rx, move |ev| match ev {
        Event::Text(t) => vec![chunk(Some(&t), None).to_string()],
        Event::Done(u) => {
            http.record_usage(&who, &u);
            let mut last = chunk(None, Some(&u.finish_reason));
            if include_usage {
                last["usage"] = usage_json(&u);
            }
            vec![last.to_string(), "[DONE]".to_owned()]
        }
        Event::Error(e) => {
            vec![json!({ "error": { "message": e, "type": "server_error" } }).to_string()]
        }
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, OpenAiError> {
    let req: ChatRequest = match parse_body(&state, &p, body)? {
        Body::Remote(remote, raw, stream) => {
            return proxy(&state, p.id(), remote, "chat/completions", raw, stream).await;
        }
        Body::Local(req) => req,
    };
    let mut params = params(&req.sampling)?;
    // A model whose chat template lays out tools gets them in its own format, from the template; one that asks
    // for calls in `<tool_call>` tags answers in them.
    let has_tools = req.tools.as_ref().is_some_and(|t| !t.is_empty());
    let layout = if has_tools {
        engine(&state)?.template_tools(&req.model)
    } else {
        noa_infer::TemplateTools::None
    };
    let by_template = layout != noa_infer::TemplateTools::None;
    let tags = layout == noa_infer::TemplateTools::Tags;
    let mut msgs = messages(&req, tags)?;
    let tools = tool_mode(&req, tags)?;
    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    if let Some(tools) = tools {
        if params.grammar.is_some() {
            return Err(OpenAiError::bad(
                Some("tools"),
                "tools cannot be combined with response_format or grammar",
            ));
        }
        params.grammar = Some(tools.grammar.clone());
        if by_template {
            params.tools = req.tools.clone().map(Value::Array);
        }
        if tags {
            // The template tells the model how to call; when a call is optional the grammar holds only from
            // `<tool_call>` on, so the model may answer in prose instead.
            if !tools.required {
                params.grammar_trigger = Some("<tool_call>".into());
            }
        } else {
            let instructions = tools.instructions(by_template);
            match msgs.first_mut() {
                Some(m) if m.role == "system" => {
                    m.content = format!("{}\n\n{instructions}", m.content);
                }
                _ => msgs.insert(
                    0,
                    ChatMessage {
                        role: "system".into(),
                        content: instructions,
                    },
                ),
            }
        }
        let rx = engine(&state)?.chat(&req.model, msgs, params)?;
        return respond_tools(
            &state,
            p.id(),
            req.model,
            rx,
            req.stream,
            include_usage,
            tags,
        )
        .await;
    }
    let rx = engine(&state)?.chat(&req.model, msgs, params)?;
    respond(
        &state,
        p.id(),
        req.model,
        rx,
        Kind::Chat,
        req.stream,
        include_usage,
    )
    .await
}

/// The tools of a request, and the grammar that makes the model answer with a call or a message.
struct Tools {
    /// (name, description, parameters schema)
    functions: Vec<(String, String, Value)>,
    /// Whether the model must call a tool (`required` or a named function).
    required: bool,
    grammar: String,
}

impl Tools {
    /// What the model is told: the tools (unless its chat template lays them out itself) and the answer's shape,
    /// which the grammar holds it to.
    fn instructions(&self, listed_by_template: bool) -> String {
        let mut s = String::new();
        if !listed_by_template {
            s.push_str("You can call these tools:\n");
            for (name, description, params) in &self.functions {
                s.push_str(&format!(
                    "- {name}: {description} Arguments (JSON schema): {params}\n"
                ));
            }
        }
        s.push_str(
            "To call tools, reply with only JSON: {\"tool_calls\": [{\"name\": \"<tool>\", \"arguments\": {...}}]}.",
        );
        if !self.required {
            s.push_str(" To answer without a tool, reply with only JSON: {\"content\": \"<your answer>\"}.");
        }
        s
    }
}

/// The tool mode of a chat request: `None` without tools or with `tool_choice: "none"`. With `tags`, the
/// grammar is that of calls in `<tool_call>` tags, one JSON object `{"name", "arguments"}` in each (the Hermes
/// format that Qwen, Hermes, SmolLM3 and others are trained on); it starts at the first tag, so when a call is
/// optional it is used lazily (see `chat_completions`).
fn tool_mode(req: &ChatRequest, tags: bool) -> Result<Option<Tools>, OpenAiError> {
    let Some(tools) = req.tools.as_ref().filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let mut functions = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        let at = |k: &str| format!("tools[{i}].{k}");
        if t["type"] != "function" {
            return Err(OpenAiError::bad(
                Some(&at("type")),
                "only function tools are supported",
            ));
        }
        let f = &t["function"];
        let name = f["name"].as_str().filter(|n| {
            !n.is_empty()
                && n.len() <= 64
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
        let Some(name) = name else {
            return Err(OpenAiError::bad(
                Some(&at("function.name")),
                "a function name is 1 to 64 letters, digits, _ and -",
            ));
        };
        let params = match f.get("parameters") {
            None | Some(Value::Null) => json!({ "type": "object", "properties": {} }),
            Some(p) if p.is_object() => p.clone(),
            Some(_) => {
                return Err(OpenAiError::bad(
                    Some(&at("function.parameters")),
                    "parameters must be a JSON schema object",
                ));
            }
        };
        functions.push((
            name.to_owned(),
            f["description"].as_str().unwrap_or("").to_owned(),
            params,
        ));
    }
    let (required, only) = match &req.tool_choice {
        None => (false, None),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => (false, None),
            "none" => return Ok(None),
            "required" => (true, None),
            other => {
                return Err(OpenAiError::bad(
                    Some("tool_choice"),
                    format!("tool_choice {other:?} is not auto, none or required"),
                ));
            }
        },
        Some(v) => match v["function"]["name"].as_str() {
            Some(n) if functions.iter().any(|f| f.0 == n) => (true, Some(n.to_owned())),
            _ => {
                return Err(OpenAiError::bad(
                    Some("tool_choice"),
                    "tool_choice names a function that is not in tools",
                ));
            }
        },
    };
    let calls: Vec<Value> = functions
        .iter()
        .filter(|f| only.as_ref().is_none_or(|o| *o == f.0))
        .map(|(name, _, params)| {
            json!({ "type": "object", "properties": { "name": { "const": name }, "arguments": params } })
        })
        .collect();
    // One call's grammar from the schemas; the list around it is written here so that it holds at least one call.
    let call = noa_infer::grammar::from_json_schema(&json!({ "oneOf": calls })).map_err(|e| {
        OpenAiError::bad(
            Some("tools"),
            format!("a tool's parameters cannot be enforced: {e}"),
        )
    })?;
    // Compact JSON: whitespace costs a small model tokens and invites rambling.
    let call = call.replacen("root ::=", "call ::=", 1).replace(
        r#"ws      ::= | " " | "\n" [ \t]{0,20}"#,
        r#"ws      ::= | " ""#,
    );
    if tags {
        let block = r#""<tool_call>\n" call "\n</tool_call>""#;
        let root = if req.parallel_tool_calls == Some(false) {
            format!("root ::= {block}")
        } else {
            format!("root ::= {block} ( \"\\n\" {block} )*")
        };
        return Ok(Some(Tools {
            functions,
            required,
            grammar: format!("{root}\n{call}"),
        }));
    }
    let list = if req.parallel_tool_calls == Some(false) {
        r#""{" ws "\"tool_calls\"" ws ":" ws "[" ws call "]" ws "}" ws"#
    } else {
        r#""{" ws "\"tool_calls\"" ws ":" ws "[" ws call ( "," ws call )* "]" ws "}" ws"#
    };
    let message = r#""{" ws "\"content\"" ws ":" ws string "}" ws"#;
    let grammar = if required {
        format!("root ::= ws {list}\n{call}")
    } else {
        format!("root ::= ws ( {list} | {message} )\n{call}")
    };
    Ok(Some(Tools {
        functions,
        required,
        grammar,
    }))
}

/// The `<tool_call>` blocks of a tag-format answer, as `{"name", "arguments"}` objects, and the text outside
/// them. A block whose JSON does not parse (possible only where the grammar was lazy and never triggered) stays
/// in the text.
fn tagged_calls(text: &str) -> (Vec<Value>, String) {
    let mut calls = Vec::new();
    let mut rest = String::new();
    let mut at = text;
    while let Some(start) = at.find("<tool_call>") {
        rest.push_str(&at[..start]);
        let body_from = start + "<tool_call>".len();
        let Some(len) = at[body_from..].find("</tool_call>") else {
            at = &at[start..];
            break;
        };
        let body = &at[body_from..body_from + len];
        let end = body_from + len + "</tool_call>".len();
        match serde_json::from_str::<Value>(body.trim()) {
            Ok(v) if v["name"].is_string() => calls.push(json!({
                "name": v["name"],
                "arguments": if v["arguments"].is_null() { json!({}) } else { v["arguments"].clone() },
            })),
            _ => rest.push_str(&at[start..end]),
        }
        at = &at[end..];
    }
    rest.push_str(at);
    (calls, rest)
}

/// Answers a request with tools: the whole answer is generated (under the tools grammar), then read as tool
/// calls or a message; a stream gets it as one delta.
async fn respond_tools(
    state: &AppState,
    who: String,
    model: String,
    mut rx: tokio::sync::mpsc::Receiver<Event>,
    stream: bool,
    include_usage: bool,
    tags: bool,
) -> Result<Response, OpenAiError> {
    let mut text = String::new();
    let usage = loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done(u)) => break u,
            Some(Event::Error(e)) => return Err(generation_error(e)),
            None => {
                return Err(generation_error(
                    "the model stopped without finishing".into(),
                ));
            }
        }
    };
    state.http.record_usage(&who, &usage);
    let (parsed, tagged) = if tags {
        let (calls, rest) = tagged_calls(&text);
        let content = (!rest.trim().is_empty()).then(|| rest.trim().to_owned());
        (
            Some(json!({ "tool_calls": calls, "content": content })),
            true,
        )
    } else {
        (serde_json::from_str::<Value>(&text).ok(), false)
    };
    let calls: Vec<Value> = parsed
        .as_ref()
        .and_then(|v| v["tool_calls"].as_array())
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| {
            json!({ "index": i, "id": Kind::Chat.id().replace("chatcmpl", "call"), "type": "function",
                    "function": { "name": c["name"], "arguments": c["arguments"].to_string() } })
        })
        .collect();
    let (message, finish) = if !calls.is_empty() {
        // Prose the model wrote before its calls (tag format) is kept as the message's content.
        let said = parsed
            .as_ref()
            .filter(|_| tagged)
            .and_then(|v| v["content"].as_str().map(str::to_owned));
        (
            json!({ "role": "assistant", "content": said, "tool_calls": calls }),
            "tool_calls".to_owned(),
        )
    } else {
        let content = parsed
            .as_ref()
            .and_then(|v| v["content"].as_str().map(str::to_owned))
            .unwrap_or(text);
        (
            json!({ "role": "assistant", "content": content }),
            usage.finish_reason.clone(),
        )
    };
    let id = Kind::Chat.id();
    let created = noa_types::now_ms() / 1000;
    if !stream {
        return Ok(Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{ "index": 0, "finish_reason": finish, "message": message }],
            "usage": usage_json(&usage),
        }))
        .into_response());
    }
    let head = json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{ "index": 0, "finish_reason": null, "delta": message }] });
    let mut last = json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{ "index": 0, "finish_reason": finish, "delta": {} }] });
    if include_usage {
        last["usage"] = usage_json(&usage);
    }
    let events = [head.to_string(), last.to_string(), "[DONE]".to_owned()]
        .into_iter()
        .map(|d| Ok::<_, std::convert::Infallible>(SseEvent::default().data(d)));
    Ok(Sse::new(futures_util::stream::iter(events)).into_response())
}

/// Turns engine events into SSE events; when the client goes away the stream, and with it the receiver,
/// is dropped, and the engine stops generating at its next token.
fn async_stream(
    first: Option<Event>,
    rx: tokio::sync::mpsc::Receiver<Event>,
    render: impl Fn(Event) -> Vec<String> + Send + 'static,
) -> impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>> + Send {
    use futures_util::StreamExt;
    let head = futures_util::stream::iter(first);
    let tail = tokio_stream::wrappers::ReceiverStream::new(rx);
    head.chain(tail).flat_map(move |ev| {
        futures_util::stream::iter(
            render(ev)
                .into_iter()
                .map(|d| Ok(SseEvent::default().data(d))),
        )
    })
}

pub async fn completions(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, OpenAiError> {
    let req: CompletionRequest = match parse_body(&state, &p, body)? {
        Body::Remote(remote, raw, stream) => {
            return proxy(&state, p.id(), remote, "completions", raw, stream).await;
        }
        Body::Local(req) => req,
    };
    let mut params = params(&req.sampling)?;
    // OpenAI's default for plain completions.
    if req.sampling.max_tokens.is_none() {
        params.max_tokens = 16;
    }
    if req.prompt.is_empty() {
        return Err(OpenAiError::bad(Some("prompt"), "prompt must not be empty"));
    }
    let rx = engine(&state)?.complete(&req.model, req.prompt, params)?;
    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    respond(
        &state,
        p.id(),
        req.model,
        rx,
        Kind::Text,
        req.stream,
        include_usage,
    )
    .await
}

fn generation_error(e: String) -> OpenAiError {
    if let Some(m) = e.strip_prefix("GRAMMAR ") {
        return OpenAiError::bad(Some("grammar"), m);
    }
    if let Some(m) = e.strip_prefix("NOTCHAT ") {
        return OpenAiError::bad(Some("model"), m);
    }
    if let Some(m) = e.strip_prefix("REMOTE ") {
        return OpenAiError {
            status: StatusCode::BAD_GATEWAY,
            kind: "server_error",
            code: "remote_failed",
            param: None,
            message: m.to_owned(),
        };
    }
    match e.strip_prefix("CONTEXT ") {
        Some(m) => OpenAiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: "context_length_exceeded",
            param: Some("messages".into()),
            message: m.to_owned(),
        },
        None => OpenAiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            code: "generation_failed",
            param: None,
            message: e,
        },
    }
}

/// `POST /v1/embeddings`: `input` is a text or a list of texts; `encoding_format` `float` (default) or `base64`
/// (little-endian f32, as the official clients ask for).
#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    model: String,
    input: Value,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u64>,
    /// OpenAI's end-user id; accepted and not used.
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

pub async fn embeddings(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: Result<Json<EmbeddingRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, OpenAiError> {
    let Json(req) = body.map_err(|e| OpenAiError::bad(None, e.body_text()))?;
    may_ask_models(&state, &p)?;
    let inputs: Vec<String> = match &req.input {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_string) => items
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .collect(),
        Value::Array(items) if items.iter().any(|v| v.is_number() || v.is_array()) => {
            return Err(OpenAiError::bad(
                Some("input"),
                "token-id input is not supported; send the text (a string or a list of strings)",
            ));
        }
        _ => {
            return Err(OpenAiError::bad(
                Some("input"),
                "input must be a non-empty string or a non-empty list of strings",
            ));
        }
    };
    if inputs.len() > 2048 {
        return Err(OpenAiError::bad(
            Some("input"),
            "at most 2048 inputs per request",
        ));
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(OpenAiError::bad(
                Some("encoding_format"),
                format!("encoding_format {other:?} is not float or base64"),
            ));
        }
    };
    let out = engine(&state)?.embed(&req.model, inputs).await?;
    let dim = out.vectors.first().map(Vec::len).unwrap_or(0) as u64;
    if let Some(d) = req.dimensions
        && d != dim
    {
        return Err(OpenAiError::bad(
            Some("dimensions"),
            format!(
                "{} gives {dim}-dimensional embeddings; it cannot give {d}",
                req.model
            ),
        ));
    }
    state.http.record_embedding(&p.id(), out.prompt_tokens);
    let data: Vec<Value> = out
        .vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                use base64::Engine as _;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": { "prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens },
    }))
    .into_response())
}

// ----- the model manager's REST -----

pub async fn installed(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Value>, crate::ApiError> {
    state
        .kernel
        .authorize(&p, Action::Read, &Resource::System, false)?;
    let engine = engine(&state).map_err(|e| crate::ApiError::new(e.status, e.message))?;
    let models = engine
        .store()
        .list()
        .map_err(|e| crate::ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let remote = engine
        .store()
        .remotes()
        .map_err(|e| crate::ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(
        json!({ "models": models, "remote": remote, "loaded": engine.loaded() }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBody {
    #[serde(default)]
    pin: bool,
}

pub async fn load(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: Option<Json<LoadBody>>,
) -> Result<Json<Value>, OpenAiError> {
    state.kernel.authorize(
        &p,
        Action::Spawn,
        &Resource::Process(format!("model-{name}")),
        false,
    )?;
    let pin = body.map(|b| b.0.pin).unwrap_or(false);
    let engine = engine(&state)?;
    engine.load(&name, pin).await?;
    Ok(Json(
        json!({ "loaded": name, "pinned": pin, "models": engine.loaded() }),
    ))
}

pub async fn unload(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Value>, OpenAiError> {
    state.kernel.authorize(
        &p,
        Action::Stop,
        &Resource::Process(format!("model-{name}")),
        false,
    )?;
    let was = engine(&state)?.unload(&name);
    Ok(Json(json!({ "unloaded": was, "name": name })))
}

#[cfg(test)]
mod tool_tests {
    use super::*;

    fn req(v: Value) -> ChatRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_tools_grammar_is_compact_and_holds_the_given_functions() {
        let r = req(
            json!({ "model": "m", "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                "properties": {"a": {"type": "integer"}}}}}], "tool_choice": "required", "parallel_tool_calls": false }),
        );
        let t = tool_mode(&r, false).unwrap().unwrap();
        assert!(t.required);
        assert!(!t.grammar.contains("{0,20}"), "{}", t.grammar);
        assert!(t.grammar.contains(r#""\"f\"""#), "{}", t.grammar);
        assert!(!t.grammar.contains("( \",\" ws call )*"), "{}", t.grammar);
        assert!(t.instructions(false).contains("- f: ") && !t.instructions(true).contains("- f: "));
        let none = req(json!({ "model": "m", "messages": [], "tools": [], "tool_choice": "none" }));
        assert!(tool_mode(&none, false).unwrap().is_none());
    }

    #[test]
    fn tag_format_calls_have_their_own_grammar_and_are_read_back() {
        let r = req(
            json!({ "model": "m", "messages": [{"role": "assistant", "content": null,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                "properties": {"a": {"type": "integer"}}}}}] }),
        );
        let t = tool_mode(&r, true).unwrap().unwrap();
        assert!(!t.required);
        assert!(
            t.grammar.starts_with(
                r#"root ::= "<tool_call>\n" call "\n</tool_call>" ( "\n" "<tool_call>\n""#
            ),
            "{}",
            t.grammar
        );
        assert!(!t.grammar.contains("tool_calls"), "{}", t.grammar);
        // Earlier calls are shown in tags too.
        let m = messages(&r, true).unwrap();
        assert_eq!(
            m[0].content,
            "<tool_call>\n{\"name\":\"f\",\"arguments\":{\"a\":1}}\n</tool_call>"
        );
        // Prose said before the calls is kept in front of them.
        let mut r2 = r;
        r2.messages[0].content = Some(Content::Text("Let me check.".into()));
        assert!(
            messages(&r2, true).unwrap()[0]
                .content
                .starts_with("Let me check.\n<tool_call>\n{"),
        );
        // Read back: calls in order, the prose around them, and a broken block left as text.
        let (calls, rest) = tagged_calls(
            "Let me look.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>\n<tool_call>{\"name\":\"g\"}</tool_call><tool_call>oops</tool_call>",
        );
        assert_eq!(
            calls,
            vec![
                json!({"name": "f", "arguments": {"a": 1}}),
                json!({"name": "g", "arguments": {}})
            ]
        );
        assert_eq!(rest, "Let me look.\n\n<tool_call>oops</tool_call>");
        let (calls, rest) = tagged_calls("Paris. <tool_call>{\"name\":\"f\"");
        assert!(calls.is_empty());
        assert_eq!(rest, "Paris. <tool_call>{\"name\":\"f\"");
    }
}
