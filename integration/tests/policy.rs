//! Signature policy against real signers: images pushed to Debian's docker-registry, signed with
//! `skopeo --sign-by` (GPG simple signing into a lookaside directory, also served over HTTP) and
//! with the real `cosign sign --key` (signature manifest at the `sha256-<hex>.sig` tag), then
//! checked with `guest_puller::policy::PolicyEvaluator`.
//!
//! Needs: skopeo, umoci, gnupg, python3 (HTTP lookaside), docker-registry, busybox-static, and
//! cosign unpacked by `integration/scripts/fetch-components.sh` into the lab cache.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use guest_puller::policy::{
    cosign_signature_tag, CosignSignature, PolicyError, PolicyEvaluator, SignatureSource,
    COSIGN_PAYLOAD_MEDIA_TYPE, COSIGN_SIGNATURE_ANNOTATION,
};
use guest_puller::resource::{ResourceError, ResourceFetcher};
use integration::containerd::lab_cache;
use integration::images::inspect;
use integration::lab::{free_port, run_ok, wait_for};
use integration::{push_test_image, Lab, Registry};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

/// Reads `file://` URIs from disk, like the puller's fetcher does for local keys.
struct FileFetcher;

#[async_trait::async_trait]
impl ResourceFetcher for FileFetcher {
    async fn fetch(&self, uri: &str) -> Result<Zeroizing<Vec<u8>>, ResourceError> {
        let path = uri
            .strip_prefix("file://")
            .ok_or_else(|| ResourceError::InvalidUri {
                uri: uri.into(),
                reason: "only file:// in this test".into(),
            })?;
        std::fs::read(path)
            .map(Zeroizing::new)
            .map_err(|e| ResourceError::NotFound {
                uri: uri.into(),
                reason: e.to_string(),
            })
    }
}

/// Cosign signatures read from the registry over plain HTTP (what the puller's registry client
/// does, reimplemented independently here so the test does not trust the code under test).
struct HttpSignatures {
    base: String,
    http: reqwest::Client,
}

#[async_trait::async_trait]
impl SignatureSource for HttpSignatures {
    async fn cosign_signatures(
        &self,
        image: &oci_client::Reference,
        manifest_digest: &str,
    ) -> Result<Vec<CosignSignature>, PolicyError> {
        let err = |e: String| {
            PolicyError::Registry(guest_puller::registry::RegistryError::Request {
                reference: image.whole(),
                kind: guest_puller::error::ErrorKind::Unavailable,
                source: e.into(),
            })
        };
        let repo = image.repository();
        let url = format!(
            "{}/v2/{repo}/manifests/{}",
            self.base,
            cosign_signature_tag(manifest_digest)
        );
        let resp = self
            .http
            .get(&url)
            .header(
                "Accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
            )
            .send()
            .await
            .map_err(|e| err(e.to_string()))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        if !resp.status().is_success() {
            return Err(err(format!("{url}: HTTP {}", resp.status())));
        }
        let manifest: serde_json::Value = resp.json().await.map_err(|e| err(e.to_string()))?;
        let mut out = Vec::new();
        for layer in manifest["layers"].as_array().cloned().unwrap_or_default() {
            if layer["mediaType"] != COSIGN_PAYLOAD_MEDIA_TYPE {
                continue;
            }
            let digest = layer["digest"]
                .as_str()
                .ok_or_else(|| err("layer without digest".into()))?;
            let Some(sig) = layer["annotations"][COSIGN_SIGNATURE_ANNOTATION].as_str() else {
                continue;
            };
            let blob = self
                .http
                .get(format!("{}/v2/{repo}/blobs/{digest}", self.base))
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| err(e.to_string()))?
                .bytes()
                .await
                .map_err(|e| err(e.to_string()))?;
            let got = format!("sha256:{}", hex::encode(Sha256::digest(&blob)));
            if got != digest {
                return Err(err(format!("blob {digest} has digest {got}")));
            }
            out.push(CosignSignature {
                payload: blob.to_vec(),
                signature_b64: sig.to_string(),
            });
        }
        Ok(out)
    }
}

fn require_prerequisites() -> PathBuf {
    for (cmd, pkg) in [
        ("skopeo", "skopeo"),
        ("gpg", "gnupg"),
        ("python3", "python3"),
        ("umoci", "umoci"),
    ] {
        Lab::require_cmd(cmd, pkg);
    }
    let cosign = lab_cache().join("cosign/usr/bin/cosign");
    if !cosign.is_file() {
        panic!(
            "cosign not found at {}: run integration/scripts/fetch-components.sh (.ci/run does)",
            cosign.display()
        );
    }
    cosign
}

