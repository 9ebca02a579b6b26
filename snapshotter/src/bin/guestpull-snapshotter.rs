//! guestpull-snapshotter: containerd proxy snapshotter for in-guest image pull.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use snapshotter::containerd_config::{self, ContainerdLine, LintOptions};
use snapshotter::{server, Config, Engine, GuestPullService};
use tracing::info;

/// Config file read when --config is not given (only if it exists).
const DEFAULT_CONFIG_FILE: &str = "/etc/guestpull/snapshotter.toml";

#[derive(Parser, Debug)]
#[command(
    version,
    about = "containerd proxy snapshotter for Confidential Containers guest pull"
)]
struct Cli {
    /// TOML config file (default /etc/guestpull/snapshotter.toml if present).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// State directory (overrides `root`).
    #[arg(long, global = true)]
    root: Option<PathBuf>,
    /// gRPC unix socket (overrides `address`).
    #[arg(long, global = true)]
    address: Option<PathBuf>,
    /// Log filter, e.g. info, debug, snapshotter=debug (overrides `log_level`).
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Lint a containerd config for guest-pull pitfalls; exits 1 on errors.
    CheckContainerdConfig {
        /// containerd config.toml to check.
        file: PathBuf,
        /// Proxy plugin name of this snapshotter.
        #[arg(long, default_value = snapshotter::config::DEFAULT_PLUGIN_NAME)]
        snapshotter: String,
        /// containerd release line: 1.6, 1.7 or 2.x (enables version-specific checks).
        #[arg(long)]
        containerd_version: Option<ContainerdLine>,
    },
    /// Print the effective configuration as TOML and exit.
    PrintConfig,
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut cfg = match &cli.config {
        Some(p) => Config::load(p)?,
        None if std::path::Path::new(DEFAULT_CONFIG_FILE).exists() => {
            Config::load(std::path::Path::new(DEFAULT_CONFIG_FILE))?
        }
        None => Config::default(),
    };
    if let Some(r) = &cli.root {
        cfg.root = r.clone();
    }
    if let Some(a) = &cli.address {
        cfg.address = a.clone();
    }
    if let Some(l) = &cli.log_level {
        cfg.log_level = l.clone();
    }
    cfg.validate()?;
    Ok(cfg)
}

fn check(file: &PathBuf, snapshotter: String, line: Option<ContainerdLine>) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let findings = containerd_config::lint(
        &text,
        &LintOptions {
            snapshotter,
            containerd: line,
        },
    );
    for f in &findings {
        println!("{f}");
    }
    if containerd_config::has_errors(&findings) {
        bail!(
            "{}: guest pull will not work with this config",
            file.display()
        );
    }
    println!("{}: ok for guest pull", file.display());
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received, shutting down"),
        _ = int.recv() => info!("SIGINT received, shutting down"),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::CheckContainerdConfig {
            file,
            snapshotter,
            containerd_version,
        }) => return check(file, snapshotter.clone(), *containerd_version),
        Some(Command::PrintConfig) => {
            print!("{}", toml::to_string(&load_config(&cli)?)?);
            return Ok(());
        }
        None => {}
    }
    let cfg = load_config(&cli)?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cfg.log_level)
                .with_context(|| format!("bad log level {:?}", cfg.log_level))?,
        )
        .with_ansi(false)
        .init();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()?;
    runtime.block_on(async move {
        let address = cfg.address.clone();
        let (uid, gid) = (cfg.uid, cfg.gid);
        let root = cfg.root.clone();
        let engine = Arc::new(Engine::open(cfg).with_context(|| format!("opening state in {}", root.display()))?);
        let listener = server::bind(&address, uid, gid)?;
        info!(address = %address.display(), root = %root.display(), "guestpull snapshotter serving");
        let service = GuestPullService::new(engine.clone());
        let watcher = service.clone();
        let stop = async {
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = watcher.failed() => {}
            }
        };
        server::serve(service, listener, &address, stop).await?;
        if let Some(reason) = watcher.failure() {
            // A non-zero exit: systemd restarts us, and the store's check at open decides.
            bail!("{reason}");
        }
        let s = engine.stats();
        info!(
            guest_pull_layers = s.guest_pull_layers.load(Ordering::Relaxed),
            recovered_parents = s.recovered_parents.load(Ordering::Relaxed),
            plain_chains_as_guest_pull = s.plain_chains_as_guest_pull.load(Ordering::Relaxed),
            "stopped"
        );
        Ok(())
    })
}
