//! Option parsing, device resolution, and the exact side effects of each kind of mount,
//! recorded instead of run (this host has no device-mapper).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use super::luks2::{superblock_sectors, with_eager_inode_tables, HEADER_SIZE};
use super::options::{FsType, OPTION_NAMES};
use super::testutil::{Call, Recorder};
use super::*;
use crate::resource::testutil::MapFetcher;

const KBS_KEY: &str = "kbs:///default/luks/key";
const KBS_KEY_BYTES: &[u8] = b"kbs-luks-key-0123456789";

fn opts(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What kata-agent 4.1.0 sends for a container listing /dev/trusted_store (cdh_secure_mount).
fn kata(device_id: &str, integrity: bool) -> HashMap<String, String> {
    opts(&[
        ("deviceId", device_id),
        ("sourceType", "empty"),
        ("targetType", "fileSystem"),
        ("filesystemType", "ext4"),
        ("mkfsOpts", "-E lazy_journal_init"),
        ("encryptionType", "luks2"),
        ("dataIntegrity", if integrity { "true" } else { "false" }),
    ])
}

fn parse(o: &HashMap<String, String>) -> Result<BlockDeviceOptions, SecureMountError> {
    BlockDeviceOptions::parse(o)
}

fn sv(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn the_kata_agent_request_parses_to_luks2_ext4() {
    let o = parse(&kata("254:16", true)).unwrap();
    assert_eq!(
        o,
        BlockDeviceOptions {
            device: DeviceRef::Id {
                major: 254,
                minor: 16
            },
            source: SourceType::Empty,
            key: KeySource::Ephemeral,
            integrity: true,
            mapper_name: None,
            target: Target::FileSystem {
                fs_type: FsType::Ext4,
                mkfs_opts: sv(&["-E", "lazy_journal_init"]),
            },
        }
    );
    assert!(!parse(&kata("254:16", false)).unwrap().integrity);
    let r = Request::parse(
        "block-device",
        &kata("8:0", false),
        "/run/kata-containers/image/",
    )
    .unwrap();
    assert_eq!(r.mount_point, Path::new("/run/kata-containers/image"));
    assert!(r.covers(Path::new("/run/kata-containers/image")));
    assert!(r.covers(Path::new("/run/kata-containers/image/layers")));
    assert!(!r.covers(Path::new("/run/kata-containers")));
    assert!(!r.covers(Path::new("/run/kata-containers/image2")));
}

#[test]
fn every_option_name_is_read_and_defaults_are_cdhs() {
    // Every name in OPTION_NAMES, with a value that changes the result.
    let full = opts(&[
        ("deviceId", "8:16"),
        ("devicePath", "/dev/ignored-when-deviceId-is-set"),
        ("sourceType", "encrypted"),
        ("key", "file:///run/keys/disk"),
        ("encryptionType", "luks2"),
        ("dataIntegrity", "true"),
        ("mapperName", "data-disk_1.x"),
        ("targetType", "fileSystem"),
        ("filesystemType", "ext4"),
        ("mkfsOpts", "  -m 0\t-E  nodiscard "),
    ]);
    let mut names: Vec<&str> = full.keys().map(String::as_str).collect();
    names.sort_unstable();
    let mut known = OPTION_NAMES.to_vec();
    known.sort_unstable();
    assert_eq!(names, known);
    let o = parse(&full).unwrap();
    assert_eq!(
        o.device,
        DeviceRef::Id {
            major: 8,
            minor: 16
        },
        "deviceId wins over devicePath, as in CDH"
    );
    assert_eq!(o.source, SourceType::Encrypted);
    assert_eq!(o.key, KeySource::File("/run/keys/disk".into()));
    assert!(o.integrity);
    assert_eq!(o.mapper_name.as_deref(), Some("data-disk_1.x"));
    assert_eq!(
        o.target,
        Target::FileSystem {
            fs_type: FsType::Ext4,
            mkfs_opts: sv(&["-m", "0", "-E", "nodiscard"])
        }
    );
    // The least a request may say: the defaults.
    let min = parse(&opts(&[
        ("devicePath", "/dev/vdb"),
        ("sourceType", "empty"),
        ("encryptionType", "luks2"),
        ("targetType", "fileSystem"),
    ]))
    .unwrap();
    assert_eq!(min.device, DeviceRef::Path("/dev/vdb".into()));
    assert_eq!(min.key, KeySource::Ephemeral);
    assert!(!min.integrity);
    assert_eq!(min.mapper_name, None);
    assert_eq!(
        min.target,
        Target::FileSystem {
            fs_type: FsType::Ext4,
            mkfs_opts: vec![]
        }
    );
    let dev = parse(&opts(&[
        ("devicePath", "/dev/vdb"),
        ("sourceType", "empty"),
        ("encryptionType", "luks2"),
        ("targetType", "device"),
        ("filesystemType", "ext4"),
    ]))
    .unwrap();
    assert_eq!(dev.target, Target::Device);
    // Unknown names are ignored, as CDH's deserializer ignores them.
    let mut extra = kata("8:0", false);
    extra.insert("someFutureOption".into(), "x".into());
    assert_eq!(parse(&extra).unwrap(), parse(&kata("8:0", false)).unwrap());
}

#[test]
fn key_options_follow_cdhs_schemes() {
    let with_key = |k: &str| {
        let mut o = kata("8:0", false);
        o.insert("key".into(), k.into());
        parse(&o)
    };
    assert_eq!(
        with_key("sealed.a.b.c").unwrap().key,
        KeySource::Sealed("sealed.a.b.c".into())
    );
    assert_eq!(
        with_key(KBS_KEY).unwrap().key,
        KeySource::Kbs(KBS_KEY.into())
    );
    assert_eq!(
        with_key("kbs://kbs.example:8080/repo/type/tag")
            .unwrap()
            .key,
        KeySource::Kbs("kbs://kbs.example:8080/repo/type/tag".into())
    );
    assert_eq!(
        with_key("file:///etc/luks.key").unwrap().key,
        KeySource::File("/etc/luks.key".into())
    );
    for (bad, says) in [
        ("", "sealed secret"),
        ("https://example.com/key", "sealed secret"),
        ("/etc/luks.key", "sealed secret"),
        ("file://relative/key", "absolute"),
        ("file:///etc/../shadow", "`..`"),
        ("kbs:///only/two", "kbs:///only/two"),
    ] {
        let e = with_key(bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{bad:?}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains("option key") && msg.contains(says),
            "{bad:?}: {msg}"
        );
    }
}

#[test]
fn bad_options_are_refused_naming_the_option() {
    let base = kata("8:0", false);
    let with = |k: &str, v: Option<&str>| {
        let mut o = base.clone();
        match v {
            Some(v) => o.insert(k.into(), v.into()),
            None => o.remove(k),
        };
        parse(&o).unwrap_err()
    };
    let invalid: Vec<(&str, Option<&str>, &str)> = vec![
        ("encryptionType", None, "encryptionType"),
        ("encryptionType", Some("luks1"), "encryptionType"),
        ("deviceId", None, "deviceId or devicePath"),
        ("deviceId", Some(""), "deviceId"),
        ("deviceId", Some("8"), "deviceId"),
        ("deviceId", Some("8:"), "deviceId"),
        ("deviceId", Some("8:x"), "deviceId"),
        ("deviceId", Some("+8:0"), "deviceId"),
        ("deviceId", Some("-1:0"), "deviceId"),
        ("deviceId", Some("8:0:1"), "deviceId"),
        ("deviceId", Some("4294967296:0"), "deviceId"),
        ("sourceType", None, "sourceType"),
        ("sourceType", Some("full"), "sourceType"),
        ("targetType", None, "targetType"),
        ("targetType", Some("filesystem"), "targetType"),
        ("dataIntegrity", Some("yes"), "dataIntegrity"),
        ("dataIntegrity", Some("True"), "dataIntegrity"),
        ("mapperName", Some(""), "mapperName"),
        ("mapperName", Some("--debug"), "mapperName"),
        ("mapperName", Some("a/b"), "mapperName"),
        ("mapperName", Some(".."), "mapperName"),
        ("mapperName", Some("a b"), "mapperName"),
    ];
    for (k, v, says) in invalid {
        let e = with(k, v);
        assert_eq!(e.kind(), ErrorKind::Invalid, "{k}={v:?}: {e}");
        assert!(e.to_string().contains(says), "{k}={v:?}: {e}");
    }
    let long = "m".repeat(128);
    assert_eq!(with("mapperName", Some(&long)).kind(), ErrorKind::Invalid);
    assert!(parse(&{
        let mut o = base.clone();
        o.insert("mapperName".into(), "m".repeat(127));
        o
    })
    .is_ok());
    let mut no_dev = base.clone();
    no_dev.remove("deviceId");
    no_dev.insert("devicePath".into(), "dev/vdb".into());
    assert_eq!(parse(&no_dev).unwrap_err().kind(), ErrorKind::Invalid);
    // What CDH has and this guest does not is UNIMPLEMENTED, not a bad request.
    for (k, v, says) in [
        ("encryptionType", "zfs", "zfs"),
        ("filesystemType", "xfs", "xfs"),
    ] {
        let e = with(k, Some(v));
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{k}={v}: {e}");
        assert!(e.to_string().contains(says), "{e}");
    }
    // An existing volume cannot be opened with a key made up now.
    let mut enc = base.clone();
    enc.insert("sourceType".into(), "encrypted".into());
    let e = parse(&enc).unwrap_err();
    assert!(e.to_string().contains("option key"), "{e}");
}

#[test]
fn requests_need_a_served_volume_type_and_a_clean_mount_point() {
    for vt in ["alibaba-cloud-oss", "", "Block-Device"] {
        let e = Request::parse(vt, &kata("8:0", false), "/mnt/x").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{vt:?}: {e}");
    }
    for mp in [
        "",
        "relative/dir",
        "/run/../etc",
        "/run/./x",
        "/",
        "//",
        "/a\0b",
    ] {
        let e = Request::parse("block-device", &kata("8:0", false), mp).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{mp:?}: {e}");
        assert!(e.to_string().contains("mount_point"), "{mp:?}: {e}");
    }
    let r = Request::parse("block-device", &kata("8:0", false), "//run//x///").unwrap();
    assert_eq!(r.mount_point, Path::new("/run/x"));
}

#[test]
fn device_ids_resolve_through_sysfs_uevent() {
    let d = tempfile::tempdir().unwrap();
    let paths = Paths {
        header_dir: d.path().join("h"),
        sysfs: d.path().join("sys"),
        dev: PathBuf::from("/dev"),
    };
    let uevent = |id: &str, text: &str| {
        let dir = d.path().join("sys/dev/block").join(id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("uevent"), text).unwrap();
    };
    uevent(
        "254:16",
        "MAJOR=254\nMINOR=16\nDEVNAME=vdb\nDEVTYPE=disk\nDISKSEQ=3\n",
    );
    uevent("259:0", "MAJOR=259\nMINOR=0\nDEVNAME=nvme0n1\n");
    uevent("8:1", "MAJOR=8\nMINOR=1\nDEVTYPE=partition\n");
    uevent("8:2", "DEVNAME=../etc/shadow\n");
    uevent("8:3", "DEVNAME=/dev/sda3\n");
    assert_eq!(device_node(&paths, 254, 16).unwrap(), Path::new("/dev/vdb"));
    assert_eq!(
        device_node(&paths, 259, 0).unwrap(),
        Path::new("/dev/nvme0n1")
    );
    for (maj, min, says) in [
        (8, 1, "no DEVNAME"),
        (8, 2, "not a name below"),
        (8, 3, "not a name below"),
        (7, 7, "7:7/uevent"),
    ] {
        let e = device_node(&paths, maj, min).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{maj}:{min}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("deviceId {maj}:{min}")) && msg.contains(says),
            "{msg}"
        );
    }
}

