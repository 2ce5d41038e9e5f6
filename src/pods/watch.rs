//! The watch loop: kube-rs watchers on pods (this node's, by field selector `spec.nodeName`, or
//! the whole cluster's for `iamlet server`) and on namespaces (metadata only), turned into
//! index changes. Only what iamlet needs of each object is read ([`WirePod`]); the rest is
//! skipped as it is parsed.

use std::net::IpAddr;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;

use super::Scope;
use super::index::{Change, PodIndex, PodRecord};
use super::wire::WirePod;
use crate::pod::{
    Annotations, EXTERNAL_ID_ANNOTATION, PERMITTED_ANNOTATION, Pod, ROLE_ANNOTATION,
    SESSION_NAME_ANNOTATION,
};
use crate::policy::NamespacePolicy;

/// Keeps `index` current with the pods in `scope` and all namespaces until `cancel`. Quiet
/// watches are renewed every `timeout_secs`, which shows the API server is still there.
pub async fn run(
    client: kube::Client,
    scope: Scope,
    index: Arc<PodIndex>,
    timeout_secs: u32,
    cancel: CancellationToken,
) {
    let config = watcher::Config::default().timeout(timeout_secs);
    let pods_config = match &scope {
        Scope::Node(node) => config.clone().fields(&format!("spec.nodeName={node}")),
        Scope::Cluster => config.clone(),
    };
    let pods = watcher(Api::<WirePod>::all(client.clone()), pods_config).default_backoff();
    // Metadata only: iamlet needs nothing of a namespace but its name and annotations.
    let namespaces =
        watcher(Api::<PartialObjectMeta<Namespace>>::all(client), config).default_backoff();
    let pod_index = index.clone();
    let pods = drive(pods, "pods", move |event| {
        pod_index.apply_pod(event.map(pod_record))
    });
    let namespaces = drive(namespaces, "namespaces", move |event| {
        index.apply_namespace(event.map(namespace_policy))
    });
    tokio::select! {
        () = cancel.cancelled() => {}
        () = pods => {}
        () = namespaces => {}
    }
}

/// Feeds a watcher stream to `apply`, logging (not ending on) errors: the watcher retries with
/// backoff, relisting after `410 Gone`.
async fn drive<K>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    what: &'static str,
    apply: impl Fn(Change<K>),
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                let synced = matches!(event, watcher::Event::InitDone);
                apply(Change::from(event));
                if synced {
                    tracing::info!(what, "list received; watching for changes");
                }
            }
            Err(err) => tracing::warn!(what, error = %err, "watch failed; retrying"),
        }
    }
}

impl<K> From<watcher::Event<K>> for Change<K> {
    fn from(event: watcher::Event<K>) -> Change<K> {
        match event {
            watcher::Event::Apply(object) => Change::Apply(object),
            watcher::Event::Delete(object) => Change::Delete(object),
            watcher::Event::Init => Change::Init,
            watcher::Event::InitApply(object) => Change::InitApply(object),
            watcher::Event::InitDone => Change::InitDone,
        }
    }
}

impl<K> Change<K> {
    fn map<T>(self, f: impl FnOnce(K) -> T) -> Change<T> {
        match self {
            Change::Apply(object) => Change::Apply(f(object)),
            Change::Delete(object) => Change::Delete(f(object)),
            Change::Init => Change::Init,
            Change::InitApply(object) => Change::InitApply(f(object)),
            Change::InitDone => Change::InitDone,
        }
    }
}

/// What the index keeps of a Kubernetes pod.
pub fn pod_record(pod: WirePod) -> PodRecord {
    let metadata = pod.metadata;
    let mut annotations = metadata.annotations.unwrap_or_default();
    let phase = pod.phase.as_deref().unwrap_or_default();
    let ip = pod.ip.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok());
    PodRecord {
        pod: Arc::new(Pod {
            namespace: metadata.namespace.unwrap_or_default(),
            name: metadata.name.unwrap_or_default(),
            uid: metadata.uid.unwrap_or_default(),
            service_account: pod
                .service_account
                .filter(|sa| !sa.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            annotations: Annotations {
                role: annotations
                    .remove(ROLE_ANNOTATION)
                    .filter(|r| !r.trim().is_empty()),
                external_id: annotations.remove(EXTERNAL_ID_ANNOTATION),
                session_name: annotations.remove(SESSION_NAME_ANNOTATION),
            },
        }),
        ip,
        host_network: pod.host_network,
        finished: matches!(phase, "Succeeded" | "Failed"),
    }
}

/// What the index keeps of a namespace: its name and compiled policy.
pub fn namespace_policy(namespace: PartialObjectMeta<Namespace>) -> (String, NamespacePolicy) {
    let metadata = namespace.metadata;
    let annotation = metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(PERMITTED_ANNOTATION));
    let policy = NamespacePolicy::from_annotation(annotation.map(String::as_str));
    if let NamespacePolicy::Invalid { pattern, error } = &policy {
        tracing::warn!(
            namespace = metadata.name.as_deref().unwrap_or_default(),
            pattern,
            error,
            "invalid {PERMITTED_ANNOTATION} annotation: every role is denied in this namespace"
        );
    }
    (metadata.name.unwrap_or_default(), policy)
}
