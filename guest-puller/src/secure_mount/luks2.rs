//! CDH's `luks2` encryption of a block device, step by step: format with a detached header
//! (empty source), open, then make and mount the filesystem or link the opened device.
//!
//! The command lines are CDH's (guest-components `storage/drivers/luks2.rs` and
//! `filesystem.rs`): `cryptsetup --batch-mode luksFormat --type luks2 --cipher aes-xts-plain64
//! --sector-size 4096 --header <h> [--integrity hmac-sha256 --integrity-no-wipe
//! --integrity-no-journal] <dev> -`, `cryptsetup luksOpen [--header <h>] -d - <dev> <name>`,
//! `mkfs.ext4 <mapped> -F <mkfsOpts…>`. The key is only ever written to cryptsetup's stdin
//! (key file `-`): never an argument, a file or a log line.

use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use tracing::{info, warn};

use super::options::{SourceType, Target};
use super::system::System;
use super::SecureMountError;

/// Where detached LUKS headers live: CDH's base dir, on the guest's /run tmpfs (RAM only).
pub const LUKS_HEADER_DIR: &str = "/run/confidential-containers/cdh/luks-headers";
/// Size of a detached header file, as CDH makes it (room for LUKS2 metadata and keyslots).
pub const HEADER_SIZE: u64 = 16 << 20;
/// The cryptsetup binary (found on PATH).
pub const CRYPTSETUP: &str = "cryptsetup";
/// Where device-mapper puts opened volumes.
pub const MAPPER_DIR: &str = "/dev/mapper";

const CIPHER: &str = "aes-xts-plain64";
const SECTOR_SIZE: &str = "4096";
const INTEGRITY: &str = "hmac-sha256";
/// The unit of the pre-zeroing writes: the volume's sector size.
const SECTOR: u64 = 4096;

/// The detached header of `device` below `dir`: the device path, base64url, `.header`, so one
/// device has one header however often it is asked for.
pub fn header_path(dir: &Path, device: &Path) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let name = URL_SAFE_NO_PAD.encode(device.as_os_str().as_bytes());
    dir.join(format!("{name}.header"))
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `cryptsetup` arguments formatting `device` as LUKS2 with its header in `header`, the key read
/// from stdin.
pub fn format_args(device: &Path, header: &Path, integrity: bool) -> Vec<String> {
    let mut a: Vec<String> = [
        "--batch-mode",
        "luksFormat",
        "--type",
        "luks2",
        "--cipher",
        CIPHER,
        "--sector-size",
        SECTOR_SIZE,
        "--header",
    ]
    .map(String::from)
    .into();
    a.push(s(header));
    if integrity {
        // No wipe: formatting would otherwise write the whole device to initialise its tags;
        // the filesystem step writes every sector it later reads (see `superblock_sectors`).
        a.extend(
            [
                "--integrity",
                INTEGRITY,
                "--integrity-no-wipe",
                "--integrity-no-journal",
            ]
            .map(String::from),
        );
    }
    a.push(s(device));
    a.push("-".into());
    a
}

/// `cryptsetup` arguments opening `device` as `/dev/mapper/<name>`, the key read from stdin.
pub fn open_args(device: &Path, header: Option<&Path>, name: &str) -> Vec<String> {
    let mut a = vec!["luksOpen".to_string()];
    if let Some(h) = header {
        a.push("--header".into());
        a.push(s(h));
    }
    a.extend(["-d".into(), "-".into(), s(device), name.to_owned()]);
    a
}

/// `cryptsetup` arguments closing `/dev/mapper/<name>` (undoing an open whose next step failed).
pub fn close_args(name: &str) -> Vec<String> {
    vec!["luksClose".into(), name.to_owned()]
}

/// `mkfs.<fs>` arguments: the device first, forced, then the caller's options, as CDH orders
/// them; `dry_run` adds `-n` (print the layout, write nothing).
pub fn mkfs_args(device: &Path, opts: &[String], dry_run: bool) -> Vec<String> {
    let mut a = vec![s(device), "-F".into()];
    if dry_run {
        a.push("-n".into());
    }
    a.extend(opts.iter().cloned());
    a
}

