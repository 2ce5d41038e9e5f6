//! Pod identity: which pod stands behind a source IP, and the policy of its namespace. Two
//! sources behind one trait: the Kubernetes watch of this node's pods (`index` + `watch`), and
//! the static table from the configuration (`[[pods.static]]`).

pub mod events;
pub mod freshness;
pub mod index;
mod static_table;
pub mod taint;
pub mod watch;
mod wire;

pub use index::PodIndex;
pub use static_table::StaticPods;

use std::time::Duration;

use crate::pod::Pod;
use crate::policy::NamespacePolicy;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The `[pods]` section.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub source: Source,
    /// The node whose pods are served; defaults to the `NODE_NAME` environment variable.
    pub node_name: String,
    /// How long a request from an unknown IP waits for the watch to bring its pod; keep it
    /// under the SDKs' 1 s IMDS timeout.
    #[serde(with = "humantime_serde")]
    pub wait_for_pod: Duration,
    /// How old the view of pods may get (no contact with the API server) before
    /// `when_stale` applies.
    #[serde(with = "humantime_serde")]
    pub max_staleness: Duration,
    /// What happens past `max_staleness`: "refuse" (no pod is served) or "serve" (the pods
    /// known before still are).
    pub when_stale: freshness::WhenStale,
    /// A taint key that iamlet removes from its node once it serves (rule in, lists synced,
    /// cache warm); empty = none. Register nodes with it to keep pods off until then.
    pub startup_taint: String,
    /// The pod table used when `source = "static"`.
    #[serde(rename = "static")]
    pub static_pods: Vec<StaticPod>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            source: Source::default(),
            node_name: String::new(),
            wait_for_pod: Duration::from_millis(900),
            max_staleness: Duration::from_secs(300),
            when_stale: freshness::WhenStale::Refuse,
            startup_taint: String::new(),
            static_pods: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    #[default]
    Kubernetes,
    Static,
}

/// One `[[pods.static]]` entry: a pod that iamlet serves without asking Kubernetes.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StaticPod {
    pub ip: IpAddr,
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_name: Option<String>,
}

fn default_service_account() -> String {
    "default".to_owned()
}

/// Which pods a Kubernetes source watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The pods of one node (the agent).
    Node(String),
    /// Every pod in the cluster (`iamlet server`).
    Cluster,
}

/// A pod the source knows, and whether it may be served by its IP (for `iamlet status`).
#[derive(Debug, Clone)]
pub struct Known {
    pub pod: Arc<Pod>,
    pub ip: Option<IpAddr>,
    pub standing: Standing,
}

/// Whether a known pod may be served by its IP, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    Servable,
    /// On the host network: its IP is the node's, and never identifies it.
    HostNetwork,
    /// Succeeded or Failed: its IP may already be another pod's.
    Finished,
    /// No IP yet.
    NoIp,
    /// Its IP is also claimed by these live pods: none of them is served until it clears.
    Conflict(Vec<String>),
}

impl std::fmt::Display for Standing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Standing::Servable => f.write_str("servable"),
            Standing::HostNetwork => f.write_str("host network"),
            Standing::Finished => f.write_str("finished"),
            Standing::NoIp => f.write_str("no IP yet"),
            Standing::Conflict(others) => {
                write!(f, "IP conflict with {}", others.join(", "))
            }
        }
    }
}

/// What a reader (the broker) decided about the pod that alone claims an IP, kept with that
/// claim ([`PodLookup::remember`]) so that requests need not decide again. Opaque to the index.
pub type Memo = Arc<dyn std::any::Any + Send + Sync>;

/// The pod that owns an IP now, and what was remembered about it, if that still holds.
#[derive(Clone)]
pub struct Found {
    pub pod: Arc<Pod>,
    /// Remembered for exactly this pod, its claim on the IP and the namespace policies as they
    /// are now; `None` when nothing is (yet, or any more).
    pub memo: Option<Memo>,
    /// Where and when it was found, so that [`PodLookup::remember`] can tell whether anything
    /// changed since.
    pub(crate) ip: IpAddr,
    pub(crate) namespaces: u64,
}

