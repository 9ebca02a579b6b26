//! JWE (RFC 7516) for both places guestpull meets it: KBS resource responses (flattened JSON,
//! decrypted with the TEE key) and ocicrypt `enc.keys.jwe` layer-key recipients (general JSON,
//! decrypted with the image owner's private keys).
//!
//! Hand-written on RustCrypto primitives: the JOSE crates either pull a second crypto stack
//! (openssl/aws-lc) or re-serialize the protected header, and the reference's AAD bug comes
//! exactly from that re-serialization. Here the AAD is the received `protected` string verbatim.
//! Supported: general and flattened JSON serialization; key management `RSA-OAEP` (SHA-1, what
//! ocicrypt/go-jose emit for RSA keys), `RSA-OAEP-256`, `RSA1_5` (decrypt only, old KBS),
//! `ECDH-ES+A128KW`/`+A192KW`/`+A256KW` on P-256/P-384/P-521; content encryption
//! `A128GCM`/`A192GCM`/`A256GCM` (CBC-HS is produced by neither peer and is rejected clearly).

use aes_gcm::aead::generic_array::typenum::U12;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes128Gcm, Aes256Gcm, AesGcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use kbs_types::{ProtectedHeader, Response, TeePubKey};
use p256::elliptic_curve::sec1::{EncodedPoint, FromEncodedPoint, ToEncodedPoint};
use rand_core::{OsRng, RngCore};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::DecodePrivateKey;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::keys::{KeyInner, TeeKeyPair, ALG_ECDH_ES_A256KW, ALG_RSA1_5, ALG_RSA_OAEP_256};

type Aes192Gcm = AesGcm<aes::Aes192, U12>;

/// The content encryption the KBS uses.
pub const ENC_A256GCM: &str = "A256GCM";

/// Why a JWE could not be produced or opened. Messages never contain key material or plaintext.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JweError {
    /// The JSON is not a JWE.
    #[error("malformed JWE: {0}")]
    Malformed(String),
    /// The header names an algorithm we do not implement, or one that does not fit our key.
    #[error("unsupported JWE: {0}")]
    Unsupported(String),
    /// A private key could not be parsed.
    #[error("invalid private key: {0}")]
    BadKey(String),
    /// The CEK could not be unwrapped (wrong key or tampered `encrypted_key`).
    #[error("key unwrap failed for alg {0}")]
    KeyUnwrap(String),
    /// AES-GCM authentication failed: ciphertext, tag, IV or header were modified.
    #[error("content authentication failed (tampered JWE)")]
    Authentication,
    /// None of the supplied keys unwrapped any recipient.
    #[error(
        "no private key matches any of the {recipients} JWE recipient(s) (algorithms: {algs})"
    )]
    NoMatchingKey {
        /// How many recipients the JWE has.
        recipients: usize,
        /// Their `alg`s, comma-separated.
        algs: String,
    },
    /// Encryption failed.
    #[error("JWE encryption failed: {0}")]
    Encrypt(String),
}

/// A private key usable for JWE key unwrapping.
pub enum JwePrivateKey {
    /// RSA key for RSA-OAEP / RSA-OAEP-256.
    Rsa(Box<rsa::RsaPrivateKey>),
    /// P-256 key for ECDH-ES+AxKW.
    P256(p256::SecretKey),
    /// P-384 key for ECDH-ES+AxKW.
    P384(p384::SecretKey),
    /// P-521 key for ECDH-ES+AxKW.
    P521(p521::SecretKey),
}

impl std::fmt::Debug for JwePrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JwePrivateKey::Rsa(_) => "JwePrivateKey::Rsa(..)",
            JwePrivateKey::P256(_) => "JwePrivateKey::P256(..)",
            JwePrivateKey::P384(_) => "JwePrivateKey::P384(..)",
            JwePrivateKey::P521(_) => "JwePrivateKey::P521(..)",
        })
    }
}

