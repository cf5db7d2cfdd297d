//! STOW-RS (PS3.18 §10.5): `multipart/related; type="application/dicom"`
//! requests, streamed part by part into the same ingest path as C-STORE (so
//! with the same durability), for the institution of the caller's token.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::PathParams;
use super::auth::Caller;
use super::media::{accept_of, parse_accept};
use super::problem::WebError;
use super::{DICOM_JSON, Urls};
use crate::access::Institution;
use crate::auth::Role;
use crate::dicom::part10;
use crate::dicom::storage_classes::STORAGE_SOP_CLASSES;
use crate::hub::Hub;
use crate::ingest::{Accepted, IngestError};

/// Failure Reason (0008,1197) values (PS3.18 Table 10.5.3-2, PS3.4 Annex C).
mod reason {
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    pub const DOES_NOT_MATCH_SOP_CLASS: u16 = 0xA900;
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    pub const TRANSFER_SYNTAX_NOT_SUPPORTED: u16 = 0xC122;
    /// Not of the study the request was addressed to.
    pub const STUDY_MISMATCH: u16 = 0xC409;
}

/// The Part-10 header is read before anything is spooled; it is this large at most.
const META_MAX: usize = 64 << 10;

/// `POST /studies`
pub async fn store(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    urls: Urls,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, WebError> {
    run(&hub, &caller, &urls, &headers, body, None).await
}

/// `POST /studies/{study}`
pub async fn store_in_study(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    urls: Urls,
    headers: HeaderMap,
    PathParams(study): PathParams<String>,
    body: Body,
) -> Result<Response, WebError> {
    run(&hub, &caller, &urls, &headers, body, Some(study)).await
}

/// What became of one part.
enum PartResult {
    Stored(Box<Accepted>),
    Failed {
        class: Option<String>,
        instance: Option<String>,
        reason: u16,
    },
}

async fn run(
    hub: &Hub,
    caller: &Caller,
    urls: &Urls,
    headers: &HeaderMap,
    body: Body,
    study: Option<String>,
) -> Result<Response, WebError> {
    caller.require(&[Role::Clinician, Role::Modality], "store images")?;
    // Each upload holds a spool file and a share of the disk's bandwidth;
    // the place is held until its last part's store is done (see store_part).
    let slot = Arc::new(hub.stow_slots.clone().try_acquire_owned().map_err(|_| {
        metrics::counter!(crate::telemetry::LIMIT_REACHED, "limit" => "stow_max_concurrent")
            .increment(1);
        WebError::Busy(format!(
            "{} STOW-RS requests are being stored; retry shortly",
            hub.config.dicomweb.stow_max_concurrent
        ))
    })?);
    let accept = accept_of(headers);
    if !accept
        .iter()
        .any(|m| m.covers("application/dicom+json") || m.is("application/json"))
    {
        return Err(WebError::NotAcceptable(
            "the store response is available as application/dicom+json".into(),
        ));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let media = parse_accept(std::iter::once(content_type));
    let ok_type = media.first().is_some_and(|m| {
        m.is("multipart/related")
            && m.part_type
                .as_deref()
                .is_none_or(|t| t == "application/dicom")
    });
    if !ok_type {
        return Err(WebError::UnsupportedMediaType(
            "STOW-RS takes multipart/related; type=\"application/dicom\"".into(),
        ));
    }
    // multer's own parser insists on multipart/form-data.
    let boundary = content_type
        .parse::<mime::Mime>()
        .ok()
        .and_then(|m| m.get_param(mime::BOUNDARY).map(|b| b.as_str().to_string()))
        .ok_or_else(|| WebError::bad_request("Content-Type has no boundary parameter"))?;
    let limit = hub.config.dicomweb.stow_max_bytes;
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit
    {
        return Err(WebError::PayloadTooLarge(limit));
    }
    if let Some(s) = &study
        && !crate::dicom::summary::is_uid(s)
    {
        return Err(WebError::bad_request(format!("{s:?} is not a UID")));
    }
    let constraints =
        multer::Constraints::new().size_limit(multer::SizeLimit::new().whole_stream(limit));
    let seeking = Arc::new(Seeking::default());
    let idle = std::time::Duration::from_secs(hub.config.server.association_timeout_secs);
    let mut parts = multer::Multipart::with_constraints(
        guarded(body, idle, seeking.clone()),
        boundary,
        constraints,
    );
    let mut results = Vec::new();
    // A body broken off after some parts were stored: those stay stored (each
    // was acknowledged to the index already), so the answer lists them, with
    // the broken part as failed (202), instead of a 400 or 413 that PS3.18
    // reads as "nothing stored".
    let broken = |e: WebError, results: &mut Vec<PartResult>| -> Result<(), WebError> {
        if !results.iter().any(|r| matches!(r, PartResult::Stored(_))) {
            return Err(e);
        }
        tracing::warn!(error = %e, "STOW-RS body broken off after stored parts");
        results.push(PartResult::Failed {
            class: None,
            instance: None,
            reason: if matches!(e, WebError::PayloadTooLarge(_)) {
                reason::OUT_OF_RESOURCES
            } else {
                reason::CANNOT_UNDERSTAND
            },
        });
        Ok(())
    };
    loop {
        let field = match seeking.around(parts.next_field()).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                broken(multipart_error(e, limit, results.len()), &mut results)?;
                break;
            }
        };
        let part_type = field
            .content_type()
            .map(|m| m.essence_str().to_ascii_lowercase());
        if part_type
            .as_deref()
            .is_some_and(|t| t != "application/dicom")
        {
            // Drain it; it is reported as not understood.
            let mut field = field;
            let mut drained = Ok(());
            while let Some(chunk) = field.chunk().await.transpose() {
                if let Err(e) = chunk {
                    drained = Err(multipart_error(e, limit, results.len()));
                    break;
                }
            }
            if let Err(e) = drained {
                broken(e, &mut results)?;
                break;
            }
            results.push(PartResult::Failed {
                class: None,
                instance: None,
                reason: reason::CANNOT_UNDERSTAND,
            });
            continue;
        }
        match store_part(hub, caller, field, study.clone(), limit, &slot).await {
            Ok(r) => results.push(r),
            Err(e) => {
                broken(e, &mut results)?;
                break;
            }
        }
    }
    if results.is_empty() {
        return Err(WebError::bad_request("the request holds no parts"));
    }
    Ok(answer(urls, study.as_deref(), &results))
}

