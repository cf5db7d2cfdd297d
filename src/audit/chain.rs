//! Sequencing and chaining: event n's hash is
//! SHA-256(hash of event n-1 ‖ canonical JSON of event n with its sequence
//! number), starting from 64 zeros — or, with a chain key
//! (`[audit] chain_key_file`), HMAC-SHA-256 under that key of the same
//! bytes, written `hmac-sha256:<hex>`. `audit_head` holds the chain's end; an
//! append locks it first (`Index::begin_records`), so nodes sharing one
//! database extend one chain. Changing, removing or reordering any event
//! breaks every hash after it, which `verify` finds; without the key nobody
//! can chain a changed event again so that it verifies, where a plain
//! SHA-256 chain can be recomputed by whoever can write the database.

use std::sync::Arc;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::{AuditObject, Event};
use crate::index::{Index, IndexError};

/// The hash before the first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How a keyed event's hash begins.
const KEYED: &str = "hmac-sha256:";
/// The shortest secret taken as a chain key (HMAC-SHA-256's own block
/// strength needs no more).
const MIN_KEY_BYTES: usize = 32;

/// The secret that keys the chain, read once from `[audit] chain_key_file`.
#[derive(Clone)]
pub struct ChainKey {
    secret: Arc<[u8]>,
}

/// What the appender chains with: the key, if any, and whether this
/// appender has committed keyed events (so that a chain found ending
/// unkeyed afterwards was rewritten).
pub struct Chainer {
    key: Option<ChainKey>,
    seen_keyed: bool,
}

impl std::fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChainKey(..)")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("audit.chain_key_file: {0}")]
pub struct ChainKeyError(String);

impl ChainKey {
    /// The key `[audit] chain_key_file` names, if any: the file's bytes
    /// but a final line end (a key is text, such as `openssl rand -hex 32`
    /// writes).
    pub fn from_config(cfg: &crate::config::AuditConfig) -> Result<Option<Self>, ChainKeyError> {
        let Some(path) = &cfg.chain_key_file else {
            return Ok(None);
        };
        let bytes =
            std::fs::read(path).map_err(|e| ChainKeyError(format!("{}: {e}", path.display())))?;
        let key = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
        let key = key.strip_suffix(b"\r").unwrap_or(key);
        if key.len() < MIN_KEY_BYTES {
            return Err(ChainKeyError(format!(
                "{}: {} bytes; a chain key needs at least {MIN_KEY_BYTES} (e.g. `openssl rand -hex 32`)",
                path.display(),
                key.len()
            )));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
                tracing::warn!(
                    file = %path.display(),
                    "the audit chain key is readable by other users of this machine"
                );
            }
        }
        Ok(Some(Self { secret: key.into() }))
    }
}

impl Chainer {
    pub fn new(key: Option<ChainKey>) -> Self {
        Self {
            key,
            seen_keyed: false,
        }
    }

    fn key(&self) -> Option<&ChainKey> {
        self.key.as_ref()
    }

    /// Called with the chain's last event before an append: whether the
    /// chain, once seen keyed by this process, now ends with an unkeyed
    /// event — keyed events removed and history chained again without the
    /// key while the hub ran, which the next keyed event would otherwise
    /// seal as genuine.
    fn rewritten_unkeyed(&self, last_seq: i64, last_hash: &str) -> bool {
        if is_keyed(last_hash) {
            return false;
        }
        if !self.seen_keyed {
            if last_seq > 0 {
                tracing::info!(
                    from = last_seq + 1,
                    "the audit trail is keyed from this event on"
                );
            }
            return false;
        }
        true
    }

    /// An append with this key committed: the chain is keyed from here on.
    /// (Not before the commit: an append that failed and is tried again
    /// must not find its own unkeyed end "rewritten".)
    fn committed(&mut self) {
        if self.key.is_some() {
            self.seen_keyed = true;
        }
    }
}

