//! The FUSE session holder: a tiny process that keeps each lazy mount's `/dev/fuse` file and
//! its bootstrap (a sealed memfd) open while the guest-puller restarts, so the kernel keeps
//! the mounts connected and queues their requests until a new guest-puller takes them over —
//! the role nydus-snapshotter's supervisor plays for nydusd's failover.
//!
//! Protocol: one `SOCK_SEQPACKET` unix socket (`<work dir>/fuse-holder.sock`, mode 0600, peers
//! must have the holder's uid), one JSON message per packet, file descriptors as
//! `SCM_RIGHTS`. Requests: `put` (an entry: its id, the puller's state as opaque JSON, the
//! FUSE device's `st_dev`, two fds), `drop` (an id) and `list` (answered with one `entry`
//! packet per held entry, carrying its fds, then `end`). The holder knows nothing of the
//! state it keeps, so a new guest-puller release can take over mounts an older one made.
//!
//! Written by hand because no crate offers a fd store outside systemd, and the guest has no
//! systemd. The holder drops an entry whose mount is gone (its `st_dev` no longer appears in
//! `/proc/self/mountinfo`) and exits once it has held nothing for [`IDLE_EXIT`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::net::{
    self, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// The holder's socket, in the puller's work dir.
pub const SOCKET_NAME: &str = "fuse-holder.sock";
/// How long the holder lives holding nothing before it exits.
pub const IDLE_EXIT: Duration = Duration::from_secs(5);
/// Largest packet either side sends (an entry's state is a few KiB).
const MAX_PACKET: usize = 256 << 10;
/// Most entries one holder keeps (one per lazily mounted image).
const MAX_ENTRIES: usize = 4096;
/// Each entry carries the FUSE device and the bootstrap.
const FDS_PER_ENTRY: usize = 2;
/// A peer that stalls mid-request is dropped after this long.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Put {
        id: String,
        dev: u64,
        state: serde_json::Value,
    },
    Drop {
        id: String,
    },
    List,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
enum Reply {
    Ok,
    Entry {
        id: String,
        dev: u64,
        state: serde_json::Value,
    },
    End,
    Error {
        message: String,
    },
}

/// One mount the holder keeps: its id, the puller's state, the FUSE device and the bootstrap.
pub struct Held {
    /// The entry's id (the lazy state dir's name).
    pub id: String,
    /// The puller's state for it, as it was put.
    pub state: serde_json::Value,
    /// The `/dev/fuse` file of the mount's session.
    pub fuse: OwnedFd,
    /// The bootstrap, a sealed memfd.
    pub bootstrap: OwnedFd,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn send(sock: BorrowedFd<'_>, msg: &impl Serialize, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let json = serde_json::to_vec(msg).map_err(io::Error::other)?;
    if json.len() > MAX_PACKET {
        return Err(invalid(format!("holder message of {} bytes", json.len())));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_ENTRY))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(invalid("too many fds for one holder message"));
    }
    let sent = net::sendmsg(
        sock,
        &[IoSlice::new(&json)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if sent != json.len() {
        return Err(io::Error::other("short holder message"));
    }
    Ok(())
}

/// Receives one packet; `None` at EOF.
fn recv<T: for<'de> Deserialize<'de>>(
    sock: BorrowedFd<'_>,
) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_ENTRY))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    if got
        .flags
        .intersects(net::ReturnFlags::TRUNC | net::ReturnFlags::CTRUNC)
    {
        return Err(invalid("truncated holder message"));
    }
    if got.bytes == 0 {
        return Ok(None);
    }
    let msg = serde_json::from_slice(&buf[..got.bytes])
        .map_err(|e| invalid(format!("holder message: {e}")))?;
    Ok(Some((msg, fds)))
}

