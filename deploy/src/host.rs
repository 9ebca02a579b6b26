//! The node as the installer reaches it: its files under a mounted root, its commands run in its
//! own mount namespace, and containerd's release line.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use snapshotter::containerd_config::ContainerdLine;

use crate::error::DeployError;

/// How host commands (`systemctl`, `containerd`, `ctr`) are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Exec {
    /// As children of the installer: it runs on the node itself.
    Direct,
    /// In PID 1's mount namespace (the DaemonSet pod, with `hostPID: true`), so the host's own
    /// binaries, libraries and systemd socket are the ones used. Done with setns(2) in the child
    /// rather than with `nsenter`, so the installer image needs no util-linux.
    Nsenter,
}

/// The node.
#[derive(Debug, Clone)]
pub struct Host {
    /// Where the node's `/` is mounted for the installer (`/` when it runs on the node).
    pub root: PathBuf,
    /// Prepended to every standard location the installer writes and names in configs and
    /// units; empty on a node. Tests set it to a directory that plays the node's `/`.
    pub prefix: String,
    /// How host commands run.
    pub exec: Exec,
}

impl Host {
    /// A standard host location (`/etc/...`) with the prefix applied: what configs name.
    pub fn path(&self, std: &str) -> String {
        format!("{}{std}", self.prefix.trim_end_matches('/'))
    }

    /// Where the installer reaches the host path `host_path`.
    pub fn file(&self, host_path: &str) -> PathBuf {
        self.root.join(host_path.trim_start_matches('/'))
    }

