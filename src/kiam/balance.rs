//! Balancing over the kiam server's addresses by observed latency, so that an agent talks to
//! the servers in its own zone (cross-zone traffic is billed) and moves away from a slow or
//! dying one.
//!
//! tower's power-of-two-choices [`Balance`] sends each call to the cheaper of two servers
//! drawn at random (with two servers: always the cheaper). A server's cost is its peak-EWMA
//! latency ([`PeakEwma`]): the worst recent round trip, fading over [`DECAY`], times the calls
//! in flight to it. Because an unused server's cost fades too, a slower server gets a call now
//! and then, which is how a server that became faster is noticed. A new server's cost starts
//! below any measured one, so every address is tried as soon as it appears; until it first
//! answers, though, it gets one call at a time (an address that swallows packets would
//! otherwise draw every call for a connect timeout).
//!
//! Peak-EWMA alone would favour a dead server: a refused connection fails in microseconds and
//! looks cheap. So a server whose call fails below gRPC (refused, reset, TLS, connect timeout)
//! is *failing*: it ranks behind every server that answers, whatever the latencies, and is
//! probed ([`Dial::probe`]) in the background with backoff until it answers again. Calls reach
//! a failing server only when every server is failing; the caller's retries then decide.
//!
//! [`Balance`] drops a server whose `poll_ready` fails until it is discovered again. tonic's
//! lazy channels report connection trouble on calls, not there, so that does not happen to a
//! dead server; should it happen anyway (a channel whose worker is gone), the server is dialled
//! again in place instead of being lost until its address changes.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::Change;
use tower::load::peak_ewma::Cost;
use tower::load::{CompleteOnResponse, Load, PeakEwma};
use tower::util::BoxService;
use tower::{BoxError, Service};

/// How long a measured latency takes to fade to 1/e. Shorter: a server recovers sooner from
/// one slow call, and a slower server is tried more often (every `DECAY · ln(slow/fast)`,
/// about 2 s when it is three times slower).
const DECAY: Duration = Duration::from_secs(2);
/// The latency assumed of a server that has not answered yet: below any measured one.
const UNMEASURED: Duration = Duration::from_nanos(1);
const FIRST_PROBE: Duration = Duration::from_millis(100);
const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// Calls waiting for the balancer to pick a server (tonic's default).
const QUEUE: usize = 1024;

/// How to reach one server address.
pub trait Dial: Send + Sync + 'static {
    type Service: Send + 'static;

    /// A service for the address that connects, and reconnects, on its own when called.
    fn dial(&self) -> Self::Service;

    /// Whether the server answers now.
    fn probe(&self) -> BoxFuture<'static, bool>;
}

/// The balancer, shared by clones: calls queue for it and it sends each to a server.
pub struct Balanced<Req, Rsp> {
    queue: Buffer<Req, BoxFuture<'static, Result<Rsp, BoxError>>>,
}

impl<Req: Send + 'static, Rsp: 'static> Clone for Balanced<Req, Rsp> {
    fn clone(&self) -> Self {
        Balanced {
            queue: self.queue.clone(),
        }
    }
}

/// Why a call through the balancer failed: the connection's or the server's trouble, as the
/// source (where tonic looks for the gRPC status it becomes).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(#[source] BoxError);

/// Where to send the servers to balance over (inserting a server at an address already known
/// replaces it).
pub type Changes<D> = mpsc::Sender<Change<SocketAddr, Server<D>>>;

/// What a server's service answers to `Req`.
type Answer<D, Req> = <<D as Dial>::Service as Service<Req>>::Response;

/// The balancer, and where to send it its servers.
pub fn balanced<D, Req>(capacity: usize) -> (Balanced<Req, Answer<D, Req>>, Changes<D>)
where
    D: Dial,
    D::Service: Service<Req>,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
    <D::Service as Service<Req>>::Future: Send + 'static,
    <D::Service as Service<Req>>::Response: Send + 'static,
    Req: Send + 'static,
{
    let (changes, receiver) = mpsc::channel(capacity);
    // Boxed, as in tonic: with the balancer's own future type in it, callers' futures fail
    // the compiler's `Send` checks.
    let balance = BoxService::new(Balance::new(Servers { changes: receiver }));
    let queue = Buffer::new(balance, QUEUE);
    (Balanced { queue }, changes)
}

