//! One frame of a stored object as a consumer-format picture (PS3.18 §8.3.5
//! rendered and §8.3.6 thumbnail resources): decoded, Modality LUT and VOI
//! (the object's first window, or the requested one) applied, cropped and
//! scaled to the viewport, encoded as JPEG or PNG.
//!
//! Only the frame's own bytes are read and decoded: the object's header
//! (every element before Pixel Data) plus that frame make a one-frame
//! object for dicom-pixeldata, so a 2 GiB whole-slide image costs what one
//! of its tiles costs.

use std::io::Cursor;

use bytes::Bytes;
use dicom_core::value::{PixelFragmentSequence, Value};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::{ConvertOptions, PixelDecoder, VoiLutFunction, VoiLutOption, WindowLevel};
use image::{DynamicImage, RgbImage, imageops::FilterType};

use crate::dicom::transcode;

const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";
const DEFLATED_EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1.99";

/// The picture formats answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Lossy, `quality` 1-100.
    Jpeg {
        quality: u8,
    },
    Png,
}

impl Format {
    pub fn media_type(self) -> &'static str {
        match self {
            Format::Jpeg { .. } => "image/jpeg",
            Format::Png => "image/png",
        }
    }
}

/// A window to apply instead of the object's own (PS3.18 `window=`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub center: f64,
    pub width: f64,
    pub function: VoiLutFunction,
}

/// A region of the frame, in its pixels (PS3.18 viewport `sx,sy,sw,sh`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub x: u32,
    pub y: u32,
    /// `None`: to the frame's right edge.
    pub width: Option<u32>,
    /// `None`: to the frame's bottom edge.
    pub height: Option<u32>,
}

/// How to make the picture.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub format: Format,
    /// The picture fits in this many columns × rows, keeping its aspect
    /// ratio; never enlarged past the (region of the) frame for thumbnails.
    pub viewport: Option<(u32, u32)>,
    pub region: Option<Region>,
    pub window: Option<Window>,
    /// Scale down only (thumbnails): a small frame stays its size.
    pub shrink_only: bool,
}

/// The stored bytes a picture is made of.
pub struct Source {
    /// The object from its start to at least its Pixel Data element's
    /// header — or the whole object when `frame` is empty.
    pub head: Bytes,
    /// The frame's bytes: the native frame, or its fragments. Empty: decode
    /// frame `number` from `head`, the whole object.
    pub frame: Vec<Bytes>,
    pub encapsulated: bool,
    /// The 1-based frame asked for: of the whole object when `frame` is
    /// empty; else the one whose per-frame functional groups apply.
    pub number: u32,
    /// A whole Deflated object's data set may inflate to at most this.
    pub inflate_limit: u64,
}

impl Source {
    /// Frame `number` read by byte range: the object's `head` up to its
    /// pixel data, and the frame's own bytes.
    pub fn of_frame(head: Bytes, frame: Vec<Bytes>, encapsulated: bool, number: u32) -> Self {
        Self {
            head,
            frame,
            encapsulated,
            number,
            inflate_limit: 0,
        }
    }
}

/// The largest decoded frame made here (3 samples × its allocated bytes):
/// 256 MiB, e.g. 8192² RGB at 16 bits.
pub const MAX_DECODED_FRAME: u64 = 256 << 20;

/// Bytes of one decoded frame of `rows` × `columns` at most (3 samples, the
/// allocated bits, at least 8), to hold against `MAX_DECODED_FRAME`.
pub fn decoded_frame_bytes(rows: Option<i64>, columns: Option<i64>, bits: Option<i64>) -> u64 {
    let bytes = (bits.unwrap_or(8).max(8) as u64).div_ceil(8);
    rows.unwrap_or(0).max(0) as u64 * columns.unwrap_or(0).max(0) as u64 * 3 * bytes
}

