//! Nydus (RAFS v6) variants of catalog images, built with `nydus-builder` from the same layer
//! specs as the OCI images: one data blob plus a bootstrap layer, laid out as nydusify and
//! containerd's nydus support expect.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nydus_api::ConfigV2;
use nydus_builder::{
    ArtifactStorage, BlobManager, BootstrapManager, BuildContext, Builder, ConversionType,
    Features, Merger, Prefetch, PrefetchPolicy, TarballBuilder, WhiteoutSpec,
};
use nydus_rafs::metadata::{RafsSuper, RafsVersion};
use nydus_storage::device::BlobFeatures;
use nydus_utils::{compress, digest};
use serde_json::json;

use crate::layer::{self, sha256_digest, Compression, Layer, Node};
use crate::layout::{ImageSpec, Layout, WrittenManifest};

/// Media type of a nydus data blob.
pub const BLOB_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.nydus.blob.v1";
/// Annotation marking a nydus data blob layer.
pub const BLOB_ANNOTATION: &str = "containerd.io/snapshot/nydus-blob";
/// Annotation marking the nydus bootstrap layer.
pub const BOOTSTRAP_ANNOTATION: &str = "containerd.io/snapshot/nydus-bootstrap";
/// Annotation naming the RAFS version.
pub const FS_VERSION_ANNOTATION: &str = "containerd.io/snapshot/nydus-fs-version";
/// Path of the bootstrap inside the bootstrap layer's tarball.
pub const BOOTSTRAP_PATH: &str = "image/image.boot";

/// Why a nydus image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NydusError {
    /// Filesystem error while staging the build.
    #[error("nydus build staging: {0}")]
    Io(#[from] std::io::Error),
    /// `nydus-builder` refused the source tree.
    #[error("nydus-builder: {0:#}")]
    Build(anyhow::Error),
}

/// How [`build`] builds an image. The default is `nydus-image create`'s: zstd chunks, each
/// with a CRC32 in the chunk tables, sha256 chunk digests, a blob ToC.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuildOptions {
    /// Encrypt the chunks (AES-128-XTS); the keys live in the bootstrap, which must then be
    /// protected with ocicrypt before it is published.
    pub encrypt: bool,
    /// Store chunks uncompressed (`nydus-image create --compressor none`).
    pub uncompressed: bool,
    /// Write V2 chunk-info entries in the blob even when unencrypted; they carry each chunk's
    /// CRC32, which nydus-storage then checks instead of the chunk digest.
    pub chunk_info_v2: bool,
    /// A tarfs image (`nydus-image create --type tar-tarfs`): the data blob is the tar itself
    /// and the bootstrap indexes it, with no chunk digests.
    pub tarfs: bool,
}

/// A built nydus image: its data blob and its bootstrap layer.
#[derive(Debug, Clone)]
pub struct NydusImage {
    /// The RAFS data blob (chunks, compressed per chunk).
    pub blob: Vec<u8>,
    /// `sha256:` of the data blob; nydus names the blob by this id.
    pub blob_digest: String,
    /// The bootstrap layer: a gzip tarball holding [`BOOTSTRAP_PATH`].
    pub bootstrap_layer: Vec<u8>,
    /// Uncompressed digest of the bootstrap layer (its config diff_id).
    pub bootstrap_diff_id: String,
    /// Where the blob keeps its chunk-info table (compressed, and encrypted with the chunks),
    /// for tests that tamper with it.
    pub chunk_table: std::ops::Range<usize>,
}

/// Flattens `layers` into one layer: later layers replace earlier entries, whiteouts delete,
/// opaque markers hide what lower layers had below the directory.
pub fn flatten(layers: &[Layer]) -> Layer {
    let mut tree: BTreeMap<String, Node> = BTreeMap::new();
    let strip = |p: &str| p.trim_end_matches('/').to_string();
    let drop_below = |tree: &mut BTreeMap<String, Node>, dir: &str| {
        let prefix = format!("{dir}/");
        tree.retain(|k, _| !k.starts_with(&prefix));
    };
    for l in layers {
        for n in &l.nodes {
            match n {
                Node::Whiteout { path } => {
                    let p = strip(path);
                    tree.remove(&p);
                    drop_below(&mut tree, &p);
                }
                Node::Opaque { dir } => drop_below(&mut tree, &strip(dir)),
                Node::Dir { path, .. }
                | Node::File { path, .. }
                | Node::Symlink { path, .. }
                | Node::Hardlink { path, .. }
                | Node::CharDev { path, .. }
                | Node::Fifo { path, .. }
                | Node::XattrFile { path, .. } => {
                    let p = strip(path);
                    // A directory over a directory keeps what is below it.
                    if !matches!(n, Node::Dir { .. }) {
                        drop_below(&mut tree, &p);
                    }
                    tree.insert(p, n.clone());
                }
            }
        }
    }
    // Hard links must follow their target in tar order; BTreeMap order puts parents first but
    // not necessarily targets, so links go last.
    let (links, mut nodes): (Vec<Node>, Vec<Node>) = tree
        .into_values()
        .partition(|n| matches!(n, Node::Hardlink { .. }));
    nodes.extend(links);
    Layer {
        nodes,
        compression: Compression::None,
    }
}

