//! End-to-end tests of guestpull-snapshotter with real containerd 1.6, 1.7 and 2.1,
//! a real registry and runc. Needs root, `cargo build --workspace --bins` first, and
//! the components from integration/scripts/fetch-components.sh.
//!
//! How each path reaches the snapshotter (reference §3.1, §3.5, lab.md §5):
//! - CRI PullImage (all versions; 1.6 via the global snapshotter, 1.7/2.1 via a runtime
//!   handler) uses containerd's unpacker: layer Prepares carry `snapshot.ref` + cri.*
//!   labels, we answer AlreadyExists, no layer blob is fetched.
//! - `ctr image pull` on 2.1 uses the transfer service: `snapshot.ref` only, no blob fetched.
//! - `ctr image pull` on 1.6/1.7 and `ctr pull --local` on 2.1 fetch every blob and unpack
//!   WITHOUT labels (`image.Unpack`): that is how a plain (runc) image gets real layers.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use integration::lab::wait_for;
use integration::snapshotter_env::cri::CriClient;
use integration::snapshotter_env::*;
use integration::{
    push_test_image, Containerd, ContainerdOpts, ContainerdVersion, Lab, PushedImage, Registry,
};
use snapshotter::volume::{KataVirtualVolume, KATA_VOLUME_OPTION_PREFIX};

const CRI_NS: &str = "k8s.io";
const REPO: &str = "lab/busybox";

fn image(reg: &Registry<'_>) -> PushedImage {
    push_test_image(
        reg,
        "lab/busybox:3layer",
        3,
        &["/bin/sh", "-c", "cat /etc/layer3.txt"],
    )
}

fn start_cri<'a>(
    lab: &'a Lab,
    v: ContainerdVersion,
    reg: &Registry<'_>,
    snap: &SnapshotterDaemon<'_>,
) -> Containerd<'a> {
    let body = format!(
        "{}{}",
        cri_body(v, lab, reg),
        proxy_body(v, &snap.socket(), &snap.root())
    );
    Containerd::start_with(
        lab,
        v,
        ContainerdOpts {
            cri: true,
            ..Default::default()
        },
        &body,
    )
}

fn layer_gets(reg: &Registry<'_>, img: &PushedImage) -> usize {
    img.layer_digests
        .iter()
        .map(|d| reg.blob_gets_of(REPO, d))
        .sum()
}

/// The committed guest-pull markers of the image in `ns`, bottom to top.
fn markers(ctrd: &Containerd<'_>, ns: &str) -> Vec<(String, BTreeMap<String, String>)> {
    let rows = list_snapshots(ctrd, ns);
    let mut out: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    // Walk from the root (empty parent) upward.
    let mut parent = String::new();
    while let Some(r) = rows
        .iter()
        .find(|r| r.parent == parent && r.kind == "Committed")
    {
        out.push((r.key.clone(), snapshot_labels(ctrd, ns, &r.key)));
        parent = r.key.clone();
    }
    out
}

fn assert_no_layer_content(ctrd: &Containerd<'_>, ns: &str, img: &PushedImage) {
    let content = integration::lab::run_ok(&mut ctr_ns(ctrd, ns, &["content", "ls"]));
    let blobs: Vec<&str> = content
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        !blobs.is_empty(),
        "manifest and config are in the content store:\n{content}"
    );
    for d in &img.layer_digests {
        assert!(
            !blobs.contains(&d.as_str()),
            "layer blob {d} is in the content store:\n{content}"
        );
    }
}

