//! Patient identifier coercion (PS3.4 §C.4.2.1.4.2, PS3.3 §C.12.1.1.9): how
//! another institution's object is shown to a requester — under the
//! requester's own Patient ID and Issuer, the owner's identifiers kept in
//! Other Patient IDs Sequence (0010,1002). Stored bytes never change; this
//! rewrites what is sent.

use serde_json::{Map, Value, json};

pub const PATIENT_ID: &str = "00100020";
pub const ISSUER: &str = "00100021";
pub const TYPE_OF_PATIENT_ID: &str = "00100022";
pub const ISSUER_QUALIFIERS: &str = "00100024";
pub const OTHER_PATIENT_IDS: &str = "00101002";

/// The identifiers an answer shows instead of the stored ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coercion {
    /// What is shown.
    pub patient_id: String,
    pub issuer: String,
    /// The owner's patient ID and issuer as indexed (the issuer is the
    /// owner's namespace when the object names none).
    pub owner_patient_id: String,
    pub owner_issuer: String,
}

fn lo(v: &str) -> Value {
    json!({"vr": "LO", "Value": [v]})
}

/// Coerce one DICOM JSON data set in place: the requester's ID and issuer,
/// and one more Other Patient IDs item with the stored ID, issuer and
/// issuer qualifiers.
pub fn coerce_json(ds: &mut Map<String, Value>, c: &Coercion) {
    let mut item = Map::new();
    ds.insert(PATIENT_ID.into(), lo(&c.patient_id));
    ds.insert(ISSUER.into(), lo(&c.issuer));
    item.insert(PATIENT_ID.into(), lo(&c.owner_patient_id));
    item.insert(ISSUER.into(), lo(&c.owner_issuer));
    // Type 1 in Other Patient IDs Sequence items (PS3.3 C.7.1.1).
    item.insert(
        TYPE_OF_PATIENT_ID.into(),
        json!({"vr": "CS", "Value": ["TEXT"]}),
    );
    if let Some(v) = ds.remove(ISSUER_QUALIFIERS) {
        item.insert(ISSUER_QUALIFIERS.into(), v);
    }
    let other = ds
        .entry(OTHER_PATIENT_IDS)
        .or_insert_with(|| json!({"vr": "SQ"}));
    if let Value::Object(o) = other {
        let items = o.entry("Value").or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(a) = items {
            a.push(Value::Object(item));
        }
    }
}

/// `coerce_json` on a data set's JSON text; the text unchanged if it is not
/// a JSON object (never the case for what ingest wrote).
pub fn coerce_json_text(text: &str, c: &Coercion) -> String {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(mut m)) => {
            coerce_json(&mut m, c);
            Value::Object(m).to_string()
        }
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_identifiers_move_to_other_patient_ids() {
        let mut ds: Map<String, Value> = serde_json::from_str(
            r#"{"00100020":{"vr":"LO","Value":["H2-77"]},"00100021":{"vr":"LO","Value":["HOSP2"]},
                "00100024":{"vr":"SQ","Value":[{"00400032":{"vr":"UT","Value":["1.2.3"]}}]},
                "00101002":{"vr":"SQ","Value":[{"00100020":{"vr":"LO","Value":["OLD"]}}]}}"#,
        )
        .unwrap();
        coerce_json(
            &mut ds,
            &Coercion {
                patient_id: "H3-5".into(),
                issuer: "HOSP3".into(),
                owner_patient_id: "H2-77".into(),
                owner_issuer: "HOSP2".into(),
            },
        );
        assert_eq!(ds[PATIENT_ID]["Value"][0], "H3-5");
        assert_eq!(ds[ISSUER]["Value"][0], "HOSP3");
        assert!(!ds.contains_key(ISSUER_QUALIFIERS));
        let items = ds[OTHER_PATIENT_IDS]["Value"].as_array().unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[1][PATIENT_ID]["Value"][0], "H2-77");
        assert_eq!(items[1][ISSUER]["Value"][0], "HOSP2");
        assert_eq!(
            items[1][ISSUER_QUALIFIERS]["Value"][0]["00400032"]["Value"][0],
            "1.2.3"
        );
    }
}

// ------------------------------------------------------------ Part-10 objects

use std::io::{Read, Seek, SeekFrom, Write};

use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_parser::dataset::LazyDataToken;
use dicom_parser::dataset::lazy_read::LazyDataSetReader;
use dicom_parser::stateful::decode::StatefulDecode;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::part10;
use super::transcode::{TranscodeError, delimiter, header, malformed};

