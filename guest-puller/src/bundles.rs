//! The owner of every bundle the puller creates: where bundles may live, their records
//! (which layers each uses, for GC), their overlay upper/work dirs, the state dirs and FUSE
//! mounts of lazily pulled images, one lock per bundle and one per lazy image.
//!
//! Layout under the work dir: `bundles/<sha256(bundle)>.json` (records, written to a temp file
//! and renamed, so a crash never leaves a torn record), `overlay/<hash>/{upper,work}`,
//! `lazy/<sha256(manifest digest)>/{rootfs,cache}`: the bundles of one lazy image share its
//! read-only FUSE rootfs and chunk cache (each has its own overlay on top), which goes when
//! the last of them is removed.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use rustix::mount::{unmount, UnmountFlags};
use tracing::{info, warn};

use crate::bundle::{self, BundleError};
use crate::layer::LayerStore;
use crate::lazy::RafsMount;

/// Default directory bundles must live below (kata-agent puts bundles at `/run/kata-containers/<cid>`).
pub const DEFAULT_BUNDLE_ROOT: &str = "/run/kata-containers";

/// Which layers a bundle uses, for refcounted GC.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BundleRecord {
    /// Bundle directory.
    pub bundle: PathBuf,
    /// Image reference as requested.
    pub image: String,
    /// Manifest digest.
    pub manifest_digest: String,
    /// Layer digests, bottom first.
    pub layers: Vec<String>,
    /// The rootfs is the image's shared lazy (FUSE) mount.
    #[serde(default)]
    pub lazy: bool,
}

/// The per-bundle directories the puller owns.
#[derive(Debug, Clone)]
pub struct BundleDirs {
    /// The bundle directory (rootfs at `bundle/rootfs`, spec at `bundle/config.json`).
    pub bundle: PathBuf,
    /// Parent of the overlay's `upper` and `work` dirs.
    pub overlay: PathBuf,
    /// The bundle's record.
    pub record: PathBuf,
}

/// Held while a bundle is pulled into or removed; one holder per bundle at a time.
pub struct BundleLock {
    _guard: tokio::sync::OwnedMutexGuard<()>,
    dirs: BundleDirs,
}

impl BundleLock {
    /// The directories of the locked bundle.
    pub fn dirs(&self) -> &BundleDirs {
        &self.dirs
    }
}

/// Held while a lazy image's shared rootfs is mounted, joined, left or unmounted.
pub struct ImageLock {
    _guard: tokio::sync::OwnedMutexGuard<()>,
    digest: String,
}

/// The lazy rootfs a bundle's pull made: a new mount of the image, or the one its other
/// bundles already share.
pub enum LazyRootfs {
    /// Mounted by this pull.
    Mounted(Box<RafsMount>),
    /// The image's mount, already served by this process.
    Shared,
}

/// A lazy image's FUSE rootfs and the bundles using it.
struct SharedMount {
    mount: RafsMount,
    users: BTreeSet<PathBuf>,
}

/// Owns bundles: path policy, records, overlay and lazy dirs, lazy mounts, per-bundle locks.
pub struct Bundles {
    store: Arc<LayerStore>,
    roots: Vec<PathBuf>,
    locks: Mutex<HashMap<PathBuf, Weak<tokio::sync::Mutex<()>>>>,
    // By manifest digest.
    mounts: Mutex<HashMap<String, SharedMount>>,
}

fn hash_of(bundle: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bundle.as_os_str().as_bytes()))
}

