//! Evidence providers (sample, tdx, snp) and the SEV launch-secret reader, with autodetection;
//! the runtime measurement registers of TEEs that have them (TDX RTMRs).

pub mod eventlog;
mod sample;
pub mod sev;
mod snp;
mod tdx;
mod tsm;

use serde_json::Value;
use tracing::{info, warn};

use crate::config::{HardwarePaths, Tee};
use crate::error::Error;
use crate::protocol::InitDataDigest;

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

/// Width of the runtime registers [`extend_runtime_register`] extends (TDX RTMRs: SHA-384).
pub const RUNTIME_REGISTER_LEN: usize = tdx::MR_LEN;

/// Whether `tee` has runtime measurement registers this crate can extend here: TDX with the
/// kernel's RTMR files (Linux 6.16+). SNP has none; the sample attester has no hardware.
pub fn runtime_registers_available(tee: Tee, paths: &HardwarePaths) -> bool {
    tee == Tee::Tdx && paths.tdx_measurements_dir.is_dir()
}

fn no_runtime_registers(tee: Tee) -> Error {
    Error::Unsupported(format!("{tee} has no runtime measurement register here"))
}

/// The value of runtime register `index` of `tee` (TDX: RTMR `index`).
pub async fn read_runtime_register(
    tee: Tee,
    paths: &HardwarePaths,
    index: u32,
) -> Result<Vec<u8>, Error> {
    if !runtime_registers_available(tee, paths) {
        return Err(no_runtime_registers(tee));
    }
    let p = paths.clone();
    blocking(tee, move || tdx::read_rtmr(&p, index)).await
}

/// Extends runtime register `index` of `tee` with `digest` (TDX: RTMR `index`, the digest
/// zero-padded to 48 bytes; the register becomes SHA-384(old || digest)).
pub async fn extend_runtime_register(
    tee: Tee,
    paths: &HardwarePaths,
    index: u32,
    digest: Vec<u8>,
) -> Result<(), Error> {
    if !runtime_registers_available(tee, paths) {
        return Err(no_runtime_registers(tee));
    }
    let p = paths.clone();
    blocking(tee, move || tdx::extend_rtmr(&p, index, &digest)).await
}

/// Runs a sysfs job on the blocking pool.
async fn blocking<T: Send + 'static>(
    tee: Tee,
    job: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|e| Error::Evidence {
            tee: tee.to_string(),
            detail: format!("register task failed: {e}"),
        })?
}

/// Evidence from outside this crate, e.g. a running attestation-agent, used instead of the
/// built-in attesters.
#[async_trait::async_trait]
pub trait EvidenceProvider: Send + Sync + std::fmt::Debug {
    /// The protocol `tee` the evidence is for.
    async fn tee(&self) -> Result<kbs_types::Tee, Error>;
    /// Primary evidence binding `report_data` (the unpadded digest).
    async fn primary_evidence(&self, report_data: Vec<u8>) -> Result<Value, Error>;
}

/// How an initdata digest relates to the TEE's evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitDataBinding {
    /// The hardware register holds the digest.
    Verified {
        /// The register compared (`MRCONFIGID`, `HOSTDATA`).
        register: &'static str,
    },
    /// This TEE has no register for it; only the KBS can check it (from the attestation request).
    NotBound(String),
}

