//! [`ResourceFetcher`] over local files, inline data and the KBS (`kbs://`) via `kbs-client`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use zeroize::Zeroizing;

use crate::config::KbsConfig;
use crate::resource::{ResourceError, ResourceFetcher};

/// Fetches `file://` / absolute paths, `data:` URIs, inline values and `kbs://` resources.
pub struct KbsResourceFetcher {
    kbs: Option<kbs_client::Client>,
}

impl KbsResourceFetcher {
    /// Builds the fetcher; without `kbs.url`, `kbs://` URIs fail with a clear error.
    pub fn new(cfg: &KbsConfig) -> Result<Self, ResourceError> {
        Self::with_attestation(cfg, None, None)
    }

    /// Like [`Self::new`], sending `init_data` (the initdata TOML) in the attestation request and
    /// taking evidence from `evidence` (an attestation-agent) instead of the built-in attesters.
    pub fn with_attestation(
        cfg: &KbsConfig,
        init_data: Option<String>,
        evidence: Option<std::sync::Arc<dyn kbs_client::attester::EvidenceProvider>>,
    ) -> Result<Self, ResourceError> {
        let kbs = match &cfg.url {
            Some(url) => {
                let mut c = kbs_client::ClientConfig::new(url.clone());
                c.init_data = init_data;
                c.evidence = evidence;
                if let Some(cert) = &cfg.cert {
                    c.extra_ca_pem =
                        Some(
                            std::fs::read(cert).map_err(|e| ResourceError::Unconfigured {
                                uri: cert.display().to_string(),
                                reason: format!("reading KBS CA certificate: {e}"),
                            })?,
                        );
                }
                if let Some(pem) = &cfg.cert_pem {
                    c.extra_ca_pem = Some(pem.as_bytes().to_vec());
                }
                if let Some(t) = cfg.request_timeout_secs {
                    c.deadline = std::time::Duration::from_secs(t.max(1));
                    c.timeout = c.timeout.min(c.deadline);
                }
                if let Some(n) = cfg.max_response_bytes {
                    c.max_response_bytes = n.max(1);
                }
                Some(kbs_client::Client::new(c).map_err(|e| ResourceError::Kbs {
                    uri: url.clone(),
                    source: Box::new(e),
                })?)
            }
            None => None,
        };
        Ok(Self { kbs })
    }
}

#[async_trait::async_trait]
impl ResourceFetcher for KbsResourceFetcher {
    async fn fetch(&self, uri: &str) -> Result<Zeroizing<Vec<u8>>, ResourceError> {
        if uri.starts_with("kbs://") || uri.starts_with("kbs+") {
            let Some(kbs) = &self.kbs else {
                return Err(ResourceError::Unconfigured {
                    uri: uri.into(),
                    reason: "no KBS configured ([kbc] url or [kbs] url)".into(),
                });
            };
            let parsed: kbs_client::ResourceUri =
                uri.parse()
                    .map_err(|e: kbs_client::UriError| ResourceError::InvalidUri {
                        uri: uri.into(),
                        reason: e.to_string(),
                    })?;
            return kbs
                .get_resource(&parsed)
                .await
                .map_err(|e| ResourceError::Kbs {
                    uri: uri.into(),
                    source: Box::new(e),
                });
        }
        if let Some(path) = uri
            .strip_prefix("file://")
            .or_else(|| uri.starts_with('/').then_some(uri))
        {
            return tokio::fs::read(path)
                .await
                .map(Zeroizing::new)
                .map_err(|source| ResourceError::Io {
                    uri: uri.into(),
                    source,
                });
        }
        if let Some(rest) = uri.strip_prefix("data:") {
            let (meta, data) = rest
                .split_once(',')
                .ok_or_else(|| ResourceError::InvalidUri {
                    uri: "data:…".into(),
                    reason: "data URI without ','".into(),
                })?;
            return if meta.ends_with(";base64") {
                STANDARD
                    .decode(data.trim())
                    .map(Zeroizing::new)
                    .map_err(|e| ResourceError::InvalidUri {
                        uri: "data:…".into(),
                        reason: format!("base64: {e}"),
                    })
            } else {
                Ok(Zeroizing::new(data.as_bytes().to_vec()))
            };
        }
        if let Some((scheme, _)) = uri.split_once("://") {
            return Err(ResourceError::InvalidUri {
                uri: uri.into(),
                reason: format!("unsupported scheme {scheme:?} (use kbs://, file:// or data:)"),
            });
        }
        // Anything else is the resource itself, inline (e.g. a policy JSON in the config).
        Ok(Zeroizing::new(uri.as_bytes().to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_inline_and_errors() {
        let f = KbsResourceFetcher::new(&KbsConfig::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            &f.fetch(&format!("file://{}", p.display())).await.unwrap()[..],
            b"abc"
        );
        assert_eq!(&f.fetch(p.to_str().unwrap()).await.unwrap()[..], b"abc");
        assert_eq!(&f.fetch("data:;base64,YWJj").await.unwrap()[..], b"abc");
        assert_eq!(
            &f.fetch("{\"default\":[]}").await.unwrap()[..],
            b"{\"default\":[]}"
        );
        assert_eq!(
            f.fetch("file:///nonexistent/x").await.unwrap_err().kind(),
            crate::error::ErrorKind::NotFound
        );
        assert!(f.fetch("kbs:///default/key/x").await.is_err());
        assert!(matches!(
            f.fetch("ftp://x/y").await,
            Err(ResourceError::InvalidUri { .. })
        ));
    }
}
