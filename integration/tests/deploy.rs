//! The node installer against real containerd 1.6, 1.7 and 2.1: each fake node starts from that
//! release's own `containerd config default` output (plus the site edits every node has), the
//! real daemon runs from what `guestpull-deploy install` leaves, the guest-pull chain runs
//! through it, and `uninstall` gives the node back byte for byte.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Stdio;

use integration::chain::{build_images, catalog_repo, cri_pull_and_run, GuestSide};
use integration::node::{Node, CONTAINERD_UNIT, KATA_HANDLER, SNAPSHOTTER_UNIT};
use integration::{bin_path, ContainerdVersion, Lab};
use toml_edit::{value, Array, DocumentMut, Item, Table};

/// The handler flags each release installs with (1.6 has no per-runtime snapshotter).
fn install_args(v: ContainerdVersion) -> Vec<&'static str> {
    let mut a = vec!["--handlers", KATA_HANDLER];
    if v == ContainerdVersion::V1_6 {
        a.push("--allow-global-snapshotter");
    }
    a
}

fn get<'v>(v: &'v toml::Value, path: &[&str]) -> Option<&'v toml::Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn get_str<'v>(v: &'v toml::Value, path: &[&str]) -> Option<&'v str> {
    get(v, path).and_then(|v| v.as_str())
}

/// The snapshotter containerd's merged config gives the Kata handler's pulls and containers.
fn handler_snapshotters(node: &Node<'_>) -> Vec<Option<String>> {
    let d = node.config_dump();
    let s = |p: &[&str]| get_str(&d, p).map(String::from);
    match node.version() {
        ContainerdVersion::V1_6 => vec![s(&[
            "plugins",
            "io.containerd.grpc.v1.cri",
            "containerd",
            "snapshotter",
        ])],
        ContainerdVersion::V1_7 => vec![s(&[
            "plugins",
            "io.containerd.grpc.v1.cri",
            "containerd",
            "runtimes",
            KATA_HANDLER,
            "snapshotter",
        ])],
        ContainerdVersion::V2_1 => vec![
            s(&[
                "plugins",
                "io.containerd.cri.v1.images",
                "runtime_platforms",
                KATA_HANDLER,
                "snapshotter",
            ]),
            s(&[
                "plugins",
                "io.containerd.cri.v1.runtime",
                "containerd",
                "runtimes",
                KATA_HANDLER,
                "snapshotter",
            ]),
        ],
    }
}

fn assert_on(node: &Node<'_>, snapshotter: &str) {
    for s in handler_snapshotters(node) {
        assert_eq!(
            s.as_deref(),
            Some(snapshotter),
            "containerd {}: the Kata handler's snapshotter",
            node.version().label()
        );
    }
}

/// Files that differ between two snapshots of a node, for a readable failure.
fn diff(a: &BTreeMap<String, Vec<u8>>, b: &BTreeMap<String, Vec<u8>>) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push(format!("- {k}")),
            Some(w) if w != v => out.push(format!(
                "~ {k}\n--- before\n{}\n--- after\n{}",
                String::from_utf8_lossy(v),
                String::from_utf8_lossy(w)
            )),
            _ => {}
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        out.push(format!("+ {k}"));
    }
    out
}

fn assert_same_files(what: &str, a: &BTreeMap<String, Vec<u8>>, b: &BTreeMap<String, Vec<u8>>) {
    let d = diff(a, b);
    assert!(d.is_empty(), "{what}:\n{}", d.join("\n"));
}

/// Uninstall gives the node back: every file as it was, the snapshotter gone, containerd up
/// without it, the pod no longer ready.
fn uninstall_and_check(node: &Node<'_>, before: &BTreeMap<String, Vec<u8>>) {
    let ready = node.host_path("/run/guestpull-deploy/ready");
    node.deploy_ok("uninstall", &["--ready-file", ready.to_str().unwrap()]);
    assert_same_files(
        &format!(
            "containerd {}: the node after uninstall",
            node.version().label()
        ),
        before,
        &node.files(),
    );
    assert!(!ready.exists(), "the ready file is removed first");
    assert!(node.unit_pid(CONTAINERD_UNIT).is_some(), "containerd runs");
    node.wait_containerd();
    assert!(!node.plugin_loaded(), "containerd without guestpull");
    assert_eq!(node.unit_pid(SNAPSHOTTER_UNIT), None, "snapshotter stopped");
}

