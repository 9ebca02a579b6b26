//! Where nydus fetches a lazy image's chunks: the registry (or mirror) the manifest came from,
//! with the same plain-HTTP rules and credentials as the eager path.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use oci_client::Reference;

use super::BlobSource;
use crate::registry::RegistryClient;

/// The blob source for the image fetched from `source`: nydus' registry backend wants the
/// scheme, host, repository and base64 `user:password`.
pub fn blob_source(registry: &RegistryClient, source: &Reference, retries: u32) -> BlobSource {
    let host = source.resolve_registry().to_string();
    let scheme = if registry.is_plain_http(source.registry()) || registry.is_plain_http(&host) {
        "http"
    } else {
        "https"
    };
    BlobSource {
        scheme: scheme.into(),
        proxy: registry.proxy_for(scheme, &host).map(|u| u.to_string()),
        host,
        repo: source.repository().to_string(),
        auth: registry
            .basic_credentials(source)
            .map(|(u, p)| STANDARD.encode(format!("{u}:{p}"))),
        retry_limit: u8::try_from(retries).unwrap_or(u8::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RegistryConfig, RegistryMirror, RegistryRule};

    fn client(auth_json: Option<&[u8]>) -> RegistryClient {
        let rules = RegistryConfig {
            insecure_registries: vec!["127.0.0.1:5000".into()],
            registry: vec![RegistryRule {
                prefix: "docker.io".into(),
                mirror: vec![RegistryMirror {
                    location: "mirror.local:5001/lib".into(),
                    insecure: true,
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let limits = crate::registry::NetLimits {
            retries: 3,
            ..Default::default()
        };
        RegistryClient::new(rules, auth_json, &[], limits, Default::default()).unwrap()
    }

    #[test]
    fn plain_http_follows_the_registry_rules() {
        let c = client(None);
        let r: Reference = "127.0.0.1:5000/guestpull/busybox:latest".parse().unwrap();
        let s = blob_source(&c, &r, 3);
        assert_eq!(
            (s.scheme.as_str(), s.host.as_str(), s.repo.as_str()),
            ("http", "127.0.0.1:5000", "guestpull/busybox")
        );
        assert!(c.is_plain_http("mirror.local:5001"));
        let q: Reference = "quay.io/x/y:1".parse().unwrap();
        assert_eq!(blob_source(&c, &q, 3).scheme, "https");
    }

    #[test]
    fn credentials_by_repository_then_registry() {
        let json = br#"{"auths":{"reg.example":{"auth":"dTpw"},
            "reg.example/team/app":{"username":"a","password":"b"}}}"#;
        let c = client(Some(json));
        let auth = |r: &str| blob_source(&c, &r.parse().unwrap(), 3).auth;
        assert_eq!(auth("reg.example/team/app:1"), Some(STANDARD.encode("a:b")));
        assert_eq!(auth("reg.example/other:1").as_deref(), Some("dTpw"));
        assert_eq!(auth("elsewhere.example/x:1"), None);
    }
}
