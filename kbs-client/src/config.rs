//! Client configuration: KBS endpoint, TLS, TEE selection, key algorithm, mode, retries, hardware paths.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::error::Error;
pub use crate::keys::KeyAlgorithm;

/// The TEE whose evidence (or launch secrets) the client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tee {
    /// The reference's development attester: no hardware, accepted only by permissive KBS policies.
    Sample,
    /// Intel TDX (quote via configfs-tsm).
    Tdx,
    /// AMD SEV-SNP (attestation report via configfs-tsm).
    Snp,
    /// AMD SEV/SEV-ES: no runtime attestation; resources come from the launch-injected EFI secret area.
    Sev,
}

impl Tee {
    /// The protocol `tee` value, if this TEE attests at runtime.
    pub fn wire(self) -> Option<kbs_types::Tee> {
        match self {
            Tee::Sample => Some(kbs_types::Tee::Sample),
            Tee::Tdx => Some(kbs_types::Tee::Tdx),
            Tee::Snp => Some(kbs_types::Tee::Snp),
            Tee::Sev => None,
        }
    }
}

impl fmt::Display for Tee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tee::Sample => "sample",
            Tee::Tdx => "tdx",
            Tee::Snp => "snp",
            Tee::Sev => "sev",
        })
    }
}

impl FromStr for Tee {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "sample" => Ok(Tee::Sample),
            "tdx" => Ok(Tee::Tdx),
            "snp" | "sev-snp" => Ok(Tee::Snp),
            "sev" | "sev-es" => Ok(Tee::Sev),
            _ => Err(Error::Config(format!(
                "unknown TEE {s:?} (expected sample, tdx, snp or sev)"
            ))),
        }
    }
}

/// How the client proves itself on resource requests.
#[derive(Clone, Default)]
pub enum Mode {
    /// Attest, then keep the `kbs-session-id` cookie for resource requests (trustee's default).
    #[default]
    BackgroundCheck,
    /// Send `Authorization: Bearer <token>` on resource requests.
    ///
    /// With `token: None` the client attests to `url` itself and then uses the token as bearer.
    /// A pre-obtained token needs the TEE private key it was issued for (`tee_key_pem`, PKCS#8),
    /// since the KBS encrypts every resource to that key.
    Passport {
        /// A token obtained elsewhere (e.g. `kbs-client attest`).
        token: Option<Zeroizing<String>>,
        /// The PKCS#8 PEM private key bound into `token`.
        tee_key_pem: Option<Zeroizing<String>>,
    },
}

impl fmt::Debug for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::BackgroundCheck => f.write_str("BackgroundCheck"),
            Mode::Passport { token, tee_key_pem } => f
                .debug_struct("Passport")
                .field("token", &token.as_ref().map(|_| "<redacted>"))
                .field("tee_key_pem", &tee_key_pem.as_ref().map(|_| "<redacted>"))
                .finish(),
        }
    }
}

/// Bounded exponential backoff with jitter for connect errors and 5xx answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts per request, including the first (at least 1).
    pub max_attempts: u32,
    /// Delay before the second attempt; doubled each time.
    pub initial_backoff: Duration,
    /// Upper bound for a single delay.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        // About 6 s worst case before giving up: long enough for a KBS that is still starting,
        // short enough to fit inside kubelet's CreateContainer deadline.
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(4),
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `attempt` (1-based), with up to 50 % random jitter subtracted.
    pub fn delay(&self, attempt: u32, jitter_fraction: f64) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let base = exp.min(self.max_backoff);
        base.mul_f64(1.0 - 0.5 * jitter_fraction.clamp(0.0, 1.0))
    }
}

/// Where the hardware interfaces live; tests point these at directories with recorded data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HardwarePaths {
    /// configfs-tsm report directory.
    pub tsm_report_dir: PathBuf,
    /// TDX guest device (detection only; quotes go through configfs-tsm).
    pub tdx_guest_dev: PathBuf,
    /// SEV guest device (detection only; reports go through configfs-tsm).
    pub sev_guest_dev: PathBuf,
    /// EFI secret area exposed by the `efi_secret` module (SEV/SEV-ES launch secrets).
    pub efi_secrets_dir: PathBuf,
    /// The ACPI CCEL table (TDX CC event log).
    pub ccel_path: PathBuf,
    /// The attestation-agent's event log (AAEL, TCG2 entries), appended to the TDX CC event log
    /// so a verifier can replay the runtime measurement registers it extended.
    pub aael_path: PathBuf,
    /// TDX measurement registers in sysfs (Linux 6.16+): `rtmr<N>:sha384` reads and extends.
    pub tdx_measurements_dir: PathBuf,
}

