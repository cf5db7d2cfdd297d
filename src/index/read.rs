//! Index reads. On PostgreSQL through the sqlx pool; on SQLite through a
//! small pool of rusqlite connections on the blocking threads, which answers
//! a QIDO query in a fraction of the time sqlx's SQLite driver needs (it
//! sends every statement through a worker thread and channel hand-offs,
//! which dominated the profile of a sub-millisecond query).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sqlx::Row as _;

use super::IndexError;

/// A value bound to a read.
#[derive(Debug, Clone)]
pub enum Bind {
    Text(String),
    Int(i64),
    /// Row ids, for `Reader::id_in`: one parameter however many, so the
    /// statement's text (and its prepared plan) stays the same.
    Ids(Vec<i64>),
}

/// A column value of a read.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Int(i64),
    Text(String),
}

/// One result row.
#[derive(Debug, Clone)]
pub struct Row(Vec<SqlValue>);

impl Row {
    /// Text of column `i` (empty when NULL).
    pub fn text(&self, i: usize) -> String {
        self.opt_text(i).unwrap_or_default()
    }

    /// Text of column `i`; `None` when NULL or empty.
    pub fn opt_text(&self, i: usize) -> Option<String> {
        match self.0.get(i)? {
            SqlValue::Text(s) if !s.is_empty() => Some(s.clone()),
            SqlValue::Int(n) => Some(n.to_string()),
            _ => None,
        }
    }

    /// `text`, moving the value out of the row (the column reads as NULL
    /// afterwards): large results then copy no value twice.
    pub fn take_text(&mut self, i: usize) -> String {
        self.take_opt_text(i).unwrap_or_default()
    }

    /// `opt_text`, moving the value out of the row.
    pub fn take_opt_text(&mut self, i: usize) -> Option<String> {
        match self
            .0
            .get_mut(i)
            .map(|v| std::mem::replace(v, SqlValue::Null))?
        {
            SqlValue::Text(s) if !s.is_empty() => Some(s),
            SqlValue::Int(n) => Some(n.to_string()),
            _ => None,
        }
    }

