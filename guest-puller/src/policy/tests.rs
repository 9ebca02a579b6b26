//! Policy evaluation against real artifacts: GPG simple signatures made by `gpg`, cosign-format
//! signatures made by `openssl` (same wire format as `cosign sign --key`: DER ECDSA over the
//! raw payload, base64), served from files, a local HTTP lookaside and an in-memory registry.

// Builds without a signature scheme (the `gpg`/`cosign` features) skip its tests and leave
// their helpers unused.
#![cfg_attr(
    not(all(feature = "gpg", feature = "cosign")),
    allow(dead_code, unused_imports)
)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use base64::Engine as _;
use zeroize::Zeroizing;

use super::*;

const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const OTHER_DIGEST: &str =
    "sha256:2222222222222222222222222222222222222222222222222222222222222222";
const INDEX_DIGEST: &str =
    "sha256:3333333333333333333333333333333333333333333333333333333333333333";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A throwaway GnuPG home with one key.
struct Gpg {
    home: tempfile::TempDir,
    fpr: String,
}

impl Gpg {
    fn new(algo: &str) -> Self {
        let home = tempfile::tempdir().unwrap();
        let mut g = Gpg {
            home,
            fpr: String::new(),
        };
        g.gpg(&[
            "--quick-gen-key",
            "Policy Test <policy@example.invalid>",
            algo,
            "sign",
            "never",
        ]);
        g.fpr = g.first_fpr();
        g
    }

    /// A certify-only primary key with a separate signing subkey.
    fn with_signing_subkey() -> Self {
        let home = tempfile::tempdir().unwrap();
        let mut g = Gpg {
            home,
            fpr: String::new(),
        };
        g.gpg(&[
            "--quick-gen-key",
            "Subkey Test <sub@example.invalid>",
            "ed25519",
            "cert",
            "never",
        ]);
        g.fpr = g.first_fpr();
        g.gpg(&["--quick-add-key", &g.fpr, "ed25519", "sign", "never"]);
        g
    }

    fn gpg(&self, args: &[&str]) -> Vec<u8> {
        run(Command::new("gpg")
            .env("GNUPGHOME", self.home.path())
            .args(["--batch", "--pinentry-mode", "loopback", "--passphrase", ""])
            .args(args))
    }

    fn first_fpr(&self) -> String {
        let out = String::from_utf8(self.gpg(&["--list-keys", "--with-colons"])).unwrap();
        out.lines()
            .find(|l| l.starts_with("fpr:"))
            .unwrap()
            .split(':')
            .nth(9)
            .unwrap()
            .to_owned()
    }

    fn public_key(&self, armor: bool) -> Vec<u8> {
        if armor {
            self.gpg(&["--armor", "--export", &self.fpr])
        } else {
            self.gpg(&["--export", &self.fpr])
        }
    }

    /// Signs a simple-signing payload like `skopeo --sign-by` (binary, compressed, one-pass).
    fn sign(&self, payload: &[u8]) -> Vec<u8> {
        let p = self.home.path().join("payload");
        std::fs::write(&p, payload).unwrap();
        let out = self.home.path().join("payload.sig");
        let _ = std::fs::remove_file(&out);
        self.gpg(&[
            "-u",
            &self.fpr,
            "--sign",
            "-o",
            out.to_str().unwrap(),
            p.to_str().unwrap(),
        ]);
        std::fs::read(out).unwrap()
    }
}

impl Drop for Gpg {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .env("GNUPGHOME", self.home.path())
            .args(["--kill", "gpg-agent"])
            .output();
    }
}

/// An openssl key pair producing cosign-format signatures.
struct OpensslKey {
    dir: tempfile::TempDir,
    kind: &'static str,
}

impl OpensslKey {
    fn new(kind: &'static str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        let k = key.to_str().unwrap();
        match kind {
            "p256" => run(Command::new("openssl").args([
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                k,
            ])),
            "p384" => run(Command::new("openssl").args([
                "ecparam",
                "-name",
                "secp384r1",
                "-genkey",
                "-noout",
                "-out",
                k,
            ])),
            "rsa" => run(Command::new("openssl").args(["genrsa", "-out", k, "2048"])),
            "ed25519" => {
                run(Command::new("openssl").args(["genpkey", "-algorithm", "ed25519", "-out", k]))
            }
            _ => unreachable!("test key kind"),
        };
        OpensslKey { dir, kind }
    }

