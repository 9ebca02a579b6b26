//! ttrpc server: `api.ImagePullService/PullImage` and `keyprovider.KeyProviderService/UnWrapKey`
//! on a unix socket, as the CDH serves them to kata-agent and ocicrypt keyprovider callers.

use std::path::Path;
use std::sync::Arc;

use tracing::{error, info};
use ttrpc::{Code, Error as TtrpcError};

use super::protos::{api, api_ttrpc, keyprovider, keyprovider_ttrpc};
use crate::keyprovider::{
    ByteForm, KeyProviderKeyWrapProtocolInput, KeyProviderKeyWrapProtocolOutput, KeyUnwrapResults,
    Operation, WireBytes,
};
use crate::policy::PolicyError;
use crate::pull::{PullError, Puller};
use crate::registry::RegistryError;
use crate::resource::ResourceError;

fn status(code: Code, msg: impl ToString) -> TtrpcError {
    TtrpcError::RpcStatus(ttrpc::get_status(code, msg))
}

/// ttrpc status code a pull error maps to.
pub fn pull_error_code(e: &PullError) -> Code {
    match e {
        PullError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
        PullError::Config(_) => Code::FAILED_PRECONDITION,
        PullError::Resource(ResourceError::Denied { .. }) => Code::PERMISSION_DENIED,
        PullError::Resource(ResourceError::NotFound { .. }) => Code::NOT_FOUND,
        PullError::Resource(ResourceError::InvalidUri { .. }) => Code::FAILED_PRECONDITION,
        PullError::Resource(ResourceError::Failed { .. }) => Code::UNAVAILABLE,
        PullError::Registry(RegistryError::InvalidReference { .. }) => Code::INVALID_ARGUMENT,
        PullError::Registry(RegistryError::Blocked(_)) => Code::PERMISSION_DENIED,
        PullError::Registry(RegistryError::DigestMismatch { .. }) => Code::DATA_LOSS,
        PullError::Registry(RegistryError::Unsupported { .. }) => Code::UNIMPLEMENTED,
        PullError::Registry(RegistryError::Credentials(_)) => Code::FAILED_PRECONDITION,
        PullError::Registry(RegistryError::Request { reason, .. }) => {
            if reason.contains("404")
                || reason.contains("not found")
                || reason.contains("MANIFEST_UNKNOWN")
            {
                Code::NOT_FOUND
            } else if reason.contains("401")
                || reason.contains("403")
                || reason.contains("Not authorized")
            {
                Code::PERMISSION_DENIED
            } else {
                Code::UNAVAILABLE
            }
        }
        PullError::Registry(RegistryError::ConsumerGone) => Code::INTERNAL,
        PullError::Policy(PolicyError::Rejected { .. }) => Code::PERMISSION_DENIED,
        PullError::Policy(_) => Code::FAILED_PRECONDITION,
        PullError::Decrypt(_) => Code::PERMISSION_DENIED,
        PullError::Layer(crate::layer::LayerError::Integrity { .. }) => Code::DATA_LOSS,
        PullError::Layer(crate::layer::LayerError::Unpack { .. }) => Code::INVALID_ARGUMENT,
        PullError::Layer(crate::layer::LayerError::MediaType { .. }) => Code::UNIMPLEMENTED,
        PullError::Layer(crate::layer::LayerError::Fetch { .. }) => Code::UNAVAILABLE,
        PullError::Layer(crate::layer::LayerError::Store(_)) => Code::INTERNAL,
        PullError::Bundle(crate::bundle::BundleError::Busy(_)) => Code::ALREADY_EXISTS,
        PullError::Bundle(crate::bundle::BundleError::Config(_)) => Code::INVALID_ARGUMENT,
        PullError::Bundle(_) => Code::INTERNAL,
    }
}

/// Serves both services over one [`Puller`].
pub struct Service {
    puller: Arc<Puller>,
}

#[async_trait::async_trait]
impl api_ttrpc::ImagePullService for Service {
    async fn pull_image(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: api::ImagePullRequest,
    ) -> ttrpc::Result<api::ImagePullResponse> {
        info!(image = %req.image_url, bundle = %req.bundle_path, "PullImage");
        match self
            .puller
            .pull_image(&req.image_url, Path::new(&req.bundle_path))
            .await
        {
            Ok(r) => {
                let mut resp = api::ImagePullResponse::new();
                resp.manifest_digest = r.manifest_digest;
                Ok(resp)
            }
            Err(e) => {
                error!(image = %req.image_url, "PullImage failed: {e}");
                Err(status(
                    pull_error_code(&e),
                    format!("pull {}: {e}", req.image_url),
                ))
            }
        }
    }
}

impl Service {
    /// Handles one ocicrypt keyprovider `keyunwrap` request (JSON in, JSON out).
    async fn unwrap_key_json(&self, input: &[u8]) -> ttrpc::Result<Vec<u8>> {
        let input = KeyProviderKeyWrapProtocolInput::from_json(input)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        if input.op != Operation::Keyunwrap {
            return Err(status(
                Code::INVALID_ARGUMENT,
                "UnWrapKey needs op \"keyunwrap\"",
            ));
        }
        let annotation = input.keyunwrapparams.annotation.ok_or_else(|| {
            status(
                Code::INVALID_ARGUMENT,
                "keyunwrapparams.annotation missing or not bytes",
            )
        })?;
        let plbco = self
            .puller
            .unwrapper()
            .unwrap_annotation_packet(annotation.as_slice())
            .await
            .map_err(|e| status(Code::PERMISSION_DENIED, format!("UnWrapKey: {e}")))?;
        // Array form, as CDH emits it (ocicrypt-rs callers expect it; Go accepts both).
        let out = KeyProviderKeyWrapProtocolOutput {
            keywrapresults: None,
            keyunwrapresults: Some(KeyUnwrapResults {
                optsdata: WireBytes::new(plbco.to_vec(), ByteForm::Array),
            }),
        };
        Ok(out.to_json())
    }
}

