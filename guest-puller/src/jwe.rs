//! JWE (RFC 7516) JSON-serialization decryption for ocicrypt `enc.keys.jwe` layer keys.
//!
//! Self-contained on purpose: the kbs-client crate has a sibling for KBS responses and the two
//! are meant to merge. Supported: general and flattened JSON serialization; key management
//! `RSA-OAEP` (SHA-1, what ocicrypt/go-jose emit for RSA keys), `RSA-OAEP-256`,
//! `ECDH-ES+A128KW`/`+A192KW`/`+A256KW` on P-256/P-384/P-521; content encryption
//! `A128GCM`/`A192GCM`/`A256GCM` (go-jose's ocicrypt default is A256GCM; CBC-HS is not produced
//! by ocicrypt and is rejected with a clear error).

use aes_gcm::aead::generic_array::typenum::U12;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes128Gcm, Aes256Gcm, AesGcm};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::DecodePrivateKey;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

type Aes192Gcm = AesGcm<aes::Aes192, U12>;

/// Why a JWE could not be decrypted. Never contains key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum JweError {
    /// The JWE JSON is malformed.
    #[error("malformed JWE: {0}")]
    Malformed(String),
    /// An algorithm named in the header is not supported.
    #[error("unsupported JWE algorithm {0:?}")]
    Unsupported(String),
    /// A private key could not be parsed.
    #[error("invalid private key: {0}")]
    BadKey(String),
    /// None of the supplied keys unwrapped any recipient.
    #[error(
        "no private key matches any of the {recipients} JWE recipient(s) (algorithms: {algs})"
    )]
    NoMatchingKey { recipients: usize, algs: String },
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

/// Decrypts a JWE in JSON serialization (general or flattened) with the first key that fits.
pub fn decrypt(jwe: &[u8], keys: &[JwePrivateKey]) -> Result<Zeroizing<Vec<u8>>, JweError> {
    let j: JweJson = serde_json::from_slice(jwe).map_err(|e| JweError::Malformed(e.to_string()))?;
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
    let recipients: Vec<Recipient> = match j.recipients {
        Some(r) => r,
        None => vec![Recipient {
            header: j.header.clone(),
            encrypted_key: j.encrypted_key.clone(),
        }],
    };
    if recipients.is_empty() {
        return Err(JweError::Malformed("no recipients".into()));
    }
    let iv = b64("iv", &j.iv)?;
    let ciphertext = b64("ciphertext", &j.ciphertext)?;
    let tag = b64("tag", &j.tag)?;
    // RFC 7516 §5.1 step 14: AAD is the received protected string, verbatim.
    let mut aad = j.protected.clone().unwrap_or_default().into_bytes();
    if let Some(extra) = &j.aad {
        aad.push(b'.');
        aad.extend_from_slice(extra.as_bytes());
    }
    let mut algs = Vec::new();
    for r in &recipients {
        let mut header = shared.clone();
        if let Some(h) = &r.header {
            header.extend(h.clone());
        }
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let enc = header
            .get("enc")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        algs.push(alg.clone());
        let ek = match &r.encrypted_key {
            Some(e) => b64("encrypted_key", e)?,
            None => Vec::new(),
        };
        for key in keys {
            let Some(cek) = unwrap_cek(&alg, &enc, &header, &ek, key)? else {
                continue;
            };
            // The CEK unwrapped (OAEP padding or AES-KW integrity check passed), so a content
            // failure now means a corrupted JWE, not a wrong key; still try remaining keys.
            if let Ok(pt) = content_decrypt(&enc, &cek, &iv, &ciphertext, &tag, &aad) {
                return Ok(pt);
            }
        }
    }
    Err(JweError::NoMatchingKey {
        recipients: recipients.len(),
        algs: algs.join(","),
    })
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
    let bad = |_| JweError::Malformed("content decryption failed".into());
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

/// Returns `Ok(None)` when `key` does not fit this recipient (wrong type or wrong key).
fn unwrap_cek(
    alg: &str,
    enc: &str,
    header: &Map<String, Value>,
    ek: &[u8],
    key: &JwePrivateKey,
) -> Result<Option<Zeroizing<Vec<u8>>>, JweError> {
    match alg {
        "RSA-OAEP" | "RSA-OAEP-256" => {
            let JwePrivateKey::Rsa(k) = key else {
                return Ok(None);
            };
            let padding = if alg == "RSA-OAEP" {
                rsa::Oaep::new::<sha1::Sha1>()
            } else {
                rsa::Oaep::new::<Sha256>()
            };
            Ok(k.decrypt(padding, ek).ok().map(Zeroizing::new))
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
                return Ok(None);
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
            let cek = aes_kw_unwrap(&kek, ek)?;
            if cek
                .as_ref()
                .is_some_and(|c| c.len() != cek_len(enc).unwrap_or(0))
            {
                return Err(JweError::Malformed(
                    "unwrapped CEK has the wrong length".into(),
                ));
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
pub fn concat_kdf(
    z: &[u8],
    alg: &[u8],
    apu: &[u8],
    apv: &[u8],
    out_len: usize,
) -> Zeroizing<Vec<u8>> {
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

/// Test-only encryptor so unit tests exercise the decryptor against known-good structure.
#[cfg(test)]
pub(crate) mod testenc {
    use super::*;
    use aes_gcm::aead::OsRng;
    use rand_core::RngCore;

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
mod tests {
    use super::testenc::*;
    use super::*;
    use aes_gcm::aead::OsRng;

    #[test]
    fn ecdh_es_all_kw_sizes_roundtrip() {
        let sk = p256::SecretKey::random(&mut OsRng);
        for alg in ["ECDH-ES+A128KW", "ECDH-ES+A192KW", "ECDH-ES+A256KW"] {
            let jwe = encrypt_ecdh_p256(&sk.public_key(), b"layer options", alg);
            let keys = [JwePrivateKey::P256(sk.clone())];
            assert_eq!(&decrypt(&jwe, &keys).unwrap()[..], b"layer options");
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
            assert_eq!(&decrypt(&jwe, &keys).unwrap()[..], b"opts");
            let err = decrypt(&jwe, &keys[..1]).unwrap_err();
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
        assert!(decrypt(v.to_string().as_bytes(), &keys).is_err());
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
