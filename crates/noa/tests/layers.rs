//! Checks the architecture's invariants (ARCHITECTURE.md) on the sources: which crate may depend on which,
//! and where `unsafe` may appear.

use std::path::Path;

fn manifest(krate: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(krate)
            .join("Cargo.toml"),
    )
    .unwrap()
}

/// The `[dependencies]` section's crate names (not dev-dependencies).
fn deps(krate: &str) -> Vec<String> {
    let m = manifest(krate);
    let section = m
        .split("[dependencies]")
        .nth(1)
        .unwrap_or("")
        .split("\n[")
        .next()
        .unwrap_or("");
    section
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_owned()))
        .filter(|k| !k.is_empty())
        .collect()
}

#[test]
fn layers_only_point_down() {
    // types → store/bus/policy → kernel → sandbox/infer → workflow → server → node → binary.
    let allowed: &[(&str, &[&str])] = &[
        ("noa-types", &[]),
        ("noa-bus", &[]),
        ("noa-store", &["noa-types"]),
        ("noa-policy", &[]),
        ("noa-infer", &["noa-types"]),
        (
            "noa-kernel",
            &["noa-types", "noa-bus", "noa-store", "noa-policy"],
        ),
        (
            "noa-sandbox",
            &["noa-types", "noa-bus", "noa-store", "noa-kernel"],
        ),
        (
            "noa-server",
            &[
                "noa-types",
                "noa-bus",
                "noa-kernel",
                "noa-store",
                "noa-policy",
                "noa-infer",
                "noa-workflow",
            ],
        ),
        (
            "noa-workflow",
            &[
                "noa-types",
                "noa-bus",
                "noa-store",
                "noa-policy",
                "noa-kernel",
                "noa-sandbox",
            ],
        ),
        (
            "noa-node",
            &[
                "noa-types",
                "noa-bus",
                "noa-store",
                "noa-policy",
                "noa-kernel",
                "noa-sandbox",
                "noa-infer",
                "noa-workflow",
                "noa-server",
            ],
        ),
        ("noa", &["noa-types", "noa-node"]),
    ];
    for (krate, ok) in allowed {
        for d in deps(krate).iter().filter(|d| d.starts_with("noa")) {
            assert!(ok.contains(&d.as_str()), "{krate} must not depend on {d}");
        }
    }
}

#[test]
fn only_the_server_knows_wire_formats() {
    for krate in [
        "noa-types",
        "noa-bus",
        "noa-store",
        "noa-policy",
        "noa-kernel",
        "noa-sandbox",
    ] {
        for web in ["axum", "hyper", "tower", "tokio-tungstenite", "ureq"] {
            assert!(
                !deps(krate).iter().any(|d| d == web),
                "{krate} must not depend on {web}: only noa-server knows HTTP"
            );
        }
    }
    // Workflows call HTTP services from `http` steps (a client), but serve no wire format.
    for web in ["axum", "hyper", "tower", "tokio-tungstenite"] {
        assert!(
            !deps("noa-workflow").iter().any(|d| d == web),
            "noa-workflow must not depend on {web}: only noa-server serves HTTP"
        );
    }
}

#[test]
fn unsafe_code_lives_only_in_the_two_ffi_modules() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut offenders = Vec::new();
    let mut stack = vec![crates];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                if !p.ends_with("target") {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|e| e == "rs")
                && !p.ends_with("noa-sandbox/src/os.rs")
                && !p.ends_with("noa-infer/src/ffi.rs")
                && !p.ends_with("tests/layers.rs")
            {
                let text = std::fs::read_to_string(&p).unwrap();
                if text.contains("unsafe {")
                    || text.contains("unsafe fn")
                    || text.contains("allow(unsafe_code)")
                {
                    offenders.push(p.display().to_string());
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "unsafe outside noa-sandbox/src/os.rs and noa-infer/src/ffi.rs: {offenders:?}"
    );
    for file in ["../noa-sandbox/src/os.rs", "../noa-infer/src/ffi.rs"] {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
        assert_eq!(
            text.matches("unsafe {").count(),
            text.matches("// SAFETY:").count(),
            "every unsafe block in {file} has a SAFETY comment"
        );
    }
}

#[test]
fn every_module_says_what_it_is_for() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut stack = vec![crates];
    let mut missing = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "rs")
                && p.components().any(|c| c.as_os_str() == "src")
            {
                let text = std::fs::read_to_string(&p).unwrap();
                if !text.trim_start().starts_with("//!") {
                    missing.push(p.display().to_string());
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "modules without a //! line: {missing:?}"
    );
}
