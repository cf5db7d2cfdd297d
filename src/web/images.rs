//! Rendered and thumbnail resources (PS3.18 §8.3.5, §8.3.6): one frame of
//! what the caller may see, as JPEG or PNG, made on the imaging pool.
//! Visibility and audit are those of a retrieve: what the caller may not see
//! is 404 before anything is read.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use dicom_pixeldata::VoiLutFunction;

use super::PathParams;
use super::Resource;
use super::auth::Caller;
use super::media::accept_of;
use super::problem::WebError;
use super::wado::{audit_found, audit_objects, visible_instance};
use crate::audit::Action;
use crate::auth::Role;
use crate::dicom::dataset::PixelLayout;
use crate::hub::Hub;
use crate::imaging::cache::Pictures;
use crate::imaging::render::{self, Format, Region, RenderError, Source, Spec, Window};
use crate::index::search::StoredInstance;

/// Default JPEG quality (PS3.18 leaves it to the server).
const DEFAULT_QUALITY: u8 = 90;
/// A thumbnail fits in this many pixels each way unless a viewport is asked.
const THUMBNAIL_SIZE: u32 = 128;
/// The largest viewport side accepted (a rendered picture is built in memory:
/// 4096² RGB is 48 MiB).
const MAX_VIEWPORT: u32 = 4096;
/// Objects whose frames are not addressable by byte range (deflated,
/// bit-packed) are decoded whole, up to this size; larger ones are not
/// rendered.
const MAX_WHOLE_OBJECT: u64 = 64 << 20;

/// What a rendered or thumbnail request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Rendered,
    Thumbnail,
}

/// `GET …/instances/{i}/rendered` (the first frame) and
/// `…/instances/{i}/frames/{n}/rendered`.
pub async fn rendered(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    headers: HeaderMap,
    PathParams(path): PathParams<HashMap<String, String>>,
    RawQuery(query): RawQuery,
) -> Result<Response, WebError> {
    let spec = spec_of(Kind::Rendered, &headers, query.as_deref())?;
    instance_picture(&hub, &caller, &path, spec).await
}

/// `GET …/instances/{i}/thumbnail` and `…/instances/{i}/frames/{n}/thumbnail`.
pub async fn thumbnail(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    headers: HeaderMap,
    PathParams(path): PathParams<HashMap<String, String>>,
    RawQuery(query): RawQuery,
) -> Result<Response, WebError> {
    let spec = spec_of(Kind::Thumbnail, &headers, query.as_deref())?;
    instance_picture(&hub, &caller, &path, spec).await
}

/// The picture of the instance (and frame, default 1) a path names.
async fn instance_picture(
    hub: &Arc<Hub>,
    caller: &Caller,
    path: &HashMap<String, String>,
    spec: Spec,
) -> Result<Response, WebError> {
    let frame = path.get("frames").map(|f| one_frame(f)).transpose()?;
    let uid = |k: &str| path.get(k).map(String::as_str).unwrap_or_default();
    let inst = visible_instance(hub, caller, uid("study"), uid("series"), uid("instance")).await?;
    picture(hub, inst, frame.unwrap_or(1), spec).await
}

