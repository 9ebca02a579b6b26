//! A recording [`System`] for the tests: every command, mount, link and zeroing in order, with
//! what went to stdin; programs can be missing or fail.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::system::System;
use super::SecureMountError;

/// One side effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    Run {
        program: String,
        args: Vec<String>,
        stdin: Option<Vec<u8>>,
    },
    Mount {
        device: PathBuf,
        target: PathBuf,
        fs: String,
    },
    Symlink {
        target: PathBuf,
        link: PathBuf,
    },
    Zero {
        device: PathBuf,
        offset: u64,
        len: usize,
    },
}

/// What mke2fs -n prints for a 1 GiB ext4 with 4k blocks.
pub(crate) const DRY_RUN_4K: &str = "mke2fs 1.47.0 (5-Feb-2023)\n\
Creating filesystem with 262144 4k blocks and 65536 inodes\n\
Filesystem UUID: 0b3d8a47-5a5e-4f1e-9a57-7d35a1c3a5c1\n\
Superblock backups stored on blocks: \n\
\t32768, 98304, 163840, 229376\n\n";

#[derive(Default)]
pub(crate) struct Recorder {
    pub calls: Mutex<Vec<Call>>,
    /// Programs not on PATH.
    pub missing: Vec<&'static str>,
    /// A run fails when its program and first argument are these.
    pub fail: Option<(&'static str, &'static str)>,
    /// The mount fails.
    pub fail_mount: bool,
    /// Every command takes this long.
    pub slow: Option<std::time::Duration>,
    /// A mount moves what is at the target to `<target>.under` and leaves an empty directory
    /// there: what path lookups see after a real mount on it.
    pub overmount: bool,
}

impl Recorder {
    pub(crate) fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

impl System for Recorder {
    fn find_program(&self, program: &str) -> Option<PathBuf> {
        (!self.missing.contains(&program)).then(|| Path::new("/usr/sbin").join(program))
    }

    fn run(
        &self,
        program: &str,
        args: &[String],
        stdin: Option<&[u8]>,
    ) -> Result<String, SecureMountError> {
        self.calls.lock().unwrap().push(Call::Run {
            program: program.into(),
            args: args.to_vec(),
            stdin: stdin.map(<[u8]>::to_vec),
        });
        if let Some(d) = self.slow {
            std::thread::sleep(d);
        }
        if self.missing.contains(&program) {
            return Err(SecureMountError::ToolMissing {
                program: program.into(),
            });
        }
        if let Some((p, first)) = self.fail {
            if p == program && args.first().is_some_and(|a| a == first) {
                return Err(SecureMountError::Command {
                    program: program.into(),
                    args: args.join(" "),
                    reason: "exit status: 1: injected failure".into(),
                });
            }
        }
        if program.starts_with("mkfs.") && args.iter().any(|a| a == "-n") {
            return Ok(DRY_RUN_4K.into());
        }
        Ok(String::new())
    }

    fn mount_fs(&self, device: &Path, target: &Path, fs_type: &str) -> io::Result<()> {
        self.calls.lock().unwrap().push(Call::Mount {
            device: device.into(),
            target: target.into(),
            fs: fs_type.into(),
        });
        if self.fail_mount {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::NODEV.raw_os_error(),
            ));
        }
        if self.overmount {
            let mut under = target.as_os_str().to_owned();
            under.push(".under");
            std::fs::rename(target, under)?;
            std::fs::create_dir(target)?;
        }
        Ok(())
    }

    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        self.calls.lock().unwrap().push(Call::Symlink {
            target: target.into(),
            link: link.into(),
        });
        Ok(())
    }

    fn zero(&self, device: &Path, offset: u64, len: usize) -> io::Result<()> {
        self.calls.lock().unwrap().push(Call::Zero {
            device: device.into(),
            offset,
            len,
        });
        Ok(())
    }
}
