//! `aa.toml`, the attestation-agent's configuration as kata-agent hands it over from the pod's
//! initdata (`-c /run/confidential-containers/initdata/aa.toml`): guest-components' schema.
//!
//! ```toml
//! [token_configs.kbs]
//! url = "https://kbs:8080"
//! cert = """-----BEGIN CERTIFICATE-----…"""   # inline PEM, optional
//! tee_key_algorithm = "ECDH-ES+A256KW-P256"    # or RSA-OAEP-256
//!
//! [eventlog_config]
//! init_pcr = 17            # the PCR events go to when a call names none
//! enable_eventlog = false  # false: ExtendRuntimeMeasurement answers NOT_ENABLED
//!
//! [log]
//! level = "info"
//! ```
//!
//! Without `-c` the KBS comes from `AA_KBC_PARAMS` or the kernel's `agent.aa_kbc_params`
//! (`cc_kbc::<url>`), as the reference does.

use std::path::Path;

use serde::Deserialize;

use super::AaError;

/// The PCR an event extends when the call names none (17: the dynamic-root-of-trust PCR,
/// which the TDX mapping sends to RTMR 3).
pub const DEFAULT_INIT_PCR: u64 = 17;

/// The whole `aa.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AaToml {
    /// `[token_configs]`: where `GetToken` gets its tokens.
    pub token_configs: TokenConfigs,
    /// `[eventlog_config]`: the runtime event log.
    pub eventlog_config: EventlogConfig,
    /// `[log]`: the log level when `GUEST_PULLER_LOG` is unset.
    pub log: Option<crate::cdh_config::LogConfig>,
}

/// `[token_configs]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfigs {
    /// `[token_configs.kbs]`: RCAR tokens from a KBS.
    pub kbs: Option<KbsTokenConfig>,
    /// `[token_configs.coco_as]`: accepted so reference configs load; its tokens are not issued.
    pub coco_as: Option<CocoAsConfig>,
}

/// `[token_configs.kbs]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KbsTokenConfig {
    /// The KBS base URL.
    pub url: String,
    /// A CA certificate for the KBS, inline PEM.
    pub cert: Option<String>,
    /// The TEE key's algorithm (`ECDH-ES+A256KW-P256`, the default, or `RSA-OAEP-256`).
    pub tee_key_algorithm: Option<String>,
}

/// `[token_configs.coco_as]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CocoAsConfig {
    /// The attestation service URL.
    pub url: String,
}

/// `[eventlog_config]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventlogConfig {
    /// The PCR an event extends when the call names none.
    pub init_pcr: u64,
    /// Whether runtime measurements are recorded at all.
    pub enable_eventlog: bool,
}

impl Default for EventlogConfig {
    fn default() -> Self {
        Self {
            init_pcr: DEFAULT_INIT_PCR,
            enable_eventlog: false,
        }
    }
}

impl AaToml {
    /// Reads and checks `aa.toml` at `path`.
    pub fn from_file(path: &Path) -> Result<Self, AaError> {
        let fail = |reason: String| AaError::Config {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let cfg: Self = toml::from_str(&text).map_err(|e| fail(e.to_string()))?;
        cfg.check().map_err(fail)?;
        Ok(cfg)
    }

    /// The configuration without a file: defaults, with the KBS of `AA_KBC_PARAMS` (`env`) or
    /// of `agent.aa_kbc_params` on the kernel command line when its KBC is `cc_kbc`.
    pub fn from_kbc_params(env: Option<&str>, cmdline: &str) -> Self {
        let params = env.map(str::to_string).or_else(|| {
            cmdline
                .split_ascii_whitespace()
                .find_map(|p| p.strip_prefix("agent.aa_kbc_params="))
                .map(str::to_string)
        });
        let kbs = match params.as_deref().map(|p| p.split_once("::")) {
            Some(Some((crate::cdh_config::CC_KBC, url))) => Some(KbsTokenConfig {
                url: url.to_string(),
                cert: None,
                tee_key_algorithm: None,
            }),
            Some(_) => {
                tracing::warn!(params = ?params, "aa_kbc_params is not cc_kbc::<url>: no KBS for tokens");
                None
            }
            None => None,
        };
        Self {
            token_configs: TokenConfigs { kbs, coco_as: None },
            ..Self::default()
        }
    }

    /// Refuses values this agent cannot honour, so they fail at start rather than at the call.
    fn check(&self) -> Result<(), String> {
        if let Some(kbs) = &self.token_configs.kbs {
            self.key_algorithm().map_err(|e| e.to_string())?;
            if let Some(pem) = &kbs.cert {
                if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    return Err("[token_configs.kbs] cert is not an inline PEM certificate".into());
                }
            }
        }
        Ok(())
    }

