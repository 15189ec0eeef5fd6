//! Runs each command: `up` starts a node in this process; every other command is a client of a running one.

use crate::cli::{BackupCommand, Cli, Command, MessageArgs, SpawnArgs};
use crate::client::{CliError, CliResult, Client, encode};
use crate::output::{bytes, duration_ms, table, timestamp};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::io::Read;

pub fn run(cli: Cli) -> CliResult<()> {
    let data_dir = cli
        .global
        .data_dir
        .clone()
        .unwrap_or_else(noa_node::default_data_dir);
    let json_out = cli.global.json;
    if let Command::Up {
        listen,
        set,
        passphrase_file,
    } = &cli.command
    {
        return up(
            &data_dir,
            listen.as_deref(),
            set,
            passphrase_file.as_deref(),
            json_out,
        );
    }
    // Commands that work on the data directory itself, without a daemon.
    match &cli.command {
        Command::Model(
            c @ (crate::cli::ModelCommand::List
            | crate::cli::ModelCommand::Pull { .. }
            | crate::cli::ModelCommand::Add { .. }
            | crate::cli::ModelCommand::AddRemote { .. }
            | crate::cli::ModelCommand::Show { .. }
            | crate::cli::ModelCommand::Rm { .. }),
        ) => return crate::infer::model_offline(&data_dir, c, json_out),
        Command::Workflow(crate::cli::WorkflowCommand::Validate { files }) => {
            return crate::workflow::validate(files, json_out);
        }
        Command::Config(c) => {
            let client = Client::new(cli.global.addr.clone(), cli.global.token.clone(), &data_dir);
            return crate::trust::config(&data_dir, &client, c, json_out);
        }
        Command::Store(c) => return crate::trust::store(&data_dir, c, json_out),
        Command::Backup(c @ (BackupCommand::Verify { .. } | BackupCommand::Restore { .. })) => {
            return crate::trust::backup_offline(&data_dir, c, json_out);
        }
        _ => {}
    }
    if let Command::Completions { shell } = cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "noa", &mut std::io::stdout());
        return Ok(());
    }
    let client = Client::new(cli.global.addr.clone(), cli.global.token.clone(), &data_dir);
    match cli.command {
        Command::Up { .. }
        | Command::Completions { .. }
        | Command::Config(_)
        | Command::Store(_)
        | Command::Backup(BackupCommand::Verify { .. } | BackupCommand::Restore { .. }) => {
            unreachable!("handled above")
        }
        Command::Model(c) => crate::infer::model_daemon(&client, c, json_out),
        Command::Ask(a) => crate::infer::ask(&client, a, json_out),
        Command::Workflow(c) => crate::workflow::workflow(&client, &c, json_out),
        Command::Fs(c) => crate::trust::fs(&client, c, json_out),
        Command::Secret(c) => crate::trust::secret(&client, c, json_out),
        Command::Backup(c) => crate::trust::backup_create(&client, c, json_out),
        Command::Audit(c) => crate::trust::audit(&client, c, json_out),
        Command::Status => status(&client, json_out),
        Command::Spawn(args) => spawn(&client, args, json_out),
        Command::Ps => ps(&client, json_out),
        Command::Stop { name } => lifecycle(&client, &name, "stop", "stopped", json_out),
        Command::Kill { name } => lifecycle(&client, &name, "kill", "killed", json_out),
        Command::Restart { name } => lifecycle(&client, &name, "restart", "restarted", json_out),
        Command::Logs { name, tail, follow } => logs(&client, &name, tail, follow, json_out),
        Command::Pub(m) => {
            let body = message_body(&m, None)?;
            let v = client.post("/api/v1/bus/publish", Some(&body))?;
            if json_out {
                println!("{v}");
            } else {
                println!("published to {} subscriber(s)", v["delivered"]);
            }
            Ok(())
        }
        Command::Req { message, timeout } => {
            let timeout =
                noa_types::parse_duration(&timeout).map_err(|e| CliError::failed(e.to_string()))?;
            let body = message_body(&message, Some(timeout.as_millis() as u64))?;
            let v = client.post("/api/v1/bus/request", Some(&body))?;
            if json_out {
                println!("{v}");
            } else {
                println!("{}", payload_text(&v));
            }
            Ok(())
        }
        Command::Sub { pattern, count } => sub(&client, &pattern, count, json_out),
        Command::Events {
            name,
            limit,
            follow,
        } => events(&client, name, limit, follow, json_out),
    }
}

