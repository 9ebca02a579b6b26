//! Minimal ttrpc client for `api.ImagePullService/PullImage` (used by the snapshotter's
//! mount helper in local-guest mode, by the VM test over hybrid vsock, and by tests), and for
//! the other CDH services kata-agent calls (sealed secrets, resources, secure mounts).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::protos::{api, api_ttrpc};

/// Where a CDH-compatible server is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket (the CDH socket inside the guest).
    Unix(PathBuf),
    /// A guest vsock port behind a host-side hybrid-vsock unix socket (Firecracker, Cloud
    /// Hypervisor, vhost-device-vsock): connect to `uds`, send `CONNECT <port>\n`, read `OK …\n`.
    HybridVsock {
        /// Host-side unix socket of the hybrid vsock device.
        uds: PathBuf,
        /// Guest vsock port.
        port: u32,
    },
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    /// Parses `unix:///path`, `/path` or Kata's `hvsock://<uds path>:<port>`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("hvsock://") {
            let (uds, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("{s:?}: want hvsock://<uds path>:<port>"))?;
            let port = port
                .parse()
                .map_err(|_| format!("{s:?}: the vsock port is not a 32-bit number"))?;
            if uds.is_empty() {
                return Err(format!("{s:?}: empty unix socket path"));
            }
            return Ok(Endpoint::HybridVsock {
                uds: PathBuf::from(uds),
                port,
            });
        }
        let path = s.strip_prefix("unix://").unwrap_or(s);
        if path.is_empty() {
            return Err(format!("{s:?}: empty unix socket path"));
        }
        Ok(Endpoint::Unix(PathBuf::from(path)))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::HybridVsock { uds, port } => write!(f, "hvsock://{}:{port}", uds.display()),
        }
    }
}

fn socket_err(what: impl std::fmt::Display) -> ttrpc::Error {
    ttrpc::Error::Socket(what.to_string())
}

/// Opens a stream to `port` of the guest behind the hybrid-vsock socket `uds`.
pub async fn connect_hybrid_vsock(uds: &Path, port: u32) -> Result<UnixStream, ttrpc::Error> {
    let mut s = UnixStream::connect(uds)
        .await
        .map_err(|e| socket_err(format_args!("connecting {}: {e}", uds.display())))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| socket_err(format_args!("hybrid vsock CONNECT {port}: {e}")))?;
    // Byte by byte: whatever follows the reply line already belongs to the guest's stream.
    let mut line = Vec::with_capacity(16);
    loop {
        let mut b = [0u8; 1];
        let n = s
            .read(&mut b)
            .await
            .map_err(|e| socket_err(format_args!("hybrid vsock reply: {e}")))?;
        if n == 0 {
            return Err(socket_err(format_args!(
                "hybrid vsock {}: connection closed before OK (nothing listens on guest port {port}?)",
                uds.display()
            )));
        }
        if b[0] == b'\n' {
            break;
        }
        if line.len() >= 64 {
            return Err(socket_err("hybrid vsock reply line too long"));
        }
        line.push(b[0]);
    }
    let reply = String::from_utf8_lossy(&line);
    if !reply.starts_with("OK ") {
        return Err(socket_err(format_args!(
            "hybrid vsock CONNECT {port}: unexpected reply {reply:?}"
        )));
    }
    Ok(s)
}

/// A ttrpc client connected to `endpoint`.
pub async fn connect(endpoint: &Endpoint) -> Result<ttrpc::r#async::Client, ttrpc::Error> {
    match endpoint {
        Endpoint::Unix(p) => {
            ttrpc::r#async::Client::connect(&format!("unix://{}", p.display())).await
        }
        Endpoint::HybridVsock { uds, port } => {
            let s = connect_hybrid_vsock(uds, *port).await?;
            Ok(ttrpc::r#async::Client::new(
                ttrpc::r#async::transport::Socket::new(s),
            ))
        }
    }
}

/// Calls `PullImage{image_url, bundle_path}` on the server at `socket`; returns the manifest digest.
pub async fn pull_image(
    socket: &Path,
    image: &str,
    bundle: &Path,
    timeout: Duration,
) -> Result<String, ttrpc::Error> {
    pull_image_at(&Endpoint::Unix(socket.to_owned()), image, bundle, timeout).await
}

/// Calls `PullImage{image_url, bundle_path}` on the server at `endpoint`; returns the manifest digest.
pub async fn pull_image_at(
    endpoint: &Endpoint,
    image: &str,
    bundle: &Path,
    timeout: Duration,
) -> Result<String, ttrpc::Error> {
    let client = api_ttrpc::ImagePullServiceClient::new(connect(endpoint).await?);
    let mut req = api::ImagePullRequest::new();
    req.image_url = image.as_bytes().to_vec();
    // Sent as is: the server, not the client, decides whether a path is acceptable.
    req.bundle_path = std::os::unix::ffi::OsStrExt::as_bytes(bundle.as_os_str()).to_vec();
    let resp = client.pull_image(ctx(timeout), &req).await?;
    Ok(resp.manifest_digest)
}

fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(timeout.as_nanos().min(i64::MAX as u128) as i64)
}

/// Calls `SealedSecretService.UnsealSecret{secret}` at `endpoint`, as kata-agent does for an
/// environment value starting with `sealed.`; returns the plaintext.
pub async fn unseal_secret_at(
    endpoint: &Endpoint,
    secret: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, ttrpc::Error> {
    let client = api_ttrpc::SealedSecretServiceClient::new(connect(endpoint).await?);
    let mut req = api::UnsealSecretInput::new();
    req.secret = secret.to_vec();
    Ok(client.unseal_secret(ctx(timeout), &req).await?.plaintext)
}

/// Calls `GetResourceService.GetResource{ResourcePath}` at `endpoint`; returns the resource.
pub async fn get_resource_at(
    endpoint: &Endpoint,
    uri: &str,
    timeout: Duration,
) -> Result<Vec<u8>, ttrpc::Error> {
    let client = api_ttrpc::GetResourceServiceClient::new(connect(endpoint).await?);
    let mut req = api::GetResourceRequest::new();
    req.ResourcePath = uri.as_bytes().to_vec();
    Ok(client.get_resource(ctx(timeout), &req).await?.Resource)
}

/// Calls `SecureMountService.SecureMount{volume_type, options, flags, mount_point}` at
/// `endpoint`, as kata-agent does for a container listing its trusted storage device.
pub async fn secure_mount_at(
    endpoint: &Endpoint,
    volume_type: &str,
    options: &std::collections::HashMap<String, String>,
    flags: &[String],
    mount_point: &str,
    timeout: Duration,
) -> Result<(), ttrpc::Error> {
    let client = api_ttrpc::SecureMountServiceClient::new(connect(endpoint).await?);
    let mut req = api::SecureMountRequest::new();
    req.volume_type = volume_type.to_owned();
    req.options = options.clone();
    req.flags = flags.to_vec();
    req.mount_point = mount_point.to_owned();
    client.secure_mount(ctx(timeout), &req).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;

    #[test]
    fn endpoints_parse_and_print() {
        for (s, want) in [
            ("/run/cdh.sock", Endpoint::Unix("/run/cdh.sock".into())),
            (
                "unix:///run/cdh.sock",
                Endpoint::Unix("/run/cdh.sock".into()),
            ),
            (
                "hvsock:///run/vm/kata.hvsock:1024",
                Endpoint::HybridVsock {
                    uds: "/run/vm/kata.hvsock".into(),
                    port: 1024,
                },
            ),
        ] {
            let got: Endpoint = s.parse().unwrap();
            assert_eq!(got, want, "{s}");
            assert_eq!(got.to_string().parse::<Endpoint>().unwrap(), want);
        }
        for bad in [
            "hvsock:///run/x",
            "hvsock:///run/x:port",
            "hvsock://:5",
            "unix://",
            "",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad} accepted");
        }
    }

    /// A fake hybrid-vsock device: answers `CONNECT p` with `reply`, then sends `after` on the
    /// same stream, then echoes one line.
    async fn fake_device(
        reply: &'static str,
        after: &'static [u8],
    ) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vm.vsock");
        let l = tokio::net::UnixListener::bind(&uds).unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut r = tokio::io::BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            assert_eq!(line, "CONNECT 1024\n");
            let mut s = r.into_inner();
            if reply.is_empty() {
                return; // closes: no guest listener
            }
            let mut first = reply.as_bytes().to_vec();
            first.extend_from_slice(after);
            s.write_all(&first).await.unwrap();
            let mut r = tokio::io::BufReader::new(s);
            let mut echo = String::new();
            r.read_line(&mut echo).await.unwrap();
            r.into_inner().write_all(echo.as_bytes()).await.unwrap();
        });
        (dir, uds)
    }

    #[tokio::test]
    async fn hybrid_vsock_handshake_keeps_the_guest_bytes() {
        // The reply and the guest's first bytes arrive in one segment: none may be lost.
        let (_d, uds) = fake_device("OK 1073741824\n", b"guest-first\n").await;
        let s = connect_hybrid_vsock(&uds, 1024).await.unwrap();
        let mut r = tokio::io::BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert_eq!(line, "guest-first\n");
        r.get_mut().write_all(b"ping\n").await.unwrap();
        line.clear();
        r.read_line(&mut line).await.unwrap();
        assert_eq!(line, "ping\n");
    }

    #[tokio::test]
    async fn hybrid_vsock_failures_are_explained() {
        let (_d, uds) = fake_device("", b"").await;
        let e = connect_hybrid_vsock(&uds, 1024).await.unwrap_err();
        assert!(
            e.to_string().contains("nothing listens on guest port 1024"),
            "{e}"
        );
        let (_d, uds) = fake_device("NO\n", b"").await;
        let e = connect_hybrid_vsock(&uds, 1024).await.unwrap_err();
        assert!(e.to_string().contains("unexpected reply \"NO\""), "{e}");
        let e = connect_hybrid_vsock(Path::new("/nonexistent/vm.vsock"), 1024)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vm.vsock"), "{e}");
    }
}
