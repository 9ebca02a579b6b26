//! The blocking half of the layer pipeline, as three stages on three threads so that
//! decrypting, inflating and writing files overlap on a two-core guest:
//! - **decrypt**: blob size and digest, ocicrypt HMAC and AES-CTR, plaintext digest;
//! - **inflate**: gzip or zstd, counted against the image's size budget;
//! - **write** (the calling thread): the diff_id digest, tar parsing and the staged unpack.
//!
//! Inflating is the single heaviest step; with two stages (checks and inflate on one side,
//! tar on the other) the inflating side was the bottleneck and the writer sat idle a third of
//! the time on the lab machine, so the digests sit on either side of it and the scheduler
//! spreads three stages over the cores.
//!
//! Stages are joined by bounded pipes of [`PIPE_BLOCKS`] blocks of [`BLOCK`] bytes whose
//! buffers go back to their producer, so memory is fixed and no block is allocated per read.
//! The layer only becomes visible after every stage saw the end of the stream with every
//! check passed (the caller renames the staging dir), so overlapping the writes with the
//! checks changes nothing of what may be seen.

use std::cell::{Cell, RefCell};
use std::io::{self, Read};
use std::path::Path;
use std::rc::Rc;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{LayerError, LayerSpec, UnpackBudget};
use crate::decrypt::Compression;
use crate::registry::Hasher;
use crate::unpack::{self, UnpackError, UnpackStats};

/// Bytes per block handed from one stage to the next.
pub const BLOCK: usize = 128 * 1024;
/// Blocks in flight between two stages (with the recycled ones, about 1.5 MiB per layer).
pub const PIPE_BLOCKS: usize = 4;

/// Where one stage's time went.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTime {
    /// Working, or runnable but not scheduled (on a loaded machine the two look alike).
    pub busy: Duration,
    /// Waiting for input: the download, or the stage before.
    pub starved: Duration,
    /// Waiting for the next stage to take a block.
    pub blocked: Duration,
}

impl StageTime {
    /// A stage that started at `started` and waited `starved` for input and `blocked` for output.
    fn since(started: Instant, starved: Duration, blocked: Duration) -> Self {
        StageTime {
            busy: started
                .elapsed()
                .saturating_sub(starved)
                .saturating_sub(blocked),
            starved,
            blocked,
        }
    }
}

/// Where one layer's time went: the stage whose `busy` is close to `wall` is the bottleneck.
#[derive(Debug, Clone, Copy, Default)]
pub struct LayerTimings {
    /// From the start of the blocking pipeline until every check passed and the tar was written.
    pub wall: Duration,
    /// Blob digest, HMAC, AES-CTR and plaintext digest; `starved` is the network.
    pub decrypt: StageTime,
    /// gzip or zstd.
    pub inflate: StageTime,
    /// diff_id digest, tar parsing and file system calls.
    pub write: StageTime,
}

/// First verification failure seen by any reader in the verify stage.
type Failure = Rc<RefCell<Option<String>>>;

fn fail(f: &Failure, msg: String) -> io::Error {
    let mut slot = f.borrow_mut();
    if slot.is_none() {
        *slot = Some(msg.clone());
    }
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Blocking side of the download channel; checks the blob's size (a [`HashReader`] above it
/// checks the digest).
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
    size: u64,
    seen: u64,
    failure: Failure,
    waited: Rc<Cell<Duration>>,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            let t = Instant::now();
            let next = self.rx.blocking_recv();
            self.waited.set(self.waited.get() + t.elapsed());
            match next {
                Some(Ok(b)) => {
                    self.seen += b.len() as u64;
                    if self.seen > self.size {
                        return Err(fail(
                            &self.failure,
                            format!("blob is larger than its descriptor size {}", self.size),
                        ));
                    }
                    self.cur = b;
                }
                Some(Err(e)) => {
                    return Err(fail(&self.failure, format!("download failed: {e}")));
                }
                None => {
                    if self.seen != self.size {
                        return Err(fail(
                            &self.failure,
                            format!("blob truncated: got {} of {} bytes", self.seen, self.size),
                        ));
                    }
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

/// Hashes what passes through and checks the digest at EOF.
struct HashReader<R> {
    inner: R,
    hasher: Option<Hasher>,
    expected: String,
    what: &'static str,
    failure: Failure,
    verified: Rc<Cell<bool>>,
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 {
            if let Some(h) = self.hasher.take() {
                let actual = h.finish();
                if actual != self.expected {
                    return Err(fail(
                        &self.failure,
                        format!(
                            "{} mismatch: expected {}, got {actual}",
                            self.what, self.expected
                        ),
                    ));
                }
                self.verified.set(true);
            }
            return Ok(0);
        }
        if let Some(h) = self.hasher.as_mut() {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// Maps HMAC failures raised inside the decryptor into the shared failure slot.
struct Tap<R> {
    inner: R,
    failure: Failure,
}

impl<R: Read> Read for Tap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::InvalidData {
                fail(&self.failure, e.to_string())
            } else {
                e
            }
        })
    }
}

/// Counts the decompressed tar stream against the image's [`UnpackBudget`]: a gzip bomb stops
/// at the budget, not when the disk is full.
struct Budgeted<R> {
    inner: R,
    budget: Arc<UnpackBudget>,
    exceeded: Rc<Cell<bool>>,
    taken: Rc<Cell<u64>>,
}

impl<R: Read> Read for Budgeted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.budget.take(n as u64) {
            self.taken.set(self.taken.get() + n as u64);
        } else {
            self.exceeded.set(true);
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("uncompressed size exceeds {} bytes", self.budget.limit),
            ));
        }
        Ok(n)
    }
}

