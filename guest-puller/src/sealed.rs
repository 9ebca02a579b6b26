//! CDH's sealed secrets: what kata-agent hands to `SealedSecretService.UnsealSecret` for an
//! environment variable or volume whose value starts with `sealed.`.
//!
//! Format (guest-components `confidential-data-hub/docs/SEALED_SECRET.md`): `sealed.` followed by
//! a compact JWS (`header.payload.signature`, base64url without padding) whose payload is
//! `{"version":"0.1.0","type":"vault"|"envelope",…}`. The header's `kid` names the ES256 (P-256)
//! verification key as a JWK: a KBS resource URI, or a file below [`SIGNING_CREDENTIALS_DIR`]
//! provisioned at start. A `vault` secret with provider `kbs` points at a KBS resource, which is
//! the plaintext. Other providers (cloud KMSes) and `envelope` secrets need KMS clients this
//! guest does not carry; they are refused with an error naming what was asked for.
//!
//! The JWS is parsed by hand: it is three base64url fields and one ES256 check with p256,
//! smaller than a JOSE crate in the guest's TCB.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use kbs_client::ResourceUri;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::error::ErrorKind;
use crate::resource::{ResourceError, ResourceFetcher};

/// Where CDH keeps local sealed-secret verification keys (`kid` = a path below it).
pub const SIGNING_CREDENTIALS_DIR: &str = "/run/confidential-containers/cdh/sealed-secret";
/// The only sealed-secret format version CDH defines.
pub const VERSION: &str = "0.1.0";
/// Largest sealed secret accepted: they are metadata, the secret itself lives in the KBS.
pub const MAX_SEALED_SECRET: usize = 64 << 10;

/// Why a sealed secret could not be unsealed; messages never contain the plaintext.
#[derive(Debug, thiserror::Error)]
pub enum SealedSecretError {
    /// Not a sealed secret in CDH's format.
    #[error("malformed sealed secret: {0}")]
    Malformed(String),
    /// The signature does not verify, or the key is unusable.
    #[error("sealed secret signature: {0}")]
    Signature(String),
    /// A well-formed secret this guest cannot unseal (provider, type, version).
    #[error("sealed secret not supported here: {0}")]
    Unsupported(String),
    /// The verification key could not be read.
    #[error("sealed secret verification key {kid}: {reason}")]
    Credential { kid: String, reason: String },
    /// The verification key or the secret could not be fetched.
    #[error("sealed secret {what}: {source}")]
    Fetch {
        what: String,
        #[source]
        source: ResourceError,
    },
}

impl SealedSecretError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SealedSecretError::Malformed(_) => ErrorKind::Invalid,
            SealedSecretError::Signature(_) => ErrorKind::Denied,
            SealedSecretError::Unsupported(_) => ErrorKind::Unsupported,
            SealedSecretError::Credential { .. } => ErrorKind::NotFound,
            SealedSecretError::Fetch { source, .. } => source.kind(),
        }
    }
}

fn malformed(m: impl Into<String>) -> SealedSecretError {
    SealedSecretError::Malformed(m.into())
}

#[derive(Deserialize)]
struct Header {
    alg: Option<String>,
    kid: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Content {
    Vault { name: String, provider: String },
    Envelope { provider: String },
}

#[derive(Deserialize)]
struct Secret {
    version: String,
    #[serde(flatten)]
    content: Content,
}

/// A P-256 public key as a JWK (RFC 7518 §6.2.1).
#[derive(Deserialize)]
struct EcJwk {
    kty: String,
    crv: String,
    x: String,
    y: String,
}

/// Unseals CDH sealed secrets against the KBS.
pub struct Unsealer {
    fetcher: Arc<dyn ResourceFetcher>,
    credentials: PathBuf,
    skip_verification: bool,
}

impl Unsealer {
    /// An unsealer fetching keys and secrets through `fetcher`; `skip_verification` is CDH's
    /// `skip_sealed_secret_verification` (development only: unsigned secrets are accepted).
    pub fn new(fetcher: Arc<dyn ResourceFetcher>, skip_verification: bool) -> Self {
        Self::with_credentials_dir(fetcher, skip_verification, SIGNING_CREDENTIALS_DIR)
    }

