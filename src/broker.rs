//! The seam between the pod-facing server and everything behind it. The IMDS server asks only
//! "which role does the pod at this IP have?" and "credentials for this IP and role". Two
//! brokers answer:
//!
//! - [`Local`]: pods from a watch (or the static table), policy, and STS through the
//!   prefetching cache. The standalone agent uses it for its node's pods; `iamlet server` uses
//!   the same one for the whole cluster's pods behind the kiam protocol.
//! - the kiam client's broker (`kiam::KiamBroker`), which asks a remote server.
//!
//! The token front (`container_credentials`) knows pods by token, not IP, so it uses
//! [`Local`] directly: [`Local::pod_by_uid`], then [`Local::role_of`] and
//! [`Local::credentials_for`], the same policy and cache as the IP path. The IP path
//! ([`entitled`]) decides once per pod and keeps the decision with the pod in the index.

mod entitled;

pub use entitled::Entitled;

use std::collections::HashSet;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::credentials::{self, AssumeRoleRequest, Cache, CredentialSource, Credentials};
use crate::metrics::Metrics;
use crate::pod::Pod;
use crate::pods::events::{DenialSender, Denied};
use crate::pods::{Known, PodLookup, Standing};
use crate::policy::{self, Policy, Refusal, RoleArn};

/// The prefetcher syncs the cache at most once in this long: a change after a quiet spell is
/// synced at once, changes that follow within it are taken together.
const SYNC_INTERVAL: Duration = Duration::from_millis(100);

/// A pod and the role it is entitled to.
#[derive(Debug, Clone)]
pub struct PodRole {
    pub pod: Arc<Pod>,
    pub role: Role,
}

/// A pod's role, as far as this node knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The full ARN: always in standalone mode.
    Arn(RoleArn),
    /// Only the name: in server-backed mode, when the annotation is not a full ARN and no
    /// `aws.base_role_arn` is configured (the server resolves it; the node need not know the
    /// account).
    Name(String),
}

impl Role {
    /// The role's name, as IMDS lists it under `iam/security-credentials/`.
    pub fn name(&self) -> &str {
        match self {
            Role::Arn(arn) => arn.name(),
            Role::Name(name) => name,
        }
    }

    /// The full ARN, where it is known.
    pub fn arn(&self) -> Option<&RoleArn> {
        match self {
            Role::Arn(arn) => Some(arn),
            Role::Name(_) => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Arn(arn) => arn.fmt(f),
            Role::Name(name) => f.write_str(name),
        }
    }
}

/// Why a pod gets no role or no credentials. The IMDS server turns these into HTTP answers in
/// one place (`imds::routes`), the kiam server into gRPC statuses in one place
/// (`kiam::server`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("no pod is known at {0}")]
    UnknownPod(IpAddr),
    #[error("pod {pod} has no role")]
    NoRole { pod: String },
    #[error("pod {pod} has an unusable role annotation: {error}")]
    BadRole { pod: String, error: policy::Error },
    #[error("pod {pod}: {denial}")]
    Forbidden { pod: String, denial: policy::Denial },
    #[error("pod {pod} asked for role {requested:?}, which is not its role")]
    WrongRole { pod: String, requested: String },
    #[error(transparent)]
    Credentials(#[from] credentials::Error),
    /// What answers for pods (the kiam server) could not be asked.
    #[error("{0}")]
    Unavailable(String),
    /// The view of pods is too old to answer from (`pods.when_stale = "refuse"`).
    #[error("no contact with the Kubernetes API for {}s; no pod is served until it is back", .age.as_secs())]
    Stale { age: Duration },
}

/// One pod as `iamlet status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodStatus {
    pub ip: Option<IpAddr>,
    /// `namespace/name`, or `-` where only the IP is known (server-backed mode).
    pub pod: String,
    /// The role it is served, or why it has none.
    pub role: Result<String, String>,
    /// When its cached credentials expire, if any are cached.
    pub expires: Option<SystemTime>,
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

    /// `Ok` with a word on how current the broker's view is, or `Err` saying why it cannot
    /// answer yet (`/readyz`, `GetHealth`).
    fn readiness(&self) -> Result<String, String>;

    /// Whether everything behind the broker is ready to answer.
    fn ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// Every pod known here, its role or why it has none, and its cached credentials'
    /// expiry (`iamlet status`), ordered by IP.
    fn status(&self) -> Vec<PodStatus>;
}

