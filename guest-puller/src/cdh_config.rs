//! CDH's configuration schema (guest-components `CdhConfig` and image-rs `ImageConfig`) inside
//! guest-puller's [`Config`]: the CDH-only sections, how each CDH key maps onto the puller, and
//! the environment a CDH reads (`OCICRYPT_KEYPROVIDER_CONFIG`, `AA_KBC_PARAMS`).

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError};

/// The file name kata-agent starts the CDH as (`/usr/local/bin/confidential-data-hub`).
pub const CDH_BINARY_NAME: &str = "confidential-data-hub";
/// The attestation-agent socket CDH uses when `[aa] aa_socket` is not set.
pub const DEFAULT_AA_SOCKET: &str =
    "unix:///run/confidential-containers/attestation-agent/attestation-agent.sock";
/// Credentials may only be written below this directory (as in CDH).
pub const CREDENTIALS_DIR: &str = "/run/confidential-containers/cdh/kbs";
/// The environment variable naming ocicrypt's keyprovider configuration.
pub const OCICRYPT_KEYPROVIDER_CONFIG_ENV: &str = "OCICRYPT_KEYPROVIDER_CONFIG";
/// The only KBC guest-puller implements: the KBS over RCAR.
pub const CC_KBC: &str = "cc_kbc";

/// CDH `[kbc]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KbcConfig {
    /// KBC name; only `cc_kbc` is implemented.
    pub name: String,
    /// KBS URL; empty = none.
    #[serde(default)]
    pub url: String,
    /// The KBS's CA certificate, inline PEM; empty = none.
    #[serde(default)]
    pub kbs_cert: Option<String>,
}

/// CDH `[aa]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AaConfig {
    /// `unix:///…` socket of the attestation-agent; unset = CDH's default socket.
    pub aa_socket: Option<String>,
}

impl AaConfig {
    /// The socket path the attestation-agent would listen on.
    pub fn socket_path(&self) -> PathBuf {
        let uri = self.aa_socket.as_deref().unwrap_or(DEFAULT_AA_SOCKET);
        PathBuf::from(uri.strip_prefix("unix://").unwrap_or(uri))
    }
}

/// One CDH `[[credentials]]` entry: a KBS resource written to a file at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// `kbs:///<repo>/<type>/<tag>`.
    pub resource_uri: String,
    /// Target file, below [`CREDENTIALS_DIR`].
    pub path: String,
}

/// CDH `[log]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug` or `trace`.
    #[serde(default = "default_log_level")]
    pub level: String,
}

fn default_log_level() -> String {
    "info".into()
}

/// CDH `[image.image_pull_proxy]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Proxy for HTTPS registries.
    pub https_proxy: Option<String>,
    /// Proxy for plain-HTTP registries.
    pub http_proxy: Option<String>,
    /// Hosts reached without a proxy.
    pub no_proxy: Option<String>,
}

fn data_uri(value: &str) -> String {
    // A data: URI, because an inline policy may itself contain "kbs://" key paths, which the
    // resource fetcher would otherwise take for a URI.
    format!("data:;base64,{}", STANDARD.encode(value))
}

/// Whether an inline value is set but its URI twin (set explicitly) wins.
fn shadowed(inline: &Option<String>, uri: &Option<String>) -> bool {
    inline.is_some() && uri.as_deref() != inline.as_deref().map(data_uri).as_deref()
}

impl Config {
    /// Folds CDH's keys into the fields the puller uses; refuses values it cannot honour.
    pub(crate) fn normalize(&mut self) -> Result<(), ConfigError> {
        if let Some(kbc) = &self.kbc {
            if kbc.name != CC_KBC {
                return Err(ConfigError::Invalid(format!(
                    "[kbc] name = {:?} is not supported: guest-puller implements {CC_KBC} (a KBS over RCAR) only",
                    kbc.name
                )));
            }
            if !kbc.url.is_empty() {
                match &self.kbs.url {
                    Some(u) if u != &kbc.url => {
                        return Err(ConfigError::Invalid(format!(
                            "[kbc] url {:?} and [kbs] url {u:?} disagree; set one",
                            kbc.url
                        )))
                    }
                    _ => self.kbs.url = Some(kbc.url.clone()),
                }
            }
            if let Some(pem) = kbc.kbs_cert.as_ref().filter(|p| !p.trim().is_empty()) {
                if self.kbs.cert.is_some() || self.kbs.cert_pem.as_ref().is_some_and(|p| p != pem) {
                    return Err(ConfigError::Invalid(
                        "[kbc] kbs_cert and [kbs] cert/cert_pem are both set; set one".into(),
                    ));
                }
                self.kbs.cert_pem = Some(pem.clone());
            }
        }
        if self.kbs.cert.is_some() && self.kbs.cert_pem.is_some() {
            return Err(ConfigError::Invalid(
                "[kbs] cert and cert_pem are both set; set one".into(),
            ));
        }
        if let Some(s) = &self.socket {
            if !self.server.listen.is_empty() && self.server.listen != [s.clone()] {
                return Err(ConfigError::Invalid(
                    "socket and [server] listen are both set; set one".into(),
                ));
            }
            self.server.listen = vec![s.clone()];
        }
        // As in CDH: the URI wins when both are given.
        let img = &mut self.image;
        if img.image_security_policy_uri.is_none() {
            img.image_security_policy_uri = img.image_security_policy.as_deref().map(data_uri);
        }
        if img.sigstore_config_uri.is_none() {
            img.sigstore_config_uri = img.sigstore_config.as_deref().map(data_uri);
        }
        if let Some(p) = &img.image_pull_proxy {
            crate::proxy::PullProxy::from_config(p).map_err(ConfigError::Invalid)?;
        }
        Ok(())
    }

