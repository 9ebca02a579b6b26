//! Benchmark (ignored by default; prints, never asserts timings):
//! `cargo test -p integration --test node_cache_bench -- --ignored --nocapture`
//!
//! N = 1, 4, 8 guests on one node pull one JWE-encrypted image (GUESTPULL_BENCH_MB, default
//! 1024 MiB of incompressible data in four layers) from a registry behind a WAN-rate link (a
//! forward proxy limited to GUESTPULL_BENCH_RATE MB/s, default 50), one after another and all
//! at once, with the node cache and, as the baseline of the same run, without it. Printed per
//! run: the registry's layer bytes as a multiple of the image, pod 1's pull time, and pods
//! 2..N's median pull time relative to pod 1's (the pull times are the guest-puller's own
//! `image pulled` figure, so the one-shot command's wait for its last upload is not counted).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration::chain::blob_traffic;
use integration::images::inspect;
use integration::lab::{rsa_key_pair, run_ok, unmount_under};
use integration::node_cache::{CachedGuest, NodeCacheProcess};
use integration::proxy::ForwardProxy;
use integration::{Lab, Registry};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Pushes an image of `mb` MiB of random data in four layers, JWE-encrypted; returns its
/// reference.
fn build(lab: &Lab, reg: &Registry<'_>, public_key: &Path, mb: u64) -> String {
    let layout = lab.join("bench-oci");
    let img = format!("{}:img", layout.display());
    run_ok(
        Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout),
    );
    run_ok(Command::new("umoci").args(["new", "--image", &img]));
    let bundle = lab.join("bench-build");
    for i in 0..4 {
        run_ok(
            Command::new("umoci")
                .args(["unpack", "--image", &img])
                .arg(&bundle),
        );
        let dir = bundle.join(format!("rootfs/data{i}"));
        fs::create_dir_all(&dir).unwrap();
        // Sixteen files per layer; random data, so the gzip layer is as large as its tar.
        for f in 0..16 {
            run_ok(Command::new("sh").arg("-c").arg(format!(
                "head -c {} /dev/urandom > {}/f{f}",
                (mb << 20) / 64,
                dir.display()
            )));
        }
        run_ok(
            Command::new("umoci")
                .args(["repack", "--image", &img])
                .arg(&bundle),
        );
        fs::remove_dir_all(&bundle).unwrap();
    }
    run_ok(Command::new("umoci").args([
        "config",
        "--image",
        &img,
        "--config.cmd",
        "/bin/true",
        "--architecture",
        "amd64",
        "--os",
        "linux",
    ]));
    let image = format!("{}/bench/shared:v1", reg.host());
    run_ok(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        "--encryption-key",
        &format!("jwe:{}", public_key.display()),
        &format!("oci:{img}"),
        &format!("docker://{image}"),
    ]));
    fs::remove_dir_all(&layout).unwrap();
    image
}

/// The guest-puller's own figure for a pull, from its `image pulled` log line.
fn pulled_secs(stderr: &str) -> f64 {
    let line = stderr
        .lines()
        .find(|l| l.contains("image pulled"))
        .unwrap_or_else(|| panic!("no `image pulled` line in:\n{stderr}"));
    let ms: f64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no ms= in {line}"));
    ms / 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn node_cache_bench() {
    Lab::require_root();
    let mb = env_u64("GUESTPULL_BENCH_MB", 1024);
    let rate = env_u64("GUESTPULL_BENCH_RATE", 50);
    let lab = Lab::new("node-cache-bench");
    let reg = Registry::start(&lab);
    let (private, public) = (lab.join("jwe.pem"), lab.join("jwe.pub"));
    rsa_key_pair(&private, &public);
    let image = build(&lab, &reg, &public, mb);
    let pushed = inspect(&reg, &image);
    let image_bytes: u64 = pushed.manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .sum();
    let proxy = ForwardProxy::start();
    proxy.set_rate(rate * 1_000_000);
    let registry_bytes = || -> u64 {
        pushed
            .layer_digests
            .iter()
            .map(|d| blob_traffic(&reg, &pushed.repo, d).1)
            .sum()
    };
    let extra = format!("[keys]\njwe_private_keys = [\"{}\"]\n", private.display());
    println!(
        "image: {:.0} MiB in 4 encrypted layers; registry link {rate} MB/s",
        image_bytes as f64 / 1048576.0
    );
    println!("| cache | N | start | registry bytes / image | pod 1 | pods 2..N / pod 1 |");
    println!("|---|---|---|---|---|---|");
    for (run, (cached, n, together)) in [
        (false, 4, false),
        (true, 1, false),
        (true, 4, false),
        (true, 8, false),
        (false, 4, true),
        (true, 4, true),
        (true, 8, true),
    ]
    .into_iter()
    .enumerate()
    {
        let cache = cached.then(|| NodeCacheProcess::start(&lab, &format!("cache-{run}"), &[]));
        let url = cache.as_ref().map(|c| c.url());
        let guests: Vec<CachedGuest> = (0..n)
            .map(|i| {
                let proxy_cfg = format!(
                    "{extra}[image.image_pull_proxy]\nhttp_proxy = \"{}\"\n",
                    proxy.url()
                );
                CachedGuest::new(
                    &lab,
                    &format!("run{run}-guest{i}"),
                    &reg.host(),
                    url.as_deref().map(|u| (u, "encrypted-layers")),
                    &proxy_cfg,
                )
            })
            .collect();
        let before = registry_bytes();
        let times: Vec<f64> = if together {
            std::thread::scope(|s| {
                let handles: Vec<_> = guests
                    .iter()
                    .map(|g| s.spawn(|| pulled_secs(&g.pull_ok(&image, 0))))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            })
        } else {
            guests
                .iter()
                .map(|g| pulled_secs(&g.pull_ok(&image, 0)))
                .collect()
        };
        let fetched = registry_bytes() - before;
        let rest = median(times[1..].to_vec());
        println!(
            "| {} | {n} | {} | {:.2} | {:.1} s | {} |",
            if cached { "node cache" } else { "none" },
            if together { "together" } else { "one by one" },
            fetched as f64 / image_bytes as f64,
            times[0],
            if n > 1 {
                format!("{:.2} (median {rest:.1} s)", rest / times[0])
            } else {
                "-".into()
            }
        );
        for g in &guests {
            unmount_under(&g.dir);
            let _ = fs::remove_dir_all(&g.dir);
        }
        if let Some(c) = cache {
            c.kill();
            let _ = fs::remove_dir_all(c.dir());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