fn hash_reader<R: Read>(
    inner: R,
    expected: &str,
    what: &'static str,
    failure: &Failure,
) -> io::Result<(HashReader<R>, Rc<Cell<bool>>)> {
    let hasher = Hasher::for_digest(expected).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unsupported {what} {expected:?}"),
        )
    })?;
    let verified = Rc::new(Cell::new(false));
    Ok((
        HashReader {
            inner,
            hasher: Some(hasher),
            expected: expected.to_string(),
            what,
            failure: failure.clone(),
            verified: verified.clone(),
        },
        verified,
    ))
}

/// A filled block: `buf[..len]` is data; `buf` keeps its full length so that reusing it
/// never zeroes memory again.
struct Block {
    buf: Vec<u8>,
    len: usize,
}

/// The sending end of a pipe between two stages, with the buffers the receiver gave back.
struct PipeOut {
    tx: SyncSender<io::Result<Block>>,
    free: Receiver<Vec<u8>>,
    blocked: Duration,
}

/// How [`PipeOut::pump`] ended.
enum Pumped {
    /// The source reached its end; all of it was sent.
    Done,
    /// The source failed; the error was passed on.
    Failed,
    /// The next stage hung up.
    Gone,
}

impl PipeOut {
    fn send(&mut self, item: io::Result<Block>) -> bool {
        let t = Instant::now();
        let ok = self.tx.send(item).is_ok();
        self.blocked += t.elapsed();
        ok
    }

    /// Sends `src` block by block, passing a read error on to the next stage.
    fn pump(&mut self, src: &mut dyn Read) -> Pumped {
        loop {
            let mut buf = self.free.try_recv().unwrap_or_else(|_| vec![0; BLOCK]);
            let mut len = 0;
            let mut error = None;
            while len < buf.len() {
                match src.read(&mut buf[len..]) {
                    Ok(0) => break,
                    Ok(n) => len += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
            }
            if len > 0 && !self.send(Ok(Block { buf, len })) {
                return Pumped::Gone;
            }
            if let Some(e) = error {
                return if self.send(Err(e)) {
                    Pumped::Failed
                } else {
                    Pumped::Gone
                };
            }
            if len < BLOCK {
                return Pumped::Done;
            }
        }
    }
}

/// The receiving end of a pipe; gives emptied buffers back to the sender.
struct PipeIn {
    rx: Receiver<io::Result<Block>>,
    free: SyncSender<Vec<u8>>,
    cur: Option<Block>,
    pos: usize,
    starved: Duration,
}

impl Read for PipeIn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(b) = &self.cur {
                if self.pos < b.len {
                    let n = buf.len().min(b.len - self.pos);
                    buf[..n].copy_from_slice(&b.buf[self.pos..self.pos + n]);
                    self.pos += n;
                    return Ok(n);
                }
            }
            if let Some(b) = self.cur.take() {
                let _ = self.free.try_send(b.buf);
            }
            let t = Instant::now();
            let next = self.rx.recv();
            self.starved += t.elapsed();
            match next {
                Ok(Ok(b)) => {
                    self.cur = Some(b);
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                // The stage before is done: the end of the stream.
                Err(_) => return Ok(0),
            }
        }
    }
}

/// A bounded pipe between two stages.
fn pipe() -> (PipeOut, PipeIn) {
    let (tx, rx) = sync_channel(PIPE_BLOCKS);
    let (give_back, free) = sync_channel(PIPE_BLOCKS + 1);
    (
        PipeOut {
            tx,
            free,
            blocked: Duration::ZERO,
        },
        PipeIn {
            rx,
            free: give_back,
            cur: None,
            pos: 0,
            starved: Duration::ZERO,
        },
    )
}

