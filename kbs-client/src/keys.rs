//! The TEE key pair whose public half goes into the evidence and to which the KBS encrypts.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use kbs_types::TeePubKey;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rand_core::OsRng;
use rsa::traits::PublicKeyParts;
use zeroize::Zeroizing;

use crate::error::Error;

/// JWE `alg` for EC TEE keys.
pub const ALG_ECDH_ES_A256KW: &str = "ECDH-ES+A256KW";
/// JWE `alg` for RSA TEE keys.
pub const ALG_RSA_OAEP_256: &str = "RSA-OAEP-256";
/// Deprecated JWE `alg` accepted on decrypt for RSA keys, never advertised.
pub const ALG_RSA1_5: &str = "RSA1_5";

/// RSA modulus size for generated TEE keys (the reference uses 2048).
const RSA_BITS: usize = 2048;

/// Which TEE key pair to generate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// EC P-256 with `ECDH-ES+A256KW` (the reference default).
    #[default]
    EcP256,
    /// RSA-2048 with `RSA-OAEP-256`.
    Rsa,
}

impl FromStr for KeyAlgorithm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "ec" | "p256" | "ec-p256" | "ecdh-es+a256kw" | "ecdh-es+a256kw-p256" => {
                Ok(KeyAlgorithm::EcP256)
            }
            "rsa" | "rsa-oaep-256" => Ok(KeyAlgorithm::Rsa),
            _ => Err(Error::Config(format!(
                "unknown TEE key algorithm {s:?} (expected ECDH-ES+A256KW-P256 or RSA-OAEP-256)"
            ))),
        }
    }
}

pub(crate) enum KeyInner {
    Ec(p256::SecretKey),
    Rsa(Box<rsa::RsaPrivateKey>),
}

/// A TEE key pair held only in memory; both key types zeroize themselves on drop.
pub struct TeeKeyPair {
    pub(crate) inner: KeyInner,
}

impl fmt::Debug for TeeKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.inner {
            KeyInner::Ec(_) => "EC P-256",
            KeyInner::Rsa(_) => "RSA",
        };
        write!(f, "TeeKeyPair({kind}, private key redacted)")
    }
}

impl TeeKeyPair {
    /// Generates a fresh key pair from the OS RNG.
    pub fn generate(alg: KeyAlgorithm) -> Result<Self, Error> {
        let inner = match alg {
            KeyAlgorithm::EcP256 => KeyInner::Ec(p256::SecretKey::random(&mut OsRng)),
            KeyAlgorithm::Rsa => KeyInner::Rsa(Box::new(
                rsa::RsaPrivateKey::new(&mut OsRng, RSA_BITS)
                    .map_err(|e| Error::Key(format!("RSA key generation failed: {e}")))?,
            )),
        };
        Ok(Self { inner })
    }

