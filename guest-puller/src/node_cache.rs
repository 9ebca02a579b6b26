//! The guest's side of the node-local blob cache (`guestpull-node-cache` on the host).
//!
//! The host may *carry* blobs it cannot read or alter: the guest checks every blob it gets
//! from the cache by the digest in the manifest it verified itself, exactly as a registry
//! download, and a blob that fails any check is fetched again from the registry. What goes to
//! the host is the guest's decision ([`ShareMode`]): by default only ocicrypt-encrypted
//! layers, whose ciphertext the host can already see in transit; registry credentials, keys
//! and plaintext never leave the guest.
//!
//! The flow for a shared layer: ask the cache by digest; on a hit, stream it into the layer
//! pipeline; on a miss, download from the registry as always and tee the bytes to the cache in
//! a bounded background upload that is dropped (never waited for) if the cache is slower than
//! the pull. The cache stores an upload only when its own digest check passes, so a guest can
//! no more poison it than the host can.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::config::ConfigError;
use crate::decrypt;

pub use node_cache::protocol::blob_path;

/// Which layers this guest shares through the node cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShareMode {
    /// The cache is not used.
    Off,
    /// Only ocicrypt-encrypted layers (the host sees their ciphertext in transit anyway).
    #[default]
    EncryptedLayers,
    /// Every layer: for public images, whose plaintext the host may see.
    All,
}

/// `[image.node_cache]`: where the node's blob cache is and what this guest shares with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeCacheConfig {
    /// Base URL of the cache (`http://<host>:<port>`: in Kata the VM's channel to the host,
    /// in the local guest a loopback address); unset = no cache.
    pub url: Option<String>,
    /// What may be shared (`off`, `encrypted-layers`, `all`).
    pub mode: ShareMode,
    /// Seconds to wait for the cache's answer or its next byte before fetching from the
    /// registry instead (the cache holds a request while another guest uploads that blob).
    pub timeout_secs: u64,
    /// Chunks an upload may lag behind the pull before it is dropped.
    pub upload_buffer_chunks: usize,
}

impl Default for NodeCacheConfig {
    fn default() -> Self {
        Self {
            url: None,
            mode: ShareMode::default(),
            timeout_secs: 60,
            upload_buffer_chunks: 256,
        }
    }
}

impl NodeCacheConfig {
    /// Checks the URL and bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(u) = &self.url {
            let parsed = url::Url::parse(u)
                .map_err(|e| ConfigError::Invalid(format!("[image.node_cache] url {u:?}: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
                return Err(ConfigError::Invalid(format!(
                    "[image.node_cache] url {u:?}: expected http://host:port"
                )));
            }
        }
        if self.timeout_secs == 0 || self.upload_buffer_chunks == 0 {
            return Err(ConfigError::Invalid(
                "[image.node_cache] timeout_secs and upload_buffer_chunks must be > 0".into(),
            ));
        }
        Ok(())
    }
}

/// Why the cache could not serve a blob (the pull then uses the registry).
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The cache could not be reached or answered unexpectedly.
    #[error("node cache: {0}")]
    Unavailable(String),
    /// The cache's answer does not fit the descriptor (its size).
    #[error("node cache: {0}")]
    Mismatch(String),
}

