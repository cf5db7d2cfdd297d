//! What the consent rule costs a search (issue 5): on an index seeded by
//! `seed_index` over several institutions, add identity records with
//! 30,000 patient ID links and 20,000 disclosures (some expiring, expired
//! or revoked), then time each query of a clinician of the first
//! institution in-process, straight on the index (where the filter lives),
//! under three scopes: the consent rule; the institution's own objects only
//! (the search without the rule); and no filter at all.
//!
//!   cargo run --release --example bench_consent -- CONFIG.toml [ROUNDS] [RUNS] [JSON_OUT]
//!
//! Prints p50 and p99 per query and scope (medians over rounds) and the
//! ratios consent / own and consent / unfiltered.

use std::collections::{BTreeMap, HashMap};

use sqlx::Row;
use tsunagu::config::Config;
use tsunagu::index::Index;
use tsunagu::index::search::{Attr, Level, Matcher, Scope, Search};

#[path = "common/rng.rs"]
mod rng;
use rng::Rng;

const LINKS: usize = 30_000;
const DISCLOSURES: usize = 20_000;

type Patient = (String, String, String);

/// Links in records of three institutions each, and disclosures between
/// members of a record: 70 % active, 10 % expiring later, 10 % expired,
/// 10 % revoked.
async fn seed_records(index: &Index) {
    let pool = index.pool();
    let have = count(pool, "SELECT COUNT(*) FROM patient_link").await;
    if have > 0 {
        eprintln!("{have} links present; not seeding records");
        derive_access(index).await;
        return;
    }
    let rows = sqlx::query("SELECT institution, issuer, patient_id FROM patient ORDER BY id")
        .fetch_all(pool)
        .await
        .expect("patients");
    let mut by_inst: BTreeMap<String, Vec<Patient>> = BTreeMap::new();
    for r in rows {
        let p: Patient = (r.get(0), r.get(1), r.get(2));
        by_inst.entry(p.0.clone()).or_default().push(p);
    }
    let insts: Vec<String> = by_inst.keys().cloned().collect();
    assert!(
        insts.len() >= 3,
        "seed the index over at least 3 institutions"
    );
    let mut rng = Rng(5);
    for list in by_inst.values_mut() {
        // Shuffle, then take from the front: each patient linked at most once.
        for i in (1..list.len()).rev() {
            list.swap(i, rng.index(i + 1));
        }
    }
    let mut next: HashMap<String, usize> = HashMap::new();
    let mut records: Vec<Vec<Patient>> = Vec::new();
    while records.len() * 3 < LINKS {
        let mut members = Vec::new();
        let mut chosen: Vec<String> = Vec::new();
        while chosen.len() < 3 {
            let i = &insts[rng.index(insts.len())];
            if !chosen.contains(i) {
                chosen.push(i.clone());
            }
        }
        for i in chosen {
            let n = next.entry(i.clone()).or_default();
            members.push(by_inst[&i][*n].clone());
            *n += 1;
        }
        records.push(members);
    }
    let now = chrono::Utc::now();
    let stamp = |d: chrono::Duration| tsunagu::clock::stamp(now + d);
    let mut tx = index
        .begin_records(tsunagu::index::RecordLock::Consent)
        .await
        .expect("tx");
    for (r, members) in records.iter().enumerate() {
        sqlx::query("INSERT INTO identity_record (id, created_at) VALUES ($1, $2)")
            .bind(r as i64 + 1)
            .bind(stamp(chrono::Duration::zero()))
            .execute(&mut *tx)
            .await
            .expect("record");
        for (inst, issuer, pid) in members {
            sqlx::query(
                "INSERT INTO patient_link (institution, issuer, patient_id, record, created_by, created_at) \
                 VALUES ($1, $2, $3, $4, 'bench', $5)",
            )
            .bind(inst)
            .bind(issuer)
            .bind(pid)
            .bind(r as i64 + 1)
            .bind(stamp(chrono::Duration::zero()))
            .execute(&mut *tx)
            .await
            .expect("link");
        }
    }
    for n in 0..DISCLOSURES {
        let r = rng.index(records.len());
        let members = &records[r];
        let from = rng.index(3);
        let to = (from + 1 + rng.index(2)) % 3;
        let kind = rng.index(10);
        let expires = match kind {
            7 => Some(stamp(chrono::Duration::days(30))),
            8 => Some(stamp(chrono::Duration::days(-1))),
            _ => None,
        };
        let revoked = (kind == 9).then(|| stamp(chrono::Duration::hours(-1)));
        sqlx::query(
            "INSERT INTO disclosure (id, record, from_institution, to_institution, patient_id, \
             consent_reference, consented_at, expires_at, created_by, created_at, revoked_at, revoked_by) \
             VALUES ($1, $2, $3, $4, $5, 'bench', $6, $7, 'bench', $6, $8, $9)",
        )
        .bind(format!("bench-{n}"))
        .bind(r as i64 + 1)
        .bind(&members[from].0)
        .bind(&members[to].0)
        .bind(&members[from].2)
        .bind(stamp(chrono::Duration::days(-2)))
        .bind(expires)
        .bind(revoked.clone())
        .bind(revoked.map(|_| "bench"))
        .execute(&mut *tx)
        .await
        .expect("disclosure");
    }
    tx.commit().await.expect("commit");
    derive_access(index).await;
    eprintln!(
        "seeded {} records, {} links, {DISCLOSURES} disclosures",
        records.len(),
        records.len() * 3
    );
}

