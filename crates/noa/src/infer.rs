//! Commands for models (`noa model …`) and `noa ask`.

use crate::cli::{AskArgs, ModelCommand};
use crate::client::{CliResult, Client, encode, fail};
use crate::output::{bytes, duration_ms, progress, table, timestamp};
use noa_node::infer::{CATALOG, ModelInfo, ModelStore};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::path::Path;

fn describe(m: &ModelInfo) -> Vec<(&'static str, String)> {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    vec![
        ("name", m.name.clone()),
        ("model", opt(&m.model_name)),
        ("architecture", opt(&m.architecture)),
        (
            "parameters",
            m.parameters
                .map(|p| format!("{:.0} M", p as f64 / 1e6))
                .unwrap_or_else(|| "-".into()),
        ),
        ("quantization", opt(&m.quantization)),
        (
            "context length",
            m.context_length
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        ("tensors", m.tensors.to_string()),
        ("size", bytes(m.size)),
        ("file", m.file.clone()),
        ("sha256", m.sha256.clone()),
        ("blake3", m.blake3.clone()),
        ("source", m.source.clone()),
        ("added", timestamp(m.added_ms)),
        (
            "chat template",
            m.chat_template
                .as_deref()
                .map(|t| format!("{} characters", t.chars().count()))
                .unwrap_or_else(|| "none (a plain role: text prompt is used)".into()),
        ),
    ]
}

