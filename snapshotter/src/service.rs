//! containerd's Snapshots gRPC service (generated in [`crate::api`]) over the [`Engine`].
//!
//! Each RPC runs the synchronous [`Engine`] on tokio's blocking pool: redb commits
//! fsync and du walks directories, neither of which may stall the async reactor.
//!
//! A panic inside the engine means the store is damaged (redb panics on pages it cannot
//! read) or a bug left it in an unknown state: from then on every RPC is refused and
//! [`GuestPullService::failed`] resolves, so the daemon stops instead of serving a store
//! that panics; on restart the integrity check at open reports the damage.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use prost::Message;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::error;

use crate::api::snapshots::{self as pb, snapshots_server::Snapshots};
use crate::engine::{Engine, SnapshotInfo};
use crate::error::{Error, Result};
use crate::mounts::Mount;
use crate::store::{DiskUsage, Kind};

/// containerd's own service sends 100 snapshots per List message; so do we, and also cut a
/// message at 4 MiB, far below the 16 MiB containerd receives.
const LIST_BATCH_INFOS: usize = 100;
/// See [`LIST_BATCH_INFOS`].
const LIST_BATCH_BYTES: usize = 4 << 20;

/// gRPC-facing snapshotter; cheap to clone.
#[derive(Clone)]
pub struct GuestPullService {
    engine: Arc<Engine>,
    /// Why the engine may no longer be used (set once, by the first panic).
    failure: Arc<watch::Sender<Option<String>>>,
}

impl GuestPullService {
    /// Wraps an engine.
    pub fn new(engine: Arc<Engine>) -> Self {
        GuestPullService {
            engine,
            failure: Arc::new(watch::channel(None).0),
        }
    }

    /// The wrapped engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Why the service stopped serving, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    /// Resolves, with the reason, once an RPC panicked and the service stopped serving.
    pub async fn failed(&self) -> String {
        let mut rx = self.failure.subscribe();
        let reason = rx.wait_for(Option::is_some).await;
        reason
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_else(|| "service dropped".into())
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Engine) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        if let Some(reason) = self.failure() {
            return Err(Error::Unsafe(reason));
        }
        let engine = self.engine.clone();
        match tokio::task::spawn_blocking(move || f(&engine)).await {
            Ok(r) => r,
            Err(e) => {
                let why = match e.try_into_panic() {
                    Ok(p) => crate::error::panic_text(p.as_ref()).to_string(),
                    Err(e) => e.to_string(),
                };
                let reason = format!(
                    "a snapshot operation panicked ({why}); the store may be damaged, so \
                     this snapshotter stopped serving: restart it (opening the store checks it)"
                );
                error!("{reason}");
                self.failure.send_if_modified(|f| {
                    f.get_or_insert_with(|| reason.clone());
                    true
                });
                Err(Error::Unsafe(reason))
            }
        }
    }

    /// Stat ([`Engine::stat`]).
    pub async fn stat(&self, key: String) -> Result<SnapshotInfo> {
        self.run(move |e| e.stat(&key)).await
    }

    /// Update ([`Engine::update`]); no field paths = replace the labels.
    pub async fn update(
        &self,
        name: String,
        labels: HashMap<String, String>,
        fieldpaths: Vec<String>,
    ) -> Result<SnapshotInfo> {
        self.run(move |e| e.update(&name, labels, &fieldpaths))
            .await
    }

    /// Usage ([`Engine::usage`]).
    pub async fn usage(&self, key: String) -> Result<DiskUsage> {
        self.run(move |e| e.usage(&key)).await
    }

    /// Mounts ([`Engine::mounts`]).
    pub async fn mounts(&self, key: String) -> Result<Vec<Mount>> {
        self.run(move |e| e.mounts(&key)).await
    }

    /// Prepare ([`Engine::prepare`]).
    pub async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.run(move |e| e.prepare(&key, &parent, labels)).await
    }

    /// View ([`Engine::view`]).
    pub async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.run(move |e| e.view(&key, &parent, labels)).await
    }

    /// Commit ([`Engine::commit`]).
    pub async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        self.run(move |e| e.commit(&name, &key, labels)).await
    }

    /// Remove ([`Engine::remove`]).
    pub async fn remove(&self, key: String) -> Result<()> {
        self.run(move |e| e.remove(&key)).await
    }

    /// Cleanup ([`Engine::cleanup`]).
    pub async fn clear(&self) -> Result<()> {
        self.run(|e| e.cleanup().map(|_| ())).await
    }

    /// List ([`Engine::list`]).
    pub async fn list(&self, filters: Vec<String>) -> Result<Vec<SnapshotInfo>> {
        self.run(move |e| e.list(&filters)).await
    }
}

