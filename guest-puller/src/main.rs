//! `guest-puller` CLI: pull an image into a bundle, serve the CDH-compatible ttrpc API,
//! or unmount a bundle. Started as `confidential-data-hub` (a symlink, as kata-agent launches
//! the CDH), it takes CDH's command line and serves; started as `attestation-agent`, it takes
//! the attestation-agent's command line and serves the AA's API.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use guest_puller::aa::agent::{Agent, AgentSettings, InitdataArg};
use guest_puller::aa::config::AaToml;
use guest_puller::aa::AA_BINARY_NAME;
use guest_puller::cdh_config::{CDH_BINARY_NAME, CREDENTIALS_DIR, DEFAULT_AA_SOCKET};
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

/// The attestation-agent's command line, spelled as guest-components' `ttrpc-aa` spells it;
/// kata-agent passes `--attestation_sock`, `--initdata-toml` (when the pod has initdata) and
/// `-c` (when initdata holds an `aa.toml`).
#[derive(Parser)]
#[command(
    name = AA_BINARY_NAME,
    version,
    about = "guest-puller serving as the attestation-agent"
)]
struct AaCli {
    /// The ttrpc socket to serve, `unix:///<path>`.
    #[arg(short, long = "attestation_sock", default_value = DEFAULT_AA_SOCKET)]
    attestation_sock: String,
    /// The attestation-agent configuration (aa.toml); without it the KBS comes from
    /// `AA_KBC_PARAMS` or the kernel's `agent.aa_kbc_params`.
    #[arg(short, long)]
    config_file: Option<PathBuf>,
    /// Initdata digest (standard base64) the TEE must have been launched with.
    #[arg(short, long)]
    initdata_digest: Option<String>,
    /// Initdata TOML the TEE must have been launched with (wins over --initdata-digest);
    /// also sent to the KBS with token requests.
    #[arg(short = 't', long)]
    initdata_toml: Option<PathBuf>,
}

impl AaCli {
    fn initdata(&self) -> InitdataArg {
        match (&self.initdata_toml, &self.initdata_digest) {
            (Some(p), _) => InitdataArg::Toml(p.clone()),
            (None, Some(d)) => InitdataArg::Digest(d.clone()),
            (None, None) => InitdataArg::None,
        }
    }
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
    /// Keep the FUSE sessions of lazy mounts open while the guest-puller restarts (`serve`
    /// starts it on the first lazy mount; it exits once it holds nothing).
    #[cfg(feature = "lazy")]
    #[command(hide = true)]
    FuseHolder {
        /// The holder's socket.
        #[arg(long)]
        socket: PathBuf,
    },
}