const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";

/// Whether objects of `ts` can be coerced as they are (their data set is
/// Explicit VR Little Endian, pixel data native or encapsulated); the others
/// are re-encoded to Explicit VR Little Endian first.
pub fn coercible_as_stored(ts: &str) -> bool {
    !matches!(ts, IMPLICIT_VR_LE | EXPLICIT_VR_BE | DEFLATED)
}

/// Why and by whom an object was coerced (Original Attributes Sequence).
#[derive(Debug, Clone)]
pub struct Provenance {
    /// Source of Previous Values (0400,0564): the owner institution.
    pub source: String,
    /// Attribute Modification DateTime (0400,0562), DT.
    pub modified_at: String,
}

/// One element, encoded Explicit VR Little Endian, value padded to even
/// length (`pad`: space for text, NUL for UIDs).
fn element(out: &mut impl Write, tag: Tag, vr: VR, value: &[u8], pad: u8) -> std::io::Result<()> {
    let len = value.len() + value.len() % 2;
    header(out, tag, vr, len as u32)?;
    out.write_all(value)?;
    if value.len() % 2 == 1 {
        out.write_all(&[pad])?;
    }
    Ok(())
}

fn sequence(out: &mut impl Write, tag: Tag, items: &[Vec<u8>]) -> std::io::Result<()> {
    header(out, tag, VR::SQ, u32::MAX)?;
    for item in items {
        delimiter(out, 0xE000, u32::MAX)?;
        out.write_all(item)?;
        delimiter(out, 0xE00D, 0)?;
    }
    delimiter(out, 0xE0DD, 0)
}

fn delimiter_bytes(element: u16, len: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(8);
    let _ = delimiter(&mut v, element, len);
    v
}

/// Send encoded bytes where the current capture says.
fn emit(capture: &mut Capture, out: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    match capture {
        Capture::Qualifiers(buf) => buf.extend_from_slice(bytes),
        Capture::OtherIds(buf) => {
            buf.extend_from_slice(bytes);
            out.write_all(bytes)?;
        }
        Capture::None => out.write_all(bytes)?,
    }
    Ok(())
}

/// What the stored object said, captured on the way.
#[derive(Default)]
struct Originals {
    /// Encoded elements, for Modified Attributes Sequence.
    patient_id: Option<Vec<u8>>,
    issuer: Option<Vec<u8>>,
    qualifiers: Option<Vec<u8>>,
    other_ids: Option<Vec<u8>>,
}

/// Where the tokens of the top-level element being passed go.
enum Capture {
    None,
    /// Issuer of Patient ID Qualifiers Sequence: dropped from the output.
    Qualifiers(Vec<u8>),
    /// Other Patient IDs Sequence: written and kept.
    OtherIds(Vec<u8>),
}

