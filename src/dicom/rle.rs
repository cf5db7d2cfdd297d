//! RLE Lossless decoding (PS3.5 Annex G): one frame, one fragment, up to 15
//! PackBits segments, one per byte plane (most significant byte first) of
//! each sample. Output is native little-endian, samples interleaved
//! (Planar Configuration 0).

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RleError {
    #[error("RLE header is shorter than 64 bytes")]
    ShortHeader,
    #[error("RLE frame has {found} segments, {expected} expected")]
    Segments { found: u32, expected: usize },
    #[error("RLE segment offset {0} is out of the fragment")]
    Offset(u32),
    #[error("RLE segment {0} decodes to fewer bytes than the frame needs")]
    ShortSegment(usize),
    #[error("an RLE frame of {0} bytes cannot be decoded from a fragment of {1} bytes")]
    TooLarge(u64, usize),
}

/// Most segments of an RLE frame (PS3.5 §G.4: the header has room for 15).
const MAX_SEGMENTS: usize = 15;

/// Most bytes a PackBits byte decodes to: a two-byte replicate run gives 128.
const MAX_EXPANSION: u64 = 64;

/// Decode one frame of `rows` × `columns` pixels, `samples` per pixel,
/// `bits_allocated` bits each (8, 16, 32, 64).
pub fn decode_frame(
    fragment: &[u8],
    rows: usize,
    columns: usize,
    samples: usize,
    bits_allocated: usize,
) -> Result<Vec<u8>, RleError> {
    if fragment.len() < 64 {
        return Err(RleError::ShortHeader);
    }
    let word = |i: usize| {
        u32::from_le_bytes([
            fragment[4 * i],
            fragment[4 * i + 1],
            fragment[4 * i + 2],
            fragment[4 * i + 3],
        ])
    };
    let bytes_per_sample = bits_allocated.div_ceil(8);
    let expected = samples * bytes_per_sample;
    let found = word(0);
    if found as usize != expected || expected > MAX_SEGMENTS {
        return Err(RleError::Segments { found, expected });
    }
    // Checked before allocating: the frame's size comes from the object's
    // attributes, and no fragment decodes to more than 64 times its size.
    let pixels = rows.saturating_mul(columns);
    let total = (pixels as u64).saturating_mul(expected as u64);
    if total > (fragment.len() as u64).saturating_mul(MAX_EXPANSION) {
        return Err(RleError::TooLarge(total, fragment.len()));
    }
    let mut out = vec![0u8; total as usize];
    for seg in 0..expected {
        let start = word(1 + seg);
        let end = if seg + 1 < expected {
            word(2 + seg)
        } else {
            fragment.len() as u32
        };
        if start < 64 || start > end || end as usize > fragment.len() {
            return Err(RleError::Offset(start));
        }
        let plane = unpack(&fragment[start as usize..end as usize], pixels);
        if plane.len() < pixels {
            return Err(RleError::ShortSegment(seg));
        }
        let (sample, byte) = (seg / bytes_per_sample, seg % bytes_per_sample);
        // Segment `byte` 0 is the most significant: little-endian position
        // `bytes_per_sample - 1 - byte`.
        let pos = sample * bytes_per_sample + (bytes_per_sample - 1 - byte);
        for (i, b) in plane.iter().take(pixels).enumerate() {
            out[i * expected + pos] = *b;
        }
    }
    Ok(out)
}

/// `decode_frame` with Samples per Pixel taken from the segment count.
pub fn decode_frame_of(
    fragment: &[u8],
    rows: usize,
    columns: usize,
    bits_allocated: usize,
) -> Result<Vec<u8>, RleError> {
    let segments = fragment
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or(RleError::ShortHeader)?;
    let samples = (segments / bits_allocated.div_ceil(8).max(1)).max(1);
    decode_frame(fragment, rows, columns, samples, bits_allocated)
}

/// PackBits: a control byte n in 0..=127 copies n+1 literal bytes; -127..=-1
/// repeats the next byte 1-n times; -128 does nothing.
fn unpack(seg: &[u8], want: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(want);
    let mut i = 0;
    while i < seg.len() && out.len() < want {
        let n = seg[i] as i8;
        i += 1;
        if n >= 0 {
            let len = n as usize + 1;
            let end = (i + len).min(seg.len());
            out.extend_from_slice(&seg[i..end]);
            i = end;
        } else if n != -128 {
            if let Some(&b) = seg.get(i) {
                out.extend(std::iter::repeat_n(b, (1 - n as isize) as usize));
            }
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(offsets: &[u32]) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(&(offsets.len() as u32).to_le_bytes());
        for (i, o) in offsets.iter().enumerate() {
            h[4 + 4 * i..8 + 4 * i].copy_from_slice(&o.to_le_bytes());
        }
        h
    }

    #[test]
    fn sixteen_bit_planes_become_little_endian() {
        // 2x2 pixels 0x0102, 0x0102, 0x0304, 0x0305.
        // High plane [01,01,03,03] = run(-1 -> 2x01), run(-1 -> 2x03)
        let mut g = header(&[64, 68]);
        g.extend_from_slice(&[0xFF, 0x01, 0xFF, 0x03]);
        // low plane [02,02,04,05] = run 2x02, literal 2: 04 05
        g.extend_from_slice(&[0xFF, 0x02, 0x01, 0x04, 0x05]);
        let out = decode_frame(&g, 2, 2, 1, 16).unwrap();
        assert_eq!(out, vec![0x02, 0x01, 0x02, 0x01, 0x04, 0x03, 0x05, 0x03]);
    }

    #[test]
    fn wrong_segment_count_is_an_error() {
        let g = header(&[64]);
        assert_eq!(
            decode_frame(&g, 1, 1, 3, 8),
            Err(RleError::Segments {
                found: 1,
                expected: 3
            })
        );
    }

    #[test]
    fn frames_larger_than_the_fragment_allows_are_refused() {
        // A 64-byte header for one segment, and a frame of 65535 x 65535.
        let mut fragment = vec![0u8; 66];
        fragment[0] = 1;
        fragment[4] = 64;
        fragment[64] = 0x81; // replicate the next byte 128 times
        assert!(matches!(
            decode_frame(&fragment, 65535, 65535, 1, 8),
            Err(RleError::TooLarge(..))
        ));
        // More segments than the header has room for.
        let mut fragment = vec![0u8; 200];
        fragment[0] = 16;
        assert!(matches!(
            decode_frame(&fragment, 2, 2, 16, 8),
            Err(RleError::Segments { .. })
        ));
    }
}
