//! `guest-puller` CLI: pull an image into a bundle, serve the CDH-compatible ttrpc API,
//! or unmount a bundle. Started as `confidential-data-hub` (a symlink, as kata-agent launches
//! the CDH), it takes CDH's command line and serves.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use guest_puller::cdh_config::{CDH_BINARY_NAME, CREDENTIALS_DIR};
use guest_puller::config::{Config, ListenAddr};
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

/// CDH's command line, as kata-agent passes it (`-c <cdh.toml>` when initdata has one).
#[derive(Parser)]
#[command(
    name = CDH_BINARY_NAME,
    version,
    about = "guest-puller serving as the Confidential Data Hub"
)]
struct CdhCli {
    /// CDH configuration file (CDH's TOML, or guest-puller's own).
    #[arg(short = 'c', long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pull IMAGE into an OCI bundle (rootfs at BUNDLE/rootfs, config.json beside it).
    Pull {
        /// TOML configuration file (guest-puller's or CDH's format).
        #[arg(short = 'c', long)]
        config: Option<PathBuf>,
        /// Image reference.
        image: String,
        /// Bundle directory (absolute).
        #[arg(long)]
        bundle: PathBuf,
    },
    /// Serve api.ImagePullService and keyprovider.KeyProviderService over ttrpc.
    Serve {
        /// TOML configuration file (guest-puller's or CDH's format).
        #[arg(short = 'c', long)]
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

/// CDH without `-c`: defaults, with the KBS from `AA_KBC_PARAMS` or the kernel command line.
fn cdh_default_config() -> anyhow::Result<Config> {
    let mut cfg = Config::default();
    let env = std::env::var("AA_KBC_PARAMS").ok();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    cfg.apply_aa_kbc_params(env.as_deref(), &cmdline)?;
    Ok(cfg)
}

/// The log filter: `GUEST_PULLER_LOG` first, then the config's `[log] level` (an error when it
/// is not a valid filter, naming the key), then `info`.
fn log_filter(cfg: Option<&Config>) -> anyhow::Result<tracing_subscriber::EnvFilter> {
    if let Ok(f) = tracing_subscriber::EnvFilter::try_from_env("GUEST_PULLER_LOG") {
        return Ok(f);
    }
    match cfg.and_then(Config::log_filter) {
        Some(level) => tracing_subscriber::EnvFilter::try_new(level)
            .with_context(|| format!("[log] level {level:?} is not a log filter")),
        None => Ok(tracing_subscriber::EnvFilter::new("info")),
    }
}

fn init_logging(cfg: Option<&Config>) -> anyhow::Result<()> {
    let filter = log_filter(cfg)?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Some(keys) = cfg
        .map(Config::unimplemented_keys)
        .filter(|k| !k.is_empty())
    {
        tracing::warn!(
            "config keys accepted but not implemented by guest-puller (ignored): {}",
            keys.join("; ")
        );
    }
    Ok(())
}

async fn puller(mut cfg: Config) -> anyhow::Result<Puller> {
    let fetcher = guest_puller::startup::prepare(&mut cfg).await?;
    Ok(Puller::new(cfg, fetcher).await?)
}

/// Serves as the CDH does: credentials written first, then the ttrpc API on `addrs`.
async fn serve(mut cfg: Config, addrs: Vec<ListenAddr>) -> anyhow::Result<()> {
    let shown: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let fetcher = guest_puller::startup::prepare(&mut cfg).await?;
    guest_puller::startup::write_credentials(
        &cfg.credentials,
        fetcher.as_ref(),
        Path::new(CREDENTIALS_DIR),
    )
    .await?;
    let p = Arc::new(Puller::new(cfg, fetcher).await?);
    guest_puller::api::server::serve(p, &addrs)
        .await
        .with_context(|| format!("serving on {}", shown.join(", ")))
}

/// Whether argv[0] names the CDH binary (how kata-agent's launch plan starts us).
fn started_as_cdh(argv0: Option<&OsString>) -> bool {
    argv0
        .map(Path::new)
        .and_then(Path::file_name)
        .is_some_and(|n| n == CDH_BINARY_NAME)
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
    if started_as_cdh(std::env::args_os().next().as_ref()) {
        let cli = CdhCli::parse();
        let cfg = match &cli.config {
            Some(p) => Config::from_file(p)?,
            None => cdh_default_config()?,
        };
        init_logging(Some(&cfg))?;
        let addrs = cfg.server.addresses();
        return serve(cfg, addrs).await;
    }
    let cli = Cli::parse();
    let cfg = match &cli.cmd {
        Cmd::Pull { config, .. } | Cmd::Serve { config, .. } | Cmd::Unmount { config, .. } => {
            Some(load(config)?)
        }
        Cmd::ClientPull { .. } => None,
    };
    init_logging(cfg.as_ref())?;
    let cfg = cfg.unwrap_or_default();
    match cli.cmd {
        Cmd::Pull { image, bundle, .. } => {
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
        Cmd::Serve { socket, listen, .. } => {
            let addrs = match socket {
                Some(s) => vec![ListenAddr::Unix(absolute(s)?)],
                None if !listen.is_empty() => listen,
                None => cfg.server.addresses(),
            };
            serve(cfg, addrs).await?;
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
        Cmd::Unmount { bundle, .. } => {
            let store = guest_puller::layer::LayerStore::open(&cfg.image.work_dir)?;
            guest_puller::pull::unmount_bundle(&store, &absolute(bundle)?).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv0_selects_cdh_mode() {
        for (argv0, cdh) in [
            ("/usr/local/bin/confidential-data-hub", true),
            ("confidential-data-hub", true),
            ("/usr/local/bin/guest-puller", false),
            ("/usr/local/bin/confidential-data-hub.sh", false),
        ] {
            assert_eq!(started_as_cdh(Some(&OsString::from(argv0))), cdh, "{argv0}");
        }
        assert!(!started_as_cdh(None));
        let c = CdhCli::try_parse_from([
            "confidential-data-hub",
            "-c",
            "/run/confidential-containers/initdata/cdh.toml",
        ])
        .unwrap();
        assert_eq!(
            c.config.as_deref(),
            Some(Path::new("/run/confidential-containers/initdata/cdh.toml"))
        );
        assert!(CdhCli::try_parse_from(["confidential-data-hub"])
            .unwrap()
            .config
            .is_none());
        assert!(CdhCli::try_parse_from(["confidential-data-hub", "--bogus"]).is_err());
        let c = Cli::try_parse_from(["guest-puller", "serve", "-c", "/etc/cdh.toml"]).unwrap();
        assert!(matches!(
            c.cmd,
            Cmd::Serve {
                config: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn a_bad_log_level_is_an_error_naming_the_key() {
        // GUEST_PULLER_LOG would take precedence; the test environment does not set it.
        assert!(std::env::var_os("GUEST_PULLER_LOG").is_none());
        let cfg = Config::from_toml("[log]\nlevel = \"loud=[\"\n").unwrap();
        let e = format!("{:#}", log_filter(Some(&cfg)).unwrap_err());
        assert!(e.contains("[log] level"), "{e}");
        let cfg = Config::from_toml("[log]\nlevel = \"debug\"\n").unwrap();
        assert!(log_filter(Some(&cfg)).is_ok());
    }
}
