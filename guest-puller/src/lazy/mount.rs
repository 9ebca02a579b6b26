//! Serving a RAFS bootstrap as a read-only FUSE filesystem with nydus' storage stack: chunks
//! are fetched from the registry by range on first read and kept in a file cache; reads are
//! answered from chunks checked against the digests in the bootstrap ([`super::verify`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::{Vfs, VfsOptions};
use fuse_backend_rs::transport::FuseSession;
use nydus_api::ConfigV2;
use nydus_rafs::fs::Rafs;
use nydus_rafs::metadata::RafsSuper;
use nydus_storage::device::BlobFeatures;
use serde_json::json;
use tracing::{error, info, warn};

use super::logged::LoggedRafs;
use super::transport::BlobServer;
use super::verify::ChunkVerifier;
use super::LazyError;

/// Builds the nydus configuration for one mount: nydus' http-proxy backend reading from the
/// mount's [`BlobServer`] (our registry client behind it), file cache in `cache_dir`, RAFS
/// direct mode. nydus' own chunk validation is off: it would hash each chunk a second time
/// (or, with CRCs, check nothing that matters), and every read is checked by [`ChunkVerifier`].
pub fn nydus_config(
    id: &str,
    blobs: &BlobServer,
    cache_dir: &Path,
    prefetch: bool,
) -> Result<Arc<ConfigV2>, LazyError> {
    let cfg = json!({
        "version": 2,
        "id": id,
        "backend": {
            "type": "http-proxy",
            "http-proxy": {
                "addr": blobs.url(),
                "path": blobs.path(),
                // Our side has the registry deadlines and retries; nydus' hop is loopback.
                // Its client honours HTTP_PROXY from the environment: the puller's proxy is
                // `image_pull_proxy`, and the environment must not name one.
                "timeout": 60,
                "connect_timeout": 5,
                "retry_limit": 0,
            }
        },
        "cache": {
            "type": "filecache",
            "compressed": false,
            "validate": false,
            "filecache": { "work_dir": cache_dir.to_string_lossy() },
            "prefetch": { "enable": prefetch, "threads": 2, "batch_size": 1048576 },
        },
        "rafs": {
            "mode": "direct",
            "validate": false,
            "enable_xattr": true,
            "prefetch": { "enable": prefetch, "threads": 2, "prefetch_all": prefetch },
        }
    });
    let cfg: ConfigV2 = serde_json::from_value(cfg)
        .map_err(|e| LazyError::Config(format!("nydus configuration: {e}")))?;
    if !cfg.validate() {
        return Err(LazyError::Config("nydus configuration is invalid".into()));
    }
    Ok(Arc::new(cfg))
}

/// Checks that a blob whose chunks are encrypted says so in the way nydus' reader needs.
///
/// nydus-storage decides per chunk, from the blob's chunk table, whether to decrypt; only V2
/// tables have that bit (V1 entries always read as plaintext). An image built with a cipher
/// but without these blob features (as `BuildContext::new(.., encrypt = true, ..)` alone gives)
/// would mount and then fail every read with EIO, so it is refused up front.
pub fn check_cipher_features(encrypted: bool, features: BlobFeatures) -> Result<(), String> {
    let needed = BlobFeatures::ENCRYPTED | BlobFeatures::CHUNK_INFO_V2;
    if encrypted && !features.contains(needed) {
        return Err(format!(
            "its chunks are encrypted but the blob lacks the ENCRYPTED and CHUNK_INFO_V2 \
             features (features: {features:?}), so nydus cannot decrypt them; rebuild it with \
             `nydus-image create --encrypt`"
        ));
    }
    Ok(())
}

/// A mounted RAFS filesystem, the threads serving it and the blob server its chunks come
/// from (dropped after the threads have stopped).
pub struct RafsMount {
    mountpoint: PathBuf,
    session: FuseSession,
    threads: Vec<JoinHandle<()>>,
    _blobs: BlobServer,
}

/// FUSE server threads per mount: reads block on the registry, so more than one keeps a
/// slow chunk from stalling every other file.
const SERVER_THREADS: usize = 4;

