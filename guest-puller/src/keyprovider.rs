//! The ocicrypt keyprovider protocol and guestpull's key provider for image owners.
//!
//! One home for the wire types: the keyprovider JSON messages (ocicrypt's
//! `KeyProviderKeyWrapProtocolInput`/`Output`) and CoCo's `AnnotationPacket`. The guest side
//! (`decrypt`, the ttrpc `UnWrapKey`) and the owner side (`guestpull-keyprovider`, the CoCo
//! `coco_keyprovider` job) both use them, so a packet one writes is the packet the other reads.
//!
//! Wrapping: the layer's private options (PLBCO JSON) are sealed with a 32-byte KEK under
//! AES-256-GCM (random 12-byte IV, output `ct‖tag`) into an AnnotationPacket v1 whose `kid` is
//! the KBS resource that holds the KEK, e.g. `kbs:///default/key/app`.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aes::cipher::{KeyIvInit, StreamCipher};
use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use kbs_client::ResourceUri;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tracing::info;
use zeroize::Zeroizing;

/// The provider name guestpull's documentation and tests use (`provider:guestpull:<kid>`).
pub const DEFAULT_PROVIDER: &str = "guestpull";
/// The only wrap type this provider produces (CoCo's default).
pub const WRAP_TYPE_GCM: &str = "A256GCM";
/// Counter-mode wrap type CoCo's CDH also reads (no integrity; unwrap only).
pub const WRAP_TYPE_CTR: &str = "A256CTR";

type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;

/// Why a keyprovider request failed; messages name key ids and files, never key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyProviderError {
    /// The request is malformed or asks for something this provider does not do.
    #[error("bad keyprovider request: {0}")]
    BadRequest(String),
    /// No KEK is available for the key id.
    #[error("key id {kid}: no KEK: {reason}")]
    UnknownKey { kid: String, reason: String },
    /// The AnnotationPacket could not be opened with the KEK.
    #[error("key id {kid}: {reason}")]
    Unwrap { kid: String, reason: String },
    /// A KEK file could not be read or written.
    #[error("{path}: {reason}")]
    KekFile { path: PathBuf, reason: String },
}

fn bad(msg: impl Into<String>) -> KeyProviderError {
    KeyProviderError::BadRequest(msg.into())
}

// ---------------------------------------------------------------------------------------------
// Wire types
// ---------------------------------------------------------------------------------------------

/// How a Go `[]byte` field was (or is to be) written in JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ByteForm {
    /// Standard base64 string (Go's `encoding/json`).
    #[default]
    Base64,
    /// Array of byte numbers (serde's `Vec<u8>`: CDH, coco_keyprovider, ocicrypt-rs).
    Array,
}

/// A Go `[]byte` JSON field: reads a base64 string or a byte array and remembers which, so a
/// reply can use the form its caller speaks. Zeroized on drop because it carries PLBCOs.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct WireBytes {
    bytes: Zeroizing<Vec<u8>>,
    form: ByteForm,
}

impl WireBytes {
    /// Wraps `bytes`, to be written in `form`.
    pub fn new(bytes: impl Into<Vec<u8>>, form: ByteForm) -> Self {
        Self {
            bytes: Zeroizing::new(bytes.into()),
            form,
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes
    }

    /// The JSON form these bytes were read in.
    pub fn form(&self) -> ByteForm {
        self.form
    }
}

impl fmt::Debug for WireBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WireBytes({} bytes, {:?})", self.bytes.len(), self.form)
    }
}

impl Serialize for WireBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.form {
            ByteForm::Base64 => s.serialize_str(&STANDARD.encode(&self.bytes[..])),
            ByteForm::Array => s.collect_seq(self.bytes.iter()),
        }
    }
}