/// A layer's stage times in milliseconds, for `pull`'s output (what the benchmark reads).
fn timings_json(t: guest_puller::layer::LayerTimings) -> serde_json::Value {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let stage = |s: guest_puller::layer::StageTime| serde_json::json!({ "busy": ms(s.busy), "starved": ms(s.starved), "blocked": ms(s.blocked) });
    serde_json::json!({
        "wall": ms(t.wall),
        "decrypt": stage(t.decrypt),
        "inflate": stage(t.inflate),
        "write": stage(t.write),
    })
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
fn log_filter(level: Option<&str>) -> anyhow::Result<tracing_subscriber::EnvFilter> {
    if let Ok(f) = tracing_subscriber::EnvFilter::try_from_env("GUEST_PULLER_LOG") {
        return Ok(f);
    }
    match level {
        Some(level) => tracing_subscriber::EnvFilter::try_new(level)
            .with_context(|| format!("[log] level {level:?} is not a log filter")),
        None => Ok(tracing_subscriber::EnvFilter::new("info")),
    }
}

/// Starts logging at `level` (see [`log_filter`]) and warns about `unimplemented` keys.
fn init_logging_with(level: Option<&str>, unimplemented: &[&str]) -> anyhow::Result<()> {
    let filter = log_filter(level)?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if !unimplemented.is_empty() {
        tracing::warn!(
            "config keys accepted but not implemented by guest-puller (ignored): {}",
            unimplemented.join("; ")
        );
    }
    Ok(())
}

fn init_logging(cfg: Option<&Config>) -> anyhow::Result<()> {
    let keys = cfg.map(Config::unimplemented_keys).unwrap_or_default();
    init_logging_with(cfg.and_then(Config::log_filter), &keys)
}

/// The puller of the `pull` command (no server, so no `PullImage` runtime event: that is the
/// CDH's, recorded when kata-agent asks over ttrpc).
async fn puller(mut cfg: Config) -> anyhow::Result<Puller> {
    let prepared = guest_puller::startup::prepare(&mut cfg).await?;
    Ok(Puller::new(cfg, prepared.fetcher).await?)
}

/// Serves as the CDH does: credentials written first, then the ttrpc API on `addrs`.
async fn serve(mut cfg: Config, addrs: Vec<ListenAddr>) -> anyhow::Result<()> {
    let shown: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let prepared = guest_puller::startup::prepare(&mut cfg).await?;
    guest_puller::startup::write_credentials(
        &cfg.credentials,
        prepared.fetcher.as_ref(),
        Path::new(CREDENTIALS_DIR),
    )
    .await?;
    #[cfg(feature = "lazy")]
    let work_dir = cfg.image.work_dir.clone();
    let p = Arc::new(Puller::new(cfg, prepared.fetcher).await?);
    #[cfg(feature = "lazy")]
    {
        use guest_puller::lazy::holder::{Holder, SOCKET_NAME};
        let socket = work_dir.join(SOCKET_NAME);
        let args = vec![
            "fuse-holder".to_owned(),
            "--socket".to_owned(),
            socket.display().to_string(),
        ];
        // /proc/self/exe: still this binary after an upgrade replaced the file.
        let holder = Holder::new(socket, PathBuf::from("/proc/self/exe"), args);
        // Without the holder, lazy images still work; only a restart would end their mounts.
        match p.resume_lazy_mounts(Arc::new(holder)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(mounts = n, "lazy mounts resumed"),
            Err(e) => tracing::error!("resuming the lazy mounts of the previous run: {e}"),
        }
    }
    guest_puller::api::server::serve(p, prepared.aa, &addrs)
        .await
        .with_context(|| format!("serving on {}", shown.join(", ")))
}

/// Serves as the attestation-agent: config, initdata check (exit non-zero on a mismatch,
/// before the socket exists), then the AA's ttrpc API.
async fn serve_aa(cli: AaCli) -> anyhow::Result<()> {
    let config = match &cli.config_file {
        Some(p) => AaToml::from_file(p)?,
        None => {
            let env = std::env::var("AA_KBC_PARAMS").ok();
            let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
            AaToml::from_kbc_params(env.as_deref(), &cmdline)
        }
    };
    init_logging_with(config.log_filter(), &config.unimplemented_keys())?;
    let agent = Agent::start(AgentSettings {
        config,
        initdata: cli.initdata(),
        paths: kbs_client::HardwarePaths::default(),
        eventlog_path: guest_puller::aa::eventlog::log_path(),
    })
    .await
    .context("starting the attestation-agent")?;
    guest_puller::aa::server::serve(Arc::new(agent), &cli.attestation_sock).await?;
    Ok(())
}

/// Whether argv[0]'s file name is `name` (how kata-agent's launch plan starts us: through the
/// `confidential-data-hub` and `attestation-agent` symlinks).
fn started_as(argv0: Option<&OsString>, name: &str) -> bool {
    argv0
        .map(Path::new)
        .and_then(Path::file_name)
        .is_some_and(|n| n == name)
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
    let argv0 = std::env::args_os().next();
    if started_as(argv0.as_ref(), AA_BINARY_NAME) {
        return serve_aa(AaCli::parse()).await;
    }
    if started_as(argv0.as_ref(), CDH_BINARY_NAME) {
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
        #[cfg(feature = "lazy")]
        Cmd::FuseHolder { socket } => {
            // Before any logging setup: the holder has no output (its stdio is /dev/null).
            guest_puller::lazy::holder::run(socket, guest_puller::lazy::holder::IDLE_EXIT)?;
            return Ok(());
        }
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
                        "timings_ms": l.timings.map(timings_json),
                    })).collect::<Vec<_>>(),
                })
            );
            // The pull is done; give the node cache the last bytes of what it was offered.
            p.settle_cache_uploads(std::time::Duration::from_secs(30))
                .await;
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
        #[cfg(feature = "lazy")]
        Cmd::FuseHolder { .. } => unreachable!("the holder returned above"),
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
            assert_eq!(
                started_as(Some(&OsString::from(argv0)), CDH_BINARY_NAME),
                cdh,
                "{argv0}"
            );
        }
        assert!(!started_as(None, CDH_BINARY_NAME));
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
    fn argv0_selects_attestation_agent_mode_with_the_agents_exact_argv() {
        assert!(started_as(
            Some(&OsString::from("/usr/local/bin/attestation-agent")),
            AA_BINARY_NAME
        ));
        assert!(!started_as(
            Some(&OsString::from("/usr/local/bin/attestation-agent-nv")),
            AA_BINARY_NAME
        ));
        // kata-agent 4.1's launch plan, initdata and aa.toml present.
        let c = AaCli::try_parse_from([
            "/usr/local/bin/attestation-agent",
            "--attestation_sock",
            "unix:///run/confidential-containers/attestation-agent/attestation-agent.sock",
            "--initdata-toml",
            "/run/confidential-containers/initdata/initdata.toml",
            "-c",
            "/run/confidential-containers/initdata/aa.toml",
        ])
        .unwrap();
        assert_eq!(
            c.attestation_sock,
            "unix:///run/confidential-containers/attestation-agent/attestation-agent.sock"
        );
        assert_eq!(
            c.config_file.as_deref(),
            Some(Path::new("/run/confidential-containers/initdata/aa.toml"))
        );
        assert_eq!(
            c.initdata(),
            InitdataArg::Toml("/run/confidential-containers/initdata/initdata.toml".into())
        );
        // Without initdata, and the reference's other spellings.
        let c = AaCli::try_parse_from(["attestation-agent"]).unwrap();
        assert_eq!(c.attestation_sock, DEFAULT_AA_SOCKET);
        assert_eq!(c.initdata(), InitdataArg::None);
        let c = AaCli::try_parse_from([
            "attestation-agent",
            "-a",
            "unix:///tmp/aa.sock",
            "--config-file",
            "/etc/aa.toml",
            "--initdata-digest",
            "AAAA",
        ])
        .unwrap();
        assert_eq!(c.attestation_sock, "unix:///tmp/aa.sock");
        assert_eq!(c.config_file.as_deref(), Some(Path::new("/etc/aa.toml")));
        assert_eq!(c.initdata(), InitdataArg::Digest("AAAA".into()));
        let c =
            AaCli::try_parse_from(["attestation-agent", "-i", "AAAA", "-t", "/i.toml"]).unwrap();
        assert_eq!(
            c.initdata(),
            InitdataArg::Toml("/i.toml".into()),
            "the TOML wins"
        );
        for bad in [
            &["attestation-agent", "--attestation-sock", "unix:///x"][..],
            &["attestation-agent", "--config", "/etc/aa.toml"][..],
            &["attestation-agent", "serve"][..],
        ] {
            assert!(AaCli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_bad_log_level_is_an_error_naming_the_key() {
        // GUEST_PULLER_LOG would take precedence; the test environment does not set it.
        assert!(std::env::var_os("GUEST_PULLER_LOG").is_none());
        let cfg = Config::from_toml("[log]\nlevel = \"loud=[\"\n").unwrap();
        let e = format!("{:#}", log_filter(cfg.log_filter()).unwrap_err());
        assert!(e.contains("[log] level"), "{e}");
        let cfg = Config::from_toml("[log]\nlevel = \"debug\"\n").unwrap();
        assert!(log_filter(cfg.log_filter()).is_ok());
    }
}