fn up(
    data_dir: &std::path::Path,
    listen: Option<&str>,
    set: &[String],
    passphrase_file: Option<&std::path::Path>,
    json_out: bool,
) -> CliResult<()> {
    let mut flags = Vec::new();
    if let Some(l) = listen {
        flags.push((
            "server.listen".to_owned(),
            l.to_owned(),
            "--listen".to_owned(),
        ));
    }
    for kv in set {
        let (k, v) = kv.split_once('=').ok_or_else(|| {
            CliError::failed(format!(
                "--set {kv:?} must be KEY=VALUE, e.g. fs.quota_shared=2GiB"
            ))
        })?;
        flags.push((k.to_owned(), v.to_owned(), format!("--set {k}")));
    }
    let config = noa_node::Config::load(data_dir, &|k| std::env::var(k).ok(), &flags)
        .map_err(|e| CliError::failed(e.to_string()))?;
    let passphrase = crate::trust::passphrase(passphrase_file)?;
    let filter = config.log_level().to_owned();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failed(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async {
        let node = noa_node::Node::start(noa_node::NodeOptions { data_dir: data_dir.to_owned(), config, passphrase }).await.map_err(|e| CliError::failed(e.to_string()))?;
        let addr = node.local_addr();
        let ms = node.startup_time().as_secs_f64() * 1000.0;
        if json_out {
            println!("{}", json!({ "listen": addr.to_string(), "data_dir": data_dir.display().to_string(), "startup_ms": ms }));
        } else {
            println!("NOA ARK OS {} listening on http://{addr} (data dir {}, ready in {ms:.1} ms)", env!("CARGO_PKG_VERSION"), data_dir.display());
            println!("admin token: {}", noa_node::token_path(data_dir).display());
        }
        node.run(shutdown_signal()).await.map_err(|e| CliError::failed(e.to_string()))
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "Cannot listen for SIGTERM; only Ctrl-C will stop the daemon.");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("Received SIGINT."),
        _ = term.recv() => tracing::info!("Received SIGTERM."),
    }
}

fn status(client: &Client, json_out: bool) -> CliResult<()> {
    client.healthz()?;
    let v = client.get("/api/v1/status")?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let k = &v["kernel"];
    let mut states: Vec<String> = k["by_state"]
        .as_object()
        .map(|m| m.iter().map(|(s, n)| format!("{n} {s}")).collect())
        .unwrap_or_default();
    states.sort();
    println!(
        "NOA ARK OS {} at {}: {}",
        v["version"].as_str().unwrap_or("?"),
        client.base(),
        v["status"].as_str().unwrap_or("?")
    );
    let rows = [
        (
            "kernel",
            format!(
                "ok: {} processes ({}); policy {}",
                k["processes"],
                states.join(", "),
                k["policy"].as_str().unwrap_or("?")
            ),
        ),
        (
            "store",
            format!(
                "{}: schema v{}, {}",
                v["store"]["status"].as_str().unwrap_or("?"),
                v["store"]["schema_version"],
                v["store"]["path"].as_str().unwrap_or("?")
            ),
        ),
        (
            "server",
            format!(
                "{}: listening on {}, {} requests served",
                v["server"]["status"].as_str().unwrap_or("?"),
                v["listen"].as_str().unwrap_or("?"),
                v["server"]["requests"]
            ),
        ),
        (
            "bus",
            format!(
                "{} published, {} delivered, {} dropped, {} subscriptions",
                k["bus"]["published"],
                k["bus"]["delivered"],
                k["bus"]["dropped"],
                k["bus"]["subscriptions"]
            ),
        ),
        ("uptime", duration_ms(v["uptime_ms"].as_u64().unwrap_or(0))),
        (
            "memory",
            format!(
                "{} resident",
                bytes(v["memory"]["rss_bytes"].as_u64().unwrap_or(0))
            ),
        ),
        ("data dir", v["data_dir"].as_str().unwrap_or("?").to_owned()),
    ];
    for (k, v) in rows {
        println!("  {k:<9} {v}");
    }
    Ok(())
}

