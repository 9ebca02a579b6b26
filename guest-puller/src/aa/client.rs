//! A running attestation-agent, called as CDH calls it when kata-agent started an AA before it:
//! evidence for the KBS client (`GetTeeType`, `GetEvidence`) and, after each pulled image, the
//! `PullImage` runtime measurement (`ExtendRuntimeMeasurement`).

use std::path::Path;
use std::time::Duration;

use cdh_api::protos::{attestation_agent, attestation_agent_ttrpc};
use kbs_client::attester::EvidenceProvider;
use serde_json::Value;

/// How long one AA call may take (quotes from real hardware can be slow).
const AA_TIMEOUT: Duration = Duration::from_secs(50);
/// How long the `PullImage` measurement may take (CDH's 10 s).
const MEASUREMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// The event domain of CDH's runtime events (the Confidential Containers event spec).
pub const EVENT_DOMAIN: &str = "github.com/confidential-containers";
/// The operation of the event recorded after each pulled image.
pub const PULL_IMAGE_OPERATION: &str = "PullImage";

/// Why a runtime measurement could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MeasurementError {
    /// The AA answered with an error status, or the transport failed.
    #[error("attestation-agent at {socket}: ExtendRuntimeMeasurement: {source}")]
    Call {
        /// The AA's address.
        socket: String,
        /// The ttrpc failure.
        source: ttrpc::Error,
    },
    /// No answer within the deadline.
    #[error(
        "attestation-agent at {socket}: ExtendRuntimeMeasurement did not answer within {after:?}"
    )]
    TimedOut {
        /// The AA's address.
        socket: String,
        /// The deadline.
        after: Duration,
    },
    /// An answer this client does not know.
    #[error("attestation-agent at {socket}: unknown RuntimeMeasurementResult {value}")]
    UnknownResult {
        /// The AA's address.
        socket: String,
        /// The value received.
        value: i32,
    },
}

/// What the AA did with a runtime event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeasurementResult {
    /// Logged and extended into the TEE's register.
    Extended,
    /// The TEE has no runtime register.
    NotSupported,
    /// The AA's event log is off.
    NotEnabled,
}

/// The content of the `PullImage` event, formatted exactly as CDH formats it (verifiers match
/// reference values against this text byte for byte).
pub fn pull_image_content(image: &str, manifest_digest: &str) -> String {
    format!(r#"{{"image":"{image}", "digest":"{manifest_digest}"}}"#)
}

/// A connected attestation-agent.
pub struct AttestationAgent {
    socket: String,
    client: attestation_agent_ttrpc::AttestationAgentServiceClient,
    tee: kbs_client::kbs_types::Tee,
}

impl std::fmt::Debug for AttestationAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttestationAgent")
            .field("socket", &self.socket)
            .field("tee", &self.tee)
            .finish()
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(AA_TIMEOUT.as_nanos() as i64)
}

fn aa_err(socket: &str, what: impl std::fmt::Display) -> kbs_client::Error {
    kbs_client::Error::Evidence {
        tee: format!("attestation-agent at {socket}"),
        detail: what.to_string(),
    }
}

impl AttestationAgent {
    /// Connects to the AA at the unix socket `path` and asks which TEE it attests.
    pub async fn connect(path: &Path) -> Result<Self, kbs_client::Error> {
        let socket = format!("unix://{}", path.display());
        let c = ttrpc::r#async::Client::connect(&socket)
            .await
            .map_err(|e| aa_err(&socket, format_args!("connect: {e}")))?;
        let client = attestation_agent_ttrpc::AttestationAgentServiceClient::new(c);
        let resp = client
            .get_tee_type(ctx(), &attestation_agent::GetTeeTypeRequest::new())
            .await
            .map_err(|e| aa_err(&socket, format_args!("GetTeeType: {e}")))?;
        let tee = serde_json::from_value(Value::String(resp.tee.clone()))
            .map_err(|_| aa_err(&socket, format_args!("unknown TEE {:?}", resp.tee)))?;
        Ok(Self {
            socket,
            client,
            tee,
        })
    }

