//! The attestation token (an EAR JWT) as the client needs it: the raw string plus its time claims.
//!
//! The signature is not verified here, as in the reference client: only the KBS relies on it,
//! and the client reads `exp`/`nbf` solely to re-attest before the token runs out.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use zeroize::Zeroizing;

/// Why a token could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed attestation token: {0}")]
pub struct TokenError(pub String);

/// A cached attestation token. `Debug` never prints the token itself.
#[derive(Clone)]
pub struct Token {
    raw: Zeroizing<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
    iat: Option<u64>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("raw", &"<redacted>")
            .field("exp", &self.exp)
            .field("nbf", &self.nbf)
            .field("iat", &self.iat)
            .finish()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Token {
    /// Parses a compact JWT's claims (without verifying it).
    pub fn parse(raw: &str) -> Result<Self, TokenError> {
        let mut parts = raw.split('.');
        let (_h, claims) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(h), Some(c), Some(_s), None) => (h, c),
            _ => return Err(TokenError("expected three dot-separated parts".into())),
        };
        let claims = URL_SAFE_NO_PAD
            .decode(claims.trim_end_matches('='))
            .map_err(|_| TokenError("claims are not base64url".into()))?;
        let claims: serde_json::Value = serde_json::from_slice(&claims)
            .map_err(|_| TokenError("claims are not JSON".into()))?;
        let num = |k: &str| -> Result<Option<u64>, TokenError> {
            match claims.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                    .map(Some)
                    .ok_or_else(|| TokenError(format!("claim {k} is not a number"))),
            }
        };
        Ok(Self {
            exp: num("exp")?,
            nbf: num("nbf")?,
            iat: num("iat")?,
            raw: Zeroizing::new(raw.to_string()),
        })
    }

    /// The compact JWT, for an `Authorization: Bearer` header or to print for a passport hand-over.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// `exp` in seconds since the epoch, if present.
    pub fn exp(&self) -> Option<u64> {
        self.exp
    }

    /// `nbf` in seconds since the epoch, if present.
    pub fn nbf(&self) -> Option<u64> {
        self.nbf
    }

    /// Whether the token should be replaced now: `exp` is within `margin` (or past).
    ///
    /// The margin is capped at a tenth of the token's lifetime (when `iat` is known) so that
    /// short-lived tokens are still used for most of their life.
    pub fn needs_refresh(&self, margin: Duration) -> bool {
        let Some(exp) = self.exp else { return false };
        let mut margin = margin.as_secs();
        if let Some(iat) = self.iat {
            margin = margin.min(exp.saturating_sub(iat) / 10);
        }
        now_secs().saturating_add(margin) >= exp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        format!(
            "{}.{}.sig",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256"}"#),
            URL_SAFE_NO_PAD.encode(claims)
        )
    }

    #[test]
    fn reads_time_claims() {
        let t = Token::parse(&jwt(r#"{"exp":2000000000,"iat":1999999000,"nbf":1}"#)).unwrap();
        assert_eq!(t.exp(), Some(2_000_000_000));
        assert_eq!(t.nbf(), Some(1));
        assert!(!format!("{t:?}").contains("sig"));
    }

    #[test]
    fn refresh_before_expiry() {
        let now = now_secs();
        let fresh =
            Token::parse(&jwt(&format!(r#"{{"exp":{},"iat":{}}}"#, now + 300, now))).unwrap();
        assert!(!fresh.needs_refresh(Duration::from_secs(10)));
        // within the 10 s margin (capped at lifetime/10 = 30 s) -> refresh
        let near = Token::parse(&jwt(&format!(
            r#"{{"exp":{},"iat":{}}}"#,
            now + 5,
            now - 295
        )))
        .unwrap();
        assert!(near.needs_refresh(Duration::from_secs(10)));
        let expired = Token::parse(&jwt(&format!(r#"{{"exp":{}}}"#, now - 1))).unwrap();
        assert!(expired.needs_refresh(Duration::ZERO));
        let no_exp = Token::parse(&jwt("{}")).unwrap();
        assert!(!no_exp.needs_refresh(Duration::from_secs(10)));
    }

    #[test]
    fn rejects_garbage() {
        assert!(Token::parse("abc").is_err());
        assert!(Token::parse("a.b.c.d").is_err());
        assert!(Token::parse(&jwt("[1]")).is_ok());
        assert!(Token::parse(&jwt(r#"{"exp":"soon"}"#)).is_err());
    }
}
