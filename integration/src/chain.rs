//! The whole guest-pull chain on one host, as the demo and the end-to-end tests run it: image
//! owner keys, catalog images (encrypted and signed with skopeo and cosign), the test KBS, the
//! guest-puller as local guest, and the snapshotter's local-guest mount-helper config.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::containerd::{lab_cache, Containerd, ContainerdVersion};
use crate::lab::{bin_path, free_port, run_ok, wait_for, Lab};
use crate::registry::Registry;
use crate::snapshotter_env::{ctr_ns, PLUGIN};

/// Password of the cosign key the tests generate.
pub const COSIGN_PASSWORD: &str = "guestpull-test";
/// What the catalog images print.
pub const HELLO: &str = "hello from guestpull test image";
/// KBS resource the owner's KEK is registered under; the `:kbs` variants' layer keys name it.
pub const OWNER_KEK_ID: &str = "kbs:///default/key/owner-kek";

/// The image owner's keys: an RSA key pair for JWE layer encryption, a KEK for KBS-wrapped layer
/// keys and a cosign key pair.
pub struct OwnerKeys {
    dir: PathBuf,
}

impl OwnerKeys {
    /// Generates both key pairs under `<lab>/keys`.
    pub fn generate(lab: &Lab) -> OwnerKeys {
        let dir = lab.join("keys");
        fs::create_dir_all(&dir).unwrap();
        crate::lab::rsa_key_pair(&dir.join("image.pem"), &dir.join("image.pub.pem"));
        run_ok(
            Command::new(cosign())
                .current_dir(&dir)
                .env("COSIGN_PASSWORD", COSIGN_PASSWORD)
                .arg("generate-key-pair"),
        );
        run_ok(
            Command::new(bin_path("guestpull-keyprovider"))
                .args(["gen-kek", "--out"])
                .arg(dir.join("kek.bin")),
        );
        OwnerKeys { dir }
    }

    /// RSA private key (PEM) that decrypts the JWE-wrapped layer keys.
    pub fn jwe_private(&self) -> PathBuf {
        self.dir.join("image.pem")
    }

    /// RSA public key (PEM) skopeo encrypts to.
    pub fn jwe_public(&self) -> PathBuf {
        self.dir.join("image.pub.pem")
    }

    /// The 32-byte KEK `guestpull-keyprovider` wraps layer keys with (KBS: [`OWNER_KEK_ID`]).
    pub fn kek(&self) -> PathBuf {
        self.dir.join("kek.bin")
    }

    /// Registers the owner's keys in the test KBS: the JWE private key at `jwe_path` and the KEK
    /// at [`OWNER_KEK_ID`].
    pub fn provision(&self, kbs: &KbsProcess<'_>, jwe_path: &str) {
        kbs.put(jwe_path, &fs::read(self.jwe_private()).unwrap());
        kbs.put(
            OWNER_KEK_ID.trim_start_matches("kbs:///"),
            &fs::read(self.kek()).unwrap(),
        );
    }

    /// cosign private key.
    pub fn cosign_key(&self) -> PathBuf {
        self.dir.join("cosign.key")
    }

    /// cosign public key (PEM).
    pub fn cosign_pub(&self) -> PathBuf {
        self.dir.join("cosign.pub")
    }
}

/// The cosign binary unpacked by fetch-components.sh.
pub fn cosign() -> PathBuf {
    let p = lab_cache().join("cosign/usr/bin/cosign");
    if !p.is_file() {
        panic!(
            "cosign missing at {}: run integration/scripts/fetch-components.sh",
            p.display()
        );
    }
    p
}

/// Builds catalog images `only` with `test-images`, each also as `:jwe` (encrypted to the owner's
/// RSA key) and cosign-signed (plain and encrypted); returns the build manifest.
pub fn build_images(
    lab: &Lab,
    reg: &Registry<'_>,
    keys: &OwnerKeys,
    only: &[&str],
) -> serde_json::Value {
    build_images_with(lab, reg, keys, only, |_| {})
}