    /// Integer of column `i` (0 when NULL).
    pub fn int(&self, i: usize) -> i64 {
        self.opt_int(i).unwrap_or_default()
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn opt_int(&self, i: usize) -> Option<i64> {
        match self.0.get(i)? {
            SqlValue::Int(n) => Some(*n),
            SqlValue::Text(s) => s.trim().parse().ok(),
            SqlValue::Null => None,
        }
    }
}

/// Most idle SQLite read connections kept.
const SQLITE_READERS: usize = 8;

/// Where reads go.
#[derive(Clone)]
pub enum Reader {
    Sqlite(Arc<SqliteReaders>),
    /// PostgreSQL, through its own driver's pool.
    Postgres(sqlx::PgPool),
}

pub struct SqliteReaders {
    path: PathBuf,
    idle: Mutex<Vec<rusqlite::Connection>>,
    /// Recent running time of each statement text (a decaying maximum, µs).
    costs: Mutex<HashMap<u64, u32>>,
}

/// Statements that recently ran at most this long run on the async worker
/// itself; longer ones (or ones not seen yet) in `block_in_place`, which
/// moves the worker's other tasks to another thread first. That hand-off
/// wakes a thread and cost a new connection's short search ~0.1 ms, a
/// quarter of its time; running a 10 ms metadata read inline would instead
/// hold up every task queued behind it.
const INLINE_COST_MICROS: u32 = 300;

/// Distinct statement texts whose cost is remembered (their shapes are few;
/// the bound only keeps a pathological client from growing the map).
const COSTS_KEPT: usize = 4096;

impl SqliteReaders {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            idle: Mutex::new(Vec::new()),
            costs: Mutex::new(HashMap::new()),
        }
    }

    /// Run `sql`, inline when it has been cheap, else off the worker.
    fn run_adaptive(&self, sql: &str, binds: &[Bind]) -> Result<Vec<Row>, IndexError> {
        let key = {
            let mut h = std::hash::DefaultHasher::new();
            sql.hash(&mut h);
            h.finish()
        };
        let known = self
            .costs
            .lock()
            .expect("reader costs lock")
            .get(&key)
            .copied();
        let started = Instant::now();
        let rows = match known {
            Some(micros) if micros <= INLINE_COST_MICROS => self.run(sql, binds),
            _ => tokio::task::block_in_place(|| self.run(sql, binds)),
        };
        let took = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
        let mut costs = self.costs.lock().expect("reader costs lock");
        if costs.len() >= COSTS_KEPT && !costs.contains_key(&key) {
            costs.clear();
        }
        // A decaying maximum: one slow run sends the statement off the worker
        // at once (its binds, an offset or a big study, may make the same text
        // slow again); fast runs bring it back by a quarter of the difference
        // each, so a slow variant mixed with cheap ones runs inline at most
        // once in ~8 runs (a 1/16 decay kept a warm search off the worker for
        // ~40 runs after one cold one: +30 % on a short search's latency).
        let cost = match known {
            Some(old) if took < old => old - (old - took) / 4,
            _ => took,
        };
        costs.insert(key, cost);
        rows
    }

    fn take(&self) -> Result<rusqlite::Connection, IndexError> {
        if let Some(c) = self.idle.lock().expect("reader pool lock").pop() {
            return Ok(c);
        }
        let c = rusqlite::Connection::open_with_flags(
            &self.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // LIKE as on PostgreSQL: case-sensitive (and index-usable).
        c.execute_batch("PRAGMA busy_timeout=30000; PRAGMA case_sensitive_like=ON;")?;
        // No memory mapping of the file: every commit (the audit appender's,
        // every 20 ms under load) makes each reader unmap and map the whole
        // file again at its next read, which cost a short search more than
        // the page reads it spares.
        // Plans never depend on bound values (LIKE patterns are literals, see
        // search.rs): otherwise SQLite re-prepares a statement on every
        // execution whose parameters it might have planned with, which was
        // half of a simple search's time.
        c.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
            true,
        )?;
        c.set_prepared_statement_cache_capacity(64);
        Ok(c)
    }

    fn give_back(&self, c: rusqlite::Connection) {
        let mut idle = self.idle.lock().expect("reader pool lock");
        if idle.len() < SQLITE_READERS {
            idle.push(c);
        }
    }

    fn run(&self, sql: &str, binds: &[Bind]) -> Result<Vec<Row>, IndexError> {
        let conn = self.take()?;
        let rows = (|| {
            let mut stmt = conn.prepare_cached(sql)?;
            for (i, b) in binds.iter().enumerate() {
                // SQLite numbers `$n` parameters by first appearance in the
                // text, not by n: look each one up by its name.
                let Some(at) = stmt.parameter_index(&format!("${}", i + 1))? else {
                    continue;
                };
                match b {
                    Bind::Text(t) => stmt.raw_bind_parameter(at, t)?,
                    Bind::Int(n) => stmt.raw_bind_parameter(at, n)?,
                    // Read by `json_each` (see `Reader::id_in`).
                    Bind::Ids(ids) => stmt.raw_bind_parameter(
                        at,
                        serde_json::to_string(ids).expect("integers serialize"),
                    )?,
                }
            }
            let n = stmt.column_count();
            let mut out = Vec::new();
            let mut rows = stmt.raw_query();
            while let Some(r) = rows.next()? {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(match r.get_ref(i)? {
                        rusqlite::types::ValueRef::Null => SqlValue::Null,
                        rusqlite::types::ValueRef::Integer(x) => SqlValue::Int(x),
                        rusqlite::types::ValueRef::Real(x) => SqlValue::Int(x as i64),
                        rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                            SqlValue::Text(String::from_utf8_lossy(t).into_owned())
                        }
                    });
                }
                out.push(Row(v));
            }
            Ok::<_, rusqlite::Error>(out)
        })();
        // A connection whose statement failed is still sound: keep it.
        self.give_back(conn);
        Ok(rows?)
    }
}

impl Reader {
    /// `group_concat(DISTINCT col)` in this engine's dialect (comma-separated).
    pub fn distinct_list(&self, column: &str) -> String {
        match self {
            Reader::Sqlite(_) => format!("group_concat(DISTINCT {column})"),
            Reader::Postgres(..) => format!("string_agg(DISTINCT {column}, ',')"),
        }
    }

