//! Parsing and validating policy.json (containers-policy.json(5)).
//!
//! Parsing is as strict as containers/image: unknown fields, a missing `default`, empty
//! requirement lists and malformed keys make the whole policy invalid, so a typo can never turn
//! into "accept". Parsed by hand from `serde_json::Value` rather than derived, so every error
//! names the exact scope, requirement index and field.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::{Map, Value};

use super::reference::{validate_prefix, DockerRef, SignedIdentity};

/// A parsed policy: only the `docker` transport is evaluated (the puller only pulls from
/// registries); other transports are validated structurally and otherwise ignored.
#[derive(Debug)]
pub(crate) struct Policy {
    pub default: Vec<Requirement>,
    pub docker: BTreeMap<String, Vec<Requirement>>,
}

/// One policy requirement.
#[derive(Debug)]
pub(crate) enum Requirement {
    InsecureAcceptAnything,
    Reject,
    /// GPG simple signing.
    SignedBy {
        keys: Vec<KeySource>,
        identity: SignedIdentity,
    },
    /// Cosign key-based signatures.
    SigstoreSigned {
        keys: Vec<KeySource>,
        identity: SignedIdentity,
    },
}

impl Requirement {
    /// The `type` as written in policy.json.
    pub fn type_name(&self) -> &'static str {
        match self {
            Requirement::InsecureAcceptAnything => "insecureAcceptAnything",
            Requirement::Reject => "reject",
            Requirement::SignedBy { .. } => "signedBy",
            Requirement::SigstoreSigned { .. } => "sigstoreSigned",
        }
    }

    /// Type plus the keys it trusts, for rejection messages.
    pub fn describe(&self) -> String {
        match self {
            Requirement::SignedBy { keys, .. } | Requirement::SigstoreSigned { keys, .. } => {
                let k: Vec<String> = keys.iter().map(KeySource::describe).collect();
                format!("{} with {}", self.type_name(), k.join(", "))
            }
            _ => self.type_name().to_owned(),
        }
    }
}

/// Where a trusted public key comes from.
#[derive(Debug, Clone)]
pub(crate) enum KeySource {
    /// `keyPath`/`keyPaths`: a `kbs://`/`file://` URI (bare absolute paths become `file://`).
    Uri(String),
    /// `keyData`/`keyDatas`, already decoded. `label` says which field, for messages.
    Inline { label: String, data: Vec<u8> },
}

impl KeySource {
    /// Human-readable origin of the key.
    pub fn describe(&self) -> String {
        match self {
            KeySource::Uri(u) => format!("key {u}"),
            KeySource::Inline { label, .. } => format!("key from {label}"),
        }
    }
}

type R<T> = Result<T, String>;

/// Parses policy.json bytes.
pub(crate) fn parse_policy(bytes: &[u8]) -> R<Policy> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    let top = object(&v, "policy")?;
    check_fields(top, "policy", &["default", "transports"])?;
    let default = match top.get("default") {
        Some(d) => requirements(d, "\"default\"")?,
        None => return Err("the mandatory \"default\" requirement list is missing".into()),
    };
    let mut docker = BTreeMap::new();
    if let Some(t) = top.get("transports") {
        for (transport, scopes) in object(t, "\"transports\"")? {
            let scopes_ctx = format!("transport {transport:?}");
            for (scope, reqs) in object(scopes, &scopes_ctx)? {
                let ctx = format!("transport {transport:?} scope {scope:?}");
                let parsed = requirements(reqs, &ctx)?;
                if transport == "docker" {
                    validate_docker_scope(scope).map_err(|e| format!("{ctx}: {e}"))?;
                    docker.insert(scope.clone(), parsed);
                }
            }
        }
    }
    Ok(Policy { default, docker })
}

/// Docker scopes are fully expanded references, repositories, namespaces, hosts or `*.domain`.
/// containers/image does not validate them; a scope that can never match is rejected here
/// because it would otherwise silently fall through to a broader (often permissive) scope.
fn validate_docker_scope(scope: &str) -> R<()> {
    if scope.is_empty() {
        return Ok(());
    }
    if let Some(domain) = scope.strip_prefix("*.") {
        if domain.is_empty() || domain.contains(['*', '/', ':']) {
            return Err(
                "a wildcard scope must look like *.example.com (no port, path or other *)".into(),
            );
        }
        return Ok(());
    }
    if !scope.contains('/') {
        // A bare registry host[:port].
        return validate_prefix(scope).map_err(|_| {
            format!(
                "{scope:?} is neither a registry host[:port] nor a fully expanded repository or image \
                 reference (e.g. docker.io/library/busybox:latest)"
            )
        });
    }
    match DockerRef::parse_canonical(scope) {
        Ok(_) => Ok(()),
        // A namespace like `docker.io/library` is valid although not a reference by itself.
        Err(_) if validate_prefix(scope).is_ok() => Ok(()),
        Err(e) => Err(e),
    }
}

