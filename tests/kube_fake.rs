//! The Kubernetes pod source against a scripted fake API server, for the protocol cases a real
//! server cannot be made to produce on demand: 410 Gone, streams cut mid-flight, bookmarks,
//! lists held back, and add/delete orderings around IP reuse. The client is the real kube-rs
//! inside the real binary.

mod support;

use std::net::IpAddr;
use std::time::Duration;

use serde_json::json;
use support::fake_kube::{FakeKube, namespace, pod};
use support::http::{get, ip};
use support::iamlet::Iamlet;
use support::{eventually, moto, sts_front};

const WITHIN: Duration = Duration::from_secs(10);
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
const ANY_ROLE: &str = "arn:aws:iam::123456789012:role/.*";

struct World {
    _dir: tempfile::TempDir,
    fake: FakeKube,
    iamlet: Iamlet,
}

/// The fake with namespace `shop` (permitting every role), and iamlet watching node-1.
fn start(prepare: impl FnOnce(&FakeKube)) -> World {
    let fake = FakeKube::start();
    fake.apply_namespace(namespace("shop", Some(ANY_ROLE)));
    prepare(&fake);
    let dir = tempfile::tempdir().expect("tempdir");
    let sts = sts_front::start(([127, 0, 0, 1], 0).into(), moto::shared().addr);
    let setup = fake.setup(dir.path(), sts.url());
    let iamlet = Iamlet::start(dir.path(), &setup);
    World {
        _dir: dir,
        fake,
        iamlet,
    }
}

async fn role_at(world: &World, pod_ip: IpAddr) -> Option<String> {
    let reply = get(pod_ip, world.iamlet.imds, CREDS, None).await;
    (reply.status == 200).then_some(reply.body)
}

fn count(world: &World, request: &str) -> usize {
    world
        .fake
        .requests()
        .iter()
        .filter(|r| r.as_str() == request)
        .count()
}

#[tokio::test]
async fn this_nodes_pods_are_served_and_deleted_pods_are_gone() {
    let world = start(|fake| {
        fake.apply_pod(pod(
            "shop",
            "web-0",
            "u-web",
            "node-1",
            "127.0.0.2",
            Some("web"),
        ));
        fake.apply_pod(pod(
            "shop",
            "elsewhere",
            "u-other",
            "node-2",
            "127.0.0.3",
            Some("web"),
        ));
        fake.apply_pod(pod("shop", "plain", "u-plain", "node-1", "127.0.0.4", None));
    });
    eventually("ready", WITHIN, || world.iamlet.ready()).await;
    assert_eq!(
        role_at(&world, ip("127.0.0.2")).await.as_deref(),
        Some("web")
    );
    assert_eq!(
        role_at(&world, ip("127.0.0.3")).await,
        None,
        "a pod of another node"
    );
    assert_eq!(
        role_at(&world, ip("127.0.0.4")).await,
        None,
        "a pod without a role"
    );
    let creds = get(
        ip("127.0.0.2"),
        world.iamlet.imds,
        &format!("{CREDS}web"),
        None,
    )
    .await;
    assert_eq!(creds.json()["Code"], "Success");
    // The watch asked only for this node's pods.
    assert!(world.fake.requests().iter().any(|r| r == "LIST pods"));

    world.fake.delete_pod("u-web");
    eventually("the deleted pod is gone", WITHIN, || async {
        role_at(&world, ip("127.0.0.2")).await.is_none()
    })
    .await;
}

#[tokio::test]
async fn a_first_request_waits_for_its_pod_to_arrive() {
    let world = start(|_| {});
    eventually("ready", WITHIN, || world.iamlet.ready()).await;
    let imds = world.iamlet.imds;
    let request = tokio::spawn(async move { get(ip("127.0.0.5"), imds, CREDS, None).await });
    // The request has reached iamlet and waits there for its pod.
    eventually("the request in flight", WITHIN, || async {
        world.iamlet.metric("iamlet_imds_requests_in_flight").await >= 1.0
    })
    .await;
    world.fake.apply_pod(pod(
        "shop",
        "new-0",
        "u-new",
        "node-1",
        "127.0.0.5",
        Some("web"),
    ));
    let reply = request.await.expect("request");
    assert_eq!((reply.status, reply.body.as_str()), (200, "web"));
}

#[tokio::test]
async fn readyz_waits_for_both_lists() {
    let world = start(|fake| fake.hold_namespace_list(true));
    // The pod list is in and the namespace list is asked for (and held).
    eventually("both lists asked for", WITHIN, || async {
        let requests = world.fake.requests();
        ["LIST pods", "HELD LIST namespaces"]
            .iter()
            .all(|list| requests.iter().any(|r| r == list))
    })
    .await;
    let reply = get(ip("127.0.0.1"), world.iamlet.admin, "/readyz", None).await;
    assert_eq!(reply.status, 503);
    assert!(reply.body.contains("not ready"), "{}", reply.body);
    world.fake.hold_namespace_list(false);
    eventually("ready once both lists are in", WITHIN, || {
        world.iamlet.ready()
    })
    .await;
}

