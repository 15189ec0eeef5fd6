//! Commands for files, secrets, configuration, backups, the audit log and store keys.

use crate::cli::{
    AuditCommand, AuditFilter, BackupCommand, ConfigCommand, FsCommand, SecretCommand, StoreCommand,
};
use crate::client::{CliError, CliResult, Client, encode, fail};
use crate::output::{bytes, progress, table, timestamp};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::path::Path;

/// The API path of a VFS path: `/shared/x` → `/api/v1/fs/shared/x` (each component percent-encoded).
fn fs_url(path: &str) -> CliResult<String> {
    if !path.starts_with('/') {
        return Err(CliError::with_hint(
            format!("{path:?} is not an absolute VFS path"),
            "VFS paths start with /: /shared/..., /agents/<name>/..., /runs/<id>/..., /host/<mount>/...",
        ));
    }
    let parts: Vec<String> = path
        .split('/')
        .filter(|p| !p.is_empty())
        .map(encode)
        .collect();
    Ok(if parts.is_empty() {
        "/api/v1/fs".into()
    } else {
        format!("/api/v1/fs/{}", parts.join("/"))
    })
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub fn fs(client: &Client, c: FsCommand, json_out: bool) -> CliResult<()> {
    match c {
        FsCommand::Put { path, source } => {
            let url = fs_url(&path)?;
            let v = if source == "-" {
                client.put_stream(&url, &mut std::io::stdin().lock())?
            } else {
                let file = std::fs::File::open(&source)
                    .map_err(|e| fail(format!("cannot read {source}: {e}")))?;
                let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                let bar = progress(size, "uploading", json_out);
                let mut reader = bar.wrap_read(file);
                let v = client.put_stream(&url, &mut reader)?;
                bar.finish_and_clear();
                v
            };
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "wrote {} ({}), version {}",
                    v["path"].as_str().unwrap_or(&path),
                    bytes(v["size"].as_u64().unwrap_or(0)),
                    v["version"]
                        .as_u64()
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "-".into())
                );
            }
            Ok(())
        }
        FsCommand::Cat { path, version } => {
            let mut url = fs_url(&path)?;
            if let Some(v) = version {
                url.push_str(&format!("?version={v}"));
            }
            let (headers, mut body) = client.download(&url)?;
            if headers
                .get("content-type")
                .is_some_and(|c| c.as_bytes().starts_with(b"application/json"))
            {
                return Err(CliError::with_hint(
                    format!("{path} is a folder"),
                    format!("list it with `noa fs ls {path}`"),
                ));
            }
            let mut out = std::io::stdout().lock();
            std::io::copy(&mut body, &mut out).map_err(|e| fail(format!("reading {path}: {e}")))?;
            out.flush().map_err(fail)?;
            Ok(())
        }
        FsCommand::Ls { path } => {
            let path = path.unwrap_or_else(|| "/".into());
            let v = client.get(&format!("{}?list", fs_url(&path)?))?;
            if json_out {
                print_json(&v);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v["entries"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    let dir = e["dir"].as_bool().unwrap_or(false);
                    vec![
                        format!(
                            "{}{}",
                            e["name"].as_str().unwrap_or(""),
                            if dir { "/" } else { "" }
                        ),
                        if dir && e["size"].as_u64() == Some(0) {
                            "-".into()
                        } else {
                            bytes(e["size"].as_u64().unwrap_or(0))
                        },
                        e["version"]
                            .as_u64()
                            .map(|n| n.to_string())
                            .unwrap_or_else(|| "-".into()),
                        e["mtime_ms"]
                            .as_u64()
                            .map(timestamp)
                            .unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            table(&["NAME", "SIZE", "VERSION", "MODIFIED"], &rows);
            Ok(())
        }
        FsCommand::Rm { path } => {
            let v = client.delete(&fs_url(&path)?)?;
            if json_out {
                print_json(&v);
            } else {
                println!("deleted {path} (its history stays; `noa fs history {path}`)");
            }
            Ok(())
        }
        FsCommand::History { path } => {
            let v = client.get(&format!("{}?history", fs_url(&path)?))?;
            if json_out {
                print_json(&v);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    vec![
                        e["version"].to_string(),
                        e["op"].as_str().unwrap_or("").to_owned(),
                        bytes(e["size"].as_u64().unwrap_or(0)),
                        e["principal"].as_str().unwrap_or("").to_owned(),
                        timestamp(e["mtime_ms"].as_u64().unwrap_or(0)),
                    ]
                })
                .collect();
            table(&["VERSION", "OP", "SIZE", "BY", "WHEN"], &rows);
            Ok(())
        }
        FsCommand::Rollback { path, to } => {
            let v = client.post(&fs_url(&path)?, Some(&json!({ "rollback_to": to })))?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "{path} now has the contents of version {to} (as version {})",
                    v["version"]
                );
            }
            Ok(())
        }
        FsCommand::Txn {
            puts,
            rms,
            rollbacks,
        } => {
            use base64::Engine;
            let mut ops = Vec::new();
            for p in &puts {
                let (dest, src) = p
                    .split_once('=')
                    .ok_or_else(|| fail(format!("--put {p:?} must be DEST=LOCAL_FILE")))?;
                let data =
                    std::fs::read(src).map_err(|e| fail(format!("cannot read {src}: {e}")))?;
                ops.push(json!({ "op": "put", "path": dest,
                    "content_base64": base64::engine::general_purpose::STANDARD.encode(data) }));
            }
            for r in &rms {
                ops.push(json!({ "op": "delete", "path": r }));
            }
            for r in &rollbacks {
                let (path, v) = r
                    .split_once('=')
                    .and_then(|(p, v)| Some((p, v.parse::<u64>().ok()?)))
                    .ok_or_else(|| fail(format!("--rollback {r:?} must be PATH=VERSION")))?;
                ops.push(json!({ "op": "rollback", "path": path, "to": v }));
            }
            if ops.is_empty() {
                return Err(fail("nothing to do: give --put, --rm or --rollback"));
            }
            let v = client.post("/api/v1/fs-txn", Some(&json!({ "ops": ops })))?;
            if json_out {
                print_json(&v);
            } else {
                println!("committed {} change(s) together", ops.len());
            }
            Ok(())
        }
        FsCommand::Mount {
            at,
            host_path,
            read_only,
        } => {
            let name = mount_name(&at)?;
            let host = std::path::absolute(&host_path).map_err(fail)?;
            let v = client.post(
                "/api/v1/mounts",
                Some(&json!({ "name": name, "host_path": host, "read_only": read_only })),
            )?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "mounted {} at /host/{name}{}",
                    v["host_path"].as_str().unwrap_or(""),
                    if read_only { " (read-only)" } else { "" }
                );
            }
            Ok(())
        }
        FsCommand::Unmount { at } => {
            let name = mount_name(&at)?;
            let v = client.delete(&format!("/api/v1/mounts/{}", encode(&name)))?;
            if json_out {
                print_json(&v);
            } else {
                println!("unmounted /host/{name}");
            }
            Ok(())
        }
        FsCommand::Mounts => {
            let v = client.get("/api/v1/mounts")?;
            if json_out {
                print_json(&v);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v["mounts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    vec![
                        format!("/host/{}", m["name"].as_str().unwrap_or("")),
                        m["host_path"].as_str().unwrap_or("").to_owned(),
                        if m["read_only"].as_bool().unwrap_or(false) {
                            "ro"
                        } else {
                            "rw"
                        }
                        .into(),
                    ]
                })
                .collect();
            table(&["AT", "HOST FOLDER", "MODE"], &rows);
            Ok(())
        }
        FsCommand::Usage => {
            let v = client.get("/api/v1/fs-usage")?;
            if json_out {
                print_json(&v);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v["usage"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|u| {
                    let limit = u["limit"].as_u64().unwrap_or(0);
                    vec![
                        u["namespace"].as_str().unwrap_or("").to_owned(),
                        bytes(u["bytes"].as_u64().unwrap_or(0)),
                        if limit == 0 {
                            "unlimited".into()
                        } else {
                            bytes(limit)
                        },
                    ]
                })
                .collect();
            table(&["NAMESPACE", "USED", "QUOTA"], &rows);
            Ok(())
        }
    }
}

