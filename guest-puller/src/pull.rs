//! The puller: resolve → policy check (every pull) → layers (parallel, deduplicated) → bundle.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::stream::{self, StreamExt, TryStreamExt};
use oci_client::Reference;
#[cfg(feature = "lazy")]
use tracing::error;
use tracing::{info, warn};

use crate::bundle::{self, BundleError, ImageConfig};
use crate::bundles::{BundleLock, BundleRecord, Bundles};
use crate::config::{Config, RegistryConfig};
use crate::decrypt::{self, DecryptError, KeyUnwrapper};
use crate::layer::{LayerError, LayerSpec, LayerStore, LayerTimings, UnpackBudget};
use crate::lazy::{self, LazyError, NydusManifest};
use crate::node_cache::{Lookup, NodeCache};
use crate::policy::{CosignSignature, PolicyError, PolicyEvaluator, SignatureSource};
use crate::registry::{RegistryClient, RegistryError, ResolvedImage};
use crate::resource::{ResourceError, ResourceFetcher};

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// Bad request (reference, bundle path).
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// Configuration or a configured resource is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// A configured resource (policy, credentials) could not be fetched.
    #[error(transparent)]
    Resource(#[from] ResourceError),
    /// Registry failure.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The signature policy refused the image or could not be evaluated.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Layer keys could not be obtained.
    #[error(transparent)]
    Decrypt(#[from] DecryptError),
    /// A layer failed to download, verify or unpack.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// The bundle could not be created.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// A lazily pulled (nydus) image could not be mounted; its kind says why, as for eager pulls.
    #[error(transparent)]
    Lazy(#[from] LazyError),
}

/// One layer of a pulled image.
#[derive(Debug, Clone)]
pub struct PulledLayer {
    /// Blob digest from the manifest.
    pub digest: String,
    /// Uncompressed digest from the config.
    pub diff_id: String,
    /// Unpacked directory in the layer store.
    pub path: PathBuf,
    /// True when the layer was already in the store.
    pub cached: bool,
    /// Where the time of the layer's fetch and unpack went (`None` when cached).
    pub timings: Option<LayerTimings>,
}

/// Result of [`Puller::pull_image`].
#[derive(Debug, Clone)]
pub struct PullResult {
    /// Digest of the platform image manifest.
    pub manifest_digest: String,
    /// Digest of the image index, if the reference named one.
    pub list_digest: Option<String>,
    /// Digest of the image config.
    pub config_digest: String,
    /// Where the image was fetched from (a mirror or the original), pinned by digest.
    pub source: String,
    /// Layers, bottom first (empty for a lazily pulled image: nothing is in the layer store).
    pub layers: Vec<PulledLayer>,
    /// True when the rootfs is a lazily fetched nydus image.
    pub lazy: bool,
    /// The bundle directory (rootfs at `bundle/rootfs`, spec at `bundle/config.json`).
    pub bundle: PathBuf,
}

/// Pulls images into bundles; cheap to share (`Arc`) across concurrent pulls.
pub struct Puller {
    cfg: Config,
    registry: Arc<RegistryClient>,
    store: Arc<LayerStore>,
    bundles: Arc<Bundles>,
    unwrapper: KeyUnwrapper,
    fetcher: Arc<dyn ResourceFetcher>,
    /// The node's blob cache, when configured and sharing is on.
    node_cache: Option<NodeCache>,
    /// Held shared by every pull and bundle removal, exclusively while something is mounted
    /// over the work dir: a pull never sees its layers, staging or bundle dirs vanish under it.
    work_dir_gate: Arc<tokio::sync::RwLock<()>>,
    /// Keeps lazy mounts across restarts, once [`Puller::resume_lazy_mounts`] set it.
    #[cfg(feature = "lazy")]
    holder: std::sync::OnceLock<Arc<lazy::Holder>>,
}

struct RegistrySigs<'a> {
    registry: &'a RegistryClient,
    source: &'a Reference,
}

#[async_trait::async_trait]
impl SignatureSource for RegistrySigs<'_> {
    async fn cosign_signatures(
        &self,
        _image: &Reference,
        manifest_digest: &str,
    ) -> Result<Vec<CosignSignature>, PolicyError> {
        // Signatures live next to the image in the repository it was fetched from.
        self.registry
            .cosign_signatures(self.source, manifest_digest)
            .await
            .map(|v| {
                v.into_iter()
                    .map(|(payload, signature_b64)| CosignSignature {
                        payload,
                        signature_b64,
                    })
                    .collect()
            })
            .map_err(PolicyError::Registry)
    }
}

