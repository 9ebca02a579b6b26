//! The signed JSON payloads: "atomic container signature" (simple signing) and "cosign
//! container image signature". Both have the same `critical` shape; parsing is as paranoid as
//! containers/image (exact field sets, no duplicates, integer timestamps) because the payload
//! is only trusted after these checks.

use serde_json::{Map, Value};

/// Simple-signing payload type.
pub(crate) const ATOMIC_TYPE: &str = "atomic container signature";
/// Cosign payload type.
pub(crate) const COSIGN_TYPE: &str = "cosign container image signature";

/// The claims of a cryptographically verified payload.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Claims {
    pub manifest_digest: String,
    pub docker_reference: String,
}

/// Parses a payload whose signature has already been verified.
pub(crate) fn parse(bytes: &[u8], expected_type: &str) -> Result<Claims, String> {
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("payload is not valid JSON: {e}"))?;
    let top = exact(&v, "payload", &["critical", "optional"])?;
    match &top["optional"] {
        // cosign writes `"optional": null` when there are no annotations.
        Value::Null if expected_type == COSIGN_TYPE => {}
        Value::Object(o) => {
            if let Some(ts) = o.get("timestamp") {
                if ts.as_i64().is_none() {
                    return Err("payload optional.timestamp is not an integer".into());
                }
            }
            if let Some(c) = o.get("creator") {
                if !c.is_string() {
                    return Err("payload optional.creator is not a string".into());
                }
            }
        }
        _ => return Err("payload \"optional\" is not an object".into()),
    }
    let critical = exact(
        &top["critical"],
        "payload critical",
        &["type", "image", "identity"],
    )?;
    let typ = critical["type"]
        .as_str()
        .ok_or("payload critical.type is not a string")?;
    if typ != expected_type {
        return Err(format!(
            "payload type is {typ:?}, expected {expected_type:?}"
        ));
    }
    let image = exact(
        &critical["image"],
        "payload critical.image",
        &["docker-manifest-digest"],
    )?;
    let identity = exact(
        &critical["identity"],
        "payload critical.identity",
        &["docker-reference"],
    )?;
    let manifest_digest = image["docker-manifest-digest"]
        .as_str()
        .ok_or("payload docker-manifest-digest is not a string")?;
    let docker_reference = identity["docker-reference"]
        .as_str()
        .ok_or("payload docker-reference is not a string")?;
    Ok(Claims {
        manifest_digest: manifest_digest.to_owned(),
        docker_reference: docker_reference.to_owned(),
    })
}

fn exact<'a>(v: &'a Value, ctx: &str, fields: &[&str]) -> Result<&'a Map<String, Value>, String> {
    let o = v
        .as_object()
        .ok_or_else(|| format!("{ctx} is not a JSON object"))?;
    for f in fields {
        if !o.contains_key(*f) {
            return Err(format!("{ctx} lacks field {f:?}"));
        }
    }
    if let Some(k) = o.keys().find(|k| !fields.contains(&k.as_str())) {
        return Err(format!("{ctx} has unexpected field {k:?}"));
    }
    Ok(o)
}

/// Builds a payload the way skopeo/cosign do, for tests.
#[cfg(test)]
pub(crate) fn build(payload_type: &str, manifest_digest: &str, docker_reference: &str) -> Vec<u8> {
    let optional = if payload_type == COSIGN_TYPE {
        Value::Null
    } else {
        serde_json::json!({"creator": "guestpull test", "timestamp": 1_700_000_000})
    };
    serde_json::to_vec(&serde_json::json!({
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": manifest_digest},
            "type": payload_type,
        },
        "optional": optional,
    }))
    .expect("serializing a JSON value cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_real_layouts() {
        let c = parse(
            br#"{"critical":{"identity":{"docker-reference":"127.0.0.1:5000/lab/busybox"},"image":{"docker-manifest-digest":"sha256:ab"},"type":"cosign container image signature"},"optional":null}"#,
            COSIGN_TYPE,
        )
        .unwrap();
        assert_eq!(c.docker_reference, "127.0.0.1:5000/lab/busybox");
        assert_eq!(c.manifest_digest, "sha256:ab");
        let c = parse(
            br#"{"critical":{"identity":{"docker-reference":"r/b:v1"},"image":{"docker-manifest-digest":"sha256:fe"},"type":"atomic container signature"},"optional":{"creator":"atomic 5.23.1","timestamp":1700000000}}"#,
            ATOMIC_TYPE,
        )
        .unwrap();
        assert_eq!(c.docker_reference, "r/b:v1");
    }

    #[test]
    fn rejects_malformed() {
        let ok = build(ATOMIC_TYPE, "sha256:ab", "r/b:1");
        assert!(parse(&ok, ATOMIC_TYPE).is_ok());
        assert!(parse(&ok, COSIGN_TYPE)
            .unwrap_err()
            .contains("payload type"));
        let bad = [
            r#"{"critical":{"identity":{"docker-reference":"r"},"image":{"docker-manifest-digest":"d"},"type":"atomic container signature"}}"#,
            r#"{"critical":{"identity":{"docker-reference":"r"},"image":{"docker-manifest-digest":"d"},"type":"atomic container signature","x":1},"optional":{}}"#,
            r#"{"critical":{"identity":{"docker-reference":"r"},"image":{"docker-manifest-digest":"d"},"type":"atomic container signature"},"optional":{"timestamp":1.5}}"#,
            r#"{"critical":{"identity":{"docker-reference":"r"},"image":{"docker-manifest-digest":"d"},"type":"atomic container signature"},"optional":null}"#,
            r#"{"critical":{"identity":{},"image":{"docker-manifest-digest":"d"},"type":"atomic container signature"},"optional":{}}"#,
            r#"[]"#,
        ];
        for b in bad {
            assert!(parse(b.as_bytes(), ATOMIC_TYPE).is_err(), "{b}");
        }
    }
}