fn mount_name(at: &str) -> CliResult<String> {
    let name = at
        .trim_end_matches('/')
        .strip_prefix("/host/")
        .unwrap_or(at);
    if name.is_empty() || name.contains('/') {
        return Err(fail(format!(
            "{at:?} is not a mount point; write /host/<name>"
        )));
    }
    Ok(name.to_owned())
}

pub fn secret(client: &Client, c: SecretCommand, json_out: bool) -> CliResult<()> {
    match c {
        SecretCommand::Set { name, from_file } => {
            let value = match from_file {
                Some(f) => std::fs::read_to_string(&f)
                    .map_err(|e| fail(format!("cannot read {}: {e}", f.display())))?,
                None if std::io::IsTerminal::is_terminal(&std::io::stdin()) => {
                    rpassword::prompt_password(format!("value of {name} (not shown): "))
                        .map_err(fail)?
                }
                None => {
                    let mut v = String::new();
                    std::io::stdin().read_to_string(&mut v).map_err(fail)?;
                    v
                }
            };
            // A trailing newline from `echo` or a file is not part of the secret.
            let value = value.strip_suffix('\n').unwrap_or(&value);
            let value = value.strip_suffix('\r').unwrap_or(value);
            if value.is_empty() {
                return Err(fail("the value is empty; nothing was stored"));
            }
            let v = client.put_json(
                &format!("/api/v1/secrets/{}", encode(&name)),
                &json!({ "value": value }),
            )?;
            if json_out {
                print_json(&v);
            } else {
                println!("secret {name} set");
            }
            Ok(())
        }
        SecretCommand::List => {
            let v = client.get("/api/v1/secrets")?;
            if json_out {
                print_json(&v);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v["secrets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    vec![
                        s["name"].as_str().unwrap_or("").to_owned(),
                        timestamp(s["updated_ms"].as_u64().unwrap_or(0)),
                    ]
                })
                .collect();
            table(&["NAME", "SET AT"], &rows);
            Ok(())
        }
        SecretCommand::Rm { name } => {
            let v = client.delete(&format!("/api/v1/secrets/{}", encode(&name)))?;
            if json_out {
                print_json(&v);
            } else {
                println!("secret {name} deleted");
            }
            Ok(())
        }
    }
}