    /// Imports a PKCS#8 PEM private key (EC P-256 or RSA), e.g. one handed over with a passport token.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, Error> {
        if let Ok(k) = p256::SecretKey::from_pkcs8_pem(pem) {
            return Ok(Self {
                inner: KeyInner::Ec(k),
            });
        }
        rsa::RsaPrivateKey::from_pkcs8_pem(pem)
            .map(|k| Self {
                inner: KeyInner::Rsa(Box::new(k)),
            })
            .map_err(|_| {
                Error::Key("TEE key is not a PKCS#8 PEM EC P-256 or RSA private key".into())
            })
    }

    /// Exports the private key as PKCS#8 PEM (zeroized on drop) for a passport hand-over.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, Error> {
        let pem = match &self.inner {
            KeyInner::Ec(k) => k.to_pkcs8_pem(LineEnding::LF),
            KeyInner::Rsa(k) => k.to_pkcs8_pem(LineEnding::LF),
        }
        .map_err(|e| Error::Key(format!("cannot encode TEE key: {e}")))?;
        Ok(Zeroizing::new(pem.to_string()))
    }

    /// The private key as the attestation-agent hands it over with a token (`GetToken`'s
    /// `tee_keypair`): PKCS#1 for RSA, PKCS#8 for EC, the forms the reference reads back.
    pub fn to_token_pem(&self) -> Result<Zeroizing<String>, Error> {
        match &self.inner {
            KeyInner::Ec(_) => self.to_pkcs8_pem(),
            KeyInner::Rsa(k) => {
                use rsa::pkcs1::EncodeRsaPrivateKey;
                k.to_pkcs1_pem(LineEnding::LF)
                    .map_err(|e| Error::Key(format!("cannot encode TEE key: {e}")))
            }
        }
    }

    /// The algorithm of this key.
    pub fn algorithm(&self) -> KeyAlgorithm {
        match self.inner {
            KeyInner::Ec(_) => KeyAlgorithm::EcP256,
            KeyInner::Rsa(_) => KeyAlgorithm::Rsa,
        }
    }

    /// The public key as the `tee-pubkey` JWK of the protocol.
    pub fn public_jwk(&self) -> TeePubKey {
        match &self.inner {
            KeyInner::Ec(k) => {
                let point = k.public_key().to_encoded_point(false);
                TeePubKey::EC {
                    crv: "P-256".into(),
                    alg: ALG_ECDH_ES_A256KW.into(),
                    x: URL_SAFE_NO_PAD.encode(point.x().expect("uncompressed point has x")),
                    y: URL_SAFE_NO_PAD.encode(point.y().expect("uncompressed point has y")),
                }
            }
            KeyInner::Rsa(k) => TeePubKey::RSA {
                alg: ALG_RSA_OAEP_256.into(),
                k_mod: URL_SAFE_NO_PAD.encode(k.n().to_bytes_be()),
                k_exp: URL_SAFE_NO_PAD.encode(k.e().to_bytes_be()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_jwk_has_fixed_width_coordinates() {
        let k = TeeKeyPair::generate(KeyAlgorithm::EcP256).unwrap();
        match k.public_jwk() {
            TeePubKey::EC { crv, alg, x, y } => {
                assert_eq!(crv, "P-256");
                assert_eq!(alg, "ECDH-ES+A256KW");
                assert_eq!(URL_SAFE_NO_PAD.decode(x).unwrap().len(), 32);
                assert_eq!(URL_SAFE_NO_PAD.decode(y).unwrap().len(), 32);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(!format!("{k:?}").contains("SecretKey"));
    }

    #[test]
    fn pem_round_trip_keeps_public_key() {
        let k = TeeKeyPair::generate(KeyAlgorithm::EcP256).unwrap();
        let pem = k.to_pkcs8_pem().unwrap();
        let back = TeeKeyPair::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(
            serde_json::to_string(&k.public_jwk()).unwrap(),
            serde_json::to_string(&back.public_jwk()).unwrap()
        );
        assert!(TeeKeyPair::from_pkcs8_pem("not a key").is_err());
    }

    #[test]
    fn token_pem_is_pkcs1_for_rsa_and_pkcs8_for_ec() {
        let ec = TeeKeyPair::generate(KeyAlgorithm::EcP256).unwrap();
        assert!(ec
            .to_token_pem()
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----"));
        let rsa = TeeKeyPair::generate(KeyAlgorithm::Rsa).unwrap();
        let pem = rsa.to_token_pem().unwrap();
        assert!(
            pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
            "{}",
            &pem[..40]
        );
    }

    #[test]
    fn parses_algorithm_names() {
        assert_eq!(
            "RSA-OAEP-256".parse::<KeyAlgorithm>().unwrap(),
            KeyAlgorithm::Rsa
        );
        assert_eq!(
            "ECDH-ES+A256KW-P256".parse::<KeyAlgorithm>().unwrap(),
            KeyAlgorithm::EcP256
        );
        assert!("RSA1_5".parse::<KeyAlgorithm>().is_err());
    }
}
