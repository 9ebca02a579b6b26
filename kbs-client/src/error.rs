//! Client errors, each naming the KBS URL or resource path involved and never a secret.

use std::time::Duration;

/// What kind of failure an error is, so callers map errors to status codes without reading text.
///
/// guest-puller's errors use the same kinds; one table there maps them to ttrpc and gRPC codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request itself is malformed (bad reference, URI, path).
    Invalid,
    /// The named thing does not exist.
    NotFound,
    /// The target already exists or is in use.
    AlreadyExists,
    /// Policy, credentials or attestation refused the request.
    Denied,
    /// The configuration (or a configured resource) is unusable.
    Precondition,
    /// Content or an operation this implementation does not support.
    Unsupported,
    /// Content failed a digest, signature or authentication check.
    Integrity,
    /// A remote service failed or could not be reached; retrying may help.
    Unavailable,
    /// A deadline passed before the operation completed.
    TimedOut,
    /// A size, count or space limit was hit.
    ResourceExhausted,
    /// A local fault that is no caller's doing.
    Internal,
}

impl ErrorKind {
    /// The kind of a local I/O failure: space and time limits are told apart, the rest is ours.
    pub fn of_io(e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::StorageFull | K::QuotaExceeded | K::OutOfMemory | K::FileTooLarge => {
                Self::ResourceExhausted
            }
            K::TimedOut => Self::TimedOut,
            _ => Self::Internal,
        }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Why a resource URI could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UriError {
    /// The string is not a URI at all.
    #[error("invalid resource URI {uri:?}: {reason}")]
    Malformed {
        /// The offending input.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The scheme is not `kbs` or `kbs+<plugin>`.
    #[error(
        "invalid resource URI {uri:?}: scheme must be `kbs` or `kbs+<plugin>`, got {scheme:?}"
    )]
    Scheme {
        /// The offending input.
        uri: String,
        /// The scheme found.
        scheme: String,
    },
    /// The path does not have the segments the plugin needs.
    #[error("invalid resource URI {uri:?}: {reason}")]
    Path {
        /// The offending input.
        uri: String,
        /// What is wrong with the path.
        reason: String,
    },
}