#[test]
fn mke2fs_dry_runs_give_the_superblock_sectors() {
    assert_eq!(
        superblock_sectors(testutil::DRY_RUN_4K).unwrap(),
        [0u64, 32768, 98304, 163840, 229376]
            .iter()
            .map(|b| (b * 4096, 4096))
            .collect::<Vec<_>>()
    );
    // 1k blocks: the primary superblock is block 1, backups at 8193, 24577; each is widened to
    // the 4096-byte sectors holding it.
    let one_k = "Creating filesystem with 65536 1k blocks and 16384 inodes\n\
                 Superblock backups stored on blocks: \n\t8193, 24577\n\nAllocating group tables";
    assert_eq!(
        superblock_sectors(one_k).unwrap(),
        vec![(0, 4096), (8192 * 1024, 4096), (24576 * 1024, 4096)]
    );
    // One block group: no backups line, only the primary superblock.
    let small = "Creating filesystem with 2048 4k blocks and 2048 inodes\n\n";
    assert_eq!(superblock_sectors(small).unwrap(), vec![(0, 4096)]);
    assert!(
        superblock_sectors("mke2fs: Device size reported to be zero.")
            .unwrap_err()
            .contains("no block size")
    );
    assert!(superblock_sectors(
        "Creating filesystem with 8 4k blocks\nSuperblock backups stored on blocks: \n\t32768, oops\n"
    )
    .is_err());
}

