//! Pushing layouts to a registry and deriving encrypted and signed variants with real tools.

use std::path::Path;
use std::process::Command;

/// Why a tool step failed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The tool is not installed.
    #[error("`{tool}` not found ({hint})")]
    Missing { tool: String, hint: String },
    /// The tool ran and failed.
    #[error("{cmd} failed: {stderr}")]
    Failed { cmd: String, stderr: String },
}

fn run(cmd: &mut Command, hint: &str) -> Result<String, ToolError> {
    let prog = cmd.get_program().to_string_lossy().to_string();
    let out = cmd.output().map_err(|_| ToolError::Missing {
        tool: prog.clone(),
        hint: hint.into(),
    })?;
    if !out.status.success() {
        return Err(ToolError::Failed {
            cmd: format!("{cmd:?}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Copies tag `tag` of the layout at `layout` to `docker://<dest>` (plain HTTP registry),
/// keeping blobs and manifests byte for byte (`--all` keeps every index member).
pub fn push_layout(layout: &Path, tag: &str, dest: &str) -> Result<(), ToolError> {
    run(
        Command::new("skopeo").args([
            "copy",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &format!("oci:{}:{tag}", layout.display()),
            &format!("docker://{dest}"),
        ]),
        "apt-get install skopeo",
    )
    .map(|_| ())
}

/// Re-pushes `src` as `dest` with every layer encrypted to the RSA/EC public key `pub_pem`
/// (ocicrypt JWE recipients, as `skopeo copy --encryption-key jwe:` makes them).
pub fn encrypt_jwe(src: &str, dest: &str, pub_pem: &Path) -> Result<(), ToolError> {
    run(
        Command::new("skopeo").args([
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            "--encryption-key",
            &format!("jwe:{}", pub_pem.display()),
            &format!("docker://{src}"),
            &format!("docker://{dest}"),
        ]),
        "apt-get install skopeo",
    )
    .map(|_| ())
}

/// Pushes tag `tag` of the layout at `layout` to `dest` with only its last layer encrypted to
/// `pub_pem`: for a nydus image that is the bootstrap, which holds the chunk keys (so it never
/// reaches the registry in the clear); the data blob is already encrypted chunk by chunk.
pub fn push_layout_jwe_last_layer(
    layout: &Path,
    tag: &str,
    dest: &str,
    pub_pem: &Path,
) -> Result<(), ToolError> {
    run(
        Command::new("skopeo").args([
            "copy",
            "--dest-tls-verify=false",
            "--encryption-key",
            &format!("jwe:{}", pub_pem.display()),
            "--encrypt-layer",
            "-1",
            &format!("oci:{}:{tag}", layout.display()),
            &format!("docker://{dest}"),
        ]),
        "apt-get install skopeo",
    )
    .map(|_| ())
}

/// How to reach the image owner's containerd and tools for a KBS-wrapped variant.
pub struct KbsWrap<'a> {
    /// `ctr-imgcrypt` (trixie's imgcrypt): it encrypts through containerd's content store.
    pub ctr_imgcrypt: &'a Path,
    /// The containerd socket ctr-imgcrypt talks to.
    pub containerd: &'a Path,
    /// `guestpull-keyprovider`, run by ocicrypt as the `guestpull` cmd keyprovider.
    pub keyprovider: &'a Path,
    /// The 32-byte KEK file the keyprovider wraps layer keys with.
    pub kek: &'a Path,
    /// Working directory for the ocicrypt keyprovider config.
    pub work_dir: &'a Path,
}

impl KbsWrap<'_> {
    fn imgcrypt(&self, args: &[&str]) -> Result<String, ToolError> {
        let cfg = self.work_dir.join("ocicrypt-keyprovider.json");
        let providers = serde_json::json!({"key-providers": {"guestpull": {"cmd": {
            "path": self.keyprovider,
            "args": ["cmd", "--kek-file", self.kek],
        }}}});
        std::fs::write(&cfg, providers.to_string()).map_err(|e| ToolError::Failed {
            cmd: format!("writing {}", cfg.display()),
            stderr: e.to_string(),
        })?;
        run(
            Command::new(self.ctr_imgcrypt)
                .arg("--address")
                .arg(self.containerd)
                .args(["--namespace", "guestpull-test-images"])
                .args(args)
                .env("OCICRYPT_KEYPROVIDER_CONFIG", &cfg),
            "run integration/scripts/fetch-components.sh (imgcrypt) and start a containerd",
        )
    }

    /// Re-pushes `src` as `dest` with every layer key wrapped by the KEK under key id `kid`
    /// (`kbs:///<repo>/<type>/<tag>`), the way an image owner encrypts for a KBS.
    pub fn encrypt(&self, src: &str, dest: &str, kid: &str) -> Result<(), ToolError> {
        self.imgcrypt(&["images", "pull", "--plain-http", src])?;
        self.imgcrypt(&[
            "images",
            "encrypt",
            "--recipient",
            &format!("provider:guestpull:{kid}"),
            "--platform",
            "linux/amd64",
            src,
            dest,
        ])?;
        self.imgcrypt(&["images", "push", "--plain-http", dest])?;
        self.imgcrypt(&["images", "rm", src, dest]).map(|_| ())
    }
}

/// Re-pushes `src` as `dest` signed by GPG key `fingerprint` (simple signing); signatures go to
/// the lookaside configured in `registries_d`.
pub fn sign_gpg(
    src: &str,
    dest: &str,
    fingerprint: &str,
    gnupg_home: &Path,
    registries_d: &Path,
) -> Result<(), ToolError> {
    run(
        Command::new("skopeo")
            .env("GNUPGHOME", gnupg_home)
            .arg("--registries.d")
            .arg(registries_d)
            .args([
                "copy",
                "--src-tls-verify=false",
                "--dest-tls-verify=false",
                "--sign-by",
                fingerprint,
                &format!("docker://{src}"),
                &format!("docker://{dest}"),
            ]),
        "apt-get install skopeo gnupg",
    )
    .map(|_| ())
}

/// Signs `image@digest` with cosign key `key` (password in `password`), offline (no tlog).
pub fn sign_cosign(
    cosign: &Path,
    image_at_digest: &str,
    key: &Path,
    password: &str,
) -> Result<(), ToolError> {
    run(
        Command::new(cosign)
            .env("COSIGN_PASSWORD", password)
            .args(["sign", "--key"])
            .arg(key)
            .args([
                "--tlog-upload=false",
                "--allow-insecure-registry",
                "--allow-http-registry",
                "--yes",
                image_at_digest,
            ]),
        "run integration/scripts/fetch-components.sh",
    )
    .map(|_| ())
}

/// The digest of the manifest `reference` resolves to, as the registry serves it.
pub fn manifest_digest(reference: &str) -> Result<String, ToolError> {
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .output()
        .map_err(|_| ToolError::Missing {
            tool: "skopeo".into(),
            hint: "apt-get install skopeo".into(),
        })?;
    if !out.status.success() {
        return Err(ToolError::Failed {
            cmd: format!("skopeo inspect --raw {reference}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(crate::layer::sha256_digest(&out.stdout))
}