fn requirements(v: &Value, ctx: &str) -> R<Vec<Requirement>> {
    let list = v
        .as_array()
        .ok_or_else(|| format!("{ctx}: expected a list of requirements"))?;
    if list.is_empty() {
        return Err(format!(
            "{ctx}: the requirement list is empty (use [{{\"type\":\"insecureAcceptAnything\"}}] to accept anything)"
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, r)| requirement(r, &format!("{ctx} requirement #{i}")))
        .collect()
}

fn requirement(v: &Value, ctx: &str) -> R<Requirement> {
    let o = object(v, ctx)?;
    let typ = string_field(o, "type", ctx)?.ok_or_else(|| format!("{ctx}: missing \"type\""))?;
    let ctx = format!("{ctx} ({typ})");
    let ctx = ctx.as_str();
    match typ {
        "insecureAcceptAnything" => {
            check_fields(o, ctx, &["type"])?;
            Ok(Requirement::InsecureAcceptAnything)
        }
        "reject" => {
            check_fields(o, ctx, &["type"])?;
            Ok(Requirement::Reject)
        }
        "signedBy" => {
            check_fields(
                o,
                ctx,
                &[
                    "type",
                    "keyType",
                    "keyPath",
                    "keyPaths",
                    "keyData",
                    "signedIdentity",
                ],
            )?;
            match string_field(o, "keyType", ctx)? {
                Some("GPGKeys") => {}
                Some(other) => {
                    return Err(format!(
                        "{ctx}: keyType {other:?} is not supported (only \"GPGKeys\")"
                    ))
                }
                None => return Err(format!("{ctx}: missing \"keyType\"")),
            }
            let keys = key_sources(o, ctx, false)?;
            Ok(Requirement::SignedBy {
                keys,
                identity: signed_identity(o, ctx)?,
            })
        }
        "sigstoreSigned" => {
            for unsupported in [
                "fulcio",
                "pki",
                "rekorPublicKeyPath",
                "rekorPublicKeyPaths",
                "rekorPublicKeyData",
                "rekorPublicKeyDatas",
            ] {
                if o.contains_key(unsupported) {
                    return Err(format!(
                        "{ctx}: {unsupported:?} is not supported: only key-based cosign signatures \
                         (keyPath/keyPaths/keyData/keyDatas) are verified"
                    ));
                }
            }
            check_fields(
                o,
                ctx,
                &[
                    "type",
                    "keyPath",
                    "keyPaths",
                    "keyData",
                    "keyDatas",
                    "signedIdentity",
                ],
            )?;
            let keys = key_sources(o, ctx, true)?;
            Ok(Requirement::SigstoreSigned {
                keys,
                identity: signed_identity(o, ctx)?,
            })
        }
        "signedBaseLayer" => Err(format!(
            "{ctx}: not supported (containers/image does not implement it either)"
        )),
        other => Err(format!("{ctx}: unknown requirement type {other:?}")),
    }
}

/// Exactly one of the key fields; `pem` selects sigstore semantics (`keyData` is base64 of a
/// PEM public key; raw PEM is also accepted because CoCo's image-rs reads it that way).
fn key_sources(o: &Map<String, Value>, ctx: &str, pem: bool) -> R<Vec<KeySource>> {
    let fields: &[&str] = if pem {
        &["keyPath", "keyPaths", "keyData", "keyDatas"]
    } else {
        &["keyPath", "keyPaths", "keyData"]
    };
    let present: Vec<&str> = fields
        .iter()
        .copied()
        .filter(|f| o.contains_key(*f))
        .collect();
    if present.len() != 1 {
        return Err(format!(
            "{ctx}: exactly one of {} must be present (found {})",
            fields.join(", "),
            present.len()
        ));
    }
    let field = present[0];
    let val = &o[field];
    let items: Vec<&Value> = match field {
        "keyPath" | "keyData" => vec![val],
        _ => {
            let a = val
                .as_array()
                .ok_or_else(|| format!("{ctx}: {field:?} must be a list of strings"))?;
            if a.is_empty() {
                return Err(format!("{ctx}: {field:?} must not be empty"));
            }
            a.iter().collect()
        }
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let s = item
            .as_str()
            .ok_or_else(|| format!("{ctx}: {field:?} must contain strings"))?;
        let label = if items_is_list(field) {
            format!("{field}[{i}]")
        } else {
            field.to_owned()
        };
        out.push(match field {
            "keyPath" | "keyPaths" => {
                KeySource::Uri(key_uri(s).map_err(|e| format!("{ctx}: {label}: {e}"))?)
            }
            _ => KeySource::Inline {
                data: decode_key_data(s, pem).map_err(|e| format!("{ctx}: {label}: {e}"))?,
                label,
            },
        });
    }
    Ok(out)
}

fn items_is_list(field: &str) -> bool {
    field.ends_with('s')
}

/// Turns a policy key path into a URI for the resource fetcher.
fn key_uri(s: &str) -> R<String> {
    if s.contains("://") {
        Ok(s.to_owned())
    } else if s.starts_with('/') {
        Ok(format!("file://{s}"))
    } else if s.is_empty() {
        Err("empty key path".into())
    } else {
        Err(format!(
            "{s:?} is neither a URI (kbs:///…, file:///…) nor an absolute path"
        ))
    }
}

fn decode_key_data(s: &str, pem: bool) -> R<Vec<u8>> {
    if pem && s.trim_start().starts_with("-----BEGIN") {
        return Ok(s.as_bytes().to_vec());
    }
    let compact: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let data = base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|e| format!("not valid base64 ({e})"))?;
    if data.is_empty() {
        return Err("empty key data".into());
    }
    Ok(data)
}