impl Found {
    /// A pod found with nothing remembered (sources that keep no memos).
    pub fn unremembered(pod: Arc<Pod>, ip: IpAddr) -> Found {
        Found {
            pod,
            memo: None,
            ip,
            namespaces: 0,
        }
    }
}

impl std::fmt::Debug for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Found")
            .field("pod", &self.pod)
            .field("remembered", &self.memo.is_some())
            .field("ip", &self.ip)
            .finish()
    }
}

/// Finds the pod behind a source IP.
pub trait PodLookup: Send + Sync + 'static {
    /// The pod that owns `ip` now, if one does and may be served.
    fn lookup(&self, ip: IpAddr) -> impl Future<Output = Option<Arc<Pod>>> + Send;
    /// As [`PodLookup::lookup`], with what was remembered about the pod: the request path.
    fn recall(&self, ip: IpAddr) -> impl Future<Output = Option<Found>> + Send {
        async move {
            self.lookup(ip)
                .await
                .map(|pod| Found::unremembered(pod, ip))
        }
    }
    /// Keeps `memo` with the pod `found` names for as long as that pod, its sole claim on the
    /// IP and every namespace's policy stay as they were when it was found; if anything
    /// changed meanwhile, keeps nothing. Sources that keep no memos ignore it.
    fn remember(&self, _found: &Found, _memo: Memo) {}
    /// The policy of `namespace`; `None` while it is unknown.
    fn namespace_policy(&self, namespace: &str) -> Option<Arc<NamespacePolicy>>;
    /// Whether the source has a complete picture yet (`/readyz`).
    fn ready(&self) -> bool;
    /// Every pod that will ask for credentials: live and off the host network, with or
    /// without its IP yet (for prefetching; nothing is served from it).
    fn snapshot(&self) -> Vec<Arc<Pod>>;
    /// Every pod the source knows, servable or not (for `iamlet status`).
    fn known(&self) -> Vec<Known>;
    /// Whether the source knows a pod with `uid`, servable or not.
    fn knows(&self, uid: &str) -> bool;
    /// The pod with uid `uid`, whatever its network or IP, waiting briefly for the watch to
    /// bring a new one (the token front, which knows pods by a verified token). Only the
    /// Kubernetes source knows pods by uid.
    fn lookup_uid(&self, _uid: &str) -> impl Future<Output = Option<Known>> + Send {
        std::future::ready(None)
    }
    /// Every pod that a pod-bound token could be served for: not finished, whatever its
    /// network or IP (for prefetching when the token front is on).
    fn live(&self) -> Vec<Arc<Pod>> {
        self.snapshot()
    }
    /// The view's age, when it is too old to answer from (`pods.when_stale = "refuse"`).
    fn too_stale(&self) -> Option<Duration> {
        None
    }
    /// `Ok` with a word on how current the view is, or `Err` saying why it cannot be used:
    /// not listed yet, or too stale (`/readyz`, `GetHealth`).
    fn readiness(&self) -> Result<String, String>;
    /// Changes whenever pods or namespaces change.
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;
}

/// This node's pods, from the Kubernetes watch.
pub struct KubernetesPods {
    pub index: Arc<PodIndex>,
    pub wait_for_pod: Duration,
    pub staleness: Arc<freshness::Staleness>,
}

impl PodLookup for KubernetesPods {
    async fn lookup(&self, ip: IpAddr) -> Option<Arc<Pod>> {
        self.index.find(ip, self.wait_for_pod).await
    }

    async fn recall(&self, ip: IpAddr) -> Option<Found> {
        self.index.find_recalled(ip, self.wait_for_pod).await
    }

    fn remember(&self, found: &Found, memo: Memo) {
        self.index.remember(found, memo);
    }

    fn namespace_policy(&self, namespace: &str) -> Option<Arc<NamespacePolicy>> {
        self.index.namespace(namespace)
    }

