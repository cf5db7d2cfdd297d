//! The admin API under `/api` (JSON; described by `/api/openapi.json`):
//! patient ID links, disclosures, break-glass and the audit trail, each for
//! the caller's own institution only. Institutions come from configuration
//! and are listed read-only.

use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Caller;
use super::problem::WebError;
use super::{Params, PathParams};
use crate::access::records::{self, Direction, NewDisclosure, RecordError};
use crate::audit::{Action, AuditObject, Outcome};
use crate::auth::Role;
use crate::clock;
use crate::hub::Hub;

impl From<RecordError> for WebError {
    fn from(e: RecordError) -> Self {
        match e {
            RecordError::NotFound => WebError::NotFound,
            RecordError::Conflict(d) => WebError::Conflict(d),
            RecordError::Invalid(d) => WebError::BadRequest(d),
            RecordError::Index(e) => e.into(),
        }
    }
}

/// A JSON body whose rejection is a problem body like every other error.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = WebError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(e) if e.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                Err(WebError::UnsupportedMediaType(e.body_text()))
            }
            Err(e) => Err(WebError::BadRequest(e.body_text())),
        }
    }
}

fn own_patient(caller: &Caller, patient_id: &str) -> AuditObject {
    AuditObject {
        patient_institution: caller.institution.code.clone(),
        patient_id: patient_id.trim().to_string(),
        study_uid: String::new(),
    }
}

/// The patients of `disclosures`, as their disclosers identify them.
fn disclosed_patients<'a>(
    disclosures: impl Iterator<Item = &'a crate::access::records::Disclosure>,
) -> Vec<AuditObject> {
    disclosures
        .map(|d| AuditObject {
            patient_institution: d.from_institution.clone(),
            patient_id: d.patient_id.clone(),
            study_uid: String::new(),
        })
        .collect()
}

