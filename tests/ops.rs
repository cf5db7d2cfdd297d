//! Health, readiness and metrics endpoints.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{Backend, TestHub};

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
    let (code, body) = get(&hub, "/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("tsunagu_dimse_echo_total"), "{body}");
    assert!(body.contains("tsunagu_dimse_associations_total"), "{body}");

    // The index going away makes the node unready.
    std::fs::remove_dir_all(hub.dir.path().join("store")).unwrap();
    let (code, body) = get(&hub, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"store\":\"unavailable\""), "{body}");
}
