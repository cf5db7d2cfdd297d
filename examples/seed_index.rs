//! Seed an index with synthetic studies for scale benchmarks: each instance
//! is a real (small) data set, encoded with dicom-object and put through the
//! same parser and summary as ingest, then upserted by the index writer —
//! only the object store is skipped (QIDO and metadata never read it).
//! Writes a `manifest.json` that `../shared/bench/scale_qido.py` reads.
//!
//!   cargo run --release --example seed_index -- CONFIG.toml OUT_DIR STUDIES [INSTITUTIONS [PATIENTS]]
//!
//! INSTITUTIONS is one code or a comma-separated list (patients are dealt
//! out among them in turn, each under its institution's code as issuer);
//! PATIENTS defaults to 3/5 of STUDIES.
//!
//! One series of 5 instances per study (as scale_qido's 100,000-instance
//! corpus), plus one study of 1,000 instances (`big_study_uid` in the manifest)
//! for study metadata at scale.

use std::io::Cursor;
use std::sync::Arc;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use serde_json::json;
use tsunagu::config::Config;
use tsunagu::dicom::dataset;
use tsunagu::dicom::summary::InstanceSummary;
use tsunagu::index::{Index, IndexEntry};

#[path = "common/rng.rs"]
mod rng;
use rng::Rng;

const SURNAMES: &[(&str, &str, &str)] = &[
    ("Yamada", "山田", "やまだ"),
    ("Yamamoto", "山本", "やまもと"),
    ("Tanaka", "田中", "たなか"),
    ("Suzuki", "鈴木", "すずき"),
    ("Takahashi", "高橋", "たかはし"),
    ("Watanabe", "渡辺", "わたなべ"),
    ("Ito", "伊藤", "いとう"),
    ("Nakamura", "中村", "なかむら"),
    ("Kobayashi", "小林", "こばやし"),
    ("Kato", "加藤", "かとう"),
    ("Yoshida", "吉田", "よしだ"),
    ("Sasaki", "佐々木", "ささき"),
    ("Matsumoto", "松本", "まつもと"),
    ("Inoue", "井上", "いのうえ"),
    ("Kimura", "木村", "きむら"),
    ("Hayashi", "林", "はやし"),
    ("Shimizu", "清水", "しみず"),
    ("Yamazaki", "山崎", "やまざき"),
    ("Mori", "森", "もり"),
    ("Ikeda", "池田", "いけだ"),
];
const GIVEN: &[(&str, &str, &str)] = &[
    ("Taro", "太郎", "たろう"),
    ("Hanako", "花子", "はなこ"),
    ("Ichiro", "一郎", "いちろう"),
    ("Yuki", "由紀", "ゆき"),
    ("Kenji", "健二", "けんじ"),
    ("Akiko", "明子", "あきこ"),
];
const MODALITIES: &[(&str, &str, &str)] = &[
    ("CT", "1.2.840.10008.5.1.4.1.1.2", "胸部CT"),
    ("CT", "1.2.840.10008.5.1.4.1.1.2", "腹部CT"),
    ("MR", "1.2.840.10008.5.1.4.1.1.4", "頭部MRI"),
    ("MR", "1.2.840.10008.5.1.4.1.1.4", "腰椎MRI"),
    ("CR", "1.2.840.10008.5.1.4.1.1.1", "胸部単純X線"),
    ("DX", "1.2.840.10008.5.1.4.1.1.1.1", "手部X線"),
    ("US", "1.2.840.10008.5.1.4.1.1.6.1", "腹部超音波"),
    ("ES", "1.2.840.10008.5.1.4.1.1.77.1.1", "上部消化管内視鏡"),
    ("MG", "1.2.840.10008.5.1.4.1.1.1.2", "マンモグラフィ"),
    ("CT", "1.2.840.10008.5.1.4.1.1.2", "頭部CT"),
];

struct Study {
    institution: String,
    patient_id: String,
    name: String,
    birth: String,
    sex: &'static str,
    study_uid: String,
    date: String,
    accession: String,
    modality: (&'static str, &'static str, &'static str),
    series_uid: String,
    instances: usize,
}

fn date_of(day: u64) -> String {
    // Days since 2019-01-01, within 2019..2025.
    let d = chrono::NaiveDate::from_ymd_opt(2019, 1, 1).expect("valid")
        + chrono::Duration::days(day as i64);
    d.format("%Y%m%d").to_string()
}

fn element(tag: dicom_core::Tag, vr: VR, v: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(v))
}

