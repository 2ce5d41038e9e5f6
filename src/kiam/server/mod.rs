//! `iamlet server`: the kiam-compatible server, so that clusters whose worker nodes must not
//! hold `sts:AssumeRole` need nothing but iamlet. It serves `kiam.KiamService` over mutual TLS
//! with kiam v4's semantics, from the same stack as the standalone agent ([`Local`](crate::broker::Local): the pod
//! index, policy, the prefetching cache and the STS rate limiter), watching every pod in the
//! cluster instead of one node's.
//!
//! - `service`: the three RPCs and their error texts;
//! - `tls`: the server certificate, and client certificates required and checked against the
//!   CA, all re-read when their files change;
//! - here: the `[server]` section, and build-then-run under the supervisor.
//!
//! With `assume_role_arn`, iamlet first assumes that role with its own credentials and calls
//! every AssumeRole with the result (kiam's `--assume-role-arn`); that role's credentials are
//! cached and refreshed ahead of expiry like any pod's.

mod service;
mod tls;

pub use tls::Error as TlsError;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider, future};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use self::service::Service;
use self::tls::Acceptor;
use super::proto::kiam_service_server::KiamServiceServer;
use crate::admin;
use crate::app::{self, BuildError};
use crate::broker::Broker;
use crate::clock::SystemClock;
use crate::config::Config as IamletConfig;
use crate::credentials::{AssumeRoleRequest, Cache, RateLimiter, StsSource};
use crate::http_server::Limits;
use crate::imds::Upstream;
use crate::metrics::Metrics;
use crate::mode::{self, Background, LocalBroker};
use crate::pods::Scope;
use crate::policy::{RoleArn, SessionName};
use crate::supervisor::{Supervisor, TaskExited};

/// The `[server]` section (`iamlet server` only).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the gRPC server listens on.
    pub listen: SocketAddr,
    /// Server certificate (PEM), as cert-manager writes it into a Secret.
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to (PEM).
    pub ca: PathBuf,
    /// A role assumed first, with iamlet's own credentials, and used for every AssumeRole;
    /// empty = iamlet's own credentials are used directly.
    pub assume_role_arn: String,
    /// How often the certificate files are checked for changes (rotation by cert-manager).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Time allowed for a TLS handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: ([0, 0, 0, 0], 9610).into(),
            cert: PathBuf::from("/etc/iamlet/tls/tls.crt"),
            key: PathBuf::from("/etc/iamlet/tls/tls.key"),
            ca: PathBuf::from("/etc/iamlet/tls/ca.crt"),
            assume_role_arn: String::new(),
            reload_interval: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// The session name of the `assume_role_arn` session, as CloudTrail shows it.
const SERVER_SESSION_NAME: &str = "iamlet-server";

/// How long iamlet waits on the node's IMDS when it derives the base role ARN.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Tls(#[from] tls::Error),
}

pub struct Server {
    grpc_listener: TcpListener,
    admin_listener: TcpListener,
    status_listener: Option<tokio::net::UnixListener>,
    acceptor: Arc<Acceptor>,
    broker: Arc<LocalBroker>,
    background: Background,
    metrics: Metrics,
    config: Config,
    limits: Limits,
}

impl Server {
    /// Binds both listeners, reads the certificates, and builds the stack (Kubernetes and STS
    /// clients); nothing is served yet.
    pub async fn build(config: IamletConfig) -> Result<Server, ServerError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let grpc_listener = app::bind("server.listen", config.server.listen).await?;
        let admin_listener = app::bind("admin.listen", config.admin.listen).await?;
        let status_listener = app::bind_status(&config.admin).await?;
        let acceptor = Arc::new(Acceptor::load(&config.server)?);
        let metrics = Metrics::default();
        let upstream = Upstream::new(&config.imds.upstream, &[], UPSTREAM_TIMEOUT)
            .map_err(BuildError::Upstream)?;
        let base_role_arn = mode::base_role_arn(&config, &upstream)
            .await
            .map_err(BuildError::from)?;
        let sts_credentials = match RoleArn::parse(&config.server.assume_role_arn) {
            // Validated with the config: empty is the only other value.
            Err(_) => None,
            Ok(role_arn) => Some(assumed_first(&config, role_arn, &metrics).await?),
        };
        let (broker, kubernetes) = mode::local_stack(
            &config,
            Scope::Cluster,
            base_role_arn,
            sts_credentials,
            &metrics,
        )
        .await
        .map_err(BuildError::from)?;
        let broker = Arc::new(broker);
        Ok(Server {
            grpc_listener,
            admin_listener,
            status_listener,
            acceptor,
            background: Background::Standalone(broker.clone(), kubernetes),
            broker,
            metrics,
            limits: Limits {
                max_connections: config.imds.max_connections,
                idle_timeout: config.imds.idle_timeout,
                shutdown_grace: config.imds.shutdown_grace,
            },
            config: config.server,
        })
    }

    /// The bound gRPC address (useful when configured with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        app::local_addr(&self.grpc_listener)
    }

    /// Serves until `shutdown` completes or a task dies, then drains within the grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), TaskExited> {
        let supervisor = Supervisor::default();
        let broker = self.broker.clone();
        let readiness: admin::Readiness = Arc::new(move || broker.readiness());
        supervisor.spawn(
            "admin server",
            admin::serve(
                self.admin_listener,
                readiness,
                self.metrics.clone(),
                self.limits,
                supervisor.cancel(),
            ),
        );
        if let Some(listener) = self.status_listener {
            let broker = self.broker.clone();
            supervisor.spawn(
                "status socket",
                crate::status::serve(
                    listener,
                    Arc::new(move || broker.status()),
                    Arc::new(crate::clock::SystemClock),
                    supervisor.cancel(),
                ),
            );
        }
        let (connections, accepted) = mpsc::channel(64);
        supervisor.spawn_infallible(
            "tls acceptor",
            accept(
                self.grpc_listener,
                self.acceptor.clone(),
                self.config.handshake_timeout,
                connections,
                supervisor.cancel(),
            ),
        );
        supervisor.spawn_infallible(
            "certificate reload",
            reload(
                self.acceptor,
                self.config.reload_interval,
                supervisor.cancel(),
            ),
        );
        let service = KiamServiceServer::new(Service::new(self.broker, self.metrics.clone()));
        let incoming = futures::stream::unfold(accepted, |mut accepted| async move {
            let stream = accepted.recv().await?;
            Some((Ok::<_, io::Error>(stream), accepted))
        });
        let cancel = supervisor.cancel();
        supervisor.spawn(
            "grpc server",
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming.boxed(), cancel.cancelled_owned()),
        );
        let instance = std::env::var("HOSTNAME").unwrap_or_else(|_| "iamlet-server".to_owned());
        self.background.spawn(&supervisor, instance);
        tracing::info!(mode = "server", "iamlet is serving");
        let drain = self.limits.shutdown_grace + Duration::from_secs(1);
        let result = supervisor
            .run(
                async {
                    shutdown.await;
                    tracing::info!("shutting down");
                },
                drain,
            )
            .await;
        tracing::info!("stopped");
        result
    }
}

