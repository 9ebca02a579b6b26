//! The RCAR client: handshake, token cache, resource fetch with the error policy of the issue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kbs_types::{Attestation, Challenge, CompositeEvidence, RuntimeData};
use rand_core::{OsRng, RngCore};
use reqwest::header::AUTHORIZATION;
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use crate::attester::{self, LaunchSecrets};
use crate::config::{ClientConfig, Mode, Tee};
use crate::error::{error_chain, Error};
use crate::jwe;
use crate::keys::TeeKeyPair;
use crate::protocol::{self, KbsError, ResourceAction};
use crate::token::Token;
use crate::uri::ResourceUri;

/// A KBS client. Cheap to clone; clones share the TEE key, the token cache and the session.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// Where evidence comes from.
enum Source {
    /// A built-in attester for this TEE.
    Builtin(Tee),
    /// `cfg.evidence` (e.g. an attestation-agent).
    External(Arc<dyn attester::EvidenceProvider>),
}

struct Inner {
    cfg: ClientConfig,
    base: String,
    http: reqwest::Client,
    source: Source,
    key: TeeKeyPair,
    launch: Option<LaunchSecrets>,
    /// Serializes handshakes so concurrent callers share one attestation.
    token: tokio::sync::Mutex<Option<Token>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.inner.base)
            .field("tee", &self.tee())
            .field("key", &self.inner.key)
            .finish()
    }
}

/// Whether a send error is a certificate rejection, which no retry can fix.
fn is_certificate_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        // hyper-rustls nests rustls's error in io::Errors, whose source() skips the wrapped
        // error itself, so unwrap those explicitly.
        let mut cand = Some(c);
        while let Some(x) = cand {
            if let Some(tls) = x.downcast_ref::<rustls::Error>() {
                return matches!(
                    tls,
                    rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
                );
            }
            cand = x
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .map(|inner| inner as &(dyn std::error::Error + 'static));
        }
        cur = c.source();
    }
    false
}

