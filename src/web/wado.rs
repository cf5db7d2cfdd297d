//! WADO-RS (PS3.18 §10.4): instances, metadata, frames and bulk data of
//! what the caller may see, streamed from the store. Everything that can
//! fail (404, 406, 400) is decided before the first byte is sent.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::stream::{self, StreamExt};
use sha2::{Digest, Sha256};

use super::PathParams;
use super::auth::Caller;
use super::media::{self, MediaRange, accept_of};
use super::multipart::{self, ByteStream, Part};
use super::problem::WebError;
use super::{DICOM_JSON, Resource, Urls};
use crate::audit::{Action, AuditObject, Outcome};
use crate::auth::Role;
use crate::dicom::coerce::{self, Coercion, Provenance, coerce_json_text};
use crate::dicom::dataset::PixelLayout;
use crate::dicom::transcode;
use crate::hub::Hub;
use crate::index::metadata::{MetadataInstance, MetadataList};
use crate::index::search::{Level, Scope, StoredInstance};
use crate::store::{Store, StoreError};
use serde_json::json;

/// Instances whose metadata is fetched from the index in one query.
const METADATA_BATCH: usize = 256;

/// Batches of metadata being read at once (memory: this many batches' JSON).
const METADATA_BATCHES_AHEAD: usize = 2;

/// How a retrieved instance is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    /// The stored bytes.
    AsStored,
    /// Re-encoded to Explicit VR Little Endian.
    ExplicitLe,
}

/// The `transfer-syntax` a client asked instances in: `None` for the
/// default (Explicit VR Little Endian), `Some("*")` for as stored.
fn negotiate_instances(accept: &[MediaRange]) -> Result<Option<String>, WebError> {
    for m in accept {
        let dicom_parts = match m.essence.as_str() {
            "multipart/related" => m
                .part_type
                .as_deref()
                .is_none_or(|t| t == "application/dicom" || t == "*/*"),
            "application/dicom" | "*/*" | "multipart/*" => true,
            _ => false,
        };
        if dicom_parts {
            return Ok(m.transfer_syntax.clone());
        }
    }
    Err(WebError::NotAcceptable(
        "instances are available as multipart/related; type=\"application/dicom\"".into(),
    ))
}

/// The encoding of one instance for a requested transfer syntax; `None`
/// when it cannot be produced.
fn encoding_for(stored_ts: &str, requested: Option<&str>) -> Option<Encoding> {
    let web_forbidden = matches!(stored_ts, media::IMPLICIT_VR_LE | media::EXPLICIT_VR_BE);
    match requested {
        // As stored, but never Implicit VR or Big Endian on the web.
        Some("*") => Some(if web_forbidden {
            Encoding::ExplicitLe
        } else {
            Encoding::AsStored
        }),
        None => Some(if stored_ts == media::EXPLICIT_VR_LE {
            Encoding::AsStored
        } else if transcode::can_reencode(stored_ts) {
            Encoding::ExplicitLe
        } else {
            // Needs pixel decoding (not built yet): sent as stored, with the
            // transfer syntax named in the part (Conformance Statement).
            Encoding::AsStored
        }),
        Some(ts) if ts == stored_ts && !web_forbidden => Some(Encoding::AsStored),
        Some(media::EXPLICIT_VR_LE) if transcode::can_reencode(stored_ts) => {
            Some(Encoding::ExplicitLe)
        }
        Some(_) => None,
    }
}

/// The instances at `at` the caller may see (404 if none), each with the
/// coercion it is shown under if it is another institution's. The retrieve
/// (or its refusal) is audited.
async fn visible_instances(
    hub: &Hub,
    caller: &Caller,
    at: &Resource,
) -> Result<Vec<StoredInstance>, WebError> {
    caller.require(&[Role::Clinician], "retrieve images")?;
    let scope = super::scope_of(hub, caller).await?;
    let (study, series, sop) = at.uids();
    let found = hub.index.instances(&scope, study, series, sop).await?;
    audit_found(
        hub,
        caller,
        &scope,
        Action::Retrieve,
        at,
        found.len(),
        audit_objects(&found),
    )
    .await?;
    Ok(found)
}

