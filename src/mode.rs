//! The two modes behind the one [`Broker`] seam: standalone (pods, policy, the cache and STS)
//! and server-backed (a kiam server over mutual TLS). Building a mode creates only what it
//! needs: in server-backed mode no STS client, no Kubernetes client, and nothing asked of the
//! node's IMDS.
//!
//! The standalone stack is also what `iamlet server` serves, for the whole cluster's pods:
//! [`local_stack`] builds it for either scope.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_sdk_sts::config::Region;
use tokio::sync::mpsc;

use crate::broker::{self, Broker, Local, PodRole, PodStatus};
use crate::clock::SystemClock;
use crate::config::Config;
use crate::credentials::{Cache, Credentials, RateLimiter, StsSource};
use crate::imds::{self, Upstream};
use crate::kiam::{self, KiamBroker, KiamClient, client::Discovery};
use crate::metrics::Metrics;
use crate::pods::events::{DenialSender, Denied};
use crate::pods::freshness::{ContactLayer, Freshness, Staleness};
use crate::pods::{self, KubernetesPods, PodIndex, PodSource, Scope, StaticPods};
use crate::policy::{self, BaseRoleArn, Policy};
use crate::supervisor::Supervisor;

/// Why a mode could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kiam: cannot set up the client for kiam.server")]
    Kiam(#[source] kiam::client::SetupError),
    #[error("no Kubernetes client configuration (in-cluster or KUBECONFIG)")]
    KubernetesConfig(#[source] kube::config::InferConfigError),
    #[error("cannot set up the Kubernetes client")]
    Kubernetes(#[source] kube::Error),
    #[error(
        "pods.node_name is empty and NODE_NAME is not set: iamlet must know which node's pods to serve"
    )]
    NoNodeName,
    #[error("aws.region: no region is configured and the default chain found none")]
    NoRegion,
    #[error(
        "aws.base_role_arn is empty and could not be derived from the node's IMDS; set aws.base_role_arn"
    )]
    BaseRoleArn(#[source] BaseRoleArnError),
}

