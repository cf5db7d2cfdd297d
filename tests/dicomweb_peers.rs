//! Real DICOMweb peers: dicomweb-client (Python) on every store/index
//! combination, and the shared 57-check conformance suite.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use tsunagu::auth::Role;

use crate::common::{self, Backend, TestHub};

async fn dicomweb_client_against(backend: Backend) {
    let Some(py) = common::python_with("dicomweb_client") else {
        return;
    };
    let Some(hub) = TestHub::start(backend).await else {
        return;
    };
    let (Some(corpus), Some(testdata)) = (common::corpus(), common::testdata_dir()) else {
        return;
    };
    hub.import("HOSP1", corpus.iter().map(|(p, _)| p.clone()).collect())
        .await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/dicomweb_peer.py");
    let (base, token) = (hub.dicomweb(), hub.token("HOSP1", Role::Clinician));
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py)
            .arg(script)
            .args([&base, &token, testdata.to_str().unwrap()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let failures: Vec<&str> = stdout
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["ok"] == false))
        .collect();
    assert!(
        out.status.success() && failures.is_empty(),
        "dicomweb-client checks failed on {backend:?}:\n{}\n{}",
        failures.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    let checks = stdout.lines().count();
    assert!(checks > 100, "only {checks} checks ran:\n{stdout}");
}

crate::on_backends!(dicomweb_client_against:
    dicomweb_client_on_local_store_and_sqlite => Backend::Local,
    dicomweb_client_on_postgres => Backend::Postgres,
    dicomweb_client_on_s3 => Backend::S3,
);

/// Checks allowed to stay below PASS, with why. Everything else must pass.
const NOT_YET: &[(&str, &str)] = &[];

/// `../shared/bench/conformance.py` on a small corpus from
/// `../shared/bench/make_corpus.py`, loaded through the ingest path.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_conformance_suite() {
    let bench = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/bench");
    if !bench.join("conformance.py").exists() {
        common::skip("../shared/bench/conformance.py missing");
        return;
    }
    let Some(py) = common::python_with("dicomweb_client, requests, numpy, pynetdicom") else {
        return;
    };
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let corpus = hub.import_bench_corpus(&py, "HOSP1", &["--small"]).await;
    let args = vec![
        bench.join("conformance.py").display().to_string(),
        "--corpus".into(),
        corpus.display().to_string(),
        "--dicomweb".into(),
        hub.dicomweb(),
        "--dicom".into(),
        format!("127.0.0.1:{}", hub.port()),
        "--called-aet".into(),
        "TSUNAGU".into(),
        "--calling-aet".into(),
        "HOSP1".into(),
        "--header".into(),
        format!(
            "Authorization: Bearer {}",
            hub.token("HOSP1", Role::Clinician)
        ),
    ];
    let out = tokio::task::spawn_blocking(move || Command::new(py).args(args).output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut results = 0;
    let mut bad = Vec::new();
    for line in stdout.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || !matches!(f[1], "MUST" | "SHOULD" | "INFO") {
            continue;
        }
        results += 1;
        let allowed = NOT_YET.iter().any(|(id, _)| *id == f[0]);
        if matches!(f[2], "FAIL" | "ERROR") || (f[2] == "WARN" && !allowed) {
            bad.push(line);
        }
    }
    assert_eq!(
        results,
        57,
        "not every check ran:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        bad.is_empty(),
        "conformance checks not passed:\n{}",
        bad.join("\n")
    );
}
