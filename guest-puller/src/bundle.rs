//! OCI bundle creation: overlay mount of the store's layers at `<bundle>/rootfs` with a
//! per-bundle upper/work dir, and `config.json` generated from the image config.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{Process, Root, Spec, User};
use rustix::mount::{mount, unmount, MountFlags, UnmountFlags};
use serde::Deserialize;

use crate::layer::LayerError;
use crate::rootfs::{Rootfs, RootfsError};

/// Why a bundle could not be created or removed.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The image config is unusable.
    #[error("image config: {0}")]
    Config(String),
    /// Mounting failed.
    #[error("mounting overlay at {target}: {source}")]
    Mount { target: PathBuf, source: io::Error },
    /// The bundle already has a rootfs.
    #[error("bundle {0} already has a mounted rootfs")]
    Busy(PathBuf),
    /// The requested bundle path is not acceptable (outside the bundle roots, `..`, a symlink,
    /// the work dir, not UTF-8, NUL).
    #[error("bundle path {path:?} {reason}")]
    Path { path: PathBuf, reason: String },
    /// The bundle holds a `config.json` or rootfs the puller did not make.
    #[error("{0} exists and was not made by the guest-puller; refusing to replace it")]
    Foreign(PathBuf),
    /// Filesystem error.
    #[error("bundle {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// A file the bundle needs from the image rootfs is unusable (symlink, FIFO, device, huge).
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The parts of an image config the puller uses (tolerant of Docker and OCI variants).
#[derive(Debug, Default, Deserialize)]
pub struct ImageConfig {
    /// Target OS.
    #[serde(default)]
    pub os: String,
    /// Target architecture.
    #[serde(default)]
    pub architecture: String,
    /// Runtime defaults.
    #[serde(default)]
    pub config: Option<RunConfig>,
    /// Layer diff_ids.
    pub rootfs: RootFs,
}

/// `config` section of an image config.
#[derive(Debug, Default, Deserialize)]
pub struct RunConfig {
    /// `user[:group]`.
    #[serde(rename = "User", default)]
    pub user: Option<String>,
    /// Environment.
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    /// Entrypoint.
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    /// Command.
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    /// Working directory.
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    /// Labels, copied to annotations.
    #[serde(rename = "Labels", default)]
    pub labels: Option<BTreeMap<String, String>>,
}

/// `rootfs` section of an image config.
#[derive(Debug, Default, Deserialize)]
pub struct RootFs {
    /// Must be `layers`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Uncompressed layer digests, bottom first.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

impl ImageConfig {
    /// Parses and sanity-checks an image config.
    pub fn parse(raw: &[u8]) -> Result<Self, BundleError> {
        let c: ImageConfig =
            serde_json::from_slice(raw).map_err(|e| BundleError::Config(e.to_string()))?;
        if c.rootfs.kind != "layers" {
            return Err(BundleError::Config(format!(
                "rootfs.type is {:?}, expected \"layers\"",
                c.rootfs.kind
            )));
        }
        if !c.os.is_empty() && c.os != "linux" {
            return Err(BundleError::Config(format!(
                "image OS {:?} is not linux",
                c.os
            )));
        }
        Ok(c)
    }
}

/// Largest `/etc/passwd` or `/etc/group` the puller reads from an image.
pub const MAX_ACCOUNT_FILE: u64 = 4 << 20;

/// An account database of the image: `None` when the image has none (the documented
/// fallback: numeric ids are used as given, gid 0), an error when it is there but unusable.
fn account_file(rootfs: &Rootfs, path: &str) -> Result<Option<String>, BundleError> {
    match rootfs.read_file(path, MAX_ACCOUNT_FILE) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(RootfsError::NotFound { .. }) => Ok(None),
        Err(e) => Err(BundleError::Rootfs(e)),
    }
}

/// The first line of an account file whose field `key` equals `value`, split into fields.
fn find_entry<'a>(
    text: &'a str,
    key: usize,
    value: &str,
    min_fields: usize,
) -> Option<Vec<&'a str>> {
    text.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= min_fields && f[key] == value)
}

