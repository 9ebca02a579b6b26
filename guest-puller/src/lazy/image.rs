//! Recognising nydus images and getting their bootstrap out of the bootstrap layer.

use std::collections::BTreeMap;
use std::io::Read;

use oci_client::manifest::{OciDescriptor, OciImageManifest};

use super::LazyError;

/// Media type of a nydus data blob layer.
pub const BLOB_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.nydus.blob.v1";
/// Annotation nydusify puts on data blob layers.
pub const BLOB_ANNOTATION: &str = "containerd.io/snapshot/nydus-blob";
/// Annotation nydusify puts on the bootstrap layer.
pub const BOOTSTRAP_ANNOTATION: &str = "containerd.io/snapshot/nydus-bootstrap";
/// Path of the bootstrap inside the bootstrap layer's tarball.
pub const BOOTSTRAP_PATH: &str = "image/image.boot";
/// Largest bootstrap accepted (metadata of a very large image is tens of MiB).
pub const MAX_BOOTSTRAP_SIZE: u64 = 512 << 20;

/// The parts of a nydus manifest the lazy path needs.
#[derive(Debug, Clone)]
pub struct NydusManifest {
    /// The bootstrap layer descriptor (its digest is signed via the manifest).
    pub bootstrap: OciDescriptor,
    /// Data blob descriptors; their hex digests are the blob ids in the bootstrap.
    pub blobs: Vec<OciDescriptor>,
}

fn annotated(d: &OciDescriptor, key: &str) -> bool {
    d.annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .is_some_and(|v| v == "true")
}

/// Returns the nydus layout of `m`, or `None` for an ordinary OCI image. A manifest that is
/// partly nydus (bootstrap without blobs, or foreign layers mixed in) is an error, not a
/// fallback: it cannot be unpacked eagerly either.
pub fn detect(m: &OciImageManifest) -> Result<Option<NydusManifest>, LazyError> {
    let Some(last) = m.layers.last() else {
        return Ok(None);
    };
    if !annotated(last, BOOTSTRAP_ANNOTATION) {
        if m.layers.iter().any(|l| l.media_type == BLOB_MEDIA_TYPE) {
            return Err(LazyError::Format(
                "manifest has nydus blob layers but its last layer is not a nydus bootstrap".into(),
            ));
        }
        return Ok(None);
    }
    let mut blobs = Vec::new();
    for l in &m.layers[..m.layers.len() - 1] {
        if l.media_type != BLOB_MEDIA_TYPE && !annotated(l, BLOB_ANNOTATION) {
            return Err(LazyError::Format(format!(
                "layer {} ({}) of a nydus image is not a nydus blob",
                l.digest, l.media_type
            )));
        }
        if !l.digest.starts_with("sha256:") {
            return Err(LazyError::Format(format!(
                "nydus blob {} is not sha256-addressed",
                l.digest
            )));
        }
        blobs.push(l.clone());
    }
    Ok(Some(NydusManifest {
        bootstrap: last.clone(),
        blobs,
    }))
}

/// Extracts [`BOOTSTRAP_PATH`] from a bootstrap layer tarball (`gzip` says whether it is
/// gzip-compressed); the caller has verified (and decrypted) the layer already.
pub fn extract_bootstrap<R: Read>(layer: R, gzip: bool) -> Result<Vec<u8>, LazyError> {
    let reader: Box<dyn Read> = if gzip {
        Box::new(flate2::read::GzDecoder::new(layer))
    } else {
        Box::new(layer)
    };
    let mut ar = tar::Archive::new(reader);
    let bad = |e: std::io::Error| LazyError::Format(format!("bootstrap layer: {e}"));
    for entry in ar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        if path.trim_start_matches("./") != BOOTSTRAP_PATH {
            continue;
        }
        if entry.size() > MAX_BOOTSTRAP_SIZE {
            return Err(LazyError::Format(format!(
                "bootstrap of {} bytes exceeds {MAX_BOOTSTRAP_SIZE}",
                entry.size()
            )));
        }
        let mut out = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut out).map_err(bad)?;
        return Ok(out);
    }
    Err(LazyError::Format(format!(
        "bootstrap layer has no {BOOTSTRAP_PATH}"
    )))
}

/// Blob ids (hex digests) the manifest provides, for checking the bootstrap's blob table.
pub fn blob_ids(blobs: &[OciDescriptor]) -> BTreeMap<String, u64> {
    blobs
        .iter()
        .map(|b| {
            (
                b.digest.trim_start_matches("sha256:").to_string(),
                u64::try_from(b.size).unwrap_or(0),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(media_type: &str, digest: &str, ann: Option<(&str, &str)>) -> OciDescriptor {
        OciDescriptor {
            media_type: media_type.into(),
            digest: digest.into(),
            size: 10,
            annotations: ann.map(|(k, v)| [(k.to_string(), v.to_string())].into()),
            ..Default::default()
        }
    }

    fn manifest(layers: Vec<OciDescriptor>) -> OciImageManifest {
        OciImageManifest {
            layers,
            ..Default::default()
        }
    }

    #[test]
    fn detects_nydus_and_plain_images() {
        let plain = manifest(vec![desc(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "sha256:aa",
            None,
        )]);
        assert!(detect(&plain).unwrap().is_none());
        let nydus = manifest(vec![
            desc(
                BLOB_MEDIA_TYPE,
                "sha256:bb",
                Some((BLOB_ANNOTATION, "true")),
            ),
            desc(
                "application/vnd.oci.image.layer.v1.tar+gzip",
                "sha256:cc",
                Some((BOOTSTRAP_ANNOTATION, "true")),
            ),
        ]);
        let n = detect(&nydus).unwrap().unwrap();
        assert_eq!(n.bootstrap.digest, "sha256:cc");
        assert_eq!(blob_ids(&n.blobs).keys().collect::<Vec<_>>(), ["bb"]);
    }

    #[test]
    fn rejects_half_nydus_manifests() {
        let no_boot = manifest(vec![desc(BLOB_MEDIA_TYPE, "sha256:bb", None)]);
        assert!(detect(&no_boot).is_err());
        let foreign = manifest(vec![
            desc("application/vnd.oci.image.layer.v1.tar", "sha256:aa", None),
            desc(
                "application/vnd.oci.image.layer.v1.tar+gzip",
                "sha256:cc",
                Some((BOOTSTRAP_ANNOTATION, "true")),
            ),
        ]);
        assert!(detect(&foreign).is_err());
    }

    #[test]
    fn extracts_the_bootstrap() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(4);
        h.set_mode(0o644);
        b.append_data(&mut h, "image/other", &b"nope"[..]).unwrap();
        b.append_data(&mut h, BOOTSTRAP_PATH, &b"boot"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        assert_eq!(extract_bootstrap(&tar[..], false).unwrap(), b"boot");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(extract_bootstrap(&gz[..], true).unwrap(), b"boot");
        assert!(extract_bootstrap(&tar[..512], false).is_err());
    }
}
