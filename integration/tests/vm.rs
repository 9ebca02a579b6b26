//! The guest-puller inside a real VM (QEMU TCG, Debian kernel, busybox initramfs): the host sends
//! `PullImage` for an encrypted, cosign-signed image over vsock (hybrid vsock, as Kata carries
//! kata-agent's channel); the guest reaches the registry and the KBS only through QEMU's
//! restricted user network; the rootfs is checked inside the guest.
//! Needs root, QEMU, the Debian kernel and vhost-device-vsock (integration/scripts/fetch-vm-components.sh).

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use std::sync::Mutex;

use base64::Engine;
use integration::chain::{
    build_images, build_images_kbs, catalog_repo, cosign_policy, find_bytes, OwnerKeys, HELLO,
    OWNER_KEK_ID,
};
use integration::kata_agent::{
    container_spec, guest_pull_storage, AgentClient, BlockDevice, CRI_CONTAINER_TYPE,
    CRI_IMAGE_NAME,
};
use integration::kbs::{TestKbs, TestKbsConfig};
use integration::snapshotter_env::cri::CriClient;
use integration::snapshotter_env::{
    cri_body, ctr_ns, handler_for, list_snapshots, proxy_body, snapshot_mount, SnapshotRow,
    SnapshotterDaemon, PLUGIN,
};
use integration::vm::{
    kata_initdata_layout, GuestFwd, GuestLaunch, Vm, VmAssets, VmSpec, AA_BIN, CDH_BIN, CDH_SOCKET,
    CDH_VSOCK_PORT, GUEST_WORK_DIR, INITDATA_DIR,
};
use integration::{Containerd, ContainerdOpts, ContainerdVersion, Lab, Registry};
use p256::ecdsa::SigningKey;
use snapshotter::volume::{KataVirtualVolume, KATA_VOLUME_OPTION_PREFIX};

/// One VM at a time: two TCG guests on the 2-core machines would starve each other.
static ONE_VM: Mutex<()> = Mutex::new(());

const POLICY_URI: &str = "kbs:///default/security-policy/vm";
const KEY_URI: &str = "kbs:///default/image-key/vm";
const COSIGN_URI: &str = "kbs:///default/cosign-public-key/vm";
/// The registry and the KBS as the guest sees them (guestfwd targets).
const GUEST_REGISTRY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);
const GUEST_KBS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 101);

fn guest_config(reg_host: &str, registry: &GuestFwd, kbs: &GuestFwd) -> String {
    // The image keeps its host name (the signature identity and policy scope name it); a
    // registry rule sends the pull to the guestfwd address, the only route out of the guest.
    format!(
        r#"[image]
work_dir = "{GUEST_WORK_DIR}"
image_security_policy_uri = "{POLICY_URI}"
[image.registry_config]
insecure_registries = ["{reg}"]
[[image.registry_config.registry]]
prefix = "{reg_host}"
location = "{reg}"
insecure = true
[kbs]
url = "http://{kbs}"
[keys]
jwe_private_keys = ["{KEY_URI}"]
[server]
listen = ["vsock://-1:{CDH_VSOCK_PORT}"]
"#,
        reg = registry.guest_addr(),
        kbs = kbs.guest_addr(),
    )
}

/// A registry in `lab` with the owner's keys and the signed busybox catalog image (`:jwe`, and
/// with `kbs_keys` also `:kbs`); returns them and the image's repository.
fn busybox_images(lab: &Lab, kbs_keys: bool) -> (Registry<'_>, OwnerKeys, String) {
    let reg = Registry::start(lab);
    let keys = OwnerKeys::generate(lab);
    if kbs_keys {
        build_images_kbs(lab, &reg, &keys, &["busybox"]);
    } else {
        build_images(lab, &reg, &keys, &["busybox"]);
    }
    let repo = catalog_repo(&reg, "busybox");
    (reg, keys, repo)
}

