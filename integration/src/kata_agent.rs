//! The real kata-agent in the VM test: built from the kata-agent sources the project is given
//! (`../shared/peers/kata-agent`, not the project's code), and driven from the host over hybrid
//! vsock with the ttrpc calls the Kata shim makes, carrying the rootfs `Storage` the Go shim
//! builds from the snapshotter's `io.kubernetes.cri.image-name` annotation and
//! `io.katacontainers.volume=` mount option.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use snapshotter::volume::{KataVirtualVolume, VOLUME_TYPE_IMAGE_GUEST_PULL};

/// Host-side bindings of kata-agent's API (written from the upstream field numbers).
#[allow(
    missing_docs,
    clippy::all,
    unused_imports,
    unused_qualifications,
    unused_mut,
    dead_code,
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case
)]
pub mod protos {
    /// `package grpc` messages.
    pub mod agent {
        include!(concat!(env!("OUT_DIR"), "/protos/agent.rs"));
    }
    /// `package grpc` services.
    pub mod agent_ttrpc {
        include!(concat!(env!("OUT_DIR"), "/protos/agent_ttrpc.rs"));
    }
}

use protos::agent;
use protos::agent_ttrpc::{AgentServiceClient, HealthClient};

/// kata-agent's ttrpc port (`DEFAULT_AGENT_VSOCK_PORT`).
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// Where the agent keeps container bundles (`CONTAINER_BASE`).
pub const CONTAINER_BASE: &str = "/run/kata-containers";
/// Kata's driver name for guest-pulled rootfs storages.
pub const IMAGE_GUEST_PULL: &str = VOLUME_TYPE_IMAGE_GUEST_PULL;
/// CRI's annotation naming the image a container was created from.
pub const CRI_IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
/// CRI's container-type annotation (`sandbox` or `container`).
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const CRIO_IMAGE_NAME: &str = "io.kubernetes.cri-o.ImageName";
const CRIO_CONTAINER_TYPE: &str = "io.kubernetes.cri-o.ContainerType";

const PEER_HINT: &str =
    "the kata-agent sources are given to the project at ../shared/peers/kata-agent \
     (beside the clone; see its BUILD.md), or set GUESTPULL_KATA_AGENT_SRC to such a tree, or \
     GUESTPULL_STATIC_KATA_AGENT to a statically linked kata-agent";

/// The kata-agent source tree: `$GUESTPULL_KATA_AGENT_SRC`, else `../shared/peers/kata-agent`
/// beside the clone; panics naming both when neither holds one.
pub fn peer_source() -> PathBuf {
    let dir = match std::env::var_os("GUESTPULL_KATA_AGENT_SRC") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/peers/kata-agent"),
    };
    for f in ["Cargo.toml", "Cargo.lock", "src/agent/Cargo.toml"] {
        if !dir.join(f).is_file() {
            panic!(
                "kata-agent sources missing ({} has no {f}): {PEER_HINT}",
                dir.display()
            );
        }
    }
    dir.canonicalize()
        .expect("canonical kata-agent source path")
}

/// The statically linked kata-agent: `$GUESTPULL_STATIC_KATA_AGENT` if set, else built from
/// [`peer_source`] as its BUILD.md says (release, gnu target, `+crt-static`, `--locked`) in a
/// writable copy under `<target dir>/kata-agent` (its build script writes generated code into
/// the tree), re-copied only when the given tree changes so the build stays incremental.
pub fn static_kata_agent() -> PathBuf {
    if let Some(p) = crate::vm::static_override("GUESTPULL_STATIC_KATA_AGENT") {
        return p;
    }
    let src = peer_source();
    let base = crate::vm::static_target_dir().with_file_name("kata-agent");
    let tree = base.join("src");
    let stamp_file = base.join("src.stamp");
    let stamp = tree_stamp(&src);
    if fs::read_to_string(&stamp_file).ok().as_deref() != Some(stamp.as_str()) {
        // A fresh copy loses the code the protocols build script generated into the tree, and
        // cargo would not rerun that script unless a proto changed: start the build afresh.
        let _ = fs::remove_dir_all(&tree);
        let _ = fs::remove_dir_all(base.join("target"));
        fs::create_dir_all(&base).unwrap();
        // `cp -a` keeps mtimes, so an unchanged file does not look new to cargo.
        crate::lab::run_ok(Command::new("cp").arg("-a").arg(&src).arg(&tree));
        fs::write(&stamp_file, &stamp).unwrap();
    }
    crate::vm::cargo_build_static(
        &tree.join("Cargo.toml"),
        None,
        "kata-agent",
        &base.join("target"),
    )
}