impl Client {
    /// Builds a client: validates the configuration, picks the TEE and generates the TEE key.
    pub fn new(cfg: ClientConfig) -> Result<Self, Error> {
        let parsed = reqwest::Url::parse(&cfg.url)
            .map_err(|e| Error::Config(format!("KBS URL {:?}: {e}", cfg.url)))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Error::Config(format!(
                "KBS URL {:?} must be http:// or https://",
                cfg.url
            )));
        }
        let base = cfg.url.trim_end_matches('/').to_string();
        if cfg.retry.max_attempts == 0 {
            return Err(Error::Config(
                "retry.max_attempts must be at least 1".into(),
            ));
        }
        let mut b = reqwest::Client::builder()
            .cookie_store(true)
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("guestpull-kbs-client/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &cfg.extra_ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| Error::Config(format!("extra CA certificate: {}", error_chain(&e))))?;
            if certs.is_empty() {
                return Err(Error::Config("extra CA PEM holds no certificate".into()));
            }
            b = b.tls_certs_merge(certs);
        }
        if let Some(p) = &cfg.proxy {
            let proxy = reqwest::Proxy::all(p)
                .map_err(|e| Error::Config(format!("proxy {p:?}: {}", error_chain(&e))))?;
            b = b.proxy(proxy);
        }
        let http = b
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {}", error_chain(&e))))?;

        let source = match &cfg.evidence {
            Some(p) => Source::External(p.clone()),
            None => Source::Builtin(attester::detect(&cfg.hw_paths, cfg.tee)),
        };
        let (key, token) =
            match &cfg.mode {
                Mode::Passport {
                    token,
                    tee_key_pem: Some(pem),
                } => {
                    let key = TeeKeyPair::from_pkcs8_pem(pem)?;
                    let token = match token {
                        Some(t) => Some(
                            Token::parse(t)
                                .map_err(|e| Error::Config(format!("passport token: {e}")))?,
                        ),
                        None => None,
                    };
                    (key, token)
                }
                Mode::Passport {
                    token: Some(_),
                    tee_key_pem: None,
                } => return Err(Error::Config(
                    "a passport token needs the TEE private key it was issued for (tee_key_pem)"
                        .into(),
                )),
                _ => (TeeKeyPair::generate(cfg.key_algorithm)?, None),
            };
        let launch = matches!(source, Source::Builtin(Tee::Sev))
            .then(|| LaunchSecrets::new(&cfg.hw_paths.efi_secrets_dir));
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                base,
                http,
                source,
                key,
                launch,
                token: tokio::sync::Mutex::new(token),
            }),
        })
    }

    /// The built-in TEE in use (configured or detected); `None` with an external evidence provider.
    pub fn tee(&self) -> Option<Tee> {
        match self.inner.source {
            Source::Builtin(t) => Some(t),
            Source::External(_) => None,
        }
    }

    /// The KBS base URL.
    pub fn url(&self) -> &str {
        &self.inner.base
    }

    /// The TEE key pair (to hand over with a passport token; the private key never leaves otherwise).
    pub fn tee_key(&self) -> &TeeKeyPair {
        &self.inner.key
    }

    /// Returns a valid token, attesting only when none is cached or it is about to expire.
    pub async fn attest(&self) -> Result<Token, Error> {
        self.token(None).await
    }

    /// Fetches and decrypts a resource. Attests first if needed; re-attests at most once.
    pub async fn get_resource(&self, uri: &ResourceUri) -> Result<Zeroizing<Vec<u8>>, Error> {
        if let Some(ls) = &self.inner.launch {
            return ls.get(uri);
        }
        if !uri.authority().is_empty() {
            // As in CDH: the KBS is a property of the guest's configuration, not of the image
            // that names the key, so the authority is informative only.
            debug!(authority = uri.authority(), kbs = %self.inner.base, "ignoring KBS authority in resource URI");
        }
        let path = uri.path();
        let url = format!("{}/kbs/v0/{}", self.inner.base, uri.request_path());
        let mut reattested = false;
        loop {
            let token = self.token(None).await?;
            let passport = matches!(self.inner.cfg.mode, Mode::Passport { .. });
            let resp = self
                .send(|| {
                    let rb = self.inner.http.get(&url);
                    if passport {
                        rb.header(AUTHORIZATION, format!("Bearer {}", token.as_str()))
                    } else {
                        rb
                    }
                })
                .await?;
            let status = resp.status();
            let body = resp.bytes().await.map_err(|e| Error::Protocol {
                url: self.inner.base.clone(),
                detail: format!("reading the response for {path}: {}", error_chain(&e)),
            })?;
            if status.is_success() {
                debug!(path = %path, bytes = body.len(), "resource received");
                return jwe::decrypt(&body, &self.inner.key).map_err(|e| Error::Decrypt {
                    path: path.clone(),
                    detail: e.to_string(),
                });
            }
            let err = protocol::parse_error(status.as_u16(), &body);
            match protocol::resource_action(&err) {
                ResourceAction::Reattest if !reattested => {
                    info!(path = %path, kind = err.kind.name(), "KBS refused the token; attesting again once");
                    reattested = true;
                    self.token(Some(&token)).await?;
                }
                ResourceAction::Reattest => {
                    return Err(Error::Unauthorized {
                        url: self.inner.base.clone(),
                        path,
                        kind: err.kind.name().to_string(),
                        detail: err.detail,
                    })
                }
                ResourceAction::PolicyDeny => {
                    return Err(Error::PolicyDeny {
                        url: self.inner.base.clone(),
                        path,
                        detail: err.detail,
                    })
                }
                ResourceAction::NotFound => {
                    return Err(Error::ResourceNotFound {
                        url: self.inner.base.clone(),
                        path,
                        detail: err.detail,
                    })
                }
                ResourceAction::InvalidPath => {
                    return Err(Error::InvalidPath {
                        url: self.inner.base.clone(),
                        path,
                        kind: err.kind.name().to_string(),
                        detail: err.detail,
                    })
                }
                ResourceAction::Retry | ResourceAction::Fatal => {
                    return Err(self.protocol_err(&err))
                }
            }
        }
    }

    fn protocol_err(&self, err: &KbsError) -> Error {
        Error::Protocol {
            url: self.inner.base.clone(),
            detail: format!("HTTP {} {}: {}", err.status, err.kind.name(), err.detail),
        }
    }

    /// The cached token, or a fresh one when there is none, it is near `exp`, or it is `stale`.
    async fn token(&self, stale: Option<&Token>) -> Result<Token, Error> {
        let mut guard = self.inner.token.lock().await;
        if let Some(t) = guard.as_ref() {
            let is_stale = stale.is_some_and(|s| s.as_str() == t.as_str());
            if !is_stale && !t.needs_refresh(self.inner.cfg.refresh_margin) {
                return Ok(t.clone());
            }
            debug!(exp = ?t.exp(), stale = is_stale, "replacing attestation token");
        }
        *guard = None;
        let t = self.handshake().await?;
        *guard = Some(t.clone());
        Ok(t)
    }

    /// One RCAR handshake: `/auth` → evidence → `/attest`.
    async fn handshake(&self) -> Result<Token, Error> {
        let started = Instant::now();
        let (tee_name, wire_tee) = match &self.inner.source {
            Source::External(p) => {
                let t = p.tee().await?;
                (format!("{t:?} (external evidence)"), t)
            }
            Source::Builtin(tee) => (
                tee.to_string(),
                tee.wire().ok_or_else(|| {
                    Error::Unsupported(format!(
                        "{tee} has no runtime attestation; only launch secrets are available"
                    ))
                })?,
            ),
        };
        let base = &self.inner.base;
        let auth_url = format!("{base}/kbs/v0/auth");
        let request = protocol::auth_request(wire_tee);
        let resp = self
            .send(|| self.inner.http.post(&auth_url).json(&request))
            .await?;
        let challenge: Challenge = self.json_or_attestation_error(resp, "auth").await?;
        let hash = protocol::selected_hash(&challenge).map_err(|detail| Error::Attestation {
            url: base.clone(),
            detail,
        })?;

        let tee_pubkey = self.inner.key.public_jwk();
        let report_data = protocol::report_data(hash, &challenge.nonce, &tee_pubkey, "");
        let evidence = match &self.inner.source {
            Source::External(p) => p.primary_evidence(report_data).await?,
            Source::Builtin(tee) => {
                attester::evidence(*tee, &self.inner.cfg.hw_paths, report_data).await?
            }
        };
        let attestation = Attestation {
            init_data: self.inner.cfg.init_data.as_deref().map(protocol::init_data),
            runtime_data: RuntimeData {
                nonce: challenge.nonce.clone(),
                tee_pubkey,
            },
            tee_evidence: CompositeEvidence {
                primary_evidence: evidence,
                additional_evidence: String::new(),
            },
        };
        let attest_url = format!("{base}/kbs/v0/attest");
        let resp = self
            .send(|| self.inner.http.post(&attest_url).json(&attestation))
            .await?;
        #[derive(serde::Deserialize)]
        struct AttestResponse {
            token: String,
        }
        let ar: AttestResponse = self.json_or_attestation_error(resp, "attest").await?;
        let token = Token::parse(&ar.token).map_err(|e| Error::Protocol {
            url: base.clone(),
            detail: e.to_string(),
        })?;
        info!(kbs = %base, tee = %tee_name, exp = ?token.exp(), elapsed_ms = started.elapsed().as_millis() as u64, "attested to KBS");
        Ok(token)
    }

    async fn json_or_attestation_error<T: serde::de::DeserializeOwned>(
        &self,
        resp: reqwest::Response,
        step: &str,
    ) -> Result<T, Error> {
        let base = &self.inner.base;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| Error::Protocol {
            url: base.clone(),
            detail: format!("reading the /{step} response: {}", error_chain(&e)),
        })?;
        if !status.is_success() {
            let err = protocol::parse_error(status.as_u16(), &body);
            return Err(Error::Attestation {
                url: base.clone(),
                detail: format!(
                    "/{step} answered HTTP {} {}: {}",
                    err.status,
                    err.kind.name(),
                    err.detail
                ),
            });
        }
        serde_json::from_slice(&body).map_err(|e| Error::Protocol {
            url: base.clone(),
            detail: format!("/{step} response is not the expected JSON: {e}"),
        })
    }

    /// Sends a request, retrying connect errors, timeouts, 429 and 5xx with jittered exponential backoff.
    async fn send(
        &self,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, Error> {
        let policy = self.inner.cfg.retry;
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let reason = match build().send().await {
                Ok(r) if r.status().is_server_error() || r.status().as_u16() == 429 => {
                    let status = r.status();
                    let body = r.bytes().await.unwrap_or_default();
                    let err = protocol::parse_error(status.as_u16(), &body);
                    format!("HTTP {}: {}", status.as_u16(), err.detail)
                }
                Ok(r) => return Ok(r),
                Err(e) if is_certificate_error(&e) => {
                    return Err(Error::Tls {
                        url: self.inner.base.clone(),
                        detail: error_chain(&e),
                    })
                }
                Err(e) => error_chain(&e),
            };
            if attempt >= policy.max_attempts {
                return Err(Error::Unreachable {
                    url: self.inner.base.clone(),
                    attempts: attempt,
                    elapsed: started.elapsed(),
                    reason,
                });
            }
            let jitter = OsRng.next_u32() as f64 / u32::MAX as f64;
            let delay = policy.delay(attempt, jitter);
            warn!(kbs = %self.inner.base, attempt, delay_ms = delay.as_millis() as u64, reason = %reason, "KBS request failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }
}

// Asserts the documented thread-safety of the public handle.
const _: fn() = || {
    fn check<T: Send + Sync + Clone>() {}
    check::<Client>();
};
