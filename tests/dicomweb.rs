//! DICOMweb over real HTTP: authentication on every route, the own-
//! institution scope, QIDO matching on both index engines, STOW-RS outcomes.
//! (dicomweb-client and the conformance suite: `dicomweb_peers.rs`.)

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use serde_json::Value;
use tsunagu::auth::Role;

use crate::common::{self, Backend, TEST_ORIGIN, TEST_SECRET, TestHub, claims, forged};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

const CT: &str = "ct16_explicit_le.dcm";
const CT_STUDY: &str = "2.25.212477325107932399243233100858614569001.1.1";
const CT_SERIES: &str = "2.25.212477325107932399243233100858614569001.2.1";
const CT_SOP: &str = "2.25.212477325107932399243233100858614569001.3.1";

fn testfile(name: &str) -> Option<std::path::PathBuf> {
    Some(common::testdata_dir()?.join("files").join(name))
}

/// Every resource, with the method that reaches it.
fn routes() -> Vec<(reqwest::Method, String)> {
    use reqwest::Method;
    let i = format!("studies/{CT_STUDY}/series/{CT_SERIES}/instances/{CT_SOP}");
    let mut v: Vec<(Method, String)> = [
        "studies".to_string(),
        "series".into(),
        "instances".into(),
        format!("studies/{CT_STUDY}"),
        format!("studies/{CT_STUDY}/metadata"),
        format!("studies/{CT_STUDY}/series"),
        format!("studies/{CT_STUDY}/instances"),
        format!("studies/{CT_STUDY}/series/{CT_SERIES}"),
        format!("studies/{CT_STUDY}/series/{CT_SERIES}/metadata"),
        format!("studies/{CT_STUDY}/series/{CT_SERIES}/instances"),
        i.clone(),
        format!("{i}/metadata"),
        format!("{i}/frames/1"),
        format!("{i}/bulk/0/10"),
        format!("{i}/rendered"),
        format!("{i}/frames/1/rendered"),
        format!("{i}/thumbnail"),
        format!("{i}/frames/1/thumbnail"),
        format!("studies/{CT_STUDY}/series/{CT_SERIES}/thumbnail"),
        format!("studies/{CT_STUDY}/thumbnail"),
        format!("studies/{CT_STUDY}/rendered"),
        "no/such/route".into(),
    ]
    .into_iter()
    .map(|p| (Method::GET, format!("/dicom-web/{p}")))
    .collect();
    v.push((Method::POST, "/dicom-web/studies".into()));
    v.push((Method::POST, format!("/dicom-web/studies/{CT_STUDY}")));
    v.push((
        Method::GET,
        format!(
            "/wado?requestType=WADO&studyUID={CT_STUDY}&seriesUID={CT_SERIES}&objectUID={CT_SOP}"
        ),
    ));
    v
}

crate::on_backends!(every_route_refuses_missing_and_bad_tokens:
    every_route_refuses_missing_and_bad_tokens_on_sqlite => Backend::Local,
    every_route_refuses_missing_and_bad_tokens_on_postgres => Backend::Postgres,
);

async fn every_route_refuses_missing_and_bad_tokens(backend: Backend) {
    let Some(hub) = TestHub::start(backend).await else {
        return;
    };
    let Some(ct) = testfile(CT) else { return };
    hub.import("HOSP1", vec![ct]).await;
    let mut expired = claims("HOSP1", Role::Clinician);
    expired.exp -= 3600;
    expired.iat -= 3600;
    let mut wrong_iss = claims("HOSP1", Role::Clinician);
    wrong_iss.iss = "someone-else".into();
    let mut wrong_aud = claims("HOSP1", Role::Clinician);
    wrong_aud.aud = "another-service".into();
    let good = claims("HOSP1", Role::Clinician);
    let unsigned = {
        // alg "none": header and claims, no signature.
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(serde_json::to_vec(&good).unwrap())
        )
    };
    let bad: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("not a JWT", Some("Bearer not.a.jwt".into())),
        ("basic scheme", Some("Basic dXNlcjpwYXNz".into())),
        (
            "expired",
            Some(format!("Bearer {}", forged(&expired, TEST_SECRET))),
        ),
        (
            "wrong signature",
            Some(format!(
                "Bearer {}",
                forged(&good, "another-secret-0123456789")
            )),
        ),
        (
            "wrong issuer",
            Some(format!("Bearer {}", forged(&wrong_iss, TEST_SECRET))),
        ),
        (
            "wrong audience",
            Some(format!("Bearer {}", forged(&wrong_aud, TEST_SECRET))),
        ),
        ("alg none", Some(format!("Bearer {unsigned}"))),
    ];
    let c = client();
    for (method, path) in routes() {
        for (what, auth) in &bad {
            let mut req = c.request(method.clone(), format!("{}{path}", hub.http()));
            if let Some(a) = auth {
                req = req.header(AUTHORIZATION, a);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 401, "{what}: {method} {path}");
            assert!(resp.headers().contains_key("www-authenticate"), "{what}");
            assert_eq!(
                resp.headers()[CONTENT_TYPE],
                "application/problem+json",
                "{what}: {path}"
            );
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["status"], 401, "{body}");
        }
    }
    // A token of an institution the network does not have is refused too.
    let stranger = forged(&claims("NOWHERE", Role::Clinician), TEST_SECRET);
    let r = c
        .get(format!("{}/dicom-web/studies", hub.http()))
        .bearer_auth(stranger)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Roles: admins and modalities read no images; admins store none.
    let mut role_refusals = 0;
    for role in [Role::Admin, Role::Modality] {
        let t = hub.token("HOSP1", role);
        for (method, path) in routes() {
            if method == reqwest::Method::POST || path.contains("no/such") {
                continue;
            }
            let r = c
                .get(format!("{}{path}", hub.http()))
                .bearer_auth(&t)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 403, "{role:?} {path}");
            role_refusals += 1;
        }
    }
    let t = hub.token("HOSP1", Role::Admin);
    let r = c
        .post(format!("{}/dicom-web/studies", hub.http()))
        .bearer_auth(&t)
        .header(
            CONTENT_TYPE,
            "multipart/related; type=\"application/dicom\"; boundary=x",
        )
        .body("--x--\r\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    role_refusals += 1;
    // Unknown resources are 404 once authenticated (and 401 before).
    let r = c
        .get(format!("{}/dicom-web/no/such/route", hub.http()))
        .bearer_auth(hub.token("HOSP1", Role::Clinician))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let fails = hub.hub.metrics.render();
    assert!(
        fails.contains("tsunagu_http_auth_failures_total"),
        "auth failures are counted"
    );
    // And audited: every refused token (110114, identity unverified), every
    // refused role (110113, the caller known).
    hub.hub.audit.flush().await;
    // The events naming no institution, and those of HOSP1's users.
    let mut trail = Vec::new();
    for institution in ["", "HOSP1"] {
        trail.extend(
            tsunagu::audit::trail::query(
                hub.hub.index.pool(),
                &tsunagu::audit::trail::Filter {
                    institution: institution.into(),
                    limit: 100_000,
                    ..Default::default()
                },
            )
            .await
            .unwrap(),
        );
    }
    let of = |action: tsunagu::audit::Action| {
        trail
            .iter()
            .filter(|e| e.sequenced.event.action == action)
            .collect::<Vec<_>>()
    };
    let refused_tokens = of(tsunagu::audit::Action::Authenticate);
    assert!(
        refused_tokens.len() >= routes().len() * bad.len(),
        "{} of {} token refusals audited",
        refused_tokens.len(),
        routes().len() * bad.len()
    );
    // (The token of an institution outside the network is one, unattributed.)
    let refused_roles = of(tsunagu::audit::Action::Authorize);
    assert!(
        refused_roles
            .iter()
            .all(|e| e.sequenced.event.outcome == tsunagu::audit::Outcome::Denied)
    );
    let of_hosp1 = refused_roles
        .iter()
        .filter(|e| e.sequenced.event.institution == "HOSP1")
        .count();
    assert_eq!(of_hosp1, role_refusals);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cors_preflight_needs_no_token_and_only_configured_origins_pass() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let c = client();
    let preflight = |origin: &str| {
        c.request(
            reqwest::Method::OPTIONS,
            format!("{}/dicom-web/studies", hub.http()),
        )
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
    };
    let r = preflight(TEST_ORIGIN).await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(r.headers()["access-control-allow-origin"], TEST_ORIGIN);
    let allowed = r.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(allowed.contains("authorization"), "{allowed}");
    let r = preflight("http://evil.example").await.unwrap();
    assert!(!r.headers().contains_key("access-control-allow-origin"));
    // A real request from the allowed origin still needs its token.
    let r = c
        .get(format!("{}/dicom-web/studies", hub.http()))
        .header("origin", TEST_ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["access-control-allow-origin"], TEST_ORIGIN);
}

/// GET `path` as a clinician of `inst`; status and body.
async fn get_as(hub: &TestHub, inst: &str, path: &str, accept: &str) -> (StatusCode, Vec<u8>) {
    let url = format!("{}{path}", hub.dicomweb());
    let r = common::get_as_clinician(hub, inst, &url, accept).await;
    (r.status(), r.bytes().await.unwrap().to_vec())
}

crate::on_backends!(another_institutions_objects_are_absent:
    another_institutions_objects_are_absent_on_sqlite => Backend::Local,
    another_institutions_objects_are_absent_on_postgres => Backend::Postgres,
);

