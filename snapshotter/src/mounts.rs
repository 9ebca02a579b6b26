//! Mount descriptions returned to containerd.
//!
//! Plain snapshots get what containerd's overlayfs snapshotter returns (bind for a
//! parentless snapshot, overlay otherwise). Guest-pull snapshots get the single
//! `fuse.nydus-overlayfs` mount the Kata runtimes recognise.

use std::path::{Path, PathBuf};

pub use crate::api::types::Mount;

use crate::volume::KataVirtualVolume;

fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// `lowerdir=` value: nearest parent first, as overlayfs expects.
pub fn lowerdir_option(lowers: &[PathBuf]) -> String {
    let joined: Vec<String> = lowers.iter().map(|l| p(l)).collect();
    format!("lowerdir={}", joined.join(":"))
}

/// A bind mount of `dir` (containerd overlayfs: parentless active or single-parent view).
pub fn bind(dir: &Path, readonly: bool) -> Mount {
    Mount {
        r#type: "bind".into(),
        source: p(dir),
        options: vec![
            if readonly { "ro" } else { "rw" }.to_string(),
            "rbind".to_string(),
        ],
        ..Default::default()
    }
}

/// Writable directories of an active snapshot.
#[derive(Debug, Clone)]
pub struct Upper {
    /// overlay upperdir.
    pub upper: PathBuf,
    /// overlay workdir.
    pub work: PathBuf,
}

/// A kernel overlay mount; read-only (no upper) for views.
pub fn overlay(lowers: &[PathBuf], upper: Option<&Upper>, volatile: bool) -> Mount {
    let mut options = Vec::new();
    match upper {
        Some(u) => {
            if volatile {
                options.push("volatile".to_string());
            }
            options.push(format!("workdir={}", p(&u.work)));
            options.push(format!("upperdir={}", p(&u.upper)));
        }
        None => options.push("ro".to_string()),
    }
    options.push(lowerdir_option(lowers));
    Mount {
        r#type: "overlay".into(),
        source: "overlay".into(),
        options,
        ..Default::default()
    }
}

/// The guest-pull rootfs mount: `fuse.nydus-overlayfs` (or `fuse.<helper path>`),
/// source `overlay`, real work/upper/lower dirs, then the Kata volume option last.
pub fn guest_pull(
    mount_type: &str,
    lowers: &[PathBuf],
    upper: &Upper,
    readonly: bool,
    volatile: bool,
    volume: &KataVirtualVolume,
) -> Mount {
    let mut options = Vec::new();
    if readonly {
        options.push("ro".to_string());
    }
    if volatile {
        options.push("volatile".to_string());
    }
    options.push(format!("workdir={}", p(&upper.work)));
    options.push(format!("upperdir={}", p(&upper.upper)));
    options.push(lowerdir_option(lowers));
    options.push(volume.to_mount_option());
    Mount {
        r#type: mount_type.into(),
        source: "overlay".into(),
        options,
        ..Default::default()
    }
}
