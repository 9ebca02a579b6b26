//! Lazy pulling of nydus (RAFS v6) images: the container starts on a FUSE filesystem that
//! fetches each chunk from the registry on first read.
//!
//! Trust chain: the manifest digest is checked by the signature policy; the manifest pins the
//! bootstrap layer's digest, which we verify (and ocicrypt-decrypt, for encrypted images)
//! before use; the bootstrap's chunk table holds every chunk's digest (and, for encrypted
//! images, the bootstrap holds the chunk cipher keys), and every read is answered from whole
//! chunks hashed and compared with that table ([`verify`]), never from what the blob's own
//! chunk-info table or CRCs say. Every blob the bootstrap names must be a layer of the manifest.

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

/// Mounts a verified bootstrap for `bundle` at `mountpoint` (blocking).
#[cfg(feature = "lazy")]
pub fn mount_bootstrap(
    bootstrap: Vec<u8>,
    state_dir: &Path,
    mountpoint: &Path,
    blobs: BlobServer,
    nydus: &NydusManifest,
    image: &str,
) -> Result<RafsMount, LazyError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| LazyError::Io { path, source }
    };
    let cache = state_dir.join("cache");
    std::fs::create_dir_all(&cache).map_err(io(&cache))?;
    let boot_path = state_dir.join("image.boot");
    std::fs::write(&boot_path, &bootstrap).map_err(io(&boot_path))?;
    drop(bootstrap);
    let id = state_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "rafs".into());
    let cfg = mount::nydus_config(&id, &blobs, &cache, false)?;
    let res = RafsMount::mount(
        &boot_path,
        cfg,
        mountpoint,
        &image::blob_ids(nydus),
        image,
        blobs,
    );
    // nydus keeps the bootstrap mapped; unlinking it leaves no copy of chunk keys on disk.
    let _ = std::fs::remove_file(&boot_path);
    res
}
