//! `install` and `uninstall`: the steps, their order, and the journal that makes them
//! idempotent and safe to kill.
//!
//! Order matters for a kill at any point: the journal (holding the user's original config
//! bytes) is written before any config; every file is replaced atomically; a 2.x drop-in is
//! written before the `imports` entry naming it (containerd refuses to start on a missing
//! import) and removed after it. Each state in between is a config containerd starts with, and a
//! rerun starts from the journal's originals, so it finishes the same way a clean run does.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use snapshotter::containerd_config::{self, ContainerdLine, LintOptions, Severity};
use toml_edit::DocumentMut;

use crate::edit::{self, Edit};
use crate::error::DeployError;
use crate::host::{parse_containerd_version, Host};
use crate::merge::{self, ConfigFile, Plan, Wanted, PLUGIN};

/// The snapshotter's unit, as shipped in `config/`; paths are rewritten for the prefix.
const UNIT_TEMPLATE: &str = include_str!("../../config/guestpull-snapshotter.service");
/// The unit's name.
pub const UNIT: &str = "guestpull-snapshotter.service";
/// Binaries copied onto the host.
pub const BINARIES: [&str; 2] = ["guestpull-snapshotter", "nydus-overlayfs"];

/// Standard host locations (before the prefix).
mod std_paths {
    pub const BIN_DIR: &str = "/usr/local/bin";
    pub const CONFIG: &str = "/etc/guestpull/snapshotter.toml";
    pub const UNIT_DIR: &str = "/etc/systemd/system";
    pub const JOURNAL: &str = "/var/lib/guestpull-deploy/journal.json";
    pub const STATE_ROOT: &str = "/var/lib/containerd/io.containerd.snapshotter.v1.guestpull";
    pub const SOCKET: &str = "/run/guestpull/snapshotter.sock";
    pub const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
}

/// What to install and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// The node.
    pub host: Host,
    /// containerd's main config (host path); `None`: `/etc/containerd/config.toml`.
    pub containerd_config: Option<String>,
    /// Kata runtime handlers to put on guest pull.
    pub handlers: Vec<String>,
    /// Move handlers from nydus-snapshotter to guestpull.
    pub migrate_from_nydus: bool,
    /// Accept guestpull as containerd 1.6's global snapshotter.
    pub allow_global_snapshotter: bool,
    /// Where `guestpull-snapshotter` and `nydus-overlayfs` to install are (installer side).
    pub payload_dir: PathBuf,
    /// containerd's systemd unit.
    pub containerd_unit: String,
    /// How long to wait for the snapshotter socket and containerd's plugin.
    pub timeout: Duration,
    /// The node's platform for 2.x `runtime_platforms` and unpack entries.
    pub platform: String,
}

impl Options {
    fn config_path(&self) -> String {
        self.containerd_config
            .clone()
            .unwrap_or_else(|| self.host.path(std_paths::CONTAINERD_CONFIG))
    }
}

/// One config file as the journal keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JournaledFile {
    /// Host path.
    pub path: String,
    /// The user's bytes before install; `None`: install created the file.
    pub before: Option<String>,
    /// SHA-256 of what install wrote.
    pub after_sha256: String,
    /// Our edits, for undoing them in a file changed since.
    pub edits: Vec<Edit>,
}

/// Where an install got to.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Files may be written; containerd may not have the plugin yet.
    Installing,
    /// containerd serves the plugin.
    Installed,
}

/// The install journal (`/var/lib/guestpull-deploy/journal.json` on the host).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Journal {
    /// Format version, 1.
    pub version: u32,
    /// Where the install got to.
    pub stage: Stage,
    /// containerd's version at install.
    pub containerd_version: String,
    /// The main config.
    pub containerd_config: String,
    /// Config files changed, in write order.
    pub files: Vec<JournaledFile>,
    /// Handlers on guestpull.
    pub handlers: Vec<String>,
    /// Directories install created for config files (a drop-in's `conf.d`), removed again by
    /// uninstall when empty.
    #[serde(default)]
    pub created_dirs: Vec<String>,
}

