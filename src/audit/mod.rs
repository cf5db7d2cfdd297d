//! The audit trail: every store, query, retrieve, link, disclosure,
//! revocation, break-glass and refusal, recorded append-only in the index
//! database with a SHA-256 hash chain (`chain`), readable per patient, user
//! and time (`trail`), and each mapped to its PS3.15 / PS3.16 codes
//! (`codes`).
//!
//! Requests hand events to one appender task and go on: the appender writes
//! whatever has queued up in one transaction (one fsync for many events).
//! An event is lost only if the process dies within that window; graceful
//! shutdown drains the queue.

pub mod chain;
pub mod codes;
pub mod syslog;
pub mod trail;

use serde::{Deserialize, Serialize};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::clock::Clock;
use crate::index::Index;

/// What was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Objects received (C-STORE, STOW-RS, import).
    Store,
    /// A QIDO-RS search.
    Query,
    /// Metadata read (WADO-RS metadata).
    Access,
    /// Instances, frames or bulk data sent (WADO-RS, WADO-URI).
    Retrieve,
    Link,
    Unlink,
    Disclose,
    Revoke,
    BreakGlass,
    /// A request refused before it could act: bad or missing token.
    Authenticate,
    /// A request refused for its role.
    Authorize,
    /// The audit trail itself read.
    ReadAudit,
}

/// How it ended (PS3.15 EventOutcomeIndicator: 0, 4, 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Success,
    /// Refused: not allowed, or hidden (answered as absent).
    Denied,
    /// Failed: absent, invalid, or a service error.
    Failure,
}

/// A patient (as its owner identifies it) and study an event touched.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AuditObject {
    pub patient_institution: String,
    pub patient_id: String,
    /// Empty when the event concerns the patient record only.
    pub study_uid: String,
}

/// One audit event before it is sequenced and chained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// `clock::stamp` of when it happened.
    pub at: String,
    pub action: Action,
    pub outcome: Outcome,
    pub user: String,
    pub institution: String,
    pub role: String,
    /// The client's network address (or the calling AE and address).
    pub client: String,
    pub objects: Vec<AuditObject>,
    /// Anything else worth keeping: path, counts, reason, ids.
    pub detail: serde_json::Value,
}

impl Event {
    /// Sort and deduplicate the objects (one per patient and study).
    pub fn normalized(mut self) -> Self {
        self.objects.sort();
        self.objects.dedup();
        self
    }
}

enum Message {
    Event(Box<Event>),
    Flush(oneshot::Sender<()>),
}

/// Who acts: a user of an institution, or a modality (calling AE title).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actor {
    pub user: String,
    pub institution: String,
    pub role: String,
    pub client: String,
}

/// The handle requests record events through.
#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::UnboundedSender<Message>,
    clock: Arc<Clock>,
}

/// Most events written in one transaction.
const MAX_BATCH: usize = 512;

impl Auditor {
    /// Start the appender on the current runtime.
    pub fn start(index: Index, syslog: Option<syslog::Forwarder>, clock: Arc<Clock>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(append_loop(index, rx, syslog));
        Self { tx, clock }
    }

    /// Queue an event of `actor` for the trail, stamped now.
    pub fn record_by(
        &self,
        actor: &Actor,
        action: Action,
        outcome: Outcome,
        objects: Vec<AuditObject>,
        detail: serde_json::Value,
    ) {
        self.record(Event {
            at: String::new(),
            action,
            outcome,
            user: actor.user.clone(),
            institution: actor.institution.clone(),
            role: actor.role.clone(),
            client: actor.client.clone(),
            objects,
            detail,
        });
    }

    /// Queue `event` for the trail (stamped now unless it has a time).
    pub fn record(&self, event: Event) {
        let mut event = event.normalized();
        if event.at.is_empty() {
            event.at = crate::clock::stamp(self.clock.now());
        }
        if self.tx.send(Message::Event(Box::new(event))).is_err() {
            tracing::error!("the audit appender has stopped; an audit event was not recorded");
            metrics::counter!(crate::telemetry::AUDIT_LOST).increment(1);
        }
    }

    /// Wait until everything recorded so far is written.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

async fn append_loop(
    index: Index,
    mut rx: mpsc::UnboundedReceiver<Message>,
    syslog: Option<syslog::Forwarder>,
) {
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    let mut batch: Vec<Event> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Message::Event(e) => batch.push(*e),
                Message::Flush(done) => waiting.push(done),
            }
            if batch.len() >= MAX_BATCH {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !batch.is_empty() {
            // A failed write is retried (the events stay queued) rather than
            // dropped: the database may come back.
            let mut delay = std::time::Duration::from_millis(50);
            loop {
                match chain::append(&index, &batch).await {
                    Ok(written) => {
                        if let Some(f) = &syslog {
                            f.send(&written);
                        }
                        batch.clear();
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, events = batch.len(), "writing audit events failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(std::time::Duration::from_secs(5));
                    }
                }
            }
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}
