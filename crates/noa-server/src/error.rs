//! The one place where errors become HTTP responses: a status code and `{"error":{"code","message"}}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error as a client sees it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// Puts `prefix` (where in the request) after the error's code.
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.message = match self.message.split_once(' ') {
            Some((c, m)) if c.starts_with("NOA-E") => format!("{c} {prefix}{m}"),
            _ => format!("{prefix}{}", self.message),
        };
        self
    }
}

impl From<noa_store::Error> for ApiError {
    fn from(e: noa_store::Error) -> Self {
        use noa_store::Error as S;
        let status = match &e {
            S::Path { .. } | S::SecretName { .. } => StatusCode::BAD_REQUEST,
            S::NotFound { .. } | S::NoSecret { .. } | S::NoMount { .. } | S::NoVersion { .. } => {
                StatusCode::NOT_FOUND
            }
            S::Quota { .. } => StatusCode::INSUFFICIENT_STORAGE,
            S::ReadOnly { .. } => StatusCode::FORBIDDEN,
            S::Host { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            S::WriterGone => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "A store operation failed inside the node.");
        }
        ApiError::new(status, e.to_string())
    }
}

impl From<noa_kernel::Error> for ApiError {
    fn from(e: noa_kernel::Error) -> Self {
        use noa_kernel::Error as K;
        let status = match &e {
            K::Invalid(_) => StatusCode::BAD_REQUEST,
            K::Policy(noa_policy::Error::Denied { .. }) => StatusCode::FORBIDDEN,
            K::Policy(_) => StatusCode::INTERNAL_SERVER_ERROR,
            K::Bus(
                noa_bus::Error::InvalidSubject { .. } | noa_bus::Error::InvalidHeader { .. },
            ) => StatusCode::BAD_REQUEST,
            K::Bus(noa_bus::Error::NoResponders { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            K::Bus(noa_bus::Error::Timeout { .. }) => StatusCode::GATEWAY_TIMEOUT,
            K::Bus(noa_bus::Error::Closed) | K::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            K::NotFound { .. } => StatusCode::NOT_FOUND,
            K::Interrupted { .. } => StatusCode::CONFLICT,
            K::AlreadyExists { .. } => StatusCode::CONFLICT,
            K::NotASupervisor { .. } | K::SupervisorNotRunning { .. } | K::Protected { .. } => {
                StatusCode::CONFLICT
            }
            K::NoRuntime { .. } | K::Launch { .. } | K::NotYourSubscription { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            K::Store(_) => {
                if let K::Store(inner) = e {
                    return inner.into();
                }
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(error = %e, "A request failed inside the node.");
        }
        ApiError::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Messages carry a stable code first ("NOA-E0500 ..."); split it out for clients.
        let (code, message) = match self.message.split_once(' ') {
            Some((c, m)) if c.starts_with("NOA-E") => (c.to_owned(), m.to_owned()),
            _ => (
                format!("HTTP-{}", self.status.as_u16()),
                self.message.clone(),
            ),
        };
        (
            self.status,
            Json(json!({ "error": { "code": code, "message": message } })),
        )
            .into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
