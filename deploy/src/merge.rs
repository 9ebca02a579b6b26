//! What guest pull needs in containerd's config, per release line, as [`Edit`]s.
//!
//! containerd 1.x replaces a whole plugin section with an imported file's (its `mergeConfig`
//! copies `Plugins` by key), so there the edits go into the file that defines the CRI plugin.
//! 2.x merges imports deeply and appends to lists, so there everything goes into one drop-in of
//! ours, and the main config at most gains an `imports` entry (as kata-deploy does for 2.x).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use snapshotter::containerd_config::ContainerdLine;
use toml_edit::DocumentMut;

use crate::edit::{self, path, Edit};
use crate::error::DeployError;

/// The proxy plugin's name in containerd's config.
pub const PLUGIN: &str = "guestpull";

/// The file name of the 2.x drop-in, in `conf.d/` beside the main config.
pub const DROP_IN_NAME: &str = "guestpull.toml";

const CRI_V2: &str = "plugins.\"io.containerd.grpc.v1.cri\"";
const IMAGES_V3: &str = "plugins.\"io.containerd.cri.v1.images\"";
const RUNTIME_V3: &str = "plugins.\"io.containerd.cri.v1.runtime\"";
const TRANSFER_V3: &str = "plugins.\"io.containerd.transfer.v1.local\"";

/// A config file as containerd reads it: its host path and text.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    /// Path on the host.
    pub path: String,
    /// Its contents.
    pub text: String,
}

/// What to wire in.
#[derive(Debug, Clone)]
pub struct Wanted {
    /// containerd's release line on this node.
    pub line: ContainerdLine,
    /// The snapshotter's socket (host path).
    pub socket: String,
    /// The snapshotter's state root (host path), exported to containerd 2.x.
    pub state_root: String,
    /// Kata runtime handlers whose pods use guest pull.
    pub handlers: Vec<String>,
    /// Move handlers (listed or not) from a nydus snapshotter to guestpull.
    pub migrate_from_nydus: bool,
    /// The user accepts guestpull as containerd 1.6's only (global) CRI snapshotter.
    pub allow_global_snapshotter: bool,
    /// The node's platform, e.g. `linux/amd64`.
    pub platform: String,
}

/// The change planned for one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChange {
    /// Path on the host.
    pub path: String,
    /// The text before, `None` when install creates the file.
    pub before: Option<String>,
    /// The text after.
    pub after: String,
    /// The edits that turn `before` into `after`.
    pub edits: Vec<Edit>,
}

/// The whole plan: file changes (in the order to write them) and what to tell the user.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Files to write, each only when it changes.
    pub changes: Vec<FileChange>,
    /// Handlers that end up on guestpull.
    pub mapped: Vec<String>,
    /// Findings for the log: nydus found, handlers skipped or created.
    pub report: Vec<String>,
}

/// The config schema a file declares (`version = N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// `version = 2` (containerd 1.x, read by 2.x through migration).
    V2,
    /// `version = 3` (containerd 2.x).
    V3,
}

/// Reads the `version` of a config's text.
pub fn schema(text: &str) -> Result<Schema, DeployError> {
    let v: toml::Value =
        toml::from_str(text).map_err(|e| DeployError::Config(format!("not valid TOML: {e}")))?;
    match v.get("version").and_then(toml::Value::as_integer) {
        Some(2) => Ok(Schema::V2),
        Some(3) => Ok(Schema::V3),
        Some(n) => Err(DeployError::Config(format!(
            "config version {n} is not one this installer writes (2 for containerd 1.6/1.7, 3 for 2.x)"
        ))),
        None => Err(DeployError::Config(
            "the config has no `version` (schema 1): run `containerd config migrate` and install the result first"
                .into(),
        )),
    }
}

fn parse(f: &ConfigFile) -> Result<DocumentMut, DeployError> {
    f.text
        .parse()
        .map_err(|e| DeployError::Config(format!("{}: not valid TOML: {e}", f.path)))
}

