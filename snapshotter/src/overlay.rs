//! The `nydus-overlayfs` mount helper: turns the guest-pull rootfs mount into a
//! real overlay mount when containerd itself mounts it on the host (runc, VOLUME
//! copy-up, user lookup). containerd runs `mount.fuse overlay <target> -o … -t
//! <subtype>`, and `mount.fuse` runs `<subtype> overlay <target> -o <options>`.

use std::ffi::CString;
use std::path::{Component, Path, PathBuf};

use rustix::mount::MountFlags;

use crate::volume::{KataVirtualVolume, KATA_VOLUME_OPTION_PREFIX};

/// Options that only mean something to Kata or to the nydus tooling.
const DROPPED_PREFIXES: [&str; 2] = [KATA_VOLUME_OPTION_PREFIX, "extraoption="];
/// fstab options that are not mount(2) flags or overlay data; ignored like mount(8) does.
const IGNORED: [&str; 7] = [
    "defaults", "auto", "noauto", "user", "nouser", "users", "nofail",
];

/// A helper failure.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    /// Wrong command line.
    #[error("usage: nydus-overlayfs overlay <target> -o <options>: {0}")]
    Usage(String),
    /// An option the helper cannot honour.
    #[error("unsupported mount option {0:?}")]
    Unsupported(String),
    /// A Kata volume option that does not decode.
    #[error("bad {KATA_VOLUME_OPTION_PREFIX} option: {0}")]
    Volume(#[from] crate::volume::VolumeError),
    /// Local-guest mode: the guest-puller refused or failed the pull.
    #[error("local guest: pulling {image} through {socket:?} failed: {detail}")]
    GuestPull {
        /// The image asked for.
        image: String,
        /// The CDH socket called.
        socket: PathBuf,
        /// The guest-puller's message.
        detail: String,
    },
    /// mount(2) or chdir failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperArgs {
    /// Filesystem type given as the mount source; must be `overlay`.
    pub fs_type: String,
    /// Mount point.
    pub target: PathBuf,
    /// Comma-joined options of every `-o`.
    pub options: String,
}

/// Parses `overlay <target> -o <opts>` (several `-o` are merged, as mount(8) does).
pub fn parse_args<S: AsRef<str>>(args: &[S]) -> Result<HelperArgs, HelperError> {
    let mut positional = Vec::new();
    let mut options: Vec<String> = Vec::new();
    let mut it = args.iter().map(AsRef::as_ref);
    while let Some(a) = it.next() {
        if a == "-o" {
            let v = it
                .next()
                .ok_or_else(|| HelperError::Usage("-o needs a value".into()))?;
            options.push(v.to_string());
        } else if let Some(v) = a.strip_prefix("-o") {
            options.push(v.to_string());
        } else if a.starts_with('-') {
            return Err(HelperError::Usage(format!("unknown flag {a:?}")));
        } else {
            positional.push(a.to_string());
        }
    }
    if positional.len() != 2 {
        return Err(HelperError::Usage(format!(
            "expected 2 positional arguments, got {}",
            positional.len()
        )));
    }
    if positional[0] != "overlay" {
        return Err(HelperError::Usage(format!(
            "filesystem type must be \"overlay\", got {:?}",
            positional[0]
        )));
    }
    Ok(HelperArgs {
        fs_type: positional.remove(0),
        target: PathBuf::from(positional.remove(0)),
        options: options.join(","),
    })
}

/// Options split into mount(2) flags, overlay data and the Kata volume.
#[derive(Debug, Clone)]
pub struct ParsedOptions {
    /// mount(2) flags.
    pub flags: MountFlags,
    /// overlay data options (`lowerdir=…`, `volatile`, …), in order.
    pub data: Vec<String>,
    /// The decoded Kata volume, if the mount carried one.
    pub volume: Option<KataVirtualVolume>,
}

