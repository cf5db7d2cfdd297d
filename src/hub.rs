//! `Hub`: the few shared handles, and `serve()` which wires the DICOM and
//! HTTP listeners together and owns shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::access::Institutions;
use crate::auth::{AuthError, Verifier};
use crate::config::Config;
use crate::dimse::{self, DimseContext};
use crate::index::{Index, IndexError};
use crate::ingest::reindex::ReindexReport;
use crate::ingest::{Ingest, IngestError};
use crate::store::{Store, StoreError};
use crate::{telemetry, web};

/// How often superseded copies left over are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("checking objects stored before an unclean stop: {0}")]
    Recovery(#[from] IngestError),
    #[error("{0}")]
    Other(String),
}

/// Shared handles.
pub struct Hub {
    pub config: Config,
    pub store: Arc<Store>,
    pub index: Index,
    pub institutions: Arc<Institutions>,
    pub ingest: Ingest,
    pub metrics: PrometheusHandle,
    pub verifier: Verifier,
    /// The audit trail's appender.
    pub audit: crate::audit::Auditor,
    /// "Now" for expiry and audit (tests set it).
    pub clock: Arc<crate::clock::Clock>,
    /// Decoding and encoding pictures (rendered and thumbnail resources).
    pub imaging: crate::imaging::Imaging,
    /// Pictures made before (rendered frames, thumbnails).
    pub pictures: crate::imaging::cache::Pictures,
    /// STOW-RS requests being stored (`dicomweb.stow_max_concurrent`).
    pub stow_slots: Arc<tokio::sync::Semaphore>,
    /// The HTTP port actually bound (known once `start` ran).
    pub http_port: std::sync::OnceLock<u16>,
}

/// A running server: its bound addresses and the switch that stops it.
pub struct Running {
    pub dicom_addr: SocketAddr,
    /// The DICOM TLS listener's address, when configured.
    pub dicom_tls_addr: Option<SocketAddr>,
    pub http_addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub tasks: tokio::task::JoinSet<()>,
}

impl Hub {
    /// Open store and index (running migrations).
    pub async fn open(config: Config) -> Result<Arc<Self>, HubError> {
        let metrics = telemetry::init_metrics();
        let store = Arc::new(Store::open(&config.storage).await?);
        let index = Index::connect(&config.index).await?;
        let institutions = Arc::new(Institutions::from_config(&config.institutions));
        let verifier = Verifier::from_config(&config.auth)?;
        let syslog = crate::audit::syslog::Forwarder::from_config(&config.audit)
            .map_err(|e| HubError::Other(e.to_string()))?;
        let chain_key = crate::audit::chain::ChainKey::from_config(&config.audit)
            .map_err(|e| HubError::Other(e.to_string()))?;
        crate::audit::chain::check_key(&index, chain_key.as_ref())
            .await
            .map_err(|e| HubError::Other(e.to_string()))?;
        let clock = Arc::new(crate::clock::Clock::default());
        let audit = crate::audit::Auditor::start(index.clone(), syslog, clock.clone(), chain_key);
        let ingest = Ingest::new(store.clone(), index.clone(), audit.clone());
        Ok(Arc::new(Self {
            audit,
            verifier,
            clock,
            http_port: std::sync::OnceLock::new(),
            imaging: crate::imaging::Imaging::for_this_machine(),
            pictures: Default::default(),
            stow_slots: Arc::new(tokio::sync::Semaphore::new(
                config.dicomweb.stow_max_concurrent,
            )),
            config,
            store,
            index,
            institutions,
            ingest,
            metrics,
        }))
    }

