//! Test images: small busybox images built with umoci and pushed with skopeo (no Docker),
//! Debian trees from debootstrap, and images assembled from tar files written by other tools.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
// The busybox applets linked in every test image: the same set as the catalog images.
use test_images::catalog::APPLETS;

use crate::lab::run_ok;
use crate::registry::Registry;

/// What a pushed image is, as the registry stores it.
#[derive(Debug, Clone)]
pub struct PushedImage {
    /// `127.0.0.1:PORT/repo:tag`.
    pub reference: String,
    /// The repository part (`repo`), as used in registry URLs.
    pub repo: String,
    /// `sha256:…` of the manifest bytes as stored.
    pub manifest_digest: String,
    /// `sha256:…` of the config blob.
    pub config_digest: String,
    /// Compressed layer blob digests, in manifest order.
    pub layer_digests: Vec<String>,
    /// The raw manifest JSON.
    pub manifest: serde_json::Value,
}

/// Builds a busybox image with `layers` layers (`layers >= 1`; layer N > 1 adds
/// `/etc/layer<N>.txt` containing `layer <N>`), default command `cmd`, and pushes it to
/// `registry` as `repo_tag` (`repo:tag`, no host).
pub fn push_test_image(
    registry: &Registry<'_>,
    repo_tag: &str,
    layers: usize,
    cmd: &[&str],
) -> PushedImage {
    assert!(layers >= 1, "an image needs at least one layer");
    crate::lab::Lab::require_cmd("umoci", "umoci");
    crate::lab::Lab::require_cmd("skopeo", "skopeo");
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        panic!("/bin/busybox missing: apt-get install busybox-static (.ci/run does)");
    }
    let work = registry
        .data_dir()
        .parent()
        .unwrap()
        .join(format!("build-{}", repo_tag.replace(['/', ':'], "_")));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    let layout = work.join("oci");
    let bundle = work.join("bundle");
    let img = format!("{}:img", layout.display());
    run_ok(
        Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout),
    );
    run_ok(Command::new("umoci").args(["new", "--image", &img]));
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--image", &img])
            .arg(&bundle),
    );
    let rootfs = bundle.join("rootfs");
    for d in ["bin", "etc", "tmp"] {
        fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
    for a in APPLETS {
        symlink("busybox", rootfs.join("bin").join(a)).unwrap();
    }
    fs::write(
        rootfs.join("etc/hello.txt"),
        "hello from guestpull test image\n",
    )
    .unwrap();
    run_ok(
        Command::new("umoci")
            .args(["repack", "--image", &img])
            .arg(&bundle),
    );
    for n in 2..=layers {
        // umoci repack diffs against the image the bundle was unpacked from, so each new
        // layer needs a fresh unpack of the previous result.
        fs::remove_dir_all(&bundle).unwrap();
        run_ok(
            Command::new("umoci")
                .args(["unpack", "--image", &img])
                .arg(&bundle),
        );
        fs::write(
            rootfs.join(format!("etc/layer{n}.txt")),
            format!("layer {n}\n"),
        )
        .unwrap();
        run_ok(
            Command::new("umoci")
                .args(["repack", "--image", &img])
                .arg(&bundle),
        );
    }
    let mut config = Command::new("umoci");
    config.args(["config", "--image", &img]);
    for c in cmd {
        config.args(["--config.cmd", c]);
    }
    config.args([
        "--config.env",
        "PATH=/bin",
        "--architecture",
        "amd64",
        "--os",
        "linux",
    ]);
    run_ok(&mut config);
    run_ok(Command::new("umoci").args(["gc", "--layout"]).arg(&layout));
    let pushed = push_layout(registry, &img, repo_tag);
    let _ = fs::remove_dir_all(&work);
    pushed
}

