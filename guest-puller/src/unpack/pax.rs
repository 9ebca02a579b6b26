//! PAX extended-header records and GNU sparse files (PAX formats 0.0, 0.1 and 1.0).
//!
//! Records are parsed here rather than with `tar::Entry::pax_extensions`: tar 0.4.46 (the
//! newest release) splits the header on `\n` before reading each record's length prefix, so
//! any value containing a newline (file names, link targets, binary xattrs — GNU tar and Go's
//! archive/tar write them) makes the whole layer "malformed". POSIX defines a record as
//! `"%d %s=%s\n"` where the decimal length counts the whole record, which is what we follow.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

use super::{copy_large, UnpackError, MAX_METADATA_ENTRY};

/// Parses the records of a PAX extended header, keeping their order (GNU sparse 0.0 repeats
/// `GNU.sparse.offset`/`GNU.sparse.numbytes` pairs).
pub(super) fn parse_records(
    data: &[u8],
    shown: &str,
) -> Result<Vec<(String, Vec<u8>)>, UnpackError> {
    let bad = |reason: String| UnpackError::Bad {
        path: shown.into(),
        reason,
    };
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest
            .iter()
            .take(20)
            .position(|b| *b == b' ')
            .ok_or_else(|| bad("PAX record without a length".into()))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("PAX record length is not a number".into()))?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad(format!(
                "PAX record length {len} does not match the header"
            )));
        }
        let kv = &rest[sp + 1..len - 1];
        let eq = kv
            .iter()
            .position(|b| *b == b'=')
            .ok_or_else(|| bad("PAX record without '='".into()))?;
        let key = std::str::from_utf8(&kv[..eq])
            .map_err(|_| bad("PAX record key is not UTF-8".into()))?;
        out.push((key.to_string(), kv[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(out)
}

/// Layout of a GNU sparse file as announced by its PAX records.
#[derive(Debug, Default)]
pub(super) struct Sparse {
    /// Size of the reconstructed file.
    pub real_size: u64,
    /// `(offset, length)` data segments; `None` for 1.0, whose map precedes the data.
    pub map: Option<Vec<(u64, u64)>>,
    /// `GNU.sparse.name`: the real path (the header holds `GNUSparseFile.<pid>/…`).
    pub name: Option<Vec<u8>>,
}

fn num(v: &[u8], key: &str, shown: &str) -> Result<u64, UnpackError> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| UnpackError::Bad {
            path: shown.into(),
            reason: format!("PAX {key} is not a number"),
        })
}

/// Extracts the GNU sparse description from `records` (removing its keys), or `None` when the
/// entry is not sparse. Unknown sparse versions are refused rather than unpacked wrongly.
pub(super) fn take_sparse(
    records: &mut Vec<(String, Vec<u8>)>,
    shown: &str,
) -> Result<Option<Sparse>, UnpackError> {
    if !records.iter().any(|(k, _)| k.starts_with("GNU.sparse.")) {
        return Ok(None);
    }
    let bad = |reason: &str| UnpackError::Bad {
        path: shown.into(),
        reason: format!("GNU sparse file: {reason}"),
    };
    let mut s = Sparse::default();
    let (mut major, mut minor) = (None, None);
    let (mut size, mut realsize) = (None, None);
    let mut map01: Option<Vec<u64>> = None;
    let mut pairs00: Vec<u64> = Vec::new();
    for (k, v) in records.iter().filter(|(k, _)| k.starts_with("GNU.sparse.")) {
        match k.as_str() {
            "GNU.sparse.major" => major = Some(num(v, k, shown)?),
            "GNU.sparse.minor" => minor = Some(num(v, k, shown)?),
            "GNU.sparse.size" => size = Some(num(v, k, shown)?),
            "GNU.sparse.realsize" => realsize = Some(num(v, k, shown)?),
            "GNU.sparse.name" => s.name = Some(v.clone()),
            "GNU.sparse.numblocks" => {}
            "GNU.sparse.map" => {
                let text = std::str::from_utf8(v).map_err(|_| bad("map is not text"))?;
                let nums = text
                    .split(',')
                    .map(|n| n.trim().parse::<u64>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| bad("map is not a list of numbers"))?;
                map01 = Some(nums);
            }
            "GNU.sparse.offset" | "GNU.sparse.numbytes" => {
                // 0.0: pairs in order, offset first.
                let want_offset = pairs00.len() % 2 == 0;
                if want_offset != (k == "GNU.sparse.offset") {
                    return Err(bad("offset/numbytes records out of order"));
                }
                pairs00.push(num(v, k, shown)?);
            }
            other => return Err(bad(&format!("unknown record {other}"))),
        }
    }
    records.retain(|(k, _)| !k.starts_with("GNU.sparse."));
    let pairs = |nums: Vec<u64>| -> Result<Vec<(u64, u64)>, UnpackError> {
        if nums.len() % 2 != 0 {
            return Err(bad("map has an odd number of values"));
        }
        Ok(nums.chunks(2).map(|c| (c[0], c[1])).collect())
    };
    match (major, minor) {
        (Some(1), Some(0)) => {
            s.real_size = realsize.ok_or_else(|| bad("1.0 without GNU.sparse.realsize"))?;
        }
        (None, None) | (Some(0), Some(0 | 1)) => {
            s.real_size = size.ok_or_else(|| bad("0.x without GNU.sparse.size"))?;
            s.map = Some(match map01 {
                Some(m) => pairs(m)?,
                None => pairs(pairs00)?,
            });
        }
        _ => return Err(bad("unsupported sparse format version")),
    }
    Ok(Some(s))
}

