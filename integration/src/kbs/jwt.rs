//! ES256 JWTs with a header `jwk`, the shape of the CoCo AS's EAR tokens.
//!
//! Compact JWS is three base64url parts and one ECDSA call; a JOSE crate would add a second
//! crypto stack for that.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use serde_json::{json, Value};

/// The token signer (an ephemeral key, like the AS without a configured signer).
pub struct TokenSigner {
    key: SigningKey,
}

impl TokenSigner {
    /// A fresh signer.
    pub fn generate() -> Self {
        Self {
            key: SigningKey::random(&mut rand_core::OsRng),
        }
    }

    fn jwk(&self) -> Value {
        let p = VerifyingKey::from(&self.key).to_encoded_point(false);
        json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(p.x().expect("x")),
            "y": URL_SAFE_NO_PAD.encode(p.y().expect("y")),
        })
    }

    /// Signs `claims` into a compact JWT.
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "ES256", "typ": "JWT", "jwk": self.jwk()});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig: Signature = self.key.sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }

    /// Verifies a token this signer issued and returns its claims (signature and `exp` checked).
    pub fn verify(&self, token: &str, now: u64) -> Result<Value, String> {
        let (input, sig) = token.rsplit_once('.').ok_or("not a JWS")?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .ok()
            .and_then(|b| Signature::from_slice(&b).ok())
            .ok_or("bad signature encoding")?;
        VerifyingKey::from(&self.key)
            .verify(input.as_bytes(), &sig)
            .map_err(|_| "signature does not verify")?;
        let claims = input.split('.').nth(1).ok_or("no claims")?;
        let claims: Value = URL_SAFE_NO_PAD
            .decode(claims)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("claims are not JSON")?;
        match claims.get("exp").and_then(Value::as_u64) {
            Some(exp) if exp > now => Ok(claims),
            Some(_) => Err("token expired".into()),
            None => Err("token has no exp".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify() {
        let s = TokenSigner::generate();
        let t = s.sign(&json!({"exp": 100}));
        assert_eq!(s.verify(&t, 99).unwrap()["exp"], 100);
        assert!(s.verify(&t, 100).is_err());
        let other = TokenSigner::generate();
        assert!(other.verify(&t, 0).is_err());
        let tok = kbs_client::Token::parse(&t).unwrap();
        assert_eq!(tok.exp(), Some(100));
    }
}
