//! guestpull-deploy: the node installer (DaemonSet entry point, or run by hand on a node).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use deploy::{Exec, Host};

#[derive(Parser)]
#[command(
    name = "guestpull-deploy",
    version,
    about = "Installs the guestpull snapshotter on a node and wires containerd to it, reversibly"
)]
struct Cli {
    /// tracing filter (error, warn, info, debug).
    #[arg(
        long,
        global = true,
        default_value = "info",
        env = "GUESTPULL_DEPLOY_LOG"
    )]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct HostArgs {
    /// Where the node's root is mounted (the DaemonSet mounts it at /host).
    #[arg(long, default_value = "/", env = "GUESTPULL_HOST_ROOT")]
    host_root: PathBuf,
    /// Prepended to every location written and named in configs (a test stand-in for the node).
    #[arg(long, default_value = "", hide = true)]
    prefix: String,
    /// How host commands run: `nsenter` (PID 1's mount namespace) when --host-root is not `/`.
    #[arg(long, value_enum)]
    exec: Option<Exec>,
    /// containerd's systemd unit.
    #[arg(long, default_value = "containerd.service")]
    containerd_unit: String,
    /// Seconds to wait for the snapshotter and for containerd.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

impl HostArgs {
    fn host(&self) -> Host {
        let exec = self
            .exec
            .unwrap_or(if self.host_root == std::path::Path::new("/") {
                Exec::Direct
            } else {
                Exec::Nsenter
            });
        Host {
            root: self.host_root.clone(),
            prefix: self.prefix.clone(),
            exec,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Installs (or finishes an interrupted install); a rerun changes nothing.
    Install {
        #[command(flatten)]
        host: HostArgs,
        /// Kata runtime handlers whose pods pull in the guest (comma-separated).
        #[arg(
            long,
            value_delimiter = ',',
            env = "GUESTPULL_HANDLERS",
            default_value = "kata-qemu-coco-dev,kata-qemu-tdx,kata-qemu-snp"
        )]
        handlers: Vec<String>,
        /// containerd's main config (host path; default /etc/containerd/config.toml).
        #[arg(long)]
        containerd_config: Option<String>,
        /// Move handlers that use nydus-snapshotter to guestpull.
        #[arg(long)]
        migrate_from_nydus: bool,
        /// containerd 1.6: accept guestpull as the snapshotter of every CRI pod.
        #[arg(long)]
        allow_global_snapshotter: bool,
        /// Directory holding guestpull-snapshotter and nydus-overlayfs (default: beside this binary).
        #[arg(long)]
        payload_dir: Option<PathBuf>,
        /// Platform for containerd 2.x's runtime_platforms and unpack entries.
        #[arg(long)]
        platform: Option<String>,
        /// Written once containerd serves the plugin (the DaemonSet's readiness probe checks it).
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Stay running after the install until SIGTERM (a DaemonSet container).
        #[arg(long)]
        wait: bool,
    },
    /// Reverses install: configs restored, containerd restarted, unit and binaries removed.
    Uninstall {
        #[command(flatten)]
        host: HostArgs,
        /// Also delete the snapshotter's state directory.
        #[arg(long)]
        remove_state: bool,
        /// Removed first, so the pod stops being ready.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Exits 0 when the install finished (readiness probe).
    Ready {
        /// The file `install --ready-file` writes.
        #[arg(long)]
        ready_file: PathBuf,
    },
}

fn platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        a => a,
    };
    format!("linux/{arch}")
}

/// Blocks until SIGTERM or SIGINT. std has no signal wait, and tokio for one call would be
/// most of this binary.
fn wait_for_termination() {
    // SAFETY: plain libc signal-set calls on local storage; the signals are blocked first so
    // sigwait receives them instead of the default action.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log_level))
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::Install {
            host,
            handlers,
            containerd_config,
            migrate_from_nydus,
            allow_global_snapshotter,
            payload_dir,
            platform: plat,
            ready_file,
            wait,
        } => {
            if let Some(f) = &ready_file {
                let _ = std::fs::remove_file(f);
            }
            let payload_dir = match payload_dir {
                Some(d) => d,
                None => std::env::current_exe()
                    .context("locating this binary")?
                    .parent()
                    .context("this binary's directory")?
                    .to_path_buf(),
            };
            if handlers.iter().any(|h| h.is_empty()) {
                bail!("--handlers has an empty name");
            }
            let out = deploy::install(&deploy::Options {
                host: host.host(),
                containerd_config,
                handlers,
                migrate_from_nydus,
                allow_global_snapshotter,
                payload_dir,
                containerd_unit: host.containerd_unit.clone(),
                timeout: Duration::from_secs(host.timeout),
                platform: plat.unwrap_or_else(platform),
            })?;
            for r in &out.report {
                tracing::info!("{r}");
            }
            tracing::info!(
                containerd = %out.containerd_version,
                handlers = %out.handlers.join(","),
                written = out.written.len(),
                restarted_containerd = out.restarted_containerd,
                "guest pull installed"
            );
            if let Some(f) = &ready_file {
                if let Some(d) = f.parent() {
                    std::fs::create_dir_all(d).with_context(|| d.display().to_string())?;
                }
                std::fs::write(f, format!("containerd {}\n", out.containerd_version))
                    .with_context(|| f.display().to_string())?;
            }
            if wait {
                wait_for_termination();
                tracing::info!("terminating; the install stays (uninstall removes it)");
            }
        }
        Cmd::Uninstall {
            host,
            remove_state,
            ready_file,
        } => {
            if let Some(f) = &ready_file {
                let _ = std::fs::remove_file(f);
            }
            let out = deploy::uninstall(&deploy::UninstallOptions {
                host: host.host(),
                containerd_unit: host.containerd_unit.clone(),
                remove_state,
                timeout: Duration::from_secs(host.timeout),
            })?;
            if !out.found {
                tracing::info!(
                    "no install journal: containerd's config was not touched by guestpull-deploy"
                );
            }
            tracing::info!(files = out.files.len(), "guest pull uninstalled");
        }
        Cmd::Ready { ready_file } => {
            if !ready_file.is_file() {
                bail!(
                    "{} not written yet: the install has not finished",
                    ready_file.display()
                );
            }
        }
    }
    Ok(())
}
