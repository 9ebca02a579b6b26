//! guest-puller end to end against Debian's docker-registry, with umoci and skopeo as the
//! independent reference (Go) implementations. Needs root (overlay mounts, whiteouts).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use integration::images::rootfs_tree;
use integration::lab::run_ok;
use integration::{bin_path, push_test_image, Lab, Registry};
use sha2::{Digest, Sha256};

struct Env<'a> {
    lab: &'a Lab,
    reg: Registry<'a>,
    work: PathBuf,
    cfg: PathBuf,
}

fn env<'a>(lab: &'a Lab, extra: &str) -> Env<'a> {
    Lab::require_root();
    Lab::require_cmd("umoci", "umoci");
    Lab::require_cmd("skopeo", "skopeo");
    Lab::require_cmd("zstd", "zstd");
    let reg = Registry::start(lab);
    let work = lab.join("work");
    let cfg = lab.join("puller.toml");
    fs::write(
        &cfg,
        format!(
            "[image]\nwork_dir = \"{}\"\nbundle_roots = [\"{}\"]\n\
             [image.registry_config]\ninsecure_registries = [\"{}\"]\n{extra}",
            work.display(),
            lab.path().display(),
            reg.host()
        ),
    )
    .unwrap();
    Env {
        lab,
        reg,
        work,
        cfg,
    }
}

impl Env<'_> {
    fn pull(&self, image: &str, bundle: &Path) -> Output {
        self.pull_with(&self.cfg, image, bundle)
    }

    fn pull_with(&self, cfg: &Path, image: &str, bundle: &Path) -> Output {
        integration::chain::guest_puller_pull(cfg, image, bundle)
    }

    fn pull_ok(&self, image: &str, bundle: &Path) -> serde_json::Value {
        let out = self.pull(image, bundle);
        assert!(
            out.status.success(),
            "guest-puller pull {image} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("pull prints JSON")
    }

    fn store_is_empty(&self) -> bool {
        work_is_empty(&self.work)
    }

    /// `umoci unpack` of the same image, as the reference rootfs.
    fn umoci_rootfs(&self, image: &str, name: &str) -> PathBuf {
        let layout = self.lab.join(&format!("ref-{name}"));
        run_ok(Command::new("skopeo").args([
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{image}"),
            &format!("oci:{}:ref", layout.display()),
        ]));
        let bundle = self.lab.join(&format!("umoci-{name}"));
        run_ok(
            Command::new("umoci")
                .args(["unpack", "--image", &format!("{}:ref", layout.display())])
                .arg(&bundle),
        );
        bundle.join("rootfs")
    }
}

fn assert_same_tree(ours: &Path, reference: &Path) {
    let (a, b) = (rootfs_tree(ours), rootfs_tree(reference));
    assert!(!a.is_empty(), "empty rootfs at {}", ours.display());
    if a != b {
        let mut diff = String::new();
        for k in a
            .keys()
            .chain(b.keys())
            .collect::<std::collections::BTreeSet<_>>()
        {
            if a.get(k) != b.get(k) {
                diff += &format!("{k}: guest-puller {:?} / umoci {:?}\n", a.get(k), b.get(k));
            }
        }
        panic!("rootfs differs from umoci unpack:\n{diff}");
    }
}

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Writes a blob into an OCI layout; returns its descriptor.
fn put_blob(layout: &Path, media_type: &str, data: &[u8]) -> serde_json::Value {
    let hex = sha_hex(data);
    fs::write(layout.join("blobs/sha256").join(&hex), data).unwrap();
    serde_json::json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": data.len()})
}

/// Tars `dir` (numeric 0:0 owners, sorted) with GNU tar.
fn tar_dir(dir: &Path) -> Vec<u8> {
    let out = Command::new("tar")
        .args([
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "--sort=name",
            "-C",
        ])
        .arg(dir)
        .args(["-cf", "-", "."])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn compress(data: &[u8], how: &str) -> Vec<u8> {
    let args: &[&str] = match how {
        "gzip" => &["gzip", "-n", "-c"],
        "zstd" => &["zstd", "-q", "-c"],
        _ => return data.to_vec(),
    };
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = data.to_vec();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(&input).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out.stdout
}

/// Builds an image manifest from layer tars in `layout`; returns the manifest descriptor.
fn image_in_layout(layout: &Path, layers: &[Vec<u8>], how: &str, arch: &str) -> serde_json::Value {
    let run = serde_json::json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]});
    image_with_config(layout, layers, how, arch, run)
}

