//! `test-images`: builds the catalog images, pushes them to a registry, derives encrypted and
//! signed variants, and writes a JSON manifest of everything it built.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;
use test_images::{catalog, layout::Layout, push};

#[derive(Parser)]
#[command(
    version,
    about = "Build and push guestpull's test images (deterministic, no Docker)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the catalog.
    List,
    /// Build images and push them to a registry.
    Build(Box<BuildArgs>),
    /// Write the node installer's image (guestpull-deploy, guestpull-snapshotter,
    /// nydus-overlayfs and their shared libraries, nothing else) as an OCI layout.
    InstallerImage(InstallerArgs),
}

#[derive(clap::Args)]
struct InstallerArgs {
    /// Directory holding guestpull-deploy, guestpull-snapshotter and nydus-overlayfs.
    #[arg(long)]
    bin_dir: PathBuf,
    /// The OCI layout directory to write (created, or added to).
    #[arg(long)]
    dest: PathBuf,
    /// The name of the image in the layout's index.json.
    #[arg(long, default_value = "guestpull-deploy")]
    tag: String,
    /// Also push it there with skopeo, e.g. 127.0.0.1:5000/guestpull/guestpull-deploy:latest
    /// (plain HTTP registry).
    #[arg(long)]
    push: Option<String>,
}

#[derive(clap::Args)]
struct BuildArgs {
    /// Registry host (plain HTTP), e.g. 127.0.0.1:5000.
    #[arg(long)]
    registry: String,
    /// Repository prefix: images go to <registry>/<prefix>/<name>:latest.
    #[arg(long, default_value = "guestpull")]
    prefix: String,
    /// Build only these catalog images (comma-separated); default all but `large`.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Total payload of the `large` image in MiB.
    #[arg(long, default_value_t = 100)]
    large_mb: usize,
    /// The static busybox copied into every image.
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Working directory for the OCI layout.
    #[arg(long, default_value = "/tmp/guestpull-test-images")]
    work_dir: PathBuf,
    /// Also push `<name>:jwe`, every layer encrypted to this public key (skopeo/ocicrypt JWE).
    #[arg(long)]
    jwe_public_key: Option<PathBuf>,
    /// Also push `<name>:kbs`, layer keys wrapped by this KEK file (32 bytes) through
    /// `guestpull-keyprovider` and ctr-imgcrypt; needs --kbs-kid and --containerd-address.
    #[arg(long)]
    kbs_kek: Option<PathBuf>,
    /// KBS resource URI the KEK is registered under, e.g. kbs:///default/key/image.
    #[arg(long)]
    kbs_kid: Option<String>,
    /// containerd socket ctr-imgcrypt encrypts through (any version; only its content store is used).
    #[arg(long)]
    containerd_address: Option<PathBuf>,
    /// The ctr-imgcrypt binary.
    #[arg(
        long,
        default_value = "/var/cache/guestpull-lab/imgcrypt/usr/bin/ctr-imgcrypt"
    )]
    ctr_imgcrypt: PathBuf,
    /// The guestpull-keyprovider binary (default: next to this binary).
    #[arg(long)]
    keyprovider: Option<PathBuf>,
    /// Also push `<name>:gpg-signed`, signed by this GPG key fingerprint (needs --gnupg-home and --registries-d).
    #[arg(long)]
    gpg_fingerprint: Option<String>,
    /// GNUPGHOME holding the signing key.
    #[arg(long)]
    gnupg_home: Option<PathBuf>,
    /// registries.d directory naming the lookaside where simple signatures are written.
    #[arg(long)]
    registries_d: Option<PathBuf>,
    /// Sign `<name>:latest` (and `<name>:jwe`, `<name>:kbs`) with this cosign private key (COSIGN_PASSWORD from the environment).
    #[arg(long)]
    cosign_key: Option<PathBuf>,
    /// The cosign binary.
    #[arg(long, default_value = "/var/cache/guestpull-lab/cosign/usr/bin/cosign")]
    cosign: PathBuf,
    /// Also push `<name>:nydus`, the same tree as a nydus (RAFS v6) image for lazy pulling,
    /// and with --jwe-public-key `<name>:nydus-jwe` (encrypted chunks, ocicrypt bootstrap).
    #[arg(long)]
    nydus: bool,
    /// Where to write the JSON manifest of what was built.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::List => {
            for (n, d) in catalog::names() {
                println!("{n:24} {d}");
            }
            Ok(())
        }
        Cmd::Build(a) => build(*a),
        Cmd::InstallerImage(a) => installer_image(a),
    }
}

fn installer_image(a: InstallerArgs) -> Result<()> {
    let written = test_images::installer::write(&a.bin_dir, &a.dest, &a.tag)?;
    eprintln!("wrote {}:{} ({})", a.dest.display(), a.tag, written.digest);
    if let Some(dest) = &a.push {
        push::push_layout(&a.dest, &a.tag, dest)?;
        eprintln!("pushed {dest} ({})", written.digest);
    }
    println!("{}", serde_json::to_string_pretty(&written)?);
    Ok(())
}

