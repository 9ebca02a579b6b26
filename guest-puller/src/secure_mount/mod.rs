//! CDH's secure mounts (`api.SecureMountService`): the `block-device` volume type with `luks2`
//! encryption, what kata-agent asks for when a container lists the trusted storage device
//! (`/dev/trusted_store`): the device is formatted with a key that never leaves the guest, and
//! the guest-puller's work dir (image layers) is mounted on it instead of living in guest RAM.
//!
//! Semantics are CDH's (guest-components `confidential-data-hub/hub/src/storage/`): the device
//! is `deviceId` (`MAJ:MIN`, its `/dev` node from sysfs) or `devicePath`; the key is a sealed
//! secret, a KBS resource, a guest file or, without `key`, 4096 random bytes; an empty source is
//! formatted with its LUKS header detached, in RAM below [`luks2::LUKS_HEADER_DIR`], so the
//! volume cannot be opened after the guest is gone; `targetType` `fileSystem` makes (empty
//! source) and mounts ext4, `device` links the opened device. Requests are served one at a time.
//!
//! Where this differs from CDH: errors carry the guest-puller's error kinds (CDH answers
//! `INTERNAL` to everything); everything that can be checked is checked before the device is
//! touched; a failure undoes what was done (CDH leaves the header and the opened volume behind,
//! so a retry cannot succeed); `dataIntegrity` takes only `true`/`false`.

pub mod luks2;
pub mod options;
pub mod system;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::error::ErrorKind;
use crate::resource::{ResourceError, ResourceFetcher};
use crate::sealed::{SealedSecretError, Unsealer};
use luks2::{Plan, CRYPTSETUP};
pub use options::{BlockDeviceOptions, DeviceRef, KeySource, SourceType, Target};
use system::System;

/// Size of the key made when the request names none (CDH's).
pub const EPHEMERAL_KEY_SIZE: usize = 4096;
/// Largest key file read (cryptsetup's default key file limit is 8 MiB).
pub const MAX_KEY_FILE: usize = 8 << 20;

/// Why a secure mount was refused or failed; messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum SecureMountError {
    /// A volume type CDH may know but this guest does not serve.
    #[error("volume_type {0:?} is not served here (only \"block-device\")")]
    UnknownVolumeType(String),
    /// A setting this guest does not implement (zfs, a filesystem other than ext4).
    #[error("not supported: {0}")]
    Unsupported(String),
    /// An option (or the mount point) is missing or malformed.
    #[error("option {option}: {reason}")]
    InvalidOption {
        /// CDH's option name, or `mount_point`.
        option: String,
        /// What is wrong.
        reason: String,
    },
    /// The device named by the request does not exist.
    #[error("{device}: not found ({reason})")]
    DeviceNotFound {
        /// The `deviceId` or `devicePath` asked for.
        device: String,
        /// Why it could not be found.
        reason: String,
    },
    /// The device is neither a block device nor an image file.
    #[error("{0}: not a block device")]
    NotABlockDevice(PathBuf),
    /// The mount point does not exist (kata-agent creates it before asking).
    #[error("mount point {0} does not exist")]
    MountPointMissing(PathBuf),
    /// The mount point of a filesystem is not a directory.
    #[error("mount point {0} is not a directory")]
    MountPointNotDir(PathBuf),
    /// The mount point of a device link already exists.
    #[error("mount point {0} already exists (targetType device makes a symlink there)")]
    MountPointExists(PathBuf),
    /// This process already mounted a volume there.
    #[error("{mount_point} is already a secure mount (of {device})")]
    AlreadyMounted {
        /// The mount point.
        mount_point: PathBuf,
        /// The device mounted there.
        device: PathBuf,
    },
    /// The device is already opened by an earlier secure mount.
    #[error("{device} is already securely mounted on {mount_point}")]
    DeviceInUse {
        /// The device.
        device: PathBuf,
        /// Where it is mounted.
        mount_point: PathBuf,
    },
    /// A detached header of the device exists: it was formatted by an earlier mount (possibly
    /// of an earlier guest-puller process) and may be in use.
    #[error("{device} already has a LUKS header at {header} from an earlier secure mount")]
    HeaderExists {
        /// The device.
        device: PathBuf,
        /// Its header.
        header: PathBuf,
    },
    /// The key (a KBS resource) could not be fetched.
    #[error("key {uri}: {source}")]
    KeyFetch {
        /// The resource URI.
        uri: String,
        /// Why.
        #[source]
        source: ResourceError,
    },
    /// The key (a sealed secret) could not be unsealed.
    #[error("key (sealed secret): {0}")]
    KeyUnseal(#[source] SealedSecretError),
    /// The key file could not be read.
    #[error("key file://{}: {source}", path.display())]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A program the mount needs is not on PATH.
    #[error("{program} not found on PATH (the guest image needs it for secure mounts)")]
    ToolMissing {
        /// The program.
        program: String,
    },
    /// A program failed (its arguments never hold the key).
    #[error("{program} {args}: {reason}")]
    Command {
        /// The program.
        program: String,
        /// Its arguments, space-separated.
        args: String,
        /// Exit status and stderr, or why it could not run.
        reason: String,
    },
    /// A local operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

impl SecureMountError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        use SecureMountError as E;
        match self {
            E::UnknownVolumeType(_) | E::Unsupported(_) => ErrorKind::Unsupported,
            E::InvalidOption { .. } | E::NotABlockDevice(_) | E::MountPointNotDir(_) => {
                ErrorKind::Invalid
            }
            E::DeviceNotFound { .. } | E::MountPointMissing(_) => ErrorKind::NotFound,
            E::MountPointExists(_)
            | E::AlreadyMounted { .. }
            | E::DeviceInUse { .. }
            | E::HeaderExists { .. } => ErrorKind::AlreadyExists,
            E::KeyFetch { source, .. } => source.kind(),
            E::KeyUnseal(e) => e.kind(),
            E::KeyFile { source, .. } => match source.kind() {
                io::ErrorKind::NotFound => ErrorKind::NotFound,
                io::ErrorKind::PermissionDenied => ErrorKind::Denied,
                _ => ErrorKind::of_io(source),
            },
            E::ToolMissing { .. } => ErrorKind::Precondition,
            E::Command { .. } => ErrorKind::Internal,
            E::Io { source, .. } => ErrorKind::of_io(source),
        }
    }
}

