//! Crash safety and rebuilding: kill -9 mid-stream loses nothing that was
//! acknowledged and leaves nothing half-written visible; `reindex` rebuilds the
//! same index from the object store alone.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use tsunagu::config::Config;
use tsunagu::index::Index;

use crate::common::{self, Backend, TestHub};

const BIN: &str = env!("CARGO_BIN_EXE_tsunagu");

/// A config file for the server binary in `dir` on `backend`, on fixed free ports.
async fn write_config(
    backend: Backend,
    dir: &Path,
    dicom_port: u16,
    http_port: u16,
) -> Option<PathBuf> {
    let mut c = common::config_for(backend, dir).await?;
    c.server.dicom_port = dicom_port;
    c.server.http_port = http_port;
    let path = dir.join("tsunagu.toml");
    std::fs::write(&path, toml::to_string(&c).unwrap()).unwrap();
    Some(path)
}

fn spawn_server(config: &Path) -> Child {
    Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "server did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `n` distinct CT instances (new SOP Instance UIDs) made from the corpus CT.
fn make_instances(src: &Path, out: &Path, n: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(out).unwrap();
    let base = dicom_object::open_file(src).unwrap();
    (0..n)
        .map(|i| {
            let mut obj = base.clone();
            let uid = format!("2.25.4242424242.{}", i + 1);
            obj.put(DataElement::new(
                tags::SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from(uid.as_str()),
            ));
            obj.put(DataElement::new(
                tags::INSTANCE_NUMBER,
                VR::IS,
                PrimitiveValue::from((i + 1).to_string()),
            ));
            obj.meta_mut().media_storage_sop_instance_uid = uid;
            obj.meta_mut().update_information_group_length();
            let p = out.join(format!("ct{i:04}.dcm"));
            obj.write_to_file(&p).unwrap();
            p
        })
        .collect()
}

fn sha(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// One kill -9 run at a time: each picks its ports before its server binds
/// them, and three servers streaming at once would crowd two cores.
static KILL_RUNS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn kill_9_mid_stream_loses_no_acknowledged_object(backend: Backend) {
    let _one_at_a_time = KILL_RUNS.lock().await;
    let Some(dir) = common::testdata_dir() else {
        return;
    };
    let Some(storescu) = common::dcmtk("storescu") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let files = make_instances(
        &dir.join("files/ct16_explicit_le.dcm"),
        &tmp.path().join("in"),
        300,
    );
    let (dicom_port, http_port) = (common::free_port(), common::free_port());
    let Some(config) = write_config(backend, tmp.path(), dicom_port, http_port).await else {
        return;
    };
    let mut server = spawn_server(&config);
    wait_listening(dicom_port);
    let tap = common::wiretap::WireTap::start(([127, 0, 0, 1], dicom_port).into()).await;

    let mut client = Command::new(storescu)
        .env("TCP_NODELAY", "1")
        .args(["-v", "-R", "-xe"])
        .args(common::hub_peer("HOSP1", tap.port))
        .args(&files)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read storescu's log as it goes; kill the server hard after 100 acks.
    let stderr = client.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut current: Option<String> = None;
        let mut killed = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(f) = line.strip_prefix("I: Sending file: ") {
                current = Some(f.to_string());
            } else if line.contains("Received Store Response (Success)") {
                if let Some(f) = current.take() {
                    acked.push(f);
                }
                if acked.len() == 100 && !killed {
                    server.kill().unwrap(); // SIGKILL
                    let _ = server.wait();
                    killed = true;
                }
            }
        }
        (acked, killed, server)
    });
    let _ = client.wait();
    let (acked, killed, _) = reader.join().unwrap();
    assert!(killed, "the stream ended before 100 acknowledgements");
    assert!(
        acked.len() >= 100 && acked.len() < files.len(),
        "acked {}",
        acked.len()
    );
    let wire: std::collections::HashSet<String> = tap.datasets().iter().map(|d| sha(d)).collect();

    // Restart on the same directory: every acknowledged object is there, intact.
    let mut server = spawn_server(&config);
    wait_listening(dicom_port);
    let cfg = Config::load(Some(&config)).unwrap();
    let index = Index::connect(&cfg.index).await.unwrap();
    let store = tsunagu::store::Store::open(&cfg.storage).await.unwrap();
    for f in &acked {
        let sop = common::sop_instance_uid(Path::new(f));
        let copy = index
            .stored_copy("HOSP1", &sop)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{f} lost"));
        let bytes = store.get_bytes(&copy.object_key).await.unwrap();
        assert!(
            wire.contains(&sha(common::dataset_bytes(&bytes))),
            "{f}: stored bytes differ from the wire"
        );
    }
    // Nothing half-written is visible: every object parses in full and
    // matches the digest in its key; every index row has its object.
    let keys: Vec<String> = {
        use futures::TryStreamExt;
        store
            .list_instances()
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap()
    };
    for key in &keys {
        assert!(
            !key.contains('#') && key.ends_with(".dcm"),
            "staging object visible: {key}"
        );
        let bytes = store.get_bytes(key).await.unwrap();
        let copy = tmp.path().join("check.dcm");
        std::fs::write(&copy, &bytes).unwrap();
        tsunagu::dicom::dataset::parse_file(&copy)
            .unwrap_or_else(|e| panic!("{key} is damaged: {e}"));
        let digest = &key[key.len() - 20..key.len() - 4];
        assert!(
            sha(common::dataset_bytes(&bytes)).starts_with(digest),
            "{key}"
        );
    }
    // Start-up checked what the crash left unconfirmed (whole: the OS kept
    // its page cache).
    assert!(index.unconfirmed().await.unwrap().is_empty());
    let rows = index.count_instances().await.unwrap() as usize;
    assert!(
        rows >= acked.len() && rows <= keys.len(),
        "rows {rows}, objects {}",
        keys.len()
    );
    // No index row without its whole object.
    for row in index.fingerprint().await.unwrap() {
        let key = row
            .split('|')
            .find_map(|c| c.strip_prefix("i.object_key="))
            .unwrap();
        assert!(
            keys.iter().any(|k| k == key),
            "index row without its object: {key}"
        );
    }
    let spool = match backend {
        Backend::S3 => tmp.path().join("spool"),
        _ => tmp.path().join("store/.spool"),
    };
    assert!(
        common::spool_files(&spool).is_empty(),
        "spool swept at restart"
    );
    server.kill().unwrap();
    let _ = server.wait();
}

