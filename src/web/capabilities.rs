//! Retrieve Capabilities (PS3.18 §8.9): `OPTIONS` on the service root or any
//! resource answers a WADL document of the whole service — resources,
//! methods, query parameters and media types — or, for `Accept:
//! application/json`, the same as JSON. Authenticated like every resource
//! (CORS preflights never get here).

use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::auth::Caller;
use super::media::accept_of;
use super::problem::WebError;

/// (path, methods, what it answers, query parameters).
const RESOURCES: &[(&str, &str, &str, &str)] = &[
    (
        "studies",
        "GET POST",
        "application/dicom+json, multipart/related; type=\"application/dicom+xml\"",
        "limit offset fuzzymatching includefield {attributeID}",
    ),
    (
        "series",
        "GET",
        "application/dicom+json, multipart/related; type=\"application/dicom+xml\"",
        "limit offset fuzzymatching includefield {attributeID}",
    ),
    (
        "instances",
        "GET",
        "application/dicom+json, multipart/related; type=\"application/dicom+xml\"",
        "limit offset fuzzymatching includefield {attributeID}",
    ),
    (
        "studies/{study}",
        "GET POST",
        "multipart/related; type=\"application/dicom\"",
        "",
    ),
    (
        "studies/{study}/metadata",
        "GET",
        "application/dicom+json, multipart/related; type=\"application/dicom+xml\"",
        "",
    ),
    (
        "studies/{study}/series",
        "GET",
        "application/dicom+json, multipart/related; type=\"application/dicom+xml\"",
        "limit offset fuzzymatching includefield {attributeID}",
    ),
    (
        "studies/{study}/instances",
        "GET",
        "application/dicom+json, multipart/related; type=\"application/dicom+xml\"",
        "limit offset fuzzymatching includefield {attributeID}",
    ),
    (
        "studies/{study}/series/{series}",
        "GET",
        "multipart/related; type=\"application/dicom\"",
        "",
    ),
    (
        "studies/{study}/series/{series}/metadata",
        "GET",
        "application/dicom+json, multipart/related; type=\"application/dicom+xml\"",
        "",
    ),
    (
        "studies/{study}/series/{series}/instances",
        "GET",
        "application/dicom+json, multipart/related; type=\"application/dicom+xml\"",
        "limit offset fuzzymatching includefield {attributeID}",
    ),
    (
        "studies/{study}/series/{series}/instances/{instance}",
        "GET",
        "multipart/related; type=\"application/dicom\"",
        "",
    ),
    (
        "studies/{study}/series/{series}/instances/{instance}/metadata",
        "GET",
        "application/dicom+json, multipart/related; type=\"application/dicom+xml\"",
        "",
    ),
    (
        "studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
        "GET",
        "multipart/related; type=\"application/octet-stream\", multipart/related; type=\"image/jpeg\" (and the other stored media types)",
        "",
    ),
    (
        "studies/{study}/series/{series}/instances/{instance}/rendered",
        "GET",
        "image/jpeg, image/png",
        "viewport window quality iccprofile charset",
    ),
    (
        "studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered",
        "GET",
        "image/jpeg, image/png",
        "viewport window quality iccprofile charset",
    ),
    (
        "studies/{study}/thumbnail",
        "GET",
        "image/jpeg, image/png",
        "viewport quality iccprofile charset",
    ),
    (
        "studies/{study}/series/{series}/thumbnail",
        "GET",
        "image/jpeg, image/png",
        "viewport quality iccprofile charset",
    ),
    (
        "studies/{study}/series/{series}/instances/{instance}/thumbnail",
        "GET",
        "image/jpeg, image/png",
        "viewport quality iccprofile charset",
    ),
    (
        "studies/{study}/series/{series}/instances/{instance}/frames/{frames}/thumbnail",
        "GET",
        "image/jpeg, image/png",
        "viewport quality iccprofile charset",
    ),
    (
        "studies/{study}/series/{series}/instances/{instance}/bulk/{offset}/{length}",
        "GET",
        "multipart/related; type=\"application/octet-stream\", application/octet-stream",
        "",
    ),
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn wadl(base: &str) -> String {
    let mut out = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<application xmlns=\"http://wadl.dev.java.net/2009/02\">\n",
    );
    out.push_str(&format!("  <resources base=\"{}/\">\n", escape(base)));
    for (path, methods, media, params) in RESOURCES {
        out.push_str(&format!("    <resource path=\"{}\">\n", escape(path)));
        for p in params.split_whitespace() {
            out.push_str(&format!(
                "      <param name=\"{}\" style=\"query\"/>\n",
                escape(p)
            ));
        }
        for m in methods.split_whitespace() {
            out.push_str(&format!("      <method name=\"{m}\">\n"));
            if m == "POST" {
                out.push_str("        <request><representation mediaType=\"multipart/related; type=&quot;application/dicom&quot;\"/></request>\n");
                out.push_str("        <response><representation mediaType=\"application/dicom+json\"/></response>\n");
            } else {
                for t in media.split(", ") {
                    out.push_str(&format!(
                        "        <response><representation mediaType=\"{}\"/></response>\n",
                        escape(t)
                    ));
                }
            }
            out.push_str("      </method>\n");
        }
        out.push_str("    </resource>\n");
    }
    out.push_str("  </resources>\n</application>\n");
    out
}

/// `OPTIONS` on any DICOMweb path.
pub async fn options(
    _caller: Caller,
    urls: super::Urls,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let accept = accept_of(&headers);
    let json_wanted = accept
        .iter()
        .find(|m| {
            m.covers("application/vnd.sun.wadl+xml")
                || m.is("application/json")
                || m.is("application/dicom+json")
        })
        .is_some_and(|m| m.is("application/json") || m.is("application/dicom+json"));
    let allow = [(
        header::ALLOW,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    )];
    if json_wanted {
        let body = json!({
            "base": urls.root,
            "resources": RESOURCES.iter().map(|(p, m, media, q)| json!({
                "path": p,
                "methods": m.split_whitespace().collect::<Vec<_>>(),
                "media_types": media.split(", ").collect::<Vec<_>>(),
                "query_parameters": q.split_whitespace().collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        return Ok((
            allow,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response());
    }
    if !accept
        .iter()
        .any(|m| m.covers("application/vnd.sun.wadl+xml") || m.covers("application/xml"))
    {
        return Err(WebError::NotAcceptable(
            "capabilities are available as application/vnd.sun.wadl+xml or application/json".into(),
        ));
    }
    Ok((
        allow,
        [(header::CONTENT_TYPE, "application/vnd.sun.wadl+xml")],
        wadl(&urls.root),
    )
        .into_response())
}
