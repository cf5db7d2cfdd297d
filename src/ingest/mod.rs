//! The one write path, shared by C-STORE, STOW-RS and `import`:
//! spool (hashing as bytes arrive) → parse once → check → durable store →
//! index → acknowledge. A spool that is not committed removes itself.

pub mod import;
pub mod recover;
pub mod reindex;
mod spool;
mod superseded;

pub use superseded::SUPERSEDED_SWEEP_AGE;

use spool::Received;
pub use spool::Spool;

use std::sync::Arc;
use std::time::Instant;

use crate::access::Institution;
use crate::dicom::dataset::{self, DatasetError};
use crate::dicom::part10::{self, FileMeta};
use crate::dicom::summary::{InstanceSummary, SummaryError};
use crate::index::{Index, IndexEntry, IndexError};
use crate::store::keys::InstanceKey;
use crate::store::{Placed, Store, StoreError};
use crate::telemetry;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("cannot spool the object: {0}")]
    Spool(#[source] std::io::Error),
    #[error("the data set cannot be parsed: {0}")]
    Unparsable(#[from] DatasetError),
    #[error("the data set lacks an identifying attribute: {0}")]
    Incomplete(#[from] SummaryError),
    #[error("{attribute} in the data set ({found}) differs from the command ({expected})")]
    Mismatch {
        attribute: &'static str,
        expected: String,
        found: String,
    },
    #[error("the object store failed: {0}")]
    Store(#[from] StoreError),
    #[error("the index failed: {0}")]
    Index(#[from] IndexError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl IngestError {
    /// Short, stable reason label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Spool(_) => "spool",
            Self::Unparsable(_) => "unparsable",
            Self::Incomplete(_) => "incomplete",
            Self::Mismatch { .. } => "mismatch",
            Self::Store(_) => "store",
            Self::Index(_) => "index",
            Self::Internal(_) => "internal",
        }
    }
}

/// What happened to an object that was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// First copy of this instance for its institution.
    Stored,
    /// The same bytes were already stored: nothing written.
    AlreadyPresent,
    /// Different bytes replaced the previous copy (see the Conformance Statement).
    Replaced,
}

/// The result of a successful ingest.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub outcome: Outcome,
    pub object_key: String,
    pub summary: InstanceSummary,
}

/// Shared handles of the write path.
#[derive(Clone)]
pub struct Ingest {
    store: Arc<Store>,
    index: Index,
    audit: crate::audit::Auditor,
}

impl Ingest {
    pub fn new(store: Arc<Store>, index: Index, audit: crate::audit::Auditor) -> Self {
        Self {
            store,
            index,
            audit,
        }
    }

    /// Open a spool for an object whose File Meta Information is known from
    /// the command and presentation context; its header is written first.
    pub async fn begin(
        &self,
        meta: FileMeta,
        institution: &Institution,
    ) -> Result<Spool, IngestError> {
        self.begin_in_study(meta, institution, None).await
    }

    /// `begin` for an object that must belong to `study` (STOW-RS to
    /// `/studies/{study}`): one that does not is refused before it is stored.
    pub async fn begin_in_study(
        &self,
        meta: FileMeta,
        institution: &Institution,
        study: Option<String>,
    ) -> Result<Spool, IngestError> {
        let header = part10::encode_header(&meta)
            .map_err(|e| IngestError::Internal(format!("file meta: {e}")))?;
        let path = self
            .store
            .spool_dir()
            .join(format!("{}.part", uuid::Uuid::new_v4()));
        Ok(Spool::start(
            path,
            header,
            meta,
            institution.code.clone(),
            study,
            self.store.placer(),
        ))
    }