/// A checked SecureMount request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Where the volume appears (absolute, without trailing slash).
    pub mount_point: PathBuf,
    /// The `block-device` options.
    pub options: BlockDeviceOptions,
}

impl Request {
    /// Checks a request as it arrives (`flags` are accepted and unused, as in CDH).
    pub fn parse(
        volume_type: &str,
        options: &HashMap<String, String>,
        mount_point: &str,
    ) -> Result<Self, SecureMountError> {
        if volume_type != options::VOLUME_BLOCK_DEVICE {
            return Err(SecureMountError::UnknownVolumeType(volume_type.to_owned()));
        }
        let options = BlockDeviceOptions::parse(options)?;
        let mount_point = options::clean_absolute("mount_point", mount_point)?;
        Ok(Self {
            mount_point,
            options,
        })
    }

    /// Whether `path` is the mount point or lies below it (is hidden by the mount).
    pub fn covers(&self, path: &Path) -> bool {
        path.starts_with(&self.mount_point)
    }
}

/// A volume this process mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// The encrypted device.
    pub device: PathBuf,
    /// Its `/dev/mapper` name.
    pub mapper: String,
    /// Its detached header (RAM), when this mount formatted it.
    pub header: Option<PathBuf>,
}

/// Host paths a mount reads, replaceable by tests.
#[derive(Debug, Clone)]
pub struct Paths {
    /// Detached LUKS headers.
    pub header_dir: PathBuf,
    /// sysfs (`<sysfs>/dev/block/MAJ:MIN/uevent`).
    pub sysfs: PathBuf,
    /// The device directory DEVNAME is relative to.
    pub dev: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Self {
            header_dir: PathBuf::from(luks2::LUKS_HEADER_DIR),
            sysfs: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
        }
    }
}

/// Serves secure mounts, one at a time.
pub struct SecureMounter {
    sys: Arc<dyn System>,
    fetcher: Arc<dyn ResourceFetcher>,
    unsealer: Arc<Unsealer>,
    paths: Paths,
    mounts: Arc<tokio::sync::Mutex<HashMap<PathBuf, Volume>>>,
}

