//! Sharing under consent, end to end through the real interfaces: DCMTK
//! storescu pushes, the admin API, DICOMweb as each hospital's clinicians
//! see it, and the audit trail (DESIGN §1's scenario).

use std::path::{Path, PathBuf};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tsunagu::auth::Role;

use crate::common::{self, Backend, TestHub};

/// One of patient A's studies at a hospital: a copy of a corpus file with
/// the hospital's patient ID and fresh UIDs.
pub(crate) struct Study {
    pub file: PathBuf,
    pub ts: String,
    pub study: String,
    pub series: String,
    pub sop: String,
}

pub(crate) fn make_study(dir: &Path, corpus: &str, patient_id: &str, n: u32) -> Option<Study> {
    let src = common::testdata_dir()?.join("files").join(corpus);
    let mut obj = dicom_object::open_file(&src).unwrap();
    let root = format!("2.25.{}", 990_000_000u64 + u64::from(n));
    let (study, series, sop) = (
        format!("{root}.1"),
        format!("{root}.2"),
        format!("{root}.3"),
    );
    for (tag, vr, v) in [
        (tags::PATIENT_ID, VR::LO, patient_id),
        (tags::STUDY_INSTANCE_UID, VR::UI, study.as_str()),
        (tags::SERIES_INSTANCE_UID, VR::UI, series.as_str()),
        (tags::SOP_INSTANCE_UID, VR::UI, sop.as_str()),
    ] {
        obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
    }
    obj.remove_element(tags::ISSUER_OF_PATIENT_ID);
    obj.remove_element(tags::OTHER_PATIENT_I_DS_SEQUENCE);
    obj.update_meta(|m| m.media_storage_sop_instance_uid = sop.clone());
    let ts = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_string();
    let file = dir.join(format!("{patient_id}.dcm"));
    obj.write_to_file(&file).unwrap();
    Some(Study {
        file,
        ts,
        study,
        series,
        sop,
    })
}

pub(crate) fn push(hub: &TestHub, calling: &str, s: &Study) {
    let flag = common::storescu_flag(&s.ts).unwrap();
    let (ok, log) = common::storescu(hub.port(), calling, flag, std::slice::from_ref(&s.file));
    assert!(ok, "storescu as {calling} failed: {log}");
}

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// GET as a clinician of `inst`: status, body.
pub(crate) async fn get(
    hub: &TestHub,
    inst: &str,
    path: &str,
    accept: &str,
) -> (StatusCode, Vec<u8>) {
    let r = common::get_as_clinician(hub, inst, &format!("{}{path}", hub.http()), accept).await;
    (r.status(), r.bytes().await.unwrap().to_vec())
}

/// QIDO as a clinician of `inst` (which must succeed): the results and the
/// Warning headers.
pub(crate) async fn qido(hub: &TestHub, inst: &str, query: &str) -> (Vec<Value>, Vec<String>) {
    let (status, items, warnings) = common::qido_as(hub, inst, query).await;
    assert!(status.is_success(), "{query}: {status}");
    (items, warnings)
}