    /// Like [`Unsealer::new`], with local verification keys below `dir`.
    pub fn with_credentials_dir(
        fetcher: Arc<dyn ResourceFetcher>,
        skip_verification: bool,
        dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            fetcher,
            credentials: dir.into(),
            skip_verification,
        }
    }

    /// Verifies `sealed` and returns the secret it points at.
    pub async fn unseal(&self, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealedSecretError> {
        if sealed.len() > MAX_SEALED_SECRET {
            return Err(malformed(format!(
                "{} bytes (at most {MAX_SEALED_SECRET})",
                sealed.len()
            )));
        }
        let text = std::str::from_utf8(sealed).map_err(|_| malformed("not UTF-8"))?;
        let payload = if self.skip_verification {
            // As CDH: without verification the four dot-separated fields are taken as they are.
            let fields: Vec<&str> = text.split('.').collect();
            if fields.len() != 4 || fields[0] != "sealed" {
                return Err(malformed("expected sealed.<header>.<payload>.<signature>"));
            }
            b64(fields[2], "payload")?
        } else {
            self.verified_payload(text.strip_prefix("sealed.").unwrap_or(text))
                .await?
        };
        let secret: Secret = serde_json::from_slice(&payload)
            .map_err(|e| malformed(format!("payload is not a sealed secret: {e}")))?;
        if secret.version != VERSION {
            return Err(SealedSecretError::Unsupported(format!(
                "version {:?} (this guest reads {VERSION})",
                secret.version
            )));
        }
        match secret.content {
            Content::Envelope { provider } => Err(SealedSecretError::Unsupported(format!(
                "envelope secrets (provider {provider:?}) need a KMS client; use a vault secret \
                 with provider \"kbs\""
            ))),
            Content::Vault { provider, .. } if provider != "kbs" => {
                Err(SealedSecretError::Unsupported(format!(
                    "vault provider {provider:?} (only \"kbs\" is available in this guest)"
                )))
            }
            Content::Vault { name, .. } => {
                kbs_uri(&name)?;
                self.fetcher
                    .fetch(&name)
                    .await
                    .map_err(|source| SealedSecretError::Fetch {
                        what: format!("resource {name}"),
                        source,
                    })
            }
        }
    }

    async fn verified_payload(&self, jws: &str) -> Result<Vec<u8>, SealedSecretError> {
        let fields: Vec<&str> = jws.split('.').collect();
        let [header_b64, payload_b64, sig_b64] = fields[..] else {
            return Err(malformed("expected sealed.<header>.<payload>.<signature>"));
        };
        let header: Header = serde_json::from_slice(&b64(header_b64, "header")?)
            .map_err(|e| malformed(format!("JWS header: {e}")))?;
        if header.alg.as_deref() != Some("ES256") {
            return Err(SealedSecretError::Signature(format!(
                "algorithm {:?}: sealed secrets are signed with ES256",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| malformed("JWS header has no kid"))?;
        let key = self.verification_key(&kid).await?;
        let sig = Signature::from_slice(&b64(sig_b64, "signature")?)
            .map_err(|e| SealedSecretError::Signature(format!("not an ES256 signature: {e}")))?;
        key.verify(format!("{header_b64}.{payload_b64}").as_bytes(), &sig)
            .map_err(|_| SealedSecretError::Signature(format!("does not verify with key {kid}")))?;
        b64(payload_b64, "payload")
    }

    async fn verification_key(&self, kid: &str) -> Result<VerifyingKey, SealedSecretError> {
        let jwk = if ResourceUri::parse(kid).is_ok() {
            self.fetcher
                .fetch(kid)
                .await
                .map_err(|source| SealedSecretError::Fetch {
                    what: format!("verification key {kid}"),
                    source,
                })?
        } else {
            Zeroizing::new(self.local_credential(kid)?)
        };
        parse_jwk(&jwk).map_err(|reason| SealedSecretError::Credential {
            kid: kid.into(),
            reason,
        })
    }

    /// A key provisioned below the credentials dir; `kid` may not leave it.
    fn local_credential(&self, kid: &str) -> Result<Vec<u8>, SealedSecretError> {
        let fail = |reason: String| SealedSecretError::Credential {
            kid: kid.into(),
            reason,
        };
        let base = self.credentials.canonicalize().map_err(|e| {
            fail(format!(
                "not a KBS URI, and {} is unavailable: {e}",
                self.credentials.display()
            ))
        })?;
        let path = base
            .join(Path::new(kid))
            .canonicalize()
            .map_err(|e| fail(e.to_string()))?;
        if !path.starts_with(&base) || !path.is_file() {
            return Err(fail(format!(
                "not a file below {}",
                self.credentials.display()
            )));
        }
        let data = std::fs::read(&path).map_err(|e| fail(e.to_string()))?;
        if data.len() > MAX_SEALED_SECRET {
            return Err(fail("too large for a JWK".into()));
        }
        Ok(data)
    }
}

/// Checks that `uri` names a KBS resource (the only thing a `kbs` vault secret may point at,
/// never a local file).
pub fn kbs_uri(uri: &str) -> Result<ResourceUri, SealedSecretError> {
    ResourceUri::parse(uri)
        .map_err(|e| malformed(format!("{uri:?} is not a KBS resource URI: {e}")))
}

fn b64(field: &str, what: &str) -> Result<Vec<u8>, SealedSecretError> {
    URL_SAFE_NO_PAD
        .decode(field)
        .map_err(|e| malformed(format!("JWS {what} is not base64url: {e}")))
}

fn parse_jwk(data: &[u8]) -> Result<VerifyingKey, String> {
    let jwk: EcJwk = serde_json::from_slice(data).map_err(|e| format!("not an EC JWK: {e}"))?;
    if jwk.kty != "EC" || jwk.crv != "P-256" {
        return Err(format!("key is {} {}, not EC P-256", jwk.kty, jwk.crv));
    }
    let coord = |c: &str, name: &str| -> Result<[u8; 32], String> {
        URL_SAFE_NO_PAD
            .decode(c)
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or_else(|| format!("{name} is not a 32-byte base64url coordinate"))
    };
    let (x, y) = (coord(&jwk.x, "x")?, coord(&jwk.y, "y")?);
    let point = p256::EncodedPoint::from_affine_coordinates(&x.into(), &y.into(), false);
    VerifyingKey::from_encoded_point(&point).map_err(|e| format!("not a P-256 point: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer;
    use p256::ecdsa::SigningKey;

    use crate::resource::testutil::MapFetcher as Kbs;

    fn jwk(key: &SigningKey) -> Vec<u8> {
        let p = key.verifying_key().to_encoded_point(false);
        serde_json::json!({"kty": "EC", "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(p.x().unwrap()),
            "y": URL_SAFE_NO_PAD.encode(p.y().unwrap())})
        .to_string()
        .into_bytes()
    }

    /// What CDH's `secret seal` writes: sealed.<header>.<payload>.<ES256 r||s>.
    fn seal(key: &SigningKey, header: serde_json::Value, payload: serde_json::Value) -> String {
        let h = URL_SAFE_NO_PAD.encode(header.to_string());
        let p = URL_SAFE_NO_PAD.encode(payload.to_string());
        let sig: Signature = key.sign(format!("{h}.{p}").as_bytes());
        format!("sealed.{h}.{p}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }

    fn vault(name: &str, provider: &str) -> serde_json::Value {
        serde_json::json!({"version": "0.1.0", "type": "vault", "name": name,
            "provider": provider, "provider_settings": {}, "annotations": {}})
    }

    const KID: &str = "kbs:///default/signing/key";
    const SECRET: &str = "kbs:///default/secret/db-password";

    fn setup() -> (SigningKey, Unsealer) {
        let key = SigningKey::random(&mut rand_core::OsRng);
        let mut kbs = Kbs::default();
        kbs.0.insert(KID.into(), jwk(&key));
        kbs.0.insert(SECRET.into(), b"hunter2".to_vec());
        (key, Unsealer::new(Arc::new(kbs), false))
    }

    fn es256(kid: &str) -> serde_json::Value {
        serde_json::json!({"alg": "ES256", "kid": kid})
    }

    #[tokio::test]
    async fn a_signed_vault_secret_unseals_to_the_kbs_resource() {
        let (key, u) = setup();
        let s = seal(&key, es256(KID), vault(SECRET, "kbs"));
        assert_eq!(u.unseal(s.as_bytes()).await.unwrap().as_slice(), b"hunter2");
    }

    #[tokio::test]
    async fn forged_or_unsigned_secrets_are_denied() {
        let (key, u) = setup();
        let other = SigningKey::random(&mut rand_core::OsRng);
        let forged = seal(&other, es256(KID), vault(SECRET, "kbs"));
        let e = u.unseal(forged.as_bytes()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Denied, "{e}");
        // A payload swapped under a valid signature.
        let good = seal(&key, es256(KID), vault(SECRET, "kbs"));
        let f: Vec<&str> = good.split('.').collect();
        let swapped =
            URL_SAFE_NO_PAD.encode(vault("kbs:///default/secret/other", "kbs").to_string());
        let tampered = format!("sealed.{}.{swapped}.{}", f[1], f[3]);
        assert_eq!(
            u.unseal(tampered.as_bytes()).await.unwrap_err().kind(),
            ErrorKind::Denied
        );
        let none = seal(
            &key,
            serde_json::json!({"alg": "none", "kid": KID}),
            vault(SECRET, "kbs"),
        );
        let e = u.unseal(none.as_bytes()).await.unwrap_err();
        assert!(e.to_string().contains("ES256"), "{e}");
        let e = u.unseal(b"sealed.not.a.jws.at.all").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
    }

    #[tokio::test]
    async fn only_kbs_vault_secrets_are_unsealed() {
        let (key, u) = setup();
        let aws = seal(&key, es256(KID), vault("arn:aws:secret", "aws"));
        let e = u.unseal(aws.as_bytes()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("\"aws\""), "{e}");
        let env = serde_json::json!({"version": "0.1.0", "type": "envelope", "provider": "ehsm",
            "key_id": "k", "encrypted_key": "", "encrypted_data": "", "wrap_type": "A256GCM",
            "iv": "", "provider_settings": {}, "annotations": {}});
        let e = u
            .unseal(seal(&key, es256(KID), env).as_bytes())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("envelope"), "{e}");
        // A vault secret cannot name a local file or inline data through the fetcher.
        let file = seal(&key, es256(KID), vault("file:///etc/shadow", "kbs"));
        assert_eq!(
            u.unseal(file.as_bytes()).await.unwrap_err().kind(),
            ErrorKind::Invalid
        );
        let mut v = vault(SECRET, "kbs");
        v["version"] = "0.2.0".into();
        let e = u
            .unseal(seal(&key, es256(KID), v).as_bytes())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("0.2.0"), "{e}");
    }

    #[tokio::test]
    async fn local_verification_keys_stay_in_their_dir() {
        let (key, u) = setup();
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("sealed-secret");
        std::fs::create_dir(&creds).unwrap();
        std::fs::write(creds.join("team-key"), jwk(&key)).unwrap();
        std::fs::write(dir.path().join("outside-key"), jwk(&key)).unwrap();
        let u = Unsealer::with_credentials_dir(u.fetcher.clone(), false, &creds);
        let s = seal(&key, es256("team-key"), vault(SECRET, "kbs"));
        assert_eq!(u.unseal(s.as_bytes()).await.unwrap().as_slice(), b"hunter2");
        for kid in ["../outside-key", "/etc/passwd", "missing"] {
            let s = seal(&key, es256(kid), vault(SECRET, "kbs"));
            let e = u.unseal(s.as_bytes()).await.unwrap_err();
            assert!(
                matches!(e, SealedSecretError::Credential { .. }),
                "{kid}: {e}"
            );
        }
    }

    #[tokio::test]
    async fn skipping_verification_reads_unsigned_secrets_as_cdh_does() {
        let (_, u) = setup();
        let u = Unsealer::new(u.fetcher.clone(), true);
        let p = URL_SAFE_NO_PAD.encode(vault(SECRET, "kbs").to_string());
        let s = format!("sealed.fakeheader.{p}.fakesignature");
        assert_eq!(u.unseal(s.as_bytes()).await.unwrap().as_slice(), b"hunter2");
        assert!(u.unseal(format!("{p}.x.y").as_bytes()).await.is_err());
    }
}