impl<Req, Rsp> Service<Req> for Balanced<Req, Rsp>
where
    Req: Send + 'static,
    Rsp: Send + 'static,
{
    type Response = Rsp;
    type Error = Error;
    type Future = ResponseFuture<Rsp>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.queue.poll_ready(cx).map_err(Error)
    }

    fn call(&mut self, request: Req) -> ResponseFuture<Rsp> {
        ResponseFuture {
            response: self.queue.call(request),
        }
    }
}

/// A call's answer, once the balancer has sent it to a server and the server answered.
pub struct ResponseFuture<Rsp> {
    response: tower::buffer::future::ResponseFuture<BoxFuture<'static, Result<Rsp, BoxError>>>,
}

impl<Rsp> Future for ResponseFuture<Rsp> {
    type Output = Result<Rsp, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.response).poll(cx).map_err(Error)
    }
}

/// The servers as tower's balancer discovers them.
pub struct Servers<D: Dial> {
    changes: mpsc::Receiver<Change<SocketAddr, Server<D>>>,
}

impl<D: Dial> Stream for Servers<D> {
    type Item = Result<Change<SocketAddr, Server<D>>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.changes.poll_recv(cx).map(|change| change.map(Ok))
    }
}

/// One server address: its service, the latency measured through it, and whether it fails.
pub struct Server<D: Dial> {
    dialer: Arc<D>,
    service: PeakEwma<D::Service>,
    health: Arc<Health>,
}

impl<D: Dial> Server<D> {
    pub fn new(addr: SocketAddr, dialer: D) -> Server<D> {
        let dialer = Arc::new(dialer);
        Server {
            service: measured(dialer.dial()),
            dialer,
            health: Arc::new(Health {
                addr,
                state: Mutex::default(),
            }),
        }
    }
}

fn measured<S>(service: S) -> PeakEwma<S> {
    PeakEwma::new(
        service,
        UNMEASURED,
        DECAY.as_nanos() as f64,
        CompleteOnResponse::default(),
    )
}

impl<D, Req> Service<Req> for Server<D>
where
    D: Dial,
    D::Service: Service<Req>,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
    <D::Service as Service<Req>>::Future: Send + 'static,
    <D::Service as Service<Req>>::Response: Send + 'static,
{
    type Response = <D::Service as Service<Req>>::Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self.service.poll_ready(cx) {
            Poll::Ready(Err(error)) => {
                Health::failed(&self.health, &error.into(), &self.dialer);
                self.service = measured(self.dialer.dial());
                self.service.poll_ready(cx).map_err(Into::into)
            }
            ready => ready.map_err(Into::into),
        }
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let response = self.service.call(request);
        let health = self.health.clone();
        let dialer = self.dialer.clone();
        let in_flight = InFlight::new(&health);
        Box::pin(async move {
            let outcome = response.await.map_err(Into::into);
            drop(in_flight);
            match &outcome {
                Ok(_) => health.answered(),
                Err(error) => Health::failed(&health, error, &dialer),
            }
            outcome
        })
    }
}

/// What the balancer compares, in this order: a failing server costs more than any other; a
/// server that has never answered costs more than any other while a call to it is in flight;
/// then the lower peak-EWMA cost wins.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct ServerLoad {
    failing: bool,
    untried_and_busy: bool,
    latency: Cost,
}

impl<D: Dial> Load for Server<D> {
    type Metric = ServerLoad;

    fn load(&self) -> ServerLoad {
        let state = self.health.lock();
        ServerLoad {
            failing: state.failing,
            untried_and_busy: !state.ever_answered && state.in_flight > 0,
            latency: self.service.load(),
        }
    }
}

/// A call in flight to a server, until it ends or is given up.
struct InFlight(Arc<Health>);

impl InFlight {
    fn new(health: &Arc<Health>) -> InFlight {
        health.lock().in_flight += 1;
        InFlight(health.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().in_flight -= 1;
    }
}

/// Whether a server is failing, shared by its calls and its probe.
struct Health {
    addr: SocketAddr,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    failing: bool,
    probing: bool,
    ever_answered: bool,
    in_flight: usize,
}

impl Health {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn answered(&self) {
        self.answered_locked(&mut self.lock());
    }

