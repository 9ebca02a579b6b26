//! guestpull's owner-side key provider: what image owners run to encrypt images for guestpull
//! (CoCo's `coco_keyprovider` job). It serves ocicrypt's `keyprovider.KeyProviderService` over
//! gRPC and uploads KEKs to a KBS. It lives outside `guest-puller` so the guest's binary carries
//! neither a gRPC stack nor the KBS admin client; the wire types and the wrap/unwrap logic are
//! guest-puller's `keyprovider` module, so both sides read and write the same packets.

use std::sync::Arc;

use guest_puller::keyprovider::{
    Kek, KeyProvider, KeyProviderError, KeyProviderKeyWrapProtocolInput, Operation,
};
use kbs_client::ResourceUri;
use tracing::warn;

/// tonic bindings of `keyprovider.KeyProviderService` over cdh-api's messages (the ones it
/// serves over ttrpc).
pub mod grpc {
    use std::marker::PhantomData;

    use bytes::{Buf, BufMut};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::Status;

    pub use cdh_api::protos::keyprovider::{
        KeyProviderKeyWrapProtocolInput, KeyProviderKeyWrapProtocolOutput,
    };

    /// tonic codec for rust-protobuf messages (tonic's own codec is for prost types).
    pub struct ProtobufCodec<E, D>(PhantomData<(E, D)>);

    impl<E, D> Default for ProtobufCodec<E, D> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    /// Encoding half of [`ProtobufCodec`].
    pub struct ProtobufEncoder<E>(PhantomData<E>);
    /// Decoding half of [`ProtobufCodec`].
    pub struct ProtobufDecoder<D>(PhantomData<D>);

    impl<E, D> Codec for ProtobufCodec<E, D>
    where
        E: protobuf::Message + Send + 'static,
        D: protobuf::Message + Send + 'static,
    {
        type Encode = E;
        type Decode = D;
        type Encoder = ProtobufEncoder<E>;
        type Decoder = ProtobufDecoder<D>;

        fn encoder(&mut self) -> Self::Encoder {
            ProtobufEncoder(PhantomData)
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProtobufDecoder(PhantomData)
        }
    }

    impl<E: protobuf::Message> Encoder for ProtobufEncoder<E> {
        type Item = E;
        type Error = Status;

        fn encode(&mut self, item: E, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            item.write_to_writer(&mut dst.writer())
                .map_err(|e| Status::internal(format!("encoding {}: {e}", E::NAME)))
        }
    }

    impl<D: protobuf::Message> Decoder for ProtobufDecoder<D> {
        type Item = D;
        type Error = Status;

        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
            let bytes = src.copy_to_bytes(src.remaining());
            D::parse_from_bytes(&bytes)
                .map(Some)
                .map_err(|e| Status::invalid_argument(format!("decoding {}: {e}", D::NAME)))
        }
    }

    include!(concat!(
        env!("OUT_DIR"),
        "/keyprovider.KeyProviderService.rs"
    ));
}

/// The gRPC status ocicrypt gets for `e`: the guest-puller's one code table (ttrpc's codes are
/// google.rpc's, so the number carries over).
pub fn status(e: &KeyProviderError) -> tonic::Status {
    let code = guest_puller::api::server::codes(e.kind());
    tonic::Status::new(tonic::Code::from_i32(code as i32), e.to_string())
}

/// Registering a KEK with the KBS failed.
#[derive(Debug, thiserror::Error)]
#[error("registering {kid} with the KBS at {url}: {reason}")]
pub struct RegisterError {
    /// The key id being registered.
    pub kid: String,
    /// The KBS it was sent to.
    pub url: String,
    /// What went wrong.
    pub reason: String,
}

/// `keyprovider.KeyProviderService` over gRPC (ocicrypt's `{"grpc":"host:port"}`).
pub struct GrpcKeyProvider(pub Arc<KeyProvider>);

impl GrpcKeyProvider {
    fn call(
        &self,
        req: tonic::Request<grpc::KeyProviderKeyWrapProtocolInput>,
        op: Operation,
    ) -> Result<tonic::Response<grpc::KeyProviderKeyWrapProtocolOutput>, tonic::Status> {
        let input = KeyProviderKeyWrapProtocolInput::from_json(
            &req.get_ref().KeyProviderKeyWrapProtocolInput,
        )
        .map_err(|e| status(&e))?;
        if input.op != op {
            return Err(tonic::Status::invalid_argument(format!(
                "this RPC handles op {op:?}, the request says {:?}",
                input.op
            )));
        }
        match self.0.handle(&input) {
            Ok(out) => Ok(tonic::Response::new(
                grpc::KeyProviderKeyWrapProtocolOutput {
                    KeyProviderKeyWrapProtocolOutput: out.to_json(),
                    ..Default::default()
                },
            )),
            Err(e) => {
                warn!("{op:?} failed: {e}");
                Err(status(&e))
            }
        }
    }
}

#[tonic::async_trait]
impl grpc::key_provider_service_server::KeyProviderService for GrpcKeyProvider {
    async fn wrap_key(
        &self,
        req: tonic::Request<grpc::KeyProviderKeyWrapProtocolInput>,
    ) -> Result<tonic::Response<grpc::KeyProviderKeyWrapProtocolOutput>, tonic::Status> {
        self.call(req, Operation::Keywrap)
    }