/// [`image_in_layout`] with the image config's `config` section given.
fn image_with_config(
    layout: &Path,
    layers: &[Vec<u8>],
    how: &str,
    arch: &str,
    run: serde_json::Value,
) -> serde_json::Value {
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    let mt = match how {
        "gzip" => "application/vnd.oci.image.layer.v1.tar+gzip",
        "zstd" => "application/vnd.oci.image.layer.v1.tar+zstd",
        _ => "application/vnd.oci.image.layer.v1.tar",
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        diff_ids.push(format!("sha256:{}", sha_hex(l)));
        descs.push(put_blob(layout, mt, &compress(l, how)));
    }
    let config = serde_json::json!({"architecture": arch, "os": "linux", "config": run,
        "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    let cdesc = put_blob(
        layout,
        "application/vnd.oci.image.config.v1+json",
        config.to_string().as_bytes(),
    );
    let manifest = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": cdesc, "layers": descs});
    let mut d = put_blob(
        layout,
        "application/vnd.oci.image.manifest.v1+json",
        manifest.to_string().as_bytes(),
    );
    d["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
    d
}

fn write_index(layout: &Path, tag: &str, top: serde_json::Value) {
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let mut top = top;
    top["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [top]});
    fs::write(layout.join("index.json"), index.to_string()).unwrap();
}

/// Uploads a blob from the layout with the two-step (POST, PUT ?digest=) registry protocol.
fn upload_blob(e: &Env, repo: &str, path: &Path, digest: &str) {
    let head = run_ok(Command::new("curl").args([
        "-sS",
        "-i",
        "-X",
        "POST",
        &format!("http://{}/v2/{repo}/blobs/uploads/", e.reg.host()),
    ]));
    let location = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("Location: ")
                .or_else(|| l.strip_prefix("location: "))
        })
        .expect("upload Location header")
        .trim()
        .to_string();
    let url = if location.starts_with("http") {
        location
    } else {
        format!("http://{}{location}", e.reg.host())
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let code = run_ok(
        Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
            .args([
                "-H",
                "Content-Type: application/octet-stream",
                "--data-binary",
            ])
            .arg(format!("@{}", path.display()))
            .arg(format!("{url}{sep}digest={digest}")),
    );
    assert_eq!(code.trim(), "201", "blob upload of {digest}");
}

fn put_manifest(e: &Env, repo: &str, reference: &str, path: &Path, media_type: &str) {
    let code = run_ok(
        Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
            .args([
                "-H",
                &format!("Content-Type: {media_type}"),
                "--data-binary",
            ])
            .arg(format!("@{}", path.display()))
            .arg(format!(
                "http://{}/v2/{repo}/manifests/{reference}",
                e.reg.host()
            )),
    );
    assert_eq!(code.trim(), "201", "manifest upload {repo}:{reference}");
}

/// Pushes the layout's image (or index) byte for byte, so compression and digests are exactly
/// what the test built (skopeo would recompress uncompressed layers).
fn push_layout(e: &Env, layout: &Path, repo_tag: &str, top: &serde_json::Value) -> String {
    let (repo, tag) = repo_tag.split_once(':').unwrap();
    let blob = |d: &serde_json::Value| {
        layout
            .join("blobs/sha256")
            .join(d["digest"].as_str().unwrap().trim_start_matches("sha256:"))
    };
    let push_image = |desc: &serde_json::Value, reference: &str| {
        let m: serde_json::Value = serde_json::from_slice(&fs::read(blob(desc)).unwrap()).unwrap();
        for d in m["layers"].as_array().unwrap().iter().chain([&m["config"]]) {
            upload_blob(e, repo, &blob(d), d["digest"].as_str().unwrap());
        }
        put_manifest(
            e,
            repo,
            reference,
            &blob(desc),
            desc["mediaType"].as_str().unwrap(),
        );
    };
    if top["mediaType"] == "application/vnd.oci.image.index.v1+json" {
        let idx: serde_json::Value = serde_json::from_slice(&fs::read(blob(top)).unwrap()).unwrap();
        for m in idx["manifests"].as_array().unwrap() {
            push_image(m, m["digest"].as_str().unwrap());
        }
        put_manifest(e, repo, tag, &blob(top), top["mediaType"].as_str().unwrap());
    } else {
        push_image(top, tag);
    }
    format!("{}/{repo_tag}", e.reg.host())
}

/// Layer 1: busybox, a setuid file, a hardlink, a FIFO-free tree; layer 2: whiteout + opaque dir.
fn whiteout_layers(lab: &Lab) -> Vec<Vec<u8>> {
    let l1 = lab.join("l1");
    for d in ["bin", "etc", "dir/sub", "keep"] {
        fs::create_dir_all(l1.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", l1.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", l1.join("bin/sh")).unwrap();
    fs::write(l1.join("etc/a"), "a\n").unwrap();
    fs::write(l1.join("etc/suid"), "s\n").unwrap();
    run_ok(
        Command::new("chmod")
            .args(["4755"])
            .arg(l1.join("etc/suid")),
    );
    fs::hard_link(l1.join("etc/suid"), l1.join("etc/suid-link")).unwrap();
    fs::write(l1.join("dir/x"), "x\n").unwrap();
    fs::write(l1.join("dir/sub/y"), "y\n").unwrap();
    fs::write(l1.join("keep/k"), "k\n").unwrap();
    run_ok(
        Command::new("chown")
            .args(["1000:1000"])
            .arg(l1.join("keep/k")),
    );
    let l2 = lab.join("l2");
    fs::create_dir_all(l2.join("etc")).unwrap();
    fs::create_dir_all(l2.join("dir")).unwrap();
    fs::write(l2.join("etc/.wh.a"), "").unwrap();
    fs::write(l2.join("dir/.wh..wh..opq"), "").unwrap();
    fs::write(l2.join("dir/new"), "new\n").unwrap();
    vec![tar_dir(&l1), tar_dir(&l2)]
}

#[test]
fn rootfs_matches_umoci_for_gzip_zstd_uncompressed_and_whiteouts() {
    let lab = Lab::new("puller-kinds");
    let e = env(&lab, "");
    let layers = whiteout_layers(&lab);
    for how in ["gzip", "zstd", "none"] {
        let layout = lab.join(&format!("layout-{how}"));
        let top = image_in_layout(&layout, &layers, how, "amd64");
        write_index(&layout, "t", top.clone());
        let image = push_layout(&e, &layout, &format!("kinds/{how}:v1"), &top);
        let pushed = integration::images::inspect(&e.reg, &image).manifest;
        let want = match how {
            "gzip" => "tar+gzip",
            "zstd" => "tar+zstd",
            _ => "layer.v1.tar",
        };
        assert!(
            pushed["layers"][0]["mediaType"]
                .as_str()
                .unwrap()
                .ends_with(want),
            "skopeo changed the layer compression: {pushed}"
        );
        let bundle = lab.join(&format!("bundle-{how}"));
        let r = e.pull_ok(&image, &bundle);
        assert_eq!(r["layers"].as_array().unwrap().len(), 2);
        let rootfs = bundle.join("rootfs");
        assert!(
            !rootfs.join("etc/a").exists(),
            "whiteout not applied ({how})"
        );
        assert!(
            !rootfs.join("dir/x").exists(),
            "opaque dir not applied ({how})"
        );
        assert_eq!(fs::read_to_string(rootfs.join("dir/new")).unwrap(), "new\n");
        // umoci 0.4.7 cannot read zstd layers: the gzip image has the same diff_ids.
        let reference = if how == "zstd" {
            e.umoci_rootfs(&format!("{}/kinds/gzip:v1", e.reg.host()), "zstd")
        } else {
            e.umoci_rootfs(&image, how)
        };
        assert_same_tree(&rootfs, &reference);
        let spec: serde_json::Value =
            serde_json::from_slice(&fs::read(bundle.join("config.json")).unwrap()).unwrap();
        assert_eq!(spec["process"]["args"], serde_json::json!(["/bin/sh"]));
        assert_eq!(spec["root"]["path"], "rootfs");
    }
}

#[test]
fn umoci_built_image_matches_and_index_selects_platform() {
    let lab = Lab::new("puller-index");
    let e = env(&lab, "");
    let img = push_test_image(
        &e.reg,
        "lab/busybox:v2",
        2,
        &["/bin/sh", "-c", "cat /etc/hello.txt"],
    );
    let bundle = lab.join("b1");
    let r = e.pull_ok(&img.reference, &bundle);
    assert_eq!(r["manifest_digest"], img.manifest_digest);
    assert_eq!(r["config_digest"], img.config_digest);
    assert_same_tree(
        &bundle.join("rootfs"),
        &e.umoci_rootfs(&img.reference, "v2"),
    );

    // An index with an arm64 decoy first: the amd64 entry must be chosen.
    let layout = lab.join("layout-index");
    let mk = |name: &str, text: &str| {
        let d = lab.join(name);
        fs::create_dir_all(d.join("etc")).unwrap();
        fs::write(d.join("etc/arch"), text).unwrap();
        tar_dir(&d)
    };
    let arm = image_in_layout(&layout, &[mk("arm", "arm64\n")], "gzip", "arm64");
    let amd = image_in_layout(&layout, &[mk("amd", "amd64\n")], "gzip", "amd64");
    let index = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [arm, amd.clone()]});
    let idesc = put_blob(
        &layout,
        "application/vnd.oci.image.index.v1+json",
        index.to_string().as_bytes(),
    );
    write_index(&layout, "t", idesc.clone());
    let image = push_layout(&e, &layout, "multi/arch:v1", &idesc);
    let bundle = lab.join("b-index");
    let r = e.pull_ok(&image, &bundle);
    assert_eq!(r["manifest_digest"], amd["digest"]);
    assert_eq!(r["list_digest"], idesc["digest"]);
    assert_eq!(
        fs::read_to_string(bundle.join("rootfs/etc/arch")).unwrap(),
        "amd64\n"
    );
    // Pinned by the index digest works too.
    let pinned = format!(
        "{}/multi/arch@{}",
        e.reg.host(),
        idesc["digest"].as_str().unwrap()
    );
    let r = e.pull_ok(&pinned, &lab.join("b-pinned"));
    assert_eq!(r["manifest_digest"], amd["digest"]);
}

#[test]
fn skopeo_jwe_encrypted_image_decrypts_and_wrong_key_leaves_nothing() {
    let lab = Lab::new("puller-jwe");
    Lab::require_cmd("openssl", "openssl");
    let keys = lab.join("keys");
    fs::create_dir_all(&keys).unwrap();
    for k in ["good", "bad"] {
        integration::lab::rsa_key_pair(
            &keys.join(format!("{k}.pem")),
            &keys.join(format!("{k}.pub")),
        );
    }
    let e = env(
        &lab,
        &format!(
            "[keys]\njwe_private_keys = [\"{}\"]\n",
            keys.join("good.pem").display()
        ),
    );
    let plain = push_test_image(&e.reg, "lab/enc:plain", 2, &["/bin/sh"]);
    let enc = format!("{}/lab/enc:jwe", e.reg.host());
    run_ok(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--encryption-key",
        &format!("jwe:{}", keys.join("good.pub").display()),
        &format!("docker://{}", plain.reference),
        &format!("docker://{enc}"),
    ]));
    let manifest = integration::images::inspect(&e.reg, &enc).manifest;
    assert!(manifest["layers"][0]["mediaType"]
        .as_str()
        .unwrap()
        .ends_with("+encrypted"));

    // Wrong key first: a clear error naming the layer, nothing in the store.
    let bad_cfg = lab.join("bad.toml");
    fs::write(
        &bad_cfg,
        fs::read_to_string(&e.cfg)
            .unwrap()
            .replace("good.pem", "bad.pem"),
    )
    .unwrap();
    let out = e.pull_with(&bad_cfg, &enc, &lab.join("b-bad"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("missing or wrong decryption key"), "{err}");
    assert!(
        err.contains(manifest["layers"][0]["digest"].as_str().unwrap())
            || err.contains(manifest["layers"][1]["digest"].as_str().unwrap()),
        "{err}"
    );
    assert!(e.store_is_empty());
    assert!(!lab.join("b-bad/rootfs/bin").exists());

    let b = lab.join("b-jwe");
    let r = e.pull_ok(&enc, &b);
    assert_eq!(r["config_digest"], plain.config_digest);
    let reference = e.umoci_rootfs(&plain.reference, "plain");
    assert_same_tree(&b.join("rootfs"), &reference);

    // tar+zstd+encrypted, which image-rs cannot read: recompress with skopeo, then encrypt.
    let zl = lab.join("zstd-layout");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        "--dest-compress",
        "--dest-compress-format",
        "zstd",
        &format!("docker://{}", plain.reference),
        &format!("oci:{}:z", zl.display()),
    ]));
    let zenc = format!("{}/lab/enc:jwe-zstd", e.reg.host());
    run_ok(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        "--encryption-key",
        &format!("jwe:{}", keys.join("good.pub").display()),
        &format!("oci:{}:z", zl.display()),
        &format!("docker://{zenc}"),
    ]));
    let m = integration::images::inspect(&e.reg, &zenc).manifest;
    assert_eq!(
        m["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd+encrypted"
    );
    let b = lab.join("b-jwe-zstd");
    e.pull_ok(&zenc, &b);
    assert_same_tree(&b.join("rootfs"), &reference);
}