/// The commands that work on the model store of the data directory, with or without a daemon.
pub fn model_offline(data_dir: &Path, c: &ModelCommand, json_out: bool) -> CliResult<()> {
    let store = ModelStore::new(&noa_node::models_dir(data_dir));
    match c {
        ModelCommand::List => {
            let models = store.list().map_err(fail)?;
            let remote = store.remotes().map_err(fail)?;
            if json_out {
                println!("{}", json!({ "models": models, "remote": remote }));
                return Ok(());
            }
            if models.is_empty() && remote.is_empty() {
                println!(
                    "no models installed; the catalog has: {} (noa model pull <name>)",
                    CATALOG
                        .iter()
                        .map(|e| e.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                return Ok(());
            }
            let rows: Vec<Vec<String>> = models
                .iter()
                .map(|m| {
                    vec![
                        m.name.clone(),
                        m.architecture.clone().unwrap_or_default(),
                        m.quantization.clone().unwrap_or_default(),
                        bytes(m.size),
                        m.context_length.map(|c| c.to_string()).unwrap_or_default(),
                        m.source.clone(),
                    ]
                })
                .chain(remote.iter().map(|r| {
                    vec![
                        r.name.clone(),
                        "remote".into(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                        format!("{} ({})", r.url, r.model),
                    ]
                }))
                .collect();
            table(
                &["NAME", "ARCH", "QUANT", "SIZE", "CONTEXT", "SOURCE"],
                &rows,
            );
            Ok(())
        }
        ModelCommand::Pull { name } => {
            let bar = progress(0, &format!("pulling {name}"), json_out);
            let result = store.pull(name, &mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            });
            bar.finish_and_clear();
            let (info, fetched) = result.map_err(fail)?;
            if json_out {
                println!("{}", json!({ "model": info, "fetched": fetched }));
            } else if fetched {
                println!(
                    "installed {} ({}, sha256 verified) from {}",
                    info.name,
                    bytes(info.size),
                    info.source
                );
            } else {
                println!("{} is already installed ({})", info.name, info.source);
            }
            Ok(())
        }
        ModelCommand::Add { file, name } => {
            let bar = progress(0, "importing", json_out);
            let result = store.add(file, name.as_deref(), &mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            });
            bar.finish_and_clear();
            let info = result.map_err(fail)?;
            if json_out {
                println!("{}", json!({ "model": info }));
            } else {
                println!("added {} ({})", info.name, bytes(info.size));
            }
            Ok(())
        }
        ModelCommand::AddRemote {
            name,
            url,
            remote_model,
            secret,
        } => {
            let m = store
                .add_remote(name, url, remote_model.as_deref(), secret.as_deref())
                .map_err(fail)?;
            let host = m
                .url
                .strip_prefix("http://")
                .map(|rest| rest.split(['/', ':']).next().unwrap_or(""));
            if m.secret.is_some()
                && host.is_some_and(|h| !matches!(h, "127.0.0.1" | "localhost" | "[" | "::1"))
            {
                eprintln!(
                    "warning: {} is plain http, so the key from the secret {} crosses the network unencrypted; use https for a remote host",
                    m.url,
                    m.secret.as_deref().unwrap_or_default()
                );
            }
            if json_out {
                println!("{}", json!({ "remote": m }));
            } else {
                println!(
                    "{} now answers through {} (model {}{})",
                    m.name,
                    m.url,
                    m.model,
                    m.secret
                        .as_deref()
                        .map(|s| format!(", key from the secret {s}"))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
        ModelCommand::Show { name } => {
            if let Some(r) = store.remote(name).map_err(fail)? {
                if json_out {
                    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                } else {
                    for (k, v) in [
                        ("name", r.name.clone()),
                        ("kind", "remote (OpenAI-compatible endpoint)".into()),
                        ("url", r.url.clone()),
                        ("remote model", r.model.clone()),
                        (
                            "key",
                            r.secret
                                .clone()
                                .map(|s| format!("the secret {s}"))
                                .unwrap_or_else(|| "none".into()),
                        ),
                        ("added", timestamp(r.added_ms)),
                    ] {
                        println!("{k:<15} {v}");
                    }
                }
                return Ok(());
            }
            let info = store.get(name).map_err(fail)?;
            if json_out {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&info).unwrap_or_default()
                );
                return Ok(());
            }
            for (k, v) in describe(&info) {
                println!("{k:<15} {v}");
            }
            Ok(())
        }
        ModelCommand::Rm { name } => {
            store.remove(name).map_err(fail)?;
            if json_out {
                println!("{}", json!({ "removed": name }));
            } else {
                println!("removed {name}");
            }
            Ok(())
        }
        _ => Err(fail("this command needs the daemon")),
    }
}

pub fn model_daemon(client: &Client, c: ModelCommand, json_out: bool) -> CliResult<()> {
    match c {
        ModelCommand::Load { name, pin } => {
            let v = client.post(
                &format!("/api/v1/models/{}/load", encode(&name)),
                Some(&json!({ "pin": pin })),
            )?;
            if json_out {
                println!("{v}");
            } else {
                println!("{name} is loaded{}", if pin { " and pinned" } else { "" });
            }
            Ok(())
        }
        ModelCommand::Unload { name } => {
            let v = client.post(&format!("/api/v1/models/{}/unload", encode(&name)), None)?;
            if json_out {
                println!("{v}");
            } else if v["unloaded"].as_bool() == Some(true) {
                println!("{name} is unloaded");
            } else {
                println!("{name} was not loaded");
            }
            Ok(())
        }
        ModelCommand::Ps => {
            let v = client.get("/api/v1/models")?;
            if json_out {
                println!("{}", json!({ "loaded": v["loaded"] }));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v["loaded"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|l| {
                    vec![
                        l["name"].as_str().unwrap_or("").to_owned(),
                        bytes(l["size"].as_u64().unwrap_or(0)),
                        l["state"].as_str().unwrap_or("").to_owned(),
                        if l["pinned"].as_bool().unwrap_or(false) {
                            "yes"
                        } else {
                            "no"
                        }
                        .into(),
                        l["busy"].to_string(),
                        duration_ms(l["idle_ms"].as_u64().unwrap_or(0)),
                    ]
                })
                .collect();
            table(
                &["NAME", "SIZE", "STATE", "PINNED", "REQUESTS", "IDLE"],
                &rows,
            );
            Ok(())
        }
        _ => Err(fail("this command works without the daemon")),
    }
}

pub fn ask(client: &Client, a: AskArgs, json_out: bool) -> CliResult<()> {
    let prompt = if a.prompt == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(fail)?;
        s
    } else {
        a.prompt.clone()
    };
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(json!({ "role": "system", "content": s }));
    }
    messages.push(json!({ "role": "user", "content": prompt }));
    let mut body = json!({
        "model": a.model, "messages": messages, "stream": true, "max_tokens": a.max_tokens,
        "stream_options": { "include_usage": true },
    });
    if let Some(t) = a.temperature {
        body["temperature"] = json!(t);
    }
    if let Some(s) = a.seed {
        body["seed"] = json!(s);
    }
    let mut text = String::new();
    let mut usage = Value::Null;
    let mut finish = Value::Null;
    let mut error = None;
    let mut out = std::io::stdout().lock();
    client.post_stream("/v1/chat/completions", &body, |_, data| {
        if data == "[DONE]" {
            return false;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return true;
        };
        if let Some(e) = v.get("error") {
            error = Some(
                e["message"]
                    .as_str()
                    .unwrap_or("the model failed")
                    .to_owned(),
            );
            return false;
        }
        if let Some(piece) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
            if !json_out {
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            }
        }
        if !v["choices"][0]["finish_reason"].is_null() {
            finish = v["choices"][0]["finish_reason"].clone();
        }
        if v.get("usage").is_some() {
            usage = v["usage"].clone();
        }
        true
    })?;
    if let Some(e) = error {
        return Err(fail(e));
    }
    if json_out {
        println!(
            "{}",
            json!({ "model": a.model, "text": text, "finish_reason": finish, "usage": usage })
        );
    } else {
        let _ = writeln!(out);
    }
    Ok(())
}
