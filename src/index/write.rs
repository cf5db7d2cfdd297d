//! The single index writer. Writes queue up while a transaction commits and
//! go into the next one together (group commit: one fsync for many stores).
//! The writer is a thread of its own. On SQLite it owns its connection, so a
//! batch runs without a channel round trip per statement (sqlx's SQLite
//! driver sends every statement to a worker thread); on PostgreSQL it drives
//! the sqlx pool through the runtime handle.
//! Parent rows (patient, study, series) that a batch would rewrite with the
//! very values they already hold are skipped, so a typical store costs one
//! statement; the memory of those rows is dropped whenever a transaction
//! fails or the index is cleared. A memory gone stale because another
//! process removed the rows (a roll-back, a reindex) makes a batch fail once
//! and be retried without it. One gone stale because another process wrote
//! other values into them (several nodes on one PostgreSQL, a patient's
//! name corrected by a store on the other node) is not noticed: this
//! writer's next store with the values it remembers leaves the other's
//! values in place, where "the last store wins" would rewrite them.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sqlx::{AnyPool, Row};
use tokio::sync::{mpsc, oneshot};

use super::{Engine, IndexEntry, IndexError, access};

/// Most index writes committed in one transaction.
const MAX_BATCH: usize = 64;
/// Parent rows remembered (series with their study and patient).
const MAX_REMEMBERED: usize = 10_000;

enum Job {
    Upsert {
        entry: Box<IndexEntry>,
        done: oneshot::Sender<Result<Option<String>, IndexError>>,
    },
    /// Write the confirmations waiting, if no upsert came to carry them
    /// (and say when that is done).
    Sweep(Option<oneshot::Sender<()>>),
}

/// Confirmations wait this long for an upsert batch to go with.
const CONFIRM_SWEEP: std::time::Duration = std::time::Duration::from_secs(1);

/// Handle to the writer thread.
#[derive(Clone)]
pub(super) struct Writer {
    jobs: mpsc::Sender<Job>,
    /// Bumped to make the writer forget the parent rows it remembers.
    generation: Arc<AtomicU64>,
    /// Keys of `unconfirmed_object` rows to delete with the next batch.
    confirmed: Arc<Mutex<Vec<String>>>,
}

impl Writer {
    /// Start the writer thread. `sqlite_path` is the database file when the
    /// engine is SQLite (the writer opens its own connection to it).
    pub(super) fn start(
        pool: AnyPool,
        engine: Engine,
        sqlite_path: Option<std::path::PathBuf>,
    ) -> Result<Self, IndexError> {
        let (jobs, rx) = mpsc::channel(MAX_BATCH * 4);
        let generation = Arc::new(AtomicU64::new(0));
        let g = generation.clone();
        let confirmed = Arc::new(Mutex::new(Vec::new()));
        let c = confirmed.clone();
        let target = match (engine, sqlite_path) {
            (Engine::Sqlite, Some(path)) => Target::Sqlite(open_sqlite(&path)?),
            _ => Target::Pool(pool, tokio::runtime::Handle::current()),
        };
        std::thread::Builder::new()
            .name("index-writer".into())
            .spawn(move || run(target, rx, g, c))
            .map_err(IndexError::Io)?;
        // Confirmations ride with upsert batches; after a quiet second they
        // go in a batch of their own.
        let (sweep, waiting) = (jobs.downgrade(), confirmed.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CONFIRM_SWEEP);
            loop {
                tick.tick().await;
                let Some(jobs) = sweep.upgrade() else { return };
                if !waiting.lock().expect("not poisoned").is_empty() {
                    let _ = jobs.try_send(Job::Sweep(None));
                }
            }
        });
        Ok(Self {
            jobs,
            generation,
            confirmed,
        })
    }

    pub(super) fn confirm(&self, object_key: String) {
        self.confirmed
            .lock()
            .expect("not poisoned")
            .push(object_key);
    }

    /// Write the confirmations waiting now (at shutdown).
    pub(super) async fn sweep(&self) {
        let (done, written) = oneshot::channel();
        if self.jobs.send(Job::Sweep(Some(done))).await.is_ok() {
            let _ = written.await;
        }
    }

    pub(super) async fn upsert(&self, entry: IndexEntry) -> Result<Option<String>, IndexError> {
        let (done, result) = oneshot::channel();
        self.jobs
            .send(Job::Upsert {
                entry: Box::new(entry),
                done,
            })
            .await
            .map_err(|_| IndexError::WriterGone)?;
        result.await.map_err(|_| IndexError::WriterGone)?
    }

    /// Rows were deleted behind the writer's back (reindex): forget them.
    pub(super) fn forget_parents(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// Where the writer thread writes.
enum Target {
    Sqlite(rusqlite::Connection),
    /// PostgreSQL through the sqlx pool, driven from the writer thread.
    Pool(AnyPool, tokio::runtime::Handle),
}

pub(crate) fn open_sqlite(path: &std::path::Path) -> Result<rusqlite::Connection, IndexError> {
    let conn = rusqlite::Connection::open(path)?;
    // FULL: a commit is on disk before a store is acknowledged.
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=30000; PRAGMA analysis_limit=0;",
    )?;
    Ok(conn)
}

