//! "Local guest" mode of the mount helper: a development and CI stand-in for the Kata VM on runc
//! hosts. Where Kata's shim would hand the `image_guest_pull` volume to kata-agent, which asks the
//! Confidential Data Hub to `PullImage` into the container's bundle, the helper makes the very same
//! ttrpc call to a guest-puller on this host and bind-mounts the resulting rootfs.
//!
//! It proves the whole chain (snapshotter → containerd → helper → guest-puller → KBS) where no TEE
//! exists. It is NOT confidential: the guest-puller runs on the host. Enabled only when a config
//! file is present (`$GUESTPULL_LOCAL_GUEST_CONFIG`, else `/etc/guestpull/local-guest.toml`);
//! without it the helper mounts the (empty) directories the snapshotter handed out.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::mount::{MountFlags, MountPropagationFlags};
use serde::Deserialize;

use crate::overlay::HelperError;
use crate::volume::{KataVirtualVolume, VOLUME_TYPE_IMAGE_GUEST_PULL};

/// Environment variable naming the local-guest config file.
pub const CONFIG_ENV: &str = "GUESTPULL_LOCAL_GUEST_CONFIG";
/// Config file read when the environment variable is unset.
pub const DEFAULT_CONFIG: &str = "/etc/guestpull/local-guest.toml";
/// OCI annotations that name the image, in the order the Kata runtimes consult them.
const IMAGE_ANNOTATIONS: [&str; 2] = [
    "io.kubernetes.cri.image-name",
    "io.kubernetes.cri-o.ImageName",
];

/// Local-guest settings (TOML).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalGuestConfig {
    /// The guest-puller's CDH socket (`guest-puller serve`).
    #[serde(default = "default_socket")]
    pub cdh_socket: PathBuf,
    /// Where per-container bundles are created (the guest's `/run/kata-containers`).
    pub bundle_root: PathBuf,
    /// PullImage deadline in seconds (kata-agent's `image_pull_timeout` default is 1200).
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_socket() -> PathBuf {
    PathBuf::from(cdh_api::DEFAULT_SOCKET)
}

fn default_timeout() -> u64 {
    1200
}

impl LocalGuestConfig {
    /// Reads the config named by [`CONFIG_ENV`], else [`DEFAULT_CONFIG`] if it exists.
    /// `Ok(None)` means local-guest mode is off.
    pub fn discover() -> Result<Option<Self>, HelperError> {
        let path = match std::env::var_os(CONFIG_ENV) {
            Some(p) => PathBuf::from(p),
            None if Path::new(DEFAULT_CONFIG).exists() => PathBuf::from(DEFAULT_CONFIG),
            None => return Ok(None),
        };
        let text = std::fs::read_to_string(&path).map_err(|e| HelperError::Io {
            context: format!("reading local-guest config {}", path.display()),
            source: e,
        })?;
        toml::from_str(&text)
            .map(Some)
            .map_err(|e| HelperError::Usage(format!("local-guest config {}: {e}", path.display())))
    }
}

/// The image to pull for the container whose rootfs is `target`: the container's OCI annotations
/// first (as the Kata runtimes do; containerd runs the helper in the bundle whose `config.json`
/// sits beside `rootfs`), then the volume's `source` unless it is the snapshotter's placeholder.
pub fn image_reference(target: &Path, volume: &KataVirtualVolume) -> Result<String, HelperError> {
    if let Some(spec) = target.parent().map(|b| b.join("config.json")) {
        if let Ok(text) = std::fs::read_to_string(&spec) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                for key in IMAGE_ANNOTATIONS {
                    if let Some(s) = v["annotations"][key].as_str().filter(|s| !s.is_empty()) {
                        return Ok(s.to_string());
                    }
                }
            }
        }
    }
    if !volume.source.is_empty() && volume.source != crate::config::DEFAULT_UNKNOWN_IMAGE_SOURCE {
        return Ok(volume.source.clone());
    }
    Err(HelperError::Usage(format!(
        "local guest: no image reference for {}: set the annotation {} (ctr run --annotation) or pull with CRI labels",
        target.display(),
        IMAGE_ANNOTATIONS[0]
    )))
}

