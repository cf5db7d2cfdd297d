//! Audit events to a collector as PS3.15 §A.5 XML audit messages in RFC
//! 5424 syslog records, over UDP (RFC 5426, one record per datagram) or
//! TLS (RFC 5425, octet-counted frames). The trail in the database is the
//! record of authority; the collector is a copy, so a collector that is down
//! costs a warning and a metric, never a request.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use base64::Engine as _;

use super::chain::Sequenced;
use super::codes::{self, Code};
use crate::config::AuditConfig;

#[derive(Debug, thiserror::Error)]
pub enum SyslogError {
    #[error("audit.syslog: {0:?} is not udp://host:port or tls://host:port")]
    Url(String),
    #[error("audit.syslog_ca_file: {0}")]
    Ca(String),
}

enum Transport {
    Udp(String),
    Tls {
        addr: String,
        host: String,
        connector: tokio_rustls::TlsConnector,
    },
}

/// Sends audit messages to the configured collector from a task of its own.
#[derive(Clone)]
pub struct Forwarder {
    tx: mpsc::UnboundedSender<String>,
}

impl Forwarder {
    /// The forwarder `[audit] syslog` asks for, if any.
    pub fn from_config(cfg: &AuditConfig) -> Result<Option<Self>, SyslogError> {
        let Some(url) = cfg.syslog.as_deref() else {
            return Ok(None);
        };
        let bad = || SyslogError::Url(url.to_string());
        let (scheme, addr) = url.split_once("://").ok_or_else(bad)?;
        let host = addr.rsplit_once(':').ok_or_else(bad)?.0.to_string();
        let transport = match scheme {
            "udp" => Transport::Udp(addr.to_string()),
            "tls" => {
                let mut roots = tokio_rustls::rustls::RootCertStore::empty();
                if let Some(ca) = &cfg.syslog_ca_file {
                    use rustls_pki_types::pem::PemObject;
                    let certs = rustls_pki_types::CertificateDer::pem_file_iter(ca)
                        .map_err(|e| SyslogError::Ca(format!("{}: {e}", ca.display())))?;
                    for c in certs {
                        let c = c.map_err(|e| SyslogError::Ca(e.to_string()))?;
                        roots.add(c).map_err(|e| SyslogError::Ca(e.to_string()))?;
                    }
                } else {
                    return Err(SyslogError::Ca(
                        "a TLS collector needs the CA certificate its certificate chains to".into(),
                    ));
                }
                let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
                    tokio_rustls::rustls::crypto::aws_lc_rs::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| SyslogError::Ca(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
                Transport::Tls {
                    addr: addr.to_string(),
                    host: host.trim_matches(['[', ']']).to_string(),
                    connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
                }
            }
            _ => return Err(bad()),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(forward(transport, rx));
        Ok(Some(Self { tx }))
    }

    /// Queue the messages of `events`.
    pub fn send(&self, events: &[Sequenced]) {
        for e in events {
            let _ = self.tx.send(record(e));
        }
    }
}

async fn forward(transport: Transport, mut rx: mpsc::UnboundedReceiver<String>) {
    match transport {
        Transport::Udp(addr) => {
            let socket = match tokio::net::UdpSocket::bind("0.0.0.0:0").await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot open a UDP socket for syslog");
                    return;
                }
            };
            while let Some(m) = rx.recv().await {
                if let Err(e) = socket.send_to(m.as_bytes(), &addr).await {
                    failed(&e.to_string());
                }
            }
        }
        Transport::Tls {
            addr,
            host,
            connector,
        } => {
            let mut conn: Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> = None;
            while let Some(m) = rx.recv().await {
                // One reconnect per message at most; a message that cannot
                // be delivered then is counted and dropped.
                for _ in 0..2 {
                    if conn.is_none() {
                        conn = connect(&connector, &addr, &host).await;
                    }
                    let Some(c) = conn.as_mut() else { break };
                    let frame = format!("{} {m}", m.len());
                    if c.write_all(frame.as_bytes()).await.is_ok() && c.flush().await.is_ok() {
                        break;
                    }
                    conn = None;
                }
                if conn.is_none() {
                    failed("collector unreachable");
                }
            }
        }
    }
}

async fn connect(
    connector: &tokio_rustls::TlsConnector,
    addr: &str,
    host: &str,
) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let name = rustls_pki_types::ServerName::try_from(host.to_string()).ok()?;
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    match connector.connect(name, tcp).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "TLS to the syslog collector failed");
            None
        }
    }
}

