//! The Kubernetes side of the node installer (issue 12): the manifests under `deploy/`, the
//! example pod's initdata, the DaemonSet's commands against the real `guestpull-deploy`, and the
//! installer image `test-images installer-image` writes.
//!
//! Needs: kubectl (Debian trixie's, unpacked by `integration/scripts/fetch-components.sh`),
//! the pinned kubernetes-validate (`integration/scripts/fetch-kubernetes-validate.sh`, run by
//! Debian's `/usr/bin/python3`, whose PyYAML this file also uses to read YAML), gzip and tar,
//! the workspace's binaries (`cargo build --workspace --bins`), and root for the image's chroot.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use base64::Engine as _;
use integration::containerd::lab_cache;
use integration::lab::run_ok;
use integration::{bin_path, Lab};
use serde_json::Value;
use sha2::{Digest as _, Sha256, Sha384};

/// Debian's interpreter: the one fetch-kubernetes-validate.sh installs for.
const PYTHON: &str = "/usr/bin/python3";
/// coreutils' chroot, by path: the chroot'd commands run with an empty environment.
const CHROOT: &str = "/usr/sbin/chroot";
/// The oldest Kubernetes minor the manifests must validate for.
const OLDEST_MINOR: u32 = 30;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("workspace root")
}

fn deploy_dir() -> PathBuf {
    repo().join("deploy")
}

fn kubectl() -> PathBuf {
    let p = lab_cache().join("kubectl/usr/bin/kubectl");
    if !p.is_file() {
        panic!(
            "kubectl not found at {}: run integration/scripts/fetch-components.sh (make deps and .ci/run do)",
            p.display()
        );
    }
    p
}

fn kubernetes_validate_dir() -> PathBuf {
    let d = lab_cache().join("kubernetes-validate");
    if !d.join("kubernetes_validate").is_dir() {
        panic!(
            "kubernetes-validate not found in {}: run integration/scripts/fetch-kubernetes-validate.sh (make deps and .ci/run do)",
            d.display()
        );
    }
    d
}

/// Debian's python3 with the kubernetes-validate tree (and its PyYAML) on its path.
fn python() -> Command {
    if !Path::new(PYTHON).is_file() {
        panic!("{PYTHON} not found: apt-get install python3 (.ci/packages.txt)");
    }
    let mut c = Command::new(PYTHON);
    c.env("PYTHONPATH", kubernetes_validate_dir())
        .env("PYTHONDONTWRITEBYTECODE", "1");
    c
}

/// Every document of a YAML file (or stream), as JSON.
fn yaml_docs(path: &Path) -> Vec<Value> {
    let out = run_ok(
        python()
            .arg("-c")
            .arg(
                "import json, sys, yaml\n\
         docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
         json.dump(docs, sys.stdout)",
            )
            .arg(path),
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn kustomize() -> String {
    run_ok(Command::new(kubectl()).arg("kustomize").arg(deploy_dir()))
}

/// The kustomize rendering, written into the lab (for the tools that read files).
fn rendered(lab: &Lab) -> PathBuf {
    let p = lab.join("kustomize.yaml");
    fs::write(&p, kustomize()).unwrap();
    p
}

/// Every YAML file under deploy/ but the kustomization (kustomize's input, not an object).
fn manifest_files() -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&deploy_dir(), &mut files);
    let kustomization = deploy_dir().join("kustomization.yaml");
    assert!(files.contains(&kustomization), "{files:?}");
    files.retain(|f| f != &kustomization);
    files.sort();
    files
}

/// The Kubernetes minors the installed kubernetes-validate has strict schemas for.
fn schema_minors() -> Vec<u32> {
    let dir = kubernetes_validate_dir().join("kubernetes_validate/kubernetes-json-schema");
    let mut minors: Vec<u32> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let v = name.strip_prefix("v1.")?.strip_suffix(".0-local-strict")?;
            v.parse().ok()
        })
        .collect();
    minors.sort();
    minors
}

/// `kind/name` as kubernetes-validate names a resource.
fn resource_name(doc: &Value) -> String {
    format!(
        "{}/{}",
        doc["kind"].as_str().unwrap_or_default().to_lowercase(),
        doc["metadata"]["name"].as_str().unwrap_or_default()
    )
}

