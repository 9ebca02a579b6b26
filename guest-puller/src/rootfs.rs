//! The one way the puller touches an unpacked (untrusted) rootfs.
//!
//! An image decides what its rootfs holds: `/etc/passwd` may be a symlink to a guest file, a
//! FIFO (an open blocks forever), a device node (`/dev/zero` never ends) or a sparse 1 TB file.
//! Every lookup is therefore resolved by the kernel inside the rootfs (`openat2` with
//! `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`, so `..` and absolute symlinks stay below it), the
//! final component is never followed (`O_NOFOLLOW`), the first open is `O_PATH` (opening a
//! FIFO or device has no effect and cannot block) and only a regular file is then reopened for
//! reading, through its own descriptor, with a size cap checked before and while reading.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// Why a file in a rootfs could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The file (or a directory on its way) does not exist.
    #[error("{path} does not exist in the image rootfs")]
    NotFound {
        /// Path inside the rootfs.
        path: String,
    },
    /// The path names a symlink, FIFO, device, socket or directory.
    #[error("{path} in the image rootfs is a {kind}, not a regular file")]
    NotRegular {
        /// Path inside the rootfs.
        path: String,
        /// What it is instead.
        kind: &'static str,
    },
    /// The file is larger than the puller reads.
    #[error("{path} in the image rootfs is larger than {limit} bytes")]
    TooLarge {
        /// Path inside the rootfs.
        path: String,
        /// The cap.
        limit: u64,
    },
    /// The rootfs or the file could not be opened or read.
    #[error("{path} in the image rootfs: {source}")]
    Io {
        /// Path inside the rootfs (or the rootfs itself).
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// An opened rootfs directory; every access below it goes through this handle.
pub struct Rootfs {
    dir: OwnedFd,
    shown: PathBuf,
}

fn kind_of(ft: FileType) -> &'static str {
    match ft {
        FileType::RegularFile => "regular file",
        FileType::Directory => "directory",
        FileType::Symlink => "symlink",
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        FileType::Unknown => "file of unknown type",
    }
}

