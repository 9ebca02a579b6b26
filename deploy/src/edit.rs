//! Recorded, reversible edits of a TOML document that keep every other byte of it.
//!
//! Each change the installer makes to a containerd config file is one [`Edit`], kept in the
//! install journal. Uninstall restores the saved original when the file is still exactly what
//! install wrote; when the user has edited it since, it undoes the recorded edits one by one
//! instead, so neither their later changes nor ours are left behind.

use serde::{Deserialize, Serialize};
use toml_edit::{ArrayOfTables, DocumentMut, Item, Table, TableLike, Value};

use crate::error::DeployError;

/// One change to a TOML document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Edit {
    /// The key at `path` set to `value` (TOML value syntax).
    Set {
        /// Table names, then the key.
        path: Vec<String>,
        /// The value written.
        value: String,
        /// The value it replaced, `None` when the key was absent.
        prev: Option<String>,
        /// How many of the key's parent tables this edit created (innermost first on undo).
        created: usize,
        /// The key's table existed with no header of its own (only subtables), and gets that
        /// back on undo.
        #[serde(default)]
        implicit: bool,
    },
    /// `value` appended to the array at `path` (the key created when absent).
    Append {
        /// Table names, then the key of the array.
        path: Vec<String>,
        /// The element appended (TOML value syntax).
        value: String,
        /// Whether the key itself was created.
        created: bool,
    },
    /// A table appended to the array of tables at `path`.
    AppendTable {
        /// Table names, then the key of the array of tables.
        path: Vec<String>,
        /// The new table's keys and values (TOML value syntax), in order.
        entries: Vec<(String, String)>,
        /// How many of the array's parent tables this edit created.
        created: usize,
    },
}

fn parse_value(text: &str) -> Result<Value, DeployError> {
    text.parse::<Value>()
        .map_err(|e| DeployError::Internal(format!("bad TOML value {text:?}: {e}")))
}

/// A value's text without its surrounding whitespace and comments, for comparisons.
pub fn value_text(v: &Value) -> String {
    let mut v = v.clone();
    v.decor_mut().clear();
    v.to_string()
}

fn table_mut<'a>(
    doc: &'a mut DocumentMut,
    path: &[String],
    create: bool,
    created: &mut usize,
) -> Result<Option<&'a mut dyn TableLike>, DeployError> {
    let mut t: &mut dyn TableLike = doc.as_table_mut();
    for (i, k) in path.iter().enumerate() {
        if t.get(k).is_none() {
            if !create {
                return Ok(None);
            }
            let mut nt = Table::new();
            // Intermediate tables get no header of their own unless they hold keys.
            nt.set_implicit(true);
            t.insert(k, Item::Table(nt));
            *created += 1;
        }
        t = match t.get_mut(k).and_then(Item::as_table_like_mut) {
            Some(t) => t,
            None => {
                return Err(DeployError::Config(format!(
                    "{} is not a table",
                    path[..=i].join(".")
                )))
            }
        };
    }
    Ok(Some(t))
}

fn table_item_mut<'a>(doc: &'a mut DocumentMut, path: &[String]) -> Option<&'a mut Table> {
    let mut t: &mut Table = doc.as_table_mut();
    for k in path {
        t = t.get_mut(k)?.as_table_mut()?;
    }
    Some(t)
}

/// The value at `path` (tables then key), if present and a plain value.
pub fn get<'a>(doc: &'a DocumentMut, path: &[String]) -> Option<&'a Value> {
    let (key, tables) = path.split_last()?;
    let mut t: &dyn TableLike = doc.as_table();
    for k in tables {
        t = t.get(k)?.as_table_like()?;
    }
    t.get(key)?.as_value()
}

/// Sets `path` to `value`, keeping the old value's comments; returns the recorded edit, or
/// `None` when the key already holds that value.
pub fn set(
    doc: &mut DocumentMut,
    path: &[String],
    value: &str,
) -> Result<Option<Edit>, DeployError> {
    let mut new = parse_value(value)?;
    let (key, tables) = path.split_last().expect("non-empty path");
    let implicit = table_item_mut(doc, tables).is_some_and(|t| t.is_implicit());
    let mut created = 0;
    let t = table_mut(doc, tables, true, &mut created)?.expect("created");
    let prev = match t.get_mut(key) {
        Some(item) => match item.as_value_mut() {
            Some(old) => {
                if value_text(old) == value_text(&new) {
                    return Ok(None);
                }
                let text = value_text(old);
                *new.decor_mut() = old.decor().clone();
                *old = new;
                Some(text)
            }
            None => {
                return Err(DeployError::Config(format!(
                    "{} is a table, not a value",
                    path.join(".")
                )))
            }
        },
        None => {
            t.insert(key, Item::Value(new));
            None
        }
    };
    Ok(Some(Edit::Set {
        path: path.to_vec(),
        value: value.to_string(),
        prev,
        created,
        implicit: implicit && created == 0,
    }))
}

