//! Snapshot operation latency with a large store: p50/p99 of Prepare, Commit, Stat and
//! Mounts with 10,000 snapshots, against the same operations on a 100-snapshot store
//! measured in the same run (ratios, not absolute asserts).
//!
//! Writes must be durable before containerd is answered (redb `Durability::Immediate`),
//! so their floor is the filesystem's fsync latency: the bench measures a raw
//! 4 KiB write + fsync in the same directory and prints every p99 against it too.
//!
//! Run: `cargo bench -p snapshotter --bench snapshot_ops` (env SNAP_BENCH_N to change 10000).

use std::collections::HashMap;
use std::time::Instant;

use snapshotter::{Config, Engine};

fn chain(i: usize) -> String {
    format!("sha256:{:064x}", i)
}

struct Lat(Vec<f64>);

impl Lat {
    fn pct(&mut self, p: f64) -> f64 {
        self.0.sort_by(|a, b| a.total_cmp(b));
        let idx = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[idx]
    }
}

#[derive(Default)]
struct Results {
    prepare_layer: Vec<f64>,
    prepare_container: Vec<f64>,
    prepare_plain: Vec<f64>,
    commit: Vec<f64>,
    stat: Vec<f64>,
    mounts: Vec<f64>,
    list_filtered: Vec<f64>,
}

fn time<T>(v: &mut Vec<f64>, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    v.push(t.elapsed().as_secs_f64() * 1e3);
    r
}

/// Fills a store with `n` snapshots shaped like real use (5-layer guest-pull images,
/// one container each), then measures 200 of each operation.
fn run(n: usize) -> Results {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        root: dir.path().join("root"),
        ..Config::default()
    };
    let e = Engine::open(cfg).unwrap();
    let mut made = 0usize;
    let mut img = 0usize;
    while made < n {
        let mut parent = String::new();
        for l in 0..5 {
            let c = chain(img * 10 + l);
            let mut labels = HashMap::new();
            labels.insert("containerd.io/snapshot.ref".to_string(), c.clone());
            labels.insert(
                "containerd.io/snapshot/cri.layer-digest".to_string(),
                format!("sha256:{:064x}", img * 10 + l + 1_000_000),
            );
            let _ = e.prepare(
                &format!("k8s.io/{made}/extract-{made} {c}"),
                &parent,
                labels,
            );
            parent = c;
            made += 1;
        }
        e.prepare(
            &format!("k8s.io/{made}/container-{img}"),
            &parent,
            HashMap::new(),
        )
        .unwrap();
        made += 1;
        img += 1;
    }
    let mut r = Results::default();
    let base = 50_000_000usize;
    for i in 0..200 {
        let c = chain(base + i);
        let mut labels = HashMap::new();
        labels.insert("containerd.io/snapshot.ref".to_string(), c.clone());
        let parent = chain((i % img) * 10 + 4);
        let _ = time(&mut r.prepare_layer, || {
            e.prepare(&format!("k8s.io/b{i}/extract {c}"), &parent, labels)
        });
        let key = format!("k8s.io/b{i}/ctr");
        time(&mut r.prepare_container, || {
            e.prepare(&key, &c, HashMap::new()).unwrap()
        });
        time(&mut r.mounts, || e.mounts(&key).unwrap());
        time(&mut r.stat, || e.stat(&c).unwrap());
        // The Walk containerd sends after every AlreadyExists (a full scan of the store).
        let f = format!("labels.\"containerd.io/snapshot.ref\"=={c},parent==\"{parent}\"");
        time(&mut r.list_filtered, || {
            assert_eq!(e.list(&[f]).unwrap().len(), 1)
        });
        let pkey = format!("k8s.io/b{i}/plain");
        time(&mut r.prepare_plain, || {
            e.prepare(&pkey, "", HashMap::new()).unwrap()
        });
        time(&mut r.commit, || {
            e.commit(&format!("k8s.io/b{i}/committed"), &pkey, HashMap::new())
                .unwrap()
        });
    }
    r
}

/// 200 × (4 KiB write + fsync) next to the store: the durability floor of this disk.
fn fsync_baseline(dir: &std::path::Path) -> Vec<f64> {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("fsync-probe")).unwrap();
    let buf = [7u8; 4096];
    let mut v = Vec::new();
    for _ in 0..200 {
        time(&mut v, || {
            f.write_all(&buf).unwrap();
            f.sync_all().unwrap();
        });
    }
    v
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let n: usize = std::env::var("SNAP_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let probe = tempfile::tempdir().unwrap();
    let mut fsync = Lat(fsync_baseline(probe.path()));
    let small = run(100);
    let big = run(n);
    let fsync_p99 = fsync.pct(0.99);
    println!(
        "durability floor: 4 KiB write+fsync p50 {:.3} ms, p99 {:.3} ms",
        fsync.pct(0.5),
        fsync_p99
    );
    println!("snapshot ops, store of {n} snapshots vs baseline store of 100 (same run)");
    println!(
        "{:<20} {:>10} {:>10} {:>12} {:>10} {:>12}",
        "op", "p50 ms", "p99 ms", "base p99 ms", "p99 ratio", "p99 / fsync"
    );
    let rows: [(&str, Vec<f64>, Vec<f64>); 7] = [
        ("Prepare(layer)", big.prepare_layer, small.prepare_layer),
        (
            "Prepare(container)",
            big.prepare_container,
            small.prepare_container,
        ),
        ("Prepare(plain)", big.prepare_plain, small.prepare_plain),
        ("Commit", big.commit, small.commit),
        ("Stat", big.stat, small.stat),
        ("Mounts", big.mounts, small.mounts),
        ("List(ref filter)", big.list_filtered, small.list_filtered),
    ];
    for (name, b, s) in rows {
        let (mut b, mut s) = (Lat(b), Lat(s));
        let (p50, p99, sp99) = (b.pct(0.5), b.pct(0.99), s.pct(0.99));
        println!(
            "{name:<20} {p50:>10.3} {p99:>10.3} {sp99:>12.3} {:>10.2} {:>12.2}",
            p99 / sp99.max(1e-9),
            p99 / fsync_p99.max(1e-9)
        );
    }
    println!("process RSS after both runs: {} KiB", rss_kib());
}
