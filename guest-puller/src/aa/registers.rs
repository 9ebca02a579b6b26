//! The runtime measurement registers the event log extends: TDX RTMRs through kbs-client, or,
//! for the sample attester (no hardware), registers kept in this process so the event log and
//! its replay can be exercised without a TEE.
//!
//! Registers are named by their CC measurement register index (CCMR, UEFI's numbering for
//! confidential computing: 0 = MRTD, 1..=4 = RTMR 0..=3), which is also what a TCG2 entry of the
//! event log records. PCR numbers map onto CCMRs as TDX's firmware maps them.

use sha2::{Digest, Sha384};
use tokio::sync::Mutex;

use kbs_client::attester;
use kbs_client::{HardwarePaths, Tee};

use super::AaError;

/// Width of every register here (SHA-384).
pub const REGISTER_LEN: usize = attester::RUNTIME_REGISTER_LEN;

/// The CCMR a PCR number is measured into (TDX: PCR 1 and 7 → RTMR 0; 2..=6 → RTMR 1;
/// 8..=15 → RTMR 2; everything else, the default PCR 17 included, → RTMR 3).
pub fn pcr_to_ccmr(pcr: u64) -> u32 {
    match pcr {
        1 | 7 => 1,
        2..=6 => 2,
        8..=15 => 3,
        _ => 4,
    }
}

/// `SHA-384(old || digest)`, how a register changes when it is extended (the digest
/// zero-padded or cut to the register's width first, as TDX does).
pub fn extended(old: &[u8], digest: &[u8]) -> Vec<u8> {
    let mut d = [0u8; REGISTER_LEN];
    let n = digest.len().min(REGISTER_LEN);
    d[..n].copy_from_slice(&digest[..n]);
    Sha384::new()
        .chain_update(old)
        .chain_update(d)
        .finalize()
        .to_vec()
}

/// Where runtime measurements go.
#[derive(Debug)]
pub enum Registers {
    /// The TEE's own registers (TDX RTMRs).
    Hardware {
        /// The TEE.
        tee: Tee,
        /// Where its interfaces are.
        paths: HardwarePaths,
    },
    /// Registers in this process, starting at zero (the sample attester has no hardware).
    InProcess(Mutex<[[u8; REGISTER_LEN]; 5]>),
}

impl Registers {
    /// The registers of `tee`, if it has any this agent can extend.
    pub fn for_tee(tee: Tee, paths: &HardwarePaths) -> Option<Self> {
        match tee {
            Tee::Sample => Some(Self::InProcess(Mutex::new([[0u8; REGISTER_LEN]; 5]))),
            _ if attester::runtime_registers_available(tee, paths) => Some(Self::Hardware {
                tee,
                paths: paths.clone(),
            }),
            _ => None,
        }
    }

    fn index(ccmr: u32) -> Result<usize, AaError> {
        match ccmr {
            1..=4 => Ok(ccmr as usize),
            _ => Err(AaError::BadEvent(format!(
                "CC measurement register {ccmr} is not a runtime register (1..=4)"
            ))),
        }
    }

    /// The value of CCMR `ccmr`.
    pub async fn read(&self, ccmr: u32) -> Result<Vec<u8>, AaError> {
        let i = Self::index(ccmr)?;
        match self {
            Self::Hardware { tee, paths } => {
                Ok(attester::read_runtime_register(*tee, paths, ccmr - 1).await?)
            }
            Self::InProcess(r) => Ok(r.lock().await[i].to_vec()),
        }
    }

    /// Extends CCMR `ccmr` with `digest`.
    pub async fn extend(&self, ccmr: u32, digest: &[u8]) -> Result<(), AaError> {
        let i = Self::index(ccmr)?;
        match self {
            Self::Hardware { tee, paths } => {
                Ok(
                    attester::extend_runtime_register(*tee, paths, ccmr - 1, digest.to_vec())
                        .await?,
                )
            }
            Self::InProcess(r) => {
                let mut r = r.lock().await;
                let next = extended(&r[i], digest);
                r[i].copy_from_slice(&next);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcrs_map_as_tdx_firmware_maps_them() {
        for (pcr, ccmr) in [
            (0, 4),
            (1, 1),
            (7, 1),
            (2, 2),
            (6, 2),
            (8, 3),
            (15, 3),
            (16, 4),
            (17, 4),
        ] {
            assert_eq!(pcr_to_ccmr(pcr), ccmr, "PCR {pcr}");
        }
    }

    #[tokio::test]
    async fn in_process_registers_extend_like_an_rtmr() {
        let d = tempfile::tempdir().unwrap();
        let paths = HardwarePaths {
            tdx_measurements_dir: d.path().join("none"),
            ..HardwarePaths::default()
        };
        assert!(Registers::for_tee(Tee::Snp, &paths).is_none());
        assert!(
            Registers::for_tee(Tee::Tdx, &paths).is_none(),
            "no RTMR files, no registers"
        );
        let r = Registers::for_tee(Tee::Sample, &paths).unwrap();
        assert_eq!(r.read(4).await.unwrap(), vec![0u8; 48]);
        r.extend(4, &[1u8; 48]).await.unwrap();
        let want: Vec<u8> = Sha384::new()
            .chain_update([0u8; 48])
            .chain_update([1u8; 48])
            .finalize()
            .to_vec();
        assert_eq!(r.read(4).await.unwrap(), want);
        // A shorter digest is zero-padded first; other registers stay untouched.
        r.extend(1, &[2u8; 32]).await.unwrap();
        let mut padded = [0u8; 48];
        padded[..32].copy_from_slice(&[2u8; 32]);
        assert_eq!(r.read(1).await.unwrap(), extended(&[0u8; 48], &padded));
        assert_eq!(r.read(2).await.unwrap(), vec![0u8; 48]);
        assert!(r.read(0).await.is_err() && r.extend(5, &[0u8; 48]).await.is_err());
    }
}
