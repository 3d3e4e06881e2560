//! The daemon: opens the core, binds the unix socket, takes the one
//! systemd passed, or takes over the one of the ontop serving its root
//! (`crate::takeover`), serves the gRPC services (Snapshots, admin,
//! health) and the metrics endpoint, tells systemd how it is doing, and
//! shuts down gracefully on SIGTERM or SIGINT, or once a successor took
//! its socket over.

use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::containerd_api::diff::v1::diff_server::DiffServer;
use crate::containerd_api::snapshots::v1::snapshots_server::SnapshotsServer;
use crate::differ::Differ;
use anyhow::{bail, Context as _};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::admin::v1::admin_server::AdminServer;
use crate::config::Config;
use crate::grpc::{AdminService, DiffService, SnapshotsService};
use crate::mounts::OverlayOptions;
use crate::snapshotter::{Options, Snapshotter};
use crate::takeover::{self, ControlServer, Gate, Handed};

/// How long a stop waits for clients to finish and hang up. Requests
/// already running in the core complete even past it: the runtime waits
/// for its blocking tasks before the process exits.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How often systemd's STATUS= line is refreshed without a watchdog.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// Opens the core, binds the socket (or takes the one systemd passed, or
/// takes one over) and serves until SIGTERM or SIGINT, or a successor's
/// takeover; see [`serve_on`]. With `linger`, the caller then waits for
/// SIGTERM, once the runtime has let go of the root (`main`).
pub async fn serve(config: Config) -> anyhow::Result<Ended> {
    // Signals first, so that from here on a TERM is a graceful stop.
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let handed = match config.takeover {
        true => {
            let (address, root) = (config.address.clone(), canonical(&config.root));
            tokio::task::spawn_blocking(move || takeover::take_over(&address, &root))
                .await
                .context("taking over")??
        }
        false => None,
    };
    if let Some(h) = &handed {
        tracing::info!(
            from_pid = h.from_pid,
            "took the socket over; waiting for the old ontop to finish its calls"
        );
        let root = config.root.clone();
        tokio::task::spawn_blocking(move || {
            takeover::wait_for_root(&root, SHUTDOWN_GRACE + takeover::ANSWER_WITHIN)
        })
        .await
        .context("waiting for the root")??;
    }
    let core = Core::open(&config).await?;
    let socket = match handed {
        Some(h) => Socket::handed(h)?,
        None => Socket::for_config(&config)?,
    };
    let signal = async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    };
    serve_on(socket, core, &config, signal).await
}

/// How serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// A signal, or the caller's stop.
    Stopped,
    /// A successor took the socket over.
    HandedOver,
}

/// An opened root, ready to serve: locked, repaired after a crash, and
/// its filesystem checked fit for the backend.
pub struct Core(Arc<Snapshotter>);

impl Core {
    pub async fn open(config: &Config) -> anyhow::Result<Core> {
        let overlay = OverlayOptions::detect(config.backend, config.mount_options.clone());
        tracing::debug!(?overlay, "overlay options");
        let opts = Options {
            root: config.root.clone(),
            async_remove: config.async_remove,
            sync_layers: config.sync_layers,
            default_max_size: config.default_max_size,
            limit_enforcer: config.limit_enforcer,
            overlay,
            base_roots: config.base_roots.clone(),
            remap_ids: config.remap_ids,
        };
        let core = tokio::task::spawn_blocking(move || Snapshotter::open(opts))
            .await
            .context("opening the snapshotter")??;
        let core = Arc::new(core);
        // Off the start-up path: containerd can dial at once. SQLite
        // reports damage on any read of it anyway; this finds it before a
        // read does.
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
        Ok(Core(core))
    }
}

/// The socket ontop serves on: bound by itself (and removed when it
/// stops), or passed by systemd's socket activation (and left to systemd,
/// so that connections wait in its backlog while ontop restarts).
pub struct Socket {
    listener: UnixListener,
    path: PathBuf,
    /// The inode of a socket ontop bound itself.
    own_ino: Option<u64>,
}

impl Socket {
    /// The socket systemd passed, or else `config.address`, bound.
    pub fn for_config(config: &Config) -> anyhow::Result<Socket> {
        let Some((listener, path)) = crate::systemd::inherited_listener()? else {
            let socket = Socket::bind(&config.address)?;
            if config.socket_owner.is_some() || config.socket_group.is_some() {
                std::os::unix::fs::chown(&config.address, config.socket_owner, config.socket_group)
                    .with_context(|| {
                        format!("setting the owner of {}", config.address.display())
                    })?;
            }
            return Ok(socket);
        };
        let path = path.unwrap_or_else(|| config.address.clone());
        if path != config.address {
            tracing::warn!(
                socket = %path.display(),
                address = %config.address.display(),
                "the socket systemd passed is not ontop's configured address; \
                 containerd must dial the socket's path"
            );
        }
        Ok(Socket {
            listener: UnixListener::from_std(listener)
                .context("serving on the inherited socket")?,
            path,
            own_ino: None,
        })
    }