fn kubernetes_validate(minor: u32, files: &[PathBuf]) -> Output {
    python()
        .args(["-m", "kubernetes_validate", "--strict", "-k"])
        .arg(format!("1.{minor}.0"))
        .args(files)
        .output()
        .expect("running kubernetes-validate")
}

#[test]
fn every_manifest_validates_strictly_for_each_kubernetes_minor_from_1_30_to_the_newest_schema() {
    let lab = Lab::new("k8s-validate");
    let mut files = manifest_files();
    for want in [
        "manifests/namespace.yaml",
        "manifests/serviceaccount.yaml",
        "manifests/daemonset.yaml",
        "manifests/runtimeclasses.yaml",
        "examples/pod.yaml",
    ] {
        assert!(
            files.contains(&deploy_dir().join(want)),
            "{want}: {files:?}"
        );
    }
    files.push(rendered(&lab));
    // What each file must be reported to pass: one line per document, by kind and name.
    let mut expected = BTreeSet::new();
    for f in &files {
        let docs = yaml_docs(f);
        assert!(!docs.is_empty(), "{} has no documents", f.display());
        for d in docs {
            expected.insert(format!("{} {}", f.display(), resource_name(&d)));
        }
    }
    let minors = schema_minors();
    let newest = *minors.last().expect("no schemas in kubernetes-validate");
    assert!(newest >= OLDEST_MINOR, "newest schema 1.{newest}");
    for minor in OLDEST_MINOR..=newest {
        assert!(minors.contains(&minor), "no strict schema for 1.{minor}");
        let out = kubernetes_validate(minor, &files);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "1.{minor}: {}\n{text}", out.status);
        // A kind without a schema (a typo) is only a WARN with exit 0: require each document's
        // INFO line, and nothing but those.
        let mut passed = BTreeSet::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let rest = line
                .strip_prefix("INFO ")
                .unwrap_or_else(|| panic!("1.{minor}: {line}"));
            let (file, res) = rest
                .split_once(" passed for resource ")
                .unwrap_or_else(|| panic!("1.{minor}: {line}"));
            let res = res
                .strip_suffix(&format!(" against version 1.{minor}"))
                .unwrap_or_else(|| panic!("1.{minor}: {line}"));
            passed.insert(format!("{file} {res}"));
        }
        assert_eq!(passed, expected, "1.{minor}");
    }
}

/// The validator really is strict here: a misspelt field fails, so the passes above mean something.
#[test]
fn strict_validation_refuses_a_misspelt_field() {
    let lab = Lab::new("k8s-validate-neg");
    let ds = fs::read_to_string(deploy_dir().join("manifests/daemonset.yaml")).unwrap();
    assert!(ds.contains("      hostPID: true\n"));
    let bad = lab.join("daemonset.yaml");
    fs::write(
        &bad,
        ds.replace("      hostPID: true\n", "      hostPid: true\n"),
    )
    .unwrap();
    let out = kubernetes_validate(OLDEST_MINOR, &[bad]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("'hostPid' was unexpected"), "{stdout}");
}

fn by_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn kustomize_docs(lab: &Lab) -> Vec<Value> {
    yaml_docs(&rendered(lab))
}

