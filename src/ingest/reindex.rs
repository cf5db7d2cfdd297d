//! `reindex`: rebuild the index from the object store alone. The store is the
//! source of truth; every object is parsed again and its digest checked
//! against its key before it is indexed.

use futures::StreamExt;

use super::{Ingest, IngestError};
use crate::access::Institutions;
use crate::dicom::dataset;
use crate::dicom::summary::InstanceSummary;
use crate::index::IndexEntry;
use crate::store::keys::InstanceKey;

/// What a reindex did.
#[derive(Debug, Default)]
pub struct ReindexReport {
    pub indexed: u64,
    /// (object key, reason) of every object left out.
    pub failed: Vec<(String, String)>,
}

impl Ingest {
    /// Clear the index and index every stored object again. When several
    /// copies of one (institution, SOP Instance UID) exist — a crash between
    /// storing a replacement and deleting its predecessor — the newest whole
    /// one wins: a newer copy that fails its check (a replacement cut off
    /// before its flush) falls back to the one before, as start-up recovery
    /// does.
    pub async fn reindex(
        &self,
        institutions: &Institutions,
        progress: bool,
    ) -> Result<ReindexReport, IngestError> {
        let mut objects = Vec::new();
        let mut listing = self.store.list_instances();
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            let key = meta.location.to_string();
            match InstanceKey::parse(&key) {
                Some(k) => objects.push((k, key, meta.last_modified, meta.size)),
                None => tracing::warn!(%key, "not an instance key; skipped"),
            }
        }
        drop(listing);
        // Newest first within each (institution, SOP Instance UID).
        objects.sort_by(|a, b| {
            (&a.0.institution, &a.0.sop_uid, std::cmp::Reverse(a.2)).cmp(&(
                &b.0.institution,
                &b.0.sop_uid,
                std::cmp::Reverse(b.2),
            ))
        });
        self.index.clear().await?;
        let bar = if progress {
            indicatif::ProgressBar::new(objects.len() as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut report = ReindexReport::default();
        // The (institution, SOP Instance UID) whose newest whole copy is indexed.
        let mut indexed: Option<(String, String)> = None;
        for (k, key, modified, size) in objects {
            bar.inc(1);
            let instance = (k.institution.clone(), k.sop_uid.clone());
            if indexed.as_ref() == Some(&instance) {
                continue; // an older copy of what is indexed already
            }
            match self
                .reindex_one(institutions, &k, &key, modified, size)
                .await
            {
                Ok(()) => {
                    report.indexed += 1;
                    indexed = Some(instance);
                }
                Err(e) => {
                    tracing::warn!(%key, error = %e, "object not indexed");
                    report.failed.push((key, e));
                }
            }
        }
        bar.finish_and_clear();
        Ok(report)
    }

    pub(super) async fn reindex_one(
        &self,
        institutions: &Institutions,
        k: &InstanceKey,
        key: &str,
        modified: chrono::DateTime<chrono::Utc>,
        size: u64,
    ) -> Result<(), String> {
        let Some(inst) = institutions.by_code(&k.institution) else {
            return Err(format!("institution {} is not configured", k.institution));
        };
        // Parsing, hashing and serializing are CPU work: off the async threads.
        let parsed = self.store.on_local_copy(key, |path| {
            let (parsed, digest) = dataset::parse_file_hashed(path).map_err(|e| e.to_string())?;
            let summary = InstanceSummary::from_parsed(&parsed).map_err(|e| e.to_string())?;
            let json = serde_json::Value::Object(parsed.json).to_string();
            Ok::<_, String>((
                parsed.meta,
                parsed.pixels,
                summary,
                json,
                hex::encode(digest),
            ))
        });
        let (meta, pixels, summary, dataset_json, sha256) = parsed
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())??;
        if !sha256.starts_with(&k.digest) {
            return Err("object content does not match the digest in its key".into());
        }
        let entry = IndexEntry {
            institution: k.institution.clone(),
            issuer: super::patient_issuer(&summary, &inst),
            transfer_syntax: meta.transfer_syntax,
            object_key: key.to_string(),
            size,
            sha256,
            sender_ae: meta.source_ae_title,
            received_at: super::rfc3339(modified),
            dataset_json,
            pixels,
            replaces: None,
            unconfirmed: false,
            summary,
        };
        self.index.upsert(&entry).await.map_err(|e| e.to_string())?;
        Ok(())
    }
}
