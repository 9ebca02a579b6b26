//! Serving the Snapshots API on a unix socket, the way production proxy snapshotters do.

use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use tracing::info;

use crate::api::snapshots::snapshots_server::SnapshotsServer;
use crate::service::GuestPullService;

/// Socket setup or serving failure.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Something other than a socket sits at the address; we refuse to delete it.
    #[error("{0} exists and is not a socket; refusing to remove it")]
    NotASocket(PathBuf),
    /// A filesystem step failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> ServerError {
    move |source| ServerError::Io { context, source }
}

/// Creates the socket directory (0700), removes a stale socket (only if it is one),
/// binds, and chowns the socket to `uid:gid` when given.
pub fn bind(
    address: &Path,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<UnixListener, ServerError> {
    if let Some(dir) = address.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(format!("creating {}", dir.display())))?;
        }
    }
    match std::fs::symlink_metadata(address) {
        Ok(md) if md.file_type().is_socket() => {
            std::fs::remove_file(address)
                .map_err(io(format!("removing stale socket {}", address.display())))?;
            info!(address = %address.display(), "removed stale socket");
        }
        Ok(_) => return Err(ServerError::NotASocket(address.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(format!("inspecting {}", address.display()))(e)),
    }
    let listener =
        UnixListener::bind(address).map_err(io(format!("binding {}", address.display())))?;
    std::fs::set_permissions(address, std::fs::Permissions::from_mode(0o660))
        .map_err(io(format!("chmod {}", address.display())))?;
    if uid.is_some() || gid.is_some() {
        rustix::fs::chown(
            address,
            uid.map(rustix::fs::Uid::from_raw),
            gid.map(rustix::fs::Gid::from_raw),
        )
        .map_err(|e| ServerError::Io {
            context: format!("chown {}", address.display()),
            source: e.into(),
        })?;
    }
    Ok(listener)
}

/// Serves until `shutdown` resolves, then removes the socket.
pub async fn serve(
    service: GuestPullService,
    listener: UnixListener,
    address: &Path,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let result = Server::builder()
        .add_service(SnapshotsServer::new(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(address);
    result.map_err(ServerError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_non_socket_and_replaces_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("sub/snap.sock");
        let l = bind(&sock, None, None).unwrap();
        let mode = std::fs::metadata(sock.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        drop(l);
        // stale socket file is still there: replaced
        bind(&sock, None, None).unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(matches!(
            bind(&file, None, None),
            Err(ServerError::NotASocket(_))
        ));
        assert!(file.exists(), "a regular file is never removed");
        // chown to our own ids exercises the configured uid/gid path without root.
        use std::os::unix::fs::MetadataExt;
        let me = std::fs::metadata(dir.path()).unwrap();
        let owned = dir.path().join("owned.sock");
        bind(&owned, Some(me.uid()), Some(me.gid())).unwrap();
        let md = std::fs::symlink_metadata(&owned).unwrap();
        assert_eq!((md.uid(), md.gid()), (me.uid(), me.gid()));
        assert_eq!(md.permissions().mode() & 0o777, 0o660);
    }
}
