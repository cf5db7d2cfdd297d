//! Bulk data (PS3.18 §10.4.1.1.5): a value that an instance's metadata
//! names by BulkDataURI, whole or by HTTP Range, in Explicit VR Little
//! Endian as PS3.18 asks of bulk data, read straight from the stored object.

use std::ops::Range;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use dicom_core::VR;
use futures::stream::{self, StreamExt};

use super::PathParams;
use super::auth::Caller;
use super::media::{self, accept_of};
use super::multipart::{self, ByteStream, Part};
use super::problem::WebError;
use super::wado::{stream_response, visible_instance};
use crate::dicom::dataset::BULK_URI_PREFIX;
use crate::dicom::transcode;
use crate::hub::Hub;
use crate::index::search::Level;

/// `GET /studies/{s}/series/{r}/instances/{i}/bulk/{offset}/{length}`: a
/// BulkDataURI of this instance's metadata.
pub async fn bulk(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    headers: HeaderMap,
    PathParams((study, series, instance, offset, length)): PathParams<(
        String,
        String,
        String,
        u64,
        u64,
    )>,
) -> Result<Response, WebError> {
    let inst = visible_instance(&hub, &caller, &study, &series, &instance).await?;
    // Only ranges that are bulk data of this instance are served.
    let json = hub
        .index
        .dataset_json(Level::Instance, &[inst.id])
        .await?
        .remove(&inst.id)
        .unwrap_or_default();
    let Some(vr) = bulk_vr(&json, offset, length) else {
        return Err(WebError::NotFound);
    };
    let accept = accept_of(&headers);
    let single = accept.iter().find_map(|m| match m.essence.as_str() {
        "application/octet-stream" => Some(true),
        "multipart/related"
            if m.part_type
                .as_deref()
                .is_none_or(|t| t == "application/octet-stream" || t == "*/*") =>
        {
            Some(false)
        }
        "*/*" | "multipart/*" => Some(false),
        _ => None,
    });
    let Some(single) = single else {
        return Err(WebError::NotAcceptable(
            "bulk data is available as multipart/related; type=\"application/octet-stream\" or application/octet-stream".into(),
        ));
    };
    let (mut start, mut end) = (offset, offset + length);
    let mut status = StatusCode::OK;
    let mut content_range = None;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    if single && let Some(range) = range {
        match parse_range(range, length) {
            ByteRange::Within(s, e) => {
                content_range = Some(format!("bytes {s}-{}/{length}", e - 1));
                start = offset + s;
                end = offset + e;
                status = StatusCode::PARTIAL_CONTENT;
            }
            ByteRange::Unsatisfiable => return Err(WebError::RangeNotSatisfiable(length)),
            // RFC 9110 §14.2: a Range a server does not serve is ignored.
            ByteRange::Ignored => {}
        }
    }
    let data = if transcode::is_deflated(&inst.transfer_syntax) {
        // Positions count in the inflated data set (a Deflated object is
        // stored as received): inflated up to the value.
        let bytes = inflated_range(&hub, &inst.object_key, start..end).await?;
        stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(bytes)) }).boxed()
    } else {
        // Bulk data goes out in Explicit VR Little Endian (PS3.18 §8.7.3.5):
        // the numbers of a Big Endian object are swapped word by word.
        let width = if inst.transfer_syntax == media::EXPLICIT_VR_BE {
            vr.parse::<VR>().map_or(0, transcode::swap_width)
        } else {
            0
        };
        let words = Words::new(width, offset..offset + length, start..end);
        let read = hub
            .store
            .read(&inst.object_key, Some(words.read.clone()))
            .await?
            .map(|r| r.map_err(std::io::Error::other))
            .boxed();
        words.swapped(read)
    };
    if single {
        let mut resp = stream_response(status, "application/octet-stream", data);
        resp.headers_mut()
            .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
        if let Some(cr) = content_range.and_then(|c| HeaderValue::from_str(&c).ok()) {
            resp.headers_mut().insert(header::CONTENT_RANGE, cr);
        }
        return Ok(resp);
    }
    let boundary = multipart::boundary();
    let content_type = multipart::content_type(&boundary, "application/octet-stream", None);
    let part = Part {
        content_type: "application/octet-stream".into(),
        location: None,
        body: data,
    };
    Ok(stream_response(
        StatusCode::OK,
        &content_type,
        multipart::body(boundary, stream::iter([part]).boxed()),
    ))
}

