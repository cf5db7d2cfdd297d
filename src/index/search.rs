//! QIDO-RS searches on the index: matching (PS3.4 §C.2.2.2) turned into one
//! parameterized SQL query per level, always under an access `Scope`; the
//! computed attributes come with the page's rows (counts kept on the study
//! and series rows, modalities a subquery per row of the page).

use std::collections::HashMap;

use super::IndexError;
use super::read::{Bind, Reader, Row};
use crate::dicom::coerce::Coercion;
use crate::dicom::summary::{OtherPatientId, is_uid, pn_key};

/// Whose objects a query may see. Every read of the index takes one, so no
/// query can run unfiltered. The consent rule (DESIGN §2) is here, in one
/// place: a caller of institution T sees its own objects, and an object of
/// institution S with patient ID p iff an identity record links (S, p) and
/// T, and S has an active disclosure of that record to T; or an active
/// break-glass grant of the caller covers the patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    institution: String,
    /// The caller's issuer of patient IDs: what other institutions'
    /// patients are shown under.
    issuer: String,
    reach: Reach,
    /// Now, as stored (`clock::stamp`): disclosures and grants expire.
    now: String,
    grants: Vec<GrantedPatient>,
}

/// How far a scope reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Every object (the audit trail's check only).
    Everything,
    /// The institution's own objects.
    Own,
    /// The consent rule.
    Consent,
}

/// A patient a break-glass grant opens (with every patient its identity
/// record links).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantedPatient {
    pub institution: String,
    pub issuer: String,
    pub patient_id: String,
}

impl Scope {
    /// The objects of one institution only.
    pub fn institution(code: &str) -> Self {
        Self {
            institution: code.to_string(),
            issuer: String::new(),
            reach: Reach::Own,
            now: String::new(),
            grants: Vec::new(),
        }
    }

    /// Every institution's objects: only to tell, for the audit trail, a
    /// refused request for something hidden from one for something absent.
    /// Never used to answer a request.
    pub fn unrestricted_for_audit() -> Self {
        Self {
            institution: String::new(),
            issuer: String::new(),
            reach: Reach::Everything,
            now: String::new(),
            grants: Vec::new(),
        }
    }

    /// What a user of `institution` (patient IDs issued by `issuer`) may see
    /// at `now`, with the patients of its active break-glass `grants`.
    pub fn consented(
        institution: &str,
        issuer: &str,
        now: chrono::DateTime<chrono::Utc>,
        grants: Vec<GrantedPatient>,
    ) -> Self {
        Self {
            institution: institution.to_string(),
            issuer: issuer.to_string(),
            reach: Reach::Consent,
            now: crate::clock::stamp(now),
            grants,
        }
    }

    /// The caller's issuer of patient IDs.
    pub(super) fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Whether the consent rule applies (others' objects may be visible,
    /// shown under the caller's IDs).
    /// Whether the caller holds an active break-glass grant: its reads
    /// are then audited as made under it.
    pub fn under_break_glass(&self) -> bool {
        !self.grants.is_empty()
    }

    pub(super) fn consent(&self) -> bool {
        self.reach == Reach::Consent
    }

    /// The SQL condition on study alias `st`.
    pub(super) fn condition(&self, q: &mut Sql) -> String {
        let t = match self.reach {
            Reach::Everything => return "1 = 1".into(),
            Reach::Own => return format!("st.institution = {}", q.bind_text(&self.institution)),
            Reach::Consent => q.bind_text(&self.institution),
        };
        let now = q.bind_text(&self.now);
        // The rule, precomputed per study (`study_access`, kept by the index
        // writer and every change of links and disclosures); only expiry is
        // left to the moment of the query.
        let mut alts = vec![
            format!("st.institution = {t}"),
            format!(
                "EXISTS (SELECT 1 FROM study_access sa WHERE sa.study_ref = st.id \
                 AND sa.institution = {t} AND (sa.expires_at IS NULL OR sa.expires_at > {now}))"
            ),
        ];
        for g in &self.grants {
            let (gi, gs, gp) = (
                q.bind_text(&g.institution),
                q.bind_text(&g.issuer),
                q.bind_text(&g.patient_id),
            );
            alts.push(format!(
                "EXISTS (SELECT 1 FROM patient bp WHERE bp.id = st.patient_ref AND \
                 ((bp.institution = {gi} AND bp.issuer = {gs} AND bp.patient_id = {gp}) OR \
                 EXISTS (SELECT 1 FROM patient_link bl JOIN patient_link bg ON bg.record = bl.record \
                 WHERE bl.institution = bp.institution AND bl.issuer = bp.issuer \
                 AND bl.patient_id = bp.patient_id AND bg.institution = {gi} AND bg.issuer = {gs} \
                 AND bg.patient_id = {gp})))"
            ));
        }
        format!("({})", alts.join(" OR "))
    }

    /// Whether searches join the caller's access rows (alias `sa`) instead of
    /// testing each study: under the consent rule, with no break-glass grant
    /// (grants are tested per study).
    fn walks_access(&self) -> bool {
        self.consent() && self.grants.is_empty()
    }

    /// The condition on the joined access row `sa`.
    fn access_row_condition(&self, q: &mut Sql) -> String {
        let t = q.bind_text(&self.institution);
        let now = q.bind_text(&self.now);
        format!("sa.institution = {t} AND (sa.expires_at IS NULL OR sa.expires_at > {now})")
    }

    /// Whether patient row alias `p` (of another institution) is linked to
    /// a record the caller's institution also links.
    fn linked_to_caller(&self, q: &mut Sql) -> String {
        let t = q.bind_text(&self.institution);
        format!(
            "EXISTS (SELECT 1 FROM patient_link sl JOIN patient_link tl ON tl.record = sl.record \
             WHERE sl.institution = p.institution AND sl.issuer = p.issuer \
             AND sl.patient_id = p.patient_id AND tl.institution = {t})"
        )
    }

    /// The caller's own patient ID for patient row alias `row` of another
    /// institution — in the same identity record: `preferred` (the ID it
    /// searched by) if among them, else the least — or NULL (its own rows,
    /// patients it links no record with). The one definition of how others'
    /// patients are shown, for matching and for answers.
    pub(super) fn presented_id(&self, q: &mut Sql, row: &str, preferred: Option<&str>) -> String {
        let (t1, t2) = (
            q.bind_text(&self.institution),
            q.bind_text(&self.institution),
        );
        let first = match preferred {
            Some(v) => format!(
                "CASE WHEN tl.patient_id = {} THEN 0 ELSE 1 END, ",
                q.bind_text(v)
            ),
            None => String::new(),
        };
        format!(
            "(CASE WHEN {row}.institution <> {t1} THEN (SELECT tl.patient_id FROM patient_link sl \
             JOIN patient_link tl ON tl.record = sl.record WHERE sl.institution = {row}.institution \
             AND sl.issuer = {row}.issuer AND sl.patient_id = {row}.patient_id \
             AND tl.institution = {t2} ORDER BY {first}tl.patient_id LIMIT 1) END)"
        )
    }

    /// `presented_id` without a preferred ID, for a page row `page` (with
    /// its study id `k_study`): as the caller's access row of the study
    /// holds it — one probe of a row the search has just walked instead of
    /// two link lookups. Only without break-glass grants: a grant opens
    /// linked patients that nothing disclosed, which have no such row.
    fn presented_id_on_access_row(&self, q: &mut Sql, page: &str) -> String {
        let (t1, t2) = (
            q.bind_text(&self.institution),
            q.bind_text(&self.institution),
        );
        format!(
            "(CASE WHEN {page}.institution <> {t1} THEN (SELECT pa.presented_patient_id \
             FROM study_access pa WHERE pa.study_ref = {page}.k_study AND pa.institution = {t2}) END)"
        )
    }

    /// The Patient ID the caller sees for patient row alias `p`.
    fn presented_patient_id(&self, q: &mut Sql) -> String {
        let shown = self.presented_id(q, "p", None);
        format!("COALESCE({shown}, p.patient_id)")
    }

    /// The Issuer of Patient ID the caller sees for patient row alias `p`.
    fn presented_issuer(&self, q: &mut Sql) -> String {
        let t = q.bind_text(&self.institution);
        let linked = self.linked_to_caller(q);
        let issuer = q.bind_text(&self.issuer);
        format!("(CASE WHEN p.institution <> {t} AND {linked} THEN {issuer} ELSE p.issuer END)")
    }
}

/// The patients the active break-glass grants of `user` of `institution`
/// open at `now`.
pub async fn granted_patients(
    reader: &Reader,
    institution: &str,
    user: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<GrantedPatient>, IndexError> {
    let mut q = Sql::default();
    let sql = format!(
        "SELECT DISTINCT patient_institution, patient_issuer, patient_id FROM break_glass \
         WHERE institution = {} AND user_name = {} AND expires_at > {}",
        q.bind_text(institution),
        q.bind_text(user),
        q.bind_text(&crate::clock::stamp(now))
    );
    Ok(q.fetch(reader, sql)
        .await?
        .iter()
        .map(|r| GrantedPatient {
            institution: r.text(0),
            issuer: r.text(1),
            patient_id: r.text(2),
        })
        .collect())
}

/// The level a search returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Study,
    Series,
    Instance,
}

/// How values of an attribute are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    PersonName,
    Date,
    Time,
    Uid,
    Int,
}