#[test]
fn integrity_adds_eager_inode_tables_unless_the_caller_chose() {
    let f = |v: &[&str]| with_eager_inode_tables(&sv(v));
    assert_eq!(
        f(&["-E", "lazy_journal_init"]),
        sv(&["-E", "lazy_journal_init,lazy_itable_init=0"])
    );
    assert_eq!(
        f(&["-E", "a", "-m", "0", "-E", "b"]),
        sv(&["-E", "a", "-m", "0", "-E", "b,lazy_itable_init=0"])
    );
    assert_eq!(f(&["-Enodiscard"]), sv(&["-Enodiscard,lazy_itable_init=0"]));
    assert_eq!(
        f(&["-m", "0"]),
        sv(&["-m", "0", "-E", "lazy_itable_init=0"])
    );
    assert_eq!(f(&[]), sv(&["-E", "lazy_itable_init=0"]));
    assert_eq!(
        f(&["-E", "lazy_itable_init=1"]),
        sv(&["-E", "lazy_itable_init=1"])
    );
}

/// A mounter over a recorder, with a fake sysfs naming `254:16` → `<lab>/dev/vdb` (an image file
/// standing in for the disk), headers below `<lab>/headers` and a mount point `<lab>/image`.
struct Lab {
    dir: tempfile::TempDir,
    rec: Arc<Recorder>,
    mounter: SecureMounter,
}

