//! The object store: original Part-10 objects under the keys of `keys.rs`.
//! A local directory (the embedded default) or any S3-compatible server,
//! both behind `object_store` for reads. Writes are durable before they return.
//!
//! Local writes do not go through `LocalFileSystem::put`: that needs the whole
//! object in memory (or copies it once more through a multipart upload).
//! Instead ingest spools into `<root>/.spool/`, on the same file system, and
//! `Placer::place` fsyncs, renames into place and fsyncs the directory — the same
//! protocol `LocalFileSystem::with_fsync(true)` uses, without the extra copy.

pub mod keys;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, ObjectMeta, ObjectStore, ObjectStoreExt, RetryConfig, WriteMultipart,
};
use tokio::io::AsyncReadExt;

use crate::config::StorageConfig;

/// Objects at most this large are uploaded to S3 in one PUT.
const SINGLE_PUT_MAX: u64 = 8 << 20;
/// Part size of multipart uploads; memory per upload is about twice this.
const MULTIPART_CHUNK: usize = 8 << 20;
/// Chunk size of streamed reads (WADO-RS bodies).
const READ_CHUNK: usize = 1 << 20;
/// Objects (or ranges) up to this size are read in one call.
const WHOLE_READ_MAX: u64 = 8 << 20;
/// Name of the spool directory inside a local store.
const SPOOL_DIR: &str = ".spool";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object store error: {0}")]
    Backend(#[from] object_store::Error),
    #[error("local store I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid storage configuration: {0}")]
    Config(String),
}

impl StoreError {
    /// As an I/O error whose kind still tells a missing object.
    pub fn into_io(self) -> std::io::Error {
        match self {
            StoreError::Io(e) => e,
            StoreError::Backend(e @ object_store::Error::NotFound { .. }) => {
                std::io::Error::new(std::io::ErrorKind::NotFound, e)
            }
            other => std::io::Error::other(other),
        }
    }
}

/// Removes a file when dropped, unless its path was taken out.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A local object opened for reading.
enum Opened {
    /// Read completely already.
    Whole(Bytes),
    /// To be streamed.
    Stream(std::fs::File),
}

enum Backend {
    Local { root: PathBuf },
    S3,
}

/// Handle to the configured object store.
pub struct Store {
    objects: Arc<dyn ObjectStore>,
    backend: Backend,
    /// This process's own folder in the spool (see `Spool::claim`).
    spool_dir: PathBuf,
    /// Held while the process runs: its lock tells other processes sharing
    /// the spool that the folder is in use.
    _spool_lock: SpoolLock,
    description: String,
    /// Local store: directories whose own entry is known to be on the device.
    durable_dirs: Arc<DurableDirs>,
    /// Keys this process is placing or deleting.
    keys: Arc<KeysInUse>,
}

/// Directories (of a local store) whose entry in their parent this process
/// has flushed: an object placed below them needs no flush above them. A
/// directory that merely exists may have been created by a concurrent store
/// (or before a crash) and never flushed, so existing is not enough.
#[derive(Debug, Default)]
pub struct DurableDirs(std::sync::Mutex<std::collections::HashSet<PathBuf>>);

/// Most directories remembered; forgetting costs only a few extra flushes.
const DURABLE_DIRS_KEPT: usize = 65_536;

impl DurableDirs {
    fn contains(&self, dir: &Path) -> bool {
        self.0.lock().expect("durable dirs lock").contains(dir)
    }

    fn add(&self, dirs: Vec<PathBuf>) {
        let mut known = self.0.lock().expect("durable dirs lock");
        if known.len() + dirs.len() > DURABLE_DIRS_KEPT {
            known.clear();
        }
        known.extend(dirs);
    }
}

