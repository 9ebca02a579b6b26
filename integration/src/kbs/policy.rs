//! The test KBS resource policy: allow all, deny all, or allow only listed `repo/type/tag` globs.
//!
//! File format (TOML, or JSON when the text starts with `{`):
//! ```toml
//! mode = "allow-listed"            # or "allow-all" / "deny-all"
//! allow = ["default/key/*", "default/security-policy/test"]
//! ```
//! Globs use `glob::Pattern` syntax per whole path (`*` also matches `/`, so keep one per segment).

use serde::{Deserialize, Serialize};

/// A resource policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum ResourcePolicy {
    /// Every attested client gets every resource.
    #[default]
    AllowAll,
    /// Nobody gets anything (the trustee default for the sample TEE behaves like this).
    DenyAll,
    /// Only paths matching one of the globs.
    AllowListed {
        /// `repo/type/tag` glob patterns.
        allow: Vec<String>,
    },
}

impl ResourcePolicy {
    /// Parses the TOML or JSON policy text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let p: ResourcePolicy = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| format!("policy JSON: {e}"))?
        } else {
            toml::from_str(text).map_err(|e| format!("policy TOML: {e}"))?
        };
        if let ResourcePolicy::AllowListed { allow } = &p {
            for g in allow {
                glob::Pattern::new(g).map_err(|e| format!("policy glob {g:?}: {e}"))?;
            }
        }
        Ok(p)
    }

    /// Whether `path` (`repo/type/tag`) is allowed.
    pub fn allows(&self, path: &str) -> bool {
        match self {
            ResourcePolicy::AllowAll => true,
            ResourcePolicy::DenyAll => false,
            ResourcePolicy::AllowListed { allow } => allow.iter().any(|g| {
                glob::Pattern::new(g)
                    .map(|p| p.matches(path))
                    .unwrap_or(false)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_formats() {
        let p =
            ResourcePolicy::parse("mode = \"allow-listed\"\nallow = [\"default/key/*\"]").unwrap();
        assert!(p.allows("default/key/k1"));
        assert!(!p.allows("default/cert/k1"));
        assert_eq!(
            ResourcePolicy::parse(r#"{"mode":"deny-all"}"#).unwrap(),
            ResourcePolicy::DenyAll
        );
        assert!(ResourcePolicy::parse("mode = \"maybe\"").is_err());
        assert!(ResourcePolicy::parse("mode = \"allow-listed\"\nallow = [\"[\"]").is_err());
    }
}
