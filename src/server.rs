//! The daemon: opens the core, owns the unix socket, serves both gRPC
//! services, and shuts down gracefully on SIGTERM or SIGINT.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::containerd_api::snapshots::v1::snapshots_server::SnapshotsServer;
use anyhow::{bail, Context as _};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::wrappers::UnixListenerStream;

use crate::admin::v1::admin_server::AdminServer;
use crate::config::Config;
use crate::grpc::{AdminService, SnapshotsService};
use crate::mounts::OverlayOptions;
use crate::snapshotter::{Options, Snapshotter};

/// How long a stop waits for clients to finish and hang up. Requests
/// already running in the core complete even past it: the runtime waits
/// for its blocking tasks before the process exits.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves until SIGTERM or SIGINT, then stops accepting, lets in-flight
/// requests finish, closes the database and removes the socket.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    // Signals first, so that from here on a TERM is a graceful stop.
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;

    let overlay = OverlayOptions::detect(config.backend, config.mount_options.clone());
    tracing::debug!(?overlay, "overlay options");
    let opts = Options {
        root: config.root.clone(),
        async_remove: config.async_remove,
        overlay,
        base_roots: config.base_roots.clone(),
        remap_ids: config.remap_ids,
    };
    let core = tokio::task::spawn_blocking(move || Snapshotter::open(opts))
        .await
        .context("opening the snapshotter")??;
    let core = Arc::new(core);
    // Off the start-up path: containerd can dial at once. SQLite reports
    // damage on any read of it anyway; this finds it before a read does.
    let checked = Arc::clone(&core);
    tokio::task::spawn_blocking(move || match checked.check_database() {
        Ok(()) => tracing::debug!("database integrity check passed"),
        Err(e) => tracing::error!(error = %format!("{e:#}"), "database integrity check failed"),
    });

    if !config.base_roots.is_empty()
        && !crate::backend::in_user_namespace()
        && crate::pin::shares_mount_namespace() == Some(false)
    {
        tracing::warn!(
            "ontop runs in a mount namespace of its own: the bind mounts that pin host bases \
             are invisible to a containerd outside it, which would see bases empty; run ontop \
             without PrivateMounts=, PrivateTmp= or ProtectSystem="
        );
    }
    let (listener, socket_ino) = bind_socket(&config.address)?;
    if config.socket_owner.is_some() || config.socket_group.is_some() {
        std::os::unix::fs::chown(&config.address, config.socket_owner, config.socket_group)
            .with_context(|| format!("setting the owner of {}", config.address.display()))?;
    }
    tracing::info!(
        root = %config.root.display(),
        backend = %config.backend,
        address = %config.address.display(),
        "ontop is serving"
    );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(SnapshotsService::new(Arc::clone(
            &core,
        ))))
        .add_service(AdminServer::new(AdminService::new(Arc::clone(&core))))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
            let _ = stop_rx.await;
        });
    tokio::pin!(server);
    let signal = async {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    };
    let result = tokio::select! {
        result = &mut server => result,
        name = signal => {
            tracing::info!("{name}: shutting down");
            let _ = stop_tx.send(());
            // Graceful shutdown waits for clients to hang up; one that
            // never does must not block a stop forever.
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(
                        "clients still connected {}s after shutdown began; closing their connections",
                        SHUTDOWN_GRACE.as_secs()
                    );
                    Ok(())
                }
            }
        }
    };

    remove_own_socket(&config.address, socket_ino);
    // The services are gone with the server: this was the last reference,
    // so the database closes and the root lock is released here.
    drop(core);
    result.context("serving gRPC")?;
    tracing::info!("ontop stopped");
    Ok(())
}

/// Binds the socket at `path` with mode 0660, creating its directory.
/// A stale socket (nobody answers) is replaced; a live one is never
/// touched, and neither is anything that is not a socket.
fn bind_socket(path: &Path) -> anyhow::Result<(UnixListener, u64)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating socket directory {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => bail!(
                    "{} is in use by a running server; stop it or choose another --address",
                    path.display()
                ),
                Err(_) => {
                    tracing::info!(socket = %path.display(), "replacing stale socket");
                    std::fs::remove_file(path)
                        .with_context(|| format!("removing stale socket {}", path.display()))?;
                }
            }
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting mode 0660 on {}", path.display()))?;
    let ino = std::fs::symlink_metadata(path)?.ino();
    Ok((listener, ino))
}

/// Removes the socket unless someone else has replaced it meanwhile.
fn remove_own_socket(path: &Path, ino: u64) {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.ino() == ino => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(socket = %path.display(), error = %e, "could not remove socket");
            }
        }
        _ => {}
    }
}
