//! Layered configuration: defaults, then `<data-dir>/noa.toml`, then `NOA_*` environment variables, then flags.
//!
//! Every setting is declared once in [`SETTINGS`] with its type, default and meaning; the file, the environment
//! and the flags are checked against that list, so an unknown key or a bad value is an error naming the file,
//! line, column and key (or the variable, or the flag). [`Config::entries`] says where each value came from;
//! [`set`] edits the file in place, keeping its comments and layout.

use crate::{Error, Result};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The file name in the data directory.
pub const FILE: &str = "noa.toml";

/// The type of a setting's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `host:port`.
    Addr,
    /// A size: `1048576`, `512KiB`, `256MiB`, `1GiB` (also KB/MB/GB as powers of 1000, and K/M/G as KiB/MiB/GiB).
    Bytes,
    /// A whole number within bounds.
    Count { min: u64, max: u64 },
    /// One of the listed words.
    Choice(&'static [&'static str]),
    /// A log filter such as `info` or `noa=debug,info`.
    LogFilter,
    /// A duration: `500ms`, `30s`, `5m`, `1h`.
    Duration,
}

/// One setting.
#[derive(Debug)]
pub struct Setting {
    pub key: &'static str,
    pub kind: Kind,
    pub default: &'static str,
    pub doc: &'static str,
}

/// Every setting there is.
pub const SETTINGS: &[Setting] = &[
    Setting {
        key: "server.listen",
        kind: Kind::Addr,
        default: "127.0.0.1:7070",
        doc: "Where the API listens. Loopback by default; any other address exposes it (still behind the token).",
    },
    Setting {
        key: "log.level",
        kind: Kind::LogFilter,
        default: "info",
        doc: "The daemon's log filter (tracing's env-filter syntax). NOA_LOG is accepted too.",
    },
    Setting {
        key: "store.key",
        kind: Kind::Choice(&["file", "passphrase"]),
        default: "file",
        doc: "What unlocks the data key: the key file <data-dir>/store.key, or a passphrase from NOA_PASSPHRASE.",
    },
    Setting {
        key: "fs.quota_agent",
        kind: Kind::Bytes,
        default: "256MiB",
        doc: "Most bytes of current files under each /agents/<name> (0: unlimited).",
    },
    Setting {
        key: "fs.quota_run",
        kind: Kind::Bytes,
        default: "256MiB",
        doc: "Most bytes of current files under each /runs/<id> (0: unlimited).",
    },
    Setting {
        key: "fs.quota_shared",
        kind: Kind::Bytes,
        default: "1GiB",
        doc: "Most bytes of current files under /shared (0: unlimited).",
    },
    Setting {
        key: "audit.checkpoint_every",
        kind: Kind::Count {
            min: 1,
            max: 1_000_000,
        },
        default: "1000",
        doc: "A checkpoint signed by the node key every this many audit records.",
    },
    Setting {
        key: "infer.context",
        kind: Kind::Count {
            min: 256,
            max: 131_072,
        },
        default: "4096",
        doc: "Context length (tokens) of each loaded model, at most the model's own.",
    },
    Setting {
        key: "infer.threads",
        kind: Kind::Count { min: 0, max: 1024 },
        default: "0",
        doc: "CPU threads for inference (0: every core).",
    },
    Setting {
        key: "infer.max_loaded",
        kind: Kind::Count { min: 1, max: 64 },
        default: "2",
        doc: "Most models in memory at once; the least recently used unpinned one makes room.",
    },
    Setting {
        key: "infer.memory_budget",
        kind: Kind::Bytes,
        default: "0",
        doc: "Most memory the loaded models may take together (0: none; a model is loaded only if available memory can hold it).",
    },
    Setting {
        key: "infer.parallel",
        kind: Kind::Count { min: 1, max: 64 },
        default: "4",
        doc: "Requests one model serves at once: slots decoded together in one batch (continuous batching), each with infer.context tokens.",
    },
    Setting {
        key: "infer.keep_alive",
        kind: Kind::Duration,
        default: "5m",
        doc: "A model unused this long is unloaded (unless pinned).",
    },
    Setting {
        key: "kernel.log_max_bytes",
        kind: Kind::Bytes,
        default: "10MiB",
        doc: "A process log file is rotated when it reaches this size.",
    },
    Setting {
        key: "workflow.max_concurrent_steps",
        kind: Kind::Count {
            min: 1,
            max: 100_000,
        },
        default: "64",
        doc: "Most workflow steps (commands, HTTP requests, model calls, publishes) in flight on this node at once.",
    },
    Setting {
        key: "workflow.max_output",
        kind: Kind::Bytes,
        default: "16MiB",
        doc: "Most bytes a workflow step may output; a command that prints more is stopped and its step fails.",
    },
];

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Default,
    File { path: PathBuf, line: usize },
    Env(String),
    Flag(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File { path, line } => write!(f, "file {}:{line}", path.display()),
            Source::Env(v) => write!(f, "env {v}"),
            Source::Flag(v) => write!(f, "flag {v}"),
        }
    }
}

