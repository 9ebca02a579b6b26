//! Intel TDX evidence: a TD quote through configfs-tsm plus the CC event log (firmware CCEL and
//! the attestation-agent's log) when present; RTMR reads and extensions through sysfs.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

use super::{eventlog, pad64, tsm};
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
    let read = |p: &std::path::Path| std::fs::read(p).ok().filter(|b| !b.is_empty());
    let (ccel, aael) = (read(&paths.ccel_path), read(&paths.aael_path));
    let log = eventlog::cc_eventlog(ccel.as_deref(), aael.as_deref()).map_err(err)?;
    Ok(build(&rep.outblob, log.as_deref()))
}

/// The sysfs file of RTMR `index` (0..=3); reading gives its value, writing 48 bytes extends it.
fn rtmr_file(paths: &HardwarePaths, index: u32) -> Result<std::path::PathBuf, Error> {
    if index > 3 {
        return Err(err(format!("RTMR index {index} does not exist (0..=3)")));
    }
    Ok(paths
        .tdx_measurements_dir
        .join(format!("rtmr{index}:sha384")))
}

/// The current value of RTMR `index`.
pub(crate) fn read_rtmr(paths: &HardwarePaths, index: u32) -> Result<Vec<u8>, Error> {
    let f = rtmr_file(paths, index)?;
    let v = std::fs::read(&f).map_err(|e| err(format!("reading {}: {e}", f.display())))?;
    if v.len() != MR_LEN {
        return Err(err(format!(
            "{} holds {} bytes, not {MR_LEN}",
            f.display(),
            v.len()
        )));
    }
    Ok(v)
}

/// Extends RTMR `index` with `digest`, zero-padded (or cut) to the register's 48 bytes.
pub(crate) fn extend_rtmr(paths: &HardwarePaths, index: u32, digest: &[u8]) -> Result<(), Error> {
    let f = rtmr_file(paths, index)?;
    let mut data = [0u8; MR_LEN];
    let n = digest.len().min(MR_LEN);
    data[..n].copy_from_slice(&digest[..n]);
    std::fs::write(&f, data).map_err(|e| err(format!("extending {}: {e}", f.display())))
}

/// MRCONFIGID of this TD, from a quote requested through configfs-tsm.
pub(crate) fn mrconfigid(paths: &HardwarePaths) -> Result<Vec<u8>, Error> {
    let rep = tsm::report(&paths.tsm_report_dir, &[0u8; 64], false).map_err(err)?;
    if !rep.provider.starts_with("tdx") {
        return Err(err(format!(
            "configfs-tsm provider is {:?}, not tdx_guest",
            rep.provider
        )));
    }
    quote_mrconfigid(&rep.outblob)
        .map(<[u8]>::to_vec)
        .map_err(err)
}

/// Width of TDX measurement registers (SHA-384).
pub(crate) const MR_LEN: usize = 48;
/// Quote header length (v4 and v5).
const QUOTE_HEADER_LEN: usize = 48;
/// Offset of MRCONFIGID in the TD quote body: TEE_TCB_SVN(16) MRSEAM(48) MRSIGNERSEAM(48)
/// SEAMATTRIBUTES(8) TDATTRIBUTES(8) XFAM(8) MRTD(48).
const MRCONFIGID_OFFSET: usize = 184;

/// MRCONFIGID from a TDX quote (v4, or v5 whose body has a 6-byte type/size prefix).
pub(crate) fn quote_mrconfigid(quote: &[u8]) -> Result<&[u8], String> {
    let version = quote
        .get(..2)
        .map(|v| u16::from_le_bytes([v[0], v[1]]))
        .ok_or("the TDX quote is empty")?;
    let body = match version {
        4 => QUOTE_HEADER_LEN,
        5 => QUOTE_HEADER_LEN + 6,
        v => return Err(format!("TDX quote version {v} is not supported (4 or 5)")),
    };
    let start = body + MRCONFIGID_OFFSET;
    quote
        .get(start..start + MR_LEN)
        .ok_or_else(|| format!("the TDX quote is too short ({} bytes)", quote.len()))
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
    fn mrconfigid_is_read_from_v4_and_v5_quotes() {
        let mut q4 = vec![0u8; 632];
        q4[0] = 4;
        q4[48 + 184..48 + 184 + 48].copy_from_slice(&[7u8; 48]);
        assert_eq!(quote_mrconfigid(&q4).unwrap(), &[7u8; 48]);
        let mut q5 = vec![0u8; 700];
        q5[0] = 5;
        q5[54 + 184..54 + 184 + 48].copy_from_slice(&[9u8; 48]);
        assert_eq!(quote_mrconfigid(&q5).unwrap(), &[9u8; 48]);
        assert!(quote_mrconfigid(&q4[..200])
            .unwrap_err()
            .contains("too short"));
        let mut q3 = q4.clone();
        q3[0] = 3;
        assert!(quote_mrconfigid(&q3).unwrap_err().contains("version 3"));
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

    #[test]
    fn rtmrs_are_read_and_written_through_their_sysfs_files() {
        let d = tempfile::tempdir().unwrap();
        let paths = HardwarePaths {
            tdx_measurements_dir: d.path().to_path_buf(),
            ..HardwarePaths::default()
        };
        let f = d.path().join("rtmr3:sha384");
        std::fs::write(&f, [0u8; MR_LEN]).unwrap();
        assert_eq!(read_rtmr(&paths, 3).unwrap(), vec![0u8; MR_LEN]);
        // A plain file only records the write; the kernel's file would extend instead.
        extend_rtmr(&paths, 3, &[7u8; 32]).unwrap();
        let written = std::fs::read(&f).unwrap();
        assert_eq!(&written[..32], &[7u8; 32]);
        assert_eq!(&written[32..], &[0u8; 16]);
        assert!(read_rtmr(&paths, 2)
            .unwrap_err()
            .to_string()
            .contains("rtmr2"));
        assert!(extend_rtmr(&paths, 4, &[0u8; 48])
            .unwrap_err()
            .to_string()
            .contains("0..=3"));
        std::fs::write(&f, [0u8; 5]).unwrap();
        assert!(read_rtmr(&paths, 3)
            .unwrap_err()
            .to_string()
            .contains("5 bytes"));
    }
}
