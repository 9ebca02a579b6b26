//! Cosign key-based signature verification.
//!
//! Hand-written on RustCrypto instead of the `sigstore` crate: key-based cosign verification is
//! just "signature over the raw payload bytes with SHA-256" (what sigstore's
//! `LoadVerifier(key, SHA256)` does), while `sigstore` pulls in TUF, Fulcio/Rekor clients and a
//! second HTTP/TLS stack that the guest would never use. Supported keys are the ones
//! sigstore's `LoadVerifier` accepts: ECDSA P-256/P-384 (ASN.1 DER signatures over a SHA-256
//! prehash), RSA (PKCS#1 v1.5 with SHA-256) and Ed25519 (pure).

use base64::Engine as _;
use ecdsa::signature::hazmat::PrehashVerifier;
use ecdsa::signature::Verifier as _;
use sha2::{Digest as _, Sha256};

/// A trusted cosign public key.
pub(crate) enum CosignKey {
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    Rsa(rsa::pkcs1v15::VerifyingKey<Sha256>),
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl CosignKey {
    /// Parses a PEM `PUBLIC KEY` (SubjectPublicKeyInfo), or a PKCS#1 `RSA PUBLIC KEY`.
    pub fn from_pem(pem: &[u8]) -> Result<Self, String> {
        use p256::pkcs8::DecodePublicKey as _;
        let text = std::str::from_utf8(pem).map_err(|_| "public key is not PEM text".to_owned())?;
        let text = text.trim();
        if !text.starts_with("-----BEGIN") {
            return Err("public key is not PEM (expected -----BEGIN PUBLIC KEY-----)".into());
        }
        if let Ok(k) = p256::ecdsa::VerifyingKey::from_public_key_pem(text) {
            return Ok(CosignKey::P256(k));
        }
        if let Ok(k) = p384::ecdsa::VerifyingKey::from_public_key_pem(text) {
            return Ok(CosignKey::P384(k));
        }
        if let Ok(k) = rsa::RsaPublicKey::from_public_key_pem(text) {
            return Ok(CosignKey::Rsa(rsa::pkcs1v15::VerifyingKey::new(k)));
        }
        if let Ok(k) = <rsa::RsaPublicKey as rsa::pkcs1::DecodeRsaPublicKey>::from_pkcs1_pem(text) {
            return Ok(CosignKey::Rsa(rsa::pkcs1v15::VerifyingKey::new(k)));
        }
        if let Ok(k) = ed25519_dalek::VerifyingKey::from_public_key_pem(text) {
            return Ok(CosignKey::Ed25519(k));
        }
        Err("unsupported or malformed public key (expected an ECDSA P-256/P-384, RSA or Ed25519 PEM public key)".into())
    }

    /// Key algorithm, for messages.
    pub fn algorithm(&self) -> &'static str {
        match self {
            CosignKey::P256(_) => "ECDSA P-256",
            CosignKey::P384(_) => "ECDSA P-384",
            CosignKey::Rsa(_) => "RSA",
            CosignKey::Ed25519(_) => "Ed25519",
        }
    }

    /// Checks `signature_b64` (the `dev.cosignproject.cosign/signature` annotation) over `payload`.
    pub fn verify(&self, payload: &[u8], signature_b64: &str) -> Result<(), String> {
        let compact: String = signature_b64
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        let sig = base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(|e| format!("signature annotation is not valid base64: {e}"))?;
        let bad =
            |e: &dyn std::fmt::Display| format!("cryptographic signature verification failed: {e}");
        match self {
            CosignKey::P256(k) => {
                let s = p256::ecdsa::Signature::from_der(&sig).map_err(|e| bad(&e))?;
                k.verify_prehash(&Sha256::digest(payload), &s)
                    .map_err(|e| bad(&e))
            }
            CosignKey::P384(k) => {
                let s = p384::ecdsa::Signature::from_der(&sig).map_err(|e| bad(&e))?;
                k.verify_prehash(&Sha256::digest(payload), &s)
                    .map_err(|e| bad(&e))
            }
            CosignKey::Rsa(k) => {
                let s = rsa::pkcs1v15::Signature::try_from(sig.as_slice()).map_err(|e| bad(&e))?;
                k.verify(payload, &s).map_err(|e| bad(&e))
            }
            CosignKey::Ed25519(k) => {
                let s = ed25519_dalek::Signature::from_slice(&sig).map_err(|e| bad(&e))?;
                k.verify_strict(payload, &s).map_err(|e| bad(&e))
            }
        }
    }
}