/// What the decrypt stage found.
struct DecryptVerdict {
    /// First integrity failure (digest, size, HMAC, download).
    failure: Option<String>,
    /// Every check ran to the end of the blob and passed.
    complete: bool,
    time: StageTime,
}

/// The decrypt stage: reads the download through the blob digest, HMAC, AES-CTR and the
/// plaintext digest. It always reads the blob to its end unless a check failed, so that a
/// corrupted blob is reported as such, not as the gzip or tar error it causes downstream.
fn decrypt_stage(
    rx: mpsc::Receiver<io::Result<Bytes>>,
    spec: &LayerSpec,
    mut out: PipeOut,
) -> Result<DecryptVerdict, LayerError> {
    let started = Instant::now();
    let failure: Failure = Rc::new(RefCell::new(None));
    let waited = Rc::new(Cell::new(Duration::ZERO));
    let integrity = |e: io::Error| LayerError::Integrity {
        layer: spec.digest.clone(),
        reason: e.to_string(),
    };
    let channel = ChannelReader {
        rx,
        cur: Bytes::new(),
        size: spec.size,
        seen: 0,
        failure: failure.clone(),
        waited: waited.clone(),
    };
    // Under the HashReader, the size check runs first at the end of the stream, as a truncated
    // blob should be reported as truncated rather than as a digest mismatch.
    let (raw, blob_ok) =
        hash_reader(channel, &spec.digest, "blob digest", &failure).map_err(integrity)?;
    let mut checks = vec![blob_ok];
    let mut plain: Box<dyn Read> = match &spec.key {
        Some(key) => {
            let dec = Tap {
                inner: key.decryptor(raw),
                failure: failure.clone(),
            };
            match &key.plain_digest {
                Some(d) => {
                    let (r, ok) = hash_reader(dec, d, "decrypted layer digest", &failure)
                        .map_err(integrity)?;
                    checks.push(ok);
                    Box::new(r)
                }
                None => Box::new(dec),
            }
        }
        None => Box::new(raw),
    };
    if let Pumped::Gone = out.pump(&mut plain) {
        // Only a failed stage hangs up early; the checks still run to the end.
        if failure.borrow().is_none() {
            let _ = io::copy(&mut plain, &mut io::sink());
        }
    }
    drop(out.tx);
    let starved = waited.get();
    let failure = failure.borrow_mut().take();
    Ok(DecryptVerdict {
        failure,
        complete: checks.iter().all(|c| c.get()),
        time: StageTime::since(started, starved, out.blocked),
    })
}

#[derive(Clone)]
struct SharedPipe(Rc<RefCell<PipeIn>>);

impl Read for SharedPipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

/// The inflate stage: decompresses, counting against the image's budget. When inflating
/// fails or the writer hangs up, it keeps reading (and dropping) its input so that the
/// decrypt stage finishes its checks.
fn inflate_stage(
    input: PipeIn,
    spec: &LayerSpec,
    diff_hasher: Hasher,
    mut out: PipeOut,
) -> Result<InflateVerdict, LayerError> {
    let started = Instant::now();
    let input = SharedPipe(Rc::new(RefCell::new(input)));
    let handle = input.clone();
    let tar: Box<dyn Read> = match spec.compression {
        Compression::None => Box::new(input),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(
            io::BufReader::with_capacity(64 * 1024, input),
        )),
        Compression::Zstd => match zstd::stream::read::Decoder::new(input) {
            Ok(d) => Box::new(d),
            Err(e) => {
                let _ = out.send(Err(io::Error::other(format!("zstd: {e}"))));
                Box::new(io::empty())
            }
        },
    };
    let exceeded = Rc::new(Cell::new(false));
    let taken = Rc::new(Cell::new(0));
    let tar = Budgeted {
        inner: tar,
        budget: spec.budget.clone(),
        exceeded: exceeded.clone(),
        taken: taken.clone(),
    };
    let failure: Failure = Rc::new(RefCell::new(None));
    let diff_ok = Rc::new(Cell::new(false));
    let mut tar = HashReader {
        inner: tar,
        hasher: Some(diff_hasher),
        expected: spec.diff_id.clone(),
        what: "diff_id",
        failure: failure.clone(),
        verified: diff_ok.clone(),
    };
    // After a failure, what is left only feeds the decrypt stage's checks; after the end
    // of the stream this reads nothing.
    out.pump(&mut tar);
    let _ = io::copy(&mut handle.clone(), &mut io::sink());
    drop(out.tx);
    let starved = handle.0.borrow().starved;
    let time = StageTime::since(started, starved, out.blocked);
    let failure = failure.borrow_mut().take();
    Ok(InflateVerdict {
        exceeded: exceeded.get(),
        taken: taken.get(),
        failure,
        complete: diff_ok.get(),
        time,
    })
}

