//! HTTPS for the test KBS: rustls (aws-lc-rs provider) in front of the same axum router.

use std::io;
use std::sync::Arc;

use axum::Router;
use hyper_util::rt::TokioIo;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::TlsIdentity;

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

pub(crate) fn acceptor(id: TlsIdentity) -> io::Result<TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&id.cert_chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("TLS certificate PEM: {e}")))?;
    let key =
        PrivateKeyDer::from_pem_slice(&id.key_pem).map_err(|e| bad(format!("TLS key PEM: {e}")))?;
    let cfg = ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| bad(format!("TLS identity: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

pub(crate) async fn serve(listener: tokio::net::TcpListener, acceptor: TlsAcceptor, app: Router) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!("TLS handshake failed: {e}");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |req| app.clone().oneshot(req));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await
            {
                tracing::debug!("TLS connection ended: {e}");
            }
        });
    }
}
