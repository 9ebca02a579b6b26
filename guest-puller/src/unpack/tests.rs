//! Malicious and edge-case archives built in-test with the `tar` crate.

use super::*;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use tar::{Builder, Header};

/// Appends an entry whose name bytes are written raw, bypassing the builder's path checks.
fn raw(
    b: &mut Builder<Vec<u8>>,
    name: &[u8],
    kind: EntryType,
    link: Option<&[u8]>,
    data: &[u8],
    mode: u32,
) {
    let mut h = Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_mtime(1_600_000_000);
    h.set_uid(0);
    h.set_gid(0);
    if let Some(l) = link {
        h.as_gnu_mut().unwrap().linkname[..l.len()].copy_from_slice(l);
    }
    h.set_cksum();
    b.append(&h, data).unwrap();
}

fn build(f: impl FnOnce(&mut Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    f(&mut b);
    b.into_inner().unwrap()
}

fn run(tar: &[u8]) -> (tempfile::TempDir, Result<UnpackStats, UnpackError>) {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("layer")).unwrap();
    let r = unpack(tar, &d.path().join("layer")).map(|(s, _)| s);
    (d, r)
}

#[test]
fn regular_tree_with_modes_links_and_times() {
    let tar = build(|b| {
        raw(b, b"./etc/", EntryType::Directory, None, b"", 0o750);
        raw(b, b"etc/suid", EntryType::Regular, None, b"x", 0o4755);
        raw(
            b,
            b"etc/hard",
            EntryType::Link,
            Some(b"etc/suid"),
            b"",
            0o644,
        );
        raw(
            b,
            b"etc/soft",
            EntryType::Symlink,
            Some(b"/does/not/matter"),
            b"",
            0o777,
        );
        raw(b, b"/abs/contained", EntryType::Regular, None, b"y", 0o644);
    });
    let (d, r) = run(&tar);
    r.unwrap();
    let l = d.path().join("layer");
    let m = std::fs::metadata(l.join("etc/suid")).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o4755);
    assert_eq!(m.nlink(), 2);
    assert_eq!(m.mtime(), 1_600_000_000);
    assert_eq!(
        std::fs::metadata(l.join("etc")).unwrap().mode() & 0o777,
        0o750
    );
    assert_eq!(
        std::fs::metadata(l.join("etc")).unwrap().mtime(),
        1_600_000_000
    );
    assert_eq!(
        std::fs::read_link(l.join("etc/soft"))
            .unwrap()
            .to_str()
            .unwrap(),
        "/does/not/matter"
    );
    // Absolute paths are taken relative to the layer root.
    assert_eq!(std::fs::read(l.join("abs/contained")).unwrap(), b"y");
}

#[test]
fn dotdot_is_rejected() {
    let tar = build(|b| raw(b, b"a/../../evil", EntryType::Regular, None, b"x", 0o644));
    let (d, r) = run(&tar);
    assert!(matches!(r, Err(UnpackError::Unsafe { .. })), "{r:?}");
    assert!(!d.path().join("evil").exists());
}

#[test]
fn absolute_symlink_parent_escape_is_rejected() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().to_str().unwrap().as_bytes().to_vec();
    let tar = build(|b| {
        raw(b, b"lnk", EntryType::Symlink, Some(&target), b"", 0o777);
        raw(b, b"lnk/evil", EntryType::Regular, None, b"x", 0o644);
    });
    let (_d, r) = run(&tar);
    assert!(matches!(r, Err(UnpackError::Unsafe { .. })), "{r:?}");
    assert!(!outside.path().join("evil").exists());
}

#[test]
fn relative_symlink_parent_escape_is_rejected() {
    let tar = build(|b| {
        raw(b, b"up", EntryType::Symlink, Some(b".."), b"", 0o777);
        raw(b, b"up/evil", EntryType::Regular, None, b"x", 0o644);
    });
    let (d, r) = run(&tar);
    assert!(matches!(r, Err(UnpackError::Unsafe { .. })), "{r:?}");
    assert!(!d.path().join("evil").exists());
}

