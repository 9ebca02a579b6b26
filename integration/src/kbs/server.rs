//! Request handling of the test KBS.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use kbs_client::kbs_types::{Attestation, Challenge, ErrorInformation, Request, Tee, TeePubKey};
use kbs_client::protocol::{self, KbsErrorKind, KBS_PROTOCOL_VERSION, SESSION_COOKIE};
use rand_core::{OsRng, RngCore};
use serde_json::{json, Value};
use tracing::{debug, warn};

use super::jwt::TokenSigner;
use super::{Counters, ResourcePolicy, TestKbsConfig};

struct Session {
    expires: Instant,
    tee: Tee,
    nonce: String,
    /// Set once attested: the token and its claims.
    attested: Option<(String, Value)>,
}

pub(crate) struct State {
    resources_dir: PathBuf,
    session_ttl: Duration,
    token_ttl: Duration,
    tamper_jwe_tag: bool,
    init_data_reference: Option<String>,
    pub(crate) policy: RwLock<ResourcePolicy>,
    sessions: Mutex<HashMap<String, Session>>,
    signer: TokenSigner,
    pub(crate) counters: Counters,
    pub(crate) issued: Mutex<Vec<String>>,
    pub(crate) issued_sessions: Mutex<Vec<String>>,
}

impl State {
    pub(crate) fn new(cfg: TestKbsConfig) -> Self {
        Self {
            resources_dir: cfg.resources_dir,
            session_ttl: cfg.session_ttl,
            token_ttl: cfg.token_ttl,
            tamper_jwe_tag: cfg.tamper_jwe_tag,
            init_data_reference: cfg.init_data_reference,
            policy: RwLock::new(cfg.policy),
            sessions: Mutex::new(HashMap::new()),
            signer: TokenSigner::generate(),
            counters: Counters::default(),
            issued: Mutex::new(Vec::new()),
            issued_sessions: Mutex::new(Vec::new()),
        }
    }
}

pub(crate) fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/kbs/v0/{*path}", any(dispatch))
        .with_state(state)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The reference's error body: `{"type": ".../errors/<Variant>", "detail": ...}`.
fn kbs_error(kind: KbsErrorKind, detail: impl Into<String>) -> Response {
    let status = match kind {
        KbsErrorKind::InvalidRequestPath | KbsErrorKind::PluginNotFound => StatusCode::NOT_FOUND,
        _ => StatusCode::UNAUTHORIZED,
    };
    let body = ErrorInformation {
        error_type: kind.type_url(),
        detail: detail.into(),
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&body).expect("json"),
    )
        .into_response()
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.to_string())
}

fn valid_segment(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-' || ch == '.')
}

async fn dispatch(
    AxState(st): AxState<Arc<State>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_start_matches("/kbs/v0/").to_string();
    let mut segs = path.split('/');
    let plugin = segs.next().unwrap_or_default();
    let rest: Vec<&str> = segs.collect();
    match (method, plugin) {
        (Method::POST, "auth") => auth(&st, &body),
        (Method::POST, "attest") => attest(&st, &headers, &body),
        (Method::GET, "resource") => get_resource(&st, &headers, &rest),
        (Method::POST, "resource") => put_resource(&st, &rest, &body),
        (Method::POST, "resource-policy") => set_policy(&st, &body),
        (_, "auth" | "attest" | "resource" | "resource-policy") => kbs_error(
            KbsErrorKind::InvalidRequestPath,
            format!("Request path {path} is invalid"),
        ),
        (_, p) => kbs_error(
            KbsErrorKind::PluginNotFound,
            format!("Plugin {p} not found"),
        ),
    }
}

fn auth(st: &State, body: &[u8]) -> Response {
    st.counters.auth.fetch_add(1, Ordering::SeqCst);
    let req: Request = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return kbs_error(
                KbsErrorKind::Other("SerdeError".into()),
                format!("Serialize/Deserialize failed: {e}"),
            )
        }
    };
    if req.version != KBS_PROTOCOL_VERSION {
        return kbs_error(
            KbsErrorKind::AttestationError,
            format!(
                "Attestation error: RCAR handshake Auth failed: KBS Client Protocol Version Mismatch: expect ={KBS_PROTOCOL_VERSION} while the request is {}",
                req.version
            ),
        );
    }
    let mut nonce = [0u8; 32];
    OsRng.fill_bytes(&mut nonce);
    let nonce = STANDARD.encode(nonce);
    let mut id = [0u8; 16];
    OsRng.fill_bytes(&mut id);
    let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    st.issued_sessions.lock().expect("lock").push(id.clone());
    st.sessions.lock().expect("lock").insert(
        id.clone(),
        Session {
            expires: Instant::now() + st.session_ttl,
            tee: req.tee,
            nonce: nonce.clone(),
            attested: None,
        },
    );
    let challenge = Challenge {
        nonce,
        extra_params: json!(""),
    };
    let expires = httpdate::fmt_http_date(SystemTime::now() + st.session_ttl);
    (
        StatusCode::OK,
        [
            (
                header::SET_COOKIE,
                format!("{SESSION_COOKIE}={id}; Expires={expires}"),
            ),
            (header::CONTENT_TYPE, "application/json".into()),
        ],
        serde_json::to_string(&challenge).expect("json"),
    )
        .into_response()
}