fn signed_identity(o: &Map<String, Value>, ctx: &str) -> R<SignedIdentity> {
    let Some(v) = o.get("signedIdentity") else {
        return Ok(SignedIdentity::MatchRepoDigestOrExact);
    };
    let ctx = format!("{ctx} signedIdentity");
    let ctx = ctx.as_str();
    let so = object(v, ctx)?;
    let typ = string_field(so, "type", ctx)?.ok_or_else(|| format!("{ctx}: missing \"type\""))?;
    let simple = |id| check_fields(so, ctx, &["type"]).map(|_| id);
    match typ {
        "matchExact" => simple(SignedIdentity::MatchExact),
        "matchRepoDigestOrExact" => simple(SignedIdentity::MatchRepoDigestOrExact),
        "matchRepository" => simple(SignedIdentity::MatchRepository),
        "exactReference" => {
            check_fields(so, ctx, &["type", "dockerReference"])?;
            let s = string_field(so, "dockerReference", ctx)?
                .ok_or_else(|| format!("{ctx}: missing \"dockerReference\""))?;
            let r = DockerRef::parse_normalized(s).map_err(|e| format!("{ctx}: {e}"))?;
            if r.is_name_only() {
                return Err(format!(
                    "{ctx}: dockerReference {s:?} must contain a tag or digest"
                ));
            }
            Ok(SignedIdentity::ExactReference(r))
        }
        "exactRepository" => {
            check_fields(so, ctx, &["type", "dockerRepository"])?;
            let s = string_field(so, "dockerRepository", ctx)?
                .ok_or_else(|| format!("{ctx}: missing \"dockerRepository\""))?;
            let r = DockerRef::parse_normalized(s).map_err(|e| format!("{ctx}: {e}"))?;
            Ok(SignedIdentity::ExactRepository(r))
        }
        "remapIdentity" => {
            check_fields(so, ctx, &["type", "prefix", "signedPrefix"])?;
            let prefix = string_field(so, "prefix", ctx)?
                .ok_or_else(|| format!("{ctx}: missing \"prefix\""))?;
            let signed_prefix = string_field(so, "signedPrefix", ctx)?
                .ok_or_else(|| format!("{ctx}: missing \"signedPrefix\""))?;
            validate_prefix(prefix).map_err(|e| format!("{ctx}: prefix: {e}"))?;
            validate_prefix(signed_prefix).map_err(|e| format!("{ctx}: signedPrefix: {e}"))?;
            Ok(SignedIdentity::RemapIdentity {
                prefix: prefix.to_owned(),
                signed_prefix: signed_prefix.to_owned(),
            })
        }
        other => Err(format!("{ctx}: unknown type {other:?}")),
    }
}