impl JwePrivateKey {
    fn kind(&self) -> &'static str {
        match self {
            JwePrivateKey::Rsa(_) => "RSA",
            JwePrivateKey::P256(_) => "P-256",
            JwePrivateKey::P384(_) => "P-384",
            JwePrivateKey::P521(_) => "P-521",
        }
    }

    /// Parses a PEM (PKCS#8, PKCS#1 RSA, SEC1 EC) or DER (PKCS#8/PKCS#1/SEC1) private key.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, JweError> {
        if let Ok(text) = std::str::from_utf8(bytes) {
            if text.contains("-----BEGIN") {
                return Self::from_pem(text);
            }
        }
        Self::from_der(bytes)
    }

    fn from_pem(text: &str) -> Result<Self, JweError> {
        if text.contains("ENCRYPTED PRIVATE KEY") {
            return Err(JweError::BadKey(
                "password-protected keys are not supported".into(),
            ));
        }
        if let Ok(k) = rsa::RsaPrivateKey::from_pkcs8_pem(text) {
            return Ok(Self::Rsa(Box::new(k)));
        }
        if let Ok(k) = rsa::RsaPrivateKey::from_pkcs1_pem(text) {
            return Ok(Self::Rsa(Box::new(k)));
        }
        if let Ok(k) = p256::SecretKey::from_pkcs8_pem(text) {
            return Ok(Self::P256(k));
        }
        if let Ok(k) = p384::SecretKey::from_pkcs8_pem(text) {
            return Ok(Self::P384(k));
        }
        if let Ok(k) = p521::SecretKey::from_pkcs8_pem(text) {
            return Ok(Self::P521(k));
        }
        if let Ok(k) = p256::SecretKey::from_sec1_pem(text) {
            return Ok(Self::P256(k));
        }
        if let Ok(k) = p384::SecretKey::from_sec1_pem(text) {
            return Ok(Self::P384(k));
        }
        if let Ok(k) = p521::SecretKey::from_sec1_pem(text) {
            return Ok(Self::P521(k));
        }
        Err(JweError::BadKey(
            "PEM is not an RSA or P-256/384/521 private key".into(),
        ))
    }

    fn from_der(der: &[u8]) -> Result<Self, JweError> {
        if let Ok(k) = rsa::RsaPrivateKey::from_pkcs8_der(der) {
            return Ok(Self::Rsa(Box::new(k)));
        }
        if let Ok(k) = rsa::RsaPrivateKey::from_pkcs1_der(der) {
            return Ok(Self::Rsa(Box::new(k)));
        }
        if let Ok(k) = p256::SecretKey::from_pkcs8_der(der) {
            return Ok(Self::P256(k));
        }
        if let Ok(k) = p384::SecretKey::from_pkcs8_der(der) {
            return Ok(Self::P384(k));
        }
        if let Ok(k) = p521::SecretKey::from_pkcs8_der(der) {
            return Ok(Self::P521(k));
        }
        if let Ok(k) = p256::SecretKey::from_sec1_der(der) {
            return Ok(Self::P256(k));
        }
        if let Ok(k) = p384::SecretKey::from_sec1_der(der) {
            return Ok(Self::P384(k));
        }
        if let Ok(k) = p521::SecretKey::from_sec1_der(der) {
            return Ok(Self::P521(k));
        }
        Err(JweError::BadKey(
            "DER is not an RSA or P-256/384/521 private key".into(),
        ))
    }
}

#[derive(Deserialize)]
struct JweJson {
    protected: Option<String>,
    unprotected: Option<Map<String, Value>>,
    recipients: Option<Vec<Recipient>>,
    // Flattened serialization keeps the single recipient at top level.
    header: Option<Map<String, Value>>,
    encrypted_key: Option<String>,
    iv: String,
    ciphertext: String,
    tag: String,
    aad: Option<String>,
}

#[derive(Deserialize)]
struct Recipient {
    header: Option<Map<String, Value>>,
    encrypted_key: Option<String>,
}

fn b64(field: &str, s: &str) -> Result<Vec<u8>, JweError> {
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|e| JweError::Malformed(format!("{field}: {e}")))
}

/// A parsed JWE: shared header, recipients, and the content parts.
struct Parsed {
    recipients: Vec<(Map<String, Value>, Vec<u8>)>,
    iv: Vec<u8>,
    ciphertext: Vec<u8>,
    tag: Vec<u8>,
    aad: Vec<u8>,
}

impl Parsed {
    fn new(jwe: &[u8]) -> Result<Parsed, JweError> {
        let j: JweJson =
            serde_json::from_slice(jwe).map_err(|e| JweError::Malformed(e.to_string()))?;
        let mut shared = Map::new();
        if let Some(p) = &j.protected {
            let bytes = b64("protected", p)?;
            let v: Map<String, Value> = serde_json::from_slice(&bytes)
                .map_err(|e| JweError::Malformed(format!("protected header: {e}")))?;
            shared.extend(v);
        }
        if let Some(u) = &j.unprotected {
            shared.extend(u.clone());
        }
        let raw: Vec<Recipient> = match j.recipients {
            Some(r) => r,
            None => vec![Recipient {
                header: j.header.clone(),
                encrypted_key: j.encrypted_key.clone(),
            }],
        };
        if raw.is_empty() {
            return Err(JweError::Malformed("no recipients".into()));
        }
        let mut recipients = Vec::with_capacity(raw.len());
        for r in raw {
            let mut header = shared.clone();
            if let Some(h) = r.header {
                header.extend(h);
            }
            let ek = match &r.encrypted_key {
                Some(e) => b64("encrypted_key", e)?,
                None => Vec::new(),
            };
            recipients.push((header, ek));
        }
        // RFC 7516 §5.1 step 14: AAD is the received protected string, verbatim.
        let mut aad = j.protected.clone().unwrap_or_default().into_bytes();
        if let Some(extra) = &j.aad {
            aad.push(b'.');
            aad.extend_from_slice(extra.as_bytes());
        }
        Ok(Parsed {
            recipients,
            iv: b64("iv", &j.iv)?,
            ciphertext: b64("ciphertext", &j.ciphertext)?,
            tag: b64("tag", &j.tag)?,
            aad,
        })
    }