fn path_error(path: &Path, reason: impl Into<String>) -> BundleError {
    BundleError::Path {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn remove_file_if_present(p: &Path) -> io::Result<()> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn remove_dir_if_present(p: &Path) -> io::Result<()> {
    match fs::remove_dir_all(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A lexically clean absolute path: no `.`/`..` components, no empty or repeated separators
/// that would make two spellings of one bundle.
fn lexically_clean(p: &Path) -> bool {
    let bytes = p.as_os_str().as_bytes();
    bytes.starts_with(b"/")
        && bytes[1..]
            .split(|b| *b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b"..")
}

impl Bundles {
    /// Creates the owner over `store`'s work dir; bundles must live strictly below one of
    /// `roots` (none: any path passes the root check, as for `guest-puller unmount`).
    pub fn open(store: Arc<LayerStore>, roots: Vec<PathBuf>) -> io::Result<Arc<Self>> {
        Self::create_dirs(&store)?;
        // Temp records of a crash between write and rename are never read; drop them.
        for e in fs::read_dir(store.root().join("bundles"))? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "tmp") {
                let _ = fs::remove_file(&p);
            }
        }
        Ok(Arc::new(Self {
            store,
            roots,
            locks: Mutex::new(HashMap::new()),
            mounts: Mutex::new(HashMap::new()),
        }))
    }

    fn create_dirs(store: &LayerStore) -> io::Result<()> {
        for d in ["bundles", "overlay", "lazy"] {
            fs::create_dir_all(store.root().join(d))?;
        }
        Ok(())
    }

    /// Re-creates the work dir's layout (the store's and the bundles' dirs) where it has gone
    /// since it was opened (see [`LayerStore::ensure_layout`]); cheap when nothing changed.
    pub fn ensure_layout(&self) -> io::Result<()> {
        self.store.ensure_layout()?;
        Self::create_dirs(&self.store)
    }

    /// The layer store the bundles' layers live in.
    pub fn store(&self) -> &Arc<LayerStore> {
        &self.store
    }

    /// The directories the puller keeps for `bundle`.
    pub fn dirs(&self, bundle: &Path) -> BundleDirs {
        let h = hash_of(bundle);
        let root = self.store.root();
        BundleDirs {
            bundle: bundle.to_owned(),
            overlay: root.join("overlay").join(&h[..32]),
            record: root.join("bundles").join(format!("{h}.json")),
        }
    }

    /// The state dir of lazy image `manifest_digest` (FUSE mount point and chunk cache),
    /// outside every overlay dir so removing an overlay never walks into the FUSE mount.
    pub fn lazy_dir(&self, manifest_digest: &str) -> PathBuf {
        let h = hash_of(Path::new(manifest_digest));
        self.store.root().join("lazy").join(&h[..32])
    }

    /// Checks a requested bundle path before anything is fetched: UTF-8 without NUL, absolute
    /// and lexically clean, strictly below a configured root, no symlink on the way, and
    /// neither the work dir nor inside or above it.
    pub fn check_path(&self, bundle: &Path) -> Result<PathBuf, BundleError> {
        let bytes = bundle.as_os_str().as_bytes();
        if bytes.contains(&0) {
            return Err(path_error(bundle, "contains a NUL byte"));
        }
        if bundle.to_str().is_none() {
            return Err(path_error(bundle, "is not UTF-8"));
        }
        if !lexically_clean(bundle) {
            return Err(path_error(
                bundle,
                "must be absolute, without `.`, `..` or empty components",
            ));
        }
        let root = if self.roots.is_empty() {
            Path::new("/")
        } else {
            self.roots
                .iter()
                .find(|r| bundle.starts_with(r) && bundle != r.as_path())
                .ok_or_else(|| {
                    let roots: Vec<String> =
                        self.roots.iter().map(|r| r.display().to_string()).collect();
                    path_error(
                        bundle,
                        format!(
                            "is not below a bundle root ({}; [image] bundle_roots)",
                            roots.join(", ")
                        ),
                    )
                })?
        };
        let work = self.store.root();
        if bundle.starts_with(work) || work.starts_with(bundle) {
            return Err(path_error(
                bundle,
                format!("overlaps the work dir {}", work.display()),
            ));
        }
        // Every existing component below the root must be a real directory: a symlink would
        // let whoever made it point the bundle (and the config.json we write) anywhere.
        let mut at = root.to_path_buf();
        for c in bundle.strip_prefix(root).unwrap_or(bundle).components() {
            let Component::Normal(name) = c else { continue };
            at.push(name);
            match fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(path_error(bundle, format!("{} is a symlink", at.display())));
                }
                Ok(m) if !m.is_dir() => {
                    return Err(path_error(
                        bundle,
                        format!("{} is not a directory", at.display()),
                    ));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) => {
                    return Err(BundleError::Io {
                        path: at.clone(),
                        source: e,
                    })
                }
            }
        }
        Ok(bundle.to_owned())
    }

    async fn lock_path(&self, path: &Path) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.retain(|_, w| w.strong_count() > 0);
            match locks.get(path).and_then(Weak::upgrade) {
                Some(m) => m,
                None => {
                    let m = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(path.to_owned(), Arc::downgrade(&m));
                    m
                }
            }
        };
        m.lock_owned().await
    }

    /// Takes the bundle's lock (waits while another pull or removal of it runs).
    pub async fn lock(&self, bundle: &Path) -> BundleLock {
        BundleLock {
            _guard: self.lock_path(bundle).await,
            dirs: self.dirs(bundle),
        }
    }

    /// Takes lazy image `manifest_digest`'s lock, after a bundle lock (waits while another
    /// bundle of the image mounts, joins, leaves or unmounts its rootfs).
    pub async fn lock_image(&self, manifest_digest: &str) -> ImageLock {
        ImageLock {
            _guard: self.lock_path(&self.lazy_dir(manifest_digest)).await,
            digest: manifest_digest.to_owned(),
        }
    }

    /// The mount point of the image's lazy rootfs, if this process serves one that a new
    /// bundle can join.
    pub fn shared_rootfs(&self, image: &ImageLock) -> Option<PathBuf> {
        let mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        mounts
            .get(&image.digest)
            .map(|s| s.mount.mountpoint().to_owned())
    }

    /// The bundles whose records say they sit on lazy image `manifest_digest`'s rootfs.
    pub fn lazy_users(&self, manifest_digest: &str) -> io::Result<BTreeSet<PathBuf>> {
        Ok(self
            .records()?
            .into_iter()
            .filter(|r| r.lazy && r.manifest_digest == manifest_digest)
            .map(|r| r.bundle)
            .collect())
    }

    /// Serves `users` from `mount`, the image's lazy rootfs taken over from an earlier run of
    /// the puller (a later bundle of the image joins it, the last one to go unmounts it).
    pub fn adopt_lazy(&self, image: &ImageLock, mount: RafsMount, users: BTreeSet<PathBuf>) {
        let mut mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = mounts.insert(image.digest.clone(), SharedMount { mount, users }) {
            // Unreachable: adoption happens before any pull; never leak a server if it does.
            old.mount.unmount();
        }
    }

    /// All bundle records.
    pub fn records(&self) -> io::Result<Vec<BundleRecord>> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.store.root().join("bundles"))? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "json") {
                out.push(Self::read_record(&p)?);
            }
        }
        Ok(out)
    }

    fn read_record(path: &Path) -> io::Result<BundleRecord> {
        let data = fs::read(path)?;
        serde_json::from_slice(&data).map_err(|err| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bundle record {}: {err}", path.display()),
            )
        })
    }

    fn write_record(dirs: &BundleDirs, record: &BundleRecord) -> io::Result<()> {
        let json = serde_json::to_vec(record).map_err(io::Error::other)?;
        let tmp = dirs.record.with_extension("tmp");
        let mut f = fs::File::create(&tmp)?;
        let written = f.write_all(&json).and_then(|()| f.sync_all());
        drop(f);
        if let Err(e) = written.and_then(|()| fs::rename(&tmp, &dirs.record)) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(())
    }

    /// Refuses a bundle the puller cannot pull into: one with a mounted rootfs (`Busy`), or
    /// one holding a `config.json` or a non-empty `rootfs` the puller did not make.
    pub fn check_free(dirs: &BundleDirs) -> Result<(), BundleError> {
        let rootfs = dirs.bundle.join("rootfs");
        let ours = dirs.record.exists();
        if bundle::is_mountpoint(&rootfs) {
            return Err(BundleError::Busy(dirs.bundle.clone()));
        }
        if ours {
            return Ok(());
        }
        let config = dirs.bundle.join("config.json");
        if fs::symlink_metadata(&config).is_ok() {
            return Err(BundleError::Foreign(config));
        }
        match fs::symlink_metadata(&rootfs) {
            Ok(m) if !m.is_dir() => Err(BundleError::Foreign(rootfs)),
            Ok(_) => match fs::read_dir(&rootfs).map(|mut it| it.next().is_some()) {
                Ok(true) => Err(BundleError::Foreign(rootfs)),
                Ok(false) => Ok(()),
                Err(e) => Err(BundleError::Io {
                    path: rootfs,
                    source: e,
                }),
            },
            Err(_) => Ok(()),
        }
    }

    /// The tail every pull shares: refuses a busy or foreign bundle, writes the record, runs
    /// `make` (which mounts the rootfs and writes `config.json`, returning the lazy rootfs if
    /// there is one, under the image's lock `image`, held until the mount is kept) and keeps
    /// the mount; on failure nothing of the bundle is left behind (`make` undoes a lazy mount
    /// it made).
    /// Runs on a blocking thread to the end even if the caller stops waiting, so a cancelled
    /// pull never leaves half a bundle.
    pub async fn create<E>(
        self: &Arc<Self>,
        lock: BundleLock,
        image: Option<ImageLock>,
        record: BundleRecord,
        make: impl FnOnce(&BundleDirs) -> Result<Option<LazyRootfs>, E> + Send + 'static,
    ) -> Result<(), E>
    where
        E: From<BundleError> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let dirs = lock.dirs.clone();
            Self::check_free(&dirs)?;
            Self::write_record(&dirs, &record).map_err(|e| BundleError::Io {
                path: dirs.record.clone(),
                source: e,
            })?;
            match make(&dirs) {
                Ok(lazy) => {
                    if let Some(l) = lazy {
                        this.join_lazy(&record.manifest_digest, &dirs.bundle, l);
                    }
                    drop(image);
                    drop(lock);
                    Ok(())
                }
                Err(e) => {
                    let _ = remove_file_if_present(&dirs.record);
                    let _ = remove_dir_if_present(&dirs.overlay);
                    Err(e)
                }
            }
        })
        .await
        .map_err(|e| {
            E::from(BundleError::Io {
                path: PathBuf::from("bundle creation task"),
                source: io::Error::other(e),
            })
        })?
    }

    /// Adds `bundle` to the users of the image's lazy rootfs (a new mount, or the shared one).
    fn join_lazy(&self, digest: &str, bundle: &Path, lazy: LazyRootfs) {
        let mut mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        match lazy {
            LazyRootfs::Mounted(mount) => {
                let mount = *mount;
                let users = BTreeSet::from([bundle.to_owned()]);
                if let Some(old) = mounts.insert(digest.to_owned(), SharedMount { mount, users }) {
                    // Unreachable under the image lock; never leak a server if it happens.
                    old.mount.unmount();
                }
            }
            LazyRootfs::Shared => {
                if let Some(s) = mounts.get_mut(digest) {
                    s.users.insert(bundle.to_owned());
                }
            }
        }
    }

    /// Takes `bundle` off the users of the image's lazy rootfs, and unmounts and removes it
    /// when no bundle uses it any more (blocking). Where this process does not serve the
    /// mount (an earlier run made it, or this is `guest-puller unmount`), the records say
    /// whether another bundle still sits on it.
    fn leave_lazy(&self, image: &ImageLock, bundle: &Path) -> io::Result<()> {
        let dir = self.lazy_dir(&image.digest);
        let mut mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = mounts.get_mut(&image.digest) {
            s.users.remove(bundle);
            if !s.users.is_empty() {
                return Ok(());
            }
            if let Some(s) = mounts.remove(&image.digest) {
                drop(mounts);
                info!(image = %image.digest, mountpoint = %s.mount.mountpoint().display(),
                      "lazy rootfs unmounted (its last bundle is gone)");
                s.mount.unmount();
            }
        } else {
            drop(mounts);
            let others = self
                .lazy_users(&image.digest)?
                .into_iter()
                .any(|b| b != bundle);
            if others {
                return Ok(());
            }
        }
        let mnt = dir.join("rootfs");
        if bundle::is_mountpoint(&mnt) {
            let _ = unmount(&mnt, UnmountFlags::DETACH);
        }
        remove_dir_if_present(&dir)
    }

    /// Removes the lazy state dirs of images no bundle record sits on and that this process
    /// does not serve: left by a crash between a mount and its record's removal, or made by
    /// releases before bundles shared them (one dir per bundle). For start-up, after held
    /// mounts were taken over. Returns how many went.
    pub fn sweep_lazy_dirs(&self) -> io::Result<usize> {
        let dirs: Vec<PathBuf> = fs::read_dir(self.store.root().join("lazy"))?
            .map(|e| e.map(|e| e.path()))
            .collect::<io::Result<_>>()?;
        // Read after listing: a pull writes its record before it makes its dir.
        let mut keep: BTreeSet<PathBuf> = self
            .records()?
            .into_iter()
            .filter(|r| r.lazy)
            .map(|r| self.lazy_dir(&r.manifest_digest))
            .collect();
        let mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        keep.extend(mounts.keys().map(|d| self.lazy_dir(d)));
        drop(mounts);
        let mut swept = 0;
        for d in dirs.into_iter().filter(|d| d.is_dir() && !keep.contains(d)) {
            info!(dir = %d.display(), "removing a lazy state dir no bundle uses");
            Self::remove_lazy_dir(&d);
            swept += 1;
        }
        Ok(swept)
    }

    /// Clears a lazy state dir, detaching a FUSE mount an earlier run of the puller left there
    /// (it has no server any more).
    pub fn remove_lazy_dir(dir: &Path) {
        let mnt = dir.join("rootfs");
        if bundle::is_mountpoint(&mnt) {
            let _ = unmount(&mnt, UnmountFlags::DETACH);
        }
        if let Err(e) = remove_dir_if_present(dir) {
            warn!(dir = %dir.display(), "removing lazy state: {e}");
        }
    }

    /// Unmounts and removes a bundle's rootfs, `config.json`, overlay and record, leaves its
    /// image's lazy rootfs (removed with its last bundle), then garbage-collects layers no
    /// bundle uses.
    pub async fn remove(self: &Arc<Self>, bundle: &Path) -> Result<(), BundleError> {
        let lock = self.lock(bundle).await;
        let image = match Self::read_record(&lock.dirs.record).ok().filter(|r| r.lazy) {
            Some(r) => Some(self.lock_image(&r.manifest_digest).await),
            None => None,
        };
        let this = self.clone();
        let joined = tokio::task::spawn_blocking(move || -> Result<(), BundleError> {
            let dirs = lock.dirs.clone();
            bundle::remove_bundle(&dirs.bundle, &dirs.overlay)?;
            // The overlay is gone, so the lazy rootfs below it may go too.
            if let Some(image) = &image {
                this.leave_lazy(image, &dirs.bundle)
                    .map_err(|source| BundleError::Io {
                        path: this.lazy_dir(&image.digest),
                        source,
                    })?;
            }
            remove_file_if_present(&dirs.record).map_err(|source| BundleError::Io {
                path: dirs.record.clone(),
                source,
            })?;
            drop(image);
            drop(lock);
            this.gc().map_err(|source| BundleError::Io {
                path: this.store.root().join("layers"),
                source,
            })?;
            Ok(())
        })
        .await;
        joined.map_err(|e| BundleError::Io {
            path: bundle.to_owned(),
            source: io::Error::other(e),
        })?
    }

    /// Removes layers no bundle record references and no pull has pinned.
    pub fn gc(&self) -> io::Result<Vec<String>> {
        self.store
            .gc(|| Ok(self.records()?.into_iter().flat_map(|r| r.layers).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(roots: &[&str]) -> (tempfile::TempDir, Arc<Bundles>) {
        let dir = tempfile::tempdir().unwrap();
        let store = LayerStore::open(&dir.path().join("work")).unwrap();
        let roots = roots.iter().map(|r| dir.path().join(r)).collect();
        (dir, Bundles::open(store, roots).unwrap())
    }

    #[test]
    fn a_removed_work_dir_gets_its_bundle_dirs_back() {
        let (dir, b) = setup(&["run"]);
        let work = dir.path().join("work");
        b.ensure_layout().unwrap();
        fs::remove_dir_all(&work).unwrap();
        assert!(b.records().is_err());
        b.ensure_layout().unwrap();
        for d in ["layers", "staging", "bundles", "overlay", "lazy"] {
            assert!(work.join(d).is_dir(), "{d}");
        }
        assert!(b.store().staging_dir().is_dir());
        assert!(b.records().unwrap().is_empty());
    }

    #[test]
    fn bundle_paths_are_confined() {
        let (dir, b) = setup(&["run"]);
        let d = dir.path();
        fs::create_dir_all(d.join("run/ok")).unwrap();
        fs::create_dir_all(d.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(d.join("elsewhere"), d.join("run/link")).unwrap();
        fs::write(d.join("run/file"), "x").unwrap();
        assert_eq!(b.check_path(&d.join("run/ok")).unwrap(), d.join("run/ok"));
        // Not yet existing components are fine: the puller creates them.
        assert!(b.check_path(&d.join("run/ok/new/deeper")).is_ok());
        let bad: Vec<(PathBuf, &str)> = vec![
            (d.join("elsewhere/c1"), "not below a bundle root"),
            (d.join("run"), "not below a bundle root"),
            (d.join("run/../elsewhere"), "`..`"),
            (d.join("run/./ok"), "`..`"),
            (PathBuf::from(format!("{}/run//ok", d.display())), "empty"),
            (PathBuf::from("run/ok"), "absolute"),
            (d.join("run/link"), "is a symlink"),
            (d.join("run/link/c1"), "is a symlink"),
            (d.join("run/file/c1"), "not a directory"),
            (
                PathBuf::from(std::ffi::OsStr::from_bytes(
                    format!("{}/run/a\0b", d.display()).as_bytes(),
                )),
                "NUL",
            ),
            (
                PathBuf::from(std::ffi::OsStr::from_bytes(
                    &[format!("{}/run/", d.display()).as_bytes(), b"\xff"].concat(),
                )),
                "UTF-8",
            ),
        ];
        for (p, why) in bad {
            let e = b.check_path(&p).unwrap_err();
            assert!(matches!(e, BundleError::Path { .. }), "{p:?}: {e:?}");
            assert!(e.to_string().contains(why), "{p:?}: {e}");
        }
    }

    #[test]
    fn the_work_dir_is_never_a_bundle() {
        let (dir, b) = setup(&[""]);
        for p in ["work", "work/layers/x", ""] {
            let p = dir.path().join(p);
            let p = PathBuf::from(p.to_str().unwrap().trim_end_matches('/'));
            let e = b.check_path(&p).unwrap_err();
            assert!(
                e.to_string().contains("work dir") || e.to_string().contains("bundle root"),
                "{p:?}: {e}"
            );
        }
    }

    fn record(bundle: &Path) -> BundleRecord {
        BundleRecord {
            bundle: bundle.to_owned(),
            image: "img".into(),
            manifest_digest: "sha256:00".into(),
            layers: vec!["sha256:aa".into()],
            lazy: false,
        }
    }

    #[tokio::test]
    async fn foreign_bundles_are_refused_and_failures_leave_nothing() {
        let (dir, b) = setup(&["run"]);
        let bundle = dir.path().join("run/c1");
        fs::create_dir_all(bundle.join("rootfs")).unwrap();
        fs::write(bundle.join("config.json"), "{\"theirs\":1}").unwrap();
        let lock = b.lock(&bundle).await;
        let e = b
            .create(lock, None, record(&bundle), |_| -> Result<_, BundleError> {
                panic!("must not run for a foreign bundle")
            })
            .await
            .unwrap_err();
        assert!(matches!(e, BundleError::Foreign(_)), "{e:?}");
        assert_eq!(
            fs::read_to_string(bundle.join("config.json")).unwrap(),
            "{\"theirs\":1}"
        );
        fs::remove_file(bundle.join("config.json")).unwrap();
        fs::write(bundle.join("rootfs/theirs"), "x").unwrap();
        let e = b
            .create(
                b.lock(&bundle).await,
                None,
                record(&bundle),
                |_| -> Result<_, BundleError> { panic!("must not run for a foreign rootfs") },
            )
            .await
            .unwrap_err();
        assert!(matches!(e, BundleError::Foreign(_)), "{e:?}");
        fs::remove_file(bundle.join("rootfs/theirs")).unwrap();
        // A failing make leaves no record or overlay.
        let dirs = b.dirs(&bundle);
        let e = b
            .create(b.lock(&bundle).await, None, record(&bundle), |d| {
                fs::create_dir_all(d.overlay.join("upper")).unwrap();
                assert!(d.record.exists());
                Err(BundleError::Config("boom".into()))
            })
            .await
            .unwrap_err();
        assert!(matches!(e, BundleError::Config(_)));
        assert!(!dirs.record.exists() && !dirs.overlay.exists());
        // A successful one keeps a complete record, and the bundle is then ours.
        b.create(b.lock(&bundle).await, None, record(&bundle), |d| {
            fs::write(d.bundle.join("config.json"), "{}").unwrap();
            Ok::<_, BundleError>(None)
        })
        .await
        .unwrap();
        assert_eq!(b.records().unwrap()[0].bundle, bundle);
        let names: Vec<_> = fs::read_dir(dir.path().join("work/bundles"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        b.create(b.lock(&bundle).await, None, record(&bundle), |_| {
            Ok::<_, BundleError>(None)
        })
        .await
        .unwrap();
        b.remove(&bundle).await.unwrap();
        assert!(b.records().unwrap().is_empty());
        assert!(!bundle.join("config.json").exists());
    }

    #[tokio::test]
    async fn a_lazy_image_dir_goes_with_the_last_bundle_on_it() {
        // No mount served by this process (as for `guest-puller unmount`): the records decide.
        let (dir, b) = setup(&["run"]);
        let lazy = |bundle: &Path| BundleRecord {
            layers: Vec::new(),
            lazy: true,
            ..record(bundle)
        };
        let (c1, c2) = (dir.path().join("run/c1"), dir.path().join("run/c2"));
        for c in [&c1, &c2] {
            b.create(b.lock(c).await, None, lazy(c), |_| {
                Ok::<_, BundleError>(None)
            })
            .await
            .unwrap();
        }
        let state = b.lazy_dir("sha256:00");
        fs::create_dir_all(state.join("cache")).unwrap();
        assert_ne!(state, b.lazy_dir("sha256:01"));
        b.remove(&c1).await.unwrap();
        assert!(state.join("cache").is_dir(), "c2 still sits on it");
        b.remove(&c2).await.unwrap();
        assert!(!state.exists());
        assert!(b.records().unwrap().is_empty());
    }

    #[tokio::test]
    async fn lazy_dirs_no_record_sits_on_are_swept() {
        let (dir, b) = setup(&["run"]);
        let c1 = dir.path().join("run/c1");
        let lazy = BundleRecord {
            layers: Vec::new(),
            lazy: true,
            ..record(&c1)
        };
        b.create(b.lock(&c1).await, None, lazy, |_| {
            Ok::<_, BundleError>(None)
        })
        .await
        .unwrap();
        let used = b.lazy_dir("sha256:00");
        let stale = b.lazy_dir("sha256:01");
        // A dir of the per-bundle layout: named by no manifest digest.
        let old = dir.path().join("work/lazy").join("0".repeat(64));
        for d in [&used, &stale, &old] {
            fs::create_dir_all(d.join("cache")).unwrap();
        }
        assert_eq!(b.sweep_lazy_dirs().unwrap(), 2);
        assert!(used.join("cache").is_dir());
        assert!(!stale.exists() && !old.exists());
        assert_eq!(b.sweep_lazy_dirs().unwrap(), 0);
    }

    #[tokio::test]
    async fn one_holder_per_bundle() {
        let (dir, b) = setup(&["run"]);
        let bundle = dir.path().join("run/c1");
        let first = b.lock(&bundle).await;
        let b2 = b.clone();
        let bundle2 = bundle.clone();
        let waiter = tokio::spawn(async move {
            let _l = b2.lock(&bundle2).await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        // Another bundle is not blocked.
        drop(b.lock(&dir.path().join("run/c2")).await);
        drop(first);
        waiter.await.unwrap();
    }
}
