//! TLS: DICOM with DCMTK's echoscu and storescu (+tls) — mutual TLS with a
//! network CA, an institution bound to its certificate (TLS only, and only
//! with that certificate), certificates of another CA or none refused, the
//! plain port beside it — and HTTPS with curl and dicomweb-client.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::common::{self, Backend, TestHub};

/// `openssl` with `args` in `dir`; false (after a skip) when it is missing.
fn openssl(dir: &Path, args: &[&str]) -> bool {
    match Command::new("openssl").current_dir(dir).args(args).output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => panic!("openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr)),
        Err(_) => {
            common::skip("openssl missing");
            false
        }
    }
}

/// A CA `name` (key and self-signed certificate).
fn ca(dir: &Path, name: &str) -> bool {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
    )
}

/// A key and certificate `name`, issued by CA `by`.
fn issue(dir: &Path, name: &str, by: &str, server: bool) -> bool {
    let ext = dir.join(format!("{name}.ext"));
    let usage = if server { "serverAuth" } else { "clientAuth" };
    std::fs::write(
        &ext,
        format!(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
             extendedKeyUsage={usage}\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
        ),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    ) && openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{by}.pem"),
            "-CAkey",
            &format!("{by}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ],
    )
}

/// SHA-256 of a PEM certificate's DER bytes, as `openssl x509 -fingerprint`
/// prints it (upper case, colons), checked against our own digest.
fn fingerprint(pem: &Path) -> String {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(pem).unwrap();
    let ours = hex::encode(Sha256::digest(der.as_ref()));
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(pem)
        .output()
        .unwrap();
    let printed = String::from_utf8(out.stdout).unwrap();
    let printed = printed.trim().rsplit('=').next().unwrap().to_string();
    assert_eq!(printed.replace(':', "").to_ascii_lowercase(), ours);
    printed
}