pub fn config(
    data_dir: &Path,
    client: &Client,
    c: &ConfigCommand,
    json_out: bool,
) -> CliResult<()> {
    match c {
        ConfigCommand::Show { effective: true }
            if noa_node::addr_path(data_dir).exists() && client.healthz().is_ok() =>
        {
            // The daemon's own view: it knows the flags it was started with.
            let v = client.get("/api/v1/config")?;
            if json_out {
                print_json(&v);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v["settings"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    ["key", "value", "source"]
                        .iter()
                        .map(|k| e[*k].as_str().unwrap_or("").to_owned())
                        .collect()
                })
                .collect();
            println!("the running daemon at {}:", client.base());
            table(&["KEY", "VALUE", "SOURCE"], &rows);
            Ok(())
        }
        ConfigCommand::Show { effective } => {
            let cfg =
                noa_node::Config::load(data_dir, &|k| std::env::var(k).ok(), &[]).map_err(fail)?;
            let entries: Vec<_> = cfg
                .entries()
                .into_iter()
                .filter(|e| *effective || matches!(e.source, noa_node::config::Source::File { .. }))
                .collect();
            if json_out {
                let v: Vec<Value> = entries
                    .iter()
                    .map(|e| json!({ "key": e.key, "value": e.value, "source": e.source.to_string(), "doc": e.doc }))
                    .collect();
                print_json(&json!({ "settings": v }));
                return Ok(());
            }
            if entries.is_empty() {
                println!(
                    "nothing set in {}; `noa config show --effective` lists every setting",
                    data_dir.join(noa_node::config::FILE).display()
                );
                return Ok(());
            }
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| vec![e.key.to_owned(), e.value.clone(), e.source.to_string()])
                .collect();
            table(&["KEY", "VALUE", "SOURCE"], &rows);
            Ok(())
        }
        ConfigCommand::Set { key, value } => {
            let path = noa_node::config::set(data_dir, key, value).map_err(fail)?;
            if json_out {
                print_json(&json!({ "key": key, "value": value, "file": path }));
            } else {
                println!(
                    "set {key} = {value:?} in {} (a running daemon applies it at its next start)",
                    path.display()
                );
            }
            Ok(())
        }
    }
}

