//! Durable snapshot metadata.
//!
//! Why redb: containerd's own snapshotters keep this metadata in bbolt, an embedded,
//! single-file, copy-on-write B-tree with serialisable write transactions. redb is the
//! closest pure-Rust equivalent: embedded (no daemon), ACID transactions with
//! `Durability::Immediate` (fsync'd before `commit` returns), crash-safe by design
//! (a kill -9 at any point leaves the last committed state), no C toolchain. Every
//! mutation below is one write transaction, and redb serialises writers, so a
//! check-then-insert inside one call is atomic with respect to concurrent RPCs.
//!
//! Layout: `snapshots` (key → JSON [`Record`]), `children` (parent → child keys,
//! a multimap kept in the same transactions so "has children" never drifts), and
//! `meta` (`next_id`, the directory-id allocator).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{
    Database, DatabaseError, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable,
    ReadableTable, StorageError, Table, TableDefinition,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::limits;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const CHILDREN: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("children");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_ID: &str = "next_id";

/// Snapshot kind, as containerd defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only view of a parent; cannot be committed.
    View,
    /// Writable snapshot that may be committed.
    Active,
    /// Immutable snapshot usable as a parent.
    Committed,
}

impl Kind {
    /// containerd's filter spelling of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// How a snapshot's content is provided; decides mounts and directory ownership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Flavor {
    /// Committed guest-pull layer: no content on the host, no directory.
    Marker,
    /// Active/view (or committed from one) on a guest-pulled chain: Kata volume mounts.
    GuestPull,
    /// Real overlayfs semantics with real content on the host.
    Plain,
}

/// Disk usage of one snapshot, excluding its parents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUsage {
    /// Bytes in use.
    pub size: i64,
    /// Inodes in use.
    pub inodes: i64,
}

/// One stored snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Numeric id, names the snapshot's directory (`snapshots/<id>`).
    pub id: u64,
    /// Snapshot kind.
    pub kind: Kind,
    /// Parent key ("" for none).
    pub parent: String,
    /// Labels, sorted so serialised records and derived mounts are deterministic.
    pub labels: BTreeMap<String, String>,
    /// Content flavor.
    pub flavor: Flavor,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: u64,
    /// Last update time, nanoseconds since the Unix epoch.
    pub updated_ns: u64,
    /// Usage recorded at commit time.
    pub usage: DiskUsage,
}

impl Record {
    /// Whether this snapshot owns a directory under `snapshots/`.
    pub fn has_dir(&self) -> bool {
        self.flavor != Flavor::Marker
    }
}

/// What to create in [`Store::create`].
#[derive(Debug, Clone)]
pub struct NewSnapshot {
    /// Kind of the new snapshot.
    pub kind: Kind,
    /// Parent key ("" for none); must exist and be committed.
    pub parent: String,
    /// Labels to store.
    pub labels: BTreeMap<String, String>,
    /// Flavor of the new snapshot.
    pub flavor: Flavor,
    /// Labels of a parentless committed marker to create for `parent`, in the same
    /// transaction, when `parent` does not exist (self-healing); `None` = NotFound.
    pub heal_parent: Option<BTreeMap<String, String>>,
}

/// What [`Store::create`] stored.
#[derive(Debug, Clone)]
pub struct Created {
    /// The new snapshot.
    pub record: Record,
    /// The marker created for the missing parent, if [`NewSnapshot::heal_parent`] was used.
    pub healed_parent: Option<Record>,
}

/// Current time in nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The redb-backed metadata store.
pub struct Store {
    db: Database,
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::Store(format!("corrupt record for {key:?}: {e}")))
}

/// Stores `rec` under `key`; the size limits are checked here so that no path (healing,
/// label merges, re-parenting) can store a record List could not send.
fn put(snaps: &mut Table<'_, &'static str, &'static [u8]>, key: &str, rec: &Record) -> Result<()> {
    limits::check_key("key", key)?;
    limits::check_labels(&rec.labels)?;
    snaps.insert(key, serde_json::to_vec(rec)?.as_slice())?;
    Ok(())
}

/// Allocates the next directory id.
fn next_id(meta: &mut Table<'_, &'static str, u64>) -> Result<u64> {
    let id = meta.get(NEXT_ID)?.map(|v| v.value()).unwrap_or(0) + 1;
    meta.insert(NEXT_ID, id)?;
    Ok(id)
}

