//! Puller configuration (TOML). One type reads both guest-puller's own format and CDH's config
//! (`cdh.toml` as kata-agent hands it over): CDH's keys are part of the schema and
//! [`Config::normalize`] folds them into the fields the puller uses (see [`crate::cdh_config`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cdh_config::{AaConfig, Credential, KbcConfig, LogConfig, ProxyConfig};

/// Default directory holding the layer store and the per-container overlay dirs.
pub const DEFAULT_WORK_DIR: &str = "/run/kata-containers/image";
/// Default unix socket of the CDH-compatible ttrpc server (the one kata-agent dials).
pub use cdh_api::DEFAULT_SOCKET;

/// Why a configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("parsing config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Top-level configuration of the guest puller.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Image pulling settings (CDH `[image]`).
    pub image: ImageConfig,
    /// Key Broker Service settings (CDH `[kbc]`).
    pub kbs: KbsConfig,
    /// ttrpc server settings.
    pub server: ServerConfig,
    /// Layer decryption keys.
    pub keys: KeysConfig,
    /// Where kata-agent leaves the pod's initdata.
    pub initdata: InitdataConfig,
    /// CDH: the ttrpc address (`unix:///…`); same as `[server] listen = [socket]`.
    pub socket: Option<ListenAddr>,
    /// CDH `[kbc]`: `name` (`cc_kbc`), `url`, `kbs_cert` (inline PEM); folded into `[kbs]`.
    pub kbc: Option<KbcConfig>,
    /// CDH `[aa]`: the attestation-agent socket used for evidence when it runs.
    pub aa: AaConfig,
    /// CDH `[[credentials]]`: KBS resources written to files at start.
    pub credentials: Vec<Credential>,
    /// CDH: skips the JWS check of sealed secrets (development only).
    pub skip_sealed_secret_verification: Option<bool>,
    /// CDH `[log]`: the log level when `GUEST_PULLER_LOG` is unset.
    pub log: Option<LogConfig>,
}

/// Default location of the initdata TOML kata-agent writes (its `INITDATA_TOML_PATH`).
pub const DEFAULT_INITDATA_TOML: &str = "/run/confidential-containers/initdata/initdata.toml";

/// `[initdata]` (guest-puller only).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InitdataConfig {
    /// The initdata TOML; when the file does not exist the pod has no initdata.
    pub path: PathBuf,
}

impl Default for InitdataConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from(DEFAULT_INITDATA_TOML),
        }
    }
}

