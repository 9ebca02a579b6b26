//! The attestation-agent (AA), both sides of its ttrpc API.
//!
//! - [`client`]: the CDH side. Evidence from a running AA (`GetTeeType`, `GetEvidence`) and the
//!   `PullImage` runtime measurement (`ExtendRuntimeMeasurement`), as CDH calls them.
//! - [`agent`], [`server`]: the AA itself, which kata-agent starts before the CDH
//!   (`/usr/local/bin/attestation-agent`, a symlink to guest-puller): evidence from kbs-client's
//!   attesters, KBS tokens, the runtime event log ([`eventlog`], [`registers`]) and the initdata
//!   check, configured by `aa.toml` ([`config`]).

pub mod agent;
pub mod client;
pub mod config;
pub mod eventlog;
pub mod registers;
pub mod server;

pub use client::AttestationAgent;

/// The file name kata-agent starts the attestation-agent as (`/usr/local/bin/attestation-agent`).
pub const AA_BINARY_NAME: &str = "attestation-agent";

/// Why the attestation-agent cannot start or answer a call.
#[derive(Debug, thiserror::Error)]
pub enum AaError {
    /// `aa.toml` is unreadable, malformed or asks for what is not implemented.
    #[error("attestation-agent config {path}: {reason}")]
    Config {
        /// The file (or where the settings came from).
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The initdata given on the command line is unreadable or invalid.
    #[error(transparent)]
    Initdata(#[from] crate::initdata::InitdataError),
    /// The initdata file named by `--initdata-toml` does not exist.
    #[error("initdata {0}: no such file")]
    InitdataMissing(String),
    /// `--initdata-digest` is not standard base64.
    #[error("--initdata-digest is not standard base64: {0}")]
    InitdataDigest(String),
    /// The initdata is not the one this TEE was launched with, or the platform check failed.
    #[error("the initdata does not bind to this TEE: {0}")]
    Binding(kbs_client::Error),
    /// A token type this agent does not issue (`kbs` is the only one).
    #[error("token type {0:?} is not supported (only \"kbs\")")]
    UnsupportedToken(String),
    /// `GetToken(kbs)` without `[token_configs.kbs]` (or `agent.aa_kbc_params`).
    #[error("no KBS configured for tokens ([token_configs.kbs] url)")]
    NoKbs,
    /// Evidence, a register or the KBS failed.
    #[error(transparent)]
    Kbs(#[from] kbs_client::Error),
    /// An event that cannot go into the event log as one line of three fields.
    #[error("event rejected: {0}")]
    BadEvent(String),
    /// The event log cannot be read, repaired or written.
    #[error("event log {path}: {reason}")]
    EventLog {
        /// The log (or its write-ahead record).
        path: String,
        /// What failed.
        reason: String,
    },
    /// The socket address is not `unix:///…`, or it cannot be bound.
    #[error("attestation socket {addr}: {reason}")]
    Socket {
        /// The address as given.
        addr: String,
        /// What failed.
        reason: String,
    },
}