impl Puller {
    /// Builds a puller: fetches credentials and registry configuration named by URI.
    pub async fn new(cfg: Config, fetcher: Arc<dyn ResourceFetcher>) -> Result<Self, PullError> {
        cfg.validate()
            .map_err(|e| PullError::Config(e.to_string()))?;
        let auth = match &cfg.image.authenticated_registry_credentials_uri {
            Some(uri) => Some(fetcher.fetch(uri).await?),
            None => None,
        };
        let mut rules = cfg.image.registry_config.clone().unwrap_or_default();
        if let Some(uri) = &cfg.image.registry_configuration_uri {
            let raw = fetcher.fetch(uri).await?;
            let text = std::str::from_utf8(&raw).map_err(|_| {
                PullError::Config(format!("registry configuration {uri} is not UTF-8"))
            })?;
            let extra: RegistryConfig = toml::from_str(text)
                .map_err(|e| PullError::Config(format!("registry configuration {uri}: {e}")))?;
            rules.insecure_registries.extend(extra.insecure_registries);
            rules.registry.extend(extra.registry);
        }
        let roots = cfg
            .image
            .extra_root_pems()
            .map_err(|e| PullError::Config(format!("extra root certificate: {e}")))?;
        let registry = RegistryClient::new(
            rules,
            auth.as_deref().map(|a| a.as_slice()),
            &roots,
            crate::registry::NetLimits::from_config(&cfg.image),
            cfg.image
                .image_pull_proxy
                .as_ref()
                .map(crate::proxy::PullProxy::from_config)
                .transpose()
                .map_err(PullError::Config)?
                .unwrap_or_default(),
        )?;
        let work_dir_error = |e: std::io::Error| {
            PullError::Config(format!("work dir {}: {e}", cfg.image.work_dir.display()))
        };
        let store = LayerStore::open(&cfg.image.work_dir).map_err(work_dir_error)?;
        let bundles =
            Bundles::open(store.clone(), cfg.image.bundle_roots.clone()).map_err(work_dir_error)?;
        let unwrapper = KeyUnwrapper::new(
            fetcher.clone(),
            cfg.provider_names(),
            cfg.keys.jwe_private_keys.clone(),
        )
        .with_key_lifetime(std::time::Duration::from_secs(cfg.keys.jwe_key_cache_secs));
        let node_cache =
            NodeCache::new(&cfg.image.node_cache).map_err(|e| PullError::Config(e.to_string()))?;
        Ok(Self {
            cfg,
            registry: Arc::new(registry),
            store,
            bundles,
            unwrapper,
            fetcher,
            node_cache,
            work_dir_gate: Arc::default(),
            #[cfg(feature = "lazy")]
            holder: std::sync::OnceLock::new(),
        })
    }

