//! The strong chunk check of lazy reads: every byte a reader gets comes from a whole chunk whose
//! digest was computed here and matched the chunk table of the bootstrap.
//!
//! Why not nydus' own check: nydus-storage 0.7 validates a chunk by CRC32 alone whenever the
//! blob's chunk-info table carries one (`BlobCache::check_digest`, a provided trait method of
//! its file cache, so it cannot be overridden), upstream `nydus-image` writes those CRCs by
//! default, and that table is read from the blob itself, i.e. from whoever serves the blob
//! (XTS encryption hides it but does not authenticate it). Rather than patching nydus, its
//! storage stack is only the chunk fetcher: a read asks it for the whole chunk, hashes the
//! result with the blob's digester (SHA-256 or BLAKE3) and compares it with the chunk digest
//! in the bootstrap's own chunk table — the bootstrap whose digest the signed manifest pins.
//! A wrong offset, size, flag or CRC in the blob's table can then only cost an `EIO`.

use std::collections::VecDeque;
use std::io::{Error, ErrorKind, Result};
use std::sync::{Arc, Mutex};

use fuse_backend_rs::api::filesystem::ZeroCopyWriter;
use fuse_backend_rs::common::file_buf::FileVolatileSlice;
use fuse_backend_rs::common::file_traits::FileReadWriteVolatile;
use nydus_rafs::metadata::direct_v6::OndiskInodeWrapper;
use nydus_rafs::metadata::{RafsInode, RafsInodeExt, RafsSuper, RafsSuperFlags};
use nydus_utils::digest::{Algorithm, RafsDigest};

/// Verified chunks kept for the next reads (the kernel reads a file in 128 KiB pieces, so a
/// sequential reader asks for each 1 MiB chunk eight times): at most this many bytes, and at
/// least one chunk whatever its size.
const RECENT_BYTES: usize = 8 << 20;

/// Checks lazy reads against the bootstrap's chunk table.
pub struct ChunkVerifier {
    // Loaded without a blob device, so chunk infos come from the bootstrap's chunk table and
    // never from the blob's chunk-info table.
    sb: RafsSuper,
    chunk_size: u64,
    digesters: Vec<Algorithm>,
    blob_ids: Vec<String>,
    recent: Recent,
}

impl ChunkVerifier {
    /// Takes a bootstrap loaded from the verified bootstrap file; refuses an image whose chunks
    /// carry no digest the guest can check.
    pub fn new(sb: RafsSuper) -> std::result::Result<Self, String> {
        if !sb.meta.is_v6() {
            return Err("its bootstrap is not RAFS v6".into());
        }
        if sb.meta.flags.contains(RafsSuperFlags::TARTFS_MODE) {
            return Err("it is a tarfs image, whose chunks carry no digests".into());
        }
        let blobs = sb.superblock.get_blob_infos();
        let has_chunks = blobs.iter().any(|b| b.chunk_count() > 0);
        if has_chunks && sb.meta.chunk_table_size == 0 {
            let why = "its bootstrap has no chunk table, so its chunks have no digest to check";
            return Err(why.into());
        }
        let chunk_size = u64::from(sb.meta.chunk_size);
        if chunk_size == 0 {
            return Err("its bootstrap declares a chunk size of 0".into());
        }
        Ok(Self {
            chunk_size,
            digesters: blobs.iter().map(|b| b.digester()).collect(),
            blob_ids: blobs.iter().map(|b| b.blob_id()).collect(),
            recent: Recent::default(),
            sb,
        })
    }

