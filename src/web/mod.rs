//! HTTP: DICOMweb under `/dicom-web` (QIDO-RS, WADO-RS, STOW-RS), WADO-URI
//! at `/wado`, the admin API under `/api`, and the operations endpoints.
//! Every route but health, metrics and the API description sits behind
//! `auth::authenticate`.

pub mod admin;
pub mod auth;
pub mod bulk;
pub mod capabilities;
pub mod https;
pub mod images;
pub mod json_text;
pub mod media;
pub mod multipart;
pub mod ops;
pub mod problem;
pub mod qido;
pub mod stow;
pub mod wado;
pub mod xml;

use std::sync::Arc;

use axum::Router;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware;
use axum::routing::get;
use serde_json::Value;
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::dicom::dataset::BULK_URI_PREFIX;
use crate::hub::Hub;
use crate::index::search::Scope;
use auth::Caller;
use problem::WebError;

/// The media type of DICOM JSON answers.
pub const DICOM_JSON: &str = "application/dicom+json";

/// What `caller` may see: the access scope every index read takes.
pub async fn scope_of(hub: &Hub, caller: &Caller) -> Result<Scope, WebError> {
    let now = hub.clock.now();
    let grants = if hub.config.access.break_glass {
        hub.index
            .granted_patients(&caller.institution.code, &caller.user, now)
            .await?
    } else {
        Vec::new()
    };
    Ok(Scope::consented(
        &caller.institution.code,
        &caller.institution.issuer_of_patient_id,
        now,
        grants,
    ))
}

/// The audit detail of a read under `scope`: marked `break_glass` while the
/// caller holds an active break-glass grant (DESIGN: such access is audited
/// as such).
pub fn read_detail(scope: &Scope, mut detail: Value) -> Value {
    if scope.under_break_glass()
        && let Value::Object(d) = &mut detail
    {
        d.insert("break_glass".into(), Value::Bool(true));
    }
    detail
}

/// Record an audit event of `caller`'s request.
pub fn audit(
    hub: &Hub,
    caller: &Caller,
    action: crate::audit::Action,
    outcome: crate::audit::Outcome,
    objects: Vec<crate::audit::AuditObject>,
    detail: Value,
) {
    hub.audit
        .record_by(&caller.actor(), action, outcome, objects, detail);
}

