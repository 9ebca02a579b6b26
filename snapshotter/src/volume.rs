//! KataVirtualVolume: the `io.katacontainers.volume=<base64>` mount option.
//!
//! Schema shared by nydus-snapshotter, the Kata Go runtime and kata-types (Rust).
//! We emit compact JSON in struct field order (deterministic), standard base64 with
//! padding, and ALWAYS an `image_pull.metadata` object: the Go runtime rejects a
//! null or missing metadata (and nil-derefs a missing `image_pull`), runtime-rs
//! rejects an empty `source` for `image_guest_pull`.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Mount option prefix Kata looks for (`VirtualVolumePrefix` / `KATA_VIRTUAL_VOLUME_PREFIX`).
pub const KATA_VOLUME_OPTION_PREFIX: &str = "io.katacontainers.volume=";
/// `volume_type` for guest-pulled images.
pub const VOLUME_TYPE_IMAGE_GUEST_PULL: &str = "image_guest_pull";

/// The image-pull payload; `metadata` is always serialised, even when empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePullVolume {
    /// String metadata (sorted keys → deterministic JSON).
    pub metadata: BTreeMap<String, String>,
}

/// The subset of Kata's `KataVirtualVolume` a guest-pull snapshotter produces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KataVirtualVolume {
    /// Volume type, `image_guest_pull` here.
    pub volume_type: String,
    /// Image reference (must be non-empty for runtime-rs).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// Filesystem type (unused for guest pull).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fs_type: String,
    /// Free-form options (unused for guest pull).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
    /// Guest-pull details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull: Option<ImagePullVolume>,
}

/// Why a volume option is unacceptable to one of the Kata runtimes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    /// Option does not start with the Kata prefix.
    #[error("option does not start with {KATA_VOLUME_OPTION_PREFIX:?}")]
    MissingPrefix,
    /// Not standard base64.
    #[error("volume is not standard base64: {0}")]
    Base64(String),
    /// Not JSON of the expected shape.
    #[error("volume is not valid KataVirtualVolume JSON: {0}")]
    Json(String),
    /// Rejected by a runtime rule.
    #[error("volume rejected: {0}")]
    Invalid(String),
}

impl KataVirtualVolume {
    /// A guest-pull volume for `source` with `metadata`.
    pub fn guest_pull(source: &str, metadata: BTreeMap<String, String>) -> Self {
        KataVirtualVolume {
            volume_type: VOLUME_TYPE_IMAGE_GUEST_PULL.into(),
            source: source.into(),
            image_pull: Some(ImagePullVolume { metadata }),
            ..Default::default()
        }
    }

    /// Compact JSON, fields in declaration order.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain strings and maps always serialise")
    }

    /// Standard base64 (with padding) of the compact JSON.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.to_json())
    }

    /// The full mount option, `io.katacontainers.volume=<base64>`.
    pub fn to_mount_option(&self) -> String {
        format!("{KATA_VOLUME_OPTION_PREFIX}{}", self.to_base64())
    }

    /// Decodes a mount option and checks every rule of the Go runtime, runtime-rs and
    /// nydus for an `image_guest_pull` volume.
    pub fn from_mount_option(opt: &str) -> Result<Self, VolumeError> {
        let b64 = opt
            .strip_prefix(KATA_VOLUME_OPTION_PREFIX)
            .ok_or(VolumeError::MissingPrefix)?;
        let raw = STANDARD
            .decode(b64)
            .map_err(|e| VolumeError::Base64(e.to_string()))?;
        validate_json(&raw)?;
        serde_json::from_slice(&raw).map_err(|e| VolumeError::Json(e.to_string()))
    }
}

