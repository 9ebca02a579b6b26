//! Lazy pulling of nydus (RAFS v6) images: the container starts on a FUSE filesystem that
//! fetches each chunk from the registry on first read.
//!
//! Trust chain: the manifest digest is checked by the signature policy; the manifest pins the
//! bootstrap layer's digest, which we verify (and ocicrypt-decrypt, for encrypted images)
//! before use; the bootstrap's chunk table holds every chunk's digest (and, for encrypted
//! images, the bootstrap holds the chunk cipher keys), and every read is answered from whole
//! chunks hashed and compared with that table ([`verify`]), never from what the blob's own
//! chunk-info table or CRCs say. Every blob the bootstrap names must be a layer of the manifest.

#[cfg(feature = "lazy")]
pub mod holder;
pub mod image;
#[cfg(feature = "lazy")]
pub mod logged;
#[cfg(feature = "lazy")]
pub mod mount;
#[cfg(feature = "lazy")]
pub mod transport;
#[cfg(feature = "lazy")]
pub mod verify;

use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use oci_client::Reference;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::decrypt::{self, KeyUnwrapper};
use crate::registry::{Hasher, RegistryClient, RegistryError};

#[cfg(feature = "lazy")]
pub use holder::Holder;
pub use image::{detect, NydusManifest};
#[cfg(feature = "lazy")]
pub use mount::RafsMount;
#[cfg(feature = "lazy")]
pub use transport::BlobServer;

/// A lazy mount, in a build without the `lazy` feature: none can exist, so the bundle owner's
/// mount table stays empty and nydus images are refused before anything is fetched.
#[cfg(not(feature = "lazy"))]
pub enum RafsMount {}

#[cfg(not(feature = "lazy"))]
impl RafsMount {
    /// Unreachable: no mount value exists.
    pub fn mountpoint(&self) -> &Path {
        match *self {}
    }

    /// Unreachable: no mount value exists.
    pub fn unmount(self) {
        match self {}
    }
}