async fn another_institutions_objects_are_absent(backend: Backend) {
    let Some(hub) = TestHub::start(backend).await else {
        return;
    };
    let Some(ct) = testfile(CT) else { return };
    hub.import("HOSP1", vec![ct.clone()]).await;
    let i = format!("/studies/{CT_STUDY}/series/{CT_SERIES}/instances/{CT_SOP}");
    // The Pixel Data's bulk data path, as the owner's metadata names it.
    let uri = pixel_data_uri(&hub, &hub.token("HOSP1", Role::Clinician), &ct).await;
    let bulk = uri[uri.find("/studies/").unwrap()..].to_string();
    let json = "application/dicom+json";
    let dicom = "multipart/related; type=\"application/dicom\"";
    let octet = "multipart/related; type=\"application/octet-stream\"";
    // The owner sees everything.
    for (path, accept) in [
        (format!("/studies?StudyInstanceUID={CT_STUDY}"), json),
        (format!("/studies/{CT_STUDY}/metadata"), json),
        (format!("/studies/{CT_STUDY}"), dicom),
        (format!("{i}/frames/1"), octet),
        (bulk.clone(), "application/octet-stream"),
    ] {
        let (s, _) = get_as(&hub, "HOSP1", &path, accept).await;
        assert_eq!(s, 200, "{path}");
    }
    // A one-frame CT: a frame past it, or a list naming more frames than it
    // has (one frame again and again), is a bad request.
    for frames in ["2", "1,1"] {
        let (s, _) = get_as(&hub, "HOSP1", &format!("{i}/frames/{frames}"), octet).await;
        assert_eq!(s, 400, "frames/{frames}");
    }
    // A path parameter of the wrong kind: 400 with a problem body.
    let (s, body) = get_as(&hub, "HOSP1", &format!("{i}/bulk/abc/10"), octet).await;
    assert_eq!(s, 400);
    let problem: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["status"], 400);
    // Another institution: searches are empty, everything else is 404 with
    // exactly the body of a UID that does not exist.
    for q in [
        "/studies".to_string(),
        format!("/studies?StudyInstanceUID={CT_STUDY}"),
        "/series".into(),
        "/instances".into(),
        format!("/studies/{CT_STUDY}/series"),
        format!("/studies/{CT_STUDY}/series/{CT_SERIES}/instances"),
        "/studies?limit=1&offset=0".into(),
    ] {
        let (s, body) = get_as(&hub, "HOSP2", &q, json).await;
        assert_eq!(s, 204, "{q}");
        assert!(body.is_empty());
    }
    let missing = "2.25.999";
    for (path, accept) in [
        (format!("/studies/{CT_STUDY}"), dicom),
        (format!("/studies/{CT_STUDY}/metadata"), json),
        (format!("/studies/{CT_STUDY}/series/{CT_SERIES}"), dicom),
        (
            format!("/studies/{CT_STUDY}/series/{CT_SERIES}/metadata"),
            json,
        ),
        (i.clone(), dicom),
        (format!("{i}/metadata"), json),
        (format!("{i}/frames/1"), octet),
        (bulk.clone(), "application/octet-stream"),
    ] {
        let (s, body) = get_as(&hub, "HOSP2", &path, accept).await;
        assert_eq!(s, 404, "{path}");
        let (s2, body2) = get_as(&hub, "HOSP1", &path.replace(CT_STUDY, missing), accept).await;
        assert_eq!(s2, 404, "{path}");
        assert_eq!(body, body2, "hidden and absent answer alike: {path}");
    }
}

async fn qido(hub: &TestHub, query: &str) -> (StatusCode, Vec<Value>, Vec<String>) {
    common::qido_as(hub, "HOSP1", query.trim_start_matches('/')).await
}

fn values(items: &[Value], tag: &str) -> Vec<String> {
    let mut v: Vec<String> = items
        .iter()
        .map(|i| match &i[tag]["Value"][0] {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        })
        .collect();
    v.sort();
    v
}

async fn qido_matching(backend: Backend) {
    let Some(hub) = TestHub::start(backend).await else {
        return;
    };
    let Some(corpus) = common::corpus() else {
        return;
    };
    hub.import("HOSP1", corpus.iter().map(|(p, _)| p.clone()).collect())
        .await;
    let studies = |items: &[Value]| values(items, "0020000D").len();

    // Single value and universal matching.
    let (s, items, _) = qido(&hub, "/studies?PatientID=TSNG-JP-0003").await;
    assert_eq!((s.as_u16(), items.len()), (200, 1));
    assert_eq!(
        items[0]["00100010"]["Value"][0]["Ideographic"], "森^鷗外",
        "{}",
        items[0]
    );
    let (_, items, _) = qido(&hub, "/studies?PatientID=TSNG-TD-0001").await;
    assert_eq!(studies(&items), 6);
    // Person names: each group, wildcards ignore case, single values are literal.
    for (q, n) in [
        ("PatientName=山田*", 2),
        ("PatientName=やまだ*", 2),
        ("PatientName=ﾔﾏﾀﾞ*", 2),
        ("PatientName=mori*", 1),
        ("PatientName=MORI^OGAI", 0),
        ("PatientName=Mori^Ogai", 1),
        ("PatientName=Mori^Ogai=森^鷗外=もり^おうがい", 1),
        ("PatientName==森^鷗外", 1),
        ("PatientName=*corp?s", 6),
        ("PatientName=mor&fuzzymatching=true", 1),
        ("PatientName=ogai&fuzzymatching=true", 1),
    ] {
        let (_, items, _) = qido(&hub, &format!("/studies?{q}")).await;
        assert_eq!(studies(&items), n, "{q}");
    }
    // Dates, lists, lower-level keys, computed attributes.
    for (q, n) in [
        ("StudyDate=20240115", 9),
        ("StudyDate=20240101-20240131", 9),
        ("StudyDate=-20231231", 0),
        ("StudyDate=20240116-", 0),
        ("ModalitiesInStudy=SM", 1),
        ("ModalitiesInStudy=CT", 1),
        ("Modality=US", 1),
        // Keys of several levels: parameters bound out of text order.
        ("Modality=US&PatientID=TSNG-TD-0001&StudyDate=20240115", 1),
        ("Modality=US&PatientID=TSNG-JP-0001", 0),
        ("SOPClassUID=1.2.840.10008.5.1.4.1.1.88.11", 1),
        (&format!("StudyInstanceUID={CT_STUDY},2.25.1"), 1),
        ("AccessionNumber=TD000*", 9),
        ("AccessionNumber=TD0006", 1),
        ("StudyDescription=*", 9),
        ("unknownparameter=1", 9),
    ] {
        let (_, items, _) = qido(&hub, &format!("/studies?{q}")).await;
        assert_eq!(studies(&items), n, "{q}");
    }
    let (_, items, _) = qido(&hub, &format!("/studies?StudyInstanceUID={CT_STUDY}")).await;
    let st = &items[0];
    let modalities = &st["00080061"]["Value"];
    for m in ["CT", "DOC", "KO", "SR"] {
        assert!(
            modalities.as_array().unwrap().contains(&Value::from(m)),
            "{st}"
        );
    }
    assert_eq!(st["00201208"]["Value"][0], 16, "{st}");
    assert!(
        st["00081190"]["Value"][0]
            .as_str()
            .unwrap()
            .ends_with(&format!("/dicom-web/studies/{CT_STUDY}"))
    );
    // Series and instance levels.
    let (_, items, _) = qido(&hub, &format!("/studies/{CT_STUDY}/series?Modality=CT")).await;
    assert_eq!(items.len(), 13);
    let (_, items, _) = qido(
        &hub,
        "/instances?SOPClassUID=1.2.840.10008.5.1.4.1.1.77.1.6",
    )
    .await;
    assert_eq!(items.len(), 4, "WSI instances");
    let (_, items, _) = qido(
        &hub,
        &format!("/studies/{CT_STUDY}/series/{CT_SERIES}/instances?includefield=00280030"),
    )
    .await;
    assert_eq!(values(&items, "00080018"), vec![CT_SOP.to_string()]);
    assert_eq!(items[0]["00280010"]["Value"][0], 96);
    assert_eq!(items[0]["00280030"]["vr"], "DS", "{}", items[0]);
    // includefield from the stored data set, and `all`.
    let (_, items, _) = qido(
        &hub,
        &format!("/studies?StudyInstanceUID={CT_STUDY}&includefield=PatientAge,00100010"),
    )
    .await;
    assert!(items[0].get("00101010").is_some(), "{}", items[0]);
    let (_, items, _) = qido(
        &hub,
        &format!("/series?SeriesInstanceUID={CT_SERIES}&includefield=all"),
    )
    .await;
    assert!(items[0].get("00080070").is_some(), "{}", items[0]);
    // Paging: stable order, Warning with the count of what follows.
    let mut seen = Vec::new();
    for offset in (0..10).step_by(4) {
        let (_, items, warnings) = qido(&hub, &format!("/studies?limit=4&offset={offset}")).await;
        // Counted from where the page ends: 9 studies in pages of 4.
        let expected: Vec<String> = match offset {
            0 => vec!["299 tsunagu: There are 5 additional results that can be requested".into()],
            4 => vec!["299 tsunagu: There are 1 additional results that can be requested".into()],
            _ => vec![],
        };
        assert_eq!(warnings, expected, "offset {offset}");
        seen.extend(values(&items, "0020000D"));
    }
    // limit=0: nothing shown, everything past the offset counted.
    for (query, n) in [("limit=0", 9), ("limit=0&offset=4", 5)] {
        let (_, items, warnings) = qido(&hub, &format!("/studies?{query}")).await;
        assert!(items.is_empty(), "{query}");
        assert_eq!(
            warnings,
            vec![format!(
                "299 tsunagu: There are {n} additional results that can be requested"
            )],
            "{query}"
        );
    }
    // The same at the instance level (unordered count after the page).
    let (_, all, _) = qido(&hub, "/instances?limit=1000").await;
    let (_, page, warnings) = qido(&hub, "/instances?limit=2&offset=1").await;
    assert_eq!(page.len(), 2);
    assert_eq!(
        warnings,
        vec![format!(
            "299 tsunagu: There are {} additional results that can be requested",
            all.len() - 3
        )]
    );
    let mut dedup = seen.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!((seen.len(), dedup.len()), (9, 9));
    // Invalid values of supported keys are 400 with a problem body.
    for q in [
        "StudyDate=2024-01-15",
        "StudyDate=notadate",
        "limit=-1",
        "offset=x",
        "StudyInstanceUID=1.2.abc",
        "SeriesNumber=one",
        "includefield=NoSuchKeyword",
        // NUL is in no value (PostgreSQL refuses it in text).
        "PatientID=%00",
        "PatientName=A%00*",
        &format!("PatientName={}", "A*".repeat(9000)),
    ] {
        let (s, _, _) = qido(&hub, &format!("/studies?{q}")).await;
        assert_eq!(s, 400, "{q}");
    }
    let (s, _, _) = qido(&hub, "/studies/1.2%00/series").await;
    assert_eq!(s, 400, "NUL in a path");
    // Unsupported attribute as a key: ignored, with a Warning.
    let (s, items, warnings) = qido(&hub, "/studies?PatientAge=050Y").await;
    assert_eq!((s.as_u16(), items.len()), (200, 9));
    assert!(
        warnings.iter().any(|w| w.contains("PatientAge")),
        "{warnings:?}"
    );
    // Other Patient IDs Sequence matching.
    let (s, _, _) = qido(&hub, "/studies?OtherPatientIDsSequence.00100020=NOBODY").await;
    assert_eq!(s, 204);
}

