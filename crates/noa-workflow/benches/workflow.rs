//! Workflow engine benchmarks, each beside its peer from the same run on the same disk:
//! - a 3-step sequential workflow, every step durable before the next starts, end to end (start → ended), p50:
//!   with `run` steps against the same three commands as a shell script, and with `publish` steps (no process);
//! - throughput of trivial durable steps (`publish`) over many concurrent runs, against raw SQLite inserts of one
//!   row per transaction at the same durability (WAL, synchronous=FULL) — the limit a step-per-fsync design has;
//! - 1,000 parallel branches that fan out from one step and in to one: total time and overhead per step.
//!
//! Run: `cargo bench -p noa-workflow --bench workflow` (`NOA_BENCH_QUICK=1` for smaller sizes).

use noa_bus::Bus;
use noa_kernel::{Kernel, KernelOptions};
use noa_policy::{Policy, Principal};
use noa_store::Store;
use noa_workflow::{EngineOptions, WorkflowEngine, def};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn quick() -> bool {
    std::env::var_os("NOA_BENCH_QUICK").is_some()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn engine(dir: &Path) -> (WorkflowEngine, tokio::sync::watch::Sender<bool>) {
    let store = Store::open(&dir.join("noa.db")).unwrap();
    let kernel = Kernel::new(
        KernelOptions::new(dir.join("logs")),
        Bus::local(),
        store,
        Policy::default_policy(),
        vec![],
    );
    let (tx, rx) = tokio::sync::watch::channel(false);
    let opts = EngineOptions::new(dir.join("work"));
    (WorkflowEngine::new(kernel, opts, rx), tx)
}

fn parse(yaml: &str) -> def::Workflow {
    def::parse("bench.yaml", yaml, &def::BundleLoader(&BTreeMap::new())).unwrap()
}

async fn run_once(e: &WorkflowEngine, w: &def::Workflow) -> Duration {
    let admin = Principal::User("admin".into());
    let t = Instant::now();
    let id = e
        .start(&admin, w.clone(), BTreeMap::new(), "bench")
        .await
        .unwrap();
    let v = e.wait(&id).await.unwrap();
    assert_eq!(v.status, "succeeded", "{v:?}");
    t.elapsed()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir_in(".").unwrap();
    let (e, _stop) = engine(dir.path());
    rt.block_on(e.start_service()).unwrap();
    let n = if quick() { 20 } else { 100 };

    // 1. Latency of three sequential steps.
    let run3 = parse(
        "name: three\nsteps:\n  - id: a\n    run: /bin/true\n  - id: b\n    needs: [a]\n    run: /bin/true\n  - id: c\n    needs: [b]\n    run: /bin/true\n",
    );
    let pub3 = parse(
        "name: three\nsteps:\n  - id: a\n    publish: { subject: bench.a }\n  - id: b\n    needs: [a]\n    publish: { subject: bench.b }\n  - id: c\n    needs: [b]\n    publish: { subject: bench.c }\n",
    );
    let mut run_lat = Vec::new();
    let mut pub_lat = Vec::new();
    rt.block_on(async {
        for _ in 0..5 {
            run_once(&e, &run3).await;
        }
        for _ in 0..n {
            run_lat.push(run_once(&e, &run3).await.as_secs_f64() * 1e3);
            pub_lat.push(run_once(&e, &pub3).await.as_secs_f64() * 1e3);
        }
    });
    let mut sh_lat = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let ok = Command::new("/bin/sh")
            .args(["-c", "/bin/true && /bin/true && /bin/true"])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        sh_lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (r50, r90) = (pct(&mut run_lat, 0.5), pct(&mut run_lat, 0.9));
    let (p50, p90) = (pct(&mut pub_lat, 0.5), pct(&mut pub_lat, 0.9));
    let s50 = pct(&mut sh_lat, 0.5);
    println!("3 sequential run steps (durable):      p50 {r50:.2} ms, p90 {r90:.2} ms");
    println!("3 sequential publish steps (durable):  p50 {p50:.2} ms, p90 {p90:.2} ms");
    println!(
        "peer: the same 3 commands as a shell script: p50 {s50:.2} ms  (ratio run/shell {:.2})",
        r50 / s50
    );

    // 2. Throughput of trivial durable steps over concurrent runs.
    let steps_per_run = 20;
    let runs = if quick() { 50 } else { 250 };
    let mut yaml = String::from("name: chain\nsteps:\n");
    for i in 0..steps_per_run {
        let needs = if i == 0 {
            String::new()
        } else {
            format!("    needs: [s{}]\n", i - 1)
        };
        yaml.push_str(&format!(
            "  - id: s{i}\n{needs}    publish: {{ subject: bench.t }}\n"
        ));
    }
    let chain = parse(&yaml);
    let mut rates = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        rt.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..runs {
                let e = e.clone();
                let w = chain.clone();
                tasks.push(tokio::spawn(async move { run_once(&e, &w).await }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
        rates.push((runs * steps_per_run) as f64 / t.elapsed().as_secs_f64());
    }
    let steps_s = pct(&mut rates, 0.5);
    // Peer: raw SQLite, one row per transaction, fsynced (the same durability as one step, one commit).
    let raw = {
        let conn = rusqlite::Connection::open(dir.path().join("raw.db")).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        conn.execute_batch("CREATE TABLE t (run TEXT, seq INTEGER, data TEXT)")
            .unwrap();
        let rows = if quick() { 500 } else { 2000 };
        let t = Instant::now();
        for i in 0..rows {
            conn.execute(
                "INSERT INTO t VALUES ('r', ?1, '{\"status\":\"succeeded\",\"output\":\"0\"}')",
                [i],
            )
            .unwrap();
        }
        rows as f64 / t.elapsed().as_secs_f64()
    };
    println!(
        "durable publish steps, {runs} concurrent runs x {steps_per_run} steps: {steps_s:.0} steps/s (median of 3)"
    );
    println!(
        "peer: raw SQLite insert, one per transaction, WAL + synchronous=FULL: {raw:.0} rows/s  (ratio {:.2})",
        steps_s / raw
    );

    // 3. 1,000 parallel branches, fan out and in.
    let branches = if quick() { 200 } else { 1000 };
    let mut yaml =
        String::from("name: fan\nsteps:\n  - id: start\n    publish: { subject: bench.f }\n");
    for i in 0..branches {
        yaml.push_str(&format!(
            "  - id: b{i}\n    needs: [start]\n    publish: {{ subject: bench.f }}\n"
        ));
    }
    yaml.push_str("  - id: join\n    needs: [");
    yaml.push_str(
        &(0..branches)
            .map(|i| format!("b{i}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    yaml.push_str("]\n    publish: { subject: bench.f }\n");
    let fan = parse(&yaml);
    let mut times = Vec::new();
    rt.block_on(async {
        for _ in 0..3 {
            times.push(run_once(&e, &fan).await.as_secs_f64() * 1e3);
        }
    });
    let t = pct(&mut times, 0.5);
    println!(
        "{branches} parallel branches, fan out and in: {t:.0} ms (median of 3), {:.0} µs per step",
        t * 1e3 / (branches + 2) as f64
    );
}
