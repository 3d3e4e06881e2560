//! The `/metrics` endpoint: an HTTP/1 listener on a TCP address or a unix
//! socket that answers each scrape with [`metrics::render`].
//!
//! Written on hyper rather than with metrics-exporter-prometheus's own
//! listener (its `http-listener`/`uds-listener` features): that one renders
//! the recorder as it is, with no hook to read the database's gauges at
//! scrape time, so they would need a timer running SQL whether or not
//! anyone scrapes, and go stale between ticks. This one also stops with
//! the daemon's shutdown, and answers only `GET /metrics`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::config::MetricsAddress;
use crate::metrics::{self, State};

/// Serves `/metrics` on `address` until `shutdown` resolves. Each scrape
/// reads the database on the blocking pool, like any other call.
pub async fn serve(
    address: &MetricsAddress,
    state: Arc<dyn State>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = match address {
        MetricsAddress::Tcp(a) => Listener::Tcp(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding the metrics address {a}"))?,
        ),
        MetricsAddress::Unix(p) => {
            if std::fs::symlink_metadata(p).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            }) {
                let _ = std::fs::remove_file(p);
            }
            Listener::Unix(
                tokio::net::UnixListener::bind(p)
                    .with_context(|| format!("binding the metrics socket {}", p.display()))?,
            )
        }
    };
    tracing::info!(address = %address, "serving Prometheus metrics at /metrics");
    Ok(tokio::spawn(async move {
        tokio::pin!(shutdown);
        loop {
            let io = tokio::select! {
                _ = &mut shutdown => return,
                io = listener.accept() => io,
            };
            match io {
                Ok(io) => {
                    let state = Arc::clone(&state);
                    tokio::spawn(serve_connection(io, state));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }))
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

type Io = Box<dyn AsyncStream>;
trait AsyncStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> AsyncStream for T {}

impl Listener {
    async fn accept(&self) -> std::io::Result<Io> {
        Ok(match self {
            Listener::Tcp(l) => Box::new(l.accept().await?.0),
            Listener::Unix(l) => Box::new(l.accept().await?.0),
        })
    }
}

async fn serve_connection(io: Io, state: Arc<dyn State>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Method, Response, StatusCode};

    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let state = Arc::clone(&state);
        async move {
            let reply = |status: StatusCode, content_type: &str, body: String| {
                Response::builder()
                    .status(status)
                    .header("content-type", content_type)
                    .body(Full::new(Bytes::from(body)))
            };
            if req.uri().path() != "/metrics" {
                return reply(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "ontop serves /metrics only\n".into(),
                );
            }
            if req.method() != Method::GET && req.method() != Method::HEAD {
                return reply(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "text/plain",
                    "GET /metrics\n".into(),
                );
            }
            match tokio::task::spawn_blocking(move || metrics::render(&*state)).await {
                Ok(text) => reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    text,
                ),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("rendering metrics failed: {e}\n"),
                ),
            }
        }
    });
    let io = hyper_util::rt::TokioIo::new(io);
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await
    {
        tracing::debug!(error = %e, "metrics connection ended with an error");
    }
}
