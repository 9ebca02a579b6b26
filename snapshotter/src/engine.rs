//! Snapshot semantics (synchronous core behind the gRPC service).
//!
//! Three flavors of snapshot (see [`Flavor`]):
//! - **Marker**: a guest-pull layer. A Prepare carrying `containerd.io/snapshot.ref`
//!   commits a record named exactly the label value (parent = the parent argument,
//!   all labels kept plus `containerd.io/snapshot/nydus-proxy-mode=true`) and answers
//!   AlreadyExists, so containerd Stat()s it and never fetches the layer blob. No
//!   directory, no active record.
//! - **GuestPull**: a container Prepare/View above a marker chain: one
//!   `fuse.nydus-overlayfs` mount with a Kata `image_guest_pull` volume.
//! - **Plain**: everything else, with containerd overlayfs semantics and real content.
//!
//! Mixed chains follow nydus `treatAsProxyDriver` (applied to the parent): a marker
//! or guest-pull parent → guest pull; a plain parent carrying `cri.image-ref` → plain;
//! a label-less plain parent (the `image.Unpack` fallback) → `plain_chain_mode`
//! (default guest pull, like nydus; the helper still mounts real layers for runc).
//! The fallback unpack's own `extract-…` Prepare is always plain: the host applier
//! needs writable real directories, and AlreadyExists there would loop forever.
//!
//! Crash safety: records change only in redb transactions; directories are built
//! under `snapshots/new-*` and renamed to `snapshots/<id>` inside the transaction
//! that creates the record. Anything a crash leaves behind is an orphan directory
//! that Cleanup removes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use tracing::{debug, info, warn};

use crate::config::{Config, PlainChainMode};
use crate::error::{Error, Result};
use crate::filter::{Adaptor, Filter};
use crate::limits;
use crate::mounts::{self, Mount, Upper};
use crate::store::{DiskUsage, Flavor, Kind, NewSnapshot, Record, Store};
use crate::volume::KataVirtualVolume;

/// containerd's unpacker label: its value is the chain ID to commit under.
pub const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// CRI image reference label.
pub const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// CRI compressed layer digest label.
pub const LABEL_CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// CRI manifest digest label.
pub const LABEL_CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// Marker added to guest-pull layers (nydus compatibility).
pub const LABEL_PROXY_MODE: &str = "containerd.io/snapshot/nydus-proxy-mode";
/// Set on markers recreated by self-healing.
pub const LABEL_RECOVERED: &str = "containerd.io/snapshot/guestpull.recovered";
/// Unix seconds of the recovery.
pub const LABEL_RECOVERED_AT: &str = "containerd.io/snapshot/guestpull.recovered-at";
/// Volume metadata key listing layer digests bottom to top, comma separated.
pub const METADATA_LAYER_DIGESTS: &str = "io.guestpull.layer-digests";

/// Public view of a snapshot (what Stat/List/Update return).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Key or name.
    pub name: String,
    /// Kind.
    pub kind: Kind,
    /// Parent name ("" for none).
    pub parent: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time (ns since epoch).
    pub created_ns: u64,
    /// Update time (ns since epoch).
    pub updated_ns: u64,
}

impl SnapshotInfo {
    fn new(name: &str, r: &Record) -> Self {
        SnapshotInfo {
            name: name.to_string(),
            kind: r.kind,
            parent: r.parent.clone(),
            labels: r.labels.clone(),
            created_ns: r.created_ns,
            updated_ns: r.updated_ns,
        }
    }
}

impl Adaptor for SnapshotInfo {
    fn field(&self, path: &[String]) -> Option<String> {
        // Like containerd's snapshot adaptor: name and parent are always present, so
        // `parent==""` matches base layers (the unpacker sends exactly that).
        match (path.first().map(String::as_str), path.len()) {
            (Some("kind"), 1) => Some(self.kind.as_str().to_string()),
            (Some("name"), 1) => Some(self.name.clone()),
            (Some("parent"), 1) => Some(self.parent.clone()),
            (Some("labels"), n) if n > 1 => self.labels.get(&path[1..].join(".")).cloned(),
            _ => None,
        }
    }
}