    /// Opens recipient `i` with `key`; the error says exactly why it did not open.
    fn open(&self, i: usize, key: &JwePrivateKey) -> Result<Zeroizing<Vec<u8>>, JweError> {
        let (header, ek) = &self.recipients[i];
        let field = |n: &str| header.get(n).and_then(Value::as_str).unwrap_or("");
        let (alg, enc) = (field("alg"), field("enc"));
        let cek = unwrap_cek(alg, enc, header, ek, key)?;
        content_decrypt(enc, &cek, &self.iv, &self.ciphertext, &self.tag, &self.aad)
    }

    fn algs(&self) -> String {
        self.recipients
            .iter()
            .map(|(h, _)| h.get("alg").and_then(Value::as_str).unwrap_or(""))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Decrypts a JWE in JSON serialization (general or flattened) with the first key that opens
/// any recipient (ocicrypt layer keys: an image may be encrypted to several recipients).
pub fn decrypt_with_keys(
    jwe: &[u8],
    keys: &[JwePrivateKey],
) -> Result<Zeroizing<Vec<u8>>, JweError> {
    let p = Parsed::new(jwe)?;
    let mut tampered = false;
    for i in 0..p.recipients.len() {
        for key in keys {
            match p.open(i, key) {
                Ok(pt) => return Ok(pt),
                // The CEK unwrapped, so the content is corrupt; still try the remaining keys.
                Err(JweError::Authentication) => tampered = true,
                Err(JweError::Malformed(m)) => return Err(JweError::Malformed(m)),
                Err(_) => {}
            }
        }
    }
    if tampered {
        return Err(JweError::Authentication);
    }
    Err(JweError::NoMatchingKey {
        recipients: p.recipients.len(),
        algs: p.algs(),
    })
}

/// Decrypts a KBS resource response body (flattened JSON) with the TEE key.
pub fn decrypt(body: &[u8], key: &TeeKeyPair) -> Result<Zeroizing<Vec<u8>>, JweError> {
    let p = Parsed::new(body)?;
    if p.recipients.len() != 1 {
        return Err(JweError::Malformed(format!(
            "a KBS response has one recipient, this has {}",
            p.recipients.len()
        )));
    }
    let key = match &key.inner {
        KeyInner::Ec(sk) => JwePrivateKey::P256(sk.clone()),
        KeyInner::Rsa(sk) => JwePrivateKey::Rsa(sk.clone()),
    };
    p.open(0, &key)
}

fn cek_len(enc: &str) -> Result<usize, JweError> {
    match enc {
        "A128GCM" => Ok(16),
        "A192GCM" => Ok(24),
        "A256GCM" => Ok(32),
        other => Err(JweError::Unsupported(format!("enc {other}"))),
    }
}

fn content_decrypt(
    enc: &str,
    cek: &[u8],
    iv: &[u8],
    ct: &[u8],
    tag: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, JweError> {
    if iv.len() != 12 || tag.len() != 16 {
        return Err(JweError::Malformed(
            "GCM iv must be 12 and tag 16 bytes".into(),
        ));
    }
    let mut msg = Vec::with_capacity(ct.len() + 16);
    msg.extend_from_slice(ct);
    msg.extend_from_slice(tag);
    let payload = Payload { msg: &msg, aad };
    let nonce = aes_gcm::Nonce::from_slice(iv);
    let bad = |_| JweError::Authentication;
    let pt = match enc {
        "A128GCM" => Aes128Gcm::new_from_slice(cek)
            .map_err(|_| JweError::Malformed("CEK length".into()))?
            .decrypt(nonce, payload)
            .map_err(bad)?,
        "A192GCM" => Aes192Gcm::new_from_slice(cek)
            .map_err(|_| JweError::Malformed("CEK length".into()))?
            .decrypt(nonce, payload)
            .map_err(bad)?,
        "A256GCM" => Aes256Gcm::new_from_slice(cek)
            .map_err(|_| JweError::Malformed("CEK length".into()))?
            .decrypt(nonce, payload)
            .map_err(bad)?,
        other => return Err(JweError::Unsupported(format!("enc {other}"))),
    };
    Ok(Zeroizing::new(pt))
}

/// Unwraps the CEK of one recipient: `Unsupported` when `key` cannot serve `alg`,
/// `KeyUnwrap` when it is the wrong key or `encrypted_key` was tampered with.
fn unwrap_cek(
    alg: &str,
    enc: &str,
    header: &Map<String, Value>,
    ek: &[u8],
    key: &JwePrivateKey,
) -> Result<Zeroizing<Vec<u8>>, JweError> {
    let misfit = || JweError::Unsupported(format!("alg {alg} does not fit a {} key", key.kind()));
    let unwrap_failed = || JweError::KeyUnwrap(alg.to_string());
    match alg {
        "RSA-OAEP" | "RSA-OAEP-256" | ALG_RSA1_5 => {
            let JwePrivateKey::Rsa(k) = key else {
                return Err(misfit());
            };
            let cek = match alg {
                "RSA-OAEP" => k.decrypt(rsa::Oaep::new::<sha1::Sha1>(), ek),
                "RSA-OAEP-256" => k.decrypt(rsa::Oaep::new::<Sha256>(), ek),
                _ => k.decrypt(rsa::Pkcs1v15Encrypt, ek),
            };
            cek.map(Zeroizing::new).map_err(|_| unwrap_failed())
        }
        "ECDH-ES+A128KW" | "ECDH-ES+A192KW" | "ECDH-ES+A256KW" => {
            let kek_len = match alg {
                "ECDH-ES+A128KW" => 16,
                "ECDH-ES+A192KW" => 24,
                _ => 32,
            };
            let epk = header
                .get("epk")
                .and_then(Value::as_object)
                .ok_or_else(|| JweError::Malformed("ECDH-ES recipient without epk".into()))?;
            let Some(z) = ecdh_shared(epk, key)? else {
                return Err(misfit());
            };
            let apu = match header.get("apu").and_then(Value::as_str) {
                Some(s) => b64("apu", s)?,
                None => Vec::new(),
            };
            let apv = match header.get("apv").and_then(Value::as_str) {
                Some(s) => b64("apv", s)?,
                None => Vec::new(),
            };
            let kek = concat_kdf(&z, alg.as_bytes(), &apu, &apv, kek_len);
            let cek = aes_kw_unwrap(&kek, ek)?.ok_or_else(unwrap_failed)?;
            if cek.len() != cek_len(enc)? {
                return Err(unwrap_failed());
            }
            Ok(cek)
        }
        other => Err(JweError::Unsupported(format!("alg {other}"))),
    }
}

fn aes_kw_unwrap(kek: &[u8], wrapped: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, JweError> {
    if wrapped.len() < 24 || wrapped.len() % 8 != 0 {
        return Err(JweError::Malformed("AES-KW wrapped key length".into()));
    }
    let mut out = Zeroizing::new(vec![0u8; wrapped.len() - 8]);
    let ok = match kek.len() {
        16 => aes_kw::KekAes128::new(kek.into())
            .unwrap(wrapped, &mut out)
            .is_ok(),
        24 => aes_kw::KekAes192::new(kek.into())
            .unwrap(wrapped, &mut out)
            .is_ok(),
        _ => aes_kw::KekAes256::new(kek.into())
            .unwrap(wrapped, &mut out)
            .is_ok(),
    };
    Ok(ok.then_some(out))
}

/// NIST SP 800-56A Concat KDF with SHA-256 as profiled by RFC 7518 §4.6.2.
fn concat_kdf(z: &[u8], alg: &[u8], apu: &[u8], apv: &[u8], out_len: usize) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(out_len + 32));
    let mut counter: u32 = 1;
    while out.len() < out_len {
        let mut h = Sha256::new();
        h.update(counter.to_be_bytes());
        h.update(z);
        for part in [alg, apu, apv] {
            h.update((part.len() as u32).to_be_bytes());
            h.update(part);
        }
        h.update(((out_len * 8) as u32).to_be_bytes());
        out.extend_from_slice(&h.finalize());
        counter += 1;
    }
    out.truncate(out_len);
    out
}

fn ecdh_shared(
    epk: &Map<String, Value>,
    key: &JwePrivateKey,
) -> Result<Option<Zeroizing<Vec<u8>>>, JweError> {
    let crv = epk.get("crv").and_then(Value::as_str).unwrap_or("");
    let coord = |n: &str| -> Result<Vec<u8>, JweError> {
        b64(
            n,
            epk.get(n)
                .and_then(Value::as_str)
                .ok_or_else(|| JweError::Malformed(format!("epk.{n} missing")))?,
        )
    };
    let mut point = vec![4u8];
    point.extend(coord("x")?);
    point.extend(coord("y")?);
    let bad_point = |_| JweError::Malformed("epk is not a valid curve point".into());
    let z: Vec<u8> = match (crv, key) {
        ("P-256", JwePrivateKey::P256(sk)) => {
            let pk = p256::PublicKey::from_sec1_bytes(&point).map_err(bad_point)?;
            p256::ecdh::diffie_hellman(sk.to_nonzero_scalar(), pk.as_affine())
                .raw_secret_bytes()
                .to_vec()
        }
        ("P-384", JwePrivateKey::P384(sk)) => {
            let pk = p384::PublicKey::from_sec1_bytes(&point).map_err(bad_point)?;
            p384::ecdh::diffie_hellman(sk.to_nonzero_scalar(), pk.as_affine())
                .raw_secret_bytes()
                .to_vec()
        }
        ("P-521", JwePrivateKey::P521(sk)) => {
            let pk = p521::PublicKey::from_sec1_bytes(&point).map_err(bad_point)?;
            p521::ecdh::diffie_hellman(sk.to_nonzero_scalar(), pk.as_affine())
                .raw_secret_bytes()
                .to_vec()
        }
        ("P-256" | "P-384" | "P-521", _) => return Ok(None),
        (other, _) => return Err(JweError::Unsupported(format!("epk curve {other:?}"))),
    };
    Ok(Some(Zeroizing::new(z)))
}

fn p256_from_xy(x: &str, y: &str) -> Result<p256::PublicKey, JweError> {
    let dec = |s: &str| {
        URL_SAFE_NO_PAD
            .decode(s)
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| JweError::Malformed("EC coordinate is not 32 base64url bytes".into()))
    };
    let (x, y) = (dec(x)?, dec(y)?);
    let point = EncodedPoint::<p256::NistP256>::from_affine_coordinates(
        x.as_slice().into(),
        y.as_slice().into(),
        false,
    );
    Option::from(p256::PublicKey::from_encoded_point(&point))
        .ok_or_else(|| JweError::Malformed("EC point is not on P-256".into()))
}

/// Encrypts `plaintext` to a TEE public key the way trustee's KBS does (used by the test KBS).
pub fn encrypt_to_tee_key(pubkey: &TeePubKey, plaintext: &[u8]) -> Result<Response, JweError> {
    let mut cek = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(cek.as_mut());
    let mut iv = [0u8; 12];
    OsRng.fill_bytes(&mut iv);

    let (alg, other_fields, encrypted_key) = match pubkey {
        TeePubKey::EC { crv, alg, x, y } => {
            if alg != ALG_ECDH_ES_A256KW {
                return Err(JweError::Unsupported(format!("EC key alg {alg}")));
            }
            if crv != "P-256" {
                return Err(JweError::Unsupported(format!("EC curve {crv}")));
            }
            let recipient = p256_from_xy(x, y)?;
            let eph = p256::ecdh::EphemeralSecret::random(&mut OsRng);
            let shared = eph.diffie_hellman(&recipient);
            let kek = concat_kdf(
                shared.raw_secret_bytes(),
                ALG_ECDH_ES_A256KW.as_bytes(),
                &[],
                &[],
                32,
            );
            let wrapped = aes_kw::KekAes256::new(kek.as_slice().into())
                .wrap_vec(cek.as_ref())
                .map_err(|e| JweError::Encrypt(format!("AES-KW: {e}")))?;
            let point = eph.public_key().to_encoded_point(false);
            let mut epk = Map::new();
            epk.insert("crv".into(), "P-256".into());
            epk.insert("kty".into(), "EC".into());
            epk.insert(
                "x".into(),
                URL_SAFE_NO_PAD.encode(point.x().expect("x")).into(),
            );
            epk.insert(
                "y".into(),
                URL_SAFE_NO_PAD.encode(point.y().expect("y")).into(),
            );
            let mut other = Map::new();
            other.insert("epk".into(), Value::Object(epk));
            (alg.clone(), other, wrapped)
        }
        TeePubKey::RSA { alg, k_mod, k_exp } => {
            let dec = |s: &str| {
                URL_SAFE_NO_PAD
                    .decode(s)
                    .map_err(|_| JweError::Malformed("RSA n/e not base64url".into()))
            };
            let pk = rsa::RsaPublicKey::new(
                rsa::BigUint::from_bytes_be(&dec(k_mod)?),
                rsa::BigUint::from_bytes_be(&dec(k_exp)?),
            )
            .map_err(|e| JweError::Malformed(format!("RSA key: {e}")))?;
            let wrapped = match alg.as_str() {
                ALG_RSA_OAEP_256 => {
                    pk.encrypt(&mut OsRng, rsa::Oaep::new::<Sha256>(), cek.as_ref())
                }
                ALG_RSA1_5 => pk.encrypt(&mut OsRng, rsa::Pkcs1v15Encrypt, cek.as_ref()),
                other => return Err(JweError::Unsupported(format!("RSA key alg {other}"))),
            }
            .map_err(|e| JweError::Encrypt(format!("RSA: {e}")))?;
            (alg.clone(), Map::new(), wrapped)
        }
        TeePubKey::AKP { alg, .. } => {
            return Err(JweError::Unsupported(format!("AKP key alg {alg}")))
        }
    };

    let protected = ProtectedHeader {
        alg,
        enc: ENC_A256GCM.into(),
        other_fields,
    };
    let aad = protected
        .generate_aad()
        .map_err(|_| JweError::Encrypt("cannot serialize header".into()))?;
    let cipher = Aes256Gcm::new_from_slice(cek.as_ref()).expect("32-byte key");
    let mut ct = cipher
        .encrypt(
            Nonce::from_slice(&iv),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| JweError::Encrypt("A256GCM".into()))?;
    let tag = ct.split_off(ct.len() - 16);
    Ok(Response {
        protected,
        encrypted_key,
        aad: None,
        iv: iv.to_vec(),
        ciphertext: ct,
        tag,
    })
}

/// Test-only encryptor so unit tests exercise the decryptor against known-good structure.
#[cfg(test)]
pub(crate) mod testenc {
    use super::*;

