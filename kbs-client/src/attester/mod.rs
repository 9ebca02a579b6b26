//! Evidence providers (sample, tdx, snp) and the SEV launch-secret reader, with autodetection.

mod sample;
pub mod sev;
mod snp;
mod tdx;
mod tsm;

use serde_json::Value;
use tracing::{info, warn};

use crate::config::{HardwarePaths, Tee};
use crate::error::Error;

pub use sev::LaunchSecrets;

/// Picks the TEE: the explicit override, else the first hardware interface found, else `sample`.
///
/// Order follows the reference (`tdx` before `snp`); SEV(-ES) is chosen when only the EFI secret
/// area exists, since those guests have no runtime attestation interface.
pub fn detect(paths: &HardwarePaths, explicit: Option<Tee>) -> Tee {
    if let Some(t) = explicit {
        info!(tee = %t, "using configured TEE");
        return t;
    }
    if paths.tdx_guest_dev.exists() {
        return Tee::Tdx;
    }
    if paths.sev_guest_dev.exists() {
        return Tee::Snp;
    }
    if let Some(provider) = tsm::probe_provider(&paths.tsm_report_dir) {
        match provider.as_str() {
            p if p.starts_with("tdx") => return Tee::Tdx,
            p if p.starts_with("sev") => return Tee::Snp,
            other => warn!(provider = other, "unknown configfs-tsm provider; ignoring"),
        }
    }
    if paths.efi_secrets_dir.is_dir() {
        info!(dir = %paths.efi_secrets_dir.display(), "no attestation device but an EFI secret area: using SEV launch secrets");
        return Tee::Sev;
    }
    warn!("no TEE attestation interface found; falling back to the SAMPLE attester, which only permissive KBS policies accept");
    Tee::Sample
}

/// Collects `primary_evidence` for `tee`, binding `report_data` (unpadded digest) into it.
///
/// Runs blocking filesystem/ioctl work on the blocking pool.
pub async fn evidence(
    tee: Tee,
    paths: &HardwarePaths,
    report_data: Vec<u8>,
) -> Result<Value, Error> {
    let paths = paths.clone();
    let job = move || match tee {
        Tee::Sample => Ok(sample::evidence(&report_data)),
        Tee::Tdx => tdx::evidence(&paths, &report_data),
        Tee::Snp => snp::evidence(&paths, &report_data),
        Tee::Sev => Err(Error::Unsupported(
            "SEV/SEV-ES has no runtime attestation: resources come from the launch secret area"
                .into(),
        )),
    };
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|e| Error::Evidence {
            tee: tee.to_string(),
            detail: format!("evidence task failed: {e}"),
        })?
}

/// Zero-pads (or truncates) report data to the 64-byte REPORT_DATA field of TDX/SNP.
pub(crate) fn pad64(report_data: &[u8]) -> [u8; 64] {
    let mut out = [0u8; 64];
    let n = report_data.len().min(64);
    out[..n].copy_from_slice(&report_data[..n]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nowhere(dir: &std::path::Path) -> HardwarePaths {
        HardwarePaths {
            tsm_report_dir: dir.join("tsm"),
            tdx_guest_dev: dir.join("tdx_guest"),
            sev_guest_dev: dir.join("sev-guest"),
            efi_secrets_dir: dir.join("secrets"),
            ccel_path: dir.join("CCEL"),
        }
    }

    #[test]
    fn detection_order() {
        let d = tempfile::tempdir().unwrap();
        let p = nowhere(d.path());
        assert_eq!(detect(&p, None), Tee::Sample);
        assert_eq!(detect(&p, Some(Tee::Tdx)), Tee::Tdx);
        std::fs::create_dir(&p.efi_secrets_dir).unwrap();
        assert_eq!(detect(&p, None), Tee::Sev);
        std::fs::write(&p.sev_guest_dev, b"").unwrap();
        assert_eq!(detect(&p, None), Tee::Snp);
        std::fs::write(&p.tdx_guest_dev, b"").unwrap();
        assert_eq!(detect(&p, None), Tee::Tdx);
    }

    #[test]
    fn pads_to_64() {
        let p = pad64(&[1u8; 48]);
        assert_eq!(&p[..48], &[1u8; 48]);
        assert_eq!(&p[48..], &[0u8; 16]);
    }
}
