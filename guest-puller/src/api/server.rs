//! ttrpc server: `api.ImagePullService/PullImage`, `api.SealedSecretService/UnsealSecret`,
//! `api.GetResourceService/GetResource`, `api.SecureMountService/SecureMount` and
//! `keyprovider.KeyProviderService/UnWrapKey` on unix sockets (as the CDH serves them to kata-agent and ocicrypt keyprovider callers) and on
//! vsock ports (how a host reaches them in a VM without networking, like kata-agent's channel).

use std::path::Path;
use std::sync::Arc;

use tracing::{error, info, warn};
use ttrpc::{Code, Error as TtrpcError};

use super::protos::{api, api_ttrpc, keyprovider, keyprovider_ttrpc};
use crate::aa::client::{AttestationAgent, MeasurementResult};
use crate::config::ListenAddr;
use crate::error::ErrorKind;
use crate::keyprovider::{
    ByteForm, KeyProviderKeyWrapProtocolInput, KeyProviderKeyWrapProtocolOutput, KeyUnwrapResults,
    Operation, WireBytes,
};
use crate::pull::{PullError, Puller};
use crate::sealed::{kbs_uri, Unsealer};
use crate::secure_mount::{self, SecureMountError, SecureMounter};

fn status(code: Code, msg: impl ToString) -> TtrpcError {
    TtrpcError::RpcStatus(ttrpc::get_status(code, msg))
}

/// The one table from error kinds to status codes. Every server of the puller answers
/// through it; nothing else decides a status code (except the attestation-agent mode, which
/// keeps the reference AA's codes: `aa::server`). ttrpc's codes are google.rpc's, so gRPC
/// servers (the owner-side keyprovider) take the same number.
pub fn codes(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::Invalid => Code::INVALID_ARGUMENT,
        ErrorKind::NotFound => Code::NOT_FOUND,
        ErrorKind::AlreadyExists => Code::ALREADY_EXISTS,
        ErrorKind::Denied => Code::PERMISSION_DENIED,
        ErrorKind::Precondition => Code::FAILED_PRECONDITION,
        ErrorKind::Unsupported => Code::UNIMPLEMENTED,
        ErrorKind::Integrity => Code::DATA_LOSS,
        ErrorKind::Unavailable => Code::UNAVAILABLE,
        ErrorKind::TimedOut => Code::DEADLINE_EXCEEDED,
        ErrorKind::ResourceExhausted => Code::RESOURCE_EXHAUSTED,
        ErrorKind::Internal => Code::INTERNAL,
    }
}

/// ttrpc status code a pull error maps to.
pub fn pull_error_code(e: &PullError) -> Code {
    codes(e.kind())
}

/// Serves every service over one [`Puller`].
pub struct Service {
    puller: Arc<Puller>,
    unsealer: Arc<Unsealer>,
    mounter: SecureMounter,
    /// Where pulled images are measured (CDH's `PullImage` runtime event), when an AA runs.
    aa: Option<Arc<AttestationAgent>>,
}

impl Service {
    /// The services of `puller`, with sealed secrets checked as its configuration says.
    pub fn new(puller: Arc<Puller>) -> Self {
        let unsealer = Self::unsealer_for(&puller);
        let mounter = SecureMounter::new(puller.fetcher().clone(), unsealer.clone());
        Self {
            puller,
            unsealer,
            mounter,
            aa: None,
        }
    }

    /// Like [`Service::new`], with secure mounts done by `mounter`.
    pub fn with_secure_mounter(puller: Arc<Puller>, mounter: SecureMounter) -> Self {
        Self {
            unsealer: Self::unsealer_for(&puller),
            puller,
            mounter,
            aa: None,
        }
    }

    fn unsealer_for(puller: &Puller) -> Arc<Unsealer> {
        let skip = puller
            .config()
            .skip_sealed_secret_verification
            .unwrap_or(false);
        if skip {
            tracing::warn!("skip_sealed_secret_verification: sealed secrets are NOT verified");
        }
        Arc::new(Unsealer::new(puller.fetcher().clone(), skip))
    }