impl Lab {
    fn new(rec: Recorder) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir_all(p.join("sys/dev/block/254:16")).unwrap();
        std::fs::write(
            p.join("sys/dev/block/254:16/uevent"),
            "MAJOR=254\nMINOR=16\nDEVNAME=vdb\n",
        )
        .unwrap();
        std::fs::create_dir_all(p.join("dev")).unwrap();
        std::fs::write(p.join("dev/vdb"), b"").unwrap();
        std::fs::write(p.join("dev/vdc"), b"").unwrap();
        std::fs::create_dir_all(p.join("image")).unwrap();
        std::fs::create_dir_all(p.join("keys")).unwrap();
        let mut kbs = MapFetcher::default();
        kbs.0.insert(KBS_KEY.into(), KBS_KEY_BYTES.to_vec());
        let fetcher: Arc<dyn ResourceFetcher> = Arc::new(kbs);
        // Unverified sealed secrets (CDH's skip_sealed_secret_verification): the unsealing
        // itself is sealed.rs's to test; here only that the key comes through it.
        let unsealer = Arc::new(Unsealer::new(fetcher.clone(), true));
        let rec = Arc::new(rec);
        let mounter = SecureMounter::with_system(
            rec.clone(),
            fetcher,
            unsealer,
            Paths {
                header_dir: p.join("headers"),
                sysfs: p.join("sys"),
                dev: p.join("dev"),
            },
        );
        Self { dir, rec, mounter }
    }

    fn path(&self, rel: &str) -> PathBuf {
        std::fs::canonicalize(self.dir.path()).unwrap().join(rel)
    }

    fn mp(&self) -> String {
        format!("{}/", self.path("image").display())
    }

    fn header(&self, device: &str) -> PathBuf {
        let dev = self.path(device);
        self.dir.path().join("headers").join(format!(
            "{}.header",
            URL_SAFE_NO_PAD.encode(dev.display().to_string())
        ))
    }

    async fn mount(&self, o: &HashMap<String, String>) -> Result<Volume, SecureMountError> {
        self.mount_at(o, &self.mp()).await
    }

    async fn mount_at(
        &self,
        o: &HashMap<String, String>,
        mp: &str,
    ) -> Result<Volume, SecureMountError> {
        let req = Request::parse("block-device", o, mp)?;
        self.mounter.mount(req, ()).await
    }
}

