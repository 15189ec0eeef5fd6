//! Tests of the executor against a real store, bus and kernel in a temporary folder, with real child processes.

use crate::def::{self, Workflow};
use crate::engine::{EngineOptions, RunView, WorkflowEngine};
use noa_bus::Bus;
use noa_kernel::{Kernel, KernelOptions};
use noa_policy::{Policy, Principal};
use noa_store::Store;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::watch;

struct Env {
    dir: tempfile::TempDir,
    kernel: Kernel,
    engine: WorkflowEngine,
    stop: watch::Sender<bool>,
}

fn admin() -> Principal {
    Principal::User("admin".into())
}

fn kernel_in(dir: &Path) -> Kernel {
    let store = Store::open(&dir.join("noa.db")).unwrap();
    Kernel::new(
        KernelOptions::new(dir.join("logs")),
        Bus::local(),
        store,
        Policy::default_policy(),
        vec![],
    )
}

fn engine_for(
    kernel: &Kernel,
    dir: &Path,
    tune: impl FnOnce(&mut EngineOptions),
) -> (WorkflowEngine, watch::Sender<bool>) {
    let (stop, rx) = watch::channel(false);
    let mut opts = EngineOptions::new(dir.join("work"));
    tune(&mut opts);
    (WorkflowEngine::new(kernel.clone(), opts, rx), stop)
}

async fn env_with(tune: impl FnOnce(&mut EngineOptions)) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let kernel = kernel_in(dir.path());
    let (engine, stop) = engine_for(&kernel, dir.path(), tune);
    engine.start_service().await.unwrap();
    Env {
        dir,
        kernel,
        engine,
        stop,
    }
}

async fn env() -> Env {
    env_with(|_| {}).await
}

fn parse(yaml: &str, dir: &Path) -> Workflow {
    def::parse(
        "test.yaml",
        yaml,
        &def::FsLoader {
            base: dir.to_owned(),
        },
    )
    .unwrap_or_else(|d| panic!("{d:#?}"))
}

impl Env {
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    async fn start(&self, yaml: &str, inputs: &[(&str, Value)]) -> String {
        let def = parse(yaml, self.dir.path());
        let inputs: BTreeMap<String, Value> = inputs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        self.engine
            .start(&admin(), def, inputs, "manual")
            .await
            .unwrap()
    }

    async fn run(&self, yaml: &str) -> RunView {
        let id = self.start(yaml, &[]).await;
        self.wait(&id).await
    }

    async fn wait(&self, id: &str) -> RunView {
        tokio::time::timeout(Duration::from_secs(30), self.engine.wait(id))
            .await
            .expect("the run did not end within 30 s")
            .unwrap()
    }