/// The `/dev` node of block device `major:minor`: `DEVNAME` of its sysfs `uevent`.
pub fn device_node(paths: &Paths, major: u32, minor: u32) -> Result<PathBuf, SecureMountError> {
    let id = format!("{major}:{minor}");
    let uevent = paths.sysfs.join("dev/block").join(&id).join("uevent");
    let not_found = |reason: String| SecureMountError::DeviceNotFound {
        device: format!("deviceId {id}"),
        reason,
    };
    let text = std::fs::read_to_string(&uevent)
        .map_err(|e| not_found(format!("{}: {e}", uevent.display())))?;
    let name = text
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .map(str::trim)
        .ok_or_else(|| not_found(format!("{} has no DEVNAME", uevent.display())))?;
    if name.is_empty()
        || name.starts_with('/')
        || name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(not_found(format!(
            "{} has DEVNAME {name:?}, not a name below {}",
            uevent.display(),
            paths.dev.display()
        )));
    }
    Ok(paths.dev.join(name))
}

/// A UUID v4 string, CDH's choice of mapper name when the request names none.
fn random_mapper_name() -> Result<String, SecureMountError> {
    let mut b = [0u8; 16];
    fill_random(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

fn fill_random(buf: &mut [u8]) -> Result<(), SecureMountError> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = rustix::rand::getrandom(&mut buf[filled..], rustix::rand::GetRandomFlags::empty())
            .map_err(|e| SecureMountError::Io {
                what: "getrandom".into(),
                source: e.into(),
            })?;
        filled += n;
    }
    Ok(())
}

impl SecureMounter {
    /// Mounts on this guest: programs from PATH, CDH's header dir, `/sys` and `/dev`.
    pub fn new(fetcher: Arc<dyn ResourceFetcher>, unsealer: Arc<Unsealer>) -> Self {
        Self::with_system(Arc::new(system::Host), fetcher, unsealer, Paths::default())
    }

    /// Mounts through `sys` with `paths` (tests).
    pub fn with_system(
        sys: Arc<dyn System>,
        fetcher: Arc<dyn ResourceFetcher>,
        unsealer: Arc<Unsealer>,
        paths: Paths,
    ) -> Self {
        Self {
            sys,
            fetcher,
            unsealer,
            paths,
            mounts: Arc::default(),
        }
    }

    /// The volume this process mounted at `mount_point`, if any.
    pub async fn volume(&self, mount_point: &Path) -> Option<Volume> {
        self.mounts.lock().await.get(mount_point).cloned()
    }

    /// The device path a request names.
    pub fn resolve_device(&self, d: &DeviceRef) -> Result<PathBuf, SecureMountError> {
        match d {
            DeviceRef::Id { major, minor } => device_node(&self.paths, *major, *minor),
            DeviceRef::Path(p) => Ok(p.clone()),
        }
    }

    async fn key(&self, k: &KeySource) -> Result<Zeroizing<Vec<u8>>, SecureMountError> {
        let key = match k {
            KeySource::Ephemeral => {
                let mut key = Zeroizing::new(vec![0u8; EPHEMERAL_KEY_SIZE]);
                fill_random(&mut key)?;
                key
            }
            KeySource::Sealed(s) => self
                .unsealer
                .unseal(s.as_bytes())
                .await
                .map_err(SecureMountError::KeyUnseal)?,
            KeySource::Kbs(uri) => {
                self.fetcher
                    .fetch(uri)
                    .await
                    .map_err(|source| SecureMountError::KeyFetch {
                        uri: uri.clone(),
                        source,
                    })?
            }
            KeySource::File(path) => {
                let p = path.clone();
                let read =
                    tokio::task::spawn_blocking(move || system::read_bounded(&p, MAX_KEY_FILE))
                        .await
                        .map_err(|e| SecureMountError::Io {
                            what: "reading the key file".into(),
                            source: io::Error::other(e),
                        })?;
                read.map_err(|source| SecureMountError::KeyFile {
                    path: path.clone(),
                    source,
                })?
            }
        };
        if key.is_empty() {
            return Err(SecureMountError::InvalidOption {
                option: "key".into(),
                reason: format!("{k} is empty"),
            });
        }
        Ok(key)
    }