/// [`build_images`] plus a `:kbs` variant of each image (layer keys wrapped by the owner's KEK
/// through `guestpull-keyprovider` and ctr-imgcrypt), also cosign-signed. ctr-imgcrypt encrypts
/// through a containerd: the owner's own, in a lab of its own, stopped when done.
pub fn build_images_kbs(
    lab: &Lab,
    reg: &Registry<'_>,
    keys: &OwnerKeys,
    only: &[&str],
) -> serde_json::Value {
    let owner = Lab::new("image-owner");
    let ctrd = Containerd::start(&owner, ContainerdVersion::V1_6, "");
    let imgcrypt = lab_cache().join("imgcrypt/usr/bin/ctr-imgcrypt");
    if !imgcrypt.is_file() {
        panic!(
            "ctr-imgcrypt missing at {}: run integration/scripts/fetch-components.sh",
            imgcrypt.display()
        );
    }
    let path_env = ctrd.path_env();
    let built = build_images_with(lab, reg, keys, only, |cmd| {
        cmd.arg("--kbs-kek")
            .arg(keys.kek())
            .args(["--kbs-kid", OWNER_KEK_ID, "--containerd-address"])
            .arg(ctrd.socket())
            .arg("--ctr-imgcrypt")
            .arg(&imgcrypt)
            .arg("--keyprovider")
            .arg(bin_path("guestpull-keyprovider"))
            .env("PATH", &path_env);
    });
    drop(ctrd);
    built
}

/// Runs `test-images build` for `only` like [`build_images`], with `extra` adding arguments
/// (`--nydus`, `--large-mb`, ...); returns the build manifest.
pub fn build_images_with(
    lab: &Lab,
    reg: &Registry<'_>,
    keys: &OwnerKeys,
    only: &[&str],
    extra: impl FnOnce(&mut Command),
) -> serde_json::Value {
    let out = lab.join("images.json");
    let mut cmd = Command::new(bin_path("test-images"));
    cmd.env("COSIGN_PASSWORD", COSIGN_PASSWORD)
        .args([
            "build",
            "--registry",
            &reg.host(),
            "--only",
            &only.join(","),
            "--work-dir",
        ])
        .arg(lab.join("image-build"))
        .arg("--jwe-public-key")
        .arg(keys.jwe_public())
        .arg("--cosign-key")
        .arg(keys.cosign_key())
        .arg("--cosign")
        .arg(cosign())
        .arg("--out")
        .arg(&out);
    extra(&mut cmd);
    run_ok(&mut cmd);
    serde_json::from_slice(&fs::read(&out).unwrap()).unwrap()
}

/// `<registry>/guestpull/<name>` (the repository `test-images` pushes catalog image `name` to).
pub fn catalog_repo(reg: &Registry<'_>, name: &str) -> String {
    format!("{}/guestpull/{name}", reg.host())
}

/// A policy.json: cosign signatures by `key_uri` required for `scopes`, everything else rejected.
pub fn cosign_policy(scopes: &[String], key_uri: &str) -> serde_json::Value {
    let mut docker = serde_json::Map::new();
    for s in scopes {
        docker.insert(
            s.clone(),
            serde_json::json!([{
                "type": "sigstoreSigned",
                "keyPath": key_uri,
                "signedIdentity": {"type": "matchRepository"}
            }]),
        );
    }
    serde_json::json!({"default": [{"type": "reject"}], "transports": {"docker": docker}})
}

/// The test KBS as a separate process, serving resources from `<lab>/kbs-resources`.
pub struct KbsProcess<'a> {
    lab: &'a Lab,
    port: u16,
    resources: PathBuf,
    policy: PathBuf,
}

