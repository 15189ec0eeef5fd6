//! Errors of the shared types: invalid user input, naming the field that is wrong.

/// An invalid value in user input.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// `field` names where the bad value is (e.g. `restart`, `limits.memory`).
    #[error("NOA-E0100 invalid {field}: {message}")]
    Invalid { field: String, message: String },
}

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
