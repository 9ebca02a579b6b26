//! The attestation-agent's event log (AAEL), in guest-components' format: one TCG2 entry per
//! runtime measurement, appended to `/run/attestation-agent/eventlog` (`AAEL_PATH` overrides,
//! as it does for the reference's reader).
//!
//! An entry is the TCG crypto-agile `TCG_PCR_EVENT2` of type `EV_EVENT_TAG` (all integers
//! little-endian):
//!
//! ```text
//! u32 CCMR index | u32 6 | u32 1 | u16 0x000c (SHA-384) | 48-byte digest | u32 n | n bytes:
//!     u32 0x4141454c ("AAEL") | u32 m | m bytes "<domain> <operation> <content>"
//! ```
//!
//! The digest is SHA-384 of the n tagged bytes; it is what the register is extended with. The
//! file holds entries only: a TDX quote's `cc_eventlog` puts it after the firmware's CCEL.
//!
//! Before a register is extended, a write-ahead record (`.wal-entry` beside the log: offset,
//! register, expected value, event text) is written, so a crash between extending and logging
//! is finished at the next start instead of leaving the register ahead of its log.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha384};

use super::registers::{self, Registers, REGISTER_LEN};
use super::AaError;

/// Where the log lives unless `AAEL_PATH` says otherwise.
pub use kbs_client::attester::eventlog::DEFAULT_AAEL_PATH;
/// The environment variable that moves the log (the reference's evidence reader honours it).
pub const AAEL_PATH_ENV: &str = "AAEL_PATH";
/// The write-ahead record's name, beside the log.
pub const WAL_NAME: &str = ".wal-entry";

/// TCG event type of a tagged event.
const EV_EVENT_TAG: u32 = 6;
/// The tag of AA events: ASCII "AAEL" read as a big-endian number, stored little-endian.
const AAEL_TAG: u32 = 0x4141_454c;
const TPM_ALG_SHA384: u16 = kbs_client::attester::eventlog::TPM_ALG_SHA384;

/// The event log's path: `AAEL_PATH`, else the default.
pub fn log_path() -> PathBuf {
    std::env::var_os(AAEL_PATH_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_AAEL_PATH))
}

/// One runtime event: `<domain> <operation> <content>` on one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Who defines the event's meaning (e.g. `github.com/confidential-containers`).
    pub domain: String,
    /// What happened (e.g. `PullImage`).
    pub operation: String,
    /// Its details.
    pub content: String,
}

impl Event {
    /// An event, refused when its text would not read back as the same three fields.
    pub fn new(domain: &str, operation: &str, content: &str) -> Result<Self, AaError> {
        for (name, v) in [("domain", domain), ("operation", operation)] {
            if v.is_empty() || v.contains(char::is_whitespace) {
                return Err(AaError::BadEvent(format!("{name} {v:?} must be one word")));
            }
        }
        if content.contains('\n') {
            return Err(AaError::BadEvent("content contains a newline".into()));
        }
        Ok(Self {
            domain: domain.into(),
            operation: operation.into(),
            content: content.into(),
        })
    }

    /// The text the log records.
    pub fn text(&self) -> String {
        format!("{} {} {}", self.domain, self.operation, self.content)
    }

    /// The event back from its text.
    pub fn parse(text: &str) -> Result<Self, AaError> {
        let mut it = text.splitn(3, ' ');
        match (it.next(), it.next(), it.next()) {
            (Some(d), Some(o), Some(c)) => Self::new(d, o, c),
            _ => Err(AaError::BadEvent(format!(
                "{text:?} is not \"<domain> <operation> <content>\""
            ))),
        }
    }

    /// The tagged event data: tag, length, text.
    fn tagged(&self) -> Vec<u8> {
        let text = self.text();
        let mut out = Vec::with_capacity(8 + text.len());
        out.extend_from_slice(&AAEL_TAG.to_le_bytes());
        out.extend_from_slice(&(text.len() as u32).to_le_bytes());
        out.extend_from_slice(text.as_bytes());
        out
    }

    /// The digest the register is extended with.
    pub fn digest(&self) -> Vec<u8> {
        Sha384::digest(self.tagged()).to_vec()
    }

    /// The log entry for this event in CCMR `ccmr`.
    pub fn entry(&self, ccmr: u32) -> Vec<u8> {
        let data = self.tagged();
        let mut out = Vec::with_capacity(18 + REGISTER_LEN + 4 + data.len());
        out.extend_from_slice(&ccmr.to_le_bytes());
        out.extend_from_slice(&EV_EVENT_TAG.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&TPM_ALG_SHA384.to_le_bytes());
        out.extend_from_slice(&Sha384::digest(&data));
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&data);
        out
    }
}