    async fn until(&self, id: &str, what: &str, f: impl Fn(&RunView) -> bool) -> RunView {
        let start = Instant::now();
        loop {
            let v = self.engine.show(&admin(), id).unwrap();
            if f(&v) {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "timed out waiting for {what}: {v:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn step<'a>(v: &'a RunView, id: &str) -> &'a crate::engine::StepView {
    v.steps.iter().find(|s| s.id == id).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dag_runs_in_order_with_parallel_branches_and_publishes_its_events() {
    let e = env().await;
    let def = parse(
        "name: dag\ninputs:\n  who: { type: string, default: x }\nsteps:\n  - id: a\n    run: echo a-${{ inputs.who }}\n  - id: b\n    needs: [a]\n    run: sleep 0.4; echo b\n  - id: c\n    needs: [a]\n    run: sleep 0.4; echo c\n  - id: d\n    needs: [b, c]\n    run: echo ${{ steps.a.output }}+${{ steps.b.output }}+${{ steps.c.output }}\noutputs:\n  all: ${{ steps.d.output }}\n",
        e.dir.path(),
    );
    let mut events = e.kernel.bus().subscribe("wf.>", None, 1024).unwrap();
    let mut inputs = BTreeMap::new();
    inputs.insert("who".to_owned(), json!("y"));
    let id = e
        .engine
        .start(&admin(), def, inputs, "manual")
        .await
        .unwrap();
    let v = e.wait(&id).await;
    assert_eq!(v.status, "succeeded", "{v:#?}");
    assert_eq!(v.outputs, json!({"all": "a-y+b+c"}));
    let (b, c) = (step(&v, "b"), step(&v, "c"));
    // b and c overlap: each started before the other finished.
    assert!(
        b.started_ms.unwrap() < c.finished_ms.unwrap()
            && c.started_ms.unwrap() < b.finished_ms.unwrap()
    );
    assert!(
        step(&v, "d").started_ms.unwrap() >= b.finished_ms.unwrap().max(c.finished_ms.unwrap())
    );
    // Events are published once durable, just after the run is seen to end: collect until the last one.
    let mut subjects = Vec::new();
    let finished = format!("wf.{id}.run.finished");
    while !subjects.contains(&finished) {
        let m = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("the run's events were not all published")
            .unwrap();
        subjects.push(m.subject.to_string());
    }
    assert!(
        subjects.contains(&format!("wf.{id}.run.created")),
        "{subjects:?}"
    );
    assert!(
        subjects.contains(&format!("wf.{id}.step.d.finished")),
        "{subjects:?}"
    );
    assert_eq!(subjects.last().unwrap(), &format!("wf.{id}.run.finished"));
    // The history is in order and complete.
    let history = e.engine.history(&admin(), &id, 0).unwrap();
    assert!(history.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    assert_eq!(history.last().unwrap().kind, "run.finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_failures_and_continue_on_error() {
    let e = env().await;
    let v = e
        .run(
            "name: c\nsteps:\n  - id: flaky\n    run: echo oops >&2; exit 3\n    continue_on_error: true\n  - id: after\n    needs: [flaky]\n    run: echo ran\n  - id: cleanup\n    needs: [flaky]\n    if: steps.flaky.status == 'failed'\n    run: echo cleaning\n  - id: never\n    needs: [after]\n    if: ${{ false }}\n    run: echo no\n  - id: skipped-too\n    needs: [never]\n    run: echo no\n",
        )
        .await;
    assert_eq!(v.status, "succeeded", "{v:#?}");
    assert_eq!(step(&v, "flaky").status, "failed");
    assert_eq!(
        step(&v, "flaky").error.as_deref(),
        Some("the command exited with 3: oops")
    );
    assert_eq!(step(&v, "after").output.as_deref(), Some("ran"));
    assert_eq!(step(&v, "cleanup").output.as_deref(), Some("cleaning"));
    assert_eq!(step(&v, "never").status, "skipped");
    assert_eq!(step(&v, "skipped-too").status, "skipped");
    let (_, logs) = e.engine.logs(&admin(), &v.id, "flaky").unwrap();
    assert_eq!(logs, vec![("flaky.1.log".to_owned(), "oops\n".to_owned())]);

    let v = e
        .run("name: f\nsteps:\n  - id: missing\n    run: no-such-command-here\n  - id: other\n    run: echo fine\n  - id: after\n    needs: [missing]\n    run: echo never\n")
        .await;
    assert_eq!(v.status, "failed");
    let err = step(&v, "missing").error.clone().unwrap();
    assert!(
        err.starts_with("the command exited with 127 (command not found)"),
        "{err}"
    );
    assert_eq!(step(&v, "other").status, "succeeded");
    assert_eq!(step(&v, "after").status, "skipped");
    assert!(
        v.error
            .unwrap()
            .starts_with("step `missing` failed: the command exited with 127")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_with_backoff_and_timeouts() {
    let e = env().await;
    let counter = e.path("count");
    let keys = e.path("keys");
    let yaml = format!(
        "name: r\nsteps:\n  - id: flaky\n    run: echo $NOA_ATTEMPT_KEY >> {keys}; echo x >> {counter}; [ $(wc -l < {counter}) -ge 3 ]\n    retry: {{ attempts: 4, backoff: 50ms }}\n  - id: slow\n    run: sleep 20\n    timeout: 300ms\n    retry: 2\n    continue_on_error: true\n"
    );
    let t = Instant::now();
    let v = e.run(&yaml).await;
    assert_eq!(v.status, "succeeded", "{v:#?}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the timeout did not stop the command"
    );
    assert_eq!(step(&v, "flaky").attempts, 3);
    let keys = std::fs::read_to_string(&keys).unwrap();
    let keys: Vec<&str> = keys.lines().collect();
    assert_eq!(
        keys,
        vec![
            format!("{}.flaky.1", v.id),
            format!("{}.flaky.2", v.id),
            format!("{}.flaky.3", v.id)
        ]
    );
    let slow = step(&v, "slow");
    assert_eq!(slow.status, "failed");
    assert_eq!(
        slow.error.as_deref(),
        Some("timed out after 300ms (after 2 attempts)")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn for_each_respects_max_parallel_and_loop_stops_when_until_holds() {
    let e = env().await;
    let log = e.path("spans");
    let yaml = format!(
        "name: fe\nsteps:\n  - id: each\n    for_each: [1, 2, 3, 4, 5]\n    max_parallel: 2\n    run: echo start >> {log}; sleep 0.2; echo end >> {log}; echo item-${{{{ item }}}}-$NOA_ITEM\n  - id: poll\n    loop: {{ until: \"${{{{ output == '3' }}}}\", max_iterations: 5 }}\n    run: echo $NOA_ITERATION\n  - id: bounded\n    loop: {{ until: \"${{{{ false }}}}\", max_iterations: 2 }}\n    run: echo again\n    continue_on_error: true\n"
    );
    let v = e.run(&yaml).await;
    assert_eq!(v.status, "succeeded", "{v:#?}");
    let out: Value = serde_json::from_str(step(&v, "each").output.as_deref().unwrap()).unwrap();
    assert_eq!(
        out,
        json!(["item-1-1", "item-2-2", "item-3-3", "item-4-4", "item-5-5"])
    );
    let mut running = 0;
    let mut most = 0;
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        running += if line == "start" { 1 } else { -1 };
        most = most.max(running);
    }
    assert_eq!(most, 2, "max_parallel: 2 was not respected");
    assert_eq!(step(&v, "poll").output.as_deref(), Some("3"));
    assert_eq!(step(&v, "poll").units_total, Some(3));
    let b = step(&v, "bounded");
    assert_eq!(
        b.error.as_deref(),
        Some("the loop did not end: `until` was still false after 2 iterations")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_outputs_go_to_the_vfs_and_too_large_ones_fail() {
    let e = env_with(|o| {
        o.inline_output = 1024;
        o.output_limit = 1 << 20;
    })
    .await;
    let v = e
        .run("name: big\nsteps:\n  - id: medium\n    run: head -c 200000 /dev/zero | tr '\\0' 'a'\n  - id: len\n    needs: [medium]\n    run: echo ${{ length(steps.medium.output) }}\n  - id: huge\n    run: yes | head -c 100000000\n    continue_on_error: true\n")
        .await;
    assert_eq!(v.status, "succeeded", "{v:#?}");
    let m = step(&v, "medium");
    assert_eq!(m.output, None);
    assert_eq!(
        m.output_file.as_deref(),
        Some(format!("/runs/{}/out/medium.txt", v.id).as_str())
    );
    assert_eq!(step(&v, "len").output.as_deref(), Some("200000"));
    let (out, _) = e.engine.logs(&admin(), &v.id, "medium").unwrap();
    assert_eq!(out.len(), 200_000);
    assert_eq!(
        step(&v, "huge").error.as_deref(),
        Some("the command printed more than 1 MiB to stdout and was stopped (workflow.max_output)")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_wait_for_and_sleep() {
    let e = env().await;
    let t = Instant::now();
    let v = e
        .run("name: bus\nsteps:\n  - id: listen\n    wait_for: { subject: test.ping, timeout: 10s }\n  - id: nap\n    sleep: 300ms\n  - id: send\n    needs: [nap]\n    publish: { subject: test.ping, payload: { n: 7, s: \"${{ run.workflow }}\" } }\n  - id: nobody\n    wait_for: { subject: test.never, timeout: 200ms }\n    continue_on_error: true\n")
        .await;
    assert_eq!(v.status, "succeeded", "{v:#?}");
    assert!(t.elapsed() >= Duration::from_millis(300));
    let got: Value = serde_json::from_str(step(&v, "listen").output.as_deref().unwrap()).unwrap();
    assert_eq!(got, json!({"n": 7, "s": "bus"}));
    assert_eq!(
        step(&v, "nobody").error.as_deref(),
        Some("no message on test.never within 200ms")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_gates_pause_resume_and_cancel() {
    let e = env().await;
    let id = e
        .start("name: gate\nsteps:\n  - id: ask\n    approval: ok?\n  - id: go\n    needs: [ask]\n    run: echo approved by ${{ steps.ask.output }}\n", &[])
        .await;
    e.until(&id, "the approval", |v| step(v, "ask").status == "waiting")
        .await;
    let err = e
        .engine
        .approve(&admin(), &id, "go", None)
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "NOA-E0902 step `go` is not waiting for approval (it is pending)"
    );
    e.engine
        .approve(&admin(), &id, "ask", Some("lgtm".into()))
        .await
        .unwrap();
    let v = e.wait(&id).await;
    assert_eq!(
        step(&v, "go").output.as_deref(),
        Some("approved by user:admin")
    );
    // An agent may not approve by default.
    let id2 = e
        .start(
            "name: gate2\nsteps:\n  - id: ask\n    approval: true\n",
            &[],
        )
        .await;
    e.until(&id2, "the approval", |v| step(v, "ask").status == "waiting")
        .await;
    let denied = e
        .engine
        .approve(&Principal::Agent("bot".into()), &id2, "ask", None)
        .await;
    assert!(denied.unwrap_err().to_string().contains("denied"));

    // Pause: the step in flight finishes, the next does not start until resumed.
    let id = e
        .start("name: p\nsteps:\n  - id: a\n    run: sleep 0.5; echo a\n  - id: b\n    needs: [a]\n    run: echo b\n", &[])
        .await;
    e.engine.pause(&admin(), &id).await.unwrap();
    let v = e
        .until(&id, "a to finish", |v| step(v, "a").status == "succeeded")
        .await;
    assert_eq!(v.status, "paused");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        step(&e.engine.show(&admin(), &id).unwrap(), "b").status,
        "pending"
    );
    e.engine.resume(&admin(), &id).await.unwrap();
    assert_eq!(e.wait(&id).await.status, "succeeded");

    // Cancel: the command in flight is killed at once.
    let marker = e.path("cancelled-pid");
    let id = e
        .start(&format!("name: long\nsteps:\n  - id: a\n    run: echo $$ > {marker}; sleep 30\n  - id: b\n    needs: [a]\n    run: echo never\n"), &[])
        .await;
    e.until(&id, "the command to start", |_| Path::new(&marker).exists())
        .await;
    e.engine.cancel(&admin(), &id).await.unwrap();
    let v = e.wait(&id).await;
    assert_eq!(v.status, "cancelled");
    assert_eq!(step(&v, "a").status, "cancelled");
    assert_eq!(step(&v, "b").status, "cancelled");
    let pid = std::fs::read_to_string(&marker).unwrap().trim().to_owned();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z"),
        "the command still runs: {stat}"
    );
    let again = e
        .engine
        .cancel(&admin(), &id)
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        again,
        "NOA-E0902 run ".to_owned() + &id + " is cancelled, not running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_from_a_failed_step_keeps_what_succeeded() {
    let e = env().await;
    let count = e.path("first-ran");
    let flag = e.path("flag");
    let yaml = format!(
        "name: rf\nsteps:\n  - id: first\n    run: echo x >> {count}; echo first\n  - id: second\n    needs: [first]\n    run: test -e {flag} && echo second\n  - id: third\n    needs: [second]\n    run: echo third after ${{{{ steps.second.output }}}}\n"
    );
    let v = e.run(&yaml).await;
    assert_eq!(v.status, "failed");
    assert_eq!(step(&v, "third").status, "skipped");
    std::fs::write(&flag, "").unwrap();
    let reset = e.engine.retry(&admin(), &v.id, None).await.unwrap();
    assert_eq!(reset, vec!["second", "third"]);
    let v = e.wait(&v.id).await;
    assert_eq!(v.status, "succeeded", "{v:#?}");
    assert_eq!(
        step(&v, "third").output.as_deref(),
        Some("third after second")
    );
    assert_eq!(
        std::fs::read_to_string(&count).unwrap().lines().count(),
        1,
        "first ran again"
    );
    // Retrying from a named step runs it again with a new attempt key.
    e.engine
        .retry(&admin(), &v.id, Some("first"))
        .await
        .unwrap();
    let v = e.wait(&v.id).await;
    assert_eq!(v.status, "succeeded");
    assert_eq!(std::fs::read_to_string(&count).unwrap().lines().count(), 2);
    assert_eq!(step(&v, "first").attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_workflows_and_http_steps() {
    let e = env().await;
    std::fs::write(
        e.dir.path().join("child.yaml"),
        "name: child\ninputs:\n  x: integer\nsteps:\n  - id: double\n    run: echo $(( ${{ inputs.x }} * 2 ))\noutputs:\n  y: ${{ steps.double.output }}\n",
    )
    .unwrap();
    // A small HTTP server: 200 with the request body echoed back, or 500 for /fail.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    got.extend_from_slice(&buf[..n]);
                    // Not HTTP (a TLS hello): hang up.
                    if got.first().is_some_and(|b| !b.is_ascii_uppercase()) {
                        return;
                    }
                    let text = String::from_utf8_lossy(&got).to_string();
                    if let Some(h) = text.find("\r\n\r\n") {
                        let len: usize = text
                            .lines()
                            .find_map(|l| {
                                l.to_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if got.len() >= h + 4 + len || n == 0 {
                            let body = &text[h + 4..];
                            let (code, reply) = if text.starts_with("POST /fail") {
                                ("500 Oops", "broken".to_owned())
                            } else {
                                ("200 OK", format!("got:{body}"))
                            };
                            let resp = format!(
                                "HTTP/1.1 {code}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                                reply.len()
                            );
                            let _ = s.write_all(resp.as_bytes()).await;
                            return;
                        }
                    }
                    if n == 0 {
                        return;
                    }
                }
            });
        }
    });
    let v = e
        .run(&format!("name: parent\nsteps:\n  - id: sub\n    workflow: {{ file: child.yaml, inputs: {{ x: 21 }} }}\n  - id: post\n    needs: [sub]\n    http: {{ method: POST, url: \"http://127.0.0.1:{port}/hook\", body: {{ y: \"${{{{ fromJSON(steps.sub.output).y }}}}\" }} }}\n  - id: bad\n    http: {{ method: POST, url: \"http://127.0.0.1:{port}/fail\" }}\n    continue_on_error: true\n  - id: tls\n    http: {{ url: \"https://127.0.0.1:{port}/x\" }}\n    continue_on_error: true\n"))
        .await;
    assert_eq!(v.status, "succeeded", "{v:#?}");
    assert_eq!(step(&v, "sub").output.as_deref(), Some(r#"{"y":"42"}"#));
    assert_eq!(
        step(&v, "post").output.as_deref(),
        Some(r#"got:{"y":"42"}"#)
    );
    assert_eq!(
        step(&v, "bad").error.as_deref(),
        Some(format!("POST http://127.0.0.1:{port}/fail answered HTTP 500: broken").as_str())
    );
    // HTTPS is spoken: against a plain-HTTP server the TLS handshake fails, with a message that says where.
    let tls = step(&v, "tls").error.clone().unwrap();
    assert!(
        tls.starts_with(&format!("GET https://127.0.0.1:{port}/x failed:")),
        "{tls}"
    );
    let runs = e.engine.list(&admin(), &Default::default()).unwrap();
    assert!(
        runs.iter()
            .any(|r| r.parent.as_deref() == Some(v.id.as_str()) && r.workflow == "child")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_engine_resumes_runs_without_repeating_finished_steps() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = kernel_in(dir.path());
    let (engine, stop) = engine_for(&kernel, dir.path(), |_| {});
    engine.start_service().await.unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let (once, keys, gate) = (p("once"), p("keys"), p("gate"));
    let yaml = format!(
        "name: resume\nsteps:\n  - id: once\n    run: echo x >> {once}; echo done\n  - id: nap\n    sleep: 1s\n  - id: inflight\n    needs: [once]\n    run: echo $NOA_ATTEMPT_KEY >> {keys}; while [ ! -e {gate} ]; do sleep 0.05; done; echo ok\n  - id: last\n    needs: [inflight, nap]\n    run: echo ${{{{ steps.once.output }}}}-${{{{ steps.inflight.output }}}}\n  - id: bounded\n    run: sleep 30\n    timeout: 2s\n    continue_on_error: true\n"
    );
    let def = parse(&yaml, dir.path());
    let id = engine
        .start(&admin(), def, BTreeMap::new(), "manual")
        .await
        .unwrap();
    let t0 = Instant::now();
    while !Path::new(&keys).exists() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The node stops while `inflight` runs and `nap` sleeps.
    stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(engine.active_runs(), 0);
    std::fs::write(&gate, "").unwrap();
    drop(engine);
    // The node stays down a while: timers must keep their times, not start again.
    tokio::time::sleep(Duration::from_millis(1000)).await;

    let (engine, _stop2) = engine_for(&kernel, dir.path(), |_| {});
    assert_eq!(engine.start_service().await.unwrap(), 1);
    let v = tokio::time::timeout(Duration::from_secs(20), engine.wait(&id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.status, "succeeded", "{v:#?}");
    assert_eq!(step(&v, "last").output.as_deref(), Some("done-ok"));
    assert_eq!(
        std::fs::read_to_string(&once).unwrap().lines().count(),
        1,
        "a finished step ran again"
    );
    let keys = std::fs::read_to_string(&keys).unwrap();
    let keys: Vec<&str> = keys.lines().collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_eq!(
        keys[0], keys[1],
        "the interrupted attempt did not keep its key"
    );
    // The sleep's timer was kept: it ended about a second after the run started, not a second after the restart.
    let nap = step(&v, "nap");
    assert!(nap.finished_ms.unwrap() - v.created_ms < 1800, "{nap:?}");
    let bounded = step(&v, "bounded");
    assert_eq!(bounded.error.as_deref(), Some("timed out after 2s"));
    assert!(
        bounded.finished_ms.unwrap() - v.created_ms < 2900,
        "{bounded:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_start_runs_from_subjects_and_schedules() {
    let e = env().await;
    let def = parse(
        "name: trig\non:\n  subject: test.kick\n  cron: \"* * * * * *\"\ninputs:\n  event: { type: object, default: {} }\nsteps:\n  - id: a\n    env: { EVENT: \"${{ toJSON(inputs.event) }}\" }\n    run: echo \"$EVENT\"\n",
        e.dir.path(),
    );
    e.engine.register(&admin(), &def).await.unwrap();
    // A second schedule due at the same moments: both fire.
    let tock = parse(
        "name: tock\non:\n  cron: \"* * * * * *\"\nsteps:\n  - id: a\n    run: echo tock\n",
        e.dir.path(),
    );
    e.engine.register(&admin(), &tock).await.unwrap();
    let registered = e.engine.registered(&admin()).unwrap();
    let trig = registered.iter().find(|r| r.name == "trig").unwrap();
    assert_eq!(trig.subjects, vec!["test.kick"]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    e.kernel
        .bus()
        .publish_bytes("test.kick", r#"{"file":"a.txt"}"#)
        .unwrap();
    let t0 = Instant::now();
    let (by_subject, by_cron) = loop {
        let runs = e.engine.list(&admin(), &Default::default()).unwrap();
        let views: Vec<RunView> = runs
            .iter()
            .map(|r| e.engine.show(&admin(), &r.id).unwrap())
            .collect();
        let s = views
            .iter()
            .find(|v| v.trigger == "subject:test.kick" && v.status == "succeeded")
            .cloned();
        let c = views
            .iter()
            .find(|v| v.trigger.starts_with("cron:") && v.workflow == "trig")
            .cloned();
        let tocks = views
            .iter()
            .filter(|v| v.trigger.starts_with("cron:") && v.workflow == "tock")
            .count();
        if let (Some(s), Some(c), true) = (s, c, tocks >= 2) {
            break (s, c);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no triggered runs: {views:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        step(&by_subject, "a").output.as_deref(),
        Some(r#"{"file":"a.txt"}"#)
    );
    assert_eq!(by_cron.trigger, "cron:* * * * * *");
    e.engine.unregister(&admin(), "trig").await.unwrap();
    e.engine.unregister(&admin(), "tock").await.unwrap();
    assert!(e.engine.registered(&admin()).unwrap().is_empty());
    let err = e
        .engine
        .unregister(&admin(), "trig")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("NOA-E0904"), "{err}");
    drop(e.stop);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_and_unknown_runs_are_clear_errors() {
    let e = env().await;
    let def = parse(
        "name: i\ninputs:\n  n: integer\nsteps:\n  - id: a\n    run: echo ${{ inputs.n }}\n",
        e.dir.path(),
    );
    let mut inputs = BTreeMap::new();
    inputs.insert("n".to_owned(), json!("many"));
    let err = e
        .engine
        .start(&admin(), def, inputs, "manual")
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(err, "NOA-E0903 input n: \"many\" is not an integer");
    let err = e.engine.show(&admin(), "nope").unwrap_err().to_string();
    assert_eq!(
        err,
        "NOA-E0901 no workflow run nope; `noa workflow list` shows the runs"
    );
    // An agent may not start workflows by default.
    let def = parse("name: j\nsteps:\n  - id: a\n    run: echo\n", e.dir.path());
    let denied = e
        .engine
        .start(
            &Principal::Agent("bot".into()),
            def,
            BTreeMap::new(),
            "manual",
        )
        .await;
    assert!(denied.unwrap_err().to_string().contains("denied"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_are_kept_in_the_vfs_and_restored_for_later_steps() {
    let e = env().await;
    let flag = e.path("flag");
    let yaml = format!(
        "name: art\nsteps:\n  - id: make\n    run: echo report > $NOA_ARTIFACTS/report.txt; mkdir $NOA_ARTIFACTS/sub; echo deep > $NOA_ARTIFACTS/sub/x.txt; ln -s /etc/passwd $NOA_ARTIFACTS/link; echo made\n  - id: use\n    needs: [make]\n    run: test -e {flag} && cat artifacts/make/report.txt artifacts/make/sub/x.txt\n"
    );
    let v = e.run(&yaml).await;
    assert_eq!(v.status, "failed");
    let make = step(&v, "make");
    let base = format!("/runs/{}/artifacts/make", v.id);
    assert_eq!(
        make.artifacts,
        vec![format!("{base}/report.txt"), format!("{base}/sub/x.txt")]
    );
    let stored = e
        .kernel
        .store()
        .fs_open(
            &noa_store::VPath::parse(&format!("{base}/report.txt")).unwrap(),
            None,
        )
        .unwrap()
        .read_all()
        .unwrap();
    assert_eq!(stored, b"report\n");
    // The run ended, so its working folder is gone; a retry gets the artifacts back from the VFS.
    assert!(!e.dir.path().join("work").join(&v.id).exists());
    std::fs::write(&flag, "").unwrap();
    e.engine.retry(&admin(), &v.id, None).await.unwrap();
    let v = e.wait(&v.id).await;
    assert_eq!(v.status, "succeeded", "{v:#?}");
    assert_eq!(step(&v, "use").output.as_deref(), Some("report\ndeep"));
}
