//! The seam between the pod-facing server and everything behind it. The IMDS server asks only
//! "which role does the pod at this IP have?" and "credentials for this IP and role"; the
//! standalone stack (pods + policy + cache + STS) answers here, a kiam server could too.

use std::collections::HashSet;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::credentials::{self, AssumeRoleRequest, Cache, CredentialSource, Credentials};
use crate::metrics::Metrics;
use crate::pods::events::{DenialSender, Denied};
use crate::pods::{Pod, PodLookup};
use crate::policy::{self, Policy, Refusal, RoleArn};

/// How long the prefetcher lets pod changes gather before it syncs the cache.
const SYNC_DEBOUNCE: Duration = Duration::from_millis(100);

/// A pod and the role it is entitled to.
#[derive(Debug, Clone)]
pub struct PodRole {
    pub pod: Arc<Pod>,
    pub role_arn: RoleArn,
}

/// Why a pod gets no role or no credentials. The IMDS server turns these into HTTP answers in
/// one place (`imds::routes`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("no pod is known at {0}")]
    UnknownPod(IpAddr),
    #[error("pod {pod} has no role")]
    NoRole { pod: String },
    #[error("pod {pod} has an unusable role annotation: {source}")]
    BadRole { pod: String, source: policy::Error },
    #[error("pod {pod}: {denial}")]
    Forbidden { pod: String, denial: policy::Denial },
    #[error("pod {pod} asked for role {requested:?}, which is not its role")]
    WrongRole { pod: String, requested: String },
    #[error(transparent)]
    Credentials(#[from] credentials::Error),
    /// What answers for pods (the kiam server) could not be asked.
    #[error("{0}")]
    Unavailable(String),
}

pub trait Broker: Send + Sync + 'static {
    /// The role of the pod at `ip`.
    fn role(&self, ip: IpAddr) -> impl Future<Output = Result<PodRole, Error>> + Send;

    /// Credentials for the pod at `ip`, which asked for role `name`: only its own role is served.
    fn credentials(
        &self,
        ip: IpAddr,
        name: &str,
    ) -> impl Future<Output = Result<(PodRole, Arc<Credentials>), Error>> + Send;

    /// Whether everything behind the broker is ready to answer (`/readyz`).
    fn ready(&self) -> bool;
}

/// Standalone mode: this node's pods, policy, and STS through the cache.
pub struct Standalone<P, S, C> {
    pods: P,
    policy: Policy,
    cache: Cache<S, C>,
    metrics: Metrics,
    denials: Option<DenialSender>,
}

impl<P: PodLookup, S: CredentialSource, C: Clock> Standalone<P, S, C> {
    /// `denials`, when given, receives every policy denial for a Kubernetes Event.
    pub fn new(
        pods: P,
        policy: Policy,
        cache: Cache<S, C>,
        metrics: Metrics,
        denials: Option<DenialSender>,
    ) -> Self {
        Standalone {
            pods,
            policy,
            cache,
            metrics,
            denials,
        }
    }

    /// What STS is asked for on behalf of `pod` with `role`: also the cache key.
    fn request_for(&self, pod: &Pod, role_arn: RoleArn) -> AssumeRoleRequest {
        AssumeRoleRequest {
            role_arn,
            session_name: self.policy.session_name(pod),
            external_id: pod.annotations.external_id.clone(),
            tags: self.policy.session_tags(pod),
        }
    }

    /// The identities that the pods which could be served now would ask for.
    fn wanted(&self) -> HashSet<AssumeRoleRequest> {
        self.pods
            .snapshot()
            .into_iter()
            .filter_map(|pod| {
                let namespace = self.pods.namespace_policy(&pod.namespace);
                let role = self.policy.role_for(&pod, namespace.as_deref()).ok()?;
                Some(self.request_for(&pod, role))
            })
            .collect()
    }

    /// Keeps the cache prefetched for the pods there are, following every change, until
    /// `cancel`. Bursts of changes (a rollout) are taken together.
    pub async fn follow_pods(&self, cancel: CancellationToken) {
        let mut changes = self.pods.changes();
        loop {
            if self.pods.ready() {
                self.cache.sync(&self.wanted());
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(SYNC_DEBOUNCE) => {}
            }
            changes.borrow_and_update();
        }
    }

    fn report(&self, pod: &Pod, role: &RoleArn, denial: &policy::Denial) {
        self.metrics.observe_denial(denial.reason());
        tracing::info!(pod = %pod.key(), role = %role, reason = %denial, "role denied by namespace policy");
        if let Some(denials) = &self.denials {
            // A full queue drops the Event: the log line and metric above already tell.
            let _ = denials.try_send(Denied {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                uid: pod.uid.clone(),
                role: role.to_string(),
                reason: denial.to_string(),
            });
        }
    }
}

impl<P: PodLookup, S: CredentialSource, C: Clock> Broker for Standalone<P, S, C> {
    async fn role(&self, ip: IpAddr) -> Result<PodRole, Error> {
        let pod = self.pods.lookup(ip).await.ok_or(Error::UnknownPod(ip))?;
        let namespace = self.pods.namespace_policy(&pod.namespace);
        match self.policy.role_for(&pod, namespace.as_deref()) {
            Ok(role_arn) => Ok(PodRole { pod, role_arn }),
            Err(Refusal::NoRole) => Err(Error::NoRole { pod: pod.key() }),
            Err(Refusal::BadRole(source)) => Err(Error::BadRole {
                pod: pod.key(),
                source,
            }),
            Err(Refusal::Denied(role, denial)) => {
                self.report(&pod, &role, &denial);
                Err(Error::Forbidden {
                    pod: pod.key(),
                    denial,
                })
            }
        }
    }

    async fn credentials(
        &self,
        ip: IpAddr,
        name: &str,
    ) -> Result<(PodRole, Arc<Credentials>), Error> {
        let role = self.role(ip).await?;
        if role.role_arn.name() != name {
            return Err(Error::WrongRole {
                pod: role.pod.key(),
                requested: name.to_owned(),
            });
        }
        let request = self.request_for(&role.pod, role.role_arn.clone());
        let credentials = self.cache.get(&request).await?;
        Ok((role, credentials))
    }

    fn ready(&self) -> bool {
        self.pods.ready()
    }
}