/// Prepares a container snapshot on `top` and checks the mount against every rule the
/// Kata Go runtime and runtime-rs apply; returns the decoded volume.
fn check_container_mount(
    ctrd: &Containerd<'_>,
    ns: &str,
    key: &str,
    top: &str,
) -> KataVirtualVolume {
    integration::lab::run_ok(&mut ctr_ns(
        ctrd,
        ns,
        &["snapshots", "--snapshotter", PLUGIN, "prepare", key, top],
    ));
    let (ty, source, opts) = snapshot_mount(ctrd, ns, key);
    // Go runtime IsNydusRootFSType: "fuse." + path whose base starts with nydus-overlayfs.
    let helper = ty.strip_prefix("fuse.").expect("fuse.* mount type");
    assert!(
        Path::new(helper)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("nydus-overlayfs"),
        "{ty}"
    );
    assert_eq!(source, "overlay");
    for k in ["workdir=", "upperdir=", "lowerdir="] {
        let v = opts
            .iter()
            .find_map(|o| o.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {opts:?}"));
        for p in v.split(':') {
            assert!(Path::new(p).is_dir(), "{k}{p} is not a directory");
        }
    }
    let vols: Vec<&String> = opts
        .iter()
        .filter(|o| o.starts_with(KATA_VOLUME_OPTION_PREFIX))
        .collect();
    assert_eq!(vols.len(), 1, "exactly one Kata volume option: {opts:?}");
    // Decode + validate (Go IsValid, Go shim image_pull.metadata, runtime-rs source).
    let vol = KataVirtualVolume::from_mount_option(vols[0]).unwrap();
    assert_eq!(vol.volume_type, "image_guest_pull");
    assert!(!vol.source.is_empty());
    assert!(vol.image_pull.is_some());
    // Deterministic: asking again yields identical bytes.
    let (_, _, again) = snapshot_mount(ctrd, ns, key);
    assert_eq!(opts, again);
    vol
}

fn cleanup_all(
    ctrd: &Containerd<'_>,
    ns: &str,
    snap: &SnapshotterDaemon<'_>,
    image_ref: &str,
    container_key: &str,
) {
    integration::lab::run_ok(&mut ctr_ns(
        ctrd,
        ns,
        &["snapshots", "--snapshotter", PLUGIN, "rm", container_key],
    ));
    integration::lab::run_ok(&mut ctr_ns(
        ctrd,
        ns,
        &["images", "rm", "--sync", image_ref],
    ));
    wait_for(
        "containerd GC to remove every guestpull snapshot and directory",
        Duration::from_secs(30),
        || {
            // GC runs asynchronously after rm; `content prune`-free: only snapshots matter.
            let _ = ctr_ns(ctrd, ns, &["images", "ls"]).output();
            list_snapshots(ctrd, ns).is_empty() && snap.snapshot_dirs().is_empty()
        },
    );
}

fn cri_guest_pull(v: ContainerdVersion) {
    Lab::require_root();
    let lab = Lab::new(&format!("snap-cri-{}", v.label()));
    let reg = Registry::start(&lab);
    let img = image(&reg);
    let snap = SnapshotterDaemon::start(&lab, "strict = true");
    let ctrd = start_cri(&lab, v, &reg, &snap);
    let mut cri = CriClient::connect(&ctrd.socket()).unwrap();
    cri.pull_image(&img.reference, handler_for(v))
        .unwrap_or_else(|e| panic!("CRI pull on {}: {e}\n{}", v.label(), ctrd.log()));
    if v != ContainerdVersion::V1_6 {
        assert!(
            ctrd.log().contains("using snapshotter guestpull")
                || ctrd.log().contains("snapshotter=guestpull"),
            "the runtime handler did not select guestpull:\n{}",
            ctrd.log()
        );
    }
    assert_eq!(
        layer_gets(&reg, &img),
        0,
        "layer blobs were fetched:\n{}",
        reg.log()
    );
    assert_no_layer_content(&ctrd, CRI_NS, &img);
    let m = markers(&ctrd, CRI_NS);
    assert_eq!(m.len(), 3, "three committed layers: {m:?}");
    for (i, (_, labels)) in m.iter().enumerate() {
        assert_eq!(
            labels.get(PROXY_LABEL).map(String::as_str),
            Some("true"),
            "{labels:?}"
        );
        assert_eq!(
            labels["containerd.io/snapshot/cri.layer-digest"],
            img.layer_digests[i]
        );
        assert_eq!(
            labels["containerd.io/snapshot/cri.manifest-digest"],
            img.manifest_digest
        );
        assert_eq!(
            labels["containerd.io/snapshot/cri.image-ref"],
            img.reference
        );
    }
    assert!(
        snap.log().contains("cri.layer-digest"),
        "Prepare labels are logged"
    );
    let vol = check_container_mount(&ctrd, CRI_NS, "ctr-rootfs", &m[2].0);
    let rss = snap.rss_kib();
    eprintln!(
        "snapshotter RSS after pull + container on {}: {rss} KiB",
        v.label()
    );
    assert!(
        rss < 20 * 1024,
        "daemon RSS {rss} KiB exceeds the 20 MiB budget"
    );
    assert_eq!(
        vol.source, img.reference,
        "real image reference from the chain"
    );
    let md = vol.image_pull.unwrap().metadata;
    assert_eq!(
        md["containerd.io/snapshot/cri.manifest-digest"],
        img.manifest_digest
    );
    assert_eq!(
        md["io.guestpull.layer-digests"],
        img.layer_digests.join(",")
    );
    // Removal + GC: Remove and Cleanup leave nothing behind.
    cri.remove_image(&img.reference).unwrap();
    integration::lab::run_ok(&mut ctr_ns(
        &ctrd,
        CRI_NS,
        &["snapshots", "--snapshotter", PLUGIN, "rm", "ctr-rootfs"],
    ));
    wait_for(
        "GC of the guest-pulled image",
        Duration::from_secs(30),
        || list_snapshots(&ctrd, CRI_NS).is_empty() && snap.snapshot_dirs().is_empty(),
    );
}

#[test]
fn cri_guest_pull_containerd_1_6() {
    cri_guest_pull(ContainerdVersion::V1_6);
}
#[test]
fn cri_guest_pull_containerd_1_7() {
    cri_guest_pull(ContainerdVersion::V1_7);
}
#[test]
fn cri_guest_pull_containerd_2_1() {
    cri_guest_pull(ContainerdVersion::V2_1);
}

/// `ctr image pull --snapshotter guestpull` through 2.1's transfer service: no layer blob.
#[test]
fn ctr_transfer_pull_skips_layers_containerd_2_1() {
    with_proxy_lab("snap-ctr-2.1", |reg, img, snap, ctrd| {
        transfer_pull_skips_layers(reg, img, snap, ctrd)
    });
}

/// A registry with the test image, the snapshotter and containerd 2.1 using it as a proxy
/// plugin (no CRI), all in lab `name`.
fn with_proxy_lab(
    name: &str,
    test: impl FnOnce(&Registry<'_>, &PushedImage, &SnapshotterDaemon<'_>, &Containerd<'_>),
) {
    Lab::require_root();
    let v = ContainerdVersion::V2_1;
    let lab = Lab::new(name);
    let reg = Registry::start(&lab);
    let img = image(&reg);
    let snap = SnapshotterDaemon::start(&lab, "");
    let ctrd = Containerd::start(&lab, v, &proxy_body(v, &snap.socket(), &snap.root()));
    test(&reg, &img, &snap, &ctrd);
}

fn transfer_pull_skips_layers(
    reg: &Registry<'_>,
    img: &PushedImage,
    snap: &SnapshotterDaemon<'_>,
    ctrd: &Containerd<'_>,
) {
    let ns = ctrd.namespace().to_string();
    integration::chain::ctr_pull_guestpull(ctrd, &img.reference);
    assert_eq!(
        layer_gets(reg, img),
        0,
        "layer blobs were fetched:\n{}",
        reg.log()
    );
    assert_no_layer_content(ctrd, &ns, img);
    let m = markers(ctrd, &ns);
    assert_eq!(m.len(), 3, "{m:?}");
    assert!(m
        .iter()
        .all(|(_, l)| l.get(PROXY_LABEL).map(String::as_str) == Some("true")));
    let vol = check_container_mount(ctrd, &ns, "c1", &m[2].0);
    // exports.enable_remote_snapshot_annotations = "true" makes the transfer service add cri.* labels.
    assert_eq!(vol.source, img.reference);
    cleanup_all(ctrd, &ns, snap, &img.reference, "c1");
}

/// `ctr image pull` that unpacks without labels (`--local` on 2.1: no transfer service), so
/// the layers are plain, with real content in their directories.
fn pull_plain(ctrd: &Containerd<'_>, v: ContainerdVersion, image: &str) {
    let mut pull = vec!["images", "pull", "--plain-http", "--snapshotter", PLUGIN];
    if v == ContainerdVersion::V2_1 {
        pull.push("--local");
    }
    pull.push(image);
    ctrd.ctr_ok(&pull);
}

/// A plain image (label-less unpack) through the same snapshotter runs with runc.
fn plain_runc(v: ContainerdVersion) {
    Lab::require_root();
    Lab::require_cmd("mount.fuse", "fuse3");
    let lab = Lab::new(&format!("snap-runc-{}", v.label()));
    let reg = Registry::start(&lab);
    let img = image(&reg);
    let snap = SnapshotterDaemon::start(&lab, "");
    let ctrd = Containerd::start(&lab, v, &proxy_body(v, &snap.socket(), &snap.root()));
    let ns = ctrd.namespace().to_string();
    pull_plain(&ctrd, v, &img.reference);
    let rows = list_snapshots(&ctrd, &ns);
    assert_eq!(rows.len(), 3, "{rows:?}");
    for r in &rows {
        assert!(
            !snapshot_labels(&ctrd, &ns, &r.key).contains_key(PROXY_LABEL),
            "{} is a marker",
            r.key
        );
    }
    assert_eq!(
        snap.snapshot_dirs().len(),
        3,
        "plain layers own real directories"
    );
    let out = ctrd.ctr_run(
        &["--snapshotter", PLUGIN],
        &img.reference,
        &format!("plain-{}", v.label().replace('.', "")),
        &[],
    );
    assert!(
        out.status.success(),
        "ctr run on {}: {}\nsnapshotter log:\n{}",
        v.label(),
        String::from_utf8_lossy(&out.stderr),
        snap.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "layer 3\n");
    ctrd.ctr_ok(&["images", "rm", "--sync", &img.reference]);
    wait_for("GC of the plain image", Duration::from_secs(30), || {
        list_snapshots(&ctrd, &ns).is_empty() && snap.snapshot_dirs().is_empty()
    });
}

#[test]
fn plain_image_runs_with_runc_containerd_1_6() {
    plain_runc(ContainerdVersion::V1_6);
}
#[test]
fn plain_image_runs_with_runc_containerd_1_7() {
    plain_runc(ContainerdVersion::V1_7);
}
#[test]
fn plain_image_runs_with_runc_containerd_2_1() {
    plain_runc(ContainerdVersion::V2_1);
}

/// Pulls, retrying only `Unavailable` for up to 60 s: after the snapshotter restarts,
/// containerd's gRPC client redials the proxy with backoff (kubelet retries the same way).
fn pull_retrying(
    cri: &mut CriClient,
    image: &str,
    handler: Option<&str>,
    snap: &SnapshotterDaemon<'_>,
    what: &str,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match cri.pull_image(image, handler) {
            Ok(_) => return,
            Err(e)
                if e.code() == tonic::Code::Unavailable && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(500))
            }
            Err(e) => panic!("{what}: {e}\n{}", snap.log()),
        }
    }
}

