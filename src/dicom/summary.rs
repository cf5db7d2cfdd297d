//! The index-level facts of one instance, read from its parsed DICOM JSON:
//! what QIDO matches and returns at patient, study, series and instance level.

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::dataset::ParsedObject;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SummaryError {
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("{0} is not a valid UID")]
    InvalidUid(&'static str),
}

/// A Person Name split into its three component groups (PS3.5 §6.2.1.1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PersonName {
    pub alphabetic: Option<String>,
    pub ideographic: Option<String>,
    pub phonetic: Option<String>,
}

impl PersonName {
    /// The search keys of the three groups: what QIDO matches against.
    pub fn keys(&self) -> [Option<String>; 3] {
        [&self.alphabetic, &self.ideographic, &self.phonetic].map(|g| g.as_deref().map(pn_key))
    }
}

/// The search key of one Person Name component group: upper case (PN
/// matching is case-insensitive) with trailing empty components and padding
/// dropped, so `Yamada^Taro^^` and `YAMADA^TARO` are one key.
pub fn pn_key(group: &str) -> String {
    group
        .trim_end_matches([' ', '^'])
        .trim_start_matches(' ')
        .to_uppercase()
}

/// A patient identifier with its issuer, as in Other Patient IDs Sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtherPatientId {
    pub patient_id: String,
    pub issuer: Option<String>,
    /// Type of Patient ID (0010,0022): TEXT, RFID or BARCODE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub type_of_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InstanceSummary {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub patient_id: String,
    pub issuer_of_patient_id: Option<String>,
    pub patient_name: PersonName,
    pub patient_birth_date: Option<String>,
    pub patient_sex: Option<String>,
    pub other_patient_ids: Vec<OtherPatientId>,
    pub study_date: Option<String>,
    pub study_time: Option<String>,
    pub accession_number: Option<String>,
    pub study_id: Option<String>,
    pub study_description: Option<String>,
    pub referring_physician_name: PersonName,
    pub modality: Option<String>,
    pub series_number: Option<i64>,
    pub series_description: Option<String>,
    pub series_date: Option<String>,
    pub series_time: Option<String>,
    pub pps_start_date: Option<String>,
    pub pps_start_time: Option<String>,
    pub body_part_examined: Option<String>,
    /// Request Attributes Sequence (0040,0275) items, kept as DICOM JSON.
    pub request_attributes: Option<Value>,
    pub instance_number: Option<i64>,
    pub number_of_frames: Option<i64>,
    pub rows: Option<i64>,
    pub columns: Option<i64>,
    pub bits_allocated: Option<i64>,
}

fn key(tag: Tag) -> String {
    format!("{:04X}{:04X}", tag.group(), tag.element())
}

fn first(map: &Map<String, Value>, tag: Tag) -> Option<&Value> {
    map.get(&key(tag))?.get("Value")?.get(0)
}

/// First value of a string-like attribute, `None` when absent or empty.
pub fn text(map: &Map<String, Value>, tag: Tag) -> Option<String> {
    match first(map, tag)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn int(map: &Map<String, Value>, tag: Tag) -> Option<i64> {
    match first(map, tag)? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn person_name(map: &Map<String, Value>, tag: Tag) -> PersonName {
    let Some(Value::Object(groups)) = first(map, tag) else {
        return PersonName::default();
    };
    let g = |n: &str| groups.get(n).and_then(Value::as_str).map(str::to_string);
    PersonName {
        alphabetic: g("Alphabetic"),
        ideographic: g("Ideographic"),
        phonetic: g("Phonetic"),
    }
}

fn items(map: &Map<String, Value>, tag: Tag) -> Vec<&Map<String, Value>> {
    map.get(&key(tag))
        .and_then(|e| e.get("Value"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_object).collect())
        .unwrap_or_default()
}

/// A UID as PS3.5 §9.1 allows: at most 64 characters, dot-separated digits.
pub fn is_uid(v: &str) -> bool {
    v.len() <= 64
        && !v.is_empty()
        && v.split('.')
            .all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
}

fn uid(map: &Map<String, Value>, tag: Tag, name: &'static str) -> Result<String, SummaryError> {
    let v = text(map, tag).ok_or(SummaryError::Missing(name))?;
    if is_uid(&v) {
        Ok(v)
    } else {
        Err(SummaryError::InvalidUid(name))
    }
}

impl InstanceSummary {
    /// Read the summary; fails when an identifying UID is missing or invalid.
    pub fn from_parsed(p: &ParsedObject) -> Result<Self, SummaryError> {
        let m = &p.json;
        let other_patient_ids = items(m, tags::OTHER_PATIENT_I_DS_SEQUENCE)
            .into_iter()
            .filter_map(|item| {
                Some(OtherPatientId {
                    patient_id: text(item, tags::PATIENT_ID)?,
                    issuer: text(item, tags::ISSUER_OF_PATIENT_ID),
                    type_of_id: text(item, tags::TYPE_OF_PATIENT_ID),
                })
            })
            .collect();
        let request = m
            .get(&key(tags::REQUEST_ATTRIBUTES_SEQUENCE))
            .and_then(|e| e.get("Value"))
            .cloned();
        Ok(Self {
            sop_class_uid: uid(m, tags::SOP_CLASS_UID, "SOP Class UID")?,
            sop_instance_uid: uid(m, tags::SOP_INSTANCE_UID, "SOP Instance UID")?,
            study_instance_uid: uid(m, tags::STUDY_INSTANCE_UID, "Study Instance UID")?,
            series_instance_uid: uid(m, tags::SERIES_INSTANCE_UID, "Series Instance UID")?,
            // Type 2: present but possibly empty; an empty ID is still one patient.
            patient_id: text(m, tags::PATIENT_ID).unwrap_or_default(),
            issuer_of_patient_id: text(m, tags::ISSUER_OF_PATIENT_ID),
            patient_name: person_name(m, tags::PATIENT_NAME),
            patient_birth_date: text(m, tags::PATIENT_BIRTH_DATE),
            patient_sex: text(m, tags::PATIENT_SEX),
            other_patient_ids,
            study_date: text(m, tags::STUDY_DATE),
            study_time: text(m, tags::STUDY_TIME),
            accession_number: text(m, tags::ACCESSION_NUMBER),
            study_id: text(m, tags::STUDY_ID),
            study_description: text(m, tags::STUDY_DESCRIPTION),
            referring_physician_name: person_name(m, tags::REFERRING_PHYSICIAN_NAME),
            modality: text(m, tags::MODALITY),
            series_number: int(m, tags::SERIES_NUMBER),
            series_description: text(m, tags::SERIES_DESCRIPTION),
            series_date: text(m, tags::SERIES_DATE),
            series_time: text(m, tags::SERIES_TIME),
            pps_start_date: text(m, tags::PERFORMED_PROCEDURE_STEP_START_DATE),
            pps_start_time: text(m, tags::PERFORMED_PROCEDURE_STEP_START_TIME),
            body_part_examined: text(m, tags::BODY_PART_EXAMINED),
            request_attributes: request,
            instance_number: int(m, tags::INSTANCE_NUMBER),
            number_of_frames: int(m, tags::NUMBER_OF_FRAMES),
            rows: int(m, tags::ROWS),
            columns: int(m, tags::COLUMNS),
            bits_allocated: int(m, tags::BITS_ALLOCATED),
        })
    }
}