/// Whether a node can append to the trail with `key`: not without a key
/// (or with another one) once the chain is keyed — its events would break
/// the chain for good, and hide later tampering behind the break. Checked
/// at start against the chain's last event.
pub async fn check_key(index: &Index, key: Option<&ChainKey>) -> Result<(), ChainKeyError> {
    let fail = |e: IndexError| ChainKeyError(format!("reading the audit trail's last event: {e}"));
    let Some(last) = sqlx::query(LAST)
        .fetch_optional(index.pool())
        .await
        .map_err(|e| fail(e.into()))?
    else {
        return Ok(());
    };
    let (seq, last_hash): (i64, String) = (last.get(0), last.get(1));
    if !is_keyed(&last_hash) {
        return Ok(());
    }
    let Some(key) = key else {
        return Err(ChainKeyError(format!(
            "the audit trail is keyed (its last event, {seq}, is): this node needs the chain's key"
        )));
    };
    let event = super::trail::read_range(index.pool(), seq, 1)
        .await
        .map_err(fail)?;
    match event.first() {
        Some(s) if hash(&s.prev_hash, s.seq, &s.event, Some(key)) == s.hash => Ok(()),
        _ => Err(ChainKeyError(format!(
            "the key does not check the audit trail's last event ({seq}): another key, or the \
             event was changed (see `tsunagu audit verify`)"
        ))),
    }
}

/// A security alert if the chainer's key finds the chain rewritten without
/// it (`Chainer::rewritten_unkeyed`), or an error logged if a node without a
/// key appends to a keyed chain.
fn keying_alert(chainer: &Chainer, last_seq: i64, last_hash: &str) -> Option<Event> {
    if chainer.key().is_none() {
        if is_keyed(last_hash) {
            tracing::error!(
                last_event = last_seq,
                "appending to a keyed audit trail without its key (audit.chain_key_file): \
                 the trail will not verify from here on"
            );
            metrics::counter!(crate::telemetry::AUDIT_TAMPERING).increment(1);
        }
        return None;
    }
    if !chainer.rewritten_unkeyed(last_seq, last_hash) {
        return None;
    }
    tracing::error!(
        last_event = last_seq,
        "the keyed audit trail now ends with an unkeyed event: rewritten outside the hub"
    );
    metrics::counter!(crate::telemetry::AUDIT_TAMPERING).increment(1);
    Some(alert(serde_json::json!({
        "keyed_chain_rewritten": { "last_event": { "seq": last_seq, "hash": last_hash } },
    })))
}

/// A `trail-altered` security alert holding `detail`.
fn alert(detail: serde_json::Value) -> Event {
    Event {
        at: crate::clock::stamp(chrono::Utc::now()),
        action: super::Action::TrailAltered,
        outcome: super::Outcome::Failure,
        user: "tsunagu".into(),
        institution: String::new(),
        role: String::new(),
        client: String::new(),
        objects: Vec::new(),
        detail,
    }
}

/// Whether `hash` is a keyed event's.
fn is_keyed(hash: &str) -> bool {
    hash.starts_with(KEYED)
}

/// An event as written: its place in the chain.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sequenced {
    pub seq: i64,
    #[serde(flatten)]
    pub event: Event,
    /// Empty (and not serialized) where a view leaves the chain out.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub prev_hash: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

/// The bytes an event's hash covers (field order fixed by the struct).
fn canonical(seq: i64, e: &Event) -> Vec<u8> {
    #[derive(Serialize)]
    struct Canon<'a> {
        seq: i64,
        at: &'a str,
        action: super::Action,
        outcome: super::Outcome,
        user: &'a str,
        institution: &'a str,
        role: &'a str,
        client: &'a str,
        objects: &'a [AuditObject],
        detail: &'a serde_json::Value,
    }
    serde_json::to_vec(&Canon {
        seq,
        at: &e.at,
        action: e.action,
        outcome: e.outcome,
        user: &e.user,
        institution: &e.institution,
        role: &e.role,
        client: &e.client,
        objects: &e.objects,
        detail: &e.detail,
    })
    .unwrap_or_default()
}