/// Resolves `user[:group]` to numeric ids, reading names from the rootfs' /etc/passwd and /etc/group.
fn resolve_user(spec: &str, rootfs: &Path) -> Result<(u32, u32, Option<String>), BundleError> {
    let (u, g) = spec
        .split_once(':')
        .map_or((spec, None), |(u, g)| (u, Some(g)));
    let root = if u.is_empty() && g.is_none() {
        None
    } else {
        Some(Rootfs::open(rootfs).map_err(BundleError::Rootfs)?)
    };
    let passwd = || match &root {
        Some(r) => account_file(r, "/etc/passwd"),
        None => Ok(None),
    };
    let (uid, mut gid, name) = if u.is_empty() {
        (0, 0, None)
    } else if let Ok(n) = u.parse::<u32>() {
        let gid = passwd()?
            .and_then(|t| find_entry(&t, 2, u, 4).and_then(|f| f[3].parse().ok()))
            .unwrap_or(0);
        (n, gid, None)
    } else {
        let ids = passwd()?.and_then(|t| {
            find_entry(&t, 0, u, 4).and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        });
        let (uid, gid) =
            ids.ok_or_else(|| BundleError::Config(format!("user {u:?} not found in /etc/passwd")))?;
        (uid, gid, Some(u.to_string()))
    };
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                let group = match &root {
                    Some(r) => account_file(r, "/etc/group")?,
                    None => None,
                };
                group
                    .and_then(|t| find_entry(&t, 0, g, 3).and_then(|f| f[2].parse().ok()))
                    .ok_or_else(|| {
                        BundleError::Config(format!("group {g:?} not found in /etc/group"))
                    })?
            }
        };
    }
    Ok((uid, gid, name))
}

/// Builds the runtime spec for the image.
pub fn runtime_spec(cfg: &ImageConfig, rootfs: &Path) -> Result<Spec, BundleError> {
    let run = cfg.config.as_ref();
    let mut args: Vec<String> = run.and_then(|r| r.entrypoint.clone()).unwrap_or_default();
    args.extend(run.and_then(|r| r.cmd.clone()).unwrap_or_default());
    if args.is_empty() {
        return Err(BundleError::Config(
            "image has neither Entrypoint nor Cmd".into(),
        ));
    }
    let mut env = run.and_then(|r| r.env.clone()).unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    let cwd = run
        .and_then(|r| r.working_dir.clone())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    let (uid, gid, username) =
        resolve_user(run.and_then(|r| r.user.as_deref()).unwrap_or(""), rootfs)?;
    let mut user = User::default();
    user.set_uid(uid);
    user.set_gid(gid);
    user.set_username(username);
    let mut process = Process::default();
    process.set_terminal(Some(false));
    process.set_args(Some(args));
    process.set_env(Some(env));
    process.set_cwd(PathBuf::from(cwd));
    process.set_user(user);
    let mut root = Root::default();
    root.set_path(PathBuf::from("rootfs"));
    root.set_readonly(Some(false));
    let mut spec = Spec::default();
    spec.set_process(Some(process));
    spec.set_root(Some(root));
    spec.set_hostname(None);
    let labels: std::collections::HashMap<String, String> = run
        .and_then(|r| r.labels.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    if !labels.is_empty() {
        spec.set_annotations(Some(labels));
    }
    Ok(spec)
}

/// Mounts the overlay (layers bottom first) at `<bundle>/rootfs` and writes `config.json`.
pub fn create_bundle(
    bundle: &Path,
    overlay_dir: &Path,
    layers: &[PathBuf],
    cfg: &ImageConfig,
) -> Result<(), BundleError> {
    let rootfs = bundle.join("rootfs");
    fs::create_dir_all(&rootfs).map_err(io_at(&rootfs))?;
    if is_mountpoint(&rootfs) {
        return Err(BundleError::Busy(bundle.to_owned()));
    }
    let upper = overlay_dir.join("upper");
    let work = overlay_dir.join("work");
    for d in [&upper, &work] {
        fs::create_dir_all(d).map_err(io_at(d))?;
    }
    // Before mounting: the upper's copies of implicit parent dirs (see unpack::compose).
    crate::unpack::compose::fix_implicit_dirs(layers, &upper).map_err(io_at(&upper))?;
    let data = overlay_mount_data(layers, overlay_dir);
    let cdata = std::ffi::CString::new(data).map_err(|e| BundleError::Config(e.to_string()))?;
    mount(
        "overlay",
        &rootfs,
        "overlay",
        MountFlags::empty(),
        cdata.as_c_str(),
    )
    .map_err(|e| BundleError::Mount {
        target: rootfs.clone(),
        source: e.into(),
    })?;
    let write = || -> Result<(), BundleError> {
        let spec = runtime_spec(cfg, &rootfs)?;
        let json =
            serde_json::to_vec_pretty(&spec).map_err(|e| BundleError::Config(e.to_string()))?;
        let path = bundle.join("config.json");
        fs::write(&path, json).map_err(io_at(&path))
    };
    if let Err(e) = write() {
        let _ = unmount(&rootfs, UnmountFlags::DETACH);
        return Err(e);
    }
    Ok(())
}

/// The overlay mount options for `layers` (bottom first) and the upper/work dirs in `overlay_dir`.
fn overlay_mount_data(layers: &[PathBuf], overlay_dir: &Path) -> String {
    // overlayfs takes the top-most lower dir first.
    let lower: Vec<String> = layers
        .iter()
        .rev()
        .map(|p| escape_overlay(&p.to_string_lossy()))
        .collect();
    format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        escape_overlay(&overlay_dir.join("upper").to_string_lossy()),
        escape_overlay(&overlay_dir.join("work").to_string_lossy())
    )
}

