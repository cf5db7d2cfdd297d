//! Verification and Storage SCP against real peers: DCMTK and pynetdicom.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::{self, Backend, TestHub};

/// Push the whole corpus: DCMTK for every transfer syntax it can propose,
/// pynetdicom (file bytes as they are) for the rest (.57, HTJ2K, video).
/// Returns false (after a skip message) when a peer is missing.
/// Everything goes through a wire tap; returns the data sets as sent.
pub async fn push_corpus(hub: &TestHub, calling: &str) -> Option<Vec<Vec<u8>>> {
    let tap = common::wiretap::WireTap::start(hub.running.dicom_addr).await;
    let port = tap.port;
    let corpus = common::corpus()?;
    let python = common::python_with("pynetdicom")?;
    common::dcmtk("storescu")?;
    let mut by_flag: BTreeMap<&str, Vec<PathBuf>> = BTreeMap::new();
    let mut rest = Vec::new();
    for (path, m) in &corpus {
        match common::storescu_flag(&m.transfer_syntax_uid) {
            Some(flag) => by_flag.entry(flag).or_default().push(path.clone()),
            None => rest.push(path.clone()),
        }
    }
    for (flag, files) in &by_flag {
        let (ok, log) = {
            let (flag, files, calling) = (flag.to_string(), files.clone(), calling.to_string());
            tokio::task::spawn_blocking(move || common::storescu(port, &calling, &flag, &files))
                .await
                .unwrap()
        };
        assert!(ok, "storescu {flag} failed:\n{log}");
        assert!(
            !log.contains("unable to convert"),
            "storescu converted with {flag}:\n{log}"
        );
        assert_eq!(
            log.matches("Received Store Response (Success)").count(),
            files.len(),
            "storescu {flag}:\n{log}"
        );
    }
    let results = {
        let calling = calling.to_string();
        tokio::task::spawn_blocking(move || common::pynetdicom_push(&python, port, &calling, &rest))
            .await
            .unwrap()
    };
    for r in results {
        assert_eq!(
            r.accepted,
            Some(true),
            "context not accepted for {:?}",
            r.file
        );
        assert_eq!(r.status, Some(0), "pynetdicom store of {:?}", r.file);
    }
    Some(tap.datasets())
}

