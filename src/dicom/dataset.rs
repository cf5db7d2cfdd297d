//! One streaming pass over a stored Part-10 object: the data set as DICOM JSON
//! (PS3.18 Annex F, text decoded with every Specific Character Set value, bulk
//! data replaced by references) and the byte ranges of every frame, so that
//! WADO never has to parse the object again. Never holds pixel data in memory.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use base64::Engine as _;
use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_parser::dataset::LazyDataToken;
use dicom_parser::dataset::lazy_read::LazyDataSetReader;
use dicom_parser::stateful::decode::StatefulDecode;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::charset::CharacterSet;
use super::part10::{self, FileMeta};

/// Binary values up to this size are inlined (base64); larger ones become bulk data.
const INLINE_BINARY_MAX: u64 = 256;
/// Text values above this size are left to bulk data rather than held in the index.
const TEXT_VALUE_MAX: u64 = 1 << 20;
/// Value bytes one data set may inline in all: past it, every value longer
/// than `INLINE_BINARY_MAX` of a VR that may be bulk data becomes bulk data.
/// Each value alone stays under `TEXT_VALUE_MAX`, but thousands of them (a
/// crafted object, or a huge structure set) would otherwise all be held in
/// memory at ingest and in the index's metadata.
const INLINE_TOTAL_MAX: u64 = 8 << 20;
/// Elements (items included) one data set may have: the metadata of each is
/// held in memory and in the index, so a crafted object of millions of tiny
/// values is refused. Real objects (structure sets, segmentations with their
/// per-frame groups) stay far below.
const ELEMENTS_MAX: u64 = 1_000_000;
/// A Basic Offset Table larger than this is ignored (frames are then found by markers).
const BOT_MAX: u32 = 16 << 20;

/// Prefix of the BulkDataURI values stored at ingest: `tsunagu:bulk/{offset}/{length}`
/// with byte positions in the stored object. The web layer rewrites it to the
/// instance's `/bulkdata/...` URL when serving metadata.
pub const BULK_URI_PREFIX: &str = "tsunagu:bulk/";

const DEFLATED_EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1.99";
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot read the object: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid file meta information: {0}")]
    Meta(#[from] part10::Part10Error),
    #[error("unknown transfer syntax {0}")]
    UnknownTransferSyntax(String),
    #[error("malformed data set: {0}")]
    Malformed(String),
    #[error("data set ends before its last element ({0})")]
    Truncated(&'static str),
}

/// Where the pixel data of an instance lies in the stored object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PixelLayout {
    /// Encapsulated (compressed) pixel data: frames are fragments.
    pub encapsulated: bool,
    /// Per frame, the (offset, length) of its bytes in the stored object:
    /// one range for native data, one per fragment for encapsulated data.
    /// Empty when frames cannot be addressed by byte range (deflated objects,
    /// bit-packed frames, unresolvable fragment layouts).
    pub frames: Vec<Vec<(u64, u64)>>,
}

impl PixelLayout {
    /// Where the object's header ends: everything before the first frame's
    /// bytes, the Pixel Data element's own header (and for encapsulated data
    /// its offset table) included. `None` when frames are not addressable.
    pub fn header_end(&self) -> Option<u64> {
        self.frames.first()?.iter().map(|r| r.0).min()
    }
}

/// The parsed, index-ready view of one object.
#[derive(Debug, Clone)]
pub struct ParsedObject {
    pub meta: FileMeta,
    /// Byte offset of the data set (after the File Meta Information).
    pub dataset_offset: u64,
    /// The data set as a DICOM JSON object (keys sorted by tag).
    pub json: Map<String, Value>,
    pub pixels: Option<PixelLayout>,
    /// The furthest byte offset any element claimed to reach.
    pub max_end: u64,
}

impl ParsedObject {
    /// Check a streamed parse against the final object length.
    pub fn check_complete(&self, total: u64) -> Result<(), DatasetError> {
        if self.max_end > total {
            Err(DatasetError::Truncated("element value"))
        } else {
            Ok(())
        }
    }
}

/// Parse a Part-10 file from disk in one pass.
pub fn parse_file(path: &Path) -> Result<ParsedObject, DatasetError> {
    parse_file_hashed(path).map(|(p, _)| p)
}

