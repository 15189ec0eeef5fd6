//! The native runtime with real child processes (python3): protocol, violations, limits, cleanup.

use bytes::Bytes;
use noa_bus::Bus;
use noa_kernel::{BuiltinRuntime, Kernel, KernelOptions, ProcessInfo};
use noa_policy::{Policy, Principal};
use noa_sandbox::{NativeOptions, NativeRuntime};
use noa_store::{EventQuery, Store};
use noa_types::{ProcessSpec, ProcessState, RestartPolicy};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn probe() -> String {
    format!("{}/tests/agents/probe.py", env!("CARGO_MANIFEST_DIR"))
}

fn echo() -> String {
    format!(
        "{}/../../examples/agents/echo.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn admin() -> Principal {
    Principal::User("admin".into())
}

struct Fx {
    kernel: Kernel,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("noa.db")).unwrap();
    let native = NativeRuntime::new(NativeOptions {
        init_timeout: Duration::from_millis(1500),
        ..Default::default()
    });
    let kernel = Kernel::new(
        KernelOptions::new(dir.path().join("logs")),
        Bus::local(),
        store,
        Policy::default_policy(),
        vec![Arc::new(native), Arc::new(BuiltinRuntime)],
    );
    Fx { kernel, _dir: dir }
}

/// The real interpreter: `python3` on PATH may be a shell shim (pyenv) that adds its own environment.
fn python() -> String {
    static PY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PY.get_or_init(|| {
        let out = std::process::Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    })
    .clone()
}

fn spec(name: &str, script: &str, args: &[&str]) -> ProcessSpec {
    let mut a = vec![script];
    a.extend_from_slice(args);
    ProcessSpec::native(name, &python(), &a)
}

impl Fx {
    fn info(&self, name: &str) -> ProcessInfo {
        self.kernel.get(&admin(), name).unwrap()
    }