    /// Marks the server failing and makes sure one probe runs until it answers.
    fn failed<D: Dial>(health: &Arc<Health>, error: &BoxError, dialer: &Arc<D>) {
        let (news, start_probe) = {
            let mut state = health.lock();
            let news = !state.failing;
            let start_probe = !state.probing;
            state.failing = true;
            state.probing = true;
            (news, start_probe)
        };
        if news {
            tracing::warn!(
                server = %health.addr,
                error = %error_chain(error.as_ref()),
                "kiam server failing: calls go to the other servers while it is probed"
            );
        }
        if start_probe {
            tokio::spawn(probe(Arc::downgrade(health), dialer.clone()));
        }
    }

    /// Records a probe's outcome; whether to probe again.
    fn probed(&self, answered: bool) -> bool {
        let mut state = self.lock();
        if answered {
            self.answered_locked(&mut state);
        }
        state.probing = state.failing;
        state.probing
    }

    fn answered_locked(&self, state: &mut State) {
        state.ever_answered = true;
        if state.failing {
            state.failing = false;
            tracing::info!(server = %self.addr, "kiam server answers again");
        }
    }
}

/// Probes a failing server with backoff until it answers, a call to it succeeds, or it is no
/// longer balanced over (removed or replaced).
async fn probe<D: Dial>(health: Weak<Health>, dialer: Arc<D>) {
    let mut wait = FIRST_PROBE;
    loop {
        tokio::time::sleep(wait).await;
        let Some(health) = health.upgrade() else {
            return;
        };
        let answered = dialer.probe().await;
        if !health.probed(answered) {
            return;
        }
        wait = (wait * 2).min(MAX_PROBE_INTERVAL);
    }
}

/// An error and its causes on one line (a transport error says little at the top).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use tower::ServiceExt;

    use super::*;

    /// A server that answers its name after `latency`, or, while down, refuses at once (as a
    /// closed port does). It counts the calls that reach it and the times it was dialled.
    #[derive(Clone)]
    struct FakeServer {
        name: &'static str,
        latency: Duration,
        down: Arc<AtomicBool>,
        calls: Arc<AtomicUsize>,
        dialled: Arc<AtomicUsize>,
        /// The next service dialled fails `poll_ready` once, as a channel whose worker died.
        broken: Arc<AtomicBool>,
    }

    impl FakeServer {
        fn new(name: &'static str, latency_ms: u64) -> FakeServer {
            FakeServer {
                name,
                latency: Duration::from_millis(latency_ms),
                down: Arc::default(),
                calls: Arc::default(),
                dialled: Arc::default(),
                broken: Arc::default(),
            }
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        fn set_down(&self, down: bool) {
            self.down.store(down, Ordering::SeqCst);
        }
    }

    struct Connection {
        server: FakeServer,
        broken: bool,
    }

    impl Service<()> for Connection {
        type Response = &'static str;
        type Error = BoxError;
        type Future = BoxFuture<'static, Result<&'static str, BoxError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            if self.broken {
                return Poll::Ready(Err("worker gone".into()));
            }
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, (): ()) -> Self::Future {
            let server = self.server.clone();
            Box::pin(async move {
                server.calls.fetch_add(1, Ordering::SeqCst);
                if server.down.load(Ordering::SeqCst) {
                    return Err("connection refused".into());
                }
                tokio::time::sleep(server.latency).await;
                Ok(server.name)
            })
        }
    }

    impl Dial for FakeServer {
        type Service = Connection;

        fn dial(&self) -> Connection {
            self.dialled.fetch_add(1, Ordering::SeqCst);
            Connection {
                server: self.clone(),
                broken: self.broken.swap(false, Ordering::SeqCst),
            }
        }