/// Whether `volume` asks for an in-guest pull.
pub fn wants_guest_pull(volume: Option<&KataVirtualVolume>) -> bool {
    volume.is_some_and(|v| v.volume_type == VOLUME_TYPE_IMAGE_GUEST_PULL)
}

/// Pulls `image` through the guest-puller into a fresh bundle and bind-mounts its rootfs on
/// `target` (read-only if `flags` says so). Returns the manifest digest the guest-puller reported.
pub fn pull_and_mount(
    cfg: &LocalGuestConfig,
    image: &str,
    target: &Path,
    flags: MountFlags,
) -> Result<String, HelperError> {
    // A fresh bundle per mount: the guest-puller refuses to reuse a bundle that is in use, and
    // container IDs repeat across runs.
    let id = target
        .parent()
        .and_then(|b| b.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "container".into());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let bundle = cfg.bundle_root.join(format!("{id}-{nanos}"));
    std::fs::create_dir_all(&cfg.bundle_root).map_err(|e| HelperError::Io {
        context: format!("creating {}", cfg.bundle_root.display()),
        source: e,
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| HelperError::Io {
            context: "starting the ttrpc client runtime".into(),
            source: e,
        })?;
    let digest = rt
        .block_on(cdh_api::client::pull_image(
            &cfg.cdh_socket,
            image,
            &bundle,
            Duration::from_secs(cfg.timeout_secs),
        ))
        .map_err(|e| HelperError::GuestPull {
            image: image.to_string(),
            socket: cfg.cdh_socket.clone(),
            detail: ttrpc_detail(&e),
        })?;
    let rootfs = bundle.join("rootfs");
    let io = |context: String| {
        move |e: rustix::io::Errno| HelperError::Io {
            context,
            source: e.into(),
        }
    };
    rustix::mount::mount_bind(&rootfs, target).map_err(io(format!(
        "bind {} on {}",
        rootfs.display(),
        target.display()
    )))?;
    // Keep the container's mounts out of the guest-puller's tree and vice versa.
    rustix::mount::mount_change(target, MountPropagationFlags::PRIVATE)
        .map_err(io(format!("make {} private", target.display())))?;
    if flags.contains(MountFlags::RDONLY) {
        rustix::mount::mount_remount(target, MountFlags::BIND | MountFlags::RDONLY, "")
            .map_err(io(format!("remount {} read-only", target.display())))?;
    }
    Ok(digest)
}

/// The server's message for an RPC error (what the user must read), else the transport error.
fn ttrpc_detail(e: &cdh_api::ttrpc::Error) -> String {
    match e {
        cdh_api::ttrpc::Error::RpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn image_from_annotation_then_volume_source() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("rootfs");
        let vol = KataVirtualVolume::guest_pull("reg/a:1", BTreeMap::new());
        assert_eq!(image_reference(&target, &vol).unwrap(), "reg/a:1");
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"annotations":{"io.kubernetes.cri.image-name":"reg/b:2"}}"#,
        )
        .unwrap();
        assert_eq!(image_reference(&target, &vol).unwrap(), "reg/b:2");
    }

    #[test]
    fn placeholder_source_is_not_an_image() {
        let dir = tempfile::tempdir().unwrap();
        let vol = KataVirtualVolume::guest_pull(
            crate::config::DEFAULT_UNKNOWN_IMAGE_SOURCE,
            BTreeMap::new(),
        );
        let err = image_reference(&dir.path().join("rootfs"), &vol).unwrap_err();
        assert!(
            err.to_string().contains("io.kubernetes.cri.image-name"),
            "{err}"
        );
    }

    #[test]
    fn config_defaults_and_unknown_keys() {
        let c: LocalGuestConfig = toml::from_str("bundle_root = \"/b\"").unwrap();
        assert_eq!(c.cdh_socket, PathBuf::from(cdh_api::DEFAULT_SOCKET));
        assert_eq!(c.timeout_secs, 1200);
        assert!(toml::from_str::<LocalGuestConfig>("bundle_root = \"/b\"\nbogus = 1").is_err());
    }

    #[test]
    fn only_guest_pull_volumes_qualify() {
        let vol = KataVirtualVolume::guest_pull("x", BTreeMap::new());
        assert!(wants_guest_pull(Some(&vol)));
        assert!(!wants_guest_pull(None));
    }
}