impl RafsMount {
    /// Loads `bootstrap` and mounts it read-only at `mountpoint`. Blocking: call from a
    /// blocking thread.
    pub fn mount(
        bootstrap: &Path,
        cfg: Arc<ConfigV2>,
        mountpoint: &Path,
        blob_ids: &std::collections::BTreeMap<String, u64>,
        image: &str,
        blobs: BlobServer,
    ) -> Result<Self, LazyError> {
        // Every blob the bootstrap refers to must be a layer of the (signed) manifest, so no
        // chunk can come from content the signature does not cover.
        let (sb, _) = RafsSuper::load_from_file(bootstrap, cfg.clone(), false)
            .map_err(|e| LazyError::Rafs(format!("loading bootstrap: {e}")))?;
        for info in sb.superblock.get_blob_infos() {
            let b = info.blob_id();
            // The bootstrap carries the chunk key exactly when the blob's chunks are encrypted.
            if let Err(reason) =
                check_cipher_features(info.cipher_context().is_some(), info.features())
            {
                return Err(LazyError::Format(format!("blob {b}: {reason}")));
            }
            if !blob_ids.contains_key(&b) {
                return Err(LazyError::Integrity {
                    what: format!("blob {b}"),
                    reason: "the bootstrap refers to a blob that is not a layer of the manifest"
                        .into(),
                });
            }
        }
        let verifier = ChunkVerifier::new(sb).map_err(|reason| LazyError::Integrity {
            what: format!("image {image}"),
            reason,
        })?;
        let (mut rafs, reader) = Rafs::new(&cfg, &cfg.id, bootstrap)
            .map_err(|e| LazyError::Rafs(format!("loading bootstrap: {e}")))?;
        rafs.import(reader, None)
            .map_err(|e| LazyError::Rafs(format!("importing bootstrap: {e}")))?;
        let vfs = Arc::new(Vfs::new(VfsOptions::default()));
        vfs.mount(
            Box::new(LoggedRafs::new(rafs, verifier, image.to_string())),
            "/",
        )
        .map_err(|e| LazyError::Rafs(format!("vfs mount: {e:?}")))?;
        std::fs::create_dir_all(mountpoint).map_err(|e| LazyError::Io {
            path: mountpoint.to_owned(),
            source: e,
        })?;
        let mut session = FuseSession::new(mountpoint, "rafs", "nydus", true)
            .map_err(|e| LazyError::Fuse(format!("session: {e}")))?;
        // Containers run as any uid; the overlay above it reads as the caller.
        session.set_allow_other(true);
        session
            .mount()
            .map_err(|e| LazyError::Fuse(format!("mounting {}: {e}", mountpoint.display())))?;
        let server = Arc::new(Server::new(vfs));
        let mut threads = Vec::new();
        for i in 0..SERVER_THREADS {
            let mut ch = match session.new_channel() {
                Ok(ch) => ch,
                Err(e) => {
                    let mut m = Self {
                        mountpoint: mountpoint.to_owned(),
                        session,
                        threads,
                        _blobs: blobs,
                    };
                    m.stop();
                    return Err(LazyError::Fuse(format!("channel: {e}")));
                }
            };
            let server = server.clone();
            let mp = mountpoint.to_owned();
            let t = std::thread::Builder::new()
                .name(format!("rafs-fuse-{i}"))
                .spawn(move || loop {
                    match ch.get_request() {
                        Ok(Some((r, w))) => {
                            if let Err(e) = server.handle_message(r, w.into(), None, None) {
                                // EBADF/ENODEV after unmount end the loop quietly.
                                if let fuse_backend_rs::Error::EncodeMessage(_) = e {
                                    warn!(mountpoint = %mp.display(), "fuse reply failed: {e}");
                                } else {
                                    error!(mountpoint = %mp.display(), "fuse request failed: {e}");
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            info!(mountpoint = %mp.display(), "fuse channel closed: {e}");
                            break;
                        }
                    }
                })
                .map_err(|e| LazyError::Fuse(format!("spawning server thread: {e}")))?;
            threads.push(t);
        }
        Ok(Self {
            mountpoint: mountpoint.to_owned(),
            session,
            threads,
            _blobs: blobs,
        })
    }

    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    fn stop(&mut self) {
        if let Err(e) = self.session.umount() {
            warn!(mountpoint = %self.mountpoint.display(), "fuse unmount: {e}");
        }
        let _ = self.session.wake();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Unmounts and stops the server threads. Blocking.
    pub fn unmount(mut self) {
        self.stop();
    }
}

impl Drop for RafsMount {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encrypted_blobs_need_v2_chunk_tables_that_mark_encryption() {
        let base = BlobFeatures::INLINED_CHUNK_DIGEST | BlobFeatures::HAS_TOC;
        let full = base | BlobFeatures::ENCRYPTED | BlobFeatures::CHUNK_INFO_V2;
        assert!(check_cipher_features(true, full).is_ok());
        assert!(check_cipher_features(false, base).is_ok());
        let e = check_cipher_features(true, base).unwrap_err();
        assert!(e.contains("nydus-image create --encrypt"), "{e}");
        assert!(check_cipher_features(true, base | BlobFeatures::ENCRYPTED).is_err());
        assert!(check_cipher_features(true, base | BlobFeatures::CHUNK_INFO_V2).is_err());
    }
}
