//! Reading the trail: pages of events for an institution's admin, by
//! patient ("who looked at my images"), user and time, and ranges by
//! sequence number for `verify`.

use std::collections::HashMap;

use serde::Serialize;
use sqlx::{AnyPool, Row};

use super::chain::Sequenced;
use super::codes::{self, EventCodes};
use super::{Action, AuditObject, Event, Outcome};
use crate::index::IndexError;

/// What an admin asks of the trail.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// The admin's institution: events of its users, and events touching
    /// its patients.
    pub institution: String,
    /// One of the institution's own patient IDs.
    pub patient_id: Option<String>,
    pub user: Option<String>,
    /// `clock::stamp` bounds, inclusive from, exclusive to.
    pub from: Option<String>,
    pub to: Option<String>,
    pub limit: i64,
    pub offset: i64,
    /// Only events before this sequence number: the next page after one
    /// whose last event it is. Stable, where `offset` shifts by every event
    /// appended meanwhile (reading a page appends one).
    pub before: Option<i64>,
}

/// An event as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Shown {
    #[serde(flatten)]
    pub sequenced: Sequenced,
    pub codes: EventCodes,
}

const EVENT_COLS: &str = "e.seq, e.at, e.action, e.outcome, e.user_name, e.institution, e.role, \
     e.client, e.detail, e.prev_hash, e.hash";

fn parse_enum<T: serde::de::DeserializeOwned>(s: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
}

fn event_of(r: &sqlx::any::AnyRow) -> Sequenced {
    let action: String = r.get(2);
    let outcome: String = r.get(3);
    let detail: String = r.get(8);
    Sequenced {
        seq: r.get(0),
        event: Event {
            at: r.get(1),
            // Unknown names cannot verify: their hash covers the name.
            action: parse_enum(&action).unwrap_or(Action::Authorize),
            outcome: parse_enum(&outcome).unwrap_or(Outcome::Failure),
            user: r.get(4),
            institution: r.get(5),
            role: r.get(6),
            client: r.get(7),
            objects: Vec::new(),
            detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
        },
        prev_hash: r.get(9),
        hash: r.get(10),
    }
}

/// Attach each event's objects (one query for the page).
async fn with_objects(pool: &AnyPool, events: &mut [Sequenced]) -> Result<(), IndexError> {
    if events.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = (1..=events.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "SELECT seq, patient_institution, patient_id, study_uid FROM audit_object \
         WHERE seq IN ({})",
        list.join(", ")
    );
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for e in events.iter() {
        q = q.bind(e.seq);
    }
    let rows = q.fetch_all(pool).await?;
    let mut by_seq: HashMap<i64, Vec<AuditObject>> = HashMap::new();
    for r in rows {
        by_seq.entry(r.get(0)).or_default().push(AuditObject {
            patient_institution: r.get(1),
            patient_id: r.get(2),
            study_uid: r.get(3),
        });
    }
    for e in events {
        if let Some(mut objs) = by_seq.remove(&e.seq) {
            objs.sort();
            e.event.objects = objs;
        }
    }
    Ok(())
}

/// Events `from_seq ..` (at most `limit`), in order, with their objects.
pub async fn read_range(
    pool: &AnyPool,
    from_seq: i64,
    limit: i64,
) -> Result<Vec<Sequenced>, IndexError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {EVENT_COLS} FROM audit_event e WHERE e.seq >= $1 ORDER BY e.seq LIMIT $2"
    )))
    .bind(from_seq)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let mut events: Vec<Sequenced> = rows.iter().map(event_of).collect();
    with_objects(pool, &mut events).await?;
    Ok(events)
}

/// Detail of another institution's event an admin is shown (the request's
/// level and UIDs, whether a link joined a record, a break-glass reason).
pub const SHOWN_TO_OTHERS: &[&str] = &[
    "level",
    "study",
    "series",
    "instance",
    "joined",
    "reason",
    "expires_at",
    "break_glass",
];

