//! Every side effect a secure mount has on the guest, behind one trait: running `cryptsetup` and
//! `mkfs.*`, mounting, symlinking and zeroing sectors. The tests substitute a recorder, so the
//! exact command lines, what went to stdin and the order of the steps are asserted without
//! device-mapper.
//!
//! The LUKS2 work is done by the `cryptsetup` binary, as CDH does: there is no maintained
//! pure-Rust LUKS2 implementation, and binding libcryptsetup would link it, libdevmapper,
//! json-c and a crypto library into the static guest binary, for what one process call does.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use zeroize::Zeroizing;

use super::SecureMountError;

/// PATH used when the environment has none (kata-agent starts the CDH with
/// `PATH=/bin:/sbin/:/usr/bin/:/usr/sbin/`).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Most of a failed command's stderr kept in its error.
const MAX_STDERR: usize = 2048;

/// The side effects of a secure mount (all blocking).
pub trait System: Send + Sync {
    /// Where `program` is found on PATH, if anywhere.
    fn find_program(&self, program: &str) -> Option<PathBuf>;

    /// Runs `program` with `args`; `stdin`, when given, is written to it and then closed.
    /// Returns stdout when it exits 0.
    fn run(
        &self,
        program: &str,
        args: &[String],
        stdin: Option<&[u8]>,
    ) -> Result<String, SecureMountError>;

    /// Mounts the filesystem on `device` at `target` (`MS_NOATIME`, no data, as CDH does).
    fn mount_fs(&self, device: &Path, target: &Path, fs_type: &str) -> io::Result<()>;

    /// Creates the symlink `link` pointing at `target`.
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()>;

    /// Writes zeros to `len` bytes of `device` at `offset` (both multiples of 4096), bypassing
    /// the page cache.
    fn zero(&self, device: &Path, offset: u64, len: usize) -> io::Result<()>;
}

/// The real guest: processes found on PATH, mount(2), symlink(2), O_DIRECT writes.
#[derive(Debug, Default)]
pub struct Host;

fn path_entries() -> Vec<PathBuf> {
    let path = std::env::var_os("PATH")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| OsString::from(DEFAULT_PATH));
    std::env::split_paths(&path).collect()
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl System for Host {
    fn find_program(&self, program: &str) -> Option<PathBuf> {
        path_entries()
            .into_iter()
            .filter(|d| d.is_absolute())
            .map(|d| d.join(program))
            .find(|p| is_executable(p))
    }

    fn run(
        &self,
        program: &str,
        args: &[String],
        stdin: Option<&[u8]>,
    ) -> Result<String, SecureMountError> {
        let exe = self
            .find_program(program)
            .ok_or_else(|| SecureMountError::ToolMissing {
                program: program.to_owned(),
            })?;
        let failed = |reason: String| SecureMountError::Command {
            program: program.to_owned(),
            args: args.join(" "),
            reason,
        };
        // The C locale: mke2fs's dry-run output is parsed, and translated text would not match.
        let mut child = Command::new(&exe)
            .args(args)
            .env("LC_ALL", "C")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failed(format!("starting {}: {e}", exe.display())))?;
        let pipe = child.stdin.take();
        // The key is written from another thread while this one drains stdout and stderr, so a
        // child that writes before it reads cannot deadlock against a full pipe.
        let (output, written) = std::thread::scope(|s| {
            let writer = s.spawn(move || -> io::Result<()> {
                if let (Some(mut pipe), Some(data)) = (pipe, stdin) {
                    pipe.write_all(data)?;
                }
                Ok(())
            });
            let output = child.wait_with_output();
            (output, writer.join())
        });
        let output = output.map_err(|e| failed(format!("waiting: {e}")))?;
        if !output.status.success() {
            let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
            if stderr.len() > MAX_STDERR {
                let mut cut = MAX_STDERR;
                while !stderr.is_char_boundary(cut) {
                    cut -= 1;
                }
                stderr.truncate(cut);
                stderr.push('…');
            }
            return Err(failed(format!("{}: {stderr}", output.status)));
        }
        match written {
            Ok(Ok(())) => {}
            // A successful run that did not take all its input is not trusted.
            Ok(Err(e)) => return Err(failed(format!("writing stdin: {e}"))),
            Err(_) => return Err(failed("the stdin writer panicked".into())),
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn mount_fs(&self, device: &Path, target: &Path, fs_type: &str) -> io::Result<()> {
        use rustix::mount::{mount, MountFlags};
        mount(device, target, fs_type, MountFlags::NOATIME, c"").map_err(io::Error::from)
    }

    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        std::os::unix::fs::symlink(target, link)
    }

    fn zero(&self, device: &Path, offset: u64, len: usize) -> io::Result<()> {
        use rustix::fs::{open, Mode, OFlags};
        const ALIGN: usize = 4096;
        if offset % ALIGN as u64 != 0 || len % ALIGN != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("zeroing {len} bytes at {offset}: not 4096-byte aligned"),
            ));
        }
        let fd = open(
            device,
            OFlags::WRONLY | OFlags::DIRECT | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        // O_DIRECT needs an aligned buffer: take the aligned window of a larger zeroed one.
        let chunk = len.min(1 << 20);
        let buf = vec![0u8; chunk + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        let zeros = buf
            .get(start..start + chunk)
            .ok_or_else(|| io::Error::other("no 4096-byte aligned buffer"))?;
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(chunk);
            let w = rustix::io::pwrite(&fd, &zeros[..n], offset + done as u64)?;
            if w == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!(
                        "{}: short write at {}",
                        device.display(),
                        offset + done as u64
                    ),
                ));
            }
            done += w;
        }
        rustix::fs::fsync(&fd)?;
        Ok(())
    }
}

