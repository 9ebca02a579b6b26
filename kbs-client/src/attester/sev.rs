//! SEV/SEV-ES launch secrets: the KBS (via the host) injects them at launch into the EFI secret
//! area, which the `efi_secret` module exposes as one file per GUID under
//! `/sys/kernel/security/secrets/coco/`.
//!
//! Mapping to resource URIs (so callers use the same `get_resource` for every TEE):
//! 1. `kbs:///<repo>/<type>/<guid>`: when the tag is a GUID and a file of that name exists, its
//!    bytes are the resource.
//! 2. Otherwise the index entry `e6f5a162-d67f-4750-a67c-5d065f2a9910` (the GUID the reference
//!    offline SEV KBC used) is a JSON object mapping `"<repo>/<type>/<tag>"` to standard base64
//!    of the resource bytes.
//!
//! Files are read but never deleted: deleting wipes the secret for every other consumer.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use zeroize::Zeroizing;

use crate::error::Error;
use crate::uri::ResourceUri;

/// GUID of the JSON resource index in the EFI secret area.
pub const RESOURCE_INDEX_GUID: &str = "e6f5a162-d67f-4750-a67c-5d065f2a9910";

fn is_guid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Reader for launch-injected secrets.
#[derive(Debug, Clone)]
pub struct LaunchSecrets {
    dir: PathBuf,
}

impl LaunchSecrets {
    /// A reader over the given EFI secrets directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory read.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The resource bytes for `uri`, by the mapping in the module docs.
    pub fn get(&self, uri: &ResourceUri) -> Result<Zeroizing<Vec<u8>>, Error> {
        let path = uri.path();
        let not_found = |detail: String| Error::LaunchSecretNotFound {
            path: path.clone(),
            dir: self.dir.display().to_string(),
            detail,
        };
        if let Some(tag) = uri.segments().last().filter(|t| is_guid(t)) {
            let f = self.dir.join(tag.to_ascii_lowercase());
            if f.is_file() {
                return std::fs::read(&f)
                    .map(Zeroizing::new)
                    .map_err(|e| not_found(format!("cannot read {}: {e}", f.display())));
            }
        }
        let index_path = self.dir.join(RESOURCE_INDEX_GUID);
        let index = match std::fs::read(&index_path) {
            Ok(b) => Zeroizing::new(b),
            Err(e) => {
                return Err(not_found(format!(
                    "no GUID-named entry and no resource index {RESOURCE_INDEX_GUID} ({e})"
                )))
            }
        };
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&index)
            .map_err(|_| {
                not_found(format!(
                    "resource index {RESOURCE_INDEX_GUID} is not a JSON object"
                ))
            })?;
        let entry = map
            .get(&path)
            .ok_or_else(|| not_found("no entry in the resource index".into()))?;
        let b64 = entry
            .as_str()
            .ok_or_else(|| not_found("index entry is not a base64 string".into()))?;
        STANDARD
            .decode(b64)
            .map(Zeroizing::new)
            .map_err(|_| not_found("index entry is not valid base64".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_and_index_mapping() {
        let d = tempfile::tempdir().unwrap();
        let guid = "736869e5-84f0-4973-92ec-06879ce3da0b";
        std::fs::write(d.path().join(guid), b"raw-secret").unwrap();
        std::fs::write(
            d.path().join(RESOURCE_INDEX_GUID),
            format!(r#"{{"default/key/k1":"{}"}}"#, STANDARD.encode(b"indexed")),
        )
        .unwrap();
        let s = LaunchSecrets::new(d.path());
        let by_guid = ResourceUri::parse(&format!("kbs:///default/key/{guid}")).unwrap();
        assert_eq!(&*s.get(&by_guid).unwrap(), b"raw-secret");
        let by_index = ResourceUri::parse("kbs:///default/key/k1").unwrap();
        assert_eq!(&*s.get(&by_index).unwrap(), b"indexed");
        let missing = ResourceUri::parse("kbs:///default/key/k2").unwrap();
        let e = s.get(&missing).unwrap_err();
        assert!(matches!(e, Error::LaunchSecretNotFound { .. }), "{e}");
        assert!(e.to_string().contains("default/key/k2"));
        assert!(is_guid(guid) && !is_guid("k1"));
    }
}
