//! The one HTTP/1.1 serving loop behind both listeners: bounded connections, header size and
//! idle time, and a graceful, bounded drain on shutdown.
//!
//! Idle time is watched per connection, not per request: a connection is closed once it has
//! answered nothing for `idle_timeout` and is answering nothing now, which also cuts off a head
//! that never completes (slowloris). hyper's own header-read timeout would arm and disarm a
//! timer for every request on a keep-alive connection; this arms one per `idle_timeout`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
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
    serve_admitting(
        listener,
        limits,
        cancel,
        |_| Some(()),
        move |remote, _: &(), request| handler(remote, request),
    )
    .await
}

/// As [`serve`], asking `admit` about each accepted connection first: a connection it refuses
/// (`None`) is closed at once; what it grants is held until the connection ends, and shown to
/// the handler with each request on the connection.
pub async fn serve_admitting<A, T, H, F>(
    listener: TcpListener,
    limits: Limits,
    cancel: CancellationToken,
    admit: A,
    handler: H,
) -> std::io::Result<()>
where
    A: Fn(SocketAddr) -> Option<T>,
    T: Send + Sync + 'static,
    H: Fn(SocketAddr, &T, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let epoch = Instant::now();
    // Made once: a cancellation future registers itself when first polled.
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => tokio::select! {
                () = &mut cancelled => break,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            },
        };
        let (stream, remote) = tokio::select! {
            biased;
            () = &mut cancelled => break,
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
        let activity = Arc::new(Activity::new(epoch));
        let watched = activity.clone();
        // The service owns the ticket: it goes when the connection ends.
        let service = hyper::service::service_fn(move |request| {
            let answering = Answering::new(&activity);
            let response = handler(remote, &ticket, request);
            async move {
                let response = response.await;
                drop(answering);
                Ok::<_, Infallible>(response)
            }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            tokio::select! {
                biased;
                ended = connection => if let Err(err) = ended {
                    tracing::debug!(%remote, error = %err, "connection ended with an error");
                },
                () = watched.idle(limits.idle_timeout) => {
                    tracing::debug!(%remote, "idle connection closed");
                }
            }
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

/// When a connection last finished answering a request (or was accepted), and how many
/// requests it is answering now.
struct Activity {
    epoch: Instant,
    /// Nanoseconds after `epoch`.
    since: AtomicU64,
    answering: AtomicUsize,
}

impl Activity {
    fn new(epoch: Instant) -> Activity {
        let activity = Activity {
            epoch,
            since: AtomicU64::new(0),
            answering: AtomicUsize::new(0),
        };
        activity.touch();
        activity
    }

    fn touch(&self) {
        let now = Instant::now().duration_since(self.epoch).as_nanos();
        self.since
            .store(u64::try_from(now).unwrap_or(u64::MAX), Ordering::Release);
    }

    fn since(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.since.load(Ordering::Acquire))
    }

    /// Completes once the connection has answered nothing for `idle` and answers nothing now.
    async fn idle(&self, idle: Duration) {
        loop {
            let Some(deadline) = self.since().checked_add(idle) else {
                // An idle time beyond the clock's range: never idle.
                return std::future::pending().await;
            };
            if Instant::now() < deadline {
                tokio::time::sleep_until(deadline).await;
            } else if self.answering.load(Ordering::Acquire) == 0 {
                return;
            } else {
                // Answering a request (bounded by its own timeout): look again later.
                tokio::time::sleep(idle).await;
            }
        }
    }
}

/// Counts a request as being answered for as long as it lives; its end is the connection's
/// latest activity.
struct Answering(Arc<Activity>);

impl Answering {
    fn new(activity: &Arc<Activity>) -> Answering {
        activity.answering.fetch_add(1, Ordering::AcqRel);
        Answering(activity.clone())
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.touch();
        self.0.answering.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_after_the_idle_time_and_never_for_an_endless_one() {
        let activity = Activity::new(Instant::now());
        tokio::time::timeout(Duration::from_secs(3600), activity.idle(Duration::MAX))
            .await
            .expect_err("an endless idle time ended");
        let activity = Activity::new(Instant::now());
        tokio::time::timeout(
            Duration::from_secs(3600),
            activity.idle(Duration::from_millis(10)),
        )
        .await
        .expect("idle after 10 ms with nothing answered");
    }
}
