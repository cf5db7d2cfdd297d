//! The command line as an administrator uses it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common;

const BIN: &str = env!("CARGO_BIN_EXE_tsunagu");

fn config_file(dir: &std::path::Path) -> std::path::PathBuf {
    let mut c = tsunagu::config::Config::default();
    c.storage.url = format!("file://{}", dir.join("store").display());
    c.index.url = format!("sqlite://{}", dir.join("index.sqlite").display());
    c.institutions = common::three_hospitals();
    let p = dir.join("tsunagu.toml");
    std::fs::write(&p, toml::to_string(&c).unwrap()).unwrap();
    p
}

/// `tsunagu ARGS --config CFG`, with the audit chain key file given through
/// the environment if `chain_key`: (exit success, stdout then stderr).
fn tsunagu(
    cfg: &std::path::Path,
    chain_key: Option<&std::path::Path>,
    args: &[&dyn AsRef<std::ffi::OsStr>],
) -> (bool, String) {
    let mut c = Command::new(BIN);
    c.args(args).arg("--config").arg(cfg);
    if let Some(k) = chain_key {
        c.env("TSUNAGU_AUDIT__CHAIN_KEY_FILE", k);
    }
    let out = c.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn import_stores_reports_and_rejects() {
    let Some(data) = common::testdata_dir() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_file(tmp.path());
    // `import --quiet --institution INST PATH`.
    let run = |inst: &str, path: &std::path::Path| {
        tsunagu(
            &cfg,
            None,
            &[&"import", &"--quiet", &"--institution", &inst, &path],
        )
    };
    let files = data.join("files");
    let (ok, text) = run("HOSP2", &files);
    assert!(ok, "{text}");
    assert!(
        text.contains("stored 42 · already present 0 · replaced 0 · rejected 0"),
        "{text}"
    );
    let (ok, text) = run("HOSP2", &files);
    assert!(ok, "{text}");
    assert!(text.contains("stored 0 · already present 42"), "{text}");

    let junk = tmp.path().join("junk");
    std::fs::create_dir_all(&junk).unwrap();
    std::fs::write(junk.join("notes.txt"), b"not DICOM").unwrap();
    std::fs::copy(files.join("ct16_rle.dcm"), junk.join("ok.dcm")).unwrap();
    let (ok, text) = run("HOSP3", &junk);
    assert!(!ok, "a rejected file must give a non-zero exit: {text}");
    assert!(
        text.contains("stored 1 ·") && text.contains("rejected 1"),
        "{text}"
    );
    assert!(
        text.contains("notes.txt") && text.contains("not a DICOM Part-10 file"),
        "{text}"
    );

    let (ok, _) = run("NOWHERE", &junk);
    assert!(!ok, "unknown institution");

    // Every store was audited, on an intact chain; tampering is found.
    let verify = || tsunagu(&cfg, None, &[&"audit", &"verify"]);
    let (ok, text) = verify();
    assert!(ok && text.contains("intact: 85 events"), "{text}");
    let db = rusqlite::Connection::open(tmp.path().join("index.sqlite")).unwrap();
    let refused = db.execute(
        "UPDATE audit_event SET user_name = 'nobody' WHERE seq = 5",
        [],
    );
    assert!(refused.is_err(), "the trail is append-only in the database");
    assert!(
        db.execute("DELETE FROM audit_event WHERE seq = 85", [])
            .is_err()
    );
    // The recorded end moved back: found, and the trail goes on from its
    // last event (appends used to collide with the events after the end).
    db.execute(
        "UPDATE audit_head SET seq = 80, hash = (SELECT hash FROM audit_event WHERE seq = 80)",
        [],
    )
    .unwrap();
    let (ok, text) = verify();
    assert!(!ok && text.contains("moved back"), "{text}");
    let (ok, text) = run("HOSP2", &files);
    assert!(ok && text.contains("already present 42"), "{text}");
    let (ok, text) = verify();
    let events: u64 = text
        .split("intact: ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(ok && events >= 85 + 42, "{text}");
    // ... and the evidence is in the chain: the first append after the move
    // chained an alert holding both ends.
    let alert: String = db
        .query_row(
            "SELECT detail FROM audit_event WHERE action = 'trail-altered'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        alert.contains("\"recorded_end\":{\"seq\":80,")
            && alert.contains("\"last_event\":{\"seq\":85,"),
        "{alert}"
    );
    // Someone with the file itself (triggers dropped) changes one event.
    db.execute_batch(
        "DROP TRIGGER audit_event_no_update; \
         UPDATE audit_event SET user_name = 'nobody' WHERE seq = 5;",
    )
    .unwrap();
    let (ok, text) = verify();
    assert!(!ok && text.contains("BROKEN at event 5"), "{text}");
}

#[test]
fn config_check_masks_secrets_and_applies_env_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_file(tmp.path());
    let out = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&cfg)
        .env("TSUNAGU_SERVER__HTTP_PORT", "9191")
        .env("TSUNAGU_STORAGE__SECRET_ACCESS_KEY", "very-secret")
        // Not keys: the log format and the benchmarks' directory.
        .env("TSUNAGU_LOG_FORMAT", "json")
        .env("TSUNAGU_BENCH_DIR", "/nowhere")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("http_port = 9191"), "{text}");
    assert!(
        !text.contains("very-secret") && text.contains("********"),
        "{text}"
    );

    // Overrides refused, each naming its key: a PDU limit below 4 KiB, more
    // clock skew than 300 s (expired tokens would stay valid), a standing
    // break-glass grant, and a misspelt key (reported, not ignored).
    for (var, value, named) in [
        (
            "TSUNAGU_SERVER__MAX_PDU_LENGTH",
            "12",
            "server.max_pdu_length",
        ),
        ("TSUNAGU_AUTH__LEEWAY_SECS", "3600", "auth.leeway_secs"),
        (
            "TSUNAGU_ACCESS__BREAK_GLASS_HOURS",
            "720",
            "access.break_glass_hours",
        ),
        ("TSUNAGU_SERVER_HTTP_PORT", "9191", "SERVER_HTTP_PORT"),
    ] {
        let bad = Command::new(BIN)
            .args(["config", "check", "--config"])
            .arg(&cfg)
            .env(var, value)
            .output()
            .unwrap();
        assert!(!bad.status.success(), "{var}");
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(err.contains(named), "{var}: {err}");
    }
}

