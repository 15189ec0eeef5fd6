//! Native process spawn to first reply over the agent protocol, beside its peer: a plain fork/exec of the
//! same program answering one request over pipes. Both use the `echo_agent` example (built by this bench).
//! Run: `cargo bench -p noa-sandbox --bench spawn`.

use bytes::Bytes;
use noa_bus::Bus;
use noa_kernel::{BuiltinRuntime, Kernel, KernelOptions};
use noa_policy::{Policy, Principal};
use noa_sandbox::{NativeOptions, NativeRuntime};
use noa_store::Store;
use noa_types::{ProcessSpec, RestartPolicy};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn agent_binary() -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "-q",
            "-p",
            "noa-sandbox",
            "--example",
            "echo_agent",
        ])
        .current_dir(&root)
        .status()
        .unwrap();
    assert!(status.success());
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    target
        .join("release/examples/echo_agent")
        .canonicalize()
        .unwrap()
        .display()
        .to_string()
}

fn fork_exec_once(bin: &str) -> Duration {
    let t = Instant::now();
    let mut child = Command::new(bin)
        .arg("--oneshot")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(
        stdin,
        r#"{{"jsonrpc":"2.0","id":1,"method":"message","params":{{"data":"ping"}}}}"#
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let took = t.elapsed();
    let _ = child.wait();
    took
}

fn main() {
    let bin = agent_binary();
    let n = 200;
    let mut peer: Vec<Duration> = (0..n).map(|_| fork_exec_once(&bin)).collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut ours = rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("noa.db")).unwrap();
        let kernel = Kernel::new(
            KernelOptions::new(dir.path().join("logs")),
            Bus::local(),
            store,
            Policy::default_policy(),
            vec![
                Arc::new(NativeRuntime::new(NativeOptions::default())),
                Arc::new(BuiltinRuntime),
            ],
        );
        let admin = Principal::User("admin".into());
        let mut lat = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("a{i}");
            let mut spec = ProcessSpec::native(&name, &bin, &[]);
            spec.restart = RestartPolicy::Temporary;
            let t = Instant::now();
            kernel.spawn(&admin, spec).await.unwrap();
            // The first request may arrive before the agent has answered `initialize`: it waits in the mailbox.
            let reply = kernel
                .request(
                    &admin,
                    &format!("agent.{name}.inbox"),
                    Bytes::from_static(b"\"ping\""),
                    None,
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
            lat.push(t.elapsed());
            assert_eq!(reply.payload, "\"ping\"");
            kernel.stop(&admin, &name).await.unwrap();
        }
        lat
    });
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (o50, o99) = (percentile(&mut ours, 0.5), percentile(&mut ours, 0.99));
    let (p50, p99) = (percentile(&mut peer, 0.5), percentile(&mut peer, 0.99));
    println!(
        "native spawn to first reply: p50 {:.2} ms, p99 {:.2} ms | plain fork/exec + one reply: p50 {:.2} ms, p99 {:.2} ms | p50 ratio {:.2}",
        ms(o50),
        ms(o99),
        ms(p50),
        ms(p99),
        ms(o50) / ms(p50)
    );
}