    pub fn encrypt_ecdh_p256(pk: &p256::PublicKey, plaintext: &[u8], alg: &str) -> Vec<u8> {
        let kek_len = match alg {
            "ECDH-ES+A128KW" => 16,
            "ECDH-ES+A192KW" => 24,
            _ => 32,
        };
        let eph = p256::ecdh::EphemeralSecret::random(&mut OsRng);
        let epk = p256::EncodedPoint::from(eph.public_key());
        let z = eph.diffie_hellman(pk);
        let kek = concat_kdf(z.raw_secret_bytes(), alg.as_bytes(), b"", b"", kek_len);
        let mut cek = [0u8; 32];
        OsRng.fill_bytes(&mut cek);
        let mut wrapped = vec![0u8; 40];
        match kek_len {
            16 => aes_kw::KekAes128::new(kek.as_slice().into())
                .wrap(&cek, &mut wrapped)
                .unwrap(),
            24 => aes_kw::KekAes192::new(kek.as_slice().into())
                .wrap(&cek, &mut wrapped)
                .unwrap(),
            _ => aes_kw::KekAes256::new(kek.as_slice().into())
                .wrap(&cek, &mut wrapped)
                .unwrap(),
        };
        let header = serde_json::json!({"alg": alg, "enc": "A256GCM", "epk": {
            "kty": "EC", "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(epk.x().unwrap()),
            "y": URL_SAFE_NO_PAD.encode(epk.y().unwrap())}});
        let protected = URL_SAFE_NO_PAD.encode(header.to_string());
        seal(&protected, &cek, plaintext, None, &wrapped)
    }