/// Audit the outcome of a records operation and pass it on.
fn audited<T>(
    hub: &Hub,
    caller: &Caller,
    action: Action,
    objects: Vec<AuditObject>,
    detail: Value,
    r: Result<T, RecordError>,
) -> Result<T, WebError> {
    let outcome = match &r {
        Ok(_) => Outcome::Success,
        Err(RecordError::NotFound) => Outcome::Denied,
        Err(_) => Outcome::Failure,
    };
    let mut detail = detail;
    if let (Err(e), Value::Object(m)) = (&r, &mut detail) {
        m.insert("error".into(), Value::String(e.to_string()));
    }
    super::audit(hub, caller, action, outcome, objects, detail);
    Ok(r?)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkRequest {
    patient_id: String,
    join: Option<JoinTarget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinTarget {
    institution: String,
    patient_id: String,
}

/// `POST /api/links`
pub async fn link(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    Body(req): Body<LinkRequest>,
) -> Result<Response, WebError> {
    caller.require(&[Role::Admin], "manage patient ID links")?;
    let join = req
        .join
        .as_ref()
        .map(|j| (j.institution.as_str(), j.patient_id.as_str()));
    let mut objects = vec![own_patient(&caller, &req.patient_id)];
    if let Some(j) = &req.join {
        objects.push(AuditObject {
            patient_institution: j.institution.clone(),
            patient_id: j.patient_id.trim().to_string(),
            study_uid: String::new(),
        });
    }
    let r = hub
        .records()
        .link(
            &caller.institution,
            &caller.user,
            &req.patient_id,
            join,
            hub.clock.now(),
        )
        .await;
    let detail = json!({ "joined": req.join.is_some() });
    let link = audited(&hub, &caller, Action::Link, objects, detail, r)?;
    Ok((StatusCode::CREATED, Json(link)).into_response())
}

/// `DELETE /api/links/{patient_id}`
pub async fn unlink(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    PathParams(patient_id): PathParams<String>,
) -> Result<Response, WebError> {
    caller.require(&[Role::Admin], "manage patient ID links")?;
    let r = hub
        .records()
        .unlink(
            &caller.institution,
            &caller.user,
            &patient_id,
            hub.clock.now(),
        )
        .await;
    let revoked = r.as_ref().map(|v| v.clone()).unwrap_or_default();
    let objects = vec![own_patient(&caller, &patient_id)];
    audited(
        &hub,
        &caller,
        Action::Unlink,
        objects,
        json!({ "revoked_disclosures": revoked }),
        r,
    )?;
    Ok(
        Json(json!({ "patient_id": patient_id.trim(), "revoked_disclosures": revoked }))
            .into_response(),
    )
}

/// `GET /api/patients/{patient_id}`
pub async fn patient(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    PathParams(patient_id): PathParams<String>,
) -> Result<Response, WebError> {
    caller.require(&[Role::Admin, Role::Clinician], "read patient ID links")?;
    let view = hub
        .records()
        .patient(&caller.institution, &patient_id, hub.clock.now())
        .await;
    // Every patient the answer names: its owners' admins see the read.
    let mut objects = vec![own_patient(&caller, &patient_id)];
    if let Ok(v) = &view {
        objects.extend(disclosed_patients(
            v.disclosed_to.iter().chain(&v.disclosed_by),
        ));
    }
    let view = audited(
        &hub,
        &caller,
        Action::ReadRecord,
        objects,
        json!({ "record": "patient" }),
        view,
    )?;
    Ok(Json(view).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisclosureRequest {
    patient_id: String,
    to_institution: String,
    consent_reference: String,
    consented_at: String,
    expires_at: Option<String>,
}

fn time_field(name: &str, v: &str) -> Result<chrono::DateTime<chrono::Utc>, WebError> {
    use chrono::Datelike;
    let t = clock::parse(v).ok_or_else(|| {
        WebError::BadRequest(format!(
            "{name}: {v:?} is not an RFC 3339 date-time (2026-11-25T10:00:00+09:00)"
        ))
    })?;
    // Stored times compare as text, which holds for four-digit years only.
    if !(1..=9999).contains(&t.year()) {
        return Err(WebError::BadRequest(format!(
            "{name}: {v:?} is outside the years 0001-9999 (in UTC)"
        )));
    }
    Ok(t)
}

/// `POST /api/disclosures`
pub async fn disclose(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    Body(req): Body<DisclosureRequest>,
) -> Result<Response, WebError> {
    caller.require(&[Role::Admin], "manage disclosures")?;
    let consented_at = time_field("consented_at", &req.consented_at)?;
    let expires_at = req
        .expires_at
        .as_deref()
        .map(|e| time_field("expires_at", e))
        .transpose()?;
    let r = hub
        .records()
        .disclose(
            &caller.institution,
            &caller.user,
            &NewDisclosure {
                patient_id: &req.patient_id,
                to_institution: &req.to_institution,
                consent_reference: &req.consent_reference,
                consented_at,
                expires_at,
            },
            hub.clock.now(),
        )
        .await;
    let detail = json!({
        "to_institution": req.to_institution,
        "consent_reference": req.consent_reference,
        "disclosure": r.as_ref().ok().map(|d| d.id.clone()),
    });
    let objects = vec![own_patient(&caller, &req.patient_id)];
    let d = audited(&hub, &caller, Action::Disclose, objects, detail, r)?;
    Ok((StatusCode::CREATED, Json(d)).into_response())
}

/// `DELETE /api/disclosures/{id}`
pub async fn revoke(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    PathParams(id): PathParams<String>,
) -> Result<Response, WebError> {
    caller.require(&[Role::Admin], "manage disclosures")?;
    let r = hub
        .records()
        .revoke(&caller.institution, &caller.user, &id, hub.clock.now())
        .await;
    let objects = r
        .as_ref()
        .map(|d| vec![own_patient(&caller, &d.patient_id)])
        .unwrap_or_default();
    let d = audited(
        &hub,
        &caller,
        Action::Revoke,
        objects,
        json!({ "disclosure": id }),
        r,
    )?;
    Ok(Json(d).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisclosureQuery {
    patient_id: Option<String>,
    direction: Option<String>,
}

/// `GET /api/disclosures?patient_id=&direction=given|received`
pub async fn disclosures(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    Params(q): Params<DisclosureQuery>,
) -> Result<Response, WebError> {
    caller.require(&[Role::Admin], "read disclosures")?;
    let direction = match q.direction.as_deref().unwrap_or("given") {
        "given" => Direction::Given,
        "received" => Direction::Received,
        other => {
            return Err(WebError::BadRequest(format!(
                "direction: {other:?} is neither \"given\" nor \"received\""
            )));
        }
    };
    let list = hub
        .records()
        .disclosures(
            &caller.institution,
            direction,
            q.patient_id.as_deref().map(str::trim),
            hub.clock.now(),
        )
        .await;
    let mut objects: Vec<AuditObject> = q
        .patient_id
        .as_deref()
        .map(|p| vec![own_patient(&caller, p)])
        .unwrap_or_default();
    if let Ok(l) = &list {
        objects.extend(disclosed_patients(l.iter()));
    }
    let list = audited(
        &hub,
        &caller,
        Action::ReadRecord,
        objects,
        json!({ "record": "disclosures", "direction": q.direction.as_deref().unwrap_or("given") }),
        list,
    )?;
    Ok(Json(list).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakGlassRequest {
    patient_id: String,
    institution: String,
    reason: String,
}

/// `POST /api/break-glass`
pub async fn break_glass(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    Body(req): Body<BreakGlassRequest>,
) -> Result<Response, WebError> {
    caller.require(&[Role::Clinician], "open emergency access")?;
    let cfg = &hub.config.access;
    if !cfg.break_glass {
        return Err(WebError::Forbidden(
            "emergency (break-glass) access is not enabled on this network".into(),
        ));
    }
    let r = hub
        .records()
        .break_glass(
            &caller.institution,
            &caller.user,
            &req.institution,
            &req.patient_id,
            &req.reason,
            cfg.break_glass_hours,
            hub.clock.now(),
        )
        .await;
    let objects = vec![AuditObject {
        patient_institution: req.institution.clone(),
        patient_id: req.patient_id.trim().to_string(),
        study_uid: String::new(),
    }];
    let detail = json!({
        // A refused reason is kept as far as a valid one could be.
        "reason": records::as_stated(&req.reason),
        "expires_at": r.as_ref().ok().map(|g| g.expires_at.clone()),
    });
    let g = audited(&hub, &caller, Action::BreakGlass, objects, detail, r)?;
    Ok((StatusCode::CREATED, Json(g)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    patient_id: Option<String>,
    user: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
    before: Option<i64>,
}

/// Most events in one page of `GET /api/audit`.
const AUDIT_PAGE_MAX: i64 = 1000;

/// `GET /api/audit?patient_id=&user=&from=&to=&limit=&offset=&before=`
pub async fn audit_trail(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    Params(q): Params<AuditQuery>,
) -> Result<Response, WebError> {
    caller.require(&[Role::Admin], "read the audit trail")?;
    let stamp = |name: &str, v: &Option<String>| {
        v.as_deref()
            .map(|t| time_field(name, t).map(clock::stamp))
            .transpose()
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=AUDIT_PAGE_MAX).contains(&limit)
        || q.offset.is_some_and(|o| o < 0)
        || q.before.is_some_and(|b| b < 1)
    {
        return Err(WebError::BadRequest(format!(
            "limit must be 1 to {AUDIT_PAGE_MAX}, offset not negative and before positive"
        )));
    }
    let filter = crate::audit::trail::Filter {
        institution: caller.institution.code.clone(),
        // Patient IDs are kept trimmed (user names as the token gave them).
        patient_id: q.patient_id.as_deref().map(|v| v.trim().to_string()),
        user: q.user.clone(),
        from: stamp("from", &q.from)?,
        to: stamp("to", &q.to)?,
        limit,
        offset: q.offset.unwrap_or(0),
        before: q.before,
    };
    // What this node has recorded so far is in the answer.
    hub.audit.flush().await;
    let events = crate::audit::trail::query(hub.index.pool(), &filter).await?;
    let objects = q
        .patient_id
        .as_deref()
        .map(|p| vec![own_patient(&caller, p)])
        .unwrap_or_default();
    super::audit(
        &hub,
        &caller,
        Action::ReadAudit,
        Outcome::Success,
        objects,
        json!({ "user": q.user, "from": q.from, "to": q.to, "events": events.len() }),
    );
    Ok(Json(events).into_response())
}

/// `GET /api/institutions`: the network's institutions (configuration).
pub async fn institutions(State(hub): State<Arc<Hub>>, _caller: Caller) -> Response {
    let list: Vec<Value> = hub
        .institutions
        .all()
        .iter()
        .map(|i| {
            json!({
                "code": i.code,
                "name": i.name,
                "issuer_of_patient_id": i.issuer_of_patient_id,
            })
        })
        .collect();
    Json(list).into_response()
}

/// `GET /api/openapi.json`: the description of this API (no data; served
/// without a token so that tools can read it).
pub async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}