/// The store passphrase: from `--passphrase-file`, else `NOA_PASSPHRASE`.
pub fn passphrase(file: Option<&Path>) -> CliResult<Option<String>> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).map_err(|e| {
            fail(format!(
                "cannot read the passphrase file {}: {e}",
                f.display()
            ))
        })?;
        return Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned()));
    }
    Ok(std::env::var("NOA_PASSPHRASE")
        .ok()
        .filter(|p| !p.is_empty()))
}

pub fn store(data_dir: &Path, c: &StoreCommand, json_out: bool) -> CliResult<()> {
    let StoreCommand::Rekey { to } = c;
    // The daemon holds the lock while it runs; rekeying under it would race its writes.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data_dir.join("noa.lock"))
        .map_err(|e| fail(format!("cannot open {}: {e}", data_dir.display())))?;
    if lock.try_lock().is_err() {
        return Err(CliError::with_hint(
            format!("a daemon is running on {}", data_dir.display()),
            "stop it (Ctrl-C or SIGTERM), rekey, then start it again",
        ));
    }
    let cfg = noa_node::Config::load(data_dir, &|k| std::env::var(k).ok(), &[]).map_err(fail)?;
    let current_pass = if cfg.uses_passphrase() {
        passphrase(None)?
    } else {
        None
    };
    let opts = noa_node::store_options(data_dir, &cfg, current_pass).map_err(fail)?;
    let db = data_dir.join("noa.db");
    if !db.exists() {
        return Err(fail(format!("there is no store in {}", data_dir.display())));
    }
    let store = noa_node::store::Store::open_with(&db, opts).map_err(fail)?;
    let old_id = store.kek_id();
    let to = to.clone().unwrap_or_else(|| {
        if cfg.uses_passphrase() {
            "passphrase"
        } else {
            "file"
        }
        .to_owned()
    });
    let new = match to.as_str() {
        "file" => noa_node::store::KeySource::File(data_dir.join("store.key")),
        "passphrase" => {
            let p = std::env::var("NOA_NEW_PASSPHRASE")
                .ok()
                .or_else(|| std::env::var("NOA_PASSPHRASE").ok())
                .filter(|p| !p.is_empty())
                .ok_or_else(|| {
                    CliError::with_hint(
                        "no new passphrase given",
                        "set NOA_NEW_PASSPHRASE (or NOA_PASSPHRASE when switching from a key file)",
                    )
                })?;
            noa_node::store::KeySource::Passphrase(p)
        }
        other => return Err(fail(format!("--to {other:?}: use file or passphrase"))),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(fail)?;
    // The configuration names the new kind before the keyring changes; if the rekey fails it is put back.
    let switching =
        to == "file" && cfg.uses_passphrase() || to == "passphrase" && !cfg.uses_passphrase();
    if switching {
        noa_node::config::set(data_dir, "store.key", &to).map_err(fail)?;
    }
    let id = match runtime.block_on(store.rekey("user:admin", new)) {
        Ok(id) => id,
        Err(e) => {
            if switching {
                let back = if to == "file" { "passphrase" } else { "file" };
                let _ = noa_node::config::set(data_dir, "store.key", back);
            }
            return Err(fail(e));
        }
    };
    runtime.block_on(store.flush()).map_err(fail)?;
    if json_out {
        print_json(&json!({ "key_id": id, "kind": to }));
    } else {
        println!("the data key is now wrapped by {to} key {id}; no file was rewritten");
        println!(
            "backups taken before need the previous key, kept as {}",
            noa_node::store::retired_key_path(&data_dir.join("store.key"), &old_id).display()
        );
        if to == "file" {
            println!(
                "keep a copy of {} somewhere safe",
                data_dir.join("store.key").display()
            );
        }
    }
    Ok(())
}

pub fn backup_create(client: &Client, c: BackupCommand, json_out: bool) -> CliResult<()> {
    let BackupCommand::Create { out, include_keys } = c else {
        return Err(fail("not a daemon command"));
    };
    if out.exists() {
        return Err(fail(format!(
            "{} exists; pick another --out",
            out.display()
        )));
    }
    let url = format!(
        "/api/v1/backup{}",
        if include_keys {
            "?include_keys=true"
        } else {
            ""
        }
    );
    let (headers, mut body) = client.download(&url)?;
    let estimate = headers
        .get("x-noa-backup-estimate")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let tmp = out.with_extension("partial");
    let file = std::fs::File::create(&tmp)
        .map_err(|e| fail(format!("cannot write {}: {e}", tmp.display())))?;
    let bar = progress(estimate, "backing up", json_out);
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut copied: std::io::Result<u64> = Ok(0);
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match body.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                if let Err(e) = w.write_all(&buf[..k]) {
                    copied = Err(e);
                    break;
                }
                bar.inc(k as u64);
                if let Ok(n) = &mut copied {
                    *n += k as u64;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                copied = Err(e);
                break;
            }
        }
    }
    bar.finish_and_clear();
    let finish = copied
        .and_then(|n| w.flush().map(|_| n))
        .map_err(|e| fail(format!("the backup broke off: {e}")))
        .and_then(|n| {
            let file = w.into_inner().map_err(|e| fail(e.error()))?;
            file.sync_all().map_err(fail)?;
            Ok(n)
        });
    let n = match finish {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    // Check the archive before calling it done: a broken download must not look like a backup.
    let manifest = match noa_node::store::backup::verify(&tmp, &mut |_, _| {}) {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(e));
        }
    };
    std::fs::rename(&tmp, &out).map_err(fail)?;
    if json_out {
        print_json(&json!({ "out": out, "bytes": n, "manifest": manifest }));
    } else {
        println!(
            "backup written to {} ({}): {}",
            out.display(),
            bytes(n),
            noa_node::store::backup::describe(&manifest)
        );
        if !manifest.includes_keys {
            println!(
                "the archive holds no keys: restoring it needs this data directory's store.key (or the passphrase)"
            );
        }
    }
    Ok(())
}

