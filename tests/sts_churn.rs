//! STS calls under churn (issue 11, target 5), on paused time: two simulated hours in which
//! 1000 pods of 20 identities come and go on a node, driven through the real standalone stack
//! (`broker::Local` following a `PodIndex`, the credential cache and its rate limiter) with a
//! fake STS that answers after 50 ms. Each pod asks for its credentials a second after it
//! arrives and every five minutes after, as SDKs do.
//!
//! The count of AssumeRole calls is compared with its lower bound, worked out from the script
//! alone: an identity is needed while at least one of its pods lives; one call makes its
//! credentials servable for `session_duration - refresh_before` (30 minutes); the fewest
//! calls that keep every needed moment covered are found greedily (a new call at the first
//! needed moment not covered yet). No pod may wait on STS, and no second may hold more calls
//! than the rate limiter lets through.
//!
//! Run with the counts shown: `cargo test --test sts_churn -- --nocapture`.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iamlet::broker::{Broker, Local};
use iamlet::clock::{Clock, TokioClock};
use iamlet::credentials::{
    AssumeRoleRequest, Cache, CredentialSource, Credentials, Error, RateLimiter,
};
use iamlet::metrics::Metrics;
use iamlet::pod::{Annotations, Pod};
use iamlet::pods::KubernetesPods;
use iamlet::pods::freshness::{Freshness, Staleness, WhenStale};
use iamlet::pods::index::{Change, PodIndex, PodRecord};
use iamlet::policy::{BaseRoleArn, NamespacePolicy, Policy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const PODS: usize = 1000;
const IDENTITIES: usize = 20;
const HOURS: u64 = 2;
const SESSION: Duration = Duration::from_secs(3600);
const REFRESH_BEFORE: Duration = Duration::from_secs(30 * 60);
const STS_LATENCY: Duration = Duration::from_millis(50);
const STS_QPS: f64 = 20.0;
const STS_BURST: u32 = 20;
const FIRST_REQUEST: Duration = Duration::from_secs(1);
const REQUEST_EVERY: Duration = Duration::from_secs(5 * 60);
const SEED: u64 = 11;

/// STS that grants every role after `STS_LATENCY`, and remembers when each call came.
#[derive(Clone)]
struct CountingSts {
    clock: TokioClock,
    calls: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl CredentialSource for CountingSts {
    async fn assume_role(&self, request: &AssumeRoleRequest) -> Result<Credentials, Error> {
        let n = {
            let mut calls = self.calls.lock().expect("calls");
            calls.push((Instant::now(), request.session_name.as_str().to_owned()));
            calls.len()
        };
        tokio::time::sleep(STS_LATENCY).await;
        let now = self.clock.now();
        Ok(Credentials {
            access_key_id: format!("ASIACHURN{n}"),
            secret_access_key: "secret".into(),
            session_token: "token".into(),
            expiration: now + SESSION,
            last_updated: now,
        })
    }
}

/// One pod of the script: when it comes and goes (from the start), and its identity.
#[derive(Debug, Clone)]
struct Life {
    uid: String,
    identity: usize,
    ip: IpAddr,
    added: Duration,
    deleted: Duration,
}

/// 1000 pods, each of one of 20 identities, living from 2 to 30 minutes, added at random
/// and deleted within the two hours; so every call the run makes is for a need inside it.
/// Identities are as unevenly used as workloads are (identity `i` with weight `1/(i+1)`): the
/// busiest always has pods, the quietest has gaps with none, where its last pod goes and a new
/// one comes.
fn script() -> Vec<Life> {
    let mut rng = StdRng::seed_from_u64(SEED);
    let weights: Vec<f64> = (0..IDENTITIES).map(|i| 1.0 / (i + 1) as f64).collect();
    let total: f64 = weights.iter().sum();
    let identity = move |rng: &mut StdRng| {
        let mut pick = rng.random_range(0.0..total);
        weights
            .iter()
            .position(|w| {
                pick -= w;
                pick < 0.0
            })
            .unwrap_or(IDENTITIES - 1)
    };
    (0..PODS)
        .map(|k| {
            let lives = rng.random_range(120..=1800);
            let added = Duration::from_secs(rng.random_range(0..HOURS * 3600 - lives));
            Life {
                uid: format!("uid-{k}"),
                identity: identity(&mut rng),
                ip: IpAddr::from([10, 0, (k / 250) as u8, (k % 250) as u8 + 1]),
                added,
                deleted: added + Duration::from_secs(lives),
            }
        })
        .collect()
}

fn record(life: &Life) -> PodRecord {
    PodRecord {
        pod: Arc::new(Pod {
            namespace: "shop".into(),
            name: format!("p-{}", life.uid),
            uid: life.uid.clone(),
            service_account: format!("sa-{}", life.identity),
            annotations: Annotations {
                role: Some(format!("role-{}", life.identity)),
                ..Annotations::default()
            },
        }),
        ip: Some(life.ip),
        host_network: false,
        finished: false,
    }
}

/// The fewest calls that keep each identity's needed time covered, a call covering
/// `SESSION - REFRESH_BEFORE` from when it is made.
fn lower_bound(lives: &[Life]) -> usize {
    let window = SESSION - REFRESH_BEFORE;
    let mut total = 0;
    for identity in 0..IDENTITIES {
        let mut spans: Vec<(Duration, Duration)> = lives
            .iter()
            .filter(|life| life.identity == identity && life.deleted > life.added)
            .map(|life| (life.added, life.deleted))
            .collect();
        spans.sort();
        let mut covered_until: Option<Duration> = None;
        for (from, to) in spans {
            let mut at = covered_until.map_or(from, |until| until.max(from));
            while at < to {
                total += 1;
                covered_until = Some(at + window);
                at += window;
            }
        }
    }
    total
}

/// The most calls in any one-second window.
fn busiest_second(times: &[Instant]) -> usize {
    times
        .iter()
        .map(|start| {
            times
                .iter()
                .filter(|t| **t >= *start && **t < *start + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0)
}

fn metric(metrics: &Metrics, series: &str) -> f64 {
    iamlet::metrics::value_in(&metrics.encode(), series)
}

#[tokio::test(start_paused = true)]
async fn churn_costs_no_more_sts_calls_than_the_lower_bound() {
    let clock = TokioClock::default();
    let metrics = Metrics::default();
    let sts = CountingSts {
        clock,
        calls: Arc::default(),
    };
    let cache = Cache::new(
        sts.clone(),
        clock,
        REFRESH_BEFORE,
        RateLimiter::new(STS_QPS, STS_BURST),
        metrics.clone(),
    );
    let index = Arc::new(PodIndex::default());
    let pods = KubernetesPods {
        index: index.clone(),
        wait_for_pod: Duration::from_millis(900),
        staleness: Arc::new(Staleness {
            freshness: Arc::new(Freshness::new(Arc::new(clock), metrics.clone())),
            max: Duration::from_secs(300),
            when: WhenStale::Serve,
        }),
    };
    let policy = Policy {
        base_role_arn: BaseRoleArn::parse("arn:aws:iam::123456789012:role/").expect("base"),
        default_role: None,
        allow_unannotated_namespaces: false,
        session_name_template: "{namespace}.{service_account}".into(),
        session_tags: false,
    };
    let broker = Arc::new(Local::new(pods, policy, cache, metrics.clone(), None));
    index.apply_namespace(Change::Init);
    index.apply_namespace(Change::InitApply((
        "shop".into(),
        NamespacePolicy::from_annotation(Some("arn:aws:iam::123456789012:role/.*")),
    )));
    index.apply_namespace(Change::InitDone);
    index.apply_pod(Change::Init);
    index.apply_pod(Change::InitDone);
    let cancel = CancellationToken::new();
    let follower = broker.clone();
    let following = tokio::spawn({
        let cancel = cancel.clone();
        async move { follower.follow_pods(cancel).await }
    });

    let lives = script();
    let start = Instant::now();
    // The pods' own requests: a second after arriving, then every five minutes while alive.
    let requests: Vec<_> = lives
        .iter()
        .map(|life| {
            let (broker, life) = (broker.clone(), life.clone());
            tokio::spawn(async move {
                let mut at = start + life.added + FIRST_REQUEST;
                let mut served = 0;
                while at < start + life.deleted {
                    tokio::time::sleep_until(at).await;
                    let name = format!("role-{}", life.identity);
                    broker
                        .credentials(life.ip, &name)
                        .await
                        .unwrap_or_else(|err| panic!("{} at {:?}: {err}", life.uid, at - start));
                    served += 1;
                    at += REQUEST_EVERY;
                }
                served
            })
        })
        .collect();
    // The watch: every add and delete, in time order.
    let mut events: BTreeMap<(Duration, usize), Change<PodRecord>> = BTreeMap::new();
    for (k, life) in lives.iter().enumerate() {
        events.insert((life.added, 2 * k), Change::Apply(record(life)));
        events.insert((life.deleted, 2 * k + 1), Change::Delete(record(life)));
    }
    for ((at, _), change) in events {
        tokio::time::sleep_until(start + at).await;
        index.apply_pod(change);
    }
    let mut served = 0;
    for request in requests {
        served += request.await.expect("pod");
    }
    // An hour more with no pods: the cached credentials run out, and nothing is refreshed.
    tokio::time::sleep_until(start + Duration::from_secs((HOURS + 1) * 3600)).await;
    cancel.cancel();
    following.await.expect("prefetcher");

    let calls = sts.calls.lock().expect("calls").clone();
    let times: Vec<Instant> = calls.iter().map(|(at, _)| *at).collect();
    let identities: HashSet<&str> = calls.iter().map(|(_, s)| s.as_str()).collect();
    let bound = lower_bound(&lives);
    let misses = metric(&metrics, "iamlet_credential_cache_misses_total");
    println!(
        "{PODS} pods, {IDENTITIES} identities, {HOURS} h: {} AssumeRole calls, lower bound {bound}; \
         {served} requests, {misses} waited on STS; busiest second {} calls (sts_qps {STS_QPS}, sts_burst {STS_BURST})",
        calls.len(),
        busiest_second(&times),
    );
    if calls.len() != bound {
        for identity in 0..IDENTITIES {
            let session = format!("shop.sa-{identity}");
            let at: Vec<u64> = calls
                .iter()
                .filter(|(_, s)| *s == session)
                .map(|(t, _)| (*t - start).as_secs())
                .collect();
            let lives: Vec<Life> = lives
                .iter()
                .filter(|l| l.identity == identity)
                .cloned()
                .collect();
            println!(
                "identity {identity}: {} calls at {at:?} s, bound {}",
                at.len(),
                lower_bound(&lives)
            );
        }
    }
    assert_eq!(identities.len(), IDENTITIES);
    assert_eq!(misses, 0.0, "a pod waited on STS");
    assert!(busiest_second(&times) <= STS_BURST as usize + STS_QPS as usize);
    assert_eq!(
        calls.len(),
        bound,
        "AssumeRole calls against their lower bound"
    );
}
