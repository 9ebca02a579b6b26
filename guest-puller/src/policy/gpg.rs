//! GPG "simple signing" verification with rpgp (pure Rust: no gpgme/gpg binary in the guest).
//!
//! A simple signature is an OpenPGP signed message (usually compressed, one-pass signed) whose
//! literal data is the JSON payload. Like gpgme's verification against an ephemeral keyring,
//! only keys from the policy's keyring are trusted; signatures by a trusted primary key or by
//! one of its valid signing subkeys are accepted, and the primary fingerprint is the signer.

use std::io::Read as _;

use pgp::composed::{Deserializable, Message, SignedPublicKey};
use pgp::packet::SignatureType;
use pgp::types::{KeyDetails, PublicKeyTrait};

/// Upper bound for the signed payload (a few hundred bytes in practice); bounds decompression.
const MAX_PAYLOAD: u64 = 4 << 20;

/// Trusted public keys loaded from one or more keyrings.
pub(crate) struct Keyring {
    keys: Vec<SignedPublicKey>,
}

/// A signature whose cryptography checked out.
pub(crate) struct Verified {
    /// Upper-case hex fingerprint of the trusted primary key.
    pub signer: String,
    pub payload: Vec<u8>,
}

impl Keyring {
    /// Parses armored or binary keyrings (one or more public keys each). Keys whose
    /// self-signatures do not verify are skipped, as gpg would refuse to import them.
    pub fn load(sources: &[(String, &[u8])]) -> Result<Self, String> {
        let mut keys = Vec::new();
        for (what, data) in sources {
            let (iter, _) = SignedPublicKey::from_reader_many(*data)
                .map_err(|e| format!("{what}: not an OpenPGP public keyring: {e}"))?;
            let mut found = 0;
            for k in iter {
                let k = k.map_err(|e| format!("{what}: not an OpenPGP public keyring: {e}"))?;
                found += 1;
                match k.verify() {
                    Ok(()) => keys.push(k),
                    Err(e) => tracing::warn!(key = %hex::encode_upper(k.fingerprint().as_bytes()),
                        source = %what, "ignoring public key with invalid self-signature: {e}"),
                }
            }
            if found == 0 {
                return Err(format!("{what}: contains no public keys"));
            }
        }
        if keys.is_empty() {
            return Err("no usable public keys in the keyring".into());
        }
        Ok(Keyring { keys })
    }

    /// Verifies one signature; the error explains why it is not acceptable.
    pub fn verify(&self, signature: &[u8]) -> Result<Verified, String> {
        let (msg, _) =
            Message::from_reader(signature).map_err(|e| format!("not an OpenPGP message: {e}"))?;
        let mut msg = msg
            .decompress()
            .map_err(|e| format!("cannot decompress the OpenPGP message: {e}"))?;
        if !msg.is_signed() {
            return Err("the OpenPGP message is not signed".into());
        }
        let mut payload = Vec::new();
        (&mut msg)
            .take(MAX_PAYLOAD + 1)
            .read_to_end(&mut payload)
            .map_err(|e| format!("malformed OpenPGP message: {e}"))?;
        if payload.len() as u64 > MAX_PAYLOAD {
            return Err(format!("signed payload larger than {MAX_PAYLOAD} bytes"));
        }
        let now = unix_now();
        let mut problems = Vec::new();
        for key in &self.keys {
            let fpr = hex::encode_upper(key.fingerprint().as_bytes());
            let primary_usable = key_usable(key, now);
            let mut candidates: Vec<(&dyn PublicKeyTrait, Result<(), String>)> =
                vec![(&key.primary_key, primary_usable.clone())];
            for sub in &key.public_subkeys {
                let state = primary_usable
                    .clone()
                    .and_then(|()| subkey_usable(sub, now));
                candidates.push((&sub.key, state));
            }
            for (k, state) in candidates {
                if msg.verify(k).is_ok() {
                    return match state {
                        Ok(()) => Ok(Verified {
                            signer: fpr,
                            payload,
                        }),
                        Err(why) => Err(format!("signed by key {fpr}, but {why}")),
                    };
                }
            }
            problems.push(fpr);
        }
        Err(match issuers(&msg) {
            Some(ids) => format!(
                "signed by key {ids}, which is not one of the trusted keys {}",
                problems.join(", ")
            ),
            None => format!(
                "the signature does not verify with any trusted key ({})",
                problems.join(", ")
            ),
        })
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn key_usable(key: &SignedPublicKey, now: i64) -> Result<(), String> {
    if !key.details.revocation_signatures.is_empty() {
        return Err("the key is revoked".into());
    }
    if let Some(exp) = key.expires_at() {
        if exp.timestamp() <= now {
            return Err(format!("the key expired at {exp}"));
        }
    }
    Ok(())
}

fn subkey_usable(sub: &pgp::composed::SignedPublicSubKey, now: i64) -> Result<(), String> {
    if sub
        .signatures
        .iter()
        .any(|s| s.typ() == Some(SignatureType::SubkeyRevocation))
    {
        return Err("the signing subkey is revoked".into());
    }
    let binding = sub
        .signatures
        .iter()
        .filter(|s| s.typ() == Some(SignatureType::SubkeyBinding))
        .last();
    let Some(binding) = binding else {
        return Err("the subkey has no binding signature".into());
    };
    if !binding.key_flags().sign() {
        return Err("the subkey is not a signing subkey".into());
    }
    if let Some(d) = binding.key_expiration_time() {
        let exp = sub.key.created_at().timestamp() + d.num_seconds();
        if d.num_seconds() > 0 && exp <= now {
            return Err("the signing subkey is expired".into());
        }
    }
    Ok(())
}

/// Issuer key IDs/fingerprints claimed by the (unverified) signature packet.
fn issuers(msg: &Message<'_>) -> Option<String> {
    let sig = match msg {
        Message::SignedOnePass { reader, .. } => reader.signature()?,
        Message::Signed { reader, .. } => reader.signature(),
        _ => return None,
    };
    let mut ids: Vec<String> = sig
        .issuer_fingerprint()
        .iter()
        .map(|f| hex::encode_upper(f.as_bytes()))
        .collect();
    if ids.is_empty() {
        ids = sig
            .issuer()
            .iter()
            .map(|k| hex::encode_upper(k.as_ref()))
            .collect();
    }
    (!ids.is_empty()).then(|| ids.join("/"))
}
