//! A private scratch directory per test that owns the daemons it starts and the mounts made under it.

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A test's private directory; daemons spawned through it are stopped and mounts under it
/// unmounted when it is dropped. Set `GUESTPULL_KEEP_LAB=1` to keep the directory for debugging.
pub struct Lab {
    dir: PathBuf,
    children: Mutex<BTreeMap<String, Child>>,
}

impl Lab {
    /// Creates `/tmp/guestpull-it/<name>-<pid>-<n>` (or under `$GUESTPULL_LAB_DIR`).
    pub fn new(name: &str) -> Lab {
        let base = std::env::var_os("GUESTPULL_LAB_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/guestpull-it"));
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = base.join(format!("{name}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating lab dir {dir:?}: {e}"));
        Lab {
            dir,
            children: Mutex::new(BTreeMap::new()),
        }
    }

    /// The lab's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// A tmpfs of `size` (e.g. `12g`) mounted at `<lab>/<rel>`, as the guest's `/run` is; the
    /// lab unmounts it on drop.
    pub fn tmpfs(&self, rel: &str, size: &str) -> PathBuf {
        let dir = self.join(rel);
        fs::create_dir_all(&dir).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(&dir),
        );
        dir
    }

    /// A path inside the lab directory.
    pub fn join(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Where the output of the daemon `name` goes.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// The daemon `name`'s log so far (empty if it has none).
    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// Starts a daemon with stdout and stderr appended to `<lab>/<name>.log`; returns its pid.
    /// A daemon already running under that name is killed first.
    pub fn spawn(&self, name: &str, mut cmd: Command) -> u32 {
        self.kill(name);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))
            .expect("opening daemon log");
        let err = log.try_clone().expect("cloning log fd");
        cmd.stdin(Stdio::null()).stdout(log).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({:?}): {e}", cmd.get_program()));
        let pid = child.id();
        self.children
            .lock()
            .unwrap()
            .insert(name.to_string(), child);
        pid
    }

    /// Whether the daemon `name` is still running.
    pub fn is_running(&self, name: &str) -> bool {
        let mut children = self.children.lock().unwrap();
        match children.get_mut(name) {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the daemon `name` with SIGKILL (a crash) and reaps it.
    pub fn kill(&self, name: &str) {
        if let Some(mut c) = self.children.lock().unwrap().remove(name) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the daemon `name` with SIGTERM, waiting up to 10 s before SIGKILL.
    pub fn stop(&self, name: &str) {
        if let Some(c) = self.children.lock().unwrap().remove(name) {
            terminate(name, c);
        }
    }

    /// Asserts the machine has what a root-only test needs.
    pub fn require_root() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!("this integration test needs root (real mounts, containerd, runc); run it as root, e.g. via `make test`");
        }
    }

    /// Asserts that `cmd` is on PATH, naming the package that provides it.
    pub fn require_cmd(cmd: &str, package: &str) {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
            .unwrap_or(false);
        if !found {
            panic!(
                "`{cmd}` is not installed: install the Debian package `{package}` (.ci/run does)"
            );
        }
    }
}

fn terminate(name: &str, mut c: Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(c.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                eprintln!("lab: {name} ignored SIGTERM for 10 s, killing it");
                let _ = c.kill();
                let _ = c.wait();
                return;
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let children = std::mem::take(&mut *self.children.lock().unwrap());
        // Reverse start order: later daemons (containerd) depend on earlier ones (registry).
        let mut v: Vec<_> = children.into_iter().collect();
        v.reverse();
        for (name, c) in v {
            terminate(&name, c);
        }
        unmount_under(&self.dir);
        if std::env::var_os("GUESTPULL_KEEP_LAB").is_none() && !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("lab: kept {}", self.dir.display());
        }
    }
}

/// Unmounts, deepest first, every mount point at or below `dir` (lazily, so busy ones go too).
pub fn unmount_under(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.to_string_lossy().to_string();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let c = std::ffi::CString::new(p).unwrap();
        // SAFETY: a valid NUL-terminated path.
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo octal.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A free TCP port on 127.0.0.1 (bound and released, so a race is possible but unlikely).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("finding a free port")
}

/// Polls `cond` every 20 ms until it is true, panicking with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Path of a binary built from this workspace (`$GUESTPULL_BIN_DIR`, else the test's target dir).
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("GUESTPULL_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            // Test executables live in target/<profile>/deps; binaries one level up.
            let exe = std::env::current_exe().expect("current_exe");
            let deps = exe.parent().expect("test exe dir");
            if deps.file_name().map(|n| n == "deps").unwrap_or(false) {
                deps.parent().unwrap().to_path_buf()
            } else {
                deps.to_path_buf()
            }
        }
    };
    let p = dir.join(name);
    if !p.is_file() {
        panic!(
            "workspace binary `{name}` not found at {}: run `cargo build --workspace --bins` first (make test does)",
            p.display()
        );
    }
    p
}

/// Generates a 2048-bit RSA key with openssl: the private key (PEM) at `private`, its public
/// half at `public` (the JWE key pairs images are encrypted to).
pub fn rsa_key_pair(private: &Path, public: &Path) {
    run_ok(
        Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(private)
            .arg("2048"),
    );
    run_ok(
        Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(private)
            .arg("-out")
            .arg(public),
    );
}

/// Runs a command to completion, panicking with its stderr if it fails; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {:?}: {e}", cmd.get_program()));
    if !out.status.success() {
        panic!(
            "{:?} failed ({}):\nstdout: {}\nstderr: {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}
