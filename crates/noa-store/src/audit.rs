//! The tamper-evident audit log: a BLAKE3 hash chain with checkpoints signed by the node's ed25519 key.
//!
//! Record `n` stores `hash_n = BLAKE3(hash_{n-1} ‖ ts ‖ principal ‖ action ‖ resource ‖ outcome ‖ detail)`
//! (each field length-prefixed; `hash_0` is 32 zero bytes). Every `checkpoint_every` records the writer signs
//! `seq ‖ hash ‖ previous checkpoint's seq` with the node key, so checkpoints form a chain of their own, and
//! writes the newest signed checkpoint to `audit.head` beside the database once its transaction committed.
//! [`verify`] recomputes the chain and names the first record that was edited (its contents no longer give its
//! hash), removed (a gap, a checkpoint past the end, or a head the log no longer reaches) or reordered (its link
//! to the previous record is broken), and the first checkpoint removed from the middle (the next one names it).
//!
//! What it cannot see: records appended after the last checkpoint can be removed or rewritten by someone who
//! can write the database and `audit.head` together; the chain is only as strong as the protection of the
//! data directory (mode 0700) and of `node.key`.
//!
//! Records are appended by the store's writer thread inside the same transaction as the change they
//! describe, so a file write and its audit record commit together or not at all.

use crate::crypto::{hex, unhex};
use crate::{Error, Result};
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

/// What happened, by whom, to what.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditRecord {
    pub principal: String,
    pub action: String,
    pub resource: String,
    /// `ok`, `denied`, `failed`, or another short word.
    pub outcome: String,
    pub detail: serde_json::Value,
}

impl AuditRecord {
    pub fn new(
        principal: impl Into<String>,
        action: impl Into<String>,
        resource: impl Into<String>,
        outcome: impl Into<String>,
        detail: serde_json::Value,
    ) -> AuditRecord {
        AuditRecord {
            principal: principal.into(),
            action: action.into(),
            resource: resource.into(),
            outcome: outcome.into(),
            detail,
        }
    }
}

/// A stored audit record.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub ts_ms: u64,
    pub principal: String,
    pub action: String,
    pub resource: String,
    pub outcome: String,
    pub detail: serde_json::Value,
    pub hash: String,
}

/// Filters for reading the audit log.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    pub after: Option<u64>,
    pub principal: Option<String>,
    /// An action, or a prefix ending in `*` (`fs.*`).
    pub action: Option<String>,
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    /// At most this many (the newest matching ones, unless `after` is given: then the oldest after it).
    pub limit: Option<u32>,
}

/// The outcome of [`verify`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuditReport {
    pub records: u64,
    pub checkpoints: u64,
    pub last_checkpoint: Option<u64>,
    /// The public key the checkpoints were checked against (hex).
    pub key: String,
    /// The first problem found; `None` when the chain is intact.
    pub problem: Option<String>,
    /// The record the problem is at.
    pub at: Option<u64>,
}

pub(crate) fn record_hash(prev: &[u8; 32], ts_ms: u64, fields: [&str; 5]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"noa audit v1");
    h.update(prev);
    h.update(&ts_ms.to_le_bytes());
    for f in fields {
        h.update(&(f.len() as u64).to_le_bytes());
        h.update(f.as_bytes());
    }
    *h.finalize().as_bytes()
}

fn checkpoint_message(seq: u64, hash: &[u8; 32], prev_seq: u64) -> Vec<u8> {
    let mut m = b"noa audit checkpoint v2".to_vec();
    m.extend_from_slice(&seq.to_le_bytes());
    m.extend_from_slice(hash);
    m.extend_from_slice(&prev_seq.to_le_bytes());
    m
}

/// The file beside the database holding the newest signed checkpoint.
pub const HEAD_FILE: &str = "audit.head";

/// The newest signed checkpoint, kept outside the database.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct SignedHead {
    pub seq: u64,
    pub prev_seq: u64,
    pub hash: String,
    pub key: String,
    pub signature: String,
}

impl SignedHead {
    pub(crate) fn write(&self, path: &std::path::Path) {
        let tmp = path.with_extension("head.tmp");
        let ok = serde_json::to_vec(self)
            .map_err(std::io::Error::other)
            .and_then(|b| {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&b)?;
                f.sync_all()?;
                std::fs::rename(&tmp, path)
            });
        if let Err(e) = ok {
            tracing::error!(error = %e, "Cannot write the signed audit head.");
        }
    }
}

