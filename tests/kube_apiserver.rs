//! End to end against a real kube-apiserver and etcd: iamlet runs with the token of its
//! ServiceAccount, bound by the RBAC deploy/ ships (so a missing permission fails here), and
//! watches one node. Pods are created with `spec.nodeName` and given their IP through the
//! status subresource, as a kubelet would. The pod that matters most is this test process
//! itself (127.0.0.1), using aws-config, unmodified, to ask moto's STS who it is.

mod support;

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use support::apiserver::{self, IAMLET_TOKEN, STRANGER_TOKEN, create_namespace, run_pod};
use support::http::{get, ip};
use support::iamlet::{Iamlet, Setup};
use support::{eventually, moto, rust_sdk};

const WITHIN: Duration = Duration::from_secs(20);
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

fn start_iamlet(dir: &std::path::Path, token: &str, node: &str) -> Iamlet {
    let kubeconfig = apiserver::shared().kubeconfig(token);
    let setup = Setup {
        imds_listen: format!("127.0.0.1:{}", support::free_port()),
        sts: moto::shared().url(),
        pods_source: "kubernetes".into(),
        env: vec![
            ("KUBECONFIG".into(), kubeconfig.display().to_string()),
            ("NODE_NAME".into(), node.into()),
        ],
        ..Setup::default()
    };
    Iamlet::start(dir, &setup)
}

async fn role_at(iamlet: &Iamlet, pod_ip: IpAddr) -> Option<String> {
    let reply = get(pod_ip, iamlet.imds, CREDS, None).await;
    (reply.status == 200).then_some(reply.body)
}

#[tokio::test(flavor = "multi_thread")]
async fn iamlet_serves_its_nodes_pods_under_the_shipped_rbac() {
    require_apiserver!();
    let server = apiserver::shared();
    let admin = server.admin().await;
    create_namespace(
        &admin,
        "team-a",
        Some("arn:aws:iam::123456789012:role/a-.*"),
    )
    .await;
    create_namespace(&admin, "team-b", None).await;
    let node = "node-e2e";
    run_pod(
        &admin,
        "team-a",
        "web",
        node,
        "127.0.0.1",
        Some("a-web"),
        false,
    )
    .await;
    run_pod(
        &admin,
        "team-a",
        "sneaky",
        node,
        "127.0.0.21",
        Some("admin"),
        false,
    )
    .await;
    run_pod(
        &admin,
        "team-b",
        "plain",
        node,
        "127.0.0.22",
        Some("a-web"),
        false,
    )
    .await;
    run_pod(
        &admin,
        "team-a",
        "host",
        node,
        "127.0.0.23",
        Some("a-web"),
        true,
    )
    .await;
    run_pod(
        &admin,
        "team-a",
        "elsewhere",
        "node-other",
        "127.0.0.24",
        Some("a-web"),
        false,
    )
    .await;

    let dir = tempfile::tempdir().expect("tempdir");
    let mut iamlet = start_iamlet(dir.path(), IAMLET_TOKEN, node);
    eventually("ready", WITHIN, || iamlet.ready()).await;

    // The real SDK, as the pod at 127.0.0.1.
    let imds = format!("http://{}", iamlet.imds);
    let arn = rust_sdk::caller_identity(&imds, &moto::shared().url()).await;
    assert_eq!(
        arn.as_deref(),
        Ok("arn:aws:sts::123456789012:assumed-role/a-web/team-a.default")
    );

    let denied = get(ip("127.0.0.21"), iamlet.imds, CREDS, None).await;
    assert_eq!(
        (denied.status, denied.body.trim()),
        (404, "iamlet: forbidden by policy")
    );
    assert_eq!(
        role_at(&iamlet, ip("127.0.0.22")).await,
        None,
        "unannotated namespace"
    );
    assert_eq!(
        role_at(&iamlet, ip("127.0.0.23")).await,
        None,
        "host-network pod"
    );
    assert_eq!(
        role_at(&iamlet, ip("127.0.0.24")).await,
        None,
        "another node's pod"
    );

    // The denial is an Event on the pod (events.k8s.io, created under iamlet's RBAC).
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin.clone(), "team-a");
    eventually("an IamRoleForbidden Event", WITHIN, || async {
        events.list(&Default::default()).await.is_ok_and(|list| {
            list.items.iter().any(|e| {
                e.reason.as_deref() == Some("IamRoleForbidden")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("sneaky")
            })
        })
    })
    .await;

    // The pod's annotation changes: the new role is served.
    let pods = Api::<Pod>::namespaced(admin.clone(), "team-a");
    let patch = json!({"metadata": {"annotations": {"iam.amazonaws.com/role": "a-reader"}}});
    pods.patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate");
    eventually("the new role", WITHIN, || async {
        role_at(&iamlet, ip("127.0.0.1")).await.as_deref() == Some("a-reader")
    })
    .await;

    // The namespace narrows its policy: the role is no longer served.
    let namespaces = Api::<Namespace>::all(admin.clone());
    let narrow = json!({"metadata": {"annotations": {"iam.amazonaws.com/permitted": "arn:aws:iam::123456789012:role/a-web"}}});
    namespaces
        .patch("team-a", &PatchParams::default(), &Patch::Merge(&narrow))
        .await
        .expect("annotate ns");
    eventually("the narrowed policy", WITHIN, || async {
        role_at(&iamlet, ip("127.0.0.1")).await.is_none()
    })
    .await;

    // Deleted, and the IP reused by a new pod: the new pod's role, never the old one's.
    pods.delete("web", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete");
    eventually("the deleted pod is gone", WITHIN, || async {
        get(ip("127.0.0.1"), iamlet.imds, CREDS, None).await.status == 404
    })
    .await;
    run_pod(
        &admin,
        "team-a",
        "web-next",
        node,
        "127.0.0.1",
        Some("a-web"),
        false,
    )
    .await;
    eventually("the new pod's role", WITHIN, || async {
        role_at(&iamlet, ip("127.0.0.1")).await.as_deref() == Some("a-web")
    })
    .await;

    // A restart relists and serves again.
    assert!(iamlet.stop().success());
    let iamlet = start_iamlet(dir.path(), IAMLET_TOKEN, node);
    eventually("ready after a restart", WITHIN, || iamlet.ready()).await;
    assert_eq!(
        role_at(&iamlet, ip("127.0.0.1")).await.as_deref(),
        Some("a-web")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_rbac_iamlet_never_becomes_ready() {
    require_apiserver!();
    let dir = tempfile::tempdir().expect("tempdir");
    let iamlet = start_iamlet(dir.path(), STRANGER_TOKEN, "node-stranger");
    eventually("the watch is refused", WITHIN, || async {
        iamlet.log().contains("watch failed")
    })
    .await;
    assert!(!iamlet.ready().await);
    assert!(iamlet.log().contains("forbidden"), "{}", iamlet.log());
}