    /// Measures every pulled image through `aa` (when `Some`), as CDH does.
    pub fn with_attestation_agent(mut self, aa: Option<Arc<AttestationAgent>>) -> Self {
        self.aa = aa;
        self
    }

    /// After a pull: the `PullImage` runtime event, as CDH records it. An AA that cannot record
    /// it fails the pull (CDH's behaviour), and the bundle is taken down again so an unmeasured
    /// image is not left mounted; a TEE or an AA that does not measure only warns.
    async fn measure_pull(&self, image: &str, bundle: &Path, digest: &str) -> ttrpc::Result<()> {
        let Some(aa) = &self.aa else {
            return Ok(());
        };
        match aa.measure_pull(image, digest).await {
            Ok(MeasurementResult::Extended) => {
                info!(image = %image.escape_debug(), %digest, "PullImage event measured");
                Ok(())
            }
            Ok(MeasurementResult::NotSupported) => {
                warn!(image = %image.escape_debug(), "the TEE has no runtime measurement: PullImage event not measured");
                Ok(())
            }
            Ok(MeasurementResult::NotEnabled) => {
                warn!(image = %image.escape_debug(), "the attestation-agent's event log is disabled: PullImage event not measured");
                Ok(())
            }
            Err(e) => {
                error!(image = %image.escape_debug(), "PullImage failed: {e}");
                if let Err(u) = self.puller.unmount_bundle(bundle).await {
                    error!(bundle = %bundle.display(), "taking the unmeasured bundle down: {u}");
                }
                Err(status(
                    codes(e.kind()),
                    format!("pull {}: {e}", image.escape_debug()),
                ))
            }
        }
    }
}

#[async_trait::async_trait]
impl api_ttrpc::SecureMountService for Service {
    async fn secure_mount(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: api::SecureMountRequest,
    ) -> ttrpc::Result<api::SecureMountResponse> {
        let fail = |e: SecureMountError| {
            error!(mount_point = %req.mount_point.escape_debug(), "SecureMount failed: {e}");
            status(codes(e.kind()), format!("SecureMount: {e}"))
        };
        let r = secure_mount::Request::parse(&req.volume_type, &req.options, &req.mount_point)
            .map_err(fail)?;
        if !req.flags.is_empty() {
            tracing::debug!(flags = ?req.flags, "SecureMount: flags are not used (as in CDH)");
        }
        // A mount on or above the work dir hides what the store keeps there: it waits for
        // running pulls, and later pulls re-create the layout on the new filesystem.
        let hold = if r.covers(&self.puller.config().image.work_dir) {
            info!(work_dir = %self.puller.config().image.work_dir.display(),
                  "SecureMount over the work dir: image layers will live on the encrypted volume");
            Some(self.puller.exclusive_work_dir().await)
        } else {
            None
        };
        self.mounter.mount(r, hold).await.map_err(fail)?;
        Ok(api::SecureMountResponse::new())
    }
}

#[async_trait::async_trait]
impl api_ttrpc::SealedSecretService for Service {
    async fn unseal_secret(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: api::UnsealSecretInput,
    ) -> ttrpc::Result<api::UnsealSecretOutput> {
        match self.unsealer.unseal(&req.secret).await {
            Ok(plaintext) => {
                info!("UnsealSecret: unsealed");
                let mut out = api::UnsealSecretOutput::new();
                // The reply owns a copy; ours is zeroized on drop.
                out.plaintext = plaintext.to_vec();
                Ok(out)
            }
            Err(e) => {
                error!("UnsealSecret failed: {e}");
                Err(status(codes(e.kind()), format!("UnsealSecret: {e}")))
            }
        }
    }
}