/// Native DICOM Model documents as `multipart/related; type="application/dicom+xml"`.
pub fn xml_parts_response(documents: Vec<String>) -> axum::response::Response {
    use futures::StreamExt;
    let boundary = multipart::boundary();
    let content_type = multipart::content_type(&boundary, "application/dicom+xml", None);
    let parts = futures::stream::iter(documents.into_iter().map(|d| multipart::Part {
        content_type: "application/dicom+xml".into(),
        location: None,
        body: futures::stream::iter([Ok(bytes::Bytes::from(d))]).boxed(),
    }))
    .boxed();
    let mut resp = axum::response::Response::new(axum::body::Body::from_stream(multipart::body(
        boundary, parts,
    )));
    if let Ok(v) = HeaderValue::from_str(&content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

/// The whole HTTP application.
pub fn router(hub: Arc<Hub>) -> Router {
    let dicomweb = Router::new()
        .route("/", axum::routing::options(capabilities::options))
        .route(
            "/studies",
            get(qido::studies)
                .post(stow::store)
                .options(capabilities::options),
        )
        .route("/series", get(qido::series).options(capabilities::options))
        .route(
            "/instances",
            get(qido::instances).options(capabilities::options),
        )
        .route(
            "/studies/{study}",
            get(wado::retrieve)
                .post(stow::store_in_study)
                .options(capabilities::options),
        )
        .route(
            "/studies/{study}/metadata",
            get(wado::metadata).options(capabilities::options),
        )
        .route(
            "/studies/{study}/series",
            get(qido::series).options(capabilities::options),
        )
        .route(
            "/studies/{study}/instances",
            get(qido::instances).options(capabilities::options),
        )
        .route(
            "/studies/{study}/series/{series}",
            get(wado::retrieve).options(capabilities::options),
        )
        .route(
            "/studies/{study}/series/{series}/metadata",
            get(wado::metadata).options(capabilities::options),
        )
        .route(
            "/studies/{study}/series/{series}/instances",
            get(qido::instances).options(capabilities::options),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}",
            get(wado::retrieve).options(capabilities::options),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/metadata",
            get(wado::metadata).options(capabilities::options),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
            get(wado::frames).options(capabilities::options),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/rendered",
            get(images::rendered).options(capabilities::options),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered",
            get(images::rendered).options(capabilities::options),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/thumbnail",
            get(images::thumbnail).options(capabilities::options),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/thumbnail",
            get(images::thumbnail).options(capabilities::options),
        )
        .route(
            "/studies/{study}/series/{series}/thumbnail",
            get(images::thumbnail_series).options(capabilities::options),
        )
        .route(
            "/studies/{study}/thumbnail",
            get(images::thumbnail_study).options(capabilities::options),
        )
        .route(
            "/studies/{study}/rendered",
            get(images::rendered_unsupported).options(capabilities::options),
        )
        .route(
            "/studies/{study}/series/{series}/rendered",
            get(images::rendered_unsupported).options(capabilities::options),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/bulk/{offset}/{length}",
            get(bulk::bulk).options(capabilities::options),
        )
        .method_not_allowed_fallback(|| async { WebError::MethodNotAllowed })
        .fallback(|| async { WebError::NotFound });
    let api = Router::new()
        .route("/links", axum::routing::post(admin::link))
        .route("/links/{patient_id}", axum::routing::delete(admin::unlink))
        .route("/patients/{patient_id}", get(admin::patient))
        .route(
            "/disclosures",
            get(admin::disclosures).post(admin::disclose),
        )
        .route("/disclosures/{id}", axum::routing::delete(admin::revoke))
        .route("/break-glass", axum::routing::post(admin::break_glass))
        .route("/audit", get(admin::audit_trail))
        .route("/institutions", get(admin::institutions))
        .method_not_allowed_fallback(|| async { WebError::MethodNotAllowed })
        .fallback(|| async { WebError::NotFound });
    let authenticated = Router::new()
        .nest("/dicom-web", dicomweb)
        .nest("/api", api)
        .route("/wado", get(wado::wado_uri))
        .method_not_allowed_fallback(|| async { WebError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(
            hub.clone(),
            auth::authenticate,
        ));
    let cors = cors_layer(&hub.config.dicomweb.cors_origins);
    // JSON only: DICOM and pixel bodies are compressed already or must not be.
    // The fastest level: a 1,000-instance study's metadata (1.5 MB) still
    // shrinks ~65-fold, in half the time of the default level, and a viewer
    // waits for the compressor's first output before it sees any header.
    let compression = CompressionLayer::new()
        .quality(tower_http::CompressionLevel::Fastest)
        .compress_when(
            |_status, _version, headers: &axum::http::HeaderMap, _ext: &axum::http::Extensions| {
                headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|ct| {
                        ct.starts_with(DICOM_JSON)
                            || ct.starts_with("application/json")
                            || ct.starts_with("application/problem+json")
                    })
            },
        );
    let app = ops::router()
        .route("/api/openapi.json", get(admin::openapi))
        .method_not_allowed_fallback(|| async { WebError::MethodNotAllowed })
        .merge(authenticated)
        .layer(compression)
        .layer(middleware::from_fn(refuse_nul))
        .with_state(hub);
    // tower-http's CORS layer answers every OPTIONS itself; only real
    // preflights (with Origin and Access-Control-Request-Method) may go to
    // it, other OPTIONS requests are Retrieve Capabilities.
    let with_cors = app.clone().layer(cors);
    let dispatch = tower::service_fn(move |req: axum::extract::Request| {
        let preflight = req.method() == Method::OPTIONS
            && req.headers().contains_key(header::ORIGIN)
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        let plain_options = req.method() == Method::OPTIONS && !preflight;
        let (a, b) = (app.clone(), with_cors.clone());
        async move {
            use tower::ServiceExt;
            if plain_options {
                a.oneshot(req).await
            } else {
                b.oneshot(req).await
            }
        }
    });
    Router::new()
        .fallback_service(dispatch)
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
        ]))
}

/// A NUL (`%00`) anywhere in the path or query is refused before any
/// handler sees it: no identifier, UID or matching value holds one, and
/// PostgreSQL rejects it in text (which would read as the index being
/// unavailable).
async fn refuse_nul(
    req: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let raw = req.uri().path_and_query().map_or("", |p| p.as_str());
    if raw
        .as_bytes()
        .windows(3)
        .any(|w| w.eq_ignore_ascii_case(b"%00"))
    {
        return WebError::BadRequest(
            "a request's path and query must not contain NUL (%00)".into(),
        )
        .into_response();
    }
    next.run(req).await
}

