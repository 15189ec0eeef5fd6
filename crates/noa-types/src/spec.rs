//! Process specs: what to run, how to restart it, under which supervisor and within which limits.

use crate::{Error, Result, validate_name};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The kind of a process: which runtime runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessKind {
    /// A Rust task inside the daemon (the supervisors, the built-in services).
    Builtin,
    /// An OS child process in any language, speaking the agent protocol over stdio.
    Native,
}

impl ProcessKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessKind::Builtin => "builtin",
            ProcessKind::Native => "native",
        }
    }
}

impl fmt::Display for ProcessKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When a supervisor restarts a child that ended (Erlang/OTP's restart types).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// Always restarted.
    Permanent,
    /// Restarted only after an abnormal end (non-zero exit, signal, error).
    #[default]
    Transient,
    /// Never restarted.
    Temporary,
}

impl FromStr for RestartPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "permanent" => Ok(RestartPolicy::Permanent),
            "transient" => Ok(RestartPolicy::Transient),
            "temporary" => Ok(RestartPolicy::Temporary),
            other => Err(Error::invalid(
                "restart",
                format!(
                    "unknown restart policy {other:?}; expected permanent, transient or temporary"
                ),
            )),
        }
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RestartPolicy::Permanent => "permanent",
            RestartPolicy::Transient => "transient",
            RestartPolicy::Temporary => "temporary",
        })
    }
}

/// Which siblings a supervisor restarts when one child must be restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Only the child that ended.
    #[default]
    OneForOne,
    /// Every child: the others are stopped in reverse start order, then all start again in start order.
    OneForAll,
    /// The child and every sibling started after it.
    RestForOne,
}

impl FromStr for Strategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.replace('_', "-").as_str() {
            "one-for-one" => Ok(Strategy::OneForOne),
            "one-for-all" => Ok(Strategy::OneForAll),
            "rest-for-one" => Ok(Strategy::RestForOne),
            _ => Err(Error::invalid(
                "strategy",
                format!(
                    "unknown strategy {s:?}; expected one-for-one, one-for-all or rest-for-one"
                ),
            )),
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::OneForOne => "one-for-one",
            Strategy::OneForAll => "one-for-all",
            Strategy::RestForOne => "rest-for-one",
        })
    }
}

/// What a supervisor does: its strategy and restart intensity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorSpec {
    #[serde(default)]
    pub strategy: Strategy,
    /// At most this many restarts…
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// …within this many milliseconds; one more and the supervisor gives up and escalates to its parent.
    #[serde(default = "default_within_ms")]
    pub within_ms: u64,
    /// First restart delay; doubled for each recent restart up to `backoff_max_ms`.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
}

fn default_max_restarts() -> u32 {
    5
}
fn default_within_ms() -> u64 {
    60_000
}
fn default_backoff_ms() -> u64 {
    100
}
fn default_backoff_max_ms() -> u64 {
    10_000
}

impl Default for SupervisorSpec {
    fn default() -> Self {
        SupervisorSpec {
            strategy: Strategy::default(),
            max_restarts: default_max_restarts(),
            within_ms: default_within_ms(),
            backoff_ms: default_backoff_ms(),
            backoff_max_ms: default_backoff_max_ms(),
        }
    }
}

impl SupervisorSpec {
    /// The delay before restart number `n` (1-based) within the window: `backoff · 2^(n-1)`, capped.
    pub fn backoff(&self, n: u32) -> Duration {
        let shift = n.saturating_sub(1).min(30);
        let ms = self
            .backoff_ms
            .saturating_mul(1u64 << shift)
            .min(self.backoff_max_ms);
        Duration::from_millis(ms)
    }
}

/// What a native process runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NativeSpec {
    /// The program: a path, or a name looked up in the daemon's `PATH`.
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// The working directory (default: the daemon's).
    #[serde(default)]
    pub cwd: Option<String>,
}

/// Resource limits of a process. `None` means the default of the kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Address-space limit in bytes (RLIMIT_AS).
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// CPU time limit in seconds (RLIMIT_CPU).
    #[serde(default)]
    pub cpu_seconds: Option<u64>,
    /// Open file descriptors (RLIMIT_NOFILE).
    #[serde(default)]
    pub open_files: Option<u64>,
    /// Messages queued for the process before new ones are dropped.
    #[serde(default)]
    pub mailbox: Option<usize>,
    /// Grace period between a stop request and SIGKILL, in milliseconds.
    #[serde(default)]
    pub stop_grace_ms: Option<u64>,
}