/// Audit a request for `at` that found `count` visible instances of the
/// patients and studies `objects`; none is a 404, absent and hidden alike
/// (the trail tells them apart).
pub(super) async fn audit_found(
    hub: &Hub,
    caller: &Caller,
    scope: &Scope,
    action: Action,
    at: &Resource,
    count: usize,
    objects: Vec<AuditObject>,
) -> Result<(), WebError> {
    let mut detail = super::read_detail(scope, at.audit_detail());
    if count > 0 {
        detail["instances"] = json!(count);
        super::audit(hub, caller, action, Outcome::Success, objects, detail);
        return Ok(());
    }
    // Hidden or absent: found out after the 404 is sent (see
    // `Auditor::record_later`).
    let (index, at) = (hub.index.clone(), at.clone());
    hub.audit
        .record_later(&caller.actor(), action, detail, async move {
            let (study, series, sop) = at.uids();
            match index
                .metadata_list(&Scope::unrestricted_for_audit(), study, series, sop)
                .await
            {
                Ok(hidden) if !hidden.instances.is_empty() => {
                    (Outcome::Denied, metadata_objects(&hidden))
                }
                Ok(_) => (Outcome::Failure, Vec::new()),
                Err(e) => {
                    tracing::warn!(error = %e, "audit: cannot tell a refused request's objects");
                    (Outcome::Failure, Vec::new())
                }
            }
        });
    Err(WebError::NotFound)
}

/// The patients (as their owners know them) and studies of a metadata list.
fn metadata_objects(list: &MetadataList) -> Vec<AuditObject> {
    AuditObject::distinct(list.studies.iter().map(|s| {
        (
            s.patient.0.as_str(),
            s.patient.2.as_str(),
            s.study_uid.as_str(),
        )
    }))
}

/// The one instance a frame, bulk data or WADO-URI request names, if visible
/// (retrieves are audited as such).
pub(super) async fn visible_instance(
    hub: &Hub,
    caller: &Caller,
    study: &str,
    series: &str,
    instance: &str,
) -> Result<StoredInstance, WebError> {
    let at = Resource::instance(study, series, instance);
    let mut found = visible_instances(hub, caller, &at).await?;
    Ok(found.swap_remove(0))
}

/// The visible studies and instances of a metadata request (audited as an
/// access), or 404.
async fn visible_metadata(
    hub: &Hub,
    caller: &Caller,
    at: &Resource,
) -> Result<MetadataList, WebError> {
    caller.require(&[Role::Clinician], "retrieve images")?;
    let scope = super::scope_of(hub, caller).await?;
    let (study, series, sop) = at.uids();
    let list = hub.index.metadata_list(&scope, study, series, sop).await?;
    audit_found(
        hub,
        caller,
        &scope,
        Action::Access,
        at,
        list.instances.len(),
        metadata_objects(&list),
    )
    .await?;
    Ok(list)
}

/// The patients (as their owners know them) and studies of `instances`.
pub(super) fn audit_objects(instances: &[StoredInstance]) -> Vec<AuditObject> {
    AuditObject::distinct(instances.iter().map(|i| {
        (
            i.patient.0.as_str(),
            i.patient.2.as_str(),
            i.study_uid.as_str(),
        )
    }))
}

/// `GET /studies/{study}`, `…/series/{series}`, `…/instances/{instance}`
pub async fn retrieve(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    urls: Urls,
    headers: HeaderMap,
    at: Resource,
) -> Result<Response, WebError> {
    let requested = negotiate_instances(&accept_of(&headers))?;
    let found = visible_instances(&hub, &caller, &at).await?;
    let now = hub.clock.now();
    let plan = found
        .into_iter()
        .map(|inst| Planned::new(&caller, inst, requested.as_deref(), now))
        .collect::<Result<Vec<_>, _>>()?;
    let boundary = multipart::boundary();
    let content_type = multipart::content_type(&boundary, "application/dicom", None);
    let sender = Arc::new(InstanceSender {
        hub,
        caller,
        requested,
        now,
        urls,
    });
    let parts = stream::iter(plan)
        .then(move |p| sender.clone().part(p))
        .filter_map(std::future::ready)
        .boxed();
    let body = multipart::body(boundary, parts);
    Ok(stream_response(StatusCode::OK, &content_type, body))
}

/// One instance of a retrieve, and how it is sent.
struct Planned {
    inst: StoredInstance,
    enc: Encoding,
    coerce: Option<(Coercion, Provenance)>,
}

