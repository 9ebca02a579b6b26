//! AMD SEV-SNP evidence: the attestation report (configfs-tsm, else `/dev/sev-guest`) and the
//! certificate chain when the host provides one, in the `sev` crate's serde shape the verifier reads.

use serde_json::{json, Value};
use sev::firmware::guest::{AttestationReport, Firmware};
use sev::firmware::host::{CertTableEntry, CertType};
use sev::parser::ByteParser;

use super::{pad64, tsm};
use crate::config::HardwarePaths;
use crate::error::Error;

fn err(detail: String) -> Error {
    Error::Evidence {
        tee: "snp".into(),
        detail,
    }
}

/// `{"attestation_report": <AttestationReport>, "cert_chain": [CertTableEntry…] | null}`.
pub(crate) fn evidence(paths: &HardwarePaths, report_data: &[u8]) -> Result<Value, Error> {
    if report_data.len() > 64 {
        return Err(err(format!(
            "report data is {} bytes, SNP allows 64",
            report_data.len()
        )));
    }
    let (raw, certs) = raw_report(paths, pad64(report_data))?;
    let report = AttestationReport::from_bytes(&raw)
        .map_err(|e| err(format!("cannot parse the attestation report: {e}")))?;
    build(&report, certs)
}

/// The raw attestation report (and the host's certificate table) for 64 bytes of report data.
fn raw_report(
    paths: &HardwarePaths,
    data: [u8; 64],
) -> Result<(Vec<u8>, Option<Vec<CertTableEntry>>), Error> {
    Ok(if paths.tsm_report_dir.is_dir() {
        let rep = tsm::report(&paths.tsm_report_dir, &data, true).map_err(err)?;
        if !rep.provider.starts_with("sev") {
            return Err(err(format!(
                "configfs-tsm provider is {:?}, not sev_guest",
                rep.provider
            )));
        }
        let certs = match rep.auxblob {
            Some(aux) => Some(parse_cert_table(&aux).map_err(err)?),
            None => None,
        };
        (rep.outblob, certs)
    } else if paths.sev_guest_dev.exists() {
        // The sev crate's ioctl wrapper opens the fixed path /dev/sev-guest.
        let mut fw = Firmware::open().map_err(|e| err(format!("opening /dev/sev-guest: {e}")))?;
        fw.get_ext_report(None, Some(data), Some(0))
            .map_err(|e| err(format!("SNP_GET_EXT_REPORT failed: {e}")))?
    } else {
        return Err(err(format!(
            "neither {} nor {} exists",
            paths.tsm_report_dir.display(),
            paths.sev_guest_dev.display()
        )));
    })
}

/// Offset and width of HOST_DATA in the SNP attestation report (set by the host at launch).
const HOST_DATA: std::ops::Range<usize> = 0xC0..0xE0;

/// HOST_DATA of this guest, from a fresh attestation report.
pub(crate) fn host_data(paths: &HardwarePaths) -> Result<Vec<u8>, Error> {
    let (raw, _) = raw_report(paths, [0u8; 64])?;
    report_host_data(&raw).map(<[u8]>::to_vec).map_err(err)
}

/// HOST_DATA from raw report bytes.
pub(crate) fn report_host_data(raw: &[u8]) -> Result<&[u8], String> {
    raw.get(HOST_DATA)
        .ok_or_else(|| format!("the SNP report is too short ({} bytes)", raw.len()))
}

fn build(report: &AttestationReport, certs: Option<Vec<CertTableEntry>>) -> Result<Value, Error> {
    Ok(json!({
        "attestation_report": serde_json::to_value(report).map_err(|e| err(e.to_string()))?,
        "cert_chain": serde_json::to_value(certs).map_err(|e| err(e.to_string()))?,
    }))
}

/// Parses the GHCB certificate table (`{guid[16], offset u32le, length u32le}…`, zero-GUID terminated).
///
/// Hand-written because the `sev` crate's parser takes a raw pointer and panics on bad input,
/// while the auxblob comes from the untrusted host.
pub(crate) fn parse_cert_table(buf: &[u8]) -> Result<Vec<CertTableEntry>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let hdr = buf
            .get(pos..pos + 24)
            .ok_or("certificate table is not terminated")?;
        let guid: [u8; 16] = hdr[..16].try_into().expect("16 bytes");
        if guid == [0u8; 16] {
            return Ok(out);
        }
        let off = u32::from_le_bytes(hdr[16..20].try_into().expect("4")) as usize;
        let len = u32::from_le_bytes(hdr[20..24].try_into().expect("4")) as usize;
        let data = buf
            .get(off..off.checked_add(len).ok_or("certificate length overflows")?)
            .ok_or("certificate entry points outside the table")?;
        let uuid = uuid_from_bytes(guid);
        let cert_type = CertType::try_from(&uuid).map_err(|e| e.to_string())?;
        out.push(CertTableEntry::new(cert_type, data.to_vec()));
        pos += 24;
    }
}

fn uuid_from_bytes(b: [u8; 16]) -> uuid::Uuid {
    uuid::Uuid::from_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_table_parsing() {
        let vcek = uuid_from_bytes(
            *uuid::Uuid::parse_str("63da758d-e664-4564-adc5-f4b93be8accd")
                .unwrap()
                .as_bytes(),
        );
        let mut buf = Vec::new();
        buf.extend_from_slice(vcek.as_bytes());
        buf.extend_from_slice(&48u32.to_le_bytes());
        buf.extend_from_slice(&3u32.to_le_bytes());
        buf.extend_from_slice(&[0u8; 24]);
        buf.extend_from_slice(b"DER");
        let t = parse_cert_table(&buf).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].cert_type, CertType::VCEK);
        assert_eq!(t[0].data, b"DER");
        assert!(parse_cert_table(&buf[..30]).is_err());
        let mut bad = buf.clone();
        bad[16] = 200;
        assert!(parse_cert_table(&bad).is_err());
    }

    #[test]
    fn host_data_is_at_0xc0() {
        let mut raw = vec![0u8; 1184];
        raw[0xC0..0xE0].copy_from_slice(&[5u8; 32]);
        assert_eq!(report_host_data(&raw).unwrap(), &[5u8; 32]);
        assert!(report_host_data(&raw[..0xD0]).is_err());
    }

    #[test]
    fn evidence_shape() {
        let v = build(&AttestationReport::default(), None).unwrap();
        assert!(v["attestation_report"].is_object());
        assert!(v["cert_chain"].is_null());
    }
}
