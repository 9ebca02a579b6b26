//! A real VM guest for the guest-puller: QEMU (TCG) boots a Debian kernel with an initramfs built
//! here (static busybox, the statically linked `guest-puller`, a small init), like a Kata guest.
//!
//! Channels, as Kata carries them:
//! - host → guest-puller ttrpc: vsock port [`CDH_VSOCK_PORT`] through `vhost-user-vsock` served by
//!   `vhost-device-vsock` (the host has no `/dev/vhost-vsock`), i.e. Kata's "hybrid vsock";
//! - guest → registry / KBS: QEMU user networking with `restrict=on` and one `guestfwd` per
//!   service, the only way out of the guest;
//! - test checks inside the guest: a line-based busybox shell on a virtio-serial port, and the
//!   serial console (captured to `<lab>/vm/console.log`).

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::containerd::lab_cache;
use crate::lab::{run_ok, wait_for, Lab};

/// Guest kernel modules, dependencies first (virtio_ring before virtio). Keep in sync with
/// `integration/scripts/fetch-vm-components.sh`.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "failover",
    "net_failover",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "overlay",
    // Trusted storage (CDH SecureMount: LUKS2 with dm-integrity, ext4).
    "dm-mod",
    "dm-bufio",
    "dm-crypt",
    "xor",
    "async_tx",
    "async_xor",
    "dm-integrity",
    // xts(aes) instantiates ecb(aes); without modprobe in the guest nothing loads it on demand.
    "ecb",
    "xts",
    "authenc",
    "af_alg",
    "algif_skcipher",
    "algif_hash",
    "crc16",
    "mbcache",
    "jbd2",
    "crc32c_generic",
    "ext4",
];

/// The guest vsock port the guest-puller's ttrpc server listens on (kata-agent uses 1024).
pub const CDH_VSOCK_PORT: u32 = 1024;
/// The guest's CID on the vsock device.
pub const GUEST_CID: u32 = 3;
/// Where the guest-puller keeps layers and overlay dirs: a tmpfs, as in a Kata guest.
pub const GUEST_WORK_DIR: &str = "/run/kata-containers/image";
/// The guest-puller's config file inside the guest.
pub const GUEST_CONFIG: &str = "/etc/guest-puller.toml";
/// Where the guest image holds the guest-puller.
pub const GUEST_PULLER_BIN: &str = "/usr/local/bin/guest-puller";
/// The CDH binary of kata-agent's launch plan: a symlink to [`GUEST_PULLER_BIN`].
pub const CDH_BIN: &str = "/usr/local/bin/confidential-data-hub";
/// kata-agent's `INITDATA_PATH`.
pub const INITDATA_DIR: &str = "/run/confidential-containers/initdata";
/// The CDH socket kata-agent waits for.
pub const CDH_SOCKET: &str = "/run/confidential-containers/cdh.sock";
/// kata-agent's `OCICRYPT_CONFIG_PATH`, passed to the CDH as `OCICRYPT_KEYPROVIDER_CONFIG`.
pub const OCICRYPT_CONFIG: &str = "/etc/ocicrypt_config.json";
/// The environment kata-agent (as init) starts the CDH with: its own `PATH` plus the ocicrypt
/// configuration.
pub const CDH_ENV: &str =
    "PATH=/bin:/sbin/:/usr/bin/:/usr/sbin/ OCICRYPT_KEYPROVIDER_CONFIG=/etc/ocicrypt_config.json";
/// The guest's address on QEMU's user network.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Name of the virtio-serial port carrying the test's command shell.
const CMD_PORT_NAME: &str = "guestpull.cmd";
/// Marker ending each command's output on the command port.
const RC_MARKER: &str = "@@GUESTPULL-RC ";
/// Console line the init prints once the guest-puller runs.
const READY: &str = "GUESTPULL-VM: ready";

const FIX: &str = "run integration/scripts/fetch-vm-components.sh (make deps / .ci/run do)";

/// The host-side pieces a VM needs; every path exists.
pub struct VmAssets {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// The Debian kernel image.
    pub kernel: PathBuf,
    /// Directory of the guest modules (`<name>.ko`).
    pub modules: PathBuf,
    /// `vhost-device-vsock`.
    pub vhost_device_vsock: PathBuf,
    /// A statically linked busybox.
    pub busybox: PathBuf,
    /// The statically linked guest-puller.
    pub guest_puller: PathBuf,
}

