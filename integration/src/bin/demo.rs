//! `make demo`: the whole guest-pull chain on one machine, on embedded defaults.
//!
//! Starts a private registry, the test KBS, the guest-puller (as the "local guest" that stands in
//! for the Kata VM on a runc host), the snapshotter and containerd 2.1 under one temporary
//! directory; builds, encrypts and signs an image; pulls it with `ctr image pull --snapshotter
//! guestpull` (the host fetches manifest and config only) and runs it with `ctr run` (the guest
//! attests, fetches the key, verifies and decrypts). Everything is torn down at the end, also on
//! failure or Ctrl-C.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use integration::lab::{bin_path, free_port, run_ok, wait_for};
use integration::snapshotter_env::{proxy_body, SnapshotterDaemon, PLUGIN};
use integration::{Containerd, ContainerdOpts, ContainerdVersion, Lab, Registry};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

struct Steps {
    n: usize,
    start: Instant,
}

impl Steps {
    fn step<T>(&mut self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if INTERRUPTED.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        self.n += 1;
        println!("[{:>2}] {what}", self.n);
        let t = Instant::now();
        let r = f();
        match &r {
            Ok(_) => println!("     ok ({:.2} s)", t.elapsed().as_secs_f64()),
            Err(e) => println!("     FAILED: {e:#}"),
        }
        r
    }
}

