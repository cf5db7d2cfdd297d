//! The records of consent, kept in the index database beside (not in) the
//! index: identity records with their patient ID links (名寄せ),
//! disclosures (公開設定) and break-glass grants. Every change runs in one
//! serialized transaction (`Index::begin_records`), so a check (does the
//! other institution disclose to me?) and the write it allows cannot race;
//! the same transaction derives the access rows of the identity record's
//! studies again (`index::access`).
//!
//! Whatever the caller may not see is `NotFound`, exactly like what does
//! not exist: a join to an undisclosed ID, a disclosure of another
//! institution.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;

use super::{Institution, Institutions};
use crate::clock::stamp;
use crate::index::search::PatientKey;
use crate::index::{Index, IndexError, RecordLock, access};

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("no such record")]
    NotFound,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Index(#[from] IndexError),
}

impl From<sqlx::Error> for RecordError {
    fn from(e: sqlx::Error) -> Self {
        Self::Index(IndexError::Database(e))
    }
}

/// A patient ID as PS3.5 allows it (LO: at most 64 characters, no
/// backslash or control characters), without padding.
pub fn valid_patient_id(id: &str) -> Result<&str, RecordError> {
    let t = id.trim();
    if t.is_empty() || t.chars().count() > 64 || t.chars().any(|c| c == '\\' || c.is_control()) {
        return Err(RecordError::Invalid(format!(
            "{id:?} is not a valid patient ID (1 to 64 characters, no backslash or control characters)"
        )));
    }
    Ok(t)
}

/// Free text an administrator or clinician states (a consent reference, a
/// break-glass reason): `min` to `max` characters once trimmed, no control
/// characters (it is stored, audited and shown again).
fn valid_statement<'a>(
    what: &str,
    text: &'a str,
    min: usize,
    max: usize,
) -> Result<&'a str, RecordError> {
    let t = text.trim();
    let n = t.chars().count();
    if n < min || n > max || t.chars().any(char::is_control) {
        return Err(RecordError::Invalid(format!(
            "{what} must be {min} to {max} characters without control characters"
        )));
    }
    Ok(t)
}

/// Longest consent reference or break-glass reason kept.
pub const STATEMENT_MAX: usize = 1024;

/// A statement as the audit trail keeps it, valid or not: at most
/// `STATEMENT_MAX` characters, control characters replaced.
pub fn as_stated(text: &str) -> String {
    text.chars()
        .take(STATEMENT_MAX)
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect()
}

/// A link of the caller's, as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Link {
    pub institution: String,
    pub issuer_of_patient_id: String,
    pub patient_id: String,
    pub created_by: String,
    pub created_at: String,
}

/// A disclosure, as the API shows it to its discloser or recipient.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Disclosure {
    pub id: String,
    pub from_institution: String,
    pub to_institution: String,
    /// The discloser's patient ID.
    pub patient_id: String,
    pub consent_reference: String,
    pub consented_at: String,
    pub expires_at: Option<String>,
    pub created_by: String,
    pub created_at: String,
    pub revoked_at: Option<String>,
    pub revoked_by: Option<String>,
    /// `active`, `expired` or `revoked`, as of the request.
    pub status: &'static str,
}

/// The caller's view of an identity record.
#[derive(Debug, Clone, Serialize)]
pub struct PatientView {
    pub link: Link,
    /// Active disclosures of this record by the caller.
    pub disclosed_to: Vec<Disclosure>,
    /// Active disclosures of this record to the caller, with the
    /// discloser's patient ID.
    pub disclosed_by: Vec<Disclosure>,
}

/// A break-glass grant.
#[derive(Debug, Clone, Serialize)]
pub struct Grant {
    pub id: String,
    pub user: String,
    pub institution: String,
    pub patient_institution: String,
    pub patient_id: String,
    pub reason: String,
    pub granted_at: String,
    pub expires_at: String,
}