    /// Makes lazy mounts outlive this process: serves the mounts `holder` kept for an earlier
    /// guest-puller on this work dir (dropping those no bundle uses any more), hands every
    /// new one to it, and removes lazy state dirs no bundle uses. Call once, before serving
    /// requests. Returns how many mounts were resumed.
    #[cfg(feature = "lazy")]
    pub async fn resume_lazy_mounts(&self, holder: Arc<lazy::Holder>) -> std::io::Result<usize> {
        if self.holder.set(holder.clone()).is_err() {
            return Err(std::io::Error::other("lazy mounts were already resumed"));
        }
        let h = holder.clone();
        let held = tokio::task::spawn_blocking(move || h.list())
            .await
            .map_err(std::io::Error::other)??;
        let mut resumed = 0;
        for entry in held {
            let id = entry.id.clone();
            let state: lazy::TakeoverState = match serde_json::from_value(entry.state.clone()) {
                Ok(s) => s,
                Err(e) => {
                    warn!(id, "FUSE holder entry unreadable, let go: {e}");
                    let _ = holder.forget(&id);
                    continue;
                }
            };
            let digest = state.manifest_digest.clone();
            let image = self.bundles.lock_image(&digest).await;
            let state_dir = self.bundles.lazy_dir(&digest);
            let users = self.bundles.lazy_users(&digest)?;
            let mountpoint = state.mountpoint.clone();
            let name = state.image.clone();
            if users.is_empty() {
                info!(image = %name, mountpoint = %mountpoint.display(),
                      "held lazy mount has no bundle left: unmounted");
                Self::let_go(&holder, &id, &mountpoint, &state_dir);
                continue;
            }
            match lazy::take_over(
                self.registry.clone(),
                holder.clone(),
                entry,
                state,
                state_dir.clone(),
            )
            .await
            {
                Ok(mount) => {
                    info!(image = %name, mountpoint = %mountpoint.display(), bundles = users.len(),
                          "lazy mount taken over from the previous guest-puller");
                    self.bundles.adopt_lazy(&image, mount, users);
                    resumed += 1;
                }
                Err(e) => {
                    // Its containers see ENOTCONN, as they would without the holder.
                    error!(image = %name, mountpoint = %mountpoint.display(),
                           "taking over the lazy mount failed, so it is unmounted: {e}");
                    Self::let_go(&holder, &id, &mountpoint, &state_dir);
                }
            }
        }
        self.bundles.sweep_lazy_dirs()?;
        Ok(resumed)
    }