    pub fn encrypt_rsa(pk: &rsa::RsaPublicKey, plaintext: &[u8], sha256: bool) -> Vec<u8> {
        let mut cek = [0u8; 32];
        OsRng.fill_bytes(&mut cek);
        let (alg, wrapped) = if sha256 {
            (
                "RSA-OAEP-256",
                pk.encrypt(&mut OsRng, rsa::Oaep::new::<Sha256>(), &cek)
                    .unwrap(),
            )
        } else {
            (
                "RSA-OAEP",
                pk.encrypt(&mut OsRng, rsa::Oaep::new::<sha1::Sha1>(), &cek)
                    .unwrap(),
            )
        };
        // General serialization with the alg in the per-recipient header, as go-jose emits it.
        let protected = URL_SAFE_NO_PAD.encode(r#"{"enc":"A256GCM"}"#);
        seal(&protected, &cek, plaintext, Some(alg), &wrapped)
    }

    fn seal(
        protected: &str,
        cek: &[u8],
        pt: &[u8],
        recipient_alg: Option<&str>,
        wrapped: &[u8],
    ) -> Vec<u8> {
        let mut iv = [0u8; 12];
        OsRng.fill_bytes(&mut iv);
        let out = Aes256Gcm::new_from_slice(cek)
            .unwrap()
            .encrypt(
                aes_gcm::Nonce::from_slice(&iv),
                Payload {
                    msg: pt,
                    aad: protected.as_bytes(),
                },
            )
            .unwrap();
        let (ct, tag) = out.split_at(out.len() - 16);
        let ek = URL_SAFE_NO_PAD.encode(wrapped);
        let v = match recipient_alg {
            Some(alg) => serde_json::json!({"protected": protected,
                "recipients": [{"header": {"alg": alg}, "encrypted_key": ek}],
                "iv": URL_SAFE_NO_PAD.encode(iv), "ciphertext": URL_SAFE_NO_PAD.encode(ct),
                "tag": URL_SAFE_NO_PAD.encode(tag)}),
            None => serde_json::json!({"protected": protected, "encrypted_key": ek,
                "iv": URL_SAFE_NO_PAD.encode(iv), "ciphertext": URL_SAFE_NO_PAD.encode(ct),
                "tag": URL_SAFE_NO_PAD.encode(tag)}),
        };
        v.to_string().into_bytes()
    }
}

#[cfg(test)]
mod layer_key_tests {
    use super::testenc::*;
    use super::*;