/// An attribute the index can match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Attr {
    PatientName,
    PatientId,
    IssuerOfPatientId,
    PatientBirthDate,
    PatientSex,
    /// Patient ID (0010,0020) inside Other Patient IDs Sequence (0010,1002).
    OtherPatientId,
    StudyInstanceUid,
    StudyDate,
    StudyTime,
    AccessionNumber,
    StudyId,
    StudyDescription,
    ReferringPhysicianName,
    ModalitiesInStudy,
    SeriesInstanceUid,
    Modality,
    SeriesNumber,
    SeriesDescription,
    PerformedProcedureStepStartDate,
    PerformedProcedureStepStartTime,
    /// Request Attributes Sequence > Scheduled Procedure Step ID.
    ScheduledProcedureStepId,
    /// Request Attributes Sequence > Requested Procedure ID.
    RequestedProcedureId,
    BodyPartExamined,
    SopInstanceUid,
    SopClassUid,
    InstanceNumber,
}

impl Attr {
    /// The attribute of a query key: a keyword or an 8-digit hex tag, or
    /// `OtherPatientIDsSequence.00100020`.
    pub fn from_key(key: &str) -> Option<Self> {
        use Attr::*;
        let k = key.to_ascii_uppercase();
        Some(match k.as_str() {
            "PATIENTNAME" | "00100010" => PatientName,
            "PATIENTID" | "00100020" => PatientId,
            "ISSUEROFPATIENTID" | "00100021" => IssuerOfPatientId,
            "PATIENTBIRTHDATE" | "00100030" => PatientBirthDate,
            "PATIENTSEX" | "00100040" => PatientSex,
            "OTHERPATIENTIDSSEQUENCE.PATIENTID"
            | "OTHERPATIENTIDSSEQUENCE.00100020"
            | "00101002.00100020"
            | "00101002.PATIENTID" => OtherPatientId,
            "STUDYINSTANCEUID" | "0020000D" => StudyInstanceUid,
            "STUDYDATE" | "00080020" => StudyDate,
            "STUDYTIME" | "00080030" => StudyTime,
            "ACCESSIONNUMBER" | "00080050" => AccessionNumber,
            "STUDYID" | "00200010" => StudyId,
            "STUDYDESCRIPTION" | "00081030" => StudyDescription,
            "REFERRINGPHYSICIANNAME" | "00080090" => ReferringPhysicianName,
            "MODALITIESINSTUDY" | "00080061" => ModalitiesInStudy,
            "SERIESINSTANCEUID" | "0020000E" => SeriesInstanceUid,
            "MODALITY" | "00080060" => Modality,
            "SERIESNUMBER" | "00200011" => SeriesNumber,
            "SERIESDESCRIPTION" | "0008103E" => SeriesDescription,
            "PERFORMEDPROCEDURESTEPSTARTDATE" | "00400244" => PerformedProcedureStepStartDate,
            "PERFORMEDPROCEDURESTEPSTARTTIME" | "00400245" => PerformedProcedureStepStartTime,
            "REQUESTATTRIBUTESSEQUENCE.SCHEDULEDPROCEDURESTEPID"
            | "REQUESTATTRIBUTESSEQUENCE.00400009"
            | "00400275.00400009"
            | "00400275.SCHEDULEDPROCEDURESTEPID" => ScheduledProcedureStepId,
            "REQUESTATTRIBUTESSEQUENCE.REQUESTEDPROCEDUREID"
            | "REQUESTATTRIBUTESSEQUENCE.00401001"
            | "00400275.00401001"
            | "00400275.REQUESTEDPROCEDUREID" => RequestedProcedureId,
            "BODYPARTEXAMINED" | "00180015" => BodyPartExamined,
            "SOPINSTANCEUID" | "00080018" => SopInstanceUid,
            "SOPCLASSUID" | "00080016" => SopClassUid,
            "INSTANCENUMBER" | "00200013" => InstanceNumber,
            _ => return None,
        })
    }

    pub fn kind(self) -> Kind {
        use Attr::*;
        match self {
            PatientName | ReferringPhysicianName => Kind::PersonName,
            PatientBirthDate | StudyDate | PerformedProcedureStepStartDate => Kind::Date,
            StudyTime | PerformedProcedureStepStartTime => Kind::Time,
            StudyInstanceUid | SeriesInstanceUid | SopInstanceUid | SopClassUid => Kind::Uid,
            SeriesNumber | InstanceNumber => Kind::Int,
            _ => Kind::Text,
        }
    }

    /// Whether the attribute is the patient's (matched in a subquery on the
    /// patient table, so its indexes lead).
    fn is_patient(self) -> bool {
        use Attr::*;
        matches!(
            self,
            PatientName
                | PatientId
                | IssuerOfPatientId
                | PatientBirthDate
                | PatientSex
                | OtherPatientId
        )
    }

    /// The level whose table holds the attribute.
    pub fn level(self) -> Level {
        use Attr::*;
        match self {
            SeriesInstanceUid
            | Modality
            | SeriesNumber
            | SeriesDescription
            | PerformedProcedureStepStartDate
            | PerformedProcedureStepStartTime
            | ScheduledProcedureStepId
            | RequestedProcedureId
            | BodyPartExamined => Level::Series,
            SopInstanceUid | SopClassUid | InstanceNumber => Level::Instance,
            _ => Level::Study,
        }
    }

    /// The column (or, for person names, the three key columns).
    fn columns(self) -> &'static [&'static str] {
        use Attr::*;
        match self {
            PatientName => &[
                "p.name_alphabetic_key",
                "p.name_ideographic_key",
                "p.name_phonetic_key",
            ],
            ReferringPhysicianName => &[
                "st.referring_alphabetic_key",
                "st.referring_ideographic_key",
                "st.referring_phonetic_key",
            ],
            PatientId => &["p.patient_id"],
            IssuerOfPatientId => &["p.issuer"],
            PatientBirthDate => &["p.birth_date"],
            PatientSex => &["p.sex"],
            OtherPatientId => &["p.other_patient_ids"],
            StudyInstanceUid => &["st.study_uid"],
            StudyDate => &["st.study_date"],
            StudyTime => &["st.study_time"],
            AccessionNumber => &["st.accession_number"],
            StudyId => &["st.study_id"],
            StudyDescription => &["st.description"],
            ModalitiesInStudy => &["ms.modality"],
            SeriesInstanceUid => &["se.series_uid"],
            Modality => &["se.modality"],
            SeriesNumber => &["se.series_number"],
            SeriesDescription => &["se.description"],
            PerformedProcedureStepStartDate => &["se.pps_start_date"],
            PerformedProcedureStepStartTime => &["se.pps_start_time"],
            ScheduledProcedureStepId | RequestedProcedureId => &["se.request_attributes"],
            BodyPartExamined => &["se.body_part"],
            SopInstanceUid => &["i.sop_uid"],
            SopClassUid => &["i.sop_class_uid"],
            InstanceNumber => &["i.instance_number"],
        }
    }
}

/// A matching key's value, validated (PS3.4 §C.2.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    /// Exact (single value) match; for person names, case-insensitive.
    Single(String),
    /// `*` and `?` wildcards.
    Wildcard(String),
    /// Inclusive range; either end may be open.
    Range(Option<String>, Option<String>),
    /// Any of these UIDs.
    UidList(Vec<String>),
    /// Person name with several component groups: each given group must match.
    NameGroups([Option<Box<Matcher>>; 3]),
    /// Person name: any name component starting with each given word.
    Fuzzy(Vec<String>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MatchError {
    #[error("{attribute}: {value:?} is not a valid {what}")]
    Invalid {
        attribute: String,
        value: String,
        what: &'static str,
    },
}

fn is_date(s: &str) -> bool {
    s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit())
}

