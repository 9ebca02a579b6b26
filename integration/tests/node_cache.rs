//! The node-local blob cache (`guestpull-node-cache`) with local-guest pullers, each with its
//! own work dir as separate guests on one node have, against Debian's docker-registry and
//! skopeo-encrypted (JWE) images. Needs root (overlay mounts).

use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use integration::chain::find_bytes;
use integration::images::{inspect, rootfs_tree};
use integration::lab::{rsa_key_pair, run_ok, wait_for};
use integration::node_cache::{CachedGuest, NodeCacheProcess};
use integration::{push_test_image, Lab, PushedImage, Registry};
use sha2::{Digest, Sha256};

/// A 3-layer busybox image, plain and JWE-encrypted with skopeo, and the guests' key config.
struct Images<'a> {
    reg: Registry<'a>,
    plain: PushedImage,
    /// `host/lab/share:jwe`.
    enc: String,
    /// The encrypted image's layer digests, in manifest order.
    enc_layers: Vec<String>,
    /// `[keys]` naming the JWE private key.
    keys: String,
}

fn images(lab: &Lab) -> Images<'_> {
    Lab::require_root();
    Lab::require_cmd("skopeo", "skopeo");
    Lab::require_cmd("openssl", "openssl");
    let reg = Registry::start(lab);
    let (private, public) = (lab.join("jwe.pem"), lab.join("jwe.pub"));
    rsa_key_pair(&private, &public);
    let plain = push_test_image(&reg, "lab/share:plain", 3, &["/bin/sh"]);
    let enc = format!("{}/lab/share:jwe", reg.host());
    run_ok(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--encryption-key",
        &format!("jwe:{}", public.display()),
        &format!("docker://{}", plain.reference),
        &format!("docker://{enc}"),
    ]));
    let enc_layers = inspect(&reg, &enc).layer_digests;
    assert_eq!(enc_layers.len(), 3);
    let keys = format!("[keys]\njwe_private_keys = [\"{}\"]\n", private.display());
    Images {
        reg,
        plain,
        enc,
        enc_layers,
        keys,
    }
}

impl Images<'_> {
    fn guest(&self, lab: &Lab, name: &str, cache: Option<(&str, &str)>) -> CachedGuest {
        CachedGuest::new(lab, name, &self.reg.host(), cache, &self.keys)
    }

    fn layer_gets(&self, digest: &str) -> usize {
        self.reg.blob_gets_of("lab/share", digest)
    }

    /// The rootfs of the encrypted image pulled by a guest without a cache.
    fn unshared_rootfs(&self, lab: &Lab) -> std::collections::BTreeMap<String, String> {
        let g = self.guest(lab, "unshared", None);
        g.pull_ok(&self.enc, 0);
        rootfs_tree(&g.bundle(0).join("rootfs"))
    }
}

fn sha256_of(path: &PathBuf) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(fs::read(path).unwrap()))
    )
}

#[test]
fn eight_guests_on_a_node_fetch_each_encrypted_layer_from_the_registry_once() {
    let lab = Lab::new("cache-eight");
    let img = images(&lab);
    let cache = NodeCacheProcess::start(&lab, "node-cache", &[]);
    let url = cache.url();
    let guests: Vec<CachedGuest> = (0..8)
        .map(|i| {
            img.guest(
                &lab,
                &format!("guest-{i}"),
                Some((&url, "encrypted-layers")),
            )
        })
        .collect();
    // All at once, as pods of one deployment start: the cache holds the others back while the
    // first one's download is under way, rather than letting all eight go to the registry.
    std::thread::scope(|s| {
        for g in &guests {
            let enc = &img.enc;
            s.spawn(move || g.pull_ok(enc, 0));
        }
    });
    for d in &img.enc_layers {
        assert_eq!(
            img.layer_gets(d),
            1,
            "layer {d} fetched from the registry more than once:\n{}",
            cache.log()
        );
    }
    // The host holds exactly the three ciphertext blobs, each intact under its digest.
    let mut want = img.enc_layers.clone();
    want.sort();
    assert_eq!(cache.blobs(), want);
    for d in &want {
        assert_eq!(&sha256_of(&cache.blob_file(d)), d);
    }
    // No plaintext on the host: not a file of the image, nor its compressed layers.
    assert_eq!(find_bytes(cache.dir(), b"hello from guestpull"), None);
    assert_eq!(find_bytes(cache.dir(), b"layer 2\n"), None);
    for d in &img.plain.layer_digests {
        let plain = fs::read(img.reg.blob_path(d)).unwrap();
        assert_eq!(
            find_bytes(cache.dir(), &plain[..plain.len().min(256)]),
            None,
            "plaintext layer {d} on the host"
        );
    }
    let stats = cache.stats();
    assert_eq!(stats["puts_ok"], 3, "{stats}");
    assert!(stats["hits"].as_u64().unwrap() >= 7 * 3, "{stats}");
    let reference = img.unshared_rootfs(&lab);
    for g in &guests {
        assert_eq!(
            rootfs_tree(&g.bundle(0).join("rootfs")),
            reference,
            "{}",
            g.dir.display()
        );
    }
}

