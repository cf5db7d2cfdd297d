//! `study_access`: the visibility rule precomputed per study (migration
//! 0004) — one 'own' row for the study's institution, one 'disclosed' row per
//! institution the consent records open it to. Derived from the index and
//! the records, written here only: by the index writer for each study it
//! writes, and by every change of links and disclosures for the studies of
//! the identity record it touches.

use std::sync::LazyLock;

use super::search::PatientKey;
use super::{Index, IndexError, RecordLock};

/// The owner's access row of study $1 (institution $2, date $3, patient
/// row $4).
pub(super) const OWN_ROW: &str = "INSERT INTO study_access (study_ref, institution, expires_at, \
     kind, study_date, patient_ref) VALUES ($1, $2, NULL, 'own', $3, $4) \
     ON CONFLICT (study_ref, institution) DO UPDATE SET study_date = excluded.study_date";

/// Drop the 'disclosed' rows of study $1 (before deriving them again).
pub(super) const FORGET_DISCLOSED: &str =
    "DELETE FROM study_access WHERE study_ref = $1 AND kind = 'disclosed'";

/// The 'disclosed' rows of study $1, derived from the records.
pub(super) static DISCLOSED_FOR_STUDY: LazyLock<String> =
    LazyLock::new(|| disclosed_rows_insert("st.id = $1"));

/// The statement that adds the 'disclosed' rows of the studies whose study
/// `st` or patient row `p` satisfies `filter`: one per institution that
/// the rule opens them to (an active disclosure of the patient's identity
/// record by the owner, to an institution that links the record too), with
/// the latest expiry (NULL: none) of those disclosures, and the patient ID
/// that institution is shown for the patient: the least of its own IDs
/// linked to the record (`Scope::presented_id` without a preferred ID).
fn disclosed_rows_insert(filter: &str) -> String {
    format!(
        "INSERT INTO study_access (study_ref, institution, expires_at, kind, study_date, \
         patient_ref, presented_patient_id) SELECT st.id, d.to_institution, \
         CASE WHEN COUNT(*) > COUNT(d.expires_at) THEN NULL ELSE MAX(d.expires_at) END, 'disclosed', \
         st.study_date, st.patient_ref, (SELECT MIN(ml.patient_id) FROM patient_link ml \
         WHERE ml.record = sl.record AND ml.institution = d.to_institution) \
         FROM patient p JOIN study st ON st.patient_ref = p.id \
         JOIN patient_link sl ON sl.institution = p.institution AND sl.issuer = p.issuer \
         AND sl.patient_id = p.patient_id \
         JOIN disclosure d ON d.record = sl.record AND d.from_institution = sl.institution \
         AND d.revoked_at IS NULL \
         WHERE {filter} AND EXISTS (SELECT 1 FROM patient_link tl WHERE tl.record = sl.record \
         AND tl.institution = d.to_institution) \
         GROUP BY st.id, st.study_date, st.patient_ref, sl.record, d.to_institution"
    )
}

/// Rewrite the 'disclosed' rows of the studies of `patients` from the
/// links and disclosures as they now are, in the caller's transaction.
pub async fn refresh_for_patients(
    c: &mut sqlx::AnyConnection,
    patients: &[PatientKey],
) -> Result<(), IndexError> {
    if patients.is_empty() {
        return Ok(());
    }
    let keys: Vec<String> = (0..patients.len())
        .map(|k| {
            let n = 3 * k;
            format!(
                "(p.institution = ${} AND p.issuer = ${} AND p.patient_id = ${})",
                n + 1,
                n + 2,
                n + 3
            )
        })
        .collect();
    let keys = keys.join(" OR ");
    let delete = format!(
        "DELETE FROM study_access WHERE kind = 'disclosed' AND study_ref IN \
         (SELECT st.id FROM study st JOIN patient p ON p.id = st.patient_ref WHERE {keys})"
    );
    let insert = disclosed_rows_insert(&format!("({keys})"));
    for sql in [delete, insert] {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (i, s, p) in patients {
            q = q.bind(i.clone()).bind(s.clone()).bind(p.clone());
        }
        q.execute(&mut *c).await?;
    }
    Ok(())
}

impl Index {
    /// Derive every 'disclosed' row again from the records: for records
    /// written other than through `access::records` (bulk loads,
    /// benchmarks, repairs), which keeps them up to date itself.
    pub async fn rebuild_access(&self) -> Result<(), IndexError> {
        let mut tx = self.begin_records(RecordLock::Consent).await?;
        sqlx::query("DELETE FROM study_access WHERE kind = 'disclosed'")
            .execute(&mut *tx)
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(disclosed_rows_insert("1 = 1")))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}