    /// The image's chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Answers a read of `size` bytes at `offset` of inode `ino` into `w`, chunk by chunk, each
    /// from a verified buffer. `fetch(file_offset, len)` reads the chunk at `file_offset`
    /// through nydus. Anything but a regular file of the image is an error: no read bypasses
    /// the check.
    pub fn read(
        &self,
        ino: u64,
        offset: u64,
        size: u32,
        w: &mut dyn ZeroCopyWriter,
        fetch: &dyn Fn(u64, u32) -> Result<Vec<u8>>,
    ) -> Result<usize> {
        let inode = self.sb.get_inode(ino, false)?;
        // RAFS v6 answers `get_extended_inode` for directories only (regular files have no
        // parent pointer to name them), but the chunk table lookup needs no name.
        let file = inode
            .as_any()
            .downcast_ref::<OndiskInodeWrapper>()
            .filter(|f| RafsInode::is_reg(*f))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidInput,
                    format!("inode {ino} is not a regular file of a RAFS v6 image"),
                )
            })?;
        let file_size = RafsInode::size(file);
        if size == 0 || offset >= file_size {
            return Ok(0);
        }
        let end = file_size.min(offset.saturating_add(u64::from(size)));
        let mut done = 0;
        for idx in offset / self.chunk_size..=(end - 1) / self.chunk_size {
            let base = idx * self.chunk_size;
            let len = self.chunk_size.min(file_size - base);
            let data = self.chunk(file, idx, len, || fetch(base, len as u32))?;
            let from = (offset.max(base) - base) as usize;
            let to = (end.min(base + len) - base) as usize;
            std::io::Write::write_all(w, &data[from..to])?;
            done += to - from;
        }
        Ok(done)
    }

    /// The verified bytes of chunk `idx` of `inode` (`len` bytes of the file).
    fn chunk(
        &self,
        inode: &dyn RafsInodeExt,
        idx: u64,
        len: u64,
        fetch: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Arc<[u8]>> {
        let invalid = |msg: String| Error::new(ErrorKind::InvalidData, msg);
        let info = u32::try_from(idx)
            .map_err(|_| invalid(format!("chunk {idx} is beyond the chunk table")))
            .and_then(|i| inode.get_chunk_info(i))?;
        let blob = info.blob_index() as usize;
        let (Some(&algo), Some(blob_id)) = (self.digesters.get(blob), self.blob_ids.get(blob))
        else {
            return Err(invalid(format!(
                "chunk {idx} names blob index {blob}, which the bootstrap does not have"
            )));
        };
        let want = info.chunk_id().data;
        // The length check keeps a (signed but) inconsistent bootstrap from making the slicing
        // in `read` panic a server thread.
        if let Some(hit) = self
            .recent
            .get(algo, &want)
            .filter(|d| d.len() as u64 == len)
        {
            return Ok(hit);
        }
        if u64::from(info.uncompressed_size()) != len {
            return Err(invalid(format!(
                "chunk {idx} (blob {blob_id} chunk #{}) is {} bytes in the chunk table but \
                 {len} bytes of the file",
                info.id(),
                info.uncompressed_size()
            )));
        }
        let data = fetch()?;
        let got = RafsDigest::from_buf(&data, algo).data;
        if data.len() as u64 != len || got != want {
            return Err(invalid(format!(
                "chunk {idx} (blob {blob_id} chunk #{}): {} digest mismatch: the bootstrap \
                 records {}, the fetched {} bytes hash to {}",
                info.id(),
                algo,
                hex::encode(want),
                data.len(),
                hex::encode(got)
            )));
        }
        let data: Arc<[u8]> = data.into();
        self.recent.put(algo, want, data.clone(), RECENT_BYTES);
        Ok(data)
    }
}

/// The verified chunks read last, keyed by algorithm and digest, so a chunk shared by files
/// (or read in pieces) is hashed once while it stays here.
#[derive(Default)]
struct Recent(Mutex<VecDeque<Verified>>);

/// A verified chunk: its digest algorithm, its digest and its bytes.
type Verified = (Algorithm, [u8; 32], Arc<[u8]>);