/// What the writer remembers of a series row: its id and a fingerprint of
/// every patient, study and series value last written for it.
type Parents = HashMap<(String, String), (i64, u64)>;

fn run(
    mut target: Target,
    mut rx: mpsc::Receiver<Job>,
    generation: Arc<AtomicU64>,
    confirmed: Arc<Mutex<Vec<String>>>,
) {
    let mut parents = Parents::new();
    let mut seen_generation = 0;
    let mut written = 0u64;
    let mut analyze_at = FIRST_ANALYZE;
    while let Some(first) = rx.blocking_recv() {
        if written >= analyze_at {
            refresh_statistics(&mut target);
            analyze_at = (analyze_at * 2).min(written + MAX_ANALYZE_INTERVAL);
        }
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
        let mut sweeps = Vec::new();
        let mut batch: Vec<(IndexEntry, Done)> = batch
            .into_iter()
            .filter_map(|j| match j {
                Job::Upsert { entry, done } => Some((*entry, done)),
                Job::Sweep(done) => {
                    sweeps.extend(done);
                    None
                }
            })
            .collect();
        // Answered when this batch is over, whatever its outcome.
        let _sweeps = Swept(sweeps);
        let confirms = std::mem::take(&mut *confirmed.lock().expect("not poisoned"));
        if batch.is_empty() && confirms.is_empty() {
            continue;
        }
        written += batch.len() as u64;
        let entries: Vec<&IndexEntry> = batch.iter().map(|(e, _)| e).collect();
        match commit(&mut target, &entries, &confirms, &mut parents) {
            Ok(results) => {
                for ((_, done), r) in batch.into_iter().zip(results) {
                    let _ = done.send(Ok(r));
                }
            }
            Err(e) => {
                parents.clear();
                // The confirmations wait for the next batch (kept, they are
                // harmless: start-up would find these objects whole).
                confirmed.lock().expect("not poisoned").extend(confirms);
                if batch.len() <= 1 {
                    if let Some((_, done)) = batch.pop() {
                        let _ = done.send(Err(e));
                    }
                    continue;
                }
                // Retry one by one so one bad entry fails alone.
                for (entry, done) in batch {
                    let r = commit(&mut target, &[&entry], &[], &mut parents);
                    if r.is_err() {
                        parents.clear();
                    }
                    let _ = done.send(r.map(|mut v| v.pop().flatten()));
                }
            }
        }
    }
}

type Done = oneshot::Sender<Result<Option<String>, IndexError>>;

/// Tells the waiting sweeps that their batch is over, when dropped.
struct Swept(Vec<oneshot::Sender<()>>);

