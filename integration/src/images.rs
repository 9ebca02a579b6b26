//! Small busybox test images built with umoci and pushed with skopeo (no Docker).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
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
    let reference = format!("{}/{repo_tag}", registry.host());
    run_ok(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{img}"),
        &format!("docker://{reference}"),
    ]));
    let _ = fs::remove_dir_all(&work);
    inspect(registry, &reference)
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
