//! `guestpull-keyprovider` with the real Go ocicrypt (ctr-imgcrypt 1.1.11): an image owner
//! encrypts for the KBS, registers the KEK, and the guest-puller decrypts in the "guest" — via
//! `guest-puller pull` and via the whole containerd → snapshotter → local-guest chain.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use integration::chain::{
    build_images, catalog_repo, ctr_pull_guestpull, ctr_run_guestpull, guest_puller_pull,
    GuestPuller, KbsProcess, OwnerKeys, HELLO,
};
use integration::containerd::lab_cache;
use integration::images::rootfs_tree;
use integration::lab::{bin_path, free_port, run_ok, wait_for};
use integration::snapshotter_env::{proxy_body, SnapshotterDaemon};
use integration::{Containerd, ContainerdOpts, ContainerdVersion, Lab, Registry};

const KID: &str = "kbs:///default/key/e2e";
const KID_PATH: &str = "default/key/e2e";
const PROVIDER_ANNOTATION: &str = "org.opencontainers.image.enc.keys.provider.guestpull";

fn keyprovider() -> PathBuf {
    bin_path("guestpull-keyprovider")
}

fn ctr_imgcrypt() -> PathBuf {
    let p = lab_cache().join("imgcrypt/usr/bin/ctr-imgcrypt");
    if !p.is_file() {
        panic!(
            "ctr-imgcrypt missing at {}: run integration/scripts/fetch-components.sh",
            p.display()
        );
    }
    p
}

/// A containerd 1.6 (the daemon ctr-imgcrypt was SEEN working with) in its own lab, where the
/// image owner encrypts.
struct Owner<'a> {
    ctrd: Containerd<'a>,
    dir: PathBuf,
}

