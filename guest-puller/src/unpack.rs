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
use std::rc::Rc;

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
    let setgid_root = rfs::fstat(&root)
        .map(|st| st.st_mode & 0o2000 != 0)
        .map_err(|e| io_err(&dest.to_string_lossy(), e.into()))?;
    let mut u = Unpacker {
        root: Rc::new(root),
        is_root,
        // In a setgid root new entries take the directory's group, which entries of the
        // archive may change: then every entry is chowned.
        created_owner: (!setgid_root).then(|| {
            (
                rustix::process::geteuid().as_raw(),
                rustix::process::getegid().as_raw(),
            )
        }),
        umask: process_umask(),
        dirs: Vec::new(),
        stats: UnpackStats::default(),
        implicit: HashSet::from([Vec::new()]),
        chain: std::cell::RefCell::new(Vec::new()),
        buf: vec![0; COPY_BUF],
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
    root: Rc<OwnedFd>,
    is_root: bool,
    /// Owner (uid, gid) a newly created entry has; `None` when that is not known for sure.
    /// Entries of that owner skip their chown.
    created_owner: Option<(u32, u32)>,
    /// The process umask when it could be read; files whose mode it leaves intact are created
    /// with their final mode and skip their chmod.
    umask: Option<u32>,
    dirs: Vec<PendingDir>,
    stats: UnpackStats,
    /// Directories this layer holds only because entries below them needed a parent (and the
    /// root, unless the archive has a `./` entry). Marked with [`IMPLICIT_XATTR`] at the end so
    /// the overlay composition can give them the attributes of the lower layers.
    implicit: HashSet<Vec<Vec<u8>>>,
    /// The directories of the last path resolved, outermost first: archives list a
    /// directory's entries together, so a walk only opens the components past the part it
    /// shares with the previous one. Dropped whenever anything is removed.
    chain: std::cell::RefCell<Vec<(Vec<u8>, Rc<OwnedFd>)>>,
    /// File data goes through this one buffer, so no entry allocates.
    buf: Vec<u8>,
}

/// Bytes of file data per write: a file up to this size is written with one syscall.
const COPY_BUF: usize = 128 * 1024;

