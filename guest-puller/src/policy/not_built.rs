//! Signature schemes this build leaves out (`gpg` / `cosign` Cargo features off). Their key
//! types are uninhabited: a policy naming the scheme is refused when it is loaded
//! ([`super::check_capabilities`]), and no code path can reach a verification.

/// A GPG keyring, in a build without the `gpg` feature: none can exist.
#[cfg(not(feature = "gpg"))]
pub(crate) enum Keyring {}

/// A verified GPG signature (never produced in this build).
#[cfg(not(feature = "gpg"))]
pub(crate) struct Verified {
    pub signer: String,
    pub payload: Vec<u8>,
}

#[cfg(not(feature = "gpg"))]
impl Keyring {
    /// Refuses: this guest-puller was built without GPG support.
    pub fn load(_sources: &[(String, &[u8])]) -> Result<Self, String> {
        Err(super::not_built("signedBy", "gpg"))
    }

    /// Unreachable: no keyring value exists.
    pub fn verify(&self, _signature: &[u8]) -> Result<Verified, String> {
        match *self {}
    }
}

/// A cosign public key, in a build without the `cosign` feature: none can exist.
#[cfg(not(feature = "cosign"))]
pub(crate) enum CosignKey {}

#[cfg(not(feature = "cosign"))]
impl CosignKey {
    /// Refuses: this guest-puller was built without cosign support.
    pub fn from_pem(_pem: &[u8]) -> Result<Self, String> {
        Err(super::not_built("sigstoreSigned", "cosign"))
    }

    /// Unreachable: no key value exists.
    pub fn algorithm(&self) -> &'static str {
        match *self {}
    }

    /// Unreachable: no key value exists.
    pub fn verify(&self, _payload: &[u8], _signature_b64: &str) -> Result<(), String> {
        match *self {}
    }
}
