//! Benchmark (ignored by default; prints, never asserts timings):
//! `cargo test -p integration --test puller_bench -- --ignored --nocapture`
//!
//! Everything lives on one tmpfs (the guest's /run is one). Two JWE-encrypted gzip images on the
//! loopback registry, pulled by the guest build of guest-puller (static, release, default
//! features: what the VM test boots):
//! - one layer holding /usr/share (override with GUESTPULL_BENCH_TREE), against the Go reference
//!   pipeline (`skopeo copy --decryption-key` then `umoci unpack`) and the machine's floor for
//!   that layer: `libdeflate-gunzip -c` of it (inflate) and `tar -x` of its tar (write);
//! - five layers of about 230 MB each from /usr/share and /usr/bin (GUESTPULL_BENCH_MULTI=0 skips
//!   it), against the sum of its layers' floors divided by the two cores.
//!
//! Each figure is the median of GUESTPULL_BENCH_ROUNDS runs (default 3). guest-puller's per-stage
//! times come from its `pull` output, so the bottleneck of the run is visible.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use integration::lab::run_ok;
use integration::{Lab, Registry};

/// Runs `cmd` under GNU time; returns (wall seconds, peak RSS KiB).
fn timed(cmd: &mut Command) -> (f64, u64) {
    let stats = tempfile::NamedTempFile::new().unwrap();
    let mut t = Command::new("/usr/bin/time");
    t.arg("-f").arg("%e %M").arg("-o").arg(stats.path());
    t.arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            t.env(k, v);
        }
    }
    let start = Instant::now();
    let out = t.output().unwrap();
    let wall = start.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd.get_program(),
        String::from_utf8_lossy(&out.stderr)
    );
    let s = fs::read_to_string(stats.path()).unwrap();
    let rss = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (wall, rss)
}

fn sh(script: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(script);
    c
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn rounds() -> usize {
    std::env::var("GUESTPULL_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1)
}

fn du_mb(p: &Path) -> f64 {
    let out = run_ok(Command::new("du").args(["-sk"]).arg(p));
    out.split_whitespace()
        .next()
        .unwrap()
        .parse::<f64>()
        .unwrap()
        / 1024.0
}

/// An image built with umoci, one layer per `layers` entry (each a list of trees, copied to
/// `/data<i>/<parent name>/`), pushed JWE-encrypted by skopeo as `image`.
struct Built {
    image: String,
    /// The plaintext gzip layers, bottom first.
    layers: Vec<PathBuf>,
    unpacked_mb: f64,
}

fn build_image(
    scratch: &Path,
    name: &str,
    layers: &[Vec<PathBuf>],
    reg: &Registry,
    public_key: &Path,
) -> Built {
    let layout = scratch.join(format!("{name}-oci"));
    let img = format!("{}:img", layout.display());
    run_ok(
        Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout),
    );
    run_ok(Command::new("umoci").args(["new", "--image", &img]));
    let bundle = scratch.join(format!("{name}-build"));
    for (i, trees) in layers.iter().enumerate() {
        run_ok(
            Command::new("umoci")
                .args(["unpack", "--image", &img])
                .arg(&bundle),
        );
        for t in trees {
            // Under the tree's parent's name, so /usr/share/gdb and /usr/bin/gdb both fit.
            let parent = t.parent().and_then(|p| p.file_name()).unwrap_or_default();
            let dest = bundle.join(format!("rootfs/data{i}")).join(parent);
            fs::create_dir_all(&dest).unwrap();
            run_ok(Command::new("cp").arg("-a").arg(t).arg(&dest));
        }
        run_ok(
            Command::new("umoci")
                .args(["repack", "--image", &img])
                .arg(&bundle),
        );
        if i + 1 < layers.len() {
            fs::remove_dir_all(&bundle).unwrap();
        }
    }
    let unpacked_mb = du_mb(&bundle.join("rootfs"));
    fs::remove_dir_all(&bundle).unwrap();
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
    let image = format!("{}/bench/{name}:v1", reg.host());
    run_ok(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        "--encryption-key",
        &format!("jwe:{}", public_key.display()),
        &format!("oci:{img}"),
        &format!("docker://{image}"),
    ]));
    // The layers, bottom first, from the manifest umoci wrote.
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(blob(&mdigest)).unwrap()).unwrap();
    let layers = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| blob(l["digest"].as_str().unwrap()))
        .collect();
    Built {
        image,
        layers,
        unpacked_mb,
    }
}