/// CDH `[image]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageConfig {
    /// Root of the layer store, staging and overlay directories.
    pub work_dir: PathBuf,
    /// URI (`kbs:///…`, `file://…`, `data:` or inline JSON) of a containers-policy.json; unset = no verification.
    pub image_security_policy_uri: Option<String>,
    /// CDH: the policy itself (e.g. from initdata); used when `image_security_policy_uri` is unset.
    pub image_security_policy: Option<String>,
    /// URI of a registries.d-style YAML naming signature lookaside locations.
    pub sigstore_config_uri: Option<String>,
    /// CDH: the sigstore configuration itself; used when `sigstore_config_uri` is unset.
    pub sigstore_config: Option<String>,
    /// URI of a docker `auth.json` with registry credentials.
    pub authenticated_registry_credentials_uri: Option<String>,
    /// URI of a TOML registry configuration (same shape as `[image.registry_config]`).
    pub registry_configuration_uri: Option<String>,
    /// Inline registry configuration (mirrors, plain-HTTP registries).
    pub registry_config: Option<RegistryConfig>,
    /// How many layers of one image are fetched at once.
    pub max_concurrent_layer_downloads_per_image: usize,
    /// Extra root certificates trusted for registries: inline PEM (as in CDH) or file paths.
    pub extra_root_certificates: Vec<String>,
    /// CDH `[image.image_pull_proxy]` (`https_proxy`, `http_proxy`, `no_proxy`).
    pub image_pull_proxy: Option<ProxyConfig>,
    /// CDH (image-rs `keywrap-native` builds only): the KBC name for layer keys; ignored.
    pub kbc: Option<String>,
    /// CDH (image-rs `keywrap-native` builds only): the KBS URI for layer keys; ignored.
    pub kbs_uri: Option<String>,
    /// Attempts per HTTP request on 5xx or broken connections.
    pub max_retries: u32,
    /// Deadline in seconds of one manifest, index, config or signature fetch, retries included.
    pub registry_request_timeout_secs: u64,
    /// A layer download fails after this many seconds without a byte (across resumed attempts).
    pub registry_stall_timeout_secs: u64,
    /// Nydus (RAFS v6) images are normally mounted lazily (chunks fetched on first read);
    /// with this set, every chunk is fetched and verified before PullImage returns.
    pub force_eager: bool,
    /// After a nydus image is mounted lazily, fetch the rest of it in the background.
    pub lazy_prefetch: bool,
    /// Directories bundles must live strictly below (kata-agent uses `/run/kata-containers/<cid>`).
    pub bundle_roots: Vec<PathBuf>,
    /// Most bytes one image's new layers may unpack to (the tar streams); unset = the free
    /// space of the work dir when the pull starts, which always bounds it too.
    pub max_unpacked_image_size: Option<u64>,
    /// Most layers an image may have (at most 500, overlayfs' limit; the overlay mount options
    /// must also fit a page, which with the default work dir holds about 37 layer paths).
    pub max_layers: usize,
    /// `[image.node_cache]`: the node-local blob cache shared with other guests on the host.
    pub node_cache: crate::node_cache::NodeCacheConfig,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            work_dir: PathBuf::from(DEFAULT_WORK_DIR),
            image_security_policy_uri: None,
            image_security_policy: None,
            sigstore_config_uri: None,
            sigstore_config: None,
            authenticated_registry_credentials_uri: None,
            registry_configuration_uri: None,
            registry_config: None,
            max_concurrent_layer_downloads_per_image: 3,
            extra_root_certificates: Vec::new(),
            image_pull_proxy: None,
            kbc: None,
            kbs_uri: None,
            max_retries: 5,
            registry_request_timeout_secs: 60,
            registry_stall_timeout_secs: 30,
            force_eager: false,
            lazy_prefetch: false,
            bundle_roots: vec![PathBuf::from(crate::bundles::DEFAULT_BUNDLE_ROOT)],
            max_unpacked_image_size: None,
            max_layers: crate::bundle::OVERLAY_MAX_LOWER,
            node_cache: Default::default(),
        }
    }
}

impl ImageConfig {
    /// The extra root certificates as PEM: inline entries as they are, others read from files.
    pub fn extra_root_pems(&self) -> Result<Vec<Vec<u8>>, ConfigError> {
        self.extra_root_certificates
            .iter()
            .map(|c| {
                if c.contains("-----BEGIN") {
                    Ok(c.as_bytes().to_vec())
                } else {
                    std::fs::read(c).map_err(|source| ConfigError::Read {
                        path: PathBuf::from(c),
                        source,
                    })
                }
            })
            .collect()
    }
}

/// registries.conf-like registry settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Registries (host[:port]) reached over plain HTTP instead of HTTPS.
    pub insecure_registries: Vec<String>,
    /// Per-prefix rules: remapped location and mirrors tried first.
    pub registry: Vec<RegistryRule>,
    /// CDH (containers-registries.conf): registries tried for short names. guest-puller
    /// resolves short names on docker.io only, so other values are reported and ignored.
    #[serde(rename = "unqualified-search-registries")]
    pub unqualified_search_registries: Option<Vec<String>>,
}

/// One `[[registry]]` rule.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryRule {
    /// Reference prefix this rule applies to (`registry[/namespace]`).
    pub prefix: String,
    /// Where the prefix really lives (replaces the prefix); empty = unchanged.
    pub location: String,
    /// Plain HTTP for `location`.
    pub insecure: bool,
    /// Refuse pulls matching this prefix.
    pub blocked: bool,
    /// Mirrors tried in order before `location`.
    pub mirror: Vec<RegistryMirror>,
}

