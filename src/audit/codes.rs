//! Each event's PS3.15 §A.5 identification: EventID and EventTypeCode from
//! PS3.16 (CID 400 Audit Event ID, CID 401 Audit Event Type Code, CID 403
//! Security Alert Type), EventActionCode and EventOutcomeIndicator.

use serde::Serialize;

use super::{Action, Outcome};

/// A coded concept (scheme DCM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Code {
    pub code: &'static str,
    pub scheme: &'static str,
    pub meaning: &'static str,
}

const fn dcm(code: &'static str, meaning: &'static str) -> Code {
    Code {
        code,
        scheme: "DCM",
        meaning,
    }
}

pub const INSTANCES_ACCESSED: Code = dcm("110103", "DICOM Instances Accessed");
pub const INSTANCES_TRANSFERRED: Code = dcm("110104", "DICOM Instances Transferred");
pub const PATIENT_RECORD: Code = dcm("110110", "Patient Record");
pub const QUERY: Code = dcm("110112", "Query");
pub const SECURITY_ALERT: Code = dcm("110113", "Security Alert");
pub const USER_AUTHENTICATION: Code = dcm("110114", "User Authentication");
pub const LOGIN: Code = dcm("110122", "Login");
pub const EMERGENCY_OVERRIDE_STARTED: Code = dcm("110127", "Emergency Override Started");
pub const USE_OF_RESTRICTED_FUNCTION: Code = dcm("110132", "Use of Restricted Function");
pub const AUDIT_LOG_USED: Code = dcm("110101", "Audit Log Used");
pub const NODE_AUTHENTICATION: Code = dcm("110126", "Node Authentication");
pub const AUDIT_RECORDING_STOPPED: Code = dcm("110133", "Audit Recording Stopped");

/// The PS3.15 identification of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EventCodes {
    pub event_id: Code,
    pub event_type: Option<Code>,
    /// C(reate), R(ead), U(pdate), D(elete), E(xecute).
    pub action_code: &'static str,
    /// 0 success, 4 minor failure (refused), 8 serious failure.
    pub outcome_indicator: u8,
}

pub fn of(action: Action, outcome: Outcome) -> EventCodes {
    let (event_id, event_type, action_code) = match action {
        Action::Store => (INSTANCES_TRANSFERRED, None, "C"),
        Action::Query => (QUERY, None, "E"),
        Action::Access => (INSTANCES_ACCESSED, None, "R"),
        Action::Retrieve => (INSTANCES_TRANSFERRED, None, "R"),
        Action::Link | Action::Disclose => (PATIENT_RECORD, None, "C"),
        Action::Revoke => (PATIENT_RECORD, None, "U"),
        Action::Unlink => (PATIENT_RECORD, None, "D"),
        Action::BreakGlass => (SECURITY_ALERT, Some(EMERGENCY_OVERRIDE_STARTED), "E"),
        Action::Authenticate => (USER_AUTHENTICATION, Some(LOGIN), "E"),
        Action::Authorize => (SECURITY_ALERT, Some(USE_OF_RESTRICTED_FUNCTION), "E"),
        Action::ReadAudit => (AUDIT_LOG_USED, None, "R"),
        Action::AuthenticateNode => (SECURITY_ALERT, Some(NODE_AUTHENTICATION), "E"),
        Action::ReadRecord => (PATIENT_RECORD, None, "R"),
        Action::TrailAltered => (SECURITY_ALERT, Some(AUDIT_RECORDING_STOPPED), "E"),
    };
    EventCodes {
        event_id,
        event_type,
        action_code,
        outcome_indicator: match outcome {
            Outcome::Success => 0,
            Outcome::Denied => 4,
            Outcome::Failure => 8,
        },
    }
}