/// The machine's floor for one gzip layer: (inflate, write) seconds, medians of `rounds()`.
fn floors(scratch: &Path, layer: &Path) -> (f64, f64) {
    let tar = scratch.join("floor.tar");
    run_ok(&mut sh(&format!(
        "libdeflate-gunzip -c {} > {}",
        layer.display(),
        tar.display()
    )));
    let mut inflate = Vec::new();
    let mut write = Vec::new();
    for _ in 0..rounds() {
        inflate.push(
            timed(&mut sh(&format!(
                "libdeflate-gunzip -c {} > /dev/null",
                layer.display()
            )))
            .0,
        );
        let out = scratch.join("floor-x");
        fs::create_dir_all(&out).unwrap();
        write.push(timed(Command::new("tar").arg("-C").arg(&out).arg("-xf").arg(&tar)).0);
        run_ok(Command::new("rm").arg("-rf").arg(&out));
    }
    fs::remove_file(&tar).unwrap();
    (median(inflate), median(write))
}

/// One `guest-puller pull` into a fresh work dir: (wall s, peak RSS KiB, `pull` output).
fn pull_once(
    puller: &Path,
    cfg: &Path,
    work: &Path,
    image: &str,
    bundle: &Path,
) -> (f64, u64, serde_json::Value) {
    let _ = fs::remove_dir_all(work);
    fs::create_dir_all(work).unwrap();
    let out = tempfile::NamedTempFile::new().unwrap();
    let (wall, rss) = timed(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "exec {} pull --config {} --bundle {} {image} > {}",
                puller.display(),
                cfg.display(),
                bundle.display(),
                out.path().display()
            ))
            .env("GUEST_PULLER_LOG", "warn")
            .env_remove("RUST_BACKTRACE"),
    );
    let json = serde_json::from_slice(&fs::read(out.path()).unwrap()).unwrap();
    run_ok(
        Command::new(puller)
            .args(["unmount", "--config"])
            .arg(cfg)
            .arg("--bundle")
            .arg(bundle),
    );
    (wall, rss, json)
}

