//! Remote models: a model entry that names an OpenAI-compatible HTTP endpoint (OpenAI, llama-server, vLLM,
//! another NOA node, …) instead of a GGUF file. The engine sends their requests there, so agents, workflows and
//! API clients use local and remote models by name alike.
//!
//! The API key is not kept in the entry: the entry names a secret of the store, and the node gives the engine a
//! [`KeySource`] that reads it (audited) when a request goes out. Streams are read line by line on a thread of
//! their own; when the caller goes away the thread drops the response, which closes the connection, so the
//! remote stops generating too.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc as tmpsc;

/// A model served by an OpenAI-compatible endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteModel {
    /// The name NOA knows it by.
    pub name: String,
    /// The API's base URL, up to and including `/v1` (e.g. `https://api.openai.com/v1`).
    pub url: String,
    /// The model's id at the remote end.
    pub model: String,
    /// The secret that holds the API key (sent as `Authorization: Bearer <key>`), if the endpoint needs one.
    pub secret: Option<String>,
    pub added_ms: u64,
}

/// Reads the API key of a remote model: `(secret name, model name) → key`. The node's reads the store's
/// secret as the node, and audits it.
pub type KeySource = Arc<dyn Fn(&str, &str) -> std::result::Result<String, String> + Send + Sync>;

/// What a remote endpoint answered: a JSON body, or the chunks of an event stream as they come.
pub enum Reply {
    Json(Value),
    Stream(tmpsc::Receiver<std::result::Result<Value, String>>),
}

/// Checks a base URL: `http://` or `https://`, a host, no query or fragment. Returns it without a trailing `/`.
pub fn check_url(url: &str) -> Result<String> {
    let bad = |why: &str| Error::BadRequest(format!("url {url:?}: {why}"));
    let uri: ureq::http::Uri = url.parse().map_err(|e| bad(&format!("not a URL ({e})")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(bad("must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(bad(
            "must not carry a user or password (keep the key in a secret: --secret)",
        ));
    }
    if uri.query().is_some() || url.contains('#') {
        return Err(bad("must not have a query or fragment"));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// Longest line of an event stream, and largest JSON body, accepted from a remote.
const MAX_LINE: u64 = 4 << 20;
const MAX_BODY: u64 = 64 << 20;

/// Most requests to remote models in flight at once: each holds a thread while it waits on the remote.
const MAX_IN_FLIGHT: usize = 256;
static IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A place among the remote requests in flight, given back when dropped (when the request has ended).
struct Permit;

impl Permit {
    fn take(m: &RemoteModel) -> Result<Permit> {
        use std::sync::atomic::Ordering;
        if IN_FLIGHT.fetch_add(1, Ordering::SeqCst) >= MAX_IN_FLIGHT {
            IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            return Err(remote_error(
                m,
                Some(429),
                format!(
                    "{MAX_IN_FLIGHT} requests to remote models are in flight already; try again shortly"
                ),
            ));
        }
        Ok(Permit)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn remote_error(m: &RemoteModel, status: Option<u16>, message: String) -> Error {
    Error::Remote {
        name: m.name.clone(),
        url: m.url.clone(),
        status,
        message,
    }
}

/// Sends `body` to `<url>/<path>` and returns the response once its status is known (blocking).
fn open(
    m: &RemoteModel,
    key: Option<&str>,
    path: &str,
    body: &Value,
) -> Result<ureq::http::Response<ureq::Body>> {
    // One agent for every remote request, so connections (and TLS sessions) are reused.
    static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();
    let agent = AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(10)))
            // A remote may queue a request before it answers, and a long answer takes its time; but a remote
            // that stalls does not hold a thread forever.
            .timeout_recv_response(Some(Duration::from_secs(600)))
            .timeout_recv_body(Some(Duration::from_secs(1800)))
            // A redirect would turn the POST into a GET; an API endpoint has no business redirecting.
            .max_redirects(0)
            .http_status_as_error(false)
            .build()
            .into()
    });
    let url = format!("{}/{path}", m.url);
    let mut req = ureq::http::Request::builder()
        .method("POST")
        .uri(&url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = req
        .body(body.to_string())
        .map_err(|e| remote_error(m, None, format!("cannot build the request: {e}")))?;
    let resp = agent
        .run(req)
        .map_err(|e| remote_error(m, None, format!("POST {url} failed: {e}")))?;
    let status = resp.status().as_u16();
    if status == 401 || status == 403 {
        // The remote's own words may quote part of the key; they are not passed on.
        return Err(remote_error(
            m,
            Some(status),
            format!(
                "POST {url} answered HTTP {status}: the remote refused the key{}",
                m.secret
                    .as_deref()
                    .map(|s| format!(" from the secret {s}"))
                    .unwrap_or_else(|| " (none is configured: --secret)".into())
            ),
        ));
    }
    if status >= 300 {
        let text = resp
            .into_body()
            .with_config()
            .limit(64 << 10)
            .read_to_string()
            .unwrap_or_default();
        // OpenAI-shaped errors carry their message; anything else is shown as it came, shortened.
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| text.chars().take(300).collect());
        return Err(remote_error(
            m,
            Some(status),
            format!("POST {url} answered HTTP {status}: {message}"),
        ));
    }
    Ok(resp)
}

/// Reads an event stream (`data: {...}` lines, ended by `data: [DONE]`), handing each chunk to `each` until
/// it returns false (the caller has gone).
fn pump(
    m: &RemoteModel,
    resp: ureq::http::Response<ureq::Body>,
    mut each: impl FnMut(Value) -> bool,
) -> Result<()> {
    let mut reader = BufReader::new(resp.into_body().into_reader());
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .map_err(|e| remote_error(m, None, format!("the stream broke off: {e}")))?;
        if n == 0 {
            return Err(remote_error(
                m,
                None,
                "the stream ended without [DONE]".into(),
            ));
        }
        if n as u64 == MAX_LINE && line.last() != Some(&b'\n') {
            return Err(remote_error(
                m,
                None,
                format!("a stream line is longer than {MAX_LINE} bytes"),
            ));
        }
        let text = String::from_utf8_lossy(&line);
        let Some(data) = text.trim_end().strip_prefix("data:") else {
            continue; // comments, `event:` and `id:` lines, blank separators
        };
        let data = data.trim();
        if data == "[DONE]" {
            return Ok(());
        }
        let chunk: Value = serde_json::from_str(data).map_err(|e| {
            remote_error(
                m,
                None,
                format!("a stream chunk is not JSON ({e}): {data:.200}"),
            )
        })?;
        if let Some(msg) = chunk.get("error").filter(|e| !e.is_null()) {
            let message = msg
                .as_str()
                .or_else(|| msg["message"].as_str())
                .unwrap_or("the stream reported an error")
                .to_owned();
            return Err(remote_error(m, None, message));
        }
        if !chunk.is_object() {
            return Err(remote_error(
                m,
                None,
                format!("a stream chunk is not a JSON object: {data:.200}"),
            ));
        }
        if !each(chunk) {
            return Ok(());
        }
    }
}