/// Why the base role ARN could not be derived.
#[derive(Debug, thiserror::Error)]
pub enum BaseRoleArnError {
    #[error(transparent)]
    Upstream(#[from] imds::UpstreamError),
    #[error(transparent)]
    Malformed(#[from] policy::Error),
}

/// The stack that answers from pods, policy and STS itself.
pub type LocalBroker = Local<PodSource, StsSource, SystemClock>;

pub enum Mode {
    Standalone(Arc<LocalBroker>),
    ServerBacked(Box<KiamBroker>),
}

/// What the Kubernetes pod source runs beside the servers: the watch and the Event sender.
pub struct KubernetesTasks {
    client: kube::Client,
    scope: Scope,
    /// The taint to remove from this node once iamlet serves (`pods.startup_taint`).
    startup_taint: Option<String>,
    index: Arc<PodIndex>,
    staleness: Arc<Staleness>,
    denials: mpsc::Receiver<Denied>,
}

/// What a mode runs beside the servers.
pub enum Background {
    Standalone(Arc<LocalBroker>, Option<KubernetesTasks>),
    ServerBacked(KiamClient, Box<Discovery>),
}

impl Mode {
    /// Builds the configured mode. Only standalone mode asks the node's IMDS anything (the base
    /// role ARN, when `aws.base_role_arn` is empty).
    pub async fn build(
        config: &Config,
        upstream: &Upstream,
        metrics: &Metrics,
    ) -> Result<(Mode, Background), Error> {
        if config.kiam.enabled() {
            let (client, discovery) =
                KiamClient::new(&config.kiam, metrics.clone()).map_err(Error::Kiam)?;
            tracing::info!(
                server = config.kiam.server.as_str(),
                "server-backed mode: asking a kiam server"
            );
            // Validated with the config; the node needs no base in this mode.
            let base_role_arn = BaseRoleArn::parse(&config.aws.base_role_arn).ok();
            let broker = KiamBroker::new(
                client.clone(),
                base_role_arn,
                config.credentials.refresh_before,
            );
            return Ok((
                Mode::ServerBacked(Box::new(broker)),
                Background::ServerBacked(client, Box::new(discovery)),
            ));
        }
        let node = config.pods.node_name.trim();
        if config.pods.source == pods::Source::Kubernetes && node.is_empty() {
            return Err(Error::NoNodeName);
        }
        let base_role_arn = base_role_arn(config, upstream).await?;
        let (broker, kubernetes) = local_stack(
            config,
            Scope::Node(node.to_owned()),
            base_role_arn,
            None,
            metrics,
        )
        .await?;
        let mut broker = broker;
        if config.container_credentials.enabled {
            broker.prefetch_every_live_pod();
        }
        let broker = Arc::new(broker);
        Ok((
            Mode::Standalone(broker.clone()),
            Background::Standalone(broker, kubernetes),
        ))
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

    fn readiness(&self) -> Result<String, String> {
        match self {
            Mode::Standalone(broker) => broker.readiness(),
            Mode::ServerBacked(broker) => broker.readiness(),
        }
    }

    fn status(&self) -> Vec<PodStatus> {
        match self {
            Mode::Standalone(broker) => broker.status(),
            Mode::ServerBacked(broker) => broker.status(),
        }
    }
}

impl Background {
    /// iamlet's own Kubernetes client, in standalone mode with the Kubernetes pod source.
    pub fn kubernetes_client(&self) -> Option<kube::Client> {
        match self {
            Background::Standalone(_, Some(kubernetes)) => Some(kubernetes.client.clone()),
            Background::Standalone(_, None) | Background::ServerBacked(..) => None,
        }
    }

    /// Spawns the mode's background work under `supervisor`.
    pub fn spawn(self, supervisor: &Supervisor, events_instance: String) {
        match self {
            Background::Standalone(broker, kubernetes) => {
                let cancel = supervisor.cancel();
                let prefetcher = broker.clone();
                supervisor.spawn_infallible("prefetcher", async move {
                    prefetcher.follow_pods(cancel).await;
                });
                if let Some(kubernetes) = kubernetes {
                    kubernetes.spawn(supervisor, events_instance, &broker);
                }
            }
            Background::ServerBacked(client, discovery) => {
                supervisor.spawn_infallible("kiam discovery", discovery.run(supervisor.cancel()));
                let cancel = supervisor.cancel();
                supervisor.spawn_infallible("kiam health check", async move {
                    client.watch_health(cancel).await;
                });
            }
        }
    }
}

impl KubernetesTasks {
    fn spawn(self, supervisor: &Supervisor, events_instance: String, broker: &Arc<LocalBroker>) {
        if let (Some(key), Scope::Node(node)) = (&self.startup_taint, &self.scope) {
            let broker = broker.clone();
            supervisor.spawn_infallible(
                "start-up taint",
                pods::taint::remove_when_ready(
                    self.client.clone(),
                    node.clone(),
                    key.clone(),
                    move || broker.ready(),
                    supervisor.cancel(),
                ),
            );
        }
        let staleness = self.staleness.clone();
        supervisor.spawn_infallible(
            "pod watch",
            pods::watch::run(
                self.client.clone(),
                self.scope,
                self.index,
                self.staleness.watch_timeout_secs(),
                supervisor.cancel(),
            ),
        );
        let cancel = supervisor.cancel();
        supervisor.spawn_infallible("staleness report", async move {
            staleness.report(cancel).await;
        });
        supervisor.spawn_infallible(
            "event sender",
            pods::events::run(
                self.client,
                events_instance,
                self.denials,
                supervisor.cancel(),
            ),
        );
    }
}

/// The stack that answers from pods, policy and STS: the pod source for `scope`, the cache in
/// front of STS, and the policy from the configuration. `sts_credentials`, when given, are the
/// credentials STS is called with (`iamlet server`'s `assume_role_arn`); otherwise iamlet's
/// own, from the default chain.
pub async fn local_stack(
    config: &Config,
    scope: Scope,
    base_role_arn: BaseRoleArn,
    sts_credentials: Option<SharedCredentialsProvider>,
    metrics: &Metrics,
) -> Result<(LocalBroker, Option<KubernetesTasks>), Error> {
    let sts = sts_client(config, sts_credentials).await?;
    let source = StsSource::new(sts, config.credentials.session_duration, metrics.clone());
    let cache = Cache::new(
        source,
        SystemClock,
        config.credentials.refresh_before,
        RateLimiter::new(config.credentials.sts_qps, config.credentials.sts_burst),
        metrics.clone(),
    );
    let (pods, kubernetes, denials) = pod_source(config, scope, metrics).await?;
    tracing::info!(
        base_role_arn = base_role_arn.as_str(),
        "role names resolve under this base"
    );
    let policy = Policy {
        base_role_arn,
        default_role: Some(config.policy.default_role.clone()).filter(|r| !r.is_empty()),
        allow_unannotated_namespaces: config.policy.allow_unannotated_namespaces,
        session_name_template: config.credentials.session_name.clone(),
        session_tags: config.credentials.session_tags,
    };
    let broker = Local::new(pods, policy, cache, metrics.clone(), denials);
    Ok((broker, kubernetes))
}

/// `aws.base_role_arn`, or the node's own account and partition from its IMDS `iam/info`.
pub async fn base_role_arn(config: &Config, upstream: &Upstream) -> Result<BaseRoleArn, Error> {
    if !config.aws.base_role_arn.is_empty() {
        // Validated with the config.
        return BaseRoleArn::parse(&config.aws.base_role_arn)
            .map_err(|err| Error::BaseRoleArn(err.into()));
    }
    let derive = async {
        let profile = upstream.instance_profile_arn().await?;
        Ok::<_, BaseRoleArnError>(BaseRoleArn::from_instance_profile(&profile)?)
    };
    derive.await.map_err(Error::BaseRoleArn)
}

/// The configured pod source; for Kubernetes also what must run beside the servers, and the
/// channel for denial Events.
async fn pod_source(
    config: &Config,
    scope: Scope,
    metrics: &Metrics,
) -> Result<(PodSource, Option<KubernetesTasks>, Option<DenialSender>), Error> {
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
            let freshness = Arc::new(Freshness::new(Arc::new(SystemClock), metrics.clone()));
            let client = kubernetes_client(&freshness).await?;
            match &scope {
                Scope::Node(node) => {
                    tracing::info!(node = node.as_str(), "watching this node's pods")
                }
                Scope::Cluster => tracing::info!("watching every pod in the cluster"),
            }
            let staleness = Arc::new(Staleness {
                freshness,
                max: config.pods.max_staleness,
                when: config.pods.when_stale,
            });
            let index = Arc::new(PodIndex::default());
            let pods = PodSource::Kubernetes(KubernetesPods {
                index: index.clone(),
                wait_for_pod: config.pods.wait_for_pod,
                staleness: staleness.clone(),
            });
            let (sender, denials) = mpsc::channel(256);
            let startup_taint = match &scope {
                Scope::Node(_) => Some(config.pods.startup_taint.clone()).filter(|k| !k.is_empty()),
                Scope::Cluster => None,
            };
            let tasks = KubernetesTasks {
                client,
                startup_taint,
                scope,
                index,
                staleness,
                denials,
            };
            Ok((pods, Some(tasks), Some(sender)))
        }
    }
}

/// The Kubernetes client (in-cluster configuration or KUBECONFIG), noting every good contact
/// about pods and namespaces in `freshness`.
async fn kubernetes_client(freshness: &Arc<Freshness>) -> Result<kube::Client, Error> {
    let config = kube::Config::infer()
        .await
        .map_err(Error::KubernetesConfig)?;
    let client = kube::client::ClientBuilder::try_from(config)
        .map_err(Error::Kubernetes)?
        .with_layer(&ContactLayer(freshness.clone()))
        .build();
    Ok(client)
}

/// An STS client: iamlet's own credentials from the default chain unless `credentials` are
/// given.
pub async fn sts_client(
    config: &Config,
    credentials: Option<SharedCredentialsProvider>,
) -> Result<aws_sdk_sts::Client, Error> {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    let http_client = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http_client);
    if !config.aws.region.is_empty() {
        loader = loader.region(Region::new(config.aws.region.clone()));
    }
    if let Some(credentials) = credentials {
        // They come from iamlet's own cache, which refreshes them ahead of expiry: the SDK
        // must ask it on every call rather than keep a copy until it nearly expires.
        loader = loader
            .credentials_provider(credentials)
            .identity_cache(aws_config::identity::IdentityCache::no_cache());
    }
    let shared = loader.load().await;
    if shared.region().is_none() {
        return Err(Error::NoRegion);
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