/// One instance as a Part-10 byte buffer.
fn instance_bytes(s: &Study, n: usize, sop_uid: &str) -> Vec<u8> {
    let mut o = InMemDicomObject::new_empty();
    let (modality, class, description) = s.modality;
    for (tag, vr, v) in [
        (tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"),
        (tags::SOP_CLASS_UID, VR::UI, class),
        (tags::SOP_INSTANCE_UID, VR::UI, sop_uid),
        (tags::STUDY_DATE, VR::DA, &s.date),
        (tags::STUDY_TIME, VR::TM, "101500"),
        (tags::ACCESSION_NUMBER, VR::SH, &s.accession),
        (tags::MODALITY, VR::CS, modality),
        (
            tags::REFERRING_PHYSICIAN_NAME,
            VR::PN,
            "Suzuki^Kenji=鈴木^健二=すずき^けんじ",
        ),
        (tags::STUDY_DESCRIPTION, VR::LO, description),
        (tags::SERIES_DESCRIPTION, VR::LO, "seed"),
        (tags::PATIENT_NAME, VR::PN, &s.name),
        (tags::PATIENT_ID, VR::LO, &s.patient_id),
        (tags::ISSUER_OF_PATIENT_ID, VR::LO, &s.institution),
        (tags::PATIENT_BIRTH_DATE, VR::DA, &s.birth),
        (tags::PATIENT_SEX, VR::CS, s.sex),
        (tags::STUDY_INSTANCE_UID, VR::UI, &s.study_uid),
        (tags::SERIES_INSTANCE_UID, VR::UI, &s.series_uid),
        (tags::STUDY_ID, VR::SH, "1"),
        (tags::SERIES_NUMBER, VR::IS, "1"),
        (tags::INSTANCE_NUMBER, VR::IS, &(n + 1).to_string()),
    ] {
        o.put(element(tag, vr, v));
    }
    for (tag, v) in [
        (tags::ROWS, 16u16),
        (tags::COLUMNS, 16),
        (tags::BITS_ALLOCATED, 16),
        (tags::BITS_STORED, 12),
        (tags::HIGH_BIT, 11),
        (tags::PIXEL_REPRESENTATION, 0),
        (tags::SAMPLES_PER_PIXEL, 1),
    ] {
        o.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
    }
    o.put(element(
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        "MONOCHROME2",
    ));
    o.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::from(vec![0u8; 512]),
    ));
    let file = o
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
                .media_storage_sop_class_uid(class),
        )
        .expect("meta");
    let mut out = Vec::new();
    file.write_all(&mut out).expect("encode");
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: seed_index CONFIG.toml OUT_DIR STUDIES [INSTITUTIONS [PATIENTS]]");
        std::process::exit(2);
    }
    let config = Config::load(Some(std::path::Path::new(&args[1]))).expect("config");
    let out_dir = std::path::PathBuf::from(&args[2]);
    let n_studies: usize = args[3].parse().expect("number of studies");
    let institutions: Vec<String> = args
        .get(4)
        .map(|s| s.split(',').map(str::to_string).collect())
        .unwrap_or_else(|| vec!["BENCH".into()]);
    std::fs::create_dir_all(&out_dir).expect("out dir");
    let index = Index::connect(&config.index).await.expect("index");

    let mut rng = Rng(20241125);
    let n_patients = args
        .get(5)
        .map(|p| p.parse().expect("number of patients"))
        .unwrap_or(n_studies * 3 / 5)
        .max(1);
    let patients: Vec<(String, String, String, &str)> = (0..n_patients)
        .map(|i| {
            let (sr, sk, sh) = SURNAMES[rng.below(SURNAMES.len() as u64) as usize];
            let (gr, gk, gh) = GIVEN[rng.below(GIVEN.len() as u64) as usize];
            let upper = rng.below(2) == 0;
            let roman = if upper {
                format!("{}^{}", sr.to_uppercase(), gr.to_uppercase())
            } else {
                format!("{sr}^{gr}")
            };
            (
                format!("{:07}", 1_000_000 + i),
                format!("{roman}={sk}^{gk}={sh}^{gh}"),
                date_of(rng.below(365 * 6) + 365 * 2 - 365 * 80),
                if rng.below(2) == 0 { "M" } else { "F" },
            )
        })
        .collect();
    let uid = |kind: &str, i: usize| format!("2.25.9{}{:012}", kind, i);
    let mut studies = Vec::with_capacity(n_studies + 1);
    for i in 0..=n_studies {
        let patient_index = if i < n_patients {
            i
        } else {
            rng.below(n_patients as u64) as usize
        };
        let p = &patients[patient_index];
        studies.push(Study {
            institution: institutions[patient_index % institutions.len()].clone(),
            patient_id: p.0.clone(),
            name: p.1.clone(),
            birth: p.2.clone(),
            sex: p.3,
            study_uid: uid("1", i),
            date: date_of(rng.below(365 * 7)),
            accession: format!("SD{:08}", i),
            modality: MODALITIES[rng.below(MODALITIES.len() as u64) as usize],
            series_uid: uid("2", i),
            // The last study is the big one.
            instances: if i == n_studies { 1000 } else { 5 },
        });
    }
    let total: usize = studies.iter().map(|s| s.instances).sum();
    eprintln!("seeding {} studies, {total} instances", studies.len());

    let started = std::time::Instant::now();
    let studies = Arc::new(studies);
    let index = Arc::new(index);
    let mut tasks = tokio::task::JoinSet::new();
    let mut done = 0usize;
    let mut sop = 0usize;
    for si in 0..studies.len() {
        for n in 0..studies[si].instances {
            sop += 1;
            let (studies, index) = (studies.clone(), index.clone());
            let sop_uid = uid("3", sop);
            tasks.spawn(async move {
                let entry = tokio::task::spawn_blocking({
                    let studies = studies.clone();
                    move || {
                        let s = &studies[si];
                        let bytes = instance_bytes(s, n, &sop_uid);
                        let (meta, offset) =
                            tsunagu::dicom::part10::read_meta(&bytes[..]).expect("meta");
                        let mut cursor = Cursor::new(&bytes[..]);
                        cursor.set_position(offset);
                        let parsed =
                            dataset::parse_stream(cursor, meta, offset, Some(bytes.len() as u64))
                                .expect("parse");
                        let summary = InstanceSummary::from_parsed(&parsed).expect("summary");
                        IndexEntry {
                            institution: s.institution.clone(),
                            issuer: s.institution.clone(),
                            summary,
                            transfer_syntax: "1.2.840.10008.1.2.1".into(),
                            object_key: format!("seed/{sop_uid}.dcm"),
                            size: bytes.len() as u64,
                            sha256: format!("{:064x}", sop),
                            sender_ae: None,
                            received_at: "2026-11-25T00:00:00.000Z".into(),
                            dataset_json: serde_json::Value::Object(parsed.json).to_string(),
                            pixels: parsed.pixels,
                            replaces: None,
                            unconfirmed: false,
                        }
                    }
                })
                .await
                .expect("build entry");
                index.upsert(&entry).await.expect("upsert");
            });
            while tasks.len() >= 512 {
                tasks.join_next().await.expect("task").expect("task ok");
                done += 1;
                if done.is_multiple_of(50_000) {
                    eprintln!(
                        "{done} instances, {:.0}/s",
                        done as f64 / started.elapsed().as_secs_f64()
                    );
                }
            }
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("task ok");
    }
    eprintln!(
        "seeded {total} instances in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let manifest = json!({
        "description": "synthetic index seed (examples/seed_index.rs)",
        "big_study_uid": studies.last().map(|s| s.study_uid.clone()),
        "studies": studies.iter().map(|s| json!({
            "set": "query",
            "patient_id": s.patient_id,
            "study_uid": s.study_uid,
            "study_date": s.date,
            "series": [{"instances": vec![json!({}); s.instances]}],
        })).collect::<Vec<_>>(),
    });
    std::fs::write(out_dir.join("manifest.json"), manifest.to_string()).expect("manifest");
}
