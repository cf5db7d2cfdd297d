//! Rendered and thumbnail resources over real HTTP: every picture of the
//! shared corpus against pydicom's reading of PS3.3 (window, Modality LUT,
//! MONOCHROME1, PALETTE COLOR), the same pixels whatever the transfer
//! syntax, viewports and windows, refusals, and the visibility rule.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use dicom_dictionary_std::tags;
use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use serde_json::Value;

use crate::common::{self, Backend, TestHub};

/// An answer under the service root: (status, content type, body).
async fn get_picture(
    hub: &TestHub,
    inst: &str,
    path: &str,
    accept: &str,
) -> (StatusCode, String, Vec<u8>) {
    let url = format!("{}{path}", hub.dicomweb());
    let r = common::get_as_clinician(hub, inst, &url, accept).await;
    let status = r.status();
    let ct = r
        .headers()
        .get(CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, ct, r.bytes().await.unwrap().to_vec())
}

fn instance_path(file: &Path) -> String {
    format!(
        "/studies/{}/series/{}/instances/{}",
        common::text_of(file, tags::STUDY_INSTANCE_UID),
        common::text_of(file, tags::SERIES_INSTANCE_UID),
        common::text_of(file, tags::SOP_INSTANCE_UID)
    )
}

/// Pixels of a PNG as 8-bit samples: (columns, rows, samples, bytes).
fn png_pixels(body: &[u8]) -> (u32, u32, usize, Vec<u8>) {
    let picture = image::load_from_memory_with_format(body, image::ImageFormat::Png)
        .expect("a PNG answer decodes");
    let (w, h) = (picture.width(), picture.height());
    if picture.color().has_color() {
        (w, h, 3, picture.to_rgb8().into_raw())
    } else {
        (w, h, 1, picture.to_luma8().into_raw())
    }
}

/// pydicom's picture of `frame` of each file (tests/tools/render_reference.py).
fn references(
    py: &str,
    frame: u32,
    files: &[PathBuf],
) -> HashMap<PathBuf, (u32, u32, usize, Vec<u8>)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/render_reference.py");
    let out = common::run_ok(
        std::process::Command::new(py)
            .arg(script)
            .arg(frame.to_string())
            .args(files),
    );
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let pixels = base64::engine::general_purpose::STANDARD
                .decode(v["pixels"].as_str().unwrap())
                .unwrap();
            (
                PathBuf::from(v["file"].as_str().unwrap()),
                (
                    v["columns"].as_u64().unwrap() as u32,
                    v["rows"].as_u64().unwrap() as u32,
                    v["samples"].as_u64().unwrap() as usize,
                    pixels,
                ),
            )
        })
        .collect()
}

/// Largest and mean absolute difference of two pictures of one size.
fn difference(a: &[u8], b: &[u8]) -> (u8, f64) {
    assert_eq!(a.len(), b.len(), "pictures of different sizes");
    let mut max = 0u8;
    let mut sum = 0u64;
    for (x, y) in a.iter().zip(b) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sum += u64::from(d);
    }
    (max, sum as f64 / a.len().max(1) as f64)
}