#[test]
fn gpg_signature_policy_is_enforced_on_every_pull_including_cache_hits() {
    let lab = Lab::new("puller-policy");
    Lab::require_cmd("gpg", "gnupg");
    let gnupg = lab.join("gnupg");
    fs::create_dir_all(&gnupg).unwrap();
    run_ok(Command::new("chmod").arg("700").arg(&gnupg));
    let gpg = |args: &[&str]| {
        run_ok(
            Command::new("gpg")
                .env("GNUPGHOME", &gnupg)
                .args(["--batch", "--pinentry-mode", "loopback", "--passphrase", ""])
                .args(args),
        )
    };
    gpg(&[
        "--quick-gen-key",
        "Lab Signer <lab@example.invalid>",
        "rsa2048",
        "sign",
        "never",
    ]);
    let fpr = gpg(&["--list-keys", "--with-colons"])
        .lines()
        .find_map(|l| {
            l.strip_prefix("fpr:")
                .map(|r| r.trim_matches(':').to_string())
        })
        .expect("key fingerprint");
    let pubkey = lab.join("signer.asc");
    fs::write(&pubkey, gpg(&["--armor", "--export", &fpr])).unwrap();
    let sigstore = lab.join("sigstore");
    let regd = lab.join("regd");
    fs::create_dir_all(&regd).unwrap();
    let policy = lab.join("policy.json");
    let e = env(&lab, "");
    // The policy keys belong in [image]: splice them in right after the section header.
    let extra = format!(
        "image_security_policy_uri = \"file://{}\"\nsigstore_config_uri = \"file://{}\"\n",
        policy.display(),
        regd.join("default.yaml").display()
    );
    let cfg =
        fs::read_to_string(&e.cfg)
            .unwrap()
            .replacen("[image]\n", &format!("[image]\n{extra}"), 1);
    fs::write(&e.cfg, cfg).unwrap();
    fs::write(
        regd.join("default.yaml"),
        format!(
            "docker:\n  {}:\n    lookaside: file://{}\n    lookaside-staging: file://{}\n",
            e.reg.host(),
            sigstore.display(),
            sigstore.display()
        ),
    )
    .unwrap();
    let signed_policy = serde_json::json!({"default": [{"type": "reject"}],
        "transports": {"docker": {format!("{}/lab/pol", e.reg.host()): [{"type": "signedBy",
            "keyType": "GPGKeys", "keyPath": pubkey.to_str().unwrap(),
            "signedIdentity": {"type": "matchRepository"}}]}}});
    fs::write(&policy, signed_policy.to_string()).unwrap();
    let plain = push_test_image(&e.reg, "lab/pol:plain", 2, &["/bin/sh"]);
    let unsigned = push_test_image(&e.reg, "lab/pol:unsigned", 1, &["/bin/sh"]);
    let signed = format!("{}/lab/pol:signed", e.reg.host());
    run_ok(
        Command::new("skopeo")
            .env("GNUPGHOME", &gnupg)
            .arg("--registries.d")
            .arg(&regd)
            .args(["copy", "--src-tls-verify=false", "--dest-tls-verify=false"])
            .args(["--sign-by", &fpr])
            .arg(format!("docker://{}", plain.reference))
            .arg(format!("docker://{signed}")),
    );
    let _ = Command::new("gpgconf")
        .env("GNUPGHOME", &gnupg)
        .args(["--kill", "gpg-agent"])
        .status();

    e.pull_ok(&signed, &lab.join("b-signed"));

    let out = e.pull(&unsigned.reference, &lab.join("b-unsigned"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "unsigned image accepted");
    assert!(
        err.contains("rejected by signature policy") && err.contains("lab/pol"),
        "{err}"
    );
    assert!(!lab.join("b-unsigned/config.json").exists());

    // Another repository falls to the default `reject`.
    let other = push_test_image(&e.reg, "lab/other:v1", 1, &["/bin/sh"]);
    let out = e.pull(&other.reference, &lab.join("b-other"));
    assert!(!out.status.success(), "default reject ignored");

    // Cache hit: every layer is in the store, yet the changed policy is applied.
    fs::write(
        &policy,
        serde_json::json!({"default": [{"type": "reject"}]}).to_string(),
    )
    .unwrap();
    let out = e.pull(&signed, &lab.join("b-again"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "cache hit skipped the policy");
    assert!(err.contains("reject"), "{err}");
    // A policy that cannot be read fails the pull.
    fs::remove_file(&policy).unwrap();
    let out = e.pull(&signed, &lab.join("b-nopolicy"));
    assert!(!out.status.success(), "missing policy accepted");
}

#[test]
fn corrupted_blob_in_registry_is_rejected_and_nothing_left() {
    let lab = Lab::new("puller-corrupt");
    let e = env(&lab, "");
    let img = push_test_image(&e.reg, "lab/corrupt:v1", 1, &["/bin/sh"]);
    let blob = e.reg.blob_path(&img.layer_digests[0]);
    let mut data = fs::read(&blob).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x55;
    fs::write(&blob, &data).unwrap();
    let bundle = lab.join("b");
    let out = e.pull(&img.reference, &bundle);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pull of a corrupted blob succeeded");
    assert!(err.contains("digest mismatch"), "{err}");
    assert!(e.store_is_empty());
    assert!(!bundle.join("config.json").exists());
}

#[test]
fn concurrent_pulls_through_the_server_fetch_each_layer_once() {
    let lab = Lab::new("puller-concurrent");
    let e = env(&lab, "");
    let img = push_test_image(&e.reg, "lab/conc:v1", 3, &["/bin/sh"]);
    let sock = lab.join("cdh.sock");
    integration::chain::serve_on(&lab, &e.cfg, &sock, &[]);
    let client = |bundle: PathBuf, image: String| {
        let sock = sock.clone();
        std::thread::spawn(move || {
            Command::new(bin_path("guest-puller"))
                .args(["client-pull", "--socket"])
                .arg(&sock)
                .arg(&image)
                .arg("--bundle")
                .arg(&bundle)
                .output()
                .unwrap()
        })
    };
    let t1 = client(lab.join("c1"), img.reference.clone());
    let t2 = client(lab.join("c2"), img.reference.clone());
    for t in [t1, t2] {
        let out = t.join().unwrap();
        assert!(
            out.status.success(),
            "client-pull: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            img.manifest_digest
        );
    }
    for d in &img.layer_digests {
        assert_eq!(
            e.reg.blob_gets_of(&img.repo, d),
            1,
            "layer {d} fetched more than once"
        );
    }
    assert!(lab.join("c1/rootfs/etc/hello.txt").exists());
    assert!(lab.join("c2/rootfs/etc/layer3.txt").exists());
    // A bad reference maps to a ttrpc error with a clear message.
    let out = client(lab.join("c3"), format!("{}/lab/absent:nope", e.reg.host()))
        .join()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NOT_FOUND") || err.contains("not found") || err.contains("unknown"),
        "{err}"
    );
    // Unmounting both bundles garbage-collects every layer.
    for b in ["c1", "c2"] {
        run_ok(
            Command::new(bin_path("guest-puller"))
                .args(["unmount", "--config"])
                .arg(&e.cfg)
                .arg("--bundle")
                .arg(lab.join(b)),
        );
    }
    lab.stop("guest-puller");
    assert!(e.store_is_empty());
}

/// Pulls in process, so the test sees the error value and its ttrpc code, not CLI text.
fn pull_in_process(
    cfg: &Path,
    image: &str,
    bundle: &Path,
) -> Result<guest_puller::pull::PullResult, guest_puller::pull::PullError> {
    let cfg = guest_puller::config::Config::from_file(cfg).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let fetcher =
            std::sync::Arc::new(guest_puller::fetcher::KbsResourceFetcher::new(&cfg.kbs).unwrap());
        let p = guest_puller::pull::Puller::new(cfg, fetcher).await.unwrap();
        p.pull_image(image, bundle).await
    })
}

