//! Logs (tracing) and the metric catalogue (Prometheus text format).
//! Metric names live here so dashboards have one place to look.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

pub const ASSOCIATIONS_TOTAL: &str = "tsunagu_dimse_associations_total";
pub const ASSOCIATIONS_ACTIVE: &str = "tsunagu_dimse_associations_active";
pub const ASSOCIATIONS_REJECTED: &str = "tsunagu_dimse_associations_rejected_total";
/// Established associations that ended other than by an orderly release.
pub const ASSOCIATIONS_FAILED: &str = "tsunagu_dimse_associations_failed_total";
pub const INSTANCES_STORED: &str = "tsunagu_instances_stored_total";
pub const BYTES_STORED: &str = "tsunagu_bytes_stored_total";
pub const INSTANCES_DUPLICATE: &str = "tsunagu_instances_duplicate_total";
pub const INSTANCES_REPLACED: &str = "tsunagu_instances_replaced_total";
pub const STORE_FAILURES: &str = "tsunagu_store_failures_total";
pub const STORE_SECONDS: &str = "tsunagu_store_duration_seconds";
pub const ECHOS: &str = "tsunagu_dimse_echo_total";
pub const AUTH_FAILURES: &str = "tsunagu_http_auth_failures_total";
pub const HTTP_REQUESTS: &str = "tsunagu_http_requests_total";
pub const AUDIT_LOST: &str = "tsunagu_audit_events_lost_total";
pub const AUDIT_SYSLOG_FAILURES: &str = "tsunagu_audit_syslog_failures_total";
/// The audit trail found altered: its recorded end not at its last event,
/// a keyed chain found ending unkeyed, or a node without the chain key
/// appending to a keyed chain.
pub const AUDIT_TAMPERING: &str = "tsunagu_audit_chain_end_moved_total";
/// Pictures asked of the pictures cache, by outcome (hit, miss).
pub const PICTURE_CACHE: &str = "tsunagu_picture_cache_total";
/// Requests refused because a limit of ours was reached, by limit.
pub const LIMIT_REACHED: &str = "tsunagu_limit_reached_total";

/// Start structured logging; `RUST_LOG` filters, `TSUNAGU_LOG_FORMAT=json` for JSON lines.
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("TSUNAGU_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Install the process-wide metrics recorder and describe the catalogue.
pub fn init_metrics() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE.get_or_init(install).clone()
}

fn install() -> PrometheusHandle {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(STORE_SECONDS.to_string()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ],
        )
        .expect("static buckets are valid")
        .install_recorder()
        .expect("the metrics recorder is installed once");
    metrics::describe_counter!(ASSOCIATIONS_TOTAL, "DICOM associations accepted");
    metrics::describe_gauge!(ASSOCIATIONS_ACTIVE, "DICOM associations open now");
    metrics::describe_counter!(
        ASSOCIATIONS_REJECTED,
        "DICOM associations rejected, by reason"
    );
    metrics::describe_counter!(
        ASSOCIATIONS_FAILED,
        "DICOM associations aborted (by us or the peer) or cut off, by reason"
    );
    metrics::describe_counter!(INSTANCES_STORED, "instances stored (new or replacing)");
    metrics::describe_counter!(BYTES_STORED, "bytes of objects stored");
    metrics::describe_counter!(
        INSTANCES_DUPLICATE,
        "identical resends answered without a second copy"
    );
    metrics::describe_counter!(
        INSTANCES_REPLACED,
        "instances replaced by a resend with different bytes"
    );
    metrics::describe_counter!(STORE_FAILURES, "failed stores, by reason");
    metrics::describe_histogram!(
        STORE_SECONDS,
        "time from last data byte to durable and indexed"
    );
    metrics::describe_counter!(ECHOS, "C-ECHO requests answered");
    metrics::describe_counter!(
        PICTURE_CACHE,
        "rendered pictures and thumbnails looked up in the pictures cache, by outcome"
    );
    metrics::describe_counter!(
        AUTH_FAILURES,
        "HTTP requests refused for their token, by reason"
    );
    metrics::describe_counter!(
        HTTP_REQUESTS,
        "DICOMweb requests answered, by service and status"
    );
    handle
}
