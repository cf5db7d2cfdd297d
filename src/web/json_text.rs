//! A search result as DICOM JSON elements, each kept as its JSON text in tag
//! order: written straight out for `application/dicom+json`. Building every
//! element as a `serde_json::Value` (two-entry maps, strings, arrays) and
//! serializing them took 35 µs of a three-series answer, more than the search;
//! a map of one `String` per element still cost ~110,000 instructions for
//! three series (an allocation and a tree insert per element). The elements
//! now share one text buffer and a list kept in tag order.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::ops::Range;

use serde_json::{Map, Value};

/// One result's elements by 8-hex tag (upper case; tags sort as keys).
#[derive(Debug, Default, Clone)]
pub struct Rendered {
    /// Every element's JSON text, one after another (a replaced element's
    /// old text stays behind, unreferenced).
    text: String,
    /// Each element's tag and its text in `text`, in tag order.
    elements: Vec<(Cow<'static, str>, Range<usize>)>,
}

impl Rendered {
    /// Start an element: its text is what is pushed to `self.text` until
    /// `finish`.
    fn start(&mut self) -> usize {
        if self.text.capacity() == 0 {
            self.text.reserve(2048);
            self.elements.reserve(32);
        }
        self.text.len()
    }

    /// Start an element of `vr`: `{"vr":"VR"`, its values to follow.
    fn start_vr(&mut self, vr: &str) -> usize {
        let from = self.start();
        self.text.push_str("{\"vr\":\"");
        self.text.push_str(vr);
        self.text.push('"');
        from
    }

    /// Keep the text from `from` on as the element `tag`, replacing an
    /// earlier one of the same tag.
    fn finish(&mut self, tag: Cow<'static, str>, from: usize) {
        let at = from..self.text.len();
        match self.position(&tag) {
            Ok(i) => self.elements[i].1 = at,
            Err(i) => self.elements.insert(i, (tag, at)),
        }
    }

    fn position(&self, tag: &str) -> Result<usize, usize> {
        // Results are built in nearly tag order: most elements go last.
        match self.elements.last() {
            Some((last, _)) if last.as_ref() < tag => Err(self.elements.len()),
            _ => self.elements.binary_search_by(|(t, _)| t.as_ref().cmp(tag)),
        }
    }

    /// A string-valued element (`None`: present without a value).
    pub fn text(&mut self, tag: &'static str, vr: &str, v: Option<&str>) {
        self.texts_of(tag, vr, v.into_iter());
    }

    /// A code-string element of several values (`[]`: without a value).
    pub fn texts(&mut self, tag: &'static str, vr: &str, values: &[String]) {
        self.texts_of(tag, vr, values.iter().map(String::as_str));
    }

    fn texts_of<'v>(&mut self, tag: &'static str, vr: &str, values: impl Iterator<Item = &'v str>) {
        let from = self.start_vr(vr);
        let mut any = false;
        for v in values {
            self.text.push_str(if any { "," } else { ",\"Value\":[" });
            any = true;
            push_json_str(&mut self.text, v);
        }
        self.text.push_str(if any { "]}" } else { "}" });
        self.finish(Cow::Borrowed(tag), from);
    }

    /// A number-valued element (`None`: present without a value).
    pub fn int(&mut self, tag: &'static str, vr: &str, v: Option<i64>) {
        let from = self.start_vr(vr);
        match v {
            Some(n) => {
                // Writing into a `String` cannot fail.
                let _ = write!(self.text, ",\"Value\":[{n}]}}");
            }
            None => self.text.push('}'),
        }
        self.finish(Cow::Borrowed(tag), from);
    }

