//! Lossless re-encoding of a stored object to Explicit VR Little Endian, for
//! web services, which must not use Implicit VR or Big Endian (PS3.18
//! §8.7.3). Value bytes are copied, never decoded and re-encoded, so text in
//! any character set (ISO 2022 included) survives unchanged; only element
//! headers are rewritten (sequences and items with undefined length, so no
//! length needs recomputing), and big-endian binary values are byte-swapped.
//! RLE Lossless pixel data is decoded frame by frame (the one codec built
//! in; the others arrive with the imaging work).
//! Streams: memory is one element value or one frame at most.

use std::io::{Read, Seek, SeekFrom, Write};

use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_parser::dataset::LazyDataToken;
use dicom_parser::dataset::lazy_read::LazyDataSetReader;
use dicom_parser::stateful::decode::StatefulDecode;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::dataset::PIXEL_VALUE_TAGS;
use super::part10::{self, FileMeta};

pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";

#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    #[error("cannot re-encode {0} to Explicit VR Little Endian without decoding pixels")]
    Unsupported(String),
    #[error("malformed stored object: {0}")]
    Malformed(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

pub(crate) fn malformed(e: impl std::fmt::Display) -> TranscodeError {
    TranscodeError::Malformed(e.to_string())
}

/// Whether `ts` can be re-encoded by `to_explicit_le`.
pub fn can_reencode(ts: &str) -> bool {
    matches!(
        ts,
        IMPLICIT_VR_LE | EXPLICIT_VR_BE | DEFLATED | EXPLICIT_VR_LE | RLE_LOSSLESS
    )
}

/// Write the Part-10 object read from `src` (positioned anywhere) as
/// Explicit VR Little Endian to `out`: a new File Meta Information, then the
/// re-encoded data set.
pub fn to_explicit_le<R: Read + Seek, W: Write>(
    mut src: R,
    out: &mut W,
) -> Result<(), TranscodeError> {
    src.seek(SeekFrom::Start(0))?;
    let (meta, offset) = part10::read_meta(&mut src).map_err(malformed)?;
    let header = part10::encode_header(&FileMeta {
        transfer_syntax: EXPLICIT_VR_LE.into(),
        ..meta.clone()
    })
    .map_err(malformed)?;
    out.write_all(&header)?;
    src.seek(SeekFrom::Start(offset))?;
    match meta.transfer_syntax.as_str() {
        EXPLICIT_VR_LE => {
            std::io::copy(&mut src, out)?;
        }
        DEFLATED => {
            // A deflated data set is Explicit VR Little Endian once inflated.
            let mut inflated = flate2::read::DeflateDecoder::new(std::io::BufReader::new(src));
            std::io::copy(&mut inflated, out)?;
        }
        ts @ (IMPLICIT_VR_LE | EXPLICIT_VR_BE | RLE_LOSSLESS) => {
            let ts = TransferSyntaxRegistry
                .get(ts)
                .ok_or_else(|| TranscodeError::Unsupported(ts.into()))?;
            rewrite(std::io::BufReader::new(src), ts, out)?;
        }
        other => return Err(TranscodeError::Unsupported(other.into())),
    }
    Ok(())
}

/// Whether `ts` is Deflated Explicit VR Little Endian, whose bulk data
/// positions (see `dataset::parse_stream`) count in the inflated data set.
pub fn is_deflated(ts: &str) -> bool {
    ts == DEFLATED
}

/// Bytes `range` of the inflated data set of the Deflated Part-10 object
/// `src`: what a bulk data position of such an object names.
pub fn inflated_range<R: Read + Seek>(
    mut src: R,
    range: std::ops::Range<u64>,
) -> Result<Vec<u8>, TranscodeError> {
    let (_, offset) = part10::read_meta(&mut src).map_err(malformed)?;
    src.seek(SeekFrom::Start(offset))?;
    let mut inflated = flate2::read::DeflateDecoder::new(std::io::BufReader::new(src));
    let skipped = std::io::copy(&mut (&mut inflated).take(range.start), &mut std::io::sink())?;
    let len = range.end.saturating_sub(range.start);
    let mut out = Vec::with_capacity(usize::try_from(len).map_err(malformed)?);
    inflated.take(len).read_to_end(&mut out)?;
    if skipped != range.start || out.len() as u64 != len {
        return Err(malformed("the inflated data set ends before the range"));
    }
    Ok(out)
}

pub(crate) fn header(out: &mut impl Write, tag: Tag, vr: VR, len: u32) -> std::io::Result<()> {
    out.write_all(&tag.group().to_le_bytes())?;
    out.write_all(&tag.element().to_le_bytes())?;
    out.write_all(vr.to_bytes().as_slice())?;
    if matches!(
        vr,
        VR::OB
            | VR::OD
            | VR::OF
            | VR::OL
            | VR::OV
            | VR::OW
            | VR::SQ
            | VR::SV
            | VR::UC
            | VR::UN
            | VR::UR
            | VR::UT
            | VR::UV
    ) {
        out.write_all(&[0, 0])?;
        out.write_all(&len.to_le_bytes())
    } else {
        let short = u16::try_from(len).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("value of {tag} too long for VR {vr:?} in Explicit VR"),
            )
        })?;
        out.write_all(&short.to_le_bytes())
    }
}

