//! The search index: one schema on SQLite (embedded default) or PostgreSQL
//! (shared by several nodes), through sqlx's `Any` driver. Everything here can
//! be rebuilt from the object store (`reindex`).

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor, Row};
use tokio::sync::{mpsc, oneshot};

use crate::config::IndexConfig;
use crate::dicom::dataset::PixelLayout;
use crate::dicom::summary::InstanceSummary;

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
}

/// The stored copy of an instance that the index points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCopy {
    pub object_key: String,
    pub sha256: String,
}

/// Most index writes committed in one transaction (group commit).
const MAX_BATCH: usize = 64;

/// One queued write and where its result goes.
struct WriteJob {
    entry: IndexEntry,
    done: oneshot::Sender<Result<Option<String>, IndexError>>,
}

#[derive(Clone)]
pub struct Index {
    pool: AnyPool,
    engine: Engine,
    writer: mpsc::Sender<WriteJob>,
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
        let (writer, jobs) = mpsc::channel(MAX_BATCH * 4);
        tokio::spawn(write_loop(pool.clone(), engine, jobs));
        Ok(Self {
            pool,
            engine,
            writer,
        })
    }

    pub fn engine(&self) -> Engine {
        self.engine
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
        let row = sqlx::query(
            "SELECT object_key, sha256 FROM instance WHERE institution = $1 AND sop_uid = $2",
        )
        .bind(institution)
        .bind(sop_uid)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| StoredCopy {
            object_key: r.get(0),
            sha256: r.get(1),
        }))
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
        let (done, result) = oneshot::channel();
        self.writer
            .send(WriteJob {
                entry: e.clone(),
                done,
            })
            .await
            .map_err(|_| IndexError::WriterGone)?;
        result.await.map_err(|_| IndexError::WriterGone)?
    }
}

/// The single index writer: takes whatever writes are queued (up to
/// `MAX_BATCH`), commits them in one transaction, and answers each. If a batch
/// fails, its writes are retried one by one so one bad entry fails alone.
async fn write_loop(pool: AnyPool, engine: Engine, mut jobs: mpsc::Receiver<WriteJob>) {
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let entries: Vec<&IndexEntry> = batch.iter().map(|j| &j.entry).collect();
        match commit_batch(&pool, engine, &entries).await {
            Ok(results) => {
                for (job, r) in batch.into_iter().zip(results) {
                    let _ = job.done.send(Ok(r));
                }
            }
            Err(e) if batch.len() == 1 => {
                let job = batch.pop().expect("one job");
                let _ = job.done.send(Err(e));
            }
            Err(_) => {
                for job in batch {
                    let r = commit_batch(&pool, engine, &[&job.entry])
                        .await
                        .map(|mut v| v.pop().flatten());
                    let _ = job.done.send(r);
                }
            }
        }
    }
}

async fn commit_batch(
    pool: &AnyPool,
    engine: Engine,
    entries: &[&IndexEntry],
) -> Result<Vec<Option<String>>, IndexError> {
    let mut tx = match engine {
        // IMMEDIATE takes the write lock up front, so other writers (another
        // node's reindex, tools) queue on busy_timeout instead of failing a
        // lock upgrade.
        Engine::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await?,
        Engine::Postgres => pool.begin().await?,
    };
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        out.push(upsert_in(&mut tx, e).await?);
    }
    tx.commit().await?;
    Ok(out)
}