impl VmAssets {
    /// Finds (and for the guest-puller, builds) every piece; panics naming the fix when one is missing.
    pub fn locate() -> VmAssets {
        let vm = lab_cache().join("vm");
        let qemu = which("qemu-system-x86_64").unwrap_or_else(|| {
            panic!(
                "qemu-system-x86_64 is not installed (bookworm-backports qemu-system-x86): {FIX}"
            )
        });
        let kernel = vm.join("kernel/vmlinuz");
        let modules = vm.join("kernel/modules");
        let vdv = vm.join("bin/vhost-device-vsock");
        for (p, what) in [
            (&kernel, "the Debian guest kernel"),
            (&vdv, "vhost-device-vsock"),
        ] {
            if !p.is_file() {
                panic!("{what} missing at {}: {FIX}", p.display());
            }
        }
        for m in GUEST_MODULES {
            let p = modules.join(format!("{m}.ko"));
            if !p.is_file() {
                panic!("guest module {} missing: {FIX}", p.display());
            }
        }
        let busybox = PathBuf::from("/bin/busybox");
        if !is_static(&busybox) {
            panic!(
                "/bin/busybox is missing or not static: install the Debian package busybox-static"
            );
        }
        VmAssets {
            qemu,
            kernel,
            modules,
            vhost_device_vsock: vdv,
            busybox,
            guest_puller: static_guest_puller(),
        }
    }
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

/// Whether `bin` is a statically linked executable (`ldd` says "not a dynamic executable").
pub fn is_static(bin: &Path) -> bool {
    if !bin.is_file() {
        return false;
    }
    let out = Command::new("ldd").arg(bin).output();
    match out {
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.contains("not a dynamic executable") || text.contains("statically linked")
        }
        Err(_) => false,
    }
}

/// The statically linked guest-puller: `$GUESTPULL_STATIC_GUEST_PULLER` if set, else built with
/// cargo (gnu target, `+crt-static`; the explicit `--target` keeps RUSTFLAGS off build scripts and
/// proc-macros) into `<target dir>/guest-static`, where it does not disturb the normal build.
pub fn static_guest_puller() -> PathBuf {
    if let Some(p) = static_override("GUESTPULL_STATIC_GUEST_PULLER") {
        return p;
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    // `-p`: without it cargo unifies features over the whole workspace, and the integration
    // crate's `lazy` and `gpg` would end up in what is meant to be the default guest build.
    cargo_build_static(
        &manifest,
        Some("guest-puller"),
        "guest-puller",
        &static_target_dir(),
    )
}

/// Builds binary `bin` of the workspace at `manifest` statically into `target_dir` (release,
/// `--locked`, gnu target with `+crt-static`; the explicit `--target` keeps RUSTFLAGS off build
/// scripts and proc-macros); panics with the command and cargo's output when that fails or the
/// result is not static. Returns the binary.
pub(crate) fn cargo_build_static(
    manifest: &Path,
    package: Option<&str>,
    bin: &str,
    target_dir: &Path,
) -> PathBuf {
    const TARGET: &str = "x86_64-unknown-linux-gnu";
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = Instant::now();
    let out = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "--bin",
            bin,
            "--target",
            TARGET,
        ])
        .args(package.map(|p| ["-p", p]).into_iter().flatten())
        .arg("--manifest-path")
        .arg(manifest)
        .env("CARGO_TARGET_DIR", target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .output()
        .unwrap_or_else(|e| panic!("running {cargo:?} to build the static {bin}: {e}"));
    if !out.status.success() {
        panic!(
            "building the static {bin} failed (RUSTFLAGS='-C target-feature=+crt-static' cargo build \
             --release --locked{} --bin {bin} --target {TARGET} --manifest-path {}):\n{}",
            package.map(|p| format!(" -p {p}")).unwrap_or_default(),
            manifest.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!("vm: static {bin} up to date in {:.1?}", started.elapsed());
    let path = target_dir.join(TARGET).join("release").join(bin);
    if !is_static(&path) {
        panic!(
            "{} is not statically linked (`ldd` must say \"not a dynamic executable\"): a dependency \
             pulls in a shared library the gnu target cannot link statically",
            path.display()
        );
    }
    path
}

/// The prebuilt binary the environment variable `var` names, if it is set; panics when that is
/// not a statically linked executable.
pub(crate) fn static_override(var: &str) -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os(var)?);
    if !is_static(&p) {
        panic!(
            "{var}={} is not a statically linked executable",
            p.display()
        );
    }
    Some(p)
}

pub(crate) fn static_target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d).join("guest-static");
    }
    // Test executables live in <target>/<profile>/deps.
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .nth(3)
        .map(|t| t.join("guest-static"))
        .expect("target dir of the test executable")
}