    #[test]
    fn ecdh_es_all_kw_sizes_roundtrip() {
        let sk = p256::SecretKey::random(&mut OsRng);
        for alg in ["ECDH-ES+A128KW", "ECDH-ES+A192KW", "ECDH-ES+A256KW"] {
            let jwe = encrypt_ecdh_p256(&sk.public_key(), b"layer options", alg);
            let keys = [JwePrivateKey::P256(sk.clone())];
            assert_eq!(
                &decrypt_with_keys(&jwe, &keys).unwrap()[..],
                b"layer options"
            );
        }
    }

    #[test]
    fn rsa_oaep_sha1_and_sha256_roundtrip_and_wrong_key() {
        let sk = rsa::RsaPrivateKey::new(&mut OsRng, 2048).unwrap();
        let other = rsa::RsaPrivateKey::new(&mut OsRng, 2048).unwrap();
        for sha256 in [false, true] {
            let jwe = encrypt_rsa(&sk.to_public_key(), b"opts", sha256);
            let keys = [
                JwePrivateKey::Rsa(Box::new(other.clone())),
                JwePrivateKey::Rsa(Box::new(sk.clone())),
            ];
            assert_eq!(&decrypt_with_keys(&jwe, &keys).unwrap()[..], b"opts");
            let err = decrypt_with_keys(&jwe, &keys[..1]).unwrap_err();
            assert!(matches!(err, JweError::NoMatchingKey { .. }), "{err}");
        }
    }

