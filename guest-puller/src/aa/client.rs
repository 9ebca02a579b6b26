//! Evidence from a running attestation-agent over its ttrpc API (`GetTeeType`, `GetEvidence`),
//! as CDH's KBS client gets it when kata-agent started an AA before it.

use std::path::Path;
use std::time::Duration;

use cdh_api::protos::{attestation_agent, attestation_agent_ttrpc};
use kbs_client::attester::EvidenceProvider;
use serde_json::Value;

/// How long one AA call may take (quotes from real hardware can be slow).
const AA_TIMEOUT: Duration = Duration::from_secs(50);

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
