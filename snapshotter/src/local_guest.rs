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
/// containerd's CRI container-type annotation (`sandbox` or `container`).
const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI-O's container-type annotation.
const CRIO_CONTAINER_TYPE: &str = "io.kubernetes.cri-o.ContainerType";
/// The image of a containerd CRI container.
const CRI_IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
/// The image of a CRI-O container.
const CRIO_IMAGE_NAME: &str = "io.kubernetes.cri-o.ImageName";
/// containerd's annotation naming a pod's sandbox (pause) image.
const CRI_SANDBOX_IMAGE_NAME: &str = "io.kubernetes.cri.podsandbox.image-name";

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

/// The image to pull for the container whose rootfs is `target`, decided as the Kata Go shim
/// decides it (`handleImageGuestPullBlockVolume`): from the container's OCI annotations
/// (containerd runs the helper in the bundle whose `config.json` sits beside `rootfs`), the
/// CRI-O name for CRI-O containers and `io.kubernetes.cri.image-name` otherwise; no annotation is
/// an error, never a fallback to the snapshot's label. A pod sandbox is the one difference:
/// Kata runs the guest image's own pause bundle, which the local guest does not have, so it pulls
/// the sandbox image containerd names (`io.kubernetes.cri.podsandbox.image-name`, else the
/// volume's `source`).
pub fn image_reference(target: &Path, volume: &KataVirtualVolume) -> Result<String, HelperError> {
    let spec = target.parent().map(|b| b.join("config.json"));
    let annotations = spec
        .as_deref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .map(|v| v["annotations"].clone())
        .unwrap_or_default();
    let get = |key: &str| annotations[key].as_str().filter(|s| !s.is_empty());
    let crio = get(CRIO_CONTAINER_TYPE).is_some() && get(CRI_CONTAINER_TYPE).is_none();
    let container_type = get(CRI_CONTAINER_TYPE).or(get(CRIO_CONTAINER_TYPE));
    if container_type == Some("sandbox") {
        if let Some(s) = get(CRI_SANDBOX_IMAGE_NAME) {
            return Ok(s.to_string());
        }
        if !volume.source.is_empty() && volume.source != crate::config::DEFAULT_UNKNOWN_IMAGE_SOURCE
        {
            return Ok(volume.source.clone());
        }
    }
    let key = if crio {
        CRIO_IMAGE_NAME
    } else {
        CRI_IMAGE_NAME
    };
    get(key).map(str::to_string).ok_or_else(|| {
        HelperError::Usage(format!(
            "local guest: no image name for {}: the Kata runtime takes it from the annotation \
             {key}, which the container does not carry (CRI sets it; with ctr run pass \
             --annotation {key}=<image>)",
            target.display()
        ))
    })
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

    fn bundle(annotations: serde_json::Value) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::json!({ "annotations": annotations }).to_string(),
        )
        .unwrap();
        let target = dir.path().join("rootfs");
        (dir, target)
    }

    #[test]
    fn containers_need_the_image_name_annotation_as_on_kata() {
        let vol = KataVirtualVolume::guest_pull("reg/label:1", BTreeMap::new());
        let (_d, t) = bundle(serde_json::json!({CRI_IMAGE_NAME: "reg/b:2",
            CRI_CONTAINER_TYPE: "container"}));
        assert_eq!(image_reference(&t, &vol).unwrap(), "reg/b:2");
        // No container type (ctr run, nerdctl): still the CRI annotation, as the Go shim does.
        let (_d, t) = bundle(serde_json::json!({CRI_IMAGE_NAME: "reg/c:3"}));
        assert_eq!(image_reference(&t, &vol).unwrap(), "reg/c:3");
        let (_d, t) = bundle(serde_json::json!({CRIO_CONTAINER_TYPE: "container",
            CRIO_IMAGE_NAME: "reg/d:4", CRI_IMAGE_NAME: "reg/wrong:0"}));
        assert_eq!(image_reference(&t, &vol).unwrap(), "reg/d:4");
        // The snapshot label is not a source: Kata would fail this container.
        for ann in [
            serde_json::json!({}),
            serde_json::json!({CRI_CONTAINER_TYPE: "container"}),
        ] {
            let (_d, t) = bundle(ann);
            let e = image_reference(&t, &vol).unwrap_err().to_string();
            assert!(e.contains(CRI_IMAGE_NAME), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        assert!(image_reference(&dir.path().join("rootfs"), &vol).is_err());
    }

    #[test]
    fn sandboxes_pull_the_pod_sandbox_image() {
        let vol = KataVirtualVolume::guest_pull("reg/pause:3", BTreeMap::new());
        let (_d, t) = bundle(serde_json::json!({CRI_CONTAINER_TYPE: "sandbox",
            CRI_SANDBOX_IMAGE_NAME: "reg/pause:3.10"}));
        assert_eq!(image_reference(&t, &vol).unwrap(), "reg/pause:3.10");
        let (_d, t) = bundle(serde_json::json!({CRI_CONTAINER_TYPE: "sandbox"}));
        assert_eq!(image_reference(&t, &vol).unwrap(), "reg/pause:3");
        let unknown = KataVirtualVolume::guest_pull(
            crate::config::DEFAULT_UNKNOWN_IMAGE_SOURCE,
            BTreeMap::new(),
        );
        assert!(image_reference(&t, &unknown).is_err());
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