/// A digest of every file's path, size and mtime under `dir`: whether the copy is stale.
fn tree_stamp(dir: &Path) -> String {
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        let mut entries: Vec<_> = fs::read_dir(d)
            .unwrap_or_else(|e| panic!("reading {}: {e}", d.display()))
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let md = fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                walk(base, &p, out);
            } else {
                let mtime = md
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                out.push(format!(
                    "{} {} {mtime}",
                    p.strip_prefix(base).unwrap().display(),
                    md.len()
                ));
            }
        }
    }
    let mut lines = Vec::new();
    walk(dir, dir, &mut lines);
    hex::encode(Sha256::digest(lines.join("\n").as_bytes()))
}

/// The initdata block device the Kata runtime attaches (`prepareInitdataImage`): `initdata`,
/// the payload length as u64 little endian, the gzip-compressed TOML, zeros to 512 bytes.
pub fn initdata_disk(initdata: &str) -> Vec<u8> {
    let mut gz = Command::new("gzip")
        .args(["-n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip (Debian package gzip)");
    gz.stdin
        .take()
        .unwrap()
        .write_all(initdata.as_bytes())
        .unwrap();
    let out = gz.wait_with_output().unwrap();
    assert!(out.status.success(), "gzip of the initdata failed");
    let mut disk = b"initdata".to_vec();
    disk.extend_from_slice(&(out.stdout.len() as u64).to_le_bytes());
    disk.extend_from_slice(&out.stdout);
    disk.resize(disk.len().div_ceil(512) * 512, 0);
    disk
}

/// What the Kata Go shim sends for a container whose rootfs mount carries `volume`
/// (`kata_agent.go` `handleImageGuestPullBlockVolume`): the image named by the container's
/// CRI (or CRI-O) image-name annotation, `"pause"` for a sandbox, the volume's metadata with
/// every container annotation merged over it, as plain JSON in `driver_options`.
pub fn guest_pull_storage(
    volume: &KataVirtualVolume,
    annotations: &BTreeMap<String, String>,
    cid: &str,
) -> Result<agent::Storage, String> {
    let Some(pull) = &volume.image_pull else {
        return Err("missing image pull information".into());
    };
    let get = |k: &str| annotations.get(k).map(String::as_str).unwrap_or("");
    let image = if get(CRI_CONTAINER_TYPE) == "sandbox" || get(CRIO_CONTAINER_TYPE) == "sandbox" {
        "pause"
    } else if !get(CRIO_CONTAINER_TYPE).is_empty() {
        get(CRIO_IMAGE_NAME)
    } else {
        get(CRI_IMAGE_NAME)
    };
    if image.is_empty() {
        return Err("Failed to get image name from annotations".into());
    }
    let mut metadata = pull.metadata.clone();
    for (k, v) in annotations {
        metadata.insert(k.clone(), v.clone());
    }
    let json = serde_json::json!({ "metadata": metadata }).to_string();
    let mut s = agent::Storage::new();
    s.driver = IMAGE_GUEST_PULL.to_string();
    s.driver_options = vec![format!("{IMAGE_GUEST_PULL}={json}")];
    s.source = image.to_string();
    s.fstype = "overlay".to_string();
    s.mount_point = format!("{CONTAINER_BASE}/{cid}/rootfs");
    Ok(s)
}

/// A block device of the container spec, with the guest's numbers (what the Kata runtime
/// writes for a pod's `volumeDevices` entry once the disk is in the guest).
#[derive(Debug, Clone)]
pub struct BlockDevice {
    /// Path inside the container (`/dev/trusted_store` asks kata-agent for trusted storage).
    pub path: String,
    /// Major number in the guest.
    pub major: i64,
    /// Minor number in the guest.
    pub minor: i64,
}

/// The runtime spec containerd's CRI plugin writes for a plain container, as the Kata shim
/// forwards it (no network namespace: the pod shares the VM's), running `args` with `env`.
pub fn container_spec(
    cid: &str,
    args: &[&str],
    env: &[String],
    annotations: &BTreeMap<String, String>,
    devices: &[BlockDevice],
) -> agent::Spec {
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let caps = strings(&[
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ]);
    let mut c = agent::LinuxCapabilities::new();
    c.Bounding = caps.clone();
    c.Effective = caps.clone();
    c.Permitted = caps;
    let mut user = agent::User::new();
    user.UID = 0;
    user.GID = 0;
    let mut p = agent::Process::new();
    p.Terminal = false;
    p.User = Some(user).into();
    p.Args = strings(args);
    p.Env = env.to_vec();
    p.Cwd = "/".into();
    p.Capabilities = Some(c).into();
    p.NoNewPrivileges = true;
    let mount = |dst: &str, ty: &str, src: &str, opts: &[&str]| {
        let mut m = agent::Mount::new();
        m.destination = dst.into();
        m.type_ = ty.into();
        m.source = src.into();
        m.options = strings(opts);
        m
    };
    let mut root = agent::Root::new();
    root.Path = format!("{CONTAINER_BASE}/{cid}/rootfs");
    let mut linux = agent::Linux::new();
    linux.CgroupsPath = format!("/kubepods/besteffort/guestpull/{cid}");
    linux.Namespaces = ["pid", "ipc", "uts", "mount"]
        .iter()
        .map(|t| {
            let mut n = agent::LinuxNamespace::new();
            n.Type = t.to_string();
            n
        })
        .collect();
    linux.Devices = devices
        .iter()
        .map(|d| {
            let mut l = agent::LinuxDevice::new();
            l.Path = d.path.clone();
            l.Type = "b".into();
            l.Major = d.major;
            l.Minor = d.minor;
            l.FileMode = 0o660;
            l
        })
        .collect();
    linux.MaskedPaths = strings(&[
        "/proc/acpi",
        "/proc/kcore",
        "/proc/keys",
        "/proc/latency_stats",
        "/proc/timer_list",
        "/proc/timer_stats",
        "/proc/sched_debug",
        "/proc/scsi",
        "/sys/firmware",
    ]);
    linux.ReadonlyPaths = strings(&[
        "/proc/bus",
        "/proc/fs",
        "/proc/irq",
        "/proc/sys",
        "/proc/sysrq-trigger",
    ]);
    let mut s = agent::Spec::new();
    s.Version = "1.1.0".into();
    s.Process = Some(p).into();
    s.Root = Some(root).into();
    s.Hostname = "guestpull-pod".into();
    s.Mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
    ];
    s.Annotations = annotations
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    s.Linux = Some(linux).into();
    s
}

