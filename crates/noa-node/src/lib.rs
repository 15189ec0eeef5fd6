//! Wires the NOA services together from options and runs them until shutdown.
//!
//! `Node::start` prepares the data directory (lock, admin token), opens the store, loads the policy,
//! builds the bus and the kernel with its runtimes, binds the listener and restores the registry.
//! `Node::run` serves until the shutdown future resolves, then stops every process in reverse start order
//! and flushes the store. Nothing below this crate knows it exists.

pub mod ai;
pub mod config;
mod error;

pub use config::Config;
pub use error::{Error, Result};
/// The model store and catalog, for `noa model pull|add|list|show|rm` without a daemon.
pub use noa_infer as infer;
/// The store, for commands that work on a data directory without a daemon (backup verify/restore, rekey).
pub use noa_sandbox::restore_default_sigpipe;
pub use noa_store as store;
/// Workflows, for the CLI (validation happens before a file is sent).
pub use noa_workflow as workflow;

use noa_bus::Bus;
use noa_kernel::{BuiltinRuntime, Kernel, KernelOptions};
use noa_policy::Policy;
use noa_sandbox::{NativeOptions, NativeRuntime};
use noa_server::{AppState, ServerOptions};
use noa_store::Store;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// The default address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

/// Node settings.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub data_dir: PathBuf,
    /// The effective configuration (see [`config`]).
    pub config: Config,
    /// The passphrase that unlocks the store, when `store.key = "passphrase"`.
    pub passphrase: Option<String>,
}

impl NodeOptions {
    /// Defaults for `data_dir`, listening on `listen`.
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> NodeOptions {
        let flags = [(
            "server.listen".to_owned(),
            listen.to_string(),
            "--listen".to_owned(),
        )];
        let config =
            Config::load(&data_dir, &|_| None, &flags).unwrap_or_else(|_| Config::defaults());
        NodeOptions {
            data_dir,
            config,
            passphrase: None,
        }
    }
}

/// How the store of a data directory is opened under a configuration.
pub fn store_options(
    data_dir: &Path,
    config: &Config,
    passphrase: Option<String>,
) -> Result<noa_store::StoreOptions> {
    let mut o = noa_store::StoreOptions::for_dir(data_dir);
    if config.uses_passphrase() {
        let p = passphrase
            .filter(|p| !p.is_empty())
            .ok_or_else(|| Error::Config {
                place: "store.key".into(),
                key: "store.key".into(),
                message: "is \"passphrase\" but no passphrase was given: set NOA_PASSPHRASE".into(),
            })?;
        o.key = noa_store::KeySource::Passphrase(p);
    }
    o.checkpoint_every = config.count("audit.checkpoint_every");
    o.quotas = noa_store::Quotas {
        agent: config.bytes("fs.quota_agent"),
        run: config.bytes("fs.quota_run"),
        shared: config.bytes("fs.quota_shared"),
    };
    Ok(o)
}

/// The data directory when none is given: `$NOA_DATA_DIR`, else `$XDG_DATA_HOME/noa`, else `~/.local/share/noa`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("NOA_DATA_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("noa");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/noa")
}

/// The model store of a data directory.
pub fn models_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("models")
}

/// The admin token's file in a data directory.
pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.token")
}

/// The file where a running node writes its listen address, so the CLI finds it.
pub fn addr_path(data_dir: &Path) -> PathBuf {
    data_dir.join("noa.addr")
}