/// Most bytes read while looking for a part's headers (the preamble, the
/// headers themselves): multer holds them all in memory until it finds them.
/// It also reads ahead into the part's data (whole chunks of up to ~400 KiB
/// each), so the bound leaves room for several.
const HEADERS_MAX: u64 = 8 << 20;

/// Whether multer is looking for a part's headers, and what it read since.
#[derive(Default)]
struct Seeking {
    now: std::sync::atomic::AtomicBool,
    read: std::sync::atomic::AtomicU64,
}

impl Seeking {
    async fn around<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        use std::sync::atomic::Ordering::Relaxed;
        self.read.store(0, Relaxed);
        self.now.store(true, Relaxed);
        let r = f.await;
        self.now.store(false, Relaxed);
        r
    }
}

/// The request body as multer reads it: a pause longer than `idle` ends it
/// (a stalled upload would hold a spool worker's thread for good), and so do
/// more than `HEADERS_MAX` bytes read while looking for a part's headers.
fn guarded(
    body: Body,
    idle: std::time::Duration,
    seeking: Arc<Seeking>,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    use futures::StreamExt;
    use std::sync::atomic::Ordering::Relaxed;
    let inner = body.into_data_stream();
    futures::stream::unfold(Some(inner), move |state| {
        let seeking = seeking.clone();
        async move {
            let mut inner = state?;
            let failed = |why: String| Some((Err(std::io::Error::other(why)), None));
            match tokio::time::timeout(idle, inner.next()).await {
                Err(_) => failed(format!("the body paused for more than {idle:?}")),
                Ok(None) => None,
                Ok(Some(Err(e))) => failed(e.to_string()),
                Ok(Some(Ok(b))) => {
                    let n = b.len() as u64;
                    if seeking.now.load(Relaxed)
                        && seeking.read.fetch_add(n, Relaxed) + n > HEADERS_MAX
                    {
                        return failed(format!(
                            "more than {HEADERS_MAX} bytes before a part's headers ended"
                        ));
                    }
                    Some((Ok(b), Some(inner)))
                }
            }
        }
    })
}