/// Remembers which pod has been served which role, so that the first time is logged at
/// `info` ("who got what" without debug logs) and the rest are not. Bounded; entries of pods
/// that are gone are dropped when the pods change.
pub struct FirstServed {
    seen: moka::sync::Cache<(String, String), ()>,
}

impl Default for FirstServed {
    fn default() -> Self {
        FirstServed {
            seen: moka::sync::Cache::builder().max_capacity(100_000).build(),
        }
    }
}

impl FirstServed {
    /// Whether `pod` is served `role` for the first time (and remembers that it has been).
    pub fn first(&self, pod: &str, role: &str) -> bool {
        let key = (pod.to_owned(), role.to_owned());
        if self.seen.contains_key(&key) {
            return false;
        }
        self.seen.insert(key, ());
        true
    }

    /// Forgets the pods that `alive` says are gone. Costs a look at each pod served, not a
    /// copy of every pod known (`iamlet server` knows every pod in the cluster).
    pub fn retain(&self, alive: impl Fn(&str) -> bool) {
        for (key, ()) in &self.seen {
            if !alive(&key.0) {
                self.seen.invalidate(&*key);
            }
        }
    }
}

/// Pods, policy, and STS through the cache: the agent's standalone mode, and `iamlet server`.
pub struct Local<P, S, C> {
    pods: P,
    policy: Policy,
    cache: Cache<S, C>,
    metrics: Metrics,
    denials: Option<DenialSender>,
    served: FirstServed,
    /// Whether the cache has been given the pods' identities once (the first prefetch).
    prefetched: std::sync::atomic::AtomicBool,
    /// Whether every identity of that first prefetch has been asked of STS: from then on, a
    /// new pod's identity being fetched does not make iamlet unready.
    warmed: std::sync::atomic::AtomicBool,
    /// Denials logged lately, by (pod uid, role): an SDK retrying a denied role is logged once
    /// per `events::INTERVAL`, and counted every time.
    denials_logged: moka::sync::Cache<(String, String), ()>,
    /// Which pods the cache is prefetched for.
    prefetch: Prefetch,
}

/// Which pods could be asking for credentials, and so have them prefetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prefetch {
    /// Pods on the pod network, with their IP or still waiting for it (the IMDS front).
    Addressable,
    /// Every live pod, also on the host network or in an IP conflict (the token front too).
    Live,
}

impl<P: PodLookup, S: CredentialSource, C: Clock> Local<P, S, C> {
    /// `denials`, when given, receives every policy denial for a Kubernetes Event.
    pub fn new(
        pods: P,
        policy: Policy,
        cache: Cache<S, C>,
        metrics: Metrics,
        denials: Option<DenialSender>,
    ) -> Self {
        Local {
            pods,
            policy,
            cache,
            metrics,
            denials,
            served: FirstServed::default(),
            prefetched: std::sync::atomic::AtomicBool::new(false),
            warmed: std::sync::atomic::AtomicBool::new(false),
            denials_logged: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(crate::pods::events::INTERVAL)
                .build(),
            prefetch: Prefetch::Addressable,
        }
    }

    /// Prefetches for every live pod, not only those that own their IP: with the token front,
    /// host-network pods and pods in an IP conflict can be served too.
    pub fn prefetch_every_live_pod(&mut self) {
        self.prefetch = Prefetch::Live;
    }

    /// The pod with uid `uid` among this source's pods (the agent's: this node's), whatever
    /// its network or IP, waiting briefly for the watch to bring a new one; none while the view
    /// of pods is too old to trust. For the token front, which knows pods by a verified token.
    pub async fn pod_by_uid(&self, uid: &str) -> Result<Option<Known>, Error> {
        if let Some(age) = self.pods.too_stale() {
            return Err(Error::Stale { age });
        }
        Ok(self.pods.lookup_uid(uid).await)
    }