    async fn un_wrap_key(
        &self,
        req: tonic::Request<grpc::KeyProviderKeyWrapProtocolInput>,
    ) -> Result<tonic::Response<grpc::KeyProviderKeyWrapProtocolOutput>, tonic::Status> {
        self.call(req, Operation::Keyunwrap)
    }
}

/// Serves `provider` over gRPC on `listener` until `shutdown` resolves.
pub async fn serve_grpc(
    provider: Arc<KeyProvider>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tonic::transport::Server::builder()
        .add_service(
            grpc::key_provider_service_server::KeyProviderServiceServer::new(GrpcKeyProvider(
                provider,
            )),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Uploads `kek` as KBS resource `kid` through the admin endpoint
/// `POST /kbs/v0/resource/<repo>/<type>/<tag>`. Trustee requires an admin bearer token (a JWT
/// signed with the KBS admin key); the test KBS accepts the upload without one.
pub async fn register_kek(
    kbs_url: &str,
    kid: &ResourceUri,
    kek: &Kek,
    admin_token: Option<&str>,
    ca_pem: Option<&[u8]>,
) -> Result<(), RegisterError> {
    let fail = |reason: String| RegisterError {
        kid: kid.to_string(),
        url: kbs_url.to_string(),
        reason,
    };
    let mut builder = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30));
    if let Some(pem) = ca_pem {
        let cert = reqwest::Certificate::from_pem(pem).map_err(|e| fail(format!("CA: {e}")))?;
        builder = builder.add_root_certificate(cert);
    }
    let client = builder.build().map_err(|e| fail(e.to_string()))?;
    let url = format!(
        "{}/kbs/v0/resource/{}",
        kbs_url.trim_end_matches('/'),
        kid.path()
    );
    let mut req = client
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(kek.as_bytes().to_vec());
    if let Some(t) = admin_token {
        req = req.bearer_auth(t.trim());
    }
    let resp = req.send().await.map_err(|e| fail(e.to_string()))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let body = resp.text().await.unwrap_or_default();
    let hint = if status == reqwest::StatusCode::UNAUTHORIZED && admin_token.is_none() {
        " (the KBS wants an admin token: --admin-token-file)"
    } else {
        ""
    };
    Err(fail(format!("HTTP {status}: {}{hint}", body.trim())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use guest_puller::keyprovider::{KeyProviderKeyWrapProtocolOutput, KeysDir, DEFAULT_PROVIDER};

    const KID: &str = "kbs:///default/key/app";

    /// What ocicrypt (Go) sends for `--recipient provider:guestpull:<param>` (lab.md §3.b).
    fn go_wrap_request(param: &str, plbco: &[u8]) -> Vec<u8> {
        serde_json::json!({"op": "keywrap",
            "keywrapparams": {"ec": {"Parameters": {"guestpull": [STANDARD.encode(param)]},
                                     "DecryptConfig": {"Parameters": {}}},
                              "optsdata": STANDARD.encode(plbco)},
            "keyunwrapparams": {"dc": null, "annotation": null}})
        .to_string()
        .into_bytes()
    }

    #[tokio::test]
    async fn grpc_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::generate();
        std::fs::create_dir_all(dir.path().join("default/key")).unwrap();
        kek.write_new(&dir.path().join("default/key/app")).unwrap();
        let kp = Arc::new(KeyProvider::new(
            DEFAULT_PROVIDER,
            Box::new(KeysDir::new(dir.path())),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_grpc(kp, listener, async {
            let _ = rx.await;
        }));
        let mut client = grpc::key_provider_service_client::KeyProviderServiceClient::connect(
            format!("http://{addr}"),
        )
        .await
        .unwrap();
        let plbco = br#"{"symkey":"AAAA"}"#;
        let out = client
            .wrap_key(grpc::KeyProviderKeyWrapProtocolInput {
                KeyProviderKeyWrapProtocolInput: go_wrap_request(KID, plbco),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let out: KeyProviderKeyWrapProtocolOutput =
            serde_json::from_slice(&out.KeyProviderKeyWrapProtocolOutput).unwrap();
        let ann = out.keywrapresults.unwrap().annotation;
        let req = serde_json::json!({"op": "keyunwrap",
            "keyunwrapparams": {"annotation": STANDARD.encode(ann.as_slice())}});
        let out = client
            .un_wrap_key(grpc::KeyProviderKeyWrapProtocolInput {
                KeyProviderKeyWrapProtocolInput: req.to_string().into_bytes(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let out: KeyProviderKeyWrapProtocolOutput =
            serde_json::from_slice(&out.KeyProviderKeyWrapProtocolOutput).unwrap();
        assert_eq!(out.keyunwrapresults.unwrap().optsdata.as_slice(), plbco);
        // Unknown kid → NOT_FOUND naming it; op mismatch → INVALID_ARGUMENT.
        let st = client
            .wrap_key(grpc::KeyProviderKeyWrapProtocolInput {
                KeyProviderKeyWrapProtocolInput: go_wrap_request("kbs:///default/key/none", plbco),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(st.code(), tonic::Code::NotFound);
        assert!(st.message().contains("kbs:///default/key/none"));
        let st = client
            .un_wrap_key(grpc::KeyProviderKeyWrapProtocolInput {
                KeyProviderKeyWrapProtocolInput: go_wrap_request(KID, plbco),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(st.code(), tonic::Code::InvalidArgument);
        tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
