//! A fake Kubernetes node for the installer tests: a directory playing the node's `/`, holding a
//! containerd config that starts from that release's own `containerd config default` output, a
//! containerd unit, and a `systemctl` that runs units from it (these machines have no systemd).
//! The real containerd runs from it; `guestpull-deploy` installs into it with `--prefix`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use toml_edit::{value, Array, DocumentMut, Item, Table};

use crate::containerd::{Containerd, ContainerdVersion};
use crate::lab::{bin_path, run_ok, wait_for, Lab};
use crate::registry::Registry;
use crate::snapshotter_env::{registry_hosts_dir, sandbox_image};

/// The Kata runtime handler the tests put on guest pull. On these runc hosts it is runc
/// underneath (the local guest stands in for the VM), as a node where kata-deploy has already
/// installed Kata would have it under this name.
pub const KATA_HANDLER: &str = "kata-qemu-coco-dev";
/// containerd's unit on the node.
pub const CONTAINERD_UNIT: &str = "containerd.service";
/// The snapshotter's unit the installer writes.
pub const SNAPSHOTTER_UNIT: &str = "guestpull-snapshotter.service";

/// A fake node with a running containerd.
pub struct Node<'a> {
    lab: &'a Lab,
    version: ContainerdVersion,
    root: PathBuf,
    bin: PathBuf,
}