/// Counters for operators (logged; useful to verify guest pull is really used).
#[derive(Debug, Default)]
pub struct Stats {
    /// Layer Prepares answered with a marker.
    pub guest_pull_layers: AtomicU64,
    /// Lost chain-ID parents recreated by self-healing.
    pub recovered_parents: AtomicU64,
    /// Container snapshots on label-less plain chains given a guest-pull volume.
    pub plain_chains_as_guest_pull: AtomicU64,
}

/// What Cleanup did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// Directories removed.
    pub removed: Vec<PathBuf>,
    /// Entries left alone: names we never create, ids this store never handed out.
    pub kept: Vec<PathBuf>,
}

/// The snapshotter core.
pub struct Engine {
    cfg: Config,
    mount_type: String,
    store: Store,
    snapshots_dir: PathBuf,
    empty_dir: PathBuf,
    /// Creators hold it shared while a `new-*` directory is unowned; Cleanup holds it
    /// exclusively so it never deletes a directory that is about to be renamed.
    dirs: RwLock<()>,
    tmp_seq: AtomicU64,
    stats: Stats,
}

/// Whether `s` looks like a chain ID (`sha256:` + 64 lowercase hex).
pub fn is_chain_id(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// Whether `key` is an unpacker key (`[<ns>/<seq>/]extract-<…> <chainID>`).
pub fn is_extract_key(key: &str) -> bool {
    let parts: Vec<&str> = key.splitn(3, '/').collect();
    let last = if parts.len() == 3 { parts[2] } else { key };
    last.starts_with("extract-")
}

/// Labels of a marker recreated by self-healing.
fn recovered_labels(name: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    labels.insert(LABEL_SNAPSHOT_REF.to_string(), name.to_string());
    labels.insert(LABEL_PROXY_MODE.to_string(), "true".to_string());
    labels.insert(LABEL_RECOVERED.to_string(), "true".to_string());
    labels.insert(
        LABEL_RECOVERED_AT.to_string(),
        (crate::store::now_ns() / 1_000_000_000).to_string(),
    );
    labels
}

/// A Prepare's parent as found in the store.
enum Parent {
    /// No parent.
    None,
    /// Stored.
    Existing(Record),
    /// Lost chain ID, to be recreated as a marker with these labels.
    Heal(BTreeMap<String, String>),
}

impl Parent {
    /// What the new snapshot's flavor is derived from (a healed parent is a marker).
    fn record(&self) -> Option<Record> {
        match self {
            Parent::None => None,
            Parent::Existing(r) => Some(r.clone()),
            Parent::Heal(labels) => Some(Record {
                id: 0,
                kind: Kind::Committed,
                parent: String::new(),
                labels: labels.clone(),
                flavor: Flavor::Marker,
                created_ns: 0,
                updated_ns: 0,
                usage: DiskUsage::default(),
            }),
        }
    }

    /// The labels for [`NewSnapshot::heal_parent`].
    fn heal_labels(self) -> Option<BTreeMap<String, String>> {
        match self {
            Parent::Heal(labels) => Some(labels),
            _ => None,
        }
    }
}

/// Who an entry of `snapshots/` belongs to.
#[derive(Debug, PartialEq, Eq)]
enum DirClass {
    /// An id this store handed out (live, or an orphan for Cleanup), or a `new-*` build.
    Ours,
    /// An empty skeleton at the id after the last one: a crash between the rename into
    /// place and the commit of its record (ids are allocated inside that transaction).
    CrashLeftover,
    /// An id this store never handed out: the store does not match the directories.
    Foreign,
    /// Not a name we ever create (e.g. `lost+found`): never touched.
    Other,
}

/// Classifies entry `name` of `snapshots/`, given the store's last allocated id.
fn classify_dir(name: &std::ffi::OsStr, path: &Path, last_id: u64) -> DirClass {
    let Some(name) = name.to_str() else {
        return DirClass::Other;
    };
    if name.starts_with("new-") {
        return DirClass::Ours;
    }
    match name.parse::<u64>() {
        Ok(id) if id.to_string() != name => DirClass::Other,
        Ok(id) if id <= last_id => DirClass::Ours,
        Ok(id) if id == last_id + 1 && is_empty_skeleton(path) => DirClass::CrashLeftover,
        Ok(_) => DirClass::Foreign,
        Err(_) => DirClass::Other,
    }
}

/// Whether `dir` holds nothing but empty `fs` and `work` directories.
fn is_empty_skeleton(dir: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    rd.into_iter().all(|e| {
        e.is_ok_and(|e| {
            matches!(e.file_name().to_str(), Some("fs" | "work"))
                && std::fs::read_dir(e.path()).is_ok_and(|mut d| d.next().is_none())
        })
    })
}

fn sorted(labels: HashMap<String, String>) -> BTreeMap<String, String> {
    labels.into_iter().collect()
}

fn mkdir(path: &Path, mode: u32) -> Result<()> {
    std::fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))
}