crate::on_backends!(kill_9_mid_stream_loses_no_acknowledged_object:
    kill_9_mid_stream_loses_no_acknowledged_object_on_sqlite => Backend::Local,
    kill_9_mid_stream_loses_no_acknowledged_object_on_postgres => Backend::Postgres,
    kill_9_mid_stream_loses_no_acknowledged_object_on_s3 => Backend::S3,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reindex_after_deleting_the_index_gives_the_same_content() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let Some(_) = crate::dimse::push_corpus(&hub, "HOSP3").await else {
        return;
    };
    let before = hub.hub.index.fingerprint().await.unwrap();
    assert_eq!(before.len(), common::corpus().unwrap().len());
    let dir = hub.dir.path().to_path_buf();
    let config = hub.hub.config.clone();
    hub.running.shutdown.cancel();
    for f in ["index.sqlite", "index.sqlite-wal", "index.sqlite-shm"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    // What a replacement cut off before its flush leaves: a newer copy of
    // one instance, under another digest, damaged. Reindex falls back to
    // the acknowledged one.
    let object = walk_files(&dir.join("store/instances"))
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "dcm"))
        .expect("a stored object");
    let name = object.file_name().unwrap().to_str().unwrap().to_string();
    let (stem, _) = name.rsplit_once('.').unwrap();
    let (sop, _) = stem.rsplit_once('.').unwrap();
    let damaged = object.with_file_name(format!("{sop}.0123456789abcdef.dcm"));
    let bytes = std::fs::read(&object).unwrap();
    std::fs::write(&damaged, &bytes[..bytes.len() / 2]).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&damaged)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let path = dir.join("tsunagu.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let out = Command::new(BIN)
        .args(["reindex", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // Every instance indexed; the damaged leftover reported (and the exit
    // status says something needs a look).
    assert!(
        !out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("indexed {} · failed 1", before.len()))
            && text.contains("0123456789abcdef"),
        "{text}"
    );
    let index = Index::connect(&config.index).await.unwrap();
    let after = index.fingerprint().await.unwrap();
    assert_eq!(before, after);
    drop(hub);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reindex_from_s3_gives_the_same_content() {
    let Some(hub) = TestHub::start(Backend::S3).await else {
        return;
    };
    let Some(_) = crate::dimse::push_corpus(&hub, "HOSP2").await else {
        return;
    };
    let before = hub.hub.index.fingerprint().await.unwrap();
    assert_eq!(before.len(), common::corpus().unwrap().len());
    hub.hub.index.clear().await.unwrap();
    assert_eq!(hub.hub.index.count_instances().await.unwrap(), 0);
    let report = hub.hub.reindex(false).await.unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(hub.hub.index.fingerprint().await.unwrap(), before);
    // A fetch that fails leaves no half download in the spool.
    assert!(
        hub.hub
            .store
            .fetch_to_path("instances/HOSP2/1/2/3.0123456789abcdef.dcm")
            .await
            .is_err()
    );
    let left = common::spool_files(&hub.dir.path().join("spool"));
    assert!(left.is_empty(), "{left:?}");
}

/// What a crash between index commit and flush leaves: HOSP1's object
/// listed as unconfirmed.
async fn list_unconfirmed(index: &Index, key: &str, sop: &str) {
    sqlx::query(
        "INSERT INTO unconfirmed_object (object_key, institution, sop_uid) VALUES ($1, 'HOSP1', $2)",
    )
    .bind(key)
    .bind(sop)
    .execute(index.pool())
    .await
    .unwrap();
}

/// The start-up check, as `serve` runs it.
async fn recover(hub: &TestHub) -> tsunagu::ingest::recover::Recovered {
    hub.hub
        .ingest
        .recover_unconfirmed(&hub.hub.institutions)
        .await
        .unwrap()
}

/// A crash between an object's index commit and its flush can leave a row
/// whose object never reached the disk whole (the two run at once; the store
/// was not acknowledged). Start-up checks each unconfirmed object: a whole one
/// is confirmed; a damaged or missing one loses its rows — series, study and
/// patient too when nothing else is left in them — and its file.
async fn unconfirmed_objects_are_checked(backend: Backend) {
    let Some(dir) = common::testdata_dir() else {
        return;
    };
    let Some(hub) = TestHub::start(backend).await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let files = make_instances(
        &dir.join("files/ct16_explicit_le.dcm"),
        &tmp.path().join("in"),
        3,
    );
    // The third alone in a study of its own.
    let mut lone = dicom_object::open_file(&files[2]).unwrap();
    for (tag, uid) in [
        (tags::STUDY_INSTANCE_UID, "2.25.4242424242.900"),
        (tags::SERIES_INSTANCE_UID, "2.25.4242424242.901"),
    ] {
        lone.put(DataElement::new(tag, VR::UI, PrimitiveValue::from(uid)));
    }
    lone.put(DataElement::new(
        tags::PATIENT_ID,
        VR::LO,
        PrimitiveValue::from("LONE-1"),
    ));
    lone.write_to_file(&files[2]).unwrap();
    hub.import("HOSP1", files.clone()).await;
    let index = &hub.hub.index;
    index.settle().await;
    assert!(
        index.unconfirmed().await.unwrap().is_empty(),
        "confirmed once durable"
    );

    // As a crash would leave them: listed, the first whole, the second
    // damaged, the third gone.
    let sops: Vec<String> = files.iter().map(|f| common::sop_instance_uid(f)).collect();
    let mut keys = Vec::new();
    for sop in &sops {
        let copy = index.stored_copy("HOSP1", sop).await.unwrap().unwrap();
        list_unconfirmed(index, &copy.object_key, sop).await;
        keys.push(copy.object_key);
    }
    let root = hub.dir.path().join("store");
    let damaged = root.join(&keys[1]);
    let mut bytes = std::fs::read(&damaged).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&damaged, bytes).unwrap();
    std::fs::remove_file(root.join(&keys[2])).unwrap();

    let report = recover(&hub).await;
    assert_eq!(report.confirmed, 1);
    assert_eq!(report.rolled_back, vec![keys[1].clone(), keys[2].clone()]);
    assert!(index.unconfirmed().await.unwrap().is_empty());
    assert!(
        index
            .stored_copy("HOSP1", &sops[0])
            .await
            .unwrap()
            .is_some()
    );
    assert!(root.join(&keys[0]).exists());
    for (sop, key) in sops.iter().zip(&keys).skip(1) {
        assert!(index.stored_copy("HOSP1", sop).await.unwrap().is_none());
        assert!(!root.join(key).exists(), "{key} removed");
    }
    // The lone study went with its only object; the other stays.
    let studies = |uid: &'static str| {
        sqlx::query("SELECT COUNT(*) FROM study WHERE study_uid = $1")
            .bind(uid)
            .fetch_one(index.pool())
    };
    use sqlx::Row;
    assert_eq!(
        studies("2.25.4242424242.900")
            .await
            .unwrap()
            .get::<i64, _>(0),
        0
    );
    for table in ["series", "study_access", "patient"] {
        let n: i64 = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
            .fetch_one(index.pool())
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            n, 1,
            "{table}: the rolled-back study's row is gone, the other's stays"
        );
    }
    // The counts kept on the rows follow (index triggers): one series of one
    // instance left.
    let counts = || async {
        let r = sqlx::query(
            "SELECT st.num_series, st.num_instances, se.num_instances FROM study st \
             JOIN series se ON se.study_ref = st.id",
        )
        .fetch_one(index.pool())
        .await
        .unwrap();
        (r.get::<i64, _>(0), r.get::<i64, _>(1), r.get::<i64, _>(2))
    };
    assert_eq!(counts().await, (1, 1, 1), "{backend:?}");

    // Two versions of one instance stored at once both found no copy before
    // them; the later row replaced the earlier's and its object was caught
    // by the crash: the earlier version, left beside it, is indexed again.
    let earlier_bytes = std::fs::read(root.join(&keys[0])).unwrap();
    let mut later = dicom_object::open_file(&files[0]).unwrap();
    later.put(DataElement::new(
        tags::SERIES_DESCRIPTION,
        VR::LO,
        PrimitiveValue::from("a later version"),
    ));
    let later_file = tmp.path().join("later.dcm");
    later.write_to_file(&later_file).unwrap();
    hub.import("HOSP1", vec![later_file.clone()]).await;
    let later_key = index
        .stored_copy("HOSP1", &sops[0])
        .await
        .unwrap()
        .unwrap()
        .object_key;
    assert_ne!(later_key, keys[0]);
    std::fs::write(root.join(&keys[0]), &earlier_bytes).unwrap();
    list_unconfirmed(index, &later_key, &sops[0]).await;
    std::fs::write(root.join(&later_key), b"not a whole object").unwrap();
    let report = recover(&hub).await;
    assert_eq!(report.rolled_back, vec![later_key.clone()]);
    assert_eq!(report.restored, vec![keys[0].clone()]);
    let copy = index.stored_copy("HOSP1", &sops[0]).await.unwrap().unwrap();
    assert_eq!(copy.object_key, keys[0]);
    assert_eq!(
        counts().await,
        (1, 1, 1),
        "{backend:?}: replaced, not added"
    );

    // A crash's leftover at a key that nothing lists (renamed, never flushed
    // nor indexed) is not taken for the object when it is sent again: the
    // new copy replaces it.
    std::fs::write(root.join(&later_key), b"cut short").unwrap();
    hub.import("HOSP1", vec![later_file]).await;
    let copy = index.stored_copy("HOSP1", &sops[0]).await.unwrap().unwrap();
    assert_eq!(copy.object_key, later_key);
    let stored = std::fs::read(root.join(&later_key)).unwrap();
    assert!(
        sha(common::dataset_bytes(&stored))
            .starts_with(&later_key[later_key.len() - 20..later_key.len() - 4]),
        "the leftover was replaced by the whole object"
    );
}

crate::on_backends!(unconfirmed_objects_are_checked:
    unconfirmed_objects_are_checked_on_sqlite => Backend::Local,
    unconfirmed_objects_are_checked_on_postgres => Backend::Postgres,
);

/// Every file below `dir`.
fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}