#[test]
fn kustomize_renders_the_namespace_account_daemonset_and_runtimeclasses() {
    let lab = Lab::new("k8s-kustomize");
    // Only `resources` and `images`, and every manifest is a resource.
    let k = yaml_docs(&deploy_dir().join("kustomization.yaml"));
    let keys: BTreeSet<&str> = k[0]
        .as_object()
        .unwrap()
        .keys()
        .map(|s| s.as_str())
        .collect();
    assert_eq!(keys, BTreeSet::from(["images", "resources"]));
    let resources: BTreeSet<&str> = k[0]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let manifests: BTreeSet<String> = fs::read_dir(deploy_dir().join("manifests"))
        .unwrap()
        .map(|e| format!("manifests/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    assert_eq!(
        resources,
        manifests
            .iter()
            .map(|s| s.as_str())
            .collect::<BTreeSet<_>>()
    );

    let docs = kustomize_docs(&lab);
    let kinds: BTreeMap<String, usize> = docs.iter().fold(BTreeMap::new(), |mut m, d| {
        *m.entry(d["kind"].as_str().unwrap().to_string())
            .or_default() += 1;
        m
    });
    assert_eq!(
        kinds,
        BTreeMap::from([
            ("DaemonSet".to_string(), 1),
            ("Namespace".to_string(), 1),
            ("RuntimeClass".to_string(), 3),
            ("ServiceAccount".to_string(), 1),
        ])
    );
    assert_eq!(
        by_kind(&docs, "Namespace")[0]["metadata"]["name"],
        "guestpull-system"
    );
    for kind in ["ServiceAccount", "DaemonSet"] {
        assert_eq!(
            by_kind(&docs, kind)[0]["metadata"]["namespace"],
            "guestpull-system",
            "{kind}"
        );
    }
    let ds = by_kind(&docs, "DaemonSet")[0];
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["serviceAccountName"],
        by_kind(&docs, "ServiceAccount")[0]["metadata"]["name"]
    );
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["nodeSelector"]["guestpull.io/install"], "true");
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}])
    );
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "ghcr.io/guestpull/guestpull-deploy:latest");
    assert_eq!(c["securityContext"]["privileged"], true);
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["requests"]["memory"].is_string());
    // The host's root at /host.
    let host_vol = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["hostPath"]["path"] == "/")
        .expect("a hostPath / volume");
    assert!(c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == host_vol["name"] && m["mountPath"] == "/host"));
    // Uninstall restarts containerd and waits up to 120 s for it, after the snapshotter.
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() >= 240);

    // The RuntimeClasses: the handlers the installer wires, kept on installed nodes.
    let env = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "GUESTPULL_HANDLERS")
        .expect("GUESTPULL_HANDLERS");
    let handlers: BTreeSet<&str> = env["value"].as_str().unwrap().split(',').collect();
    let mut classes = BTreeSet::new();
    for rc in by_kind(&docs, "RuntimeClass") {
        assert_eq!(rc["apiVersion"], "node.k8s.io/v1");
        assert_eq!(rc["handler"], rc["metadata"]["name"]);
        assert_eq!(
            rc["scheduling"]["nodeSelector"]["guestpull.io/install"],
            "true"
        );
        assert!(rc["overhead"]["podFixed"]["memory"].is_string(), "{rc}");
        assert!(rc["overhead"]["podFixed"]["cpu"].is_string(), "{rc}");
        classes.insert(rc["handler"].as_str().unwrap());
    }
    assert_eq!(
        classes,
        BTreeSet::from(["kata-qemu-coco-dev", "kata-qemu-snp", "kata-qemu-tdx"])
    );
    assert_eq!(handlers, classes);
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut child = Command::new("gzip")
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gzip (Debian's gzip package) is not installed");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "gzip -dc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn example_pod_initdata_annotation_is_initdata_toml_gzipped_and_base64() {
    let pod = &yaml_docs(&deploy_dir().join("examples/pod.yaml"))[0];
    let ann = &pod["metadata"]["annotations"];
    // The runtime class is one of ours, and containerd 1.7's PullImage sees its handler.
    let class = pod["spec"]["runtimeClassName"].as_str().unwrap();
    assert_eq!(class, "kata-qemu-coco-dev");
    assert_eq!(ann["io.containerd.cri.runtime-handler"], class);
    let rcs = yaml_docs(&deploy_dir().join("manifests/runtimeclasses.yaml"));
    assert!(rcs.iter().any(|r| r["metadata"]["name"] == class));

    // As Kata's runtime reads it: standard base64, then gzip.
    let b64 = ann["io.katacontainers.config.hypervisor.cc_init_data"]
        .as_str()
        .expect("cc_init_data annotation");
    let gz = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("standard base64");
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "not gzip");
    let toml_bytes = gunzip(&gz);
    let file = fs::read(deploy_dir().join("examples/initdata.toml")).unwrap();
    assert!(
        toml_bytes == file,
        "the annotation is not deploy/examples/initdata.toml byte for byte; re-encode with\n  gzip -9nc deploy/examples/initdata.toml | base64 -w0"
    );

    // The initdata format kata-agent and trustee accept, digested as they digest it.
    let text = String::from_utf8(toml_bytes).unwrap();
    let digest = kbs_client::protocol::init_data_digest(&text).expect("initdata");
    assert_eq!(digest.algorithm, "sha384");
    assert_eq!(digest.digest, Sha384::digest(text.as_bytes()).to_vec());
    let doc: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(doc["version"].as_str(), Some("0.1.0"));
    let data = doc["data"].as_table().expect("[data]");
    let names: BTreeSet<&str> = data.keys().map(|k| k.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["aa.toml", "cdh.toml", "policy.rego"])
    );

    // Each entry is what its reader in the guest accepts.
    let cdh = data["cdh.toml"].as_str().unwrap();
    guest_puller::config::Config::from_toml(cdh).unwrap_or_else(|e| panic!("cdh.toml: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let aa_path = dir.path().join("aa.toml");
    fs::write(&aa_path, data["aa.toml"].as_str().unwrap()).unwrap();
    let aa = guest_puller::aa::config::AaToml::from_file(&aa_path)
        .unwrap_or_else(|e| panic!("aa.toml: {e}"));
    let kbs = aa.token_configs.kbs.expect("[token_configs.kbs]");
    assert!(
        cdh.contains(&format!("url = \"{}\"", kbs.url)),
        "AA and CDH name one KBS"
    );
    let rego = data["policy.rego"].as_str().unwrap();
    assert!(
        rego.trim_start().starts_with("package agent_policy"),
        "{rego}"
    );
    for denied in [
        "ExecProcessRequest",
        "ReadStreamRequest",
        "SetPolicyRequest",
    ] {
        assert!(
            rego.contains(&format!("default {denied} := false")),
            "{denied} not denied"
        );
    }
    assert!(rego.contains("default PullImageRequest := true"));
}

fn daemonset() -> Value {
    let docs = yaml_docs(&deploy_dir().join("manifests/daemonset.yaml"));
    by_kind(&docs, "DaemonSet")[0].clone()
}

fn argv(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a command: {v}"))
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// The value after `flag` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} not in {args:?}"));
    &args[i + 1]
}

/// Runs the real binary with a command's arguments (its argv[0] is the image's PATH name).
fn deploy_cmd(args: &[String]) -> Command {
    assert_eq!(args[0], "guestpull-deploy", "{args:?}");
    let mut c = Command::new(bin_path("guestpull-deploy"));
    c.args(&args[1..])
        .env_remove("GUESTPULL_HOST_ROOT")
        .env_remove("GUESTPULL_HANDLERS");
    c
}

#[test]
fn daemonset_commands_are_ones_guestpull_deploy_accepts() {
    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let install = argv(&c["command"]);
    let probe = argv(&c["readinessProbe"]["exec"]["command"]);
    let pre_stop = argv(&c["lifecycle"]["preStop"]["exec"]["command"]);
    assert_eq!(&install[..2], ["guestpull-deploy", "install"]);
    assert_eq!(&probe[..2], ["guestpull-deploy", "ready"]);
    assert_eq!(&pre_stop[..2], ["guestpull-deploy", "uninstall"]);
    assert!(install.contains(&"--wait".to_string()), "{install:?}");
    assert_eq!(flag(&install, "--host-root"), "/host");
    assert_eq!(flag(&pre_stop, "--host-root"), "/host");
    // One ready file: install writes it, the probe checks it, uninstall removes it first; it
    // lives on the pod's own volume (the root filesystem is read-only).
    let ready = flag(&install, "--ready-file");
    assert_eq!(flag(&probe, "--ready-file"), ready);
    assert_eq!(flag(&pre_stop, "--ready-file"), ready);
    let ready_dir = Path::new(ready).parent().unwrap();
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| Path::new(m["mountPath"].as_str().unwrap()) == ready_dir)
        .unwrap_or_else(|| panic!("no volume at {}", ready_dir.display()));
    let vol = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert!(vol["emptyDir"].is_object(), "{vol}");

    // install and uninstall would change this machine: clap parses every argument before it
    // reaches a trailing --help, so an unknown subcommand or flag fails here (exit 2).
    for args in [&install, &pre_stop] {
        let mut with_help = args.clone();
        with_help.push("--help".into());
        let out = deploy_cmd(&with_help).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        for a in args.iter().filter(|a| a.starts_with("--")) {
            assert!(help.contains(a.as_str()), "{a} not in `{} --help`", args[1]);
        }
    }
    // The control: a flag it does not know is refused the same way.
    let mut typo = install.clone();
    typo.insert(2, "--host-rooot".into());
    typo.push("--help".into());
    let out = deploy_cmd(&typo).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{typo:?}");

    // The probe itself, run for real: not ready without the file, ready with it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ready");
    let mut probe_here = probe.clone();
    let i = probe_here.iter().position(|a| a == "--ready-file").unwrap();
    probe_here[i + 1] = file.display().to_string();
    let out = deploy_cmd(&probe_here).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{probe_here:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not written yet"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(&file, "containerd 2.1.9\n").unwrap();
    let out = deploy_cmd(&probe_here).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("{digest}"));
    let data = fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(
        format!("sha256:{}", hex::encode(Sha256::digest(&data))),
        digest,
        "blob content does not match its digest"
    );
    data
}