/// Whether pixel data in transfer syntax `ts` can be decoded here (video
/// and unknown syntaxes cannot).
pub fn can_render(ts: &str) -> bool {
    use dicom_encoding::TransferSyntaxIndex;
    dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get(ts)
        .is_some_and(|t| t.can_decode_all())
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The object cannot be shown as a picture (no pixel data, video, a
    /// transfer syntax no decoder here reads).
    #[error("{0}")]
    NotRenderable(String),
    /// The request asks for what the frame cannot give (a region outside it).
    #[error("{0}")]
    BadRequest(String),
    /// The stored object does not decode.
    #[error("the stored pixel data cannot be decoded: {0}")]
    Undecodable(String),
    #[error("the picture cannot be encoded: {0}")]
    Encode(String),
}

/// Make the picture of `source` as `spec` says.
pub fn render(source: Source, spec: &Spec) -> Result<Vec<u8>, RenderError> {
    let (object, frame) = frame_object(source)?;
    let picture = picture_of(&object, frame, spec.window)?;
    let picture = fit(picture, spec)?;
    encode(&picture, spec.format)
}

/// The frame's pixels decoded to native little-endian samples (interleaved,
/// at the decoder's bits allocated): what `application/octet-stream`
/// without a transfer syntax asks of a compressed frame. Colour JPEG comes
/// out as RGB.
pub fn native_frame(source: Source) -> Result<Vec<u8>, RenderError> {
    let (object, frame) = frame_object(source)?;
    let decoded = object
        .decode_pixel_data_frame(frame)
        .map_err(|e| RenderError::Undecodable(error_chain(&e)))?;
    Ok(decoded.data().to_vec())
}

/// The object to decode, and the (0-based) frame of it to decode.
fn frame_object(source: Source) -> Result<(DefaultDicomObject, u32), RenderError> {
    let undecodable = |e: &dyn std::error::Error| RenderError::Undecodable(error_chain(e));
    if source.frame.is_empty() {
        let object = whole_object(&source.head, source.inflate_limit)?;
        return Ok((object, source.number.saturating_sub(1)));
    }
    let mut object = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .read_until(tags::PIXEL_DATA)
        .from_reader(Cursor::new(&source.head[..]))
        .map_err(|e| undecodable(&e))?;
    let bits = object
        .get(tags::BITS_ALLOCATED)
        .and_then(|e| e.to_int::<u16>().ok())
        .unwrap_or(8);
    let pixel_data = if source.encapsulated {
        let fragments: Vec<Vec<u8>> = source.frame.iter().map(|f| f.to_vec()).collect();
        DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            Value::PixelSequence(PixelFragmentSequence::new_fragments(fragments)),
        )
    } else {
        let mut bytes = source.frame.concat();
        if object.meta().transfer_syntax() == EXPLICIT_VR_BE {
            // The decoders read native data little-endian only.
            if bits > 8 {
                transcode::swap_words(&mut bytes, usize::from(bits / 8));
            }
            object.meta_mut().transfer_syntax = EXPLICIT_VR_LE.to_string();
        }
        let vr = if bits > 8 { VR::OW } else { VR::OB };
        DataElement::new(tags::PIXEL_DATA, vr, PrimitiveValue::from(bytes))
    };
    object.put(pixel_data);
    if object.get(tags::NUMBER_OF_FRAMES).is_some() {
        object.put(DataElement::new(
            tags::NUMBER_OF_FRAMES,
            VR::IS,
            PrimitiveValue::from("1"),
        ));
    }
    // The decoder takes frame k's rescale and window from the k-th per-frame
    // item: the one-frame object keeps only the asked frame's.
    let item = source.number.saturating_sub(1) as usize;
    let own = object
        .get(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .and_then(|groups| groups.items())
        .and_then(|items| items.get(item))
        .cloned();
    if let Some(own) = own {
        object.put(DataElement::new(
            tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE,
            VR::SQ,
            dicom_core::value::DataSetSequence::from(vec![own]),
        ));
    }
    Ok((object, 0))
}

/// A whole object (its frames are not addressable by byte range). A
/// Deflated data set is inflated here, at most `limit` bytes, and read as
/// Explicit VR Little Endian.
fn whole_object(bytes: &[u8], limit: u64) -> Result<DefaultDicomObject, RenderError> {
    use std::io::Read;
    let undecodable = |e: &dyn std::error::Error| RenderError::Undecodable(error_chain(e));
    let (meta, offset) = crate::dicom::part10::read_meta(bytes).map_err(|e| undecodable(&e))?;
    if meta.transfer_syntax != DEFLATED_EXPLICIT_VR_LE {
        return OpenFileOptions::new()
            .read_preamble(ReadPreamble::Always)
            .from_reader(Cursor::new(bytes))
            .map_err(|e| undecodable(&e));
    }
    let offset = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    let mut inflated = Vec::new();
    flate2::read::DeflateDecoder::new(&bytes[offset..])
        .take(limit.saturating_add(1))
        .read_to_end(&mut inflated)
        .map_err(|e| undecodable(&e))?;
    if inflated.len() as u64 > limit {
        return Err(RenderError::NotRenderable(format!(
            "the Deflated data set inflates past {limit} bytes, more than its pixels need"
        )));
    }
    let mut table = dicom_object::meta::FileMetaTable::from_reader(&bytes[128.min(bytes.len())..])
        .map_err(|e| undecodable(&e))?;
    table.transfer_syntax = EXPLICIT_VR_LE.to_string();
    let ts = {
        use dicom_encoding::TransferSyntaxIndex;
        dicom_transfer_syntax_registry::TransferSyntaxRegistry
            .get(EXPLICIT_VR_LE)
            .expect("Explicit VR Little Endian is registered")
    };
    dicom_object::InMemDicomObject::read_dataset_with_ts(Cursor::new(inflated), ts)
        .map(|o| o.with_exact_meta(table))
        .map_err(|e| undecodable(&e))
}

/// An error and its sources, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn photometric(object: &DefaultDicomObject) -> String {
    object
        .get(tags::PHOTOMETRIC_INTERPRETATION)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Decode `frame` and map it to 8-bit grey or RGB.
fn picture_of(
    object: &DefaultDicomObject,
    frame: u32,
    window: Option<Window>,
) -> Result<DynamicImage, RenderError> {
    let undecodable = |e: dicom_pixeldata::Error| RenderError::Undecodable(e.to_string());
    let decoded = object.decode_pixel_data_frame(frame).map_err(|e| {
        let text = error_chain(&e);
        // No decoder for the transfer syntax, or one that refuses this
        // variant of it (jpeg-decoder: 12-bit JPEG Extended).
        if text.contains("Unsupported") || text.contains("unsupported") {
            RenderError::NotRenderable(format!(
                "pixel data in transfer syntax {} cannot be rendered: {text}",
                object.meta().transfer_syntax().trim_end_matches('\0')
            ))
        } else {
            RenderError::Undecodable(text)
        }
    })?;
    if photometric(object) == "PALETTE COLOR" {
        return palette_picture(object, &decoded);
    }
    // Top-level Window Center/Width values are alternatives, not one per
    // frame (the decoder takes the frame's index into them): the first.
    let window = window.or_else(|| (frame > 0).then(|| first_window(object)).flatten());
    let voi = match window {
        Some(w) => VoiLutOption::CustomWithFunction(
            WindowLevel {
                center: w.center,
                width: w.width,
            },
            w.function,
        ),
        None => VoiLutOption::Default,
    };
    let options = ConvertOptions::new().with_voi_lut(voi).force_8bit();
    let picture = decoded
        .to_dynamic_image_with_options(0, &options)
        .map_err(undecodable)?;
    Ok(match picture {
        DynamicImage::ImageLuma8(_) | DynamicImage::ImageRgb8(_) => picture,
        other if other.color().has_color() => DynamicImage::ImageRgb8(other.to_rgb8()),
        other => DynamicImage::ImageLuma8(other.to_luma8()),
    })
}

/// The object's first top-level window, with its VOI LUT Function.
fn first_window(object: &DefaultDicomObject) -> Option<Window> {
    let first = |tag| {
        object
            .get(tag)
            .and_then(|e| e.value().to_multi_float64().ok())
            .and_then(|v| v.first().copied())
    };
    let function = object
        .get(tags::VOILUT_FUNCTION)
        .and_then(|e| e.to_str().ok())
        .map(|f| match f.trim() {
            "LINEAR_EXACT" => VoiLutFunction::LinearExact,
            "SIGMOID" => VoiLutFunction::Sigmoid,
            _ => VoiLutFunction::Linear,
        })
        .unwrap_or_default();
    Some(Window {
        center: first(tags::WINDOW_CENTER)?,
        width: first(tags::WINDOW_WIDTH)?,
        function,
    })
}

/// PALETTE COLOR (PS3.3 C.7.6.3.1.5): dicom-pixeldata leaves the indices as
/// grey, so the three LUTs are applied here.
fn palette_picture(
    object: &DefaultDicomObject,
    decoded: &dicom_pixeldata::DecodedPixelData<'_>,
) -> Result<DynamicImage, RenderError> {
    let lut = |descriptor, data| Lut::read(object, descriptor, data);
    let (red, green, blue) = (
        lut(
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        )?,
        lut(
            tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        )?,
        lut(
            tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        )?,
    );
    let (columns, rows) = (decoded.columns(), decoded.rows());
    let indices: Vec<u16> = match decoded.bits_allocated() {
        8 => decoded
            .frame_data(0)
            .map_err(|e| RenderError::Undecodable(e.to_string()))?
            .iter()
            .map(|&b| u16::from(b))
            .collect(),
        16 => decoded
            .frame_data_ow(0)
            .map_err(|e| RenderError::Undecodable(e.to_string()))?,
        other => {
            return Err(RenderError::NotRenderable(format!(
                "PALETTE COLOR with {other} bits allocated cannot be rendered"
            )));
        }
    };
    let mut rgb = Vec::with_capacity(indices.len() * 3);
    for &i in indices.iter().take(columns as usize * rows as usize) {
        rgb.extend([red.map(i), green.map(i), blue.map(i)]);
    }
    RgbImage::from_raw(columns, rows, rgb)
        .map(DynamicImage::ImageRgb8)
        .ok_or_else(|| {
            RenderError::Undecodable("the frame is shorter than its rows × columns".into())
        })
}

/// One palette LUT, its entries reduced to 8 bits.
struct Lut {
    first: i64,
    entries: Vec<u8>,
}

impl Lut {
    fn read(
        object: &DefaultDicomObject,
        descriptor: dicom_core::Tag,
        data: dicom_core::Tag,
    ) -> Result<Self, RenderError> {
        let missing = || {
            RenderError::NotRenderable(
                "a palette colour lookup table is missing (segmented palettes are not rendered)"
                    .into(),
            )
        };
        let d: Vec<i64> = object
            .get(descriptor)
            .and_then(|e| e.value().to_multi_int::<i64>().ok())
            .filter(|d| d.len() == 3)
            .ok_or_else(missing)?;
        let count = if d[0] == 0 { 65_536 } else { d[0] as usize };
        let raw = object
            .get(data)
            .and_then(|e| e.to_bytes().ok())
            .ok_or_else(missing)?;
        // Entries are 16-bit words; an 8-bit table (descriptor bits 8) holds
        // its values in the low byte of each word, or packed two per word
        // when the data is about as long as the table (both forms are in use).
        let words = || {
            raw.chunks_exact(2)
                .map(|w| u16::from_le_bytes([w[0], w[1]]))
        };
        let entries: Vec<u8> = if d[2] == 8 && raw.len() < 2 * count {
            raw.iter().take(count).copied().collect()
        } else if d[2] == 8 {
            words().map(|w| w as u8).collect()
        } else {
            words().map(|w| (w >> 8) as u8).collect()
        };
        if entries.is_empty() {
            return Err(missing());
        }
        Ok(Self {
            first: d[1],
            entries,
        })
    }

    /// Indices below the first mapped value take the first entry, above
    /// the last the last (PS3.3 C.7.6.3.1.5).
    fn map(&self, index: u16) -> u8 {
        let at = (i64::from(index) - self.first).clamp(0, self.entries.len() as i64 - 1);
        self.entries[at as usize]
    }
}

/// Crop to the region, then scale into the viewport keeping the aspect ratio.
fn fit(mut picture: DynamicImage, spec: &Spec) -> Result<DynamicImage, RenderError> {
    if let Some(r) = spec.region {
        let (w, h) = (picture.width(), picture.height());
        let width = r.width.unwrap_or(w.saturating_sub(r.x));
        let height = r.height.unwrap_or(h.saturating_sub(r.y));
        if width == 0
            || height == 0
            || u64::from(r.x) + u64::from(width) > u64::from(w)
            || u64::from(r.y) + u64::from(height) > u64::from(h)
        {
            return Err(RenderError::BadRequest(format!(
                "the viewport region {},{},{width},{height} is not inside the {w} × {h} frame",
                r.x, r.y
            )));
        }
        picture = picture.crop_imm(r.x, r.y, width, height);
    }
    let Some((vw, vh)) = spec.viewport else {
        return Ok(picture);
    };
    let (w, h) = (picture.width(), picture.height());
    if spec.shrink_only && w <= vw && h <= vh {
        return Ok(picture);
    }
    // `resize` fits within the bounds and keeps the aspect ratio.
    Ok(picture.resize(vw.max(1), vh.max(1), FilterType::Triangle))
}

fn encode(picture: &DynamicImage, format: Format) -> Result<Vec<u8>, RenderError> {
    let mut out = Vec::new();
    let encoded = match format {
        Format::Jpeg { quality } => {
            let (data, color) = match picture {
                DynamicImage::ImageLuma8(p) => (p.as_raw(), jpeg_encoder::ColorType::Luma),
                DynamicImage::ImageRgb8(p) => (p.as_raw(), jpeg_encoder::ColorType::Rgb),
                _ => return Err(RenderError::Encode("pictures are 8-bit grey or RGB".into())),
            };
            let (Ok(w), Ok(h)) = (
                u16::try_from(picture.width()),
                u16::try_from(picture.height()),
            ) else {
                return Err(RenderError::Encode(
                    "JPEG pictures are at most 65,535 pixels each way".into(),
                ));
            };
            return jpeg_encoder::Encoder::new(&mut out, quality.clamp(1, 100))
                .encode(data, w, h, color)
                .map(|()| out)
                .map_err(|e| RenderError::Encode(e.to_string()));
        }
        Format::Png => {
            let encoder = image::codecs::png::PngEncoder::new(&mut out);
            picture.write_with_encoder(encoder)
        }
    };
    encoded.map_err(|e| RenderError::Encode(e.to_string()))?;
    Ok(out)
}