/// Medians over `rounds()` pulls: (wall s, peak RSS KiB, the median run's stage summary).
fn pull(puller: &Path, cfg: &Path, work: &Path, image: &str, bundle: &Path) -> (f64, u64, String) {
    let mut runs: Vec<(f64, u64, serde_json::Value)> = (0..rounds())
        .map(|_| pull_once(puller, cfg, work, image, bundle))
        .collect();
    eprintln!(
        "guest-puller pull rounds: {:?} s",
        runs.iter()
            .map(|r| (r.0 * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    );
    runs.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    let peak = runs.iter().map(|r| r.1).max().unwrap();
    let (wall, _, json) = &runs[runs.len() / 2];
    let stages = json["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let t = &l["timings_ms"];
            let s = |k: &str| {
                format!(
                    "{k} {:.2}/{:.2}/{:.2}",
                    t[k]["busy"].as_f64().unwrap() / 1e3,
                    t[k]["starved"].as_f64().unwrap() / 1e3,
                    t[k]["blocked"].as_f64().unwrap() / 1e3
                )
            };
            format!(
                "  wall {:.2} s | {} | {} | {}",
                t["wall"].as_f64().unwrap() / 1e3,
                s("decrypt"),
                s("inflate"),
                s("write")
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    (*wall, peak, stages)
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn bench_encrypted_gzip_images() {
    Lab::require_root();
    for (c, p) in [
        ("umoci", "umoci"),
        ("skopeo", "skopeo"),
        ("openssl", "openssl"),
        ("libdeflate-gunzip", "libdeflate-tools"),
    ] {
        Lab::require_cmd(c, p);
    }
    let puller = integration::vm::static_guest_puller();
    let lab = Lab::new("puller-bench");
    let reg = Registry::start(&lab);
    // Everything written lives on tmpfs, as the guest's /run does; the lab unmounts it on drop.
    let scratch = lab.tmpfs("tmpfs", "16g");
    let at = |p: &str| scratch.join(p);
    let keys = lab.join("keys");
    fs::create_dir_all(&keys).unwrap();
    integration::lab::rsa_key_pair(&keys.join("k.pem"), &keys.join("k.pub"));
    let cfg = lab.join("puller.toml");
    fs::write(
        &cfg,
        format!(
            "[image]\nwork_dir = \"{}\"\nbundle_roots = [\"{}\"]\n\
             [image.registry_config]\ninsecure_registries = [\"{}\"]\n[keys]\njwe_private_keys = [\"{}\"]\n",
            at("work").display(),
            scratch.display(),
            reg.host(),
            keys.join("k.pem").display()
        ),
    )
    .unwrap();

    // One layer.
    let tree = std::env::var("GUESTPULL_BENCH_TREE").unwrap_or_else(|_| "/usr/share".into());
    let one = build_image(
        &scratch,
        "one",
        &[vec![PathBuf::from(&tree)]],
        &reg,
        &keys.join("k.pub"),
    );
    let layer = &one.layers[0];
    let blob_mb = fs::metadata(layer).unwrap().len() as f64 / 1048576.0;
    let (inflate_floor, write_floor) = floors(&scratch, layer);
    let floor = inflate_floor.max(write_floor);
    let gunzip = median(
        (0..rounds())
            .map(|_| {
                timed(&mut sh(&format!(
                    "gzip -dc {} > /dev/null",
                    layer.display()
                )))
                .0
            })
            .collect(),
    );
    let ref_layout = at("ref");
    let (skopeo_s, skopeo_rss) = timed(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        "--decryption-key",
        &keys.join("k.pem").display().to_string(),
        &format!("docker://{}", one.image),
        &format!("oci:{}:ref", ref_layout.display()),
    ]));
    let (umoci_s, umoci_rss) = timed(
        Command::new("umoci")
            .args([
                "unpack",
                "--image",
                &format!("{}:ref", ref_layout.display()),
            ])
            .arg(at("ref-bundle")),
    );
    run_ok(
        Command::new("rm")
            .arg("-rf")
            .arg(&ref_layout)
            .arg(at("ref-bundle")),
    );
    let (gp_s, gp_rss, stages) = pull(&puller, &cfg, &at("work"), &one.image, &at("gp-bundle"));

    let reference_s = skopeo_s + umoci_s;
    println!(
        "\n=== guest-puller eager pull ({tree}: {:.0} MB unpacked, {blob_mb:.0} MB gzip, JWE; median of {}) ===",
        one.unpacked_mb,
        rounds()
    );
    println!("guest-puller                 : {}", puller.display());
    println!("inflate backend              : zlib-ng (flate2 zlib-ng-compat)");
    println!("floor: libdeflate-gunzip -c  : {inflate_floor:7.2} s");
    println!("floor: tar -x (tmpfs)        : {write_floor:7.2} s");
    println!("gzip -dc                     : {gunzip:7.2} s");
    println!(
        "skopeo copy --decryption-key : {skopeo_s:7.2} s  peak RSS {:.0} MB",
        skopeo_rss as f64 / 1024.0
    );
    println!(
        "umoci unpack                 : {umoci_s:7.2} s  peak RSS {:.0} MB",
        umoci_rss as f64 / 1024.0
    );
    println!(
        "guest-puller pull            : {gp_s:7.2} s  peak RSS {:.1} MB",
        gp_rss as f64 / 1024.0
    );
    println!("stages (busy/starved/blocked s):\n{stages}");
    println!(
        "pull / max(inflate, write floor): {:.2}x  (target <= 1.5)",
        gp_s / floor
    );
    println!(
        "speed-up vs skopeo+umoci        : {:.2}x  (target >= 6)",
        reference_s / gp_s
    );

    if std::env::var("GUESTPULL_BENCH_MULTI").as_deref() == Ok("0") {
        return;
    }
    // Five layers of similar size: /usr/share's and /usr/bin's entries, largest first, each
    // into the lightest layer so far.
    let mut entries: Vec<(f64, PathBuf)> = ["/usr/share", "/usr/bin"]
        .iter()
        .flat_map(|d| fs::read_dir(d).unwrap().map(|e| e.unwrap().path()))
        .map(|p| (du_mb(&p), p))
        .collect();
    entries.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
    let mut bins: Vec<(f64, Vec<PathBuf>)> = vec![(0.0, Vec::new()); 5];
    for (mb, p) in entries {
        let lightest = bins
            .iter_mut()
            .min_by(|a, b| a.0.partial_cmp(&b.0).unwrap())
            .unwrap();
        lightest.0 += mb;
        lightest.1.push(p);
    }
    let layers: Vec<Vec<PathBuf>> = bins.into_iter().map(|b| b.1).collect();
    let five = build_image(&scratch, "five", &layers, &reg, &keys.join("k.pub"));
    let mut floor_sum = 0.0;
    let mut blobs_mb = 0.0;
    for l in &five.layers {
        let (i, w) = floors(&scratch, l);
        floor_sum += i.max(w);
        blobs_mb += fs::metadata(l).unwrap().len() as f64 / 1048576.0;
    }
    let (gp5_s, gp5_rss, stages5) = pull(&puller, &cfg, &at("work"), &five.image, &at("gp-bundle"));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    println!(
        "\n=== five layers ({:.0} MB unpacked, {blobs_mb:.0} MB gzip, JWE; median of {}) ===",
        five.unpacked_mb,
        rounds()
    );
    println!(
        "sum of layer floors          : {floor_sum:7.2} s  (/ {cores} cores = {:.2} s)",
        floor_sum / cores
    );
    println!(
        "guest-puller pull            : {gp5_s:7.2} s  peak RSS {:.1} MB",
        gp5_rss as f64 / 1024.0
    );
    println!("stages (busy/starved/blocked s):\n{stages5}");
    println!(
        "pull / (sum of floors / cores) : {:.2}x  (target <= 1.5)",
        gp5_s / (floor_sum / cores)
    );
    println!(
        "pull / one layer's floor sum   : {:.2}x of serial floors",
        gp5_s / floor_sum
    );
}