pub fn backup_offline(data_dir: &Path, c: &BackupCommand, json_out: bool) -> CliResult<()> {
    match c {
        BackupCommand::Verify { archive } => {
            let total = std::fs::metadata(archive).map(|m| m.len()).unwrap_or(0);
            let bar = progress(total, "verifying", json_out);
            let m = noa_node::store::backup::verify(archive, &mut |done, _| bar.set_position(done))
                .map_err(fail);
            bar.finish_and_clear();
            let m = m?;
            if json_out {
                print_json(&json!({ "ok": true, "manifest": m }));
            } else {
                println!(
                    "ok: {} — every hash matches and the database is intact",
                    noa_node::store::backup::describe(&m)
                );
            }
            Ok(())
        }
        BackupCommand::Restore { archive, key_file } => {
            let default_key = noa_node::default_data_dir().join("store.key");
            let key = key_file.clone().or_else(|| {
                (default_key.exists() && !default_key.starts_with(data_dir)).then_some(default_key)
            });
            let total = std::fs::metadata(archive).map(|m| m.len()).unwrap_or(0);
            let bar = progress(total, "restoring", json_out);
            let m = noa_node::store::backup::restore(
                archive,
                data_dir,
                key.as_deref(),
                &mut |done, _| bar.set_position(done),
            )
            .map_err(fail);
            bar.finish_and_clear();
            let m = m?;
            // The restore itself goes into the restored node's audit log.
            let cfg =
                noa_node::Config::load(data_dir, &|k| std::env::var(k).ok(), &[]).map_err(fail)?;
            if let Ok(opts) = noa_node::store_options(data_dir, &cfg, passphrase(None)?)
                && let Ok(store) = noa_node::store::Store::open_with(&data_dir.join("noa.db"), opts)
            {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(fail)?;
                runtime
                    .block_on(store.audit_durable(noa_node::store::AuditRecord::new(
                        "user:admin",
                        "backup.restore",
                        "system",
                        "ok",
                        json!({ "archive": archive.display().to_string(), "created_ms": m.created_ms }),
                    )))
                    .map_err(fail)?;
            }
            if json_out {
                print_json(&json!({ "restored": data_dir, "manifest": m }));
            } else {
                println!(
                    "restored {} into {}: {}\nstart it with: noa up --data-dir {}",
                    archive.display(),
                    data_dir.display(),
                    noa_node::store::backup::describe(&m),
                    data_dir.display()
                );
            }
            Ok(())
        }
        BackupCommand::Create { .. } => Err(fail("create needs the daemon")),
    }
}

