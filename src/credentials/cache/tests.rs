//! The cache's guarantees with paused tokio time: the wall clock ([`TokioClock`]) moves only
//! when the test lets time pass, and the background tasks run on that same time.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::clock::TokioClock;
use crate::credentials::Trouble;
use crate::policy::{RoleArn, SessionName};

const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Grant,
    Outage,
    Refuse,
    /// A bug: the next call panics, then STS grants again.
    PanicOnce,
}

#[derive(Clone)]
struct FakeSts {
    clock: TokioClock,
    mode: Arc<Mutex<Mode>>,
    calls: Arc<AtomicUsize>,
    times: Arc<Mutex<Vec<tokio::time::Instant>>>,
}

impl FakeSts {
    fn new(clock: TokioClock) -> FakeSts {
        FakeSts {
            clock,
            mode: Arc::new(Mutex::new(Mode::Grant)),
            calls: Arc::default(),
            times: Arc::default(),
        }
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().expect("mode") = mode;
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl CredentialSource for FakeSts {
    async fn assume_role(&self, request: &AssumeRoleRequest) -> Result<Credentials, Error> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        self.times
            .lock()
            .expect("times")
            .push(tokio::time::Instant::now());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mode = *self.mode.lock().expect("mode");
        if mode == Mode::PanicOnce {
            self.set(Mode::Grant);
            panic!("a bug in the credential source");
        }
        let now = self.clock.now();
        match mode {
            Mode::PanicOnce => unreachable!("handled above"),
            Mode::Grant => Ok(Credentials {
                access_key_id: format!("AKID{n}"),
                secret_access_key: "secret".into(),
                session_token: "token".into(),
                expiration: now + HOUR,
                last_updated: now,
            }),
            Mode::Outage => Err(Error::Unavailable {
                role: request.role_arn.to_string(),
                kind: Trouble::ServerError,
                message: "503".into(),
            }),
            Mode::Refuse => Err(Error::Refused {
                role: request.role_arn.to_string(),
                message: "AccessDenied".into(),
            }),
        }
    }
}

fn key(role: &str) -> AssumeRoleRequest {
    AssumeRoleRequest {
        role_arn: RoleArn::parse(&format!("arn:aws:iam::123456789012:role/{role}")).expect("arn"),
        session_name: SessionName::sanitize("shop.web"),
        external_id: None,
        tags: Vec::new(),
    }
}

fn cache() -> (Cache<FakeSts, TokioClock>, FakeSts, TokioClock, Metrics) {
    let clock = TokioClock::default();
    let sts = FakeSts::new(clock);
    let metrics = Metrics::default();
    let cache = Cache::new(
        sts.clone(),
        clock,
        30 * MINUTE,
        RateLimiter::new(1000.0, 1000),
        metrics.clone(),
    );
    (cache, sts, clock, metrics)
}

fn wanted(keys: &[AssumeRoleRequest]) -> HashSet<AssumeRoleRequest> {
    keys.iter().cloned().collect()
}

fn metric(metrics: &Metrics, series: &str) -> f64 {
    crate::metrics::value_in(&metrics.encode(), series)
}

#[tokio::test(start_paused = true)]
async fn a_wanted_key_is_fetched_before_anyone_asks() {
    let (cache, sts, _, metrics) = cache();
    cache.sync(&wanted(&[key("web")]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sts.calls(), 1, "prefetched");
    cache.get(&key("web")).await.expect("credentials");
    assert_eq!(sts.calls(), 1, "the first request was a hit");
    assert_eq!(
        metric(&metrics, "iamlet_credential_cache_misses_total"),
        0.0
    );
}

#[tokio::test(start_paused = true)]
async fn concurrent_misses_make_one_call() {
    let (cache, sts, _, _) = cache();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get(&key("web")).await })
        })
        .collect();
    let mut ids = HashSet::new();
    for task in tasks {
        let credentials = task.await.expect("task").expect("credentials");
        ids.insert(credentials.access_key_id.clone());
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(sts.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn served_credentials_always_keep_the_refresh_margin() {
    let (cache, sts, clock, metrics) = cache();
    cache.sync(&wanted(&[key("web")]));
    for _ in 0..(6 * 60) {
        tokio::time::sleep(MINUTE).await;
        let served = cache.get(&key("web")).await.expect("credentials");
        assert!(
            served.remaining(clock.now()) > 30 * MINUTE,
            "served with {:?} left",
            served.remaining(clock.now())
        );
    }
    // Six hours of one-hour sessions refreshed 10 s short of 30 minutes in: 13 calls, all
    // ahead.
    assert_eq!(sts.calls(), 13);
    assert_eq!(
        metric(&metrics, "iamlet_credential_cache_misses_total"),
        0.0,
        "a request waited for STS"
    );
}

#[tokio::test(start_paused = true)]
async fn refreshes_start_just_ahead_of_the_refresh_point() {
    let (cache, sts, _, _) = cache();
    let keys: Vec<_> = (0..20).map(|i| key(&format!("role-{i}"))).collect();
    let started = tokio::time::Instant::now();
    cache.sync(&wanted(&keys));
    tokio::time::sleep(31 * MINUTE).await;
    let times = sts.times.lock().expect("times").clone();
    let refreshes: Vec<Duration> = times
        .iter()
        .skip(20)
        .map(|t| t.duration_since(started))
        .collect();
    assert_eq!(refreshes.len(), 20, "every key refreshed once");
    // Fetched at once (50 ms), servable for 30 minutes: refreshed REFRESH_LEAD before that,
    // not minutes before (each minute of lead is lost from every session).
    let point = 30 * MINUTE + Duration::from_millis(50);
    for refreshed in refreshes {
        assert!(
            refreshed >= point - REFRESH_LEAD - Duration::from_secs(1) && refreshed < point,
            "refreshed at {refreshed:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_sts_outage_serves_the_last_good_credentials_until_they_expire() {
    let (cache, sts, clock, metrics) = cache();
    cache.sync(&wanted(&[key("web")]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let good = cache.get(&key("web")).await.expect("credentials");
    sts.set(Mode::Outage);
    let calls_before = sts.calls();
    // Through the refresh window and up to expiry, the same credentials.
    while good.remaining(clock.now()) > MINUTE {
        tokio::time::sleep(MINUTE).await;
        let served = cache.get(&key("web")).await.expect("still served");
        assert_eq!(served.access_key_id, good.access_key_id);
    }
    let retries = sts.calls() - calls_before;
    assert!(retries > 3, "STS was not retried ({retries})");
    assert!(retries < 90, "STS was hammered ({retries} calls)");
    assert!(metric(&metrics, "iamlet_credential_stale_served_total") > 0.0);
    // Once they truly expire, nothing rather than expired keys.
    tokio::time::sleep(2 * MINUTE).await;
    assert!(matches!(
        cache.get(&key("web")).await,
        Err(Error::Unavailable { .. })
    ));
    // STS is back: the background retry brings fresh credentials within the backoff.
    sts.set(Mode::Grant);
    tokio::time::sleep(BACKOFF_MAX + MINUTE).await;
    let fresh = cache.get(&key("web")).await.expect("fresh");
    assert!(fresh.remaining(clock.now()) > 30 * MINUTE);
}

#[tokio::test(start_paused = true)]
async fn a_refusal_is_not_retried_until_pods_or_policy_change() {
    let (cache, sts, _, _) = cache();
    sts.set(Mode::Refuse);
    assert!(matches!(
        cache.get(&key("web")).await,
        Err(Error::Refused { .. })
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = sts.calls();
    for _ in 0..5 {
        assert!(matches!(
            cache.get(&key("web")).await,
            Err(Error::Refused { .. })
        ));
        tokio::time::sleep(10 * MINUTE).await;
    }
    assert_eq!(sts.calls(), calls, "a refusal was retried without a change");
    sts.set(Mode::Grant);
    cache.sync(&wanted(&[key("web")]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sts.calls(), calls + 1);
    cache
        .get(&key("web"))
        .await
        .expect("granted after the change");
}

#[tokio::test(start_paused = true)]
async fn a_refusal_is_asked_again_no_more_often_than_the_backoff_however_pods_change() {
    let (cache, sts, _, _) = cache();
    sts.set(Mode::Refuse);
    cache.sync(&wanted(&[key("denied")]));
    // Pods change ten times a second for ten minutes (a busy cluster, as iamlet server sees
    // it), and the refused pod keeps asking.
    for i in 0..6000 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        cache.sync(&wanted(&[key("denied")]));
        if i % 10 == 0 {
            assert!(matches!(
                cache.get(&key("denied")).await,
                Err(Error::Refused { .. })
            ));
        }
    }
    // 1 s, 2 s, 4 s… up to every 2 minutes: about a dozen calls, not one per change.
    assert!((8..=15).contains(&sts.calls()), "{} calls", sts.calls());
}

#[tokio::test(start_paused = true)]
async fn keys_no_pod_wants_stop_refreshing_and_go_once_spent() {
    let (cache, sts, _, metrics) = cache();
    cache.sync(&wanted(&[key("web"), key("batch")]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The last "batch" pod goes, and another comes ten minutes later (churn): it is served the
    // credentials kept meanwhile, without a call.
    cache.sync(&wanted(&[key("web")]));
    let calls = sts.calls();
    tokio::time::sleep(10 * MINUTE).await;
    cache.sync(&wanted(&[key("web"), key("batch")]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sts.calls(), calls, "fetched again although still servable");
    cache.get(&key("batch")).await.expect("credentials");
    assert_eq!(
        metric(&metrics, "iamlet_credential_cache_misses_total"),
        0.0
    );
    // It goes again, for good.
    cache.sync(&wanted(&[key("web")]));
    assert_eq!(metric(&metrics, "iamlet_credential_cache_entries"), 2.0);
    let calls = sts.calls();
    tokio::time::sleep(3 * HOUR).await;
    // Only "web" kept refreshing: six refreshes in three hours, none for "batch".
    assert_eq!(sts.calls() - calls, 6);
    // Spent, "batch" is evicted at the next sync.
    cache.sync(&wanted(&[key("web")]));
    assert_eq!(metric(&metrics, "iamlet_credential_cache_entries"), 1.0);
    assert!(cache.expiry(&key("batch")).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_refresh_task_that_panics_is_replaced_not_lost() {
    let (cache, sts, _, _) = cache();
    sts.set(Mode::PanicOnce);
    cache.sync(&wanted(&[key("web")]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sts.calls(), 1, "the prefetch ran, and panicked");
    // The entry went with its task: nothing half-dead is kept.
    assert_eq!(cache.unfetched(), 0);
    assert!(cache.expiry(&key("web")).is_none());
    // The next prefetch starts a fresh task, which refreshes as ever.
    cache.sync(&wanted(&[key("web")]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sts.calls(), 2);
    assert!(cache.expiry(&key("web")).is_some());
    cache.get(&key("web")).await.expect("credentials");
    assert_eq!(sts.calls(), 2, "served from the new entry");
}

#[tokio::test(start_paused = true)]
async fn a_held_entry_is_served_what_the_key_is() {
    let (cache, sts, _, _) = cache();
    let held = cache.hold(&key("web"));
    let first = cache.get_held(&held).await.expect("credentials");
    assert_eq!(cache.get(&key("web")).await.expect("by key"), first);
    // Past the refresh point the holder is served the refreshed credentials, as a lookup is.
    tokio::time::sleep(31 * MINUTE).await;
    assert_eq!(sts.calls(), 2, "refreshed ahead of expiry");
    let refreshed = cache.get_held(&held).await.expect("credentials");
    assert_ne!(refreshed.access_key_id, first.access_key_id);
    assert_eq!(cache.get(&key("web")).await.expect("by key"), refreshed);
    assert_eq!(sts.calls(), 2, "both were hits");
}

#[tokio::test(start_paused = true)]
async fn a_held_entry_that_left_the_cache_serves_nothing_the_cache_would_not() {
    let (cache, sts, clock, _) = cache();
    let held = cache.hold(&key("web"));
    let first = cache.get_held(&held).await.expect("credentials");
    // Its refresh task panics at the refresh point (a bug), which drops the entry while its
    // credentials are still good for a moment; then STS refuses the role (its trust policy
    // changed). The holder must get the refusal, as a lookup by key does, not the old
    // credentials.
    sts.set(Mode::PanicOnce);
    let due = first.expiration - 30 * MINUTE;
    tokio::time::sleep(
        due.duration_since(clock.now()).expect("ahead") - Duration::from_millis(900),
    )
    .await;
    assert_eq!(sts.calls(), 2, "the refresh ran, and panicked");
    assert!(cache.expiry(&key("web")).is_none(), "the entry was dropped");
    sts.set(Mode::Refuse);
    assert!(matches!(
        cache.get_held(&held).await,
        Err(Error::Refused { .. })
    ));
    assert!(matches!(
        cache.get(&key("web")).await,
        Err(Error::Refused { .. })
    ));
}
