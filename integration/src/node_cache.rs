//! `guestpull-node-cache`, the host's blob cache, as a lab daemon, and guests that use it.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::lab::{bin_path, free_port, wait_for, Lab};

/// A running node cache on a loopback port, its blobs under `<lab>/<name>/`.
pub struct NodeCacheProcess<'a> {
    lab: &'a Lab,
    name: String,
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
}

impl<'a> NodeCacheProcess<'a> {
    /// Starts the cache with `args` added to its command line (e.g. `--max-bytes 1M`).
    pub fn start(lab: &'a Lab, name: &str, args: &[&str]) -> NodeCacheProcess<'a> {
        let c = NodeCacheProcess {
            lab,
            name: name.to_owned(),
            port: free_port(),
            dir: lab.join(name),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        c.restart();
        c
    }

    /// (Re)starts the daemon on the same port and dir (a running one is SIGKILLed first).
    pub fn restart(&self) {
        let mut cmd = Command::new(bin_path("guestpull-node-cache"));
        cmd.arg("--dir")
            .arg(&self.dir)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(&self.args)
            .env("RUST_LOG", "info");
        self.lab.spawn(&self.name, cmd);
        let port = self.port;
        wait_for("the node cache", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// SIGKILLs the daemon (a crash).
    pub fn kill(&self) {
        self.lab.kill(&self.name);
    }

    /// `http://127.0.0.1:<port>`, what a guest's `[image.node_cache] url` names.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cache's state dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The daemon's log.
    pub fn log(&self) -> String {
        self.lab.log(&self.name)
    }

    /// The path a complete blob is stored at.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        self.dir
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// Digests of the complete blobs the cache holds, sorted.
    pub fn blobs(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.dir.join("blobs/sha256"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| format!("sha256:{}", e.file_name().to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Total bytes of the complete blobs held.
    pub fn bytes(&self) -> u64 {
        self.blobs()
            .iter()
            .filter_map(|d| fs::metadata(self.blob_file(d)).ok())
            .map(|m| m.len())
            .sum()
    }

    /// `GET /v1/stats` as JSON.
    pub fn stats(&self) -> serde_json::Value {
        let (status, body) = self.request("GET", "/v1/stats", &[]);
        assert_eq!(
            status,
            200,
            "node cache stats: {}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice(&body).expect("node cache stats are JSON")
    }

    /// One HTTP/1.1 request with `body` (Connection: close): (status, body).
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let mut s =
            TcpStream::connect(("127.0.0.1", self.port)).expect("connecting to the node cache");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let split = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("an HTTP answer");
        let head = String::from_utf8_lossy(&buf[..split]).to_string();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("an HTTP status");
        (status, buf[split + 4..].to_vec())
    }
}

/// A local-guest puller of its own: work dir, bundles and config under `<lab>/<name>/`, pulling
/// from the plain-HTTP registry `registry_host` with `extra` TOML appended to its config.
pub struct CachedGuest {
    /// The guest's config file.
    pub config: PathBuf,
    /// Its dir (work dir and bundles below it).
    pub dir: PathBuf,
}

impl CachedGuest {
    /// Writes the guest's config; `cache_url` `None` leaves the node cache out.
    pub fn new(
        lab: &Lab,
        name: &str,
        registry_host: &str,
        cache: Option<(&str, &str)>,
        extra: &str,
    ) -> CachedGuest {
        let dir = lab.join(name);
        fs::create_dir_all(&dir).unwrap();
        let config = dir.join("guest-puller.toml");
        let cache = match cache {
            Some((url, mode)) => {
                format!("[image.node_cache]\nurl = \"{url}\"\nmode = \"{mode}\"\n")
            }
            None => String::new(),
        };
        fs::write(
            &config,
            format!(
                "{extra}\n[image]\nwork_dir = \"{}\"\nbundle_roots = [\"{}\"]\n\
                 [image.registry_config]\ninsecure_registries = [\"{registry_host}\"]\n{cache}",
                dir.join("work").display(),
                dir.display(),
            ),
        )
        .unwrap();
        CachedGuest { config, dir }
    }

    /// The bundle dir of pull `n`.
    pub fn bundle(&self, n: usize) -> PathBuf {
        self.dir.join(format!("bundle-{n}"))
    }

    /// `guest-puller pull` of `image` into bundle `n`, one-shot.
    pub fn pull(&self, image: &str, n: usize) -> Output {
        crate::chain::guest_puller_pull(&self.config, image, &self.bundle(n))
    }

    /// Like [`Self::pull`], failing the test with the guest's stderr if the pull fails.
    pub fn pull_ok(&self, image: &str, n: usize) -> String {
        let out = self.pull(image, n);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            out.status.success(),
            "guest pull of {image} in {}: {err}",
            self.dir.display()
        );
        err
    }
}
