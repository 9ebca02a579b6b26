//! Benchmark (ignored by default; prints, never asserts times): host pull of a 5-layer ~100 MB
//! image with `ctr image pull` on containerd 2.1, through containerd's own overlayfs snapshotter
//! (the baseline, measured in the same run) and through guestpull. Reports wall time, the ratio,
//! and the layer bytes the host fetched (from the registry's access log).
//!
//! `cargo test --release -p integration --test snapshotter_bench -- --ignored --nocapture`
//! (after `cargo build --release --workspace --bins`; GUESTPULL_BENCH_MB overrides the size).

use std::process::Command;
use std::time::Instant;

use integration::lab::{bin_path, run_ok};
use integration::snapshotter_env::{proxy_body, SnapshotterDaemon, PLUGIN};
use integration::{Containerd, ContainerdVersion, Lab, Registry};

/// Bytes served for blob GETs of `repo` whose user agent is containerd's.
fn host_blob_bytes(reg: &Registry<'_>, repo: &str) -> u64 {
    let needle = format!("\"GET /v2/{repo}/blobs/");
    reg.log()
        .lines()
        .filter(|l| l.contains(&needle) && l.contains("containerd/"))
        .filter_map(|l| {
            // `... "GET /v2/... HTTP/1.1" 200 12345 "referer" "agent"`
            let after = l.split("HTTP/1.1\" ").nth(1)?;
            after.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn host_pull_guestpull_vs_overlayfs() {
    Lab::require_root();
    let mb: usize = std::env::var("GUESTPULL_BENCH_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let lab = Lab::new("bench-pull");
    let reg = Registry::start(&lab);
    run_ok(
        Command::new(bin_path("test-images"))
            .args(["build", "--registry", &reg.host(), "--only", "large"])
            .args(["--large-mb", &mb.to_string(), "--work-dir"])
            .arg(lab.join("build")),
    );
    let image = format!("{}/guestpull/large:latest", reg.host());
    let repo = "guestpull/large";
    let snap = SnapshotterDaemon::start(&lab, "");
    let v = ContainerdVersion::V2_1;
    let rounds = 3;
    let mut results = Vec::new();
    for snapshotter in ["overlayfs", PLUGIN] {
        let mut times = Vec::new();
        let mut bytes = 0;
        for round in 0..rounds {
            // A fresh containerd root per round: nothing cached in its content store.
            let _ = std::fs::remove_dir_all(lab.join("containerd"));
            let ctrd = Containerd::start(&lab, v, &proxy_body(v, &snap.socket(), &snap.root()));
            let before = host_blob_bytes(&reg, repo);
            let t = Instant::now();
            ctrd.ctr_ok(&[
                "images",
                "pull",
                "--plain-http",
                "--snapshotter",
                snapshotter,
                &image,
            ]);
            times.push(t.elapsed().as_secs_f64());
            bytes = host_blob_bytes(&reg, repo) - before;
            let _ = round;
            drop(ctrd);
        }
        results.push((snapshotter, median(times), bytes));
    }
    let (_, base_t, base_b) = results[0];
    println!("\nhost pull of a 5-layer {mb} MiB image, containerd 2.1 `ctr image pull`, median of {rounds}:");
    println!("| snapshotter | time | × overlayfs | blob bytes fetched by the host |");
    println!("|---|---|---|---|");
    for (name, t, b) in &results {
        println!(
            "| {name} | {:.3} s | {:.3} | {b} ({:.1}% of overlayfs) |",
            t,
            t / base_t,
            100.0 * *b as f64 / base_b.max(1) as f64
        );
    }
}
