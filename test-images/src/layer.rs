//! Deterministic layer tarballs: every header field is fixed, so the same spec gives the same digest.

use std::io::Write;

use sha2::{Digest, Sha256};

/// Modification time stamped on every entry (2024-01-01T00:00:00Z), for reproducible digests.
pub const EPOCH: u64 = 1_704_067_200;

/// One entry of a layer.
#[derive(Debug, Clone)]
pub enum Node {
    /// A directory with a mode.
    Dir { path: String, mode: u32 },
    /// A regular file.
    File {
        path: String,
        data: Vec<u8>,
        mode: u32,
        uid: u64,
        gid: u64,
    },
    /// A symbolic link to `target` (stored verbatim, may be absolute or dangling).
    Symlink { path: String, target: String },
    /// A hard link to an earlier entry `target` of the same layer.
    Hardlink { path: String, target: String },
    /// A character device node.
    CharDev {
        path: String,
        major: u32,
        minor: u32,
        mode: u32,
    },
    /// A named pipe.
    Fifo { path: String, mode: u32 },
    /// An OCI whiteout (`.wh.<name>`) deleting `path` from lower layers.
    Whiteout { path: String },
    /// An OCI opaque marker (`<dir>/.wh..wh..opq`) hiding everything below `dir` in lower layers.
    Opaque { dir: String },
    /// A regular file carrying extended attributes (PAX `SCHILY.xattr.*` records).
    XattrFile {
        path: String,
        data: Vec<u8>,
        xattrs: Vec<(String, Vec<u8>)>,
    },
}

impl Node {
    /// A root-owned regular file with mode 0644.
    pub fn file(path: &str, data: impl Into<Vec<u8>>) -> Node {
        Node::File {
            path: path.into(),
            data: data.into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        }
    }

    /// A directory with mode 0755.
    pub fn dir(path: &str) -> Node {
        Node::Dir {
            path: path.into(),
            mode: 0o755,
        }
    }

    /// A symbolic link.
    pub fn symlink(path: &str, target: &str) -> Node {
        Node::Symlink {
            path: path.into(),
            target: target.into(),
        }
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// `application/vnd.oci.image.layer.v1.tar+gzip`.
    Gzip,
    /// `application/vnd.oci.image.layer.v1.tar+zstd`.
    Zstd,
    /// `application/vnd.oci.image.layer.v1.tar`.
    None,
}

impl Compression {
    /// The OCI media type of a layer compressed this way.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
        }
    }
}

/// A layer: its entries, in order, and its compression.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Entries in tar order (parents before children).
    pub nodes: Vec<Node>,
    /// Blob compression.
    pub compression: Compression,
}

/// A built layer blob with the digests the manifest and config need.
#[derive(Debug, Clone)]
pub struct BuiltLayer {
    /// The compressed blob.
    pub blob: Vec<u8>,
    /// `sha256:` of the blob (manifest digest).
    pub digest: String,
    /// `sha256:` of the uncompressed tar (config diff_id).
    pub diff_id: String,
    /// Media type.
    pub media_type: &'static str,
}

fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(EPOCH);
    h.set_size(size);
    h
}