    /// The pod that owns `ip`, waiting briefly for the watch to bring a new one; none while
    /// the view of pods is too old to trust.
    pub async fn pod(&self, ip: IpAddr) -> Result<Arc<Pod>, Error> {
        if let Some(age) = self.pods.too_stale() {
            return Err(Error::Stale { age });
        }
        self.pods.lookup(ip).await.ok_or(Error::UnknownPod(ip))
    }

    /// The role `pod` may have under its namespace's policy. A denial is reported (log,
    /// metric, Event) here.
    pub fn role_of(&self, pod: &Pod) -> Result<RoleArn, Error> {
        let namespace = self.pods.namespace_policy(&pod.namespace);
        self.policy
            .role_for(pod, namespace.as_deref())
            .map_err(|refusal| self.refused(pod, refusal))
    }

    /// The error for `pod` refused its role; a denial is reported (log, metric, Event).
    fn refused(&self, pod: &Pod, refusal: Refusal) -> Error {
        match refusal {
            Refusal::NoRole => Error::NoRole { pod: pod.key() },
            Refusal::BadRole(error) => Error::BadRole {
                pod: pod.key(),
                error,
            },
            Refusal::Denied(role, denial) => self.deny(pod, role.as_str(), denial),
        }
    }

    /// The role annotation of `pod` as written, or the configured default role where it has
    /// none; empty when it has neither (what a kiam server answers to `GetPodRole`).
    pub fn role_annotation<'a>(&'a self, pod: &'a Pod) -> &'a str {
        pod.annotations
            .role
            .as_deref()
            .or(self.policy.default_role.as_deref())
            .unwrap_or_default()
    }

    /// Resolves a role as a client asked for it (a name, `path/name` or a full ARN) to an ARN.
    pub fn resolve(&self, requested: &str) -> Result<RoleArn, policy::Error> {
        RoleArn::resolve(requested, &self.policy.base_role_arn)
    }

    /// Credentials for `pod` in `role_arn` (which [`Local::role_of`] allowed), from the cache.
    pub async fn credentials_for(
        &self,
        pod: &Pod,
        role_arn: RoleArn,
    ) -> Result<Arc<Credentials>, Error> {
        let request = self.request_for(pod, role_arn);
        let credentials = self.cache.get(&request).await?;
        self.announce(pod, &request);
        Ok(credentials)
    }

    /// Logs the first time `pod` is served its role (`request`), once per pod and role.
    fn announce(&self, pod: &Pod, request: &AssumeRoleRequest) {
        if self.served.first(&pod.uid, request.role_arn.as_str()) {
            tracing::info!(
                pod = %pod.key(),
                role = %request.role_arn,
                session_name = request.session_name.as_str(),
                "serving a pod its role for the first time"
            );
        }
    }