/// overlayfs' limit on lower layers (`OVL_MAX_STACK`).
pub const OVERLAY_MAX_LOWER: usize = 500;

/// Checks, before anything is fetched, that the overlay over `layers` can be mounted: at most
/// [`OVERLAY_MAX_LOWER`] layers, and mount(2) data (copied by the kernel as one page, a longer
/// string is cut off) that fits a page with its NUL.
pub fn check_overlay_fits(layers: &[PathBuf], overlay_dir: &Path) -> Result<(), LayerError> {
    if layers.len() > OVERLAY_MAX_LOWER {
        return Err(LayerError::TooManyLayers {
            count: layers.len(),
            limit: OVERLAY_MAX_LOWER,
            why: "overlayfs lower-layer limit".into(),
        });
    }
    let page = rustix::param::page_size();
    let len = overlay_mount_data(layers, overlay_dir).len();
    if len >= page {
        // How many layers of this path length would fit, for the message.
        let fixed = overlay_mount_data(&[], overlay_dir).len();
        let per = ((len - fixed) / layers.len().max(1)).max(1);
        return Err(LayerError::TooManyLayers {
            count: layers.len(),
            limit: (page - 1 - fixed.min(page - 1)) / per,
            why: format!(
                "the overlay mount options would be {len} bytes, more than the kernel's \
                 {page}-byte page; a shorter [image] work_dir fits more layers"
            ),
        });
    }
    Ok(())
}

fn escape_overlay(p: &str) -> String {
    p.replace('\\', "\\\\")
        .replace(':', "\\:")
        .replace(',', "\\,")
}

/// Whether `p` is the root of a mount (symlinks not followed). Asked with
/// `AT_STATX_DONT_SYNC`, so a FUSE mount with no server (a lazy mount between two guest-puller
/// runs, kept by the holder) answers from the kernel's cache instead of waiting for one.
pub fn is_mountpoint(p: &Path) -> bool {
    use rustix::fs::{statx, AtFlags, StatxAttributes, StatxFlags, CWD};
    let flags = AtFlags::STATX_DONT_SYNC | AtFlags::SYMLINK_NOFOLLOW;
    let stat = |p: &Path| statx(CWD, p, flags, StatxFlags::BASIC_STATS).ok();
    let Some(a) = stat(p) else {
        return false;
    };
    if a.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT) {
        return a.stx_attributes.contains(StatxAttributes::MOUNT_ROOT);
    }
    // Kernels before 5.8: a mount root sits on another device than its parent, or is `/`.
    let Some(b) = stat(&p.join("..")) else {
        return false;
    };
    (a.stx_dev_major, a.stx_dev_minor) != (b.stx_dev_major, b.stx_dev_minor)
        || a.stx_ino == b.stx_ino
}

