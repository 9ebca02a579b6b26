//! Writing images into an OCI image layout directory (what `skopeo copy oci:` reads).

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::layer::{self, sha256_digest, Layer};

/// An image to build: layers plus the runtime config.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
    /// Entrypoint (empty for none).
    pub entrypoint: Vec<String>,
    /// Default command.
    pub cmd: Vec<String>,
    /// Environment (`K=V`).
    pub env: Vec<String>,
    /// Working directory ("" for none).
    pub working_dir: String,
    /// GOARCH-style architecture.
    pub architecture: String,
    /// Architecture variant ("" for none).
    pub variant: String,
}

impl ImageSpec {
    /// An amd64 image with PATH=/bin.
    pub fn new(layers: Vec<Layer>, cmd: &[&str]) -> ImageSpec {
        ImageSpec {
            layers,
            entrypoint: Vec::new(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/bin:/usr/bin".into()],
            working_dir: String::new(),
            architecture: "amd64".into(),
            variant: String::new(),
        }
    }
}

/// A blob-addressed OCI layout on disk.
pub struct Layout {
    dir: PathBuf,
    refs: Vec<serde_json::Value>,
}

/// Digests of a written manifest.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WrittenManifest {
    /// Manifest (or index) digest.
    pub digest: String,
    /// Config digest (empty for an index).
    pub config_digest: String,
    /// Layer blob digests.
    pub layer_digests: Vec<String>,
    /// Uncompressed layer digests.
    pub diff_ids: Vec<String>,
}

impl Layout {
    /// Creates (or reuses) a layout at `dir`.
    pub fn create(dir: &Path) -> std::io::Result<Layout> {
        fs::create_dir_all(dir.join("blobs/sha256"))?;
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(Layout {
            dir: dir.to_path_buf(),
            refs: Vec::new(),
        })
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores a blob, returning its digest.
    pub fn put_blob(&self, data: &[u8]) -> std::io::Result<String> {
        let d = sha256_digest(data);
        let p = self
            .dir
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"));
        if !p.exists() {
            let tmp = p.with_extension("tmp");
            fs::write(&tmp, data)?;
            fs::rename(&tmp, &p)?;
        }
        Ok(d)
    }

    /// Builds `spec` and stores its layers, config and manifest; returns the manifest descriptor
    /// JSON and digests. The manifest is not tagged; see [`Layout::tag`].
    pub fn write_image(
        &self,
        spec: &ImageSpec,
    ) -> std::io::Result<(serde_json::Value, WrittenManifest)> {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        let mut descs = Vec::new();
        for l in &spec.layers {
            let b = layer::build(l)?;
            self.put_blob(&b.blob)?;
            descs
                .push(json!({"mediaType": b.media_type, "digest": b.digest, "size": b.blob.len()}));
            layers.push(b.digest.clone());
            diff_ids.push(b.diff_id);
        }
        let mut cfg = json!({
            "created": "2024-01-01T00:00:00Z",
            "architecture": spec.architecture,
            "os": "linux",
            "config": {"Env": spec.env, "Cmd": spec.cmd},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": spec.layers.iter().map(|_| json!({"created": "2024-01-01T00:00:00Z", "created_by": "guestpull test-images"})).collect::<Vec<_>>(),
        });
        if !spec.entrypoint.is_empty() {
            cfg["config"]["Entrypoint"] = json!(spec.entrypoint);
        }
        if !spec.working_dir.is_empty() {
            cfg["config"]["WorkingDir"] = json!(spec.working_dir);
        }
        if !spec.variant.is_empty() {
            cfg["variant"] = json!(spec.variant);
        }
        let cfg_bytes = serde_json::to_vec(&cfg)?;
        let cfg_digest = self.put_blob(&cfg_bytes)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg_bytes.len()},
            "layers": descs,
        });
        let m = serde_json::to_vec(&manifest)?;
        let digest = self.put_blob(&m)?;
        let mut platform = json!({"architecture": spec.architecture, "os": "linux"});
        if !spec.variant.is_empty() {
            platform["variant"] = json!(spec.variant);
        }
        Ok((
            json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": m.len(), "platform": platform}),
            WrittenManifest {
                digest,
                config_digest: cfg_digest,
                layer_digests: layers,
                diff_ids,
            },
        ))
    }

    /// Stores an image index over already-written manifest descriptors.
    pub fn write_index(
        &self,
        manifests: Vec<serde_json::Value>,
    ) -> std::io::Result<(serde_json::Value, String)> {
        let idx = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        let b = serde_json::to_vec(&idx)?;
        let d = self.put_blob(&b)?;
        Ok((
            json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": b.len()}),
            d,
        ))
    }

    /// Names a descriptor `tag` in the layout's index.json.
    pub fn tag(&mut self, desc: &serde_json::Value, tag: &str) -> std::io::Result<()> {
        let mut d = desc.clone();
        if let Some(o) = d.as_object_mut() {
            o.remove("platform");
            o.insert(
                "annotations".into(),
                json!({"org.opencontainers.image.ref.name": tag}),
            );
        }
        self.refs
            .retain(|r| r["annotations"]["org.opencontainers.image.ref.name"] != json!(tag));
        self.refs.push(d);
        let index = json!({"schemaVersion": 2, "manifests": self.refs});
        fs::write(self.dir.join("index.json"), serde_json::to_vec(&index)?)
    }
}
