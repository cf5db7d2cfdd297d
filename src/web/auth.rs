//! Authentication of every request under `/dicom-web` and `/api`: a bearer
//! token verified by `auth::Verifier`, turned into the `Caller` the handlers
//! take. The middleware wraps whole route trees, so a route cannot be added
//! without it (default deny); CORS preflights are answered by the CORS layer
//! outside it and never reach it.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::problem::WebError;
use crate::access::Institution;
use crate::audit::{Action, Event, Outcome};
use crate::auth::{Role, TokenError};
use crate::hub::Hub;

/// The authenticated user of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: String,
    pub institution: Arc<Institution>,
    pub role: Role,
    /// The client's address (for the audit trail).
    pub client: String,
}

impl Caller {
    /// The caller as the audit trail names it.
    pub fn actor(&self) -> crate::audit::Actor {
        crate::audit::Actor {
            user: self.user.clone(),
            institution: self.institution.code.clone(),
            role: crate::audit::serde_name(&self.role),
            client: self.client.clone(),
        }
    }

    /// Refuse (403) unless the caller has one of `roles`.
    pub fn require(&self, roles: &[Role], action: &str) -> Result<(), WebError> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            Err(WebError::Forbidden(format!(
                "the role {:?} may not {action}",
                self.role
            )))
        }
    }
}

/// Verify the bearer token and attach the `Caller`, or answer 401/403.
/// Both refusals, and every 403 a handler answers, are audited.
pub async fn authenticate(State(hub): State<Arc<Hub>>, mut req: Request, next: Next) -> Response {
    let client = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    let path = req.uri().path().to_string();
    match caller_of(&hub, req.headers(), &client) {
        Ok(caller) => {
            req.extensions_mut().insert(caller.clone());
            let resp = next.run(req).await;
            if resp.status() == axum::http::StatusCode::FORBIDDEN {
                super::audit(
                    &hub,
                    &caller,
                    Action::Authorize,
                    Outcome::Denied,
                    Vec::new(),
                    serde_json::json!({ "path": path }),
                );
            }
            resp
        }
        Err(e) => {
            if let WebError::Unauthorized(reason) = &e {
                metrics::counter!(crate::telemetry::AUTH_FAILURES, "reason" => reason_label(reason))
                    .increment(1);
            }
            tracing::info!(path = %path, error = %e, "request refused");
            let action = match &e {
                WebError::Unauthorized(_) => Action::Authenticate,
                _ => Action::Authorize,
            };
            // Whom the refused token claims to be (unverified): so that the
            // claimed institution's admins see the attempts on its users.
            let (user, institution) = claimed(&hub, req.headers()).unwrap_or_default();
            hub.audit.record(Event {
                at: String::new(),
                action,
                outcome: Outcome::Denied,
                user,
                institution,
                role: String::new(),
                client,
                objects: Vec::new(),
                detail: serde_json::json!({
                    "path": path, "reason": e.to_string(), "identity_verified": false,
                }),
            });
            e.into_response()
        }
    }
}

/// The `sub` and `inst` a bearer token claims, without verifying it; only an
/// institution of the network is taken, and only short values.
fn claimed(hub: &Hub, headers: &axum::http::HeaderMap) -> Option<(String, String)> {
    use base64::Engine;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.split_once(' ')?.1.trim();
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let inst = claims.get("inst")?.as_str()?;
    hub.institutions.by_code(inst)?;
    let sub: String = claims
        .get("sub")
        .and_then(|s| s.as_str())
        .unwrap_or_default()
        .chars()
        .take(128)
        .collect();
    Some((sub, inst.to_string()))
}

fn reason_label(e: &TokenError) -> &'static str {
    match e {
        TokenError::Missing => "missing",
        TokenError::Malformed => "malformed",
        TokenError::Expired => "expired",
        TokenError::NotYetValid => "not_yet_valid",
        TokenError::BadSignature => "signature",
        TokenError::WrongParty => "issuer_audience",
        TokenError::Claims(_) => "claims",
    }
}

fn caller_of(hub: &Hub, headers: &axum::http::HeaderMap, client: &str) -> Result<Caller, WebError> {
    let mut given = headers.get_all(header::AUTHORIZATION).iter();
    let value = given.next().ok_or(TokenError::Missing)?;
    // Two credentials: which one the request means is not ours to guess.
    if given.next().is_some() {
        return Err(TokenError::Malformed.into());
    }
    let value = value.to_str().map_err(|_| TokenError::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(TokenError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(TokenError::Missing.into());
    }
    let claims = hub.verifier.verify(token.trim())?;
    let institution = hub.institutions.by_code(&claims.inst).ok_or_else(|| {
        WebError::Forbidden(format!(
            "institution {} is not part of this network",
            claims.inst
        ))
    })?;
    Ok(Caller {
        user: claims.sub,
        institution,
        role: claims.role,
        client: client.to_string(),
    })
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // Only present behind `authenticate`; a route outside it is refused.
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or(WebError::Unauthorized(TokenError::Missing))
    }
}