#[test]
fn symlink_then_file_replaces_link_instead_of_following() {
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"orig").unwrap();
    let target = victim.to_str().unwrap().as_bytes().to_vec();
    let tar = build(|b| {
        raw(b, b"f", EntryType::Symlink, Some(&target), b"", 0o777);
        raw(b, b"f", EntryType::Regular, None, b"new", 0o644);
    });
    let (d, r) = run(&tar);
    r.unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"orig");
    assert_eq!(std::fs::read(d.path().join("layer/f")).unwrap(), b"new");
}

#[test]
fn hardlink_outside_is_contained_or_rejected() {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, b"s").unwrap();
    let abs = secret.to_str().unwrap().as_bytes().to_vec();
    // An absolute target names a path inside the layer, which does not exist.
    let tar = build(|b| raw(b, b"h", EntryType::Link, Some(&abs), b"", 0o644));
    let (d, r) = run(&tar);
    assert!(matches!(r, Err(UnpackError::Bad { .. })), "{r:?}");
    assert!(!d.path().join("layer/h").exists());
    assert_eq!(std::fs::metadata(&secret).unwrap().nlink(), 1);
    let tar = build(|b| {
        raw(
            b,
            b"h",
            EntryType::Link,
            Some(b"../../../etc/passwd"),
            b"",
            0o644,
        )
    });
    let (_d, r) = run(&tar);
    assert!(matches!(r, Err(UnpackError::Unsafe { .. })), "{r:?}");
    // Through a symlinked directory: the parent walk refuses the link.
    let dir = outside.path().to_str().unwrap().as_bytes().to_vec();
    let tar = build(|b| {
        raw(b, b"d", EntryType::Symlink, Some(&dir), b"", 0o777);
        raw(b, b"h", EntryType::Link, Some(b"d/secret"), b"", 0o644);
    });
    let (_d, r) = run(&tar);
    assert!(matches!(r, Err(UnpackError::Unsafe { .. })), "{r:?}");
    assert_eq!(std::fs::metadata(&secret).unwrap().nlink(), 1);
}

#[test]
fn huge_sizes_are_rejected() {
    // A file header claiming far more data than the stream has.
    let mut tar = build(|b| raw(b, b"big", EntryType::Regular, None, b"", 0o644));
    let mut h = Header::new_gnu();
    h.set_path("big").unwrap();
    h.set_size(1 << 40);
    h.set_cksum();
    tar.splice(0..512, h.as_bytes().iter().copied());
    let (_d, r) = run(&tar);
    assert!(r.is_err());
    // A GNU long name or PAX header above the metadata limit is refused before reading it.
    for kind in [EntryType::GNULongName, EntryType::XHeader] {
        let mut h = Header::new_gnu();
        h.set_path("././@LongLink").unwrap();
        h.set_entry_type(kind);
        h.set_size(MAX_METADATA_ENTRY + 1);
        h.set_cksum();
        let mut tar = h.as_bytes().to_vec();
        tar.extend(std::iter::repeat_n(b'a', 4096));
        let (_d, r) = run(&tar);
        match r {
            Err(UnpackError::Bad { reason, .. }) => assert!(reason.contains("limit"), "{reason}"),
            other => panic!("expected limit error, got {other:?}"),
        }
    }
}

