//! `kbs-client`: attest to a KBS and fetch resources from scripts.
//!
//! Exit codes: 0 ok, 1 other error, 2 usage/configuration, 3 policy deny, 4 resource not found,
//! 5 KBS unreachable or TLS certificate untrusted, 6 attestation/authorization failed, 7 decryption failed.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kbs_client::{Client, ClientConfig, Error, KeyAlgorithm, Mode, ResourceUri, Tee};
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(
    name = "kbs-client",
    version,
    about = "Attest to a KBS (RCAR 0.4.0) and fetch secrets"
)]
struct Cli {
    /// KBS base URL, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "KBS_URL")]
    url: String,
    /// Extra PEM CA certificate to trust for HTTPS.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// TEE override: sample, tdx, snp, sev (default: autodetect).
    #[arg(long)]
    tee: Option<Tee>,
    /// init-data TOML file sent with the evidence.
    #[arg(long)]
    init_data: Option<PathBuf>,
    /// TEE key algorithm: ECDH-ES+A256KW-P256 (default) or RSA-OAEP-256.
    #[arg(long, default_value = "ECDH-ES+A256KW-P256")]
    key_algorithm: KeyAlgorithm,
    /// HTTP(S) proxy URL.
    #[arg(long)]
    proxy: Option<String>,
    /// Deadline of each KBS request in seconds, retries included.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Attempts per request on connect errors/5xx (exponential backoff with jitter).
    #[arg(long, default_value_t = 5)]
    retries: u32,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch a resource (kbs:///repo/type/tag) and write its raw bytes to stdout or --output.
    GetResource {
        /// Resource URI, or a bare repo/type/tag path.
        uri: String,
        /// Write to this file (created with mode 0600) instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Use this token (passport mode) instead of attesting; needs --tee-key-file.
        #[arg(long)]
        attestation_token: Option<PathBuf>,
        /// PKCS#8 PEM TEE private key the token was issued for.
        #[arg(long)]
        tee_key_file: Option<PathBuf>,
    },
    /// Attest and print the token.
    Attest {
        /// Also write the TEE private key (PKCS#8 PEM, mode 0600) for a later passport-mode fetch.
        #[arg(long)]
        tee_key_file: Option<PathBuf>,
    },
}

fn write_private(path: &PathBuf, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

fn read(path: &PathBuf, what: &str) -> Result<Zeroizing<Vec<u8>>, Error> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|e| Error::Config(format!("cannot read {what} {}: {e}", path.display())))
}

fn read_text(path: &PathBuf, what: &str) -> Result<Zeroizing<String>, Error> {
    let b = read(path, what)?;
    String::from_utf8(b.to_vec())
        .map(Zeroizing::new)
        .map_err(|_| Error::Config(format!("{what} {} is not UTF-8", path.display())))
}

async fn run(cli: Cli) -> Result<(), Error> {
    let mut cfg = ClientConfig::new(cli.url);
    cfg.extra_ca_pem = match &cli.cert {
        Some(p) => Some(read(p, "CA certificate")?.to_vec()),
        None => None,
    };
    cfg.tee = cli.tee;
    cfg.init_data = match &cli.init_data {
        Some(p) => Some(read_text(p, "init-data")?.to_string()),
        None => None,
    };
    cfg.key_algorithm = cli.key_algorithm;
    cfg.proxy = cli.proxy;
    cfg.deadline = Duration::from_secs(cli.timeout.max(1));
    cfg.timeout = cfg.timeout.min(cfg.deadline);
    cfg.retry.max_attempts = cli.retries.max(1);
    match cli.cmd {
        Cmd::GetResource {
            uri,
            output,
            attestation_token,
            tee_key_file,
        } => {
            let uri = if uri.contains("://") {
                ResourceUri::parse(&uri)?
            } else {
                ResourceUri::parse(&format!("kbs:///{}", uri.trim_start_matches('/')))?
            };
            if attestation_token.is_some() || tee_key_file.is_some() {
                cfg.mode = Mode::Passport {
                    token: match &attestation_token {
                        Some(p) => Some(Zeroizing::new(read_text(p, "token")?.trim().to_string())),
                        None => None,
                    },
                    tee_key_pem: match &tee_key_file {
                        Some(p) => Some(read_text(p, "TEE key")?),
                        None => None,
                    },
                };
            }
            let client = Client::new(cfg)?;
            let data = client.get_resource(&uri).await?;
            let res = match output {
                Some(p) => write_private(&p, &data),
                None => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&data).and_then(|_| out.flush())
                }
            };
            res.map_err(|e| Error::Config(format!("cannot write the resource: {e}")))
        }
        Cmd::Attest { tee_key_file } => {
            let client = Client::new(cfg)?;
            let token = client.attest().await?;
            if let Some(p) = tee_key_file {
                let pem = client.tee_key().to_pkcs8_pem()?;
                write_private(&p, pem.as_bytes()).map_err(|e| {
                    Error::Config(format!("cannot write TEE key {}: {e}", p.display()))
                })?;
            }
            println!("{}", token.as_str());
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kbs-client: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kbs-client: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