impl Drop for Swept {
    fn drop(&mut self) {
        for done in self.0.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Planner statistics are refreshed (SQLite) after this many writes, then
/// after twice as many, and so on, at least every `MAX_ANALYZE_INTERVAL`.
const FIRST_ANALYZE: u64 = 1_000;
const MAX_ANALYZE_INTERVAL: u64 = 1_000_000;

/// Refresh SQLite's planner statistics (complete: see `Index::connect`), so
/// searches keep choosing selective indexes as the index grows. PostgreSQL's
/// autovacuum does this itself.
fn refresh_statistics(target: &mut Target) {
    if let Target::Sqlite(conn) = target
        && let Err(e) = conn.execute_batch("ANALYZE")
    {
        tracing::warn!(error = %e, "refreshing index statistics failed");
    }
}

/// One transaction for `entries` and the `confirms` (keys leaving
/// `unconfirmed_object`); `parents` is only updated if it commits.
fn commit(
    target: &mut Target,
    entries: &[&IndexEntry],
    confirms: &[String],
    parents: &mut Parents,
) -> Result<Vec<Option<String>>, IndexError> {
    let (out, learned) = match target {
        Target::Sqlite(conn) => {
            // IMMEDIATE takes the write lock up front, so other writers (tools,
            // another process) queue on busy_timeout instead of failing a lock upgrade.
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            // The statements never wait, so the batch future completes at once.
            let r = futures::executor::block_on(write_batch(
                &mut SqliteTx(&tx),
                entries,
                confirms,
                parents,
            ))?;
            tx.commit()?;
            r
        }
        Target::Pool(pool, rt) => rt.block_on(async {
            let mut tx = pool.begin().await?;
            // Shared with other writers, exclusive of consent changes (see
            // `Index::begin_records`).
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT 1 FROM (SELECT pg_advisory_xact_lock_shared({})) l",
                super::RecordLock::Consent as i64
            )))
            .execute(&mut *tx)
            .await?;
            let r = write_batch(&mut PoolTx(&mut tx), entries, confirms, parents).await?;
            tx.commit().await?;
            Ok::<_, IndexError>(r)
        })?,
    };
    for (key, id, fp) in learned {
        parents.insert(key, (id, fp));
    }
    Ok(out)
}

type Learned = Vec<((String, String), i64, u64)>;

/// Write `entries` in the open transaction; the parent rows learned on the way.
async fn write_batch<C: WriteConn>(
    c: &mut C,
    entries: &[&IndexEntry],
    confirms: &[String],
    parents: &Parents,
) -> Result<(Vec<Option<String>>, Learned), IndexError> {
    for key in confirms {
        c.execute(CONFIRM_SQL, vec![Param::Text(Some(key.clone()))])
            .await?;
    }
    let mut learned: Learned = Vec::new();
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
                let id = upsert_parents(c, e).await?;
                learned.push((key, id, fp));
                id
            }
        };
        let superseded = upsert_instance(c, e, series)
            .await?
            .filter(|k| k != &e.object_key);
        if let Some(old) = &superseded {
            c.execute(
                SUPERSEDED_SQL,
                vec![
                    Param::Text(Some(old.clone())),
                    Param::Text(Some(e.institution.clone())),
                    Param::Text(Some(e.summary.sop_instance_uid.clone())),
                    Param::Text(Some(e.received_at.clone())),
                ],
            )
            .await?;
        }
        if e.unconfirmed {
            c.execute(
                UNCONFIRMED_SQL,
                vec![
                    Param::Text(Some(e.object_key.clone())),
                    Param::Text(Some(e.institution.clone())),
                    Param::Text(Some(e.summary.sop_instance_uid.clone())),
                ],
            )
            .await?;
        }
        out.push(superseded);
    }
    Ok((out, learned))
}

struct SqliteTx<'a>(&'a rusqlite::Transaction<'a>);

impl rusqlite::ToSql for Param {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Param::Text(v) => v.to_sql(),
            Param::Int(v) => v.to_sql(),
        }
    }
}