#[tokio::test]
async fn a_410_gone_makes_it_relist_and_catch_up() {
    let world = start(|_| {});
    eventually("ready", WITHIN, || world.iamlet.ready()).await;
    assert_eq!(count(&world, "LIST pods"), 1);
    // History is lost and the stream cut before the pod arrives: only a relist can bring it.
    world.fake.compact();
    world.fake.cut_watches();
    world.fake.apply_pod(pod(
        "shop",
        "late-0",
        "u-late",
        "node-1",
        "127.0.0.6",
        Some("web"),
    ));
    eventually("a relist after 410 Gone", WITHIN, || async {
        count(&world, "LIST pods") >= 2
    })
    .await;
    eventually("the pod added while history was lost", WITHIN, || async {
        role_at(&world, ip("127.0.0.6")).await.as_deref() == Some("web")
    })
    .await;
}

#[tokio::test]
async fn a_cut_stream_resumes_without_relisting() {
    let world = start(|_| {});
    eventually("ready", WITHIN, || world.iamlet.ready()).await;
    world.fake.cut_watches();
    world.fake.apply_pod(pod(
        "shop",
        "web-1",
        "u-1",
        "node-1",
        "127.0.0.7",
        Some("web"),
    ));
    eventually("the pod added across the cut", WITHIN, || async {
        role_at(&world, ip("127.0.0.7")).await.as_deref() == Some("web")
    })
    .await;
    assert_eq!(count(&world, "LIST pods"), 1, "{:?}", world.fake.requests());
}

