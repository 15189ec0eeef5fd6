//! The CLI against a real daemon: the five-minute tour, bad input, persistence across kill -9, shutdown, streams.

mod common;

use common::{Daemon, alive, noa_bin};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

fn journal(d: &Daemon) -> Vec<Value> {
    d.ok(&["events", "--limit", "1000", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_tour_works_end_to_end() {
    let d = Daemon::start();
    let status = d.ok(&["status"]);
    assert!(
        status.contains("kernel    ok")
            && status.contains("store     ok")
            && status.contains("server    ok"),
        "{status}"
    );
    let s = d.json(&["status"]);
    assert_eq!(s["data_dir"], d.dir.display().to_string());

    // Events stream live from the moment `noa sub` starts.
    let mut sub = Command::new(noa_bin())
        .args(["sub", "sys.events.>", "--count", "2"])
        .env("NOA_DATA_DIR", &d.dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let out = d.ok(&[
        "spawn",
        "--name",
        "echo",
        "--restart",
        "permanent",
        "--",
        "python3",
        "examples/agents/echo.py",
    ]);
    assert!(
        out.starts_with("spawned echo (pid 2, native, restart permanent)"),
        "{out}"
    );
    d.wait_for("echo running", |d| d.process("echo")["state"] == "running");
    let ps = d.ok(&["ps"]);
    assert!(ps.lines().next().unwrap().starts_with("PID  NAME"), "{ps}");
    assert!(ps.contains("  echo  native   running  permanent"), "{ps}");

    assert_eq!(
        d.ok(&["req", "agent.echo.inbox", r#"{"text":"hi"}"#])
            .trim(),
        r#"{"text":"hi"}"#
    );
    let lines: Vec<String> = BufReader::new(sub.stdout.take().unwrap())
        .lines()
        .map(Result::unwrap)
        .collect();
    assert!(sub.wait().unwrap().success());
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("[sys.events.2.starting]"), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("[sys.events.2.running]")),
        "{lines:?}"
    );

    // kill -9 of the OS process: the supervisor restarts it.
    let os_pid = d.process("echo")["os_pid"].as_u64().unwrap();
    Command::new("kill")
        .args(["-9", &os_pid.to_string()])
        .status()
        .unwrap();
    d.wait_for("restart", |d| {
        let p = d.process("echo");
        p["restarts"] == 1 && p["state"] == "running"
    });
    assert!(!alive(os_pid));
    assert_eq!(d.ok(&["req", "agent.echo.inbox", "again"]).trim(), "again");

    let logs = d.ok(&["logs", "echo"]);
    assert_eq!(logs.matches("ready").count(), 2, "{logs}");
    let events = d.ok(&["events", "--name", "echo"]);
    assert!(
        events.contains("killed by signal 9 (SIGKILL)") && events.contains("restarting"),
        "{events}"
    );

    let out = d.ok(&["stop", "echo"]);
    assert!(out.contains("now exited"), "{out}");
    let new_os_pid = d.process("echo")["os_pid"].clone();
    assert_eq!(new_os_pid, Value::Null);
}

#[test]
fn logs_follow_streams_new_lines() {
    let d = Daemon::start();
    d.ok(&[
        "spawn",
        "--name",
        "echo",
        "--",
        "python3",
        "examples/agents/echo.py",
    ]);
    d.wait_for("running", |d| d.process("echo")["state"] == "running");
    let mut follow = Command::new(noa_bin())
        .args(["logs", "echo", "-f"])
        .env("NOA_DATA_DIR", &d.dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().contains("ready"));
    d.ok(&["stop", "echo"]);
    let next = lines.next().unwrap().unwrap();
    assert!(next.contains("shutting down"), "{next}");
    follow.kill().unwrap();
    let _ = follow.wait();
}

#[test]
fn bad_input_is_a_clear_error_with_exit_code_1_and_the_daemon_stays_healthy() {
    let d = Daemon::start();
    let cases: &[(&[&str], &str)] = &[
        (
            &["spawn", "--name", "x", "--", "no-such-program-anywhere"],
            "not found in PATH",
        ),
        (
            &["spawn", "--name", "x", "--restart", "forever", "--", "true"],
            "unknown restart policy \"forever\"",
        ),
        (
            &["spawn", "--name", "a.b", "--", "true"],
            "has '.' at byte 1",
        ),
        (&["spawn", "--name", "x"], "nothing to run"),
        (
            &["spawn", "--name", "x", "--parent", "ghost", "--", "true"],
            "no process named \"ghost\"",
        ),
        (
            &["spawn", "--name", "x", "--memory", "12Q", "--", "true"],
            "unknown unit",
        ),
        (&["pub", "a..b", "x"], "token 2 is empty"),
        (&["req", "nobody.listens", "x"], "no responders"),
        (&["stop", "ghost"], "no process named \"ghost\""),
        (&["stop", "root"], "root supervisor"),
        (&["logs", "ghost"], "no process named \"ghost\""),
    ];
    for (args, expected) in cases {
        let out = d.noa(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "noa {args:?}: {err}");
        assert!(
            err.contains(expected),
            "noa {args:?}: expected {expected:?} in {err}"
        );
    }
    d.ok(&["spawn", "--name", "dup", "--builtin", "echo"]);
    let out = d.noa(&["spawn", "--name", "dup", "--builtin", "echo"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already"));
    // Usage errors are exit code 2; an unreachable daemon is 3.
    assert_eq!(d.noa(&["spawn", "--bogus"]).status.code(), Some(2));
    assert_eq!(
        d.noa(&["--addr", "127.0.0.1:1", "ps"]).status.code(),
        Some(3)
    );
    assert!(d.ok(&["status"]).contains("ok"));
}

#[test]
fn the_api_needs_the_token_and_the_token_file_is_private() {
    let d = Daemon::start();
    let mode = std::fs::metadata(d.dir.join("admin.token"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert!(d.addr().starts_with("127.0.0.1:"), "loopback by default");
    let out = d.noa(&["--token", "nope", "ps"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOA-E0600"));
    // A second daemon on the same data directory is refused.
    let second = Command::new(noa_bin())
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&d.dir)
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains("already running"));
}

#[test]
fn permanent_processes_and_the_journal_survive_kill_9_of_the_daemon() {
    let mut d = Daemon::start();
    d.ok(&[
        "spawn",
        "--name",
        "team",
        "--supervisor",
        "--strategy",
        "one-for-all",
    ]);
    d.ok(&[
        "spawn",
        "--name",
        "echo",
        "--parent",
        "team",
        "--restart",
        "permanent",
        "--",
        "python3",
        "examples/agents/echo.py",
    ]);
    d.ok(&[
        "spawn",
        "--name",
        "once",
        "--restart",
        "temporary",
        "--",
        "python3",
        "examples/agents/echo.py",
    ]);
    d.wait_for("running", |d| {
        d.process("echo")["state"] == "running" && d.process("once")["state"] == "running"
    });
    let old = d.process("echo")["os_pid"].as_u64().unwrap();
    let before = journal(&d);
    let status = d.signal("-KILL");
    assert!(!status.success());
    std::thread::sleep(Duration::from_millis(200));
    assert!(!alive(old), "children die with the daemon");
    d.launch();
    d.wait_for("echo back", |d| d.process("echo")["state"] == "running");
    assert_eq!(d.process("echo")["parent"], "team");
    assert_eq!(
        d.process("once")["state"],
        "exited",
        "temporary processes are not restarted"
    );
    assert_eq!(d.ok(&["req", "agent.echo.inbox", "back"]).trim(), "back");
    let after = journal(&d);
    assert!(after.len() > before.len());
    for e in &before {
        assert!(after.contains(e), "journal event {e} lost");
    }
}

#[test]
fn sigterm_stops_children_in_reverse_order_and_exits_0() {
    let mut d = Daemon::start();
    for n in ["first", "second", "third"] {
        d.ok(&[
            "spawn",
            "--name",
            n,
            "--restart",
            "permanent",
            "--",
            "python3",
            "examples/agents/echo.py",
        ]);
    }
    d.wait_for("running", |d| d.process("third")["state"] == "running");
    let pids: Vec<u64> = ["first", "second", "third"]
        .iter()
        .map(|n| d.process(n)["os_pid"].as_u64().unwrap())
        .collect();
    let status = d.signal("-TERM");
    assert_eq!(status.code(), Some(0));
    for p in pids {
        assert!(!alive(p), "child {p} left behind");
    }
    // The journal shows the stop order.
    d.launch();
    let events = journal(&d);
    let stops: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "stopping")
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(&stops[..3], ["third", "second", "first"]);
}

#[tokio::test]
async fn websocket_and_sse_event_streams() {
    use futures_util::StreamExt;
    let d = Daemon::start();
    let url = format!(
        "ws://{}/api/v1/events/ws?subject=agent.*.inbox&access_token={}",
        d.addr(),
        d.token()
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let dd = d.dir.clone();
    tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(200));
        Command::new(noa_bin())
            .args(["pub", "agent.someone.inbox", r#"{"n":1}"#])
            .env("NOA_DATA_DIR", dd)
            .output()
            .unwrap()
    });
    let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let v: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
    assert_eq!(
        v,
        json!({"subject": "agent.someone.inbox", "data": {"n": 1}})
    );
    // Without the token, the upgrade is refused.
    let err = tokio_tungstenite::connect_async(format!("ws://{}/api/v1/events/ws", d.addr()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("401"), "{err}");
}
