//! Chunk fetches of a lazy mount through the puller's own registry client.
//!
//! nydus-storage builds its backends only from its own configuration, with its own HTTP client:
//! its registry backend would know nothing of `extra_root_certificates`, mirrors' credentials,
//! `image_pull_proxy`, our retries, deadlines and body bounds. So each mount gets a small HTTP
//! server on guest loopback that nydus' `http-proxy` backend reads from, and that answers each
//! range with [`RegistryClient::blob_range`] against the registry the manifest came from.
//!
//! nydus' unix-socket mode sends every blob's requests to `/` (it drops the blob id), so a
//! mount with several blobs needs the TCP mode. The server answers only under a random path
//! prefix known to this mount's nydus configuration, only for the blobs the signed manifest
//! lists, and only for bounded ranges: another guest process that finds the port gets 404s.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use oci_client::manifest::OciDescriptor;
use oci_client::Reference;
use tracing::{debug, warn};

use crate::registry::RegistryClient;

/// The largest range one request may ask for. nydus asks for a chunk batch (a few MiB at
/// most); anything larger is refused rather than buffered.
pub const MAX_RANGE: u64 = 64 << 20;

/// A running blob server for one lazy mount; it stops when dropped.
pub struct BlobServer {
    addr: SocketAddr,
    prefix: String,
    task: tokio::task::JoinHandle<()>,
}

struct Blobs {
    registry: Arc<RegistryClient>,
    source: Reference,
    /// Blob id (digest hex, as nydus names blobs) → its manifest descriptor.
    by_id: HashMap<String, OciDescriptor>,
    prefix: String,
}

impl BlobServer {
    /// Starts serving `blobs` of `source` on 127.0.0.1 (an ephemeral port) on the current
    /// tokio runtime.
    pub async fn start(
        registry: Arc<RegistryClient>,
        source: Reference,
        blobs: &[OciDescriptor],
    ) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let prefix = format!("/{}/blobs", random_token()?);
        let by_id = blobs
            .iter()
            .filter_map(|d| {
                d.digest
                    .strip_prefix("sha256:")
                    .map(|hex| (hex.to_owned(), d.clone()))
            })
            .collect();
        let state = Arc::new(Blobs {
            registry,
            source,
            by_id,
            prefix: prefix.clone(),
        });
        let task = tokio::spawn(async move {
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!("lazy blob server: accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.answer(req).await) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await
                    {
                        debug!("lazy blob server connection: {e}");
                    }
                });
            }
        });
        Ok(Self { addr, prefix, task })
    }

    /// The `addr` of nydus' http-proxy backend configuration.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `path` of nydus' http-proxy backend configuration (the secret prefix).
    pub fn path(&self) -> &str {
        &self.prefix
    }
}

impl Drop for BlobServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn random_token() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty())?;
    Ok(hex::encode(b))
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

/// `bytes=a-b` (inclusive, as nydus sends it) → (offset, length).
fn parse_range(value: &str) -> Option<(u64, u64)> {
    let (a, b) = value.strip_prefix("bytes=")?.split_once('-')?;
    let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
    (b >= a).then(|| (a, b - a + 1))
}

impl Blobs {
    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let Some(desc) = req
            .uri()
            .path()
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .and_then(|id| self.by_id.get(id))
        else {
            return reply(StatusCode::NOT_FOUND, "no such blob");
        };
        let size = u64::try_from(desc.size).unwrap_or(0);
        match *req.method() {
            Method::HEAD => {
                let mut r = reply(StatusCode::OK, Bytes::new());
                r.headers_mut()
                    .insert(hyper::header::CONTENT_LENGTH, size.into());
                r
            }
            Method::GET => {
                let range = req
                    .headers()
                    .get(hyper::header::RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_range);
                let Some((offset, len)) = range.filter(|(_, len)| *len <= MAX_RANGE) else {
                    return reply(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        format!("a bytes=a-b range of at most {MAX_RANGE} bytes is required"),
                    );
                };
                match self
                    .registry
                    .blob_range(&self.source, desc, offset, len)
                    .await
                {
                    Ok(bytes) => reply(StatusCode::PARTIAL_CONTENT, bytes),
                    Err(e) => {
                        // nydus turns this into EIO; the log says what the registry did.
                        warn!(digest = %desc.digest, offset, len, "lazy chunk fetch failed: {e}");
                        reply(StatusCode::BAD_GATEWAY, e.to_string())
                    }
                }
            }
            _ => reply(StatusCode::METHOD_NOT_ALLOWED, "HEAD or GET"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_inclusive_and_well_formed() {
        assert_eq!(parse_range("bytes=0-0"), Some((0, 1)));
        assert_eq!(parse_range("bytes=100-1123"), Some((100, 1024)));
        for bad in ["bytes=5-4", "bytes=5-", "bytes=-5", "0-5", "bytes=a-b", ""] {
            assert_eq!(parse_range(bad), None, "{bad}");
        }
    }
}
