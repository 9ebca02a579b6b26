//! The guest-puller inside a real VM (QEMU TCG, Debian kernel, busybox initramfs): the host sends
//! `PullImage` for an encrypted, cosign-signed image over vsock (hybrid vsock, as Kata carries
//! kata-agent's channel); the guest reaches the registry and the KBS only through QEMU's
//! restricted user network; the rootfs is checked inside the guest.
//! Needs root, QEMU, the Debian kernel and vhost-device-vsock (integration/scripts/fetch-vm-components.sh).

use std::fs;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use std::sync::Mutex;

use base64::Engine;
use integration::chain::{
    build_images, build_images_kbs, catalog_repo, cosign_policy, find_bytes, OwnerKeys, HELLO,
    OWNER_KEK_ID,
};
use integration::kbs::{TestKbs, TestKbsConfig};
use integration::vm::{
    kata_initdata_layout, GuestFwd, GuestLaunch, Vm, VmAssets, VmSpec, CDH_BIN, CDH_SOCKET,
    CDH_VSOCK_PORT, GUEST_WORK_DIR, INITDATA_DIR,
};
use integration::{Lab, Registry};

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
    let via_guest = format!("http.request.host=\"{}\"", registry_fwd.guest_addr());
    let log = reg.log();
    for layer in &manifest.layer_digests {
        let n = during.iter().filter(|l| l.contains(layer.as_str())).count();
        assert_eq!(n, 1, "layer {layer} fetched {n} times:\n{during:#?}");
        let guest = log
            .lines()
            .filter(|l| l.contains(layer.as_str()) && l.contains(&via_guest))
            .count();
        assert_eq!(
            guest, 1,
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

#[test]
fn kata_agent_launch_plan_with_initdata_pulls_an_encrypted_signed_image() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    Lab::require_root();
    let assets = VmAssets::locate();
    let lab = Lab::new("vm-kata");
    let (reg, keys, repo) = busybox_images(&lab, true);
    let image = format!("{repo}:kbs");
    let manifest = integration::images::inspect(&reg, &image);

    // The KBS holds the owner's KEK, the cosign key and the pod's credential; the policy is not
    // in the KBS at all: it travels inline in the initdata.
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
    let initdata_for = |kbs_port: u16| {
        pod_initdata(
            &format!("https://{GUEST_KBS}:{kbs_port}"),
            &ca,
            &policy,
            &reg.host(),
            &registry_fwd.guest_addr(),
        )
    };
    // The guest's port is fixed before the KBS starts (it names it in the initdata the KBS's
    // reference digest covers).
    let guest_kbs_port = 8443;
    let initdata = initdata_for(guest_kbs_port);
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
        launch: GuestLaunch::KataPlan {
            initdata: initdata.clone(),
            ocicrypt_config: format!(
                r#"{{"key-providers":{{"attestation-agent":{{"ttrpc":"unix://{CDH_SOCKET}"}}}}}}"#
            ),
        },
        forwards: vec![registry_fwd, kbs_fwd],
        memory_mib: 1024,
        work_tmpfs_mib: 256,
    };
    let mut vm = Vm::boot(&lab, &assets, &spec);

    // The layout kata-agent's initdata.rs leaves, byte for byte.
    for (name, want) in kata_initdata_layout(&initdata) {
        let got = vm.exec_ok(&format!("cat {INITDATA_DIR}/{name}"));
        assert_eq!(got, want, "{INITDATA_DIR}/{name}");
    }
    // The launch plan's argv and environment, as the guest kernel saw them.
    let pid = vm.exec_ok("cat /run/guest-puller.pid").trim().to_string();
    let argv = vm.exec_ok(&format!("tr '\\000' ' ' < /proc/{pid}/cmdline"));
    assert_eq!(
        argv.trim_end(),
        format!("{CDH_BIN} -c {INITDATA_DIR}/cdh.toml")
    );
    let env = vm.exec_ok(&format!("tr '\\000' '\\n' < /proc/{pid}/environ | sort"));
    assert_eq!(
        env.trim_end(),
        "OCICRYPT_KEYPROVIDER_CONFIG=/etc/ocicrypt_config.json\nPATH=/bin:/sbin/:/usr/bin/:/usr/sbin/"
    );
    assert_eq!(
        vm.exec_ok(&format!("test -S {CDH_SOCKET} && echo socket"))
            .trim(),
        "socket"
    );
    // [[credentials]] were fetched at start, mode 0600.
    assert_eq!(
        vm.exec_ok(&format!("cat {CREDENTIAL_PATH}")).as_bytes(),
        CREDENTIAL
    );
    assert_eq!(
        vm.exec_ok(&format!("stat -c %a {CREDENTIAL_PATH}")).trim(),
        "600"
    );

    // PullImage on the CDH socket, as kata-agent calls it (here from the guest's shell).
    let bundle = "/run/kata-containers/vm-kata";
    let digest_out = vm.exec_ok(&format!(
        "guest-puller client-pull --socket {CDH_SOCKET} --timeout 600 --bundle {bundle} {image}"
    ));
    assert_eq!(digest_out.trim(), manifest.manifest_digest);
    let hello = vm.exec_ok(&format!("cat {bundle}/rootfs/etc/hello.txt"));
    assert_eq!(hello.trim_end(), HELLO, "rootfs content in the guest");
    let ran = vm.exec_ok(&format!("chroot {bundle}/rootfs /bin/cat /etc/hello.txt"));
    assert_eq!(ran.trim_end(), HELLO, "the image's busybox in the guest");
    let stats = kbs.stats();
    assert_eq!(
        (stats.attest_ok, stats.resource_unauthorized),
        (1, 0),
        "one attested session, with the initdata the KBS expects: {stats:?}"
    );
    // Credential, cosign key, KEK; no policy request (it was inline).
    assert_eq!(stats.resource_ok, 3, "{stats:?}");

    // The host changes the initdata (one appended comment): the KBS refuses the attestation and
    // the CDH does not start, saying which digest differed from which.
    let tampered = format!("{initdata}# appended by the host\n");
    let out = {
        let (rc, out) = vm.exec(&format!(
            "kill {pid}; while [ -e /proc/{pid} ]; do usleep 100000; done; \
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
