//! DICOM JSON (PS3.18 Annex F) to the Native DICOM Model (PS3.19 Annex A),
//! for answers in `multipart/related; type="application/dicom+xml"`: one
//! document per data set.

use dicom_core::Tag;
use dicom_core::dictionary::DataDictionary;
use dicom_dictionary_std::StandardDataDictionary;
use serde_json::{Map, Value};

/// The Native DICOM Model document of one data set.
pub fn document(dataset: &Map<String, Value>) -> String {
    let mut out = String::with_capacity(4096);
    out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    out.push_str("<NativeDicomModel xml:space=\"preserve\">");
    attributes(dataset, &mut out);
    out.push_str("</NativeDicomModel>\n");
    out
}

fn escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 cannot carry at all.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            c => out.push(c),
        }
    }
}

fn keyword(tag: &str) -> Option<&'static str> {
    let n = u32::from_str_radix(tag, 16).ok()?;
    let t = Tag((n >> 16) as u16, (n & 0xFFFF) as u16);
    StandardDataDictionary.by_tag(t).map(|e| e.alias)
}

fn attributes(dataset: &Map<String, Value>, out: &mut String) {
    let mut tags: Vec<&String> = dataset.keys().collect();
    tags.sort();
    for tag in tags {
        let el = &dataset[tag];
        let vr = el.get("vr").and_then(Value::as_str).unwrap_or("UN");
        out.push_str("<DicomAttribute tag=\"");
        escape(tag, out);
        out.push_str("\" vr=\"");
        escape(vr, out);
        out.push('"');
        if let Some(k) = keyword(tag) {
            out.push_str(" keyword=\"");
            out.push_str(k);
            out.push('"');
        }
        out.push('>');
        if let Some(uri) = el.get("BulkDataURI").and_then(Value::as_str) {
            out.push_str("<BulkData uri=\"");
            escape(uri, out);
            out.push_str("\"/>");
        } else if let Some(b64) = el.get("InlineBinary").and_then(Value::as_str) {
            out.push_str("<InlineBinary>");
            escape(b64, out);
            out.push_str("</InlineBinary>");
        } else if let Some(values) = el.get("Value").and_then(Value::as_array) {
            for (i, v) in values.iter().enumerate() {
                let n = i + 1;
                match (vr, v) {
                    ("SQ", Value::Object(item)) => {
                        out.push_str(&format!("<Item number=\"{n}\">"));
                        attributes(item, out);
                        out.push_str("</Item>");
                    }
                    ("PN", Value::Object(groups)) => {
                        out.push_str(&format!("<PersonName number=\"{n}\">"));
                        for g in ["Alphabetic", "Ideographic", "Phonetic"] {
                            if let Some(name) = groups.get(g).and_then(Value::as_str) {
                                person_name_group(g, name, out);
                            }
                        }
                        out.push_str("</PersonName>");
                    }
                    (_, Value::Null) => {}
                    (_, Value::String(s)) => {
                        out.push_str(&format!("<Value number=\"{n}\">"));
                        escape(s, out);
                        out.push_str("</Value>");
                    }
                    (_, other) => {
                        out.push_str(&format!("<Value number=\"{n}\">{other}</Value>"));
                    }
                }
            }
        }
        out.push_str("</DicomAttribute>");
    }
}

fn person_name_group(group: &str, name: &str, out: &mut String) {
    out.push_str(&format!("<{group}>"));
    for (part, text) in [
        "FamilyName",
        "GivenName",
        "MiddleName",
        "NamePrefix",
        "NameSuffix",
    ]
    .iter()
    .zip(name.split('^'))
    {
        if !text.is_empty() {
            out.push_str(&format!("<{part}>"));
            escape(text, out);
            out.push_str(&format!("</{part}>"));
        }
    }
    out.push_str(&format!("</{group}>"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_sequences_and_bulk_data() {
        let ds = json!({
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Yamada^Taro", "Ideographic": "山田^太郎"}]},
            "00081030": {"vr": "LO", "Value": ["A & <B>"]},
            "00201208": {"vr": "IS", "Value": [16]},
            "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3"]}}]},
            "7FE00010": {"vr": "OW", "BulkDataURI": "http://x/bulk/1/2"},
            "00080090": {"vr": "PN"}
        });
        let x = document(ds.as_object().unwrap());
        assert!(x.contains("<DicomAttribute tag=\"00100010\" vr=\"PN\" keyword=\"PatientName\"><PersonName number=\"1\"><Alphabetic><FamilyName>Yamada</FamilyName><GivenName>Taro</GivenName></Alphabetic><Ideographic><FamilyName>山田</FamilyName><GivenName>太郎</GivenName></Ideographic></PersonName></DicomAttribute>"), "{x}");
        assert!(
            x.contains("<Value number=\"1\">A &amp; &lt;B&gt;</Value>"),
            "{x}"
        );
        assert!(x.contains("<Value number=\"1\">16</Value>"), "{x}");
        assert!(x.contains("<Item number=\"1\"><DicomAttribute tag=\"00081155\" vr=\"UI\" keyword=\"ReferencedSOPInstanceUID\"><Value number=\"1\">1.2.3</Value></DicomAttribute></Item>"), "{x}");
        assert!(x.contains("<BulkData uri=\"http://x/bulk/1/2\"/>"), "{x}");
        assert!(
            x.contains("keyword=\"ReferringPhysicianName\"></DicomAttribute>"),
            "{x}"
        );
    }
}