#[test]
fn install_runs_the_chain_on_every_containerd_twice_is_once_and_uninstall_restores_the_node() {
    let lab = Lab::new("deploy-chain");
    let side = GuestSide::start(&lab, &["busybox", "pause"], |lab, reg, keys, only| {
        build_images(lab, reg, keys, only);
    });
    let image = format!("{}:jwe", catalog_repo(&side.reg, "busybox"));
    for v in ContainerdVersion::all() {
        let l = v.label();
        let node = Node::new(
            &lab,
            &format!("node-{l}"),
            v,
            &side.reg,
            &[side.guest.helper_env()],
            |_, _| {},
        );
        let before = node.files();

        if v == ContainerdVersion::V1_6 {
            let out = node.deploy("install", &["--handlers", KATA_HANDLER]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains("--allow-global-snapshotter"),
                "1.6 is refused without the flag: {err}"
            );
            assert_same_files("a refused install changes nothing", &before, &node.files());
        }

        let ready = node.host_path("/run/guestpull-deploy/ready");
        let mut args = install_args(v);
        args.extend(["--ready-file", ready.to_str().unwrap()]);
        node.deploy_ok("install", &args);
        assert!(node.plugin_loaded(), "{l}: guestpull loaded");
        assert_on(&node, "guestpull");
        let probe = std::process::Command::new(bin_path("guestpull-deploy"))
            .args(["ready", "--ready-file", ready.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(probe.success(), "{l}: the readiness probe passes");

        // The chain through the installed node: CRI pulls under the Kata handler fetch no
        // layer on the host, and the container runs from the rootfs the guest pulled.
        let ctrd = node.containerd();
        let handler = (v != ContainerdVersion::V1_6).then_some(KATA_HANDLER);
        cri_pull_and_run(
            &ctrd,
            &lab,
            &side,
            &image,
            handler,
            &format!("deploy-{}", l.replace('.', "-")),
        );
        drop(ctrd);

        // Twice is once: nothing written, nothing restarted.
        let installed = node.files();
        let pids = (
            node.unit_pid(CONTAINERD_UNIT),
            node.unit_pid(SNAPSHOTTER_UNIT),
        );
        let log = node.deploy_ok("install", &args);
        assert!(
            log.contains("written=0") && log.contains("restarted_containerd=false"),
            "{l}: a rerun writes and restarts nothing:\n{log}"
        );
        assert_same_files("a second install", &installed, &node.files());
        assert_eq!(
            pids,
            (
                node.unit_pid(CONTAINERD_UNIT),
                node.unit_pid(SNAPSHOTTER_UNIT)
            ),
            "{l}: no daemon restarted"
        );

        uninstall_and_check(&node, &before);
        // The state stays unless asked for.
        let state = node.host_path("/var/lib/containerd/io.containerd.snapshotter.v1.guestpull");
        assert!(state.is_dir(), "{l}: state kept without --remove-state");
        node.deploy_ok("uninstall", &["--remove-state"]);
        assert!(!state.exists(), "{l}: --remove-state removes it");
    }
}

/// Runs install in the background until it hangs at `systemctl <verb> <unit>`, kills it with
/// SIGKILL there, and returns once it is dead (the hung call too).
fn kill_install_at(node: &Node<'_>, args: &[&str], verb: &str, unit: &str) {
    node.hang_at(verb, unit);
    let mut child = node
        .deploy_cmd("install", args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting guestpull-deploy");
    let pid = node.wait_hung(verb, unit);
    child.kill().unwrap();
    child.wait().unwrap();
    node.release_hung(verb, unit, pid);
}

#[test]
fn a_kill_mid_install_leaves_a_startable_config_and_a_rerun_finishes() {
    let lab = Lab::new("deploy-kill");
    let reg = integration::Registry::start(&lab);
    let cases = [
        // Configs written, containerd not yet restarted.
        (ContainerdVersion::V1_7, "restart", CONTAINERD_UNIT),
        (ContainerdVersion::V2_1, "restart", CONTAINERD_UNIT),
        // The journal and binaries written, no config touched yet.
        (ContainerdVersion::V2_1, "restart", SNAPSHOTTER_UNIT),
    ];
    for (i, (v, verb, unit)) in cases.into_iter().enumerate() {
        let what = format!("containerd {} killed at {verb} {unit}", v.label());
        let node = Node::new(&lab, &format!("node-{i}"), v, &reg, &[], |_, _| {});
        let before = node.files();
        let args = install_args(v);
        kill_install_at(&node, &args, verb, unit);
        assert!(
            node.read("/var/lib/guestpull-deploy/journal.json")
                .is_some(),
            "{what}: the journal was written before anything else"
        );
        if unit == SNAPSHOTTER_UNIT {
            assert_eq!(
                node.read("/etc/containerd/config.toml"),
                before.get("etc/containerd/config.toml").cloned(),
                "{what}: containerd's config not yet touched"
            );
        }
        // containerd starts from what the killed install left.
        node.config_dump();
        let out = node
            .systemctl(&["restart", CONTAINERD_UNIT])
            .output()
            .unwrap();
        assert!(out.status.success(), "{what}: restart containerd");
        node.wait_containerd();

        let log = node.deploy_ok("install", &args);
        assert!(node.plugin_loaded(), "{what}: the rerun finished:\n{log}");
        assert_on(&node, "guestpull");
        uninstall_and_check(&node, &before);
    }
}

/// `[plugins.<cri>]`'s key for this release's image settings.
fn images_plugin(v: ContainerdVersion) -> &'static str {
    match v {
        ContainerdVersion::V2_1 => "io.containerd.cri.v1.images",
        _ => "io.containerd.grpc.v1.cri",
    }
}

#[test]
fn a_config_with_a_glob_import_keeps_its_main_file_and_gets_a_drop_in() {
    let lab = Lab::new("deploy-imports");
    let reg = integration::Registry::start(&lab);
    let v = ContainerdVersion::V2_1;
    let node = Node::new(&lab, "node", v, &reg, &[], |root, doc| {
        let mut imports = Array::new();
        imports.push(format!("{}/etc/containerd/conf.d/*.toml", root.display()));
        doc["imports"] = value(imports);
        let site = root.join("etc/containerd/conf.d/10-site.toml");
        fs::create_dir_all(site.parent().unwrap()).unwrap();
        fs::write(
            &site,
            "# The site's own drop-in.\nversion = 3\n[plugins.'io.containerd.cri.v1.images']\n  max_concurrent_downloads = 7\n",
        )
        .unwrap();
    });
    let before = node.files();
    node.deploy_ok("install", &install_args(v));
    assert!(node.plugin_loaded());
    assert_on(&node, "guestpull");
    let after = node.files();
    for f in [
        "etc/containerd/config.toml",
        "etc/containerd/conf.d/10-site.toml",
    ] {
        assert_eq!(
            before.get(f),
            after.get(f),
            "{f} untouched: the glob covers the drop-in"
        );
    }
    assert!(after.contains_key("etc/containerd/conf.d/guestpull.toml"));
    let d = node.config_dump();
    assert_eq!(
        get(
            &d,
            &["plugins", images_plugin(v), "max_concurrent_downloads"]
        )
        .and_then(|x| x.as_integer()),
        Some(7),
        "the site's drop-in still applies"
    );
    uninstall_and_check(&node, &before);
}

#[test]
fn a_1_7_config_whose_cri_section_is_imported_is_edited_where_it_lives() {
    let lab = Lab::new("deploy-imports-17");
    let reg = integration::Registry::start(&lab);
    let v = ContainerdVersion::V1_7;
    let node = Node::new(&lab, "node", v, &reg, &[], |root, doc| {
        // The CRI plugin moves into a file of its own, which the main config imports.
        let cri = doc["plugins"]
            .as_table_mut()
            .unwrap()
            .remove("io.containerd.grpc.v1.cri")
            .unwrap();
        let mut plugins = Table::new();
        plugins.set_implicit(true);
        plugins.insert("io.containerd.grpc.v1.cri", cri);
        let mut cri_doc = DocumentMut::new();
        cri_doc["version"] = value(2);
        cri_doc["plugins"] = Item::Table(plugins);
        let path = root.join("etc/containerd/cri.toml");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, format!("# CRI, kept apart by the site.\n{cri_doc}")).unwrap();
        let mut imports = Array::new();
        imports.push(path.display().to_string());
        doc["imports"] = value(imports);
    });
    let before = node.files();
    node.deploy_ok("install", &install_args(v));
    assert!(node.plugin_loaded());
    assert_on(&node, "guestpull");
    let after = node.files();
    assert_ne!(
        before.get("etc/containerd/cri.toml"),
        after.get("etc/containerd/cri.toml"),
        "the file defining the CRI plugin carries the handler's snapshotter"
    );
    uninstall_and_check(&node, &before);
}

/// The standard (non-inline) table `key` of `t`, created when missing.
fn table<'t>(t: &'t mut Table, key: &str) -> &'t mut Table {
    t.entry(key)
        .or_insert_with(|| Item::Table(Table::new()))
        .as_table_mut()
        .unwrap_or_else(|| panic!("{key} is not a table"))
}