/// The host's ttrpc channel to the agent (hybrid vsock), with the calls the Kata shim makes.
pub struct AgentClient {
    rt: tokio::runtime::Runtime,
    agent: AgentServiceClient,
    health: HealthClient,
}

fn ctx(t: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(t.as_nanos() as i64)
}

impl AgentClient {
    /// Connects to the agent behind the hybrid-vsock socket `uds` and waits, as the shim's
    /// `check` does, until `grpc.Health/Check` answers SERVING (or `wait` passes).
    pub fn connect(uds: &Path, wait: Duration) -> Result<AgentClient, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let deadline = Instant::now() + wait;
        let endpoint = cdh_api::client::Endpoint::HybridVsock {
            uds: uds.to_path_buf(),
            port: AGENT_VSOCK_PORT,
        };
        loop {
            let attempt = rt.block_on(async {
                let c = cdh_api::client::connect(&endpoint)
                    .await
                    .map_err(|e| e.to_string())?;
                let health = HealthClient::new(c.clone());
                let mut req = agent::CheckRequest::new();
                req.service = String::new();
                let r = health
                    .check(ctx(Duration::from_secs(5)), &req)
                    .await
                    .map_err(|e| e.to_string())?;
                if r.status.value() != agent::health_check_response::ServingStatus::SERVING as i32 {
                    return Err(format!("health status {:?}", r.status));
                }
                Ok((AgentServiceClient::new(c), health))
            });
            match attempt {
                Ok((agent, health)) => return Ok(AgentClient { rt, agent, health }),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("kata-agent did not answer grpc.Health/Check: {e}"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        }
    }

    /// `grpc.Health/Version`: (grpc version, agent version).
    pub fn version(&self) -> ttrpc::Result<(String, String)> {
        let r = self.rt.block_on(
            self.health
                .version(ctx(Duration::from_secs(10)), &agent::CheckRequest::new()),
        )?;
        Ok((r.grpc_version, r.agent_version))
    }

    /// `CreateSandbox` with no storages and no shared pid namespace.
    pub fn create_sandbox(&self, sandbox_id: &str, hostname: &str) -> ttrpc::Result<()> {
        let mut req = agent::CreateSandboxRequest::new();
        req.sandbox_id = sandbox_id.into();
        req.hostname = hostname.into();
        self.rt.block_on(
            self.agent
                .create_sandbox(ctx(Duration::from_secs(60)), &req),
        )?;
        Ok(())
    }

    /// `CreateContainer` with one rootfs storage; `timeout` covers the guest pull inside it.
    pub fn create_container(
        &self,
        cid: &str,
        storage: agent::Storage,
        spec: agent::Spec,
        timeout: Duration,
    ) -> ttrpc::Result<()> {
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = cid.into();
        req.exec_id = cid.into();
        req.storages = vec![storage];
        req.OCI = Some(spec).into();
        self.rt
            .block_on(self.agent.create_container(ctx(timeout), &req))?;
        Ok(())
    }

    /// `StartContainer`.
    pub fn start_container(&self, cid: &str) -> ttrpc::Result<()> {
        let mut req = agent::StartContainerRequest::new();
        req.container_id = cid.into();
        self.rt.block_on(
            self.agent
                .start_container(ctx(Duration::from_secs(60)), &req),
        )?;
        Ok(())
    }

    /// The init process's whole stdout: `ReadStdout` until the agent reports the stream's end.
    pub fn read_stdout(&self, cid: &str, wait: Duration) -> Vec<u8> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        while Instant::now() < deadline {
            let mut req = agent::ReadStreamRequest::new();
            req.container_id = cid.into();
            req.len = 32 * 1024;
            match self.rt.block_on(self.agent.read_stdout(ctx(wait), &req)) {
                Ok(r) if r.data.is_empty() => break,
                Ok(r) => out.extend_from_slice(&r.data),
                Err(_) => break,
            }
        }
        out
    }