/// A client of the node cache, shared by the pulls of one puller.
pub struct NodeCache {
    http: reqwest::Client,
    base: String,
    mode: ShareMode,
    upload_chunks: usize,
    /// Uploads and reports still under way (finished ones are pruned as new ones start).
    pending: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// What a lookup found.
pub enum Lookup {
    /// The cache has the blob: its body, of exactly the descriptor's size.
    Hit(reqwest::Response),
    /// The cache lacks it; this guest should fetch it and offer it.
    Miss,
}

impl NodeCache {
    /// A client for `cfg`, or `None` when no cache is configured or sharing is off.
    pub fn new(cfg: &NodeCacheConfig) -> Result<Option<Self>, ConfigError> {
        cfg.validate()?;
        let Some(url) = &cfg.url else {
            return Ok(None);
        };
        if cfg.mode == ShareMode::Off {
            return Ok(None);
        }
        let timeout = Duration::from_secs(cfg.timeout_secs);
        // No proxy: the cache is on the node, reached over the VM's own channel.
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5).min(timeout))
            .read_timeout(timeout)
            .build()
            .map_err(|e| ConfigError::Invalid(format!("[image.node_cache]: {e}")))?;
        Ok(Some(Self {
            http,
            base: url.trim_end_matches('/').to_owned(),
            mode: cfg.mode,
            upload_chunks: cfg.upload_buffer_chunks,
            pending: Default::default(),
        }))
    }

    /// Whether a layer of this media type goes through the cache.
    pub fn shares(&self, media_type: &str) -> bool {
        match self.mode {
            ShareMode::Off => false,
            ShareMode::EncryptedLayers => decrypt::is_encrypted(media_type),
            ShareMode::All => true,
        }
    }

    fn url(&self, digest: &str) -> Result<String, CacheError> {
        blob_path(digest)
            .map(|p| format!("{}{p}", self.base))
            .ok_or_else(|| CacheError::Mismatch(format!("digest {digest:?} cannot be cached")))
    }

    /// Asks the cache for a blob of `size` bytes.
    pub async fn lookup(&self, digest: &str, size: u64) -> Result<Lookup, CacheError> {
        let resp = self
            .http
            .get(self.url(digest)?)
            .send()
            .await
            .map_err(|e| CacheError::Unavailable(kbs_client::error::error_chain(&e)))?;
        match resp.status() {
            StatusCode::OK => match resp.content_length() {
                Some(n) if n == size => Ok(Lookup::Hit(resp)),
                other => Err(CacheError::Mismatch(format!(
                    "blob {digest} has {other:?} bytes in the cache, the manifest says {size}"
                ))),
            },
            StatusCode::NOT_FOUND => Ok(Lookup::Miss),
            s => Err(CacheError::Unavailable(format!(
                "GET {digest} answered {s}"
            ))),
        }
    }

    /// Streams a hit's body into `tx`. An error mid-way is sent to `tx` too, so the pipeline
    /// stops at once.
    pub async fn stream_hit(
        resp: reqwest::Response,
        tx: &mpsc::Sender<io::Result<Bytes>>,
    ) -> Result<(), CacheError> {
        let mut body = resp.bytes_stream();
        while let Some(item) = body.next().await {
            match item {
                Ok(b) => {
                    if tx.send(Ok(b)).await.is_err() {
                        // The consumer stopped; its error is the one that counts.
                        return Ok(());
                    }
                }
                Err(e) => {
                    let reason = kbs_client::error::error_chain(&e);
                    let _ = tx.send(Err(io::Error::other(reason.clone()))).await;
                    return Err(CacheError::Unavailable(format!("reading a blob: {reason}")));
                }
            }
        }
        Ok(())
    }

    /// Starts offering a blob of `size` bytes to the cache; feed it with [`Upload::offer`].
    pub fn upload(&self, digest: &str, size: u64) -> Option<Upload> {
        let url = self.url(digest).ok()?;
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(self.upload_chunks);
        let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async {
            rx.recv().await.map(|item| (item, rx))
        }));
        let req = self
            .http
            .put(url)
            .header(reqwest::header::CONTENT_LENGTH, size)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        let name = digest.to_owned();
        let task = tokio::spawn(async move {
            match req.send().await {
                Ok(r) if r.status().is_success() => {
                    debug!(digest = %name, status = %r.status(), "blob offered to the node cache")
                }
                Ok(r) => {
                    debug!(digest = %name, status = %r.status(), "node cache did not take the blob")
                }
                Err(e) => debug!(digest = %name, "offering the blob to the node cache: {e}"),
            }
        });
        self.track(task);
        Some(Upload {
            tx: Some(tx),
            digest: digest.to_owned(),
        })
    }

    /// Asks the cache to check a blob that failed the guest's checks; the cache removes it
    /// only if its own digest check fails too (so no guest can evict a good blob this way).
    pub fn report_bad(&self, digest: &str) {
        let Ok(url) = self.url(digest) else { return };
        let req = self.http.delete(url);
        let digest = digest.to_owned();
        self.track(tokio::spawn(async move {
            match req.send().await {
                Ok(r) => {
                    info!(%digest, status = %r.status(), "reported a bad blob to the node cache")
                }
                Err(e) => warn!(%digest, "reporting a bad blob to the node cache: {e}"),
            }
        }));
    }

    fn track(&self, task: tokio::task::JoinHandle<()>) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.retain(|t| !t.is_finished());
        p.push(task);
    }

    /// Waits up to `within` for uploads and reports under way: a process about to exit (the
    /// one-shot `pull` command) calls it so its last upload is not cut off. Pulls never wait.
    pub async fn settle(&self, within: Duration) {
        let tasks = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let all = futures_util::future::join_all(tasks);
        if tokio::time::timeout(within, all).await.is_err() {
            debug!("node cache uploads still running at exit are dropped");
        }
    }
}

/// A blob being offered to the cache, fed as the registry download progresses. It never slows
/// the pull: when the cache lags by more than its buffer, the upload is dropped.
pub struct Upload {
    tx: Option<mpsc::Sender<io::Result<Bytes>>>,
    digest: String,
}

impl Upload {
    /// Passes on the next bytes of the blob; gives up the upload if the cache lags behind.
    pub fn offer(&mut self, b: &Bytes) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(Ok(b.clone())).is_err() {
            debug!(digest = %self.digest, "node cache upload dropped: the cache lags behind the pull");
            self.abort();
        }
    }

    /// Gives the upload up: the cache receives fewer bytes than announced and discards them.
    pub fn abort(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.try_send(Err(io::Error::other("upload abandoned")));
        }
    }
}