#[async_trait::async_trait]
impl api_ttrpc::GetResourceService for Service {
    async fn get_resource(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: api::GetResourceRequest,
    ) -> ttrpc::Result<api::GetResourceResponse> {
        let Ok(uri) = std::str::from_utf8(&req.ResourcePath) else {
            return Err(status(
                Code::INVALID_ARGUMENT,
                "GetResource: ResourcePath must be UTF-8",
            ));
        };
        // As CDH: KBS resources only; the fetcher would also read files and inline data.
        kbs_uri(uri).map_err(|e| status(codes(e.kind()), format!("GetResource: {e}")))?;
        info!(uri = %uri, "GetResource");
        match self.puller.fetcher().fetch(uri).await {
            Ok(data) => {
                let mut out = api::GetResourceResponse::new();
                out.Resource = data.to_vec();
                Ok(out)
            }
            Err(e) => {
                error!(uri = %uri, "GetResource failed: {e}");
                Err(status(codes(e.kind()), format!("GetResource: {e}")))
            }
        }
    }
}

#[async_trait::async_trait]
impl api_ttrpc::ImagePullService for Service {
    async fn pull_image(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: api::ImagePullRequest,
    ) -> ttrpc::Result<api::ImagePullResponse> {
        // Both fields travel as bytes (see api.proto): checked here, before anything is fetched.
        let (Ok(image), Ok(bundle)) = (
            std::str::from_utf8(&req.image_url),
            std::str::from_utf8(&req.bundle_path),
        ) else {
            return Err(status(
                Code::INVALID_ARGUMENT,
                "PullImage: image_url and bundle_path must be UTF-8",
            ));
        };
        info!(image = %image.escape_debug(), bundle = %bundle.escape_debug(), "PullImage");
        match self.puller.pull_image(image, Path::new(bundle)).await {
            Ok(r) => {
                self.measure_pull(image, Path::new(bundle), &r.manifest_digest)
                    .await?;
                let mut resp = api::ImagePullResponse::new();
                resp.manifest_digest = r.manifest_digest;
                Ok(resp)
            }
            Err(e) => {
                error!(image = %image.escape_debug(), "PullImage failed: {e}");
                Err(status(
                    pull_error_code(&e),
                    format!("pull {}: {e}", image.escape_debug()),
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
            .map_err(|e| status(codes(e.kind()), format!("UnWrapKey: {e}")))?;
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

/// Prepares `addr` for binding: a unix socket's directory is created and a stale socket removed.
fn prepare(addr: &ListenAddr) -> Result<(), ttrpc::Error> {
    let ListenAddr::Unix(socket) = addr else {
        return Ok(());
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| ttrpc::Error::Others(format!("{}: {e}", dir.display())))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ttrpc::Error::Others(format!("{}: {e}", socket.display()))),
    }
}

/// Starts one ttrpc server per address (ttrpc's `Server::start` serves a single listener).
async fn start_all(
    svc: Arc<Service>,
    addrs: &[ListenAddr],
) -> Result<Vec<ttrpc::r#async::Server>, ttrpc::Error> {
    if addrs.is_empty() {
        return Err(ttrpc::Error::Others("no listen address".into()));
    }
    let mut servers = Vec::with_capacity(addrs.len());
    for addr in addrs {
        prepare(addr)?;
        let mut server = ttrpc::r#async::Server::new()
            .bind(&addr.ttrpc_uri())
            .map_err(|e| ttrpc::Error::Others(format!("binding {addr}: {e}")))?
            .register_service(api_ttrpc::create_image_pull_service(svc.clone()))
            .register_service(api_ttrpc::create_sealed_secret_service(svc.clone()))
            .register_service(api_ttrpc::create_get_resource_service(svc.clone()))
            .register_service(api_ttrpc::create_secure_mount_service(svc.clone()))
            .register_service(keyprovider_ttrpc::create_key_provider_service(svc.clone()));
        server.start().await?;
        info!(address = %addr, "guest-puller ttrpc server listening");
        servers.push(server);
    }
    Ok(servers)
}

/// Runs the server on every address in `addrs` until SIGTERM/SIGINT; pulled images are
/// measured through `aa` when one runs.
pub async fn serve(
    puller: Arc<Puller>,
    aa: Option<Arc<AttestationAgent>>,
    addrs: &[ListenAddr],
) -> Result<(), ttrpc::Error> {
    let svc = Arc::new(Service::new(puller).with_attestation_agent(aa));
    let mut servers = start_all(svc, addrs).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| ttrpc::Error::Others(e.to_string()))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    info!("shutting down");
    for server in &mut servers {
        server.shutdown().await?;
    }
    for addr in addrs {
        if let ListenAddr::Unix(socket) = addr {
            let _ = std::fs::remove_file(socket);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{ResourceError, ResourceFetcher};
    use crate::secure_mount::testutil::{Call, Recorder};
    use aes_gcm::aead::{Aead, KeyInit};
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use std::collections::HashMap;
    use std::path::PathBuf;
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

    async fn test_service(dir: &Path) -> Arc<Service> {
        // The registry rule points at a closed port: a request that got as far as fetching
        // would answer UNAVAILABLE, not INVALID_ARGUMENT.
        let cfg = crate::config::Config::from_toml(&format!(
            "[image]\nwork_dir = \"{}\"\nbundle_roots = [\"{}\"]\n\
             [image.registry_config]\ninsecure_registries = [\"127.0.0.1:1\"]",
            dir.join("work").display(),
            dir.join("run").display()
        ))
        .unwrap();
        let puller = Arc::new(Puller::new(cfg, Arc::new(OneKey)).await.unwrap());
        Arc::new(Service::new(puller))
    }

    #[tokio::test]
    async fn serves_every_unix_address_and_replaces_stale_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a/cdh.sock");
        let b = dir.path().join("b.sock");
        // A stale socket file from a crashed run must not stop the restart.
        drop(std::os::unix::net::UnixListener::bind(&b).unwrap());
        assert!(b.exists());
        let addrs = [ListenAddr::Unix(a.clone()), ListenAddr::Unix(b.clone())];
        let mut servers = start_all(test_service(dir.path()).await, &addrs)
            .await
            .unwrap();
        for sock in [&a, &b] {
            // A real round trip: the server parses the request and maps the error code.
            let err = cdh_api::client::pull_image(
                sock,
                "not a reference!",
                &dir.path().join("bundle"),
                std::time::Duration::from_secs(10),
            )
            .await
            .unwrap_err();
            match err {
                TtrpcError::RpcStatus(s) => assert_eq!(s.code(), Code::INVALID_ARGUMENT, "{s:?}"),
                other => panic!(
                    "{}: expected INVALID_ARGUMENT, got {other:?}",
                    sock.display()
                ),
            }
        }
        for s in &mut servers {
            s.shutdown().await.unwrap();
        }
    }

    #[tokio::test]
    async fn bad_bundle_paths_and_bytes_are_invalid_argument_before_any_fetch() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("cdh.sock");
        let mut servers = start_all(
            test_service(dir.path()).await,
            &[ListenAddr::Unix(sock.clone())],
        )
        .await
        .unwrap();
        std::fs::create_dir_all(dir.path().join("elsewhere")).unwrap();
        std::fs::create_dir_all(dir.path().join("run")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), dir.path().join("run/link"))
            .unwrap();
        let run = dir.path().join("run");
        let raw = |b: &[u8]| PathBuf::from(std::ffi::OsStr::from_bytes(b));
        let image = "127.0.0.1:1/x/y:z";
        let cases: Vec<(&str, PathBuf, &str)> = vec![
            (image, dir.path().join("elsewhere/c"), "bundle root"),
            (image, run.join("../elsewhere/c"), "`..`"),
            (image, run.join("link/c"), "symlink"),
            (image, dir.path().join("work/c"), "bundle root"),
            (
                image,
                raw(&[run.as_os_str().as_bytes(), b"/\xff"].concat()),
                "UTF-8",
            ),
            (
                image,
                raw(&[run.as_os_str().as_bytes(), b"/a\0b"].concat()),
                "NUL",
            ),
            ("127.0.0.1:1/x/y:z\0", run.join("c"), "NUL"),
        ];
        let started = std::time::Instant::now();
        for (img, bundle, says) in cases {
            let err = cdh_api::client::pull_image(
                &sock,
                img,
                &bundle,
                std::time::Duration::from_secs(10),
            )
            .await
            .unwrap_err();
            match err {
                TtrpcError::RpcStatus(s) => {
                    assert_eq!(s.code(), Code::INVALID_ARGUMENT, "{bundle:?}: {s:?}");
                    assert!(s.message().contains(says), "{bundle:?}: {}", s.message());
                }
                other => panic!("{bundle:?}: expected INVALID_ARGUMENT, got {other:?}"),
            }
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(!dir.path().join("elsewhere/c").exists());
        for s in &mut servers {
            s.shutdown().await.unwrap();
        }
    }

    #[tokio::test]
    async fn sealed_secrets_and_resources_answer_with_their_error_kinds() {
        use cdh_api::client::{get_resource_at, unseal_secret_at, Endpoint};
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("cdh.sock");
        let mut servers = start_all(
            test_service(dir.path()).await,
            &[ListenAddr::Unix(sock.clone())],
        )
        .await
        .unwrap();
        let ep = Endpoint::Unix(sock);
        let t = std::time::Duration::from_secs(10);
        let code = |e: TtrpcError| match e {
            TtrpcError::RpcStatus(s) => (s.code(), s.message().to_string()),
            other => panic!("expected a status, got {other:?}"),
        };
        assert_eq!(
            get_resource_at(&ep, "kbs:///default/key/k1", t)
                .await
                .unwrap(),
            vec![9u8; 32]
        );
        let (c, m) = code(
            get_resource_at(&ep, "kbs:///default/key/k2", t)
                .await
                .unwrap_err(),
        );
        assert_eq!(c, Code::PERMISSION_DENIED, "{m}");
        // Local files and inline data are the puller's own config sources, not the agent's.
        for uri in ["file:///etc/shadow", "data:,x", "/etc/passwd"] {
            let (c, m) = code(get_resource_at(&ep, uri, t).await.unwrap_err());
            assert_eq!(c, Code::INVALID_ARGUMENT, "{uri}: {m}");
        }
        let (c, m) = code(unseal_secret_at(&ep, b"sealed.a.b", t).await.unwrap_err());
        assert_eq!(c, Code::INVALID_ARGUMENT, "{m}");
        assert!(m.starts_with("UnsealSecret:"), "{m}");
        for s in &mut servers {
            s.shutdown().await.unwrap();
        }
    }

    /// A service whose secure mounts are recorded by `rec`, with a sysfs naming 254:16 as
    /// `<dir>/dev/vdb`; registry requests go to `registry`.
    async fn mount_service(dir: &Path, rec: Arc<Recorder>, registry: &str) -> Arc<Service> {
        let cfg = crate::config::Config::from_toml(&format!(
            "[image]\nwork_dir = \"{}\"\nbundle_roots = [\"{}\"]\n\
             [image.registry_config]\ninsecure_registries = [\"{registry}\"]",
            dir.join("work").display(),
            dir.join("run").display()
        ))
        .unwrap();
        let puller = Arc::new(Puller::new(cfg, Arc::new(OneKey)).await.unwrap());
        std::fs::create_dir_all(dir.join("sys/dev/block/254:16")).unwrap();
        std::fs::write(
            dir.join("sys/dev/block/254:16/uevent"),
            "MAJOR=254\nMINOR=16\nDEVNAME=vdb\n",
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("dev")).unwrap();
        std::fs::write(dir.join("dev/vdb"), b"").unwrap();
        let mounter = SecureMounter::with_system(
            rec,
            puller.fetcher().clone(),
            Arc::new(Unsealer::new(puller.fetcher().clone(), false)),
            secure_mount::Paths {
                header_dir: dir.join("headers"),
                sysfs: dir.join("sys"),
                dev: dir.join("dev"),
            },
        );
        Arc::new(Service::with_secure_mounter(puller, mounter))
    }

    fn kata_options(device_id: &str) -> HashMap<String, String> {
        [
            ("deviceId", device_id),
            ("sourceType", "empty"),
            ("targetType", "fileSystem"),
            ("filesystemType", "ext4"),
            ("mkfsOpts", "-E lazy_journal_init"),
            ("encryptionType", "luks2"),
            ("dataIntegrity", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn status_of(e: TtrpcError) -> (Code, String) {
        match e {
            TtrpcError::RpcStatus(s) => (s.code(), s.message().to_string()),
            other => panic!("expected a status, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn secure_mounts_answer_with_their_error_kinds() {
        use cdh_api::client::{secure_mount_at, Endpoint};
        let dir = tempfile::tempdir().unwrap();
        let dir_path = std::fs::canonicalize(dir.path()).unwrap();
        let rec = Arc::new(Recorder::default());
        let svc = mount_service(&dir_path, rec.clone(), "127.0.0.1:1").await;
        let sock = dir_path.join("cdh.sock");
        let mut servers = start_all(svc, &[ListenAddr::Unix(sock.clone())])
            .await
            .unwrap();
        let ep = Endpoint::Unix(sock);
        let t = std::time::Duration::from_secs(10);
        let mp_dir = dir_path.join("secure");
        std::fs::create_dir_all(&mp_dir).unwrap();
        let mp = format!("{}/", mp_dir.display());
        let with = |k: &str, v: Option<&str>| {
            let mut o = kata_options("254:16");
            match v {
                Some(v) => o.insert(k.into(), v.into()),
                None => o.remove(k),
            };
            o
        };
        // (volume type, options, mount point, code, what the message says)
        type Case<'a> = (&'a str, HashMap<String, String>, &'a str, Code, &'a str);
        let cases: Vec<Case> = vec![
            (
                "alibaba-cloud-oss",
                kata_options("254:16"),
                &mp,
                Code::UNIMPLEMENTED,
                "volume_type",
            ),
            (
                "block-device",
                with("encryptionType", Some("zfs")),
                &mp,
                Code::UNIMPLEMENTED,
                "zfs",
            ),
            (
                "block-device",
                with("deviceId", None),
                &mp,
                Code::INVALID_ARGUMENT,
                "devicePath",
            ),
            (
                "block-device",
                with("deviceId", Some("vdb")),
                &mp,
                Code::INVALID_ARGUMENT,
                "MAJ:MIN",
            ),
            (
                "block-device",
                kata_options("254:17"),
                &mp,
                Code::NOT_FOUND,
                "254:17",
            ),
            (
                "block-device",
                with("key", Some("file:///nonexistent/k")),
                &mp,
                Code::NOT_FOUND,
                "file:///nonexistent/k",
            ),
            (
                "block-device",
                kata_options("254:16"),
                "relative",
                Code::INVALID_ARGUMENT,
                "mount_point",
            ),
        ];
        for (vt, o, mp, want, says) in cases {
            let (c, m) = status_of(secure_mount_at(&ep, vt, &o, &[], mp, t).await.unwrap_err());
            assert_eq!(c, want, "{vt} {o:?}: {m}");
            assert!(m.starts_with("SecureMount: ") && m.contains(says), "{m}");
        }
        assert!(rec.calls().is_empty(), "{:?}", rec.calls());
        secure_mount_at(&ep, "block-device", &kata_options("254:16"), &[], &mp, t)
            .await
            .unwrap();
        assert!(rec
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Mount { target, .. } if *target == mp_dir)));
        // kata-agent sends the same request for each container listing the device.
        let (c, m) = status_of(
            secure_mount_at(&ep, "block-device", &kata_options("254:16"), &[], &mp, t)
                .await
                .unwrap_err(),
        );
        assert_eq!(c, Code::ALREADY_EXISTS, "{m}");
        for s in &mut servers {
            s.shutdown().await.unwrap();
        }
    }

    /// A registry that holds every request until released, then answers 404.
    async fn held_registry() -> (String, Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (arrived, release) = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(tokio::sync::Notify::new()),
        );
        let (a, r) = (arrived.clone(), release.clone());
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let (a, r, released) = (a.clone(), r.clone(), released.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    if !released.load(std::sync::atomic::Ordering::SeqCst) {
                        a.notify_one();
                        r.notified().await;
                        released.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                });
            }
        });
        (addr, arrived, release)
    }

