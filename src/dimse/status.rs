//! The one place where errors become DIMSE statuses (PS3.4 Annex B.2.3, PS3.7 Annex C).

use crate::ingest::IngestError;

pub const SUCCESS: u16 = 0x0000;
/// Refused: SOP Class not supported.
pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
/// Unrecognized operation.
pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
/// Refused: Out of Resources.
pub const OUT_OF_RESOURCES: u16 = 0xA700;
/// Error: Data Set does not match SOP Class.
pub const DATA_SET_MISMATCH: u16 = 0xA900;
/// Error: Cannot understand.
pub const CANNOT_UNDERSTAND: u16 = 0xC000;
/// Processing failure.
pub const PROCESSING_FAILURE: u16 = 0x0110;

/// The C-STORE status of an ingest failure, and a comment safe to send.
pub fn of_ingest_error(e: &IngestError) -> (u16, &'static str) {
    match e {
        // A retry cannot help: the study is another patient's.
        IngestError::Index(crate::index::IndexError::Conflict(_)) => (
            CANNOT_UNDERSTAND,
            "study or series belongs to another patient or study",
        ),
        // Store or index unavailable or full: the sender should retry later.
        IngestError::Store(_) | IngestError::Index(_) | IngestError::Spool(_) => {
            (OUT_OF_RESOURCES, "storage temporarily unavailable")
        }
        IngestError::Unparsable(_) => (CANNOT_UNDERSTAND, "data set cannot be parsed"),
        IngestError::Incomplete(_) => (DATA_SET_MISMATCH, "identifying UID missing or invalid"),
        IngestError::Mismatch { .. } => {
            (DATA_SET_MISMATCH, "data set UIDs differ from the command")
        }
        IngestError::Internal(_) => (PROCESSING_FAILURE, "internal error"),
    }
}
