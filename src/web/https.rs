//! HTTPS for DICOMweb, the admin API and the operations routes: an axum
//! listener that hands over connections once their TLS handshake is done.
//! Handshakes run on tasks of their own (at most `HANDSHAKES` at once and
//! `HANDSHAKES_PER_PEER` from one address, each within `HANDSHAKE_TIMEOUT`),
//! so one slow client never holds up the rest.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::config::HttpTlsConfig;
use crate::listen::{PerPeer, next_connection};
use crate::tls::{TlsError, certificates, identity, private_key, provider, server_builder};

/// Handshakes in progress at once, in all and from one address: a peer
/// holding many half-open connections must not shut out the others.
const HANDSHAKES: usize = 1024;
const HANDSHAKES_PER_PEER: usize = 16;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server configuration of `cfg` (HTTP/1.1 over TLS 1.2/1.3).
pub fn server_config(cfg: &HttpTlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let chain = certificates("server.http_tls.certificate_file", &cfg.certificate_file)?;
    let key = private_key("server.http_tls.private_key_file", &cfg.private_key_file)?;
    let identity = identity(chain, key, &provider, "server.http_tls.private_key_file")?;
    let mut config = server_builder(provider)?
        .with_no_client_auth()
        .with_cert_resolver(identity);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Connections whose handshake completed.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accept on `listener` until `shutdown`, handshaking with `config`.
    pub fn start(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let handshakes = Arc::new(Semaphore::new(HANDSHAKES));
        let per_peer = PerPeer::new(HANDSHAKES_PER_PEER);
        tokio::spawn(async move {
            loop {
                let (socket, peer) = tokio::select! {
                    c = next_connection(&listener, &shutdown) => match c {
                        Some(c) => c,
                        None => return,
                    },
                    // The server stopped taking connections.
                    () = tx.closed() => return,
                };
                // Beyond the handshakes in progress a connection is closed.
                let (Ok(permit), Some(own)) = (
                    handshakes.clone().try_acquire_owned(),
                    per_peer.enter(peer.ip()),
                ) else {
                    metrics::counter!(crate::telemetry::LIMIT_REACHED, "limit" => "tls_handshakes")
                        .increment(1);
                    tracing::warn!(%peer, "too many TLS handshakes in progress; connection closed");
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let done =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await;
                    drop((permit, own));
                    match done {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accepting task ended (shutdown): serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
