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

/// The initdata format trustee's attestation request carries (`init_data.format`).
pub const INIT_DATA_FORMAT: &str = "toml";
/// The only initdata specification version kata-agent and trustee accept.
pub const INIT_DATA_VERSION: &str = "0.1.0";

/// The digest of an initdata document, computed over its exact bytes with its declared algorithm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitDataDigest {
    /// `sha256`, `sha384` or `sha512`, as the document declares.
    pub algorithm: String,
    /// The raw digest (32, 48 or 64 bytes).
    pub digest: Vec<u8>,
}

impl InitDataDigest {
    /// The digest as a TEE register holds it: truncated or zero-padded to the register's width
    /// (TDX MRCONFIGID 48 bytes, SNP HOSTDATA 32 bytes), as kata's runtime writes it at launch.
    pub fn for_register(&self, width: usize) -> Vec<u8> {
        let mut v = self.digest.clone();
        v.resize(width, 0);
        v
    }
}

/// Validates an initdata TOML the way kata-agent does (version `0.1.0`, a supported algorithm,
/// a `[data]` table of strings) and digests its bytes as written, as kata-agent and trustee do.
pub fn init_data_digest(toml_text: &str) -> Result<InitDataDigest, String> {
    #[derive(serde::Deserialize)]
    struct Doc {
        version: String,
        algorithm: String,
        // Parsed only to refuse documents kata-agent would refuse (values must be strings).
        #[serde(default, rename = "data")]
        _data: std::collections::BTreeMap<String, String>,
    }
    let doc: Doc = toml::from_str(toml_text).map_err(|e| format!("initdata is not valid: {e}"))?;
    if doc.version != INIT_DATA_VERSION {
        return Err(format!(
            "initdata version {:?} is not supported (want {INIT_DATA_VERSION:?})",
            doc.version
        ));
    }
    let alg = match doc.algorithm.as_str() {
        "sha256" => HashAlgorithm::Sha256,
        "sha384" => HashAlgorithm::Sha384,
        "sha512" => HashAlgorithm::Sha512,
        other => {
            return Err(format!(
                "initdata algorithm {other:?} is not supported (sha256, sha384, sha512)"
            ))
        }
    };
    Ok(InitDataDigest {
        algorithm: doc.algorithm,
        digest: alg.digest(toml_text.as_bytes()),
    })
}

/// The `init_data` member of the attestation request for an initdata document.
pub fn init_data(toml_text: &str) -> kbs_types::InitData {
    kbs_types::InitData {
        format: INIT_DATA_FORMAT.to_string(),
        body: toml_text.to_string(),
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
    #[test]
    fn init_data_digest_hashes_the_exact_bytes_with_the_declared_algorithm() {
        use sha2::Digest;
        let text = "# comment kept in the digest\nversion = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"cdh.toml\" = '''\n[kbc]\nname = \"cc_kbc\"\n'''\n";
        let d = init_data_digest(text).unwrap();
        assert_eq!(d.algorithm, "sha384");
        assert_eq!(d.digest, sha2::Sha384::digest(text.as_bytes()).to_vec());
        // Same TOML value, other bytes: another digest (nothing is re-serialized).
        let other = init_data_digest(&text.replacen("# comment", "#", 1)).unwrap();
        assert_ne!(other.digest, d.digest);
        for (alg, len) in [("sha256", 32), ("sha512", 64)] {
            let t = format!("version = \"0.1.0\"\nalgorithm = \"{alg}\"\n");
            assert_eq!(init_data_digest(&t).unwrap().digest.len(), len);
        }
        // Register widths as kata's runtime writes them: truncated or zero-padded.
        assert_eq!(d.for_register(32), d.digest[..32].to_vec());
        let short = init_data_digest("version = \"0.1.0\"\nalgorithm = \"sha256\"\n").unwrap();
        let tdx = short.for_register(48);
        assert_eq!(
            (&tdx[..32], &tdx[32..]),
            (&short.digest[..], &[0u8; 16][..])
        );
    }

    #[test]
    fn init_data_is_refused_as_kata_agent_refuses_it() {
        for (text, why) in [
            ("version = \"0.2.0\"\nalgorithm = \"sha256\"\n", "version"),
            ("version = \"0.1.0\"\nalgorithm = \"md5\"\n", "md5"),
            ("algorithm = \"sha256\"\n", "version"),
            (
                "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\nx = 1\n",
                "valid",
            ),
        ] {
            let e = init_data_digest(text).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
        let w = init_data("version = \"0.1.0\"");
        assert_eq!(
            (w.format.as_str(), w.body.as_str()),
            ("toml", "version = \"0.1.0\"")
        );
    }
}
