//! The visibility rule against a plain reference model: random sequences
//! of links (new and joined), unlinks, disclosures (some expiring),
//! revocations and clock moves, then every QIDO and WADO answer of every
//! institution compared with what the model says it may see — results,
//! counts, pages, presented patient IDs, metadata, 404s and join refusals.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use reqwest::Method;
use serde_json::{Value, json};

use crate::common::{self, Backend, TestHub};
use crate::consent::{Study, admin, admin_delete, get, make_study, qido, studies_of};

const INSTITUTIONS: usize = 3;
const PATIENTS: usize = 2;

type Patient = (usize, usize);

/// Checks that saw another institution's patient: the property is not
/// vacuous only if some cases share.
static SHARED_VIEWS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn code(i: usize) -> String {
    format!("HOSP{}", i + 1)
}

fn pid((i, k): Patient) -> String {
    format!("P{}{}", i + 1, ['a', 'b'][k])
}

#[derive(Debug, Clone)]
enum Op {
    Link {
        who: Patient,
        join: Option<Patient>,
    },
    Unlink {
        who: Patient,
    },
    Disclose {
        who: Patient,
        to: usize,
        expires_in_hours: Option<u8>,
    },
    Revoke {
        nth: usize,
    },
    Advance {
        hours: u8,
    },
}

fn patient() -> impl Strategy<Value = Patient> {
    (0..INSTITUTIONS, 0..PATIENTS)
}

/// The steps of the referral of DESIGN §1: the owner links and discloses
/// to the viewer's institution, which joins with the owner's ID.
fn share() -> impl Strategy<Value = Vec<Op>> {
    (patient(), patient(), proptest::option::of(1u8..48)).prop_map(
        |(owner, viewer, expires_in_hours)| {
            vec![
                Op::Link {
                    who: owner,
                    join: None,
                },
                Op::Disclose {
                    who: owner,
                    to: viewer.0,
                    expires_in_hours,
                },
                Op::Link {
                    who: viewer,
                    join: Some(owner),
                },
            ]
        },
    )
}

/// Random single steps and referrals, as one sequence.
fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(
        prop_oneof![1 => op().prop_map(|o| vec![o]), 1 => share()],
        1..10,
    )
    .prop_map(|v| v.into_iter().flatten().collect())
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (patient(), proptest::option::of(patient())).prop_map(|(who, join)| Op::Link { who, join }),
        1 => patient().prop_map(|who| Op::Unlink { who }),
        3 => (patient(), 0..INSTITUTIONS, proptest::option::of(1u8..48))
            .prop_map(|(who, to, expires_in_hours)| Op::Disclose { who, to, expires_in_hours }),
        1 => (0usize..8).prop_map(|nth| Op::Revoke { nth }),
        1 => (1u8..30).prop_map(|hours| Op::Advance { hours }),
    ]
}

#[derive(Debug)]
struct Disclosure {
    id: String,
    record: u32,
    from: usize,
    to: usize,
    expires_at: Option<i64>,
    revoked: bool,
}

/// The rule of DESIGN §2, as plainly as it can be said.
#[derive(Debug, Default)]
struct Model {
    next_record: u32,
    links: BTreeMap<Patient, u32>,
    disclosures: Vec<Disclosure>,
    /// Hours since the start.
    now: i64,
}

impl Model {
    fn active(&self, d: &Disclosure) -> bool {
        !d.revoked && d.expires_at.is_none_or(|e| e > self.now)
    }

    fn links_record(&self, inst: usize, record: u32) -> bool {
        self.links.iter().any(|(p, r)| p.0 == inst && *r == record)
    }

    fn visible(&self, viewer: usize, p: Patient) -> bool {
        if p.0 == viewer {
            return true;
        }
        let Some(&r) = self.links.get(&p) else {
            return false;
        };
        self.links_record(viewer, r)
            && self
                .disclosures
                .iter()
                .any(|d| d.record == r && d.from == p.0 && d.to == viewer && self.active(d))
    }

    /// The patient ID `viewer` sees for another institution's patient.
    fn presented(&self, viewer: usize, p: Patient) -> String {
        let r = self.links[&p];
        self.links
            .iter()
            .filter(|(q, rr)| q.0 == viewer && **rr == r)
            .map(|(q, _)| pid(*q))
            .min()
            .unwrap()
    }
}