/// A mirror of a registry rule.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryMirror {
    /// Replacement for the rule's prefix.
    pub location: String,
    /// Plain HTTP for this mirror.
    pub insecure: bool,
}

/// KBS connection settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KbsConfig {
    /// KBS base URL, e.g. `https://kbs.example:8080`; unset = `kbs://` URIs fail.
    pub url: Option<String>,
    /// PEM file of a CA trusted for the KBS.
    pub cert: Option<PathBuf>,
    /// Deadline of one KBS request in seconds, retries included (kbs-client default: 60).
    pub request_timeout_secs: Option<u64>,
    /// Largest KBS response body accepted, in bytes (kbs-client default: 4 MiB).
    pub max_response_bytes: Option<usize>,
    /// The CA itself, inline PEM (CDH's `[kbc] kbs_cert`).
    pub cert_pem: Option<String>,
}

/// ttrpc server settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Unix socket path the ttrpc server listens on when `listen` is empty (the CDH socket kata-agent dials).
    pub socket: PathBuf,
    /// Addresses to listen on instead of `socket`: `unix:///path` (or a bare absolute path) and
    /// `vsock://<cid>:<port>` with `-1` or `any` as the CID for every CID of the guest.
    pub listen: Vec<ListenAddr>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            listen: Vec::new(),
        }
    }
}

impl ServerConfig {
    /// Every address the server listens on: `listen`, or `socket` when `listen` is empty.
    pub fn addresses(&self) -> Vec<ListenAddr> {
        if self.listen.is_empty() {
            vec![ListenAddr::Unix(self.socket.clone())]
        } else {
            self.listen.clone()
        }
    }
}

/// `VMADDR_CID_ANY`: a vsock listener bound to it accepts connections to any of the guest's CIDs.
pub const VSOCK_CID_ANY: u32 = u32::MAX;

/// One address the ttrpc server listens on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ListenAddr {
    /// A unix socket at this absolute path.
    Unix(PathBuf),
    /// An AF_VSOCK listener (how a host reaches a VM guest without networking).
    Vsock {
        /// Local CID to bind ([`VSOCK_CID_ANY`] for all).
        cid: u32,
        /// vsock port.
        port: u32,
    },
}

impl ListenAddr {
    /// The address in ttrpc's `unix://…` / `vsock://cid:port` form (`-1` for any CID).
    pub fn ttrpc_uri(&self) -> String {
        match self {
            ListenAddr::Unix(p) => format!("unix://{}", p.display()),
            ListenAddr::Vsock { cid, port } if *cid == VSOCK_CID_ANY => {
                format!("vsock://-1:{port}")
            }
            ListenAddr::Vsock { cid, port } => format!("vsock://{cid}:{port}"),
        }
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.ttrpc_uri())
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| {
            ConfigError::Invalid(format!(
                "listen address {s:?}: {why} (want unix:///abs/path, /abs/path or vsock://<cid|-1|any>:<port>)"
            ))
        };
        if let Some(rest) = s.strip_prefix("vsock://") {
            let (cid, port) = rest.split_once(':').ok_or_else(|| bad("no port"))?;
            let cid = match cid {
                "-1" | "any" => VSOCK_CID_ANY,
                c => c.parse().map_err(|_| bad("the CID is not a number"))?,
            };
            let port = port
                .parse()
                .map_err(|_| bad("the port is not a 32-bit number"))?;
            return Ok(ListenAddr::Vsock { cid, port });
        }
        let path = s.strip_prefix("unix://").unwrap_or(s);
        if path.is_empty() {
            return Err(bad("empty path"));
        }
        if !Path::new(path).is_absolute() {
            return Err(bad("the unix socket path must be absolute"));
        }
        Ok(ListenAddr::Unix(PathBuf::from(path)))
    }
}

impl TryFrom<String> for ListenAddr {
    type Error = ConfigError;

    fn try_from(s: String) -> Result<Self, ConfigError> {
        s.parse()
    }
}

impl From<ListenAddr> for String {
    fn from(a: ListenAddr) -> String {
        a.ttrpc_uri()
    }
}