fn audit_query(f: &AuditFilter) -> CliResult<String> {
    let mut q = Vec::new();
    if let Some(p) = &f.principal {
        q.push(format!("principal={}", encode(p)));
    }
    if let Some(a) = &f.action {
        q.push(format!("action={}", encode(a)));
    }
    if let Some(s) = &f.since {
        let d = noa_types::parse_duration(s).map_err(|e| fail(format!("--since: {e}")))?;
        let since = noa_types::now_ms().saturating_sub(d.as_millis() as u64);
        q.push(format!("since_ms={since}"));
    }
    Ok(q.join("&"))
}

fn audit_rows(records: &[Value]) -> Vec<Vec<String>> {
    records
        .iter()
        .map(|r| {
            vec![
                r["seq"].to_string(),
                timestamp(r["ts_ms"].as_u64().unwrap_or(0)),
                r["principal"].as_str().unwrap_or("").to_owned(),
                r["action"].as_str().unwrap_or("").to_owned(),
                r["resource"].as_str().unwrap_or("").to_owned(),
                r["outcome"].as_str().unwrap_or("").to_owned(),
            ]
        })
        .collect()
}

pub fn audit(client: &Client, c: AuditCommand, json_out: bool) -> CliResult<()> {
    const HEADER: [&str; 6] = ["SEQ", "TIME", "PRINCIPAL", "ACTION", "RESOURCE", "OUTCOME"];
    match c {
        AuditCommand::Tail {
            lines,
            follow,
            filter,
        } => {
            let q = audit_query(&filter)?;
            let v = client.get(&format!("/api/v1/audit?limit={lines}&{q}"))?;
            let records = v["records"].as_array().cloned().unwrap_or_default();
            let mut last = records.last().and_then(|r| r["seq"].as_u64()).unwrap_or(0);
            if json_out {
                for r in &records {
                    println!("{r}");
                }
            } else {
                table(&HEADER, &audit_rows(&records));
            }
            if !follow {
                return Ok(());
            }
            loop {
                std::thread::sleep(std::time::Duration::from_millis(500));
                let v = client.get(&format!("/api/v1/audit?after={last}&limit=1000&{q}"))?;
                for r in v["records"].as_array().into_iter().flatten() {
                    last = r["seq"].as_u64().unwrap_or(last);
                    if json_out {
                        println!("{r}");
                    } else {
                        println!("{}", audit_rows(std::slice::from_ref(r))[0].join("  "));
                    }
                }
                std::io::stdout().flush().map_err(fail)?;
            }
        }
        AuditCommand::Verify => {
            let v = client.get("/api/v1/audit/verify")?;
            if json_out {
                print_json(&v);
            }
            match v["problem"].as_str() {
                None => {
                    if !json_out {
                        let cp = v["last_checkpoint"]
                            .as_u64()
                            .map(|c| {
                                format!(
                                    "last checkpoint {c} signed by node {}",
                                    v["key"].as_str().unwrap_or("?")
                                )
                            })
                            .unwrap_or_else(|| "no checkpoint yet".into());
                        println!(
                            "ok: {} records, chain intact, {} checkpoint(s), {cp}",
                            v["records"], v["checkpoints"]
                        );
                    }
                    Ok(())
                }
                Some(p) => Err(CliError::with_hint(
                    format!("the audit log was tampered with: {p}"),
                    "compare with a backup (`noa backup verify`) to see what was changed",
                )),
            }
        }
        AuditCommand::Export { filter } => {
            let q = audit_query(&filter)?;
            let mut after = 0u64;
            let mut out = std::io::stdout().lock();
            loop {
                let v = client.get(&format!("/api/v1/audit?after={after}&limit=10000&{q}"))?;
                let records = v["records"].as_array().cloned().unwrap_or_default();
                if records.is_empty() {
                    break;
                }
                for r in &records {
                    writeln!(out, "{r}").map_err(fail)?;
                    after = r["seq"].as_u64().unwrap_or(after);
                }
            }
            Ok(())
        }
    }
}