impl Planned {
    fn new(
        caller: &Caller,
        inst: StoredInstance,
        requested: Option<&str>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Self, WebError> {
        let enc = encoding_for(&inst.transfer_syntax, requested).ok_or_else(|| {
            WebError::NotAcceptable(format!(
                "instance {} is stored as {} and cannot be sent as {}",
                inst.sop_uid,
                inst.transfer_syntax,
                requested.unwrap_or_default()
            ))
        })?;
        let (enc, coerce) = coercion_plan(caller, &inst, enc, requested, now)?;
        Ok(Self { inst, enc, coerce })
    }
}

/// Sends the parts of a retrieve, each opened only when the answer reaches it.
struct InstanceSender {
    hub: Arc<Hub>,
    caller: Caller,
    requested: Option<String>,
    now: chrono::DateTime<chrono::Utc>,
    urls: Urls,
}

impl InstanceSender {
    /// The part of `p`, opened before its head is sent. A copy that a new
    /// version of the instance replaced (and deleted) since the instances
    /// were listed is not an error: the current version is sent instead,
    /// if the caller may still see it; an instance gone meanwhile is left out.
    async fn part(self: Arc<Self>, mut p: Planned) -> Option<Part> {
        for _ in 0..REPLACED_RETRIES {
            let opened = open_instance(
                self.hub.store.clone(),
                p.inst.clone(),
                p.enc,
                p.coerce.clone(),
            )
            .await;
            let e = match opened {
                Ok(body) => return Some(self.part_of(&p, body)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => e,
                Err(e) => return Some(self.part_of(&p, stream::once(async { Err(e) }).boxed())),
            };
            let (i, now) = (&p.inst, self.now);
            // Looked up as the caller may see it now; only the copy of the
            // same patient (other institutions hold copies of their own,
            // and another patient's would not be in the audited access).
            let found = match super::scope_of(&self.hub, &self.caller).await {
                Ok(scope) => self
                    .hub
                    .index
                    .instances(&scope, &i.study_uid, Some(&i.series_uid), Some(&i.sop_uid))
                    .await
                    .map_err(std::io::Error::other),
                Err(we) => Err(std::io::Error::other(we.to_string())),
            };
            let current = match found {
                Ok(found) => match found.into_iter().find(|c| c.patient == i.patient) {
                    Some(c) => c,
                    None => {
                        tracing::info!(sop = %i.sop_uid, "instance gone, or now of another patient, while its study was sent: left out");
                        return None;
                    }
                },
                Err(ie) => {
                    return Some(self.part_of(&p, stream::once(async { Err(ie) }).boxed()));
                }
            };
            if current.object_key == p.inst.object_key {
                // Indexed yet missing: a real loss, not a replacement.
                tracing::error!(key = %p.inst.object_key, "an indexed object is missing from the store");
                return Some(self.part_of(&p, stream::once(async { Err(e) }).boxed()));
            }
            match Planned::new(&self.caller, current, self.requested.as_deref(), now) {
                Ok(next) => p = next,
                Err(_) => {
                    tracing::warn!(sop = %p.inst.sop_uid, "the new version of an instance cannot be sent as asked: left out");
                    return None;
                }
            }
        }
        tracing::warn!(sop = %p.inst.sop_uid, "an instance replaced again and again while sent: left out");
        None
    }

    fn part_of(&self, p: &Planned, body: ByteStream) -> Part {
        let ts = match p.enc {
            Encoding::AsStored => p.inst.transfer_syntax.as_str(),
            Encoding::ExplicitLe => media::EXPLICIT_VR_LE,
        };
        let i = &p.inst;
        Part {
            content_type: format!("application/dicom; transfer-syntax={ts}"),
            location: Some(self.urls.instance(&i.study_uid, &i.series_uid, &i.sop_uid)),
            body,
        }
    }
}

/// Versions of one instance a retrieve follows before it leaves it out.
const REPLACED_RETRIES: usize = 3;

pub(super) fn stream_response(
    status: StatusCode,
    content_type: &str,
    body: ByteStream,
) -> Response {
    let mut resp = Response::new(Body::from_stream(body));
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

/// The bytes of one instance in `enc`, as a stream; another institution's
/// instance coerced to the requester's identifiers when `coerce` says so.
async fn open_instance(
    store: Arc<Store>,
    inst: StoredInstance,
    enc: Encoding,
    coerce: Option<(Coercion, Provenance)>,
) -> Result<ByteStream, std::io::Error> {
    if enc == Encoding::AsStored && coerce.is_none() {
        let s = store
            .read(&inst.object_key, None)
            .await
            .map_err(StoreError::into_io)?;
        return Ok(s.map(|r| r.map_err(std::io::Error::other)).boxed());
    }
    let (path, temporary) = store
        .fetch_to_path(&inst.object_key)
        .await
        .map_err(StoreError::into_io)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    // Opened before the answer goes on: a copy deleted since it was listed
    // is known before any of its bytes (or its part's head) are sent.
    let (opened_tx, opened_rx) = tokio::sync::oneshot::channel();
    tokio::task::spawn_blocking(move || {
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                let _ = opened_tx.send(Err(e));
                if temporary {
                    let _ = std::fs::remove_file(&path);
                }
                return;
            }
        };
        let _ = opened_tx.send(Ok(()));
        let result = Ok(file).and_then(|f| {
            let src = std::io::BufReader::new(f);
            let mut w = ChannelWriter::new(tx.clone());
            match (&enc, &coerce) {
                (Encoding::ExplicitLe, None) => {
                    transcode::to_explicit_le(src, &mut w).map_err(std::io::Error::other)?
                }
                (Encoding::AsStored, Some((c, p))) => {
                    coerce::coerce_part10(src, &mut w, c, p).map_err(std::io::Error::other)?
                }
                (Encoding::ExplicitLe, Some((c, p))) => {
                    // Re-encoded first (to a temporary file: memory stays
                    // bounded), then coerced.
                    let mut le = tempfile::tempfile()?;
                    transcode::to_explicit_le(src, &mut std::io::BufWriter::new(&mut le))
                        .map_err(std::io::Error::other)?;
                    coerce::coerce_part10(std::io::BufReader::new(le), &mut w, c, p)
                        .map_err(std::io::Error::other)?
                }
                (Encoding::AsStored, None) => unreachable!("streamed above"),
            }
            std::io::Write::flush(&mut w)
        });
        if temporary {
            let _ = std::fs::remove_file(&path);
        }
        if let Err(e) = result {
            tracing::error!(key = %inst.object_key, error = %e, "re-encoding failed mid-answer");
            let _ = tx.blocking_send(Err(e));
        }
    });
    opened_rx
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("the re-encoding task ended")))?;
    Ok(tokio_stream_from(rx))
}

