//! Simple-signing "lookaside" storage: where signatures live (registries.d YAML) and fetching
//! them from `file://` or `http(s)://` (containers/image docs/signature-protocols.md layout:
//! `<base>/<repo path>@<alg>=<hex>/signature-<n>`, n = 1, 2, … until the first missing one).

use std::collections::BTreeMap;

use kbs_client::error::error_chain;
use serde::Deserialize;

use super::reference::{namespaces, DockerRef};
use super::PolicyError;

/// Signatures larger than this are refused (containers/image uses the same 4 MiB bound).
const MAX_SIGNATURE_SIZE: usize = 4 << 20;
/// Safety stop for a lookaside that never returns "missing".
const MAX_SIGNATURES: usize = 256;

#[derive(Debug, Default, Deserialize)]
struct NamespaceConfig {
    lookaside: Option<String>,
    /// The pre-2022 name of `lookaside`.
    sigstore: Option<String>,
}

impl NamespaceConfig {
    fn read_url(&self) -> Option<&str> {
        self.lookaside
            .as_deref()
            .or(self.sigstore.as_deref())
            .filter(|s| !s.is_empty())
    }
}

#[derive(Debug, Default, Deserialize)]
struct RegistriesD {
    #[serde(rename = "default-docker")]
    default_docker: Option<NamespaceConfig>,
    docker: Option<BTreeMap<String, NamespaceConfig>>,
}

/// Parsed registries.d configuration (one YAML document).
#[derive(Debug, Default)]
pub(crate) struct Lookaside {
    config: RegistriesD,
}

/// One fetched, still untrusted signature and where it came from.
pub(crate) struct FetchedSignature {
    pub location: String,
    pub bytes: Vec<u8>,
}

impl Lookaside {
    /// Parses registries.d YAML; keys other than `lookaside`/`sigstore` (staging, attachments)
    /// are irrelevant for reading and ignored.
    pub fn parse(yaml: &[u8]) -> Result<Self, String> {
        if yaml.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        let config: RegistriesD = serde_yaml_ng::from_slice(yaml).map_err(|e| e.to_string())?;
        let urls = config
            .default_docker
            .iter()
            .chain(config.docker.iter().flat_map(|m| m.values()))
            .filter_map(NamespaceConfig::read_url);
        for u in urls {
            let parsed = url::Url::parse(u).map_err(|e| format!("lookaside URL {u:?}: {e}"))?;
            if !matches!(parsed.scheme(), "file" | "http" | "https") {
                return Err(format!(
                    "lookaside URL {u:?}: only file://, http:// and https:// are supported"
                ));
            }
        }
        Ok(Lookaside { config })
    }

    /// The base URL for `image` (exact identity, then namespaces, then `default-docker`).
    pub fn base_url(&self, image: &DockerRef) -> Option<&str> {
        if let Some(docker) = &self.config.docker {
            let identity = image.to_string();
            let candidates = std::iter::once(identity).chain(namespaces(image));
            for key in candidates {
                if let Some(u) = docker.get(&key).and_then(NamespaceConfig::read_url) {
                    return Some(u);
                }
            }
        }
        self.config
            .default_docker
            .as_ref()
            .and_then(NamespaceConfig::read_url)
    }

    /// Fetches every signature stored for `digest` of `image`; `Ok(None)` if no lookaside is
    /// configured for it.
    pub async fn fetch(
        &self,
        http: &reqwest::Client,
        image: &DockerRef,
        digest: &str,
    ) -> Result<Option<(String, Vec<FetchedSignature>)>, PolicyError> {
        let Some(base) = self.base_url(image) else {
            return Ok(None);
        };
        let (alg, hex) = digest.split_once(':').ok_or_else(|| {
            PolicyError::Registry(crate::registry::RegistryError::Unsupported {
                reference: image.path().to_string(),
                reason: format!("malformed manifest digest {digest:?}"),
            })
        })?;
        let dir = format!(
            "{}/{}@{alg}={hex}",
            base.trim_end_matches('/'),
            image.path()
        );
        let mut out = Vec::new();
        for n in 1..=MAX_SIGNATURES {
            let location = format!("{dir}/signature-{n}");
            match fetch_one(http, &location).await? {
                Some(bytes) => out.push(FetchedSignature { location, bytes }),
                None => break,
            }
        }
        Ok(Some((dir, out)))
    }
}