pub(crate) fn studies_of(items: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = items
        .iter()
        .map(|i| i["0020000D"]["Value"][0].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// Call the admin API as `role` of `inst`.
pub(crate) async fn api(
    hub: &TestHub,
    inst: &str,
    role: Role,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = client()
        .request(method, format!("{}/api{path}", hub.http()))
        .bearer_auth(hub.token(inst, role));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

pub(crate) async fn admin(
    hub: &TestHub,
    inst: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    api(hub, inst, Role::Admin, method, path, body).await
}

/// GET an admin API path as an admin of `inst`.
pub(crate) async fn admin_get(hub: &TestHub, inst: &str, path: &str) -> (StatusCode, Value) {
    admin(hub, inst, reqwest::Method::GET, path, None).await
}

/// DELETE an admin API path as an admin of `inst`.
pub(crate) async fn admin_delete(hub: &TestHub, inst: &str, path: &str) -> (StatusCode, Value) {
    admin(hub, inst, reqwest::Method::DELETE, path, None).await
}

/// Link `inst`'s `patient_id`, to a new record or joining another's ID.
pub(crate) async fn link(
    hub: &TestHub,
    inst: &str,
    patient_id: &str,
    join: Option<(&str, &str)>,
) -> (StatusCode, Value) {
    let mut body = json!({ "patient_id": patient_id });
    if let Some((i, p)) = join {
        body["join"] = json!({ "institution": i, "patient_id": p });
    }
    admin(hub, inst, reqwest::Method::POST, "/links", Some(body)).await
}

/// Disclose `inst`'s `patient_id` to `to`, consented at `consented`.
pub(crate) async fn disclose(
    hub: &TestHub,
    inst: &str,
    patient_id: &str,
    to: &str,
    consented: chrono::DateTime<chrono::Utc>,
    expires: Option<chrono::DateTime<chrono::Utc>>,
) -> (StatusCode, Value) {
    let mut body = json!({
        "patient_id": patient_id, "to_institution": to,
        "consent_reference": format!("consent form of {patient_id}"),
        "consented_at": consented.to_rfc3339(),
    });
    if let Some(e) = expires {
        body["expires_at"] = json!(e.to_rfc3339());
    }
    admin(hub, inst, reqwest::Method::POST, "/disclosures", Some(body)).await
}

/// The first DICOM part of a multipart/related answer.
/// A retrieved Part-10 object (preamble, meta and data set).
fn part10(bytes: &[u8]) -> dicom_object::DefaultDicomObject {
    dicom_object::from_reader(std::io::Cursor::new(&bytes[128..])).unwrap()
}

fn patient_id(obj: &dicom_object::DefaultDicomObject) -> String {
    obj.element(tags::PATIENT_ID)
        .unwrap()
        .to_str()
        .unwrap()
        .trim()
        .to_string()
}

fn first_part(body: &[u8]) -> Vec<u8> {
    let start = body.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let rest = &body[start..];
    let end = rest.windows(4).position(|w| w == b"\r\n--").unwrap();
    rest[..end].to_vec()
}

/// The (offset, length) a bulk data path names.
fn bulk_range(path: &str) -> (usize, usize) {
    let mut parts = path.rsplit('/');
    let length = parts.next().unwrap().parse().unwrap();
    let offset = parts.next().unwrap().parse().unwrap();
    (offset, length)
}

async fn network_scenario(backend: Backend) {
    let Some(hub) = TestHub::start(backend).await else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let (Some(s1), Some(s2), Some(s3)) = (
        make_study(work.path(), "ct16_implicit_le.dcm", "A-H1", 1),
        make_study(work.path(), "ct16_explicit_le.dcm", "A-H2", 2),
        make_study(work.path(), "ct16_rle.dcm", "A-H3", 3),
    ) else {
        return;
    };
    if common::dcmtk("storescu").is_none() {
        return;
    }
    push(&hub, "HOSP1", &s1);
    push(&hub, "HOSP2", &s2);
    push(&hub, "HOSP3", &s3);
    let study_path = |s: &Study| format!("/dicom-web/studies/{}", s.study);
    let instance_path = |s: &Study| {
        format!(
            "/dicom-web/studies/{}/series/{}/instances/{}",
            s.study, s.series, s.sop
        )
    };
    let dicom = "multipart/related; type=\"application/dicom\"; transfer-syntax=*";
    let json_ = "application/dicom+json";
    // The Pixel Data of `s` by the BulkDataURI its metadata gives `inst`.
    let pixel_data_path = async |inst: &str, s: &Study| {
        let (st, body) = get(&hub, inst, &format!("{}/metadata", instance_path(s)), json_).await;
        assert_eq!(st, 200, "{inst} metadata");
        let meta: Value = serde_json::from_slice(&body).unwrap();
        let uri = meta[0]["7FE00010"]["BulkDataURI"]
            .as_str()
            .unwrap_or_else(|| panic!("pixel data by reference: {meta}"))
            .to_string();
        uri[uri.find("/dicom-web/").unwrap()..].to_string()
    };
    // A hidden object is answered exactly as one that does not exist.
    let absent_alike = async |inst: &str, path: &str, hidden: &Study| {
        let (st, body) = get(&hub, inst, path, "*/*").await;
        assert_eq!(st, 404, "{inst} {path}");
        let unknown = path.replace(&hidden.study, "2.25.999");
        let (st, absent) = get(&hub, inst, &unknown, "*/*").await;
        assert_eq!(st, 404, "{inst} {unknown}");
        assert_eq!(
            String::from_utf8_lossy(&body),
            String::from_utf8_lossy(&absent),
            "{inst} {path}: hidden and absent answer alike"
        );
    };

    // 1. Before any link nobody sees another's data.
    for (inst, own) in [("HOSP1", &s1), ("HOSP2", &s2), ("HOSP3", &s3)] {
        let (all, _) = qido(&hub, inst, "studies").await;
        assert_eq!(studies_of(&all), vec![own.study.clone()], "{inst}");
        for other in [&s1, &s2, &s3].into_iter().filter(|s| s.study != own.study) {
            assert_eq!(get(&hub, inst, &study_path(other), dicom).await.0, 404);
        }
    }

    // 2. Hospital 2 links A and discloses to hospital 3 with A's consent.
    let now = chrono::Utc::now();
    let (st, link2) = link(&hub, "HOSP2", "A-H2", None).await;
    assert_eq!(st, 201, "{link2}");
    let (st, d23) = disclose(
        &hub,
        "HOSP2",
        "A-H2",
        "HOSP3",
        now - chrono::Duration::hours(1),
        None,
    )
    .await;
    assert_eq!(st, 201, "{d23}");
    assert_eq!(d23["status"], "active");
    let d23_id = d23["id"].as_str().unwrap().to_string();
    // Not yet visible: hospital 3 has not linked A.
    assert_eq!(
        studies_of(&qido(&hub, "HOSP3", "studies").await.0),
        vec![s3.study.clone()]
    );

    // 3. Hospital 3 joins with hospital 2's ID from the referral letter.
    // Unknown IDs, undisclosed records and unknown institutions all look absent.
    let mut refusals = Vec::new();
    for join in [("HOSP2", "NO-SUCH"), ("HOSP1", "A-H1"), ("NOWHERE", "A-H2")] {
        let (st, body) = link(&hub, "HOSP3", "A-H3", Some(join)).await;
        assert_eq!(st, 404, "{body}");
        refusals.push(body);
    }
    assert!(
        refusals.iter().all(|b| *b == refusals[0]),
        "a refused join says nothing of why: {refusals:?}"
    );
    // Hospital 1 was never disclosed A-H2: its join fails the same way.
    let (st, _) = link(&hub, "HOSP1", "A-H1", Some(("HOSP2", "A-H2"))).await;
    assert_eq!(st, 404);
    let (st, link3) = link(&hub, "HOSP3", "A-H3", Some(("HOSP2", "A-H2"))).await;
    assert_eq!(st, 201, "{link3}");
    let (st, again) = link(&hub, "HOSP3", "A-H3", None).await;
    assert_eq!(st, 409, "{again}");
    let (st, d32) = disclose(
        &hub,
        "HOSP3",
        "A-H3",
        "HOSP2",
        now - chrono::Duration::minutes(5),
        Some(now + chrono::Duration::days(1)),
    )
    .await;
    assert_eq!(st, 201, "{d32}");
    // Each side's view of its record: its link, what it disclosed, and what
    // was disclosed to it under the other's ID; nothing of hospital 1.
    for (inst, own, other, other_id) in [
        ("HOSP2", "A-H2", "HOSP3", "A-H3"),
        ("HOSP3", "A-H3", "HOSP2", "A-H2"),
    ] {
        let (st, view) = admin_get(&hub, inst, &format!("/patients/{own}")).await;
        assert_eq!(st, 200, "{view}");
        assert_eq!(view["link"]["institution"], inst, "{view}");
        assert_eq!(view["link"]["patient_id"], own, "{view}");
        assert_eq!(view["link"]["issuer_of_patient_id"], inst, "{view}");
        let to = view["disclosed_to"].as_array().unwrap();
        assert_eq!(to.len(), 1, "{view}");
        assert_eq!(to[0]["to_institution"], other, "{view}");
        assert_eq!(to[0]["status"], "active", "{view}");
        let by = view["disclosed_by"].as_array().unwrap();
        assert_eq!(by.len(), 1, "{view}");
        assert_eq!(by[0]["from_institution"], other, "{view}");
        assert_eq!(by[0]["patient_id"], other_id, "{view}");
        assert!(!view.to_string().contains("A-H1"), "{view}");
    }
    assert_eq!(admin_get(&hub, "HOSP1", "/patients/A-H1").await.0, 404);

    // 4. Hospital 3 finds hospital 2's images by its own patient ID, shown
    // under that ID, with hospital 2's ID among the other IDs.
    let (found, _) = qido(&hub, "HOSP3", "studies?PatientID=A-H3").await;
    assert_eq!(studies_of(&found), {
        let mut v = vec![s2.study.clone(), s3.study.clone()];
        v.sort();
        v
    });
    for item in &found {
        assert_eq!(item["00100020"]["Value"][0], "A-H3", "{item}");
        assert_eq!(item["00100021"]["Value"][0], "HOSP3", "{item}");
    }
    let h2 = found
        .iter()
        .find(|i| i["0020000D"]["Value"][0] == s2.study.as_str())
        .unwrap();
    let others = h2["00101002"]["Value"].as_array().unwrap();
    assert!(
        others.iter().any(|o| o["00100020"]["Value"][0] == "A-H2"
            && o["00100021"]["Value"][0] == "HOSP2"
            && o["00100022"]["Value"][0] == "TEXT"),
        "{h2}"
    );
    // Same patient ID with the issuer; the owner's ID through Other Patient IDs.
    assert_eq!(
        studies_of(
            &qido(
                &hub,
                "HOSP3",
                "studies?PatientID=A-H3&IssuerOfPatientID=HOSP3"
            )
            .await
            .0
        )
        .len(),
        2
    );
    assert_eq!(
        studies_of(
            &qido(
                &hub,
                "HOSP3",
                "studies?OtherPatientIDsSequence.00100020=A-H2"
            )
            .await
            .0
        ),
        vec![s2.study.clone()]
    );
    // Hospital 2's own ID means nothing to hospital 3's searches.
    assert!(
        qido(&hub, "HOSP3", "studies?PatientID=A-H2")
            .await
            .0
            .is_empty()
    );
    // Paging and counts agree with what is visible.
    let (page, warnings) = qido(&hub, "HOSP3", "studies?PatientID=A-H3&limit=1").await;
    assert_eq!(page.len(), 1);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("There are 1 additional")),
        "{warnings:?}"
    );
    let (all, warnings) = qido(&hub, "HOSP3", "studies?limit=1&offset=1").await;
    assert_eq!(all.len(), 1);
    assert!(warnings.is_empty(), "{warnings:?}");
    // Series and instance levels agree.
    assert_eq!(
        qido(&hub, "HOSP3", "instances?PatientID=A-H3")
            .await
            .0
            .len(),
        2
    );

    // Metadata: hospital 3's view, with a validator of its own.
    let (st, body) = get(
        &hub,
        "HOSP3",
        &format!("{}/metadata", study_path(&s2)),
        json_,
    )
    .await;
    assert_eq!(st, 200);
    let meta: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(meta[0]["00100020"]["Value"][0], "A-H3");
    assert!(
        meta[0]["00101002"]["Value"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["00100020"]["Value"][0] == "A-H2")
    );
    let etag = |inst: &'static str| {
        let hub = &hub;
        let path = format!("{}/metadata", study_path(&s2));
        async move {
            client()
                .get(format!("{}{path}", hub.http()))
                .bearer_auth(hub.token(inst, Role::Clinician))
                .send()
                .await
                .unwrap()
                .headers()["etag"]
                .to_str()
                .unwrap()
                .to_string()
        }
    };
    assert_ne!(etag("HOSP3").await, etag("HOSP2").await);
    // Hospital 2 sees its own object unchanged.
    let (_, own) = get(
        &hub,
        "HOSP2",
        &format!("{}/metadata", study_path(&s2)),
        json_,
    )
    .await;
    let own: Value = serde_json::from_slice(&own).unwrap();
    assert_eq!(own[0]["00100020"]["Value"][0], "A-H2");
    assert!(own[0].get("00101002").is_none());

    // Retrieve: the instance coerced, the replaced values kept; the stored
    // bytes unchanged.
    let (st, body) = get(&hub, "HOSP3", &instance_path(&s2), dicom).await;
    assert_eq!(st, 200);
    let part = first_part(&body);
    let obj = part10(&part);
    assert_eq!(patient_id(&obj), "A-H3");
    assert_eq!(
        obj.element(tags::ISSUER_OF_PATIENT_ID)
            .unwrap()
            .to_str()
            .unwrap()
            .trim(),
        "HOSP3"
    );
    let original = obj.element(tags::ORIGINAL_ATTRIBUTES_SEQUENCE).unwrap();
    let item = &original.items().unwrap()[0];
    let modified = &item
        .element(tags::MODIFIED_ATTRIBUTES_SEQUENCE)
        .unwrap()
        .items()
        .unwrap()[0];
    assert_eq!(
        modified
            .element(tags::PATIENT_ID)
            .unwrap()
            .to_str()
            .unwrap()
            .trim(),
        "A-H2"
    );
    assert_eq!(
        item.element(tags::REASON_FOR_THE_ATTRIBUTE_MODIFICATION)
            .unwrap()
            .to_str()
            .unwrap()
            .trim(),
        "COERCE"
    );
    let (_, stored) = hub.stored("HOSP2", &s2.sop).await.unwrap();
    let sent = std::fs::read(&s2.file).unwrap();
    assert_eq!(
        common::dataset_bytes(&stored),
        common::dataset_bytes(&sent),
        "stored bytes never change"
    );
    // DCMTK reads the coerced object.
    if let Some(dcmdump) = common::dcmtk("dcmdump") {
        let f = work.path().join("coerced.dcm");
        std::fs::write(&f, &part).unwrap();
        let out = common::run_ok(std::process::Command::new(dcmdump).arg(&f));
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains("(0400,0561)") && text.contains("[A-H3]"),
            "{text}"
        );
        // dicom3tools finds the coerced object as conformant as the original.
        if let Some(errors) = common::dciodvfy_errors(&f) {
            assert!(errors.is_empty(), "{errors:?}");
        }
    }
    // An RLE object of hospital 3, as hospital 2 retrieves it: re-encoded and coerced.
    let (st, body) = get(&hub, "HOSP2", &instance_path(&s3), dicom).await;
    assert_eq!(st, 200);
    assert_eq!(patient_id(&part10(&first_part(&body))), "A-H2");
    let f = work.path().join("coerced-rle.dcm");
    std::fs::write(&f, first_part(&body)).unwrap();
    if let Some(errors) = common::dciodvfy_errors(&f) {
        assert!(errors.is_empty(), "{errors:?}");
    }
    // Frames of the other hospital's instance.
    let (st, _) = get(
        &hub,
        "HOSP3",
        &format!("{}/frames/1", instance_path(&s2)),
        "multipart/related; type=\"application/octet-stream\"",
    )
    .await;
    assert_eq!(st, 200);
    // Its pictures too: rendered and the study's thumbnail.
    for path in [
        format!("{}/rendered", instance_path(&s2)),
        format!("{}/thumbnail", study_path(&s2)),
    ] {
        let (st, body) = get(&hub, "HOSP3", &path, "image/jpeg").await;
        assert_eq!(st, 200, "{path}");
        image::load_from_memory(&body).expect("a picture");
    }
    // Its bulk data, by the URI its metadata gives hospital 3: the pixels
    // as stored.
    let bulk_s2 = pixel_data_path("HOSP3", &s2).await;
    let (st, bytes) = get(&hub, "HOSP3", &bulk_s2, "application/octet-stream").await;
    assert_eq!(st, 200, "{bulk_s2}");
    let (offset, length) = bulk_range(&bulk_s2);
    let (_, stored) = hub.stored("HOSP2", &s2.sop).await.unwrap();
    assert!(length > 0);
    assert!(bytes == stored[offset..offset + length], "{bulk_s2}");

    // 5. Hospital 2 likewise finds hospital 3's images under its own ID.
    let (found, _) = qido(&hub, "HOSP2", "studies?PatientID=A-H2").await;
    assert_eq!(found.len(), 2);
    // Who sees what is not lost when the index is rebuilt from the store.
    let report = hub.hub.reindex(false).await.unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    hub.hub.index.rebuild_access().await.unwrap();
    assert_eq!(
        qido(&hub, "HOSP2", "studies?PatientID=A-H2").await.0.len(),
        2
    );
    assert_eq!(
        qido(&hub, "HOSP3", "studies?PatientID=A-H3").await.0.len(),
        2
    );

    // 6. Hospital 1's images stay invisible to both, everywhere.
    let bulk_s1 = pixel_data_path("HOSP1", &s1).await;
    assert_eq!(
        get(&hub, "HOSP1", &bulk_s1, "application/octet-stream")
            .await
            .0,
        200
    );
    let hidden_paths = |s: &Study, bulk: &str| {
        [
            study_path(s),
            format!("{}/metadata", study_path(s)),
            format!("{}/series/{}/metadata", study_path(s), s.series),
            format!("{}/metadata", instance_path(s)),
            format!("{}/frames/1", instance_path(s)),
            bulk.to_string(),
            format!("{}/thumbnail", study_path(s)),
            format!("{}/series/{}/thumbnail", study_path(s), s.series),
            format!("{}/rendered", instance_path(s)),
            format!("{}/frames/1/rendered", instance_path(s)),
            format!(
                "/wado?requestType=WADO&studyUID={}&seriesUID={}&objectUID={}",
                s.study, s.series, s.sop
            ),
            format!(
                "/wado?requestType=WADO&studyUID={}&seriesUID={}&objectUID={}&contentType=image/jpeg",
                s.study, s.series, s.sop
            ),
        ]
    };
    for inst in ["HOSP2", "HOSP3"] {
        let (all, _) = qido(&hub, inst, "studies").await;
        assert!(!studies_of(&all).contains(&s1.study), "{inst}");
        assert!(
            qido(
                &hub,
                inst,
                &format!("studies?StudyInstanceUID={}", s1.study)
            )
            .await
            .0
            .is_empty()
        );
        assert!(
            qido(&hub, inst, "instances?PatientID=A-H1")
                .await
                .0
                .is_empty()
        );
        for path in hidden_paths(&s1, &bulk_s1) {
            let (_, body) = get(&hub, inst, &path, "*/*").await;
            assert!(!String::from_utf8_lossy(&body).contains("A-H1"));
            absent_alike(inst, &path, &s1).await;
        }
    }

    // 7. Revocation takes effect at once.
    let (st, revoked) = admin_delete(&hub, "HOSP2", &format!("/disclosures/{d23_id}")).await;
    assert_eq!(st, 200, "{revoked}");
    assert_eq!(revoked["status"], "revoked");
    assert_eq!(revoked["revoked_by"], "user-of-HOSP2");
    assert_eq!(
        studies_of(&qido(&hub, "HOSP3", "studies?PatientID=A-H3").await.0),
        vec![s3.study.clone()]
    );
    // Everything of it, bulk data by the URI given before included.
    for path in hidden_paths(&s2, &bulk_s2) {
        absent_alike("HOSP3", &path, &s2).await;
    }
    // Another institution cannot revoke (or see) it.
    let (st, _) = admin_delete(&hub, "HOSP3", &format!("/disclosures/{d23_id}")).await;
    assert_eq!(st, 404);
    let (_, given) = admin_get(&hub, "HOSP2", "/disclosures?direction=given").await;
    assert_eq!(
        given.as_array().unwrap().len(),
        1,
        "revoked disclosures are kept"
    );
    let (_, received) = admin_get(
        &hub,
        "HOSP3",
        "/disclosures?direction=received&patient_id=A-H3",
    )
    .await;
    assert_eq!(received[0]["status"], "revoked");

    // 8. Expiry takes effect at once (the clock, not a sleep).
    assert_eq!(
        qido(&hub, "HOSP2", "studies?PatientID=A-H2").await.0.len(),
        2
    );
    hub.hub.clock.set(Some(now + chrono::Duration::days(2)));
    assert_eq!(
        studies_of(&qido(&hub, "HOSP2", "studies?PatientID=A-H2").await.0),
        vec![s2.study.clone()]
    );
    let (_, view) = admin_get(&hub, "HOSP2", "/patients/A-H2").await;
    assert!(
        view["disclosed_by"].as_array().unwrap().is_empty(),
        "{view}"
    );
    hub.hub.clock.set(None);

    // 9. The audit trail shows every step.
    let (st, trail) = admin_get(&hub, "HOSP2", "/audit?patient_id=A-H2&limit=1000").await;
    assert_eq!(st, 200, "{trail}");
    let events = trail.as_array().unwrap();
    let has = |action: &str, user: &str, outcome: &str| {
        events
            .iter()
            .any(|e| e["action"] == action && e["user"] == user && e["outcome"] == outcome)
    };
    assert!(has("store", "HOSP2", "success"), "C-STORE by the modality");
    assert!(has("link", "user-of-HOSP2", "success"));
    assert!(has("disclose", "user-of-HOSP2", "success"));
    assert!(has("revoke", "user-of-HOSP2", "success"));
    assert!(
        has("query", "user-of-HOSP3", "success"),
        "who looked at hospital 2's images"
    );
    assert!(has("access", "user-of-HOSP3", "success"));
    assert!(has("retrieve", "user-of-HOSP3", "success"));
    assert!(
        has("link", "user-of-HOSP3", "success"),
        "the join names hospital 2's patient"
    );
    let q = events.iter().find(|e| e["action"] == "query").unwrap();
    assert_eq!(q["codes"]["event_id"]["code"], "110112");
    let r = events.iter().find(|e| e["action"] == "retrieve").unwrap();
    assert_eq!(r["codes"]["event_id"]["code"], "110104");
    // Hospital 1's admin sees the refused attempts on its patient, and no
    // event shows hospital 1's admin another institution's patient.
    let (_, trail1) = admin_get(&hub, "HOSP1", "/audit?patient_id=A-H1&limit=1000").await;
    let trail1 = trail1.as_array().unwrap().clone();
    assert!(
        trail1.iter().any(|e| e["user"] == "user-of-HOSP3"
            && e["outcome"] == "denied"
            && e["action"] == "retrieve"),
        "{trail1:?}"
    );
    assert!(trail1.iter().any(|e| e["user"] == "user-of-HOSP1"
        && e["action"] == "link"
        && e["outcome"] == "denied"));
    for e in &trail1 {
        if e["institution"] != "HOSP1" {
            for o in e["objects"].as_array().unwrap() {
                assert_eq!(o["patient_institution"], "HOSP1", "{e}");
            }
        }
    }
    hub.hub.audit.flush().await;
    // A refused request shows its own institution's admins nothing of what
    // was refused (the owner's admins see it, above).
    let (_, own3) = admin_get(&hub, "HOSP3", "/audit?user=user-of-HOSP3&limit=1000").await;
    let own3 = own3.as_array().unwrap();
    for e in own3.iter().filter(|e| e["outcome"] != "success") {
        for o in e["objects"].as_array().unwrap() {
            assert_eq!(o["patient_institution"], "HOSP3", "{e}");
        }
    }
    // Nor whether it was refused or absent: the retrieve refused before the
    // disclosure shows as the failure a retrieve of nothing is.
    assert!(
        own3.iter().any(|e| e["action"] == "retrieve"
            && e["outcome"] == "failure"
            && e["objects"].as_array().unwrap().is_empty()),
        "{own3:?}"
    );
    assert!(
        own3.iter()
            .filter(|e| e["action"] == "retrieve" || e["action"] == "access")
            .all(|e| e["outcome"] != "denied"),
        "{own3:?}"
    );
    // Only events shown as stored carry their chain hashes (a changed one's
    // hashes would tell that it was changed).
    for e in own3 {
        let stored_as_shown = e["outcome"] == "success";
        assert_eq!(e.get("hash").is_some(), stored_as_shown, "{e}");
    }
    // Another institution's events show who touched what, not what it asked
    // or how much it got.
    for e in events.iter().filter(|e| e["institution"] != "HOSP2") {
        assert!(
            e.get("hash").is_none() && e.get("prev_hash").is_none(),
            "{e}"
        );
        let detail = e["detail"].as_object().unwrap();
        assert!(
            !detail.contains_key("query") && !detail.contains_key("results"),
            "{e}"
        );
        for k in detail.keys() {
            assert!(
                tsunagu::audit::trail::SHOWN_TO_OTHERS.contains(&k.as_str()),
                "{e}"
            );
        }
    }
    assert!(
        events
            .iter()
            .any(|e| e["institution"] == "HOSP3" && e["action"] == "query"),
        "HOSP3's searches are still shown"
    );
    // By user and time; paged; bad parameters are problems.
    let (_, by_user) = admin_get(&hub, "HOSP2", "/audit?user=user-of-HOSP3&limit=1000").await;
    let by_user = by_user.as_array().unwrap();
    assert!(!by_user.is_empty() && by_user.iter().all(|e| e["user"] == "user-of-HOSP3"));
    let (_, page) = admin_get(&hub, "HOSP2", "/audit?user=user-of-HOSP3&limit=2&offset=1").await;
    assert_eq!(page.as_array().unwrap().len(), 2);
    assert_eq!(page[0]["seq"], by_user[1]["seq"]);
    let (_, future) = admin_get(&hub, "HOSP2", "/audit?from=2999-01-01T00:00:00Z").await;
    assert!(future.as_array().unwrap().is_empty());
    let (_, past) = admin_get(&hub, "HOSP2", "/audit?to=2000-01-01T00:00:00Z").await;
    assert!(past.as_array().unwrap().is_empty());
    let (_, window) = admin_get(
        &hub,
        "HOSP2",
        &format!(
            "/audit?limit=1000&from={}",
            (now - chrono::Duration::minutes(10))
                .to_rfc3339()
                .replace('+', "%2B")
        ),
    )
    .await;
    let in_window: Vec<&Value> = window
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["seq"])
        .collect();
    assert!(events.iter().all(|e| in_window.contains(&&e["seq"])));
    for bad in [
        "/audit?limit=0",
        "/audit?limit=abc",
        "/audit?from=yesterday",
        "/audit?to=9999-12-31T23:59:59-01:00",
        "/audit?offset=-1",
        // An unknown filter would otherwise return the whole trail.
        "/audit?patientId=A-H2",
        "/audit?patient_id=A%00",
        "/disclosures?patient=A-H2",
        "/patients/A%00",
        "/patients/%FF",
    ] {
        let (st, problem) = admin_get(&hub, "HOSP2", bad).await;
        assert_eq!(st, 400, "{bad}: {problem}");
        assert_eq!(problem["status"], 400, "{bad}: a problem body");
    }
    // A body that is not JSON by its media type: 415, with a problem body.
    let r = client()
        .post(format!("{}/api/links", hub.http()))
        .bearer_auth(hub.token("HOSP2", Role::Admin))
        .header(reqwest::header::CONTENT_TYPE, "text/plain")
        .body(r#"{"patient_id": "A-H2"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["status"], 415);
    // The filter is trimmed as the trail's objects are.
    let (_, padded) = admin_get(&hub, "HOSP2", "/audit?limit=1000&patient_id=%20A-H2%20").await;
    let (_, plain) = admin_get(&hub, "HOSP2", "/audit?limit=1000&patient_id=A-H2").await;
    // (Each read of the trail is itself in it: compare the others.)
    let others = |v: &Value| -> Vec<Value> {
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] != "read-audit")
            .map(|e| e["seq"].clone())
            .collect()
    };
    assert!(!others(&plain).is_empty());
    assert_eq!(others(&padded), others(&plain));
    // Paging with `before` neither repeats nor skips, though every read
    // appends an event (with `offset`, each page repeated the last row).
    let seqs = |v: &Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_i64().unwrap())
            .collect()
    };
    let (_, first) = admin_get(&hub, "HOSP2", "/audit?limit=5").await;
    let first = seqs(&first);
    let (_, second) = admin_get(
        &hub,
        "HOSP2",
        &format!("/audit?limit=5&before={}", first[4]),
    )
    .await;
    let second = seqs(&second);
    let (_, all) = admin_get(&hub, "HOSP2", "/audit?limit=1000").await;
    let all = seqs(&all);
    let at = all.iter().position(|s| *s == first[0]).unwrap();
    assert_eq!(all[at..at + 10], [first, second].concat());
    assert_eq!(admin_get(&hub, "HOSP2", "/audit?before=0").await.0, 400);
    // Reading an identity record is audited (it names other institutions' IDs).
    let (_, trail) = admin_get(&hub, "HOSP2", "/audit?limit=1000&patient_id=A-H2").await;
    assert!(
        trail
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "read-record" && e["outcome"] == "success"),
        "{trail}"
    );
    // Verification reads a consistent end even while events are appended.
    let during = tsunagu::audit::chain::verify(&hub.hub.index, None)
        .await
        .unwrap();
    assert_eq!(during.broken_at, None);
    hub.hub.audit.flush().await;
    let v = tsunagu::audit::chain::verify(&hub.hub.index, None)
        .await
        .unwrap();
    assert_eq!(v.broken_at, None);
    assert!(v.events > 30, "{v:?}");

    // 10. Unlinking ends the unlinking institution's disclosures.
    let (st, body) = admin_delete(&hub, "HOSP3", "/links/A-H3").await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["revoked_disclosures"].as_array().unwrap().len(), 1);
    let (_, given) = admin_get(&hub, "HOSP3", "/disclosures?direction=given").await;
    assert_eq!(given[0]["status"], "revoked");
    assert_eq!(admin_get(&hub, "HOSP3", "/patients/A-H3").await.0, 404);
    hub.hub.audit.flush().await;
    let (_, trail) = admin_get(&hub, "HOSP3", "/audit?user=user-of-HOSP3&limit=1000").await;
    assert!(
        trail
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "unlink"
                && e["outcome"] == "success"
                && e["institution"] == "HOSP3"),
        "{trail}"
    );
}

