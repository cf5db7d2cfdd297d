//! An object being received. The async side hands each data PDV to a worker
//! on the blocking pool, which writes it to the spool file, hashes it and
//! feeds it to the parser — all while the rest of the object is still on the
//! wire — and fsyncs the file at the end. Memory per object is bounded by
//! the channel (`SPOOL_CHUNKS` PDVs).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::IngestError;
use crate::dicom::dataset::{self, PixelLayout};
use crate::dicom::part10::FileMeta;
use crate::dicom::summary::InstanceSummary;
use crate::store::{Placed, Placer};

/// PDVs buffered between the network and the spool worker.
const SPOOL_CHUNKS: usize = 8;
/// Writeback is started for this much received data at a time: each start
/// is an I/O submission (a VM exit on this project's machine). Once per PDV
/// (128 KiB) cost a CT slice ~0.24 ms of the spool worker's time; once per
/// 512 KiB gave 3-8 % more slices per second (ad hoc A/B, benches/README.md).
const WRITE_BEHIND_MIN: u64 = 512 << 10;

/// A complete, checked object and where it now is.
pub struct Received {
    /// The data set as DICOM JSON text (serialized here, off the async threads).
    pub dataset_json: String,
    pub pixels: Option<PixelLayout>,
    pub summary: InstanceSummary,
    /// Its object key.
    pub key: String,
    /// SHA-256 of the data set bytes, hex.
    pub sha256: String,
    /// Size of the whole Part-10 file.
    pub size: u64,
    pub placed: Placed,
    /// The key held from before its placing until the store is done.
    pub hold: crate::store::KeyHold,
}

/// The async handle of an object being received. Dropping it before
/// `finish` discards the object (the file is removed).
pub struct Spool {
    path: PathBuf,
    meta: FileMeta,
    chunks: Option<mpsc::Sender<Bytes>>,
    /// Set by `complete` before the channel closes: a channel closed without
    /// it is a transfer cut off (abort, reset, timeout), never an object.
    ended: Arc<AtomicBool>,
    worker: Option<JoinHandle<Result<Received, IngestError>>>,
    armed: bool,
}

impl Spool {
    pub(super) fn start(
        path: PathBuf,
        header: Vec<u8>,
        meta: FileMeta,
        institution: String,
        study: Option<String>,
        placer: Placer,
    ) -> Self {
        let (tx, rx) = mpsc::channel(SPOOL_CHUNKS);
        let (p, m) = (path.clone(), meta.clone());
        let ended = Arc::new(AtomicBool::new(false));
        let end = ended.clone();
        let worker = tokio::task::spawn_blocking(move || {
            run_worker(
                &p,
                header,
                m,
                &institution,
                study.as_deref(),
                rx,
                &end,
                &placer,
            )
        });
        Self {
            path,
            meta,
            chunks: Some(tx),
            ended,
            worker: Some(worker),
            armed: true,
        }
    }

    /// Append received data set bytes.
    pub async fn write(&mut self, bytes: Bytes) -> Result<(), IngestError> {
        let tx = self.chunks.as_ref().expect("open until finish");
        if tx.send(bytes).await.is_err() {
            // The worker stopped early: only a write failure makes it stop.
            return Err(IngestError::Spool(std::io::Error::other(
                "spool worker stopped",
            )));
        }
        Ok(())
    }

    pub fn meta(&self) -> &FileMeta {
        &self.meta
    }

    /// End of data: wait for the worker's result.
    pub(super) async fn complete(&mut self) -> Result<Received, IngestError> {
        self.ended.store(true, Ordering::SeqCst);
        self.chunks.take();
        let worker = self.worker.take().expect("complete once");
        worker
            .await
            .map_err(|e| IngestError::Internal(e.to_string()))?
    }

