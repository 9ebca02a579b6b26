//! `guestpull-keyprovider`: the ocicrypt key provider image owners use to encrypt images for
//! guestpull (CoCo's `coco_keyprovider` job). Layer keys are wrapped with a 32-byte KEK into
//! AnnotationPackets whose `kid` names the KBS resource the guest fetches the KEK from.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use guest_puller::keyprovider::{parse_kid, Kek, KekFile, KeyProvider, KeysDir, DEFAULT_PROVIDER};
use guestpull_keyprovider::{register_kek, serve_grpc};

#[derive(Parser)]
#[command(
    name = "guestpull-keyprovider",
    version,
    about = "ocicrypt key provider: wrap image layer keys with a KEK held by the KBS"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// One request on stdin, the reply on stdout (ocicrypt `{"cmd":{"path":…,"args":["cmd",…]}}`).
    Cmd {
        /// File with the 32-byte KEK.
        #[arg(long)]
        kek_file: PathBuf,
        /// Key id of that KEK (`kbs:///<repo>/<type>/<tag>`); used when the recipient names none,
        /// and recipients naming another key id are refused.
        #[arg(long)]
        kid: Option<String>,
        /// Provider name in the recipient (`provider:<NAME>:<kid>`) and OCICRYPT_KEYPROVIDER_CONFIG.
        #[arg(long, default_value = DEFAULT_PROVIDER)]
        provider: String,
    },
    /// Serve keyprovider.KeyProviderService over gRPC (ocicrypt `{"grpc":"host:port"}`).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:50000")]
        listen: String,
        /// KEKs laid out like the KBS: `<DIR>/<repo>/<type>/<tag>` holds the KEK of `kbs:///<repo>/<type>/<tag>`.
        #[arg(long)]
        keys_dir: PathBuf,
        /// Provider name in the recipient (`provider:<NAME>:<kid>`).
        #[arg(long, default_value = DEFAULT_PROVIDER)]
        provider: String,
    },
    /// Upload a KEK to a KBS as resource `<kid>` (admin endpoint `POST /kbs/v0/resource/…`).
    Register {
        /// KBS base URL, e.g. `https://kbs.example:8080`.
        #[arg(long)]
        kbs_url: String,
        /// File with the 32-byte KEK.
        #[arg(long)]
        kek_file: PathBuf,
        /// Key id (`kbs:///<repo>/<type>/<tag>`) the images' AnnotationPackets name.
        #[arg(long)]
        kid: String,
        /// File with the KBS admin bearer token (trustee: a JWT signed with its admin key).
        #[arg(long)]
        admin_token_file: Option<PathBuf>,
        /// PEM CA certificate for an HTTPS KBS with a private CA.
        #[arg(long)]
        kbs_ca_file: Option<PathBuf>,
    },
    /// Create a new random 32-byte KEK file (mode 0600; an existing file is never overwritten).
    GenKek {
        /// Where to write the KEK.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    // stdout carries the protocol reply in cmd mode, so logs go to stderr.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GUESTPULL_KEYPROVIDER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match Cli::parse().mode {
        Mode::Cmd {
            kek_file,
            kid,
            provider,
        } => {
            let kid = kid.as_deref().map(parse_kid).transpose()?;
            let kp = KeyProvider::new(provider, Box::new(KekFile::load(&kek_file, kid)?));
            let mut input = zeroize::Zeroizing::new(Vec::new());
            std::io::stdin()
                .read_to_end(&mut input)
                .context("reading the request from stdin")?;
            let out = zeroize::Zeroizing::new(kp.handle_json(&input)?);
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&out).context("writing the reply")?;
            stdout.flush()?;
        }
        Mode::Serve {
            listen,
            keys_dir,
            provider,
        } => {
            anyhow::ensure!(
                keys_dir.is_dir(),
                "--keys-dir {} is not a directory",
                keys_dir.display()
            );
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                let listener = tokio::net::TcpListener::bind(&listen)
                    .await
                    .with_context(|| format!("listening on {listen}"))?;
                tracing::warn!(
                    addr = %listener.local_addr()?,
                    keys = %keys_dir.display(),
                    "guestpull-keyprovider serving gRPC"
                );
                let kp = Arc::new(KeyProvider::new(provider, Box::new(KeysDir::new(keys_dir))));
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                serve_grpc(kp, listener, async move {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                })
                .await
                .context("gRPC server")
            })?;
        }
        Mode::Register {
            kbs_url,
            kek_file,
            kid,
            admin_token_file,
            kbs_ca_file,
        } => {
            let kid = parse_kid(&kid)?;
            let kek = Kek::from_file(&kek_file)?;
            let token = admin_token_file
                .map(|p| {
                    std::fs::read_to_string(&p)
                        .map(zeroize::Zeroizing::new)
                        .with_context(|| format!("reading {}", p.display()))
                })
                .transpose()?;
            let ca = kbs_ca_file
                .map(|p| std::fs::read(&p).with_context(|| format!("reading {}", p.display())))
                .transpose()?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(register_kek(
                &kbs_url,
                &kid,
                &kek,
                token.as_ref().map(|t| t.as_str()),
                ca.as_deref(),
            ))?;
            eprintln!("registered the KEK as {kid} at {kbs_url}");
        }
        Mode::GenKek { out } => {
            Kek::generate().write_new(&out)?;
            eprintln!("wrote a new 32-byte KEK to {} (mode 0600)", out.display());
        }
    }
    Ok(())
}
