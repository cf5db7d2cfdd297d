//! Bad input gets a clear answer and loses nothing: each case gets its DIMSE
//! status or an A-ABORT, nothing is stored half-way, and the server still
//! answers an echo afterwards.

use std::time::Duration;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::{
    EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
};
use dicom_ul::pdu::{PDataValue, PDataValueType};
use dicom_ul::{ClientAssociationOptions, Pdu};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{self, Backend, TestHub};

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

/// A command set: `field` (0001 C-STORE-RQ, 0030 C-ECHO-RQ), with an
/// Affected SOP Instance UID when `instance` is given (and then a data set).
fn command_rq(field: u16, class: &str, message_id: u16, instance: Option<&str>) -> Vec<u8> {
    let mut elements = vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(class),
        ),
        DataElement::new(tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(field)),
        DataElement::new(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(message_id)),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(if instance.is_some() { 0u16 } else { 0x0101 }),
        ),
    ];
    if let Some(instance) = instance {
        elements.push(DataElement::new(
            tags::PRIORITY,
            VR::US,
            PrimitiveValue::from(0u16),
        ));
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(instance),
        ));
    }
    let obj = InMemDicomObject::command_from_element_iter(elements);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .unwrap();
    out
}

fn store_rq(class: &str, instance: &str) -> Vec<u8> {
    command_rq(0x0001, class, 7, Some(instance))
}

fn pdata(kind: PDataValueType, last: bool, data: Vec<u8>) -> Pdu {
    Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: 1,
            value_type: kind,
            is_last: last,
            data,
        }],
    }
}

type Assoc = dicom_ul::association::client::AsyncClientAssociation<tokio::net::TcpStream>;

async fn associate(port: u16) -> Assoc {
    ClientAssociationOptions::new()
        .calling_ae_title("HOSP1")
        .called_ae_title("TSUNAGU")
        .with_presentation_context(CT, vec![EXPLICIT_LE])
        .establish_async(("127.0.0.1", port))
        .await
        .expect("association")
}

/// Send one C-STORE with `dataset` as the data set; return the response status.
async fn store_raw(port: u16, class: &str, instance: &str, dataset: &[u8]) -> u16 {
    let mut a = associate(port).await;
    a.send(&pdata(
        PDataValueType::Command,
        true,
        store_rq(class, instance),
    ))
    .await
    .unwrap();
    let chunks: Vec<&[u8]> = dataset.chunks(16 * 1024).collect();
    for (i, c) in chunks.iter().enumerate() {
        a.send(&pdata(
            PDataValueType::Data,
            i + 1 == chunks.len(),
            c.to_vec(),
        ))
        .await
        .unwrap();
    }
    let status = match a.receive().await.unwrap() {
        Pdu::PData { data } => {
            let rsp = InMemDicomObject::read_dataset_with_ts(
                &data[0].data[..],
                &IMPLICIT_VR_LITTLE_ENDIAN.erased(),
            )
            .unwrap();
            rsp.get(tags::STATUS).unwrap().to_int::<u16>().unwrap()
        }
        other => panic!("expected a response, got {other:?}"),
    };
    let _ = a.release().await;
    status
}

/// The CT corpus file's data set, optionally edited.
fn ct_dataset(edit: impl FnOnce(&mut InMemDicomObject)) -> Option<(String, Vec<u8>)> {
    let dir = common::testdata_dir()?;
    let file = dicom_object::open_file(dir.join("files/ct16_explicit_le.dcm")).unwrap();
    let sop = file.meta().media_storage_sop_instance_uid().to_string();
    let mut obj = file.into_inner();
    edit(&mut obj);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &EXPLICIT_VR_LITTLE_ENDIAN.erased())
        .unwrap();
    Some((sop, out))
}

async fn metrics(hub: &TestHub) -> String {
    let mut s = tokio::net::TcpStream::connect(hub.running.http_addr)
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

/// The server answers with an A-ABORT PDU (type 07H) or just closes: for
/// bytes that never made an association.
async fn assert_aborted_or_closed(s: &mut tokio::net::TcpStream) {
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut reply)).await;
    assert!(
        reply.is_empty() || reply[0] == 0x07,
        "expected A-ABORT or close, got {reply:?}"
    );
}

