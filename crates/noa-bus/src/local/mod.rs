//! The in-process transport: a subject trie under a read-write lock, bounded sinks, and a muxed reply inbox.
//!
//! Publishing takes the read lock, walks the trie token by token (literal child, `*` child, `>` leaf) and
//! offers the message to each match without waiting. Requests do not subscribe per call: every reply subject
//! is `_INBOX.<bus id>.<n>` and replies go straight to a table of waiting requests.

mod trie;

use crate::{
    BoxFuture, BusStats, Delivery, Error, Message, Pattern, Result, Sink, SubId, Subject, Transport,
};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;
use trie::{Matches, Trie};

/// The in-process bus transport.
pub struct LocalTransport {
    trie: RwLock<Trie>,
    next_sid: AtomicU64,
    inbox_prefix: String,
    next_request: AtomicU64,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Message>>>>,
    published: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
}

impl Default for LocalTransport {
    fn default() -> Self {
        Self::new()
    }
}

static BUS_IDS: AtomicU64 = AtomicU64::new(1);

impl LocalTransport {
    pub fn new() -> Self {
        let id = BUS_IDS.fetch_add(1, Ordering::Relaxed);
        LocalTransport {
            trie: RwLock::new(Trie::default()),
            next_sid: AtomicU64::new(1),
            inbox_prefix: format!("_INBOX.{}{id}.", std::process::id()),
            next_request: AtomicU64::new(1),
            pending: Arc::new(Mutex::new(HashMap::new())),
            published: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Hands a reply to the request waiting for it; gives the message back if it is not a reply.
    fn deliver_reply(&self, msg: Message) -> Result<usize, Message> {
        let n = match msg
            .subject
            .as_str()
            .strip_prefix(self.inbox_prefix.as_str())
        {
            Some(rest) => match rest.parse::<u64>() {
                Ok(n) => n,
                Err(_) => return Err(msg),
            },
            None => return Err(msg),
        };
        let waiter = self.pending.lock().remove(&n);
        Ok(match waiter {
            Some(tx) => usize::from(tx.send(msg).is_ok()),
            None => 0,
        })
    }
}

impl Transport for LocalTransport {
    fn publish(&self, msg: Message) -> Result<usize> {
        self.published.fetch_add(1, Ordering::Relaxed);
        let msg = match self.deliver_reply(msg) {
            Ok(n) => {
                self.delivered.fetch_add(n as u64, Ordering::Relaxed);
                return Ok(n);
            }
            Err(msg) => msg,
        };
        let trie = self.trie.read();
        let mut matches = Matches::default();
        trie.collect(msg.subject.as_str(), &mut matches);
        let mut delivered = 0usize;
        let mut dropped = 0u64;
        for entry in matches.plain() {
            if entry.sink.offer(Delivery {
                sid: entry.sid,
                msg: msg.clone(),
            }) {
                delivered += 1;
            } else {
                dropped += 1;
            }
        }
        // One member per queue group: the picked one, or the next with room if its buffer is full.
        matches.for_each_queue_group(|members, start| {
            let mut delivery = Delivery {
                sid: 0,
                msg: msg.clone(),
            };
            for i in 0..members.len() {
                let entry = members[(start + i) % members.len()];
                delivery.sid = entry.sid;
                match entry.sink.try_offer(delivery) {
                    Ok(()) => {
                        delivered += 1;
                        return;
                    }
                    Err(back) => delivery = back,
                }
            }
            members[start % members.len()].sink.count_drop();
            dropped += 1;
        });
        drop(matches);
        drop(trie);
        self.delivered
            .fetch_add(delivered as u64, Ordering::Relaxed);
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        Ok(delivered + dropped as usize)
    }

    fn subscribe(&self, pattern: Pattern, queue: Option<&str>, sink: Sink) -> Result<SubId> {
        if let Some(q) = queue
            && (q.is_empty() || q.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(Error::InvalidSubject {
                subject: pattern.as_str().to_owned(),
                reason: format!("queue group name {q:?} must be non-empty without whitespace"),
            });
        }
        let sid = self.next_sid.fetch_add(1, Ordering::Relaxed);
        self.trie
            .write()
            .insert(sid, pattern, queue.map(Arc::from), sink);
        Ok(sid)
    }

    fn unsubscribe(&self, sid: SubId) -> bool {
        self.trie.write().remove(sid)
    }

    fn request(&self, mut msg: Message, timeout: Duration) -> BoxFuture<'static, Result<Message>> {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(n, tx);
        let subject = msg.subject.as_str().to_owned();
        msg.reply = Some(Subject::from_trusted(format!("{}{n}", self.inbox_prefix)));
        let outcome = self.publish(msg);
        let pending = self.pending.clone();
        Box::pin(async move {
            let forget = || {
                pending.lock().remove(&n);
            };
            match outcome {
                Err(e) => {
                    forget();
                    return Err(e);
                }
                Ok(0) => {
                    forget();
                    return Err(Error::NoResponders { subject });
                }
                Ok(_) => {}
            }
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(_)) => Err(Error::Closed),
                Err(_) => {
                    forget();
                    Err(Error::Timeout { subject, timeout })
                }
            }
        })
    }

    fn stats(&self) -> BusStats {
        BusStats {
            published: self.published.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            subscriptions: self.trie.read().len() as u64,
        }
    }
}
