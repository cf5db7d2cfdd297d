//! Every HTTP error, mapped once to a status and an RFC 9457 problem body
//! (`application/problem+json`). Details never name what the caller may not
//! see: a hidden object is `NotFound`, exactly like a missing one.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::auth::TokenError;
use crate::index::IndexError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("{0}")]
    Unauthorized(#[from] TokenError),
    #[error("{0}")]
    Forbidden(String),
    #[error("no such resource")]
    NotFound,
    /// The resource exists, not with this method (axum adds `Allow`).
    #[error("this method is not allowed here")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotAcceptable(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("the request body exceeds the limit of {0} bytes")]
    PayloadTooLarge(u64),
    /// A byte range starting past the end of a value of this many bytes.
    #[error("the requested range starts beyond the {0} bytes of the value")]
    RangeNotSatisfiable(u64),
    #[error("{0}")]
    Unavailable(String),
    /// A limit of ours is reached: the client should retry shortly.
    #[error("{0}")]
    Busy(String),
    #[error("internal error")]
    Internal(String),
}

impl WebError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RangeNotSatisfiable(_) => StatusCode::RANGE_NOT_SATISFIABLE,
            Self::Unavailable(_) | Self::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::BadRequest(detail.into())
    }
}

impl From<IndexError> for WebError {
    fn from(e: IndexError) -> Self {
        Self::Unavailable(format!("the index is unavailable: {e}"))
    }
}

impl From<crate::imaging::ImagingError> for WebError {
    fn from(e: crate::imaging::ImagingError) -> Self {
        match e {
            crate::imaging::ImagingError::Busy => Self::Busy(e.to_string()),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<StoreError> for WebError {
    fn from(e: StoreError) -> Self {
        Self::Unavailable(format!("the object store failed: {e}"))
    }
}

/// A problem body (RFC 9457) with `status`.
pub fn problem(status: StatusCode, detail: &str) -> Response {
    let body = json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        )],
        body.to_string(),
    )
        .into_response()
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let status = self.status();
        let detail = match &self {
            // Internal details go to the log, not to the client.
            Self::Internal(d) | Self::Unavailable(d) => {
                tracing::error!(error = %d, status = status.as_u16(), "request failed");
                if matches!(self, Self::Internal(_)) {
                    "internal error".to_string()
                } else {
                    "a backing service is unavailable; retry later".to_string()
                }
            }
            Self::Busy(d) => {
                tracing::warn!(detail = %d, "a limit is reached; answered 503");
                d.clone()
            }
            other => other.to_string(),
        };
        let mut resp = problem(status, &detail);
        if let Self::Unauthorized(e) = &self {
            let challenge = match e {
                TokenError::Missing => r#"Bearer realm="tsunagu""#.to_string(),
                _ => format!(
                    r#"Bearer realm="tsunagu", error="invalid_token", error_description="{e}""#
                ),
            };
            if let Ok(v) = HeaderValue::from_str(&challenge) {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
        }
        if matches!(self, Self::Unavailable(_) | Self::Busy(_)) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        if let Self::RangeNotSatisfiable(len) = &self {
            // RFC 9110 §15.5.17: the current length.
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
        }
        resp
    }
}