/// Why a lazy pull failed.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// The manifest or bootstrap is not a usable nydus image.
    #[error("nydus image: {0}")]
    Format(String),
    /// The bootstrap layer is unusable (size, media type) or could not be read.
    #[error("nydus bootstrap {digest}: {reason}")]
    Bootstrap { digest: String, reason: String },
    /// The registry failed to deliver the bootstrap layer.
    #[error("nydus bootstrap {digest}: {source}")]
    Fetch {
        digest: String,
        #[source]
        source: RegistryError,
    },
    /// The bootstrap layer, or a blob it names, is not what the manifest pins.
    #[error("nydus image {what}: {reason}")]
    Integrity { what: String, reason: String },
    /// The bootstrap layer's key could not be obtained.
    #[error(transparent)]
    Decrypt(#[from] decrypt::DecryptError),
    /// The nydus configuration could not be built.
    #[error("lazy pull configuration: {0}")]
    Config(String),
    /// nydus could not load the bootstrap.
    #[error("rafs: {0}")]
    Rafs(String),
    /// The FUSE mount failed.
    #[error("fuse: {0}")]
    Fuse(String),
    /// Filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Fetches the bootstrap layer, verifies its digest, decrypts it when it is ocicrypt-encrypted
/// (the key comes from the KBS like any layer key), and returns the RAFS bootstrap bytes.
pub async fn fetch_bootstrap(
    registry: &RegistryClient,
    source: &Reference,
    nydus: &NydusManifest,
    unwrapper: &KeyUnwrapper,
) -> Result<Vec<u8>, LazyError> {
    let desc = &nydus.bootstrap;
    let fail = |reason: String| LazyError::Bootstrap {
        digest: desc.digest.clone(),
        reason,
    };
    let size = u64::try_from(desc.size).map_err(|_| fail("negative size".into()))?;
    if size > image::MAX_BOOTSTRAP_SIZE {
        return Err(fail(format!(
            "{size} bytes exceeds {}",
            image::MAX_BOOTSTRAP_SIZE
        )));
    }
    let compression = decrypt::compression_of(&desc.media_type)
        .ok_or_else(|| fail(format!("unsupported media type {}", desc.media_type)))?;
    let gzip = match compression {
        decrypt::Compression::Gzip => true,
        decrypt::Compression::None => false,
        other => return Err(fail(format!("unsupported compression {other:?}"))),
    };
    // The key first: an image whose keys this guest cannot obtain fails before any download.
    let key = if decrypt::is_encrypted(&desc.media_type) {
        let ann = desc.annotations.clone().unwrap_or_default();
        Some(unwrapper.unwrap_layer_key(&desc.digest, &ann).await?)
    } else {
        None
    };
    let mut hasher = Hasher::for_digest(&desc.digest)
        .ok_or_else(|| fail("unsupported digest algorithm".into()))?;
    let (tx, mut rx) = mpsc::channel::<std::io::Result<Bytes>>(64);
    let fetch = registry.blob_to_channel(source, desc, tx);
    let collect = async {
        let mut out = Vec::with_capacity(size as usize);
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk?;
            if (out.len() + chunk.len()) as u64 > size {
                return Err(std::io::Error::other("more bytes than the descriptor size"));
            }
            hasher.update(&chunk);
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    };
    let (fetched, data) = tokio::join!(fetch, collect);
    let data = match (fetched, data) {
        // The registry's error, unless it only says the collector stopped first.
        (Err(source), _) if !matches!(source, RegistryError::ConsumerGone) => {
            return Err(LazyError::Fetch {
                digest: desc.digest.clone(),
                source,
            })
        }
        (_, Err(e)) => return Err(fail(e.to_string())),
        (_, Ok(d)) => d,
    };
    let actual = hasher.finish();
    if actual != desc.digest {
        return Err(LazyError::Integrity {
            what: format!("bootstrap {}", desc.digest),
            reason: format!("digest mismatch: got {actual}"),
        });
    }
    tokio::task::spawn_blocking(move || {
        let reader: Box<dyn Read> = match &key {
            // The decryptor checks the HMAC at EOF; extraction reads the tar to its end.
            Some(k) => Box::new(k.decryptor(std::io::Cursor::new(data))),
            None => Box::new(std::io::Cursor::new(data)),
        };
        let mut reader = reader;
        let boot = image::extract_bootstrap(&mut reader, gzip)?;
        // Drain to EOF so an encrypted layer's HMAC is verified even after the bootstrap entry.
        std::io::copy(&mut reader, &mut std::io::sink())
            .map_err(|e| LazyError::Format(format!("bootstrap layer: {e}")))?;
        Ok(boot)
    })
    .await
    .map_err(|e| LazyError::Format(format!("bootstrap extraction: {e}")))?
}

/// Reads every regular file below `root` once, so all chunks are fetched, verified and cached
/// (the eager mode and the background prefetch of lazy images). Returns the bytes read. The
/// tree is the image's, so it is walked through [`crate::rootfs`]: no symlink is followed and
/// no FIFO or device is opened.
pub fn read_all(root: &Path) -> std::io::Result<u64> {
    crate::rootfs::Rootfs::open(root)
        .map_err(std::io::Error::other)?
        .read_all_files()
}

/// Starts a background thread fetching the whole image below `root`.
pub fn prefetch_in_background(root: PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("rafs-prefetch".into())
        .spawn(move || {
            let started = std::time::Instant::now();
            match read_all(&root) {
                Ok(n) => info!(root = %root.display(), bytes = n,
                               ms = started.elapsed().as_millis() as u64, "lazy image prefetched"),
                Err(e) => warn!(root = %root.display(), "lazy image prefetch stopped: {e}"),
            }
        });
    if let Err(e) = spawned {
        warn!("could not start the prefetch thread: {e}");
    }
}

/// What a guest-puller needs to serve a mount an earlier one made (the holder keeps it as
/// JSON beside the mount's FUSE file and bootstrap).
#[cfg(feature = "lazy")]
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct TakeoverState {
    /// The image's manifest digest (which lazy state dir, which bundles).
    pub manifest_digest: String,
    /// The image as requested, for log lines.
    pub image: String,
    /// The repository its blobs come from (after mirrors).
    pub source: String,
    /// The manifest's blob layers.
    pub blobs: Vec<oci_client::manifest::OciDescriptor>,
    /// The FUSE mount point.
    pub mountpoint: PathBuf,
    /// What the kernel offered at the session's INIT (`FsOptions` bits).
    pub fuse_init: u64,
}

/// Where a new mount is handed for safekeeping across guest-puller restarts.
#[cfg(feature = "lazy")]
pub struct Hold {
    /// The holder.
    pub holder: std::sync::Arc<Holder>,
    /// The image's manifest digest.
    pub manifest_digest: String,
    /// The repository its blobs come from.
    pub source: String,
}

/// A sealed memfd holding `data`: the bootstrap (with, for encrypted images, the chunk keys)
/// lives in memory only, and no one holding the fd can change it under nydus' mapping.
#[cfg(feature = "lazy")]
fn sealed_memfd(data: &[u8]) -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};
    use std::io::Write;
    let fd = memfd_create(
        "rafs-bootstrap",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    let mut f = std::fs::File::from(fd);
    f.write_all(data)?;
    fcntl_add_seals(
        &f,
        SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
    )?;
    Ok(f.into())
}