/// One `guestfwd` rule: guest connections to `guest` reach `host_port` on the host's loopback.
#[derive(Debug, Clone, Copy)]
pub struct GuestFwd {
    /// Address the guest connects to (inside 10.0.2.0/24).
    pub guest: Ipv4Addr,
    /// Port the guest connects to.
    pub guest_port: u16,
    /// Port on 127.0.0.1 of the host.
    pub host_port: u16,
}

impl GuestFwd {
    /// `host:port` as the guest writes it.
    pub fn guest_addr(&self) -> String {
        format!("{}:{}", self.guest, self.guest_port)
    }
}

/// How the guest starts the guest-puller.
pub enum GuestLaunch {
    /// `guest-puller serve --config` [`GUEST_CONFIG`] with this TOML; its `[server]` must listen
    /// on vsock.
    Serve(String),
    /// The real kata-agent as PID 1: the init loads the modules, brings up the network and
    /// the test's command port, then execs the agent, as a Kata initrd starts it. The agent
    /// reads the initdata from a virtio-blk disk in the Kata runtime's layout and launches
    /// the attestation-agent and the CDH (both guest-puller) from its built-in plan. The
    /// guest-puller's work dir is the agent's `/run` tmpfs (no separate mount), as in Kata.
    KataAgent {
        /// The statically linked kata-agent ([`crate::kata_agent::static_kata_agent`]).
        agent: PathBuf,
        /// The pod's initdata TOML, attached as the Kata runtime attaches it.
        initdata: String,
        /// The ocicrypt keyprovider configuration of the guest image.
        ocicrypt_config: String,
        /// The agent's kernel command line options (`agent.*`, cgroup selection).
        cmdline: String,
        /// Size of an empty virtio-blk disk for trusted image storage (0: none); the guest
        /// sees it as `/dev/vdb`, after the initdata disk.
        trusted_store_mib: u32,
    },
}

/// Where the guest image holds kata-agent.
pub const KATA_AGENT_BIN: &str = "/usr/bin/kata-agent";
/// The attestation-agent binary of kata-agent's launch plan: a symlink to [`GUEST_PULLER_BIN`].
pub const AA_BIN: &str = "/usr/local/bin/attestation-agent";

/// The files kata-agent's `initialize_initdata` writes for `initdata` (name, content): the
/// document verbatim as `initdata.toml`, and the `aa.toml` / `cdh.toml` entries of `[data]`.
pub fn kata_initdata_layout(initdata: &str) -> Vec<(&'static str, String)> {
    kbs_client::protocol::init_data_digest(initdata)
        .unwrap_or_else(|e| panic!("kata-agent would refuse this initdata: {e}"));
    let doc: toml::Value = toml::from_str(initdata).expect("initdata TOML");
    let mut files = vec![("initdata.toml", initdata.to_string())];
    for key in ["aa.toml", "cdh.toml"] {
        if let Some(v) = doc.get("data").and_then(|d| d.get(key)) {
            let v = v.as_str().expect("initdata data values are strings");
            files.push((key, v.to_string()));
        }
    }
    files
}

/// What to boot.
pub struct VmSpec {
    /// How the guest-puller is started.
    pub launch: GuestLaunch,
    /// The only network paths out of the guest.
    pub forwards: Vec<GuestFwd>,
    /// Guest RAM.
    pub memory_mib: u32,
    /// Size limit of the tmpfs at [`GUEST_WORK_DIR`].
    pub work_tmpfs_mib: u32,
}

/// Memory figures read inside the guest (KiB).
#[derive(Debug, Clone, Copy, Default)]
pub struct GuestMemory {
    /// MemTotal.
    pub mem_total_kib: u64,
    /// MemAvailable right after boot, before any pull.
    pub mem_available_boot_kib: u64,
    /// Lowest MemAvailable seen by the sampler.
    pub mem_available_min_kib: u64,
    /// MemAvailable now.
    pub mem_available_now_kib: u64,
    /// Largest tmpfs usage of the work dir seen by the sampler.
    pub work_tmpfs_peak_kib: u64,
    /// tmpfs usage of the work dir now.
    pub work_tmpfs_now_kib: u64,
    /// The guest-puller's peak RSS (VmHWM).
    pub puller_hwm_kib: u64,
    /// The guest-puller's RSS now (VmRSS).
    pub puller_rss_kib: u64,
}

/// A running VM; QEMU and vhost-device-vsock are daemons of the lab (stopped with it).
pub struct Vm<'a> {
    lab: &'a Lab,
    dir: PathBuf,
    cmd: Option<BufReader<UnixStream>>,
}

