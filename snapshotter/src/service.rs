//! The `containerd_snapshots::Snapshotter` implementation (gRPC side).
//!
//! Each RPC runs the synchronous [`Engine`] on tokio's blocking pool: redb commits
//! fsync and du walks directories, neither of which may stall the async reactor.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_snapshots::{api::types::Mount, Info, Kind as ApiKind, Snapshotter, Usage};

use crate::engine::{Engine, SnapshotInfo};
use crate::error::{Error, Result};
use crate::store::Kind;

/// gRPC-facing snapshotter; cheap to clone.
#[derive(Clone)]
pub struct GuestPullService {
    engine: Arc<Engine>,
}

impl GuestPullService {
    /// Wraps an engine.
    pub fn new(engine: Arc<Engine>) -> Self {
        GuestPullService { engine }
    }

    /// The wrapped engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Engine) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || f(&engine))
            .await
            .map_err(|e| Error::Store(format!("worker task failed: {e}")))?
    }
}

fn time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

/// Converts our info into the crate's API type.
pub fn to_api_info(i: SnapshotInfo) -> Info {
    Info {
        kind: match i.kind {
            Kind::View => ApiKind::View,
            Kind::Active => ApiKind::Active,
            Kind::Committed => ApiKind::Committed,
        },
        name: i.name,
        parent: i.parent,
        labels: i.labels.into_iter().collect(),
        created_at: time(i.created_ns),
        updated_at: time(i.updated_ns),
    }
}

#[containerd_snapshots::tonic::async_trait]
impl Snapshotter for GuestPullService {
    type Error = Error;

    async fn stat(&self, key: String) -> Result<Info> {
        self.run(move |e| e.stat(&key)).await.map(to_api_info)
    }

    async fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info> {
        let paths = fieldpaths.unwrap_or_default();
        self.run(move |e| e.update(&info.name, info.labels, &paths))
            .await
            .map(to_api_info)
    }

