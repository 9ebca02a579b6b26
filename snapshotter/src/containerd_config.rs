//! `check-containerd-config`: lints a containerd config for the guest-pull pitfalls
//! (reference §3.3–§3.6, §6.9) and says how to fix each.

use std::fmt;

use toml::Value;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Informational.
    Note,
    /// Works, but probably not as intended.
    Warning,
    /// Guest pull will not work.
    Error,
}

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Severity.
    pub severity: Severity,
    /// What is wrong.
    pub problem: String,
    /// How to fix it.
    pub fix: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.severity {
            Severity::Note => "note",
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        write!(f, "{tag}: {}\n  fix: {}", self.problem, self.fix)
    }
}

/// The containerd release line the config is meant for, when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerdLine {
    /// 1.6.x (config v2, no per-runtime snapshotter).
    V1_6,
    /// 1.7.x (config v2).
    V1_7,
    /// 2.x (config v3).
    V2,
}

impl std::str::FromStr for ContainerdLine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "1.6" => Ok(ContainerdLine::V1_6),
            "1.7" => Ok(ContainerdLine::V1_7),
            "2" | "2.x" | "2.0" | "2.1" | "2.2" | "2.3" => Ok(ContainerdLine::V2),
            _ => Err(format!(
                "unknown containerd version {s:?} (use 1.6, 1.7 or 2.x)"
            )),
        }
    }
}

/// Lint options.
#[derive(Debug, Clone)]
pub struct LintOptions {
    /// Proxy plugin name of this snapshotter.
    pub snapshotter: String,
    /// containerd release line, if known.
    pub containerd: Option<ContainerdLine>,
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

struct Lint {
    out: Vec<Finding>,
}

impl Lint {
    fn push(&mut self, severity: Severity, problem: impl Into<String>, fix: impl Into<String>) {
        self.out.push(Finding {
            severity,
            problem: problem.into(),
            fix: fix.into(),
        });
    }
}

/// Lints TOML text; a TOML syntax error is itself reported as an error finding.
pub fn lint(text: &str, opts: &LintOptions) -> Vec<Finding> {
    let mut l = Lint { out: Vec::new() };
    let doc: Value = match toml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            l.push(
                Severity::Error,
                format!("not valid TOML: {e}"),
                "fix the syntax",
            );
            return l.out;
        }
    };
    let name = opts.snapshotter.as_str();
    let version = doc.get("version").and_then(Value::as_integer).unwrap_or(1);

    // Top-level keys written after a table header silently land inside that table.
    if let Some(t) = doc.as_table() {
        for (table, v) in t {
            if let Some(inner) = v.as_table() {
                for key in [
                    "version",
                    "root",
                    "state",
                    "disabled_plugins",
                    "required_plugins",
                ] {
                    if inner.contains_key(key) && table != "plugins" && table != "proxy_plugins" {
                        l.push(
                            Severity::Error,
                            format!("`{key}` is inside [{table}], so containerd ignores it"),
                            format!("move `{key}` above the first [table] header"),
                        );
                    }
                }
            }
        }
    }

    match version {
        2 | 3 => {}
        1 => l.push(
            Severity::Error,
            "config version 1 (or no `version` key)",
            "use `version = 2` for containerd 1.6/1.7 or `version = 3` for 2.x",
        ),
        v => l.push(
            Severity::Error,
            format!("unknown config version {v}"),
            "use 2 or 3",
        ),
    }
    match (version, opts.containerd) {
        (3, Some(ContainerdLine::V1_6 | ContainerdLine::V1_7)) => l.push(
            Severity::Error,
            "config version 3 given for containerd 1.x",
            "containerd 1.6/1.7 read `version = 2` configs",
        ),
        (2, Some(ContainerdLine::V2)) => l.push(
            Severity::Warning,
            "config version 2 for containerd 2.x: the automatic migration drops the per-runtime \
             pull snapshotter (it reads `snapshot` and writes `runtime_platform`)",
            "write a `version = 3` config with `runtime_platforms.<handler>.snapshotter`",
        ),
        _ => {}
    }

    // The proxy plugin.
    let plugin = get(&doc, &["proxy_plugins", name]);
    match plugin {
        None => {
            let others: Vec<String> = doc
                .get("proxy_plugins")
                .and_then(Value::as_table)
                .map(|t| t.keys().cloned().collect())
                .unwrap_or_default();
            l.push(
                Severity::Error,
                format!("no [proxy_plugins.{name}] (found: {others:?})"),
                format!(
                    "add [proxy_plugins.{name}] with type = \"snapshot\" and address = \
                     \"/run/guestpull/snapshotter.sock\" (or pass --snapshotter NAME)"
                ),
            );
        }
        Some(p) => {
            if p.get("type").and_then(Value::as_str) != Some("snapshot") {
                l.push(
                    Severity::Error,
                    format!("[proxy_plugins.{name}] type is not \"snapshot\""),
                    "set type = \"snapshot\"",
                );
            }
            if p.get("address")
                .and_then(Value::as_str)
                .unwrap_or("")
                .is_empty()
            {
                l.push(
                    Severity::Error,
                    format!("[proxy_plugins.{name}] has no address"),
                    "set address to the snapshotter socket (default /run/guestpull/snapshotter.sock)",
                );
            }
            let caps: Vec<&str> = p
                .get("capabilities")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if caps.contains(&"rebase") {
                l.push(
                    Severity::Error,
                    "the plugin advertises the `rebase` capability: containerd 2.x then unpacks \
                     in parallel with empty parents and guest-pull markers get the wrong parent",
                    "remove \"rebase\" from capabilities",
                );
            }
            if p.get("capabilities").is_some() && opts.containerd == Some(ContainerdLine::V1_6) {
                l.push(
                    Severity::Warning,
                    "containerd 1.6 proxy plugins have no `capabilities` key",
                    "remove it for 1.6",
                );
            }
            if version == 3 {
                let exports = p.get("exports");
                let flag = exports
                    .and_then(|e| e.get("enable_remote_snapshot_annotations"))
                    .and_then(Value::as_str);
                if flag != Some("true") {
                    l.push(
                        Severity::Warning,
                        "exports.enable_remote_snapshot_annotations is not \"true\": transfer-service \
                         pulls (ctr pull, CRI when not falling back to local pull) send no cri.* labels",
                        format!("add [proxy_plugins.{name}.exports] enable_remote_snapshot_annotations = \"true\""),
                    );
                }
                if exports.and_then(|e| e.get("root")).is_none() {
                    l.push(
                        Severity::Note,
                        "exports.root is not set; CRI ImageFsInfo assumes <containerd root>/io.containerd.snapshotter.v1.<name>",
                        format!("add [proxy_plugins.{name}.exports] root = \"<snapshotter root>\""),
                    );
                }
            }
        }
    }

    let disabled: Vec<&str> = doc
        .get("disabled_plugins")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    match version {
        2 => lint_v2(&mut l, &doc, name, &disabled, opts.containerd),
        3 => lint_v3(&mut l, &doc, name, &disabled),
        _ => {}
    }
    l.out.sort_by_key(|f| std::cmp::Reverse(f.severity));
    l.out
}

