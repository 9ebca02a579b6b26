//! What the puller does before it serves, as a CDH does when kata-agent starts it: read the pod's
//! initdata, pick the evidence source (a running attestation-agent, which also measures each
//! pulled image, else the built-in attesters, which must find the initdata digest in the TEE's
//! launch register), honour `OCICRYPT_KEYPROVIDER_CONFIG`, and write `[[credentials]]`.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use kbs_client::attester::{self, EvidenceProvider, InitDataBinding};
use tracing::{info, warn};

use crate::aa::AttestationAgent;
use crate::cdh_config::{self, Credential};
use crate::config::{Config, ConfigError};
use crate::fetcher::KbsResourceFetcher;
use crate::initdata::{Initdata, InitdataError};
use crate::resource::{ResourceError, ResourceFetcher};

/// Why the puller refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The configuration or a file it names is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The initdata is unreadable or invalid.
    #[error(transparent)]
    Initdata(#[from] InitdataError),
    /// The initdata is not the one the TEE was launched with, or the check failed.
    #[error("initdata {path} does not bind to this TEE: {source}")]
    Binding {
        /// The initdata file.
        path: String,
        /// The attester's error (names both digests on a mismatch).
        source: kbs_client::Error,
    },
    /// A socket exists at `[aa] aa_socket` but no usable attestation-agent answers there.
    #[error("attestation-agent: {0}")]
    AttestationAgent(kbs_client::Error),
    /// The KBS client could not be built, or a credential could not be fetched.
    #[error(transparent)]
    Resource(#[from] ResourceError),
    /// A credential's target is refused or cannot be written.
    #[error("credential {path}: {reason}")]
    Credential {
        /// The configured target.
        path: String,
        /// Why.
        reason: String,
    },
}

/// What the puller serves with: the resource fetcher and, when one runs, the attestation-agent.
pub struct Prepared {
    /// Resources, with the pod's initdata and the evidence source bound in.
    pub fetcher: Arc<KbsResourceFetcher>,
    /// The attestation-agent at `[aa] aa_socket` (evidence, and the `PullImage` measurement).
    pub aa: Option<Arc<AttestationAgent>>,
}

/// The resource fetcher for `cfg`, with the pod's initdata and the evidence source bound in,
/// and the attestation-agent when its socket exists; also adds the keyprovider names of
/// `OCICRYPT_KEYPROVIDER_CONFIG` to `cfg`.
pub async fn prepare(cfg: &mut Config) -> Result<Prepared, StartupError> {
    let initdata = Initdata::load(&cfg.initdata.path)?;
    let aa_socket = cfg.aa.socket_path();
    let aa = if aa_socket.exists() {
        let aa = AttestationAgent::connect(&aa_socket)
            .await
            .map_err(StartupError::AttestationAgent)?;
        info!(socket = %aa_socket.display(), "evidence from the attestation-agent; pulled images are measured through it");
        if let Some(i) = &initdata {
            // kata-agent hands the initdata to the AA (--initdata-toml), which binds it.
            info!(path = %i.path.display(), digest = %i.digest_hex(), "initdata: bound by the attestation-agent; sent to the KBS");
        }
        Some(Arc::new(aa))
    } else {
        info!(socket = %aa_socket.display(), "no attestation-agent: built-in attesters; pulled images are not measured");
        if let Some(i) = &initdata {
            check_binding(i).await?;
        }
        None
    };
    let evidence = aa.clone().map(|a| -> Arc<dyn EvidenceProvider> { a });
    if let Some(path) = std::env::var_os(cdh_config::OCICRYPT_KEYPROVIDER_CONFIG_ENV) {
        let names = cdh_config::ocicrypt_provider_names(Path::new(&path))?;
        info!(config = %Path::new(&path).display(), providers = ?names, "ocicrypt keyprovider names unwrapped through the KBS");
        for n in names {
            if !cfg.keys.providers.contains(&n) {
                cfg.keys.providers.push(n);
            }
        }
    }
    let fetcher = Arc::new(KbsResourceFetcher::with_attestation(
        &cfg.kbs,
        initdata.map(|i| i.text),
        evidence,
    )?);
    Ok(Prepared { fetcher, aa })
}

/// With a built-in attester: the digest must be in the launch register (TDX MRCONFIGID, SNP
/// HOSTDATA); where there is none (sample), only the KBS can check it.
async fn check_binding(i: &Initdata) -> Result<(), StartupError> {
    let paths = kbs_client::HardwarePaths::default();
    let tee = attester::detect(&paths, None);
    match attester::check_init_data(tee, &paths, &i.digest).await {
        Ok(InitDataBinding::Verified { register }) => {
            info!(path = %i.path.display(), digest = %i.digest_hex(), %tee, register, "initdata digest matches the TEE's launch register");
            Ok(())
        }
        Ok(InitDataBinding::NotBound(why)) => {
            warn!(path = %i.path.display(), digest = %i.digest_hex(), %tee, "initdata not checked in the guest: {why}");
            Ok(())
        }
        Err(source) => Err(StartupError::Binding {
            path: i.path.display().to_string(),
            source,
        }),
    }
}

/// Fetches each credential and writes it below `base` (mode 0600, complete or not at all).
pub async fn write_credentials(
    creds: &[Credential],
    fetcher: &dyn ResourceFetcher,
    base: &Path,
) -> Result<(), StartupError> {
    for c in creds {
        let fail = |reason: String| StartupError::Credential {
            path: c.path.clone(),
            reason,
        };
        let target = cdh_config::credential_target(&c.path, base).map_err(fail)?;
        if !c.resource_uri.starts_with("kbs://") && !c.resource_uri.starts_with("kbs+") {
            return Err(fail(format!(
                "resource_uri {:?} is not a kbs:// URI",
                c.resource_uri
            )));
        }
        let data = fetcher.fetch(&c.resource_uri).await?;
        let dir = target.parent().expect("below base, so it has a parent");
        std::fs::create_dir_all(dir)
            .map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            target.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                f.write_all(&data)?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &target));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(format!("writing: {e}")));
        }
        info!(resource = %c.resource_uri, path = %target.display(), "credential written");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    struct Fixed;

    #[async_trait::async_trait]
    impl ResourceFetcher for Fixed {
        async fn fetch(&self, uri: &str) -> Result<Zeroizing<Vec<u8>>, ResourceError> {
            match uri {
                "kbs:///default/app/token" => Ok(Zeroizing::new(b"s3cret".to_vec())),
                _ => Err(ResourceError::NotFound {
                    uri: uri.into(),
                    reason: "no such resource".into(),
                }),
            }
        }
    }

    fn cred(uri: &str, path: &Path) -> Credential {
        Credential {
            resource_uri: uri.into(),
            path: path.display().to_string(),
        }
    }

    #[tokio::test]
    async fn credentials_are_written_below_the_base_only() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("cdh/kbs");
        let target = base.join("app/token");
        write_credentials(&[cred("kbs:///default/app/token", &target)], &Fixed, &base)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"s3cret");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let outside = d.path().join("etc/passwd");
        let e = write_credentials(&[cred("kbs:///default/app/token", &outside)], &Fixed, &base)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside"), "{e}");
        assert!(!outside.exists());
        let e = write_credentials(
            &[cred("file:///etc/hostname", &base.join("h"))],
            &Fixed,
            &base,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a kbs:// URI"), "{e}");
        // A failed fetch leaves nothing behind.
        let missing = base.join("app/missing");
        assert!(write_credentials(
            &[cred("kbs:///default/app/missing", &missing)],
            &Fixed,
            &base
        )
        .await
        .is_err());
        let left: Vec<_> = std::fs::read_dir(base.join("app")).unwrap().collect();
        assert_eq!(left.len(), 1, "only the token: {left:?}");
    }

    #[tokio::test]
    async fn invalid_initdata_refuses_to_start() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("initdata.toml");
        std::fs::write(&p, "version = \"9\"\nalgorithm = \"sha256\"\n").unwrap();
        let mut cfg = Config::default();
        cfg.initdata.path = p;
        cfg.aa.aa_socket = Some(format!("unix://{}/aa.sock", d.path().display()));
        let Err(e) = prepare(&mut cfg).await else {
            panic!("initdata version 9 accepted");
        };
        assert!(e.to_string().contains("version"), "{e}");
    }
}