fn parse_size(s: &str) -> CliResult<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| {
        CliError::failed(format!(
            "--memory {s:?} is not a size; write e.g. 512M or 2G"
        ))
    })?;
    let mult: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => {
            return Err(CliError::failed(format!(
                "--memory {s:?} has an unknown unit; use K, M or G"
            )));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| CliError::failed(format!("--memory {s:?} is too large")))
}

fn ms(flag: &str, v: &Option<String>) -> CliResult<Option<u64>> {
    v.as_deref()
        .map(|s| {
            noa_types::parse_duration(s)
                .map(|d| d.as_millis() as u64)
                .map_err(|e| CliError::failed(format!("--{flag}: {e}")))
        })
        .transpose()
}

fn spawn(client: &Client, a: Box<SpawnArgs>, json_out: bool) -> CliResult<()> {
    let mut env = BTreeMap::new();
    for kv in &a.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| CliError::failed(format!("--env {kv:?} must be NAME=VALUE")))?;
        env.insert(k.to_owned(), v.to_owned());
    }
    let mut secrets = BTreeMap::new();
    for kv in &a.secrets {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| CliError::failed(format!("--secret {kv:?} must be VAR=SECRET_NAME")))?;
        secrets.insert(k.to_owned(), v.to_owned());
    }
    let limits = json!({
        "memory_bytes": a.memory.as_deref().map(parse_size).transpose()?,
        "cpu_seconds": a.cpu,
        "open_files": a.files,
        "mailbox": a.mailbox,
        "stop_grace_ms": ms("grace", &a.grace)?,
    });
    let mut spec = json!({
        "name": a.name, "env": env, "secrets": secrets, "limits": limits, "publish": a.publish, "subscribe": a.subscribe, "parent": a.parent,
    });
    if a.supervisor {
        if !a.command.is_empty() {
            return Err(CliError::failed(
                "a supervisor runs no command; drop the part after `--`",
            ));
        }
        let mut sup = Map::new();
        if let Some(s) = &a.strategy {
            let s: noa_types::Strategy = s
                .parse()
                .map_err(|e: noa_types::Error| CliError::failed(e.to_string()))?;
            sup.insert(
                "strategy".into(),
                serde_json::to_value(s).unwrap_or(Value::Null),
            );
        }
        if let Some(n) = a.max_restarts {
            sup.insert("max_restarts".into(), json!(n));
        }
        for (key, flag, v) in [
            ("within_ms", "within", &a.within),
            ("backoff_ms", "backoff", &a.backoff),
            ("backoff_max_ms", "backoff-max", &a.backoff_max),
        ] {
            if let Some(ms) = ms(flag, v)? {
                sup.insert(key.into(), json!(ms));
            }
        }
        spec["kind"] = json!("builtin");
        spec["builtin"] = json!("supervisor");
        spec["supervisor"] = Value::Object(sup);
        spec["restart"] = json!(a.restart.as_deref().unwrap_or("permanent"));
    } else if let Some(b) = &a.builtin {
        if !a.command.is_empty() {
            return Err(CliError::failed(
                "a builtin runs no command; drop the part after `--`",
            ));
        }
        spec["kind"] = json!("builtin");
        spec["builtin"] = json!(b);
        spec["restart"] = json!(a.restart.as_deref().unwrap_or("transient"));
    } else {
        let Some((cmd, args)) = a.command.split_first() else {
            return Err(CliError::with_hint(
                "nothing to run",
                "put the command after `--`: noa spawn --name echo -- python3 examples/agents/echo.py",
            ));
        };
        // Relative paths mean what they mean where the user typed them, not in the daemon's directory.
        let cwd = match &a.cwd {
            Some(c) => std::path::absolute(c).unwrap_or_else(|_| c.clone()),
            None => std::env::current_dir()
                .map_err(|e| CliError::failed(format!("cannot read the current directory: {e}")))?,
        };
        spec["kind"] = json!("native");
        spec["native"] = json!({ "command": cmd, "args": args, "cwd": cwd.display().to_string() });
        spec["restart"] = json!(a.restart.as_deref().unwrap_or("transient"));
    }
    if let Some(r) = &a.restart {
        r.parse::<noa_types::RestartPolicy>()
            .map_err(|e| CliError::failed(e.to_string()))?;
    }
    let v = client.post("/api/v1/processes", Some(&spec))?;
    if json_out {
        println!("{v}");
    } else {
        println!(
            "spawned {} (pid {}, {}, restart {}): {}",
            v["name"].as_str().unwrap_or("?"),
            v["pid"],
            v["kind"].as_str().unwrap_or("?"),
            v["restart"].as_str().unwrap_or("?"),
            v["command"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

fn ps(client: &Client, json_out: bool) -> CliResult<()> {
    let v = client.get("/api/v1/processes")?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let procs = v.as_array().cloned().unwrap_or_default();
    // Depth-first from root, children in start (pid) order.
    let mut rows = Vec::new();
    let mut stack: Vec<(u64, usize)> = procs
        .iter()
        .filter(|p| p["parent_pid"].is_null())
        .map(|p| (p["pid"].as_u64().unwrap_or(0), 0))
        .collect();
    while let Some((pid, depth)) = stack.pop() {
        let Some(p) = procs.iter().find(|p| p["pid"].as_u64() == Some(pid)) else {
            continue;
        };
        let mut kids: Vec<u64> = procs
            .iter()
            .filter(|c| c["parent_pid"].as_u64() == Some(pid) && c["pid"].as_u64() != Some(pid))
            .filter_map(|c| c["pid"].as_u64())
            .collect();
        kids.sort_unstable_by(|a, b| b.cmp(a));
        stack.extend(kids.into_iter().map(|k| (k, depth + 1)));
        let state = p["state"].as_str().unwrap_or("?");
        let live = !matches!(state, "exited" | "failed");
        let mut command = p["command"].as_str().unwrap_or("").to_owned();
        if let Some(s) = p["strategy"].as_str() {
            command = format!("{command} ({s})");
        }
        if let (false, Some(exit)) = (live, p["exit"].as_str()) {
            command = format!("{command}  [{exit}]");
        }
        rows.push(vec![
            pid.to_string(),
            format!(
                "{}{}",
                "  ".repeat(depth),
                p["name"].as_str().unwrap_or("?")
            ),
            p["kind"].as_str().unwrap_or("?").to_owned(),
            state.to_owned(),
            p["restart"].as_str().unwrap_or("?").to_owned(),
            p["restarts"].to_string(),
            p["os_pid"]
                .as_u64()
                .map(|o| o.to_string())
                .unwrap_or_else(|| "-".into()),
            if live {
                duration_ms(p["uptime_ms"].as_u64().unwrap_or(0))
            } else {
                "-".into()
            },
            command,
        ]);
    }
    table(
        &[
            "PID", "NAME", "KIND", "STATE", "RESTART", "RESTARTS", "OS-PID", "UPTIME", "COMMAND",
        ],
        &rows,
    );
    Ok(())
}

fn lifecycle(
    client: &Client,
    name: &str,
    action: &str,
    done: &str,
    json_out: bool,
) -> CliResult<()> {
    let v = client.post(
        &format!("/api/v1/processes/{}/{action}", encode(name)),
        None,
    )?;
    if json_out {
        println!("{v}");
    } else {
        let state = v["state"].as_str().unwrap_or("?");
        let exit = v["exit"]
            .as_str()
            .map(|e| format!(", {e}"))
            .unwrap_or_default();
        println!("{done} {name} (pid {}): now {state}{exit}", v["pid"]);
    }
    Ok(())
}

fn print_log(l: &Value, json_out: bool) {
    if json_out {
        println!("{l}");
    } else {
        println!(
            "{} [{}] {}",
            timestamp(l["ts_ms"].as_u64().unwrap_or(0)),
            l["level"].as_str().unwrap_or("?"),
            l["line"].as_str().unwrap_or("")
        );
    }
}

fn logs(client: &Client, name: &str, tail: usize, follow: bool, json_out: bool) -> CliResult<()> {
    // Fail early and clearly on an unknown name.
    client.get(&format!("/api/v1/processes/{}", encode(name)))?;
    if !follow {
        let v = client.get(&format!(
            "/api/v1/processes/{}/logs?tail={tail}",
            encode(name)
        ))?;
        for l in v.as_array().cloned().unwrap_or_default() {
            print_log(&l, json_out);
        }
        return Ok(());
    }
    client.stream(
        &format!(
            "/api/v1/processes/{}/logs?tail={tail}&follow=true",
            encode(name)
        ),
        |_, data| {
            if let Ok(l) = serde_json::from_str::<Value>(data) {
                print_log(&l, json_out);
            }
            true
        },
    )
}

fn message_body(m: &MessageArgs, timeout_ms: Option<u64>) -> CliResult<Value> {
    let mut body = Map::new();
    body.insert("subject".into(), json!(m.subject));
    if let Some(d) = &m.data {
        let text = if d == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| CliError::failed(format!("cannot read standard input: {e}")))?;
            s
        } else {
            d.clone()
        };
        match serde_json::from_str::<Value>(&text) {
            Ok(v) => body.insert("data".into(), v),
            Err(_) => body.insert("text".into(), json!(text)),
        };
    }
    if !m.headers.is_empty() {
        let mut h = Map::new();
        for kv in &m.headers {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| CliError::failed(format!("--header {kv:?} must be NAME=VALUE")))?;
            h.insert(k.to_owned(), json!(v));
        }
        body.insert("headers".into(), Value::Object(h));
    }
    if let Some(t) = timeout_ms {
        body.insert("timeout_ms".into(), json!(t.clamp(1, 300_000)));
    }
    Ok(Value::Object(body))
}