    /// Refuses `pod` the role `role` for `denial`: counted, logged and sent as an Event.
    pub fn deny(&self, pod: &Pod, role: &str, denial: policy::Denial) -> Error {
        self.metrics.observe_denial(denial.reason());
        let key = (pod.uid.clone(), role.to_owned());
        if !self.denials_logged.contains_key(&key) {
            self.denials_logged.insert(key, ());
            tracing::info!(
                pod = %pod.key(),
                role,
                reason = %denial,
                "role denied by policy (repeats are counted in iamlet_policy_denials_total, logged again after 5m)"
            );
        }
        if let Some(denials) = &self.denials {
            // A full queue drops the Event: the log line and metric above already tell.
            let _ = denials.try_send(Denied {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                uid: pod.uid.clone(),
                role: role.to_owned(),
                reason: denial.to_string(),
            });
        }
        Error::Forbidden {
            pod: pod.key(),
            denial,
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

    /// The identities that the pods which may ask will ask for (pods still waiting for their
    /// IP too).
    fn wanted(&self) -> HashSet<AssumeRoleRequest> {
        let pods = match self.prefetch {
            Prefetch::Addressable => self.pods.snapshot(),
            Prefetch::Live => self.pods.live(),
        };
        pods.into_iter()
            .filter_map(|pod| {
                let namespace = self.pods.namespace_policy(&pod.namespace);
                let role = self.policy.role_for(&pod, namespace.as_deref()).ok()?;
                Some(self.request_for(&pod, role))
            })
            .collect()
    }

    /// Keeps the cache prefetched for the pods there are, following every change, until
    /// `cancel`. A new pod is synced at once; bursts of changes (a rollout) are taken
    /// together, at most one sync per `SYNC_INTERVAL`.
    pub async fn follow_pods(&self, cancel: CancellationToken) {
        let mut changes = self.pods.changes();
        let mut next_sync = tokio::time::Instant::now();
        loop {
            if self.pods.ready() {
                next_sync = tokio::time::Instant::now() + SYNC_INTERVAL;
                self.cache.sync(&self.wanted());
                self.prefetched
                    .store(true, std::sync::atomic::Ordering::Release);
                self.served.retain(|uid| self.pods.knows(uid));
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep_until(next_sync) => {}
            }
            changes.borrow_and_update();
        }
    }
}

impl<P: PodLookup, S: CredentialSource, C: Clock> Local<P, S, C> {
    /// `iamlet status`: every known pod, with its role or why it has none. Decides policy
    /// without reporting denials (looking is not asking).
    fn pod_status(&self) -> Vec<PodStatus> {
        let mut lines: Vec<PodStatus> = self
            .pods
            .known()
            .into_iter()
            .map(|known| {
                let role = match known.standing {
                    Standing::Servable => {
                        let namespace = self.pods.namespace_policy(&known.pod.namespace);
                        self.policy
                            .role_for(&known.pod, namespace.as_deref())
                            .map_err(|refusal| match refusal {
                                Refusal::NoRole => "no role annotation".to_owned(),
                                Refusal::BadRole(error) => format!("unusable annotation: {error}"),
                                Refusal::Denied(_, denial) => format!("denied: {denial}"),
                            })
                    }
                    standing => Err(standing.to_string()),
                };
                let expires = role.as_ref().ok().and_then(|role_arn| {
                    self.cache
                        .expiry(&self.request_for(&known.pod, role_arn.clone()))
                });
                PodStatus {
                    ip: known.ip,
                    pod: known.pod.key(),
                    role: role.map(|role_arn| role_arn.to_string()),
                    expires,
                }
            })
            .collect();
        lines.sort_by(|a, b| (a.ip, &a.pod).cmp(&(b.ip, &b.pod)));
        lines
    }
}

impl<P: PodLookup, S: CredentialSource, C: Clock> Broker for Local<P, S, C> {
    async fn role(&self, ip: IpAddr) -> Result<PodRole, Error> {
        Ok(self.entitlement(ip).await?.role().clone())
    }

    async fn credentials(
        &self,
        ip: IpAddr,
        name: &str,
    ) -> Result<(PodRole, Arc<Credentials>), Error> {
        let entitled = self.entitlement(ip).await?;
        if entitled.role_arn().name() != name {
            return Err(Error::WrongRole {
                pod: entitled.pod().key(),
                requested: name.to_owned(),
            });
        }
        let credentials = self.serve(&entitled).await?;
        Ok((entitled.role().clone(), credentials))
    }

    /// Ready once the pods are listed (and the view is not too stale) and, after a start,
    /// every identity they need has been asked of STS once: a (re)started iamlet answers its
    /// first requests from the cache. Later prefetches (a new pod) do not make it unready.
    fn readiness(&self) -> Result<String, String> {
        use std::sync::atomic::Ordering;
        let view = self.pods.readiness()?;
        if self.warmed.load(Ordering::Acquire) {
            return Ok(view);
        }
        if !self.prefetched.load(Ordering::Acquire) {
            return Err("the credential cache has not been filled yet".to_owned());
        }
        match self.cache.unfetched() {
            0 => {
                self.warmed.store(true, Ordering::Release);
                Ok(view)
            }
            n => Err(format!(
                "prefetching credentials: {n} identities not fetched from STS yet"
            )),
        }
    }

    fn status(&self) -> Vec<PodStatus> {
        self.pod_status()
    }
}
