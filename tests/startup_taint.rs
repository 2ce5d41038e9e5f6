//! The node's start-up window, closed: a node registered with iamlet's start-up taint keeps
//! ordinary pods off until iamlet serves there. On the real API server, under the RBAC
//! deploy/components/startup-taint ships: iamlet removes its taint (and no other) from its own
//! node only once its lists are synced and its cache is warm.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use serde_json::json;
use support::apiserver::{self, IAMLET_TOKEN, create_namespace, run_pod};
use support::http::get;
use support::iamlet::{Iamlet, Setup};
use support::{eventually, moto, sts_front};

const TAINT: &str = "iamlet.io/agent-not-ready";
const WITHIN: Duration = Duration::from_secs(40);

async fn taints(nodes: &Api<Node>, name: &str) -> Vec<String> {
    let node = nodes.get(name).await.expect("node");
    node.spec
        .and_then(|spec| spec.taints)
        .unwrap_or_default()
        .into_iter()
        .map(|taint| taint.key)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_start_up_taint_goes_once_iamlet_serves_and_not_before() {
    require_apiserver!();
    let admin = apiserver::shared().admin().await;
    let nodes: Api<Node> = Api::all(admin.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": "tainted-node"},
        "spec": {"taints": [
            {"key": TAINT, "effect": "NoSchedule"},
            {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}
        ]}
    }))
    .expect("node");
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("create node");
    create_namespace(&admin, "tainted", Some("arn:aws:iam::123456789012:role/.*")).await;
    // STS holds this role's answer back for a while: the cache is not warm until it comes.
    run_pod(
        &admin,
        "tainted",
        "app",
        "tainted-node",
        "127.0.0.31",
        Some("stall-app"),
        false,
    )
    .await;

    let front = sts_front::start(([127, 0, 0, 1], 0).into(), moto::shared().addr);
    let kubeconfig = apiserver::shared().kubeconfig(IAMLET_TOKEN);
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup {
        imds_listen: format!("127.0.0.1:{}", support::free_port()),
        sts: front.url(),
        pods_source: "kubernetes".into(),
        extra: format!("startup_taint = \"{TAINT}\"\n"),
        env: vec![
            ("KUBECONFIG".into(), kubeconfig.display().to_string()),
            ("NODE_NAME".into(), "tainted-node".into()),
        ],
        ..Setup::default()
    };
    let iamlet = Iamlet::start(dir.path(), &setup);
    let readyz = || async {
        get(iamlet.admin.ip(), iamlet.admin, "/readyz", None)
            .await
            .body
    };
    eventually(
        "the lists are in and prefetch is under way",
        WITHIN,
        || async { readyz().await.contains("prefetching credentials") },
    )
    .await;
    // "Prefetching" is said once the fetch is started; its call reaches STS a moment later.
    eventually("STS is asked for the pod's role", WITHIN, || async {
        front.assume_role_calls("stall-app") >= 1
    })
    .await;
    let before = taints(&nodes, "tainted-node").await;
    assert!(
        before.contains(&TAINT.to_owned()),
        "the taint went before the cache was warm"
    );

    eventually("the start-up taint is removed", WITHIN, || async {
        !taints(&nodes, "tainted-node")
            .await
            .contains(&TAINT.to_owned())
    })
    .await;
    assert!(iamlet.ready().await, "the taint went while not ready");
    // Every other taint (ours, and the API server's own) is left as it was.
    let others: Vec<String> = before.into_iter().filter(|key| key != TAINT).collect();
    assert!(others.contains(&"dedicated".to_owned()));
    assert_eq!(taints(&nodes, "tainted-node").await, others);
    eventually("the removal is logged", WITHIN, || async {
        iamlet.log().contains("start-up taint removed")
    })
    .await;
}