fn is_time(s: &str) -> bool {
    let (hms, frac) = match s.split_once('.') {
        Some((hms, frac)) => (hms, Some(frac)),
        None => (s, None),
    };
    // A fraction follows whole seconds only, and has 1 to 6 digits.
    matches!(hms.len(), 2 | 4 | 6)
        && hms.bytes().all(|b| b.is_ascii_digit())
        && frac.is_none_or(|f| {
            hms.len() == 6 && (1..=6).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit())
        })
}

impl Matcher {
    /// Parse the value of a matching key for `attr`; `None` for an empty
    /// value (universal matching: no condition, the attribute is returned).
    pub fn parse(
        attr: Attr,
        key: &str,
        value: &str,
        fuzzy: bool,
    ) -> Result<Option<Self>, MatchError> {
        let invalid = |what| MatchError::Invalid {
            attribute: key.to_string(),
            value: value.to_string(),
            what,
        };
        // `*` matches any value, a zero-length one too (PS3.4 §C.2.2.2.4):
        // so do `**` and the like.
        if value.bytes().all(|b| b == b'*') {
            return Ok(None);
        }
        // No attribute matched here holds control characters (and their
        // escaped forms could outgrow the engines' pattern limits).
        if value.chars().any(char::is_control) {
            return Err(invalid("value (it holds control characters)"));
        }
        let wildcard = value.contains(['*', '?']);
        Ok(Some(match attr.kind() {
            Kind::Uid => {
                // Empty list elements are ignored (RFC 9110 §5.6.1 lists).
                let uids: Vec<String> = value
                    .split([',', '\\'])
                    .map(|u| u.trim().to_string())
                    .filter(|u| !u.is_empty())
                    .collect();
                if uids.is_empty() || !uids.iter().all(|u| is_uid(u)) {
                    return Err(invalid("UID or list of UIDs"));
                }
                if uids.len() == 1 {
                    Matcher::Single(uids.into_iter().next().unwrap_or_default())
                } else {
                    Matcher::UidList(uids)
                }
            }
            kind @ (Kind::Date | Kind::Time) => {
                let ok = if kind == Kind::Date { is_date } else { is_time };
                let what = if kind == Kind::Date {
                    "date or date range (YYYYMMDD, YYYYMMDD-YYYYMMDD)"
                } else {
                    "time or time range (HHMMSS.FFFFFF)"
                };
                // DICOM allows "2023-01-01"-style dates nowhere: `-` is a range.
                match value.split_once('-') {
                    Some((lo, hi)) => {
                        if (lo.is_empty() && hi.is_empty())
                            || !(lo.is_empty() || ok(lo))
                            || !(hi.is_empty() || ok(hi))
                        {
                            return Err(invalid(what));
                        }
                        // PS3.4 §C.2.2.2.5: the first bound is not after the
                        // second (a time range cannot cross midnight).
                        let reversed = match kind {
                            Kind::Time => lo > time_upper_bound(hi).as_str(),
                            _ => lo > hi,
                        };
                        if !lo.is_empty() && !hi.is_empty() && reversed {
                            return Err(invalid(if kind == Kind::Date {
                                "date range (its first date is after its second)"
                            } else {
                                "time range (its first time is after its second)"
                            }));
                        }
                        let hi = (!hi.is_empty()).then(|| {
                            if kind == Kind::Time {
                                time_upper_bound(hi)
                            } else {
                                hi.to_string()
                            }
                        });
                        Matcher::Range((!lo.is_empty()).then(|| lo.to_string()), hi)
                    }
                    None if ok(value) => {
                        if kind == Kind::Time {
                            // A time matches every more precise time within it.
                            Matcher::Range(Some(value.to_string()), Some(time_upper_bound(value)))
                        } else {
                            Matcher::Single(value.to_string())
                        }
                    }
                    None => return Err(invalid(what)),
                }
            }
            Kind::Int => {
                if value.trim().parse::<i64>().is_err() {
                    return Err(invalid("integer"));
                }
                Matcher::Single(value.trim().to_string())
            }
            Kind::PersonName => {
                if fuzzy {
                    let words: Vec<String> = value
                        .split(['^', ' ', '=', '*', '?'])
                        .filter(|w| !w.is_empty())
                        .map(pn_key)
                        .collect();
                    if words.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(Matcher::Fuzzy(words)));
                }
                if value.contains('=') {
                    let mut groups: [Option<Box<Matcher>>; 3] = [None, None, None];
                    for (slot, g) in groups.iter_mut().zip(value.split('=')) {
                        if !g.bytes().all(|b| b == b'*') {
                            *slot = Some(Box::new(name_matcher(g)));
                        }
                    }
                    Matcher::NameGroups(groups)
                } else {
                    name_matcher(value)
                }
            }
            Kind::Text if wildcard => Matcher::Wildcard(value.to_string()),
            Kind::Text => Matcher::Single(value.to_string()),
        }))
    }
}

/// Wildcard matching of names ignores case; single value matching is
/// literal (PS3.4 §C.2.2.2.1 permits either for PN), so a full name from a
/// referral letter finds that spelling only.
fn name_matcher(group: &str) -> Matcher {
    if group.contains(['*', '?']) {
        // Normalized as the key it is matched against (`pn_key`).
        Matcher::Wildcard(crate::dicom::summary::pn_key(group))
    } else {
        Matcher::Single(group.trim_end_matches([' ', '^']).to_string())
    }
}

/// The stored forms of a literal name group `v` (trailing `^` dropped):
/// itself and with the empty trailing components a sender may keep
/// (`Yamada^Taro^^`), up to five components in all.
fn literal_name_forms(v: &str) -> Vec<String> {
    let components = v.split('^').count();
    (0..=5usize.saturating_sub(components))
        .map(|n| format!("{v}{}", "^".repeat(n)))
        .collect()
}

/// The stored (literal) name column beside each search key column.
fn literal_column(key_column: &str) -> &str {
    key_column.strip_suffix("_key").unwrap_or(key_column)
}

/// One name group's condition: literal for single values, on the
/// upper-cased key for wildcards.
fn name_condition(q: &mut Sql, attr: Attr, key_column: &str, m: &Matcher) -> String {
    match m {
        Matcher::Single(v) => {
            // Through the (indexed) key: every literal form has this key.
            let key = q.bind_text(&crate::dicom::summary::pn_key(v));
            let forms: Vec<String> = literal_name_forms(v)
                .iter()
                .map(|f| q.bind_text(f))
                .collect();
            format!(
                "({key_column} = {key} AND {} IN ({}))",
                literal_column(key_column),
                forms.join(", ")
            )
        }
        _ => condition(q, attr, key_column, m),
    }
}

/// The latest time a partial time stands for: `1030` → `1030` + `59.999999`.
fn time_upper_bound(t: &str) -> String {
    let (hms, frac) = t.split_once('.').unwrap_or((t, ""));
    let mut out = hms.to_string();
    while out.len() < 6 {
        out.push_str("59");
    }
    out.push('.');
    out.push_str(frac);
    while out.len() < 13 {
        out.push('9');
    }
    out
}

