//! Attributes of implicit parent directories, fixed when the layers are composed.
//!
//! A layer that adds `tmp/x` without a `tmp/` entry still needs a `tmp` directory in its
//! lower dir, and overlayfs shows the attributes of the top-most directory: left alone, that
//! 0755 root:root stand-in would turn `/tmp` 1777 into 0755 (containerd's applier and umoci
//! keep the lower layer's directory). The layer store is keyed by blob digest and shared by
//! images, so the same layer may sit on different lowers and its own tree cannot hold the
//! right attributes. Instead the unpacker marks such directories with [`IMPLICIT_XATTR`]
//! (counting them on the layer root in [`IMPLICIT_COUNT_XATTR`]) and, when a bundle's overlay
//! is composed, [`fix_implicit_dirs`] creates each top-most implicit directory in the bundle's
//! own upper dir with the attributes it has in the layers below, exactly as a copy-up would.
//! The upper dir is per bundle, so every image gets its own answer; the marker itself never
//! shows in a rootfs because every directory carrying it on top is covered by the upper's copy.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;

use super::{IMPLICIT_XATTR, OPAQUE_XATTR};

/// On a layer root: how many implicit directories (below the root) the layer has.
pub const IMPLICIT_COUNT_XATTR: &str = "trusted.guestpull.implicit-dirs";

type Comps = Vec<OsString>;

/// Attributes copied from a lower directory.
#[derive(Debug, Clone, PartialEq)]
struct Attrs {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Option<(i64, i64)>,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

impl Default for Attrs {
    /// What containerd and umoci give a parent no layer below defines.
    fn default() -> Self {
        Attrs {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: None,
            xattrs: Vec::new(),
        }
    }
}

struct Layers<'a> {
    /// Bottom first, as in the image config.
    dirs: &'a [PathBuf],
}

fn has_xattr(p: &Path, name: &str) -> io::Result<bool> {
    match rfs::lgetxattr(p, name, &mut [0u8; 16]) {
        Ok(_) => Ok(true),
        Err(Errno::NODATA | Errno::NOTSUP) => Ok(false),
        // ERANGE: present with a longer value.
        Err(Errno::RANGE) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

fn read_attrs(p: &Path) -> io::Result<Attrs> {
    let md = std::fs::symlink_metadata(p)?;
    let mut xattrs = Vec::new();
    let mut names = vec![0u8; 64 * 1024];
    let n = match rfs::llistxattr(p, &mut names) {
        Ok(n) => n,
        Err(Errno::NOTSUP) => 0,
        Err(e) => return Err(e.into()),
    };
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        // Overlay and guestpull bookkeeping describe the lower dir, not the directory.
        if name.starts_with(b"trusted.overlay.") || name.starts_with(b"trusted.guestpull.") {
            continue;
        }
        let mut value = vec![0u8; 64 * 1024];
        let len = rfs::lgetxattr(p, name, &mut value)?;
        value.truncate(len);
        xattrs.push((OsString::from_vec(name.to_vec()), value));
    }
    Ok(Attrs {
        mode: md.permissions().mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: Some((md.mtime(), md.mtime_nsec())),
        xattrs,
    })
}

/// What a path is in one layer.
enum Kind {
    Missing,
    Dir { implicit: bool, opaque: bool },
    Other,
}

impl Layers<'_> {
    fn path(&self, j: usize, comps: &[OsString]) -> PathBuf {
        let mut p = self.dirs[j].clone();
        p.extend(comps);
        p
    }

    fn kind(&self, j: usize, comps: &[OsString]) -> io::Result<Kind> {
        let p = self.path(j, comps);
        match std::fs::symlink_metadata(&p) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Kind::Missing),
            Err(e) => Err(e),
            Ok(md) if md.is_dir() => Ok(Kind::Dir {
                implicit: has_xattr(&p, IMPLICIT_XATTR)?,
                opaque: has_xattr(&p, OPAQUE_XATTR)?,
            }),
            Ok(_) => Ok(Kind::Other),
        }
    }

    /// Layers (top first) whose directory `comps` overlayfs merges, or `None` when `comps` is
    /// not a directory in the composed tree.
    fn merge_stack(&self, comps: &[OsString]) -> io::Result<Option<Vec<usize>>> {
        let mut stack: Vec<usize> = (0..self.dirs.len()).rev().collect();
        for k in 0..comps.len() {
            let mut next = Vec::new();
            for &j in &stack {
                match self.kind(j, &comps[..=k])? {
                    Kind::Missing => {}
                    Kind::Dir { opaque, .. } => {
                        next.push(j);
                        if opaque {
                            break;
                        }
                    }
                    // A whiteout or non-directory hides the lower layers' entries.
                    Kind::Other => break,
                }
            }
            if next.is_empty() {
                return Ok(None);
            }
            stack = next;
        }
        Ok(Some(stack))
    }

    /// For a directory of the composed tree: whether its top-most copy is implicit, and the
    /// attributes it should show (from the first explicit directory below, else the default).
    /// Descends past an opaque marker on the directory itself: `dir/.wh..wh..opq` hides the
    /// lower children, not the lower directory's own attributes (umoci, containerd).
    fn resolve(&self, comps: &[OsString]) -> io::Result<Option<(bool, Attrs)>> {
        let Some((_, parent)) = comps.split_last() else {
            return Ok(None);
        };
        let Some(stack) = self.merge_stack(parent)? else {
            return Ok(None);
        };
        let mut top_implicit = None;
        for j in stack {
            match self.kind(j, comps)? {
                Kind::Missing => {}
                Kind::Other if top_implicit.is_none() => return Ok(None),
                Kind::Other => break,
                Kind::Dir { implicit, .. } => {
                    let top = *top_implicit.get_or_insert(implicit);
                    if !implicit {
                        return Ok(Some((top, read_attrs(&self.path(j, comps))?)));
                    }
                }
            }
        }
        Ok(top_implicit.map(|top| (top, Attrs::default())))
    }

    fn root_attrs(&self) -> io::Result<Attrs> {
        for d in self.dirs.iter().rev() {
            if !has_xattr(d, IMPLICIT_XATTR)? {
                return read_attrs(d);
            }
        }
        Ok(Attrs::default())
    }

    fn candidates(&self) -> io::Result<BTreeSet<Comps>> {
        let mut out = BTreeSet::new();
        for d in self.dirs {
            let mut count = [0u8; 20];
            let marked = match rfs::lgetxattr(d.as_path(), IMPLICIT_COUNT_XATTR, &mut count) {
                Ok(n) => std::str::from_utf8(&count[..n])
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0),
                // Not a layer of this unpacker (e.g. a FUSE lazy mount): nothing marked.
                Err(_) => 0,
            };
            if marked > 0 {
                collect(d, &mut Vec::new(), &mut out)?;
            }
        }
        Ok(out)
    }
}