impl Store {
    /// Open the store named by `[storage]`, creating a local root if needed.
    pub async fn open(cfg: &StorageConfig) -> Result<Self, StoreError> {
        if let Some(dir) = cfg.url.strip_prefix("file://") {
            let root = PathBuf::from(dir);
            std::fs::create_dir_all(root.join(SPOOL_DIR))?;
            let root = root.canonicalize()?;
            let objects = LocalFileSystem::new_with_prefix(&root)?.with_fsync(true);
            let (spool_dir, lock) = claim_spool(&root.join(SPOOL_DIR))?;
            return Ok(Self {
                objects: Arc::new(objects),
                spool_dir,
                _spool_lock: lock,
                description: format!("file://{}", root.display()),
                durable_dirs: Arc::default(),
                keys: Arc::default(),
                backend: Backend::Local { root },
            });
        }
        let Some(rest) = cfg.url.strip_prefix("s3://") else {
            return Err(StoreError::Config(format!(
                "unsupported storage url {}",
                cfg.url
            )));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StoreError::Config("storage.url names no bucket".into()));
        }
        // The default 30 s timeout covers the whole body: far too short for a
        // large whole-slide image; bound connect and idle reads instead.
        let client = ClientOptions::new()
            .with_timeout_disabled()
            .with_connect_timeout(Duration::from_secs(5))
            .with_read_timeout(Duration::from_secs(60))
            .with_allow_http(cfg.allow_http);
        // A sender waits for our answer: give up after a few quick retries
        // (A700, the sender retries later) rather than object_store's default
        // of ten retries over three minutes.
        let retry = RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(15),
            ..RetryConfig::default()
        };
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(cfg.region.clone().unwrap_or_else(|| "us-east-1".into()))
            .with_client_options(client)
            .with_retry(retry)
            .with_virtual_hosted_style_request(false);
        if let Some(e) = &cfg.endpoint {
            b = b.with_endpoint(e);
        }
        if let Some(k) = &cfg.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(s) = &cfg.secret_access_key {
            b = b.with_secret_access_key(s);
        }
        let s3 = b.build()?;
        let objects: Arc<dyn ObjectStore> = if prefix.trim_matches('/').is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(
                s3,
                prefix.trim_matches('/'),
            ))
        };
        let spool_dir = cfg
            .spool_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("tsunagu-spool"));
        std::fs::create_dir_all(&spool_dir)?;
        let (spool_dir, lock) = claim_spool(&spool_dir)?;
        Ok(Self {
            objects,
            backend: Backend::S3,
            spool_dir,
            _spool_lock: lock,
            description: format!("s3://{bucket}/{prefix}"),
            durable_dirs: Arc::default(),
            keys: Arc::default(),
        })
    }

    /// Where ingest writes objects while they arrive.
    pub fn spool_dir(&self) -> &Path {
        &self.spool_dir
    }

    /// Human-readable location, for logs.
    pub fn describe(&self) -> &str {
        &self.description
    }

    /// What the spool worker uses to turn a complete spool file into an
    /// object from its blocking thread (see `Placer`).
    pub fn placer(&self) -> Placer {
        Placer {
            local_root: match &self.backend {
                Backend::Local { root } => Some(root.clone()),
                Backend::S3 => None,
            },
            durable_dirs: self.durable_dirs.clone(),
            keys: self.keys.clone(),
        }
    }

    /// Delete `key`, a copy the index no longer names (superseded, or
    /// refused), unless a store of this process is placing the same bytes
    /// at it: `still_named` is asked once placing it is barred, so that a
    /// store that placed and indexed it in the meantime is seen; `deleted`
    /// runs after the deletion, still barred (no store of the same bytes can
    /// come in between).
    pub async fn delete_unless_in_use<N, NF, D, DF, E>(
        &self,
        key: &str,
        still_named: N,
        deleted: D,
    ) -> Result<Unused, E>
    where
        N: FnOnce() -> NF,
        NF: std::future::Future<Output = Result<bool, E>>,
        D: FnOnce() -> DF,
        DF: std::future::Future<Output = Result<(), E>>,
        E: From<StoreError>,
    {
        let Some(_barred) = self.keys.bar(key) else {
            return Ok(Unused::InUse);
        };
        if still_named().await? {
            return Ok(Unused::Named);
        }
        self.delete(key).await?;
        deleted().await?;
        Ok(Unused::Deleted)
    }

    /// Finish what `Placer::place` began: upload to S3 (the spool file is
    /// removed afterwards), or flush a renamed local object.
    pub async fn complete(&self, key: &str, placed: Placed) -> Result<(), StoreError> {
        match placed {
            Placed::Stored => Ok(()),
            Placed::Renamed(flush) => off_runtime(move || flush.run()).await,
            Placed::ToUpload(spooled) => {
                let r = self.upload(key, &spooled.0).await;
                let _ = tokio::fs::remove_file(&spooled.0).await;
                r
            }
        }
    }

    async fn upload(&self, key: &str, file: &Path) -> Result<(), StoreError> {
        let path = ObjectPath::from(key);
        let mut f = tokio::fs::File::open(file).await?;
        let size = f.metadata().await?.len();
        if size <= SINGLE_PUT_MAX {
            let mut buf = Vec::with_capacity(size as usize);
            f.read_to_end(&mut buf).await?;
            self.objects.put(&path, Bytes::from(buf).into()).await?;
            return Ok(());
        }
        let upload = self.objects.put_multipart(&path).await?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, MULTIPART_CHUNK);
        let mut buf = vec![0u8; 1 << 20];
        let sent: Result<(), StoreError> = async {
            loop {
                let n = f.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                w.wait_for_capacity(2).await?;
                w.write(&buf[..n]);
            }
        }
        .await;
        if let Err(e) = sent {
            // Dropping the writer would leave the upload's parts on the
            // server (object_store aborts only when asked).
            if let Err(a) = w.abort().await {
                tracing::warn!(error = %a, key, "an interrupted multipart upload could not be aborted");
            }
            return Err(e);
        }
        w.finish().await?;
        Ok(())
    }

    /// Make an object already at its key durable (a no-op on S3, where a
    /// completed PUT is).
    pub async fn flush_existing(&self, key: &str) -> Result<(), StoreError> {
        let Backend::Local { root } = &self.backend else {
            return Ok(());
        };
        let (root, key) = (root.clone(), key.to_string());
        off_runtime(move || Flush::of_existing(&root, &key)?.run()).await
    }

    /// Remove an object (a superseded version). Missing is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.objects.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every stored original object (for `reindex`).
    pub fn list_instances(&self) -> BoxStream<'_, Result<ObjectMeta, StoreError>> {
        self.list_under(keys::INSTANCES_PREFIX)
    }

    /// Every object whose key starts with the folder `prefix`.
    pub fn list_under(&self, prefix: &str) -> BoxStream<'_, Result<ObjectMeta, StoreError>> {
        let prefix = ObjectPath::from(prefix.trim_end_matches('/'));
        self.objects
            .list(Some(&prefix))
            .map(|r| r.map_err(StoreError::from))
            .boxed()
    }

    /// A local path to read `key` from: the object itself for a local store,
    /// else a spooled download that the caller removes.
    pub async fn fetch_to_path(&self, key: &str) -> Result<(PathBuf, bool), StoreError> {
        if let Backend::Local { root } = &self.backend {
            return Ok((root.join(key), false));
        }
        let dest = self
            .spool_dir
            .join(format!("fetch-{}", uuid::Uuid::new_v4()));
        // Half a download is of no use to anyone, also when the request that
        // wanted it goes away meanwhile (this future is then dropped).
        let mut partial = RemoveOnDrop(Some(dest.clone()));
        let fetched: Result<(), StoreError> = async {
            let mut out = tokio::fs::File::create(&dest).await?;
            let mut stream = self
                .objects
                .get(&ObjectPath::from(key))
                .await?
                .into_stream();
            while let Some(chunk) = stream.next().await {
                tokio::io::AsyncWriteExt::write_all(&mut out, &chunk?).await?;
            }
            // A tokio file completes its last write in the background: wait
            // for it before anyone reads the file.
            tokio::io::AsyncWriteExt::flush(&mut out).await?;
            Ok(())
        }
        .await;
        fetched?;
        partial.0 = None;
        Ok((dest, true))
    }

    /// Run blocking `work` on a local path of `key` (`fetch_to_path`), off
    /// the async threads; a download is removed afterwards. The inner error
    /// is `work`'s panic.
    pub async fn on_local_copy<T: Send + 'static>(
        &self,
        key: &str,
        work: impl FnOnce(&Path) -> T + Send + 'static,
    ) -> Result<Result<T, tokio::task::JoinError>, StoreError> {
        let (path, temporary) = self.fetch_to_path(key).await?;
        let p = path.clone();
        let done = tokio::task::spawn_blocking(move || work(&p)).await;
        if temporary {
            let _ = tokio::fs::remove_file(&path).await;
        }
        Ok(done)
    }

    /// Stream `key`, or the byte `range` of it, in large chunks. Errors that
    /// can be known before the first byte (a missing object) come here, not
    /// in the stream, so an HTTP answer can still turn into an error status.
    pub async fn read(
        &self,
        key: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<BoxStream<'static, Result<Bytes, StoreError>>, StoreError> {
        if let Backend::Local { root } = &self.backend {
            let path = root.join(key);
            // Objects of a few MiB (nearly every image) are read in one
            // blocking call: one hand-off to the blocking pool instead of
            // one per chunk. Larger ones stream in chunks.
            let (file, len) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
                use std::io::{Read, Seek};
                let mut f = std::fs::File::open(path)?;
                let len = match &range {
                    Some(r) => {
                        f.seek(std::io::SeekFrom::Start(r.start))?;
                        r.end - r.start
                    }
                    None => f.metadata()?.len(),
                };
                if len <= WHOLE_READ_MAX {
                    let mut buf = Vec::with_capacity(len as usize);
                    (&mut f).take(len).read_to_end(&mut buf)?;
                    return Ok((Opened::Whole(Bytes::from(buf)), len));
                }
                Ok((Opened::Stream(f), len))
            })
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
            return Ok(match file {
                Opened::Whole(bytes) => futures::stream::once(async move { Ok(bytes) }).boxed(),
                Opened::Stream(f) => tokio_util::io::ReaderStream::with_capacity(
                    tokio::fs::File::from_std(f).take(len),
                    READ_CHUNK,
                )
                .map(|r| r.map_err(StoreError::from))
                .boxed(),
            });
        }
        let opts = object_store::GetOptions {
            range: range.map(object_store::GetRange::from),
            ..Default::default()
        };
        let got = self.objects.get_opts(&ObjectPath::from(key), opts).await?;
        Ok(got
            .into_stream()
            .map(|r| r.map_err(StoreError::from))
            .boxed())
    }

    /// `key` opened for reading several ranges (the frames of one answer):
    /// a local object is opened once, and its ranges are read from that
    /// file even if a replacement deletes the object meanwhile, so an answer
    /// under way is never cut short by it.
    pub async fn reader(&self, key: &str) -> Result<ObjectReader, StoreError> {
        if let Backend::Local { root } = &self.backend {
            let path = root.join(key);
            // Opening a file whose directory entries are cached needs no
            // device: done here, not on a blocking thread.
            let file = std::fs::File::open(path)?;
            return Ok(ObjectReader::Local(Arc::new(file)));
        }
        Ok(ObjectReader::Remote {
            objects: self.objects.clone(),
            key: ObjectPath::from(key),
        })
    }

    /// The bytes of `key` (small objects and tests).
    pub async fn get_bytes(&self, key: &str) -> Result<Bytes, StoreError> {
        Ok(self
            .objects
            .get(&ObjectPath::from(key))
            .await?
            .bytes()
            .await?)
    }

    /// Readiness: the store answers (a missing probe object is an answer).
    pub async fn check(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local { root } => {
                tokio::fs::metadata(root).await?;
                Ok(())
            }
            Backend::S3 => match self.objects.head(&ObjectPath::from("readyz-probe")).await {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e.into()),
            },
        }
    }
}