/// Builds the nydus form of `spec` in `work` (a scratch directory) as `opts` says.
pub fn build(spec: &ImageSpec, work: &Path, opts: &BuildOptions) -> Result<NydusImage, NydusError> {
    let encrypt = opts.encrypt;
    fs::create_dir_all(work)?;
    let tar_path = work.join("rootfs.tar");
    fs::write(&tar_path, layer::tar_bytes(&flatten(&spec.layers))?)?;
    let blob_dir = work.join("blobs");
    let _ = fs::remove_dir_all(&blob_dir);
    fs::create_dir_all(&blob_dir)?;
    let boot_path = work.join("image.boot");
    let _ = fs::remove_file(&boot_path);
    let conversion = if opts.tarfs {
        ConversionType::TarToTarfs
    } else {
        ConversionType::TarToRafs
    };
    let features = if opts.tarfs {
        Features::new()
    } else {
        // blob-toc: the chunk digest table is appended to the blob under a ToC whose digest the
        // bootstrap records, as nydusify converts images.
        Features::try_from("blob-toc").map_err(NydusError::Build)?
    };

    let mut ctx = BuildContext::new(
        String::new(),
        true,
        0,
        if opts.uncompressed {
            compress::Algorithm::None
        } else {
            compress::Algorithm::Zstd
        },
        digest::Algorithm::Sha256,
        true,
        WhiteoutSpec::Oci,
        conversion,
        tar_path.clone(),
        Prefetch::new(PrefetchPolicy::None).map_err(NydusError::Build)?,
        Some(ArtifactStorage::FileDir((blob_dir.clone(), String::new()))),
        None,
        false,
        features,
        encrypt,
        Default::default(),
    );
    ctx.set_fs_version(RafsVersion::V6);
    if encrypt {
        // `BuildContext::new(.., encrypt, ..)` only picks the cipher; the blob features that
        // tell readers about it are set by the caller (nydus-image does the same for
        // `create --encrypt`). Without CHUNK_INFO_V2 the blob's chunk table is V1, which has
        // no per-chunk "encrypted" bit (nydus-storage reports V1 chunks as plaintext), so
        // readers would decompress ciphertext and every read fails; ENCRYPTED marks the blob
        // and its chunk-info header accordingly.
        ctx.blob_features
            .insert(BlobFeatures::CHUNK_INFO_V2 | BlobFeatures::ENCRYPTED);
    }
    if opts.chunk_info_v2 {
        ctx.blob_features.insert(BlobFeatures::CHUNK_INFO_V2);
    }
    // Chunk CRC32s stay on (nydus-builder's and nydus-image's default): the guest-puller checks
    // every chunk against its digest in the bootstrap whatever the chunk tables carry, and the
    // test images are built the way upstream's are.
    let mut bootstrap_mgr =
        BootstrapManager::new(Some(ArtifactStorage::SingleFile(boot_path.clone())), None);
    let mut blob_mgr = BlobManager::new(digest::Algorithm::Sha256, false);
    let out = TarballBuilder::new(conversion)
        .build(&mut ctx, &mut bootstrap_mgr, &mut blob_mgr)
        .map_err(NydusError::Build)?;
    let blob_id = out
        .blobs
        .first()
        .cloned()
        .ok_or_else(|| NydusError::Build(anyhow::anyhow!("the build produced no data blob")))?;
    let blob = if opts.tarfs {
        fs::read(&tar_path)?
    } else {
        fs::read(blob_dir.join(&blob_id))?
    };
    let blob_digest = sha256_digest(&blob);
    // The builder names the blob by a hash of its chunk data, but registries address it by the
    // digest of the whole file (ToC included). Rewrite the blob table the way nydusify does,
    // with `merge --blob-digests`, so the bootstrap names the manifest's layer digest.
    let merged = work.join("image.merged.boot");
    let _ = fs::remove_file(&merged);
    Merger::merge(
        &mut BuildContext::default(),
        None,
        vec![boot_path.clone()],
        Some(vec![blob_digest.trim_start_matches("sha256:").to_string()]),
        Some(vec![blob_id]),
        Some(vec![blob.len() as u64]),
        None,
        None,
        ArtifactStorage::SingleFile(merged.clone()),
        None,
        Arc::new(ConfigV2::default()),
    )
    .map_err(NydusError::Build)?;
    let boot_path = merged;
    let (sb, _) = RafsSuper::load_from_file(&boot_path, Arc::new(ConfigV2::default()), false)
        .map_err(|e| NydusError::Build(anyhow::anyhow!("reading the merged bootstrap: {e}")))?;
    let chunk_table = sb
        .superblock
        .get_blob_infos()
        .first()
        .map(|b| {
            let start = b.meta_ci_offset() as usize;
            start..start + b.meta_ci_compressed_size() as usize
        })
        .unwrap_or_default();
    let boot = fs::read(&boot_path)?;
    let boot_tar = layer::tar_bytes(&Layer {
        nodes: vec![Node::dir("image"), Node::file(BOOTSTRAP_PATH, boot)],
        compression: Compression::Gzip,
    })?;
    let bootstrap_layer = layer::compress(&boot_tar, Compression::Gzip)?;
    Ok(NydusImage {
        blob,
        blob_digest,
        bootstrap_layer,
        bootstrap_diff_id: sha256_digest(&boot_tar),
        chunk_table,
    })
}