    /// A PN element with only its non-empty component groups.
    pub fn person_name(&mut self, tag: &'static str, groups: &[Option<String>; 3]) {
        let from = self.start_vr("PN");
        let mut first = true;
        for (name, v) in ["Alphabetic", "Ideographic", "Phonetic"].iter().zip(groups) {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                self.text
                    .push_str(if first { ",\"Value\":[{\"" } else { ",\"" });
                first = false;
                self.text.push_str(name);
                self.text.push_str("\":");
                push_json_str(&mut self.text, v);
            }
        }
        self.text.push_str(if first { "}" } else { "}]}" });
        self.finish(Cow::Borrowed(tag), from);
    }

    /// Any element given as a JSON value.
    pub fn value(&mut self, tag: impl Into<Cow<'static, str>>, el: &Value) {
        let from = self.start();
        // Writing a `Value` into a `String` cannot fail.
        let _ = write!(self.text, "{el}");
        self.finish(tag.into(), from);
    }

    pub fn contains(&self, tag: &str) -> bool {
        self.position(tag).is_ok()
    }

    pub fn remove(&mut self, tag: &str) {
        if let Ok(i) = self.position(tag) {
            self.elements.remove(i);
        }
    }

    /// The elements in tag order, each as its JSON text.
    fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.elements
            .iter()
            .map(|(tag, at)| (tag.as_ref(), &self.text[at.clone()]))
    }

    /// The data set as a JSON object.
    pub fn write_json(&self, out: &mut String) {
        out.push('{');
        for (i, (tag, el)) in self.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('"');
            out.push_str(tag);
            out.push_str("\":");
            out.push_str(el);
        }
        out.push('}');
    }

    /// The data set as a JSON map (for the XML rendering).
    pub fn to_map(&self) -> Map<String, Value> {
        self.iter()
            .map(|(tag, el)| {
                let v = serde_json::from_str(el).expect("elements are written as JSON");
                (tag.to_string(), v)
            })
            .collect()
    }
}

/// `items` as a JSON array.
pub fn json_array(items: &[Rendered]) -> String {
    let size: usize = items
        .iter()
        .map(|m| m.text.len() + 14 * m.elements.len())
        .sum();
    let mut out = String::with_capacity(size + items.len() + 2);
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        item.write_json(&mut out);
    }
    out.push(']');
    out
}

/// `s` as a JSON string literal. Bytes are scanned, not characters: every
/// byte that needs escaping is ASCII, and no byte of a multi-byte UTF-8
/// character is below 0x80.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut done = 0;
    for (at, b) in s.bytes().enumerate() {
        let escaped = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..0x20 => "",
            _ => continue,
        };
        out.push_str(&s[done..at]);
        if escaped.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escaped);
        }
        done = at + 1;
    }
    out.push_str(&s[done..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_are_the_json_serde_would_write() {
        let mut r = Rendered::default();
        let odd = "a\"b\\c\nd\u{1}e 山田";
        r.text("00100020", "LO", Some(odd));
        r.text("00080050", "SH", None);
        r.int("00201206", "IS", Some(3));
        r.int("00200011", "IS", None);
        r.person_name(
            "00100010",
            &[
                Some("Yamada^Taro".into()),
                None,
                Some("やまだ^たろう".into()),
            ],
        );
        r.person_name("00080090", &[None, Some(String::new()), None]);
        r.texts("00080061", "CS", &["CT".into(), "MR".into()]);
        r.texts("00080060", "CS", &[]);
        r.value("00101002", &serde_json::json!({"vr": "SQ", "Value": []}));
        // A later element of the same tag replaces the earlier; a removed
        // one is gone.
        r.text("00081190", "UR", Some("http://old"));
        r.text("00081190", "UR", Some("http://new"));
        r.int("00201208", "IS", Some(9));
        r.remove("00201208");
        r.remove("00201208");
        assert!(r.contains("00081190") && !r.contains("00201208"));
        let mut out = String::new();
        r.write_json(&mut out);
        let parsed: Value = serde_json::from_str(&out).unwrap();
        let want = serde_json::json!({
            "00100020": {"vr": "LO", "Value": [odd]},
            "00080050": {"vr": "SH"},
            "00201206": {"vr": "IS", "Value": [3]},
            "00200011": {"vr": "IS"},
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Yamada^Taro", "Phonetic": "やまだ^たろう"}]},
            "00080090": {"vr": "PN"},
            "00080061": {"vr": "CS", "Value": ["CT", "MR"]},
            "00080060": {"vr": "CS"},
            "00101002": {"vr": "SQ", "Value": []},
            "00081190": {"vr": "UR", "Value": ["http://new"]},
        });
        assert_eq!(parsed, want);
        // Tags in order.
        let mut tags: Vec<&String> = want.as_object().unwrap().keys().collect();
        tags.sort();
        let tags: Vec<usize> = tags
            .iter()
            .map(|t| out.find(&format!("\"{t}\":")).unwrap())
            .collect();
        assert!(tags.is_sorted(), "{out}");
        assert_eq!(Value::Object(r.to_map()), want);
        assert_eq!(json_array(&[r.clone(), r]), format!("[{out},{out}]"));
    }
}