/// Sends a request to a remote model, with its `model` field set to the remote id. For a stream the chunks
/// come through the returned channel; dropping it ends the request.
pub async fn send(
    m: RemoteModel,
    key: Option<String>,
    path: &'static str,
    mut body: Value,
    stream: bool,
) -> Result<Reply> {
    body["model"] = json!(m.model);
    // Only the generating endpoints know `stream`; strict servers refuse fields they do not know.
    if path != "embeddings" {
        body["stream"] = json!(stream);
    }
    let permit = Permit::take(&m)?;
    let (m2, body2) = (m.clone(), body);
    let resp = tokio::task::spawn_blocking(move || open(&m2, key.as_deref(), path, &body2))
        .await
        .map_err(|e| Error::Engine(format!("the remote request task failed: {e}")))??;
    if !stream {
        let value = tokio::task::spawn_blocking(move || {
            let text = resp
                .into_body()
                .with_config()
                .limit(MAX_BODY)
                .read_to_string()
                .map_err(|e| remote_error(&m, None, format!("reading the answer failed: {e}")))?;
            serde_json::from_str::<Value>(&text)
                .ok()
                .filter(Value::is_object)
                .ok_or_else(|| {
                    remote_error(
                        &m,
                        None,
                        format!("the answer is not a JSON object: {text:.200}"),
                    )
                })
        })
        .await
        .map_err(|e| Error::Engine(format!("the remote request task failed: {e}")))??;
        return Ok(Reply::Json(value));
    }
    let (tx, rx) = tmpsc::channel(256);
    std::thread::Builder::new()
        .name("noa-remote-stream".into())
        .spawn(move || {
            let _permit = permit;
            let result = pump(&m, resp, |chunk| tx.blocking_send(Ok(chunk)).is_ok());
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(e.to_string()));
            }
        })
        .map_err(|e| Error::Engine(format!("cannot start a stream reader: {e}")))?;
    Ok(Reply::Stream(rx))
}