    fn public_pem(&self) -> Vec<u8> {
        run(Command::new("openssl").args([
            "pkey",
            "-pubout",
            "-in",
            self.dir.path().join("key.pem").to_str().unwrap(),
        ]))
    }

    fn sign(&self, payload: &[u8]) -> CosignSignature {
        let p = self.dir.path().join("payload");
        std::fs::write(&p, payload).unwrap();
        let key = self.dir.path().join("key.pem");
        let sig = if self.kind == "ed25519" {
            run(Command::new("openssl")
                .args(["pkeyutl", "-sign", "-rawin", "-inkey"])
                .arg(&key)
                .arg("-in")
                .arg(&p))
        } else {
            run(Command::new("openssl")
                .args(["dgst", "-sha256", "-sign"])
                .arg(&key)
                .arg(&p))
        };
        CosignSignature {
            payload: payload.to_vec(),
            signature_b64: b64(&sig),
        }
    }
}

/// Resolves `file://` from disk and `kbs:///…` from a map, like the real fetcher.
#[derive(Default)]
struct TestFetcher {
    kbs: HashMap<String, Vec<u8>>,
}

#[async_trait::async_trait]
impl ResourceFetcher for TestFetcher {
    async fn fetch(&self, uri: &str) -> Result<Zeroizing<Vec<u8>>, ResourceError> {
        if let Some(path) = uri.strip_prefix("file://") {
            return std::fs::read(path)
                .map(Zeroizing::new)
                .map_err(|e| ResourceError::NotFound {
                    uri: uri.into(),
                    reason: e.to_string(),
                });
        }
        self.kbs
            .get(uri)
            .map(|b| Zeroizing::new(b.clone()))
            .ok_or_else(|| ResourceError::NotFound {
                uri: uri.into(),
                reason: "no such resource".into(),
            })
    }
}

/// Cosign signatures per digest; `fail` simulates an unreachable registry.
#[derive(Default)]
struct TestRegistry {
    sigs: HashMap<String, Vec<CosignSignature>>,
    fail: bool,
}

#[async_trait::async_trait]
impl SignatureSource for TestRegistry {
    async fn cosign_signatures(
        &self,
        _image: &oci_client::Reference,
        manifest_digest: &str,
    ) -> Result<Vec<CosignSignature>, PolicyError> {
        if self.fail {
            return Err(PolicyError::Registry(
                crate::registry::RegistryError::Request {
                    reference: "r/x".into(),
                    kind: crate::error::ErrorKind::Unavailable,
                    source: "connection refused".into(),
                },
            ));
        }
        Ok(self.sigs.get(manifest_digest).cloned().unwrap_or_default())
    }
}

fn evaluator(policy: &str, lookaside: Option<&str>, fetcher: TestFetcher) -> PolicyEvaluator {
    PolicyEvaluator::from_json(
        policy.as_bytes(),
        lookaside.map(str::as_bytes),
        Arc::new(fetcher),
    )
    .unwrap()
}

fn reference(s: &str) -> oci_client::Reference {
    s.parse().unwrap()
}

/// Writes `sig` as signature-`n` for `digest` of repo path `repo` under `root`.
fn store_signature(root: &Path, repo: &str, digest: &str, n: usize, sig: &[u8]) {
    let dir = root.join(format!("{repo}@{}", digest.replacen(':', "=", 1)));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("signature-{n}")), sig).unwrap();
}

fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn signed_by_policy(scope: &str, key_field: &str, identity: &str) -> String {
    format!(
        r#"{{"default":[{{"type":"reject"}}],"transports":{{"docker":{{"{scope}":[{{"type":"signedBy","keyType":"GPGKeys",{key_field}{identity}}}]}}}}}}"#
    )
}

fn rejection(e: PolicyError) -> String {
    assert!(e.is_rejection(), "expected a rejection, got: {e}");
    e.to_string()
}