/// Why `path` cannot be served, with what the operator can do about it.
fn open_error(path: &Path, e: &DatabaseError) -> Error {
    let damaged = matches!(
        e,
        DatabaseError::Storage(StorageError::Corrupted(_)) | DatabaseError::RepairAborted
    ) || matches!(e, DatabaseError::Storage(StorageError::Io(io)) if io.kind() == std::io::ErrorKind::InvalidData);
    if damaged {
        return Error::Unsafe(format!(
            "{} is damaged ({e}); restore it from a backup, or move the whole state \
             directory away to start empty (chain-ID layers then self-heal, active \
             snapshots are lost)",
            path.display()
        ));
    }
    Error::Unsafe(format!("cannot open {}: {e}", path.display()))
}

impl Store {
    /// Opens (or creates) the database file at `path`, verifying it first.
    ///
    /// A plain redb open trusts the file: a damaged page then panics (debug builds) or
    /// fails every later read as "unreachable" (release). The integrity check verifies the
    /// checksum of every committed page and reports damage here instead, so the daemon
    /// refuses to start rather than serve a store it cannot read. It reads the whole file
    /// once (a few ms for 10,000 snapshots). A torn last commit (power loss during its
    /// fsync) is rolled back, as any crash recovery does; the RPC never got its answer.
    pub fn open(path: &Path) -> Result<Store> {
        let opened = std::panic::catch_unwind(|| {
            Database::builder()
                .set_check_integrity_on_open(true)
                .create(path)
        });
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => return Err(open_error(path, &e)),
            Err(p) => {
                return Err(open_error(
                    path,
                    &DatabaseError::Storage(StorageError::Corrupted(format!(
                        "opening panicked: {}",
                        crate::error::panic_text(p.as_ref())
                    ))),
                ))
            }
        };
        let tx = db.begin_write()?;
        {
            tx.open_table(SNAPSHOTS)?;
            tx.open_multimap_table(CHILDREN)?;
            tx.open_table(META)?;
        }
        tx.commit()?;
        Ok(Store { db })
    }

    /// Returns the record for `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Record>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        let v = t.get(key)?;
        v.map(|v| decode(key, v.value())).transpose()
    }

    /// The last directory id handed out (0 for a store that never created a snapshot).
    pub fn last_id(&self) -> Result<u64> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(META)?;
        Ok(t.get(NEXT_ID)?.map(|v| v.value()).unwrap_or(0))
    }

    /// Returns `key`'s ancestors, nearest first, read in one consistent snapshot.
    pub fn ancestors(&self, key: &str) -> Result<Vec<(String, Record)>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        let mut next = match t.get(key)? {
            Some(v) => decode(key, v.value())?.parent,
            None => return Err(Error::NotFound(format!("snapshot {key:?}"))),
        };
        while !next.is_empty() {
            if out.len() > 4096 {
                return Err(Error::Store(format!("parent loop at {key:?}")));
            }
            let rec = match t.get(next.as_str())? {
                Some(v) => decode(&next, v.value())?,
                None => return Err(Error::NotFound(format!("parent snapshot {next:?}"))),
            };
            let parent = rec.parent.clone();
            out.push((next, rec));
            next = parent;
        }
        Ok(out)
    }

    /// Returns every snapshot, sorted by key.
    pub fn list(&self) -> Result<Vec<(String, Record)>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            out.push((k.value().to_string(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }

    /// Snapshots whose stored bytes pass `pre` (a cheap prefilter), sorted by key.
    pub fn list_prefiltered(&self, pre: impl Fn(&[u8]) -> bool) -> Result<Vec<(String, Record)>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            if pre(v.value()) {
                out.push((k.value().to_string(), decode(k.value(), v.value())?));
            }
        }
        Ok(out)
    }

    /// Ids of all snapshots that own a directory.
    pub fn dir_ids(&self) -> Result<HashSet<u64>> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|(_, r)| r.has_dir())
            .map(|(_, r)| r.id)
            .collect())
    }

    /// Whether `key` has any children.
    pub fn has_children(&self, key: &str) -> Result<bool> {
        let tx = self.db.begin_read()?;
        let t = tx.open_multimap_table(CHILDREN)?;
        let mut it = t.get(key)?;
        Ok(it.next().transpose()?.is_some())
    }

    /// Atomically creates `key` (and, with [`NewSnapshot::heal_parent`], its missing
    /// parent). `before_commit` runs inside the transaction with the new record (e.g. to
    /// rename its directory into place); if anything fails nothing is stored.
    pub fn create(
        &self,
        key: &str,
        new: NewSnapshot,
        before_commit: impl FnOnce(&Record) -> Result<()>,
    ) -> Result<Created> {
        if !new.parent.is_empty() && new.parent == key {
            return Err(Error::InvalidArgument(format!(
                "snapshot {key:?} cannot be its own parent"
            )));
        }
        let tx = self.db.begin_write()?;
        let created = {
            let mut snaps = tx.open_table(SNAPSHOTS)?;
            let mut children = tx.open_multimap_table(CHILDREN)?;
            let mut meta = tx.open_table(META)?;
            if snaps.get(key)?.is_some() {
                return Err(Error::AlreadyExists(format!("snapshot {key:?}")));
            }
            let now = now_ns();
            let mut healed_parent = None;
            if !new.parent.is_empty() {
                let parent = match snaps.get(new.parent.as_str())? {
                    Some(v) => Some(decode(&new.parent, v.value())?),
                    None => None,
                };
                match (parent, new.heal_parent) {
                    (Some(p), _) if p.kind != Kind::Committed => {
                        return Err(Error::InvalidArgument(format!(
                            "parent {:?} is not a committed snapshot",
                            new.parent
                        )))
                    }
                    (Some(_), _) => {}
                    (None, Some(labels)) => {
                        let rec = Record {
                            id: next_id(&mut meta)?,
                            kind: Kind::Committed,
                            parent: String::new(),
                            labels,
                            flavor: Flavor::Marker,
                            created_ns: now,
                            updated_ns: now,
                            usage: DiskUsage::default(),
                        };
                        put(&mut snaps, &new.parent, &rec)?;
                        healed_parent = Some(rec);
                    }
                    (None, None) => {
                        return Err(Error::NotFound(format!("parent snapshot {:?}", new.parent)))
                    }
                }
            }
            let rec = Record {
                id: next_id(&mut meta)?,
                kind: new.kind,
                parent: new.parent,
                labels: new.labels,
                flavor: new.flavor,
                created_ns: now,
                updated_ns: now,
                usage: DiskUsage::default(),
            };
            put(&mut snaps, key, &rec)?;
            if !rec.parent.is_empty() {
                children.insert(rec.parent.as_str(), key)?;
            }
            before_commit(&rec)?;
            Created {
                record: rec,
                healed_parent,
            }
        };
        tx.commit()?;
        Ok(created)
    }

    /// Commits active snapshot `key` as `name` (same id, so its directory stays put).
    pub fn commit_active(
        &self,
        key: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        usage: DiskUsage,
    ) -> Result<Record> {
        let tx = self.db.begin_write()?;
        let rec = {
            let mut snaps = tx.open_table(SNAPSHOTS)?;
            let mut children = tx.open_multimap_table(CHILDREN)?;
            let mut rec = match snaps.get(key)? {
                Some(v) => decode(key, v.value())?,
                None => return Err(Error::NotFound(format!("snapshot {key:?}"))),
            };
            if rec.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is not active ({})",
                    rec.kind.as_str()
                )));
            }
            if snaps.get(name)?.is_some() {
                return Err(Error::AlreadyExists(format!("snapshot {name:?}")));
            }
            snaps.remove(key)?;
            if !rec.parent.is_empty() {
                children.remove(rec.parent.as_str(), key)?;
                children.insert(rec.parent.as_str(), name)?;
            }
            rec.kind = Kind::Committed;
            rec.labels = labels;
            rec.usage = usage;
            // As containerd's stores do: the committed snapshot is new, created now.
            rec.created_ns = now_ns();
            rec.updated_ns = rec.created_ns;
            put(&mut snaps, name, &rec)?;
            rec
        };
        tx.commit()?;
        Ok(rec)
    }

    /// Removes `key`; FailedPrecondition if it has children.
    pub fn remove(&self, key: &str) -> Result<Record> {
        let tx = self.db.begin_write()?;
        let rec = {
            let mut snaps = tx.open_table(SNAPSHOTS)?;
            let mut children = tx.open_multimap_table(CHILDREN)?;
            let rec = match snaps.get(key)? {
                Some(v) => decode(key, v.value())?,
                None => return Err(Error::NotFound(format!("snapshot {key:?}"))),
            };
            if children.get(key)?.next().transpose()?.is_some() {
                return Err(Error::FailedPrecondition(format!(
                    "cannot remove snapshot {key:?} with child"
                )));
            }
            snaps.remove(key)?;
            if !rec.parent.is_empty() {
                children.remove(rec.parent.as_str(), key)?;
            }
            rec
        };
        tx.commit()?;
        Ok(rec)
    }

    /// Applies `f` to `key`'s record atomically; a changed parent re-links the child index.
    pub fn update(&self, key: &str, f: impl FnOnce(&mut Record) -> Result<()>) -> Result<Record> {
        let tx = self.db.begin_write()?;
        let rec = {
            let mut snaps = tx.open_table(SNAPSHOTS)?;
            let mut children = tx.open_multimap_table(CHILDREN)?;
            let old = match snaps.get(key)? {
                Some(v) => decode(key, v.value())?,
                None => return Err(Error::NotFound(format!("snapshot {key:?}"))),
            };
            let mut rec = old.clone();
            f(&mut rec)?;
            if rec.parent != old.parent {
                if !rec.parent.is_empty() {
                    refuse_cycle(&snaps, key, &rec.parent)?;
                    match snaps.get(rec.parent.as_str())? {
                        Some(v) if decode(&rec.parent, v.value())?.kind == Kind::Committed => {}
                        Some(_) => {
                            return Err(Error::InvalidArgument(format!(
                                "parent {:?} is not committed",
                                rec.parent
                            )))
                        }
                        None => {
                            return Err(Error::NotFound(format!(
                                "parent snapshot {:?}",
                                rec.parent
                            )))
                        }
                    }
                    children.insert(rec.parent.as_str(), key)?;
                }
                if !old.parent.is_empty() {
                    children.remove(old.parent.as_str(), key)?;
                }
            }
            rec.updated_ns = now_ns();
            put(&mut snaps, key, &rec)?;
            rec
        };
        tx.commit()?;
        Ok(rec)
    }
}

