//! The one HTTP/1.1 serving loop behind both listeners: bounded connections, header size and
//! idle time, and a graceful, bounded drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Limits applied to every connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Time allowed to send a request's headers, and to keep an idle connection.
    pub idle_timeout: Duration,
    /// Time allowed to drain in-flight requests at shutdown.
    pub shutdown_grace: Duration,
}

/// Request head and buffered body are capped here; a larger head is answered 431.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Serves `handler` on `listener` until `cancel` fires, then drains for at most
/// `limits.shutdown_grace`.
pub async fn serve<H, F>(
    listener: TcpListener,
    limits: Limits,
    cancel: CancellationToken,
    handler: H,
) -> std::io::Result<()>
where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    serve_admitting(listener, limits, cancel, |_| Some(()), handler).await
}

/// As [`serve`], asking `admit` about each accepted connection first: a connection it refuses
/// (`None`) is closed at once; what it grants is held until the connection ends.
pub async fn serve_admitting<A, T, H, F>(
    listener: TcpListener,
    limits: Limits,
    cancel: CancellationToken,
    admit: A,
    handler: H,
) -> std::io::Result<()>
where
    A: Fn(SocketAddr) -> Option<T>,
    T: Send + 'static,
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            () = cancel.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, remote) = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Per-connection errors (e.g. reset before accept, out of file descriptors)
                    // must not end the server; back off briefly instead.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(ticket) = admit(remote) else {
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        let service = hyper::service::service_fn(move |request| {
            let response = handler(remote, request);
            async move { Ok::<_, Infallible>(response.await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.idle_timeout)
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%remote, error = %err, "connection ended with an error");
            }
            drop(ticket);
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace = ?limits.shutdown_grace,
            "shutdown grace period ended with requests still in flight"
        );
    }
    Ok(())
}
