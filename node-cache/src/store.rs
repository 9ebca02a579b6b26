//! The on-disk store: `<dir>/blobs/sha256/<hex>` holds complete blobs, `<dir>/tmp/` uploads in
//! progress, `<dir>/lock` is flock'ed by the one daemon using the directory.
//!
//! A blob reaches `blobs/` only by rename after its size and SHA-256 matched and the file was
//! fsync'd, so a partial blob is never served, whatever happens to the upload or the daemon.
//! The LRU order lives in the files' mtimes (set on every store and hit), so it survives
//! restarts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::protocol::parse_digest;

/// Limits of a store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Total bytes of complete blobs plus reservations of uploads in progress.
    pub max_bytes: u64,
    /// Largest single blob accepted.
    pub max_blob_bytes: u64,
    /// Uploads in progress at once; more are refused (503).
    pub max_concurrent_uploads: usize,
    /// How long a GET of a blob another guest is uploading (or is about to) waits for it.
    pub max_wait: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        let max_bytes = 10 << 30;
        StoreConfig {
            max_bytes,
            max_blob_bytes: max_bytes,
            max_concurrent_uploads: 4,
            max_wait: Duration::from_secs(90),
        }
    }
}

/// Counters and occupancy, served as JSON at `/v1/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// GETs of a present blob.
    pub hits: u64,
    /// GETs of an absent blob.
    pub misses: u64,
    /// PUTs answered 201 (stored) or 200 (already present).
    pub puts_ok: u64,
    /// PUTs answered 4xx/5xx.
    pub puts_rejected: u64,
    /// Blobs removed to make room.
    pub evictions: u64,
    /// Body bytes sent by GETs.
    pub bytes_served: u64,
    /// Complete blobs held.
    pub blobs: u64,
    /// Bytes of complete blobs held.
    pub bytes: u64,
    /// Uploads in progress.
    pub uploads_in_progress: u64,
    /// The configured `max_bytes`.
    pub max_bytes: u64,
}

/// Why an upload could not start.
#[derive(Debug, thiserror::Error)]
pub enum BeginError {
    #[error("an upload of this digest is in progress")]
    InProgress,
    #[error("blob of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("too many uploads in progress")]
    Busy,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Why an upload was discarded.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("size mismatch: received {got} bytes, Content-Length declared {want}")]
    SizeMismatch { got: u64, want: u64 },
    #[error("digest mismatch: body is sha256:{got}, URL names sha256:{want}")]
    DigestMismatch { got: String, want: String },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Result of [`Store::begin_upload`].
pub enum Begin {
    /// The blob is already stored (counted as a use).
    Present,
    /// Stream the body into it, then [`Upload::finish`].
    Upload(Box<Upload>),
}

struct Entry {
    size: u64,
    tick: u64,
}

#[derive(Default)]
struct Inner {
    blobs: HashMap<String, Entry>,
    lru: BTreeMap<u64, String>,
    tick: u64,
    total: u64,
    reserved: u64,
    uploading: HashSet<String>,
    /// Misses whose guest is expected to upload the blob next, until when.
    claims: HashMap<String, Instant>,
}

/// How long a miss holds back other GETs of the same blob for its guest's upload to begin:
/// a guest offers a blob right after its miss, so a few seconds is ample.
const CLAIM: Duration = Duration::from_secs(10);

impl Inner {
    fn touch(&mut self, hex: &str) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.blobs.get_mut(hex) {
            self.lru.remove(&e.tick);
            e.tick = tick;
            self.lru.insert(tick, hex.to_string());
        }
    }
    fn insert(&mut self, hex: &str, size: u64) {
        self.tick += 1;
        self.blobs.insert(
            hex.to_string(),
            Entry {
                size,
                tick: self.tick,
            },
        );
        self.lru.insert(self.tick, hex.to_string());
        self.total += size;
    }
    fn remove(&mut self, hex: &str) -> Option<u64> {
        let e = self.blobs.remove(hex)?;
        self.lru.remove(&e.tick);
        self.total -= e.size;
        Some(e.size)
    }
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    puts_ok: AtomicU64,
    puts_rejected: AtomicU64,
    evictions: AtomicU64,
    bytes_served: AtomicU64,
}