impl Default for HardwarePaths {
    fn default() -> Self {
        Self {
            tsm_report_dir: "/sys/kernel/config/tsm/report".into(),
            tdx_guest_dev: "/dev/tdx_guest".into(),
            sev_guest_dev: "/dev/sev-guest".into(),
            efi_secrets_dir: "/sys/kernel/security/secrets/coco".into(),
            ccel_path: "/sys/firmware/acpi/tables/data/CCEL".into(),
            aael_path: crate::attester::eventlog::DEFAULT_AAEL_PATH.into(),
            tdx_measurements_dir: "/sys/devices/virtual/misc/tdx_guest/measurements".into(),
        }
    }
}

impl HardwarePaths {
    /// Every interface at its default file name below `dir`: with nothing created there, no TEE
    /// is found (the sample attester); tests create only the files a case needs.
    pub fn under(dir: &std::path::Path) -> Self {
        Self {
            tsm_report_dir: dir.join("tsm"),
            tdx_guest_dev: dir.join("tdx_guest"),
            sev_guest_dev: dir.join("sev-guest"),
            efi_secrets_dir: dir.join("secrets"),
            ccel_path: dir.join("CCEL"),
            aael_path: dir.join("eventlog"),
            tdx_measurements_dir: dir.join("measurements"),
        }
    }
}

/// Everything [`crate::Client::new`] needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// KBS base URL, e.g. `http://127.0.0.1:8080` (no `/kbs/v0`).
    pub url: String,
    /// Extra PEM CA certificate(s) trusted for HTTPS in addition to the system roots.
    pub extra_ca_pem: Option<Vec<u8>>,
    /// HTTP(S) proxy URL for all KBS traffic.
    pub proxy: Option<String>,
    /// TEE override; `None` autodetects (tdx, snp, sev launch secrets, else sample with a warning).
    pub tee: Option<Tee>,
    /// init-data TOML text passed as `{"format":"toml","body":…}`.
    pub init_data: Option<String>,
    /// Evidence from outside (a running attestation-agent) instead of the built-in attesters;
    /// `tee` and `hw_paths` are then unused.
    pub evidence: Option<std::sync::Arc<dyn crate::attester::EvidenceProvider>>,
    /// TEE key algorithm.
    pub key_algorithm: KeyAlgorithm,
    /// Background-check (cookie) or passport (bearer) mode.
    pub mode: Mode,
    /// Timeout of one attempt (also bounds connect).
    pub timeout: Duration,
    /// Overall deadline of one request, retries and body included.
    pub deadline: Duration,
    /// Largest successful response body read (resources, `/auth`, `/attest`); error bodies are
    /// capped at [`crate::client::MAX_ERROR_BODY`].
    pub max_response_bytes: usize,
    /// Retry policy for connect errors and 5xx.
    pub retry: RetryPolicy,
    /// How long before `exp` a cached token is replaced.
    pub refresh_margin: Duration,
    /// Hardware interface paths.
    pub hw_paths: HardwarePaths,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8080".into(),
            extra_ca_pem: None,
            proxy: None,
            tee: None,
            init_data: None,
            evidence: None,
            key_algorithm: KeyAlgorithm::default(),
            mode: Mode::default(),
            timeout: Duration::from_secs(20),
            deadline: Duration::from_secs(60),
            max_response_bytes: 4 << 20,
            retry: RetryPolicy::default(),
            refresh_margin: Duration::from_secs(30),
            hw_paths: HardwarePaths::default(),
        }
    }
}

impl ClientConfig {
    /// A default configuration for the KBS at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay(1, 0.0), Duration::from_millis(250));
        assert_eq!(p.delay(2, 0.0), Duration::from_millis(500));
        assert_eq!(p.delay(10, 0.0), Duration::from_secs(4));
        assert_eq!(p.delay(2, 1.0), Duration::from_millis(250));
        assert_eq!(p.delay(40, 0.0), Duration::from_secs(4));
    }

    #[test]
    fn tee_names() {
        assert_eq!("TDX".parse::<Tee>().unwrap(), Tee::Tdx);
        assert_eq!(Tee::Sev.wire(), None);
        assert!("sgx".parse::<Tee>().is_err());
        let m = Mode::Passport {
            token: Some(Zeroizing::new("secret-token".into())),
            tee_key_pem: None,
        };
        assert!(!format!("{m:?}").contains("secret-token"));
    }
}