/// Which side of a disclosure the caller is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Given,
    Received,
}

/// A new disclosure's terms.
#[derive(Debug, Clone)]
pub struct NewDisclosure<'a> {
    pub patient_id: &'a str,
    pub to_institution: &'a str,
    pub consent_reference: &'a str,
    pub consented_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

const DISCLOSURE_COLS: &str = "d.id, d.from_institution, d.to_institution, d.patient_id, \
     d.consent_reference, d.consented_at, d.expires_at, d.created_by, d.created_at, \
     d.revoked_at, d.revoked_by";

fn disclosure_of(r: &sqlx::any::AnyRow, now: &str) -> Disclosure {
    let expires_at: Option<String> = r.get(6);
    let revoked_at: Option<String> = r.get(9);
    let status = if revoked_at.is_some() {
        "revoked"
    } else if expires_at.as_deref().is_some_and(|e| e <= now) {
        "expired"
    } else {
        "active"
    };
    Disclosure {
        id: r.get(0),
        from_institution: r.get(1),
        to_institution: r.get(2),
        patient_id: r.get(3),
        consent_reference: r.get(4),
        consented_at: r.get(5),
        expires_at,
        created_by: r.get(7),
        created_at: r.get(8),
        revoked_at,
        revoked_by: r.get(10),
        status,
    }
}

fn link_of(r: &sqlx::any::AnyRow) -> Link {
    Link {
        institution: r.get(0),
        issuer_of_patient_id: r.get(1),
        patient_id: r.get(2),
        created_by: r.get(3),
        created_at: r.get(4),
    }
}

/// The records API over the index database.
pub struct Records<'a> {
    pub index: &'a Index,
    pub institutions: &'a Institutions,
}

/// The identity record `inst` links `patient_id` to.
async fn record_of(
    c: &mut sqlx::AnyConnection,
    inst: &Institution,
    patient_id: &str,
) -> Result<Option<i64>, RecordError> {
    Ok(sqlx::query(
        "SELECT record FROM patient_link WHERE institution = $1 AND issuer = $2 AND patient_id = $3",
    )
    .bind(&inst.code)
    .bind(&inst.issuer_of_patient_id)
    .bind(patient_id)
    .fetch_optional(&mut *c)
    .await?
    .map(|r| r.get(0)))
}

/// Every (institution, issuer, patient ID) linked to `record`.
async fn links_of(
    c: &mut sqlx::AnyConnection,
    record: i64,
) -> Result<Vec<PatientKey>, RecordError> {
    Ok(
        sqlx::query("SELECT institution, issuer, patient_id FROM patient_link WHERE record = $1")
            .bind(record)
            .fetch_all(&mut *c)
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect(),
    )
}

/// Derive the access rows of every patient linked to `record` again.
async fn refresh_record(c: &mut sqlx::AnyConnection, record: i64) -> Result<(), RecordError> {
    let affected = links_of(&mut *c, record).await?;
    Ok(access::refresh_for_patients(c, &affected).await?)
}

