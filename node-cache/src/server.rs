//! The HTTP/1.1 server (hyper 1) over a loopback TCP address or a unix socket. The routes and
//! status codes are documented in [`crate::protocol`].

use std::convert::Infallible;
use std::future::Future;
use std::io::{self, SeekFrom};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap};
use hyper::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncSeekExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tracing::{debug, info, warn};

use crate::protocol::{digest_from_path, DIGEST_HEADER, STATS_PATH};
use crate::store::{Begin, BeginError, Store, UploadError};

/// Frame size of GET bodies.
const CHUNK: usize = 256 * 1024;
/// How long a graceful stop waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(30);

type RespBody = BoxBody<Bytes, io::Error>;

/// Where to listen.
#[derive(Debug, Clone)]
pub enum ListenAddr {
    /// A TCP address; must be loopback unless non-loopback is explicitly allowed.
    Tcp(SocketAddr),
    /// A unix socket path (created with mode 0660; a stale socket is replaced).
    Unix(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{0} is not a loopback address: the cache is per node (pass --allow-non-loopback to override)")]
    NonLoopback(SocketAddr),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A bound listener.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Listener {
    pub async fn bind(addr: &ListenAddr, allow_non_loopback: bool) -> Result<Self, BindError> {
        match addr {
            ListenAddr::Tcp(a) if !a.ip().is_loopback() && !allow_non_loopback => {
                Err(BindError::NonLoopback(*a))
            }
            ListenAddr::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a).await?)),
            ListenAddr::Unix(p) => {
                use std::os::unix::fs::FileTypeExt;
                if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
                    std::fs::remove_file(p)?;
                }
                let l = UnixListener::bind(p)?;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o660))?;
                Ok(Listener::Unix(l, p.clone()))
            }
        }
    }

    /// The bound address (the actual port for TCP port 0), for the `listening on` line.
    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| e.to_string(), |a| a.to_string()),
            Listener::Unix(_, p) => p.display().to_string(),
        }
    }

    async fn accept(&self) -> io::Result<Box<dyn Io>> {
        Ok(match self {
            Listener::Tcp(l) => Box::new(l.accept().await?.0),
            Listener::Unix(l, _) => Box::new(l.accept().await?.0),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Serves until `shutdown` completes, then stops accepting, lets requests in flight finish
/// (up to 30 s) and returns. Uploads cut off here leave nothing behind.
pub async fn serve(store: Arc<Store>, listener: Listener, shutdown: impl Future<Output = ()>) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = listener.accept() => match r {
                Ok(io) => {
                    conns.spawn(serve_conn(Arc::clone(&store), io, stop_rx.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    info!("stopping: draining {} connection(s)", conns.len());
    drop(listener);
    let _ = stop_tx.send(());
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN, drain).await.is_err() {
        warn!("connections still open after {DRAIN:?}; closing them");
    }
}

async fn serve_conn(
    store: Arc<Store>,
    io: Box<dyn Io>,
    mut stop: tokio::sync::watch::Receiver<()>,
) {
    let svc = hyper::service::service_fn(move |req| handle(Arc::clone(&store), req));
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = r {
        debug!(error = %e, "connection ended with an error");
    }
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response<RespBody> {
    let body = Full::new(Bytes::from(msg.into() + "\n"))
        .map_err(|n| match n {})
        .boxed();
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        "text/plain; charset=utf-8".parse().unwrap(),
    );
    r
}

async fn handle(
    store: Arc<Store>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let mut resp = match (digest_from_path(&path), &method) {
        _ if path == STATS_PATH && method == Method::GET => {
            let json = serde_json::to_string(&store.stats()).unwrap_or_default();
            let mut r = text(StatusCode::OK, json);
            r.headers_mut()
                .insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
            r
        }
        _ if path == STATS_PATH => text(StatusCode::METHOD_NOT_ALLOWED, "GET only"),
        (None, _) => text(StatusCode::NOT_FOUND, "not found"),
        (Some(None), _) => {
            if method == Method::PUT {
                store.count_put(false);
            }
            text(
                StatusCode::BAD_REQUEST,
                "invalid digest: only sha256:<64 lowercase hex>",
            )
        }
        (Some(Some(d)), &Method::GET) => get(&store, d, req.headers()).await,
        (Some(Some(d)), &Method::HEAD) => head(&store, d),
        (Some(Some(d)), &Method::PUT) => {
            let r = put(&store, d, req).await;
            store.count_put(r.status().is_success());
            r
        }
        (Some(Some(d)), &Method::DELETE) => match store.verify_reported(d).await {
            Ok(None) => text(StatusCode::NOT_FOUND, "blob not in cache"),
            Ok(Some(true)) => text(StatusCode::OK, "blob did not match its digest: removed"),
            Ok(Some(false)) => text(StatusCode::CONFLICT, "blob matches its digest: kept"),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("verifying: {e}")),
        },
        (Some(Some(_)), _) => text(StatusCode::METHOD_NOT_ALLOWED, "GET, HEAD, PUT or DELETE"),
    };
    if resp.status() == StatusCode::METHOD_NOT_ALLOWED {
        let allow = if path == STATS_PATH {
            "GET"
        } else {
            "GET, HEAD, PUT, DELETE"
        };
        resp.headers_mut()
            .insert(header::ALLOW, allow.parse().unwrap());
    }
    Ok(resp)
}

fn blob_headers(status: StatusCode, digest: &str, len: u64) -> hyper::http::response::Builder {
    Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, len)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(DIGEST_HEADER, digest)
}

fn head(store: &Store, digest: &str) -> Response<RespBody> {
    let Some(size) = store.size_of(digest) else {
        return text(StatusCode::NOT_FOUND, "");
    };
    let body = Full::new(Bytes::new()).map_err(|n| match n {}).boxed();
    blob_headers(StatusCode::OK, digest, size)
        .body(body)
        .unwrap()
}

#[derive(Debug, PartialEq)]
enum Range {
    Ignore,
    Unsatisfiable,
    Bytes(u64, u64),
}

/// A single `bytes=a-b` / `bytes=a-` / `bytes=-n`; other forms are ignored (RFC 9110 14.2).
fn parse_range(v: &str, size: u64) -> Range {
    let num = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let Some((a, b)) = v
        .trim()
        .strip_prefix("bytes=")
        .and_then(|s| s.split_once('-'))
    else {
        return Range::Ignore;
    };
    let (a, b) = (a.trim(), b.trim());
    match (num(a), num(b)) {
        (None, Some(n)) if a.is_empty() => match n {
            0 => Range::Unsatisfiable,
            _ if size == 0 => Range::Unsatisfiable,
            n => Range::Bytes(size - n.min(size), size - 1),
        },
        (Some(a), last) if last.is_some() || b.is_empty() => match last.unwrap_or(u64::MAX) {
            last if last < a => Range::Ignore,
            _ if a >= size => Range::Unsatisfiable,
            last => Range::Bytes(a, last.min(size - 1)),
        },
        _ => Range::Ignore,
    }
}

async fn get(store: &Arc<Store>, digest: &str, headers: &HeaderMap) -> Response<RespBody> {
    let Some((file, size)) = store.open_or_wait(digest).await else {
        return text(StatusCode::NOT_FOUND, "blob not in cache");
    };
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, len) = match range.map_or(Range::Ignore, |r| parse_range(r, size)) {
        Range::Ignore => (StatusCode::OK, 0, size),
        Range::Bytes(a, b) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        Range::Unsatisfiable => {
            let mut r = text(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                format!("bytes */{size}").parse().unwrap(),
            );
            return r;
        }
    };
    let mut file = tokio::fs::File::from_std(file);
    if let Err(e) = file.seek(SeekFrom::Start(start)).await {
        return text(StatusCode::INTERNAL_SERVER_ERROR, format!("seek: {e}"));
    }
    let mut b = blob_headers(status, digest, len);
    if status == StatusCode::PARTIAL_CONTENT {
        b = b.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", start + len - 1),
        );
    }
    let body = FileBody {
        file,
        remaining: len,
        buf: Vec::new(),
        store: Arc::clone(store),
    };
    b.body(body.boxed()).unwrap()
}

/// Streams `remaining` bytes of a file in frames of at most [`CHUNK`] bytes.
struct FileBody {
    file: tokio::fs::File,
    remaining: u64,
    buf: Vec<u8>,
    store: Arc<Store>,
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = this.remaining.min(CHUNK as u64) as usize;
        this.buf.resize(n, 0);
        let mut rb = ReadBuf::new(&mut this.buf);
        ready!(Pin::new(&mut this.file).poll_read(cx, &mut rb))?;
        let got = rb.filled().len();
        if got == 0 {
            return Poll::Ready(Some(Err(io::ErrorKind::UnexpectedEof.into())));
        }
        this.remaining -= got as u64;
        this.store.count_served(got as u64);
        Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(rb.filled())))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

