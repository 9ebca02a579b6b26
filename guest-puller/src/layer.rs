//! Content-addressed layer store and the streaming layer pipeline:
//! fetch → (decrypt + HMAC) → (plaintext digest) → decompress → diff_id → untar into a
//! staging dir, renamed into the store only after every check passed.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rustix::fs::{flock, FlockOperation};
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::decrypt::{Compression, LayerKey};
use crate::registry::RegistryError;
use crate::unpack::UnpackError;

/// Chunks buffered between the HTTP stream and the unpacker (bounds memory per layer).
pub const CHANNEL_CHUNKS: usize = 16;

/// Why a layer could not be made available.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// A digest, HMAC or size check failed.
    #[error("layer {layer}: {reason}")]
    Integrity { layer: String, reason: String },
    /// The tar stream was unsafe or malformed.
    #[error("layer {layer}: {source}")]
    Unpack { layer: String, source: UnpackError },
    /// The layer media type is not supported.
    #[error("layer {layer}: unsupported media type {media_type}")]
    MediaType { layer: String, media_type: String },
    /// Store I/O failed.
    #[error("layer store: {0}")]
    Store(#[from] io::Error),
    /// Fetching failed.
    #[error("layer {layer}: {source}")]
    Fetch {
        layer: String,
        #[source]
        source: RegistryError,
    },
    /// The image's layers would unpack to more than the work dir can take or the configured
    /// per-image maximum allows.
    #[error("layer {layer}: the image unpacks to more than {limit} bytes ({why})")]
    TooLarge {
        layer: String,
        limit: u64,
        why: &'static str,
    },
    /// The image has more layers than the overlay mount (or the configuration) allows.
    #[error("image has {count} layers, more than the limit of {limit} ({why})")]
    TooManyLayers {
        count: usize,
        limit: usize,
        why: String,
    },
    /// The work dir ran out of space (or quota) while unpacking.
    #[error("layer {layer}: no space left in the work dir: {source}")]
    NoSpace {
        layer: String,
        #[source]
        source: UnpackError,
    },
}

/// How many uncompressed bytes one image may still unpack, shared by its layers.
#[derive(Debug)]
pub struct UnpackBudget {
    left: AtomicU64,
    limit: u64,
    why: &'static str,
}

impl UnpackBudget {
    /// A budget of `limit` bytes; `why` names the bound that set it, for the error.
    pub fn new(limit: u64, why: &'static str) -> Arc<Self> {
        Arc::new(Self {
            left: AtomicU64::new(limit),
            limit,
            why,
        })
    }

    /// The smaller of `max` (the configured per-image maximum, if any) and the space free
    /// for unprivileged writers in `work_dir` now.
    pub fn for_image(work_dir: &Path, max: Option<u64>) -> io::Result<Arc<Self>> {
        let st = rustix::fs::statvfs(work_dir)?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        Ok(match max {
            Some(m) if m <= free => Self::new(m, "[image] max_unpacked_image_size"),
            _ => Self::new(free, "free space in the work dir"),
        })
    }

    /// Takes `n` bytes; false once the budget is exhausted.
    fn take(&self, n: u64) -> bool {
        self.left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(n))
            .is_ok()
    }

    /// Returns what a failed attempt took: its staging dir is gone, and the layer may be
    /// fetched again (from the registry after a bad node-cache blob).
    fn give_back(&self, n: u64) {
        let _ = self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                Some(l.saturating_add(n).min(self.limit))
            });
    }
}

/// What the pipeline needs to know about one layer.
#[derive(Clone)]
pub struct LayerSpec {
    /// Blob digest from the manifest (of the encrypted blob if encrypted).
    pub digest: String,
    /// Blob size from the manifest.
    pub size: u64,
    /// Compression of the (decrypted) blob.
    pub compression: Compression,
    /// Uncompressed tar digest from the image config.
    pub diff_id: String,
    /// Decryption key for encrypted layers.
    pub key: Option<LayerKey>,
    /// The image's uncompressed-size budget this layer draws from.
    pub budget: Arc<UnpackBudget>,
}

