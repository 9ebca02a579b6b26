//! Registry access over `oci-client`: reference rewriting (mirrors), docker `auth.json`
//! credentials, platform selection in image indexes, digest verification of every manifest,
//! config and blob, and retries with range resume.

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol, SizedStream};
use oci_client::errors::{OciDistributionError, OciEnvelope, OciErrorCode};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION};
use serde::Deserialize;
use sha2::{Digest as _, Sha256, Sha512};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::config::{ImageConfig, RegistryConfig};
use crate::error::ErrorKind;
use crate::proxy::PullProxy;
use kbs_client::error::error_chain;

/// Largest manifest or image config we accept.
pub const MAX_MANIFEST_SIZE: usize = 8 << 20;
/// Longest registry error body read (error envelopes are small; the rest is dropped).
const MAX_ERROR_BODY: usize = 64 << 10;

/// A boxed cause of a failed registry request.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Attempts and deadlines of registry requests.
#[derive(Debug, Clone, Copy)]
pub struct NetLimits {
    /// Attempts per request on 5xx or broken connections (at least 1).
    pub retries: u32,
    /// Deadline of one manifest, index, config or signature fetch, retries included.
    pub request_timeout: Duration,
    /// A blob transfer fails when no byte arrived for this long (across resumed attempts).
    pub stall_timeout: Duration,
}

impl Default for NetLimits {
    fn default() -> Self {
        Self {
            retries: 5,
            request_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(30),
        }
    }
}

impl NetLimits {
    /// The limits configured in `[image]`.
    pub fn from_config(cfg: &ImageConfig) -> Self {
        Self {
            retries: cfg.max_retries,
            request_timeout: Duration::from_secs(cfg.registry_request_timeout_secs.max(1)),
            stall_timeout: Duration::from_secs(cfg.registry_stall_timeout_secs.max(1)),
        }
    }
}

const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The image reference does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    /// The registry configuration blocks this reference.
    #[error("image {0} is blocked by the registry configuration")]
    Blocked(String),
    /// Content does not match its digest.
    #[error("{what} digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    /// Content is not something we can use.
    #[error("unsupported content for {reference}: {reason}")]
    Unsupported { reference: String, reason: String },
    /// The registry answered with an error or the connection failed (after retries).
    #[error("registry request for {reference} failed: {}", error_chain(source.as_ref()))]
    Request {
        reference: String,
        /// How the failure is classified (from the HTTP status, the registry's error codes
        /// or the transport error).
        kind: ErrorKind,
        #[source]
        source: BoxError,
    },
    /// The request's deadline passed (a stalled or trickling registry).
    #[error("registry request for {reference} timed out: {what} after {after:?}")]
    TimedOut {
        reference: String,
        what: String,
        after: Duration,
    },
    /// A response body is larger than its limit (read no further than the limit).
    #[error("{what} from {reference} is larger than the {limit}-byte limit")]
    TooLarge {
        reference: String,
        what: String,
        limit: usize,
    },
    /// The credentials file is malformed.
    #[error("invalid registry credentials (auth.json): {0}")]
    Credentials(String),
    /// The layer consumer went away (it failed; its error is the real one).
    #[error("layer consumer stopped")]
    ConsumerGone,
}

/// A digest algorithm named in a descriptor.
#[derive(Clone)]
pub enum Hasher {
    /// sha256.
    Sha256(Sha256),
    /// sha512.
    Sha512(Sha512),
}

impl Hasher {
    /// Hasher for `digest` (`sha256:`/`sha512:` prefix); `None` for other algorithms.
    pub fn for_digest(digest: &str) -> Option<Self> {
        match digest.split_once(':')?.0 {
            "sha256" => Some(Self::Sha256(Sha256::new())),
            "sha512" => Some(Self::Sha512(Sha512::new())),
            _ => None,
        }
    }
    /// Feeds bytes.
    pub fn update(&mut self, b: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(b),
            Self::Sha512(h) => h.update(b),
        }
    }
    /// Returns `algo:hex`.
    pub fn finish(self) -> String {
        match self {
            Self::Sha256(h) => format!("sha256:{}", hex::encode(h.finalize())),
            Self::Sha512(h) => format!("sha512:{}", hex::encode(h.finalize())),
        }
    }
}

/// Checks that `data` hashes to `expected`.
pub fn verify_digest(what: &str, data: &[u8], expected: &str) -> Result<(), RegistryError> {
    let mut h = Hasher::for_digest(expected).ok_or_else(|| RegistryError::Unsupported {
        reference: what.into(),
        reason: format!("digest algorithm of {expected:?}"),
    })?;
    h.update(data);
    let actual = h.finish();
    if actual != expected {
        return Err(RegistryError::DigestMismatch {
            what: what.into(),
            expected: expected.into(),
            actual,
        });
    }
    Ok(())
}

