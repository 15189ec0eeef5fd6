//! Messages: a subject, an optional reply subject, optional headers and a byte payload.

use crate::{Error, Result, Subject};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Message headers (NATS-style, one value per name).
pub type Headers = BTreeMap<String, String>;

/// A message on the bus. Cloning is cheap: the payload and headers are shared.
#[derive(Clone, Debug)]
pub struct Message {
    pub subject: Subject,
    /// Where a reply goes, for requests.
    pub reply: Option<Subject>,
    pub headers: Option<Arc<Headers>>,
    pub payload: Bytes,
}

impl Message {
    pub fn new(subject: Subject, payload: impl Into<Bytes>) -> Self {
        Message {
            subject,
            reply: None,
            headers: None,
            payload: payload.into(),
        }
    }

    /// Attaches headers, checking that names and values are single-line tokens.
    pub fn with_headers(mut self, headers: Headers) -> Result<Self> {
        for (name, value) in &headers {
            if name.is_empty()
                || name
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == ':')
            {
                return Err(Error::InvalidHeader {
                    name: name.clone(),
                    reason:
                        "a header name must be non-empty, without spaces, control characters or ':'"
                            .into(),
                });
            }
            if value.chars().any(|c| c == '\r' || c == '\n') {
                return Err(Error::InvalidHeader {
                    name: name.clone(),
                    reason: "a header value must be a single line".into(),
                });
            }
        }
        self.headers = if headers.is_empty() {
            None
        } else {
            Some(Arc::new(headers))
        };
        Ok(self)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.as_ref()?.get(name).map(String::as_str)
    }
}

/// The id of one subscription, unique within a bus.
pub type SubId = u64;

/// A message as delivered to one subscription.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub sid: SubId,
    pub msg: Message,
}