/// `GET /studies/{s}/series/{r}/thumbnail`: its representative instance.
pub async fn thumbnail_series(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    headers: HeaderMap,
    PathParams((study, series)): PathParams<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, WebError> {
    let spec = spec_of(Kind::Thumbnail, &headers, query.as_deref())?;
    let at = Resource {
        study: Some(study),
        series: Some(series),
        instance: None,
    };
    representative(&hub, &caller, &at, spec).await
}

/// `GET /studies/{s}/thumbnail`: the representative instance of its first
/// series with pictures.
pub async fn thumbnail_study(
    State(hub): State<Arc<Hub>>,
    caller: Caller,
    headers: HeaderMap,
    PathParams(study): PathParams<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, WebError> {
    let spec = spec_of(Kind::Thumbnail, &headers, query.as_deref())?;
    let at = Resource {
        study: Some(study),
        series: None,
        instance: None,
    };
    representative(&hub, &caller, &at, spec).await
}

/// `GET /studies/{s}[/series/{r}]/rendered`: not offered (a multipart of
/// every instance's picture); the instance and frame resources are.
pub async fn rendered_unsupported(caller: Caller) -> WebError {
    if let Err(e) = caller.require(&[Role::Clinician], "retrieve images") {
        return e;
    }
    WebError::NotAcceptable(
        "rendered studies and series are not offered: ask for …/instances/{uid}/rendered, \
         …/frames/{n}/rendered, or a thumbnail"
            .into(),
    )
}

/// The picture of a study or series: the middle instance (in instance
/// order) of its first series that has a picture to show. Audited as a
/// retrieve of that one instance.
async fn representative(
    hub: &Arc<Hub>,
    caller: &Caller,
    at: &Resource,
    spec: Spec,
) -> Result<Response, WebError> {
    caller.require(&[Role::Clinician], "retrieve images")?;
    let scope = super::scope_of(hub, caller).await?;
    let (study, series, _) = at.uids();
    let found = hub.index.instances(&scope, study, series, None).await?;
    let mut pictures: Vec<&StoredInstance> = Vec::new();
    for inst in found.iter().filter(|i| has_picture(i)) {
        if pictures
            .first()
            .is_some_and(|first| first.series_uid != inst.series_uid)
        {
            break;
        }
        pictures.push(inst);
    }
    // The list leaves out the frame layout (it is read per instance).
    let chosen = match pictures.get(pictures.len() / 2) {
        Some(c) => {
            hub.index
                .instances(&scope, study, Some(&c.series_uid), Some(&c.sop_uid))
                .await?
        }
        None => Vec::new(),
    };
    // Nothing visible: 404 (and the refusal audited). Nothing with a picture:
    // 406, audited as the look at what is there.
    let (count, objects) = if chosen.is_empty() {
        (found.len(), audit_objects(&found))
    } else {
        (chosen.len(), audit_objects(&chosen))
    };
    audit_found(hub, caller, &scope, Action::Retrieve, at, count, objects).await?;
    match chosen.into_iter().next() {
        Some(inst) => picture(hub, inst, 1, spec).await,
        None => Err(WebError::NotAcceptable(
            "nothing here has pixel data to show as a thumbnail".into(),
        )),
    }
}

/// Whether an instance has a picture (Rows is set only for images).
fn has_picture(inst: &StoredInstance) -> bool {
    inst.rows.is_some() && render::can_render(&inst.transfer_syntax)
}

/// Bytes of one decoded frame of `inst`, at most.
pub(super) fn decoded_size(inst: &StoredInstance) -> u64 {
    render::decoded_frame_bytes(inst.rows, inst.columns, inst.bits_allocated)
}

/// 1-based frame `frame` of `inst` as `spec` says.
async fn picture(
    hub: &Arc<Hub>,
    inst: StoredInstance,
    frame: u32,
    spec: Spec,
) -> Result<Response, WebError> {
    let layout: PixelLayout = inst
        .pixel_layout
        .as_deref()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| {
            WebError::NotAcceptable("the instance has no pixel data to render".into())
        })?;
    if !render::can_render(&inst.transfer_syntax) {
        return Err(WebError::NotAcceptable(format!(
            "pixel data in transfer syntax {} (video, or no decoder here) is not rendered; \
             retrieve the instance or its frames instead",
            inst.transfer_syntax
        )));
    }
    let frames = inst.number_of_frames.unwrap_or(1).max(1) as u64;
    if u64::from(frame) > frames {
        return Err(WebError::bad_request(format!(
            "frame {frame} is out of range: the instance has {frames} frame(s)"
        )));
    }
    let frame_size = decoded_size(&inst);
    if frame_size > render::MAX_DECODED_FRAME {
        return Err(WebError::NotAcceptable(format!(
            "a frame of {} × {} is too large to render here (at most {} MiB decoded)",
            inst.columns.unwrap_or(0),
            inst.rows.unwrap_or(0),
            render::MAX_DECODED_FRAME >> 20
        )));
    }
    // What to read, refused here if it cannot be: before the picture is
    // looked up, so that requests waiting for one being made never wait for
    // a refusal. `None`: frames not addressable by byte range (Deflated,
    // bit-packed), so the whole object, if it is small enough to hold.
    let frame_ranges = if layout.frames.is_empty() {
        let pixels = frame_size.saturating_mul(frames);
        if inst.size > MAX_WHOLE_OBJECT || pixels > MAX_WHOLE_OBJECT {
            return Err(WebError::NotAcceptable(format!(
                "frames of this {} object cannot be read one at a time, and it is too large \
                 to decode whole for a picture",
                inst.transfer_syntax
            )));
        }
        None
    } else {
        Some(layout.frames.get(frame as usize - 1).ok_or_else(|| {
            WebError::bad_request(format!(
                "frame {frame} cannot be found in the stored pixel data ({} addressable)",
                layout.frames.len()
            ))
        })?)
    };
    let media_type = spec.format.media_type();
    let making = match hub
        .pictures
        .get_or_make(&Pictures::key(&inst.object_key, frame, &spec))
        .await
    {
        Ok(kept) => return Ok(picture_response(kept, media_type)),
        Err(making) => making,
    };
    // The place is taken before anything is read: waiting requests hold no
    // pixels.
    let permit = hub.imaging.permit().await?;
    let object = hub.store.reader(&inst.object_key).await?;
    let source = match frame_ranges {
        None => Source {
            head: object.read_range(0..inst.size).await?,
            frame: Vec::new(),
            encapsulated: layout.encapsulated,
            number: frame,
            // The pixels plus room for the rest of the data set.
            inflate_limit: frame_size.saturating_mul(frames) + (16 << 20),
        },
        Some(ranges) => Source::of_frame(
            object
                .read_range(0..layout.header_end().unwrap_or(0))
                .await?,
            object.read_ranges(ranges).await?,
            layout.encapsulated,
            frame,
        ),
    };
    let bytes = hub
        .imaging
        .run_with(permit, move || {
            // The cache weighs the length: the picture holds no more than
            // that (trimmed on the pool, a copy of up to some MiB).
            render::render(source, &spec).map(|mut picture| {
                picture.shrink_to_fit();
                Bytes::from(picture)
            })
        })
        .await?
        .map_err(|e| match e {
            RenderError::NotRenderable(m) => WebError::NotAcceptable(m),
            RenderError::BadRequest(m) => WebError::BadRequest(m),
            other => WebError::Internal(other.to_string()),
        })?;
    making.keep(bytes.clone());
    Ok(picture_response(bytes, media_type))
}

fn picture_response(bytes: Bytes, media_type: &'static str) -> Response {
    let mut resp = (StatusCode::OK, bytes).into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(media_type));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache"),
    );
    resp
}