fn code_of(e: &guest_puller::pull::PullError) -> ttrpc::Code {
    guest_puller::api::server::pull_error_code(e)
}

/// No layer and nothing staged (a puller that exited removes its own staging dir).
fn work_is_empty(work: &Path) -> bool {
    let count = |d: &str| fs::read_dir(work.join(d)).map(|r| r.count()).unwrap_or(0);
    count("layers") == 0 && count("staging") == 0
}

/// A gzip layer whose tar holds one file of `size` zero bytes: a few hundred KiB that unpack
/// to `size` bytes.
fn zero_bomb_layer(size: u64) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..5].copy_from_slice(b"zeros");
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| *b as u32).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    let mut tar = h.to_vec();
    tar.resize(512 + size.div_ceil(512) as usize * 512 + 1024, 0);
    tar
}

#[test]
fn gzip_bomb_stops_at_the_work_dirs_free_space_with_resource_exhausted() {
    let lab = Lab::new("puller-bomb");
    // The guest's work dir is a small tmpfs (guest RAM): 48 MiB here, the bomb unpacks to 512 MiB.
    lab.tmpfs("work", "48m");
    let e = env(&lab, "");
    let layout = lab.join("layout");
    let bomb = zero_bomb_layer(512 << 20);
    let top = image_in_layout(&layout, std::slice::from_ref(&bomb), "gzip", "amd64");
    drop(bomb);
    write_index(&layout, "t", top.clone());
    let image = push_layout(&e, &layout, "bomb/zeros:v1", &top);
    let started = std::time::Instant::now();
    let err = pull_in_process(&e.cfg, &image, &lab.join("b")).unwrap_err();
    assert_eq!(code_of(&err), ttrpc::Code::RESOURCE_EXHAUSTED, "{err}");
    assert!(
        err.to_string().contains("free space in the work dir"),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert!(e.store_is_empty(), "the bomb left data in the store");
    assert!(!lab.join("b/config.json").exists());
    // The tmpfs is free again: a real image pulls right after.
    let img = push_test_image(&e.reg, "lab/after-bomb:v1", 1, &["/bin/sh"]);
    pull_in_process(&e.cfg, &img.reference, &lab.join("b2")).unwrap();

    // The configured per-image maximum applies below the free space.
    let cfg = lab.join("small.toml");
    let text = fs::read_to_string(&e.cfg).unwrap().replacen(
        "[image]\n",
        &format!("[image]\nmax_unpacked_image_size = {}\n", 4 << 20),
        1,
    );
    fs::write(&cfg, text).unwrap();
    let work2 = lab.join("work2");
    fs::write(
        &cfg,
        fs::read_to_string(&cfg)
            .unwrap()
            .replace(&e.work.display().to_string(), &work2.display().to_string()),
    )
    .unwrap();
    let err = pull_in_process(&cfg, &image, &lab.join("b3")).unwrap_err();
    assert_eq!(code_of(&err), ttrpc::Code::RESOURCE_EXHAUSTED, "{err}");
    assert!(err.to_string().contains("max_unpacked_image_size"), "{err}");
    assert!(work_is_empty(&work2));
}

#[test]
fn too_many_layers_are_refused_before_any_layer_is_fetched() {
    let lab = Lab::new("puller-layers");
    let e = env(&lab, "");
    let layers: Vec<Vec<u8>> = (0..60)
        .map(|n| {
            let d = lab.join(&format!("l{n}"));
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join(format!("f{n}")), format!("{n}\n")).unwrap();
            tar_dir(&d)
        })
        .collect();
    let layout = lab.join("layout");
    let top = image_in_layout(&layout, &layers, "gzip", "amd64");
    write_index(&layout, "t", top.clone());
    let image = push_layout(&e, &layout, "many/layers:v1", &top);
    let manifest = integration::images::inspect(&e.reg, &image).manifest;
    let digests: Vec<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    let fetched = |e: &Env| {
        digests
            .iter()
            .map(|d| e.reg.blob_gets_of("many/layers", d))
            .sum::<usize>()
    };
    // 60 layer paths do not fit the overlay's one-page mount options.
    let err = pull_in_process(&e.cfg, &image, &lab.join("b")).unwrap_err();
    assert_eq!(code_of(&err), ttrpc::Code::RESOURCE_EXHAUSTED, "{err}");
    assert!(err.to_string().contains("60 layers"), "{err}");
    assert!(err.to_string().contains("page"), "{err}");
    assert_eq!(fetched(&e), 0, "layers were fetched before the refusal");
    // A configured maximum below that is enforced the same way.
    let cfg = lab.join("max.toml");
    let text =
        fs::read_to_string(&e.cfg)
            .unwrap()
            .replacen("[image]\n", "[image]\nmax_layers = 2\n", 1);
    fs::write(&cfg, text).unwrap();
    let three = push_test_image(&e.reg, "lab/three:v1", 3, &["/bin/sh"]);
    let err = pull_in_process(&cfg, &three.reference, &lab.join("b2")).unwrap_err();
    assert_eq!(code_of(&err), ttrpc::Code::RESOURCE_EXHAUSTED, "{err}");
    assert!(err.to_string().contains("max_layers"), "{err}");
    for d in &three.layer_digests {
        assert_eq!(e.reg.blob_gets_of("lab/three", d), 0);
    }
    assert!(e.store_is_empty());
}

