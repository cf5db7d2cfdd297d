//! Health, readiness and metrics endpoints.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{self, Backend, TestHub};

async fn get(hub: &TestHub, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(hub.running.http_addr)
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let status = text[9..12].parse().unwrap();
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_readiness_and_metrics() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    assert_eq!(get(&hub, "/healthz").await.0, 200);
    let (code, body) = get(&hub, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"store\":\"ok\"") && body.contains("\"index\":\"ok\""),
        "{body}"
    );
    assert!(hub.echo("HOSP1"));
    let (code, before) = get(&hub, "/metrics").await;
    assert_eq!(code, 200);
    assert!(before.contains("tsunagu_dimse_echo_total"), "{before}");
    assert!(
        before.contains("tsunagu_dimse_associations_total"),
        "{before}"
    );

    // A store counts an instance, its bytes and its duration. (Other tests
    // of this process store too, so at least these increments: a counter
    // no store moved would fail here.)
    let Some(file) = common::corpus().and_then(|c| {
        c.into_iter()
            .find(|(_, m)| m.transfer_syntax_uid == "1.2.840.10008.1.2.1")
            .map(|(p, _)| p)
    }) else {
        return;
    };
    let (ok, log) = common::storescu(hub.port(), "HOSP1", "-xe", std::slice::from_ref(&file));
    assert!(ok, "{log}");
    let (_, after) = get(&hub, "/metrics").await;
    let size = hub
        .stored("HOSP1", &common::sop_instance_uid(&file))
        .await
        .unwrap()
        .1
        .len() as f64;
    let grew = |name: &str| common::metric(&after, name) - common::metric(&before, name);
    assert!(grew("tsunagu_instances_stored_total") >= 1.0, "{after}");
    assert!(grew("tsunagu_bytes_stored_total") >= size, "{after}");
    assert!(
        grew("tsunagu_store_duration_seconds_count") >= 1.0,
        "{after}"
    );
    assert!(
        after.contains("tsunagu_store_duration_seconds_bucket{"),
        "a histogram: {after}"
    );

    // The index going away makes the node unready.
    hub.hub.index.pool().close().await;
    let (code, body) = get(&hub, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("\"store\":\"ok\"") && body.contains("\"index\":\"unavailable\""),
        "{body}"
    );
    // And so does the store going away.
    std::fs::remove_dir_all(hub.dir.path().join("store")).unwrap();
    let (code, body) = get(&hub, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"store\":\"unavailable\""), "{body}");
}