/// Disk usage like containerd's `fs.DiskUsage`: allocated blocks of unique inodes.
pub fn disk_usage(dir: &Path) -> Result<DiskUsage> {
    let mut seen = HashSet::new();
    let mut usage = DiskUsage::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("stat {}", p.display()), e)),
        };
        if seen.insert((md.dev(), md.ino())) {
            usage.inodes += 1;
            usage.size += (md.blocks() * 512) as i64;
        }
        if md.is_dir() {
            let rd = std::fs::read_dir(&p)
                .map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
            for entry in rd {
                let entry = entry.map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
                stack.push(entry.path());
            }
        }
    }
    Ok(usage)
}

impl Engine {
    /// Opens the state under `cfg.root` (creating it with mode 0700).
    pub fn open(cfg: Config) -> Result<Engine> {
        cfg.validate()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let root = cfg.root.clone();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(|e| Error::io(format!("creating {}", root.display()), e))?;
        let snapshots_dir = root.join("snapshots");
        let empty_dir = root.join("empty");
        for d in [&snapshots_dir, &empty_dir] {
            if !d.is_dir() {
                mkdir(d, 0o755)?;
            }
        }
        let store = Store::open(&root.join("metadata.db"))?;
        let engine = Engine {
            mount_type: cfg.mount_type(),
            cfg,
            store,
            snapshots_dir,
            empty_dir,
            dirs: RwLock::new(()),
            tmp_seq: AtomicU64::new(0),
            stats: Stats::default(),
        };
        engine.refuse_foreign_dirs()?;
        Ok(engine)
    }