/// Reads at most `max` bytes of `path` (a key file), refusing a larger one. The buffer is
/// sized from the file first so that growing it leaves no copy of the key in freed memory.
pub fn read_bounded(path: &Path, max: usize) -> io::Result<Zeroizing<Vec<u8>>> {
    let too_large = || {
        io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("larger than {max} bytes"),
        )
    };
    let f = std::fs::File::open(path)?;
    let len = usize::try_from(f.metadata()?.len()).map_err(|_| too_large())?;
    if len > max {
        return Err(too_large());
    }
    let mut out = Zeroizing::new(Vec::with_capacity(len + 1));
    f.take(max as u64 + 1).read_to_end(&mut out)?;
    if out.len() > max {
        return Err(too_large());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_runs_programs_with_stdin_and_reports_failures() {
        let host = Host;
        let out = host
            .run("cat", &[], Some(b"key bytes\0\xff"))
            .expect("cat on PATH");
        assert_eq!(out.as_bytes(), b"key bytes\0\xef\xbf\xbd");
        let e = host
            .run("sh", &["-c".into(), "echo nope >&2; exit 3".into()], None)
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("sh -c echo nope >&2; exit 3"), "{msg}");
        assert!(
            msg.contains("exit status: 3") && msg.contains("nope"),
            "{msg}"
        );
        let e = host.run("guestpull-no-such-tool", &[], None).unwrap_err();
        assert!(matches!(e, SecureMountError::ToolMissing { .. }), "{e}");
    }

    #[test]
    fn zeroing_needs_aligned_ranges_and_writes_zeros() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("dev");
        std::fs::write(&f, vec![0xa5u8; 3 * 4096]).unwrap();
        assert!(Host.zero(&f, 100, 4096).is_err());
        assert!(Host.zero(&f, 4096, 100).is_err());
        // tmpfs has no O_DIRECT: the aligned path is exercised where the filesystem allows it.
        match Host.zero(&f, 4096, 4096) {
            Ok(()) => {
                let data = std::fs::read(&f).unwrap();
                assert!(data[..4096].iter().all(|b| *b == 0xa5));
                assert!(data[4096..8192].iter().all(|b| *b == 0));
                assert!(data[8192..].iter().all(|b| *b == 0xa5));
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc_einval()), "{e}"),
        }
    }

    fn libc_einval() -> i32 {
        rustix::io::Errno::INVAL.raw_os_error()
    }

    #[test]
    fn key_files_are_bounded() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("k");
        std::fs::write(&f, [7u8; 16]).unwrap();
        assert_eq!(*read_bounded(&f, 16).unwrap(), vec![7u8; 16]);
        let e = read_bounded(&f, 15).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge);
    }
}