impl WriteConn for SqliteTx<'_> {
    async fn returning_id(
        &mut self,
        sql: &'static str,
        params: Vec<Param>,
    ) -> Result<i64, IndexError> {
        let mut stmt = self.0.prepare_cached(sql)?;
        Ok(stmt.query_row(rusqlite::params_from_iter(params.iter()), |r| r.get(0))?)
    }

    async fn returning_text(
        &mut self,
        sql: &'static str,
        params: Vec<Param>,
    ) -> Result<Option<String>, IndexError> {
        let mut stmt = self.0.prepare_cached(sql)?;
        Ok(stmt.query_row(rusqlite::params_from_iter(params.iter()), |r| r.get(0))?)
    }

    async fn execute(&mut self, sql: &'static str, params: Vec<Param>) -> Result<(), IndexError> {
        let mut stmt = self.0.prepare_cached(sql)?;
        stmt.execute(rusqlite::params_from_iter(params.iter()))?;
        Ok(())
    }
}

struct PoolTx<'a>(&'a mut sqlx::Transaction<'static, sqlx::Any>);

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    params: Vec<Param>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    for p in params {
        q = match p {
            Param::Text(v) => q.bind(v),
            Param::Int(v) => q.bind(v),
        };
    }
    q
}

impl WriteConn for PoolTx<'_> {
    async fn returning_id(
        &mut self,
        sql: &'static str,
        params: Vec<Param>,
    ) -> Result<i64, IndexError> {
        Ok(bind_all(sqlx::query(sql), params)
            .fetch_one(&mut **self.0)
            .await?
            .get(0))
    }

    async fn returning_text(
        &mut self,
        sql: &'static str,
        params: Vec<Param>,
    ) -> Result<Option<String>, IndexError> {
        Ok(bind_all(sqlx::query(sql), params)
            .fetch_one(&mut **self.0)
            .await?
            .get(0))
    }

    async fn execute(&mut self, sql: &'static str, params: Vec<Param>) -> Result<(), IndexError> {
        bind_all(sqlx::query(sql), params)
            .execute(&mut **self.0)
            .await?;
        Ok(())
    }
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

/// A value bound to a statement: the index binds only optional text and integers.
enum Param {
    Text(Option<String>),
    Int(Option<i64>),
}

fn text(v: &Option<String>) -> Param {
    Param::Text(v.clone())
}

const PATIENT_SQL: &str = "INSERT INTO patient (institution, issuer, patient_id, name_alphabetic, \
     name_ideographic, name_phonetic, birth_date, sex, other_patient_ids, name_alphabetic_key, \
     name_ideographic_key, name_phonetic_key) \
     VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12) \
     ON CONFLICT (institution, issuer, patient_id) DO UPDATE SET \
     name_alphabetic = excluded.name_alphabetic, name_ideographic = excluded.name_ideographic, \
     name_phonetic = excluded.name_phonetic, birth_date = excluded.birth_date, sex = excluded.sex, \
     other_patient_ids = excluded.other_patient_ids, \
     name_alphabetic_key = excluded.name_alphabetic_key, \
     name_ideographic_key = excluded.name_ideographic_key, \
     name_phonetic_key = excluded.name_phonetic_key RETURNING id";

fn patient_params(e: &IndexEntry) -> Vec<Param> {
    let s = &e.summary;
    let other_ids = (!s.other_patient_ids.is_empty())
        .then(|| serde_json::to_string(&s.other_patient_ids).expect("serializable"));
    vec![
        Param::Text(Some(e.institution.clone())),
        Param::Text(Some(e.issuer.clone())),
        Param::Text(Some(s.patient_id.clone())),
        text(&s.patient_name.alphabetic),
        text(&s.patient_name.ideographic),
        text(&s.patient_name.phonetic),
        text(&s.patient_birth_date),
        text(&s.patient_sex),
        Param::Text(other_ids),
    ]
    .into_iter()
    .chain(s.patient_name.keys().map(Param::Text))
    .collect()
}