fn value(f: &ConfigFile) -> Result<toml::Value, DeployError> {
    toml::from_str(&f.text)
        .map_err(|e| DeployError::Config(format!("{}: not valid TOML: {e}", f.path)))
}

fn lookup<'a>(v: &'a toml::Value, p: &[String]) -> Option<&'a toml::Value> {
    p.iter().try_fold(v, |v, k| v.get(k))
}

/// containerd 2.x's view of several files: tables merged key by key, later files winning,
/// arrays appended (its `mergeConfig` with the slice transformer).
fn deep_merge(into: &mut toml::Value, from: &toml::Value) {
    match (into, from) {
        (toml::Value::Table(a), toml::Value::Table(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    Some(cur) => deep_merge(cur, v),
                    None => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (toml::Value::Array(a), toml::Value::Array(b)) => {
            for v in b {
                if !a.contains(v) {
                    a.push(v.clone());
                }
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

fn quoted(s: &str) -> String {
    toml_edit::Value::from(s).to_string().trim().to_string()
}

/// Proxy snapshotters that look like nydus-snapshotter (kata-deploy names its one
/// `nydus-for-kata-tee`; the CoCo operator's is `nydus`).
fn nydus_plugins(effective: &toml::Value) -> Vec<(String, String)> {
    let Some(t) = effective
        .get("proxy_plugins")
        .and_then(toml::Value::as_table)
    else {
        return Vec::new();
    };
    t.iter()
        .filter(|(name, p)| {
            let addr = p.get("address").and_then(toml::Value::as_str).unwrap_or("");
            name.as_str() != PLUGIN
                && p.get("type").and_then(toml::Value::as_str) == Some("snapshot")
                && (name.contains("nydus") || addr.contains("nydus"))
        })
        .map(|(name, p)| {
            let addr = p.get("address").and_then(toml::Value::as_str).unwrap_or("");
            (name.clone(), addr.to_string())
        })
        .collect()
}

/// Plans the changes for `files` (the main config first, then what it imports, in containerd's
/// order). `conf_d` is the directory of the 2.x drop-in (host path).
pub fn plan(files: &[ConfigFile], conf_d: &str, want: &Wanted) -> Result<Plan, DeployError> {
    let main = files
        .first()
        .ok_or_else(|| DeployError::Internal("no main config".into()))?;
    let schema = schema(&main.text)?;
    match (want.line, schema) {
        (ContainerdLine::V2, Schema::V2) => {
            return Err(DeployError::Config(format!(
                "{} is a version 2 config on containerd 2.x: its automatic migration drops the \
                 per-handler pull snapshotter (runtime_platforms). Migrate it once with \
                 `containerd config migrate > new.toml`, review and install new.toml, then rerun",
                main.path
            )))
        }
        (ContainerdLine::V1_6 | ContainerdLine::V1_7, Schema::V3) => {
            return Err(DeployError::Config(format!(
                "{} is a version 3 config, which containerd 1.x cannot read",
                main.path
            )))
        }
        _ => {}
    }
    if want.line == ContainerdLine::V1_6 && !want.allow_global_snapshotter {
        return Err(DeployError::Refused(
            "containerd 1.6 has no per-runtime snapshotter: guestpull would become the snapshotter of \
             every CRI pod on this node, runc pods included. Upgrade to containerd 1.7+, or pass \
             --allow-global-snapshotter to accept that"
                .into(),
        ));
    }
    let drop_in_path = format!("{}/{DROP_IN_NAME}", conf_d.trim_end_matches('/'));
    // Our own drop-in from an earlier run is not the user's config: plan as if it were absent.
    let files: Vec<&ConfigFile> = files.iter().filter(|f| f.path != drop_in_path).collect();
    let values: Vec<toml::Value> = files.iter().map(|f| value(f)).collect::<Result<_, _>>()?;
    let mut effective = toml::Value::Table(Default::default());
    for v in &values {
        if want.line == ContainerdLine::V2 {
            deep_merge(&mut effective, v);
        } else if let (toml::Value::Table(a), toml::Value::Table(b)) = (&mut effective, v.clone()) {
            // 1.x: plugin sections and proxy plugins are replaced whole, per name.
            for (k, v) in b {
                match (k.as_str(), a.get_mut(&k)) {
                    ("plugins" | "proxy_plugins", Some(toml::Value::Table(cur))) => {
                        if let toml::Value::Table(v) = v {
                            cur.extend(v);
                        }
                    }
                    _ => {
                        a.insert(k, v);
                    }
                }
            }
        }
    }
    let nydus = nydus_plugins(&effective);
    let mut report = Vec::new();
    for (name, addr) in &nydus {
        report.push(format!(
            "nydus-snapshotter proxy plugin {name:?} found (address {addr}); it is left in place"
        ));
    }
    let nydus_names: BTreeSet<&str> = nydus.iter().map(|(n, _)| n.as_str()).collect();
    match want.line {
        ContainerdLine::V2 => plan_v3(
            &files,
            &values,
            &effective,
            &nydus_names,
            &drop_in_path,
            want,
            report,
        ),
        _ => plan_v2(&files, &values, &effective, &nydus_names, want, report),
    }
}

/// The handlers to map, after the nydus rules: listed ones not on nydus (or all listed ones and
/// every nydus one with `migrate_from_nydus`).
fn handlers_to_map(
    runtimes: Option<&toml::Value>,
    snapshotter_of: impl Fn(&str) -> Option<String>,
    nydus: &BTreeSet<&str>,
    want: &Wanted,
    report: &mut Vec<String>,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for h in &want.handlers {
        match snapshotter_of(h) {
            Some(s) if nydus.contains(s.as_str()) && !want.migrate_from_nydus => report.push(format!(
                "handler {h} uses nydus-snapshotter ({s}); left on it (pass --migrate-from-nydus to move it to {PLUGIN})"
            )),
            _ => out.push(h.clone()),
        }
    }
    if want.migrate_from_nydus {
        if let Some(t) = runtimes.and_then(toml::Value::as_table) {
            for h in t.keys() {
                if let Some(s) = snapshotter_of(h) {
                    if nydus.contains(s.as_str()) && !out.contains(h) {
                        out.push(h.clone());
                    }
                }
            }
        }
        for h in &out {
            if let Some(s) = snapshotter_of(h).filter(|s| nydus.contains(s.as_str())) {
                report.push(format!("handler {h} moved from {s} to {PLUGIN}"));
            }
        }
    }
    out
}

fn push(edits: &mut Vec<Edit>, e: Option<Edit>) {
    edits.extend(e);
}

/// Puts handler `h`'s runtime table at `rt` on guestpull, creating the runtime (with the shim
/// name kata-deploy registers) when the user's config has none.
fn map_runtime(
    doc: &mut DocumentMut,
    edits: &mut Vec<Edit>,
    rt: &[String],
    h: &str,
    exists: bool,
    report: &mut Vec<String>,
) -> Result<(), DeployError> {
    if !exists {
        report.push(format!(
            "handler {h} had no runtime entry; created with runtime_type io.containerd.{h}.v2 (Kata's shim for it must be installed)"
        ));
        push(
            edits,
            edit::set(
                doc,
                &[rt, &["runtime_type".to_string()]].concat(),
                &quoted(&format!("io.containerd.{h}.v2")),
            )?,
        );
    }
    push(
        edits,
        edit::set(
            doc,
            &[rt, &["snapshotter".to_string()]].concat(),
            &quoted(PLUGIN),
        )?,
    );
    Ok(())
}

fn plan_v2(
    files: &[&ConfigFile],
    values: &[toml::Value],
    effective: &toml::Value,
    nydus: &BTreeSet<&str>,
    want: &Wanted,
    mut report: Vec<String>,
) -> Result<Plan, DeployError> {
    let cri = path(CRI_V2);
    // The last file defining the CRI plugin is the one 1.x uses, whole.
    let cri_idx = values
        .iter()
        .rposition(|v| lookup(v, &cri).is_some())
        .unwrap_or(0);
    let runtimes_p = [cri.clone(), path("containerd.runtimes")].concat();
    let runtimes = lookup(effective, &runtimes_p);
    let snapshotter_of = |h: &str| {
        runtimes
            .and_then(|r| r.get(h))
            .and_then(|r| r.get("snapshotter"))
            .and_then(toml::Value::as_str)
            .map(str::to_string)
    };
    let mapped = if want.line == ContainerdLine::V1_6 {
        want.handlers.clone()
    } else {
        handlers_to_map(runtimes, snapshotter_of, nydus, want, &mut report)
    };

    let mut docs: Vec<(DocumentMut, Vec<Edit>)> = Vec::new();
    for f in files {
        docs.push((parse(f)?, Vec::new()));
    }
    {
        let (doc, edits) = &mut docs[cri_idx];
        let ctrd = [cri.clone(), vec!["containerd".to_string()]].concat();
        let key = |k: &str| [ctrd.clone(), path(k)].concat();
        push(
            edits,
            edit::set(doc, &key("disable_snapshot_annotations"), "false")?,
        );
        if want.line == ContainerdLine::V1_6 {
            report.push(format!(
                "containerd 1.6: {PLUGIN} is now the CRI snapshotter of every pod (--allow-global-snapshotter)"
            ));
            push(edits, edit::set(doc, &key("snapshotter"), &quoted(PLUGIN))?);
        } else {
            for h in &mapped {
                let rt = [ctrd.clone(), vec!["runtimes".into(), h.clone()]].concat();
                // 1.x takes the CRI section whole from this file, so the effective runtimes
                // are this file's.
                let exists = runtimes.and_then(|r| r.get(h)).is_some();
                map_runtime(doc, edits, &rt, h, exists, &mut report)?;
            }
        }
    }
    {
        let (doc, edits) = &mut docs[0];
        let p = |k: &str| [path("proxy_plugins"), vec![PLUGIN.to_string()], path(k)].concat();
        push(edits, edit::set(doc, &p("type"), &quoted("snapshot"))?);
        push(edits, edit::set(doc, &p("address"), &quoted(&want.socket))?);
    }
    let changes = files
        .iter()
        .zip(docs)
        .filter(|(_, (_, edits))| !edits.is_empty())
        .map(|(f, (doc, edits))| FileChange {
            path: f.path.clone(),
            before: Some(f.text.clone()),
            after: doc.to_string(),
            edits,
        })
        .collect();
    Ok(Plan {
        changes,
        mapped,
        report,
    })
}

fn plan_v3(
    files: &[&ConfigFile],
    values: &[toml::Value],
    effective: &toml::Value,
    nydus: &BTreeSet<&str>,
    drop_in_path: &str,
    want: &Wanted,
    mut report: Vec<String>,
) -> Result<Plan, DeployError> {
    let runtimes_p = [path(RUNTIME_V3), path("containerd.runtimes")].concat();
    let runtimes = lookup(effective, &runtimes_p);
    let platforms = lookup(
        effective,
        &[path(IMAGES_V3), path("runtime_platforms")].concat(),
    );
    let snapshotter_of = |h: &str| {
        runtimes
            .and_then(|r| r.get(h))
            .and_then(|r| r.get("snapshotter"))
            .and_then(toml::Value::as_str)
            .filter(|s| !s.is_empty())
            .or_else(|| {
                platforms
                    .and_then(|p| p.get(h))
                    .and_then(|p| p.get("snapshotter"))
                    .and_then(toml::Value::as_str)
            })
            .map(str::to_string)
    };
    let mapped = handlers_to_map(runtimes, snapshotter_of, nydus, want, &mut report);

    let mut doc = DocumentMut::new();
    let mut edits = Vec::new();
    push(&mut edits, edit::set(&mut doc, &path("version"), "3")?);
    let images = |k: &str| [path(IMAGES_V3), path(k)].concat();
    let annotations =
        lookup(effective, &images("disable_snapshot_annotations")).and_then(toml::Value::as_bool);
    if annotations != Some(false) {
        push(
            &mut edits,
            edit::set(&mut doc, &images("disable_snapshot_annotations"), "false")?,
        );
    }
    for h in &mapped {
        let rp = [images("runtime_platforms"), vec![h.clone()]].concat();
        push(
            &mut edits,
            edit::set(
                &mut doc,
                &[rp.clone(), vec!["platform".into()]].concat(),
                &quoted(&want.platform),
            )?,
        );
        push(
            &mut edits,
            edit::set(
                &mut doc,
                &[rp, vec!["snapshotter".into()]].concat(),
                &quoted(PLUGIN),
            )?,
        );
        let rt = [runtimes_p.clone(), vec![h.clone()]].concat();
        let exists = runtimes.and_then(|r| r.get(h)).is_some();
        map_runtime(&mut doc, &mut edits, &rt, h, exists, &mut report)?;
    }
    // `ctr image pull --snapshotter guestpull` goes through the transfer service, which unpacks
    // only for listed snapshotters. Listing any replaces its built-in default entry, so that
    // one is written out too when the user's config relies on it.
    let unpack = [path(TRANSFER_V3), vec!["unpack_config".to_string()]].concat();
    let entries = lookup(effective, &unpack)
        .and_then(toml::Value::as_array)
        .cloned()
        .unwrap_or_default();
    let has = |s: &str| {
        entries
            .iter()
            .any(|e| e.get("snapshotter").and_then(toml::Value::as_str) == Some(s))
    };
    if !has(PLUGIN) {
        if entries.is_empty() {
            let default = lookup(effective, &images("snapshotter"))
                .and_then(toml::Value::as_str)
                .unwrap_or("overlayfs")
                .to_string();
            edits.push(edit::append_table(
                &mut doc,
                &unpack,
                &[
                    ("platform".into(), quoted(&want.platform)),
                    ("snapshotter".into(), quoted(&default)),
                ],
            )?);
        }
        edits.push(edit::append_table(
            &mut doc,
            &unpack,
            &[
                ("platform".into(), quoted(&want.platform)),
                ("snapshotter".into(), quoted(PLUGIN)),
            ],
        )?);
    }
    let p = |k: &str| [path("proxy_plugins"), vec![PLUGIN.to_string()], path(k)].concat();
    push(
        &mut edits,
        edit::set(&mut doc, &p("type"), &quoted("snapshot"))?,
    );
    push(
        &mut edits,
        edit::set(&mut doc, &p("address"), &quoted(&want.socket))?,
    );
    // 2.x reports image-filesystem usage for this root; transfer-service pulls add the cri.*
    // layer labels only with the flag.
    push(
        &mut edits,
        edit::set(&mut doc, &p("exports.root"), &quoted(&want.state_root))?,
    );
    push(
        &mut edits,
        edit::set(
            &mut doc,
            &p("exports.enable_remote_snapshot_annotations"),
            &quoted("true"),
        )?,
    );
    let header = format!(
        "# Written by guestpull-deploy: guest pull for the Kata handlers {}.\n\
         # `guestpull-deploy uninstall` removes this file; edits here are lost on the next install.\n",
        mapped.join(", ")
    );
    let mut changes = vec![FileChange {
        path: drop_in_path.to_string(),
        before: None,
        after: format!("{header}{doc}"),
        edits,
    }];

    // The drop-in counts only if the main config imports it.
    let main = files[0];
    let imports: Vec<String> = values[0]
        .get("imports")
        .and_then(toml::Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let main_dir = std::path::Path::new(&main.path)
        .parent()
        .map(|p| p.to_string_lossy().to_string())
        .unwrap_or_default();
    let covered = imports.iter().any(|i| {
        let abs = if i.starts_with('/') {
            i.clone()
        } else {
            format!("{main_dir}/{i}")
        };
        glob::Pattern::new(&abs)
            .map(|p| p.matches(drop_in_path))
            .unwrap_or(false)
    });
    if !covered {
        let mut doc = parse(main)?;
        let e = edit::append(&mut doc, &path("imports"), &quoted(drop_in_path))?;
        if let Some(e) = e {
            // The main config changes second, so it never names a drop-in not yet written.
            changes.push(FileChange {
                path: main.path.clone(),
                before: Some(main.text.clone()),
                after: doc.to_string(),
                edits: vec![e],
            });
        }
    }
    Ok(Plan {
        changes,
        mapped,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default(v: &str) -> String {
        let p = format!(
            "{}/testdata/containerd-{v}-default.toml",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(p).unwrap()
    }

    fn want(line: ContainerdLine, handlers: &[&str]) -> Wanted {
        Wanted {
            line,
            socket: "/run/guestpull/snapshotter.sock".into(),
            state_root: "/var/lib/containerd/io.containerd.snapshotter.v1.guestpull".into(),
            handlers: handlers.iter().map(|h| h.to_string()).collect(),
            migrate_from_nydus: false,
            allow_global_snapshotter: false,
            platform: "linux/amd64".into(),
        }
    }

    fn main_file(text: String) -> ConfigFile {
        ConfigFile {
            path: "/etc/containerd/config.toml".into(),
            text,
        }
    }

    fn get_str(text: &str, p: &str) -> Option<String> {
        let v: toml::Value = toml::from_str(text).unwrap();
        lookup(&v, &path(p)).map(|v| match v {
            toml::Value::String(s) => s.clone(),
            v => v.to_string(),
        })
    }

    /// Undoing every edit of a change gives back the original bytes.
    fn assert_reversible(c: &FileChange) {
        let before = c.before.clone().expect("a file that existed");
        let mut doc: DocumentMut = c.after.parse().unwrap();
        for e in c.edits.iter().rev() {
            assert!(
                edit::undo(&mut doc, e).unwrap(),
                "{e:?} not found in {}",
                c.path
            );
        }
        assert_eq!(doc.to_string(), before, "{}", c.path);
    }

    #[test]
    fn containerd_1_7_default_gets_the_handler_annotations_and_proxy_in_place() {
        let plan = plan(
            &[main_file(default("1.7"))],
            "/etc/containerd/conf.d",
            &want(ContainerdLine::V1_7, &["kata-qemu-tdx"]),
        )
        .unwrap();
        assert_eq!(plan.changes.len(), 1);
        let c = &plan.changes[0];
        let cri = "plugins.\"io.containerd.grpc.v1.cri\".containerd";
        assert_eq!(
            get_str(&c.after, &format!("{cri}.disable_snapshot_annotations")).as_deref(),
            Some("false")
        );
        assert_eq!(
            get_str(
                &c.after,
                &format!("{cri}.runtimes.kata-qemu-tdx.snapshotter")
            )
            .as_deref(),
            Some("guestpull")
        );
        assert_eq!(
            get_str(
                &c.after,
                &format!("{cri}.runtimes.kata-qemu-tdx.runtime_type")
            )
            .as_deref(),
            Some("io.containerd.kata-qemu-tdx.v2")
        );
        assert_eq!(
            get_str(&c.after, &format!("{cri}.snapshotter")).as_deref(),
            Some("overlayfs"),
            "runc pods keep overlayfs"
        );
        assert_eq!(
            get_str(&c.after, "proxy_plugins.guestpull.address").as_deref(),
            Some("/run/guestpull/snapshotter.sock")
        );
        assert!(
            plan.report.iter().any(|r| r.contains("no runtime entry")),
            "{:?}",
            plan.report
        );
        assert_reversible(c);
    }

    #[test]
    fn containerd_2_gets_a_drop_in_and_one_imports_entry() {
        let plan = plan(
            &[main_file(default("2.1"))],
            "/etc/containerd/conf.d",
            &want(ContainerdLine::V2, &["kata-qemu-tdx", "kata-qemu-snp"]),
        )
        .unwrap();
        assert_eq!(plan.changes.len(), 2);
        let d = &plan.changes[0];
        assert_eq!(d.path, "/etc/containerd/conf.d/guestpull.toml");
        assert_eq!(d.before, None);
        let v: toml::Value = toml::from_str(&d.after).unwrap();
        assert_eq!(v["version"].as_integer(), Some(3));
        let images = "plugins.\"io.containerd.cri.v1.images\"";
        assert_eq!(
            get_str(&d.after, &format!("{images}.disable_snapshot_annotations")).as_deref(),
            Some("false")
        );
        for h in ["kata-qemu-tdx", "kata-qemu-snp"] {
            assert_eq!(
                get_str(
                    &d.after,
                    &format!("{images}.runtime_platforms.{h}.snapshotter")
                )
                .as_deref(),
                Some("guestpull")
            );
            assert_eq!(get_str(&d.after, &format!("plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.{h}.snapshotter")).as_deref(), Some("guestpull"));
        }
        let unpack = lookup(
            &v,
            &path("plugins.\"io.containerd.transfer.v1.local\".unpack_config"),
        )
        .unwrap()
        .as_array()
        .unwrap();
        let snaps: Vec<&str> = unpack
            .iter()
            .map(|e| e["snapshotter"].as_str().unwrap())
            .collect();
        assert_eq!(
            snaps,
            ["overlayfs", "guestpull"],
            "the built-in default entry is kept"
        );
        assert_eq!(
            get_str(
                &d.after,
                "proxy_plugins.guestpull.exports.enable_remote_snapshot_annotations"
            )
            .as_deref(),
            Some("true")
        );
        let m = &plan.changes[1];
        assert_eq!(
            get_str(&m.after, "imports").as_deref(),
            Some("[\"/etc/containerd/conf.d/guestpull.toml\"]")
        );
        // Nothing else of the user's file moved.
        let diff: Vec<(&str, &str)> = m
            .before
            .as_deref()
            .unwrap()
            .lines()
            .zip(m.after.lines())
            .filter(|(a, b)| a != b)
            .collect();
        assert_eq!(
            diff,
            [(
                "imports = []",
                "imports = [\"/etc/containerd/conf.d/guestpull.toml\"]"
            )]
        );
        assert_reversible(m);
    }

    #[test]
    fn an_imports_glob_covering_conf_d_leaves_the_main_config_alone() {
        let text = default("2.1").replace(
            "imports = []",
            "imports = ['/etc/containerd/conf.d/*.toml']",
        );
        let plan = plan(
            &[main_file(text)],
            "/etc/containerd/conf.d",
            &want(ContainerdLine::V2, &["kata-qemu-tdx"]),
        )
        .unwrap();
        assert_eq!(plan.changes.len(), 1);
        assert_eq!(
            plan.changes[0].path,
            "/etc/containerd/conf.d/guestpull.toml"
        );
    }

    #[test]
    fn containerd_1_6_needs_consent_for_a_global_snapshotter() {
        let files = [main_file(default("1.6"))];
        let e = plan(
            &files,
            "/x",
            &want(ContainerdLine::V1_6, &["kata-qemu-tdx"]),
        )
        .unwrap_err();
        assert!(matches!(e, DeployError::Refused(_)), "{e}");
        let mut w = want(ContainerdLine::V1_6, &["kata-qemu-tdx"]);
        w.allow_global_snapshotter = true;
        let plan = plan(&files, "/x", &w).unwrap();
        let c = &plan.changes[0];
        assert_eq!(
            get_str(
                &c.after,
                "plugins.\"io.containerd.grpc.v1.cri\".containerd.snapshotter"
            )
            .as_deref(),
            Some("guestpull")
        );
        assert_reversible(c);
    }

    #[test]
    fn mismatched_schemas_are_refused_with_the_fix() {
        let e = plan(
            &[main_file(default("1.7"))],
            "/x",
            &want(ContainerdLine::V2, &["k"]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("containerd config migrate"), "{e}");
        let e = plan(
            &[main_file(default("2.1"))],
            "/x",
            &want(ContainerdLine::V1_7, &["k"]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
        let e = plan(
            &[main_file("[plugins]\n".into())],
            "/x",
            &want(ContainerdLine::V1_7, &["k"]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("schema 1"), "{e}");
    }

    const NYDUS_1_7: &str = "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  disable_snapshot_annotations = false\n\
        [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata-qemu-tdx]\n  runtime_type = \"io.containerd.kata-qemu-tdx.v2\"\n  snapshotter = \"nydus\"\n\
        [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata-qemu-snp]\n  runtime_type = \"io.containerd.kata-qemu-snp.v2\"\n  snapshotter = \"nydus\"\n\n\
        [proxy_plugins.nydus]\n  type = \"snapshot\"\n  address = \"/run/containerd-nydus/containerd-nydus-grpc.sock\"\n";

    #[test]
    fn nydus_handlers_are_reported_and_moved_only_with_the_flag() {
        let files = [main_file(NYDUS_1_7.into())];
        let plan1 = plan(
            &files,
            "/x",
            &want(ContainerdLine::V1_7, &["kata-qemu-tdx"]),
        )
        .unwrap();
        assert!(plan1.mapped.is_empty());
        assert!(
            plan1.report.iter().any(|r| r.contains("\"nydus\" found")),
            "{:?}",
            plan1.report
        );
        assert!(
            plan1
                .report
                .iter()
                .any(|r| r.contains("--migrate-from-nydus")),
            "{:?}",
            plan1.report
        );
        let after = &plan1.changes[0].after;
        assert_eq!(get_str(after, "plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata-qemu-tdx.snapshotter").as_deref(), Some("nydus"));

        let mut w = want(ContainerdLine::V1_7, &["kata-qemu-tdx"]);
        w.migrate_from_nydus = true;
        let plan2 = plan(&files, "/x", &w).unwrap();
        assert_eq!(
            plan2.mapped,
            ["kata-qemu-tdx", "kata-qemu-snp"],
            "every nydus handler moves"
        );
        let c = &plan2.changes[0];
        for h in ["kata-qemu-tdx", "kata-qemu-snp"] {
            assert_eq!(
                get_str(
                    &c.after,
                    &format!(
                        "plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{h}.snapshotter"
                    )
                )
                .as_deref(),
                Some("guestpull")
            );
        }
        assert_eq!(
            get_str(&c.after, "proxy_plugins.nydus.type").as_deref(),
            Some("snapshot"),
            "nydus stays configured"
        );
        assert_reversible(c);
    }

    #[test]
    fn containerd_1_7_edits_the_imported_file_that_defines_the_cri_plugin() {
        let main = main_file("version = 2\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n\n[grpc]\n  address = \"/run/containerd/containerd.sock\"\n".into());
        let cri = ConfigFile {
            path: "/etc/containerd/conf.d/10-cri.toml".into(),
            text: "version = 2\n# CRI, managed by the platform team\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata-qemu-tdx]\n  runtime_type = \"io.containerd.kata-qemu-tdx.v2\"\n".into(),
        };
        let plan = plan(
            &[main, cri],
            "/etc/containerd/conf.d",
            &want(ContainerdLine::V1_7, &["kata-qemu-tdx"]),
        )
        .unwrap();
        let paths: Vec<&str> = plan.changes.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/etc/containerd/config.toml",
                "/etc/containerd/conf.d/10-cri.toml"
            ]
        );
        let c = &plan.changes[1];
        assert_eq!(get_str(&c.after, "plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata-qemu-tdx.snapshotter").as_deref(), Some("guestpull"));
        assert!(plan.changes[0].after.contains("[proxy_plugins.guestpull]"));
        for c in &plan.changes {
            assert_reversible(c);
        }
    }
}