impl Limits {
    pub const DEFAULT_MAILBOX: usize = 1024;
    pub const DEFAULT_OPEN_FILES: u64 = 1024;
    pub const DEFAULT_STOP_GRACE_MS: u64 = 5_000;

    pub fn mailbox(&self) -> usize {
        self.mailbox.unwrap_or(Self::DEFAULT_MAILBOX)
    }
    pub fn stop_grace(&self) -> Duration {
        Duration::from_millis(self.stop_grace_ms.unwrap_or(Self::DEFAULT_STOP_GRACE_MS))
    }
}

/// Everything needed to start (and restart) a process. Stored in the registry as JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    pub name: String,
    pub kind: ProcessKind,
    /// For `native`: what to run.
    #[serde(default)]
    pub native: Option<NativeSpec>,
    /// For `builtin`: which built-in (`echo`, `supervisor`).
    #[serde(default)]
    pub builtin: Option<String>,
    /// For supervisors: strategy and intensity.
    #[serde(default)]
    pub supervisor: Option<SupervisorSpec>,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// The supervisor's name; `None` is the root supervisor.
    #[serde(default)]
    pub parent: Option<String>,
    /// Environment granted to the process (everything else is cleared).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Secrets injected as environment variables: variable name → secret name. Values never appear in
    /// the spec, its events or the API; the spawner must be allowed to read each secret.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: Limits,
    /// Subject patterns the process may publish and request on, beyond its own `agent.<name>.>`.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Subject patterns the process may subscribe to, beyond its own `agent.<name>.>`.
    #[serde(default)]
    pub subscribe: Vec<String>,
}

impl ProcessSpec {
    /// A native process running `command args…` under the root supervisor.
    pub fn native(name: &str, command: &str, args: &[&str]) -> Self {
        ProcessSpec {
            name: name.to_owned(),
            kind: ProcessKind::Native,
            native: Some(NativeSpec {
                command: command.to_owned(),
                args: args.iter().map(|s| s.to_string()).collect(),
                cwd: None,
            }),
            builtin: None,
            supervisor: None,
            restart: RestartPolicy::default(),
            parent: None,
            env: BTreeMap::new(),
            limits: Limits::default(),
            publish: Vec::new(),
            subscribe: Vec::new(),
            secrets: BTreeMap::new(),
        }
    }

    /// A built-in process by its built-in name.
    pub fn builtin(name: &str, builtin: &str) -> Self {
        ProcessSpec {
            kind: ProcessKind::Builtin,
            native: None,
            builtin: Some(builtin.to_owned()),
            ..ProcessSpec::native(name, "", &[])
        }
    }

    /// A supervisor with the given strategy.
    pub fn supervisor(name: &str, sup: SupervisorSpec) -> Self {
        ProcessSpec {
            supervisor: Some(sup),
            restart: RestartPolicy::Permanent,
            ..ProcessSpec::builtin(name, "supervisor")
        }
    }

    pub fn is_supervisor(&self) -> bool {
        self.kind == ProcessKind::Builtin && self.builtin.as_deref() == Some("supervisor")
    }