/// An image manifest resolved to the running platform, with its verified config.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// Where the image was actually fetched from (a mirror or the original), pinned by digest.
    pub source: Reference,
    /// The platform image manifest.
    pub manifest: OciImageManifest,
    /// Digest of the platform manifest.
    pub manifest_digest: String,
    /// Digest of the image index, when the reference named one.
    pub list_digest: Option<String>,
    /// Raw config JSON (digest-verified).
    pub config: Vec<u8>,
    /// Digest of the config.
    pub config_digest: String,
}

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize, Clone)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Normalizes an auth.json key or registry host to a comparable `host[/path]`.
fn normalize_auth_key(k: &str) -> String {
    let k = k
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let k = k.trim_end_matches('/');
    let k = k
        .strip_suffix("/v1")
        .or_else(|| k.strip_suffix("/v2"))
        .unwrap_or(k);
    let (host, rest) = k.split_once('/').map_or((k, ""), |(h, r)| (h, r));
    let host = match host {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io",
        h => h,
    };
    if rest.is_empty() {
        host.to_string()
    } else {
        format!("{host}/{rest}")
    }
}

/// Registry client shared by all pulls.
///
/// oci-client streams layers and obtains tokens; manifests, configs and signatures go
/// through `http` (same roots, same plain-HTTP list), since oci-client reads those bodies
/// whole before any size check.
pub struct RegistryClient {
    client: Client,
    http: reqwest::Client,
    creds: BTreeMap<String, (String, String)>,
    rules: RegistryConfig,
    plain_http: Vec<String>,
    retries: u32,
    limits: NetLimits,
}

/// An HTTP error answer of the registry (status and the start of its body).
#[derive(Debug, thiserror::Error)]
#[error("HTTP {status} from {url}: {detail}")]
pub struct HttpStatusError {
    /// The status code.
    pub status: u16,
    /// The request URL.
    pub url: String,
    /// The registry's error envelope, or the start of a non-JSON body.
    pub detail: String,
}

/// The kind of a registry HTTP status, refined by the distribution error codes of its body.
fn status_kind(status: u16, envelope: Option<&OciEnvelope>) -> ErrorKind {
    let by_code = envelope.and_then(|env| {
        env.errors.iter().find_map(|e| match e.code {
            OciErrorCode::ManifestUnknown
            | OciErrorCode::BlobUnknown
            | OciErrorCode::NameUnknown
            | OciErrorCode::NotFound
            | OciErrorCode::ManifestBlobUnknown => Some(ErrorKind::NotFound),
            OciErrorCode::Unauthorized | OciErrorCode::Denied => Some(ErrorKind::Denied),
            OciErrorCode::Toomanyrequests => Some(ErrorKind::Unavailable),
            _ => None,
        })
    });
    by_code.unwrap_or(match status {
        404 => ErrorKind::NotFound,
        401 | 403 => ErrorKind::Denied,
        _ => ErrorKind::Unavailable,
    })
}

/// The kind of an oci-client error, by its variant and the registry's error codes.
fn oci_kind(e: &OciDistributionError) -> ErrorKind {
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => ErrorKind::NotFound,
        OciDistributionError::ServerError { code, .. } => status_kind(*code, None),
        OciDistributionError::RegistryError { envelope, .. } => status_kind(400, Some(envelope)),
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => ErrorKind::Denied,
        OciDistributionError::RequestError(r) if r.is_timeout() => ErrorKind::TimedOut,
        OciDistributionError::DigestError(_) => ErrorKind::Integrity,
        _ => ErrorKind::Unavailable,
    }
}

/// One failed attempt of a small fetch.
struct Failed {
    kind: ErrorKind,
    source: BoxError,
    /// 5xx, 429 and transport failures; other answers are final.
    retry: bool,
}

impl Failed {
    fn transport(e: reqwest::Error) -> Self {
        let kind = if e.is_timeout() {
            ErrorKind::TimedOut
        } else {
            ErrorKind::Unavailable
        };
        Self {
            kind,
            source: Box::new(e),
            retry: true,
        }
    }
}

