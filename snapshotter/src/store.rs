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
    Database, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    TableDefinition,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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

impl Store {
    /// Opens (or creates) the database file at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        let db = Database::create(path)?;
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

    /// Atomically creates `key`. `before_commit` runs inside the transaction with the
    /// new record (e.g. to rename its directory into place); if it fails nothing is stored.
    pub fn create(
        &self,
        key: &str,
        new: NewSnapshot,
        before_commit: impl FnOnce(&Record) -> Result<()>,
    ) -> Result<Record> {
        let tx = self.db.begin_write()?;
        let rec = {
            let mut snaps = tx.open_table(SNAPSHOTS)?;
            let mut children = tx.open_multimap_table(CHILDREN)?;
            let mut meta = tx.open_table(META)?;
            if snaps.get(key)?.is_some() {
                return Err(Error::AlreadyExists(format!("snapshot {key:?}")));
            }
            if !new.parent.is_empty() {
                let parent = match snaps.get(new.parent.as_str())? {
                    Some(v) => decode(&new.parent, v.value())?,
                    None => {
                        return Err(Error::NotFound(format!("parent snapshot {:?}", new.parent)))
                    }
                };
                if parent.kind != Kind::Committed {
                    return Err(Error::InvalidArgument(format!(
                        "parent {:?} is not a committed snapshot",
                        new.parent
                    )));
                }
            }
            let id = meta.get(NEXT_ID)?.map(|v| v.value()).unwrap_or(0) + 1;
            meta.insert(NEXT_ID, id)?;
            let now = now_ns();
            let rec = Record {
                id,
                kind: new.kind,
                parent: new.parent,
                labels: new.labels,
                flavor: new.flavor,
                created_ns: now,
                updated_ns: now,
                usage: DiskUsage::default(),
            };
            snaps.insert(key, serde_json::to_vec(&rec)?.as_slice())?;
            if !rec.parent.is_empty() {
                children.insert(rec.parent.as_str(), key)?;
            }
            before_commit(&rec)?;
            rec
        };
        tx.commit()?;
        Ok(rec)
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
            rec.updated_ns = now_ns();
            snaps.insert(name, serde_json::to_vec(&rec)?.as_slice())?;
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
            snaps.insert(key, serde_json::to_vec(&rec)?.as_slice())?;
            rec
        };
        tx.commit()?;
        Ok(rec)
    }
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
                .unwrap();
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
            .unwrap();
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
}
