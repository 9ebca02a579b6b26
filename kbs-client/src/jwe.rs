//! Flattened-JSON JWE as the KBS sends resources (A256GCM content, ECDH-ES+A256KW or RSA-OAEP-256 keys).
//!
//! Hand-written on RustCrypto primitives: the JOSE crates either pull a second crypto stack
//! (openssl/aws-lc) or re-serialize the protected header, and the reference's AAD bug comes
//! exactly from that re-serialization. Here the AAD is the received `protected` string verbatim.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use kbs_types::{ProtectedHeader, Response, TeePubKey};
use p256::elliptic_curve::sec1::{EncodedPoint, FromEncodedPoint, ToEncodedPoint};
use rand_core::{OsRng, RngCore};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::keys::{KeyInner, TeeKeyPair, ALG_ECDH_ES_A256KW, ALG_RSA1_5, ALG_RSA_OAEP_256};

/// The only content encryption the KBS uses.
pub const ENC_A256GCM: &str = "A256GCM";

/// Why a JWE could not be produced or opened. Messages never contain key material or plaintext.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JweError {
    /// The JSON is not a flattened JWE.
    #[error("malformed JWE: {0}")]
    Malformed(String),
    /// The header names an algorithm we do not implement, or one that does not fit our key.
    #[error("unsupported JWE: {0}")]
    Unsupported(String),
    /// The CEK could not be unwrapped (wrong key or tampered `encrypted_key`).
    #[error("key unwrap failed for alg {0}")]
    KeyUnwrap(String),
    /// AES-GCM authentication failed: ciphertext, tag, IV or header were modified.
    #[error("A256GCM authentication failed (tampered or wrong key)")]
    Authentication,
    /// Encryption failed.
    #[error("JWE encryption failed: {0}")]
    Encrypt(String),
}

/// Concat KDF (NIST SP 800-56A, RFC 7518 §4.6.2), single SHA-256 round, `bits` <= 256.
fn concat_kdf(z: &[u8], alg: &str, apu: &[u8], apv: &[u8], bits: u32) -> Zeroizing<[u8; 32]> {
    debug_assert!(bits <= 256 && bits % 8 == 0);
    let mut h = Sha256::new();
    h.update(1u32.to_be_bytes());
    h.update(z);
    for part in [alg.as_bytes(), apu, apv] {
        h.update((part.len() as u32).to_be_bytes());
        h.update(part);
    }
    h.update(bits.to_be_bytes());
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&h.finalize());
    out
}

fn b64_field(header: &Map<String, Value>, name: &str) -> Result<Vec<u8>, JweError> {
    match header.get(name) {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| JweError::Malformed(format!("header {name} is not base64url"))),
        Some(_) => Err(JweError::Malformed(format!(
            "header {name} is not a string"
        ))),
    }
}

fn ec_point_from_jwk(v: &Value) -> Result<p256::PublicKey, JweError> {
    let get = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| JweError::Malformed(format!("epk.{k} missing")))
    };
    if get("kty")? != "EC" {
        return Err(JweError::Unsupported("epk kty must be EC".into()));
    }
    if get("crv")? != "P-256" {
        return Err(JweError::Unsupported(format!(
            "epk curve {} (only P-256 TEE keys are generated)",
            get("crv")?
        )));
    }
    p256_from_xy(get("x")?, get("y")?)
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