/// Follows a descriptor to its blob, checking digest, size and media type.
fn follow(layout: &Path, desc: &Value, media_type: &str) -> Vec<u8> {
    assert_eq!(desc["mediaType"], media_type, "{desc}");
    let data = blob(layout, desc["digest"].as_str().unwrap());
    assert_eq!(desc["size"].as_u64(), Some(data.len() as u64), "{desc}");
    data
}

/// What `ldd` says `bin` loads (absolute paths; the vDSO has none).
fn ldd_paths(bin: &Path) -> BTreeSet<String> {
    let out = run_ok(Command::new("ldd").arg(bin));
    out.lines()
        .filter_map(|l| {
            let t = l.split("=>").last()?.trim();
            assert!(!t.starts_with("not found"), "{}: {l}", bin.display());
            let p = t.split_whitespace().next()?;
            p.starts_with('/')
                .then(|| p.trim_start_matches('/').to_string())
        })
        .collect()
}

#[test]
fn installer_image_holds_the_three_binaries_and_their_libraries_and_runs_from_its_rootfs() {
    integration::Lab::require_root();
    let lab = Lab::new("installer-image");
    let deploy = bin_path("guestpull-deploy");
    let bin_dir = deploy.parent().unwrap();
    let bins = [
        "guestpull-deploy",
        "guestpull-snapshotter",
        "nydus-overlayfs",
    ];
    for b in bins {
        bin_path(b);
    }
    let layout = lab.join("oci");
    let out = run_ok(
        Command::new(bin_path("test-images"))
            .args(["installer-image", "--bin-dir"])
            .arg(bin_dir)
            .arg("--dest")
            .arg(&layout)
            .args(["--tag", "guestpull-deploy"]),
    );
    let written: Value = serde_json::from_str(&out).expect("test-images prints the digests");

    // index.json → manifest → config and layer, every digest and size checked.
    let oci_layout: Value =
        serde_json::from_slice(&fs::read(layout.join("oci-layout")).unwrap()).unwrap();
    assert_eq!(oci_layout["imageLayoutVersion"], "1.0.0");
    let index: Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let descs = index["manifests"].as_array().unwrap();
    assert_eq!(descs.len(), 1, "{index}");
    let desc = &descs[0];
    assert_eq!(
        desc["annotations"]["org.opencontainers.image.ref.name"],
        "guestpull-deploy"
    );
    assert_eq!(desc["digest"], written["digest"]);
    let manifest: Value = serde_json::from_slice(&follow(
        &layout,
        desc,
        "application/vnd.oci.image.manifest.v1+json",
    ))
    .unwrap();
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(manifest["config"]["digest"], written["config_digest"]);
    let config: Value = serde_json::from_slice(&follow(
        &layout,
        &manifest["config"],
        "application/vnd.oci.image.config.v1+json",
    ))
    .unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "one layer");
    let gz = follow(
        &layout,
        &layers[0],
        "application/vnd.oci.image.layer.v1.tar+gzip",
    );
    let tar = gunzip(&gz);
    assert_eq!(
        config["rootfs"]["diff_ids"],
        serde_json::json!([format!("sha256:{}", hex::encode(Sha256::digest(&tar)))])
    );
    assert_eq!(config["os"], "linux");
    assert_eq!(
        config["architecture"],
        match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            a => a,
        }
    );

    // Entrypoint + Cmd are the DaemonSet container's command.
    let ds = daemonset();
    let command = argv(&ds["spec"]["template"]["spec"]["containers"][0]["command"]);
    let entry = argv(&config["config"]["Entrypoint"]);
    assert_eq!(entry, ["/usr/local/bin/guestpull-deploy"]);
    assert_eq!(
        Path::new(&entry[0]).file_name().unwrap(),
        command[0].as_str()
    );
    assert_eq!(argv(&config["config"]["Cmd"]), command[1..]);
    assert_eq!(
        config["config"]["Env"],
        serde_json::json!(["PATH=/usr/local/bin"])
    );

    // The layer: exactly the binaries, the libraries ldd names for them, their directories.
    let tar_path = lab.join("layer.tar");
    fs::write(&tar_path, &tar).unwrap();
    let listing = run_ok(Command::new("tar").arg("-tvf").arg(&tar_path));
    let mut files = BTreeSet::new();
    let mut dirs = BTreeSet::new();
    for line in listing.lines() {
        let path = line.split_whitespace().last().unwrap().to_string();
        match line.chars().next() {
            Some('-') => {
                files.insert(path);
            }
            Some('d') => {
                dirs.insert(path.trim_end_matches('/').to_string());
            }
            _ => panic!("only files and directories expected: {line}"),
        }
    }
    let mut want: BTreeSet<String> = bins.iter().map(|b| format!("usr/local/bin/{b}")).collect();
    for b in bins {
        want.extend(ldd_paths(&bin_dir.join(b)));
    }
    assert!(
        want.iter().any(|w| w.contains("libc.so")),
        "the workspace binaries are dynamic: {want:?}"
    );
    assert_eq!(files, want);
    for d in &dirs {
        assert!(
            files.iter().any(|f| f.starts_with(&format!("{d}/"))),
            "directory {d} holds nothing"
        );
    }
    assert!(!files.iter().any(|f| f.ends_with("/sh")), "no shell");

    // Unpacked, each binary starts with only what the image holds.
    let rootfs = lab.join("rootfs");
    fs::create_dir_all(&rootfs).unwrap();
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(&tar_path)
            .arg("-C")
            .arg(&rootfs),
    );
    for b in bins {
        let src = fs::read(bin_dir.join(b)).unwrap();
        let packed = fs::read(rootfs.join("usr/local/bin").join(b)).unwrap();
        assert!(src == packed, "{b} differs from the workspace's");
    }
    let version = run_ok(
        Command::new(CHROOT)
            .arg(&rootfs)
            .args(["/usr/local/bin/guestpull-deploy", "--version"])
            .env_clear(),
    );
    assert_eq!(
        version.trim(),
        format!("guestpull-deploy {}", env!("CARGO_PKG_VERSION")),
        "clap's `<name> <version>`"
    );
    // The other two load as well: the snapshotter's --help, and the mount helper's own usage
    // error (it has no --help) rather than the loader's.
    let snap = run_ok(
        Command::new(CHROOT)
            .arg(&rootfs)
            .args(["/usr/local/bin/guestpull-snapshotter", "--help"])
            .env_clear(),
    );
    assert!(snap.contains("Usage"), "{snap}");
    let out = Command::new(CHROOT)
        .arg(&rootfs)
        .args(["/usr/local/bin/nydus-overlayfs", "--help"])
        .env_clear()
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("nydus-overlayfs: "), "{stderr}");
    // The control: the same chroot without one library fails to start.
    let libc = files
        .iter()
        .find(|f| f.contains("libc.so"))
        .unwrap()
        .clone();
    fs::remove_file(rootfs.join(&libc)).unwrap();
    let out = Command::new(CHROOT)
        .arg(&rootfs)
        .args(["/usr/local/bin/guestpull-deploy", "--version"])
        .env_clear()
        .output()
        .unwrap();
    assert!(!out.status.success(), "started without {libc}");
}
