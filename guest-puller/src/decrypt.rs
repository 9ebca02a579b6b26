//! ocicrypt layer decryption: media types, annotations, key unwrapping and the
//! `AES_256_CTR_HMAC_SHA256` streaming cipher.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use aes::cipher::{KeyIvInit, StreamCipher};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use tokio::sync::Mutex;
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::keyprovider::{AnnotationPacket, KeyProviderError};
use crate::resource::{ResourceError, ResourceFetcher};
use kbs_client::jwe::{self, JwePrivateKey};

type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;
type HmacSha256 = Hmac<Sha256>;

/// Annotation prefix of wrapped keys.
pub const KEYS_PREFIX: &str = "org.opencontainers.image.enc.keys.";
/// Annotation of JWE-wrapped keys.
pub const JWE_ANNOTATION: &str = "org.opencontainers.image.enc.keys.jwe";
/// Annotation prefix of keyprovider-wrapped keys.
pub const PROVIDER_PREFIX: &str = "org.opencontainers.image.enc.keys.provider.";
/// Annotation with the public cipher options.
pub const PUBOPTS_ANNOTATION: &str = "org.opencontainers.image.enc.pubopts";
/// The only cipher ocicrypt defines.
pub const CIPHER: &str = "AES_256_CTR_HMAC_SHA256";

/// Why a layer key could not be obtained or a layer could not be decrypted.
#[derive(Debug, thiserror::Error)]
pub enum DecryptError {
    /// The layer is encrypted but no annotation we can use carries its key.
    #[error("layer {layer}: no usable wrapped key (annotations present: {present})")]
    NoKeyAnnotation { layer: String, present: String },
    /// Every wrapped key failed to unwrap.
    #[error("layer {layer}: missing or wrong decryption key; tried {tried}")]
    NoKey {
        layer: String,
        tried: String,
        /// The first failure that was not a refusal (KBS outage, timeout), which decides the
        /// kind: an outage must not read as a wrong key.
        #[source]
        transient: Option<Box<DecryptError>>,
    },
    /// An AnnotationPacket is malformed or cannot be opened with its KEK.
    #[error(transparent)]
    Packet(#[from] KeyProviderError),
    /// The KEK named by an AnnotationPacket could not be fetched.
    #[error("key id {kid}: {source}")]
    Kek {
        kid: String,
        #[source]
        source: ResourceError,
    },
    /// A configured JWE private key could not be fetched.
    #[error("JWE private key {uri}: {source}")]
    JweKeyFetch {
        uri: String,
        #[source]
        source: ResourceError,
    },
    /// A configured JWE private key is not a usable key.
    #[error("JWE private key {uri}: {reason}")]
    JweKeyInvalid { uri: String, reason: String },
    /// The key-wrapping metadata is malformed.
    #[error("layer {layer}: malformed encryption metadata: {reason}")]
    Malformed { layer: String, reason: String },
    /// The cipher is not AES_256_CTR_HMAC_SHA256.
    #[error("layer {layer}: unsupported cipher {cipher:?}")]
    UnsupportedCipher { layer: String, cipher: String },
}

/// Whether a layer media type is ocicrypt-encrypted.
pub fn is_encrypted(media_type: &str) -> bool {
    media_type.ends_with("+encrypted")
}

/// Layer compression after stripping `+encrypted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip (possibly multi-member).
    Gzip,
    /// zstd (possibly multi-frame).
    Zstd,
}

/// Maps a layer media type to its compression; `None` for non-layer types.
pub fn compression_of(media_type: &str) -> Option<Compression> {
    let mt = media_type.strip_suffix("+encrypted").unwrap_or(media_type);
    match mt {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Some(Compression::Zstd),
        _ => None,
    }
}