/// The writer's view of the chain head.
#[derive(Clone)]
pub(crate) struct Chain {
    prev: [u8; 32],
    next_seq: u64,
    signer: SigningKey,
    every: u64,
    /// The newest checkpoint's seq (0: none yet).
    last_checkpoint: u64,
    /// A checkpoint written in the current batch, to publish in `audit.head` once the batch commits.
    pub(crate) pending_head: Option<SignedHead>,
}

impl Chain {
    pub(crate) fn load(conn: &Connection, signer: SigningKey, every: u64) -> Result<Chain> {
        let head: Option<(i64, Vec<u8>)> = conn
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let (next_seq, prev) = match head {
            Some((seq, hash)) => {
                let prev: [u8; 32] = hash.try_into().map_err(|_| Error::Corrupt {
                    what: format!("audit record {seq}"),
                    message: "its hash is not 32 bytes".into(),
                })?;
                (seq as u64 + 1, prev)
            }
            None => (1, [0u8; 32]),
        };
        let last_checkpoint: i64 = conn.query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM audit_checkpoints",
            [],
            |r| r.get(0),
        )?;
        Ok(Chain {
            prev,
            next_seq,
            signer,
            every: every.max(1),
            last_checkpoint: last_checkpoint as u64,
            pending_head: None,
        })
    }

    /// Appends one record inside the caller's transaction; returns its sequence number.
    pub(crate) fn append(&mut self, conn: &Connection, rec: &AuditRecord) -> Result<u64> {
        let ts = noa_types::now_ms();
        let detail = rec.detail.to_string();
        let hash = record_hash(
            &self.prev,
            ts,
            [
                &rec.principal,
                &rec.action,
                &rec.resource,
                &rec.outcome,
                &detail,
            ],
        );
        let seq = self.next_seq;
        conn.prepare_cached(
            "INSERT INTO audit (seq, ts_ms, principal, action, resource, outcome, detail, prev, hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?
        .execute(params![
            seq as i64,
            ts as i64,
            rec.principal,
            rec.action,
            rec.resource,
            rec.outcome,
            detail,
            &self.prev[..],
            &hash[..]
        ])?;
        if seq.is_multiple_of(self.every) {
            let prev_seq = self.last_checkpoint;
            let sig = self.signer.sign(&checkpoint_message(seq, &hash, prev_seq));
            let key = hex(self.signer.verifying_key().as_bytes());
            conn.prepare_cached(
                "INSERT INTO audit_checkpoints (seq, prev_seq, hash, key_id, signature, ts_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                seq as i64,
                prev_seq as i64,
                &hash[..],
                key,
                &sig.to_bytes()[..],
                ts as i64
            ])?;
            self.last_checkpoint = seq;
            self.pending_head = Some(SignedHead {
                seq,
                prev_seq,
                hash: hex(&hash),
                key,
                signature: hex(&sig.to_bytes()),
            });
        }
        self.prev = hash;
        self.next_seq += 1;
        Ok(seq)
    }
}

/// Reads audit records, oldest first.
pub(crate) fn query(conn: &Connection, q: &AuditQuery) -> Result<Vec<AuditEntry>> {
    let limit = q.limit.unwrap_or(100).min(100_000);
    let (prefix, exact) = match q.action.as_deref() {
        Some(a) if a.ends_with('*') => (Some(a.trim_end_matches('*').to_owned()), None),
        Some(a) => (None, Some(a.to_owned())),
        None => (None, None),
    };
    // With `after`, page forward from it; without, show the newest.
    let order = if q.after.is_some() { "ASC" } else { "DESC" };
    let sql = format!(
        "SELECT seq, ts_ms, principal, action, resource, outcome, detail, hash FROM audit
         WHERE seq > ?1 AND (?2 IS NULL OR principal = ?2) AND (?3 IS NULL OR action = ?3)
           AND (?4 IS NULL OR substr(action, 1, length(?4)) = ?4)
           AND (?5 IS NULL OR ts_ms >= ?5) AND (?6 IS NULL OR ts_ms <= ?6)
         ORDER BY seq {order} LIMIT ?7"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(
        params![
            q.after.unwrap_or(0) as i64,
            q.principal,
            exact,
            prefix,
            q.since_ms.map(|v| v as i64),
            q.until_ms.map(|v| v as i64),
            limit
        ],
        |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, Vec<u8>>(7)?,
            ))
        },
    )?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, ts, principal, action, resource, outcome, detail, hash) = row?;
        out.push(AuditEntry {
            seq: seq as u64,
            ts_ms: ts as u64,
            principal,
            action,
            resource,
            outcome,
            detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail)),
            hash: hex(&hash),
        });
    }
    if q.after.is_none() {
        out.reverse();
    }
    Ok(out)
}

