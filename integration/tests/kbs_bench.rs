//! Benchmark (prints, never asserts on time): kbs-client against the test KBS on loopback.
//!
//! Run: `cargo test -p integration --release --test kbs_bench -- --nocapture`.
//! Baseline, measured in the same run: a plain HTTP GET round trip to the same server.

use std::time::{Duration, Instant};

use integration::kbs::{TestKbs, TestKbsConfig};
use kbs_client::{Client, ClientConfig, ResourceUri, Tee};

fn stats(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (p(0.5), p(0.99))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kbs_client_latency() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("default/key")).unwrap();
    for i in 0..100 {
        std::fs::write(dir.path().join(format!("default/key/k{i}")), [i as u8; 32]).unwrap();
    }
    let kbs = TestKbs::start(TestKbsConfig::new(dir.path()))
        .await
        .unwrap();
    let cfg = || {
        let mut c = ClientConfig::new(kbs.url());
        c.tee = Some(Tee::Sample);
        c
    };
    let uris: Vec<ResourceUri> = (0..100)
        .map(|i| format!("kbs:///default/key/k{i}").parse().unwrap())
        .collect();

    // Baseline: one plain loopback request/response on a kept-alive connection.
    let http = reqwest::Client::new();
    let health = format!("{}/healthz", kbs.url());
    http.get(&health).send().await.unwrap();
    let mut base = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        http.get(&health)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        base.push(t.elapsed());
    }

    // Full handshake + first resource, each with a fresh client (fresh TEE key, new connection).
    let mut full = Vec::new();
    for i in 0..50 {
        let t = Instant::now();
        let c = Client::new(cfg()).unwrap();
        c.get_resource(&uris[i % 100]).await.unwrap();
        full.push(t.elapsed());
    }

    // Further resources after one attestation.
    let c = Client::new(cfg()).unwrap();
    c.attest().await.unwrap();
    let mut each = Vec::new();
    let t100 = Instant::now();
    for u in &uris {
        let t = Instant::now();
        c.get_resource(u).await.unwrap();
        each.push(t.elapsed());
    }
    let total100 = t100.elapsed();

    let (bm, bp) = stats(base);
    let (fm, fp) = stats(full);
    let (em, ep) = stats(each);
    println!(
        "kbs-client loopback benchmark ({} build)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "  baseline HTTP GET        median {:7.3} ms  p99 {:7.3} ms",
        ms(bm),
        ms(bp)
    );
    println!(
        "  handshake + 1 resource   median {:7.3} ms  p99 {:7.3} ms  ({:.1}x baseline median)",
        ms(fm),
        ms(fp),
        fm.as_secs_f64() / bm.as_secs_f64()
    );
    println!(
        "  each further resource    median {:7.3} ms  p99 {:7.3} ms  ({:.1}x baseline median)",
        ms(em),
        ms(ep),
        em.as_secs_f64() / bm.as_secs_f64()
    );
    println!("  100 resources, 1 attest  total  {:7.3} ms", ms(total100));
    assert_eq!(
        kbs.stats().attest_ok,
        51,
        "one attestation per fresh client, none for the 100"
    );
}