/// Decrypts a KBS resource response body with the TEE key.
///
/// The AAD is the received `protected` member verbatim (plus `.` and the `aad` member when present).
pub fn decrypt(body: &[u8], key: &TeeKeyPair) -> Result<Zeroizing<Vec<u8>>, JweError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| JweError::Malformed(format!("response is not JSON: {e}")))?;
    let protected_raw = value
        .get("protected")
        .and_then(Value::as_str)
        .ok_or_else(|| JweError::Malformed("missing `protected`".into()))?
        .to_string();
    let resp: Response = serde_json::from_value(value)
        .map_err(|e| JweError::Malformed(format!("not a KBS JWE response: {e}")))?;
    let header = &resp.protected;
    if header.enc != ENC_A256GCM {
        return Err(JweError::Unsupported(format!("enc {}", header.enc)));
    }
    if resp.iv.len() != 12 {
        return Err(JweError::Malformed(format!(
            "IV is {} bytes, expected 12",
            resp.iv.len()
        )));
    }
    if resp.tag.len() != 16 {
        return Err(JweError::Malformed(format!(
            "tag is {} bytes, expected 16",
            resp.tag.len()
        )));
    }
    let cek = unwrap_cek(header, &resp.encrypted_key, key)?;
    if cek.len() != 32 {
        return Err(JweError::KeyUnwrap(header.alg.clone()));
    }
    let mut aad = protected_raw.into_bytes();
    if let Some(extra) = &resp.aad {
        // kbs-types hands the `aad` member back as its raw (still base64url) characters, which is
        // exactly what RFC 7516 §5.2 step 14 concatenates.
        aad.push(b'.');
        aad.extend_from_slice(extra);
    }
    let mut ct_tag = Vec::with_capacity(resp.ciphertext.len() + 16);
    ct_tag.extend_from_slice(&resp.ciphertext);
    ct_tag.extend_from_slice(&resp.tag);
    let cipher =
        Aes256Gcm::new_from_slice(&cek).map_err(|_| JweError::KeyUnwrap(header.alg.clone()))?;
    cipher
        .decrypt(
            Nonce::from_slice(&resp.iv),
            Payload {
                msg: &ct_tag,
                aad: &aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| JweError::Authentication)
}

fn unwrap_cek(
    header: &ProtectedHeader,
    encrypted_key: &[u8],
    key: &TeeKeyPair,
) -> Result<Zeroizing<Vec<u8>>, JweError> {
    match (header.alg.as_str(), &key.inner) {
        (ALG_ECDH_ES_A256KW, KeyInner::Ec(sk)) => {
            let epk = header
                .other_fields
                .get("epk")
                .ok_or_else(|| JweError::Malformed("ECDH-ES header without epk".into()))?;
            let epk = ec_point_from_jwk(epk)?;
            let shared = p256::ecdh::diffie_hellman(sk.to_nonzero_scalar(), epk.as_affine());
            let apu = b64_field(&header.other_fields, "apu")?;
            let apv = b64_field(&header.other_fields, "apv")?;
            let kek = concat_kdf(
                shared.raw_secret_bytes(),
                ALG_ECDH_ES_A256KW,
                &apu,
                &apv,
                256,
            );
            let kw = aes_kw::KekAes256::from(*kek);
            kw.unwrap_vec(encrypted_key)
                .map(Zeroizing::new)
                .map_err(|_| JweError::KeyUnwrap(header.alg.clone()))
        }
        (ALG_RSA_OAEP_256, KeyInner::Rsa(sk)) => sk
            .decrypt(rsa::Oaep::new::<Sha256>(), encrypted_key)
            .map(Zeroizing::new)
            .map_err(|_| JweError::KeyUnwrap(header.alg.clone())),
        (ALG_RSA1_5, KeyInner::Rsa(sk)) => sk
            .decrypt(rsa::Pkcs1v15Encrypt, encrypted_key)
            .map(Zeroizing::new)
            .map_err(|_| JweError::KeyUnwrap(header.alg.clone())),
        (alg, KeyInner::Ec(_)) => Err(JweError::Unsupported(format!(
            "alg {alg} does not fit our EC P-256 TEE key"
        ))),
        (alg, KeyInner::Rsa(_)) => Err(JweError::Unsupported(format!(
            "alg {alg} does not fit our RSA TEE key"
        ))),
    }
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
            let kek = concat_kdf(shared.raw_secret_bytes(), ALG_ECDH_ES_A256KW, &[], &[], 256);
            let wrapped = aes_kw::KekAes256::from(*kek)
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
    fn concat_kdf_matches_rfc7518_appendix_c() {
        // RFC 7518 Appendix C (ECDH-ES, A128GCM, apu "Alice", apv "Bob"): Z and derived key.
        let z = [
            158, 86, 217, 29, 129, 113, 53, 211, 114, 131, 66, 131, 191, 132, 38, 156, 251, 49,
            110, 163, 218, 128, 106, 72, 246, 218, 167, 121, 140, 254, 144, 196,
        ];
        let k = concat_kdf(&z, "A128GCM", b"Alice", b"Bob", 128);
        assert_eq!(URL_SAFE_NO_PAD.encode(&k[..16]), "VqqN6vgjbSBcIijNcacQGg");
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
            ALG_ECDH_ES_A256KW,
            &[],
            &[],
            256,
        );
        let cek = [7u8; 32];
        let wrapped = aes_kw::KekAes256::from(*kek).wrap_vec(&cek).unwrap();
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
