//! Shared fixtures: in-process hubs on 127.0.0.1:0 over each backend, the
//! shared test corpus, real peer tools, and skips that speak up.

#![allow(dead_code)]

pub mod wiretap;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use serde::Deserialize;
use tsunagu::auth::Role;
use tsunagu::config::{Config, InstitutionConfig};
use tsunagu::hub::{Hub, Running};

/// Under `TSUNAGU_TEST_REQUIRE_SERVICES=1` (set by `scripts/test`) a missing
/// tool or service fails the test instead of skipping it.
pub fn require_services() -> bool {
    std::env::var("TSUNAGU_TEST_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Skip out loud, or fail when services are required.
pub fn skip(what: &str) {
    if require_services() {
        panic!("required but missing: {what}");
    }
    eprintln!("SKIP: {what}");
}

/// A DCMTK tool by absolute path (pynetdicom installs look-alikes on PATH).
pub fn dcmtk(tool: &str) -> Option<PathBuf> {
    let p = PathBuf::from("/usr/bin").join(tool);
    if p.exists() {
        Some(p)
    } else {
        skip(&format!("{} missing (apt-get install dcmtk)", p.display()));
        None
    }
}

/// dicom3tools' `dciodvfy` on a Part-10 file: its Error lines (empty: the
/// object conforms to its IOD), or `None` when the tool is missing.
pub fn dciodvfy_errors(file: &Path) -> Option<Vec<String>> {
    let bin = ["/usr/bin/dciodvfy", "/usr/local/bin/dciodvfy"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    let Some(bin) = bin else {
        skip("dciodvfy missing (apt-get install dicom3tools)");
        return None;
    };
    let out = Command::new(bin).arg(file).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        text.lines()
            .filter(|l| l.starts_with("Error"))
            .map(str::to_string)
            .collect(),
    )
}

/// QIDO-RS as a clinician of `inst` (`query` below the service root):
/// status, results (none for an empty body) and Warning headers.
pub async fn qido_as(
    hub: &TestHub,
    inst: &str,
    query: &str,
) -> (reqwest::StatusCode, Vec<serde_json::Value>, Vec<String>) {
    let r = reqwest::Client::new()
        .get(format!("{}/{query}", hub.dicomweb()))
        .bearer_auth(hub.token(inst, Role::Clinician))
        .header(reqwest::header::ACCEPT, "application/dicom+json")
        .send()
        .await
        .unwrap();
    let status = r.status();
    let warnings = r
        .headers()
        .get_all("warning")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    let body = r.bytes().await.unwrap();
    let items = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    (status, items, warnings)
}

/// A Python interpreter that can import `module`.
pub fn python_with(module: &str) -> Option<String> {
    let py = std::env::var("TSUNAGU_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Some(py)
    } else {
        skip(&format!(
            "python module {module} missing (pip install {module})"
        ));
        None
    }
}

/// The shared, validated corpus (`../shared/testdata`).
pub fn testdata_dir() -> Option<PathBuf> {
    let dir = std::env::var("TSUNAGU_TEST_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/testdata"));
    if dir.join("manifest.json").exists() {
        Some(dir)
    } else {
        skip(&format!("test corpus missing at {}", dir.display()));
        None
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ManifestFile {
    pub file: String,
    pub sop_class_uid: String,
    pub transfer_syntax_uid: String,
    pub sha256: String,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    files: Vec<ManifestFile>,
}

/// The corpus files with their manifest facts (paths made absolute).
pub fn corpus() -> Option<Vec<(PathBuf, ManifestFile)>> {
    let dir = testdata_dir()?;
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    Some(
        m.files
            .into_iter()
            .map(|f| {
                let p = dir
                    .join("files")
                    .join(Path::new(&f.file).file_name().unwrap());
                (p, f)
            })
            .collect(),
    )
}

/// The data set bytes of a Part-10 file (everything after its meta group).
pub fn dataset_bytes(bytes: &[u8]) -> &[u8] {
    let (_, offset) = tsunagu::dicom::part10::read_meta(bytes).expect("a Part-10 file");
    &bytes[offset as usize..]
}

/// SOP Instance UID of a Part-10 file.
pub fn sop_instance_uid(path: &Path) -> String {
    let f = std::fs::File::open(path).unwrap();
    tsunagu::dicom::part10::read_meta(f)
        .unwrap()
        .0
        .sop_instance_uid
}

/// The text of element `tag` of a Part-10 file (a UID, say), padding dropped.
pub fn text_of(path: &Path, tag: dicom_core::Tag) -> String {
    dicom_object::open_file(path)
        .unwrap()
        .element(tag)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches(['\0', ' '])
        .to_string()
}

/// Which store and index a test hub runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Local directory + SQLite: the embedded default.
    Local,
    /// A real S3-compatible server (`TSUNAGU_TEST_S3_*`) + SQLite.
    S3,
    /// Local directory + a fresh database on `TSUNAGU_TEST_POSTGRES_URL`.
    Postgres,
}

/// The S3 settings of the test environment, if any.
pub fn s3_env() -> Option<(String, String, String, String)> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    Some((
        get("TSUNAGU_TEST_S3_ENDPOINT")?,
        get("TSUNAGU_TEST_S3_BUCKET")?,
        get("TSUNAGU_TEST_S3_ACCESS_KEY").unwrap_or_else(|| "test".into()),
        get("TSUNAGU_TEST_S3_SECRET_KEY").unwrap_or_else(|| "testtest".into()),
    ))
}

/// A fresh PostgreSQL database URL, created on the test server.
pub async fn fresh_postgres_db() -> Option<String> {
    let Ok(base) = std::env::var("TSUNAGU_TEST_POSTGRES_URL") else {
        skip("PostgreSQL: TSUNAGU_TEST_POSTGRES_URL not set (scripts/test starts one)");
        return None;
    };
    sqlx::any::install_default_drivers();
    let name = format!("tsunagu_{}", uuid::Uuid::new_v4().simple());
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&base)
        .await
        .expect("connect to TSUNAGU_TEST_POSTGRES_URL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let (prefix, _) = base.rsplit_once('/').expect("URL with a database name");
    Some(format!("{prefix}/{name}"))
}

pub fn three_hospitals() -> Vec<InstitutionConfig> {
    (1..=3)
        .map(|i| InstitutionConfig {
            code: format!("HOSP{i}"),
            name: format!("Hospital {i}"),
            issuer_of_patient_id: format!("HOSP{i}"),
            ae_titles: vec![format!("HOSP{i}"), format!("HOSP{i}_B")],
            coerce_patient_ids: true,
            tls_certificate_sha256: Vec::new(),
            networks: Vec::new(),
        })
        .collect()
}

/// A test configuration in `dir` on `backend` (ports 0), or `None` if the
/// backend is not available here (after a skip message).
pub async fn config_for(backend: Backend, dir: &Path) -> Option<Config> {
    let mut c = Config::default();
    c.server.dicom_port = 0;
    c.server.http_port = 0;
    c.server.association_timeout_secs = 20;
    c.storage.url = format!("file://{}", dir.join("store").display());
    c.index.url = format!("sqlite://{}", dir.join("index.sqlite").display());
    c.institutions = three_hospitals();
    c.auth.hs256_secret = Some(TEST_SECRET.into());
    c.dicomweb.cors_origins = vec![TEST_ORIGIN.into()];
    match backend {
        Backend::Local => {}
        Backend::S3 => {
            let Some((endpoint, bucket, key, secret)) = s3_env() else {
                skip("S3: TSUNAGU_TEST_S3_ENDPOINT/BUCKET not set (scripts/test starts SeaweedFS)");
                return None;
            };
            c.storage.url = format!("s3://{bucket}/run-{}", uuid::Uuid::new_v4().simple());
            c.storage.endpoint = Some(endpoint);
            c.storage.access_key_id = Some(key);
            c.storage.secret_access_key = Some(secret);
            c.storage.allow_http = true;
            c.storage.spool_dir = Some(dir.join("spool"));
        }
        Backend::Postgres => {
            c.index.url = fresh_postgres_db().await?;
        }
    }
    Some(c)
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A signed token with arbitrary claims and secret.
pub fn forged(claims: &tsunagu::auth::Claims, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn claims(inst: &str, role: Role) -> tsunagu::auth::Claims {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    tsunagu::auth::Claims {
        sub: "someone".into(),
        inst: inst.into(),
        role,
        iss: "tsunagu".into(),
        aud: "tsunagu".into(),
        exp: now + 600,
        iat: now,
    }
}

/// The HS256 secret of test hubs.
pub const TEST_SECRET: &str = "test-secret-0123456789abcdef";
/// The one browser origin test hubs allow.
pub const TEST_ORIGIN: &str = "http://viewer.example:3000";

/// An in-process hub serving on loopback.
pub struct TestHub {
    pub hub: Arc<Hub>,
    pub running: Running,
    pub dir: tempfile::TempDir,
}

impl TestHub {
    pub async fn start(backend: Backend) -> Option<Self> {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_for(backend, dir.path()).await?;
        tweak(&mut config);
        let hub = Hub::open(config).await.expect("hub opens");
        let running = hub.start().await.expect("hub starts");
        Some(Self { hub, running, dir })
    }

    pub fn port(&self) -> u16 {
        self.running.dicom_addr.port()
    }

    pub fn http(&self) -> String {
        format!("http://{}", self.running.http_addr)
    }

    /// The DICOMweb service root.
    pub fn dicomweb(&self) -> String {
        format!("http://{}/dicom-web", self.running.http_addr)
    }

    /// A valid token for `user` of `institution` with `role`.
    pub fn token(&self, institution: &str, role: Role) -> String {
        tsunagu::auth::mint(
            &self.hub.config.auth,
            institution,
            &format!("user-of-{institution}"),
            role,
            std::time::Duration::from_secs(600),
            std::time::SystemTime::now(),
        )
        .unwrap()
    }

    /// Write a corpus with `../shared/bench/make_corpus.py ARGS` into this
    /// hub's directory and import it for `institution`; its directory.
    pub async fn import_bench_corpus(&self, py: &str, institution: &str, args: &[&str]) -> PathBuf {
        let bench = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/bench");
        let corpus = self.dir.path().join("corpus");
        let made = Command::new(py)
            .arg(bench.join("make_corpus.py"))
            .arg(&corpus)
            .args(args)
            .output()
            .unwrap();
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        let files = tsunagu::ingest::import::collect_files(std::slice::from_ref(&corpus))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
            .collect();
        self.import(institution, files).await;
        corpus
    }

    /// Import `files` for `institution` through the ingest path.
    pub async fn import(&self, institution: &str, files: Vec<PathBuf>) {
        let inst = self.hub.institutions.by_code(institution).unwrap();
        let report =
            tsunagu::ingest::import::import_files(self.hub.ingest.clone(), inst, files, false)
                .await;
        assert!(
            report.rejected.is_empty(),
            "import failed: {:?}",
            report.rejected
        );
    }

    /// The stored bytes of (institution, SOP Instance UID), if indexed.
    pub async fn stored(&self, institution: &str, sop: &str) -> Option<(String, Vec<u8>)> {
        let copy = self
            .hub
            .index
            .stored_copy(institution, sop)
            .await
            .unwrap()?;
        let bytes = self.hub.store.get_bytes(&copy.object_key).await.unwrap();
        Some((copy.object_key, bytes.to_vec()))
    }

    /// `echoscu` against this hub; true on success.
    pub fn echo(&self, calling: &str) -> bool {
        let Some(echoscu) = dcmtk("echoscu") else {
            return true;
        };
        Command::new(echoscu)
            .args(hub_peer(calling, self.port()))
            .output()
            .unwrap()
            .status
            .success()
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.running.shutdown.cancel();
    }
}

/// DCMTK storescu flag that proposes exactly this transfer syntax (with the
/// uncompressed ones as fallbacks), or `None` when DCMTK 3.6.7 cannot.
pub fn storescu_flag(ts: &str) -> Option<&'static str> {
    Some(match ts {
        "1.2.840.10008.1.2" => "-xi",
        "1.2.840.10008.1.2.1" => "-xe",
        "1.2.840.10008.1.2.2" => "-xb",
        "1.2.840.10008.1.2.1.99" => "-xd",
        "1.2.840.10008.1.2.4.50" => "-xy",
        "1.2.840.10008.1.2.4.51" => "-xx",
        "1.2.840.10008.1.2.4.70" => "-xs",
        "1.2.840.10008.1.2.4.80" => "-xt",
        "1.2.840.10008.1.2.4.81" => "-xu",
        "1.2.840.10008.1.2.4.90" => "-xv",
        "1.2.840.10008.1.2.4.91" => "-xw",
        "1.2.840.10008.1.2.5" => "-xr",
        _ => return None,
    })
}

/// The arguments that make a DCMTK tool call the hub on `port` as `calling`.
pub fn hub_peer(calling: &str, port: u16) -> [String; 6] {
    [
        "-aet".into(),
        calling.into(),
        "-aec".into(),
        "TSUNAGU".into(),
        "127.0.0.1".into(),
        port.to_string(),
    ]
}

/// DCMTK storescu sending `files` as `calling` to the hub on `port`, one
/// association, with `options` (a transfer syntax flag, `-v`); `None` (a
/// skip) where DCMTK is missing.
pub fn storescu_command(
    port: u16,
    calling: &str,
    options: &[&str],
    files: &[PathBuf],
) -> Option<Command> {
    let mut c = Command::new(dcmtk("storescu")?);
    c.env("TCP_NODELAY", "1")
        .arg("-R")
        .args(options)
        .args(hub_peer(calling, port))
        .args(files);
    Some(c)
}

/// Run DCMTK storescu with `flag` on `files`; returns (success, stderr+stdout).
pub fn storescu(port: u16, calling: &str, flag: &str, files: &[PathBuf]) -> (bool, String) {
    let Some(mut c) = storescu_command(port, calling, &["-v", flag], files) else {
        return (false, String::new());
    };
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// One result line of `tests/tools/push.py`.
#[derive(Debug, Deserialize)]
pub struct PushResult {
    pub file: Option<String>,
    pub status: Option<u16>,
    pub accepted: Option<bool>,
}

/// Push with pynetdicom, each file in its own transfer syntax, bytes as in the file.
pub fn pynetdicom_push(
    python: &str,
    port: u16,
    calling: &str,
    files: &[PathBuf],
) -> Vec<PushResult> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/push.py");
    let out = Command::new(python)
        .arg(script)
        .args(["127.0.0.1", &port.to_string(), calling, "TSUNAGU"])
        .args(files)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad push.py line {l}: {e}")))
        .collect()
}

/// Spool files below `dir` (each process's folder, recursively), without
/// the folders' lock files.
pub fn spool_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(spool_files(&p));
        } else if !matches!(e.file_name().to_str(), Some(".lock" | ".claim")) {
            out.push(p);
        }
    }
    out
}

/// Run `cmd` to success (else fail with its standard error); its standard
/// output.
pub fn run_ok(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// GET `url` as a clinician of `inst`, accepting `accept`.
pub async fn get_as_clinician(
    hub: &TestHub,
    inst: &str,
    url: &str,
    accept: &str,
) -> reqwest::Response {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(hub.token(inst, Role::Clinician))
        .header(reqwest::header::ACCEPT, accept)
        .send()
        .await
        .unwrap()
}

/// The value of one series (`name` or `name{labels}`) in Prometheus text;
/// 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// One test per backend, each running `scenario(backend)`:
/// `on_backends!(scenario: scenario_on_sqlite => Backend::Local, …);`
#[macro_export]
macro_rules! on_backends {
    ($scenario:ident: $($test:ident => $backend:expr),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                $scenario($backend).await;
            }
        )+
    };
}
