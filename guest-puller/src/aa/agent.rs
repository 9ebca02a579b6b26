//! What the attestation-agent answers, following guest-components' AA: evidence from
//! kbs-client's attester for this TEE, KBS tokens through an RCAR handshake, runtime events into
//! the event log and its register, and the initdata check against the TEE's launch register.
//!
//! Nothing here touches the network before a `GetToken` call, so the socket is bound within
//! the few seconds kata-agent waits for it.

use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use kbs_client::attester::{self, InitDataBinding};
use kbs_client::protocol::InitDataDigest;
use kbs_client::{HardwarePaths, Tee};
use serde::Serialize;
use tokio::sync::Mutex;
use tracing::{info, warn};
use zeroize::Zeroizing;

use super::config::AaToml;
use super::eventlog::{Event, EventLog};
use super::registers::{pcr_to_ccmr, Registers};
use super::AaError;
use crate::initdata::Initdata;

/// The initdata the command line names, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitdataArg {
    /// None given.
    None,
    /// `--initdata-toml`: the document (checked, and sent to the KBS with token requests).
    Toml(PathBuf),
    /// `--initdata-digest`: only a digest, standard base64 (checked, nothing to send).
    Digest(String),
}

/// Everything [`Agent::start`] needs.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// `aa.toml` (or the defaults).
    pub config: AaToml,
    /// The initdata to check.
    pub initdata: InitdataArg,
    /// The TEE's interfaces.
    pub paths: HardwarePaths,
    /// Where the event log goes (see [`super::eventlog::log_path`]).
    pub eventlog_path: PathBuf,
}

/// The outcome of `ExtendRuntimeMeasurement`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measurement {
    /// Logged and extended.
    Ok,
    /// This TEE has no runtime register the agent can extend.
    NotSupported,
    /// `[eventlog_config] enable_eventlog` is off.
    NotEnabled,
}

/// The running attestation-agent.
#[derive(Debug)]
pub struct Agent {
    tee: Tee,
    paths: HardwarePaths,
    config: AaToml,
    /// The initdata document, sent in the attestation request of token handshakes.
    initdata: Option<String>,
    registers: Option<Registers>,
    eventlog: Option<Mutex<EventLog>>,
}

/// The `GetToken(kbs)` answer: the token and the private key it is bound to (guest-components'
/// field names and order).
#[derive(Serialize)]
struct TokenReply<'a> {
    token: &'a str,
    tee_keypair: &'a str,
}

/// What kind of digest a raw initdata digest is, by its length (for messages only).
fn digest_algorithm(len: usize) -> &'static str {
    match len {
        32 => "sha256",
        48 => "sha384",
        64 => "sha512",
        _ => "raw",
    }
}

impl Agent {
    /// Detects the TEE, checks the initdata against it (an error when the TEE was launched with
    /// other initdata) and opens the event log when it is enabled and the TEE can extend one.
    pub async fn start(settings: AgentSettings) -> Result<Self, AaError> {
        let AgentSettings {
            config,
            initdata,
            mut paths,
            eventlog_path,
        } = settings;
        let tee = match attester::detect(&paths, None) {
            Tee::Sev => {
                // SEV(-ES) guests have no runtime evidence; the reference finds no attester
                // there either and serves sample evidence.
                warn!("SEV(-ES) has no runtime attestation: serving sample evidence");
                Tee::Sample
            }
            t => t,
        };
        // TDX evidence carries this log after the CCEL, so the verifier can replay RTMR 3.
        paths.aael_path = eventlog_path.clone();
        let mut agent = Self {
            tee,
            paths,
            config,
            initdata: None,
            registers: None,
            eventlog: None,
        };
        let digest = match initdata {
            InitdataArg::None => None,
            InitdataArg::Toml(p) => {
                let i = Initdata::load(&p)?
                    .ok_or_else(|| AaError::InitdataMissing(p.display().to_string()))?;
                info!(path = %p.display(), digest = %i.digest_hex(), "initdata given by --initdata-toml");
                agent.initdata = Some(i.text);
                Some(i.digest)
            }
            InitdataArg::Digest(b64) => {
                let raw = STANDARD
                    .decode(b64.trim())
                    .map_err(|e| AaError::InitdataDigest(e.to_string()))?;
                Some(InitDataDigest {
                    algorithm: digest_algorithm(raw.len()).into(),
                    digest: raw,
                })
            }
        };
        if let Some(d) = digest {
            agent.check_binding(&d).await?;
        }
        agent.registers = Registers::for_tee(tee, &agent.paths);
        let ev = &agent.config.eventlog_config;
        match (&agent.registers, ev.enable_eventlog) {
            (Some(regs), true) => {
                let log = EventLog::open(&eventlog_path, regs).await?;
                agent.eventlog = Some(Mutex::new(log));
            }
            (None, true) => {
                info!(%tee, "event log enabled, but this TEE has no runtime register to extend")
            }
            (_, false) => info!("event log disabled ([eventlog_config] enable_eventlog)"),
        }
        info!(%tee, "attestation-agent ready");
        Ok(agent)
    }