/// Mounts a verified bootstrap at `mountpoint` (blocking), its chunk cache in `state_dir`,
/// and hands it to `hold`'s holder when there is one.
#[cfg(feature = "lazy")]
pub fn mount_bootstrap(
    bootstrap: Vec<u8>,
    state_dir: &Path,
    mountpoint: &Path,
    blobs: BlobServer,
    nydus: &NydusManifest,
    image: &str,
    hold: Option<Hold>,
) -> Result<RafsMount, LazyError> {
    let cache = state_dir.join("cache");
    std::fs::create_dir_all(&cache).map_err(|source| LazyError::Io {
        path: cache.clone(),
        source,
    })?;
    let boot = sealed_memfd(&bootstrap).map_err(|source| LazyError::Io {
        path: "bootstrap memfd".into(),
        source,
    })?;
    drop(bootstrap);
    let id = state_id(state_dir);
    let cfg = mount::nydus_config(&id, &blobs, &cache, false)?;
    let mut m = RafsMount::mount(
        boot,
        cfg,
        mountpoint,
        &image::blob_ids(&nydus.blobs),
        image,
        blobs,
    )?;
    if let Some(h) = hold {
        let state = |fuse_init| {
            serde_json::to_value(TakeoverState {
                manifest_digest: h.manifest_digest,
                image: image.to_owned(),
                source: h.source,
                blobs: nydus.blobs.clone(),
                mountpoint: mountpoint.to_owned(),
                fuse_init,
            })
            .unwrap_or_default()
        };
        // The container runs either way; only a restart of this process would now end it.
        if let Err(e) = m.hold(h.holder, &id, state) {
            warn!(mountpoint = %mountpoint.display(),
                  "lazy mount not handed to the FUSE holder, so it will not survive a \
                   guest-puller restart: {e}");
        }
    }
    Ok(m)
}

/// The id of a lazy state dir (its name), as nydus and the holder know it.
#[cfg(feature = "lazy")]
fn state_id(state_dir: &Path) -> String {
    state_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "rafs".into())
}

/// Serves the mount the holder kept as `held` for an earlier guest-puller, its state dir
/// being `state_dir` (checked against what the entry says), its chunks fetched through a new
/// blob server. Blocking parts run on a blocking thread.
#[cfg(feature = "lazy")]
pub async fn take_over(
    registry: std::sync::Arc<RegistryClient>,
    holder: std::sync::Arc<Holder>,
    held: holder::Held,
    state: TakeoverState,
    state_dir: PathBuf,
) -> Result<RafsMount, LazyError> {
    let mountpoint = state_dir.join("rootfs");
    if state.mountpoint != mountpoint || state_id(&state_dir) != held.id {
        return Err(LazyError::Format(format!(
            "held mount {} at {} is not the state dir {} of image {}",
            held.id,
            state.mountpoint.display(),
            state_dir.display(),
            state.manifest_digest
        )));
    }
    let source: Reference = state
        .source
        .parse()
        .map_err(|e| LazyError::Format(format!("held mount {}: source: {e}", held.id)))?;
    let blobs = BlobServer::start(registry, source, &state.blobs)
        .await
        .map_err(|source| LazyError::Io {
            path: "lazy blob server on 127.0.0.1".into(),
            source,
        })?;
    let cache = state_dir.join("cache");
    let cfg = mount::nydus_config(&held.id, &blobs, &cache, false)?;
    let blob_ids = image::blob_ids(&state.blobs);
    tokio::task::spawn_blocking(move || {
        RafsMount::take_over(
            held.fuse,
            held.bootstrap,
            state.fuse_init,
            cfg,
            &state_dir,
            &mountpoint,
            &blob_ids,
            &state.image,
            blobs,
            (holder, held.id),
        )
    })
    .await
    .map_err(|e| LazyError::Fuse(format!("take-over task: {e}")))?
}
