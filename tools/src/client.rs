//! A client of containerd's Snapshots API, for the bench and the tests:
//! one method per RPC, with the request plumbing done once. It talks to a proxy snapshotter directly, or to
//! containerd's own Snapshots service, which routes on the snapshotter name
//! and needs a namespace header.

use std::collections::HashMap;

use anyhow::Context as _;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

use ontop::containerd_api::snapshots::v1::{self as api, snapshots_client::SnapshotsClient};
use ontop::containerd_api::types::Mount;

pub use ontop::dial::connect;

/// The `containerd-namespace` header containerd's own services require;
/// none for a proxy snapshotter.
#[derive(Debug, Clone, Default)]
pub struct Namespace(Option<AsciiMetadataValue>);

impl Namespace {
    pub fn new(name: &str) -> anyhow::Result<Namespace> {
        let value =
            AsciiMetadataValue::try_from(name).with_context(|| format!("namespace {name:?}"))?;
        Ok(Namespace(Some(value)))
    }
}

impl tonic::service::Interceptor for Namespace {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(ns) = &self.0 {
            req.metadata_mut()
                .insert("containerd-namespace", ns.clone());
        }
        Ok(req)
    }
}

/// The Snapshots API, one method per RPC, returning what callers use.
#[derive(Clone)]
pub struct Snapshots {
    /// The raw client, for requests the methods do not shape.
    pub rpc: SnapshotsClient<InterceptedService<Channel, Namespace>>,
    /// The `snapshotter` field of every request; containerd routes on it,
    /// a proxy snapshotter ignores it.
    snapshotter: String,
}

impl Snapshots {
    pub fn new(channel: Channel, snapshotter: &str, namespace: Namespace) -> Snapshots {
        Snapshots {
            // A List batch of 100k snapshots' labels can pass tonic's
            // 4 MiB default.
            rpc: SnapshotsClient::with_interceptor(channel, namespace)
                .max_decoding_message_size(64 << 20),
            snapshotter: snapshotter.to_string(),
        }
    }

    pub async fn prepare(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        let r = self
            .rpc
            .prepare(api::PrepareSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.into(),
                parent: parent.into(),
                labels,
            })
            .await?;
        Ok(r.into_inner().mounts)
    }

    pub async fn view(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        let r = self
            .rpc
            .view(api::ViewSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.into(),
                parent: parent.into(),
                labels,
            })
            .await?;
        Ok(r.into_inner().mounts)
    }

    pub async fn mounts(&mut self, key: &str) -> Result<Vec<Mount>, Status> {
        let r = self
            .rpc
            .mounts(api::MountsRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.into(),
            })
            .await?;
        Ok(r.into_inner().mounts)
    }

    pub async fn commit(
        &mut self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), Status> {
        self.commit_onto(name, key, "", labels).await
    }

    /// Commit with a parent (containerd 2.2+'s `rebase`): `key` was
    /// prepared without one, and the committed snapshot sits on `parent`.
    pub async fn commit_onto(
        &mut self,
        name: &str,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), Status> {
        self.rpc
            .commit(api::CommitSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                name: name.into(),
                key: key.into(),
                labels,
                parent: parent.into(),
            })
            .await?;
        Ok(())
    }

    pub async fn remove(&mut self, key: &str) -> Result<(), Status> {
        self.rpc
            .remove(api::RemoveSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.into(),
            })
            .await?;
        Ok(())
    }

    pub async fn stat(&mut self, key: &str) -> Result<api::Info, Status> {
        let r = self
            .rpc
            .stat(api::StatSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.into(),
            })
            .await?;
        r.into_inner()
            .info
            .ok_or_else(|| Status::internal("Stat answered without info"))
    }

    /// Updates `info.name` with the field paths `paths` (none: every
    /// mutable field).
    pub async fn update(&mut self, info: api::Info, paths: &[&str]) -> Result<api::Info, Status> {
        let update_mask = (!paths.is_empty()).then(|| prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        });
        let r = self
            .rpc
            .update(api::UpdateSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                info: Some(info),
                update_mask,
            })
            .await?;
        r.into_inner()
            .info
            .ok_or_else(|| Status::internal("Update answered without info"))
    }

    /// The snapshots matching `filters`, as the server streams them: in
    /// batches, so a caller can count without holding them all.
    pub async fn list(
        &mut self,
        filters: &[&str],
    ) -> Result<Streaming<api::ListSnapshotsResponse>, Status> {
        Ok(self
            .rpc
            .list(api::ListSnapshotsRequest {
                snapshotter: self.snapshotter.clone(),
                filters: filters.iter().map(|f| f.to_string()).collect(),
            })
            .await?
            .into_inner())
    }

    /// Bytes and inodes.
    pub async fn usage(&mut self, key: &str) -> Result<(i64, i64), Status> {
        let r = self
            .rpc
            .usage(api::UsageRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.into(),
            })
            .await?
            .into_inner();
        Ok((r.size, r.inodes))
    }

    pub async fn cleanup(&mut self) -> Result<(), Status> {
        self.rpc
            .cleanup(api::CleanupRequest {
                snapshotter: self.snapshotter.clone(),
            })
            .await?;
        Ok(())
    }
}
