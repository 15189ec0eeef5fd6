//! Errors of the kernel. Each names what was asked and what to do about it.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] noa_types::Error),
    #[error(transparent)]
    Policy(#[from] noa_policy::Error),
    #[error(transparent)]
    Bus(#[from] noa_bus::Error),
    #[error(transparent)]
    Store(#[from] noa_store::Error),
    #[error("NOA-E0500 no process named {name:?}; `noa ps` lists them")]
    NotFound { name: String },
    #[error(
        "NOA-E0501 a process named {name:?} is already {state} (pid {pid}); stop it first or pick another name"
    )]
    AlreadyExists {
        name: String,
        pid: u64,
        state: String,
    },
    #[error(
        "NOA-E0502 {name:?} is not a supervisor, so it cannot be a parent; spawn one with `noa spawn --supervisor`"
    )]
    NotASupervisor { name: String },
    #[error(
        "NOA-E0503 supervisor {name:?} is {state}, not running; children can only be added to a running supervisor"
    )]
    SupervisorNotRunning { name: String, state: String },
    #[error("NOA-E0504 no runtime for {kind} processes is installed in this node")]
    NoRuntime { kind: String },
    #[error("NOA-E0505 cannot start {name:?}: {message}")]
    Launch { name: String, message: String },
    #[error("NOA-E0506 {name:?} is the root supervisor and cannot be {action}")]
    Protected { name: String, action: String },
    #[error("NOA-E0507 the kernel is shutting down")]
    ShuttingDown,
    #[error("NOA-E0509 {name:?} {what}; nothing was started")]
    Interrupted { name: String, what: String },
    #[error("NOA-E0508 subscription {sid} does not belong to this process")]
    NotYourSubscription { sid: u64 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
