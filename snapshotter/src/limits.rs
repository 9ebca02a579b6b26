//! Size limits on snapshot keys and labels, taken from containerd's own.
//!
//! containerd never sends more than these through its metadata layer, so a request beyond
//! them comes from a buggy or hostile client talking to our socket directly. Refusing it
//! with InvalidArgument (containerd's code for the same violation) keeps every record small
//! enough that List, which streams 100 snapshots per message, stays below the 16 MiB
//! containerd accepts per message (`defaults.DefaultMaxRecvMsgSize`).

use crate::error::{Error, Result};

/// Largest label key + value, in bytes (containerd `pkg/labels` `Validate`: 4096).
pub const MAX_LABEL_PAIR: usize = 4096;

/// Largest key a containerd client may use: containerd stores it as a bbolt bucket name,
/// and bbolt refuses keys above `MaxKeySize` (32768 bytes).
pub const MAX_CLIENT_KEY: usize = 32768;

/// Largest namespace name (containerd `pkg/identifiers`: 76 characters).
const MAX_NAMESPACE: usize = 76;

/// Largest key or name we accept: containerd forwards `<namespace>/<seq>/<client key>`
/// (its `createKey`), with `seq` a u64 (at most 20 digits).
pub const MAX_KEY: usize = MAX_NAMESPACE + 1 + 20 + 1 + MAX_CLIENT_KEY;

/// Largest sum of label key and value bytes on one snapshot. containerd has no per-snapshot
/// total, but 100 records of two maximal keys (name, parent) and this much label data stay
/// under 13 MiB, so a List batch always fits containerd's 16 MiB message limit. Real
/// snapshots carry a few hundred bytes (the CRI labels, `cri.image-layers` itself capped
/// at 4096 by containerd).
pub const MAX_LABELS_TOTAL: usize = 64 * 1024;

/// At most `n` bytes of `s`, cut on a character boundary (error messages never echo a
/// 3 MiB key back, just as containerd cuts label keys to 64 bytes in its message).
fn head(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Checks one key or name (`what` names it in the error: "key", "parent", "name").
pub fn check_key(what: &str, key: &str) -> Result<()> {
    if key.len() > MAX_KEY {
        return Err(Error::InvalidArgument(format!(
            "snapshot {what} of {} bytes is longer than the maximum of {MAX_KEY} bytes \
             (starts with {:?})",
            key.len(),
            head(key, 64)
        )));
    }
    Ok(())
}

/// Checks every label pair and the total label size of one snapshot.
pub fn check_labels<'a>(labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<()> {
    let mut total = 0usize;
    for (k, v) in labels {
        let pair = k.len() + v.len();
        if pair > MAX_LABEL_PAIR {
            return Err(Error::InvalidArgument(format!(
                "label key and value length ({pair} bytes) greater than maximum size \
                 ({MAX_LABEL_PAIR} bytes), key: {}",
                head(k, 64)
            )));
        }
        total += pair;
    }
    if total > MAX_LABELS_TOTAL {
        return Err(Error::InvalidArgument(format!(
            "labels total {total} bytes, more than the maximum of {MAX_LABELS_TOTAL} bytes \
             per snapshot"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn invalid(r: Result<()>) -> bool {
        matches!(r, Err(Error::InvalidArgument(_)))
    }

    fn one(k: usize, v: usize) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("k".repeat(k), "v".repeat(v));
        m
    }

    #[test]
    fn containerd_limits_are_enforced_exactly() {
        assert!(check_key("key", &"k".repeat(MAX_KEY)).is_ok());
        assert!(invalid(check_key("key", &"k".repeat(MAX_KEY + 1))));
        // containerd's own worst case: a maximal namespace, sequence and client key.
        let worst = format!("{}/{}/{}", "n".repeat(76), u64::MAX, "k".repeat(32768));
        assert!(check_key("key", &worst).is_ok());

        assert!(check_labels(&one(96, 4000)).is_ok());
        let e = check_labels(&one(96, 4001));
        assert!(format!("{e:?}").contains("4097 bytes"), "{e:?}");
        assert!(invalid(e));

        let mut many = BTreeMap::new();
        for i in 0..16 {
            many.insert(format!("{i:04}"), "v".repeat(4092));
        }
        assert!(check_labels(&many).is_ok(), "16 maximal labels fit");
        many.insert("more".into(), "x".into());
        assert!(invalid(check_labels(&many)));
    }

    #[test]
    fn messages_do_not_echo_huge_inputs() {
        let key = "\u{e9}".repeat(2 * 1024 * 1024);
        let msg = check_key("key", &key).unwrap_err().to_string();
        assert!(msg.len() < 300, "{} bytes", msg.len());
        let mut m = BTreeMap::new();
        m.insert("\u{fc}".repeat(600_000), String::new());
        let msg = check_labels(&m).unwrap_err().to_string();
        assert!(msg.len() < 300, "{} bytes", msg.len());
    }
}