/// WADO-URI (PS3.18 §9) with `contentType=image/jpeg` or `image/png`: one
/// frame (`frameNumber`, default 1) fitted into `columns` × `rows`, with
/// `region` (fractions xmin,ymin,xmax,ymax), `windowCenter`/`windowWidth`
/// and `imageQuality`. Parameters a picture would silently ignore are 400.
pub(super) async fn wado_uri_picture(
    hub: &Arc<Hub>,
    caller: &Caller,
    study: &str,
    series: &str,
    object: &str,
    png: bool,
    params: &[(String, String)],
) -> Result<Response, WebError> {
    let asked = UriPicture::parse(params, png)?;
    let inst = visible_instance(hub, caller, study, series, object).await?;
    let frame = asked.frame;
    let spec = asked.spec_for(&inst);
    picture(hub, inst, frame, spec).await
}

/// What a WADO-URI picture request asks, checked before its instance is
/// looked up.
struct UriPicture {
    frame: u32,
    /// Without its region, which needs the frame's size.
    spec: Spec,
    /// `region`: xmin, ymin, xmax, ymax as fractions of the frame.
    fractions: Option<[f64; 4]>,
}

impl UriPicture {
    fn parse(params: &[(String, String)], png: bool) -> Result<Self, WebError> {
        let get = |name: &str| super::wado::wado_uri_param(params, name);
        for unsupported in [
            "anonymize",
            "presentationUID",
            "presentationSeriesUID",
            "transferSyntax",
            "annotation",
        ] {
            if let Some(v) = get(unsupported) {
                return Err(WebError::bad_request(format!(
                    "{unsupported}={v:?} is not supported for pictures"
                )));
            }
        }
        let positive = |name: &str| -> Result<Option<u32>, WebError> {
            get(name)
                .map(|v| {
                    v.trim()
                        .parse::<u32>()
                        .ok()
                        .filter(|n| (1..=MAX_VIEWPORT).contains(n))
                        .ok_or_else(|| {
                            WebError::bad_request(format!(
                                "{name}={v:?}: a number 1-{MAX_VIEWPORT}"
                            ))
                        })
                })
                .transpose()
        };
        let frame = match get("frameNumber") {
            Some(v) => v
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| WebError::bad_request(format!("frameNumber={v:?}: 1, 2, ...")))?,
            None => 1,
        };
        let (rows, columns) = (positive("rows")?, positive("columns")?);
        let quality = match get("imageQuality") {
            Some(v) => v
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|q| (1..=100).contains(q))
                .ok_or_else(|| WebError::bad_request(format!("imageQuality={v:?}: 1-100")))?,
            None => DEFAULT_QUALITY,
        };
        let window = match (get("windowCenter"), get("windowWidth")) {
            (None, None) => None,
            (Some(c), Some(w)) => Some(parse_window(&format!("{c},{w},linear"))?),
            _ => {
                return Err(WebError::bad_request(
                    "windowCenter and windowWidth come together",
                ));
            }
        };
        let fractions = get("region")
            .map(|v| {
                let f: Vec<f64> = v
                    .split(',')
                    .filter_map(|x| x.trim().parse::<f64>().ok())
                    .collect();
                match f[..] {
                    [x0, y0, x1, y1]
                        if (0.0..=1.0).contains(&x0)
                            && (0.0..=1.0).contains(&y0)
                            && (0.0..=1.0).contains(&x1)
                            && (0.0..=1.0).contains(&y1)
                            && x0 < x1
                            && y0 < y1 =>
                    {
                        Ok([x0, y0, x1, y1])
                    }
                    _ => Err(WebError::bad_request(format!(
                        "region={v:?}: xmin,ymin,xmax,ymax as fractions 0.0-1.0 of the frame"
                    ))),
                }
            })
            .transpose()?;
        let viewport = match (columns, rows) {
            (None, None) => None,
            (c, r) => Some((c.unwrap_or(MAX_VIEWPORT), r.unwrap_or(MAX_VIEWPORT))),
        };
        let spec = Spec {
            format: if png {
                Format::Png
            } else {
                Format::Jpeg { quality }
            },
            viewport,
            region: None,
            window,
            // Only one of rows and columns: the other follows the aspect ratio,
            // and the picture is not blown up to the limit.
            shrink_only: columns.is_none() || rows.is_none(),
        };
        Ok(Self {
            frame,
            spec,
            fractions,
        })
    }

    /// The spec for `inst`: the region in its frame's pixels.
    fn spec_for(self, inst: &StoredInstance) -> Spec {
        // The region in the frame's pixels (at least one each way).
        let region = self.fractions.map(|[x0, y0, x1, y1]| {
            let (w, h) = (
                inst.columns.unwrap_or(0).max(0) as f64,
                inst.rows.unwrap_or(0).max(0) as f64,
            );
            let (x, y) = ((x0 * w).floor() as u32, (y0 * h).floor() as u32);
            Region {
                x,
                y,
                width: Some(((x1 * w).ceil() as u32).saturating_sub(x).max(1)),
                height: Some(((y1 * h).ceil() as u32).saturating_sub(y).max(1)),
            }
        });
        Spec {
            region,
            ..self.spec
        }
    }
}

