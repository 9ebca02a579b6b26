//! Error kinds: every library error of the puller says what kind of failure it is, so the
//! servers map errors to status codes through one table (`api::server::codes`) and never
//! by reading error text.
//!
//! The kinds of errors defined elsewhere in the crate are assigned here, in one place, so a
//! review of the classification reads one file.

use crate::bundle::BundleError;
use crate::config::ConfigError;
use crate::decrypt::DecryptError;
use crate::keyprovider::KeyProviderError;
use crate::layer::LayerError;
use crate::lazy::LazyError;
use crate::policy::PolicyError;
use crate::pull::PullError;
use crate::registry::RegistryError;
use crate::resource::ResourceError;
use crate::unpack::UnpackError;

pub use kbs_client::ErrorKind;

/// Whether a failure of this kind may pass (an outage, a deadline), as opposed to a refusal.
pub fn is_transient(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::Unavailable | ErrorKind::TimedOut)
}

impl PullError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PullError::InvalidArgument(_) => ErrorKind::Invalid,
            PullError::Config(_) => ErrorKind::Precondition,
            PullError::Resource(e) => e.kind(),
            PullError::Registry(e) => e.kind(),
            PullError::Policy(e) => e.kind(),
            PullError::Decrypt(e) => e.kind(),
            PullError::Layer(e) => e.kind(),
            PullError::Bundle(e) => e.kind(),
            PullError::Lazy(e) => e.kind(),
        }
    }
}

impl crate::aa::client::MeasurementError {
    /// What kind of failure this is: the AA refusing or failing, or answering nonsense, is
    /// internal to the guest; no answer in time is a timeout; a broken connection an outage.
    pub fn kind(&self) -> ErrorKind {
        use crate::aa::client::MeasurementError as E;
        match self {
            E::Call {
                source: ttrpc::Error::RpcStatus(_),
                ..
            }
            | E::UnknownResult { .. } => ErrorKind::Internal,
            E::Call { .. } => ErrorKind::Unavailable,
            E::TimedOut { .. } => ErrorKind::TimedOut,
        }
    }
}

impl ResourceError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ResourceError::InvalidUri { .. } => ErrorKind::Invalid,
            ResourceError::Denied { .. } => ErrorKind::Denied,
            ResourceError::NotFound { .. } => ErrorKind::NotFound,
            ResourceError::Failed { .. } => ErrorKind::Unavailable,
            ResourceError::Unconfigured { .. } => ErrorKind::Precondition,
            ResourceError::Kbs { source, .. } => source.kind(),
            ResourceError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => ErrorKind::NotFound,
                std::io::ErrorKind::PermissionDenied => ErrorKind::Denied,
                _ => ErrorKind::of_io(source),
            },
        }
    }
}

impl RegistryError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RegistryError::InvalidReference { .. } => ErrorKind::Invalid,
            RegistryError::Blocked(_) => ErrorKind::Denied,
            RegistryError::DigestMismatch { .. } => ErrorKind::Integrity,
            RegistryError::Unsupported { .. } => ErrorKind::Unsupported,
            RegistryError::Request { kind, .. } => *kind,
            RegistryError::TimedOut { .. } => ErrorKind::TimedOut,
            RegistryError::TooLarge { .. } => ErrorKind::ResourceExhausted,
            RegistryError::Credentials(_) => ErrorKind::Precondition,
            RegistryError::ConsumerGone => ErrorKind::Internal,
        }
    }
}

impl PolicyError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PolicyError::InvalidPolicy(_)
            | PolicyError::InvalidLookaside(_)
            | PolicyError::InvalidKey { .. } => ErrorKind::Precondition,
            PolicyError::Rejected { .. } => ErrorKind::Denied,
            PolicyError::Evaluation { cause, .. } => cause.kind(),
            // A policy whose key is missing or refused is a configuration problem; an outage
            // of the place it lives is not.
            PolicyError::KeyFetch { source, .. } => match source.kind() {
                k if is_transient(k) || k == ErrorKind::ResourceExhausted => k,
                _ => ErrorKind::Precondition,
            },
            PolicyError::SignatureFetch { .. } => ErrorKind::Unavailable,
            PolicyError::Registry(e) => e.kind(),
        }
    }
}

impl DecryptError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DecryptError::NoKeyAnnotation { .. } => ErrorKind::Denied,
            DecryptError::NoKey { transient, .. } => {
                transient.as_ref().map_or(ErrorKind::Denied, |e| e.kind())
            }
            DecryptError::Malformed { .. } => ErrorKind::Invalid,
            DecryptError::UnsupportedCipher { .. } => ErrorKind::Unsupported,
            DecryptError::Packet(e) => e.kind(),
            DecryptError::Kek { source, .. } => source.kind(),
            DecryptError::JweKeyFetch { source, .. } => match source.kind() {
                k if is_transient(k) || k == ErrorKind::ResourceExhausted => k,
                _ => ErrorKind::Precondition,
            },
            DecryptError::JweKeyInvalid { .. } => ErrorKind::Precondition,
        }
    }
}

impl KeyProviderError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            KeyProviderError::BadRequest(_) => ErrorKind::Invalid,
            KeyProviderError::UnknownKey { .. } => ErrorKind::NotFound,
            KeyProviderError::Unwrap { .. } => ErrorKind::Denied,
            KeyProviderError::KekFile { .. } => ErrorKind::Internal,
        }
    }
}

impl LayerError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            LayerError::Integrity { .. } => ErrorKind::Integrity,
            LayerError::Unpack { source, .. } => source.kind(),
            LayerError::MediaType { .. } => ErrorKind::Unsupported,
            LayerError::Store(e) => ErrorKind::of_io(e),
            LayerError::Fetch { source, .. } => source.kind(),
            LayerError::TooLarge { .. }
            | LayerError::TooManyLayers { .. }
            | LayerError::NoSpace { .. } => ErrorKind::ResourceExhausted,
        }
    }
}

impl UnpackError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            UnpackError::Unsafe { .. } | UnpackError::Bad { .. } => ErrorKind::Invalid,
            // A read error of the decompressed stream is bad content; a full disk is not.
            UnpackError::Io { source, .. } => match ErrorKind::of_io(source) {
                ErrorKind::Internal => ErrorKind::Invalid,
                k => k,
            },
        }
    }
}

impl BundleError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            BundleError::Config(_) => ErrorKind::Invalid,
            BundleError::Busy(_) | BundleError::Foreign(_) => ErrorKind::AlreadyExists,
            BundleError::Path { .. } | BundleError::Rootfs(_) => ErrorKind::Invalid,
            BundleError::Mount { source, .. } | BundleError::Io { source, .. } => {
                ErrorKind::of_io(source)
            }
        }
    }
}

impl LazyError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            LazyError::Format(_) => ErrorKind::Unsupported,
            LazyError::Bootstrap { .. } => ErrorKind::Unavailable,
            LazyError::Fetch { source, .. } => source.kind(),
            LazyError::Integrity { .. } => ErrorKind::Integrity,
            LazyError::Decrypt(e) => e.kind(),
            LazyError::Config(_) => ErrorKind::Precondition,
            LazyError::Rafs(_) | LazyError::Fuse(_) => ErrorKind::Internal,
            LazyError::Io { source, .. } => ErrorKind::of_io(source),
        }
    }
}

impl ConfigError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Precondition
    }
}