fn all_patients() -> Vec<Patient> {
    (0..INSTITUTIONS)
        .flat_map(|i| (0..PATIENTS).map(move |k| (i, k)))
        .collect()
}

/// Apply `op` through the API and to the model; the API's status must be
/// the model's.
async fn apply(hub: &TestHub, m: &mut Model, op: &Op, start: chrono::DateTime<chrono::Utc>) {
    let now = start + chrono::Duration::hours(m.now);
    match op {
        Op::Link { who, join } => {
            let expected = if m.links.contains_key(who) {
                409
            } else if let Some(j) = join {
                let ok = j.0 != who.0
                    && m.links.get(j).is_some_and(|&r| {
                        m.disclosures
                            .iter()
                            .any(|d| d.record == r && d.from == j.0 && d.to == who.0 && m.active(d))
                    });
                if ok { 201 } else { 404 }
            } else {
                201
            };
            let body = match join {
                Some(j) => {
                    json!({"patient_id": pid(*who), "join": {"institution": code(j.0), "patient_id": pid(*j)}})
                }
                None => json!({"patient_id": pid(*who)}),
            };
            let (st, b) = admin(hub, &code(who.0), Method::POST, "/links", Some(body)).await;
            assert_eq!(st.as_u16(), expected, "{op:?}: {b}");
            if expected == 201 {
                let r = match join {
                    Some(j) => m.links[j],
                    None => {
                        m.next_record += 1;
                        m.next_record
                    }
                };
                m.links.insert(*who, r);
            }
        }
        Op::Unlink { who } => {
            let (st, b) = admin(
                hub,
                &code(who.0),
                Method::DELETE,
                &format!("/links/{}", pid(*who)),
                None,
            )
            .await;
            match m.links.remove(who) {
                None => assert_eq!(st, 404, "{op:?}: {b}"),
                Some(r) => {
                    assert_eq!(st, 200, "{op:?}: {b}");
                    if !m.links_record(who.0, r) {
                        for d in m
                            .disclosures
                            .iter_mut()
                            .filter(|d| d.record == r && d.from == who.0)
                        {
                            d.revoked = true;
                        }
                    }
                }
            }
        }
        Op::Disclose {
            who,
            to,
            expires_in_hours,
        } => {
            let mut body = json!({
                "patient_id": pid(*who), "to_institution": code(*to),
                "consent_reference": "consent", "consented_at": (now - chrono::Duration::minutes(1)).to_rfc3339(),
            });
            if let Some(h) = expires_in_hours {
                body["expires_at"] =
                    json!((now + chrono::Duration::hours(i64::from(*h))).to_rfc3339());
            }
            let (st, b) = admin(hub, &code(who.0), Method::POST, "/disclosures", Some(body)).await;
            if *to == who.0 {
                assert_eq!(st, 400, "{op:?}: {b}");
            } else if let Some(&r) = m.links.get(who) {
                assert_eq!(st, 201, "{op:?}: {b}");
                m.disclosures.push(Disclosure {
                    id: b["id"].as_str().unwrap().to_string(),
                    record: r,
                    from: who.0,
                    to: *to,
                    expires_at: expires_in_hours.map(|h| m.now + i64::from(h)),
                    revoked: false,
                });
            } else {
                assert_eq!(st, 404, "{op:?}: {b}");
            }
        }
        Op::Revoke { nth } => {
            if m.disclosures.is_empty() {
                return;
            }
            let n = nth % m.disclosures.len();
            let (id, from, revoked) = {
                let d = &m.disclosures[n];
                (d.id.clone(), d.from, d.revoked)
            };
            let stranger = (from + 1) % INSTITUTIONS;
            let (st, _) = admin_delete(hub, &code(stranger), &format!("/disclosures/{id}")).await;
            assert_eq!(st, 404, "only the discloser revokes");
            let (st, b) = admin_delete(hub, &code(from), &format!("/disclosures/{id}")).await;
            assert_eq!(st.as_u16(), if revoked { 409 } else { 200 }, "{op:?}: {b}");
            m.disclosures[n].revoked = true;
        }
        Op::Advance { hours } => {
            m.now += i64::from(*hours);
            hub.hub
                .clock
                .set(Some(start + chrono::Duration::hours(m.now)));
        }
    }
}