#[tokio::test]
async fn bookmarks_move_the_resume_point() {
    let world = start(|_| {});
    eventually("ready", WITHIN, || world.iamlet.ready()).await;
    // Each newly opened pod watch gets a bookmark, then its stream is cut: the watch that
    // follows must resume at that bookmark. A cut that beats the bookmark to iamlet shows as a
    // watch resuming from before it; the new watch then gets a bookmark of its own, and the
    // cut is tried again (no fixed wait stands in for "the bookmark has arrived").
    let deadline = std::time::Instant::now() + WITHIN;
    let mut sent = Vec::new();
    let mut bookmarked = 0;
    loop {
        let requests = world.fake.requests();
        let resumed = sent
            .iter()
            .any(|rv| requests.contains(&format!("WATCH pods from {rv}")));
        if resumed {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no watch resumed at a bookmark {sent:?}: {requests:?}"
        );
        let opened = requests
            .iter()
            .filter(|r| r.starts_with("WATCH pods"))
            .count();
        if opened > bookmarked {
            bookmarked = opened;
            sent.push(world.fake.bookmark());
            tokio::time::sleep(Duration::from_millis(50)).await;
            world.fake.cut_watches();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count(&world, "LIST pods"), 1);
}

#[tokio::test]
async fn ip_reuse_never_hands_the_new_pod_the_old_role() {
    let world = start(|fake| {
        fake.apply_pod(pod(
            "shop",
            "admin-0",
            "u-admin",
            "node-1",
            "127.0.0.8",
            Some("admin"),
        ));
        fake.apply_pod(pod(
            "shop",
            "job-0",
            "u-job",
            "node-1",
            "127.0.0.9",
            Some("admin"),
        ));
    });
    eventually("ready", WITHIN, || world.iamlet.ready()).await;

    // Delete, then add: the new pod is served once its event is in.
    world.fake.delete_pod("u-admin");
    world.fake.apply_pod(pod(
        "shop",
        "web-0",
        "u-web-0",
        "node-1",
        "127.0.0.8",
        Some("web"),
    ));
    eventually("the new pod's role", WITHIN, || async {
        role_at(&world, ip("127.0.0.8")).await.as_deref() == Some("web")
    })
    .await;

    // Add, then delete: while both claim the IP, neither is served.
    world.fake.apply_pod(pod(
        "shop",
        "web-1",
        "u-web-1",
        "node-1",
        "127.0.0.9",
        Some("web"),
    ));
    eventually("the conflict is seen", WITHIN, || async {
        world
            .iamlet
            .log()
            .contains("IP claimed by more than one live pod")
    })
    .await;
    assert_eq!(
        role_at(&world, ip("127.0.0.9")).await,
        None,
        "served during a conflict"
    );
    world.fake.delete_pod("u-job");
    eventually("the new pod's role", WITHIN, || async {
        role_at(&world, ip("127.0.0.9")).await.as_deref() == Some("web")
    })
    .await;

    // A finished pod gives up its IP even before it is deleted.
    let mut finished = pod(
        "shop",
        "web-1",
        "u-web-1",
        "node-1",
        "127.0.0.9",
        Some("web"),
    );
    finished["status"]["phase"] = json!("Succeeded");
    world.fake.apply_pod(finished);
    eventually("the finished pod is not served", WITHIN, || async {
        role_at(&world, ip("127.0.0.9")).await.is_none()
    })
    .await;
}

#[tokio::test]
async fn namespace_policy_is_enforced_and_follows_changes() {
    let world = start(|fake| {
        fake.apply_namespace(namespace(
            "team",
            Some("arn:aws:iam::123456789012:role/team-.*"),
        ));
        fake.apply_namespace(namespace("open", None));
        fake.apply_pod(pod(
            "team",
            "app-0",
            "u-app",
            "node-1",
            "127.0.0.10",
            Some("team-app"),
        ));
        fake.apply_pod(pod(
            "team",
            "sneaky",
            "u-sneaky",
            "node-1",
            "127.0.0.11",
            Some("admin"),
        ));
        fake.apply_pod(pod(
            "open",
            "x-0",
            "u-x",
            "node-1",
            "127.0.0.12",
            Some("team-app"),
        ));
    });
    eventually("ready", WITHIN, || world.iamlet.ready()).await;
    assert_eq!(
        role_at(&world, ip("127.0.0.10")).await.as_deref(),
        Some("team-app")
    );
    let denied = get(ip("127.0.0.11"), world.iamlet.imds, CREDS, None).await;
    assert_eq!(denied.status, 404);
    assert!(denied.body.contains("forbidden by policy"));
    assert_eq!(
        role_at(&world, ip("127.0.0.12")).await,
        None,
        "no annotation permits nothing"
    );
    // Repeated denials make one Event (rate-limited), on the pod, with the reason.
    get(ip("127.0.0.11"), world.iamlet.imds, CREDS, None).await;
    eventually("a denial Event", WITHIN, || async {
        world
            .fake
            .requests()
            .iter()
            .any(|r| r.starts_with("EVENT Warning IamRoleForbidden on team/sneaky"))
    })
    .await;
    let events = world
        .fake
        .requests()
        .iter()
        .filter(|r| r.contains("on team/sneaky"))
        .count();
    assert_eq!(events, 1);
    assert!(
        world
            .iamlet
            .metric("iamlet_policy_denials_total{reason=\"not_permitted\"}")
            .await
            >= 2.0
    );

    // The namespace changes its mind, both ways.
    world.fake.apply_namespace(namespace(
        "team",
        Some("arn:aws:iam::123456789012:role/(team-.*|admin)"),
    ));
    eventually("admin permitted", WITHIN, || async {
        role_at(&world, ip("127.0.0.11")).await.as_deref() == Some("admin")
    })
    .await;
    world
        .fake
        .apply_namespace(namespace("team", Some("(unclosed")));
    eventually("an invalid pattern denies all", WITHIN, || async {
        role_at(&world, ip("127.0.0.10")).await.is_none()
    })
    .await;
    assert!(
        world
            .iamlet
            .metric("iamlet_policy_denials_total{reason=\"invalid_pattern\"}")
            .await
            >= 1.0
    );
    assert!(
        world.iamlet.ready().await,
        "an invalid annotation must not take iamlet down"
    );
}

#[tokio::test]
async fn a_list_longer_than_a_page_arrives_whole() {
    // 1200 pods on node-1 and as many elsewhere: iamlet asks for pages of 500 (as client-go
    // does), and the fake pages from one snapshot as the API server does from etcd.
    let world = start(|fake| {
        fake.load_pods((0..2400).map(|i| {
            let node = if i % 2 == 0 { "node-1" } else { "node-2" };
            let ip = format!("127.2.{}.{}", i / 200, 1 + i % 200);
            let role = format!("role-{}", i % 7);
            pod(
                "shop",
                &format!("web-{i}"),
                &format!("u-{i}"),
                node,
                &ip,
                Some(&role),
            )
        }));
    });
    eventually("ready", WITHIN, || world.iamlet.ready()).await;
    assert_eq!(count(&world, "LIST pods"), 1);
    assert_eq!(
        count(&world, "LIST pods continued"),
        2,
        "1200 pods in pages of 500"
    );
    for i in [0, 998, 2398] {
        let pod_ip = ip(&format!("127.2.{}.{}", i / 200, 1 + i % 200));
        assert_eq!(
            role_at(&world, pod_ip).await,
            Some(format!("role-{}", i % 7)),
            "pod {i}"
        );
    }
    assert_eq!(
        role_at(&world, ip("127.2.0.2")).await,
        None,
        "a pod of node-2"
    );
}