fn run(program: &str, args: &[&str], stdin: Option<&[u8]>) -> Call {
    Call::Run {
        program: program.into(),
        args: sv(args),
        stdin: stdin.map(<[u8]>::to_vec),
    }
}

fn stdin_of(c: &Call) -> Vec<u8> {
    match c {
        Call::Run { stdin: Some(s), .. } => s.clone(),
        other => panic!("no stdin in {other:?}"),
    }
}

fn assert_uuid_v4(s: &str) {
    let parts: Vec<&str> = s.split('-').collect();
    assert_eq!(
        parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
        [8, 4, 4, 4, 12],
        "{s}"
    );
    assert!(
        parts[2].starts_with('4') && "89ab".contains(&parts[3][..1]),
        "{s}"
    );
}

#[tokio::test]
async fn the_kata_request_without_integrity_formats_opens_makes_ext4_and_mounts() {
    let lab = Lab::new(Recorder::default());
    let v = lab.mount(&kata("254:16", false)).await.unwrap();
    let dev = lab.path("dev/vdb");
    let hdr = lab.header("dev/vdb");
    let (dev_s, hdr_s) = (dev.display().to_string(), hdr.display().to_string());
    assert_uuid_v4(&v.mapper);
    let mapped = format!("/dev/mapper/{}", v.mapper);
    let calls = lab.rec.calls();
    let key = stdin_of(&calls[0]);
    assert_eq!(key.len(), 4096);
    assert!(key.iter().any(|b| *b != 0));
    assert_eq!(
        calls,
        vec![
            run(
                "cryptsetup",
                &[
                    "--batch-mode",
                    "luksFormat",
                    "--type",
                    "luks2",
                    "--cipher",
                    "aes-xts-plain64",
                    "--sector-size",
                    "4096",
                    "--header",
                    &hdr_s,
                    &dev_s,
                    "-"
                ],
                Some(&key)
            ),
            run(
                "cryptsetup",
                &["luksOpen", "--header", &hdr_s, "-d", "-", &dev_s, &v.mapper],
                Some(&key)
            ),
            run(
                "mkfs.ext4",
                &[&mapped, "-F", "-E", "lazy_journal_init"],
                None
            ),
            Call::Mount {
                device: mapped.clone().into(),
                target: lab.path("image"),
                fs: "ext4".into()
            },
        ]
    );
    assert_eq!(
        v,
        Volume {
            device: dev.clone(),
            mapper: v.mapper.clone(),
            header: Some(hdr.clone())
        }
    );
    // The detached header: in its own 0700 dir, 0600, CDH's 16 MiB.
    let m = std::fs::metadata(&hdr).unwrap();
    assert_eq!(m.len(), HEADER_SIZE);
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    let dm = std::fs::metadata(hdr.parent().unwrap()).unwrap();
    assert_eq!(dm.permissions().mode() & 0o777, 0o700);
    assert_eq!(lab.mounter.volume(&lab.path("image")).await, Some(v));
}

#[tokio::test]
async fn the_kata_request_with_integrity_adds_hmac_and_prepares_the_superblocks() {
    let lab = Lab::new(Recorder::default());
    let v = lab.mount(&kata("254:16", true)).await.unwrap();
    let dev_s = lab.path("dev/vdb").display().to_string();
    let hdr_s = lab.header("dev/vdb").display().to_string();
    let mapped = format!("/dev/mapper/{}", v.mapper);
    let calls = lab.rec.calls();
    let key = stdin_of(&calls[0]);
    let zero = |block: u64| Call::Zero {
        device: mapped.clone().into(),
        offset: block * 4096,
        len: 4096,
    };
    assert_eq!(
        calls,
        vec![
            run(
                "cryptsetup",
                &[
                    "--batch-mode",
                    "luksFormat",
                    "--type",
                    "luks2",
                    "--cipher",
                    "aes-xts-plain64",
                    "--sector-size",
                    "4096",
                    "--header",
                    &hdr_s,
                    "--integrity",
                    "hmac-sha256",
                    "--integrity-no-wipe",
                    "--integrity-no-journal",
                    &dev_s,
                    "-"
                ],
                Some(&key)
            ),
            run(
                "cryptsetup",
                &["luksOpen", "--header", &hdr_s, "-d", "-", &dev_s, &v.mapper],
                Some(&key)
            ),
            run(
                "mkfs.ext4",
                &[
                    &mapped,
                    "-F",
                    "-n",
                    "-E",
                    "lazy_journal_init,lazy_itable_init=0"
                ],
                None
            ),
            zero(0),
            zero(32768),
            zero(98304),
            zero(163840),
            zero(229376),
            run(
                "mkfs.ext4",
                &[&mapped, "-F", "-E", "lazy_journal_init,lazy_itable_init=0"],
                None
            ),
            Call::Mount {
                device: mapped.clone().into(),
                target: lab.path("image"),
                fs: "ext4".into()
            },
        ]
    );
}