/// One entry read back from a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The CCMR it extended.
    pub ccmr: u32,
    /// The digest it extended it with.
    pub digest: Vec<u8>,
    /// The event.
    pub event: Event,
}

/// Reads every entry of an event log file's bytes; refuses anything that is not an AA entry
/// whose digest matches its event.
pub fn parse(log: &[u8]) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let take = |pos: &mut usize, n: usize| -> Result<&[u8], String> {
        let end = pos
            .checked_add(n)
            .filter(|&e| e <= log.len())
            .ok_or_else(|| format!("entry truncated at byte {pos}"))?;
        let s = &log[*pos..end];
        *pos = end;
        Ok(s)
    };
    let u32_at = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    while pos < log.len() {
        let start = pos;
        let ccmr = u32_at(take(&mut pos, 4)?);
        let kind = u32_at(take(&mut pos, 4)?);
        let count = u32_at(take(&mut pos, 4)?);
        let alg = take(&mut pos, 2)?;
        if kind != EV_EVENT_TAG || count != 1 || alg != TPM_ALG_SHA384.to_le_bytes() {
            return Err(format!(
                "byte {start}: not an AA entry (type {kind}, {count} digests)"
            ));
        }
        let digest = take(&mut pos, REGISTER_LEN)?.to_vec();
        let size = u32_at(take(&mut pos, 4)?) as usize;
        let data = take(&mut pos, size)?;
        if data.len() < 8
            || u32_at(&data[..4]) != AAEL_TAG
            || u32_at(&data[4..8]) as usize != size - 8
        {
            return Err(format!("byte {start}: the event data is not an AAEL tag"));
        }
        if Sha384::digest(data).as_slice() != digest {
            return Err(format!("byte {start}: the digest does not match the event"));
        }
        let text = std::str::from_utf8(&data[8..])
            .map_err(|_| format!("byte {start}: the event text is not UTF-8"))?;
        let event = Event::parse(text).map_err(|e| format!("byte {start}: {e}"))?;
        out.push(Entry {
            ccmr,
            digest,
            event,
        });
    }
    Ok(out)
}

/// The write-ahead record of one extension.
#[derive(Debug, PartialEq, Eq)]
struct Wal {
    /// Where the entry goes in the log.
    offset: u64,
    /// The register extended.
    ccmr: u32,
    /// Its value once extended.
    expected: Vec<u8>,
    /// The event.
    text: String,
}

impl Wal {
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.ccmr.to_be_bytes());
        out.extend_from_slice(&self.expected);
        out.extend_from_slice(self.text.as_bytes());
        out
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < 12 + REGISTER_LEN {
            return None;
        }
        Some(Self {
            offset: u64::from_be_bytes(b[..8].try_into().ok()?),
            ccmr: u32::from_be_bytes(b[8..12].try_into().ok()?),
            expected: b[12..12 + REGISTER_LEN].to_vec(),
            text: String::from_utf8(b[12 + REGISTER_LEN..].to_vec()).ok()?,
        })
    }
}

/// The open event log.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    wal: PathBuf,
    file: File,
    len: u64,
}