/// Writes the nydus form of `spec` into `layout` (built in `work`); returns the manifest
/// descriptor JSON and digests like [`Layout::write_image`].
pub fn write_image(
    layout: &Layout,
    spec: &ImageSpec,
    work: &Path,
    opts: &BuildOptions,
) -> Result<(serde_json::Value, WrittenManifest), NydusError> {
    write_built(layout, spec, &build(spec, work, opts)?)
}

/// Writes `img`, built from `spec` by [`build`], into `layout`, like [`write_image`].
pub fn write_built(
    layout: &Layout,
    spec: &ImageSpec,
    img: &NydusImage,
) -> Result<(serde_json::Value, WrittenManifest), NydusError> {
    layout.put_blob(&img.blob)?;
    let boot_digest = layout.put_blob(&img.bootstrap_layer)?;
    let diff_ids = vec![img.blob_digest.clone(), img.bootstrap_diff_id.clone()];
    let cfg = json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": spec.architecture,
        "os": "linux",
        "config": {"Env": spec.env, "Cmd": spec.cmd},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let cfg_bytes = serde_json::to_vec(&cfg).map_err(std::io::Error::from)?;
    let cfg_digest = layout.put_blob(&cfg_bytes)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg_bytes.len()},
        "layers": [
            {"mediaType": BLOB_MEDIA_TYPE, "digest": img.blob_digest, "size": img.blob.len(),
             "annotations": {BLOB_ANNOTATION: "true"}},
            {"mediaType": Compression::Gzip.media_type(), "digest": boot_digest, "size": img.bootstrap_layer.len(),
             "annotations": {BOOTSTRAP_ANNOTATION: "true", FS_VERSION_ANNOTATION: "6"}},
        ],
    });
    let m = serde_json::to_vec(&manifest).map_err(std::io::Error::from)?;
    let digest = layout.put_blob(&m)?;
    Ok((
        json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": m.len(),
               "platform": {"architecture": spec.architecture, "os": "linux"}}),
        WrittenManifest {
            digest,
            config_digest: cfg_digest,
            layer_digests: vec![img.blob_digest.clone(), boot_digest],
            diff_ids,
        },
    ))
}

