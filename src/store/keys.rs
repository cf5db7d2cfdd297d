//! The object key grammar of `storage-layout/README.md`, in one place.
//!
//! ```text
//! instance-key = "instances/" institution "/" study-uid "/" series-uid "/" sop-uid "." digest ".dcm"
//! digest       = 16 lowercase hex digits (the first 64 bits of the object's SHA-256)
//! ```
//! UIDs are digits and dots (PS3.5 §9), institution codes are `[A-Za-z0-9_-]`,
//! so keys need no escaping and sort by study, series, instance.

/// Top-level prefix of original objects.
pub const INSTANCES_PREFIX: &str = "instances/";

/// The parts of an instance key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceKey {
    pub institution: String,
    pub study_uid: String,
    pub series_uid: String,
    pub sop_uid: String,
    pub digest: String,
}

fn is_uid(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

fn is_code(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl InstanceKey {
    /// Build a key; `None` if a UID is not a valid UID (it would not be a safe path).
    pub fn new(
        institution: &str,
        study: &str,
        series: &str,
        sop: &str,
        sha256_hex: &str,
    ) -> Option<Self> {
        (is_code(institution)
            && is_uid(study)
            && is_uid(series)
            && is_uid(sop)
            && sha256_hex.len() >= 16)
            .then(|| Self {
                institution: institution.into(),
                study_uid: study.into(),
                series_uid: series.into(),
                sop_uid: sop.into(),
                digest: sha256_hex[..16].to_ascii_lowercase(),
            })
    }

    /// Parse a stored key back (used by `reindex`).
    pub fn parse(key: &str) -> Option<Self> {
        let rest = key.strip_prefix(INSTANCES_PREFIX)?;
        let mut parts = rest.split('/');
        let (inst, study, series, file) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let stem = file.strip_suffix(".dcm")?;
        let (sop, digest) = stem.rsplit_once('.')?;
        if digest.len() != 16 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let k = Self::new(inst, study, series, sop, digest)?;
        (k.digest == digest).then_some(k)
    }

    /// The key as a string.
    pub fn as_key(&self) -> String {
        format!(
            "{INSTANCES_PREFIX}{}/{}/{}/{}.{}.dcm",
            self.institution, self.study_uid, self.series_uid, self.sop_uid, self.digest
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let k = InstanceKey::new(
            "HOSP1",
            "1.2.3",
            "1.2.3.4",
            "1.2.3.4.5",
            "ABCDEF0123456789ffff",
        )
        .unwrap();
        assert_eq!(
            k.as_key(),
            "instances/HOSP1/1.2.3/1.2.3.4/1.2.3.4.5.abcdef0123456789.dcm"
        );
        assert_eq!(InstanceKey::parse(&k.as_key()), Some(k));
    }

    #[test]
    fn rejects_unsafe_parts() {
        assert!(InstanceKey::new("HOSP1", "../x", "1", "1", "0123456789abcdef").is_none());
        assert!(InstanceKey::new("HO/SP", "1", "1", "1", "0123456789abcdef").is_none());
        assert!(InstanceKey::parse("instances/H/1/2/3.dcm").is_none());
        assert!(InstanceKey::parse("instances/H/1/2/3.0123456789abcdeg.dcm").is_none());
    }
}