const STUDY_SQL: &str = "INSERT INTO study (patient_ref, institution, study_uid, study_date, \
     study_time, accession_number, study_id, description, referring_alphabetic, \
     referring_ideographic, referring_phonetic, referring_alphabetic_key, \
     referring_ideographic_key, referring_phonetic_key) \
     VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14) \
     ON CONFLICT (institution, study_uid) DO UPDATE SET \
     study_date = excluded.study_date, study_time = excluded.study_time, \
     accession_number = excluded.accession_number, study_id = excluded.study_id, \
     description = excluded.description, referring_alphabetic = excluded.referring_alphabetic, \
     referring_ideographic = excluded.referring_ideographic, \
     referring_phonetic = excluded.referring_phonetic, \
     referring_alphabetic_key = excluded.referring_alphabetic_key, \
     referring_ideographic_key = excluded.referring_ideographic_key, \
     referring_phonetic_key = excluded.referring_phonetic_key \
     WHERE study.patient_ref = excluded.patient_ref RETURNING id";

fn study_params(e: &IndexEntry, patient: i64) -> Vec<Param> {
    let s = &e.summary;
    vec![
        Param::Int(Some(patient)),
        Param::Text(Some(e.institution.clone())),
        Param::Text(Some(s.study_instance_uid.clone())),
        text(&s.study_date),
        text(&s.study_time),
        text(&s.accession_number),
        text(&s.study_id),
        text(&s.study_description),
        text(&s.referring_physician_name.alphabetic),
        text(&s.referring_physician_name.ideographic),
        text(&s.referring_physician_name.phonetic),
    ]
    .into_iter()
    .chain(s.referring_physician_name.keys().map(Param::Text))
    .collect()
}

const SERIES_SQL: &str = "INSERT INTO series (study_ref, institution, series_uid, modality, \
     series_number, description, series_date, series_time, pps_start_date, pps_start_time, \
     body_part, request_attributes) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12) \
     ON CONFLICT (institution, series_uid) DO UPDATE SET \
     modality = excluded.modality, series_number = excluded.series_number, \
     description = excluded.description, series_date = excluded.series_date, \
     series_time = excluded.series_time, pps_start_date = excluded.pps_start_date, \
     pps_start_time = excluded.pps_start_time, body_part = excluded.body_part, \
     request_attributes = excluded.request_attributes \
     WHERE series.study_ref = excluded.study_ref RETURNING id";

fn series_params(e: &IndexEntry, study: i64) -> Vec<Param> {
    let s = &e.summary;
    vec![
        Param::Int(Some(study)),
        Param::Text(Some(e.institution.clone())),
        Param::Text(Some(s.series_instance_uid.clone())),
        text(&s.modality),
        Param::Int(s.series_number),
        text(&s.series_description),
        text(&s.series_date),
        text(&s.series_time),
        text(&s.pps_start_date),
        text(&s.pps_start_time),
        text(&s.body_part_examined),
        Param::Text(s.request_attributes.as_ref().map(|v| v.to_string())),
    ]
}

const UNCONFIRMED_SQL: &str = "INSERT INTO unconfirmed_object (object_key, institution, sop_uid) \
     VALUES ($1, $2, $3) ON CONFLICT (object_key) DO NOTHING";
pub(super) const CONFIRM_SQL: &str = "DELETE FROM unconfirmed_object WHERE object_key = $1";
/// List a superseded copy until it is deleted (`superseded_object`).
const SUPERSEDED_SQL: &str = "INSERT INTO superseded_object (object_key, institution, sop_uid, \
     listed_at) VALUES ($1, $2, $3, $4) ON CONFLICT (object_key) DO UPDATE SET listed_at = excluded.listed_at";

const INSTANCE_SQL: &str = "INSERT INTO instance (series_ref, institution, sop_uid, \
     sop_class_uid, instance_number, transfer_syntax, object_key, size, sha256, number_of_frames, \
     rows, columns, bits_allocated, sender_ae, received_at, dataset_json, pixel_layout) \
     VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17) \
     ON CONFLICT (institution, sop_uid) DO UPDATE SET series_ref = excluded.series_ref, \
     sop_class_uid = excluded.sop_class_uid, instance_number = excluded.instance_number, \
     transfer_syntax = excluded.transfer_syntax, object_key = excluded.object_key, \
     size = excluded.size, sha256 = excluded.sha256, number_of_frames = excluded.number_of_frames, \
     rows = excluded.rows, columns = excluded.columns, bits_allocated = excluded.bits_allocated, \
     sender_ae = excluded.sender_ae, received_at = excluded.received_at, \
     dataset_json = excluded.dataset_json, pixel_layout = excluded.pixel_layout, \
     superseded_key = instance.object_key RETURNING superseded_key";

