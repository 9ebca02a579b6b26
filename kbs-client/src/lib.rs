//! KBS client for Confidential Containers guests: RCAR attestation (protocol 0.4.0) to a
//! trustee-compatible Key Broker Service and retrieval of encrypted resources.
//!
//! ```no_run
//! # async fn f() -> Result<(), kbs_client::Error> {
//! let client = kbs_client::Client::new(kbs_client::ClientConfig::new("http://127.0.0.1:8080"))?;
//! let key = client.get_resource(&"kbs:///default/key/k1".parse()?).await?;
//! # Ok(()) }
//! ```

pub mod attester;
pub mod client;
pub mod config;
pub mod error;
pub mod jwe;
pub mod keys;
pub mod protocol;
pub mod token;
pub mod uri;

pub use client::Client;
pub use config::{ClientConfig, HardwarePaths, KeyAlgorithm, Mode, RetryPolicy, Tee};
pub use error::{Error, ErrorKind, Result, UriError};
pub use keys::TeeKeyPair;
pub use token::Token;
pub use uri::ResourceUri;

/// Re-export of the wire types crate, so callers (and the test KBS) use the same version.
pub use kbs_types;