    async fn check_binding(&self, d: &InitDataDigest) -> Result<(), AaError> {
        match attester::check_init_data(self.tee, &self.paths, d).await {
            Ok(InitDataBinding::Verified { register }) => {
                info!(tee = %self.tee, register, "initdata digest matches the TEE's launch register");
                Ok(())
            }
            Ok(InitDataBinding::NotBound(why)) => {
                info!(tee = %self.tee, "initdata not checked by the platform: {why}");
                Ok(())
            }
            Err(e) => Err(AaError::Binding(e)),
        }
    }

    /// The TEE evidence is for.
    pub fn tee(&self) -> Tee {
        self.tee
    }

    /// The protocol name of the TEE (`GetTeeType`).
    pub fn tee_name(&self) -> String {
        self.tee
            .wire()
            .and_then(|t| serde_json::to_value(t).ok())
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| self.tee.to_string())
    }

    /// Evidence binding `runtime_data` (as the attester takes it: unpadded for sample,
    /// zero-padded to 64 bytes for TDX and SNP, which refuse more), as JSON.
    pub async fn evidence(&self, runtime_data: Vec<u8>) -> Result<Vec<u8>, AaError> {
        let ev = attester::evidence(self.tee, &self.paths, runtime_data).await?;
        Ok(ev.to_string().into_bytes())
    }

    /// A token of `token_type` (`kbs`: a fresh RCAR handshake with the configured KBS, with the
    /// initdata), as `{"token": …, "tee_keypair": <PEM>}`.
    pub async fn token(&self, token_type: &str) -> Result<Zeroizing<Vec<u8>>, AaError> {
        if token_type != "kbs" {
            return Err(AaError::UnsupportedToken(token_type.into()));
        }
        let kbs = self
            .config
            .token_configs
            .kbs
            .as_ref()
            .ok_or(AaError::NoKbs)?;
        let mut c = kbs_client::ClientConfig::new(kbs.url.clone());
        c.tee = Some(self.tee);
        c.hw_paths = self.paths.clone();
        c.init_data = self.initdata.clone();
        c.key_algorithm = self.config.key_algorithm()?;
        c.extra_ca_pem = kbs.cert.as_ref().map(|p| p.as_bytes().to_vec());
        // A client per call: a fresh TEE key and handshake each time, as the reference does.
        let client = kbs_client::Client::new(c)?;
        let token = client.attest().await?;
        let pem = client.tee_key().to_token_pem()?;
        let reply = TokenReply {
            token: token.as_str(),
            tee_keypair: &pem,
        };
        let bytes = serde_json::to_vec(&reply).expect("a struct of two strings serializes");
        info!(kbs = %kbs.url, "token issued");
        Ok(Zeroizing::new(bytes))
    }

    /// Records an event in the event log and extends its register (`register`: a PCR number,
    /// else `[eventlog_config] init_pcr`).
    pub async fn extend(
        &self,
        domain: &str,
        operation: &str,
        content: &str,
        register: Option<u64>,
    ) -> Result<Measurement, AaError> {
        if !self.config.eventlog_config.enable_eventlog {
            return Ok(Measurement::NotEnabled);
        }
        let (Some(log), Some(regs)) = (&self.eventlog, &self.registers) else {
            return Ok(Measurement::NotSupported);
        };
        let event = Event::new(domain, operation, content)?;
        let pcr = register.unwrap_or(self.config.eventlog_config.init_pcr);
        let ccmr = pcr_to_ccmr(pcr);
        log.lock().await.record(&event, ccmr, regs).await?;
        info!(
            domain,
            operation, content, pcr, ccmr, "runtime measurement extended"
        );
        Ok(Measurement::Ok)
    }

    /// Checks a raw initdata digest against the TEE (`BindInitData`): a match, or a TEE
    /// without a launch register for it (sample), is accepted.
    pub async fn bind_init_data(&self, digest: &[u8]) -> Result<(), AaError> {
        self.check_binding(&InitDataDigest {
            algorithm: digest_algorithm(digest.len()).into(),
            digest: digest.to_vec(),
        })
        .await
    }

    /// Further attestable devices: none in a single-TEE guest.
    pub fn additional_tees(&self) -> Vec<String> {
        Vec::new()
    }

    /// Their evidence: empty without devices, as the reference answers then.
    pub async fn additional_evidence(&self, _runtime_data: Vec<u8>) -> Result<Vec<u8>, AaError> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &std::path::Path, config: AaToml, initdata: InitdataArg) -> AgentSettings {
        AgentSettings {
            config,
            initdata,
            paths: HardwarePaths::under(dir),
            eventlog_path: dir.join("aa/eventlog"),
        }
    }

    const INITDATA: &str =
        "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"aa.toml\" = \"\"\n";

    #[tokio::test]
    async fn the_sample_accepts_valid_initdata_and_refuses_invalid() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("initdata.toml");
        std::fs::write(&p, INITDATA).unwrap();
        let a = Agent::start(settings(
            d.path(),
            AaToml::default(),
            InitdataArg::Toml(p.clone()),
        ))
        .await
        .unwrap();
        assert_eq!(a.tee(), Tee::Sample);
        assert_eq!(a.tee_name(), "sample");
        assert_eq!(a.initdata.as_deref(), Some(INITDATA));
        let digest = STANDARD.encode([7u8; 48]);
        Agent::start(settings(
            d.path(),
            AaToml::default(),
            InitdataArg::Digest(digest),
        ))
        .await
        .unwrap();

        for (text, says) in [
            (
                "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data\n",
                "not valid",
            ),
            ("version = \"0.1.0\"\nalgorithm = \"md5\"\n", "md5"),
            ("version = \"9\"\nalgorithm = \"sha384\"\n", "version"),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = Agent::start(settings(
                d.path(),
                AaToml::default(),
                InitdataArg::Toml(p.clone()),
            ))
            .await
            .unwrap_err();
            assert!(matches!(e, AaError::Initdata(_)), "{text}: {e}");
            assert!(e.to_string().contains(says), "{e}");
        }
        let gone = d.path().join("missing.toml");
        let e = Agent::start(settings(
            d.path(),
            AaToml::default(),
            InitdataArg::Toml(gone),
        ))
        .await
        .unwrap_err();
        assert!(matches!(e, AaError::InitdataMissing(_)), "{e}");
        let e = Agent::start(settings(
            d.path(),
            AaToml::default(),
            InitdataArg::Digest("%%".into()),
        ))
        .await
        .unwrap_err();
        assert!(matches!(e, AaError::InitdataDigest(_)), "{e}");
    }

    #[tokio::test]
    async fn measurement_results_follow_the_config_and_the_tee() {
        let d = tempfile::tempdir().unwrap();
        let a = Agent::start(settings(d.path(), AaToml::default(), InitdataArg::None))
            .await
            .unwrap();
        assert_eq!(
            a.extend("d", "op", "c", None).await.unwrap(),
            Measurement::NotEnabled
        );
        assert!(!d.path().join("aa/eventlog").exists());

        let mut on = AaToml::default();
        on.eventlog_config.enable_eventlog = true;
        let a = Agent::start(settings(d.path(), on.clone(), InitdataArg::None))
            .await
            .unwrap();
        assert_eq!(
            a.extend(
                "github.com/confidential-containers",
                "PullImage",
                r#"{"image":"r/i:t", "digest":"sha256:ab"}"#,
                None
            )
            .await
            .unwrap(),
            Measurement::Ok
        );
        assert_eq!(
            a.extend("d", "op", "c", Some(8)).await.unwrap(),
            Measurement::Ok
        );
        let log =
            super::super::eventlog::parse(&std::fs::read(d.path().join("aa/eventlog")).unwrap())
                .unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(
            (log[0].ccmr, log[0].event.operation.as_str()),
            (4, "PullImage")
        );
        assert_eq!(log[1].ccmr, 3, "PCR 8 is RTMR 2");
        assert!(matches!(
            a.extend("d", "op", "two\nlines", None).await,
            Err(AaError::BadEvent(_))
        ));

        // A TEE without runtime registers (SNP here) answers NOT_SUPPORTED.
        let snp = Agent {
            tee: Tee::Snp,
            paths: HardwarePaths::under(d.path()),
            config: on,
            initdata: None,
            registers: None,
            eventlog: None,
        };
        assert_eq!(
            snp.extend("d", "op", "c", None).await.unwrap(),
            Measurement::NotSupported
        );
    }

    #[tokio::test]
    async fn evidence_tokens_and_extra_tees_of_the_sample() {
        let d = tempfile::tempdir().unwrap();
        let a = Agent::start(settings(d.path(), AaToml::default(), InitdataArg::None))
            .await
            .unwrap();
        let ev: serde_json::Value =
            serde_json::from_slice(&a.evidence(vec![1, 2, 3]).await.unwrap()).unwrap();
        assert_eq!(ev, serde_json::json!({"svn": "1", "report_data": "AQID"}));
        assert!(
            a.bind_init_data(&[0u8; 32]).await.is_ok(),
            "the sample binds anything"
        );
        assert!(matches!(
            a.token("coco_as").await,
            Err(AaError::UnsupportedToken(_))
        ));
        assert!(matches!(a.token("kbs").await, Err(AaError::NoKbs)));
        assert!(a.additional_tees().is_empty());
        assert!(a.additional_evidence(vec![1]).await.unwrap().is_empty());
    }
}
