//! The audit trail: every store, query, retrieve, link, disclosure,
//! revocation, break-glass and refusal, recorded append-only in the index
//! database with a SHA-256 hash chain (`chain`), readable per patient, user
//! and time (`trail`), and each mapped to its PS3.15 / PS3.16 codes
//! (`codes`).
//!
//! Requests hand events to one appender thread and go on: it writes
//! what has queued up within `LINGER` in one transaction (one fsync for many
//! events). An event is lost only if the process dies within that window;
//! graceful shutdown drains the queue.

pub mod chain;
pub mod codes;
pub mod syslog;
pub mod trail;

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

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
    /// A DICOM association refused: calling or called AE title not known.
    AuthenticateNode,
    /// A request refused for its role.
    Authorize,
    /// The audit trail itself read.
    ReadAudit,
    /// A patient's identity record or the disclosures read (they name other
    /// institutions' patient IDs and consent references).
    ReadRecord,
    /// The chain's recorded end was found not at its last event (written by
    /// the appender itself before the events it appends).
    TrailAltered,
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

impl AuditObject {
    /// One object per distinct (patient institution, patient ID, study UID):
    /// a study's many series or instances name it once. Distinct first,
    /// copied after.
    pub fn distinct<'a>(
        touched: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    ) -> Vec<Self> {
        touched
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|(institution, patient_id, study_uid)| Self {
                patient_institution: institution.to_string(),
                patient_id: patient_id.to_string(),
                study_uid: study_uid.to_string(),
            })
            .collect()
    }
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

/// Text as the trail keeps it: no control characters (a NUL, which
/// PostgreSQL refuses in text, would stop the appender), at most 256
/// characters. Values come from requests and may be anything.
fn clean(s: &mut String) {
    if s.len() > 256 || s.chars().any(char::is_control) {
        *s = s
            .chars()
            .map(|c| if c.is_control() { '\u{fffd}' } else { c })
            .take(256)
            .collect();
    }
}

impl Event {
    /// Clean every text field (the detail is JSON, which escapes control
    /// characters itself); sort and deduplicate the objects (one per patient
    /// and study).
    pub fn normalized(mut self) -> Self {
        for s in [
            &mut self.user,
            &mut self.institution,
            &mut self.role,
            &mut self.client,
        ] {
            clean(s);
        }
        for o in &mut self.objects {
            clean(&mut o.patient_institution);
            clean(&mut o.patient_id);
            clean(&mut o.study_uid);
        }
        self.objects.sort();
        self.objects.dedup();
        self
    }
}

enum Message {
    Event(Box<Event>),
    Flush(oneshot::Sender<()>),
}

/// The serde name of a unit enum variant (`"break-glass"`).
pub fn serde_name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
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
    tx: std::sync::mpsc::Sender<Message>,
    clock: Arc<Clock>,
    /// Held (shared) by each event still being completed off its request
    /// (`record_later`); `flush` takes it exclusively to wait for those.
    later: Arc<tokio::sync::RwLock<()>>,
}

/// How long an event waits for others to share its commit.
const LINGER: Duration = Duration::from_millis(20);
/// Most events written in one transaction (a backlog after an outage is
/// written in several, so the database's write lock is not held long).
const MAX_BATCH: usize = 512;
/// Empty ticks after which the appender waits on the channel again.
const QUIET_TICKS: u32 = 50;

/// Where the appender writes: its own SQLite connection, or the pool
/// (PostgreSQL) driven from its thread.
enum Target {
    Sqlite(rusqlite::Connection),
    Pool(Index, tokio::runtime::Handle),
}

