//! The OHIF viewer (npm `@ohif/app`, prebuilt) in headless Chromium, driven
//! by playwright-core through `../shared/clients/ohif-accept.sh`: the study
//! list shows our studies and opening the CT draws pixels.

use std::path::Path;
use std::process::Command;

use tsunagu::auth::Role;

use crate::common::{self, Backend, TestHub};

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ohif_lists_studies_and_draws_a_ct() {
    let clients = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/clients");
    if !clients.join("ohif-accept.sh").exists() {
        common::skip("../shared/clients/ohif-accept.sh missing");
        return;
    }
    for cmd in ["node", "npm", "chromium"] {
        if !have(cmd) {
            common::skip(&format!(
                "{cmd} missing (scripts/test installs chromium, node, npm)"
            ));
            return;
        }
    }
    let Some(py) = common::python_with("numpy, pydicom") else {
        return;
    };
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    // A real CT series (16 slices) from the bench corpus.
    let corpus = hub
        .import_bench_corpus(&py, "HOSP1", &["--small", "--sets", "ct"])
        .await;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(corpus.join("manifest.json")).unwrap()).unwrap();
    let ct_study = manifest["studies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["set"] == "ct")
        .expect("a CT study")["study_uid"]
        .as_str()
        .unwrap()
        .to_string();

    let out = hub.dir.path().join("ohif");
    let script = clients.join("ohif-accept.sh");
    let base = hub.dicomweb();
    let header = format!(
        "Authorization: Bearer {}",
        hub.token("HOSP1", Role::Clinician)
    );
    let port = common::free_port();
    let out2 = out.clone();
    let result = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .arg(script)
            .arg(&base)
            .arg(&out2)
            .arg("same-origin")
            .arg(&ct_study)
            .env("OHIF_PROXY_HEADER", header)
            .env("OHIF_PORT", port.to_string())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        result.status.success(),
        "OHIF acceptance failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("image drawn=true"), "{stdout}");
    let listed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("study list: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    assert!(listed >= 1, "{stdout}");
    for shot in ["study-list.png", "viewer.png"] {
        let len = std::fs::metadata(out.join(shot))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 10_000, "{shot} is {len} bytes");
    }
    let log: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("ohif-log.json")).unwrap()).unwrap();
    assert_eq!(
        log["http_errors"].as_array().map(Vec::len),
        Some(0),
        "{log}"
    );
    assert_eq!(log["external"].as_array().map(Vec::len), Some(0), "{log}");
}