/// Turns a complete spool file into an object from the blocking spool
/// worker, so the fsyncs and the rename run on the thread that wrote the file.
#[derive(Debug, Clone)]
pub struct Placer {
    local_root: Option<PathBuf>,
    durable_dirs: Arc<DurableDirs>,
    keys: Arc<KeysInUse>,
}

impl Placer {
    /// Hold `key` while its object is placed and indexed: no deletion of a
    /// superseded or refused copy at the same key (the same bytes) runs
    /// meanwhile. Waits while one is running.
    pub fn hold(&self, key: &str) -> KeyHold {
        self.keys.hold(key)
    }

    /// Whether placing makes the spool file itself the stored object.
    pub fn is_local(&self) -> bool {
        self.local_root.is_some()
    }

    /// Local store: rename the complete file to `key` and hand back its
    /// flush (`Placed::Renamed`), which the caller runs while it indexes the
    /// object. A file already at the key is kept (the spool file removed)
    /// if `is_whole` finds it holds the same data set — it may be durable and
    /// acknowledged, this copy is not; one that does not (a crash's leftover,
    /// renamed but never flushed) is replaced the strict way. Where the file
    /// system cannot rename without replacing, the strict way too: fsync,
    /// rename, fsync the directory (`Placed::Stored`). S3: nothing yet; the
    /// upload follows.
    pub fn place(
        &self,
        file: std::fs::File,
        path: &Path,
        key: &str,
        is_whole: impl FnOnce(&Path) -> bool,
    ) -> std::io::Result<Placed> {
        let Some(root) = &self.local_root else {
            return Ok(Placed::ToUpload(Spooled(path.to_path_buf())));
        };
        let dest = root.join(key);
        create_parents(&dest)?;
        let flush = |file| Flush::new(file, root, &dest, &self.durable_dirs);
        let file = match rename_noreplace(path, &dest) {
            Ok(()) => file,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && is_whole(&dest) => {
                // Flushing it again costs nothing if it is durable already.
                drop(file);
                std::fs::remove_file(path)?;
                std::fs::File::open(&dest)?
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::AlreadyExists
                    || matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL | libc::ENOSYS | libc::EPERM)
                    ) =>
            {
                file.sync_all()?;
                std::fs::rename(path, &dest)?;
                flush(None).run()?;
                return Ok(Placed::Stored);
            }
            Err(e) => return Err(e),
        };
        Ok(Placed::Renamed(flush(Some(file))))
    }
}