pub(crate) fn delimiter(out: &mut impl Write, element: u16, len: u32) -> std::io::Result<()> {
    out.write_all(&0xFFFEu16.to_le_bytes())?;
    out.write_all(&element.to_le_bytes())?;
    out.write_all(&len.to_le_bytes())
}

/// Width of the binary numbers of `vr` (for byte swapping), 0 for text.
pub(crate) fn swap_width(vr: VR) -> usize {
    match vr {
        VR::US | VR::SS | VR::OW | VR::AT => 2,
        VR::UL | VR::SL | VR::FL | VR::OF | VR::OL => 4,
        VR::FD | VR::OD | VR::SV | VR::UV | VR::OV => 8,
        _ => 0,
    }
}

/// Reverse each whole `width`-byte word of `bytes` (big- to little-endian);
/// nothing for a width of 0 or 1, a trailing part word left as it is.
pub(crate) fn swap_words(bytes: &mut [u8], width: usize) {
    if width > 1 {
        for w in bytes.chunks_exact_mut(width) {
            w.reverse();
        }
    }
}

/// Image Pixel module values seen so far at the top level.
#[derive(Default)]
struct ImagePixel {
    rows: usize,
    columns: usize,
    samples: usize,
    bits_allocated: usize,
    frames: usize,
}

impl ImagePixel {
    fn frame_len(&self) -> usize {
        self.rows * self.columns * self.samples.max(1) * self.bits_allocated.div_ceil(8)
    }
}

/// Decoding state inside an RLE pixel data sequence.
struct RleFrames {
    items: usize,
    written: usize,
    total: u64,
}

fn us_value(raw: &[u8]) -> usize {
    if raw.len() >= 2 {
        u16::from_le_bytes([raw[0], raw[1]]) as usize
    } else {
        0
    }
}

