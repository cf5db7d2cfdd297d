//! What ingest precomputes for WADO — the DICOM JSON of every instance and the
//! byte ranges of every frame — checked against pydicom on the whole corpus.

use serde::Deserialize;
use serde_json::Value;

use crate::common::{self, Backend, TestHub};

#[derive(Deserialize)]
struct Reference {
    file: String,
    frames: Option<Vec<String>>,
    json: serde_json::Map<String, Value>,
}

fn sha(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// Compare one DICOM JSON object with pydicom's; returns the differences.
fn diff(
    path: &str,
    ours: &serde_json::Map<String, Value>,
    theirs: &serde_json::Map<String, Value>,
    out: &mut Vec<String>,
) {
    for (tag, t) in theirs {
        if tag.ends_with("0000") {
            continue; // group lengths are not part of DICOM JSON
        }
        let Some(o) = ours.get(tag) else {
            out.push(format!("{path}{tag}: missing"));
            continue;
        };
        let t_bulk = t.get("BulkDataURI").is_some() || t.get("InlineBinary").is_some();
        let o_bulk = o.get("BulkDataURI").is_some() || o.get("InlineBinary").is_some();
        if t_bulk || o_bulk {
            if t_bulk != o_bulk {
                out.push(format!(
                    "{path}{tag}: binary representation differs: {o} vs {t}"
                ));
            }
            continue;
        }
        // An empty sequence may be written with no Value (PS3.18 F.2.5) or an empty one.
        let present = |v: Option<&Value>| {
            v.filter(|v| v.as_array().is_none_or(|a| !a.is_empty()))
                .cloned()
        };
        let (tv, ov) = (present(t.get("Value")), present(o.get("Value")));
        match (tv.as_ref(), ov.as_ref()) {
            (None, None) => {}
            (Some(Value::Array(ta)), Some(Value::Array(oa))) if ta.len() == oa.len() => {
                for (i, (a, b)) in ta.iter().zip(oa).enumerate() {
                    match (a, b) {
                        (Value::Object(x), Value::Object(y)) if t["vr"] == "SQ" => {
                            diff(&format!("{path}{tag}[{i}]."), y, x, out)
                        }
                        (Value::Number(x), Value::Number(y)) => {
                            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                            if (x - y).abs() > 1e-9 * x.abs().max(1.0) {
                                out.push(format!("{path}{tag}[{i}]: {y} vs {x}"));
                            }
                        }
                        (Value::String(x), Value::Null) | (Value::Null, Value::String(x))
                            if x.is_empty() => {}
                        _ if a == b => {}
                        _ => out.push(format!("{path}{tag}[{i}]: {b} vs {a}")),
                    }
                }
            }
            _ => out.push(format!("{path}{tag}: {o} vs {t}")),
        }
    }
    for tag in ours.keys() {
        if !theirs.contains_key(tag) {
            out.push(format!("{path}{tag}: extra"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dicom_json_and_frame_ranges_match_pydicom() {
    let Some(corpus) = common::corpus() else {
        return;
    };
    let Some(python) = common::python_with("pydicom") else {
        return;
    };
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let inst = hub.hub.institutions.by_code("HOSP1").unwrap();
    let files: Vec<_> = corpus.iter().map(|(p, _)| p.clone()).collect();
    let report =
        tsunagu::ingest::import::import_files(hub.hub.ingest.clone(), inst, files.clone(), false)
            .await;
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/reference.py");
    let out = common::run_ok(std::process::Command::new(python).arg(script).args(&files));
    let mut problems = Vec::new();
    let mut frames_checked = 0;
    for line in String::from_utf8_lossy(&out).lines() {
        let r: Reference = serde_json::from_str(line).unwrap();
        let name = std::path::Path::new(&r.file)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let sop = common::sop_instance_uid(std::path::Path::new(&r.file));
        let (json, layout) = hub
            .hub
            .index
            .instance_meta("HOSP1", &sop)
            .await
            .unwrap()
            .unwrap();
        let ours: serde_json::Map<String, Value> = serde_json::from_str(&json).unwrap();
        let mut d = Vec::new();
        diff("", &ours, &r.json, &mut d);
        problems.extend(d.into_iter().map(|p| format!("{name}: {p}")));

        let (_, stored) = hub.stored("HOSP1", &sop).await.unwrap();
        let ours_frames: Option<Vec<String>> = layout.filter(|l| !l.frames.is_empty()).map(|l| {
            l.frames
                .iter()
                .map(|fragments| {
                    let bytes: Vec<u8> = fragments
                        .iter()
                        .flat_map(|&(o, n)| stored[o as usize..(o + n) as usize].to_vec())
                        .collect();
                    sha(&bytes)
                })
                .collect()
        });
        match (&ours_frames, &r.frames) {
            (Some(a), Some(b)) => {
                frames_checked += 1;
                if a != b {
                    problems.push(format!(
                        "{name}: frames differ ({} vs {})",
                        a.len(),
                        b.len()
                    ));
                }
            }
            // Not addressable by byte range: deflated data sets and video streams.
            (None, _) if name.contains("deflated") || name.contains("video") => {}
            (None, None) => {}
            (a, b) => problems.push(format!(
                "{name}: frame ranges {:?} vs pydicom {:?}",
                a.as_ref().map(Vec::len),
                b.as_ref().map(Vec::len)
            )),
        }
    }
    assert!(
        problems.is_empty(),
        "{} differences:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(
        frames_checked >= 30,
        "only {frames_checked} objects had frames checked"
    );
}
