//! configfs-tsm (`/sys/kernel/config/tsm/report`): the kernel's vendor-neutral quote interface.
//!
//! Used directly through the filesystem (mkdir entry, write `inblob`, read `outblob`/`auxblob`/
//! `provider`, check `generation`), which needs no ioctl bindings.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A report produced through configfs-tsm.
pub(crate) struct TsmReport {
    /// The provider name (`tdx_guest`, `sev_guest`).
    pub provider: String,
    /// The quote / attestation report.
    pub outblob: Vec<u8>,
    /// Auxiliary data (SNP certificate table), if the provider offers it.
    pub auxblob: Option<Vec<u8>>,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A configfs entry removed on drop (rmdir is how configfs frees it).
struct Entry(PathBuf);

impl Drop for Entry {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

fn new_entry(dir: &Path) -> std::io::Result<Entry> {
    let name = format!(
        "guestpull-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let path = dir.join(name);
    fs::create_dir(&path)?;
    Ok(Entry(path))
}

fn read_trim(p: &Path) -> std::io::Result<String> {
    Ok(fs::read_to_string(p)?.trim().to_string())
}

/// The provider behind the configfs-tsm directory, if it exists and works.
pub(crate) fn probe_provider(dir: &Path) -> Option<String> {
    if !dir.is_dir() {
        return None;
    }
    let e = new_entry(dir).ok()?;
    read_trim(&e.0.join("provider"))
        .ok()
        .filter(|p| !p.is_empty())
}

/// Requests a report for exactly 64 bytes of report data.
///
/// `generation` is read before writing and checked after reading, so a concurrent writer to the
/// same entry (which would mix inputs and outputs) is detected instead of silently accepted.
pub(crate) fn report(dir: &Path, inblob: &[u8; 64], want_aux: bool) -> Result<TsmReport, String> {
    if !dir.is_dir() {
        return Err(format!("configfs-tsm directory {} does not exist (is configfs mounted and the TEE guest driver loaded?)", dir.display()));
    }
    let e = new_entry(dir)
        .map_err(|err| format!("cannot create a report entry in {}: {err}", dir.display()))?;
    let p = &e.0;
    let rd = |name: &str| p.join(name);
    let gen_before: u64 = read_trim(&rd("generation"))
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            format!(
                "{} is not a configfs-tsm entry (no generation)",
                p.display()
            )
        })?;
    fs::write(rd("inblob"), inblob).map_err(|err| format!("writing inblob: {err}"))?;
    let outblob = fs::read(rd("outblob")).map_err(|err| format!("reading outblob: {err}"))?;
    if outblob.is_empty() {
        return Err("configfs-tsm returned an empty outblob".into());
    }
    let provider = read_trim(&rd("provider")).map_err(|err| format!("reading provider: {err}"))?;
    let auxblob = if want_aux {
        fs::read(rd("auxblob")).ok().filter(|b| !b.is_empty())
    } else {
        None
    };
    let gen_after: u64 = read_trim(&rd("generation"))
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("cannot re-read generation")?;
    if gen_after != gen_before + 1 {
        return Err(format!(
            "configfs-tsm entry was written concurrently (generation {gen_before} -> {gen_after}); retry"
        ));
    }
    Ok(TsmReport {
        provider,
        outblob,
        auxblob,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_directory_is_not_configfs() {
        let d = tempfile::tempdir().unwrap();
        let err = report(d.path(), &[0u8; 64], false).err().unwrap();
        assert!(err.contains("not a configfs-tsm entry"), "{err}");
        assert!(report(&d.path().join("missing"), &[0u8; 64], false).is_err());
        // the entry directory was cleaned up
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