/// A hub holding the whole corpus (and the files `extra` makes from it) as
/// HOSP1's, with the corpus files by name.
async fn hub_with_corpus(
    extra: impl FnOnce(&HashMap<String, PathBuf>) -> Vec<PathBuf>,
) -> Option<(TestHub, HashMap<String, PathBuf>)> {
    let corpus = common::corpus()?;
    let hub = TestHub::start(Backend::Local).await?;
    let by_name: HashMap<String, PathBuf> = corpus
        .iter()
        .map(|(p, _)| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                p.clone(),
            )
        })
        .collect();
    let mut files: Vec<PathBuf> = corpus.into_iter().map(|(p, _)| p).collect();
    files.extend(extra(&by_name));
    hub.import("HOSP1", files).await;
    Some((hub, by_name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rendered_pictures_match_pydicom_in_every_transfer_syntax() {
    let Some(py) = common::python_with("pydicom") else {
        return;
    };
    let Some((hub, by_name)) = hub_with_corpus(|_| Vec::new()).await else {
        return;
    };
    let file = |name: &str| by_name[name].clone();
    let png = "image/png";

    // PS3.3's picture, as pydicom computes it, of the natively encoded
    // references: grey with its window, MONOCHROME1, PALETTE COLOR, RGB.
    let natives = [
        "ct16_explicit_le.dcm",
        "cr12_mono1_explicit_le.dcm",
        "sc_palette8_explicit_le.dcm",
        "sc_rgb8_explicit_le.dcm",
        "jp_utf8_ir192.dcm",
    ];
    let expected = references(&py, 1, &natives.map(file));
    let mut ours = HashMap::new();
    for name in natives {
        let path = format!("{}/rendered", instance_path(&file(name)));
        let (s, ct, body) = get_picture(&hub, "HOSP1", &path, png).await;
        assert_eq!(s, 200, "{name}: {}", String::from_utf8_lossy(&body));
        assert_eq!(ct, png);
        let got = png_pixels(&body);
        let want = &expected[&file(name)];
        assert_eq!(
            (got.0, got.1, got.2),
            (want.0, want.1, want.2),
            "{name}: size and samples"
        );
        let (max, _) = difference(&got.3, &want.3);
        assert!(max <= 1, "{name}: off by up to {max} from PS3.3's picture");
        ours.insert(name, got);
    }

    // Every lossless encoding of the same pixels renders the same picture.
    let lossless = [
        ("ct16_explicit_le.dcm", "ct16_implicit_le.dcm"),
        ("ct16_explicit_le.dcm", "ct16_explicit_be.dcm"),
        ("ct16_explicit_le.dcm", "ct16_deflated_le.dcm"),
        ("ct16_explicit_le.dcm", "ct16_jpeg_lossless_p14_sv6.dcm"),
        ("ct16_explicit_le.dcm", "ct16_jpeg_lossless_sv1.dcm"),
        ("ct16_explicit_le.dcm", "ct16_jpegls_lossless.dcm"),
        ("ct16_explicit_le.dcm", "ct16_rle.dcm"),
        ("ct16_explicit_le.dcm", "ct16_j2k_lossless.dcm"),
        ("sc_rgb8_explicit_le.dcm", "sc_rgb8_rle.dcm"),
        ("sc_rgb8_explicit_le.dcm", "sc_rgb8_j2k_lossless.dcm"),
        (
            "sc_rgb8_explicit_le.dcm",
            "sc_rgb8_j2k_lossless_ybr_rct.dcm",
        ),
        ("sc_rgb8_explicit_le.dcm", "sc_rgb8_jpegls_lossless.dcm"),
        ("sc_rgb8_explicit_le.dcm", "sc_rgb8_jpeg_lossless_sv1.dcm"),
    ];
    for (reference, other) in lossless {
        let path = format!("{}/rendered", instance_path(&file(other)));
        let (s, _, body) = get_picture(&hub, "HOSP1", &path, png).await;
        assert_eq!(s, 200, "{other}: {}", String::from_utf8_lossy(&body));
        assert_eq!(
            png_pixels(&body),
            ours[reference],
            "{other} renders as {reference}"
        );
    }

    // Lossy encodings: as pydicom (Pillow) decodes the same file, or close
    // to the lossless original where pydicom has no decoder (HTJ2K, JPEG-LS).
    let lossy = ["ct16_j2k_lossy.dcm", "sc_rgb8_jpeg_baseline_ybr422.dcm"];
    let expected = references(&py, 1, &lossy.map(file));
    for name in lossy {
        let path = format!("{}/rendered", instance_path(&file(name)));
        let (s, _, body) = get_picture(&hub, "HOSP1", &path, png).await;
        assert_eq!(s, 200, "{name}: {}", String::from_utf8_lossy(&body));
        let (max, mean) = difference(&png_pixels(&body).3, &expected[&file(name)].3);
        assert!(
            max <= 4 && mean < 0.5,
            "{name}: max {max}, mean {mean} from pydicom's"
        );
    }
    for (name, reference, exact) in [
        ("ct16_htj2k_lossless.dcm", "ct16_explicit_le.dcm", true),
        ("ct16_htj2k_lossless_rpcl.dcm", "ct16_explicit_le.dcm", true),
        ("ct16_htj2k_lossy.dcm", "ct16_explicit_le.dcm", false),
        (
            "cr12_jpegls_near_lossless.dcm",
            "cr12_mono1_explicit_le.dcm",
            false,
        ),
        (
            "us_cine_jpeg_baseline.dcm",
            "us_cine_rgb_explicit_le.dcm",
            false,
        ),
        (
            "us_cine_jpeg_baseline_fragmented.dcm",
            "us_cine_jpeg_baseline.dcm",
            true,
        ),
    ] {
        let path = format!("{}/rendered", instance_path(&file(name)));
        let (s, _, body) = get_picture(&hub, "HOSP1", &path, png).await;
        assert_eq!(s, 200, "{name}: {}", String::from_utf8_lossy(&body));
        let r = format!("{}/rendered", instance_path(&file(reference)));
        let (_, _, rb) = get_picture(&hub, "HOSP1", &r, png).await;
        let (max, mean) = difference(&png_pixels(&body).3, &png_pixels(&rb).3);
        if exact {
            assert_eq!(max, 0, "{name} renders as {reference}");
        } else {
            assert!(
                mean < 8.0,
                "{name}: mean difference {mean} from {reference}"
            );
        }
    }

    // A frame of a multi-frame object: the third of a cine loop, the same
    // from its RLE copy and against pydicom.
    let cine = file("us_cine_rgb_explicit_le.dcm");
    let want = &references(&py, 3, std::slice::from_ref(&cine))[&cine];
    for name in ["us_cine_rgb_explicit_le.dcm", "us_cine_rle.dcm"] {
        let path = format!("{}/frames/3/rendered", instance_path(&file(name)));
        let (s, _, body) = get_picture(&hub, "HOSP1", &path, png).await;
        assert_eq!(s, 200, "{name}: {}", String::from_utf8_lossy(&body));
        let got = png_pixels(&body);
        assert_eq!(difference(&got.3, &want.3).0, 0, "{name} frame 3");
    }
    let path = format!("{}/frames/11/rendered", instance_path(&cine));
    assert_eq!(get_picture(&hub, "HOSP1", &path, png).await.0, 400);
}

/// Viewports, regions, windows, thumbnails, refusals and the visibility rule
/// (no Python needed), and per-frame rescale of an enhanced multi-frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pictures_are_fitted_refused_and_hidden_like_retrieves() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().to_path_buf();
    let Some((hub, by_name)) = hub_with_corpus(|by_name| {
        vec![two_frames_with_their_own_rescale(
            &by_name["ct16_explicit_le.dcm"],
            &dir,
        )]
    })
    .await
    else {
        return;
    };
    let enhanced = dir.join("enhanced.dcm");
    let file = |name: &str| by_name[name].clone();
    let png = "image/png";

    // Frame 2 has its own rescale (its stored values are 100 higher, its
    // intercept 100 lower): the same picture as frame 1.
    let e = instance_path(&enhanced);
    let (s1, _, one) = get_picture(&hub, "HOSP1", &format!("{e}/frames/1/rendered"), png).await;
    let (s2, _, two) = get_picture(&hub, "HOSP1", &format!("{e}/frames/2/rendered"), png).await;
    assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK));
    assert!(
        png_pixels(&one) == png_pixels(&two),
        "frame 2 is not rendered under its own rescale"
    );

    // JPEG by default; a viewport scales keeping the aspect ratio; a region
    // crops; a window replaces the object's.
    let ct = instance_path(&file("ct16_explicit_le.dcm"));
    let (s, ct_type, body) = get_picture(&hub, "HOSP1", &format!("{ct}/rendered"), "*/*").await;
    assert_eq!((s, ct_type.as_str()), (StatusCode::OK, "image/jpeg"));
    let jpeg = image::load_from_memory_with_format(&body, image::ImageFormat::Jpeg).unwrap();
    assert_eq!((jpeg.width(), jpeg.height()), (128, 96));
    // Asked again: the same picture, from this hub's pictures cache (which
    // holds no more pictures than before).
    let held = hub.hub.pictures.len();
    assert!(held >= 1);
    let (s, _, again) = get_picture(&hub, "HOSP1", &format!("{ct}/rendered"), "*/*").await;
    assert_eq!(s, StatusCode::OK);
    assert!(again == body, "the cached picture differs");
    assert_eq!(hub.hub.pictures.len(), held);
    let (_, _, body) =
        get_picture(&hub, "HOSP1", &format!("{ct}/rendered?viewport=64,64"), png).await;
    let (w, h, _, _) = png_pixels(&body);
    assert_eq!((w, h), (64, 48));
    let (_, _, body) = get_picture(
        &hub,
        "HOSP1",
        &format!("{ct}/rendered?viewport=20,10,10,20,20,10"),
        png,
    )
    .await;
    let (w, h, _, crop) = png_pixels(&body);
    assert_eq!((w, h), (20, 10));
    let (_, _, body) = get_picture(&hub, "HOSP1", &format!("{ct}/rendered"), png).await;
    let full = &png_pixels(&body).3;
    let region: Vec<u8> = (20..30)
        .flat_map(|y| full[y * 128 + 10..y * 128 + 30].to_vec())
        .collect();
    assert_eq!(
        crop, region,
        "a region at its own size is the frame's pixels"
    );
    let (s, _, body) = get_picture(
        &hub,
        "HOSP1",
        &format!("{ct}/rendered?window=0,1000,linear"),
        png,
    )
    .await;
    assert_eq!(s, 200);
    assert_ne!(
        png_pixels(&body).3,
        *full,
        "another window, another picture"
    );

    // Compressed frames asked for as native pixels (octet-stream without a
    // transfer syntax) are decoded: lossless ones are the native file's.
    let octet = "multipart/related; type=\"application/octet-stream\"";
    for (reference, other) in [
        ("ct16_explicit_le.dcm", "ct16_jpegls_lossless.dcm"),
        ("ct16_explicit_le.dcm", "ct16_j2k_lossless.dcm"),
        ("ct16_explicit_le.dcm", "ct16_jpeg_lossless_sv1.dcm"),
        ("ct16_explicit_le.dcm", "ct16_htj2k_lossless.dcm"),
        ("sc_rgb8_explicit_le.dcm", "sc_rgb8_j2k_lossless.dcm"),
        ("sc_rgb8_explicit_le.dcm", "sc_rgb8_jpegls_lossless.dcm"),
    ] {
        let (want, _) = frame_part(&hub, &instance_path(&file(reference)), 1, octet).await;
        let (got, part_type) = frame_part(&hub, &instance_path(&file(other)), 1, octet).await;
        assert!(got == want, "{other}: not the pixels of {reference}");
        assert!(
            part_type.contains("transfer-syntax=1.2.840.10008.1.2.1"),
            "{part_type}"
        );
    }
    let cine = instance_path(&file("us_cine_jpeg_baseline.dcm"));
    let (rgb, _) = frame_part(&hub, &cine, 3, octet).await;
    assert_eq!(
        rgb.len(),
        64 * 80 * 3,
        "a colour JPEG frame comes out as RGB"
    );
    // 12-bit JPEG Extended is not decodable here: its stored fragments.
    let cr = instance_path(&file("cr12_jpeg_extended.dcm"));
    let (jpeg, part_type) = frame_part(&hub, &cr, 1, octet).await;
    assert_eq!(&jpeg[..2], b"\xff\xd8");
    assert!(part_type.contains("1.2.840.10008.1.2.4.51"), "{part_type}");
    // Its stored fragments stay available as they are.
    let (stored, part_type) =
        frame_part(&hub, &cine, 3, "multipart/related; type=\"image/jpeg\"").await;
    assert_eq!(&stored[..2], b"\xff\xd8");
    assert!(part_type.starts_with("image/jpeg"), "{part_type}");

    // Thumbnails of an instance, its series and its study: a small frame
    // keeps its size, a viewport scales it down, never up.
    let series = ct.rsplit_once("/instances/").unwrap().0.to_string();
    let study = series.rsplit_once("/series/").unwrap().0.to_string();
    let wsi = instance_path(&file("sm_wsi_level0_tiled_full.dcm"));
    for (path, size) in [
        (format!("{ct}/thumbnail"), (128, 96)),
        (format!("{ct}/thumbnail?viewport=32,32"), (32, 24)),
        (format!("{ct}/frames/1/thumbnail?viewport=64,200"), (64, 48)),
        (format!("{series}/thumbnail?viewport=32,32"), (32, 24)),
        (format!("{study}/thumbnail"), (128, 96)),
        (format!("{wsi}/frames/6/thumbnail?viewport=32,32"), (32, 32)),
        (format!("{wsi}/thumbnail?viewport=1000,1000"), (64, 64)),
    ] {
        let (s, ct_type, body) = get_picture(&hub, "HOSP1", &path, "image/jpeg").await;
        assert_eq!(s, 200, "{path}: {}", String::from_utf8_lossy(&body));
        assert_eq!(ct_type, "image/jpeg");
        let t = image::load_from_memory(&body).unwrap();
        assert_eq!((t.width(), t.height()), size, "{path}");
    }

    // Refusals, each with a problem body: nothing to show, video, bad
    // parameters, a format not offered.
    for (name, query, accept, status) in [
        ("doc_encapsulated_pdf.dcm", "", png, 406),
        ("sr_basic_text.dcm", "", png, 406),
        ("es_video_h264.dcm", "", png, 406),
        // jpeg-decoder reads 8-bit JPEG Extended only.
        ("cr12_jpeg_extended.dcm", "", png, 406),
        ("ct16_explicit_le.dcm", "?annotation=patient", png, 400),
        ("ct16_explicit_le.dcm", "?viewport=0,0", png, 400),
        (
            "ct16_explicit_le.dcm",
            "?viewport=10,10,100,100,50,50",
            png,
            400,
        ),
        ("ct16_explicit_le.dcm", "?window=40,-1,linear", png, 400),
        ("ct16_explicit_le.dcm", "", "image/gif", 406),
    ] {
        let path = format!("{}/rendered{query}", instance_path(&file(name)));
        let (s, ct_type, body) = get_picture(&hub, "HOSP1", &path, accept).await;
        assert_eq!(
            s.as_u16(),
            status,
            "{name}{query}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(ct_type, "application/problem+json", "{name}{query}");
    }

    // Another institution sees nothing: the same 404 as for a UID that
    // does not exist.
    let hidden = [
        format!("{ct}/rendered"),
        format!("{ct}/frames/1/rendered"),
        format!("{ct}/thumbnail"),
        format!("{series}/thumbnail"),
        format!("{study}/thumbnail"),
    ];
    for path in hidden {
        let (s, _, body) = get_picture(&hub, "HOSP2", &path, "image/jpeg").await;
        assert_eq!(s, 404, "{path}");
        let missing = path.replacen("/studies/2.25.", "/studies/2.25.9", 1);
        let (s2, _, body2) = get_picture(&hub, "HOSP1", &missing, "image/jpeg").await;
        assert_eq!(s2, 404, "{missing}");
        assert_eq!(body, body2, "hidden and absent answer alike: {path}");
    }
}

