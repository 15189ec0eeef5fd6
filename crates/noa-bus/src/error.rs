//! Errors of the bus: bad subjects, no responders, timeouts.

use std::time::Duration;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    #[error("NOA-E0200 invalid subject {subject:?}: {reason}")]
    InvalidSubject { subject: String, reason: String },
    #[error("NOA-E0201 no responders for request on {subject:?}: nothing is subscribed to it")]
    NoResponders { subject: String },
    #[error("NOA-E0202 request on {subject:?} timed out after {} ms with no reply", timeout.as_millis())]
    Timeout { subject: String, timeout: Duration },
    #[error("NOA-E0203 the bus is shut down")]
    Closed,
    #[error("NOA-E0204 invalid header {name:?}: {reason}")]
    InvalidHeader { name: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
