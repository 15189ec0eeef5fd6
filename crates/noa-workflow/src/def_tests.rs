//! Data-driven tests of the parser and validator: `testdata/invalid/<name>.yaml` and the exact messages
//! expected for it in `<name>.expected`. Run with `UPDATE_EXPECT=1` to rewrite the expectations.

use super::*;
use std::path::PathBuf;

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

fn parse_file(path: &Path) -> Result<Workflow, Vec<Diagnostic>> {
    let source = std::fs::read_to_string(path).unwrap();
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    parse(
        &name,
        &source,
        &FsLoader {
            base: path.parent().unwrap().to_owned(),
        },
    )
}

#[test]
fn invalid_files_give_exact_messages() {
    let dir = testdata().join("invalid");
    let update = std::env::var_os("UPDATE_EXPECT").is_some();
    let mut checked = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        let diags = match parse_file(&path) {
            Ok(_) => panic!("{} should not be valid", path.display()),
            Err(d) => d,
        };
        let got: String = diags.iter().map(|d| format!("{d}\n")).collect();
        let expected_path = path.with_extension("expected");
        if update {
            std::fs::write(&expected_path, &got).unwrap();
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        assert_eq!(got, expected, "messages for {}", path.display());
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} invalid files");
}

#[test]
fn the_full_example_parses() {
    let w = parse_file(&testdata().join("valid/full.yaml")).unwrap();
    assert_eq!(w.name, "triage");
    assert_eq!(w.steps.len(), 9);
    assert_eq!(w.on.cron.len(), 1);
    assert_eq!(w.on.subjects, vec!["files.uploaded"]);
    let post = w.step("post").unwrap();
    assert_eq!(post.retry.attempts, 3);
    assert_eq!(post.retry.backoff, Duration::from_millis(200));
    assert!(post.continue_on_error);
    assert!(
        matches!(w.step("nap").unwrap().kind, StepKind::Sleep { duration } if duration == Duration::from_secs(90))
    );
    assert_eq!(w.step("each").unwrap().max_parallel, Some(2));
}

#[test]
fn every_example_workflow_is_valid() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/workflows");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "yaml") {
            if let Err(d) = load_file(&e.path()) {
                panic!("{}: {d:?}", e.path().display());
            }
            n += 1;
        }
    }
    assert!(n >= 3, "{n} examples");
}

#[test]
fn inputs_are_checked_and_coerced() {
    let w = parse(
        "t.yaml",
        "name: t\ninputs:\n  n: integer\n  s: { type: string, default: x }\nsteps:\n  - id: a\n    run: echo ${{ inputs.n }}\n",
        &BundleLoader(&BTreeMap::new()),
    )
    .unwrap();
    let mut given = BTreeMap::new();
    assert_eq!(
        w.resolve_inputs(&given).unwrap_err(),
        "input n (integer) is required: pass --input n=<value>"
    );
    given.insert("n".to_owned(), Value::String("41".into()));
    assert_eq!(
        w.resolve_inputs(&given).unwrap(),
        serde_json::json!({"n": 41, "s": "x"})
    );
    given.insert("n".to_owned(), Value::String("4.5".into()));
    assert_eq!(
        w.resolve_inputs(&given).unwrap_err(),
        "input n: \"4.5\" is not an integer"
    );
    given.insert("zz".to_owned(), Value::Null);
    assert_eq!(
        w.resolve_inputs(&given).unwrap_err(),
        "workflow t has no input \"zz\"; its inputs are n, s"
    );
}

#[test]
fn durations() {
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
    assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
    assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
    assert!(parse_duration("5 minutes").is_err());
    assert!(parse_duration("-1").is_err());
    assert!(parse_duration("").is_err());
}

#[test]
fn retry_backoff_grows_and_is_capped() {
    let r = Retry {
        attempts: 5,
        backoff: Duration::from_millis(100),
        factor: 2.0,
        max_backoff: Duration::from_millis(300),
    };
    assert_eq!(r.delay(2), Duration::from_millis(100));
    assert_eq!(r.delay(3), Duration::from_millis(200));
    assert_eq!(r.delay(4), Duration::from_millis(300));
}

proptest::proptest! {
    /// Any text: the parser answers with a workflow or diagnostics, never a panic, and every diagnostic
    /// points inside the file.
    #[test]
    fn parsing_arbitrary_text_never_panics(s in "\\PC{0,200}") {
        if let Err(diags) = parse("p.yaml", &s, &BundleLoader(&BTreeMap::new())) {
            let lines = s.lines().count().max(1) as u32 + 1;
            for d in diags {
                proptest::prop_assert!(d.pos.line >= 1 && d.pos.line <= lines, "{d} in {s:?}");
            }
        }
    }

    /// Workflow-shaped text with random keys, values and expressions.
    #[test]
    fn parsing_workflow_like_text_never_panics(
        keys in proptest::collection::vec("(id|run|needs|if|for_each|loop|retry|timeout|sleep|approval|publish|zz)", 1..6),
        vals in proptest::collection::vec("[a-z0-9 ${}.'=|&!()\\[\\]-]{0,20}", 1..6),
    ) {
        let mut src = String::from("name: p\nsteps:\n  - id: s0\n");
        for (k, v) in keys.iter().zip(vals.iter()) {
            src.push_str(&format!("    {k}: \"{}\"\n", v.replace('"', "")));
        }
        let _ = parse("p.yaml", &src, &BundleLoader(&BTreeMap::new()));
    }
}
