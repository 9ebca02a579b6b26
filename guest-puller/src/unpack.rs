//! Safe tar unpacking into one layer directory, producing an overlayfs lower dir.
//!
//! The `tar` crate parses the archive (in raw mode, so we bound GNU long-name and PAX
//! metadata sizes ourselves), but every filesystem object is created here with `*at` calls
//! relative to directory fds opened with `O_NOFOLLOW`. Hand-written because `tar::Entry::unpack_in`
//! resolves paths by string and follows symlinked parents created earlier in the same
//! archive, and it knows nothing about overlayfs whiteouts.
//!
//! Policy:
//! - Paths: leading `/` and `.` components are dropped (relative to the layer root, as
//!   containerd and umoci do); any `..` component rejects the layer. Nothing is ever written
//!   through a symlink: a parent that is a symlink or a non-directory in this layer rejects
//!   the entry, except for whiteouts (below).
//! - Hardlink targets are resolved the same way inside the layer and must already exist.
//! - Whiteouts hide the lower layers only (OCI image spec): `.wh.NAME` becomes a 0:0 character
//!   device `NAME` with mode 000 unless this layer already has `NAME` — a file or link stays, a
//!   directory stays and becomes opaque (its lower contents go, as with umoci). A whiteout or
//!   `.wh..wh..opq` below a path this layer made a symlink, file or whiteout is a no-op, since
//!   that entry already hides everything below it (umoci repack writes those after replacing a
//!   directory by a symlink). `NAME` empty, `.` or `..` rejects the layer. An entry below, or a
//!   directory at, a path this layer whited out creates an opaque directory.
//! - Implicit parents (created for an entry without their own entry, and the root unless the
//!   archive has `./`) are 0755 root:root and marked with [`IMPLICIT_XATTR`]; when a bundle is
//!   composed they take the attributes of the lower layers ([`compose`]), as with containerd.
//! - PAX records are parsed by their length prefix (values may contain newlines); an empty
//!   value removes the record, so an xattr with an empty value is not set (POSIX pax; umoci
//!   does the same). Global headers are ignored, like containerd and umoci.
//! - GNU sparse files in PAX format (0.0, 0.1, 1.0) are reconstructed with their holes as
//!   holes; the old GNU sparse type `S` and unknown sparse versions are rejected.
//! - Device nodes: char/block devices and whiteouts are created when running as root and
//!   rejected otherwise; FIFOs are always created.
//! - Ownership (root only), modes incl. setuid/setgid/sticky, mtimes (directories last) and
//!   PAX `SCHILY.xattr.*` xattrs are applied. Unknown entry types are rejected.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;
use tar::EntryType;
use tracing::debug;

/// Largest GNU long-name / long-link / PAX header we accept.
pub const MAX_METADATA_ENTRY: u64 = 1 << 20;

/// Why unpacking failed.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The archive tried to leave the layer directory or write through a link.
    #[error("unsafe tar entry {path:?}: {reason}")]
    Unsafe { path: String, reason: String },
    /// The archive is malformed or uses an unsupported feature.
    #[error("bad tar entry {path:?}: {reason}")]
    Bad { path: String, reason: String },
    /// Reading the stream or writing the filesystem failed.
    #[error("unpacking {path:?}: {source}")]
    Io { path: String, source: io::Error },
}

/// Counters describing an unpacked layer.
#[derive(Debug, Default, Clone, Copy)]
pub struct UnpackStats {
    /// Entries created.
    pub entries: u64,
    /// Regular-file bytes written.
    pub bytes: u64,
}

struct Meta {
    uid: u64,
    gid: u64,
    mode: u32,
    mtime: Timespec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    dev_major: u32,
    dev_minor: u32,
}

struct PendingDir {
    comps: Vec<Vec<u8>>,
    mode: u32,
    mtime: Timespec,
}