/// Event `seq`'s hash after `prev`: keyed if `key` is given.
pub fn hash(prev: &str, seq: i64, e: &Event, key: Option<&ChainKey>) -> String {
    let body = canonical(seq, e);
    match key {
        None => {
            let mut h = Sha256::new();
            h.update(prev.as_bytes());
            h.update(body);
            hex::encode(h.finalize())
        }
        Some(k) => {
            let mut m =
                Hmac::<Sha256>::new_from_slice(&k.secret).expect("HMAC takes any key length");
            m.update(prev.as_bytes());
            m.update(&body);
            format!("{KEYED}{}", hex::encode(m.finalize().into_bytes()))
        }
    }
}

/// A security alert for the chain, if its recorded end (`audit_head`) is
/// not its last event: moved back, or left past events deleted from the end
/// (both need the database owner's rights). Appends go on from the last
/// event, so the alert is what keeps the evidence, inside the chain.
fn end_moved(head_seq: i64, head_hash: String, last_seq: i64, last_hash: &str) -> Option<Event> {
    if head_seq == last_seq && head_hash == last_hash {
        return None;
    }
    tracing::error!(
        recorded_end = head_seq,
        last_event = last_seq,
        "the audit trail's recorded end is not its last event: changed outside the hub"
    );
    metrics::counter!(crate::telemetry::AUDIT_TAMPERING).increment(1);
    Some(alert(serde_json::json!({
        "recorded_end": { "seq": head_seq, "hash": head_hash },
        "last_event": { "seq": last_seq, "hash": last_hash },
    })))
}

/// `events` sequenced and chained after the chain's last event (`seq`,
/// `prev`), behind the alerts the recorded end (`head`) and the key call for.
fn chain_after(
    head: (i64, String),
    (mut seq, mut prev): (i64, String),
    events: &[Event],
    chainer: &Chainer,
) -> Vec<Sequenced> {
    let alerts = [
        end_moved(head.0, head.1, seq, &prev),
        keying_alert(chainer, seq, &prev),
    ];
    let key = chainer.key();
    alerts
        .into_iter()
        .flatten()
        .chain(events.iter().cloned())
        .map(|event| {
            seq += 1;
            let h = hash(&prev, seq, &event, key);
            Sequenced {
                seq,
                event,
                prev_hash: std::mem::replace(&mut prev, h.clone()),
                hash: h,
            }
        })
        .collect()
}

const INSERT_EVENT: &str = "INSERT INTO audit_event (seq, at, action, outcome, user_name, \
     institution, role, client, detail, prev_hash, hash) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";
const INSERT_OBJECT: &str = "INSERT INTO audit_object (seq, patient_institution, patient_id, \
     study_uid) VALUES ($1, $2, $3, $4)";
const HEAD: &str = "SELECT seq, hash FROM audit_head WHERE id = 1";
/// The chain's last event: where appends go on. Not the recorded end
/// (`audit_head`), which a write outside the hub could move back: appends
/// would then collide with the events after it, and stop.
const LAST: &str = "SELECT seq, hash FROM audit_event ORDER BY seq DESC LIMIT 1";
const MOVE_HEAD: &str = "UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1";

/// The text columns of an event row after `seq`, in INSERT_EVENT's order.
fn event_columns(s: &Sequenced) -> [String; 10] {
    let e = &s.event;
    [
        e.at.clone(),
        super::serde_name(&e.action),
        super::serde_name(&e.outcome),
        e.user.clone(),
        e.institution.clone(),
        e.role.clone(),
        e.client.clone(),
        e.detail.to_string(),
        s.prev_hash.clone(),
        s.hash.clone(),
    ]
}