    fn ready(&self) -> bool {
        self.index.synced()
    }

    fn snapshot(&self) -> Vec<Arc<Pod>> {
        self.index.on_pod_network()
    }

    fn known(&self) -> Vec<Known> {
        self.index.known()
    }

    fn knows(&self, uid: &str) -> bool {
        self.index.contains(uid)
    }

    async fn lookup_uid(&self, uid: &str) -> Option<Known> {
        self.index.find_uid(uid, self.wait_for_pod).await
    }

    fn live(&self) -> Vec<Arc<Pod>> {
        self.index.live()
    }

    fn too_stale(&self) -> Option<Duration> {
        self.staleness.too_stale()
    }

    fn readiness(&self) -> Result<String, String> {
        if !self.index.synced() {
            return Err("the lists of pods and namespaces have not been received yet".to_owned());
        }
        self.staleness.describe()
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.index.subscribe()
    }
}

/// The configured source.
pub enum PodSource {
    Kubernetes(KubernetesPods),
    Static(StaticPods),
}

impl PodLookup for PodSource {
    async fn lookup(&self, ip: IpAddr) -> Option<Arc<Pod>> {
        match self {
            PodSource::Kubernetes(pods) => pods.lookup(ip).await,
            PodSource::Static(pods) => pods.lookup(ip).await,
        }
    }

    async fn recall(&self, ip: IpAddr) -> Option<Found> {
        match self {
            PodSource::Kubernetes(pods) => pods.recall(ip).await,
            PodSource::Static(pods) => pods.recall(ip).await,
        }
    }

    fn remember(&self, found: &Found, memo: Memo) {
        match self {
            PodSource::Kubernetes(pods) => pods.remember(found, memo),
            PodSource::Static(pods) => pods.remember(found, memo),
        }
    }

    fn namespace_policy(&self, namespace: &str) -> Option<Arc<NamespacePolicy>> {
        match self {
            PodSource::Kubernetes(pods) => pods.namespace_policy(namespace),
            PodSource::Static(pods) => pods.namespace_policy(namespace),
        }
    }

    fn ready(&self) -> bool {
        match self {
            PodSource::Kubernetes(pods) => pods.ready(),
            PodSource::Static(pods) => pods.ready(),
        }
    }

    fn snapshot(&self) -> Vec<Arc<Pod>> {
        match self {
            PodSource::Kubernetes(pods) => pods.snapshot(),
            PodSource::Static(pods) => pods.snapshot(),
        }
    }

    fn known(&self) -> Vec<Known> {
        match self {
            PodSource::Kubernetes(pods) => pods.known(),
            PodSource::Static(pods) => pods.known(),
        }
    }

    fn knows(&self, uid: &str) -> bool {
        match self {
            PodSource::Kubernetes(pods) => pods.knows(uid),
            PodSource::Static(pods) => pods.knows(uid),
        }
    }

    async fn lookup_uid(&self, uid: &str) -> Option<Known> {
        match self {
            PodSource::Kubernetes(pods) => pods.lookup_uid(uid).await,
            PodSource::Static(pods) => pods.lookup_uid(uid).await,
        }
    }

    fn live(&self) -> Vec<Arc<Pod>> {
        match self {
            PodSource::Kubernetes(pods) => pods.live(),
            PodSource::Static(pods) => pods.live(),
        }
    }

    fn too_stale(&self) -> Option<Duration> {
        match self {
            PodSource::Kubernetes(pods) => pods.too_stale(),
            PodSource::Static(pods) => pods.too_stale(),
        }
    }

    fn readiness(&self) -> Result<String, String> {
        match self {
            PodSource::Kubernetes(pods) => pods.readiness(),
            PodSource::Static(pods) => pods.readiness(),
        }
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        match self {
            PodSource::Kubernetes(pods) => pods.changes(),
            PodSource::Static(pods) => pods.changes(),
        }
    }
}
