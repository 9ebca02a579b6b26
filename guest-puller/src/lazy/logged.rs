//! A thin FUSE layer over [`Rafs`] that answers every data read from chunks checked by
//! [`ChunkVerifier`], and turns every failed read into `EIO` with one log line naming the file
//! and the chunks involved.
//!
//! Hand-written because nydus logs chunk failures by compressed offset at best, and some of its
//! errors carry kinds fuse-backend-rs would map to other errnos (ENOENT for a chunk missing
//! from the blob meta); a reader must see EIO, and the operator must see which chunk failed.

use std::any::Any;
use std::collections::HashMap;
use std::ffi::CStr;
use std::io::{Error, Result};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions,
    ZeroCopyWriter,
};
use fuse_backend_rs::api::BackendFileSystem;
use nydus_rafs::fs::Rafs;
use tracing::error;

use super::verify::{ChunkBuf, ChunkVerifier};

/// [`Rafs`] with verified reads and chunk-level error reporting.
pub struct LoggedRafs {
    inner: Rafs,
    verifier: ChunkVerifier,
    // Paths of inodes the kernel looked up (it looks up every path before reading it); RAFS
    // v6 keeps no parent pointers to rebuild them from an inode alone.
    paths: Mutex<HashMap<u64, PathBuf>>,
    image: String,
}

impl LoggedRafs {
    /// Wraps `inner`, whose reads `verifier` checks; `image` names it in log lines.
    pub fn new(inner: Rafs, verifier: ChunkVerifier, image: String) -> Self {
        Self {
            inner,
            verifier,
            paths: Mutex::new(HashMap::new()),
            image,
        }
    }

    fn paths(&self) -> std::sync::MutexGuard<'_, HashMap<u64, PathBuf>> {
        self.paths.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BackendFileSystem for LoggedRafs {
    fn mount(&self) -> Result<(Entry, u64)> {
        let (root, max) = self.inner.mount()?;
        self.paths().insert(root.inode, PathBuf::from("/"));
        Ok((root, max))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl FileSystem for LoggedRafs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, opts: FsOptions) -> Result<FsOptions> {
        self.inner.init(opts)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> Result<Entry> {
        let e = self.inner.lookup(ctx, parent, name)?;
        if e.inode != 0 {
            let mut paths = self.paths();
            let base = paths
                .get(&parent)
                .cloned()
                .unwrap_or_else(|| PathBuf::from("/"));
            paths.insert(
                e.inode,
                base.join(std::ffi::OsStr::from_bytes(name.to_bytes())),
            );
        }
        Ok(e)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> Result<usize> {
        let fetch = |at: u64, len: u32| {
            let mut buf = ChunkBuf::new(len as usize);
            self.inner
                .read(ctx, inode, handle, &mut buf, len, at, lock_owner, flags)?;
            Ok(buf.into_inner())
        };
        let read = self.verifier.read(inode, offset, size, w, &fetch);
        read.map_err(|e| {
                let path = self
                    .paths()
                    .get(&inode)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| format!("inode {inode}"));
                let chunk_size = self.verifier.chunk_size();
                let first = offset / chunk_size;
                let last = (offset + u64::from(size.max(1)) - 1) / chunk_size;
                error!(image = %self.image, file = %path, offset, size, chunks = %format!("{first}..={last}"),
                       "lazy read failed, returning EIO: {e}");
                Error::from_raw_os_error(rustix::io::Errno::IO.raw_os_error())
            })
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> Result<(Option<u64>, OpenOptions, Option<u32>)> {
        self.inner.open(ctx, inode, flags, fuse_flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn getxattr(&self, ctx: &Context, inode: u64, name: &CStr, size: u32) -> Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> Result<usize>,
    ) -> Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> Result<usize>,
    ) -> Result<()> {
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn opendir(&self, ctx: &Context, inode: u64, flags: u32) -> Result<(Option<u64>, OpenOptions)> {
        self.inner.opendir(ctx, inode, flags)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> Result<()> {
        self.inner.access(ctx, inode, mask)
    }
}