/// `frames/{n}` of a rendered or thumbnail path: exactly one frame.
fn one_frame(list: &str) -> Result<u32, WebError> {
    match list.trim().parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(WebError::bad_request(format!(
            "{list:?}: rendered frames and thumbnails take one frame number (1, 2, ...)"
        ))),
    }
}

/// The picture format the `Accept` header allows: JPEG unless only PNG is.
fn format_of(headers: &HeaderMap, quality: u8) -> Result<Format, WebError> {
    if !headers.contains_key(header::ACCEPT) {
        return Ok(Format::Jpeg { quality });
    }
    // A type refused by name (`image/jpeg;q=0`) is not taken by a wildcard.
    let refused = refused_types(headers);
    let allowed = |t: &str| !refused.iter().any(|r| r == t);
    for m in accept_of(headers) {
        if m.covers("image/jpeg") && allowed("image/jpeg") {
            return Ok(Format::Jpeg { quality });
        }
        if m.covers("image/png") && allowed("image/png") {
            return Ok(Format::Png);
        }
    }
    Err(WebError::NotAcceptable(
        "pictures are available as image/jpeg and image/png".into(),
    ))
}

/// Media types an `Accept` header names with `q=0`.
fn refused_types(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|range| {
            let mut parts = range.split(';');
            let essence = parts.next()?.trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .and_then(|(_, v)| v.trim().parse::<f32>().ok())?;
            (q == 0.0).then_some(essence)
        })
        .collect()
}

