//! Malicious and edge-case archives built in-test with the `tar` crate.

use super::*;
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