/// An object opened by `Store::reader`.
#[derive(Clone)]
pub enum ObjectReader {
    Local(Arc<std::fs::File>),
    Remote {
        objects: Arc<dyn ObjectStore>,
        key: ObjectPath,
    },
}

impl ObjectReader {
    /// The bytes of each `(offset, length)` range, in order (a frame's
    /// fragments).
    pub async fn read_ranges(&self, ranges: &[(u64, u64)]) -> Result<Vec<Bytes>, StoreError> {
        let mut out = Vec::with_capacity(ranges.len());
        for &(offset, len) in ranges {
            out.push(self.read_range(offset..offset + len).await?);
        }
        Ok(out)
    }

    /// The bytes of `range`; an error if the object ends before it does.
    pub async fn read_range(&self, range: std::ops::Range<u64>) -> Result<Bytes, StoreError> {
        let file = match self {
            ObjectReader::Local(file) => file.clone(),
            ObjectReader::Remote { objects, key } => {
                // object_store cuts a range running past the end short, with
                // no error.
                let want = range.end.saturating_sub(range.start);
                let bytes = objects.get_range(key, range).await?;
                if bytes.len() as u64 != want {
                    return Err(StoreError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the object ends after {} of {want} bytes", bytes.len()),
                    )));
                }
                return Ok(bytes);
            }
        };
        // A frame a viewer asks for is usually in the page cache: read it
        // here rather than hand it to a blocking thread and back (two
        // context switches, ~5 % of a frame request).
        if let Ok(Some(bytes)) = read_at(&file, &range, true) {
            return Ok(bytes);
        }
        tokio::task::spawn_blocking(move || -> Result<Bytes, StoreError> {
            Ok(read_at(&file, &range, false)?.expect("a blocking read always reads"))
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
    }
}