fn seqpacket_socket() -> io::Result<OwnedFd> {
    Ok(net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Client side: the guest-puller's handle on its holder, which it starts on first use.
pub struct Holder {
    socket: PathBuf,
    program: PathBuf,
    args: Vec<String>,
    // One spawn at a time, so two mounts never start two holders.
    spawn: Mutex<()>,
}

impl Holder {
    /// A holder on `socket`, started when needed as `program args…` (the holder's command
    /// line, e.g. `/proc/self/exe fuse-holder --socket <socket>`).
    pub fn new(socket: PathBuf, program: PathBuf, args: Vec<String>) -> Self {
        Self {
            socket,
            program,
            args,
            spawn: Mutex::new(()),
        }
    }

    /// The holder's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn connect(&self) -> io::Result<OwnedFd> {
        let fd = seqpacket_socket()?;
        net::connect(&fd, &SocketAddrUnix::new(&self.socket)?)?;
        net::sockopt::set_socket_timeout(&fd, net::sockopt::Timeout::Recv, Some(PEER_TIMEOUT))?;
        net::sockopt::set_socket_timeout(&fd, net::sockopt::Timeout::Send, Some(PEER_TIMEOUT))?;
        Ok(fd)
    }

    /// Connects, starting the holder if none answers.
    fn connect_or_start(&self) -> io::Result<OwnedFd> {
        if let Ok(fd) = self.connect() {
            return Ok(fd);
        }
        let _one = self.spawn.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(fd) = self.connect() {
            return Ok(fd);
        }
        self.start()?;
        let deadline = Instant::now() + PEER_TIMEOUT;
        loop {
            match self.connect() {
                Ok(fd) => return Ok(fd),
                Err(e) if Instant::now() > deadline => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "the FUSE holder on {} did not start: {e}",
                            self.socket.display()
                        ),
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn start(&self) -> io::Result<()> {
        use std::os::unix::process::CommandExt;
        // Its own process group, so a signal to the puller's group (a terminal's ^C) does not
        // take the mounts with it; no inherited stdio, so it never holds a log pipe open.
        let mut child = Command::new(&self.program)
            .arg0("guest-puller")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("starting the FUSE holder {}: {e}", self.program.display()),
                )
            })?;
        info!(pid = child.id(), socket = %self.socket.display(), "FUSE holder started");
        // Reaped here while we live; after a restart it is init's (or a subreaper's).
        std::thread::Builder::new()
            .name("fuse-holder-reaper".into())
            .spawn(move || {
                let _ = child.wait();
            })?;
        Ok(())
    }

    /// Hands the holder a mount's FUSE file and bootstrap with the puller's `state`, replacing
    /// any entry of that id.
    pub fn put(
        &self,
        id: &str,
        dev: u64,
        state: serde_json::Value,
        fuse: BorrowedFd<'_>,
        bootstrap: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let req = Request::Put {
            id: id.to_owned(),
            dev,
            state,
        };
        // A holder that was just exiting (idle) closes on us: start a new one once.
        let mut last = None;
        for _ in 0..2 {
            let sock = self.connect_or_start()?;
            match send(sock.as_fd(), &req, &[fuse, bootstrap]).and_then(|()| expect_ok(&sock)) {
                Ok(()) => return Ok(()),
                Err(e) if is_gone(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("FUSE holder gone")))
    }

    /// Lets the holder close an entry's files (its mount is gone). No holder: nothing held.
    pub fn forget(&self, id: &str) -> io::Result<()> {
        let Ok(sock) = self.connect() else {
            return Ok(());
        };
        send(sock.as_fd(), &Request::Drop { id: id.to_owned() }, &[])?;
        expect_ok(&sock)
    }

    /// Every entry the holder keeps (none if no holder runs).
    pub fn list(&self) -> io::Result<Vec<Held>> {
        let sock = match self.connect() {
            Ok(s) => s,
            Err(e) if is_gone(&e) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        send(sock.as_fd(), &Request::List, &[])?;
        let mut out = Vec::new();
        loop {
            match recv::<Reply>(sock.as_fd())? {
                Some((Reply::Entry { id, state, .. }, fds)) => {
                    let [fuse, bootstrap]: [OwnedFd; FDS_PER_ENTRY] = fds
                        .try_into()
                        .map_err(|_| invalid(format!("holder entry {id} without its two fds")))?;
                    out.push(Held {
                        id,
                        state,
                        fuse,
                        bootstrap,
                    });
                }
                Some((Reply::End, _)) => return Ok(out),
                Some((Reply::Error { message }, _)) => return Err(io::Error::other(message)),
                Some((Reply::Ok, _)) => return Err(invalid("unexpected holder reply")),
                None => return Err(io::Error::other("the FUSE holder hung up mid-list")),
            }
        }
    }
}

fn expect_ok(sock: &OwnedFd) -> io::Result<()> {
    match recv::<Reply>(sock.as_fd())? {
        Some((Reply::Ok, _)) => Ok(()),
        Some((Reply::Error { message }, _)) => Err(io::Error::other(message)),
        Some(_) => Err(invalid("unexpected holder reply")),
        None => Err(io::Error::from(io::ErrorKind::ConnectionReset)),
    }
}

/// The holder is not (or no longer) there.
fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
    )
}