impl<'a> KbsProcess<'a> {
    /// Starts `test-kbs` on a free loopback port with an allow-all policy.
    pub fn start(lab: &'a Lab) -> KbsProcess<'a> {
        let k = KbsProcess {
            lab,
            port: free_port(),
            resources: lab.join("kbs-resources"),
            policy: lab.join("kbs-policy.toml"),
        };
        fs::create_dir_all(&k.resources).unwrap();
        k.set_policy("mode = \"allow-all\"\n");
        k
    }

    /// The KBS URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stores resource `repo/type/tag`.
    pub fn put(&self, path: &str, data: &[u8]) {
        let p = self.resources.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    }

    /// Deletes resource `repo/type/tag`.
    pub fn delete(&self, path: &str) {
        fs::remove_file(self.resources.join(path)).unwrap();
    }

    /// Restarts the KBS with `policy` (test-kbs TOML: `mode = "allow-all" | "deny-all" | ...`).
    pub fn set_policy(&self, policy: &str) {
        fs::write(&self.policy, policy).unwrap();
        let mut cmd = Command::new(bin_path("test-kbs"));
        cmd.args([
            "--listen",
            &format!("127.0.0.1:{}", self.port),
            "--resources",
        ])
        .arg(&self.resources)
        .arg("--policy")
        .arg(&self.policy);
        self.lab.spawn("kbs", cmd);
        let port = self.port;
        wait_for("the test KBS", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// Stats of requests served, from the log: (auth, attest) counts.
    pub fn log(&self) -> String {
        self.lab.log("kbs")
    }
}

/// `guest-puller serve` as a CDH on the unix socket `<lab>/cdh.sock`, with the KBS `kbs`, its
/// work dir in the lab and the lab as its bundle root; `env` is added to its environment.
/// Returns the socket once it is bound.
pub fn serve_cdh(lab: &Lab, kbs: &KbsProcess<'_>, env: &[(&str, &str)]) -> PathBuf {
    let cfg = lab.join("guest-puller.toml");
    fs::write(
        &cfg,
        format!(
            "[image]\nwork_dir = \"{}\"\nbundle_roots = [\"{}\"]\n[kbs]\nurl = \"{}\"\n",
            lab.join("work").display(),
            lab.path().display(),
            kbs.url()
        ),
    )
    .unwrap();
    let sock = lab.join("cdh.sock");
    serve_on(lab, &cfg, &sock, env);
    sock
}

/// Starts (or restarts: a running one is SIGKILLed) the lab daemon `guest-puller` as
/// `guest-puller serve --config cfg --socket sock` with `env` added, and waits for its socket
/// (bound only after it has taken over the lazy mounts of an earlier run).
pub fn serve_on(lab: &Lab, cfg: &Path, sock: &Path, env: &[(&str, &str)]) {
    // A killed server leaves its socket file: wait for the new one's.
    let _ = fs::remove_file(sock);
    let mut cmd = Command::new(bin_path("guest-puller"));
    cmd.args(["serve", "--config"])
        .arg(cfg)
        .arg("--socket")
        .arg(sock)
        .envs(env.iter().copied());
    lab.spawn("guest-puller", cmd);
    wait_for("the guest-puller socket", Duration::from_secs(20), || {
        sock.exists()
    });
}

/// The code and message of a ttrpc status error; panics on any other error.
pub fn rpc_status(e: ttrpc::Error) -> (ttrpc::Code, String) {
    match e {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("expected a ttrpc status, got {other:?}"),
    }
}

/// `guest-puller serve` playing the guest, plus the mount-helper config that points at it.
pub struct GuestPuller<'a> {
    lab: &'a Lab,
    config: PathBuf,
    socket: PathBuf,
}

impl<'a> GuestPuller<'a> {
    /// Starts the guest-puller: registry `reg` over plain HTTP, KBS `kbs_url`, the signature policy
    /// and JWE private keys at the given KBS URIs.
    pub fn start(
        lab: &'a Lab,
        reg: &Registry<'_>,
        kbs_url: &str,
        policy_uri: &str,
        jwe_key_uris: &[&str],
    ) -> GuestPuller<'a> {
        let dir = lab.join("guest");
        fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("cdh.sock");
        let keys: Vec<String> = jwe_key_uris.iter().map(|k| format!("\"{k}\"")).collect();
        let config = dir.join("guest-puller.toml");
        fs::write(
            &config,
            format!(
                "[image]\nwork_dir = \"{work}\"\nbundle_roots = [\"{bundles}\"]\n\
                 image_security_policy_uri = \"{policy_uri}\"\n\
                 [image.registry_config]\ninsecure_registries = [\"{reg}\"]\n\
                 [kbs]\nurl = \"{kbs_url}\"\n[keys]\njwe_private_keys = [{keys}]\n\
                 [server]\nsocket = \"{sock}\"\n",
                work = dir.join("work").display(),
                bundles = dir.join("bundles").display(),
                reg = reg.host(),
                keys = keys.join(", "),
                sock = socket.display(),
            ),
        )
        .unwrap();
        fs::write(
            lab.join("local-guest.toml"),
            format!(
                "cdh_socket = \"{}\"\nbundle_root = \"{}\"\ntimeout_secs = 120\n",
                socket.display(),
                dir.join("bundles").display()
            ),
        )
        .unwrap();
        let g = GuestPuller {
            lab,
            config,
            socket,
        };
        g.restart();
        g
    }

    /// (Re)starts the daemon (a running one is SIGKILLed) and waits for its socket.
    pub fn restart(&self) {
        let mut cmd = Command::new(bin_path("guest-puller"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("GUEST_PULLER_LOG", "info");
        let _ = fs::remove_file(&self.socket);
        self.lab.spawn("guest-puller", cmd);
        let sock = self.socket.clone();
        wait_for(
            "the guest-puller's CDH socket",
            Duration::from_secs(20),
            || std::os::unix::net::UnixStream::connect(&sock).is_ok(),
        );
    }

    /// The CDH socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The guest-puller's log.
    pub fn log(&self) -> String {
        self.lab.log("guest-puller")
    }

    /// The environment containerd needs so its mount helper acts as the local guest.
    pub fn helper_env(&self) -> (String, String) {
        (
            "GUESTPULL_LOCAL_GUEST_CONFIG".into(),
            self.lab.join("local-guest.toml").display().to_string(),
        )
    }
}

/// Blob GETs of `repo` in the registry log: (by containerd on the host, by anyone else = the guest).
pub fn blob_gets_by(reg: &Registry<'_>, repo: &str) -> (usize, usize) {
    let needle = format!("\"GET /v2/{repo}/blobs/");
    let mut host = 0;
    let mut guest = 0;
    for l in reg.log().lines().filter(|l| l.contains(&needle)) {
        if l.contains("containerd/") {
            host += 1;
        } else {
            guest += 1;
        }
    }
    (host, guest)
}

/// GETs of blob `digest` in `repo` in the registry log and the bytes they returned (ranged or not).
pub fn blob_traffic(reg: &Registry<'_>, repo: &str, digest: &str) -> (usize, u64) {
    let needle = format!("\"GET /v2/{repo}/blobs/{digest} ");
    let mut n = 0;
    let mut bytes = 0;
    for l in reg.log().lines().filter(|l| l.contains(&needle)) {
        n += 1;
        // ... "GET /v2/... HTTP/1.1" 206 12345 "" "user agent"
        let after = l.split('"').nth(2).unwrap_or("");
        let mut f = after.split_whitespace();
        let _status = f.next();
        bytes += f.next().and_then(|b| b.parse::<u64>().ok()).unwrap_or(0);
    }
    (n, bytes)
}

/// The first regular file under `dir` (same filesystem, no symlinks) that contains `needle`.
pub fn find_bytes(dir: &Path, needle: &[u8]) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::symlink_metadata(dir).ok()?.dev();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            if m.dev() != dev {
                continue;
            }
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                if let Ok(data) = fs::read(&p) {
                    if data.windows(needle.len()).any(|w| w == needle) {
                        return Some(p);
                    }
                }
            }
        }
    }
    None
}

