//! The prefetching cache against moto's STS (behind the counting, fault-injecting front):
//! STS calls are counted against their lower bound, pods' first requests are hits, STS trouble
//! is ridden out on the last good credentials, and a rollout stays under the STS rate limit.

mod support;

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use support::fake_kube::{FakeKube, namespace, pod as kube_pod};
use support::http::{get, ip};
use support::iamlet::{Iamlet, Setup, StaticPod, pod};
use support::sts_front::{self, Fault, StsFront};
use support::{eventually, moto};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

fn replica(ip: &str, namespace: &str, name: &str, role: &str, service_account: &str) -> StaticPod {
    StaticPod {
        service_account: Some(service_account.into()),
        ..pod(ip, namespace, name, Some(role))
    }
}

fn start(pods: Vec<StaticPod>, extra: &str) -> (tempfile::TempDir, Iamlet, StsFront) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sts = sts_front::start(([127, 0, 0, 1], 0).into(), moto::shared().addr);
    let setup = Setup {
        sts: sts.url(),
        pods,
        extra: extra.to_owned(),
        log_level: "info".into(),
        ..Setup::default()
    };
    let iamlet = Iamlet::start(dir.path(), &setup);
    (dir, iamlet, sts)
}

async fn access_key(iamlet: &Iamlet, pod_ip: IpAddr, role: &str) -> String {
    let reply = get(pod_ip, iamlet.imds, &format!("{CREDS}{role}"), None).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.json()["AccessKeyId"]
        .as_str()
        .expect("key id")
        .to_owned()
}

#[tokio::test]
async fn replicas_share_one_prefetched_session_per_workload() {
    let mut pods: Vec<StaticPod> = (2..7)
        .map(|i| {
            replica(
                &format!("127.0.0.{i}"),
                "shop",
                &format!("web-{i}"),
                "web",
                "web",
            )
        })
        .collect();
    pods.extend((7..10).map(|i| {
        replica(
            &format!("127.0.0.{i}"),
            "batch",
            &format!("job-{i}"),
            "batch",
            "job",
        )
    }));
    let (_dir, iamlet, sts) = start(pods, "");
    // Both sessions are fetched before any pod asks: the lower bound, one call per workload.
    eventually("prefetched", Duration::from_secs(10), || async {
        sts.assume_role_calls("web") == 1 && sts.assume_role_calls("batch") == 1
    })
    .await;
    let mut web = HashSet::new();
    for i in 2..7 {
        web.insert(access_key(&iamlet, ip(&format!("127.0.0.{i}")), "web").await);
    }
    let mut batch = HashSet::new();
    for i in 7..10 {
        batch.insert(access_key(&iamlet, ip(&format!("127.0.0.{i}")), "batch").await);
    }
    assert_eq!((web.len(), batch.len()), (1, 1), "one session per workload");
    assert_eq!(
        (sts.assume_role_calls("web"), sts.assume_role_calls("batch")),
        (1, 1)
    );
    assert_eq!(
        iamlet.metric("iamlet_credential_cache_misses_total").await,
        0.0
    );
    assert_eq!(
        iamlet.metric("iamlet_credential_cache_hits_total").await,
        8.0
    );
}

#[tokio::test]
async fn a_new_pods_credentials_are_cached_before_its_first_request() {
    let fake = FakeKube::start();
    fake.apply_namespace(namespace("shop", Some("arn:aws:iam::123456789012:role/.*")));
    let dir = tempfile::tempdir().expect("tempdir");
    let sts = sts_front::start(([127, 0, 0, 1], 0).into(), moto::shared().addr);
    let setup = fake.setup(dir.path(), sts.url());
    let iamlet = Iamlet::start(dir.path(), &setup);
    fake.apply_pod(kube_pod(
        "shop",
        "api-0",
        "u-api",
        "node-1",
        "127.0.0.30",
        Some("api"),
    ));
    eventually(
        "prefetched on the pod's arrival",
        Duration::from_secs(10),
        || async { sts.assume_role_calls("api") == 1 },
    )
    .await;
    access_key(&iamlet, ip("127.0.0.30"), "api").await;
    assert_eq!(sts.assume_role_calls("api"), 1);
    assert_eq!(
        iamlet.metric("iamlet_credential_cache_misses_total").await,
        0.0
    );
}