/// Bytes `range` of `file`, read into one buffer's spare capacity (a
/// zero-filled 512 KiB frame buffer cost 4 % of a frame request's server
/// time). `nowait`: only if the page cache holds all of it (`preadv2` with
/// `RWF_NOWAIT`), `Ok(None)` if any of it would need the device or the
/// file system cannot tell. An object ending before the range is an error.
fn read_at(
    file: &std::fs::File,
    range: &std::ops::Range<u64>,
    nowait: bool,
) -> std::io::Result<Option<Bytes>> {
    use std::os::fd::AsRawFd;
    let want = range.end.saturating_sub(range.start);
    let len = usize::try_from(want).map_err(std::io::Error::other)?;
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let at = i64::try_from(range.start + buf.len() as u64).map_err(std::io::Error::other)?;
        let spare = buf.spare_capacity_mut();
        // SAFETY: the kernel writes at most `spare.len()` bytes into the
        // vector's spare capacity, which outlives the call.
        let n = unsafe {
            pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                at,
                nowait,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                _ if nowait => return Ok(None),
                std::io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
        if n == 0 {
            if nowait {
                return Ok(None);
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the object ends after {} of {want} bytes", buf.len()),
            ));
        }
        // SAFETY: the kernel initialized the `n` bytes after the current length.
        unsafe { buf.set_len(buf.len() + n as usize) };
    }
    Ok(Some(Bytes::from(buf)))
}