/// Decrypted per-layer key material (PrivateLayerBlockCipherOptions + public HMAC).
#[derive(Clone)]
pub struct LayerKey {
    symkey: Zeroizing<[u8; 32]>,
    nonce: [u8; 16],
    hmac: [u8; 32],
    /// Digest of the plaintext (still compressed) blob, from the private options.
    pub plain_digest: Option<String>,
}

impl std::fmt::Debug for LayerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerKey")
            .field("plain_digest", &self.plain_digest)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct PrivateOpts {
    #[serde(deserialize_with = "zeroizing_string")]
    symkey: Zeroizing<String>,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    cipheroptions: Option<BTreeMap<String, String>>,
}

fn zeroizing_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Zeroizing<String>, D::Error> {
    String::deserialize(d).map(Zeroizing::new)
}

#[derive(Deserialize, Default)]
struct PublicOpts {
    #[serde(default)]
    cipher: Option<String>,
    #[serde(default)]
    hmac: Option<String>,
    #[serde(default)]
    cipheroptions: Option<BTreeMap<String, String>>,
}

impl LayerKey {
    /// Builds the layer key from PLBCO JSON and the descriptor's `pubopts` annotation.
    pub fn from_opts(
        layer: &str,
        plbco_json: &[u8],
        pubopts_b64: Option<&str>,
    ) -> Result<Self, DecryptError> {
        let malformed = |reason: String| DecryptError::Malformed {
            layer: layer.to_string(),
            reason,
        };
        let private: PrivateOpts = serde_json::from_slice(plbco_json)
            .map_err(|e| malformed(format!("private options JSON: {}", e.classify_str())))?;
        let public: PublicOpts = match pubopts_b64 {
            Some(b) => {
                let raw = STANDARD
                    .decode(b.trim())
                    .map_err(|e| malformed(format!("pubopts base64: {e}")))?;
                serde_json::from_slice(&raw).map_err(|e| malformed(format!("pubopts JSON: {e}")))?
            }
            None => PublicOpts::default(),
        };
        let cipher = public.cipher.clone().unwrap_or_else(|| CIPHER.to_string());
        if cipher != CIPHER {
            return Err(DecryptError::UnsupportedCipher {
                layer: layer.to_string(),
                cipher,
            });
        }
        let key_bytes = Zeroizing::new(
            STANDARD
                .decode(private.symkey.trim())
                .map_err(|_| malformed("symkey is not base64".into()))?,
        );
        let symkey: [u8; 32] = key_bytes[..]
            .try_into()
            .map_err(|_| malformed(format!("symkey is {} bytes, need 32", key_bytes.len())))?;
        // ocicrypt's GetOpt: public cipheroptions first, then private.
        let nonce_b64 = public
            .cipheroptions
            .as_ref()
            .and_then(|m| m.get("nonce"))
            .or_else(|| private.cipheroptions.as_ref().and_then(|m| m.get("nonce")))
            .ok_or_else(|| malformed("no nonce in cipher options".into()))?;
        let nonce: [u8; 16] = STANDARD
            .decode(nonce_b64.trim())
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| malformed("nonce must be 16 base64 bytes".into()))?;
        let hmac: [u8; 32] = public
            .hmac
            .as_deref()
            .and_then(|h| STANDARD.decode(h.trim()).ok())
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| malformed("pubopts has no 32-byte hmac".into()))?;
        Ok(Self {
            symkey: Zeroizing::new(symkey),
            nonce,
            hmac,
            plain_digest: private.digest.filter(|d| !d.is_empty()),
        })
    }

    /// Wraps `inner` (ciphertext) in a decrypting, HMAC-verifying reader.
    pub fn decryptor<R: Read>(&self, inner: R) -> DecryptReader<R> {
        DecryptReader {
            inner,
            cipher: Aes256Ctr::new(self.symkey.as_ref().into(), &self.nonce.into()),
            mac: Some(
                <HmacSha256 as Mac>::new_from_slice(self.symkey.as_ref())
                    .expect("HMAC accepts any key length"),
            ),
            expected: self.hmac,
        }
    }
}

