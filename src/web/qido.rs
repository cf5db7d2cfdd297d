//! QIDO-RS (PS3.18 §10.6): searches at study, series and instance level,
//! answered in DICOM JSON from the index, with the computed attributes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dicom_core::dictionary::DataDictionary;
use dicom_dictionary_std::StandardDataDictionary;
use serde_json::{Map, Value, json};

use super::auth::Caller;
use super::json_text::{self, Rendered};
use super::media::{DatasetFormat, accept_of, dataset_format};
use super::problem::WebError;
use super::{DICOM_JSON, Resource, Urls};
use crate::audit::{Action, AuditObject, Outcome};
use crate::auth::Role;
use crate::config::EmptySearch;
use crate::hub::Hub;
use crate::index::search::{Attr, COUNT_CAP, Hit, Level, Matcher, Search};

/// Attributes (8-hex tags) at patient or study level, what `includefield=all`
/// adds to a study result from the stored instance JSON.
const STUDY_LEVEL: &[&str] = &[
    "00080020", "00080030", "00080050", "00080051", "00080090", "00080096", "00081030", "00081032",
    "00081060", "0020000D", "00200010", "00080201",
];
/// Series-level attributes `includefield=all` adds to a series result.
const SERIES_LEVEL: &[&str] = &[
    "00080021", "00080031", "00080060", "00080070", "00080080", "00081010", "0008103E", "00081090",
    "00180015", "00185100", "0020000E", "00200011", "00200052", "00200060", "00400244", "00400245",
    "00400275",
];

/// The parsed query string of a search.
struct Query {
    keys: Vec<(Attr, Matcher)>,
    /// Attributes to return beyond the defaults (8-hex tags).
    include: HashSet<String>,
    include_all: bool,
    limit: Option<u32>,
    offset: u64,
    unsupported: Vec<String>,
}

/// The 8-hex tag of a keyword or tag.
fn tag_of(key: &str) -> Option<String> {
    if key.len() == 8 && key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Some(key.to_ascii_uppercase());
    }
    let e = StandardDataDictionary.by_name(key)?;
    let t = e.tag.inner();
    Some(format!("{:04X}{:04X}", t.group(), t.element()))
}

/// Longest matching value accepted (bytes). The longest single DICOM value
/// matched here is 64 characters; this leaves room for lists of ~250 UIDs
/// and keeps wildcard patterns well below SQLite's LIKE limit (50,000
/// bytes; escaping at most doubles a value of backslashes, and values with
/// control characters are refused).
const QUERY_VALUE_MAX: usize = 16 * 1024;

fn parse_query(raw: Option<&str>) -> Result<Query, WebError> {
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(raw.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let fuzzy = pairs
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("fuzzymatching") && v.eq_ignore_ascii_case("true"));
    let mut q = Query {
        keys: Vec::new(),
        include: HashSet::new(),
        include_all: false,
        limit: None,
        offset: 0,
        unsupported: Vec::new(),
    };
    let mut seen = HashSet::new();
    for (k, v) in &pairs {
        match k.to_ascii_lowercase().as_str() {
            "limit" => {
                // Any non-negative integer (PS3.18 §8.3.4.4); the server's
                // maximum caps it later.
                let n: u64 = v.trim().parse().map_err(|_| {
                    WebError::bad_request(format!("limit: {v:?} is not a non-negative integer"))
                })?;
                q.limit = Some(u32::try_from(n).unwrap_or(u32::MAX));
            }
            "offset" => {
                q.offset = v.trim().parse().map_err(|_| {
                    WebError::bad_request(format!("offset: {v:?} is not a non-negative integer"))
                })?
            }
            "includefield" => {
                for f in v.split(',').map(str::trim).filter(|f| !f.is_empty()) {
                    if f.eq_ignore_ascii_case("all") {
                        q.include_all = true;
                    } else if let Some(t) = tag_of(f) {
                        q.include.insert(t);
                    } else {
                        return Err(WebError::bad_request(format!(
                            "includefield: {f:?} is neither an attribute keyword nor a tag"
                        )));
                    }
                }
            }
            "fuzzymatching" | "orderby" | "accept" | "charset" => {}
            // Not supported: PS3.18 §8.3.4.5-6 asks for a warning.
            "emptyvaluematching" | "multiplevaluematching" => {
                if v.trim().eq_ignore_ascii_case("true") {
                    q.unsupported.push(k.clone());
                }
            }
            _ => {
                if let Some(attr) = Attr::from_key(k) {
                    if !seen.insert(attr) {
                        continue; // the first value of a repeated key counts
                    }
                    if v.len() > QUERY_VALUE_MAX {
                        return Err(WebError::bad_request(format!(
                            "{k}: a matching value may be at most {QUERY_VALUE_MAX} bytes"
                        )));
                    }
                    if let Some(tag) = tag_of(k) {
                        q.include.insert(tag);
                    }
                    let m = Matcher::parse(attr, k, v, fuzzy)
                        .map_err(|e| WebError::bad_request(e.to_string()))?;
                    if let Some(m) = m {
                        q.keys.push((attr, m));
                    }
                } else if let Some(tag) = tag_of(k.split('.').next().unwrap_or(k)) {
                    // A real attribute we cannot match on: return it, say so.
                    q.include.insert(tag);
                    if !v.is_empty() {
                        q.unsupported.push(k.clone());
                    }
                }
                // Anything else is not a query key: PS3.18 says ignore it.
            }
        }
    }
    Ok(q)
}