/// Parse a Part-10 file and compute the SHA-256 of its data set bytes (the
/// bytes after the meta group) in the same read.
pub fn parse_file_hashed(path: &Path) -> Result<(ParsedObject, [u8; 32]), DatasetError> {
    let mut file = File::open(path)?;
    let (meta, dataset_offset) = part10::read_meta(BufReader::new(&mut file))?;
    let total = file.metadata()?.len();
    file.seek(SeekFrom::Start(dataset_offset))?;
    let mut hashed = HashingReader::new(file);
    let parsed = parse_stream(&mut hashed, meta, dataset_offset, Some(total))?;
    // Read whatever the parser left (trailing padding) so the digest is whole.
    std::io::copy(&mut hashed, &mut std::io::sink())?;
    let digest = match hashed.finish(total - dataset_offset) {
        Some(d) => d,
        None => {
            // The parser did not read the data set linearly: hash it apart.
            let mut f = File::open(path)?;
            f.seek(SeekFrom::Start(dataset_offset))?;
            let mut h = HashingReader::new(f);
            std::io::copy(&mut h, &mut std::io::sink())?;
            h.finish(total - dataset_offset).expect("read linearly")
        }
    };
    Ok((parsed, digest))
}

/// The SHA-256 (lower-case hex) of a Part-10 file's data set bytes, the
/// digest object keys name; an error if it is not a whole data set.
pub fn data_set_digest(path: &Path) -> Result<String, DatasetError> {
    parse_file_hashed(path).map(|(_, d)| hex::encode(d))
}

/// Hashes what is read through it, as long as reading is linear.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
    linear: bool,
}

impl<R> HashingReader<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            read: 0,
            linear: true,
        }
    }

    /// The digest, if exactly `expected` bytes were read without seeking.
    fn finish(self, expected: u64) -> Option<[u8; 32]> {
        (self.linear && self.read == expected).then(|| self.hasher.finalize().into())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

impl<R: Seek> Seek for HashingReader<R> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        if pos != SeekFrom::Current(0) {
            self.linear = false;
        }
        self.inner.seek(pos)
    }
}

/// Most bytes a Deflated data set may inflate to (the scratch file it is
/// parsed from): far above any real deflated object (SR and other
/// documents), far below a disk.
const INFLATED_MAX: u64 = 1 << 30;

/// Inflate `deflated` into `out`, at most `max` bytes; how many. Bounded: a
/// few MiB of deflated zeros would inflate to gigabytes of scratch file (the
/// element limits apply only once it is parsed).
fn inflate_bounded(
    deflated: &mut impl Read,
    out: &mut impl std::io::Write,
    max: u64,
) -> Result<u64, DatasetError> {
    let len = std::io::copy(&mut deflated.take(max + 1), out)?;
    if len > max {
        return Err(DatasetError::Malformed(format!(
            "the deflated data set inflates past {} MiB",
            max >> 20
        )));
    }
    Ok(len)
}

/// Parse the data set that `source` is positioned at: offset `dataset_offset`
/// of an object of `total` bytes, or of a stream whose end is not known yet
/// (then the caller checks `ParsedObject::max_end` against the final length).
/// `source` only needs `Seek` to report its position (`SeekFrom::Current(0)`).
pub fn parse_stream<R: Read + Seek>(
    source: R,
    meta: FileMeta,
    dataset_offset: u64,
    total: Option<u64>,
) -> Result<ParsedObject, DatasetError> {
    let ts_uid = meta.transfer_syntax.as_str();
    let ts = TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| DatasetError::UnknownTransferSyntax(ts_uid.to_string()))?;

    if ts_uid == DEFLATED_EXPLICIT_VR_LE {
        // The lazy reader needs a seekable source: inflate to a scratch file.
        // Offsets then point into the inflated stream, so frames are not addressable.
        let mut inflated = tempfile::tempfile()?;
        let mut raw = BufReader::new(source);
        let mut dec = flate2::read::DeflateDecoder::new(&mut raw);
        let len = inflate_bounded(&mut dec, &mut inflated, INFLATED_MAX)?;
        drop(dec);
        // Read any padding after the deflate stream so the digest covers it.
        std::io::copy(&mut raw, &mut std::io::sink())?;
        inflated.seek(SeekFrom::Start(0))?;
        let explicit = TransferSyntaxRegistry
            .get(EXPLICIT_VR_LE)
            .expect("explicit VR LE is always registered");
        let mut w = walk(BufReader::new(inflated), explicit, Some(len), false)?;
        if let Some(p) = w.pixels.as_mut() {
            p.frames.clear();
        }
        return Ok(ParsedObject {
            meta,
            dataset_offset,
            json: w.json,
            pixels: w.pixels,
            max_end: 0,
        });
    }

    let big_endian = ts_uid == "1.2.840.10008.1.2.2";
    let w = walk(
        BufReader::with_capacity(64 * 1024, source),
        ts,
        total,
        big_endian,
    )?;
    Ok(ParsedObject {
        meta,
        dataset_offset,
        json: w.json,
        pixels: w.pixels,
        max_end: w.max_end,
    })
}