/// Splits options; drops `io.katacontainers.volume=` and `extraoption=`.
pub fn parse_options(options: &str) -> Result<ParsedOptions, HelperError> {
    let mut flags = MountFlags::empty();
    let mut data = Vec::new();
    let mut volume = None;
    for opt in options.split(',').filter(|o| !o.is_empty()) {
        if opt.starts_with(KATA_VOLUME_OPTION_PREFIX) {
            volume = Some(KataVirtualVolume::from_mount_option(opt)?);
            continue;
        }
        if DROPPED_PREFIXES.iter().any(|p| opt.starts_with(p)) || IGNORED.contains(&opt) {
            continue;
        }
        let (set, clear) = match opt {
            "ro" => (MountFlags::RDONLY, MountFlags::empty()),
            "rw" => (MountFlags::empty(), MountFlags::RDONLY),
            "nosuid" => (MountFlags::NOSUID, MountFlags::empty()),
            "suid" => (MountFlags::empty(), MountFlags::NOSUID),
            "nodev" => (MountFlags::NODEV, MountFlags::empty()),
            "dev" => (MountFlags::empty(), MountFlags::NODEV),
            "noexec" => (MountFlags::NOEXEC, MountFlags::empty()),
            "exec" => (MountFlags::empty(), MountFlags::NOEXEC),
            "sync" => (MountFlags::SYNCHRONOUS, MountFlags::empty()),
            "async" => (MountFlags::empty(), MountFlags::SYNCHRONOUS),
            "dirsync" => (MountFlags::DIRSYNC, MountFlags::empty()),
            "noatime" => (MountFlags::NOATIME, MountFlags::empty()),
            "atime" => (MountFlags::empty(), MountFlags::NOATIME),
            "nodiratime" => (MountFlags::NODIRATIME, MountFlags::empty()),
            "diratime" => (MountFlags::empty(), MountFlags::NODIRATIME),
            "relatime" => (MountFlags::RELATIME, MountFlags::empty()),
            "norelatime" => (MountFlags::empty(), MountFlags::RELATIME),
            "strictatime" => (MountFlags::STRICTATIME, MountFlags::empty()),
            "nostrictatime" => (MountFlags::empty(), MountFlags::STRICTATIME),
            "lazytime" => (MountFlags::LAZYTIME, MountFlags::empty()),
            "nolazytime" => (MountFlags::empty(), MountFlags::LAZYTIME),
            "mand" => (
                MountFlags::PERMIT_MANDATORY_FILE_LOCKING,
                MountFlags::empty(),
            ),
            "nomand" => (
                MountFlags::empty(),
                MountFlags::PERMIT_MANDATORY_FILE_LOCKING,
            ),
            "bind" | "rbind" | "remount" | "move" => {
                return Err(HelperError::Unsupported(opt.to_string()))
            }
            _ => {
                data.push(opt.to_string());
                continue;
            }
        };
        flags |= set;
        flags &= !clear;
    }
    Ok(ParsedOptions {
        flags,
        data,
        volume,
    })
}

/// What to do with a mount that carried a Kata volume.
#[derive(Debug, Clone)]
pub enum VolumeAction {
    /// Mount the host overlay from the real work/upper/lower directories (for guest-pull
    /// chains those are empty on the host: the image only exists inside the guest).
    MountOverlay,
    /// Local-guest mode: have the guest-puller pull the image and mount its rootfs.
    LocalGuest(crate::local_guest::LocalGuestConfig),
}

/// Decides what the helper does with the decoded volume mounted on `target`: a guest-pull
/// volume goes to the local guest when one is configured, everything else is a plain overlay.
/// containerd's own temporary mounts (`<root>/tmpmounts/…`, where CRI reads `/etc/passwd` and
/// copies up volumes) stay plain overlays: on a Kata node they happen on the host and never reach
/// the guest, so the local guest must not pull (and lazily fetch) an image for them either.
pub fn volume_action(
    volume: Option<&KataVirtualVolume>,
    target: &Path,
) -> Result<VolumeAction, HelperError> {
    let temp_mount = target
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "tmpmounts");
    if crate::local_guest::wants_guest_pull(volume) && !temp_mount {
        if let Some(cfg) = crate::local_guest::LocalGuestConfig::discover()? {
            return Ok(VolumeAction::LocalGuest(cfg));
        }
    }
    Ok(VolumeAction::MountOverlay)
}

const PATH_KEYS: [&str; 3] = ["lowerdir=", "upperdir=", "workdir="];

fn common_dir(paths: &[&Path]) -> PathBuf {
    let mut common: Vec<Component> = match paths.first() {
        Some(p) => p.parent().unwrap_or(p).components().collect(),
        None => return PathBuf::new(),
    };
    for p in &paths[1..] {
        let comps: Vec<Component> = p.parent().unwrap_or(p).components().collect();
        let n = common
            .iter()
            .zip(comps.iter())
            .take_while(|(a, b)| a == b)
            .count();
        common.truncate(n);
    }
    common.iter().collect()
}

/// For option strings too long for one page: returns the directory to chdir to and
/// the data with every `lowerdir`/`upperdir`/`workdir` path made relative to it.
/// `None` when the paths share no directory deeper than `/`.
pub fn shorten_paths(data: &[String]) -> Option<(PathBuf, Vec<String>)> {
    let mut all: Vec<&Path> = Vec::new();
    for opt in data {
        for key in PATH_KEYS {
            if let Some(v) = opt.strip_prefix(key) {
                all.extend(v.split(':').map(Path::new));
            }
        }
    }
    if all.is_empty() || all.iter().any(|p| !p.is_absolute()) {
        return None;
    }
    let dir = common_dir(&all);
    if dir.as_os_str().len() <= 1 {
        return None;
    }
    let rel = |p: &str| -> String {
        Path::new(p)
            .strip_prefix(&dir)
            .map(|r| r.to_string_lossy().into_owned())
            .unwrap_or_else(|_| p.to_string())
    };
    let out = data
        .iter()
        .map(|opt| {
            for key in PATH_KEYS {
                if let Some(v) = opt.strip_prefix(key) {
                    let parts: Vec<String> = v.split(':').map(rel).collect();
                    return format!("{key}{}", parts.join(":"));
                }
            }
            opt.clone()
        })
        .collect();
    Some((dir, out))
}