/// Append `events` in one transaction through the pool (PostgreSQL, or
/// SQLite without a connection of the appender's own); what was written.
pub async fn append(
    index: &Index,
    events: &[Event],
    chainer: &mut Chainer,
) -> Result<Vec<Sequenced>, IndexError> {
    let mut tx = index.begin_records(crate::index::RecordLock::Audit).await?;
    let (seq, prev): (i64, String) = match sqlx::query(LAST).fetch_optional(&mut *tx).await? {
        Some(r) => (r.get(0), r.get(1)),
        None => (0, GENESIS.to_string()),
    };
    let head = sqlx::query(HEAD).fetch_one(&mut *tx).await?;
    let written = chain_after((head.get(0), head.get(1)), (seq, prev), events, chainer);
    for s in &written {
        let mut q = sqlx::query(INSERT_EVENT).bind(s.seq);
        for v in event_columns(s) {
            q = q.bind(v);
        }
        q.execute(&mut *tx).await?;
        for o in &s.event.objects {
            sqlx::query(INSERT_OBJECT)
                .bind(s.seq)
                .bind(&o.patient_institution)
                .bind(&o.patient_id)
                .bind(&o.study_uid)
                .execute(&mut *tx)
                .await?;
        }
    }
    if let Some(last) = written.last() {
        sqlx::query(MOVE_HEAD)
            .bind(last.seq)
            .bind(&last.hash)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    chainer.committed();
    Ok(written)
}

/// `append` on the appender's own SQLite connection: prepared statements,
/// no hop through sqlx's worker thread per statement (which cost every
/// request a measurable share of a 2-core machine).
pub fn append_sqlite(
    conn: &mut rusqlite::Connection,
    events: &[Event],
    chainer: &mut Chainer,
) -> Result<Vec<Sequenced>, IndexError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let last = tx.query_row(LAST, [], |r| Ok((r.get(0)?, r.get(1)?)));
    let (seq, prev): (i64, String) = match last {
        Ok(l) => l,
        Err(rusqlite::Error::QueryReturnedNoRows) => (0, GENESIS.to_string()),
        Err(e) => return Err(e.into()),
    };
    let head = tx.query_row(HEAD, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let written = chain_after(head, (seq, prev), events, chainer);
    {
        let mut ev = tx.prepare_cached(INSERT_EVENT)?;
        let mut ob = tx.prepare_cached(INSERT_OBJECT)?;
        for s in &written {
            let c = event_columns(s);
            ev.execute(rusqlite::params![
                s.seq, c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9]
            ])?;
            for o in &s.event.objects {
                ob.execute(rusqlite::params![
                    s.seq,
                    o.patient_institution,
                    o.patient_id,
                    o.study_uid
                ])?;
            }
        }
        if let Some(last) = written.last() {
            tx.execute(MOVE_HEAD, rusqlite::params![last.seq, last.hash])?;
        }
    }
    tx.commit()?;
    chainer.committed();
    Ok(written)
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    pub events: u64,
    /// The first sequence number whose event does not match its hash or
    /// predecessor, with the reason; `None` if the chain is intact.
    pub broken_at: Option<(i64, String)>,
    /// The first keyed event, if any.
    pub keyed_from: Option<i64>,
}