fn object<'a>(v: &'a Value, ctx: &str) -> R<&'a Map<String, Value>> {
    v.as_object()
        .ok_or_else(|| format!("{ctx}: expected a JSON object"))
}

fn check_fields(o: &Map<String, Value>, ctx: &str, allowed: &[&str]) -> R<()> {
    match o.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!("{ctx}: unknown field {k:?}")),
        None => Ok(()),
    }
}

fn string_field<'a>(o: &'a Map<String, Value>, f: &str, ctx: &str) -> R<Option<&'a str>> {
    match o.get(f) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{ctx}: {f:?} must be a string")),
    }
}

impl Policy {
    /// The requirements that apply to `image` and a label for the scope they came from:
    /// exact identity, repository and parent namespaces (longest first), `*.domain` wildcards,
    /// the transport default `""`, then the global `default`.
    pub fn requirements_for(&self, image: &DockerRef) -> (String, &[Requirement]) {
        let identity = image.to_string();
        if let Some(r) = self.docker.get(&identity) {
            return (format!("docker {identity:?}"), r);
        }
        for ns in super::reference::namespaces(image) {
            if let Some(r) = self.docker.get(&ns) {
                return (format!("docker {ns:?}"), r);
            }
        }
        if let Some(r) = self.docker.get("") {
            return ("docker \"\" (transport default)".into(), r);
        }
        ("default".into(), &self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        parse_policy(json.as_bytes()).unwrap_err()
    }

    #[test]
    fn rejects_invalid_policies() {
        assert!(err("{}").contains("\"default\""));
        assert!(err(r#"{"default":[]}"#).contains("empty"));
        assert!(
            err(r#"{"default":[{"type":"reject"}],"transports":{"docker":{"reg.io":[]}}}"#)
                .contains("scope \"reg.io\"")
        );
        assert!(err(r#"{"default":[{"type":"reject","x":1}]}"#).contains("unknown field \"x\""));
        assert!(err(r#"{"default":[{"type":"nope"}]}"#).contains("unknown requirement type"));
        assert!(err(r#"{"default":[{"type":"reject"}],"extra":1}"#).contains("unknown field"));
        assert!(err(r#"{"default":[{"type":"signedBy","keyPath":"/k"}]}"#).contains("keyType"));
        assert!(err(
            r#"{"default":[{"type":"signedBy","keyType":"X509Certificates","keyPath":"/k"}]}"#
        )
        .contains("not supported"));
        assert!(
            err(r#"{"default":[{"type":"signedBy","keyType":"GPGKeys"}]}"#).contains("exactly one")
        );
        assert!(err(r#"{"default":[{"type":"signedBy","keyType":"GPGKeys","keyPath":"/k","keyData":"AA=="}]}"#)
            .contains("exactly one"));
        assert!(
            err(r#"{"default":[{"type":"signedBy","keyType":"GPGKeys","keyPath":"rel/k"}]}"#)
                .contains("absolute path")
        );
        assert!(
            err(r#"{"default":[{"type":"signedBy","keyType":"GPGKeys","keyData":"!!"}]}"#)
                .contains("base64")
        );
        assert!(err(
            r#"{"default":[{"type":"sigstoreSigned","keyPath":"/k","rekorPublicKeyPath":"/r"}]}"#
        )
        .contains("key-based"));
        assert!(err(r#"{"default":[{"type":"sigstoreSigned","keyPath":"/k","signedIdentity":{"type":"exactReference","dockerReference":"reg.io/a"}}]}"#)
            .contains("tag or digest"));
        assert!(err(r#"{"default":[{"type":"sigstoreSigned","keyPath":"/k","signedIdentity":{"type":"remapIdentity","prefix":"reg.io/a:1","signedPrefix":"x.io"}}]}"#)
            .contains("prefix"));
        assert!(err(r#"{"default":[{"type":"reject"}],"transports":{"docker":{"busybox:latest":[{"type":"reject"}]}}}"#)
            .contains("fully expanded"));
        assert!(err(r#"{"default":[{"type":"reject"}],"transports":{"docker":{"*.a*.com":[{"type":"reject"}]}}}"#)
            .contains("wildcard"));
        assert!(err("not json").contains("JSON"));
    }

    #[test]
    fn parses_every_requirement_and_identity() {
        let p = parse_policy(
            br#"{"default":[{"type":"insecureAcceptAnything"}],
            "transports":{
              "docker":{
                "reg.io/a":[{"type":"signedBy","keyType":"GPGKeys","keyPaths":["/k1","kbs:///r/k/2"],
                             "signedIdentity":{"type":"matchExact"}}],
                "reg.io/b":[{"type":"sigstoreSigned","keyData":"LS0tLS1CRUdJTg==",
                             "signedIdentity":{"type":"exactRepository","dockerRepository":"x.io/y"}}],
                "reg.io/c":[{"type":"sigstoreSigned","keyDatas":["-----BEGIN PUBLIC KEY-----\n"]}],
                "reg.io/d":[{"type":"reject"},{"type":"signedBy","keyType":"GPGKeys","keyData":"AAEC",
                             "signedIdentity":{"type":"remapIdentity","prefix":"reg.io/d","signedPrefix":"up.io"}}],
                "*.example.com":[{"type":"reject"}],
                "":[{"type":"reject"}]
              },
              "oci":{"":[{"type":"insecureAcceptAnything"}]}
            }}"#,
        )
        .unwrap();
        assert_eq!(p.docker.len(), 6);
        match &p.docker["reg.io/a"][0] {
            Requirement::SignedBy { keys, identity } => {
                assert_eq!(identity, &SignedIdentity::MatchExact);
                assert!(matches!(&keys[0], KeySource::Uri(u) if u == "file:///k1"));
                assert!(matches!(&keys[1], KeySource::Uri(u) if u == "kbs:///r/k/2"));
            }
            other => panic!("{other:?}"),
        }
        match &p.docker["reg.io/b"][0] {
            Requirement::SigstoreSigned { keys, .. } => {
                assert!(
                    matches!(&keys[0], KeySource::Inline { data, .. } if data == b"-----BEGIN")
                );
            }
            other => panic!("{other:?}"),
        }
        match &p.docker["reg.io/c"][0] {
            Requirement::SigstoreSigned { keys, identity } => {
                assert_eq!(identity, &SignedIdentity::MatchRepoDigestOrExact);
                assert!(
                    matches!(&keys[0], KeySource::Inline { label, .. } if label == "keyDatas[0]")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn scope_lookup_order() {
        let p = parse_policy(
            br#"{"default":[{"type":"reject"}],"transports":{"docker":{
                "reg.example.com:5000/ns/app:v1":[{"type":"insecureAcceptAnything"}],
                "reg.example.com:5000/ns/app":[{"type":"insecureAcceptAnything"}],
                "reg.example.com:5000/ns":[{"type":"insecureAcceptAnything"}],
                "reg.example.com:5000":[{"type":"insecureAcceptAnything"}],
                "docker.io/library":[{"type":"insecureAcceptAnything"}],
                "*.example.com":[{"type":"insecureAcceptAnything"}],
                "":[{"type":"insecureAcceptAnything"}]}}}"#,
        )
        .unwrap();
        let scope = |r: &str| {
            p.requirements_for(&DockerRef::from_requested(&r.parse().unwrap()))
                .0
        };
        assert_eq!(
            scope("reg.example.com:5000/ns/app:v1"),
            "docker \"reg.example.com:5000/ns/app:v1\""
        );
        assert_eq!(
            scope("reg.example.com:5000/ns/app:v2"),
            "docker \"reg.example.com:5000/ns/app\""
        );
        assert_eq!(
            scope("reg.example.com:5000/ns/other:v2"),
            "docker \"reg.example.com:5000/ns\""
        );
        assert_eq!(
            scope("reg.example.com:5000/x/y"),
            "docker \"reg.example.com:5000\""
        );
        assert_eq!(scope("other.example.com/x/y"), "docker \"*.example.com\"");
        assert_eq!(scope("quay.io/x/y"), "docker \"\" (transport default)");
        assert_eq!(scope("busybox"), "docker \"docker.io/library\"");
        let p2 = parse_policy(br#"{"default":[{"type":"reject"}]}"#).unwrap();
        assert_eq!(
            p2.requirements_for(&DockerRef::from_requested(&"busybox".parse().unwrap()))
                .0,
            "default"
        );
    }
}
