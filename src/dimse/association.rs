//! One association, start to end: negotiation (who is calling decides the
//! institution), then C-ECHO and C-STORE until release or abort.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dicom_ul::association::Association as _;
use dicom_ul::association::Error as UlError;
use dicom_ul::pdu::{
    AbortRQServiceProviderReason, AbortRQSource, PDataValue, PDataValueType,
    PresentationContextNegotiated, PresentationContextResultReason,
};
use dicom_ul::{Pdu, ServerAssociationOptions};
use tokio::net::TcpStream;
use tracing::Instrument;

use super::command::{Command, CommandField};
use super::gate;
use super::pdata::{self, Incoming, Pdv};
use super::status;
use crate::access::{Institution, Institutions};
use crate::dicom::part10::FileMeta;
use crate::dicom::storage_classes::STORAGE_SOP_CLASSES;
use crate::ingest::{Ingest, Spool};
use crate::telemetry;

const VERIFICATION: &str = "1.2.840.10008.1.1";

/// What every association needs.
pub struct DimseContext {
    pub ae_title: String,
    pub institutions: Arc<Institutions>,
    pub ingest: Ingest,
    /// Refused associations are authentication failures of the trail.
    pub audit: crate::audit::Auditor,
    pub refusals: gate::RefusalLog,
    pub max_pdu_length: u32,
    pub timeout: Duration,
}

/// Longest a new connection has to send its A-ASSOCIATE-RQ (shorter if the
/// association timeout is).
const ARTIM_MAX: Duration = Duration::from_secs(10);

/// How long an aborted association waits for the peer to close.
const ABORT_LINGER: Duration = Duration::from_secs(2);

/// A C-STORE whose data set is arriving.
struct Pending {
    started: std::time::Instant,
    command: Command,
    context_id: u8,
    sink: Sink,
}

/// Where the data set of a pending C-STORE goes.
enum Sink {
    Spool(Box<Spool>),
    /// Already refused: read and drop the rest, then answer with this status.
    Discard {
        status: u16,
        comment: &'static str,
    },
}

/// Serve one accepted TCP connection until it ends: plain DICOM, or DICOM
/// over TLS when `tls` is given (the handshake first).
pub async fn serve(
    ctx: Arc<DimseContext>,
    socket: TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<super::tls::TlsMaterial>>,
) {
    let decided = Arc::new(OnceLock::new());
    let refused = Arc::new(OnceLock::new());
    let client = Arc::new(OnceLock::new());
    let transport = match tls {
        Some(_) => gate::Transport::Tls {
            client: client.clone(),
        },
        None => gate::Transport::Plain,
    };
    let mut options = ServerAssociationOptions::new()
        .ae_access_control(gate::SenderGate {
            institutions: ctx.institutions.clone(),
            decided: decided.clone(),
            refused: refused.clone(),
            transport,
            peer: peer.ip(),
        })
        .ae_title(ctx.ae_title.clone())
        .max_pdu_length(ctx.max_pdu_length)
        .strict(true)
        .read_timeout(ctx.timeout)
        .write_timeout(ctx.timeout)
        .with_abstract_syntax(VERIFICATION);
    for (uid, _) in STORAGE_SOP_CLASSES {
        options = options.with_abstract_syntax(*uid);
    }
    // ARTIM (PS3.8 §9.1.5): a connection that does not complete its
    // A-ASSOCIATE-RQ soon is closed, so that idle connections hold no
    // association slot for the whole association timeout (the TLS
    // handshake included).
    let artim = ctx.timeout.min(ARTIM_MAX);
    match tls {
        None => {
            let established = tokio::time::timeout(artim, options.establish_async(socket)).await;
            established_then_run(ctx, established, artim, &decided, &refused, peer).await;
        }
        Some(material) => {
            let config = match material.server_config(client) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(%peer, error = %e, "no TLS configuration for this connection");
                    return;
                }
            };
            let options = options.tls_config(config);
            let established =
                tokio::time::timeout(artim, options.establish_tls_async(socket)).await;
            established_then_run(ctx, established, artim, &decided, &refused, peer).await;
        }
    }
}