/// Writes a test KBS resource `<repo>/<type>/<tag>` below `dir`.
fn put_resource(dir: &std::path::Path, path: &str, data: &[u8]) {
    let p = dir.join(path);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

#[test]
fn encrypted_signed_image_pulled_inside_a_vm_over_vsock() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    Lab::require_root();
    let started = Instant::now();
    let assets = VmAssets::locate();
    let lab = Lab::new("vm");
    let (reg, keys, repo) = busybox_images(&lab, false);
    let image = format!("{repo}:jwe");
    let manifest = integration::images::inspect(&reg, &image);

    // The KBS runs in this process so its counters say who was served; this process itself
    // never calls it, so every session it sees is the VM's.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let resources = lab.join("kbs-resources");
    let put = |path: &str, data: &[u8]| put_resource(&resources, path, data);
    let jwe_key = fs::read(keys.jwe_private()).unwrap();
    put("default/image-key/vm", &jwe_key);
    put(
        "default/cosign-public-key/vm",
        &fs::read(keys.cosign_pub()).unwrap(),
    );
    let policy = cosign_policy(std::slice::from_ref(&repo), COSIGN_URI);
    put(
        "default/security-policy/vm",
        &serde_json::to_vec(&policy).unwrap(),
    );
    let kbs = rt
        .block_on(TestKbs::start(TestKbsConfig::new(&resources)))
        .expect("starting the test KBS");

    let registry_fwd = GuestFwd {
        guest: GUEST_REGISTRY,
        guest_port: 5000,
        host_port: reg.host().rsplit_once(':').unwrap().1.parse().unwrap(),
    };
    let kbs_fwd = GuestFwd {
        guest: GUEST_KBS,
        guest_port: 8080,
        host_port: kbs.addr().port(),
    };
    let spec = VmSpec {
        launch: GuestLaunch::Serve(guest_config(&reg.host(), &registry_fwd, &kbs_fwd)),
        forwards: vec![registry_fwd, kbs_fwd],
        memory_mib: 1024,
        work_tmpfs_mib: 256,
    };
    let boot = Instant::now();
    let mut vm = Vm::boot(&lab, &assets, &spec);
    let boot = boot.elapsed();
    eprintln!("vm: guest ready in {boot:.1?}");

    let repo_path = repo.split_once('/').unwrap().1.to_string();
    let blob_gets = |reg: &Registry<'_>| -> Vec<String> {
        let needle = format!("\"GET /v2/{repo_path}/blobs/");
        reg.log()
            .lines()
            .filter(|l| l.contains(&needle))
            .map(str::to_string)
            .collect()
    };
    let before = blob_gets(&reg).len();
    assert_eq!(kbs.stats().attest, 0, "nobody attested before the pull");

    let mem_before = vm.memory();
    let bundle = "/run/kata-containers/vm-test";
    let pull = Instant::now();
    let digest = vm
        .pull_image(&image, bundle, Duration::from_secs(600))
        .unwrap_or_else(|e| vm.fail(&format!("PullImage {image} over vsock: {e}")));
    let pull = pull.elapsed();
    assert_eq!(digest, manifest.manifest_digest);

    // Inside the guest: the decrypted rootfs is an overlay at <bundle>/rootfs with the image's
    // content, and the image's own busybox runs from it.
    let hello = vm.exec_ok(&format!("cat {bundle}/rootfs/etc/hello.txt"));
    assert_eq!(hello.trim_end(), HELLO, "rootfs content in the guest");
    let ran = vm.exec_ok(&format!("chroot {bundle}/rootfs /bin/cat /etc/hello.txt"));
    assert_eq!(ran.trim_end(), HELLO, "the image's busybox in the guest");
    let mounts = vm.exec_ok("cat /proc/mounts");
    assert!(
        mounts
            .lines()
            .any(|l| l.starts_with("overlay ") && l.contains(&format!("{bundle}/rootfs"))),
        "no overlay rootfs in the guest:\n{mounts}"
    );
    assert!(
        vm.exec_ok(&format!("test -f {bundle}/config.json && echo yes"))
            .trim()
            == "yes",
        "bundle config.json missing in the guest"
    );
    let mem = vm.memory();

    // A second request over the same channel maps registry errors to the CDH codes.
    match vm.pull_image(
        &format!("{repo}:no-such-tag"),
        "/run/kata-containers/vm-missing",
        Duration::from_secs(120),
    ) {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), ttrpc::Code::NOT_FOUND, "{s:?}")
        }
        other => vm.fail(&format!("missing tag: expected NOT_FOUND, got {other:?}")),
    }

    // On the host: the layers left the registry only through the guest's forward (one GET per
    // encrypted layer, with the guest-puller's client, none by this process), the KBS served
    // one attested session (the VM's) and released the key to it, and nothing on the VM's
    // host side (initramfs, console, sockets) holds the plaintext or the key.
    let gets = blob_gets(&reg);
    let during: Vec<&String> = gets[before..].iter().collect();
    // The registry records the Host header: the guest addresses it by its guestfwd name,
    // every host tool by 127.0.0.1:<port>.
    for layer in &manifest.layer_digests {
        let n = during.iter().filter(|l| l.contains(layer.as_str())).count();
        assert_eq!(n, 1, "layer {layer} fetched {n} times:\n{during:#?}");
        assert_eq!(
            reg.requests_for_via(layer, &registry_fwd.guest_addr()),
            1,
            "layer {layer} not fetched through the guest's forward"
        );
    }
    for l in &during {
        assert!(
            !l.contains("skopeo") && !l.contains("containerd") && !l.contains("cosign"),
            "a blob was fetched by a host tool during the VM pull: {l}"
        );
    }
    let stats = kbs.stats();
    assert_eq!(
        (stats.attest_ok, stats.resource_unauthorized),
        (1, 0),
        "the VM's single attested session: {stats:?}"
    );
    assert!(
        stats.resource_ok >= 3,
        "policy, cosign key and image key released to the VM: {stats:?}"
    );
    let console = vm.console();
    for token in kbs.issued_tokens() {
        assert!(
            !console.contains(&token),
            "a KBS token reached the guest console"
        );
    }
    let key_body = String::from_utf8(jwe_key.clone()).unwrap();
    let key_line = key_body
        .lines()
        .nth(2)
        .expect("a PEM body line of the image key");
    for (what, needle) in [
        ("image plaintext", HELLO.as_bytes()),
        ("image key", key_line.as_bytes()),
    ] {
        if let Some(p) = find_bytes(vm.dir(), needle) {
            panic!("{what} found on the host side of the VM at {}", p.display());
        }
    }

    let mib = |k: u64| k as f64 / 1024.0;
    eprintln!(
        "VM-MEMORY image={image} layers={} boot={boot:.1?} pull={pull:.1?} mem_total={:.0}MiB \
         avail_boot={:.1}MiB avail_before_pull={:.1}MiB avail_min={:.1}MiB avail_after={:.1}MiB \
         work_tmpfs_peak={:.1}MiB work_tmpfs_after={:.1}MiB puller_vmhwm={:.1}MiB \
         puller_rss_before={:.1}MiB puller_rss_after={:.1}MiB total_test={:.1?}",
        manifest.layer_digests.len(),
        mib(mem.mem_total_kib),
        mib(mem.mem_available_boot_kib),
        mib(mem_before.mem_available_now_kib),
        mib(mem.mem_available_min_kib),
        mib(mem.mem_available_now_kib),
        mib(mem.work_tmpfs_peak_kib),
        mib(mem.work_tmpfs_now_kib),
        mib(mem.puller_hwm_kib),
        mib(mem_before.puller_rss_kib),
        mib(mem.puller_rss_kib),
        started.elapsed(),
    );
    assert!(
        mem.work_tmpfs_peak_kib > 0,
        "the pull used the work-dir tmpfs"
    );
    assert!(
        mem.puller_hwm_kib >= mem_before.puller_rss_kib,
        "VmHWM below an earlier RSS: {mem:?} / {mem_before:?}"
    );
    drop(vm);
    drop(kbs);
}

