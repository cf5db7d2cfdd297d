//! DICOM over TLS with DCMTK's echoscu and storescu (+tls): mutual TLS with a
//! network CA, an institution bound to its certificate (TLS only, and only
//! with that certificate), certificates of another CA or none refused, the
//! plain port beside it.

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

/// SHA-256 of a PEM certificate's DER bytes, hex.
fn fingerprint(pem: &Path) -> String {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(pem).unwrap();
    hex::encode(Sha256::digest(der.as_ref()))
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
    cmd.args([
        "-aet",
        calling,
        "-aec",
        "TSUNAGU",
        "127.0.0.1",
        &port.to_string(),
    ])
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
        && issue(p, "mallory", "rogue-ca", false))
    {
        return;
    }
    let hosp1 = fingerprint(&p.join("hosp1.pem"));
    let Some(hub) = TestHub::start_with(Backend::Local, |c| {
        c.server.tls = Some(tsunagu::config::DicomTlsConfig {
            port: 0,
            certificate_file: p.join("server.pem"),
            private_key_file: p.join("server.key"),
            client_ca_file: Some(p.join("network-ca.pem")),
        });
        c.institutions[0].tls_certificate_sha256 = vec![hosp1.clone()];
    })
    .await
    else {
        return;
    };
    let tls_port = hub.running.dicom_tls_addr.expect("TLS listener").port();
    let plain = hub.port();

    // Hospital 1 over TLS with its own certificate: echo and store.
    assert!(dcmtk_as(
        &echoscu,
        tls_port,
        "HOSP1",
        Some((p, "hosp1")),
        &[]
    ));
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
    assert!(!dcmtk_as(&echoscu, plain, "HOSP1", None, &[]));
    assert!(!dcmtk_as(
        &echoscu,
        tls_port,
        "HOSP1",
        Some((p, "hosp2")),
        &[]
    ));
    // Hospital 2 named no certificate: TLS with any of the network's, or plain.
    assert!(dcmtk_as(
        &echoscu,
        tls_port,
        "HOSP2",
        Some((p, "hosp2")),
        &[]
    ));
    assert!(dcmtk_as(&echoscu, plain, "HOSP2", None, &[]));
    // A certificate of another CA, or none, ends in the handshake.
    assert!(!dcmtk_as(
        &echoscu,
        tls_port,
        "HOSP2",
        Some((p, "mallory")),
        &[]
    ));
    let anonymous = Command::new(&echoscu)
        .current_dir(p)
        .args([
            "+tla",
            "+cf",
            "network-ca.pem",
            "-aet",
            "HOSP2",
            "-aec",
            "TSUNAGU",
        ])
        .args(["127.0.0.1", &tls_port.to_string()])
        .output()
        .unwrap();
    assert!(!anonymous.status.success(), "no client certificate");
    // Plain DICOM on the TLS port is not an association either.
    assert!(!dcmtk_as(&echoscu, tls_port, "HOSP2", None, &[]));
    // Each refusal is an authentication failure in the trail, with its reason.
    hub.hub.audit.flush().await;
    let mut reasons: Vec<String> = Vec::new();
    // Refusals of HOSP1's AE titles are its admins' to see; the failed
    // handshake named no one.
    for institution in ["HOSP1", ""] {
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
        "TLS handshake failed",
    ] {
        assert!(
            reasons.iter().any(|r| r.starts_with(want)),
            "{want}: {reasons:?}"
        );
    }
    // And the server goes on serving.
    assert!(dcmtk_as(
        &echoscu,
        tls_port,
        "HOSP1",
        Some((p, "hosp1")),
        &[]
    ));
    assert!(hub.echo("HOSP3"));
}

/// A key that does not fit the certificate, or a missing file, stops the
/// start with the key named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dicom_tls_material_is_checked_at_start() {
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
    config.server.tls = Some(tsunagu::config::DicomTlsConfig {
        port: 0,
        certificate_file: p.join("server.pem"),
        private_key_file: p.join("other.key"),
        client_ca_file: None,
    });
    let hub = tsunagu::hub::Hub::open(config.clone()).await.unwrap();
    let e = hub
        .start()
        .await
        .err()
        .expect("a key of another certificate")
        .to_string();
    assert!(e.contains("server.tls.private_key_file"), "{e}");
    config.server.tls.as_mut().unwrap().private_key_file = p.join("missing.key");
    let e = config.validate().unwrap_err().to_string();
    assert!(e.contains("server.tls.private_key_file"), "{e}");
    // A pinned institution without client certificates is refused too.
    config.server.tls.as_mut().unwrap().private_key_file = p.join("server.key");
    config.institutions[0].tls_certificate_sha256 = vec!["ab".repeat(32)];
    let e = config.validate().unwrap_err().to_string();
    assert!(e.contains("institution[0].tls_certificate_sha256"), "{e}");
}