/// Write the Part-10 object read from `src` (Explicit VR Little Endian data
/// set: see `coercible_as_stored`) to `out` coerced to `c`: the requester's
/// Patient ID and Issuer, no Issuer Qualifiers, the owner's identifiers added
/// to Other Patient IDs Sequence, and the replaced values in a new item of
/// Original Attributes Sequence (0400,0561). Values are copied; memory is
/// one element value at most.
pub fn coerce_part10<R: Read + Seek, W: Write>(
    mut src: R,
    out: &mut W,
    c: &Coercion,
    provenance: &Provenance,
) -> Result<(), TranscodeError> {
    src.seek(SeekFrom::Start(0))?;
    let (meta, offset) = part10::read_meta(&mut src).map_err(malformed)?;
    if !coercible_as_stored(&meta.transfer_syntax) {
        return Err(TranscodeError::Unsupported(meta.transfer_syntax));
    }
    src.seek(SeekFrom::Start(0))?;
    std::io::copy(&mut (&mut src).take(offset), out)?;
    let ts = TransferSyntaxRegistry
        .get(&meta.transfer_syntax)
        .or_else(|| TransferSyntaxRegistry.get(super::transcode::EXPLICIT_VR_LE))
        .ok_or_else(|| TranscodeError::Unsupported(meta.transfer_syntax.clone()))?;
    let mut reader =
        LazyDataSetReader::new_with_ts(std::io::BufReader::new(src), ts).map_err(malformed)?;

    let mut orig = Originals::default();
    // Top-level insertions still due, in tag order.
    let mut due: Vec<Tag> = vec![
        tags::PATIENT_ID,
        tags::ISSUER_OF_PATIENT_ID,
        tags::OTHER_PATIENT_I_DS_SEQUENCE,
        tags::ORIGINAL_ATTRIBUTES_SEQUENCE,
    ];
    // Open sequences; `true` for an encapsulated pixel sequence.
    let mut stack: Vec<bool> = Vec::new();
    let mut capture = Capture::None;
    // The top-level sequence being passed, to extend at its end.
    let mut open_top: Option<Tag> = None;

    while let Some(token) = reader.advance() {
        let token = token.map_err(malformed)?;
        let top = stack.is_empty();
        if top {
            let tag = match &token {
                LazyDataToken::LazyValue { header: h, .. } => Some(h.tag),
                LazyDataToken::SequenceStart { tag, .. } => Some(*tag),
                LazyDataToken::PixelSequenceStart => Some(tags::PIXEL_DATA),
                _ => None,
            };
            if let Some(tag) = tag {
                while let Some(&next) = due.first() {
                    if next >= tag {
                        break;
                    }
                    due.remove(0);
                    insert(out, next, c, provenance, &orig)?;
                }
                due.retain(|t| *t != tag);
            }
        }
        match token {
            LazyDataToken::LazyValue { header: h, decoder } => {
                if h.len.is_undefined() {
                    return Err(malformed(format!("undefined length of {}", h.tag)));
                }
                let mut head = Vec::with_capacity(12);
                header(&mut head, h.tag, h.vr, h.len.0)?;
                if top && (h.tag == tags::PATIENT_ID || h.tag == tags::ISSUER_OF_PATIENT_ID) {
                    decoder.read_to_vec(h.len.0, &mut head).map_err(malformed)?;
                    if h.tag == tags::PATIENT_ID {
                        orig.patient_id = Some(head);
                    } else {
                        orig.issuer = Some(head);
                    }
                    insert(out, h.tag, c, provenance, &orig)?;
                } else if matches!(capture, Capture::None) {
                    out.write_all(&head)?;
                    decoder.read_to(h.len.0, &mut *out).map_err(malformed)?;
                } else {
                    // Inside a captured sequence: small values.
                    decoder.read_to_vec(h.len.0, &mut head).map_err(malformed)?;
                    emit(&mut capture, out, &head)?;
                }
            }
            LazyDataToken::SequenceStart { tag, .. } => {
                if top {
                    capture = match tag {
                        tags::ISSUER_OF_PATIENT_ID_QUALIFIERS_SEQUENCE => {
                            Capture::Qualifiers(Vec::new())
                        }
                        tags::OTHER_PATIENT_I_DS_SEQUENCE => Capture::OtherIds(Vec::new()),
                        _ => Capture::None,
                    };
                    open_top = Some(tag);
                }
                let mut head = Vec::with_capacity(12);
                header(&mut head, tag, VR::SQ, u32::MAX)?;
                emit(&mut capture, out, &head)?;
                stack.push(false);
            }
            LazyDataToken::PixelSequenceStart => {
                header(out, tags::PIXEL_DATA, VR::OB, u32::MAX)?;
                stack.push(true);
            }
            LazyDataToken::ItemStart { .. } | LazyDataToken::ItemEnd
                if stack.last() == Some(&true) => {}
            LazyDataToken::LazyItemValue { len, decoder } => {
                delimiter(out, 0xE000, len)?;
                decoder.read_to(len, &mut *out).map_err(malformed)?;
            }
            LazyDataToken::ItemStart { .. } => {
                emit(&mut capture, out, &delimiter_bytes(0xE000, u32::MAX))?;
            }
            LazyDataToken::ItemEnd => {
                emit(&mut capture, out, &delimiter_bytes(0xE00D, 0))?;
            }
            LazyDataToken::SequenceEnd => {
                stack.pop();
                if !stack.is_empty() {
                    emit(&mut capture, out, &delimiter_bytes(0xE0DD, 0))?;
                    continue;
                }
                match (
                    open_top.take(),
                    std::mem::replace(&mut capture, Capture::None),
                ) {
                    (_, Capture::Qualifiers(mut buf)) => {
                        buf.extend_from_slice(&delimiter_bytes(0xE0DD, 0));
                        orig.qualifiers = Some(buf);
                    }
                    (_, Capture::OtherIds(mut buf)) => {
                        buf.extend_from_slice(&delimiter_bytes(0xE0DD, 0));
                        orig.other_ids = Some(buf);
                        delimiter(out, 0xE000, u32::MAX)?;
                        out.write_all(&owner_item(c, &orig)?)?;
                        delimiter(out, 0xE00D, 0)?;
                        delimiter(out, 0xE0DD, 0)?;
                    }
                    (Some(t), Capture::None) if t == tags::ORIGINAL_ATTRIBUTES_SEQUENCE => {
                        delimiter(out, 0xE000, u32::MAX)?;
                        out.write_all(&original_attributes_item(provenance, &orig)?)?;
                        delimiter(out, 0xE00D, 0)?;
                        delimiter(out, 0xE0DD, 0)?;
                    }
                    // The end of encapsulated pixel data, or of any other sequence.
                    _ => delimiter(out, 0xE0DD, 0)?,
                }
            }
            _ => {}
        }
    }
    for tag in due {
        insert(out, tag, c, provenance, &orig)?;
    }
    Ok(())
}