/// Every answer of every institution against the model.
async fn check(hub: &TestHub, m: &Model, studies: &BTreeMap<Patient, Study>) {
    let study_of = |p: &Patient| studies[p].study.clone();
    for viewer in 0..INSTITUTIONS {
        let inst = code(viewer);
        let visible: Vec<Patient> = all_patients()
            .into_iter()
            .filter(|p| m.visible(viewer, *p))
            .collect();
        let expected: BTreeSet<String> = visible.iter().map(study_of).collect();
        if visible.iter().any(|p| p.0 != viewer) {
            SHARED_VIEWS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let (all, warnings) = qido(hub, &inst, "studies").await;
        let listed: BTreeSet<String> = studies_of(&all).into_iter().collect();
        assert_eq!(listed, expected, "{inst} studies; {m:?}");
        assert!(warnings.is_empty());
        assert_eq!(qido(hub, &inst, "instances").await.0.len(), expected.len());
        // Searches that walk the access rows alone (date, modality, a
        // patient's name with a wildcard: every study here has one name) agree.
        let first = all.first();
        let date = first
            .and_then(|i| i["00080020"]["Value"][0].as_str())
            .map(str::to_string);
        if let Some(date) = date {
            let name: String = first.unwrap()["00100010"]["Value"][0]["Alphabetic"]
                .as_str()
                .expect("a patient name")
                .chars()
                .take(3)
                .collect();
            for q in [
                format!("studies?StudyDate={date}"),
                format!("studies?StudyDate={date}-&ModalitiesInStudy=CT"),
                format!("studies?PatientName={name}*"),
                format!("studies?PatientName={name}*&StudyDate={date}"),
            ] {
                let (found, _) = qido(hub, &inst, &q).await;
                let found: BTreeSet<String> = studies_of(&found).into_iter().collect();
                assert_eq!(found, expected, "{inst} {q}");
            }
        }
        // Pages of one: the same list, the right counts.
        let order: Vec<String> = all
            .iter()
            .map(|i| i["0020000D"]["Value"][0].as_str().unwrap().to_string())
            .collect();
        for (offset, uid) in order.iter().enumerate() {
            let (page, warnings) =
                qido(hub, &inst, &format!("studies?limit=1&offset={offset}")).await;
            assert_eq!(studies_of(&page), vec![uid.clone()]);
            let rest = order.len() - offset - 1;
            if rest > 0 {
                assert!(
                    warnings
                        .iter()
                        .any(|w| w.contains(&format!("There are {rest} additional"))),
                    "{inst} offset {offset}: {warnings:?}"
                );
            } else {
                assert!(warnings.is_empty(), "{warnings:?}");
            }
        }
        // Identifiers shown, metadata and 404s, for every study there is.
        for p in all_patients() {
            let uid = study_of(&p);
            let (st, body) = get(
                hub,
                &inst,
                &format!("/dicom-web/studies/{uid}/metadata"),
                "application/dicom+json",
            )
            .await;
            // Its thumbnail agrees.
            let (thumb, _) = get(
                hub,
                &inst,
                &format!("/dicom-web/studies/{uid}/thumbnail"),
                "image/jpeg",
            )
            .await;
            // Every other way to it agrees; hidden, each answers exactly as
            // for a study that does not exist.
            let s = &studies[&p];
            let instance = format!(
                "/dicom-web/studies/{uid}/series/{}/instances/{}",
                s.series, s.sop
            );
            let visible = m.visible(viewer, p);
            for path in [
                format!("/dicom-web/studies/{uid}"),
                format!("/dicom-web/studies/{uid}/series/{}/metadata", s.series),
                format!("{instance}/metadata"),
                format!("{instance}/frames/1"),
                format!("{instance}/rendered"),
                format!(
                    "/wado?requestType=WADO&studyUID={uid}&seriesUID={}&objectUID={}",
                    s.series, s.sop
                ),
            ] {
                let (status, answer) = get(hub, &inst, &path, "*/*").await;
                if visible {
                    assert_eq!(status, 200, "{inst} {path}");
                    continue;
                }
                let unknown = path.replace(&uid, "2.25.999");
                let (absent_status, absent) = get(hub, &inst, &unknown, "*/*").await;
                assert_eq!(status, 404, "{inst} {path}; {m:?}");
                assert_eq!(absent_status, 404, "{inst} {unknown}");
                assert_eq!(answer, absent, "{inst} {path}: hidden and absent alike");
            }
            let (series, _) = qido(hub, &inst, &format!("studies/{uid}/series")).await;
            assert_eq!(series.len(), usize::from(visible), "{inst} {uid} series");
            if !visible {
                assert_eq!(st, 404, "{inst} sees {p:?}; {m:?}");
                assert_eq!(thumb, 404, "{inst} sees {p:?}'s thumbnail; {m:?}");
                assert!(!String::from_utf8_lossy(&body).contains(&pid(p)));
                continue;
            }
            assert_eq!(st, 200);
            assert_eq!(thumb, 200, "{inst} {p:?} thumbnail");
            let meta: Value = serde_json::from_slice(&body).unwrap();
            let shown = if p.0 == viewer {
                pid(p)
            } else {
                m.presented(viewer, p)
            };
            assert_eq!(
                meta[0]["00100020"]["Value"][0],
                shown.as_str(),
                "{inst} {p:?}"
            );
            let item = all
                .iter()
                .find(|i| i["0020000D"]["Value"][0] == uid.as_str())
                .unwrap();
            assert_eq!(item["00100020"]["Value"][0], shown.as_str());
        }
        // A search by an own patient ID finds that patient's linked,
        // disclosed studies elsewhere, all under the searched ID.
        for k in 0..PATIENTS {
            let own = (viewer, k);
            let mut want: BTreeSet<String> = [study_of(&own)].into();
            if let Some(r) = m.links.get(&own) {
                for p in visible
                    .iter()
                    .filter(|p| p.0 != viewer && m.links.get(p) == Some(r))
                {
                    want.insert(study_of(p));
                }
            }
            let (found, _) = qido(hub, &inst, &format!("studies?PatientID={}", pid(own))).await;
            assert_eq!(
                studies_of(&found).into_iter().collect::<BTreeSet<_>>(),
                want,
                "{inst} by {}",
                pid(own)
            );
            for item in &found {
                assert_eq!(item["00100020"]["Value"][0], pid(own).as_str());
            }
        }
    }
}

async fn run_case(backend: Backend, ops: &[Op], files: &BTreeMap<Patient, Study>) {
    let Some(hub) = TestHub::start(backend).await else {
        return;
    };
    // Half the studies arrive before the links and disclosures, half after
    // (the index writer derives their access from the records then).
    for (p, s) in files.iter().filter(|(p, _)| p.1 == 0) {
        hub.import(&code(p.0), vec![s.file.clone()]).await;
    }
    let start = chrono::Utc::now();
    hub.hub.clock.set(Some(start));
    let mut m = Model::default();
    for op in ops {
        apply(&hub, &mut m, op, start).await;
    }
    for (p, s) in files.iter().filter(|(p, _)| p.1 == 1) {
        hub.import(&code(p.0), vec![s.file.clone()]).await;
    }
    check(&hub, &m, files).await;
}

fn property(backend: Backend, cases: u32) {
    let dir = tempfile::tempdir().unwrap();
    let mut files = BTreeMap::new();
    for p in all_patients() {
        let Some(s) = make_study(
            dir.path(),
            "ct16_explicit_le.dcm",
            &pid(p),
            500 + (p.0 * PATIENTS + p.1) as u32,
        ) else {
            return;
        };
        files.insert(p, s);
    }
    if backend == Backend::Postgres && std::env::var("TSUNAGU_TEST_POSTGRES_URL").is_err() {
        common::skip("PostgreSQL: TSUNAGU_TEST_POSTGRES_URL not set (scripts/test starts one)");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let before = SHARED_VIEWS.load(std::sync::atomic::Ordering::Relaxed);
    proptest!(config, |(ops in ops())| {
        rt.block_on(run_case(backend, &ops, &files));
    });
    assert!(
        SHARED_VIEWS.load(std::sync::atomic::Ordering::Relaxed) > before,
        "no generated case shared anything"
    );
}

#[test]
fn visibility_equals_the_model_on_sqlite() {
    property(Backend::Local, 40);
}

#[test]
fn visibility_equals_the_model_on_postgres() {
    property(Backend::Postgres, 8);
}