/// Unpacks a tar stream into the (existing, empty) directory `dest`.
///
/// Returns the reader positioned after the end-of-archive marker so the caller can drain
/// (and hash) the remainder.
pub fn unpack<R: Read>(reader: R, dest: &Path) -> Result<(UnpackStats, R), UnpackError> {
    let root = rfs::open(
        dest,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err(&dest.to_string_lossy(), e.into()))?;
    let is_root = rustix::process::geteuid().is_root();
    let mut u = Unpacker {
        root,
        is_root,
        dirs: Vec::new(),
        stats: UnpackStats::default(),
        implicit: HashSet::from([Vec::new()]),
        cache: std::cell::RefCell::new(None),
    };
    let mut archive = tar::Archive::new(reader);
    {
        let entries = archive
            .entries()
            .map_err(|e| io_err("<archive>", e))?
            .raw(true);
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        for entry in entries {
            let mut entry = entry.map_err(|e| io_err("<archive>", e))?;
            let header_path = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&header_path).into_owned();
            let size = entry.header().entry_size().map_err(|e| io_err(&shown, e))?;
            let et = entry.header().entry_type();
            match et {
                EntryType::GNULongName | EntryType::GNULongLink | EntryType::XHeader => {
                    if size > MAX_METADATA_ENTRY {
                        return Err(UnpackError::Bad {
                            path: shown,
                            reason: format!(
                                "metadata entry of {size} bytes exceeds the {MAX_METADATA_ENTRY}-byte limit"
                            ),
                        });
                    }
                    let mut data = Vec::with_capacity(size as usize);
                    entry
                        .read_to_end(&mut data)
                        .map_err(|e| io_err(&shown, e))?;
                    if et == EntryType::XHeader {
                        pax = pax::parse_records(&data, &shown)?;
                    } else {
                        while data.last() == Some(&0) {
                            data.pop();
                        }
                        if et == EntryType::GNULongName {
                            long_name = Some(data);
                        } else {
                            long_link = Some(data);
                        }
                    }
                    continue;
                }
                EntryType::XGlobalHeader => {
                    if size > MAX_METADATA_ENTRY {
                        return Err(UnpackError::Bad {
                            path: shown,
                            reason: "oversized global PAX header".into(),
                        });
                    }
                    continue;
                }
                _ => {}
            }
            let mut path = long_name.take().unwrap_or(header_path);
            let mut link = long_link
                .take()
                .or_else(|| entry.link_name_bytes().map(|l| l.into_owned()));
            let mut meta = Meta {
                uid: entry.header().uid().map_err(|e| io_err(&shown, e))?,
                gid: entry.header().gid().map_err(|e| io_err(&shown, e))?,
                mode: entry.header().mode().map_err(|e| io_err(&shown, e))? & 0o7777,
                mtime: Timespec {
                    tv_sec: entry.header().mtime().unwrap_or(0) as i64,
                    tv_nsec: 0,
                },
                xattrs: Vec::new(),
                dev_major: entry.header().device_major().ok().flatten().unwrap_or(0),
                dev_minor: entry.header().device_minor().ok().flatten().unwrap_or(0),
            };
            let sparse = pax::take_sparse(&mut pax, &shown)?;
            for (k, v) in pax.drain(..) {
                // POSIX: an empty value removes the keyword, so the header field (or, for an
                // xattr, nothing) applies. Go's archive/tar and thus umoci do the same.
                if v.is_empty() {
                    continue;
                }
                let text = String::from_utf8_lossy(&v).into_owned();
                match k.as_str() {
                    "path" => path = v,
                    "linkpath" => link = Some(v),
                    "uid" => meta.uid = parse_num(&shown, &k, &text)?,
                    "gid" => meta.gid = parse_num(&shown, &k, &text)?,
                    "mtime" => meta.mtime = parse_time(&text),
                    "size" => {
                        if parse_num(&shown, &k, &text)? != size {
                            return Err(UnpackError::Bad {
                                path: shown,
                                reason: "PAX size differs from header size (unsupported)".into(),
                            });
                        }
                    }
                    _ => {
                        if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                            meta.xattrs.push((name.as_bytes().to_vec(), v));
                        }
                    }
                }
            }
            if let Some(name) = sparse.as_ref().and_then(|s| s.name.clone()) {
                path = name;
            }
            let shown = String::from_utf8_lossy(&path).into_owned();
            if sparse.is_some() && !matches!(et, EntryType::Regular | EntryType::Continuous) {
                return Err(UnpackError::Bad {
                    path: shown,
                    reason: "GNU sparse records on a non-regular entry".into(),
                });
            }
            let comps = components(&path, &shown)?;
            let data = Data {
                reader: &mut entry,
                size,
                sparse,
            };
            u.entry(et, comps, link, meta, data, &shown)?;
            u.stats.entries += 1;
        }
    }
    u.finish()?;
    Ok((u.stats, archive.into_inner()))
}