/// What the inflate stage found.
struct InflateVerdict {
    /// The image's size budget ran out.
    exceeded: bool,
    /// Bytes taken from the image's size budget.
    taken: u64,
    /// The diff_id did not match.
    failure: Option<String>,
    /// The diff_id was checked over the whole stream.
    complete: bool,
    time: StageTime,
}

/// Whether `e` is ENOSPC or EDQUOT (the work dir is full).
pub fn is_no_space(e: &io::Error) -> bool {
    let no_space = [rustix::io::Errno::NOSPC, rustix::io::Errno::DQUOT];
    e.raw_os_error()
        .is_some_and(|c| no_space.iter().any(|n| n.raw_os_error() == c))
}

fn joined<T>(
    h: std::thread::ScopedJoinHandle<'_, Result<T, LayerError>>,
    what: &str,
) -> Result<T, LayerError> {
    h.join()
        .map_err(|_| LayerError::Store(io::Error::other(format!("layer {what} stage panicked"))))?
}

/// Runs the blocking part of the pipeline for one layer into `staging`: the decrypt and
/// inflate stages on threads of their own, the write stage on the calling thread.
pub fn process_layer(
    rx: mpsc::Receiver<io::Result<Bytes>>,
    spec: &LayerSpec,
    staging: &Path,
) -> Result<(UnpackStats, LayerTimings), LayerError> {
    let started = Instant::now();
    let layer = spec.digest.clone();
    // Fails before anything runs when the config names an unsupported digest.
    let diff_hasher = Hasher::for_digest(&spec.diff_id).ok_or_else(|| LayerError::Integrity {
        layer: layer.clone(),
        reason: format!("unsupported diff_id {:?}", spec.diff_id),
    })?;
    let (plain_out, plain_in) = pipe();
    let (tar_out, tar_in) = pipe();
    let mut taken = 0;
    let outcome = std::thread::scope(|s| {
        let spawn = |name: &str| std::thread::Builder::new().name(name.into());
        let decrypt = spawn("layer-decrypt")
            .spawn_scoped(s, move || decrypt_stage(rx, spec, plain_out))
            .map_err(LayerError::Store)?;
        let inflate = spawn("layer-inflate")
            .spawn_scoped(s, move || {
                inflate_stage(plain_in, spec, diff_hasher, tar_out)
            })
            .map_err(LayerError::Store)?;
        let mut reader = tar_in;
        let write_started = Instant::now();
        let result = unpack::unpack(&mut reader, staging).and_then(|(stats, rest)| {
            // Everything after the end-of-archive marker still counts for diff_id (and, in
            // the decrypt stage, for HMAC and digest).
            io::copy(rest, &mut io::sink()).map_err(|source| UnpackError::Io {
                path: "<after end of archive>".into(),
                source,
            })?;
            Ok(stats)
        });
        let write_time = StageTime::since(write_started, reader.starved, Duration::ZERO);
        // Hanging up tells the inflate stage to stop and let the checks finish.
        drop(reader);
        let inflated = joined(inflate, "inflate")?;
        taken = inflated.taken;
        let verdict = joined(decrypt, "decrypt")?;
        if let Some(reason) = verdict.failure {
            return Err(LayerError::Integrity { layer, reason });
        }
        if inflated.exceeded {
            return Err(LayerError::TooLarge {
                layer,
                limit: spec.budget.limit,
                why: spec.budget.why,
            });
        }
        if let Some(reason) = inflated.failure {
            return Err(LayerError::Integrity { layer, reason });
        }
        let stats = result.map_err(|source| match &source {
            UnpackError::Io { source: io, .. } if is_no_space(io) => LayerError::NoSpace {
                layer: layer.clone(),
                source,
            },
            _ => LayerError::Unpack {
                layer: layer.clone(),
                source,
            },
        })?;
        if !verdict.complete || !inflated.complete {
            return Err(LayerError::Integrity {
                layer,
                reason: "stream ended before all integrity checks ran".into(),
            });
        }
        let timings = LayerTimings {
            wall: started.elapsed(),
            decrypt: verdict.time,
            inflate: inflated.time,
            write: write_time,
        };
        Ok((stats, timings))
    });
    if outcome.is_err() {
        spec.budget.give_back(taken);
    }
    outcome
}
