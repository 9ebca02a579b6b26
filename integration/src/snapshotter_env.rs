//! Helpers for the guestpull snapshotter's end-to-end tests: the daemon, containerd config
//! bodies per release, and reading snapshots back through `ctr`.

#[path = "cri.rs"]
pub mod cri;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::containerd::{Containerd, ContainerdVersion};
use crate::lab::{bin_path, run_ok, wait_for, Lab};
use crate::registry::Registry;

/// Proxy plugin name used in the tests (the default).
pub const PLUGIN: &str = "guestpull";
/// CRI runtime handler mapped to the snapshotter on 1.7/2.1 (runc underneath).
pub const HANDLER: &str = "guestpull-rt";
/// Label on guest-pull layer markers.
pub const PROXY_LABEL: &str = "containerd.io/snapshot/nydus-proxy-mode";

/// A running `guestpull-snapshotter` owned by a lab.
pub struct SnapshotterDaemon<'a> {
    lab: &'a Lab,
    dir: PathBuf,
    config: PathBuf,
    pid: std::cell::Cell<u32>,
}

impl<'a> SnapshotterDaemon<'a> {
    /// Writes a config (root and socket inside the lab, helper = the workspace's
    /// `nydus-overlayfs`) plus `extra_snapshot` lines for `[snapshot]`, and starts it.
    pub fn start(lab: &'a Lab, extra_snapshot: &str) -> SnapshotterDaemon<'a> {
        let dir = lab.join("snap");
        fs::create_dir_all(&dir).unwrap();
        let helper = bin_path("nydus-overlayfs");
        let config = dir.join("snapshotter.toml");
        fs::write(
            &config,
            format!(
                "root = \"{root}\"\naddress = \"{sock}\"\nlog_level = \"debug\"\n[snapshot]\n\
                 nydus_overlayfs_path = \"{helper}\"\n{extra_snapshot}\n",
                root = dir.join("root").display(),
                sock = dir.join("run/snapshotter.sock").display(),
                helper = helper.display(),
            ),
        )
        .unwrap();
        let d = SnapshotterDaemon {
            lab,
            dir,
            config,
            pid: std::cell::Cell::new(0),
        };
        d.restart();
        d
    }

    /// (Re)starts the daemon (a running one is SIGKILLed first) and waits for its socket.
    pub fn restart(&self) {
        let mut cmd = Command::new(bin_path("guestpull-snapshotter"));
        cmd.arg("--config").arg(&self.config);
        self.pid.set(self.lab.spawn("guestpull-snapshotter", cmd));
        let sock = self.socket();
        wait_for("the snapshotter socket", Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
    }

    /// Starts the daemon expecting it to refuse: waits up to 20 s for it to exit and returns
    /// its output (panics if it is still running, i.e. it served).
    pub fn start_refused(&self) -> std::process::Output {
        self.stop();
        let mut child = Command::new(bin_path("guestpull-snapshotter"))
            .arg("--config")
            .arg(&self.config)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting guestpull-snapshotter");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "the snapshotter started instead of refusing:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    }

    /// Resident set size of the running daemon, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid.get()))
            .expect("the snapshotter is running");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// SIGKILL (a crash).
    pub fn kill9(&self) {
        self.lab.kill("guestpull-snapshotter");
    }

    /// SIGTERM and wait.
    pub fn stop(&self) {
        self.lab.stop("guestpull-snapshotter");
    }

    /// The gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("run/snapshotter.sock")
    }

    /// The state directory.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The daemon's log.
    pub fn log(&self) -> String {
        self.lab.log("guestpull-snapshotter")
    }

    /// Entries of `<root>/snapshots` (snapshot directories).
    pub fn snapshot_dirs(&self) -> Vec<PathBuf> {
        fs::read_dir(self.root().join("snapshots"))
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    }

    /// Stops the daemon and deletes all of its state (simulates a reinstall).
    pub fn wipe_state(&self) {
        self.stop();
        crate::lab::unmount_under(&self.root());
        fs::remove_dir_all(self.root()).unwrap();
    }
}

/// `[proxy_plugins]` (and for 2.1 the transfer unpack entry) for `socket`.
pub fn proxy_body(version: ContainerdVersion, socket: &Path, root: &Path) -> String {
    let mut s = format!(
        "[proxy_plugins]\n  [proxy_plugins.{PLUGIN}]\n    type = \"snapshot\"\n    address = \"{}\"\n",
        socket.display()
    );
    if version == ContainerdVersion::V2_1 {
        s += &format!(
            "    [proxy_plugins.{PLUGIN}.exports]\n      root = \"{}\"\n      enable_remote_snapshot_annotations = \"true\"\n\
             [plugins.\"io.containerd.transfer.v1.local\"]\n\
             \x20 [[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\n    platform = \"linux/amd64\"\n    snapshotter = \"overlayfs\"\n\
             \x20 [[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\n    platform = \"linux/amd64\"\n    snapshotter = \"{PLUGIN}\"\n",
            root.display()
        );
    }
    s
}

/// CRI plugin tables: 1.6 uses guestpull globally (no per-runtime snapshotter there);
/// 1.7/2.1 map runtime handler [`HANDLER`] (runc) to it. Registry over plain HTTP; the sandbox
/// (pause) image is the catalog's `pause`, which `test-images` pushes to `registry`. This sandbox
/// may not lower oom_score_adj (runc fails on the pause container's -998), so CRI clamps it.
pub fn cri_body(version: ContainerdVersion, lab: &Lab, registry: &Registry<'_>) -> String {
    let certs = registry_hosts_dir(lab, registry);
    let certs = certs.display();
    let pause = sandbox_image(registry);
    match version {
        ContainerdVersion::V1_6 => format!(
            "[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{pause}\"\n  restrict_oom_score_adj = true\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"{PLUGIN}\"\n  disable_snapshot_annotations = false\n\
             [plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{certs}\"\n"
        ),
        ContainerdVersion::V1_7 => format!(
            "[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{pause}\"\n  restrict_oom_score_adj = true\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\"\n  disable_snapshot_annotations = false\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{HANDLER}]\n  runtime_type = \"io.containerd.runc.v2\"\n  snapshotter = \"{PLUGIN}\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{certs}\"\n"
        ),
        ContainerdVersion::V2_1 => format!(
            "[plugins.'io.containerd.cri.v1.images']\n  snapshotter = \"overlayfs\"\n  disable_snapshot_annotations = false\n\
             [plugins.'io.containerd.cri.v1.images'.runtime_platforms.{HANDLER}]\n  platform = \"linux/amd64\"\n  snapshotter = \"{PLUGIN}\"\n\
             [plugins.'io.containerd.cri.v1.images'.pinned_images]\n  sandbox = \"{pause}\"\n\
             [plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = \"{certs}\"\n\
             [plugins.'io.containerd.cri.v1.runtime']\n  restrict_oom_score_adj = true\n\
             [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{HANDLER}]\n  runtime_type = \"io.containerd.runc.v2\"\n  snapshotter = \"{PLUGIN}\"\n"
        ),
    }
}

/// A CRI `registry.config_path` directory (`<lab>/certs.d`) whose `hosts.toml` lets containerd
/// reach `registry` over plain HTTP.
pub fn registry_hosts_dir(lab: &Lab, registry: &Registry<'_>) -> PathBuf {
    let certs = lab.join("certs.d");
    let host = registry.host();
    let hdir = certs.join(&host);
    fs::create_dir_all(&hdir).unwrap();
    fs::write(
        hdir.join("hosts.toml"),
        format!(
            "server = \"http://{host}\"\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();
    certs
}

/// The pod sandbox (pause) image: the catalog's `pause`, which `test-images` pushes to `registry`.
pub fn sandbox_image(registry: &Registry<'_>) -> String {
    format!("{}/guestpull/pause:latest", registry.host())
}

/// CRI as kubelet drives it: a host-network pod `name` under runtime `handler`, then
/// CreateContainer + StartContainer of `image`; asserts it exits 0 and returns its log.
pub fn run_through_cri(
    cri: &mut cri::CriClient,
    lab: &Lab,
    name: &str,
    handler: Option<&str>,
    image: &str,
    command: &[&str],
) -> String {
    let logs = lab.join(&format!("pod-logs-{name}"));
    fs::create_dir_all(&logs).unwrap();
    let pod = cri
        .run_pod(name, handler, &logs)
        .unwrap_or_else(|e| panic!("{name}: RunPodSandbox: {e}"));
    let id = cri
        .start_container(&pod, "hello", image, command)
        .unwrap_or_else(|e| panic!("{name}: Create/StartContainer: {e}"));
    let code = cri
        .wait_exited(&id, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let log = cri::log_messages(&pod.log_dir().join("hello.log")).unwrap_or_default();
    assert_eq!(code, 0, "{name}: container exit code; log: {log}");
    cri.remove_container(&id).unwrap();
    cri.remove_pod(&pod).unwrap();
    log
}

/// The runtime handler CRI pulls need on `version` (none on 1.6: global snapshotter).
pub fn handler_for(version: ContainerdVersion) -> Option<&'static str> {
    match version {
        ContainerdVersion::V1_6 => None,
        _ => Some(HANDLER),
    }
}

/// `ctr` against this containerd in namespace `ns`, with `--snapshotter guestpull` for
/// `snapshots` subcommands.
pub fn ctr_ns(ctrd: &Containerd<'_>, ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(ctrd.version().bin_dir().join("ctr"));
    cmd.arg("--address")
        .arg(ctrd.socket())
        .arg("--namespace")
        .arg(ns)
        .args(args)
        .env("PATH", ctrd.path_env());
    cmd
}

/// One row of `ctr snapshots ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRow {
    /// Key in the namespace.
    pub key: String,
    /// Parent key.
    pub parent: String,
    /// Kind as ctr prints it (Committed, Active, View).
    pub kind: String,
}

/// `ctr snapshots --snapshotter guestpull ls` in `ns`.
pub fn list_snapshots(ctrd: &Containerd<'_>, ns: &str) -> Vec<SnapshotRow> {
    let out = run_ok(&mut ctr_ns(
        ctrd,
        ns,
        &["snapshots", "--snapshotter", PLUGIN, "ls"],
    ));
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.len() {
                3 => Some(SnapshotRow {
                    key: f[0].into(),
                    parent: f[1].into(),
                    kind: f[2].into(),
                }),
                2 => Some(SnapshotRow {
                    key: f[0].into(),
                    parent: String::new(),
                    kind: f[1].into(),
                }),
                _ => None,
            }
        })
        .collect()
}