fn parse_num(path: &str, key: &str, v: &str) -> Result<u64, UnpackError> {
    v.trim().parse().map_err(|_| UnpackError::Bad {
        path: path.into(),
        reason: format!("PAX {key}={v:?} is not a number"),
    })
}

fn parse_time(v: &str) -> Timespec {
    let (s, frac) = v.trim().split_once('.').unwrap_or((v.trim(), ""));
    let secs = s.parse::<i64>().unwrap_or(0);
    let mut digits: String = frac.chars().filter(char::is_ascii_digit).take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    Timespec {
        tv_sec: secs,
        tv_nsec: digits.parse().unwrap_or(0),
    }
}

fn io_err(path: &str, source: io::Error) -> UnpackError {
    UnpackError::Io {
        path: path.to_string(),
        source,
    }
}

/// Splits a tar path into safe components, dropping `/` and `.`, rejecting `..`.
fn components(path: &[u8], shown: &str) -> Result<Vec<Vec<u8>>, UnpackError> {
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(UnpackError::Unsafe {
                    path: shown.into(),
                    reason: "path contains '..'".into(),
                })
            }
            c if c.contains(&0) => {
                return Err(UnpackError::Bad {
                    path: shown.into(),
                    reason: "NUL byte in path".into(),
                })
            }
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

/// An entry's data: the tar stream positioned at it, its stored size, and the sparse map.
struct Data<'a, R> {
    reader: &'a mut R,
    size: u64,
    sparse: Option<pax::Sparse>,
}

struct Unpacker {
    root: OwnedFd,
    is_root: bool,
    dirs: Vec<PendingDir>,
    stats: UnpackStats,
    /// Directories this layer holds only because entries below them needed a parent (and the
    /// root, unless the archive has a `./` entry). Marked with [`IMPLICIT_XATTR`] at the end so
    /// the overlay composition can give them the attributes of the lower layers.
    implicit: HashSet<Vec<Vec<u8>>>,
    /// Last directory resolved: archives list siblings together, so this saves a full
    /// O_NOFOLLOW walk per entry. Dropped whenever anything is removed.
    cache: std::cell::RefCell<Option<(Vec<Vec<u8>>, OwnedFd)>>,
}

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Marks a directory the layer created only as a parent for other entries; see
/// [`compose`] for how the marker is consumed (and why it is never visible in a rootfs).
pub const IMPLICIT_XATTR: &str = "trusted.guestpull.implicit";

/// Why a directory walk inside the layer stopped.
enum Walk {
    /// Component `usize` (0-based) exists in this layer and is not a directory.
    NotDir(usize, FileType),
    /// A component is missing and `create` was false.
    Missing,
    /// Another failure.
    Err(UnpackError),
}