fn multipart_error(e: multer::Error, limit: u64, done: usize) -> WebError {
    match e {
        multer::Error::StreamSizeExceeded { .. } | multer::Error::FieldSizeExceeded { .. } => {
            WebError::PayloadTooLarge(limit)
        }
        e => WebError::bad_request(format!(
            "malformed multipart body after {done} part(s): {e}"
        )),
    }
}

/// Spool one part through ingest. Errors of the request itself (a broken
/// body) end the whole request; errors of the object become a failure entry.
async fn store_part(
    hub: &Hub,
    caller: &Caller,
    mut field: multer::Field<'static>,
    study: Option<String>,
    limit: u64,
    slot: &Arc<tokio::sync::OwnedSemaphorePermit>,
) -> Result<PartResult, WebError> {
    let institution: &Institution = &caller.institution;
    // Read up to the end of the File Meta Information.
    let mut head: Vec<u8> = Vec::new();
    let meta = loop {
        match field.chunk().await {
            Ok(Some(c)) => head.extend_from_slice(&c),
            Ok(None) => break None,
            Err(e) => return Err(multipart_error(e, limit, 0)),
        }
        if let Some(end) = meta_end(&head) {
            if head.len() >= end {
                break Some(part10::read_meta(&head[..end]).map(|(m, off)| (m, off as usize)));
            }
        } else if head.len() >= 144 {
            break Some(part10::read_meta(&head[..]).map(|(m, off)| (m, off as usize)));
        }
        if head.len() > META_MAX {
            break Some(part10::read_meta(&head[..]).map(|(m, off)| (m, off as usize)));
        }
    };
    let failed = |class: Option<String>, instance: Option<String>, reason: u16| {
        Ok(PartResult::Failed {
            class,
            instance,
            reason,
        })
    };
    let (meta, offset) = match meta {
        Some(Ok(m)) => m,
        Some(Err(_)) | None => {
            drain(&mut field, limit).await?;
            return failed(None, None, reason::CANNOT_UNDERSTAND);
        }
    };
    let (class, instance) = (
        Some(meta.sop_class_uid.clone()),
        Some(meta.sop_instance_uid.clone()),
    );
    if !STORAGE_SOP_CLASSES
        .iter()
        .any(|(uid, _)| *uid == meta.sop_class_uid)
    {
        drain(&mut field, limit).await?;
        return failed(class, instance, reason::SOP_CLASS_NOT_SUPPORTED);
    }
    if dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get(&meta.transfer_syntax)
        .is_none()
    {
        drain(&mut field, limit).await?;
        return failed(class, instance, reason::TRANSFER_SYNTAX_NOT_SUPPORTED);
    }
    use dicom_encoding::TransferSyntaxIndex;
    let meta = part10::FileMeta {
        source_ae_title: None,
        ..meta
    };
    let mut spool = match hub.ingest.begin_in_study(meta, institution, study).await {
        Ok(s) => s,
        Err(e) => {
            drain(&mut field, limit).await?;
            return failed(class, instance, failure_reason(&e));
        }
    };
    let mut write_error = None;
    if head.len() > offset
        && let Err(e) = spool
            .write(bytes::Bytes::copy_from_slice(&head[offset..]))
            .await
    {
        write_error = Some(e);
    }
    loop {
        match field.chunk().await {
            Ok(Some(c)) => {
                if write_error.is_none()
                    && let Err(e) = spool.write(c).await
                {
                    write_error = Some(e);
                }
            }
            Ok(None) => break,
            // The spool is dropped (and removed): nothing half-written stays.
            Err(e) => return Err(multipart_error(e, limit, 0)),
        }
    }
    if let Some(e) = write_error {
        return failed(class, instance, failure_reason(&e));
    }
    // Finished in a task of its own: a client that goes away must not cut
    // a store short between its index commit and what follows it.
    // It keeps the request's STOW-RS place: a client that leaves does not
    // free it while the store still runs.
    let (ingest, institution_owned, actor, held) = (
        hub.ingest.clone(),
        institution.clone(),
        caller.actor(),
        slot.clone(),
    );
    let finished = tokio::spawn(async move {
        let _held = held;
        ingest.finish(spool, &institution_owned, None, &actor).await
    })
    .await
    .unwrap_or_else(|e| {
        Err(crate::ingest::IngestError::Internal(format!(
            "the store's task ended: {e}"
        )))
    });
    match finished {
        Ok(a) => Ok(PartResult::Stored(Box::new(a))),
        Err(e) => {
            tracing::warn!(sop_instance_uid = ?instance, error = %e, "STOW-RS part refused");
            failed(class, instance, failure_reason(&e))
        }
    }
}

