//! The command line: every command, flag and example of `noa`.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the command failed (bad input, refused by the daemon, not found, denied)
  2  the command line itself is wrong (unknown flag, missing argument)
  3  the daemon could not be reached (start it with `noa up`)

Environment:
  NOA_ADDR      the daemon's address (default: from <data-dir>/noa.addr, else http://127.0.0.1:7070)
  NOA_DATA_DIR  the data directory (default: ~/.local/share/noa)
  NOA_TOKEN     the bearer token (default: <data-dir>/admin.token)
  NOA_LOG       log filter for `noa up` (default: info)";

/// NOA ARK OS: an operating system for AI agents, in one binary.
#[derive(Debug, Parser)]
#[command(name = "noa", version, about, long_about = None, after_help = EXIT_CODES, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// The daemon's address, e.g. http://127.0.0.1:7070.
    #[arg(long, global = true, env = "NOA_ADDR")]
    pub addr: Option<String>,
    /// The data directory (token, database, logs).
    #[arg(long, global = true, env = "NOA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The bearer token (default: read from <data-dir>/admin.token).
    #[arg(long, global = true, env = "NOA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of tables and text.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the daemon in the foreground (Ctrl-C or SIGTERM stops every process and exits).
    #[command(
        after_help = "Example:\n  noa up\n  noa up --listen 127.0.0.1:7171 --data-dir /tmp/noa"
    )]
    Up {
        /// Where to listen. Loopback by default; another address exposes the API (still behind the token).
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: String,
    },
    /// Show whether the kernel, store and server are healthy.
    #[command(after_help = "Example:\n  noa status\n  noa status --json")]
    Status,
    /// Start a process: a command in any language, a builtin, or a supervisor.
    #[command(
        after_help = "Examples:\n  noa spawn --name echo --restart permanent -- python3 examples/agents/echo.py\n  noa spawn --name team --supervisor --strategy one-for-all --max-restarts 3 --within 10s\n  noa spawn --name worker --parent team --memory 256M --cpu 60 -- ./worker\n  noa spawn --name e --builtin echo"
    )]
    Spawn(Box<SpawnArgs>),
    /// List processes as a tree.
    #[command(after_help = "Example:\n  noa ps\n  noa ps --json")]
    Ps,
    /// Stop a process (a supervisor's children first, in reverse start order); it is not restarted.
    #[command(after_help = "Example:\n  noa stop echo")]
    Stop { name: String },
    /// Kill a process at once (SIGKILL); its supervisor restarts it as after a crash.
    #[command(after_help = "Example:\n  noa kill echo")]
    Kill { name: String },
    /// Stop a process and start it again.
    #[command(after_help = "Example:\n  noa restart echo")]
    Restart { name: String },
    /// Show a process's log (its stderr and protocol log lines).
    #[command(after_help = "Example:\n  noa logs echo\n  noa logs echo -f\n  noa logs echo -n 500")]
    Logs {
        name: String,
        /// How many of the last lines to show.
        #[arg(short = 'n', long, default_value_t = 100)]
        tail: usize,
        /// Keep printing new lines as they are written.
        #[arg(short, long)]
        follow: bool,
    },
    /// Publish a message on a subject.
    #[command(
        name = "pub",
        after_help = "Example:\n  noa pub jobs.new '{\"id\":1}'\n  echo hello | noa pub greetings -"
    )]
    Pub(MessageArgs),
    /// Subscribe to a subject pattern (`*` one token, `>` the rest) and print messages as they arrive.
    #[command(
        after_help = "Example:\n  noa sub 'sys.events.>'\n  noa sub 'agent.*.inbox' --count 1"
    )]
    Sub {
        pattern: String,
        /// Exit after this many messages.
        #[arg(short = 'c', long)]
        count: Option<u64>,
    },
    /// Send a request and print the reply.
    #[command(
        after_help = "Example:\n  noa req agent.echo.inbox '{\"text\":\"hi\"}'\n  noa req agent.echo.inbox hello --timeout 2s"
    )]
    Req {
        #[command(flatten)]
        message: MessageArgs,
        /// How long to wait for the reply.
        #[arg(long, default_value = "5s")]
        timeout: String,
    },
    /// Show the journal of lifecycle events; with -f, follow live events.
    #[command(
        after_help = "Example:\n  noa events\n  noa events --name echo --limit 20\n  noa events -f"
    )]
    Events {
        /// Only events of this process name.
        #[arg(long)]
        name: Option<String>,
        /// How many of the newest events.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Keep printing events as they happen.
        #[arg(short, long)]
        follow: bool,
    },
    /// Print shell completions.
    #[command(
        after_help = "Example:\n  noa completions bash > /etc/bash_completion.d/noa\n  noa completions zsh > ~/.zfunc/_noa"
    )]
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Args)]
pub struct MessageArgs {
    /// The subject, e.g. agent.echo.inbox.
    pub subject: String,
    /// The payload: JSON is sent as JSON, anything else as text; `-` reads standard input.
    pub data: Option<String>,
    /// A header, as NAME=VALUE (repeatable).
    #[arg(short = 'H', long = "header")]
    pub headers: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SpawnArgs {
    /// The process name: letters, digits, '_' and '-'.
    #[arg(long)]
    pub name: String,
    /// permanent (always restarted), transient (restarted after a crash) or temporary (never).
    #[arg(long)]
    pub restart: Option<String>,
    /// The supervisor to run under (default: root).
    #[arg(long)]
    pub parent: Option<String>,
    /// An environment variable granted to the process, NAME=VALUE (repeatable); nothing else is inherited.
    #[arg(short, long = "env")]
    pub env: Vec<String>,
    /// Address-space limit, e.g. 512M or 2G.
    #[arg(long)]
    pub memory: Option<String>,
    /// CPU-time limit in seconds.
    #[arg(long)]
    pub cpu: Option<u64>,
    /// Open-file limit.
    #[arg(long)]
    pub files: Option<u64>,
    /// Mailbox size in messages.
    #[arg(long)]
    pub mailbox: Option<usize>,
    /// Grace period between a stop request and SIGKILL, e.g. 5s.
    #[arg(long)]
    pub grace: Option<String>,
    /// Subject pattern the process may also publish and request on (repeatable).
    #[arg(long)]
    pub publish: Vec<String>,
    /// Subject pattern the process may also subscribe to (repeatable).
    #[arg(long)]
    pub subscribe: Vec<String>,
    /// Working directory of the command (default: the current directory).
    #[arg(long)]
    pub cwd: Option<PathBuf>,
    /// Run a builtin instead of a command: echo.
    #[arg(long, conflicts_with = "supervisor")]
    pub builtin: Option<String>,
    /// Start a supervisor, which other processes can name with --parent.
    #[arg(long)]
    pub supervisor: bool,
    /// The supervisor's strategy: one-for-one, one-for-all or rest-for-one.
    #[arg(long, requires = "supervisor")]
    pub strategy: Option<String>,
    /// Restart intensity: at most this many restarts...
    #[arg(long, requires = "supervisor")]
    pub max_restarts: Option<u32>,
    /// ...within this window (e.g. 60s), or the supervisor gives up and escalates.
    #[arg(long, requires = "supervisor")]
    pub within: Option<String>,
    /// First restart delay, doubled per recent restart (e.g. 100ms).
    #[arg(long, requires = "supervisor")]
    pub backoff: Option<String>,
    /// Longest restart delay (e.g. 10s).
    #[arg(long, requires = "supervisor")]
    pub backoff_max: Option<String>,
    /// The command and its arguments, after `--`.
    #[arg(last = true)]
    pub command: Vec<String>,
}