    async fn usage(&self, key: String) -> Result<Usage> {
        let u = self.run(move |e| e.usage(&key)).await?;
        Ok(Usage {
            inodes: u.inodes,
            size: u.size,
        })
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>> {
        self.run(move |e| e.mounts(&key)).await
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.run(move |e| e.prepare(&key, &parent, labels)).await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.run(move |e| e.view(&key, &parent, labels)).await
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        self.run(move |e| e.commit(&name, &key, labels)).await
    }

    async fn remove(&self, key: String) -> Result<()> {
        self.run(move |e| e.remove(&key)).await
    }

    async fn clear(&self) -> Result<()> {
        self.run(|e| e.cleanup().map(|_| ())).await
    }

    type InfoStream = futures::stream::Iter<std::vec::IntoIter<Result<Info>>>;

    async fn list(&self, _snapshotter: String, filters: Vec<String>) -> Result<Self::InfoStream> {
        let infos = self.run(move |e| e.list(&filters)).await?;
        let items: Vec<Result<Info>> = infos.into_iter().map(|i| Ok(to_api_info(i))).collect();
        Ok(futures::stream::iter(items))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, PlainChainMode};
    use crate::engine::*;
    use crate::volume::{KataVirtualVolume, KATA_VOLUME_OPTION_PREFIX};
    use containerd_snapshots::tonic::{Code, Status};
    use futures::StreamExt;
    use std::path::Path;

    fn chain(i: u8) -> String {
        format!("sha256:{}", format!("{i:02x}").repeat(32))
    }

    fn cfg(root: &Path) -> Config {
        Config {
            root: root.to_path_buf(),
            ..Config::default()
        }
    }

    fn svc(c: Config) -> GuestPullService {
        GuestPullService::new(Arc::new(Engine::open(c).unwrap()))
    }

    fn code<T: std::fmt::Debug>(r: Result<T>) -> Code {
        let e = r.expect_err("expected an error");
        Status::from(e).code()
    }

    fn layer_labels(i: u8, cri: bool) -> HashMap<String, String> {
        let mut l = HashMap::new();
        l.insert(LABEL_SNAPSHOT_REF.to_string(), chain(i));
        if cri {
            l.insert(
                LABEL_CRI_IMAGE_REF.into(),
                "127.0.0.1:5000/lab/busybox:3layer".into(),
            );
            l.insert(LABEL_CRI_LAYER_DIGEST.into(), format!("sha256:layer{i}"));
            l.insert(LABEL_CRI_MANIFEST_DIGEST.into(), "sha256:manifest".into());
        }
        l
    }

    /// Pulls an n-layer guest-pull image the way containerd's unpacker does.
    async fn pull(s: &GuestPullService, n: u8, cri: bool) {
        let mut parent = String::new();
        for i in 1..=n {
            let key = format!("k8s.io/{i}/extract-123-abc {}", chain(i));
            let r = s
                .prepare(key.clone(), parent.clone(), layer_labels(i, cri))
                .await;
            assert_eq!(code(r), Code::AlreadyExists);
            let st = s.stat(chain(i)).await.unwrap();
            assert_eq!(st.kind, ApiKind::Committed);
            assert_eq!(st.parent, parent);
            assert_eq!(
                code(s.stat(key).await),
                Code::NotFound,
                "no active record left"
            );
            parent = chain(i);
        }
    }

    fn opts(m: &Mount) -> HashMap<String, String> {
        m.options
            .iter()
            .filter_map(|o| o.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn layer_prepare_commits_marker_and_returns_already_exists() {
        let d = tempfile::tempdir().unwrap();
        let s = svc(cfg(d.path()));
        pull(&s, 3, true).await;
        let st = s.stat(chain(2)).await.unwrap();
        assert_eq!(st.labels[LABEL_PROXY_MODE], "true");
        assert_eq!(st.labels[LABEL_SNAPSHOT_REF], chain(2));
        assert_eq!(st.labels[LABEL_CRI_LAYER_DIGEST], "sha256:layer2");
        // Idempotent: the same layer again (another namespace) → AlreadyExists, nothing new.
        let r = s
            .prepare(
                "other/9/extract-1 x".into(),
                chain(1),
                layer_labels(2, true),
            )
            .await;
        assert_eq!(code(r), Code::AlreadyExists);
        // containerd's follow-up Walk filter finds it.
        let f = format!(
            "labels.\"{LABEL_SNAPSHOT_REF}\"=={},parent==\"{}\"",
            chain(2),
            chain(1)
        );
        let found: Vec<_> = s
            .list(String::new(), vec![f])
            .await
            .unwrap()
            .collect()
            .await;
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].as_ref().unwrap().name, chain(2));
        // Base layer: containerd sends parent=="" and expects a match.
        let f = format!("labels.\"{LABEL_SNAPSHOT_REF}\"=={},parent==\"\"", chain(1));
        let found: Vec<_> = s
            .list(String::new(), vec![f])
            .await
            .unwrap()
            .collect()
            .await;
        assert_eq!(found.len(), 1);
        let all: Vec<_> = s.list(String::new(), vec![]).await.unwrap().collect().await;
        assert_eq!(all.len(), 3);
        assert_eq!(code(s.mounts(chain(1)).await), Code::FailedPrecondition);
        let dirs = std::fs::read_dir(d.path().join("snapshots"))
            .unwrap()
            .count();
        assert_eq!(dirs, 0, "markers own no directories");
        assert_eq!(
            s.engine()
                .stats()
                .guest_pull_layers
                .load(std::sync::atomic::Ordering::Relaxed),
            3
        );
        let bad = s
            .list(String::new(), vec!["name=x".into()])
            .await
            .map(|_| ());
        assert_eq!(code(bad), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn container_prepare_on_guest_pull_chain_returns_kata_volume() {
        let d = tempfile::tempdir().unwrap();
        let s = svc(cfg(d.path()));
        pull(&s, 3, true).await;
        let m = s
            .prepare("k8s.io/10/ctr1".into(), chain(3), HashMap::new())
            .await
            .unwrap();
        assert_eq!(m.len(), 1);
        let m0 = &m[0];
        assert_eq!(m0.r#type, "fuse.nydus-overlayfs");
        assert_eq!(m0.source, "overlay");
        let o = opts(m0);
        for k in ["workdir", "upperdir", "lowerdir"] {
            assert!(Path::new(&o[k]).is_dir(), "{k}={} must be a real dir", o[k]);
        }
        let vol_opt = m0
            .options
            .iter()
            .find(|x| x.starts_with(KATA_VOLUME_OPTION_PREFIX))
            .unwrap();
        assert_eq!(m0.options.last().unwrap(), vol_opt);
        let v = KataVirtualVolume::from_mount_option(vol_opt).unwrap();
        assert_eq!(v.volume_type, "image_guest_pull");
        assert_eq!(v.source, "127.0.0.1:5000/lab/busybox:3layer");
        let md = v.image_pull.unwrap().metadata;
        assert_eq!(md[LABEL_CRI_MANIFEST_DIGEST], "sha256:manifest");
        assert_eq!(md[LABEL_CRI_LAYER_DIGEST], "sha256:layer3");
        assert_eq!(
            md[METADATA_LAYER_DIGESTS],
            "sha256:layer1,sha256:layer2,sha256:layer3"
        );
        // Mounts() is byte-identical to what Prepare returned, also after a restart.
        assert_eq!(s.mounts("k8s.io/10/ctr1".into()).await.unwrap(), m);
        drop(s);
        let s = svc(cfg(d.path()));
        assert_eq!(s.mounts("k8s.io/10/ctr1".into()).await.unwrap(), m);
        // View gets the same kind of mount, read-only.
        let v = s
            .view("k8s.io/11/view".into(), chain(3), HashMap::new())
            .await
            .unwrap();
        assert_eq!(v[0].r#type, "fuse.nydus-overlayfs");
        assert_eq!(v[0].options[0], "ro");
        // Active usage is du of the upper dir.
        std::fs::write(Path::new(&o["upperdir"]).join("f"), vec![1u8; 8192]).unwrap();
        let u = s.usage("k8s.io/10/ctr1".into()).await.unwrap();
        assert!(u.size >= 8192 && u.inodes >= 2, "{u:?}");
    }

    #[tokio::test]
    async fn labelless_chain_uses_default_source_and_configured_helper() {
        let d = tempfile::tempdir().unwrap();
        let mut c = cfg(d.path());
        c.snapshot.nydus_overlayfs_path = "/opt/kata/bin/nydus-overlayfs".into();
        let s = svc(c);
        pull(&s, 2, false).await;
        let m = s
            .prepare("default/5/c".into(), chain(2), HashMap::new())
            .await
            .unwrap();
        assert_eq!(m[0].r#type, "fuse./opt/kata/bin/nydus-overlayfs");
        let v = KataVirtualVolume::from_mount_option(m[0].options.last().unwrap()).unwrap();
        assert_eq!(v.source, crate::config::DEFAULT_UNKNOWN_IMAGE_SOURCE);
        assert!(v.image_pull.is_some());
    }

    #[tokio::test]
    async fn plain_layers_behave_like_overlayfs() {
        let d = tempfile::tempdir().unwrap();
        let s = svc(cfg(d.path()));
        // Fallback unpack: label-less extract keys get real writable dirs.
        let k1 = format!("default/1/extract-1-a {}", chain(1));
        let m = s
            .prepare(k1.clone(), String::new(), HashMap::new())
            .await
            .unwrap();
        assert_eq!(m[0].r#type, "bind");
        assert_eq!(m[0].options, vec!["rw", "rbind"]);
        std::fs::write(Path::new(&m[0].source).join("hello"), "world").unwrap();
        s.commit("default/2/base".into(), k1.clone(), HashMap::new())
            .await
            .unwrap();
        assert_eq!(code(s.stat(k1).await), Code::NotFound);
        let u = s.usage("default/2/base".into()).await.unwrap();
        assert!(u.size > 0 && u.inodes >= 2);
        let k2 = format!("default/3/extract-2-b {}", chain(2));
        let m = s
            .prepare(k2.clone(), "default/2/base".into(), HashMap::new())
            .await
            .unwrap();
        assert_eq!(m[0].r#type, "overlay");
        let o = opts(&m[0]);
        assert!(Path::new(&o["lowerdir"]).join("hello").is_file());
        s.commit("default/4/top".into(), k2, HashMap::new())
            .await
            .unwrap();
        // Container on a label-less plain chain: nydus treatAsProxyDriver → guest pull,
        // with the real layers as lowerdirs (nearest first) so the helper can mount them.
        let m = s
            .prepare(
                "default/5/ctr".into(),
                "default/4/top".into(),
                HashMap::new(),
            )
            .await
            .unwrap();
        assert_eq!(m[0].r#type, "fuse.nydus-overlayfs");
        let lowers: Vec<String> = opts(&m[0])["lowerdir"]
            .split(':')
            .map(String::from)
            .collect();
        assert_eq!(lowers.len(), 2);
        assert!(Path::new(&lowers[1]).join("hello").is_file());
        // plain_chain_mode = overlay → real overlay for containers.
        drop(s);
        let mut c = cfg(d.path());
        c.snapshot.plain_chain_mode = PlainChainMode::Overlay;
        let s = svc(c);
        let m = s
            .prepare(
                "default/7/ctr".into(),
                "default/4/top".into(),
                HashMap::new(),
            )
            .await
            .unwrap();
        assert_eq!(m[0].r#type, "overlay");
        // A read-only view of a single plain layer is a ro bind.
        let v = s
            .view(
                "default/6/v".into(),
                "default/2/base".into(),
                HashMap::new(),
            )
            .await
            .unwrap();
        assert_eq!(
            (v[0].r#type.as_str(), v[0].options[0].as_str()),
            ("bind", "ro")
        );
        // A parent carrying cri.image-ref but no marker is plain regardless.
        let mut l = HashMap::new();
        l.insert(LABEL_CRI_IMAGE_REF.to_string(), "img".to_string());
        s.update(
            Info {
                name: "default/4/top".into(),
                labels: l,
                ..Default::default()
            },
            Some(vec!["labels".into()]),
        )
        .await
        .unwrap();
        drop(s);
        let s = svc(cfg(d.path()));
        let m = s
            .prepare(
                "default/8/ctr".into(),
                "default/4/top".into(),
                HashMap::new(),
            )
            .await
            .unwrap();
        assert_eq!(m[0].r#type, "overlay");
    }

    #[tokio::test]
    async fn error_codes_match_containerd() {
        let d = tempfile::tempdir().unwrap();
        let s = svc(cfg(d.path()));
        pull(&s, 2, true).await;
        s.prepare("c".into(), chain(2), HashMap::new())
            .await
            .unwrap();
        assert_eq!(
            code(s.prepare("c".into(), chain(2), HashMap::new()).await),
            Code::AlreadyExists
        );
        assert_eq!(code(s.remove(chain(2)).await), Code::FailedPrecondition);
        assert_eq!(code(s.remove(chain(1)).await), Code::FailedPrecondition);
        assert_eq!(code(s.remove("nope".into()).await), Code::NotFound);
        assert_eq!(
            code(s.commit("x".into(), "nope".into(), HashMap::new()).await),
            Code::NotFound
        );
        assert_eq!(code(s.mounts("nope".into()).await), Code::NotFound);
        assert_eq!(code(s.usage("nope".into()).await), Code::NotFound);
        assert_eq!(code(s.stat("nope".into()).await), Code::NotFound);
        assert_eq!(
            code(
                s.prepare("y".into(), "not-a-chain".into(), HashMap::new())
                    .await
            ),
            Code::NotFound
        );
        assert_eq!(
            code(s.prepare("z".into(), "c".into(), HashMap::new()).await),
            Code::InvalidArgument
        );
        s.view("v".into(), chain(2), HashMap::new()).await.unwrap();
        assert_eq!(
            code(s.commit("w".into(), "v".into(), HashMap::new()).await),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(s.commit(chain(1), "c".into(), HashMap::new()).await),
            Code::AlreadyExists
        );
        assert_eq!(
            code(
                s.prepare(String::new(), String::new(), HashMap::new())
                    .await
            ),
            Code::InvalidArgument
        );
        s.remove("c".into()).await.unwrap();
        s.remove("v".into()).await.unwrap();
        s.remove(chain(2)).await.unwrap();
        s.remove(chain(1)).await.unwrap();
    }

    #[tokio::test]
    async fn strict_mode_requires_layer_digest() {
        let d = tempfile::tempdir().unwrap();
        let mut c = cfg(d.path());
        c.snapshot.strict = true;
        let s = svc(c);
        let r = s
            .prepare("k".into(), String::new(), layer_labels(1, false))
            .await;
        let st: Status = r.unwrap_err().into();
        assert_eq!(st.code(), Code::FailedPrecondition);
        assert!(
            st.message().contains("cri.layer-digest"),
            "{}",
            st.message()
        );
        assert_eq!(code(s.stat("k".into()).await), Code::NotFound);
        drop(s);
        let mut c = cfg(d.path());
        c.snapshot.self_heal = false;
        c.snapshot.strict = true;
        let s2 = svc(c);
        assert_eq!(code(s2.stat(chain(1)).await), Code::NotFound);
        pull(&s2, 1, true).await;
    }

    #[tokio::test]
    async fn self_heals_lost_chain_id_parents() {
        let d = tempfile::tempdir().unwrap();
        let s = svc(cfg(d.path()));
        // Container Prepare whose parent vanished (state wiped): recreated as a marker.
        let m = s
            .prepare("k8s.io/1/c".into(), chain(3), HashMap::new())
            .await
            .unwrap();
        assert_eq!(m[0].r#type, "fuse.nydus-overlayfs");
        let st = s.stat(chain(3)).await.unwrap();
        assert_eq!(st.kind, ApiKind::Committed);
        assert_eq!(st.labels[LABEL_RECOVERED], "true");
        // Stat of a lost chain ID (containerd's metadata shortcut) heals too.
        assert_eq!(s.stat(chain(1)).await.unwrap().kind, ApiKind::Committed);
        assert_eq!(
            s.engine()
                .stats()
                .recovered_parents
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        // The real layer Prepare later repairs the recovered marker's parent.
        pull(&s, 1, true).await;
        let r = s.prepare("x".into(), chain(1), layer_labels(2, true)).await;
        assert_eq!(code(r), Code::AlreadyExists);
        let st = s.stat(chain(2)).await.unwrap();
        assert_eq!(st.parent, chain(1));
        // Stat of chain(3) (recovered with parent "") gets the real parent on re-pull.
        let r = s.prepare("y".into(), chain(2), layer_labels(3, true)).await;
        assert_eq!(code(r), Code::AlreadyExists);
        let st = s.stat(chain(3)).await.unwrap();
        assert_eq!(st.parent, chain(2));
        assert!(!st.labels.contains_key(LABEL_RECOVERED));
        assert_eq!(st.labels[LABEL_CRI_LAYER_DIGEST], "sha256:layer3");
    }

    #[tokio::test]
    async fn cleanup_removes_orphan_directories() {
        let d = tempfile::tempdir().unwrap();
        let s = svc(cfg(d.path()));
        s.prepare("a".into(), String::new(), HashMap::new())
            .await
            .unwrap();
        s.prepare("b".into(), String::new(), HashMap::new())
            .await
            .unwrap();
        let snaps = d.path().join("snapshots");
        std::fs::create_dir_all(snaps.join("new-crashed/fs")).unwrap();
        std::fs::create_dir_all(snaps.join("999")).unwrap();
        s.remove("a".into()).await.unwrap();
        assert_eq!(
            std::fs::read_dir(&snaps).unwrap().count(),
            4,
            "Remove defers to Cleanup"
        );
        s.clear().await.unwrap();
        let left: Vec<_> = std::fs::read_dir(&snaps)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(s.mounts("b".into()).await.is_ok());
        // Directories of a live snapshot lost in a crash come back empty on Mounts.
        let b_dir = std::fs::read_dir(&snaps)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::remove_dir_all(&b_dir).unwrap();
        let m = s.mounts("b".into()).await.unwrap();
        assert!(Path::new(&m[0].source).is_dir());
        drop(s);
        let mut c = cfg(d.path());
        c.snapshot.sync_remove = true;
        let s = svc(c);
        s.remove("b".into()).await.unwrap();
        assert_eq!(std::fs::read_dir(&snaps).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn update_label_field_paths() {
        let d = tempfile::tempdir().unwrap();
        let s = svc(cfg(d.path()));
        pull(&s, 1, true).await;
        let info = |pairs: &[(&str, &str)]| Info {
            name: chain(1),
            labels: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let i = s
            .update(
                info(&[("a", "1"), ("b", "2")]),
                Some(vec!["labels.a".into(), "labels.zz".into()]),
            )
            .await
            .unwrap();
        assert_eq!(i.labels["a"], "1");
        assert!(!i.labels.contains_key("b"));
        assert!(i.labels.contains_key(LABEL_PROXY_MODE), "other labels kept");
        let i = s
            .update(info(&[]), Some(vec!["labels.a".into()]))
            .await
            .unwrap();
        assert!(!i.labels.contains_key("a"));
        let i = s.update(info(&[("only", "x")]), None).await.unwrap();
        assert_eq!(i.labels.len(), 1);
        let i = s
            .update(info(&[("l", "y")]), Some(vec!["labels".into()]))
            .await
            .unwrap();
        assert_eq!(i.labels.keys().collect::<Vec<_>>(), vec!["l"]);
        assert_eq!(
            code(s.update(info(&[]), Some(vec!["parent".into()])).await),
            Code::InvalidArgument
        );
        let mut missing = info(&[]);
        missing.name = "nope".into();
        assert_eq!(code(s.update(missing, None).await), Code::NotFound);
        // Marker semantics survive label replacement: children still get guest pull.
        let m = s
            .prepare("c".into(), chain(1), HashMap::new())
            .await
            .unwrap();
        assert_eq!(m[0].r#type, "fuse.nydus-overlayfs");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_rpcs_on_the_same_keys() {
        let d = tempfile::tempdir().unwrap();
        let s = svc(cfg(d.path()));
        let mut tasks = Vec::new();
        for i in 0..16 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let layer = s
                    .prepare(
                        format!("ns{i}/1/extract-{i} x"),
                        String::new(),
                        layer_labels(1, true),
                    )
                    .await;
                let same_key = s.prepare("shared".into(), chain(1), HashMap::new()).await;
                (Status::from(layer.unwrap_err()).code(), same_key.is_ok())
            }));
        }
        let mut ok = 0;
        for t in tasks {
            let (c, won) = t.await.unwrap();
            assert_eq!(c, Code::AlreadyExists);
            ok += won as usize;
        }
        assert_eq!(ok, 1, "exactly one Prepare of the same key wins");
        let all: Vec<_> = s.list(String::new(), vec![]).await.unwrap().collect().await;
        assert_eq!(all.len(), 2);
        s.clear().await.unwrap();
        assert_eq!(
            std::fs::read_dir(d.path().join("snapshots"))
                .unwrap()
                .count(),
            1
        );
    }
}
