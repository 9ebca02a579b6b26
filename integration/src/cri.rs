//! A tiny CRI client (crictl is not packaged in Debian), built on `k8s-cri`: the image calls
//! and the pod/container calls kubelet makes to run a container.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    ListImagesRequest, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
    PullImageRequest, RemoveContainerRequest, RemoveImageRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Pod annotation containerd 1.7–2.2.1 read to choose the pull snapshotter.
pub const RUNTIME_HANDLER_ANNOTATION: &str = "io.containerd.cri.runtime-handler";

/// A blocking CRI client on containerd's socket.
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    client: ImageServiceClient<Channel>,
    runtime: RuntimeServiceClient<Channel>,
}

/// A running pod sandbox and the config it was created with (CreateContainer repeats it).
pub struct Pod {
    /// The sandbox id containerd gave it.
    pub id: String,
    config: PodSandboxConfig,
}

impl Pod {
    /// Where containerd writes this pod's container logs.
    pub fn log_dir(&self) -> PathBuf {
        PathBuf::from(&self.config.log_directory)
    }
}

/// The pod sandbox config kubelet would send for a host-network pod (no CNI here), with the
/// runtime-handler annotation containerd 1.7–2.2.1 take the pull snapshotter from.
fn pod_config(name: &str, log_dir: &Path, runtime_handler: Option<&str>) -> PodSandboxConfig {
    let mut annotations = HashMap::new();
    if let Some(h) = runtime_handler {
        annotations.insert(RUNTIME_HANDLER_ANNOTATION.to_string(), h.to_string());
    }
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-uid"),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: log_dir.display().to_string(),
        annotations,
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
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
            client: ImageServiceClient::new(channel.clone()),
            runtime: RuntimeServiceClient::new(channel),
        })
    }

    /// PullImage; with a handler, sets both the pod annotation (1.7–2.2.1) and
    /// `ImageSpec.runtime_handler` (2.2.2+). Returns the image ref containerd reports.
    pub fn pull_image(
        &mut self,
        image: &str,
        runtime_handler: Option<&str>,
    ) -> Result<String, tonic::Status> {
        let req = PullImageRequest {
            image: Some(ImageSpec {
                image: image.to_string(),
                runtime_handler: runtime_handler.unwrap_or_default().to_string(),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: Some(pod_config("guestpull-test", Path::new(""), runtime_handler)),
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

    /// RunPodSandbox: a host-network pod `name` under `runtime_handler`, logs in `log_dir`.
    pub fn run_pod(
        &mut self,
        name: &str,
        runtime_handler: Option<&str>,
        log_dir: &Path,
    ) -> Result<Pod, tonic::Status> {
        let config = pod_config(name, log_dir, runtime_handler);
        let req = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: runtime_handler.unwrap_or_default().to_string(),
        };
        let client = &mut self.runtime;
        let id = self
            .rt
            .block_on(client.run_pod_sandbox(req))?
            .into_inner()
            .pod_sandbox_id;
        Ok(Pod { id, config })
    }

    /// CreateContainer + StartContainer of `image` in `pod` running `command` (empty: the image's
    /// own entrypoint); returns the container id. The log goes to `<pod log dir>/<name>.log`.
    pub fn start_container(
        &mut self,
        pod: &Pod,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<String, tonic::Status> {
        let req = CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                log_path: format!("{name}.log"),
                command: command.iter().map(|c| c.to_string()).collect(),
                ..Default::default()
            }),
            sandbox_config: Some(pod.config.clone()),
        };
        let client = &mut self.runtime;
        let id = self
            .rt
            .block_on(client.create_container(req))?
            .into_inner()
            .container_id;
        let client = &mut self.runtime;
        self.rt
            .block_on(client.start_container(StartContainerRequest {
                container_id: id.clone(),
            }))?;
        Ok(id)
    }

    /// Polls ContainerStatus until the container exited; returns its exit code.
    pub fn wait_exited(&mut self, id: &str, timeout: Duration) -> Result<i32, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let client = &mut self.runtime;
            let status = self
                .rt
                .block_on(client.container_status(ContainerStatusRequest {
                    container_id: id.into(),
                    verbose: false,
                }))
                .map_err(|e| format!("ContainerStatus {id}: {e}"))?
                .into_inner()
                .status
                .ok_or_else(|| format!("ContainerStatus {id}: no status"))?;
            if status.state == ContainerState::ContainerExited as i32 {
                return Ok(status.exit_code);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "container {id} still in state {} after {timeout:?}",
                    status.state
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// RemoveContainer.
    pub fn remove_container(&mut self, id: &str) -> Result<(), tonic::Status> {
        let client = &mut self.runtime;
        self.rt
            .block_on(client.remove_container(RemoveContainerRequest {
                container_id: id.into(),
            }))
            .map(|_| ())
    }

    /// StopPodSandbox + RemovePodSandbox.
    pub fn remove_pod(&mut self, pod: &Pod) -> Result<(), tonic::Status> {
        let client = &mut self.runtime;
        self.rt
            .block_on(client.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            }))?;
        let client = &mut self.runtime;
        self.rt
            .block_on(client.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            }))
            .map(|_| ())
    }
}

/// The message lines of a CRI container log (`<time> <stream> <P|F> <message>` per line).
pub fn log_messages(path: &Path) -> std::io::Result<String> {
    let raw = std::fs::read_to_string(path)?;
    let mut out = String::new();
    for line in raw.lines() {
        let mut parts = line.splitn(4, ' ');
        let (_, _, tag, msg) = (parts.next(), parts.next(), parts.next(), parts.next());
        out.push_str(msg.unwrap_or_default());
        // A partial line ("P") continues in the next entry.
        if tag != Some("P") {
            out.push('\n');
        }
    }
    Ok(out)
}
