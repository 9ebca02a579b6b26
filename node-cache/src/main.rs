//! `guestpull-node-cache`: the node-local blob cache daemon (see README.md).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Parser;
use node_cache::server::{self, ListenAddr, Listener};
use node_cache::store::{Store, StoreConfig};
use serde::Deserialize;

#[derive(Parser, Debug)]
#[command(
    name = "guestpull-node-cache",
    version,
    about = "Node-local content-addressed blob cache for confidential guests"
)]
struct Args {
    /// TOML config file with the same keys as the flags (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Cache directory (blobs/, tmp/, lock). Required here or in the config file.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Loopback TCP address to listen on, e.g. 127.0.0.1:5050 (port 0: any free port).
    #[arg(long, conflicts_with = "socket")]
    listen: Option<SocketAddr>,
    /// Unix socket to listen on (mode 0660).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Total size limit: bytes, or with a K/M/G/T suffix (powers of 1024). Default 10G.
    #[arg(long, value_parser = parse_size)]
    max_bytes: Option<u64>,
    /// Largest single blob accepted (default: --max-bytes).
    #[arg(long, value_parser = parse_size)]
    max_blob_bytes: Option<u64>,
    /// Uploads in progress at once (default 4); more are answered 503.
    #[arg(long)]
    max_concurrent_uploads: Option<usize>,
    /// Allow a TCP address that is not loopback (the cache is meant to be per node).
    #[arg(long)]
    allow_non_loopback: bool,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    socket: Option<PathBuf>,
    max_bytes: Option<Size>,
    max_blob_bytes: Option<Size>,
    max_concurrent_uploads: Option<usize>,
    allow_non_loopback: Option<bool>,
}

/// A size in TOML: an integer or a string such as "10G".
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    fn get(&self) -> anyhow::Result<u64> {
        match self {
            Size::Bytes(n) => Ok(*n),
            Size::Text(s) => parse_size(s).map_err(anyhow::Error::msg),
        }
    }
}

/// `1234`, `512K`, `512M`, `10G`, `1T` (also `10GiB`, `10GB`; all powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("invalid size {s:?}: unknown suffix {c:?}")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {s:?}"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

fn load(path: &Path) -> anyhow::Result<FileConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(env)
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let file = args
        .config
        .as_deref()
        .map(load)
        .transpose()?
        .unwrap_or_default();

    let dir = args
        .dir
        .or(file.dir)
        .context("--dir (or `dir` in the config file) is required")?;
    let addr = match (args.listen, args.socket) {
        (Some(a), None) => ListenAddr::Tcp(a),
        (None, Some(p)) => ListenAddr::Unix(p),
        _ => match (file.listen, file.socket) {
            (Some(a), None) => ListenAddr::Tcp(a),
            (None, Some(p)) => ListenAddr::Unix(p),
            _ => bail!("exactly one of --listen or --socket (or `listen`/`socket` in the config) is required"),
        },
    };
    let defaults = StoreConfig::default();
    let max_bytes = match (args.max_bytes, &file.max_bytes) {
        (Some(n), _) => n,
        (None, Some(s)) => s.get().context("max_bytes")?,
        (None, None) => defaults.max_bytes,
    };
    let max_blob_bytes = match (args.max_blob_bytes, &file.max_blob_bytes) {
        (Some(n), _) => n,
        (None, Some(s)) => s.get().context("max_blob_bytes")?,
        (None, None) => max_bytes,
    };
    let max_concurrent_uploads = args
        .max_concurrent_uploads
        .or(file.max_concurrent_uploads)
        .unwrap_or(defaults.max_concurrent_uploads);
    if max_concurrent_uploads == 0 {
        bail!("max_concurrent_uploads must be at least 1");
    }
    let allow_non_loopback = args.allow_non_loopback || file.allow_non_loopback.unwrap_or(false);

    let cfg = StoreConfig {
        max_bytes,
        max_blob_bytes,
        max_concurrent_uploads,
        ..defaults
    };
    let store = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || Store::open(&dir, cfg)
    })
    .await?
    .with_context(|| format!("opening the cache in {}", dir.display()))?;
    let listener = Listener::bind(&addr, allow_non_loopback)
        .await
        .with_context(|| format!("listening on {addr:?}"))?;
    tracing::info!(dir = %dir.display(), max_bytes, max_blob_bytes, max_concurrent_uploads, "node cache ready");
    println!("listening on {}", listener.local_addr());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
        }
    };
    server::serve(store, listener, stop).await;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1234"), Ok(1234));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in ["", "G", "10X", "-1", "1.5G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/node-cache.toml");
        let c = load(&path).unwrap();
        assert_eq!(c.max_bytes.unwrap().get().unwrap(), 20 << 30);
        assert!(c.dir.is_some() && c.listen.is_some() != c.socket.is_some());
    }
}
