//! Signature policy (containers-policy.json) evaluation.
//!
//! Semantics follow containers/image (podman, skopeo, CRI-O) rather than CoCo's image-rs, so a
//! policy written for those tools means the same here:
//! - the scope is looked up on the reference the *user asked for* (exact identity, repository,
//!   parent namespaces longest first, `*.domain` wildcards, the docker transport default `""`,
//!   then `default`), and every requirement of that scope must pass;
//! - an empty requirement list, an unknown field or type, or a malformed key makes the policy
//!   invalid instead of silently accepting;
//! - `signedBy` (GPG simple signing) reads signatures from the registries.d lookaside, over
//!   `file://` as well as `http(s)://`;
//! - `sigstoreSigned` verifies cosign key-based signatures from the `sha256-<hex>.sig` tag;
//!   `keyData` is base64 of the PEM key as in containers-policy.json(5), and raw PEM text is
//!   accepted too because CoCo policies (image-rs) put PEM there;
//! - the default `signedIdentity` is `matchRepoDigestOrExact` for both types. cosign signs the
//!   repository only (`docker-reference` without tag), so — exactly as in containers/image —
//!   cosign signatures need `matchRepository`/`exactRepository`; the rejection says so.
//! - a key, lookaside or registry that cannot be read fails the check; it never accepts.
//!
//! Keys named by URI are fetched through the [`ResourceFetcher`] on first use and cached for
//! the evaluator's lifetime (public keys only; they are not secrets).

mod config;
#[cfg(feature = "cosign")]
mod cosign;
#[cfg(feature = "gpg")]
mod gpg;
#[cfg(not(all(feature = "gpg", feature = "cosign")))]
mod not_built;
#[cfg(not(feature = "cosign"))]
use not_built as cosign;
#[cfg(not(feature = "gpg"))]
use not_built as gpg;
mod lookaside;
mod payload;
mod reference;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::resource::{ResourceError, ResourceFetcher};
use config::{KeySource, Policy, Requirement};
use reference::{DockerRef, SignedIdentity};

/// Annotation holding the base64 signature on a cosign signature layer.
pub const COSIGN_SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// Media type of a cosign "simple signing" payload layer.
pub const COSIGN_PAYLOAD_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";

