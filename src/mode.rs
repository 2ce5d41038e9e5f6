//! The two modes behind the one [`Broker`] seam: standalone (this node's pods, policy, the
//! cache and STS) and server-backed (a kiam server over mutual TLS). Building a mode creates
//! only what it needs: no STS client or Kubernetes client in server-backed mode.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_sts::config::Region;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::BuildError;
use crate::broker::{self, Broker, PodRole, Standalone};
use crate::clock::SystemClock;
use crate::config::Config;
use crate::credentials::{Cache, Credentials, RateLimiter, StsSource};
use crate::imds;
use crate::kiam::{KiamBroker, KiamClient, client::Discovery};
use crate::metrics::Metrics;
use crate::pods::events::{DenialSender, Denied};
use crate::pods::{self, KubernetesPods, PodIndex, PodSource, StaticPods};
use crate::policy::{BaseRoleArn, Policy};

type StandaloneBroker = Standalone<PodSource, StsSource, SystemClock>;

pub enum Mode {
    Standalone(StandaloneBroker),
    ServerBacked(KiamBroker),
}

/// What the Kubernetes source runs beside the servers.
pub struct KubernetesTasks {
    client: kube::Client,
    node: String,
    index: Arc<PodIndex>,
    denials: mpsc::Receiver<Denied>,
}

/// What a mode runs beside the servers.
pub enum Tasks {
    Standalone(Option<KubernetesTasks>),
    ServerBacked(KiamClient, Box<Discovery>),
}

impl Mode {
    pub async fn build(
        config: &Config,
        base_role_arn: BaseRoleArn,
        metrics: &Metrics,
    ) -> Result<(Mode, Tasks), BuildError> {
        if config.kiam.enabled() {
            let (client, discovery) = KiamClient::new(&config.kiam, metrics.clone())
                .map_err(|err| BuildError::Kiam(err.to_string()))?;
            tracing::info!(
                server = config.kiam.server.as_str(),
                "server-backed mode: asking a kiam server"
            );
            let broker = KiamBroker::new(
                client.clone(),
                base_role_arn,
                config.credentials.refresh_before,
            );
            return Ok((
                Mode::ServerBacked(broker),
                Tasks::ServerBacked(client, Box::new(discovery)),
            ));
        }
        let sts = sts_client(config).await?;
        let source = StsSource::new(sts, config.credentials.session_duration, metrics.clone());
        let limiter = RateLimiter::new(config.credentials.sts_qps, config.credentials.sts_burst);
        let cache = Cache::new(
            source,
            SystemClock,
            config.credentials.refresh_before,
            limiter,
            metrics.clone(),
        );
        let (pods, kubernetes, denials) = pod_source(config).await?;
        let policy = Policy {
            base_role_arn,
            default_role: Some(config.policy.default_role.clone()).filter(|r| !r.is_empty()),
            allow_unannotated_namespaces: config.policy.allow_unannotated_namespaces,
            session_name_template: config.credentials.session_name.clone(),
            session_tags: config.credentials.session_tags,
        };
        let broker = Standalone::new(pods, policy, cache, metrics.clone(), denials);
        Ok((Mode::Standalone(broker), Tasks::Standalone(kubernetes)))
    }

    /// Why `/readyz` says not ready, when it does.
    pub fn not_ready_reason(&self) -> &'static str {
        match self {
            Mode::Standalone(_) => "the lists of pods and namespaces have not been received yet",
            Mode::ServerBacked(_) => "the kiam server has not answered GetHealth",
        }
    }
}

impl Broker for Mode {
    async fn role(&self, ip: IpAddr) -> Result<PodRole, broker::Error> {
        match self {
            Mode::Standalone(broker) => broker.role(ip).await,
            Mode::ServerBacked(broker) => broker.role(ip).await,
        }
    }

    async fn credentials(
        &self,
        ip: IpAddr,
        name: &str,
    ) -> Result<(PodRole, Arc<Credentials>), broker::Error> {
        match self {
            Mode::Standalone(broker) => broker.credentials(ip, name).await,
            Mode::ServerBacked(broker) => broker.credentials(ip, name).await,
        }
    }

    fn ready(&self) -> bool {
        match self {
            Mode::Standalone(broker) => broker.ready(),
            Mode::ServerBacked(broker) => broker.ready(),
        }
    }
}

impl Tasks {
    /// Spawns the mode's background work on `tracker`, to stop with `cancel`.
    pub fn spawn(
        self,
        state: &Arc<imds::State<Mode>>,
        tracker: &TaskTracker,
        cancel: &CancellationToken,
    ) {
        match self {
            Tasks::Standalone(kubernetes) => {
                let prefetcher = state.clone();
                let stop = cancel.clone();
                tracker.spawn(async move {
                    if let Mode::Standalone(broker) = &prefetcher.broker {
                        broker.follow_pods(stop).await;
                    }
                });
                if let Some(kubernetes) = kubernetes {
                    tracker.spawn(pods::watch::run(
                        kubernetes.client.clone(),
                        kubernetes.node.clone(),
                        kubernetes.index,
                        cancel.clone(),
                    ));
                    tracker.spawn(pods::events::run(
                        kubernetes.client,
                        kubernetes.node,
                        kubernetes.denials,
                        cancel.clone(),
                    ));
                }
            }
            Tasks::ServerBacked(client, discovery) => {
                tracker.spawn(discovery.run(cancel.clone()));
                let stop = cancel.clone();
                tracker.spawn(async move { client.watch_health(stop).await });
            }
        }
    }
}

/// The configured pod source; for Kubernetes also what must run beside the servers, and the
/// channel for denial Events.
async fn pod_source(
    config: &Config,
) -> Result<(PodSource, Option<KubernetesTasks>, Option<DenialSender>), BuildError> {
    match config.pods.source {
        pods::Source::Static => {
            tracing::info!(
                pods = config.pods.static_pods.len(),
                "serving the static pod table"
            );
            let pods = PodSource::Static(StaticPods::new(&config.pods.static_pods));
            Ok((pods, None, None))
        }
        pods::Source::Kubernetes => {
            if config.pods.node_name.trim().is_empty() {
                return Err(BuildError::NoNodeName);
            }
            let client = kube::Client::try_default()
                .await
                .map_err(|err| BuildError::Kubernetes(err.to_string()))?;
            let node = config.pods.node_name.clone();
            tracing::info!(node = node.as_str(), "watching this node's pods");
            let index = Arc::new(PodIndex::default());
            let pods = PodSource::Kubernetes(KubernetesPods {
                index: index.clone(),
                wait_for_pod: config.pods.wait_for_pod,
            });
            let (sender, denials) = mpsc::channel(256);
            let tasks = KubernetesTasks {
                client,
                node,
                index,
                denials,
            };
            Ok((pods, Some(tasks), Some(sender)))
        }
    }
}

async fn sts_client(config: &Config) -> Result<aws_sdk_sts::Client, BuildError> {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    let http_client = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http_client);
    if !config.aws.region.is_empty() {
        loader = loader.region(Region::new(config.aws.region.clone()));
    }
    let shared = loader.load().await;
    if shared.region().is_none() {
        return Err(BuildError::NoRegion);
    }
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(2))
        .operation_attempt_timeout(Duration::from_secs(5))
        .operation_timeout(Duration::from_secs(15))
        .build();
    let mut sts = aws_sdk_sts::config::Builder::from(&shared).timeout_config(timeouts);
    if !config.aws.sts_endpoint.is_empty() {
        sts = sts.endpoint_url(&config.aws.sts_endpoint);
    }
    Ok(aws_sdk_sts::Client::from_conf(sts.build()))
}