/// containerd's CRI namespace.
const CRI_NS: &str = "k8s.io";

const CREDENTIAL: &[u8] = b"pod-credential-from-the-kbs";
const CREDENTIAL_PATH: &str = "/run/confidential-containers/cdh/kbs/vm/token";

/// A pod's initdata as the Kata runtime receives it: CDH's config written for the real CDH
/// (`[kbc]` with `kbs_cert`, `[[credentials]]`, `[image]` with the policy inline, the registry
/// rule), nothing of guest-puller's own format.
fn pod_initdata(kbs_url: &str, kbs_ca: &str, policy: &str, reg_host: &str, reg: &str) -> String {
    format!(
        r#"version = "0.1.0"
algorithm = "sha384"

[data]
"aa.toml" = '''
[token_configs.kbs]
url = "{kbs_url}"
cert = """
{kbs_ca}"""

[eventlog_config]
enable_eventlog = true
'''

"cdh.toml" = '''
socket = "unix://{CDH_SOCKET}"

[kbc]
name = "cc_kbc"
url = "{kbs_url}"
kbs_cert = """
{kbs_ca}"""

[[credentials]]
resource_uri = "kbs:///default/vm-credential/token"
path = "{CREDENTIAL_PATH}"

[image]
work_dir = "{GUEST_WORK_DIR}"
image_security_policy = '{policy}'

[[image.registry_config.registry]]
prefix = "{reg_host}"
location = "{reg}"
insecure = true

[log]
level = "info"
'''
"#
    )
}

