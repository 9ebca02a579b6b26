//! End to end: an encrypted, signed image pulled through the guestpull snapshotter by an unchanged
//! containerd (host: manifest and config only) and run with runc, with the guest-puller as the
//! local guest doing attestation, key fetch, signature and digest checks, decryption and unpack.

use std::fs;
use std::process::Output;

use std::time::Duration;

use integration::chain::{
    blob_gets_by, blob_traffic, build_images_kbs, build_images_with, catalog_repo,
    cri_pull_and_run, ctr_pull_guestpull, ctr_run_guestpull, find_bytes, GuestSide, OwnerKeys,
    HELLO,
};
use integration::snapshotter_env::cri::CriClient;
use integration::snapshotter_env::{
    cri_body, handler_for, proxy_body, run_through_cri, SnapshotterDaemon, PLUGIN,
};
use integration::{Containerd, ContainerdOpts, ContainerdVersion, Lab, Registry};

/// One host: the image side (registry, KBS, guest-puller, keys) and the snapshotter.
struct World<'a> {
    side: GuestSide<'a>,
    snap: SnapshotterDaemon<'a>,
}

impl<'a> std::ops::Deref for World<'a> {
    type Target = GuestSide<'a>;
    fn deref(&self) -> &GuestSide<'a> {
        &self.side
    }
}

fn world<'a>(lab: &'a Lab, images: &[&str]) -> World<'a> {
    world_built(lab, images, |lab, reg, keys, only| {
        build_images_kbs(lab, reg, keys, only);
    })
}

/// [`world`] with the images built by `build`.
fn world_built<'a>(
    lab: &'a Lab,
    images: &[&str],
    build: impl FnOnce(&Lab, &Registry<'_>, &OwnerKeys, &[&str]),
) -> World<'a> {
    let side = GuestSide::start(lab, images, build);
    let snap = SnapshotterDaemon::start(lab, "");
    World { side, snap }
}

fn containerd<'a>(lab: &'a Lab, w: &World<'_>, v: ContainerdVersion, cri: bool) -> Containerd<'a> {
    let mut body = proxy_body(v, &w.snap.socket(), &w.snap.root());
    if cri {
        body += &cri_body(v, lab, &w.reg);
    }
    Containerd::start_with(
        lab,
        v,
        ContainerdOpts {
            cri,
            env: vec![w.guest.helper_env()],
        },
        &body,
    )
}