    /// The file now belongs to the store (renamed or uploaded and removed).
    pub(super) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.chunks.take();
        let path = std::mem::take(&mut self.path);
        match (self.worker.take(), tokio::runtime::Handle::try_current()) {
            // Let the worker see the end of the channel and close the file
            // before it is removed.
            (Some(worker), Ok(rt)) => {
                rt.spawn(async move {
                    let _ = worker.await;
                    let _ = tokio::fs::remove_file(&path).await;
                });
            }
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// Write, hash and parse as the bytes come; then check the object, name its
/// key and place it (local store: durable at its key before this returns).
#[allow(clippy::too_many_arguments)]
fn run_worker(
    path: &Path,
    header: Vec<u8>,
    meta: FileMeta,
    institution: &str,
    study: Option<&str>,
    rx: mpsc::Receiver<Bytes>,
    ended: &AtomicBool,
    placer: &Placer,
) -> Result<Received, IngestError> {
    let mut file = File::create(path).map_err(IngestError::Spool)?;
    file.write_all(&header).map_err(IngestError::Spool)?;
    let offset = header.len() as u64;
    let mut tee = Tee {
        rx,
        file,
        hasher: Sha256::new(),
        chunk: Bytes::new(),
        at: 0,
        position: offset,
        write_error: None,
        write_behind: placer.is_local(),
        behind_from: 0,
    };
    let parsed = dataset::parse_stream(&mut tee, meta.clone(), offset, None);
    // Take in the rest (the parser may stop early on bad input) so the sender
    // never blocks and the digest and size cover everything received.
    let drained = std::io::copy(&mut tee, &mut std::io::sink());
    if let Some(e) = tee.write_error.take() {
        return Err(IngestError::Spool(e));
    }
    drained.map_err(IngestError::Spool)?;
    let size = tee.position;
    // Cut off between two elements, what arrived may still parse as whole:
    // only the sender's end of data makes it an object (else a later
    // reindex would adopt the fragment).
    if !ended.load(Ordering::SeqCst) {
        return Err(IngestError::Spool(std::io::Error::other(
            "the transfer ended before its last fragment",
        )));
    }
    let parsed = parsed?;
    parsed.check_complete(size)?;
    let sha256 = hex::encode(tee.hasher.finalize());
    let (summary, key) = super::identify(&parsed, &meta, institution, study, &sha256)?;
    let hold = placer.hold(&key);
    let placed = placer
        .place(tee.file, path, &key, |existing| {
            dataset::data_set_digest(existing).is_ok_and(|d| d == sha256)
        })
        .map_err(|e| IngestError::Store(e.into()))?;
    Ok(Received {
        dataset_json: serde_json::Value::Object(parsed.json).to_string(),
        pixels: parsed.pixels,
        summary,
        key,
        sha256,
        size,
        placed,
        hold,
    })
}

/// Reads the channel as one byte stream, writing and hashing each chunk as
/// it is taken. Seekable only to report its position, which is all the
/// lazy parser asks of it.
struct Tee {
    rx: mpsc::Receiver<Bytes>,
    file: File,
    hasher: Sha256,
    chunk: Bytes,
    at: usize,
    position: u64,
    write_error: Option<std::io::Error>,
    /// Start writing received data to the device as it arrives (the file
    /// will be fsynced), so that the fsync after the last one finds little left.
    write_behind: bool,
    /// Where the data not yet handed to writeback begins.
    behind_from: u64,
}

impl Read for Tee {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.rx.blocking_recv() {
                Some(c) => {
                    if self.write_error.is_none() {
                        // Everything before was consumed: the file ends here.
                        let start = self.position;
                        match self.file.write_all(&c) {
                            Ok(()) if self.write_behind => {
                                let end = start + c.len() as u64;
                                if end - self.behind_from >= WRITE_BEHIND_MIN {
                                    write_behind(
                                        &self.file,
                                        self.behind_from,
                                        end - self.behind_from,
                                    );
                                    self.behind_from = end;
                                }
                            }
                            Ok(()) => {}
                            Err(e) => self.write_error = Some(e),
                        }
                    }
                    self.hasher.update(&c);
                    self.chunk = c;
                    self.at = 0;
                }
                None => return Ok(0),
            }
            if self.write_error.is_some() {
                return Err(std::io::Error::other("spool write failed"));
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        self.position += n as u64;
        Ok(n)
    }
}

/// Ask the kernel to start writing `len` bytes at `offset` of `file` to the
/// device now, without waiting. Only a head start for the fsync that follows
/// (which alone makes the data durable): with it, the fsync of a 512 KiB CT
/// slice after its last PDV took 0.17 ms instead of 0.48 ms on this
/// project's machine.
#[cfg(target_os = "linux")]
fn write_behind(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a plain system call on an open descriptor this function
    // borrows; it reads no memory of ours. Failure only loses the head start.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn write_behind(_file: &File, _offset: u64, _len: u64) {}

impl Seek for Tee {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        match pos {
            SeekFrom::Current(0) => Ok(self.position),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "a streamed data set cannot seek",
            )),
        }
    }
}
