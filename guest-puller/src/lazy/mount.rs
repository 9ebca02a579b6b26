//! Serving a RAFS bootstrap as a read-only FUSE filesystem with nydus' storage stack: chunks
//! are fetched from the registry by range on first read and kept in a file cache; reads are
//! answered from chunks checked against the digests in the bootstrap ([`super::verify`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use fuse_backend_rs::abi::fuse_abi::FsOptions;
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::{Vfs, VfsOptions};
use fuse_backend_rs::transport::{FuseDevWriter, FuseSession};
use nydus_api::ConfigV2;
use nydus_rafs::fs::Rafs;
use nydus_rafs::metadata::RafsSuper;
use nydus_storage::device::BlobFeatures;
use rustix::mount::{unmount, UnmountFlags};
use serde_json::json;
use tracing::{error, info, warn};

use super::holder::Holder;
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

/// A mounted RAFS filesystem: its FUSE session, the threads serving it, its bootstrap (a
/// sealed memfd nydus maps), the blob server its chunks come from (dropped after the threads
/// have stopped) and, once [`RafsMount::hold`] succeeded, its entry in the FUSE holder.
pub struct RafsMount {
    mountpoint: PathBuf,
    // None once closed. An Option so that Drop can forget it: FuseSession's own Drop detaches
    // the mount, which a held mount must survive.
    session: Option<FuseSession>,
    // Taken over from an earlier process, whose session we did not mount: unmounted by path.
    taken_over: bool,
    vfs: Arc<Vfs>,
    server: Arc<Server<Arc<Vfs>>>,
    bootstrap: OwnedFd,
    threads: Vec<JoinHandle<()>>,
    held: Option<(Arc<Holder>, String)>,
    _blobs: BlobServer,
}

/// FUSE server threads per mount: reads block on the registry, so more than one keeps a
/// slow chunk from stalling every other file.
const SERVER_THREADS: usize = 4;

/// The path nydus opens (and maps) a bootstrap held in `fd` by.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Loads the bootstrap into a VFS serving it through [`LoggedRafs`], after checking that every
/// blob it names is a layer of the (signed) manifest and can be read as it claims.
fn load(
    bootstrap: &OwnedFd,
    cfg: &Arc<ConfigV2>,
    blob_ids: &BTreeMap<String, u64>,
    image: &str,
) -> Result<Arc<Vfs>, LazyError> {
    let path = fd_path(bootstrap);
    // Every blob the bootstrap refers to must be a layer of the (signed) manifest, so no
    // chunk can come from content the signature does not cover.
    let (sb, _) = RafsSuper::load_from_file(&path, cfg.clone(), false)
        .map_err(|e| LazyError::Rafs(format!("loading bootstrap: {e}")))?;
    for info in sb.superblock.get_blob_infos() {
        let b = info.blob_id();
        // The bootstrap carries the chunk key exactly when the blob's chunks are encrypted.
        if let Err(reason) = check_cipher_features(info.cipher_context().is_some(), info.features())
        {
            return Err(LazyError::Format(format!("blob {b}: {reason}")));
        }
        if !blob_ids.contains_key(&b) {
            return Err(LazyError::Integrity {
                what: format!("blob {b}"),
                reason: "the bootstrap refers to a blob that is not a layer of the manifest".into(),
            });
        }
    }
    let verifier = ChunkVerifier::new(sb).map_err(|reason| LazyError::Integrity {
        what: format!("image {image}"),
        reason,
    })?;
    let (mut rafs, reader) = Rafs::new(cfg, &cfg.id, &path)
        .map_err(|e| LazyError::Rafs(format!("loading bootstrap: {e}")))?;
    rafs.import(reader, None)
        .map_err(|e| LazyError::Rafs(format!("importing bootstrap: {e}")))?;
    let vfs = Arc::new(Vfs::new(VfsOptions::default()));
    vfs.mount(
        Box::new(LoggedRafs::new(rafs, verifier, image.to_string())),
        "/",
    )
    .map_err(|e| LazyError::Rafs(format!("vfs mount: {e:?}")))?;
    Ok(vfs)
}

impl RafsMount {
    /// Loads `bootstrap` (a sealed memfd) and mounts it read-only at `mountpoint`. Blocking:
    /// call from a blocking thread.
    pub fn mount(
        bootstrap: OwnedFd,
        cfg: Arc<ConfigV2>,
        mountpoint: &Path,
        blob_ids: &BTreeMap<String, u64>,
        image: &str,
        blobs: BlobServer,
    ) -> Result<Self, LazyError> {
        let vfs = load(&bootstrap, &cfg, blob_ids, image)?;
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
        Self::serve(session, false, vfs, bootstrap, mountpoint, blobs)
    }