/// Reads back what the registry holds for `reference` (`host/repo:tag`).
pub fn inspect(registry: &Registry<'_>, reference: &str) -> PushedImage {
    let rest = reference
        .strip_prefix(&format!("{}/", registry.host()))
        .expect("reference on this registry");
    let (repo, tag) = rest.rsplit_once(':').expect("reference with a tag");
    let (status, body) = registry
        .http_get(&format!("/v2/{repo}/manifests/{tag}"))
        .expect("registry reachable");
    assert_eq!(status, 200, "manifest of {reference}");
    let manifest: serde_json::Value = serde_json::from_slice(&body).expect("manifest JSON");
    let layer_digests = manifest["layers"]
        .as_array()
        .map(|ls| {
            ls.iter()
                .map(|l| l["digest"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    PushedImage {
        reference: reference.to_string(),
        repo: repo.to_string(),
        manifest_digest: format!("sha256:{}", hex::encode(Sha256::digest(&body))),
        config_digest: manifest["config"]["digest"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        layer_digests,
        manifest,
    }
}

/// Path → "type mode owner size-or-hash link" for every entry below `root`: two rootfs trees
/// compare equal when files, modes, owners, contents and links match.
pub fn rootfs_tree(root: &Path) -> BTreeMap<String, String> {
    let out = run_ok(Command::new("find").arg(root).args([
        "-mindepth",
        "1",
        "-printf",
        "%P\t%y\t%m\t%U:%G\t%s\t%l\n",
    ]));
    let mut m = BTreeMap::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let (path, kind, mode, owner, size, link) = (f[0], f[1], f[2], f[3], f[4], f[5]);
        let content = match kind {
            "f" => hex::encode(Sha256::digest(fs::read(root.join(path)).unwrap())),
            // Directory sizes depend on the filesystem, not the image.
            "d" => String::new(),
            _ => size.to_string(),
        };
        m.insert(
            path.to_string(),
            format!("{kind} {mode} {owner} {content} {link}"),
        );
    }
    m
}

/// Where debootstrapped Debian trees are cached between runs.
const DEBIAN_CACHE: &str = "/var/cache/guestpull-lab/debian";

/// The Debian mirror apt uses on this machine (the first `URIs:` of a deb822 source, else the
/// first `deb` line of `/etc/apt/sources.list`).
fn debian_mirror() -> String {
    let deb822 = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let from_deb822 = deb822
        .lines()
        .find_map(|l| l.strip_prefix("URIs:"))
        .and_then(|u| u.split_whitespace().next().map(str::to_string));
    let list = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    let from_list = || {
        list.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.first() == Some(&"deb"))
            .and_then(|f| f.iter().find(|w| w.contains("://")).map(|u| u.to_string()))
    };
    from_deb822.or_else(from_list).unwrap_or_else(|| {
        panic!(
            "no Debian mirror in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list"
        )
    })
}

/// A Debian bookworm `debootstrap --variant=minbase` tree from the configured mirror, built
/// on first use and cached under `/var/cache/guestpull-lab/debian/bookworm-minbase`.
pub fn debian_minbase() -> PathBuf {
    let dir = Path::new(DEBIAN_CACHE).join("bookworm-minbase");
    if dir.join("etc/debian_version").is_file() {
        return dir;
    }
    crate::lab::Lab::require_root();
    crate::lab::Lab::require_cmd("debootstrap", "debootstrap");
    fs::create_dir_all(DEBIAN_CACHE).unwrap();
    // Built aside and renamed, so an interrupted run never leaves a half tree in the cache.
    let tmp = Path::new(DEBIAN_CACHE).join(format!("tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    run_ok(
        Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(&tmp)
            .arg(debian_mirror()),
    );
    if fs::rename(&tmp, &dir).is_err() {
        // Another run finished first; its tree is as good.
        let _ = fs::remove_dir_all(&tmp);
    }
    assert!(
        dir.join("etc/debian_version").is_file(),
        "debootstrap left no tree at {dir:?}"
    );
    dir
}

/// Builds an OCI layout at `layout` (tag `img`) whose layers are the uncompressed `tars`
/// exactly as written (bottom first, gzipped by `umoci raw add-layer`), with command `cmd`.
pub fn layout_from_tars(layout: &Path, tars: &[PathBuf], cmd: &str) -> String {
    crate::lab::Lab::require_cmd("umoci", "umoci");
    let img = format!("{}:img", layout.display());
    run_ok(Command::new("umoci").args(["init", "--layout"]).arg(layout));
    run_ok(Command::new("umoci").args(["new", "--image", &img]));
    add_layer_tars(&img, tars);
    run_ok(Command::new("umoci").args([
        "config",
        "--image",
        &img,
        "--config.cmd",
        cmd,
        "--architecture",
        "amd64",
        "--os",
        "linux",
    ]));
    img
}

/// Appends the uncompressed `tars` to the OCI image `img` (`layout:tag`) as they are.
pub fn add_layer_tars(img: &str, tars: &[PathBuf]) {
    for t in tars {
        run_ok(
            Command::new("umoci")
                .args(["raw", "add-layer", "--image", img])
                .arg(t),
        );
    }
}

/// Copies the OCI image `img` (`layout:tag`) to `registry` as `repo_tag` and reads it back.
pub fn push_layout(registry: &Registry<'_>, img: &str, repo_tag: &str) -> PushedImage {
    crate::lab::Lab::require_cmd("skopeo", "skopeo");
    let reference = format!("{}/{repo_tag}", registry.host());
    run_ok(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{img}"),
        &format!("docker://{reference}"),
    ]));
    inspect(registry, &reference)
}

/// Names and values of the extended attributes of `p` (not following a symlink).
fn xattrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: the buffers outlive the calls and their lengths are passed.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        let cname = std::ffi::CString::new(name).unwrap();
        let mut value = vec![0u8; 64 * 1024];
        // SAFETY: as above.
        let len = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert!(len >= 0, "reading xattr {name:?} of {p:?}");
        value.truncate(len as usize);
        out.push((String::from_utf8_lossy(name).into_owned(), value));
    }
    out.sort();
    out
}

/// [`rootfs_tree`] plus what it leaves out: extended attributes and hardlink identity (every
/// member of a hardlink group names the group's first path). Paths are escaped so names with
/// newlines or tabs stay single entries.
pub fn fidelity_tree(root: &Path) -> BTreeMap<String, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut groups: BTreeMap<(u64, u64), String> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(root.join(&rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        entries.sort();
        for name in entries {
            let rel = rel.join(&name);
            let p = root.join(&rel);
            let md = fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            let (kind, content) = if ft.is_dir() {
                stack.push(rel.clone());
                ("d", String::new())
            } else if ft.is_file() {
                let hash = hex::encode(Sha256::digest(fs::read(&p).unwrap()));
                ("f", format!("{} {hash}", md.size()))
            } else if ft.is_symlink() {
                ("l", format!("-> {:?}", fs::read_link(&p).unwrap()))
            } else {
                ("s", format!("rdev {}", md.rdev()))
            };
            let key = format!("{:?}", rel);
            let link = if !ft.is_dir() && md.nlink() > 1 {
                let first = groups
                    .entry((md.dev(), md.ino()))
                    .or_insert_with(|| key.clone());
                format!(" hardlink-group {first}")
            } else {
                String::new()
            };
            let xa: Vec<String> = xattrs(&p)
                .into_iter()
                .map(|(k, v)| format!("{k}={}", hex::encode(v)))
                .collect();
            out.insert(
                key,
                format!(
                    "{kind} {:o} {}:{} {content}{link} xattrs[{}]",
                    md.mode() & 0o7777,
                    md.uid(),
                    md.gid(),
                    xa.join(",")
                ),
            );
        }
    }
    out
}
