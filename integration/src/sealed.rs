//! Sealed secrets as CDH's `secret seal … vault` makes them, for the tests that hand one to the
//! guest-puller (directly, or in a container's environment through kata-agent).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};

/// The public JWK of `key`, as the KBS holds it under the sealed secret's `kid`.
pub fn public_jwk(key: &SigningKey) -> Vec<u8> {
    let p = key.verifying_key().to_encoded_point(false);
    serde_json::json!({"kty": "EC", "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(p.x().unwrap()),
        "y": URL_SAFE_NO_PAD.encode(p.y().unwrap())})
    .to_string()
    .into_bytes()
}

/// `sealed.<header>.<payload>.<ES256 r||s>` for the vault secret `name` (a `kbs:///` URI),
/// signed by `key` whose JWK the KBS serves at `kid`.
pub fn seal(key: &SigningKey, kid: &str, name: &str) -> String {
    let header = serde_json::json!({"alg": "ES256", "kid": kid});
    let payload = serde_json::json!({"version": "0.1.0", "type": "vault", "name": name,
        "provider": "kbs", "provider_settings": {}, "annotations": {}});
    let h = URL_SAFE_NO_PAD.encode(header.to_string());
    let p = URL_SAFE_NO_PAD.encode(payload.to_string());
    let sig: Signature = key.sign(format!("{h}.{p}").as_bytes());
    format!("sealed.{h}.{p}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}