struct Entry {
    dev: u64,
    state: serde_json::Value,
    fuse: OwnedFd,
    bootstrap: OwnedFd,
}

/// The `st_dev` of every mount in this mount namespace.
fn mounted_devs() -> io::Result<std::collections::BTreeSet<u64>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(2))
        .filter_map(|mm| {
            let (ma, mi) = mm.split_once(':')?;
            Some(rustix::fs::makedev(ma.parse().ok()?, mi.parse().ok()?))
        })
        .collect())
}

/// Runs the holder on `socket` until it has held nothing for `idle` ([`IDLE_EXIT`] in the
/// binary). Exits at once, successfully, if another holder already serves that socket.
pub fn run(socket: &Path, idle: Duration) -> io::Result<()> {
    let lock_path = socket.with_extension("lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)?;
    // The lock is the holder's identity: with it, a stale socket file is ours to replace;
    // without it, a live holder owns the socket and this one must not orphan its entries.
    let deadline = Instant::now() + Duration::from_secs(2);
    while let Err(e) =
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
    {
        if Instant::now() > deadline {
            info!(socket = %socket.display(), "another FUSE holder serves this socket ({e})");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(socket);
    let listener = seqpacket_socket()?;
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = net::bind(&listener, &SocketAddrUnix::new(socket)?);
    rustix::process::umask(old);
    bound?;
    net::listen(&listener, 64)?;
    // accept() honours SO_RCVTIMEO: the loop wakes to prune and to notice it is idle.
    net::sockopt::set_socket_timeout(&listener, net::sockopt::Timeout::Recv, Some(idle))?;
    let uid = rustix::process::geteuid();
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    let mut idle_since = Instant::now();
    loop {
        match net::accept_with(&listener, SocketFlags::CLOEXEC) {
            Ok(conn) => {
                let peer = net::sockopt::socket_peercred(&conn);
                if peer.map(|c| c.uid) != Ok(uid) {
                    warn!("FUSE holder: refused a peer of another uid");
                } else {
                    let _ = net::sockopt::set_socket_timeout(
                        &conn,
                        net::sockopt::Timeout::Recv,
                        Some(PEER_TIMEOUT),
                    );
                    let _ = net::sockopt::set_socket_timeout(
                        &conn,
                        net::sockopt::Timeout::Send,
                        Some(PEER_TIMEOUT),
                    );
                    if let Err(e) = serve_peer(&conn, &mut entries) {
                        warn!("FUSE holder: {e}");
                    }
                }
            }
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        if let Ok(devs) = mounted_devs() {
            entries.retain(|id, e| {
                let kept = devs.contains(&e.dev);
                if !kept {
                    info!(id, "FUSE holder: mount gone, entry dropped");
                }
                kept
            });
        }
        if !entries.is_empty() {
            idle_since = Instant::now();
        } else if idle_since.elapsed() >= idle {
            // Remove the socket while still holding the lock, so no new holder's is removed.
            let _ = std::fs::remove_file(socket);
            return Ok(());
        }
    }
}

fn serve_peer(conn: &OwnedFd, entries: &mut BTreeMap<String, Entry>) -> io::Result<()> {
    while let Some((req, fds)) = recv::<Request>(conn.as_fd())? {
        match req {
            Request::Put { id, dev, state } => {
                let reply = match <[OwnedFd; FDS_PER_ENTRY]>::try_from(fds) {
                    Err(_) => Reply::Error {
                        message: format!("put {id}: expected {FDS_PER_ENTRY} fds"),
                    },
                    Ok(_) if entries.len() >= MAX_ENTRIES && !entries.contains_key(&id) => {
                        Reply::Error {
                            message: format!("holding {MAX_ENTRIES} mounts already"),
                        }
                    }
                    Ok([fuse, bootstrap]) => {
                        entries.insert(
                            id,
                            Entry {
                                dev,
                                state,
                                fuse,
                                bootstrap,
                            },
                        );
                        Reply::Ok
                    }
                };
                send(conn.as_fd(), &reply, &[])?;
            }
            Request::Drop { id } => {
                entries.remove(&id);
                send(conn.as_fd(), &Reply::Ok, &[])?;
            }
            Request::List => {
                for (id, e) in entries.iter() {
                    let reply = Reply::Entry {
                        id: id.clone(),
                        dev: e.dev,
                        state: e.state.clone(),
                    };
                    send(conn.as_fd(), &reply, &[e.fuse.as_fd(), e.bootstrap.as_fd()])?;
                }
                send(conn.as_fd(), &Reply::End, &[])?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    const IDLE: Duration = Duration::from_millis(300);

    fn temp_file(data: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(data).unwrap();
        f
    }

    fn read_back(fd: OwnedFd) -> Vec<u8> {
        let mut f = File::from(fd);
        f.rewind().unwrap();
        let mut out = Vec::new();
        f.read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn entries_outlive_their_sender_and_go_when_dropped_or_unmounted() {
        let (_dir, server, h, root_dev) = start();
        let sock = h.socket().to_owned();
        let (a, b) = (temp_file(b"fuse-a"), temp_file(b"boot-a"));
        h.put(
            "a",
            root_dev,
            serde_json::json!({"n": 1}),
            a.as_fd(),
            b.as_fd(),
        )
        .unwrap();
        drop((a, b));
        let (c, d) = (temp_file(b"fuse-c"), temp_file(b"boot-c"));
        h.put("c", 0, serde_json::json!({"n": 3}), c.as_fd(), d.as_fd())
            .unwrap();
        // "c" names no mounted device: pruned as soon as its put is done.
        let mut held = h.list().unwrap();
        assert_eq!(
            held.len(),
            1,
            "{:?}",
            held.iter().map(|e| &e.id).collect::<Vec<_>>()
        );
        let a = held.remove(0);
        assert_eq!(a.id, "a");
        assert_eq!(a.state, serde_json::json!({"n": 1}));
        assert_eq!(read_back(a.fuse), b"fuse-a");
        assert_eq!(read_back(a.bootstrap), b"boot-a");
        // Listing hands out copies: the holder keeps its own.
        assert_eq!(h.list().unwrap().len(), 1);
        h.forget("a").unwrap();
        assert!(h.list().unwrap().is_empty());
        // Empty, it exits after its idle time and removes its socket.
        server.join().unwrap().unwrap();
        assert!(!sock.exists());
        assert!(h.list().unwrap().is_empty(), "no holder: nothing held");
        assert!(h.forget("a").is_ok());
    }

    type Server = std::thread::JoinHandle<io::Result<()>>;

    /// A holder on a thread (with a short idle time), a client whose own holder "program"
    /// cannot start, and a device that is mounted (the root filesystem's; 0:0 is not).
    fn start() -> (tempfile::TempDir, Server, Holder, u64) {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join(SOCKET_NAME);
        let server = {
            let sock = sock.clone();
            std::thread::spawn(move || run(&sock, IDLE))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "holder socket never appeared");
            std::thread::sleep(Duration::from_millis(5));
        }
        let h = Holder::new(sock, PathBuf::from("/nonexistent"), Vec::new());
        let root_dev = std::fs::metadata("/").unwrap().dev();
        (dir, server, h, root_dev)
    }

    #[test]
    fn a_second_holder_leaves_the_first_alone() {
        let (_dir, first, h, root_dev) = start();
        let sock = h.socket().to_owned();
        let (a, b) = (temp_file(b"x"), temp_file(b"y"));
        h.put("a", root_dev, serde_json::Value::Null, a.as_fd(), b.as_fd())
            .unwrap();
        // Another holder on the same socket gives up without touching it.
        run(&sock, IDLE).unwrap();
        assert_eq!(h.list().unwrap().len(), 1);
        h.forget("a").unwrap();
        first.join().unwrap().unwrap();
    }
}
