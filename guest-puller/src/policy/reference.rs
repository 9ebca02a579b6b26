//! Docker references as containers/image sees them for policy purposes: scope lookup keys and
//! `signedIdentity` matching.
//!
//! `oci_client::Reference` always adds the `latest` tag to a name-only reference, but the policy
//! semantics depend on telling `repo` (what cosign signs) from `repo:latest`, so signature
//! identities are parsed into [`DockerRef`], which keeps that distinction.

use oci_client::Reference;

/// A normalized docker reference (`docker.io/library/busybox`, not `busybox`), possibly name-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DockerRef {
    /// `domain/path`, fully expanded.
    pub name: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl DockerRef {
    /// Parses and normalizes like docker's `ParseNormalizedNamed` (short names get `docker.io`
    /// and `library/`), keeping a missing tag missing.
    pub fn parse_normalized(s: &str) -> Result<Self, String> {
        let parsed = crate::registry::reference::parse(s)
            .map_err(|e| format!("invalid docker reference {s:?}: {e}"))?;
        // The parser invents `latest` only when neither tag nor digest was written.
        let name_only =
            parsed.digest().is_none() && parsed.tag() == Some("latest") && !s.ends_with(":latest");
        Ok(DockerRef {
            name: format!("{}/{}", parsed.registry(), parsed.repository()),
            tag: if name_only {
                None
            } else {
                parsed.tag().map(str::to_owned)
            },
            digest: parsed.digest().map(str::to_owned),
        })
    }

    /// Parses a reference that must already be in its fully expanded form (docker's `ParseNamed`).
    pub fn parse_canonical(s: &str) -> Result<Self, String> {
        let r = Self::parse_normalized(s)?;
        if r.to_string() != s {
            return Err(format!(
                "docker reference {s:?} is not in its fully expanded form (it means {:?})",
                r.to_string()
            ));
        }
        Ok(r)
    }

    /// The identity of the image being pulled. A reference carrying both a tag and a digest is
    /// treated as its digest form: the digest is what gets pulled and verified, the tag cannot
    /// be (containers/image refuses such references outright; accepting them by digest keeps
    /// Kubernetes' `image:tag@sha256:…` pod specs working without weakening anything).
    pub fn from_requested(r: &Reference) -> Self {
        let digest = r.digest().map(str::to_owned);
        DockerRef {
            name: format!("{}/{}", r.registry(), r.repository()),
            tag: if digest.is_some() {
                None
            } else {
                r.tag().map(str::to_owned)
            },
            digest,
        }
    }

    pub fn is_name_only(&self) -> bool {
        self.tag.is_none() && self.digest.is_none()
    }

    /// The repository path inside the registry, without tag or digest (`library/busybox`).
    pub fn path(&self) -> &str {
        self.name.split_once('/').map_or("", |(_, p)| p)
    }
}

impl std::fmt::Display for DockerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Scopes that may match `r`, most specific first, after the exact identity: the repository,
/// its parent namespaces up to the host, then `*.domain` wildcards (port stripped), as in
/// containers/image `DockerReferenceNamespaces`.
pub(crate) fn namespaces(r: &DockerRef) -> Vec<String> {
    let mut out = Vec::new();
    let mut name = r.name.as_str();
    loop {
        out.push(name.to_owned());
        match name.rfind('/') {
            Some(i) => name = &name[..i],
            None => break,
        }
    }
    let mut host = name.rsplit_once(':').map_or(name, |(h, _)| h);
    while let Some(i) = host.find('.') {
        host = &host[i + 1..];
        out.push(format!("*.{host}"));
    }
    out
}

/// What identity a signature must claim (`signedIdentity` in policy.json).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SignedIdentity {
    MatchExact,
    MatchRepoDigestOrExact,
    MatchRepository,
    ExactReference(DockerRef),
    ExactRepository(DockerRef),
    RemapIdentity {
        prefix: String,
        signed_prefix: String,
    },
}

impl SignedIdentity {
    /// The policy.json spelling, for messages.
    pub fn describe(&self) -> String {
        match self {
            SignedIdentity::MatchExact => "matchExact".into(),
            SignedIdentity::MatchRepoDigestOrExact => "matchRepoDigestOrExact".into(),
            SignedIdentity::MatchRepository => "matchRepository".into(),
            SignedIdentity::ExactReference(r) => format!("exactReference {r}"),
            SignedIdentity::ExactRepository(r) => format!("exactRepository {}", r.name),
            SignedIdentity::RemapIdentity {
                prefix,
                signed_prefix,
            } => {
                format!("remapIdentity {prefix} -> {signed_prefix}")
            }
        }
    }

