//! Workflows against the real daemon, as a user drives them: `noa workflow` commands, the REST API,
//! and crash recovery by killing the daemon with SIGKILL in the middle of runs.

mod common;

use common::{Daemon, repo_root};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_status(d: &Daemon, id: &str) -> Value {
    d.json(&["workflow", "show", id])
}

#[test]
fn validate_run_watch_list_show_logs_and_history() {
    let d = Daemon::start();
    // A malformed file: the exact message, exit code 1, and no run.
    let bad = d.noa(&[
        "workflow",
        "validate",
        "crates/noa-workflow/testdata/invalid/missing_need.yaml",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("missing_need.yaml:6:13: step `summarize` needs `gathr`, which is not a step (hint: did you mean `gather`?)"),
        "{err}"
    );
    let bad = d.noa(&[
        "workflow",
        "run",
        "crates/noa-workflow/testdata/invalid/cycle.yaml",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("the steps form a cycle: a → b → c → a"));
    assert_eq!(
        d.json(&["workflow", "list"])["runs"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let out = d.ok(&[
        "workflow",
        "validate",
        "examples/workflows/hello.yaml",
        "examples/workflows/poll.yaml",
    ]);
    assert!(
        out.contains("ok: examples/workflows/hello.yaml: workflow hello, 3 steps (run)"),
        "{out}"
    );

    // Run and watch: the final table and outputs.
    let out = d.ok(&[
        "workflow",
        "run",
        "examples/workflows/hello.yaml",
        "--input",
        "who=tests",
        "--watch",
    ]);
    assert!(out.contains("succeeded"), "{out}");
    assert!(
        out.contains("message: hello, tests (this machine has"),
        "{out}"
    );
    let bad_input = d.noa(&[
        "workflow",
        "run",
        "examples/workflows/hello.yaml",
        "--input",
        "whom=x",
    ]);
    assert_eq!(bad_input.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad_input.stderr)
            .contains("workflow hello has no input \"whom\"; its inputs are who")
    );

    let v = d.json(&["workflow", "run", "examples/workflows/poll.yaml", "--watch"]);
    assert_eq!(v["status"], "succeeded", "{v:#}");
    let id = v["id"].as_str().unwrap().to_owned();
    let shards: Vec<String> =
        serde_json::from_str(v["outputs"]["shards"].as_str().unwrap()).unwrap();
    assert_eq!(
        shards,
        [
            "shard eu checked after ready",
            "shard us checked after ready",
            "shard ap checked after ready"
        ]
    );
    let list = d.json(&["workflow", "list"]);
    assert_eq!(list["runs"].as_array().unwrap().len(), 2);
    assert_eq!(list["runs"][0]["id"], id.as_str());
    let table = d.ok(&["workflow", "list", "--status", "succeeded"]);
    assert!(
        table.starts_with("RUN") && table.contains("poll") && table.contains("hello"),
        "{table}"
    );
    let logs = d.ok(&["workflow", "logs", &id, "wait-ready"]);
    assert_eq!(logs.trim(), "ready");
    let history = d.json(&["workflow", "history", &id]);
    let kinds: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"run.created"));
    assert_eq!(kinds.last(), Some(&"run.finished"));
    assert!(kinds.contains(&"item.finished"));
    let shown = d.ok(&["workflow", "show", &id]);
    assert!(
        shown.contains("wait-ready") && shown.contains("3/3"),
        "{shown}"
    );
    // A failing run under --watch: exit code 1, the error, and the end of the failed step's log.
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("fails.yaml");
    std::fs::write(&file, "name: fails\nsteps:\n  - id: broken\n    run: echo first >&2; echo 'disk full' >&2; exit 4\n").unwrap();
    let out = d.noa(&["workflow", "run", file.to_str().unwrap(), "--watch"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--- broken.1.log (last lines) ---\nfirst\ndisk full"),
        "{err}"
    );
    assert!(
        err.contains("error: run ")
            && err.contains("failed: step `broken` failed: the command exited with 4: disk full"),
        "{err}"
    );
    let missing = d.noa(&["workflow", "show", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("NOA-E0901 no workflow run nope"));
}

#[test]
fn approvals_cancel_and_retry_through_the_cli() {
    let d = Daemon::start();
    let id = d
        .ok(&[
            "workflow",
            "run",
            "examples/workflows/release.yaml",
            "--input",
            "version=2.0",
        ])
        .trim()
        .to_owned();
    wait_until("the approval gate", 20, || {
        run_status(&d, &id)["steps"][2]["status"] == "waiting"
    });
    let out = d.ok(&["workflow", "approve", &id, "ship", "--comment", "ship it"]);
    assert!(out.contains("approved step ship"));
    let v = d.json(&["workflow", "show", &id, "--watch"]);
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["outputs"]["approved_by"], "user:admin");
    let audit = d.json(&["audit", "tail", "--action", "workflow.approve"]);
    assert!(audit.to_string().contains("ship it"), "{audit}");

    // Cancel a run whose step waits, then retry it from that step and approve again.
    let id = d
        .ok(&["workflow", "run", "examples/workflows/release.yaml"])
        .trim()
        .to_owned();
    wait_until("the approval gate", 20, || {
        run_status(&d, &id)["steps"][2]["status"] == "waiting"
    });
    d.ok(&["workflow", "cancel", &id]);
    let v = run_status(&d, &id);
    assert_eq!(v["status"], "cancelled");
    assert_eq!(v["steps"][3]["status"], "cancelled");
    let again = d.noa(&["workflow", "cancel", &id]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("is cancelled, not running"));
    let out = d.ok(&["workflow", "retry", &id]);
    assert!(out.contains("runs again from: ship, announce"), "{out}");
    wait_until("the approval gate again", 20, || {
        run_status(&d, &id)["steps"][2]["status"] == "waiting"
    });
    d.ok(&["workflow", "approve", &id, "ship"]);
    assert_eq!(
        d.json(&["workflow", "show", &id, "--watch"])["status"],
        "succeeded"
    );
}

#[test]
fn kill_9_mid_run_resumes_without_repeating_finished_steps() {
    let mut d = Daemon::start();
    let work = tempfile::tempdir().unwrap();
    let p = |n: &str| work.path().join(n).display().to_string();
    let (once, keys, gate) = (p("once"), p("keys"), p("gate"));
    let file = work.path().join("crash.yaml");
    std::fs::write(
        &file,
        format!(
            "name: crash\nsteps:\n  - id: once\n    run: echo x >> {once}; echo first\n  - id: inflight\n    needs: [once]\n    run: echo $NOA_ATTEMPT_KEY >> {keys}; while [ ! -e {gate} ]; do sleep 0.05; done; echo second\n  - id: nap\n    sleep: 2s\n  - id: last\n    needs: [inflight, nap]\n    run: echo ${{{{ steps.once.output }}}}-${{{{ steps.inflight.output }}}}\n"
        ),
    )
    .unwrap();
    let id = d
        .ok(&["workflow", "run", file.to_str().unwrap()])
        .trim()
        .to_owned();
    wait_until("the second step to start", 20, || Path::new(&keys).exists());
    let started = Instant::now();
    // SIGKILL: no chance to clean up. The step's command dies with the daemon (parent-death signal).
    let status = d.signal("-KILL");
    assert!(!status.success());
    std::fs::write(&gate, "").unwrap();
    d.launch();
    let v = d.json(&["workflow", "show", &id, "--watch"]);
    assert_eq!(v["status"], "succeeded", "{v:#}");
    assert_eq!(v["outputs"], Value::Object(Default::default()));
    assert_eq!(v["steps"][3]["output"], "first-second");
    assert_eq!(
        std::fs::read_to_string(&once).unwrap().lines().count(),
        1,
        "a finished step ran again"
    );
    let keys = std::fs::read_to_string(&keys).unwrap();
    let keys: Vec<&str> = keys.lines().collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_eq!(keys[0], keys[1], "the interrupted attempt got a new key");
    assert_eq!(keys[0], format!("{id}.inflight.1"));
    // The sleep's timer survived the crash: it was not restarted from zero.
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[test]
fn repeated_kill_9_every_step_has_its_effect_exactly_once() {
    let mut d = Daemon::start();
    let work = tempfile::tempdir().unwrap();
    let effects = work.path().join("effects").display().to_string();
    let mut yaml = String::from("name: chain\nsteps:\n");
    for i in 0..12 {
        let needs = if i == 0 {
            String::new()
        } else {
            format!("    needs: [s{}]\n", i - 1)
        };
        // Idempotent through the attempt key: a re-run of the same attempt adds nothing.
        yaml.push_str(&format!(
            "  - id: s{i}\n{needs}    run: grep -qx \"$NOA_ATTEMPT_KEY\" {effects} 2>/dev/null || echo \"$NOA_ATTEMPT_KEY\" >> {effects}; sleep 0.15; echo {i}\n"
        ));
    }
    let file = work.path().join("chain.yaml");
    std::fs::write(&file, yaml).unwrap();
    let id = d
        .ok(&["workflow", "run", file.to_str().unwrap()])
        .trim()
        .to_owned();
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(250 + 130 * round));
        d.signal("-KILL");
        d.launch();
    }
    let v = d.json(&["workflow", "show", &id, "--watch"]);
    assert_eq!(v["status"], "succeeded", "{v:#}");
    let lines: Vec<String> = std::fs::read_to_string(&effects)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let expected: Vec<String> = (0..12).map(|i| format!("{id}.s{i}.1")).collect();
    assert_eq!(
        lines, expected,
        "each step's effect, once, with its first attempt's key"
    );
    // The run's history is intact and the audit chain verifies after the crashes.
    let verify = d.ok(&["audit", "verify"]);
    assert!(verify.starts_with("ok"), "{verify}");
}

#[test]
fn register_a_triggered_workflow_and_fire_it_by_subject() {
    let d = Daemon::start();
    let out = d.ok(&["workflow", "register", "examples/workflows/nightly.yaml"]);
    assert!(
        out.contains("registered nightly: cron \"0 3 * * *\", subject reports.request"),
        "{out}"
    );
    let table = d.ok(&["workflow", "registered"]);
    assert!(table.contains("nightly"), "{table}");
    d.ok(&["pub", "reports.request", "from-test"]);
    wait_until("a run started by the subject", 20, || {
        d.json(&["workflow", "list", "--status", "succeeded"])["runs"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
    });
    let id = d.json(&["workflow", "list"])["runs"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let v = run_status(&d, &id);
    assert_eq!(v["trigger"], "subject:reports.request");
    assert_eq!(v["inputs"]["event"], "from-test");
    d.ok(&["workflow", "unregister", "nightly"]);
    let gone = d.noa(&["workflow", "unregister", "nightly"]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NOA-E0904"));
    let _ = repo_root();
}