    #[test]
    fn tampered_aad_is_rejected() {
        let sk = p256::SecretKey::random(&mut OsRng);
        let jwe = encrypt_ecdh_p256(&sk.public_key(), b"x", "ECDH-ES+A256KW");
        let mut v: Value = serde_json::from_slice(&jwe).unwrap();
        // Re-encode the same header with different bytes: must break the GCM tag.
        let p = v["protected"].as_str().unwrap().to_string();
        let hdr: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&p).unwrap()).unwrap();
        let re = URL_SAFE_NO_PAD.encode(serde_json::to_string_pretty(&hdr).unwrap());
        v["protected"] = Value::String(re);
        let keys = [JwePrivateKey::P256(sk)];
        assert!(decrypt_with_keys(v.to_string().as_bytes(), &keys).is_err());
    }

    #[test]
    fn concat_kdf_rfc7518_appendix_c() {
        // RFC 7518 Appendix C: ECDH-ES direct, A128GCM, apu "Alice", apv "Bob".
        let z: [u8; 32] = [
            158, 86, 217, 29, 129, 113, 53, 211, 114, 131, 66, 131, 191, 132, 38, 156, 251, 49,
            110, 163, 218, 128, 106, 72, 246, 218, 167, 121, 140, 254, 144, 196,
        ];
        let k = concat_kdf(&z, b"A128GCM", b"Alice", b"Bob", 16);
        assert_eq!(URL_SAFE_NO_PAD.encode(&k[..]), "VqqN6vgjbSBcIijNcacQGg");
        assert_eq!(k.len(), 16);
    }

