//! The CLI's HTTP client: finds the daemon and its token, sends requests, reads replies and event streams.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A CLI failure, with the exit code it maps to.
#[derive(Debug)]
pub enum CliError {
    /// Bad input or a refusal by the daemon: exit 1.
    Failed {
        message: String,
        hint: Option<String>,
    },
    /// The daemon could not be reached: exit 3.
    Unreachable { addr: String, message: String },
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Failed { message, .. } => f.write_str(message),
            CliError::Unreachable { addr, message } => {
                write!(f, "cannot reach the NOA daemon at {addr}: {message}")
            }
        }
    }
}

impl CliError {
    pub fn failed(message: impl Into<String>) -> Self {
        CliError::Failed {
            message: message.into(),
            hint: None,
        }
    }

    pub fn with_hint(message: impl Into<String>, hint: impl Into<String>) -> Self {
        CliError::Failed {
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    pub fn hint(&self) -> Option<String> {
        match self {
            CliError::Failed { hint, .. } => hint.clone(),
            CliError::Unreachable { .. } => {
                Some("is it running? Start it with `noa up` (or point --addr at it)".into())
            }
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Failed { .. } => 1,
            CliError::Unreachable { .. } => 3,
        }
    }
}

pub type CliResult<T> = Result<T, CliError>;

/// A failed command, from any error's message.
pub fn fail(e: impl std::fmt::Display) -> CliError {
    CliError::failed(e.to_string())
}

/// Talks to one daemon.
pub struct Client {
    base: String,
    token: Option<String>,
    token_path: PathBuf,
    agent: ureq::Agent,
    stream_agent: ureq::Agent,
}

fn agent(timeout: Option<Duration>) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(3)))
        .timeout_global(timeout)
        .build()
        .into()
}