crate::on_backends!(network_scenario:
    network_scenario_on_sqlite => Backend::Local,
    network_scenario_on_postgres => Backend::Postgres,
);

/// Every admin route with a valid body, and the roles it admits.
fn api_routes() -> Vec<(reqwest::Method, &'static str, Option<Value>, Vec<Role>)> {
    use reqwest::Method;
    vec![
        (
            Method::POST,
            "/links",
            Some(json!({"patient_id": "P1"})),
            vec![Role::Admin],
        ),
        (Method::DELETE, "/links/P1", None, vec![Role::Admin]),
        (
            Method::GET,
            "/patients/P1",
            None,
            vec![Role::Admin, Role::Clinician],
        ),
        (
            Method::POST,
            "/disclosures",
            Some(json!({"patient_id": "P1", "to_institution": "HOSP2",
                "consent_reference": "c", "consented_at": "2026-01-01T00:00:00Z"})),
            vec![Role::Admin],
        ),
        (Method::DELETE, "/disclosures/x", None, vec![Role::Admin]),
        (Method::GET, "/disclosures", None, vec![Role::Admin]),
        (
            Method::POST,
            "/break-glass",
            Some(json!({"patient_id": "P1", "institution": "HOSP2", "reason": "emergency"})),
            vec![Role::Clinician],
        ),
        (Method::GET, "/audit", None, vec![Role::Admin]),
        (
            Method::GET,
            "/institutions",
            None,
            vec![Role::Admin, Role::Clinician, Role::Modality],
        ),
    ]
}