    #[tokio::test]
    async fn a_secure_mount_over_the_work_dir_waits_for_pulls_and_later_pulls_use_it() {
        use cdh_api::client::{pull_image, secure_mount_at, Endpoint};
        let dir = tempfile::tempdir().unwrap();
        let d = std::fs::canonicalize(dir.path()).unwrap();
        let (registry, arrived, release) = held_registry().await;
        let rec = Arc::new(Recorder {
            overmount: true,
            ..Default::default()
        });
        let svc = mount_service(&d, rec.clone(), &registry).await;
        let sock = d.join("cdh.sock");
        let mut servers = start_all(svc, &[ListenAddr::Unix(sock.clone())])
            .await
            .unwrap();
        let t = std::time::Duration::from_secs(20);
        std::fs::create_dir_all(d.join("run")).unwrap();
        let image = format!("{registry}/x/y:z");
        let pull = {
            let (sock, image, bundle) = (sock.clone(), image.clone(), d.join("run/c1"));
            tokio::spawn(async move { pull_image(&sock, &image, &bundle, t).await })
        };
        tokio::time::timeout(t, arrived.notified()).await.unwrap();
        let work = d.join("work");
        let mount = {
            let ep = Endpoint::Unix(sock.clone());
            let mp = format!("{}/", work.display());
            tokio::spawn(async move {
                secure_mount_at(&ep, "block-device", &kata_options("254:16"), &[], &mp, t).await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            !mount.is_finished(),
            "the secure mount did not wait for the running pull"
        );
        assert!(rec.calls().is_empty());
        release.notify_one();
        let (c, m) = status_of(pull.await.unwrap().unwrap_err());
        assert_eq!(c, Code::NOT_FOUND, "{m}");
        mount.await.unwrap().unwrap();
        // The old layout is under the mount now; the new filesystem starts empty.
        let under = d.join("work.under");
        assert!(under.join("staging").is_dir() && under.join("bundles").is_dir());
        assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0);
        let (c, m) = status_of(
            pull_image(&sock, &image, &d.join("run/c2"), t)
                .await
                .unwrap_err(),
        );
        assert_eq!(c, Code::NOT_FOUND, "{m}");
        for sub in ["layers", "staging", "bundles", "overlay", "lazy"] {
            assert!(
                work.join(sub).is_dir(),
                "{sub} not re-created on the new filesystem"
            );
        }
        assert_eq!(
            std::fs::read_dir(work.join("staging"))
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().is_dir())
                .count(),
            1,
            "a staging dir of this process on the new filesystem"
        );
        for s in &mut servers {
            s.shutdown().await.unwrap();
        }
    }

    #[tokio::test]
    async fn bind_failures_name_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let svc = test_service(dir.path()).await;
        let e = start_all(svc.clone(), &[]).await.err().unwrap();
        assert!(e.to_string().contains("no listen address"), "{e}");
        // A directory where the socket should be cannot be replaced.
        let busy = dir.path().join("busy");
        std::fs::create_dir_all(busy.join("x")).unwrap();
        let e = start_all(svc, &[ListenAddr::Unix(busy.clone())])
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains(&busy.display().to_string()), "{e}");
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
        let svc = Service::new(puller);
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
