//! The options of CDH's `block-device` volume type, by CDH's names (guest-components
//! `confidential-data-hub/docs/SECURE_STORAGE.md`): read from the request's string map into
//! typed settings, every refusal naming the option.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use kbs_client::ResourceUri;
use tracing::warn;

use super::SecureMountError;

/// The only volume type served (CDH also has `alibaba-cloud-oss`, which needs Aliyun's client).
pub const VOLUME_BLOCK_DEVICE: &str = "block-device";

/// Every option name the `block-device` type reads, with its luks2 and filesystem settings.
pub const OPTION_NAMES: &[&str] = &[
    "deviceId",
    "devicePath",
    "sourceType",
    "key",
    "encryptionType",
    "dataIntegrity",
    "mapperName",
    "targetType",
    "filesystemType",
    "mkfsOpts",
];

/// Longest mapper name device-mapper takes (DM_NAME_LEN is 128 with its NUL).
const MAX_MAPPER_NAME: usize = 127;

/// Which device to encrypt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceRef {
    /// `deviceId` `MAJ:MIN`, resolved through sysfs.
    Id {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// `devicePath`, taken as it is.
    Path(PathBuf),
}

impl std::fmt::Display for DeviceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceRef::Id { major, minor } => write!(f, "device {major}:{minor}"),
            DeviceRef::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// What the device holds now (`sourceType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceType {
    /// Anything: it is formatted (all data on it is lost), with a detached header.
    Empty,
    /// A LUKS2 volume with its header on the device: opened and mounted.
    Encrypted,
}

/// Where the key comes from (`key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A CDH sealed secret (`sealed.…`), unsealed as `UnsealSecret` does.
    Sealed(String),
    /// A KBS resource (`kbs:///…`).
    Kbs(String),
    /// A file in the guest (`file://<absolute path>`).
    File(PathBuf),
    /// No `key`: 4096 random bytes that exist only for this mount.
    Ephemeral,
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A sealed secret is metadata, but it is not echoed: only what kind of key it is.
        match self {
            KeySource::Sealed(_) => f.write_str("a sealed secret"),
            KeySource::Kbs(uri) => write!(f, "{uri}"),
            KeySource::File(p) => write!(f, "file://{}", p.display()),
            KeySource::Ephemeral => f.write_str("an ephemeral random key"),
        }
    }
}

/// The filesystem made on an empty device (`filesystemType`; CDH knows ext4 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    /// ext4, made by `mkfs.ext4`.
    Ext4,
}

impl FsType {
    /// The type name mount(2) takes.
    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
        }
    }

    /// The program that makes it.
    pub fn mkfs(self) -> &'static str {
        match self {
            FsType::Ext4 => "mkfs.ext4",
        }
    }
}

/// What appears at the mount point (`targetType`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A symlink to the opened `/dev/mapper/<name>`.
    Device,
    /// The opened device's filesystem, mounted there.
    FileSystem {
        /// `filesystemType` (default ext4).
        fs_type: FsType,
        /// `mkfsOpts`, split on whitespace.
        mkfs_opts: Vec<String>,
    },
}

/// A `block-device` request with `encryptionType` luks2, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDeviceOptions {
    /// The device (`deviceId` wins over `devicePath` when both are set, as in CDH).
    pub device: DeviceRef,
    /// `sourceType`.
    pub source: SourceType,
    /// `key`.
    pub key: KeySource,
    /// `dataIntegrity`: dm-integrity (HMAC-SHA256) under dm-crypt.
    pub integrity: bool,
    /// `mapperName`, else a random one.
    pub mapper_name: Option<String>,
    /// `targetType` with its filesystem settings.
    pub target: Target,
}

fn invalid(option: &str, reason: impl Into<String>) -> SecureMountError {
    SecureMountError::InvalidOption {
        option: option.to_owned(),
        reason: reason.into(),
    }
}

fn required<'a>(o: &'a HashMap<String, String>, name: &str) -> Result<&'a str, SecureMountError> {
    o.get(name)
        .map(String::as_str)
        .ok_or_else(|| invalid(name, "is required"))
}

/// `MAJ:MIN`, decimal digits only.
pub fn parse_device_id(s: &str) -> Result<(u32, u32), SecureMountError> {
    let bad = || invalid("deviceId", format!("{s:?} is not MAJ:MIN"));
    let (maj, min) = s.split_once(':').ok_or_else(bad)?;
    let num = |p: &str| -> Result<u32, SecureMountError> {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        p.parse().map_err(|_| bad())
    };
    Ok((num(maj)?, num(min)?))
}

/// An absolute path without `.`/`..` components or NUL bytes, with repeated and trailing
/// slashes dropped (kata-agent sends `/run/kata-containers/image/`).
pub fn clean_absolute(what: &str, s: &str) -> Result<PathBuf, SecureMountError> {
    let p = Path::new(s);
    if s.contains('\0') || !p.is_absolute() {
        return Err(invalid(what, format!("{s:?} is not an absolute path")));
    }
    if s.split('/').any(|c| c == "." || c == "..") {
        return Err(invalid(what, format!("{s:?} has `.` or `..` components")));
    }
    let clean: PathBuf = p
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    if clean == Path::new("/") {
        return Err(invalid(what, "must not be /"));
    }
    Ok(clean)
}

