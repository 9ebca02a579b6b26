//! The RCAR client: handshake, token cache, resource fetch with the error policy of the issue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kbs_types::{Attestation, Challenge, CompositeEvidence, RuntimeData};
use rand_core::{OsRng, RngCore};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, COOKIE, LOCATION, SET_COOKIE};
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use crate::attester::{self, LaunchSecrets};
use crate::config::{ClientConfig, Mode, Tee};
use crate::error::{error_chain, Error};
use crate::jwe;
use crate::keys::TeeKeyPair;
use crate::protocol::{self, KbsError, ResourceAction, SESSION_COOKIE};
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
    token: tokio::sync::Mutex<Option<Session>>,
}

/// An attestation: the token and, in background-check mode, the session cookie bound to it.
///
/// The cookie is carried here rather than in a cookie store: cookie stores log `Set-Cookie`
/// values at debug level, and the session id is as good as the token.
#[derive(Clone)]
struct Session {
    token: Token,
    cookie: Option<Zeroizing<String>>,
}

/// Longest error body read from the KBS (they are small JSON objects; the rest is dropped).
pub const MAX_ERROR_BODY: usize = 64 << 10;

/// A fully read KBS answer.
struct Reply {
    status: reqwest::StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// The `kbs-session-id` value from a response's `Set-Cookie` headers.
fn session_cookie(headers: &HeaderMap) -> Option<Zeroizing<String>> {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next()?.split_once('='))
        .find(|(k, _)| k.trim() == SESSION_COOKIE)
        .map(|(_, v)| Zeroizing::new(v.trim().to_string()))
}

/// A header value that `http`'s `Debug` and hyper's traces print as "Sensitive".
fn secret_header(value: &str) -> Result<HeaderValue, Error> {
    let mut v = HeaderValue::from_str(value)
        .map_err(|_| Error::Config("credential is not a valid HTTP header value".into()))?;
    v.set_sensitive(true);
    Ok(v)
}

/// Why a body was not read.
enum BodyError {
    /// The transfer broke.
    Read(reqwest::Error),
    /// The body is longer than the limit (refused before it is buffered).
    TooLarge(usize),
}