fn failed(reason: &str) {
    tracing::warn!(
        reason,
        "an audit message did not reach the syslog collector"
    );
    metrics::counter!(crate::telemetry::AUDIT_SYSLOG_FAILURES).increment(1);
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn code_el(name: &str, c: &Code) -> String {
    format!(
        r#"<{name} csd-code="{}" codeSystemName="{}" originalText="{}"/>"#,
        c.code,
        c.scheme,
        esc(c.meaning)
    )
}

/// Most patients and studies named in one message: with IDs and UIDs of 64
/// characters the message stays near 30 KB, well inside one UDP datagram
/// (65,507 bytes; at 100 it could pass that and be lost whole).
const MAX_OBJECTS: usize = 50;

/// Objects stop being added once a message is this long (IDs of up to 256
/// characters, escaped, could still outgrow a datagram at 50).
const MESSAGE_OBJECTS_MAX: usize = 56 * 1024;

/// The PS3.15 §A.5 audit message of one event.
pub fn audit_message(s: &Sequenced) -> String {
    let e = &s.event;
    let c = codes::of(e.action, e.outcome);
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?><AuditMessage>");
    x += &format!(
        r#"<EventIdentification EventActionCode="{}" EventDateTime="{}" EventOutcomeIndicator="{}">"#,
        c.action_code, e.at, c.outcome_indicator
    );
    x += &code_el("EventID", &c.event_id);
    if let Some(t) = &c.event_type {
        x += &code_el("EventTypeCode", t);
    }
    x += "</EventIdentification>";
    let (ip, _) = e.client.rsplit_once(':').unwrap_or((&e.client, ""));
    x += &format!(
        r#"<ActiveParticipant UserID="{}" AlternativeUserID="{}" UserName="{}" UserIsRequestor="true" NetworkAccessPointID="{}" NetworkAccessPointTypeCode="2"><RoleIDCode csd-code="{}" codeSystemName="tsunagu" originalText="{}"/></ActiveParticipant>"#,
        esc(&e.user),
        esc(&e.institution),
        esc(&e.user),
        esc(ip.trim_matches(['[', ']'])),
        esc(&e.role),
        esc(&e.role)
    );
    // Which node wrote it (nodes sharing one index are told apart).
    x += &format!(
        r#"<AuditSourceIdentification AuditSourceID="{}"><AuditSourceTypeCode csd-code="4" codeSystemName="DCM" originalText="Application Server Process"/></AuditSourceIdentification>"#,
        esc(&format!("tsunagu@{}", host_name().unwrap_or("-")))
    );
    // One datagram must hold the message: a large answer's objects are
    // capped (the database trail keeps them all).
    let objects = &e.objects[..e.objects.len().min(MAX_OBJECTS)];
    let mut patients: Vec<(&str, &str)> = objects
        .iter()
        .map(|o| (o.patient_institution.as_str(), o.patient_id.as_str()))
        .collect();
    patients.sort();
    patients.dedup();
    for (inst, pid) in patients {
        if x.len() > MESSAGE_OBJECTS_MAX {
            break;
        }
        x += &format!(
            r#"<ParticipantObjectIdentification ParticipantObjectID="{}" ParticipantObjectTypeCode="1" ParticipantObjectTypeCodeRole="1"><ParticipantObjectIDTypeCode csd-code="2" codeSystemName="RFC-3881" originalText="Patient Number"/><ParticipantObjectDetail type="Institution" value="{}"/></ParticipantObjectIdentification>"#,
            esc(pid),
            // xs:base64Binary in the PS3.15 schema.
            base64::engine::general_purpose::STANDARD.encode(inst)
        );
    }
    for o in objects.iter().filter(|o| !o.study_uid.is_empty()) {
        if x.len() > MESSAGE_OBJECTS_MAX {
            break;
        }
        x += &format!(
            r#"<ParticipantObjectIdentification ParticipantObjectID="{}" ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="3"><ParticipantObjectIDTypeCode csd-code="110180" codeSystemName="DCM" originalText="Study Instance UID"/></ParticipantObjectIdentification>"#,
            esc(&o.study_uid)
        );
    }
    x += "</AuditMessage>";
    x
}

/// This machine's name, if the environment gives one.
fn host_name() -> Option<&'static str> {
    static NAME: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
    })
    .as_deref()
}

/// An RFC 5424 record: facility authpriv (10), severity notice (5), or
/// warning (4) for refusals and failures.
fn record(s: &Sequenced) -> String {
    let severity = if s.event.outcome == super::Outcome::Success {
        5
    } else {
        4
    };
    let host = host_name().unwrap_or("-");
    // The event's place in the chain (RFC 5424 §7.3.1 `meta sequenceId`,
    // 1 to 2^31 - 1): a collector can tell a trail cut short or a gap.
    // (It wraps after 2^31 - 1, as RFC 5424 says.)
    let max = i64::from(i32::MAX);
    let sd = format!("[meta sequenceId=\"{}\"]", (s.seq - 1).rem_euclid(max) + 1);
    format!(
        "<{}>1 {} {host} tsunagu {} IHE+RFC-3881 {sd} \u{feff}{}",
        10 * 8 + severity,
        s.event.at,
        std::process::id(),
        audit_message(s)
    )
}