fn sha(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// Every corpus file is indexed for `institution`, in its own transfer
/// syntax, with data set bytes identical to those sent on the wire.
pub async fn assert_corpus_stored_exactly(hub: &TestHub, institution: &str, wire: &[Vec<u8>]) {
    let sent: std::collections::HashSet<String> = wire.iter().map(|d| sha(d)).collect();
    let corpus = common::corpus().expect("checked by push_corpus");
    for (path, m) in &corpus {
        let sop = common::sop_instance_uid(path);
        let (key, stored) = hub
            .stored(institution, &sop)
            .await
            .unwrap_or_else(|| panic!("{} not stored", m.file));
        assert!(
            sent.contains(&sha(common::dataset_bytes(&stored))),
            "{}: stored data set is not one of the data sets sent on the wire",
            m.file
        );
        let (meta, _) = tsunagu::dicom::part10::read_meta(&stored[..]).unwrap();
        assert_eq!(
            meta.transfer_syntax, m.transfer_syntax_uid,
            "{}: sender converted",
            m.file
        );
        assert_eq!(meta.sop_class_uid, m.sop_class_uid, "{}", m.file);
        assert!(
            key.starts_with(&format!("instances/{institution}/")),
            "{key}"
        );
    }
    assert_eq!(
        hub.hub.index.count_instances().await.unwrap(),
        corpus.len() as i64
    );
}

pub async fn corpus_round_trip(backend: Backend) {
    let Some(hub) = TestHub::start(backend).await else {
        return;
    };
    let Some(wire) = push_corpus(&hub, "HOSP1").await else {
        return;
    };
    assert_eq!(
        wire.len(),
        common::corpus().unwrap().len(),
        "one data set per file crossed the wire"
    );
    assert_corpus_stored_exactly(&hub, "HOSP1", &wire).await;
    assert_japanese_indexed(&hub).await;
}

async fn assert_japanese_indexed(hub: &TestHub) {
    let names =
        |id: &'static str| async move { hub.hub.index.patient_names("HOSP1", id).await.unwrap() };
    let s = |x: &str| Some(x.to_string());
    assert_eq!(
        names("TSNG-JP-0001").await,
        vec![[s("ﾔﾏﾀﾞ^ﾀﾛｳ"), s("山田^太郎"), s("やまだ^たろう")]],
        "ISO 2022 IR 13\\ISO 2022 IR 87"
    );
    assert_eq!(
        names("TSNG-JP-0003").await,
        vec![[s("Mori^Ogai"), s("森^鷗外"), s("もり^おうがい")]],
        "\\ISO 2022 IR 87\\ISO 2022 IR 159"
    );
    assert_eq!(
        names("TSNG-JP-0002").await,
        vec![[s("ﾔﾏﾀﾞ^ﾀﾛｳ"), s("山田^太郎"), s("やまだ^たろう")]],
        "ISO_IR 192"
    );
    for id in ["TSNG-JP-0001", "TSNG-JP-0002", "TSNG-JP-0003"] {
        assert_eq!(
            hub.hub.index.study_descriptions("HOSP1", id).await.unwrap(),
            vec!["胸部検査".to_string()],
            "{id}"
        );
    }
}

crate::on_backends!(corpus_round_trip:
    corpus_is_stored_byte_exact_local_sqlite => Backend::Local,
    corpus_is_stored_byte_exact_s3 => Backend::S3,
    corpus_is_stored_byte_exact_postgres => Backend::Postgres,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn echo_with_dcmtk_and_pynetdicom() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    assert!(hub.echo("HOSP2"), "echoscu");
    let Some(python) = common::python_with("pynetdicom") else {
        return;
    };
    let script = format!(
        "from pynetdicom import AE\nae=AE(ae_title='HOSP3')\nae.add_requested_context('1.2.840.10008.1.1')\n\
         a=ae.associate('127.0.0.1',{},ae_title='TSUNAGU')\nassert a.is_established\ns=a.send_c_echo()\n\
         a.release()\nprint(int(s.Status))",
        hub.port()
    );
    let out = std::process::Command::new(python)
        .args(["-c", &script])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{out:?}");
}

/// A-ASSOCIATE-RJ with the exact result, source and reason of PS3.8 §9.3.4.
/// An association of HOSP1 to the hub on `port` for Verification, which
/// must be accepted.
async fn verification_association(
    port: u16,
) -> dicom_ul::association::client::AsyncClientAssociation<tokio::net::TcpStream> {
    dicom_ul::ClientAssociationOptions::new()
        .calling_ae_title("HOSP1")
        .called_ae_title("TSUNAGU")
        .with_abstract_syntax("1.2.840.10008.1.1")
        .establish_async(("127.0.0.1", port))
        .await
        .expect("an association")
}

async fn rejection(port: u16, calling: &str, called: &str) -> String {
    let r = dicom_ul::ClientAssociationOptions::new()
        .calling_ae_title(calling)
        .called_ae_title(called)
        .with_abstract_syntax("1.2.840.10008.1.1")
        .establish_async(("127.0.0.1", port))
        .await;
    match r {
        Ok(_) => "accepted".into(),
        Err(dicom_ul::association::Error::Rejected { association_rj, .. }) => {
            format!("{:?} {:?}", association_rj.result, association_rj.source)
        }
        Err(e) => format!("error {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_calling_and_wrong_called_ae_are_rejected() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    assert_eq!(
        rejection(hub.port(), "STRANGER", "TSUNAGU").await,
        "Permanent ServiceUser(CallingAETitleNotRecognized)"
    );
    assert_eq!(
        rejection(hub.port(), "HOSP1", "SOMEONE").await,
        "Permanent ServiceUser(CalledAETitleNotRecognized)"
    );
    assert_eq!(
        rejection(hub.port(), "HOSP1_B", "TSUNAGU").await,
        "accepted"
    );
    // And with DCMTK, which must report the same.
    if let Some(echoscu) = common::dcmtk("echoscu") {
        let out = std::process::Command::new(echoscu)
            .args(common::hub_peer("STRANGER", hub.port()))
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("Calling AE Title Not Recognized"));
    }
    // Each refusal is an authentication failure in the audit trail, under
    // the AE title claimed (and its institution, when that is known).
    hub.hub.audit.flush().await;
    let trail = tsunagu::audit::trail::read_range(hub.hub.index.pool(), 1, 1000)
        .await
        .unwrap();
    let refused: Vec<(String, String, String)> = trail
        .iter()
        .filter(|s| s.event.action == tsunagu::audit::Action::AuthenticateNode)
        .map(|s| {
            (
                s.event.user.clone(),
                s.event.institution.clone(),
                s.event.detail["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    assert!(
        refused.contains(&(
            "STRANGER".into(),
            String::new(),
            "calling AE title not recognized".into()
        )),
        "{refused:?}"
    );
    assert!(
        refused.contains(&(
            "HOSP1".into(),
            "HOSP1".into(),
            "called AE title not recognized".into()
        )),
        "{refused:?}"
    );
    assert!(
        trail
            .iter()
            .all(|s| s.event.outcome != tsunagu::audit::Outcome::Success
                || s.event.action != tsunagu::audit::Action::AuthenticateNode)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_associations_all_succeed() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let Some(corpus) = common::corpus() else {
        return;
    };
    if common::dcmtk("storescu").is_none() {
        return;
    }
    let uncompressed: Vec<PathBuf> = corpus
        .iter()
        .filter(|(_, m)| m.transfer_syntax_uid == "1.2.840.10008.1.2.1")
        .map(|(p, _)| p.clone())
        .collect();
    // 64 storescu processes, each its own association, started together.
    let files: Vec<PathBuf> = (0..64)
        .map(|i| uncompressed[i % uncompressed.len()].clone())
        .collect();
    let failures: Vec<String> = each_at_once(&hub, "HOSP2", &files)
        .into_iter()
        .filter(|o| !o.status.success() || !o.stderr.is_empty())
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of 64 failed: {:?}",
        failures.len(),
        failures.first()
    );
    assert_eq!(
        hub.hub.index.count_instances().await.unwrap(),
        uncompressed.len() as i64
    );
    for p in &uncompressed {
        let (_, stored) = hub
            .stored("HOSP2", &common::sop_instance_uid(p))
            .await
            .unwrap();
        assert_eq!(
            sha(common::dataset_bytes(&stored)),
            sha(common::dataset_bytes(&std::fs::read(p).unwrap()))
        );
    }
    // And 64 held open at the same time: each is established before any
    // sends or ends (a server taking them one after another could not).
    let Some(python) = common::python_with("pynetdicom") else {
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/hold.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .args([
            "127.0.0.1",
            &hub.port().to_string(),
            "HOSP2",
            "TSUNAGU",
            "64",
        ])
        .arg(&uncompressed[0])
        .output()
        .unwrap();
    let held: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(held["established"], 64, "{held}");
    assert_eq!(held["statuses"], serde_json::json!(vec![0; 64]), "{held}");
    // The slots come free as the server closes each released association.
    assert!((0..50).any(|_| hub.echo("HOSP2") || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        false
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_follow_the_documented_policy() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let Some(dir) = common::testdata_dir() else {
        return;
    };
    let file = dir.join("files/ct16_explicit_le.dcm");
    let sop = common::sop_instance_uid(&file);
    let (first_key, new_key) = resends_follow_the_policy(&hub, &file).await;

    // A deletion a stop cut off: the copy is still listed, and the next
    // start deletes it, unless a row names it again.
    std::fs::write(
        hub.dir.path().join("store").join(&first_key),
        std::fs::read(&file).unwrap(),
    )
    .unwrap();
    for key in [&first_key, &new_key] {
        sqlx::query(
            "INSERT INTO superseded_object VALUES ($1, 'HOSP1', $2, '2000-01-01T00:00:00.000Z')",
        )
        .bind(key)
        .bind(&sop)
        .execute(hub.hub.index.pool())
        .await
        .unwrap();
    }
    assert_eq!(count_objects(&hub).await, 3);
    let sweep = || {
        hub.hub
            .ingest
            .sweep_superseded(tsunagu::ingest::SUPERSEDED_SWEEP_AGE)
    };
    assert_eq!(sweep().await, 1);
    assert!(hub.hub.store.get_bytes(&first_key).await.is_err());
    assert!(
        hub.hub.store.get_bytes(&new_key).await.is_ok(),
        "named: kept"
    );
    assert!(nothing_listed(&hub).await, "no superseded copy listed");
    assert_eq!(count_objects(&hub).await, 2);
}

// Two versions of one instance stored at once: whichever commits last is
// current, and the copy it superseded is deleted, even when both looked up
// the same predecessor before either was written.
crate::on_backends!(concurrent_versions_leave_one_copy:
    concurrent_versions_leave_one_copy_on_sqlite => Backend::Local,
    concurrent_versions_leave_one_copy_on_postgres => Backend::Postgres,
);

async fn concurrent_versions_leave_one_copy(backend: Backend) {
    let Some(hub) = TestHub::start(backend).await else {
        return;
    };
    let Some((sop, version)) = versions(&hub) else {
        return;
    };
    for round in 0..6 {
        store_at_once(&hub, &[version(2 * round), version(2 * round + 1)], round);
        let (key, _) = hub.stored("HOSP1", &sop).await.unwrap();
        assert_eq!(
            settled_count(&hub, 1).await,
            1,
            "round {round}: superseded copies left"
        );
        assert!(hub.dir.path().join("store").join(&key).exists());
    }
}

/// A resend of the bytes of a copy being superseded, stored at once with
/// the version superseding it (A, B, A): the indexed copy is never the one
/// deleted, whatever the order the three commit in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resend_beside_its_replacement_keeps_the_indexed_copy() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let Some((sop, version)) = versions(&hub) else {
        return;
    };
    for round in 0..30 {
        let (a, b) = (version(2 * round), version(2 * round + 1));
        store_at_once(&hub, &[a.clone(), b, a], round);
        let left = settled_count(&hub, 1).await;
        let (key, _) = hub.stored("HOSP1", &sop).await.unwrap();
        assert_eq!(left, 1, "round {round}: copies besides the indexed {key}");
        assert!(
            hub.dir.path().join("store").join(&key).exists(),
            "round {round}: the indexed copy {key} was deleted"
        );
    }
}

/// The CT test file stored by HOSP1, its SOP Instance UID, and a maker of
/// its versions (the same UIDs, study description changed by `n`).
fn versions(hub: &TestHub) -> Option<(String, impl Fn(usize) -> PathBuf + '_)> {
    let file = common::testdata_dir()?.join("files/ct16_explicit_le.dcm");
    let sop = common::sop_instance_uid(&file);
    let original = std::fs::read(&file).unwrap();
    let marker = b"CT 16-bit with transfer syntax variants";
    let at = original
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("study description present");
    let (ok, log) = common::storescu(hub.port(), "HOSP1", "-xe", std::slice::from_ref(&file));
    assert!(ok && log.contains("Success"), "{log}");
    let version = move |n: usize| {
        let mut bytes = original.clone();
        bytes[at..at + 2].copy_from_slice(format!("{n:02}").as_bytes());
        let path = hub.dir.path().join(format!("v{n}.dcm"));
        std::fs::write(&path, bytes).unwrap();
        path
    };
    Some((sop, version))
}

/// Store `files` as `calling`, each on an association (a storescu process)
/// of its own, all started together; their outputs.
fn each_at_once(hub: &TestHub, calling: &str, files: &[PathBuf]) -> Vec<std::process::Output> {
    let children: Vec<_> = files
        .iter()
        .map(|p| {
            common::storescu_command(hub.port(), calling, &["-xe"], std::slice::from_ref(p))
                .unwrap()
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

/// Store `files` as HOSP1 at once (`each_at_once`); every store succeeds.
fn store_at_once(hub: &TestHub, files: &[PathBuf], round: usize) {
    for out in each_at_once(hub, "HOSP1", files) {
        assert!(
            out.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every Storage SOP class of the dictionary is accepted and stored (the
/// corpus has one file for a few dozen): a small object under each class's
/// UID, proposed by pynetdicom in its own presentation context. The list is
/// generated from dicom-rs's dictionary; pynetdicom's own registry of
/// Storage classes (current ones only) checks that it misses none.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_storage_sop_class_is_stored() {
    use dicom_core::{DataElement, VR};
    use dicom_dictionary_std::tags;
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let Some(dir) = common::testdata_dir() else {
        return;
    };
    let Some(python) = common::python_with("pynetdicom") else {
        return;
    };
    let template = dicom_object::open_file(dir.join("files/sr_basic_text.dcm")).unwrap();
    let classes = tsunagu::dicom::storage_classes::STORAGE_SOP_CLASSES;
    let registry = common::run_ok(std::process::Command::new(&python).args([
        "-c",
        "from pynetdicom.sop_class import _STORAGE_CLASSES as c; print('\\n'.join(c.values()))",
    ]));
    let registry = String::from_utf8(registry).unwrap();
    assert!(registry.lines().count() > 100, "{registry}");
    for uid in registry.lines() {
        assert!(
            classes.iter().any(|(c, _)| c == &uid),
            "pynetdicom's Storage class {uid} is not accepted"
        );
    }
    let files: Vec<PathBuf> = classes
        .iter()
        .enumerate()
        .map(|(n, (class, _))| {
            let mut obj = template.clone();
            let sop = format!("2.25.5150{n}");
            obj.put(DataElement::new(tags::SOP_CLASS_UID, VR::UI, *class));
            obj.put(DataElement::new(
                tags::SOP_INSTANCE_UID,
                VR::UI,
                sop.as_str(),
            ));
            obj.meta_mut().media_storage_sop_class_uid = class.to_string();
            obj.meta_mut().media_storage_sop_instance_uid = sop;
            obj.meta_mut().update_information_group_length();
            let path = hub.dir.path().join(format!("class-{n}.dcm"));
            obj.write_to_file(&path).unwrap();
            path
        })
        .collect();
    let port = hub.port();
    let results = tokio::task::spawn_blocking(move || {
        files
            .chunks(100)
            .flat_map(|chunk| common::pynetdicom_push(&python, port, "HOSP1", chunk))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(results.len(), classes.len());
    for r in &results {
        assert_eq!(r.accepted, Some(true), "{:?} not accepted", r.file);
        assert_eq!(r.status, Some(0), "{:?}", r.file);
    }
    assert_eq!(
        hub.hub.index.count_instances().await.unwrap(),
        classes.len() as i64
    );
}

/// The duplicate policy on the S3 backend, whose identical resend is its
/// own path (the spool is dropped without an upload).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_follow_the_documented_policy_on_s3() {
    let Some(hub) = TestHub::start(Backend::S3).await else {
        return;
    };
    let Some(dir) = common::testdata_dir() else {
        return;
    };
    resends_follow_the_policy(&hub, &dir.join("files/ct16_explicit_le.dcm")).await;
    assert!(hub.echo("HOSP1"));
}

/// The duplicate policy, on any store: an identical resend adds no copy,
/// another institution's is its own, a changed resend replaces the copy and
/// the old one goes. The first and the replacing copy's keys.
async fn resends_follow_the_policy(hub: &TestHub, file: &PathBuf) -> (String, String) {
    let sop = common::sop_instance_uid(file);
    for _ in 0..2 {
        let (ok, log) = common::storescu(hub.port(), "HOSP1", "-xe", std::slice::from_ref(file));
        assert!(ok && log.contains("Success"), "{log}");
    }
    let (first_key, _) = hub.stored("HOSP1", &sop).await.unwrap();
    assert_eq!(
        count_objects(hub).await,
        1,
        "an identical resend adds no copy"
    );

    // Same SOP Instance UID from another institution: both kept, each its own.
    let (ok, log) = common::storescu(hub.port(), "HOSP2", "-xe", std::slice::from_ref(file));
    assert!(ok && log.contains("Success"), "{log}");
    assert!(hub.stored("HOSP2", &sop).await.is_some());
    assert_eq!(
        count_objects(hub).await,
        2,
        "another institution's is its own"
    );

    // Different bytes, same UIDs, same institution: the new copy replaces the
    // old one, which is deleted only after the new one is durable and indexed.
    let new_key = store_changed_copy(hub, file, &first_key).await;
    assert_eq!(settled_count(hub, 2).await, 2, "superseded copy removed");
    assert!(!stored_keys(hub).await.contains(&first_key));
    assert!(hub.hub.store.get_bytes(&first_key).await.is_err());
    assert!(nothing_listed(hub).await, "no superseded copy listed");
    (first_key, new_key)
}

/// Send `file` again as HOSP1's with one byte of its Study Description
/// changed: a new version of the instance, which must replace the copy at
/// `old_key`. Its key.
async fn store_changed_copy(hub: &TestHub, file: &Path, old_key: &str) -> String {
    let changed = hub.dir.path().join("changed.dcm");
    let mut bytes = std::fs::read(file).unwrap();
    let marker = b"CT 16-bit with transfer syntax variants";
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("study description present");
    bytes[at..at + 2].copy_from_slice(b"XX");
    std::fs::write(&changed, &bytes).unwrap();
    let (ok, log) = common::storescu(hub.port(), "HOSP1", "-xe", std::slice::from_ref(&changed));
    assert!(ok && log.contains("Success"), "{log}");
    let (new_key, stored) = hub
        .stored("HOSP1", &common::sop_instance_uid(file))
        .await
        .unwrap();
    assert_ne!(new_key, old_key);
    assert_eq!(
        sha(common::dataset_bytes(&stored)),
        sha(common::dataset_bytes(&bytes))
    );
    new_key
}

/// Whether no superseded copy is listed for deletion.
async fn nothing_listed(hub: &TestHub) -> bool {
    let all = "9999-12-31T23:59:59.999Z";
    hub.hub.index.superseded(all).await.unwrap().is_empty()
}

/// The number of stored objects once copies no row names (deleted in the
/// background) are gone: waits up to ten seconds for `want`.
async fn settled_count(hub: &TestHub, want: usize) -> usize {
    for _ in 0..100 {
        if count_objects(hub).await == want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    count_objects(hub).await
}

async fn count_objects(hub: &TestHub) -> usize {
    stored_keys(hub).await.len()
}

/// The keys of every object in the hub's store, whichever the backend.
async fn stored_keys(hub: &TestHub) -> Vec<String> {
    use futures::TryStreamExt;
    hub.hub
        .store
        .list_instances()
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn association_limit_rejects_transiently() {
    let Some(hub) = TestHub::start_with(Backend::Local, |c| c.server.max_associations = 1).await
    else {
        return;
    };
    let first = verification_association(hub.port()).await;
    assert_eq!(
        rejection(hub.port(), "HOSP1", "TSUNAGU").await,
        "Transient ServiceProviderPresentation(LocalLimitExceeded)"
    );
    first.release().await.unwrap();
    // The slot is free again once the first association is released.
    let mut accepted = false;
    for _ in 0..50 {
        if rejection(hub.port(), "HOSP1", "TSUNAGU").await == "accepted" {
            accepted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(accepted);
}

/// Nagle is off on the server's side of an association: without it every
/// C-STORE response waits for the sender's delayed ACK (~40 ms).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn associations_are_served_with_nagle_off() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let mut client = verification_association(hub.port()).await;
    let ours = client.inner_stream().local_addr().unwrap().port();
    // The hub runs in this process: its socket is the one whose peer is us.
    let server_side = socket_with_peer_port(ours).expect("the server's socket");
    let mut on: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `on`, a c_int.
    let r = unsafe {
        libc::getsockopt(
            server_side,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&raw mut on).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0);
    assert_eq!(on, 1, "TCP_NODELAY on the accepted socket");
    client.release().await.unwrap();
}

/// A descriptor of this process: the IPv4 TCP socket whose peer's port is `port`.
#[cfg(target_os = "linux")]
fn socket_with_peer_port(port: u16) -> Option<libc::c_int> {
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<libc::c_int>() else {
            continue;
        };
        // SAFETY: a zeroed sockaddr_in is a valid value; getpeername writes
        // at most `len` bytes into it (a descriptor that is not a socket, or
        // closed meanwhile, only fails).
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let r = unsafe { libc::getpeername(fd, (&raw mut addr).cast(), &mut len) };
        if r == 0
            && libc::c_int::from(addr.sin_family) == libc::AF_INET
            && u16::from_be(addr.sin_port) == port
        {
            return Some(fd);
        }
    }
    None
}

/// One sender address may hold only its share of the slots; another
/// address (another hospital's modality) still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_peer_cannot_take_every_slot() {
    let Some(hub) = TestHub::start_with(Backend::Local, |c| {
        c.server.max_associations = 4;
        c.server.max_associations_per_peer = Some(1);
    })
    .await
    else {
        return;
    };
    let Some(python) = common::python_with("pynetdicom") else {
        return;
    };
    if std::net::TcpListener::bind("127.0.0.2:0").is_err() {
        common::skip("127.0.0.2 is not a local address here (Linux's loopback has all of 127/8)");
        return;
    }
    let first = verification_association(hub.port()).await;
    assert_eq!(
        rejection(hub.port(), "HOSP1", "TSUNAGU").await,
        "Transient ServiceProviderPresentation(LocalLimitExceeded)"
    );
    // From 127.0.0.2: established, and an echo answered.
    let script = "import sys\n\
        from pynetdicom import AE\n\
        ae = AE(ae_title='HOSP2')\n\
        ae.add_requested_context('1.2.840.10008.1.1')\n\
        a = ae.associate('127.0.0.1', int(sys.argv[1]), ae_title='TSUNAGU', bind_address=('127.0.0.2', 0))\n\
        assert a.is_established, 'refused'\n\
        print(int(a.send_c_echo().Status))\n\
        a.release()\n";
    let out = common::run_ok(
        std::process::Command::new(python)
            .args(["-c", script])
            .arg(hub.port().to_string()),
    );
    assert_eq!(String::from_utf8_lossy(&out).trim(), "0");
    first.release().await.unwrap();
    let metrics = hub.hub.metrics.render();
    assert!(
        metrics.contains("tsunagu_dimse_associations_rejected_total{reason=\"peer_limit\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_s3_is_out_of_resources() {
    // An S3 endpoint where nothing listens: every upload fails, quickly.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Some(hub) = TestHub::start_with(Backend::Local, |c| {
        c.storage.url = "s3://nowhere/prefix".into();
        c.storage.endpoint = Some(format!("http://127.0.0.1:{port}"));
        c.storage.allow_http = true;
        c.storage.access_key_id = Some("k".into());
        c.storage.secret_access_key = Some("s".into());
    })
    .await
    else {
        return;
    };
    let Some(dir) = common::testdata_dir() else {
        return;
    };
    let file = dir.join("files/ct16_explicit_le.dcm");
    let started = std::time::Instant::now();
    let (_, log) = common::storescu(hub.port(), "HOSP1", "-xe", std::slice::from_ref(&file));
    assert!(log.contains("Refused: OutOfResources"), "{log}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "bounded retries"
    );
    assert_eq!(hub.hub.index.count_instances().await.unwrap(), 0);
    assert!(hub.echo("HOSP1"));
}

/// An institution's networks: its AE titles from anywhere else are refused
/// (reason 3, audited with the reason), an institution without networks is
/// reached from anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_outside_their_institutions_networks_are_refused() {
    let Some(hub) = TestHub::start_with(Backend::Local, |c| {
        c.institutions[0].networks = vec!["10.0.0.0/8".parse().unwrap()];
        c.institutions[1].networks = vec![
            "192.168.0.0/16".parse().unwrap(),
            "127.0.0.1/32".parse().unwrap(),
        ];
    })
    .await
    else {
        return;
    };
    assert_eq!(
        rejection(hub.port(), "HOSP1", "TSUNAGU").await,
        "Permanent ServiceUser(CallingAETitleNotRecognized)"
    );
    assert_eq!(rejection(hub.port(), "HOSP2", "TSUNAGU").await, "accepted");
    assert_eq!(rejection(hub.port(), "HOSP3", "TSUNAGU").await, "accepted");
    hub.hub.audit.flush().await;
    let trail = tsunagu::audit::trail::read_range(hub.hub.index.pool(), 1, 1000)
        .await
        .unwrap();
    assert!(trail.iter().any(|s| {
        s.event.action == tsunagu::audit::Action::AuthenticateNode
            && s.event.detail["reason"] == "calling from outside the institution's networks"
            && s.event.institution == "HOSP1"
    }));
}