#[tokio::test]
async fn two_hundred_concurrent_first_requests_make_one_sts_call() {
    // The role's STS answer takes 1.5 s, so every request arrives while the first call is out.
    let pods: Vec<StaticPod> = (0..200)
        .map(|i| {
            replica(
                &format!("127.0.1.{}", i + 1),
                "shop",
                &format!("web-{i}"),
                "slow-web",
                "web",
            )
        })
        .collect();
    let (_dir, iamlet, sts) = start(pods, "");
    let imds = iamlet.imds;
    let requests: Vec<_> = (0..200)
        .map(|i| {
            tokio::spawn(async move {
                let reply = get(
                    ip(&format!("127.0.1.{}", i + 1)),
                    imds,
                    &format!("{CREDS}slow-web"),
                    None,
                )
                .await;
                assert_eq!(reply.status, 200, "{reply:?}");
                reply.json()["AccessKeyId"]
                    .as_str()
                    .expect("key id")
                    .to_owned()
            })
        })
        .collect();
    let mut keys = HashSet::new();
    for request in requests {
        keys.insert(request.await.expect("request"));
    }
    assert_eq!(keys.len(), 1);
    assert_eq!(sts.assume_role_calls("slow-web"), 1);
}

#[tokio::test]
async fn sts_trouble_is_ridden_out_on_the_last_good_credentials() {
    // 15-minute sessions refreshed with 14m55s left: the refresh comes due within seconds.
    let extra = "[credentials]\nsession_duration = \"15m\"\nrefresh_before = \"14m55s\"\n";
    let (_dir, iamlet, sts) = start(
        vec![replica("127.0.0.2", "shop", "web-0", "web", "web")],
        extra,
    );
    let pod_ip = ip("127.0.0.2");
    let good = access_key(&iamlet, pod_ip, "web").await;
    for (fault, kind) in [
        (Fault::ServerError, "server_error"),
        (Fault::Throttling, "throttled"),
    ] {
        sts.set_fault(Some(fault));
        // A failed refresh, counted by its kind (the SDK's retries of it done: a hit does not
        // wait for them, so this is what tells they are over).
        let series = format!("iamlet_sts_assume_role_errors_total{{kind=\"{kind}\"}}");
        eventually("a failed refresh", Duration::from_secs(20), || async {
            iamlet.metric(&series).await > 0.0
        })
        .await;
        // Past the refresh point, with STS failing: the same, still valid, credentials.
        let reply = get(pod_ip, iamlet.imds, &format!("{CREDS}web"), None).await;
        assert_eq!(reply.status, 200, "{fault:?}: {reply:?}");
        assert_eq!(reply.json()["AccessKeyId"], good.as_str(), "{fault:?}");
    }
    assert!(
        iamlet
            .metric("iamlet_sts_assume_role_errors_total{kind=\"server_error\"}")
            .await
            > 0.0
    );
    assert!(
        iamlet
            .metric("iamlet_sts_assume_role_errors_total{kind=\"throttled\"}")
            .await
            > 0.0
    );
    assert!(iamlet.metric("iamlet_credential_stale_served_total").await > 0.0);
    // STS is back: the background retry brings new credentials without a pod waiting.
    sts.set_fault(None);
    eventually(
        "fresh credentials after the outage",
        Duration::from_secs(60),
        || async { access_key(&iamlet, pod_ip, "web").await != good },
    )
    .await;
}