    /// Detaches a held mount no one will serve and clears its state.
    #[cfg(feature = "lazy")]
    fn let_go(holder: &lazy::Holder, id: &str, mountpoint: &Path, state_dir: &Path) {
        // By path, without looking at it: nothing answers its requests.
        let _ = rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH);
        if let Err(e) = holder.forget(id) {
            warn!(id, "FUSE holder: {e}");
        }
        Bundles::remove_lazy_dir(state_dir);
    }

    /// Waits for running pulls and bundle removals to finish and keeps new ones waiting until
    /// the guard is dropped: for replacing the work dir (a secure mount on or above it).
    pub async fn exclusive_work_dir(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.work_dir_gate.clone().write_owned().await
    }

    /// The shared hold on the work dir for one pull or removal, its layout re-created first
    /// where it has gone (kata-agent removed it, or a secure mount now sits on it).
    async fn work_dir(&self) -> Result<tokio::sync::OwnedRwLockReadGuard<()>, PullError> {
        let guard = self.work_dir_gate.clone().read_owned().await;
        self.bundles.ensure_layout().map_err(|e| {
            PullError::Layer(LayerError::Store(std::io::Error::new(
                e.kind(),
                format!("work dir {}: {e}", self.cfg.image.work_dir.display()),
            )))
        })?;
        Ok(guard)
    }

    /// The configuration the puller runs with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Where the puller fetches resources (the KBS, files, inline data).
    pub fn fetcher(&self) -> &Arc<dyn ResourceFetcher> {
        &self.fetcher
    }

    /// The key unwrapper (also used by the KeyProviderService).
    pub fn unwrapper(&self) -> &KeyUnwrapper {
        &self.unwrapper
    }

    /// The layer store.
    pub fn store(&self) -> &Arc<LayerStore> {
        &self.store
    }

    /// The bundles this puller made.
    pub fn bundles(&self) -> &Arc<Bundles> {
        &self.bundles
    }

    async fn policy(&self) -> Result<Option<PolicyEvaluator>, PullError> {
        let Some(uri) = &self.cfg.image.image_security_policy_uri else {
            return Ok(None);
        };
        // Fetched on every pull: a policy that cannot be fetched fails the pull, and policy
        // updates in the KBS take effect without restarting.
        let policy = self.fetcher.fetch(uri).await?;
        let lookaside = match &self.cfg.image.sigstore_config_uri {
            Some(u) => Some(self.fetcher.fetch(u).await?),
            None => None,
        };
        Ok(Some(PolicyEvaluator::from_json(
            &policy,
            lookaside.as_deref().map(|v| v.as_slice()),
            self.fetcher.clone(),
        )?))
    }

    /// Pulls `image_ref` and mounts it as an OCI bundle at `bundle_dir`.
    pub async fn pull_image(
        &self,
        image_ref: &str,
        bundle_dir: &Path,
    ) -> Result<PullResult, PullError> {
        // Request checks first: a bad bundle path or reference fetches nothing.
        let bundle_dir = &self.bundles.check_path(bundle_dir)?;
        if image_ref.contains('\0') {
            return Err(PullError::InvalidArgument(
                "image reference contains a NUL byte".into(),
            ));
        }
        let requested = RegistryClient::parse_reference(image_ref)?;
        let _work_dir = self.work_dir().await?;
        let lock = self.bundles.lock(bundle_dir).await;
        Bundles::check_free(lock.dirs())?;
        let started = std::time::Instant::now();
        let policy = self.policy().await?;
        let img = self.registry.resolve(&requested).await?;
        if let Some(p) = &policy {
            let sigs = RegistrySigs {
                registry: &self.registry,
                source: &img.source,
            };
            // Matched on the reference the user asked for, not the mirror it came from.
            p.check_with_list(
                &requested,
                &img.manifest_digest,
                img.list_digest.as_deref(),
                &sigs,
            )
            .await?;
        }
        let config = ImageConfig::parse(&img.config)?;
        if config.rootfs.diff_ids.len() != img.manifest.layers.len() {
            return Err(PullError::Layer(LayerError::Integrity {
                layer: img.config_digest.clone(),
                reason: format!(
                    "config lists {} diff_ids but the manifest has {} layers",
                    config.rootfs.diff_ids.len(),
                    img.manifest.layers.len()
                ),
            }));
        }
        self.check_layer_count(img.manifest.layers.len())?;
        if let Some(nydus) = lazy::detect(&img.manifest)? {
            return self
                .pull_lazy(&requested, img, config, nydus, lock, started)
                .await;
        }
        let digests: Vec<String> = img
            .manifest
            .layers
            .iter()
            .map(|l| l.digest.clone())
            .collect();
        // The overlay's mount data must hold every layer path: refused before any download.
        let lowers: Vec<PathBuf> = digests.iter().map(|d| self.store.layer_path(d)).collect();
        bundle::check_overlay_fits(&lowers, &lock.dirs().overlay)?;
        let budget = UnpackBudget::for_image(
            &self.cfg.image.work_dir,
            self.cfg.image.max_unpacked_image_size,
        )
        .map_err(LayerError::Store)?;
        let pin = self
            .store
            .pin(digests.clone())
            .await
            .map_err(LayerError::Store)?;
        // Media types and keys for every layer before any download: a missing key or an
        // unsupported layer fails the pull without leaving other layers behind.
        let mut items = Vec::with_capacity(img.manifest.layers.len());
        for (desc, diff_id) in img.manifest.layers.iter().zip(&config.rootfs.diff_ids) {
            let compression =
                decrypt::compression_of(&desc.media_type).ok_or_else(|| LayerError::MediaType {
                    layer: desc.digest.clone(),
                    media_type: desc.media_type.clone(),
                })?;
            // Unwrapped even when the plaintext is cached, so an image whose keys this guest
            // cannot obtain never runs from another image's layers.
            let key = if decrypt::is_encrypted(&desc.media_type) {
                let ann = desc.annotations.clone().unwrap_or_default();
                Some(self.unwrapper.unwrap_layer_key(&desc.digest, &ann).await?)
            } else {
                None
            };
            let size = u64::try_from(desc.size).map_err(|_| LayerError::Integrity {
                layer: desc.digest.clone(),
                reason: format!("negative size {} in the manifest", desc.size),
            })?;
            let spec = LayerSpec {
                digest: desc.digest.clone(),
                size,
                compression,
                diff_id: diff_id.clone(),
                key,
                budget: budget.clone(),
            };
            items.push((desc.clone(), spec));
        }
        let source = &img.source;
        let layers: Vec<PulledLayer> = stream::iter(items)
            .map(|(desc, spec)| async move { self.layer(source, &desc, spec).await })
            .buffered(self.cfg.image.max_concurrent_layer_downloads_per_image)
            .try_collect()
            .await?;
        let paths: Vec<PathBuf> = layers.iter().map(|l| l.path.clone()).collect();
        let record = BundleRecord {
            bundle: bundle_dir.to_owned(),
            image: requested.whole(),
            manifest_digest: img.manifest_digest.clone(),
            layers: digests,
            lazy: false,
        };
        self.bundles
            .create(lock, None, record, move |dirs| {
                bundle::create_bundle(&dirs.bundle, &dirs.overlay, &paths, &config)?;
                Ok::<_, PullError>(None)
            })
            .await?;
        drop(pin);
        info!(image = %requested.whole(), digest = %img.manifest_digest,
              ms = started.elapsed().as_millis() as u64, "image pulled");
        Ok(PullResult {
            manifest_digest: img.manifest_digest,
            list_digest: img.list_digest,
            config_digest: img.config_digest,
            source: img.source.whole(),
            layers,
            lazy: false,
            bundle: bundle_dir.to_owned(),
        })
    }

    /// Refuses a nydus image: this build has no lazy pull (the `lazy` feature is off), and a
    /// nydus image has no layers an eager pull could unpack.
    #[cfg(not(feature = "lazy"))]
    async fn pull_lazy(
        &self,
        requested: &Reference,
        _img: ResolvedImage,
        _config: ImageConfig,
        _nydus: NydusManifest,
        _lock: BundleLock,
        _started: std::time::Instant,
    ) -> Result<PullResult, PullError> {
        Err(PullError::Lazy(LazyError::Format(format!(
            "{} is a nydus (lazy-pull) image, and this guest-puller was built without the \
             `lazy` feature",
            requested.whole()
        ))))
    }

    /// Mounts a nydus image: verified bootstrap, FUSE-served RAFS with chunks fetched on
    /// demand, the bundle's overlay on top. Bundles of one image share its FUSE rootfs and
    /// chunk cache, so a second container fetches no chunk the first already has.
    #[cfg(feature = "lazy")]
    async fn pull_lazy(
        &self,
        requested: &Reference,
        img: ResolvedImage,
        config: ImageConfig,
        nydus: NydusManifest,
        lock: BundleLock,
        started: std::time::Instant,
    ) -> Result<PullResult, PullError> {
        let bundle_dir = lock.dirs().bundle.clone();
        let image_lock = self.bundles.lock_image(&img.manifest_digest).await;
        // The bootstrap is fetched and checked (and, encrypted, its key obtained) even when
        // the image's rootfs is already mounted: every pull proves what an unshared one does.
        let boot =
            lazy::fetch_bootstrap(&self.registry, &img.source, &nydus, &self.unwrapper).await?;
        let state = self.bundles.lazy_dir(&img.manifest_digest);
        // The mount point to join, or a new one with what mounting it needs.
        let (mnt, fresh) = match self.bundles.shared_rootfs(&image_lock) {
            Some(mnt) => (mnt, None),
            None => {
                let blobs = lazy::BlobServer::start(
                    self.registry.clone(),
                    img.source.clone(),
                    &nydus.blobs,
                )
                .await
                .map_err(|source| LazyError::Io {
                    path: "lazy blob server on 127.0.0.1".into(),
                    source,
                })?;
                (state.join("rootfs"), Some((boot, blobs)))
            }
        };
        let shares = fresh.is_none();
        let record = BundleRecord {
            bundle: bundle_dir.clone(),
            image: requested.whole(),
            manifest_digest: img.manifest_digest.clone(),
            layers: Vec::new(),
            lazy: true,
        };
        let eager = self.cfg.image.force_eager;
        let name = requested.whole();
        let lower = mnt.clone();
        let hold = self.holder.get().map(|holder| lazy::Hold {
            holder: holder.clone(),
            manifest_digest: img.manifest_digest.clone(),
            source: img.source.whole(),
        });
        self.bundles
            .create(
                lock,
                Some(image_lock),
                record,
                move |dirs| -> Result<_, PullError> {
                    let mounted = match fresh {
                        Some((boot, blobs)) => {
                            // Left by an earlier run of the puller: its mount has no server.
                            Bundles::remove_lazy_dir(&state);
                            Some(lazy::mount_bootstrap(
                                boot, &state, &lower, blobs, &nydus, &name, hold,
                            )?)
                        }
                        None => None,
                    };
                    let undo = |m: Option<lazy::RafsMount>| {
                        if let Some(m) = m {
                            m.unmount();
                            Bundles::remove_lazy_dir(&state);
                        }
                    };
                    if eager {
                        // force_eager: every chunk is fetched and verified before the pull returns.
                        if let Err(e) = lazy::read_all(&lower) {
                            undo(mounted);
                            return Err(PullError::Lazy(LazyError::Bootstrap {
                                digest: nydus.bootstrap.digest.clone(),
                                reason: format!("fetching the whole nydus image: {e}"),
                            }));
                        }
                    }
                    let lowers = std::slice::from_ref(&lower);
                    if let Err(e) =
                        bundle::create_bundle(&dirs.bundle, &dirs.overlay, lowers, &config)
                    {
                        undo(mounted);
                        return Err(e.into());
                    }
                    Ok(Some(match mounted {
                        Some(m) => crate::bundles::LazyRootfs::Mounted(Box::new(m)),
                        None => crate::bundles::LazyRootfs::Shared,
                    }))
                },
            )
            .await?;
        if self.cfg.image.lazy_prefetch && !eager && !shares {
            lazy::prefetch_in_background(mnt);
        }
        info!(image = %requested.whole(), digest = %img.manifest_digest, lazy = true, shared = shares,
              ms = started.elapsed().as_millis() as u64, "image mounted lazily");
        Ok(PullResult {
            manifest_digest: img.manifest_digest,
            list_digest: img.list_digest,
            config_digest: img.config_digest,
            source: img.source.whole(),
            layers: Vec::new(),
            lazy: true,
            bundle: bundle_dir,
        })
    }

    async fn layer(
        &self,
        source: &Reference,
        desc: &oci_client::manifest::OciDescriptor,
        spec: LayerSpec,
    ) -> Result<PulledLayer, PullError> {
        let diff_id = spec.diff_id.clone();
        let registry = &self.registry;
        let cache = self
            .node_cache
            .as_ref()
            .filter(|c| c.shares(&desc.media_type));
        let (path, timings) = match cache {
            None => {
                self.store
                    .ensure_layer(spec, |tx| async move {
                        registry.blob_to_channel(source, desc, tx).await
                    })
                    .await?
            }
            Some(cache) => self.layer_through_cache(cache, source, desc, spec).await?,
        };
        Ok(PulledLayer {
            digest: desc.digest.clone(),
            diff_id,
            path,
            cached: timings.is_none(),
            timings,
        })
    }

    /// A shared layer: from the node cache when it has the blob, else from the registry with
    /// the bytes offered to the cache. A cache blob that fails any check is fetched again from
    /// the registry, and reported to the cache.
    async fn layer_through_cache(
        &self,
        cache: &NodeCache,
        source: &Reference,
        desc: &oci_client::manifest::OciDescriptor,
        spec: LayerSpec,
    ) -> Result<(PathBuf, Option<LayerTimings>), PullError> {
        let registry = &self.registry;
        let size = spec.size;
        let from_cache = std::sync::atomic::AtomicBool::new(false);
        let retry = spec.clone();
        let first = self
            .store
            .ensure_layer(spec, |tx| {
                let from_cache = &from_cache;
                async move {
                    match cache.lookup(&desc.digest, size).await {
                        Ok(Lookup::Hit(resp)) => {
                            from_cache.store(true, std::sync::atomic::Ordering::Relaxed);
                            info!(layer = %desc.digest, "layer blob from the node cache");
                            NodeCache::stream_hit(resp, &tx)
                                .await
                                .map_err(cache_failure(&desc.digest))
                        }
                        Ok(Lookup::Miss) => {
                            let upload = cache.upload(&desc.digest, size);
                            teed_download(registry, source, desc, tx, upload).await
                        }
                        Err(e) => {
                            warn!(layer = %desc.digest, "{e}; fetching the layer from the registry");
                            registry.blob_to_channel(source, desc, tx).await
                        }
                    }
                }
            })
            .await;
        match first {
            Err(e) if from_cache.load(std::sync::atomic::Ordering::Relaxed) => {
                warn!(layer = %desc.digest, "the node cache's blob failed: {e}; fetching it from the registry");
                cache.report_bad(&desc.digest);
                Ok(self
                    .store
                    .ensure_layer(retry, |tx| async move {
                        registry.blob_to_channel(source, desc, tx).await
                    })
                    .await?)
            }
            other => Ok(other?),
        }
    }

    /// Waits up to `within` for blobs still being offered to the node cache (see
    /// [`NodeCache::settle`]); a no-op without one.
    pub async fn settle_cache_uploads(&self, within: std::time::Duration) {
        if let Some(c) = &self.node_cache {
            c.settle(within).await;
        }
    }

    /// Refuses images with more layers than configured (at most overlayfs' lower-layer limit).
    fn check_layer_count(&self, count: usize) -> Result<(), PullError> {
        let limit = self.cfg.image.max_layers;
        if count > limit {
            return Err(PullError::Layer(LayerError::TooManyLayers {
                count,
                limit,
                why: "[image] max_layers".into(),
            }));
        }
        Ok(())
    }

    /// Unmounts and removes a bundle's rootfs, then garbage-collects unused layers.
    pub async fn unmount_bundle(&self, bundle_dir: &Path) -> Result<(), PullError> {
        let _work_dir = self.work_dir().await?;
        Ok(self.bundles.remove(bundle_dir).await?)
    }
}

