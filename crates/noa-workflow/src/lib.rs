//! Durable workflows of NOA ARK OS.
//!
//! A workflow is a YAML file (normative format: `docs/specs/workflow.md`): typed inputs, steps that form a DAG
//! through `needs` and run in parallel by default, `${{ }}` expressions, retries, timeouts, loops, approvals and
//! triggers. [`def`] parses and validates it with errors that name file, line and column; [`WorkflowEngine`]
//! runs it as an event-sourced history in the store, so that a run resumes after a crash without running a
//! finished step again.

pub mod def;
pub mod engine;
mod error;
pub mod expr;
pub mod state;
mod steps;
mod triggers;
pub mod yaml;

pub use def::{Diagnostic, Workflow, load_file};
pub use engine::{EngineOptions, Registration, RunSummary, RunView, StepView, WorkflowEngine};
pub use error::{Error, Result};

#[cfg(test)]
mod tests;