fn is_whiteout(st: &rfs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

impl Unpacker {
    /// Opens the directory `comps` under the root without following any symlink, creating
    /// missing directories (mode 0755) when `create`.
    fn open_dir(
        &mut self,
        comps: &[Vec<u8>],
        create: bool,
        shown: &str,
    ) -> Result<OwnedFd, UnpackError> {
        self.try_open_dir(comps, create, shown)
            .map_err(|w| self.walk_err(w, comps, shown))
    }

    fn walk_err(&self, w: Walk, comps: &[Vec<u8>], shown: &str) -> UnpackError {
        match w {
            Walk::NotDir(i, ft) => {
                let at = String::from_utf8_lossy(&comps[..=i].join(&b'/')).into_owned();
                let what = if ft == FileType::Symlink {
                    "a symlink"
                } else {
                    "not a directory"
                };
                UnpackError::Unsafe {
                    path: shown.into(),
                    reason: format!("parent {at:?} is {what} in this layer; entries are never written through it"),
                }
            }
            Walk::Missing => io_err(shown, io::ErrorKind::NotFound.into()),
            Walk::Err(e) => e,
        }
    }

    fn try_open_dir(
        &mut self,
        comps: &[Vec<u8>],
        create: bool,
        shown: &str,
    ) -> Result<OwnedFd, Walk> {
        if let Some((c, fd)) = self.cache.borrow().as_ref() {
            if c.as_slice() == comps {
                return fd.try_clone().map_err(|e| Walk::Err(io_err(shown, e)));
            }
        }
        let fd = self.walk(comps, create, shown)?;
        let copy = fd.try_clone().map_err(|e| Walk::Err(io_err(shown, e)))?;
        *self.cache.borrow_mut() = Some((comps.to_vec(), copy));
        Ok(fd)
    }

    fn walk(&mut self, comps: &[Vec<u8>], create: bool, shown: &str) -> Result<OwnedFd, Walk> {
        let e = |e: Errno| Walk::Err(io_err(shown, e.into()));
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut cur = rfs::openat(&self.root, ".", flags, Mode::empty()).map_err(e)?;
        for (i, c) in comps.iter().enumerate() {
            let next = match rfs::openat(&cur, c.as_slice(), flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) if create => {
                    rfs::mkdirat(&cur, c.as_slice(), Mode::from_raw_mode(0o755)).map_err(e)?;
                    self.implicit.insert(comps[..=i].to_vec());
                    rfs::openat(&cur, c.as_slice(), flags, Mode::empty()).map_err(e)?
                }
                Err(Errno::NOENT) => return Err(Walk::Missing),
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    let st =
                        rfs::statat(&cur, c.as_slice(), AtFlags::SYMLINK_NOFOLLOW).map_err(e)?;
                    if create && is_whiteout(&st) {
                        // `.wh.d` then `d/x` in one layer: the lower `d` is deleted and a new,
                        // empty `d` holds `x`, i.e. an opaque directory with default attributes.
                        self.cache.borrow_mut().take();
                        rfs::unlinkat(&cur, c.as_slice(), AtFlags::empty()).map_err(e)?;
                        rfs::mkdirat(&cur, c.as_slice(), Mode::from_raw_mode(0o755)).map_err(e)?;
                        let fd =
                            rfs::openat(&cur, c.as_slice(), flags, Mode::empty()).map_err(e)?;
                        self.set_opaque(&fd, shown).map_err(Walk::Err)?;
                        fd
                    } else {
                        return Err(Walk::NotDir(i, FileType::from_raw_mode(st.st_mode)));
                    }
                }
                Err(err) => return Err(e(err)),
            };
            cur = next;
        }
        Ok(cur)
    }

    fn set_opaque(&self, fd: &OwnedFd, shown: &str) -> Result<(), UnpackError> {
        if !self.is_root {
            return Err(UnpackError::Bad {
                path: shown.into(),
                reason: "opaque directories need trusted.* xattrs (run as root)".into(),
            });
        }
        rfs::fsetxattr(fd, OPAQUE_XATTR, b"y", XattrFlags::empty())
            .map_err(|e| io_err(shown, e.into()))
    }

    /// Removes whatever non-directory (or, unless `keep_dir`, directory) sits at `name`.
    /// Returns the type of what was there, if anything was kept.
    fn clear(
        &self,
        parent: &OwnedFd,
        name: &[u8],
        keep_dir: bool,
        shown: &str,
    ) -> Result<bool, UnpackError> {
        // Names come from `components` or validated whiteouts; this keeps any future caller
        // from reaching the layer's parent through the /proc path below.
        if matches!(name, b"" | b"." | b"..") || name.contains(&b'/') {
            return Err(UnpackError::Unsafe {
                path: shown.into(),
                reason: format!("refusing to remove {:?}", String::from_utf8_lossy(name)),
            });
        }
        match rfs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(io_err(shown, e.into())),
            Ok(st) => {
                let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
                if is_dir && keep_dir {
                    return Ok(true);
                }
                self.cache.borrow_mut().take();
                if is_dir {
                    // The /proc path pins the parent through its fd; remove_dir_all never follows links.
                    let p = proc_path(parent, name);
                    std::fs::remove_dir_all(&p).map_err(|e| io_err(shown, e))?;
                } else {
                    rfs::unlinkat(parent, name, AtFlags::empty())
                        .map_err(|e| io_err(shown, e.into()))?;
                }
                Ok(false)
            }
        }
    }

    /// A whiteout hides `hidden` of the lower layers only (OCI image spec), so it never
    /// removes what this layer itself wrote.
    fn whiteout(
        &mut self,
        parents: &[Vec<u8>],
        hidden: &[u8],
        shown: &str,
    ) -> Result<(), UnpackError> {
        if !self.is_root {
            return Err(UnpackError::Bad {
                path: shown.into(),
                reason: "whiteouts are 0:0 character devices and need CAP_MKNOD (run as root)"
                    .into(),
            });
        }
        // `.wh..` would name the directory above; `.wh..` inside `d/` would name `d` itself.
        if matches!(hidden, b"" | b"." | b"..") || hidden.contains(&b'/') {
            return Err(UnpackError::Bad {
                path: shown.into(),
                reason: format!(
                    "invalid whiteout name {:?}",
                    String::from_utf8_lossy(hidden)
                ),
            });
        }
        let parent = match self.try_open_dir(parents, true, shown) {
            Ok(fd) => fd,
            // A parent this layer made a symlink, file or whiteout already hides everything
            // below it in the lower layers (umoci repack writes such whiteouts after the link).
            Err(Walk::NotDir(..)) => return Ok(()),
            Err(w) => return Err(self.walk_err(w, parents, shown)),
        };
        match rfs::statat(&parent, hidden, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => {
                rfs::mknodat(&parent, hidden, FileType::CharacterDevice, Mode::empty(), 0)
                    .map_err(|e| io_err(shown, e.into()))
            }
            Err(e) => Err(io_err(shown, e.into())),
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                // This layer's directory stays with what this layer put in it; the lower
                // layers' contents go, as with umoci.
                let fd = rfs::openat(
                    &parent,
                    hidden,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| io_err(shown, e.into()))?;
                self.set_opaque(&fd, shown)
            }
            // A file, link or whiteout of this layer already hides the lower entry.
            Ok(_) => Ok(()),
        }
    }

    fn entry<R: Read>(
        &mut self,
        et: EntryType,
        comps: Vec<Vec<u8>>,
        link: Option<Vec<u8>>,
        meta: Meta,
        data: Data<'_, R>,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let Some((name, parents)) = comps.split_last() else {
            if et == EntryType::Directory {
                // "./": metadata of the layer root itself.
                self.implicit.remove(&comps);
                self.chown(&self.root, &meta, shown)?;
                self.set_xattrs(&self.root, &meta, shown)?;
                self.dirs.push(PendingDir {
                    comps: Vec::new(),
                    mode: meta.mode,
                    mtime: meta.mtime,
                });
                return Ok(());
            }
            return Err(UnpackError::Bad {
                path: shown.into(),
                reason: "empty path".into(),
            });
        };
        if name.as_slice() == OPAQUE {
            return match self.try_open_dir(parents, true, shown) {
                Ok(fd) => self.set_opaque(&fd, shown),
                Err(Walk::NotDir(..)) => Ok(()),
                Err(w) => Err(self.walk_err(w, parents, shown)),
            };
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            return self.whiteout(parents, hidden, shown);
        }
        let parent = self.open_dir(parents, true, shown)?;
        match et {
            EntryType::Directory => {
                let mut opaque = false;
                match rfs::statat(&parent, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                        self.implicit.remove(&comps);
                    }
                    Ok(st) => {
                        // `.wh.d` then `d/`: the lower `d` is gone, this is a new directory.
                        opaque = is_whiteout(&st);
                        self.clear(&parent, name, false, shown)?;
                        rfs::mkdirat(&parent, name.as_slice(), Mode::from_raw_mode(0o755))
                            .map_err(|e| io_err(shown, e.into()))?;
                    }
                    Err(Errno::NOENT) => {
                        rfs::mkdirat(&parent, name.as_slice(), Mode::from_raw_mode(0o755))
                            .map_err(|e| io_err(shown, e.into()))?;
                    }
                    Err(e) => return Err(io_err(shown, e.into())),
                }
                let fd = rfs::openat(
                    &parent,
                    name.as_slice(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| io_err(shown, e.into()))?;
                if opaque {
                    self.set_opaque(&fd, shown)?;
                }
                self.chown(&fd, &meta, shown)?;
                self.set_xattrs(&fd, &meta, shown)?;
                self.dirs.push(PendingDir {
                    comps: comps.clone(),
                    mode: meta.mode,
                    mtime: meta.mtime,
                });
            }
            EntryType::Regular | EntryType::Continuous => {
                self.clear(&parent, name, false, shown)?;
                let fd = rfs::openat(
                    &parent,
                    name.as_slice(),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| io_err(shown, e.into()))?;
                let mut file = File::from(fd);
                let size = data.size;
                let n = match data.sparse {
                    Some(sparse) => pax::write_sparse(&mut file, data.reader, size, sparse, shown)?,
                    None => {
                        let n = copy_large(&mut data.reader.take(size), &mut file)
                            .map_err(|e| io_err(shown, e))?;
                        if n != size {
                            return Err(UnpackError::Bad {
                                path: shown.into(),
                                reason: format!(
                                    "archive ended inside the entry ({n} of {size} bytes)"
                                ),
                            });
                        }
                        n
                    }
                };
                self.stats.bytes += n;
                self.chown(&file, &meta, shown)?;
                // After chown, which clears setuid/setgid.
                rfs::fchmod(&file, Mode::from_raw_mode(meta.mode))
                    .map_err(|e| io_err(shown, e.into()))?;
                self.set_xattrs(&file, &meta, shown)?;
                rfs::futimens(&file, &times(meta.mtime)).map_err(|e| io_err(shown, e.into()))?;
            }
            EntryType::Symlink => {
                let target = link
                    .filter(|l| !l.is_empty())
                    .ok_or_else(|| UnpackError::Bad {
                        path: shown.into(),
                        reason: "symlink without target".into(),
                    })?;
                self.clear(&parent, name, false, shown)?;
                // The target text is stored verbatim; it is never followed while unpacking.
                rfs::symlinkat(target.as_slice(), &parent, name.as_slice())
                    .map_err(|e| io_err(shown, e.into()))?;
                if self.is_root {
                    self.chown_at(&parent, name, &meta, shown)?;
                    for (k, v) in &meta.xattrs {
                        let r = rfs::lsetxattr(
                            proc_path(&parent, name),
                            k.as_slice(),
                            v,
                            XattrFlags::empty(),
                        );
                        self.xattr_result(r, k, shown)?;
                    }
                }
                rfs::utimensat(
                    &parent,
                    name.as_slice(),
                    &times(meta.mtime),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| io_err(shown, e.into()))?;
            }
            EntryType::Link => {
                let target = link.ok_or_else(|| UnpackError::Bad {
                    path: shown.into(),
                    reason: "hardlink without target".into(),
                })?;
                let tshown = String::from_utf8_lossy(&target).into_owned();
                let tcomps = components(&target, &tshown).map_err(|_| UnpackError::Unsafe {
                    path: shown.into(),
                    reason: format!("hardlink target {tshown:?} contains '..'"),
                })?;
                let Some((tname, tparents)) = tcomps.split_last() else {
                    return Err(UnpackError::Unsafe {
                        path: shown.into(),
                        reason: "hardlink to the layer root".into(),
                    });
                };
                let tparent = self.open_dir(tparents, false, shown).map_err(|e| match e {
                    UnpackError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                        UnpackError::Bad {
                            path: shown.into(),
                            reason: format!(
                                "hardlink target {tshown:?} does not exist in this layer"
                            ),
                        }
                    }
                    e => e,
                })?;
                if tcomps == comps {
                    return Ok(());
                }
                self.clear(&parent, name, false, shown)?;
                // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
                rfs::linkat(
                    &tparent,
                    tname.as_slice(),
                    &parent,
                    name.as_slice(),
                    AtFlags::empty(),
                )
                .map_err(|e| match e {
                    Errno::NOENT => UnpackError::Bad {
                        path: shown.into(),
                        reason: format!("hardlink target {tshown:?} does not exist in this layer"),
                    },
                    e => io_err(shown, e.into()),
                })?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let ft = match et {
                    EntryType::Char => FileType::CharacterDevice,
                    EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                if ft != FileType::Fifo && !self.is_root {
                    return Err(UnpackError::Bad {
                        path: shown.into(),
                        reason: "device nodes are only created when running as root".into(),
                    });
                }
                self.clear(&parent, name, false, shown)?;
                let dev = rustix::fs::makedev(meta.dev_major, meta.dev_minor);
                rfs::mknodat(
                    &parent,
                    name.as_slice(),
                    ft,
                    Mode::from_raw_mode(meta.mode),
                    dev,
                )
                .map_err(|e| io_err(shown, e.into()))?;
                if self.is_root {
                    self.chown_at(&parent, name, &meta, shown)?;
                    rfs::chmodat(
                        &parent,
                        name.as_slice(),
                        Mode::from_raw_mode(meta.mode),
                        AtFlags::empty(),
                    )
                    .map_err(|e| io_err(shown, e.into()))?;
                }
                rfs::utimensat(
                    &parent,
                    name.as_slice(),
                    &times(meta.mtime),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| io_err(shown, e.into()))?;
            }
            EntryType::GNUSparse => {
                return Err(UnpackError::Bad {
                    path: shown.into(),
                    reason: "GNU sparse files are not supported".into(),
                })
            }
            other => {
                return Err(UnpackError::Bad {
                    path: shown.into(),
                    reason: format!("unsupported entry type {:?}", other.as_byte() as char),
                })
            }
        }
        Ok(())
    }

    /// Like [`Self::chown`] for entries that cannot be opened (symlinks, device nodes, fifos):
    /// by name under `parent`, never following a symlink.
    fn chown_at(
        &self,
        parent: &OwnedFd,
        name: &[u8],
        meta: &Meta,
        shown: &str,
    ) -> Result<(), UnpackError> {
        rfs::chownat(
            parent,
            name,
            Some(uid(meta.uid, shown)?),
            Some(gid(meta.gid, shown)?),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_err(shown, e.into()))
    }

    fn chown<Fd: AsFd>(&self, fd: Fd, meta: &Meta, shown: &str) -> Result<(), UnpackError> {
        if !self.is_root {
            return Ok(());
        }
        rfs::fchown(fd, Some(uid(meta.uid, shown)?), Some(gid(meta.gid, shown)?))
            .map_err(|e| io_err(shown, e.into()))
    }

    fn set_xattrs<Fd: AsFd>(&self, fd: Fd, meta: &Meta, shown: &str) -> Result<(), UnpackError> {
        for (k, v) in &meta.xattrs {
            let r = rfs::fsetxattr(fd.as_fd(), k.as_slice(), v, XattrFlags::empty());
            self.xattr_result(r, k, shown)?;
        }
        Ok(())
    }

    fn xattr_result(
        &self,
        r: rustix::io::Result<()>,
        k: &[u8],
        shown: &str,
    ) -> Result<(), UnpackError> {
        match r {
            Ok(()) => Ok(()),
            // Filesystems without xattr support, or trusted.* as non-root: the layer is still usable.
            Err(e) if e == Errno::NOTSUP || (!self.is_root && e == Errno::PERM) => {
                debug!(path = shown, xattr = %String::from_utf8_lossy(k), "xattr not applied: {e}");
                Ok(())
            }
            Err(e) => Err(io_err(shown, e.into())),
        }
    }

    fn finish(&mut self) -> Result<(), UnpackError> {
        // Deepest first so a parent's mtime is set after its children changed it.
        self.dirs.sort_by_key(|d| std::cmp::Reverse(d.comps.len()));
        let dirs = std::mem::take(&mut self.dirs);
        let implicit = std::mem::take(&mut self.implicit);
        let mut marked = 0u64;
        for comps in implicit {
            let shown = String::from_utf8_lossy(&comps.join(&b'/')).into_owned();
            // Replaced by a later entry of the archive: nothing to mark.
            let Ok(fd) = self.try_open_dir(&comps, false, &shown) else {
                continue;
            };
            // Fixed rather than left to the umask, like the 0755 containerd and umoci use.
            rfs::fchmod(&fd, Mode::from_raw_mode(0o755)).map_err(|e| io_err(&shown, e.into()))?;
            if self.is_root {
                rfs::fsetxattr(&fd, IMPLICIT_XATTR, b"1", XattrFlags::empty())
                    .map_err(|e| io_err(&shown, e.into()))?;
                marked += u64::from(!comps.is_empty());
            }
        }
        if self.is_root {
            // Lets the composition skip walking layers without implicit directories.
            rfs::fsetxattr(
                &self.root,
                compose::IMPLICIT_COUNT_XATTR,
                marked.to_string().as_bytes(),
                XattrFlags::empty(),
            )
            .map_err(|e| io_err("<layer root>", e.into()))?;
        }
        for d in dirs {
            let shown = String::from_utf8_lossy(&d.comps.join(&b'/')).into_owned();
            let fd = match self.try_open_dir(&d.comps, false, &shown) {
                Ok(fd) => fd,
                // A later entry replaced the directory; its own metadata applies.
                Err(Walk::NotDir(..) | Walk::Missing) => continue,
                Err(Walk::Err(e)) => return Err(e),
            };
            rfs::fchmod(&fd, Mode::from_raw_mode(d.mode)).map_err(|e| io_err(&shown, e.into()))?;
            rfs::futimens(&fd, &times(d.mtime)).map_err(|e| io_err(&shown, e.into()))?;
        }
        Ok(())
    }
}

