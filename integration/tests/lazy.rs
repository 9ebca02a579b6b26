//! Lazy pulling of nydus images by guest-puller (in process, so the FUSE server lives as long
//! as the test), against Debian's docker-registry and its access log. Needs root (FUSE and
//! overlay mounts) and /dev/fuse.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use guest_puller::config::Config;
use guest_puller::fetcher::KbsResourceFetcher;
use guest_puller::lazy::LazyError;
use guest_puller::pull::{PullError, Puller};
use integration::chain::blob_traffic;
use integration::lab::{bin_path, wait_for};
use integration::{Lab, Registry};
use sha2::{Digest, Sha256};
use test_images::catalog;
use test_images::layer::{sha256_digest, Compression, Layer, Node};
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
    let (nd, nw) = nydus::write_image(
        &layout,
        spec,
        &lab.join(&format!("nydus-{name}")),
        &Default::default(),
    )
    .unwrap();
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

/// The lazy tests' puller configuration (work dir and bundles in the lab), with `extra`
/// in its `[image]` table.
fn config_toml(lab: &Lab, reg: &Registry<'_>, extra: &str) -> String {
    format!(
        "[image]\nwork_dir = \"{}\"\nbundle_roots = [\"{}\"]\n{extra}\n\
         [image.registry_config]\ninsecure_registries = [\"{}\"]\n",
        lab.join("work").display(),
        lab.path().display(),
        reg.host()
    )
}

