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