/// Unmounts `<bundle>/rootfs` (if mounted), removes it, `config.json` and the overlay dirs.
pub fn remove_bundle(bundle: &Path, overlay_dir: &Path) -> Result<(), BundleError> {
    let rootfs = bundle.join("rootfs");
    if is_mountpoint(&rootfs) {
        unmount(&rootfs, UnmountFlags::empty())
            .or_else(|_| unmount(&rootfs, UnmountFlags::DETACH))
            .map_err(|e| BundleError::Io {
                path: rootfs.clone(),
                source: e.into(),
            })?;
    }
    match fs::remove_dir(&rootfs) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at(&rootfs)(e)),
    }
    let cfg = bundle.join("config.json");
    match fs::remove_file(&cfg) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at(&cfg)(e)),
    }
    match fs::remove_dir_all(overlay_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at(overlay_dir)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_from_config() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("etc")).unwrap();
        fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        fs::write(dir.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let c = ImageConfig::parse(
            br#"{"os":"linux","architecture":"amd64",
            "config":{"User":"app:staff","Env":["A=1"],"Entrypoint":["/bin/sh"],"Cmd":["-c","true"],
            "WorkingDir":"/w","Labels":{"l":"v"}},"rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap();
        let s = runtime_spec(&c, dir.path()).unwrap();
        let p = s.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &["/bin/sh", "-c", "true"]);
        assert_eq!(p.user().uid(), 1000);
        assert_eq!(p.user().gid(), 50);
        assert_eq!(p.cwd(), &PathBuf::from("/w"));
        assert!(p
            .env()
            .as_ref()
            .unwrap()
            .iter()
            .any(|e| e.starts_with("PATH=")));
        assert_eq!(s.annotations().as_ref().unwrap()["l"], "v");
        assert!(ImageConfig::parse(br#"{"rootfs":{"type":"x","diff_ids":[]}}"#).is_err());
        let bad = ImageConfig::parse(
            br#"{"config":{"User":"ghost","Cmd":["x"]},"rootfs":{"type":"layers"}}"#,
        )
        .unwrap();
        assert!(runtime_spec(&bad, dir.path()).is_err());
    }

    fn spec_for_user(rootfs: &Path, user: &str) -> Result<Spec, BundleError> {
        let c = ImageConfig::parse(
            format!(r#"{{"config":{{"User":"{user}","Cmd":["x"]}},"rootfs":{{"type":"layers"}}}}"#)
                .as_bytes(),
        )
        .unwrap();
        runtime_spec(&c, rootfs)
    }

    #[test]
    fn hostile_account_files_are_refused_fast_and_missing_ones_fall_back() {
        use rustix::fs::{mknodat, FileType, Mode, CWD};
        let started = std::time::Instant::now();
        let secret = tempfile::NamedTempFile::new().unwrap();
        fs::write(secret.path(), "app:x:4242:4242::/:/bin/sh\n").unwrap();
        let out = secret.path().to_owned();
        type Make = Box<dyn Fn(&Path)>;
        let cases: Vec<(&str, Make, &str)> = vec![
            (
                "symlink out",
                Box::new(move |p: &Path| std::os::unix::fs::symlink(&out, p).unwrap()),
                "symlink",
            ),
            (
                "FIFO",
                Box::new(|p: &Path| {
                    mknodat(CWD, p, FileType::Fifo, Mode::from_raw_mode(0o644), 0).unwrap()
                }),
                "FIFO",
            ),
            (
                "1 GB sparse file",
                Box::new(|p: &Path| fs::File::create(p).unwrap().set_len(1 << 30).unwrap()),
                "larger than",
            ),
            (
                "directory",
                Box::new(|p: &Path| fs::create_dir(p).unwrap()),
                "directory",
            ),
            (
                "symlink to /dev/zero",
                Box::new(|p: &Path| std::os::unix::fs::symlink("/dev/zero", p).unwrap()),
                "symlink",
            ),
        ];
        for (what, make, says) in cases {
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir_all(dir.path().join("etc")).unwrap();
            make(&dir.path().join("etc/passwd"));
            for user in ["app", "1000", "1000:0"] {
                let e = spec_for_user(dir.path(), user).unwrap_err();
                assert!(matches!(e, BundleError::Rootfs(_)), "{what} {user}: {e:?}");
                assert!(e.to_string().contains("/etc/passwd"), "{what}: {e}");
                assert!(e.to_string().contains(says), "{what}: {e}");
            }
            // An image that names no user never reads the file.
            assert_eq!(
                spec_for_user(dir.path(), "")
                    .unwrap()
                    .process()
                    .as_ref()
                    .unwrap()
                    .user()
                    .uid(),
                0
            );
        }
        // No /etc/passwd at all: numeric ids as given (gid 0), names not found.
        let dir = tempfile::tempdir().unwrap();
        let s = spec_for_user(dir.path(), "1000").unwrap();
        assert_eq!(s.process().as_ref().unwrap().user().uid(), 1000);
        assert_eq!(s.process().as_ref().unwrap().user().gid(), 0);
        let e = spec_for_user(dir.path(), "app").unwrap_err();
        assert!(matches!(e, BundleError::Config(_)), "{e:?}");
        // A FIFO /etc/group is refused too.
        fs::create_dir_all(dir.path().join("etc")).unwrap();
        mknodat(
            CWD,
            dir.path().join("etc/group"),
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let e = spec_for_user(dir.path(), "1000:staff").unwrap_err();
        assert!(
            e.to_string().contains("/etc/group") && e.to_string().contains("FIFO"),
            "{e}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(3));
    }
}