/// Whether and how an instance is coerced for `caller`, and the encoding
/// that allows it: objects whose data set is not Explicit VR Little Endian
/// are re-encoded first.
fn coercion_plan(
    caller: &Caller,
    inst: &StoredInstance,
    enc: Encoding,
    requested: Option<&str>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(Encoding, Option<(Coercion, Provenance)>), WebError> {
    let Some(c) = inst
        .coercion
        .clone()
        .filter(|_| caller.institution.coerce_patient_ids)
    else {
        return Ok((enc, None));
    };
    let enc = if enc == Encoding::AsStored && !coerce::coercible_as_stored(&inst.transfer_syntax) {
        if requested.is_some_and(|r| r != "*" && r != media::EXPLICIT_VR_LE) {
            return Err(WebError::NotAcceptable(format!(
                "instance {} is shown under your patient ID and can be sent as {} only",
                inst.sop_uid,
                media::EXPLICIT_VR_LE
            )));
        }
        Encoding::ExplicitLe
    } else {
        enc
    };
    let provenance = Provenance {
        source: inst.patient.0.clone(),
        modified_at: now.format("%Y%m%d%H%M%S%.6f+0000").to_string(),
    };
    Ok((enc, Some((c, provenance))))
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> ByteStream {
    stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

/// A `Write` that hands 256 KiB chunks to an async receiver.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    const CHUNK: usize = 256 << 10;

    fn new(tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>) -> Self {
        Self {
            tx,
            buf: Vec::with_capacity(Self::CHUNK),
        }
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(Self::CHUNK));
        self.tx
            .blocking_send(Ok(Bytes::from(chunk)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= Self::CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

// ---------------------------------------------------------------- metadata

/// `GET …/metadata` of a study, series or instance
pub async fn metadata(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    urls: Urls,
    headers: HeaderMap,
    at: Resource,
) -> Result<Response, WebError> {
    let accept = accept_of(&headers);
    let format = media::dataset_format(&accept).ok_or_else(|| {
        WebError::NotAcceptable(
            "metadata is available as application/dicom+json or multipart/related; type=\"application/dicom+xml\"".into(),
        )
    })?;
    let list = visible_metadata(&hub, &caller, &at).await?;
    // The answer is a function of the studies' instances (each study row's
    // version changes with any of them), of how the caller is shown their
    // patients, of what was asked and of where bulk data is served from: so
    // is its validator.
    let mut h = Sha256::new();
    h.update(urls.root.as_bytes());
    h.update([format as u8]);
    for uid in [
        at.study.as_deref(),
        at.series.as_deref(),
        at.instance.as_deref(),
    ] {
        h.update(uid.unwrap_or_default().as_bytes());
        h.update([0]);
    }
    for st in &list.studies {
        h.update(st.id.to_le_bytes());
        h.update(st.content_version.to_le_bytes());
        // Others' objects are shown under the requester's IDs.
        if let Some(c) = &st.coercion {
            for v in [&c.patient_id, &c.issuer] {
                h.update(v.as_bytes());
                h.update([0]);
            }
        }
    }
    // Weak: the gzip and identity bodies of one answer share it (RFC 9110
    // §8.8.3), and If-None-Match compares weakly anyway.
    let tag = format!("\"{}\"", &hex::encode(h.finalize())[..32]);
    let etag = format!("W/{tag}");
    let not_modified = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            t == "*" || t.trim_start_matches("W/") == tag
        });
    if not_modified {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        resp.headers_mut().insert(
            header::ETAG,
            HeaderValue::from_str(&etag).expect("hex etag"),
        );
        // As the 200 would have (RFC 9110 §15.4.5).
        resp.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, no-cache"),
        );
        return Ok(resp);
    }
    let hub = hub.clone();
    let studies = Arc::new(list.studies);
    let mut found = list.instances.into_iter();
    let batches: Vec<Vec<MetadataInstance>> = std::iter::from_fn(|| {
        let batch: Vec<MetadataInstance> = found.by_ref().take(METADATA_BATCH).collect();
        (!batch.is_empty()).then_some(batch)
    })
    .collect();
    let study_uid = at.study.clone().unwrap_or_default();
    let bulk = Arc::new(urls.bulk_rewriter());
    // Batches of instances' JSON texts, bulk data URIs resolved; the next
    // batch is read while the one before is encoded and sent.
    let texts = stream::iter(batches)
        .map(move |batch| {
            let hub = hub.clone();
            let bulk = bulk.clone();
            let studies = studies.clone();
            let study_uid = study_uid.clone();
            async move {
                let ids: Vec<i64> = batch.iter().map(|i| i.id).collect();
                let mut json = hub
                    .index
                    .dataset_json(Level::Instance, &ids)
                    .await
                    .map_err(std::io::Error::other)?;
                let mut out = Vec::with_capacity(batch.len());
                for inst in &batch {
                    if let Some(mut text) = json.remove(&inst.id) {
                        if let Some(c) = &studies[inst.study].coercion {
                            text = coerce_json_text(&text, c);
                        }
                        out.push(bulk.rewrite(text, &study_uid, &inst.series_uid, &inst.sop_uid));
                    }
                }
                Ok::<_, std::io::Error>(out)
            }
        })
        .buffered(METADATA_BATCHES_AHEAD)
        .boxed();
    if format == media::DatasetFormat::Xml {
        let boundary = multipart::boundary();
        let content_type = multipart::content_type(&boundary, "application/dicom+xml", None);
        let parts = texts
            .flat_map(|r| {
                let docs: Vec<Result<Bytes, std::io::Error>> = match r {
                    Ok(items) => items
                        .iter()
                        .map(|t| match serde_json::from_str::<serde_json::Value>(t) {
                            Ok(serde_json::Value::Object(m)) => {
                                Ok(Bytes::from(super::xml::document(&m)))
                            }
                            _ => Err(std::io::Error::other("stored metadata is not JSON")),
                        })
                        .collect(),
                    Err(e) => vec![Err(e)],
                };
                stream::iter(docs)
            })
            .map(|doc| Part {
                content_type: "application/dicom+xml".into(),
                location: None,
                body: stream::iter([doc]).boxed(),
            })
            .boxed();
        let mut resp = stream_response(
            StatusCode::OK,
            &content_type,
            multipart::body(boundary, parts),
        );
        resp.headers_mut().insert(
            header::ETAG,
            HeaderValue::from_str(&etag).expect("hex etag"),
        );
        resp.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, no-cache"),
        );
        return Ok(resp);
    }
    let mut first = true;
    let body = texts
        .map(move |r| {
            r.map(|items| {
                let mut chunk = String::new();
                for item in items {
                    chunk.push(if first { '[' } else { ',' });
                    first = false;
                    chunk.push_str(&item);
                }
                Bytes::from(chunk)
            })
        })
        .chain(stream::once(async { Ok(Bytes::from_static(b"]")) }))
        .boxed();
    let mut resp = stream_response(StatusCode::OK, DICOM_JSON, body);
    resp.headers_mut().insert(
        header::ETAG,
        HeaderValue::from_str(&etag).expect("hex etag"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache"),
    );
    Ok(resp)
}

// ------------------------------------------------------------------ frames

/// `GET /studies/{s}/series/{r}/instances/{i}/frames/{list}`
pub async fn frames(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    urls: Urls,
    headers: HeaderMap,
    PathParams((study, series, instance, list)): PathParams<(String, String, String, String)>,
) -> Result<Response, WebError> {
    let numbers = parse_frame_list(&list)?;
    let accept = accept_of(&headers);
    let inst = visible_instance(&hub, &caller, &study, &series, &instance).await?;
    let layout: PixelLayout = inst
        .pixel_layout
        .as_deref()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| WebError::bad_request("the instance has no pixel data"))?;
    let count = layout.frames.len();
    if count == 0 {
        return Err(WebError::NotAcceptable(format!(
            "frames of objects stored as {} cannot be retrieved yet",
            inst.transfer_syntax
        )));
    }
    if let Some(bad) = numbers.iter().find(|n| **n as usize > count) {
        return Err(WebError::bad_request(format!(
            "frame {bad} is out of range: the instance has {count} frame(s)"
        )));
    }
    // Each listed frame is read (and perhaps decoded) again: a list longer
    // than the instance's frames repeats some, and a short URL could ask for
    // one frame tens of thousands of times.
    if numbers.len() > count {
        return Err(WebError::bad_request(format!(
            "a frame list names at most as many frames as the instance has ({count})"
        )));
    }
    let bits = inst.bits_allocated.unwrap_or(8).max(1) as usize;
    let part_type = negotiate_frames(&accept, &inst.transfer_syntax, layout.encapsulated, bits)?;
    let boundary = multipart::boundary();
    let content_type = multipart::content_type(&boundary, part_type.essence(), None);
    // Opened once for every frame of the answer: a replacement of the
    // instance meanwhile does not cut the answer short.
    let object = hub.store.reader(&inst.object_key).await?;
    let base = urls.instance(&inst.study_uid, &inst.series_uid, &inst.sop_uid);
    let (rows, columns) = (
        inst.rows.unwrap_or(0).max(0) as usize,
        inst.columns.unwrap_or(0).max(0) as usize,
    );
    // Decoding needs the object's header (everything before the first
    // frame's bytes), read once for the answer.
    let head = if part_type.conversion == FrameConversion::Decode {
        if super::images::decoded_size(&inst) > crate::imaging::render::MAX_DECODED_FRAME {
            return Err(WebError::NotAcceptable(format!(
                "frames of {columns} × {rows} are too large to decode here; ask with \
                 transfer-syntax=* for the stored ones"
            )));
        }
        Some(
            object
                .read_range(0..layout.header_end().unwrap_or(0))
                .await?,
        )
    } else {
        None
    };
    let encapsulated = layout.encapsulated;
    let imaging = hub.imaging.clone();
    let parts = stream::iter(numbers)
        .map(move |n| {
            let ranges = layout.frames[n as usize - 1].clone();
            let object = object.clone();
            let conversion = part_type.conversion;
            let (head, imaging) = (head.clone(), imaging.clone());
            Part {
                content_type: part_type.header(),
                location: Some(format!("{base}/frames/{n}")),
                body: multipart::lazy(async move {
                    let chunks = match (conversion, head) {
                        (FrameConversion::Decode, Some(head)) => {
                            // The imaging place first, as for pictures:
                            // frames waiting for it hold no bytes.
                            let place = imaging.permit().await.map_err(std::io::Error::other)?;
                            let source = crate::imaging::render::Source::of_frame(
                                head,
                                object
                                    .read_ranges(&ranges)
                                    .await
                                    .map_err(std::io::Error::other)?,
                                encapsulated,
                                n,
                            );
                            let pixels = imaging
                                .run_with(place, move || {
                                    crate::imaging::render::native_frame(source)
                                })
                                .await
                                .map_err(std::io::Error::other)?
                                .map_err(std::io::Error::other)?;
                            vec![Bytes::from(pixels)]
                        }
                        _ => {
                            let chunks = object
                                .read_ranges(&ranges)
                                .await
                                .map_err(std::io::Error::other)?;
                            convert_frame(chunks, conversion, rows, columns, bits)?
                        }
                    };
                    Ok(stream::iter(chunks.into_iter().map(Ok)).boxed())
                }),
            }
        })
        .boxed();
    Ok(stream_response(
        StatusCode::OK,
        &content_type,
        multipart::body(boundary, parts),
    ))
}

/// Apply `conversion` to the stored bytes of one frame.
fn convert_frame(
    chunks: Vec<Bytes>,
    conversion: FrameConversion,
    rows: usize,
    columns: usize,
    bits: usize,
) -> Result<Vec<Bytes>, std::io::Error> {
    match conversion {
        FrameConversion::AsStored => Ok(chunks),
        FrameConversion::SwapBytes(width) => Ok(chunks
            .into_iter()
            .map(|c| {
                let mut v = c.to_vec();
                transcode::swap_words(&mut v, width);
                Bytes::from(v)
            })
            .collect()),
        // Decoded on the imaging pool by `frames` itself.
        FrameConversion::Decode => Ok(chunks),
        FrameConversion::DecodeRle => {
            let fragment: Vec<u8> = chunks.concat();
            let frame = crate::dicom::rle::decode_frame_of(&fragment, rows, columns, bits)
                .map_err(std::io::Error::other)?;
            Ok(vec![Bytes::from(frame)])
        }
    }
}

/// 1-based frame numbers of a `frames/{list}` path.
fn parse_frame_list(list: &str) -> Result<Vec<u32>, WebError> {
    list.split(',')
        .map(|f| match f.trim().parse::<u32>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(WebError::bad_request(format!(
                "{f:?} is not a frame number (1, 2, ...)"
            ))),
        })
        .collect()
}