/// The request's parameters (PS3.18 §8.3.5.1): `viewport`, `window`,
/// `quality`; `annotation` and `iccprofile` other than `no` are refused,
/// as is anything unknown, rather than silently ignored.
fn spec_of(kind: Kind, headers: &HeaderMap, query: Option<&str>) -> Result<Spec, WebError> {
    let mut viewport = None;
    let mut region = None;
    let mut window = None;
    let mut quality = DEFAULT_QUALITY;
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "viewport" => (viewport, region) = parse_viewport(&value)?,
            "window" if kind == Kind::Rendered => window = Some(parse_window(&value)?),
            "quality" => {
                quality = value
                    .trim()
                    .parse::<u8>()
                    .ok()
                    .filter(|q| (1..=100).contains(q))
                    .ok_or_else(|| {
                        WebError::bad_request(format!("quality={value:?}: a number 1-100"))
                    })?;
            }
            "iccprofile" if value.eq_ignore_ascii_case("no") => {}
            "charset" => {} // pictures carry no text
            "annotation" | "iccprofile" => {
                return Err(WebError::bad_request(format!(
                    "{key}={value:?} is not supported (no burned-in annotation, no ICC profile)"
                )));
            }
            other => {
                let allowed = match kind {
                    Kind::Rendered => "viewport, window, quality, iccprofile=no, charset",
                    Kind::Thumbnail => "viewport, quality, iccprofile=no, charset",
                };
                return Err(WebError::bad_request(format!(
                    "unknown parameter {other:?}: this resource takes {allowed}"
                )));
            }
        }
    }
    let format = format_of(headers, quality)?;
    Ok(Spec {
        format,
        viewport: viewport.or(match kind {
            Kind::Thumbnail => Some((THUMBNAIL_SIZE, THUMBNAIL_SIZE)),
            Kind::Rendered => None,
        }),
        region,
        window,
        shrink_only: kind == Kind::Thumbnail,
    })
}

/// `vw,vh` or `vw,vh,sx,sy,sw,sh` (a region of the frame; negative sw/sh,
/// which flip the picture, are refused).
#[allow(clippy::type_complexity)]
fn parse_viewport(value: &str) -> Result<(Option<(u32, u32)>, Option<Region>), WebError> {
    let bad = || {
        WebError::bad_request(format!(
            "viewport={value:?}: vw,vh or vw,vh,sx,sy,sw,sh with positive sizes up to \
             {MAX_VIEWPORT} (flipping by negative sw/sh is not supported)"
        ))
    };
    let parts: Vec<&str> = value.split(',').map(str::trim).collect();
    let number = |s: &str| s.parse::<u32>().map_err(|_| bad());
    if parts.len() != 2 && parts.len() != 6 {
        return Err(bad());
    }
    let (vw, vh) = (number(parts[0])?, number(parts[1])?);
    if vw == 0 || vh == 0 || vw > MAX_VIEWPORT || vh > MAX_VIEWPORT {
        return Err(bad());
    }
    // sx, sy default to 0; sw, sh to the rest of the frame (PS3.18).
    let region = if parts.len() == 6 {
        let or_default = |s: &str| -> Result<Option<u32>, WebError> {
            if s.is_empty() {
                Ok(None)
            } else {
                number(s).map(Some)
            }
        };
        Some(Region {
            x: or_default(parts[2])?.unwrap_or(0),
            y: or_default(parts[3])?.unwrap_or(0),
            width: or_default(parts[4])?,
            height: or_default(parts[5])?,
        })
    } else {
        None
    };
    Ok((Some((vw, vh)), region))
}