/// InvalidArgument if `key` is `parent` or one of its ancestors: re-parenting `key` there
/// would close a loop that no Remove could ever break (each member has a child).
fn refuse_cycle(
    snaps: &Table<'_, &'static str, &'static [u8]>,
    key: &str,
    parent: &str,
) -> Result<()> {
    let mut seen = HashSet::new();
    let mut next = parent.to_string();
    while !next.is_empty() {
        if next == key {
            return Err(Error::InvalidArgument(format!(
                "parent {parent:?} descends from snapshot {key:?}; re-parenting would make a cycle"
            )));
        }
        if !seen.insert(next.clone()) {
            // A loop above `parent` that does not contain `key` (a store written before
            // this check existed): not ours to close, and not made worse.
            return Ok(());
        }
        next = match snaps.get(next.as_str())? {
            Some(v) => decode(&next, v.value())?.parent,
            None => return Ok(()),
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(kind: Kind, parent: &str, flavor: Flavor) -> NewSnapshot {
        NewSnapshot {
            kind,
            parent: parent.into(),
            labels: BTreeMap::new(),
            flavor,
            heal_parent: None,
        }
    }

    #[test]
    fn create_commit_remove_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.db");
        {
            let s = Store::open(&path).unwrap();
            let a = s
                .create("a", new(Kind::Active, "", Flavor::Plain), |_| Ok(()))
                .unwrap()
                .record;
            let usage = DiskUsage {
                size: 42,
                inodes: 3,
            };
            let c = s
                .commit_active("a", "base", BTreeMap::new(), usage)
                .unwrap();
            assert_eq!(c.id, a.id, "commit keeps the directory id");
            assert!(s.get("a").unwrap().is_none());
            s.create(
                "child",
                new(Kind::Active, "base", Flavor::Plain),
                |_| Ok(()),
            )
            .unwrap();
            assert!(s.has_children("base").unwrap());
            assert!(matches!(
                s.remove("base"),
                Err(Error::FailedPrecondition(_))
            ));
        }
        // Reopen after drop: everything committed is there, ids keep increasing.
        let s = Store::open(&path).unwrap();
        let base = s.get("base").unwrap().unwrap();
        assert_eq!(base.kind, Kind::Committed);
        assert_eq!(base.usage.size, 42);
        assert_eq!(s.ancestors("child").unwrap()[0].0, "base");
        s.remove("child").unwrap();
        assert!(!s.has_children("base").unwrap());
        s.remove("base").unwrap();
        let n = s
            .create("n", new(Kind::Active, "", Flavor::Plain), |_| Ok(()))
            .unwrap()
            .record;
        assert!(n.id > base.id);
    }

    #[test]
    fn failed_hook_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("m.db")).unwrap();
        s.create("p", new(Kind::Committed, "", Flavor::Marker), |_| Ok(()))
            .unwrap();
        let err = s
            .create("k", new(Kind::Active, "p", Flavor::Plain), |_| {
                Err(Error::Store("boom".into()))
            })
            .unwrap_err();
        assert!(matches!(err, Error::Store(_)));
        assert!(s.get("k").unwrap().is_none());
        assert!(!s.has_children("p").unwrap(), "child index rolled back too");
    }

    #[test]
    fn error_codes_of_invalid_operations() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("m.db")).unwrap();
        assert!(matches!(
            s.create("k", new(Kind::Active, "missing", Flavor::Plain), |_| Ok(())),
            Err(Error::NotFound(_))
        ));
        s.create("a", new(Kind::Active, "", Flavor::Plain), |_| Ok(()))
            .unwrap();
        assert!(matches!(
            s.create("a", new(Kind::Active, "", Flavor::Plain), |_| Ok(())),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            s.create("b", new(Kind::Active, "a", Flavor::Plain), |_| Ok(())),
            Err(Error::InvalidArgument(_))
        ));
        s.create("v", new(Kind::View, "", Flavor::Plain), |_| Ok(()))
            .unwrap();
        assert!(matches!(
            s.commit_active("v", "x", BTreeMap::new(), DiskUsage::default()),
            Err(Error::FailedPrecondition(_))
        ));
        s.create("c", new(Kind::Committed, "", Flavor::Marker), |_| Ok(()))
            .unwrap();
        assert!(matches!(
            s.commit_active("a", "c", BTreeMap::new(), DiskUsage::default()),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(s.remove("nope"), Err(Error::NotFound(_))));
    }

    #[test]
    fn reparent_updates_child_index() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("m.db")).unwrap();
        s.create("p1", new(Kind::Committed, "", Flavor::Marker), |_| Ok(()))
            .unwrap();
        s.create("m", new(Kind::Committed, "", Flavor::Marker), |_| Ok(()))
            .unwrap();
        s.update("m", |r| {
            r.parent = "p1".into();
            Ok(())
        })
        .unwrap();
        assert!(s.has_children("p1").unwrap());
        assert!(matches!(s.remove("p1"), Err(Error::FailedPrecondition(_))));
    }

    fn healing(kind: Kind, parent: &str, flavor: Flavor) -> NewSnapshot {
        let mut labels = BTreeMap::new();
        labels.insert("recovered".to_string(), "true".to_string());
        NewSnapshot {
            heal_parent: Some(labels),
            ..new(kind, parent, flavor)
        }
    }

    #[test]
    fn reparenting_never_makes_a_cycle() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("m.db")).unwrap();
        for k in ["x", "a", "b", "c"] {
            s.create(k, new(Kind::Committed, "", Flavor::Marker), |_| Ok(()))
                .unwrap();
        }
        let reparent = |k: &str, p: &str| {
            let p = p.to_string();
            s.update(k, move |r| {
                r.parent = p;
                Ok(())
            })
        };
        // x onto itself.
        assert!(matches!(reparent("x", "x"), Err(Error::InvalidArgument(_))));
        assert_eq!(s.get("x").unwrap().unwrap().parent, "");
        s.remove("x").unwrap();
        // a <- b, then a onto b (A<->B), then a longer loop c <- a <- b <- c.
        reparent("b", "a").unwrap();
        assert!(matches!(reparent("a", "b"), Err(Error::InvalidArgument(_))));
        reparent("c", "b").unwrap();
        assert!(matches!(reparent("a", "c"), Err(Error::InvalidArgument(_))));
        assert_eq!(
            s.ancestors("c").unwrap().len(),
            2,
            "chain c -> b -> a intact"
        );
        for k in ["c", "b", "a"] {
            s.remove(k).unwrap();
        }
    }

    #[test]
    fn healed_parent_is_created_in_the_same_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("m.db")).unwrap();
        let c = s
            .create(
                "k",
                healing(Kind::Active, "lost", Flavor::Plain),
                |_| Ok(()),
            )
            .unwrap();
        let healed = c.healed_parent.expect("parent healed");
        assert_eq!(s.get("lost").unwrap().unwrap(), healed);
        assert_eq!(healed.kind, Kind::Committed);
        assert!(s.has_children("lost").unwrap());
        // A create that fails (existing key, failing hook) leaves no healed parent behind.
        assert!(matches!(
            s.create("k", healing(Kind::Active, "lost2", Flavor::Plain), |_| Ok(
                ()
            )),
            Err(Error::AlreadyExists(_))
        ));
        assert!(s.get("lost2").unwrap().is_none());
        assert!(s
            .create("j", healing(Kind::Active, "lost3", Flavor::Plain), |_| {
                Err(Error::Store("disk full".into()))
            })
            .is_err());
        assert!(s.get("lost3").unwrap().is_none());
        assert!(s.get("j").unwrap().is_none());
        // A key cannot be created as its own (healed) parent.
        assert!(matches!(
            s.create(
                "self",
                healing(Kind::Committed, "self", Flavor::Marker),
                |_| Ok(())
            ),
            Err(Error::InvalidArgument(_))
        ));
        assert!(s.get("self").unwrap().is_none());
    }

    #[test]
    fn commit_sets_created_and_updated_to_commit_time() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("m.db")).unwrap();
        let a = s
            .create("a", new(Kind::Active, "", Flavor::Plain), |_| Ok(()))
            .unwrap()
            .record;
        std::thread::sleep(std::time::Duration::from_millis(5));
        let before = now_ns();
        let c = s
            .commit_active("a", "c", BTreeMap::new(), DiskUsage::default())
            .unwrap();
        assert!(c.created_ns >= before && c.created_ns > a.created_ns);
        assert_eq!(c.created_ns, c.updated_ns);
        assert_eq!(s.get("c").unwrap().unwrap(), c);
    }

    #[test]
    fn oversized_records_are_never_stored() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("m.db")).unwrap();
        let long = "k".repeat(limits::MAX_KEY + 1);
        assert!(matches!(
            s.create(&long, new(Kind::Active, "", Flavor::Plain), |_| Ok(())),
            Err(Error::InvalidArgument(_))
        ));
        s.create("a", new(Kind::Committed, "", Flavor::Marker), |_| Ok(()))
            .unwrap();
        // A label merge that grows past the per-snapshot total is refused as a whole.
        let r = s.update("a", |r| {
            for i in 0..20 {
                r.labels.insert(format!("l{i}"), "v".repeat(4000));
            }
            Ok(())
        });
        assert!(matches!(r, Err(Error::InvalidArgument(_))));
        assert!(s.get("a").unwrap().unwrap().labels.is_empty());
        assert!(s.list().unwrap().len() == 1);
    }

    /// Fills a store, then damages one 4 KiB page at a time: every open either refuses
    /// with an error or yields the stored records (or, for a page only the last commit
    /// wrote, those of the commit before: redb's rollback of a torn commit). Never a
    /// panic, never a store that opens and then fails.
    #[test]
    fn damaged_pages_are_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let expected = {
            let s = Store::open(&path).unwrap();
            for i in 0..300 {
                let mut n = new(Kind::Committed, "", Flavor::Marker);
                n.labels.insert("l".into(), format!("{i:0200}"));
                s.create(&format!("snap-{i:04}"), n, |_| Ok(())).unwrap();
            }
            s.list().unwrap()
        };
        let previous = &expected[..expected.len() - 1];
        let pristine = std::fs::read(&path).unwrap();
        let (mut refused, mut intact) = (0, 0);
        for page in 0..pristine.len() / 4096 {
            let mut bytes = pristine.clone();
            for b in &mut bytes[page * 4096 + 100..page * 4096 + 164] {
                *b ^= 0x5a;
            }
            std::fs::write(&path, &bytes).unwrap();
            let opened =
                std::panic::catch_unwind(|| Store::open(&path).map(|s| (s.list(), s.last_id())))
                    .unwrap_or_else(|_| panic!("page {page}: a damaged store panicked"));
            match opened {
                Err(Error::Unsafe(msg)) => {
                    assert!(msg.contains("is damaged"), "{msg}");
                    refused += 1
                }
                Ok((Ok(list), Ok(_))) if list == expected || list == previous => intact += 1,
                other => panic!("page {page}: opened a damaged store: {other:?}"),
            }
        }
        assert!(
            refused > 0,
            "some damage is detected ({intact} pages unused)"
        );
        // An empty or missing file is a new store, not damage.
        std::fs::write(&path, b"").unwrap();
        assert_eq!(Store::open(&path).unwrap().last_id().unwrap(), 0);
    }
}