/// Writes a sparse file's data segments at their offsets, leaving the gaps as holes, and sets
/// the real size. `data` is the entry's stored data of `stored` bytes. Returns bytes written.
pub(super) fn write_sparse<R: Read>(
    file: &mut File,
    data: &mut R,
    stored: u64,
    sparse: Sparse,
    shown: &str,
) -> Result<u64, UnpackError> {
    let bad = |reason: String| UnpackError::Bad {
        path: shown.into(),
        reason: format!("GNU sparse file: {reason}"),
    };
    let io = |e: io::Error| UnpackError::Io {
        path: shown.into(),
        source: e,
    };
    let (map, mut remaining) = match sparse.map {
        Some(m) => (m, stored),
        None => {
            let (m, used) = read_map_1_0(data, stored, shown)?;
            (m, stored - used)
        }
    };
    let mut end = 0u64;
    let mut total = 0u64;
    let mut buf = vec![0u8; super::COPY_BUF];
    for &(off, len) in &map {
        let seg_end = off
            .checked_add(len)
            .filter(|e| *e <= sparse.real_size && off >= end)
            .ok_or_else(|| bad("segments overlap, are unordered or exceed the file size".into()))?;
        end = seg_end;
        if len == 0 {
            continue;
        }
        if len > remaining {
            return Err(bad("map describes more data than the entry holds".into()));
        }
        file.seek(SeekFrom::Start(off)).map_err(io)?;
        let n = copy_large(&mut data.take(len), file, &mut buf).map_err(io)?;
        if n != len {
            return Err(bad(format!(
                "archive ended inside the entry ({n} of {len} bytes)"
            )));
        }
        remaining -= len;
        total += len;
    }
    if remaining != 0 {
        return Err(bad(format!(
            "{remaining} stored bytes not covered by the map"
        )));
    }
    file.set_len(sparse.real_size).map_err(io)?;
    Ok(total)
}

/// Reads the 1.0 map that precedes the data: decimal lines (count, then offset/length pairs),
/// padded to a 512-byte block. Returns the map and the bytes it used.
fn read_map_1_0<R: Read>(
    data: &mut R,
    stored: u64,
    shown: &str,
) -> Result<(Vec<(u64, u64)>, u64), UnpackError> {
    let bad = |reason: &str| UnpackError::Bad {
        path: shown.into(),
        reason: format!("GNU sparse 1.0 map: {reason}"),
    };
    let mut buf: Vec<u8> = Vec::new();
    let mut nums: Vec<u64> = Vec::new();
    let mut pos = 0;
    loop {
        while let Some(nl) = buf[pos..].iter().position(|b| *b == b'\n') {
            let n = std::str::from_utf8(&buf[pos..pos + nl])
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| bad("not a number"))?;
            pos += nl + 1;
            nums.push(n);
            if nums.len() as u64 == 1 + 2 * nums[0] {
                let map = nums[1..].chunks(2).map(|c| (c[0], c[1])).collect();
                return Ok((map, buf.len() as u64));
            }
        }
        if buf.len() as u64 + 512 > stored.min(MAX_METADATA_ENTRY) {
            return Err(bad("map is truncated or too large"));
        }
        let start = buf.len();
        buf.resize(start + 512, 0);
        data.read_exact(&mut buf[start..])
            .map_err(|e| UnpackError::Io {
                path: shown.into(),
                source: e,
            })?;
    }
}
