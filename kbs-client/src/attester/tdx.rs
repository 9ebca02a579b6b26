//! Intel TDX evidence: a TD quote through configfs-tsm plus the CC event log when present.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

use super::{pad64, tsm};
use crate::config::HardwarePaths;
use crate::error::Error;

fn err(detail: String) -> Error {
    Error::Evidence {
        tee: "tdx".into(),
        detail,
    }
}

/// `{"cc_eventlog": <b64>|null, "quote": <b64>}` with report data padded to 64 bytes.
pub(crate) fn evidence(paths: &HardwarePaths, report_data: &[u8]) -> Result<Value, Error> {
    if report_data.len() > 64 {
        return Err(err(format!(
            "report data is {} bytes, TDX allows 64",
            report_data.len()
        )));
    }
    let rep = tsm::report(&paths.tsm_report_dir, &pad64(report_data), false).map_err(err)?;
    if !rep.provider.starts_with("tdx") {
        return Err(err(format!(
            "configfs-tsm provider is {:?}, not tdx_guest",
            rep.provider
        )));
    }
    let ccel = std::fs::read(&paths.ccel_path)
        .ok()
        .filter(|b| !b.is_empty());
    Ok(build(&rep.outblob, ccel.as_deref()))
}

fn build(quote: &[u8], ccel: Option<&[u8]>) -> Value {
    json!({
        "cc_eventlog": ccel.map(|c| STANDARD.encode(c)),
        "quote": STANDARD.encode(quote),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_matches_reference() {
        let v = build(b"quote", None);
        assert_eq!(v.to_string(), r#"{"cc_eventlog":null,"quote":"cXVvdGU="}"#);
        let v = build(b"quote", Some(b"log"));
        assert_eq!(v["cc_eventlog"], "bG9n");
    }

    #[test]
    fn missing_tsm_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let paths = HardwarePaths {
            tsm_report_dir: d.path().join("none"),
            ..HardwarePaths::default()
        };
        let e = evidence(&paths, &[0u8; 48]).unwrap_err().to_string();
        assert!(e.contains("tdx") && e.contains("does not exist"), "{e}");
    }
}