async fn upsert_in(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    e: &IndexEntry,
) -> Result<Option<String>, IndexError> {
    {
        let s = &e.summary;
        let other_ids = if s.other_patient_ids.is_empty() {
            None
        } else {
            Some(serde_json::to_string(&s.other_patient_ids).expect("serializable"))
        };
        let patient: i64 = sqlx::query(
            "INSERT INTO patient (institution, issuer, patient_id, name_alphabetic, name_ideographic, \
             name_phonetic, birth_date, sex, other_patient_ids) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9) \
             ON CONFLICT (institution, issuer, patient_id) DO UPDATE SET \
             name_alphabetic = excluded.name_alphabetic, name_ideographic = excluded.name_ideographic, \
             name_phonetic = excluded.name_phonetic, birth_date = excluded.birth_date, sex = excluded.sex, \
             other_patient_ids = excluded.other_patient_ids RETURNING id",
        )
        .bind(&e.institution)
        .bind(&e.issuer)
        .bind(&s.patient_id)
        .bind(&s.patient_name.alphabetic)
        .bind(&s.patient_name.ideographic)
        .bind(&s.patient_name.phonetic)
        .bind(&s.patient_birth_date)
        .bind(&s.patient_sex)
        .bind(other_ids)
        .fetch_one(&mut **tx)
        .await?
        .get(0);
        let study: i64 = sqlx::query(
            "INSERT INTO study (patient_ref, institution, study_uid, study_date, study_time, accession_number, \
             study_id, description, referring_alphabetic, referring_ideographic, referring_phonetic) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11) \
             ON CONFLICT (institution, study_uid) DO UPDATE SET patient_ref = excluded.patient_ref, \
             study_date = excluded.study_date, study_time = excluded.study_time, \
             accession_number = excluded.accession_number, study_id = excluded.study_id, \
             description = excluded.description, referring_alphabetic = excluded.referring_alphabetic, \
             referring_ideographic = excluded.referring_ideographic, \
             referring_phonetic = excluded.referring_phonetic RETURNING id",
        )
        .bind(patient)
        .bind(&e.institution)
        .bind(&s.study_instance_uid)
        .bind(&s.study_date)
        .bind(&s.study_time)
        .bind(&s.accession_number)
        .bind(&s.study_id)
        .bind(&s.study_description)
        .bind(&s.referring_physician_name.alphabetic)
        .bind(&s.referring_physician_name.ideographic)
        .bind(&s.referring_physician_name.phonetic)
        .fetch_one(&mut **tx)
        .await?
        .get(0);
        let request = s.request_attributes.as_ref().map(|v| v.to_string());
        let series: i64 = sqlx::query(
            "INSERT INTO series (study_ref, institution, series_uid, modality, series_number, description, \
             series_date, series_time, pps_start_date, pps_start_time, body_part, request_attributes) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12) \
             ON CONFLICT (institution, series_uid) DO UPDATE SET study_ref = excluded.study_ref, \
             modality = excluded.modality, series_number = excluded.series_number, \
             description = excluded.description, series_date = excluded.series_date, \
             series_time = excluded.series_time, pps_start_date = excluded.pps_start_date, \
             pps_start_time = excluded.pps_start_time, body_part = excluded.body_part, \
             request_attributes = excluded.request_attributes RETURNING id",
        )
        .bind(study)
        .bind(&e.institution)
        .bind(&s.series_instance_uid)
        .bind(&s.modality)
        .bind(s.series_number)
        .bind(&s.series_description)
        .bind(&s.series_date)
        .bind(&s.series_time)
        .bind(&s.pps_start_date)
        .bind(&s.pps_start_time)
        .bind(&s.body_part_examined)
        .bind(request)
        .fetch_one(&mut **tx)
        .await?
        .get(0);
        let previous: Option<String> =
            sqlx::query("SELECT object_key FROM instance WHERE institution = $1 AND sop_uid = $2")
                .bind(&e.institution)
                .bind(&s.sop_instance_uid)
                .fetch_optional(&mut **tx)
                .await?
                .map(|r| r.get(0));
        let instance: i64 = sqlx::query(
            "INSERT INTO instance (series_ref, institution, sop_uid, sop_class_uid, instance_number, \
             transfer_syntax, object_key, size, sha256, number_of_frames, rows, columns, bits_allocated, \
             sender_ae, received_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15) \
             ON CONFLICT (institution, sop_uid) DO UPDATE SET series_ref = excluded.series_ref, \
             sop_class_uid = excluded.sop_class_uid, instance_number = excluded.instance_number, \
             transfer_syntax = excluded.transfer_syntax, object_key = excluded.object_key, \
             size = excluded.size, sha256 = excluded.sha256, number_of_frames = excluded.number_of_frames, \
             rows = excluded.rows, columns = excluded.columns, bits_allocated = excluded.bits_allocated, \
             sender_ae = excluded.sender_ae, received_at = excluded.received_at RETURNING id",
        )
        .bind(series)
        .bind(&e.institution)
        .bind(&s.sop_instance_uid)
        .bind(&s.sop_class_uid)
        .bind(s.instance_number)
        .bind(&e.transfer_syntax)
        .bind(&e.object_key)
        .bind(e.size as i64)
        .bind(&e.sha256)
        .bind(s.number_of_frames)
        .bind(s.rows)
        .bind(s.columns)
        .bind(s.bits_allocated)
        .bind(&e.sender_ae)
        .bind(&e.received_at)
        .fetch_one(&mut **tx)
        .await?
        .get(0);
        let pixels = e
            .pixels
            .as_ref()
            .map(|p| serde_json::to_string(p).expect("serializable"));
        sqlx::query(
            "INSERT INTO instance_meta (instance_ref, dataset_json, pixel_layout) VALUES ($1,$2,$3) \
             ON CONFLICT (instance_ref) DO UPDATE SET dataset_json = excluded.dataset_json, \
             pixel_layout = excluded.pixel_layout",
        )
        .bind(instance)
        .bind(&e.dataset_json)
        .bind(pixels)
        .execute(&mut **tx)
        .await?;
        Ok(previous.filter(|k| k != &e.object_key))
    }
}

impl Index {
    /// Drop every index row (not the records of links, disclosures or audit,
    /// which live in their own tables): the first step of `reindex`.
    pub async fn clear(&self) -> Result<(), IndexError> {
        let mut tx = self.pool.begin().await?;
        for table in ["instance_meta", "instance", "series", "study", "patient"] {
            sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table}")))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A canonical dump of the index content (no surrogate ids, no receive
    /// times), ordered, for comparing an index with its rebuild.
    pub async fn fingerprint(&self) -> Result<Vec<String>, IndexError> {
        let rows = sqlx::query(
            "SELECT p.institution, p.issuer, p.patient_id, COALESCE(p.name_alphabetic,''), \
             COALESCE(p.name_ideographic,''), COALESCE(p.name_phonetic,''), st.study_uid, \
             COALESCE(st.description,''), se.series_uid, COALESCE(se.modality,''), i.sop_uid, \
             i.sop_class_uid, i.transfer_syntax, i.object_key, i.sha256, m.dataset_json, \
             COALESCE(m.pixel_layout,'') \
             FROM instance i JOIN series se ON se.id = i.series_ref JOIN study st ON st.id = se.study_ref \
             JOIN patient p ON p.id = st.patient_ref JOIN instance_meta m ON m.instance_ref = i.id \
             ORDER BY i.institution, i.sop_uid",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (0..17)
                    .map(|k| r.get::<String, _>(k))
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