    /// Records that `image` was pulled with manifest `manifest_digest`, as CDH does after each
    /// `PullImage`: domain [`EVENT_DOMAIN`], operation [`PULL_IMAGE_OPERATION`], the AA's
    /// default register.
    pub async fn measure_pull(
        &self,
        image: &str,
        manifest_digest: &str,
    ) -> Result<MeasurementResult, MeasurementError> {
        let mut req = attestation_agent::ExtendRuntimeMeasurementRequest::new();
        req.Domain = EVENT_DOMAIN.into();
        req.Operation = PULL_IMAGE_OPERATION.into();
        req.Content = pull_image_content(image, manifest_digest);
        let socket = || self.socket.clone();
        // The server is told a slightly later deadline than we keep, so that a slow AA shows
        // up here as our timeout rather than as ttrpc's untyped one.
        let ctx = ttrpc::context::with_timeout(
            (MEASUREMENT_TIMEOUT + Duration::from_secs(1)).as_nanos() as i64,
        );
        let resp = tokio::time::timeout(
            MEASUREMENT_TIMEOUT,
            self.client.extend_runtime_measurement(ctx, &req),
        )
        .await
        .map_err(|_| MeasurementError::TimedOut {
            socket: socket(),
            after: MEASUREMENT_TIMEOUT,
        })?
        .map_err(|source| MeasurementError::Call {
            socket: socket(),
            source,
        })?;
        use attestation_agent::RuntimeMeasurementResult as R;
        match resp.Result.enum_value() {
            Ok(R::OK) => Ok(MeasurementResult::Extended),
            Ok(R::NOT_SUPPORTED) => Ok(MeasurementResult::NotSupported),
            Ok(R::NOT_ENABLED) => Ok(MeasurementResult::NotEnabled),
            Err(value) => Err(MeasurementError::UnknownResult {
                socket: socket(),
                value,
            }),
        }
    }
}

#[async_trait::async_trait]
impl EvidenceProvider for AttestationAgent {
    async fn tee(&self) -> Result<kbs_client::kbs_types::Tee, kbs_client::Error> {
        Ok(self.tee)
    }

    async fn primary_evidence(&self, report_data: Vec<u8>) -> Result<Value, kbs_client::Error> {
        let mut req = attestation_agent::GetEvidenceRequest::new();
        req.RuntimeData = report_data;
        let resp = self
            .client
            .get_evidence(ctx(), &req)
            .await
            .map_err(|e| aa_err(&self.socket, format_args!("GetEvidence: {e}")))?;
        serde_json::from_slice(&resp.Evidence)
            .map_err(|e| aa_err(&self.socket, format_args!("evidence is not JSON: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aa::agent::{Agent, AgentSettings, InitdataArg};
    use crate::aa::config::AaToml;
    use std::sync::Arc;

    #[test]
    fn the_pull_event_reads_as_cdh_writes_it() {
        assert_eq!(
            pull_image_content("registry:5000/app:v1", "sha256:0123"),
            r#"{"image":"registry:5000/app:v1", "digest":"sha256:0123"}"#
        );
    }

    #[tokio::test]
    async fn measures_a_pull_through_a_running_agent() {
        let d = tempfile::tempdir().unwrap();
        let paths = kbs_client::HardwarePaths::under(d.path());
        let start = |enable: bool, sock: &str| {
            let mut config = AaToml::default();
            config.eventlog_config.enable_eventlog = enable;
            let settings = AgentSettings {
                config,
                initdata: InitdataArg::None,
                paths: paths.clone(),
                eventlog_path: d.path().join("eventlog"),
            };
            let addr = format!("unix://{}/{sock}", d.path().display());
            async move {
                let agent = Arc::new(Agent::start(settings).await.unwrap());
                crate::aa::server::start(agent, &addr).await.unwrap()
            }
        };
        let mut on = start(true, "on.sock").await;
        let aa = AttestationAgent::connect(&d.path().join("on.sock"))
            .await
            .unwrap();
        assert_eq!(
            aa.measure_pull("r/app:v1", "sha256:ab").await.unwrap(),
            MeasurementResult::Extended
        );
        let log =
            crate::aa::eventlog::parse(&std::fs::read(d.path().join("eventlog")).unwrap()).unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].event.domain, EVENT_DOMAIN);
        assert_eq!(log[0].event.operation, PULL_IMAGE_OPERATION);
        assert_eq!(
            log[0].event.content,
            pull_image_content("r/app:v1", "sha256:ab")
        );
        on.shutdown().await.unwrap();
        // The server is gone: an outage, not a result.
        let e = aa.measure_pull("r/app:v1", "sha256:ab").await.unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Unavailable, "{e}");

        let mut off = start(false, "off.sock").await;
        let aa = AttestationAgent::connect(&d.path().join("off.sock"))
            .await
            .unwrap();
        assert_eq!(
            aa.measure_pull("r/app:v1", "sha256:ab").await.unwrap(),
            MeasurementResult::NotEnabled
        );
        off.shutdown().await.unwrap();
    }
}