fn cors_layer(origins: &[String]) -> CorsLayer {
    let list: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(list))
        .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::ACCEPT,
            header::CONTENT_TYPE,
            header::IF_NONE_MATCH,
            header::RANGE,
        ])
        .expose_headers([
            header::WARNING,
            header::ETAG,
            header::CONTENT_LOCATION,
            header::CONTENT_RANGE,
            header::RETRY_AFTER,
            HeaderName::from_static("content-disposition"),
        ])
        .max_age(std::time::Duration::from_secs(600))
}

/// The study, series and instance a resource path names.
#[derive(Debug, Clone, Default)]
pub struct Resource {
    pub study: Option<String>,
    pub series: Option<String>,
    pub instance: Option<String>,
}

impl Resource {
    /// One instance.
    pub fn instance(study: &str, series: &str, instance: &str) -> Self {
        Self {
            study: Some(study.to_string()),
            series: Some(series.to_string()),
            instance: Some(instance.to_string()),
        }
    }

    /// Study, series and instance UIDs (the study's empty when not named).
    pub fn uids(&self) -> (&str, Option<&str>, Option<&str>) {
        (
            self.study.as_deref().unwrap_or_default(),
            self.series.as_deref(),
            self.instance.as_deref(),
        )
    }

    /// What an audit record says was asked for.
    pub fn audit_detail(&self) -> Value {
        let (study, series, instance) = self.uids();
        serde_json::json!({ "study": study, "series": series, "instance": instance })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Resource {
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, WebError> {
        let params = axum::extract::RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| WebError::bad_request(e.to_string()))?;
        let mut r = Resource::default();
        for (name, value) in &params {
            let v = Some(value.to_string());
            match name {
                "study" => r.study = v,
                "series" => r.series = v,
                "instance" => r.instance = v,
                _ => {}
            }
        }
        Ok(r)
    }
}

/// Query parameters whose rejection (a malformed value, an unknown or a
/// repeated parameter) is a problem body like every other error.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|axum::extract::Query(v)| Self(v))
            .map_err(|e| WebError::BadRequest(e.body_text()))
    }
}

/// Path parameters whose rejection (not UTF-8, not a number) is a problem
/// body like every other error.
pub struct PathParams<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for PathParams<T> {
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, WebError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Self(v))
            .map_err(|e| WebError::bad_request(e.body_text()))
    }
}

/// The public URLs of resources (RetrieveURL, BulkDataURI, Content-Location).
#[derive(Debug, Clone)]
pub struct Urls {
    /// The service root, e.g. `http://host:8080/dicom-web`.
    pub root: String,
}

impl Urls {
    pub fn study(&self, study: &str) -> String {
        format!("{}/studies/{study}", self.root)
    }

    pub fn series(&self, study: &str, series: &str) -> String {
        format!("{}/studies/{study}/series/{series}", self.root)
    }

    pub fn instance(&self, study: &str, series: &str, instance: &str) -> String {
        format!(
            "{}/studies/{study}/series/{series}/instances/{instance}",
            self.root
        )
    }

    /// What turns the stored bulk data references of instances' JSON texts
    /// into URLs of this server.
    pub fn bulk_rewriter(&self) -> BulkRewriter {
        BulkRewriter {
            target: format!("\"BulkDataURI\":\"{BULK_URI_PREFIX}"),
            root: json_escaped(&self.root).into_owned(),
        }
    }

    /// `BulkRewriter::rewrite` on a parsed element (and its items).
    pub fn rewrite_bulk(&self, el: &mut Value, study: &str, series: &str, sop: &str) {
        match el {
            Value::Object(m) => {
                if let Some(Value::String(u)) = m.get_mut("BulkDataURI")
                    && let Some(rest) = u.strip_prefix(BULK_URI_PREFIX)
                {
                    *u = format!("{}/bulk/{rest}", self.instance(study, series, sop));
                }
                for v in m.values_mut() {
                    self.rewrite_bulk(v, study, series, sop);
                }
            }
            Value::Array(a) => {
                for v in a {
                    self.rewrite_bulk(v, study, series, sop);
                }
            }
            _ => {}
        }
    }
}

/// `text` as it stands inside a JSON string.
fn json_escaped(text: &str) -> std::borrow::Cow<'_, str> {
    if !text
        .chars()
        .any(|c| c == '"' || c == '\\' || c.is_control())
    {
        return text.into();
    }
    let quoted = serde_json::to_string(text).unwrap_or_default();
    quoted[1..quoted.len() - 1].to_string().into()
}

