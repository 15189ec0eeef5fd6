//! The NOA message bus, with the semantics of NATS core.
//!
//! Subjects are dot-separated tokens; subscriptions may use `*` (one token) and `>` (one or more trailing tokens).
//! Publish/subscribe, request/reply with a timeout and an immediate "no responders" error, queue groups
//! (each message goes to one member of a group), and headers.
//!
//! **Overflow policy.** Every subscription has a bounded buffer. When it is full, a new message for that
//! subscription is dropped (NATS calls this a slow consumer): the publisher never blocks, other subscribers
//! still get the message, and the drop is counted on the subscription and in [`BusStats::dropped`].
//!
//! Callers hold a [`Bus`], a cheap handle over a [`Transport`]. The in-process transport is [`local::LocalTransport`];
//! a NATS transport implements the same trait, so callers do not change.

mod error;
pub mod json_payload;
pub mod local;
mod message;
mod subject;

pub use error::{Error, Result};
pub use message::{Delivery, Headers, Message, SubId};
pub use subject::{MAX_SUBJECT_LEN, Pattern, Subject, covers, matches};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// A boxed future, as returned by transports.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a subscription's messages go: a bounded channel, shared by several subscriptions when they feed one mailbox.
#[derive(Clone, Debug)]
pub struct Sink {
    tx: mpsc::Sender<Delivery>,
    dropped: Arc<AtomicU64>,
}

impl Sink {
    /// A sink and the receiver it feeds, holding at most `capacity` messages.
    pub fn channel(capacity: usize) -> (Sink, mpsc::Receiver<Delivery>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Sink {
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
            },
            rx,
        )
    }

    /// Offers a delivery without waiting. Returns false if it was dropped (buffer full or receiver gone).
    pub fn offer(&self, delivery: Delivery) -> bool {
        match self.tx.try_send(delivery) {
            Ok(()) => true,
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Offers a delivery without waiting or counting a drop; gives it back if the buffer is full or closed.
    pub fn try_offer(&self, delivery: Delivery) -> std::result::Result<(), Delivery> {
        self.tx.try_send(delivery).map_err(|e| match e {
            mpsc::error::TrySendError::Full(d) | mpsc::error::TrySendError::Closed(d) => d,
        })
    }

    pub(crate) fn count_drop(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Messages dropped because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Counters of a bus since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BusStats {
    pub published: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub subscriptions: u64,
}

/// A bus implementation. The in-process one lives in [`local`]; a NATS one slots in behind the same trait.
pub trait Transport: Send + Sync + 'static {
    /// Delivers `msg` to every matching subscription (one member per queue group). Returns how many got it.
    fn publish(&self, msg: Message) -> Result<usize>;
    /// Adds a subscription feeding `sink`.
    fn subscribe(&self, pattern: Pattern, queue: Option<&str>, sink: Sink) -> Result<SubId>;
    /// Removes a subscription; false if it did not exist.
    fn unsubscribe(&self, sid: SubId) -> bool;
    /// Publishes `msg` with a fresh reply subject and waits for the first reply.
    fn request(&self, msg: Message, timeout: Duration) -> BoxFuture<'static, Result<Message>>;
    fn stats(&self) -> BusStats;
}

/// The handle every other part of NOA uses to talk on the bus.
#[derive(Clone)]
pub struct Bus {
    transport: Arc<dyn Transport>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("stats", &self.stats()).finish()
    }
}

/// Default buffer of a subscription, in messages.
pub const DEFAULT_CAPACITY: usize = 65_536;

impl Bus {
    /// A bus over the in-process transport.
    pub fn local() -> Bus {
        Bus::new(Arc::new(local::LocalTransport::new()))
    }

    pub fn new(transport: Arc<dyn Transport>) -> Bus {
        Bus { transport }
    }

    pub fn publish(&self, msg: Message) -> Result<usize> {
        self.transport.publish(msg)
    }

    /// Publishes `payload` on `subject`, validating the subject.
    pub fn publish_bytes(&self, subject: &str, payload: impl Into<bytes::Bytes>) -> Result<usize> {
        self.publish(Message::new(Subject::new(subject)?, payload))
    }

    /// Subscribes with its own buffer of `capacity` messages.
    pub fn subscribe(
        &self,
        pattern: &str,
        queue: Option<&str>,
        capacity: usize,
    ) -> Result<Subscription> {
        let pattern = Pattern::new(pattern)?;
        let (sink, rx) = Sink::channel(capacity);
        let dropped = sink.dropped.clone();
        let sid = self.transport.subscribe(pattern.clone(), queue, sink)?;
        Ok(Subscription {
            sid,
            pattern,
            rx,
            dropped,
            bus: self.clone(),
        })
    }

    /// Subscribes into an existing sink (several subscriptions feeding one mailbox). The caller unsubscribes.
    pub fn subscribe_sink(&self, pattern: &str, queue: Option<&str>, sink: Sink) -> Result<SubId> {
        let pattern = Pattern::new(pattern)?;
        self.transport.subscribe(pattern, queue, sink)
    }

    pub fn unsubscribe(&self, sid: SubId) -> bool {
        self.transport.unsubscribe(sid)
    }

    /// Sends a request and waits up to `timeout` for the reply.
    /// Fails at once with [`Error::NoResponders`] when nothing is subscribed to the subject.
    pub async fn request(&self, msg: Message, timeout: Duration) -> Result<Message> {
        self.transport.request(msg, timeout).await
    }

    /// Answers a request: publishes `payload` to its reply subject. Returns false if it was not a request.
    pub fn respond(&self, request: &Message, payload: impl Into<bytes::Bytes>) -> Result<bool> {
        match &request.reply {
            Some(reply) => {
                self.publish(Message::new(reply.clone(), payload))?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    pub fn stats(&self) -> BusStats {
        self.transport.stats()
    }
}

/// A subscription with its own buffer. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    sid: SubId,
    pattern: Pattern,
    rx: mpsc::Receiver<Delivery>,
    dropped: Arc<AtomicU64>,
    bus: Bus,
}

impl Subscription {
    pub fn sid(&self) -> SubId {
        self.sid
    }

    pub fn pattern(&self) -> &Pattern {
        &self.pattern
    }

    /// The next message; `None` once the bus is gone.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await.map(|d| d.msg)
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.rx.try_recv().ok().map(|d| d.msg)
    }

    /// Messages dropped because this subscription's buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.bus.unsubscribe(self.sid);
    }
}

#[cfg(test)]
mod tests;
