//! The server over real loopback TCP with a raw HTTP/1.1 client.

use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::store::StoreConfig;

struct Srv {
    addr: String,
    store: Arc<Store>,
    _stop: tokio::sync::oneshot::Sender<()>,
    dir: tempfile::TempDir,
}

async fn start_in(dir: tempfile::TempDir, cfg: StoreConfig) -> Srv {
    let store = Store::open(dir.path(), cfg).unwrap();
    let listener = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()), false)
        .await
        .unwrap();
    let addr = listener.local_addr();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(store.clone(), listener, async {
        let _ = rx.await;
    }));
    Srv {
        addr,
        store,
        _stop: tx,
        dir,
    }
}

async fn start(cfg: StoreConfig) -> Srv {
    start_in(tempfile::tempdir().unwrap(), cfg).await
}

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Sends one request (Connection: close) and returns (status, headers, body).
async fn req(addr: &str, head: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(b"Connection: close\r\n\r\n").await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let headers = String::from_utf8_lossy(&out[..split]).to_string();
    let status = headers.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, headers, out[split + 4..].to_vec())
}

async fn put(addr: &str, d: &str, body: &[u8]) -> u16 {
    let head = format!(
        "PUT /v1/blobs/{d} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n",
        body.len()
    );
    req(addr, &head, body).await.0
}

async fn get(addr: &str, d: &str, extra: &str) -> (u16, String, Vec<u8>) {
    req(
        addr,
        &format!("GET /v1/blobs/{d} HTTP/1.1\r\nHost: x\r\n{extra}"),
        &[],
    )
    .await
}

fn quick() -> StoreConfig {
    StoreConfig {
        max_wait: Duration::from_secs(5),
        ..StoreConfig::default()
    }
}

#[tokio::test]
async fn stores_serves_ranges_and_refuses_what_does_not_match() {
    let s = start(quick()).await;
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let d = digest(&blob);
    assert_eq!(put(&s.addr, &d, &blob).await, 201);
    assert_eq!(put(&s.addr, &d, &blob).await, 200, "present: taken at once");
    let (st, _, body) = get(&s.addr, &d, "").await;
    assert_eq!((st, body == blob), (200, true));
    let (st, h, body) = get(&s.addr, &d, "Range: bytes=10-19\r\n").await;
    assert_eq!((st, &body[..]), (206, &blob[10..20]));
    assert!(h.contains("bytes 10-19/300000"), "{h}");
    assert_eq!(get(&s.addr, &d, "Range: bytes=400000-\r\n").await.0, 416);
    // Wrong content under a digest, and a body of the wrong size: nothing stored.
    let other = digest(b"something else");
    assert_eq!(put(&s.addr, &other, b"not it").await, 400);
    let head = format!("PUT /v1/blobs/{other} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n");
    // The client goes away after 14 of the 100 bytes.
    let mut short = TcpStream::connect(&s.addr).await.unwrap();
    short
        .write_all(format!("{head}\r\n").as_bytes())
        .await
        .unwrap();
    short.write_all(b"something else").await.unwrap();
    drop(short);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.store.size_of(&other), None);
    assert_eq!(
        std::fs::read_dir(s.dir.path().join("tmp")).unwrap().count(),
        0
    );
    for bad in ["sha256:ABC", "sha512:00", "sha256:../../etc/passwd"] {
        assert_eq!(get(&s.addr, bad, "").await.0, 400, "{bad}");
    }
    let st = s.store.stats();
    assert_eq!((st.blobs, st.puts_ok), (1, 2), "{st:?}");
}

#[tokio::test]
async fn evicts_least_recently_used_and_survives_a_restart() {
    let cfg = StoreConfig {
        max_bytes: 3000,
        ..quick()
    };
    let s = start(cfg.clone()).await;
    let blobs: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 1000]).collect();
    for b in &blobs[..2] {
        assert_eq!(put(&s.addr, &digest(b), b).await, 201);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The first is used again, so the second is the least recently used.
    assert_eq!(get(&s.addr, &digest(&blobs[0]), "").await.0, 200);
    assert_eq!(put(&s.addr, &digest(&blobs[2]), &vec![9; 1500]).await, 400);
    assert_eq!(put(&s.addr, &digest(&blobs[2]), &blobs[2]).await, 201);
    let big = vec![7u8; 1500];
    assert_eq!(put(&s.addr, &digest(&big), &big).await, 201);
    let st = s.store.stats();
    assert!(st.bytes <= 3000, "{st:?}");
    assert_eq!(s.store.size_of(&digest(&blobs[1])), None, "LRU blob kept");
    assert!(s.store.size_of(&digest(&big)).is_some());
    assert_eq!(put(&s.addr, &digest(&[1; 4000]), &[1; 4000]).await, 413);
    let held: Vec<String> = [&blobs[0], &blobs[2], &big]
        .iter()
        .map(|b| digest(b))
        .filter(|d| s.store.size_of(d).is_some())
        .collect();
    // Restart: same blobs, a stray temp file cleared.
    let Srv {
        dir, _stop, store, ..
    } = s;
    drop(_stop);
    drop(store);
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(dir.path().join("tmp/left.0.0"), b"half").unwrap();
    let s = start_in(dir, cfg).await;
    for d in &held {
        assert_eq!(get(&s.addr, d, "").await.0, 200, "{d}");
    }
    assert_eq!(
        std::fs::read_dir(s.dir.path().join("tmp")).unwrap().count(),
        0
    );
}

#[tokio::test]
async fn a_get_during_an_upload_waits_for_it_and_a_report_removes_only_bad_blobs() {
    let s = start(quick()).await;
    let blob = vec![5u8; 200_000];
    let d = digest(&blob);
    // A miss claims the blob: the next GET waits for the upload that follows.
    assert_eq!(get(&s.addr, &d, "").await.0, 404);
    let waiter = {
        let (addr, d) = (s.addr.clone(), d.clone());
        tokio::spawn(async move { get(&addr, &d, "").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "the GET did not wait for the claimed blob"
    );
    assert_eq!(put(&s.addr, &d, &blob).await, 201);
    let (st, _, body) = waiter.await.unwrap();
    assert_eq!((st, body == blob), (200, true));
    // A report of a good blob keeps it; of a corrupted one removes it.
    let del = format!("DELETE /v1/blobs/{d} HTTP/1.1\r\nHost: x\r\n");
    assert_eq!(req(&s.addr, &del, &[]).await.0, 409);
    let path = s
        .dir
        .path()
        .join("blobs/sha256")
        .join(d.trim_start_matches("sha256:"));
    let mut bad = blob.clone();
    bad[7] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    assert_eq!(req(&s.addr, &del, &[]).await.0, 200);
    assert!(!path.exists());
    assert_eq!(s.store.size_of(&d), None);
}

#[tokio::test]
async fn concurrent_uploads_of_one_digest_and_beyond_the_limit_are_refused() {
    let s = start(StoreConfig {
        max_concurrent_uploads: 1,
        ..quick()
    })
    .await;
    let blob = vec![3u8; 1000];
    let d = digest(&blob);
    let mut slow = TcpStream::connect(&s.addr).await.unwrap();
    slow.write_all(
        format!("PUT /v1/blobs/{d} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    slow.write_all(&blob[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(put(&s.addr, &d, &blob).await, 409);
    let other = vec![4u8; 10];
    assert_eq!(put(&s.addr, &digest(&other), &other).await, 503);
    slow.write_all(&blob[10..]).await.unwrap();
    let mut out = vec![0u8; 12];
    slow.read_exact(&mut out).await.unwrap();
    assert_eq!(&out, b"HTTP/1.1 201");
}