fn build(a: BuildArgs) -> Result<()> {
    let names: Vec<String> = if a.only.is_empty() {
        catalog::names()
            .iter()
            .map(|(n, _)| n.to_string())
            .filter(|n| n != "large")
            .collect()
    } else {
        a.only.clone()
    };
    std::fs::create_dir_all(&a.work_dir)?;
    let mut layout = Layout::create(&a.work_dir.join("oci"))?;
    let mut built = Vec::new();
    for name in &names {
        let repo = format!("{}/{}/{name}", a.registry, a.prefix);
        let (desc, info) = if name == "multiarch" {
            let (amd, arm) = catalog::multiarch(&a.busybox)?;
            let (d1, w1) = layout.write_image(&amd)?;
            let (d2, _) = layout.write_image(&arm)?;
            let (idx, digest) = layout.write_index(vec![d1, d2])?;
            (idx, json!({"index_digest": digest, "amd64": w1}))
        } else {
            let spec = catalog::spec(name, &a.busybox, a.large_mb)?.with_context(|| {
                format!("no catalog image named {name:?} (see `test-images list`)")
            })?;
            let (d, w) = layout.write_image(&spec)?;
            (d, serde_json::to_value(&w)?)
        };
        layout.tag(&desc, name)?;
        let reference = format!("{repo}:latest");
        push::push_layout(layout.dir(), name, &reference)?;
        let digest = desc["digest"].as_str().unwrap_or_default().to_string();
        eprintln!("pushed {reference} ({digest})");
        // `needs`: per variant, the key or policy a puller must be given to accept it.
        let mut entry = json!({"name": name, "reference": reference, "digest": digest, "image": info, "variants": {}, "needs": {}});
        if let Some(key) = &a.jwe_public_key {
            let dest = format!("{repo}:jwe");
            push::encrypt_jwe(&reference, &dest, key)?;
            entry["variants"]["jwe"] = json!(dest);
            entry["needs"]["jwe"] = json!(format!(
                "the RSA private key matching {} (guest-puller [keys] jwe_private_keys, e.g. from the KBS)",
                key.display()
            ));
        }
        if let Some(kek) = &a.kbs_kek {
            let (Some(kid), Some(ctrd)) = (&a.kbs_kid, &a.containerd_address) else {
                bail!("--kbs-kek needs --kbs-kid and --containerd-address");
            };
            let keyprovider = match &a.keyprovider {
                Some(p) => p.clone(),
                None => std::env::current_exe()?.with_file_name("guestpull-keyprovider"),
            };
            let wrap = push::KbsWrap {
                ctr_imgcrypt: &a.ctr_imgcrypt,
                containerd: ctrd,
                keyprovider: &keyprovider,
                kek,
                work_dir: &a.work_dir,
            };
            let dest = format!("{repo}:kbs");
            wrap.encrypt(&reference, &dest, kid)?;
            entry["variants"]["kbs"] = json!(dest);
            entry["needs"]["kbs"] = json!(format!(
                "the KEK in {} registered in the KBS as {kid} (guest-puller attests and fetches it)",
                kek.display()
            ));
        }
        if a.nydus {
            let spec = if name == "multiarch" {
                catalog::multiarch(&a.busybox)?.0
            } else {
                catalog::spec(name, &a.busybox, a.large_mb)?.context("catalog image")?
            };
            let scratch = test_images::nydus::scratch_dir(&a.work_dir, name);
            let tag = format!("{name}-nydus");
            let (d, w) =
                test_images::nydus::write_image(&layout, &spec, &scratch, &Default::default())?;
            layout.tag(&d, &tag)?;
            let dest = format!("{repo}:nydus");
            push::push_layout(layout.dir(), &tag, &dest)?;
            entry["variants"]["nydus"] = json!(dest);
            entry["nydus"] = serde_json::to_value(&w)?;
            if let Some(key) = &a.jwe_public_key {
                let tag = format!("{name}-nydus-enc");
                let (d, _) = test_images::nydus::write_image(
                    &layout,
                    &spec,
                    &scratch,
                    &test_images::nydus::BuildOptions {
                        encrypt: true,
                        ..Default::default()
                    },
                )?;
                layout.tag(&d, &tag)?;
                let dest = format!("{repo}:nydus-jwe");
                push::push_layout_jwe_last_layer(layout.dir(), &tag, &dest, key)?;
                entry["variants"]["nydus-jwe"] = json!(dest);
                entry["needs"]["nydus-jwe"] = json!(format!(
                    "the RSA private key matching {} (its bootstrap carries the chunk keys)",
                    key.display()
                ));
            }
        }
        if let Some(fpr) = &a.gpg_fingerprint {
            let (Some(home), Some(regd)) = (&a.gnupg_home, &a.registries_d) else {
                bail!("--gpg-fingerprint needs --gnupg-home and --registries-d");
            };
            let dest = format!("{repo}:gpg-signed");
            push::sign_gpg(&reference, &dest, fpr, home, regd)?;
            entry["variants"]["gpg-signed"] = json!(dest);
            entry["needs"]["gpg-signed"] = json!(format!(
                "a signedBy GPGKeys policy with the public key of {fpr} and the lookaside from {}",
                regd.display()
            ));
        }
        if let Some(key) = &a.cosign_key {
            // Signs the image and every variant: a signature binds one manifest digest.
            let password = std::env::var("COSIGN_PASSWORD").unwrap_or_default();
            let mut signed = vec![format!("{repo}@{digest}")];
            for variant in ["jwe", "kbs", "nydus", "nydus-jwe"] {
                if let Some(r) = entry["variants"][variant].as_str() {
                    signed.push(format!("{repo}@{}", push::manifest_digest(r)?));
                }
            }
            for s in &signed {
                push::sign_cosign(&a.cosign, s, key, &password)?;
            }
            entry["variants"]["cosign-signed"] = json!(signed);
            entry["needs"]["cosign-signed"] = json!(format!(
                "a sigstoreSigned policy with the public key of {} and signedIdentity matchRepository",
                key.display()
            ));
        }
        built.push(entry);
    }
    let doc = serde_json::to_string_pretty(&json!({"registry": a.registry, "images": built}))?;
    match &a.out {
        Some(p) => std::fs::write(p, doc).with_context(|| format!("writing {}", p.display()))?,
        None => println!("{doc}"),
    }
    Ok(())
}
