//! `make demo`: the whole guest-pull chain on one machine, on embedded defaults.
//!
//! Starts a private registry, the test KBS, the guest-puller (as the "local guest" that stands in
//! for the Kata VM on a runc host), the snapshotter and containerd 2.1 under one temporary
//! directory; builds, encrypts and signs an image; pulls it with `ctr image pull --snapshotter
//! guestpull` (the host fetches manifest and config only) and runs it with `ctr run` (the guest
//! attests, fetches the key, verifies and decrypts). Everything is torn down at the end, also on
//! failure or Ctrl-C.

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, ensure, Result};
use integration::chain::{
    blob_gets_by, build_images, catalog_repo, cosign_policy, find_bytes, GuestPuller, KbsProcess,
    OwnerKeys, HELLO,
};
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

fn run(lab: &Lab, steps: &mut Steps) -> Result<()> {
    let version = ContainerdVersion::V2_1;
    let reg = steps.step("registry: Debian's docker-registry on loopback", || {
        let r = Registry::start(lab);
        println!("     listening on {}", r.host());
        Ok(r)
    })?;
    let keys = steps.step(
        "image owner keys: RSA for layer encryption (JWE), cosign for signing",
        || Ok(OwnerKeys::generate(lab)),
    )?;
    let repo = catalog_repo(&reg, "busybox");
    let image = format!("{repo}:jwe");
    steps.step("build, encrypt (skopeo, JWE) and sign (cosign) the image", || {
        build_images(lab, &reg, &keys, &["busybox"]);
        println!("     {image}: every layer AES-256-CTR encrypted, key wrapped to the owner's RSA key");
        Ok(())
    })?;
    let kbs = steps.step(
        "KBS (test KBS, RCAR 0.4.0): image key, cosign key and signature policy",
        || {
            let kbs = KbsProcess::start(lab);
            kbs.put("default/image-key/demo", &fs::read(keys.jwe_private())?);
            kbs.put(
                "default/cosign-public-key/demo",
                &fs::read(keys.cosign_pub())?,
            );
            let policy = cosign_policy(
                std::slice::from_ref(&repo),
                "kbs:///default/cosign-public-key/demo",
            );
            kbs.put(
                "default/security-policy/demo",
                &serde_json::to_vec_pretty(&policy)?,
            );
            println!(
                "     {}: serves the key, the cosign public key and the policy to attested guests",
                kbs.url()
            );
            Ok(kbs)
        },
    )?;
    let guest = steps.step(
        "guest-puller (local guest: stands in for the Kata VM on this runc host)",
        || {
            let g = GuestPuller::start(
                lab,
                &reg,
                &kbs.url(),
                "kbs:///default/security-policy/demo",
                &["kbs:///default/image-key/demo"],
            );
            println!(
                "     serving CDH ImagePullService on {}",
                g.socket().display()
            );
            Ok(g)
        },
    )?;
    let (snap, ctrd) = steps.step(
        "guestpull-snapshotter + containerd 2.1 (vanilla, Debian sid build)",
        || {
            let snap = SnapshotterDaemon::start(lab, "");
            let ctrd = Containerd::start_with(
                lab,
                version,
                ContainerdOpts {
                    cri: false,
                    env: vec![guest.helper_env()],
                },
                &proxy_body(version, &snap.socket(), &snap.root()),
            );
            Ok((snap, ctrd))
        },
    )?;

    steps.step(&format!("host: ctr image pull --snapshotter {PLUGIN} {image}"), || {
        ctrd.ctr_ok(&["images", "pull", "--plain-http", "--snapshotter", PLUGIN, &image]);
        let (host, _) = blob_gets_by(&reg, repo.split_once('/').unwrap().1);
        let content = ctrd.ctr_ok(&["content", "ls", "-q"]);
        let blobs = content.lines().filter(|l| !l.trim().is_empty()).count();
        println!("     registry: containerd fetched {host} blob(s) (the config); layer blobs fetched by the host: 0");
        println!("     containerd content store: {blobs} blob(s): manifest and config only");
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
        if !out.status.success() {
            bail!(
                "ctr run failed: {}\nguest-puller log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                guest.log()
            );
        }
        println!("     container printed: {}", String::from_utf8_lossy(&out.stdout).trim());
        let log = guest.log();
        for (needle, say) in [
            ("attested to KBS", "attested to the KBS (sample TEE evidence, RCAR 0.4.0)"),
            ("accepted by signature policy", "cosign signature verified against the policy from the KBS"),
            ("layer unpacked", "layer fetched, decrypted (key from the KBS), HMAC + digest + diff_id verified, unpacked"),
        ] {
            ensure!(log.contains(needle), "guest-puller log lacks {needle:?}:\n{log}");
            println!("     guest: {say}");
        }
        let (host, guest_gets) = blob_gets_by(&reg, repo.split_once('/').unwrap().1);
        println!("     registry: blobs fetched by the host {host}, by the guest {guest_gets}");
        Ok(())
    })?;

    steps.step(
        "host check: no plaintext under containerd's or the snapshotter's state",
        || {
            for root in [ctrd.root(), snap.root()] {
                if let Some(p) = find_bytes(&root, HELLO.as_bytes()) {
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
