//! `SecureMountService.SecureMount` served by `guest-puller serve` over its ttrpc socket, with
//! kata-agent's PATH: every refusal that needs no device-mapper, with its code, and the real
//! `cryptsetup` formatting an image file with its header detached. This host's kernel has no
//! device-mapper, so there the open step fails and the test checks that the failure is undone;
//! the whole LUKS2 path (open, mkfs.ext4, mount) runs in the QEMU guest.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cdh_api::client::{secure_mount_at, Endpoint};
use guest_puller::secure_mount::luks2::{header_path, LUKS_HEADER_DIR};
use integration::chain::{rpc_status, serve_cdh, KbsProcess};
use integration::Lab;
use ttrpc::Code;

const T: Duration = Duration::from_secs(120);
/// The PATH kata-agent starts the CDH with.
const KATA_CDH_PATH: &str = "/bin:/sbin/:/usr/bin/:/usr/sbin/";
const KEY_TEXT: &str = "guestpull secure mount test key, never logged";

fn serve(lab: &Lab, kbs: &KbsProcess<'_>) -> Endpoint {
    Endpoint::Unix(serve_cdh(lab, kbs, &[("PATH", KATA_CDH_PATH)]))
}

/// kata-agent 4.1.0's request for a container listing `/dev/trusted_store`.
fn kata(device_id: &str) -> HashMap<String, String> {
    [
        ("deviceId", device_id),
        ("sourceType", "empty"),
        ("targetType", "fileSystem"),
        ("filesystemType", "ext4"),
        ("mkfsOpts", "-E lazy_journal_init"),
        ("encryptionType", "luks2"),
        ("dataIntegrity", "false"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A 64 MiB image file standing in for the disk (cryptsetup attaches files to loop devices).
fn disk(lab: &Lab) -> PathBuf {
    let p = lab.join("disk.img");
    fs::File::create(&p).unwrap().set_len(64 << 20).unwrap();
    fs::canonicalize(p).unwrap()
}

fn on_file(device: &Path, key: &str) -> HashMap<String, String> {
    let mut o = kata("0:0");
    o.remove("deviceId");
    o.insert("devicePath".into(), device.display().to_string());
    o.insert("key".into(), key.into());
    o
}

#[tokio::test]
async fn secure_mount_refusals_answer_with_their_codes() {
    Lab::require_root();
    Lab::require_cmd("cryptsetup", "cryptsetup-bin");
    Lab::require_cmd("mkfs.ext4", "e2fsprogs");
    let lab = Lab::new("secure-mount-refusals");
    let kbs = KbsProcess::start(&lab);
    let ep = serve(&lab, &kbs);
    let image = lab.join("image");
    fs::create_dir_all(&image).unwrap();
    let mp = format!("{}/", image.display());
    let dev = disk(&lab);
    let with = |k: &str, v: Option<&str>| {
        let mut o = kata("0:0");
        match v {
            Some(v) => o.insert(k.into(), v.into()),
            None => o.remove(k),
        };
        o
    };
    let cases: Vec<(&str, HashMap<String, String>, Code, &str)> = vec![
        (
            "alibaba-cloud-oss",
            kata("0:0"),
            Code::UNIMPLEMENTED,
            "alibaba-cloud-oss",
        ),
        (
            "block-device",
            with("encryptionType", Some("zfs")),
            Code::UNIMPLEMENTED,
            "zfs",
        ),
        (
            "block-device",
            with("deviceId", None),
            Code::INVALID_ARGUMENT,
            "deviceId or devicePath",
        ),
        (
            "block-device",
            with("deviceId", Some("vdb")),
            Code::INVALID_ARGUMENT,
            "MAJ:MIN",
        ),
        (
            "block-device",
            with("deviceId", Some("8:x")),
            Code::INVALID_ARGUMENT,
            "MAJ:MIN",
        ),
        // No such device in this host's sysfs (minor numbers have 20 bits).
        (
            "block-device",
            kata("4095:1048574"),
            Code::NOT_FOUND,
            "deviceId 4095:1048574",
        ),
        (
            "block-device",
            on_file(Path::new("/nonexistent/disk"), "file:///nonexistent/k"),
            Code::NOT_FOUND,
            "/nonexistent/disk",
        ),
        (
            "block-device",
            on_file(&dev, "file:///nonexistent/luks.key"),
            Code::NOT_FOUND,
            "file:///nonexistent/luks.key",
        ),
        (
            "block-device",
            on_file(&dev, "kbs:///default/luks/absent"),
            Code::NOT_FOUND,
            "kbs:///default/luks/absent",
        ),
        (
            "block-device",
            on_file(&dev, "https://example.com/key"),
            Code::INVALID_ARGUMENT,
            "option key",
        ),
    ];
    for (vt, o, want, says) in cases {
        let (c, m) = rpc_status(secure_mount_at(&ep, vt, &o, &[], &mp, T).await.unwrap_err());
        assert_eq!(c, want, "{vt} {o:?}: {m}");
        assert!(m.contains(says), "{vt} {o:?}: {m}");
    }
    // Nothing was formatted: no header for the image file, nothing mounted.
    assert!(!header_path(Path::new(LUKS_HEADER_DIR), &dev).exists());
    assert_eq!(fs::read_dir(&image).unwrap().count(), 0);
    assert!(lab.is_running("guest-puller"));
}

/// What running cryptsetup on this host leaves that was not there before: libdevmapper's
/// `/dev/mapper/control` node (on a kernel without device-mapper it leads nowhere) and the empty
/// header dir. Removed on drop, and only then.
struct HostLeftovers {
    control: bool,
    headers: bool,
}

impl HostLeftovers {
    fn note() -> Self {
        Self {
            control: !Path::new("/dev/mapper").exists(),
            headers: !Path::new(LUKS_HEADER_DIR).exists(),
        }
    }
}

impl Drop for HostLeftovers {
    fn drop(&mut self) {
        if self.control && !Path::new("/sys/class/misc/device-mapper").exists() {
            let _ = fs::remove_file("/dev/mapper/control");
            let _ = fs::remove_dir("/dev/mapper");
        }
        if self.headers {
            let _ = fs::remove_dir(LUKS_HEADER_DIR);
        }
    }
}

fn mounted_at(p: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        (Path::new(f[4]) == p).then(|| f[sep + 1].to_string())
    })
}

#[tokio::test]
async fn cryptsetup_formats_with_a_detached_header_and_a_failed_open_is_undone() {
    Lab::require_root();
    Lab::require_cmd("cryptsetup", "cryptsetup-bin");
    Lab::require_cmd("mkfs.ext4", "e2fsprogs");
    let lab = Lab::new("secure-mount-luks");
    let kbs = KbsProcess::start(&lab);
    let ep = serve(&lab, &kbs);
    let image = lab.join("image");
    fs::create_dir_all(&image).unwrap();
    let dev = disk(&lab);
    let key = lab.join("luks.key");
    fs::write(&key, KEY_TEXT).unwrap();
    let mapper = format!("guestpull-it-{}", std::process::id());
    let mut o = on_file(&dev, &format!("file://{}", key.display()));
    o.insert("mapperName".into(), mapper.clone());
    let header = header_path(Path::new(LUKS_HEADER_DIR), &dev);
    let _restore = HostLeftovers::note();
    let r = secure_mount_at(
        &ep,
        "block-device",
        &o,
        &[],
        &format!("{}/", image.display()),
        T,
    )
    .await;
    let log = lab.log("guest-puller");
    assert!(
        !log.contains(KEY_TEXT),
        "the key is in the guest-puller's log"
    );
    // libdevmapper makes /dev/mapper/control itself, so only the kernel's misc device tells.
    if Path::new("/sys/class/misc/device-mapper").exists() {
        // A host with device-mapper runs the whole path on a loop device.
        let ok = r.map_err(|e| format!("{e:?}"));
        let fs_type = mounted_at(&image);
        let _ = Command::new("umount").arg(&image).status();
        let _ = Command::new("cryptsetup")
            .args(["luksClose", &mapper])
            .status();
        let _ = fs::remove_file(&header);
        ok.unwrap();
        assert_eq!(fs_type.as_deref(), Some("ext4"));
        return;
    }
    let (c, m) = rpc_status(r.unwrap_err());
    // luksFormat (with the key from stdin and the header detached) went through; the open
    // needs device-mapper.
    assert_eq!(c, Code::INTERNAL, "{m}");
    assert!(
        m.contains(&format!(
            "cryptsetup luksOpen --header {}",
            header.display()
        )),
        "{m}"
    );
    assert!(m.contains("device-mapper"), "{m}");
    assert!(
        log.contains("formatting: everything on the device is lost"),
        "{log}"
    );
    assert!(
        !header.exists(),
        "the header of the failed mount is left behind"
    );
    assert_eq!(mounted_at(&image), None);
    // Undone, so the same request runs again from the start (rather than ALREADY_EXISTS).
    let (c, m) = rpc_status(
        secure_mount_at(
            &ep,
            "block-device",
            &o,
            &[],
            &image.display().to_string(),
            T,
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(c, Code::INTERNAL, "{m}");
    assert!(!header.exists());
}