fn log_err(path: &Path, reason: impl std::fmt::Display) -> AaError {
    AaError::EventLog {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

impl EventLog {
    /// Opens (or creates) the log at `path` for `regs`, finishing an extension a crash
    /// interrupted. In-process registers are first brought back to what the log says.
    pub async fn open(path: &Path, regs: &Registers) -> Result<Self, AaError> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir).map_err(|e| log_err(dir, e))?;
        let wal_path = dir.join(WAL_NAME);
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| log_err(path, e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| log_err(path, e))?;
        let wal = match std::fs::read(&wal_path) {
            Ok(b) => Some(Wal::from_bytes(&b).ok_or_else(|| {
                log_err(
                    &wal_path,
                    "unreadable write-ahead record; the log cannot be trusted",
                )
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(log_err(&wal_path, e)),
        };
        let committed = match &wal {
            Some(w) if w.offset <= bytes.len() as u64 => w.offset as usize,
            Some(w) => {
                return Err(log_err(
                    &wal_path,
                    format!("records offset {} past the log's end", w.offset),
                ))
            }
            None => bytes.len(),
        };
        if let Registers::InProcess(_) = regs {
            for e in parse(&bytes[..committed]).map_err(|e| log_err(path, e))? {
                regs.extend(e.ccmr, &e.digest).await?;
            }
        }
        let mut log = Self {
            path: path.to_owned(),
            wal: wal_path,
            file,
            len: committed as u64,
        };
        if let Some(w) = wal {
            log.recover(w, regs).await?;
        }
        tracing::info!(path = %log.path.display(), bytes = log.len, "event log open");
        Ok(log)
    }

    /// Finishes the extension `w` recorded: extends the register unless that already happened,
    /// then writes the entry.
    async fn recover(&mut self, w: Wal, regs: &Registers) -> Result<(), AaError> {
        let event = Event::parse(&w.text).map_err(|e| log_err(&self.wal, e))?;
        let digest = event.digest();
        let now = regs.read(w.ccmr).await?;
        if now != w.expected {
            if registers::extended(&now, &digest) != w.expected {
                return Err(log_err(
                    &self.path,
                    format!(
                        "CCMR {} is neither before nor after the interrupted event: the log or the register was changed by someone else",
                        w.ccmr
                    ),
                ));
            }
            regs.extend(w.ccmr, &digest).await?;
        }
        tracing::warn!(path = %self.path.display(), "finishing an event interrupted by a crash");
        self.write_entry(&event.entry(w.ccmr))?;
        std::fs::remove_file(&self.wal).map_err(|e| log_err(&self.wal, e))
    }

    /// Writes `entry` at the end of the committed log, dropping whatever a crash left after it.
    fn write_entry(&mut self, entry: &[u8]) -> Result<(), AaError> {
        let path = self.path.clone();
        let err = |e: std::io::Error| log_err(&path, e);
        self.file.set_len(self.len).map_err(err)?;
        self.file.seek(SeekFrom::Start(self.len)).map_err(err)?;
        self.file.write_all(entry).map_err(err)?;
        self.file.sync_data().map_err(err)?;
        self.len += entry.len() as u64;
        Ok(())
    }

    /// Records `event` in CCMR `ccmr`: write-ahead record, register, entry, in that order.
    pub async fn record(
        &mut self,
        event: &Event,
        ccmr: u32,
        regs: &Registers,
    ) -> Result<(), AaError> {
        let digest = event.digest();
        let expected = registers::extended(&regs.read(ccmr).await?, &digest);
        let w = Wal {
            offset: self.len,
            ccmr,
            expected,
            text: event.text(),
        };
        let wal = self.wal.clone();
        File::create(&wal)
            .and_then(|mut f| {
                f.write_all(&w.to_bytes())?;
                f.sync_data()
            })
            .map_err(|e| log_err(&wal, e))?;
        regs.extend(ccmr, &digest).await?;
        self.write_entry(&event.entry(ccmr))?;
        std::fs::remove_file(&wal).map_err(|e| log_err(&wal, e))
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::Mutex;

    fn sample() -> Registers {
        Registers::InProcess(Mutex::new([[0u8; REGISTER_LEN]; 5]))
    }

    #[test]
    fn entries_are_tcg2_tagged_events() {
        let e = Event::new("domain", "operation", "content").unwrap();
        // The reference's own vector for SHA-384 of this event.
        assert_eq!(
            hex::encode(e.digest()),
            "dad5f0e226318ffa9839b75a472c6aa7fdb5834949d0a0a22990cf04d5692440fb00f3aa0609db7e49cd8d793f670d02"
        );
        let b = e.entry(4);
        assert_eq!(&b[..4], &4u32.to_le_bytes());
        assert_eq!(&b[4..8], &6u32.to_le_bytes());
        assert_eq!(&b[8..12], &1u32.to_le_bytes());
        assert_eq!(&b[12..14], &[0x0c, 0x00]);
        assert_eq!(&b[14..62], e.digest().as_slice());
        assert_eq!(&b[62..66], &(8 + 24u32).to_le_bytes());
        assert_eq!(&b[66..70], b"LEAA");
        assert_eq!(&b[70..74], &24u32.to_le_bytes());
        assert_eq!(&b[74..], b"domain operation content");
        let back = parse(&[b.clone(), e.entry(1)].concat()).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!((back[0].ccmr, &back[0].event), (4, &e));
        assert_eq!(back[1].ccmr, 1);
        // A flipped byte in the text no longer matches the digest.
        let mut bad = b;
        *bad.last_mut().unwrap() ^= 1;
        assert!(parse(&bad).unwrap_err().contains("digest"));
    }

    #[test]
    fn events_must_read_back_as_three_fields() {
        let e = Event::new(
            "github.com/confidential-containers",
            "PullImage",
            r#"{"image":"a b", "digest":"sha256:x"}"#,
        )
        .unwrap();
        assert_eq!(Event::parse(&e.text()).unwrap(), e);
        for (d, o, c) in [
            ("", "op", "c"),
            ("a b", "op", "c"),
            ("d", "o p", "c"),
            ("d", "op", "c\nd"),
        ] {
            assert!(
                matches!(Event::new(d, o, c), Err(AaError::BadEvent(_))),
                "{d:?} {o:?} {c:?}"
            );
        }
        assert!(Event::parse("only two").is_err());
    }

    #[tokio::test]
    async fn records_append_and_extend_and_survive_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("aa/eventlog");
        let regs = sample();
        let mut log = EventLog::open(&path, &regs).await.unwrap();
        let a = Event::new("d", "one", "x").unwrap();
        let b = Event::new("d", "two", "y").unwrap();
        log.record(&a, 4, &regs).await.unwrap();
        log.record(&b, 4, &regs).await.unwrap();
        let want = registers::extended(&registers::extended(&[0u8; 48], &a.digest()), &b.digest());
        assert_eq!(regs.read(4).await.unwrap(), want);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes, [a.entry(4), b.entry(4)].concat());
        assert!(!d.path().join("aa").join(WAL_NAME).exists());
        drop(log);
        // A new process: the in-process registers come back from the log.
        let fresh = sample();
        let mut log = EventLog::open(&path, &fresh).await.unwrap();
        assert_eq!(fresh.read(4).await.unwrap(), want);
        log.record(&a, 1, &fresh).await.unwrap();
        assert_eq!(parse(&std::fs::read(&path).unwrap()).unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_crash_between_register_and_log_is_finished_at_open() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("eventlog");
        let a = Event::new("d", "one", "x").unwrap();
        let regs = sample();
        EventLog::open(&path, &regs)
            .await
            .unwrap()
            .record(&a, 4, &regs)
            .await
            .unwrap();
        let b = Event::new("d", "two", "y").unwrap();
        let offset = std::fs::metadata(&path).unwrap().len();
        let after_a = regs.read(4).await.unwrap();
        let wal = Wal {
            offset,
            ccmr: 4,
            expected: registers::extended(&after_a, &b.digest()),
            text: b.text(),
        };
        // Crash before the register moved, with half an entry written.
        std::fs::write(d.path().join(WAL_NAME), wal.to_bytes()).unwrap();
        let mut partial = std::fs::read(&path).unwrap();
        partial.extend_from_slice(&b.entry(4)[..10]);
        std::fs::write(&path, &partial).unwrap();
        let fresh = sample();
        EventLog::open(&path, &fresh).await.unwrap();
        assert_eq!(fresh.read(4).await.unwrap(), wal.expected);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            [a.entry(4), b.entry(4)].concat()
        );
        assert!(!d.path().join(WAL_NAME).exists());

        // A record whose register state fits neither side refuses to open.
        let c = Event::new("d", "three", "z").unwrap();
        let wal = Wal {
            offset: std::fs::metadata(&path).unwrap().len(),
            ccmr: 4,
            expected: vec![9u8; 48],
            text: c.text(),
        };
        std::fs::write(d.path().join(WAL_NAME), wal.to_bytes()).unwrap();
        let e = EventLog::open(&path, &sample())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("neither before nor after"), "{e}");
        std::fs::write(d.path().join(WAL_NAME), b"short").unwrap();
        let e = EventLog::open(&path, &sample())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("write-ahead"), "{e}");
    }

    #[tokio::test]
    async fn a_hardware_register_already_extended_is_not_extended_again() {
        let d = tempfile::tempdir().unwrap();
        let paths = kbs_client::HardwarePaths {
            tdx_measurements_dir: d.path().join("measurements"),
            ..kbs_client::HardwarePaths::default()
        };
        std::fs::create_dir(&paths.tdx_measurements_dir).unwrap();
        let rtmr3 = paths.tdx_measurements_dir.join("rtmr3:sha384");
        let e = Event::new("d", "op", "c").unwrap();
        let expected = registers::extended(&[0u8; 48], &e.digest());
        // The crash came after the extension: the register already holds the expected value.
        std::fs::write(&rtmr3, &expected).unwrap();
        let wal = Wal {
            offset: 0,
            ccmr: 4,
            expected: expected.clone(),
            text: e.text(),
        };
        std::fs::write(d.path().join(WAL_NAME), wal.to_bytes()).unwrap();
        let regs = Registers::for_tee(kbs_client::Tee::Tdx, &paths).unwrap();
        EventLog::open(&d.path().join("eventlog"), &regs)
            .await
            .unwrap();
        // A second extension would have overwritten the (plain) file with the digest.
        assert_eq!(std::fs::read(&rtmr3).unwrap(), expected);
        assert_eq!(
            std::fs::read(d.path().join("eventlog")).unwrap(),
            e.entry(4)
        );
    }

    #[test]
    fn the_log_path_defaults_to_the_references() {
        // The test environment does not set it.
        assert!(std::env::var_os(AAEL_PATH_ENV).is_none());
        assert_eq!(log_path(), Path::new("/run/attestation-agent/eventlog"));
    }
}