    /// CDH keys present in this configuration that guest-puller accepts but does not act on.
    pub fn unimplemented_keys(&self) -> Vec<&'static str> {
        let img = &self.image;
        let search = img
            .registry_config
            .as_ref()
            .and_then(|r| r.unqualified_search_registries.as_ref());
        [
            (
                search.is_some_and(|s| s.iter().map(String::as_str).ne(["docker.io"])),
                "[image.registry_config] unqualified-search-registries (short names resolve on docker.io)",
            ),
            (
                shadowed(&img.image_security_policy, &img.image_security_policy_uri),
                "[image] image_security_policy (image_security_policy_uri takes priority, as in CDH)",
            ),
            (
                shadowed(&img.sigstore_config, &img.sigstore_config_uri),
                "[image] sigstore_config (sigstore_config_uri takes priority, as in CDH)",
            ),
            (img.kbc.is_some(), "[image] kbc (image-rs keywrap-native only)"),
            (
                img.kbs_uri.is_some(),
                "[image] kbs_uri (image-rs keywrap-native only)",
            ),
        ]
        .into_iter()
        .filter_map(|(set, key)| set.then_some(key))
        .collect()
    }

    /// The tracing filter `[log] level` asks for.
    pub fn log_filter(&self) -> Option<&str> {
        self.log.as_ref().map(|l| l.level.as_str())
    }

    /// CDH's fallback without a config file: the KBS from `AA_KBC_PARAMS` (environment) or
    /// `agent.aa_kbc_params` (kernel command line), `cc_kbc::<url>`.
    pub fn apply_aa_kbc_params(
        &mut self,
        env: Option<&str>,
        cmdline: &str,
    ) -> Result<(), ConfigError> {
        let params = env.map(str::to_string).or_else(|| {
            cmdline
                .split_ascii_whitespace()
                .find_map(|p| p.strip_prefix("agent.aa_kbc_params="))
                .map(str::to_string)
        });
        let Some(params) = params else {
            return Ok(());
        };
        let (name, url) = params.split_once("::").ok_or_else(|| {
            ConfigError::Invalid(format!("aa_kbc_params {params:?}: want <kbc>::<url>"))
        })?;
        self.kbc = Some(KbcConfig {
            name: name.to_string(),
            url: url.to_string(),
            kbs_cert: None,
        });
        self.normalize()
    }
}

/// Where a `[[credentials]]` entry may be written: an absolute path strictly below `base`,
/// without `.`/`..` components (CDH refuses the same paths).
pub fn credential_target(path: &str, base: &Path) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!("credential path {path:?} is not absolute"));
    }
    // On the text: Path::components drops inner `.` components.
    if path.split('/').any(|c| c == "." || c == "..") {
        return Err(format!("credential path {path:?} contains . or .."));
    }
    match p.strip_prefix(base) {
        Ok(rest) if !rest.as_os_str().is_empty() => Ok(p.to_path_buf()),
        _ => Err(format!(
            "credential path {path:?} is outside {}",
            base.display()
        )),
    }
}

/// The keyprovider names an ocicrypt keyprovider configuration lists (`{"key-providers": {…}}`).
///
/// kata-agent always passes `OCICRYPT_KEYPROVIDER_CONFIG`, also to guest images without the
/// file, so a missing file lists nothing.
pub fn ocicrypt_provider_names(path: &Path) -> Result<Vec<String>, ConfigError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    #[derive(Deserialize)]
    struct OcicryptConfig {
        #[serde(rename = "key-providers", default)]
        key_providers: std::collections::BTreeMap<String, serde_json::Value>,
    }
    let cfg: OcicryptConfig = serde_json::from_slice(&text).map_err(|e| {
        ConfigError::Invalid(format!(
            "{OCICRYPT_KEYPROVIDER_CONFIG_ENV} file {}: {e}",
            path.display()
        ))
    })?;
    Ok(cfg.key_providers.into_keys().collect())
}

#[cfg(test)]
mod tests;
