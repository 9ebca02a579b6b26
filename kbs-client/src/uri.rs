//! `kbs[+plugin]://[host:port]/seg/.../seg[?query]` resource URIs (guest-components RESOURCE_URI grammar).
//!
//! Hand-parsed rather than via `url`: the grammar is tiny, and `url` treats non-special schemes
//! with an empty authority inconsistently, while we need exact, explainable errors.

use std::fmt;
use std::str::FromStr;

use crate::error::UriError;

/// The plugin served by plain `kbs://` URIs.
pub const RESOURCE_PLUGIN: &str = "resource";

/// A parsed KBS resource URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourceUri {
    plugin: String,
    authority: String,
    segments: Vec<String>,
    query: Option<String>,
}

/// Segment rule of the trustee resource plugin: `^[A-Za-z0-9_-]+[A-Za-z0-9_.-]*$`.
fn valid_segment(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() || c == '_' || c == '-' => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

impl ResourceUri {
    /// Parses a `kbs://` or `kbs+<plugin>://` URI, enforcing the reference segment rules.
    pub fn parse(s: &str) -> Result<Self, UriError> {
        let malformed = |reason: &str| UriError::Malformed {
            uri: s.to_string(),
            reason: reason.to_string(),
        };
        let path_err = |reason: String| UriError::Path {
            uri: s.to_string(),
            reason,
        };
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            malformed(
                "expected `kbs://<host:port>/<repo>/<type>/<tag>` or `kbs:///<repo>/<type>/<tag>`",
            )
        })?;
        let plugin = match scheme {
            "kbs" => RESOURCE_PLUGIN.to_string(),
            other => match other.strip_prefix("kbs+") {
                Some(p) if valid_segment(p) => p.to_string(),
                _ => {
                    return Err(UriError::Scheme {
                        uri: s.to_string(),
                        scheme: scheme.to_string(),
                    })
                }
            },
        };
        let (authority, path_and_query) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => return Err(malformed("no path after the authority")),
        };
        if authority.contains(['?', '#', ' ', '@']) {
            return Err(malformed("invalid characters in the authority"));
        }
        if path_and_query.contains('#') {
            return Err(malformed("fragments are not allowed"));
        }
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q.to_string())),
            None => (path_and_query, None),
        };
        let path = &path[1..];
        let segments: Vec<String> = path.split('/').map(str::to_string).collect();
        for seg in &segments {
            if seg.is_empty() {
                return Err(path_err(
                    "empty path segment (double or trailing `/`)".into(),
                ));
            }
            if !valid_segment(seg) {
                return Err(path_err(format!(
                    "segment {seg:?} must match ^[A-Za-z0-9_-]+[A-Za-z0-9_.-]*$"
                )));
            }
        }
        if plugin == RESOURCE_PLUGIN && segments.len() != 3 {
            return Err(path_err(format!(
                "the resource plugin needs exactly 3 segments <repo>/<type>/<tag>, got {}",
                segments.len()
            )));
        }
        Ok(Self {
            plugin,
            authority: authority.to_string(),
            segments,
            query,
        })
    }

    /// The segments joined by `/`: `repo/type/tag` for the resource plugin.
    pub fn path(&self) -> String {
        self.segments.join("/")
    }

    /// The KBS plugin (`resource` for plain `kbs://`).
    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    /// The `host:port` part; empty for `kbs:///…` (the configured KBS).
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The path segments.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// The query string without `?`, if any.
    pub fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }

    /// The request path below `/kbs/v0/`: `<plugin>/<segments>[?query]`.
    pub fn request_path(&self) -> String {
        match &self.query {
            Some(q) => format!("{}/{}?{}", self.plugin, self.path(), q),
            None => format!("{}/{}", self.plugin, self.path()),
        }
    }
}

impl FromStr for ResourceUri {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for ResourceUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.plugin == RESOURCE_PLUGIN {
            write!(f, "kbs://")?;
        } else {
            write!(f, "kbs+{}://", self.plugin)?;
        }
        write!(f, "{}/{}", self.authority, self.path())?;
        if let Some(q) = &self.query {
            write!(f, "?{q}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_empty_authority() {
        let u = ResourceUri::parse("kbs:///default/key/k1").unwrap();
        assert_eq!(u.path(), "default/key/k1");
        assert_eq!(u.plugin(), "resource");
        assert_eq!(u.authority(), "");
        assert_eq!(u.request_path(), "resource/default/key/k1");
        assert_eq!(u.to_string(), "kbs:///default/key/k1");
    }

    #[test]
    fn parses_authority_query_and_plugin() {
        let u: ResourceUri = "kbs://kbs.example:8080/my-repo/key/v1.2?version=3"
            .parse()
            .unwrap();
        assert_eq!(u.authority(), "kbs.example:8080");
        assert_eq!(u.path(), "my-repo/key/v1.2");
        assert_eq!(u.query(), Some("version=3"));
        assert_eq!(u.request_path(), "resource/my-repo/key/v1.2?version=3");
        assert_eq!(
            u.to_string(),
            "kbs://kbs.example:8080/my-repo/key/v1.2?version=3"
        );

        let p = ResourceUri::parse("kbs+pkcs11:///a/b").unwrap();
        assert_eq!(p.plugin(), "pkcs11");
        assert_eq!(p.request_path(), "pkcs11/a/b");
        assert_eq!(p.to_string(), "kbs+pkcs11:///a/b");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "default/key/k1",
            "http:///default/key/k1",
            "kbs+:///a/b/c",
            "kbs:///default/key",
            "kbs:///default/key/k1/extra",
            "kbs:///default//k1",
            "kbs:///default/key/",
            "kbs:///.hidden/key/k1",
            "kbs:///de fault/key/k1",
            "kbs:///a/../b",
            "kbs://host",
            "kbs:///a/b/c#frag",
        ] {
            assert!(ResourceUri::parse(bad).is_err(), "{bad} should be rejected");
        }
        let e = ResourceUri::parse("kbs:///default/key").unwrap_err();
        assert!(e.to_string().contains("exactly 3 segments"), "{e}");
        let e = ResourceUri::parse("https://x/a/b/c").unwrap_err();
        assert!(matches!(e, UriError::Scheme { .. }));
    }
}