fn assert_ran(out: &Output, what: &str, guest_log: &str) {
    assert!(
        out.status.success(),
        "{what}: ctr run failed: {}\n--- guest-puller log ---\n{guest_log}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), HELLO, "{what}");
}

fn assert_no_plaintext(ctrd: &Containerd<'_>, w: &World<'_>) {
    for root in [ctrd.root(), w.snap.root()] {
        if let Some(p) = find_bytes(&root, HELLO.as_bytes()) {
            panic!(
                "plaintext of the image found on the host at {}",
                p.display()
            );
        }
    }
}

#[test]
fn encrypted_signed_image_runs_through_cri_and_ctr_on_every_containerd() {
    for v in ContainerdVersion::all() {
        let lab = Lab::new(&format!("e2e-{}", v.label()));
        let w = world(&lab, &["busybox", "pause"]);
        let repo = catalog_repo(&w.reg, "busybox");
        let image = format!("{repo}:jwe");
        let repo_path = repo.split_once('/').unwrap().1.to_string();
        let ctrd = containerd(&lab, &w, v, true);
        // Building, encrypting and signing the images (skopeo, the owner's containerd, cosign)
        // already read some blobs: counts are against the registry log before the pull.
        let name = format!("e2e-{}", v.label().replace('.', "-"));
        let (_, base) = cri_pull_and_run(&ctrd, &lab, &w.side, &image, handler_for(v), &name);
        let guest = blob_gets_by(&w.reg, &repo_path).1;
        assert!(
            guest - base >= 2,
            "{}: the guest fetched config and layer ({guest})",
            v.label()
        );
        let log = w.guest.log();
        assert!(log.contains("attested to KBS"), "{log}");
        assert!(log.contains("accepted by signature policy"), "{log}");

        // ctr image pull: through the 2.1 transfer service the layers are skipped as well. Both
        // key kinds: JWE (RSA key from the KBS) and KBS-wrapped (KEK fetched by key id).
        if v == ContainerdVersion::V2_1 {
            for variant in ["jwe", "kbs"] {
                let image = format!("{repo}:{variant}");
                let before = blob_gets_by(&w.reg, &repo_path).0;
                ctr_pull_guestpull(&ctrd, &image);
                // The config may already be in the (namespace-shared) content store.
                assert!(
                    blob_gets_by(&w.reg, &repo_path).0 <= before + 1,
                    "ctr pull {variant}: config only"
                );
                let manifest = integration::images::inspect(&w.reg, &image);
                let log = w.reg.log();
                for layer in &manifest.layer_digests {
                    assert!(
                        !log.lines().any(|l| l.contains("\"GET ")
                            && l.contains(layer.as_str())
                            && l.contains("containerd/")),
                        "containerd fetched layer {layer}"
                    );
                }
                let out =
                    ctr_run_guestpull(&ctrd, ctrd.namespace(), &image, &format!("e2e-{variant}"));
                assert_ran(
                    &out,
                    &format!("containerd 2.1 ctr pull {variant}"),
                    &w.guest.log(),
                );
            }
        }
        assert_no_plaintext(&ctrd, &w);
        drop(ctrd);
    }
}

/// Lazy pull through the whole chain: containerd 2.1 pulls a signed nydus image through guestpull
/// with CRI, the pod's container reads one small file, and the guest fetched only the chunks of
/// busybox and that file: the container started long before the image could have downloaded.
#[test]
fn lazy_nydus_image_runs_through_cri_fetching_only_what_it_reads() {
    let lab = Lab::new("e2e-lazy");
    let w = world_built(&lab, &["large", "pause"], |lab, reg, keys, only| {
        build_images_with(lab, reg, keys, only, |cmd| {
            cmd.args(["--nydus", "--large-mb", "256"]);
        });
    });
    let v = ContainerdVersion::V2_1;
    let ctrd = containerd(&lab, &w, v, true);
    let image = format!("{}:nydus", catalog_repo(&w.reg, "large"));
    let mut cri = CriClient::connect(&ctrd.socket()).expect("CRI client");
    cri.pull_image(&image, handler_for(v))
        .unwrap_or_else(|e| panic!("CRI pull of a nydus image: {e}"));
    let manifest = integration::images::inspect(&w.reg, &image);
    let blob = &manifest.layer_digests[0];
    let blob_size = fs::metadata(w.reg.blob_path(blob)).unwrap().len();
    assert_eq!(
        blob_traffic(&w.reg, &manifest.repo, blob),
        (0, 0),
        "nobody read the data blob before the container started"
    );

    let log = run_through_cri(
        &mut cri,
        &lab,
        "e2e-lazy",
        handler_for(v),
        &image,
        &["/bin/cat", "/payload/l2/small.txt"],
    );
    assert_eq!(log.trim(), "small file in layer 2", "{}", w.guest.log());
    let (gets, bytes) = blob_traffic(&w.reg, &manifest.repo, blob);
    eprintln!("lazy container: {gets} blob GETs, {bytes} of {blob_size} blob bytes");
    assert!(gets >= 1, "the reads went to the registry");
    assert!(
        bytes * 20 < blob_size,
        "fetched {bytes} of {blob_size} blob bytes (must be < 5%)"
    );
    assert!(
        w.guest.log().contains("accepted by signature policy"),
        "{}",
        w.guest.log()
    );
    drop(ctrd);
}

/// Each refusal must stop the container with the guest-puller's own message in ctr's error.
#[test]
fn refusals_stop_the_container_with_a_clear_message() {
    let lab = Lab::new("e2e-refusals");
    let w = world(&lab, &["busybox", "layers3"]);
    let v = ContainerdVersion::V2_1;
    let ctrd = containerd(&lab, &w, v, false);
    let image = format!("{}:jwe", catalog_repo(&w.reg, "busybox"));
    ctr_pull_guestpull(&ctrd, &image);
    let expect_failure = |id: &str, image: &str, needles: &[&str]| {
        let out = ctr_run_guestpull(&ctrd, ctrd.namespace(), image, id);
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(!out.status.success(), "{id}: ran although it must not");
        assert!(
            needles.iter().any(|n| err.contains(n)),
            "{id}: ctr's error should carry the guest-puller's reason ({needles:?}):\n{err}"
        );
    };

    // KBS policy denies every resource: no policy, no key.
    w.kbs.set_policy("mode = \"deny-all\"\n");
    expect_failure("deny", &image, &["denied", "deny"]);

    // Key missing from the KBS.
    w.kbs.set_policy("mode = \"allow-all\"\n");
    w.kbs.delete("default/image-key/e2e");
    expect_failure("nokey", &image, &["not found", "missing"]);
    w.kbs.put(
        "default/image-key/e2e",
        &fs::read(w.keys.jwe_private()).unwrap(),
    );

    // Unsigned image under a reject-by-default policy: an image the policy does not name.
    let unsigned = format!("{}/guestpull-unsigned/busybox:latest", w.reg.host());
    integration::lab::run_ok(std::process::Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{}:latest", catalog_repo(&w.reg, "busybox")),
        &format!("docker://{unsigned}"),
    ]));
    ctr_pull_guestpull(&ctrd, &unsigned);
    expect_failure("unsigned", &unsigned, &["reject"]);

    // A layer blob tampered with in the registry's storage.
    let tampered = format!("{}:jwe", catalog_repo(&w.reg, "layers3"));
    ctr_pull_guestpull(&ctrd, &tampered);
    let manifest = integration::images::inspect(&w.reg, &tampered);
    let blob = w.reg.blob_path(manifest.layer_digests.last().unwrap());
    let mut data = fs::read(&blob).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    fs::write(&blob, data).unwrap();
    expect_failure("tampered", &tampered, &["digest", "mismatch", "corrupt"]);

    // And after all that, the good image still runs.
    let out = ctr_run_guestpull(&ctrd, ctrd.namespace(), &image, "after");
    assert_ran(&out, "good image after refusals", &w.guest.log());
    drop(ctrd);
}

