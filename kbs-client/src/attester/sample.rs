//! The reference's `sample` attester: no hardware, report data in the clear (for CI and development).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

/// `{"svn":"1","report_data":"<base64 std>"}` with the digest unpadded, as the sample verifier compares byte-exactly.
pub(crate) fn evidence(report_data: &[u8]) -> Value {
    json!({ "svn": "1", "report_data": STANDARD.encode(report_data) })
}

#[cfg(test)]
mod tests {
    #[test]
    fn shape_matches_reference() {
        let v = super::evidence(&[0xAB; 48]);
        assert_eq!(v["svn"], "1");
        assert_eq!(v["report_data"].as_str().unwrap().len(), 64);
        assert_eq!(v.as_object().unwrap().len(), 2);
    }
}
