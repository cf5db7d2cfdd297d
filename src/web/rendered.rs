//! A search result as DICOM JSON elements, each kept as its JSON text in tag
//! order: written straight out for `application/dicom+json`. Building every
//! element as a `serde_json::Value` (two-entry maps, strings, arrays) and
//! serializing them took 35 µs of a three-series answer, more than the search.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// One result's elements by 8-hex tag (upper case; tags sort as keys).
#[derive(Debug, Default, Clone)]
pub struct Rendered(BTreeMap<Cow<'static, str>, String>);

impl Rendered {
    /// A string-valued element (`None`: present without a value).
    pub fn text(&mut self, tag: &'static str, vr: &str, v: Option<&str>) {
        let mut el = String::with_capacity(24 + v.map_or(0, str::len));
        el.push_str("{\"vr\":\"");
        el.push_str(vr);
        match v {
            Some(s) => {
                el.push_str("\",\"Value\":[");
                push_json_str(&mut el, s);
                el.push_str("]}");
            }
            None => el.push_str("\"}"),
        }
        self.0.insert(Cow::Borrowed(tag), el);
    }

    /// A number-valued element (`None`: present without a value).
    pub fn int(&mut self, tag: &'static str, vr: &str, v: Option<i64>) {
        let el = match v {
            Some(n) => format!("{{\"vr\":\"{vr}\",\"Value\":[{n}]}}"),
            None => format!("{{\"vr\":\"{vr}\"}}"),
        };
        self.0.insert(Cow::Borrowed(tag), el);
    }

    /// A PN element with only its non-empty component groups.
    pub fn person_name(&mut self, tag: &'static str, groups: &[Option<String>; 3]) {
        let mut el = String::from("{\"vr\":\"PN\"");
        let mut first = true;
        for (name, v) in ["Alphabetic", "Ideographic", "Phonetic"].iter().zip(groups) {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                el.push_str(if first { ",\"Value\":[{\"" } else { ",\"" });
                first = false;
                el.push_str(name);
                el.push_str("\":");
                push_json_str(&mut el, v);
            }
        }
        el.push_str(if first { "}" } else { "}]}" });
        self.0.insert(Cow::Borrowed(tag), el);
    }

    /// A code-string element of several values (`[]`: without a value).
    pub fn texts(&mut self, tag: &'static str, vr: &str, values: &[String]) {
        let mut el = format!("{{\"vr\":\"{vr}\"");
        for (i, v) in values.iter().enumerate() {
            el.push_str(if i == 0 { ",\"Value\":[" } else { "," });
            push_json_str(&mut el, v);
        }
        el.push_str(if values.is_empty() { "}" } else { "]}" });
        self.0.insert(Cow::Borrowed(tag), el);
    }

    /// Any element given as a JSON value.
    pub fn value(&mut self, tag: impl Into<Cow<'static, str>>, el: &Value) {
        self.0.insert(tag.into(), el.to_string());
    }

    pub fn contains(&self, tag: &str) -> bool {
        self.0.contains_key(tag)
    }

    pub fn remove(&mut self, tag: &str) {
        self.0.remove(tag);
    }

    /// The data set as a JSON object.
    pub fn write_json(&self, out: &mut String) {
        out.push('{');
        for (i, (tag, el)) in self.0.iter().enumerate() {
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
        self.0
            .iter()
            .map(|(tag, el)| {
                let v = serde_json::from_str(el).expect("elements are written as JSON");
                (tag.to_string(), v)
            })
            .collect()
    }
}

/// `items` as a JSON array.
pub fn json_array(items: &[Rendered]) -> String {
    let mut out = String::with_capacity(items.len() * 1024 + 2);
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

/// `s` as a JSON string literal.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut done = 0;
    for (at, c) in s.char_indices() {
        let escaped = match c {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            c if (c as u32) < 0x20 => "",
            _ => continue,
        };
        out.push_str(&s[done..at]);
        if escaped.is_empty() {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push_str(escaped);
        }
        done = at + c.len_utf8();
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