trait ClassifyStr {
    fn classify_str(&self) -> &'static str;
}
impl ClassifyStr for serde_json::Error {
    // serde_json errors can quote input fragments; for secret-bearing JSON only say what kind.
    fn classify_str(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "I/O error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "unexpected fields or types",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

/// Streaming `AES_256_CTR_HMAC_SHA256` decryptor; fails the read that reaches EOF if the
/// HMAC over the ciphertext does not match, so callers must stage output until EOF.
pub struct DecryptReader<R> {
    inner: R,
    cipher: Aes256Ctr,
    mac: Option<HmacSha256>,
    expected: [u8; 32],
}

impl<R: Read> Read for DecryptReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 {
            if let Some(mac) = self.mac.take() {
                // verify_slice is a constant-time comparison.
                mac.verify_slice(&self.expected).map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        "layer HMAC mismatch: ciphertext was modified or the key is wrong",
                    )
                })?;
            }
            return Ok(0);
        }
        match self.mac.as_mut() {
            Some(mac) => mac.update(&buf[..n]),
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "data after end of encrypted stream",
                ))
            }
        }
        self.cipher.apply_keystream(&mut buf[..n]);
        Ok(n)
    }
}

/// What unwrapping a layer key tried, and the first failure that was an outage.
#[derive(Default)]
struct Tried {
    what: Vec<String>,
    transient: Option<DecryptError>,
}

impl Tried {
    fn push(&mut self, what: impl Into<String>) {
        self.what.push(what.into());
    }

    fn failed(&mut self, what: String, e: DecryptError) {
        self.what.push(what);
        if self.transient.is_none() && crate::error::is_transient(e.kind()) {
            self.transient = Some(e);
        }
    }
}

/// Default lifetime of fetched JWE private keys ([`KeyUnwrapper::with_key_lifetime`]).
pub const DEFAULT_KEY_LIFETIME: Duration = Duration::from_secs(60);

/// Unwraps layer keys from descriptor annotations using the KBS and configured JWE keys.
pub struct KeyUnwrapper {
    fetcher: Arc<dyn ResourceFetcher>,
    providers: Vec<String>,
    jwe_key_uris: Vec<String>,
    /// JWE private keys and when they were fetched; the lock also makes concurrent layers
    /// share one fetch.
    jwe_keys: Mutex<Option<(Instant, Arc<Vec<JwePrivateKey>>)>>,
    key_lifetime: Duration,
}

impl KeyUnwrapper {
    /// Creates an unwrapper; JWE private keys are fetched on need and kept for
    /// [`DEFAULT_KEY_LIFETIME`].
    pub fn new(
        fetcher: Arc<dyn ResourceFetcher>,
        providers: Vec<String>,
        jwe_key_uris: Vec<String>,
    ) -> Self {
        Self {
            fetcher,
            providers,
            jwe_key_uris,
            jwe_keys: Mutex::new(None),
            key_lifetime: DEFAULT_KEY_LIFETIME,
        }
    }

    /// Keeps fetched JWE private keys for `lifetime` (zero: fetched for every layer), so that
    /// a key revoked in the KBS stops decrypting new layers once that time has passed.
    pub fn with_key_lifetime(mut self, lifetime: Duration) -> Self {
        self.key_lifetime = lifetime;
        self
    }

    async fn jwe_keys(&self) -> Result<Arc<Vec<JwePrivateKey>>, DecryptError> {
        let mut cached = self.jwe_keys.lock().await;
        if let Some((at, keys)) = cached.as_ref() {
            if at.elapsed() < self.key_lifetime {
                return Ok(keys.clone());
            }
        }
        // A failed refresh must not leave the old keys usable.
        *cached = None;
        let mut keys = Vec::new();
        for uri in &self.jwe_key_uris {
            let bytes =
                self.fetcher
                    .fetch(uri)
                    .await
                    .map_err(|source| DecryptError::JweKeyFetch {
                        uri: uri.clone(),
                        source,
                    })?;
            keys.push(JwePrivateKey::from_bytes(&bytes).map_err(|e| {
                DecryptError::JweKeyInvalid {
                    uri: uri.clone(),
                    reason: e.to_string(),
                }
            })?);
        }
        let keys = Arc::new(keys);
        if !self.key_lifetime.is_zero() {
            *cached = Some((Instant::now(), keys.clone()));
        }
        Ok(keys)
    }

