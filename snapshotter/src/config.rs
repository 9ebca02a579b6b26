//! The snapshotter's own TOML configuration (`config/snapshotter.toml` documents every key).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default containerd plugin name (`[proxy_plugins.guestpull]`).
pub const DEFAULT_PLUGIN_NAME: &str = "guestpull";
/// Default state directory, where containerd 2.x looks for ImageFsInfo.
pub const DEFAULT_ROOT: &str = "/var/lib/containerd/io.containerd.snapshotter.v1.guestpull";
/// Default gRPC socket.
pub const DEFAULT_ADDRESS: &str = "/run/guestpull/snapshotter.sock";
/// `source` put in the Kata volume when no `cri.image-ref` is found on the chain.
/// Kata overwrites `source` from the container's OCI annotations anyway; this only
/// has to be non-empty (runtime-rs) and recognisable in logs.
pub const DEFAULT_UNKNOWN_IMAGE_SOURCE: &str = "guestpull-unknown-image";

/// What a container snapshot on a label-less plain chain gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PlainChainMode {
    /// nydus `treatAsProxyDriver`: a Kata guest-pull volume (the helper still mounts
    /// the real layers when containerd/runc mount it on the host).
    #[default]
    GuestPull,
    /// Plain overlay mounts, like containerd's overlayfs snapshotter.
    Overlay,
}

/// Top-level configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Config format version; must be 1.
    pub version: u32,
    /// State directory (metadata.db, snapshots/).
    pub root: PathBuf,
    /// Unix socket to serve containerd's Snapshots API on.
    pub address: PathBuf,
    /// Owner uid set on the socket (none = leave as created).
    pub uid: Option<u32>,
    /// Owner gid set on the socket (none = leave as created).
    pub gid: Option<u32>,
    /// tracing filter, e.g. `info` or `snapshotter=debug`.
    pub log_level: String,
    /// Snapshot behaviour.
    pub snapshot: SnapshotConfig,
}

/// `[snapshot]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotConfig {
    /// Require `containerd.io/snapshot/cri.layer-digest` on guest-pull layer Prepare.
    pub strict: bool,
    /// Helper path: mount type becomes `fuse.<path>` (basename must start with
    /// `nydus-overlayfs`); empty = `fuse.nydus-overlayfs` found via PATH.
    pub nydus_overlayfs_path: String,
    /// Remove directories in Remove instead of waiting for Cleanup.
    pub sync_remove: bool,
    /// Add the overlay `volatile` option to writable overlay mounts.
    pub overlayfs_volatile: bool,
    /// Kata volume `source` when the chain carries no `cri.image-ref`.
    pub unknown_image_source: String,
    /// Container snapshots on label-less plain chains: `guest-pull` or `overlay`.
    pub plain_chain_mode: PlainChainMode,
    /// Recreate lost committed chain-ID parents as guest-pull markers.
    pub self_heal: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            version: 1,
            root: DEFAULT_ROOT.into(),
            address: DEFAULT_ADDRESS.into(),
            uid: None,
            gid: None,
            log_level: "info".into(),
            snapshot: SnapshotConfig::default(),
        }
    }
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            strict: false,
            nydus_overlayfs_path: String::new(),
            sync_remove: false,
            overlayfs_volatile: false,
            unknown_image_source: DEFAULT_UNKNOWN_IMAGE_SOURCE.into(),
            plain_chain_mode: PlainChainMode::default(),
            self_heal: true,
        }
    }
}

/// A configuration problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// File could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML for this schema.
    #[error("parsing {path}: {source}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: toml::de::Error,
    },
    /// Semantically invalid.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let cfg: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that TOML types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.version != 1 {
            return Err(ConfigError::Invalid(format!(
                "version = {} is not supported (use 1)",
                self.version
            )));
        }
        if !self.root.is_absolute() {
            return Err(ConfigError::Invalid("root must be an absolute path".into()));
        }
        if !self.address.is_absolute() {
            return Err(ConfigError::Invalid(
                "address must be an absolute path".into(),
            ));
        }
        let helper = &self.snapshot.nydus_overlayfs_path;
        if !helper.is_empty() {
            let base = Path::new(helper)
                .file_name()
                .and_then(|s| s.to_str())
                .unwrap_or("");
            if !base.starts_with("nydus-overlayfs") {
                return Err(ConfigError::Invalid(format!(
                    "snapshot.nydus_overlayfs_path {helper:?}: the file name must start with \
                     \"nydus-overlayfs\" or the Kata Go runtime mounts the rootfs on the host"
                )));
            }
            if helper.contains(',') || helper.contains(char::is_whitespace) {
                return Err(ConfigError::Invalid(
                    "snapshot.nydus_overlayfs_path must not contain commas or spaces".into(),
                ));
            }
        }
        if self.snapshot.unknown_image_source.is_empty() {
            return Err(ConfigError::Invalid(
                "snapshot.unknown_image_source must not be empty (runtime-rs rejects it)".into(),
            ));
        }
        Ok(())
    }

    /// The mount type of guest-pull rootfs mounts.
    pub fn mount_type(&self) -> String {
        if self.snapshot.nydus_overlayfs_path.is_empty() {
            "fuse.nydus-overlayfs".into()
        } else {
            format!("fuse.{}", self.snapshot.nydus_overlayfs_path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_parses_and_equals_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/snapshotter.toml");
        let cfg = Config::load(&path).unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn rejects_bad_values() {
        let bad = [
            "version = 2",
            "root = \"relative\"",
            "bogus = 1",
            "[snapshot]\nnydus_overlayfs_path = \"/opt/kata/bin/overlay-helper\"",
            "[snapshot]\nunknown_image_source = \"\"",
            "[snapshot]\nplain_chain_mode = \"nope\"",
        ];
        for b in bad {
            let r = toml::from_str::<Config>(b)
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map_err(|e| e.to_string()));
            assert!(r.is_err(), "{b:?} should be rejected");
        }
        let c: Config =
            toml::from_str("[snapshot]\nnydus_overlayfs_path = \"/opt/kata/bin/nydus-overlayfs\"")
                .unwrap();
        c.validate().unwrap();
        assert_eq!(c.mount_type(), "fuse./opt/kata/bin/nydus-overlayfs");
        assert_eq!(Config::default().mount_type(), "fuse.nydus-overlayfs");
    }
}