fn main() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the demo mounts filesystems and runs containerd: run it as root (make demo)");
        std::process::exit(2);
    }
    let mut steps = Steps {
        n: 0,
        start: Instant::now(),
    };
    let lab = Lab::new("demo");
    println!(
        "guestpull demo: everything lives under {}\n",
        lab.path().display()
    );
    let r = run(&lab, &mut steps);
    println!(
        "\nteardown (daemons stopped, mounts and {} removed)",
        lab.path().display()
    );
    drop(lab);
    match r {
        Ok(()) => println!(
            "demo finished in {:.1} s",
            steps.start.elapsed().as_secs_f64()
        ),
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Counts registry access-log GETs for blobs of `repo` by containerd (host) and by the guest-puller.
fn blob_gets(reg: &Registry<'_>, repo: &str) -> (usize, usize) {
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

fn run(lab: &Lab, steps: &mut Steps) -> Result<()> {
    let version = ContainerdVersion::V2_1;
    let reg = steps.step("registry: Debian's docker-registry on loopback", || {
        let r = Registry::start(lab);
        println!("     listening on {}", r.host());
        Ok(r)
    })?;

    let keys = lab.join("keys");
    let cosign = integration::containerd::lab_cache().join("cosign/usr/bin/cosign");
    steps.step(
        "image owner keys: RSA for layer encryption (JWE), cosign for signing",
        || {
            fs::create_dir_all(&keys)?;
            run_ok(
                Command::new("openssl")
                    .args(["genrsa", "-out"])
                    .arg(keys.join("image.pem"))
                    .arg("2048"),
            );
            run_ok(
                Command::new("openssl")
                    .args(["rsa", "-pubout", "-in"])
                    .arg(keys.join("image.pem"))
                    .arg("-out")
                    .arg(keys.join("image.pub.pem")),
            );
            ensure!(
                cosign.is_file(),
                "cosign missing at {}: run integration/scripts/fetch-components.sh",
                cosign.display()
            );
            run_ok(
                Command::new(&cosign)
                    .current_dir(&keys)
                    .env("COSIGN_PASSWORD", "demo")
                    .args(["generate-key-pair"]),
            );
            Ok(())
        },
    )?;

    let built = lab.join("images.json");
    let image_repo = "guestpull/busybox";
    let image = format!("{}/{image_repo}:jwe", reg.host());
    steps.step("build, encrypt (skopeo, JWE) and sign (cosign) the image", || {
        run_ok(
            Command::new(bin_path("test-images"))
                .env("COSIGN_PASSWORD", "demo")
                .args(["build", "--registry", &reg.host(), "--only", "busybox", "--work-dir"])
                .arg(lab.join("image-build"))
                .arg("--jwe-public-key")
                .arg(keys.join("image.pub.pem"))
                .arg("--cosign-key")
                .arg(keys.join("cosign.key"))
                .arg("--cosign")
                .arg(&cosign)
                .arg("--out")
                .arg(&built),
        );
        println!("     {image}: every layer AES-256-CTR encrypted, key wrapped to the owner's RSA key");
        Ok(())
    })?;

    let kbs_port = free_port();
    let kbs_url = format!("http://127.0.0.1:{kbs_port}");
    steps.step(
        "KBS (test KBS, RCAR 0.4.0): image key, cosign key and signature policy",
        || {
            let res = lab.join("kbs-resources/default");
            for d in ["image-key", "cosign-public-key", "security-policy"] {
                fs::create_dir_all(res.join(d))?;
            }
            fs::copy(keys.join("image.pem"), res.join("image-key/demo"))?;
            fs::copy(keys.join("cosign.pub"), res.join("cosign-public-key/demo"))?;
            let policy = serde_json::json!({
                "default": [{"type": "reject"}],
                "transports": {"docker": {format!("{}/{image_repo}", reg.host()): [{
                    "type": "sigstoreSigned",
                    "keyPath": "kbs:///default/cosign-public-key/demo",
                    "signedIdentity": {"type": "matchRepository"}
                }]}}
            });
            fs::write(
                res.join("security-policy/demo"),
                serde_json::to_vec_pretty(&policy)?,
            )?;
            let mut cmd = Command::new(bin_path("test-kbs"));
            cmd.args(["--listen", &format!("127.0.0.1:{kbs_port}"), "--resources"])
                .arg(lab.join("kbs-resources"));
            lab.spawn("kbs", cmd);
            wait_for("the KBS", Duration::from_secs(20), || {
                std::net::TcpStream::connect(("127.0.0.1", kbs_port)).is_ok()
            });
            println!("     {kbs_url}: policy allows the sample TEE to read default/*");
            Ok(())
        },
    )?;

    let cdh_sock = lab.join("guest/cdh.sock");
    steps.step("guest-puller (local guest: stands in for the Kata VM on this runc host)", || {
        let guest = lab.join("guest");
        fs::create_dir_all(&guest)?;
        let cfg = format!(
            "[image]\nwork_dir = \"{work}\"\nimage_security_policy_uri = \"kbs:///default/security-policy/demo\"\n\
             [image.registry_config]\ninsecure_registries = [\"{reg}\"]\n\
             [kbs]\nurl = \"{kbs_url}\"\n[keys]\njwe_private_keys = [\"kbs:///default/image-key/demo\"]\n\
             [server]\nsocket = \"{sock}\"\n",
            work = guest.join("work").display(),
            reg = reg.host(),
            sock = cdh_sock.display(),
        );
        fs::write(guest.join("guest-puller.toml"), cfg)?;
        let mut cmd = Command::new(bin_path("guest-puller"));
        cmd.arg("serve").arg("--config").arg(guest.join("guest-puller.toml")).env("RUST_LOG", "info");
        lab.spawn("guest-puller", cmd);
        wait_for("the CDH socket", Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&cdh_sock).is_ok()
        });
        println!("     serving CDH ImagePullService on {}", cdh_sock.display());
        Ok(())
    })?;

    let local_guest = lab.join("local-guest.toml");
    let snap = steps.step(
        "guestpull-snapshotter + containerd 2.1 (vanilla, Debian sid build)",
        || {
            fs::write(
                &local_guest,
                format!(
                    "cdh_socket = \"{}\"\nbundle_root = \"{}\"\n",
                    cdh_sock.display(),
                    lab.join("guest/bundles").display()
                ),
            )?;
            Ok(SnapshotterDaemon::start(lab, ""))
        },
    )?;
    let ctrd = Containerd::start_with(
        lab,
        version,
        ContainerdOpts {
            cri: false,
            env: vec![(
                "GUESTPULL_LOCAL_GUEST_CONFIG".into(),
                local_guest.display().to_string(),
            )],
        },
        &proxy_body(version, &snap.socket(), &snap.root()),
    );

    steps.step(&format!("host: ctr image pull --snapshotter {PLUGIN} {image}"), || {
        ctrd.ctr_ok(&["images", "pull", "--plain-http", "--snapshotter", PLUGIN, &image]);
        let (host, _) = blob_gets(&reg, image_repo);
        let content = ctrd.ctr_ok(&["content", "ls", "-q"]);
        let layers = content.lines().filter(|l| !l.trim().is_empty()).count();
        println!("     registry: containerd fetched {host} blob(s) (the config); layer blobs fetched by the host: 0");
        println!("     containerd content store: {layers} blob(s): manifest/index and config only");
        ensure!(host == 1, "the host fetched {host} blobs, expected only the config");
        Ok(())
    })?;

    steps.step("guest: ctr run (the mount helper hands the pull to the guest-puller)", || {
        let out = ctrd.ctr_run(
            &["--snapshotter", PLUGIN, "--annotation", &format!("io.kubernetes.cri.image-name={image}")],
            &image,
            "demo",
            &[],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "ctr run failed: {}\nguest-puller log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                lab.log("guest-puller")
            );
        }
        println!("     container printed: {}", stdout.trim());
        let log = lab.log("guest-puller");
        for (needle, say) in [
            ("attested to KBS", "attested to the KBS (sample TEE evidence, RCAR 0.4.0)"),
            ("accepted by signature policy", "cosign signature verified against the policy from the KBS"),
            ("layer unpacked", "layer fetched, decrypted (key from the KBS), HMAC + digest + diff_id verified, unpacked"),
        ] {
            ensure!(log.contains(needle), "guest-puller log lacks {needle:?}:\n{log}");
            println!("     guest: {say}");
        }
        let (host, guest) = blob_gets(&reg, image_repo);
        println!("     registry: blobs fetched by the host {host}, by the guest {guest}");
        Ok(())
    })?;

    steps.step(
        "host check: no plaintext under containerd's or the snapshotter's state",
        || {
            let needle = b"hello from guestpull test image";
            for root in [ctrd.root(), snap.root()] {
                if let Some(p) = find_bytes(&root, needle)? {
                    bail!("plaintext found on the host at {}", p.display());
                }
            }
            println!("     none: the host held manifest and config only");
            Ok(())
        },
    )?;
    drop(ctrd);
    Ok(())
}

/// The first regular file under `dir` (not following symlinks or crossing into mounts) containing `needle`.
fn find_bytes(dir: &Path, needle: &[u8]) -> Result<Option<std::path::PathBuf>> {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::symlink_metadata(dir)
        .with_context(|| format!("stat {}", dir.display()))?
        .dev();
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
                        return Ok(Some(p));
                    }
                }
            }
        }
    }
    Ok(None)
}