const SIGNING_KID: &str = "kbs:///default/sealed-secret/signing";
const SECRET_URI: &str = "kbs:///default/secret/pod-token";
const SECRET: &[u8] = b"unsealed-in-the-guest-only";
/// kata-agent's options on the kernel command line, as a Kata runtime configured for CoCo passes
/// them: cgroup v2, the AA + CDH launch level (no api-server-rest in this guest image), and the
/// default timeouts.
const AGENT_CMDLINE: &str =
    "systemd.unified_cgroup_hierarchy=1 agent.guest_components_procs=confidential-data-hub agent.log=info";

/// The key of the topmost committed snapshot in `ns` (the image's chain top).
fn chain_top(ctrd: &Containerd<'_>, ns: &str) -> String {
    let rows = list_snapshots(ctrd, ns);
    let committed: Vec<&SnapshotRow> = rows.iter().filter(|r| r.kind == "Committed").collect();
    let tops: Vec<&&SnapshotRow> = committed
        .iter()
        .filter(|r| !committed.iter().any(|c| c.parent == r.key))
        .collect();
    assert_eq!(tops.len(), 1, "one image chain: {rows:?}");
    tops[0].key.clone()
}

/// The guest pid of the process whose argv[0] is `bin`.
fn guest_pid(vm: &mut Vm<'_>, bin: &str) -> String {
    let out = vm.exec_ok(&format!(
        "for p in /proc/[0-9]*; do [ \"$(cat $p/cmdline 2>/dev/null | tr '\\000' '\\n' | head -n 1)\" = {bin} ] && echo ${{p#/proc/}}; done; true"
    ));
    let pids: Vec<&str> = out.split_whitespace().collect();
    if pids.len() != 1 {
        vm.fail(&format!(
            "expected one {bin} process in the guest, found {pids:?}"
        ));
    }
    pids[0].to_string()
}