/// Performs the overlay mount, using the chdir trick when the data reaches
/// `page_size - 512` bytes (the kernel copies at most one page of mount data).
pub fn mount_overlay(target: &Path, flags: MountFlags, data: &[String]) -> Result<(), HelperError> {
    let mut joined = data.join(",");
    let limit = rustix::param::page_size().saturating_sub(512);
    if joined.len() >= limit {
        if let Some((dir, rel)) = shorten_paths(data) {
            rustix::process::chdir(&dir).map_err(|e| HelperError::Io {
                context: format!("chdir {}", dir.display()),
                source: e.into(),
            })?;
            joined = rel.join(",");
        }
        if joined.len() >= limit {
            return Err(HelperError::Usage(format!(
                "overlay options are {} bytes even with relative paths (limit {limit})",
                joined.len()
            )));
        }
    }
    let cdata = CString::new(joined).map_err(|_| HelperError::Unsupported("NUL byte".into()))?;
    rustix::mount::mount("overlay", target, "overlay", flags, Some(cdata.as_c_str())).map_err(|e| {
        HelperError::Io {
            context: format!("mount overlay on {}", target.display()),
            source: e.into(),
        }
    })
}

/// The whole helper: parse, decide, mount.
pub fn run<S: AsRef<str>>(args: &[S]) -> Result<(), HelperError> {
    let a = parse_args(args)?;
    let opts = parse_options(&a.options)?;
    match volume_action(opts.volume.as_ref(), &a.target)? {
        VolumeAction::MountOverlay => mount_overlay(&a.target, opts.flags, &opts.data),
        VolumeAction::LocalGuest(cfg) => {
            let volume = opts
                .volume
                .as_ref()
                .expect("guest-pull action implies a volume");
            let image = crate::local_guest::image_reference(&a.target, volume)?;
            crate::local_guest::pull_and_mount(&cfg, &image, &a.target, opts.flags).map(|_| ())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_temp_mounts_never_go_to_the_local_guest() {
        let v = KataVirtualVolume::guest_pull("reg/x:1", Default::default());
        let tmp = Path::new("/var/lib/containerd/tmpmounts/containerd-mount123");
        assert!(matches!(
            volume_action(Some(&v), tmp).unwrap(),
            VolumeAction::MountOverlay
        ));
    }
    use std::collections::BTreeMap;

    #[test]
    fn args_like_mount_fuse() {
        let a = parse_args(&["overlay", "/mnt/x", "-o", "ro,lowerdir=/a"]).unwrap();
        assert_eq!(a.target, PathBuf::from("/mnt/x"));
        assert_eq!(a.options, "ro,lowerdir=/a");
        let a = parse_args(&["overlay", "/t", "-o", "a", "-ob"]).unwrap();
        assert_eq!(a.options, "a,b");
        assert!(parse_args(&["ext4", "/t", "-o", "x"]).is_err());
        assert!(parse_args(&["overlay"]).is_err());
        assert!(parse_args(&["overlay", "/t", "-o"]).is_err());
        assert!(parse_args(&["overlay", "/t", "-x", "y"]).is_err());
    }

    #[test]
    fn drops_kata_and_extra_options_and_maps_flags() {
        let vol = KataVirtualVolume::guest_pull("img", BTreeMap::new()).to_mount_option();
        let opts = format!(
            "rw,nosuid,nodev,noexec,relatime,workdir=/w,upperdir=/u,lowerdir=/l1:/l2,{vol},extraoption=abc,defaults,ro"
        );
        let p = parse_options(&opts).unwrap();
        assert_eq!(
            p.data,
            vec!["workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2"]
        );
        assert!(p
            .flags
            .contains(MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC));
        assert!(p.flags.contains(MountFlags::RELATIME | MountFlags::RDONLY));
        assert_eq!(p.volume.unwrap().source, "img");
        let p = parse_options("ro,rw,volatile").unwrap();
        assert!(!p.flags.contains(MountFlags::RDONLY));
        assert_eq!(p.data, vec!["volatile"]);
        assert!(parse_options("bind").is_err());
        assert!(parse_options("io.katacontainers.volume=%%%").is_err());
    }

    #[test]
    fn shortens_long_paths_to_common_dir() {
        let base = "/var/lib/containerd/io.containerd.snapshotter.v1.guestpull/snapshots";
        let lowers: Vec<String> = (1..=60).map(|i| format!("{base}/{i}/fs")).collect();
        let data = vec![
            "volatile".to_string(),
            format!("workdir={base}/99/work"),
            format!("upperdir={base}/99/fs"),
            format!("lowerdir={}", lowers.join(":")),
        ];
        assert!(data.join(",").len() > 4096 - 512);
        let (dir, rel) = shorten_paths(&data).unwrap();
        assert_eq!(dir, PathBuf::from(base));
        assert_eq!(rel[0], "volatile");
        assert_eq!(rel[1], "workdir=99/work");
        assert!(rel[3].starts_with("lowerdir=1/fs:2/fs:"));
        assert!(rel.join(",").len() < 4096 - 512);
        assert!(shorten_paths(&["lowerdir=/a/x:/b/y".to_string()]).is_none());
    }
}