#[async_trait::async_trait]
impl keyprovider_ttrpc::KeyProviderService for Service {
    async fn wrap_key(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        _req: keyprovider::KeyProviderKeyWrapProtocolInput,
    ) -> ttrpc::Result<keyprovider::KeyProviderKeyWrapProtocolOutput> {
        Err(status(
            Code::UNIMPLEMENTED,
            "WrapKey is not offered inside the guest (encrypt images with skopeo or coco-keyprovider)",
        ))
    }

    async fn un_wrap_key(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: keyprovider::KeyProviderKeyWrapProtocolInput,
    ) -> ttrpc::Result<keyprovider::KeyProviderKeyWrapProtocolOutput> {
        let out = self
            .unwrap_key_json(&req.KeyProviderKeyWrapProtocolInput)
            .await?;
        let mut resp = keyprovider::KeyProviderKeyWrapProtocolOutput::new();
        resp.KeyProviderKeyWrapProtocolOutput = out;
        Ok(resp)
    }
}

/// Runs the server on `socket` until SIGTERM/SIGINT.
pub async fn serve(puller: Arc<Puller>, socket: &Path) -> Result<(), ttrpc::Error> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| ttrpc::Error::Others(format!("{}: {e}", dir.display())))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ttrpc::Error::Others(format!("{}: {e}", socket.display()))),
    }
    let svc = Arc::new(Service { puller });
    let mut server = ttrpc::r#async::Server::new()
        .bind(&format!("unix://{}", socket.display()))?
        .register_service(api_ttrpc::create_image_pull_service(svc.clone()))
        .register_service(keyprovider_ttrpc::create_key_provider_service(svc));
    server.start().await?;
    info!(socket = %socket.display(), "guest-puller ttrpc server listening");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| ttrpc::Error::Others(e.to_string()))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    info!("shutting down");
    server.shutdown().await?;
    let _ = std::fs::remove_file(socket);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::ResourceFetcher;
    use aes_gcm::aead::{Aead, KeyInit};
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use zeroize::Zeroizing;

    struct OneKey;
    #[async_trait::async_trait]
    impl ResourceFetcher for OneKey {
        async fn fetch(&self, uri: &str) -> Result<Zeroizing<Vec<u8>>, ResourceError> {
            if uri == "kbs:///default/key/k1" {
                Ok(Zeroizing::new(vec![9u8; 32]))
            } else {
                Err(ResourceError::Denied { uri: uri.into() })
            }
        }
    }

    #[tokio::test]
    async fn unwrap_key_accepts_string_and_array_annotations() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::config::Config::from_toml(&format!(
            "[image]\nwork_dir = \"{}\"",
            dir.path().display()
        ))
        .unwrap();
        let puller = Arc::new(Puller::new(cfg, Arc::new(OneKey)).await.unwrap());
        let svc = Service { puller };
        let plbco = br#"{"symkey":"AA==","digest":"","cipheroptions":{}}"#;
        let iv = [3u8; 12];
        let ct = aes_gcm::Aes256Gcm::new_from_slice(&[9u8; 32])
            .unwrap()
            .encrypt(aes_gcm::Nonce::from_slice(&iv), &plbco[..])
            .unwrap();
        let packet = serde_json::json!({"kid": "kbs:///default/key/k1", "wrap_type": "A256GCM",
            "wrapped_data": STANDARD.encode(&ct), "iv": STANDARD.encode(iv)})
        .to_string();
        for ann in [
            serde_json::json!(STANDARD.encode(&packet)),
            serde_json::json!(packet.as_bytes()),
        ] {
            let req = serde_json::json!({"op": "keyunwrap",
                "keyunwrapparams": {"dc": null, "annotation": ann}});
            let out = svc
                .unwrap_key_json(req.to_string().as_bytes())
                .await
                .unwrap();
            let v: KeyProviderKeyWrapProtocolOutput = serde_json::from_slice(&out).unwrap();
            let got = v.keyunwrapresults.unwrap().optsdata;
            assert_eq!(got.as_slice(), plbco);
            assert_eq!(got.form(), ByteForm::Array);
        }
        // A denied KEK is PERMISSION_DENIED naming the key id.
        let packet = packet.replace("k1", "k2");
        let req = serde_json::json!({"op": "keyunwrap",
            "keyunwrapparams": {"annotation": STANDARD.encode(&packet)}});
        match svc.unwrap_key_json(req.to_string().as_bytes()).await {
            Err(TtrpcError::RpcStatus(s)) => {
                assert_eq!(s.code(), Code::PERMISSION_DENIED);
                assert!(s.message().contains("kbs:///default/key/k2"));
            }
            other => panic!("expected PERMISSION_DENIED, got {other:?}"),
        }
        let bad = svc.unwrap_key_json(br#"{"op":"keywrap"}"#).await;
        assert!(matches!(bad, Err(TtrpcError::RpcStatus(s)) if s.code() == Code::INVALID_ARGUMENT));
    }
}