/// kill -9 during a pull, restart of containerd, and a wiped snapshotter state.
fn faults(v: ContainerdVersion) {
    Lab::require_root();
    let lab = Lab::new(&format!("snap-faults-{}", v.label()));
    let reg = Registry::start(&lab);
    let img = image(&reg);
    let snap = SnapshotterDaemon::start(&lab, "");
    let ctrd = start_cri(&lab, v, &reg, &snap);
    let handler = handler_for(v);

    // 1. kill -9 the snapshotter while a pull is in flight, restart it, retry.
    let sock = ctrd.socket();
    let reference = img.reference.clone();
    let puller = std::thread::spawn(move || {
        let mut c = CriClient::connect(&sock).unwrap();
        c.pull_image(&reference, handler).map_err(|e| e.to_string())
    });
    std::thread::sleep(Duration::from_millis(30));
    snap.kill9();
    let first = puller.join().unwrap();
    snap.restart();
    let mut cri = CriClient::connect(&ctrd.socket()).unwrap();
    pull_retrying(
        &mut cri,
        &img.reference,
        handler,
        &snap,
        &format!("retry after kill -9 (first attempt: {first:?})"),
    );
    assert_eq!(markers(&ctrd, CRI_NS).len(), 3);

    // 2. restart containerd: state on both sides still agrees.
    ctrd.restart();
    let mut cri = CriClient::connect(&ctrd.socket()).unwrap();
    cri.pull_image(&img.reference, handler).unwrap();
    let m = markers(&ctrd, CRI_NS);
    assert_eq!(m.len(), 3);
    check_container_mount(&ctrd, CRI_NS, "after-restart", &m[2].0);

    // 3. wipe the snapshotter's state: the next pull and container self-heal. containerd
    //    only Stats the chain IDs its meta.db holds and never resends their labels, so the
    //    volume has no image reference and no digests (README: "Damaged or lost state").
    snap.wipe_state();
    snap.restart();
    pull_retrying(&mut cri, &img.reference, handler, &snap, "pull after wipe");
    let vol = check_container_mount(&ctrd, CRI_NS, "after-wipe", &m[2].0);
    assert_eq!(
        vol.source,
        snapshotter::config::DEFAULT_UNKNOWN_IMAGE_SOURCE,
        "as documented"
    );
    let md = vol.image_pull.unwrap().metadata;
    assert!(
        !md.contains_key("io.guestpull.layer-digests")
            && !md.contains_key("containerd.io/snapshot/cri.image-ref"),
        "no partial or stale image data: {md:?}"
    );
    assert!(
        snap.log()
            .contains("recreated it as a committed guest-pull marker"),
        "self-heal is logged"
    );
    assert_eq!(
        layer_gets(&reg, &img),
        0,
        "no layer blob fetched in any of this:\n{}",
        reg.log()
    );
}