async fn put(store: &Arc<Store>, digest: &str, req: Request<Incoming>) -> Response<RespBody> {
    let Some(len) = req.headers().get(header::CONTENT_LENGTH) else {
        warn!(digest, "upload rejected: no Content-Length");
        return text(StatusCode::LENGTH_REQUIRED, "Content-Length required");
    };
    let Some(len) = len.to_str().ok().and_then(|s| s.parse::<u64>().ok()) else {
        return text(StatusCode::BAD_REQUEST, "invalid Content-Length");
    };
    let mut upload = match store.begin_upload(digest, len) {
        Ok(Begin::Present) => return text(StatusCode::OK, "already present"),
        Ok(Begin::Upload(u)) => u,
        Err(e) => {
            warn!(digest, size = len, error = %e, "upload rejected");
            let status = match e {
                BeginError::InProgress => StatusCode::CONFLICT,
                BeginError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                BeginError::Busy => StatusCode::SERVICE_UNAVAILABLE,
                BeginError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            return text(status, e.to_string());
        }
    };
    let mut body = req.into_body();
    let result = async {
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| (StatusCode::BAD_REQUEST, format!("request body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                upload.write(&data).await.map_err(upload_status)?;
            }
        }
        upload.finish().await.map_err(upload_status)
    };
    match result.await {
        Ok(()) => text(StatusCode::CREATED, "stored"),
        Err((status, msg)) => {
            warn!(digest, size = len, error = %msg, "upload discarded");
            text(status, msg)
        }
    }
}

fn upload_status(e: UploadError) -> (StatusCode, String) {
    let status = match e {
        UploadError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    (status, e.to_string())
}

#[cfg(test)]
mod tests;
