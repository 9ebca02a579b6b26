//! The attestation-agent's ttrpc server (`attestation_agent.AttestationAgentService`) on the
//! unix socket kata-agent waits for.
//!
//! Status codes are the reference's, not the puller's table (`api::server::codes`): the AA
//! answers `INTERNAL` for every failed call, which is what its clients expect, except that an
//! event which cannot be logged as given is `INVALID_ARGUMENT`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cdh_api::protos::{attestation_agent as pb, attestation_agent_ttrpc as svc};
use tracing::{error, info};
use ttrpc::Code;

use super::agent::{Agent, Measurement};
use super::AaError;

fn status(code: Code, msg: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

/// The status a failed call answers, logged once here (errors never carry tokens or keys).
fn failed(call: &str, e: AaError) -> ttrpc::Error {
    error!("{call} failed: {e}");
    let code = match e {
        AaError::BadEvent(_) => Code::INVALID_ARGUMENT,
        _ => Code::INTERNAL,
    };
    status(code, format!("{call}: {e}"))
}

/// The service over one [`Agent`].
pub struct Service {
    agent: Arc<Agent>,
}

impl Service {
    /// Serves `agent`.
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

#[async_trait::async_trait]
impl svc::AttestationAgentService for Service {
    async fn get_evidence(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: pb::GetEvidenceRequest,
    ) -> ttrpc::Result<pb::GetEvidenceResponse> {
        let ev = self
            .agent
            .evidence(req.RuntimeData)
            .await
            .map_err(|e| failed("GetEvidence", e))?;
        let mut r = pb::GetEvidenceResponse::new();
        r.Evidence = ev;
        Ok(r)
    }

    async fn get_additional_evidence(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: pb::GetAdditionalEvidenceRequest,
    ) -> ttrpc::Result<pb::GetEvidenceResponse> {
        let ev = self
            .agent
            .additional_evidence(req.RuntimeData)
            .await
            .map_err(|e| failed("GetAdditionalEvidence", e))?;
        let mut r = pb::GetEvidenceResponse::new();
        r.Evidence = ev;
        Ok(r)
    }

    async fn get_token(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: pb::GetTokenRequest,
    ) -> ttrpc::Result<pb::GetTokenResponse> {
        let token = self
            .agent
            .token(&req.TokenType)
            .await
            .map_err(|e| failed("GetToken", e))?;
        let mut r = pb::GetTokenResponse::new();
        // The reply owns a copy; ours is zeroized on drop.
        r.Token = token.to_vec();
        Ok(r)
    }

    async fn extend_runtime_measurement(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: pb::ExtendRuntimeMeasurementRequest,
    ) -> ttrpc::Result<pb::ExtendRuntimeMeasurementResponse> {
        let m = self
            .agent
            .extend(&req.Domain, &req.Operation, &req.Content, req.RegisterIndex)
            .await
            .map_err(|e| failed("ExtendRuntimeMeasurement", e))?;
        let mut r = pb::ExtendRuntimeMeasurementResponse::new();
        r.Result = match m {
            Measurement::Ok => pb::RuntimeMeasurementResult::OK,
            Measurement::NotSupported => pb::RuntimeMeasurementResult::NOT_SUPPORTED,
            Measurement::NotEnabled => pb::RuntimeMeasurementResult::NOT_ENABLED,
        }
        .into();
        Ok(r)
    }

    async fn bind_init_data(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: pb::BindInitDataRequest,
    ) -> ttrpc::Result<pb::BindInitDataResponse> {
        self.agent
            .bind_init_data(&req.Digest)
            .await
            .map_err(|e| failed("BindInitData", e))?;
        Ok(pb::BindInitDataResponse::new())
    }

    async fn get_tee_type(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        _req: pb::GetTeeTypeRequest,
    ) -> ttrpc::Result<pb::GetTeeTypeResponse> {
        let mut r = pb::GetTeeTypeResponse::new();
        r.tee = self.agent.tee_name();
        Ok(r)
    }

    async fn get_additional_tees(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        _req: pb::GetAdditionalTeesRequest,
    ) -> ttrpc::Result<pb::GetAdditionalTeesResponse> {
        let mut r = pb::GetAdditionalTeesResponse::new();
        r.additional_tees = self.agent.additional_tees();
        Ok(r)
    }
}

/// The socket path of a `unix:///…` address (the only kind the reference accepts).
pub fn socket_path(addr: &str) -> Result<PathBuf, AaError> {
    match addr.strip_prefix("unix://") {
        Some(p) if Path::new(p).is_absolute() => Ok(PathBuf::from(p)),
        _ => Err(AaError::Socket {
            addr: addr.into(),
            reason: "want unix:///<absolute path>".into(),
        }),
    }
}

/// Binds `addr` (creating its directory and replacing a stale socket) and starts serving.
pub async fn start(agent: Arc<Agent>, addr: &str) -> Result<ttrpc::r#async::Server, AaError> {
    let path = socket_path(addr)?;
    let fail = |reason: String| AaError::Socket {
        addr: addr.into(),
        reason,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    }
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(format!("removing the old socket: {e}"))),
    }
    let service = svc::create_attestation_agent_service(Arc::new(Service::new(agent)));
    let mut server = ttrpc::r#async::Server::new()
        .bind(addr)
        .map_err(|e| fail(e.to_string()))?
        .register_service(service);
    server.start().await.map_err(|e| fail(e.to_string()))?;
    info!(socket = %path.display(), "attestation-agent ttrpc server listening");
    Ok(server)
}