fn instance_params(e: &IndexEntry, series: i64) -> Vec<Param> {
    let s = &e.summary;
    vec![
        Param::Int(Some(series)),
        Param::Text(Some(e.institution.clone())),
        Param::Text(Some(s.sop_instance_uid.clone())),
        Param::Text(Some(s.sop_class_uid.clone())),
        Param::Int(s.instance_number),
        Param::Text(Some(e.transfer_syntax.clone())),
        Param::Text(Some(e.object_key.clone())),
        Param::Int(Some(e.size as i64)),
        Param::Text(Some(e.sha256.clone())),
        Param::Int(s.number_of_frames),
        Param::Int(s.rows),
        Param::Int(s.columns),
        Param::Int(s.bits_allocated),
        text(&e.sender_ae),
        Param::Text(Some(e.received_at.clone())),
        Param::Text(Some(e.dataset_json.clone())),
        Param::Text(
            e.pixels
                .as_ref()
                .map(|p| serde_json::to_string(p).expect("serializable")),
        ),
    ]
}

/// The writer's view of a database, so one batch routine serves both engines.
trait WriteConn {
    /// Run a statement that returns the id of the row it wrote.
    fn returning_id(
        &mut self,
        sql: &'static str,
        params: Vec<Param>,
    ) -> impl Future<Output = Result<i64, IndexError>>;
    /// Run a statement that returns one row of one text column (or NULL).
    fn returning_text(
        &mut self,
        sql: &'static str,
        params: Vec<Param>,
    ) -> impl Future<Output = Result<Option<String>, IndexError>>;
    fn execute(
        &mut self,
        sql: &'static str,
        params: Vec<Param>,
    ) -> impl Future<Output = Result<(), IndexError>>;
}

/// Insert or update the patient, study and series of `e`, and who may see
/// the study; the series id.
async fn upsert_parents<C: WriteConn>(c: &mut C, e: &IndexEntry) -> Result<i64, IndexError> {
    let patient = c.returning_id(PATIENT_SQL, patient_params(e)).await?;
    // A study is one patient's, a series one study's: the upserts update
    // only rows whose parent is the same, and return nothing otherwise.
    let conflict = |what: String| {
        move |err: IndexError| {
            if err.is_no_row() {
                IndexError::Conflict(what)
            } else {
                err
            }
        }
    };
    let study = c
        .returning_id(STUDY_SQL, study_params(e, patient))
        .await
        .map_err(conflict(format!(
            "study {} belongs to another patient",
            e.summary.study_instance_uid
        )))?;
    c.execute(
        access::OWN_ROW,
        vec![
            Param::Int(Some(study)),
            Param::Text(Some(e.institution.clone())),
            text(&e.summary.study_date),
            Param::Int(Some(patient)),
        ],
    )
    .await?;
    // Derived again from the records (the study may be new, or its date changed).
    c.execute(access::FORGET_DISCLOSED, vec![Param::Int(Some(study))])
        .await?;
    c.execute(
        access::DISCLOSED_FOR_STUDY.as_str(),
        vec![Param::Int(Some(study))],
    )
    .await?;
    c.returning_id(SERIES_SQL, series_params(e, study))
        .await
        .map_err(conflict(format!(
            "series {} belongs to another study",
            e.summary.series_instance_uid
        )))
}

/// Insert or update the instance row of `e`; the key of the copy it named
/// before (the one this write supersedes), if it was updated.
async fn upsert_instance<C: WriteConn>(
    c: &mut C,
    e: &IndexEntry,
    series: i64,
) -> Result<Option<String>, IndexError> {
    c.returning_text(INSTANCE_SQL, instance_params(e, series))
        .await
}
