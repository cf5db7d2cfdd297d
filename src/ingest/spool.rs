//! An object being received. The async side hands each data PDV to a worker
//! on the blocking pool, which writes it to the spool file, hashes it and
//! feeds it to the parser — all while the rest of the object is still on the
//! wire — and fsyncs the file at the end. Memory per object is bounded by
//! the channel (`SPOOL_CHUNKS` PDVs).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::IngestError;
use crate::dicom::dataset::{self, DatasetError, ParsedObject};
use crate::dicom::part10::FileMeta;
use crate::store::{Sealed, Sealer};

/// PDVs buffered between the network and the spool worker.
const SPOOL_CHUNKS: usize = 8;

/// What the worker learned about a complete object.
pub struct Received {
    pub parsed: Result<ParsedObject, DatasetError>,
    /// SHA-256 of the data set bytes.
    pub digest: [u8; 32],
    /// Size of the whole Part-10 file.
    pub size: u64,
    pub sealed: Sealed,
}

/// The async handle of an object being received. Dropping it before
/// `finish` discards the object (the file is removed).
pub struct Spool {
    path: PathBuf,
    meta: FileMeta,
    chunks: Option<mpsc::Sender<Vec<u8>>>,
    worker: Option<JoinHandle<std::io::Result<Received>>>,
    armed: bool,
}

impl Spool {
    pub(super) fn start(path: PathBuf, header: Vec<u8>, meta: FileMeta, sealer: Sealer) -> Self {
        let (tx, rx) = mpsc::channel(SPOOL_CHUNKS);
        let (p, m) = (path.clone(), meta.clone());
        let worker = tokio::task::spawn_blocking(move || run_worker(&p, header, m, rx, sealer));
        Self {
            path,
            meta,
            chunks: Some(tx),
            worker: Some(worker),
            armed: true,
        }
    }

    /// Append received data set bytes.
    pub async fn write(&mut self, bytes: Vec<u8>) -> Result<(), IngestError> {
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

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// End of data: wait for the worker's result.
    pub(super) async fn complete(&mut self) -> Result<Received, IngestError> {
        self.chunks.take();
        let worker = self.worker.take().expect("complete once");
        worker
            .await
            .map_err(|e| IngestError::Internal(e.to_string()))?
            .map_err(IngestError::Spool)
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
        match self.worker.take() {
            // Let the worker see the end of the channel and close the file
            // before it is removed.
            Some(worker) => {
                tokio::spawn(async move {
                    let _ = worker.await;
                    let _ = tokio::fs::remove_file(&path).await;
                });
            }
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

fn run_worker(
    path: &Path,
    header: Vec<u8>,
    meta: FileMeta,
    rx: mpsc::Receiver<Vec<u8>>,
    sealer: Sealer,
) -> std::io::Result<Received> {
    let mut file = File::create(path)?;
    file.write_all(&header)?;
    let offset = header.len() as u64;
    let mut tee = Tee {
        rx,
        file,
        hasher: Sha256::new(),
        chunk: Vec::new(),
        at: 0,
        position: offset,
        write_error: None,
    };
    let mut parsed = dataset::parse_stream(&mut tee, meta, offset, None);
    // Take in the rest (the parser may stop early on bad input) so the sender
    // never blocks and the digest and size cover everything received.
    std::io::copy(&mut tee, &mut std::io::sink())?;
    if let Some(e) = tee.write_error.take() {
        return Err(e);
    }
    let size = tee.position;
    if let Ok(p) = &parsed
        && let Err(e) = p.check_complete(size)
    {
        parsed = Err(e);
    }
    let digest = tee.hasher.finalize().into();
    let sealed = sealer.seal(tee.file, path)?;
    Ok(Received {
        parsed,
        digest,
        size,
        sealed,
    })
}

/// Reads the channel as one byte stream, writing and hashing each chunk as
/// it is taken. Seekable only to report its position, which is all the
/// lazy parser asks of it.
struct Tee {
    rx: mpsc::Receiver<Vec<u8>>,
    file: File,
    hasher: Sha256,
    chunk: Vec<u8>,
    at: usize,
    position: u64,
    write_error: Option<std::io::Error>,
}

impl Read for Tee {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.rx.blocking_recv() {
                Some(c) => {
                    if self.write_error.is_none()
                        && let Err(e) = self.file.write_all(&c)
                    {
                        self.write_error = Some(e);
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