/// The Warning's count of what follows a page stops at 200 ("at least"),
/// and near the end counts exactly: PostgreSQL counts in the walk that
/// chose the page, SQLite in a second walk from the page's end.
async fn warning_count_cap(backend: Backend) {
    let Some(py) = common::python_with("numpy, pydicom") else {
        return;
    };
    let Some(hub) = TestHub::start(backend).await else {
        return;
    };
    hub.import_bench_corpus(
        &py,
        "HOSP1",
        &[
            "--sets",
            "query",
            "--query-studies",
            "210",
            "--query-series",
            "1",
            "--query-instances",
            "1",
            "--query-size",
            "8",
        ],
    )
    .await;
    let (_, all, _) = qido(&hub, "/studies?limit=1000").await;
    let n = all.len();
    assert!(n > 205, "{n} studies");
    let count =
        |k: &str| format!("299 tsunagu: There are {k} additional results that can be requested");
    for (query, expected) in [
        ("limit=5".to_string(), count("at least 200")),
        (format!("limit=5&offset={}", n - 205), count("at least 200")),
        (format!("limit=5&offset={}", n - 204), count("199")),
        (format!("limit=5&offset={}", n - 8), count("3")),
        ("limit=0".to_string(), count("at least 200")),
    ] {
        let (_, _, warnings) = qido(&hub, &format!("/studies?{query}")).await;
        assert_eq!(warnings, vec![expected], "{backend:?} {query}");
    }
}

crate::on_backends!(warning_count_cap:
    warning_count_caps_on_sqlite => Backend::Local,
    warning_count_caps_on_postgres => Backend::Postgres,
);

/// A CT of the corpus made into patient `id` named `name` with other
/// patient IDs `others` ((ID, issuer)), in study and series of its own.
fn patient_object(
    hub: &TestHub,
    n: u32,
    id: &str,
    name: &str,
    others: &[(&str, &str)],
) -> Option<(std::path::PathBuf, String)> {
    use dicom_core::{DataElement, VR, value::DataSetSequence};
    use dicom_dictionary_std::tags;
    use dicom_object::InMemDicomObject;
    let ct = testfile("ct16_explicit_le.dcm")?;
    let mut obj = dicom_object::open_file(&ct).ok()?.into_inner();
    let uid = |part: u32| format!("2.25.90417{n}0{part}");
    let study = uid(1);
    obj.put(DataElement::new(
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        study.as_str(),
    ));
    obj.put(DataElement::new(
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        uid(2).as_str(),
    ));
    obj.put(DataElement::new(
        tags::SOP_INSTANCE_UID,
        VR::UI,
        uid(3).as_str(),
    ));
    obj.put(DataElement::new(tags::PATIENT_ID, VR::LO, id));
    obj.put(DataElement::new(tags::PATIENT_NAME, VR::PN, name));
    let items: Vec<InMemDicomObject> = others
        .iter()
        .map(|(pid, issuer)| {
            InMemDicomObject::from_element_iter([
                DataElement::new(tags::PATIENT_ID, VR::LO, *pid),
                DataElement::new(tags::ISSUER_OF_PATIENT_ID, VR::LO, *issuer),
            ])
        })
        .collect();
    obj.put(DataElement::new(
        tags::OTHER_PATIENT_I_DS_SEQUENCE,
        VR::SQ,
        DataSetSequence::from(items),
    ));
    // The request this series fulfils (series matching keys of PS3.18).
    let request = InMemDicomObject::from_element_iter([
        DataElement::new(
            tags::SCHEDULED_PROCEDURE_STEP_ID,
            VR::SH,
            format!("SPS-{n}"),
        ),
        DataElement::new(tags::REQUESTED_PROCEDURE_ID, VR::SH, format!("RP-{n}")),
    ]);
    obj.put(DataElement::new(
        tags::REQUEST_ATTRIBUTES_SEQUENCE,
        VR::SQ,
        DataSetSequence::from(vec![request]),
    ));
    let path = hub.dir.path().join(format!("patient-{n}.dcm"));
    obj.with_meta(
        dicom_object::meta::FileMetaTableBuilder::new().transfer_syntax("1.2.840.10008.1.2.1"),
    )
    .ok()?
    .write_to_file(&path)
    .ok()?;
    Some((path, study))
}

/// Matching at the edges PS3.4 §C.2.2.2 draws: wildcards within one item's
/// Patient ID, names with trailing empty components, reversed ranges,
/// universal and list forms, parameters we do not support.
async fn qido_matching_edges(backend: Backend) {
    let Some(hub) = TestHub::start(backend).await else {
        return;
    };
    let (Some((a, study_a)), Some((b, study_b))) = (
        patient_object(
            &hub,
            1,
            "PA",
            "Doe^John^^",
            &[("X1", "ISS-TEXT"), ("Y2", "H1")],
        ),
        patient_object(&hub, 2, "PB", "Roe^Jane", &[("ABCTEXT", "Q")]),
    ) else {
        return;
    };
    hub.import("HOSP1", vec![a, b]).await;
    let found = |items: &[Value]| values(items, "0020000D");
    for (q, expected) in [
        // `*` runs within the item's ID, not on into its issuer ("ISS-TEXT").
        (
            "OtherPatientIDsSequence.00100020=*TEXT",
            vec![study_b.clone()],
        ),
        ("OtherPatientIDsSequence.00100020=X*", vec![study_a.clone()]),
        ("OtherPatientIDsSequence.00100020=*2", vec![study_a.clone()]),
        ("OtherPatientIDsSequence.00100020=X1*H1", vec![]),
        ("OtherPatientIDsSequence.00100020=Y2", vec![study_a.clone()]),
        // Trailing empty components: stored `Doe^John^^`.
        ("PatientName=Doe^John", vec![study_a.clone()]),
        ("PatientName=Doe^John^^", vec![study_a.clone()]),
        ("PatientName=DOE*^^", vec![study_a.clone()]),
        ("PatientName=Roe^Jane^", vec![study_b.clone()]),
        ("PatientID=**", vec![study_a.clone(), study_b.clone()]),
        (
            &format!("StudyInstanceUID={study_a},,{study_b}") as &str,
            vec![study_a.clone(), study_b.clone()],
        ),
        ("limit=4294967296", vec![study_a.clone(), study_b.clone()]),
        ("StudyTime=1130-11", vec![]),
    ] {
        let (s, items, _) = qido(&hub, &format!("/studies?{q}")).await;
        assert!(s == 200 || s == 204, "{backend:?} {q}: {s}");
        let mut expected = expected;
        expected.sort();
        assert_eq!(found(&items), expected, "{backend:?} {q}");
    }
    for (q, expected) in [
        (
            "RequestAttributesSequence.ScheduledProcedureStepID=SPS-1",
            vec![study_a.clone()],
        ),
        (
            "00400275.00401001=RP-*",
            vec![study_a.clone(), study_b.clone()],
        ),
        (
            "RequestAttributesSequence.00401001=RP-2",
            vec![study_b.clone()],
        ),
        (
            "RequestAttributesSequence.RequestedProcedureID=RP-3",
            vec![],
        ),
    ] {
        let (s, items, warnings) = qido(&hub, &format!("/series?{q}")).await;
        assert!(s == 200 || s == 204, "{backend:?} {q}: {s}");
        assert!(warnings.is_empty(), "{backend:?} {q}: {warnings:?}");
        let mut expected = expected;
        expected.sort();
        assert_eq!(found(&items), expected, "{backend:?} {q}");
    }
    for q in [
        "StudyDate=20240102-20240101",
        "StudyTime=1200-1100",
        "StudyTime=10.5",
        "StudyTime=1030.5",
        "PatientID=A%01B",
        "OtherPatientIDsSequence.00100020=%01*",
    ] {
        let (s, _, _) = qido(&hub, &format!("/studies?{q}")).await;
        assert_eq!(s, 400, "{backend:?} {q}");
    }
    let (_, _, warnings) = qido(&hub, "/studies?emptyvaluematching=true&PatientID=PA").await;
    assert!(
        warnings.iter().any(|w| w.contains("emptyvaluematching")),
        "{warnings:?}"
    );
}