/// Serves on `addr` until SIGTERM, SIGINT or SIGHUP, then removes the socket.
pub async fn serve(agent: Arc<Agent>, addr: &str) -> Result<(), AaError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut server = start(agent, addr).await?;
    let sig = |k: SignalKind| {
        signal(k).map_err(|e| AaError::Socket {
            addr: addr.into(),
            reason: format!("installing a signal handler: {e}"),
        })
    };
    let (mut term, mut int, mut hup) = (
        sig(SignalKind::terminate())?,
        sig(SignalKind::interrupt())?,
        sig(SignalKind::hangup())?,
    );
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = hup.recv() => {}
    }
    info!("attestation-agent shutting down");
    let _ = server.shutdown().await;
    if let Ok(p) = socket_path(addr) {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aa::agent::{AgentSettings, InitdataArg};
    use crate::aa::config::AaToml;

    #[test]
    fn only_absolute_unix_addresses() {
        assert_eq!(
            socket_path(
                "unix:///run/confidential-containers/attestation-agent/attestation-agent.sock"
            )
            .unwrap(),
            Path::new("/run/confidential-containers/attestation-agent/attestation-agent.sock")
        );
        for bad in [
            "/run/aa.sock",
            "unix://run/aa.sock",
            "vsock://3:1",
            "tcp://127.0.0.1:1",
        ] {
            assert!(socket_path(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn answers_over_the_socket_with_the_references_result_codes() {
        use svc::AttestationAgentServiceClient as Client;
        let d = tempfile::tempdir().unwrap();
        let paths = kbs_client::HardwarePaths::under(d.path());
        let mut config = AaToml::default();
        config.eventlog_config.enable_eventlog = true;
        let agent = Agent::start(AgentSettings {
            config,
            initdata: InitdataArg::None,
            paths,
            eventlog_path: d.path().join("eventlog"),
        })
        .await
        .unwrap();
        // The socket's directory does not exist yet: binding creates it.
        let addr = format!("unix://{}/sub/aa.sock", d.path().display());
        let mut server = start(Arc::new(agent), &addr).await.unwrap();
        let c = Client::new(ttrpc::r#async::Client::connect(&addr).await.unwrap());
        let ctx = || ttrpc::context::with_timeout(10_000_000_000);
        let tee = c
            .get_tee_type(ctx(), &pb::GetTeeTypeRequest::new())
            .await
            .unwrap();
        assert_eq!(tee.tee, "sample");
        let mut req = pb::ExtendRuntimeMeasurementRequest::new();
        req.Domain = "d".into();
        req.Operation = "op".into();
        req.Content = "c".into();
        let r = c.extend_runtime_measurement(ctx(), &req).await.unwrap();
        assert_eq!(r.Result.enum_value(), Ok(pb::RuntimeMeasurementResult::OK));
        req.Content = "a\nb".into();
        let e = c.extend_runtime_measurement(ctx(), &req).await.unwrap_err();
        assert!(
            matches!(&e, ttrpc::Error::RpcStatus(s) if s.code() == Code::INVALID_ARGUMENT),
            "{e:?}"
        );
        let mut t = pb::GetTokenRequest::new();
        t.TokenType = "coco_as".into();
        let e = c.get_token(ctx(), &t).await.unwrap_err();
        assert!(
            matches!(&e, ttrpc::Error::RpcStatus(s) if s.code() == Code::INTERNAL && s.message().contains("coco_as")),
            "{e:?}"
        );
        let tees = c
            .get_additional_tees(ctx(), &pb::GetAdditionalTeesRequest::new())
            .await
            .unwrap();
        assert!(tees.additional_tees.is_empty());
        let mut b = pb::BindInitDataRequest::new();
        b.Digest = vec![1u8; 48];
        c.bind_init_data(ctx(), &b).await.unwrap();
        server.shutdown().await.unwrap();
    }
}
