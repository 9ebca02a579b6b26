//! Real containerd daemons (Debian's 1.6.20, and 1.7/2.1 unpacked from trixie/sid) with private state.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::lab::{run_ok, wait_for, Lab};

/// The containerd releases the tests run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerdVersion {
    /// Debian bookworm's containerd 1.6.20 (config version 2).
    V1_6,
    /// Debian trixie's containerd 1.7.24 (config version 2).
    V1_7,
    /// Debian sid's containerd 2.1.9 (config version 3).
    V2_1,
}

/// Where fetch-components.sh unpacks the newer releases.
pub fn lab_cache() -> PathBuf {
    std::env::var_os("GUESTPULL_LAB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/guestpull-lab"))
}

impl ContainerdVersion {
    /// Every version, oldest first.
    pub fn all() -> [ContainerdVersion; 3] {
        [Self::V1_6, Self::V1_7, Self::V2_1]
    }

    /// A short label for test output and namespaces: `1.6`, `1.7`, `2.1`.
    pub fn label(self) -> &'static str {
        match self {
            Self::V1_6 => "1.6",
            Self::V1_7 => "1.7",
            Self::V2_1 => "2.1",
        }
    }

    /// The config file `version` this release wants.
    pub fn config_version(self) -> u32 {
        match self {
            Self::V2_1 => 3,
            _ => 2,
        }
    }

    /// Whether a containerd answers `ctr version` on `socket`.
    pub fn answers(self, socket: &Path) -> bool {
        Command::new(self.bin_dir().join("ctr"))
            .arg("--address")
            .arg(socket)
            .arg("version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Directory holding `containerd`, `ctr` and `containerd-shim-runc-v2` of this release.
    pub fn bin_dir(self) -> PathBuf {
        let dir = match self {
            Self::V1_6 => PathBuf::from("/usr/bin"),
            Self::V1_7 => lab_cache().join("containerd-1.7/usr/bin"),
            Self::V2_1 => lab_cache().join("containerd-2.1/usr/bin"),
        };
        if !dir.join("containerd").is_file() {
            match self {
                Self::V1_6 => panic!("containerd 1.6 is not installed: apt-get install containerd runc (.ci/run does)"),
                _ => panic!(
                    "containerd {} not found in {}: run integration/scripts/fetch-components.sh (.ci/run does)",
                    self.label(),
                    dir.display()
                ),
            }
        }
        dir
    }
}

/// Knobs for the generated config.
#[derive(Debug, Clone, Default)]
pub struct ContainerdOpts {
    /// Keep the CRI plugin (and disable NRI, which wants /var/run/nri).
    pub cri: bool,
    /// Extra environment for the daemon; shims and mount helpers inherit it.
    pub env: Vec<(String, String)>,
}

/// A running containerd with private root, state, sockets and namespace.
pub struct Containerd<'a> {
    lab: &'a Lab,
    version: ContainerdVersion,
    dir: PathBuf,
    config: PathBuf,
    namespace: String,
    env: Vec<(String, String)>,
    /// Where containerd keeps its root (content, snapshots, metadata).
    root: PathBuf,
    /// Started by someone else (a fake node's service manager): never (re)started or stopped here.
    external: bool,
}

