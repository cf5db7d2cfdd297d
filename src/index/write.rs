//! The single index writer. Writes queue up while a transaction commits and
//! go into the next one together (group commit: one fsync for many stores).
//! Parent rows (patient, study, series) that a batch would rewrite with the
//! very values they already hold are skipped, so a typical store costs one
//! statement; the memory of those rows is dropped whenever a transaction
//! fails or the index is cleared, and a stale memory (another node changed
//! the rows) only makes a batch fail once and be retried without it.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::{AnyPool, Row};
use tokio::sync::{mpsc, oneshot};

use super::{Engine, IndexEntry, IndexError};

/// Most index writes committed in one transaction.
const MAX_BATCH: usize = 64;
/// Parent rows remembered (series with their study and patient).
const MAX_REMEMBERED: usize = 10_000;

struct Job {
    entry: IndexEntry,
    done: oneshot::Sender<Result<Option<String>, IndexError>>,
}

/// Handle to the writer task.
#[derive(Clone)]
pub(super) struct Writer {
    jobs: mpsc::Sender<Job>,
    /// Bumped to make the writer forget the parent rows it remembers.
    generation: Arc<AtomicU64>,
}

impl Writer {
    pub(super) fn start(pool: AnyPool, engine: Engine) -> Self {
        let (jobs, rx) = mpsc::channel(MAX_BATCH * 4);
        let generation = Arc::new(AtomicU64::new(0));
        tokio::spawn(run(pool, engine, rx, generation.clone()));
        Self { jobs, generation }
    }

    pub(super) async fn upsert(&self, entry: IndexEntry) -> Result<Option<String>, IndexError> {
        let (done, result) = oneshot::channel();
        self.jobs
            .send(Job { entry, done })
            .await
            .map_err(|_| IndexError::WriterGone)?;
        result.await.map_err(|_| IndexError::WriterGone)?
    }

    /// Rows were deleted behind the writer's back (reindex): forget them.
    pub(super) fn forget_parents(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// What the writer remembers of a series row: its id and a fingerprint of
/// every patient, study and series value last written for it.
type Parents = HashMap<(String, String), (i64, u64)>;

async fn run(
    pool: AnyPool,
    engine: Engine,
    mut rx: mpsc::Receiver<Job>,
    generation: Arc<AtomicU64>,
) {
    let mut parents = Parents::new();
    let mut seen_generation = 0;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let g = generation.load(Ordering::SeqCst);
        if g != seen_generation || parents.len() > MAX_REMEMBERED {
            parents.clear();
            seen_generation = g;
        }
        let entries: Vec<&IndexEntry> = batch.iter().map(|j| &j.entry).collect();
        match commit(&pool, engine, &entries, &mut parents).await {
            Ok(results) => {
                for (job, r) in batch.into_iter().zip(results) {
                    let _ = job.done.send(Ok(r));
                }
            }
            Err(e) => {
                parents.clear();
                if batch.len() == 1 {
                    let job = batch.pop().expect("one job");
                    let _ = job.done.send(Err(e));
                    continue;
                }
                // Retry one by one so one bad entry fails alone.
                for job in batch {
                    let r = commit(&pool, engine, &[&job.entry], &mut parents).await;
                    if r.is_err() {
                        parents.clear();
                    }
                    let _ = job.done.send(r.map(|mut v| v.pop().flatten()));
                }
            }
        }
    }
}

/// One transaction for `entries`; `parents` is only updated if it commits.
async fn commit(
    pool: &AnyPool,
    engine: Engine,
    entries: &[&IndexEntry],
    parents: &mut Parents,
) -> Result<Vec<Option<String>>, IndexError> {
    let mut tx = match engine {
        // IMMEDIATE takes the write lock up front, so other writers (tools,
        // another process) queue on busy_timeout instead of failing a lock upgrade.
        Engine::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await?,
        Engine::Postgres => pool.begin().await?,
    };
    let mut learned = Vec::new();
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let key = (e.institution.clone(), e.summary.series_instance_uid.clone());
        let fp = fingerprint(e);
        let known = learned
            .iter()
            .rev()
            .find(|(k, _, f)| k == &key && *f == fp)
            .map(|(_, id, _)| *id)
            .or_else(|| {
                parents
                    .get(&key)
                    .filter(|(_, f)| *f == fp)
                    .map(|(id, _)| *id)
            });
        let series = match known {
            Some(id) => id,
            None => {
                let id = upsert_parents(&mut tx, e).await?;
                learned.push((key, id, fp));
                id
            }
        };
        upsert_instance(&mut tx, e, series).await?;
        out.push(e.replaces.clone().filter(|k| k != &e.object_key));
    }
    tx.commit().await?;
    for (key, id, fp) in learned {
        parents.insert(key, (id, fp));
    }
    Ok(out)
}