#[test]
fn concurrent_containers_and_restarts() {
    let lab = Lab::new("e2e-concurrency");
    let w = world(&lab, &["busybox", "layers3"]);
    let v = ContainerdVersion::V2_1;
    let ctrd = containerd(&lab, &w, v, false);
    let a = format!("{}:jwe", catalog_repo(&w.reg, "busybox"));
    let b = format!("{}:jwe", catalog_repo(&w.reg, "layers3"));
    for img in [&a, &b] {
        ctr_pull_guestpull(&ctrd, img);
    }
    // Two containers of one image and one of another, at once.
    let outs: Vec<(String, Output)> = std::thread::scope(|s| {
        let hs: Vec<_> = [("c1", &a), ("c2", &a), ("c3", &b)]
            .into_iter()
            .map(|(id, img)| {
                let ctrd = &ctrd;
                s.spawn(move || {
                    (
                        id.to_string(),
                        ctr_run_guestpull(ctrd, ctrd.namespace(), img, id),
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (id, out) in &outs {
        assert!(
            out.status.success(),
            "{id}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            w.guest.log()
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with(HELLO),
            "{id}"
        );
    }
    // Same image twice: each layer blob fetched by the guest once.
    let m = integration::images::inspect(&w.reg, &a);
    for l in &m.layer_digests {
        assert_eq!(
            w.reg.blob_gets_of(&m.repo, l),
            1,
            "layer {l} fetched more than once"
        );
    }

    // Restart the snapshotter and the guest-puller: the next run works once containerd's gRPC
    // client has redialled the snapshotter (it backs off after the refused connections).
    w.snap.restart();
    w.guest.restart();
    integration::lab::wait_for(
        "containerd to reconnect to the restarted snapshotter",
        Duration::from_secs(60),
        || {
            ctrd.ctr(&["snapshots", "--snapshotter", PLUGIN, "ls"])
                .status
                .success()
        },
    );
    let out = ctr_run_guestpull(&ctrd, ctrd.namespace(), &a, "after-restart");
    assert_ran(
        &out,
        "after restarting snapshotter and guest-puller",
        &w.guest.log(),
    );
    drop(ctrd);
}

/// Without the local-guest config the host sees only the empty directories the snapshotter
/// handed out: the image is not on the host, so the container cannot start.
#[test]
fn without_local_guest_the_host_sees_empty_directories() {
    let lab = Lab::new("e2e-noguest");
    let w = world(&lab, &["busybox"]);
    let v = ContainerdVersion::V2_1;
    let body = proxy_body(v, &w.snap.socket(), &w.snap.root());
    let ctrd = Containerd::start(&lab, v, &body);
    let image = format!("{}:jwe", catalog_repo(&w.reg, "busybox"));
    let (_, base) = blob_gets_by(&w.reg, "guestpull/busybox");
    ctr_pull_guestpull(&ctrd, &image);
    let out = ctr_run_guestpull(&ctrd, ctrd.namespace(), &image, "empty");
    assert!(
        !out.status.success(),
        "ran without the image content on the host"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no such file") || err.contains("not found"),
        "{err}"
    );
    assert_eq!(
        blob_gets_by(&w.reg, "guestpull/busybox").1,
        base,
        "nobody fetched the layers"
    );
    assert_no_plaintext(&ctrd, &w);
    drop(ctrd);
}
