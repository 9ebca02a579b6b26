//! The node installer's image (`ghcr.io/guestpull/guestpull-deploy`), written as an OCI layout
//! without Docker: one layer with `guestpull-deploy`, `guestpull-snapshotter` and
//! `nydus-overlayfs` in `/usr/local/bin`, the shared libraries `ldd` resolves for them and the
//! dynamic loader, each at the path the loader looks for it. Nothing else: no shell, no
//! package manager, no `/etc`. The entrypoint and command are the DaemonSet's
//! (`deploy/manifests/daemonset.yaml`), so the image also runs the install by itself.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::layer::{Compression, Layer, Node};
use crate::layout::{ImageSpec, Layout, WrittenManifest};

/// The binaries the image carries, all in [`BIN_DIR`].
pub const BINARIES: [&str; 3] = [
    "guestpull-deploy",
    "guestpull-snapshotter",
    "nydus-overlayfs",
];
/// Where they are in the image (`guestpull-deploy install` finds its payload beside itself).
pub const BIN_DIR: &str = "/usr/local/bin";
/// The DaemonSet's ready file.
pub const READY_FILE: &str = "/run/guestpull-deploy/ready";

/// Why the image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InstallerError {
    /// A binary the image needs is not in the binary directory.
    #[error("{binary} not found in {dir} (build it with `cargo build --workspace --bins`)")]
    MissingBinary {
        /// Its name.
        binary: String,
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// `ldd` could not be run or failed.
    #[error("ldd {binary}: {reason}")]
    Ldd {
        /// The binary.
        binary: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A library the binary needs is not on this machine.
    #[error("{binary} needs {library}, which ldd cannot find")]
    LibraryNotFound {
        /// The binary.
        binary: PathBuf,
        /// The library's soname.
        library: String,
    },
    /// Reading a file or writing the layout failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The `ENTRYPOINT` of the image: the installer.
pub fn entrypoint() -> Vec<String> {
    vec![format!("{BIN_DIR}/guestpull-deploy")]
}

/// The `CMD` of the image: the DaemonSet container's arguments.
pub fn cmd() -> Vec<String> {
    [
        "install",
        "--host-root",
        "/host",
        "--wait",
        "--ready-file",
        READY_FILE,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The absolute paths `ldd` names in its output: resolved libraries and the loader. A library
/// it cannot resolve is an error; the vDSO (no file) is skipped.
pub fn parse_ldd(binary: &Path, out: &str) -> Result<Vec<PathBuf>, InstallerError> {
    let mut libs = Vec::new();
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (name, target) = match line.split_once("=>") {
            Some((n, t)) => (n.trim(), t.trim()),
            None => (line, line),
        };
        if target.starts_with("not found") {
            return Err(InstallerError::LibraryNotFound {
                binary: binary.to_owned(),
                library: name.to_string(),
            });
        }
        // `/path (0x…)`; `linux-vdso.so.1 (0x…)` has no file.
        let path = target.split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if line.contains("=>") {
            return Err(InstallerError::Ldd {
                binary: binary.to_owned(),
                reason: format!("unexpected line {line:?}"),
            });
        }
    }
    Ok(libs)
}

/// The shared libraries (and loader) `binary` loads, as `ldd` resolves them on this machine;
/// empty for a static binary.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, InstallerError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| InstallerError::Ldd {
            binary: binary.to_owned(),
            reason: format!("cannot run ldd ({e}); it is in Debian's libc-bin"),
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // glibc's ldd exits 1 for a static binary, saying so.
        if stdout.contains("not a dynamic executable")
            || stderr.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        return Err(InstallerError::Ldd {
            binary: binary.to_owned(),
            reason: format!("{}: {}", out.status, stderr.trim()),
        });
    }
    if stdout.contains("statically linked") {
        return Ok(Vec::new());
    }
    parse_ldd(binary, &stdout)
}

/// What goes into the image: image path (absolute) → the file on this machine whose bytes it
/// gets. Libraries keep the path ldd named (the loader searches there, `/lib64/ld-linux-…` is
/// the binaries' ELF interpreter) and hold the bytes of the file it resolves to.
pub fn contents(bin_dir: &Path) -> Result<BTreeMap<String, PathBuf>, InstallerError> {
    let mut files = BTreeMap::new();
    for b in BINARIES {
        let p = bin_dir.join(b);
        if !p.is_file() {
            return Err(InstallerError::MissingBinary {
                binary: b.to_string(),
                dir: bin_dir.to_owned(),
            });
        }
        for lib in shared_libraries(&p)? {
            files.insert(lib.to_string_lossy().into_owned(), lib);
        }
        files.insert(format!("{BIN_DIR}/{b}"), p);
    }
    Ok(files)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallerError + '_ {
    move |source| InstallerError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The image's one layer: every parent directory (0755), then each file with its permission
/// bits, owned by root, symlinks followed.
pub fn layer(files: &BTreeMap<String, PathBuf>) -> Result<Layer, InstallerError> {
    let mut dirs = BTreeSet::new();
    for path in files.keys() {
        let mut p = Path::new(path.trim_start_matches('/'));
        while let Some(parent) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(parent.to_string_lossy().into_owned());
            p = parent;
        }
    }
    let mut nodes: Vec<Node> = dirs.iter().map(|d| Node::dir(d)).collect();
    for (path, src) in files {
        let data = std::fs::read(src).map_err(io(src))?;
        let mode = std::fs::metadata(src)
            .map_err(io(src))?
            .permissions()
            .mode()
            & 0o7777;
        nodes.push(Node::File {
            path: path.trim_start_matches('/').to_string(),
            data,
            mode,
            uid: 0,
            gid: 0,
        });
    }
    Ok(Layer {
        nodes,
        compression: Compression::Gzip,
    })
}

/// The GOARCH name of this machine's architecture (the binaries are built for it).
pub fn goarch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        a => a,
    }
}

