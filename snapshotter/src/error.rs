//! Errors of the snapshotter library and their exact gRPC codes.
//!
//! containerd's proxy client turns gRPC codes back into `errdefs` errors, and its
//! unpacker and metadata layer branch on them (AlreadyExists → Stat, NotFound → retry,
//! FailedPrecondition tolerated by GC), so each variant maps to one fixed code.

use tonic::{Code, Status};

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure a snapshot operation can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The key or name does not exist (gRPC NotFound).
    #[error("{0}: not found")]
    NotFound(String),
    /// The key or target already exists (gRPC AlreadyExists).
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// The snapshot is in the wrong state for the call (gRPC FailedPrecondition).
    #[error("{0}: failed precondition")]
    FailedPrecondition(String),
    /// The request itself is malformed (gRPC InvalidArgument).
    #[error("{0}: invalid argument")]
    InvalidArgument(String),
    /// The metadata store failed (gRPC Internal).
    #[error("metadata store: {0}")]
    Store(String),
    /// The state is damaged or does not match its directories, so serving it could lose
    /// data (gRPC Internal); the daemon refuses to start or stops serving.
    #[error("refusing to serve: {0}")]
    Unsafe(String),
    /// A filesystem operation failed (gRPC Internal).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Wraps an I/O error with what we were doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The gRPC code containerd expects for this error.
    pub fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::Store(_) | Error::Unsafe(_) | Error::Io { .. } => Code::Internal,
        }
    }
}

/// The text of a caught panic.
pub(crate) fn panic_text(p: &(dyn std::any::Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("panic")
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

macro_rules! store_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Store(e.to_string())
            }
        }
    )*};
}
store_errors!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);