fn sha(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

impl Journal {
    fn load(host: &Host) -> Result<Option<Journal>, DeployError> {
        let p = host.path(std_paths::JOURNAL);
        let Some(text) = host.read(&p)? else {
            return Ok(None);
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| DeployError::Journal {
                path: host.file(&p),
                message: format!(
                    "{e}; move it away only if you restored containerd's config yourself"
                ),
            })
    }

    fn save(&self, host: &Host) -> Result<(), DeployError> {
        let body =
            serde_json::to_vec_pretty(self).map_err(|e| DeployError::Internal(e.to_string()))?;
        // It holds the user's config bytes: readable by root only.
        host.write(&host.path(std_paths::JOURNAL), &body, 0o600)?;
        Ok(())
    }
}

/// The text a journaled file goes back to: the saved original when the file is exactly what
/// install wrote, else the current text with our edits undone (the user changed it since).
fn restored(host: &Host, jf: &JournaledFile) -> Result<Option<String>, DeployError> {
    let Some(cur) = host.read_text(&jf.path)? else {
        // Gone (a drop-in of ours, or a file the user deleted since): it stays gone.
        return Ok(None);
    };
    if sha(&cur) == jf.after_sha256 || Some(&cur) == jf.before.as_ref() {
        return Ok(jf.before.clone());
    }
    let mut doc: DocumentMut = cur
        .parse()
        .map_err(|e| DeployError::Config(format!("{}: not valid TOML: {e}", jf.path)))?;
    for e in jf.edits.iter().rev() {
        edit::undo(&mut doc, e)?;
    }
    tracing::warn!(path = %jf.path, "changed since install: undoing our edits one by one instead of restoring the original bytes");
    Ok(Some(doc.to_string()))
}

/// containerd's main config and every file it imports, in its load order.
fn load_configs(
    host: &Host,
    main: &str,
    overrides: &BTreeMap<String, Option<String>>,
) -> Result<Vec<ConfigFile>, DeployError> {
    let mut out: Vec<ConfigFile> = Vec::new();
    let mut pending = vec![main.to_string()];
    while !pending.is_empty() {
        let path = pending.remove(0);
        if out.iter().any(|f| f.path == path) {
            continue;
        }
        let text = match overrides.get(&path) {
            Some(t) => t.clone(),
            None => host.read_text(&path)?,
        };
        let Some(text) = text else {
            if path == main {
                return Err(DeployError::Config(format!(
                    "{} does not exist: write containerd's config first (`containerd config default`)",
                    host.file(&path).display()
                )));
            }
            continue;
        };
        let v: toml::Value = toml::from_str(&text)
            .map_err(|e| DeployError::Config(format!("{path}: not valid TOML: {e}")))?;
        let dir = std::path::Path::new(&path)
            .parent()
            .map(|p| p.to_string_lossy().to_string())
            .unwrap_or_default();
        for i in v
            .get("imports")
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(toml::Value::as_str)
        {
            let abs = if i.starts_with('/') {
                i.to_string()
            } else {
                format!("{dir}/{i}")
            };
            if abs.contains('*') {
                let pat = host.file(&abs);
                let mut hits: Vec<String> = glob::glob(&pat.to_string_lossy())
                    .map_err(|e| DeployError::Config(format!("{path}: bad import {i:?}: {e}")))?
                    .filter_map(Result::ok)
                    .filter_map(|p| {
                        p.strip_prefix(&host.root)
                            .ok()
                            .map(|r| format!("/{}", r.display()))
                    })
                    .collect();
                hits.sort();
                pending.extend(hits);
            } else {
                pending.push(abs);
            }
        }
        out.push(ConfigFile { path, text });
    }
    Ok(out)
}

fn snapshotter_config(host: &Host) -> String {
    let helper = if host.prefix.is_empty() {
        // The Kata Go shim and mount.fuse find the helper by name, as with nydus.
        String::new()
    } else {
        host.path(&format!("{}/nydus-overlayfs", std_paths::BIN_DIR))
    };
    format!(
        "# Written by guestpull-deploy; see config/snapshotter.toml for every key.\nversion = 1\n\
         root = {root}\naddress = {addr}\nlog_level = \"info\"\n\n[snapshot]\nnydus_overlayfs_path = {helper}\n",
        root = toml_edit::Value::from(host.path(std_paths::STATE_ROOT)),
        addr = toml_edit::Value::from(host.path(std_paths::SOCKET)),
        helper = toml_edit::Value::from(helper),
    )
}

fn unit_text(host: &Host) -> String {
    UNIT_TEMPLATE
        .replace(
            "/usr/local/bin/guestpull-snapshotter",
            &host.path(&format!("{}/guestpull-snapshotter", std_paths::BIN_DIR)),
        )
        .replace(
            "/etc/guestpull/snapshotter.toml",
            &host.path(std_paths::CONFIG),
        )
}

fn wait(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<(), DeployError> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(DeployError::Timeout(format!("{what} after {timeout:?}")))
}

/// Detects containerd's release line with `containerd --version` on the host.
pub fn containerd_line(host: &Host) -> Result<(ContainerdLine, String), DeployError> {
    parse_containerd_version(&host.run_ok("containerd", &["--version"])?)
}

/// containerd's merged view of `config` (`containerd --config F config dump`).
fn dump(host: &Host, config: &str) -> Result<String, DeployError> {
    host.run_ok("containerd", &["--config", config, "config", "dump"])
}

fn grpc_address(dump: &str) -> String {
    toml::from_str::<toml::Value>(dump)
        .ok()
        .and_then(|v| v.get("grpc")?.get("address")?.as_str().map(str::to_string))
        .unwrap_or_else(|| "/run/containerd/containerd.sock".into())
}

/// Whether containerd at `address` lists the guestpull snapshotter as loaded.
fn plugin_loaded(host: &Host, address: &str) -> bool {
    let Ok(out) = host.run_ok("ctr", &["--address", address, "plugins", "ls"]) else {
        return false;
    };
    out.lines().any(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.len() >= 3
            && cols[0] == "io.containerd.snapshotter.v1"
            && cols[1] == PLUGIN
            && cols.last() == Some(&"ok")
    })
}

