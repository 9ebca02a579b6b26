//! Unpack fidelity against images other tools write: a Debian tree (debootstrap) in layers
//! from GNU tar (pax and gnu formats, sparse files), Python's tarfile and umoci repack, plus
//! feature and hostile layers, pulled by guest-puller and compared entry by entry (mode,
//! owner, size, content hash, symlink target, hardlink identity, xattrs) with `umoci unpack`
//! of the same image. Needs root (overlay mounts, whiteouts, devices) and the Debian mirror
//! on the first run (the debootstrap tree is cached).

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use integration::chain::guest_puller_pull;
use integration::images::{
    add_layer_tars, debian_minbase, fidelity_tree, layout_from_tars, push_layout,
};
use integration::lab::run_ok;
use integration::{Lab, Registry};

/// A registry and a guest-puller config whose store lives in the lab.
struct Puller<'a> {
    lab: &'a Lab,
    reg: Registry<'a>,
    cfg: PathBuf,
}

impl<'a> Puller<'a> {
    fn new(lab: &'a Lab) -> Self {
        Lab::require_root();
        for (cmd, pkg) in [
            ("umoci", "umoci"),
            ("skopeo", "skopeo"),
            ("python3", "python3"),
        ] {
            Lab::require_cmd(cmd, pkg);
        }
        let reg = Registry::start(lab);
        let cfg = lab.join("puller.toml");
        let toml = format!(
            "[image]\nwork_dir = {:?}\nbundle_roots = [{:?}]\n\
             [image.registry_config]\ninsecure_registries = [{:?}]\n",
            lab.join("work").display().to_string(),
            lab.path().display().to_string(),
            reg.host()
        );
        fs::write(&cfg, toml).unwrap();
        Puller { lab, reg, cfg }
    }

    fn store(&self, sub: &str) -> PathBuf {
        self.lab.join("work").join(sub)
    }

    /// Pushes the layout image `img` as `name`, pulls it with guest-puller and unpacks it with
    /// umoci; returns (guest-puller rootfs, umoci rootfs), or the stderr of a failed pull.
    fn pull(&self, img: &str, name: &str) -> Result<(PathBuf, PathBuf), String> {
        let pushed = push_layout(&self.reg, img, &format!("fidelity/{name}:t"));
        let bundle = self.lab.join(&format!("bundle-{name}"));
        let out = guest_puller_pull(&self.cfg, &pushed.reference, &bundle);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let reference = self.lab.join(&format!("umoci-{name}"));
        run_ok(
            Command::new("umoci")
                .args(["unpack", "--image", img])
                .arg(&reference),
        );
        Ok((bundle.join("rootfs"), reference.join("rootfs")))
    }
}

/// Asserts the two trees are equal entry by entry, listing every difference.
fn assert_faithful(ours: &Path, umoci: &Path) {
    let (a, b) = (fidelity_tree(ours), fidelity_tree(umoci));
    assert!(a.len() > 1, "guest-puller rootfs {ours:?} is empty");
    let keys: std::collections::BTreeSet<_> = a.keys().chain(b.keys()).collect();
    let diff: Vec<String> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: guest-puller {:?} / umoci {:?}", a.get(k), b.get(k)))
        .collect();
    eprintln!("compared {} entries of {ours:?} with umoci's", a.len());
    assert!(
        diff.is_empty(),
        "{} differences from umoci unpack:\n{}",
        diff.len(),
        diff.join("\n")
    );
}

/// Writes `entries` with Python's tarfile (PAX format): `(name, type, data)` with type `f`
/// (file), `d` (directory, data = octal mode) or `l` (symlink, data = target).
fn python_tar(out: &Path, entries: &[(&str, &str, &str)]) {
    let script = r#"
import json, sys, tarfile, io
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as t:
    for name, kind, data in json.loads(sys.argv[2]):
        i = tarfile.TarInfo(name)
        i.mtime = 1600000000
        if kind == "d":
            i.type, i.mode = tarfile.DIRTYPE, int(data, 8)
            t.addfile(i)
        elif kind == "l":
            i.type, i.linkname, i.mode = tarfile.SYMTYPE, data, 0o777
            t.addfile(i)
        else:
            b = data.encode()
            i.size, i.mode = len(b), 0o644
            t.addfile(i, io.BytesIO(b))
"#;
    let spec = serde_json::to_string(entries).unwrap();
    run_ok(
        Command::new("python3")
            .args(["-c", script])
            .arg(out)
            .arg(spec),
    );
}

