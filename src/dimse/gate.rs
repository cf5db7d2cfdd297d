//! Who may open an association: the calling AE title names the sending
//! institution (unknown callers and a wrong called AE title are refused),
//! and each refusal goes to the audit trail as an authentication failure,
//! at most once a window per peer, AE title and reason.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dicom_ul::association::server::AccessControl;
use dicom_ul::pdu::{AssociationRJServiceUserReason, UserIdentity};

use crate::access::{Institution, Institutions};
use crate::audit::Auditor;

/// Decides at A-ASSOCIATE time, and remembers which institution is calling
/// (after establishment dicom-ul only exposes our own user variables).
pub(super) struct SenderGate {
    pub(super) institutions: Arc<Institutions>,
    pub(super) decided: Arc<OnceLock<Arc<Institution>>>,
    pub(super) refused: Arc<OnceLock<Refusal>>,
    pub(super) transport: Transport,
    /// Where the connection comes from.
    pub(super) peer: std::net::IpAddr,
}

/// How the association arrived.
pub(super) enum Transport {
    Plain,
    /// Over TLS; the fingerprint of the client certificate verified in the
    /// handshake, if one was asked for.
    Tls {
        client: Arc<OnceLock<String>>,
    },
}

/// How often a refusal like another is recorded: anyone who reaches the
/// port could otherwise add a permanent row (and a syslog message) per
/// connection.
const REFUSAL_WINDOW: Duration = Duration::from_secs(60);

/// Refused associations recorded at most once a window per peer address,
/// calling AE title and reason; the next recorded one says how many like it
/// were not.
#[derive(Default)]
pub struct RefusalLog(
    std::sync::Mutex<std::collections::HashMap<RefusalKey, (std::time::Instant, u64)>>,
);

/// Peer address, calling AE title, reason.
type RefusalKey = (std::net::IpAddr, String, &'static str);

impl RefusalLog {
    /// `Some(n)`: record this refusal, `n` like it having gone unrecorded
    /// since the last recorded; `None`: only counted.
    fn admit(&self, peer: std::net::IpAddr, calling: &str, reason: &'static str) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut seen = self.0.lock().expect("refusal log lock");
        if seen.len() > 10_000 {
            seen.retain(|_, (at, _)| now.duration_since(*at) < REFUSAL_WINDOW);
        }
        match seen.entry((peer, calling.to_string(), reason)) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                let (at, unrecorded) = e.get_mut();
                if now.duration_since(*at) < REFUSAL_WINDOW {
                    *unrecorded += 1;
                    return None;
                }
                *at = now;
                Some(std::mem::take(unrecorded))
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert((now, 0));
                Some(0)
            }
        }
    }
}

/// Why the gate refused an association, for the audit trail.
pub(crate) struct Refusal {
    calling: String,
    called: String,
    /// The calling AE's institution, when only the called AE was wrong.
    institution: Option<String>,
    reason: &'static str,
}

impl Refusal {
    /// A TLS connection that failed its handshake (no AE title was read),
    /// by what rustls saw; `None` for a connection closed before or during
    /// its hello (a port probe or health check, not a sender).
    pub(super) fn tls_handshake(e: &std::io::Error) -> Option<Self> {
        use tokio_rustls::rustls::Error as Tls;
        let reason = match e.get_ref().and_then(|inner| inner.downcast_ref::<Tls>()) {
            _ if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Some(Tls::NoCertificatesPresented) => "TLS: no client certificate",
            Some(Tls::InvalidCertificate(_)) => {
                "TLS: client certificate not accepted (another CA's, expired or revoked)"
            }
            Some(Tls::AlertReceived(_)) => "TLS: the client ended the handshake (alert)",
            Some(Tls::InvalidMessage(_) | Tls::InappropriateMessage { .. }) => {
                "TLS: the client does not speak TLS"
            }
            _ => "TLS handshake failed",
        };
        Some(Self {
            calling: String::new(),
            called: String::new(),
            institution: None,
            reason,
        })
    }
}

impl AccessControl for SenderGate {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        let refuse = |institution: Option<&Institution>, reason| {
            let _ = self.refused.set(Refusal {
                calling: calling_ae_title.trim().to_string(),
                called: called_ae_title.trim().to_string(),
                institution: institution.map(|i| i.code.clone()),
                reason,
            });
        };
        let Some(inst) = self.institutions.by_calling_ae(calling_ae_title) else {
            refuse(None, "calling AE title not recognized");
            return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        };
        if called_ae_title.trim() != this_ae_title.trim() {
            refuse(Some(&inst), "called AE title not recognized");
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        let peer = crate::listen::canonical(self.peer);
        if !inst.networks.is_empty() && !inst.networks.iter().any(|n| n.contains(&peer)) {
            refuse(
                Some(&inst),
                "calling from outside the institution's networks",
            );
            return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        }
        // A certificate named by one institution speaks for it alone.
        if let Transport::Tls { client } = &self.transport
            && let Some(f) = client.get()
            && let Some(owner) = self.institutions.by_certificate(f)
            && owner.code != inst.code
        {
            refuse(Some(&inst), "client certificate is another institution's");
            return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        }
        // An institution that named its certificates is believed only with
        // one of them: its AE title alone is anyone's claim.
        if !inst.tls_certificates.is_empty() {
            let presented = match &self.transport {
                Transport::Plain => {
                    refuse(Some(&inst), "this sender must use DICOM TLS");
                    return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
                }
                Transport::Tls { client } => client.get(),
            };
            if !presented.is_some_and(|f| inst.tls_certificates.contains(f)) {
                refuse(
                    Some(&inst),
                    "client certificate is not one of the calling institution's",
                );
                return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
            }
        }
        let _ = self.decided.set(inst);
        Ok(())
    }
}

/// Record a refused association in the audit trail: an authentication
/// failure, the AE title being the sender's claim (unverified, as a refused
/// token's subject is); not if one like it was recorded within the window.
pub(super) fn audit_refusal(
    audit: &Auditor,
    log: &RefusalLog,
    refused: &OnceLock<Refusal>,
    peer: SocketAddr,
) {
    let Some(r) = refused.get() else {
        return;
    };
    let Some(unrecorded) = log.admit(peer.ip(), &r.calling, r.reason) else {
        return;
    };
    audit.record(crate::audit::Event {
        at: String::new(),
        action: crate::audit::Action::AuthenticateNode,
        outcome: crate::audit::Outcome::Denied,
        user: r.calling.clone(),
        institution: r.institution.clone().unwrap_or_default(),
        role: String::new(),
        client: peer.to_string(),
        objects: Vec::new(),
        detail: serde_json::json!({
            "protocol": "DICOM",
            "calling_ae": r.calling,
            "called_ae": r.called,
            "reason": r.reason,
            "identity_verified": false,
            "unrecorded_before": unrecorded,
        }),
    });
}