/// A two-frame copy of a CT slice whose rescale and window live in its
/// Per-frame Functional Groups (as in enhanced CT), frame 2 stored 100
/// higher with an intercept 100 lower.
fn two_frames_with_their_own_rescale(ct: &Path, dir: &Path) -> PathBuf {
    use dicom_core::value::DataSetSequence;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_object::InMemDicomObject;
    let mut obj = dicom_object::open_file(ct).unwrap();
    let one = obj
        .element(tags::PIXEL_DATA)
        .unwrap()
        .to_bytes()
        .unwrap()
        .to_vec();
    let two: Vec<u8> = one
        .chunks_exact(2)
        .flat_map(|v| {
            i16::from_le_bytes([v[0], v[1]])
                .saturating_add(100)
                .to_le_bytes()
        })
        .collect();
    let item = |intercept: &str| {
        let rescale = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::RESCALE_INTERCEPT,
                VR::DS,
                PrimitiveValue::from(intercept),
            ),
            DataElement::new(tags::RESCALE_SLOPE, VR::DS, PrimitiveValue::from("1")),
            DataElement::new(tags::RESCALE_TYPE, VR::LO, PrimitiveValue::from("HU")),
        ]);
        let window = InMemDicomObject::from_element_iter([
            DataElement::new(tags::WINDOW_CENTER, VR::DS, PrimitiveValue::from("40")),
            DataElement::new(tags::WINDOW_WIDTH, VR::DS, PrimitiveValue::from("400")),
        ]);
        InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE,
                VR::SQ,
                DataSetSequence::from(vec![rescale]),
            ),
            DataElement::new(
                tags::FRAME_VOILUT_SEQUENCE,
                VR::SQ,
                DataSetSequence::from(vec![window]),
            ),
        ])
    };
    for tag in [
        tags::RESCALE_INTERCEPT,
        tags::RESCALE_SLOPE,
        tags::RESCALE_TYPE,
        tags::WINDOW_CENTER,
        tags::WINDOW_WIDTH,
        tags::WINDOW_CENTER_WIDTH_EXPLANATION,
    ] {
        obj.remove_element(tag);
    }
    let sop = "2.25.212477325107932399243233100858614569001.3.4242";
    obj.put(DataElement::new(
        tags::SOP_INSTANCE_UID,
        VR::UI,
        PrimitiveValue::from(sop),
    ));
    obj.put(DataElement::new(
        tags::NUMBER_OF_FRAMES,
        VR::IS,
        PrimitiveValue::from("2"),
    ));
    obj.put(DataElement::new(
        tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE,
        VR::SQ,
        DataSetSequence::from(vec![item("-1024"), item("-1124")]),
    ));
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::from([one, two].concat()),
    ));
    obj.update_meta(|m| m.media_storage_sop_instance_uid = sop.to_string());
    let path = dir.join("enhanced.dcm");
    obj.write_to_file(&path).unwrap();
    path
}

/// Frame `n` of an instance as one multipart part: (its bytes, its type).
async fn frame_part(hub: &TestHub, instance: &str, n: u32, accept: &str) -> (Vec<u8>, String) {
    let (status, ct, body) =
        get_picture(hub, "HOSP1", &format!("{instance}/frames/{n}"), accept).await;
    assert_eq!(status, 200, "{instance} frame {n} as {accept}");
    let boundary = ct
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let head_end = body.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let headers = String::from_utf8_lossy(&body[..head_end]).to_string();
    let part_type = headers
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("content-type:")
                .then(|| l[13..].trim().to_string())
        })
        .unwrap();
    let delimiter = format!("\r\n--{boundary}");
    let rest = &body[head_end..];
    let end = rest
        .windows(delimiter.len())
        .position(|w| w == delimiter.as_bytes())
        .unwrap();
    (rest[..end].to_vec(), part_type)
}