/// Python's tarfile over `names` (NUL-separated, relative to `root`), one entry each.
fn python_tar_files(root: &Path, list: &Path, out: &Path) {
    let script = r#"
import os, sys, tarfile
root, names, out = sys.argv[1:4]
with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as t:
    for n in open(names, "rb").read().split(b"\0"):
        if n:
            n = os.fsdecode(n)
            t.add(os.path.join(root, n), arcname=n, recursive=False)
"#;
    run_ok(
        Command::new("python3")
            .args(["-c", script])
            .arg(root)
            .arg(list)
            .arg(out),
    );
}

/// GNU tar of exactly the `names` listed (no recursion) under `root`, with extra `args`.
fn gnu_tar(root: &Path, names: &[&str], out: &Path, args: &[&str]) {
    run_ok(
        Command::new("tar")
            .args(args)
            .args(["--numeric-owner", "--no-recursion", "-C"])
            .arg(root)
            .arg("-cf")
            .arg(out)
            .args(names),
    );
}

/// Every path below `root` (`./`-relative, parents before children), split by `pred`.
fn split_tree(root: &Path, pred: &dyn Fn(&Path, bool) -> bool) -> (Vec<u8>, Vec<u8>) {
    let (mut yes, mut no) = (Vec::new(), Vec::new());
    let mut stack = vec![PathBuf::from(".")];
    while let Some(rel) = stack.pop() {
        let is_dir = fs::symlink_metadata(root.join(&rel)).unwrap().is_dir();
        let list = if pred(&rel, is_dir) {
            &mut yes
        } else {
            &mut no
        };
        list.extend_from_slice(rel.as_os_str().as_bytes());
        list.push(0);
        if is_dir {
            let mut kids: Vec<_> = fs::read_dir(root.join(&rel))
                .unwrap()
                .map(|e| rel.join(e.unwrap().file_name()))
                .collect();
            kids.sort();
            kids.reverse();
            stack.extend(kids);
        }
    }
    (yes, no)
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and a buffer of the passed length.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setting {name} on {p:?}: {}",
        std::io::Error::last_os_error()
    );
}

/// Writes a 4 MiB file with data at two places and holes elsewhere.
fn sparse_file(p: &Path) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = fs::File::create(p).unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(&[7u8; 10000]).unwrap();
    f.seek(SeekFrom::Start((4 << 20) - 5)).unwrap();
    f.write_all(b"tail\n").unwrap();
}

/// Changes made in the bundle umoci repacks into a layer (umoci is the Go writer: PAX records
/// with newlines, whiteouts after a directory it turned into a symlink, xattrs).
fn umoci_changes(rootfs: &Path) {
    // A directory replaced by a symlink (item 5).
    let doc = rootfs.join("usr/share/doc/bash");
    fs::remove_dir_all(&doc).unwrap();
    std::os::unix::fs::symlink("../doc-moved/bash", &doc).unwrap();
    // A deletion (whiteout) and a hardlink to an existing file.
    fs::remove_file(rootfs.join("etc/issue.net")).unwrap();
    fs::hard_link(
        rootfs.join("etc/hostname"),
        rootfs.join("etc/hostname.hard"),
    )
    .unwrap();
    // xattrs: binary with a newline, and empty (item 7).
    set_xattr(&rootfs.join("etc/hostname"), "user.binary", b"a\nb\0c");
    set_xattr(&rootfs.join("etc/hostname"), "user.empty", b"");
    set_xattr(&rootfs.join("etc/hostname"), "user.plain", b"value");
    // Long names and link targets with newlines go into PAX records (item 3).
    let long = rootfs.join("opt").join("n".repeat(120));
    fs::create_dir_all(&long).unwrap();
    fs::write(long.join("file\nwith newline"), b"newline name\n").unwrap();
    std::os::unix::fs::symlink("tar\nget", long.join("link")).unwrap();
    let suid = rootfs.join("opt/suid");
    fs::write(&suid, b"#!/bin/sh\n").unwrap();
    fs::set_permissions(&suid, fs::Permissions::from_mode(0o4755)).unwrap();
}