/// The item added to Other Patient IDs Sequence: the owner's identifiers.
fn owner_item(c: &Coercion, orig: &Originals) -> std::io::Result<Vec<u8>> {
    let mut item = Vec::new();
    element(
        &mut item,
        tags::PATIENT_ID,
        VR::LO,
        c.owner_patient_id.as_bytes(),
        b' ',
    )?;
    element(
        &mut item,
        tags::ISSUER_OF_PATIENT_ID,
        VR::LO,
        c.owner_issuer.as_bytes(),
        b' ',
    )?;
    // Type 1 in Other Patient IDs Sequence items (PS3.3 C.7.1.1).
    element(&mut item, tags::TYPE_OF_PATIENT_ID, VR::CS, b"TEXT", b' ')?;
    if let Some(q) = &orig.qualifiers {
        item.extend_from_slice(q);
    }
    Ok(item)
}

/// The item added to Original Attributes Sequence (PS3.3 §C.12.1.1.9).
fn original_attributes_item(p: &Provenance, orig: &Originals) -> std::io::Result<Vec<u8>> {
    let mut modified = Vec::new();
    // Elements the object did not have are recorded empty (they were added).
    match &orig.patient_id {
        Some(e) => modified.extend_from_slice(e),
        None => element(&mut modified, tags::PATIENT_ID, VR::LO, b"", b' ')?,
    }
    match &orig.issuer {
        Some(e) => modified.extend_from_slice(e),
        None => element(&mut modified, tags::ISSUER_OF_PATIENT_ID, VR::LO, b"", b' ')?,
    }
    if let Some(q) = &orig.qualifiers {
        modified.extend_from_slice(q);
    }
    match &orig.other_ids {
        Some(o) => modified.extend_from_slice(o),
        None => sequence(&mut modified, tags::OTHER_PATIENT_I_DS_SEQUENCE, &[])?,
    }
    let mut item = Vec::new();
    sequence(&mut item, tags::MODIFIED_ATTRIBUTES_SEQUENCE, &[modified])?;
    element(
        &mut item,
        tags::ATTRIBUTE_MODIFICATION_DATE_TIME,
        VR::DT,
        p.modified_at.as_bytes(),
        b' ',
    )?;
    element(&mut item, tags::MODIFYING_SYSTEM, VR::LO, b"tsunagu", b' ')?;
    element(
        &mut item,
        tags::SOURCE_OF_PREVIOUS_VALUES,
        VR::LO,
        p.source.as_bytes(),
        b' ',
    )?;
    element(
        &mut item,
        tags::REASON_FOR_THE_ATTRIBUTE_MODIFICATION,
        VR::CS,
        b"COERCE",
        b' ',
    )?;
    Ok(item)
}

/// Write the coerced top-level element `tag` (new or replacing the stored one).
fn insert(
    out: &mut impl Write,
    tag: Tag,
    c: &Coercion,
    p: &Provenance,
    orig: &Originals,
) -> std::io::Result<()> {
    match tag {
        tags::PATIENT_ID => element(out, tag, VR::LO, c.patient_id.as_bytes(), b' '),
        tags::ISSUER_OF_PATIENT_ID => element(out, tag, VR::LO, c.issuer.as_bytes(), b' '),
        tags::OTHER_PATIENT_I_DS_SEQUENCE => sequence(out, tag, &[owner_item(c, orig)?]),
        tags::ORIGINAL_ATTRIBUTES_SEQUENCE => {
            sequence(out, tag, &[original_attributes_item(p, orig)?])
        }
        _ => Ok(()),
    }
}
