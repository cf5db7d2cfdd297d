//! DICOM upper layer on tokio with dicom-ul: Verification and Storage SCP.
//! One task per association, bounded by `server.max_associations`;
//! TCP_NODELAY on every socket (dicom-ul never sets it, and Nagle plus
//! delayed ACK stalls each C-STORE response by ~40 ms).

pub mod association;
pub mod command;
mod gate;
mod pdata;
mod slots;
pub mod status;
pub mod tls;

use std::sync::Arc;

use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJSource,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use association::DimseContext;
pub use slots::Slots;

use crate::telemetry;

/// Accept associations until `shutdown` fires.
/// `slots` is shared by the plain and the TLS listener; `tls`: this one is
/// the TLS listener.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<DimseContext>,
    slots: Arc<Slots>,
    tls: Option<Arc<tls::TlsMaterial>>,
    shutdown: CancellationToken,
) {
    // Rejections in progress (each answers and waits briefly for the peer
    // to close): bounded, so a flood of connections cannot hold every file
    // descriptor; beyond it a connection is simply closed.
    let rejecting = Arc::new(Semaphore::new(slots.max()));
    loop {
        let Some((socket, peer)) = crate::listen::next_connection(&listener, &shutdown).await
        else {
            return;
        };
        match slots.take(peer.ip()) {
            Ok(slot) => {
                let (ctx, tls) = (ctx.clone(), tls.clone());
                tokio::spawn(async move {
                    association::serve(ctx, socket, peer, tls).await;
                    drop(slot);
                });
            }
            Err(full) => {
                metrics::counter!(telemetry::ASSOCIATIONS_REJECTED, "reason" => full.reason())
                    .increment(1);
                tracing::warn!(%peer, limit = ?full, "association limit reached; rejecting (transient)");
                // Over TLS an A-ASSOCIATE-RJ would need a handshake first:
                // the connection is closed.
                if tls.is_some() {
                    continue;
                }
                if let Ok(permit) = rejecting.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        reject_busy(socket).await;
                        drop(permit);
                    });
                }
            }
        }
    }
}

/// A-ASSOCIATE-RJ transient, service-provider (presentation), local limit
/// exceeded — after reading the A-ASSOCIATE-RQ, so the requestor is not cut
/// off while it is still sending and sees the reason.
async fn reject_busy(mut socket: TcpStream) {
    let read_rq = async {
        let mut header = [0u8; 6];
        socket.read_exact(&mut header).await?;
        let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
        // An A-ASSOCIATE-RQ is small; do not read more than a bounded amount.
        let mut rest = (&mut socket).take(u64::from(len.min(64 * 1024)));
        tokio::io::copy(&mut rest, &mut tokio::io::sink()).await
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), read_rq).await;
    let pdu = dicom_ul::Pdu::AssociationRJ(AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    });
    let mut buf = Vec::new();
    if dicom_ul::write_pdu(&mut buf, &pdu).is_ok() {
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(5), socket.write_all(&buf)).await;
    }
    let _ = socket.shutdown().await;
}

#[cfg(test)]
mod tests {
    use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

    /// The Conformance Statement lists every transfer syntax the SCP can accept.
    #[test]
    fn accepted_transfer_syntaxes_are_documented() {
        let statement = include_str!("../../conformance/README.md");
        let missing: Vec<String> = TransferSyntaxRegistry
            .iter()
            .filter(|ts| !ts.is_unsupported())
            .map(|ts| ts.uid().trim_end_matches('\0').to_string())
            .filter(|uid| !statement.contains(&format!("| {uid} |")))
            .collect();
        assert!(
            missing.is_empty(),
            "not in conformance/README.md: {missing:?}"
        );
    }

    /// And every Storage SOP class is in its Appendix A.
    #[test]
    fn storage_sop_classes_are_documented() {
        let appendix = include_str!("../../conformance/storage-sop-classes.md");
        for (uid, _) in crate::dicom::storage_classes::STORAGE_SOP_CLASSES {
            assert!(
                appendix.contains(&format!("| {uid} |")),
                "{uid} missing from Appendix A"
            );
        }
    }
}
