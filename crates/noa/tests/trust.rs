//! Storage and trust against the real daemon and CLI: files, secrets, configuration, backups, the audit log,
//! tampering with the `sqlite3` tool, crashes during writes, and no plaintext on disk.

mod common;

use common::{Daemon, noa_bin};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Runs the CLI with standard input.
fn noa_stdin(d: &Daemon, args: &[&str], input: &[u8]) -> std::process::Output {
    let mut child = Command::new(noa_bin())
        .args(args)
        .env("NOA_DATA_DIR", &d.dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn sqlite(db: &Path, sql: &str) {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().unwrap();
    assert!(out.status.success(), "sqlite3: {}", stderr(&out));
}

/// Whether any file under `dir` contains `needle`.
fn grep(dir: &Path, needle: &[u8]) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(hit) = grep(&p, needle) {
                return Some(hit);
            }
        } else if let Ok(bytes) = std::fs::read(&p)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            return Some(p);
        }
    }
    None
}

#[test]
fn files_history_rollback_and_no_plaintext_on_disk() {
    let d = Daemon::start();
    let src = d.dir.join("../notes-src.md");
    let marker = "MARKER-notes-5d1e";
    std::fs::write(&src, format!("{marker} v1\n").repeat(20_000)).unwrap();
    d.ok(&["fs", "put", "/shared/notes.md", src.to_str().unwrap()]);
    let o = noa_stdin(
        &d,
        &["fs", "put", "/shared/notes.md", "-"],
        format!("{marker} v2").as_bytes(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        d.ok(&["fs", "cat", "/shared/notes.md"]),
        format!("{marker} v2")
    );
    assert!(d.ok(&["fs", "ls", "/shared"]).contains("notes.md"));
    let h = d.json(&["fs", "history", "/shared/notes.md"]);
    assert_eq!(h["versions"].as_array().unwrap().len(), 2);
    d.ok(&["fs", "rollback", "/shared/notes.md", "--to", "1"]);
    let back = d.ok(&["fs", "cat", "/shared/notes.md"]);
    assert_eq!(back, std::fs::read_to_string(&src).unwrap());
    assert_eq!(
        d.ok(&["fs", "cat", "/shared/notes.md", "--version", "2"]),
        format!("{marker} v2")
    );
    // Bad input: clear errors, exit code 1.
    for (args, msg) in [
        (
            vec!["fs", "cat", "/shared/missing"],
            "NOA-E0310 no such file: /shared/missing",
        ),
        (vec!["fs", "cat", "/etc/passwd"], "unknown top-level folder"),
        (
            vec!["fs", "rollback", "/shared/notes.md", "--to", "9"],
            "has no version 9",
        ),
        (
            vec!["fs", "put", "/shared/x", "/nonexistent/file"],
            "cannot read /nonexistent/file",
        ),
    ] {
        let o = d.noa(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(stderr(&o).contains(msg), "{args:?}: {}", stderr(&o));
    }
    // A transaction with a failing part changes nothing.
    let a = d.dir.join("../a.txt");
    std::fs::write(&a, "A").unwrap();
    let o = d.noa(&[
        "fs",
        "txn",
        "--put",
        &format!("/shared/a.txt={}", a.display()),
        "--rm",
        "/shared/none",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(d.noa(&["fs", "cat", "/shared/a.txt"]).status.code() == Some(1));
    d.ok(&[
        "fs",
        "txn",
        "--put",
        &format!("/shared/a.txt={}", a.display()),
        "--rm",
        "/shared/notes.md",
    ]);
    assert_eq!(d.ok(&["fs", "cat", "/shared/a.txt"]), "A");
    // Nothing written above can be found in the data directory in plaintext.
    assert_eq!(grep(&d.dir, marker.as_bytes()), None);
}

#[test]
fn quotas_and_host_mounts() {
    let mut d = Daemon::start();
    drop(d.child.take().map(|mut c| {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        c.wait()
    }));
    d.up_args = vec!["--set".into(), "fs.quota_shared=1KiB".into()];
    d.launch();
    let o = noa_stdin(&d, &["fs", "put", "/shared/big", "-"], &[b'x'; 2000]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("NOA-E0311 quota exceeded") && stderr(&o).contains("at most 1024"),
        "{}",
        stderr(&o)
    );
    let eff = d.ok(&["config", "show", "--effective"]);
    assert!(
        eff.contains("fs.quota_shared") && eff.contains("flag --set fs.quota_shared"),
        "{eff}"
    );
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("readme.txt"), "from the host").unwrap();
    std::os::unix::fs::symlink("/etc", host.path().join("etc")).unwrap();
    d.ok(&[
        "fs",
        "mount",
        "/host/docs",
        host.path().to_str().unwrap(),
        "--read-only",
    ]);
    assert_eq!(
        d.ok(&["fs", "cat", "/host/docs/readme.txt"]),
        "from the host"
    );
    let o = d.noa(&["fs", "cat", "/host/docs/etc/passwd"]);
    assert!(stderr(&o).contains("symbolic link"), "{}", stderr(&o));
    let o = noa_stdin(&d, &["fs", "put", "/host/docs/new.txt", "-"], b"x");
    assert!(stderr(&o).contains("read-only mount"), "{}", stderr(&o));
    assert!(d.ok(&["fs", "mounts"]).contains("ro"));
    d.ok(&["fs", "unmount", "/host/docs"]);
    assert!(d.noa(&["fs", "cat", "/host/docs/readme.txt"]).status.code() == Some(1));
}

#[test]
fn secrets_reach_the_process_and_never_its_log() {
    let d = Daemon::start();
    let o = noa_stdin(&d, &["secret", "set", "api_key"], b"sk-live-7Hq2\n");
    assert!(o.status.success(), "{}", stderr(&o));
    let list = d.ok(&["secret", "list"]);
    assert!(
        list.contains("api_key") && !list.contains("sk-live"),
        "{list}"
    );
    d.ok(&[
        "spawn",
        "--name",
        "sec",
        "--secret",
        "API_KEY=api_key",
        "--",
        "sh",
        "-c",
        "echo \"len=${#API_KEY} value=$API_KEY\" >&2; sleep 30",
    ]);
    d.wait_for("the log line", |d| d.ok(&["logs", "sec"]).contains("len="));
    let logs = d.ok(&["logs", "sec"]);
    assert!(logs.contains("len=12 value=[REDACTED]"), "{logs}");
    // A secret that does not exist, and one the spec names badly.
    let o = d.noa(&["spawn", "--name", "x", "--secret", "K=nope", "--", "true"]);
    assert!(
        stderr(&o).contains("secret \"nope\" does not exist"),
        "{}",
        stderr(&o)
    );
    // Nothing the API or the journal returns holds the value.
    for args in [vec!["ps"], vec!["events", "--limit", "200"]] {
        let mut a = args.clone();
        a.push("--json");
        assert!(!d.ok(&a).contains("sk-live"), "{args:?}");
    }
    let audit = d.ok(&["audit", "export", "--action", "secret.*"]);
    assert!(
        audit.contains("\"secret.read\"") && !audit.contains("sk-live"),
        "{audit}"
    );
    assert_eq!(grep(&d.dir, b"sk-live-7Hq2"), None);
    d.ok(&["stop", "sec"]);
}

#[test]
fn audit_tampering_is_found_and_named() {
    let mut d = Daemon::start();
    for i in 0..5 {
        noa_stdin(&d, &["fs", "put", &format!("/shared/f{i}"), "-"], b"x");
    }
    let ok = d.ok(&["audit", "verify"]);
    assert!(
        ok.starts_with("ok: ") && ok.contains("chain intact"),
        "{ok}"
    );
    let tail = d.ok(&["audit", "tail", "--action", "fs.write"]);
    assert_eq!(tail.lines().count(), 6, "{tail}");
    assert!(d.signal("-TERM").success());
    let db = d.dir.join("noa.db");
    sqlite(
        &db,
        "UPDATE audit SET principal = 'user:mallory' WHERE seq = 3;",
    );
    d.launch();
    let o = d.noa(&["audit", "verify"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("record 3 was edited"), "{}", stderr(&o));
    assert!(d.signal("-TERM").success());
    sqlite(
        &db,
        "UPDATE audit SET principal = 'user:admin' WHERE seq = 3; DELETE FROM audit WHERE seq = 4;",
    );
    d.launch();
    let o = d.noa(&["audit", "verify"]);
    assert!(
        stderr(&o).contains("record 4 is missing: it was removed"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn backup_under_writes_then_restore_and_compare() {
    let d = Daemon::start();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let o = noa_stdin(&d, &["fs", "put", "/shared/big.bin", "-"], &big);
    assert!(o.status.success(), "{}", stderr(&o));
    noa_stdin(&d, &["secret", "set", "tok"], b"v1");
    // Writers keep going while the backup runs.
    let dir = d.dir.clone();
    let writer = std::thread::spawn(move || {
        for i in 0..30 {
            let mut c = Command::new(noa_bin())
                .args(["fs", "put", &format!("/shared/w/{i}"), "-"])
                .env("NOA_DATA_DIR", &dir)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            c.stdin
                .take()
                .unwrap()
                .write_all(format!("{i}").as_bytes())
                .unwrap();
            assert!(c.wait().unwrap().success());
        }
    });
    let out = tempfile::tempdir().unwrap();
    let archive = out.path().join("nightly.noabak");
    let msg = d.ok(&["backup", "create", "--out", archive.to_str().unwrap()]);
    writer.join().unwrap();
    assert!(msg.contains("backup written"), "{msg}");
    assert!(
        d.ok(&["backup", "verify", archive.to_str().unwrap()])
            .starts_with("ok: ")
    );
    // Restoring over a live data directory is refused.
    let o = d.noa(&[
        "backup",
        "restore",
        archive.to_str().unwrap(),
        "--data-dir",
        d.dir.to_str().unwrap(),
    ]);
    assert!(stderr(&o).contains("not empty"), "{}", stderr(&o));
    let target = out.path().join("restored");
    let key = d.dir.join("store.key");
    let o = Command::new(noa_bin())
        .args([
            "backup",
            "restore",
            archive.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
            "--data-dir",
        ])
        .arg(&target)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let r = Daemon::start_in(&target);
    let back = r.noa(&["fs", "cat", "/shared/big.bin"]);
    assert!(back.stdout == big, "the restored file differs");
    assert!(r.ok(&["audit", "verify"]).contains("chain intact"));
    assert!(
        r.ok(&["audit", "tail", "--action", "backup.restore"])
            .contains("backup.restore")
    );
    // A corrupted archive is refused with the entry named.
    let mut bytes = std::fs::read(&archive).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    let bad = out.path().join("bad.noabak");
    std::fs::write(&bad, &bytes).unwrap();
    let o = d.noa(&["backup", "verify", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("NOA-E0316"), "{}", stderr(&o));
}

#[test]
fn crash_during_large_write_loses_nothing_acknowledged() {
    let mut d = Daemon::start();
    noa_stdin(&d, &["fs", "put", "/shared/kept.txt", "-"], b"acknowledged");
    // Start a large upload and kill the daemon in the middle of it.
    let mut up = Command::new(noa_bin())
        .args(["fs", "put", "/shared/huge.bin", "-"])
        .env("NOA_DATA_DIR", &d.dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = up.stdin.take().unwrap();
    let chunk = vec![9u8; 1 << 20];
    for _ in 0..20 {
        stdin.write_all(&chunk).unwrap();
    }
    d.signal("-KILL");
    drop(stdin);
    let _ = up.wait();
    d.launch();
    assert_eq!(d.ok(&["fs", "cat", "/shared/kept.txt"]), "acknowledged");
    assert_eq!(
        d.noa(&["fs", "cat", "/shared/huge.bin"]).status.code(),
        Some(1)
    );
    assert!(d.ok(&["audit", "verify"]).contains("chain intact"));
}

#[test]
fn configuration_errors_name_file_line_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("noa.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\n[fs]\nquota_shard = \"1GiB\"\n",
    )
    .unwrap();
    let o = Command::new(noa_bin())
        .args(["up", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("noa.toml:4:15")
            && e.contains("fs.quota_shard")
            && e.contains("did you mean `fs.quota_shared`"),
        "{e}"
    );
    std::fs::remove_file(dir.join("noa.toml")).unwrap();
    let run = |args: &[&str]| {
        Command::new(noa_bin())
            .args(args)
            .arg("--data-dir")
            .arg(dir)
            .output()
            .unwrap()
    };
    assert!(
        run(&["config", "set", "fs.quota_shared", "2GiB"])
            .status
            .success()
    );
    let o = run(&["config", "set", "fs.quota_shared", "lots"]);
    assert!(stderr(&o).contains("is not a size"), "{}", stderr(&o));
    let shown = String::from_utf8(run(&["config", "show"]).stdout).unwrap();
    assert!(
        shown.contains("fs.quota_shared") && shown.contains("2GiB") && shown.contains("noa.toml:"),
        "{shown}"
    );
    let o = Command::new(noa_bin())
        .args(["config", "show", "--effective", "--data-dir"])
        .arg(dir)
        .env("NOA_LOG_LEVEL", "debug")
        .output()
        .unwrap();
    let shown = String::from_utf8(o.stdout).unwrap();
    assert!(
        shown.contains("env NOA_LOG_LEVEL") && shown.contains("default"),
        "{shown}"
    );
}

#[test]
fn rekey_while_stopped() {
    let mut d = Daemon::start();
    noa_stdin(&d, &["fs", "put", "/shared/x", "-"], b"still here");
    let o = d.noa(&["store", "rekey"]);
    assert!(stderr(&o).contains("a daemon is running"), "{}", stderr(&o));
    let old = std::fs::read(d.dir.join("store.key")).unwrap();
    assert!(d.signal("-TERM").success());
    assert!(d.ok(&["store", "rekey"]).contains("no file was rewritten"));
    assert_ne!(std::fs::read(d.dir.join("store.key")).unwrap(), old);
    d.launch();
    assert_eq!(d.ok(&["fs", "cat", "/shared/x"]), "still here");
    assert!(
        d.ok(&["audit", "tail", "--action", "store.rekey"])
            .contains("store.rekey")
    );
}

#[test]
fn crash_during_backup_leaves_a_working_store() {
    let mut d = Daemon::start();
    let big: Vec<u8> = (0..40_000_000u32).map(|i| (i % 241) as u8).collect();
    let o = noa_stdin(&d, &["fs", "put", "/shared/big.bin", "-"], &big);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = tempfile::tempdir().unwrap();
    let archive = out.path().join("b.noabak");
    let backup = Command::new(noa_bin())
        .args(["backup", "create", "--out", archive.to_str().unwrap()])
        .env("NOA_DATA_DIR", &d.dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the daemon as soon as the backup has started staging its snapshot.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline
        && !std::fs::read_dir(&d.dir)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".backup-"))
    {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    d.signal("-KILL");
    let o = backup.wait_with_output().unwrap();
    assert!(!o.status.success(), "a backup cut short must fail");
    assert!(
        !archive.exists(),
        "no partial archive may look like a backup"
    );
    d.launch();
    assert!(d.ok(&["audit", "verify"]).contains("chain intact"));
    assert!(d.noa(&["fs", "cat", "/shared/big.bin"]).stdout == big);
    assert!(
        !std::fs::read_dir(&d.dir)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".backup-")),
        "the staged snapshot is cleaned up at start"
    );
    d.ok(&["backup", "create", "--out", archive.to_str().unwrap()]);
    assert!(
        d.ok(&["backup", "verify", archive.to_str().unwrap()])
            .starts_with("ok: ")
    );
}

#[test]
fn a_passphrase_protects_the_store() {
    let mut d = Daemon::start();
    noa_stdin(&d, &["fs", "put", "/shared/x", "-"], b"behind a passphrase");
    assert!(d.signal("-TERM").success());
    let rekey = Command::new(noa_bin())
        .args(["store", "rekey", "--to", "passphrase"])
        .env("NOA_DATA_DIR", &d.dir)
        .env("NOA_NEW_PASSPHRASE", "correct horse battery")
        .output()
        .unwrap();
    assert!(rekey.status.success(), "{}", stderr(&rekey));
    assert!(
        !d.dir.join("store.key").exists(),
        "the old key file no longer unlocks anything"
    );
    let up = |pass: Option<&str>| {
        let mut c = Command::new(noa_bin());
        c.args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&d.dir);
        if let Some(p) = pass {
            c.env("NOA_PASSPHRASE", p);
        }
        c.output().unwrap()
    };
    let o = up(None);
    assert!(stderr(&o).contains("set NOA_PASSPHRASE"), "{}", stderr(&o));
    let o = up(Some("wrong"));
    assert!(
        stderr(&o).contains("the passphrase is wrong"),
        "{}",
        stderr(&o)
    );
    d.up_env = vec![("NOA_PASSPHRASE".into(), "correct horse battery".into())];
    d.launch();
    assert_eq!(d.ok(&["fs", "cat", "/shared/x"]), "behind a passphrase");
}
