//! `/healthz` (the process answers), `/readyz` (store and index reachable),
//! `/metrics` (Prometheus text format). Unauthenticated by design: they carry
//! no patient data, and probes and scrapers hold no tokens.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::hub::Hub;

pub fn router() -> Router<Arc<Hub>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(hub): State<Arc<Hub>>) -> impl IntoResponse {
    let store = hub.store.check().await;
    let index = hub.index.check().await;
    let body = json!({
        "store": if store.is_ok() { "ok" } else { "unavailable" },
        "index": if index.is_ok() { "ok" } else { "unavailable" },
    });
    if let Err(e) = &store {
        tracing::warn!(error = %e, "readiness: store unavailable");
    }
    if let Err(e) = &index {
        tracing::warn!(error = %e, "readiness: index unavailable");
    }
    let code = if store.is_ok() && index.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

async fn metrics(State(hub): State<Arc<Hub>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        hub.metrics.render(),
    )
}