impl<'a> Vm<'a> {
    /// Builds the initramfs, starts vhost-device-vsock and QEMU, and waits until the guest-puller runs.
    pub fn boot(lab: &'a Lab, assets: &VmAssets, spec: &VmSpec) -> Vm<'a> {
        let dir = lab.join("vm");
        fs::create_dir_all(&dir).unwrap();
        let initrd = build_initramfs(&dir, assets, spec);

        let vhost_sock = dir.join("vhost-vsock.sock");
        let mut vdv = Command::new(&assets.vhost_device_vsock);
        vdv.args(["--guest-cid", &GUEST_CID.to_string(), "--socket"])
            .arg(&vhost_sock)
            .arg("--uds-path")
            .arg(dir.join("vm.vsock"));
        lab.spawn("vhost-device-vsock", vdv);
        wait_for(
            "vhost-device-vsock's vhost-user socket",
            Duration::from_secs(20),
            || vhost_sock.exists(),
        );

        let mem = format!("{}M", spec.memory_mib);
        let mut net = String::from("user,id=n0,restrict=on");
        for f in &spec.forwards {
            // `cmd:` starts one relay per guest connection; a `tcp:` chardev target would be a
            // single connection opened when QEMU starts, shared by every guest connection.
            write!(
                net,
                ",guestfwd=tcp:{}:{}-cmd:{} {}",
                f.guest,
                f.guest_port,
                relay_cmd(),
                f.host_port
            )
            .unwrap();
        }
        let mut qemu = Command::new(&assets.qemu);
        qemu.args(["-accel", "tcg", "-M", "q35", "-cpu", "max", "-smp", "2"])
            .args(["-m", &mem, "-nodefaults", "-no-user-config", "-no-reboot"])
            .args(["-display", "none", "-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", dir.join("console.log").display()))
            .arg("-kernel")
            .arg(&assets.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .arg("-append")
            .arg(kernel_cmdline(&spec.launch))
            .arg("-object")
            .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
            .args(["-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=vvs,path={}", vhost_sock.display()))
            .args(["-device", "vhost-user-vsock-pci,chardev=vvs"])
            .args(["-device", "virtio-serial-pci"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=cmd,path={},server=on,wait=off",
                dir.join("cmd.sock").display()
            ))
            .args([
                "-device",
                &format!("virtserialport,chardev=cmd,name={CMD_PORT_NAME}"),
            ])
            .arg("-netdev")
            .arg(&net)
            .args(["-device", "virtio-net-pci,netdev=n0"]);
        if let GuestLaunch::KataAgent { initdata, .. } = &spec.launch {
            // Read-only virtio-blk, as the Kata runtime attaches the initdata image.
            let disk = dir.join("initdata.img");
            fs::write(&disk, crate::kata_agent::initdata_disk(initdata)).unwrap();
            qemu.arg("-drive")
                .arg(format!(
                    "file={},if=none,id=initdata,format=raw,readonly=on",
                    disk.display()
                ))
                .args(["-device", "virtio-blk-pci,drive=initdata"]);
        }
        if let GuestLaunch::KataAgent {
            trusted_store_mib, ..
        } = &spec.launch
        {
            if *trusted_store_mib > 0 {
                // Sparse: the host side only ever holds what the guest writes (ciphertext).
                let disk = dir.join("trusted-store.img");
                let f = fs::File::create(&disk).unwrap();
                f.set_len(u64::from(*trusted_store_mib) << 20).unwrap();
                qemu.arg("-drive")
                    .arg(format!(
                        "file={},if=none,id=trusted,format=raw,cache=unsafe",
                        disk.display()
                    ))
                    .args(["-device", "virtio-blk-pci,drive=trusted"]);
            }
        }
        fs::write(dir.join("qemu.cmdline"), format!("{qemu:?}\n")).unwrap();
        lab.spawn("qemu", qemu);
        let vm = Vm {
            lab,
            dir,
            cmd: None,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while !vm.console().contains(READY) {
            if !lab.is_running("qemu") {
                vm.fail("QEMU exited before the guest was ready");
            }
            if Instant::now() > deadline {
                vm.fail("the guest did not get ready within 120 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        vm
    }

    /// The serial console so far (kernel messages, init and guest-puller logs).
    pub fn console(&self) -> String {
        fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    /// The VM's host-side directory (initramfs, sockets, console).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Panics with `why`, the console tail and QEMU's own log.
    pub fn fail(&self, why: &str) -> ! {
        let console = self.console();
        let lines: Vec<&str> = console.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        panic!(
            "{why}\n--- guest console (last 60 lines of {}) ---\n{tail}\n--- qemu ---\n{}\n--- vhost-device-vsock ---\n{}",
            self.dir.join("console.log").display(),
            self.lab.log("qemu"),
            self.lab.log("vhost-device-vsock")
        );
    }

    /// The host side of the guest's hybrid vsock (`CONNECT <port>` on this unix socket).
    pub fn hybrid_vsock(&self) -> PathBuf {
        self.dir.join("vm.vsock")
    }

    /// The guest-puller's ttrpc endpoint as the host reaches it (hybrid vsock).
    pub fn cdh_endpoint(&self) -> cdh_api::client::Endpoint {
        cdh_api::client::Endpoint::HybridVsock {
            uds: self.dir.join("vm.vsock"),
            port: CDH_VSOCK_PORT,
        }
    }

    /// `PullImage` over vsock; retries only while the guest's listener is not up yet.
    pub fn pull_image(
        &self,
        image: &str,
        bundle: &str,
        timeout: Duration,
    ) -> Result<String, ttrpc::Error> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ep = self.cdh_endpoint();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match rt.block_on(cdh_api::client::connect_hybrid_vsock(
                &self.dir.join("vm.vsock"),
                CDH_VSOCK_PORT,
            )) {
                Ok(_probe) => break,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(e) => return Err(e),
            }
        }
        rt.block_on(cdh_api::client::pull_image_at(
            &ep,
            image,
            Path::new(bundle),
            timeout,
        ))
    }

    /// Runs `cmd` with the guest's busybox `sh -c`; returns (exit code, combined output).
    pub fn exec(&mut self, cmd: &str) -> (i32, String) {
        assert!(!cmd.contains('\n'), "guest commands are single lines");
        if self.cmd.is_none() {
            self.connect_cmd();
        }
        let r = self.cmd.as_mut().unwrap();
        if let Err(e) = r.get_mut().write_all(format!("{cmd}\n").as_bytes()) {
            self.fail(&format!("sending {cmd:?} to the guest: {e}"));
        }
        match read_reply(r) {
            Ok(v) => v,
            Err(e) => self.fail(&format!("guest command {cmd:?}: {e}")),
        }
    }

    /// Like [`Vm::exec`], panicking (with the console) unless the command succeeds; returns its output.
    pub fn exec_ok(&mut self, cmd: &str) -> String {
        let (rc, out) = self.exec(cmd);
        if rc != 0 {
            self.fail(&format!("guest command {cmd:?} failed ({rc}): {out}"));
        }
        out
    }

    fn connect_cmd(&mut self) {
        // The guest reopens the port in a loop; data written while it is closed is lost, so
        // probe with a harmless echo until one round trip succeeds.
        let sock = self.dir.join("cmd.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut n = 0;
        loop {
            n += 1;
            let attempt = (|| -> std::io::Result<BufReader<UnixStream>> {
                let s = UnixStream::connect(&sock)?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut r = BufReader::new(s);
                r.get_mut()
                    .write_all(format!("echo probe-{n}\n").as_bytes())?;
                loop {
                    let (rc, out) = read_reply(&mut r)?;
                    if rc == 0 && out.trim() == format!("probe-{n}") {
                        break;
                    }
                }
                r.get_ref()
                    .set_read_timeout(Some(Duration::from_secs(300)))?;
                Ok(r)
            })();
            match attempt {
                Ok(r) => {
                    self.cmd = Some(r);
                    return;
                }
                Err(e) if Instant::now() > deadline => {
                    self.fail(&format!("the guest's command port does not answer: {e}"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Memory figures of the guest and its guest-puller, read inside the guest.
    pub fn memory(&mut self) -> GuestMemory {
        let out = self.exec_ok(
            "echo total $(awk '/^MemTotal:/{print $2}' /proc/meminfo); \
             echo avail_now $(awk '/^MemAvailable:/{print $2}' /proc/meminfo); \
             echo avail_boot $(cat /run/vmstat/avail-boot); \
             echo avail_min $(cat /run/vmstat/avail-min); \
             echo tmpfs_peak $(cat /run/vmstat/tmpfs-peak); \
             echo tmpfs_now $(df -k /run/kata-containers/image | awk 'NR==2{print $3}'); \
             echo hwm $(awk '/^VmHWM:/{print $2}' /proc/$(cat /run/guest-puller.pid)/status); \
             echo rss $(awk '/^VmRSS:/{print $2}' /proc/$(cat /run/guest-puller.pid)/status)",
        );
        let mut m = GuestMemory::default();
        for line in out.lines() {
            let mut it = line.split_whitespace();
            let (Some(k), Some(v)) = (it.next(), it.next()) else {
                continue;
            };
            let Ok(v) = v.parse::<u64>() else {
                self.fail(&format!(
                    "guest memory figure {line:?} is not a number:\n{out}"
                ));
            };
            match k {
                "total" => m.mem_total_kib = v,
                "avail_now" => m.mem_available_now_kib = v,
                "avail_boot" => m.mem_available_boot_kib = v,
                "avail_min" => m.mem_available_min_kib = v,
                "tmpfs_peak" => m.work_tmpfs_peak_kib = v,
                "tmpfs_now" => m.work_tmpfs_now_kib = v,
                "hwm" => m.puller_hwm_kib = v,
                "rss" => m.puller_rss_kib = v,
                _ => {}
            }
        }
        if m.mem_total_kib == 0 || m.puller_hwm_kib == 0 {
            self.fail(&format!("incomplete guest memory figures: {out}"));
        }
        m
    }
}

fn read_reply(r: &mut BufReader<UnixStream>) -> std::io::Result<(i32, String)> {
    let mut out = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "command port closed",
            ));
        }
        if let Some(rest) = line.trim_end().strip_prefix(RC_MARKER) {
            let rc = rest.trim_end_matches("@@").parse().unwrap_or(-1);
            // The guest prints a newline before the marker so output without one stays apart.
            if out.ends_with('\n') {
                out.pop();
            }
            return Ok((rc, out));
        }
        out.push_str(&line);
    }
}

/// The relay QEMU starts per guest connection: the static busybox's `nc` to the host loopback
/// (the port is appended).
fn relay_cmd() -> String {
    "/bin/busybox nc 127.0.0.1".to_string()
}

fn build_initramfs(dir: &Path, assets: &VmAssets, spec: &VmSpec) -> PathBuf {
    let root = dir.join("initramfs");
    let _ = fs::remove_dir_all(&root);
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "etc",
        "lib/modules",
        "usr/local/bin",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy(&assets.busybox, root.join("bin/busybox")).unwrap();
    // Stripped: the release profile keeps line tables (120 MB) that the guest RAM would hold.
    run_ok(
        Command::new("strip")
            .arg("-o")
            .arg(root.join(GUEST_PULLER_BIN.trim_start_matches('/')))
            .arg(&assets.guest_puller),
    );
    for m in GUEST_MODULES {
        fs::copy(
            assets.modules.join(format!("{m}.ko")),
            root.join(format!("lib/modules/{m}.ko")),
        )
        .unwrap();
    }
    // The guest-puller's HTTP clients load the system roots even for plain-HTTP services, as
    // on a guest image with ca-certificates installed.
    let roots = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if !roots.is_file() {
        panic!(
            "{} missing: install the Debian package ca-certificates",
            roots.display()
        );
    }
    fs::create_dir_all(root.join("etc/ssl/certs")).unwrap();
    fs::copy(roots, root.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    // The guest image recipe: the binary, the CDH and AA names kata-agent launches, and a
    // short name.
    std::os::unix::fs::symlink("guest-puller", root.join(CDH_BIN.trim_start_matches('/'))).unwrap();
    std::os::unix::fs::symlink("guest-puller", root.join(AA_BIN.trim_start_matches('/'))).unwrap();
    std::os::unix::fs::symlink(GUEST_PULLER_BIN, root.join("bin/guest-puller")).unwrap();
    match &spec.launch {
        GuestLaunch::Serve(config) => {
            fs::write(root.join(GUEST_CONFIG.trim_start_matches('/')), config).unwrap()
        }
        GuestLaunch::KataAgent {
            agent,
            initdata,
            ocicrypt_config,
            ..
        } => {
            kata_initdata_layout(initdata);
            fs::create_dir_all(root.join("usr/bin")).unwrap();
            run_ok(
                Command::new("strip")
                    .arg("-o")
                    .arg(root.join(KATA_AGENT_BIN.trim_start_matches('/')))
                    .arg(agent),
            );
            fs::write(
                root.join(OCICRYPT_CONFIG.trim_start_matches('/')),
                ocicrypt_config,
            )
            .unwrap();
            // kata-agent reads the hostname (else "localhost") and resolv.conf only if present.
            fs::write(root.join("etc/hostname"), "guestpull-vm\n").unwrap();
            // What CDH's SecureMount runs: Debian's cryptsetup and mke2fs with their libraries
            // (the CDH finds them on the agent's PATH; `mkfs.ext4` must keep its name).
            for bin in ["/usr/sbin/cryptsetup", "/usr/sbin/mke2fs"] {
                copy_with_libraries(&root, Path::new(bin));
            }
            // glibc dlopens libgcc_s for thread exit (cryptsetup's threads), so ldd misses it.
            let gcc_s = Path::new("/lib/x86_64-linux-gnu/libgcc_s.so.1");
            fs::copy(gcc_s, root.join(gcc_s.strip_prefix("/").unwrap()))
                .unwrap_or_else(|e| panic!("copying {}: {e}", gcc_s.display()));
            std::os::unix::fs::symlink("mke2fs", root.join("usr/sbin/mkfs.ext4")).unwrap();
            if Path::new("/etc/mke2fs.conf").is_file() {
                fs::copy("/etc/mke2fs.conf", root.join("etc/mke2fs.conf")).unwrap();
            }
        }
    }
    let init = root.join("init");
    fs::write(&init, init_script(spec)).unwrap();
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.join("initramfs.cpio");
    // Uncompressed: the kernel unpacks it faster under TCG than it would gunzip it.
    run_ok(Command::new("sh").current_dir(&root).arg("-c").arg(format!(
        "find . | sort | cpio -o -H newc --quiet > {}",
        out.display()
    )));
    out
}

/// Copies the dynamically linked `bin` and every library `ldd` lists (the loader included) to
/// the same paths under `root`; panics naming the package when `bin` is missing.
fn copy_with_libraries(root: &Path, bin: &Path) {
    if !bin.is_file() {
        panic!(
            "{} missing: install the Debian packages cryptsetup-bin and e2fsprogs (make deps does)",
            bin.display()
        );
    }
    let out = Command::new("ldd").arg(bin).output().expect("ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut files = vec![bin.to_path_buf()];
    for line in text.lines() {
        // "libx.so.1 => /lib/.../libx.so.1 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push(PathBuf::from(p));
        }
    }
    for f in files {
        let dst = root.join(f.strip_prefix("/").unwrap());
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        if !dst.exists() {
            fs::copy(&f, &dst).unwrap_or_else(|e| panic!("copying {}: {e}", f.display()));
        }
    }
}

fn init_script(spec: &VmSpec) -> String {
    let agent = matches!(spec.launch, GuestLaunch::KataAgent { .. });
    // kata-agent as init mounts a tmpfs on /run unless one is there: mount it first so the
    // test's files under /run stay visible. The guest-puller's work dir has its own size-limited
    // tmpfs only when no agent wipes /run/kata-containers (CreateSandbox does).
    let storage = if agent {
        "mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run\nmkdir -p /run/kata-containers"
            .to_string()
    } else {
        format!(
            "# The guest-puller's work dir is a size-limited tmpfs.\nmkdir -p {work}\nmount -t tmpfs -o size={tmpfs}m,mode=0700 tmpfs {work}",
            work = GUEST_WORK_DIR,
            tmpfs = spec.work_tmpfs_mib
        )
    };
    let sampled = if agent { "/run" } else { GUEST_WORK_DIR };
    let (shell_start, shell_end, tail) = if agent {
        (
            "(",
            ") < /dev/null > /dev/null 2>&1 &",
            format!(
                "log \"ready (command port $port), exec {KATA_AGENT_BIN}\"\nexec {KATA_AGENT_BIN}\n"
            ),
        )
    } else {
        ("", "", String::new())
    };
    let ready = if agent {
        String::new()
    } else {
        "log \"ready (command port $port)\"".to_string()
    };
    format!(
        r#"#!/bin/busybox sh
# guestpull VM test init (generated by integration/src/vm.rs): what a Kata guest's early boot
# does, in busybox.
/bin/busybox --install -s /bin
export PATH=/bin
log() {{ echo "GUESTPULL-VM: $*"; }}
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {modules}; do
    insmod /lib/modules/$m.ko || log "insmod $m failed"
done
ip link set lo up
ip link set eth0 up && ip addr add {ip}/24 dev eth0 || log "eth0 setup failed"
{storage}
mkdir -p /run/vmstat /run/kata-containers /run/confidential-containers
awk '/^MemAvailable:/{{print $2}}' /proc/meminfo > /run/vmstat/avail-boot
cp /run/vmstat/avail-boot /run/vmstat/avail-min
echo 0 > /run/vmstat/tmpfs-peak
# Sampler: the largest work-dir tmpfs usage and the lowest MemAvailable while the VM runs.
(
    peak=0; low=$(cat /run/vmstat/avail-boot)
    while :; do
        u=$(df -k {sampled} | awk 'NR==2{{print $3}}')
        a=$(awk '/^MemAvailable:/{{print $2}}' /proc/meminfo)
        [ "$u" -gt "$peak" ] && {{ peak=$u; echo $peak > /run/vmstat/tmpfs-peak; }}
        [ "$a" -lt "$low" ] && {{ low=$a; echo $low > /run/vmstat/avail-min; }}
        usleep 50000
    done
) < /dev/null > /dev/null 2>&1 &
{launch}
port=""
for i in $(seq 1 100); do
    for p in /sys/class/virtio-ports/vport*; do
        [ "$(cat $p/name 2>/dev/null)" = "{cmd_port}" ] && port=/dev/${{p##*/}}
    done
    [ -n "$port" ] && [ -e "$port" ] && break
    sleep 0.1
done
[ -n "$port" ] || log "command port {cmd_port} not found"
{ready}
# Line-based command shell for the test: one `sh -c` per line, output then an exit-code marker.
{shell_start}
while :; do
    exec 3<>$port
    while IFS= read -r line <&3; do
        sh -c "$line" > /run/cmd.out 2>&1
        rc=$?
        cat /run/cmd.out >&3
        printf '\n{rc_marker}%s@@\n' "$rc" >&3
    done
    exec 3>&-
    sleep 0.2
done
{shell_end}
{tail}"#,
        modules = GUEST_MODULES.join(" "),
        ip = GUEST_IP,
        launch = launch_script(&spec.launch),
        cmd_port = CMD_PORT_NAME,
        rc_marker = RC_MARKER,
    )
}

/// The kernel command line: the console, and for kata-agent its options.
fn kernel_cmdline(launch: &GuestLaunch) -> String {
    let mut c = String::from("console=ttyS0 panic=-1 quiet loglevel=4 random.trust_cpu=on");
    if let GuestLaunch::KataAgent { cmdline, .. } = launch {
        c.push(' ');
        c.push_str(cmdline);
    }
    c
}

fn launch_script(launch: &GuestLaunch) -> String {
    match launch {
        GuestLaunch::Serve(_) => format!(
            "GUEST_PULLER_LOG=info {GUEST_PULLER_BIN} serve --config {GUEST_CONFIG} > /dev/console 2>&1 &\n\
             echo $! > /run/guest-puller.pid\n\
             log \"guest-puller pid $(cat /run/guest-puller.pid), uptime $(cut -d' ' -f1 /proc/uptime)s\""
        ),
        // kata-agent launches the guest components itself, after the init has exec'd it.
        GuestLaunch::KataAgent { .. } => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_loads_modules_in_dependency_order_and_serves_vsock() {
        let s = init_script(&VmSpec {
            launch: GuestLaunch::Serve(String::new()),
            forwards: vec![],
            memory_mib: 512,
            work_tmpfs_mib: 256,
        });
        let ring = s.find("virtio_ring virtio ").unwrap();
        assert!(s[ring..].contains("vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport"));
        assert!(
            s.contains("mount -t tmpfs -o size=256m,mode=0700 tmpfs /run/kata-containers/image")
        );
        assert!(s.contains("guest-puller serve --config /etc/guest-puller.toml"));
    }

    #[test]
    fn kata_agent_mode_keeps_run_and_execs_the_agent_as_pid_1() {
        let s = init_script(&VmSpec {
            launch: GuestLaunch::KataAgent {
                agent: PathBuf::from("/x"),
                initdata: String::new(),
                ocicrypt_config: String::new(),
                cmdline: "agent.log=debug".into(),
                trusted_store_mib: 0,
            },
            forwards: vec![],
            memory_mib: 512,
            work_tmpfs_mib: 0,
        });
        assert!(s.contains("mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run"));
        assert!(
            !s.contains("/run/kata-containers/image"),
            "no work-dir mount for CreateSandbox to wipe"
        );
        assert!(s.trim_end().ends_with("exec /usr/bin/kata-agent"));
        assert!(kernel_cmdline(&GuestLaunch::KataAgent {
            agent: PathBuf::from("/x"),
            initdata: String::new(),
            ocicrypt_config: String::new(),
            cmdline: "agent.log=debug".into(),
            trusted_store_mib: 0,
        })
        .ends_with(" agent.log=debug"));
    }

    #[test]
    fn replies_are_split_at_the_marker() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut w = a;
        w.write_all(b"line one\nline two\n\n@@GUESTPULL-RC 3@@\nnext\n\n@@GUESTPULL-RC 0@@\n")
            .unwrap();
        let mut r = BufReader::new(b);
        assert_eq!(
            read_reply(&mut r).unwrap(),
            (3, "line one\nline two\n".into())
        );
        assert_eq!(read_reply(&mut r).unwrap(), (0, "next\n".into()));
        drop(w);
        assert!(read_reply(&mut r).is_err());
    }
}