fn runtimes_using<'a>(runtimes: Option<&'a Value>, name: &str) -> Vec<&'a str> {
    runtimes
        .and_then(Value::as_table)
        .map(|t| {
            t.iter()
                .filter(|(_, r)| r.get("snapshotter").and_then(Value::as_str) == Some(name))
                .map(|(k, _)| k.as_str())
                .collect()
        })
        .unwrap_or_default()
}

fn lint_v2(l: &mut Lint, doc: &Value, name: &str, disabled: &[&str], line: Option<ContainerdLine>) {
    const CRI: &str = "io.containerd.grpc.v1.cri";
    if disabled.contains(&CRI) {
        l.push(
            Severity::Note,
            "the CRI plugin is disabled: only ctr/clients use the snapshotter; Kubernetes checks skipped",
            "enable the CRI plugin for Kubernetes",
        );
        return;
    }
    let ctrd = get(doc, &["plugins", CRI, "containerd"]);
    let annotations = ctrd
        .and_then(|c| c.get("disable_snapshot_annotations"))
        .and_then(Value::as_bool)
        .unwrap_or(true);
    if annotations {
        l.push(
            Severity::Error,
            "disable_snapshot_annotations is true (the Linux default): layer Prepares carry no \
             cri.* labels",
            format!(
                "set disable_snapshot_annotations = false under [plugins.\"{CRI}\".containerd]"
            ),
        );
    }
    if ctrd
        .and_then(|c| c.get("discard_unpacked_layers"))
        .and_then(Value::as_bool)
        == Some(true)
    {
        l.push(
            Severity::Warning,
            "discard_unpacked_layers = true: images later unpacked by another snapshotter fail \
             with \"content digest not found\"",
            "set discard_unpacked_layers = false",
        );
    }
    let global = ctrd
        .and_then(|c| c.get("snapshotter"))
        .and_then(Value::as_str)
        .unwrap_or("overlayfs");
    let users = runtimes_using(ctrd.and_then(|c| c.get("runtimes")), name);
    if global == name {
        l.push(
            Severity::Warning,
            format!("the global CRI snapshotter is {name:?}: every pod, runc ones included, gets guest-pull rootfs"),
            "keep snapshotter = \"overlayfs\" globally and set snapshotter per Kata runtime (containerd 1.7+)",
        );
    } else if users.is_empty() {
        l.push(
            Severity::Error,
            format!("no runtime under [plugins.\"{CRI}\".containerd.runtimes] uses snapshotter {name:?}"),
            format!("add snapshotter = \"{name}\" to the Kata runtime table (e.g. runtimes.kata-qemu-tdx)"),
        );
    }
    if line == Some(ContainerdLine::V1_6) && global != name && !users.is_empty() {
        l.push(
            Severity::Error,
            "containerd 1.6 ignores per-runtime snapshotters: pulls and containers use the global one",
            "upgrade to containerd 1.7+, or (1.6 only) set the global snapshotter and accept that runc pods get it too",
        );
    }
    if !users.is_empty() {
        l.push(
            Severity::Note,
            format!(
                "runtimes {users:?} use {name:?}; containerd 1.7 pulls with it only when the pod \
                 sandbox carries the annotation io.containerd.cri.runtime-handler (1.6: never)"
            ),
            "add io.containerd.cri.runtime-handler: <handler> to pod annotations; check the \
             containerd log for \"experimental: PullImage … using snapshotter\"",
        );
    }
}