/// The ext4 options CDH uses on dm-integrity: the caller's, with `lazy_itable_init=0` added to
/// the last `-E` group (or as a new one) unless the caller set `lazy_itable_init` itself.
/// Lazy inode-table initialisation reads table blocks that were never written, and on a
/// not-wiped dm-integrity device such a read fails its tag check.
pub fn with_eager_inode_tables(opts: &[String]) -> Vec<String> {
    let mut out = opts.to_vec();
    if out.iter().any(|o| o.contains("lazy_itable_init")) {
        return out;
    }
    warn!("dataIntegrity: making ext4 with lazy_itable_init=0 (set it in mkfsOpts to override)");
    if let Some(i) = out.iter().rposition(|o| o == "-E") {
        if let Some(group) = out.get_mut(i + 1) {
            group.push_str(",lazy_itable_init=0");
            return out;
        }
    }
    if let Some(group) = out
        .iter_mut()
        .rev()
        .find(|o| o.starts_with("-E") && o.len() > 2)
    {
        group.push_str(",lazy_itable_init=0");
        return out;
    }
    out.extend(["-E".into(), "lazy_itable_init=0".into()]);
    out
}

/// The 4096-byte-aligned byte ranges holding the superblock and its backups, read from mke2fs'
/// dry run (`Creating filesystem with N <B>k blocks`, `Superblock backups stored on blocks:
/// …`): mke2fs reads them before writing, and on a not-wiped dm-integrity device a read of a
/// never-written sector fails, so they are zeroed (which writes valid tags) first.
pub fn superblock_sectors(dry_run: &str) -> Result<Vec<(u64, usize)>, String> {
    let block_size = dry_run
        .lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix("Creating filesystem with ")?;
            let unit = rest.split_whitespace().nth(1)?;
            unit.strip_suffix('k')?.parse::<u64>().ok()
        })
        .map(|k| k * 1024)
        .filter(|b| *b > 0)
        .ok_or_else(|| format!("mke2fs -n printed no block size: {dry_run:?}"))?;
    let mut blocks = vec![0u64];
    const BACKUPS: &str = "Superblock backups stored on blocks:";
    // A filesystem of a single block group has no backups and mke2fs prints no such line.
    if let Some(at) = dry_run.find(BACKUPS) {
        for line in dry_run[at + BACKUPS.len()..].lines().skip(1) {
            if line.trim().is_empty() {
                break;
            }
            for tok in line.split([',', ' ', '\t']).filter(|t| !t.is_empty()) {
                let n = tok
                    .parse::<u64>()
                    .map_err(|_| format!("mke2fs -n: {tok:?} in the backup list"))?;
                blocks.push(n);
            }
        }
    }
    let mut ranges: Vec<(u64, usize)> = blocks
        .into_iter()
        .map(|b| {
            let start = b * block_size / SECTOR * SECTOR;
            let end = (b + 1) * block_size;
            let end = end.div_ceil(SECTOR) * SECTOR;
            (start, (end - start) as usize)
        })
        .collect();
    ranges.sort_unstable();
    ranges.dedup();
    Ok(ranges)
}

/// Everything decided before the first change to the device.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The device (a block device, or an image file cryptsetup attaches to a loop device).
    pub device: PathBuf,
    /// Where the result appears.
    pub mount_point: PathBuf,
    /// The detached header to create (empty source) or `None` (header on the device).
    pub header: Option<PathBuf>,
    /// `/dev/mapper/<mapper>`.
    pub mapper: String,
    /// dm-integrity under dm-crypt.
    pub integrity: bool,
    /// `sourceType`.
    pub source: SourceType,
    /// `targetType`.
    pub target: Target,
}

impl Plan {
    /// The opened volume.
    pub fn mapped(&self) -> PathBuf {
        Path::new(MAPPER_DIR).join(&self.mapper)
    }