/// The whole chain with the real kata-agent: containerd 2.1's CRI pulls through the guestpull
/// snapshotter (no layer reaches the host); the Kata shim's calls drive the agent, which
/// launches guest-puller as its attestation-agent and CDH with the pod's initdata, pulls the
/// encrypted, signed image through it and runs the container under rustjail, with a sealed
/// secret in its environment unsealed by the CDH.
#[test]
fn real_kata_agent_launches_guest_puller_and_runs_a_guest_pulled_encrypted_signed_image() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    Lab::require_root();
    let assets = VmAssets::locate();
    let agent_bin = integration::kata_agent::static_kata_agent();
    let lab = Lab::new("vm-kata");
    let (reg, keys, repo) = busybox_images(&lab, true);
    let image = format!("{repo}:kbs");
    let manifest = integration::images::inspect(&reg, &image);
    let repo_path = repo.split_once('/').unwrap().1.to_string();
    let layer_gets = |reg: &Registry<'_>| -> usize {
        manifest
            .layer_digests
            .iter()
            .map(|d| reg.blob_gets_of(&repo_path, d))
            .sum()
    };

    // The node: containerd 2.1 with the guestpull snapshotter for the Kata runtime handler.
    let v = ContainerdVersion::V2_1;
    let snap = SnapshotterDaemon::start(&lab, "strict = true");
    let ctrd = Containerd::start_with(
        &lab,
        v,
        ContainerdOpts {
            cri: true,
            ..Default::default()
        },
        &format!(
            "{}{}",
            cri_body(v, &lab, &reg),
            proxy_body(v, &snap.socket(), &snap.root())
        ),
    );
    let mut cri = CriClient::connect(&ctrd.socket()).unwrap();
    cri.pull_image(&image, handler_for(v))
        .unwrap_or_else(|e| panic!("CRI pull: {e}\n{}", ctrd.log()));
    assert_eq!(
        layer_gets(&reg),
        0,
        "the host fetched layers:\n{}",
        reg.log()
    );
    let cid = "guestpull-app";
    let key = format!("{cid}-rootfs");
    integration::lab::run_ok(&mut ctr_ns(
        &ctrd,
        CRI_NS,
        &[
            "snapshots",
            "--snapshotter",
            PLUGIN,
            "prepare",
            &key,
            &chain_top(&ctrd, CRI_NS),
        ],
    ));
    let (_, _, opts) = snapshot_mount(&ctrd, CRI_NS, &key);
    let volume = opts
        .iter()
        .find(|o| o.starts_with(KATA_VOLUME_OPTION_PREFIX))
        .map(|o| KataVirtualVolume::from_mount_option(o).unwrap())
        .unwrap_or_else(|| panic!("no Kata volume option in {opts:?}"));

    // The KBS: the owner's KEK, the cosign key, the pod's credential and the sealed secret's
    // key and value; the policy travels inline in the initdata.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let resources = lab.join("kbs-resources");
    let put = |path: &str, data: &[u8]| put_resource(&resources, path, data);
    put(
        OWNER_KEK_ID.trim_start_matches("kbs:///"),
        &fs::read(keys.kek()).unwrap(),
    );
    put(
        "default/cosign-public-key/vm",
        &fs::read(keys.cosign_pub()).unwrap(),
    );
    put("default/vm-credential/token", CREDENTIAL);
    let signer = SigningKey::random(&mut rand_core::OsRng);
    put(
        SIGNING_KID.trim_start_matches("kbs:///"),
        &integration::sealed::public_jwk(&signer),
    );
    put(SECRET_URI.trim_start_matches("kbs:///"), SECRET);
    let policy = cosign_policy(std::slice::from_ref(&repo), COSIGN_URI).to_string();

    let registry_fwd = GuestFwd {
        guest: GUEST_REGISTRY,
        guest_port: 5000,
        host_port: reg.host().rsplit_once(':').unwrap().1.parse().unwrap(),
    };
    // HTTPS, with a certificate for the address the guest uses, so kbs_cert is needed.
    let pki = lab.join("kbs-pki");
    fs::create_dir_all(&pki).unwrap();
    let (ca, tls) = integration::kbs::test_pki(&pki, &GUEST_KBS.to_string());
    let ca = String::from_utf8(ca).unwrap();
    // The guest's port is fixed before the KBS starts (it names it in the initdata the KBS's
    // reference digest covers).
    let guest_kbs_port = 8443;
    let initdata = pod_initdata(
        &format!("https://{GUEST_KBS}:{guest_kbs_port}"),
        &ca,
        &policy,
        &reg.host(),
        &registry_fwd.guest_addr(),
    );
    let digest = |t: &str| {
        base64::engine::general_purpose::STANDARD
            .encode(kbs_client::protocol::init_data_digest(t).unwrap().digest)
    };
    let mut kcfg = TestKbsConfig::new(&resources);
    kcfg.tls = Some(tls);
    kcfg.init_data_reference = Some(digest(&initdata));
    let kbs = rt
        .block_on(TestKbs::start(kcfg))
        .expect("starting the test KBS");
    let kbs_fwd = GuestFwd {
        guest: GUEST_KBS,
        guest_port: guest_kbs_port,
        host_port: kbs.addr().port(),
    };
    let spec = VmSpec {
        launch: GuestLaunch::KataAgent {
            agent: agent_bin,
            initdata: initdata.clone(),
            ocicrypt_config: format!(
                r#"{{"key-providers":{{"attestation-agent":{{"ttrpc":"unix://{CDH_SOCKET}"}}}}}}"#
            ),
            cmdline: AGENT_CMDLINE.to_string(),
            trusted_store_mib: 512,
        },
        forwards: vec![registry_fwd, kbs_fwd],
        memory_mib: 1536,
        work_tmpfs_mib: 0,
    };
    let boot = Instant::now();
    let mut vm = Vm::boot(&lab, &assets, &spec);
    let agent = AgentClient::connect(&vm.hybrid_vsock(), Duration::from_secs(180))
        .unwrap_or_else(|e| vm.fail(&e));
    eprintln!("vm: kata-agent serving in {:.1?}", boot.elapsed());
    let (_, agent_version) = agent.version().unwrap();
    assert_eq!(agent_version, "4.1.0", "the given kata-agent answers");

    // The agent laid out the initdata it read from the disk, byte for byte as the test expects.
    for (name, want) in kata_initdata_layout(&initdata) {
        let got = vm.exec_ok(&format!("cat {INITDATA_DIR}/{name}"));
        assert_eq!(got, want, "{INITDATA_DIR}/{name}");
    }
    // Its launch plan started guest-puller twice: as the attestation-agent and as the CDH.
    let aa = guest_pid(&mut vm, AA_BIN);
    let argv = vm.exec_ok(&format!("tr '\\000' ' ' < /proc/{aa}/cmdline"));
    assert_eq!(
        argv.trim_end(),
        format!(
            "{AA_BIN} --attestation_sock unix:///run/confidential-containers/attestation-agent/attestation-agent.sock \
             --initdata-toml {INITDATA_DIR}/initdata.toml -c {INITDATA_DIR}/aa.toml"
        )
    );
    let cdh = guest_pid(&mut vm, CDH_BIN);
    let argv = vm.exec_ok(&format!("tr '\\000' ' ' < /proc/{cdh}/cmdline"));
    assert_eq!(
        argv.trim_end(),
        format!("{CDH_BIN} -c {INITDATA_DIR}/cdh.toml")
    );
    let env = vm.exec_ok(&format!("tr '\\000' '\\n' < /proc/{cdh}/environ"));
    for want in [
        "OCICRYPT_KEYPROVIDER_CONFIG=/etc/ocicrypt_config.json",
        "PATH=/bin:/sbin/:/usr/bin/:/usr/sbin/",
    ] {
        assert!(
            env.lines().any(|l| l == want),
            "{want} not in the CDH's env:\n{env}"
        );
    }
    // [[credentials]] were fetched at start, mode 0600.
    assert_eq!(
        vm.exec_ok(&format!("cat {CREDENTIAL_PATH}")).as_bytes(),
        CREDENTIAL
    );
    assert_eq!(
        vm.exec_ok(&format!("stat -c %a {CREDENTIAL_PATH}")).trim(),
        "600"
    );

    // The Kata shim's calls: CreateSandbox, then CreateContainer with the rootfs Storage the Go
    // shim builds from the snapshotter's volume and the CRI annotations.
    agent
        .create_sandbox("guestpull-sandbox", "guestpull-pod")
        .unwrap_or_else(|e| vm.fail(&format!("CreateSandbox: {e:?}")));
    let annotations: BTreeMap<String, String> = [
        (CRI_CONTAINER_TYPE, "container"),
        (CRI_IMAGE_NAME, image.as_str()),
        ("io.kubernetes.cri.container-name", "app"),
        ("io.kubernetes.cri.sandbox-id", "guestpull-sandbox"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let storage = guest_pull_storage(&volume, &annotations, cid).unwrap();
    let sealed = integration::sealed::seal(&signer, SIGNING_KID, SECRET_URI);
    let env = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        // Set, so rustjail does not look the user up through the static agent's NSS.
        "HOME=/root".to_string(),
        format!("POD_TOKEN={sealed}"),
    ];
    // The pod's trusted-storage volume device, with the guest's numbers of the empty disk.
    let dev = vm.exec_ok("cat /sys/block/vdb/dev");
    let (major, minor) = dev.trim().split_once(':').expect("MAJ:MIN");
    let trusted = BlockDevice {
        path: "/dev/trusted_store".into(),
        major: major.parse().unwrap(),
        minor: minor.parse().unwrap(),
    };
    let oci = container_spec(
        cid,
        &[
            "/bin/sh",
            "-c",
            "cat /etc/hello.txt; echo \"token=$POD_TOKEN\"",
        ],
        &env,
        &annotations,
        &[trusted],
    );
    let pull = Instant::now();
    agent
        .create_container(cid, storage, oci, Duration::from_secs(900))
        .unwrap_or_else(|e| vm.fail(&format!("CreateContainer: {e:?}")));
    let pull = pull.elapsed();
    agent
        .start_container(cid)
        .unwrap_or_else(|e| vm.fail(&format!("StartContainer: {e:?}")));
    let stdout = String::from_utf8(agent.read_stdout(cid, Duration::from_secs(120))).unwrap();
    let status = agent
        .wait_process(cid, Duration::from_secs(120))
        .unwrap_or_else(|e| vm.fail(&format!("WaitProcess: {e:?}")));
    assert_eq!(status, 0, "container exit status; stdout:\n{stdout}");
    assert_eq!(
        stdout,
        format!("{HELLO}\ntoken={}\n", String::from_utf8_lossy(SECRET)),
        "the image's content and the unsealed secret, from the container"
    );
    eprintln!("vm: CreateContainer (guest pull) took {pull:.1?}");

    // Inside the guest: the rootfs is guest-puller's overlay at the agent's mount point.
    let mounts = vm.exec_ok("cat /proc/mounts");
    assert!(
        mounts.lines().any(|l| l.starts_with("overlay ")
            && l.contains(&format!("/run/kata-containers/{cid}/rootfs"))),
        "no overlay rootfs in the guest:\n{mounts}"
    );
    // The CDH recorded the pull as a runtime measurement through the attestation-agent.
    let events = vm.exec_ok("grep -a -o 'PullImage {[^}]*}' /run/attestation-agent/eventlog");
    assert_eq!(
        events.trim(),
        // CDH's text, byte for byte (with its space after the comma).
        format!(
            r#"PullImage {{"image":"{image}", "digest":"{}"}}"#,
            manifest.manifest_digest
        ),
        "the AA event log"
    );

    // The agent asked the CDH for trusted storage before the pull: the work dir is an ext4 on
    // a dm-crypt (LUKS2) mapping of the disk, and the layers are on it, not in guest RAM.
    let work = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(GUEST_WORK_DIR))
        .unwrap_or_else(|| {
            vm.fail(&format!(
                "no trusted storage at {GUEST_WORK_DIR}:\n{mounts}"
            ))
        })
        .to_string();
    let mut f = work.split_whitespace();
    let (source, fstype) = (f.next().unwrap(), f.nth(1).unwrap());
    assert!(
        source.starts_with("/dev/mapper/") && fstype == "ext4",
        "trusted storage mount: {work}"
    );
    let layer_files = vm.exec_ok(&format!("find {GUEST_WORK_DIR} -type f | wc -l"));
    assert!(
        layer_files.trim().parse::<u32>().unwrap() > 0,
        "nothing of the pull on the trusted store"
    );
    let head = {
        use std::io::Read;
        let mut b = [0u8; 6];
        fs::File::open(vm.dir().join("trusted-store.img"))
            .unwrap()
            .read_exact(&mut b)
            .unwrap();
        b
    };
    assert_ne!(
        &head, b"LUKS\xba\xbe",
        "the LUKS header stays in guest RAM (detached)"
    );

    // On the host: the layers left the registry once each, through the guest's forward.
    for layer in &manifest.layer_digests {
        assert_eq!(reg.blob_gets_of(&repo_path, layer), 1, "layer {layer} GETs");
        assert_eq!(
            reg.requests_for_via(layer, &registry_fwd.guest_addr()),
            1,
            "layer {layer} not fetched through the guest's forward"
        );
    }
    let stats = kbs.stats();
    assert_eq!(
        (stats.attest_ok, stats.resource_unauthorized),
        (1, 0),
        "one attested session, with the initdata the KBS expects: {stats:?}"
    );
    // Credential, cosign key, KEK, the sealed secret's key and value; no policy request.
    assert_eq!(stats.resource_ok, 5, "{stats:?}");
    // Neither the image plaintext nor the secret is anywhere on the host side of the VM, nor in
    // containerd's or the snapshotter's state.
    for dir in [vm.dir(), ctrd.root().as_path(), snap.root().as_path()] {
        for (what, needle) in [("image plaintext", HELLO.as_bytes()), ("secret", SECRET)] {
            if let Some(p) = find_bytes(dir, needle) {
                panic!("{what} found on the host at {}", p.display());
            }
        }
    }
    agent
        .remove_container(cid)
        .unwrap_or_else(|e| vm.fail(&format!("RemoveContainer: {e:?}")));

    // The host changes the initdata (one appended comment): the KBS refuses the attestation and
    // the CDH does not start, saying which digest differed from which.
    let tampered = format!("{initdata}# appended by the host\n");
    let out = {
        let (rc, out) = vm.exec(&format!(
            "kill {cdh}; while [ -e /proc/{cdh} ]; do usleep 100000; done; \
             echo '# appended by the host' >> {INITDATA_DIR}/initdata.toml; \
             env -i {env} {CDH_BIN} -c {INITDATA_DIR}/cdh.toml",
            env = integration::vm::CDH_ENV
        ));
        assert_ne!(rc, 0, "a CDH with other initdata started:\n{out}");
        out
    };
    assert!(
        out.contains(&digest(&tampered)) && out.contains(&digest(&initdata)),
        "the refusal names both digests:\n{out}"
    );
    assert!(out.contains("reference value"), "{out}");
    assert_eq!(kbs.stats().attest_ok, 1, "no second session was accepted");
    drop(vm);
    drop(kbs);
}