/// A GnuPG home in the lab with one signing key; gpg-agent is stopped on drop.
struct Gpg {
    home: PathBuf,
    fpr: String,
}

impl Gpg {
    fn new(lab: &Lab, name: &str) -> Gpg {
        let home = lab.join(name);
        std::fs::create_dir_all(&home).unwrap();
        std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let mut g = Gpg {
            home,
            fpr: String::new(),
        };
        run_ok(g.cmd().args([
            "--quick-gen-key",
            &format!("{name} <{name}@example.invalid>"),
            "rsa2048",
            "sign",
            "never",
        ]));
        let out = run_ok(g.cmd().args(["--list-keys", "--with-colons"]));
        g.fpr = out
            .lines()
            .find(|l| l.starts_with("fpr:"))
            .unwrap()
            .split(':')
            .nth(9)
            .unwrap()
            .to_string();
        g
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("gpg");
        c.env("GNUPGHOME", &self.home).args([
            "--batch",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
        ]);
        c
    }

    fn export(&self, to: &Path) {
        let out = self
            .cmd()
            .args(["--armor", "--export", &self.fpr])
            .output()
            .unwrap();
        assert!(out.status.success());
        std::fs::write(to, out.stdout).unwrap();
    }
}

impl Drop for Gpg {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .env("GNUPGHOME", &self.home)
            .args(["--kill", "gpg-agent"])
            .output();
    }
}

fn skopeo_sign(lab: &Lab, gpg: &Gpg, regd: &Path, src: &str, dst: &str) {
    let policy = lab.join("skopeo-policy.json");
    std::fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .unwrap();
    run_ok(
        Command::new("skopeo")
            .env("GNUPGHOME", &gpg.home)
            .arg("--policy")
            .arg(&policy)
            .arg("--registries.d")
            .arg(regd)
            .args([
                "copy",
                "--src-tls-verify=false",
                "--dest-tls-verify=false",
                "--sign-by",
                &gpg.fpr,
            ])
            .arg(format!("docker://{src}"))
            .arg(format!("docker://{dst}")),
    );
}

fn reference(s: &str) -> oci_client::Reference {
    s.parse().unwrap()
}

fn rejection(r: Result<(), PolicyError>) -> String {
    match r {
        Err(e) if e.is_rejection() => e.to_string(),
        Err(e) => panic!("expected a policy rejection, got an evaluation error: {e}"),
        Ok(()) => panic!("expected a policy rejection, but the image was accepted"),
    }
}