#[test]
fn hostile_etc_passwd_in_an_image_fails_fast_and_leaves_no_bundle() {
    let lab = Lab::new("puller-passwd");
    let e = env(&lab, "");
    let secret = lab.join("guest-secret");
    fs::write(&secret, "app:x:4242:4242::/:/bin/sh\n").unwrap();
    for (what, user) in [
        ("symlink", "app"),
        ("fifo", "1000"),
        ("big", "app"),
        ("dir", "app"),
    ] {
        let l = lab.join(&format!("passwd-{what}"));
        fs::create_dir_all(l.join("etc")).unwrap();
        let passwd = l.join("etc/passwd");
        match what {
            "symlink" => std::os::unix::fs::symlink(&secret, &passwd).unwrap(),
            "fifo" => {
                run_ok(Command::new("mkfifo").arg(&passwd));
            }
            "big" => fs::write(&passwd, vec![b'x'; 5 << 20]).unwrap(),
            _ => fs::create_dir(&passwd).unwrap(),
        };
        let layout = lab.join(&format!("layout-{what}"));
        let run = serde_json::json!({"Cmd": ["/bin/sh"], "User": user});
        let top = image_with_config(&layout, &[tar_dir(&l)], "gzip", "amd64", run);
        write_index(&layout, "t", top.clone());
        let image = push_layout(&e, &layout, &format!("passwd/{what}:v1"), &top);
        let bundle = lab.join(&format!("b-{what}"));
        let started = std::time::Instant::now();
        let err = pull_in_process(&e.cfg, &image, &bundle).unwrap_err();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{what}"
        );
        assert_eq!(
            code_of(&err),
            ttrpc::Code::INVALID_ARGUMENT,
            "{what}: {err}"
        );
        assert!(err.to_string().contains("/etc/passwd"), "{what}: {err}");
        assert!(!bundle.join("config.json").exists(), "{what}");
        assert!(
            fs::read_dir(bundle.join("rootfs"))
                .map(|d| d.count())
                .unwrap_or(0)
                == 0,
            "{what}: the overlay is still mounted"
        );
    }
}

