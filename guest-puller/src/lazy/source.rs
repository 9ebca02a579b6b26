//! Where nydus fetches a lazy image's chunks: the registry (or mirror) the manifest came from,
//! with the same plain-HTTP rules and credentials as the eager path.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use oci_client::Reference;
use serde::Deserialize;

use super::{BlobSource, LazyError};
use crate::config::RegistryConfig;

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

fn host_of(location: &str) -> &str {
    location.split('/').next().unwrap_or("")
}

fn normalize(k: &str) -> String {
    let k = k
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let k = k
        .strip_suffix("/v1")
        .or_else(|| k.strip_suffix("/v2"))
        .unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".into(),
        k => k.into(),
    }
}

/// Whether `host` is reached over plain HTTP under `rules` (the eager client's rule).
pub fn is_plain_http(rules: &RegistryConfig, host: &str) -> bool {
    rules.insecure_registries.iter().any(|h| h == host)
        || rules.registry.iter().any(|r| {
            (r.insecure && !r.location.is_empty() && host_of(&r.location) == host)
                || r.mirror
                    .iter()
                    .any(|m| m.insecure && host_of(&m.location) == host)
        })
}

/// Base64 `user:password` for `r` from a docker `auth.json` (exact repository, parent
/// namespaces, then the registry), as nydus' registry backend wants it.
pub fn auth_for(auth_json: Option<&[u8]>, r: &Reference) -> Result<Option<String>, LazyError> {
    let Some(raw) = auth_json else {
        return Ok(None);
    };
    let f: AuthFile = serde_json::from_slice(raw)
        .map_err(|_| LazyError::Config("registry credentials (auth.json) are malformed".into()))?;
    let creds: BTreeMap<String, String> = f
        .auths
        .into_iter()
        .filter_map(|(k, e)| {
            let basic = match (e.username, e.password, e.auth) {
                (Some(u), Some(p), _) => STANDARD.encode(format!("{u}:{p}")),
                (_, _, Some(a)) => a.trim().to_string(),
                _ => return None,
            };
            Some((normalize(&k), basic))
        })
        .collect();
    let host = normalize(r.registry());
    let mut path = format!("{host}/{}", r.repository());
    loop {
        if let Some(a) = creds.get(&path) {
            return Ok(Some(a.clone()));
        }
        match path.rsplit_once('/') {
            Some((parent, _)) => path = parent.to_string(),
            None => return Ok(None),
        }
    }
}

/// The blob source for the image fetched from `source`.
pub fn blob_source(
    rules: &RegistryConfig,
    auth_json: Option<&[u8]>,
    source: &Reference,
    retries: u32,
) -> Result<BlobSource, LazyError> {
    let host = source.resolve_registry().to_string();
    Ok(BlobSource {
        scheme: if is_plain_http(rules, source.registry()) || is_plain_http(rules, &host) {
            "http".into()
        } else {
            "https".into()
        },
        host,
        repo: source.repository().to_string(),
        auth: auth_for(auth_json, source)?,
        retry_limit: u8::try_from(retries).unwrap_or(u8::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RegistryMirror, RegistryRule};

    #[test]
    fn plain_http_follows_the_registry_rules() {
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
        };
        let r: Reference = "127.0.0.1:5000/guestpull/busybox:latest".parse().unwrap();
        let s = blob_source(&rules, None, &r, 3).unwrap();
        assert_eq!(
            (s.scheme.as_str(), s.host.as_str(), s.repo.as_str()),
            ("http", "127.0.0.1:5000", "guestpull/busybox")
        );
        assert!(is_plain_http(&rules, "mirror.local:5001"));
        let q: Reference = "quay.io/x/y:1".parse().unwrap();
        assert_eq!(blob_source(&rules, None, &q, 3).unwrap().scheme, "https");
    }

    #[test]
    fn credentials_by_repository_then_registry() {
        let json = br#"{"auths":{"reg.example":{"auth":"dTpw"},
            "reg.example/team/app":{"username":"a","password":"b"}}}"#;
        let app: Reference = "reg.example/team/app:1".parse().unwrap();
        let other: Reference = "reg.example/other:1".parse().unwrap();
        let none: Reference = "elsewhere.example/x:1".parse().unwrap();
        assert_eq!(
            auth_for(Some(json), &app).unwrap().as_deref(),
            Some(STANDARD.encode("a:b").as_str())
        );
        assert_eq!(
            auth_for(Some(json), &other).unwrap().as_deref(),
            Some("dTpw")
        );
        assert_eq!(auth_for(Some(json), &none).unwrap(), None);
        assert!(auth_for(Some(b"{"), &app).is_err());
    }
}