/// Labels of snapshot `key` (`ctr snapshots info`), as containerd reports them.
pub fn snapshot_labels(
    ctrd: &Containerd<'_>,
    ns: &str,
    key: &str,
) -> std::collections::BTreeMap<String, String> {
    let out = run_ok(&mut ctr_ns(
        ctrd,
        ns,
        &["snapshots", "--snapshotter", PLUGIN, "info", key],
    ));
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("ctr snapshots info {key}: {e}: {out}"));
    v.get("Labels")
        .and_then(|l| l.as_object())
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// The mount `ctr snapshots mounts` prints for `key`: (type, source, options).
pub fn snapshot_mount(ctrd: &Containerd<'_>, ns: &str, key: &str) -> (String, String, Vec<String>) {
    let out = run_ok(&mut ctr_ns(
        ctrd,
        ns,
        &["snapshots", "--snapshotter", PLUGIN, "mounts", "/mnt", key],
    ));
    // "mount -t <type> <source> /mnt -o <opts>"
    let f: Vec<&str> = out.split_whitespace().collect();
    assert!(
        f.len() >= 7 && f[0] == "mount" && f[1] == "-t" && f[5] == "-o",
        "unexpected ctr snapshots mounts output ({} mounts?): {out}",
        out.lines().count()
    );
    assert_eq!(out.trim().lines().count(), 1, "exactly one mount: {out}");
    (
        f[2].to_string(),
        f[3].to_string(),
        f[6].split(',').map(String::from).collect(),
    )
}