#[test]
fn image_pull_proxy_carries_every_registry_request_unless_no_proxy_matches() {
    let lab = Lab::new("puller-proxy");
    let proxy = integration::proxy::ForwardProxy::start();
    let e = env(
        &lab,
        &format!(
            "[image.image_pull_proxy]\nhttp_proxy = \"{}\"\n",
            proxy.url()
        ),
    );
    let img = push_test_image(&e.reg, "lab/proxied:v1", 2, &["/bin/sh"]);
    e.pull_ok(&img.reference, &lab.join("b1"));
    assert!(lab.join("b1/rootfs/bin/sh").exists());
    let seen = proxy.requests();
    let via = |part: &str| seen.iter().any(|r| r.contains(part));
    assert!(
        via(&format!("/v2/{}/manifests/", img.repo)),
        "manifest not fetched through the proxy: {seen:?}"
    );
    assert!(
        via(&img.config_digest),
        "config not through the proxy: {seen:?}"
    );
    for d in &img.layer_digests {
        assert!(via(d), "layer {d} not through the proxy: {seen:?}");
    }

    // A host matching no_proxy is reached directly.
    let direct = lab.join("direct.toml");
    let text = fs::read_to_string(&e.cfg).unwrap().replace(
        &e.work.display().to_string(),
        &lab.join("work2").display().to_string(),
    );
    fs::write(
        &direct,
        format!("{text}no_proxy = \"localhost, 127.0.0.0/8\"\n"),
    )
    .unwrap();
    let before = proxy.requests().len();
    let out = e.pull_with(&direct, &img.reference, &lab.join("b2"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        proxy.requests().len(),
        before,
        "no_proxy host went through the proxy"
    );

    // A dead proxy fails the pull as unavailable; the registry is never tried directly.
    let dead = lab.join("dead.toml");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let text = fs::read_to_string(&e.cfg)
        .unwrap()
        .replace(
            &e.work.display().to_string(),
            &lab.join("work3").display().to_string(),
        )
        .replace(&proxy.url(), &closed_url)
        .replacen("[image]\n", "[image]\nmax_retries = 1\n", 1);
    fs::write(&dead, text).unwrap();
    let err = pull_in_process(&dead, &img.reference, &lab.join("b3")).unwrap_err();
    assert_eq!(code_of(&err), ttrpc::Code::UNAVAILABLE, "{err}");
    assert!(work_is_empty(&lab.join("work3")));
    assert!(!lab.join("b3/config.json").exists());
}
