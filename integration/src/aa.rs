//! A tiny attestation-agent for tests: serves the AA's ttrpc API (`GetTeeType`, `GetEvidence`)
//! on a unix socket with `sample` evidence, and counts the calls, so tests can prove that the
//! guest-puller took its evidence from an AA instead of its built-in attesters.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use cdh_api::protos::{attestation_agent, attestation_agent_ttrpc};

#[derive(Default)]
struct Calls {
    tee_type: AtomicU64,
    evidence: AtomicU64,
    last_runtime_data: Mutex<Vec<u8>>,
}

struct Service {
    calls: Arc<Calls>,
}

#[async_trait::async_trait]
impl attestation_agent_ttrpc::AttestationAgentService for Service {
    async fn get_tee_type(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        _req: attestation_agent::GetTeeTypeRequest,
    ) -> ttrpc::Result<attestation_agent::GetTeeTypeResponse> {
        self.calls.tee_type.fetch_add(1, Ordering::SeqCst);
        let mut r = attestation_agent::GetTeeTypeResponse::new();
        r.tee = "sample".into();
        Ok(r)
    }

    async fn get_evidence(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: attestation_agent::GetEvidenceRequest,
    ) -> ttrpc::Result<attestation_agent::GetEvidenceResponse> {
        self.calls.evidence.fetch_add(1, Ordering::SeqCst);
        *self.calls.last_runtime_data.lock().expect("lock") = req.RuntimeData.clone();
        // What the AA's sample attester returns: the runtime data, unpadded.
        let ev = serde_json::json!({
            "svn": "1",
            "report_data": STANDARD.encode(&req.RuntimeData),
        });
        let mut r = attestation_agent::GetEvidenceResponse::new();
        r.Evidence = serde_json::to_vec(&ev).expect("json");
        Ok(r)
    }
}

/// A running test attestation-agent; stopped on drop.
pub struct TestAa {
    socket: PathBuf,
    server: ttrpc::r#async::Server,
    calls: Arc<Calls>,
}

impl TestAa {
    /// Serves on the unix socket `socket` (its directory must exist).
    pub async fn start(socket: &Path) -> TestAa {
        let calls = Arc::new(Calls::default());
        let svc = Arc::new(Service {
            calls: calls.clone(),
        });
        let mut server = ttrpc::r#async::Server::new()
            .bind(&format!("unix://{}", socket.display()))
            .unwrap_or_else(|e| panic!("binding the test AA at {}: {e}", socket.display()))
            .register_service(attestation_agent_ttrpc::create_attestation_agent_service(
                svc,
            ));
        server.start().await.expect("starting the test AA");
        TestAa {
            socket: socket.to_owned(),
            server,
            calls,
        }
    }

    /// `unix:///…`, as `[aa] aa_socket` names it.
    pub fn uri(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// (`GetTeeType`, `GetEvidence`) calls so far.
    pub fn calls(&self) -> (u64, u64) {
        (
            self.calls.tee_type.load(Ordering::SeqCst),
            self.calls.evidence.load(Ordering::SeqCst),
        )
    }

    /// The runtime data of the last `GetEvidence`.
    pub fn last_runtime_data(&self) -> Vec<u8> {
        self.calls.last_runtime_data.lock().expect("lock").clone()
    }

    /// Stops serving.
    pub async fn stop(mut self) {
        let _ = self.server.shutdown().await;
    }
}