#[test]
fn gpg_simple_signing_with_skopeo() {
    let _cosign = require_prerequisites();
    let lab = Lab::new("policy-gpg");
    let reg = Registry::start(&lab);
    let host = reg.host();
    let rt = tokio::runtime::Runtime::new().unwrap();

    let signer = Gpg::new(&lab, "signer");
    let stranger = Gpg::new(&lab, "stranger");
    let sigstore = lab.join("sigstore");
    let regd = lab.join("registries.d");
    std::fs::create_dir_all(&regd).unwrap();
    let regd_yaml = format!(
        "docker:\n  {host}:\n    lookaside: file://{0}\n    lookaside-staging: file://{0}\n",
        sigstore.display()
    );
    std::fs::write(regd.join("default.yaml"), &regd_yaml).unwrap();

    push_test_image(&reg, "lab/base:v1", 1, &["/bin/sh"]);
    push_test_image(&reg, "lab/unsigned:v1", 2, &["/bin/sh"]);
    skopeo_sign(
        &lab,
        &signer,
        &regd,
        &format!("{host}/lab/base:v1"),
        &format!("{host}/lab/signed:v1"),
    );
    skopeo_sign(
        &lab,
        &stranger,
        &regd,
        &format!("{host}/lab/base:v1"),
        &format!("{host}/lab/by-stranger:v1"),
    );
    let signed = inspect(&reg, &format!("{host}/lab/signed:v1"));
    let by_stranger = inspect(&reg, &format!("{host}/lab/by-stranger:v1"));
    let unsigned = inspect(&reg, &format!("{host}/lab/unsigned:v1"));
    let hex = signed.manifest_digest.strip_prefix("sha256:").unwrap();
    let sig_file = sigstore.join(format!("lab/signed@sha256={hex}/signature-1"));
    assert!(
        sig_file.is_file(),
        "skopeo wrote no signature at {}",
        sig_file.display()
    );

    // A repository holding the same manifest whose only "signature" is the one made for
    // lab/signed (a replay into another repository).
    run_ok(
        Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false", "--dest-tls-verify=false"])
            .args([
                format!("docker://{host}/lab/signed:v1"),
                format!("docker://{host}/lab/replayed:v1"),
            ]),
    );
    let replay_dir = sigstore.join(format!("lab/replayed@sha256={hex}"));
    std::fs::create_dir_all(&replay_dir).unwrap();
    std::fs::copy(&sig_file, replay_dir.join("signature-1")).unwrap();

    let key = lab.join("signer.asc");
    signer.export(&key);
    let policy = format!(
        r#"{{"default":[{{"type":"reject"}}],"transports":{{"docker":{{"{host}/lab":[
            {{"type":"signedBy","keyType":"GPGKeys","keyPath":"{}"}}]}}}}}}"#,
        key.display()
    );
    let ev = PolicyEvaluator::from_json(
        policy.as_bytes(),
        Some(regd_yaml.as_bytes()),
        Arc::new(FileFetcher),
    )
    .unwrap();
    let no_cosign = HttpSignatures {
        base: format!("http://{host}"),
        http: reqwest::Client::new(),
    };

    rt.block_on(ev.check(
        &reference(&signed.reference),
        &signed.manifest_digest,
        &no_cosign,
    ))
    .unwrap();
    // by digest too (matchRepoDigestOrExact)
    rt.block_on(ev.check(
        &reference(&format!("{host}/lab/signed@{}", signed.manifest_digest)),
        &signed.manifest_digest,
        &no_cosign,
    ))
    .unwrap();

    let e = rejection(rt.block_on(ev.check(
        &reference(&unsigned.reference),
        &unsigned.manifest_digest,
        &no_cosign,
    )));
    assert!(e.contains("no signature exists"), "{e}");
    assert!(
        e.contains(&format!(
            "scope docker \"{host}/lab\", requirement #0 (signedBy with key file://"
        )),
        "{e}"
    );

    let e = rejection(rt.block_on(ev.check(
        &reference(&by_stranger.reference),
        &by_stranger.manifest_digest,
        &no_cosign,
    )));
    assert!(e.contains(&stranger.fpr), "names the stranger's key: {e}");
    assert!(e.contains("not one of the trusted keys"), "{e}");

    let e = rejection(rt.block_on(ev.check(
        &reference(&format!("{host}/lab/replayed:v1")),
        &signed.manifest_digest,
        &no_cosign,
    )));
    assert!(
        e.contains(&format!("\"{host}/lab/signed:v1\"")),
        "names the signed identity: {e}"
    );

    // The same signatures over an http:// lookaside (python's http.server on the directory).
    let port = free_port();
    let mut server = Command::new("python3");
    server
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(&sigstore);
    lab.spawn("lookaside-http", server);
    wait_for("the HTTP lookaside", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let http_yaml = format!("default-docker:\n  lookaside: http://127.0.0.1:{port}\n");
    let ev = PolicyEvaluator::from_json(
        policy.as_bytes(),
        Some(http_yaml.as_bytes()),
        Arc::new(FileFetcher),
    )
    .unwrap();
    rt.block_on(ev.check(
        &reference(&signed.reference),
        &signed.manifest_digest,
        &no_cosign,
    ))
    .unwrap();
    let e = rejection(rt.block_on(ev.check(
        &reference(&unsigned.reference),
        &unsigned.manifest_digest,
        &no_cosign,
    )));
    assert!(e.contains("no signature exists"), "{e}");
    let e = rejection(rt.block_on(ev.check(
        &reference(&by_stranger.reference),
        &by_stranger.manifest_digest,
        &no_cosign,
    )));
    assert!(e.contains(&stranger.fpr), "{e}");
}

fn cosign(lab: &Lab, bin: &Path, dir: &Path, args: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    run_ok(
        Command::new(bin)
            .current_dir(dir)
            .env("HOME", lab.path())
            .env("COSIGN_PASSWORD", "labpass")
            .args(args),
    );
}