/// Checks raw volume JSON against the runtimes' rules (reference §2.6):
/// Go `IsValid` (non-empty `volume_type`; `image_pull.metadata` non-null if present),
/// the Go shim's need for `image_pull` on guest pull (it writes into `Metadata`),
/// runtime-rs `validate()` (non-empty `source` for `image_guest_pull`), and that all
/// metadata values are strings (Go `map[string]string`).
pub fn validate_json(raw: &[u8]) -> Result<(), VolumeError> {
    let v: serde_json::Value =
        serde_json::from_slice(raw).map_err(|e| VolumeError::Json(e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| VolumeError::Json("top level is not an object".into()))?;
    let vt = obj
        .get("volume_type")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if vt.is_empty() {
        return Err(VolumeError::Invalid(
            "empty volume_type (Go IsValid)".into(),
        ));
    }
    if let Some(ip) = obj.get("image_pull") {
        match ip.get("metadata") {
            Some(serde_json::Value::Object(m)) => {
                if m.values().any(|v| !v.is_string()) {
                    return Err(VolumeError::Invalid(
                        "image_pull.metadata values must be strings".into(),
                    ));
                }
            }
            _ => {
                return Err(VolumeError::Invalid(
                    "image_pull.metadata must be an object (Go IsValid rejects null/missing)"
                        .into(),
                ))
            }
        }
    }
    if vt == VOLUME_TYPE_IMAGE_GUEST_PULL {
        if obj.get("image_pull").is_none() {
            return Err(VolumeError::Invalid(
                "image_guest_pull without image_pull (Go shim dereferences it)".into(),
            ));
        }
        let src = obj.get("source").and_then(|v| v.as_str()).unwrap_or("");
        if src.is_empty() {
            return Err(VolumeError::Invalid(
                "image_guest_pull with empty source (runtime-rs validate)".into(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_bytes_and_round_trip() {
        let mut md = BTreeMap::new();
        md.insert("z".to_string(), "1".to_string());
        md.insert("a".to_string(), "2".to_string());
        let v = KataVirtualVolume::guest_pull("reg/img:tag", md);
        assert_eq!(
            v.to_json(),
            r#"{"volume_type":"image_guest_pull","source":"reg/img:tag","image_pull":{"metadata":{"a":"2","z":"1"}}}"#
        );
        let opt = v.to_mount_option();
        assert!(opt.starts_with(KATA_VOLUME_OPTION_PREFIX));
        let b64 = &opt[KATA_VOLUME_OPTION_PREFIX.len()..];
        assert_eq!(b64.len() % 4, 0, "standard base64 keeps padding");
        assert!(!b64.contains('-') && !b64.contains('_'));
        assert_eq!(KataVirtualVolume::from_mount_option(&opt).unwrap(), v);
    }

    #[test]
    fn empty_metadata_is_still_an_object() {
        let v = KataVirtualVolume::guest_pull("x", BTreeMap::new());
        assert!(v.to_json().contains(r#""image_pull":{"metadata":{}}"#));
        KataVirtualVolume::from_mount_option(&v.to_mount_option()).unwrap();
    }

    fn opt(json: &str) -> String {
        format!("{KATA_VOLUME_OPTION_PREFIX}{}", STANDARD.encode(json))
    }

    #[test]
    fn runtime_rules_reject_bad_payloads() {
        for bad in [
            r#"{"volume_type":"","source":"x","image_pull":{"metadata":{}}}"#,
            r#"{"volume_type":"image_guest_pull","source":"x","image_pull":{"metadata":null}}"#,
            r#"{"volume_type":"image_guest_pull","source":"x","image_pull":{}}"#,
            r#"{"volume_type":"image_guest_pull","source":"x"}"#,
            r#"{"volume_type":"image_guest_pull","source":"","image_pull":{"metadata":{}}}"#,
            r#"{"volume_type":"image_guest_pull","source":"x","image_pull":{"metadata":{"a":1}}}"#,
            r#"[]"#,
        ] {
            assert!(
                KataVirtualVolume::from_mount_option(&opt(bad)).is_err(),
                "{bad} must be rejected"
            );
        }
        assert!(matches!(
            KataVirtualVolume::from_mount_option("io.katacontainers.volume=@@"),
            Err(VolumeError::Base64(_))
        ));
        assert!(matches!(
            KataVirtualVolume::from_mount_option("lowerdir=/x"),
            Err(VolumeError::MissingPrefix)
        ));
    }

    #[test]
    fn decodes_nydus_payload() {
        // Shape produced by nydus-snapshotter's mountProxy.
        let o = opt(
            r#"{"volume_type":"image_guest_pull","source":"dummy-image-reference","image_pull":{"metadata":{}}}"#,
        );
        let v = KataVirtualVolume::from_mount_option(&o).unwrap();
        assert_eq!(v.source, "dummy-image-reference");
    }
}