/// How stored frame bytes become the answer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameConversion {
    AsStored,
    /// Big-endian native data: swap each `n`-byte word.
    SwapBytes(usize),
    /// RLE Lossless fragments decoded to native little-endian.
    DecodeRle,
    /// Other compressed fragments decoded to native little-endian on the
    /// imaging pool (the object's header gives the decoder its parameters).
    Decode,
}

/// The media type frames are sent in.
#[derive(Debug, Clone)]
struct FramePart {
    media: &'static str,
    transfer_syntax: Option<String>,
    conversion: FrameConversion,
}

impl FramePart {
    fn essence(&self) -> &'static str {
        self.media
    }

    fn header(&self) -> String {
        match &self.transfer_syntax {
            Some(ts) => format!("{}; transfer-syntax={ts}", self.media),
            None => self.media.to_string(),
        }
    }
}

const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";

fn negotiate_frames(
    accept: &[MediaRange],
    stored_ts: &str,
    encapsulated: bool,
    bits_allocated: usize,
) -> Result<FramePart, WebError> {
    let native = |conversion| FramePart {
        media: "application/octet-stream",
        transfer_syntax: Some(media::EXPLICIT_VR_LE.into()),
        conversion,
    };
    let stored_media = media::frame_media_type(stored_ts);
    for m in accept {
        let wanted = match m.essence.as_str() {
            "multipart/related" => m
                .part_type
                .clone()
                .unwrap_or("application/octet-stream".into()),
            "*/*" | "multipart/*" => "*/*".into(),
            other => other.to_string(),
        };
        let ts = m.transfer_syntax.as_deref();
        let octet = matches!(wanted.as_str(), "application/octet-stream" | "*/*");
        if !encapsulated {
            if octet && matches!(ts, None | Some("*") | Some(media::EXPLICIT_VR_LE)) {
                let conversion = if stored_ts == media::EXPLICIT_VR_BE && bits_allocated > 8 {
                    FrameConversion::SwapBytes(bits_allocated / 8)
                } else {
                    FrameConversion::AsStored
                };
                return Ok(native(conversion));
            }
            continue;
        }
        // Native pixels were asked for and we can decode this syntax.
        if stored_ts == RLE_LOSSLESS && octet && matches!(ts, None | Some(media::EXPLICIT_VR_LE)) {
            return Ok(native(FrameConversion::DecodeRle));
        }
        // (jpeg-decoder reads 8-bit JPEG Extended only.)
        let twelve_bit_jpeg = stored_ts == "1.2.840.10008.1.2.4.51" && bits_allocated > 8;
        if wanted == "application/octet-stream"
            && matches!(ts, None | Some(media::EXPLICIT_VR_LE))
            && crate::imaging::render::can_render(stored_ts)
            && !twelve_bit_jpeg
        {
            return Ok(native(FrameConversion::Decode));
        }
        if !(matches!(ts, None | Some("*")) || ts == Some(stored_ts)) {
            continue;
        }
        let same_media = wanted == stored_media
            || (stored_media == "image/dicom-rle" && wanted == "image/x-dicom-rle");
        if same_media || octet {
            // Compressed frames go out as stored, in their own media type
            // unless octet-stream was asked for (Conformance Statement).
            let media = if wanted == "application/octet-stream" {
                "application/octet-stream"
            } else {
                stored_media
            };
            return Ok(FramePart {
                media,
                transfer_syntax: Some(stored_ts.into()),
                conversion: FrameConversion::AsStored,
            });
        }
    }
    Err(WebError::NotAcceptable(format!(
        "frames of this instance are available as {} (transfer syntax {})",
        if encapsulated {
            stored_media
        } else {
            "application/octet-stream"
        },
        if encapsulated {
            stored_ts
        } else {
            media::EXPLICIT_VR_LE
        }
    )))
}