    /// Serves a mount an earlier guest-puller made, from the FUSE file and bootstrap the
    /// holder kept. `offered` is what the kernel offered at that mount's INIT (it is not
    /// sent again), so the VFS negotiates the same way; inode numbers come from the bootstrap
    /// and handles are not kept (RAFS answers opens without them), so every inode the kernel
    /// knows means the same here. Requests the killed process had read but not answered are
    /// asked again of the kernel (`FUSE_NOTIFY_RESEND`, Linux 6.9+). `dir` is any directory
    /// outside the mount (the session wants one, and the mount itself would not answer a
    /// lookup before it is served). `held` is the holder entry that keeps it.
    #[allow(clippy::too_many_arguments)]
    pub fn take_over(
        fuse: OwnedFd,
        bootstrap: OwnedFd,
        offered: u64,
        cfg: Arc<ConfigV2>,
        dir: &Path,
        mountpoint: &Path,
        blob_ids: &BTreeMap<String, u64>,
        image: &str,
        blobs: BlobServer,
        held: (Arc<Holder>, String),
    ) -> Result<Self, LazyError> {
        let vfs = load(&bootstrap, &cfg, blob_ids, image)?;
        let offered = FsOptions::from_bits_truncate(offered);
        vfs.init(offered)
            .map_err(|e| LazyError::Fuse(format!("replaying the session's INIT: {e}")))?;
        let mut session = FuseSession::new(dir, "rafs", "nydus", true)
            .map_err(|e| LazyError::Fuse(format!("session: {e}")))?;
        session.set_fuse_file(File::from(fuse));
        let mut m = Self::serve(session, true, vfs, bootstrap, mountpoint, blobs)?;
        if offered.contains(FsOptions::HAS_RESEND) {
            m.resend()?;
        } else {
            warn!(mountpoint = %mountpoint.display(),
                  "this kernel cannot resend FUSE requests: reads the previous guest-puller \
                   had taken but not answered stay blocked");
        }
        // Held from here on: should this process die too, the mount stays with the holder.
        m.held = Some(held);
        Ok(m)
    }

    fn serve(
        session: FuseSession,
        taken_over: bool,
        vfs: Arc<Vfs>,
        bootstrap: OwnedFd,
        mountpoint: &Path,
        blobs: BlobServer,
    ) -> Result<Self, LazyError> {
        let server = Arc::new(Server::new(vfs.clone()));
        // Built first so that a failure below unmounts (Drop) what is mounted.
        let mut m = Self {
            mountpoint: mountpoint.to_owned(),
            session: Some(session),
            taken_over,
            vfs,
            server,
            bootstrap,
            threads: Vec::new(),
            held: None,
            _blobs: blobs,
        };
        for i in 0..SERVER_THREADS {
            let mut ch = m
                .session()?
                .new_channel()
                .map_err(|e| LazyError::Fuse(format!("channel: {e}")))?;
            let server = m.server.clone();
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
            m.threads.push(t);
        }
        Ok(m)
    }

    /// Asks the kernel to queue again every request a server read but never answered.
    fn resend(&self) -> Result<(), LazyError> {
        let fuse = self
            .session()?
            .get_fuse_file()
            .ok_or_else(|| LazyError::Fuse("no session file".into()))?;
        let mut buf = vec![0u8; 4096];
        let w = FuseDevWriter::<()>::new(fuse.as_raw_fd(), &mut buf)
            .map_err(|e| LazyError::Fuse(format!("resend: {e}")))?;
        self.server
            .notify_resend(w)
            .map_err(|e| LazyError::Fuse(format!("FUSE_NOTIFY_RESEND: {e}")))
    }

    fn session(&self) -> Result<&FuseSession, LazyError> {
        self.session
            .as_ref()
            .ok_or_else(|| LazyError::Fuse("session already closed".into()))
    }

    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Hands the session to `holder` as entry `id` with the puller's `state` (built from the
    /// bits the kernel offered at INIT, which a successor replays), so the mount outlives
    /// this process. Waits up to 10 s for that INIT. Blocking.
    pub fn hold(
        &mut self,
        holder: Arc<Holder>,
        id: &str,
        state: impl FnOnce(u64) -> serde_json::Value,
    ) -> std::io::Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !self.vfs.initialized() {
            if std::time::Instant::now() > deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the kernel never initialised the FUSE session",
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let offered = self.vfs.options().in_opts.bits();
        // Served by our threads by now; the holder drops the entry once this device is gone.
        let dev = std::fs::metadata(&self.mountpoint)?.dev();
        let fuse = self
            .session()
            .ok()
            .and_then(FuseSession::get_fuse_file)
            .ok_or_else(|| std::io::Error::other("no session file"))?;
        holder.put(
            id,
            dev,
            state(offered),
            fuse.as_fd(),
            self.bootstrap.as_fd(),
        )?;
        self.held = Some((holder, id.to_owned()));
        Ok(())
    }

    /// Detaches the mount (by path if it was taken over: that session's own unmount would aim
    /// at the directory it was made with) and closes this process's copy of the session.
    fn unmount_session(&mut self) {
        let Some(mut session) = self.session.take() else {
            return;
        };
        let res = if self.taken_over {
            unmount(&self.mountpoint, UnmountFlags::DETACH).map_err(|e| e.to_string())
        } else {
            session.umount().map_err(|e| e.to_string())
        };
        if let Err(e) = res {
            warn!(mountpoint = %self.mountpoint.display(), "fuse unmount: {e}");
        }
        let _ = session.wake();
        self.join_threads();
        if self.taken_over {
            // Its Drop's unmount of that directory fails harmlessly (not a mount point).
            drop(session);
        }
    }

    fn join_threads(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Unmounts, stops the server threads and lets the holder close its copy. Blocking.
    pub fn unmount(mut self) {
        self.unmount_session();
        if let Some((holder, id)) = self.held.take() {
            if let Err(e) = holder.forget(&id) {
                warn!(id, "FUSE holder: forgetting the entry: {e}");
            }
        }
    }
}

impl Drop for RafsMount {
    /// A mount the holder keeps is only let go (this happens when the process ends, as on
    /// SIGTERM before an upgrade: every other path unmounts explicitly): the threads stop and
    /// the mount stays, its requests queued in the kernel for the next guest-puller. Any
    /// other mount is unmounted.
    fn drop(&mut self) {
        if self.held.is_none() {
            self.unmount_session();
            return;
        }
        if let Some(session) = self.session.take() {
            let _ = session.wake();
            self.join_threads();
            // Not dropped: FuseSession's Drop would detach the mount. Its fd closes with the
            // process, which is what lets a held mount go.
            std::mem::forget(session);
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
