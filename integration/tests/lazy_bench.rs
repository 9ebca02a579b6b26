//! Benchmark (ignored by default; prints ratios, never asserts timings):
//! `cargo test -p integration --test lazy_bench -- --ignored --nocapture`
//!
//! The catalog's `large` image (`GUESTPULL_LAZY_BENCH_MB`, default 1024 MiB of payload) as an
//! OCI image and as a nydus image on the loopback registry, the work dir on tmpfs like the
//! guest's /run. For each: time from PullImage to the first successful read of a small file
//! in the rootfs, and the blob bytes the registry served for it, in the same run.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use guest_puller::config::Config;
use guest_puller::fetcher::KbsResourceFetcher;
use guest_puller::pull::Puller;
use integration::{Lab, Registry};
use sha2::{Digest, Sha256};
use test_images::catalog;
use test_images::layout::Layout;
use test_images::{nydus, push};

/// Blob bytes the registry served for `repo` so far.
fn blob_bytes(reg: &Registry<'_>, repo: &str) -> u64 {
    let needle = format!("\"GET /v2/{repo}/blobs/");
    reg.log()
        .lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| {
            l.split('"')
                .nth(2)?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn bench_lazy_vs_eager_first_read() {
    Lab::require_root();
    Lab::require_cmd("skopeo", "skopeo");
    let mb: usize = std::env::var("GUESTPULL_LAZY_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let lab = Lab::new("lazy-bench");
    let reg = Registry::start(&lab);
    let scratch = lab.tmpfs("tmpfs", "12g");
    let spec = catalog::spec("large", Path::new("/bin/busybox"), mb)
        .unwrap()
        .unwrap();
    let started = Instant::now();
    let mut layout = Layout::create(&lab.join("oci")).unwrap();
    let (d, _) = layout.write_image(&spec).unwrap();
    layout.tag(&d, "oci").unwrap();
    let (nd, _) =
        nydus::write_image(&layout, &spec, &lab.join("nydus"), &Default::default()).unwrap();
    layout.tag(&nd, "nydus").unwrap();
    let (eager_repo, lazy_repo) = ("bench/eager", "bench/lazy");
    let eager_ref = format!("{}/{eager_repo}:1", reg.host());
    let lazy_ref = format!("{}/{lazy_repo}:1", reg.host());
    push::push_layout(layout.dir(), "oci", &eager_ref).unwrap();
    push::push_layout(layout.dir(), "nydus", &lazy_ref).unwrap();
    eprintln!(
        "built and pushed {mb} MiB as OCI and nydus in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let cfg = Config::from_toml(&format!(
        "[image]\nwork_dir = \"{}\"\nbundle_roots = [\"{}\"]\n\
         [image.registry_config]\ninsecure_registries = [\"{}\"]\n",
        scratch.join("work").display(),
        scratch.display(),
        reg.host()
    ))
    .unwrap();
    let fetcher = Arc::new(KbsResourceFetcher::new(&cfg.kbs).unwrap());
    let p = Puller::new(cfg, fetcher).await.unwrap();
    let small = "payload/l2/small.txt";

    let run = |reference: String, repo: &'static str, bundle: &'static str| {
        let p = &p;
        let scratch = scratch.clone();
        let reg = &reg;
        async move {
            let before = blob_bytes(reg, repo);
            let b = scratch.join(bundle);
            let t = Instant::now();
            p.pull_image(&reference, &b).await.unwrap();
            let text = fs::read_to_string(b.join("rootfs").join(small)).unwrap();
            let secs = t.elapsed().as_secs_f64();
            assert_eq!(text, "small file in layer 2\n");
            let bytes = blob_bytes(reg, repo) - before;
            p.unmount_bundle(&b).await.unwrap();
            (secs, bytes)
        }
    };
    let (eager_s, eager_b) = run(eager_ref, eager_repo, "eager").await;
    let (lazy_s, lazy_b) = run(lazy_ref.clone(), lazy_repo, "lazy").await;

    // The whole lazy image read once through the mount (every chunk fetched, hashed against
    // the bootstrap's chunk table, served), against the same bytes hashed in this process: the
    // strong chunk check's share of a full read.
    let b = scratch.join("lazy-all");
    p.pull_image(&lazy_ref, &b).await.unwrap();
    let t = Instant::now();
    let read = guest_puller::lazy::read_all(&b.join("rootfs")).unwrap();
    let read_s = t.elapsed().as_secs_f64();
    p.unmount_bundle(&b).await.unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    let rounds = 256;
    let t = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(Sha256::digest(std::hint::black_box(&chunk)));
    }
    let hash_s = t.elapsed().as_secs_f64() / rounds as f64;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!("| pull | PullImage → first read of /{small} | blob bytes fetched |");
    eprintln!("|---|---|---|");
    eprintln!(
        "| eager (OCI, gzip layers) | {eager_s:.2} s | {:.1} MiB |",
        mib(eager_b)
    );
    eprintln!("| lazy (nydus) | {lazy_s:.3} s | {:.2} MiB |", mib(lazy_b));
    eprintln!(
        "lazy/eager: time {:.2} %, bytes {:.3} %",
        100.0 * lazy_s / eager_s,
        100.0 * lazy_b as f64 / eager_b.max(1) as f64
    );
    let chunks = read as f64 / (1 << 20) as f64;
    eprintln!(
        "lazy full read: {:.1} MiB in {read_s:.2} s ({:.0} MiB/s); SHA-256 of a 1 MiB chunk: \
         {:.2} ms, i.e. {:.1} % of the full read",
        mib(read),
        mib(read) / read_s,
        hash_s * 1e3,
        100.0 * chunks * hash_s / read_s
    );
}
