//! The agent (`iamlet agent`): build, then run. `build` reads keys, binds both listeners and
//! creates clients (so every failure that config alone cannot predict shows before anything is
//! served); `run` serves under the [`Supervisor`] until shutdown and drains within a bound.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::admin;
use crate::broker::Broker;
use crate::clock::SystemClock;
use crate::config::Config;
use crate::container_credentials;
use crate::credentials::StsSource;
use crate::http_server::Limits;
use crate::imds::{self, TokenKey, Upstream};
use crate::iptables::{self, Interception};
use crate::metrics::Metrics;
use crate::mode::{self, Background, Mode};
use crate::pods::PodSource;
use crate::status;
use crate::supervisor::{Supervisor, TaskExited};

/// How long iamlet waits on the node's IMDS for proxied paths and start-up autodetection.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot listen on {addr} ({key})")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("imds.token_key_file")]
    TokenKey(#[source] imds::KeyError),
    #[error(transparent)]
    Upstream(imds::UpstreamError),
    #[error(transparent)]
    Mode(#[from] mode::Error),
    #[error("cannot install the interception rule")]
    Iptables(#[source] iptables::Error),
    #[error(transparent)]
    Status(#[from] status::Error),
    #[error("container_credentials.enabled needs standalone mode with the Kubernetes pod source")]
    TokenFrontMode,
}

/// The token front as the agent runs it.
type TokenFront = container_credentials::Front<PodSource, StsSource, SystemClock>;

pub struct App {
    imds_listener: TcpListener,
    admin_listener: TcpListener,
    status_listener: Option<tokio::net::UnixListener>,
    state: Arc<imds::State<Mode>>,
    metrics: Metrics,
    limits: Limits,
    interception: Option<(Interception, iptables::Config)>,
    token_front: Option<TokenFront>,
    background: Background,
    events_instance: String,
}

impl App {
    pub async fn build(config: Config) -> Result<App, BuildError> {
        // Several tests build apps in one process; only the first install counts.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let imds_listener = bind("imds.listen", config.imds.listen).await?;
        let admin_listener = bind("admin.listen", config.admin.listen).await?;
        let status_listener = bind_status(&config.admin).await?;
        let token_listener = if config.container_credentials.enabled {
            Some(
                bind(
                    "container_credentials.listen",
                    config.container_credentials.listen,
                )
                .await?,
            )
        } else {
            None
        };
        let tokens =
            TokenKey::load_or_create(&config.imds.token_key_file).map_err(BuildError::TokenKey)?;
        let upstream = Upstream::new(
            &config.imds.upstream,
            &config.imds.proxy_allow,
            UPSTREAM_TIMEOUT,
        )
        .map_err(BuildError::Upstream)?;

        let metrics = Metrics::default();
        let (broker, background) = Mode::build(&config, &upstream, &metrics).await?;
        let token_front = match (token_listener, &broker, background.kubernetes_client()) {
            (None, _, _) => None,
            (Some(listener), Mode::Standalone(local), Some(client)) => Some(TokenFront::new(
                &config.container_credentials,
                listener,
                local.clone(),
                client,
                metrics.clone(),
                config.imds.request_timeout,
            )),
            (Some(_), _, _) => return Err(BuildError::TokenFrontMode),
        };
        let state = Arc::new(imds::State {
            broker,
            tokens,
            token_policy: config.imds.tokens,
            upstream,
            metrics: metrics.clone(),
            request_timeout: config.imds.request_timeout,
            clock: Arc::new(crate::clock::SystemClock),
            fair_share: imds::FairShare::new(config.imds.client_limits(), metrics.clone()),
            documents: imds::Documents::default(),
        });
        // Only now, with the pod-facing listener bound and everything behind it ready, may pod
        // traffic be sent here.
        let interception = if config.iptables.enabled {
            let choice = config.iptables.backend;
            let selection = blocking(move || Ok(iptables::select(choice)))
                .await
                .map_err(BuildError::Iptables)?;
            tracing::info!(
                backend = selection.backend.name(),
                reason = selection.reason.as_str(),
                "iptables backend chosen"
            );
            let mut rule = Interception::new(
                selection.backend,
                &config.iptables.host_interface,
                local_addr(&imds_listener),
            );
            if let Some(front) = &token_front {
                rule = rule.with_token_front(front.addr());
            }
            let ensured = rule.clone();
            blocking(move || ensured.ensure())
                .await
                .map_err(BuildError::Iptables)?;
            tracing::info!(
                host_interface = config.iptables.host_interface.as_str(),
                target = %local_addr(&imds_listener),
                container_credentials = ?token_front.as_ref().map(TokenFront::addr),
                backend = selection.backend.name(),
                "interception rule installed"
            );
            Some((rule, config.iptables.clone()))
        } else {
            None
        };
        Ok(App {
            background,
            interception,
            token_front,
            imds_listener,
            admin_listener,
            status_listener,
            state,
            metrics,
            limits: Limits {
                max_connections: config.imds.max_connections,
                idle_timeout: config.imds.idle_timeout,
                shutdown_grace: config.imds.shutdown_grace,
            },
            events_instance: config.pods.node_name.clone(),
        })
    }

    /// The bound pod-facing address (useful when configured with port 0).
    pub fn imds_addr(&self) -> SocketAddr {
        local_addr(&self.imds_listener)
    }

    /// The bound token front address, when it is enabled.
    pub fn container_credentials_addr(&self) -> Option<SocketAddr> {
        self.token_front.as_ref().map(TokenFront::addr)
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        local_addr(&self.admin_listener)
    }

    /// Serves until `shutdown` completes or a task dies, then drains within the grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), TaskExited> {
        let supervisor = Supervisor::default();
        let state = self.state.clone();
        let keys_ready = self.token_front.as_ref().map(TokenFront::readiness);
        let readiness: admin::Readiness = Arc::new(move || {
            let view = state.broker.readiness()?;
            match &keys_ready {
                Some(keys_ready) => keys_ready().map(|()| view),
                None => Ok(view),
            }
        });
        supervisor.spawn(
            "imds server",
            imds::serve(
                self.imds_listener,
                self.state.clone(),
                self.limits,
                supervisor.cancel(),
            ),
        );
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
            let state = self.state.clone();
            supervisor.spawn(
                "status socket",
                status::serve(
                    listener,
                    Arc::new(move || state.broker.status()),
                    Arc::new(crate::clock::SystemClock),
                    supervisor.cancel(),
                ),
            );
        }
        if let Some(front) = self.token_front {
            front.spawn(&supervisor, self.limits);
        }
        self.background.spawn(&supervisor, self.events_instance);
        if let Some((rule, config)) = self.interception.clone() {
            supervisor.spawn_infallible(
                "iptables reconcile",
                reconcile(rule, config.reconcile_interval, supervisor.cancel()),
            );
        }
        tracing::info!("iamlet is serving");

        let drain = self.limits.shutdown_grace + Duration::from_secs(1);
        let result = supervisor
            .run(
                async {
                    shutdown.await;
                    tracing::info!("shutting down: draining in-flight requests");
                },
                drain,
            )
            .await;
        match self.interception {
            Some((rule, config)) if config.remove_on_exit => {
                match blocking(move || iptables::remove(rule.backend())).await {
                    Ok(_) => tracing::info!("interception rule removed (iptables.remove_on_exit)"),
                    Err(err) => tracing::error!("{err}"),
                }
            }
            Some(_) => tracing::info!(
                "interception rule kept: pods get connection refused until iamlet is back"
            ),
            None => {}
        }
        tracing::info!("stopped");
        result
    }
}

/// Re-applies the interception rule every `interval` until `cancel`, so a flushed or edited
/// nat table heals.
async fn reconcile(
    rule: Interception,
    interval: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let rule = rule.clone();
        match blocking(move || rule.ensure()).await {
            Ok(true) => tracing::warn!("interception rule was missing or altered; restored"),
            Ok(false) => {}
            Err(err) => tracing::error!("{err}"),
        }
    }
}

/// Runs a blocking iptables call off the runtime.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, iptables::Error> + Send + 'static,
) -> Result<T, iptables::Error> {
    tokio::task::spawn_blocking(call)
        .await
        .unwrap_or_else(|err| std::panic::resume_unwind(err.into_panic()))
}

/// The status socket, unless `admin.status_socket` is empty.
pub async fn bind_status(
    config: &admin::Config,
) -> Result<Option<tokio::net::UnixListener>, BuildError> {
    if config.status_socket.as_os_str().is_empty() {
        return Ok(None);
    }
    Ok(Some(status::bind(&config.status_socket).await?))
}

/// Binds `addr`, the value of config key `key`, and logs the bound address.
pub async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, BuildError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| BuildError::Bind { key, addr, source })?;
    tracing::info!(%key, addr = %local_addr(&listener), "listening");
    Ok(listener)
}

pub fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}