#[cfg(feature = "gpg")]
#[tokio::test]
async fn simple_signing_file_lookaside_accepts_and_rejects() {
    let signer = Gpg::new("rsa2048");
    let stranger = Gpg::new("ed25519");
    let tmp = tempfile::tempdir().unwrap();
    let sigstore = tmp.path().join("sigstore");
    let key = write(tmp.path(), "pub.asc", &signer.public_key(true));
    let image = "127.0.0.1:5000/lab/busybox:v1";
    let payload = payload::build(payload::ATOMIC_TYPE, DIGEST, image);
    store_signature(&sigstore, "lab/busybox", DIGEST, 1, &signer.sign(&payload));
    // a signature by an untrusted key for another digest, and one for another repository
    store_signature(
        &sigstore,
        "lab/busybox",
        OTHER_DIGEST,
        1,
        &stranger.sign(&payload::build(payload::ATOMIC_TYPE, OTHER_DIGEST, image)),
    );
    let third = "sha256:4444444444444444444444444444444444444444444444444444444444444444";
    store_signature(
        &sigstore,
        "lab/busybox",
        third,
        1,
        &signer.sign(&payload::build(
            payload::ATOMIC_TYPE,
            third,
            "127.0.0.1:5000/lab/other:v1",
        )),
    );
    // a signature whose payload digest differs from where it is stored (a replayed signature)
    let fourth = "sha256:5555555555555555555555555555555555555555555555555555555555555555";
    store_signature(&sigstore, "lab/busybox", fourth, 1, &signer.sign(&payload));

    let lookaside = format!(
        "docker:\n  127.0.0.1:5000:\n    lookaside: file://{}\n",
        sigstore.display()
    );
    let policy = signed_by_policy(
        "127.0.0.1:5000/lab",
        &format!(r#""keyPath":"{}""#, key.display()),
        "",
    );
    let ev = evaluator(&policy, Some(&lookaside), TestFetcher::default());
    let reg = TestRegistry::default();

    ev.check(&reference(image), DIGEST, &reg).await.unwrap();
    // cache hit / second pull re-verifies and still accepts
    ev.check(&reference(image), DIGEST, &reg).await.unwrap();
    // by digest: matchRepoDigestOrExact accepts any tag of the same repository
    ev.check(
        &reference(&format!("127.0.0.1:5000/lab/busybox@{DIGEST}")),
        DIGEST,
        &reg,
    )
    .await
    .unwrap();

    let e = rejection(
        ev.check(&reference("127.0.0.1:5000/lab/busybox:v2"), DIGEST, &reg)
            .await
            .unwrap_err(),
    );
    assert!(
        e.contains("signed identity \"127.0.0.1:5000/lab/busybox:v1\""),
        "{e}"
    );
    assert!(e.contains("scope docker \"127.0.0.1:5000/lab\""), "{e}");
    assert!(
        e.contains("requirement #0 (signedBy with key file://"),
        "{e}"
    );

    let unsigned = "sha256:6666666666666666666666666666666666666666666666666666666666666666";
    let e = rejection(
        ev.check(&reference(image), unsigned, &reg)
            .await
            .unwrap_err(),
    );
    assert!(e.contains("no signature exists"), "{e}");

    let e = rejection(
        ev.check(&reference(image), OTHER_DIGEST, &reg)
            .await
            .unwrap_err(),
    );
    assert!(
        e.contains(&format!(
            "which is not one of the trusted keys {}",
            signer.fpr
        )),
        "{e}"
    );
    assert!(
        e.contains(&stranger.fpr[24..]),
        "names the signing key: {e}"
    );

    let e = rejection(ev.check(&reference(image), third, &reg).await.unwrap_err());
    assert!(e.contains("lab/other:v1"), "{e}");

    let e = rejection(ev.check(&reference(image), fourth, &reg).await.unwrap_err());
    assert!(e.contains(&format!("is for manifest {DIGEST}")), "{e}");

    // an image outside the signed scope falls to the default: reject
    let e = rejection(
        ev.check(&reference("quay.io/x/y:1"), DIGEST, &reg)
            .await
            .unwrap_err(),
    );
    assert!(e.contains("scope default"), "{e}");
}

#[cfg(feature = "gpg")]
#[tokio::test]
async fn simple_signing_key_sources_and_subkeys() {
    let signer = Gpg::with_signing_subkey();
    let other = Gpg::new("ed25519");
    let tmp = tempfile::tempdir().unwrap();
    let image = "reg.example.com/app/web:1.0";
    let payload = payload::build(payload::ATOMIC_TYPE, DIGEST, image);
    store_signature(
        tmp.path(),
        "app/web",
        DIGEST,
        1,
        &other.sign(&payload::build(payload::ATOMIC_TYPE, DIGEST, "x.io/y:z")),
    );
    store_signature(
        tmp.path(),
        "app/web",
        DIGEST,
        2,
        b"garbage that is not OpenPGP",
    );
    store_signature(tmp.path(), "app/web", DIGEST, 3, &signer.sign(&payload));
    let lookaside = format!(
        "default-docker:\n  sigstore: file://{}\n",
        tmp.path().display()
    );
    let reg = TestRegistry::default();

    // keyData: base64 of a binary keyring
    let policy = signed_by_policy(
        "reg.example.com",
        &format!(r#""keyData":"{}""#, b64(&signer.public_key(false))),
        "",
    );
    let ev = evaluator(&policy, Some(&lookaside), TestFetcher::default());
    ev.check(&reference(image), DIGEST, &reg).await.unwrap();

    // keyPaths through the KBS: two keyrings, either key may sign
    let mut fetcher = TestFetcher::default();
    fetcher
        .kbs
        .insert("kbs:///default/keys/other".into(), other.public_key(true));
    fetcher
        .kbs
        .insert("kbs:///default/keys/signer".into(), signer.public_key(true));
    let policy = signed_by_policy(
        "reg.example.com/app/web",
        r#""keyPaths":["kbs:///default/keys/other","kbs:///default/keys/signer"]"#,
        r#","signedIdentity":{"type":"matchRepository"}"#,
    );
    let ev = evaluator(&policy, Some(&lookaside), fetcher);
    ev.check(&reference("reg.example.com/app/web:latest"), DIGEST, &reg)
        .await
        .unwrap();

    // only the stranger's key trusted: all three signatures refused, each with its reason
    let policy = signed_by_policy(
        "reg.example.com",
        &format!(r#""keyData":"{}""#, b64(&other.public_key(true))),
        "",
    );
    let ev = evaluator(&policy, Some(&lookaside), TestFetcher::default());
    let e = rejection(ev.check(&reference(image), DIGEST, &reg).await.unwrap_err());
    assert!(e.contains("none of the 3 signatures was accepted"), "{e}");
    assert!(e.contains("signature-1: signed by key"), "{e}");
    assert!(e.contains("signature-2: not an OpenPGP message"), "{e}");
    assert!(e.contains("signature-3: signed by key"), "{e}");

    // a key that cannot be fetched fails the check (not a rejection, not an acceptance)
    let policy = signed_by_policy(
        "reg.example.com",
        r#""keyPath":"kbs:///default/keys/missing""#,
        "",
    );
    let ev = evaluator(&policy, Some(&lookaside), TestFetcher::default());
    let e = ev.check(&reference(image), DIGEST, &reg).await.unwrap_err();
    assert!(
        matches!(&e, PolicyError::Evaluation { cause, .. } if matches!(**cause, PolicyError::KeyFetch { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("kbs:///default/keys/missing"), "{e}");

    // a key that is not a key
    let mut fetcher = TestFetcher::default();
    fetcher
        .kbs
        .insert("kbs:///default/keys/junk".into(), b"junk".to_vec());
    let policy = signed_by_policy(
        "reg.example.com",
        r#""keyPath":"kbs:///default/keys/junk""#,
        "",
    );
    let e = evaluator(&policy, Some(&lookaside), fetcher)
        .check(&reference(image), DIGEST, &reg)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, PolicyError::Evaluation { cause, .. } if matches!(**cause, PolicyError::InvalidKey { .. })),
        "{e}"
    );

    // an inline keyData that is not a keyring makes the policy invalid up front
    let policy = signed_by_policy(
        "reg.example.com",
        &format!(r#""keyData":"{}""#, b64(b"junk")),
        "",
    );
    assert!(matches!(
        PolicyEvaluator::from_json(policy.as_bytes(), None, Arc::new(TestFetcher::default())),
        Err(PolicyError::InvalidPolicy(_))
    ));

    // no lookaside configured: rejected with a hint
    let policy = signed_by_policy(
        "reg.example.com",
        &format!(r#""keyData":"{}""#, b64(&signer.public_key(true))),
        "",
    );
    let e = rejection(
        evaluator(&policy, None, TestFetcher::default())
            .check(&reference(image), DIGEST, &reg)
            .await
            .unwrap_err(),
    );
    assert!(e.contains("no signature lookaside is configured"), "{e}");
}

/// A minimal HTTP/1.1 file server for the lookaside; paths not in the map get 404, and
/// `/broken/…` gets 500.
async fn serve(files: HashMap<String, Vec<u8>>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let files = Arc::new(files);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let files = files.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&req);
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let (status, body) = match files.get(&path) {
                    Some(b) => ("200 OK", b.clone()),
                    None if path.starts_with("/broken/") => {
                        ("500 Internal Server Error", b"boom".to_vec())
                    }
                    None => ("404 Not Found", Vec::new()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
            });
        }
    });
    format!("http://{addr}")
}

#[cfg(feature = "gpg")]
#[tokio::test]
async fn simple_signing_http_lookaside() {
    let signer = Gpg::new("ed25519");
    let image = "127.0.0.1:5000/lab/app:v1";
    let sig = signer.sign(&payload::build(payload::ATOMIC_TYPE, DIGEST, image));
    let hex = DIGEST.strip_prefix("sha256:").unwrap();
    let mut files = HashMap::new();
    files.insert(format!("/sigs/lab/app@sha256={hex}/signature-1"), sig);
    let base = serve(files).await;
    let policy = signed_by_policy(
        "",
        &format!(r#""keyData":"{}""#, b64(&signer.public_key(true))),
        "",
    );
    let reg = TestRegistry::default();

    let ev = evaluator(
        &policy,
        Some(&format!("default-docker:\n  lookaside: {base}/sigs\n")),
        TestFetcher::default(),
    );
    ev.check(&reference(image), DIGEST, &reg).await.unwrap();
    let e = rejection(
        ev.check(&reference(image), OTHER_DIGEST, &reg)
            .await
            .unwrap_err(),
    );
    assert!(e.contains("no signature exists"), "{e}");
    assert!(e.contains("scope docker \"\" (transport default)"), "{e}");

    // a server error is not "unsigned": it is an evaluation failure
    let ev = evaluator(
        &policy,
        Some(&format!("default-docker:\n  lookaside: {base}/broken\n")),
        TestFetcher::default(),
    );
    let e = ev.check(&reference(image), DIGEST, &reg).await.unwrap_err();
    assert!(
        matches!(&e, PolicyError::Evaluation { cause, .. } if matches!(**cause, PolicyError::SignatureFetch { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("500"), "{e}");
}

fn sigstore_policy(key_field: &str, identity: &str) -> String {
    format!(
        r#"{{"default":[{{"type":"reject"}}],"transports":{{"docker":{{"127.0.0.1:5000/lab/app":[{{"type":"sigstoreSigned",{key_field}{identity}}}]}}}}}}"#
    )
}

const MATCH_REPO: &str = r#","signedIdentity":{"type":"matchRepository"}"#;

#[cfg(feature = "cosign")]
#[tokio::test]
async fn cosign_signatures_all_key_types() {
    let image = reference("127.0.0.1:5000/lab/app:v1");
    // cosign writes the repository only as the identity
    let payload = payload::build(payload::COSIGN_TYPE, DIGEST, "127.0.0.1:5000/lab/app");
    for kind in ["p256", "p384", "rsa", "ed25519"] {
        let key = OpensslKey::new(kind);
        let mut reg = TestRegistry::default();
        reg.sigs.insert(DIGEST.into(), vec![key.sign(&payload)]);
        // keyData per containers-policy.json: base64 of the PEM
        let policy = sigstore_policy(
            &format!(r#""keyData":"{}""#, b64(&key.public_pem())),
            MATCH_REPO,
        );
        evaluator(&policy, None, TestFetcher::default())
            .check(&image, DIGEST, &reg)
            .await
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
    }
}

#[cfg(feature = "cosign")]
#[tokio::test]
async fn cosign_accepts_and_rejects_with_reasons() {
    let key = OpensslKey::new("p256");
    let stranger = OpensslKey::new("p256");
    let tmp = tempfile::tempdir().unwrap();
    let pem = key.public_pem();
    let key_file = write(tmp.path(), "cosign.pub", &pem);
    let image = reference("127.0.0.1:5000/lab/app:v1");
    let good = key.sign(&payload::build(
        payload::COSIGN_TYPE,
        DIGEST,
        "127.0.0.1:5000/lab/app",
    ));
    let mut reg = TestRegistry::default();
    reg.sigs.insert(DIGEST.into(), vec![good.clone()]);
    reg.sigs.insert(
        OTHER_DIGEST.into(),
        vec![stranger.sign(&payload::build(
            payload::COSIGN_TYPE,
            OTHER_DIGEST,
            "127.0.0.1:5000/lab/app",
        ))],
    );
    let other_repo = "sha256:7777777777777777777777777777777777777777777777777777777777777777";
    reg.sigs.insert(
        other_repo.into(),
        vec![key.sign(&payload::build(
            payload::COSIGN_TYPE,
            other_repo,
            "127.0.0.1:5000/lab/evil",
        ))],
    );

    // raw PEM in keyData (CoCo/image-rs style) and a keyPath both work
    let raw = serde_json::to_string(std::str::from_utf8(&pem).unwrap()).unwrap();
    for field in [
        format!(r#""keyData":{raw}"#),
        format!(r#""keyPath":"{}""#, key_file.display()),
    ] {
        let ev = evaluator(
            &sigstore_policy(&field, MATCH_REPO),
            None,
            TestFetcher::default(),
        );
        ev.check(&image, DIGEST, &reg).await.unwrap();
        ev.check(
            &reference(&format!("127.0.0.1:5000/lab/app@{DIGEST}")),
            DIGEST,
            &reg,
        )
        .await
        .unwrap();
    }

    let ev = evaluator(
        &sigstore_policy(
            &format!(r#""keyPath":"{}""#, key_file.display()),
            MATCH_REPO,
        ),
        None,
        TestFetcher::default(),
    );
    let unsigned = "sha256:8888888888888888888888888888888888888888888888888888888888888888";
    let e = rejection(ev.check(&image, unsigned, &reg).await.unwrap_err());
    assert!(
        e.contains("no cosign signature exists (tag sha256-8888"),
        "{e}"
    );
    let e = rejection(ev.check(&image, OTHER_DIGEST, &reg).await.unwrap_err());
    assert!(e.contains("not signed by a trusted key"), "{e}");
    assert!(
        e.contains("cryptographic signature verification failed"),
        "{e}"
    );
    let e = rejection(ev.check(&image, other_repo, &reg).await.unwrap_err());
    assert!(e.contains("\"127.0.0.1:5000/lab/evil\""), "{e}");

    // a tampered payload with the original signature
    let mut tampered = good.clone();
    tampered.payload = payload::build(payload::COSIGN_TYPE, DIGEST, "127.0.0.1:5000/lab/app ");
    let mut treg = TestRegistry::default();
    treg.sigs.insert(DIGEST.into(), vec![tampered]);
    assert!(
        rejection(ev.check(&image, DIGEST, &treg).await.unwrap_err())
            .contains("verification failed")
    );

    // the default identity (matchRepoDigestOrExact) refuses repository-only cosign identities,
    // exactly like containers/image, and says how to fix the policy
    let ev = evaluator(
        &sigstore_policy(&format!(r#""keyPath":"{}""#, key_file.display()), ""),
        None,
        TestFetcher::default(),
    );
    let e = rejection(ev.check(&image, DIGEST, &reg).await.unwrap_err());
    assert!(e.contains("matchRepository"), "{e}");
    assert!(e.contains("cosign"), "{e}");

    // keyPaths: either key may have signed
    let stranger_file = write(tmp.path(), "stranger.pub", &stranger.public_pem());
    let ev = evaluator(
        &sigstore_policy(
            &format!(
                r#""keyPaths":["{}","{}"]"#,
                stranger_file.display(),
                key_file.display()
            ),
            MATCH_REPO,
        ),
        None,
        TestFetcher::default(),
    );
    ev.check(&image, DIGEST, &reg).await.unwrap();
    ev.check(&image, OTHER_DIGEST, &reg).await.unwrap();

    // registry failure → evaluation error, never acceptance
    let broken = TestRegistry {
        fail: true,
        ..Default::default()
    };
    let e = ev.check(&image, DIGEST, &broken).await.unwrap_err();
    assert!(
        !e.is_rejection() && e.to_string().contains("connection refused"),
        "{e}"
    );

    // an unreadable key file → evaluation error
    let ev = evaluator(
        &sigstore_policy(r#""keyPath":"/nonexistent/cosign.pub""#, MATCH_REPO),
        None,
        TestFetcher::default(),
    );
    let e = ev.check(&image, DIGEST, &reg).await.unwrap_err();
    assert!(e.to_string().contains("/nonexistent/cosign.pub"), "{e}");
    assert!(!e.is_rejection());

    // a non-PEM inline key is an invalid policy
    assert!(matches!(
        PolicyEvaluator::from_json(
            sigstore_policy(r#""keyData":"bm90IGEga2V5""#, "").as_bytes(),
            None,
            Arc::new(TestFetcher::default())
        ),
        Err(PolicyError::InvalidPolicy(_))
    ));
}

#[cfg(feature = "cosign")]
#[tokio::test]
async fn index_signatures_are_accepted_with_list_digest() {
    let key = OpensslKey::new("p256");
    let image = reference("127.0.0.1:5000/lab/app:v1");
    let mut reg = TestRegistry::default();
    reg.sigs.insert(
        INDEX_DIGEST.into(),
        vec![key.sign(&payload::build(
            payload::COSIGN_TYPE,
            INDEX_DIGEST,
            "127.0.0.1:5000/lab/app",
        ))],
    );
    let ev = evaluator(
        &sigstore_policy(
            &format!(r#""keyData":"{}""#, b64(&key.public_pem())),
            MATCH_REPO,
        ),
        None,
        TestFetcher::default(),
    );
    ev.check_with_list(&image, DIGEST, Some(INDEX_DIGEST), &reg)
        .await
        .unwrap();
    assert!(ev
        .check(&image, DIGEST, &reg)
        .await
        .unwrap_err()
        .is_rejection());
}

#[tokio::test]
async fn every_requirement_must_pass() {
    let reg = TestRegistry::default();
    let image = reference("reg.io/a/b:1");
    let ev = evaluator(
        r#"{"default":[{"type":"insecureAcceptAnything"}],"transports":{"docker":{
            "reg.io/a":[{"type":"insecureAcceptAnything"},{"type":"reject"}],
            "reg.io/a/ok":[{"type":"insecureAcceptAnything"}]}}}"#,
        None,
        TestFetcher::default(),
    );
    let e = rejection(ev.check(&image, DIGEST, &reg).await.unwrap_err());
    assert!(e.contains("requirement #1 (reject)"), "{e}");
    assert!(e.contains("image reg.io/a/b:1"), "{e}");
    ev.check(&reference("reg.io/a/ok:1"), DIGEST, &reg)
        .await
        .unwrap();
    ev.check(&reference("elsewhere.io/x:1"), DIGEST, &reg)
        .await
        .unwrap();
}

#[cfg(not(feature = "gpg"))]
#[test]
fn without_the_gpg_feature_signed_by_is_refused_when_the_policy_loads() {
    let policy = r#"{"default":[{"type":"signedBy","keyType":"GPGKeys","keyPath":"/k.gpg"}]}"#;
    let Err(e) =
        PolicyEvaluator::from_json(policy.as_bytes(), None, Arc::new(TestFetcher::default()))
    else {
        panic!("the policy loaded");
    };
    assert!(matches!(e, PolicyError::InvalidPolicy(_)), "{e}");
    assert!(e.to_string().contains("`gpg` feature"), "{e}");
}

#[cfg(not(feature = "cosign"))]
#[test]
fn without_the_cosign_feature_sigstore_signed_is_refused_when_the_policy_loads() {
    let policy = r#"{"default":[{"type":"sigstoreSigned","keyPath":"/k.pub"}]}"#;
    let Err(e) =
        PolicyEvaluator::from_json(policy.as_bytes(), None, Arc::new(TestFetcher::default()))
    else {
        panic!("the policy loaded");
    };
    assert!(e.to_string().contains("`cosign` feature"), "{e}");
}