/// A content-addressed blob store with a size limit and LRU eviction.
pub struct Store {
    blobs_dir: PathBuf,
    tmp_dir: PathBuf,
    cfg: StoreConfig,
    inner: Mutex<Inner>,
    counters: Counters,
    next_tmp: AtomicU64,
    /// Woken when an upload begins, ends or is dropped.
    changed: tokio::sync::Notify,
    _lock: File,
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Store {
    /// Opens (creating) the store in `dir`: takes its lock, empties `tmp/`, drops files in
    /// `blobs/sha256/` whose names are not digests and rebuilds the index in mtime order,
    /// evicting down to `max_bytes` if the limit shrank. Blobs are not re-hashed here (too slow
    /// for gigabytes at every start, and every guest verifies what it reads anyway).
    pub fn open(dir: &Path, cfg: StoreConfig) -> io::Result<Arc<Store>> {
        let blobs_dir = dir.join("blobs/sha256");
        let tmp_dir = dir.join("tmp");
        fs::create_dir_all(&blobs_dir)?;
        let lock = File::create(dir.join("lock"))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |e| {
                io::Error::other(format!(
                    "{} is in use by another daemon: {e}",
                    dir.display()
                ))
            },
        )?;
        let _ = fs::remove_dir_all(&tmp_dir);
        fs::create_dir_all(&tmp_dir)?;
        let mut found = Vec::new();
        for ent in fs::read_dir(&blobs_dir)? {
            let ent = ent?;
            let name = ent.file_name().to_string_lossy().into_owned();
            let meta = ent.metadata()?;
            if !meta.is_file() || parse_digest(&format!("sha256:{name}")).is_none() {
                warn!(name, "removing stray entry from the blob directory");
                let _ = fs::remove_file(ent.path()).or_else(|_| fs::remove_dir_all(ent.path()));
                continue;
            }
            found.push((meta.modified()?, name, meta.len()));
        }
        found.sort();
        let mut inner = Inner::default();
        for (_, hex, size) in &found {
            inner.insert(hex, *size);
        }
        let store = Store {
            blobs_dir,
            tmp_dir,
            cfg,
            inner: Mutex::new(inner),
            counters: Counters::default(),
            next_tmp: AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
            _lock: lock,
        };
        {
            let mut inner = store.lock();
            store.evict_until(&mut inner, 0);
            info!(
                blobs = inner.blobs.len(),
                bytes = inner.total,
                "store opened"
            );
        }
        Ok(Arc::new(store))
    }

    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn blob_file(&self, hex: &str) -> PathBuf {
        self.blobs_dir.join(hex)
    }

    /// Evicts least-recently-used blobs until `total + reserved + extra <= max_bytes`.
    /// Readers streaming an evicted blob keep their open fd (unlink on Linux), so no reader is
    /// cut off.
    fn evict_until(&self, inner: &mut Inner, extra: u64) {
        while inner.total + inner.reserved + extra > self.cfg.max_bytes {
            let Some(hex) = inner.lru.values().next().cloned() else {
                break;
            };
            let size = inner.remove(&hex).unwrap_or(0);
            if let Err(e) = fs::remove_file(self.blob_file(&hex)) {
                warn!(digest = %format_args!("sha256:{hex}"), error = %e, "evict: unlink failed");
            }
            self.counters.evictions.fetch_add(1, Relaxed);
            info!(digest = %format_args!("sha256:{hex}"), size, "evicted blob");
        }
    }

    /// Size of a present blob (no use, no counter).
    pub fn size_of(&self, digest: &str) -> Option<u64> {
        let hex = parse_digest(digest)?;
        self.lock().blobs.get(hex).map(|e| e.size)
    }