    /// Reads a host file; `None` when it does not exist.
    pub fn read(&self, host_path: &str) -> Result<Option<Vec<u8>>, DeployError> {
        let p = self.file(host_path);
        match fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DeployError::io(p, e)),
        }
    }

    /// Reads a host text file; `None` when it does not exist.
    pub fn read_text(&self, host_path: &str) -> Result<Option<String>, DeployError> {
        let p = self.file(host_path);
        self.read(host_path)?
            .map(|b| {
                String::from_utf8(b)
                    .map_err(|_| DeployError::Config(format!("{} is not UTF-8", p.display())))
            })
            .transpose()
    }

    /// Writes a host file atomically (temp file, fsync, rename, fsync of the directory), so a
    /// kill at any moment leaves the old contents or the new, never a mix. Returns whether it
    /// changed; an identical file is left untouched.
    pub fn write(&self, host_path: &str, data: &[u8], mode: u32) -> Result<bool, DeployError> {
        use std::os::unix::fs::PermissionsExt;
        let p = self.file(host_path);
        if fs::read(&p).ok().as_deref() == Some(data) {
            let cur = fs::metadata(&p).map_err(|e| DeployError::io(&p, e))?;
            if cur.permissions().mode() & 0o7777 == mode {
                return Ok(false);
            }
        }
        let dir = p
            .parent()
            .ok_or_else(|| DeployError::Internal(format!("{} has no parent", p.display())))?;
        fs::create_dir_all(dir).map_err(|e| DeployError::io(dir, e))?;
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        let tmp = dir.join(format!(".{name}.guestpull-deploy.tmp"));
        let mut f = fs::File::create(&tmp).map_err(|e| DeployError::io(&tmp, e))?;
        f.write_all(data).map_err(|e| DeployError::io(&tmp, e))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| DeployError::io(&tmp, e))?;
        f.sync_all().map_err(|e| DeployError::io(&tmp, e))?;
        drop(f);
        fs::rename(&tmp, &p).map_err(|e| DeployError::io(&p, e))?;
        sync_dir(dir)?;
        Ok(true)
    }

    /// Removes a host file; returns whether it existed.
    pub fn remove(&self, host_path: &str) -> Result<bool, DeployError> {
        let p = self.file(host_path);
        match fs::remove_file(&p) {
            Ok(()) => {
                if let Some(dir) = p.parent() {
                    sync_dir(dir)?;
                }
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(DeployError::io(p, e)),
        }
    }

    /// Runs a host command and returns its output, successful or not.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output, DeployError> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        if self.exec == Exec::Nsenter {
            let ns = fs::File::open("/proc/1/ns/mnt").map_err(|e| DeployError::Command {
                command: "setns /proc/1/ns/mnt".into(),
                message: format!("{e} (the pod needs hostPID: true and privileges)"),
            })?;
            // SAFETY: setns(2) is async-signal-safe and touches only the forked child.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(move || {
                    rustix::thread::move_into_link_name_space(
                        std::os::fd::AsFd::as_fd(&ns),
                        Some(rustix::thread::LinkNameSpaceType::Mount),
                    )
                    .map_err(std::io::Error::from)
                });
            }
        }
        tracing::debug!(program, ?args, "host command");
        cmd.output().map_err(|e| DeployError::Command {
            command: command_line(program, args),
            message: e.to_string(),
        })
    }

    /// Runs a host command that must succeed; returns its stdout.
    pub fn run_ok(&self, program: &str, args: &[&str]) -> Result<String, DeployError> {
        let out = self.run(program, args)?;
        if !out.status.success() {
            return Err(DeployError::Command {
                command: command_line(program, args),
                message: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn sync_dir(dir: &Path) -> Result<(), DeployError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| DeployError::io(dir, e))
}

fn command_line(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// containerd's release line from `containerd --version` output, e.g.
/// `containerd github.com/containerd/containerd/v2 2.1.9+unknown`.
pub fn parse_containerd_version(out: &str) -> Result<(ContainerdLine, String), DeployError> {
    let version = out
        .split_whitespace()
        .map(|w| w.trim_start_matches('v'))
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.'))
        .ok_or_else(|| DeployError::Config(format!("cannot read a version in {:?}", out.trim())))?;
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let line = match (major, minor) {
        (1, 6) => ContainerdLine::V1_6,
        (1, 7) => ContainerdLine::V1_7,
        (m, _) if m >= 2 => ContainerdLine::V2,
        _ => {
            return Err(DeployError::Refused(format!(
                "containerd {version} is too old for guest pull (1.6 or later, 1.7+ recommended)"
            )))
        }
    };
    Ok((line, version.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_of_the_three_releases() {
        let cases = [
            (
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3",
                ContainerdLine::V1_6,
            ),
            (
                "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1",
                ContainerdLine::V1_7,
            ),
            (
                "containerd github.com/containerd/containerd/v2 2.1.9+unknown ",
                ContainerdLine::V2,
            ),
            (
                "containerd github.com/containerd/containerd v2.2.0 1c4457e",
                ContainerdLine::V2,
            ),
        ];
        for (out, line) in cases {
            assert_eq!(parse_containerd_version(out).unwrap().0, line, "{out}");
        }
        assert!(
            parse_containerd_version("containerd github.com/containerd/containerd 1.5.9").is_err()
        );
    }

    #[test]
    fn write_is_atomic_and_idempotent() {
        let d = tempfile::tempdir().unwrap();
        let h = Host {
            root: d.path().to_path_buf(),
            prefix: String::new(),
            exec: Exec::Direct,
        };
        assert!(h.write("/etc/x/y.toml", b"a", 0o644).unwrap());
        assert!(!h.write("/etc/x/y.toml", b"a", 0o644).unwrap());
        assert!(h.write("/etc/x/y.toml", b"a", 0o600).unwrap());
        assert_eq!(h.read("/etc/x/y.toml").unwrap().unwrap(), b"a");
        let names: Vec<_> = fs::read_dir(d.path().join("etc/x")).unwrap().collect();
        assert_eq!(names.len(), 1, "no temp file left");
        assert!(h.remove("/etc/x/y.toml").unwrap());
        assert!(!h.remove("/etc/x/y.toml").unwrap());
    }
}