    /// Returns the layer key for an encrypted layer descriptor.
    pub async fn unwrap_layer_key(
        &self,
        layer: &str,
        annotations: &BTreeMap<String, String>,
    ) -> Result<LayerKey, DecryptError> {
        let pubopts = annotations.get(PUBOPTS_ANNOTATION).map(String::as_str);
        let mut tried = Tried::default();
        let mut usable = false;
        for (name, value) in annotations {
            let Some(scheme) = name.strip_prefix(KEYS_PREFIX) else {
                continue;
            };
            if let Some(provider) = scheme.strip_prefix("provider.") {
                if !self.providers.iter().any(|p| p == provider) {
                    continue;
                }
                usable = true;
                for entry in value.split(',').filter(|e| !e.is_empty()) {
                    match self.unwrap_provider_entry(entry).await {
                        Ok(plbco) => return LayerKey::from_opts(layer, &plbco, pubopts),
                        Err(e) => tried.failed(format!("provider {provider}: {e}"), e),
                    }
                }
            } else if scheme == "jwe" {
                usable = true;
                let keys = match self.jwe_keys().await {
                    Ok(k) => k,
                    Err(e) => {
                        tried.failed(e.to_string(), e);
                        continue;
                    }
                };
                if keys.is_empty() {
                    tried.push("jwe: no JWE private keys configured ([keys] jwe_private_keys)");
                    continue;
                }
                for entry in value.split(',').filter(|e| !e.is_empty()) {
                    let raw = match STANDARD.decode(entry.trim()) {
                        Ok(r) => r,
                        Err(e) => {
                            tried.push(format!("jwe: entry is not base64: {e}"));
                            continue;
                        }
                    };
                    match jwe::decrypt_with_keys(&raw, &keys) {
                        Ok(plbco) => return LayerKey::from_opts(layer, &plbco, pubopts),
                        Err(e) => tried.push(format!("jwe: {e}")),
                    }
                }
            }
        }
        if !usable {
            let present: Vec<&str> = annotations
                .keys()
                .filter(|k| k.starts_with(KEYS_PREFIX))
                .map(String::as_str)
                .collect();
            return Err(DecryptError::NoKeyAnnotation {
                layer: layer.to_string(),
                present: if present.is_empty() {
                    "none".into()
                } else {
                    present.join(", ")
                },
            });
        }
        Err(DecryptError::NoKey {
            layer: layer.to_string(),
            tried: tried.what.join("; "),
            transient: tried.transient.map(Box::new),
        })
    }

    async fn unwrap_provider_entry(
        &self,
        entry_b64: &str,
    ) -> Result<Zeroizing<Vec<u8>>, DecryptError> {
        let packet = STANDARD
            .decode(entry_b64.trim())
            .map_err(|e| KeyProviderError::BadRequest(format!("annotation is not base64: {e}")))?;
        self.unwrap_annotation_packet(&packet).await
    }

