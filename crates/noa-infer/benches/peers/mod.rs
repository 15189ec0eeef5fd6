//! llama.cpp's own `llama-bench` as a peer inside the benchmarks (the generate bench here, the API bench of
//! `crates/noa`, which includes this file by path): where it is, and one run of it.

use std::path::{Path, PathBuf};

/// The `llama-bench` that bench/llama_peers.sh builds, or the one NOA_LLAMA_BENCH names; `None` if absent.
pub fn llama_bench() -> Option<PathBuf> {
    std::env::var_os("NOA_LLAMA_BENCH")
        .map(PathBuf::from)
        .or_else(|| {
            Some(
                Path::new(&std::env::var_os("HOME")?)
                    .join(".cache/noa/llama_cpp_python-0.3.36-build/bin/llama-bench"),
            )
        })
        .filter(|p| p.exists())
}

/// One `llama-bench -p 0 -n <tokens> -t <threads> -r 1` run of `model`: its generation tokens/s.
pub fn llama_bench_tg(bin: &Path, model: &Path, tokens: u32, threads: u32) -> Option<f64> {
    let out = std::process::Command::new(bin)
        .arg("-m")
        .arg(model)
        .args(["-p", "0", "-n", &tokens.to_string(), "-r", "1"])
        .args(["-t", &threads.to_string(), "-o", "json"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    rows.get(0)?.get("avg_ts")?.as_f64()
}