/// Read the rest of a refused part; a broken body is the request's error
/// (reported once, by the caller), not this part's.
async fn drain(field: &mut multer::Field<'static>, limit: u64) -> Result<(), WebError> {
    while field
        .chunk()
        .await
        .map_err(|e| multipart_error(e, limit, 0))?
        .is_some()
    {}
    Ok(())
}

/// Where the File Meta Information of a Part-10 head ends, once the group
/// length element is in.
fn meta_end(head: &[u8]) -> Option<usize> {
    if head.len() < 144 || &head[128..132] != b"DICM" {
        return None;
    }
    // (0002,0000) UL, explicit VR little endian: tag, "UL", 2-byte length, value.
    if head[132..136] != [0x02, 0x00, 0x00, 0x00] || &head[136..138] != b"UL" {
        return None;
    }
    let len = u32::from_le_bytes([head[140], head[141], head[142], head[143]]) as usize;
    Some(144 + len)
}

fn failure_reason(e: &IngestError) -> u16 {
    match e {
        IngestError::Spool(_) => reason::OUT_OF_RESOURCES,
        IngestError::Unparsable(_) | IngestError::Incomplete(_) => reason::CANNOT_UNDERSTAND,
        IngestError::Mismatch {
            attribute: "Study Instance UID",
            ..
        } => reason::STUDY_MISMATCH,
        IngestError::Mismatch { .. } => reason::DOES_NOT_MATCH_SOP_CLASS,
        IngestError::Index(crate::index::IndexError::Conflict(_)) => reason::CANNOT_UNDERSTAND,
        IngestError::Store(_) | IngestError::Index(_) | IngestError::Internal(_) => {
            reason::PROCESSING_FAILURE
        }
    }
}

fn uid_el(v: Option<&str>) -> Value {
    match v {
        Some(u) => json!({"vr": "UI", "Value": [u]}),
        None => json!({"vr": "UI"}),
    }
}

/// The Store Instances Response Module (PS3.18 Table 10.5.3-1) and status.
fn answer(urls: &Urls, study: Option<&str>, results: &[PartResult]) -> Response {
    let mut referenced = Vec::new();
    let mut failed = Vec::new();
    let mut studies = Vec::new();
    for r in results {
        match r {
            PartResult::Stored(a) => {
                let s = &a.summary;
                if !studies.contains(&s.study_instance_uid) {
                    studies.push(s.study_instance_uid.clone());
                }
                referenced.push(json!({
                    "00081150": uid_el(Some(&s.sop_class_uid)),
                    "00081155": uid_el(Some(&s.sop_instance_uid)),
                    "00081190": {"vr": "UR", "Value": [urls.instance(
                        &s.study_instance_uid, &s.series_instance_uid, &s.sop_instance_uid)]},
                }));
            }
            PartResult::Failed {
                class,
                instance,
                reason,
            } => failed.push(json!({
                "00081150": uid_el(class.as_deref()),
                "00081155": uid_el(instance.as_deref()),
                "00081197": {"vr": "US", "Value": [reason]},
            })),
        }
    }
    let mut body = serde_json::Map::new();
    let study_url = study
        .map(str::to_string)
        .or_else(|| (studies.len() == 1).then(|| studies[0].clone()));
    // Type 2 (PS3.18 Table 10.5.3-2): present, empty when the instances
    // stored belong to several studies (or none).
    let retrieve_url = match study_url {
        Some(s) => json!({"vr": "UR", "Value": [urls.study(&s)]}),
        None => json!({"vr": "UR"}),
    };
    body.insert("00081190".into(), retrieve_url);
    if !failed.is_empty() {
        body.insert("00081198".into(), json!({"vr": "SQ", "Value": failed}));
    }
    if !referenced.is_empty() {
        body.insert("00081199".into(), json!({"vr": "SQ", "Value": referenced}));
    }
    let status = match (referenced.is_empty(), failed.is_empty()) {
        (false, true) => StatusCode::OK,
        (false, false) => StatusCode::ACCEPTED,
        (true, _) => StatusCode::CONFLICT,
    };
    (
        status,
        [(header::CONTENT_TYPE, DICOM_JSON)],
        Value::Object(body).to_string(),
    )
        .into_response()
}