    /// Formats (empty source), opens and mounts or links; on failure undoes what it did, so
    /// the device is closed and the header gone, and the request can be retried.
    pub fn execute(&self, sys: &dyn System, key: &[u8]) -> Result<(), SecureMountError> {
        if let Some(h) = &self.header {
            create_header(h, &self.device)?;
        }
        let drop_header = || {
            if let Some(h) = &self.header {
                if let Err(e) = std::fs::remove_file(h) {
                    warn!(header = %h.display(), "removing the LUKS header: {e}");
                }
            }
        };
        let opened = self.format_and_open(sys, key);
        if let Err(e) = opened {
            drop_header();
            return Err(e);
        }
        if let Err(e) = self.make_target(sys) {
            match sys.run(CRYPTSETUP, &close_args(&self.mapper), None) {
                Ok(_) => info!(mapper = %self.mapper, "closed after the failed mount"),
                Err(c) => warn!(mapper = %self.mapper, "closing after the failed mount: {c}"),
            }
            drop_header();
            return Err(e);
        }
        Ok(())
    }

    fn format_and_open(&self, sys: &dyn System, key: &[u8]) -> Result<(), SecureMountError> {
        if let (SourceType::Empty, Some(h)) = (self.source, &self.header) {
            warn!(device = %self.device.display(), "formatting: everything on the device is lost");
            sys.run(
                CRYPTSETUP,
                &format_args(&self.device, h, self.integrity),
                Some(key),
            )?;
        }
        sys.run(
            CRYPTSETUP,
            &open_args(&self.device, self.header.as_deref(), &self.mapper),
            Some(key),
        )?;
        info!(device = %self.device.display(), mapper = %self.mapper, integrity = self.integrity, "LUKS2 volume opened");
        Ok(())
    }

    fn make_target(&self, sys: &dyn System) -> Result<(), SecureMountError> {
        let mapped = self.mapped();
        let io_err = |what: String| move |source| SecureMountError::Io { what, source };
        match &self.target {
            Target::Device => {
                sys.symlink(&mapped, &self.mount_point)
                    .map_err(io_err(format!(
                        "linking {} to {}",
                        self.mount_point.display(),
                        mapped.display()
                    )))?;
            }
            Target::FileSystem { fs_type, mkfs_opts } => {
                if self.source == SourceType::Empty {
                    let mkfs = fs_type.mkfs();
                    let opts = if self.integrity {
                        let opts = with_eager_inode_tables(mkfs_opts);
                        let dry = sys.run(mkfs, &mkfs_args(&mapped, &opts, true), None)?;
                        let ranges = superblock_sectors(&dry).map_err(|reason| {
                            SecureMountError::Command {
                                program: mkfs.into(),
                                args: mkfs_args(&mapped, &opts, true).join(" "),
                                reason,
                            }
                        })?;
                        for (offset, len) in ranges {
                            sys.zero(&mapped, offset, len).map_err(io_err(format!(
                                "zeroing {len} bytes at {offset} of {}",
                                mapped.display()
                            )))?;
                        }
                        opts
                    } else {
                        mkfs_opts.clone()
                    };
                    sys.run(mkfs, &mkfs_args(&mapped, &opts, false), None)?;
                    info!(device = %mapped.display(), fs = fs_type.name(), "filesystem made");
                }
                sys.mount_fs(&mapped, &self.mount_point, fs_type.name())
                    .map_err(io_err(format!(
                        "mounting {} on {}",
                        mapped.display(),
                        self.mount_point.display()
                    )))?;
            }
        }
        Ok(())
    }
}

/// Creates `header` (its dir mode 0700, the file 0600, [`HEADER_SIZE`] bytes); one that exists
/// belongs to an earlier mount of the device and is never reused or overwritten.
fn create_header(header: &Path, device: &Path) -> Result<(), SecureMountError> {
    let io_err = |source: io::Error| SecureMountError::Io {
        what: format!("creating the LUKS header {}", header.display()),
        source,
    };
    if let Some(dir) = header.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err)?;
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(header)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                SecureMountError::HeaderExists {
                    device: device.to_owned(),
                    header: header.to_owned(),
                }
            } else {
                io_err(e)
            }
        })?;
    if let Err(e) = f.set_len(HEADER_SIZE) {
        drop(f);
        let _ = std::fs::remove_file(header);
        return Err(io_err(e));
    }
    Ok(())
}