/// `GET /studies`
pub async fn studies(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    urls: Urls,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, WebError> {
    run(
        &hub,
        &caller,
        &urls,
        &headers,
        raw,
        Level::Study,
        None,
        None,
    )
    .await
}

/// `GET /series` and `GET /studies/{study}/series`
pub async fn series(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    urls: Urls,
    headers: HeaderMap,
    at: Resource,
    RawQuery(raw): RawQuery,
) -> Result<Response, WebError> {
    run(
        &hub,
        &caller,
        &urls,
        &headers,
        raw,
        Level::Series,
        at.study,
        None,
    )
    .await
}

/// `GET /instances`, `GET /studies/{study}/instances` and
/// `GET /studies/{study}/series/{series}/instances`
pub async fn instances(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    urls: Urls,
    headers: HeaderMap,
    at: Resource,
    RawQuery(raw): RawQuery,
) -> Result<Response, WebError> {
    run(
        &hub,
        &caller,
        &urls,
        &headers,
        raw,
        Level::Instance,
        at.study,
        at.series,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn run(
    hub: &Hub,
    caller: &Caller,
    urls: &Urls,
    headers: &HeaderMap,
    raw: Option<String>,
    level: Level,
    study_uid: Option<String>,
    series_uid: Option<String>,
) -> Result<Response, WebError> {
    caller.require(&[Role::Clinician], "search images")?;
    let accept = accept_of(headers);
    let format = dataset_format(&accept).ok_or_else(|| {
        WebError::NotAcceptable(
            "search results are available as application/dicom+json or multipart/related; type=\"application/dicom+xml\"".into(),
        )
    })?;
    let q = parse_query(raw.as_deref())?;
    let cfg = &hub.config.dicomweb;
    let limit = q
        .limit
        .unwrap_or(cfg.qido_max_results)
        .min(cfg.qido_max_results);
    let search = Search {
        level,
        study_uid,
        series_uid,
        keys: q.keys.clone(),
        limit,
        offset: q.offset,
    };
    let scope = super::scope_of(hub, caller).await?;
    let page = hub.index.search(&search, &scope).await?;
    // Counted after the visibility filter: what the caller was shown.
    super::audit(
        hub,
        caller,
        Action::Query,
        Outcome::Success,
        AuditObject::distinct(page.hits.iter().map(|h| {
            (
                h.patient.institution.as_str(),
                h.patient.owner_patient_id.as_str(),
                h.study.study_uid.as_str(),
            )
        })),
        super::read_detail(
            &scope,
            json!({
                "level": format!("{level:?}").to_lowercase(),
                "query": raw.as_deref().unwrap_or_default(),
                "results": page.hits.len(),
            }),
        ),
    );

    let mut warnings = Vec::new();
    if page.remaining > 0 {
        let at_least = if page.remaining >= COUNT_CAP {
            "at least "
        } else {
            ""
        };
        warnings.push(format!(
            "299 tsunagu: There are {at_least}{} additional results that can be requested",
            page.remaining
        ));
    }
    if !q.unsupported.is_empty() {
        warnings.push(format!(
            "299 tsunagu: The following query keys or parameters are not supported and were ignored: {}",
            q.unsupported.join(", ")
        ));
    }

    if page.hits.is_empty() {
        let mut resp = match cfg.qido_empty {
            EmptySearch::NoContent => StatusCode::NO_CONTENT.into_response(),
            EmptySearch::EmptyArray => ([(header::CONTENT_TYPE, DICOM_JSON)], "[]").into_response(),
        };
        add_warnings(&mut resp, &warnings);
        return Ok(resp);
    }

    // Attributes the index does not keep come from one stored instance of
    // each result (one query for the page).
    let extra = extra_attributes(hub, level, &q, &page.hits).await?;
    let items: Vec<Rendered> = page
        .hits
        .iter()
        .map(|h| {
            let mut m = render(h, level, urls);
            if let Some(src) = extra.get(&h.id(level)) {
                merge_from(&mut m, src, level, &q, urls, h);
            }
            if h.patient.presented {
                // The owner's issuer qualifiers describe the owner's ID, which
                // is now among the Other Patient IDs.
                m.remove(crate::dicom::coerce::ISSUER_QUALIFIERS);
            }
            m
        })
        .collect();
    let mut resp = match format {
        DatasetFormat::Json => (
            [(header::CONTENT_TYPE, DICOM_JSON)],
            json_text::json_array(&items),
        )
            .into_response(),
        DatasetFormat::Xml => super::xml_parts_response(
            items
                .iter()
                .map(|m| super::xml::document(&m.to_map()))
                .collect(),
        ),
    };
    add_warnings(&mut resp, &warnings);
    Ok(resp)
}

fn add_warnings(resp: &mut Response, warnings: &[String]) {
    for w in warnings {
        if let Ok(v) = HeaderValue::from_str(w) {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
}

/// Parsed stored JSON of one instance per result, when the query asks for
/// attributes beyond the rendered ones.
async fn extra_attributes(
    hub: &Hub,
    level: Level,
    q: &Query,
    hits: &[Hit],
) -> Result<HashMap<i64, Map<String, Value>>, WebError> {
    let rendered = rendered_tags(level);
    let wanted = q.include_all
        || q.include
            .iter()
            .any(|t| belongs(level, t) && !rendered.contains(&t.as_str()));
    if !wanted {
        return Ok(HashMap::new());
    }
    let ids: Vec<i64> = hits.iter().map(|h| h.id(level)).collect();
    let json = hub.index.dataset_json(level, &ids).await?;
    Ok(json
        .into_iter()
        .filter_map(|(id, text)| match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(m)) => Some((id, m)),
            _ => None,
        })
        .collect())
}

/// Copy the requested attributes from stored JSON into a result.
fn merge_from(
    out: &mut Rendered,
    src: &Map<String, Value>,
    level: Level,
    q: &Query,
    urls: &Urls,
    h: &Hit,
) {
    for (tag, el) in src {
        if out.contains(tag) || !belongs(level, tag) {
            continue;
        }
        if q.include_all || q.include.contains(tag) {
            let mut el = el.clone();
            if let (Some(inst), Some(series)) = (&h.instance, &h.series) {
                urls.rewrite_bulk(
                    &mut el,
                    &h.study.study_uid,
                    &series.series_uid,
                    &inst.sop_uid,
                );
            } else if el.get("BulkDataURI").is_some() {
                continue; // bulk data of some instance makes no sense at this level
            } else {
                drop_bulk(&mut el);
            }
            out.value(tag.clone(), &el);
        }
    }
    for tag in q.include.iter().filter(|t| belongs(level, t)) {
        if !out.contains(tag) {
            out.value(tag.clone(), &json!({ "vr": tag_vr(tag) }));
        }
    }
}

/// Remove, at any depth of sequence items, the elements that are bulk data
/// of one instance: a study or series result has no instance to point at,
/// and the stored form of the reference is internal.
fn drop_bulk(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, el| el.get("BulkDataURI").is_none());
            for el in m.values_mut() {
                drop_bulk(el);
            }
        }
        Value::Array(a) => {
            for item in a {
                drop_bulk(item);
            }
        }
        _ => {}
    }
}

