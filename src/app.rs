//! Build, then run. `build` reads keys, binds both listeners and creates clients (so every
//! failure that config alone cannot predict shows before anything is served); `run` serves until
//! shutdown and drains within a bound.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::broker::Broker;
use crate::config::Config;
use crate::http_server::Limits;
use crate::imds::{self, TokenKey, Upstream};
use crate::iptables::{self, Interception};
use crate::metrics::Metrics;
use crate::mode::{Mode, Tasks};
use crate::policy::BaseRoleArn;

/// How long iamlet waits on the node's IMDS for proxied paths and start-up autodetection.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("imds.token_key_file: {0}")]
    TokenKey(#[from] imds::KeyError),
    #[error("imds.upstream: {0}")]
    Upstream(String),
    #[error(
        "aws.base_role_arn is empty and could not be derived from the node's IMDS: {0}; set aws.base_role_arn"
    )]
    BaseRoleArn(String),
    #[error("aws.region: no region is configured and the default chain found none")]
    NoRegion,
    #[error(
        "pods.node_name is empty and NODE_NAME is not set: iamlet must know which node's pods to serve"
    )]
    NoNodeName,
    #[error("kiam: {0}")]
    Kiam(String),
    #[error("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG): {0}")]
    Kubernetes(String),
    #[error("cannot install the interception rule: {0}")]
    Iptables(#[from] iptables::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the {task} server stopped unexpectedly: {detail}")]
    TaskExited { task: &'static str, detail: String },
}

pub struct App {
    imds_listener: TcpListener,
    admin_listener: TcpListener,
    state: Arc<imds::State<Mode>>,
    metrics: Metrics,
    limits: Limits,
    interception: Option<(Interception, iptables::Config)>,
    tasks: Tasks,
}

impl App {
    pub async fn build(config: Config) -> Result<App, BuildError> {
        // Several tests build apps in one process; only the first install counts.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let imds_listener = bind("imds.listen", config.imds.listen).await?;
        let admin_listener = bind("admin.listen", config.admin.listen).await?;
        let tokens = TokenKey::load_or_create(&config.imds.token_key_file)?;
        let upstream = Upstream::new(
            &config.imds.upstream,
            &config.imds.proxy_allow,
            UPSTREAM_TIMEOUT,
        )
        .map_err(|err| BuildError::Upstream(err.to_string()))?;
        let base_role_arn = base_role_arn(&config, &upstream).await?;
        tracing::info!(
            base_role_arn = base_role_arn.as_str(),
            "role names resolve under this base"
        );

        let metrics = Metrics::default();
        let (broker, tasks) = Mode::build(&config, base_role_arn, &metrics).await?;
        let state = Arc::new(imds::State {
            broker,
            tokens,
            token_policy: config.imds.tokens,
            upstream,
            metrics: metrics.clone(),
            request_timeout: config.imds.request_timeout,
            clock: Arc::new(crate::clock::SystemClock),
            fair_share: imds::FairShare::new(config.imds.client_limits(), metrics.clone()),
        });
        // Only now, with the pod-facing listener bound and everything behind it ready, may pod
        // traffic be sent here.
        let interception = if config.iptables.enabled {
            let rule =
                Interception::new(&config.iptables.host_interface, local_addr(&imds_listener));
            let ensured = rule.clone();
            blocking(move || ensured.ensure()).await?;
            tracing::info!(
                host_interface = config.iptables.host_interface.as_str(),
                target = %local_addr(&imds_listener),
                "interception rule installed"
            );
            Some((rule, config.iptables.clone()))
        } else {
            None
        };
        Ok(App {
            tasks,
            interception,
            imds_listener,
            admin_listener,
            state,
            metrics,
            limits: Limits {
                max_connections: config.imds.max_connections,
                idle_timeout: config.imds.idle_timeout,
                shutdown_grace: config.imds.shutdown_grace,
            },
        })
    }

    /// The bound pod-facing address (useful when configured with port 0).
    pub fn imds_addr(&self) -> SocketAddr {
        local_addr(&self.imds_listener)
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        local_addr(&self.admin_listener)
    }

    /// Serves until `shutdown` completes or a server dies, then drains within the grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (exited, mut exits) = mpsc::channel::<(&'static str, String)>(2);

        let state = self.state.clone();
        let readiness: admin::Readiness = Arc::new(move || {
            (!state.broker.ready()).then(|| state.broker.not_ready_reason().to_owned())
        });
        let servers = [
            (
                "imds",
                tokio::spawn(imds::serve(
                    self.imds_listener,
                    self.state.clone(),
                    self.limits,
                    cancel.clone(),
                )),
            ),
            (
                "admin",
                tokio::spawn(admin::serve(
                    self.admin_listener,
                    readiness,
                    self.metrics.clone(),
                    self.limits,
                    cancel.clone(),
                )),
            ),
        ];
        for (task, handle) in servers {
            let exited = exited.clone();
            tracker.spawn(async move {
                let detail = match handle.await {
                    Ok(Ok(())) => "it returned".to_owned(),
                    Ok(Err(err)) => err.to_string(),
                    Err(err) => err.to_string(),
                };
                let _ = exited.send((task, detail)).await;
            });
        }
        self.tasks.spawn(&self.state, &tracker, &cancel);
        if let Some((rule, config)) = self.interception.clone() {
            tracker.spawn(reconcile(rule, config.reconcile_interval, cancel.clone()));
        }
        tracker.close();
        tracing::info!("iamlet is serving");

        let result = tokio::select! {
            () = shutdown => Ok(()),
            Some((task, detail)) = exits.recv() => Err(RunError::TaskExited { task, detail }),
        };
        tracing::info!("shutting down: draining in-flight requests");
        cancel.cancel();
        let bound = self.limits.shutdown_grace + Duration::from_secs(1);
        if tokio::time::timeout(bound, tracker.wait()).await.is_err() {
            tracing::warn!("servers did not stop within {bound:?}");
        }
        match self.interception {
            Some((_, config)) if config.remove_on_exit => match blocking(iptables::remove).await {
                Ok(_) => tracing::info!("interception rule removed (iptables.remove_on_exit)"),
                Err(err) => tracing::error!("{err}"),
            },
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
async fn reconcile(rule: Interception, interval: Duration, cancel: CancellationToken) {
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

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, BuildError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| BuildError::Bind { key, addr, source })?;
    tracing::info!(%key, addr = %local_addr(&listener), "listening");
    Ok(listener)
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

async fn base_role_arn(config: &Config, upstream: &Upstream) -> Result<BaseRoleArn, BuildError> {
    if !config.aws.base_role_arn.is_empty() {
        // Validated with the config.
        return BaseRoleArn::parse(&config.aws.base_role_arn)
            .map_err(|err| BuildError::BaseRoleArn(err.to_string()));
    }
    let profile = upstream
        .instance_profile_arn()
        .await
        .map_err(|err| BuildError::BaseRoleArn(err.to_string()))?;
    BaseRoleArn::from_instance_profile(&profile)
        .map_err(|err| BuildError::BaseRoleArn(err.to_string()))
}