    /// Whether a signature claiming `signed` is acceptable for the image `intended`.
    pub fn matches(&self, intended: &DockerRef, signed: &str) -> bool {
        let Ok(signature) = DockerRef::parse_normalized(signed) else {
            return false;
        };
        match self {
            SignedIdentity::MatchExact => {
                !intended.is_name_only()
                    && !signature.is_name_only()
                    && intended.to_string() == signature.to_string()
            }
            SignedIdentity::MatchRepoDigestOrExact => repo_digest_or_exact(intended, &signature),
            SignedIdentity::MatchRepository => intended.name == signature.name,
            SignedIdentity::ExactReference(want) => {
                !signature.is_name_only() && want.to_string() == signature.to_string()
            }
            SignedIdentity::ExactRepository(want) => want.name == signature.name,
            SignedIdentity::RemapIdentity {
                prefix,
                signed_prefix,
            } => match remap(intended, prefix, signed_prefix) {
                Some(remapped) => repo_digest_or_exact(&remapped, &signature),
                None => false,
            },
        }
    }
}

fn repo_digest_or_exact(intended: &DockerRef, signature: &DockerRef) -> bool {
    if signature.is_name_only() {
        return false;
    }
    if intended.tag.is_some() {
        intended.to_string() == signature.to_string()
    } else if intended.digest.is_some() {
        // The digest itself is checked against the signed manifest digest separately.
        intended.name == signature.name
    } else {
        false
    }
}

/// Replaces `prefix` by `signed_prefix` in `intended` when it matches on a host, namespace or
/// repository boundary; `None` when the result is not a valid reference (which rejects).
fn remap(intended: &DockerRef, prefix: &str, signed_prefix: &str) -> Option<DockerRef> {
    let s = intended.to_string();
    let Some(rest) = s.strip_prefix(prefix) else {
        return Some(intended.clone());
    };
    if rest.is_empty() || !matches!(rest.as_bytes()[0], b'/' | b':' | b'@') {
        return Some(intended.clone());
    }
    DockerRef::parse_canonical(&format!("{signed_prefix}{rest}")).ok()
}