/// `center,width,function` (function: linear, linear-exact, sigmoid).
fn parse_window(value: &str) -> Result<Window, WebError> {
    let bad = || {
        WebError::bad_request(format!(
            "window={value:?}: center,width,function with width > 0 and function linear, \
             linear-exact or sigmoid"
        ))
    };
    let parts: Vec<&str> = value.split(',').map(str::trim).collect();
    if parts.len() != 3 {
        return Err(bad());
    }
    let center: f64 = parts[0].parse().map_err(|_| bad())?;
    let width: f64 = parts[1].parse().map_err(|_| bad())?;
    if !center.is_finite() || !width.is_finite() || width <= 0.0 {
        return Err(bad());
    }
    let function = match parts[2].to_ascii_lowercase().as_str() {
        "linear" => VoiLutFunction::Linear,
        "linear-exact" => VoiLutFunction::LinearExact,
        "sigmoid" => VoiLutFunction::Sigmoid,
        _ => return Err(bad()),
    };
    Ok(Window {
        center,
        width,
        function,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewports_and_windows() {
        assert_eq!(parse_viewport("64,48").unwrap(), (Some((64, 48)), None));
        let (_, r) = parse_viewport("64,48,10,20,30,40").unwrap();
        assert_eq!(
            r,
            Some(Region {
                x: 10,
                y: 20,
                width: Some(30),
                height: Some(40)
            })
        );
        let (_, r) = parse_viewport("64,48,,,30,").unwrap();
        assert_eq!(
            r,
            Some(Region {
                x: 0,
                y: 0,
                width: Some(30),
                height: None
            })
        );
        for bad in ["0,10", "10", "10,10,1,1,-5,5", "99999,1", "a,b"] {
            assert!(parse_viewport(bad).is_err(), "{bad}");
        }
        let w = parse_window("40,400,linear").unwrap();
        assert_eq!((w.center, w.width), (40.0, 400.0));
        for bad in ["40,0,linear", "40,400", "40,400,cubic", "nan,1,linear"] {
            assert!(parse_window(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_parameters_and_formats_are_refused() {
        let none = HeaderMap::new();
        assert!(spec_of(Kind::Rendered, &none, Some("annotation=patient")).is_err());
        assert!(spec_of(Kind::Thumbnail, &none, Some("window=1,2,linear")).is_err());
        assert!(spec_of(Kind::Rendered, &none, Some("quality=0")).is_err());
        let thumb = spec_of(Kind::Thumbnail, &none, None).unwrap();
        assert_eq!(thumb.viewport, Some((THUMBNAIL_SIZE, THUMBNAIL_SIZE)));
        assert_eq!(thumb.format, Format::Jpeg { quality: 90 });
        let mut png = HeaderMap::new();
        png.insert(header::ACCEPT, HeaderValue::from_static("image/png"));
        assert_eq!(
            spec_of(Kind::Rendered, &png, None).unwrap().format,
            Format::Png
        );
        let mut no_jpeg = HeaderMap::new();
        no_jpeg.insert(
            header::ACCEPT,
            HeaderValue::from_static("image/jpeg;q=0, */*"),
        );
        assert_eq!(
            spec_of(Kind::Rendered, &no_jpeg, None).unwrap().format,
            Format::Png
        );
        let mut gif = HeaderMap::new();
        gif.insert(header::ACCEPT, HeaderValue::from_static("image/gif"));
        assert!(spec_of(Kind::Rendered, &gif, None).is_err());
        for video in [
            "1.2.840.10008.1.2.4.102",
            "1.2.840.10008.1.2.4.100.1",
            "1.2.3",
        ] {
            assert!(!render::can_render(video), "{video}");
        }
        for picture in [
            "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.201",
            "1.2.840.10008.1.2.5",
        ] {
            assert!(render::can_render(picture), "{picture}");
        }
    }
}