/// The installer image's spec for the binaries in `bin_dir`.
pub fn spec(bin_dir: &Path) -> Result<ImageSpec, InstallerError> {
    let layer = layer(&contents(bin_dir)?)?;
    let mut s = ImageSpec::new(vec![layer], &[]);
    s.entrypoint = entrypoint();
    s.cmd = cmd();
    s.env = vec![format!("PATH={BIN_DIR}")];
    s.architecture = goarch().into();
    Ok(s)
}

/// Writes the installer image for `bin_dir` into the OCI layout at `dest`, tagged `tag`.
pub fn write(bin_dir: &Path, dest: &Path, tag: &str) -> Result<WrittenManifest, InstallerError> {
    let spec = spec(bin_dir)?;
    let mut layout = Layout::create(dest).map_err(io(dest))?;
    let (desc, written) = layout.write_image(&spec).map_err(io(dest))?;
    layout.tag(&desc, tag).map_err(io(dest))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_libraries_and_loader_not_the_vdso() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd1c9f5000)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f1)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f2)\n";
        let libs = parse_ldd(Path::new("/b"), out).unwrap();
        assert_eq!(
            libs,
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn a_missing_library_is_an_error_naming_it() {
        let out = "\tlibfuse3.so.3 => not found\n\tlibc.so.6 => /lib/libc.so.6 (0x1)\n";
        let e = parse_ldd(Path::new("/b"), out).unwrap_err();
        assert!(
            matches!(&e, InstallerError::LibraryNotFound { library, .. } if library == "libfuse3.so.3"),
            "{e}"
        );
    }

    #[test]
    fn a_static_binary_has_no_libraries() {
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.is_file(),
            "/bin/busybox missing: apt-get install busybox-static (.ci/packages.txt)"
        );
        assert_eq!(shared_libraries(busybox).unwrap(), Vec::<PathBuf>::new());
    }

    #[test]
    fn missing_binary_is_named() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("guestpull-deploy"), b"x").unwrap();
        match contents(d.path()) {
            Err(InstallerError::MissingBinary { binary, .. }) => {
                assert_eq!(binary, "guestpull-snapshotter")
            }
            other => panic!("{other:?}"),
        }
    }

    /// A bin dir of real dynamic executables (copies of this machine's `ldd`-able `/bin/true`)
    /// gives a layer of exactly those three, their libraries and the loader, under directories.
    #[test]
    fn layer_holds_the_binaries_their_libraries_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        for b in BINARIES {
            std::fs::copy("/bin/true", d.path().join(b)).unwrap();
        }
        let libs = shared_libraries(&d.path().join("guestpull-deploy")).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
        let files = contents(d.path()).unwrap();
        let mut want: BTreeSet<String> = BINARIES
            .iter()
            .map(|b| format!("usr/local/bin/{b}"))
            .collect();
        want.extend(libs.iter().map(|l| l.to_string_lossy()[1..].to_string()));
        let layer = layer(&files).unwrap();
        let mut got_files = BTreeSet::new();
        for n in &layer.nodes {
            match n {
                Node::File { path, data, .. } => {
                    assert!(!data.is_empty(), "{path}");
                    got_files.insert(path.clone());
                }
                Node::Dir { path, mode } => {
                    assert_eq!(*mode, 0o755);
                    assert!(
                        want.iter().any(|w| w.starts_with(&format!("{path}/"))),
                        "{path}"
                    );
                }
                other => panic!("unexpected entry {other:?}"),
            }
        }
        assert_eq!(got_files, want);
        // Deterministic: the same inputs give the same layout digests.
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let wa = write(d.path(), a.path(), "t").unwrap();
        let wb = write(d.path(), b.path(), "t").unwrap();
        assert_eq!(wa.digest, wb.digest);
        let cfg: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                a.path()
                    .join("blobs/sha256")
                    .join(wa.config_digest.trim_start_matches("sha256:")),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["config"]["Entrypoint"], serde_json::json!(entrypoint()));
        assert_eq!(cfg["config"]["Cmd"], serde_json::json!(cmd()));
        assert_eq!(cfg["architecture"], goarch());
    }
}