/// See `Urls::bulk_rewriter`.
pub struct BulkRewriter {
    target: String,
    /// The root URL, escaped for a JSON string.
    root: String,
}

impl BulkRewriter {
    /// `json` with its bulk data references pointing at this server. One
    /// pass; an instance without bulk data is passed on, not copied.
    pub fn rewrite(&self, json: String, study: &str, series: &str, sop: &str) -> String {
        let mut found = json
            .match_indices(&self.target)
            .map(|(at, _)| at)
            .peekable();
        if found.peek().is_none() {
            return json;
        }
        // The URL goes inside a JSON string (stored UIDs need no escaping;
        // the root was escaped once).
        let url = format!(
            "\"BulkDataURI\":\"{}/studies/{}/series/{}/instances/{}/bulk/",
            self.root,
            json_escaped(study),
            json_escaped(series),
            json_escaped(sop)
        );
        let mut out = String::with_capacity(json.len() + 2 * url.len());
        let mut done = 0;
        for at in found {
            out.push_str(&json[done..at]);
            out.push_str(&url);
            done = at + self.target.len();
        }
        out.push_str(&json[done..]);
        out
    }
}

impl FromRequestParts<Arc<Hub>> for Urls {
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, hub: &Arc<Hub>) -> Result<Self, WebError> {
        if let Some(base) = &hub.config.dicomweb.base_url {
            return Ok(Self {
                root: base.trim_end_matches('/').to_string(),
            });
        }
        let h = &parts.headers;
        let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
        let host = text("x-forwarded-host")
            .or_else(|| text(header::HOST.as_str()))
            .or_else(|| parts.uri.authority().map(|a| a.as_str()))
            .unwrap_or("localhost");
        // Without a proxy's word, the scheme this listener speaks.
        let ours = if hub.config.server.http_tls.is_some() {
            "https"
        } else {
            "http"
        };
        let proto = text("x-forwarded-proto").unwrap_or(ours);
        // Only characters a host and port may have: the value ends up in URLs.
        let mut host: String = host
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(*c))
            .collect();
        // Some clients (dicomweb-client) send Host without the port they
        // connected to; without a proxy in between, that port is ours.
        let has_port = host.rsplit_once(':').is_some_and(|(_, p)| !p.contains(']'));
        if !has_port
            && text("x-forwarded-host").is_none()
            && let Some(port) = hub
                .http_port
                .get()
                .filter(|p| **p != if ours == "https" { 443 } else { 80 })
        {
            host = format!("{host}:{port}");
        }
        let proto = if proto.eq_ignore_ascii_case("https") {
            "https"
        } else {
            "http"
        };
        Ok(Self {
            root: format!("{proto}://{host}/dicom-web"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_references_become_urls_of_this_server() {
        let urls = Urls {
            root: "http://hub\"x/dicom-web".into(),
        };
        let bulk = urls.bulk_rewriter();
        // Without bulk data the text passes through.
        let plain = r#"{"00100020":{"vr":"LO","Value":["P1"]}}"#.to_string();
        assert_eq!(bulk.rewrite(plain.clone(), "1.2", "1.3", "1.4"), plain);
        // Every reference is rewritten; the root is escaped for JSON.
        let json = format!(
            r#"{{"7FE00010":{{"vr":"OW","BulkDataURI":"{BULK_URI_PREFIX}866/512"}},"00420011":{{"vr":"OB","BulkDataURI":"{BULK_URI_PREFIX}2000/10"}}}}"#
        );
        let out = bulk.rewrite(json, "1.2", "1.3", "1.4");
        let v: Value = serde_json::from_str(&out).unwrap();
        let base = "http://hub\"x/dicom-web/studies/1.2/series/1.3/instances/1.4/bulk/";
        assert_eq!(v["7FE00010"]["BulkDataURI"], format!("{base}866/512"));
        assert_eq!(v["00420011"]["BulkDataURI"], format!("{base}2000/10"));
        // A UID that is not one (never stored so) is escaped too.
        let odd = format!(r#"{{"7FE00010":{{"vr":"OW","BulkDataURI":"{BULK_URI_PREFIX}1/2"}}}}"#);
        let v: Value = serde_json::from_str(&bulk.rewrite(odd, "1.2\"", "1.3", "1.4")).unwrap();
        assert!(
            v["7FE00010"]["BulkDataURI"]
                .as_str()
                .unwrap()
                .contains("/studies/1.2\"/")
        );
    }
}
