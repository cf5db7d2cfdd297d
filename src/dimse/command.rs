//! DIMSE command sets (PS3.7 §9.3, §E): parsed once at the edge into typed
//! values; responses built here. Command sets are always Implicit VR LE.

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;

/// Command Field (0000,0100) values we act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandField {
    CStoreRq,
    CEchoRq,
    /// Any other request: answered with 0211 (unrecognized operation).
    Other(u16),
}

impl From<u16> for CommandField {
    fn from(v: u16) -> Self {
        match v {
            0x0001 => Self::CStoreRq,
            0x0030 => Self::CEchoRq,
            n => Self::Other(n),
        }
    }
}

/// Command Data Set Type (0000,0800) value meaning "no data set".
const NO_DATA_SET: u16 = 0x0101;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("unreadable command set: {0}")]
    Unreadable(String),
    #[error("command set lacks {0}")]
    Missing(&'static str),
}

/// A request command, reduced to what the SCP needs.
#[derive(Debug, Clone)]
pub struct Command {
    pub field: CommandField,
    pub raw_field: u16,
    pub message_id: u16,
    pub affected_sop_class_uid: Option<String>,
    pub affected_sop_instance_uid: Option<String>,
    pub has_data_set: bool,
}

fn uid(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<String> {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .filter(|s| !s.is_empty())
}

fn u16_of(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<u16> {
    obj.get(tag).and_then(|e| e.to_int::<u16>().ok())
}

/// Check that every element of an Implicit VR Little Endian command set
/// fits in the bytes received, before the parser sees it: it allocates a
/// value's declared length up front, so a 20-byte command claiming a 4 GiB
/// UID would take the process down. Command sets hold no sequences, so an
/// undefined length is refused too.
fn check_lengths(bytes: &[u8]) -> Result<(), CommandError> {
    let mut at = 0usize;
    while at < bytes.len() {
        let header = bytes
            .get(at..at + 8)
            .ok_or_else(|| CommandError::Unreadable("an element header is cut off".into()))?;
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let end = (at + 8)
            .checked_add(len as usize)
            .filter(|end| len != u32::MAX && *end <= bytes.len())
            .ok_or_else(|| {
                CommandError::Unreadable(format!(
                    "element ({:02X}{:02X},{:02X}{:02X}) claims {len} bytes, more than the command set holds",
                    header[1], header[0], header[3], header[2]
                ))
            })?;
        at = end;
    }
    Ok(())
}

impl Command {
    pub fn parse(bytes: &[u8]) -> Result<Self, CommandError> {
        check_lengths(bytes)?;
        let obj =
            InMemDicomObject::read_dataset_with_ts(bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
                .map_err(|e| CommandError::Unreadable(e.to_string()))?;
        let raw_field =
            u16_of(&obj, tags::COMMAND_FIELD).ok_or(CommandError::Missing("Command Field"))?;
        Ok(Self {
            field: raw_field.into(),
            raw_field,
            message_id: u16_of(&obj, tags::MESSAGE_ID)
                .ok_or(CommandError::Missing("Message ID"))?,
            affected_sop_class_uid: uid(&obj, tags::AFFECTED_SOP_CLASS_UID),
            affected_sop_instance_uid: uid(&obj, tags::AFFECTED_SOP_INSTANCE_UID),
            has_data_set: u16_of(&obj, tags::COMMAND_DATA_SET_TYPE)
                .map(|t| t != NO_DATA_SET)
                .unwrap_or(false),
        })
    }
}

/// Encode a response to `req` with `status` (and an optional Error Comment,
/// which never carries patient data).
pub fn response(req: &Command, status: u16, error_comment: Option<&str>) -> Vec<u8> {
    let mut elems = vec![DataElement::new(
        tags::COMMAND_FIELD,
        VR::US,
        PrimitiveValue::from(req.raw_field | 0x8000),
    )];
    if let Some(c) = &req.affected_sop_class_uid {
        elems.push(DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(c.as_str()),
        ));
    }
    elems.push(DataElement::new(
        tags::MESSAGE_ID_BEING_RESPONDED_TO,
        VR::US,
        PrimitiveValue::from(req.message_id),
    ));
    elems.push(DataElement::new(
        tags::COMMAND_DATA_SET_TYPE,
        VR::US,
        PrimitiveValue::from(NO_DATA_SET),
    ));
    elems.push(DataElement::new(
        tags::STATUS,
        VR::US,
        PrimitiveValue::from(status),
    ));
    if let Some(i) = &req.affected_sop_instance_uid {
        elems.push(DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(i.as_str()),
        ));
    }
    if let Some(c) = error_comment {
        // LO: at most 64 characters.
        let c: String = c
            .chars()
            .filter(|c| c.is_ascii() && !c.is_control())
            .take(64)
            .collect();
        elems.push(DataElement::new(
            tags::ERROR_COMMENT,
            VR::LO,
            PrimitiveValue::from(c),
        ));
    }
    let obj = InMemDicomObject::command_from_element_iter(elems);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .expect("writing a command set to memory");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn element(group: u16, elem: u16, value: &[u8], claimed: Option<u32>) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(group.to_le_bytes());
        v.extend(elem.to_le_bytes());
        v.extend(claimed.unwrap_or(value.len() as u32).to_le_bytes());
        v.extend(value);
        v
    }

    #[test]
    fn a_length_past_the_command_set_is_refused_before_parsing() {
        let mut ok = element(0x0000, 0x0100, &0x0030u16.to_le_bytes(), None);
        ok.extend(element(0x0000, 0x0110, &7u16.to_le_bytes(), None));
        ok.extend(element(0x0000, 0x0800, &0x0101u16.to_le_bytes(), None));
        let echo = Command::parse(&ok).unwrap();
        assert_eq!(
            (echo.raw_field, echo.message_id, echo.has_data_set),
            (0x0030, 7, false)
        );
        for claimed in [0xFFFF_FFF0, u32::MAX, 3] {
            let mut bad = ok.clone();
            bad.extend(element(0x0000, 0x0002, b"1.2\0", Some(claimed)));
            assert!(
                matches!(Command::parse(&bad), Err(CommandError::Unreadable(_))),
                "{claimed:#x}"
            );
        }
        assert!(Command::parse(&ok[..ok.len() - 1]).is_err());
    }
}