    /// Unwraps a CoCo AnnotationPacket (v1/v2 JSON) to the PLBCO JSON it protects, with the KEK
    /// fetched from the KBS resource named by the packet's `kid`.
    pub async fn unwrap_annotation_packet(
        &self,
        packet_json: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, DecryptError> {
        let p = AnnotationPacket::from_json(packet_json)?;
        p.check_provider()?;
        let kek = self
            .fetcher
            .fetch(&p.kek_uri())
            .await
            .map_err(|source| DecryptError::Kek {
                kid: p.kid.clone(),
                source,
            })?;
        Ok(p.open(&kek)?)
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use aes::cipher::{KeyIvInit, StreamCipher};

    /// Encrypts `plain` the way ocicrypt does; returns (ciphertext, PLBCO JSON, pubopts b64).
    pub fn ocicrypt_encrypt(
        plain: &[u8],
        key: [u8; 32],
        nonce: [u8; 16],
        digest: &str,
    ) -> (Vec<u8>, Vec<u8>, String) {
        let mut ct = plain.to_vec();
        Aes256Ctr::new(&key.into(), &nonce.into()).apply_keystream(&mut ct);
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&key).unwrap();
        mac.update(&ct);
        let hmac = mac.finalize().into_bytes();
        let plbco = serde_json::json!({"symkey": STANDARD.encode(key), "digest": digest,
            "cipheroptions": {"nonce": STANDARD.encode(nonce)}});
        let pubopts = serde_json::json!({"cipher": CIPHER, "hmac": STANDARD.encode(hmac),
            "cipheroptions": {}});
        (
            ct,
            plbco.to_string().into_bytes(),
            STANDARD.encode(pubopts.to_string()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use aes_gcm::aead::{Aead, KeyInit};
    use std::collections::HashMap;

    use crate::resource::testutil::MapFetcher;

    #[test]
    fn ctr_counter_is_full_128_bit_big_endian() {
        // Nonce ending in ff..ff: the carry must run into the upper 64 bits (Go cipher.NewCTR).
        let key = [7u8; 32];
        let mut nonce = [0u8; 16];
        nonce[7] = 1;
        nonce[8..].copy_from_slice(&[0xff; 8]);
        let plain = vec![0u8; 64];
        let (ct, plbco, pubopts) = ocicrypt_encrypt(&plain, key, nonce, "");
        // Second block keystream = AES(key, nonce+1) = AES(key, 00..02 00..00).
        use aes::cipher::{BlockEncrypt, KeyInit as _};
        let aes = aes::Aes256::new(&key.into());
        let mut block = [0u8; 16];
        block[7] = 2;
        let mut b = block.into();
        aes.encrypt_block(&mut b);
        assert_eq!(&ct[16..32], &b[..]);
        let k = LayerKey::from_opts("sha256:x", &plbco, Some(&pubopts)).unwrap();
        let mut out = Vec::new();
        k.decryptor(&ct[..]).read_to_end(&mut out).unwrap();
        assert_eq!(out, plain);
    }

    #[test]
    fn hmac_mismatch_fails_at_eof() {
        let (mut ct, plbco, pubopts) = ocicrypt_encrypt(b"hello world layer", [1; 32], [2; 16], "");
        ct[3] ^= 1;
        let k = LayerKey::from_opts("sha256:x", &plbco, Some(&pubopts)).unwrap();
        let mut out = Vec::new();
        let err = k.decryptor(&ct[..]).read_to_end(&mut out).unwrap_err();
        assert!(err.to_string().contains("HMAC mismatch"));
        // Truncation is also caught.
        let (ct, plbco, pubopts) = ocicrypt_encrypt(b"hello world layer", [1; 32], [2; 16], "");
        let k = LayerKey::from_opts("sha256:x", &plbco, Some(&pubopts)).unwrap();
        assert!(k
            .decryptor(&ct[..ct.len() - 1])
            .read_to_end(&mut Vec::new())
            .is_err());
    }

    #[test]
    fn missing_hmac_or_bad_cipher_rejected() {
        let (_, plbco, _) = ocicrypt_encrypt(b"x", [1; 32], [2; 16], "");
        let no_hmac =
            STANDARD.encode(r#"{"cipher":"AES_256_CTR_HMAC_SHA256","cipheroptions":null}"#);
        assert!(LayerKey::from_opts("l", &plbco, Some(&no_hmac)).is_err());
        let other = STANDARD.encode(r#"{"cipher":"ROT13","hmac":""}"#);
        assert!(matches!(
            LayerKey::from_opts("l", &plbco, Some(&other)),
            Err(DecryptError::UnsupportedCipher { .. })
        ));
    }

    #[test]
    fn media_types() {
        assert!(is_encrypted(
            "application/vnd.oci.image.layer.v1.tar+zstd+encrypted"
        ));
        assert_eq!(
            compression_of("application/vnd.oci.image.layer.v1.tar+zstd+encrypted"),
            Some(Compression::Zstd)
        );
        assert_eq!(
            compression_of("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            compression_of("application/vnd.oci.image.config.v1+json"),
            None
        );
    }

    async fn packet_roundtrip(wrap_type: &str) {
        let kek = [9u8; 32];
        let (_, plbco, pubopts) = ocicrypt_encrypt(b"x", [1; 32], [2; 16], "sha256:ab");
        let (wrapped, iv) = if wrap_type == "A256GCM" {
            let iv = [3u8; 12];
            let ct = aes_gcm::Aes256Gcm::new_from_slice(&kek)
                .unwrap()
                .encrypt(aes_gcm::Nonce::from_slice(&iv), plbco.as_slice())
                .unwrap();
            (ct, iv.to_vec())
        } else {
            let iv = [4u8; 16];
            let mut ct = plbco.clone();
            Aes256Ctr::new(&kek.into(), &iv.into()).apply_keystream(&mut ct);
            (ct, iv.to_vec())
        };
        let packet = serde_json::json!({"kid": "kbs:///default/key/k1",
            "wrapped_data": STANDARD.encode(&wrapped), "iv": STANDARD.encode(&iv),
            "wrap_type": wrap_type});
        let mut ann = BTreeMap::new();
        ann.insert(
            format!("{PROVIDER_PREFIX}attestation-agent"),
            format!(
                "{},{}",
                STANDARD.encode("{}"),
                STANDARD.encode(packet.to_string())
            ),
        );
        ann.insert(PUBOPTS_ANNOTATION.to_string(), pubopts);
        let mut m = HashMap::new();
        m.insert("kbs:///default/key/k1".to_string(), kek.to_vec());
        let u = KeyUnwrapper::new(
            Arc::new(MapFetcher(m)),
            vec!["attestation-agent".into()],
            vec![],
        );
        let k = u.unwrap_layer_key("sha256:l1", &ann).await.unwrap();
        assert_eq!(k.plain_digest.as_deref(), Some("sha256:ab"));
        // Wrong KEK: the error names the layer and key id, never the key.
        let mut m = HashMap::new();
        m.insert("kbs:///default/key/k1".to_string(), vec![8u8; 32]);
        let u = KeyUnwrapper::new(
            Arc::new(MapFetcher(m)),
            vec!["attestation-agent".into()],
            vec![],
        );
        let e = u
            .unwrap_layer_key("sha256:l1", &ann)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sha256:l1") && e.contains("kbs:///default/key/k1"),
            "{e}"
        );
        assert!(!e.contains(&STANDARD.encode([8u8; 32])));
    }

    #[tokio::test]
    async fn annotation_packet_gcm_and_ctr() {
        packet_roundtrip("A256GCM").await;
        packet_roundtrip("A256CTR").await;
    }

    #[tokio::test]
    async fn unconfigured_provider_is_not_used() {
        let mut ann = BTreeMap::new();
        ann.insert(format!("{PROVIDER_PREFIX}other"), "e30=".into());
        let u = KeyUnwrapper::new(
            Arc::new(MapFetcher(HashMap::new())),
            vec!["attestation-agent".into()],
            vec![],
        );
        let e = u.unwrap_layer_key("sha256:l", &ann).await.unwrap_err();
        assert!(matches!(e, DecryptError::NoKeyAnnotation { .. }));
    }
}