fn mapper_name(s: &str) -> Result<String, SecureMountError> {
    // The name is an argument of cryptsetup: one starting with `-` would be read as an option.
    let ok_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+');
    if s.is_empty()
        || s.len() > MAX_MAPPER_NAME
        || s.starts_with(['-', '.'])
        || !s.bytes().all(ok_char)
    {
        return Err(invalid(
            "mapperName",
            format!(
                "{s:?}: 1 to {MAX_MAPPER_NAME} of A-Z a-z 0-9 - _ . +, not starting with - or ."
            ),
        ));
    }
    Ok(s.to_owned())
}

fn key_source(s: &str) -> Result<KeySource, SecureMountError> {
    // CDH's order: sealed secret, then KBS resource URI, then local file.
    if s.starts_with("sealed.") {
        return Ok(KeySource::Sealed(s.to_owned()));
    }
    match ResourceUri::parse(s) {
        Ok(_) => return Ok(KeySource::Kbs(s.to_owned())),
        // A KBS URI with a mistake is reported as one, not as an unknown scheme.
        Err(e) if s.starts_with("kbs://") || s.starts_with("kbs+") => {
            return Err(invalid("key", e.to_string()))
        }
        Err(_) => {}
    }
    if let Some(path) = s.strip_prefix("file://") {
        return Ok(KeySource::File(clean_absolute("key", path)?));
    }
    Err(invalid(
        "key",
        "must be a sealed secret (sealed.…), a KBS resource URI (kbs:///…) or file://<path>",
    ))
}

impl BlockDeviceOptions {
    /// Reads CDH's option map. Unknown names are ignored (CDH ignores them too) with a warning;
    /// `dataIntegrity` must be `true` or `false`, where CDH takes anything but `true` as false:
    /// a misspelt value would silently drop integrity protection.
    pub fn parse(o: &HashMap<String, String>) -> Result<Self, SecureMountError> {
        let mut unknown: Vec<&str> = o
            .keys()
            .map(String::as_str)
            .filter(|k| !OPTION_NAMES.contains(k))
            .collect();
        if !unknown.is_empty() {
            unknown.sort_unstable();
            warn!(options = ?unknown, "SecureMount: ignoring options block-device does not know");
        }
        match required(o, "encryptionType")? {
            "luks2" => {}
            "zfs" => {
                return Err(SecureMountError::Unsupported(
                    "encryptionType zfs needs the zfs tools and kernel module; this guest \
                     offers luks2 only"
                        .into(),
                ))
            }
            other => {
                return Err(invalid(
                    "encryptionType",
                    format!("{other:?} is not one of luks2, zfs"),
                ))
            }
        }
        let device = match (o.get("deviceId"), o.get("devicePath")) {
            (Some(id), _) => {
                let (major, minor) = parse_device_id(id)?;
                DeviceRef::Id { major, minor }
            }
            (None, Some(p)) => DeviceRef::Path(clean_absolute("devicePath", p)?),
            (None, None) => {
                return Err(invalid("deviceId", "deviceId or devicePath is required"));
            }
        };
        let source = match required(o, "sourceType")? {
            "empty" => SourceType::Empty,
            "encrypted" => SourceType::Encrypted,
            other => {
                return Err(invalid(
                    "sourceType",
                    format!("{other:?} is not empty or encrypted"),
                ))
            }
        };
        let key = match o.get("key") {
            Some(k) => key_source(k)?,
            None => KeySource::Ephemeral,
        };
        if source == SourceType::Encrypted && key == KeySource::Ephemeral {
            return Err(invalid(
                "key",
                "is required with sourceType encrypted: a random key cannot open an existing volume",
            ));
        }
        let integrity = match o.get("dataIntegrity").map(String::as_str) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(invalid(
                    "dataIntegrity",
                    format!("{other:?} is not true or false"),
                ))
            }
        };
        let mapper_name = o.get("mapperName").map(|s| mapper_name(s)).transpose()?;
        let target = match required(o, "targetType")? {
            "device" => Target::Device,
            "fileSystem" => {
                let fs_type = match o.get("filesystemType").map(String::as_str) {
                    None | Some("ext4") => FsType::Ext4,
                    Some(other) => {
                        return Err(SecureMountError::Unsupported(format!(
                            "filesystemType {other:?} (CDH and this guest make ext4 only)"
                        )))
                    }
                };
                let mkfs_opts = o
                    .get("mkfsOpts")
                    .map(|s| s.split_ascii_whitespace().map(str::to_owned).collect())
                    .unwrap_or_default();
                Target::FileSystem { fs_type, mkfs_opts }
            }
            other => {
                return Err(invalid(
                    "targetType",
                    format!("{other:?} is not device or fileSystem"),
                ))
            }
        };
        Ok(Self {
            device,
            source,
            key,
            integrity,
            mapper_name,
            target,
        })
    }
}