/// `ctr image pull` of `image` through the guestpull snapshotter (plain-HTTP registry).
pub fn ctr_pull_guestpull(ctrd: &Containerd<'_>, image: &str) -> String {
    ctrd.ctr_ok(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        PLUGIN,
        image,
    ])
}

/// `ctr run --rm` of `image` in namespace `ns` through the guestpull snapshotter, with the
/// `io.kubernetes.cri.image-name` annotation the Kata runtimes (and the local guest) take the
/// image from; fifo and runc state stay inside the lab.
pub fn ctr_run_guestpull(ctrd: &Containerd<'_>, ns: &str, image: &str, id: &str) -> Output {
    let fifo = ctrd.dir().join("fifo");
    let runc = ctrd.dir().join("runc");
    ctr_ns(
        ctrd,
        ns,
        &[
            "run",
            "--rm",
            "--fifo-dir",
            fifo.to_str().unwrap(),
            "--runc-root",
            runc.to_str().unwrap(),
            "--snapshotter",
            PLUGIN,
            "--annotation",
            &format!("io.kubernetes.cri.image-name={image}"),
            image,
            id,
        ],
    )
    .output()
    .expect("running ctr")
}

/// `guest-puller pull --config CFG IMAGE --bundle BUNDLE` as a one-shot process (no server).
pub fn guest_puller_pull(cfg: &Path, image: &str, bundle: &Path) -> Output {
    Command::new(bin_path("guest-puller"))
        .args(["pull", "--config"])
        .arg(cfg)
        .arg(image)
        .arg("--bundle")
        .arg(bundle)
        .output()
        .expect("running guest-puller")
}

/// The image side of the chain, shared by every host that pulls: a registry holding the catalog
/// images (encrypted and cosign-signed), the owner's keys, a KBS serving the layer key, the
/// cosign public key and a policy requiring signatures, and the guest-puller as local guest.
pub struct GuestSide<'a> {
    /// The registry the images are in.
    pub reg: Registry<'a>,
    /// The test KBS.
    pub kbs: KbsProcess<'a>,
    /// The guest-puller (local guest).
    pub guest: GuestPuller<'a>,
    /// The image owner's keys.
    pub keys: OwnerKeys,
}