    /// The socket a predecessor handed over: removed when serving ends if
    /// ontop bound it, left to systemd if systemd did.
    pub fn handed(h: Handed) -> anyhow::Result<Socket> {
        let own_ino = match h.owned {
            true => Some(std::fs::symlink_metadata(&h.path)?.ino()),
            false => None,
        };
        Ok(Socket {
            listener: UnixListener::from_std(h.listener)
                .context("serving on the socket handed over")?,
            path: h.path,
            own_ino,
        })
    }

    /// Binds `path` (see `bind_socket`); it is removed when serving ends.
    pub fn bind(path: &Path) -> anyhow::Result<Socket> {
        let (listener, ino) = bind_socket(path)?;
        Ok(Socket {
            listener,
            path: path.to_path_buf(),
            own_ino: Some(ino),
        })
    }
}

/// Serves the Snapshots, admin and health services on `socket` (and the
/// metrics endpoint, when configured) until `shutdown` resolves with the
/// reason, then stops accepting and lets in-flight requests finish.
pub async fn serve_on(
    socket: Socket,
    core: Core,
    config: &Config,
    shutdown: impl Future<Output = &'static str>,
) -> anyhow::Result<Ended> {
    let Core(core) = core;
    let notifier = crate::systemd::Notifier::from_env();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|&stop| stop).await;
        }
    };
    let metrics = match &config.metrics_address {
        Some(address) => {
            crate::metrics::install()?;
            let state: Arc<dyn crate::metrics::State> = Arc::clone(&core) as _;
            Some(crate::exporter::serve(address, state, stopped()).await?)
        }
        None => None,
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<SnapshotsServer<SnapshotsService>>()
        .await;

    tracing::info!(
        root = %config.root.display(),
        backend = %config.backend,
        address = %socket.path.display(),
        activated = socket.own_ino.is_none(),
        "ontop is serving"
    );
    // Connections come through a gate that a takeover closes: those made
    // meanwhile wait in the socket's backlog for the successor.
    let listener = Arc::new(socket.listener);
    let (accepting, open) = watch::channel(true);
    let (handed_tx, mut handed_rx) = watch::channel(false);
    let incoming = accept_while_open(Arc::clone(&listener), open);
    let gate = Arc::new(ServeGate {
        accepting,
        handed: handed_tx,
    });
    // Without it ontop serves as ever; only a takeover from it is refused.
    let control = listener
        .as_fd()
        .try_clone_to_owned()
        .context("sharing the socket with the takeover thread")
        .and_then(|shared| {
            ControlServer::start(
                &config.address,
                &canonical(&config.root),
                shared,
                &socket.path,
                socket.own_ino.is_some(),
                gate,
            )
        })
        .inspect_err(|e| {
            tracing::warn!(error = %format!("{e:#}"), "no takeover socket: a successor cannot take over from this ontop");
        })
        .ok();
    let in_flight = crate::grpc::InFlight::default();
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(SnapshotsServer::new(SnapshotsService::new(
            Arc::clone(&core),
            config.slow_call,
            in_flight.clone(),
        )))
        .add_service(DiffServer::new(DiffService::new(
            Arc::new(Differ::new(Arc::clone(&core), config.content_store.clone())),
            config.slow_call,
            in_flight.clone(),
        )))
        .add_service(AdminServer::new(AdminService::new(Arc::clone(&core))))
        .serve_with_incoming_shutdown(incoming, stopped());
    tokio::pin!(server);
    // The socket listens and the database is open: calls are answered
    // from here on, so this is the moment to call ontop started.
    let notified = notifier.map(|n| {
        let n = Arc::new(n);
        n.send("READY=1\nSTATUS=serving");
        let beating = tokio::spawn(heartbeat(Arc::clone(&n), Arc::clone(&core)));
        (n, beating)
    });
    let handed_flag = handed_rx.clone();
    let handed_over = async move {
        let _ = handed_rx.wait_for(|&h| h).await;
        "handed the socket to a successor"
    };
    let shutdown = async move {
        tokio::select! {
            reason = shutdown => reason,
            reason = handed_over => reason,
        }
    };
    let result = tokio::select! {
        result = &mut server => result,
        reason = shutdown => {
            tracing::info!("{reason}: shutting down");
            if let Some((n, beating)) = &notified {
                // No more STATUS=serving or watchdog pings from here on.
                beating.abort();
                n.send("STOPPING=1\nSTATUS=shutting down: finishing calls in flight");
            }
            health.set_not_serving::<SnapshotsServer<SnapshotsService>>().await;
            health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            let _ = stop_tx.send(true);
            // Graceful shutdown waits for clients to hang up; one that
            // never does must not block a stop forever. After a handover
            // the successor waits for this process to let go of the root,
            // and a client's new connection waits for the successor (which
            // containerd's proxy client gives up on after about a second):
            // so once the goodbye is out and no call is in flight, idle
            // connections are not waited for.
            let handed = *handed_flag.borrow();
            let quiet = async {
                if !handed {
                    return std::future::pending().await;
                }
                let mut calm = 0;
                while calm < 3 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    calm = if in_flight.count() == 0 { calm + 1 } else { 0 };
                }
            };
            tokio::select! {
                finished = tokio::time::timeout(SHUTDOWN_GRACE, &mut server) => match finished {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::warn!(
                            "clients still connected {}s after shutdown began; closing their connections",
                            SHUTDOWN_GRACE.as_secs()
                        );
                        Ok(())
                    }
                },
                () = quiet => {
                    tracing::info!("handed over, and no call in flight: closing idle connections");
                    Ok(())
                }
            }
        }
    };
    let _ = stop_tx.send(true);
    if let Some((_, beating)) = notified {
        beating.abort();
    }
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    let handed_over = *handed_flag.borrow();
    drop(control);
    match socket.own_ino {
        // The successor serves it now, and removes it when it stops.
        Some(_) if handed_over => {}
        Some(ino) => remove_own_socket(&socket.path, ino),
        None => {}
    }
    // The database closes and the root lock is released when the last
    // reference to the core goes: here, unless a detached task (the
    // integrity check, a List producer, a metrics scrape) still runs; the
    // runtime waits for those before the process exits.
    drop(core);
    result.context("serving gRPC")?;
    tracing::info!("ontop stopped");
    Ok(match handed_over {
        true => Ended::HandedOver,
        false => Ended::Stopped,
    })
}