/// A file in the data directory listing more public keys (hex, one per line) whose checkpoints are trusted:
/// a restored node keeps trusting the key of the node its backup came from.
pub const TRUSTED_KEYS: &str = "audit.trusted";

/// Recomputes the whole chain and checks every checkpoint against `key` or one of `also_trusted`, and the
/// signed head in `head` (the contents of `audit.head`, when there is one).
pub fn verify(
    conn: &Connection,
    key: &VerifyingKey,
    also_trusted: &[VerifyingKey],
    head: Option<&SignedHead>,
) -> Result<AuditReport> {
    let key_hex = hex(key.as_bytes());
    let mut report = AuditReport {
        records: 0,
        checkpoints: 0,
        last_checkpoint: None,
        key: key_hex.clone(),
        problem: None,
        at: None,
    };
    type Checkpoint = (u64, Vec<u8>, String, Vec<u8>);
    let mut checkpoints: std::collections::BTreeMap<u64, Checkpoint> = Default::default();
    {
        let mut stmt = conn.prepare(
            "SELECT seq, prev_seq, hash, key_id, signature FROM audit_checkpoints ORDER BY seq",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Vec<u8>>(4)?,
            ))
        })?;
        for row in rows {
            let (seq, prev_seq, hash, key_id, sig) = row?;
            checkpoints.insert(seq as u64, (prev_seq as u64, hash, key_id, sig));
        }
    }
    let fail = |report: &mut AuditReport, at: u64, msg: String| {
        report.problem = Some(msg);
        report.at = Some(at);
    };
    let trusted = |key_id: &str| {
        std::iter::once(key)
            .chain(also_trusted)
            .find(|k| hex(k.as_bytes()) == key_id)
    };
    // The checkpoints form a chain of their own: each names the one before it.
    let mut before = 0u64;
    for (&seq, (prev_seq, ..)) in &checkpoints {
        if *prev_seq != before {
            let had = if before == 0 {
                "none before it".to_owned()
            } else {
                format!("{before} before it")
            };
            fail(
                &mut report,
                *prev_seq,
                format!(
                    "checkpoint {prev_seq} was removed: checkpoint {seq} names it as the one before it, but the log has {had}"
                ),
            );
            return Ok(report);
        }
        before = seq;
    }
    // The signed head outside the database: the log must still reach it.
    if let Some(h) = head {
        let head_ok = trusted(&h.key).is_some_and(|k| {
            let hash: Option<[u8; 32]> = unhex(&h.hash).and_then(|b| b.try_into().ok());
            let sig: Option<[u8; 64]> = unhex(&h.signature).and_then(|b| b.try_into().ok());
            match (hash, sig) {
                (Some(hash), Some(sig)) => k
                    .verify(
                        &checkpoint_message(h.seq, &hash, h.prev_seq),
                        &ed25519_dalek::Signature::from_bytes(&sig),
                    )
                    .is_ok(),
                _ => false,
            }
        });
        if !head_ok {
            fail(
                &mut report,
                h.seq,
                format!(
                    "the signed head ({HEAD_FILE}) for checkpoint {} has no valid signature by a trusted key",
                    h.seq
                ),
            );
            return Ok(report);
        }
        match checkpoints.get(&h.seq) {
            Some((_, hash, ..)) if hex(hash) == h.hash => {}
            Some(_) => {
                fail(
                    &mut report,
                    h.seq,
                    format!(
                        "checkpoint {} differs from the signed head ({HEAD_FILE}): it was rewritten",
                        h.seq
                    ),
                );
                return Ok(report);
            }
            None => {
                let last = checkpoints.keys().next_back().copied().unwrap_or(0);
                fail(
                    &mut report,
                    h.seq,
                    format!(
                        "records and checkpoints after checkpoint {last} were removed: the signed head ({HEAD_FILE}) names checkpoint {}",
                        h.seq
                    ),
                );
                return Ok(report);
            }
        }
    }
    let mut stmt = conn.prepare(
        "SELECT seq, ts_ms, principal, action, resource, outcome, detail, prev, hash FROM audit ORDER BY seq",
    )?;
    let mut rows = stmt.query([])?;
    let mut running = [0u8; 32];
    let mut expected_seq = 1u64;
    // Whether the previous record's own hash matched its contents (to tell an edit from a reorder).
    while let Some(r) = rows.next()? {
        let seq = r.get::<_, i64>(0)? as u64;
        let ts = r.get::<_, i64>(1)? as u64;
        let principal = r.get_ref(2)?.as_str().unwrap_or_default();
        let action = r.get_ref(3)?.as_str().unwrap_or_default();
        let resource = r.get_ref(4)?.as_str().unwrap_or_default();
        let outcome = r.get_ref(5)?.as_str().unwrap_or_default();
        let detail = r.get_ref(6)?.as_str().unwrap_or_default();
        let prev = r.get_ref(7)?.as_blob().unwrap_or_default();
        let stored = r.get_ref(8)?.as_blob().unwrap_or_default();
        if seq != expected_seq {
            let msg = if seq == expected_seq + 1 {
                format!("record {expected_seq} is missing: it was removed")
            } else if seq > expected_seq {
                format!(
                    "records {expected_seq}..{} are missing: they were removed",
                    seq - 1
                )
            } else {
                format!("record {seq} appears twice")
            };
            fail(&mut report, expected_seq, msg);
            return Ok(report);
        }
        let prev: [u8; 32] = prev.try_into().unwrap_or([0xff; 32]);
        let own = record_hash(&prev, ts, [principal, action, resource, outcome, detail]);
        if own[..] != *stored {
            fail(
                &mut report,
                seq,
                format!("record {seq} was edited: its contents do not match its hash"),
            );
            return Ok(report);
        }
        if prev != running {
            let msg = if seq == 1 {
                "record 1 does not start the chain: records before it were removed or it was replaced"
                    .to_owned()
            } else {
                format!(
                    "record {seq} does not follow record {}: records were reordered, replaced or inserted (or record {} was edited and its hash recomputed)",
                    seq - 1,
                    seq - 1
                )
            };
            fail(&mut report, seq, msg);
            return Ok(report);
        }
        running = own;
        if let Some((prev_seq, hash, key_id, sig)) = checkpoints.get(&seq) {
            if hash[..] != running {
                fail(
                    &mut report,
                    seq,
                    format!(
                        "checkpoint {seq} does not match the chain: records up to {seq} were rewritten"
                    ),
                );
                return Ok(report);
            }
            let signer = trusted(key_id);
            let sig_ok = signer.is_some_and(|signer| {
                <[u8; 64]>::try_from(&sig[..])
                    .map(|s| {
                        signer
                            .verify(
                                &checkpoint_message(seq, &running, *prev_seq),
                                &ed25519_dalek::Signature::from_bytes(&s),
                            )
                            .is_ok()
                    })
                    .unwrap_or(false)
            });
            if !sig_ok {
                fail(
                    &mut report,
                    seq,
                    format!(
                        "checkpoint {seq} has no valid signature by a trusted key (this node's key is {key_hex}; it names {key_id})"
                    ),
                );
                return Ok(report);
            }
            report.checkpoints += 1;
            report.last_checkpoint = Some(seq);
        }
        report.records = seq;
        expected_seq += 1;
    }
    if let Some((&last, _)) = checkpoints.range(expected_seq..).next() {
        fail(
            &mut report,
            expected_seq,
            format!(
                "records from {expected_seq} on were removed: checkpoint {last} is signed but the log ends at {}",
                expected_seq - 1
            ),
        );
    }
    Ok(report)
}

/// Reads the node's signing key, creating it (mode 0600) on first start.
pub fn load_or_create_node_key(path: &std::path::Path) -> Result<SigningKey> {
    if let Some(seed) = crate::crypto::read_key_file(path)? {
        return Ok(SigningKey::from_bytes(&seed));
    }
    let seed = crate::crypto::random32()?;
    crate::crypto::write_key_file(path, &seed)?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The public half of a node key file.
pub fn node_public_key(path: &std::path::Path) -> Result<VerifyingKey> {
    let seed = crate::crypto::read_key_file(path)?.ok_or_else(|| Error::Key {
        path: path.to_owned(),
        message: "the node key is missing".into(),
    })?;
    Ok(SigningKey::from_bytes(&seed).verifying_key())
}

/// Parses a hex public key.
pub fn parse_public_key(hex_key: &str) -> Option<VerifyingKey> {
    let b: [u8; 32] = unhex(hex_key)?.try_into().ok()?;
    VerifyingKey::from_bytes(&b).ok()
}