#[test]
fn faults_containerd_1_6() {
    faults(ContainerdVersion::V1_6);
}
#[test]
fn faults_containerd_1_7() {
    faults(ContainerdVersion::V1_7);
}
#[test]
fn faults_containerd_2_1() {
    faults(ContainerdVersion::V2_1);
}

/// The shipped containerd configs lint clean with the real binary.
#[test]
fn check_containerd_config_cli() {
    let bin = integration::bin_path("guestpull-snapshotter");
    let cfg_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    for (f, ver) in [
        ("containerd-1.6.toml", "1.6"),
        ("containerd-1.7.toml", "1.7"),
        ("containerd-2.x.toml", "2.x"),
    ] {
        let out = std::process::Command::new(&bin)
            .args(["check-containerd-config", "--containerd-version", ver])
            .arg(cfg_dir.join(f))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let lab = Lab::new("snap-lint");
    let bad = lab.join("bad.toml");
    std::fs::write(
        &bad,
        "version = 2\n[proxy_plugins.guestpull]\ntype = \"snapshot\"\naddress = \"/x\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(&bin)
        .args(["check-containerd-config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("disable_snapshot_annotations = false"));
}

/// Socket handling like production daemons: 0700 dir, stale socket replaced, a
/// non-socket never deleted, SIGTERM shuts down gracefully and removes the socket.
#[test]
fn daemon_socket_lifecycle() {
    Lab::require_root();
    let lab = Lab::new("snap-daemon");
    let snap = SnapshotterDaemon::start(&lab, "");
    use std::os::unix::fs::PermissionsExt;
    let dir_mode = std::fs::metadata(snap.socket().parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    // kill -9 leaves a stale socket behind; a restart replaces it.
    snap.kill9();
    assert!(snap.socket().exists());
    snap.restart();
    assert!(snap.log().contains("removed stale socket"));
    // SIGTERM: graceful stop, socket removed.
    snap.stop();
    assert!(!snap.socket().exists(), "socket removed on SIGTERM");
    assert!(snap.log().contains("SIGTERM received"));
    // A regular file at the address is an error and is left alone.
    std::fs::write(snap.socket(), "not a socket").unwrap();
    let out = std::process::Command::new(integration::bin_path("guestpull-snapshotter"))
        .arg("--config")
        .arg(lab.join("snap/snapshotter.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a socket"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(snap.socket()).unwrap(),
        "not a socket"
    );
}

/// The helper alone, as mount.fuse runs it: drops the Kata/extra options and mounts a
/// real overlay even when the options are longer than a page (chdir + relative paths).
#[test]
fn nydus_overlayfs_helper_mounts_long_option_strings() {
    Lab::require_root();
    let lab = Lab::new("snap-helper");
    let base = lab.join("snapshots");
    let mut lowers = Vec::new();
    for i in 1..=80 {
        let d = base.join(format!("{i}/fs"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("f{i}")), format!("{i}")).unwrap();
        lowers.push(d.display().to_string());
    }
    lowers.reverse(); // nearest layer first
    for d in ["up/fs", "up/work"] {
        std::fs::create_dir_all(base.join(d)).unwrap();
    }
    let target = lab.join("mnt");
    std::fs::create_dir_all(&target).unwrap();
    let vol = KataVirtualVolume::guest_pull("img", BTreeMap::new()).to_mount_option();
    let opts = format!(
        "rw,nodev,workdir={b}/up/work,upperdir={b}/up/fs,lowerdir={l},{vol},extraoption=xyz",
        b = base.display(),
        l = lowers.join(":")
    );
    assert!(opts.len() > 4096, "option string longer than a page");
    let out = std::process::Command::new(integration::bin_path("nydus-overlayfs"))
        .args(["overlay"])
        .arg(&target)
        .args(["-o", &opts])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mounted = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mounted
        .lines()
        .find(|l| l.contains(&*target.to_string_lossy()))
        .expect("overlay is mounted");
    assert!(line.contains(" - overlay "), "{line}");
    assert!(line.contains("nodev"), "{line}");
    assert_eq!(std::fs::read_to_string(target.join("f1")).unwrap(), "1");
    assert_eq!(std::fs::read_to_string(target.join("f80")).unwrap(), "80");
    std::fs::write(target.join("new"), "x").unwrap();
    assert!(
        base.join("up/fs/new").is_file(),
        "writes land in the upper dir"
    );
    integration::lab::unmount_under(lab.path());
}

/// Every page but redb's header flipped, as a bad disk or a stray write might leave it.
fn damaged(db: &[u8]) -> Vec<u8> {
    let mut bytes = db.to_vec();
    for page in bytes.chunks_mut(4096).skip(1) {
        for b in page.iter_mut().take(64) {
            *b ^= 0xff;
        }
    }
    bytes
}

fn sorted_dirs(snap: &SnapshotterDaemon<'_>) -> Vec<std::path::PathBuf> {
    let mut d = snap.snapshot_dirs();
    d.sort();
    d
}

/// Issue 18 items 11 and 12: a lost, emptied or damaged metadata.db next to real snapshot
/// directories makes the daemon refuse to start, with the reason (a fresh store would let
/// containerd's routine Cleanup delete every directory; a damaged one panicked or answered
/// "unreachable" to every RPC). Restoring the database brings everything back.
#[test]
fn damaged_state_is_refused_not_served_containerd_2_1() {
    Lab::require_cmd("mount.fuse", "fuse3");
    with_proxy_lab("snap-damaged-2.1", |_, img, snap, ctrd| {
        damaged_state_is_refused(img, snap, ctrd)
    });
}

fn damaged_state_is_refused(
    img: &PushedImage,
    snap: &SnapshotterDaemon<'_>,
    ctrd: &Containerd<'_>,
) {
    let ns = ctrd.namespace().to_string();
    pull_plain(ctrd, ContainerdVersion::V2_1, &img.reference);
    let dirs = sorted_dirs(snap);
    assert_eq!(dirs.len(), 3, "plain layers own real directories");
    snap.stop();
    let db = snap.root().join("metadata.db");
    let good = std::fs::read(&db).unwrap();
    let cases: [(&str, Option<Vec<u8>>, &str); 3] = [
        ("missing", None, "never allocated"),
        ("empty", Some(Vec::new()), "never allocated"),
        ("damaged", Some(damaged(&good)), "metadata.db is damaged"),
    ];
    for (what, bytes, expected) in cases {
        match bytes {
            None => std::fs::remove_file(&db).unwrap(),
            Some(b) => std::fs::write(&db, b).unwrap(),
        }
        let out = snap.start_refused();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: exit status {}", out.status);
        assert!(stderr.contains(expected), "{what}: {stderr}");
        assert!(!snap.socket().exists(), "{what}: nothing served");
        assert_eq!(sorted_dirs(snap), dirs, "{what}: every directory kept");
    }
    std::fs::write(&db, &good).unwrap();
    snap.restart();
    wait_for(
        "containerd to redial the restarted snapshotter",
        Duration::from_secs(30),
        || {
            ctr_ns(ctrd, &ns, &["snapshots", "--snapshotter", PLUGIN, "ls"])
                .output()
                .is_ok_and(|o| o.status.success())
        },
    );
    let out = ctrd.ctr_run(&["--snapshotter", PLUGIN], &img.reference, "restored", &[]);
    assert!(
        out.status.success(),
        "ctr run after restoring the store: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        snap.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "layer 3\n");
}

/// Issue 18 item 16: containerd caps each label pair at 4096 bytes but not how many a
/// snapshot carries; our per-snapshot total (64 KiB) keeps every List batch within the
/// 16 MiB containerd accepts. Through real containerd: the limit holds exactly, the
/// refusal is InvalidArgument, nothing is half-applied, and List keeps working.
#[test]
fn label_limits_through_containerd_2_1() {
    Lab::require_root();
    let v = ContainerdVersion::V2_1;
    let lab = Lab::new("snap-limits-2.1");
    let snap = SnapshotterDaemon::start(&lab, "");
    let ctrd = Containerd::start(&lab, v, &proxy_body(v, &snap.socket(), &snap.root()));
    let ns = ctrd.namespace().to_string();
    let snapshots = |args: &[&str]| {
        let mut a = vec!["snapshots", "--snapshotter", PLUGIN];
        a.extend_from_slice(args);
        ctr_ns(&ctrd, &ns, &a).output().unwrap()
    };
    assert!(snapshots(&["prepare", "big"]).status.success());
    // 16 pairs of 4026 bytes: 64,416 bytes, under the total.
    let pair = |i: usize| format!("containerd.io/snapshot/l{i:02}={}", "v".repeat(4000));
    let fits: Vec<String> = (0..16).map(pair).collect();
    let mut args = vec!["label", "big"];
    args.extend(fits.iter().map(String::as_str));
    let out = snapshots(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Four more pairs exceed it: refused as a whole.
    let over: Vec<String> = (16..20).map(pair).collect();
    let mut args = vec!["label", "big"];
    args.extend(over.iter().map(String::as_str));
    let out = snapshots(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("invalid argument") && stderr.contains("per snapshot"),
        "{stderr}"
    );
    let labels = snapshot_labels(&ctrd, &ns, "big");
    assert_eq!(
        labels.keys().filter(|k| k.contains("snapshot/l")).count(),
        16,
        "nothing of the refused update applied: {:?}",
        labels.keys().collect::<Vec<_>>()
    );
    assert_eq!(list_snapshots(&ctrd, &ns).len(), 1);
}