impl<'a> GuestSide<'a> {
    /// KBS URI of the signature policy.
    pub const POLICY_URI: &'static str = "kbs:///default/security-policy/e2e";
    /// KBS URI of the JWE layer key.
    pub const KEY_URI: &'static str = "kbs:///default/image-key/e2e";
    /// KBS URI of the cosign public key the policy names.
    pub const COSIGN_KEY_URI: &'static str = "kbs:///default/cosign-public-key/e2e";

    /// Builds catalog `images` with `build`, provisions the KBS and starts the guest-puller.
    pub fn start(
        lab: &'a Lab,
        images: &[&str],
        build: impl FnOnce(&Lab, &Registry<'_>, &OwnerKeys, &[&str]),
    ) -> GuestSide<'a> {
        Lab::require_root();
        let reg = Registry::start(lab);
        let keys = OwnerKeys::generate(lab);
        build(lab, &reg, &keys, images);
        let kbs = KbsProcess::start(lab);
        // The test KBS stores a resource under its URI's path.
        let path = |uri: &'static str| uri.trim_start_matches("kbs:///");
        keys.provision(&kbs, path(Self::KEY_URI));
        kbs.put(
            path(Self::COSIGN_KEY_URI),
            &fs::read(keys.cosign_pub()).unwrap(),
        );
        let scopes: Vec<String> = images.iter().map(|n| catalog_repo(&reg, n)).collect();
        let policy = cosign_policy(&scopes, Self::COSIGN_KEY_URI);
        kbs.put(
            path(Self::POLICY_URI),
            &serde_json::to_vec(&policy).unwrap(),
        );
        let guest = GuestPuller::start(lab, &reg, &kbs.url(), Self::POLICY_URI, &[Self::KEY_URI]);
        GuestSide {
            reg,
            kbs,
            guest,
            keys,
        }
    }
}

/// The host side of the chain as kubelet drives it on `ctrd`: CRI PullImage of `image` under
/// runtime `handler` (`None`: containerd 1.6, guestpull as the global snapshotter), asserting the
/// host fetched only the config blob and holds no layer; then the container run from the rootfs
/// the guest pulled (through CRI with a handler, with `ctr run` on 1.6, which has no per-runtime
/// snapshotter), asserting it printed [`HELLO`] and containerd still fetched no layer. `name`
/// labels the pod, the container and the failures. Returns the registry's blob GET counts
/// (host, guest) of `image`'s repository from before the pull.
pub fn cri_pull_and_run(
    ctrd: &Containerd<'_>,
    lab: &Lab,
    side: &GuestSide<'_>,
    image: &str,
    handler: Option<&str>,
    name: &str,
) -> (usize, usize) {
    let (reg, guest) = (&side.reg, &side.guest);
    // `<registry>/<repo>:<tag>`: the registry log names the repository.
    let repo = image
        .split_once('/')
        .and_then(|(_, r)| r.rsplit_once(':'))
        .map(|(r, _)| r.to_string())
        .unwrap_or_else(|| panic!("{image}: not <registry>/<repo>:<tag>"));
    let (host0, guest0) = blob_gets_by(reg, &repo);
    let mut cri =
        crate::snapshotter_env::cri::CriClient::connect(&ctrd.socket()).expect("CRI client");
    cri.pull_image(image, handler)
        .unwrap_or_else(|e| panic!("{name}: CRI pull: {e}"));
    let (host, guest_n) = blob_gets_by(reg, &repo);
    assert_eq!(
        (host - host0, guest_n - guest0),
        (1, 0),
        "{name}: the host fetched only the config"
    );
    let content = ctr_ns(ctrd, "k8s.io", &["content", "ls", "-q"])
        .output()
        .unwrap();
    let content = String::from_utf8_lossy(&content.stdout).to_string();
    for layer in &crate::images::inspect(reg, image).layer_digests {
        assert!(
            !content.contains(layer),
            "{name}: layer blob {layer} in containerd's content store"
        );
    }
    match handler {
        None => {
            let out = ctr_run_guestpull(ctrd, "k8s.io", image, name);
            assert!(
                out.status.success(),
                "{name}: ctr run failed: {}\n--- guest-puller log ---\n{}",
                String::from_utf8_lossy(&out.stderr),
                guest.log()
            );
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), HELLO, "{name}");
        }
        Some(_) => {
            let log =
                crate::snapshotter_env::run_through_cri(&mut cri, lab, name, handler, image, &[]);
            assert_eq!(log.trim(), HELLO, "{name}\n{}", guest.log());
        }
    }
    assert_eq!(
        blob_gets_by(reg, &repo).0 - host0,
        1,
        "{name}: layers fetched by containerd"
    );
    (host0, guest0)
}
