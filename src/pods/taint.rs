//! The node's start-up window: pods scheduled before iamlet's rule exists would reach the
//! node's own IMDS. A node registered with a start-up taint (`kubelet
//! --register-with-taints=iamlet.io/agent-not-ready=:NoSchedule`) gets no ordinary pods until
//! iamlet removes the taint, which it does once it serves: its rule is in, its lists are
//! synced and its cache is warm (`/readyz`). Other taints are left as they are.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use tokio_util::sync::CancellationToken;

/// How often readiness is looked at while waiting, and the first retry after a failed patch.
const POLL: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("cannot read node {node}")]
    Get {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot update node {node}'s taints")]
    Patch {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// Waits until `ready` holds, then removes the taint `key` from node `node` (retrying with
/// backoff), then idles until `cancel`.
pub async fn remove_when_ready(
    client: kube::Client,
    node: String,
    key: String,
    ready: impl Fn() -> bool + Send,
    cancel: CancellationToken,
) {
    let nodes: Api<Node> = Api::all(client);
    let mut ticks = tokio::time::interval(POLL);
    while !ready() {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
    }
    let mut backoff = POLL;
    loop {
        match remove(&nodes, &node, &key).await {
            Ok(true) => {
                tracing::info!(node, taint = key, "iamlet serves: start-up taint removed");
                break;
            }
            Ok(false) => {
                tracing::info!(
                    node,
                    taint = key,
                    "iamlet serves; the node has no start-up taint to remove"
                );
                break;
            }
            Err(err) => {
                tracing::warn!(error = %crate::telemetry::chain(&err), "cannot remove the start-up taint; retrying");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    cancel.cancelled().await;
}

/// Removes every taint with `key` from the node. A merge patch carrying the resourceVersion
/// read makes a concurrent change to the node's taints a conflict (retried), never a lost
/// update. Returns whether there was one to remove.
async fn remove(nodes: &Api<Node>, node: &str, key: &str) -> Result<bool, Error> {
    let current = nodes.get(node).await.map_err(|source| Error::Get {
        node: node.to_owned(),
        source,
    })?;
    let taints = current
        .spec
        .as_ref()
        .and_then(|spec| spec.taints.clone())
        .unwrap_or_default();
    let kept: Vec<_> = taints.iter().filter(|taint| taint.key != key).collect();
    if kept.len() == taints.len() {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": current.metadata.resource_version},
        "spec": {"taints": kept},
    });
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| Error::Patch {
            node: node.to_owned(),
            source,
        })?;
    Ok(true)
}
