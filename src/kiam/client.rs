//! The gRPC client for a kiam server. Every address the server name resolves to is a server
//! in one balancer ([`super::balance`]: by latency, so in practice the servers in this node's
//! zone, and away from failing ones), re-resolved every `resolve_interval`; certificate files
//! are re-read when they change and every server is dialled again with them. Nothing here
//! fails because the server is unreachable: requests wait for it within their deadline, and
//! `/readyz` says not ready until `GetHealth` answers.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tower::discover::Change;

use super::balance::{self, Balanced, Dial, Server};
use super::proto::kiam_service_client::KiamServiceClient;
use super::proto::{self, GetHealthRequest, GetPodCredentialsRequest, GetPodRoleRequest};
use super::tls::{self, Files};
use super::{Config, FORBIDDEN, NO_POD_FOUND, POD_NOT_FOUND, code_label};
use crate::metrics::Metrics;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// The balancer over the server's addresses, which the generated client calls through.
type Balancer = Balanced<http::Request<Body>, http::Response<Body>>;

/// How a call ended, when it did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The server knows no pod at that IP (after retrying within the deadline).
    #[error("{NO_POD_FOUND}")]
    NoPod,
    /// The server's policy refuses the pod its role. Not retried.
    #[error("{FORBIDDEN}")]
    Forbidden,
    /// The server could not be reached or failed, within the deadline.
    #[error("kiam server: {0}")]
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("kiam.server {0:?} is not host:port")]
    Server(String),
    #[error(transparent)]
    Tls(#[from] tls::Error),
}

/// Cheap to clone; clones share the balancer.
#[derive(Clone)]
pub struct KiamClient {
    balancer: Balancer,
    deadline: Duration,
    healthy: Arc<AtomicBool>,
    metrics: Metrics,
}

/// Keeps the balancer's servers current: addresses and certificates.
pub struct Discovery {
    config: Config,
    host: String,
    tls: ClientTlsConfig,
    changes: balance::Changes<ServerAddress>,
}

/// One address of the kiam server, as tonic reaches it: a channel that connects when called
/// and reconnects after trouble (a connection failure fails the call, never `poll_ready`).
struct ServerAddress(Endpoint);

impl Dial for ServerAddress {
    type Service = Channel;

    fn dial(&self) -> Channel {
        self.0.connect_lazy()
    }

    /// `GetHealth` over a channel of its own: answered at all means reachable.
    fn probe(&self) -> BoxFuture<'static, bool> {
        let mut client = KiamServiceClient::new(self.dial());
        Box::pin(async move {
            let mut request = tonic::Request::new(GetHealthRequest {});
            request.set_timeout(HEALTH_TIMEOUT);
            let answer = tokio::time::timeout(HEALTH_TIMEOUT, client.get_health(request)).await;
            matches!(answer, Ok(Ok(_)))
        })
    }
}

