//! The JSON form of a bus payload, shared by every JSON interface (the agent protocol, REST, WebSocket):
//! a payload that is JSON travels as `data`, other UTF-8 as `text`, anything else as `base64`.

use base64::Engine;
use bytes::Bytes;
use serde_json::{Map, Value};

/// Puts a payload into `params`: as `data` when it is JSON, else `text` when UTF-8, else `base64`.
pub fn put_payload(params: &mut Map<String, Value>, payload: &[u8]) {
    if payload.is_empty() {
        params.insert("data".into(), Value::Null);
    } else if let Ok(v) = serde_json::from_slice::<Value>(payload) {
        params.insert("data".into(), v);
    } else if let Ok(s) = std::str::from_utf8(payload) {
        params.insert("text".into(), Value::String(s.to_owned()));
    } else {
        params.insert(
            "base64".into(),
            Value::String(base64::engine::general_purpose::STANDARD.encode(payload)),
        );
    }
}

/// Reads a payload from `params`: `data` (any JSON, encoded), `text` (raw UTF-8) or `base64`. None of them is an empty payload.
pub fn take_payload(params: &Map<String, Value>) -> Result<Bytes, String> {
    if let Some(s) = params.get("base64") {
        let s = s.as_str().ok_or("\"base64\" must be a string")?;
        return base64::engine::general_purpose::STANDARD
            .decode(s)
            .map(Bytes::from)
            .map_err(|e| format!("\"base64\" is not valid base64: {e}"));
    }
    if let Some(s) = params.get("text") {
        return Ok(Bytes::from(
            s.as_str().ok_or("\"text\" must be a string")?.to_owned(),
        ));
    }
    match params.get("data") {
        None | Some(Value::Null) => Ok(Bytes::new()),
        Some(v) => Ok(Bytes::from(v.to_string())),
    }
}