impl Auditor {
    /// Start the appender thread (called on the runtime).
    /// Events are chained keyed with `key`, if given.
    pub fn start(
        index: Index,
        syslog: Option<syslog::Forwarder>,
        clock: Arc<Clock>,
        key: Option<chain::ChainKey>,
    ) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let target = match index.sqlite_path().map(crate::index::write::open_sqlite) {
            Some(Ok(conn)) => Target::Sqlite(conn),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "audit appender: no own SQLite connection; using the pool");
                Target::Pool(index, tokio::runtime::Handle::current())
            }
            None => Target::Pool(index, tokio::runtime::Handle::current()),
        };
        if let Err(e) = std::thread::Builder::new()
            .name("audit-appender".into())
            .spawn(move || append_loop(target, rx, syslog, key))
        {
            tracing::error!(error = %e, "cannot start the audit appender");
        }
        Self {
            tx,
            clock,
            later: Arc::default(),
        }
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

    /// Queue an event of `actor` whose outcome and objects `classify` finds
    /// after the request is answered (stamped now, when asked). A refused
    /// request's answer must not wait for the lookup that tells the trail
    /// "hidden" from "absent": the wait itself would tell the requester.
    pub fn record_later(
        &self,
        actor: &Actor,
        action: Action,
        detail: serde_json::Value,
        classify: impl std::future::Future<Output = (Outcome, Vec<AuditObject>)> + Send + 'static,
    ) {
        let at = crate::clock::stamp(self.clock.now());
        let (me, actor) = (self.clone(), actor.clone());
        // Taken now, so that a flush from here on waits for this event; if a
        // flush is already waiting, after it (the event is newer).
        let held = self.later.clone().try_read_owned().ok();
        let later = self.later.clone();
        tokio::spawn(async move {
            let _held = match held {
                Some(h) => h,
                None => later.read_owned().await,
            };
            use futures::FutureExt;
            let (outcome, objects) = match std::panic::AssertUnwindSafe(classify)
                .catch_unwind()
                .await
            {
                Ok(found) => found,
                Err(_) => {
                    tracing::error!(
                        "audit: finding a refused request's objects failed; recorded without them"
                    );
                    (Outcome::Failure, Vec::new())
                }
            };
            me.record(Event {
                at,
                action,
                outcome,
                user: actor.user,
                institution: actor.institution,
                role: actor.role,
                client: actor.client,
                objects,
                detail,
            });
        });
    }

    /// Wait until everything recorded so far is written.
    pub async fn flush(&self) {
        // Every event `record_later` took on before now has been queued.
        drop(self.later.write().await);
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

/// Write `batch` (then empty it). A failing write is retried — the
/// database may come back — but after a few failures the events are tried
/// one by one, so that one event the database refuses cannot hold up the
/// trail: that event alone is logged and counted as lost (a lone event
/// after some minutes of failures).
fn write_batch(
    target: &mut Target,
    batch: &mut Vec<Event>,
    syslog: Option<&syslog::Forwarder>,
    chainer: &mut chain::Chainer,
) {
    let mut append = |events: &[Event]| match target {
        Target::Sqlite(conn) => chain::append_sqlite(conn, events, chainer),
        Target::Pool(index, rt) => rt.block_on(chain::append(index, events, chainer)),
    };
    let mut delay = Duration::from_millis(50);
    let mut failures = 0;
    loop {
        match append(batch) {
            Ok(written) => {
                if let Some(f) = syslog {
                    f.send(&written);
                }
                batch.clear();
                return;
            }
            Err(e) => {
                failures += 1;
                tracing::error!(error = %e, events = batch.len(), "writing audit events failed; retrying");
            }
        }
        if failures >= 3 && batch.len() > 1 {
            // Find the event the database refuses, if it is one.
            let mut kept = Vec::new();
            for event in batch.drain(..) {
                match append(std::slice::from_ref(&event)) {
                    Ok(written) => {
                        if let Some(f) = syslog {
                            f.send(&written);
                        }
                    }
                    Err(_) => kept.push(event),
                }
            }
            if kept.len() == 1 {
                tracing::error!(event = ?kept[0], "the database refuses this audit event; it is lost");
                metrics::counter!(crate::telemetry::AUDIT_LOST).increment(1);
                return;
            }
            *batch = kept;
            if batch.is_empty() {
                return;
            }
        } else if batch.len() == 1 && failures >= 30 {
            // Alone and refused for minutes (an outage this long drops it too).
            tracing::error!(event = ?batch[0], "the database refuses this audit event; it is lost");
            metrics::counter!(crate::telemetry::AUDIT_LOST).increment(1);
            batch.clear();
            return;
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

fn append_loop(
    mut target: Target,
    rx: std::sync::mpsc::Receiver<Message>,
    syslog: Option<syslog::Forwarder>,
    key: Option<chain::ChainKey>,
) {
    let mut chainer = chain::Chainer::new(key);
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    let mut batch: Vec<Event> = Vec::new();
    let take = |m: Message, batch: &mut Vec<Event>, waiting: &mut Vec<_>| match m {
        Message::Event(e) => batch.push(*e),
        Message::Flush(done) => waiting.push(done),
    };
    while let Ok(first) = rx.recv() {
        take(first, &mut batch, &mut waiting);
        // Events linger a moment to share one commit (one fsync) with the
        // events of the requests that follow. While events keep coming the
        // appender ticks (sleeps, then drains the channel) instead of
        // waiting on it: a waiting receiver is woken by every send, and
        // that wake-up, a context switch on the request's own path, cost a
        // short search a quarter of its time. Only after a quiet second
        // does it wait again.
        let mut quiet_ticks = 0;
        while quiet_ticks < QUIET_TICKS {
            if waiting.is_empty() {
                std::thread::sleep(LINGER);
            }
            while let Ok(m) = rx.try_recv() {
                take(m, &mut batch, &mut waiting);
            }
            if batch.is_empty() && waiting.is_empty() {
                quiet_ticks += 1;
                continue;
            }
            quiet_ticks = 0;
            while !batch.is_empty() {
                let rest = batch.split_off(batch.len().min(MAX_BATCH));
                write_batch(&mut target, &mut batch, syslog.as_ref(), &mut chainer);
                batch = rest;
            }
            for done in waiting.drain(..) {
                let _ = done.send(());
            }
        }
    }
}
