//! Commands for workflows (`noa workflow …`): validate offline, and everything else through the daemon.

use crate::cli::WorkflowCommand;
use crate::client::{CliError, CliResult, Client, encode, fail};
use crate::output::{duration_ms, table, timestamp};
use noa_node::workflow::{self as wf, Diagnostic, Workflow};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

fn load(file: &Path) -> Result<Workflow, Vec<Diagnostic>> {
    wf::load_file(file)
}

fn diagnostics_error(d: &[Diagnostic]) -> CliError {
    for x in d {
        eprintln!("{x}");
    }
    CliError::failed(format!(
        "{} problem{} found; nothing was run",
        d.len(),
        if d.len() == 1 { "" } else { "s" }
    ))
}

/// `noa workflow validate`: parses and checks each file, with every problem found.
pub fn validate(files: &[std::path::PathBuf], json_out: bool) -> CliResult<()> {
    let mut all = Vec::new();
    let mut report = Vec::new();
    for f in files {
        match load(f) {
            Ok(w) => {
                if !json_out {
                    let kinds: Vec<String> = w
                        .steps
                        .iter()
                        .map(|s| s.kind.name().to_owned())
                        .collect::<std::collections::BTreeSet<_>>()
                        .into_iter()
                        .collect();
                    println!(
                        "ok: {}: workflow {}, {} step{} ({}){}",
                        f.display(),
                        w.name,
                        w.steps.len(),
                        if w.steps.len() == 1 { "" } else { "s" },
                        kinds.join(", "),
                        if w.on.cron.is_empty() && w.on.subjects.is_empty() {
                            String::new()
                        } else {
                            format!(
                                "; triggers: {}",
                                w.on.cron
                                    .iter()
                                    .map(|c| format!("cron {:?}", c.0))
                                    .chain(w.on.subjects.iter().map(|s| format!("subject {s}")))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        }
                    );
                }
                report.push(json!({ "file": f.display().to_string(), "valid": true, "workflow": w.name, "steps": w.steps.len() }));
            }
            Err(d) => {
                report.push(json!({
                    "file": f.display().to_string(), "valid": false,
                    "diagnostics": d.iter().map(|d| json!({"file": d.file, "line": d.pos.line, "column": d.pos.col, "message": d.message, "hint": d.hint})).collect::<Vec<_>>(),
                }));
                all.extend(d);
            }
        }
    }
    if json_out {
        println!("{}", json!({ "files": report }));
    }
    if all.is_empty() {
        Ok(())
    } else if json_out {
        Err(CliError::failed(format!("{} problems found", all.len())))
    } else {
        Err(diagnostics_error(&all))
    }
}

fn body(w: &Workflow, inputs: BTreeMap<String, Value>) -> Value {
    json!({ "file": w.file, "source": w.source, "includes": w.includes, "inputs": inputs })
}

fn parse_inputs(w: &Workflow, given: &[String]) -> CliResult<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for kv in given {
        let Some((k, v)) = kv.split_once('=') else {
            return Err(CliError::with_hint(
                format!("--input {kv:?} is not NAME=VALUE"),
                "e.g. --input topic=rust",
            ));
        };
        // Typed inputs are checked (and read as JSON) by the engine; strings go as they are.
        out.insert(k.to_owned(), Value::String(v.to_owned()));
    }
    w.resolve_inputs(&out).map_err(|e| {
        CliError::with_hint(
            e,
            format!(
                "the inputs of {} are: {}",
                w.name,
                w.inputs
                    .iter()
                    .map(|i| format!("{} ({})", i.name, i.ty.name()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    Ok(out)
}

pub fn workflow(client: &Client, c: &WorkflowCommand, json_out: bool) -> CliResult<()> {
    match c {
        WorkflowCommand::Validate { files } => validate(files, json_out),
        WorkflowCommand::Run {
            file,
            inputs,
            watch,
        } => {
            let w = load(file).map_err(|d| diagnostics_error(&d))?;
            let inputs = parse_inputs(&w, inputs)?;
            let r = client.post("/api/v1/workflows/runs", Some(&body(&w, inputs)))?;
            let id = r["id"].as_str().unwrap_or_default().to_owned();
            if *watch {
                if !json_out {
                    eprintln!("run {id} of {} started", w.name);
                }
                return watch_run(client, &id, json_out);
            }
            if json_out {
                println!("{r}");
            } else {
                println!("{id}");
                eprintln!(
                    "run {id} of {} started; follow it with `noa workflow show {id} --watch`",
                    w.name
                );
            }
            Ok(())
        }
        WorkflowCommand::List {
            status,
            workflow,
            limit,
        } => {
            let mut q = format!("?limit={limit}");
            if let Some(s) = status {
                q.push_str(&format!("&status={}", encode(s)));
            }
            if let Some(w) = workflow {
                q.push_str(&format!("&workflow={}", encode(w)));
            }
            let v = client.get(&format!("/api/v1/workflows/runs{q}"))?;
            if json_out {
                println!("{v}");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v["runs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    let created = r["created_ms"].as_u64().unwrap_or(0);
                    let updated = r["updated_ms"].as_u64().unwrap_or(0);
                    vec![
                        r["id"].as_str().unwrap_or("").to_owned(),
                        r["workflow"].as_str().unwrap_or("").to_owned(),
                        r["status"].as_str().unwrap_or("").to_owned(),
                        timestamp(created),
                        duration_ms(updated.saturating_sub(created)),
                        r["error"].as_str().map(short).unwrap_or_default(),
                    ]
                })
                .collect();
            if rows.is_empty() {
                println!("no runs yet; start one with `noa workflow run <file.yaml>`");
            } else {
                table(
                    &["RUN", "WORKFLOW", "STATUS", "STARTED", "TOOK", "ERROR"],
                    &rows,
                );
            }
            Ok(())
        }
        WorkflowCommand::Show { run, watch } => {
            if *watch {
                return watch_run(client, run, json_out);
            }
            let v = client.get(&format!("/api/v1/workflows/runs/{}", encode(run)))?;
            if json_out {
                println!("{v}");
            } else {
                print_run(&v);
            }
            Ok(())
        }
        WorkflowCommand::Logs { run, step } => {
            let v = client.get(&format!(
                "/api/v1/workflows/runs/{}/steps/{}/logs",
                encode(run),
                encode(step)
            ))?;
            if json_out {
                println!("{v}");
                return Ok(());
            }
            for l in v["logs"].as_array().into_iter().flatten() {
                eprintln!("--- {} ---", l["name"].as_str().unwrap_or(""));
                eprint!("{}", l["text"].as_str().unwrap_or(""));
            }
            println!("{}", v["output"].as_str().unwrap_or(""));
            Ok(())
        }
        WorkflowCommand::History { run } => {
            let v = client.get(&format!("/api/v1/workflows/runs/{}/events", encode(run)))?;
            if json_out {
                println!("{v}");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v["events"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    vec![
                        e["seq"].to_string(),
                        timestamp(e["ts_ms"].as_u64().unwrap_or(0)),
                        e["kind"].as_str().unwrap_or("").to_owned(),
                        e["step"].as_str().unwrap_or("-").to_owned(),
                        short(&e["data"].to_string()),
                    ]
                })
                .collect();
            table(&["SEQ", "TIME", "EVENT", "STEP", "DATA"], &rows);
            Ok(())
        }
        WorkflowCommand::Cancel { run }
        | WorkflowCommand::Pause { run }
        | WorkflowCommand::Resume { run } => {
            let action = match c {
                WorkflowCommand::Cancel { .. } => "cancel",
                WorkflowCommand::Pause { .. } => "pause",
                _ => "resume",
            };
            let v = client.post(
                &format!("/api/v1/workflows/runs/{}/{action}", encode(run)),
                None,
            )?;
            if json_out {
                println!("{v}");
            } else {
                let done = match action {
                    "cancel" => "cancelled",
                    "pause" => "paused",
                    _ => "resumed",
                };
                println!("{done} run {run}");
            }
            Ok(())
        }
        WorkflowCommand::Retry { run, from, watch } => {
            let v = client.post(
                &format!("/api/v1/workflows/runs/{}/retry", encode(run)),
                Some(&json!({ "from": from })),
            )?;
            if *watch {
                return watch_run(client, run, json_out);
            }
            if json_out {
                println!("{v}");
            } else {
                let steps: Vec<&str> = v["retried"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                println!("run {run} runs again from: {}", steps.join(", "));
            }
            Ok(())
        }
        WorkflowCommand::Approve { run, step, comment } => {
            let v = client.post(
                &format!(
                    "/api/v1/workflows/runs/{}/steps/{}/approve",
                    encode(run),
                    encode(step)
                ),
                Some(&json!({ "comment": comment })),
            )?;
            if json_out {
                println!("{v}");
            } else {
                println!("approved step {step} of run {run}");
            }
            Ok(())
        }
        WorkflowCommand::Register { file } => {
            let w = load(file).map_err(|d| diagnostics_error(&d))?;
            let v = client.post(
                "/api/v1/workflows/registered",
                Some(&body(&w, BTreeMap::new())),
            )?;
            if json_out {
                println!("{v}");
            } else {
                println!("registered {}: {}", w.name, triggers(&v));
            }
            Ok(())
        }
        WorkflowCommand::Unregister { name } => {
            let v = client.delete(&format!("/api/v1/workflows/registered/{}", encode(name)))?;
            if json_out {
                println!("{v}");
            } else {
                println!("unregistered {name}");
            }
            Ok(())
        }
        WorkflowCommand::Registered => {
            let v = client.get("/api/v1/workflows/registered")?;
            if json_out {
                println!("{v}");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v["registered"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        r["name"].as_str().unwrap_or("").to_owned(),
                        triggers(r),
                        r["file"].as_str().unwrap_or("").to_owned(),
                        timestamp(r["registered_ms"].as_u64().unwrap_or(0)),
                    ]
                })
                .collect();
            if rows.is_empty() {
                println!(
                    "no workflows are registered; `noa workflow register <file.yaml>` adds one"
                );
            } else {
                table(&["NAME", "TRIGGERS", "FILE", "REGISTERED"], &rows);
            }
            Ok(())
        }
    }
}

fn triggers(r: &Value) -> String {
    let cron = r["cron"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|c| format!("cron {c:?}"));
    let subj = r["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|s| format!("subject {s}"));
    cron.chain(subj).collect::<Vec<_>>().join(", ")
}

/// One line of at most 60 characters.
fn short(s: &str) -> String {
    let line = s.lines().next().unwrap_or("").trim();
    let mut out: String = line.chars().take(60).collect();
    if line.chars().count() > 60 || s.lines().count() > 1 {
        out.push('…');
    }
    out
}

fn step_detail(s: &Value) -> String {
    if let Some(e) = s["error"].as_str() {
        return short(e);
    }
    if let Some(w) = s["waiting_for"].as_str() {
        return format!("waiting for {w}");
    }
    match (s["output"].as_str(), s["output_file"].as_str()) {
        (Some(o), _) => short(o),
        (None, Some(f)) => format!("(output in {f})"),
        _ => String::new(),
    }
}

fn print_run(v: &Value) {
    let created = v["created_ms"].as_u64().unwrap_or(0);
    println!(
        "run {}  workflow {}  {}  started {}{}",
        v["id"].as_str().unwrap_or(""),
        v["workflow"].as_str().unwrap_or(""),
        v["status"].as_str().unwrap_or(""),
        timestamp(created),
        v["finished_ms"]
            .as_u64()
            .map(|f| format!("  took {}", duration_ms(f.saturating_sub(created))))
            .unwrap_or_default()
    );
    let rows: Vec<Vec<String>> = v["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let took = match (s["started_ms"].as_u64(), s["finished_ms"].as_u64()) {
                (Some(a), Some(b)) => duration_ms(b.saturating_sub(a)),
                _ => "-".into(),
            };
            let units = match s["units_total"].as_u64() {
                Some(t) => format!("{}/{t}", s["units_done"]),
                None => "-".into(),
            };
            vec![
                s["id"].as_str().unwrap_or("").to_owned(),
                s["kind"].as_str().unwrap_or("").to_owned(),
                s["status"].as_str().unwrap_or("").to_owned(),
                s["attempts"].to_string(),
                units,
                took,
                step_detail(s),
            ]
        })
        .collect();
    table(
        &[
            "STEP",
            "KIND",
            "STATUS",
            "ATTEMPTS",
            "ITEMS",
            "TOOK",
            "OUTPUT / ERROR",
        ],
        &rows,
    );
    if let Some(e) = v["error"].as_str() {
        println!("error: {e}");
    }
    if v["outputs"].as_object().is_some_and(|o| !o.is_empty()) {
        println!("outputs:");
        for (k, val) in v["outputs"].as_object().into_iter().flatten() {
            let text = match val {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("  {k}: {text}");
        }
    }
}

/// Follows a run until it ends, with a progress bar per step on a terminal; exit code 1 if it did not succeed.
fn watch_run(client: &Client, id: &str, json_out: bool) -> CliResult<()> {
    let tty = !json_out && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let multi = indicatif::MultiProgress::new();
    if !tty {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let style =
        indicatif::ProgressStyle::with_template("{prefix:>14} [{bar:20}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
    let mut bars: BTreeMap<String, indicatif::ProgressBar> = BTreeMap::new();
    let path = format!("/api/v1/workflows/runs/{}", encode(id));
    let mut last_status = String::new();
    let v = loop {
        let v = client.get(&path)?;
        for s in v["steps"].as_array().into_iter().flatten() {
            let sid = s["id"].as_str().unwrap_or("").to_owned();
            let bar = bars.entry(sid.clone()).or_insert_with(|| {
                let b = multi.add(indicatif::ProgressBar::new(1));
                b.set_style(style.clone());
                b.set_prefix(sid.clone());
                b
            });
            let total = s["units_total"].as_u64().unwrap_or(1).max(1);
            bar.set_length(total);
            let status = s["status"].as_str().unwrap_or("");
            let done = match s["units_total"].as_u64() {
                Some(_) => s["units_done"].as_u64().unwrap_or(0),
                None => u64::from(matches!(
                    status,
                    "succeeded" | "failed" | "skipped" | "cancelled"
                )),
            };
            bar.set_position(done);
            let detail = step_detail(s);
            bar.set_message(if detail.is_empty() {
                status.to_owned()
            } else {
                format!("{status}: {detail}")
            });
        }
        let status = v["status"].as_str().unwrap_or("").to_owned();
        if !tty && !json_out && status != last_status {
            eprintln!("run {id}: {status}");
        }
        last_status = status.clone();
        if matches!(status.as_str(), "succeeded" | "failed" | "cancelled") {
            break v;
        }
        std::thread::sleep(Duration::from_millis(150));
    };
    for b in bars.values() {
        b.finish();
    }
    drop(multi);
    if json_out {
        println!("{v}");
    } else {
        print_run(&v);
        // The end of each failed step's log says why, without another command.
        for s in v["steps"].as_array().into_iter().flatten() {
            if s["status"] != "failed" {
                continue;
            }
            let step = s["id"].as_str().unwrap_or("");
            let Ok(l) = client.get(&format!(
                "/api/v1/workflows/runs/{}/steps/{}/logs",
                encode(id),
                encode(step)
            )) else {
                continue;
            };
            if let Some(last) = l["logs"].as_array().and_then(|a| a.last()) {
                let text = last["text"].as_str().unwrap_or("");
                let lines: Vec<&str> = text.lines().collect();
                eprintln!(
                    "--- {} (last lines) ---",
                    last["name"].as_str().unwrap_or(step)
                );
                for line in &lines[lines.len().saturating_sub(5)..] {
                    eprintln!("{line}");
                }
            }
        }
    }
    match v["status"].as_str() {
        Some("succeeded") => Ok(()),
        Some(s) => Err(fail(format!(
            "run {id} {s}{}",
            v["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ))),
        None => Err(fail("the run has no status")),
    }
}