enum Node {
    Item {
        map: Map<String, Value>,
        cs: CharacterSet,
    },
    Seq {
        tag: Tag,
        items: Vec<Value>,
    },
    Pixels {
        items_seen: usize,
        bot: Vec<u32>,
        /// (offset of the item's value, length, first bytes)
        fragments: Vec<(u64, u64, [u8; 4])>,
    },
}

fn tag_key(tag: Tag) -> String {
    format!("{:04X}{:04X}", tag.group(), tag.element())
}

fn bulk_uri(offset: u64, len: u64) -> Value {
    Value::String(format!("{BULK_URI_PREFIX}{offset}/{len}"))
}

fn malformed(e: impl std::fmt::Display) -> DatasetError {
    DatasetError::Malformed(e.to_string())
}

/// What one walk over a data set found.
struct Walked {
    json: Map<String, Value>,
    pixels: Option<PixelLayout>,
    /// The furthest byte any element claimed to reach: beyond the end of the
    /// source means the data set was truncated.
    max_end: u64,
}

/// Walk the data set from the source's current position. Positions reported
/// by the decoder are absolute in `source`; `len`, when known up front, is the
/// source's total length (a streamed source is checked with `max_end` after).
fn walk<R: Read + Seek>(
    source: R,
    ts: &dicom_encoding::TransferSyntax,
    len: Option<u64>,
    big_endian: bool,
) -> Result<Walked, DatasetError> {
    let len = len.unwrap_or(u64::MAX);
    let mut max_end = 0u64;
    let mut reader = LazyDataSetReader::new_with_ts(source, ts).map_err(malformed)?;
    let mut stack = vec![Node::Item {
        map: Map::new(),
        cs: CharacterSet::default(),
    }];
    let mut native_pixels: Option<(u64, u64)> = None;
    let mut inline_left = INLINE_TOTAL_MAX;
    let mut elements = 0u64;
    let mut encapsulated: Option<Vec<Vec<(u64, u64)>>> = None;
    // Implicit VR leaves "US or SS" to be settled by Pixel Representation.
    let implicit = ts.uid().trim_end_matches('\0') == "1.2.840.10008.1.2";

    while let Some(token) = reader.advance() {
        let token = token.map_err(malformed)?;
        elements += 1;
        if elements > ELEMENTS_MAX {
            return Err(DatasetError::Malformed(format!(
                "more than {ELEMENTS_MAX} elements and items"
            )));
        }
        match token {
            LazyDataToken::LazyValue { header, decoder } => {
                let pos = decoder.position();
                let vlen = u64::from(header.len.0);
                max_end = max_end.max(pos + vlen);
                if pos + vlen > len {
                    return Err(DatasetError::Truncated("element value"));
                }
                let tag = header.tag;
                let top_level = stack.len() == 1;
                let Some(Node::Item { map, cs }) = stack.last_mut() else {
                    return Err(malformed("element outside an item"));
                };
                let vr = if implicit {
                    resolve_implicit_vr(tag, header.vr, map)
                } else {
                    header.vr
                };
                // Group lengths and file meta elements do not belong in DICOM JSON.
                if tag.element() == 0 || tag.group() == 0x0002 {
                    decoder.skip_bytes(header.len.0).map_err(malformed)?;
                    continue;
                }
                if top_level && tag == tags::PIXEL_DATA {
                    native_pixels = Some((pos, vlen));
                    decoder.skip_bytes(header.len.0).map_err(malformed)?;
                    map.insert(
                        tag_key(tag),
                        json!({"vr": vr_str(vr), "BulkDataURI": bulk_uri(pos, vlen)}),
                    );
                    continue;
                }
                let entry = element_json(
                    decoder,
                    vr,
                    header.len.0,
                    pos,
                    cs,
                    big_endian,
                    tag == tags::SPECIFIC_CHARACTER_SET,
                    &mut inline_left,
                )?;
                if tag == tags::SPECIFIC_CHARACTER_SET
                    && let Some(raw) = entry.1
                {
                    *cs = CharacterSet::from_raw(&raw);
                }
                map.insert(tag_key(tag), entry.0);
            }
            LazyDataToken::SequenceStart { tag, .. } => stack.push(Node::Seq {
                tag,
                items: Vec::new(),
            }),
            LazyDataToken::PixelSequenceStart => stack.push(Node::Pixels {
                items_seen: 0,
                bot: Vec::new(),
                fragments: Vec::new(),
            }),
            LazyDataToken::ItemStart { .. } => match stack.last_mut() {
                Some(Node::Pixels { items_seen, .. }) => *items_seen += 1,
                Some(Node::Seq { .. }) => {
                    let cs = stack
                        .iter()
                        .rev()
                        .find_map(|n| match n {
                            Node::Item { cs, .. } => Some(cs.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    stack.push(Node::Item {
                        map: Map::new(),
                        cs,
                    });
                }
                _ => return Err(malformed("item outside a sequence")),
            },
            LazyDataToken::LazyItemValue { len: ilen, decoder } => {
                let pos = decoder.position();
                let ilen64 = u64::from(ilen);
                max_end = max_end.max(pos + ilen64);
                if pos + ilen64 > len {
                    return Err(DatasetError::Truncated("pixel data fragment"));
                }
                let Some(Node::Pixels {
                    items_seen,
                    bot,
                    fragments,
                }) = stack.last_mut()
                else {
                    return Err(malformed("item value outside pixel data"));
                };
                if *items_seen == 1 {
                    if ilen <= BOT_MAX {
                        let mut raw = Vec::new();
                        decoder.read_to_vec(ilen, &mut raw).map_err(malformed)?;
                        *bot = raw
                            .chunks_exact(4)
                            .map(|c| {
                                let b = [c[0], c[1], c[2], c[3]];
                                if big_endian {
                                    u32::from_be_bytes(b)
                                } else {
                                    u32::from_le_bytes(b)
                                }
                            })
                            .collect();
                    } else {
                        decoder.skip_bytes(ilen).map_err(malformed)?;
                    }
                } else {
                    let head = ilen.min(4);
                    let mut first = Vec::with_capacity(4);
                    decoder.read_to_vec(head, &mut first).map_err(malformed)?;
                    decoder.skip_bytes(ilen - head).map_err(malformed)?;
                    let mut f = [0u8; 4];
                    f[..first.len()].copy_from_slice(&first);
                    fragments.push((pos, ilen64, f));
                }
            }
            LazyDataToken::ItemEnd
                if matches!(stack.last(), Some(Node::Item { .. })) && stack.len() > 1 =>
            {
                let Some(Node::Item { map, .. }) = stack.pop() else {
                    unreachable!()
                };
                match stack.last_mut() {
                    Some(Node::Seq { items, .. }) => items.push(Value::Object(map)),
                    _ => return Err(malformed("item end outside a sequence")),
                }
            }
            LazyDataToken::SequenceEnd => match stack.pop() {
                Some(Node::Seq { tag, items }) => {
                    let Some(Node::Item { map, .. }) = stack.last_mut() else {
                        return Err(malformed("sequence end outside an item"));
                    };
                    if tag.element() != 0 && tag.group() != 0x0002 {
                        let v = if items.is_empty() {
                            json!({"vr": "SQ"})
                        } else {
                            json!({"vr": "SQ", "Value": items})
                        };
                        map.insert(tag_key(tag), v);
                    }
                }
                Some(Node::Pixels { bot, fragments, .. }) => {
                    let Some(Node::Item { map, .. }) = stack.last_mut() else {
                        return Err(malformed("pixel data outside an item"));
                    };
                    let (first, last) = match (fragments.first(), fragments.last()) {
                        (Some(f), Some(l)) => (f.0, l.0 + l.1),
                        _ => (0, 0),
                    };
                    map.insert(
                        tag_key(tags::PIXEL_DATA),
                        json!({"vr": "OB", "BulkDataURI": bulk_uri(first, last - first)}),
                    );
                    encapsulated = Some(frame_fragments(&fragments, &bot, frame_count(map)));
                }
                _ => return Err(malformed("unbalanced sequence end")),
            },
            _ => {}
        }
    }
    if stack.len() != 1 {
        return Err(DatasetError::Truncated("sequence"));
    }
    let Some(Node::Item { map, .. }) = stack.pop() else {
        unreachable!()
    };
    let pixels = if let Some(frames) = encapsulated {
        Some(PixelLayout {
            encapsulated: true,
            frames,
        })
    } else {
        native_pixels.map(|(off, plen)| PixelLayout {
            encapsulated: false,
            frames: native_frames(&map, off, plen),
        })
    };
    Ok(Walked {
        json: map,
        pixels,
        max_end,
    })
}

/// The dictionary gives "US or SS" for pixel-value attributes; under implicit
/// VR the data set's Pixel Representation (0028,0103) decides (PS3.5 §A.1,
/// PS3.3 C.7.6.3.1): 1 means signed.
/// Attributes whose VR is "US or SS", settled by Pixel Representation.
pub(crate) const PIXEL_VALUE_TAGS: [Tag; 8] = [
    tags::SMALLEST_IMAGE_PIXEL_VALUE,
    tags::LARGEST_IMAGE_PIXEL_VALUE,
    tags::SMALLEST_PIXEL_VALUE_IN_SERIES,
    tags::LARGEST_PIXEL_VALUE_IN_SERIES,
    // Smallest/Largest Image Pixel Value in Plane (retired, still sent).
    Tag(0x0028, 0x0110),
    Tag(0x0028, 0x0111),
    tags::PIXEL_PADDING_VALUE,
    tags::PIXEL_PADDING_RANGE_LIMIT,
];

fn resolve_implicit_vr(tag: Tag, dictionary_vr: VR, item: &Map<String, Value>) -> VR {
    if !matches!(dictionary_vr, VR::US | VR::SS) || !PIXEL_VALUE_TAGS.contains(&tag) {
        return dictionary_vr;
    }
    if number(item, tags::PIXEL_REPRESENTATION) == Some(1.0) {
        VR::SS
    } else {
        VR::US
    }
}

/// Number of Frames (0028,0008), 1 when absent.
fn frame_count(map: &Map<String, Value>) -> usize {
    number(map, tags::NUMBER_OF_FRAMES)
        .map(|n| n.max(1.0) as usize)
        .unwrap_or(1)
}

fn number(map: &Map<String, Value>, tag: Tag) -> Option<f64> {
    map.get(&tag_key(tag))?
        .get("Value")?
        .get(0)
        .and_then(|v| v.as_f64().or_else(|| v.as_str()?.trim().parse().ok()))
}

fn native_frames(map: &Map<String, Value>, offset: u64, len: u64) -> Vec<Vec<(u64, u64)>> {
    let dims = [
        tags::ROWS,
        tags::COLUMNS,
        tags::SAMPLES_PER_PIXEL,
        tags::BITS_ALLOCATED,
    ]
    .map(|t| number(map, t).unwrap_or(0.0) as u64);
    let bits = dims.iter().product::<u64>();
    if bits == 0 || bits % 8 != 0 {
        return Vec::new(); // bit-packed frames are not byte-addressable
    }
    let frame = bits / 8;
    (0..frame_count(map) as u64)
        .map(|k| (offset + k * frame, frame))
        .take_while(|&(o, f)| o + f <= offset + len)
        .map(|r| vec![r])
        .collect()
}

/// Assign fragments to frames (PS3.5 §A.4): by the Basic Offset Table when it
/// has one entry per frame, else one fragment per frame, else by the codestream
/// start markers (JPEG SOI, JPEG 2000 SOC) that begin each frame.
fn frame_fragments(
    fragments: &[(u64, u64, [u8; 4])],
    bot: &[u32],
    frames: usize,
) -> Vec<Vec<(u64, u64)>> {
    let ranges = |fs: &[(u64, u64, [u8; 4])]| fs.iter().map(|f| (f.0, f.1)).collect::<Vec<_>>();
    if fragments.is_empty() {
        return Vec::new();
    }
    if frames <= 1 {
        return vec![ranges(fragments)];
    }
    if bot.len() == frames {
        // BOT offsets count from the first byte of the first fragment's item tag.
        let origin = fragments[0].0 - 8;
        let mut out: Vec<Vec<(u64, u64)>> = vec![Vec::new(); frames];
        let mut k = 0;
        for f in fragments {
            let rel = f.0 - 8 - origin;
            while k + 1 < frames && rel >= u64::from(bot[k + 1]) {
                k += 1;
            }
            out[k].push((f.0, f.1));
        }
        if out.iter().all(|f| !f.is_empty()) {
            return out;
        }
    }
    if fragments.len() == frames {
        return fragments.iter().map(|f| vec![(f.0, f.1)]).collect();
    }
    let starts_frame = |h: &[u8; 4]| h[..2] == [0xFF, 0xD8] || h == &[0xFF, 0x4F, 0xFF, 0x51];
    let mut out: Vec<Vec<(u64, u64)>> = Vec::new();
    for f in fragments {
        if starts_frame(&f.2) || out.is_empty() {
            out.push(Vec::new());
        }
        out.last_mut().expect("pushed above").push((f.0, f.1));
    }
    if out.len() == frames { out } else { Vec::new() }
}

fn vr_str(vr: VR) -> &'static str {
    vr.to_string()
}

/// One primitive element as DICOM JSON; also returns the raw bytes when asked
/// (for Specific Character Set, which changes how later text is decoded).
/// Inlined values are taken from the data set's `inline_left`.
#[allow(clippy::too_many_arguments)]
fn element_json<D: StatefulDecode>(
    decoder: &mut D,
    vr: VR,
    len: u32,
    offset: u64,
    cs: &CharacterSet,
    big_endian: bool,
    keep_raw: bool,
    inline_left: &mut u64,
) -> Result<(Value, Option<Vec<u8>>), DatasetError> {
    let vr_name = vr_str(vr);
    if len == 0 {
        return Ok((json!({ "vr": vr_name }), None));
    }
    let len64 = u64::from(len);
    let binary = matches!(
        vr,
        VR::OB | VR::OW | VR::OD | VR::OF | VR::OL | VR::OV | VR::UN
    );
    // PS3.18 §10.4.3.3.2 lets only these VRs be bulk data; values of the
    // others (names, codes, UIDs, dates) are always inline, and one longer
    // than `TEXT_VALUE_MAX` is not a value any real object carries.
    let may_be_bulk = binary
        || matches!(
            vr,
            VR::DS
                | VR::FL
                | VR::FD
                | VR::IS
                | VR::LT
                | VR::SL
                | VR::SS
                | VR::ST
                | VR::SV
                | VR::UC
                | VR::UL
                | VR::US
                | VR::UT
                | VR::UV
        );
    if !may_be_bulk && len64 > TEXT_VALUE_MAX {
        return Err(DatasetError::Malformed(format!(
            "a {vr_name} value of {len64} bytes"
        )));
    }
    // Specific Character Set (`keep_raw`) is read whatever the budget: the
    // text after it is decoded by it.
    let too_big = if binary {
        len64 > INLINE_BINARY_MAX
    } else {
        may_be_bulk
            && !keep_raw
            && (len64 > TEXT_VALUE_MAX || (len64 > INLINE_BINARY_MAX && len64 > *inline_left))
    };
    if too_big {
        decoder.skip_bytes(len).map_err(malformed)?;
        return Ok((
            json!({ "vr": vr_name, "BulkDataURI": bulk_uri(offset, len64) }),
            None,
        ));
    }
    *inline_left = inline_left.saturating_sub(len64);
    let mut raw = Vec::with_capacity(len as usize);
    decoder.read_to_vec(len, &mut raw).map_err(malformed)?;
    if binary {
        // DICOM JSON's binary values are little-endian (as bulk data is):
        // a Big Endian object's words are swapped.
        let width = if big_endian {
            crate::dicom::transcode::swap_width(vr)
        } else {
            0
        };
        crate::dicom::transcode::swap_words(&mut raw, width);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&raw);
        return Ok((json!({ "vr": vr_name, "InlineBinary": b64 }), None));
    }
    let values = primitive_values(vr, &raw, cs, big_endian);
    let v = if values.is_empty() {
        json!({ "vr": vr_name })
    } else {
        json!({ "vr": vr_name, "Value": values })
    };
    Ok((v, keep_raw.then_some(raw)))
}

fn ascii(raw: &[u8]) -> String {
    raw.iter().map(|&b| b as char).collect()
}

/// Decode the values of a non-binary VR. Empty components stay as `null`
/// (PS3.18 F.2.5) so value positions are kept.
fn primitive_values(vr: VR, raw: &[u8], cs: &CharacterSet, big_endian: bool) -> Vec<Value> {
    macro_rules! nums {
        ($t:ty, $n:expr) => {
            raw.chunks_exact($n)
                .map(|c| {
                    let arr: [u8; $n] = c.try_into().expect("chunk size");
                    let v = if big_endian {
                        <$t>::from_be_bytes(arr)
                    } else {
                        <$t>::from_le_bytes(arr)
                    };
                    json!(v)
                })
                .collect()
        };
    }
    match vr {
        VR::US => nums!(u16, 2),
        VR::SS => nums!(i16, 2),
        VR::UL => nums!(u32, 4),
        VR::SL => nums!(i32, 4),
        VR::UV => nums!(u64, 8),
        VR::SV => nums!(i64, 8),
        VR::FL => nums!(f32, 4),
        VR::FD => nums!(f64, 8),
        VR::AT => raw
            .chunks_exact(4)
            .map(|c| {
                let (g, e) = if big_endian {
                    (
                        u16::from_be_bytes([c[0], c[1]]),
                        u16::from_be_bytes([c[2], c[3]]),
                    )
                } else {
                    (
                        u16::from_le_bytes([c[0], c[1]]),
                        u16::from_le_bytes([c[2], c[3]]),
                    )
                };
                Value::String(format!("{g:04X}{e:04X}"))
            })
            .collect(),
        VR::DS | VR::IS => ascii(raw)
            .split('\\')
            .map(|s| {
                let s = s.trim_matches(|c: char| c == ' ' || c == '\0');
                if s.is_empty() {
                    Value::Null
                } else if vr == VR::IS {
                    s.parse::<i64>()
                        .map(Value::from)
                        .unwrap_or_else(|_| json!(s))
                } else {
                    s.parse::<f64>()
                        .ok()
                        .and_then(|f| serde_json::Number::from_f64(f).map(Value::Number))
                        .unwrap_or_else(|| json!(s))
                }
            })
            .collect(),
        VR::PN => {
            let text = cs.decode(raw);
            text.split('\\')
                .map(|v| {
                    let v = v.trim_end_matches([' ', '\0']);
                    if v.is_empty() {
                        return Value::Null;
                    }
                    let mut groups = Map::new();
                    for (name, g) in ["Alphabetic", "Ideographic", "Phonetic"]
                        .iter()
                        .zip(v.split('='))
                    {
                        let g = g.trim_end_matches(' ');
                        if !g.is_empty() {
                            groups.insert((*name).to_string(), Value::String(g.to_string()));
                        }
                    }
                    Value::Object(groups)
                })
                .collect()
        }
        // Single-valued text: backslash is a character, not a delimiter.
        VR::LT | VR::ST | VR::UT | VR::UR => {
            let text = if vr == VR::UR {
                ascii(raw)
            } else {
                cs.decode(raw)
            };
            vec![Value::String(
                text.trim_end_matches([' ', '\0']).to_string(),
            )]
        }
        _ => {
            let text = if matches!(vr, VR::SH | VR::LO | VR::UC) {
                cs.decode(raw)
            } else {
                ascii(raw)
            };
            text.split('\\')
                .map(|s| {
                    let s = s.trim_matches(|c: char| c == ' ' || c == '\0');
                    if s.is_empty() {
                        Value::Null
                    } else {
                        Value::String(s.to_string())
                    }
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One explicit VR little endian element with a 4-byte length (UT, UN, ...).
    fn long_element(group: u16, element: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut e = Vec::with_capacity(12 + value.len());
        e.extend_from_slice(&group.to_le_bytes());
        e.extend_from_slice(&element.to_le_bytes());
        e.extend_from_slice(vr);
        e.extend_from_slice(&[0, 0]);
        e.extend_from_slice(&(value.len() as u32).to_le_bytes());
        e.extend_from_slice(value);
        e
    }

    /// The file meta of a secondary capture in transfer syntax `ts`.
    fn meta(ts: &str) -> FileMeta {
        FileMeta {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.7".into(),
            sop_instance_uid: "2.25.1".into(),
            transfer_syntax: ts.into(),
            source_ae_title: None,
        }
    }

    fn short_element(group: u16, element: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut e = Vec::with_capacity(8 + value.len());
        e.extend_from_slice(&group.to_le_bytes());
        e.extend_from_slice(&element.to_le_bytes());
        e.extend_from_slice(vr);
        e.extend_from_slice(&(value.len() as u16).to_le_bytes());
        e.extend_from_slice(value);
        e
    }

    #[test]
    fn values_past_the_inline_budget_become_bulk_data() {
        let text = vec![b'A'; TEXT_VALUE_MAX as usize];
        let mut ds = short_element(0x0011, 0x0010, b"LO", b"TSUNAGU TEST");
        let mut value_at = Vec::new();
        for n in 0..12u16 {
            value_at.push(ds.len() as u64 + 12);
            ds.extend(long_element(0x0011, 0x1000 + n, b"UT", &text));
        }
        ds.extend(short_element(0x0011, 0x1100, b"LO", b"SMALL AFTER"));
        let many_codes = vec!["CODE1234"; 100].join("\\");
        ds.extend(short_element(0x0011, 0x1101, b"CS", many_codes.as_bytes()));
        let meta = meta(EXPLICIT_VR_LE);
        let total = ds.len() as u64;
        let parsed = parse_stream(std::io::Cursor::new(ds), meta, 0, Some(total)).expect("parses");
        // The creator's 12 bytes came first: seven whole values fit after it.
        let per_budget = ((INLINE_TOTAL_MAX - 12) / TEXT_VALUE_MAX) as usize;
        assert_eq!(per_budget, 7);
        for (n, at) in value_at.iter().enumerate() {
            let el = &parsed.json[&format!("0011{:04X}", 0x1000 + n)];
            if n < per_budget {
                assert_eq!(
                    el["Value"][0].as_str().map(str::len),
                    Some(text.len()),
                    "{n}"
                );
            } else {
                assert_eq!(
                    el["BulkDataURI"],
                    format!("{BULK_URI_PREFIX}{at}/{}", text.len()),
                    "{n}"
                );
            }
        }
        // Short values stay inline whatever the budget, and so do values of
        // VRs that PS3.18 does not let be bulk data.
        assert_eq!(parsed.json["00111100"]["Value"][0], "SMALL AFTER");
        let codes = parsed.json["00111101"]["Value"].as_array().unwrap();
        assert_eq!(codes.len(), 100);
    }

    #[test]
    fn a_million_elements_are_refused() {
        let one = short_element(0x0011, 0x1000, b"LO", b"AB");
        let ds = one.repeat(ELEMENTS_MAX as usize + 1);
        let meta = meta(EXPLICIT_VR_LE);
        let total = ds.len() as u64;
        let refused = parse_stream(std::io::Cursor::new(ds), meta, 0, Some(total));
        assert!(
            matches!(&refused, Err(DatasetError::Malformed(m)) if m.contains("elements")),
            "{:?}",
            refused.map(|p| p.json.len())
        );
    }

    #[test]
    fn a_description_longer_than_any_real_one_is_refused() {
        let huge = vec![b'A'; TEXT_VALUE_MAX as usize + 2];
        // UC may be bulk data: a bulk data reference.
        let ds = long_element(0x0008, 0x0119, b"UC", &huge);
        let total = ds.len() as u64;
        let parsed = parse_stream(
            std::io::Cursor::new(ds),
            meta(EXPLICIT_VR_LE),
            0,
            Some(total),
        )
        .unwrap();
        assert!(parsed.json["00080119"]["BulkDataURI"].is_string());
        // Study Description (LO) may not; only implicit VR can make it this long.
        let mut ds = Vec::new();
        ds.extend_from_slice(&0x0008u16.to_le_bytes());
        ds.extend_from_slice(&0x1030u16.to_le_bytes());
        ds.extend_from_slice(&(huge.len() as u32).to_le_bytes());
        ds.extend_from_slice(&huge);
        let total = ds.len() as u64;
        let refused = parse_stream(
            std::io::Cursor::new(ds),
            meta("1.2.840.10008.1.2"),
            0,
            Some(total),
        );
        assert!(
            matches!(&refused, Err(DatasetError::Malformed(m)) if m.contains("LO value")),
            "{:?}",
            refused.map(|p| p.json)
        );
    }

    #[test]
    fn inline_binary_of_a_big_endian_object_is_little_endian() {
        // (0028,1201) Red Palette Color Lookup Table Data, OW, two words;
        // (0009,1010) a private OB value: bytes, never swapped.
        let mut ds = Vec::new();
        for (group, element, vr, value) in [
            (0x0009u16, 0x1010u16, b"OB", [1u8, 2, 3, 4]),
            (0x0028, 0x1201, b"OW", [0x12, 0x34, 0xAB, 0xCD]),
        ] {
            ds.extend_from_slice(&group.to_be_bytes());
            ds.extend_from_slice(&element.to_be_bytes());
            ds.extend_from_slice(vr);
            ds.extend_from_slice(&[0, 0]);
            ds.extend_from_slice(&4u32.to_be_bytes());
            ds.extend_from_slice(&value);
        }
        let total = ds.len() as u64;
        let parsed = parse_stream(
            std::io::Cursor::new(ds),
            meta("1.2.840.10008.1.2.2"),
            0,
            Some(total),
        )
        .unwrap();
        let b64 = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
        assert_eq!(parsed.json["00091010"]["InlineBinary"], b64(&[1, 2, 3, 4]));
        assert_eq!(
            parsed.json["00281201"]["InlineBinary"],
            b64(&[0x34, 0x12, 0xCD, 0xAB])
        );
    }

    #[test]
    fn a_deflated_data_set_inflating_past_the_limit_is_refused() {
        use std::io::Write as _;
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&vec![0u8; 3 << 20]).unwrap();
        let deflated = enc.finish().unwrap();
        assert!(deflated.len() < 64 << 10, "{}", deflated.len());
        let mut out = Vec::new();
        let mut dec = flate2::read::DeflateDecoder::new(&deflated[..]);
        let refused = inflate_bounded(&mut dec, &mut out, 2 << 20);
        assert!(
            matches!(&refused, Err(DatasetError::Malformed(m)) if m.contains("inflates past 2 MiB")),
            "{refused:?}"
        );
        assert!(out.len() <= (2 << 20) + 1);
        let mut dec = flate2::read::DeflateDecoder::new(&deflated[..]);
        assert_eq!(
            inflate_bounded(&mut dec, &mut Vec::new(), 4 << 20).unwrap(),
            3 << 20
        );
    }
}