fn lint_v3(l: &mut Lint, doc: &Value, name: &str, disabled: &[&str]) {
    const IMAGES: &str = "io.containerd.cri.v1.images";
    const RUNTIME: &str = "io.containerd.cri.v1.runtime";
    const TRANSFER: &str = "io.containerd.transfer.v1.local";
    let unpack_ok = get(doc, &["plugins", TRANSFER, "unpack_config"])
        .and_then(Value::as_array)
        .is_some_and(|a| {
            a.iter()
                .any(|e| e.get("snapshotter").and_then(Value::as_str) == Some(name))
        });
    if !unpack_ok {
        l.push(
            Severity::Error,
            format!("no [[plugins.\"{TRANSFER}\".unpack_config]] entry for snapshotter {name:?}: \
                     `ctr image pull --snapshotter {name}` fails with \"no unpack platforms defined\""),
            format!("add [[plugins.\"{TRANSFER}\".unpack_config]] platform = \"linux/amd64\" snapshotter = \"{name}\" \
                     (keep the overlayfs entry too)"),
        );
    }
    if disabled.contains(&IMAGES) || disabled.contains(&RUNTIME) {
        l.push(
            Severity::Note,
            "the CRI plugins are disabled: Kubernetes checks skipped",
            "enable them for Kubernetes",
        );
        return;
    }
    let images = get(doc, &["plugins", IMAGES]);
    if images
        .and_then(|c| c.get("disable_snapshot_annotations"))
        .and_then(Value::as_bool)
        .unwrap_or(true)
    {
        l.push(
            Severity::Error,
            "disable_snapshot_annotations is true (the Linux default): layer Prepares carry no cri.* labels",
            format!("set disable_snapshot_annotations = false under [plugins.\"{IMAGES}\"]"),
        );
    }
    if images.and_then(|i| i.get("runtime_platform")).is_some() {
        l.push(
            Severity::Error,
            "`runtime_platform` (singular) is the v2→v3 migration typo; containerd ignores it",
            "rename it to `runtime_platforms`",
        );
    }
    let users = runtimes_using(
        get(doc, &["plugins", RUNTIME, "containerd", "runtimes"]),
        name,
    );
    let global = images
        .and_then(|i| i.get("snapshotter"))
        .and_then(Value::as_str)
        .unwrap_or("overlayfs");
    if users.is_empty() && global != name {
        l.push(
            Severity::Error,
            format!("no runtime under [plugins.\"{RUNTIME}\".containerd.runtimes] uses snapshotter {name:?}"),
            format!("add snapshotter = \"{name}\" to the Kata runtime table"),
        );
    }
    let platforms = images.and_then(|i| i.get("runtime_platforms"));
    for h in &users {
        let ok = platforms
            .and_then(|p| p.get(*h))
            .and_then(|p| p.get("snapshotter"))
            .and_then(Value::as_str)
            == Some(name);
        if !ok {
            l.push(
                Severity::Error,
                format!("runtime {h:?} uses {name:?} for containers, but [plugins.\"{IMAGES}\".runtime_platforms.{h}] \
                         does not: PullImage would unpack on the host with overlayfs"),
                format!("add [plugins.\"{IMAGES}\".runtime_platforms.{h}] platform = \"linux/amd64\" snapshotter = \"{name}\""),
            );
        }
    }
    if let Some(p) = platforms.and_then(Value::as_table) {
        for (h, v) in p {
            if v.get("snapshot").is_some() {
                l.push(
                    Severity::Error,
                    format!("runtime_platforms.{h} has `snapshot` (migration typo); containerd ignores it"),
                    "rename it to `snapshotter`",
                );
            }
        }
    }
    if global == name {
        l.push(
            Severity::Warning,
            format!(
                "the global CRI image snapshotter is {name:?}: runc pods get guest-pull rootfs too"
            ),
            "keep snapshotter = \"overlayfs\" and map only the Kata handler via runtime_platforms",
        );
    }
    l.push(
        Severity::Note,
        "before containerd 2.2.2 the pull snapshotter is chosen from the pod annotation \
         io.containerd.cri.runtime-handler (2.2.2+/2.3 also honour PullImageRequest.image.runtime_handler)",
        "add io.containerd.cri.runtime-handler: <handler> to pod annotations on older 2.x",
    );
}