/// After negotiation: refused (audited) or served until it ends.
async fn established_then_run<S>(
    ctx: Arc<DimseContext>,
    established: Result<Result<Assoc<S>, UlError>, tokio::time::error::Elapsed>,
    artim: Duration,
    decided: &OnceLock<Arc<Institution>>,
    refused: &OnceLock<gate::Refusal>,
    peer: SocketAddr,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let Ok(established) = established else {
        metrics::counter!(telemetry::ASSOCIATIONS_REJECTED, "reason" => "artim").increment(1);
        tracing::info!(%peer, ?artim, "no association request in time; connection closed");
        // Refused, perhaps, with the A-ASSOCIATE-RJ not sent in time.
        gate::audit_refusal(&ctx.audit, &ctx.refusals, refused, peer);
        return;
    };
    let association = match established {
        Ok(a) => a,
        Err(e) => {
            // The A-ASSOCIATE-RJ or A-ABORT has already been sent (or the
            // TLS handshake failed).
            let reason = match &e {
                UlError::Rejected { .. } => "rejected",
                UlError::TlsHandshake { .. } => "tls_handshake",
                _ => "negotiation_failed",
            };
            metrics::counter!(telemetry::ASSOCIATIONS_REJECTED, "reason" => reason).increment(1);
            tracing::info!(%peer, error = %e, "association not established");
            if let UlError::TlsHandshake { source, .. } = &e
                && let Some(r) = gate::Refusal::tls_handshake(source)
            {
                let _ = refused.set(r);
            }
            gate::audit_refusal(&ctx.audit, &ctx.refusals, refused, peer);
            return;
        }
    };
    let Some(institution) = decided.get().cloned() else {
        tracing::error!(%peer, "association accepted without a sender decision");
        return;
    };
    let calling = association.peer_ae_title().trim().to_string();
    let span = tracing::info_span!("association", calling_ae = %calling, institution = %institution.code, %peer);
    metrics::counter!(telemetry::ASSOCIATIONS_TOTAL).increment(1);
    metrics::gauge!(telemetry::ASSOCIATIONS_ACTIVE).increment(1.0);
    run(ctx, association, institution, calling, peer.to_string())
        .instrument(span)
        .await;
    metrics::gauge!(telemetry::ASSOCIATIONS_ACTIVE).decrement(1.0);
}

type Assoc<S> = dicom_ul::association::server::AsyncServerAssociation<S>;

/// The state of one established association.
struct Session<S> {
    ctx: Arc<DimseContext>,
    assoc: Assoc<S>,
    contexts: Vec<PresentationContextNegotiated>,
    institution: Arc<Institution>,
    calling: String,
    /// The peer's network address.
    peer: String,
    /// Command PDV fragments until the last one.
    command_buf: Vec<u8>,
    /// The presentation context of those fragments (one message, one
    /// context: PS3.8 Annex E).
    command_context: Option<u8>,
    pending: Option<Pending>,
}

/// Why an association is aborted (A-ABORT, source service-provider).
#[derive(Debug, Clone, Copy)]
enum ProtocolError {
    /// The peer broke the protocol.
    Violation(&'static str),
    /// A response could not be sent: the peer is gone.
    Send,
}

impl From<&'static str> for ProtocolError {
    fn from(why: &'static str) -> Self {
        ProtocolError::Violation(why)
    }
}

impl ProtocolError {
    /// What went wrong, for the log.
    fn why(self) -> &'static str {
        match self {
            ProtocolError::Violation(why) => why,
            ProtocolError::Send => "cannot send response",
        }
    }

    /// The `reason` label of the failed-associations metric.
    fn label(self) -> &'static str {
        match self {
            ProtocolError::Violation(_) => "protocol_error",
            ProtocolError::Send => "connection_error",
        }
    }
}

async fn run<S>(
    ctx: Arc<DimseContext>,
    assoc: Assoc<S>,
    institution: Arc<Institution>,
    calling: String,
    peer: String,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let contexts: Vec<PresentationContextNegotiated> = assoc.presentation_contexts().to_vec();
    tracing::info!(
        contexts = contexts
            .iter()
            .filter(|c| c.reason == PresentationContextResultReason::Acceptance)
            .count(),
        "association established"
    );
    let mut session = Session {
        ctx,
        assoc,
        contexts,
        institution,
        calling,
        peer,
        command_buf: Vec::new(),
        command_context: None,
        pending: None,
    };
    session.serve().await;
}