/// The example the README starts the server with, named by TSUNAGU_CONFIG
/// alone; TSUNAGU_TEST_* never read as keys; every secret masked; a value
/// of the wrong type refused by its key.
#[test]
fn the_example_loads_through_tsunagu_config() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/three-hospitals.toml");
    let check = |envs: &[(&str, &str)]| {
        let mut c = Command::new(BIN);
        c.args(["config", "check"]).env("TSUNAGU_CONFIG", example);
        for (k, v) in envs {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let out = check(&[
        ("TSUNAGU_TEST_ANYTHING", "not a key"),
        (
            "TSUNAGU_AUTH__HS256_SECRET",
            "a-long-enough-secret-for-hs256-0123456789",
        ),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for inst in ["HOSP1", "HOSP2", "HOSP3"] {
        assert!(
            text.contains(&format!("ae_titles = [\"{inst}\"]")),
            "{text}"
        );
        assert!(
            text.contains(&format!("issuer_of_patient_id = \"{inst}\"")),
            "{text}"
        );
    }
    assert!(
        !text.contains("a-long-enough-secret") && !text.contains("demo-secret"),
        "{text}"
    );
    assert!(text.contains("hs256_secret = \"********\""), "{text}");
    let bad = check(&[("TSUNAGU_SERVER__HTTP_PORT", "eighty")]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.to_lowercase().contains("http_port"), "{err}");
    // The institutions are replaced as a whole list, never entry by entry.
    let replaced = check(&[(
        "TSUNAGU_INSTITUTION",
        r#"[{code = "HOSP9", name = "Nine", issuer_of_patient_id = "HOSP9", ae_titles = ["HOSP9"]}]"#,
    )]);
    let text = String::from_utf8_lossy(&replaced.stdout);
    assert!(replaced.status.success(), "{text}");
    assert!(
        text.contains("code = \"HOSP9\"") && !text.contains("HOSP1"),
        "{text}"
    );
    let one = check(&[("TSUNAGU_INSTITUTION__0__NAME", "x")]);
    assert!(!one.status.success());
    let err = String::from_utf8_lossy(&one.stderr);
    assert!(err.contains("INSTITUTION"), "{err}");
}

#[test]
fn serve_runs_on_the_embedded_default_and_warns_without_institutions() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .arg("serve")
        .current_dir(tmp.path())
        .env("TSUNAGU_SERVER__DICOM_PORT", "0")
        .env("TSUNAGU_SERVER__HTTP_PORT", "0")
        .env_remove("TSUNAGU_CONFIG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut warned, mut serving) = (false, false);
    while !(warned && serving) && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            warned |= line.contains("every association will be rejected");
            serving |= line.contains("tsunagu serving");
        }
    }
    child.kill().unwrap();
    let _ = child.wait();
    assert!(warned && serving, "warned {warned} serving {serving}");
    assert!(tmp.path().join("tsunagu-data/index.sqlite").exists());
}

/// Each association's log lines carry its span: calling AE, institution
/// and peer (here as JSON lines, `TSUNAGU_LOG_FORMAT=json`).
#[test]
fn association_logs_name_the_caller_its_institution_and_peer() {
    let Some(echoscu) = common::dcmtk("echoscu") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_file(tmp.path());
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("TSUNAGU_SERVER__DICOM_PORT", "0")
            .env("TSUNAGU_SERVER__HTTP_PORT", "0")
            .env("TSUNAGU_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let next = |want: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(v) = rx.recv_timeout(Duration::from_millis(200))
                && v["fields"]["message"] == want
            {
                return Some(v);
            }
        }
        None
    };
    let serving = next("tsunagu serving").expect("serving");
    let port: u16 = serving["fields"]["dicom"]
        .as_str()
        .and_then(|a| a.rsplit(':').next()?.parse().ok())
        .expect("the DICOM address");
    let echo = Command::new(echoscu)
        .args(common::hub_peer("HOSP2", port))
        .output()
        .unwrap();
    assert!(echo.status.success(), "{echo:?}");
    let released = next("association released").expect("the association's release logged");
    drop(child);
    let span = &released["span"];
    assert_eq!(span["name"], "association", "{released}");
    assert_eq!(span["calling_ae"], "HOSP2", "{released}");
    assert_eq!(span["institution"], "HOSP2", "{released}");
    assert!(
        span["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{released}"
    );
}

/// A server process stopped when the test ends, also when it fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn token_is_minted_for_a_configured_institution() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_file(tmp.path());
    let token = |inst: &str, role: &str, secret: Option<&str>| {
        let mut c = Command::new(BIN);
        c.args([
            "token",
            "--institution",
            inst,
            "--user",
            "dr.sato",
            "--role",
            role,
            "--ttl",
            "30m",
            "--config",
        ])
        .arg(&cfg);
        if let Some(s) = secret {
            c.env("TSUNAGU_AUTH__HS256_SECRET", s);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, jwt, err) = token(
        "HOSP3",
        "clinician",
        Some("a-test-secret-of-32-characters!!"),
    );
    assert!(ok, "{err}");
    let payload = jwt.trim().split('.').nth(1).expect("three JWT parts");
    use base64::Engine as _;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["inst"], "HOSP3");
    assert_eq!(claims["role"], "clinician");
    assert_eq!(claims["sub"], "dr.sato");
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        1800
    );

    let (ok, _, err) = token("HOSP3", "clinician", None);
    assert!(!ok && err.contains("auth.hs256_secret"), "{err}");
    let (ok, _, err) = token("NOWHERE", "admin", Some("a-test-secret-of-32-characters!!"));
    assert!(!ok && err.contains("NOWHERE"), "{err}");
    let (ok, _, _) = token(
        "HOSP3",
        "superuser",
        Some("a-test-secret-of-32-characters!!"),
    );
    assert!(!ok, "unknown role");
}