/// `*`/`?` to a LIKE pattern with `\` as escape.
fn like_pattern(wild: &str) -> String {
    let mut out = String::with_capacity(wild.len() + 4);
    for c in wild.chars() {
        match c {
            '*' => out.push('%'),
            '?' => out.push('_'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// The test of a text key's value, to follow the value in SQL: `= $n`, or
/// `LIKE '…'` for a wildcard.
fn text_test(q: &mut Sql, m: &Matcher) -> String {
    match m {
        Matcher::Wildcard(w) => {
            format!("LIKE {} ESCAPE '\\'", Sql::like_literal(&like_pattern(w)))
        }
        Matcher::Single(v) => format!("= {}", q.bind_text(v)),
        _ => unreachable!("text keys are single values or wildcards"),
    }
}

/// One step into a JSON value: a member, or an array element.
enum JsonStep<'a> {
    Key(&'a str),
    Index(usize),
}

/// A statement being built: SQL text with `$n` placeholders and its binds.
#[derive(Default)]
pub(super) struct Sql {
    binds: Vec<Bind>,
    /// For SQLite (else PostgreSQL), where their SQL differs.
    sqlite: bool,
}

impl Sql {
    /// A statement for `reader`'s engine.
    pub(super) fn for_reader(reader: &Reader) -> Self {
        Self {
            binds: Vec::new(),
            sqlite: matches!(reader, Reader::Sqlite(_)),
        }
    }

    /// Whether an item of the JSON array held (as text) in `column` has, at
    /// `path`, a text value that passes `test` (`text_test`): the engines
    /// walk JSON arrays each their own way.
    fn any_item(&self, column: &str, path: &[JsonStep], test: &str) -> String {
        if self.sqlite {
            let mut at = String::from("$");
            for step in path {
                match step {
                    JsonStep::Key(k) => at.push_str(&format!(".\"{k}\"")),
                    JsonStep::Index(i) => at.push_str(&format!("[{i}]")),
                }
            }
            format!(
                "EXISTS (SELECT 1 FROM json_each({column}) j WHERE json_extract(j.value, '{at}') {test})"
            )
        } else {
            let mut at = String::from("j.value");
            for (n, step) in path.iter().enumerate() {
                at.push_str(if n + 1 == path.len() { " ->> " } else { " -> " });
                match step {
                    JsonStep::Key(k) => at.push_str(&format!("'{k}'")),
                    JsonStep::Index(i) => at.push_str(&i.to_string()),
                }
            }
            format!(
                "EXISTS (SELECT 1 FROM json_array_elements({column}::json) j WHERE {at} {test})"
            )
        }
    }

    pub(super) fn bind_text(&mut self, v: &str) -> String {
        self.binds.push(Bind::Text(v.to_string()));
        format!("${}", self.binds.len())
    }

    /// A LIKE pattern as an SQL string literal, not a parameter: the
    /// planner can then use an index for a constant prefix without marking
    /// the statement for re-preparation on every execution (SQLite), and
    /// PostgreSQL never falls back to a generic plan that cannot.
    fn like_literal(pattern: &str) -> String {
        let body: String = pattern
            .chars()
            .filter(|c| *c != '\0')
            .collect::<String>()
            .replace('\'', "''");
        format!("'{body}'")
    }

    pub(super) fn bind_int(&mut self, v: i64) -> String {
        self.binds.push(Bind::Int(v));
        format!("${}", self.binds.len())
    }

    fn bind_ids(&mut self, ids: Vec<i64>) -> String {
        self.binds.push(Bind::Ids(ids));
        format!("${}", self.binds.len())
    }

    pub(super) async fn fetch(self, reader: &Reader, sql: String) -> Result<Vec<Row>, IndexError> {
        reader.fetch(sql, self.binds).await
    }
}

/// The SQL condition for `m` on `column`.
fn condition(q: &mut Sql, attr: Attr, column: &str, m: &Matcher) -> String {
    match m {
        Matcher::Single(v) if attr.kind() == Kind::Int => {
            let n = v.parse::<i64>().unwrap_or_default();
            format!("{column} = {}", q.bind_int(n))
        }
        Matcher::Single(v) => format!("{column} = {}", q.bind_text(v)),
        Matcher::Wildcard(w) => {
            format!(
                "{column} LIKE {} ESCAPE '\\'",
                Sql::like_literal(&like_pattern(w))
            )
        }
        Matcher::Range(lo, hi) => {
            let mut parts = Vec::new();
            if let Some(lo) = lo {
                parts.push(format!("{column} >= {}", q.bind_text(lo)));
            }
            if let Some(hi) = hi {
                parts.push(format!("{column} <= {}", q.bind_text(hi)));
            }
            parts.join(" AND ")
        }
        Matcher::UidList(uids) => {
            let list: Vec<String> = uids.iter().map(|u| q.bind_text(u)).collect();
            format!("{column} IN ({})", list.join(", "))
        }
        Matcher::NameGroups(_) | Matcher::Fuzzy(_) => unreachable!("person names are split first"),
    }
}

/// The SQL condition for one matching key.
fn key_condition(q: &mut Sql, attr: Attr, m: &Matcher) -> String {
    let cols = attr.columns();
    match (attr.kind(), m) {
        (Kind::PersonName, Matcher::NameGroups(groups)) => {
            let parts: Vec<String> = groups
                .iter()
                .zip(cols)
                .filter_map(|(g, col)| g.as_ref().map(|g| name_condition(q, attr, col, g)))
                .collect();
            if parts.is_empty() {
                "1 = 1".into()
            } else {
                parts.join(" AND ")
            }
        }
        (Kind::PersonName, Matcher::Fuzzy(words)) => {
            // Every word must start some component of some group.
            let per_word: Vec<String> = words
                .iter()
                .map(|w| {
                    let w = like_pattern(w);
                    let mut alts = Vec::new();
                    for col in cols {
                        for prefix in ["", "%^", "% "] {
                            let p = Sql::like_literal(&format!("{prefix}{w}%"));
                            alts.push(format!("{col} LIKE {p} ESCAPE '\\'"));
                        }
                    }
                    format!("({})", alts.join(" OR "))
                })
                .collect();
            per_word.join(" AND ")
        }
        (Kind::PersonName, single) => {
            let alts: Vec<String> = cols
                .iter()
                .map(|c| name_condition(q, attr, c, single))
                .collect();
            format!("({})", alts.join(" OR "))
        }
        (_, _)
            if matches!(
                attr,
                Attr::ScheduledProcedureStepId | Attr::RequestedProcedureId
            ) =>
        {
            // Kept as the sequence's DICOM JSON items: any item's value.
            let tag = if attr == Attr::ScheduledProcedureStepId {
                "00400009"
            } else {
                "00401001"
            };
            let test = text_test(q, m);
            q.any_item(
                cols[0],
                &[
                    JsonStep::Key(tag),
                    JsonStep::Key("Value"),
                    JsonStep::Index(0),
                ],
                &test,
            )
        }
        (_, _) if attr == Attr::OtherPatientId => {
            // Kept as a JSON array of {"patient_id","issuer"}: match the
            // member text, which JSON-escapes the value exactly one way.
            let value = match m {
                Matcher::Single(v) | Matcher::Wildcard(v) => v.clone(),
                _ => String::new(),
            };
            if !matches!(m, Matcher::Wildcard(_)) {
                let encoded = serde_json::to_string(&value).unwrap_or_default();
                let inner = like_pattern(&encoded[1..encoded.len() - 1]);
                let p = Sql::like_literal(&format!("%\"patient_id\":\"{inner}\"%"));
                return format!("{} LIKE {p} ESCAPE '\\'", cols[0]);
            }
            // A wildcard in the JSON text could run on past the ID, into its
            // issuer or the next item, and would meet an escaped character
            // (`\"`) as two: each member's ID is matched instead.
            let test = text_test(q, m);
            q.any_item(cols[0], &[JsonStep::Key("patient_id")], &test)
        }
        (_, m) => condition(q, attr, cols[0], m),
    }
}

/// The condition of a patient-level key. Under consent, the identifiers
/// (Patient ID, its issuer, Other Patient IDs) match what the caller is
/// shown: its own ID and issuer for another institution's patient in one of
/// its identity records, with the owner's ID among the Other Patient IDs.
fn patient_key_condition(q: &mut Sql, scope: &Scope, attr: Attr, m: &Matcher) -> String {
    if !scope.consent() {
        return key_condition(q, attr, m);
    }
    match attr {
        Attr::PatientId => {
            let column = scope.presented_patient_id(q);
            condition(q, attr, &column, m)
        }
        Attr::IssuerOfPatientId => {
            let column = scope.presented_issuer(q);
            condition(q, attr, &column, m)
        }
        Attr::OtherPatientId => {
            let own = key_condition(q, attr, m);
            let t = q.bind_text(&scope.institution);
            let linked = scope.linked_to_caller(q);
            let as_other = condition(q, Attr::PatientId, "p.patient_id", m);
            format!("({own} OR (p.institution <> {t} AND {linked} AND {as_other}))")
        }
        _ => key_condition(q, attr, m),
    }
}

/// A QIDO-RS search.
#[derive(Debug, Clone)]
pub struct Search {
    pub level: Level,
    /// Study and series the resource path names.
    pub study_uid: Option<String>,
    pub series_uid: Option<String>,
    pub keys: Vec<(Attr, Matcher)>,
    pub limit: u32,
    pub offset: u64,
}

/// One search answer row. Study columns are always filled; series and
/// instance columns at their levels.
#[derive(Debug, Clone, Default)]
pub struct Hit {
    pub study_ref: i64,
    pub series_ref: Option<i64>,
    pub instance_ref: Option<i64>,
    pub patient: PatientRow,
    pub study: StudyRow,
    pub series: Option<SeriesRow>,
    pub instance: Option<InstanceRow>,
}

impl Hit {
    /// The row id of this result at `level` (its study's, series' or instance's).
    pub fn id(&self, level: Level) -> i64 {
        match level {
            Level::Study => self.study_ref,
            Level::Series => self.series_ref.unwrap_or_default(),
            Level::Instance => self.instance_ref.unwrap_or_default(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct PatientRow {
    pub institution: String,
    pub issuer: String,
    pub patient_id: String,
    pub name: [Option<String>; 3],
    pub birth_date: Option<String>,
    pub sex: Option<String>,
    pub other_patient_ids: Vec<OtherPatientId>,
    /// Shown under the caller's own patient ID (another institution's patient).
    pub presented: bool,
    /// The patient ID as its institution knows it (for the audit trail).
    pub owner_patient_id: String,
}

impl PatientRow {
    /// Show the row under `pr`, the owner's ID joining the Other Patient IDs.
    fn present(&mut self, pr: &Presentation) {
        self.other_patient_ids.push(OtherPatientId {
            patient_id: std::mem::replace(&mut self.patient_id, pr.patient_id.clone()),
            issuer: Some(std::mem::replace(&mut self.issuer, pr.issuer.clone())),
            type_of_id: Some("TEXT".into()),
        });
        self.presented = true;
    }
}

/// The identity under which a caller sees another institution's patient:
/// the caller's own patient ID of the same identity record, and its issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presentation {
    pub patient_id: String,
    pub issuer: String,
}

/// A patient row's identity: (institution, issuer, patient ID).
pub type PatientKey = (String, String, String);

#[derive(Debug, Clone, Default)]
pub struct StudyRow {
    pub study_uid: String,
    pub date: Option<String>,
    pub time: Option<String>,
    pub accession_number: Option<String>,
    pub study_id: Option<String>,
    pub description: Option<String>,
    pub referring: [Option<String>; 3],
    /// Computed: series, instances, modalities.
    pub series_count: i64,
    pub instance_count: i64,
    pub modalities: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct SeriesRow {
    pub series_uid: String,
    pub modality: Option<String>,
    pub number: Option<i64>,
    pub description: Option<String>,
    pub date: Option<String>,
    pub time: Option<String>,
    pub pps_start_date: Option<String>,
    pub pps_start_time: Option<String>,
    pub body_part: Option<String>,
    pub request_attributes: Option<String>,
    pub instance_count: i64,
}

#[derive(Debug, Clone, Default)]
pub struct InstanceRow {
    pub sop_uid: String,
    pub sop_class_uid: String,
    pub number: Option<i64>,
    pub transfer_syntax: String,
    pub frames: Option<i64>,
    pub rows: Option<i64>,
    pub columns: Option<i64>,
    pub bits_allocated: Option<i64>,
}

/// A page of results.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub hits: Vec<Hit>,
    /// Matches after this page (0 when the page is the last).
    pub remaining: u64,
}

const PATIENT_COLS: &str = "p.institution, p.issuer, p.patient_id, p.name_alphabetic, \
     p.name_ideographic, p.name_phonetic, p.birth_date, p.sex, p.other_patient_ids";
const STUDY_COLS: &str = "st.id, st.study_uid, st.study_date, st.study_time, st.accession_number, \
     st.study_id, st.description, st.referring_alphabetic, st.referring_ideographic, \
     st.referring_phonetic";
const SERIES_COLS: &str = "se.id, se.series_uid, se.modality, se.series_number, se.description, \
     se.series_date, se.series_time, se.pps_start_date, se.pps_start_time, se.body_part, \
     se.request_attributes";
const INSTANCE_COLS: &str = "i.id, i.sop_uid, i.sop_class_uid, i.instance_number, \
     i.transfer_syntax, i.number_of_frames, i.rows, i.columns, i.bits_allocated";

/// FROM clause of each level.
fn from(level: Level) -> &'static str {
    match level {
        Level::Study => "study st JOIN patient p ON p.id = st.patient_ref",
        Level::Series => {
            "series se JOIN study st ON st.id = se.study_ref JOIN patient p ON p.id = st.patient_ref"
        }
        Level::Instance => {
            "instance i JOIN series se ON se.id = i.series_ref \
             JOIN study st ON st.id = se.study_ref JOIN patient p ON p.id = st.patient_ref"
        }
    }
}

/// FROM clause for choosing and counting: the conditions never refer to the outer
/// patient row (patient keys are a subquery), so the join is left out. Under
/// the consent rule the caller's access rows join in (`Scope::walks_access`):
/// a study list then walks them in study order.
fn from_without_patient(s: &Search, scope: &Scope) -> &'static str {
    if access_rows_only(s, scope) {
        return "study_access sa";
    }
    match (s.level, walks(s, scope)) {
        (Level::Study, false) => "study st",
        (Level::Series, false) => "series se JOIN study st ON st.id = se.study_ref",
        (Level::Instance, false) => {
            "instance i JOIN series se ON se.id = i.series_ref JOIN study st ON st.id = se.study_ref"
        }
        (Level::Study, true) => "study_access sa JOIN study st ON st.id = sa.study_ref",
        (Level::Series, true) => {
            "series se JOIN study st ON st.id = se.study_ref JOIN study_access sa ON sa.study_ref = st.id"
        }
        (Level::Instance, true) => {
            "instance i JOIN series se ON se.id = i.series_ref JOIN study st ON st.id = se.study_ref \
             JOIN study_access sa ON sa.study_ref = st.id"
        }
    }
}

/// Whether a search joins the caller's access rows (`sa`). Not when a
/// single value picks its studies first (a UID, an ID, an accession
/// number): then each study found is tested, the caller's own without a probe.
fn walks(s: &Search, scope: &Scope) -> bool {
    scope.walks_access() && !picked(s)
}

/// Whether a single value picks the search's few studies first (a UID, an
/// ID, an accession number).
fn picked(s: &Search) -> bool {
    s.study_uid.is_some()
        || s.keys.iter().any(|(a, m)| {
            matches!(
                a,
                Attr::PatientId
                    | Attr::StudyInstanceUid
                    | Attr::AccessionNumber
                    | Attr::SeriesInstanceUid
                    | Attr::SopInstanceUid
            ) && matches!(m, Matcher::Single(_) | Matcher::UidList(_))
        })
}

/// Whether a study-level search under the consent rule needs nothing of the
/// study row to choose its page (a list, patient keys, modalities, series or
/// instance keys, a study date — the access row holds the study's date and
/// patient row too): it then walks the caller's access rows alone,
/// index-only, and tests the patient or the series of each.
fn access_rows_only(s: &Search, scope: &Scope) -> bool {
    s.level == Level::Study
        && walks(s, scope)
        && s.keys.iter().all(|(a, _)| {
            a.is_patient()
                || a.level() != Level::Study
                || matches!(a, Attr::ModalitiesInStudy | Attr::StudyDate)
        })
}

/// WHERE clause: scope, path, matching keys. Keys below the level become
/// EXISTS conditions (a study matches if one of its series does).
fn where_clause(q: &mut Sql, s: &Search, scope: &Scope) -> String {
    let mut conds = vec![if walks(s, scope) {
        scope.access_row_condition(q)
    } else {
        scope.condition(q)
    }];
    if let Some(u) = &s.study_uid {
        conds.push(format!("st.study_uid = {}", q.bind_text(u)));
    }
    if let Some(u) = &s.series_uid {
        conds.push(format!("se.series_uid = {}", q.bind_text(u)));
    }
    // A search by the caller's own patient ID also finds the patients of
    // other institutions that its links put in the same identity record.
    let own_id = match s.keys.iter().find(|(a, _)| *a == Attr::PatientId) {
        Some((_, Matcher::Single(v))) if scope.consent() => Some(v.clone()),
        _ => None,
    };
    let patient_keys: Vec<&(Attr, Matcher)> = s
        .keys
        .iter()
        .filter(|(a, _)| a.is_patient() && !(own_id.is_some() && *a == Attr::PatientId))
        .collect();
    let render_patient = |q: &mut Sql| -> Vec<String> {
        patient_keys
            .iter()
            .map(|(a, m)| patient_key_condition(q, scope, *a, m))
            .collect()
    };
    // A single value (an ID, a full name) picks few patients: look them up
    // first. Wildcards and ranges may match many: then walk the studies in
    // order and stop at the page (an EXISTS per study).
    let patient_selective = patient_keys.iter().any(|(_, m)| {
        matches!(m, Matcher::Single(_) | Matcher::UidList(_))
            || matches!(m, Matcher::NameGroups(g) if g.iter().flatten().any(|g| matches!(**g, Matcher::Single(_))))
    });
    if let Some(v) = &own_id {
        let and_rest = |q: &mut Sql| -> String {
            render_patient(q)
                .into_iter()
                .map(|c| format!(" AND {c}"))
                .collect()
        };
        // Own patients (and others' not linked to the caller, visible only
        // by break-glass: without a grant, not looked at) under the ID
        // itself; linked ones through the links.
        let (v1, t1) = (q.bind_text(v), q.bind_text(&scope.institution));
        let unlinked_others = if scope.under_break_glass() {
            format!(" OR NOT {}", scope.linked_to_caller(q))
        } else {
            String::new()
        };
        let rest1 = and_rest(q);
        let (v2, t2, t3) = (
            q.bind_text(v),
            q.bind_text(&scope.institution),
            q.bind_text(&scope.institution),
        );
        let rest2 = and_rest(q);
        conds.push(format!(
            "st.patient_ref IN (SELECT p.id FROM patient p WHERE p.patient_id = {v1} \
             AND (p.institution = {t1}{unlinked_others}){rest1} \
             UNION ALL SELECT p.id FROM patient_link tl JOIN patient_link sl ON sl.record = tl.record \
             JOIN patient p ON p.institution = sl.institution AND p.issuer = sl.issuer \
             AND p.patient_id = sl.patient_id \
             WHERE tl.institution = {t2} AND tl.patient_id = {v2} AND sl.institution <> {t3}{rest2})"
        ));
    }
    let patient_conds = if own_id.is_some() {
        Vec::new()
    } else {
        render_patient(q)
    };
    let mut series_conds = Vec::new();
    let mut instance_conds = Vec::new();
    // The study's id and patient row: from the access row when the study
    // row is not joined.
    let rows_only = access_rows_only(s, scope);
    let (sid, pref) = if rows_only {
        ("sa.study_ref", "sa.patient_ref")
    } else {
        ("st.id", "st.patient_ref")
    };
    for (attr, m) in &s.keys {
        if attr.is_patient() {
            continue;
        }
        if *attr == Attr::ModalitiesInStudy {
            let c = key_condition(q, *attr, m);
            conds.push(format!(
                "EXISTS (SELECT 1 FROM series ms WHERE ms.study_ref = {sid} AND {c})"
            ));
            continue;
        }
        if *attr == Attr::StudyDate && walks(s, scope) {
            // The same range on the access row's copy of the date: one
            // index range of (institution, study_date).
            conds.push(condition(q, *attr, "sa.study_date", m));
            if rows_only {
                continue;
            }
        }
        let c = key_condition(q, *attr, m);
        match attr.level() {
            l if l <= s.level => conds.push(c),
            Level::Series => series_conds.push(c),
            _ => instance_conds.push(c),
        }
    }
    if !instance_conds.is_empty() {
        let ic = instance_conds.join(" AND ");
        if s.level == Level::Series {
            conds.push(format!(
                "EXISTS (SELECT 1 FROM instance i WHERE i.series_ref = se.id AND {ic})"
            ));
        } else {
            series_conds.push(format!(
                "EXISTS (SELECT 1 FROM instance i WHERE i.series_ref = se.id AND {ic})"
            ));
        }
    }
    if !series_conds.is_empty() {
        conds.push(format!(
            "EXISTS (SELECT 1 FROM series se WHERE se.study_ref = {sid} AND {})",
            series_conds.join(" AND ")
        ));
    }
    if !patient_conds.is_empty() {
        // The inner `p` shadows the outer one: the same conditions apply.
        let pc = patient_conds.join(" AND ");
        conds.push(if patient_selective {
            format!("{pref} IN (SELECT p.id FROM patient p WHERE {pc})")
        } else {
            format!("EXISTS (SELECT 1 FROM patient p WHERE p.id = {pref} AND {pc})")
        });
    }
    conds.join(" AND ")
}

// The rows' values move into the hits: no value is copied twice.
fn patient_row(r: &mut Row, at: usize) -> PatientRow {
    let patient_id = r.take_text(at + 2);
    let owner_patient_id = patient_id.clone();
    PatientRow {
        institution: r.take_text(at),
        issuer: r.take_text(at + 1),
        patient_id,
        name: [
            r.take_opt_text(at + 3),
            r.take_opt_text(at + 4),
            r.take_opt_text(at + 5),
        ],
        birth_date: r.take_opt_text(at + 6),
        sex: r.take_opt_text(at + 7),
        other_patient_ids: r
            .opt_text(at + 8)
            .and_then(|j| serde_json::from_str(&j).ok())
            .unwrap_or_default(),
        presented: false,
        owner_patient_id,
    }
}

fn study_row(r: &mut Row, at: usize) -> (i64, StudyRow) {
    (
        r.int(at),
        StudyRow {
            study_uid: r.take_text(at + 1),
            date: r.take_opt_text(at + 2),
            time: r.take_opt_text(at + 3),
            accession_number: r.take_opt_text(at + 4),
            study_id: r.take_opt_text(at + 5),
            description: r.take_opt_text(at + 6),
            referring: [
                r.take_opt_text(at + 7),
                r.take_opt_text(at + 8),
                r.take_opt_text(at + 9),
            ],
            ..StudyRow::default()
        },
    )
}

fn series_row(r: &mut Row, at: usize) -> (i64, SeriesRow) {
    (
        r.int(at),
        SeriesRow {
            series_uid: r.take_text(at + 1),
            modality: r.take_opt_text(at + 2),
            number: r.opt_int(at + 3),
            description: r.take_opt_text(at + 4),
            date: r.take_opt_text(at + 5),
            time: r.take_opt_text(at + 6),
            pps_start_date: r.take_opt_text(at + 7),
            pps_start_time: r.take_opt_text(at + 8),
            body_part: r.take_opt_text(at + 9),
            request_attributes: r.take_opt_text(at + 10),
            instance_count: 0,
        },
    )
}

fn instance_row(r: &mut Row, at: usize) -> (i64, InstanceRow) {
    (
        r.int(at),
        InstanceRow {
            sop_uid: r.take_text(at + 1),
            sop_class_uid: r.take_text(at + 2),
            number: r.opt_int(at + 3),
            transfer_syntax: r.take_text(at + 4),
            frames: r.opt_int(at + 5),
            rows: r.opt_int(at + 6),
            columns: r.opt_int(at + 7),
            bits_allocated: r.opt_int(at + 8),
        },
    )
}

/// The walk choosing a search's page: the ids of its matches in walk order
/// from `offset`, at most `limit`. Chosen on ids alone (no patient join,
/// index order), so a deep `offset` skips index entries, not joined rows.
fn walk_sql(q: &mut Sql, s: &Search, scope: &Scope, limit: i64) -> String {
    let wh = where_clause(q, s, scope);
    let walk = walk_order(s, scope);
    let lim = q.bind_int(limit);
    let off = q.bind_int(s.offset.min(i64::MAX as u64) as i64);
    format!(
        "SELECT {walk} FROM {} WHERE {wh} ORDER BY {walk} LIMIT {lim} OFFSET {off}",
        from_without_patient(s, scope),
    )
}

/// The statement reading the rows of the page's ids (`picked`: the
/// condition on the level's id column that names them), in id order.
fn rows_sql(
    reader: &Reader,
    s: &Search,
    scope: &Scope,
    q: &mut Sql,
    picked: impl FnOnce(&mut Sql, &str) -> String,
) -> String {
    let cols = match s.level {
        Level::Study => format!("{PATIENT_COLS}, {STUDY_COLS}"),
        Level::Series => format!("{PATIENT_COLS}, {STUDY_COLS}, {SERIES_COLS}"),
        Level::Instance => {
            format!("{PATIENT_COLS}, {STUDY_COLS}, {SERIES_COLS}, {INSTANCE_COLS}")
        }
    };
    // The counts are kept on the study and series rows (migration 0009) and
    // ride with the keys; the modalities are a subquery of the outer select,
    // so it runs for the rows of the page only, in the same statement.
    let computed = match s.level {
        Level::Study => format!(
            ", (SELECT {} FROM series x WHERE x.study_ref = page.k_study)",
            reader.distinct_list("x.modality")
        ),
        Level::Series | Level::Instance => String::new(),
    };
    let (keys, order_key) = match s.level {
        Level::Study => (
            "st.id AS k_study, st.num_series AS c_series, st.num_instances AS c_instances",
            "k_study",
        ),
        Level::Series => (
            "st.id AS k_study, se.id AS k_series, se.num_instances AS c_instances",
            "k_series",
        ),
        Level::Instance => (
            "st.id AS k_study, se.id AS k_series, i.id AS k_instance",
            "k_instance",
        ),
    };
    // How the caller sees another institution's patient (its own patient
    // ID in the same identity record: the one searched by, else the least),
    // for the page's rows only.
    let presented = if scope.consent() {
        let preferred = s.keys.iter().find_map(|(a, m)| match (a, m) {
            (Attr::PatientId, Matcher::Single(v)) => Some(v.as_str()),
            _ => None,
        });
        let shown = match preferred {
            // Only a walk of the access rows has them to read from.
            None if scope.walks_access() => scope.presented_id_on_access_row(q, "page"),
            _ => scope.presented_id(q, "page", preferred),
        };
        format!(", {shown}")
    } else {
        String::new()
    };
    let picked = picked(q, id_column(s.level));
    format!(
        "SELECT page.*{computed}{presented} FROM (SELECT {cols}, {keys} FROM {from} \
         WHERE {picked}) page ORDER BY page.{order_key}",
        from = from(s.level),
    )
}

/// Whether a search reads its page in one statement (else: a walk of ids,
/// then the rows by id). PostgreSQL plans a statement for its parameters at
/// every run: for a walk (a wildcard, a range, a list) the page statement
/// with its computed columns took ~1.7 ms to plan, and the count of what
/// follows another ~1 ms and a second walk. There the walk alone (small to
/// plan) chooses the page and counts up to `COUNT_CAP` past it, and the rows
/// come by id in a statement whose plan is kept. A search that a single
/// value picks (a UID, a patient ID) has a few rows and plans quickly: one
/// statement, as on SQLite, which keeps its statements prepared and runs them
/// in-process (a second statement cost a short search ~15 %). In one
/// statement the count walks on from the page's last id, only when there is
/// more.
fn single_statement(reader: &Reader, s: &Search) -> bool {
    matches!(reader, Reader::Sqlite(_)) || picked(s)
}

/// The one statement of a page: its rows, walked to, and one more if
/// anything follows.
fn page_sql(reader: &Reader, s: &Search, scope: &Scope) -> (String, Sql) {
    let mut q = Sql::for_reader(reader);
    let sql = rows_sql(reader, s, scope, &mut q, |q, id| {
        format!(
            "{id} IN ({})",
            walk_sql(q, s, scope, i64::from(s.limit) + 1)
        )
    });
    (sql, q)
}

/// The walk of a page's ids and up to `COUNT_CAP` more.
fn ids_sql(reader: &Reader, s: &Search, scope: &Scope) -> (String, Sql) {
    let mut q = Sql::for_reader(reader);
    let sql = walk_sql(&mut q, s, scope, i64::from(s.limit) + COUNT_CAP as i64);
    (sql, q)
}

/// The rows of the page's `ids`.
fn rows_by_id_sql(reader: &Reader, s: &Search, scope: &Scope, ids: Vec<i64>) -> (String, Sql) {
    let mut q = Sql::for_reader(reader);
    let sql = rows_sql(reader, s, scope, &mut q, |q, id| {
        reader.id_in(id, &q.bind_ids(ids))
    });
    (sql, q)
}

/// The order in which a search walks its candidates: ids of its level, or,
/// walking the access rows, theirs (the same study ids).
fn walk_order(s: &Search, scope: &Scope) -> &'static str {
    if s.level == Level::Study && walks(s, scope) {
        "sa.study_ref"
    } else {
        id_column(s.level)
    }
}

/// The id column of a search's level.
fn id_column(level: Level) -> &'static str {
    match level {
        Level::Study => "st.id",
        Level::Series => "se.id",
        Level::Instance => "i.id",
    }
}

/// The query plan of `s` (EXPLAIN QUERY PLAN on SQLite, EXPLAIN on
/// PostgreSQL with sequential scans disabled, so a plan that still scans a
/// table has no index to use), for tests and benchmarks.
pub async fn explain(
    reader: &Reader,
    s: &Search,
    scope: &Scope,
) -> Result<Vec<String>, IndexError> {
    if single_statement(reader, s) {
        let (sql, q) = page_sql(reader, s, scope);
        return reader.explain(sql, q.binds).await;
    }
    let (walk, q) = ids_sql(reader, s, scope);
    let mut plan = reader.explain(walk, q.binds).await?;
    let (sql, q) = rows_by_id_sql(reader, s, scope, vec![1]);
    plan.extend(reader.explain(sql, q.binds).await?);
    Ok(plan)
}

/// Run `s` under `scope`: its page, and how many matches follow it (at most
/// `COUNT_CAP`).
pub async fn search(reader: &Reader, s: &Search, scope: &Scope) -> Result<Page, IndexError> {
    let limit = s.limit as usize;
    let (mut rows, remaining) = if single_statement(reader, s) {
        let (sql, q) = page_sql(reader, s, scope);
        let mut rows = q.fetch(reader, sql).await?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        // More: counted below, past the page's last hit.
        (rows, (!more).then_some(0))
    } else {
        let (walk, q) = ids_sql(reader, s, scope);
        let mut ids: Vec<i64> = q
            .fetch(reader, walk)
            .await?
            .iter()
            .map(|r| r.int(0))
            .collect();
        let remaining = ids.len().saturating_sub(limit) as u64;
        ids.truncate(limit);
        if ids.is_empty() {
            (Vec::new(), Some(remaining))
        } else {
            let (sql, q) = rows_by_id_sql(reader, s, scope, ids);
            (q.fetch(reader, sql).await?, Some(remaining))
        }
    };
    // Positions: patient 0..9, study 9..19, series 19..30, instance 30..39,
    // then the ids, then the counts, then the computed columns.
    let first_computed = match s.level {
        Level::Study => 19 + 1,
        Level::Series => 30 + 2,
        Level::Instance => 39 + 3,
    };
    let hits: Vec<Hit> = rows
        .iter_mut()
        .map(|r| {
            let patient = patient_row(r, 0);
            let (study_ref, mut study) = study_row(r, 9);
            let (series_ref, mut series) = if s.level >= Level::Series {
                let (id, row) = series_row(r, 19);
                (Some(id), Some(row))
            } else {
                (None, None)
            };
            let (instance_ref, instance) = if s.level == Level::Instance {
                let (id, row) = instance_row(r, 30);
                (Some(id), Some(row))
            } else {
                (None, None)
            };
            let c = first_computed;
            match s.level {
                Level::Study => {
                    study.series_count = r.int(c);
                    study.instance_count = r.int(c + 1);
                    let mut modalities: Vec<String> = r
                        .take_opt_text(c + 2)
                        .map(|m| m.split(',').map(str::to_string).collect())
                        .unwrap_or_default();
                    modalities.sort();
                    study.modalities = modalities;
                }
                Level::Series => {
                    if let Some(se) = series.as_mut() {
                        se.instance_count = r.int(c);
                    }
                }
                Level::Instance => {}
            }
            Hit {
                study_ref,
                series_ref,
                instance_ref,
                patient,
                study,
                series,
                instance,
            }
        })
        .collect();
    let mut hits = hits;
    if scope.consent() {
        // The last column: the caller's own ID for another institution's patient.
        for (h, r) in hits.iter_mut().zip(&rows) {
            if let Some(own) = r.opt_text(r.len() - 1) {
                h.patient.present(&Presentation {
                    patient_id: own,
                    issuer: scope.issuer.clone(),
                });
            }
        }
    }
    let remaining = match (remaining, hits.last()) {
        (Some(n), _) => n,
        (None, Some(last)) => count_after(reader, s, scope, Some(last.id(s.level)), 0).await?,
        // `limit=0`: everything past the offset.
        (None, None) => count_after(reader, s, scope, None, s.offset).await?,
    };
    Ok(Page { hits, remaining })
}

/// Most matches counted beyond a page for the Warning header: counting all
/// of a million-study list would cost far more than the page itself.
pub const COUNT_CAP: u64 = 200;

/// Number of matches of `s` after the one with id `last` in the page's
/// order (the page's last row), less the first `skip`, counting no further
/// than `COUNT_CAP` (for searches in one statement, see `single_statement`).
/// It walks on from where the page ended rather than counting the page's
/// matches again.
async fn count_after(
    reader: &Reader,
    s: &Search,
    scope: &Scope,
    last: Option<i64>,
    skip: u64,
) -> Result<u64, IndexError> {
    let mut q = Sql::for_reader(reader);
    let mut wh = where_clause(&mut q, s, scope);
    let order = walk_order(s, scope);
    if let Some(last) = last {
        wh = format!("{wh} AND {order} > {}", q.bind_int(last));
    }
    let cap = q.bind_int(skip.saturating_add(COUNT_CAP).min(i64::MAX as u64) as i64);
    // Walking the access rows, in their order: knowing it may stop early,
    // SQLite then walks them as for the page. Unordered, it first built a
    // Bloom filter of every patient matching a name wildcard (a scan of the
    // patient table: 6 ms of a 7 ms `PatientName=YAMA*` search at 1,000,000
    // instances). Other searches stay unordered, free to use, say, a date
    // index without sorting all its matches.
    let ordered = if s.level == Level::Study && walks(s, scope) {
        format!(" ORDER BY {order}")
    } else {
        String::new()
    };
    let sql = format!(
        "SELECT COUNT(*) FROM (SELECT 1 FROM {} WHERE {wh}{ordered} LIMIT {cap}) capped",
        from_without_patient(s, scope),
    );
    let rows = q.fetch(reader, sql).await?;
    let counted = rows.first().map(|r| r.int(0)).unwrap_or(0).max(0) as u64;
    Ok(counted.saturating_sub(skip))
}

/// The stored DICOM JSON of one instance of each given study or series
/// (level `Study` or `Series`), or of the given instances: the source of
/// attributes the index does not keep (`includefield`).
pub async fn representative_json(
    reader: &Reader,
    level: Level,
    ids: &[i64],
) -> Result<HashMap<i64, String>, IndexError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let mut q = Sql::default();
    let list = q.bind_ids(ids.to_vec());
    let sql = match level {
        Level::Instance => format!(
            "SELECT i.id, i.dataset_json FROM instance i WHERE {}",
            reader.id_in("i.id", &list)
        ),
        Level::Series => format!(
            "SELECT i.series_ref, i.dataset_json FROM instance i WHERE i.id IN \
             (SELECT MIN(i2.id) FROM instance i2 WHERE {} GROUP BY i2.series_ref)",
            reader.id_in("i2.series_ref", &list)
        ),
        Level::Study => format!(
            "SELECT se.study_ref, i.dataset_json FROM instance i JOIN series se ON se.id = i.series_ref \
             WHERE i.id IN (SELECT MIN(i2.id) FROM instance i2 JOIN series se2 ON se2.id = i2.series_ref \
             WHERE {} GROUP BY se2.study_ref)",
            reader.id_in("se2.study_ref", &list)
        ),
    };
    let rows = q.fetch(reader, sql).await?;
    Ok(rows
        .into_iter()
        .map(|mut r| (r.int(0), r.take_text(1)))
        .collect())
}

/// Where one instance is and what WADO needs of it.
#[derive(Debug, Clone)]
pub struct StoredInstance {
    /// Row id, for fetching its DICOM JSON.
    pub id: i64,
    pub study_uid: String,
    pub series_uid: String,
    pub sop_uid: String,
    pub sop_class_uid: String,
    pub transfer_syntax: String,
    pub object_key: String,
    pub size: u64,
    pub sha256: String,
    pub pixel_layout: Option<String>,
    pub number_of_frames: Option<i64>,
    pub rows: Option<i64>,
    pub columns: Option<i64>,
    pub bits_allocated: Option<i64>,
    /// Its patient row: (institution, issuer, patient ID).
    pub patient: PatientKey,
    /// How it is shown to the caller, when it is another institution's
    /// patient in one of the caller's identity records.
    pub coercion: Option<Coercion>,
}

/// The instances of a study, series or instance (WADO-RS), in series and
/// instance order, under `scope`. Empty: nothing there, or nothing visible.
pub async fn instances(
    reader: &Reader,
    scope: &Scope,
    study_uid: &str,
    series_uid: Option<&str>,
    sop_uid: Option<&str>,
) -> Result<Vec<StoredInstance>, IndexError> {
    let mut q = Sql::default();
    let mut conds = vec![
        scope.condition(&mut q),
        format!("st.study_uid = {}", q.bind_text(study_uid)),
    ];
    if let Some(u) = series_uid {
        conds.push(format!("se.series_uid = {}", q.bind_text(u)));
    }
    if let Some(u) = sop_uid {
        conds.push(format!("i.sop_uid = {}", q.bind_text(u)));
    }
    // The frame layout is stored after the data set's JSON: reading it for
    // a whole study would walk every JSON's overflow pages. Only a single
    // instance (frames, bulk data) needs it.
    let layout = if sop_uid.is_some() {
        "i.pixel_layout"
    } else {
        "NULL"
    };
    // Another institution's instances are shown under the caller's ID.
    let presented = if scope.consent() {
        scope.presented_id(&mut q, "p", None)
    } else {
        "NULL".into()
    };
    // Ordered here, not by the statement: PostgreSQL took 2.5 ms to sort the
    // 1,000 rows of a study by these integers (their text columns ride along
    // in the sort), three times what reading them took.
    let sql = format!(
        "SELECT NULL, se.series_uid, i.sop_uid, i.sop_class_uid, i.transfer_syntax, \
         i.object_key, i.size, i.sha256, {layout}, i.number_of_frames, i.id, i.rows, i.columns, \
         i.bits_allocated, p.institution, p.issuer, p.patient_id, {presented}, \
         se.series_number, se.id, i.instance_number \
         FROM {} WHERE {}",
        from(Level::Instance),
        conds.join(" AND ")
    );
    let mut rows = q.fetch(reader, sql).await?;
    // Series by number, then instances by number; unnumbered ones last, ties
    // in the order they were stored.
    let last_if_none = |v: Option<i64>| (v.is_none(), v.unwrap_or_default());
    rows.sort_by_cached_key(|r| {
        (
            last_if_none(r.opt_int(18)),
            r.int(19),
            last_if_none(r.opt_int(20)),
            r.int(10),
        )
    });
    Ok(rows
        .into_iter()
        .map(|mut r| {
            let (institution, issuer, patient_id) =
                (r.take_text(14), r.take_text(15), r.take_text(16));
            StoredInstance {
                coercion: r.take_opt_text(17).map(|shown| Coercion {
                    patient_id: shown,
                    issuer: scope.issuer.clone(),
                    owner_patient_id: patient_id.clone(),
                    owner_issuer: issuer.clone(),
                }),
                // The one asked for (every row has it).
                study_uid: study_uid.to_string(),
                series_uid: r.take_text(1),
                sop_uid: r.take_text(2),
                sop_class_uid: r.take_text(3),
                transfer_syntax: r.take_text(4),
                object_key: r.take_text(5),
                size: r.int(6).max(0) as u64,
                sha256: r.take_text(7),
                pixel_layout: r.take_opt_text(8),
                number_of_frames: r.opt_int(9),
                id: r.int(10),
                rows: r.opt_int(11),
                columns: r.opt_int(12),
                bits_allocated: r.opt_int(13),
                patient: (institution, issuer, patient_id),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_ranges_and_invalid_dates() {
        let p = |v| Matcher::parse(Attr::StudyDate, "StudyDate", v, false);
        assert_eq!(
            p("20230101-20231231").unwrap(),
            Some(Matcher::Range(
                Some("20230101".into()),
                Some("20231231".into())
            ))
        );
        assert_eq!(
            p("-20191231").unwrap(),
            Some(Matcher::Range(None, Some("20191231".into())))
        );
        assert_eq!(
            p("20250101-").unwrap(),
            Some(Matcher::Range(Some("20250101".into()), None))
        );
        assert!(p("notadate").is_err());
        assert!(p("2023-01-01").is_err());
        assert!(p("-").is_err());
        assert_eq!(p("").unwrap(), None);
    }

    #[test]
    fn time_matches_its_whole_precision() {
        let m = Matcher::parse(Attr::StudyTime, "StudyTime", "1030", false).unwrap();
        assert_eq!(
            m,
            Some(Matcher::Range(
                Some("1030".into()),
                Some("103059.999999".into())
            ))
        );
    }

    #[test]
    fn uid_lists_take_commas_and_backslashes() {
        let m = Matcher::parse(Attr::StudyInstanceUid, "k", "1.2.3,1.2.4\\1.2.5", false).unwrap();
        assert_eq!(
            m,
            Some(Matcher::UidList(vec![
                "1.2.3".into(),
                "1.2.4".into(),
                "1.2.5".into()
            ]))
        );
        assert!(Matcher::parse(Attr::StudyInstanceUid, "k", "1.2.x", false).is_err());
    }

    #[test]
    fn person_names_match_case_insensitively_per_group() {
        assert_eq!(
            Matcher::parse(Attr::PatientName, "k", "yama*", false).unwrap(),
            Some(Matcher::Wildcard("YAMA*".into()))
        );
        let Some(Matcher::NameGroups(g)) =
            Matcher::parse(Attr::PatientName, "k", "Yoshida^Shota=吉田^翔太=", false).unwrap()
        else {
            panic!("groups expected")
        };
        assert_eq!(
            g[0].as_deref(),
            Some(&Matcher::Single("Yoshida^Shota".into()))
        );
        assert_eq!(g[1].as_deref(), Some(&Matcher::Single("吉田^翔太".into())));
        assert!(g[2].is_none());
    }

    #[test]
    fn like_patterns_escape_sql_wildcards() {
        assert_eq!(like_pattern("A_B%C*?\\"), "A\\_B\\%C%_\\\\");
    }
}