/// The access rows the records give (what the API keeps up to date one
/// record at a time; records written here directly need them derived).
async fn derive_access(index: &Index) {
    let pool = index.pool();
    let disclosed = count(
        pool,
        "SELECT COUNT(*) FROM study_access WHERE kind = 'disclosed'",
    )
    .await;
    if disclosed > 0 {
        if !config_is_sqlite(pool) {
            // What autovacuum does for a live server (visibility maps for
            // index-only scans, statistics); a benchmark's short-lived
            // cluster never gets to it, and a migration may have just added
            // an index.
            sqlx::raw_sql("VACUUM (ANALYZE)")
                .execute(pool)
                .await
                .expect("vacuum");
        }
        return;
    }
    index.rebuild_access().await.expect("derive access");
    // Fresh statistics for the planner, as the server has them.
    let analyze = if config_is_sqlite(pool) {
        "ANALYZE"
    } else {
        "ANALYZE study_access"
    };
    sqlx::raw_sql(analyze).execute(pool).await.expect("analyze");
}

/// The single number `sql` selects.
async fn count(pool: &sqlx::AnyPool, sql: &'static str) -> i64 {
    sqlx::query(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

fn config_is_sqlite(pool: &sqlx::AnyPool) -> bool {
    pool.connect_options()
        .database_url
        .scheme()
        .starts_with("sqlite")
}

fn study_search(keys: Vec<(Attr, Matcher)>, limit: u32) -> Search {
    Search {
        level: Level::Study,
        study_uid: None,
        series_uid: None,
        keys,
        limit,
        offset: 0,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 2 {
        eprintln!("usage: bench_consent CONFIG.toml [ROUNDS] [RUNS] [JSON_OUT]");
        std::process::exit(2);
    }
    let config = Config::load(Some(std::path::Path::new(&args[1]))).expect("config");
    let rounds: usize = args.get(2).map(|a| a.parse().expect("rounds")).unwrap_or(3);
    let runs: usize = args.get(3).map(|a| a.parse().expect("runs")).unwrap_or(100);
    let index = Index::connect(&config.index).await.expect("index");
    seed_records(&index).await;
    let pool = index.pool();
    let caller: String = sqlx::query("SELECT MIN(institution) FROM patient")
        .fetch_one(pool)
        .await
        .expect("caller")
        .get(0);
    // A patient of the caller whose record another member discloses to it,
    // and one of that member's studies.
    let shared = sqlx::query(
        "SELECT tl.patient_id, st.study_uid FROM patient_link tl \
         JOIN disclosure d ON d.record = tl.record AND d.to_institution = tl.institution \
         JOIN patient_link sl ON sl.record = d.record AND sl.institution = d.from_institution \
         JOIN patient p ON p.institution = sl.institution AND p.issuer = sl.issuer AND p.patient_id = sl.patient_id \
         JOIN study st ON st.patient_ref = p.id \
         WHERE tl.institution = $1 AND d.revoked_at IS NULL AND d.expires_at IS NULL \
         ORDER BY tl.patient_id LIMIT 1",
    )
    .bind(&caller)
    .fetch_one(pool)
    .await
    .expect("a shared patient");
    let (own_linked, foreign_study): (String, String) = (shared.get(0), shared.get(1));
    let own_plain: String = sqlx::query(
        "SELECT p.patient_id FROM patient p WHERE p.institution = $1 AND NOT EXISTS \
         (SELECT 1 FROM patient_link l WHERE l.institution = p.institution AND l.patient_id = p.patient_id) \
         ORDER BY p.id LIMIT 1",
    )
    .bind(&caller)
    .fetch_one(pool)
    .await
    .expect("an unlinked patient")
    .get(0);
    let own_study: String =
        sqlx::query("SELECT study_uid FROM study WHERE institution = $1 ORDER BY id DESC LIMIT 1")
            .bind(&caller)
            .fetch_one(pool)
            .await
            .expect("own study")
            .get(0);
    let single = |a, v: &str| (a, Matcher::Single(v.to_string()));
    let queries: Vec<(&str, Search)> = vec![
        (
            "PatientID own, linked+disclosed",
            study_search(vec![single(Attr::PatientId, &own_linked)], 100),
        ),
        (
            "PatientID own, unlinked",
            study_search(vec![single(Attr::PatientId, &own_plain)], 100),
        ),
        (
            "PatientName=YAMA*",
            study_search(
                vec![(Attr::PatientName, Matcher::Wildcard("YAMA*".into()))],
                100,
            ),
        ),
        (
            "StudyDate day",
            study_search(vec![single(Attr::StudyDate, "20240101")], 100),
        ),
        (
            "StudyDate month",
            study_search(
                vec![(
                    Attr::StudyDate,
                    Matcher::Range(Some("20230101".into()), Some("20230131".into())),
                )],
                100,
            ),
        ),
        ("all studies (OHIF list)", study_search(vec![], 101)),
        (
            "ModalitiesInStudy=MR",
            study_search(vec![single(Attr::ModalitiesInStudy, "MR")], 100),
        ),
        (
            "StudyInstanceUID own",
            study_search(vec![single(Attr::StudyInstanceUid, &own_study)], 100),
        ),
        (
            "StudyInstanceUID disclosed",
            study_search(vec![single(Attr::StudyInstanceUid, &foreign_study)], 100),
        ),
    ];
    let issuer = caller.clone();
    let scopes: Vec<(&str, Scope)> = vec![
        (
            "consent",
            Scope::consented(&caller, &issuer, chrono::Utc::now(), Vec::new()),
        ),
        ("own only", Scope::institution(&caller)),
        ("unfiltered", Scope::unrestricted_for_audit()),
    ];
    println!(
        "caller {caller}; {rounds} rounds x {runs} runs; in-process index searches; ms, medians over rounds"
    );
    println!(
        "{:38} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>6}",
        "query",
        "p50 cons",
        "p99 cons",
        "p50 own",
        "p99 own",
        "p50 all",
        "p99 all",
        "50 c/o",
        "99 c/o",
        "50 c/a",
        "99 c/a",
        "hits"
    );
    let mut report = Vec::new();
    if std::env::var("BENCH_EXPLAIN").is_ok() {
        for (title, search) in &queries {
            for (name, scope) in &scopes {
                let plan = index.explain(search, scope).await.expect("plan");
                println!("-- {title} / {name}\n{}", plan.join("\n"));
            }
        }
        return;
    }
    for (title, search) in &queries {
        let mut stats: BTreeMap<&str, (Vec<f64>, Vec<f64>, usize)> = BTreeMap::new();
        for _ in 0..rounds {
            // Scopes interleaved per round: drift hits all alike.
            for (name, scope) in &scopes {
                let mut times = Vec::with_capacity(runs);
                let mut hits = 0;
                for i in 0..runs + 3 {
                    let t0 = std::time::Instant::now();
                    let page = index.search(search, scope).await.expect("search");
                    let dt = t0.elapsed().as_secs_f64() * 1000.0;
                    hits = page.hits.len();
                    if i >= 3 {
                        times.push(dt);
                    }
                }
                times.sort_by(|a, b| a.total_cmp(b));
                let e = stats.entry(name).or_default();
                e.0.push(times[times.len() / 2]);
                e.1.push(times[((times.len() - 1) as f64 * 0.99).round() as usize]);
                e.2 = hits;
            }
        }
        let med = |v: &Vec<f64>| {
            let mut v = v.clone();
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let get = |s: &str| {
            let e = &stats[s];
            (med(&e.0), med(&e.1), e.2)
        };
        let (c50, c99, ch) = get("consent");
        let (o50, o99, _) = get("own only");
        let (a50, a99, _) = get("unfiltered");
        println!(
            "{title:38} {c50:8.3} {c99:8.3} {o50:8.3} {o99:8.3} {a50:8.3} {a99:8.3} {:7.2} {:7.2} {:7.2} {:7.2} {ch:>6}",
            c50 / o50,
            c99 / o99,
            c50 / a50,
            c99 / a99
        );
        report.push(serde_json::json!({
            "query": title, "hits_consent": ch,
            "consent": {"p50": c50, "p99": c99}, "own": {"p50": o50, "p99": o99},
            "unfiltered": {"p50": a50, "p99": a99},
        }));
    }
    if let Some(out) = args.get(4) {
        std::fs::write(out, serde_json::to_string_pretty(&report).expect("json")).expect("write");
    }
}