/// `pread(2)`; with `nowait`, `preadv2(2)` with `RWF_NOWAIT` where glibc has
/// it (elsewhere a `nowait` read reads nothing).
///
/// # Safety
/// `buf` must be valid for writes of `len` bytes.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
unsafe fn pread(fd: i32, buf: *mut libc::c_void, len: usize, at: i64, nowait: bool) -> isize {
    let iov = libc::iovec {
        iov_base: buf,
        iov_len: len,
    };
    let flags = if nowait { libc::RWF_NOWAIT } else { 0 };
    // SAFETY: the caller's buffer, described by `iov`, outlives the call.
    unsafe { libc::preadv2(fd, &iov, 1, at, flags) }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
unsafe fn pread(fd: i32, buf: *mut libc::c_void, len: usize, at: i64, nowait: bool) -> isize {
    if nowait {
        return -1;
    }
    // SAFETY: the caller's buffer outlives the call.
    unsafe { libc::pread(fd, buf, len, at) }
}

/// How far `Placer::place` got.
#[derive(Debug)]
pub enum Placed {
    /// Durable at its key.
    Stored,
    /// At its key, complete but not yet durable: run the flush.
    Renamed(Flush),
    /// Still a spool file; `Store::complete` uploads it.
    ToUpload(Spooled),
}

/// What makes a renamed object durable: fsync of the file, of the directory
/// naming it, and of the parent of each directory on the way up whose own
/// entry is not known to be durable (created for it, or by a concurrent
/// store, or before a restart).
#[derive(Debug)]
pub struct Flush {
    file: Option<std::fs::File>,
    dirs: Vec<PathBuf>,
    /// Directories whose entries these fsyncs make durable, to remember.
    settles: Option<(Vec<PathBuf>, Arc<DurableDirs>)>,
}

impl Flush {
    fn new(
        file: Option<std::fs::File>,
        root: &Path,
        dest: &Path,
        durable: &Arc<DurableDirs>,
    ) -> Self {
        let mut dir = dest.parent().expect("keys have directories").to_path_buf();
        let mut dirs = vec![dir.clone()];
        let mut settles = Vec::new();
        while dir != root && dir.starts_with(root) && !durable.contains(&dir) {
            let Some(parent) = dir.parent().map(Path::to_path_buf) else {
                break;
            };
            dirs.push(parent.clone());
            settles.push(dir);
            dir = parent;
        }
        Self {
            file,
            dirs,
            settles: Some((settles, durable.clone())),
        }
    }

    /// The flush of an object found at `key` under `root` after a restart:
    /// the file and every directory from its own up to the root.
    pub fn of_existing(root: &Path, key: &str) -> std::io::Result<Self> {
        let dest = root.join(key);
        let file = std::fs::File::open(&dest)?;
        let dirs = dest
            .ancestors()
            .skip(1)
            .take_while(|d| d.starts_with(root))
            .map(Path::to_path_buf)
            .collect();
        Ok(Self {
            file: Some(file),
            dirs,
            settles: None,
        })
    }

    /// Blocking: the object is durable when this returns `Ok`.
    pub fn run(self) -> std::io::Result<()> {
        if let Some(f) = &self.file {
            f.sync_all()?;
        }
        for dir in &self.dirs {
            std::fs::File::open(dir)?.sync_all()?;
        }
        if let Some((settled, durable)) = self.settles {
            durable.add(settled);
        }
        Ok(())
    }
}

/// Run blocking file-system work (fsyncs) on the blocking pool.
async fn off_runtime(
    work: impl FnOnce() -> std::io::Result<()> + Send + 'static,
) -> Result<(), StoreError> {
    Ok(tokio::task::spawn_blocking(work)
        .await
        .map_err(std::io::Error::other)??)
}

/// Object keys a store of this process is placing and indexing (held), or
/// deleting (barred). Keys name content, so a store of the same bytes as a
/// copy being deleted places its object at that very key: without this, a
/// deletion decided before such a store was indexed could take its file.
/// (Processes sharing one store do not see each other's keys.)
#[derive(Debug, Default)]
pub struct KeysInUse {
    keys: std::sync::Mutex<std::collections::HashMap<String, KeyUse>>,
    changed: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct KeyUse {
    holds: usize,
    barred: bool,
}

impl KeysInUse {
    fn hold(self: &Arc<Self>, key: &str) -> KeyHold {
        let mut keys = self.keys.lock().expect("keys in use lock");
        while keys.get(key).is_some_and(|u| u.barred) {
            keys = self.changed.wait(keys).expect("keys in use lock");
        }
        keys.entry(key.to_string()).or_default().holds += 1;
        KeyHold {
            keys: self.clone(),
            key: key.to_string(),
        }
    }

    /// Bar `key` from being placed, unless it is held or barred already.
    fn bar(self: &Arc<Self>, key: &str) -> Option<KeyBar> {
        let mut keys = self.keys.lock().expect("keys in use lock");
        let u = keys.entry(key.to_string()).or_default();
        if u.barred || u.holds > 0 {
            return None;
        }
        u.barred = true;
        Some(KeyBar {
            keys: self.clone(),
            key: key.to_string(),
        })
    }

    fn release(&self, key: &str, hold: bool) {
        let mut keys = self.keys.lock().expect("keys in use lock");
        if let Some(u) = keys.get_mut(key) {
            if hold {
                u.holds = u.holds.saturating_sub(1);
            } else {
                u.barred = false;
            }
            if u.holds == 0 && !u.barred {
                keys.remove(key);
            }
        }
        drop(keys);
        self.changed.notify_all();
    }
}

/// What `Store::delete_unless_in_use` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unused {
    Deleted,
    /// An instance row names it again (the same bytes stored anew).
    Named,
    /// A store of this process is placing it: ask again once it is done.
    InUse,
}

/// A key held by a store while it is placed and indexed (`Placer::hold`).
#[derive(Debug)]
pub struct KeyHold {
    keys: Arc<KeysInUse>,
    key: String,
}

impl Drop for KeyHold {
    fn drop(&mut self) {
        self.keys.release(&self.key, true);
    }
}

/// A key barred from placing while its copy is deleted.
struct KeyBar {
    keys: Arc<KeysInUse>,
    key: String,
}

impl Drop for KeyBar {
    fn drop(&mut self) {
        self.keys.release(&self.key, false);
    }
}

/// A complete spool file waiting for its upload.
#[derive(Debug)]
pub struct Spooled(PathBuf);

/// The lock file in a process's spool folder.
const SPOOL_LOCK: &str = ".lock";
/// The lock file claims of spool folders take turns on.
const SPOOL_CLAIM: &str = ".claim";

/// The locks a process holds on its spool folder while it runs: on the
/// folder itself, which a temporary-files cleaner (`systemd-tmpfiles`, for
/// a spool under `/tmp`) leaves alone while it is locked and which no
/// cleaner can take away from under a running process, and on the `.lock`
/// file inside, which processes of earlier versions look at.
struct SpoolLock {
    _folder: Option<std::fs::File>,
    _file: std::fs::File,
}

/// Whether the spool folder `path` belongs to no running process: neither
/// the folder nor its `.lock` file is locked. A folder that cannot be
/// locked at all (a file system without directory locks) is judged by its
/// `.lock` file alone; a missing `.lock` file frees nothing by itself.
fn spool_folder_free(path: &Path) -> bool {
    let folder_free = match std::fs::File::open(path).map(|d| d.try_lock()) {
        Ok(Ok(())) => true,
        Ok(Err(std::fs::TryLockError::WouldBlock)) => return false,
        _ => false,
    };
    match std::fs::File::open(path.join(SPOOL_LOCK)) {
        Ok(f) => f.try_lock().is_ok(),
        Err(_) => folder_free,
    }
}

/// A spool folder of this process's own under `base`, locked while it runs;
/// first the leftovers of processes that no longer run (their folders'
/// locks are free) are removed: spool files were never acknowledged.
/// (Objects are only ever written by renaming a complete spool file, so
/// there are no partial files elsewhere to look for.) Folders of processes
/// that still run — a `serve` beside an `import` — are left alone.
fn claim_spool(base: &Path) -> std::io::Result<(PathBuf, SpoolLock)> {
    // Claims take turns, so that none sees another's folder before its lock.
    let turn = std::fs::File::create(base.join(SPOOL_CLAIM))?;
    turn.lock()?;
    for e in std::fs::read_dir(base)?.flatten() {
        let path = e.path();
        if !path.is_dir() {
            // A spool file of an earlier layout (one folder for all).
            if e.file_name() != SPOOL_CLAIM {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        if spool_folder_free(&path) {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
    let own = base.join(uuid::Uuid::new_v4().simple().to_string());
    std::fs::create_dir_all(&own)?;
    let folder = std::fs::File::open(&own).ok().filter(|d| d.lock().is_ok());
    let file = std::fs::File::create(own.join(SPOOL_LOCK))?;
    file.lock()?;
    drop(turn);
    Ok((
        own,
        SpoolLock {
            _folder: folder,
            _file: file,
        },
    ))
}

/// Create the directories of `dest` that do not exist yet (their flush is
/// `Flush`'s).
fn create_parents(dest: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dest.parent().expect("keys have directories"))
}

/// `rename(2)` that fails with `AlreadyExists` instead of replacing `to`
/// (`RENAME_NOREPLACE`); `EINVAL` where the file system cannot do that.
#[cfg(target_os = "linux")]
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call; no memory of
    // ours is written.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn rename_noreplace(_from: &Path, _to: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from_raw_os_error(libc::EINVAL))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every directory up to one known durable is flushed, whether this
    /// store created it or found it (a concurrent store's, or one left by a
    /// crash); once flushed it is remembered.
    #[test]
    fn flush_climbs_to_a_durable_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let durable = Arc::new(DurableDirs::default());
        let place = |key: &str| {
            let dest = root.join(key);
            create_parents(&dest).unwrap();
            std::fs::write(&dest, b"x").unwrap();
            Flush::new(None, root, &dest, &durable)
        };
        let rel = |f: &Flush| -> Vec<String> {
            f.dirs
                .iter()
                .map(|d| d.strip_prefix(root).unwrap().display().to_string())
                .collect()
        };
        // Found existing but never flushed: flushed all the way up.
        std::fs::create_dir_all(root.join("a/b/c")).unwrap();
        let first = place("a/b/c/1");
        assert_eq!(rel(&first), ["a/b/c", "a/b", "a", ""]);
        first.run().unwrap();
        assert_eq!(rel(&place("a/b/c/2")), ["a/b/c"]);
        assert_eq!(rel(&place("a/b/d/3")), ["a/b/d", "a/b"]);
    }

    fn local_config(root: &Path) -> crate::config::StorageConfig {
        crate::config::StorageConfig {
            url: format!("file://{}", root.display()),
            ..Default::default()
        }
    }

    /// A store opened beside a running one (an `import` beside `serve`)
    /// leaves the other's spool files alone; once that one is gone, its
    /// leftovers go.
    #[tokio::test]
    async fn each_process_spools_in_its_own_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = local_config(tmp.path());
        let serving = Store::open(&cfg).await.unwrap();
        let arriving = serving.spool_dir().join("arriving");
        std::fs::write(&arriving, b"half an object").unwrap();
        // A cleaner of temporary files took the lock file: the folder's own
        // lock still says it is in use.
        std::fs::remove_file(serving.spool_dir().join(SPOOL_LOCK)).unwrap();
        let importing = Store::open(&cfg).await.unwrap();
        assert!(arriving.exists(), "a running store's spool file was swept");
        assert_ne!(importing.spool_dir(), serving.spool_dir());
        drop(serving);
        let _restarted = Store::open(&cfg).await.unwrap();
        assert!(!arriving.exists(), "a gone store's leftovers stay");
        assert!(importing.spool_dir().exists());
    }

    /// The frames of one answer come from the object as it was opened, even
    /// if a replacement deletes it meanwhile; a range past its end is an
    /// error, not a short answer.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_opened_object_outlives_its_deletion() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = local_config(tmp.path());
        let store = Store::open(&cfg).await.unwrap();
        let key = "instances/H/1/2/3.0.dcm";
        let path = tmp.path().join(key);
        create_parents(&path).unwrap();
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let object = store.reader(key).await.unwrap();
        assert_eq!(object.read_range(10..20).await.unwrap(), bytes[10..20]);
        store.delete(key).await.unwrap();
        assert!(!path.exists());
        assert_eq!(
            object.read_range(150_000..200_000).await.unwrap(),
            bytes[150_000..]
        );
        // The page cache may not hold it: the blocking read says the same.
        let err = object.read_range(199_990..200_010).await.unwrap_err();
        assert!(err.to_string().contains("ends after 10 of 20"), "{err}");
        assert!(store.reader(key).await.is_err(), "a deleted object opens");
    }

    /// A held key cannot be barred (its copy is being placed); a barred key
    /// is held only once the deletion is over; nothing is remembered after.
    #[test]
    fn a_key_is_held_or_barred_never_both() {
        let keys = Arc::new(KeysInUse::default());
        let hold = keys.hold("k");
        assert!(keys.bar("k").is_none(), "barred while held");
        drop(hold);
        let bar = keys.bar("k").expect("free once released");
        assert!(keys.bar("k").is_none(), "barred twice");
        let (tx, rx) = std::sync::mpsc::channel();
        let waiting = {
            let keys = keys.clone();
            std::thread::spawn(move || {
                let hold = keys.hold("k");
                tx.send(()).unwrap();
                drop(hold);
            })
        };
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "held while barred"
        );
        drop(bar);
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("held once the bar is gone");
        waiting.join().unwrap();
        assert!(keys.keys.lock().unwrap().is_empty());
    }
}