/// Whether an attribute is one of the level's (or a higher level's): a study
/// result carries patient and study attributes only, a series result adds
/// series attributes, an instance result may carry anything.
fn belongs(level: Level, tag: &str) -> bool {
    let patient_or_study = tag.starts_with("0010") || STUDY_LEVEL.contains(&tag);
    match level {
        Level::Instance => true,
        Level::Series => patient_or_study || SERIES_LEVEL.contains(&tag),
        Level::Study => patient_or_study,
    }
}

fn tag_vr(tag: &str) -> String {
    let Ok(n) = u32::from_str_radix(tag, 16) else {
        return "UN".into();
    };
    let t = dicom_core::Tag((n >> 16) as u16, (n & 0xFFFF) as u16);
    StandardDataDictionary
        .by_tag(t)
        .map(|e| e.vr.relaxed().to_string().to_string())
        .unwrap_or_else(|| "UN".into())
}

fn rendered_tags(level: Level) -> Vec<&'static str> {
    let mut v = vec![
        "00080005", "00080020", "00080030", "00080050", "00080056", "00080061", "00080090",
        "00081030", "00081190", "00100010", "00100020", "00100021", "00100030", "00100040",
        "00101002", "0020000D", "00200010", "00201206", "00201208",
    ];
    if level >= Level::Series {
        v.extend([
            "00080021", "00080031", "00080060", "0008103E", "00180015", "0020000E", "00200011",
            "00201209", "00400244", "00400245", "00400275",
        ]);
    }
    if level == Level::Instance {
        v.extend([
            "00080016", "00080018", "00083002", "00200013", "00280008", "00280010", "00280011",
            "00280100",
        ]);
    }
    v
}

