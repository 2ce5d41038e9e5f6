//! When iamlet cannot reach the API server, its view of pods freezes; a pod IP freed and reused
//! meanwhile must not be answered with the old pod's role. Against the scripted fake API
//! server, which here goes unreachable while an IP changes hands: past `pods.max_staleness`,
//! `when_stale = "refuse"` (the default) answers no pod and reports not ready, `"serve"` keeps
//! answering (the documented trade-off), and both say so; once contact is back, the new pod
//! gets its own role. A quiet but healthy watch never counts as stale.

mod support;

use std::time::Duration;

use support::fake_kube::{FakeKube, namespace, pod};
use support::http::{get, ip};
use support::iamlet::Iamlet;
use support::{eventually, moto};

const WITHIN: Duration = Duration::from_secs(15);
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

struct World {
    _dir: tempfile::TempDir,
    fake: FakeKube,
    iamlet: Iamlet,
}

/// `shop/old` (role `web`) at 127.0.0.2, and iamlet with a 2 s bound on staleness.
fn start(when_stale: &str) -> World {
    let fake = FakeKube::start();
    fake.apply_namespace(namespace("shop", Some("arn:aws:iam::123456789012:role/.*")));
    fake.apply_pod(pod(
        "shop",
        "old",
        "u-old",
        "node-1",
        "127.0.0.2",
        Some("web"),
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut setup = fake.setup(dir.path(), moto::shared().url());
    setup.extra = format!("max_staleness = \"2s\"\nwhen_stale = \"{when_stale}\"\n");
    let iamlet = Iamlet::start(dir.path(), &setup);
    World {
        _dir: dir,
        fake,
        iamlet,
    }
}

async fn answer_at(world: &World) -> (u16, String) {
    let reply = get(ip("127.0.0.2"), world.iamlet.imds, CREDS, None).await;
    (reply.status, reply.body)
}

async fn readyz(world: &World) -> (u16, String) {
    let reply = get(world.iamlet.admin.ip(), world.iamlet.admin, "/readyz", None).await;
    (reply.status, reply.body)
}

/// The API server goes away; meanwhile `old` is deleted and `new` (role `admin`) gets its IP.
fn reuse_the_ip_while_unreachable(world: &World) {
    world.fake.set_unreachable(true);
    world.fake.delete_pod("u-old");
    world.fake.apply_pod(pod(
        "shop",
        "new",
        "u-new",
        "node-1",
        "127.0.0.2",
        Some("admin"),
    ));
}

#[tokio::test]
async fn a_stale_view_refuses_rather_than_hand_a_reused_ip_the_old_role() {
    let world = start("refuse");
    eventually("ready", WITHIN, || world.iamlet.ready()).await;
    assert_eq!(answer_at(&world).await, (200, "web".to_owned()));

    reuse_the_ip_while_unreachable(&world);
    eventually("the stale view is refused", WITHIN, || async {
        answer_at(&world).await.0 == 503
    })
    .await;
    let (status, body) = answer_at(&world).await;
    assert!(body.contains("stale"), "{status} {body}");
    let (status, body) = readyz(&world).await;
    assert_eq!(status, 503);
    assert!(
        body.contains("no contact with the Kubernetes API"),
        "{body}"
    );
    let contact = world
        .iamlet
        .metric("iamlet_kubernetes_last_contact_timestamp_seconds{resource=\"pods\"}")
        .await;
    assert!(
        contact > 1.6e9,
        "the last contact is exported as a timestamp: {contact}"
    );
    eventually("a warning when the bound is crossed", WITHIN, || async {
        world.iamlet.log().contains("past pods.max_staleness")
    })
    .await;

    world.fake.set_unreachable(false);
    eventually("the new pod gets its own role", WITHIN, || async {
        answer_at(&world).await == (200, "admin".to_owned())
    })
    .await;
    assert_eq!(readyz(&world).await.0, 200);
    eventually("the recovery is logged", WITHIN, || async {
        world
            .iamlet
            .log()
            .contains("contact with the Kubernetes API is back")
    })
    .await;
    let warnings = world
        .iamlet
        .log()
        .matches("past pods.max_staleness")
        .count();
    assert_eq!(warnings, 1, "one warning for the whole outage");
}

#[tokio::test]
async fn when_stale_serve_keeps_answering_and_says_so() {
    let world = start("serve");
    eventually("ready", WITHIN, || world.iamlet.ready()).await;
    reuse_the_ip_while_unreachable(&world);
    eventually("the staleness is reported", WITHIN, || async {
        world.iamlet.log().contains("past pods.max_staleness")
    })
    .await;
    // The trade-off this setting makes: the frozen view still answers.
    assert_eq!(answer_at(&world).await, (200, "web".to_owned()));
    let (status, body) = readyz(&world).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("still serving the pods known before"),
        "{body}"
    );

    world.fake.set_unreachable(false);
    eventually("the new pod gets its own role", WITHIN, || async {
        answer_at(&world).await == (200, "admin".to_owned())
    })
    .await;
}

#[tokio::test]
async fn a_quiet_healthy_watch_is_never_stale() {
    let world = start("refuse");
    eventually("ready", WITHIN, || world.iamlet.ready()).await;
    // Nothing changes; the watch is renewed (every max_staleness / 4, at least 1 s) instead.
    let renewals = || {
        world
            .fake
            .requests()
            .iter()
            .filter(|r| r.starts_with("WATCH pods"))
            .count()
    };
    eventually("the pod watch was renewed four times", WITHIN, || async {
        renewals() >= 5
    })
    .await;
    let (status, body) = readyz(&world).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("last contact with the Kubernetes API"),
        "{body}"
    );
    assert_eq!(answer_at(&world).await, (200, "web".to_owned()));
    assert!(!world.iamlet.log().contains("past pods.max_staleness"));
}