fn attest_failed(cause: impl std::fmt::Display) -> Response {
    warn!("attestation rejected: {cause}");
    kbs_error(
        KbsErrorKind::AttestationError,
        format!("Attestation error: RCAR handshake Attest failed: {cause}"),
    )
}

fn attest(st: &State, headers: &HeaderMap, body: &[u8]) -> Response {
    st.counters.attest.fetch_add(1, Ordering::SeqCst);
    let Some(id) = cookie(headers) else {
        return attest_failed("no kbs-session-id cookie");
    };
    let mut sessions = st.sessions.lock().expect("lock");
    let Some(session) = sessions.get_mut(&id) else {
        return attest_failed("unknown session");
    };
    if session.expires <= Instant::now() {
        sessions.remove(&id);
        return attest_failed("session expired");
    }
    if let Some((token, _)) = &session.attested {
        return json_token(token);
    }
    let att: Attestation = match serde_json::from_slice(body) {
        Ok(a) => a,
        Err(e) => return attest_failed(format!("bad Attestation body: {e}")),
    };
    if session.tee != Tee::Sample {
        return attest_failed(format!(
            "the test KBS verifies only sample evidence, not {}",
            session.tee
        ));
    }
    if att.runtime_data.nonce != session.nonce {
        return attest_failed("nonce mismatch");
    }
    let expected = protocol::report_data(
        kbs_client::kbs_types::HashAlgorithm::Sha384,
        &att.runtime_data.nonce,
        &att.runtime_data.tee_pubkey,
        &att.tee_evidence.additional_evidence,
    );
    let ev = &att.tee_evidence.primary_evidence;
    let got = ev
        .get("report_data")
        .and_then(Value::as_str)
        .and_then(|s| STANDARD.decode(s).ok());
    if got.as_deref() != Some(expected.as_slice()) {
        return attest_failed("sample report_data does not bind the nonce and TEE key");
    }
    if ev.get("svn").and_then(Value::as_str).is_none() {
        return attest_failed("sample evidence without svn");
    }
    let (init_data_hash, init_data_claims) = match init_data(&att) {
        Ok(v) => v,
        Err(why) => return attest_failed(why),
    };
    if let Some(want) = &st.init_data_reference {
        match &init_data_hash {
            None => {
                return attest_failed(format!(
                    "no init_data in the attestation request; the reference value is {want}"
                ))
            }
            Some(got) if got != want => {
                return attest_failed(format!(
                    "init_data digest {got} of the attestation request differs from the reference value {want}"
                ))
            }
            Some(_) => {}
        }
    }
    // trustee's sample verifier adds the digest of the request's initdata to the TEE claims.
    let mut tee_claims = ev.clone();
    if let (Some(h), Some(obj)) = (&init_data_hash, tee_claims.as_object_mut()) {
        obj.insert("init_data".into(), json!(h));
    }
    let now = now_secs();
    let claims = json!({
        "eat_profile": "tag:github.com,2023:veraison/ear",
        "iss": "guestpull-test-kbs",
        "iat": now,
        "exp": now + st.token_ttl.as_secs().max(1),
        "ear.verifier-id": {"developer": "guestpull", "build": "test-kbs"},
        "submods": {"cpu0": {
            "ear.status": "affirming",
            "ear.appraisal-policy-id": "default",
            "ear.veraison.annotated-evidence": {
                "sample": tee_claims,
                "runtime_data_claims": serde_json::to_value(&att.runtime_data).expect("json"),
                "init_data_claims": init_data_claims,
            }
        }}
    });
    let token = st.signer.sign(&claims);
    st.issued.lock().expect("lock").push(token.clone());
    st.counters.attest_ok.fetch_add(1, Ordering::SeqCst);
    session.attested = Some((token.clone(), claims));
    debug!("attestation accepted");
    json_token(&token)
}

/// The request's initdata as trustee's attestation service reads it: the digest of the exact
/// TOML text with its declared algorithm (standard base64), and the `[data]` table as claims,
/// with `cdh.toml` / `aa.toml` turned into JSON when they parse as TOML.
fn init_data(att: &Attestation) -> Result<(Option<String>, Value), String> {
    let Some(i) = &att.init_data else {
        return Ok((None, json!({})));
    };
    if i.format != protocol::INIT_DATA_FORMAT {
        return Err(format!("unsupported init-data format {}", i.format));
    }
    let digest = protocol::init_data_digest(&i.body)?;
    let doc: toml::Value =
        toml::from_str(&i.body).map_err(|e| format!("init-data is not TOML: {e}"))?;
    let mut claims = serde_json::to_value(
        doc.get("data")
            .cloned()
            .unwrap_or(toml::Value::Table(Default::default())),
    )
    .unwrap_or(json!({}));
    if let Some(map) = claims.as_object_mut() {
        for key in ["cdh.toml", "aa.toml"] {
            let parsed = map
                .get(key)
                .and_then(Value::as_str)
                .and_then(|t| toml::from_str::<toml::Value>(t).ok())
                .and_then(|v| serde_json::to_value(v).ok());
            if let Some(v) = parsed {
                map.insert(key.into(), v);
            }
        }
    }
    Ok((Some(STANDARD.encode(&digest.digest)), claims))
}