    /// Checks what can be checked before the device is changed: the device, the mount point,
    /// the programs.
    fn preflight(&self, req: &Request, device: &Path) -> Result<(), SecureMountError> {
        use std::os::unix::fs::FileTypeExt;
        let m = std::fs::metadata(device).map_err(|e| SecureMountError::DeviceNotFound {
            device: device.display().to_string(),
            reason: e.to_string(),
        })?;
        if !(m.file_type().is_block_device() || m.is_file()) {
            return Err(SecureMountError::NotABlockDevice(device.to_owned()));
        }
        let mp = &req.mount_point;
        match &req.options.target {
            Target::FileSystem { .. } => match std::fs::metadata(mp) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(SecureMountError::MountPointNotDir(mp.clone())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(SecureMountError::MountPointMissing(mp.clone()))
                }
                Err(source) => {
                    return Err(SecureMountError::Io {
                        what: format!("mount point {}", mp.display()),
                        source,
                    })
                }
            },
            Target::Device => {
                if std::fs::symlink_metadata(mp).is_ok() {
                    return Err(SecureMountError::MountPointExists(mp.clone()));
                }
                if let Some(parent) = mp.parent() {
                    if !parent.is_dir() {
                        return Err(SecureMountError::MountPointMissing(parent.to_owned()));
                    }
                }
            }
        }
        let mut tools = vec![CRYPTSETUP];
        if let (Target::FileSystem { fs_type, .. }, SourceType::Empty) =
            (&req.options.target, req.options.source)
        {
            tools.push(fs_type.mkfs());
        }
        for t in tools {
            if self.sys.find_program(t).is_none() {
                return Err(SecureMountError::ToolMissing { program: t.into() });
            }
        }
        Ok(())
    }

    /// Mounts `req`; `hold` is kept until the mount has finished or failed, even when the
    /// caller stops waiting (the work runs to its end on a blocking thread).
    pub async fn mount<H: Send + 'static>(
        &self,
        req: Request,
        hold: H,
    ) -> Result<Volume, SecureMountError> {
        let mut mounts = self.mounts.clone().lock_owned().await;
        if let Some(v) = mounts.get(&req.mount_point) {
            return Err(SecureMountError::AlreadyMounted {
                mount_point: req.mount_point.clone(),
                device: v.device.clone(),
            });
        }
        let named = self.resolve_device(&req.options.device)?;
        // One spelling per device (a /dev/disk/by-* link and its node are one device).
        let device =
            std::fs::canonicalize(&named).map_err(|e| SecureMountError::DeviceNotFound {
                device: named.display().to_string(),
                reason: e.to_string(),
            })?;
        if let Some((mp, _)) = mounts.iter().find(|(_, v)| v.device == device) {
            return Err(SecureMountError::DeviceInUse {
                device,
                mount_point: mp.clone(),
            });
        }
        self.preflight(&req, &device)?;
        let header = (req.options.source == SourceType::Empty)
            .then(|| luks2::header_path(&self.paths.header_dir, &device));
        if let Some(h) = &header {
            if std::fs::symlink_metadata(h).is_ok() {
                return Err(SecureMountError::HeaderExists {
                    device,
                    header: h.clone(),
                });
            }
        }
        let key = self.key(&req.options.key).await?;
        let mapper = match &req.options.mapper_name {
            Some(n) => n.clone(),
            None => random_mapper_name()?,
        };
        let plan = Plan {
            device: device.clone(),
            mount_point: req.mount_point.clone(),
            header: header.clone(),
            mapper: mapper.clone(),
            integrity: req.options.integrity,
            source: req.options.source,
            target: req.options.target.clone(),
        };
        info!(device = %device.display(), mount_point = %req.mount_point.display(),
              key = %req.options.key, mapper = %mapper, integrity = plan.integrity,
              source = ?plan.source, "SecureMount: block-device luks2");
        let volume = Volume {
            device,
            mapper,
            header,
        };
        let sys = self.sys.clone();
        let done = tokio::task::spawn_blocking(move || {
            let _hold = hold;
            let r = plan.execute(&*sys, &key);
            drop(key);
            if r.is_ok() {
                mounts.insert(plan.mount_point.clone(), volume.clone());
            }
            r.map(|()| volume)
        })
        .await
        .map_err(|e| SecureMountError::Io {
            what: "the secure mount task".into(),
            source: io::Error::other(e),
        })?;
        match &done {
            Ok(v) => {
                info!(mount_point = %req.mount_point.display(), mapper = %v.mapper, "secure mount done")
            }
            Err(e) => warn!(mount_point = %req.mount_point.display(), "secure mount failed: {e}"),
        }
        done
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;