/// Why a policy could not be loaded or an image was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// policy.json is malformed or uses something unsupported.
    #[error("invalid signature policy: {0}")]
    InvalidPolicy(String),
    /// The registries.d (lookaside) YAML is malformed.
    #[error("invalid registries.d (signature lookaside) configuration: {0}")]
    InvalidLookaside(String),
    /// The policy rejected the image: says which scope, which requirement and why.
    #[error("image {image} rejected by signature policy: scope {scope}, requirement #{index} ({rule}): {reason}")]
    Rejected {
        /// The reference as requested.
        image: String,
        /// The matching policy scope.
        scope: String,
        /// Index of the failing requirement in the scope's list.
        index: usize,
        /// Requirement type and the keys it trusts.
        rule: String,
        /// Why (which signatures were found and why each was refused).
        reason: String,
    },
    /// The policy could not be evaluated (key, lookaside or registry unreachable, bad key).
    #[error("cannot evaluate signature policy for image {image}: scope {scope}, requirement #{index} ({rule}): {cause}")]
    Evaluation {
        /// The reference as requested.
        image: String,
        /// The matching policy scope.
        scope: String,
        /// Index of the requirement being evaluated.
        index: usize,
        /// Requirement type and the keys it trusts.
        rule: String,
        /// The underlying failure.
        cause: Box<PolicyError>,
    },
    /// A `keyPath` could not be fetched.
    #[error("cannot fetch public key {uri}: {source}")]
    KeyFetch {
        /// The key URI.
        uri: String,
        /// The fetcher's error.
        #[source]
        source: ResourceError,
    },
    /// A fetched key is not a usable public key.
    #[error("invalid public key ({key}): {reason}")]
    InvalidKey {
        /// Where the key came from.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A lookaside signature could not be read (anything but "not found").
    #[error("cannot fetch signature {location}: {reason}")]
    SignatureFetch {
        /// URL of the signature.
        location: String,
        /// The failure.
        reason: String,
    },
    /// A [`SignatureSource`] failed to list or fetch cosign signatures.
    #[error("cannot fetch cosign signatures: {0}")]
    Registry(#[source] crate::registry::RegistryError),
}

impl PolicyError {
    /// True when the image was refused by the policy (as opposed to the policy, a key or a
    /// signature store being unusable); callers map this to "permission denied".
    pub fn is_rejection(&self) -> bool {
        matches!(self, PolicyError::Rejected { .. })
    }
}

/// A cosign signature as stored in the registry: the payload blob and its base64 signature.
#[derive(Debug, Clone)]
pub struct CosignSignature {
    /// Raw bytes of the `application/vnd.dev.cosign.simplesigning.v1+json` layer.
    pub payload: Vec<u8>,
    /// The `dev.cosignproject.cosign/signature` annotation of that layer.
    pub signature_b64: String,
}

/// Access to signatures stored in the registry (implemented by the puller's registry client).
#[async_trait::async_trait]
pub trait SignatureSource: Send + Sync {
    /// cosign: the manifest at tag `sha256-<hex>.sig` in the same repo; for each layer of media type
    /// application/vnd.dev.cosign.simplesigning.v1+json: (payload blob, annotation dev.cosignproject.cosign/signature).
    /// Returns an empty list when the tag does not exist; other failures are errors.
    async fn cosign_signatures(
        &self,
        image: &oci_client::Reference,
        manifest_digest: &str,
    ) -> Result<Vec<CosignSignature>, PolicyError>;
}

/// The tag under which cosign stores the signatures of `digest` (`sha256:ab…` → `sha256-ab….sig`).
pub fn cosign_signature_tag(digest: &str) -> String {
    format!("{}.sig", digest.replacen(':', "-", 1))
}

/// A loaded policy, ready to check images.
pub struct PolicyEvaluator {
    policy: Policy,
    lookaside: lookaside::Lookaside,
    fetcher: Arc<dyn ResourceFetcher>,
    http: reqwest::Client,
    keys: Mutex<HashMap<String, Arc<Vec<u8>>>>,
}

/// Outcome of one requirement.
enum Failure {
    Rejected(String),
    Error(PolicyError),
}

impl From<PolicyError> for Failure {
    fn from(e: PolicyError) -> Self {
        Failure::Error(e)
    }
}

impl PolicyEvaluator {
    /// policy.json bytes; `lookaside` = registries.d-style YAML (`default-docker: {lookaside|sigstore: URL}`,
    /// `docker: {<scope>: {lookaside|sigstore: URL}}`); keyPath URIs resolved through `fetcher`.
    pub fn from_json(
        policy: &[u8],
        lookaside: Option<&[u8]>,
        fetcher: Arc<dyn ResourceFetcher>,
    ) -> Result<Self, PolicyError> {
        let policy = config::parse_policy(policy).map_err(PolicyError::InvalidPolicy)?;
        check_capabilities(&policy)?;
        validate_inline_keys(&policy)?;
        let lookaside = match lookaside {
            Some(y) => lookaside::Lookaside::parse(y).map_err(PolicyError::InvalidLookaside)?,
            None => lookaside::Lookaside::default(),
        };
        Ok(PolicyEvaluator {
            policy,
            lookaside,
            fetcher,
            http: reqwest::Client::new(),
            keys: Mutex::new(HashMap::new()),
        })
    }

    /// Uses `client` for `http(s)://` lookaside signatures (e.g. one trusting extra root CAs).
    pub fn with_http_client(mut self, client: reqwest::Client) -> Self {
        self.http = client;
        self
    }

    /// Evaluate for the reference the USER asked for; manifest_digest = the platform manifest digest.
    pub async fn check(
        &self,
        image: &oci_client::Reference,
        manifest_digest: &str,
        registry: &dyn SignatureSource,
    ) -> Result<(), PolicyError> {
        self.check_with_list(image, manifest_digest, None, registry)
            .await
    }

    /// Like [`check`](Self::check), also accepting signatures made for the image index
    /// (`list_digest`) the platform manifest was selected from, as `skopeo copy --all --sign-by`
    /// and `cosign sign <index>` produce.
    pub async fn check_with_list(
        &self,
        image: &oci_client::Reference,
        manifest_digest: &str,
        list_digest: Option<&str>,
        registry: &dyn SignatureSource,
    ) -> Result<(), PolicyError> {
        let intended = DockerRef::from_requested(image);
        let (scope, reqs) = self.policy.requirements_for(&intended);
        let mut digests = vec![manifest_digest];
        if let Some(l) = list_digest.filter(|l| *l != manifest_digest) {
            digests.push(l);
        }
        for (index, req) in reqs.iter().enumerate() {
            let outcome = match req {
                Requirement::InsecureAcceptAnything => Ok(()),
                Requirement::Reject => Err(Failure::Rejected(
                    "the policy rejects every image in this scope".into(),
                )),
                Requirement::SignedBy { keys, identity } => {
                    self.check_signed_by(&intended, &digests, keys, identity)
                        .await
                }
                Requirement::SigstoreSigned { keys, identity } => {
                    self.check_sigstore(image, &intended, &digests, keys, identity, registry)
                        .await
                }
            };
            match outcome {
                Ok(()) => {}
                Err(Failure::Rejected(reason)) => {
                    let shown = image.whole();
                    tracing::warn!(image = %shown, %scope, index, rule = req.type_name(), %reason, "image rejected by signature policy");
                    return Err(PolicyError::Rejected {
                        image: shown,
                        scope,
                        index,
                        rule: req.describe(),
                        reason,
                    });
                }
                Err(Failure::Error(cause)) => {
                    return Err(PolicyError::Evaluation {
                        image: image.whole(),
                        scope,
                        index,
                        rule: req.describe(),
                        cause: Box::new(cause),
                    })
                }
            }
        }
        tracing::info!(image = %image.whole(), %manifest_digest, %scope, "image accepted by signature policy");
        Ok(())
    }

    async fn key_bytes(&self, src: &KeySource) -> Result<Arc<Vec<u8>>, PolicyError> {
        match src {
            KeySource::Inline { data, .. } => Ok(Arc::new(data.clone())),
            KeySource::Uri(uri) => {
                if let Some(k) = self.keys.lock().unwrap_or_else(|p| p.into_inner()).get(uri) {
                    return Ok(k.clone());
                }
                let fetched =
                    self.fetcher
                        .fetch(uri)
                        .await
                        .map_err(|source| PolicyError::KeyFetch {
                            uri: uri.clone(),
                            source,
                        })?;
                let bytes = Arc::new(fetched.to_vec());
                self.keys
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(uri.clone(), bytes.clone());
                Ok(bytes)
            }
        }
    }

    async fn check_signed_by(
        &self,
        intended: &DockerRef,
        digests: &[&str],
        keys: &[KeySource],
        identity: &SignedIdentity,
    ) -> Result<(), Failure> {
        let mut blobs = Vec::with_capacity(keys.len());
        for k in keys {
            blobs.push((k.describe(), self.key_bytes(k).await?));
        }
        let sources: Vec<(String, &[u8])> = blobs
            .iter()
            .map(|(d, b)| (d.clone(), b.as_slice()))
            .collect();
        let keyring = gpg::Keyring::load(&sources).map_err(|reason| PolicyError::InvalidKey {
            key: describe_all(keys),
            reason,
        })?;

        let mut signatures = Vec::new();
        let mut looked_in = Vec::new();
        for d in digests {
            match self.lookaside.fetch(&self.http, intended, d).await? {
                Some((dir, sigs)) => {
                    looked_in.push(dir);
                    signatures.extend(sigs);
                }
                None => {
                    return Err(Failure::Rejected(format!(
                        "a simple signature is required, but no signature lookaside is configured for {} \
                         (set default-docker or docker.<scope> lookaside in the registries.d configuration)",
                        intended.name
                    )))
                }
            }
        }
        if signatures.is_empty() {
            return Err(Failure::Rejected(format!(
                "a signature was required, but no signature exists (looked in {})",
                looked_in.join(", ")
            )));
        }
        let mut reasons = Vec::new();
        for sig in &signatures {
            let verdict = keyring.verify(&sig.bytes).and_then(|v| {
                let claims = payload::parse(&v.payload, payload::ATOMIC_TYPE)?;
                check_claims(&claims, intended, digests, identity)
                    .map_err(|e| format!("signed by key {}, but {e}", v.signer))
            });
            match verdict {
                Ok(()) => return Ok(()),
                Err(e) => reasons.push(format!("{}: {e}", sig.location)),
            }
        }
        Err(Failure::Rejected(summarize(reasons)))
    }

    async fn check_sigstore(
        &self,
        image: &oci_client::Reference,
        intended: &DockerRef,
        digests: &[&str],
        keys: &[KeySource],
        identity: &SignedIdentity,
        registry: &dyn SignatureSource,
    ) -> Result<(), Failure> {
        let mut trusted = Vec::with_capacity(keys.len());
        for k in keys {
            let pem = self.key_bytes(k).await?;
            let key =
                cosign::CosignKey::from_pem(&pem).map_err(|reason| PolicyError::InvalidKey {
                    key: k.describe(),
                    reason,
                })?;
            trusted.push((k.describe(), key));
        }
        let mut signatures = Vec::new();
        for d in digests {
            for s in registry.cosign_signatures(image, d).await? {
                signatures.push((cosign_signature_tag(d), s));
            }
        }
        if signatures.is_empty() {
            let tags: Vec<String> = digests.iter().map(|d| cosign_signature_tag(d)).collect();
            return Err(Failure::Rejected(format!(
                "a signature was required, but no cosign signature exists (tag {} in {})",
                tags.join(", "),
                intended.name
            )));
        }
        let mut reasons = Vec::new();
        for (n, (tag, sig)) in signatures.iter().enumerate() {
            let mut why = Vec::new();
            let verified = trusted.iter().find(|(desc, key)| {
                match key.verify(&sig.payload, &sig.signature_b64) {
                    Ok(()) => true,
                    Err(e) => {
                        why.push(format!("{desc} ({}): {e}", key.algorithm()));
                        false
                    }
                }
            });
            let verdict = match verified {
                None => Err(format!("not signed by a trusted key: {}", why.join("; "))),
                Some((desc, _)) => payload::parse(&sig.payload, payload::COSIGN_TYPE)
                    .and_then(|claims| check_claims(&claims, intended, digests, identity))
                    .map_err(|e| format!("signed by {desc}, but {e}")),
            };
            match verdict {
                Ok(()) => return Ok(()),
                Err(e) => reasons.push(format!("signature {} in {tag}: {e}", n + 1)),
            }
        }
        Err(Failure::Rejected(summarize(reasons)))
    }
}

/// The manifest digest and identity claimed by a verified payload must fit the image.
fn check_claims(
    claims: &payload::Claims,
    intended: &DockerRef,
    digests: &[&str],
    identity: &SignedIdentity,
) -> Result<(), String> {
    if !digests.contains(&claims.manifest_digest.as_str()) {
        return Err(format!(
            "the signature is for manifest {}, not for {} (the image being pulled)",
            claims.manifest_digest,
            digests.join(" or ")
        ));
    }
    if !identity.matches(intended, &claims.docker_reference) {
        let mut msg = format!(
            "the signed identity {:?} is not accepted by signedIdentity {} for {intended}",
            claims.docker_reference,
            identity.describe()
        );
        let name_only =
            DockerRef::parse_normalized(&claims.docker_reference).is_ok_and(|r| r.is_name_only());
        if name_only
            && matches!(
                identity,
                SignedIdentity::MatchExact
                    | SignedIdentity::MatchRepoDigestOrExact
                    | SignedIdentity::RemapIdentity { .. }
            )
        {
            msg.push_str(
                " (the signature names only a repository, as cosign does; such signatures need \
                 \"signedIdentity\": {\"type\": \"matchRepository\"} or exactRepository)",
            );
        }
        return Err(msg);
    }
    Ok(())
}

fn summarize(mut reasons: Vec<String>) -> String {
    if reasons.len() == 1 {
        reasons.remove(0)
    } else {
        format!(
            "none of the {} signatures was accepted: {}",
            reasons.len(),
            reasons.join("; ")
        )
    }
}

fn describe_all(keys: &[KeySource]) -> String {
    keys.iter()
        .map(KeySource::describe)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The refusal for a requirement whose signature scheme this build leaves out.
fn not_built(requirement: &str, feature: &str) -> String {
    format!(
        "{requirement} requirements need a guest-puller built with the `{feature}` feature \
         (this build leaves it out)"
    )
}

/// A policy whose requirements this build cannot check is refused when it is loaded, not when
/// the first image meets the requirement.
fn check_capabilities(policy: &Policy) -> Result<(), PolicyError> {
    let all = policy
        .default
        .iter()
        .chain(policy.docker.values().flatten());
    for req in all {
        let missing = match req {
            Requirement::SignedBy { .. } if !cfg!(feature = "gpg") => Some(("signedBy", "gpg")),
            Requirement::SigstoreSigned { .. } if !cfg!(feature = "cosign") => {
                Some(("sigstoreSigned", "cosign"))
            }
            _ => None,
        };
        if let Some((requirement, feature)) = missing {
            return Err(PolicyError::InvalidPolicy(not_built(requirement, feature)));
        }
    }
    Ok(())
}

/// Inline keys are part of the policy: a bad one makes the policy invalid up front.
fn validate_inline_keys(policy: &Policy) -> Result<(), PolicyError> {
    let all = policy
        .default
        .iter()
        .chain(policy.docker.values().flatten());
    for req in all {
        match req {
            Requirement::SignedBy { keys, .. } => {
                for k in keys {
                    if let KeySource::Inline { label, data } = k {
                        gpg::Keyring::load(&[(label.clone(), data.as_slice())]).map_err(|e| {
                            PolicyError::InvalidPolicy(format!("signedBy {label}: {e}"))
                        })?;
                    }
                }
            }
            Requirement::SigstoreSigned { keys, .. } => {
                for k in keys {
                    if let KeySource::Inline { label, data } = k {
                        cosign::CosignKey::from_pem(data).map_err(|e| {
                            PolicyError::InvalidPolicy(format!("sigstoreSigned {label}: {e}"))
                        })?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
