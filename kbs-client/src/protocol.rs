//! RCAR wire rules shared by the client and the test KBS: version, report-data binding, error bodies.

use kbs_types::{Challenge, HashAlgorithm, Request, Tee, TeePubKey};
use serde_json::{json, Value};

/// The only protocol version trustee accepts (`=0.4.0`).
pub const KBS_PROTOCOL_VERSION: &str = "0.4.0";
/// Name of the session cookie set by `/auth` and `/attest`.
pub const SESSION_COOKIE: &str = "kbs-session-id";
/// Prefix of the `type` member of KBS error bodies.
pub const ERROR_TYPE_PREFIX: &str = "https://github.com/confidential-containers/kbs/errors/";

/// The `/auth` request body for a TEE, advertising every hash we can bind report data with.
pub fn auth_request(tee: Tee) -> Request {
    let algs: Vec<String> = HashAlgorithm::list_all()
        .iter()
        .map(|a| a.as_ref().to_string())
        .collect();
    Request {
        version: KBS_PROTOCOL_VERSION.to_string(),
        tee,
        extra_params: json!({ "supported-hash-algorithms": algs }),
    }
}

/// The hash the KBS selected in the challenge; SHA-384 when it names none (`extra-params` is `""`).
pub fn selected_hash(challenge: &Challenge) -> Result<HashAlgorithm, String> {
    let name = match &challenge.extra_params {
        Value::Object(m) => m.get("selected-hash-algorithm").and_then(Value::as_str),
        _ => None,
    };
    match name {
        None => Ok(HashAlgorithm::Sha384),
        Some(n) => n
            .parse::<HashAlgorithm>()
            .map_err(|_| format!("KBS selected unsupported hash algorithm {n:?}")),
    }
}

/// RFC 8785 canonical JSON of `{"additional-evidence","nonce","tee-pubkey"}`: what the report data hashes.
pub fn report_data_preimage(
    nonce: &str,
    tee_pubkey: &TeePubKey,
    additional_evidence: &str,
) -> Vec<u8> {
    let v = json!({
        "additional-evidence": additional_evidence,
        "nonce": nonce,
        "tee-pubkey": tee_pubkey,
    });
    serde_json_canonicalizer::to_vec(&v).expect("JSON values always canonicalize")
}

/// The report data digest (unpadded; hardware attesters pad it to 64 bytes themselves).
pub fn report_data(
    hash: HashAlgorithm,
    nonce: &str,
    tee_pubkey: &TeePubKey,
    additional_evidence: &str,
) -> Vec<u8> {
    hash.digest(&report_data_preimage(
        nonce,
        tee_pubkey,
        additional_evidence,
    ))
}

/// The KBS error classes the client reacts to differently (the `type` suffix of the error body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KbsErrorKind {
    /// No cookie session and no bearer token.
    TokenNotFound,
    /// The bearer token did not verify (expired, wrong signer, ...).
    TokenVerifierError,
    /// The RCAR handshake failed or the session expired.
    AttestationError,
    /// The resource policy refused.
    PolicyDeny,
    /// The plugin failed: for the resource plugin, usually a missing resource.
    PluginInternalError,
    /// No such plugin.
    PluginNotFound,
    /// The path is not valid for the plugin.
    InvalidRequestPath,
    /// Any other `type` (suffix kept), or an unparseable body.
    Other(String),
}

impl KbsErrorKind {
    /// The variant name used in the `type` URL.
    pub fn name(&self) -> &str {
        match self {
            KbsErrorKind::TokenNotFound => "TokenNotFound",
            KbsErrorKind::TokenVerifierError => "TokenVerifierError",
            KbsErrorKind::AttestationError => "AttestationError",
            KbsErrorKind::PolicyDeny => "PolicyDeny",
            KbsErrorKind::PluginInternalError => "PluginInternalError",
            KbsErrorKind::PluginNotFound => "PluginNotFound",
            KbsErrorKind::InvalidRequestPath => "InvalidRequestPath",
            KbsErrorKind::Other(s) => s,
        }
    }

