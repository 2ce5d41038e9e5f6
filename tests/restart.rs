//! iamlet killed outright (SIGKILL: no drain, no clean-up) and started again on the same node:
//! the IMDSv2 tokens pods hold stay valid, and `/readyz` says ready only once prefetch has
//! filled the cache again, so the first requests after a restart are hits.

mod support;

use std::time::Duration;

use support::http::{get, ip, token};
use support::iamlet::{Iamlet, Setup, pod};
use support::{eventually, moto, sts_front};

const WITHIN: Duration = Duration::from_secs(20);
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
const ROLES: [&str; 3] = ["web", "worker", "batch"];

#[tokio::test]
async fn after_sigkill_tokens_hold_and_ready_means_the_cache_is_warm() {
    let front = sts_front::start(([127, 0, 0, 1], 0).into(), moto::shared().addr);
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup {
        sts: front.url(),
        pods: vec![
            pod("127.0.0.2", "shop", "web-0", Some(ROLES[0])),
            pod("127.0.0.3", "shop", "worker-0", Some(ROLES[1])),
            pod("127.0.0.4", "jobs", "batch-0", Some(ROLES[2])),
        ],
        ..Setup::default()
    };
    let calls = |n: usize| ROLES.iter().all(|role| front.assume_role_calls(role) == n);

    let mut first = Iamlet::start(dir.path(), &setup);
    eventually("ready", WITHIN, || first.ready()).await;
    assert!(calls(1), "ready before every identity was prefetched");
    let held = token(ip("127.0.0.2"), first.imds).await;
    let reply = get(
        ip("127.0.0.2"),
        first.imds,
        &format!("{CREDS}web"),
        Some(&held),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);

    first.kill();
    let second = Iamlet::start(dir.path(), &setup);
    eventually("ready again", WITHIN, || second.ready()).await;
    // Ready means warm: every identity fetched again before the first request.
    assert!(calls(2), "ready before the cache was refilled");
    let misses_before = second.metric("iamlet_credential_cache_misses_total").await;
    let reply = get(
        ip("127.0.0.2"),
        second.imds,
        &format!("{CREDS}web"),
        Some(&held),
    )
    .await;
    assert_eq!(
        reply.status, 200,
        "the token from before the kill: {}",
        reply.body
    );
    assert_eq!(
        second.metric("iamlet_credential_cache_misses_total").await,
        misses_before,
        "the first request after the restart was a miss"
    );
}