/// `Ok(None)` means "no such signature" (the end of the list).
async fn fetch_one(http: &reqwest::Client, location: &str) -> Result<Option<Vec<u8>>, PolicyError> {
    let fail = |reason: String| PolicyError::SignatureFetch {
        location: location.to_owned(),
        reason,
    };
    let url = url::Url::parse(location).map_err(|e| fail(e.to_string()))?;
    if url.scheme() == "file" {
        let path = url
            .to_file_path()
            .map_err(|_| fail("not a local file path".into()))?;
        let meta = match tokio::fs::metadata(&path).await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(fail(e.to_string())),
        };
        if meta.len() > MAX_SIGNATURE_SIZE as u64 {
            return Err(fail(format!("larger than {MAX_SIGNATURE_SIZE} bytes")));
        }
        return tokio::fs::read(&path)
            .await
            .map(Some)
            .map_err(|e| fail(e.to_string()));
    }
    let mut resp = http
        .get(url)
        .send()
        .await
        .map_err(|e| fail(error_chain(&e)))?;
    match resp.status() {
        reqwest::StatusCode::OK => {}
        // Some static servers answer 403 for missing objects (e.g. S3 without list rights);
        // containers/image treats only 404 as the end, and so do we.
        reqwest::StatusCode::NOT_FOUND => return Ok(None),
        s => return Err(fail(format!("HTTP status {s}"))),
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| fail(error_chain(&e)))? {
        if body.len() + chunk.len() > MAX_SIGNATURE_SIZE {
            return Err(fail(format!("larger than {MAX_SIGNATURE_SIZE} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(s: &str) -> DockerRef {
        DockerRef::from_requested(&s.parse().unwrap())
    }

    #[test]
    fn lookup_order() {
        let l = Lookaside::parse(
            br#"
default-docker:
  lookaside: https://default.example/sigs
docker:
  reg.io:5000/ns/app:v1:
    sigstore: file:///exact
  reg.io:5000/ns:
    lookaside: http://ns.example/s/
    lookaside-staging: file:///staging
  "*.corp.example":
    lookaside: https://wild.example
  reg.io:5000/empty:
    use-sigstore-attachments: true
"#,
        )
        .unwrap();
        assert_eq!(
            l.base_url(&img("reg.io:5000/ns/app:v1")),
            Some("file:///exact")
        );
        assert_eq!(
            l.base_url(&img("reg.io:5000/ns/app:v2")),
            Some("http://ns.example/s/")
        );
        assert_eq!(
            l.base_url(&img("a.corp.example/x/y")),
            Some("https://wild.example")
        );
        // a namespace entry without a lookaside URL falls through to the default
        assert_eq!(
            l.base_url(&img("reg.io:5000/empty:1")),
            Some("https://default.example/sigs")
        );
        assert_eq!(
            Lookaside::parse(b"").unwrap().base_url(&img("x.io/a")),
            None
        );
        assert!(Lookaside::parse(b"default-docker:\n  lookaside: ftp://x\n").is_err());
        assert!(Lookaside::parse(b"docker: [1, 2").is_err());
    }

    #[tokio::test]
    async fn fetches_numbered_signatures_from_a_directory() {
        let d = tempfile::tempdir().unwrap();
        let hex = "ab".repeat(32);
        let sigdir = d.path().join(format!("lab/app@sha256={hex}"));
        std::fs::create_dir_all(&sigdir).unwrap();
        std::fs::write(sigdir.join("signature-1"), b"one").unwrap();
        std::fs::write(sigdir.join("signature-2"), b"two").unwrap();
        std::fs::write(sigdir.join("signature-4"), b"after a gap: not read").unwrap();
        let yaml = format!(
            "default-docker:\n  lookaside: file://{}\n",
            d.path().display()
        );
        let l = Lookaside::parse(yaml.as_bytes()).unwrap();
        let (_, sigs) = l
            .fetch(
                &reqwest::Client::new(),
                &img("127.0.0.1:5000/lab/app:v1"),
                &format!("sha256:{hex}"),
            )
            .await
            .unwrap()
            .unwrap();
        let got: Vec<&[u8]> = sigs.iter().map(|s| &s.bytes[..]).collect();
        assert_eq!(got, vec![&b"one"[..], &b"two"[..]]);
        assert!(sigs[0]
            .location
            .ends_with(&format!("lab/app@sha256={hex}/signature-1")));
    }

    #[tokio::test]
    async fn http_errors_other_than_404_fail() {
        // Nothing listens on port 9 of localhost: a connection error must be an error, not "no signatures".
        let l = Lookaside::parse(b"default-docker:\n  lookaside: http://127.0.0.1:9/s\n").unwrap();
        let e = l
            .fetch(&reqwest::Client::new(), &img("x.io/a/b:1"), "sha256:00")
            .await;
        assert!(
            matches!(e, Err(PolicyError::SignatureFetch { .. })),
            "{:?}",
            e.err()
        );
    }
}
