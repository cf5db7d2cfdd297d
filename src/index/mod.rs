//! The search index: one schema on SQLite (embedded default) or PostgreSQL
//! (shared by several nodes), through sqlx's `Any` driver. Everything here can
//! be rebuilt from the object store (`reindex`).

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor, Row};

use crate::config::IndexConfig;
use crate::dicom::dataset::PixelLayout;
use crate::dicom::summary::InstanceSummary;

pub mod access;
pub mod metadata;
mod read;
pub mod search;
pub(crate) mod write;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("index migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot create the index directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("the index writer has stopped")]
    WriterGone,
    #[error("index database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The object would put a study under another patient, or a series
    /// under another study: refused, so that what a patient's consent opens
    /// is that patient's only.
    #[error("{0}")]
    Conflict(String),
}

impl IndexError {
    /// A statement that returns its row's id returned none.
    pub(crate) fn is_no_row(&self) -> bool {
        matches!(
            self,
            Self::Sqlite(rusqlite::Error::QueryReturnedNoRows)
                | Self::Database(sqlx::Error::RowNotFound)
        )
    }
}

/// Which records a transaction changes (PostgreSQL advisory lock keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordLock {
    /// Links, disclosures, grants, and the access rows derived from them.
    Consent = 7_461_666,
    /// The audit chain.
    Audit = 7_461_667,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// Everything the index keeps about one stored instance.
#[derive(Debug, Clone)]
pub struct IndexEntry {
    pub institution: String,
    /// The patient namespace: Issuer of Patient ID as in the object, or the
    /// institution's own issuer when the object has none.
    pub issuer: String,
    pub summary: InstanceSummary,
    pub transfer_syntax: String,
    pub object_key: String,
    pub size: u64,
    pub sha256: String,
    pub sender_ae: Option<String>,
    /// RFC 3339, UTC.
    pub received_at: String,
    pub dataset_json: String,
    pub pixels: Option<PixelLayout>,
    /// The key of the indexed copy ingest's lookup found before storing
    /// (the write itself returns the copy it really supersedes: another
    /// store of the instance may commit in between).
    pub replaces: Option<String>,
    /// The object's flush is still running: the row is listed in
    /// `unconfirmed_object` until `Index::confirm`.
    pub unconfirmed: bool,
}

/// An object indexed before its flush finished and not yet confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unconfirmed {
    pub object_key: String,
    pub institution: String,
    pub sop_uid: String,
    /// SHA-256 of the data set bytes, as indexed.
    pub sha256: String,
}

/// The stored copy of an instance that the index points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCopy {
    pub object_key: String,
    pub sha256: String,
}

#[derive(Clone)]
pub struct Index {
    pool: AnyPool,
    engine: Engine,
    /// The database file, on SQLite.
    sqlite_path: Option<std::path::PathBuf>,
    reader: read::Reader,
    writer: write::Writer,
}

