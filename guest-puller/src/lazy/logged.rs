//! A thin FUSE layer over [`Rafs`] that turns every failed data read into `EIO` with one log
//! line naming the file and the chunks involved.
//!
//! Hand-written because nydus logs chunk failures by compressed offset at best, and some of its
//! errors carry kinds fuse-backend-rs would map to other errnos (ENOENT for a chunk missing
//! from the blob meta); a reader must see EIO, and the operator must see which chunk failed.

use std::any::Any;
use std::ffi::CStr;
use std::io::{Error, Result};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions,
    ZeroCopyWriter,
};
use fuse_backend_rs::api::BackendFileSystem;
use nydus_rafs::fs::Rafs;
use nydus_rafs::metadata::RafsSuper;
use tracing::error;

/// [`Rafs`] with chunk-level error reporting on reads.
pub struct LoggedRafs {
    inner: Rafs,
    // A second, read-only view of the same bootstrap for inode → path lookups in log lines.
    sb: RafsSuper,
    chunk_size: u64,
    image: String,
}

impl LoggedRafs {
    /// Wraps `inner`; `sb` is the same bootstrap loaded for lookups, `image` names it in logs.
    pub fn new(inner: Rafs, sb: RafsSuper, image: String) -> Self {
        let chunk_size = u64::from(inner.metadata().chunk_size).max(1);
        Self {
            inner,
            sb,
            chunk_size,
            image,
        }
    }
}

impl BackendFileSystem for LoggedRafs {
    fn mount(&self) -> Result<(Entry, u64)> {
        self.inner.mount()
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
        self.inner.lookup(ctx, parent, name)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(&self, ctx: &Context, inode: u64, handle: Option<u64>) -> Result<(stat64, Duration)> {
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
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
            .map_err(|e| {
                let path = self
                    .sb
                    .path_from_ino(inode)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| format!("inode {inode}"));
                let first = offset / self.chunk_size;
                let last = (offset + u64::from(size.max(1)) - 1) / self.chunk_size;
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