        fn probe(&self) -> BoxFuture<'static, bool> {
            let down = self.down.load(Ordering::SeqCst);
            Box::pin(async move { !down })
        }
    }

    /// The balancer over `servers`, and the sender of its changes (to keep while it is used).
    async fn balancer(
        servers: &[&FakeServer],
    ) -> (Balanced<(), &'static str>, Changes<FakeServer>) {
        let (balanced, changes) = balanced::<FakeServer, ()>(8);
        for (n, server) in (1..).zip(servers) {
            let addr = SocketAddr::from(([10, 0, 0, n], 443));
            let server = Server::new(addr, (*server).clone());
            changes
                .send(Change::Insert(addr, server))
                .await
                .expect("send");
        }
        (balanced, changes)
    }

    /// `count` calls one after the other, `every` apart; how many succeeded. A call that
    /// finds no server to go to fails too (after a while of virtual time), rather than hang.
    async fn calls(balanced: &Balanced<(), &'static str>, count: usize, every: Duration) -> usize {
        let mut answered = 0;
        for _ in 0..count {
            let call = balanced.clone().oneshot(());
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(10), call).await {
                answered += 1;
            }
            tokio::time::sleep(every).await;
        }
        answered
    }

    #[tokio::test(start_paused = true)]
    async fn calls_go_to_the_faster_server_and_the_slower_one_is_tried_now_and_then() {
        let (near, far) = (FakeServer::new("near", 1), FakeServer::new("far", 40));
        let (balanced, _changes) = balancer(&[&near, &far]).await;
        // A minute of calls, ten a second.
        assert_eq!(calls(&balanced, 600, Duration::from_millis(100)).await, 600);
        // Both were tried at once (new servers are), the far one again every few seconds.
        assert!(far.calls() > 1, "the far server was never tried again");
        assert!(
            near.calls() >= 570,
            "near {}, far {}",
            near.calls(),
            far.calls()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_server_ranks_last_until_it_answers_again() {
        let (near, far) = (FakeServer::new("near", 1), FakeServer::new("far", 40));
        let (balanced, _changes) = balancer(&[&near, &far]).await;
        calls(&balanced, 10, Duration::from_millis(100)).await;
        let near_before = near.calls();

        // Refused at once: cheaper than ever by latency, yet one failed call is all it gets.
        near.set_down(true);
        let answered = calls(&balanced, 100, Duration::from_millis(100)).await;
        assert_eq!(answered, 99);
        assert_eq!(near.calls(), near_before + 1);

        // Back: the probe notices within its longest interval, and the calls return.
        near.set_down(false);
        tokio::time::sleep(MAX_PROBE_INTERVAL).await;
        let (near_before, far_before) = (near.calls(), far.calls());
        assert_eq!(calls(&balanced, 50, Duration::from_millis(100)).await, 50);
        assert!(near.calls() - near_before >= 45);
        assert!(far.calls() - far_before <= 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_server_gets_one_call_at_a_time_until_it_answers() {
        let near = FakeServer::new("near", 1);
        let (balanced, changes) = balancer(&[&near]).await;
        calls(&balanced, 5, Duration::from_millis(10)).await;
        // An address that swallows packets: a call to it waits for the connect timeout.
        let hole = FakeServer::new("hole", 60_000);
        let addr = SocketAddr::from(([10, 0, 0, 9], 443));
        let server = Server::new(addr, hole.clone());
        changes
            .send(Change::Insert(addr, server))
            .await
            .expect("send");

        let burst = (0..10).map(|_| {
            let call = balanced.clone().oneshot(());
            tokio::time::timeout(Duration::from_secs(2), call)
        });
        let answered = futures::future::join_all(burst)
            .await
            .into_iter()
            .filter(|outcome| matches!(outcome, Ok(Ok(_))))
            .count();
        assert_eq!(hole.calls(), 1);
        assert_eq!(answered, 9);
    }

    #[tokio::test(start_paused = true)]
    async fn failing_servers_still_get_calls_when_all_fail() {
        let (one, two) = (FakeServer::new("one", 1), FakeServer::new("two", 1));
        let (balanced, _changes) = balancer(&[&one, &two]).await;
        one.set_down(true);
        two.set_down(true);
        // The calls fail (the caller retries), rather than wait for a server that answers.
        assert_eq!(calls(&balanced, 10, Duration::from_millis(10)).await, 0);
        assert_eq!(one.calls() + two.calls(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_whose_readiness_fails_is_dialled_again_not_dropped() {
        let only = FakeServer::new("only", 1);
        only.broken.store(true, Ordering::SeqCst);
        let (balanced, _changes) = balancer(&[&only]).await;
        assert_eq!(calls(&balanced, 5, Duration::from_millis(10)).await, 5);
        assert_eq!(only.dialled.load(Ordering::SeqCst), 2);
    }
}