#[test]
fn a_node_on_nydus_is_reported_and_moved_only_with_the_flag() {
    let lab = Lab::new("deploy-nydus");
    let reg = integration::Registry::start(&lab);
    let v = ContainerdVersion::V2_1;
    let node = Node::new(&lab, "node", v, &reg, &[], |root, doc| {
        // The CoCo operator's layout: nydus-snapshotter as a proxy plugin for the Kata handler.
        let mut nydus = Table::new();
        nydus["type"] = value("snapshot");
        nydus["address"] = value(format!(
            "{}/run/containerd-nydus/containerd-nydus-grpc.sock",
            root.display()
        ));
        // As tables, the way the operator writes them (indexing a missing key would make an
        // inline table, which cannot hold one).
        table(doc.as_table_mut(), "proxy_plugins").insert("nydus", Item::Table(nydus));
        let images = doc["plugins"]["io.containerd.cri.v1.images"]
            .as_table_mut()
            .unwrap();
        let mut platform = Table::new();
        platform["platform"] = value("linux/amd64");
        platform["snapshotter"] = value("nydus");
        table(images, "runtime_platforms").insert(KATA_HANDLER, Item::Table(platform));
        doc["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"][KATA_HANDLER]
            ["snapshotter"] = value("nydus");
    });
    assert_on(&node, "nydus");
    let before = node.files();
    // Every listed handler is on nydus: refused, nothing touched.
    let out = node.deploy("install", &install_args(v));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("nydus-snapshotter proxy plugin"), "{err}");
    assert!(err.contains("--migrate-from-nydus"), "{err}");
    assert_same_files("a refused install changes nothing", &before, &node.files());
    assert_on(&node, "nydus");

    let mut args = install_args(v);
    args.push("--migrate-from-nydus");
    let log = node.deploy_ok("install", &args);
    assert!(log.contains("moved from nydus"), "{log}");
    assert_on(&node, "guestpull");
    let d = node.config_dump();
    assert_eq!(
        get_str(&d, &["proxy_plugins", "nydus", "type"]),
        Some("snapshot"),
        "nydus itself stays configured"
    );
    uninstall_and_check(&node, &before);
}

