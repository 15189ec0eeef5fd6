//! One-shot commands: a shell command run to completion as a sandboxed child process (workflow `run` steps).
//!
//! The child gets a cleared environment plus what the caller grants, its own process group (killed as a whole
//! when the command exits, so nothing it started in the background outlives it, and when it times out or is
//! cancelled), rlimits, and death with the daemon. Its stdout is collected
//! up to a limit (a command that prints more fails rather than filling memory); its stderr is kept as a log,
//! the last `log_limit` bytes of it.

use crate::os::{self, ChildLimits};
use std::path::PathBuf;
use std::process::Stdio;
use tokio::io::AsyncReadExt;

/// What to run.
#[derive(Clone, Debug)]
pub struct CommandSpec {
    /// Given to `sh -c`.
    pub script: String,
    /// The whole environment of the child (it inherits nothing).
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub limits: ChildLimits,
    /// Most bytes of stdout kept; more fails the command.
    pub output_limit: usize,
    /// Most bytes of stderr kept (the last ones).
    pub log_limit: usize,
}

/// How a command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32, &'static str),
}

#[derive(Debug)]
pub struct CommandOutput {
    pub exit: Exit,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The stderr kept is the tail of a longer log.
    pub stderr_truncated: bool,
}

/// Why a command could not finish.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot start `sh`: {0}")]
    Start(std::io::Error),
    #[error("the command printed more than {limit} bytes to stdout; it was stopped")]
    OutputTooLarge { limit: usize, stderr: Vec<u8> },
    #[error("reading the command's output failed: {0}")]
    Io(std::io::Error),
}

/// Kills the whole process group when dropped: on timeout or cancellation the caller drops the future.
struct GroupGuard(u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        os::kill_group(self.0, libc::SIGKILL);
    }
}

/// Words of the shell itself: a command that starts with one of them always goes through `sh`.
const SHELL_WORDS: &[&str] = &[
    ".", ":", "alias", "bg", "break", "case", "cd", "command", "continue", "do", "done", "elif",
    "else", "esac", "eval", "exec", "exit", "export", "fc", "fg", "fi", "for", "getopts", "hash",
    "if", "in", "jobs", "kill", "local", "read", "readonly", "return", "set", "shift", "source",
    "test", "then", "times", "trap", "type", "ulimit", "umask", "unalias", "unset", "until",
    "wait", "while",
];

/// The program and arguments of a script that the shell would run as one plain command (words of letters, digits
/// and `_ . / , : = + @ % -`, no quoting, expansion, redirection or control operator), found on the child's `PATH`.
/// Running it directly saves starting a shell; the result is the same.
fn direct_argv(script: &str, env: &[(String, String)]) -> Option<(PathBuf, Vec<String>)> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./,:=+@%-".contains(c);
    let words: Vec<&str> = script
        .split([' ', '\t'])
        .filter(|w| !w.is_empty())
        .collect();
    let first = *words.first()?;
    if !script.chars().all(|c| plain(c) || c == ' ' || c == '\t')
        || first.contains('=')
        || SHELL_WORDS.contains(&first)
    {
        return None;
    }
    let program = if first.contains('/') {
        PathBuf::from(first)
    } else {
        let path = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())?;
        path.split(':')
            .map(|dir| std::path::Path::new(dir).join(first))
            .find(|p| p.is_file())?
    };
    Some((
        program,
        words[1..].iter().map(|w| (*w).to_owned()).collect(),
    ))
}

