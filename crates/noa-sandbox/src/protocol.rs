//! Agent protocol v0: newline-delimited JSON-RPC 2.0 over a native process's stdin and stdout.
//! The normative text is `docs/specs/agent-protocol.md`.

pub use noa_bus::json_payload::{put_payload, take_payload};
use serde_json::{Map, Value, json};

/// The protocol name sent in `initialize`.
pub const PROTOCOL: &str = "noa/0";

/// JSON-RPC error codes.
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    /// The policy denied the call.
    pub const DENIED: i64 = -32001;
    /// The bus or kernel refused the call (bad subject, no responders, timeout).
    pub const FAILED: i64 = -32002;
}

/// A JSON-RPC message id: a number or a string.
pub type Id = Value;

/// A line from an agent, classified.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    Request {
        id: Id,
        method: String,
        params: Value,
    },
    Notification {
        method: String,
        params: Value,
    },
    Response {
        id: Id,
        result: Result<Value, Value>,
    },
}

/// Why a line is not a valid JSON-RPC message; `id` is echoed back when it could be read.
#[derive(Debug, PartialEq)]
pub struct Invalid {
    pub code: i64,
    pub id: Value,
    pub message: String,
}

/// Parses one line written by an agent.
pub fn parse(line: &[u8]) -> Result<Incoming, Invalid> {
    let value: Value = serde_json::from_slice(line).map_err(|e| Invalid {
        code: code::PARSE_ERROR,
        id: Value::Null,
        message: format!("not valid JSON: {e}"),
    })?;
    let Value::Object(mut obj) = value else {
        return Err(Invalid {
            code: code::INVALID_REQUEST,
            id: Value::Null,
            message: "a message must be a JSON object".into(),
        });
    };
    let id = obj.remove("id");
    let invalid = |id: &Option<Value>, message: String| Invalid {
        code: code::INVALID_REQUEST,
        id: id.clone().unwrap_or(Value::Null),
        message,
    };
    if obj.get("jsonrpc") != Some(&Value::String("2.0".into())) {
        return Err(invalid(&id, "\"jsonrpc\" must be \"2.0\"".into()));
    }
    if let Some(id) = &id
        && !(id.is_string() || id.is_number())
    {
        return Err(invalid(&None, "\"id\" must be a string or a number".into()));
    }
    match obj.remove("method") {
        Some(Value::String(method)) => {
            let params = obj.remove("params").unwrap_or(Value::Null);
            if !(params.is_object() || params.is_null()) {
                return Err(invalid(&id, "\"params\" must be an object".into()));
            }
            Ok(match id {
                Some(id) => Incoming::Request { id, method, params },
                None => Incoming::Notification { method, params },
            })
        }
        Some(_) => Err(invalid(&id, "\"method\" must be a string".into())),
        None => {
            let Some(id) = id else {
                return Err(invalid(
                    &None,
                    "a message needs \"method\", or \"id\" with \"result\" or \"error\"".into(),
                ));
            };
            match (obj.remove("result"), obj.remove("error")) {
                (Some(r), None) => Ok(Incoming::Response { id, result: Ok(r) }),
                (None, Some(e)) => Ok(Incoming::Response { id, result: Err(e) }),
                _ => Err(invalid(
                    &Some(id),
                    "a response needs exactly one of \"result\" and \"error\"".into(),
                )),
            }
        }
    }
}

pub fn request(id: u64, method: &str, params: Value) -> String {
    json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }).to_string()
}

pub fn notification(method: &str, params: Value) -> String {
    json!({ "jsonrpc": "2.0", "method": method, "params": params }).to_string()
}

pub fn result(id: &Id, result: Value) -> String {
    json!({ "jsonrpc": "2.0", "id": id, "result": result }).to_string()
}

pub fn error(id: &Id, code: i64, message: &str) -> String {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message } }).to_string()
}

/// Reads optional string headers from `params.headers`.
pub fn take_headers(params: &Map<String, Value>) -> Result<Option<noa_bus::Headers>, String> {
    match params.get("headers") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(h)) => h
            .iter()
            .map(|(k, v)| {
                v.as_str()
                    .map(|v| (k.clone(), v.to_owned()))
                    .ok_or_else(|| format!("header {k:?} must be a string"))
            })
            .collect::<Result<_, _>>()
            .map(Some),
        Some(_) => Err("\"headers\" must be an object of strings".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_messages() {
        assert_eq!(
            parse(br#"{"jsonrpc":"2.0","id":1,"method":"publish","params":{"subject":"a"}}"#)
                .unwrap(),
            Incoming::Request {
                id: json!(1),
                method: "publish".into(),
                params: json!({"subject":"a"})
            }
        );
        assert!(matches!(
            parse(br#"{"jsonrpc":"2.0","method":"log"}"#).unwrap(),
            Incoming::Notification { .. }
        ));
        assert_eq!(
            parse(br#"{"jsonrpc":"2.0","id":"x","result":5}"#).unwrap(),
            Incoming::Response {
                id: json!("x"),
                result: Ok(json!(5))
            }
        );
    }

    #[test]
    fn bad_lines_say_why() {
        let e = parse(b"{not json").unwrap_err();
        assert_eq!(e.code, code::PARSE_ERROR);
        assert!(e.message.starts_with("not valid JSON"));
        let e = parse(br#"{"id":3,"method":"x"}"#).unwrap_err();
        assert_eq!((e.code, e.id), (code::INVALID_REQUEST, json!(3)));
        assert!(parse(b"[1,2]").is_err());
        assert!(
            parse(br#"{"jsonrpc":"2.0","id":1}"#)
                .unwrap_err()
                .message
                .contains("exactly one")
        );
        assert!(parse(br#"{"jsonrpc":"2.0","id":{},"method":"x"}"#).is_err());
        assert!(
            parse(br#"{"jsonrpc":"2.0","method":"x","params":[1]}"#)
                .unwrap_err()
                .message
                .contains("params")
        );
    }

    #[test]
    fn payloads_round_trip() {
        for payload in [&b"{\"a\":1}"[..], b"plain text", &[0xff, 0x00, 0x10], b""] {
            let mut m = Map::new();
            put_payload(&mut m, payload);
            let back = take_payload(&m).unwrap();
            if let Some(v) = m.get("data").filter(|v| !v.is_null()) {
                assert_eq!(serde_json::from_slice::<Value>(&back).unwrap(), *v);
            } else {
                assert_eq!(&back[..], payload);
            }
        }
        let m = json!({"base64": "%%%"}).as_object().unwrap().clone();
        assert!(take_payload(&m).unwrap_err().contains("not valid base64"));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn parse_never_panics_on_jsonish(s in r#"\{("jsonrpc":"2\.0",?)?("id":(1|"a"|null|\[\]),?)?("method":("x"|1),?)?("params":(\{\}|1),?)?("result":1,?)?("error":\{\})?\}"#) {
            let _ = parse(s.as_bytes());
        }
    }
}