impl<'de> Deserialize<'de> for WireBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = WireBytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a base64 string or an array of bytes")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<WireBytes, E> {
                match STANDARD.decode(v.trim()) {
                    Ok(b) => Ok(WireBytes::new(b, ByteForm::Base64)),
                    // ocicrypt-rs sends the PLBCO JSON itself as the "optsdata" string.
                    Err(_) if v.trim_start().starts_with('{') => {
                        Ok(WireBytes::new(v.as_bytes().to_vec(), ByteForm::Base64))
                    }
                    // The decoder's error would quote input; the input may be a secret.
                    Err(_) => Err(E::custom("string is not standard base64")),
                }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<WireBytes, A::Error> {
                let mut out = Zeroizing::new(Vec::with_capacity(a.size_hint().unwrap_or(0)));
                while let Some(b) = a.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(WireBytes {
                    bytes: out,
                    form: ByteForm::Array,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// ocicrypt's parameter map: name → list of `[]byte` values.
pub type Parameters = BTreeMap<String, Vec<WireBytes>>;

fn null_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// ocicrypt's `config.DecryptConfig` as it appears in keyprovider JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DecryptConfig {
    /// Decryption parameters (`provider:NAME:x` → `Parameters[NAME] = [x]`).
    #[serde(rename = "Parameters", default, deserialize_with = "null_default")]
    pub parameters: Parameters,
}

/// ocicrypt's `config.EncryptConfig` as it appears in keyprovider JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EncryptConfig {
    /// Recipient parameters (`provider:NAME:x` → `Parameters[NAME] = [x]`).
    #[serde(rename = "Parameters", default, deserialize_with = "null_default")]
    pub parameters: Parameters,
    /// Decryption parameters carried along for re-encryption.
    #[serde(rename = "DecryptConfig", default)]
    pub decrypt_config: Option<DecryptConfig>,
}

/// The keyprovider operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// Wrap the PLBCO in `keywrapparams.optsdata`.
    Keywrap,
    /// Unwrap the annotation in `keyunwrapparams.annotation`.
    Keyunwrap,
}

/// `keywrapparams`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KeyWrapParams {
    /// The encryption config (recipients).
    #[serde(default)]
    pub ec: Option<EncryptConfig>,
    /// The private layer options (PLBCO JSON) to wrap.
    #[serde(default)]
    pub optsdata: Option<WireBytes>,
}

/// `keyunwrapparams`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KeyUnwrapParams {
    /// The decryption config.
    #[serde(default)]
    pub dc: Option<DecryptConfig>,
    /// The annotation bytes the provider returned when wrapping.
    #[serde(default)]
    pub annotation: Option<WireBytes>,
}

/// The JSON request of ocicrypt's keyprovider protocol (stdin of `cmd`, bytes of the gRPC message).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyProviderKeyWrapProtocolInput {
    /// What to do.
    pub op: Operation,
    /// Parameters of `keywrap`.
    #[serde(default, deserialize_with = "null_default")]
    pub keywrapparams: KeyWrapParams,
    /// Parameters of `keyunwrap`.
    #[serde(default, deserialize_with = "null_default")]
    pub keyunwrapparams: KeyUnwrapParams,
}

/// `keywrapresults`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyWrapResults {
    /// Bytes ocicrypt stores (base64 again) in `org.opencontainers.image.enc.keys.provider.NAME`.
    pub annotation: WireBytes,
}

/// `keyunwrapresults`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyUnwrapResults {
    /// The unwrapped private layer options (PLBCO JSON).
    pub optsdata: WireBytes,
}

/// The JSON reply of ocicrypt's keyprovider protocol.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KeyProviderKeyWrapProtocolOutput {
    /// Set for `keywrap`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keywrapresults: Option<KeyWrapResults>,
    /// Set for `keyunwrap`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyunwrapresults: Option<KeyUnwrapResults>,
}

impl KeyProviderKeyWrapProtocolInput {
    /// Parses request JSON; the error never quotes the input (it may hold a PLBCO).
    pub fn from_json(input: &[u8]) -> Result<Self, KeyProviderError> {
        serde_json::from_slice(input).map_err(|e| {
            bad(format!(
                "keyprovider input JSON (line {}, column {}): {}",
                e.line(),
                e.column(),
                match e.classify() {
                    serde_json::error::Category::Syntax => "syntax error",
                    serde_json::error::Category::Eof => "truncated",
                    _ => "unexpected fields or types (need op, keywrapparams, keyunwrapparams)",
                }
            ))
        })
    }
}

