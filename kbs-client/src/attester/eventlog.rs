//! The CC event log a TDX quote travels with: the firmware's CCEL cut to its events, then the
//! attestation-agent's event log (AAEL) and an end marker, so that a verifier can replay every
//! RTMR, the runtime ones the AA extended included.
//!
//! Both logs use the TCG crypto-agile layout: one legacy (SHA-1 sized) `EV_NO_ACTION` event that
//! announces the digest sizes, then `TCG_PCR_EVENT2` entries.

/// Where the attestation-agent keeps its event log (and where its reader looks for it).
pub const DEFAULT_AAEL_PATH: &str = "/run/attestation-agent/eventlog";

/// TCG event type of the first, size-announcing entry.
const EV_NO_ACTION: u32 = 3;
/// Length of the digest field in the legacy first entry.
const LEGACY_DIGEST_LEN: usize = 20;
/// The signature that starts a crypto-agile log's first event data.
const SPEC_ID_SIGNATURE: &[u8; 16] = b"Spec ID Event03\0";
/// What follows the last event: readers stop at it (an all-zero header ends a log too).
pub const END_MARKER: [u8; 8] = [0xff; 8];

/// TCG algorithm id of SHA-256.
pub const TPM_ALG_SHA256: u16 = 0x000b;
/// TCG algorithm id of SHA-384 (TDX's RTMRs).
pub const TPM_ALG_SHA384: u16 = 0x000c;
/// TCG algorithm id of SHA-512.
pub const TPM_ALG_SHA512: u16 = 0x000d;
/// TCG algorithm id of SM3-256.
pub const TPM_ALG_SM3_256: u16 = 0x0012;
/// TCG algorithm id of SHA-1.
const TPM_ALG_SHA1: u16 = 0x0004;

/// Digest sizes of the algorithms a CC event log may carry, for logs that do not announce them.
fn known_digest_len(alg: u16) -> Option<usize> {
    match alg {
        TPM_ALG_SHA1 => Some(20),
        TPM_ALG_SHA256 | TPM_ALG_SM3_256 => Some(32),
        TPM_ALG_SHA384 => Some(48),
        TPM_ALG_SHA512 => Some(64),
        _ => None,
    }
}

/// A little-endian cursor that names what it was reading when the bytes run out.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| format!("event log truncated at byte {} ({what})", self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u16(&mut self, what: &str) -> Result<u16, String> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// The (algorithm, digest size) pairs a Spec ID event announces.
fn spec_id_sizes(data: &[u8]) -> Option<Vec<(u16, usize)>> {
    if !data.starts_with(SPEC_ID_SIGNATURE) {
        return None;
    }
    let mut c = Cursor {
        buf: data,
        // signature(16) platformClass(4) versions, errata, uintnSize (4 bytes)
        pos: 24,
    };
    let n = c.u32("algorithm count").ok()?;
    (0..n)
        .map(|_| Some((c.u16("alg").ok()?, usize::from(c.u16("size").ok()?))))
        .collect()
}

/// The length of the events in `log`: up to the first end marker (all-0xFF or all-zero where an
/// entry would start), or the whole buffer. The firmware's CCEL area is larger than its events.
pub fn events_len(log: &[u8]) -> Result<usize, String> {
    let mut c = Cursor { buf: log, pos: 0 };
    c.u32("first PCR index")?;
    let first_type = c.u32("first event type")?;
    c.take(LEGACY_DIGEST_LEN, "first digest")?;
    let size = c.u32("first event size")? as usize;
    let data = c.take(size, "first event data")?;
    let announced = if first_type == EV_NO_ACTION {
        spec_id_sizes(data)
    } else {
        None
    };
    let digest_len = |alg: u16| -> Result<usize, String> {
        announced
            .as_ref()
            .and_then(|a| a.iter().find(|(id, _)| *id == alg).map(|&(_, n)| n))
            .or_else(|| known_digest_len(alg))
            .ok_or_else(|| format!("event log uses digest algorithm {alg:#06x} of unknown size"))
    };
    loop {
        let rest = &log[c.pos..];
        if rest.len() < 8 || rest[..8] == END_MARKER || rest[..8] == [0u8; 8] {
            return Ok(c.pos);
        }
        c.u32("PCR index")?;
        c.u32("event type")?;
        let count = c.u32("digest count")?;
        for _ in 0..count {
            let alg = c.u16("digest algorithm")?;
            c.take(digest_len(alg)?, "digest")?;
        }
        let size = c.u32("event size")? as usize;
        c.take(size, "event data")?;
    }
}

/// The first entry that stands in for a CCEL when the firmware published none: a legacy
/// `EV_NO_ACTION` event announcing SHA-384 and SM3 digests, byte for byte what the reference
/// attester sends, so verifiers that accept its logs accept ours.
pub fn standalone_header() -> Vec<u8> {
    let mut data = Vec::with_capacity(37);
    // An all-zero signature, platform class and versions, as the reference's header has.
    data.extend_from_slice(&[0u8; 16 + 4 + 4]);
    data.extend_from_slice(&2u32.to_le_bytes());
    for (alg, size) in [(TPM_ALG_SHA384, 48u16), (TPM_ALG_SM3_256, 32u16)] {
        data.extend_from_slice(&alg.to_le_bytes());
        data.extend_from_slice(&size.to_le_bytes());
    }
    data.push(0); // vendor info size
    let mut out = Vec::with_capacity(32 + data.len());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&EV_NO_ACTION.to_le_bytes());
    out.extend_from_slice(&[0u8; LEGACY_DIGEST_LEN]);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&data);
    out
}