/// Recompute the whole chain, in pages (memory stays bounded). Keyed
/// events need `key`; once the chain is keyed, every later event must be
/// keyed too (one chained again without the key is not), and given a key,
/// a chain with events none of which is keyed does not verify either (it
/// may have been rewritten whole without the key).
pub async fn verify(index: &Index, key: Option<&ChainKey>) -> Result<Verification, IndexError> {
    let pool = index.pool();
    // The last event, then the recorded end: events and end are written in
    // one transaction, so the end read second is at or past the last event
    // read first (events appended while we read are left for the next run,
    // beyond both). An end before the last event was moved back.
    let last_seq: i64 = match sqlx::query(LAST).fetch_optional(pool).await? {
        Some(r) => r.get(0),
        None => 0,
    };
    let head = sqlx::query(HEAD).fetch_one(pool).await?;
    let (recorded_seq, head_hash): (i64, String) = (head.get(0), head.get(1));
    let head_seq = recorded_seq.max(last_seq);
    let mut prev = GENESIS.to_string();
    let mut expect_seq = 1i64;
    let mut count = 0u64;
    let mut keyed_from = None;
    const PAGE: i64 = 2000;
    while expect_seq <= head_seq {
        let page = PAGE.min(head_seq - expect_seq + 1);
        let events = super::trail::read_range(pool, expect_seq, page).await?;
        if events.is_empty() {
            break;
        }
        for s in events {
            count += 1;
            let keyed = is_keyed(&s.hash);
            let broken = if s.seq != expect_seq {
                Some(format!("event {expect_seq} is missing"))
            } else if s.prev_hash != prev {
                Some("its previous hash does not match the event before it".into())
            } else if keyed && key.is_none() {
                Some("it is keyed: verifying it needs the chain key (audit.chain_key_file)".into())
            } else if !keyed && let Some(k) = keyed_from {
                Some(format!(
                    "it is not keyed, though the chain is keyed from event {k} (chained again without the key)"
                ))
            } else if hash(&prev, s.seq, &s.event, key.filter(|_| keyed)) != s.hash {
                Some(if keyed {
                    "its content does not match its keyed hash (changed, or another key)".into()
                } else {
                    "its content does not match its hash".into()
                })
            } else {
                None
            };
            if let Some(reason) = broken {
                return Ok(Verification {
                    events: count,
                    broken_at: Some((expect_seq, reason)),
                    keyed_from,
                });
            }
            if keyed && keyed_from.is_none() {
                keyed_from = Some(s.seq);
            }
            prev = s.hash;
            expect_seq += 1;
        }
    }
    let broken_at = if recorded_seq < last_seq {
        Some((
            recorded_seq + 1,
            format!(
                "the chain's recorded end ({recorded_seq}) was moved back before its last event ({last_seq})"
            ),
        ))
    } else if head_seq != expect_seq - 1 {
        Some((
            expect_seq,
            format!(
                "events {expect_seq} to {head_seq} are missing (the chain's recorded end is {head_seq})"
            ),
        ))
    } else if head_hash != prev {
        Some((
            head_seq,
            "the chain's recorded end does not match its last event".to_string(),
        ))
    } else if key.is_some() && count > 0 && keyed_from.is_none() {
        Some((
            head_seq,
            "no event is keyed, though a chain key is given: written before the key was \
             configured, or chained again without it"
                .to_string(),
        ))
    } else {
        None
    };
    Ok(Verification {
        events: count,
        broken_at,
        keyed_from,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_seen_keyed_that_ends_unkeyed_was_rewritten() {
        let key = ChainKey {
            secret: Arc::from(&b"0123456789abcdef0123456789abcdef"[..]),
        };
        let mut chainer = Chainer::new(Some(key.clone()));
        // The first append keys an unkeyed chain (or an empty one), also
        // when it is tried again after a failure.
        assert!(!chainer.rewritten_unkeyed(7, "ab12"));
        assert!(!chainer.rewritten_unkeyed(7, "ab12"));
        chainer.committed();
        assert!(!chainer.rewritten_unkeyed(8, "hmac-sha256:ab12"));
        // After a keyed append committed, an unkeyed end can only be a rewrite.
        assert!(chainer.rewritten_unkeyed(5, "cd34"));
        // A process that starts on a keyed chain.
        let mut fresh = Chainer::new(Some(key));
        assert!(!fresh.rewritten_unkeyed(9, "hmac-sha256:ef56"));
        fresh.committed();
        assert!(fresh.rewritten_unkeyed(9, "ef56"));
    }
}
