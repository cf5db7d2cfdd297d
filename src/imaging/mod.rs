//! Imaging work — decoding, windowing, scaling and encoding pictures — on a
//! bounded rayon pool of its own, never on the async runtime's threads
//! (DESIGN §3). A decoder may take tens of milliseconds and megabytes per
//! job: the pool's width bounds the CPU it takes from DICOM and DICOMweb
//! traffic, the permits bound the memory of jobs waiting for it.

pub mod cache;
pub mod render;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use tokio::sync::{Semaphore, oneshot};

/// Jobs admitted at once per pool thread (running or queued): each holds a
/// frame, its decoded pixels and the picture (a 2048² 16-bit frame ≈ 8 MiB
/// decoded, 12 MiB as RGB).
const JOBS_PER_THREAD: usize = 2;

/// The imaging pool.
#[derive(Clone)]
pub struct Imaging {
    pool: Arc<rayon::ThreadPool>,
    permits: Arc<Semaphore>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImagingError {
    /// A decoder or encoder panicked on this input; the pool keeps serving.
    #[error("imaging job failed: {0}")]
    Panicked(String),
    #[error("the imaging pool is shut down")]
    Closed,
    #[error("every imaging place stayed taken for {}s", PERMIT_WAIT.as_secs())]
    Busy,
}

/// One admitted job's place (see `Imaging::permit`).
pub struct Permit(tokio::sync::OwnedSemaphorePermit);

/// How long a request waits for a place before it is answered 503.
const PERMIT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Imaging {
    /// A pool of `threads` (at least one).
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("imaging-{i}"))
            .build()
            .expect("a rayon pool with named threads starts");
        Self {
            pool: Arc::new(pool),
            permits: Arc::new(Semaphore::new(threads * JOBS_PER_THREAD)),
        }
    }

    /// One thread fewer than the machine has (at least one): DICOM ingest
    /// and the web keep a core while pictures are made.
    pub fn for_this_machine() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::new(cores.saturating_sub(1))
    }

    /// A place for one job, taken before its input is read so that waiting
    /// jobs hold no pixels; `Busy` after `PERMIT_WAIT` (counted as a limit
    /// reached, whichever request waited).
    pub async fn permit(&self) -> Result<Permit, ImagingError> {
        match tokio::time::timeout(PERMIT_WAIT, self.permits.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(Permit(p)),
            Ok(Err(_)) => Err(ImagingError::Closed),
            Err(_) => {
                metrics::counter!(crate::telemetry::LIMIT_REACHED, "limit" => "imaging")
                    .increment(1);
                Err(ImagingError::Busy)
            }
        }
    }

    /// Run `job` on the pool in the place `permit` holds. The codecs inside
    /// use the current rayon pool — this one — for their own parallelism.
    pub async fn run_with<T: Send + 'static>(
        &self,
        Permit(permit): Permit,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ImagingError> {
        let (tx, rx) = oneshot::channel();
        self.pool.spawn(move || {
            // rayon aborts the process on a panic in a spawned job: a codec
            // meeting a malformed stream must cost one answer, not the server.
            let out = std::panic::catch_unwind(AssertUnwindSafe(job));
            drop(permit);
            let _ = tx.send(out);
        });
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(panic)) => Err(ImagingError::Panicked(panic_message(&panic))),
            Err(_) => Err(ImagingError::Closed),
        }
    }
}

/// What a caught panic said.
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_job_is_an_error_and_the_pool_goes_on() {
        let imaging = Imaging::new(1);
        let place = imaging.permit().await.unwrap();
        let failed = imaging
            .run_with(place, || -> u32 { panic!("bad stream") })
            .await;
        assert!(matches!(failed, Err(ImagingError::Panicked(m)) if m == "bad stream"));
        let place = imaging.permit().await.unwrap();
        assert_eq!(imaging.run_with(place, || 7).await.unwrap(), 7);
        // The failed job gave its permit back.
        assert_eq!(imaging.permits.available_permits(), JOBS_PER_THREAD);
    }
}