    async fn wait(
        &self,
        what: &str,
        cond: impl Fn(&ProcessInfo) -> bool,
        name: &str,
    ) -> ProcessInfo {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let i = self.info(name);
            if cond(&i) {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {i:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn running(&self, name: &str) -> ProcessInfo {
        self.wait("running", |i| i.state == ProcessState::Running, name)
            .await
    }

    async fn ask(&self, name: &str, data: Value) -> Result<Value, String> {
        let reply = self
            .kernel
            .request(
                &admin(),
                &format!("agent.{name}.inbox"),
                Bytes::from(data.to_string()),
                None,
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(serde_json::from_slice(&reply.payload).unwrap_or(Value::Null))
    }

    fn logs(&self, name: &str) -> String {
        self.kernel
            .logs(&admin(), name, 1000)
            .unwrap()
            .into_iter()
            .map(|l| l.line)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn alive(os_pid: u32) -> bool {
    // A zombie still has a /proc entry; look at its state.
    std::fs::read_to_string(format!("/proc/{os_pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[tokio::test]
async fn the_echo_example_answers_through_the_bus() {
    let f = fixture();
    f.kernel
        .spawn(&admin(), spec("echo", &echo(), &[]))
        .await
        .unwrap();
    f.running("echo").await;
    assert_eq!(
        f.ask("echo", json!({"text": "hi"})).await.unwrap(),
        json!({"text": "hi"})
    );
    let started = Instant::now();
    f.kernel.stop(&admin(), "echo").await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a cooperative agent stops promptly"
    );
    assert!(f.logs("echo").contains("ready"), "{}", f.logs("echo"));
}

#[tokio::test]
async fn environment_is_cleared_except_what_is_granted() {
    let f = fixture();
    let mut s = spec("env", &probe(), &[]);
    s.env.insert("GRANTED".into(), "yes".into());
    f.kernel.spawn(&admin(), s).await.unwrap();
    f.running("env").await;
    let keys = f.ask("env", json!({"cmd": "env"})).await.unwrap();
    let keys: Vec<&str> = keys
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    // Python adds LC_CTYPE itself under some locales; nothing of the daemon's environment may leak.
    let unexpected: Vec<_> = keys
        .iter()
        .filter(|k| !k.starts_with("NOA_") && **k != "GRANTED" && **k != "LC_CTYPE")
        .collect();
    assert!(unexpected.is_empty(), "leaked: {unexpected:?}");
    assert!(keys.contains(&"NOA_INBOX") && keys.contains(&"GRANTED"));
}

#[tokio::test]
async fn agents_use_the_bus_under_policy() {
    let f = fixture();
    f.kernel
        .spawn(&admin(), spec("p", &probe(), &[]))
        .await
        .unwrap();
    f.running("p").await;
    let mut own = f.kernel.subscribe(&admin(), "agent.p.out", 8).unwrap();
    let r = f.ask("p", json!({"cmd": "call", "method": "publish", "params": {"subject": "agent.p.out", "data": {"n": 1}}})).await.unwrap();
    assert_eq!(r["result"]["delivered"], 1);
    assert_eq!(own.recv().await.unwrap().payload, "{\"n\":1}");
    let r = f.ask("p", json!({"cmd": "call", "method": "publish", "params": {"subject": "sys.events.1.running"}})).await.unwrap();
    assert_eq!(r["error"]["code"], -32001, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("may not publish"),
        "{r}"
    );
    let r = f
        .ask(
            "p",
            json!({"cmd": "call", "method": "subscribe", "params": {"subject": "agent.other.>"}}),
        )
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], -32001, "{r}");
    let r = f
        .ask(
            "p",
            json!({"cmd": "call", "method": "subscribe", "params": {"subject": "agent.p.>"}}),
        )
        .await
        .unwrap();
    assert!(r["result"]["sid"].as_u64().is_some(), "{r}");
    let r = f
        .ask(
            "p",
            json!({"cmd": "call", "method": "publish", "params": {"subject": "a..b"}}),
        )
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], -32602, "{r}");
    // Requests from an agent to another agent: the echo example.
    f.kernel
        .spawn(&admin(), spec("echo", &echo(), &[]))
        .await
        .unwrap();
    f.running("echo").await;
    let r = f.ask("p", json!({"cmd": "call", "method": "request", "params": {"subject": "agent.echo.inbox", "data": [1, 2]}})).await.unwrap();
    assert_eq!(r["result"]["data"], json!([1, 2]), "{r}");
    let r = f.ask("p", json!({"cmd": "call", "method": "request", "params": {"subject": "agent.nobody.inbox"}})).await.unwrap();
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no responders"),
        "{r}"
    );
}

#[tokio::test]
async fn protocol_violations_get_errors_and_repeated_ones_fail_the_process() {
    let f = fixture();
    let mut s = spec("bad", &probe(), &[]);
    s.restart = RestartPolicy::Temporary;
    f.kernel.spawn(&admin(), s).await.unwrap();
    f.running("bad").await;
    let r = f
        .ask(
            "bad",
            json!({"cmd": "call", "method": "frobnicate", "params": {}}),
        )
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], -32601);
    let r = f
        .ask("bad", json!({"cmd": "raw", "lines": ["{not json", "[1]"]}))
        .await
        .unwrap();
    assert_eq!(r, json!("sent"));
    assert_eq!(
        f.info("bad").state,
        ProcessState::Running,
        "a few violations are tolerated"
    );
    let garbage: Vec<String> = (0..10).map(|i| format!("garbage {i}")).collect();
    let _ = f.ask("bad", json!({"cmd": "raw", "lines": garbage})).await;
    let i = f
        .wait("failed", |i| i.state == ProcessState::Failed, "bad")
        .await;
    assert!(i.exit.unwrap().contains("protocol violations"));
    let logs = f.logs("bad");
    assert!(
        logs.contains("protocol violation 1/10: unknown method \"frobnicate\""),
        "{logs}"
    );
    assert!(logs.contains("not valid JSON"), "{logs}");
    // The kernel is fine.
    f.kernel
        .spawn(&admin(), spec("ok", &echo(), &[]))
        .await
        .unwrap();
    f.running("ok").await;
}

#[tokio::test]
async fn oversized_lines_and_floods_are_bounded() {
    let f = fixture();
    let mut s = spec("big", &probe(), &[]);
    s.restart = RestartPolicy::Temporary;
    f.kernel.spawn(&admin(), s).await.unwrap();
    f.running("big").await;
    let huge = "x".repeat(2 * 1024 * 1024);
    f.ask("big", json!({"cmd": "raw", "lines": [huge]}))
        .await
        .unwrap();
    let logs = f.logs("big");
    assert!(
        logs.contains("longer than the limit of 1048576 bytes"),
        "{logs}"
    );
    // A program that floods stdout with non-protocol output (`yes`) is failed quickly.
    let mut y = ProcessSpec::native("yes", "yes", &[]);
    y.restart = RestartPolicy::Temporary;
    f.kernel.spawn(&admin(), y).await.unwrap();
    let i = f
        .wait("yes failed", |i| i.state == ProcessState::Failed, "yes")
        .await;
    assert!(i.exit.unwrap().contains("protocol violations"));
}

#[tokio::test]
async fn a_crash_of_the_os_process_is_restarted() {
    let f = fixture();
    let mut s = spec("echo", &echo(), &[]);
    s.restart = RestartPolicy::Permanent;
    f.kernel.spawn(&admin(), s).await.unwrap();
    let first = f.running("echo").await.os_pid.unwrap();
    std::process::Command::new("kill")
        .args(["-9", &first.to_string()])
        .status()
        .unwrap();
    let i = f
        .wait(
            "restarted",
            |i| i.restarts == 1 && i.state == ProcessState::Running,
            "echo",
        )
        .await;
    assert_ne!(i.os_pid.unwrap(), first);
    assert!(!alive(first), "the old process is reaped");
    assert_eq!(f.ask("echo", json!("again")).await.unwrap(), json!("again"));
    let events = f
        .kernel
        .events(
            &admin(),
            &EventQuery {
                name: Some("echo".into()),
                limit: Some(100),
                ..Default::default()
            },
        )
        .unwrap();
    let failed = events.iter().find(|e| e.event == "failed").unwrap();
    assert_eq!(failed.detail["reason"]["signal"], 9);
}

#[tokio::test]
async fn rlimits_bound_memory_and_cpu() {
    let f = fixture();
    let mut s = spec("mem", &probe(), &[]);
    s.limits.memory_bytes = Some(256 * 1024 * 1024);
    s.restart = RestartPolicy::Temporary;
    f.kernel.spawn(&admin(), s).await.unwrap();
    f.running("mem").await;
    assert_eq!(
        f.ask("mem", json!({"cmd": "alloc", "mb": 16}))
            .await
            .unwrap(),
        json!(16 * 1024 * 1024)
    );
    let r = f
        .ask("mem", json!({"cmd": "alloc", "mb": 512}))
        .await
        .unwrap();
    assert_eq!(
        r["error"]["message"], "the agent exited before replying",
        "the allocation past the limit ends the agent: {r}"
    );
    let i = f
        .wait("mem failed", |i| i.state == ProcessState::Failed, "mem")
        .await;
    assert!(i.exit.as_deref().unwrap().contains("exit code 1"), "{i:?}");
    assert!(f.logs("mem").contains("MemoryError"), "{}", f.logs("mem"));

    let mut s = spec("cpu", &probe(), &[]);
    s.limits.cpu_seconds = Some(1);
    s.restart = RestartPolicy::Temporary;
    f.kernel.spawn(&admin(), s).await.unwrap();
    f.running("cpu").await;
    let _ = f.kernel.publish(
        &admin(),
        "agent.cpu.inbox",
        Bytes::from(json!({"cmd": "spin"}).to_string()),
        None,
    );
    let i = f
        .wait("cpu killed", |i| i.state == ProcessState::Failed, "cpu")
        .await;
    assert!(i.exit.as_deref().unwrap().contains("SIGXCPU"), "{i:?}");
}

#[tokio::test]
async fn a_child_that_hangs_on_shutdown_is_killed_after_its_grace_with_its_children() {
    let f = fixture();
    let mut s = spec("hang", &probe(), &["hang"]);
    s.limits.stop_grace_ms = Some(600);
    f.kernel.spawn(&admin(), s).await.unwrap();
    let os_pid = f.running("hang").await.os_pid.unwrap();
    let grandchild = f
        .ask("hang", json!({"cmd": "grandchild"}))
        .await
        .unwrap()
        .as_u64()
        .unwrap() as u32;
    assert!(alive(grandchild));
    let t = Instant::now();
    let info = f.kernel.stop(&admin(), "hang").await.unwrap();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(info.state, ProcessState::Exited);
    assert!(!alive(os_pid), "the child is reaped");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!alive(grandchild), "its process group is gone too");
    assert!(f.logs("hang").contains("SIGKILL"), "{}", f.logs("hang"));
}