impl<'a> Containerd<'a> {
    /// Starts containerd without CRI; `body` is appended to the generated config
    /// (proxy_plugins and plugin tables).
    pub fn start(lab: &'a Lab, version: ContainerdVersion, body: &str) -> Containerd<'a> {
        Self::start_with(lab, version, ContainerdOpts::default(), body)
    }

    /// Starts containerd with `opts`; `body` is appended after the generated top-level keys.
    pub fn start_with(
        lab: &'a Lab,
        version: ContainerdVersion,
        opts: ContainerdOpts,
        body: &str,
    ) -> Containerd<'a> {
        Lab::require_root();
        Lab::require_cmd("runc", "runc");
        // Fails early, naming the fix, when this release is not installed.
        version.bin_dir();
        let dir = lab.join("containerd");
        for sub in ["root", "state", "fifo", "runc"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let mut disabled: Vec<&str> = Vec::new();
        if opts.cri {
            if version != ContainerdVersion::V1_6 {
                disabled.push("io.containerd.nri.v1.nri");
            }
        } else {
            match version {
                ContainerdVersion::V2_1 => disabled.extend([
                    "io.containerd.grpc.v1.cri",
                    "io.containerd.cri.v1.images",
                    "io.containerd.cri.v1.runtime",
                    "io.containerd.podsandbox.controller.v1.podsandbox",
                    "io.containerd.sandbox.controller.v1.shim",
                    "io.containerd.nri.v1.nri",
                ]),
                ContainerdVersion::V1_7 => {
                    disabled.extend(["io.containerd.grpc.v1.cri", "io.containerd.nri.v1.nri"])
                }
                ContainerdVersion::V1_6 => disabled.push("io.containerd.grpc.v1.cri"),
            }
        }
        let disabled = disabled
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let d = dir.display();
        // Top-level keys must precede the first table, or TOML nests them and containerd
        // silently ignores them (lab.md §1).
        let config = format!(
            "version = {v}\nroot = \"{d}/root\"\nstate = \"{d}/state\"\ndisabled_plugins = [{disabled}]\n\n\
             [grpc]\n  address = \"{d}/containerd.sock\"\n[ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\
             [debug]\n  address = \"{d}/debug.sock\"\n  level = \"debug\"\n\n{body}\n",
            v = version.config_version(),
        );
        let config_path = dir.join("config.toml");
        fs::write(&config_path, config).unwrap();
        let c = Containerd {
            lab,
            version,
            root: dir.join("root"),
            dir,
            config: config_path,
            namespace: format!("guestpull-{}", version.label().replace('.', "-")),
            env: opts.env,
            external: false,
        };
        c.restart();
        c
    }

    /// A handle on a containerd someone else runs (e.g. a fake node's service manager), whose
    /// gRPC socket is `<dir>/containerd.sock` and root `root`; `ctr` runs keep their fifos and
    /// runc state under `dir`. Dropping it removes leftover tasks but leaves the daemon running.
    pub fn external(
        lab: &'a Lab,
        version: ContainerdVersion,
        dir: &Path,
        root: &Path,
        config: &Path,
    ) -> Containerd<'a> {
        for sub in ["fifo", "runc"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        Containerd {
            lab,
            version,
            dir: dir.to_path_buf(),
            config: config.to_path_buf(),
            namespace: format!("guestpull-{}", version.label().replace('.', "-")),
            env: Vec::new(),
            root: root.to_path_buf(),
            external: true,
        }
    }

    /// (Re)starts the daemon with the same config and waits for its socket.
    pub fn restart(&self) {
        assert!(
            !self.external,
            "this containerd is run by its node's service manager: restart it there"
        );
        self.lab.stop("containerd");
        let _ = fs::remove_file(self.socket());
        let mut cmd = Command::new(self.version.bin_dir().join("containerd"));
        cmd.arg("--config")
            .arg(&self.config)
            .env("PATH", self.path_env())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        self.lab.spawn("containerd", cmd);
        let sock = self.socket();
        wait_for("containerd's socket", Duration::from_secs(30), || {
            sock.exists() && self.version.answers(&sock)
        });
    }

    /// PATH with this release's binaries (so the matching shim is used) before the system's.
    pub fn path_env(&self) -> String {
        format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            self.version.bin_dir().display()
        )
    }

    /// The release this daemon runs.
    pub fn version(&self) -> ContainerdVersion {
        self.version
    }

    /// The gRPC socket (also the CRI endpoint when CRI is enabled).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// The daemon's private root directory.
    pub fn root(&self) -> PathBuf {
        self.root.clone()
    }

    /// The namespace `ctr` uses by default in these tests.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        self.lab.log("containerd")
    }

    /// The directory holding config, root, state and sockets.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A `ctr` command bound to this daemon and namespace.
    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.version.bin_dir().join("ctr"));
        cmd.arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args)
            .env("PATH", self.path_env());
        cmd
    }

    /// Runs `ctr` with `args` and returns its output, successful or not.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).output().expect("running ctr")
    }

    /// Runs `ctr` with `args`, panicking with its stderr on failure; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        run_ok(&mut self.ctr_cmd(args))
    }

    /// `ctr run --rm` with fifo and runc state kept inside the lab; returns the output.
    pub fn ctr_run(&self, extra: &[&str], image: &str, id: &str, cmd: &[&str]) -> Output {
        let fifo = self.dir.join("fifo");
        let runc = self.dir.join("runc");
        let mut args: Vec<&str> = vec!["run", "--rm"];
        let fifo_s = fifo.to_string_lossy().to_string();
        let runc_s = runc.to_string_lossy().to_string();
        args.extend(["--fifo-dir", &fifo_s, "--runc-root", &runc_s]);
        args.extend(extra);
        args.push(image);
        args.push(id);
        args.extend(cmd);
        self.ctr(&args)
    }
}

impl Drop for Containerd<'_> {
    fn drop(&mut self) {
        // Tasks first, so runc does not leave containers behind the daemon.
        if let Ok(out) = self.ctr_cmd(&["tasks", "ls", "-q"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self
                    .ctr_cmd(&["tasks", "kill", "-s", "SIGKILL", id])
                    .output();
                let _ = self.ctr_cmd(&["tasks", "rm", "-f", id]).output();
            }
        }
        if !self.external {
            self.lab.stop("containerd");
        }
    }
}