/// A hand-written 1.7 config: comments everywhere, tables out of the usual order, the handler's
/// runtime before the CRI root keys, dotted keys.
fn hand_written_1_7(root: &Path, certs: &str, pause: &str) -> String {
    let r = root.display();
    format!(
        r#"# containerd for the Kata pool, maintained by hand. Do not reformat.
version = 2
root = "{r}/var/lib/containerd"   # moved off the root disk
state = "{r}/run/containerd"
disabled_plugins = ["io.containerd.nri.v1.nri"]

# --- Kata first, because that is what this pool is for ---
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{KATA_HANDLER}]
  runtime_type = "io.containerd.runc.v2"   # the Kata shim on real nodes
  privileged_without_host_devices = true

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
  options.SystemdCgroup = false

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true   # this sandbox cannot lower it
  registry.config_path = "{certs}"

# Sockets last.
[debug]
  address = "{r}/run/containerd/debug.sock"
[ttrpc]
  address = "{r}/run/containerd/containerd.sock.ttrpc"
[grpc]
  address = "{r}/run/containerd/containerd.sock"
# end
"#
    )
}

#[test]
fn a_hand_written_config_keeps_every_comment_and_its_order() {
    let lab = Lab::new("deploy-comments");
    let reg = integration::Registry::start(&lab);
    let v = ContainerdVersion::V1_7;
    let certs = integration::snapshotter_env::registry_hosts_dir(&lab, &reg)
        .display()
        .to_string();
    let pause = integration::snapshotter_env::sandbox_image(&reg);
    let node = Node::new(&lab, "node", v, &reg, &[], |root, doc| {
        *doc = hand_written_1_7(root, &certs, &pause).parse().unwrap();
    });
    let before = node.files();
    let original = String::from_utf8(before["etc/containerd/config.toml"].clone()).unwrap();
    node.deploy_ok("install", &install_args(v));
    assert!(node.plugin_loaded());
    assert_on(&node, "guestpull");
    let installed = String::from_utf8(node.read("/etc/containerd/config.toml").unwrap()).unwrap();
    // Every original line survives, in its order: install only adds lines.
    let mut rest = installed.lines();
    for line in original.lines() {
        assert!(
            rest.any(|l| l == line),
            "line {line:?} lost or moved; installed config:\n{installed}"
        );
    }
    uninstall_and_check(&node, &before);
}