/// Appends `value` to the array at `path` unless an equal element is there.
pub fn append(
    doc: &mut DocumentMut,
    path: &[String],
    value: &str,
) -> Result<Option<Edit>, DeployError> {
    let new = parse_value(value)?;
    let (key, tables) = path.split_last().expect("non-empty path");
    let mut created_tables = 0;
    let t = table_mut(doc, tables, true, &mut created_tables)?.expect("created");
    if created_tables > 0 {
        return Err(DeployError::Internal(format!(
            "append below missing tables {}",
            tables.join(".")
        )));
    }
    let created = t.get(key).is_none();
    if created {
        t.insert(key, Item::Value(Value::Array(toml_edit::Array::new())));
    }
    let arr = t
        .get_mut(key)
        .and_then(Item::as_array_mut)
        .ok_or_else(|| DeployError::Config(format!("{} is not an array", path.join("."))))?;
    if arr.iter().any(|v| value_text(v) == value_text(&new)) {
        return Ok(None);
    }
    arr.push_formatted(new);
    // A one-line array reads best with ", " between elements and none inside the brackets.
    if !arr.to_string().contains('\n') {
        arr.fmt();
    }
    Ok(Some(Edit::Append {
        path: path.to_vec(),
        value: value.to_string(),
        created,
    }))
}

/// Appends a table with `entries` to the array of tables at `path`.
pub fn append_table(
    doc: &mut DocumentMut,
    path: &[String],
    entries: &[(String, String)],
) -> Result<Edit, DeployError> {
    let (key, tables) = path.split_last().expect("non-empty path");
    let mut created = 0;
    let t = table_mut(doc, tables, true, &mut created)?.expect("created");
    if t.get(key).is_none() {
        t.insert(key, Item::ArrayOfTables(ArrayOfTables::new()));
    }
    let aot = t
        .get_mut(key)
        .and_then(Item::as_array_of_tables_mut)
        .ok_or_else(|| {
            DeployError::Config(format!("{} is not an array of tables", path.join(".")))
        })?;
    let mut nt = Table::new();
    for (k, v) in entries {
        nt.insert(k, Item::Value(parse_value(v)?));
    }
    aot.push(nt);
    Ok(Edit::AppendTable {
        path: path.to_vec(),
        entries: entries.to_vec(),
        created,
    })
}

fn remove_at(doc: &mut DocumentMut, path: &[String]) {
    let Some((key, tables)) = path.split_last() else {
        return;
    };
    let mut unused = 0;
    if let Ok(Some(t)) = table_mut(doc, tables, false, &mut unused) {
        t.remove(key);
    }
}

fn prune(doc: &mut DocumentMut, tables: &[String], created: usize) {
    for depth in 0..created {
        let Some(end) = tables.len().checked_sub(depth) else {
            return;
        };
        let path = &tables[..end];
        let mut unused = 0;
        let empty = matches!(
            table_mut(doc, path, false, &mut unused),
            Ok(Some(t)) if t.is_empty()
        );
        if !empty {
            return;
        }
        remove_at(doc, path);
    }
}

/// Undoes one edit where the document still shows it; returns whether anything changed.
pub fn undo(doc: &mut DocumentMut, edit: &Edit) -> Result<bool, DeployError> {
    match edit {
        Edit::Set {
            path,
            value,
            prev,
            created,
            implicit,
        } => {
            let ours = parse_value(value)?;
            match get(doc, path) {
                Some(cur) if value_text(cur) == value_text(&ours) => {}
                // Changed by someone since: theirs now, not ours to take back.
                _ => return Ok(false),
            }
            match prev {
                Some(p) => {
                    set(doc, path, p)?;
                }
                None => {
                    remove_at(doc, path);
                    let parent = &path[..path.len() - 1];
                    if *implicit {
                        if let Some(t) = table_item_mut(doc, parent) {
                            if !t.iter().any(|(_, i)| i.is_value()) {
                                t.set_implicit(true);
                            }
                        }
                    }
                    prune(doc, parent, *created);
                }
            }
            Ok(true)
        }
        Edit::Append {
            path,
            value,
            created,
        } => {
            let ours = value_text(&parse_value(value)?);
            let (key, tables) = path.split_last().expect("non-empty path");
            let mut unused = 0;
            let Some(t) = table_mut(doc, tables, false, &mut unused)? else {
                return Ok(false);
            };
            let Some(arr) = t.get_mut(key).and_then(Item::as_array_mut) else {
                return Ok(false);
            };
            let before = arr.len();
            arr.retain(|v| value_text(v) != ours);
            let changed = arr.len() != before;
            if *created && arr.is_empty() {
                t.remove(key);
            }
            Ok(changed)
        }
        Edit::AppendTable {
            path,
            entries,
            created,
        } => {
            let (key, tables) = path.split_last().expect("non-empty path");
            let mut unused = 0;
            let Some(t) = table_mut(doc, tables, false, &mut unused)? else {
                return Ok(false);
            };
            let Some(aot) = t.get_mut(key).and_then(Item::as_array_of_tables_mut) else {
                return Ok(false);
            };
            let wanted: Vec<(String, String)> = entries
                .iter()
                .map(|(k, v)| Ok((k.clone(), value_text(&parse_value(v)?))))
                .collect::<Result<_, DeployError>>()?;
            let idx = aot.iter().position(|tbl| {
                let have: Vec<(String, String)> = tbl
                    .iter()
                    .filter_map(|(k, i)| i.as_value().map(|v| (k.to_string(), value_text(v))))
                    .collect();
                have == wanted
            });
            let Some(idx) = idx else {
                return Ok(false);
            };
            aot.remove(idx);
            if aot.is_empty() {
                t.remove(key);
                prune(doc, tables, *created);
            }
            Ok(true)
        }
    }
}