    /// Parse, check, store durably and index a complete spool. `sender_ae` is
    /// recorded; the institution is the authenticated sender's, never the
    /// object's. The outcome is audited as a store by `actor`.
    pub async fn finish(
        &self,
        mut spool: Spool,
        institution: &Institution,
        sender_ae: Option<&str>,
        actor: &crate::audit::Actor,
    ) -> Result<Accepted, IngestError> {
        let started = Instant::now();
        let result = self.finish_inner(&mut spool, institution, sender_ae).await;
        self.audit_store(institution, actor, &result);
        match &result {
            Ok(a) => {
                metrics::histogram!(telemetry::STORE_SECONDS)
                    .record(started.elapsed().as_secs_f64());
                match a.outcome {
                    Outcome::AlreadyPresent => {
                        metrics::counter!(telemetry::INSTANCES_DUPLICATE).increment(1)
                    }
                    Outcome::Replaced => {
                        metrics::counter!(telemetry::INSTANCES_REPLACED).increment(1)
                    }
                    Outcome::Stored => {}
                }
            }
            Err(e) => {
                metrics::counter!(telemetry::STORE_FAILURES, "reason" => e.reason()).increment(1);
            }
        }
        result
    }

    fn audit_store(
        &self,
        institution: &Institution,
        actor: &crate::audit::Actor,
        result: &Result<Accepted, IngestError>,
    ) {
        use crate::audit::{Action, AuditObject, Outcome as Audited};
        let (outcome, objects, detail) = match result {
            Ok(a) => (
                Audited::Success,
                vec![AuditObject {
                    patient_institution: institution.code.clone(),
                    patient_id: a.summary.patient_id.clone(),
                    study_uid: a.summary.study_instance_uid.clone(),
                }],
                serde_json::json!({
                    "sop_instance_uid": a.summary.sop_instance_uid,
                    "result": format!("{:?}", a.outcome).to_lowercase(),
                }),
            ),
            Err(e) => (
                Audited::Failure,
                Vec::new(),
                serde_json::json!({ "error": e.to_string() }),
            ),
        };
        self.audit
            .record_by(actor, Action::Store, outcome, objects, detail);
    }

