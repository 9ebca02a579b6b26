//! A hostile HTTP/1.1 server on 127.0.0.1 for the bounds tests: it plays a registry or a KBS
//! that sends huge or trickling bodies, redirects, or stalls.
//!
//! Every behaviour is bounded: huge bodies stop at their stated total, trickles and stalls end
//! when the client hangs up or the server is dropped (which aborts every connection task).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// What the server does with one request.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// A complete answer.
    Respond {
        /// HTTP status.
        status: u16,
        /// Extra headers (`Content-Length` is added).
        headers: Vec<(String, String)>,
        /// The body.
        body: Vec<u8>,
    },
    /// A 200 whose body is `total` bytes of `fill`, sent as fast as the client reads.
    Huge {
        /// HTTP status.
        status: u16,
        /// Announce `Content-Length: total` (else the body is chunked).
        content_length: bool,
        /// Bytes sent at most.
        total: u64,
        /// The byte repeated.
        fill: u8,
    },
    /// A 200 with a large `Content-Length` whose body comes one byte per `every`.
    Trickle {
        /// Delay between bytes.
        every: Duration,
    },
    /// Reads the request and never answers.
    Stall,
    /// A redirect.
    Redirect {
        /// 301, 302, 307 or 308.
        status: u16,
        /// The `Location` header.
        location: String,
    },
}

impl Behaviour {
    /// A 200 JSON answer.
    pub fn json(body: impl Into<Vec<u8>>) -> Self {
        Behaviour::Respond {
            status: 200,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.into(),
        }
    }
}

/// The parts of a request the router sees.
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Header lines, names lowercased.
    pub headers: Vec<(String, String)>,
}

type Router = dyn Fn(&Request) -> Behaviour + Send + Sync;

/// A running hostile server; stops (with every connection) on drop.
pub struct HostileServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl HostileServer {
    /// Serves on 127.0.0.1 (a free port), answering each request as `route` says.
    pub async fn start(
        route: impl Fn(&Request) -> Behaviour + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let route: Arc<Router> = Arc::new(route);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(AtomicU64::new(0));
        let (reqs, sent2) = (requests.clone(), sent.clone());
        let task = tokio::spawn(async move {
            // Connection tasks live in the set, so aborting this task ends them all.
            let mut conns = JoinSet::new();
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                conns.spawn(serve(sock, route.clone(), reqs.clone(), sent2.clone()));
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Self {
            addr,
            requests,
            sent,
            task,
        })
    }

    /// `127.0.0.1:port`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("lock").clone()
    }

    /// Body bytes written to clients so far.
    pub fn body_bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request head (and skips a `Content-Length` body); `None` when the client left.
async fn read_request(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Request> {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 << 10 {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end + 4);
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < len {
        let mut chunk = [0u8; 4096];
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..len);
    Some(Request {
        method,
        path,
        headers,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        301 => "Moved Permanently",
        302 => "Found",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        404 => "Not Found",
        _ => "Status",
    }
}

async fn serve(
    mut sock: TcpStream,
    route: Arc<Router>,
    requests: Arc<Mutex<Vec<Request>>>,
    sent: Arc<AtomicU64>,
) {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut sock, &mut buf).await {
        let behaviour = route(&req);
        requests.lock().expect("lock").push(req);
        let ok = match behaviour {
            Behaviour::Respond {
                status,
                headers,
                body,
            } => {
                let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
                sent.fetch_add(body.len() as u64, Ordering::SeqCst);
                sock.write_all(head.as_bytes()).await.is_ok() && sock.write_all(&body).await.is_ok()
            }
            Behaviour::Redirect { status, location } => {
                let head = format!(
                    "HTTP/1.1 {status} {}\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n",
                    reason(status)
                );
                sock.write_all(head.as_bytes()).await.is_ok()
            }
            Behaviour::Huge {
                status,
                content_length,
                total,
                fill,
            } => {
                let framing = if content_length {
                    format!("Content-Length: {total}")
                } else {
                    "Transfer-Encoding: chunked".into()
                };
                let head = format!(
                    "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\n{framing}\r\n\r\n",
                    reason(status)
                );
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let block = vec![fill; 64 << 10];
                let mut left = total;
                while left > 0 {
                    let n = left.min(block.len() as u64) as usize;
                    let w = if content_length {
                        sock.write_all(&block[..n]).await
                    } else {
                        let mut c = format!("{n:x}\r\n").into_bytes();
                        c.extend_from_slice(&block[..n]);
                        c.extend_from_slice(b"\r\n");
                        sock.write_all(&c).await
                    };
                    if w.is_err() {
                        return;
                    }
                    sent.fetch_add(n as u64, Ordering::SeqCst);
                    left -= n as u64;
                }
                content_length || sock.write_all(b"0\r\n\r\n").await.is_ok()
            }
            Behaviour::Trickle { every } => {
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n";
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for _ in 0..(1u32 << 20) {
                    if sock.write_all(b" ").await.is_err() {
                        return;
                    }
                    sent.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(every).await;
                }
                true
            }
            Behaviour::Stall => {
                // Hold the connection until the client gives up (read returns 0 or fails).
                let mut sink = [0u8; 1024];
                while matches!(sock.read(&mut sink).await, Ok(n) if n > 0) {}
                return;
            }
        };
        if !ok {
            return;
        }
    }
}
