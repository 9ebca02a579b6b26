//! Lazy pulling of nydus images by guest-puller (in process, so the FUSE server lives as long
//! as the test), against Debian's docker-registry and its access log. Needs root (FUSE and
//! overlay mounts) and /dev/fuse.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use guest_puller::config::Config;
use guest_puller::fetcher::KbsResourceFetcher;
use guest_puller::lazy::LazyError;
use guest_puller::pull::{PullError, Puller};
use integration::chain::blob_traffic;
use integration::{Lab, Registry};
use sha2::{Digest, Sha256};
use test_images::catalog;
use test_images::layout::{ImageSpec, Layout, WrittenManifest};
use test_images::nydus;
use test_images::push;

const BUSYBOX: &str = "/bin/busybox";

/// Everything logged in this test process (guest-puller's tracing and nydus' `log` output).
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        std::io::stderr().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(|| Capture)
        .try_init();
}

fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned()
}

fn require_fuse() {
    init_logs();
    Lab::require_root();
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: lazy pulling needs the fuse kernel module (modprobe fuse)"
    );
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing (apt-get install busybox-static)"
    );
    Lab::require_cmd("skopeo", "skopeo");
}

/// Builds `spec` as an OCI image (`:oci`) and as a nydus image (`:nydus`) in `repo`.
struct Pushed {
    oci: String,
    nydus: String,
    nydus_manifest: WrittenManifest,
}

fn push_both(lab: &Lab, reg: &Registry<'_>, name: &str, spec: &ImageSpec) -> Pushed {
    let repo = format!("{}/lazy/{name}", reg.host());
    let mut layout = Layout::create(&lab.join(&format!("oci-{name}"))).unwrap();
    let (d, _) = layout.write_image(spec).unwrap();
    layout.tag(&d, "oci").unwrap();
    let (nd, nw) =
        nydus::write_image(&layout, spec, &lab.join(&format!("nydus-{name}")), false).unwrap();
    layout.tag(&nd, "nydus").unwrap();
    let oci = format!("{repo}:oci");
    let nydus_ref = format!("{repo}:nydus");
    push::push_layout(layout.dir(), "oci", &oci).unwrap();
    push::push_layout(layout.dir(), "nydus", &nydus_ref).unwrap();
    Pushed {
        oci,
        nydus: nydus_ref,
        nydus_manifest: nw,
    }
}

fn config(lab: &Lab, reg: &Registry<'_>, extra: &str) -> Config {
    Config::from_toml(&format!(
        "[image]\nwork_dir = \"{}\"\nbundle_roots = [\"{}\"]\n{extra}\n\
         [image.registry_config]\ninsecure_registries = [\"{}\"]\n",
        lab.join("work").display(),
        lab.path().display(),
        reg.host()
    ))
    .unwrap()
}

async fn puller(cfg: Config) -> Puller {
    let fetcher = Arc::new(KbsResourceFetcher::new(&cfg.kbs).unwrap());
    Puller::new(cfg, fetcher).await.unwrap()
}

/// One entry of a rootfs as a comparable record.
fn describe(p: &Path) -> String {
    let m = fs::symlink_metadata(p).unwrap();
    let ft = m.file_type();
    let what = if ft.is_dir() {
        "dir".to_string()
    } else if ft.is_symlink() {
        format!("symlink -> {}", fs::read_link(p).unwrap().display())
    } else if ft.is_file() {
        format!(
            "file {} bytes sha256 {} nlink {}",
            m.len(),
            hex::encode(Sha256::digest(fs::read(p).unwrap())),
            m.nlink()
        )
    } else if ft.is_char_device() || ft.is_block_device() {
        format!("device {:x}", m.rdev())
    } else if ft.is_fifo() {
        "fifo".into()
    } else {
        "other".into()
    };
    format!(
        "{what} mode {:o} uid {} gid {} xattrs {:?}",
        m.mode() & 0o7777,
        m.uid(),
        m.gid(),
        xattrs(p)
    )
}