/// Tells systemd, while ontop serves, what it is doing, and feeds the
/// watchdog when `WatchdogSec=` is set: only after the database answered
/// a query, so that a hung store gets ontop restarted.
async fn heartbeat(notifier: Arc<crate::systemd::Notifier>, core: Arc<Snapshotter>) {
    let watchdog = crate::systemd::watchdog_interval();
    let every = watchdog.unwrap_or(STATUS_EVERY).min(STATUS_EVERY);
    let mut ticks = tokio::time::interval(every);
    loop {
        ticks.tick().await;
        let probe = {
            let core = Arc::clone(&core);
            tokio::task::spawn_blocking(move || core.counts_by_kind())
        };
        match tokio::time::timeout(every, probe).await {
            Ok(Ok(Ok(counts))) => {
                let total: i64 = counts.iter().map(|(_, n)| n).sum();
                let mut state = format!("STATUS=serving, {total} snapshots");
                if watchdog.is_some() {
                    state.push_str("\nWATCHDOG=1");
                }
                notifier.send(&state);
            }
            Ok(Ok(Err(e))) => {
                tracing::error!(error = %e, "the database does not answer; not feeding the watchdog")
            }
            _ => tracing::error!(
                "the database did not answer within {every:?}; not feeding the watchdog"
            ),
        }
    }
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
    let listener = crate::sockets::bind_private(path, 0o660)?;
    listener.set_nonblocking(true)?;
    let listener = UnixListener::from_std(listener)
        .with_context(|| format!("serving on {}", path.display()))?;
    let ino = std::fs::symlink_metadata(path)?.ino();
    Ok((listener, ino))
}

/// The root as the takeover protocol names it: canonical, so that two
/// spellings of one directory agree.
fn canonical(root: &Path) -> PathBuf {
    std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf())
}

/// What a takeover does to the serving side (see `crate::takeover`).
struct ServeGate {
    accepting: watch::Sender<bool>,
    handed: watch::Sender<bool>,
}

impl Gate for ServeGate {
    fn pause(&self) {
        let _ = self.accepting.send(false);
    }
    fn resume(&self) {
        let _ = self.accepting.send(true);
    }
    fn handed_over(&self) {
        let _ = self.handed.send(true);
    }
}

/// The connections on `listener`, accepted only when the gRPC server asks
/// for one and `open` says so: otherwise they wait in the backlog, for
/// this process once it asks again, or for the successor. (Accepting
/// ahead of the server would strand connections it never takes once it
/// stops: their requests would meet a reset.)
fn accept_while_open(
    listener: Arc<UnixListener>,
    open: watch::Receiver<bool>,
) -> impl futures::Stream<Item = io::Result<tokio::net::UnixStream>> {
    futures::stream::unfold((listener, open), |(listener, mut open)| async move {
        loop {
            // The guards `wait_for` returns are not Send: keep none.
            let opened = open.wait_for(|&o| o).await.is_ok();
            if !opened {
                return None;
            }
            tokio::select! {
                // A pause wins over a connection ready at the same moment.
                biased;
                _ = async { open.wait_for(|&o| !o).await.is_ok() } => {}
                accepted = listener.accept() => {
                    return Some((accepted.map(|(s, _)| s), (listener, open)));
                }
            }
        }
    })
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