impl Rootfs {
    /// Opens the rootfs directory `path` (a directory the puller made, so it is trusted).
    pub fn open(path: &Path) -> Result<Self, RootfsError> {
        let dir = rfs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| RootfsError::Io {
            path: path.display().to_string(),
            source: e.into(),
        })?;
        Ok(Self {
            dir,
            shown: path.to_owned(),
        })
    }

    /// The rootfs directory this handle was opened on.
    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// Reads the regular file `rel` (relative to the rootfs root, `/` allowed) of at most
    /// `limit` bytes.
    pub fn read_file(&self, rel: &str, limit: u64) -> Result<Vec<u8>, RootfsError> {
        let shown = format!("/{}", rel.trim_start_matches('/'));
        let io_err = |source: io::Error| RootfsError::Io {
            path: shown.clone(),
            source,
        };
        let pathfd = match rfs::openat2(
            &self.dir,
            rel.trim_start_matches('/'),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) | Err(Errno::NOTDIR) => {
                return Err(RootfsError::NotFound { path: shown });
            }
            Err(e) => return Err(io_err(e.into())),
        };
        let st = rfs::fstat(&pathfd).map_err(|e| io_err(e.into()))?;
        let ft = FileType::from_raw_mode(st.st_mode);
        if ft != FileType::RegularFile {
            return Err(RootfsError::NotRegular {
                path: shown,
                kind: kind_of(ft),
            });
        }
        let too_large = || RootfsError::TooLarge {
            path: shown.clone(),
            limit,
        };
        if u64::try_from(st.st_size).unwrap_or(u64::MAX) > limit {
            return Err(too_large());
        }
        let file = reopen_regular(&pathfd).map_err(io_err)?;
        let mut out = Vec::new();
        // One byte past the cap tells a file that grew since fstat from one that fits.
        file.take(limit.saturating_add(1))
            .read_to_end(&mut out)
            .map_err(io_err)?;
        if out.len() as u64 > limit {
            return Err(too_large());
        }
        Ok(out)
    }

    /// Reads every regular file below the root once, never following symlinks and never
    /// opening anything else (how a lazily mounted image is fetched whole). Returns the bytes read.
    pub fn read_all_files(&self) -> io::Result<u64> {
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        let root = rfs::openat(
            &self.dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut stack: Vec<(OwnedFd, PathBuf)> = vec![(root, PathBuf::from("/"))];
        while let Some((dirfd, shown)) = stack.pop() {
            for entry in rfs::Dir::read_from(&dirfd)? {
                let entry = entry?;
                let name = entry.file_name().to_bytes();
                if name == b"." || name == b".." {
                    continue;
                }
                let child = shown.join(std::ffi::OsStr::from_bytes(name));
                let fd = rfs::openat(
                    &dirfd,
                    entry.file_name(),
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                match FileType::from_raw_mode(rfs::fstat(&fd)?.st_mode) {
                    FileType::Directory => {
                        let d = rfs::openat(
                            &dirfd,
                            entry.file_name(),
                            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                            Mode::empty(),
                        )?;
                        stack.push((d, child));
                    }
                    FileType::RegularFile => {
                        let mut f = reopen_regular(&fd)?;
                        loop {
                            match f.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => total += n as u64,
                                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                                Err(e) => {
                                    return Err(io::Error::new(
                                        e.kind(),
                                        format!("{}: {e}", child.display()),
                                    ))
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(total)
    }
}

/// Opens an `O_PATH` descriptor of a regular file for reading. Reopening through the
/// descriptor (not the path) reads exactly the inode that was checked.
fn reopen_regular(pathfd: &OwnedFd) -> io::Result<File> {
    let proc = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&pathfd.as_fd())
    ));
    let fd = rfs::open(
        &proc,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let f = File::from(fd);
    // Paranoia against a /proc that is not procfs: the reopened file must be the checked one.
    let (a, b) = (rfs::fstat(pathfd)?, rfs::fstat(&f)?);
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) {
        return Err(io::Error::other(
            "reopening through /proc/self/fd gave another file (is /proc mounted?)",
        ));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn rootfs_with_etc() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        dir
    }

    #[test]
    fn reads_regular_files_and_resolves_symlinked_dirs_inside_the_root() {
        let dir = rootfs_with_etc();
        std::fs::write(dir.path().join("etc/passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
        // An absolute symlink on the way resolves inside the rootfs, not on the host.
        std::os::unix::fs::symlink("/etc", dir.path().join("cfg")).unwrap();
        let r = Rootfs::open(dir.path()).unwrap();
        assert_eq!(
            r.read_file("/etc/passwd", 100).unwrap(),
            b"root:x:0:0::/:/bin/sh\n"
        );
        assert_eq!(r.read_file("cfg/passwd", 100).unwrap().len(), 22);
        assert!(matches!(
            r.read_file("/etc/group", 100),
            Err(RootfsError::NotFound { .. })
        ));
        assert!(matches!(
            r.read_file("/etc/passwd", 10),
            Err(RootfsError::TooLarge { limit: 10, .. })
        ));
        // `..` cannot climb out of the root either.
        assert!(matches!(
            r.read_file("../../../../etc/passwd", 100),
            Ok(ref v) if v.len() == 22
        ));
    }

    #[test]
    fn hostile_files_fail_fast_with_a_clear_error() {
        let dir = rootfs_with_etc();
        let etc = dir.path().join("etc");
        let secret = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret.path(), "guest secret").unwrap();
        std::os::unix::fs::symlink(secret.path(), etc.join("link-out")).unwrap();
        rfs::mknodat(
            rfs::CWD,
            etc.join("fifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        std::fs::File::create(etc.join("huge"))
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        std::fs::create_dir(etc.join("dir")).unwrap();
        let r = Rootfs::open(dir.path()).unwrap();
        let started = Instant::now();
        for (name, kind) in [
            ("link-out", "symlink"),
            ("fifo", "FIFO"),
            ("dir", "directory"),
        ] {
            match r.read_file(&format!("etc/{name}"), 1 << 20) {
                Err(RootfsError::NotRegular { kind: k, .. }) => assert_eq!(k, kind, "{name}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        let e = r.read_file("etc/huge", 1 << 20).unwrap_err();
        assert!(matches!(e, RootfsError::TooLarge { .. }), "{e:?}");
        assert!(e.to_string().contains("/etc/huge"), "{e}");
        // Device nodes: the host's own /dev, seen as a rootfs (no mknod privilege needed).
        let host = Rootfs::open(Path::new("/")).unwrap();
        for dev in ["dev/null", "dev/zero"] {
            match host.read_file(dev, 1 << 20) {
                Err(RootfsError::NotRegular { kind, .. }) => assert_eq!(kind, "character device"),
                other => panic!("{dev}: {other:?}"),
            }
        }
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn read_all_files_skips_everything_but_regular_files() {
        let dir = rootfs_with_etc();
        std::fs::write(dir.path().join("etc/a"), vec![1u8; 3000]).unwrap();
        std::fs::create_dir_all(dir.path().join("x/y")).unwrap();
        std::fs::write(dir.path().join("x/y/b"), vec![2u8; 17]).unwrap();
        rfs::mknodat(
            rfs::CWD,
            dir.path().join("x/fifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let big = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(big.path(), vec![0u8; 100_000]).unwrap();
        std::os::unix::fs::symlink(big.path(), dir.path().join("x/out")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero")).unwrap();
        let r = Rootfs::open(dir.path()).unwrap();
        assert_eq!(r.read_all_files().unwrap(), 3017);
    }
}