/// The default attributes of a result (PS3.18 Tables 6.7.1-2, -2a, -2b).
fn render(h: &Hit, level: Level, urls: &Urls) -> Rendered {
    let mut m = Rendered::default();
    let p = &h.patient;
    let st = &h.study;
    // Everything is decoded to Unicode at ingest: answers are UTF-8.
    m.text("00080005", "CS", Some("ISO_IR 192"));
    m.text("00080020", "DA", st.date.as_deref());
    m.text("00080030", "TM", st.time.as_deref());
    m.text("00080050", "SH", st.accession_number.as_deref());
    m.text("00080056", "CS", Some("ONLINE"));
    // Study-related counts and modalities belong to study results.
    if level == Level::Study {
        m.texts("00080061", "CS", &st.modalities);
        m.int("00201206", "IS", Some(st.series_count));
        m.int("00201208", "IS", Some(st.instance_count));
    }
    m.person_name("00080090", &st.referring);
    m.text("00081030", "LO", st.description.as_deref());
    m.person_name("00100010", &p.name);
    m.text("00100020", "LO", Some(&p.patient_id));
    m.text("00100021", "LO", Some(&p.issuer));
    m.text("00100030", "DA", p.birth_date.as_deref());
    m.text("00100040", "CS", p.sex.as_deref());
    if !p.other_patient_ids.is_empty() {
        let items: Vec<Value> = p
            .other_patient_ids
            .iter()
            .map(|o| {
                let text = |vr: &str, v: Option<&str>| match v {
                    Some(s) => json!({"vr": vr, "Value": [s]}),
                    None => json!({"vr": vr}),
                };
                let mut item = json!({
                    "00100020": text("LO", Some(&o.patient_id)),
                    "00100021": text("LO", o.issuer.as_deref()),
                });
                if let Some(t) = &o.type_of_id {
                    item["00100022"] = text("CS", Some(t));
                }
                item
            })
            .collect();
        m.value("00101002", &json!({"vr": "SQ", "Value": items}));
    }
    m.text("0020000D", "UI", Some(&st.study_uid));
    m.text("00200010", "SH", st.study_id.as_deref());
    let mut url = urls.study(&st.study_uid);
    if let Some(se) = &h.series {
        m.text("00080021", "DA", se.date.as_deref());
        m.text("00080031", "TM", se.time.as_deref());
        m.text("00080060", "CS", se.modality.as_deref());
        m.text("0008103E", "LO", se.description.as_deref());
        m.text("00180015", "CS", se.body_part.as_deref());
        m.text("0020000E", "UI", Some(&se.series_uid));
        m.int("00200011", "IS", se.number);
        if level == Level::Series {
            m.int("00201209", "IS", Some(se.instance_count));
        }
        m.text("00400244", "DA", se.pps_start_date.as_deref());
        m.text("00400245", "TM", se.pps_start_time.as_deref());
        if let Some(mut items) = se
            .request_attributes
            .as_deref()
            .and_then(|j| serde_json::from_str::<Value>(j).ok())
        {
            drop_bulk(&mut items);
            m.value("00400275", &json!({"vr": "SQ", "Value": items}));
        }
        url = urls.series(&st.study_uid, &se.series_uid);
        if let Some(i) = &h.instance {
            m.text("00080016", "UI", Some(&i.sop_class_uid));
            m.text("00080018", "UI", Some(&i.sop_uid));
            m.text("00083002", "UI", Some(&i.transfer_syntax));
            m.int("00200013", "IS", i.number);
            if i.frames.is_some() {
                m.int("00280008", "IS", i.frames);
            }
            if i.rows.is_some() {
                m.int("00280010", "US", i.rows);
                m.int("00280011", "US", i.columns);
                m.int("00280100", "US", i.bits_allocated);
            }
            url = urls.instance(&st.study_uid, &se.series_uid, &i.sop_uid);
        }
    }
    m.text("00081190", "UR", Some(&url));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_data_inside_items_leaves_study_and_series_results() {
        let bulk = json!({"vr": "OB", "BulkDataURI": "tsunagu:bulk/100/300"});
        let mut items = json!([{
            "00401001": {"vr": "SH", "Value": ["RP1"]},
            "00091010": bulk,
            "00400008": {"vr": "SQ", "Value": [{"00091011": bulk, "00080100": {"vr": "SH", "Value": ["X"]}}]}
        }]);
        drop_bulk(&mut items);
        assert!(!items.to_string().contains("BulkDataURI"), "{items}");
        assert_eq!(items[0]["00401001"]["Value"][0], "RP1");
        assert_eq!(
            items[0]["00400008"]["Value"][0]["00080100"]["Value"][0],
            "X"
        );
    }
}