#[tokio::test]
async fn a_child_that_never_initializes_fails() {
    let f = fixture();
    let mut s = spec("mute", &probe(), &["no-init"]);
    s.restart = RestartPolicy::Temporary;
    f.kernel.spawn(&admin(), s).await.unwrap();
    let i = f
        .wait("failed", |i| i.state == ProcessState::Failed, "mute")
        .await;
    assert!(i.exit.unwrap().contains("did not answer initialize"));
}

#[tokio::test]
async fn missing_programs_are_refused_before_anything_is_recorded() {
    let f = fixture();
    let e = f
        .kernel
        .spawn(
            &admin(),
            ProcessSpec::native("x", "no-such-program-noa", &[]),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("program \"no-such-program-noa\" not found in PATH"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.txt");
    std::fs::write(&plain, "not a program").unwrap();
    let e = f
        .kernel
        .spawn(
            &admin(),
            ProcessSpec::native("y", plain.to_str().unwrap(), &[]),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an executable file"), "{e}");
    assert!(f.kernel.store().specs().unwrap().is_empty());
}

#[tokio::test]
async fn stderr_is_the_log_and_is_bounded_per_line() {
    let f = fixture();
    f.kernel
        .spawn(&admin(), spec("talk", &probe(), &[]))
        .await
        .unwrap();
    f.running("talk").await;
    let mut live = f.kernel.subscribe(&admin(), "sys.logs.talk", 100).unwrap();
    f.ask("talk", json!({"cmd": "stderr", "n": 3}))
        .await
        .unwrap();
    let first: Value = serde_json::from_slice(&live.recv().await.unwrap().payload).unwrap();
    assert_eq!(first["line"], "line 0");
    let logs = f.kernel.logs(&admin(), "talk", 2).unwrap();
    assert_eq!(
        logs.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(),
        ["line 1", "line 2"]
    );
}

#[tokio::test]
async fn what_an_agent_writes_just_before_it_exits_still_counts() {
    let f = fixture();
    let mut s = spec("last", &probe(), &[]);
    s.restart = RestartPolicy::Temporary;
    f.kernel.spawn(&admin(), s).await.unwrap();
    f.running("last").await;
    let mut sub = f.kernel.subscribe(&admin(), "agent.last.words", 8).unwrap();
    let _ = f.kernel.publish(
        &admin(),
        "agent.last.inbox",
        Bytes::from(json!({"cmd": "publish_and_exit", "subject": "agent.last.words"}).to_string()),
        None,
    );
    let m = tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.payload, "\"last words\"");
}

#[tokio::test]
async fn an_agent_that_does_not_read_its_stdin_cannot_stall_the_kernel() {
    let f = fixture();
    let mut s = spec("deaf", &probe(), &[]);
    s.restart = RestartPolicy::Temporary;
    f.kernel.spawn(&admin(), s).await.unwrap();
    f.running("deaf").await;
    let _ = f.kernel.publish(
        &admin(),
        "agent.deaf.inbox",
        Bytes::from(json!({"cmd": "flood_calls", "n": 20000}).to_string()),
        None,
    );
    let i = f
        .wait("deaf failed", |i| i.state == ProcessState::Failed, "deaf")
        .await;
    assert!(i.exit.unwrap().contains("not reading its stdin"));
}

#[tokio::test]
async fn a_kill_cuts_a_graceful_stop_short() {
    let f = fixture();
    let mut s = spec("slow", &probe(), &["hang"]);
    s.limits.stop_grace_ms = Some(30_000);
    f.kernel.spawn(&admin(), s).await.unwrap();
    f.running("slow").await;
    let kernel = f.kernel.clone();
    let t = Instant::now();
    let stopping = tokio::spawn(async move { kernel.stop(&admin(), "slow").await });
    f.wait("stopping", |i| i.state == ProcessState::Stopping, "slow")
        .await;
    f.kernel.kill(&admin(), "slow").await.unwrap();
    let info = tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(info.state.is_terminal());
}

#[tokio::test]
async fn agents_cannot_publish_into_reply_inboxes() {
    let f = fixture();
    f.kernel
        .spawn(&admin(), spec("p", &probe(), &[]))
        .await
        .unwrap();
    f.running("p").await;
    let r = f.ask("p", json!({"cmd": "call", "method": "publish", "params": {"subject": "_INBOX.123.4", "data": "forged"}})).await.unwrap();
    assert_eq!(r["error"]["code"], -32001, "{r}");
}

#[tokio::test]
async fn agents_keep_files_in_their_folder_and_in_shared() {
    let f = fixture();
    f.kernel
        .spawn(&admin(), spec("p", &probe(), &[]))
        .await
        .unwrap();
    f.running("p").await;
    let call =
        |method: &str, params: Value| json!({"cmd": "call", "method": method, "params": params});
    let r = f
        .ask(
            "p",
            call(
                "fs.write",
                json!({"path": "/agents/p/notes.md", "text": "mine"}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(r["result"]["version"], 1, "{r}");
    let r = f
        .ask("p", call("fs.read", json!({"path": "/agents/p/notes.md"})))
        .await
        .unwrap();
    assert_eq!(r["result"]["text"], "mine", "{r}");
    let r = f
        .ask(
            "p",
            call(
                "fs.write",
                json!({"path": "/shared/board.md", "data": {"k": 1}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(r["result"]["version"], 1, "{r}");
    let r = f
        .ask("p", call("fs.list", json!({"path": "/agents/p"})))
        .await
        .unwrap();
    assert_eq!(r["result"]["entries"][0]["name"], "notes.md", "{r}");
    // Another agent's folder, host mounts and bad paths are refused.
    for (params, code) in [
        (json!({"path": "/agents/other/x", "text": "no"}), -32001),
        (json!({"path": "/host/any/x", "text": "no"}), -32001),
        (
            json!({"path": "/agents/p/../other/x", "text": "no"}),
            -32602,
        ),
    ] {
        let r = f.ask("p", call("fs.write", params.clone())).await.unwrap();
        assert_eq!(r["error"]["code"], code, "{params}: {r}");
    }
    let r = f
        .ask("p", call("fs.read", json!({"path": "/agents/p/missing"})))
        .await
        .unwrap();
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no such file"),
        "{r}"
    );
    // What the agent wrote is stored, versioned and audited under its name.
    let store = f.kernel.store();
    let h = store
        .fs_history(&noa_store::VPath::parse("/agents/p/notes.md").unwrap())
        .unwrap();
    assert_eq!(h[0].principal, "agent:p");
    store.flush().await.unwrap();
    let denied = store
        .audit_query(&noa_store::AuditQuery {
            action: Some("policy.deny".into()),
            ..Default::default()
        })
        .unwrap();
    assert!(
        denied
            .iter()
            .any(|a| a.principal == "agent:p" && a.resource == "/agents/other/x"),
        "{denied:?}"
    );
}