    /// Checks the spec as a whole; the error names the field.
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        let env_name_ok = |k: &str| {
            !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        for k in self.env.keys().chain(self.secrets.keys()) {
            if !env_name_ok(k) {
                return Err(Error::invalid(
                    "env",
                    format!(
                        "{k:?} is not a valid environment variable name (letters, digits, '_')"
                    ),
                ));
            }
            if k.starts_with("NOA_") {
                return Err(Error::invalid(
                    "env",
                    format!("{k:?}: NOA_* variables are set by the kernel"),
                ));
            }
        }
        for (k, secret) in &self.secrets {
            if self.env.contains_key(k) {
                return Err(Error::invalid(
                    "secrets",
                    format!("{k:?} is set both as a plain variable and from a secret"),
                ));
            }
            let ok = !secret.is_empty()
                && secret.len() <= 128
                && secret
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !ok {
                return Err(Error::invalid(
                    "secrets",
                    format!(
                        "{secret:?} is not a secret name (1 to 128 of letters, digits, '_', '.', '-')"
                    ),
                ));
            }
        }
        if let Some(parent) = &self.parent {
            validate_name(parent).map_err(|e| Error::invalid("parent", e.to_string()))?;
            if parent == &self.name {
                return Err(Error::invalid(
                    "parent",
                    "a process cannot be its own parent",
                ));
            }
        }
        match self.kind {
            ProcessKind::Native => {
                let native = self.native.as_ref().ok_or_else(|| {
                    Error::invalid("native", "a native process needs a command to run")
                })?;
                if native.command.trim().is_empty() {
                    return Err(Error::invalid("native.command", "the command is empty"));
                }
                if native.command.contains('\0') || native.args.iter().any(|a| a.contains('\0')) {
                    return Err(Error::invalid(
                        "native.command",
                        "the command line contains a NUL byte",
                    ));
                }
                if self.builtin.is_some() || self.supervisor.is_some() {
                    return Err(Error::invalid(
                        "kind",
                        "a native process has no builtin or supervisor section",
                    ));
                }
            }
            ProcessKind::Builtin => {
                let builtin = self.builtin.as_deref().ok_or_else(|| {
                    Error::invalid("builtin", "a builtin process needs the name of a built-in")
                })?;
                if self.native.is_some() {
                    return Err(Error::invalid(
                        "kind",
                        "a builtin process has no native section",
                    ));
                }
                if self.supervisor.is_some() && builtin != "supervisor" {
                    return Err(Error::invalid(
                        "supervisor",
                        "only the `supervisor` built-in takes a supervisor section",
                    ));
                }
            }
        }
        if let Some(sup) = &self.supervisor {
            if sup.within_ms == 0 {
                return Err(Error::invalid(
                    "supervisor.within_ms",
                    "the intensity window must be longer than 0 ms",
                ));
            }
            if sup.backoff_max_ms < sup.backoff_ms {
                return Err(Error::invalid(
                    "supervisor.backoff_max_ms",
                    "must be at least backoff_ms",
                ));
            }
        }
        for key in self.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(Error::invalid(
                    format!("env.{key}"),
                    "an environment variable name must be non-empty without '=' or NUL",
                ));
            }
        }
        if self.env.values().any(|v| v.contains('\0')) {
            return Err(Error::invalid(
                "env",
                "an environment value contains a NUL byte",
            ));
        }
        if self.limits.mailbox == Some(0) {
            return Err(Error::invalid(
                "limits.mailbox",
                "the mailbox must hold at least 1 message",
            ));
        }
        if self.limits.cpu_seconds == Some(0) {
            return Err(Error::invalid(
                "limits.cpu_seconds",
                "must be at least 1 second",
            ));
        }
        Ok(())
    }
}

/// Parses `250ms`, `5s`, `2m`, `1h` or a bare number of milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let bad = || {
        Error::invalid(
            "duration",
            format!("{s:?} is not a duration; write e.g. 250ms, 5s, 2m or 1h"),
        )
    };
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let ms = match unit {
        "" | "ms" => n,
        "s" => n.checked_mul(1000).ok_or_else(bad)?,
        "m" => n.checked_mul(60_000).ok_or_else(bad)?,
        "h" => n.checked_mul(3_600_000).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_policy_errors_name_the_value() {
        let err = "forever".parse::<RestartPolicy>().unwrap_err().to_string();
        assert_eq!(
            err,
            "NOA-E0100 invalid restart: unknown restart policy \"forever\"; expected permanent, transient or temporary"
        );
        assert_eq!(
            "one_for_all".parse::<Strategy>().unwrap(),
            Strategy::OneForAll
        );
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let sup = SupervisorSpec {
            backoff_ms: 100,
            backoff_max_ms: 350,
            ..Default::default()
        };
        assert_eq!(sup.backoff(1), Duration::from_millis(100));
        assert_eq!(sup.backoff(2), Duration::from_millis(200));
        assert_eq!(sup.backoff(3), Duration::from_millis(350));
        assert_eq!(sup.backoff(60), Duration::from_millis(350));
    }

    #[test]
    fn spec_validation() {
        assert!(ProcessSpec::native("a", "python3", &[]).validate().is_ok());
        let err = ProcessSpec::native("a", " ", &[])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("native.command"), "{err}");
        let mut s = ProcessSpec::native("a", "x", &[]);
        s.parent = Some("a".into());
        assert!(s.validate().unwrap_err().to_string().contains("own parent"));
        let bad: Result<ProcessSpec, _> =
            serde_json::from_str(r#"{"name":"a","kind":"native","bogus":1}"#);
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("unknown field `bogus`")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("40").unwrap(), Duration::from_millis(40));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
    }

    proptest::proptest! {
        #[test]
        fn durations_never_panic(s in ".*") { let _ = parse_duration(&s); }

        #[test]
        fn spec_json_never_panics(s in ".*") {
            if let Ok(spec) = serde_json::from_str::<ProcessSpec>(&s) { let _ = spec.validate(); }
        }
    }
}