impl RegistryClient {
    /// Builds a client; `auth_json` is a docker config with `auths`, `extra_roots_pem` PEM bundles.
    pub fn new(
        rules: RegistryConfig,
        auth_json: Option<&[u8]>,
        extra_roots_pem: &[Vec<u8>],
        limits: NetLimits,
        proxy: PullProxy,
    ) -> Result<Self, RegistryError> {
        let mut creds = BTreeMap::new();
        if let Some(raw) = auth_json {
            let f: AuthFile = serde_json::from_slice(raw)
                .map_err(|e| RegistryError::Credentials(e.to_string()))?;
            for (k, e) in f.auths {
                let pair = if let (Some(u), Some(p)) = (e.username.clone(), e.password.clone()) {
                    Some((u, p))
                } else if let Some(a) = e.auth.as_deref() {
                    let dec = STANDARD.decode(a.trim()).map_err(|_| {
                        RegistryError::Credentials(format!("auth for {k} is not base64"))
                    })?;
                    let s = String::from_utf8(dec).map_err(|_| {
                        RegistryError::Credentials(format!("auth for {k} is not UTF-8"))
                    })?;
                    s.split_once(':')
                        .map(|(u, p)| (u.to_string(), p.to_string()))
                } else {
                    None
                };
                match pair {
                    Some(p) => {
                        creds.insert(normalize_auth_key(&k), p);
                    }
                    None => {
                        warn!(registry = %k, "auth.json entry without usable basic credentials ignored")
                    }
                }
            }
        }
        let mut plain: Vec<String> = rules.insecure_registries.clone();
        for r in &rules.registry {
            if r.insecure && !r.location.is_empty() {
                plain.push(r.location.split('/').next().unwrap_or("").to_string());
            }
            for m in &r.mirror {
                if m.insecure {
                    plain.push(m.location.split('/').next().unwrap_or("").to_string());
                }
            }
        }
        let certs = extra_roots_pem
            .iter()
            .map(|pem| oci_client::client::Certificate {
                encoding: oci_client::client::CertificateEncoding::Pem,
                data: pem.clone(),
            })
            .collect();
        let connect = limits.request_timeout.min(Duration::from_secs(30));
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain.clone()),
            extra_root_certificates: certs,
            platform_resolver: None,
            connect_timeout: Some(connect),
            read_timeout: Some(limits.stall_timeout),
            https_proxy: proxy.config().https_proxy.clone(),
            http_proxy: proxy.config().http_proxy.clone(),
            no_proxy: proxy.config().no_proxy.clone(),
            ..Default::default()
        };
        let mut http = reqwest::Client::builder()
            .connect_timeout(connect)
            .read_timeout(limits.stall_timeout)
            .redirect(reqwest::redirect::Policy::limited(5))
            .user_agent(concat!("guestpull/", env!("CARGO_PKG_VERSION")));
        if proxy.is_set() {
            let p = proxy.clone();
            http = http.proxy(reqwest::Proxy::custom(move |u| {
                p.for_target(u.scheme(), u.host_str().unwrap_or(""))
                    .cloned()
            }));
        }
        for pem in extra_roots_pem {
            let roots = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| RegistryError::Credentials(format!("extra root certificate: {e}")))?;
            http = http.tls_certs_merge(roots);
        }
        let http = http.build().map_err(|e| RegistryError::Request {
            reference: "registry client".into(),
            kind: ErrorKind::Internal,
            source: Box::new(e),
        })?;
        Ok(Self {
            client: Client::new(config),
            http,
            creds,
            rules,
            plain_http: plain,
            retries: limits.retries.max(1),
            limits,
        })
    }

    /// Parses a user-supplied reference (docker.io defaults, `:latest`).
    pub fn parse_reference(image: &str) -> Result<Reference, RegistryError> {
        reference::parse(image.trim()).map_err(|reason| RegistryError::InvalidReference {
            reference: image.into(),
            reason,
        })
    }

    /// Basic credentials for a reference: exact repository, parent namespaces, then the registry.
    pub fn basic_credentials(&self, r: &Reference) -> Option<(&str, &str)> {
        let host = normalize_auth_key(r.registry());
        let mut path = format!("{host}/{}", r.repository());
        loop {
            if let Some((u, p)) = self.creds.get(&path) {
                return Some((u, p));
            }
            match path.rsplit_once('/') {
                Some((parent, _)) => path = parent.to_string(),
                None => return None,
            }
        }
    }

    fn auth_for(&self, r: &Reference) -> RegistryAuth {
        match self.basic_credentials(r) {
            Some((u, p)) => RegistryAuth::Basic(u.into(), p.into()),
            None => RegistryAuth::Anonymous,
        }
    }

    /// Whether `host` is reached over plain HTTP (insecure registries and insecure rules/mirrors).
    pub fn is_plain_http(&self, host: &str) -> bool {
        self.plain_http.iter().any(|h| h == host)
    }

    /// Candidate sources for `r`: mirrors first, then the (possibly remapped) location.
    pub fn candidates(&self, r: &Reference) -> Result<Vec<Reference>, RegistryError> {
        let whole = format!("{}/{}", r.registry(), r.repository());
        let rule = self
            .rules
            .registry
            .iter()
            .filter(|rule| {
                let p = rule.prefix.trim_end_matches('/');
                !p.is_empty() && (whole == p || whole.starts_with(&format!("{p}/")))
            })
            .max_by_key(|rule| rule.prefix.len());
        let Some(rule) = rule else {
            return Ok(vec![r.clone()]);
        };
        if rule.blocked {
            return Err(RegistryError::Blocked(r.whole()));
        }
        let rest = &whole[rule.prefix.trim_end_matches('/').len()..];
        let rebuild = |loc: &str| -> Result<Reference, RegistryError> {
            let mut s = format!("{}{}", loc.trim_end_matches('/'), rest);
            if let Some(t) = r.tag() {
                s.push(':');
                s.push_str(t);
            }
            if let Some(d) = r.digest() {
                s.push('@');
                s.push_str(d);
            }
            Self::parse_reference(&s)
        };
        let mut out = Vec::new();
        for m in &rule.mirror {
            out.push(rebuild(&m.location)?);
        }
        if rule.location.is_empty() {
            out.push(r.clone());
        } else {
            out.push(rebuild(&rule.location)?);
        }
        Ok(out)
    }

    /// The `Authorization` oci-client negotiated for `r` (bearer token or basic credentials).
    async fn authorization(&self, r: &Reference) -> Result<Option<HeaderValue>, Failed> {
        let auth = self.auth_for(r);
        let token = self
            .client
            .auth(r, &auth, RegistryOperation::Pull)
            .await
            .map_err(|e| Failed {
                kind: oci_kind(&e),
                retry: crate::error::is_transient(oci_kind(&e)),
                source: Box::new(e),
            })?;
        let value = match (token, &auth) {
            (Some(t), _) => format!("Bearer {t}"),
            (None, RegistryAuth::Basic(u, p)) => {
                format!("Basic {}", STANDARD.encode(format!("{u}:{p}")))
            }
            (None, _) => return Ok(None),
        };
        let mut v = HeaderValue::from_str(&value).map_err(|e| Failed {
            kind: ErrorKind::Precondition,
            source: Box::new(e),
            retry: false,
        })?;
        v.set_sensitive(true);
        Ok(Some(v))
    }

    /// One GET of `url`, its body read while streaming and refused past `limit` bytes.
    async fn get_once(
        &self,
        r: &Reference,
        url: &str,
        accept: &str,
        limit: usize,
        what: &str,
    ) -> Result<(Vec<u8>, Option<String>), Failed> {
        let mut req = self.http.get(url).header(ACCEPT, accept);
        if let Some(a) = self.authorization(r).await? {
            req = req.header(AUTHORIZATION, a);
        }
        let mut resp = req.send().await.map_err(Failed::transport)?;
        let status = resp.status();
        let cap = if status.is_success() {
            limit
        } else {
            MAX_ERROR_BODY
        };
        let too_large = || Failed {
            kind: ErrorKind::ResourceExhausted,
            source: format!("{what} is larger than the {cap}-byte limit").into(),
            retry: false,
        };
        if resp.content_length().is_some_and(|n| n > cap as u64) && status.is_success() {
            return Err(too_large());
        }
        let digest = resp
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(Failed::transport)? {
            if body.len() + chunk.len() > cap {
                if !status.is_success() {
                    // Enough of an error body to say what went wrong.
                    break;
                }
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        if status.is_success() {
            return Ok((body, digest));
        }
        let envelope = serde_json::from_slice::<OciEnvelope>(&body).ok();
        let kind = status_kind(status.as_u16(), envelope.as_ref());
        let detail = match &envelope {
            Some(env) => env.to_string(),
            None => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        };
        Err(Failed {
            kind,
            retry: status.is_server_error() || status.as_u16() == 429,
            source: Box::new(HttpStatusError {
                status: status.as_u16(),
                url: url.to_string(),
                detail,
            }),
        })
    }

    /// GETs a small document of the registry (manifest, index, config, signature) within the
    /// request deadline, retrying transient failures; bodies are capped at `limit` bytes.
    async fn get_small(
        &self,
        r: &Reference,
        path: &str,
        accept: &str,
        limit: usize,
        what: &str,
    ) -> Result<(Vec<u8>, Option<String>), RegistryError> {
        let registry = r.resolve_registry();
        let scheme = if self.is_plain_http(registry) {
            "http"
        } else {
            "https"
        };
        let ns = r
            .namespace()
            .map(|ns| format!("?ns={ns}"))
            .unwrap_or_default();
        let url = format!("{scheme}://{registry}/v2/{}/{path}{ns}", r.repository());
        let deadline = Instant::now() + self.limits.request_timeout;
        let timed_out = |cause: Option<&BoxError>| RegistryError::TimedOut {
            reference: r.whole(),
            what: match cause {
                Some(c) => format!("fetching the {what} ({})", error_chain(c.as_ref())),
                None => format!("fetching the {what}"),
            },
            after: self.limits.request_timeout,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let once = self.get_once(r, &url, accept, limit, what);
            let failed = match tokio::time::timeout_at(deadline, once).await {
                Err(_) => return Err(timed_out(None)),
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(f)) => f,
            };
            if failed.kind == ErrorKind::ResourceExhausted {
                return Err(RegistryError::TooLarge {
                    reference: r.whole(),
                    what: what.into(),
                    limit,
                });
            }
            let delay = backoff(attempt);
            // Out of attempts, or of time for the next one: the last failure says why.
            if !failed.retry || attempt >= self.retries || Instant::now() + delay >= deadline {
                if failed.kind == ErrorKind::TimedOut {
                    return Err(timed_out(Some(&failed.source)));
                }
                return Err(RegistryError::Request {
                    reference: r.whole(),
                    kind: failed.kind,
                    source: failed.source,
                });
            }
            warn!(%what, reference = %r.whole(), attempt, "registry request failed, retrying: {}", failed.source);
            tokio::time::sleep(delay).await;
        }
    }

    async fn manifest_raw(&self, r: &Reference) -> Result<(Bytes, String), RegistryError> {
        let reference = r.digest().or(r.tag()).unwrap_or("latest");
        let (body, header_digest) = self
            .get_small(
                r,
                &format!("manifests/{reference}"),
                &MANIFEST_TYPES.join(", "),
                MAX_MANIFEST_SIZE,
                "manifest",
            )
            .await?;
        // A pinned reference is checked against its own digest, a tag against the header
        // (or, without one, the content names itself).
        let expected = match (r.digest(), header_digest) {
            (Some(d), _) => d.to_string(),
            (None, Some(h)) => h,
            (None, None) => format!("sha256:{}", hex::encode(Sha256::digest(&body))),
        };
        verify_digest(&format!("manifest {}", r.whole()), &body, &expected)?;
        Ok((Bytes::from(body), expected))
    }

    /// Resolves `r` (trying mirrors in order) to a platform manifest and config.
    pub async fn resolve(&self, r: &Reference) -> Result<ResolvedImage, RegistryError> {
        let mut last = None;
        for cand in self.candidates(r)? {
            match self.resolve_one(&cand).await {
                Ok(img) => return Ok(img),
                Err(e) => {
                    debug!(source = %cand.whole(), "candidate failed: {e}");
                    // Integrity failures are not masked by falling back to another source.
                    if matches!(e, RegistryError::DigestMismatch { .. }) {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Request {
            reference: r.whole(),
            kind: ErrorKind::Precondition,
            source: "no source configured".into(),
        }))
    }

    async fn resolve_one(&self, r: &Reference) -> Result<ResolvedImage, RegistryError> {
        let (body, digest) = self.manifest_raw(r).await?;
        let parsed: OciManifest =
            serde_json::from_slice(&body).map_err(|e| RegistryError::Unsupported {
                reference: r.whole(),
                reason: format!("manifest JSON: {e}"),
            })?;
        let (manifest, manifest_digest, list_digest) = match parsed {
            OciManifest::Image(m) => (m, digest, None),
            OciManifest::ImageIndex(idx) => {
                let chosen =
                    select_platform(&idx.manifests).ok_or_else(|| RegistryError::Unsupported {
                        reference: r.whole(),
                        reason: format!(
                            "image index has no manifest for {}/{}",
                            std::env::consts::OS,
                            go_arch()
                        ),
                    })?;
                let pinned = r.clone_with_digest(chosen.clone());
                let (body, d) = self.manifest_raw(&pinned).await?;
                match serde_json::from_slice::<OciManifest>(&body) {
                    Ok(OciManifest::Image(m)) => (m, d, Some(digest)),
                    _ => {
                        return Err(RegistryError::Unsupported {
                            reference: pinned.whole(),
                            reason: "index entry is not an image manifest".into(),
                        })
                    }
                }
            }
        };
        if manifest.schema_version != 2 {
            return Err(RegistryError::Unsupported {
                reference: r.whole(),
                reason: format!("schema version {}", manifest.schema_version),
            });
        }
        let source = r.clone_with_digest(manifest_digest.clone());
        let config = self
            .small_blob(&source, &manifest.config, "image config")
            .await?;
        Ok(ResolvedImage {
            source,
            config_digest: manifest.config.digest.clone(),
            manifest,
            manifest_digest,
            list_digest,
            config,
        })
    }

    /// Fetches a small blob (config, signature payload) and verifies its digest.
    pub async fn small_blob(
        &self,
        r: &Reference,
        desc: &OciDescriptor,
        what: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        if desc.size < 0 || desc.size as usize > MAX_MANIFEST_SIZE {
            return Err(RegistryError::Unsupported {
                reference: r.whole(),
                reason: format!("{what} size {} out of range", desc.size),
            });
        }
        let (data, _) = self
            .get_small(
                r,
                &format!("blobs/{}", desc.digest),
                "*/*",
                desc.size as usize,
                what,
            )
            .await?;
        verify_digest(&format!("{what} {}", desc.digest), &data, &desc.digest)?;
        Ok(data)
    }

    /// Streams a blob into `tx`, retrying broken transfers and resuming with a Range request
    /// where the registry allows. Stops at `desc.size` bytes; the consumer verifies the digest.
    pub async fn blob_to_channel(
        &self,
        r: &Reference,
        desc: &OciDescriptor,
        tx: mpsc::Sender<io::Result<Bytes>>,
    ) -> Result<(), RegistryError> {
        let size = u64::try_from(desc.size).unwrap_or(0);
        let auth = self.auth_for(r);
        self.client
            .store_auth_if_needed(r.resolve_registry(), &auth)
            .await;
        let mut offset: u64 = 0;
        let mut attempt = 0;
        // Retries resume a broken transfer, but a registry that sends nothing for the stall
        // timeout fails, however many attempts are left.
        let mut last_progress = Instant::now();
        loop {
            attempt += 1;
            let res = self.stream_once(r, desc, offset, size, &tx).await;
            match res {
                Ok(()) => return Ok(()),
                Err(StreamFail::Consumer) => return Err(RegistryError::ConsumerGone),
                Err(StreamFail::Io(progress, reason)) => {
                    if progress > offset {
                        last_progress = Instant::now();
                    }
                    offset = progress;
                    // A failure after every byte arrived is the digest check of oci-client's
                    // verifying stream: the consumer reports the mismatch, do not refetch.
                    if offset >= size && size > 0 {
                        return Ok(());
                    }
                    let stalled =
                        last_progress.elapsed() + backoff(attempt) >= self.limits.stall_timeout;
                    if attempt >= self.retries || stalled {
                        let e = if stalled {
                            RegistryError::TimedOut {
                                reference: format!("{}@{}", r.repository(), desc.digest),
                                what: format!(
                                    "no data at {offset} of {size} bytes ({attempt} attempts; {reason})"
                                ),
                                after: self.limits.stall_timeout,
                            }
                        } else {
                            RegistryError::Request {
                                reference: format!("{}@{}", r.repository(), desc.digest),
                                kind: ErrorKind::Unavailable,
                                source: format!(
                                    "{reason} (after {attempt} attempts, {offset} of {size} bytes)"
                                )
                                .into(),
                            }
                        };
                        let _ = tx
                            .send(Err(io::Error::new(
                                io::ErrorKind::BrokenPipe,
                                e.to_string(),
                            )))
                            .await;
                        return Err(e);
                    }
                    warn!(digest = %desc.digest, offset, attempt, "blob transfer failed, resuming: {reason}");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(StreamFail::Fatal(e)) => {
                    let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                    return Err(e);
                }
            }
        }
    }

    /// Opens a blob at `offset` (`len` bytes, or to its end): the stream and how many leading
    /// bytes to drop because the registry ignored the Range header. A whole-blob request when
    /// `offset` is 0 and no length is asked, so oci-client verifies its digest.
    async fn open_blob(
        &self,
        r: &Reference,
        desc: &OciDescriptor,
        offset: u64,
        len: Option<u64>,
    ) -> Result<(SizedStream, u64), StreamFail> {
        let stall = self.limits.stall_timeout;
        let open = async {
            if offset == 0 && len.is_none() {
                self.client
                    .pull_blob_stream(r, desc)
                    .await
                    .map(BlobResponse::Full)
            } else {
                self.client
                    .pull_blob_stream_partial(r, desc, offset, len)
                    .await
            }
        };
        let Ok(open) = tokio::time::timeout(stall, open).await else {
            return Err(StreamFail::Io(offset, format!("no answer for {stall:?}")));
        };
        match open {
            Ok(BlobResponse::Full(s)) => Ok((s, offset)),
            Ok(BlobResponse::Partial(s)) => Ok((s, 0)),
            Err(e) if retryable(&e) => Err(StreamFail::Io(offset, e.to_string())),
            Err(e) => Err(StreamFail::Fatal(RegistryError::Request {
                reference: format!("{}@{}", r.repository(), desc.digest),
                kind: oci_kind(&e),
                source: Box::new(e),
            })),
        }
    }

    async fn stream_once(
        &self,
        r: &Reference,
        desc: &OciDescriptor,
        offset: u64,
        size: u64,
        tx: &mpsc::Sender<io::Result<Bytes>>,
    ) -> Result<(), StreamFail> {
        let stall = self.limits.stall_timeout;
        let (mut stream, mut skip) = self.open_blob(r, desc, offset, None).await?;
        let mut pos = offset;
        loop {
            let Ok(item) = tokio::time::timeout(stall, stream.next()).await else {
                return Err(StreamFail::Io(pos, format!("no data for {stall:?}")));
            };
            let Some(item) = item else { break };
            let mut chunk = match item {
                Ok(c) => c,
                Err(e) => return Err(StreamFail::Io(pos, e.to_string())),
            };
            if skip > 0 {
                let n = skip.min(chunk.len() as u64);
                chunk = chunk.slice(n as usize..);
                skip -= n;
            }
            if chunk.is_empty() {
                continue;
            }
            if size > 0 && pos + chunk.len() as u64 > size {
                return Err(StreamFail::Fatal(RegistryError::Unsupported {
                    reference: desc.digest.clone(),
                    reason: format!("blob is larger than its descriptor size {size}"),
                }));
            }
            pos += chunk.len() as u64;
            if tx.send(Ok(chunk)).await.is_err() {
                return Err(StreamFail::Consumer);
            }
        }
        if size > 0 && pos < size {
            return Err(StreamFail::Io(pos, "connection closed early".into()));
        }
        Ok(())
    }

    /// Reads `len` bytes of a blob at `offset` (a lazy image's chunk range), retrying like a
    /// layer download. A registry that ignores the Range header is read up to the range and
    /// cut off. The bytes are not verified here: the caller checks them against the chunk
    /// digests of the signed bootstrap.
    pub async fn blob_range(
        &self,
        r: &Reference,
        desc: &OciDescriptor,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, RegistryError> {
        let reference = || format!("{}@{}", r.repository(), desc.digest);
        let size = u64::try_from(desc.size).unwrap_or(0);
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(RegistryError::Unsupported {
                reference: reference(),
                reason: format!("range {offset}+{len} is outside the blob's {size} bytes"),
            });
        }
        let auth = self.auth_for(r);
        self.client
            .store_auth_if_needed(r.resolve_registry(), &auth)
            .await;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let reason = match self.range_once(r, desc, offset, len).await {
                Ok(b) => return Ok(b),
                Err(StreamFail::Io(_, reason)) => reason,
                Err(StreamFail::Fatal(e)) => return Err(e),
                Err(StreamFail::Consumer) => return Err(RegistryError::ConsumerGone),
            };
            if attempt >= self.retries {
                return Err(RegistryError::Request {
                    reference: reference(),
                    kind: ErrorKind::Unavailable,
                    source: format!("{reason} (range {offset}+{len}, after {attempt} attempts)")
                        .into(),
                });
            }
            warn!(digest = %desc.digest, offset, len, attempt, "blob range failed, retrying: {reason}");
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    async fn range_once(
        &self,
        r: &Reference,
        desc: &OciDescriptor,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, StreamFail> {
        let stall = self.limits.stall_timeout;
        let (mut stream, mut skip) = self.open_blob(r, desc, offset, Some(len)).await?;
        // `len` is bounded by the caller (a chunk batch), so the buffer is too.
        let mut out = bytes::BytesMut::with_capacity(len as usize);
        while (out.len() as u64) < len {
            let Ok(item) = tokio::time::timeout(stall, stream.next()).await else {
                return Err(StreamFail::Io(0, format!("no data for {stall:?}")));
            };
            let Some(item) = item else {
                return Err(StreamFail::Io(0, "connection closed early".into()));
            };
            let mut chunk = item.map_err(|e| StreamFail::Io(0, e.to_string()))?;
            if skip > 0 {
                let n = skip.min(chunk.len() as u64);
                chunk = chunk.slice(n as usize..);
                skip -= n;
            }
            let want = (len - out.len() as u64).min(chunk.len() as u64) as usize;
            out.extend_from_slice(&chunk[..want]);
        }
        Ok(out.freeze())
    }

    /// cosign signatures of `manifest_digest`: (payload, base64 signature) per signature layer.
    pub async fn cosign_signatures(
        &self,
        source: &Reference,
        manifest_digest: &str,
    ) -> Result<Vec<(Vec<u8>, String)>, RegistryError> {
        if !manifest_digest.contains(':') {
            return Err(RegistryError::Unsupported {
                reference: source.whole(),
                reason: format!("digest {manifest_digest:?}"),
            });
        }
        let sig_ref = Reference::with_tag(
            source.registry().to_string(),
            source.repository().to_string(),
            crate::policy::cosign_signature_tag(manifest_digest),
        );
        let body = match self.manifest_raw(&sig_ref).await {
            Ok((body, _)) => body,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let m: OciImageManifest =
            serde_json::from_slice(&body).map_err(|e| RegistryError::Unsupported {
                reference: sig_ref.whole(),
                reason: format!("signature manifest: {e}"),
            })?;
        let mut out = Vec::new();
        for layer in &m.layers {
            if layer.media_type != crate::policy::COSIGN_PAYLOAD_MEDIA_TYPE {
                continue;
            }
            let Some(sig) = layer
                .annotations
                .as_ref()
                .and_then(|a| a.get(crate::policy::COSIGN_SIGNATURE_ANNOTATION))
            else {
                continue;
            };
            let payload = self
                .small_blob(&sig_ref, layer, "cosign signature payload")
                .await?;
            out.push((payload, sig.replace(['\n', '\r'], "")));
        }
        Ok(out)
    }
}

enum StreamFail {
    Io(u64, String),
    Fatal(RegistryError),
    Consumer,
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((200u64 << attempt.min(5)).min(5000))
}

fn retryable(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429,
        OciDistributionError::RequestError(r) => {
            r.is_connect()
                || r.is_timeout()
                || r.is_body()
                || r.is_request()
                || r.status().is_some_and(|s| s.is_server_error())
        }
        OciDistributionError::IoError(_) => true,
        _ => false,
    }
}

/// GOARCH name of the running machine.
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        other => other,
    }
}

/// Picks the index entry for linux/<arch> (arm64 prefers variant v8 or none).
fn select_platform(entries: &[oci_client::manifest::ImageIndexEntry]) -> Option<String> {
    let arch = go_arch();
    let os = std::env::consts::OS;
    let mut best: Option<(u8, String)> = None;
    for e in entries {
        let Some(p) = &e.platform else { continue };
        if p.os.to_string() != os || p.architecture.to_string() != arch {
            continue;
        }
        let variant = p.variant.as_deref().unwrap_or("");
        let score = match (arch, variant) {
            (_, "") => 2,
            ("arm64", "v8") => 3,
            ("arm", "v7") => 3,
            _ => 1,
        };
        if best.as_ref().is_none_or(|(s, _)| score > *s) {
            best = Some((score, e.digest.clone()));
        }
    }
    best.map(|(_, d)| d)
}

pub(crate) mod reference;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RegistryMirror, RegistryRule};

    #[test]
    fn credentials_by_repository_then_namespace_then_registry() {
        let json = br#"{"auths":{"reg.example":{"auth":"dTpw"},
            "reg.example/team/app":{"username":"a","password":"b"}}}"#;
        let c = RegistryClient::new(
            RegistryConfig::default(),
            Some(json),
            &[],
            NetLimits::default(),
            PullProxy::default(),
        )
        .unwrap();
        let creds = |r: &str| c.basic_credentials(&r.parse().unwrap());
        assert_eq!(creds("reg.example/team/app:1"), Some(("a", "b")));
        assert_eq!(creds("reg.example/team/app/sub:1"), Some(("a", "b")));
        assert_eq!(creds("reg.example/other:1"), Some(("u", "p")));
        assert_eq!(creds("elsewhere.example/x:1"), None);
    }

    #[test]
    fn auth_lookup_order_and_docker_aliases() {
        let auth = serde_json::json!({"auths": {
            "https://index.docker.io/v1/": {"auth": STANDARD.encode("hub:pw")},
            "reg.example/team": {"username": "team", "password": "tp"},
            "reg.example/team/app": {"auth": STANDARD.encode("app:ap")},
            "reg.example": {"auth": STANDARD.encode("root:rp")}
        }});
        let c = RegistryClient::new(
            RegistryConfig::default(),
            Some(auth.to_string().as_bytes()),
            &[],
            NetLimits::default(),
            PullProxy::default(),
        )
        .unwrap();
        let user = |s: &str| match c.auth_for(&s.parse().unwrap()) {
            RegistryAuth::Basic(u, _) => u,
            _ => "anon".into(),
        };
        assert_eq!(user("reg.example/team/app:1"), "app");
        assert_eq!(user("reg.example/team/other:1"), "team");
        assert_eq!(user("reg.example/x:1"), "root");
        assert_eq!(user("busybox"), "hub");
        assert_eq!(user("other.example/x"), "anon");
    }

    #[test]
    fn mirrors_come_first_and_blocked_is_refused() {
        let rules = RegistryConfig {
            insecure_registries: vec![],
            registry: vec![
                RegistryRule {
                    prefix: "docker.io/library".into(),
                    location: "".into(),
                    mirror: vec![RegistryMirror {
                        location: "127.0.0.1:5000/hub".into(),
                        insecure: true,
                    }],
                    ..Default::default()
                },
                RegistryRule {
                    prefix: "bad.example".into(),
                    blocked: true,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let c = RegistryClient::new(rules, None, &[], NetLimits::default(), PullProxy::default())
            .unwrap();
        let cands = c.candidates(&"busybox:1.36".parse().unwrap()).unwrap();
        assert_eq!(cands[0].whole(), "127.0.0.1:5000/hub/busybox:1.36");
        assert_eq!(cands[1].whole(), "docker.io/library/busybox:1.36");
        assert!(matches!(
            c.candidates(&"bad.example/x:1".parse().unwrap()),
            Err(RegistryError::Blocked(_))
        ));
    }

    #[test]
    fn registry_errors_are_classified_by_status_and_code() {
        let env = |code: &str| -> OciEnvelope {
            serde_json::from_value(serde_json::json!({"errors": [{"code": code, "message": "m"}]}))
                .unwrap()
        };
        // Registries answer MANIFEST_UNKNOWN with 404 or 400 alike.
        for code in ["MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "NAME_UNKNOWN"] {
            assert_eq!(
                status_kind(400, Some(&env(code))),
                ErrorKind::NotFound,
                "{code}"
            );
        }
        assert_eq!(status_kind(400, Some(&env("DENIED"))), ErrorKind::Denied);
        assert_eq!(status_kind(404, None), ErrorKind::NotFound);
        assert_eq!(status_kind(403, None), ErrorKind::Denied);
        assert_eq!(status_kind(503, None), ErrorKind::Unavailable);
        assert_eq!(
            status_kind(500, Some(&env("SOMETHING_ELSE"))),
            ErrorKind::Unavailable
        );
    }

    #[test]
    fn digest_verification() {
        let d = format!("sha256:{}", hex::encode(Sha256::digest(b"abc")));
        verify_digest("x", b"abc", &d).unwrap();
        assert!(verify_digest("x", b"abd", &d).is_err());
        assert!(verify_digest("x", b"abc", "md5:00").is_err());
    }
}