/// One effective value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: &'static str,
    pub value: String,
    pub source: Source,
    pub doc: &'static str,
}

/// The effective configuration.
#[derive(Clone, Debug)]
pub struct Config {
    values: BTreeMap<&'static str, (String, Source)>,
}

fn setting(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}

/// The environment variable of a key: `fs.quota_agent` → `NOA_FS_QUOTA_AGENT`.
pub fn env_name(key: &str) -> String {
    format!("NOA_{}", key.to_ascii_uppercase().replace('.', "_"))
}

fn unknown_key_message(key: &str) -> String {
    let close = SETTINGS
        .iter()
        .map(|s| (strsim(key, s.key), s.key))
        .min_by_key(|(d, _)| *d)
        .filter(|(d, _)| *d <= 3)
        .map(|(_, k)| format!("; did you mean `{k}`?"))
        .unwrap_or_default();
    format!(
        "unknown key `{key}`{close} (known keys: {})",
        SETTINGS
            .iter()
            .map(|s| s.key)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Edit distance, for suggestions.
fn strsim(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Parses a size: digits with an optional unit.
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 1048576, 512KiB, 256MiB, 1GiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        u => {
            return Err(format!(
                "unknown size unit {u:?} in {s:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Checks a value against its setting's type; returns it normalized.
pub fn check_value(key: &str, value: &str) -> std::result::Result<String, String> {
    let s = setting(key).ok_or_else(|| unknown_key_message(key))?;
    match s.kind {
        Kind::Addr => value
            .parse::<SocketAddr>()
            .map(|a| a.to_string())
            .map_err(|_| format!("{value:?} is not an address like 127.0.0.1:7070")),
        Kind::Bytes => parse_bytes(value).map(|_| value.trim().to_owned()),
        Kind::Count { min, max } => match value.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n.to_string()),
            _ => Err(format!(
                "{value:?} is not a whole number from {min} to {max}"
            )),
        },
        Kind::Choice(options) => {
            if options.contains(&value) {
                Ok(value.to_owned())
            } else {
                Err(format!("{value:?} is not one of {}", options.join(", ")))
            }
        }
        Kind::Duration => noa_types::parse_duration(value)
            .map(|_| value.trim().to_owned())
            .map_err(|e| format!("{value:?} is not a duration (examples: 500ms, 30s, 5m): {e}")),
        Kind::LogFilter => {
            let ok = !value.trim().is_empty()
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_=,:-.[]{}*".contains(c));
            if ok {
                Ok(value.trim().to_owned())
            } else {
                Err(format!(
                    "{value:?} is not a log filter (examples: info, debug, noa_kernel=debug,info)"
                ))
            }
        }
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

fn file_error(path: &Path, text: &str, offset: usize, key: &str, message: String) -> Error {
    let (line, column) = line_col(text, offset);
    Error::Config {
        place: format!("{}:{line}:{column}", path.display()),
        key: key.to_owned(),
        message,
    }
}

/// Reads `noa.toml` into (key, value, line); the errors name file, line, column and key.
fn read_file(path: &Path) -> Result<Vec<(&'static str, String, usize)>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::Config {
                place: path.display().to_string(),
                key: String::new(),
                message: e.to_string(),
            });
        }
    };
    let doc = toml_edit::Document::parse(text.as_str()).map_err(|e| {
        let offset = e.span().map(|s| s.start).unwrap_or(0);
        file_error(
            path,
            &text,
            offset,
            "",
            format!("not valid TOML: {}", e.message()),
        )
    })?;
    let mut out = Vec::new();
    for (section, item) in doc.as_table().iter() {
        let span = |item: &toml_edit::Item| item.span().map(|s| s.start).unwrap_or(0);
        let Some(table) = item.as_table_like() else {
            return Err(file_error(
                path,
                &text,
                span(item),
                section,
                format!(
                    "`{section}` must be a section like [{section}]; {}",
                    unknown_key_message(section)
                ),
            ));
        };
        for (name, value) in table.iter() {
            let key = format!("{section}.{name}");
            let at = span(value);
            let Some(s) = setting(&key) else {
                return Err(file_error(path, &text, at, &key, unknown_key_message(&key)));
            };
            let raw = match value.as_value() {
                Some(toml_edit::Value::String(v)) => v.value().clone(),
                Some(toml_edit::Value::Integer(v))
                    if matches!(s.kind, Kind::Bytes | Kind::Count { .. }) =>
                {
                    v.value().to_string()
                }
                _ => {
                    return Err(file_error(
                        path,
                        &text,
                        at,
                        &key,
                        match s.kind {
                            Kind::Bytes | Kind::Count { .. } => {
                                "expected a number or a quoted string".into()
                            }
                            _ => "expected a quoted string".into(),
                        },
                    ));
                }
            };
            let checked =
                check_value(&key, &raw).map_err(|m| file_error(path, &text, at, &key, m))?;
            out.push((s.key, checked, line_col(&text, at).0));
        }
    }
    Ok(out)
}

impl Config {
    /// Layers defaults, the file in `data_dir`, the environment (through `env`) and `flags` (key, value, flag name).
    pub fn load(
        data_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
        flags: &[(String, String, String)],
    ) -> Result<Config> {
        let mut values: BTreeMap<&'static str, (String, Source)> = SETTINGS
            .iter()
            .map(|s| (s.key, (s.default.to_owned(), Source::Default)))
            .collect();
        let path = data_dir.join(FILE);
        for (key, value, line) in read_file(&path)? {
            values.insert(
                key,
                (
                    value,
                    Source::File {
                        path: path.clone(),
                        line,
                    },
                ),
            );
        }
        for s in SETTINGS {
            let mut names = vec![env_name(s.key)];
            if s.key == "log.level" {
                names.insert(0, "NOA_LOG".into());
            }
            for var in names {
                if let Some(v) = env(&var).filter(|v| !v.is_empty()) {
                    let checked = check_value(s.key, &v).map_err(|message| Error::Config {
                        place: format!("environment variable {var}"),
                        key: s.key.to_owned(),
                        message,
                    })?;
                    values.insert(s.key, (checked, Source::Env(var)));
                }
            }
        }
        for (key, value, flag) in flags {
            let checked = check_value(key, value).map_err(|message| Error::Config {
                place: format!("flag {flag}"),
                key: key.clone(),
                message,
            })?;
            let s = setting(key).ok_or_else(|| Error::Config {
                place: format!("flag {flag}"),
                key: key.clone(),
                message: unknown_key_message(key),
            })?;
            values.insert(s.key, (checked, Source::Flag(flag.clone())));
        }
        Ok(Config { values })
    }

    /// The defaults alone.
    pub fn defaults() -> Config {
        Config {
            values: SETTINGS
                .iter()
                .map(|s| (s.key, (s.default.to_owned(), Source::Default)))
                .collect(),
        }
    }

    /// Every setting with its effective value and source, in key order.
    pub fn entries(&self) -> Vec<Entry> {
        SETTINGS
            .iter()
            .map(|s| {
                let (value, source) = self.values[s.key].clone();
                Entry {
                    key: s.key,
                    value,
                    source,
                    doc: s.doc,
                }
            })
            .collect()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(|v| v.0.as_str())
    }

    fn raw(&self, key: &'static str) -> &str {
        // Every key in SETTINGS has a value from `load` or `defaults`.
        self.values
            .get(key)
            .map(|v| v.0.as_str())
            .unwrap_or_default()
    }

    pub fn listen(&self) -> SocketAddr {
        self.raw("server.listen")
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 7070)))
    }

    pub fn bytes(&self, key: &'static str) -> u64 {
        parse_bytes(self.raw(key)).unwrap_or(0)
    }

    pub fn count(&self, key: &'static str) -> u64 {
        self.raw(key).parse().unwrap_or(1)
    }

    pub fn duration(&self, key: &'static str) -> std::time::Duration {
        noa_types::parse_duration(self.raw(key)).unwrap_or(std::time::Duration::from_secs(300))
    }

    pub fn log_level(&self) -> &str {
        self.raw("log.level")
    }

    pub fn uses_passphrase(&self) -> bool {
        self.raw("store.key") == "passphrase"
    }

    /// The effective values as JSON (key → value), to record and compare.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.values
                .iter()
                .map(|(k, (v, _))| ((*k).to_owned(), serde_json::Value::String(v.clone())))
                .collect(),
        )
    }
}