/// The server answers an established association's protocol error with an
/// A-ABORT PDU (type 07H), which reaches the client although the client's
/// bytes were left unread (the server waits for the close before closing).
async fn assert_aborted(s: &mut tokio::net::TcpStream) {
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut reply)).await;
    assert!(
        reply.first() == Some(&0x07),
        "expected A-ABORT, got {reply:?}"
    );
}

/// The value of one sample (`name{labels}`) of the hub's metrics, 0 if absent.
async fn sample(hub: &TestHub, series: &str) -> f64 {
    common::metric(&metrics(hub).await, series)
}

/// Wait until `series` reads `want` (the server counts as it acts, a moment
/// after the peer saw the answer); what it read last.
async fn settles(hub: &TestHub, series: &str, want: f64) -> f64 {
    let mut got = sample(hub, series).await;
    for _ in 0..100 {
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        got = sample(hub, series).await;
    }
    got
}

const FAILED: &str = "tsunagu_dimse_associations_failed_total";

/// Held by the tests that assert exact counts of failed associations: the
/// metrics are the process's, and those tests' counters no other test moves.
static FAILURE_COUNTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// No spool file: the local store's spool, or the S3 backend's.
fn spool_is_empty(hub: &TestHub) -> bool {
    ["store/.spool", "spool"]
        .iter()
        .all(|d| common::spool_files(&hub.dir.path().join(d)).is_empty())
}