/// Compares the initdata digest with the register the host set at launch (TDX MRCONFIGID,
/// SNP HOSTDATA), as the attestation-agent does; a mismatch names both values.
pub async fn check_init_data(
    tee: Tee,
    paths: &HardwarePaths,
    digest: &InitDataDigest,
) -> Result<InitDataBinding, Error> {
    let (register, width) = match tee {
        Tee::Tdx => ("MRCONFIGID", tdx::MR_LEN),
        Tee::Snp => ("HOSTDATA", 32),
        Tee::Sample => {
            return Ok(InitDataBinding::NotBound(
                "the sample attester has no hardware register; the KBS sees the initdata in the attestation request".into(),
            ))
        }
        Tee::Sev => {
            return Ok(InitDataBinding::NotBound(
                "SEV/SEV-ES has no runtime attestation to bind initdata to".into(),
            ))
        }
    };
    let p = paths.clone();
    let found = tokio::task::spawn_blocking(move || match tee {
        Tee::Tdx => tdx::mrconfigid(&p),
        _ => snp::host_data(&p),
    })
    .await
    .map_err(|e| Error::Evidence {
        tee: tee.to_string(),
        detail: format!("report task failed: {e}"),
    })??;
    compare_init_data(tee, register, &digest.for_register(width), &found, digest)
}

fn compare_init_data(
    tee: Tee,
    register: &'static str,
    expected: &[u8],
    found: &[u8],
    digest: &InitDataDigest,
) -> Result<InitDataBinding, Error> {
    if expected == found {
        return Ok(InitDataBinding::Verified { register });
    }
    Err(Error::Evidence {
        tee: tee.to_string(),
        detail: format!(
            "initdata digest ({}) {} differs from {register} {} set at launch: the initdata is not the one this TEE was started with",
            digest.algorithm,
            hex::encode(expected),
            hex::encode(found)
        ),
    })
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

    #[test]
    fn detection_order() {
        let d = tempfile::tempdir().unwrap();
        let p = HardwarePaths::under(d.path());
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
    fn init_data_mismatch_names_both_values() {
        let d = crate::protocol::init_data_digest(
            "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n",
        )
        .unwrap();
        let want = d.for_register(32);
        assert_eq!(
            compare_init_data(Tee::Snp, "HOSTDATA", &want, &want, &d).unwrap(),
            InitDataBinding::Verified {
                register: "HOSTDATA"
            }
        );
        let e = compare_init_data(Tee::Snp, "HOSTDATA", &want, &[0u8; 32], &d)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&hex::encode(&want)), "{e}");
        assert!(
            e.contains(&"00".repeat(32)) && e.contains("HOSTDATA"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn sample_cannot_bind_and_tdx_without_tsm_fails_clearly() {
        let d = tempfile::tempdir().unwrap();
        let p = HardwarePaths::under(d.path());
        let digest =
            crate::protocol::init_data_digest("version = \"0.1.0\"\nalgorithm = \"sha384\"\n")
                .unwrap();
        assert!(matches!(
            check_init_data(Tee::Sample, &p, &digest).await.unwrap(),
            InitDataBinding::NotBound(_)
        ));
        let e = check_init_data(Tee::Tdx, &p, &digest)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
    }

    #[tokio::test]
    async fn runtime_registers_are_tdx_only() {
        let d = tempfile::tempdir().unwrap();
        let p = HardwarePaths::under(d.path());
        assert!(!runtime_registers_available(Tee::Tdx, &p));
        std::fs::create_dir(&p.tdx_measurements_dir).unwrap();
        std::fs::write(p.tdx_measurements_dir.join("rtmr3:sha384"), [1u8; 48]).unwrap();
        assert!(runtime_registers_available(Tee::Tdx, &p));
        assert_eq!(
            read_runtime_register(Tee::Tdx, &p, 3).await.unwrap(),
            vec![1u8; 48]
        );
        for tee in [Tee::Sample, Tee::Snp, Tee::Sev] {
            assert!(!runtime_registers_available(tee, &p));
            let e = extend_runtime_register(tee, &p, 3, vec![0; 48])
                .await
                .unwrap_err();
            assert!(matches!(e, Error::Unsupported(_)), "{tee}: {e}");
        }
    }

    #[test]
    fn pads_to_64() {
        let p = pad64(&[1u8; 48]);
        assert_eq!(&p[..48], &[1u8; 48]);
        assert_eq!(&p[48..], &[0u8; 16]);
    }
}