impl KeyProviderKeyWrapProtocolOutput {
    /// Serializes the reply.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("keyprovider output serializes")
    }
}

/// CoCo's AnnotationPacket (v1 fields; v2's `version`/`provider` when present). What
/// `org.opencontainers.image.enc.keys.provider.NAME` holds, base64-encoded, per recipient.
#[derive(Clone, Serialize, Deserialize)]
pub struct AnnotationPacket {
    /// v2 only: `"0.1.0"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The KBS resource holding the KEK (`kbs:///<repo>/<type>/<tag>`).
    pub kid: String,
    /// Standard base64 of the wrapped PLBCO (`ct‖tag` for A256GCM).
    pub wrapped_data: String,
    /// v2 only: the key broker (`kbs`; KMS providers are not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Standard base64 of the IV.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iv: Option<String>,
    /// `A256GCM` or `A256CTR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrap_type: Option<String>,
}

impl fmt::Debug for AnnotationPacket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnnotationPacket")
            .field("kid", &self.kid)
            .field("wrap_type", &self.wrap_type)
            .finish_non_exhaustive()
    }
}

impl AnnotationPacket {
    /// Parses packet JSON (v1 or v2).
    pub fn from_json(json: &[u8]) -> Result<Self, KeyProviderError> {
        serde_json::from_slice(json).map_err(|e| bad(format!("AnnotationPacket JSON: {e}")))
    }