/// Errors returned by [`crate::Client`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client configuration is unusable.
    #[error("invalid kbs-client configuration: {0}")]
    Config(String),

    /// A resource URI was malformed.
    #[error(transparent)]
    Uri(#[from] UriError),

    /// The KBS could not be reached (connect error, timeout or 5xx) after all retries.
    #[error("KBS at {url} is unreachable after {attempts} attempt(s) over {elapsed:?}: {reason}")]
    Unreachable {
        /// The KBS URL (base) that was tried.
        url: String,
        /// How many attempts were made.
        attempts: u32,
        /// Total time spent.
        elapsed: Duration,
        /// The last failure.
        reason: String,
    },

    /// The TLS handshake failed for a reason retrying cannot fix (untrusted or invalid certificate).
    #[error("TLS to KBS at {url} failed: {detail}; if the KBS uses a private CA, pass it as the extra CA certificate (--cert)")]
    Tls {
        /// The KBS URL.
        url: String,
        /// The cause.
        detail: String,
    },

    /// The KBS resource policy refused the resource for this TEE.
    #[error("KBS at {url} denied access to {path} by its resource policy (PolicyDeny): {detail}; check the KBS resource policy allows this TEE and path")]
    PolicyDeny {
        /// The KBS URL.
        url: String,
        /// The resource path.
        path: String,
        /// The KBS error detail.
        detail: String,
    },

    /// The KBS reported a plugin error for the resource: usually it does not exist.
    #[error("KBS at {url} returned no resource for {path}: missing resource or KBS backend error ({detail})")]
    ResourceNotFound {
        /// The KBS URL.
        url: String,
        /// The resource path.
        path: String,
        /// The KBS error detail.
        detail: String,
    },

    /// The KBS does not serve the path at all (404 `PluginNotFound`/`InvalidRequestPath`).
    #[error("KBS at {url} does not serve {path} ({kind}): {detail}")]
    InvalidPath {
        /// The KBS URL.
        url: String,
        /// The request path.
        path: String,
        /// The KBS error type suffix.
        kind: String,
        /// The KBS error detail.
        detail: String,
    },

    /// The RCAR handshake was rejected (evidence not accepted, nonce mismatch, version, ...).
    #[error("attestation to KBS at {url} failed: {detail}")]
    Attestation {
        /// The KBS URL.
        url: String,
        /// The KBS error detail or the local cause.
        detail: String,
    },

    /// The KBS still refused our token after one fresh attestation.
    #[error("KBS at {url} rejected the attestation token for {path} even after re-attesting ({kind}): {detail}")]
    Unauthorized {
        /// The KBS URL.
        url: String,
        /// The resource path.
        path: String,
        /// The KBS error type suffix.
        kind: String,
        /// The KBS error detail.
        detail: String,
    },

    /// The KBS answered with something that does not follow the protocol.
    #[error("protocol error talking to KBS at {url}: {detail}")]
    Protocol {
        /// The KBS URL.
        url: String,
        /// What was wrong.
        detail: String,
    },

    /// Evidence could not be collected from the TEE.
    #[error("cannot collect {tee} evidence: {detail}")]
    Evidence {
        /// The TEE whose evidence failed.
        tee: String,
        /// The cause.
        detail: String,
    },

    /// The encrypted resource could not be decrypted or authenticated.
    #[error("cannot decrypt the KBS response for {path}: {detail}")]
    Decrypt {
        /// The resource path.
        path: String,
        /// The cause (never key material).
        detail: String,
    },

    /// A launch secret (SEV/SEV-ES) is not present in the EFI secret area.
    #[error("launch secret for {path} not found in {dir}: {detail}")]
    LaunchSecretNotFound {
        /// The resource path.
        path: String,
        /// The secrets directory searched.
        dir: String,
        /// The cause.
        detail: String,
    },

    /// The operation does not exist for the selected TEE.
    #[error("{0}")]
    Unsupported(String),

    /// Key generation or key import failed.
    #[error("TEE key error: {0}")]
    Key(String),

    /// A KBS request did not complete within the client's deadline (retries included).
    #[error("KBS request to {url} timed out after {after:?} ({attempts} attempt(s)): {detail}")]
    TimedOut {
        /// The KBS URL (base).
        url: String,
        /// The configured deadline.
        after: Duration,
        /// How many attempts were started.
        attempts: u32,
        /// What was being done when the deadline passed.
        detail: String,
    },

    /// A KBS response body exceeded the client's size limit.
    #[error("KBS at {url} sent a {what} larger than the {limit}-byte limit")]
    TooLarge {
        /// The KBS URL (base).
        url: String,
        /// Which response (resource, error body, `/auth`, `/attest`).
        what: String,
        /// The limit in bytes.
        limit: usize,
    },

    /// The KBS answered with a redirect; the client follows none (a KBS never needs one).
    #[error("KBS at {url} answered HTTP {status} redirecting to {location:?}; redirects are not followed: configure the KBS URL it really serves")]
    Redirect {
        /// The KBS URL (base).
        url: String,
        /// The 3xx status.
        status: u16,
        /// The `Location` header, if any.
        location: String,
    },
}

impl Error {
    /// What kind of failure this is (callers map kinds to status codes).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_) | Error::Redirect { .. } => ErrorKind::Precondition,
            Error::Uri(_) => ErrorKind::Invalid,
            Error::Unreachable { .. } | Error::Tls { .. } | Error::Protocol { .. } => {
                ErrorKind::Unavailable
            }
            Error::PolicyDeny { .. } | Error::Attestation { .. } | Error::Unauthorized { .. } => {
                ErrorKind::Denied
            }
            Error::ResourceNotFound { .. }
            | Error::InvalidPath { .. }
            | Error::LaunchSecretNotFound { .. } => ErrorKind::NotFound,
            Error::Decrypt { .. } => ErrorKind::Integrity,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::Evidence { .. } | Error::Key(_) => ErrorKind::Internal,
            Error::TimedOut { .. } => ErrorKind::TimedOut,
            Error::TooLarge { .. } => ErrorKind::ResourceExhausted,
        }
    }

    /// A stable process exit code for this error class, as documented for the CLI.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::Uri(_) => 2,
            Error::PolicyDeny { .. } => 3,
            Error::ResourceNotFound { .. }
            | Error::InvalidPath { .. }
            | Error::LaunchSecretNotFound { .. } => 4,
            Error::Unreachable { .. }
            | Error::Tls { .. }
            | Error::TimedOut { .. }
            | Error::Redirect { .. } => 5,
            Error::Attestation { .. } | Error::Unauthorized { .. } | Error::Evidence { .. } => 6,
            Error::Decrypt { .. } => 7,
            _ => 1,
        }
    }
}

/// An error and its whole source chain on one line: reqwest's top-level message hides the
/// cause ("error sending request"), which is the part a user needs ("connection refused").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