/// Validates a `remapIdentity` prefix: a host[:port], a namespace or a repository, fully
/// expanded, without tag or digest.
pub(crate) fn validate_prefix(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("prefix must not be empty".into());
    }
    if !p.contains('/') {
        let host = p.rsplit_once(':').map_or(p, |(h, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) && !port.is_empty() {
                h
            } else {
                p
            }
        });
        let ok = !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        return if ok {
            Ok(())
        } else {
            Err(format!("{p:?} is not a valid host[:port]"))
        };
    }
    // Namespaces such as `docker.io/library` are not references by themselves (docker would
    // expand that one to `docker.io/library/library`), so check that repositories below them are.
    if DockerRef::parse_canonical(&format!("{p}/x")).is_err() {
        return Err(format!(
            "{p:?} is not a fully expanded registry, namespace or repository without tag or digest"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn req(s: &str) -> DockerRef {
        DockerRef::from_requested(&s.parse().unwrap())
    }

    #[test]
    fn parse_keeps_name_only() {
        let r = DockerRef::parse_normalized("busybox").unwrap();
        assert_eq!(r.name, "docker.io/library/busybox");
        assert!(r.is_name_only());
        let r = DockerRef::parse_normalized("busybox:latest").unwrap();
        assert_eq!(r.tag.as_deref(), Some("latest"));
        let r = DockerRef::parse_normalized("127.0.0.1:5000/lab/busybox").unwrap();
        assert_eq!(r.path(), "lab/busybox");
        assert!(r.is_name_only());
        assert!(DockerRef::parse_canonical("busybox:1").is_err());
        assert!(DockerRef::parse_canonical("docker.io/library/busybox:1").is_ok());
    }

    #[test]
    fn requested_with_tag_and_digest_uses_digest() {
        let r = req(&format!("reg.io/a/b:1@{D}"));
        assert_eq!(r.to_string(), format!("reg.io/a/b@{D}"));
    }

    #[test]
    fn namespaces_like_containers_image() {
        let r = req("a.b.example.com:5000/ns/sub/repo:tag");
        assert_eq!(
            namespaces(&r),
            vec![
                "a.b.example.com:5000/ns/sub/repo",
                "a.b.example.com:5000/ns/sub",
                "a.b.example.com:5000/ns",
                "a.b.example.com:5000",
                "*.b.example.com",
                "*.example.com",
                "*.com",
            ]
        );
        assert_eq!(
            namespaces(&req("busybox")),
            vec![
                "docker.io/library/busybox",
                "docker.io/library",
                "docker.io",
                "*.io"
            ]
        );
    }

    #[test]
    fn identity_matching() {
        let tagged = req("reg.io/ns/app:v1");
        let digested = req(&format!("reg.io/ns/app@{D}"));
        use SignedIdentity::*;
        // matchExact
        assert!(MatchExact.matches(&tagged, "reg.io/ns/app:v1"));
        assert!(!MatchExact.matches(&tagged, "reg.io/ns/app:v2"));
        assert!(!MatchExact.matches(&digested, "reg.io/ns/app:v1"));
        assert!(MatchExact.matches(&digested, &format!("reg.io/ns/app@{D}")));
        // matchRepoDigestOrExact
        assert!(MatchRepoDigestOrExact.matches(&tagged, "reg.io/ns/app:v1"));
        assert!(!MatchRepoDigestOrExact.matches(&tagged, "reg.io/ns/app:v2"));
        assert!(MatchRepoDigestOrExact.matches(&digested, "reg.io/ns/app:whatever"));
        assert!(!MatchRepoDigestOrExact.matches(&digested, "reg.io/ns/other:v1"));
        // name-only signatures (what cosign writes) never satisfy the default
        assert!(!MatchRepoDigestOrExact.matches(&digested, "reg.io/ns/app"));
        assert!(!MatchRepoDigestOrExact.matches(&tagged, "reg.io/ns/app"));
        // matchRepository
        assert!(MatchRepository.matches(&tagged, "reg.io/ns/app"));
        assert!(MatchRepository.matches(&tagged, "reg.io/ns/app:v9"));
        assert!(!MatchRepository.matches(&tagged, "reg.io/ns/app2:v1"));
        // normalization: docker.io short names
        assert!(MatchRepoDigestOrExact.matches(&req("busybox"), "docker.io/library/busybox:latest"));
        assert!(MatchRepoDigestOrExact.matches(&req("busybox"), "busybox:latest"));
        // exactReference / exactRepository ignore the image's own identity
        let er = ExactReference(DockerRef::parse_normalized("vendor.io/p/app:1").unwrap());
        assert!(er.matches(&tagged, "vendor.io/p/app:1"));
        assert!(!er.matches(&tagged, "vendor.io/p/app:2"));
        assert!(!er.matches(&tagged, "vendor.io/p/app"));
        let erp = ExactRepository(DockerRef::parse_normalized("vendor.io/p/app").unwrap());
        assert!(erp.matches(&tagged, "vendor.io/p/app:7"));
        assert!(erp.matches(&tagged, "vendor.io/p/app"));
        assert!(!erp.matches(&tagged, "reg.io/ns/app:v1"));
        // garbage never matches
        assert!(!MatchRepository.matches(&tagged, "Not A Reference"));
    }

    #[test]
    fn remap_identity() {
        let remap = SignedIdentity::RemapIdentity {
            prefix: "mirror.io:5000/vendor-mirror".into(),
            signed_prefix: "vendor.example.com".into(),
        };
        let img = req("mirror.io:5000/vendor-mirror/product-a/image1:latest");
        assert!(remap.matches(&img, "vendor.example.com/product-a/image1:latest"));
        assert!(!remap.matches(&img, "vendor.example.com/product-a/image1:other"));
        assert!(!remap.matches(&img, "mirror.io:5000/vendor-mirror/product-a/image1:latest"));
        // no boundary: "vendor-mirror2" does not match the prefix, so no remapping happens
        let other = req("mirror.io:5000/vendor-mirror2/x:1");
        assert!(remap.matches(&other, "mirror.io:5000/vendor-mirror2/x:1"));
        let digested = req(&format!("mirror.io:5000/vendor-mirror/p/i@{D}"));
        assert!(remap.matches(&digested, "vendor.example.com/p/i:any"));
        assert!(validate_prefix("mirror.io:5000").is_ok());
        assert!(validate_prefix("docker.io/library").is_ok());
        assert!(validate_prefix("docker.io/library/busybox:1").is_err());
        assert!(validate_prefix("bad host!").is_err());
        assert!(validate_prefix("").is_err());
    }
}
