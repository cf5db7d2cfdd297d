//! Start-up check of objects that were indexed while their flush still ran
//! (see `Ingest::finish`): a crash in that moment can leave an index row
//! whose object never reached the disk whole. Such an object was never
//! acknowledged; its rows go, and so does whatever of it is on disk. Objects
//! that are whole are flushed (the page cache may have outlived the process,
//! not yet the disk) and confirmed.

use futures::StreamExt;

use crate::access::Institutions;
use crate::dicom::dataset::{self, DatasetError};
use crate::index::Unconfirmed;
use crate::store::keys::InstanceKey;

use super::{Ingest, IngestError};

/// What the check found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Whole: flushed and confirmed.
    pub confirmed: usize,
    /// Missing or not whole: index rows and file removed.
    pub rolled_back: Vec<String>,
    /// Earlier versions of rolled-back instances indexed again.
    pub restored: Vec<String>,
}

impl Ingest {
    /// Check every unconfirmed object against the digest its index row
    /// holds; run before the server takes any request. An object that cannot
    /// be read for another reason than being missing or cut short stops the
    /// start (nothing is removed on a guess).
    pub async fn recover_unconfirmed(
        &self,
        institutions: &Institutions,
    ) -> Result<Recovered, IngestError> {
        let mut report = Recovered::default();
        for u in self.index.unconfirmed().await? {
            if self.is_whole(&u).await? {
                if !u.sha256.is_empty() {
                    self.store.flush_existing(&u.object_key).await?;
                }
                self.index.confirm_now(&u.object_key).await?;
                report.confirmed += 1;
                continue;
            }
            tracing::warn!(
                key = %u.object_key,
                "an object indexed before a crash did not reach the disk whole; its index rows are removed (it was never acknowledged)"
            );
            // The file first: were the rows removed first, a crash in between
            // would leave a damaged file at a key that nothing lists.
            self.store.delete(&u.object_key).await?;
            self.index.roll_back(&u).await?;
            if let Some(key) = self.restore_previous(institutions, &u.object_key).await? {
                report.restored.push(key);
            }
            report.rolled_back.push(u.object_key);
        }
        Ok(report)
    }

    /// The rolled-back row may have replaced the row of an earlier version
    /// of the instance stored at the same moment (both found none before
    /// them): index the newest whole object of that instance left beside it,
    /// as `reindex` would.
    async fn restore_previous(
        &self,
        institutions: &Institutions,
        rolled_back: &str,
    ) -> Result<Option<String>, IngestError> {
        let (Some(gone), Some((dir, _))) = (
            InstanceKey::parse(rolled_back),
            rolled_back.rsplit_once('/'),
        ) else {
            return Ok(None);
        };
        let mut others = Vec::new();
        let mut listing = self.store.list_under(dir);
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            let key = meta.location.to_string();
            if let Some(k) = InstanceKey::parse(&key)
                && k.institution == gone.institution
                && k.sop_uid == gone.sop_uid
                && key != rolled_back
            {
                others.push((k, key, meta.last_modified, meta.size));
            }
        }
        drop(listing);
        others.sort_by_key(|o| std::cmp::Reverse(o.2));
        for (k, key, modified, size) in others {
            match self
                .reindex_one(institutions, &k, &key, modified, size)
                .await
            {
                Ok(()) => return Ok(Some(key)),
                Err(e) => {
                    tracing::warn!(%key, error = %e, "an earlier version is not whole either")
                }
            }
        }
        Ok(None)
    }

    /// Whether the object is on disk with the digest of its index row. A
    /// listing whose row no longer names the object (`sha256` empty) has
    /// nothing to check.
    async fn is_whole(&self, u: &Unconfirmed) -> Result<bool, IngestError> {
        if u.sha256.is_empty() {
            return Ok(true);
        }
        let digest = match self
            .store
            .on_local_copy(&u.object_key, dataset::data_set_digest)
            .await
        {
            Ok(d) => d.map_err(|e| IngestError::Internal(e.to_string()))?,
            Err(crate::store::StoreError::Backend(object_store::Error::NotFound { .. })) => {
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        match digest {
            Ok(digest) => Ok(digest == u.sha256),
            Err(DatasetError::Io(e))
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                Err(IngestError::Store(e.into()))
            }
            // Missing, cut short or not a whole data set.
            Err(_) => Ok(false),
        }
    }
}