#[tokio::test]
async fn access_denied_is_not_asked_again() {
    let (_dir, iamlet, sts) = start(
        vec![replica("127.0.0.2", "shop", "x", "denied-role", "x")],
        "",
    );
    eventually(
        "the prefetch was refused",
        Duration::from_secs(10),
        || async { sts.assume_role_calls("denied-role") == 1 },
    )
    .await;
    for _ in 0..5 {
        let reply = get(
            ip("127.0.0.2"),
            iamlet.imds,
            &format!("{CREDS}denied-role"),
            None,
        )
        .await;
        assert_eq!(reply.json()["Code"], "AssumeRoleUnauthorizedAccess");
    }
    assert_eq!(sts.assume_role_calls("denied-role"), 1);
    // An SDK retrying a refused role does not flood the log: one warning per answer from STS.
    eventually("the refusal is logged", Duration::from_secs(10), || async {
        iamlet.log().contains("STS refused AssumeRole")
    })
    .await;
    assert_eq!(iamlet.log().matches("STS refused AssumeRole").count(), 1);
}

#[tokio::test]
async fn session_tags_reach_sts_without_splitting_the_session() {
    let pods = vec![
        replica("127.0.0.2", "shop", "web-0", "tagged", "web"),
        replica("127.0.0.3", "shop", "web-1", "tagged", "web"),
    ];
    let (_dir, iamlet, sts) = start(pods, "[credentials]\nsession_tags = true\n");
    let a = access_key(&iamlet, ip("127.0.0.2"), "tagged").await;
    let b = access_key(&iamlet, ip("127.0.0.3"), "tagged").await;
    assert_eq!(a, b, "the pod name must not split the session");
    let form = sts
        .forms()
        .into_iter()
        .find(|form| {
            form.get("RoleArn")
                .is_some_and(|arn| arn.ends_with("/tagged"))
        })
        .expect("an AssumeRole for the role");
    let tags: HashSet<(String, String)> = (1..=3)
        .filter_map(|n| {
            Some((
                form.get(&format!("Tags.member.{n}.Key"))?.clone(),
                form.get(&format!("Tags.member.{n}.Value"))?.clone(),
            ))
        })
        .collect();
    let want: HashSet<(String, String)> = [
        ("kubernetes-namespace".to_owned(), "shop".to_owned()),
        ("kubernetes-service-account".to_owned(), "web".to_owned()),
    ]
    .into();
    assert_eq!(tags, want);
}

/// A rollout of 1000 new identities at once under a tight STS rate: every identity is fetched,
/// each exactly once, and none twice while the others wait for tokens. The rate itself is
/// proven on paused time in `credentials::limiter`'s tests (no wall-clock bound here).
#[tokio::test]
async fn a_thousand_pod_rollout_fetches_each_identity_once_under_the_rate_limit() {
    let (qps, burst) = (100.0, 10usize);
    let pods: Vec<StaticPod> = (0..1000)
        .map(|i| {
            let ip = format!("127.0.{}.{}", 10 + i / 250, 1 + i % 250);
            replica(
                &ip,
                "shop",
                &format!("p-{i}"),
                "rollout",
                &format!("sa-{i}"),
            )
        })
        .collect();
    let extra = format!("[credentials]\nsts_qps = {qps}\nsts_burst = {burst}\n");
    let (_dir, iamlet, sts) = start(pods, &extra);
    eventually(
        "every identity prefetched",
        Duration::from_secs(120),
        || async { sts.assume_role_calls("rollout") >= 1000 },
    )
    .await;
    assert_eq!(
        sts.assume_role_calls("rollout"),
        1000,
        "one call per identity"
    );
    let sessions: HashSet<String> = sts
        .forms()
        .into_iter()
        .filter(|form| {
            form.get("RoleArn")
                .is_some_and(|arn| arn.ends_with("/rollout"))
        })
        .filter_map(|form| form.get("RoleSessionName").cloned())
        .collect();
    assert_eq!(sessions.len(), 1000, "each identity asked for exactly once");
    // STS counts a call when it arrives; iamlet counts the refresh when the answer is stored.
    eventually("every prefetch stored", Duration::from_secs(30), || async {
        iamlet
            .metric("iamlet_credential_refreshes_total{outcome=\"ok\"}")
            .await
            >= 1000.0
    })
    .await;
    assert_eq!(
        iamlet
            .metric("iamlet_credential_refreshes_total{outcome=\"ok\"}")
            .await,
        1000.0,
        "a refresh beyond one per identity"
    );
}
