//! `Hub`: the few shared handles, and `serve()` which wires the DICOM and
//! HTTP listeners together and owns shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::access::Institutions;
use crate::config::Config;
use crate::dicom::dataset;
use crate::dicom::summary::InstanceSummary;
use crate::dimse::{self, DimseContext};
use crate::index::{Index, IndexEntry, IndexError};
use crate::ingest::Ingest;
use crate::store::keys::InstanceKey;
use crate::store::{Store, StoreError};
use crate::{telemetry, web};

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
}

/// A running server: its bound addresses and the switch that stops it.
pub struct Running {
    pub dicom_addr: SocketAddr,
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
        let ingest = Ingest::new(store.clone(), index.clone());
        Ok(Arc::new(Self {
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
        let running_http = http
            .local_addr()
            .map_err(|e| HubError::Other(e.to_string()))?;
        let shutdown = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();

        let ctx = Arc::new(DimseContext {
            ae_title: s.ae_title.trim().to_string(),
            institutions: self.institutions.clone(),
            ingest: self.ingest.clone(),
            max_pdu_length: s.max_pdu_length,
            timeout: Duration::from_secs(s.association_timeout_secs),
        });
        tasks.spawn(dimse::serve(
            dicom,
            ctx,
            s.max_associations,
            shutdown.clone(),
        ));

        let app = web::router(self.clone());
        let stop = shutdown.clone();
        tasks.spawn(async move {
            use axum::serve::ListenerExt;
            let listener = http.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
            {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        });
        tracing::info!(
            dicom = %running_dicom, http = %running_http, ae_title = %s.ae_title,
            store = self.store.describe(), "tsunagu serving"
        );
        Ok(Running {
            dicom_addr: running_dicom,
            http_addr: running_http,
            shutdown,
            tasks,
        })
    }

    /// Rebuild the index from the object store alone. When several copies of
    /// one (institution, SOP Instance UID) exist — a crash between storing a
    /// replacement and deleting its predecessor — the newest one wins.
    pub async fn reindex(&self, progress: bool) -> Result<ReindexReport, HubError> {
        let mut objects = Vec::new();
        let mut listing = self.store.list_instances();
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            let key = meta.location.to_string();
            match InstanceKey::parse(&key) {
                Some(k) => objects.push((k, key, meta.last_modified, meta.size)),
                None => tracing::warn!(%key, "not an instance key; skipped"),
            }
        }
        drop(listing);
        // newest first within each (institution, sop)
        objects.sort_by(|a, b| {
            (&a.0.institution, &a.0.sop_uid, std::cmp::Reverse(a.2)).cmp(&(
                &b.0.institution,
                &b.0.sop_uid,
                std::cmp::Reverse(b.2),
            ))
        });
        objects.dedup_by(|b, a| a.0.institution == b.0.institution && a.0.sop_uid == b.0.sop_uid);
        self.index.clear().await?;
        let bar = if progress {
            indicatif::ProgressBar::new(objects.len() as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut report = ReindexReport::default();
        for (k, key, modified, size) in objects {
            bar.inc(1);
            match self.reindex_one(&k, &key, modified, size).await {
                Ok(()) => report.indexed += 1,
                Err(e) => {
                    tracing::warn!(%key, error = %e, "object not indexed");
                    report.failed.push((key, e));
                }
            }
        }
        bar.finish_and_clear();
        Ok(report)
    }

    async fn reindex_one(
        &self,
        k: &InstanceKey,
        key: &str,
        modified: chrono_like::Modified,
        size: u64,
    ) -> Result<(), String> {
        let (path, temporary) = self
            .store
            .fetch_to_path(key)
            .await
            .map_err(|e| e.to_string())?;
        let p = path.clone();
        let parsed = tokio::task::spawn_blocking(move || dataset::parse_file_hashed(&p))
            .await
            .map_err(|e| e.to_string())?
            .map(|(parsed, digest)| (parsed, hex::encode(digest)))
            .map_err(|e| e.to_string());
        if temporary {
            let _ = tokio::fs::remove_file(&path).await;
        }
        let (parsed, sha256) = parsed?;
        if !sha256.starts_with(&k.digest) {
            return Err("object content does not match the digest in its key".into());
        }
        let summary = InstanceSummary::from_parsed(&parsed).map_err(|e| e.to_string())?;
        let Some(inst) = self.institutions.by_code(&k.institution) else {
            return Err(format!("institution {} is not configured", k.institution));
        };
        let entry = IndexEntry {
            institution: k.institution.clone(),
            issuer: summary
                .issuer_of_patient_id
                .clone()
                .unwrap_or_else(|| inst.issuer_of_patient_id.clone()),
            transfer_syntax: parsed.meta.transfer_syntax.clone(),
            object_key: key.to_string(),
            size,
            sha256,
            sender_ae: parsed.meta.source_ae_title.clone(),
            received_at: chrono_like::rfc3339(modified),
            dataset_json: serde_json::Value::Object(parsed.json).to_string(),
            pixels: parsed.pixels,
            replaces: None,
            summary,
        };
        self.index.upsert(&entry).await.map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// object_store reports times as chrono values; keep that type out of the rest.
mod chrono_like {
    pub type Modified = chrono::DateTime<chrono::Utc>;
    pub fn rfc3339(t: Modified) -> String {
        t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    }
}

/// What a reindex did.
#[derive(Debug, Default)]
pub struct ReindexReport {
    pub indexed: u64,
    pub failed: Vec<(String, String)>,
}