    /// `WaitProcess` of the init process: its exit status.
    pub fn wait_process(&self, cid: &str, wait: Duration) -> ttrpc::Result<i32> {
        let mut req = agent::WaitProcessRequest::new();
        req.container_id = cid.into();
        let r = self.rt.block_on(self.agent.wait_process(ctx(wait), &req))?;
        Ok(r.status)
    }

    /// `RemoveContainer`.
    pub fn remove_container(&self, cid: &str) -> ttrpc::Result<()> {
        let mut req = agent::RemoveContainerRequest::new();
        req.container_id = cid.into();
        req.timeout = 30;
        self.rt.block_on(
            self.agent
                .remove_container(ctx(Duration::from_secs(60)), &req),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_shim_pulls_the_annotated_image_and_merges_annotations_over_the_volume() {
        let mut md = BTreeMap::new();
        md.insert(
            "containerd.io/snapshot/cri.image-ref".into(),
            "snap/ref:1".into(),
        );
        md.insert(CRI_IMAGE_NAME.into(), "stale".into());
        let vol = KataVirtualVolume::guest_pull("snap/ref:1", md);
        let ann = annotations(&[
            (CRI_CONTAINER_TYPE, "container"),
            (CRI_IMAGE_NAME, "reg.example/app:2"),
        ]);
        let s = guest_pull_storage(&vol, &ann, "c1").unwrap();
        assert_eq!(s.driver, "image_guest_pull");
        assert_eq!(s.source, "reg.example/app:2");
        assert_eq!(s.fstype, "overlay");
        assert_eq!(s.mount_point, "/run/kata-containers/c1/rootfs");
        let (k, json) = s.driver_options[0].split_once('=').unwrap();
        assert_eq!(k, "image_guest_pull");
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["metadata"][CRI_IMAGE_NAME], "reg.example/app:2");
        assert_eq!(
            v["metadata"]["containerd.io/snapshot/cri.image-ref"],
            "snap/ref:1"
        );
    }

    #[test]
    fn the_shim_refuses_a_container_without_an_image_name_and_sends_pause_for_a_sandbox() {
        let vol = KataVirtualVolume::guest_pull("snap/ref:1", BTreeMap::new());
        assert!(guest_pull_storage(&vol, &BTreeMap::new(), "c1").is_err());
        let s = guest_pull_storage(&vol, &annotations(&[(CRI_CONTAINER_TYPE, "sandbox")]), "p")
            .unwrap();
        assert_eq!(s.source, "pause");
        let crio = annotations(&[
            (CRIO_CONTAINER_TYPE, "container"),
            (CRIO_IMAGE_NAME, "reg/crio:1"),
            (CRI_IMAGE_NAME, "reg/cri:1"),
        ]);
        assert_eq!(
            guest_pull_storage(&vol, &crio, "c").unwrap().source,
            "reg/crio:1"
        );
    }

    #[test]
    fn initdata_disk_has_kata_runtimes_layout() {
        let toml = "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n";
        let disk = initdata_disk(toml);
        assert_eq!(&disk[..8], b"initdata");
        assert_eq!(disk.len() % 512, 0);
        let n = u64::from_le_bytes(disk[8..16].try_into().unwrap()) as usize;
        let gz = &disk[16..16 + n];
        assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip magic");
        assert!(disk[16 + n..].iter().all(|&b| b == 0));
        let mut child = Command::new("gzip")
            .args(["-d", "-c"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(gz).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), toml);
    }
}
