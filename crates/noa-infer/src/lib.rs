//! Local inference for NOA ARK OS: llama.cpp compiled in (through `llama-cpp-2`), the model store and its
//! catalog of registry-packaged models, and the engine that loads, serves and unloads models.
//!
//! **Invariant:** all FFI stays in this crate (inside `llama-cpp-2`); callers see [`Engine`], [`ModelStore`]
//! and plain Rust types.

pub mod convert;
pub mod engine;
mod error;
mod ffi;
pub mod gguf;
pub mod grammar;
pub mod models;
pub mod remote;
pub mod template;

pub use engine::{
    ChatMessage, Embeddings, Engine, EngineOptions, Event, GenerateParams, LoadedInfo,
    TemplateTools, Usage, backend,
};
pub use error::{Error, Result};
pub use ffi::{PooledContext, ThreadPool};
pub use models::{CATALOG, ModelInfo, ModelStore};
pub use remote::{KeySource, RemoteModel, Reply};

#[cfg(test)]
mod tests;
