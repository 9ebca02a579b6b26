//! A tiny CRI image-service client (crictl is not packaged in Debian), built on `k8s-cri`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{
    ImageSpec, ListImagesRequest, PodSandboxConfig, PodSandboxMetadata, PullImageRequest,
    RemoveImageRequest,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Pod annotation containerd 1.7–2.2.1 read to choose the pull snapshotter.
pub const RUNTIME_HANDLER_ANNOTATION: &str = "io.containerd.cri.runtime-handler";

/// A blocking CRI client on containerd's socket.
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    client: ImageServiceClient<Channel>,
}

impl CriClient {
    /// Connects to the CRI endpoint at `socket` (containerd's gRPC socket).
    pub fn connect(socket: &Path) -> Result<CriClient, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let path: PathBuf = socket.to_path_buf();
        let channel = rt
            .block_on(async move {
                Endpoint::try_from("http://[::]:50051")?
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                        }
                    }))
                    .await
            })
            .map_err(|e| format!("connecting to CRI at {}: {e}", socket.display()))?;
        Ok(CriClient {
            rt,
            client: ImageServiceClient::new(channel),
        })
    }

    /// PullImage; with a handler, sets both the pod annotation (1.7–2.2.1) and
    /// `ImageSpec.runtime_handler` (2.2.2+). Returns the image ref containerd reports.
    pub fn pull_image(
        &mut self,
        image: &str,
        runtime_handler: Option<&str>,
    ) -> Result<String, tonic::Status> {
        let mut annotations = HashMap::new();
        if let Some(h) = runtime_handler {
            annotations.insert(RUNTIME_HANDLER_ANNOTATION.to_string(), h.to_string());
        }
        let req = PullImageRequest {
            image: Some(ImageSpec {
                image: image.to_string(),
                runtime_handler: runtime_handler.unwrap_or_default().to_string(),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: Some(PodSandboxConfig {
                metadata: Some(PodSandboxMetadata {
                    name: "guestpull-test".into(),
                    uid: "guestpull-test-uid".into(),
                    namespace: "default".into(),
                    attempt: 0,
                }),
                annotations,
                ..Default::default()
            }),
        };
        let client = &mut self.client;
        self.rt
            .block_on(client.pull_image(req))
            .map(|r| r.into_inner().image_ref)
    }

    /// RemoveImage.
    pub fn remove_image(&mut self, image: &str) -> Result<(), tonic::Status> {
        let req = RemoveImageRequest {
            image: Some(ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
        };
        let client = &mut self.client;
        self.rt.block_on(client.remove_image(req)).map(|_| ())
    }

    /// ListImages: repo tags of every image.
    pub fn list_images(&mut self) -> Result<Vec<String>, tonic::Status> {
        let client = &mut self.client;
        let r = self
            .rt
            .block_on(client.list_images(ListImagesRequest { filter: None }))?;
        Ok(r.into_inner()
            .images
            .into_iter()
            .flat_map(|i| i.repo_tags)
            .collect())
    }
}
