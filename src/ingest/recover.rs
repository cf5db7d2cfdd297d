//! Start-up check of objects that were indexed while their flush still ran
//! (see `Ingest::finish`): a crash in that moment can leave an index row
//! whose object never reached the disk whole. Such an object was never
//! acknowledged; its rows go, and so does whatever of it is on disk. Objects
//! that did reach the disk whole are simply confirmed.

use crate::dicom::dataset;
use crate::index::Unconfirmed;

use super::{Ingest, IngestError};

/// What the check found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Whole on disk: confirmed.
    pub confirmed: usize,
    /// Missing or not whole: index rows and file removed.
    pub rolled_back: Vec<String>,
}

impl Ingest {
    /// Check every unconfirmed object against the digest its index row
    /// holds; run before the server takes any request.
    pub async fn recover_unconfirmed(&self) -> Result<Recovered, IngestError> {
        let mut report = Recovered::default();
        for u in self.index.unconfirmed().await? {
            if self.is_whole(&u).await {
                self.index.confirm_now(&u.object_key).await?;
                report.confirmed += 1;
                continue;
            }
            tracing::warn!(
                key = %u.object_key,
                "an object indexed before a crash did not reach the disk whole; its index rows are removed (it was never acknowledged)"
            );
            self.index.roll_back(&u).await?;
            self.store.delete(&u.object_key).await?;
            report.rolled_back.push(u.object_key);
        }
        Ok(report)
    }

    /// Whether the object is on disk with the digest of its index row. A
    /// listing whose row no longer names the object (`sha256` empty) has
    /// nothing to check.
    async fn is_whole(&self, u: &Unconfirmed) -> bool {
        if u.sha256.is_empty() {
            return true;
        }
        let Ok((path, temporary)) = self.store.fetch_to_path(&u.object_key).await else {
            return false;
        };
        let p = path.clone();
        let digest = tokio::task::spawn_blocking(move || dataset::parse_file_hashed(&p))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|(_, d)| hex::encode(d));
        if temporary {
            let _ = tokio::fs::remove_file(&path).await;
        }
        digest.as_deref() == Some(u.sha256.as_str())
    }
}