/// Bytes `range` of the inflated data set of the Deflated object at `key`.
async fn inflated_range(
    hub: &Hub,
    key: &str,
    range: std::ops::Range<u64>,
) -> Result<Vec<u8>, WebError> {
    hub.store
        .on_local_copy(key, move |path| {
            crate::dicom::transcode::inflated_range(std::fs::File::open(path)?, range)
        })
        .await?
        .map_err(|e| WebError::Internal(e.to_string()))?
        .map_err(|e| WebError::Internal(format!("bulk data of a Deflated object: {e}")))
}

/// What a Range header asks of a value.
#[derive(Debug, PartialEq, Eq)]
enum ByteRange {
    /// One range, half-open, within the value.
    Within(u64, u64),
    /// One range that starts past the end (or an empty suffix): 416.
    Unsatisfiable,
    /// Another unit, several ranges, or not a valid range: the whole value
    /// is sent (RFC 9110 §14.2 lets a server ignore what it does not serve).
    Ignored,
}

/// The `bytes=` range of a value of `len` bytes that header value `v` asks for.
fn parse_range(v: &str, len: u64) -> ByteRange {
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return ByteRange::Ignored;
    };
    let Some((a, b)) = spec.split_once('-').filter(|_| !spec.contains(',')) else {
        return ByteRange::Ignored;
    };
    // Digits only (`parse` would also take a sign).
    let number = |t: &str| {
        (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse::<u64>().ok())
            .flatten()
    };
    match (a.trim(), b.trim()) {
        ("", n) => match number(n) {
            Some(0) => ByteRange::Unsatisfiable,
            Some(n) if len > 0 => ByteRange::Within(len.saturating_sub(n), len),
            // Not a number; or (RFC 9110 §14.1.1) a suffix of an empty
            // value, which is the whole of it.
            _ => ByteRange::Ignored,
        },
        (first, last) => {
            let Some(first) = number(first) else {
                return ByteRange::Ignored;
            };
            let last = match (last, number(last)) {
                ("", _) => None,
                (_, Some(l)) if l >= first => Some(l),
                _ => return ByteRange::Ignored,
            };
            if first >= len {
                return ByteRange::Unsatisfiable;
            }
            ByteRange::Within(first, last.map_or(len, |l| l.saturating_add(1).min(len)))
        }
    }
}

/// The VR of the bulk data value at `offset`/`length` in an instance's
/// metadata `json` (our own compact serialization: each bulk value is an
/// object of exactly `vr` and `BulkDataURI`), or `None` if the metadata
/// names no such value.
fn bulk_vr(json: &str, offset: u64, length: u64) -> Option<&str> {
    // With its key: a text value equal to the URI is a JSON string too, but
    // cannot hold this (its quotes would be escaped).
    let uri = format!("\"BulkDataURI\":\"{BULK_URI_PREFIX}{offset}/{length}\"");
    let at = json.find(&uri)?;
    let open = json[..at].rfind('{')?;
    let close = at + json[at..].find('}')?;
    let object = &json[open..close];
    let vr = object.find("\"vr\":\"")? + 6;
    object.get(vr..vr + 2)
}

/// The words of a value that a range of it touches: what to read (whole
/// words, within the value), and what of that to send once swapped.
#[derive(Debug, PartialEq, Eq)]
struct Words {
    /// Bytes per word (0 or 1: nothing to swap).
    width: u64,
    /// The object's bytes to read.
    read: Range<u64>,
    /// Bytes of `read` before the range asked for.
    skip: u64,
    /// Bytes of the range asked for.
    keep: u64,
}

impl Words {
    fn new(width: usize, value: Range<u64>, wanted: Range<u64>) -> Self {
        let width = width as u64;
        if width <= 1 {
            return Self {
                width,
                read: wanted.clone(),
                skip: 0,
                keep: wanted.end - wanted.start,
            };
        }
        let from = value.start + (wanted.start - value.start) / width * width;
        let to = (value.start + (wanted.end - value.start).div_ceil(width) * width).min(value.end);
        Self {
            width,
            read: from..to,
            skip: wanted.start - from,
            keep: wanted.end - wanted.start,
        }
    }