/// The layer store under `<work_dir>`: `layers/` and `staging/` (bundles live beside them,
/// owned by [`crate::bundles::Bundles`]).
///
/// Staging: each store instance (process) unpacks below its own `staging/<id>/`, and holds an
/// exclusive flock on `staging/<id>.lock` as long as it lives. A staging dir whose lock can be
/// taken belongs to a dead process and is reclaimed, at open and at every layer fetch; one of
/// a live process never is.
///
/// The work dir may change under a running store: kata-agent removes `/run/kata-containers`
/// when it creates the sandbox, and a secure mount puts an encrypted disk over it. Before each
/// pull [`LayerStore::ensure_layout`] re-creates the layout and claims a new staging dir when
/// its own is gone.
pub struct LayerStore {
    root: PathBuf,
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pins: Mutex<HashMap<String, usize>>,
    counter: AtomicU64,
    claim: Mutex<StagingClaim>,
}

/// This process's staging dir, its lock, and the identity the dir had when it was made.
struct StagingClaim {
    dir: PathBuf,
    _lock: fs::File,
    id: (u64, u64),
}

impl StagingClaim {
    fn new(base: &Path) -> io::Result<Self> {
        let (dir, lock) = claim_staging(base)?;
        let id = dev_ino(&dir)?;
        Ok(Self {
            dir,
            _lock: lock,
            id,
        })
    }

    /// Whether the dir at our path is still the one we made (not removed, not hidden by a mount).
    fn intact(&self) -> bool {
        dev_ino(&self.dir).is_ok_and(|id| id == self.id)
    }
}

fn dev_ino(p: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::symlink_metadata(p)?;
    Ok((m.dev(), m.ino()))
}

impl Drop for LayerStore {
    fn drop(&mut self) {
        // A clean exit leaves no staging behind; after a crash the next store reclaims it.
        let claim = self.claim.get_mut().unwrap_or_else(|e| e.into_inner());
        if claim.intact() {
            let _ = fs::remove_dir_all(&claim.dir);
            let _ = fs::remove_file(claim.dir.with_extension("lock"));
        }
    }
}

/// A layer's staging dir: removed when dropped unless it was renamed into the store. It travels
/// with the blocking unpack task, so a pull cancelled mid-layer (its future dropped) still
/// removes it once the task has stopped writing.
struct Staging {
    path: PathBuf,
    kept: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.kept {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn same_file(f: &fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Creates and locks this process's staging dir `staging/<id>`.
fn claim_staging(base: &Path) -> io::Result<(PathBuf, fs::File)> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    loop {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let id = format!(
            "{}-{nanos}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let lock_path = base.join(format!("{id}.lock"));
        let f = match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock_path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        };
        match flock(&f, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => continue,
            Err(e) => return Err(e.into()),
        }
        // A reclaimer may have taken the fresh, not yet locked file for a dead one and
        // unlinked it: then the lock guards nothing; start over.
        if !same_file(&f, &lock_path) {
            continue;
        }
        let dir = base.join(&id);
        fs::create_dir(&dir)?;
        return Ok((dir, f));
    }
}

/// Directory name of a layer in the store.
pub fn layer_dir_name(digest: &str) -> String {
    digest.replace(':', "-")
}

fn valid_digest(d: &str) -> bool {
    match d.split_once(':') {
        Some((a, h)) => {
            matches!(a, "sha256" | "sha512")
                && !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        }
        None => false,
    }
}

/// Keeps layers from being garbage-collected while a pull uses them.
pub struct Pin {
    store: Arc<LayerStore>,
    digests: Vec<String>,
    _lock: fs::File,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pins = self.store.pins.lock().expect("pins lock");
        for d in &self.digests {
            if let Some(n) = pins.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(d);
                }
            }
        }
    }
}

impl LayerStore {
    /// Opens (creating) the store and discards leftovers of dead pulls.
    pub fn open(work_dir: &Path) -> io::Result<Arc<Self>> {
        for d in ["layers", "staging"] {
            fs::create_dir_all(work_dir.join(d))?;
        }
        let claim = StagingClaim::new(&work_dir.join("staging"))?;
        let s = Arc::new(Self {
            root: work_dir.to_owned(),
            inflight: Mutex::new(HashMap::new()),
            pins: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
            claim: Mutex::new(claim),
        });
        s.reclaim_staging();
        Ok(s)
    }

    /// Makes sure the store's layout exists at its path: re-creates `layers/` and `staging/`
    /// and claims a new staging dir when ours was removed or hidden since it was made (the
    /// work dir deleted, or a filesystem mounted on it or above it). Returns whether it had to
    /// re-claim. Layers already unpacked where the old dir was are not looked for again.
    pub fn ensure_layout(&self) -> io::Result<bool> {
        for d in ["layers", "staging"] {
            fs::create_dir_all(self.root.join(d))?;
        }
        let mut claim = self.claim.lock().unwrap_or_else(|e| e.into_inner());
        if claim.intact() {
            return Ok(false);
        }
        let fresh = StagingClaim::new(&self.root.join("staging"))?;
        info!(work_dir = %self.root.display(), staging = %fresh.dir.display(),
              "work dir removed or replaced since the store opened; layout re-created");
        // The old claim's dir is gone or hidden: dropping it only closes its lock.
        *claim = fresh;
        drop(claim);
        self.reclaim_staging();
        Ok(true)
    }