fn json_token(token: &str) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "token": token }).to_string(),
    )
        .into_response()
}

/// The TEE key from token claims, at the first path trustee searches.
fn tee_pubkey(claims: &Value) -> Option<TeePubKey> {
    claims
        .pointer("/submods/cpu0/ear.veraison.annotated-evidence/runtime_data_claims/tee-pubkey")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

fn get_resource(st: &State, headers: &HeaderMap, rest: &[&str]) -> Response {
    st.counters.resource.fetch_add(1, Ordering::SeqCst);
    if rest.len() != 3 || !rest.iter().all(|s| valid_segment(s)) {
        return kbs_error(
            KbsErrorKind::InvalidRequestPath,
            format!("Request path resource/{} is invalid", rest.join("/")),
        );
    }
    let unauthorized = |kind, detail: &str| {
        st.counters
            .resource_unauthorized
            .fetch_add(1, Ordering::SeqCst);
        kbs_error(kind, detail)
    };
    // Like trustee: the cookie session's token first (not re-verified), then a bearer token.
    let session_claims = cookie(headers).and_then(|id| {
        let mut sessions = st.sessions.lock().expect("lock");
        match sessions.get(&id) {
            Some(s) if s.expires <= Instant::now() => {
                sessions.remove(&id);
                None
            }
            Some(s) => s.attested.as_ref().map(|(_, c)| c.clone()),
            None => None,
        }
    });
    let claims = match session_claims {
        Some(c) => c,
        None => {
            let bearer = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            match bearer {
                None => {
                    return unauthorized(KbsErrorKind::TokenNotFound, "Attestation Token not found")
                }
                Some(t) => match st.signer.verify(t.trim(), now_secs()) {
                    Ok(c) => c,
                    Err(e) => {
                        debug!("bearer token rejected: {e}");
                        return unauthorized(
                            KbsErrorKind::TokenVerifierError,
                            "Token Verifier error",
                        );
                    }
                },
            }
        }
    };
    let path = rest.join("/");
    if !st.policy.read().expect("lock").allows(&path) {
        return kbs_error(KbsErrorKind::PolicyDeny, "Access denied by policy");
    }
    let Some(pubkey) = tee_pubkey(&claims) else {
        return unauthorized(KbsErrorKind::TokenVerifierError, "Token Verifier error");
    };
    let file = st.resources_dir.join(rest[0]).join(rest[1]).join(rest[2]);
    let data = match std::fs::read(&file) {
        Ok(d) => d,
        Err(e) => {
            debug!(path = %path, "resource not readable: {e}");
            return kbs_error(KbsErrorKind::PluginInternalError, "Plugin internal error");
        }
    };
    match kbs_client::jwe::encrypt_to_tee_key(&pubkey, &data) {
        Ok(mut resp) => {
            if st.tamper_jwe_tag {
                resp.tag[0] ^= 1;
            }
            st.counters.resource_ok.fetch_add(1, Ordering::SeqCst);
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                serde_json::to_string(&resp).expect("json"),
            )
                .into_response()
        }
        Err(e) => kbs_error(
            KbsErrorKind::Other("JweError".into()),
            format!("JWE failed: {e}"),
        ),
    }
}

fn put_resource(st: &State, rest: &[&str], body: &[u8]) -> Response {
    if rest.len() != 3 || !rest.iter().all(|s| valid_segment(s)) {
        return kbs_error(
            KbsErrorKind::InvalidRequestPath,
            format!("Request path resource/{} is invalid", rest.join("/")),
        );
    }
    let dir = st.resources_dir.join(rest[0]).join(rest[1]);
    let res = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(dir.join(rest[2]), body));
    match res {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => kbs_error(
            KbsErrorKind::PluginInternalError,
            format!("Plugin internal error: {e}"),
        ),
    }
}

fn set_policy(st: &State, body: &[u8]) -> Response {
    let parsed = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("policy").and_then(Value::as_str).map(str::to_string))
        .and_then(|p| URL_SAFE_NO_PAD.decode(p.trim_end_matches('=')).ok())
        .and_then(|b| String::from_utf8(b).ok());
    let Some(text) = parsed else {
        return kbs_error(
            KbsErrorKind::Other("PolicyEngineError".into()),
            "body must be {\"policy\": base64url(policy text)}",
        );
    };
    match ResourcePolicy::parse(&text) {
        Ok(p) => {
            *st.policy.write().expect("lock") = p;
            StatusCode::OK.into_response()
        }
        Err(e) => kbs_error(
            KbsErrorKind::Other("PolicyEngineError".into()),
            format!("Failed to set policy, illegal policy: {e}"),
        ),
    }
}