/// The registry error standing for a failed cache read (the layer is then fetched again).
fn cache_failure(digest: &str) -> impl Fn(crate::node_cache::CacheError) -> RegistryError + '_ {
    move |e| RegistryError::Request {
        reference: digest.to_owned(),
        kind: crate::error::ErrorKind::Unavailable,
        source: Box::new(e),
    }
}

/// Downloads a blob from the registry into `tx`, offering every chunk to the node cache on
/// the way (the offer never blocks; see [`crate::node_cache::Upload`]).
async fn teed_download(
    registry: &RegistryClient,
    source: &Reference,
    desc: &oci_client::manifest::OciDescriptor,
    tx: tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
    upload: Option<crate::node_cache::Upload>,
) -> Result<(), RegistryError> {
    let Some(mut upload) = upload else {
        return registry.blob_to_channel(source, desc, tx).await;
    };
    let (mid_tx, mut mid_rx) = tokio::sync::mpsc::channel(crate::layer::CHANNEL_CHUNKS);
    let forward = async move {
        while let Some(item) = mid_rx.recv().await {
            match &item {
                Ok(b) => upload.offer(b),
                Err(_) => upload.abort(),
            }
            if tx.send(item).await.is_err() {
                upload.abort();
                return;
            }
        }
    };
    let (fetched, ()) = tokio::join!(registry.blob_to_channel(source, desc, mid_tx), forward);
    fetched
}

/// Unmounts a bundle created by [`Puller::pull_image`] (in this or an earlier process) and
/// collects layers nobody uses.
pub async fn unmount_bundle(store: &Arc<LayerStore>, bundle_dir: &Path) -> Result<(), PullError> {
    let bundles = Bundles::open(store.clone(), Vec::new()).map_err(LayerError::Store)?;
    Ok(bundles.remove(bundle_dir).await?)
}