// --------------------------------------------------------------- WADO-URI

/// A WADO-URI query parameter (PS3.18 §9: names compare case-insensitively).
pub(super) fn wado_uri_param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// `GET /wado?requestType=WADO&studyUID=…&seriesUID=…&objectUID=…` (PS3.18
/// §9): one instance as `application/dicom`, or one frame as `image/jpeg` or
/// `image/png` (the first listed `contentType` that can be answered; absent:
/// `application/dicom`, a documented deviation).
pub async fn wado_uri(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Result<Response, WebError> {
    let params: Vec<(String, String)> =
        url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    let get = |name: &str| wado_uri_param(&params, name);
    if get("requestType") != Some("WADO") {
        return Err(WebError::bad_request("requestType must be WADO"));
    }
    let (Some(study), Some(series), Some(object)) =
        (get("studyUID"), get("seriesUID"), get("objectUID"))
    else {
        return Err(WebError::bad_request(
            "studyUID, seriesUID and objectUID are required",
        ));
    };
    let content_types: Vec<String> = get("contentType")
        .unwrap_or("application/dicom")
        .split(',')
        .map(|t| {
            t.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .collect();
    // The first listed type that can be answered.
    let picture = content_types.iter().find_map(|t| match t.as_str() {
        "application/dicom" | "*/*" => Some(None),
        "image/jpeg" | "image/*" => Some(Some(false)),
        "image/png" => Some(Some(true)),
        _ => None,
    });
    match picture {
        Some(Some(png)) => {
            return super::images::wado_uri_picture(
                &hub, &caller, study, series, object, png, &params,
            )
            .await;
        }
        Some(None) => {}
        None => {
            return Err(WebError::NotAcceptable(format!(
                "contentType {} is not available; application/dicom, image/jpeg and image/png are",
                content_types.join(",")
            )));
        }
    }
    // Asked of an application/dicom answer, these would be silently ignored:
    // an anonymized object sent identified, a frame sent as the whole object.
    for unsupported in [
        "anonymize",
        "frameNumber",
        "rows",
        "columns",
        "region",
        "windowCenter",
        "windowWidth",
        "imageQuality",
        "presentationUID",
        "presentationSeriesUID",
    ] {
        if get(unsupported).is_some() {
            return Err(WebError::bad_request(format!(
                "{unsupported} is not supported (application/dicom objects are sent whole and as stored)"
            )));
        }
    }
    let requested = get("transferSyntax").map(str::to_string);
    let inst = visible_instance(&hub, &caller, study, series, object).await?;
    let enc = encoding_for(&inst.transfer_syntax, requested.as_deref()).ok_or_else(|| {
        WebError::NotAcceptable(format!(
            "the object is stored as {} and cannot be sent as {}",
            inst.transfer_syntax,
            requested.as_deref().unwrap_or_default()
        ))
    })?;
    let (enc, coerce) = coercion_plan(&caller, &inst, enc, requested.as_deref(), hub.clock.now())?;
    let file_name = format!("{}.dcm", inst.sop_uid);
    let body = open_instance(hub.store.clone(), inst, enc, coerce)
        .await
        .map_err(|e| WebError::Unavailable(e.to_string()))?;
    let mut resp = stream_response(StatusCode::OK, "application/dicom", body);
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{file_name}\"")) {
        resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn web_services_never_send_implicit_or_big_endian() {
        for ts in [media::IMPLICIT_VR_LE, media::EXPLICIT_VR_BE] {
            assert_eq!(encoding_for(ts, Some("*")), Some(Encoding::ExplicitLe));
            assert_eq!(encoding_for(ts, None), Some(Encoding::ExplicitLe));
            assert_eq!(encoding_for(ts, Some(ts)), None);
        }
        let jpeg = "1.2.840.10008.1.2.4.50";
        assert_eq!(encoding_for(jpeg, Some("*")), Some(Encoding::AsStored));
        assert_eq!(encoding_for(jpeg, Some(media::EXPLICIT_VR_LE)), None);
        assert_eq!(encoding_for(jpeg, Some("1.2.840.10008.1.2.4.90")), None);
    }

    #[test]
    fn frame_lists() {
        assert_eq!(parse_frame_list("2,5").unwrap(), vec![2, 5]);
        assert!(parse_frame_list("0").is_err());
        assert!(parse_frame_list("a").is_err());
    }
}