/// Reads at most `limit` bytes of `resp`'s body.
async fn read_limited(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, BodyError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge(limit));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Read)? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
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
        if cfg.deadline.is_zero() || cfg.max_response_bytes == 0 {
            return Err(Error::Config(
                "deadline and max_response_bytes must be non-zero".into(),
            ));
        }
        let mut b = reqwest::Client::builder()
            // A KBS never redirects; following one could send the session to another host
            // or downgrade https to http.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(cfg.timeout.min(cfg.deadline))
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
                token: tokio::sync::Mutex::new(token.map(|token| Session {
                    token,
                    cookie: None,
                })),
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
        Ok(self.session(None).await?.token)
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
            let session = self.session(None).await?;
            let passport = matches!(self.inner.cfg.mode, Mode::Passport { .. });
            let credential = if passport {
                Some((
                    AUTHORIZATION,
                    secret_header(&format!("Bearer {}", session.token.as_str()))?,
                ))
            } else {
                match &session.cookie {
                    Some(c) => Some((
                        COOKIE,
                        secret_header(&format!("{SESSION_COOKIE}={}", &**c))?,
                    )),
                    None => None,
                }
            };
            let reply = self
                .send(&format!("response for {path}"), || {
                    let rb = self.inner.http.get(&url);
                    match &credential {
                        Some((name, value)) => rb.header(name.clone(), value.clone()),
                        None => rb,
                    }
                })
                .await?;
            let (status, body) = (reply.status, reply.body);
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
                    self.session(Some(&session.token)).await?;
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

    /// The cached session, or a fresh one when there is none, it is near `exp`, or it is `stale`.
    async fn session(&self, stale: Option<&Token>) -> Result<Session, Error> {
        let mut guard = self.inner.token.lock().await;
        if let Some(s) = guard.as_ref() {
            let t = &s.token;
            let is_stale = stale.is_some_and(|s| s.as_str() == t.as_str());
            if !is_stale && !t.needs_refresh(self.inner.cfg.refresh_margin) {
                return Ok(s.clone());
            }
            debug!(exp = ?t.exp(), stale = is_stale, "replacing attestation token");
        }
        *guard = None;
        let t = self.handshake().await?;
        *guard = Some(t.clone());
        Ok(t)
    }

    /// One RCAR handshake: `/auth` → evidence → `/attest`.
    async fn handshake(&self) -> Result<Session, Error> {
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
        let reply = self
            .send("/auth response", || {
                self.inner.http.post(&auth_url).json(&request)
            })
            .await?;
        let mut cookie = session_cookie(&reply.headers);
        let challenge: Challenge = self.json_or_attestation_error(reply, "auth")?;
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
        let cookie_header = match &cookie {
            Some(c) => Some(secret_header(&format!("{SESSION_COOKIE}={}", &**c))?),
            None => None,
        };
        let reply = self
            .send("/attest response", || {
                let rb = self.inner.http.post(&attest_url).json(&attestation);
                match &cookie_header {
                    Some(v) => rb.header(COOKIE, v.clone()),
                    None => rb,
                }
            })
            .await?;
        // trustee sets the cookie again on /attest; the newest one names the session.
        if let Some(c) = session_cookie(&reply.headers) {
            cookie = Some(c);
        }
        #[derive(serde::Deserialize)]
        struct AttestResponse {
            token: String,
        }
        let ar: AttestResponse = self.json_or_attestation_error(reply, "attest")?;
        let token = Token::parse(&ar.token).map_err(|e| Error::Protocol {
            url: base.clone(),
            detail: e.to_string(),
        })?;
        info!(kbs = %base, tee = %tee_name, exp = ?token.exp(), elapsed_ms = started.elapsed().as_millis() as u64, "attested to KBS");
        Ok(Session { token, cookie })
    }

    fn json_or_attestation_error<T: serde::de::DeserializeOwned>(
        &self,
        reply: Reply,
        step: &str,
    ) -> Result<T, Error> {
        let base = &self.inner.base;
        let (status, body) = (reply.status, reply.body);
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

    /// Sends a request and reads its answer (`what` names it in errors), retrying connect errors,
    /// timeouts, 429 and 5xx with jittered exponential backoff, all within the configured deadline.
    /// Bodies are capped: `max_response_bytes` for successes, [`MAX_ERROR_BODY`] for errors.
    async fn send(
        &self,
        what: &str,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Reply, Error> {
        let cfg = &self.inner.cfg;
        let policy = cfg.retry;
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + cfg.deadline;
        let timed_out = |attempts: u32, detail: String| Error::TimedOut {
            url: self.inner.base.clone(),
            after: cfg.deadline,
            attempts,
            detail,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut attempt_timed_out = false;
            let once = async {
                let r = build().send().await?;
                let status = r.status();
                let headers = r.headers().clone();
                let limit = if status.is_success() {
                    cfg.max_response_bytes
                } else {
                    MAX_ERROR_BODY
                };
                let body = read_limited(r, limit).await;
                Ok::<_, reqwest::Error>((status, headers, body))
            };
            let reason = match tokio::time::timeout_at(deadline, once).await {
                Err(_) => return Err(timed_out(attempt, format!("waiting for the {what}"))),
                Ok(Err(e)) if is_certificate_error(&e) => {
                    return Err(Error::Tls {
                        url: self.inner.base.clone(),
                        detail: error_chain(&e),
                    })
                }
                Ok(Err(e)) | Ok(Ok((_, _, Err(BodyError::Read(e))))) => {
                    attempt_timed_out = e.is_timeout();
                    error_chain(&e)
                }
                Ok(Ok((status, _, Err(BodyError::TooLarge(limit))))) => {
                    let what = if status.is_success() {
                        what.to_string()
                    } else {
                        format!("HTTP {} error body", status.as_u16())
                    };
                    return Err(Error::TooLarge {
                        url: self.inner.base.clone(),
                        what,
                        limit,
                    });
                }
                Ok(Ok((status, headers, Ok(_)))) if status.is_redirection() => {
                    return Err(Error::Redirect {
                        url: self.inner.base.clone(),
                        status: status.as_u16(),
                        location: headers
                            .get(LOCATION)
                            .and_then(|l| l.to_str().ok())
                            .unwrap_or("")
                            .to_string(),
                    })
                }
                Ok(Ok((status, _, Ok(body))))
                    if status.is_server_error() || status.as_u16() == 429 =>
                {
                    let err = protocol::parse_error(status.as_u16(), &body);
                    format!("HTTP {}: {}", status.as_u16(), err.detail)
                }
                Ok(Ok((status, headers, Ok(body)))) => {
                    return Ok(Reply {
                        status,
                        headers,
                        body,
                    })
                }
            };
            let jitter = OsRng.next_u32() as f64 / u32::MAX as f64;
            let delay = policy.delay(attempt, jitter);
            let no_time = tokio::time::Instant::now() + delay >= deadline;
            // A last attempt that ran into its own timeout is a slow KBS, not a refusing one.
            if attempt_timed_out && (no_time || attempt >= policy.max_attempts) {
                return Err(timed_out(attempt, format!("last attempt: {reason}")));
            }
            if attempt >= policy.max_attempts {
                return Err(Error::Unreachable {
                    url: self.inner.base.clone(),
                    attempts: attempt,
                    elapsed: started.elapsed(),
                    reason,
                });
            }
            if no_time {
                // The KBS answered (with failures) every time: it is down, not slow.
                return Err(Error::Unreachable {
                    url: self.inner.base.clone(),
                    attempts: attempt,
                    elapsed: started.elapsed(),
                    reason: format!(
                        "{reason}; no time left for a retry within the {:?} deadline",
                        cfg.deadline
                    ),
                });
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(SET_COOKIE, HeaderValue::from_static("other=1; Path=/"));
        h.append(
            SET_COOKIE,
            HeaderValue::from_static(
                "kbs-session-id=abc123; Expires=Wed, 21 Oct 2099 07:28:00 GMT",
            ),
        );
        assert_eq!(
            session_cookie(&h).as_deref().map(String::as_str),
            Some("abc123")
        );
        assert!(session_cookie(&HeaderMap::new()).is_none());
        let v = secret_header("kbs-session-id=abc123").unwrap();
        assert!(v.is_sensitive());
        assert!(!format!("{v:?}").contains("abc123"));
    }
}