/// Scratch directory for building `name`'s nydus form under `work_dir`.
pub fn scratch_dir(work_dir: &Path, name: &str) -> PathBuf {
    work_dir.join("nydus").join(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::ImageSpec;

    /// Builds a one-file image and returns its data blob and the blob/chunk records of its
    /// (merged) bootstrap as nydus' reader sees them.
    fn built(opts: BuildOptions) -> (NydusImage, RafsSuper) {
        let dir = tempfile::tempdir().unwrap();
        let text = "secret file contents of the nydus test image\n".repeat(4096);
        let spec = ImageSpec::new(
            vec![Layer {
                nodes: vec![Node::dir("etc"), Node::file("etc/secret.txt", text)],
                compression: Compression::Gzip,
            }],
            &["/bin/true"],
        );
        let img = build(&spec, dir.path(), &opts).unwrap();
        let (rs, _) = RafsSuper::load_from_file(
            dir.path().join("image.merged.boot"),
            Arc::new(ConfigV2::default()),
            false,
        )
        .unwrap();
        (img, rs)
    }

    #[test]
    fn encrypted_blobs_tell_readers_their_chunks_are_encrypted() {
        let (img, rs) = built(BuildOptions {
            encrypt: true,
            ..Default::default()
        });
        let blobs = rs.superblock.get_blob_infos();
        assert_eq!(blobs.len(), 1);
        let b = &blobs[0];
        assert_eq!(b.blob_id(), img.blob_digest.trim_start_matches("sha256:"));
        // Readers decrypt only chunks whose (V2) chunk-table entry says so.
        assert!(b.has_feature(BlobFeatures::ENCRYPTED), "{:?}", b.features());
        assert!(
            b.has_feature(BlobFeatures::CHUNK_INFO_V2),
            "{:?}",
            b.features()
        );
        assert!(b.cipher_context().is_some(), "chunk key kept by the merge");
        let chunk = rs.superblock.get_chunk_info(0).unwrap();
        assert!(chunk.is_encrypted());
        // As nydus-image builds them: a CRC32 per chunk.
        assert!(chunk.has_crc32());
        assert!(!img.blob.windows(16).any(|w| w == &b"secret file cont"[..]));
        assert!(!img.chunk_table.is_empty() && img.chunk_table.end <= img.blob.len());
    }

    #[test]
    fn plain_blobs_keep_v1_chunk_tables_with_crc_and_a_toc() {
        let (img, rs) = built(BuildOptions::default());
        let b = &rs.superblock.get_blob_infos()[0];
        assert!(!b.has_feature(BlobFeatures::ENCRYPTED));
        assert!(!b.has_feature(BlobFeatures::CHUNK_INFO_V2));
        assert!(b.cipher_context().is_none());
        let chunk = rs.superblock.get_chunk_info(0).unwrap();
        assert!(!chunk.is_encrypted() && chunk.has_crc32());
        assert!(b.has_feature(BlobFeatures::INLINED_CHUNK_DIGEST));
        assert!(!img.blob.is_empty());
    }

    #[test]
    fn uncompressed_v2_blobs_hold_chunks_verbatim() {
        let (img, rs) = built(BuildOptions {
            uncompressed: true,
            chunk_info_v2: true,
            ..Default::default()
        });
        let b = &rs.superblock.get_blob_infos()[0];
        assert!(b.has_feature(BlobFeatures::CHUNK_INFO_V2));
        let chunk = rs.superblock.get_chunk_info(0).unwrap();
        assert!(!chunk.is_compressed() && chunk.has_crc32());
        assert!(img.blob.windows(16).any(|w| w == &b"secret file cont"[..]));
    }

    #[test]
    fn tarfs_images_index_the_tar_itself() {
        let (img, rs) = built(BuildOptions {
            tarfs: true,
            ..Default::default()
        });
        assert!(rs
            .meta
            .flags
            .contains(nydus_rafs::metadata::RafsSuperFlags::TARTFS_MODE));
        assert!(img.blob.windows(16).any(|w| w == &b"secret file cont"[..]));
        let b = &rs.superblock.get_blob_infos()[0];
        assert_eq!(b.blob_id(), img.blob_digest.trim_start_matches("sha256:"));
    }

    #[test]
    fn flatten_applies_whiteouts_and_opaque_dirs() {
        let lower = Layer {
            nodes: vec![
                Node::dir("a"),
                Node::file("a/x", "x"),
                Node::dir("b"),
                Node::file("b/y", "y"),
                Node::file("gone", "g"),
            ],
            compression: Compression::Gzip,
        };
        let upper = Layer {
            nodes: vec![
                Node::Opaque { dir: "a".into() },
                Node::file("a/z", "z"),
                Node::Whiteout {
                    path: "gone".into(),
                },
                Node::file("b/y", "y2"),
            ],
            compression: Compression::Gzip,
        };
        let flat = flatten(&[lower, upper]);
        let paths: Vec<String> = flat
            .nodes
            .iter()
            .map(|n| match n {
                Node::Dir { path, .. } | Node::File { path, .. } => path.clone(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(paths, ["a", "a/z", "b", "b/y"]);
        assert!(matches!(&flat.nodes[3], Node::File { data, .. } if data == b"y2"));
    }
}