fn lint(dump: &str, line: ContainerdLine) -> Result<Vec<String>, DeployError> {
    let findings = containerd_config::lint(
        dump,
        &LintOptions {
            snapshotter: PLUGIN.into(),
            containerd: Some(line),
        },
    );
    let errors: Vec<String> = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .map(ToString::to_string)
        .collect();
    if !errors.is_empty() {
        return Err(DeployError::Lint(errors.join("\n")));
    }
    Ok(findings
        .iter()
        .filter(|f| f.severity == Severity::Warning)
        .map(ToString::to_string)
        .collect())
}

/// What an install did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// containerd's version.
    pub containerd_version: String,
    /// Handlers on guestpull.
    pub handlers: Vec<String>,
    /// Files written (host paths); empty on a rerun that found everything in place.
    pub written: Vec<String>,
    /// Whether containerd was restarted.
    pub restarted_containerd: bool,
    /// Findings to tell the user (nydus found, handlers skipped, lint warnings).
    pub report: Vec<String>,
}

fn write_config(host: &Host, path: &str, text: Option<&str>) -> Result<bool, DeployError> {
    match text {
        Some(t) => host.write(path, t.as_bytes(), 0o644),
        None => host.remove(path),
    }
}

/// Installs guest pull on the node; idempotent, and a rerun after a kill finishes the job.
pub fn install(opts: &Options) -> Result<Outcome, DeployError> {
    let host = &opts.host;
    let (line, version) = containerd_line(host)?;
    let main = opts.config_path();
    let old = Journal::load(host)?;

    // Plan from the user's config as it was before any install of ours.
    let mut base: BTreeMap<String, Option<String>> = BTreeMap::new();
    if let Some(j) = &old {
        for jf in &j.files {
            base.insert(jf.path.clone(), restored(host, jf)?);
        }
    }
    let files = load_configs(host, &main, &base)?;
    let conf_d = std::path::Path::new(&main)
        .parent()
        .map(|p| format!("{}/conf.d", p.display()))
        .unwrap_or_else(|| "/etc/containerd/conf.d".into());
    let Plan {
        changes,
        mapped,
        mut report,
    } = merge::plan(
        &files,
        &conf_d,
        &Wanted {
            line,
            socket: host.path(std_paths::SOCKET),
            state_root: host.path(std_paths::STATE_ROOT),
            handlers: opts.handlers.clone(),
            migrate_from_nydus: opts.migrate_from_nydus,
            allow_global_snapshotter: opts.allow_global_snapshotter,
            platform: opts.platform.clone(),
        },
    )?;
    for r in &report {
        tracing::info!("{r}");
    }
    if mapped.is_empty() {
        // Nothing would pull in the guest: refuse before touching the node.
        return Err(DeployError::Refused(format!(
            "no runtime handler to put on {PLUGIN}: {}",
            report.join("; ")
        )));
    }

    // Files an earlier install changed that this plan leaves alone go back to their base.
    let mut targets: Vec<(String, Option<String>)> = changes
        .iter()
        .map(|c| (c.path.clone(), Some(c.after.clone())))
        .collect();
    for (p, b) in &base {
        if !changes.iter().any(|c| &c.path == p) {
            targets.push((p.clone(), b.clone()));
        }
    }
    let mut journal = Journal {
        version: 1,
        stage: Stage::Installing,
        containerd_version: version.clone(),
        containerd_config: main.clone(),
        files: changes
            .iter()
            .map(|c| JournaledFile {
                path: c.path.clone(),
                before: c.before.clone(),
                after_sha256: sha(&c.after),
                edits: c.edits.clone(),
            })
            .collect(),
        handlers: mapped.clone(),
        created_dirs: old
            .as_ref()
            .map(|j| j.created_dirs.clone())
            .unwrap_or_default(),
    };
    for (p, t) in &targets {
        if t.is_some() {
            for d in missing_dirs(host, p) {
                if !journal.created_dirs.contains(&d) {
                    journal.created_dirs.push(d);
                }
            }
        }
    }
    // Reverted files stay journaled until the install completes, so a kill in between still
    // knows their originals.
    for (p, b) in &targets {
        if !journal.files.iter().any(|f| &f.path == p) {
            journal.files.push(JournaledFile {
                path: p.clone(),
                before: b.clone(),
                after_sha256: b.as_deref().map(sha).unwrap_or_default(),
                edits: Vec::new(),
            });
        }
    }
    journal.save(host)?;

    let mut written = Vec::new();
    // The snapshotter first: containerd connects to proxy plugins lazily, but the plugin only
    // shows as loaded once the socket answers.
    let mut service_changed = false;
    for b in BINARIES {
        let src = opts.payload_dir.join(b);
        let data = std::fs::read(&src).map_err(|e| DeployError::io(&src, e))?;
        let dst = host.path(&format!("{}/{b}", std_paths::BIN_DIR));
        if host.write(&dst, &data, 0o755)? {
            written.push(dst);
            service_changed = true;
        }
    }
    let cfg = host.path(std_paths::CONFIG);
    if host.write(&cfg, snapshotter_config(host).as_bytes(), 0o644)? {
        written.push(cfg);
        service_changed = true;
    }
    let unit = host.path(&format!("{}/{UNIT}", std_paths::UNIT_DIR));
    if host.write(&unit, unit_text(host).as_bytes(), 0o644)? {
        written.push(unit);
        service_changed = true;
        host.run_ok("systemctl", &["daemon-reload"])?;
    }
    host.run_ok("systemctl", &["enable", UNIT])?;
    let active = host
        .run("systemctl", &["is-active", "--quiet", UNIT])?
        .status
        .success();
    if service_changed || !active {
        host.run_ok("systemctl", &["restart", UNIT])?;
    }
    let sock = host.file(&host.path(std_paths::SOCKET));
    wait(
        &format!("the snapshotter's socket {}", sock.display()),
        opts.timeout,
        || sock.exists(),
    )?;

    let mut config_changed = false;
    for (p, t) in &targets {
        if write_config(host, p, t.as_deref())? {
            written.push(p.clone());
            config_changed = true;
        }
    }
    let merged = match dump(host, &main) {
        Ok(d) => d,
        Err(e) => {
            rollback(host, &changes)?;
            return Err(e);
        }
    };
    match lint(&merged, line) {
        Ok(warnings) => report.extend(warnings),
        Err(e) => {
            rollback(host, &changes)?;
            return Err(e);
        }
    }

    let address = grpc_address(&merged);
    let restart = config_changed || !plugin_loaded(host, &address);
    if restart {
        host.run_ok("systemctl", &["restart", &opts.containerd_unit])?;
        wait(
            &format!("containerd at {address} to load the {PLUGIN} snapshotter"),
            opts.timeout,
            || plugin_loaded(host, &address),
        )?;
    }
    journal.stage = Stage::Installed;
    journal
        .files
        .retain(|f| changes.iter().any(|c| c.path == f.path));
    journal.save(host)?;
    Ok(Outcome {
        containerd_version: version,
        handlers: mapped,
        written,
        restarted_containerd: restart,
        report,
    })
}