/// A page of the trail for an admin, newest first. Events show other
/// institutions' objects only where the admin's own user succeeded; its own
/// users' refused requests show as the failures absent data gives; other
/// institutions' events show only `SHOWN_TO_OTHERS` of their detail; only
/// the admin institution's own successes carry their chain hashes. (What is
/// shown is derived at reading: the stored chain is unchanged.)
pub async fn query(pool: &AnyPool, f: &Filter) -> Result<Vec<Shown>, IndexError> {
    let mut conds = vec![
        "(e.institution = $1 OR EXISTS (SELECT 1 FROM audit_object o WHERE o.seq = e.seq \
         AND o.patient_institution = $1))"
            .to_string(),
    ];
    let mut binds: Vec<String> = vec![f.institution.clone()];
    let mut bind = |v: &str| {
        binds.push(v.to_string());
        format!("${}", binds.len())
    };
    if let Some(p) = &f.patient_id {
        let (i, p) = (bind(&f.institution), bind(p));
        conds.push(format!(
            "EXISTS (SELECT 1 FROM audit_object o WHERE o.seq = e.seq AND o.patient_institution = {i} \
             AND o.patient_id = {p})"
        ));
    }
    if let Some(u) = &f.user {
        conds.push(format!("e.user_name = {}", bind(u)));
    }
    if let Some(t) = &f.from {
        conds.push(format!("e.at >= {}", bind(t)));
    }
    if let Some(t) = &f.to {
        conds.push(format!("e.at < {}", bind(t)));
    }
    if let Some(b) = f.before {
        // An integer: the bind list is text, and SQLite and PostgreSQL
        // would compare a text bind with `seq` differently.
        conds.push(format!("e.seq < {b}"));
    }
    let n = binds.len();
    let sql = format!(
        "SELECT {EVENT_COLS} FROM audit_event e WHERE {} ORDER BY e.seq DESC LIMIT ${} OFFSET ${}",
        conds.join(" AND "),
        n + 1,
        n + 2
    );
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for b in &binds {
        q = q.bind(b.clone());
    }
    let rows = q.bind(f.limit).bind(f.offset).fetch_all(pool).await?;
    let mut events: Vec<Sequenced> = rows.iter().map(event_of).collect();
    with_objects(pool, &mut events).await?;
    Ok(events
        .into_iter()
        .map(|mut s| {
            // Objects of other institutions are shown only where the admin's
            // own user was shown them: a refused request names what it was
            // refused (for the owner's admins), which the requester's
            // institution must not learn.
            let own = s.event.institution == f.institution;
            let saw_them = own && s.event.outcome == super::Outcome::Success;
            // An event shown as stored carries its hashes. Every other kind
            // may be shown changed (below), and its hashes would tell which
            // were: none of that kind carries them.
            if !saw_them {
                s.prev_hash.clear();
                s.hash.clear();
            }
            if !saw_them {
                let named = s.event.objects.len();
                s.event
                    .objects
                    .retain(|o| o.patient_institution == f.institution);
                // The user was answered 404, as for something absent: its
                // own institution sees the failure an absent one is, or it
                // could tell another institution's hidden data from none.
                if own
                    && s.event.outcome == super::Outcome::Denied
                    && named > 0
                    && s.event.objects.is_empty()
                {
                    s.event.outcome = super::Outcome::Failure;
                }
            }
            if !own {
                // Another institution's request shows who touched what and
                // why (a break-glass reason), not what it asked or how much
                // it got: its query may name its own patients, and counts
                // include objects this admin may not see.
                if let serde_json::Value::Object(d) = &mut s.event.detail {
                    d.retain(|k, _| SHOWN_TO_OTHERS.contains(&k.as_str()));
                }
            }
            let codes = codes::of(s.event.action, s.event.outcome);
            Shown {
                sequenced: s,
                codes,
            }
        })
        .collect())
}