/// The `cc_eventlog` bytes of TDX evidence: `None` without a CCEL and without an AAEL.
///
/// A CCEL that cannot be walked is sent whole (as before there was an AAEL to append) when there
/// is nothing to append; with an AAEL it is an error, since the result would not parse.
pub fn cc_eventlog(ccel: Option<&[u8]>, aael: Option<&[u8]>) -> Result<Option<Vec<u8>>, String> {
    let mut out = match (ccel, aael) {
        (None, None) => return Ok(None),
        (Some(c), None) => match events_len(c) {
            Ok(n) => c[..n].to_vec(),
            Err(e) => {
                tracing::warn!("CCEL: {e}; sending it whole");
                return Ok(Some(c.to_vec()));
            }
        },
        (Some(c), Some(_)) => {
            let n = events_len(c).map_err(|e| format!("CCEL: {e}"))?;
            c[..n].to_vec()
        }
        (None, Some(_)) => standalone_header(),
    };
    if let Some(a) = aael {
        out.extend_from_slice(a);
    }
    out.extend_from_slice(&END_MARKER);
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A crypto-agile log: Spec ID announcing SHA-384, then one SHA-384 event, then 0xFF fill.
    fn ccel(fill: u8) -> (Vec<u8>, usize) {
        let mut spec = SPEC_ID_SIGNATURE.to_vec();
        spec.extend_from_slice(&[0u8; 8]);
        spec.extend_from_slice(&1u32.to_le_bytes());
        spec.extend_from_slice(&TPM_ALG_SHA384.to_le_bytes());
        spec.extend_from_slice(&48u16.to_le_bytes());
        spec.push(0);
        let mut log = Vec::new();
        log.extend_from_slice(&0u32.to_le_bytes());
        log.extend_from_slice(&EV_NO_ACTION.to_le_bytes());
        log.extend_from_slice(&[0u8; 20]);
        log.extend_from_slice(&(spec.len() as u32).to_le_bytes());
        log.extend_from_slice(&spec);
        log.extend_from_slice(&2u32.to_le_bytes()); // RTMR index 2 (CCMR 3)
        log.extend_from_slice(&0x8000_0001u32.to_le_bytes());
        log.extend_from_slice(&1u32.to_le_bytes());
        log.extend_from_slice(&TPM_ALG_SHA384.to_le_bytes());
        log.extend_from_slice(&[0xabu8; 48]);
        log.extend_from_slice(&3u32.to_le_bytes());
        log.extend_from_slice(b"abc");
        let events = log.len();
        log.resize(events + 64, fill);
        (log, events)
    }

    #[test]
    fn the_ccel_is_cut_at_its_end_marker() {
        for fill in [0xff, 0x00] {
            let (log, events) = ccel(fill);
            assert_eq!(events_len(&log).unwrap(), events);
            assert_eq!(events_len(&log[..events]).unwrap(), events);
        }
        let (log, events) = ccel(0xff);
        assert!(events_len(&log[..events - 1])
            .unwrap_err()
            .contains("truncated"));
    }

    #[test]
    fn the_standalone_header_is_the_references() {
        let h = standalone_header();
        assert_eq!(h.len(), 69);
        // type EV_NO_ACTION, event size 37, two algorithms: SHA-384/48 and SM3/32
        assert_eq!(&h[4..8], &[3, 0, 0, 0]);
        assert_eq!(&h[28..32], &[0x25, 0, 0, 0]);
        assert_eq!(
            &h[56..68],
            &[2, 0, 0, 0, 0x0c, 0, 0x30, 0, 0x12, 0, 0x20, 0]
        );
        assert_eq!(h[68], 0);
        assert_eq!(events_len(&h).unwrap(), 69);
    }

    #[test]
    fn the_aael_follows_the_ccel_or_the_header() {
        assert_eq!(cc_eventlog(None, None).unwrap(), None);
        let (log, events) = ccel(0xff);
        let only = cc_eventlog(Some(&log), None).unwrap().unwrap();
        assert_eq!(&only[..events], &log[..events]);
        assert_eq!(&only[events..], &END_MARKER);
        let with = cc_eventlog(Some(&log), Some(b"AAEL")).unwrap().unwrap();
        assert_eq!(&with[events..], b"AAEL\xff\xff\xff\xff\xff\xff\xff\xff");
        let alone = cc_eventlog(None, Some(b"AAEL")).unwrap().unwrap();
        assert_eq!(&alone[..69], &standalone_header()[..]);
        assert_eq!(&alone[69..73], b"AAEL");
        // A CCEL that cannot be walked goes out whole, unless something must follow it.
        let junk = [1u8; 10];
        assert_eq!(cc_eventlog(Some(&junk), None).unwrap().unwrap(), junk);
        assert!(cc_eventlog(Some(&junk), Some(b"AAEL")).is_err());
    }
}