/// The process umask, read from `/proc/self/status` (setting it to read it back would race
/// with other threads creating files).
fn process_umask() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let v = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
    u32::from_str_radix(v.trim(), 8).ok()
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
    ) -> Result<Rc<OwnedFd>, UnpackError> {
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
    ) -> Result<Rc<OwnedFd>, Walk> {
        let shared = {
            let mut chain = self.chain.borrow_mut();
            let shared = chain
                .iter()
                .zip(comps)
                .take_while(|((name, _), c)| name == *c)
                .count();
            chain.truncate(shared);
            shared
        };
        self.walk(comps, shared, create, shown)
    }

    /// Opens `comps[start..]` below the chain's last directory (whose path is `comps[..start]`),
    /// extending the chain with every directory opened.
    fn walk(
        &mut self,
        comps: &[Vec<u8>],
        start: usize,
        create: bool,
        shown: &str,
    ) -> Result<Rc<OwnedFd>, Walk> {
        let e = |e: Errno| Walk::Err(io_err(shown, e.into()));
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut cur = match self.chain.borrow().last() {
            Some((_, fd)) if start > 0 => fd.clone(),
            _ => self.root.clone(),
        };
        for (i, c) in comps.iter().enumerate().skip(start) {
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
                        // The chain holds `comps[..i]` and nothing deeper, so it stays valid.
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
            cur = Rc::new(next);
            self.chain.borrow_mut().push((c.clone(), cur.clone()));
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
                self.chain.borrow_mut().clear();
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
                self.chown(&self.root, &meta, false, shown)?;
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
                // Created first and looked at only when something is there: in a fresh
                // layer that is rare, and it saves a stat per directory.
                let mut fresh = true;
                let mkdir =
                    |at: &OwnedFd| rfs::mkdirat(at, name.as_slice(), Mode::from_raw_mode(0o755));
                match mkdir(&parent) {
                    Ok(()) => {}
                    Err(Errno::EXIST) => {
                        let st = rfs::statat(&parent, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
                            .map_err(|e| io_err(shown, e.into()))?;
                        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                            self.implicit.remove(&comps);
                            fresh = false;
                        } else {
                            // `.wh.d` then `d/`: the lower `d` is gone, this is a new directory.
                            opaque = is_whiteout(&st);
                            self.clear(&parent, name, false, shown)?;
                            mkdir(&parent).map_err(|e| io_err(shown, e.into()))?;
                        }
                    }
                    Err(e) => return Err(io_err(shown, e.into())),
                }
                if opaque || !meta.xattrs.is_empty() || self.needs_chown(&meta, fresh) {
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
                    self.chown(&fd, &meta, fresh, shown)?;
                    self.set_xattrs(&fd, &meta, shown)?;
                }
                self.dirs.push(PendingDir {
                    comps: comps.clone(),
                    mode: meta.mode,
                    mtime: meta.mtime,
                });
            }
            EntryType::Regular | EntryType::Continuous => {
                // Created with its final mode when the umask leaves that intact and no
                // setuid/setgid/sticky bit has to wait for the chown: one fchmod less.
                let direct = self
                    .umask
                    .is_some_and(|um| meta.mode & 0o7000 == 0 && meta.mode & um == 0);
                let create_mode = Mode::from_raw_mode(if direct { meta.mode } else { 0o600 });
                let create = |at: &OwnedFd| {
                    rfs::openat(
                        at,
                        name.as_slice(),
                        OFlags::WRONLY
                            | OFlags::CREATE
                            | OFlags::EXCL
                            | OFlags::NOFOLLOW
                            | OFlags::CLOEXEC,
                        create_mode,
                    )
                };
                // Created first and cleared only when something is there (rare in a fresh
                // layer): saves a stat per file.
                let fd = match create(&parent) {
                    Err(Errno::EXIST) => {
                        self.clear(&parent, name, false, shown)?;
                        create(&parent)
                    }
                    r => r,
                }
                .map_err(|e| io_err(shown, e.into()))?;
                let mut file = File::from(fd);
                let size = data.size;
                let n = match data.sparse {
                    Some(sparse) => pax::write_sparse(&mut file, data.reader, size, sparse, shown)?,
                    None => {
                        let n = copy_large(&mut data.reader.take(size), &mut file, &mut self.buf)
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
                self.chown(&file, &meta, true, shown)?;
                if !direct {
                    // After chown, which clears setuid/setgid.
                    rfs::fchmod(&file, Mode::from_raw_mode(meta.mode))
                        .map_err(|e| io_err(shown, e.into()))?;
                }
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
                // The target text is stored verbatim; it is never followed while unpacking.
                match rfs::symlinkat(target.as_slice(), &parent, name.as_slice()) {
                    Err(Errno::EXIST) => {
                        self.clear(&parent, name, false, shown)?;
                        rfs::symlinkat(target.as_slice(), &parent, name.as_slice())
                    }
                    r => r,
                }
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
        // Only ever called for entries just created.
        if !self.needs_chown(meta, true) {
            return Ok(());
        }
        rfs::chownat(
            parent,
            name,
            Some(uid(meta.uid, shown)?),
            Some(gid(meta.gid, shown)?),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_err(shown, e.into()))
    }

    /// Whether an entry must be chowned to `meta`'s owner: not when it was `fresh`ly created
    /// and creation already gave it that owner.
    fn needs_chown(&self, meta: &Meta, fresh: bool) -> bool {
        self.is_root
            && !(fresh
                && self
                    .created_owner
                    .is_some_and(|(u, g)| meta.uid == u64::from(u) && meta.gid == u64::from(g)))
    }

    fn chown<Fd: AsFd>(
        &self,
        fd: Fd,
        meta: &Meta,
        fresh: bool,
        shown: &str,
    ) -> Result<(), UnpackError> {
        if !self.needs_chown(meta, fresh) {
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

/// Copies through `buf`, filling it before each write: a file up to `buf.len()` bytes is one
/// write whatever chunks the stream delivers (the generic `io::copy` writes per read, 8 KiB
/// at most).
fn copy_large<R: Read, W: io::Write>(r: &mut R, w: &mut W, buf: &mut [u8]) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let mut len = 0;
        while len < buf.len() {
            match r.read(&mut buf[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if len == 0 {
            return Ok(total);
        }
        w.write_all(&buf[..len])?;
        total += len as u64;
        if len < buf.len() {
            return Ok(total);
        }
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