impl Client {
    /// The address comes from `--addr`, else the running daemon's `<data-dir>/noa.addr`, else the default.
    pub fn new(addr: Option<String>, token: Option<String>, data_dir: &Path) -> Client {
        let base = addr
            .or_else(|| {
                std::fs::read_to_string(noa_node::addr_path(data_dir))
                    .ok()
                    .map(|s| s.trim().to_owned())
            })
            .unwrap_or_else(|| noa_node::DEFAULT_LISTEN.to_owned());
        let base = if base.starts_with("http://") || base.starts_with("https://") {
            base
        } else {
            format!("http://{base}")
        };
        Client {
            base: base.trim_end_matches('/').to_owned(),
            token,
            token_path: noa_node::token_path(data_dir),
            agent: agent(Some(Duration::from_secs(330))),
            stream_agent: agent(None),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn token(&self) -> CliResult<String> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        std::fs::read_to_string(&self.token_path).map(|t| t.trim().to_owned()).map_err(|e| {
            CliError::with_hint(
                format!("cannot read the admin token {}: {e}", self.token_path.display()),
                "start the daemon once with `noa up` (it writes the token), or pass --token / NOA_TOKEN / --data-dir",
            )
        })
    }

    fn unreachable(&self, e: ureq::Error) -> CliError {
        CliError::Unreachable {
            addr: self.base.clone(),
            message: e.to_string(),
        }
    }

    fn finish(&self, mut resp: ureq::http::Response<ureq::Body>) -> CliResult<Value> {
        let status = resp.status();
        let text = resp
            .body_mut()
            .with_config()
            .limit(256 * 1024 * 1024)
            .read_to_string()
            .map_err(|e| self.unreachable(e))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            return Ok(value);
        }
        let message = value["error"]["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("the daemon answered {status}: {value}"));
        let code = value["error"]["code"].as_str().unwrap_or("");
        Err(CliError::Failed {
            message: if code.is_empty() {
                message
            } else {
                format!("{code} {message}")
            },
            hint: None,
        })
    }

    pub fn get(&self, path: &str) -> CliResult<Value> {
        let resp = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token()?))
            .call()
            .map_err(|e| self.unreachable(e))?;
        self.finish(resp)
    }

    pub fn post(&self, path: &str, body: Option<&Value>) -> CliResult<Value> {
        let req = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token()?));
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.send_empty(),
        }
        .map_err(|e| self.unreachable(e))?;
        self.finish(resp)
    }

    pub fn put_json(&self, path: &str, body: &Value) -> CliResult<Value> {
        let resp = self
            .agent
            .put(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token()?))
            .send_json(body)
            .map_err(|e| self.unreachable(e))?;
        self.finish(resp)
    }

    pub fn delete(&self, path: &str) -> CliResult<Value> {
        let resp = self
            .agent
            .delete(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token()?))
            .call()
            .map_err(|e| self.unreachable(e))?;
        self.finish(resp)
    }

    /// Uploads a body streamed from `reader` (no overall timeout).
    pub fn put_stream(&self, path: &str, reader: &mut dyn Read) -> CliResult<Value> {
        let resp = self
            .stream_agent
            .put(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token()?))
            .header("Content-Type", "application/octet-stream")
            .send(ureq::SendBody::from_reader(reader))
            .map_err(|e| self.unreachable(e))?;
        self.finish(resp)
    }

    /// Starts a download; returns the response headers and a reader of the body (no size limit, no timeout).
    pub fn download(
        &self,
        path: &str,
    ) -> CliResult<(ureq::http::HeaderMap, Box<dyn Read + Send + Sync + 'static>)> {
        let resp = self
            .stream_agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token()?))
            .call()
            .map_err(|e| self.unreachable(e))?;
        if !resp.status().is_success() {
            return Err(self
                .finish(resp)
                .err()
                .unwrap_or_else(|| CliError::failed("the download failed")));
        }
        let headers = resp.headers().clone();
        let reader = resp.into_body().into_with_config().limit(u64::MAX).reader();
        Ok((headers, Box::new(reader)))
    }

    /// Health check without a token.
    pub fn healthz(&self) -> CliResult<Value> {
        let resp = self
            .agent
            .get(format!("{}/healthz", self.base))
            .call()
            .map_err(|e| self.unreachable(e))?;
        self.finish(resp)
    }

    /// POSTs `body` and reads the answer as a Server-Sent Events stream (see [`Client::stream`]).
    pub fn post_stream(
        &self,
        path: &str,
        body: &Value,
        on_event: impl FnMut(&str, &str) -> bool,
    ) -> CliResult<()> {
        let resp = self
            .stream_agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token()?))
            .header("Accept", "text/event-stream")
            .send_json(body)
            .map_err(|e| self.unreachable(e))?;
        self.read_stream(resp, on_event)
    }

    /// Reads a Server-Sent Events stream, calling `on_event(event, data)` until it returns false or the stream ends.
    pub fn stream(&self, path: &str, on_event: impl FnMut(&str, &str) -> bool) -> CliResult<()> {
        let resp = self
            .stream_agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token()?))
            .header("Accept", "text/event-stream")
            .call()
            .map_err(|e| self.unreachable(e))?;
        self.read_stream(resp, on_event)
    }

    fn read_stream(
        &self,
        resp: ureq::http::Response<ureq::Body>,
        mut on_event: impl FnMut(&str, &str) -> bool,
    ) -> CliResult<()> {
        if !resp.status().is_success() {
            return self.finish(resp).map(|_| ());
        }
        let reader = BufReader::new(resp.into_body().into_reader());
        let (mut event, mut data) = (String::new(), String::new());
        for line in reader.lines() {
            let line = line.map_err(|e| CliError::Unreachable {
                addr: self.base.clone(),
                message: e.to_string(),
            })?;
            if line.is_empty() {
                if !data.is_empty()
                    && !on_event(if event.is_empty() { "message" } else { &event }, &data)
                {
                    return Ok(());
                }
                event.clear();
                data.clear();
            } else if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        Ok(())
    }
}

/// Percent-encodes a query value.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