/// Accepts connections and completes their TLS handshakes, each in a task of its own (a slow
/// client holds up no one), passing on those that prove a client certificate from the CA.
async fn accept(
    listener: TcpListener,
    acceptor: Arc<Acceptor>,
    handshake_timeout: Duration,
    connections: mpsc::Sender<TlsStream<TcpStream>>,
    cancel: CancellationToken,
) {
    loop {
        let (stream, remote) = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Per-connection errors (reset before accept, out of file descriptors)
                    // must not end the server.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // tonic sets TCP_NODELAY only on connections it accepts itself. Without it, a reply
        // written in pieces (HTTP/2 headers, data, trailers) waits on the client's delayed ACK:
        // ~40 ms per call with one call in flight.
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%remote, error = %err, "cannot set TCP_NODELAY");
        }
        let tls = acceptor.current();
        let connections = connections.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(handshake_timeout, tls.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let _ = connections.send(stream).await;
                }
                Ok(Err(err)) => {
                    tracing::warn!(%remote, error = %err, "TLS handshake refused");
                }
                Err(_) => tracing::warn!(%remote, "TLS handshake timed out"),
            }
        });
    }
}

/// Re-reads the certificate files every `interval` when they changed, until `cancel`.
async fn reload(acceptor: Arc<Acceptor>, interval: Duration, cancel: CancellationToken) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        match acceptor.reload_if_changed() {
            Ok(true) => tracing::info!("server certificates changed; new connections use them"),
            Ok(false) => {}
            // Mid-rotation files may be half written: keep the old ones, try again.
            Err(err) => tracing::warn!(
                error = %crate::telemetry::chain(&err),
                "cannot reload the server certificates"
            ),
        }
    }
}

/// `assume_role_arn`'s credentials, assumed with iamlet's own and kept in a cache of their own
/// (prefetched now, refreshed ahead of expiry), as an SDK credentials provider.
async fn assumed_first(
    config: &IamletConfig,
    role_arn: RoleArn,
    metrics: &Metrics,
) -> Result<SharedCredentialsProvider, BuildError> {
    let sts = mode::sts_client(config, None).await?;
    let cache = Cache::new(
        StsSource::new(sts, config.credentials.session_duration, metrics.clone()),
        SystemClock,
        config.credentials.refresh_before,
        RateLimiter::new(config.credentials.sts_qps, config.credentials.sts_burst),
        metrics.clone(),
    );
    let request = AssumeRoleRequest {
        role_arn,
        session_name: SessionName::sanitize(SERVER_SESSION_NAME),
        external_id: None,
        tags: Vec::new(),
    };
    cache.sync(&[request.clone()].into_iter().collect());
    tracing::info!(
        role = request.role_arn.as_str(),
        "every AssumeRole is made as this role (server.assume_role_arn)"
    );
    Ok(SharedCredentialsProvider::new(CachedIdentity {
        cache,
        request,
    }))
}

/// One cached identity as the SDK's credentials provider.
struct CachedIdentity {
    cache: Cache<StsSource, SystemClock>,
    request: AssumeRoleRequest,
}

impl std::fmt::Debug for CachedIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedIdentity")
            .field("role_arn", &self.request.role_arn.as_str())
            .finish()
    }
}

impl ProvideCredentials for CachedIdentity {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            let credentials = self.cache.get(&self.request).await.map_err(|err| {
                aws_credential_types::provider::error::CredentialsError::provider_error(err)
            })?;
            Ok(aws_credential_types::Credentials::new(
                credentials.access_key_id.clone(),
                credentials.secret_access_key.clone(),
                Some(credentials.session_token.clone()),
                Some(credentials.expiration),
                "iamlet-server-assume-role-arn",
            ))
        })
    }
}