/// One institution, one Patient ID under two issuers (and under none, so
/// under the institution's own): three patients, never merged.
async fn one_patient_id_under_two_issuers(backend: Backend) {
    use dicom_core::{DataElement, VR};
    use dicom_dictionary_std::tags;
    let Some(hub) = TestHub::start(backend).await else {
        return;
    };
    let Some(ct) = testfile(CT) else { return };
    let mut files = Vec::new();
    for (n, issuer, name) in [
        (1, Some("ISS-A"), "Alpha^Ann"),
        (2, Some("ISS-B"), "Beta^Bob"),
        (3, None, "Gamma^Gus"),
    ] {
        let mut obj = dicom_object::open_file(&ct).unwrap().into_inner();
        for (tag, part) in [
            (tags::STUDY_INSTANCE_UID, 1),
            (tags::SERIES_INSTANCE_UID, 2),
            (tags::SOP_INSTANCE_UID, 3),
        ] {
            let uid = format!("2.25.77120{n}0{part}");
            obj.put(DataElement::new(tag, VR::UI, uid.as_str()));
        }
        obj.put(DataElement::new(tags::PATIENT_ID, VR::LO, "SAME-ID"));
        obj.put(DataElement::new(tags::PATIENT_NAME, VR::PN, name));
        if let Some(i) = issuer {
            obj.put(DataElement::new(tags::ISSUER_OF_PATIENT_ID, VR::LO, i));
        } else {
            obj.remove_element(tags::ISSUER_OF_PATIENT_ID);
        }
        let path = hub.dir.path().join(format!("issuer-{n}.dcm"));
        obj.with_meta(
            dicom_object::meta::FileMetaTableBuilder::new().transfer_syntax("1.2.840.10008.1.2.1"),
        )
        .unwrap()
        .write_to_file(&path)
        .unwrap();
        files.push(path);
    }
    hub.import("HOSP1", files).await;
    let (_, all, _) = qido(&hub, "studies?PatientID=SAME-ID&includefield=00100021").await;
    let mut seen: Vec<(String, String)> = all
        .iter()
        .map(|s| {
            (
                s["00100021"]["Value"][0].as_str().unwrap_or("").to_string(),
                s["00100010"]["Value"][0]["Alphabetic"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("HOSP1".to_string(), "Gamma^Gus".to_string()),
            ("ISS-A".into(), "Alpha^Ann".into()),
            ("ISS-B".into(), "Beta^Bob".into()),
        ],
        "{all:?}"
    );
    for (issuer, name) in [
        ("ISS-A", "Alpha^Ann"),
        ("ISS-B", "Beta^Bob"),
        ("HOSP1", "Gamma^Gus"),
    ] {
        let (_, one, _) = qido(
            &hub,
            &format!("studies?PatientID=SAME-ID&IssuerOfPatientID={issuer}"),
        )
        .await;
        assert_eq!(one.len(), 1, "{issuer}: {one:?}");
        assert_eq!(one[0]["00100010"]["Value"][0]["Alphabetic"], name);
    }
}

crate::on_backends!(one_patient_id_under_two_issuers:
    one_patient_id_under_two_issuers_on_sqlite => Backend::Local,
    one_patient_id_under_two_issuers_on_postgres => Backend::Postgres,
);

crate::on_backends!(qido_matching_edges:
    qido_matching_edges_on_sqlite => Backend::Local,
    qido_matching_edges_on_postgres => Backend::Postgres,
);

crate::on_backends!(qido_matching:
    qido_matching_on_sqlite => Backend::Local,
    qido_matching_on_postgres => Backend::Postgres,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn empty_search_answer_is_configurable() {
    let Some(hub) = TestHub::start_with(Backend::Local, |c| {
        c.dicomweb.qido_empty = tsunagu::config::EmptySearch::EmptyArray;
    })
    .await
    else {
        return;
    };
    let r = client()
        .get(format!("{}/studies?PatientID=none", hub.dicomweb()))
        .bearer_auth(hub.token("HOSP1", Role::Clinician))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "[]");
}

fn multipart(boundary: &str, parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (ct, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Type: {ct}\r\n\r\n").as_bytes());
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

async fn stow(
    hub: &TestHub,
    role: Role,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let r = client()
        .post(format!("{}{path}", hub.dicomweb()))
        .bearer_auth(hub.token("HOSP2", role))
        .header(CONTENT_TYPE, content_type)
        .header(ACCEPT, "application/dicom+json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stow_rs_outcomes() {
    let Some(hub) = TestHub::start_with(Backend::Local, |c| {
        c.dicomweb.stow_max_bytes = 200_000;
    })
    .await
    else {
        return;
    };
    let (Some(ct), Some(jp)) = (testfile(CT), testfile("jp_utf8_ir192.dcm")) else {
        return;
    };
    let ct = std::fs::read(ct).unwrap();
    let jp = std::fs::read(jp).unwrap();
    let mp = "multipart/related; type=\"application/dicom\"; boundary=B";
    let count = || async { hub.hub.index.count_instances().await.unwrap() };

    // A modality stores; the instance is then found and byte-identical.
    let (s, body) = stow(
        &hub,
        Role::Modality,
        "/studies",
        mp,
        multipart("B", &[("application/dicom", &ct)]),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["00081199"]["Value"][0]["00081155"]["Value"][0], CT_SOP);
    let (_, stored) = hub.stored("HOSP2", CT_SOP).await.unwrap();
    assert_eq!(common::dataset_bytes(&stored), common::dataset_bytes(&ct));
    assert_eq!(count().await, 1);
    // Audited as a store by the token's user, naming the object.
    hub.hub.audit.flush().await;
    let trail = tsunagu::audit::trail::query(
        hub.hub.index.pool(),
        &tsunagu::audit::trail::Filter {
            institution: "HOSP2".into(),
            limit: 1000,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let stored_by_stow = trail.iter().find(|e| {
        let e = &e.sequenced.event;
        e.action == tsunagu::audit::Action::Store
            && e.outcome == tsunagu::audit::Outcome::Success
            && e.institution == "HOSP2"
            && e.role == "modality"
    });
    let e = &stored_by_stow
        .expect("a STOW-RS store event")
        .sequenced
        .event;
    assert!(e.objects.iter().any(|o| o.study_uid == CT_STUDY), "{e:?}");

    // One good part and one unreadable: 202, the bad one failed with C000.
    let (s, body) = stow(
        &hub,
        Role::Clinician,
        "/studies",
        mp,
        multipart(
            "B",
            &[
                ("application/dicom", &jp),
                ("application/dicom", b"not dicom at all"),
            ],
        ),
    )
    .await;
    assert_eq!(s, 202, "{body}");
    assert_eq!(body["00081198"]["Value"][0]["00081197"]["Value"][0], 0xC000);
    assert_eq!(count().await, 2);

    // Addressed to another study: refused (409), nothing stored.
    let (s, body) = stow(
        &hub,
        Role::Clinician,
        "/studies/2.25.42",
        mp,
        multipart("B", &[("application/dicom", &ct)]),
    )
    .await;
    assert_eq!(s, 409, "{body}");
    assert_eq!(body["00081198"]["Value"][0]["00081197"]["Value"][0], 0xC409);
    // Nothing stored, no study in the path: RetrieveURL (Type 2) is empty.
    let (s, body) = stow(
        &hub,
        Role::Clinician,
        "/studies",
        mp,
        multipart("B", &[("application/dicom", b"not dicom at all")]),
    )
    .await;
    assert_eq!(s, 409, "{body}");
    assert_eq!(body["00081190"], serde_json::json!({"vr": "UR"}), "{body}");
    assert_eq!(count().await, 2);

    // Not multipart/related: 415. Not closed: 400. Too large: 413.
    let (s, _) = stow(
        &hub,
        Role::Clinician,
        "/studies",
        "application/dicom",
        ct.clone(),
    )
    .await;
    assert_eq!(s, 415);
    let mut cut = multipart("B", &[("application/dicom", &jp)]);
    cut.truncate(cut.len() / 2);
    let (s, body) = stow(&hub, Role::Clinician, "/studies", mp, cut).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["status"], 400);
    let big = vec![0u8; 300_000];
    let (s, _) = stow(
        &hub,
        Role::Clinician,
        "/studies",
        mp,
        multipart("B", &[("application/dicom", &big)]),
    )
    .await;
    assert_eq!(s, 413);
    assert_eq!(count().await, 2, "nothing half-written became visible");
    // Broken off after a stored part: that part stays stored and is listed
    // (202), the broken one fails with C000; not a 400 ("nothing stored").
    let Some(sr) = testfile("sr_basic_text.dcm") else {
        return;
    };
    let sr = std::fs::read(sr).unwrap();
    let mut body = multipart(
        "B",
        &[("application/dicom", &sr), ("application/dicom", &jp)],
    );
    body.truncate(body.len() - jp.len() / 2);
    let (s, answer) = stow(&hub, Role::Clinician, "/studies", mp, body).await;
    assert_eq!(s, 202, "{answer}");
    assert_eq!(
        answer["00081199"]["Value"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(
        answer["00081198"]["Value"][0]["00081197"]["Value"][0],
        0xC000
    );
    assert_eq!(count().await, 3);
    // The spool holds nothing from the refused requests.
    let left = common::spool_files(&hub.dir.path().join("store/.spool"));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let still: Vec<_> = left.iter().filter(|p| p.exists()).collect();
    assert!(still.is_empty(), "spool leftovers: {still:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retrieve_capabilities_describe_the_service() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let c = client();
    let options = |path: &str, accept: &str, token: bool| {
        let mut r = c
            .request(
                reqwest::Method::OPTIONS,
                format!("{}{path}", hub.dicomweb()),
            )
            .header(ACCEPT, accept);
        if token {
            r = r.bearer_auth(hub.token("HOSP1", Role::Clinician));
        }
        r.send()
    };
    // Not a CORS preflight: a token is needed like everywhere else.
    assert_eq!(options("", "*/*", false).await.unwrap().status(), 401);
    let r = options("", "application/vnd.sun.wadl+xml", true)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()[CONTENT_TYPE], "application/vnd.sun.wadl+xml");
    let wadl = r.text().await.unwrap();
    for needle in [
        "<application xmlns=\"http://wadl.dev.java.net/2009/02\">",
        "path=\"studies/{study}/series/{series}/instances/{instance}/frames/{frames}\"",
        "<method name=\"POST\">",
        "<param name=\"includefield\" style=\"query\"/>",
    ] {
        assert!(wadl.contains(needle), "{needle} in {wadl}");
    }
    let r = options(
        &format!("/studies/{CT_STUDY}/metadata"),
        "application/json",
        true,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["resources"].as_array().unwrap().len() >= 14, "{v}");
    assert_eq!(
        options("/studies", "image/png", true)
            .await
            .unwrap()
            .status(),
        406
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn search_and_metadata_in_xml() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let Some(jp) = testfile("jp_iso2022_ir13_ir87.dcm") else {
        return;
    };
    hub.import("HOSP1", vec![jp]).await;
    let xml = "multipart/related; type=\"application/dicom+xml\"";
    for path in [
        "/studies?PatientID=TSNG-JP-0001",
        "/studies/2.25.212477325107932399243233100858614569001.1.7/metadata",
    ] {
        let r = client()
            .get(format!("{}{path}", hub.dicomweb()))
            .bearer_auth(hub.token("HOSP1", Role::Clinician))
            .header(ACCEPT, xml)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let ct = r.headers()[CONTENT_TYPE].to_str().unwrap().to_string();
        assert!(
            ct.starts_with("multipart/related; type=\"application/dicom+xml\"; boundary="),
            "{ct}"
        );
        let body = r.text().await.unwrap();
        assert!(
            body.contains("Content-Type: application/dicom+xml"),
            "{body}"
        );
        assert!(
            body.contains("<NativeDicomModel xml:space=\"preserve\">"),
            "{body}"
        );
        assert!(
            body.contains("<Ideographic><FamilyName>山田</FamilyName><GivenName>太郎</GivenName></Ideographic>"),
            "{body}"
        );
    }
}

/// `openssl` output, or `None` (after a skip) when it is missing.
fn openssl(args: &[&str]) -> Option<Vec<u8>> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .ok();
    match out {
        Some(o) if o.status.success() => Some(o.stdout),
        _ => {
            common::skip("openssl missing or failing");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identity_provider_keys_rs256_es256_and_jwks() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let Some(_) = openssl(&["genrsa", "-out", &p("rsa.pem"), "2048"]) else {
        return;
    };
    openssl(&[
        "rsa",
        "-in",
        &p("rsa.pem"),
        "-pubout",
        "-out",
        &p("rsa.pub"),
    ])
    .unwrap();
    // An EC key pair on `curve`: `{name}.pem`, its PKCS#8 form
    // `{name}8.pem` (for signing) and public key `{name}.pub`.
    let ec_key = |curve: &str, name: &str| {
        let (key, key8, public) = (
            p(&format!("{name}.pem")),
            p(&format!("{name}8.pem")),
            p(&format!("{name}.pub")),
        );
        openssl(&["ecparam", "-name", curve, "-genkey", "-noout", "-out", &key]).unwrap();
        openssl(&["pkcs8", "-topk8", "-nocrypt", "-in", &key, "-out", &key8]).unwrap();
        openssl(&["ec", "-in", &key, "-pubout", "-out", &public]).unwrap();
    };
    ec_key("prime256v1", "ec");
    // A P-384 key after the P-256 one: an ES384 token must reach it.
    ec_key("secp384r1", "ec384");
    // A second RSA key, published only in the JWKS under a key id.
    openssl(&["genrsa", "-out", &p("jwk.pem"), "2048"]).unwrap();
    let modulus =
        String::from_utf8(openssl(&["rsa", "-in", &p("jwk.pem"), "-noout", "-modulus"]).unwrap())
            .unwrap();
    let n = hex::decode(modulus.trim().trim_start_matches("Modulus=")).unwrap();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwks = serde_json::json!({"keys": [{
        "kty": "RSA", "kid": "idp-2026", "alg": "RS256", "use": "sig",
        "n": b64.encode(&n), "e": "AQAB"
    }]});
    std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).unwrap();

    let (rsa_pub, ec_pub, ec384_pub, jwks_path) = (
        dir.path().join("rsa.pub"),
        dir.path().join("ec.pub"),
        dir.path().join("ec384.pub"),
        dir.path().join("jwks.json"),
    );
    let Some(hub) = TestHub::start_with(Backend::Local, move |c| {
        c.auth.hs256_secret = None;
        c.auth.public_key_files = vec![rsa_pub, ec_pub, ec384_pub];
        c.auth.jwks_file = Some(jwks_path);
    })
    .await
    else {
        return;
    };
    let sign_claims = |alg: jsonwebtoken::Algorithm, key: &str, kid: Option<&str>, c: &Value| {
        let pem = std::fs::read(dir.path().join(key)).unwrap();
        let k = match alg {
            jsonwebtoken::Algorithm::ES256 | jsonwebtoken::Algorithm::ES384 => {
                jsonwebtoken::EncodingKey::from_ec_pem(&pem)
            }
            _ => jsonwebtoken::EncodingKey::from_rsa_pem(&pem),
        }
        .unwrap();
        let mut h = jsonwebtoken::Header::new(alg);
        h.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&h, c, &k).unwrap()
    };
    let valid = serde_json::to_value(claims("HOSP1", Role::Clinician)).unwrap();
    let sign = |alg, key: &str, kid: Option<&str>| sign_claims(alg, key, kid, &valid);
    let status = |token: String| {
        let url = format!("{}/studies", hub.dicomweb());
        async move {
            client()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    use jsonwebtoken::Algorithm::{ES256, ES384, RS256};
    assert_eq!(
        status(sign(RS256, "rsa.pem", None)).await,
        204,
        "RS256 by PEM"
    );
    assert_eq!(
        status(sign(ES256, "ec8.pem", None)).await,
        204,
        "ES256 by PEM"
    );
    assert_eq!(
        status(sign(RS256, "jwk.pem", Some("idp-2026"))).await,
        204,
        "RS256 by JWKS kid"
    );
    assert_eq!(
        status(sign(ES384, "ec3848.pem", None)).await,
        204,
        "ES384 by the PEM key after a P-256 one"
    );
    // The JWKS key under another kid, and an unknown key: refused.
    assert_eq!(status(sign(RS256, "jwk.pem", Some("other"))).await, 401);
    // A kid that the JWKS names binds the token to that key alone.
    assert_eq!(status(sign(RS256, "rsa.pem", Some("idp-2026"))).await, 401);
    // Not valid before its nbf.
    let mut early = valid.clone();
    early["nbf"] = (valid["iat"].as_u64().unwrap() + 3600).into();
    assert_eq!(
        status(sign_claims(RS256, "rsa.pem", None, &early)).await,
        401
    );
    // Two Authorization headers, each valid alone: refused.
    let twice = client()
        .get(format!("{}/studies", hub.dicomweb()))
        .header(
            "authorization",
            format!("Bearer {}", sign(RS256, "rsa.pem", None)),
        )
        .header(
            "authorization",
            format!("Bearer {}", sign(ES256, "ec8.pem", None)),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(twice.status(), 401);
    openssl(&["genrsa", "-out", &p("stranger.pem"), "2048"]).unwrap();
    assert_eq!(status(sign(RS256, "stranger.pem", None)).await, 401);
    // With no HS256 secret configured, HS256 tokens are refused outright.
    assert_eq!(
        status(forged(&claims("HOSP1", Role::Clinician), TEST_SECRET)).await,
        401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wado_uri_returns_the_instance() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let Some(ct) = testfile(CT) else { return };
    let original = std::fs::read(&ct).unwrap();
    hub.import("HOSP1", vec![ct]).await;
    let url = format!(
        "{}/wado?requestType=WADO&studyUID={CT_STUDY}&seriesUID={CT_SERIES}&objectUID={CT_SOP}&contentType=application%2Fdicom",
        hub.http()
    );
    let r = client()
        .get(&url)
        .bearer_auth(hub.token("HOSP1", Role::Clinician))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()[CONTENT_TYPE], "application/dicom");
    let body = r.bytes().await.unwrap();
    assert_eq!(
        common::dataset_bytes(&body),
        common::dataset_bytes(&original)
    );
    for (q, want) in [
        (url.replace("requestType=WADO", "requestType=XYZ"), 400),
        (
            url.replace("contentType=application%2Fdicom", "contentType=image%2Fgif"),
            406,
        ),
        (url.replace(CT_SOP, "2.25.1"), 404),
        // Never an identified object for an anonymized one, nor the whole
        // object for a frame.
        (format!("{url}&anonymize=yes"), 400),
        (format!("{url}&frameNumber=1"), 400),
    ] {
        let r = client()
            .get(&q)
            .bearer_auth(hub.token("HOSP1", Role::Clinician))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want, "{q}");
    }
    let r = client()
        .get(&url)
        .bearer_auth(hub.token("HOSP2", Role::Clinician))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "another institution's object is absent");

    // Pictures: JPEG or PNG of a frame, fitted, cropped, windowed.
    let picture = url.replace("&contentType=application%2Fdicom", "");
    for (query, kind, size) in [
        (
            "&contentType=image%2Fjpeg",
            image::ImageFormat::Jpeg,
            (128, 96),
        ),
        (
            "&contentType=image%2Fpng&rows=48",
            image::ImageFormat::Png,
            (64, 48),
        ),
        (
            "&contentType=image%2Fpng&columns=32&rows=32&frameNumber=1&imageQuality=50",
            image::ImageFormat::Png,
            (32, 24),
        ),
        (
            "&contentType=image%2Fpng&region=0,0,0.5,0.5&windowCenter=40&windowWidth=400",
            image::ImageFormat::Png,
            (64, 48),
        ),
    ] {
        let r = client()
            .get(format!("{picture}{query}"))
            .bearer_auth(hub.token("HOSP1", Role::Clinician))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{query}");
        let body = r.bytes().await.unwrap();
        let p = image::load_from_memory_with_format(&body, kind).unwrap();
        assert_eq!((p.width(), p.height()), size, "{query}");
    }
    for (query, want) in [
        ("&contentType=image%2Fjpeg&windowCenter=40", 400),
        ("&contentType=image%2Fjpeg&region=0.5,0,0.2,1", 400),
        ("&contentType=image%2Fjpeg&frameNumber=2", 400),
        ("&contentType=image%2Fjpeg&anonymize=yes", 400),
        ("&contentType=image%2Fjpeg&rows=0", 400),
    ] {
        let r = client()
            .get(format!("{picture}{query}"))
            .bearer_auth(hub.token("HOSP1", Role::Clinician))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want, "{query}");
    }
    let r = client()
        .get(format!("{picture}&contentType=image%2Fjpeg"))
        .bearer_auth(hub.token("HOSP2", Role::Clinician))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "another institution's picture is absent");
}

/// Bulk data positions of a Deflated object count in its inflated data set
/// (it is stored as received): its Pixel Data comes back whole and exact.
/// The BulkDataURI of the Pixel Data of `file` (imported as HOSP1's), as its
/// metadata names it.
async fn pixel_data_uri(hub: &TestHub, token: &str, file: &std::path::Path) -> String {
    use dicom_dictionary_std::tags;
    let (study, series, sop) = (
        common::text_of(file, tags::STUDY_INSTANCE_UID),
        common::text_of(file, tags::SERIES_INSTANCE_UID),
        common::text_of(file, tags::SOP_INSTANCE_UID),
    );
    let items: Value = client()
        .get(format!(
            "{}/studies/{study}/series/{series}/instances/{sop}/metadata",
            hub.dicomweb()
        ))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    items[0]["7FE00010"]["BulkDataURI"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Pixel Data of `file` as little-endian bytes (dicom-object decodes them).
fn pixel_data_le(file: &std::path::Path) -> Vec<u8> {
    let object = dicom_object::open_file(file).unwrap();
    object
        .element(dicom_dictionary_std::tags::PIXEL_DATA)
        .unwrap()
        .to_bytes()
        .unwrap()
        .to_vec()
}

async fn get_bulk(uri: &str, token: &str, accept: &str, range: Option<&str>) -> reqwest::Response {
    let mut r = client().get(uri).bearer_auth(token).header(ACCEPT, accept);
    if let Some(range) = range {
        r = r.header(reqwest::header::RANGE, range);
    }
    r.send().await.unwrap()
}

/// Import `file` as HOSP1's and fetch its Pixel Data whole through the
/// BulkDataURI its metadata names: it must be `pixels`. The URI and token.
async fn whole_pixel_data_is(
    hub: &TestHub,
    file: &std::path::Path,
    pixels: &[u8],
    what: &str,
) -> (String, String) {
    hub.import("HOSP1", vec![file.to_path_buf()]).await;
    let token = hub.token("HOSP1", Role::Clinician);
    let uri = pixel_data_uri(hub, &token, file).await;
    let r = get_bulk(&uri, &token, "application/octet-stream", None).await;
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    assert_eq!(body.len(), pixels.len());
    assert!(body.to_vec() == pixels, "{what}");
    (uri, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bulk_data_of_a_deflated_object() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let Some(file) = testfile("ct16_deflated_le.dcm") else {
        return;
    };
    whole_pixel_data_is(
        &hub,
        &file,
        &pixel_data_le(&file),
        "the inflated Pixel Data",
    )
    .await;
}

/// Bulk data is sent in Explicit VR Little Endian (PS3.18 §8.7.3.5): the
/// 16-bit pixels of a Big Endian object come out swapped, whole, by ranges
/// that split a word, and in a multipart answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bulk_data_of_a_big_endian_object() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let (Some(be), Some(le)) = (
        testfile("ct16_explicit_be.dcm"),
        testfile("ct16_explicit_le.dcm"),
    ) else {
        return;
    };
    // The corpus' Big Endian file holds the Little Endian file's pixels.
    let pixels = pixel_data_le(&le);
    let (uri, token) =
        whole_pixel_data_is(&hub, &be, &pixels, "Pixel Data in little-endian order").await;
    for (range, from, to) in [
        ("bytes=1-4", 1, 5),
        ("bytes=-3", pixels.len() - 3, pixels.len()),
    ] {
        let r = get_bulk(&uri, &token, "application/octet-stream", Some(range)).await;
        assert_eq!(r.status(), 206, "{range}");
        assert!(
            r.bytes().await.unwrap().to_vec() == pixels[from..to],
            "{range}"
        );
    }
    let r = get_bulk(
        &uri,
        &token,
        "multipart/related; type=\"application/octet-stream\"",
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    assert!(
        body.windows(pixels.len()).any(|w| w == pixels.as_slice()),
        "the multipart part holds the swapped Pixel Data"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metadata_validators_compression_and_bulk_ranges() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let Some(ct) = testfile(CT) else { return };
    let original = std::fs::read(&ct).unwrap();
    hub.import("HOSP1", vec![ct]).await;
    let token = hub.token("HOSP1", Role::Clinician);
    let get = |path: String, headers: Vec<(&'static str, String)>| {
        let mut r = client()
            .get(format!("{}{path}", hub.dicomweb()))
            .bearer_auth(&token);
        for (k, v) in headers {
            r = r.header(k, v);
        }
        r.send()
    };
    let meta = format!("/studies/{CT_STUDY}/metadata");
    let r = get(meta.clone(), vec![("accept-encoding", "gzip".into())])
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-encoding"],
        "gzip",
        "JSON is compressed"
    );
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let r = get(meta.clone(), vec![("if-none-match", etag.clone())])
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let r = get(meta.clone(), vec![("if-none-match", "\"other\"".into())])
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Another requester's base URL gives other bulk data URIs, so another ETag.
    let r = get(
        meta.clone(),
        vec![("host", "elsewhere.example:8443".into())],
    )
    .await
    .unwrap();
    assert_ne!(r.headers()["etag"].to_str().unwrap(), etag);
    let items: Value = get(meta, vec![]).await.unwrap().json().await.unwrap();
    let uri = items[0]["7FE00010"]["BulkDataURI"]
        .as_str()
        .unwrap()
        .to_string();
    // DICOM bodies are never compressed.
    let r = get(
        format!("/studies/{CT_STUDY}"),
        vec![
            ("accept-encoding", "gzip".into()),
            (
                "accept",
                "multipart/related; type=\"application/dicom\"".into(),
            ),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("content-encoding"));
    // Bulk data: whole, and one range of it as a single part (206).
    let path = uri.split("/dicom-web").nth(1).unwrap().to_string();
    let pixels = {
        let p = tsunagu::dicom::dataset::parse_file(&testfile(CT).unwrap()).unwrap();
        let (o, l) = p.pixels.unwrap().frames[0][0];
        original[o as usize..(o + l) as usize].to_vec()
    };
    let r = get(
        path.clone(),
        vec![("accept", "application/octet-stream".into())],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().to_vec(), pixels);
    // The value as one part, with a Range header.
    let ranged = |range: String| {
        get(
            path.clone(),
            vec![
                ("accept", "application/octet-stream".into()),
                ("range", range),
            ],
        )
    };
    let r = ranged("bytes=100-199".into()).await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 100-199/{}", pixels.len())
    );
    assert_eq!(r.bytes().await.unwrap().to_vec(), pixels[100..200].to_vec());
    // Past the end: 416 with the length; several ranges, a reversed one or
    // another unit: ignored, the whole value (RFC 9110).
    let r = ranged(format!("bytes={}-", pixels.len() + 10))
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes */{}", pixels.len())
    );
    for ignored in ["bytes=0-1,5-6", "bytes=200-100", "items=0-1"] {
        let r = ranged(ignored.into()).await.unwrap();
        assert_eq!(r.status(), 200, "{ignored}");
        assert_eq!(r.bytes().await.unwrap().to_vec(), pixels, "{ignored}");
    }
    // A range that is not bulk data of the instance is not served.
    let r = get(
        format!("/studies/{CT_STUDY}/series/{CT_SERIES}/instances/{CT_SOP}/bulk/0/132"),
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 404);
}

/// The query shapes of the scale benchmark (../shared/bench/scale_qido.py)
/// and the OHIF study list.
fn scale_queries() -> Vec<(&'static str, tsunagu::index::search::Search)> {
    use tsunagu::index::search::{Attr, Level, Matcher, Search};
    let study = |keys: Vec<(Attr, Matcher)>, limit: u32, offset: u64| Search {
        level: Level::Study,
        study_uid: None,
        series_uid: None,
        keys,
        limit,
        offset,
    };
    vec![
        (
            "PatientID",
            study(
                vec![(Attr::PatientId, Matcher::Single("P1".into()))],
                1000,
                0,
            ),
        ),
        (
            "StudyInstanceUID",
            study(
                vec![(Attr::StudyInstanceUid, Matcher::Single("1.2.3".into()))],
                1000,
                0,
            ),
        ),
        (
            "PatientName=YAMA*",
            study(
                vec![(Attr::PatientName, Matcher::Wildcard("YAMA*".into()))],
                100,
                0,
            ),
        ),
        (
            "StudyDate day",
            study(
                vec![(Attr::StudyDate, Matcher::Single("20240101".into()))],
                1000,
                0,
            ),
        ),
        (
            "StudyDate year",
            study(
                vec![(
                    Attr::StudyDate,
                    Matcher::Range(Some("20230101".into()), Some("20231231".into())),
                )],
                100,
                0,
            ),
        ),
        ("OHIF list", study(vec![], 101, 0)),
        ("OHIF list page 50", study(vec![], 101, 5000)),
        (
            "ModalitiesInStudy=MR",
            study(
                vec![(Attr::ModalitiesInStudy, Matcher::Single("MR".into()))],
                100,
                0,
            ),
        ),
        (
            "AccessionNumber",
            study(
                vec![(Attr::AccessionNumber, Matcher::Single("A1".into()))],
                1000,
                0,
            ),
        ),
        (
            "series of a study",
            Search {
                level: Level::Series,
                study_uid: Some("1.2.3".into()),
                series_uid: None,
                keys: vec![],
                limit: 1000,
                offset: 0,
            },
        ),
        (
            "instances of a series",
            Search {
                level: Level::Instance,
                study_uid: Some("1.2.3".into()),
                series_uid: Some("1.2.3.4".into()),
                keys: vec![],
                limit: 1000,
                offset: 0,
            },
        ),
    ]
}

async fn plans_use_indexes(backend: Backend) {
    let Some(hub) = TestHub::start(backend).await else {
        return;
    };
    use tsunagu::index::search::{GrantedPatient, Scope};
    let now = chrono::Utc::now();
    let grant = GrantedPatient {
        institution: "HOSP2".into(),
        issuer: "HOSP2".into(),
        patient_id: "P".into(),
    };
    // A break-glass grant is tested per study (an emergency, rare and
    // time-boxed): its plans only need to be valid.
    for (_, search) in scale_queries() {
        let with_grant = Scope::consented("HOSP1", "HOSP1", now, vec![grant.clone()]);
        assert!(
            !hub.hub
                .index
                .explain(&search, &with_grant)
                .await
                .unwrap()
                .is_empty()
        );
    }
    let scopes = [
        Scope::institution("HOSP1"),
        Scope::consented("HOSP1", "HOSP1", now, Vec::new()),
    ];
    for (scope, (name, search)) in scopes
        .iter()
        .flat_map(|sc| scale_queries().into_iter().map(move |q| (sc, q)))
    {
        let plan = hub.hub.index.explain(&search, scope).await.unwrap();
        let text = plan.join("\n");
        for line in &plan {
            let l = line.trim();
            // SQLite: "SCAN st" is a full table scan ("SCAN st USING INDEX …"
            // walks an index in order, "SCAN page" the page itself, "SCAN
            // json_each" the page's bound list of ids).
            let full_scan = (l.starts_with("SCAN ")
                && !l.contains(" USING ")
                && !l.starts_with("SCAN page")
                && !l.starts_with("SCAN json_each VIRTUAL TABLE"))
                || l.contains("Seq Scan");
            assert!(
                !full_scan,
                "{backend:?} {name} {scope:?}: full scan in\n{text}"
            );
        }
    }
}

crate::on_backends!(plans_use_indexes:
    search_plans_use_indexes_on_sqlite => Backend::Local,
    search_plans_use_indexes_on_postgres => Backend::Postgres,
);

/// Instances of one study in three series, made from a small corpus object:
/// (series UID, series number, instance number) per instance, in the order
/// they are stored.
/// SOP Instance UIDs are numbered from `first`.
fn study_of_series(
    dir: &std::path::Path,
    first: usize,
    layout: &[(&str, Option<i64>, Option<i64>)],
) -> Vec<std::path::PathBuf> {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    let base = dicom_object::open_file(testfile("sr_basic_text.dcm").unwrap()).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    layout
        .iter()
        .enumerate()
        .map(|(n, (series, series_number, number))| {
            let n = first + n;
            let mut obj = base.clone();
            let sop = format!("2.25.7070707070.3.{n}");
            for (tag, vr, v) in [
                (
                    tags::STUDY_INSTANCE_UID,
                    VR::UI,
                    "2.25.7070707070.1".to_string(),
                ),
                (tags::SERIES_INSTANCE_UID, VR::UI, series.to_string()),
                (tags::SOP_INSTANCE_UID, VR::UI, sop.clone()),
            ] {
                obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
            }
            for (tag, v) in [
                (tags::SERIES_NUMBER, series_number),
                (tags::INSTANCE_NUMBER, number),
            ] {
                match v {
                    Some(v) => {
                        obj.put(DataElement::new(
                            tag,
                            VR::IS,
                            PrimitiveValue::from(v.to_string()),
                        ));
                    }
                    None => {
                        obj.remove_element(tag);
                    }
                }
            }
            obj.update_meta(|m| m.media_storage_sop_instance_uid = sop.clone());
            let file = dir.join(format!("i{n:04}.dcm"));
            obj.write_to_file(&file).unwrap();
            file
        })
        .collect()
}

/// Metadata comes in the answer's order across the batches it is read in
/// (series by number, instances by number, unnumbered ones last, ties in
/// stored order), at study, series and instance level; its validator
/// changes when an instance of the study does.
async fn metadata_order_and_validator(backend: Backend) {
    let Some(hub) = TestHub::start(backend).await else {
        return;
    };
    if testfile("sr_basic_text.dcm").is_none() {
        return;
    }
    let (a, b, c) = (
        "2.25.7070707070.2.1",
        "2.25.7070707070.2.2",
        "2.25.7070707070.2.3",
    );
    // Series A (number 2): 270 instances, numbers stored in reverse, then 10
    // unnumbered; B (number 1): 20; C: no number, 5 instances.
    let mut layout: Vec<(&str, Option<i64>, Option<i64>)> = Vec::new();
    layout.extend((1..=270).rev().map(|n| (a, Some(2), Some(n))));
    layout.extend((0..10).map(|_| (a, Some(2), None)));
    layout.extend((1..=20).map(|n| (b, Some(1), Some(n))));
    layout.extend((1..=5).map(|n| (c, None, Some(n))));
    let dir = tempfile::tempdir().unwrap();
    let files = study_of_series(dir.path(), 0, &layout);
    // An import stores its files in parallel: the unnumbered ones, whose
    // order is the order they were stored in, go one at a time.
    hub.import("HOSP1", files[..270].to_vec()).await;
    for f in &files[270..280] {
        hub.import("HOSP1", vec![f.clone()]).await;
    }
    hub.import("HOSP1", files[280..].to_vec()).await;
    let stored_order = |from: usize, to: usize| -> Vec<String> {
        (from..to)
            .map(|n| format!("2.25.7070707070.3.{n}"))
            .collect()
    };
    let mut want: Vec<String> = stored_order(280, 300); // B
    want.extend(stored_order(0, 270).into_iter().rev()); // A, numbered
    want.extend(stored_order(270, 280)); // A, unnumbered
    want.extend(stored_order(300, 305)); // C
    // The study's version is never behind the wall clock (µs): a restored
    // backup or a rebuilt index cannot hand out a version seen before.
    let version: i64 = {
        use sqlx::Row;
        sqlx::query("SELECT content_version FROM study WHERE study_uid = '2.25.7070707070.1'")
            .fetch_one(hub.hub.index.pool())
            .await
            .unwrap()
            .get(0)
    };
    let before_test = (chrono::Utc::now() - chrono::Duration::minutes(10)).timestamp_micros();
    assert!(version > before_test, "{backend:?}: version {version}");
    let token = hub.token("HOSP1", Role::Clinician);
    let get = |path: String, etag: Option<String>| {
        let mut r = client()
            .get(format!(
                "{}/studies/2.25.7070707070.1{path}",
                hub.dicomweb()
            ))
            .bearer_auth(&token);
        if let Some(t) = etag {
            r = r.header("if-none-match", t);
        }
        r.send()
    };
    let sops = |items: &Value| -> Vec<String> {
        items
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["00080018"]["Value"][0].as_str().unwrap().to_string())
            .collect()
    };
    let r = get("/metadata".into(), None).await.unwrap();
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let items: Value = r.json().await.unwrap();
    assert_eq!(sops(&items), want, "{backend:?} study order");
    let r = get(format!("/series/{a}/metadata"), None).await.unwrap();
    let series_etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert_ne!(series_etag, etag, "another resource, another validator");
    let items: Value = r.json().await.unwrap();
    assert_eq!(
        sops(&items),
        want[20..300].to_vec(),
        "{backend:?} series order"
    );
    let one = "2.25.7070707070.3.7";
    let items: Value = get(format!("/series/{a}/instances/{one}/metadata"), None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(sops(&items), vec![one.to_string()]);
    assert_eq!(
        get("/metadata".into(), Some(etag.clone()))
            .await
            .unwrap()
            .status(),
        304
    );
    // A new instance in another series of the study: every validator of the
    // study changes.
    let more = study_of_series(&dir.path().join("more"), 305, &[(c, None, Some(6))]);
    hub.import("HOSP1", more).await;
    let r = get("/metadata".into(), Some(etag.clone())).await.unwrap();
    assert_eq!(r.status(), 200, "{backend:?}: a stale validator");
    assert_ne!(r.headers()["etag"].to_str().unwrap(), etag);
    let items: Value = r.json().await.unwrap();
    assert_eq!(items.as_array().unwrap().len(), 306);
    let r = get(format!("/series/{a}/metadata"), Some(series_etag))
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "{backend:?}: the series' validator follows its study"
    );
    // An absent series of a present study: 404, audited as a failure that
    // names no patient (nothing was there to access).
    let r = get("/series/2.25.7070707070.2.9/metadata".into(), None)
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    hub.hub.audit.flush().await;
    let trail = tsunagu::audit::trail::query(
        hub.hub.index.pool(),
        &tsunagu::audit::trail::Filter {
            institution: "HOSP1".into(),
            limit: 10_000,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let refused = trail
        .iter()
        .find(|e| e.sequenced.event.detail["series"] == "2.25.7070707070.2.9")
        .expect("the refused request is audited");
    assert_eq!(
        refused.sequenced.event.outcome,
        tsunagu::audit::Outcome::Failure
    );
    assert!(refused.sequenced.event.objects.is_empty(), "{backend:?}");
    // The counts QIDO answers with, kept on the rows.
    let (_, studies, _) = qido(&hub, "/studies?StudyInstanceUID=2.25.7070707070.1").await;
    assert_eq!(studies[0]["00201206"]["Value"][0], 3, "{backend:?}");
    assert_eq!(studies[0]["00201208"]["Value"][0], 306, "{backend:?}");
    let (_, series, _) = qido(&hub, "/studies/2.25.7070707070.1/series").await;
    let per_series: Vec<(String, i64)> = series
        .iter()
        .map(|s| {
            (
                s["0020000E"]["Value"][0].as_str().unwrap().to_string(),
                s["00201209"]["Value"][0].as_i64().unwrap(),
            )
        })
        .collect();
    for (uid, n) in [(a, 280), (b, 20), (c, 6)] {
        assert!(
            per_series.contains(&(uid.to_string(), n)),
            "{backend:?} {uid}: {per_series:?}"
        );
    }
}

crate::on_backends!(metadata_order_and_validator:
    metadata_order_and_validator_on_sqlite => Backend::Local,
    metadata_order_and_validator_on_postgres => Backend::Postgres,
);

/// A study retrieve lists its instances first and opens each when the
/// answer reaches it: one replaced meanwhile (its old copy deleted) is sent
/// in its new version, and the answer ends whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retrieve_sends_the_new_version_of_an_instance_replaced_while_it_is_sent() {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let Some(ct) = testfile("ct16_explicit_le.dcm") else {
        return;
    };
    // First in the study: 16 MiB of pixels, which a slow reader holds back
    // (more than the kernel's and the server's buffers take).
    let mut big = dicom_object::open_file(&ct).unwrap().into_inner();
    let big_uid = "2.25.4718830021945567203".to_string();
    big.put(DataElement::new(
        tags::SOP_INSTANCE_UID,
        VR::UI,
        big_uid.as_str(),
    ));
    big.put(DataElement::new(tags::INSTANCE_NUMBER, VR::IS, "0"));
    big.put(DataElement::new(
        tags::ROWS,
        VR::US,
        PrimitiveValue::from(2048u16),
    ));
    big.put(DataElement::new(
        tags::COLUMNS,
        VR::US,
        PrimitiveValue::from(4096u16),
    ));
    big.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::from(vec![0x5au8; 2048 * 4096 * 2]),
    ));
    let big_path = hub.dir.path().join("big.dcm");
    big.with_meta(
        dicom_object::meta::FileMetaTableBuilder::new().transfer_syntax("1.2.840.10008.1.2.1"),
    )
    .unwrap()
    .write_to_file(&big_path)
    .unwrap();
    // Two versions of the CT instance: the study description differs.
    let original = std::fs::read(&ct).unwrap();
    let marker = b"CT 16-bit with transfer syntax variants";
    let at = original
        .windows(marker.len())
        .position(|w| w == marker)
        .unwrap();
    let mut second = original.clone();
    second[at..at + 2].copy_from_slice(b"V2");
    let second_path = hub.dir.path().join("second.dcm");
    std::fs::write(&second_path, &second).unwrap();
    hub.import("HOSP1", vec![big_path, ct.clone()]).await;
    let sop = common::sop_instance_uid(&ct);
    let (first_key, _) = hub.stored("HOSP1", &sop).await.unwrap();
    let study = common::text_of(&ct, tags::STUDY_INSTANCE_UID);

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(hub.running.http_addr).await.unwrap();
    let token = hub.token("HOSP1", Role::Clinician);
    s.write_all(
        format!(
            "GET /dicom-web/studies/{study} HTTP/1.0\r\nHost: x\r\n\
             Accept: multipart/related; type=\"application/dicom\"; transfer-syntax=*\r\n\
             Authorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = vec![0u8; 64 * 1024];
    s.read_exact(&mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.0 200") || answer.starts_with(b"HTTP/1.1 200"));

    hub.import("HOSP1", vec![second_path]).await;
    let (key, _) = hub.stored("HOSP1", &sop).await.unwrap();
    assert_ne!(key, first_key);
    assert!(
        hub.hub.store.get_bytes(&first_key).await.is_err(),
        "the replaced copy is deleted"
    );

    s.read_to_end(&mut answer).await.unwrap();
    let data_set = common::dataset_bytes(&second);
    assert!(
        answer.windows(data_set.len()).any(|w| w == data_set),
        "the new version is sent"
    );
    let text = String::from_utf8_lossy(&answer[..1024]).to_string();
    let boundary = text
        .split("boundary=")
        .nth(1)
        .and_then(|b| b.split(['\r', ';']).next())
        .unwrap()
        .trim_matches('"')
        .to_string();
    assert!(
        answer.ends_with(format!("--{boundary}--").as_bytes())
            || answer.ends_with(format!("--{boundary}--\r\n").as_bytes()),
        "the answer ends whole"
    );
    assert_eq!(
        answer
            .windows(b"Content-Type: application/dicom".len())
            .filter(|w| w == b"Content-Type: application/dicom")
            .count(),
        2,
        "both instances, once each"
    );
}

/// A method a resource does not take is 405 with `Allow` and a problem body,
/// like every other error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_method_not_allowed_is_a_problem() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    for (method, url) in [
        (
            reqwest::Method::DELETE,
            format!("{}/studies/1.2.3/metadata", hub.dicomweb()),
        ),
        (reqwest::Method::PUT, format!("{}/api/audit", hub.http())),
        (reqwest::Method::POST, format!("{}/wado", hub.http())),
    ] {
        let r = client()
            .request(method.clone(), &url)
            .bearer_auth(hub.token("HOSP1", Role::Admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{method} {url}");
        assert!(r.headers().contains_key(reqwest::header::ALLOW), "{url}");
        assert_eq!(
            r.headers()[CONTENT_TYPE],
            "application/problem+json",
            "{url}"
        );
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["status"], 405);
        // Without a token it is still 401 first: default deny.
        let r = client().request(method, &url).send().await.unwrap();
        assert_eq!(r.status(), 401, "{url}");
    }
    // The routes open to all (health, the OpenAPI document) answer so too.
    for url in [
        format!("{}/healthz", hub.http()),
        format!("{}/api/openapi.json", hub.http()),
    ] {
        let r = client().post(&url).send().await.unwrap();
        assert_eq!(r.status(), 405, "{url}");
        assert_eq!(
            r.headers()[CONTENT_TYPE],
            "application/problem+json",
            "{url}"
        );
    }
}

/// What a STOW-RS body may cost before it is refused: a preamble or part
/// headers past 8 MiB (multer would hold them all in memory, up to the
/// 4 GiB limit), or a pause longer than the association timeout (a stalled
/// upload holds a spool worker's thread).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stow_body_that_never_reaches_a_part_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(hub) = TestHub::start_with(Backend::Local, |c| {
        c.server.association_timeout_secs = 2;
    })
    .await
    else {
        return;
    };
    let token = hub.token("HOSP1", Role::Modality);
    let post = |len: usize| {
        format!(
            "POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: multipart/related; type=\"application/dicom\"; boundary=B\r\n\
             Content-Length: {len}\r\n\r\n"
        )
    };
    let answer = |mut s: tokio::net::TcpStream| async move {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(20), s.read(&mut buf))
            .await
            .expect("an answer before the client sends the rest")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    // 10 MiB of preamble (of 20 announced): refused without the rest. The
    // client writes on while the answer is read (the server stops reading).
    let s = tokio::net::TcpStream::connect(hub.running.http_addr)
        .await
        .unwrap();
    let (mut rd, mut wr) = s.into_split();
    let head = post(20 << 20);
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(head.as_bytes()).await;
        let _ = wr.write_all(&vec![b'x'; 10 << 20]).await;
        wr
    });
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(20), rd.read(&mut buf))
        .await
        .expect("an answer before the client sends the rest")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    writer.abort();
    // A pause: refused after the timeout.
    let mut s = tokio::net::TcpStream::connect(hub.running.http_addr)
        .await
        .unwrap();
    s.write_all(post(1000).as_bytes()).await.unwrap();
    s.write_all(b"--B\r\nContent-Type: application/dicom\r\n\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let text = answer(s).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
}

/// STOW-RS requests beyond `dicomweb.stow_max_concurrent` are 503 with
/// Retry-After and a problem body; once the running one ends, stores go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stow_rs_beyond_the_concurrency_limit_is_told_to_retry() {
    let Some(hub) = TestHub::start_with(common::Backend::Local, |c| {
        c.dicomweb.stow_max_concurrent = 1;
    })
    .await
    else {
        return;
    };
    let Some(ct) = testfile(CT) else { return };
    let ct = std::fs::read(ct).unwrap();
    let ct_type = "multipart/related; type=\"application/dicom\"; boundary=b";
    // The first upload sends its first part's header and waits.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    tx.send(Ok(
        b"--b\r\nContent-Type: application/dicom\r\n\r\n".to_vec()
    ))
    .await
    .unwrap();
    let slow = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    let url = format!("{}/studies", hub.dicomweb());
    let token = hub.token("HOSP2", Role::Modality);
    let first = tokio::spawn({
        let (url, token) = (url.clone(), token.clone());
        async move {
            client()
                .post(url)
                .bearer_auth(token)
                .header(CONTENT_TYPE, ct_type)
                .header(ACCEPT, "application/dicom+json")
                .body(reqwest::Body::wrap_stream(slow))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    // Once the first holds the one place, a second is refused.
    for _ in 0..500 {
        if hub.hub.stow_slots.available_permits() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        hub.hub.stow_slots.available_permits(),
        0,
        "the first upload runs"
    );
    let refused = client()
        .post(&url)
        .bearer_auth(&token)
        .header(CONTENT_TYPE, ct_type)
        .header(ACCEPT, "application/dicom+json")
        .body(multipart("b", &[("application/dicom", &ct)]))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "5");
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["status"], 503);
    assert!(problem["detail"].as_str().unwrap().contains("retry"));
    // The first upload finishes; then stores are taken again.
    let mut rest = ct.clone();
    rest.extend_from_slice(b"\r\n--b--\r\n");
    tx.send(Ok(rest)).await.unwrap();
    drop(tx);
    assert_eq!(first.await.unwrap(), 200);
    let (status, _) = stow(
        &hub,
        Role::Modality,
        "/studies",
        ct_type,
        multipart("b", &[("application/dicom", &ct)]),
    )
    .await;
    assert_eq!(status, 200);
}