fn config(lab: &Lab, reg: &Registry<'_>, extra: &str) -> Config {
    Config::from_toml(&config_toml(lab, reg, extra)).unwrap()
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
fn assert_every_file_reads_back(rootfs: &Path, flat: &Layer) {
    for n in &flat.nodes {
        if let Node::File { path, data, .. } = n {
            assert_eq!(&fs::read(rootfs.join(path)).unwrap(), data, "{path}");
        }
    }
}

/// Reads every file of `flat` below `rootfs`: each read returns the image's bytes or fails
/// with EIO, never anything else. Returns how many failed.
fn files_read_back_or_fail_with_eio(rootfs: &Path, flat: &Layer) -> usize {
    let (mut eio, mut ok) = (0, 0);
    for n in &flat.nodes {
        if let Node::File { path, data, .. } = n {
            match fs::read(rootfs.join(path)) {
                Ok(got) => {
                    assert!(&got == data, "{path}: a read returned wrong bytes");
                    ok += 1;
                }
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{path}: {e}");
                    eio += 1;
                }
            }
        }
    }
    eprintln!("{eio} reads failed with EIO, {ok} returned the image's bytes");
    eio
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
    let eio = files_read_back_or_fail_with_eio(&b.join("rootfs"), &nydus::flatten(&spec.layers));
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
        .find(|l| {
            // Other tests of this process read the same path of other images.
            l.contains("lazy read failed")
                && l.contains("/payload/l3/f15.bin")
                && l.contains(&img.nydus)
        })
        .map(str::to_string);
    let line = line.expect("a log line naming the image and the file whose chunk failed");
    assert!(line.contains("chunks="), "{line}");
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
/// ocicrypt/JWE) whose key the KBS may hold.
struct EncryptedImage {
    reference: String,
    /// The private key PEM.
    key: Vec<u8>,
    flat: Layer,
    manifest: WrittenManifest,
    /// Where the data blob keeps its (encrypted) chunk-info table.
    chunk_table: std::ops::Range<usize>,
}

async fn encrypted_image(
    lab: &Lab,
    reg: &Registry<'_>,
    name: &str,
    large_mb: usize,
) -> EncryptedImage {
    Lab::require_cmd("openssl", "openssl");
    let key = lab.join("image.pem");
    let public = lab.join("image.pub.pem");
    integration::lab::rsa_key_pair(&key, &public);
    let spec = catalog::spec(name, Path::new(BUSYBOX), large_mb)
        .unwrap()
        .unwrap();
    let mut layout = Layout::create(&lab.join("oci")).unwrap();
    let built = nydus::build(
        &spec,
        &lab.join("nydus"),
        &nydus::BuildOptions {
            encrypt: true,
            ..Default::default()
        },
    )
    .unwrap();
    let (d, w) = nydus::write_built(&layout, &spec, &built).unwrap();
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
    EncryptedImage {
        reference,
        key: fs::read(&key).unwrap(),
        flat: nydus::flatten(&spec.layers),
        manifest: w,
        chunk_table: built.chunk_table,
    }
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
    let EncryptedImage {
        reference,
        key,
        flat,
        ..
    } = encrypted_image(&lab, &reg, "busybox", 0).await;
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
        if let Node::File { path, data, .. } = n {
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
    let EncryptedImage {
        reference,
        key,
        flat,
        manifest: w,
        ..
    } = encrypted_image(&lab, &reg, "large", 64).await;
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
                Node::File { path: p, data, .. } if p == path => Some(data),
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
        !logs().contains("digest mismatch"),
        "a chunk failed validation"
    );
    p.unmount_bundle(&b).await.unwrap();
}

/// Pseudo-random bytes (xorshift64): incompressible, and no 64-byte window repeats.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// CRC-32C (Castagnoli, reflected), the CRC nydus-image puts in chunk tables; bitwise, so the
/// test does not share nydus' implementation.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// XORs CRC-32C's generator polynomial (x^32 + 0x1EDC6F41) into `data` at byte `at`, in the
/// reflected bit order the CRC reads: the change is a multiple of the generator, so every
/// span holding it keeps its CRC while its bytes, and so its SHA-256, change.
fn forge_keeping_crc32c(data: &mut [u8], at: usize) {
    const GENERATOR: u64 = 0x1_1EDC_6F41;
    for i in 0..=32 {
        if GENERATOR >> i & 1 == 1 {
            let bit = 32 - i;
            data[at + bit / 8] ^= 1 << (bit % 8);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_chunk_with_a_matching_crc32_fails_with_eio_and_is_never_returned() {
    require_fuse();
    let lab = Lab::new("lazy-forge");
    let reg = Registry::start(&lab);
    const MIB: usize = 1 << 20;
    let data = noise(3 * MIB, 0x9e37_79b9_7f4a_7c15);
    let spec = ImageSpec::new(
        vec![Layer {
            nodes: vec![
                Node::dir("data"),
                Node::file("data/noise.bin", data.clone()),
            ],
            compression: Compression::Gzip,
        }],
        &["/bin/true"],
    );
    // Chunks stored as they are, in a blob whose V2 chunk-info entries carry CRC32s: nydus-storage
    // alone checks such a chunk by its CRC and nothing else.
    let opts = nydus::BuildOptions {
        uncompressed: true,
        chunk_info_v2: true,
        ..Default::default()
    };
    let mut layout = Layout::create(&lab.join("oci")).unwrap();
    let (d, w) = nydus::write_image(&layout, &spec, &lab.join("nydus"), &opts).unwrap();
    layout.tag(&d, "forged").unwrap();
    let reference = format!("{}/lazy/forged:1", reg.host());
    push::push_layout(layout.dir(), "forged", &reference).unwrap();
    // The registry (standing for the host or a mirror) serves the file's second chunk (1 MiB
    // chunks) changed in five bytes, with its CRC32 intact.
    let chunk = MIB..2 * MIB;
    let mut forged = data[chunk.clone()].to_vec();
    forge_keeping_crc32c(&mut forged, 4096);
    assert_ne!(forged, data[chunk.clone()]);
    assert_eq!(
        crc32c(&forged),
        crc32c(&data[chunk.clone()]),
        "the forgery keeps the CRC"
    );
    let path = reg.blob_path(&w.layer_digests[0]);
    let mut blob = fs::read(&path).unwrap();
    let at = chunk.start + 4096;
    let pos = blob
        .windows(64)
        .position(|x| x == &data[at..at + 64])
        .expect("uncompressed chunks are in the blob verbatim");
    forge_keeping_crc32c(&mut blob, pos);
    fs::write(&path, &blob).unwrap();

    let p = puller(config(&lab, &reg, "")).await;
    let b = lab.join("bundle");
    p.pull_image(&reference, &b).await.unwrap();
    let f = fs::File::open(b.join("rootfs/data/noise.bin")).unwrap();
    // No readahead: each read asks FUSE for its own 64 KiB, so it touches one chunk only.
    assert_eq!(
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) },
        0
    );
    let mut buf = vec![0u8; 64 << 10];
    for round in 0..2 {
        for off in (0..data.len()).step_by(buf.len()) {
            let in_forged = chunk.contains(&off);
            match f.read_exact_at(&mut buf, off as u64) {
                Ok(()) => {
                    assert!(
                        !in_forged,
                        "round {round}, offset {off}: the forged chunk was read"
                    );
                    assert!(
                        buf[..] == data[off..off + buf.len()],
                        "offset {off}: wrong bytes"
                    );
                }
                Err(e) => {
                    assert!(in_forged, "round {round}, offset {off}: {e}");
                    assert_eq!(e.raw_os_error(), Some(libc::EIO), "offset {off}: {e}");
                }
            }
        }
    }
    // The log names the chunk, its blob and both digests.
    let blob_id = w.layer_digests[0].trim_start_matches("sha256:");
    let logs = logs();
    let line = logs
        .lines()
        .find(|l| l.contains(&format!("chunk 1 (blob {blob_id} ")))
        .unwrap_or_else(|| panic!("no log line names the forged chunk:\n{logs}"));
    assert!(
        line.contains("digest mismatch") && line.contains("noise.bin"),
        "{line}"
    );
    let want = sha256_digest(&data[chunk.clone()]);
    let got = sha256_digest(&forged);
    let (want, got) = (&want["sha256:".len()..], &got["sha256:".len()..]);
    assert!(line.contains(want) && line.contains(got), "{line}");
    p.unmount_bundle(&b).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_blob_with_a_tampered_chunk_table_entry_is_refused() {
    require_fuse();
    let lab = Lab::new("lazy-enc-table");
    let reg = Registry::start(&lab);
    let kbs = integration::chain::KbsProcess::start(&lab);
    let img = encrypted_image(&lab, &reg, "large", 8).await;
    kbs.put("default/key/lazy-jwe", &img.key);
    // One XTS block at the start of the encrypted chunk-info table: whoever serves the blob
    // cannot choose the entries it decrypts to, but can change them.
    let path = reg.blob_path(&img.manifest.layer_digests[0]);
    let mut blob = fs::read(&path).unwrap();
    assert!(img.chunk_table.len() >= 16, "{:?}", img.chunk_table);
    for b in &mut blob[img.chunk_table.start..img.chunk_table.start + 16] {
        *b ^= 0xa5;
    }
    fs::write(&path, &blob).unwrap();
    let p = puller(kbs_config(&lab, &reg, &kbs)).await;
    let b = lab.join("bundle");
    p.pull_image(&img.reference, &b).await.unwrap();
    // Reads the tampered entries reach fail with EIO; every other read returns the image's
    // bytes.
    let eio = files_read_back_or_fail_with_eio(&b.join("rootfs"), &img.flat);
    assert!(eio > 0, "no read noticed the tampered chunk table");
    p.unmount_bundle(&b).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_whose_chunks_carry_no_digest_are_refused_at_mount() {
    require_fuse();
    let lab = Lab::new("lazy-tarfs");
    let reg = Registry::start(&lab);
    let spec = catalog::spec("busybox", Path::new(BUSYBOX), 0)
        .unwrap()
        .unwrap();
    // tarfs: the bootstrap indexes the layer tar itself, so no chunk has a digest.
    let opts = nydus::BuildOptions {
        tarfs: true,
        ..Default::default()
    };
    let mut layout = Layout::create(&lab.join("oci")).unwrap();
    let (d, _) = nydus::write_image(&layout, &spec, &lab.join("nydus"), &opts).unwrap();
    layout.tag(&d, "tarfs").unwrap();
    let reference = format!("{}/lazy/tarfs:1", reg.host());
    push::push_layout(layout.dir(), "tarfs", &reference).unwrap();
    let p = puller(config(&lab, &reg, "")).await;
    let b = lab.join("bundle");
    let err = p.pull_image(&reference, &b).await.unwrap_err();
    assert!(
        matches!(&err, PullError::Lazy(LazyError::Integrity { .. })),
        "{err}"
    );
    assert_eq!(
        err.kind(),
        guest_puller::error::ErrorKind::Integrity,
        "{err}"
    );
    assert!(err.to_string().contains("carry no digests"), "{err}");
    assert!(!lazy_mounted(&lab));
}

/// FUSE mounts below the lab.
fn fuse_mounts(lab: &Lab) -> usize {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(lab.path().to_str().unwrap()) && l.contains(" - fuse"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_of_one_image_share_its_lazy_rootfs_and_chunk_cache() {
    require_fuse();
    let lab = Lab::new("lazy-share");
    let reg = Registry::start(&lab);
    let spec = catalog::spec("large", Path::new(BUSYBOX), 8)
        .unwrap()
        .unwrap();
    let img = push_both(&lab, &reg, "share", &spec);
    let repo = repo_of(&img.nydus);
    let blob = img.nydus_manifest.layer_digests[0].clone();
    let flat = nydus::flatten(&spec.layers);
    let file = "payload/l3/f15.bin";
    let want = flat
        .nodes
        .iter()
        .find_map(|n| match n {
            Node::File { path, data, .. } if path == file => Some(data.clone()),
            _ => None,
        })
        .unwrap();
    let p = puller(config(&lab, &reg, "")).await;
    let (c1, c2) = (lab.join("c1"), lab.join("c2"));
    p.pull_image(&img.nydus, &c1).await.unwrap();
    assert!(fs::read(c1.join("rootfs").join(file)).unwrap() == want);
    let before = blob_traffic(&reg, &repo, &blob);
    // The second container of the image joins the first one's rootfs: its read of the same
    // file is served from the shared chunk cache, with no blob request.
    p.pull_image(&img.nydus, &c2).await.unwrap();
    assert!(fs::read(c2.join("rootfs").join(file)).unwrap() == want);
    assert_eq!(
        blob_traffic(&reg, &repo, &blob),
        before,
        "chunks fetched twice"
    );
    assert_eq!(fuse_mounts(&lab), 1);
    // Each container still writes to its own overlay.
    fs::write(c1.join("rootfs/etc/only-in-c1"), "c1").unwrap();
    assert!(!c2.join("rootfs/etc/only-in-c1").exists());
    // The first container goes; the second keeps reading, chunks not fetched yet included.
    p.unmount_bundle(&c1).await.unwrap();
    assert_eq!(fuse_mounts(&lab), 1);
    assert_every_file_reads_back(&c2.join("rootfs"), &flat);
    assert!(blob_traffic(&reg, &repo, &blob).0 > before.0);
    // With the last one, the mount and its cache go.
    p.unmount_bundle(&c2).await.unwrap();
    assert_eq!(fuse_mounts(&lab), 0);
    let lazy_dirs: Vec<_> = fs::read_dir(lab.join("work/lazy")).unwrap().collect();
    assert!(lazy_dirs.is_empty(), "{lazy_dirs:?}");
    // Two pulls of the image at once: one mounts, the other waits and joins.
    let (c3, c4) = (lab.join("c3"), lab.join("c4"));
    let (r3, r4) = tokio::join!(p.pull_image(&img.nydus, &c3), p.pull_image(&img.nydus, &c4));
    r3.unwrap();
    r4.unwrap();
    assert_eq!(fuse_mounts(&lab), 1);
    for c in [&c3, &c4] {
        assert!(fs::read(c.join("rootfs").join(file)).unwrap() == want);
        p.unmount_bundle(c).await.unwrap();
    }
    assert_eq!(fuse_mounts(&lab), 0);
}

fn lazy_mounted(lab: &Lab) -> bool {
    fuse_mounts(lab) > 0
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

/// `guest-puller serve` on `<lab>/cdh.sock` with configuration file `cfg`, once it serves.
fn serve_puller(lab: &Lab, cfg: &Path) -> std::path::PathBuf {
    let sock = lab.join("cdh.sock");
    integration::chain::serve_on(lab, cfg, &sock, &[]);
    sock
}

fn client_pull(sock: &Path, image: &str, bundle: &Path) {
    let out = Command::new(bin_path("guest-puller"))
        .args(["client-pull", "--socket"])
        .arg(sock)
        .arg(image)
        .arg("--bundle")
        .arg(bundle)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "client-pull {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `busybox sha256sum path` in a child process, its output sent when it is done, so a test
/// can tell a stalled reader from a finished one without hanging. A process of its own, as a
/// container's would be: a process holding files of a mount whose server is down stalls in
/// close() (FUSE_FLUSH), so the test process itself, which forks the new server, must hold
/// none.
fn sha256_in_background(path: std::path::PathBuf) -> mpsc::Receiver<String> {
    let child = Command::new(BUSYBOX)
        .arg("sha256sum")
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let out = child.wait_with_output().unwrap();
        let text = if out.status.success() {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned()
        } else {
            format!("failed: {}", String::from_utf8_lossy(&out.stderr))
        };
        let _ = tx.send(text);
    });
    rx
}

#[test]
fn a_lazy_mount_survives_kill_9_of_the_guest_puller_mid_read() {
    require_fuse();
    let lab = Lab::new("lazy-takeover");
    let reg = Registry::start(&lab);
    let proxy = integration::proxy::ForwardProxy::start();
    // One file read across the kill (eight 1 MiB chunks), one after it.
    let first = ("data/big.bin".to_string(), noise(8 << 20, 7));
    let second = ("data/other.bin".to_string(), noise(3 << 20, 8));
    let spec = ImageSpec::new(
        vec![
            catalog::base_layer(Path::new(BUSYBOX), Compression::Gzip).unwrap(),
            Layer {
                nodes: vec![
                    Node::dir("data"),
                    Node::file(&first.0, first.1.clone()),
                    Node::file(&second.0, second.1.clone()),
                ],
                compression: Compression::Gzip,
            },
        ],
        &["/bin/true"],
    );
    let img = push_both(&lab, &reg, "takeover", &spec);
    let blob = img.nydus_manifest.layer_digests[0].clone();
    let flat = nydus::flatten(&spec.layers);
    let cfg = lab.join("guest-puller.toml");
    let extra = format!(
        "[image.image_pull_proxy]\nhttp_proxy = \"{}\"\n",
        proxy.url()
    );
    fs::write(&cfg, config_toml(&lab, &reg, &extra)).unwrap();
    let sock = serve_puller(&lab, &cfg);
    let c1 = lab.join("c1");
    client_pull(&sock, &img.nydus, &c1);
    assert_eq!(fuse_mounts(&lab), 1);

    // Every chunk fetch now waits in the proxy, so a read is in the server's hands (taken
    // from /dev/fuse, not answered) when the server is killed.
    proxy.set_delay(Duration::from_millis(1500));
    let chunk_gets = || {
        proxy
            .requests()
            .iter()
            .filter(|r| r.contains(&format!("/blobs/{blob}")))
            .count()
    };
    let before = chunk_gets();
    let reading = sha256_in_background(c1.join("rootfs").join(&first.0));
    wait_for("a chunk fetch in flight", Duration::from_secs(30), || {
        chunk_gets() > before
    });
    lab.kill("guest-puller");
    assert!(
        matches!(reading.try_recv(), Err(mpsc::TryRecvError::Empty)),
        "the read finished before the kill: the test proves nothing"
    );
    // With no server, the mount holds the read (it does not fail with ENOTCONN).
    std::thread::sleep(Duration::from_millis(500));
    assert!(matches!(reading.try_recv(), Err(mpsc::TryRecvError::Empty)));
    proxy.set_delay(Duration::ZERO);

    let sock = serve_puller(&lab, &cfg);
    let got = reading
        .recv_timeout(Duration::from_secs(120))
        .expect("the read never completed after the restart");
    assert_eq!(
        got,
        hex::encode(Sha256::digest(&first.1)),
        "{} read back wrong across the take-over",
        first.0
    );
    let log = lab.log("guest-puller");
    assert!(log.contains("lazy mount taken over"), "{log}");
    assert_eq!(fuse_mounts(&lab), 1);

    // A second container of the image starts afterwards, on the same (taken-over) mount.
    let c2 = lab.join("c2");
    client_pull(&sock, &img.nydus, &c2);
    assert_eq!(
        fuse_mounts(&lab),
        1,
        "the second container mounted the image again"
    );
    assert!(fs::read(c2.join("rootfs").join(&second.0)).unwrap() == second.1);

    // A graceful stop (SIGTERM, as before an upgrade) hands the mount over too.
    lab.stop("guest-puller");
    let sock = serve_puller(&lab, &cfg);
    let log = lab.log("guest-puller");
    assert_eq!(log.matches("lazy mount taken over").count(), 2, "{log}");
    assert_every_file_reads_back(&c1.join("rootfs"), &flat);
    let c3 = lab.join("c3");
    client_pull(&sock, &img.nydus, &c3);
    assert!(fs::read(c3.join("rootfs").join(&first.0)).unwrap() == first.1);
    assert_eq!(fuse_mounts(&lab), 1);

    // Containers removed while no guest-puller runs: removal does not wait for a server (it
    // never asks the held mount anything), and the next server drops the image's mount.
    lab.kill("guest-puller");
    for c in [&c1, &c2, &c3] {
        let out = Command::new("timeout")
            .arg("60")
            .arg(bin_path("guest-puller"))
            .args(["unmount", "--config"])
            .arg(&cfg)
            .arg("--bundle")
            .arg(c)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "guest-puller unmount {}: {:?} {}",
            c.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(fuse_mounts(&lab), 0);
    let _sock = serve_puller(&lab, &cfg);
    let lazy_dirs: Vec<_> = fs::read_dir(lab.join("work/lazy")).unwrap().collect();
    assert!(lazy_dirs.is_empty(), "{lazy_dirs:?}");
}