/// Ancestors of host file `path` that do not exist yet, deepest first.
fn missing_dirs(host: &Host, path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut dir = std::path::Path::new(path).parent();
    while let Some(d) = dir {
        if d.as_os_str().is_empty() || host.file(&d.to_string_lossy()).exists() {
            break;
        }
        out.push(d.display().to_string());
        dir = d.parent();
    }
    out
}

/// Puts back what the plan changed: each change's `before` is the base it was planned from.
fn rollback(host: &Host, changes: &[merge::FileChange]) -> Result<(), DeployError> {
    for c in changes.iter().rev() {
        write_config(host, &c.path, c.before.as_deref())?;
    }
    Ok(())
}

/// What to remove besides the config changes.
#[derive(Debug, Clone)]
pub struct UninstallOptions {
    /// The node.
    pub host: Host,
    /// containerd's systemd unit.
    pub containerd_unit: String,
    /// Also delete the snapshotter's state directory.
    pub remove_state: bool,
    /// How long to wait for containerd to come back.
    pub timeout: Duration,
}

/// What an uninstall did.
#[derive(Debug, Default)]
pub struct Removed {
    /// Files restored or removed (host paths).
    pub files: Vec<String>,
    /// Whether a journal was found (false: nothing of ours was on the node).
    pub found: bool,
}