/// `user.*` and `security.capability` extended attributes (what images carry).
fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 4096];
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    let mut out = BTreeMap::new();
    if n <= 0 {
        return out;
    }
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
    {
        let name_s = String::from_utf8_lossy(name).into_owned();
        if !(name_s.starts_with("user.") || name_s == "security.capability") {
            continue;
        }
        let cn = CString::new(name).unwrap();
        let mut val = vec![0u8; 65536];
        let len =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
        if len >= 0 {
            val.truncate(len as usize);
            out.insert(name_s, val);
        }
    }
    out
}

fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.insert(rel, describe(&p));
        }
    }
    out
}

/// Every regular file of the flattened tree `flat` reads back its exact bytes under `rootfs`.
fn assert_every_file_reads_back(rootfs: &Path, flat: &test_images::layer::Layer) {
    for n in &flat.nodes {
        if let test_images::layer::Node::File { path, data, .. } = n {
            assert_eq!(&fs::read(rootfs.join(path)).unwrap(), data, "{path}");
        }
    }
}

fn repo_of(reference: &str) -> String {
    let no_tag = reference.rsplit_once(':').unwrap().0;
    no_tag.split_once('/').unwrap().1.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_rootfs_equals_eager_rootfs() {
    require_fuse();
    let lab = Lab::new("lazy-equal");
    let reg = Registry::start(&lab);
    let spec = catalog::spec("features-gzip", Path::new(BUSYBOX), 0)
        .unwrap()
        .unwrap();
    let img = push_both(&lab, &reg, "features", &spec);
    let p = puller(config(&lab, &reg, "")).await;
    let eager_b = lab.join("bundle-eager");
    let lazy_b = lab.join("bundle-lazy");
    let e = p.pull_image(&img.oci, &eager_b).await.unwrap();
    assert!(!e.lazy);
    let l = p.pull_image(&img.nydus, &lazy_b).await.unwrap();
    assert!(l.lazy, "a nydus image is pulled lazily");
    let (te, tl) = (tree(&eager_b.join("rootfs")), tree(&lazy_b.join("rootfs")));
    assert!(te.len() > 20, "eager rootfs looks empty: {te:?}");
    for (k, v) in &te {
        assert_eq!(tl.get(k), Some(v), "{k} differs (eager vs lazy)");
    }
    assert_eq!(
        te.keys().collect::<Vec<_>>(),
        tl.keys().collect::<Vec<_>>(),
        "same file tree"
    );
    // The runtime spec comes from the same config (capability sets are unordered).
    let process = |b: &Path| {
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(b.join("config.json")).unwrap()).unwrap();
        let p = &v["process"];
        (
            p["args"].clone(),
            p["env"].clone(),
            p["user"].clone(),
            p["cwd"].clone(),
        )
    };
    assert_eq!(process(&eager_b), process(&lazy_b));
    // The overlay on top is writable; the lazy layer below is not touched.
    fs::write(lazy_b.join("rootfs/etc/new.txt"), "w").unwrap();
    p.unmount_bundle(&lazy_b).await.unwrap();
    p.unmount_bundle(&eager_b).await.unwrap();
    assert!(!lazy_b.join("rootfs").exists());
    assert!(
        fs::read_dir(lab.join("work/lazy"))
            .unwrap()
            .next()
            .is_none(),
        "lazy state removed with the bundle"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_read_fetches_only_its_chunks() {
    require_fuse();
    let lab = Lab::new("lazy-small");
    let reg = Registry::start(&lab);
    let spec = catalog::spec("large", Path::new(BUSYBOX), 64)
        .unwrap()
        .unwrap();
    let img = push_both(&lab, &reg, "large", &spec);
    let blob = img.nydus_manifest.layer_digests[0].clone();
    let blob_size = fs::metadata(reg.blob_path(&blob)).unwrap().len();
    let repo = repo_of(&img.nydus);
    let before = blob_traffic(&reg, &repo, &blob);
    let p = puller(config(&lab, &reg, "")).await;
    let b = lab.join("bundle");
    p.pull_image(&img.nydus, &b).await.unwrap();
    let text = fs::read_to_string(b.join("rootfs/payload/l2/small.txt")).unwrap();
    assert_eq!(text, "small file in layer 2\n");
    let (gets, bytes) = {
        let after = blob_traffic(&reg, &repo, &blob);
        (after.0 - before.0, after.1 - before.1)
    };
    eprintln!("small read: {gets} blob GETs, {bytes} of {blob_size} blob bytes");
    assert!(gets >= 1, "the read went to the registry");
    assert!(
        bytes * 20 < blob_size,
        "fetched {bytes} of {blob_size} bytes (must be < 5%)"
    );
    p.unmount_bundle(&b).await.unwrap();
}

/// Chunk reads travel through the puller's own registry client, so a registry behind a private
/// CA works lazily with `extra_root_certificates`, as it does eagerly (nydus' own backend
/// knew nothing of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_chunks_from_a_private_ca_registry_use_extra_root_certificates() {
    require_fuse();
    let lab = Lab::new("lazy-tls");
    let reg = Registry::start(&lab);
    let spec = catalog::spec("large", Path::new(BUSYBOX), 8)
        .unwrap()
        .unwrap();
    let img = push_both(&lab, &reg, "tls", &spec);
    let pki = lab.join("pki");
    fs::create_dir_all(&pki).unwrap();
    let (ca, _) = integration::kbs::test_pki(&pki, "127.0.0.1");
    let tls = reg.start_tls_view("registry-tls", &pki.join("leaf.pem"), &pki.join("leaf.key"));
    let image = img.nydus.replacen(&reg.host(), &tls.host(), 1);
    let ca = String::from_utf8(ca).unwrap();
    // The TLS registry is not insecure: only the CA makes it trusted.
    let cfg = Config::from_toml(&format!(
        "[image]\nwork_dir = \"{}\"\nbundle_roots = [\"{}\"]\nmax_retries = 1\n\
         extra_root_certificates = [{ca:?}]\n",
        lab.join("work").display(),
        lab.path().display(),
    ))
    .unwrap();
    let p = puller(cfg).await;
    let b = lab.join("bundle");
    p.pull_image(&image, &b).await.unwrap();
    assert_eq!(
        fs::read_to_string(b.join("rootfs/payload/l3/small.txt")).unwrap(),
        "small file in layer 3\n"
    );
    let blob = &img.nydus_manifest.layer_digests[0];
    assert!(
        tls.blob_gets_of(&repo_of(&img.nydus), blob) >= 1,
        "the chunk came from the TLS registry:\n{}",
        tls.log()
    );
    p.unmount_bundle(&b).await.unwrap();
    // Without the CA the same pull is refused at the first fetch.
    let cfg = Config::from_toml(&format!(
        "[image]\nwork_dir = \"{}\"\nbundle_roots = [\"{}\"]\nmax_retries = 1\n",
        lab.join("work2").display(),
        lab.path().display(),
    ))
    .unwrap();
    let e = puller(cfg)
        .await
        .pull_image(&image, &lab.join("bundle2"))
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").to_lowercase().contains("certificate"),
        "{e:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_chunks_fail_with_eio_and_never_return_bad_bytes() {
    require_fuse();
    let lab = Lab::new("lazy-corrupt");
    let reg = Registry::start(&lab);
    let spec = catalog::spec("large", Path::new(BUSYBOX), 8)
        .unwrap()
        .unwrap();
    let img = push_both(&lab, &reg, "corrupt", &spec);
    let blob = img.nydus_manifest.layer_digests[0].clone();
    // Flip bytes all over the chunk area (the blob's metadata at the end stays intact, so
    // the mount works and only data chunks are bad).
    let path = reg.blob_path(&blob);
    let mut data = fs::read(&path).unwrap();
    let data_end = data.len() * 3 / 4;
    for i in (0..data_end).step_by(512) {
        data[i] ^= 0x5a;
    }
    fs::write(&path, &data).unwrap();
    let p = puller(config(&lab, &reg, "")).await;
    let b = lab.join("bundle");
    p.pull_image(&img.nydus, &b).await.unwrap();
    let flat = nydus::flatten(&spec.layers);
    let mut eio = 0;
    let mut ok = 0;
    for n in &flat.nodes {
        if let test_images::layer::Node::File { path, data, .. } = n {
            match fs::read(b.join("rootfs").join(path)) {
                Ok(got) => {
                    assert_eq!(&got, data, "{path}: a read returned wrong bytes");
                    ok += 1;
                }
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{path}: {e}");
                    eio += 1;
                }
            }
        }
    }
    eprintln!("{eio} reads failed with EIO, {ok} verified");
    assert!(eio > 0, "corrupted chunks must fail reads");
    p.unmount_bundle(&b).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_gone_mid_run_fails_reads_with_eio() {
    require_fuse();
    let lab = Lab::new("lazy-gone");
    let reg = Registry::start(&lab);
    let spec = catalog::spec("large", Path::new(BUSYBOX), 8)
        .unwrap()
        .unwrap();
    let img = push_both(&lab, &reg, "gone", &spec);
    let p = puller(config(&lab, &reg, "max_retries = 1")).await;
    let b = lab.join("bundle");
    p.pull_image(&img.nydus, &b).await.unwrap();
    assert_eq!(
        fs::read_to_string(b.join("rootfs/payload/l0/small.txt")).unwrap(),
        "small file in layer 0\n"
    );
    lab.stop("registry");
    let e = fs::read(b.join("rootfs/payload/l3/f15.bin")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // One log line names the image, the file and the chunks that could not be read.
    let line = logs()
        .lines()
        .find(|l| l.contains("lazy read failed") && l.contains("/payload/l3/f15.bin"))
        .map(str::to_string);
    let line = line.expect("a log line naming the file whose chunk failed");
    assert!(
        line.contains("chunks=") && line.contains(&img.nydus),
        "{line}"
    );
    // What was read before stays readable from the cache.
    assert_eq!(
        fs::read_to_string(b.join("rootfs/payload/l0/small.txt")).unwrap(),
        "small file in layer 0\n"
    );
    p.unmount_bundle(&b).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_eager_fetches_the_whole_nydus_image_before_returning() {
    require_fuse();
    let lab = Lab::new("lazy-eager");
    let reg = Registry::start(&lab);
    let spec = catalog::spec("large", Path::new(BUSYBOX), 8)
        .unwrap()
        .unwrap();
    let img = push_both(&lab, &reg, "eager", &spec);
    let p = puller(config(&lab, &reg, "force_eager = true")).await;
    let b = lab.join("bundle");
    p.pull_image(&img.nydus, &b).await.unwrap();
    // Every chunk is cached: reads work with the registry gone.
    lab.stop("registry");
    assert_every_file_reads_back(&b.join("rootfs"), &nydus::flatten(&spec.layers));
    p.unmount_bundle(&b).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_digest_mismatch_fails_the_pull() {
    require_fuse();
    let lab = Lab::new("lazy-badboot");
    let reg = Registry::start(&lab);
    let spec = catalog::spec("busybox", Path::new(BUSYBOX), 0)
        .unwrap()
        .unwrap();
    let img = push_both(&lab, &reg, "badboot", &spec);
    let boot = img.nydus_manifest.layer_digests[1].clone();
    let path = reg.blob_path(&boot);
    let mut data = fs::read(&path).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 1;
    fs::write(&path, &data).unwrap();
    let p = puller(config(&lab, &reg, "")).await;
    let b = lab.join("bundle");
    let err = p.pull_image(&img.nydus, &b).await.unwrap_err();
    assert_eq!(
        err.kind(),
        guest_puller::error::ErrorKind::Integrity,
        "{err}"
    );
    assert!(err.to_string().contains(&boot), "{err}");
    assert!(!b.join("rootfs").exists() || fs::read_dir(b.join("rootfs")).unwrap().next().is_none());
}

/// An encrypted nydus image of catalog image `name` (chunks AES-128-XTS, bootstrap
/// ocicrypt/JWE) whose key the KBS may hold; returns (reference, private key PEM, the
/// flattened spec, the manifest's digests).
async fn encrypted_image(
    lab: &Lab,
    reg: &Registry<'_>,
    name: &str,
    large_mb: usize,
) -> (String, Vec<u8>, test_images::layer::Layer, WrittenManifest) {
    Lab::require_cmd("openssl", "openssl");
    let key = lab.join("image.pem");
    let public = lab.join("image.pub.pem");
    integration::lab::rsa_key_pair(&key, &public);
    let spec = catalog::spec(name, Path::new(BUSYBOX), large_mb)
        .unwrap()
        .unwrap();
    let mut layout = Layout::create(&lab.join("oci")).unwrap();
    let (d, w) = nydus::write_image(&layout, &spec, &lab.join("nydus"), true).unwrap();
    layout.tag(&d, "enc").unwrap();
    let reference = format!("{}/lazy/enc:1", reg.host());
    push::push_layout_jwe_last_layer(layout.dir(), "enc", &reference, &public).unwrap();
    // Chunks are encrypted in the registry: the plaintext of /etc/hello.txt is nowhere in it.
    let blob = fs::read(reg.blob_path(&w.layer_digests[0])).unwrap();
    assert!(
        !blob
            .windows(catalog::HELLO.len())
            .any(|x| x == catalog::HELLO.as_bytes()),
        "chunk data is stored in the clear"
    );
    (
        reference,
        fs::read(&key).unwrap(),
        nydus::flatten(&spec.layers),
        w,
    )
}

fn kbs_config(lab: &Lab, reg: &Registry<'_>, kbs: &integration::chain::KbsProcess<'_>) -> Config {
    Config::from_toml(&format!(
        "[image]\nwork_dir = \"{}\"\nbundle_roots = [\"{}\"]\n\
         [image.registry_config]\ninsecure_registries = [\"{}\"]\n\
         [kbs]\nurl = \"{}\"\n[keys]\njwe_private_keys = [\"kbs:///default/key/lazy-jwe\"]\n",
        lab.join("work").display(),
        lab.path().display(),
        reg.host(),
        kbs.url()
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_lazy_image_needs_the_key_from_the_kbs() {
    require_fuse();
    let lab = Lab::new("lazy-enc");
    let reg = Registry::start(&lab);
    let kbs = integration::chain::KbsProcess::start(&lab);
    let (reference, key, flat, _) = encrypted_image(&lab, &reg, "busybox", 0).await;
    // No key in the KBS: the pull fails before anything is mounted, naming the bootstrap layer.
    let p = puller(kbs_config(&lab, &reg, &kbs)).await;
    let b = lab.join("bundle");
    let err = p.pull_image(&reference, &b).await.unwrap_err();
    assert!(
        matches!(&err, PullError::Lazy(LazyError::Decrypt(_))),
        "{err}"
    );
    assert_eq!(err.kind(), guest_puller::error::ErrorKind::Denied, "{err}");
    assert!(
        err.to_string().contains("missing or wrong decryption key"),
        "{err}"
    );
    assert!(!lazy_mounted(&lab));
    // With the key: the bootstrap decrypts and mounts; the tree (metadata from the decrypted
    // bootstrap) is the image's.
    kbs.put("default/key/lazy-jwe", &key);
    let p = puller(kbs_config(&lab, &reg, &kbs)).await;
    let r = p.pull_image(&reference, &b).await.unwrap();
    assert!(r.lazy);
    assert!(lazy_mounted(&lab));
    for n in &flat.nodes {
        if let test_images::layer::Node::File { path, data, .. } = n {
            let m = fs::metadata(b.join("rootfs").join(path)).unwrap();
            assert_eq!(m.len(), data.len() as u64, "{path}");
        }
    }
    p.unmount_bundle(&b).await.unwrap();
    assert!(!lazy_mounted(&lab));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_lazy_image_reads_decrypt_chunks() {
    require_fuse();
    let lab = Lab::new("lazy-enc-read");
    let reg = Registry::start(&lab);
    let kbs = integration::chain::KbsProcess::start(&lab);
    let (reference, key, flat, w) = encrypted_image(&lab, &reg, "large", 64).await;
    let blob = w.layer_digests[0].clone();
    let blob_size = fs::metadata(reg.blob_path(&blob)).unwrap().len();
    let repo = repo_of(&reference);
    kbs.put("default/key/lazy-jwe", &key);
    let p = puller(kbs_config(&lab, &reg, &kbs)).await;
    let b = lab.join("bundle");
    p.pull_image(&reference, &b).await.unwrap();
    let file = |path: &str| -> &Vec<u8> {
        flat.nodes
            .iter()
            .find_map(|n| match n {
                test_images::layer::Node::File { path: p, data, .. } if p == path => Some(data),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{path} is not in the image"))
    };
    // Each read fetches (and decrypts) only the chunks around the file read: its own chunks
    // plus at most nydus' read amplification window (the RAFS `batch_size`, 1 MiB by default,
    // which also covers the chunk and digest tables fetched by the first read); never the blob.
    const AMPLIFY: u64 = 1 << 20;
    let mut last = blob_traffic(&reg, &repo, &blob);
    let first_bytes = last.1;
    for path in [
        "payload/l2/small.txt",
        "payload/l1/f3.bin",
        "payload/l3/f15.bin",
        "etc/hello.txt",
    ] {
        let want = file(path);
        let got = fs::read(b.join("rootfs").join(path)).unwrap();
        assert_eq!(&got, want, "{path}: decrypted bytes differ");
        let now = blob_traffic(&reg, &repo, &blob);
        let (gets, bytes) = (now.0 - last.0, now.1 - last.1);
        // An encrypted chunk is at most its plaintext plus one AES block of padding.
        let limit = want.len() as u64 + 16 + AMPLIFY;
        eprintln!("{path}: {gets} blob GETs, {bytes} bytes (limit {limit}, blob {blob_size})");
        assert!(
            gets >= 1 && bytes > 0,
            "{path}: the read went to the registry"
        );
        assert!(
            bytes <= limit,
            "{path}: fetched {bytes} bytes, more than its chunks and the read window ({limit})"
        );
        last = now;
    }
    let partial = last.1 - first_bytes;
    assert!(
        partial * 4 < blob_size,
        "four reads fetched {partial} of {blob_size} blob bytes"
    );
    // Every file decrypts to the image's bytes.
    assert_every_file_reads_back(&b.join("rootfs"), &flat);
    assert!(
        !logs().contains("data digest value doesn't match"),
        "a chunk failed validation"
    );
    p.unmount_bundle(&b).await.unwrap();
}

fn lazy_mounted(lab: &Lab) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.contains(lab.path().to_str().unwrap()) && l.contains("fuse"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_prefetch_fetches_the_rest_in_the_background() {
    require_fuse();
    let lab = Lab::new("lazy-prefetch");
    let reg = Registry::start(&lab);
    let spec = catalog::spec("large", Path::new(BUSYBOX), 8)
        .unwrap()
        .unwrap();
    let img = push_both(&lab, &reg, "prefetch", &spec);
    let p = puller(config(&lab, &reg, "lazy_prefetch = true")).await;
    let b = lab.join("bundle");
    p.pull_image(&img.nydus, &b).await.unwrap();
    let work = lab.join("work").display().to_string();
    integration::lab::wait_for(
        "the background prefetch to finish",
        std::time::Duration::from_secs(120),
        || {
            logs()
                .lines()
                .any(|l| l.contains("lazy image prefetched") && l.contains(&work))
        },
    );
    // Everything is cached now: reads work with the registry gone.
    lab.stop("registry");
    assert_every_file_reads_back(&b.join("rootfs"), &nydus::flatten(&spec.layers));
    p.unmount_bundle(&b).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_chunk_reads_go_through_the_image_pull_proxy() {
    require_fuse();
    let lab = Lab::new("lazy-proxy");
    let reg = Registry::start(&lab);
    let proxy = integration::proxy::ForwardProxy::start();
    let spec = catalog::spec("large", Path::new(BUSYBOX), 64)
        .unwrap()
        .unwrap();
    let img = push_both(&lab, &reg, "proxied", &spec);
    let blob = img.nydus_manifest.layer_digests[0].clone();
    let extra = format!(
        "[image.image_pull_proxy]\nhttp_proxy = \"{}\"\n",
        proxy.url()
    );
    let p = puller(config(&lab, &reg, &extra)).await;
    let b = lab.join("bundle");
    p.pull_image(&img.nydus, &b).await.unwrap();
    let text = fs::read_to_string(b.join("rootfs/payload/l2/small.txt")).unwrap();
    assert_eq!(text, "small file in layer 2\n");
    // The blob is read by chunk ranges only (bootstrap aside), so a blob GET is a chunk read.
    let seen = proxy.requests();
    assert!(
        seen.iter().any(|r| r.contains(&format!("/blobs/{blob}"))),
        "the chunk read did not go through the proxy: {seen:?}"
    );
    p.unmount_bundle(&b).await.unwrap();
}