/// `io::copy` with a 128 KiB buffer: the generic path uses 8 KiB, which costs a syscall per
/// 8 KiB written on large files.
fn copy_large<R: Read, W: io::Write>(r: &mut R, w: &mut W) -> io::Result<u64> {
    let mut buf = vec![0u8; 128 * 1024];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        total += n as u64;
    }
}

fn uid(v: u64, shown: &str) -> Result<rfs::Uid, UnpackError> {
    u32::try_from(v)
        .map(rfs::Uid::from_raw)
        .map_err(|_| UnpackError::Bad {
            path: shown.into(),
            reason: format!("uid {v} out of range"),
        })
}

fn gid(v: u64, shown: &str) -> Result<rfs::Gid, UnpackError> {
    u32::try_from(v)
        .map(rfs::Gid::from_raw)
        .map_err(|_| UnpackError::Bad {
            path: shown.into(),
            reason: format!("gid {v} out of range"),
        })
}

fn times(mtime: Timespec) -> Timestamps {
    Timestamps {
        last_access: mtime,
        last_modification: mtime,
    }
}

fn proc_path(parent: &OwnedFd, name: &[u8]) -> std::path::PathBuf {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let mut p = std::path::PathBuf::from(format!("/proc/self/fd/{}", parent.as_raw_fd()));
    p.push(std::ffi::OsStr::from_bytes(name));
    p
}

pub mod compose;
mod pax;
#[cfg(test)]
mod tests;
