//! Connecting to a daemon's unix socket, for the CLI and the tests.

use std::path::Path;

use anyhow::Context as _;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// A gRPC channel over the unix socket at `path`.
pub async fn connect(path: &Path) -> anyhow::Result<Channel> {
    let path = path.to_path_buf();
    let shown = path.display().to_string();
    // The URI is required by tonic but unused: the connector dials the socket.
    Endpoint::try_from("http://[::1]:1")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            UnixStream::connect(path.clone())
        }))
        .await
        .with_context(|| format!("connecting to ontop at {shown}"))
}
