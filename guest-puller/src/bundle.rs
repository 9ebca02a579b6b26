//! OCI bundle creation: overlay mount of the store's layers at `<bundle>/rootfs` with a
//! per-bundle upper/work dir, and `config.json` generated from the image config.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{Process, Root, Spec, User};
use rustix::mount::{mount, unmount, MountFlags, UnmountFlags};
use serde::Deserialize;

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
    /// Filesystem error.
    #[error("bundle {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
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

/// Resolves `user[:group]` to numeric ids, reading names from the rootfs' /etc/passwd and /etc/group.
fn resolve_user(spec: &str, rootfs: &Path) -> Result<(u32, u32, Option<String>), BundleError> {
    let (u, g) = spec
        .split_once(':')
        .map_or((spec, None), |(u, g)| (u, Some(g)));
    let lookup = |file: &str, name: &str| -> Option<(u32, u32)> {
        let text = fs::read_to_string(rootfs.join(file)).ok()?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.first() == Some(&name) && f.len() > 3 {
                Some((f[2].parse().ok()?, f[3].parse().ok()?))
            } else {
                None
            }
        })
    };
    let (uid, mut gid, name) = if u.is_empty() {
        (0, 0, None)
    } else if let Ok(n) = u.parse::<u32>() {
        let gid = fs::read_to_string(rootfs.join("etc/passwd"))
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() > 3 && f[2] == u)
                        .then(|| f[3].parse().ok())
                        .flatten()
                })
            })
            .unwrap_or(0);
        (n, gid, None)
    } else {
        let (uid, gid) = lookup("etc/passwd", u)
            .ok_or_else(|| BundleError::Config(format!("user {u:?} not found in /etc/passwd")))?;
        (uid, gid, Some(u.to_string()))
    };
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => fs::read_to_string(rootfs.join("etc/group"))
                .ok()
                .and_then(|t| {
                    t.lines().find_map(|l| {
                        let f: Vec<&str> = l.split(':').collect();
                        (f.len() > 2 && f[0] == g)
                            .then(|| f[2].parse().ok())
                            .flatten()
                    })
                })
                .ok_or_else(|| {
                    BundleError::Config(format!("group {g:?} not found in /etc/group"))
                })?,
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
    // overlayfs takes the top-most lower dir first.
    let lower: Vec<String> = layers
        .iter()
        .rev()
        .map(|p| escape_overlay(&p.to_string_lossy()))
        .collect();
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        escape_overlay(&upper.to_string_lossy()),
        escape_overlay(&work.to_string_lossy())
    );
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

fn escape_overlay(p: &str) -> String {
    p.replace('\\', "\\\\")
        .replace(':', "\\:")
        .replace(',', "\\,")
}

/// Whether `p` is a mount point (its device differs from its parent's).
pub fn is_mountpoint(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(a), Ok(b)) = (fs::metadata(p), fs::metadata(p.join(".."))) else {
        return false;
    };
    a.dev() != b.dev() || a.ino() == b.ino()
}

/// Unmounts `<bundle>/rootfs` (if mounted), removes it, `config.json` and the overlay dirs.
pub fn remove_bundle(bundle: &Path, overlay_dir: &Path) -> Result<(), BundleError> {
    let rootfs = bundle.join("rootfs");
    if rootfs.exists() && is_mountpoint(&rootfs) {
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
}