/// `[audit] chain_key_file`: events chained with HMAC under the key; the
/// trail verifies only with it, and whoever can write the database but has
/// not the key cannot chain a changed event again so that it verifies.
#[test]
fn a_keyed_audit_chain_cannot_be_chained_again_without_its_key() {
    let Some(data) = common::testdata_dir() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_file(tmp.path());
    let secret = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let key = secret("chain.key", &format!("{}\n", "0123456789abcdef".repeat(4)));
    let other = secret("other.key", &"f".repeat(64));
    let short = secret("short.key", "too short");
    let batch = |name: &str, files: &[&str]| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in files {
            std::fs::copy(data.join("files").join(f), d.join(f)).unwrap();
        }
        d
    };
    let (first, second) = (
        batch("first", &["ct16_rle.dcm"]),
        batch("second", &["ct16_explicit_le.dcm", "ct16_implicit_le.dcm"]),
    );
    let import = |key, dir: &std::path::Path| {
        let (ok, text) = tsunagu(
            &cfg,
            key,
            &[&"import", &"--quiet", &"--institution", &"HOSP1", &dir],
        );
        assert!(ok, "{text}");
    };
    let verify = |key| tsunagu(&cfg, key, &[&"audit", &"verify"]);

    // A trail begun without a key, then keyed from the first event written
    // with it.
    import(None, &first);
    let (ok, text) = verify(None);
    assert!(ok && text.contains(", not keyed"), "{text}");
    import(Some(&key), &second);
    let (ok, text) = verify(Some(&key));
    assert!(ok && text.contains("keyed from event"), "{text}");
    let (ok, text) = verify(None);
    assert!(!ok && text.contains("needs the chain key"), "{text}");
    let (ok, text) = verify(Some(&other));
    assert!(!ok && text.contains("another key"), "{text}");
    // A node without the key, or with another, does not append to it.
    for (k, why) in [
        (None, "needs the chain's key"),
        (Some(other.as_path()), "does not check"),
    ] {
        let (ok, text) = tsunagu(&cfg, k, &[&"import", &"--institution", &"HOSP1", &second]);
        assert!(!ok && text.contains(why), "{text}");
    }
    let (ok, text) = tsunagu(&cfg, Some(&short), &[&"config", &"check"]);
    assert!(
        !ok && text.contains("audit.chain_key_file") && text.contains("at least 32"),
        "{text}"
    );

    // Someone with the database file (triggers dropped) changes an event
    // and chains it again the only way they can: without the key.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let config = tsunagu::config::Config::load(Some(cfg.as_path())).unwrap();
    let events = rt.block_on(async {
        let index = tsunagu::index::Index::connect(&config.index).await.unwrap();
        tsunagu::audit::trail::read_range(index.pool(), 1, 10_000)
            .await
            .unwrap()
    });
    let keyed_from = events
        .iter()
        .position(|s| s.hash.starts_with("hmac-sha256:"))
        .expect("keyed events");
    assert!(
        keyed_from > 0 && keyed_from < events.len() - 1,
        "the first import's events are not keyed, the second's are"
    );
    let db = rusqlite::Connection::open(tmp.path().join("index.sqlite")).unwrap();
    db.execute_batch("DROP TRIGGER audit_event_no_update")
        .unwrap();
    // A keyed event changed, its hash kept.
    let first_keyed = &events[keyed_from];
    let set_user = |user: &str| {
        db.execute(
            "UPDATE audit_event SET user_name = ?1 WHERE seq = ?2",
            rusqlite::params![user, first_keyed.seq],
        )
        .unwrap();
    };
    set_user("nobody");
    let (ok, text) = verify(Some(&key));
    assert!(
        !ok && text.contains(&format!("BROKEN at event {}", first_keyed.seq))
            && text.contains("does not match its keyed hash"),
        "{text}"
    );
    set_user(&first_keyed.event.user);
    assert!(verify(Some(&key)).0);
    // Rewrite events `from..` as changed by `user`, chained with SHA-256.
    let rechain = |from: usize| {
        let mut prev = events[from - 1].hash.clone();
        for s in &events[from..] {
            let mut e = s.event.clone();
            e.user = "nobody".into();
            let h = tsunagu::audit::chain::hash(&prev, s.seq, &e, None);
            db.execute(
                "UPDATE audit_event SET user_name = 'nobody', prev_hash = ?1, hash = ?2 WHERE seq = ?3",
                rusqlite::params![prev, h, s.seq],
            )
            .unwrap();
            prev = h;
        }
        db.execute(
            "UPDATE audit_head SET seq = ?1, hash = ?2",
            rusqlite::params![events.last().unwrap().seq, prev],
        )
        .unwrap();
    };
    // The last event only: an unkeyed event after keyed ones.
    rechain(events.len() - 1);
    let (ok, text) = verify(Some(&key));
    assert!(!ok && text.contains("not keyed, though"), "{text}");
    // Every keyed event: a chain that would verify without a key.
    rechain(keyed_from);
    let (ok, text) = verify(None);
    assert!(
        ok,
        "rewritten without the key, it verifies without it: {text}"
    );
    let (ok, text) = verify(Some(&key));
    assert!(!ok && text.contains("no event is keyed"), "{text}");
}