/// Splits a dotted path written with containerd's quoted plugin ids, e.g.
/// `plugins."io.containerd.grpc.v1.cri".containerd`, into its keys.
pub fn path(spec: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in spec.chars() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: &str = "# user's config\nversion = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\" # keep me\n  disable_snapshot_annotations = true\n";

    #[test]
    fn set_keeps_comments_and_undo_restores_the_bytes() {
        let mut doc: DocumentMut = USER.parse().unwrap();
        let a = set(
            &mut doc,
            &path("plugins.\"io.containerd.grpc.v1.cri\".containerd.disable_snapshot_annotations"),
            "false",
        )
        .unwrap()
        .unwrap();
        let b = set(
            &mut doc,
            &path("plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata.snapshotter"),
            "\"guestpull\"",
        )
        .unwrap()
        .unwrap();
        let c = set(
            &mut doc,
            &path("proxy_plugins.guestpull.type"),
            "\"snapshot\"",
        )
        .unwrap()
        .unwrap();
        let text = doc.to_string();
        assert!(
            text.contains("snapshotter = \"overlayfs\" # keep me"),
            "{text}"
        );
        assert!(
            text.contains("disable_snapshot_annotations = false\n"),
            "{text}"
        );
        assert!(text.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata]\nsnapshotter = \"guestpull\""), "{text}");
        assert!(
            text.contains("[proxy_plugins.guestpull]\ntype = \"snapshot\""),
            "{text}"
        );
        // A second identical edit is nothing.
        assert!(set(
            &mut doc,
            &path("proxy_plugins.guestpull.type"),
            "\"snapshot\""
        )
        .unwrap()
        .is_none());
        for e in [c, b, a] {
            assert!(undo(&mut doc, &e).unwrap());
        }
        assert_eq!(doc.to_string(), USER);
    }

    #[test]
    fn undo_leaves_a_value_changed_since() {
        let mut doc: DocumentMut = USER.parse().unwrap();
        let p = path("proxy_plugins.guestpull.address");
        let e = set(&mut doc, &p, "\"/run/a.sock\"").unwrap().unwrap();
        set(&mut doc, &p, "\"/run/b.sock\"").unwrap();
        assert!(!undo(&mut doc, &e).unwrap());
        assert_eq!(value_text(get(&doc, &p).unwrap()), "\"/run/b.sock\"");
    }

    #[test]
    fn append_and_append_table_undo() {
        let base = "version = 3\nimports = []\n\n[plugins.'io.containerd.transfer.v1.local']\n  max_concurrent_downloads = 3\n";
        let mut doc: DocumentMut = base.parse().unwrap();
        let a = append(
            &mut doc,
            &path("imports"),
            "\"/etc/containerd/conf.d/guestpull.toml\"",
        )
        .unwrap()
        .unwrap();
        assert!(append(
            &mut doc,
            &path("imports"),
            "\"/etc/containerd/conf.d/guestpull.toml\""
        )
        .unwrap()
        .is_none());
        let t = append_table(
            &mut doc,
            &path("plugins.\"io.containerd.transfer.v1.local\".unpack_config"),
            &[
                ("platform".into(), "\"linux/amd64\"".into()),
                ("snapshotter".into(), "\"guestpull\"".into()),
            ],
        )
        .unwrap();
        let text = doc.to_string();
        assert!(
            text.contains("imports = [\"/etc/containerd/conf.d/guestpull.toml\"]\n"),
            "{text}"
        );
        assert!(
            text.contains("[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]"),
            "{text}"
        );
        assert!(undo(&mut doc, &t).unwrap());
        assert!(undo(&mut doc, &a).unwrap());
        assert_eq!(doc.to_string(), base);
    }

    #[test]
    fn path_splits_quoted_plugin_ids() {
        assert_eq!(
            path("plugins.\"io.containerd.grpc.v1.cri\".containerd"),
            vec!["plugins", "io.containerd.grpc.v1.cri", "containerd"]
        );
    }
}