fn dir_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::DataDir {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Reads the admin token, creating it (32 random bytes, hex, mode 0600) on first start.
fn ensure_token(data_dir: &Path) -> Result<String> {
    let path = token_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(dir_err(&path, e)),
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| dir_err(&path, format!("no randomness for the admin token: {e}")))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = path.with_extension("token.tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| dir_err(&tmp, e))?;
    f.write_all(token.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| dir_err(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| dir_err(&path, e))?;
    Ok(token)
}

/// Audits a change of the effective configuration since the last start (and records it for the next).
async fn record_config(store: &Store, config: &Config) -> Result<()> {
    let now = config.to_json();
    let before = store
        .meta("config")?
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    if before.as_ref() == Some(&now) {
        return Ok(());
    }
    let changed: serde_json::Map<String, serde_json::Value> = now
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| before.as_ref().and_then(|b| b.get(k.as_str())) != Some(*v))
        .map(|(k, v)| {
            let old = before
                .as_ref()
                .and_then(|b| b.get(k.as_str()))
                .cloned()
                .unwrap_or(serde_json::Value::Null);
            (k.clone(), serde_json::json!({"from": old, "to": v}))
        })
        .collect();
    store
        .set_meta(
            "config",
            &now.to_string(),
            Some(noa_store::AuditRecord::new(
                "node",
                if before.is_none() {
                    "config.init"
                } else {
                    "config.change"
                },
                "noa.toml",
                "ok",
                serde_json::Value::Object(changed),
            )),
        )
        .await?;
    Ok(())
}

/// A started node: listening, with its registry restored.
pub struct Node {
    kernel: Kernel,
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown_tx: watch::Sender<bool>,
    data_dir: PathBuf,
    _lock: File,
    started: Instant,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl Node {
    pub async fn start(opts: NodeOptions) -> Result<Node> {
        let started = Instant::now();
        let dir = &opts.data_dir;
        std::fs::create_dir_all(dir).map_err(|e| dir_err(dir, e))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("noa.lock"))
            .map_err(|e| dir_err(dir, e))?;
        if lock.try_lock().is_err() {
            return Err(Error::Locked { path: dir.clone() });
        }
        let token = ensure_token(dir)?;
        let config = &opts.config;
        let store = Store::open_with(
            &dir.join("noa.db"),
            store_options(dir, config, opts.passphrase.clone())?,
        )?;
        record_config(&store, config).await?;
        let policy = Policy::load(dir)?;
        let bus = Bus::local();
        let mut kernel_opts = KernelOptions::new(dir.join("logs"));
        kernel_opts.log_max_bytes = config.bytes("kernel.log_max_bytes").max(4096);
        let kernel = Kernel::new(
            kernel_opts,
            bus,
            store,
            policy,
            vec![
                Arc::new(BuiltinRuntime),
                Arc::new(NativeRuntime::new(NativeOptions::default())),
            ],
        );
        let listen = config.listen();
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| Error::Listen {
                addr: listen.to_string(),
                message: e.to_string(),
            })?;
        let local = listener.local_addr().map_err(|e| Error::Listen {
            addr: listen.to_string(),
            message: e.to_string(),
        })?;
        std::fs::write(addr_path(dir), local.to_string()).map_err(|e| dir_err(dir, e))?;
        let engine = noa_infer::Engine::new(
            noa_infer::ModelStore::new(&models_dir(dir)),
            noa_infer::EngineOptions {
                context: config.count("infer.context") as u32,
                threads: config.count("infer.threads") as u32,
                keep_alive: config.duration("infer.keep_alive"),
                max_loaded: config.count("infer.max_loaded") as usize,
                memory_budget: config.bytes("infer.memory_budget"),
                parallel: config.count("infer.parallel") as u32,
            },
        );
        engine.set_key_source(ai::key_source(kernel.store().clone()));
        ai::serve(kernel.bus().clone(), engine.clone()).map_err(|e| Error::DataDir {
            path: dir.clone(),
            message: format!("cannot serve {}: {e}", ai::SUBJECT),
        })?;
        ai::serve_embeddings(kernel.bus().clone(), engine.clone()).map_err(|e| Error::DataDir {
            path: dir.clone(),
            message: format!("cannot serve {}: {e}", ai::EMBED_SUBJECT),
        })?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let workflows = noa_workflow::WorkflowEngine::new(
            kernel.clone(),
            noa_workflow::EngineOptions {
                max_concurrent_steps: config.count("workflow.max_concurrent_steps") as usize,
                output_limit: config.bytes("workflow.max_output").max(1024) as usize,
                ..noa_workflow::EngineOptions::new(dir.join("work"))
            },
            shutdown_rx.clone(),
        );
        let state = AppState::new(
            kernel.clone(),
            &token,
            ServerOptions {
                data_dir: dir.display().to_string(),
                config: config
                    .entries()
                    .into_iter()
                    .map(|e| noa_server::ConfigEntry {
                        key: e.key.to_owned(),
                        value: e.value,
                        source: e.source.to_string(),
                    })
                    .collect(),
                ..Default::default()
            },
            local,
            shutdown_rx,
        )
        .with_engine(engine)
        .with_workflows(workflows.clone());
        let restored = kernel.restore().await?;
        if restored > 0 {
            tracing::info!(restored, "Restarted permanent processes from the registry.");
        }
        // Unfinished runs resume once everything their steps may call (processes, models) is up.
        workflows
            .start_service()
            .await
            .map_err(|e| Error::DataDir {
                path: dir.clone(),
                message: format!("cannot resume workflow runs: {e}"),
            })?;
        Ok(Node {
            kernel,
            listener,
            state,
            shutdown_tx,
            data_dir: dir.clone(),
            _lock: lock,
            started,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Time from `start` being called until now.
    pub fn startup_time(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Serves until `shutdown` resolves; then stops every process (reverse start order) and flushes the store.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let Node {
            kernel,
            listener,
            state,
            shutdown_tx,
            data_dir,
            _lock,
            ..
        } = self;
        let (stop_server_tx, stop_server_rx) = tokio::sync::oneshot::channel::<()>();
        let app = noa_server::router(state);
        let server = tokio::spawn(noa_server::serve(listener, app, async move {
            let _ = stop_server_rx.await;
        }));
        shutdown.await;
        tracing::info!("Shutting down: stopping processes in reverse start order.");
        let _ = shutdown_tx.send(true);
        kernel.shutdown().await;
        let _ = stop_server_tx.send(());
        // Open requests get a few seconds to finish; a client that stopped reading must not hold shutdown up.
        let abort = server.abort_handle();
        match tokio::time::timeout(std::time::Duration::from_secs(5), server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(Error::Serve(e)),
            Ok(Err(e)) => tracing::error!(error = %e, "The server task ended abnormally."),
            Err(_) => {
                tracing::warn!("Connections still open after 5 s; closing them.");
                abort.abort();
            }
        }
        let _ = std::fs::remove_file(addr_path(&data_dir));
        tracing::info!("Stopped.");
        Ok(())
    }
}