#[tokio::test]
async fn a_given_key_goes_to_stdin_only() {
    const FILE_KEY: &[u8] = b"correct horse battery staple, luks edition";
    let sealed = format!(
        "sealed.hdr.{}.sig",
        URL_SAFE_NO_PAD.encode(
            serde_json::json!({"version": "0.1.0", "type": "vault", "name": KBS_KEY,
                "provider": "kbs", "provider_settings": {}, "annotations": {}})
            .to_string()
        )
    );
    for source in ["file", "kbs", "sealed"] {
        let lab = Lab::new(Recorder::default());
        let (key, want) = match source {
            "file" => {
                let f = lab.path("keys/disk.key");
                std::fs::write(&f, FILE_KEY).unwrap();
                (format!("file://{}", f.display()), FILE_KEY)
            }
            "kbs" => (KBS_KEY.to_string(), KBS_KEY_BYTES),
            _ => (sealed.clone(), KBS_KEY_BYTES),
        };
        let mut o = kata("254:16", true);
        o.insert("key".into(), key.clone());
        lab.mount(&o).await.unwrap();
        let text = std::str::from_utf8(want).unwrap();
        let mut fed = 0;
        for c in lab.rec.calls() {
            let Call::Run {
                program,
                args,
                stdin,
            } = c
            else {
                continue;
            };
            for a in &args {
                assert!(!a.contains(text), "{source}: the key in {program} {a:?}");
            }
            if program == "cryptsetup" {
                assert_eq!(stdin.as_deref(), Some(want), "{source}: {args:?}");
                fed += 1;
            } else {
                assert_eq!(stdin, None, "{program} got stdin");
            }
        }
        assert_eq!(fed, 2, "{source}: luksFormat and luksOpen read the key");
    }
}

#[tokio::test]
async fn an_encrypted_source_is_opened_with_its_own_header_and_mounted() {
    let lab = Lab::new(Recorder::default());
    let key_file = lab.path("keys/k");
    std::fs::write(&key_file, b"k3y").unwrap();
    let o = opts(&[
        ("devicePath", &lab.path("dev/vdc").display().to_string()),
        ("sourceType", "encrypted"),
        ("key", &format!("file://{}", key_file.display())),
        ("encryptionType", "luks2"),
        ("targetType", "fileSystem"),
        ("mapperName", "persist"),
        ("dataIntegrity", "true"),
    ]);
    let v = lab.mount(&o).await.unwrap();
    let dev_s = lab.path("dev/vdc").display().to_string();
    assert_eq!(
        lab.rec.calls(),
        vec![
            run(
                "cryptsetup",
                &["luksOpen", "-d", "-", &dev_s, "persist"],
                Some(b"k3y")
            ),
            Call::Mount {
                device: "/dev/mapper/persist".into(),
                target: lab.path("image"),
                fs: "ext4".into()
            },
        ]
    );
    assert_eq!(v.header, None);
    assert!(!lab.dir.path().join("headers").exists());
}

