//! Benchmark (ignored by default; prints, never asserts timings):
//! `cargo test -p integration --test puller_bench -- --ignored --nocapture`
//!
//! All files live on a tmpfs (the guest's /run is one). A JWE-encrypted gzip image built from /usr/share (~650 MB uncompressed, override the source
//! tree with GUESTPULL_BENCH_TREE) on the loopback registry:
//! - guest-puller pull (decrypt + inflate + unpack + overlay mount), wall time and peak RSS;
//! - the Go reference pipeline: `skopeo copy --decryption-key … oci:` then `umoci unpack`;
//! - raw `gzip -dc` of the same (plaintext) layer, the physical floor of one gzip stream.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use integration::lab::run_ok;
use integration::{bin_path, Lab, Registry};

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

fn du_mb(p: &Path) -> f64 {
    let out = run_ok(Command::new("du").args(["-sk"]).arg(p));
    out.split_whitespace()
        .next()
        .unwrap()
        .parse::<f64>()
        .unwrap()
        / 1024.0
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn bench_encrypted_gzip_image() {
    Lab::require_root();
    for c in ["umoci", "skopeo", "openssl", "gzip"] {
        Lab::require_cmd(c, c);
    }
    let lab = Lab::new("puller-bench");
    let reg = Registry::start(&lab);
    // Everything written lives on tmpfs, as the guest's /run does; the lab unmounts it on drop.
    let scratch = lab.tmpfs("tmpfs", "12g");
    let at = |p: &str| scratch.join(p);
    let tree = std::env::var("GUESTPULL_BENCH_TREE").unwrap_or_else(|_| "/usr/share".into());

    // Build: umoci layout with one gzip layer holding `tree`, then skopeo JWE-encrypts on push.
    let layout = at("oci");
    let img = format!("{}:img", layout.display());
    run_ok(
        Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout),
    );
    run_ok(Command::new("umoci").args(["new", "--image", &img]));
    let bundle = at("build");
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--image", &img])
            .arg(&bundle),
    );
    let dest = bundle.join("rootfs/data");
    run_ok(Command::new("cp").arg("-a").arg(&tree).arg(&dest));
    run_ok(
        Command::new("umoci")
            .args(["repack", "--image", &img])
            .arg(&bundle),
    );
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
    let keys = lab.join("keys");
    fs::create_dir_all(&keys).unwrap();
    run_ok(
        Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(keys.join("k.pem"))
            .arg("2048"),
    );
    run_ok(
        Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(keys.join("k.pem"))
            .arg("-out")
            .arg(keys.join("k.pub")),
    );
    let image = format!("{}/bench/enc:v1", reg.host());
    run_ok(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        "--encryption-key",
        &format!("jwe:{}", keys.join("k.pub").display()),
        &format!("oci:{img}"),
        &format!("docker://{image}"),
    ]));
    let unpacked_mb = du_mb(&bundle.join("rootfs"));
    // The plaintext gzip layer: the largest blob in the umoci layout.
    let layer = fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let blob_mb = fs::metadata(&layer).unwrap().len() as f64 / 1048576.0;
    fs::remove_dir_all(&bundle).unwrap();

    // Baseline 1: raw gunzip of the same layer.
    let (gunzip_s, _) = timed(
        Command::new("sh")
            .arg("-c")
            .arg(format!("gzip -dc {} > /dev/null", layer.display())),
    );

    // Baseline 2: Go reference pipeline.
    let ref_layout = at("ref");
    let (skopeo_s, skopeo_rss) = timed(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        "--decryption-key",
        &keys.join("k.pem").display().to_string(),
        &format!("docker://{image}"),
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

    // guest-puller.
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
    let (gp_s, gp_rss) = timed(
        Command::new(bin_path("guest-puller"))
            .args(["pull", "--config"])
            .arg(&cfg)
            .arg(&image)
            .arg("--bundle")
            .arg(at("gp-bundle"))
            .env("GUEST_PULLER_LOG", "warn"),
    );
    assert!(at("gp-bundle/rootfs/data").is_dir());

    let reference_s = skopeo_s + umoci_s;
    println!("\n=== guest-puller benchmark ({tree}: {unpacked_mb:.0} MB unpacked, {blob_mb:.0} MB gzip, JWE-encrypted) ===");
    println!(
        "raw gzip -dc                  : {gunzip_s:7.2} s  ({:.0} MB/s uncompressed)",
        unpacked_mb / gunzip_s
    );
    println!(
        "skopeo copy --decryption-key  : {skopeo_s:7.2} s  peak RSS {:.0} MB",
        skopeo_rss as f64 / 1024.0
    );
    println!(
        "umoci unpack                  : {umoci_s:7.2} s  peak RSS {:.0} MB",
        umoci_rss as f64 / 1024.0
    );
    println!(
        "guest-puller pull             : {gp_s:7.2} s  peak RSS {:.0} MB",
        gp_rss as f64 / 1024.0
    );
    println!("speed-up vs skopeo+umoci      : {:.2}x", reference_s / gp_s);
    println!(
        "share of raw gunzip throughput: {:.0} %",
        100.0 * gunzip_s / gp_s
    );
}
