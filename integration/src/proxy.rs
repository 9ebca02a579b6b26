//! A forward HTTP proxy on 127.0.0.1 for the `image_pull_proxy` tests: it takes absolute-form
//! requests (`GET http://host:port/path HTTP/1.1`), forwards them in origin form to their
//! origin and records each one, so a test can see which requests went through it.
//!
//! No Debian package offers a proxy that runs unprivileged without a config of its own
//! (squid, tinyproxy need both and log to fixed places), and the test needs the request log,
//! so this small one is written here. Plain HTTP only: the lab registry is plain HTTP.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A running forward proxy; stops accepting on drop.
pub struct ForwardProxy {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    throttle: Arc<Throttle>,
}

/// One rate limit for every answer the proxy relays, as a WAN link to a registry has: each
/// read reserves the next slot of the link's time and waits for its end.
#[derive(Default)]
struct Throttle {
    /// Bytes per second; 0 = unlimited.
    rate: AtomicU64,
    next: Mutex<Option<Instant>>,
}

impl Throttle {
    fn pass(&self, n: usize) {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(n as f64 / rate as f64);
        let until = {
            let mut next = self.next.lock().expect("lock");
            let start = next.map_or(Instant::now(), |t| t.max(Instant::now()));
            let end = start + cost;
            *next = Some(end);
            end
        };
        thread::sleep(until.saturating_duration_since(Instant::now()));
    }
}

/// `io::copy` through the throttle.
fn relay(from: &mut TcpStream, to: &mut TcpStream, throttle: &Throttle) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        throttle.pass(n);
        to.write_all(&buf[..n])?;
    }
}

impl ForwardProxy {
    /// Listens on a free port of 127.0.0.1.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the test proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let throttle = Arc::new(Throttle::default());
        let (reqs, stop2, delay, limit) = (
            requests.clone(),
            stop.clone(),
            delay_ms.clone(),
            throttle.clone(),
        );
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (reqs, delay, limit) = (reqs.clone(), delay.clone(), limit.clone());
                thread::spawn(move || {
                    let _ = serve(conn, &reqs, &delay, limit);
                });
            }
        });
        Self {
            port,
            requests,
            stop,
            delay_ms,
            throttle,
        }
    }

    /// Limits what all answers together relay to `bytes_per_sec` (0: no limit), as a WAN link
    /// between a node and its registry would.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.throttle.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Holds every request this long (after logging it) before forwarding it: a test sees a
    /// request in flight and can act while its client waits.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request forwarded so far, as `METHOD absolute-url`.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("lock").clone()
    }
}

impl Drop for ForwardProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Serves one client connection: each request goes to its origin; the connection to the
/// origin is kept while the client asks the same origin (a different one closes it).
fn serve(
    client: TcpStream,
    log: &Mutex<Vec<String>>,
    delay_ms: &AtomicU64,
    throttle: Arc<Throttle>,
) -> io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client_w = client;
    let mut upstream: Option<(String, TcpStream)> = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            if let Some((_, up)) = upstream {
                let _ = up.shutdown(Shutdown::Both);
            }
            return Ok(());
        }
        let mut parts = line.trim_end().splitn(3, ' ');
        let (method, target, version) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or("HTTP/1.1"),
        );
        let Some(rest) = target.strip_prefix("http://") else {
            client_w.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")?;
            return Ok(());
        };
        let (origin, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        log.lock().expect("lock").push(format!("{method} {target}"));
        thread::sleep(Duration::from_millis(delay_ms.load(Ordering::SeqCst)));
        let mut head = format!("{method} {path} {version}\r\n");
        let mut body_len = 0usize;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            if h == "\r\n" || h.is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if lower.starts_with("proxy-") {
                continue;
            }
            if let Some(v) = lower.strip_prefix("content-length:") {
                body_len = v.trim().parse().unwrap_or(0);
            }
            head.push_str(&h);
        }
        head.push_str("\r\n");
        let mut body = vec![0u8; body_len];
        reader.read_exact(&mut body)?;
        if upstream.as_ref().is_none_or(|(o, _)| o != origin) {
            let conn = match TcpStream::connect(origin) {
                Ok(c) => c,
                Err(_) => {
                    client_w.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")?;
                    return Ok(());
                }
            };
            if let Some((_, old)) = upstream.take() {
                let _ = old.shutdown(Shutdown::Both);
            }
            // The origin's answers go back to the client as they come.
            let mut from = conn.try_clone()?;
            let mut to = client_w.try_clone()?;
            let throttle = throttle.clone();
            thread::spawn(move || {
                let _ = relay(&mut from, &mut to, &throttle);
                let _ = to.shutdown(Shutdown::Write);
            });
            upstream = Some((origin.to_string(), conn));
        }
        let (_, up) = upstream.as_mut().expect("connected above");
        up.write_all(head.as_bytes())?;
        up.write_all(&body)?;
    }
}
