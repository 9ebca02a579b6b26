//! The installer's errors; each says what to do about it.

use std::path::PathBuf;

/// Why an install or uninstall stopped.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file (as seen by the installer, host root included).
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// containerd's config cannot take guest pull as it is.
    #[error("containerd config: {0}")]
    Config(String),
    /// The node is not one guest pull can be installed on without the user's consent.
    #[error("refused: {0}")]
    Refused(String),
    /// A host command failed.
    #[error("{command}: {message}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed or why it could not run.
        message: String,
    },
    /// Waiting for a service or plugin gave up.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The merged config has problems `check-containerd-config` calls errors.
    #[error("the merged containerd config fails check-containerd-config (the original config was put back):\n{0}")]
    Lint(String),
    /// The journal of an earlier install is unreadable.
    #[error("install journal {path}: {message}")]
    Journal {
        /// The journal file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A bug: an invariant of the installer itself broke.
    #[error("internal error: {0}")]
    Internal(String),
}

impl DeployError {
    /// An [`DeployError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> DeployError {
        DeployError::Io {
            path: path.into(),
            source,
        }
    }
}