/// A message's payload for people: JSON as JSON, text as text.
fn payload_text(v: &Value) -> String {
    if let Some(d) = v.get("data") {
        // A JSON string is shown as the text it holds.
        return d
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| d.to_string());
    }
    if let Some(t) = v.get("text").and_then(Value::as_str) {
        return t.to_owned();
    }
    if let Some(b) = v.get("base64").and_then(Value::as_str) {
        return format!("(binary, base64) {b}");
    }
    String::new()
}

fn sub(client: &Client, pattern: &str, count: Option<u64>, json_out: bool) -> CliResult<()> {
    let mut seen = 0u64;
    if count == Some(0) {
        return Ok(());
    }
    client.stream(
        &format!("/api/v1/events/stream?subject={}", encode(pattern)),
        |_, data| {
            let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
            if json_out {
                println!("{v}");
            } else {
                println!(
                    "[{}] {}",
                    v["subject"].as_str().unwrap_or("?"),
                    payload_text(&v)
                );
            }
            use std::io::Write;
            let _ = std::io::stdout().flush();
            seen += 1;
            count.is_none_or(|c| seen < c)
        },
    )
}

fn event_row(e: &Value) -> Vec<String> {
    let detail = match &e["detail"] {
        Value::Null => String::new(),
        d => d
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| d.to_string()),
    };
    vec![
        e["seq"].to_string(),
        timestamp(e["ts_ms"].as_u64().unwrap_or(0)),
        e["pid"].to_string(),
        e["name"].as_str().unwrap_or("?").to_owned(),
        e["event"].as_str().unwrap_or("?").to_owned(),
        detail,
    ]
}

fn events(
    client: &Client,
    name: Option<String>,
    limit: u32,
    follow: bool,
    json_out: bool,
) -> CliResult<()> {
    let mut q = format!("/api/v1/events?limit={limit}");
    if let Some(n) = &name {
        q.push_str(&format!("&name={}", encode(n)));
    }
    let v = client.get(&q)?;
    let list = v.as_array().cloned().unwrap_or_default();
    if json_out {
        for e in &list {
            println!("{e}");
        }
    } else {
        table(
            &["SEQ", "TIME (UTC)", "PID", "NAME", "EVENT", "DETAIL"],
            &list.iter().map(event_row).collect::<Vec<_>>(),
        );
    }
    if !follow {
        return Ok(());
    }
    client.stream("/api/v1/events/stream?subject=sys.events.%3E", |_, data| {
        let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
        let e = &v["data"];
        if name
            .as_deref()
            .is_some_and(|n| e["name"].as_str() != Some(n))
        {
            return true;
        }
        if json_out {
            println!("{e}");
        } else {
            println!("{}", event_row(e)[1..].join("  "));
        }
        true
    })
}