/// Runs `spec` to completion.
pub async fn run(spec: CommandSpec) -> Result<CommandOutput, CommandError> {
    let mut cmd = match direct_argv(&spec.script, &spec.env) {
        Some((program, args)) => {
            let mut c = tokio::process::Command::new(program);
            c.args(args);
            c
        }
        None => {
            let mut c = tokio::process::Command::new("/bin/sh");
            c.arg("-c").arg(&spec.script);
            c
        }
    };
    cmd.env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    os::apply_in_child(&mut cmd, spec.limits);
    let mut child = cmd.spawn().map_err(CommandError::Start)?;
    let _guard = GroupGuard(child.id().unwrap_or(0));
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| CommandError::Io(std::io::Error::other("the child has no stdout")))?;
    let mut stderr = child
        .stderr
        .take()
        .ok_or_else(|| CommandError::Io(std::io::Error::other("the child has no stderr")))?;
    let log_limit = spec.log_limit;
    let log = tokio::spawn(async move {
        let mut kept: Vec<u8> = Vec::new();
        let mut truncated = false;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match stderr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    kept.extend_from_slice(&buf[..n]);
                    if kept.len() > log_limit * 2 {
                        let cut = kept.len() - log_limit;
                        kept.drain(..cut);
                        truncated = true;
                    }
                }
            }
        }
        if kept.len() > log_limit {
            let cut = kept.len() - log_limit;
            kept.drain(..cut);
            truncated = true;
        }
        (kept, truncated)
    });
    let pgid = child.id().unwrap_or(0);
    let limit = spec.output_limit;
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdout.read(&mut buf).await {
                Ok(0) => return Ok(out),
                Ok(n) if out.len() + n > limit => {
                    os::kill_group(pgid, libc::SIGKILL);
                    return Err(None);
                }
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => return Err(Some(e)),
            }
        }
    });
    let status = child.wait().await.map_err(CommandError::Io)?;
    // The command has ended: what it left running in the background ends with it, so the pipes close.
    os::kill_group(pgid, libc::SIGKILL);
    let out = match reader.await {
        Ok(Ok(out)) => out,
        Ok(Err(None)) => {
            let (stderr, _) = log.await.unwrap_or_default();
            return Err(CommandError::OutputTooLarge {
                limit: spec.output_limit,
                stderr,
            });
        }
        Ok(Err(Some(e))) => return Err(CommandError::Io(e)),
        Err(e) => return Err(CommandError::Io(std::io::Error::other(e.to_string()))),
    };
    let (stderr, stderr_truncated) = log.await.unwrap_or_default();
    use std::os::unix::process::ExitStatusExt;
    let exit = match (status.code(), status.signal()) {
        (Some(c), _) => Exit::Code(c),
        (None, Some(s)) => Exit::Signal(s, os::signal_name(s)),
        (None, None) => Exit::Code(-1),
    };
    Ok(CommandOutput {
        exit,
        stdout: out,
        stderr,
        stderr_truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(script: &str) -> CommandSpec {
        CommandSpec {
            script: script.into(),
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("X".into(), "1".into()),
            ],
            cwd: std::env::temp_dir(),
            limits: ChildLimits::default(),
            output_limit: 1024,
            log_limit: 64,
        }
    }

    #[test]
    fn plain_commands_skip_the_shell() {
        let env = vec![("PATH".to_owned(), "/usr/bin:/bin".to_owned())];
        let (p, args) = direct_argv("true", &env).unwrap();
        assert!(p.ends_with("true"));
        assert!(args.is_empty());
        let (p, args) = direct_argv("/bin/echo a-b  c=d", &env).unwrap();
        assert_eq!(
            (p, args),
            (
                PathBuf::from("/bin/echo"),
                vec!["a-b".to_owned(), "c=d".to_owned()]
            )
        );
        for script in [
            "echo $HOME",
            "echo 'x'",
            "a | b",
            "cd /tmp",
            "X=1 env",
            "ls *",
            "echo hi > f",
            "sleep 1; echo",
            "",
            "no-such-program-anywhere",
        ] {
            assert!(direct_argv(script, &env).is_none(), "{script:?}");
        }
    }

    #[tokio::test]
    async fn output_exit_and_environment() {
        let o = run(spec("echo out; echo err >&2; echo $X $HOME; exit 3"))
            .await
            .unwrap();
        assert_eq!(o.exit, Exit::Code(3));
        assert_eq!(o.stdout, b"out\n1\n");
        assert_eq!(o.stderr, b"err\n");
    }

    #[tokio::test]
    async fn too_much_output_fails_and_the_log_keeps_its_tail() {
        let e = run(spec("yes | head -c 100000")).await.unwrap_err();
        assert!(
            matches!(e, CommandError::OutputTooLarge { limit: 1024, .. }),
            "{e}"
        );
        let o = run(spec("for i in $(seq 1 100); do echo line$i >&2; done"))
            .await
            .unwrap();
        assert!(o.stderr_truncated);
        assert!(o.stderr.ends_with(b"line100\n"));
        assert!(o.stderr.len() <= 64);
    }

    #[tokio::test]
    async fn background_processes_end_with_the_command() {
        let t = std::time::Instant::now();
        let o = run(spec("sleep 30 & echo started")).await.unwrap();
        assert_eq!(o.stdout, b"started\n");
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_dropped_command_kills_its_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("pid");
        let script = format!("sleep 30 & echo $! > {}; wait", marker.display());
        let fut = run(spec(&script));
        let _ = tokio::time::timeout(std::time::Duration::from_millis(500), fut).await;
        let pid: i32 = std::fs::read_to_string(&marker)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild is gone (or a zombie about to be reaped by init).
        std::thread::sleep(std::time::Duration::from_millis(100));
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z"),
            "still running: {stat}"
        );
    }
}