    /// The condition "`column` is one of the ids bound as `param`" (a
    /// `Bind::Ids`).
    pub fn id_in(&self, column: &str, param: &str) -> String {
        match self {
            Reader::Sqlite(_) => format!("{column} IN (SELECT value FROM json_each({param}))"),
            Reader::Postgres(..) => format!("{column} = ANY({param})"),
        }
    }

    /// The plan of `sql`, one line per step.
    pub async fn explain(&self, sql: String, binds: Vec<Bind>) -> Result<Vec<String>, IndexError> {
        match self {
            Reader::Sqlite(_) => {
                let rows = self
                    .fetch(format!("EXPLAIN QUERY PLAN {sql}"), binds)
                    .await?;
                Ok(rows.iter().map(|r| r.text(3)).collect())
            }
            Reader::Postgres(pool) => {
                let mut conn = pool.acquire().await?;
                sqlx::query("SET enable_seqscan = off")
                    .execute(&mut *conn)
                    .await?;
                let rows = pg_query(format!("EXPLAIN {sql}"), binds)
                    .fetch_all(&mut *conn)
                    .await;
                sqlx::query("RESET enable_seqscan")
                    .execute(&mut *conn)
                    .await?;
                Ok(rows?.iter().map(|r| r.get::<String, _>(0)).collect())
            }
        }
    }

    /// Run `sql` (with `$n` placeholders) and return every row.
    pub async fn fetch(&self, sql: String, binds: Vec<Bind>) -> Result<Vec<Row>, IndexError> {
        match self {
            // Index queries take microseconds to a few milliseconds: run them
            // on this worker thread rather than paying two thread hand-offs
            // on the blocking pool.
            Reader::Sqlite(r) => r.run_adaptive(&sql, &binds),
            Reader::Postgres(pool) => {
                let rows = pg_query(sql, binds).fetch_all(pool).await?;
                Ok(rows
                    .iter()
                    .map(|r| Row((0..r.len()).map(|i| pg_value(r, i)).collect()))
                    .collect())
            }
        }
    }
}

/// `sql` with its binds, for PostgreSQL.
fn pg_query(
    sql: String,
    binds: Vec<Bind>,
) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
    binds
        .into_iter()
        .fold(sqlx::query(sqlx::AssertSqlSafe(sql)), |q, b| match b {
            Bind::Text(t) => q.bind(t),
            Bind::Int(i) => q.bind(i),
            Bind::Ids(ids) => q.bind(ids),
        })
}

/// Column `i` of a PostgreSQL row, decoded as its type says. (Trying
/// integer first and text on failure built and formatted an error for every
/// text value: a tenth of a 1,000-instance metadata answer's server time.)
fn pg_value(r: &sqlx::postgres::PgRow, i: usize) -> SqlValue {
    use sqlx::postgres::PgValueRef;
    use sqlx::{TypeInfo as _, ValueRef as _};
    fn decode<'r, T: sqlx::Decode<'r, sqlx::Postgres>>(v: PgValueRef<'r>) -> Option<T> {
        T::decode(v).ok()
    }
    let Ok(v) = r.try_get_raw(i) else {
        return SqlValue::Null;
    };
    if v.is_null() {
        return SqlValue::Null;
    }
    // Decoded straight from the raw value: `try_get` would look the column
    // up and check its type again, per value.
    let value = match v.type_info().name() {
        "INT8" => decode::<i64>(v.clone()).map(SqlValue::Int),
        "INT4" => decode::<i32>(v.clone()).map(|n| SqlValue::Int(n.into())),
        "INT2" => decode::<i16>(v.clone()).map(|n| SqlValue::Int(n.into())),
        "BOOL" => decode::<bool>(v.clone()).map(|b| SqlValue::Int(b.into())),
        "FLOAT4" => decode::<f32>(v.clone()).map(|f| SqlValue::Int(f as i64)),
        "FLOAT8" => decode::<f64>(v.clone()).map(|f| SqlValue::Int(f as i64)),
        "BYTEA" => decode::<&[u8]>(v.clone())
            .map(|b| SqlValue::Text(String::from_utf8_lossy(b).into_owned())),
        _ => decode::<&str>(v.clone()).map(|t| SqlValue::Text(t.to_owned())),
    };
    value.unwrap_or(SqlValue::Null)
}