    /// Serializes the packet (v1 shape when `version`/`provider` are unset).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("packet serializes")
    }

    /// Seals `plbco` with `kek` under AES-256-GCM with a fresh random IV.
    pub fn seal(kid: &str, kek: &Kek, plbco: &[u8]) -> Self {
        let gcm = aes_gcm::Aes256Gcm::new(kek.0.as_ref().into());
        let iv = aes_gcm::Aes256Gcm::generate_nonce(&mut OsRng);
        let ct = gcm
            .encrypt(&iv, plbco)
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        Self {
            version: None,
            kid: kid.to_string(),
            wrapped_data: STANDARD.encode(ct),
            provider: None,
            iv: Some(STANDARD.encode(iv)),
            wrap_type: Some(WRAP_TYPE_GCM.to_string()),
        }
    }

    /// The KBS URI to fetch the KEK from (a kid without a scheme is a KBS path, as in CDH).
    pub fn kek_uri(&self) -> String {
        if self.kid.contains("://") {
            self.kid.clone()
        } else {
            format!(
                "kbs://{}{}",
                if self.kid.starts_with('/') { "" } else { "/" },
                self.kid
            )
        }
    }

    /// Rejects packets for key brokers other than the KBS.
    pub fn check_provider(&self) -> Result<(), KeyProviderError> {
        match self.provider.as_deref() {
            None | Some("kbs") => Ok(()),
            Some(p) => Err(KeyProviderError::Unwrap {
                kid: self.kid.clone(),
                reason: format!("unsupported key provider {p:?}"),
            }),
        }
    }

    /// Opens the packet with `kek` (raw bytes as fetched; must be 32), returning the PLBCO JSON.
    pub fn open(&self, kek: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyProviderError> {
        let fail = |reason: String| KeyProviderError::Unwrap {
            kid: self.kid.clone(),
            reason,
        };
        self.check_provider()?;
        let kek: &[u8; 32] = kek
            .try_into()
            .map_err(|_| fail(format!("KEK is {} bytes, need 32", kek.len())))?;
        let wrapped = STANDARD
            .decode(self.wrapped_data.trim())
            .map_err(|e| fail(format!("wrapped_data base64: {e}")))?;
        let iv = STANDARD
            .decode(self.iv.as_deref().unwrap_or("").trim())
            .map_err(|e| fail(format!("iv base64: {e}")))?;
        match self.wrap_type.as_deref().unwrap_or(WRAP_TYPE_GCM) {
            WRAP_TYPE_GCM => {
                if iv.len() != 12 {
                    return Err(fail("A256GCM iv must be 12 bytes".into()));
                }
                aes_gcm::Aes256Gcm::new(kek.into())
                    .decrypt(aes_gcm::Nonce::from_slice(&iv), wrapped.as_slice())
                    .map(Zeroizing::new)
                    .map_err(|_| fail("unwrap failed (wrong KEK or corrupted packet)".into()))
            }
            WRAP_TYPE_CTR => {
                let iv: [u8; 16] = iv
                    .try_into()
                    .map_err(|_| fail("A256CTR iv must be 16 bytes".into()))?;
                let mut out = Zeroizing::new(wrapped);
                Aes256Ctr::new(kek.into(), &iv.into()).apply_keystream(&mut out);
                // CTR has no integrity; a wrong KEK shows up as unparsable PLBCO JSON.
                if serde_json::from_slice::<serde_json::Value>(&out).is_err() {
                    return Err(fail("unwrap failed (wrong KEK)".into()));
                }
                Ok(out)
            }
            other => Err(fail(format!("unsupported wrap_type {other:?}"))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// KEKs
// ---------------------------------------------------------------------------------------------

/// A 32-byte key-encryption key, zeroized on drop.
#[derive(Clone)]
pub struct Kek(Zeroizing<[u8; 32]>);

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(..)")
    }
}

impl Kek {
    /// A fresh random KEK from the OS RNG.
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(k.as_mut());
        Self(k)
    }

    /// Uses `bytes` (must be exactly 32) as the KEK.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; 32] = bytes.try_into().ok()?;
        Some(Self(Zeroizing::new(arr)))
    }

    /// Reads a KEK file holding exactly 32 raw bytes (the KBS serves the KEK as-is).
    pub fn from_file(path: &Path) -> Result<Self, KeyProviderError> {
        let err = |reason: String| KeyProviderError::KekFile {
            path: path.to_owned(),
            reason,
        };
        let data = Zeroizing::new(std::fs::read(path).map_err(|e| err(e.to_string()))?);
        Self::from_bytes(&data).ok_or_else(|| {
            err(format!(
                "a KEK file holds exactly 32 raw bytes, this one has {} (create one with `gen-kek`)",
                data.len()
            ))
        })
    }

    /// Writes the KEK to a new file with mode 0600; never overwrites an existing key.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyProviderError> {
        let err = |reason: String| KeyProviderError::KekFile {
            path: path.to_owned(),
            reason,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| err(e.to_string()))?;
        f.write_all(self.0.as_ref())
            .and_then(|_| f.sync_all())
            .map_err(|e| err(e.to_string()))
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Parses a key id given on the command line or in recipient parameters; accepts the plain
/// URI and coco_keyprovider's `keyid=<uri>[::k=v…]` form.
pub fn parse_kid(text: &str) -> Result<ResourceUri, KeyProviderError> {
    let text = text.trim();
    let kid = match text.split("::").find_map(|kv| kv.strip_prefix("keyid=")) {
        Some(k) => k,
        None => text,
    };
    let uri = ResourceUri::parse(kid)
        .map_err(|e| bad(format!("key id must be kbs:///<repo>/<type>/<tag>: {e}")))?;
    if uri.plugin() != kbs_client::uri::RESOURCE_PLUGIN {
        return Err(bad(format!(
            "key id {kid}: KEKs live in the KBS resource plugin (kbs:///…), not {}",
            uri.plugin()
        )));
    }
    Ok(uri)
}

/// Where the provider finds the KEK for a key id.
pub trait KekSource: Send + Sync {
    /// The KEK stored for `kid`.
    fn kek(&self, kid: &ResourceUri) -> Result<Kek, KeyProviderError>;
    /// The key id used when the recipient names none (`provider:NAME` alone).
    fn default_kid(&self) -> Option<&ResourceUri> {
        None
    }
}

/// One KEK from a file, optionally bound to one key id (`cmd` mode).
pub struct KekFile {
    kek: Kek,
    kid: Option<ResourceUri>,
    path: PathBuf,
}

impl KekFile {
    /// Loads the KEK at `path`, bound to `kid` if given.
    pub fn load(path: &Path, kid: Option<ResourceUri>) -> Result<Self, KeyProviderError> {
        Ok(Self {
            kek: Kek::from_file(path)?,
            kid,
            path: path.to_owned(),
        })
    }
}

impl KekSource for KekFile {
    fn kek(&self, kid: &ResourceUri) -> Result<Kek, KeyProviderError> {
        match &self.kid {
            Some(bound) if bound.path() != kid.path() => Err(KeyProviderError::UnknownKey {
                kid: kid.to_string(),
                reason: format!(
                    "the KEK file {} is for {bound} (--kid)",
                    self.path.display()
                ),
            }),
            _ => Ok(self.kek.clone()),
        }
    }

    fn default_kid(&self) -> Option<&ResourceUri> {
        self.kid.as_ref()
    }
}

/// KEKs in a directory laid out like the KBS: `<dir>/<repo>/<type>/<tag>` (`serve` mode).
/// Read per request so keys added while serving are picked up.
pub struct KeysDir {
    dir: PathBuf,
}

impl KeysDir {
    /// Serves KEKs from `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
}

impl KekSource for KeysDir {
    fn kek(&self, kid: &ResourceUri) -> Result<Kek, KeyProviderError> {
        // ResourceUri segments cannot be empty, `.` or `..`, so the join stays inside `dir`.
        let mut path = self.dir.clone();
        for seg in kid.segments() {
            path.push(seg);
        }
        Kek::from_file(&path).map_err(|e| KeyProviderError::UnknownKey {
            kid: kid.to_string(),
            reason: e.to_string(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The provider
// ---------------------------------------------------------------------------------------------

/// guestpull's ocicrypt key provider: wraps PLBCOs into AnnotationPackets for the KBS.
pub struct KeyProvider {
    name: String,
    keks: Box<dyn KekSource>,
}

impl KeyProvider {
    /// A provider answering for recipients `provider:<name>:…`, with KEKs from `keks`.
    pub fn new(name: impl Into<String>, keks: Box<dyn KekSource>) -> Self {
        Self {
            name: name.into(),
            keks,
        }
    }

    /// Handles one request (any operation); the `cmd` transport.
    pub fn handle(
        &self,
        input: &KeyProviderKeyWrapProtocolInput,
    ) -> Result<KeyProviderKeyWrapProtocolOutput, KeyProviderError> {
        match input.op {
            Operation::Keywrap => self.wrap(&input.keywrapparams),
            Operation::Keyunwrap => self.unwrap(&input.keyunwrapparams),
        }
    }

    /// Handles request JSON, returning reply JSON.
    pub fn handle_json(&self, input: &[u8]) -> Result<Vec<u8>, KeyProviderError> {
        let input = KeyProviderKeyWrapProtocolInput::from_json(input)?;
        Ok(self.handle(&input)?.to_json())
    }

    fn recipient_kid(&self, ec: Option<&EncryptConfig>) -> Result<ResourceUri, KeyProviderError> {
        let values = ec.and_then(|ec| ec.parameters.get(&self.name));
        let named: Vec<ResourceUri> = values
            .into_iter()
            .flatten()
            .map(|v| {
                let text = std::str::from_utf8(v.as_slice())
                    .map_err(|_| bad("recipient parameters are not UTF-8"))?;
                parse_kid(text)
            })
            .collect::<Result<_, _>>()?;
        match (named.as_slice(), self.keks.default_kid()) {
            ([], Some(kid)) => Ok(kid.clone()),
            ([], None) => {
                let have: Vec<&String> = ec.iter().flat_map(|e| e.parameters.keys()).collect();
                Err(bad(format!(
                    "no key id for provider {name:?} (parameters present: {have:?}); \
                     use --recipient provider:{name}:kbs:///<repo>/<type>/<tag>",
                    name = self.name
                )))
            }
            ([kid], _) => Ok(kid.clone()),
            (many, _) => Err(bad(format!(
                "{} key ids for provider {:?}; give one recipient per key id",
                many.len(),
                self.name
            ))),
        }
    }

    /// `keywrap`: seals the PLBCO for the recipient's key id.
    pub fn wrap(
        &self,
        params: &KeyWrapParams,
    ) -> Result<KeyProviderKeyWrapProtocolOutput, KeyProviderError> {
        let plbco = params
            .optsdata
            .as_ref()
            .filter(|o| !o.as_slice().is_empty())
            .ok_or_else(|| bad("keywrap without keywrapparams.optsdata"))?;
        let kid = self.recipient_kid(params.ec.as_ref())?;
        let kek = self.keks.kek(&kid)?;
        let packet = AnnotationPacket::seal(&kid.to_string(), &kek, plbco.as_slice());
        info!(kid = %kid, "wrapped a layer key");
        Ok(KeyProviderKeyWrapProtocolOutput {
            keywrapresults: Some(KeyWrapResults {
                annotation: WireBytes::new(packet.to_json(), plbco.form()),
            }),
            keyunwrapresults: None,
        })
    }

    /// `keyunwrap`: opens an AnnotationPacket with the KEK named by its kid.
    pub fn unwrap(
        &self,
        params: &KeyUnwrapParams,
    ) -> Result<KeyProviderKeyWrapProtocolOutput, KeyProviderError> {
        let ann = params
            .annotation
            .as_ref()
            .ok_or_else(|| bad("keyunwrap without keyunwrapparams.annotation"))?;
        let packet = AnnotationPacket::from_json(ann.as_slice())?;
        let kid = parse_kid(&packet.kek_uri())?;
        let kek = self.keks.kek(&kid)?;
        let plbco = packet.open(kek.as_bytes())?;
        Ok(KeyProviderKeyWrapProtocolOutput {
            keywrapresults: None,
            keyunwrapresults: Some(KeyUnwrapResults {
                optsdata: WireBytes {
                    bytes: plbco,
                    form: ann.form(),
                },
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decrypt::testutil::ocicrypt_encrypt;
    use crate::decrypt::{KeyUnwrapper, PROVIDER_PREFIX, PUBOPTS_ANNOTATION};
    use crate::resource::{ResourceError, ResourceFetcher};
    use std::io::Read;
    use std::sync::Arc;

    /// The guest's view of the KBS: one KEK at one URI.
    struct OneResource(String, Vec<u8>);
    #[async_trait::async_trait]
    impl ResourceFetcher for OneResource {
        async fn fetch(&self, uri: &str) -> Result<Zeroizing<Vec<u8>>, ResourceError> {
            if uri == self.0 {
                Ok(Zeroizing::new(self.1.clone()))
            } else {
                Err(ResourceError::NotFound {
                    uri: uri.into(),
                    reason: "absent".into(),
                })
            }
        }
    }

    const KID: &str = "kbs:///default/key/app";

    fn file_provider(dir: &Path, kek: &Kek, kid: Option<&str>) -> KeyProvider {
        let path = dir.join("kek");
        let _ = std::fs::remove_file(&path);
        kek.write_new(&path).unwrap();
        let kid = kid.map(|k| parse_kid(k).unwrap());
        KeyProvider::new(
            DEFAULT_PROVIDER,
            Box::new(KekFile::load(&path, kid).unwrap()),
        )
    }

    /// What ocicrypt (Go) sends for `--recipient provider:guestpull:<param>` (lab.md §3.b).
    fn go_wrap_request(param: &str, plbco: &[u8]) -> Vec<u8> {
        serde_json::json!({"op": "keywrap",
            "keywrapparams": {"ec": {"Parameters": {"guestpull": [STANDARD.encode(param)]},
                                     "DecryptConfig": {"Parameters": {}}},
                              "optsdata": STANDARD.encode(plbco)},
            "keyunwrapparams": {"dc": null, "annotation": null}})
        .to_string()
        .into_bytes()
    }

    /// The same request as a serde `Vec<u8>` peer (ocicrypt-rs) writes it.
    fn rust_wrap_request(param: &str, plbco: &[u8]) -> Vec<u8> {
        serde_json::json!({"op": "keywrap",
            "keywrapparams": {"ec": {"Parameters": {"guestpull": [param.as_bytes()]}},
                              "optsdata": plbco},
            "keyunwrapparams": {}})
        .to_string()
        .into_bytes()
    }

    #[tokio::test]
    async fn wrapped_key_decrypts_a_layer_through_the_guest_unwrap_path() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::generate();
        let kp = file_provider(dir.path(), &kek, None);
        let layer = b"layer bytes, compressed and then encrypted";
        let (ct, plbco, pubopts) = ocicrypt_encrypt(layer, [5; 32], [6; 16], "sha256:00ff");
        for (req, form) in [
            (go_wrap_request(KID, &plbco), ByteForm::Base64),
            (rust_wrap_request(KID, &plbco), ByteForm::Array),
        ] {
            let out: KeyProviderKeyWrapProtocolOutput =
                serde_json::from_slice(&kp.handle_json(&req).unwrap()).unwrap();
            let ann = out.keywrapresults.unwrap().annotation;
            assert_eq!(ann.form(), form, "reply in the caller's byte form");
            // The packet is CoCo's v1 shape, exactly.
            let v: serde_json::Value = serde_json::from_slice(ann.as_slice()).unwrap();
            let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
            assert_eq!(keys, ["iv", "kid", "wrap_type", "wrapped_data"]);
            assert_eq!(v["kid"], KID);
            assert_eq!(v["wrap_type"], "A256GCM");
            assert_eq!(
                STANDARD.decode(v["iv"].as_str().unwrap()).unwrap().len(),
                12
            );
            // ocicrypt stores base64(annotation) under provider.<name>; the guest unwraps it.
            let mut annotations = BTreeMap::new();
            annotations.insert(
                format!("{PROVIDER_PREFIX}guestpull"),
                STANDARD.encode(ann.as_slice()),
            );
            annotations.insert(PUBOPTS_ANNOTATION.to_string(), pubopts.clone());
            let guest = KeyUnwrapper::new(
                Arc::new(OneResource(KID.into(), kek.as_bytes().to_vec())),
                vec!["guestpull".into()],
                vec![],
            );
            let key = guest
                .unwrap_layer_key("sha256:l", &annotations)
                .await
                .unwrap();
            assert_eq!(key.plain_digest.as_deref(), Some("sha256:00ff"));
            let mut plain = Vec::new();
            key.decryptor(&ct[..]).read_to_end(&mut plain).unwrap();
            assert_eq!(plain, layer);
            // Missing from the KBS: the guest's error names the layer and the kid.
            let nokey = KeyUnwrapper::new(
                Arc::new(OneResource("kbs:///default/key/other".into(), vec![0; 32])),
                vec!["guestpull".into()],
                vec![],
            );
            let e = nokey
                .unwrap_layer_key("sha256:l", &annotations)
                .await
                .unwrap_err()
                .to_string();
            assert!(e.contains("sha256:l") && e.contains(KID), "{e}");
        }
    }

    #[test]
    fn provider_unwraps_its_own_packets_in_both_forms() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::generate();
        let kp = file_provider(dir.path(), &kek, Some(KID));
        let plbco = br#"{"symkey":"AAAA","digest":"sha256:1","cipheroptions":{"nonce":"AA=="}}"#;
        let packet = AnnotationPacket::seal(KID, &kek, plbco).to_json();
        for ann in [
            serde_json::json!(STANDARD.encode(&packet)),
            serde_json::json!(packet),
        ] {
            // Go's keyunwrap request (dc carries `provider:guestpull` → "Enabled").
            let req = serde_json::json!({"op": "keyunwrap",
                "keywrapparams": {"ec": null, "optsdata": null},
                "keyunwrapparams": {"dc": {"Parameters": {"guestpull": ["RW5hYmxlZA=="]}},
                                    "annotation": ann}});
            let out: KeyProviderKeyWrapProtocolOutput =
                serde_json::from_slice(&kp.handle_json(req.to_string().as_bytes()).unwrap())
                    .unwrap();
            assert_eq!(out.keyunwrapresults.unwrap().optsdata.as_slice(), plbco);
        }
        // A packet sealed with another KEK does not open, and says which kid.
        let other = AnnotationPacket::seal(KID, &Kek::generate(), plbco).to_json();
        let req = serde_json::json!({"op": "keyunwrap",
            "keyunwrapparams": {"annotation": STANDARD.encode(other)}});
        let e = kp.handle_json(req.to_string().as_bytes()).unwrap_err();
        assert!(matches!(e, KeyProviderError::Unwrap { .. }), "{e}");
        assert!(e.to_string().contains(KID));
    }

    #[test]
    fn key_id_selection_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::generate();
        let plbco = b"{}";
        // --kid is the default for a bare `provider:guestpull` recipient...
        let bound = file_provider(dir.path(), &kek, Some(KID));
        let req = serde_json::json!({"op": "keywrap", "keywrapparams": {
            "ec": {"Parameters": {}}, "optsdata": STANDARD.encode(plbco)}});
        let out = bound.handle_json(req.to_string().as_bytes()).unwrap();
        assert!(String::from_utf8_lossy(&out).contains("keywrapresults"));
        // ...and a recipient naming another kid is refused rather than mislabelled.
        let e = bound
            .handle_json(&go_wrap_request("kbs:///default/key/other", plbco))
            .unwrap_err();
        assert!(
            matches!(&e, KeyProviderError::UnknownKey { kid, .. } if kid.contains("other")),
            "{e}"
        );
        // Without --kid and without parameters, the error says how to name one.
        let unbound = file_provider(dir.path(), &kek, None);
        let e = unbound
            .handle_json(req.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("provider:guestpull:kbs:///"), "{e}");
        // coco_keyprovider's `keyid=…::keypath=…` form names the kid too.
        assert_eq!(
            parse_kid("keyid=kbs:///default/key/x::algorithm=A256GCM")
                .unwrap()
                .path(),
            "default/key/x"
        );
        for badkid in [
            "default/key/x",
            "kbs:///a/b",
            "kbs:///a/../b",
            "kbs+plugin:///a/b/c",
        ] {
            assert!(parse_kid(badkid).is_err(), "{badkid}");
        }
        // Missing optsdata and malformed JSON are BadRequest without echoing input.
        let e = unbound
            .handle_json(br#"{"op":"keywrap","keywrapparams":{"ec":null,"optsdata":null}}"#)
            .unwrap_err();
        assert!(matches!(e, KeyProviderError::BadRequest(_)));
        let e = unbound
            .handle_json(br#"{"op":"keywrap","keywrapparams":{"optsdata":"sekrit!"}}"#)
            .unwrap_err();
        assert!(!e.to_string().contains("sekrit"), "{e}");
    }

    #[test]
    fn keys_dir_maps_kids_to_files() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::generate();
        std::fs::create_dir_all(dir.path().join("default/key")).unwrap();
        kek.write_new(&dir.path().join("default/key/app")).unwrap();
        let src = KeysDir::new(dir.path());
        let got = src.kek(&parse_kid(KID).unwrap()).unwrap();
        assert_eq!(got.as_bytes(), kek.as_bytes());
        let e = src
            .kek(&parse_kid("kbs:///default/key/none").unwrap())
            .unwrap_err();
        assert!(
            matches!(&e, KeyProviderError::UnknownKey { kid, .. } if kid.ends_with("/none")),
            "{e}"
        );
        // KEK files are 0600 and never overwritten.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("default/key/app"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(Kek::generate()
            .write_new(&dir.path().join("default/key/app"))
            .is_err());
        assert_eq!(
            Kek::from_file(&dir.path().join("default/key/app"))
                .unwrap()
                .as_bytes(),
            kek.as_bytes()
        );
    }
}
