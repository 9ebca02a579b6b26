//! Wire protocol of the node cache (HTTP/1.1; std only, no dependencies).
//!
//! Blobs are addressed by `sha256:<64 lowercase hex>` digests only, at
//! `/v1/blobs/sha256:<hex>` ([`blob_path`]):
//!
//! - `GET` → `200` with `Content-Length`, `Content-Type: application/octet-stream` and
//!   `Docker-Content-Digest: <digest>`; a single `Range: bytes=a-b`, `bytes=a-` or `bytes=-n`
//!   → `206` with `Content-Range: bytes a-b/size`, unsatisfiable → `416` (`Content-Range:
//!   bytes */size`); other Range forms are ignored (`200`). Absent → `404`.
//! - `HEAD` → `200` with `Content-Length`, or `404`.
//! - `PUT` with `Content-Length` (required, else `411`) and the blob as body → `201` once the
//!   blob is durably stored; `200` at once, without reading the body, if already present; `400`
//!   (text body says which) if the body's size or SHA-256 differs from the declared ones;
//!   `409` if the same digest is being uploaded; `413` if larger than the blob or cache limit;
//!   `503` if too many uploads are in progress. The rejections other than `400` are answered
//!   before the body is read: send `Expect: 100-continue` to avoid sending it at all.
//! - An invalid digest under [`API_PREFIX`] → `400`; other paths → `404`; other methods → `405`.
//!
//! [`STATS_PATH`] (`GET`) answers the counters as JSON (see `store::Stats`).
//!
//! The server never checks the content beyond its digest and is not trusted by the guest: a
//! `200` body must still be verified by digest (and length) before use.

/// Prefix of every blob URL.
pub const API_PREFIX: &str = "/v1/blobs/";
/// Path of the JSON counters.
pub const STATS_PATH: &str = "/v1/stats";
/// Response header carrying the blob's digest.
pub const DIGEST_HEADER: &str = "Docker-Content-Digest";
/// The only accepted algorithm prefix.
pub const SHA256_PREFIX: &str = "sha256:";

/// Validates `s` as `sha256:` + exactly 64 lowercase hex characters and returns the hex part.
/// Anything else (uppercase, other algorithms, `..`, whitespace, short or long) is `None`.
pub fn parse_digest(s: &str) -> Option<&str> {
    let hex = s.strip_prefix(SHA256_PREFIX)?;
    let ok = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ok.then_some(hex)
}

/// Whether `s` is a digest the cache accepts (see [`parse_digest`]).
pub fn is_valid_digest(s: &str) -> bool {
    parse_digest(s).is_some()
}

/// URL path of a blob, `/v1/blobs/sha256:<hex>`, or `None` for an invalid digest.
pub fn blob_path(digest: &str) -> Option<String> {
    parse_digest(digest).map(|_| format!("{API_PREFIX}{digest}"))
}

/// The digest of a blob URL path: `Some(Some(digest))` for a valid one, `Some(None)` for a
/// path under [`API_PREFIX`] with an invalid digest, `None` for any other path.
pub fn digest_from_path(path: &str) -> Option<Option<&str>> {
    let rest = path.strip_prefix(API_PREFIX)?;
    Some(is_valid_digest(rest).then_some(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digests_are_strict() {
        let good = format!("sha256:{HEX}");
        assert_eq!(parse_digest(&good), Some(HEX));
        assert_eq!(blob_path(&good).unwrap(), format!("/v1/blobs/{good}"));
        assert_eq!(
            digest_from_path(&blob_path(&good).unwrap()),
            Some(Some(good.as_str()))
        );
        for bad in [
            format!("sha256:{}", HEX.to_uppercase()),
            format!("sha512:{HEX}"),
            format!("sha256:{}", &HEX[1..]),
            format!("sha256:{HEX}0"),
            format!("sha256:../{}", &HEX[3..]),
            format!(" sha256:{HEX}"),
            HEX.to_string(),
            String::new(),
        ] {
            assert_eq!(parse_digest(&bad), None, "{bad}");
            assert_eq!(blob_path(&bad), None, "{bad}");
        }
        assert_eq!(digest_from_path("/v1/blobs/../stats"), Some(None));
        assert_eq!(digest_from_path("/v1/other"), None);
    }
}