/// echoscu (or storescu with `files`) as `calling`; TLS with `cert` when given.
fn dcmtk_as(
    tool: &Path,
    port: u16,
    calling: &str,
    tls: Option<(&Path, &str)>,
    files: &[PathBuf],
) -> bool {
    let mut cmd = Command::new(tool);
    if let Some((dir, cert)) = tls {
        cmd.current_dir(dir).args([
            "+tls",
            &format!("{cert}.key"),
            &format!("{cert}.pem"),
            "+cf",
            "network-ca.pem",
        ]);
    }
    cmd.args(common::hub_peer(calling, port))
        .args(files)
        .output()
        .unwrap()
        .status
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dicom_tls_binds_senders_to_their_certificates() {
    let (Some(echoscu), Some(storescu)) = (common::dcmtk("echoscu"), common::dcmtk("storescu"))
    else {
        return;
    };
    let Some(corpus) = common::testdata_dir() else {
        return;
    };
    let pki = tempfile::tempdir().unwrap();
    let p = pki.path();
    if !(ca(p, "network-ca")
        && ca(p, "rogue-ca")
        && issue(p, "server", "network-ca", true)
        && issue(p, "hosp1", "network-ca", false)
        && issue(p, "hosp2", "network-ca", false)
        && issue(p, "hosp3", "network-ca", false)
        && issue(p, "mallory", "rogue-ca", false))
    {
        return;
    }
    let hosp1 = fingerprint(&p.join("hosp1.pem"));
    let hosp3 = fingerprint(&p.join("hosp3.pem"));
    let Some(hub) = TestHub::start_with(Backend::Local, |c| {
        c.server.tls = Some(tsunagu::config::DicomTlsConfig {
            port: 0,
            certificate_file: p.join("server.pem"),
            private_key_file: p.join("server.key"),
            client_ca_file: Some(p.join("network-ca.pem")),
        });
        c.institutions[0].tls_certificate_sha256 = vec![hosp1.clone()];
        c.institutions[2].tls_certificate_sha256 = vec![hosp3.clone()];
    })
    .await
    else {
        return;
    };
    let tls_port = hub.running.dicom_tls_addr.expect("TLS listener").port();
    let plain = hub.port();
    let echo = |port, calling, cert| dcmtk_as(&echoscu, port, calling, cert, &[]);

    // Hospital 1 over TLS with its own certificate: echo and store.
    assert!(echo(tls_port, "HOSP1", Some((p, "hosp1"))));
    let ct = corpus.join("files/ct16_explicit_le.dcm");
    assert!(dcmtk_as(
        &storescu,
        tls_port,
        "HOSP1",
        Some((p, "hosp1")),
        std::slice::from_ref(&ct)
    ));
    let sop = common::sop_instance_uid(&ct);
    let (_, stored) = hub.stored("HOSP1", &sop).await.expect("stored over TLS");
    assert_eq!(
        common::dataset_bytes(&stored),
        common::dataset_bytes(&std::fs::read(&ct).unwrap()),
        "byte-exact over TLS too"
    );

    // Its AE title is not enough: not on the plain port, not with another
    // hospital's certificate.
    assert!(!echo(plain, "HOSP1", None));
    assert!(!echo(tls_port, "HOSP1", Some((p, "hosp2"))));
    // Hospital 2 named no certificate: TLS with any of the network's that no
    // one named, or plain; never with a certificate another hospital named.
    assert!(echo(tls_port, "HOSP2", Some((p, "hosp2"))));
    assert!(echo(plain, "HOSP2", None));
    assert!(!echo(tls_port, "HOSP2", Some((p, "hosp1"))));
    assert!(echo(tls_port, "HOSP3", Some((p, "hosp3"))));
    // A certificate of another CA, or none, ends in the handshake.
    assert!(!echo(tls_port, "HOSP2", Some((p, "mallory"))));
    for calling in ["HOSP1", "HOSP2"] {
        let anonymous = Command::new(&echoscu)
            .current_dir(p)
            .args(["+tla", "+cf", "network-ca.pem"])
            .args(common::hub_peer(calling, tls_port))
            .output()
            .unwrap();
        assert!(
            !anonymous.status.success(),
            "{calling} without a certificate"
        );
    }
    // Plain DICOM on the TLS port is not an association either.
    assert!(!echo(tls_port, "HOSP2", None));
    // Each refusal is an authentication failure in the trail, with its reason.
    hub.hub.audit.flush().await;
    let mut reasons: Vec<String> = Vec::new();
    // Refusals of an institution's AE titles are its admins' to see; the failed
    // handshake named no one.
    for institution in ["HOSP1", "HOSP2", ""] {
        let trail = tsunagu::audit::trail::query(
            hub.hub.index.pool(),
            &tsunagu::audit::trail::Filter {
                institution: institution.into(),
                limit: 10_000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        reasons.extend(
            trail
                .iter()
                .filter(|e| e.sequenced.event.action == tsunagu::audit::Action::AuthenticateNode)
                .map(|e| {
                    e.sequenced.event.detail["reason"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                }),
        );
    }
    for want in [
        "this sender must use DICOM TLS",
        "client certificate is not one of the calling institution's",
        "client certificate is another institution's",
        "TLS: client certificate not accepted",
        "TLS: no client certificate",
    ] {
        assert!(
            reasons.iter().any(|r| r.starts_with(want)),
            "{want}: {reasons:?}"
        );
    }
    // And the server goes on serving.
    assert!(echo(tls_port, "HOSP1", Some((p, "hosp1"))));
    assert!(hub.echo("HOSP2"));
}

/// A key that does not fit the certificate, a missing file, a port taken,
/// a malformed or shared fingerprint: each stops the start naming its key.
/// Without `client_ca_file`, TLS is encryption only: no client certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_configuration_is_checked_and_client_certificates_are_optional() {
    let pki = tempfile::tempdir().unwrap();
    let p = pki.path();
    if !(ca(p, "network-ca")
        && issue(p, "server", "network-ca", true)
        && issue(p, "other", "network-ca", true))
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(mut config) = common::config_for(Backend::Local, dir.path()).await else {
        return;
    };
    let tls = |key: &str, ca: bool| tsunagu::config::DicomTlsConfig {
        port: 0,
        certificate_file: p.join("server.pem"),
        private_key_file: p.join(key),
        client_ca_file: ca.then(|| p.join("network-ca.pem")),
    };
    config.server.tls = Some(tls("other.key", false));
    let hub = tsunagu::hub::Hub::open(config.clone()).await.unwrap();
    let e = hub
        .start()
        .await
        .err()
        .expect("a key of another certificate");
    assert!(e.to_string().contains("server.tls.private_key_file"), "{e}");
    let mut bad = config.clone();
    bad.server.tls = Some(tls("missing.key", false));
    assert!(key_of(&bad).contains("server.tls.private_key_file"));
    bad.server.tls = Some(tls("server.key", false));
    bad.server.tls.as_mut().unwrap().port = 4242;
    bad.server.dicom_port = 4242;
    assert!(key_of(&bad).contains("server.tls.port"));
    // Fingerprints need client certificates, must be SHA-256, and name one
    // institution's certificate only.
    let mut bad = config.clone();
    bad.server.tls = Some(tls("server.key", false));
    bad.institutions[0].tls_certificate_sha256 = vec!["ab".repeat(32)];
    assert!(key_of(&bad).contains("institution[0].tls_certificate_sha256"));
    bad.server.tls = Some(tls("server.key", true));
    bad.institutions[0].tls_certificate_sha256 = vec!["ab".repeat(31)];
    assert!(key_of(&bad).contains("institution[0].tls_certificate_sha256"));
    bad.institutions[0].tls_certificate_sha256 = vec!["AB:".repeat(31) + "AB"];
    bad.institutions[1].tls_certificate_sha256 = vec!["ab".repeat(32)];
    assert!(key_of(&bad).contains("institution[1].tls_certificate_sha256"));

    // Encryption only: any sender, no certificate asked.
    config.server.tls = Some(tls("server.key", false));
    let Some(echoscu) = common::dcmtk("echoscu") else {
        return;
    };
    let hub = tsunagu::hub::Hub::open(config).await.unwrap();
    let running = hub.start().await.unwrap();
    let port = running.dicom_tls_addr.unwrap().port();
    let anonymous = Command::new(&echoscu)
        .current_dir(p)
        .args(["+tla", "+cf", "network-ca.pem"])
        .args(common::hub_peer("HOSP2", port))
        .output()
        .unwrap();
    running.shutdown.cancel();
    assert!(
        anonymous.status.success(),
        "{}",
        String::from_utf8_lossy(&anonymous.stderr)
    );
}

/// The key a configuration error names.
fn key_of(config: &tsunagu::config::Config) -> String {
    config.validate().unwrap_err().to_string()
}

/// HTTPS: curl and dicomweb-client reach DICOMweb and the health routes over
/// TLS (verifying the server against the CA); plain HTTP there is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn https_serves_dicomweb_and_refuses_plain_http() {
    let pki = tempfile::tempdir().unwrap();
    let p = pki.path();
    if !(ca(p, "network-ca") && issue(p, "server", "network-ca", true)) {
        return;
    }
    let Some(ct) = common::testdata_dir().map(|d| d.join("files/ct16_explicit_le.dcm")) else {
        return;
    };
    let Some(hub) = TestHub::start_with(Backend::Local, |c| {
        c.server.http_tls = Some(tsunagu::config::HttpTlsConfig {
            certificate_file: p.join("server.pem"),
            private_key_file: p.join("server.key"),
        });
    })
    .await
    else {
        return;
    };
    hub.import("HOSP1", vec![ct]).await;
    let port = hub.running.http_addr.port();
    let curl = |url: String, extra: &[&str]| {
        Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(p.join("network-ca.pem"))
            .args(extra)
            .arg(url)
            .output()
            .unwrap()
    };
    let ok = curl(format!("https://localhost:{port}/healthz"), &[]);
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "200");
    let token = format!(
        "Authorization: Bearer {}",
        hub.token("HOSP1", tsunagu::auth::Role::Clinician)
    );
    let found = curl(
        format!("https://localhost:{port}/dicom-web/studies?PatientID=TSNG-TD-0001"),
        &["-H", &token],
    );
    assert_eq!(String::from_utf8_lossy(&found.stdout), "200");
    // Answers link to resources over HTTPS.
    let body = Command::new("curl")
        .args(["-s", "--cacert"])
        .arg(p.join("network-ca.pem"))
        .args(["-H", &token])
        .arg(format!(
            "https://localhost:{port}/dicom-web/studies?PatientID=TSNG-TD-0001"
        ))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&body.stdout);
    assert!(
        body.contains(&format!("\"https://localhost:{port}/dicom-web/studies/")),
        "{body}"
    );
    let plain = curl(format!("http://localhost:{port}/healthz"), &[]);
    assert_ne!(
        String::from_utf8_lossy(&plain.stdout),
        "200",
        "plain HTTP on the HTTPS port"
    );
    // dicomweb-client, verifying the server against the network CA (as
    // requests is told: REQUESTS_CA_BUNDLE, which outranks a session's own).
    let Some(py) = common::python_with("dicomweb_client") else {
        return;
    };
    let script = format!(
        "import sys\n\
         from dicomweb_client.api import DICOMwebClient\n\
         c = DICOMwebClient(url='https://localhost:{port}/dicom-web', \
         headers={{'Authorization': 'Bearer ' + sys.argv[1]}})\n\
         print(len(c.search_for_studies(search_filters={{'PatientID': 'TSNG-TD-0001'}})))\n"
    );
    let out = common::run_ok(
        Command::new(py)
            .env("REQUESTS_CA_BUNDLE", p.join("network-ca.pem"))
            .args(["-c", &script])
            .arg(hub.token("HOSP1", tsunagu::auth::Role::Clinician)),
    );
    assert_eq!(String::from_utf8_lossy(&out).trim(), "1");
}