/// Sets `key = value` in `<data_dir>/noa.toml` (creating it), keeping the rest of the file as it was.
/// Returns the path written.
pub fn set(data_dir: &Path, key: &str, value: &str) -> Result<PathBuf> {
    let path = data_dir.join(FILE);
    let checked = check_value(key, value).map_err(|message| Error::Config {
        place: "noa config set".into(),
        key: key.to_owned(),
        message,
    })?;
    // Parse the whole file first: a broken file is reported, not overwritten.
    read_file(&path)?;
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut doc: toml_edit::DocumentMut =
        text.parse()
            .map_err(|e: toml_edit::TomlError| Error::Config {
                place: path.display().to_string(),
                key: key.to_owned(),
                message: e.message().to_owned(),
            })?;
    let (section, name) = key.split_once('.').unwrap_or((key, ""));
    let s = setting(key).ok_or_else(|| Error::Config {
        place: "noa config set".into(),
        key: key.to_owned(),
        message: unknown_key_message(key),
    })?;
    if !doc.contains_key(section) {
        doc[section] = toml_edit::table();
    }
    doc[section][name] = match s.kind {
        Kind::Count { .. } => toml_edit::value(checked.parse::<i64>().unwrap_or(0)),
        _ => toml_edit::value(checked),
    };
    std::fs::create_dir_all(data_dir).map_err(|e| Error::DataDir {
        path: data_dir.to_owned(),
        message: e.to_string(),
    })?;
    let tmp = path.with_extension("toml.tmp");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(doc.to_string().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        if let Ok(d) = std::fs::File::open(data_dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().map_err(|e| Error::DataDir {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn load_text(text: &str) -> Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), text).unwrap();
        Config::load(dir.path(), &no_env, &[])
    }

    #[test]
    fn layers_apply_in_order_with_sources() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(FILE),
            "# my settings\n[fs]\nquota_shared = \"2GiB\"\nquota_agent = 1024\n[server]\nlisten = \"127.0.0.1:9000\"\n",
        )
        .unwrap();
        let env = |k: &str| (k == "NOA_FS_QUOTA_AGENT").then(|| "4KiB".to_owned());
        let flags = [(
            "server.listen".to_owned(),
            "127.0.0.1:9100".to_owned(),
            "--listen".to_owned(),
        )];
        let c = Config::load(dir.path(), &env, &flags).unwrap();
        assert_eq!(c.bytes("fs.quota_shared"), 2 << 30);
        assert_eq!(c.bytes("fs.quota_agent"), 4096);
        assert_eq!(c.listen().port(), 9100);
        let e = c.entries();
        let src = |k: &str| e.iter().find(|x| x.key == k).unwrap().source.to_string();
        assert!(
            src("fs.quota_shared").ends_with("noa.toml:3"),
            "{}",
            src("fs.quota_shared")
        );
        assert_eq!(src("fs.quota_agent"), "env NOA_FS_QUOTA_AGENT");
        assert_eq!(src("server.listen"), "flag --listen");
        assert_eq!(src("log.level"), "default");
    }

    #[test]
    fn bad_files_name_file_line_column_and_key() {
        let e = load_text("[fs]\nquota_shard = \"1GiB\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("noa.toml:2:15") && e.contains("fs.quota_shard"),
            "{e}"
        );
        assert!(e.contains("did you mean `fs.quota_shared`"), "{e}");
        let e = load_text("[fs]\nquota_shared = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("noa.toml:2:16") && e.contains("is not a size"),
            "{e}"
        );
        let e = load_text("[server]\nlisten = 7070\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":2:10") && e.contains("expected a quoted string"),
            "{e}"
        );
        let e = load_text("[audit]\ncheckpoint_every = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("from 1 to 1000000"), "{e}");
        let e = load_text("[fs\n").unwrap_err().to_string();
        assert!(
            e.contains("noa.toml:1:") && e.contains("not valid TOML"),
            "{e}"
        );
        let e = load_text("listen = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("must be a section"), "{e}");
        let env = |k: &str| (k == "NOA_STORE_KEY").then(|| "usb".to_owned());
        let dir = tempfile::tempdir().unwrap();
        let e = Config::load(dir.path(), &env, &[]).unwrap_err().to_string();
        assert!(
            e.contains("environment variable NOA_STORE_KEY") && e.contains("file, passphrase"),
            "{e}"
        );
    }

    #[test]
    fn set_keeps_comments_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(FILE),
            "# keep me\n[fs]\nquota_run = \"1MiB\" # and me\n",
        )
        .unwrap();
        set(dir.path(), "fs.quota_shared", "3GiB").unwrap();
        set(dir.path(), "audit.checkpoint_every", "50").unwrap();
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert!(
            text.contains("# keep me") && text.contains("# and me"),
            "{text}"
        );
        let c = Config::load(dir.path(), &no_env, &[]).unwrap();
        assert_eq!(c.bytes("fs.quota_shared"), 3 << 30);
        assert_eq!(c.count("audit.checkpoint_every"), 50);
        assert!(
            set(dir.path(), "fs.nope", "1")
                .unwrap_err()
                .to_string()
                .contains("unknown key")
        );
        assert!(set(dir.path(), "server.listen", "nowhere").is_err());
    }

    #[test]
    fn every_setting_is_documented() {
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md"),
        )
        .unwrap();
        for s in SETTINGS {
            assert!(
                doc.contains(&format!("| `{}` |", s.key)),
                "docs/configuration.md lacks {}",
                s.key
            );
            assert!(doc.contains(&format!("`{}`", s.default)) || doc.contains(s.default));
        }
    }

    proptest! {
        #[test]
        fn any_file_text_is_an_error_or_a_config(text in "\\PC{0,80}") {
            let _ = load_text(&text);
        }

        #[test]
        fn sizes_parse_or_explain(s in "[0-9]{0,20}[A-Za-z]{0,4}") {
            if let Err(m) = parse_bytes(&s) {
                prop_assert!(!m.is_empty());
            }
        }
    }
}
