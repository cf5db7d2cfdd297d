//! The Part-10 envelope (PS3.10 §7.1): preamble, `DICM`, File Meta Information.
//! We write our own meta header in front of the data set bytes exactly as
//! received, and read headers back to find where a data set starts.

use std::io::Read;

use dicom_object::meta::{FileMetaTable, FileMetaTableBuilder};

/// Our Implementation Class UID (0002,0012), a UUID-derived UID (PS3.5 §B.2).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.318013485696808249001531393977782817450";
/// Implementation Version Name (0002,0013).
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("TSUNAGU_", env!("CARGO_PKG_VERSION"));

#[derive(Debug, thiserror::Error)]
pub enum Part10Error {
    #[error("not a DICOM Part-10 file (no DICM prefix)")]
    NotPart10,
    #[error("unreadable file meta information: {0}")]
    Meta(String),
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),
}

/// The facts of a File Meta Information header that ingest relies on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax: String,
    pub source_ae_title: Option<String>,
}

fn trim_uid(s: &str) -> String {
    s.trim_end_matches(['\0', ' ']).to_string()
}

/// Counts bytes so the data set offset is known after the meta group.
struct Counting<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Read the preamble and meta group; returns the meta and the data set offset.
/// The reader must be positioned at the start of the file.
pub fn read_meta<R: Read>(reader: R) -> Result<(FileMeta, u64), Part10Error> {
    let mut r = Counting {
        inner: reader,
        count: 0,
    };
    let mut preamble = [0u8; 128];
    r.read_exact(&mut preamble)
        .map_err(|_| Part10Error::NotPart10)?;
    let table = FileMetaTable::from_reader(&mut r).map_err(|e| {
        if r.count <= 132 {
            Part10Error::NotPart10
        } else {
            Part10Error::Meta(e.to_string())
        }
    })?;
    let meta = FileMeta {
        sop_class_uid: trim_uid(table.media_storage_sop_class_uid()),
        sop_instance_uid: trim_uid(table.media_storage_sop_instance_uid()),
        transfer_syntax: trim_uid(table.transfer_syntax()),
        source_ae_title: table
            .source_application_entity_title()
            .map(|s| s.trim().to_string()),
    };
    Ok((meta, r.count))
}

/// Encode preamble + `DICM` + meta group for an object we are about to store.
pub fn encode_header(meta: &FileMeta) -> Result<Vec<u8>, Part10Error> {
    let mut b = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(meta.sop_class_uid.as_str())
        .media_storage_sop_instance_uid(meta.sop_instance_uid.as_str())
        .transfer_syntax(meta.transfer_syntax.as_str())
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME);
    if let Some(ae) = &meta.source_ae_title {
        b = b.source_application_entity_title(ae.as_str());
    }
    let table = b.build().map_err(|e| Part10Error::Meta(e.to_string()))?;
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    table
        .write(&mut out)
        .map_err(|e| Part10Error::Meta(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_reports_dataset_offset() {
        let meta = FileMeta {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: "1.2.3.4.5".into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            source_ae_title: Some("HOSP1".into()),
        };
        let mut bytes = encode_header(&meta).unwrap();
        let header_len = bytes.len() as u64;
        bytes.extend_from_slice(&[0x08, 0x00, 0x16, 0x00]);
        let (back, offset) = read_meta(&bytes[..]).unwrap();
        assert_eq!(back, meta);
        assert_eq!(offset, header_len);
    }

    #[test]
    fn rejects_non_part10() {
        assert!(matches!(
            read_meta(&[0u8; 200][..]),
            Err(Part10Error::NotPart10)
        ));
    }
}