#[test]
fn a_corrupted_truncated_or_foreign_blob_from_the_cache_is_refused_and_fetched_again() {
    let lab = Lab::new("cache-bad");
    let img = images(&lab);
    let cache = NodeCacheProcess::start(&lab, "node-cache", &[]);
    let url = cache.url();
    let first = img.guest(&lab, "first", Some((&url, "encrypted-layers")));
    first.pull_ok(&img.enc, 0);
    assert_eq!(cache.blobs().len(), 3);
    // The host turns hostile: one blob with a flipped byte, one cut short, one replaced by
    // another blob of the image.
    let [a, b, c] = [0, 1, 2].map(|i| cache.blob_file(&img.enc_layers[i]));
    let mut bytes = fs::read(&a).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(&a, &bytes).unwrap();
    let cut = fs::read(&b).unwrap();
    fs::write(&b, &cut[..cut.len() / 2]).unwrap();
    fs::write(&c, fs::read(&a).unwrap()).unwrap();

    let second = img.guest(&lab, "second", Some((&url, "encrypted-layers")));
    let log = second.pull_ok(&img.enc, 0);
    for d in &img.enc_layers {
        assert_eq!(
            img.layer_gets(d),
            2,
            "layer {d} not fetched again from the registry"
        );
        assert!(
            log.contains(d.as_str()) && log.contains("node cache"),
            "{log}"
        );
    }
    assert_eq!(
        rootfs_tree(&second.bundle(0).join("rootfs")),
        rootfs_tree(&first.bundle(0).join("rootfs"))
    );
    // The guest reported them; the cache checked each itself and dropped all three.
    wait_for(
        "the cache to drop the bad blobs",
        Duration::from_secs(20),
        || cache.blobs().is_empty(),
    );
    // A third guest fills the cache again; a fourth is served from it.
    img.guest(&lab, "third", Some((&url, "encrypted-layers")))
        .pull_ok(&img.enc, 0);
    img.guest(&lab, "fourth", Some((&url, "encrypted-layers")))
        .pull_ok(&img.enc, 0);
    for d in &img.enc_layers {
        assert_eq!(
            img.layer_gets(d),
            3,
            "layer {d}: the repaired cache did not serve it"
        );
    }
}

#[test]
fn encrypted_layers_mode_sends_nothing_of_a_plain_image_to_the_host() {
    let lab = Lab::new("cache-plain");
    let img = images(&lab);
    let cache = NodeCacheProcess::start(&lab, "node-cache", &[]);
    let url = cache.url();
    img.guest(&lab, "default", Some((&url, "encrypted-layers")))
        .pull_ok(&img.plain.reference, 0);
    let stats = cache.stats();
    assert_eq!(
        (
            stats["hits"].as_u64(),
            stats["misses"].as_u64(),
            stats["puts_ok"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "the cache was asked about a plain layer: {stats}"
    );
    assert!(cache.blobs().is_empty());
    // `all` shares public images: the same pull does reach the cache.
    img.guest(&lab, "public", Some((&url, "all")))
        .pull_ok(&img.plain.reference, 0);
    let mut want = img.plain.layer_digests.clone();
    want.sort();
    assert_eq!(cache.blobs(), want);
}

#[test]
fn a_full_cache_evicts_the_least_recently_used_and_a_killed_write_leaves_nothing() {
    let lab = Lab::new("cache-limits");
    let img = images(&lab);
    let sizes: Vec<u64> = inspect(&img.reg, &img.enc).manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .collect();
    // Room for the largest layer and one more, not for all three.
    let mut sorted = sizes.clone();
    sorted.sort();
    let limit = sorted[2] + sorted[1];
    let limit_arg = limit.to_string();
    let cache = NodeCacheProcess::start(&lab, "node-cache", &["--max-bytes", &limit_arg]);
    let url = cache.url();
    img.guest(&lab, "g", Some((&url, "encrypted-layers")))
        .pull_ok(&img.enc, 0);
    assert!(cache.bytes() <= limit, "{} > {limit}", cache.bytes());
    // A public image shared in `all` mode needs room too: the encrypted blobs, used longer
    // ago, make way for it.
    img.guest(&lab, "public", Some((&url, "all")))
        .pull_ok(&img.plain.reference, 0);
    assert!(cache.bytes() <= limit, "{} > {limit}", cache.bytes());
    let stats = cache.stats();
    assert!(stats["evictions"].as_u64().unwrap() >= 1, "{stats}");
    let biggest_plain = img
        .plain
        .layer_digests
        .iter()
        .max_by_key(|d| fs::metadata(img.reg.blob_path(d)).unwrap().len())
        .unwrap();
    assert!(cache.blobs().contains(biggest_plain), "{stats}");

    // A crash mid-upload: half of a blob written, then SIGKILL.
    let len = (limit / 2) as u32;
    let blob: Vec<u8> = (0..len)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&blob)));
    let mut s = TcpStream::connect(("127.0.0.1", cache.port())).unwrap();
    write!(
        s,
        "PUT /v1/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n",
        blob.len()
    )
    .unwrap();
    s.write_all(&blob[..blob.len() / 2]).unwrap();
    let tmp = cache.dir().join("tmp");
    wait_for(
        "the upload to reach the disk",
        Duration::from_secs(20),
        || {
            fs::read_dir(&tmp)
                .map(|rd| {
                    rd.flatten()
                        .any(|e| e.metadata().is_ok_and(|m| m.len() > 0))
                })
                .unwrap_or(false)
        },
    );
    cache.kill();
    drop(s);
    cache.restart();
    let path = format!("/v1/blobs/{digest}");
    assert_eq!(cache.request("GET", &path, &[]).0, 404);
    assert!(!cache.blobs().contains(&digest));
    assert_eq!(
        fs::read_dir(&tmp).unwrap().count(),
        0,
        "upload leftovers after restart"
    );
    // What the cache held before the crash is still served.
    for d in cache.blobs() {
        let (status, body) = cache.request("GET", &format!("/v1/blobs/{d}"), &[]);
        assert_eq!(status, 200);
        assert_eq!(format!("sha256:{}", hex::encode(Sha256::digest(&body))), d);
    }
}