/// Reverses [`install`]: configs restored byte for byte (or our edits undone in a file changed
/// since), containerd restarted, the unit and binaries removed; the state only on request.
pub fn uninstall(opts: &UninstallOptions) -> Result<Removed, DeployError> {
    let host = &opts.host;
    let mut out = Removed::default();
    let journal = Journal::load(host)?;
    if let Some(j) = &journal {
        out.found = true;
        let mut changed = false;
        // Reverse order: the `imports` entry goes before the drop-in it names.
        for jf in j.files.iter().rev() {
            let target = restored(host, jf)?;
            if write_config(host, &jf.path, target.as_deref())? {
                out.files.push(jf.path.clone());
                changed = true;
            }
        }
        for d in &j.created_dirs {
            // Only when empty: the user may have put files of their own there since.
            let _ = std::fs::remove_dir(host.file(d));
        }
        if changed {
            let address = dump(host, &j.containerd_config)
                .map(|d| grpc_address(&d))
                .unwrap_or_else(|_| "/run/containerd/containerd.sock".into());
            host.run_ok("systemctl", &["restart", &opts.containerd_unit])?;
            wait(&format!("containerd at {address}"), opts.timeout, || {
                host.run_ok("ctr", &["--address", &address, "version"])
                    .is_ok()
            })?;
        }
    }
    let unit = host.path(&format!("{}/{UNIT}", std_paths::UNIT_DIR));
    if host.read(&unit)?.is_some() {
        host.run_ok("systemctl", &["disable", "--now", UNIT])?;
        host.remove(&unit)?;
        host.run_ok("systemctl", &["daemon-reload"])?;
        out.files.push(unit);
    }
    for b in BINARIES {
        let p = host.path(&format!("{}/{b}", std_paths::BIN_DIR));
        if host.remove(&p)? {
            out.files.push(p);
        }
    }
    let cfg = host.path(std_paths::CONFIG);
    if host.remove(&cfg)? {
        out.files.push(cfg.clone());
    }
    let _ = std::fs::remove_dir(host.file(&host.path("/etc/guestpull")));
    if opts.remove_state {
        for d in [std_paths::STATE_ROOT, "/run/guestpull"] {
            let p = host.file(&host.path(d));
            match std::fs::remove_dir_all(&p) {
                Ok(()) => out.files.push(host.path(d)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(DeployError::io(p, e)),
            }
        }
    }
    // Last: until here a rerun still knows the originals.
    if host.remove(&host.path(std_paths::JOURNAL))? {
        let _ = std::fs::remove_dir(host.file(&host.path("/var/lib/guestpull-deploy")));
    }
    Ok(out)
}