impl Records<'_> {
    /// Link `inst`'s `patient_id` to a new identity record, or to the
    /// record holding `join` (another institution's code and patient ID) if
    /// that institution discloses the record to `inst`.
    pub async fn link(
        &self,
        inst: &Institution,
        user: &str,
        patient_id: &str,
        join: Option<(&str, &str)>,
        now: DateTime<Utc>,
    ) -> Result<Link, RecordError> {
        let patient_id = valid_patient_id(patient_id)?;
        let now_s = stamp(now);
        let mut tx = self.index.begin_records(RecordLock::Consent).await?;
        if record_of(&mut tx, inst, patient_id).await?.is_some() {
            return Err(RecordError::Conflict(format!(
                "patient ID {patient_id} is already linked; unlink it first"
            )));
        }
        let record = match join {
            Some((other_code, other_id)) => {
                // Unknown institution, unknown ID, no active disclosure to
                // the caller: all the same answer.
                let other = self
                    .institutions
                    .by_code(other_code)
                    .filter(|o| o.code != inst.code)
                    .ok_or(RecordError::NotFound)?;
                let record = record_of(&mut tx, &other, other_id.trim())
                    .await?
                    .ok_or(RecordError::NotFound)?;
                let disclosed = sqlx::query(
                    "SELECT 1 FROM disclosure WHERE record = $1 AND from_institution = $2 \
                     AND to_institution = $3 AND revoked_at IS NULL \
                     AND (expires_at IS NULL OR expires_at > $4)",
                )
                .bind(record)
                .bind(&other.code)
                .bind(&inst.code)
                .bind(&now_s)
                .fetch_optional(&mut *tx)
                .await?;
                if disclosed.is_none() {
                    return Err(RecordError::NotFound);
                }
                record
            }
            None => {
                sqlx::query("INSERT INTO identity_record (created_at) VALUES ($1) RETURNING id")
                    .bind(&now_s)
                    .fetch_one(&mut *tx)
                    .await?
                    .get(0)
            }
        };
        sqlx::query(
            "INSERT INTO patient_link (institution, issuer, patient_id, record, created_by, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&inst.code)
        .bind(&inst.issuer_of_patient_id)
        .bind(patient_id)
        .bind(record)
        .bind(user)
        .bind(&now_s)
        .execute(&mut *tx)
        .await?;
        refresh_record(&mut tx, record).await?;
        tx.commit().await?;
        Ok(Link {
            institution: inst.code.clone(),
            issuer_of_patient_id: inst.issuer_of_patient_id.clone(),
            patient_id: patient_id.to_string(),
            created_by: user.to_string(),
            created_at: now_s,
        })
    }

    /// Remove `inst`'s link of `patient_id`. When `inst` no longer links the
    /// record at all, its disclosures of the record end (revoked, kept).
    /// Returns the disclosures so revoked.
    pub async fn unlink(
        &self,
        inst: &Institution,
        user: &str,
        patient_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<String>, RecordError> {
        let now_s = stamp(now);
        let mut tx = self.index.begin_records(RecordLock::Consent).await?;
        let record = record_of(&mut tx, inst, patient_id.trim())
            .await?
            .ok_or(RecordError::NotFound)?;
        let affected = links_of(&mut tx, record).await?;
        sqlx::query(
            "DELETE FROM patient_link WHERE institution = $1 AND issuer = $2 AND patient_id = $3",
        )
        .bind(&inst.code)
        .bind(&inst.issuer_of_patient_id)
        .bind(patient_id.trim())
        .execute(&mut *tx)
        .await?;
        let still_linked =
            sqlx::query("SELECT 1 FROM patient_link WHERE record = $1 AND institution = $2")
                .bind(record)
                .bind(&inst.code)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
        let mut revoked = Vec::new();
        if !still_linked {
            revoked = sqlx::query(
                "SELECT id FROM disclosure WHERE record = $1 AND from_institution = $2 \
                 AND revoked_at IS NULL ORDER BY id",
            )
            .bind(record)
            .bind(&inst.code)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.get::<String, _>(0))
            .collect();
            sqlx::query(
                "UPDATE disclosure SET revoked_at = $1, revoked_by = $2 \
                 WHERE record = $3 AND from_institution = $4 AND revoked_at IS NULL",
            )
            .bind(&now_s)
            .bind(user)
            .bind(record)
            .bind(&inst.code)
            .execute(&mut *tx)
            .await?;
        }
        access::refresh_for_patients(&mut tx, &affected).await?;
        tx.commit().await?;
        Ok(revoked)
    }

    /// The caller's view of the record its `patient_id` is linked to.
    pub async fn patient(
        &self,
        inst: &Institution,
        patient_id: &str,
        now: DateTime<Utc>,
    ) -> Result<PatientView, RecordError> {
        let now_s = stamp(now);
        let mut c = self.index.pool().acquire().await?;
        let row = sqlx::query(
            "SELECT institution, issuer, patient_id, created_by, created_at, record FROM patient_link \
             WHERE institution = $1 AND issuer = $2 AND patient_id = $3",
        )
        .bind(&inst.code)
        .bind(&inst.issuer_of_patient_id)
        .bind(patient_id.trim())
        .fetch_optional(&mut *c)
        .await?
        .ok_or(RecordError::NotFound)?;
        let link = link_of(&row);
        let record: i64 = row.get(5);
        // Active disclosures of the record by the caller, then to it (a
        // discloser's end with its link: unlinking revokes them).
        let mut sides = Vec::with_capacity(2);
        for side in ["d.from_institution", "d.to_institution"] {
            let list: Vec<Disclosure> = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {DISCLOSURE_COLS} FROM disclosure d WHERE d.record = $1 AND {side} = $2 \
                 AND d.revoked_at IS NULL AND (d.expires_at IS NULL OR d.expires_at > $3) \
                 ORDER BY d.created_at, d.id"
            )))
            .bind(record)
            .bind(&inst.code)
            .bind(&now_s)
            .fetch_all(&mut *c)
            .await?
            .iter()
            .map(|r| disclosure_of(r, &now_s))
            .collect();
            sides.push(list);
        }
        let disclosed_by = sides.pop().unwrap_or_default();
        let disclosed_to = sides.pop().unwrap_or_default();
        Ok(PatientView {
            link,
            disclosed_to,
            disclosed_by,
        })
    }

    /// Disclose the record `inst` links `d.patient_id` to, to another institution.
    pub async fn disclose(
        &self,
        inst: &Institution,
        user: &str,
        d: &NewDisclosure<'_>,
        now: DateTime<Utc>,
    ) -> Result<Disclosure, RecordError> {
        let to = self.institutions.by_code(d.to_institution).ok_or_else(|| {
            RecordError::Invalid(format!(
                "to_institution {:?} is not an institution of this network",
                d.to_institution
            ))
        })?;
        if to.code == inst.code {
            return Err(RecordError::Invalid(
                "an institution does not disclose to itself".into(),
            ));
        }
        valid_statement("consent_reference", d.consent_reference, 1, STATEMENT_MAX)?;
        if d.consented_at > now {
            return Err(RecordError::Invalid(
                "consented_at lies in the future".into(),
            ));
        }
        if let Some(e) = d.expires_at
            && e <= now
        {
            return Err(RecordError::Invalid(
                "expires_at must lie in the future".into(),
            ));
        }
        let now_s = stamp(now);
        let mut tx = self.index.begin_records(RecordLock::Consent).await?;
        let record = record_of(&mut tx, inst, d.patient_id.trim())
            .await?
            .ok_or(RecordError::NotFound)?;
        let id = uuid::Uuid::new_v4().to_string();
        sqlx::query(
            "INSERT INTO disclosure (id, record, from_institution, to_institution, patient_id, \
             consent_reference, consented_at, expires_at, created_by, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&id)
        .bind(record)
        .bind(&inst.code)
        .bind(&to.code)
        .bind(d.patient_id.trim())
        .bind(d.consent_reference.trim())
        .bind(stamp(d.consented_at))
        .bind(d.expires_at.map(stamp))
        .bind(user)
        .bind(&now_s)
        .execute(&mut *tx)
        .await?;
        refresh_record(&mut tx, record).await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {DISCLOSURE_COLS} FROM disclosure d WHERE d.id = $1"
        )))
        .bind(&id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(disclosure_of(&row, &now_s))
    }

    /// Revoke one of `inst`'s disclosures (kept, with who and when).
    pub async fn revoke(
        &self,
        inst: &Institution,
        user: &str,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Disclosure, RecordError> {
        let now_s = stamp(now);
        let mut tx = self.index.begin_records(RecordLock::Consent).await?;
        let sql = format!(
            "SELECT {DISCLOSURE_COLS} FROM disclosure d WHERE d.id = $1 AND d.from_institution = $2"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .bind(id)
            .bind(&inst.code)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(RecordError::NotFound)?;
        if disclosure_of(&row, &now_s).revoked_at.is_some() {
            return Err(RecordError::Conflict(
                "the disclosure is already revoked".into(),
            ));
        }
        sqlx::query("UPDATE disclosure SET revoked_at = $1, revoked_by = $2 WHERE id = $3")
            .bind(&now_s)
            .bind(user)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let record: i64 = sqlx::query("SELECT record FROM disclosure WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?
            .get(0);
        refresh_record(&mut tx, record).await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(&inst.code)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(disclosure_of(&row, &now_s))
    }

    /// The caller's disclosures, given or received, newest first; for one
    /// of its patient IDs if given (received: the record it links).
    pub async fn disclosures(
        &self,
        inst: &Institution,
        direction: Direction,
        patient_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Disclosure>, RecordError> {
        let now_s = stamp(now);
        let mut c = self.index.pool().acquire().await?;
        let side = match direction {
            Direction::Given => "d.from_institution",
            Direction::Received => "d.to_institution",
        };
        let rows = match patient_id {
            None => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {DISCLOSURE_COLS} FROM disclosure d WHERE {side} = $1 \
                     ORDER BY d.created_at DESC, d.id"
                )))
                .bind(&inst.code)
                .fetch_all(&mut *c)
                .await?
            }
            Some(pid) => {
                let Some(record) = record_of(&mut c, inst, pid.trim()).await? else {
                    return Ok(Vec::new());
                };
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {DISCLOSURE_COLS} FROM disclosure d WHERE {side} = $1 AND d.record = $2 \
                     ORDER BY d.created_at DESC, d.id"
                )))
                .bind(&inst.code)
                .bind(record)
                .fetch_all(&mut *c)
                .await?
            }
        };
        Ok(rows.iter().map(|r| disclosure_of(r, &now_s)).collect())
    }

    /// Grant `user` of `inst` emergency read access to the patient
    /// `patient_id` of `patient_institution` (and the record it links)
    /// for `hours`.
    #[allow(clippy::too_many_arguments)]
    pub async fn break_glass(
        &self,
        inst: &Institution,
        user: &str,
        patient_institution: &str,
        patient_id: &str,
        reason: &str,
        hours: u32,
        now: DateTime<Utc>,
    ) -> Result<Grant, RecordError> {
        let owner = self
            .institutions
            .by_code(patient_institution)
            .ok_or_else(|| {
                RecordError::Invalid(format!(
                    "institution {patient_institution:?} is not an institution of this network"
                ))
            })?;
        let patient_id = valid_patient_id(patient_id)?;
        let reason = valid_statement("a break-glass reason", reason, 4, STATEMENT_MAX)?;
        let grant = Grant {
            id: uuid::Uuid::new_v4().to_string(),
            user: user.to_string(),
            institution: inst.code.clone(),
            patient_institution: owner.code.clone(),
            patient_id: patient_id.to_string(),
            reason: reason.trim().to_string(),
            granted_at: stamp(now),
            expires_at: stamp(now + chrono::Duration::hours(i64::from(hours))),
        };
        let mut tx = self.index.begin_records(RecordLock::Consent).await?;
        sqlx::query(
            "INSERT INTO break_glass (id, user_name, institution, patient_institution, \
             patient_issuer, patient_id, reason, granted_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&grant.id)
        .bind(&grant.user)
        .bind(&grant.institution)
        .bind(&owner.code)
        .bind(&owner.issuer_of_patient_id)
        .bind(&grant.patient_id)
        .bind(&grant.reason)
        .bind(&grant.granted_at)
        .bind(&grant.expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(grant)
    }
}