impl KiamClient {
    /// The client, and the discovery that must run beside it. Reads the certificates now, so
    /// a missing file is a start-up error; the server itself may be down.
    pub fn new(config: &Config, metrics: Metrics) -> Result<(KiamClient, Discovery), SetupError> {
        let (host, _) = config
            .host_port()
            .ok_or_else(|| SetupError::Server(config.server.clone()))?;
        let tls = files(config).load(host)?;
        let (balancer, changes) = balance::balanced(64);
        let client = KiamClient {
            balancer,
            deadline: config.request_deadline,
            healthy: Arc::new(AtomicBool::new(false)),
            metrics,
        };
        let discovery = Discovery {
            config: config.clone(),
            host: host.to_owned(),
            tls,
            changes,
        };
        Ok((client, discovery))
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// `GetPodRole`: the role annotation of the pod at `ip`.
    pub async fn pod_role(&self, ip: IpAddr) -> Result<String, CallError> {
        let request = GetPodRoleRequest { ip: ip.to_string() };
        self.call(
            "GetPodRole",
            self.deadline,
            move |mut client, request_deadline| {
                let mut request = tonic::Request::new(request.clone());
                request.set_timeout(request_deadline);
                async move { client.get_pod_role(request).await }
            },
        )
        .await
        .map(|role| role.name)
    }

    /// `GetPodCredentials`: credentials for the pod at `ip` and its role `role`.
    pub async fn pod_credentials(
        &self,
        ip: IpAddr,
        role: &str,
    ) -> Result<proto::Credentials, CallError> {
        let request = GetPodCredentialsRequest {
            ip: ip.to_string(),
            role: role.to_owned(),
        };
        self.call(
            "GetPodCredentials",
            self.deadline,
            move |mut client, request_deadline| {
                let mut request = tonic::Request::new(request.clone());
                request.set_timeout(request_deadline);
                async move { client.get_pod_credentials(request).await }
            },
        )
        .await
    }

    /// `GetHealth`, once.
    pub async fn health(&self) -> Result<String, CallError> {
        self.call(
            "GetHealth",
            HEALTH_TIMEOUT,
            |mut client, request_deadline| {
                let mut request = tonic::Request::new(GetHealthRequest {});
                request.set_timeout(request_deadline);
                async move { client.get_health(request).await }
            },
        )
        .await
        .map(|status| status.message)
    }

    /// Asks the server every few seconds whether it is healthy, until `cancel`.
    pub async fn watch_health(&self, cancel: CancellationToken) {
        loop {
            let healthy = matches!(self.health().await.as_deref(), Ok("ok"));
            let was = self.healthy.swap(healthy, Ordering::Relaxed);
            if healthy != was {
                if healthy {
                    tracing::info!("kiam server is healthy");
                } else {
                    tracing::warn!("kiam server is not answering GetHealth");
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(HEALTH_INTERVAL) => {}
            }
        }
    }

    /// One call with retries: exponential backoff from 5 ms while the server is unreachable or
    /// knows no such pod, never past `deadline`; `forbidden by policy` ends it at once.
    async fn call<T, F, Fut>(
        &self,
        method: &'static str,
        deadline: Duration,
        send: F,
    ) -> Result<T, CallError>
    where
        F: Fn(KiamServiceClient<Balancer>, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = Instant::now();
        let until = started + deadline;
        let mut backoff = FIRST_BACKOFF;
        // The server's last word: a deadline that cuts a retry short must not hide that the
        // server said it knows no such pod.
        let mut no_pod = false;
        loop {
            let attempt = Instant::now();
            let left = until.saturating_duration_since(attempt);
            let client = KiamServiceClient::new(self.balancer.clone());
            let outcome = tokio::time::timeout_at(until, send(client, left)).await;
            let (code, result) = match outcome {
                Err(_) => (
                    "deadline_exceeded",
                    Err(CallError::Failed(format!("no answer within {deadline:?}"))),
                ),
                Ok(Ok(response)) => ("ok", Ok(response.into_inner())),
                Ok(Err(status)) => {
                    let code = code_label(status.code());
                    let error = if status.message() == FORBIDDEN {
                        CallError::Forbidden
                    } else if [NO_POD_FOUND, POD_NOT_FOUND].contains(&status.message()) {
                        CallError::NoPod
                    } else {
                        CallError::Failed(format!("{}: {}", status.code(), status.message()))
                    };
                    (code, Err(error))
                }
            };
            self.metrics
                .observe_kiam_call(method, code, attempt.elapsed());
            match result {
                Ok(value) => return Ok(value),
                Err(CallError::Forbidden) => return Err(CallError::Forbidden),
                Err(error) => {
                    no_pod |= error == CallError::NoPod;
                    if Instant::now() + backoff >= until {
                        return Err(if no_pod { CallError::NoPod } else { error });
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

fn files(config: &Config) -> Files<'_> {
    Files {
        cert: &config.cert,
        key: &config.key,
        ca: &config.ca,
    }
}

impl Discovery {
    fn endpoint(&self, addr: SocketAddr) -> Option<Endpoint> {
        let endpoint = Endpoint::from_shared(format!("https://{addr}"))
            .and_then(|e| e.tls_config(self.tls.clone()));
        match endpoint {
            Ok(endpoint) => Some(
                endpoint
                    .connect_timeout(CONNECT_TIMEOUT)
                    .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                    .keep_alive_while_idle(true),
            ),
            Err(err) => {
                tracing::error!(%addr, error = %err, "cannot build a kiam endpoint");
                None
            }
        }
    }

    /// Balances over `addr` from now on, replacing any server there before.
    async fn insert(&self, addr: SocketAddr) {
        if let Some(endpoint) = self.endpoint(addr) {
            let server = Server::new(addr, ServerAddress(endpoint));
            let _ = self.changes.send(Change::Insert(addr, server)).await;
        }
    }

    async fn remove(&self, addr: SocketAddr) {
        let _ = self.changes.send(Change::Remove(addr)).await;
    }

    /// Re-resolves the server name and re-reads the certificates until `cancel`.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut current: HashSet<SocketAddr> = HashSet::new();
        let mut fingerprint = files(&self.config).fingerprint();
        let mut next_resolve = Instant::now();
        let tick = self
            .config
            .reload_interval
            .min(self.config.resolve_interval);
        loop {
            let fresh = files(&self.config).fingerprint();
            if fresh != fingerprint {
                match files(&self.config).load(&self.host) {
                    Ok(tls) => {
                        self.tls = tls;
                        fingerprint = fresh;
                        for addr in &current {
                            self.insert(*addr).await;
                        }
                        tracing::info!("kiam certificates changed; connections rebuilt with them");
                    }
                    // Mid-rotation files may be half written: keep the old ones, try again.
                    Err(err) => tracing::warn!(error = %err, "cannot reload the kiam certificates"),
                }
            }
            if Instant::now() >= next_resolve {
                next_resolve = Instant::now() + self.config.resolve_interval;
                match tokio::net::lookup_host(self.config.server.as_str()).await {
                    Ok(addrs) => {
                        let resolved: HashSet<SocketAddr> = addrs.collect();
                        for gone in current.difference(&resolved) {
                            self.remove(*gone).await;
                        }
                        for new in resolved.difference(&current) {
                            self.insert(*new).await;
                        }
                        if resolved != current {
                            let mut list: Vec<_> =
                                resolved.iter().map(ToString::to_string).collect();
                            list.sort();
                            tracing::info!(server = self.config.server.as_str(), addresses = ?list, "kiam server addresses");
                        }
                        current = resolved;
                    }
                    Err(err) => {
                        tracing::warn!(server = self.config.server.as_str(), error = %err, "cannot resolve the kiam server")
                    }
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(tick) => {}
            }
        }
    }
}