#[test]
fn cosign_key_signatures() {
    let cosign_bin = require_prerequisites();
    let lab = Lab::new("policy-cosign");
    let reg = Registry::start(&lab);
    let host = reg.host();
    let rt = tokio::runtime::Runtime::new().unwrap();

    let keys = lab.join("keys");
    let other_keys = lab.join("other-keys");
    cosign(&lab, &cosign_bin, &keys, &["generate-key-pair"]);
    cosign(&lab, &cosign_bin, &other_keys, &["generate-key-pair"]);

    let signed = push_test_image(&reg, "lab/cosigned:v1", 1, &["/bin/sh"]);
    let unsigned = push_test_image(&reg, "lab/plain:v1", 2, &["/bin/sh"]);
    let sign = |key_dir: &Path, repo: &str, digest: &str| {
        let key = key_dir.join("cosign.key");
        cosign(
            &lab,
            &cosign_bin,
            key_dir,
            &[
                "sign",
                "--key",
                key.to_str().unwrap(),
                "--tlog-upload=false",
                "--allow-insecure-registry",
                "--allow-http-registry",
                "--yes",
                &format!("{host}/{repo}@{digest}"),
            ],
        )
    };
    sign(&keys, "lab/cosigned", &signed.manifest_digest);
    // another image, signed by the other key
    let other_key_img = push_test_image(&reg, "lab/other-key:v1", 3, &["/bin/sh"]);
    sign(&other_keys, "lab/other-key", &other_key_img.manifest_digest);
    // a repository holding a signature copied from another repository (identity mismatch)
    run_ok(
        Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false", "--dest-tls-verify=false"])
            .args([
                format!("docker://{host}/lab/cosigned:v1"),
                format!("docker://{host}/lab/evil:v1"),
            ]),
    );
    let evil = inspect(&reg, &format!("{host}/lab/evil:v1"));
    assert_eq!(
        evil.manifest_digest, signed.manifest_digest,
        "same content must give the same manifest"
    );
    let tag = cosign_signature_tag(&signed.manifest_digest);
    run_ok(
        Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false", "--dest-tls-verify=false"])
            .args([
                format!("docker://{host}/lab/cosigned:{tag}"),
                format!("docker://{host}/lab/evil:{tag}"),
            ]),
    );

    let pub_pem = std::fs::read(keys.join("cosign.pub")).unwrap();
    let key_data = base64::engine::general_purpose::STANDARD.encode(&pub_pem);
    let policy = |identity: &str| {
        format!(
            r#"{{"default":[{{"type":"reject"}}],"transports":{{"docker":{{"{host}/lab":[
                {{"type":"sigstoreSigned","keyData":"{key_data}"{identity}}}]}}}}}}"#
        )
    };
    let match_repo = r#","signedIdentity":{"type":"matchRepository"}"#;
    let ev = PolicyEvaluator::from_json(policy(match_repo).as_bytes(), None, Arc::new(FileFetcher))
        .unwrap();
    let src = HttpSignatures {
        base: format!("http://{host}"),
        http: reqwest::Client::new(),
    };

    rt.block_on(ev.check(&reference(&signed.reference), &signed.manifest_digest, &src))
        .unwrap();
    rt.block_on(ev.check(
        &reference(&format!("{host}/lab/cosigned@{}", signed.manifest_digest)),
        &signed.manifest_digest,
        &src,
    ))
    .unwrap();

    let e = rejection(rt.block_on(ev.check(
        &reference(&unsigned.reference),
        &unsigned.manifest_digest,
        &src,
    )));
    assert!(e.contains("no cosign signature exists"), "{e}");
    assert!(
        e.contains(&format!(
            "scope docker \"{host}/lab\", requirement #0 (sigstoreSigned with key from keyData)"
        )),
        "{e}"
    );

    let e = rejection(rt.block_on(ev.check(
        &reference(&other_key_img.reference),
        &other_key_img.manifest_digest,
        &src,
    )));
    assert!(e.contains("not signed by a trusted key"), "{e}");
    assert!(
        e.contains("keyData (ECDSA P-256)"),
        "names the key that failed: {e}"
    );

    let e =
        rejection(rt.block_on(ev.check(&reference(&evil.reference), &evil.manifest_digest, &src)));
    assert!(
        e.contains(&format!("\"{host}/lab/cosigned\"")),
        "names the signed repository: {e}"
    );

    // keyPath to the PEM file works the same
    let path_policy = format!(
        r#"{{"default":[{{"type":"reject"}}],"transports":{{"docker":{{"{host}/lab/cosigned":[
            {{"type":"sigstoreSigned","keyPath":"{}"{match_repo}}}]}}}}}}"#,
        keys.join("cosign.pub").display()
    );
    let ev2 =
        PolicyEvaluator::from_json(path_policy.as_bytes(), None, Arc::new(FileFetcher)).unwrap();
    rt.block_on(ev2.check(&reference(&signed.reference), &signed.manifest_digest, &src))
        .unwrap();

    // containers/image semantics: cosign signs only the repository, so the default identity
    // (matchRepoDigestOrExact) refuses it, and the message says how to fix the policy.
    let ev =
        PolicyEvaluator::from_json(policy("").as_bytes(), None, Arc::new(FileFetcher)).unwrap();
    let e = rejection(rt.block_on(ev.check(
        &reference(&signed.reference),
        &signed.manifest_digest,
        &src,
    )));
    assert!(e.contains("matchRepository"), "{e}");
}