/// Whether any finding is an error.
pub fn has_errors(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity == Severity::Error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn opts(line: Option<ContainerdLine>) -> LintOptions {
        LintOptions {
            snapshotter: "guestpull".into(),
            containerd: line,
        }
    }

    fn shipped(name: &str) -> String {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../config")
            .join(name);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn shipped_configs_pass() {
        for (file, line) in [
            ("containerd-1.7.toml", ContainerdLine::V1_7),
            ("containerd-2.x.toml", ContainerdLine::V2),
            ("containerd-1.6.toml", ContainerdLine::V1_6),
        ] {
            let f = lint(&shipped(file), &opts(Some(line)));
            assert!(!has_errors(&f), "{file}: {f:#?}");
        }
    }

    #[test]
    fn catches_pitfalls_v2() {
        let cfg = r#"
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]
  runtime_type = "io.containerd.kata.v2"
[proxy_plugins.guestpull]
  type = "snapshot"
  address = "/run/guestpull/snapshotter.sock"
  capabilities = ["rebase"]
"#;
        let f = lint(cfg, &opts(None));
        let text = format!("{f:?}");
        assert!(text.contains("disable_snapshot_annotations"), "{text}");
        assert!(text.contains("rebase"));
        assert!(text.contains("no runtime"));
        assert!(has_errors(&f));
    }

    #[test]
    fn catches_pitfalls_v3() {
        let cfg = r#"
version = 3
[plugins.'io.containerd.cri.v1.images']
  disable_snapshot_annotations = false
  [plugins.'io.containerd.cri.v1.images'.runtime_platform.kata]
    snapshotter = "guestpull"
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.kata]
  snapshotter = "guestpull"
[proxy_plugins.guestpull]
  type = "snapshot"
  address = "/run/guestpull/snapshotter.sock"
"#;
        let f = lint(cfg, &opts(Some(ContainerdLine::V2)));
        let text = format!("{f:?}");
        assert!(text.contains("unpack_config"), "{text}");
        assert!(text.contains("runtime_platform` (singular)"));
        assert!(text.contains("runtime_platforms.kata"));
        assert!(text.contains("enable_remote_snapshot_annotations"));
    }

    #[test]
    fn catches_misplaced_top_level_keys_and_versions() {
        let cfg = "version = 2\n[grpc]\naddress = \"x\"\ndisabled_plugins = []\n";
        let f = lint(cfg, &opts(None));
        assert!(format!("{f:?}").contains("`disabled_plugins` is inside [grpc]"));
        assert!(has_errors(&lint("[x]\n", &opts(None))));
        assert!(has_errors(&lint("not toml ===", &opts(None))));
        let v2on16 = shipped("containerd-1.7.toml");
        assert!(has_errors(&lint(
            &v2on16,
            &opts(Some(ContainerdLine::V1_6))
        )));
    }
}