impl Index {
    /// Connect (creating a SQLite file if needed) and run migrations.
    pub async fn connect(cfg: &IndexConfig) -> Result<Self, IndexError> {
        sqlx::any::install_default_drivers();
        let engine = if cfg.url.starts_with("sqlite:") {
            Engine::Sqlite
        } else {
            Engine::Postgres
        };
        let mut url = cfg.url.clone();
        let mut sqlite_path = None;
        if engine == Engine::Sqlite {
            let path = url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:")
                .split('?')
                .next()
                .unwrap_or_default()
                .to_string();
            if let Some(dir) = std::path::Path::new(&path).parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir)?;
            }
            if !url.contains('?') {
                url.push_str("?mode=rwc");
            }
            sqlite_path = Some(std::path::PathBuf::from(path));
        }
        let opts = AnyConnectOptions::from_str(&url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(cfg.max_connections.max(1))
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if engine == Engine::Sqlite {
                        // FULL: a commit is on disk before a store is acknowledged.
                        conn.execute("PRAGMA journal_mode=WAL").await?;
                        conn.execute("PRAGMA synchronous=FULL").await?;
                        conn.execute("PRAGMA foreign_keys=ON").await?;
                        conn.execute("PRAGMA busy_timeout=30000").await?;
                        // LIKE as on PostgreSQL: case-sensitive (and index-usable);
                        // case-insensitive matching goes through the upper-cased keys.
                        conn.execute("PRAGMA case_sensitive_like=ON").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(opts)
            .await?;
        match engine {
            Engine::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
            Engine::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
        }
        // Planner statistics from the start: without them SQLite walks a
        // whole institution's studies in id order for a one-patient search
        // (it cannot know that one institution holds every study).
        // PostgreSQL's autovacuum keeps them fresh later; the writer
        // refreshes SQLite's as the index grows. Complete, not sampled:
        // `analysis_limit` made institution and modality look 20-40 times
        // more selective than they are (1,001 instead of 40,000 studies per
        // institution at 1,000,000 instances), which sent date-range searches
        // down the wrong index; a full ANALYZE reads each index once (0.6 s
        // at 1,000,000 instances).
        match engine {
            Engine::Sqlite => {
                sqlx::raw_sql("PRAGMA analysis_limit=0; ANALYZE;")
                    .execute(&pool)
                    .await?;
            }
            Engine::Postgres => {
                sqlx::raw_sql("ANALYZE patient, study, series, instance, study_access")
                    .execute(&pool)
                    .await?;
            }
        }
        let reader = match &sqlite_path {
            Some(p) => {
                read::Reader::Sqlite(std::sync::Arc::new(read::SqliteReaders::new(p.clone())))
            }
            // PostgreSQL reads through its own driver: the Any driver
            // converts every row and its column list on the way.
            None => read::Reader::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(cfg.max_connections.max(1))
                    .acquire_timeout(Duration::from_secs(30))
                    .connect(&url)
                    .await?,
            ),
        };
        let writer = write::Writer::start(pool.clone(), engine, sqlite_path.clone())?;
        Ok(Self {
            pool,
            engine,
            sqlite_path,
            reader,
            writer,
        })
    }

    /// A transaction for the records kept beside the index (links,
    /// disclosures, grants, audit). Such transactions of one `lock` run one at
    /// a time across every node: SQLite takes its write lock up front (one
    /// writer at all), PostgreSQL an advisory lock per kind. The consent lock
    /// also excludes index writer batches (which take it shared), so a
    /// study written while links change gets the access rows of the links
    /// as they are after the change.
    pub async fn begin_records(
        &self,
        lock: RecordLock,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, IndexError> {
        match self.engine {
            Engine::Sqlite => Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?),
            Engine::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT 1 FROM (SELECT pg_advisory_xact_lock({})) l",
                    lock as i64
                )))
                .execute(&mut *tx)
                .await?;
                Ok(tx)
            }
        }
    }

    /// The SQLite database file (`None` on PostgreSQL), for components that
    /// keep a connection of their own.
    pub fn sqlite_path(&self) -> Option<&std::path::Path> {
        self.sqlite_path.as_deref()
    }

    /// The pool, for reads of the records kept beside the index.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Readiness: the database answers.
    pub async fn check(&self) -> Result<(), IndexError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// The copy currently indexed for (institution, SOP Instance UID).
    pub async fn stored_copy(
        &self,
        institution: &str,
        sop_uid: &str,
    ) -> Result<Option<StoredCopy>, IndexError> {
        // Through the reader: on SQLite its own connections answer at once,
        // where sqlx's driver hands every statement to a worker thread (a
        // few wake-ups per stored object).
        let rows = self
            .reader
            .fetch(
                "SELECT object_key, sha256 FROM instance WHERE institution = $1 AND sop_uid = $2"
                    .into(),
                vec![
                    read::Bind::Text(institution.into()),
                    read::Bind::Text(sop_uid.into()),
                ],
            )
            .await?;
        Ok(rows.first().map(|r| StoredCopy {
            object_key: r.text(0),
            sha256: r.text(1),
        }))
    }

    /// The precomputed DICOM JSON and frame ranges of an instance.
    pub async fn instance_meta(
        &self,
        institution: &str,
        sop_uid: &str,
    ) -> Result<Option<(String, Option<PixelLayout>)>, IndexError> {
        let row = sqlx::query("SELECT dataset_json, pixel_layout FROM instance WHERE institution = $1 AND sop_uid = $2")
            .bind(institution)
            .bind(sop_uid)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| {
            let layout: Option<String> = r.get(1);
            (r.get(0), layout.and_then(|l| serde_json::from_str(&l).ok()))
        }))
    }

    /// Run a QIDO-RS search under `scope`.
    pub async fn search(
        &self,
        s: &search::Search,
        scope: &search::Scope,
    ) -> Result<search::Page, IndexError> {
        search::search(&self.reader, s, scope).await
    }

    /// The query plan of a search (see `search::explain`).
    pub async fn explain(
        &self,
        s: &search::Search,
        scope: &search::Scope,
    ) -> Result<Vec<String>, IndexError> {
        search::explain(&self.reader, s, scope).await
    }

    /// The visible instances of a study, series or instance, in order.
    pub async fn instances(
        &self,
        scope: &search::Scope,
        study_uid: &str,
        series_uid: Option<&str>,
        sop_uid: Option<&str>,
    ) -> Result<Vec<search::StoredInstance>, IndexError> {
        search::instances(&self.reader, scope, study_uid, series_uid, sop_uid).await
    }

    /// The studies and instances at a resource that `scope` shows, in order:
    /// a metadata answer's (and, unrestricted, what a refused request named).
    pub async fn metadata_list(
        &self,
        scope: &search::Scope,
        study_uid: &str,
        series_uid: Option<&str>,
        sop_uid: Option<&str>,
    ) -> Result<metadata::MetadataList, IndexError> {
        metadata::metadata_list(&self.reader, scope, study_uid, series_uid, sop_uid).await
    }

    /// The patients the active break-glass grants of a user open.
    pub async fn granted_patients(
        &self,
        institution: &str,
        user: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<search::GrantedPatient>, IndexError> {
        search::granted_patients(&self.reader, institution, user, now).await
    }

    /// Stored DICOM JSON of one instance per study / series / instance id.
    pub async fn dataset_json(
        &self,
        level: search::Level,
        ids: &[i64],
    ) -> Result<std::collections::HashMap<i64, String>, IndexError> {
        search::representative_json(&self.reader, level, ids).await
    }

    /// Number of indexed instances.
    pub async fn count_instances(&self) -> Result<i64, IndexError> {
        Ok(sqlx::query("SELECT COUNT(*) FROM instance")
            .fetch_one(&self.pool)
            .await?
            .get(0))
    }

    /// Insert or replace one instance and update its patient, study and series.
    /// Returns once the change is committed (durably: SQLite runs with
    /// `synchronous=FULL`), with the key of the copy it replaced, if any.
    /// Concurrent calls share one transaction and one commit (group commit).
    pub async fn upsert(&self, e: &IndexEntry) -> Result<Option<String>, IndexError> {
        self.writer.upsert(e.clone()).await
    }

    /// The object of an entry written `unconfirmed` is durable: its listing
    /// goes with the writer's next batch (no commit of its own on the way).
    pub fn confirm(&self, object_key: String) {
        self.writer.confirm(object_key);
    }

    /// Write the confirmations still waiting (at shutdown), so that the next
    /// start has nothing to check.
    pub async fn settle(&self) {
        self.writer.sweep().await;
    }

    /// The objects indexed before their flush finished and not confirmed
    /// since: after a crash, the ones to check.
    pub async fn unconfirmed(&self) -> Result<Vec<Unconfirmed>, IndexError> {
        let rows = sqlx::query(
            "SELECT u.object_key, u.institution, u.sop_uid, COALESCE(i.sha256, '') \
             FROM unconfirmed_object u LEFT JOIN instance i \
             ON i.institution = u.institution AND i.sop_uid = u.sop_uid \
             AND i.object_key = u.object_key ORDER BY u.object_key",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| Unconfirmed {
                object_key: r.get(0),
                institution: r.get(1),
                sop_uid: r.get(2),
                sha256: r.get(3),
            })
            .collect())
    }

    /// Undo the index rows of an object that never became durable: its
    /// instance row (if it still names this object), then its series, study
    /// (with the study's access rows) and patient if nothing else is left in
    /// them, and its `unconfirmed_object` listing. Values the object wrote
    /// into parents that stay (a study's description, say) are not undone:
    /// the sender, never acknowledged, sends the object again.
    pub async fn roll_back(&self, u: &Unconfirmed) -> Result<(), IndexError> {
        self.writer.forget_parents();
        // Apart from consent changes, which write the access rows of the
        // study this may remove (another node's, on a shared PostgreSQL).
        let mut tx = self.begin_records(RecordLock::Consent).await?;
        let series: Option<i64> = sqlx::query(
            "DELETE FROM instance WHERE institution = $1 AND sop_uid = $2 AND object_key = $3 \
             RETURNING series_ref",
        )
        .bind(&u.institution)
        .bind(&u.sop_uid)
        .bind(&u.object_key)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| r.get(0));
        let study: Option<i64> = match series {
            Some(id) => sqlx::query(
                "DELETE FROM series WHERE id = $1 AND NOT EXISTS \
                 (SELECT 1 FROM instance WHERE series_ref = $1) RETURNING study_ref",
            )
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.get(0)),
            None => None,
        };
        let patient: Option<i64> = match study {
            Some(id)
                if sqlx::query("SELECT 1 FROM series WHERE study_ref = $1 LIMIT 1")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_none() =>
            {
                sqlx::query("DELETE FROM study_access WHERE study_ref = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM study WHERE id = $1 RETURNING patient_ref")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(|r| r.get(0))
            }
            _ => None,
        };
        if let Some(id) = patient {
            sqlx::query(
                "DELETE FROM patient WHERE id = $1 AND NOT EXISTS \
                 (SELECT 1 FROM study WHERE patient_ref = $1)",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(write::CONFIRM_SQL)
            .bind(&u.object_key)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Forget an unconfirmed listing whose object proved durable and whole.
    pub async fn confirm_now(&self, object_key: &str) -> Result<(), IndexError> {
        sqlx::query(write::CONFIRM_SQL)
            .bind(object_key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Superseded copies not deleted yet, listed at or before `cutoff`
    /// (RFC 3339): (key, institution, SOP Instance UID), oldest first.
    pub async fn superseded(
        &self,
        cutoff: &str,
    ) -> Result<Vec<(String, String, String)>, IndexError> {
        Ok(sqlx::query(
            "SELECT object_key, institution, sop_uid FROM superseded_object \
             WHERE listed_at <= $1 ORDER BY listed_at, object_key",
        )
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
    }

    /// A superseded copy is deleted: no longer listed.
    pub async fn forget_superseded(&self, object_key: &str) -> Result<(), IndexError> {
        sqlx::query("DELETE FROM superseded_object WHERE object_key = $1")
            .bind(object_key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A superseded copy is current again: no longer listed, if the row of
    /// its instance still names it (else another version replaced it since,
    /// and the listing is that replacement's).
    pub async fn forget_named(
        &self,
        object_key: &str,
        institution: &str,
        sop_uid: &str,
    ) -> Result<(), IndexError> {
        sqlx::query(
            "DELETE FROM superseded_object WHERE object_key = $1 AND EXISTS \
             (SELECT 1 FROM instance WHERE institution = $2 AND sop_uid = $3 AND object_key = $1)",
        )
        .bind(object_key)
        .bind(institution)
        .bind(sop_uid)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Whether the row of instance (`institution`, `sop_uid`) names `object_key`.
    pub async fn names(
        &self,
        institution: &str,
        sop_uid: &str,
        object_key: &str,
    ) -> Result<bool, IndexError> {
        // Through the reader, as `stored_copy`: every identical resend asks.
        let rows = self
            .reader
            .fetch(
                "SELECT 1 FROM instance WHERE institution = $1 AND sop_uid = $2 \
                 AND object_key = $3"
                    .into(),
                vec![
                    read::Bind::Text(institution.into()),
                    read::Bind::Text(sop_uid.into()),
                    read::Bind::Text(object_key.into()),
                ],
            )
            .await?;
        Ok(!rows.is_empty())
    }
}

impl Index {
    /// Drop every index row (not the records of links, disclosures or audit,
    /// which live in their own tables): the first step of `reindex`.
    pub async fn clear(&self) -> Result<(), IndexError> {
        self.writer.forget_parents();
        let mut tx = self.pool.begin().await?;
        for table in [
            "unconfirmed_object",
            "study_access",
            "instance",
            "series",
            "study",
            "patient",
        ] {
            sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table}")))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A canonical dump of the index content (no surrogate ids, no receive
    /// times), ordered, one `column=value|…` line per instance, for comparing
    /// an index with its rebuild.
    pub async fn fingerprint(&self) -> Result<Vec<String>, IndexError> {
        // What an instance's rows say, each as text, but what a rebuild may
        // rightly tell otherwise: the receipt time (reindex takes the file's),
        // the study's content version (a clock for ETags, counting writes),
        // and the bookkeeping of objects to delete or to confirm.
        const COLUMNS: &[&str] = &[
            "p.institution",
            "p.issuer",
            "p.patient_id",
            "p.name_alphabetic",
            "p.name_ideographic",
            "p.name_phonetic",
            "p.name_alphabetic_key",
            "p.name_ideographic_key",
            "p.name_phonetic_key",
            "p.birth_date",
            "p.sex",
            "p.other_patient_ids",
            "st.study_uid",
            "st.study_date",
            "st.study_time",
            "st.accession_number",
            "st.study_id",
            "st.description",
            "st.referring_alphabetic",
            "st.referring_ideographic",
            "st.referring_phonetic",
            "st.referring_alphabetic_key",
            "st.referring_ideographic_key",
            "st.referring_phonetic_key",
            "st.num_series",
            "st.num_instances",
            "se.series_uid",
            "se.modality",
            "se.series_number",
            "se.num_instances",
            "se.description",
            "se.series_date",
            "se.series_time",
            "se.pps_start_date",
            "se.pps_start_time",
            "se.body_part",
            "se.request_attributes",
            "i.sop_uid",
            "i.sop_class_uid",
            "i.instance_number",
            "i.transfer_syntax",
            "i.object_key",
            "i.size",
            "i.sha256",
            "i.number_of_frames",
            "i.rows",
            "i.columns",
            "i.bits_allocated",
            "i.sender_ae",
            "i.dataset_json",
            "i.pixel_layout",
        ];
        let select = COLUMNS
            .iter()
            .map(|c| format!("COALESCE(CAST({c} AS TEXT), '')"))
            .collect::<Vec<_>>()
            .join(", ");
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {select} \
             FROM instance i JOIN series se ON se.id = i.series_ref JOIN study st ON st.id = se.study_ref \
             JOIN patient p ON p.id = st.patient_ref \
             ORDER BY i.institution, i.sop_uid"
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (0..COLUMNS.len())
                    .map(|k| format!("{}={}", COLUMNS[k], r.get::<String, _>(k)))
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect())
    }

    /// Study Descriptions of a patient's studies, for tests and tools.
    pub async fn study_descriptions(
        &self,
        institution: &str,
        patient_id: &str,
    ) -> Result<Vec<String>, IndexError> {
        let rows = sqlx::query(
            "SELECT COALESCE(s.description, '') FROM study s JOIN patient p ON p.id = s.patient_ref \
             WHERE p.institution = $1 AND p.patient_id = $2 ORDER BY s.study_uid",
        )
        .bind(institution)
        .bind(patient_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Index-level view of a patient's name groups, for tests and tools.
    pub async fn patient_names(
        &self,
        institution: &str,
        patient_id: &str,
    ) -> Result<Vec<[Option<String>; 3]>, IndexError> {
        let rows = sqlx::query(
            "SELECT name_alphabetic, name_ideographic, name_phonetic FROM patient \
             WHERE institution = $1 AND patient_id = $2 ORDER BY issuer",
        )
        .bind(institution)
        .bind(patient_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| [r.get(0), r.get(1), r.get(2)])
            .collect())
    }
}