    #[test]
    fn parses_pem_keys() {
        let sk = p256::SecretKey::random(&mut OsRng);
        let pem = sk.to_sec1_pem(Default::default()).unwrap();
        assert!(matches!(
            JwePrivateKey::from_bytes(pem.as_bytes()).unwrap(),
            JwePrivateKey::P256(_)
        ));
        assert!(JwePrivateKey::from_bytes(b"garbage").is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyAlgorithm;

    fn round_trip(alg: KeyAlgorithm) {
        let key = TeeKeyPair::generate(alg).unwrap();
        let resp = encrypt_to_tee_key(&key.public_jwk(), b"top secret").unwrap();
        let body = serde_json::to_vec(&resp).unwrap();
        assert_eq!(&*decrypt(&body, &key).unwrap(), b"top secret");
    }

    #[test]
    fn round_trip_ec() {
        round_trip(KeyAlgorithm::EcP256);
    }

    #[test]
    fn round_trip_rsa() {
        round_trip(KeyAlgorithm::Rsa);
    }

    const VECTOR_PLAINTEXT: &[u8] = b"fixed vector plaintext \x00\x01\x02 from pyca/cryptography";

    /// Fixed vectors produced by pyca/cryptography (testdata/gen_jwe_vectors.py): test-only keys.
    #[test]
    fn independent_vectors_decrypt() {
        for (pem, jwe) in [
            (
                include_str!("../testdata/ec_p256.pem"),
                include_str!("../testdata/ec_p256.jwe.json"),
            ),
            (
                include_str!("../testdata/rsa2048.pem"),
                include_str!("../testdata/rsa2048.jwe.json"),
            ),
        ] {
            let key = TeeKeyPair::from_pkcs8_pem(pem).unwrap();
            assert_eq!(&*decrypt(jwe.as_bytes(), &key).unwrap(), VECTOR_PLAINTEXT);
        }
    }

    #[test]
    fn aad_is_the_received_protected_string() {
        // A header whose key order differs from serde's: a re-serializing client would compute
        // another AAD and fail; we must succeed.
        let key = TeeKeyPair::generate(KeyAlgorithm::EcP256).unwrap();
        let jwk = key.public_jwk();
        let (x, y) = match &jwk {
            TeePubKey::EC { x, y, .. } => (x.clone(), y.clone()),
            _ => unreachable!(),
        };
        let recipient = p256_from_xy(&x, &y).unwrap();
        let eph = p256::ecdh::EphemeralSecret::random(&mut OsRng);
        let kek = concat_kdf(
            eph.diffie_hellman(&recipient).raw_secret_bytes(),
            ALG_ECDH_ES_A256KW.as_bytes(),
            &[],
            &[],
            32,
        );
        let cek = [7u8; 32];
        let wrapped = aes_kw::KekAes256::new(kek.as_slice().into())
            .wrap_vec(&cek)
            .unwrap();
        let point = eph.public_key().to_encoded_point(false);
        let header = format!(
            "{{\"enc\":\"A256GCM\",\"epk\":{{\"y\":\"{}\",\"x\":\"{}\",\"kty\":\"EC\",\"crv\":\"P-256\"}},\"alg\":\"ECDH-ES+A256KW\"}}",
            URL_SAFE_NO_PAD.encode(point.y().unwrap()),
            URL_SAFE_NO_PAD.encode(point.x().unwrap())
        );
        let protected2 = URL_SAFE_NO_PAD.encode(&header);
        let iv = [1u8; 12];
        let mut ct = Aes256Gcm::new_from_slice(&cek)
            .unwrap()
            .encrypt(
                Nonce::from_slice(&iv),
                Payload {
                    msg: b"reordered",
                    aad: protected2.as_bytes(),
                },
            )
            .unwrap();
        let tag = ct.split_off(ct.len() - 16);
        let body = serde_json::json!({
            "protected": protected2,
            "encrypted_key": URL_SAFE_NO_PAD.encode(&wrapped),
            "iv": URL_SAFE_NO_PAD.encode(iv),
            "ciphertext": URL_SAFE_NO_PAD.encode(&ct),
            "tag": URL_SAFE_NO_PAD.encode(&tag),
        });
        let out = decrypt(serde_json::to_string(&body).unwrap().as_bytes(), &key).unwrap();
        assert_eq!(&*out, b"reordered");
    }

    #[test]
    fn tampering_is_detected() {
        let key = TeeKeyPair::generate(KeyAlgorithm::EcP256).unwrap();
        let resp = encrypt_to_tee_key(&key.public_jwk(), b"top secret").unwrap();
        let mut v = serde_json::to_value(&resp).unwrap();
        let mut tag = URL_SAFE_NO_PAD.decode(v["tag"].as_str().unwrap()).unwrap();
        tag[0] ^= 1;
        v["tag"] = URL_SAFE_NO_PAD.encode(&tag).into();
        assert_eq!(
            decrypt(v.to_string().as_bytes(), &key).unwrap_err(),
            JweError::Authentication
        );

        let mut v = serde_json::to_value(&resp).unwrap();
        let mut ek = URL_SAFE_NO_PAD
            .decode(v["encrypted_key"].as_str().unwrap())
            .unwrap();
        ek[3] ^= 1;
        v["encrypted_key"] = URL_SAFE_NO_PAD.encode(&ek).into();
        assert!(matches!(
            decrypt(v.to_string().as_bytes(), &key),
            Err(JweError::KeyUnwrap(_))
        ));

        let other = TeeKeyPair::generate(KeyAlgorithm::EcP256).unwrap();
        let body = serde_json::to_vec(&resp).unwrap();
        assert!(decrypt(&body, &other).is_err());
        let rsa = TeeKeyPair::generate(KeyAlgorithm::Rsa).unwrap();
        assert!(matches!(
            decrypt(&body, &rsa),
            Err(JweError::Unsupported(_))
        ));
    }
}