#[test]
fn debian_tree_from_four_tar_writers_matches_umoci_entry_by_entry() {
    let lab = Lab::new("unpack-fidelity-debian");
    let p = Puller::new(&lab);
    let root = debian_minbase();
    let t = |n: &str| lab.join(n);
    // Layer 1, GNU tar --format=pax: everything but the files under usr/share, whose
    // directories it does write. Layer 2, Python tarfile: those files alone, so each of their
    // parents is implicit in that layer (item 2).
    let (l1, l2) = split_tree(&root, &|rel, is_dir| {
        is_dir || !rel.starts_with("./usr/share")
    });
    fs::write(t("l1.list"), &l1).unwrap();
    fs::write(t("l2.list"), &l2).unwrap();
    run_ok(
        Command::new("tar")
            .args([
                "--format=pax",
                "--xattrs",
                "--numeric-owner",
                "--no-recursion",
                "-C",
            ])
            .arg(&root)
            .args(["--null", "-T"])
            .arg(t("l1.list"))
            .arg("-cf")
            .arg(t("l1.tar")),
    );
    python_tar_files(&root, &t("l2.list"), &t("l2.tar"));
    let layout = t("oci");
    let img = layout_from_tars(&layout, &[t("l1.tar"), t("l2.tar")], "/bin/sh");
    // Layer 3: umoci repack of changes.
    let bundle = t("repack");
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--image", &img])
            .arg(&bundle),
    );
    umoci_changes(&bundle.join("rootfs"));
    run_ok(
        Command::new("umoci")
            .args(["repack", "--image", &img])
            .arg(&bundle),
    );
    // Layer 4, GNU tar --format=gnu, files only: implicit parents over /tmp (1777) and /root
    // (0700), a GNU long name, and a whiteout after a same-named file (item 6).
    let f = t("f4");
    let long = format!("usr/local/share/{}", "g".repeat(110));
    for d in ["tmp", "root", "etc", long.as_str()] {
        fs::create_dir_all(f.join(d)).unwrap();
    }
    for n in ["tmp/gnu", "root/.gnu", "etc/gnu-kept", "etc/.wh.gnu-kept"] {
        fs::write(f.join(n), n).unwrap();
    }
    fs::write(f.join(&long).join("file"), b"long").unwrap();
    let long_file = format!("./{long}/file");
    let names = [
        "./tmp/gnu",
        "./root/.gnu",
        "./etc/gnu-kept",
        "./etc/.wh.gnu-kept",
        &long_file,
    ];
    gnu_tar(
        &f,
        &names,
        &t("l4.tar"),
        &["--format=gnu", "--owner=0", "--group=0"],
    );
    // Layers 5-7, GNU tar --format=pax --sparse in each sparse version (item 4).
    let mut tars = vec![t("l4.tar")];
    fs::create_dir_all(t("f5/opt")).unwrap();
    for v in ["0.0", "0.1", "1.0"] {
        let name = format!("./opt/sparse-{v}");
        sparse_file(&t("f5").join(&name));
        let out = t(&format!("sparse-{v}.tar"));
        let version = format!("--sparse-version={v}");
        gnu_tar(
            &t("f5"),
            &[&name],
            &out,
            &["--format=pax", "--sparse", &version],
        );
        tars.push(out);
    }
    add_layer_tars(&img, &tars);
    let (ours, reference) = p.pull(&img, "debian").expect("guest-puller pull");
    assert_faithful(&ours, &reference);
    // The same facts, spelled out.
    let mode = |rel: &str| fs::symlink_metadata(ours.join(rel)).unwrap().mode() & 0o7777;
    assert_eq!(mode("tmp"), 0o1777);
    assert_eq!(mode("root"), 0o700);
    assert!(ours.join("etc/gnu-kept").is_file());
    assert!(ours.join("usr/share/doc/bash").is_symlink());
    for v in ["0.0", "0.1", "1.0"] {
        let md = fs::metadata(ours.join(format!("opt/sparse-{v}"))).unwrap();
        assert_eq!(md.len(), 4 << 20);
        assert!(
            md.blocks() * 512 < 1 << 20,
            "sparse {v}: holes filled ({} blocks)",
            md.blocks()
        );
    }
    assert!(fidelity_tree(&ours)["\"etc/hostname\""].contains("user.binary=610a620063"));
}