/// Serialises the entries of `layer` into an uncompressed tar stream.
pub fn tar_bytes(layer: &Layer) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    for n in &layer.nodes {
        match n {
            Node::Dir { path, mode } => {
                let mut h = header(tar::EntryType::Directory, *mode, 0, 0, 0);
                b.append_data(&mut h, format!("{}/", path.trim_end_matches('/')), &[][..])?;
            }
            Node::File {
                path,
                data,
                mode,
                uid,
                gid,
            } => {
                let mut h = header(
                    tar::EntryType::Regular,
                    *mode,
                    *uid,
                    *gid,
                    data.len() as u64,
                );
                b.append_data(&mut h, path, &data[..])?;
            }
            Node::Symlink { path, target } => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
                b.append_link(&mut h, path, target)?;
            }
            Node::Hardlink { path, target } => {
                let mut h = header(tar::EntryType::Link, 0o644, 0, 0, 0);
                b.append_link(&mut h, path, target)?;
            }
            Node::CharDev {
                path,
                major,
                minor,
                mode,
            } => {
                let mut h = header(tar::EntryType::Char, *mode, 0, 0, 0);
                h.set_device_major(*major)?;
                h.set_device_minor(*minor)?;
                b.append_data(&mut h, path, &[][..])?;
            }
            Node::Fifo { path, mode } => {
                let mut h = header(tar::EntryType::Fifo, *mode, 0, 0, 0);
                // Numeric zeros, as GNU tar writes: strict readers (nydus-builder) reject blanks.
                h.set_device_major(0)?;
                h.set_device_minor(0)?;
                b.append_data(&mut h, path, &[][..])?;
            }
            Node::Whiteout { path } => {
                let (dir, name) = match path.rsplit_once('/') {
                    Some((d, n)) => (format!("{d}/"), n),
                    None => (String::new(), path.as_str()),
                };
                let mut h = header(tar::EntryType::Regular, 0o644, 0, 0, 0);
                b.append_data(&mut h, format!("{dir}.wh.{name}"), &[][..])?;
            }
            Node::Opaque { dir } => {
                let mut h = header(tar::EntryType::Regular, 0o644, 0, 0, 0);
                b.append_data(
                    &mut h,
                    format!("{}/.wh..wh..opq", dir.trim_end_matches('/')),
                    &[][..],
                )?;
            }
            Node::XattrFile { path, data, xattrs } => {
                let recs: Vec<(String, &[u8])> = xattrs
                    .iter()
                    .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
                    .collect();
                b.append_pax_extensions(recs.iter().map(|(k, v)| (k.as_str(), *v)))?;
                let mut h = header(tar::EntryType::Regular, 0o644, 0, 0, data.len() as u64);
                b.append_data(&mut h, path, &data[..])?;
            }
        }
    }
    b.into_inner()
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Compresses `tar` deterministically (gzip header mtime 0, fixed levels).
pub fn compress(tar: &[u8], c: Compression) -> std::io::Result<Vec<u8>> {
    match c {
        Compression::None => Ok(tar.to_vec()),
        Compression::Gzip => {
            let mut e = flate2::GzBuilder::new()
                .mtime(0)
                .write(Vec::new(), flate2::Compression::new(6));
            e.write_all(tar)?;
            e.finish()
        }
        Compression::Zstd => zstd::stream::encode_all(tar, 3),
    }
}

/// Builds a layer blob and its digests.
pub fn build(layer: &Layer) -> std::io::Result<BuiltLayer> {
    let tar = tar_bytes(layer)?;
    let blob = compress(&tar, layer.compression)?;
    Ok(BuiltLayer {
        digest: sha256_digest(&blob),
        diff_id: sha256_digest(&tar),
        blob,
        media_type: layer.compression.media_type(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(c: Compression) -> Layer {
        Layer {
            nodes: vec![
                Node::dir("etc"),
                Node::file("etc/a", "a"),
                Node::symlink("etc/l", "a"),
                Node::Whiteout {
                    path: "etc/gone".into(),
                },
                Node::Opaque { dir: "var".into() },
            ],
            compression: c,
        }
    }

    #[test]
    fn same_spec_same_digest() {
        for c in [Compression::Gzip, Compression::Zstd, Compression::None] {
            let a = build(&sample(c)).unwrap();
            let b = build(&sample(c)).unwrap();
            assert_eq!(a.digest, b.digest);
            assert_eq!(a.diff_id, b.diff_id);
        }
    }

    #[test]
    fn whiteout_and_opaque_names() {
        let tar = tar_bytes(&sample(Compression::None)).unwrap();
        let mut ar = tar::Archive::new(&tar[..]);
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(names.contains(&"etc/.wh.gone".to_string()), "{names:?}");
        assert!(names.contains(&"var/.wh..wh..opq".to_string()), "{names:?}");
    }

    #[test]
    fn diff_id_is_uncompressed_digest() {
        let l = build(&sample(Compression::Gzip)).unwrap();
        let mut d = flate2::read::GzDecoder::new(&l.blob[..]);
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut d, &mut out).unwrap();
        assert_eq!(sha256_digest(&out), l.diff_id);
        assert_eq!(sha256_digest(&l.blob), l.digest);
    }
}
