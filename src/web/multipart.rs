//! `multipart/related` bodies (RFC 2387) written as a stream: each part's
//! header, its body chunks as they come from the store, and the closing
//! delimiter. Nothing is buffered beyond the chunk in flight.

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};

pub type ByteStream = BoxStream<'static, Result<Bytes, std::io::Error>>;

/// A fresh boundary; never occurs in a part by construction of its randomness.
pub fn boundary() -> String {
    format!("tsunagu-{}", uuid::Uuid::new_v4().simple())
}

/// The `Content-Type` of a multipart answer whose parts are `part_type`.
pub fn content_type(boundary: &str, part_type: &str, transfer_syntax: Option<&str>) -> String {
    match transfer_syntax {
        Some(ts) => format!(
            "multipart/related; type=\"{part_type}\"; transfer-syntax={ts}; boundary={boundary}"
        ),
        None => format!("multipart/related; type=\"{part_type}\"; boundary={boundary}"),
    }
}

/// The delimiter and headers that open a part.
pub fn part_head(boundary: &str, content_type: &str, location: Option<&str>) -> Bytes {
    let mut s = format!("--{boundary}\r\nContent-Type: {content_type}\r\n");
    if let Some(l) = location {
        s.push_str(&format!("Content-Location: {l}\r\n"));
    }
    s.push_str("\r\n");
    Bytes::from(s)
}

/// The delimiter that closes the body.
pub fn close(boundary: &str) -> Bytes {
    Bytes::from(format!("\r\n--{boundary}--\r\n"))
}

/// One part: its headers and a lazily opened body.
pub struct Part {
    pub content_type: String,
    pub location: Option<String>,
    pub body: ByteStream,
}

/// A body that is opened only when the stream reaches it.
pub fn lazy<F>(open: F) -> ByteStream
where
    F: Future<Output = Result<ByteStream, std::io::Error>> + Send + 'static,
{
    stream::once(open)
        .flat_map(|r| match r {
            Ok(s) => s,
            Err(e) => stream::once(async move { Err(e) }).boxed(),
        })
        .boxed()
}

/// Join parts into one body stream. Parts after the first are preceded by
/// CRLF (the delimiter's leading line break).
pub fn body(boundary: String, parts: BoxStream<'static, Part>) -> ByteStream {
    let b = boundary.clone();
    let mut first = true;
    let heads = parts.flat_map(move |p| {
        let lead = if first {
            Bytes::new()
        } else {
            Bytes::from_static(b"\r\n")
        };
        first = false;
        let mut head = lead.to_vec();
        head.extend_from_slice(&part_head(&b, &p.content_type, p.location.as_deref()));
        let head = stream::once(async move { Ok(Bytes::from(head)) });
        head.chain(p.body).boxed()
    });
    heads
        .chain(stream::once(async move { Ok(close(&boundary)) }))
        .boxed()
}