/// Private keys for JWE-wrapped layer keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// PEM/DER private keys (RSA or EC): file paths, `file://` or `kbs:///` URIs.
    pub jwe_private_keys: Vec<String>,
    /// Provider names (after `org.opencontainers.image.enc.keys.provider.`) unwrapped via the KBS.
    pub providers: Vec<String>,
    /// Seconds a fetched JWE private key is reused before it is fetched again (0: for every
    /// layer), so a key revoked in the KBS stops decrypting new images.
    pub jwe_key_cache_secs: u64,
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self {
            jwe_private_keys: Vec::new(),
            providers: Vec::new(),
            jwe_key_cache_secs: crate::decrypt::DEFAULT_KEY_LIFETIME.as_secs(),
        }
    }
}

impl Config {
    /// Reads and validates a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses a TOML string (for tests and inline use).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::parse(text, Path::new("<inline>"))
    }

    /// Either format: unknown keys fail with the key and its line (serde's `deny_unknown_fields`).
    fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        cfg.normalize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects values that would make the puller misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.image.max_concurrent_layer_downloads_per_image == 0 {
            return Err(ConfigError::Invalid(
                "image.max_concurrent_layer_downloads_per_image must be at least 1".into(),
            ));
        }
        if !self.image.work_dir.is_absolute() {
            return Err(ConfigError::Invalid(format!(
                "image.work_dir {} must be absolute",
                self.image.work_dir.display()
            )));
        }
        if self.image.bundle_roots.is_empty() {
            return Err(ConfigError::Invalid(
                "image.bundle_roots must name at least one directory".into(),
            ));
        }
        for r in &self.image.bundle_roots {
            let clean = r.is_absolute()
                && r.components().all(|c| {
                    matches!(
                        c,
                        std::path::Component::RootDir | std::path::Component::Normal(_)
                    )
                });
            if !clean || r.as_os_str().len() > 1 && r.as_os_str().as_encoded_bytes().ends_with(b"/")
            {
                return Err(ConfigError::Invalid(format!(
                    "image.bundle_roots entry {} must be an absolute path without `.` or `..`",
                    r.display()
                )));
            }
        }
        if !(1..=crate::bundle::OVERLAY_MAX_LOWER).contains(&self.image.max_layers) {
            return Err(ConfigError::Invalid(format!(
                "image.max_layers must be between 1 and {} (overlayfs' limit)",
                crate::bundle::OVERLAY_MAX_LOWER
            )));
        }
        self.image.node_cache.validate()
    }

    /// Provider annotation suffixes accepted for KBS-unwrapped keys: always `attestation-agent`
    /// (CoCo's coco_keyprovider) and `guestpull` (our `guestpull-keyprovider`), plus any configured.
    pub fn provider_names(&self) -> Vec<String> {
        let mut names = vec!["attestation-agent".to_string(), "guestpull".to_string()];
        for p in &self.keys.providers {
            if !names.contains(p) {
                names.push(p.clone());
            }
        }
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_cdh() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.image.work_dir, PathBuf::from(DEFAULT_WORK_DIR));
        assert_eq!(c.server.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.image.max_concurrent_layer_downloads_per_image, 3);
        assert!(!c.image.force_eager && !c.image.lazy_prefetch);
    }

    #[test]
    fn full_config_parses() {
        let c = Config::from_toml(
            r#"
            [image]
            work_dir = "/tmp/w"
            image_security_policy_uri = "kbs:///default/security-policy/test"
            max_concurrent_layer_downloads_per_image = 5
            force_eager = true
            lazy_prefetch = true
            [image.registry_config]
            insecure_registries = ["127.0.0.1:5000"]
            [[image.registry_config.registry]]
            prefix = "docker.io/library"
            location = "mirror.local/library"
            [[image.registry_config.registry.mirror]]
            location = "127.0.0.1:5000/lib"
            insecure = true
            [kbs]
            url = "http://127.0.0.1:8080"
            [keys]
            jwe_private_keys = ["/etc/keys/a.pem", "kbs:///default/key/jwe"]
            providers = ["labkp"]
            "#,
        )
        .unwrap();
        assert_eq!(c.image.max_concurrent_layer_downloads_per_image, 5);
        assert!(c.image.force_eager && c.image.lazy_prefetch);
        let rc = c.image.registry_config.unwrap();
        assert_eq!(rc.registry[0].mirror[0].location, "127.0.0.1:5000/lib");
        assert_eq!(c.keys.jwe_private_keys.len(), 2);
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        assert!(Config::from_toml("[image]\nbogus = 1").is_err());
        assert!(
            Config::from_toml("[image]\nmax_concurrent_layer_downloads_per_image = 0").is_err()
        );
        assert!(Config::from_toml("[image]\nwork_dir = \"rel\"").is_err());
        for bad in [
            "bundle_roots = []",
            "bundle_roots = [\"rel\"]",
            "bundle_roots = [\"/run/../etc\"]",
            "max_layers = 0",
            "max_layers = 501",
        ] {
            assert!(
                Config::from_toml(&format!("[image]\n{bad}")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn limits_and_bundle_roots_have_kata_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(
            c.image.bundle_roots,
            [PathBuf::from("/run/kata-containers")]
        );
        assert_eq!(c.image.max_layers, 500);
        assert_eq!(c.image.max_unpacked_image_size, None);
        let c = Config::from_toml(
            "[image]\nbundle_roots = [\"/a\", \"/b/c\"]\nmax_layers = 40\nmax_unpacked_image_size = 1048576",
        )
        .unwrap();
        assert_eq!(c.image.bundle_roots.len(), 2);
        assert_eq!(c.image.max_layers, 40);
        assert_eq!(c.image.max_unpacked_image_size, Some(1 << 20));
    }

    #[test]
    fn listen_addresses_parse_and_default_to_the_socket() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(
            c.server.addresses(),
            vec![ListenAddr::Unix(PathBuf::from(DEFAULT_SOCKET))]
        );
        let c = Config::from_toml(
            "[server]\nsocket = \"/x/unused.sock\"\n\
             listen = [\"vsock://-1:1024\", \"unix:///run/a.sock\", \"/run/b.sock\", \"vsock://3:5\", \"vsock://any:7\"]",
        )
        .unwrap();
        assert_eq!(
            c.server.addresses(),
            vec![
                ListenAddr::Vsock {
                    cid: VSOCK_CID_ANY,
                    port: 1024
                },
                ListenAddr::Unix(PathBuf::from("/run/a.sock")),
                ListenAddr::Unix(PathBuf::from("/run/b.sock")),
                ListenAddr::Vsock { cid: 3, port: 5 },
                ListenAddr::Vsock {
                    cid: VSOCK_CID_ANY,
                    port: 7
                },
            ]
        );
        let uris: Vec<String> = c.server.addresses().iter().map(|a| a.ttrpc_uri()).collect();
        assert_eq!(
            uris,
            [
                "vsock://-1:1024",
                "unix:///run/a.sock",
                "unix:///run/b.sock",
                "vsock://3:5",
                "vsock://-1:7"
            ]
        );
        // Round trip through TOML keeps the form ttrpc binds.
        let back = Config::from_toml(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back.server.addresses(), c.server.addresses());
    }

    #[test]
    fn bad_listen_addresses_are_rejected_with_the_reason() {
        for (addr, why) in [
            ("vsock://1024", "no port"),
            ("vsock://x:1", "CID"),
            ("vsock://-1:port", "port"),
            ("vsock://-1:99999999999", "port"),
            ("rel/cdh.sock", "absolute"),
            ("unix://", "empty"),
            ("tcp://127.0.0.1:1", "absolute"),
        ] {
            let err = addr.parse::<ListenAddr>().unwrap_err().to_string();
            assert!(err.contains(why), "{addr}: {err}");
            let toml = format!("[server]\nlisten = [\"{addr}\"]");
            assert!(Config::from_toml(&toml).is_err(), "{addr} accepted in TOML");
        }
    }
}