    /// Refuses a store that did not allocate the directories under `snapshots/`.
    ///
    /// A missing, emptied or older `metadata.db` next to existing snapshot directories
    /// looks like a store whose snapshots were all removed, and containerd's next routine
    /// Cleanup would delete every directory, active writable layers included. Ids only grow,
    /// so a directory whose id the store never handed out proves the mismatch.
    fn refuse_foreign_dirs(&self) -> Result<()> {
        let last = self.store.last_id()?;
        let mut foreign: Vec<String> = Vec::new();
        let rd = std::fs::read_dir(&self.snapshots_dir)
            .map_err(|e| Error::io(format!("reading {}", self.snapshots_dir.display()), e))?;
        for entry in rd {
            let entry = entry.map_err(|e| Error::io("reading snapshots dir", e))?;
            if classify_dir(&entry.file_name(), &entry.path(), last) == DirClass::Foreign {
                foreign.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        if foreign.is_empty() {
            return Ok(());
        }
        foreign.sort_by_key(|n| n.parse::<u64>().unwrap_or(u64::MAX));
        let shown = foreign
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        Err(Error::Unsafe(format!(
            "{db} has handed out snapshot ids up to {last}, but {dir} holds {n} directories \
             it never allocated ({shown}{more}): the metadata was lost, emptied or replaced \
             by an older copy, and Cleanup would delete those directories. Restore the \
             matching metadata.db, or, if their content is not needed, move them out of {dir} \
             and start again",
            db = self.cfg.root.join("metadata.db").display(),
            dir = self.snapshots_dir.display(),
            n = foreign.len(),
            more = if foreign.len() > 10 { ", ..." } else { "" },
        )))
    }

    /// The configuration in effect.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Operation counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Directory of snapshot id `id`.
    pub fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir.join(id.to_string())
    }

    /// Stat; a missing chain-ID name is self-healed into a marker (see [`Self::heal`]).
    pub fn stat(&self, key: &str) -> Result<SnapshotInfo> {
        match self.store.get(key)? {
            Some(r) => Ok(SnapshotInfo::new(key, &r)),
            None if self.cfg.snapshot.self_heal && is_chain_id(key) => {
                // containerd only Stats names it still references; a missing chain ID
                // means our state was lost (wipe/reinstall) while containerd's meta.db
                // kept the layer, which otherwise fails every pull with "already exists".
                let r = self.heal(key, "stat")?;
                Ok(SnapshotInfo::new(key, &r))
            }
            None => Err(Error::NotFound(format!("snapshot {key:?}"))),
        }
    }

    /// Recreates a lost committed chain-ID snapshot as a guest-pull marker.
    fn heal(&self, name: &str, during: &str) -> Result<Record> {
        let new = NewSnapshot {
            kind: Kind::Committed,
            parent: String::new(),
            labels: recovered_labels(name),
            flavor: Flavor::Marker,
            heal_parent: None,
        };
        match self.store.create(name, new, |_| Ok(())) {
            Ok(c) => {
                self.healed(name, during);
                Ok(c.record)
            }
            Err(Error::AlreadyExists(_)) => self
                .store
                .get(name)?
                .ok_or_else(|| Error::NotFound(format!("snapshot {name:?}"))),
            Err(e) => Err(e),
        }
    }

    /// Counts and logs a marker recreated by self-healing.
    fn healed(&self, name: &str, during: &str) {
        let n = self.stats.recovered_parents.fetch_add(1, Ordering::Relaxed) + 1;
        warn!(
            snapshot = name,
            during,
            recovered_total = n,
            "snapshot referenced by containerd is missing from our store; \
             recreated it as a committed guest-pull marker (state was wiped or lost?)"
        );
    }

    /// The parent's record, or (when it is a lost chain ID and self-healing is on) the
    /// labels of the marker [`Store::create`] recreates for it in the creating transaction,
    /// so a Prepare that fails leaves no healed parent behind.
    fn parent_of(&self, parent: &str) -> Result<Parent> {
        if parent.is_empty() {
            return Ok(Parent::None);
        }
        match self.store.get(parent)? {
            Some(r) => Ok(Parent::Existing(r)),
            None if self.cfg.snapshot.self_heal && is_chain_id(parent) => {
                Ok(Parent::Heal(recovered_labels(parent)))
            }
            None => Err(Error::NotFound(format!("parent snapshot {parent:?}"))),
        }
    }

    /// Prepare: an active snapshot (or, with `snapshot.ref`, a guest-pull marker + AlreadyExists).
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, sorted(labels))
    }

    /// View: a read-only snapshot of `parent`.
    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, sorted(labels))
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        // Before logging: a request far beyond containerd's limits is refused, not echoed.
        limits::check_key("key", key)?;
        limits::check_key("parent", parent)?;
        limits::check_labels(&labels)?;
        info!(op = kind.as_str(), key, parent, ?labels, "prepare");
        if key.is_empty() {
            return Err(Error::InvalidArgument("empty snapshot key".into()));
        }
        if kind == Kind::Active && labels.contains_key(LABEL_SNAPSHOT_REF) {
            return Err(self.guest_pull_layer(key, parent, labels));
        }
        let parent_found = self.parent_of(parent)?;
        let flavor = self.decide_flavor(key, parent_found.record().as_ref());

        let _guard = self.dirs.read().unwrap_or_else(|e| e.into_inner());
        let tmp = self.snapshots_dir.join(format!(
            "new-{}-{}",
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let built = (|| {
            mkdir(&tmp, 0o755)?;
            mkdir(&tmp.join("fs"), 0o755)?;
            mkdir(&tmp.join("work"), 0o711)
        })();
        let created = built.and_then(|_| {
            let new = NewSnapshot {
                kind,
                parent: parent.to_string(),
                labels,
                flavor,
                heal_parent: parent_found.heal_labels(),
            };
            self.store.create(key, new, |rec| {
                let dst = self.snapshot_dir(rec.id);
                // An existing dst can only be an orphan of a crash between rename and
                // commit (the id was never committed), so it is safe to replace.
                if dst.exists() {
                    std::fs::remove_dir_all(&dst)
                        .map_err(|e| Error::io(format!("removing orphan {}", dst.display()), e))?;
                }
                // No directory fsync: the record's fsync (redb) orders after these
                // metadata operations on journaling filesystems, and should a crash still
                // lose them, Mounts recreates an active snapshot's (empty) directories.
                std::fs::rename(&tmp, &dst)
                    .map_err(|e| Error::io(format!("renaming {} into place", tmp.display()), e))
            })
        });
        let created = match created {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        drop(_guard);
        if created.healed_parent.is_some() {
            self.healed(parent, "prepare");
        }
        let rec = created.record;
        debug!(key, id = rec.id, ?flavor, "created snapshot");
        self.mounts_of(key, &rec)
    }

    fn decide_flavor(&self, key: &str, parent: Option<&Record>) -> Flavor {
        let Some(parent) = parent else {
            return Flavor::Plain;
        };
        if is_extract_key(key) {
            return Flavor::Plain;
        }
        match parent.flavor {
            Flavor::Marker | Flavor::GuestPull => Flavor::GuestPull,
            Flavor::Plain if parent.labels.contains_key(LABEL_CRI_IMAGE_REF) => Flavor::Plain,
            Flavor::Plain => match self.cfg.snapshot.plain_chain_mode {
                PlainChainMode::Overlay => Flavor::Plain,
                PlainChainMode::GuestPull => {
                    self.stats
                        .plain_chains_as_guest_pull
                        .fetch_add(1, Ordering::Relaxed);
                    info!(
                        key,
                        "parent chain was unpacked on the host without labels; \
                         answering with a guest-pull volume (plain_chain_mode = guest-pull)"
                    );
                    Flavor::GuestPull
                }
            },
        }
    }

    /// Handles a layer Prepare carrying `snapshot.ref`; always returns the error to send.
    fn guest_pull_layer(
        &self,
        key: &str,
        parent: &str,
        mut labels: BTreeMap<String, String>,
    ) -> Error {
        let target = labels.get(LABEL_SNAPSHOT_REF).cloned().unwrap_or_default();
        if target.is_empty() {
            return Error::InvalidArgument(format!("{LABEL_SNAPSHOT_REF} label is empty"));
        }
        if self.cfg.snapshot.strict && !labels.contains_key(LABEL_CRI_LAYER_DIGEST) {
            return Error::FailedPrecondition(format!(
                "strict mode: layer snapshot {target:?} (key {key:?}) has no \
                 {LABEL_CRI_LAYER_DIGEST} label; containerd is not passing CRI snapshot \
                 annotations (set disable_snapshot_annotations = false, pull through CRI with a \
                 runtime handler mapped to this snapshotter) or set snapshot.strict = false"
            ));
        }
        let result = (|| -> Result<()> {
            if let Some(existing) = self.store.get(&target)? {
                self.repair_recovered(&target, &existing, parent, &labels)?;
                return Ok(());
            }
            let heal_parent = self.parent_of(parent)?.heal_labels();
            labels.insert(LABEL_PROXY_MODE.to_string(), "true".to_string());
            let new = NewSnapshot {
                kind: Kind::Committed,
                parent: parent.to_string(),
                labels,
                flavor: Flavor::Marker,
                heal_parent,
            };
            match self.store.create(&target, new, |_| Ok(())) {
                Ok(c) => {
                    if c.healed_parent.is_some() {
                        self.healed(parent, "prepare");
                    }
                    let n = self.stats.guest_pull_layers.fetch_add(1, Ordering::Relaxed) + 1;
                    info!(target = %target, parent, guest_pull_layers = n, "committed guest-pull layer marker");
                    Ok(())
                }
                Err(Error::AlreadyExists(_)) => Ok(()),
                Err(e) => Err(e),
            }
        })();
        match result {
            Ok(()) => Error::AlreadyExists(format!("target snapshot {target:?}")),
            Err(e) => e,
        }
    }

    /// A self-healed marker has no parent and no real labels; when the real layer
    /// Prepare arrives, give it the true parent (so containerd's parent check passes) and
    /// the layer's labels (image reference, digests for the Kata volume).
    fn repair_recovered(
        &self,
        target: &str,
        existing: &Record,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        // Also when the parent already matches (a base layer): the labels are what the
        // healed marker lost.
        if !existing.labels.contains_key(LABEL_RECOVERED) {
            return Ok(());
        }
        if !parent.is_empty() && self.store.get(parent)?.is_none() {
            return Ok(());
        }
        self.store.update(target, |r| {
            r.parent = parent.to_string();
            r.labels.extend(labels.clone());
            r.labels.remove(LABEL_RECOVERED);
            r.labels.remove(LABEL_RECOVERED_AT);
            Ok(())
        })?;
        info!(target, parent, "repaired parent of a self-healed marker");
        Ok(())
    }

    /// Mounts of an active or view snapshot.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let rec = self
            .store
            .get(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))?;
        self.mounts_of(key, &rec)
    }

    fn mounts_of(&self, key: &str, rec: &Record) -> Result<Vec<Mount>> {
        if rec.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is committed; mounts are only available for active and view snapshots"
            )));
        }
        let ancestors = self.store.ancestors(key)?;
        let mut lowers: Vec<PathBuf> = ancestors
            .iter()
            .filter(|(_, r)| r.has_dir())
            .map(|(_, r)| self.snapshot_dir(r.id).join("fs"))
            .collect();
        let dir = self.snapshot_dir(rec.id);
        let upper = Upper {
            upper: dir.join("fs"),
            work: dir.join("work"),
        };
        if !upper.upper.is_dir() || !upper.work.is_dir() {
            // Only after a crash lost the directory operations of a fresh snapshot:
            // its content was necessarily empty, so recreating it loses nothing.
            warn!(key, dir = %dir.display(), "snapshot directories missing; recreating them empty");
            for d in [&upper.upper, &upper.work] {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(d)
                    .map_err(|e| Error::io(format!("recreating {}", d.display()), e))?;
            }
        }
        let readonly = rec.kind == Kind::View;
        let volatile = self.cfg.snapshot.overlayfs_volatile;
        if rec.flavor == Flavor::Plain && ancestors.is_empty() {
            return Ok(vec![mounts::bind(&upper.upper, readonly)]);
        }
        if lowers.is_empty() {
            lowers.push(self.empty_dir.clone());
        }
        if rec.flavor == Flavor::GuestPull {
            let volume = self.volume_for(&ancestors);
            return Ok(vec![mounts::guest_pull(
                &self.mount_type,
                &lowers,
                &upper,
                readonly,
                volatile && !readonly,
                &volume,
            )]);
        }
        if readonly {
            if lowers.len() == 1 {
                return Ok(vec![mounts::bind(&lowers[0], true)]);
            }
            return Ok(vec![mounts::overlay(&lowers, None, false)]);
        }
        Ok(vec![mounts::overlay(&lowers, Some(&upper), volatile)])
    }

    /// The Kata volume for a chain (nearest ancestor first): deterministic for a state.
    fn volume_for(&self, ancestors: &[(String, Record)]) -> KataVirtualVolume {
        let find = |label: &str| {
            ancestors
                .iter()
                .find_map(|(_, r)| r.labels.get(label).filter(|v| !v.is_empty()).cloned())
        };
        let mut metadata = BTreeMap::new();
        let image_ref = find(LABEL_CRI_IMAGE_REF);
        if let Some(r) = &image_ref {
            metadata.insert(LABEL_CRI_IMAGE_REF.to_string(), r.clone());
        }
        if let Some(m) = find(LABEL_CRI_MANIFEST_DIGEST) {
            metadata.insert(LABEL_CRI_MANIFEST_DIGEST.to_string(), m);
        }
        if let Some(top) = find(LABEL_CRI_LAYER_DIGEST) {
            metadata.insert(LABEL_CRI_LAYER_DIGEST.to_string(), top);
        }
        // All or nothing: a chain with a self-healed marker (which lost its digest) would
        // otherwise list some layers and read as a complete, wrong list.
        let digests: Option<Vec<&str>> = ancestors
            .iter()
            .rev()
            .map(|(_, r)| r.labels.get(LABEL_CRI_LAYER_DIGEST).map(String::as_str))
            .collect();
        if let Some(digests) = digests.filter(|d| !d.is_empty()) {
            metadata.insert(METADATA_LAYER_DIGESTS.to_string(), digests.join(","));
        }
        metadata.insert(LABEL_PROXY_MODE.to_string(), "true".to_string());
        let source = image_ref.unwrap_or_else(|| self.cfg.snapshot.unknown_image_source.clone());
        KataVirtualVolume::guest_pull(&source, metadata)
    }

    /// Commit: active `key` becomes committed `name`, with usage measured now.
    pub fn commit(&self, name: &str, key: &str, labels: HashMap<String, String>) -> Result<()> {
        limits::check_key("name", name)?;
        limits::check_key("key", key)?;
        limits::check_labels(&labels)?;
        info!(name, key, ?labels, "commit");
        if name.is_empty() {
            return Err(Error::InvalidArgument("empty snapshot name".into()));
        }
        let rec = self
            .store
            .get(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))?;
        let usage = if rec.has_dir() && rec.kind == Kind::Active {
            disk_usage(&self.snapshot_dir(rec.id).join("fs"))?
        } else {
            DiskUsage::default()
        };
        self.store.commit_active(key, name, sorted(labels), usage)?;
        Ok(())
    }

    /// Remove; directories go in Cleanup unless `sync_remove`.
    pub fn remove(&self, key: &str) -> Result<()> {
        let rec = self.store.remove(key)?;
        info!(key, id = rec.id, "removed snapshot");
        if self.cfg.snapshot.sync_remove && rec.has_dir() {
            let dir = self.snapshot_dir(rec.id);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                // The record is gone; Cleanup retries the directory later.
                warn!(dir = %dir.display(), error = %e, "sync_remove failed; left for Cleanup");
            }
        }
        Ok(())
    }

    /// Removes directories under `snapshots/` that no stored snapshot owns: ids this store
    /// handed out, `new-*` builds and crash leftovers. Directories with ids it never
    /// handed out, and names it never creates, are left alone (see [`DirClass`]).
    pub fn cleanup(&self) -> Result<CleanupReport> {
        let _guard = self.dirs.write().unwrap_or_else(|e| e.into_inner());
        let live = self.store.dir_ids()?;
        let last = self.store.last_id()?;
        let mut report = CleanupReport::default();
        let rd = std::fs::read_dir(&self.snapshots_dir)
            .map_err(|e| Error::io(format!("reading {}", self.snapshots_dir.display()), e))?;
        for entry in rd {
            let entry = entry.map_err(|e| Error::io("reading snapshots dir", e))?;
            let name = entry.file_name();
            let path = entry.path();
            match classify_dir(&name, &path, last) {
                DirClass::Ours | DirClass::CrashLeftover => {}
                DirClass::Foreign => {
                    warn!(dir = %path.display(), last_id = last, "not removing a snapshot directory this store never allocated");
                    report.kept.push(path);
                    continue;
                }
                DirClass::Other => {
                    report.kept.push(path);
                    continue;
                }
            }
            let owned = name
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| live.contains(&id));
            if owned {
                continue;
            }
            std::fs::remove_dir_all(&path)
                .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
            report.removed.push(path);
        }
        if !report.removed.is_empty() {
            info!(
                removed = report.removed.len(),
                "cleanup removed orphan directories"
            );
        }
        Ok(report)
    }

    /// Usage: du of the upper directory for active/view, the stored value for committed.
    pub fn usage(&self, key: &str) -> Result<DiskUsage> {
        let rec = self
            .store
            .get(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))?;
        if rec.kind == Kind::Committed || !rec.has_dir() {
            return Ok(rec.usage);
        }
        disk_usage(&self.snapshot_dir(rec.id).join("fs"))
    }

    /// Update labels: paths `labels` / `labels.<key>`; no paths replaces all labels.
    pub fn update(
        &self,
        name: &str,
        labels: HashMap<String, String>,
        fieldpaths: &[String],
    ) -> Result<SnapshotInfo> {
        limits::check_key("name", name)?;
        limits::check_labels(&labels)?;
        if fieldpaths.iter().map(String::len).sum::<usize>() > limits::MAX_LABELS_TOTAL {
            return Err(Error::InvalidArgument(format!(
                "field paths longer than {} bytes in total",
                limits::MAX_LABELS_TOTAL
            )));
        }
        info!(name, ?labels, ?fieldpaths, "update");
        let rec = self.store.update(name, |r| {
            if fieldpaths.is_empty() {
                r.labels = sorted(labels.clone());
                return Ok(());
            }
            for path in fieldpaths {
                if let Some(k) = path.strip_prefix("labels.") {
                    match labels.get(k) {
                        Some(v) => {
                            r.labels.insert(k.to_string(), v.clone());
                        }
                        None => {
                            r.labels.remove(k);
                        }
                    }
                } else if path == "labels" {
                    r.labels = sorted(labels.clone());
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update {path:?} field on snapshot {name:?}"
                    )));
                }
            }
            Ok(())
        })?;
        Ok(SnapshotInfo::new(name, &rec))
    }

    /// List/Walk with containerd filters (OR across strings, AND within one).
    pub fn list(&self, filters: &[String]) -> Result<Vec<SnapshotInfo>> {
        let filter =
            Filter::parse_all(filters).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let records = match filter.required_values() {
            // containerd's post-AlreadyExists Walk names the chain ID: decode only the
            // records that mention it instead of the whole store.
            Some(values) => {
                let finders: Vec<memchr::memmem::Finder> = values
                    .iter()
                    .map(|v| memchr::memmem::Finder::new(v.as_bytes()))
                    .collect();
                self.store
                    .list_prefiltered(|raw| finders.iter().any(|f| f.find(raw).is_some()))?
            }
            None => self.store.list()?,
        };
        let out: Vec<SnapshotInfo> = records
            .iter()
            .map(|(k, r)| SnapshotInfo::new(k, r))
            .filter(|i| filter.matches(i))
            .collect();
        debug!(?filters, matched = out.len(), "list");
        Ok(out)
    }
}
