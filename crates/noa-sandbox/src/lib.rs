//! Process isolation of NOA ARK OS.
//!
//! Now: the native runtime ([`NativeRuntime`]), which runs an OS child process in any language under rlimits,
//! in its own process group, with a cleared environment, and speaks agent protocol v0 with it over stdio
//! ([`protocol`]). WASM components and landlock/seccomp confinement come here later.
//!
//! **Invariant:** the only `unsafe` code of the crate is in `os.rs`, each block with a `// SAFETY:` comment.

pub mod command;
mod error;
pub mod lines;
mod native;
mod os;
pub mod protocol;

pub use error::{Error, Result};
pub use native::{NativeOptions, NativeRuntime, resolve};
pub use os::{ChildLimits, restore_default_sigpipe};