impl<'a> Owner<'a> {
    fn start(lab: &'a Lab) -> Owner<'a> {
        let ctrd = Containerd::start(lab, ContainerdVersion::V1_6, "");
        let dir = lab.join("owner");
        fs::create_dir_all(&dir).unwrap();
        Owner { ctrd, dir }
    }

    /// ctr-imgcrypt with `OCICRYPT_KEYPROVIDER_CONFIG` = `providers` (the key-providers map).
    fn imgcrypt(&self, providers: serde_json::Value, args: &[&str]) -> Output {
        let cfg = self.dir.join("ocicrypt.json");
        fs::write(
            &cfg,
            serde_json::json!({ "key-providers": providers }).to_string(),
        )
        .unwrap();
        Command::new(ctr_imgcrypt())
            .arg("--address")
            .arg(self.ctrd.socket())
            .arg("--namespace")
            .arg(self.ctrd.namespace())
            .args(args)
            .env("OCICRYPT_KEYPROVIDER_CONFIG", &cfg)
            .env("PATH", self.ctrd.path_env())
            .output()
            .expect("running ctr-imgcrypt")
    }

    fn imgcrypt_ok(&self, providers: &serde_json::Value, args: &[&str]) -> String {
        let out = self.imgcrypt(providers.clone(), args);
        assert!(
            out.status.success(),
            "ctr-imgcrypt {args:?} failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Pulls `plain`, encrypts it to `recipient` as `dest` and pushes `dest`.
    fn encrypt_and_push(
        &self,
        providers: &serde_json::Value,
        recipient: &str,
        plain: &str,
        dest: &str,
    ) {
        self.ctrd.ctr_ok(&["images", "pull", "--plain-http", plain]);
        self.imgcrypt_ok(
            providers,
            &[
                "images",
                "encrypt",
                "--recipient",
                recipient,
                "--platform",
                "linux/amd64",
                plain,
                dest,
            ],
        );
        self.imgcrypt_ok(providers, &["images", "push", "--plain-http", dest]);
    }
}

/// ocicrypt's `cmd` entry running our binary on one KEK file.
fn cmd_provider(kek: &Path) -> serde_json::Value {
    serde_json::json!({"guestpull": {"cmd": {
        "path": keyprovider().display().to_string(),
        "args": ["cmd", "--kek-file", kek.display().to_string()]
    }}})
}

fn gen_kek(path: &Path) -> Vec<u8> {
    run_ok(
        Command::new(keyprovider())
            .arg("gen-kek")
            .arg("--out")
            .arg(path),
    );
    let kek = fs::read(path).unwrap();
    assert_eq!(kek.len(), 32);
    kek
}

fn register(kbs: &KbsProcess<'_>, kek: &Path, kid: &str) {
    run_ok(
        Command::new(keyprovider())
            .args([
                "register",
                "--kbs-url",
                &kbs.url(),
                "--kid",
                kid,
                "--kek-file",
            ])
            .arg(kek),
    );
}

/// Every layer of `image` is keyprovider-encrypted with an AnnotationPacket for `kid`.
fn assert_wrapped_for(reg: &Registry<'_>, image: &str, kid: &str) -> Vec<String> {
    let m = integration::images::inspect(reg, image);
    for l in m.manifest["layers"].as_array().unwrap() {
        assert!(
            l["mediaType"].as_str().unwrap().ends_with("+encrypted"),
            "{l}"
        );
        let ann = l["annotations"][PROVIDER_ANNOTATION]
            .as_str()
            .unwrap_or_else(|| panic!("no {PROVIDER_ANNOTATION} on {l}"));
        use base64::Engine;
        let packet: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(ann)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(packet["kid"], kid, "{packet}");
        assert_eq!(packet["wrap_type"], "A256GCM", "{packet}");
    }
    m.layer_digests
}

/// A guest-puller CLI config: plain-HTTP registry, the KBS, the `guestpull` provider name.
fn puller_config(lab: &Lab, name: &str, reg: &Registry<'_>, kbs: &KbsProcess<'_>) -> PathBuf {
    let cfg = lab.join(&format!("{name}.toml"));
    fs::write(
        &cfg,
        format!(
            "[image]\nwork_dir = \"{}\"\nbundle_roots = [\"{}\"]\n\
             [image.registry_config]\ninsecure_registries = [\"{}\"]\n\
             [kbs]\nurl = \"{}\"\n",
            lab.join(&format!("{name}-work")).display(),
            lab.path().display(),
            reg.host(),
            kbs.url()
        ),
    )
    .unwrap();
    cfg
}

fn pull_ok(cfg: &Path, image: &str, bundle: &Path) {
    let out = guest_puller_pull(cfg, image, bundle);
    assert!(
        out.status.success(),
        "guest-puller pull {image} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn store_is_empty(work: &Path) -> bool {
    ["layers", "staging"].iter().all(|d| {
        fs::read_dir(work.join(d))
            .map(|mut r| r.next().is_none())
            .unwrap_or(true)
    })
}

#[test]
fn ctr_imgcrypt_cmd_mode_image_decrypts_in_the_guest_and_runs() {
    Lab::require_root();
    let lab = Lab::new("keyprovider-cmd");
    let owner_lab = Lab::new("keyprovider-cmd-owner");
    let reg = Registry::start(&lab);
    let keys = OwnerKeys::generate(&lab);
    build_images(&lab, &reg, &keys, &["busybox"]);
    let repo = catalog_repo(&reg, "busybox");
    let plain = format!("{repo}:latest");
    let enc = format!("{repo}:kbs");
    let kbs = KbsProcess::start(&lab);

    // The owner: a new KEK, the image encrypted with real ocicrypt through our cmd provider.
    let kek_file = lab.join("kek.bin");
    let kek = gen_kek(&kek_file);
    let owner = Owner::start(&owner_lab);
    let providers = cmd_provider(&kek_file);
    owner.encrypt_and_push(
        &providers,
        &format!("provider:guestpull:{KID}"),
        &plain,
        &enc,
    );
    let enc_layers = assert_wrapped_for(&reg, &enc, KID);
    let plain_layers = integration::images::inspect(&reg, &plain).layer_digests;

    // ocicrypt's own decrypt through `keyunwrap` of our provider restores the original blobs.
    let dec = format!("{repo}:kbs-dec");
    owner.imgcrypt_ok(
        &providers,
        &[
            "images",
            "decrypt",
            "--key",
            "provider:guestpull",
            &enc,
            &dec,
        ],
    );
    owner.imgcrypt_ok(&providers, &["images", "push", "--plain-http", &dec]);
    assert_eq!(
        integration::images::inspect(&reg, &dec).layer_digests,
        plain_layers
    );
    assert_ne!(enc_layers, plain_layers);

    // (c) KEK not in the KBS (not registered yet): the error names the kid, nothing is kept.
    let cfg = puller_config(&lab, "nokey", &reg, &kbs);
    let out = guest_puller_pull(&cfg, &enc, &lab.join("b-nokey"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pulled without the KEK");
    assert!(err.contains(KID), "error should name the key id:\n{err}");
    assert!(
        store_is_empty(&lab.join("nokey-work")),
        "layer store not empty"
    );
    assert!(!lab.join("b-nokey/rootfs/bin").exists());

    // Registered through the admin endpoint: the KBS holds exactly the KEK.
    register(&kbs, &kek_file, KID);
    assert_eq!(
        fs::read(lab.join("kbs-resources").join(KID_PATH)).unwrap(),
        kek
    );

    // (a) guest-puller pull: the same rootfs as the plain image.
    let cfg = puller_config(&lab, "cli", &reg, &kbs);
    pull_ok(&cfg, &enc, &lab.join("b-enc"));
    pull_ok(&cfg, &plain, &lab.join("b-plain"));
    let (a, b) = (
        rootfs_tree(&lab.join("b-enc/rootfs")),
        rootfs_tree(&lab.join("b-plain/rootfs")),
    );
    assert!(!a.is_empty());
    assert_eq!(a, b, "decrypted rootfs differs from the plain image's");
    for b in ["b-enc", "b-plain"] {
        run_ok(
            Command::new(bin_path("guest-puller"))
                .args(["unmount", "--config"])
                .arg(&cfg)
                .arg("--bundle")
                .arg(lab.join(b)),
        );
    }

    // (b) The whole chain: containerd 2.1 pulls through guestpull, ctr run prints the hello line.
    let policy = serde_json::json!({"default": [{"type": "insecureAcceptAnything"}]});
    kbs.put(
        "default/security-policy/kp",
        &serde_json::to_vec(&policy).unwrap(),
    );
    let guest = GuestPuller::start(
        &lab,
        &reg,
        &kbs.url(),
        "kbs:///default/security-policy/kp",
        &[],
    );
    // No provider configuration: `guestpull` is one of the guest-puller's default providers.
    let snap = SnapshotterDaemon::start(&lab, "");
    let v = ContainerdVersion::V2_1;
    let ctrd = Containerd::start_with(
        &lab,
        v,
        ContainerdOpts {
            cri: false,
            env: vec![guest.helper_env()],
        },
        &proxy_body(v, &snap.socket(), &snap.root()),
    );
    ctr_pull_guestpull(&ctrd, &enc);
    let out = ctr_run_guestpull(&ctrd, ctrd.namespace(), &enc, "kp-run");
    assert!(
        out.status.success(),
        "ctr run failed: {}\n--- guest-puller log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        guest.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), HELLO);
    drop(ctrd);
}

#[test]
fn ctr_imgcrypt_grpc_mode_round_trip() {
    Lab::require_root();
    let lab = Lab::new("keyprovider-grpc");
    let owner_lab = Lab::new("keyprovider-grpc-owner");
    let reg = Registry::start(&lab);
    let img = integration::images::push_test_image(&reg, "kp/grpc:plain", 2, &["/bin/sh"]);
    let enc = format!("{}/kp/grpc:kbs", reg.host());
    let kid = "kbs:///owner/key/grpc";

    // The provider serves KEKs from a KBS-shaped directory.
    let keys_dir = lab.join("keys");
    fs::create_dir_all(keys_dir.join("owner/key")).unwrap();
    let kek = gen_kek(&keys_dir.join("owner/key/grpc"));
    let port = free_port();
    let mut cmd = Command::new(keyprovider());
    cmd.args([
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--keys-dir",
    ])
    .arg(&keys_dir);
    lab.spawn("keyprovider", cmd);
    wait_for(
        "guestpull-keyprovider serve",
        std::time::Duration::from_secs(20),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    let providers = serde_json::json!({"guestpull": {"grpc": format!("127.0.0.1:{port}")}});
    let owner = Owner::start(&owner_lab);
    owner.encrypt_and_push(
        &providers,
        &format!("provider:guestpull:{kid}"),
        &img.reference,
        &enc,
    );
    assert_wrapped_for(&reg, &enc, kid);

    // Decrypt through the gRPC UnWrapKey: the original layer blobs come back.
    let dec = format!("{}/kp/grpc:dec", reg.host());
    owner.imgcrypt_ok(
        &providers,
        &[
            "images",
            "decrypt",
            "--key",
            "provider:guestpull",
            &enc,
            &dec,
        ],
    );
    owner.imgcrypt_ok(&providers, &["images", "push", "--plain-http", &dec]);
    assert_eq!(
        integration::images::inspect(&reg, &dec).layer_digests,
        img.layer_digests
    );

    // A recipient whose KEK the provider does not hold fails with the kid in the message.
    let out = owner.imgcrypt(
        providers.clone(),
        &[
            "images",
            "encrypt",
            "--recipient",
            "provider:guestpull:kbs:///owner/key/absent",
            "--platform",
            "linux/amd64",
            &img.reference,
            &format!("{}/kp/grpc:absent", reg.host()),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kbs:///owner/key/absent"), "{err}");

    // And the guest decrypts it with the KEK from the KBS.
    let kbs = KbsProcess::start(&lab);
    kbs.put("owner/key/grpc", &kek);
    let cfg = puller_config(&lab, "grpc", &reg, &kbs);
    pull_ok(&cfg, &enc, &lab.join("b-enc"));
    pull_ok(&cfg, &img.reference, &lab.join("b-plain"));
    assert_eq!(
        rootfs_tree(&lab.join("b-enc/rootfs")),
        rootfs_tree(&lab.join("b-plain/rootfs"))
    );
    for b in ["b-enc", "b-plain"] {
        run_ok(
            Command::new(bin_path("guest-puller"))
                .args(["unmount", "--config"])
                .arg(&cfg)
                .arg("--bundle")
                .arg(lab.join(b)),
        );
    }
}