crate::on_backends!(api_routes_refuse:
    api_routes_refuse_bad_tokens_and_wrong_roles => Backend::Local,
    api_routes_refuse_bad_tokens_and_wrong_roles_on_postgres => Backend::Postgres,
);

async fn api_routes_refuse(backend: Backend) {
    let Some(hub) = TestHub::start_with(backend, |c| c.access.break_glass = true).await else {
        return;
    };
    let mut expired = common::claims("HOSP1", Role::Admin);
    expired.exp -= 3600;
    expired.iat -= 7200;
    let bad_tokens = [
        None,
        Some(common::forged(&expired, common::TEST_SECRET)),
        Some(common::forged(
            &common::claims("HOSP1", Role::Admin),
            "not-the-secret",
        )),
        Some("not.a.jwt".to_string()),
    ];
    for (method, path, body, allowed) in api_routes() {
        for token in &bad_tokens {
            let mut req = client().request(method.clone(), format!("{}/api{path}", hub.http()));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = &body {
                req = req.json(b);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 401, "{method} {path} with {token:?}");
            assert!(r.headers().contains_key("www-authenticate"));
            assert_eq!(r.headers()["content-type"], "application/problem+json");
        }
        for role in [Role::Admin, Role::Clinician, Role::Modality] {
            let (st, problem) = api(&hub, "HOSP1", role, method.clone(), path, body.clone()).await;
            if allowed.contains(&role) {
                assert_ne!(st, 403, "{method} {path} as {role:?}: {problem}");
                assert_ne!(st, 401);
            } else {
                assert_eq!(st, 403, "{method} {path} as {role:?}: {problem}");
                assert_eq!(problem["status"], 403);
            }
        }
    }
    // The API's description is public, and describes every route.
    let doc: Value = client()
        .get(format!("{}/api/openapi.json", hub.http()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for (method, path, _, _) in api_routes() {
        let templated = path
            .replace("/links/P1", "/links/{patient_id}")
            .replace("/patients/P1", "/patients/{patient_id}")
            .replace("/disclosures/x", "/disclosures/{id}");
        let op = &doc["paths"][format!("/api{templated}")][method.as_str().to_lowercase()];
        assert!(op.is_object(), "{method} {templated} undocumented");
    }
    // Refusals are audited.
    let (_, trail) = admin_get(&hub, "HOSP1", "/audit?limit=1000").await;
    let trail = trail.as_array().unwrap().clone();
    assert!(trail.iter().any(|e| e["action"] == "authorize"
        && e["outcome"] == "denied"
        && e["codes"]["event_id"]["code"] == "110113"));
    // A token claiming a user name the database cannot store does not stop
    // the trail.
    let mut nul = common::claims("HOSP1", Role::Admin);
    nul.sub = "evil\u{0}user".into();
    let r = client()
        .get(format!("{}/api/audit", hub.http()))
        .bearer_auth(common::forged(&nul, "not-the-secret"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (st, trail) = admin_get(&hub, "HOSP1", "/audit?limit=1000").await;
    assert_eq!(st, 200);
    let trail = trail.as_array().unwrap().clone();
    assert!(trail.iter().any(|e| e["user"] == "evil\u{fffd}user"));
    // Tokens that name HOSP1 (expired, wrongly signed) are shown to its
    // admins, marked unverified; tokens that name no one are in the trail only.
    let claimed = trail
        .iter()
        .filter(|e| e["action"] == "authenticate")
        .inspect(|e| {
            assert!(e["user"] == "someone" || e["user"] == "evil\u{fffd}user");
            assert_eq!(e["detail"]["identity_verified"], false);
            assert_eq!(e["codes"]["event_id"]["code"], "110114");
        })
        .count();
    assert_eq!(claimed, api_routes().len() * 2 + 1);
    hub.hub.audit.flush().await;
    let unattributed = tsunagu::audit::trail::query(
        hub.hub.index.pool(),
        &tsunagu::audit::trail::Filter {
            institution: String::new(),
            limit: 10_000,
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .iter()
    .filter(|e| e.sequenced.event.action == tsunagu::audit::Action::Authenticate)
    .count();
    assert_eq!(unattributed, api_routes().len() * 2);
}

crate::on_backends!(break_glass_is_off_unless_configured_time_boxed_and_audited:
    break_glass_is_off_unless_configured_time_boxed_and_audited_on_sqlite => Backend::Local,
    break_glass_is_off_unless_configured_time_boxed_and_audited_on_postgres => Backend::Postgres,
);

async fn break_glass_is_off_unless_configured_time_boxed_and_audited(backend: Backend) {
    let Some(off) = TestHub::start(backend).await else {
        return;
    };
    let body =
        json!({"patient_id": "A-H1", "institution": "HOSP1", "reason": "unconscious in the ER"});
    let (st, _) = api(
        &off,
        "HOSP3",
        Role::Clinician,
        reqwest::Method::POST,
        "/break-glass",
        Some(body.clone()),
    )
    .await;
    assert_eq!(st, 403);
    drop(off);

    let Some(hub) = TestHub::start_with(backend, |c| {
        // The grant's length is the default's (4 hours).
        c.access.break_glass = true;
    })
    .await
    else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let Some(s1) = make_study(work.path(), "ct16_explicit_le.dcm", "A-H1", 11) else {
        return;
    };
    if common::dcmtk("storescu").is_none() {
        return;
    }
    push(&hub, "HOSP1", &s1);
    let path = format!("/dicom-web/studies/{}/metadata", s1.study);
    assert_eq!(
        get(&hub, "HOSP3", &path, "application/dicom+json").await.0,
        404
    );
    let (st, _) = api(
        &hub,
        "HOSP3",
        Role::Clinician,
        reqwest::Method::POST,
        "/break-glass",
        Some(json!({"patient_id": "A-H1", "institution": "HOSP1", "reason": ""})),
    )
    .await;
    assert_eq!(st, 400, "a reason is required");
    // A reason is text: control characters or a book are refused.
    for reason in ["\u{7}\u{7}\u{7}\u{7}".to_string(), "x".repeat(1025)] {
        let (st, problem) = api(
            &hub,
            "HOSP3",
            Role::Clinician,
            reqwest::Method::POST,
            "/break-glass",
            Some(json!({"patient_id": "A-H1", "institution": "HOSP1", "reason": reason})),
        )
        .await;
        assert_eq!(st, 400, "{problem}");
    }
    let (st, grant) = api(
        &hub,
        "HOSP3",
        Role::Clinician,
        reqwest::Method::POST,
        "/break-glass",
        Some(body),
    )
    .await;
    assert_eq!(st, 201, "{grant}");
    // The user who broke the glass sees the patient, as stored (no link).
    let (st, meta) = get(&hub, "HOSP3", &path, "application/dicom+json").await;
    assert_eq!(st, 200);
    let meta: Value = serde_json::from_slice(&meta).unwrap();
    assert_eq!(meta[0]["00100020"]["Value"][0], "A-H1");
    let (found, _) = qido(&hub, "HOSP3", "studies?PatientID=A-H1").await;
    assert_eq!(studies_of(&found), vec![s1.study.clone()]);
    // Nobody else does.
    let colleague = tsunagu::auth::mint(
        &hub.hub.config.auth,
        "HOSP3",
        "colleague",
        Role::Clinician,
        std::time::Duration::from_secs(600),
        std::time::SystemTime::now(),
    )
    .unwrap();
    let r = client()
        .get(format!("{}{path}", hub.http()))
        .bearer_auth(colleague)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        get(&hub, "HOSP2", &path, "application/dicom+json").await.0,
        404
    );
    // Time-boxed: open a minute before the fourth hour ends, closed after.
    hub.hub
        .clock
        .advance(chrono::Duration::hours(4) - chrono::Duration::minutes(1));
    assert_eq!(
        get(&hub, "HOSP3", &path, "application/dicom+json").await.0,
        200
    );
    hub.hub
        .clock
        .advance(chrono::Duration::minutes(1) + chrono::Duration::seconds(1));
    assert_eq!(
        get(&hub, "HOSP3", &path, "application/dicom+json").await.0,
        404
    );
    hub.hub.clock.set(None);
    // Audited as an emergency override, visible to the owner.
    let (_, trail) = admin_get(&hub, "HOSP1", "/audit?patient_id=A-H1").await;
    let bg = trail
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "break-glass")
        .cloned()
        .unwrap();
    assert_eq!(bg["user"], "user-of-HOSP3");
    assert_eq!(bg["codes"]["event_type"]["code"], "110127");
    assert_eq!(bg["detail"]["reason"], "unconscious in the ER");
    // And so are the reads made under the grant, marked as such.
    let under: Vec<&Value> = trail
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["user"] == "user-of-HOSP3" && e["detail"]["break_glass"] == true)
        .collect();
    assert!(
        under.iter().any(|e| e["action"] == "access")
            && under.iter().any(|e| e["action"] == "query"),
        "{trail}"
    );
    // Refused reasons are in the trail too, but no longer than a valid one
    // and without control characters.
    let (_, all) = admin_get(&hub, "HOSP1", "/audit?patient_id=A-H1&limit=1000").await;
    let reasons: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "break-glass" && e["outcome"] != "success")
        .filter_map(|e| e["detail"]["reason"].as_str())
        .collect();
    assert!(
        reasons.contains(&"\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}"),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().all(|r| r.chars().count() <= 1024),
        "{reasons:?}"
    );
}

fn well_formed_xml(xml: &str) -> bool {
    let Some(py) = common::python_with("xml.dom.minidom") else {
        return true;
    };
    let mut child = std::process::Command::new(py)
        .args([
            "-c",
            "import sys, xml.dom.minidom; xml.dom.minidom.parseString(sys.stdin.buffer.read())",
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(xml.as_bytes())
        .unwrap();
    child.wait().unwrap().success()
}

/// Check one RFC 5424 record carrying a PS3.15 audit message of a query.
fn check_query_record(record: &str) {
    assert!(record.starts_with("<85>1 "), "{record}");
    assert!(
        record.contains(" tsunagu ") && record.contains(" IHE+RFC-3881 [meta sequenceId=\""),
        "{record}"
    );
    let xml = record.split_once('\u{feff}').unwrap().1;
    assert!(well_formed_xml(xml), "{xml}");
    assert!(
        xml.contains("<EventID csd-code=\"110112\" codeSystemName=\"DCM\""),
        "{xml}"
    );
    assert!(xml.contains("UserID=\"user-of-HOSP1\""), "{xml}");
    assert!(xml.contains("ParticipantObjectID=\"A-H1\""), "{xml}");
}

/// A hub sending audit to `syslog` (with `ca`), after one import and one
/// query of HOSP1's patient A-H1 (whose query record the collector expects).
async fn audited_query(syslog: String, ca: Option<PathBuf>, n: u32) -> Option<TestHub> {
    let hub = TestHub::start_with(Backend::Local, |c| {
        c.audit.syslog = Some(syslog);
        c.audit.syslog_ca_file = ca;
    })
    .await?;
    let work = tempfile::tempdir().unwrap();
    let s = make_study(work.path(), "ct16_explicit_le.dcm", "A-H1", n)?;
    hub.import("HOSP1", vec![s.file.clone()]).await;
    qido(&hub, "HOSP1", "studies?PatientID=A-H1").await;
    Some(hub)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_messages_reach_a_syslog_collector_over_udp() {
    let collector = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = collector.local_addr().unwrap().port();
    let Some(_hub) = audited_query(format!("udp://127.0.0.1:{port}"), None, 21).await else {
        return;
    };
    let mut buf = vec![0u8; 65536];
    loop {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), collector.recv(&mut buf))
            .await
            .expect("an audit datagram")
            .unwrap();
        let record = String::from_utf8_lossy(&buf[..n]).into_owned();
        if record.contains("110112") {
            check_query_record(&record);
            break;
        }
    }
}

fn openssl(dir: &Path, args: &[&str]) -> bool {
    std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_messages_reach_a_syslog_collector_over_tls() {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::AsyncReadExt;
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    let made = openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=test audit CA",
        ],
    ) && openssl(
        d,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    ) && std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .is_ok()
        && openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
    if !made {
        common::skip("openssl could not make test certificates");
        return;
    }
    let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(d.join("server.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(d.join("server.key")).unwrap();
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        tokio_rustls::rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        // RFC 5425 framing: MSG-LEN SP SYSLOG-MSG.
        loop {
            let mut len = Vec::new();
            loop {
                let b = tls.read_u8().await.unwrap();
                if b == b' ' {
                    break;
                }
                len.push(b);
            }
            let n: usize = String::from_utf8(len).unwrap().parse().unwrap();
            let mut msg = vec![0u8; n];
            tls.read_exact(&mut msg).await.unwrap();
            let _ = tx.send(String::from_utf8(msg).unwrap());
        }
    });
    let Some(_hub) = audited_query(
        format!("tls://localhost:{port}"),
        Some(d.join("ca.pem")),
        22,
    )
    .await
    else {
        return;
    };
    loop {
        let record = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .expect("an audit record over TLS")
            .unwrap();
        if record.contains("110112") {
            check_query_record(&record);
            break;
        }
    }
}

crate::on_backends!(an_institution_may_retrieve_others_objects_as_stored:
    an_institution_may_retrieve_others_objects_as_stored_on_sqlite => Backend::Local,
    an_institution_may_retrieve_others_objects_as_stored_on_postgres => Backend::Postgres,
);

async fn an_institution_may_retrieve_others_objects_as_stored(backend: Backend) {
    let Some(hub) = TestHub::start_with(backend, |c| {
        c.institutions[1].coerce_patient_ids = false;
    })
    .await
    else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let (Some(s2), Some(s3)) = (
        make_study(work.path(), "ct16_explicit_le.dcm", "B-H2", 31),
        make_study(work.path(), "ct16_explicit_le.dcm", "B-H3", 32),
    ) else {
        return;
    };
    hub.import("HOSP2", vec![s2.file.clone()]).await;
    hub.import("HOSP3", vec![s3.file.clone()]).await;
    let now = chrono::Utc::now();
    assert_eq!(link(&hub, "HOSP3", "B-H3", None).await.0, 201);
    assert_eq!(
        disclose(&hub, "HOSP3", "B-H3", "HOSP2", now, None).await.0,
        201
    );
    assert_eq!(
        link(&hub, "HOSP2", "B-H2", Some(("HOSP3", "B-H3"))).await.0,
        201
    );
    assert_eq!(
        disclose(&hub, "HOSP2", "B-H2", "HOSP3", now, None).await.0,
        201
    );
    let dicom = "multipart/related; type=\"application/dicom\"; transfer-syntax=*";
    let path = |s: &Study| {
        format!(
            "/dicom-web/studies/{}/series/{}/instances/{}",
            s.study, s.series, s.sop
        )
    };
    // Hospital 2 asked for originals: hospital 3's bytes as stored.
    let (st, body) = get(&hub, "HOSP2", &path(&s3), dicom).await;
    assert_eq!(st, 200);
    let part = first_part(&body);
    let (_, stored) = hub.stored("HOSP3", &s3.sop).await.unwrap();
    assert_eq!(part, stored);
    // Its searches still show its own ID; hospital 3 still gets coerced objects.
    let (found, _) = qido(&hub, "HOSP2", "studies?PatientID=B-H2").await;
    assert_eq!(found.len(), 2);
    let (_, body) = get(&hub, "HOSP3", &path(&s2), dicom).await;
    assert_eq!(patient_id(&part10(&first_part(&body))), "B-H3");
}

crate::on_backends!(patient_ids_in_paths_are_percent_encoded:
    patient_ids_in_paths_are_percent_encoded_on_sqlite => Backend::Local,
    patient_ids_in_paths_are_percent_encoded_on_postgres => Backend::Postgres,
);

async fn patient_ids_in_paths_are_percent_encoded(backend: Backend) {
    let Some(hub) = TestHub::start(backend).await else {
        return;
    };
    let id = "H2 A/7%";
    let (st, made) = link(&hub, "HOSP2", id, None).await;
    assert_eq!(st, 201, "{made}");
    assert_eq!(made["patient_id"], id);
    let encoded = "H2%20A%2F7%25";
    let (st, view) = admin_get(&hub, "HOSP2", &format!("/patients/{encoded}")).await;
    assert_eq!(st, 200, "{view}");
    assert_eq!(view["link"]["patient_id"], id);
    let (st, _) = admin_delete(&hub, "HOSP2", &format!("/links/{encoded}")).await;
    assert_eq!(st, 200);
    assert_eq!(
        admin_get(&hub, "HOSP2", &format!("/patients/{encoded}"))
            .await
            .0,
        404
    );
    // Not a valid LO value: refused with a problem body.
    let (st, problem) = link(&hub, "HOSP2", "back\\slash", None).await;
    assert_eq!(st, 400);
    assert!(problem["detail"].as_str().unwrap().contains("patient ID"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_study_is_one_patients() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let Some(first) = make_study(work.path(), "ct16_explicit_le.dcm", "P-ONE", 41) else {
        return;
    };
    hub.import("HOSP1", vec![first.file.clone()]).await;
    // The same Study Instance UID under another patient ID, in a new series.
    let mut obj = dicom_object::open_file(&first.file).unwrap();
    let (series, sop) = ("2.25.990000041.22", "2.25.990000041.33");
    for (tag, vr, v) in [
        (tags::PATIENT_ID, VR::LO, "P-TWO"),
        (tags::SERIES_INSTANCE_UID, VR::UI, series),
        (tags::SOP_INSTANCE_UID, VR::UI, sop),
    ] {
        obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
    }
    obj.update_meta(|m| m.media_storage_sop_instance_uid = sop.into());
    let second = work.path().join("second.dcm");
    obj.write_to_file(&second).unwrap();
    let inst = hub.hub.institutions.by_code("HOSP1").unwrap();
    let report = tsunagu::ingest::import::import_files(
        hub.hub.ingest.clone(),
        inst,
        vec![second.clone()],
        false,
    )
    .await;
    assert_eq!(report.rejected.len(), 1, "{report:?}");
    assert!(report.rejected[0].1.contains("belongs to another patient"));
    // Over DIMSE the refusal is a failure status the sender will not retry.
    if let Some(py) = common::python_with("pynetdicom") {
        let pushed =
            common::pynetdicom_push(&py, hub.port(), "HOSP1", std::slice::from_ref(&second));
        assert_eq!(pushed[0].status, Some(0xC000), "{pushed:?}");
    }
    // The study stays the first patient's, with its one instance; the
    // refused copy is not kept.
    let (found, _) = qido(
        &hub,
        "HOSP1",
        &format!("studies?StudyInstanceUID={}", first.study),
    )
    .await;
    assert_eq!(found[0]["00100020"]["Value"][0], "P-ONE");
    assert_eq!(found[0]["00201208"]["Value"][0], 1);
    assert!(hub.stored("HOSP1", sop).await.is_none());
    let kept: Vec<_> = walkdir::WalkDir::new(hub.dir.path().join("store"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(sop))
        .collect();
    assert!(kept.is_empty(), "{kept:?}");
}

/// A keyed trail on either engine (the PostgreSQL appender goes through the
/// pool, SQLite's through its own connection): events are chained with the
/// key, verify with it, and a node without the key or with another one does
/// not start on the keyed trail.
async fn keyed_trail(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("chain.key");
    std::fs::write(&key_file, format!("{}\n", "5a".repeat(32))).unwrap();
    let with_key = key_file.clone();
    let Some(hub) = TestHub::start_with(backend, move |c| {
        c.audit.chain_key_file = Some(with_key);
    })
    .await
    else {
        return;
    };
    let (st, made) = link(&hub, "HOSP2", "K-H2", None).await;
    assert_eq!(st, 201, "{made}");
    qido(&hub, "HOSP2", "studies?PatientID=K-H2").await;
    hub.hub.audit.flush().await;
    let mut audit = hub.hub.config.audit.clone();
    let key = tsunagu::audit::chain::ChainKey::from_config(&audit)
        .unwrap()
        .unwrap();
    let v = tsunagu::audit::chain::verify(&hub.hub.index, Some(&key))
        .await
        .unwrap();
    assert_eq!(v.broken_at, None, "{v:?}");
    assert_eq!(v.keyed_from, Some(1), "{v:?}");
    assert!(v.events >= 2, "{v:?}");
    let unchecked = tsunagu::audit::chain::verify(&hub.hub.index, None)
        .await
        .unwrap();
    assert!(
        unchecked
            .broken_at
            .as_ref()
            .is_some_and(|(_, why)| why.contains("needs the chain key")),
        "{unchecked:?}"
    );
    // Another node on the same trail: without the key, or with another.
    let refused = tsunagu::audit::chain::check_key(&hub.hub.index, None).await;
    assert!(
        refused.is_err_and(|e| e.to_string().contains("needs the chain's key")),
        "a node without the key must not append to a keyed trail"
    );
    let other_file = dir.path().join("other.key");
    std::fs::write(&other_file, "0".repeat(64)).unwrap();
    audit.chain_key_file = Some(other_file);
    let other = tsunagu::audit::chain::ChainKey::from_config(&audit)
        .unwrap()
        .unwrap();
    let refused = tsunagu::audit::chain::check_key(&hub.hub.index, Some(&other)).await;
    assert!(
        refused.is_err_and(|e| e.to_string().contains("does not check")),
        "a node with another key must not append"
    );
    tsunagu::audit::chain::check_key(&hub.hub.index, Some(&key))
        .await
        .unwrap();
    // Below the chain, the database itself refuses to change or remove what
    // was appended (triggers on both engines).
    let pool = hub.hub.index.pool();
    let objects: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_object")
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(objects > 0, "the link's event names its patient");
    for sql in [
        "UPDATE audit_event SET user_name = 'nobody'",
        "DELETE FROM audit_event",
        "UPDATE audit_object SET patient_id = 'nobody'",
        "DELETE FROM audit_object",
    ] {
        let refused = sqlx::query(sql).execute(pool).await;
        assert!(
            refused.is_err_and(|e| e.to_string().contains("append-only")),
            "{sql}"
        );
    }
}

crate::on_backends!(keyed_trail:
    keyed_trail_on_sqlite => Backend::Local,
    keyed_trail_on_postgres => Backend::Postgres,
);