    /// The full `type` member for this kind.
    pub fn type_url(&self) -> String {
        format!("{ERROR_TYPE_PREFIX}{}", self.name())
    }

    fn from_name(s: &str) -> Self {
        match s {
            "TokenNotFound" => KbsErrorKind::TokenNotFound,
            "TokenVerifierError" => KbsErrorKind::TokenVerifierError,
            "AttestationError" => KbsErrorKind::AttestationError,
            "PolicyDeny" => KbsErrorKind::PolicyDeny,
            "PluginInternalError" => KbsErrorKind::PluginInternalError,
            "PluginNotFound" => KbsErrorKind::PluginNotFound,
            "InvalidRequestPath" => KbsErrorKind::InvalidRequestPath,
            other => KbsErrorKind::Other(other.to_string()),
        }
    }
}

/// A parsed KBS error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KbsError {
    /// HTTP status.
    pub status: u16,
    /// Error class.
    pub kind: KbsErrorKind,
    /// The `detail` member (or a short excerpt of a non-JSON body).
    pub detail: String,
}

/// Parses an error body `{"type":…,"detail":…}`, tolerating non-JSON bodies from proxies.
pub fn parse_error(status: u16, body: &[u8]) -> KbsError {
    match serde_json::from_slice::<kbs_types::ErrorInformation>(body) {
        Ok(info) => {
            let suffix = info
                .error_type
                .rsplit('/')
                .next()
                .unwrap_or(&info.error_type);
            KbsError {
                status,
                kind: KbsErrorKind::from_name(suffix),
                detail: info.detail,
            }
        }
        Err(_) => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            KbsError {
                status,
                kind: KbsErrorKind::Other(format!("HTTP {status}")),
                detail: text,
            }
        }
    }
}

/// What the client does about a failed resource request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceAction {
    /// Drop the token, attest again once, retry once.
    Reattest,
    /// Fail now: the policy refused.
    PolicyDeny,
    /// Fail now: missing resource or backend error; attesting again would not help.
    NotFound,
    /// Fail now: the KBS does not serve this path.
    InvalidPath,
    /// Transient server failure: back off and retry.
    Retry,
    /// Fail now with the KBS's message.
    Fatal,
}