    /// Opens a present blob for reading: a hit (refreshes its recency, in memory and in its
    /// mtime, best-effort) or a miss.
    pub fn open_blob(&self, digest: &str) -> Option<(File, u64)> {
        let hex = parse_digest(digest)?;
        let mut inner = self.lock();
        let Some(size) = inner.blobs.get(hex).map(|e| e.size) else {
            self.counters.misses.fetch_add(1, Relaxed);
            return None;
        };
        match File::open(self.blob_file(hex)) {
            Ok(f) => {
                inner.touch(hex);
                drop(inner);
                let _ = f.set_modified(SystemTime::now());
                self.counters.hits.fetch_add(1, Relaxed);
                Some((f, size))
            }
            Err(e) => {
                warn!(digest, error = %e, "indexed blob vanished");
                inner.remove(hex);
                self.counters.misses.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// Like [`Store::open_blob`], but a blob that another guest is uploading, or that a guest
    /// just missed (and so will upload next), is waited for (up to `max_wait`) rather than
    /// missed: guests starting together download each blob once. A miss claims the blob for
    /// its guest's upload for a few seconds.
    pub async fn open_or_wait(&self, digest: &str) -> Option<(File, u64)> {
        let hex = parse_digest(digest)?;
        let deadline = Instant::now() + self.cfg.max_wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let until = {
                let mut inner = self.lock();
                let now = Instant::now();
                if inner.blobs.contains_key(hex) || now >= deadline {
                    break;
                }
                if inner.uploading.contains(hex) {
                    deadline
                } else {
                    match inner.claims.get(hex) {
                        Some(&t) if t > now => t.min(deadline),
                        _ => {
                            inner.claims.retain(|_, t| *t > now);
                            inner.claims.insert(hex.to_string(), now + CLAIM);
                            break;
                        }
                    }
                }
            };
            let _ = tokio::time::timeout_at(until, notified).await;
        }
        self.open_blob(digest)
    }

    /// Checks a blob a guest reported as bad: hashes it and removes it only if its content
    /// does not match its digest, so no guest can evict a good blob this way. `None` when the
    /// blob is not held; otherwise whether it was removed.
    pub async fn verify_reported(&self, digest: &str) -> io::Result<Option<bool>> {
        let Some(hex) = parse_digest(digest).map(str::to_string) else {
            return Ok(None);
        };
        let Some(size) = self.lock().blobs.get(&hex).map(|e| e.size) else {
            return Ok(None);
        };
        let path = self.blob_file(&hex);
        let want = hex.clone();
        let intact = tokio::task::spawn_blocking(move || -> io::Result<bool> {
            let mut f = File::open(&path)?;
            let mut h = Sha256::new();
            let n = io::copy(&mut f, &mut h)?;
            Ok(n == size && hex::encode(h.finalize()) == want)
        })
        .await
        .map_err(io::Error::other)?;
        let intact = match intact {
            Ok(v) => v,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        if intact {
            info!(digest, "reported blob verified intact; kept");
            return Ok(Some(false));
        }
        let mut inner = self.lock();
        if inner.remove(&hex).is_some() {
            let _ = fs::remove_file(self.blob_file(&hex));
        }
        warn!(digest, "reported blob does not match its digest; removed");
        Ok(Some(true))
    }

    fn release_claim(&self, hex: &str) {
        self.lock().claims.remove(hex);
        self.changed.notify_waiters();
    }

    /// Starts an upload of `size` bytes, deciding from the declared size alone: present,
    /// in progress (409), too large (413) or too many uploads (503, also when the uploads in
    /// progress already reserve the whole limit). LRU blobs are evicted when it commits.
    pub fn begin_upload(self: &Arc<Self>, digest: &str, size: u64) -> Result<Begin, BeginError> {
        let hex = parse_digest(digest).ok_or_else(|| io::Error::other("invalid digest"))?;
        let mut inner = self.lock();
        if inner.blobs.contains_key(hex) {
            inner.touch(hex);
            drop(inner);
            if let Ok(f) = File::open(self.blob_file(hex)) {
                let _ = f.set_modified(SystemTime::now());
            }
            return Ok(Begin::Present);
        }
        if inner.uploading.contains(hex) {
            return Err(BeginError::InProgress);
        }
        let limit = self.cfg.max_blob_bytes.min(self.cfg.max_bytes);
        if size > limit {
            drop(inner);
            self.release_claim(hex);
            return Err(BeginError::TooLarge { size, limit });
        }
        if inner.uploading.len() >= self.cfg.max_concurrent_uploads
            || inner.reserved + size > self.cfg.max_bytes
        {
            drop(inner);
            self.release_claim(hex);
            return Err(BeginError::Busy);
        }
        // Room is made at commit, not here: an upload that fails its checks evicts nothing.
        let n = self.next_tmp.fetch_add(1, Relaxed);
        let tmp = self
            .tmp_dir
            .join(format!("{hex}.{}.{n}", std::process::id()));
        let file = File::options().write(true).create_new(true).open(&tmp)?;
        inner.reserved += size;
        inner.uploading.insert(hex.to_string());
        inner.claims.remove(hex);
        drop(inner);
        self.changed.notify_waiters();
        Ok(Begin::Upload(Box::new(Upload {
            store: Arc::clone(self),
            hex: hex.to_string(),
            size,
            tmp,
            file: Some(tokio::fs::File::from_std(file)),
            hasher: Sha256::new(),
            written: 0,
            done: false,
        })))
    }

    /// Counts a PUT outcome (the server calls this once per PUT).
    pub fn count_put(&self, ok: bool) {
        let c = if ok {
            &self.counters.puts_ok
        } else {
            &self.counters.puts_rejected
        };
        c.fetch_add(1, Relaxed);
    }

    pub(crate) fn count_served(&self, n: u64) {
        self.counters.bytes_served.fetch_add(n, Relaxed);
    }

    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let inner = self.lock();
        Stats {
            hits: c.hits.load(Relaxed),
            misses: c.misses.load(Relaxed),
            puts_ok: c.puts_ok.load(Relaxed),
            puts_rejected: c.puts_rejected.load(Relaxed),
            evictions: c.evictions.load(Relaxed),
            bytes_served: c.bytes_served.load(Relaxed),
            blobs: inner.blobs.len() as u64,
            bytes: inner.total,
            uploads_in_progress: inner.uploading.len() as u64,
            max_bytes: self.cfg.max_bytes,
        }
    }
}

/// An upload in progress, streaming into `tmp/`. Dropping it without a successful
/// [`finish`](Upload::finish) (error, client gone) deletes the temp file and frees the
/// reservation.
pub struct Upload {
    store: Arc<Store>,
    hex: String,
    size: u64,
    tmp: PathBuf,
    file: Option<tokio::fs::File>,
    hasher: Sha256,
    written: u64,
    done: bool,
}

impl Upload {
    /// Appends body bytes; more than the declared size is an error.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), UploadError> {
        let got = self.written + data.len() as u64;
        if got > self.size {
            return Err(UploadError::SizeMismatch {
                got,
                want: self.size,
            });
        }
        self.hasher.update(data);
        self.file
            .as_mut()
            .expect("file open until finish")
            .write_all(data)
            .await?;
        self.written = got;
        Ok(())
    }

    /// Checks size and digest, then fsyncs, renames into `blobs/` and fsyncs the directory.
    pub async fn finish(mut self) -> Result<(), UploadError> {
        if self.written != self.size {
            return Err(UploadError::SizeMismatch {
                got: self.written,
                want: self.size,
            });
        }
        let got = hex::encode(std::mem::take(&mut self.hasher).finalize());
        if got != self.hex {
            return Err(UploadError::DigestMismatch {
                got,
                want: self.hex.clone(),
            });
        }
        let mut file = self.file.take().expect("file open until finish");
        file.flush().await?;
        let file = file.into_std().await;
        let (tmp, dest) = (self.tmp.clone(), self.store.blob_file(&self.hex));
        let blobs_dir = self.store.blobs_dir.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            let _ = file.set_modified(SystemTime::now());
            file.sync_all()?;
            fs::rename(&tmp, &dest)?;
            // Not indexed unless durable: a blob the index lacks would only be found at restart.
            fsync_dir(&blobs_dir).inspect_err(|_| drop(fs::remove_file(&dest)))
        })
        .await
        .map_err(io::Error::other)??;
        self.done = true;
        let mut inner = self.store.lock();
        inner.reserved -= self.size;
        inner.uploading.remove(&self.hex);
        inner.insert(&self.hex, self.size);
        // The new blob is the most recently used, so it goes last (and it fits: begin checked).
        self.store.evict_until(&mut inner, 0);
        drop(inner);
        self.store.changed.notify_waiters();
        info!(digest = %format_args!("sha256:{}", self.hex), size = self.size, "stored blob");
        Ok(())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let _ = fs::remove_file(&self.tmp);
        let mut inner = self.store.lock();
        inner.reserved -= self.size;
        inner.uploading.remove(&self.hex);
        drop(inner);
        self.store.changed.notify_waiters();
    }
}