/// A hash of every value the patient, study and series rows take from `e`.
fn fingerprint(e: &IndexEntry) -> u64 {
    let s = &e.summary;
    let mut h = DefaultHasher::new();
    (
        &e.institution,
        &e.issuer,
        &s.patient_id,
        &s.patient_name,
        &s.patient_birth_date,
        &s.patient_sex,
    )
        .hash(&mut h);
    for o in &s.other_patient_ids {
        (&o.patient_id, &o.issuer).hash(&mut h);
    }
    (
        &s.study_instance_uid,
        &s.study_date,
        &s.study_time,
        &s.accession_number,
        &s.study_id,
    )
        .hash(&mut h);
    (&s.study_description, &s.referring_physician_name).hash(&mut h);
    (
        &s.series_instance_uid,
        &s.modality,
        &s.series_number,
        &s.series_description,
    )
        .hash(&mut h);
    (
        &s.series_date,
        &s.series_time,
        &s.pps_start_date,
        &s.pps_start_time,
        &s.body_part_examined,
    )
        .hash(&mut h);
    s.request_attributes
        .as_ref()
        .map(|v| v.to_string())
        .hash(&mut h);
    h.finish()
}

/// Insert or update the patient, study and series of `e`; the series id.
async fn upsert_parents(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    e: &IndexEntry,
) -> Result<i64, IndexError> {
    let s = &e.summary;
    let other_ids = (!s.other_patient_ids.is_empty())
        .then(|| serde_json::to_string(&s.other_patient_ids).expect("serializable"));
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
    .bind(s.request_attributes.as_ref().map(|v| v.to_string()))
    .fetch_one(&mut **tx)
    .await?
    .get(0);
    Ok(series)
}

async fn upsert_instance(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    e: &IndexEntry,
    series: i64,
) -> Result<(), IndexError> {
    let s = &e.summary;
    sqlx::query(
        "INSERT INTO instance (series_ref, institution, sop_uid, sop_class_uid, instance_number, \
         transfer_syntax, object_key, size, sha256, number_of_frames, rows, columns, bits_allocated, \
         sender_ae, received_at, dataset_json, pixel_layout) \
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17) \
         ON CONFLICT (institution, sop_uid) DO UPDATE SET series_ref = excluded.series_ref, \
         sop_class_uid = excluded.sop_class_uid, instance_number = excluded.instance_number, \
         transfer_syntax = excluded.transfer_syntax, object_key = excluded.object_key, \
         size = excluded.size, sha256 = excluded.sha256, number_of_frames = excluded.number_of_frames, \
         rows = excluded.rows, columns = excluded.columns, bits_allocated = excluded.bits_allocated, \
         sender_ae = excluded.sender_ae, received_at = excluded.received_at, \
         dataset_json = excluded.dataset_json, pixel_layout = excluded.pixel_layout",
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
    .bind(&e.dataset_json)
    .bind(e.pixels.as_ref().map(|p| serde_json::to_string(p).expect("serializable")))
    .execute(&mut **tx)
    .await?;
    Ok(())
}
