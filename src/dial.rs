//! A gRPC channel to a daemon's unix socket, for the commands that ask a
//! running ontop (`ping`, `ls`, `info`, `check`).

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
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .with_context(|| format!("connecting to ontop at {shown}"))
}