impl Recent {
    fn get(&self, algo: Algorithm, digest: &[u8; 32]) -> Option<Arc<[u8]>> {
        let recent = self.0.lock().unwrap_or_else(|e| e.into_inner());
        recent
            .iter()
            .find(|(a, d, _)| *a == algo && d == digest)
            .map(|(_, _, data)| data.clone())
    }

    /// Keeps `data`, dropping the oldest chunks beyond `budget` bytes (but never `data`).
    fn put(&self, algo: Algorithm, digest: [u8; 32], data: Arc<[u8]>, budget: usize) {
        let mut recent = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if recent.iter().any(|(a, d, _)| *a == algo && *d == digest) {
            return;
        }
        let mut bytes: usize = recent.iter().map(|(_, _, d)| d.len()).sum();
        while bytes + data.len() > budget {
            match recent.pop_front() {
                Some((_, _, old)) => bytes -= old.len(),
                None => break,
            }
        }
        recent.push_back((algo, digest, data));
    }
}

/// A [`ZeroCopyWriter`] collecting exactly one chunk's bytes in memory.
pub struct ChunkBuf {
    data: Vec<u8>,
    cap: usize,
}

impl ChunkBuf {
    /// An empty buffer for `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            data: Vec::with_capacity(cap),
            cap,
        }
    }

    /// The bytes collected.
    pub fn into_inner(self) -> Vec<u8> {
        self.data
    }
}

impl std::io::Write for ChunkBuf {
    fn write(&mut self, buf: &[u8]) -> Result<usize> {
        let n = buf.len().min(self.cap - self.data.len());
        self.data.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

impl ZeroCopyWriter for ChunkBuf {
    fn write_from(
        &mut self,
        f: &mut dyn FileReadWriteVolatile,
        count: usize,
        off: u64,
    ) -> Result<usize> {
        let start = self.data.len();
        let count = count.min(self.cap - start);
        self.data.resize(start + count, 0);
        // SAFETY: the slice is the tail of our own buffer, borrowed exclusively for this call
        // and alive until it returns.
        let slice = unsafe { FileVolatileSlice::from_mut_slice(&mut self.data[start..]) };
        match f.read_at_volatile(slice, off) {
            Ok(n) => {
                self.data.truncate(start + n);
                Ok(n)
            }
            Err(e) => {
                self.data.truncate(start);
                Err(e)
            }
        }
    }

    fn available_bytes(&self) -> usize {
        self.cap - self.data.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn chunk_buffers_take_no_more_than_one_chunk() {
        let mut b = ChunkBuf::new(5);
        assert_eq!(b.write(b"abc").unwrap(), 3);
        assert_eq!(b.available_bytes(), 2);
        assert_eq!(b.write(b"defg").unwrap(), 2);
        assert_eq!(b.write(b"h").unwrap(), 0);
        assert_eq!(b.into_inner(), b"abcde");
    }

    #[test]
    fn recent_chunks_stay_within_their_budget_oldest_out_first() {
        let r = Recent::default();
        let chunk = |n: u8| -> Arc<[u8]> { vec![n; 4].into() };
        for n in 0..4u8 {
            r.put(Algorithm::Sha256, [n; 32], chunk(n), 10);
        }
        // 10 bytes hold two 4-byte chunks: the two newest.
        assert!(r.get(Algorithm::Sha256, &[0; 32]).is_none());
        assert!(r.get(Algorithm::Sha256, &[1; 32]).is_none());
        assert_eq!(&*r.get(Algorithm::Sha256, &[3; 32]).unwrap(), &[3; 4]);
        // Same digest, other algorithm: not the same chunk.
        assert!(r.get(Algorithm::Blake3, &[3; 32]).is_none());
        // A chunk larger than the budget is still kept, alone.
        r.put(Algorithm::Sha256, [9; 32], vec![9; 64].into(), 10);
        assert!(r.get(Algorithm::Sha256, &[2; 32]).is_none());
        assert_eq!(r.get(Algorithm::Sha256, &[9; 32]).unwrap().len(), 64);
    }
}
