//! Fetching configuration and key material named by URI (`kbs:///…`, `file://…`, inline data).
//!
//! The puller never reads secrets from anywhere else, so every module that needs a policy, a
//! public key or a KEK goes through [`ResourceFetcher`]; tests substitute a directory-backed one.

use zeroize::Zeroizing;

/// Why a resource could not be fetched; the message names the URI, never the content.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// The URI scheme or shape is not understood.
    #[error("invalid resource URI {uri:?}: {reason}")]
    InvalidUri { uri: String, reason: String },
    /// The KBS refused the request by policy.
    #[error("KBS policy denied access to {uri}")]
    Denied { uri: String },
    /// The resource does not exist (or the KBS backend failed to produce it).
    #[error("resource {uri} not found: {reason}")]
    NotFound { uri: String, reason: String },
    /// Any other failure of a remote source (network, attestation).
    #[error("fetching {uri} failed: {reason}")]
    Failed { uri: String, reason: String },
    /// The URI needs something the configuration does not provide (no KBS, unreadable CA).
    #[error("cannot fetch {uri}: {reason}")]
    Unconfigured { uri: String, reason: String },
    /// The KBS client failed; its error says how.
    #[error("fetching {uri} from the KBS: {source}")]
    Kbs {
        uri: String,
        /// Boxed: kbs-client's error is large and rare.
        #[source]
        source: Box<kbs_client::Error>,
    },
    /// A local file could not be read.
    #[error("reading {uri}: {source}")]
    Io {
        uri: String,
        #[source]
        source: std::io::Error,
    },
}

/// Source of resources named by URI; implemented over the KBS client and the local filesystem.
#[async_trait::async_trait]
pub trait ResourceFetcher: Send + Sync {
    /// Returns the raw bytes of the resource at `uri`.
    async fn fetch(&self, uri: &str) -> Result<Zeroizing<Vec<u8>>, ResourceError>;
}

/// Test doubles shared by the unit tests.
#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use std::collections::HashMap;

    /// Resources from a map; anything else is NOT_FOUND.
    #[derive(Default)]
    pub(crate) struct MapFetcher(pub HashMap<String, Vec<u8>>);

    #[async_trait::async_trait]
    impl ResourceFetcher for MapFetcher {
        async fn fetch(&self, uri: &str) -> Result<Zeroizing<Vec<u8>>, ResourceError> {
            self.0
                .get(uri)
                .map(|v| Zeroizing::new(v.clone()))
                .ok_or_else(|| ResourceError::NotFound {
                    uri: uri.into(),
                    reason: "absent".into(),
                })
        }
    }
}