#[test]
fn pax_path_uid_and_xattr_are_applied() {
    let mut b = Builder::new(Vec::new());
    let long = format!("{}/file", "d".repeat(150));
    let mut h = Header::new_ustar();
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(1);
    h.set_mode(0o600);
    h.set_entry_type(EntryType::Regular);
    b.append_data(&mut h, &long, &b"z"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let (d, r) = run(&tar);
    r.unwrap();
    assert_eq!(
        std::fs::read(d.path().join("layer").join(&long)).unwrap(),
        b"z"
    );
}

#[test]
fn whiteouts_and_devices_follow_the_root_policy() {
    let tar = build(|b| {
        raw(b, b"etc/.wh.gone", EntryType::Regular, None, b"", 0o644);
        raw(b, b"opq/.wh..wh..opq", EntryType::Regular, None, b"", 0o644);
    });
    let (d, r) = run(&tar);
    let l = d.path().join("layer");
    if rustix::process::geteuid().is_root() {
        r.unwrap();
        let m = std::fs::symlink_metadata(l.join("etc/gone")).unwrap();
        assert!(m.file_type().is_char_device());
        assert_eq!(
            (m.rdev(), m.mode() & 0o7777, m.uid(), m.gid()),
            (0, 0, 0, 0)
        );
        let v = rustix::fs::getxattr(
            l.join("opq").as_path(),
            "trusted.overlay.opaque",
            &mut [0u8; 4],
        );
        assert_eq!(v.unwrap(), 1);
    } else {
        assert!(matches!(r, Err(UnpackError::Bad { .. })), "{r:?}");
    }
    let tar = build(|b| raw(b, b"dev/null", EntryType::Char, None, b"", 0o666));
    let (_d, r) = run(&tar);
    assert_eq!(r.is_ok(), rustix::process::geteuid().is_root(), "{r:?}");
}

#[test]
fn sparse_and_unknown_types_rejected() {
    let tar = build(|b| raw(b, b"s", EntryType::GNUSparse, None, b"", 0o644));
    assert!(run(&tar).1.is_err());
}

/// Asserts that unpacking `tar` fails with a reason containing `needle`.
fn refused(tar: &[u8], needle: &str) {
    match run(tar).1 {
        Err(UnpackError::Bad { reason, .. } | UnpackError::Unsafe { reason, .. }) => {
            assert!(reason.contains(needle), "{reason}")
        }
        other => panic!("expected a refusal mentioning {needle:?}, got {other:?}"),
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// One PAX record, `"%d %s=%s\n"` with the length counting itself.
fn record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    assert_eq!(r.len(), len);
    r
}

/// Appends a PAX extended header with `records` (for the next entry).
fn pax_header(b: &mut Builder<Vec<u8>>, records: &[(&str, &[u8])]) {
    let data: Vec<u8> = records.iter().flat_map(|(k, v)| record(k, v)).collect();
    raw(b, b"PaxHeaders/x", EntryType::XHeader, None, &data, 0o644);
}

fn xattr(p: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    rustix::fs::lgetxattr(p, name, &mut buf).ok().map(|n| {
        buf.truncate(n);
        buf
    })
}

#[test]
fn whiteouts_naming_dot_or_dotdot_are_refused_and_touch_nothing() {
    if !is_root() {
        return;
    }
    for name in [&b".wh.."[..], b"sub/.wh..", b".wh..."] {
        // The layout of the store: the layer's staging dir beside other pulls' staging dirs.
        let d = tempfile::tempdir().unwrap();
        let staging = d.path().join("staging");
        std::fs::create_dir_all(staging.join("layer")).unwrap();
        std::fs::create_dir_all(staging.join("other")).unwrap();
        std::fs::write(staging.join("other/half-unpacked"), b"x").unwrap();
        let tar = build(|b| {
            raw(b, b"sub/keep", EntryType::Regular, None, b"k", 0o644);
            raw(b, name, EntryType::Regular, None, b"", 0o644);
        });
        let r = unpack(&tar[..], &staging.join("layer")).map(|(s, _)| s);
        match r {
            Err(UnpackError::Bad { reason, .. }) => {
                assert!(reason.contains("invalid whiteout"), "{reason}")
            }
            other => panic!("{name:?}: expected a refusal, got {other:?}"),
        }
        assert_eq!(
            std::fs::read(staging.join("other/half-unpacked")).unwrap(),
            b"x"
        );
        assert_eq!(std::fs::read(staging.join("layer/sub/keep")).unwrap(), b"k");
    }
}

#[test]
fn implicit_parents_are_marked_and_explicit_ones_are_not() {
    if !is_root() {
        return;
    }
    let tar = build(|b| {
        raw(b, b"tmp/x", EntryType::Regular, None, b"x", 0o644);
        raw(b, b"etc/", EntryType::Directory, None, b"", 0o750);
        raw(b, b"etc/a/f", EntryType::Regular, None, b"", 0o644);
        // An explicit entry after the implicit creation removes the mark.
        raw(b, b"tmp/", EntryType::Directory, None, b"", 0o1777);
    });
    let (d, r) = run(&tar);
    r.unwrap();
    let l = d.path().join("layer");
    assert_eq!(xattr(&l, IMPLICIT_XATTR).as_deref(), Some(&b"1"[..]));
    assert_eq!(
        xattr(&l.join("etc/a"), IMPLICIT_XATTR).as_deref(),
        Some(&b"1"[..])
    );
    assert_eq!(
        std::fs::metadata(l.join("etc/a")).unwrap().mode() & 0o7777,
        0o755
    );
    assert_eq!(xattr(&l.join("etc"), IMPLICIT_XATTR), None);
    assert_eq!(xattr(&l.join("tmp"), IMPLICIT_XATTR), None);
    assert_eq!(
        std::fs::metadata(l.join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
    assert_eq!(
        xattr(&l, compose::IMPLICIT_COUNT_XATTR).as_deref(),
        Some(&b"1"[..])
    );
    let tar = build(|b| raw(b, b"./", EntryType::Directory, None, b"", 0o700));
    let (d, r) = run(&tar);
    r.unwrap();
    assert_eq!(xattr(&d.path().join("layer"), IMPLICIT_XATTR), None);
}

/// Unpacks each archive as one layer under `d`, bottom first.
fn layers(d: &std::path::Path, tars: &[Vec<u8>]) -> Vec<std::path::PathBuf> {
    tars.iter()
        .enumerate()
        .map(|(i, t)| {
            let p = d.join(format!("l{i}"));
            std::fs::create_dir(&p).unwrap();
            unpack(&t[..], &p).unwrap();
            p
        })
        .collect()
}

fn owned(b: &mut Builder<Vec<u8>>, name: &[u8], kind: EntryType, mode: u32, uid: u64) {
    let mut h = Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(kind);
    h.set_size(0);
    h.set_mode(mode);
    h.set_mtime(1_500_000_000);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_cksum();
    b.append(&h, &b""[..]).unwrap();
}

#[test]
fn composition_gives_implicit_parents_the_lower_attributes() {
    if !is_root() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let base = build(|b| {
        owned(b, b"./", EntryType::Directory, 0o755, 0);
        owned(b, b"tmp/", EntryType::Directory, 0o1777, 0);
        owned(b, b"home/", EntryType::Directory, 0o755, 0);
        owned(b, b"home/u/", EntryType::Directory, 0o700, 1000);
        owned(b, b"gone/", EntryType::Directory, 0o700, 1000);
        owned(b, b"opq/", EntryType::Directory, 0o711, 7);
    });
    let mid = build(|b| {
        // Implicit here too: the attributes come from further down.
        raw(b, b"home/u/a", EntryType::Regular, None, b"", 0o644);
        raw(b, b".wh.gone", EntryType::Regular, None, b"", 0o644);
    });
    let top = build(|b| {
        raw(b, b"tmp/x", EntryType::Regular, None, b"x", 0o644);
        raw(b, b"home/u/.profile", EntryType::Regular, None, b"", 0o644);
        raw(b, b"new/dir/f", EntryType::Regular, None, b"", 0o644);
        raw(b, b"gone/f", EntryType::Regular, None, b"", 0o644);
        raw(b, b"opq/.wh..wh..opq", EntryType::Regular, None, b"", 0o644);
    });
    let ls = layers(d.path(), &[base, mid, top]);
    let upper = d.path().join("upper");
    std::fs::create_dir(&upper).unwrap();
    compose::fix_implicit_dirs(&ls, &upper).unwrap();
    let attrs = |p: &str| {
        let m = std::fs::symlink_metadata(upper.join(p)).unwrap();
        (m.mode() & 0o7777, m.uid(), m.gid())
    };
    assert_eq!(attrs("tmp"), (0o1777, 0, 0));
    assert_eq!(attrs("home"), (0o755, 0, 0));
    assert_eq!(attrs("home/u"), (0o700, 1000, 1000));
    // Deleted below: the new directory gets the default, as containerd and umoci give it.
    assert_eq!(attrs("gone"), (0o755, 0, 0));
    assert_eq!(attrs("new/dir"), (0o755, 0, 0));
    // Opaque hides the lower children, not the lower directory's attributes.
    assert_eq!(attrs("opq"), (0o711, 7, 7));
    assert_eq!(xattr(&upper.join("opq"), "trusted.overlay.opaque"), None);
    assert_eq!(xattr(&upper.join("tmp"), IMPLICIT_XATTR), None);
    assert!(std::fs::read_dir(upper.join("tmp"))
        .unwrap()
        .next()
        .is_none());
    // Only directories are created, and a second composition leaves the upper alone.
    assert_eq!(compose::fix_implicit_dirs(&ls, &upper).unwrap(), 0);
}

#[test]
fn composition_never_revives_hidden_or_explicit_directories() {
    if !is_root() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let base = build(|b| {
        owned(b, b"a/", EntryType::Directory, 0o700, 5);
        owned(b, b"e/", EntryType::Directory, 0o700, 5);
    });
    let mid = build(|b| raw(b, b"a/b/f", EntryType::Regular, None, b"", 0o644));
    let top = build(|b| {
        raw(b, b".wh.a", EntryType::Regular, None, b"", 0o644);
        owned(b, b"e/", EntryType::Directory, 0o750, 6);
    });
    let low = build(|b| raw(b, b"e/x", EntryType::Regular, None, b"", 0o644));
    let ls = layers(d.path(), &[base, mid, top]);
    let upper = d.path().join("upper");
    std::fs::create_dir(&upper).unwrap();
    compose::fix_implicit_dirs(&ls, &upper).unwrap();
    assert!(!upper.join("a").exists());
    // An explicit directory above an implicit one already shows the right attributes.
    let d2 = tempfile::tempdir().unwrap();
    let base = build(|b| owned(b, b"e/", EntryType::Directory, 0o700, 5));
    let top = build(|b| owned(b, b"e/", EntryType::Directory, 0o750, 6));
    let ls = layers(d2.path(), &[base, low, top]);
    let upper = d2.path().join("upper");
    std::fs::create_dir(&upper).unwrap();
    assert_eq!(compose::fix_implicit_dirs(&ls, &upper).unwrap(), 0);
}

#[test]
fn pax_values_with_newlines_are_parsed_by_length() {
    let name = b"dir/new\nline";
    let target = b"tar\nget";
    let value = b"bin\n\0ary\n";
    let tar = build(|b| {
        pax_header(b, &[("path", name), ("SCHILY.xattr.user.nl", value)]);
        raw(b, b"placeholder", EntryType::Regular, None, b"data", 0o644);
        pax_header(b, &[("linkpath", target), ("path", b"link\nname")]);
        raw(b, b"placeholder2", EntryType::Symlink, None, b"", 0o777);
    });
    let (d, r) = run(&tar);
    r.unwrap();
    let l = d.path().join("layer");
    let f = l.join(std::ffi::OsStr::from_bytes(name));
    assert_eq!(std::fs::read(&f).unwrap(), b"data");
    if is_root() {
        assert_eq!(xattr(&f, "user.nl").as_deref(), Some(&value[..]));
    }
    assert_eq!(
        std::fs::read_link(l.join("link\nname"))
            .unwrap()
            .as_os_str()
            .as_bytes(),
        target
    );
    // A length that does not end on a newline is malformed, not silently re-split.
    for bad in [&b"11 path=abc\n"[..], b"13 path=abc\n", b"x path=abc\n"] {
        let tar = build(|b| {
            raw(b, b"PaxHeaders/x", EntryType::XHeader, None, bad, 0o644);
            raw(b, b"f", EntryType::Regular, None, b"", 0o644);
        });
        refused(&tar, "PAX record");
    }
}

#[test]
fn empty_pax_values_unset_the_record() {
    let tar = build(|b| {
        pax_header(
            b,
            &[
                ("SCHILY.xattr.user.empty", b""),
                ("SCHILY.xattr.user.full", b"v"),
                ("path", b""),
            ],
        );
        raw(b, b"headername", EntryType::Regular, None, b"", 0o644);
    });
    let (d, r) = run(&tar);
    r.unwrap();
    let f = d.path().join("layer/headername");
    assert!(f.is_file());
    assert_eq!(xattr(&f, "user.empty"), None);
    assert_eq!(xattr(&f, "user.full").as_deref(), Some(&b"v"[..]));
}

/// The content of the test sparse file: data at 8192 and at the end, holes elsewhere.
const SPARSE_SIZE: u64 = 1 << 20;

fn check_sparse(tar: &[u8]) {
    let (d, r) = run(tar);
    r.unwrap();
    let f = d.path().join("layer/dir/sparse");
    let content = std::fs::read(&f).unwrap();
    assert_eq!(content.len() as u64, SPARSE_SIZE);
    assert_eq!(&content[8192..8197], b"hello");
    assert_eq!(&content[SPARSE_SIZE as usize - 4..], b"tail");
    assert!(content[..8192].iter().all(|b| *b == 0));
    let m = std::fs::metadata(&f).unwrap();
    assert!(
        m.blocks() * 512 < SPARSE_SIZE / 2,
        "holes were filled: {} blocks",
        m.blocks()
    );
    assert!(!d.path().join("layer/GNUSparseFile.1").exists());
}

fn sparse_segments() -> (Vec<u8>, Vec<(u64, u64)>) {
    let mut data = b"hello".to_vec();
    data.extend_from_slice(b"tail");
    (
        data,
        vec![(8192, 5), (SPARSE_SIZE - 4, 4), (SPARSE_SIZE, 0)],
    )
}

#[test]
fn gnu_sparse_pax_0_0_and_0_1_are_reconstructed_with_holes() {
    let (data, map) = sparse_segments();
    let size = SPARSE_SIZE.to_string();
    let mut recs: Vec<(String, Vec<u8>)> = vec![("GNU.sparse.size".into(), size.clone().into())];
    recs.push(("GNU.sparse.numblocks".into(), b"3".to_vec()));
    for (o, n) in &map {
        recs.push(("GNU.sparse.offset".into(), o.to_string().into()));
        recs.push(("GNU.sparse.numbytes".into(), n.to_string().into()));
    }
    let refs: Vec<(&str, &[u8])> = recs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let tar = build(|b| {
        pax_header(b, &refs);
        raw(b, b"dir/sparse", EntryType::Regular, None, &data, 0o644);
    });
    check_sparse(&tar);
    let list: Vec<String> = map
        .iter()
        .flat_map(|(o, n)| [o.to_string(), n.to_string()])
        .collect();
    let tar = build(|b| {
        pax_header(
            b,
            &[
                ("GNU.sparse.size", size.as_bytes()),
                ("GNU.sparse.numblocks", b"3"),
                ("GNU.sparse.name", b"dir/sparse"),
                ("GNU.sparse.map", list.join(",").as_bytes()),
            ],
        );
        raw(
            b,
            b"GNUSparseFile.1/sparse",
            EntryType::Regular,
            None,
            &data,
            0o644,
        );
    });
    check_sparse(&tar);
}

#[test]
fn gnu_sparse_pax_1_0_is_reconstructed_and_bad_maps_are_refused() {
    let (data, map) = sparse_segments();
    let mut stored = format!("{}\n", map.len()).into_bytes();
    for (o, n) in &map {
        stored.extend_from_slice(format!("{o}\n{n}\n").as_bytes());
    }
    stored.resize(512, 0);
    stored.extend_from_slice(&data);
    let size = SPARSE_SIZE.to_string();
    let tar = build(|b| {
        pax_header(
            b,
            &[
                ("GNU.sparse.major", b"1"),
                ("GNU.sparse.minor", b"0"),
                ("GNU.sparse.name", b"dir/sparse"),
                ("GNU.sparse.realsize", size.as_bytes()),
            ],
        );
        raw(
            b,
            b"GNUSparseFile.1/sparse",
            EntryType::Regular,
            None,
            &stored,
            0o644,
        );
    });
    check_sparse(&tar);
    // Overlapping segments and an unknown version are refused, never unpacked wrongly.
    let bad = [
        vec![
            ("GNU.sparse.size", size.as_bytes()),
            ("GNU.sparse.map", &b"0,5,2,4"[..]),
        ],
        vec![("GNU.sparse.major", &b"2"[..]), ("GNU.sparse.minor", b"0")],
    ];
    for recs in bad {
        let tar = build(|b| {
            pax_header(b, &recs);
            raw(
                b,
                b"GNUSparseFile.1/sparse",
                EntryType::Regular,
                None,
                &data,
                0o644,
            );
        });
        // (The layer pipeline discards the staging dir of a refused layer.)
        refused(&tar, "sparse");
    }
}

#[test]
fn whiteouts_below_a_path_this_layer_replaced_are_no_ops() {
    if !is_root() {
        return;
    }
    let tar = build(|b| {
        // umoci repack: the symlink first, then whiteouts of the old directory's children.
        raw(b, b"d", EntryType::Symlink, Some(b"target"), b"", 0o777);
        raw(b, b"d/.wh.old", EntryType::Regular, None, b"", 0o644);
        raw(
            b,
            b"d/sub/.wh..wh..opq",
            EntryType::Regular,
            None,
            b"",
            0o644,
        );
        // Others write a file over the directory.
        raw(b, b"f", EntryType::Regular, None, b"file", 0o644);
        raw(b, b"f/.wh.old", EntryType::Regular, None, b"", 0o644);
    });
    let (d, r) = run(&tar);
    r.unwrap();
    let l = d.path().join("layer");
    assert_eq!(
        std::fs::read_link(l.join("d")).unwrap().to_str(),
        Some("target")
    );
    assert!(!l.join("target").exists());
    assert_eq!(std::fs::read(l.join("f")).unwrap(), b"file");
    // Regular entries below this layer's symlink are still refused, with the real reason.
    let tar = build(|b| {
        raw(b, b"d", EntryType::Symlink, Some(b"target"), b"", 0o777);
        raw(b, b"d/new", EntryType::Regular, None, b"", 0o644);
    });
    refused(&tar, "is a symlink in this layer");
}

#[test]
fn whiteouts_hide_lower_layers_only() {
    if !is_root() {
        return;
    }
    let tar = build(|b| {
        raw(b, b"x", EntryType::Regular, None, b"mine", 0o644);
        raw(b, b".wh.x", EntryType::Regular, None, b"", 0o644);
        raw(b, b"d/f", EntryType::Regular, None, b"f", 0o644);
        raw(b, b".wh.d", EntryType::Regular, None, b"", 0o644);
        // Whiteout first, then new content: a new, opaque directory.
        raw(b, b".wh.n", EntryType::Regular, None, b"", 0o644);
        raw(b, b"n/g", EntryType::Regular, None, b"g", 0o644);
        raw(b, b".wh.m", EntryType::Regular, None, b"", 0o644);
        raw(b, b"m/", EntryType::Directory, None, b"", 0o700);
    });
    let (d, r) = run(&tar);
    r.unwrap();
    let l = d.path().join("layer");
    assert_eq!(std::fs::read(l.join("x")).unwrap(), b"mine");
    assert_eq!(std::fs::read(l.join("d/f")).unwrap(), b"f");
    assert_eq!(
        xattr(&l.join("d"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(std::fs::read(l.join("n/g")).unwrap(), b"g");
    for o in ["n", "m"] {
        assert!(l.join(o).is_dir());
        assert_eq!(
            xattr(&l.join(o), "trusted.overlay.opaque").as_deref(),
            Some(&b"y"[..])
        );
        assert_eq!(xattr(&l.join(o), IMPLICIT_XATTR), None);
    }
    assert_eq!(
        std::fs::metadata(l.join("m")).unwrap().mode() & 0o7777,
        0o700
    );
}