fn timestamp(ns: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ns / 1_000_000_000) as i64,
        nanos: (ns % 1_000_000_000) as i32,
    }
}

/// Converts our info into the wire type.
pub fn to_pb_info(i: SnapshotInfo) -> pb::Info {
    let kind = match i.kind {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    };
    pb::Info {
        name: i.name,
        parent: i.parent,
        kind: kind as i32,
        created_at: Some(timestamp(i.created_ns)),
        updated_at: Some(timestamp(i.updated_ns)),
        labels: i.labels.into_iter().collect(),
    }
}

/// Splits List results into messages of at most [`LIST_BATCH_INFOS`] snapshots and
/// [`LIST_BATCH_BYTES`] (a single larger record, impossible under the limits, goes alone).
fn list_batches(infos: Vec<SnapshotInfo>) -> Vec<pb::ListSnapshotsResponse> {
    let mut out = Vec::new();
    let mut batch = pb::ListSnapshotsResponse::default();
    let mut bytes = 0usize;
    for info in infos {
        let info = to_pb_info(info);
        // As encoded inside the message: field tag, length prefix, body.
        let len = 1 + prost::length_delimiter_len(info.encoded_len()) + info.encoded_len();
        if !batch.info.is_empty()
            && (batch.info.len() == LIST_BATCH_INFOS || bytes + len > LIST_BATCH_BYTES)
        {
            out.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += len;
        batch.info.push(info);
    }
    if !batch.info.is_empty() {
        out.push(batch);
    }
    out
}

type ListStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for GuestPullService {
    async fn prepare(
        &self,
        r: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = r.into_inner();
        let mounts = GuestPullService::prepare(self, r.key, r.parent, r.labels).await?;
        Ok(Response::new(pb::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        r: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = r.into_inner();
        let mounts = GuestPullService::view(self, r.key, r.parent, r.labels).await?;
        Ok(Response::new(pb::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        r: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let mounts = GuestPullService::mounts(self, r.into_inner().key).await?;
        Ok(Response::new(pb::MountsResponse { mounts }))
    }

    async fn commit(&self, r: Request<pb::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        // `parent` (rebase on commit) is only sent to snapshotters advertising `rebase`,
        // which guestpull never does.
        let r = r.into_inner();
        GuestPullService::commit(self, r.name, r.key, r.labels).await?;
        Ok(Response::new(()))
    }

    async fn remove(&self, r: Request<pb::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        GuestPullService::remove(self, r.into_inner().key).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        r: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let info = GuestPullService::stat(self, r.into_inner().key).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(to_pb_info(info)),
        }))
    }

    async fn update(
        &self,
        r: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = r.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without snapshot info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let info = GuestPullService::update(self, info.name, info.labels, paths).await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(to_pb_info(info)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        r: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let infos = GuestPullService::list(self, r.into_inner().filters).await?;
        let batches = list_batches(infos).into_iter().map(Ok);
        Ok(Response::new(Box::pin(futures::stream::iter(batches))))
    }

    async fn usage(
        &self,
        r: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let u = GuestPullService::usage(self, r.into_inner().key).await?;
        Ok(Response::new(pb::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, _: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.clear().await?;
        Ok(Response::new(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::snapshots::Info;
    use crate::config::{Config, PlainChainMode};
    use crate::engine::*;
    use crate::volume::{KataVirtualVolume, KATA_VOLUME_OPTION_PREFIX};
    use futures::StreamExt;
    use std::path::Path;
    use tonic::Code;

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

    fn code<T: std::fmt::Debug, E: Into<Status>>(r: Result<T, E>) -> Code {
        let e = r.expect_err("expected an error");
        e.into().code()
    }

    /// Update through the gRPC service, as containerd sends it.
    async fn update(
        s: &GuestPullService,
        info: Info,
        paths: Option<Vec<String>>,
    ) -> Result<Info, Status> {
        let r = pb::UpdateSnapshotRequest {
            snapshotter: String::new(),
            info: Some(info),
            update_mask: paths.map(|paths| prost_types::FieldMask { paths }),
        };
        let resp = Snapshots::update(s, Request::new(r)).await?.into_inner();
        Ok(resp.info.expect("info in the response"))
    }

    /// List through the gRPC service: every message of the stream, concatenated.
    async fn list(s: &GuestPullService, filters: Vec<String>) -> Result<Vec<Info>, Status> {
        let r = pb::ListSnapshotsRequest {
            snapshotter: String::new(),
            filters,
        };
        let mut stream = Snapshots::list(s, Request::new(r)).await?.into_inner();
        let mut out = Vec::new();
        while let Some(batch) = stream.next().await {
            out.extend(batch?.info);
        }
        Ok(out)
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
            assert_eq!(st.kind, Kind::Committed);
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
        let found: Vec<_> = list(&s, vec![f]).await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, chain(2));
        // Base layer: containerd sends parent=="" and expects a match.
        let f = format!("labels.\"{LABEL_SNAPSHOT_REF}\"=={},parent==\"\"", chain(1));
        let found: Vec<_> = list(&s, vec![f]).await.unwrap();
        assert_eq!(found.len(), 1);
        let all: Vec<_> = list(&s, vec![]).await.unwrap();
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
        let bad = list(&s, vec!["name=x".into()]).await.map(|_| ());
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
        update(
            &s,
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
        assert_eq!(st.kind, Kind::Committed);
        assert_eq!(st.labels[LABEL_RECOVERED], "true");
        // Stat of a lost chain ID (containerd's metadata shortcut) heals too.
        assert_eq!(s.stat(chain(1)).await.unwrap().kind, Kind::Committed);
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
        // A crash between the rename into place and the commit: the next id, empty.
        std::fs::create_dir_all(snaps.join("3/fs")).unwrap();
        std::fs::create_dir_all(snaps.join("3/work")).unwrap();
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
        let i = update(
            &s,
            info(&[("a", "1"), ("b", "2")]),
            Some(vec!["labels.a".into(), "labels.zz".into()]),
        )
        .await
        .unwrap();
        assert_eq!(i.labels["a"], "1");
        assert!(!i.labels.contains_key("b"));
        assert!(i.labels.contains_key(LABEL_PROXY_MODE), "other labels kept");
        let i = update(&s, info(&[]), Some(vec!["labels.a".into()]))
            .await
            .unwrap();
        assert!(!i.labels.contains_key("a"));
        let i = update(&s, info(&[("only", "x")]), None).await.unwrap();
        assert_eq!(i.labels.len(), 1);
        let i = update(&s, info(&[("l", "y")]), Some(vec!["labels".into()]))
            .await
            .unwrap();
        assert_eq!(i.labels.keys().collect::<Vec<_>>(), vec!["l"]);
        assert_eq!(
            code(update(&s, info(&[]), Some(vec!["parent".into()])).await),
            Code::InvalidArgument
        );
        let mut missing = info(&[]);
        missing.name = "nope".into();
        assert_eq!(code(update(&s, missing, None).await), Code::NotFound);
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
        let all: Vec<_> = list(&s, vec![]).await.unwrap();
        assert_eq!(all.len(), 2);
        s.clear().await.unwrap();
        assert_eq!(
            std::fs::read_dir(d.path().join("snapshots"))
                .unwrap()
                .count(),
            1
        );
    }

    /// A parentless plain snapshot "ctr" holding a file; returns its mounts.
    async fn snapshot_with_data(s: &GuestPullService) -> Vec<Mount> {
        let m = s
            .prepare("ctr".into(), String::new(), HashMap::new())
            .await
            .unwrap();
        std::fs::write(Path::new(&m[0].source).join("data"), "precious").unwrap();
        m
    }

    #[tokio::test]
    async fn lost_metadata_next_to_snapshot_dirs_refuses_to_start() {
        for damage in ["missing", "empty", "older"] {
            let d = tempfile::tempdir().unwrap();
            let db = d.path().join("metadata.db");
            drop(svc(cfg(d.path())));
            if damage == "older" {
                std::fs::copy(&db, d.path().join("old.db")).unwrap();
            }
            let s = svc(cfg(d.path()));
            let m = snapshot_with_data(&s).await;
            drop(s);
            match damage {
                "missing" => std::fs::remove_file(&db).unwrap(),
                "empty" => std::fs::write(&db, b"").unwrap(),
                _ => std::fs::rename(d.path().join("old.db"), &db).unwrap(),
            }
            let err = match Engine::open(cfg(d.path())) {
                Err(e) => e,
                Ok(e) => {
                    // What used to happen: a fresh store, and Cleanup deletes the layer.
                    let removed = e.cleanup().unwrap().removed;
                    panic!("{damage} metadata.db opened; Cleanup removed {removed:?}");
                }
            };
            assert!(matches!(err, Error::Unsafe(_)), "{damage}: {err}");
            let msg = err.to_string();
            assert!(msg.contains("never allocated (1)"), "{damage}: {msg}");
            assert!(
                Path::new(&m[0].source).join("data").is_file(),
                "{damage}: data kept"
            );
        }
    }

    #[tokio::test]
    async fn crash_leftovers_do_not_block_start_and_foreign_dirs_survive_cleanup() {
        let d = tempfile::tempdir().unwrap();
        let snaps = d.path().join("snapshots");
        // A crash during the very first Prepare: a build dir, or the renamed skeleton.
        std::fs::create_dir_all(snaps.join("new-7-0/fs")).unwrap();
        std::fs::create_dir_all(snaps.join("1/fs")).unwrap();
        std::fs::create_dir_all(snaps.join("1/work")).unwrap();
        std::fs::create_dir_all(snaps.join("lost+found")).unwrap();
        let s = svc(cfg(d.path()));
        let m = snapshot_with_data(&s).await;
        // Appears while running (a restored copy, another store's dirs): never deleted.
        std::fs::create_dir_all(snaps.join("40/fs")).unwrap();
        let report = s.engine().cleanup().unwrap();
        assert_eq!(report.removed, vec![snaps.join("new-7-0")]);
        let mut kept = report.kept.clone();
        kept.sort();
        assert_eq!(kept, vec![snaps.join("40"), snaps.join("lost+found")]);
        assert!(Path::new(&m[0].source).join("data").is_file());
    }

    #[tokio::test]
    async fn damaged_metadata_refuses_to_start() {
        let d = tempfile::tempdir().unwrap();
        let s = svc(cfg(d.path()));
        pull(&s, 3, true).await;
        drop(s);
        let db = d.path().join("metadata.db");
        let mut bytes = std::fs::read(&db).unwrap();
        // Damage every page but the file header, as a bad disk or a stray write might.
        for page in bytes.chunks_mut(4096).skip(1) {
            for b in &mut page[..64] {
                *b ^= 0xff;
            }
        }
        std::fs::write(&db, &bytes).unwrap();
        let err = Engine::open(cfg(d.path())).err().expect("refused");
        assert!(matches!(err, Error::Unsafe(_)), "{err}");
        assert!(err.to_string().contains("metadata.db is damaged"), "{err}");
    }

    #[tokio::test]
    async fn a_panicking_operation_stops_the_service() {
        let d = tempfile::tempdir().unwrap();
        let s = svc(cfg(d.path()));
        pull(&s, 1, true).await;
        let r: Result<()> = s.run(|_| panic!("page 7 unreachable")).await;
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("page 7 unreachable"), "{msg}");
        // Every later RPC is refused, even one the store could answer.
        assert_eq!(code(s.stat(chain(1)).await), Code::Internal);
        let listed = list(&s, vec![]).await.map(|_| ());
        assert_eq!(code(listed), Code::Internal);
        let why = tokio::time::timeout(std::time::Duration::from_secs(5), s.failed())
            .await
            .expect("failed() resolves");
        assert!(why.contains("page 7 unreachable"), "{why}");
        assert_eq!(s.failure(), Some(why));
    }

    #[tokio::test]
    async fn self_healing_never_makes_parent_cycles() {
        let d = tempfile::tempdir().unwrap();
        let s = svc(cfg(d.path()));
        let (x, a, b) = (chain(1), chain(2), chain(3));
        // X healed by Stat, then a layer Prepare naming X as its own parent.
        s.stat(x.clone()).await.unwrap();
        let r = s
            .prepare("k1".into(), x.clone(), layer_labels(1, true))
            .await;
        assert_eq!(code(r), Code::InvalidArgument);
        assert_eq!(s.stat(x.clone()).await.unwrap().parent, "");
        s.remove(x.clone()).await.unwrap();
        // A and B healed; A onto B is a real repair, B onto A would close a loop.
        s.stat(a.clone()).await.unwrap();
        s.stat(b.clone()).await.unwrap();
        let r = s
            .prepare("k2".into(), b.clone(), layer_labels(2, true))
            .await;
        assert_eq!(code(r), Code::AlreadyExists);
        assert_eq!(s.stat(a.clone()).await.unwrap().parent, b);
        let r = s
            .prepare("k3".into(), a.clone(), layer_labels(3, true))
            .await;
        assert_eq!(code(r), Code::InvalidArgument);
        assert_eq!(s.stat(b.clone()).await.unwrap().parent, "");
        // Nothing is stuck: both can be removed, child first.
        s.remove(a).await.unwrap();
        s.remove(b).await.unwrap();
        // A lost layer named as its own parent is refused without healing anything.
        let r = s
            .prepare("k4".into(), chain(4), layer_labels(4, true))
            .await;
        assert_eq!(code(r), Code::InvalidArgument);
        let all: Vec<_> = list(&s, vec![]).await.unwrap();
        assert!(all.is_empty(), "{all:?}");
    }

    #[tokio::test]
    async fn a_failed_prepare_leaves_no_healed_parent() {
        let d = tempfile::tempdir().unwrap();
        let s = svc(cfg(d.path()));
        s.prepare("c".into(), chain(5), HashMap::new())
            .await
            .unwrap();
        // Same key again, on another lost chain ID: AlreadyExists, and chain(6) not healed.
        let r = s.prepare("c".into(), chain(6), HashMap::new()).await;
        assert_eq!(code(r), Code::AlreadyExists);
        let names: Vec<String> = list(&s, vec![])
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, vec!["c".to_string(), chain(5)]);
        assert_eq!(
            s.engine()
                .stats()
                .recovered_parents
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // The snapshot directory of the failed Prepare is gone too.
        let dirs = std::fs::read_dir(d.path().join("snapshots"))
            .unwrap()
            .count();
        assert_eq!(dirs, 1);
    }

    fn volume(m: &[Mount]) -> KataVirtualVolume {
        KataVirtualVolume::from_mount_option(m[0].options.last().unwrap()).unwrap()
    }

    /// After a wiped root, containerd Stats the chain IDs its meta.db still holds and never
    /// resends their labels (its target shortcut answers the labelled Prepare itself): the
    /// volume has no image reference and no digest list, never a partial one; labels that
    /// do arrive later (a new layer on top, a pull in another namespace) heal it.
    #[tokio::test]
    async fn healed_chain_volume_after_a_wipe() {
        let d = tempfile::tempdir().unwrap();
        let s = svc(cfg(d.path()));
        for i in 1..=3 {
            s.stat(chain(i)).await.unwrap();
        }
        let m = s
            .prepare("c1".into(), chain(3), HashMap::new())
            .await
            .unwrap();
        let v = volume(&m);
        assert_eq!(v.source, crate::config::DEFAULT_UNKNOWN_IMAGE_SOURCE);
        let md = v.image_pull.unwrap().metadata;
        assert!(!md.contains_key(METADATA_LAYER_DIGESTS), "{md:?}");
        // A new image layer on top of the healed chain: its labels name the image, but the
        // digests below are unknown, so no digest list at all.
        let r = s.prepare("x".into(), chain(3), layer_labels(4, true)).await;
        assert_eq!(code(r), Code::AlreadyExists);
        let m = s
            .prepare("c2".into(), chain(4), HashMap::new())
            .await
            .unwrap();
        let v = volume(&m);
        assert_eq!(v.source, "127.0.0.1:5000/lab/busybox:3layer");
        let md = v.image_pull.unwrap().metadata;
        assert_eq!(md[LABEL_CRI_LAYER_DIGEST], "sha256:layer4");
        assert!(!md.contains_key(METADATA_LAYER_DIGESTS), "{md:?}");
        // The same image pulled in another namespace: labelled Prepares reach us and
        // repair parents and labels, and the list is complete again.
        pull(&s, 3, true).await;
        let m = s
            .prepare("c3".into(), chain(4), HashMap::new())
            .await
            .unwrap();
        let md = volume(&m).image_pull.unwrap().metadata;
        assert_eq!(
            md[METADATA_LAYER_DIGESTS],
            "sha256:layer1,sha256:layer2,sha256:layer3,sha256:layer4"
        );
    }

    #[tokio::test]
    async fn commit_times_match_containerd() {
        let d = tempfile::tempdir().unwrap();
        let s = svc(cfg(d.path()));
        let active = s.prepare("a".into(), String::new(), HashMap::new());
        active.await.unwrap();
        let active = s.stat("a".into()).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        s.commit("c".into(), "a".into(), HashMap::new())
            .await
            .unwrap();
        let c = s.stat("c".into()).await.unwrap();
        assert_eq!(c.created_ns, c.updated_ns);
        assert!(c.created_ns > active.created_ns);
    }

    #[tokio::test]
    async fn keys_and_labels_beyond_containerd_limits_are_refused() {
        use crate::limits::{MAX_KEY, MAX_LABEL_PAIR};
        let d = tempfile::tempdir().unwrap();
        let s = svc(cfg(d.path()));
        let huge_key = "k".repeat(3 << 20);
        let r = s
            .prepare(huge_key.clone(), String::new(), HashMap::new())
            .await;
        assert_eq!(code(r), Code::InvalidArgument);
        let r = s.view("v".into(), huge_key.clone(), HashMap::new()).await;
        assert_eq!(code(r), Code::InvalidArgument);
        let big_label = |n: usize| {
            let mut l = HashMap::new();
            l.insert("containerd.io/snapshot/x".to_string(), "v".repeat(n));
            l
        };
        let r = s
            .prepare("a".into(), String::new(), big_label(1 << 20))
            .await;
        assert_eq!(code(r), Code::InvalidArgument);
        let many: HashMap<String, String> = (0..10_000)
            .map(|i| (format!("containerd.io/snapshot/l{i}"), "v".repeat(64)))
            .collect();
        let r = s.prepare("a".into(), String::new(), many.clone()).await;
        assert_eq!(code(r), Code::InvalidArgument);
        // A guest-pull layer's label set is checked the same way.
        let mut layer = layer_labels(1, true);
        layer.extend(big_label(MAX_LABEL_PAIR));
        assert_eq!(
            code(s.prepare("l".into(), String::new(), layer).await),
            Code::InvalidArgument
        );
        // At the limits everything works.
        let key = "k".repeat(MAX_KEY);
        let pair = MAX_LABEL_PAIR - "containerd.io/snapshot/x".len();
        s.prepare(key.clone(), String::new(), big_label(pair))
            .await
            .unwrap();
        let r = s.commit(huge_key, key.clone(), HashMap::new()).await;
        assert_eq!(code(r), Code::InvalidArgument);
        let r = s.commit("c".into(), key.clone(), many.clone()).await;
        assert_eq!(code(r), Code::InvalidArgument);
        let info = Info {
            name: key.clone(),
            labels: many,
            ..Default::default()
        };
        assert_eq!(code(update(&s, info, None).await), Code::InvalidArgument);
        let all: Vec<_> = list(&s, vec![]).await.unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].name, key);
    }

    #[test]
    fn list_messages_stay_small() {
        let info = |i: usize, label: usize| SnapshotInfo {
            name: format!("s{i}"),
            kind: Kind::Committed,
            parent: String::new(),
            labels: [("l".to_string(), "v".repeat(label))].into_iter().collect(),
            created_ns: 0,
            updated_ns: 0,
        };
        let sizes =
            |b: &[pb::ListSnapshotsResponse]| b.iter().map(|m| m.info.len()).collect::<Vec<_>>();
        let small: Vec<_> = (0..250).map(|i| info(i, 10)).collect();
        assert_eq!(sizes(&list_batches(small)), vec![100, 100, 50]);
        // 100 snapshots at the label total: cut by bytes, every message under 4 MiB.
        let big: Vec<_> = (0..100).map(|i| info(i, 60 * 1024)).collect();
        let batches = list_batches(big);
        assert!(batches.len() >= 2, "{:?}", sizes(&batches));
        assert_eq!(sizes(&batches).iter().sum::<usize>(), 100);
        assert!(batches
            .iter()
            .all(|b| b.encoded_len() <= LIST_BATCH_BYTES + 64));
        assert!(list_batches(Vec::new()).is_empty());
    }
}