/// A chat or plain completion through a remote model, as engine events: pieces of text, then usage.
pub(crate) fn generate(
    m: RemoteModel,
    key: Option<String>,
    body: Value,
    chat: bool,
    events: tmpsc::Sender<crate::Event>,
) {
    use crate::Event;
    let permit = match Permit::take(&m) {
        Ok(p) => p,
        Err(e) => {
            let _ = events.try_send(Event::Error(format!("REMOTE {e}")));
            return;
        }
    };
    let _ = std::thread::Builder::new()
        .name("noa-remote".into())
        .spawn(move || {
            let _permit = permit;
            let started = std::time::Instant::now();
            let path = if chat {
                "chat/completions"
            } else {
                "completions"
            };
            let mut body = body;
            body["model"] = json!(m.model);
            body["stream"] = json!(true);
            body["stream_options"] = json!({ "include_usage": true });
            let resp = match open(&m, key.as_deref(), path, &body) {
                Ok(r) => r,
                Err(e) => {
                    let _ = events.blocking_send(Event::Error(format!("REMOTE {e}")));
                    return;
                }
            };
            let mut ttft = None;
            let (mut prompt, mut completion, mut pieces) = (0u32, None::<u32>, 0u32);
            let mut finish = String::from("stop");
            let result = pump(&m, resp, |chunk| {
                if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
                    prompt = u["prompt_tokens"].as_u64().unwrap_or(0) as u32;
                    completion = u["completion_tokens"].as_u64().map(|c| c as u32);
                }
                if events.is_closed() {
                    return false;
                }
                let Some(choice) = chunk["choices"].get(0) else {
                    return true;
                };
                if let Some(r) = choice["finish_reason"].as_str() {
                    finish = r.to_owned();
                }
                let text = if chat {
                    choice["delta"]["content"].as_str()
                } else {
                    choice["text"].as_str()
                };
                match text.filter(|t| !t.is_empty()) {
                    Some(t) => {
                        ttft.get_or_insert_with(|| started.elapsed());
                        pieces += 1;
                        events.blocking_send(Event::Text(t.to_owned())).is_ok()
                    }
                    None => true,
                }
            });
            if let Err(e) = result {
                let _ = events.blocking_send(Event::Error(format!("REMOTE {e}")));
                return;
            }
            // Without a usage chunk, each streamed piece is counted as a token.
            let _ = events.blocking_send(Event::Done(crate::Usage::measured(
                prompt,
                completion.unwrap_or(pieces),
                finish,
                started.elapsed(),
                ttft,
                0,
            )));
        });
}

/// Embeddings through a remote model, in input order.
pub(crate) async fn embed(
    m: RemoteModel,
    key: Option<String>,
    inputs: Vec<String>,
) -> Result<crate::Embeddings> {
    let n = inputs.len();
    let name = m.clone();
    let Reply::Json(v) = send(m, key, "embeddings", json!({ "input": inputs }), false).await?
    else {
        return Err(Error::Engine("a JSON answer was expected".into()));
    };
    let bad = |why: &str| remote_error(&name, None, format!("the embeddings answer {why}"));
    let data = v["data"]
        .as_array()
        .ok_or_else(|| bad("has no data list"))?;
    let mut vectors = vec![Vec::new(); n];
    for (i, d) in data.iter().enumerate() {
        let index = d["index"].as_u64().map_or(i, |x| x as usize);
        let v: Vec<f32> = d["embedding"]
            .as_array()
            .ok_or_else(|| bad("has an entry without an embedding list"))?
            .iter()
            .map(|x| x.as_f64().map(|f| f as f32))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("has a non-numeric embedding"))?;
        *vectors
            .get_mut(index)
            .ok_or_else(|| bad("has an index past the inputs"))? = v;
    }
    if vectors.iter().any(Vec::is_empty) {
        return Err(bad("has fewer embeddings than inputs"));
    }
    Ok(crate::Embeddings {
        vectors,
        prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_requests_in_flight_are_bounded() {
        let m = RemoteModel {
            name: "far".into(),
            url: "http://127.0.0.1:9/v1".into(),
            model: "x".into(),
            secret: None,
            added_ms: 0,
        };
        let held: Vec<Permit> = (0..MAX_IN_FLIGHT)
            .map_while(|_| Permit::take(&m).ok())
            .collect();
        let e = Permit::take(&m)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("in flight already"), "{e}");
        drop(held);
        assert!(Permit::take(&m).is_ok());
    }

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            check_url("https://api.openai.com/v1/").unwrap(),
            "https://api.openai.com/v1"
        );
        assert!(check_url("http://127.0.0.1:8080/v1").is_ok());
        for bad in [
            "ftp://x/v1",
            "api.openai.com/v1",
            "http:///v1",
            "http://x/v1?k=1",
            "http://x/v1#f",
            "http://user:pw@x/v1",
            "",
        ] {
            let e = check_url(bad).unwrap_err().to_string();
            assert!(e.contains("url"), "{bad}: {e}");
        }
    }
}