    /// `read`'s bytes with each whole word reversed (a trailing part word,
    /// left by a value whose length is not a multiple of the width, as is),
    /// cut to the range asked for.
    fn swapped(self, read: ByteStream) -> ByteStream {
        if self.width <= 1 {
            return read;
        }
        struct State {
            read: ByteStream,
            width: usize,
            carry: BytesMut,
            skip: usize,
            keep: u64,
            ended: bool,
        }
        impl State {
            /// `bytes` after what is still to skip, up to what is still to keep.
            fn cut(&mut self, mut bytes: Bytes) -> Bytes {
                let skipped = self.skip.min(bytes.len());
                self.skip -= skipped;
                let _ = bytes.split_to(skipped);
                let kept = bytes
                    .len()
                    .min(usize::try_from(self.keep).unwrap_or(usize::MAX));
                self.keep -= kept as u64;
                bytes.truncate(kept);
                bytes
            }
        }
        let state = State {
            read,
            width: self.width as usize,
            carry: BytesMut::new(),
            skip: usize::try_from(self.skip).unwrap_or(usize::MAX),
            keep: self.keep,
            ended: false,
        };
        stream::unfold(state, |mut s| async move {
            if s.ended {
                return None;
            }
            match s.read.next().await {
                Some(Ok(chunk)) => {
                    s.carry.extend_from_slice(&chunk);
                    let whole = s.carry.len() / s.width * s.width;
                    let mut words = s.carry.split_to(whole);
                    transcode::swap_words(&mut words, s.width);
                    let out = s.cut(words.freeze());
                    Some((Ok(out), s))
                }
                Some(Err(e)) => {
                    s.ended = true;
                    Some((Err(e), s))
                }
                None => {
                    s.ended = true;
                    let rest = std::mem::take(&mut s.carry).freeze();
                    let out = s.cut(rest);
                    Some((Ok(out), s))
                }
            }
        })
        .filter(|r| std::future::ready(r.as_ref().map_or(true, |b| !b.is_empty())))
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use ByteRange::*;
        assert_eq!(parse_range("bytes=0-99", 1000), Within(0, 100));
        assert_eq!(parse_range("bytes=-10", 1000), Within(990, 1000));
        assert_eq!(parse_range("bytes=-5000", 1000), Within(0, 1000));
        assert_eq!(parse_range("bytes=990-", 1000), Within(990, 1000));
        assert_eq!(parse_range("bytes=990-5000", 1000), Within(990, 1000));
        assert_eq!(parse_range("bytes=1000-", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=5000-6000", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), Ignored);
        assert_eq!(parse_range("bytes=200-100", 1000), Ignored);
        assert_eq!(parse_range("items=0-1", 1000), Ignored);
        assert_eq!(parse_range("bytes=x-1", 1000), Ignored);
        assert_eq!(parse_range("bytes=+5-", 1000), Ignored);
        assert_eq!(parse_range("bytes=-5", 0), Ignored);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
    }

    #[test]
    fn bulk_values_are_found_with_their_vr() {
        let json = format!(
            r#"{{"00281201":{{"vr":"OW","BulkDataURI":"{p}10/512"}},"7FE00010":{{"BulkDataURI":"{p}600/4096","vr":"OB"}}}}"#,
            p = BULK_URI_PREFIX
        );
        assert_eq!(bulk_vr(&json, 10, 512), Some("OW"));
        assert_eq!(bulk_vr(&json, 600, 4096), Some("OB"));
        assert_eq!(bulk_vr(&json, 10, 51), None);
        assert_eq!(bulk_vr(&json, 1, 512), None);
        // A text value that spells a URI names no bulk data.
        let uri = format!("{BULK_URI_PREFIX}0/100000");
        let crafted = serde_json::json!({
            "00100020": {"vr": "LO", "Value": [uri]},
            "00104000": {"vr": "LT", "Value": [format!("\"{uri}\"")]},
        })
        .to_string();
        assert_eq!(bulk_vr(&crafted, 0, 100000), None);
    }

    #[test]
    fn ranges_of_words_read_whole_words() {
        // A value of 10 bytes at 100, 4-byte words (the last one short).
        let w = |a, b| Words::new(4, 100..110, a..b);
        assert_eq!(w(100, 110).read, 100..110);
        assert_eq!((w(101, 103).read, w(101, 103).skip), (100..104, 1));
        assert_eq!((w(105, 109).read, w(105, 109).skip), (104..110, 1));
        assert_eq!(Words::new(0, 100..110, 101..103).read, 101..103);
    }

    #[tokio::test]
    async fn words_are_swapped_across_chunks() {
        let value: Vec<u8> = (0u8..10).collect();
        for (from, to) in [(0, 10), (1, 3), (3, 9), (8, 10), (9, 10)] {
            let words = Words::new(2, 0..10, from..to);
            let read = words.read.clone();
            let bytes = value[read.start as usize..read.end as usize].to_vec();
            // One byte per chunk: every word is split.
            let chunks: Vec<Result<Bytes, std::io::Error>> = bytes
                .into_iter()
                .map(|b| Ok(Bytes::from(vec![b])))
                .collect();
            let out: Vec<u8> = words
                .swapped(stream::iter(chunks).boxed())
                .map(|c| c.unwrap().to_vec())
                .concat()
                .await;
            let swapped = [1u8, 0, 3, 2, 5, 4, 7, 6, 9, 8];
            assert_eq!(out, swapped[from as usize..to as usize], "{from}..{to}");
        }
    }
}