    async fn finish_inner(
        &self,
        spool: &mut Spool,
        institution: &Institution,
        sender_ae: Option<&str>,
    ) -> Result<Accepted, IngestError> {
        // The lookup needs only (institution, SOP Instance UID), known from
        // the command: run it while the worker finishes parsing and fsyncing.
        let sop_uid = spool.meta().sop_instance_uid.clone();
        let (received, existing) = tokio::join!(
            spool.complete(),
            self.index.stored_copy(&institution.code, &sop_uid),
        );
        let received = received?;
        let existing = existing?;
        let Received {
            dataset_json,
            pixels,
            summary,
            key,
            sha256,
            size,
            placed,
            hold,
        } = received;
        let mut placed = Some(placed);
        if let Some(copy) = existing.as_ref().filter(|c| c.sha256 == sha256) {
            let already_present = || Accepted {
                outcome: Outcome::AlreadyPresent,
                object_key: copy.object_key.clone(),
                summary: summary.clone(),
            };
            // Identical bytes: a local store kept the copy at the key (after
            // flushing it again, so it is durable before we say so); an S3
            // spool is dropped without an upload.
            match placed.take_if(|p| !matches!(p, Placed::ToUpload(_))) {
                Some(Placed::Renamed(flush)) => {
                    spool.disarm();
                    self.store
                        .complete(&copy.object_key, Placed::Renamed(flush))
                        .await?;
                }
                Some(_) => spool.disarm(), // durable at the key already
                None => return Ok(already_present()),
            }
            // The lookup may be stale: if another version was indexed since
            // (and this key's copy deleted, and placed again by this store),
            // the object is indexed below like any other.
            if self
                .index
                .names(&institution.code, &sop_uid, &copy.object_key)
                .await?
            {
                return Ok(already_present());
            }
        }
        // A new local object is indexed while its flush runs: the two waits
        // overlap (the index's commit and the object's fsyncs). The row is
        // listed as unconfirmed until the flush is done, so that start-up
        // after a crash can check the object. A replacement keeps the order
        // durable-then-indexed: its row would replace the durable copy's.
        let overlap = matches!(placed, Some(Placed::Renamed(_))) && existing.is_none();
        let flushing = match placed {
            Some(placed) if overlap => Some(placed),
            Some(placed) => {
                self.store.complete(&key, placed).await?;
                None
            }
            None => None, // made durable above
        };
        spool.disarm(); // the file is at its key now (or uploaded and removed)

        let entry = IndexEntry {
            institution: institution.code.clone(),
            issuer: patient_issuer(&summary, institution),
            summary: summary.clone(),
            transfer_syntax: spool.meta().transfer_syntax.clone(),
            object_key: key.clone(),
            size,
            sha256,
            sender_ae: sender_ae.map(str::to_string),
            received_at: rfc3339(chrono::Utc::now()),
            dataset_json,
            pixels,
            replaces: existing.map(|c| c.object_key),
            unconfirmed: overlap,
        };
        let (indexed, flushed) = match flushing {
            Some(placed) => {
                tokio::join!(self.index.upsert(&entry), self.store.complete(&key, placed))
            }
            None => (self.index.upsert(&entry).await, Ok(())),
        };
        if let Err(e) = flushed {
            // Not acknowledged. Nothing is removed: the file at the key may be
            // another association's identical, acknowledged copy. The row
            // stays listed as unconfirmed, and start-up checks it.
            tracing::error!(key = %key, error = %e, "the object store failed to flush an object; the store is refused");
            return Err(e.into());
        }
        // An object without an index row is an orphan that reindex adopts;
        // the reverse never happens once acknowledged: the row is confirmed
        // only after the object is durable.
        let replaced = match indexed {
            Ok(r) => r,
            Err(e @ IndexError::Conflict(_)) => {
                // Refused for good: the new copy goes (never the indexed one,
                // nor one that another store of the same bytes indexes).
                drop(hold);
                self.delete_unnamed(key, &institution.code, &summary.sop_instance_uid)
                    .await;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        if overlap {
            self.index.confirm(key.clone());
        }
        metrics::counter!(telemetry::INSTANCES_STORED).increment(1);
        metrics::counter!(telemetry::BYTES_STORED).increment(size);
        drop(hold);
        let outcome = match replaced {
            Some(old) => {
                // Only now, with the new copy durable and indexed, may the
                // old go: the one the row named just before this write
                // (another store of the instance may have come between the
                // lookup and the write).
                self.delete_unnamed(old, &institution.code, &summary.sop_instance_uid)
                    .await;
                Outcome::Replaced
            }
            None => Outcome::Stored,
        };
        Ok(Accepted {
            outcome,
            object_key: key,
            summary,
        })
    }
}

/// Check a parsed object against its command (or file meta) and name its
/// key: the part of ingest that needs no I/O, run by the spool worker.
pub(crate) fn identify(
    parsed: &dataset::ParsedObject,
    meta: &FileMeta,
    institution: &str,
    study: Option<&str>,
    sha256: &str,
) -> Result<(InstanceSummary, String), IngestError> {
    let summary = InstanceSummary::from_parsed(parsed)?;
    if let Some(expected) = study
        && summary.study_instance_uid != expected
    {
        return Err(IngestError::Mismatch {
            attribute: "Study Instance UID",
            expected: expected.to_string(),
            found: summary.study_instance_uid.clone(),
        });
    }
    for (attribute, expected, found) in [
        ("SOP Class UID", &meta.sop_class_uid, &summary.sop_class_uid),
        (
            "SOP Instance UID",
            &meta.sop_instance_uid,
            &summary.sop_instance_uid,
        ),
    ] {
        if expected != found {
            return Err(IngestError::Mismatch {
                attribute,
                expected: expected.clone(),
                found: found.clone(),
            });
        }
    }
    let key = InstanceKey::new(
        institution,
        &summary.study_instance_uid,
        &summary.series_instance_uid,
        &summary.sop_instance_uid,
        sha256,
    )
    .ok_or_else(|| IngestError::Internal("object key from validated UIDs".into()))?
    .as_key();
    Ok((summary, key))
}

/// The namespace a patient ID lives in (DESIGN §2): the Issuer of Patient ID
/// the object carries, else the sending institution's own issuer.
fn patient_issuer(summary: &InstanceSummary, institution: &Institution) -> String {
    summary
        .issuer_of_patient_id
        .clone()
        .unwrap_or_else(|| institution.issuer_of_patient_id.clone())
}

/// A time as RFC 3339 UTC, as the index keeps it.
fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