impl<'a> Node<'a> {
    /// A node at `<lab>/<name>` whose main config is `containerd config default` of `version`
    /// with the edits every site makes (paths inside the node, the registry reachable, the
    /// sandbox image, the Kata handler's runtime) and then `edit`'s own; containerd started with
    /// `env` in its unit (the local guest's helper config), not yet running guestpull.
    pub fn new(
        lab: &'a Lab,
        name: &str,
        version: ContainerdVersion,
        reg: &Registry<'_>,
        env: &[(String, String)],
        edit: impl FnOnce(&Path, &mut DocumentMut),
    ) -> Node<'a> {
        Lab::require_root();
        Lab::require_cmd("runc", "runc");
        let root = lab.join(name);
        let bin = lab.join(&format!("{name}-bin"));
        fs::create_dir_all(&bin).unwrap();
        let systemctl = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fake-systemctl");
        let link = bin.join("systemctl");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&systemctl, &link).unwrap();
        let node = Node {
            lab,
            version,
            root,
            bin,
        };
        // What every node has before any install.
        for d in ["/usr/local/bin", "/etc/systemd/system"] {
            fs::create_dir_all(node.host_path(d)).unwrap();
        }
        let default = run_ok(
            Command::new(version.bin_dir().join("containerd"))
                .args(["config", "default"])
                .env("PATH", node.path_env()),
        );
        let mut doc: DocumentMut = default
            .parse()
            .unwrap_or_else(|e| panic!("containerd {} config default: {e}", version.label()));
        node.site_edits(&mut doc, reg);
        edit(&node.root, &mut doc);
        node.write("/etc/containerd/config.toml", &doc.to_string());

        let mut unit = format!(
            "[Unit]\nDescription=containerd container runtime\n\n[Service]\n\
             ExecStart={} --config {}\nEnvironment=PATH={}\n",
            version.bin_dir().join("containerd").display(),
            node.host_path("/etc/containerd/config.toml").display(),
            node.daemon_path_env(),
        );
        for (k, v) in env {
            unit += &format!("Environment={k}={v}\n");
        }
        unit += "\n[Install]\nWantedBy=multi-user.target\n";
        node.write(&format!("/lib/systemd/system/{CONTAINERD_UNIT}"), &unit);
        run_ok(&mut node.systemctl(&["start", CONTAINERD_UNIT]));
        node.wait_containerd();
        node
    }

    fn site_edits(&self, doc: &mut DocumentMut, reg: &Registry<'_>) {
        let r = self.root.display().to_string();
        doc["root"] = value(format!("{r}/var/lib/containerd"));
        doc["state"] = value(format!("{r}/run/containerd"));
        doc["grpc"]["address"] = value(format!("{r}/run/containerd/containerd.sock"));
        doc["ttrpc"]["address"] = value(format!("{r}/run/containerd/containerd.sock.ttrpc"));
        doc["debug"]["address"] = value(format!("{r}/run/containerd/debug.sock"));
        if self.version != ContainerdVersion::V1_6 {
            // NRI wants the host's /var/run/nri; sites without NRI plugins turn it off.
            let mut disabled = Array::new();
            disabled.push("io.containerd.nri.v1.nri");
            doc["disabled_plugins"] = value(disabled);
        }
        let certs = registry_hosts_dir(self.lab, reg).display().to_string();
        let pause = sandbox_image(reg);
        let kata = || {
            let mut t = Table::new();
            t["runtime_type"] = value("io.containerd.runc.v2");
            Item::Table(t)
        };
        // This sandbox may not lower oom_score_adj (runc fails on the pause container's -998).
        match self.version {
            ContainerdVersion::V2_1 => {
                let images = &mut doc["plugins"]["io.containerd.cri.v1.images"];
                images["pinned_images"]["sandbox"] = value(pause);
                images["registry"]["config_path"] = value(certs);
                let runtime = &mut doc["plugins"]["io.containerd.cri.v1.runtime"];
                runtime["restrict_oom_score_adj"] = value(true);
                runtime["containerd"]["runtimes"][KATA_HANDLER] = kata();
            }
            _ => {
                let cri = &mut doc["plugins"]["io.containerd.grpc.v1.cri"];
                cri["sandbox_image"] = value(pause);
                cri["restrict_oom_score_adj"] = value(true);
                cri["registry"]["config_path"] = value(certs);
                cri["containerd"]["runtimes"][KATA_HANDLER] = kata();
            }
        }
    }

    /// The containerd release the node runs.
    pub fn version(&self) -> ContainerdVersion {
        self.version
    }

    /// The directory playing the node's `/`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the node's `path` (absolute) is.
    pub fn host_path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Writes the node's file `path`.
    pub fn write(&self, path: &str, text: &str) {
        let p = self.host_path(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, text).unwrap();
    }

    /// The node's file `path`, or `None`.
    pub fn read(&self, path: &str) -> Option<Vec<u8>> {
        fs::read(self.host_path(path)).ok()
    }

    /// Every file under the node's `/etc`, `/usr` and `/lib`, and the installer's journal
    /// directory, with its bytes: what an uninstall must leave exactly as it found it.
    pub fn files(&self) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        for d in ["etc", "usr", "lib", "var/lib/guestpull-deploy"] {
            collect(&self.root, &self.root.join(d), &mut out);
        }
        out
    }

    /// PATH for commands run "on the node": the fake systemctl and this release's binaries first.
    pub fn path_env(&self) -> String {
        format!("{}:{}", self.bin.display(), self.daemon_path_env())
    }

    fn daemon_path_env(&self) -> String {
        format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            self.version.bin_dir().display()
        )
    }

    /// The node's `systemctl` with `args`.
    pub fn systemctl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.bin.join("systemctl"));
        cmd.args(args)
            .env("FAKE_SYSTEMD_ROOT", &self.root)
            .env("PATH", self.path_env());
        cmd
    }

    /// Main pid of `unit`, if it runs.
    pub fn unit_pid(&self, unit: &str) -> Option<u32> {
        let ok = self
            .systemctl(&["is-active", "--quiet", unit])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return None;
        }
        fs::read_to_string(self.host_path(&format!("/run/fake-systemd/{unit}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The output of `unit` so far.
    pub fn unit_log(&self, unit: &str) -> String {
        fs::read_to_string(self.host_path(&format!("/run/fake-systemd/{unit}.log")))
            .unwrap_or_default()
    }

    /// Every systemctl call made on the node, one per line.
    pub fn systemctl_calls(&self) -> String {
        fs::read_to_string(self.host_path("/run/fake-systemd/calls.log")).unwrap_or_default()
    }

    /// Makes the next `systemctl <verb> <unit>` hang (see `scripts/fake-systemctl`).
    pub fn hang_at(&self, verb: &str, unit: &str) {
        self.write(&format!("/run/fake-systemd/hang-{verb}-{unit}"), "");
    }

    /// Waits until a call hung at `hang_at(verb, unit)`; returns the hung call's pid.
    pub fn wait_hung(&self, verb: &str, unit: &str) -> i32 {
        let reached = self.host_path(&format!("/run/fake-systemd/reached-{verb}-{unit}"));
        wait_for(
            &format!("systemctl {verb} {unit} to be reached"),
            Duration::from_secs(120),
            || fs::read_to_string(&reached).is_ok_and(|s| !s.trim().is_empty()),
        );
        fs::read_to_string(&reached)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Lifts the hang at `(verb, unit)` and kills the call `pid` that hung there.
    pub fn release_hung(&self, verb: &str, unit: &str, pid: i32) {
        let _ = fs::remove_file(self.host_path(&format!("/run/fake-systemd/hang-{verb}-{unit}")));
        let _ =
            fs::remove_file(self.host_path(&format!("/run/fake-systemd/reached-{verb}-{unit}")));
        // SAFETY: kill(2) of the hung script's pid.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }

    /// Waits until containerd answers on its socket.
    pub fn wait_containerd(&self) {
        let sock = self.containerd_socket();
        wait_for(
            &format!("containerd {} on the node", self.version.label()),
            Duration::from_secs(60),
            || self.version.answers(&sock),
        );
    }

    /// containerd's gRPC socket (the CRI endpoint).
    pub fn containerd_socket(&self) -> PathBuf {
        self.host_path("/run/containerd/containerd.sock")
    }

    /// A handle on the node's containerd for `ctr` and CRI calls.
    pub fn containerd(&self) -> Containerd<'a> {
        Containerd::external(
            self.lab,
            self.version,
            &self.host_path("/run/containerd"),
            &self.host_path("/var/lib/containerd"),
            &self.host_path("/etc/containerd/config.toml"),
        )
    }

    /// Whether containerd lists the guestpull snapshotter as loaded.
    pub fn plugin_loaded(&self) -> bool {
        let out = self.containerd().ctr(&["plugins", "ls"]);
        String::from_utf8_lossy(&out.stdout).lines().any(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            c.len() >= 3
                && c[0] == "io.containerd.snapshotter.v1"
                && c[1] == "guestpull"
                && c.last() == Some(&"ok")
        })
    }

    /// containerd's merged config (`containerd config dump`) as the node's daemon would read it.
    pub fn config_dump(&self) -> toml::Value {
        let out = run_ok(
            Command::new(self.version.bin_dir().join("containerd"))
                .arg("--config")
                .arg(self.host_path("/etc/containerd/config.toml"))
                .args(["config", "dump"])
                .env("PATH", self.path_env()),
        );
        toml::from_str(&out).unwrap_or_else(|e| panic!("config dump: {e}\n{out}"))
    }

    /// `guestpull-deploy <verb>` against this node, with `args` after the node's own flags.
    pub fn deploy_cmd(&self, verb: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin_path("guestpull-deploy"));
        let prefix = self.root.display().to_string();
        cmd.args([
            verb,
            "--host-root",
            "/",
            "--prefix",
            &prefix,
            "--exec",
            "direct",
            "--timeout",
            "60",
        ]);
        if verb == "install" {
            cmd.arg("--payload-dir")
                .arg(bin_path("guestpull-snapshotter").parent().unwrap())
                .args(["--platform", "linux/amd64"]);
        }
        cmd.args(args)
            .env("PATH", self.path_env())
            .env("FAKE_SYSTEMD_ROOT", &self.root)
            .env("GUESTPULL_DEPLOY_LOG", "debug");
        cmd
    }

    /// Runs `guestpull-deploy <verb>`; its output, successful or not.
    pub fn deploy(&self, verb: &str, args: &[&str]) -> Output {
        self.deploy_cmd(verb, args)
            .output()
            .expect("running guestpull-deploy")
    }

    /// Runs `guestpull-deploy <verb>`, panicking with its log and the units' when it fails;
    /// returns its log (stderr).
    pub fn deploy_ok(&self, verb: &str, args: &[&str]) -> String {
        let out = self.deploy(verb, args);
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "guestpull-deploy {verb} {args:?} failed ({}):\n{log}\n--- containerd ---\n{}\n--- snapshotter ---\n{}",
            out.status,
            tail(&self.unit_log(CONTAINERD_UNIT)),
            tail(&self.unit_log(SNAPSHOTTER_UNIT)),
        );
        log
    }
}

fn tail(s: &str) -> &str {
    let start = s.len().saturating_sub(4000);
    let start = (start..s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    &s[start..]
}

fn collect(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        match e.file_type() {
            Ok(t) if t.is_dir() => {
                // An empty directory left behind counts too.
                out.insert(format!("{rel}/"), Vec::new());
                collect(root, &p, out);
            }
            Ok(_) => {
                out.insert(rel, fs::read(&p).unwrap_or_default());
            }
            Err(_) => {}
        }
    }
}

impl Drop for Node<'_> {
    fn drop(&mut self) {
        // containerd first (it holds the snapshotter's mounts), then everything else the node's
        // service manager started.
        let _ = self.systemctl(&["stop", CONTAINERD_UNIT]).status();
        if let Ok(rd) = fs::read_dir(self.host_path("/run/fake-systemd")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if let Some(unit) = name.strip_suffix(".pid") {
                    let _ = self.systemctl(&["stop", unit]).status();
                }
            }
        }
    }
}