#[test]
fn a_layer_shared_by_images_with_different_lowers_keeps_each_lowers_directories() {
    let lab = Lab::new("unpack-fidelity-shared");
    let p = Puller::new(&lab);
    let t = |n: &str| lab.join(n);
    // Two bases with different /tmp and /srv/data attributes, one top layer (same blob) that
    // adds files below both without directory entries.
    for (base, tmp_mode, owner) in [("a", 0o1777, 0), ("b", 0o700, 4242)] {
        let d = t(&format!("base-{base}"));
        fs::create_dir_all(d.join("tmp")).unwrap();
        fs::create_dir_all(d.join("srv/data")).unwrap();
        fs::set_permissions(d.join("tmp"), fs::Permissions::from_mode(tmp_mode)).unwrap();
        std::os::unix::fs::chown(d.join("srv/data"), Some(owner), Some(owner)).unwrap();
        set_xattr(&d.join("srv/data"), "user.base", base.as_bytes());
        gnu_tar(
            &d,
            &[".", "./tmp", "./srv", "./srv/data"],
            &t(&format!("{base}.tar")),
            &["--format=pax", "--xattrs", "--xattrs-include=user.*"],
        );
    }
    python_tar(
        &t("top.tar"),
        &[
            ("tmp/x", "f", "x"),
            ("srv/data/y", "f", "y"),
            ("new/z", "f", "z"),
        ],
    );
    let mut digests = Vec::new();
    for base in ["a", "b"] {
        let img = layout_from_tars(
            &t(&format!("oci-{base}")),
            &[t(&format!("{base}.tar")), t("top.tar")],
            "/bin/sh",
        );
        let (ours, reference) = p.pull(&img, base).expect("guest-puller pull");
        assert_faithful(&ours, &reference);
        let md = fs::metadata(ours.join("srv/data")).unwrap();
        assert_eq!(md.uid(), if base == "a" { 0 } else { 4242 });
        digests.push(fs::read_dir(p.store("layers")).unwrap().count());
    }
    // Three layers in the store, not four: the top layer was unpacked once and shared.
    assert_eq!(digests, [2, 3]);
}

#[test]
fn whiteouts_of_dot_and_dotdot_are_refused_and_leave_the_store_alone() {
    let lab = Lab::new("unpack-fidelity-hostile");
    let p = Puller::new(&lab);
    let t = |n: &str| lab.join(n);
    python_tar(
        &t("base.tar"),
        &[("sub/keep", "f", "k"), ("bin", "d", "755")],
    );
    let good = layout_from_tars(&t("oci-good"), &[t("base.tar")], "/bin/sh");
    let (ours, reference) = p.pull(&good, "good").expect("pull of the base image");
    assert_faithful(&ours, &reference);
    let names = |d: PathBuf| -> std::collections::BTreeSet<_> {
        fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect()
    };
    let layers_before = names(p.store("layers"));
    for (n, evil) in [".wh...", "sub/.wh..", ".wh.."].into_iter().enumerate() {
        let tar = t(&format!("evil{n}.tar"));
        python_tar(&tar, &[("sub/new", "f", "n"), (evil, "f", "")]);
        let img = layout_from_tars(
            &t(&format!("oci-evil{n}")),
            &[t("base.tar"), tar],
            "/bin/sh",
        );
        let err = p
            .pull(&img, &format!("evil{n}"))
            .expect_err("a whiteout of '..' must fail");
        assert!(err.contains("invalid whiteout"), "{evil}: {err}");
        // `.wh...` in a layer unpacked in staging/<layer>/ named staging/ itself.
        assert!(
            p.store("staging").is_dir(),
            "{evil}: the store's staging dir is gone"
        );
        assert_eq!(fs::read_dir(p.store("staging")).unwrap().count(), 0);
        assert!(
            names(p.store("layers")).is_superset(&layers_before),
            "{evil}: layers lost"
        );
        assert_eq!(fs::read(ours.join("sub/keep")).unwrap(), b"k");
    }
}