/// Maps a resource-request error to the client's reaction, by `type` first and status second.
pub fn resource_action(err: &KbsError) -> ResourceAction {
    match err.kind {
        KbsErrorKind::TokenNotFound
        | KbsErrorKind::TokenVerifierError
        | KbsErrorKind::AttestationError => ResourceAction::Reattest,
        KbsErrorKind::PolicyDeny => ResourceAction::PolicyDeny,
        KbsErrorKind::PluginInternalError => ResourceAction::NotFound,
        KbsErrorKind::PluginNotFound | KbsErrorKind::InvalidRequestPath => {
            ResourceAction::InvalidPath
        }
        KbsErrorKind::Other(_) if err.status >= 500 || err.status == 429 => ResourceAction::Retry,
        KbsErrorKind::Other(_) if err.status == 404 => ResourceAction::InvalidPath,
        KbsErrorKind::Other(_) => ResourceAction::Fatal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;

    fn key() -> TeePubKey {
        TeePubKey::EC {
            crv: "P-256".into(),
            alg: "ECDH-ES+A256KW".into(),
            x: "WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis".into(),
            y: "y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE".into(),
        }
    }

    #[test]
    fn jcs_preimage_is_sorted_and_compact() {
        let pre = report_data_preimage("Zm9vYmFy", &key(), "");
        assert_eq!(
            std::str::from_utf8(&pre).unwrap(),
            r#"{"additional-evidence":"","nonce":"Zm9vYmFy","tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis","y":"y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE"}}"#
        );
        // JCS escapes and orders by UTF-16 code units, and keeps the string form of the device evidence.
        let pre = report_data_preimage("n", &key(), "{\"sampledevice\":{\"a\":1}}");
        assert!(std::str::from_utf8(&pre)
            .unwrap()
            .starts_with(r#"{"additional-evidence":"{\"sampledevice\":{\"a\":1}}","nonce":"n","#));
    }

    #[test]
    fn report_data_vectors() {
        // Fixed vectors computed independently: printf '%s' "<preimage>" | sha384sum / sha512sum.
        let rd = report_data(HashAlgorithm::Sha384, "Zm9vYmFy", &key(), "");
        assert_eq!(rd.len(), 48);
        assert_eq!(STANDARD.encode(&rd), REPORT_DATA_SHA384_B64);
        let rd = report_data(HashAlgorithm::Sha512, "Zm9vYmFy", &key(), "");
        assert_eq!(hex::encode(&rd), REPORT_DATA_SHA512_HEX);
    }

    const REPORT_DATA_SHA384_B64: &str =
        "iL8ZGNcowTaWOtyQcmHU0QB9SrT/V9Aq2C4n/4qkukz6vUZ6Qekr2czClTJyYkVZ";
    const REPORT_DATA_SHA512_HEX: &str = "dbb9895b4c2b75ccd3672d3bb910bc20da914efdd8c57f3b41e31b111fce30495362e39299e4e03f62699bceff2a7ef68143261d4f1726851e296b921df384f5";

    #[test]
    fn hash_selection() {
        let ch = |v: Value| Challenge {
            nonce: "n".into(),
            extra_params: v,
        };
        assert_eq!(
            selected_hash(&ch(json!(""))).unwrap(),
            HashAlgorithm::Sha384
        );
        assert_eq!(
            selected_hash(&ch(json!({"selected-hash-algorithm":"SHA512"}))).unwrap(),
            HashAlgorithm::Sha512
        );
        assert!(selected_hash(&ch(json!({"selected-hash-algorithm":"md5"}))).is_err());
        let req = serde_json::to_value(auth_request(Tee::Sample)).unwrap();
        assert_eq!(
            req,
            json!({"version":"0.4.0","tee":"sample","extra-params":{"supported-hash-algorithms":["sha256","sha384","sha512","sm3"]}})
        );
    }

    #[test]
    fn error_mapping() {
        let e = |status, t: &str| {
            parse_error(
                status,
                format!(r#"{{"type":"{ERROR_TYPE_PREFIX}{t}","detail":"d"}}"#).as_bytes(),
            )
        };
        assert_eq!(
            resource_action(&e(401, "TokenNotFound")),
            ResourceAction::Reattest
        );
        assert_eq!(
            resource_action(&e(401, "TokenVerifierError")),
            ResourceAction::Reattest
        );
        assert_eq!(
            resource_action(&e(401, "AttestationError")),
            ResourceAction::Reattest
        );
        assert_eq!(
            resource_action(&e(401, "PolicyDeny")),
            ResourceAction::PolicyDeny
        );
        assert_eq!(
            resource_action(&e(403, "PolicyDeny")),
            ResourceAction::PolicyDeny
        );
        assert_eq!(
            resource_action(&e(401, "PluginInternalError")),
            ResourceAction::NotFound
        );
        assert_eq!(
            resource_action(&e(404, "PluginNotFound")),
            ResourceAction::InvalidPath
        );
        assert_eq!(
            resource_action(&e(404, "InvalidRequestPath")),
            ResourceAction::InvalidPath
        );
        assert_eq!(resource_action(&e(401, "JweError")), ResourceAction::Fatal);
        let html = parse_error(502, b"<html>bad gateway</html>");
        assert_eq!(resource_action(&html), ResourceAction::Retry);
        assert!(html.detail.contains("bad gateway"));
        assert_eq!(
            e(401, "PolicyDeny").kind.type_url(),
            format!("{ERROR_TYPE_PREFIX}PolicyDeny")
        );
    }
}