fn collect(root: &Path, at: &mut Comps, out: &mut BTreeSet<Comps>) -> io::Result<()> {
    let mut dir = root.to_path_buf();
    dir.extend(at.iter());
    for e in std::fs::read_dir(&dir)? {
        let e = e?;
        if !e.file_type()?.is_dir() {
            continue;
        }
        at.push(e.file_name());
        if has_xattr(&e.path(), IMPLICIT_XATTR)? {
            out.insert(at.clone());
        }
        collect(root, at, out)?;
        at.pop();
    }
    Ok(())
}

fn apply(p: &Path, a: &Attrs) -> io::Result<()> {
    std::os::unix::fs::lchown(p, Some(a.uid), Some(a.gid))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(a.mode))?;
    for (k, v) in &a.xattrs {
        rfs::lsetxattr(p, k.as_bytes(), v, XattrFlags::empty())?;
    }
    Ok(())
}

fn set_mtime(p: &Path, a: &Attrs) -> io::Result<()> {
    if let Some((s, ns)) = a.mtime {
        let t = Timespec {
            tv_sec: s,
            tv_nsec: ns as _,
        };
        let ts = Timestamps {
            last_access: t,
            last_modification: t,
        };
        rfs::utimensat(rfs::CWD, p, &ts, AtFlags::SYMLINK_NOFOLLOW)?;
    }
    Ok(())
}

/// Creates, in the (empty) overlay `upper` dir of `layers` (bottom first), every directory
/// whose top-most copy is implicit, with the attributes the layers below give it, plus the
/// parents needed to hold them with their composed attributes; also gives the upper root the
/// root attributes of the top-most layer that defines them. Returns how many directories were
/// created. Does nothing when `upper` is not empty (the bundle was composed before).
pub fn fix_implicit_dirs(layers: &[PathBuf], upper: &Path) -> io::Result<usize> {
    if std::fs::read_dir(upper)?.next().is_some() {
        return Ok(0);
    }
    let l = Layers { dirs: layers };
    // Layers from elsewhere (a lazily mounted image) or from before the markers: as they are.
    if !layers
        .iter()
        .any(|d| has_xattr(d, IMPLICIT_COUNT_XATTR).unwrap_or(false))
    {
        return Ok(0);
    }
    let root = l.root_attrs()?;
    apply(upper, &root)?;
    let mut created: BTreeMap<Comps, Attrs> = BTreeMap::new();
    for cand in l.candidates()? {
        match l.resolve(&cand)? {
            Some((true, _)) => {}
            // Hidden in the composed tree, or an explicit directory above covers it.
            _ => continue,
        }
        // Parents first: the upper's copy of a parent shadows its attributes as well.
        for k in 1..=cand.len() {
            let prefix = &cand[..k];
            if created.contains_key(prefix) {
                continue;
            }
            let Some((_, attrs)) = l.resolve(prefix)? else {
                break;
            };
            let mut p = upper.to_path_buf();
            p.extend(prefix);
            std::fs::create_dir(&p)?;
            apply(&p, &attrs)?;
            created.insert(prefix.to_vec(), attrs);
        }
    }
    // Deepest first, after every mkdir that would change a parent's mtime.
    for (comps, attrs) in created.iter().rev() {
        let mut p = upper.to_path_buf();
        p.extend(comps);
        set_mtime(&p, attrs)?;
    }
    set_mtime(upper, &root)?;
    Ok(created.len())
}
