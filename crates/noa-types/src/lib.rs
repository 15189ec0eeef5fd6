//! Shared domain types of NOA ARK OS: process names, specs, states and lifecycle events.
//!
//! These types are stored (the journal, the process registry) and sent (the API), so they derive
//! `Serialize`. Everything that parses user input here validates it and says what is wrong and where.

mod error;
mod spec;

pub use error::{Error, Result};
pub use spec::{
    Limits, NativeSpec, ProcessKind, ProcessSpec, RestartPolicy, Strategy, SupervisorSpec,
    parse_duration,
};

use serde::{Deserialize, Serialize};
use std::fmt;

/// A process id inside NOA (not an OS pid). Pid 1 is the root supervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Pid(pub u64);

impl Pid {
    /// The root supervisor, parent of every process that names no other parent.
    pub const ROOT: Pid = Pid(1);
}

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Checks a secret name: 1 to 128 letters, digits, `_`, `.` or `-`. The error says what is wrong.
pub fn check_secret_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() || name.len() > 128 {
        return Err("must be 1 to 128 characters");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err("may hold only letters, digits, '_', '.' and '-'");
    }
    Ok(())
}

/// The longest process name accepted.
pub const MAX_NAME_LEN: usize = 64;

/// Checks a process name: 1 to 64 characters of `[A-Za-z0-9_-]`, so that it is a single bus subject token.
pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid("name", "a process name must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(
            "name",
            format!(
                "process name is {} bytes long; the limit is {MAX_NAME_LEN}",
                name.len()
            ),
        ));
    }
    if let Some((i, c)) = name
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(Error::invalid(
            "name",
            format!(
                "process name {name:?} has {c:?} at byte {i}; use only letters, digits, '_' and '-'"
            ),
        ));
    }
    Ok(())
}

/// The lifecycle state of a process.
///
/// `starting → running ⇄ waiting → stopping → exited | failed`; a restart goes back to `starting`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessState {
    Starting,
    Running,
    Waiting,
    Stopping,
    Exited,
    Failed,
}

impl ProcessState {
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessState::Starting => "starting",
            ProcessState::Running => "running",
            ProcessState::Waiting => "waiting",
            ProcessState::Stopping => "stopping",
            ProcessState::Exited => "exited",
            ProcessState::Failed => "failed",
        }
    }

    /// Whether the process has ended (and may be replaced by a new spawn of the same name).
    pub fn is_terminal(self) -> bool {
        matches!(self, ProcessState::Exited | ProcessState::Failed)
    }
}

impl fmt::Display for ProcessState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a process ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExitReason {
    /// It exited by itself with this code (0 is normal).
    Code { code: i32 },
    /// An OS signal ended it.
    Signal { signal: i32, name: String },
    /// The kernel stopped it on request.
    Stopped,
    /// It could not be started, or it broke the rules (protocol violations, limits).
    Error { message: String },
}

impl ExitReason {
    /// Normal exits do not restart `transient` processes.
    pub fn is_normal(&self) -> bool {
        matches!(self, ExitReason::Code { code: 0 } | ExitReason::Stopped)
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Code { code } => write!(f, "exit code {code}"),
            ExitReason::Signal { signal, name } => write!(f, "killed by signal {signal} ({name})"),
            ExitReason::Stopped => f.write_str("stopped"),
            ExitReason::Error { message } => f.write_str(message),
        }
    }
}

/// A lifecycle event, as journaled in the store and published on `sys.events.<pid>.<event>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the journal (0 until it is stored).
    #[serde(default)]
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
    pub pid: Pid,
    pub name: String,
    /// What happened: a state name (`starting`, `running`, …) or `restarting`, `denied`, `escalated`, `violation`.
    pub event: String,
    /// Free-form details (exit reason, restart count, denied action).
    #[serde(default)]
    pub detail: serde_json::Value,
}

impl Event {
    pub fn new(pid: Pid, name: &str, event: &str, detail: serde_json::Value) -> Self {
        Event {
            seq: 0,
            ts_ms: now_ms(),
            pid,
            name: name.to_owned(),
            event: event.to_owned(),
            detail,
        }
    }

    /// The bus subject this event is published on.
    pub fn subject(&self) -> String {
        format!("sys.events.{}.{}", self.pid, self.event)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("echo-1_a").is_ok());
        let err = validate_name("a.b").unwrap_err().to_string();
        assert!(err.contains("'.' at byte 1"), "{err}");
        assert!(validate_name("").is_err());
        assert!(
            validate_name(&"x".repeat(65))
                .unwrap_err()
                .to_string()
                .contains("limit is 64")
        );
    }

    proptest::proptest! {
        #[test]
        fn name_validation_never_panics(s in ".*") {
            let ok = validate_name(&s).is_ok();
            let expected = !s.is_empty() && s.len() <= MAX_NAME_LEN
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            proptest::prop_assert_eq!(ok, expected);
        }
    }
}
