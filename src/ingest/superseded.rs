//! Deleting the copies replacements superseded. Keys name content, so a
//! superseded copy's key may be the key of a store of the same bytes under
//! way: a copy is deleted only while no store of this process holds its key
//! (`Store::delete_unless_in_use`) and no index row names it again. Each is
//! listed in `superseded_object` by the write that superseded it, and
//! unlisted once deleted or named again; a deletion cut off (a stop, a
//! crash, a failing store) is left to `Ingest::sweep_superseded`.

use crate::index::Index;
use crate::store::{Store, Unused};

use super::{Ingest, IngestError};

/// Listed superseded copies younger than this are left to the store that
/// listed them (on another node, a store of the same bytes may be under way,
/// which this node cannot see).
pub const SUPERSEDED_SWEEP_AGE: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// How often, and how far apart, `Ingest::delete_unnamed` asks again while
/// a store of the same bytes is under way (a store takes milliseconds).
const DELETE_ATTEMPTS: usize = 600;
const DELETE_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

impl Ingest {
    /// Delete the copy at `key` of instance (`institution`, `sop_uid`),
    /// which no index row names any more: at once, or, while a store of this
    /// process is placing the same bytes there, in the background once that
    /// store is done.
    pub(super) async fn delete_unnamed(&self, key: String, institution: &str, sop_uid: &str) {
        let copy = Copy {
            store: self.store.clone(),
            index: self.index.clone(),
            key,
            institution: institution.to_string(),
            sop_uid: sop_uid.to_string(),
        };
        if copy.attempt().await {
            return;
        }
        tokio::spawn(async move {
            for _ in 0..DELETE_ATTEMPTS {
                tokio::time::sleep(DELETE_RETRY).await;
                if copy.attempt().await {
                    return;
                }
            }
            tracing::warn!(key = %copy.key, "a copy no row names stayed in use and was not deleted (a listed one is swept again later)");
        });
    }

    /// Delete the superseded copies listed more than `older_than` ago (a
    /// deletion a stop or a crash cut off, or one that failed), those no row
    /// names again. One that cannot be deleted now is left for the next
    /// sweep; the others go on. Returns how many were deleted.
    pub async fn sweep_superseded(&self, older_than: chrono::TimeDelta) -> usize {
        let cutoff = super::rfc3339(chrono::Utc::now() - older_than);
        let listed = match self.index.superseded(&cutoff).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "superseded copies not listed; the next sweep tries again");
                return 0;
            }
        };
        let mut deleted = 0;
        for (key, institution, sop_uid) in listed {
            match delete(&self.store, &self.index, &key, &institution, &sop_uid).await {
                Ok(done) => deleted += usize::from(done == Unused::Deleted),
                Err(e) => {
                    tracing::warn!(%key, error = %e, "a superseded copy was not deleted; the next sweep tries again");
                }
            }
        }
        deleted
    }
}

/// A copy `delete_unnamed` deletes, with what it needs in the background.
struct Copy {
    store: std::sync::Arc<Store>,
    index: Index,
    key: String,
    institution: String,
    sop_uid: String,
}

impl Copy {
    /// Whether it is settled: deleted, named again, or failed (left to the
    /// sweep); not while a store of the same bytes holds its key.
    async fn attempt(&self) -> bool {
        match delete(
            &self.store,
            &self.index,
            &self.key,
            &self.institution,
            &self.sop_uid,
        )
        .await
        {
            Ok(done) => done != Unused::InUse,
            Err(e) => {
                tracing::warn!(key = %self.key, error = %e, "a copy no row names was not deleted (a listed one is swept again later)");
                true
            }
        }
    }
}

/// Delete the superseded copy `key` unless in use or named again, and
/// unlist it accordingly.
async fn delete(
    store: &Store,
    index: &Index,
    key: &str,
    institution: &str,
    sop_uid: &str,
) -> Result<Unused, IngestError> {
    let done = store
        .delete_unless_in_use(
            key,
            || async { Ok::<_, IngestError>(index.names(institution, sop_uid, key).await?) },
            || async { Ok::<_, IngestError>(index.forget_superseded(key).await?) },
        )
        .await?;
    if done == Unused::Named {
        index.forget_named(key, institution, sop_uid).await?;
    }
    Ok(done)
}