#[tokio::test]
async fn a_device_target_is_a_symlink_to_the_opened_volume() {
    let lab = Lab::new(Recorder::default());
    let link = lab.path("disk");
    let o = opts(&[
        ("deviceId", "254:16"),
        ("sourceType", "empty"),
        ("encryptionType", "luks2"),
        ("targetType", "device"),
        ("mapperName", "raw"),
    ]);
    lab.mount_at(&o, &link.display().to_string()).await.unwrap();
    let calls = lab.rec.calls();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert!(matches!(&calls[0], Call::Run { args, .. } if args[1] == "luksFormat"));
    assert!(matches!(&calls[1], Call::Run { args, .. } if args[0] == "luksOpen"));
    assert_eq!(
        calls[2],
        Call::Symlink {
            target: "/dev/mapper/raw".into(),
            link: link.clone()
        }
    );
    // The link's place must be free: a directory there is refused before the device is touched.
    let lab = Lab::new(Recorder::default());
    let e = lab.mount_at(&o, &lab.mp()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert!(lab.rec.calls().is_empty());
}

#[tokio::test]
async fn a_second_mount_is_refused_as_cdh_refuses_it_without_touching_the_device() {
    let lab = Lab::new(Recorder::default());
    lab.mount(&kata("254:16", false)).await.unwrap();
    let before = lab.rec.calls().len();
    // kata-agent asks again for every container listing the device.
    let e = lab.mount(&kata("254:16", false)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert!(e.to_string().contains("already a secure mount"), "{e}");
    // The same device elsewhere.
    std::fs::create_dir_all(lab.path("other")).unwrap();
    let other = lab.path("other").display().to_string();
    let e = lab
        .mount_at(&kata("254:16", false), &other)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert!(e.to_string().contains("already securely mounted"), "{e}");
    assert_eq!(lab.rec.calls().len(), before);

    // A header left by an earlier process (the in-memory record is gone): CDH refuses too,
    // since it never overwrites a header.
    let lab = Lab::new(Recorder::default());
    let hdr = lab.header("dev/vdb");
    std::fs::create_dir_all(hdr.parent().unwrap()).unwrap();
    std::fs::write(&hdr, b"earlier").unwrap();
    let e = lab.mount(&kata("254:16", false)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert!(e.to_string().contains("LUKS header"), "{e}");
    assert!(lab.rec.calls().is_empty());
    assert_eq!(std::fs::read(&hdr).unwrap(), b"earlier");
}

#[tokio::test]
async fn failures_after_the_open_close_the_volume_and_drop_the_header() {
    let lab = Lab::new(Recorder {
        fail: Some(("mkfs.ext4", "/dev/mapper/m1")),
        ..Default::default()
    });
    let mut o = kata("254:16", false);
    o.insert("mapperName".into(), "m1".into());
    let e = lab.mount(&o).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Internal, "{e}");
    assert!(e.to_string().contains("mkfs.ext4 /dev/mapper/m1 -F"), "{e}");
    let calls = lab.rec.calls();
    assert_eq!(
        calls.last(),
        Some(&run("cryptsetup", &["luksClose", "m1"], None))
    );
    assert!(!lab.header("dev/vdb").exists());
    assert_eq!(lab.mounter.volume(&lab.path("image")).await, None);

    // A failed mount(2) likewise.
    let lab = Lab::new(Recorder {
        fail_mount: true,
        ..Default::default()
    });
    let e = lab.mount(&o).await.unwrap_err();
    assert!(e.to_string().contains("mounting /dev/mapper/m1"), "{e}");
    assert_eq!(
        lab.rec.calls().last(),
        Some(&run("cryptsetup", &["luksClose", "m1"], None))
    );
    assert!(!lab.header("dev/vdb").exists());

    // A failed format: nothing was opened, so nothing is closed; the retry starts afresh.
    let lab = Lab::new(Recorder {
        fail: Some(("cryptsetup", "--batch-mode")),
        ..Default::default()
    });
    let e = lab.mount(&o).await.unwrap_err();
    assert!(e.to_string().contains("luksFormat"), "{e}");
    assert_eq!(lab.rec.calls().len(), 1);
    assert!(!lab.header("dev/vdb").exists());
    let e = lab.mount(&o).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Internal, "not AlreadyExists: {e}");
}

#[tokio::test]
async fn what_is_missing_is_found_before_the_device_is_touched() {
    let cases: Vec<(Recorder, HashMap<String, String>, ErrorKind, &str)> = vec![
        (
            Recorder {
                missing: vec!["cryptsetup"],
                ..Default::default()
            },
            kata("254:16", false),
            ErrorKind::Precondition,
            "cryptsetup not found on PATH",
        ),
        (
            Recorder {
                missing: vec!["mkfs.ext4"],
                ..Default::default()
            },
            kata("254:16", true),
            ErrorKind::Precondition,
            "mkfs.ext4 not found on PATH",
        ),
        (
            Recorder::default(),
            kata("254:99", false),
            ErrorKind::NotFound,
            "deviceId 254:99",
        ),
        (
            Recorder::default(),
            {
                let mut o = kata("254:16", false);
                o.remove("deviceId");
                o.insert("devicePath".into(), "/nonexistent/vdz".into());
                o
            },
            ErrorKind::NotFound,
            "/nonexistent/vdz",
        ),
        (
            Recorder::default(),
            {
                let mut o = kata("254:16", false);
                o.insert("key".into(), "file:///nonexistent/luks.key".into());
                o
            },
            ErrorKind::NotFound,
            "file:///nonexistent/luks.key",
        ),
        (
            Recorder::default(),
            {
                let mut o = kata("254:16", false);
                o.insert("key".into(), "kbs:///default/luks/absent".into());
                o
            },
            ErrorKind::NotFound,
            "kbs:///default/luks/absent",
        ),
    ];
    for (rec, o, kind, says) in cases {
        let lab = Lab::new(rec);
        let e = lab.mount(&o).await.unwrap_err();
        assert_eq!(e.kind(), kind, "{e}");
        assert!(e.to_string().contains(says), "{says}: {e}");
        assert!(lab.rec.calls().is_empty(), "{says}: {:?}", lab.rec.calls());
        assert!(!lab.dir.path().join("headers").exists(), "{says}");
    }
    // A mount point that is missing or not a directory, a device that is a directory, an empty
    // key file.
    let lab = Lab::new(Recorder::default());
    let gone = lab.path("gone").display().to_string();
    let e = lab
        .mount_at(&kata("254:16", false), &gone)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    std::fs::write(lab.path("afile"), b"").unwrap();
    let afile = lab.path("afile").display().to_string();
    let e = lab
        .mount_at(&kata("254:16", false), &afile)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    let mut o = kata("254:16", false);
    o.remove("deviceId");
    o.insert("devicePath".into(), lab.path("keys").display().to_string());
    let e = lab.mount(&o).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert!(e.to_string().contains("not a block device"), "{e}");
    std::fs::write(lab.path("keys/empty"), b"").unwrap();
    let mut o = kata("254:16", false);
    o.insert(
        "key".into(),
        format!("file://{}", lab.path("keys/empty").display()),
    );
    let e = lab.mount(&o).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert!(e.to_string().contains("is empty"), "{e}");
    assert!(lab.rec.calls().is_empty());
}

#[tokio::test]
async fn mounts_are_served_one_at_a_time() {
    // Two requests for two devices at once, each command slow: the second request's commands
    // start only after the first has mounted.
    let lab = Arc::new(Lab::new(Recorder {
        slow: Some(std::time::Duration::from_millis(30)),
        ..Default::default()
    }));
    std::fs::create_dir_all(lab.path("image2")).unwrap();
    let mut a = kata("254:16", false);
    a.insert("mapperName".into(), "ma".into());
    let mut b = a.clone();
    b.remove("deviceId");
    b.insert(
        "devicePath".into(),
        lab.path("dev/vdc").display().to_string(),
    );
    b.insert("mapperName".into(), "mb".into());
    let mp2 = lab.path("image2").display().to_string();
    let (ra, rb) = tokio::join!(lab.mount(&a), lab.mount_at(&b, &mp2));
    ra.unwrap();
    rb.unwrap();
    let vdb = lab.path("dev/vdb").display().to_string();
    // Which request each side effect belongs to.
    let owner: Vec<&str> = lab
        .rec
        .calls()
        .iter()
        .map(|c| {
            let text = format!("{c:?}");
            if text.contains("ma\"") || text.contains("/ma\"") || text.contains(&vdb) {
                "a"
            } else {
                "b"
            }
        })
        .collect();
    assert_eq!(owner.len(), 8, "{owner:?}");
    assert!(
        owner == ["a", "a", "a", "a", "b", "b", "b", "b"]
            || owner == ["b", "b", "b", "b", "a", "a", "a", "a"],
        "interleaved: {owner:?}"
    );
}