    /// The TEE key algorithm `[token_configs.kbs]` asks for.
    pub fn key_algorithm(&self) -> Result<kbs_client::KeyAlgorithm, kbs_client::Error> {
        match self
            .token_configs
            .kbs
            .as_ref()
            .and_then(|k| k.tee_key_algorithm.as_deref())
        {
            Some(name) => name.parse(),
            None => Ok(kbs_client::KeyAlgorithm::default()),
        }
    }

    /// The tracing filter `[log] level` asks for.
    pub fn log_filter(&self) -> Option<&str> {
        self.log.as_ref().map(|l| l.level.as_str())
    }

    /// Settings that load but do nothing here, for a warning at start.
    pub fn unimplemented_keys(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.token_configs.coco_as.is_some() {
            keys.push("[token_configs.coco_as] (coco_as tokens are not issued)");
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AaToml, AaError> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("aa.toml");
        std::fs::write(&p, text).unwrap();
        AaToml::from_file(&p)
    }

    #[test]
    fn reads_the_reference_schema() {
        let cfg = parse(
            "[token_configs]\n[token_configs.coco_as]\nurl = \"http://127.0.0.1:8000\"\n\
             [token_configs.kbs]\nurl = \"https://127.0.0.1:8080\"\n\
             tee_key_algorithm = \"RSA-OAEP-256\"\n\
             cert = '''\n-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n'''\n\
             [eventlog_config]\ninit_pcr = 16\nenable_eventlog = true\n[log]\nlevel = \"debug\"\n",
        )
        .unwrap();
        let kbs = cfg.token_configs.kbs.as_ref().unwrap();
        assert_eq!(kbs.url, "https://127.0.0.1:8080");
        assert!(kbs.cert.as_deref().unwrap().contains("MIIB"));
        assert_eq!(cfg.key_algorithm().unwrap(), kbs_client::KeyAlgorithm::Rsa);
        assert_eq!(
            cfg.eventlog_config,
            EventlogConfig {
                init_pcr: 16,
                enable_eventlog: true
            }
        );
        assert_eq!(cfg.log_filter(), Some("debug"));
        assert_eq!(cfg.unimplemented_keys().len(), 1);
    }

    #[test]
    fn defaults_keep_the_event_log_off_at_pcr_17() {
        let cfg = parse("").unwrap();
        assert_eq!(cfg, AaToml::default());
        assert_eq!(cfg.eventlog_config.init_pcr, 17);
        assert!(!cfg.eventlog_config.enable_eventlog);
        let cfg = parse("[eventlog_config]\nenable_eventlog = true\n").unwrap();
        assert_eq!(cfg.eventlog_config.init_pcr, 17);
        assert!(cfg.token_configs.kbs.is_none());
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        for (text, says) in [
            ("[token_configs.kbs]\nurl = \"http://k\"\ntee_key_algorithm = \"ECDH-ES+A256KW-P521\"\n", "P521"),
            ("[token_configs.kbs]\nurl = \"http://k\"\ncert = \"/etc/ca.pem\"\n", "inline PEM"),
            ("[eventlog_config]\nenable_eventlogs = true\n", "enable_eventlogs"),
            ("[token_configs.kbs]\ncert = \"x\"\n", "url"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("aa.toml"), "{text}: {e}");
        }
    }

    #[test]
    fn without_a_file_the_kbs_comes_from_aa_kbc_params() {
        let cfg = AaToml::from_kbc_params(
            Some("cc_kbc::http://env:8080"),
            "agent.aa_kbc_params=cc_kbc::http://cmdline",
        );
        assert_eq!(cfg.token_configs.kbs.unwrap().url, "http://env:8080");
        let cfg = AaToml::from_kbc_params(
            None,
            "quiet agent.aa_kbc_params=cc_kbc::http://cmdline:1 ro",
        );
        assert_eq!(cfg.token_configs.kbs.unwrap().url, "http://cmdline:1");
        for (env, cmdline) in [
            (None, "quiet"),
            (Some("offline_fs_kbc::null"), ""),
            (Some("garbage"), ""),
        ] {
            let cfg = AaToml::from_kbc_params(env, cmdline);
            assert!(cfg.token_configs.kbs.is_none(), "{env:?} {cmdline}");
            assert!(!cfg.eventlog_config.enable_eventlog);
        }
    }
}
