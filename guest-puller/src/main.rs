//! `guest-puller` CLI: pull an image into a bundle, serve the CDH-compatible ttrpc API,
//! or unmount a bundle.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use guest_puller::config::{Config, ListenAddr};
use guest_puller::fetcher::KbsResourceFetcher;
use guest_puller::pull::Puller;

#[derive(Parser)]
#[command(
    name = "guest-puller",
    version,
    about = "Pull, verify, decrypt and unpack images inside a TEE guest"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pull IMAGE into an OCI bundle (rootfs at BUNDLE/rootfs, config.json beside it).
    Pull {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Image reference.
        image: String,
        /// Bundle directory (absolute).
        #[arg(long)]
        bundle: PathBuf,
    },
    /// Serve api.ImagePullService and keyprovider.KeyProviderService over ttrpc.
    Serve {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Socket path (overrides [server] socket and listen).
        #[arg(long, conflicts_with = "listen")]
        socket: Option<PathBuf>,
        /// Listen address, repeatable (overrides [server]): `unix:///path` or
        /// `vsock://<cid|-1>:<port>` (-1 = any CID, as inside a VM guest).
        #[arg(long)]
        listen: Vec<ListenAddr>,
    },
    /// Ask a running server (CDH-compatible socket) to pull IMAGE into BUNDLE; prints the manifest digest.
    ClientPull {
        /// Server socket.
        #[arg(long, default_value = guest_puller::config::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Image reference.
        image: String,
        /// Bundle directory (absolute).
        #[arg(long)]
        bundle: PathBuf,
        /// Request timeout in seconds (kata-agent's default image_pull_timeout is 1200).
        #[arg(long, default_value_t = 1200)]
        timeout: u64,
    },
    /// Unmount a bundle's rootfs, remove it and garbage-collect unused layers.
    Unmount {
        /// TOML configuration file (for the work dir).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Bundle directory.
        #[arg(long)]
        bundle: PathBuf,
    },
}

fn load(config: &Option<PathBuf>) -> anyhow::Result<Config> {
    match config {
        Some(p) => Ok(Config::from_file(p)?),
        None => Ok(Config::default()),
    }
}

async fn puller(cfg: Config) -> anyhow::Result<Puller> {
    let fetcher = Arc::new(KbsResourceFetcher::new(&cfg.kbs)?);
    Ok(Puller::new(cfg, fetcher).await?)
}

fn absolute(p: PathBuf) -> anyhow::Result<PathBuf> {
    if p.is_absolute() {
        Ok(p)
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GUEST_PULLER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Pull {
            config,
            image,
            bundle,
        } => {
            let cfg = load(&config)?;
            let p = puller(cfg).await?;
            let bundle = absolute(bundle)?;
            let r = p
                .pull_image(&image, &bundle)
                .await
                .with_context(|| format!("pulling {image}"))?;
            println!(
                "{}",
                serde_json::json!({
                    "manifest_digest": r.manifest_digest,
                    "config_digest": r.config_digest,
                    "list_digest": r.list_digest,
                    "source": r.source,
                    "bundle": r.bundle,
                    "layers": r.layers.iter().map(|l| serde_json::json!({
                        "digest": l.digest, "diff_id": l.diff_id, "cached": l.cached,
                    })).collect::<Vec<_>>(),
                })
            );
        }
        Cmd::Serve {
            config,
            socket,
            listen,
        } => {
            let cfg = load(&config)?;
            let addrs = match socket {
                Some(s) => vec![ListenAddr::Unix(absolute(s)?)],
                None if !listen.is_empty() => listen,
                None => cfg.server.addresses(),
            };
            let shown: Vec<String> = addrs.iter().map(ToString::to_string).collect();
            let p = Arc::new(puller(cfg).await?);
            guest_puller::api::server::serve(p, &addrs)
                .await
                .with_context(|| format!("serving on {}", shown.join(", ")))?;
        }
        Cmd::ClientPull {
            socket,
            image,
            bundle,
            timeout,
        } => {
            let digest = guest_puller::api::client::pull_image(
                &socket,
                &image,
                &absolute(bundle)?,
                std::time::Duration::from_secs(timeout),
            )
            .await
            .with_context(|| format!("PullImage {image} via {}", socket.display()))?;
            println!("{digest}");
        }
        Cmd::Unmount { config, bundle } => {
            let cfg = load(&config)?;
            let store = guest_puller::layer::LayerStore::open(&cfg.image.work_dir)?;
            guest_puller::pull::unmount_bundle(&store, &absolute(bundle)?).await?;
        }
    }
    Ok(())
}
