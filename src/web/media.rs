//! Media types: parsing `Accept` (RFC 9110 §12.5.1, with the `type` and
//! `transfer-syntax` parameters of PS3.18 §8.7) and the media type of each
//! encapsulated transfer syntax (PS3.18 Table 8.7.3-2).

/// One media range of an `Accept` header.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaRange {
    /// `type/subtype`, lower case.
    pub essence: String,
    /// The `type` parameter of `multipart/related`, lower case, unquoted.
    pub part_type: Option<String>,
    /// The `transfer-syntax` parameter, unquoted.
    pub transfer_syntax: Option<String>,
    pub q: f32,
}

impl MediaRange {
    pub fn is(&self, essence: &str) -> bool {
        self.essence == essence
    }

    /// `*/*` or `type/*` covering `essence`.
    pub fn covers(&self, essence: &str) -> bool {
        self.essence == essence
            || self.essence == "*/*"
            || self
                .essence
                .strip_suffix("/*")
                .is_some_and(|t| essence.split('/').next() == Some(t))
    }
}

/// Split on `sep` outside double quotes.
fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// The media ranges of a request's `Accept` headers, best first.
pub fn accept_of(headers: &axum::http::HeaderMap) -> Vec<MediaRange> {
    parse_accept(
        headers
            .get_all(axum::http::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
}

/// The media ranges of `Accept` headers, best first (stable for equal q).
/// No header means `*/*`.
pub fn parse_accept<'a>(values: impl Iterator<Item = &'a str>) -> Vec<MediaRange> {
    let mut out = Vec::new();
    // Ranges named, acceptable or not: an Accept that refuses everything it
    // names (`q=0`) accepts nothing, which is not the same as no Accept.
    let mut named = 0;
    for value in values {
        for range in split_unquoted(value, ',') {
            let mut parts = split_unquoted(range, ';').into_iter();
            let essence = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            if essence.is_empty() {
                continue;
            }
            named += 1;
            let mut m = MediaRange {
                essence,
                part_type: None,
                transfer_syntax: None,
                q: 1.0,
            };
            for p in parts {
                let Some((k, v)) = p.split_once('=') else {
                    continue;
                };
                let v = v.trim().trim_matches('"').trim();
                match k.trim().to_ascii_lowercase().as_str() {
                    "type" => m.part_type = Some(v.to_ascii_lowercase()),
                    "transfer-syntax" => m.transfer_syntax = Some(v.to_string()),
                    "q" => m.q = v.parse().unwrap_or(0.0),
                    _ => {}
                }
            }
            if m.q > 0.0 {
                out.push(m);
            }
        }
    }
    if out.is_empty() && named == 0 {
        out.push(MediaRange {
            essence: "*/*".into(),
            part_type: None,
            transfer_syntax: None,
            q: 1.0,
        });
    }
    out.sort_by(|a, b| b.q.total_cmp(&a.q));
    out
}

/// How DICOM data sets are answered (QIDO-RS results, metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetFormat {
    /// `application/dicom+json`, one array.
    Json,
    /// `multipart/related; type="application/dicom+xml"`, a part per data set.
    Xml,
}

/// The first acceptable format of `accept`, if any.
pub fn dataset_format(accept: &[MediaRange]) -> Option<DatasetFormat> {
    accept.iter().find_map(|m| {
        if m.covers("application/dicom+json") || m.is("application/json") {
            Some(DatasetFormat::Json)
        } else if m.is("application/dicom+xml")
            || (m.is("multipart/related")
                && m.part_type.as_deref() == Some("application/dicom+xml"))
        {
            Some(DatasetFormat::Xml)
        } else {
            None
        }
    })
}

pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
pub const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";
pub const DEFLATED_EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1.99";

/// The media type of frames in an encapsulated transfer syntax.
pub fn frame_media_type(ts: &str) -> &'static str {
    match ts {
        "1.2.840.10008.1.2.4.50"
        | "1.2.840.10008.1.2.4.51"
        | "1.2.840.10008.1.2.4.57"
        | "1.2.840.10008.1.2.4.70" => "image/jpeg",
        "1.2.840.10008.1.2.4.80" | "1.2.840.10008.1.2.4.81" => "image/jls",
        "1.2.840.10008.1.2.4.90" | "1.2.840.10008.1.2.4.91" => "image/jp2",
        "1.2.840.10008.1.2.4.92" | "1.2.840.10008.1.2.4.93" => "image/jpx",
        "1.2.840.10008.1.2.4.201" | "1.2.840.10008.1.2.4.202" | "1.2.840.10008.1.2.4.203" => {
            "image/jphc"
        }
        "1.2.840.10008.1.2.5" => "image/dicom-rle",
        "1.2.840.10008.1.2.4.100" | "1.2.840.10008.1.2.4.101" => "video/mpeg",
        "1.2.840.10008.1.2.4.102"
        | "1.2.840.10008.1.2.4.103"
        | "1.2.840.10008.1.2.4.104"
        | "1.2.840.10008.1.2.4.105"
        | "1.2.840.10008.1.2.4.106" => "video/mp4",
        "1.2.840.10008.1.2.4.107" | "1.2.840.10008.1.2.4.108" => "video/H265",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_with_quoted_parameters_and_q() {
        let v = parse_accept(
            [r#"multipart/related; type="application/dicom"; transfer-syntax=*, application/dicom+json;q=0.5"#]
                .into_iter(),
        );
        assert_eq!(v[0].essence, "multipart/related");
        assert_eq!(v[0].part_type.as_deref(), Some("application/dicom"));
        assert_eq!(v[0].transfer_syntax.as_deref(), Some("*"));
        assert_eq!(v[1].essence, "application/dicom+json");
        assert!(v[1].q < 1.0);
        assert!(parse_accept(std::iter::empty())[0].covers("application/dicom+json"));
        // Refusing all it names accepts nothing (a 406), unlike no Accept.
        assert!(parse_accept(std::iter::once("application/dicom+json;q=0")).is_empty());
    }
}