fn rewrite<R: Read + Seek, W: Write>(
    src: R,
    ts: &dicom_encoding::TransferSyntax,
    out: &mut W,
) -> Result<(), TranscodeError> {
    let uid = ts.uid().trim_end_matches('\0');
    let implicit = uid == IMPLICIT_VR_LE;
    let big_endian = uid == EXPLICIT_VR_BE;
    let mut reader = LazyDataSetReader::new_with_ts(src, ts).map_err(malformed)?;
    // Pixel Representation of each open item, to settle implicit "US or SS".
    let mut signed = vec![false];
    let mut image = ImagePixel {
        frames: 1,
        ..ImagePixel::default()
    };
    let mut rle: Option<RleFrames> = None;
    while let Some(token) = reader.advance() {
        match token.map_err(malformed)? {
            LazyDataToken::LazyValue { header: h, decoder } => {
                let len = h.len.0;
                let mut vr = h.vr;
                if implicit && PIXEL_VALUE_TAGS.contains(&h.tag) {
                    vr = if *signed.last().unwrap_or(&false) {
                        VR::SS
                    } else {
                        VR::US
                    };
                }
                if implicit && h.tag == tags::PIXEL_DATA {
                    vr = VR::OW;
                }
                if h.len.is_undefined() {
                    return Err(malformed(format!("undefined length of {}", h.tag)));
                }
                header(out, h.tag, vr, len)?;
                let top = signed.len() == 1;
                let watched = h.tag == tags::PIXEL_REPRESENTATION
                    || (top
                        && matches!(
                            h.tag,
                            tags::ROWS
                                | tags::COLUMNS
                                | tags::SAMPLES_PER_PIXEL
                                | tags::BITS_ALLOCATED
                                | tags::NUMBER_OF_FRAMES
                                | tags::PLANAR_CONFIGURATION
                        ));
                let width = if big_endian { swap_width(vr) } else { 0 };
                if width > 1 || watched {
                    let mut raw = Vec::with_capacity(len as usize);
                    decoder.read_to_vec(len, &mut raw).map_err(malformed)?;
                    swap_words(&mut raw, width);
                    match h.tag {
                        tags::PIXEL_REPRESENTATION => {
                            if let Some(s) = signed.last_mut() {
                                *s = us_value(&raw) == 1;
                            }
                        }
                        tags::ROWS => image.rows = us_value(&raw),
                        tags::COLUMNS => image.columns = us_value(&raw),
                        tags::SAMPLES_PER_PIXEL => image.samples = us_value(&raw),
                        tags::BITS_ALLOCATED => image.bits_allocated = us_value(&raw),
                        tags::NUMBER_OF_FRAMES => {
                            image.frames = String::from_utf8_lossy(&raw)
                                .trim_matches(['\0', ' '])
                                .parse()
                                .unwrap_or(1)
                        }
                        // Decoded RLE frames are pixel-interleaved.
                        tags::PLANAR_CONFIGURATION if uid == RLE_LOSSLESS && raw.len() == 2 => {
                            raw = vec![0, 0];
                        }
                        _ => {}
                    }
                    out.write_all(&raw)?;
                } else {
                    decoder.read_to(len, &mut *out).map_err(malformed)?;
                }
            }
            LazyDataToken::PixelSequenceStart if uid == RLE_LOSSLESS => {
                let total = (image.frame_len() * image.frames) as u64;
                let padded = total + total % 2;
                let vr = if image.bits_allocated > 8 {
                    VR::OW
                } else {
                    VR::OB
                };
                let len = u32::try_from(padded)
                    .map_err(|_| malformed("decoded pixel data exceeds 4 GiB"))?;
                header(out, tags::PIXEL_DATA, vr, len)?;
                rle = Some(RleFrames {
                    items: 0,
                    written: 0,
                    total,
                });
            }
            LazyDataToken::LazyItemValue { len, decoder } if rle.is_some() => {
                let state = rle.as_mut().expect("checked");
                state.items += 1;
                if state.items == 1 {
                    decoder.skip_bytes(len).map_err(malformed)?; // Basic Offset Table
                    continue;
                }
                let mut fragment = Vec::with_capacity(len as usize);
                decoder.read_to_vec(len, &mut fragment).map_err(malformed)?;
                if state.written >= image.frames {
                    return Err(malformed("more RLE fragments than frames"));
                }
                let frame = super::rle::decode_frame(
                    &fragment,
                    image.rows,
                    image.columns,
                    image.samples.max(1),
                    image.bits_allocated,
                )
                .map_err(malformed)?;
                out.write_all(&frame)?;
                state.written += 1;
            }
            LazyDataToken::ItemStart { .. } | LazyDataToken::ItemEnd if rle.is_some() => {}
            LazyDataToken::SequenceEnd if rle.is_some() => {
                let state = rle.take().expect("checked");
                if state.written != image.frames {
                    return Err(malformed(format!(
                        "{} RLE frames for {} declared",
                        state.written, image.frames
                    )));
                }
                if state.total % 2 == 1 {
                    out.write_all(&[0])?;
                }
            }
            LazyDataToken::SequenceStart { tag, .. } => {
                header(out, tag, VR::SQ, u32::MAX)?;
            }
            LazyDataToken::ItemStart { .. } => {
                signed.push(*signed.last().unwrap_or(&false));
                delimiter(out, 0xE000, u32::MAX)?;
            }
            LazyDataToken::ItemEnd => {
                signed.pop();
                delimiter(out, 0xE00D, 0)?;
            }
            LazyDataToken::SequenceEnd => delimiter(out, 0xE0DD, 0)?,
            LazyDataToken::PixelSequenceStart | LazyDataToken::LazyItemValue { .. } => {
                return Err(TranscodeError::Unsupported(
                    "encapsulated pixel data in this transfer syntax".into(),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}