    /// Bind both listeners (port 0 picks a free port) and start serving.
    pub async fn start(self: &Arc<Self>) -> Result<Running, HubError> {
        let s = &self.config.server;
        if self.institutions.is_empty() {
            tracing::warn!("no [[institution]] configured: every association will be rejected");
        }
        // Before any request: objects a crash caught between their index
        // commit and their flush are checked (and undone if not whole).
        let recovered = self.ingest.recover_unconfirmed(&self.institutions).await?;
        if !recovered.rolled_back.is_empty() {
            tracing::warn!(
                confirmed = recovered.confirmed,
                rolled_back = ?recovered.rolled_back,
                restored = ?recovered.restored,
                "objects caught by a crash before they were durable were removed (never acknowledged)"
            );
        } else if recovered.confirmed > 0 {
            tracing::info!(
                confirmed = recovered.confirmed,
                "objects stored just before the last stop were checked: all whole"
            );
        }
        let dicom_addr = SocketAddr::new(s.bind, s.dicom_port);
        let http_addr = SocketAddr::new(s.bind, s.http_port);
        let dicom = TcpListener::bind(dicom_addr)
            .await
            .map_err(|source| HubError::Bind {
                addr: dicom_addr,
                source,
            })?;
        let http = TcpListener::bind(http_addr)
            .await
            .map_err(|source| HubError::Bind {
                addr: http_addr,
                source,
            })?;
        let running_dicom = dicom
            .local_addr()
            .map_err(|e| HubError::Other(e.to_string()))?;
        // DICOM over TLS: its material is read (and checked) before serving.
        let dicom_tls = match &s.tls {
            None => None,
            Some(t) => {
                let material =
                    dimse::tls::TlsMaterial::load(t).map_err(|e| HubError::Other(e.to_string()))?;
                let addr = SocketAddr::new(s.bind, t.port);
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| HubError::Bind { addr, source })?;
                Some((listener, Arc::new(material)))
            }
        };
        // HTTPS material too, before anything is spawned.
        let https = match &s.http_tls {
            Some(t) => {
                Some(web::https::server_config(t).map_err(|e| HubError::Other(e.to_string()))?)
            }
            None => None,
        };
        let running_dicom_tls = match &dicom_tls {
            Some((l, _)) => Some(l.local_addr().map_err(|e| HubError::Other(e.to_string()))?),
            None => None,
        };
        let running_http = http
            .local_addr()
            .map_err(|e| HubError::Other(e.to_string()))?;
        let _ = self.http_port.set(running_http.port());
        let shutdown = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();

        let ctx = Arc::new(DimseContext {
            ae_title: s.ae_title.trim().to_string(),
            institutions: self.institutions.clone(),
            ingest: self.ingest.clone(),
            audit: self.audit.clone(),
            refusals: Default::default(),
            max_pdu_length: s.max_pdu_length,
            timeout: Duration::from_secs(s.association_timeout_secs),
        });
        // Both limits (all associations, per peer) shared by both listeners.
        let slots = dimse::Slots::new(s.max_associations, s.max_associations_per_peer);
        if let Some((listener, material)) = dicom_tls {
            tasks.spawn(dimse::serve(
                listener,
                ctx.clone(),
                slots.clone(),
                Some(material),
                shutdown.clone(),
            ));
        }
        tasks.spawn(dimse::serve(dicom, ctx, slots, None, shutdown.clone()));

        // Superseded copies whose deletion was cut off (a stop, a crash, a
        // failing store): swept now and then, beside the stores.
        let hub = self.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            loop {
                let deleted = hub
                    .ingest
                    .sweep_superseded(crate::ingest::SUPERSEDED_SWEEP_AGE)
                    .await;
                if deleted > 0 {
                    tracing::info!(deleted, "superseded copies left over were deleted");
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(SWEEP_EVERY) => {}
                }
            }
        });

        let app = web::router(self.clone());
        let stop = shutdown.clone();
        match https {
            None => {
                tasks.spawn(async move {
                    use axum::serve::ListenerExt;
                    let listener = http.tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    let app = app.into_make_service_with_connect_info::<SocketAddr>();
                    if let Err(e) = axum::serve(listener, app)
                        .with_graceful_shutdown(async move { stop.cancelled().await })
                        .await
                    {
                        tracing::error!(error = %e, "HTTP server stopped");
                    }
                });
            }
            Some(config) => {
                let listener = web::https::TlsListener::start(http, config, shutdown.clone())
                    .map_err(|e| HubError::Other(e.to_string()))?;
                tasks.spawn(async move {
                    use axum::serve::ListenerExt;
                    // (tap_io: the peer address as ConnectInfo, as for TCP)
                    let listener = listener.tap_io(|_| {});
                    let app = app.into_make_service_with_connect_info::<SocketAddr>();
                    if let Err(e) = axum::serve(listener, app)
                        .with_graceful_shutdown(async move { stop.cancelled().await })
                        .await
                    {
                        tracing::error!(error = %e, "HTTPS server stopped");
                    }
                });
            }
        }
        tracing::info!(
            dicom = %running_dicom, dicom_tls = ?running_dicom_tls, http = %running_http, ae_title = %s.ae_title,
            store = self.store.describe(), "tsunagu serving"
        );
        Ok(Running {
            dicom_addr: running_dicom,
            dicom_tls_addr: running_dicom_tls,
            http_addr: running_http,
            shutdown,
            tasks,
        })
    }

    /// The records of consent (links, disclosures, grants).
    pub fn records(&self) -> crate::access::records::Records<'_> {
        crate::access::records::Records {
            index: &self.index,
            institutions: &self.institutions,
        }
    }

    /// Rebuild the index from the object store alone (see `ingest::reindex`).
    pub async fn reindex(&self, progress: bool) -> Result<ReindexReport, IngestError> {
        self.ingest.reindex(&self.institutions, progress).await
    }
}