    fn staging(&self) -> PathBuf {
        self.claim
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .dir
            .clone()
    }

    /// Removes the staging dirs of dead processes (their lock is free) and stray dirs
    /// without a lock; returns how many it removed. Never touches a live process's staging.
    pub fn reclaim_staging(&self) -> usize {
        let base = self.root.join("staging");
        let Ok(entries) = fs::read_dir(&base) else {
            return 0;
        };
        let ours = self.staging().file_name().map(|n| n.to_owned());
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name.strip_suffix(".lock") {
                if ours.as_deref().is_some_and(|o| o == id) {
                    continue;
                }
                let lock_path = e.path();
                let Ok(f) = fs::OpenOptions::new().write(true).open(&lock_path) else {
                    continue;
                };
                if flock(&f, FlockOperation::NonBlockingLockExclusive).is_err()
                    || !same_file(&f, &lock_path)
                {
                    continue;
                }
                let dir = base.join(id);
                let _ = fs::remove_dir_all(&dir);
                let _ = fs::remove_file(&lock_path);
                info!(dir = %dir.display(), "reclaimed the staging dir of a dead pull");
                removed += 1;
            } else if ours.as_deref().is_some_and(|o| o.to_string_lossy() == name) {
                continue;
            } else if !base.join(format!("{name}.lock")).exists() {
                // Locks are made before their dirs and removed after them, so a dir without
                // one is left from a crash mid-reclaim or from an older layout.
                let _ = fs::remove_dir_all(e.path());
                removed += 1;
            }
        }
        removed
    }

    /// This store's own staging dir.
    pub fn staging_dir(&self) -> PathBuf {
        self.staging()
    }

    /// Root of the store (the configured work dir).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of a verified layer.
    pub fn layer_path(&self, digest: &str) -> PathBuf {
        self.root.join("layers").join(layer_dir_name(digest))
    }

    /// Whether a verified layer is present.
    pub fn has_layer(&self, digest: &str) -> bool {
        self.layer_path(digest).is_dir()
    }

    fn lock_file(&self) -> io::Result<fs::File> {
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join(".lock"))
    }

    fn try_exclusive(&self) -> io::Result<Option<fs::File>> {
        let f = self.lock_file()?;
        match flock(&f, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(f)),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Pins `digests` for the duration of a pull (in-process and, via a shared flock,
    /// against GC in other processes).
    pub async fn pin(self: &Arc<Self>, digests: Vec<String>) -> io::Result<Pin> {
        let f = self.lock_file()?;
        let f =
            tokio::task::spawn_blocking(move || flock(&f, FlockOperation::LockShared).map(|_| f))
                .await
                .map_err(io::Error::other)??;
        let mut pins = self.pins.lock().expect("pins lock");
        for d in &digests {
            *pins.entry(d.clone()).or_default() += 1;
        }
        Ok(Pin {
            store: self.clone(),
            digests,
            _lock: f,
        })
    }

    /// Makes the layer available: returns at once if present, otherwise runs `fetch` exactly
    /// once across concurrent callers (others wait and reuse the result). The timings are
    /// `None` when the layer was already in the store.
    pub async fn ensure_layer<F, Fut>(
        self: &Arc<Self>,
        spec: LayerSpec,
        fetch: F,
    ) -> Result<(PathBuf, Option<LayerTimings>), LayerError>
    where
        F: FnOnce(mpsc::Sender<io::Result<Bytes>>) -> Fut,
        Fut: std::future::Future<Output = Result<(), RegistryError>>,
    {
        if !valid_digest(&spec.digest) || !valid_digest(&spec.diff_id) {
            return Err(LayerError::Integrity {
                layer: spec.digest.clone(),
                reason: format!("unsupported digest or diff_id {:?}", spec.diff_id),
            });
        }
        let digest = spec.digest.clone();
        let gate = {
            let mut m = self.inflight.lock().expect("inflight lock");
            m.entry(digest.clone()).or_default().clone()
        };
        let _guard = gate.lock().await;
        let path = self.layer_path(&spec.digest);
        if path.is_dir() {
            return Ok((path, None));
        }
        // Each fetch also reclaims what dead pulls left, off the async threads.
        let s = self.clone();
        drop(tokio::task::spawn_blocking(move || s.reclaim_staging()));
        let result = self.fetch_and_unpack(spec, fetch).await;
        // Drop the gate entry when nobody else waits on it.
        {
            let mut m = self.inflight.lock().expect("inflight lock");
            if m.get(&digest).is_some_and(|g| Arc::strong_count(g) <= 2) {
                m.remove(&digest);
            }
        }
        result.map(|(p, t)| (p, Some(t)))
    }

    async fn fetch_and_unpack<F, Fut>(
        &self,
        spec: LayerSpec,
        fetch: F,
    ) -> Result<(PathBuf, LayerTimings), LayerError>
    where
        F: FnOnce(mpsc::Sender<io::Result<Bytes>>) -> Fut,
        Fut: std::future::Future<Output = Result<(), RegistryError>>,
    {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let path = self
            .staging()
            .join(format!("{}.{n}", layer_dir_name(&spec.digest)));
        fs::create_dir(&path)?;
        let staging = Staging { path, kept: false };
        let digest = spec.digest.clone();
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        let started = std::time::Instant::now();
        let work = tokio::task::spawn_blocking(move || {
            let r = process_layer(rx, &spec, &staging.path);
            (r, staging)
        });
        let fetched = fetch(tx).await;
        let (processed, mut staging) = work
            .await
            .map_err(|e| LayerError::Store(io::Error::other(e)))?;
        let outcome = match (processed, fetched) {
            (Ok(done), Ok(())) => Ok(done),
            // The consumer's error explains why the fetch was cut short.
            (Err(e), _) => Err(e),
            (Ok(_), Err(source)) => Err(LayerError::Fetch {
                layer: digest.clone(),
                source,
            }),
        };
        match outcome {
            Ok((stats, t)) => {
                let dest = self.layer_path(&digest);
                match fs::rename(&staging.path, &dest) {
                    Ok(()) => staging.kept = true,
                    // Another process finished the same layer first; theirs is equally verified.
                    Err(e) if dest.is_dir() => {
                        debug!("layer {digest} appeared concurrently ({e}); using it");
                        remove_tree(staging).await;
                    }
                    Err(e) => {
                        remove_tree(staging).await;
                        return Err(e.into());
                    }
                }
                let ms = |d: std::time::Duration| d.as_millis() as u64;
                info!(layer = %digest, entries = stats.entries, bytes = stats.bytes,
                      ms = ms(started.elapsed()), network_wait_ms = ms(t.decrypt.starved),
                      decrypt_ms = ms(t.decrypt.busy), inflate_ms = ms(t.inflate.busy),
                      write_ms = ms(t.write.busy), write_starved_ms = ms(t.write.starved),
                      "layer unpacked");
                Ok((dest, t))
            }
            Err(e) => {
                remove_tree(staging).await;
                Err(e)
            }
        }
    }

    /// Removes layers that `referenced` (the layers bundle records name, read under the store
    /// lock) does not list and no pull has pinned. Skips (returns empty) when another process
    /// holds the store lock.
    pub fn gc(
        &self,
        referenced: impl FnOnce() -> io::Result<Vec<String>>,
    ) -> io::Result<Vec<String>> {
        let Some(_l) = self.try_exclusive()? else {
            debug!("layer GC skipped: a pull is in progress");
            return Ok(Vec::new());
        };
        let used: HashSet<String> = referenced()?.iter().map(|d| layer_dir_name(d)).collect();
        let pinned: HashSet<String> = self
            .pins
            .lock()
            .expect("pins lock")
            .keys()
            .map(|d| layer_dir_name(d))
            .collect();
        let mut removed = Vec::new();
        for e in fs::read_dir(self.root.join("layers"))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if used.contains(&name) || pinned.contains(&name) {
                continue;
            }
            fs::remove_dir_all(e.path())?;
            removed.push(name.replacen('-', ":", 1));
        }
        if !removed.is_empty() {
            info!(count = removed.len(), "garbage-collected unused layers");
        }
        Ok(removed)
    }
}

async fn remove_tree(s: Staging) {
    let _ = tokio::task::spawn_blocking(move || drop(s)).await;
}

mod pipeline;
pub use pipeline::{is_no_space, process_layer, LayerTimings, StageTime};

#[cfg(test)]
mod tests;