/// Nothing in the object store.
async fn store_is_empty(hub: &TestHub) -> bool {
    use futures::StreamExt;
    hub.hub.store.list_instances().next().await.is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_bytes_on_the_port_are_aborted() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let mut s = tokio::net::TcpStream::connect(hub.running.dicom_addr)
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: tsunagu\r\n\r\n")
        .await
        .unwrap();
    assert_aborted_or_closed(&mut s).await;
    assert!(hub.echo("HOSP1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_pdu_is_aborted() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let _counts = FAILURE_COUNTS.lock().await;
    let too_large = format!("{FAILED}{{reason=\"pdu_too_large\"}}");
    let before = sample(&hub, &too_large).await;
    let mut a = associate(hub.port()).await;
    // A P-DATA-TF header announcing 2 GiB, far over our maximum PDU length.
    let s = a.inner_stream();
    s.write_all(&[0x04, 0x00, 0x7F, 0xFF, 0xFF, 0xFF])
        .await
        .unwrap();
    s.write_all(&[0u8; 64]).await.unwrap();
    assert_aborted(s).await;
    assert_eq!(settles(&hub, &too_large, before + 1.0).await, before + 1.0);
    assert!(hub.echo("HOSP1"));
}

crate::on_backends!(association_aborted_mid_object_stores_nothing:
    association_aborted_mid_object_stores_nothing_on_local => Backend::Local,
    association_aborted_mid_object_stores_nothing_on_s3 => Backend::S3,
);

async fn association_aborted_mid_object_stores_nothing(backend: Backend) {
    let Some(hub) = TestHub::start(backend).await else {
        return;
    };
    let Some((sop, ds)) = ct_dataset(|_| {}) else {
        return;
    };
    // Cut inside the pixel data, and between two elements (just before the
    // pixel data: what arrived parses as a whole data set, but is not one).
    let pixel_data = ds
        .windows(4)
        .position(|w| w == [0xE0, 0x7F, 0x10, 0x00])
        .expect("a CT has pixel data");
    let _counts = FAILURE_COUNTS.lock().await;
    let peer_abort = format!("{FAILED}{{reason=\"peer_abort\"}}");
    let released = format!("{FAILED}{{reason=\"release_mid_object\"}}");
    let cut_off = "tsunagu_store_failures_total{reason=\"cut_off\"}";
    let (aborts, releases, cuts) = (
        sample(&hub, &peer_abort).await,
        sample(&hub, &released).await,
        sample(&hub, cut_off).await,
    );
    for cut in [ds.len() / 2, pixel_data] {
        let mut a = associate(hub.port()).await;
        a.send(&pdata(PDataValueType::Command, true, store_rq(CT, &sop)))
            .await
            .unwrap();
        a.send(&pdata(PDataValueType::Data, false, ds[..cut].to_vec()))
            .await
            .unwrap();
        a.abort().await.unwrap();
        // The server notices the abort on its next read.
        for _ in 0..100 {
            if spool_is_empty(&hub) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            spool_is_empty(&hub),
            "spool file left behind (cut at {cut})"
        );
    }
    assert_eq!(settles(&hub, &peer_abort, aborts + 2.0).await, aborts + 2.0);
    assert_eq!(settles(&hub, cut_off, cuts + 2.0).await, cuts + 2.0);
    // A release in the middle of an object is answered with an abort: an
    // orderly release would tell the sender all went well.
    let mut a = associate(hub.port()).await;
    a.send(&pdata(PDataValueType::Command, true, store_rq(CT, &sop)))
        .await
        .unwrap();
    a.send(&pdata(
        PDataValueType::Data,
        false,
        ds[..pixel_data].to_vec(),
    ))
    .await
    .unwrap();
    a.send(&Pdu::ReleaseRQ).await.unwrap();
    let answer = a.receive().await;
    assert!(
        matches!(answer, Ok(Pdu::AbortRQ { .. }) | Err(_)),
        "{answer:?}"
    );
    for _ in 0..100 {
        if spool_is_empty(&hub) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(hub.hub.index.count_instances().await.unwrap(), 0);
    assert!(store_is_empty(&hub).await);
    assert_eq!(
        settles(&hub, &released, releases + 1.0).await,
        releases + 1.0
    );
    assert_eq!(settles(&hub, cut_off, cuts + 3.0).await, cuts + 3.0);
    assert!(hub.echo("HOSP1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_data_sets_get_their_status() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let Some((sop, ds)) = ct_dataset(|_| {}) else {
        return;
    };

    // Truncated in the middle of Pixel Data: cannot understand.
    assert_eq!(
        store_raw(hub.port(), CT, &sop, &ds[..ds.len() - 100]).await,
        0xC000
    );
    // An element whose length runs past the end.
    let bad = [0x08, 0x00, 0x20, 0x00, b'D', b'A', 0xFF, 0x7F, b'2', b'0'];
    assert_eq!(store_raw(hub.port(), CT, &sop, &bad).await, 0xC000);
    // SOP Instance UID in the data set differs from the command.
    assert_eq!(store_raw(hub.port(), CT, "1.2.3.4.5.6", &ds).await, 0xA900);
    // SOP Class in the command differs from the presentation context.
    assert_eq!(
        store_raw(hub.port(), "1.2.840.10008.5.1.4.1.1.4", &sop, &ds).await,
        0x0122
    );
    // Missing Study Instance UID.
    let (_, no_study) = ct_dataset(|o| {
        o.remove_element(tags::STUDY_INSTANCE_UID);
    })
    .unwrap();
    assert_eq!(store_raw(hub.port(), CT, &sop, &no_study).await, 0xA900);
    // The data set's SOP Class differs from the command's (MR data under CT).
    let (_, mr) = ct_dataset(|o| {
        o.put(DataElement::new(
            tags::SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.4"),
        ));
    })
    .unwrap();
    assert_eq!(store_raw(hub.port(), CT, &sop, &mr).await, 0xA900);
    // Missing SOP Instance UID, missing Series Instance UID.
    for tag in [tags::SOP_INSTANCE_UID, tags::SERIES_INSTANCE_UID] {
        let (_, missing) = ct_dataset(|o| {
            o.remove_element(tag);
        })
        .unwrap();
        assert_eq!(
            store_raw(hub.port(), CT, &sop, &missing).await,
            0xA900,
            "{tag}"
        );
    }
    // A UID that is not a valid UID (it would name an unsafe key).
    let (_, bad_series) = ct_dataset(|o| {
        o.put(DataElement::new(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("../../x"),
        ));
    })
    .unwrap();
    assert_eq!(store_raw(hub.port(), CT, &sop, &bad_series).await, 0xA900);

    assert_eq!(hub.hub.index.count_instances().await.unwrap(), 0);
    assert!(spool_is_empty(&hub));
    assert!(
        !hub.dir.path().join("store/instances").exists(),
        "nothing half-stored"
    );
    // The good object still goes through on the same server.
    assert_eq!(store_raw(hub.port(), CT, &sop, &ds).await, 0x0000);
    let m = metrics(&hub).await;
    assert!(
        m.contains("tsunagu_store_failures_total{reason=\"unparsable\"}"),
        "{m}"
    );
    assert!(
        m.contains("tsunagu_store_failures_total{reason=\"mismatch\"}"),
        "{m}"
    );
    assert!(hub.echo("HOSP1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unwritable_store_is_out_of_resources() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let Some((sop, ds)) = ct_dataset(|_| {}) else {
        return;
    };
    // A file where the instances directory must go: every store fails.
    let blocker = hub.dir.path().join("store/instances");
    std::fs::write(&blocker, b"not a directory").unwrap();
    assert_eq!(store_raw(hub.port(), CT, &sop, &ds).await, 0xA700);
    assert_eq!(hub.hub.index.count_instances().await.unwrap(), 0);
    assert!(spool_is_empty(&hub));
    assert!(hub.echo("HOSP1"));
    // Once the store is writable again, the same object is accepted.
    std::fs::remove_file(&blocker).unwrap();
    assert_eq!(store_raw(hub.port(), CT, &sop, &ds).await, 0x0000);
}

crate::on_backends!(failing_index_is_out_of_resources_and_leaves_no_row:
    failing_index_is_out_of_resources_and_leaves_no_row_on_sqlite => Backend::Local,
    failing_index_is_out_of_resources_and_leaves_no_row_on_postgres => Backend::Postgres,
);

async fn failing_index_is_out_of_resources_and_leaves_no_row(backend: Backend) {
    let Some(hub) = TestHub::start(backend).await else {
        return;
    };
    let Some((sop, ds)) = ct_dataset(|_| {}) else {
        return;
    };
    let pool = hub.hub.index.pool();
    // Lookups work, but every index write fails after the object is stored.
    let (fail, unfail): (&[&str], &str) = match backend {
        Backend::Postgres => (
            &[
                "CREATE FUNCTION fail_writes() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'index failure'; END $$",
                "CREATE TRIGGER fail_writes BEFORE INSERT ON instance FOR EACH ROW EXECUTE FUNCTION fail_writes()",
            ],
            "DROP TRIGGER fail_writes ON instance",
        ),
        _ => (
            &[
                "CREATE TRIGGER fail_writes BEFORE INSERT ON instance BEGIN SELECT RAISE(ABORT, 'index failure'); END",
            ],
            "DROP TRIGGER fail_writes",
        ),
    };
    for sql in fail {
        sqlx::query(*sql).execute(pool).await.unwrap();
    }
    assert_eq!(store_raw(hub.port(), CT, &sop, &ds).await, 0xA700);
    assert!(hub.echo("HOSP1"));
    // The transaction rolled back: no row points at anything (the object is
    // an orphan, which reindex or a resend adopts).
    assert_eq!(hub.hub.index.count_instances().await.unwrap(), 0);
    assert_eq!(hub.hub.index.fingerprint().await.unwrap().len(), 0);
    sqlx::query(unfail).execute(pool).await.unwrap();
    // The orphaned object is adopted by the retry (same bytes, same key).
    assert_eq!(store_raw(hub.port(), CT, &sop, &ds).await, 0x0000);
    assert!(hub.stored("HOSP1", &sop).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unsupported_sop_class_context_is_refused() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    // Patient Root Q/R FIND is not a storage class: the context is rejected.
    let a = ClientAssociationOptions::new()
        .calling_ae_title("HOSP1")
        .called_ae_title("TSUNAGU")
        .with_presentation_context("1.2.840.10008.5.1.4.1.2.1.1", vec![EXPLICIT_LE])
        .with_presentation_context(CT, vec![EXPLICIT_LE])
        .establish_async(("127.0.0.1", hub.port()))
        .await
        .unwrap();
    let pcs = a.presentation_contexts();
    // dicom-ul's client lists only the accepted contexts.
    assert!(
        pcs.iter()
            .all(|p| p.abstract_syntax != "1.2.840.10008.5.1.4.1.2.1.1"),
        "{pcs:?}"
    );
    assert!(pcs.iter().any(|p| p.abstract_syntax == CT), "{pcs:?}");
    let _ = a.release().await;
    assert!(hub.echo("HOSP1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_pdu_is_aborted() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let mut a = associate(hub.port()).await;
    // A P-DATA-TF of 20 bytes whose PDV item claims 1000 bytes.
    let s = a.inner_stream();
    let mut pdu = vec![0x04, 0x00, 0x00, 0x00, 0x00, 0x14];
    pdu.extend_from_slice(&1000u32.to_be_bytes());
    pdu.extend_from_slice(&[1, 0x03]);
    pdu.extend_from_slice(&[0u8; 14]);
    let _counts = FAILURE_COUNTS.lock().await;
    let malformed = format!("{FAILED}{{reason=\"malformed_pdu\"}}");
    let before = sample(&hub, &malformed).await;
    s.write_all(&pdu).await.unwrap();
    assert_aborted(s).await;
    assert_eq!(settles(&hub, &malformed, before + 1.0).await, before + 1.0);
    assert_eq!(hub.hub.index.count_instances().await.unwrap(), 0);
    assert!(hub.echo("HOSP1"));
}

/// A C-ECHO is answered on a Verification context only: on a storage
/// context it is refused (0122), and the association goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_echo_on_a_storage_context_is_refused() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let bytes = command_rq(0x0030, "1.2.840.10008.1.1", 9, None);
    let mut a = associate(hub.port()).await;
    a.send(&pdata(PDataValueType::Command, true, bytes))
        .await
        .unwrap();
    let status = match a.receive().await.unwrap() {
        Pdu::PData { data } => InMemDicomObject::read_dataset_with_ts(
            &data[0].data[..],
            &IMPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .unwrap()
        .get(tags::STATUS)
        .unwrap()
        .to_int::<u16>()
        .unwrap(),
        other => panic!("expected a response, got {other:?}"),
    };
    assert_eq!(status, 0x0122);
    let _ = a.release().await;
    assert!(
        hub.echo("HOSP1"),
        "echoes on a Verification context still work"
    );
}

/// ARTIM: a connection that sends no A-ASSOCIATE-RQ is closed within 10 s,
/// not left holding an association slot for the whole association timeout
/// (60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_connection_is_closed() {
    let Some(hub) = TestHub::start_with(Backend::Local, |c| {
        c.server.association_timeout_secs = 60;
    })
    .await
    else {
        return;
    };
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", hub.port()))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection is closed");
    assert!(
        started.elapsed() < Duration::from_secs(13),
        "{:?}",
        started.elapsed()
    );
    assert!(hub.echo("HOSP1"));
}

/// One message, one presentation context (PS3.8 Annex E): command fragments
/// on two contexts end the association with A-ABORT.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_split_across_contexts_is_aborted() {
    let Some(hub) = TestHub::start(Backend::Local).await else {
        return;
    };
    let mut a = ClientAssociationOptions::new()
        .calling_ae_title("HOSP1")
        .called_ae_title("TSUNAGU")
        .with_presentation_context(CT, vec![EXPLICIT_LE])
        .with_presentation_context("1.2.840.10008.1.1", vec![EXPLICIT_LE])
        .establish_async(("127.0.0.1", hub.port()))
        .await
        .expect("association");
    let command = store_rq(CT, "2.25.5150");
    let (first, rest) = command.split_at(command.len() / 2);
    let fragment = |context: u8, last: bool, data: &[u8]| Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: context,
            value_type: PDataValueType::Command,
            is_last: last,
            data: data.to_vec(),
        }],
    };
    a.send(&fragment(1, false, first)).await.unwrap();
    a.send(&fragment(3, true, rest)).await.unwrap();
    assert_aborted(a.inner_stream()).await;
    assert!(hub.echo("HOSP1"));
}
