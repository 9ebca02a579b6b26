//! `test-kbs`: the project's test KBS as a standalone server (for manual runs and demos).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use integration::kbs::{ResourcePolicy, TestKbs, TestKbsConfig};

#[derive(Parser)]
#[command(
    name = "test-kbs",
    about = "Test KBS speaking RCAR 0.4.0 (sample evidence only; not a product)"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory holding <repo>/<type>/<tag> resource files.
    #[arg(long)]
    resources: PathBuf,
    /// Policy file (TOML or JSON: mode = "allow-all" | "deny-all" | "allow-listed", allow = [globs]).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Session lifetime in seconds.
    #[arg(long, default_value_t = 300)]
    session_ttl: u64,
    /// Token lifetime in seconds.
    #[arg(long, default_value_t = 300)]
    token_ttl: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let policy = match &args.policy {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            ResourcePolicy::parse(&text).map_err(anyhow::Error::msg)?
        }
        None => ResourcePolicy::AllowAll,
    };
    let mut cfg = TestKbsConfig::new(args.resources);
    cfg.policy = policy;
    cfg.listen = args.listen;
    cfg.session_ttl = Duration::from_secs(args.session_ttl);
    cfg.token_ttl = Duration::from_secs(args.token_ttl);
    let kbs = TestKbs::start(cfg)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!("test KBS listening on {}", kbs.url());
    kbs.wait().await;
    Ok(())
}
