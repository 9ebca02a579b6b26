//! The pod's initdata as kata-agent leaves it: the TOML document it extracted from the initdata
//! device, written verbatim to `/run/confidential-containers/initdata/initdata.toml` (with
//! `aa.toml`, `cdh.toml` beside it). Its digest is what the host bound into the TEE at launch.

use std::path::{Path, PathBuf};

use kbs_client::protocol::{self, InitDataDigest};

/// Why the initdata could not be used.
#[derive(Debug, thiserror::Error)]
pub enum InitdataError {
    /// The file exists but cannot be read.
    #[error("reading initdata {path}: {source}")]
    Read {
        /// The initdata file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The document is not initdata kata-agent would have accepted.
    #[error("initdata {path}: {reason}")]
    Invalid {
        /// The initdata file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A pod's initdata document and its digest.
#[derive(Debug, Clone)]
pub struct Initdata {
    /// Where it was read.
    pub path: PathBuf,
    /// The document, byte for byte (the digest and the KBS both need the exact text).
    pub text: String,
    /// Its digest with the algorithm it declares.
    pub digest: InitDataDigest,
}

impl Initdata {
    /// Reads the initdata at `path`; `None` when the pod has none (kata-agent writes no file).
    pub fn load(path: &Path) -> Result<Option<Self>, InitdataError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(InitdataError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let invalid = |reason: String| InitdataError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let text = String::from_utf8(bytes).map_err(|_| invalid("not UTF-8".into()))?;
        let digest = protocol::init_data_digest(&text).map_err(invalid)?;
        Ok(Some(Self {
            path: path.to_owned(),
            text,
            digest,
        }))
    }

    /// The digest in hex, as logs and error messages show it.
    pub fn digest_hex(&self) -> String {
        hex::encode(&self.digest.digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    #[test]
    fn reads_the_document_verbatim_and_digests_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("initdata.toml");
        assert!(
            Initdata::load(&p).unwrap().is_none(),
            "no file, no initdata"
        );
        let text = "algorithm = \"sha256\"\nversion = \"0.1.0\"\n\n[data]\n\"cdh.toml\" = '''\n[kbc]\nname = \"cc_kbc\"\nurl = \"http://kbs\"\n'''\n";
        std::fs::write(&p, text).unwrap();
        let i = Initdata::load(&p).unwrap().unwrap();
        assert_eq!(i.text, text);
        assert_eq!(i.digest.algorithm, "sha256");
        assert_eq!(i.digest_hex(), hex::encode(sha2::Sha256::digest(text)));
        std::fs::write(&p, "algorithm = \"sha1\"\nversion = \"0.1.0\"\n").unwrap();
        let e = Initdata::load(&p).unwrap_err().to_string();
        assert!(e.contains("sha1") && e.contains("initdata.toml"), "{e}");
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        assert!(Initdata::load(&p)
            .unwrap_err()
            .to_string()
            .contains("UTF-8"));
    }
}