impl<S> Session<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    async fn serve(&mut self) {
        loop {
            let incoming =
                pdata::receive(&mut self.assoc, self.ctx.max_pdu_length, self.ctx.timeout).await;
            let pdu = match incoming {
                Ok(Incoming::Data(values)) => {
                    for pdv in values {
                        if let Err(e) = self.on_pdv(pdv).await {
                            tracing::warn!(
                                reason = e.why(),
                                "protocol error; aborting association"
                            );
                            self.failed(e.label());
                            self.abort(AbortRQServiceProviderReason::UnexpectedPdu)
                                .await;
                            return;
                        }
                    }
                    continue;
                }
                Ok(Incoming::Other(p)) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "association ended by a receive error; aborting");
                    self.failed(e.label());
                    self.abort(AbortRQServiceProviderReason::ReasonNotSpecified)
                        .await;
                    return;
                }
            };
            match pdu {
                Pdu::ReleaseRQ => {
                    if self.pending.is_some() {
                        // An orderly release would read as "all done": the
                        // sender must learn the object was not stored.
                        tracing::warn!(
                            "release requested in the middle of an object; the object is discarded and the association aborted"
                        );
                        self.failed("release_mid_object");
                        self.abort(AbortRQServiceProviderReason::UnexpectedPdu)
                            .await;
                        return;
                    }
                    let _ = self.assoc.send(&Pdu::ReleaseRP).await;
                    // Flushed and closed in order: over TLS the A-RELEASE-RP
                    // may still sit in the TLS buffer, and close_notify
                    // tells the peer nothing was cut.
                    {
                        use dicom_ul::association::AsyncAssociation as _;
                        use tokio::io::AsyncWriteExt;
                        let (socket, _) = self.assoc.get_mut();
                        let _ = tokio::time::timeout(ABORT_LINGER, socket.shutdown()).await;
                    }
                    tracing::info!("association released");
                    return;
                }
                Pdu::AbortRQ { source } => {
                    tracing::info!(?source, "association aborted by peer");
                    self.failed("peer_abort");
                    return;
                }
                other => {
                    tracing::warn!(pdu = ?std::mem::discriminant(&other), "unexpected PDU; aborting");
                    self.failed("unexpected_pdu");
                    self.abort(AbortRQServiceProviderReason::UnexpectedPdu)
                        .await;
                    return;
                }
            }
        }
    }

    /// Count an association ending other than by an orderly release, and
    /// the object it cut off, if one was arriving (it is discarded).
    fn failed(&self, reason: &'static str) {
        metrics::counter!(telemetry::ASSOCIATIONS_FAILED, "reason" => reason).increment(1);
        // Only an object being received: a refused one was counted already.
        if self
            .pending
            .as_ref()
            .is_some_and(|p| matches!(p.sink, Sink::Spool(_)))
        {
            metrics::counter!(telemetry::STORE_FAILURES, "reason" => "cut_off").increment(1);
        }
    }

    async fn abort(&mut self, reason: AbortRQServiceProviderReason) {
        let _ = self
            .assoc
            .send(&Pdu::AbortRQ {
                source: AbortRQSource::ServiceProvider(reason),
            })
            .await;
        // Let the A-ABORT reach the peer: closing with its data still unread
        // would send a TCP reset, which can discard the A-ABORT before the
        // peer reads it (PS3.8 Sta13: wait for the peer to close, under ARTIM).
        use dicom_ul::association::AsyncAssociation as _;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (socket, _) = self.assoc.get_mut();
        let _ = socket.shutdown().await;
        let mut unread = [0u8; 16 * 1024];
        let _ = tokio::time::timeout(ABORT_LINGER, async {
            while let Ok(n) = socket.read(&mut unread).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }

    async fn send_response(&mut self, context_id: u8, bytes: Vec<u8>) -> Result<(), ProtocolError> {
        self.assoc
            .send(&Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: context_id,
                    value_type: PDataValueType::Command,
                    is_last: true,
                    data: bytes,
                }],
            })
            .await
            .map_err(|_| ProtocolError::Send)
    }

    async fn on_pdv(&mut self, pdv: Pdv) -> Result<(), ProtocolError> {
        let pc = self
            .contexts
            .iter()
            .find(|c| {
                c.id == pdv.context_id && c.reason == PresentationContextResultReason::Acceptance
            })
            .cloned()
            .ok_or("PDV on a presentation context that was not accepted")?;
        if !pdv.command {
            return self.on_data(pdv).await;
        }
        if self.pending.is_some() {
            return Err("command while a data set is still arriving".into());
        }
        if *self.command_context.get_or_insert(pdv.context_id) != pdv.context_id {
            return Err("command fragments on different presentation contexts".into());
        }
        self.command_buf.extend_from_slice(&pdv.data);
        if self.command_buf.len() > 64 * 1024 {
            return Err("command set larger than 64 KiB".into());
        }
        if !pdv.last {
            return Ok(());
        }
        self.command_context = None;
        let bytes = std::mem::take(&mut self.command_buf);
        let command = Command::parse(&bytes).map_err(|_| "unreadable command set")?;
        self.on_command(&pc, command).await
    }

    async fn on_data(&mut self, pdv: Pdv) -> Result<(), ProtocolError> {
        let Some(p) = self.pending.as_mut() else {
            return Err("data set without a command".into());
        };
        if p.context_id != pdv.context_id {
            return Err("data set on another presentation context".into());
        }
        if let Sink::Spool(spool) = &mut p.sink
            && let Err(e) = spool.write(pdv.data).await
        {
            tracing::error!(error = %e, "spool write failed");
            let (status, comment) = status::of_ingest_error(&e);
            p.sink = Sink::Discard { status, comment };
        }
        if !pdv.last {
            return Ok(());
        }
        let p = self.pending.take().expect("checked above");
        let received = p.started.elapsed();
        let response = match p.sink {
            Sink::Spool(spool) => self.finish_store(*spool, &p.command).await,
            Sink::Discard { status, comment } => {
                super::command::response(&p.command, status, Some(comment))
            }
        };
        self.send_response(p.context_id, response).await?;
        tracing::debug!(
            received_us = received.as_micros() as u64,
            answered_us = p.started.elapsed().as_micros() as u64,
            "c-store timings"
        );
        Ok(())
    }

    async fn on_command(
        &mut self,
        pc: &PresentationContextNegotiated,
        command: Command,
    ) -> Result<(), ProtocolError> {
        let sink = match command.field {
            CommandField::CEchoRq => {
                // PS3.7 9.3.5: a C-ECHO-RQ carries no data set.
                if command.has_data_set {
                    return Err("C-ECHO-RQ with a data set".into());
                }
                metrics::counter!(telemetry::ECHOS).increment(1);
                // Verification is a SOP class of its own: a C-ECHO on a
                // storage context verifies nothing that was negotiated.
                let status = if pc.abstract_syntax == VERIFICATION {
                    status::SUCCESS
                } else {
                    status::SOP_CLASS_NOT_SUPPORTED
                };
                let rsp = super::command::response(&command, status, None);
                return self.send_response(pc.id, rsp).await;
            }
            CommandField::CStoreRq => {
                if !command.has_data_set {
                    return Err("C-STORE-RQ without a data set".into());
                }
                self.store_sink(pc, &command).await
            }
            CommandField::Other(field) => {
                tracing::warn!(
                    command_field = format!("{field:04X}"),
                    "unsupported DIMSE command"
                );
                if !command.has_data_set {
                    let rsp =
                        super::command::response(&command, status::UNRECOGNIZED_OPERATION, None);
                    return self.send_response(pc.id, rsp).await;
                }
                Sink::Discard {
                    status: status::UNRECOGNIZED_OPERATION,
                    comment: "unsupported operation",
                }
            }
        };
        self.pending = Some(Pending {
            started: std::time::Instant::now(),
            command,
            context_id: pc.id,
            sink,
        });
        Ok(())
    }

    /// Where a C-STORE's data set goes: a spool, or (refused) nowhere. A
    /// refused data set is still read, so the association stays in step.
    async fn store_sink(&self, pc: &PresentationContextNegotiated, command: &Command) -> Sink {
        let class = command.affected_sop_class_uid.clone().unwrap_or_default();
        let instance = command
            .affected_sop_instance_uid
            .clone()
            .unwrap_or_default();
        let refuse = if class.is_empty() || instance.is_empty() {
            Some((
                status::DATA_SET_MISMATCH,
                "command lacks Affected SOP Class/Instance UID",
            ))
        } else if class != pc.abstract_syntax {
            // The class must be the one negotiated for the context.
            Some((
                status::SOP_CLASS_NOT_SUPPORTED,
                "SOP class differs from the presentation context",
            ))
        } else {
            None
        };
        if let Some((status, comment)) = refuse {
            metrics::counter!(telemetry::STORE_FAILURES, "reason" => "command").increment(1);
            tracing::warn!(status = format!("{status:04X}"), comment, "C-STORE refused");
            return Sink::Discard { status, comment };
        }
        let meta = FileMeta {
            sop_class_uid: class,
            sop_instance_uid: instance,
            transfer_syntax: pc.transfer_syntax.trim_end_matches('\0').to_string(),
            source_ae_title: Some(self.calling.clone()),
        };
        match self.ctx.ingest.begin(meta, &self.institution).await {
            Ok(s) => Sink::Spool(Box::new(s)),
            Err(e) => {
                tracing::error!(error = %e, "cannot open a spool");
                let (status, comment) = status::of_ingest_error(&e);
                Sink::Discard { status, comment }
            }
        }
    }

    async fn finish_store(&self, spool: Spool, command: &Command) -> Vec<u8> {
        match self
            .ctx
            .ingest
            .finish(
                spool,
                &self.institution,
                Some(&self.calling),
                &crate::audit::Actor {
                    user: self.calling.clone(),
                    institution: self.institution.code.clone(),
                    role: "modality".into(),
                    client: self.peer.clone(),
                },
            )
            .await
        {
            Ok(accepted) => {
                tracing::info!(
                    sop_instance_uid = %accepted.summary.sop_instance_uid,
                    study_instance_uid = %accepted.summary.study_instance_uid,
                    outcome = ?accepted.outcome,
                    "stored"
                );
                super::command::response(command, status::SUCCESS, None)
            }
            Err(e) => {
                let (code, comment) = status::of_ingest_error(&e);
                tracing::warn!(error = %e, status = format!("{code:04X}"), "C-STORE failed");
                super::command::response(command, code, Some(comment))
            }
        }
    }
}
