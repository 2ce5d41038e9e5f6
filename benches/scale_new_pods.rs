//! New pods (issue 11, target 3): how soon a new pod's credentials are cached, and whether its
//! first request finds them there.
//!
//! `iamlet agent` watches node-1 on the fake API server; a fake STS answers every AssumeRole
//! after `STS_DELAY`. 500 pods arrive, one every `EVERY`, each with an identity of its own (a
//! service account of its own), so that each needs an STS call. Two ways of arriving:
//!
//! - **as pods do**: the pod is scheduled to the node (ADDED, Pending, no IP), and its IP comes
//!   `PENDING` later (MODIFIED, Running), when the kubelet has its sandbox up;
//! - **IP at once**: ADDED already Running with its IP (the worst case, and the pipeline alone).
//!
//! Each pod's first request is made `FIRST_REQUEST_AFTER` after its IP is known, from its IP.
//! A third run sends 100 pods one at a time (every 300 ms, as pods appear on a node outside a
//! rollout), which iamlet's prefetcher syncs at once rather than batched (at most one sync per
//! 100 ms).
//!
//! What is measured, from outside iamlet:
//! - *event → cached*: from the pod's first watch event leaving the fake API server to the fake
//!   STS sending the answer for the pod's identity (iamlet stores it as it reads it); also the
//!   part before the STS call (event → STS call arrives: iamlet's own reaction);
//! - *hit*: the first request is answered 200 with credentials whose STS answer was sent
//!   before the request was: it did not wait on STS (an ordering, not a timing threshold);
//! - the STS answer time itself, the baseline of this run.
//!
//! Run: `cargo bench --bench scale_new_pods` (about two minutes).

#[path = "scale/mod.rs"]
mod scale;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use scale::fake_sts::FakeSts;
use scale::{Kind, Process, ms, node_ip, percentile};
use support::fake_kube::{FakeKube, Workload, full_pod, namespace};

const PODS: usize = 500;
const EVERY: Duration = Duration::from_millis(80);
const STS_DELAY: Duration = Duration::from_millis(100);
const PENDING: Duration = Duration::from_secs(1);
const FIRST_REQUEST_AFTER: Duration = Duration::from_millis(50);
const CREDS: &str = "/latest/meta-data/iam/security-credentials/web";

struct Arrival {
    session: String,
    added: Instant,
    requested: Instant,
    answered: Instant,
    status: u16,
    key: String,
}

fn pod(scenario: usize, i: usize, ip: Option<&str>) -> serde_json::Value {
    full_pod(&Workload {
        namespace: "shop",
        name: &format!("new{scenario}-7d4b9c8f6-{i:05}"),
        uid: &format!("5e1d0c2b-0000-4000-8000-{scenario:02}{i:010}"),
        node: "node-1",
        ip,
        role: Some("web"),
        service_account: &format!("s{scenario}-{i:03}"),
    })
}

async fn arrive(
    kube: FakeKube,
    imds: std::net::SocketAddr,
    scenario: usize,
    i: usize,
    at: tokio::time::Instant,
    pending: Option<Duration>,
) -> Arrival {
    let ip = node_ip(scenario * PODS + i);
    tokio::time::sleep_until(at).await;
    let added = Instant::now();
    if let Some(pending) = pending {
        kube.apply_pod(pod(scenario, i, None));
        tokio::time::sleep(pending).await;
    }
    kube.apply_pod(pod(scenario, i, Some(&ip)));
    let known = tokio::time::Instant::now();
    tokio::time::sleep_until(known + FIRST_REQUEST_AFTER).await;
    let requested = Instant::now();
    let reply = support::http::get(ip.parse().expect("ip"), imds, CREDS, None).await;
    let answered = Instant::now();
    let key = if reply.status == 200 {
        reply.json()["AccessKeyId"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    } else {
        String::new()
    };
    Arrival {
        session: format!("shop.s{scenario}-{i:03}"),
        added,
        requested,
        answered,
        status: reply.status,
        key,
    }
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let sts = FakeSts::start(STS_DELAY);
    let kube = FakeKube::start();
    kube.apply_namespace(namespace(
        "shop",
        Some(&format!("{}.*", scale::BASE_ROLE_ARN)),
    ));
    let mut iamlet = Process::start(Kind::Agent, &kube, &sts.url(), "");
    runtime.block_on(iamlet.wait_ready(Duration::from_millis(20), Duration::from_secs(60)));

    println!("machine: {}", scale::machine());
    println!(
        "each pod a new identity; STS answers after {STS_DELAY:?}; first request {FIRST_REQUEST_AFTER:?} after the IP is known"
    );
    println!(
        "{:30} {:>16} {:>16} {:>16} {:>9} {:>16} {:>9}",
        "arrival",
        "event→cached ms",
        "event→STS ms",
        "STS answer ms",
        "hits",
        "1st request ms",
        "STS calls"
    );
    let scenarios: [(&str, usize, Duration, Option<Duration>); 3] = [
        ("500 every 80 ms, pending 1 s", PODS, EVERY, Some(PENDING)),
        ("500 every 80 ms, IP at once", PODS, EVERY, None),
        (
            "100 every 300 ms, pending 1 s",
            100,
            Duration::from_millis(300),
            Some(PENDING),
        ),
    ];
    for (scenario, (name, pods, every, pending)) in scenarios.into_iter().enumerate() {
        let start = tokio::time::Instant::now() + Duration::from_millis(200);
        let arrivals: Vec<Arrival> = runtime.block_on(async {
            let tasks: Vec<_> = (0..pods)
                .map(|i| {
                    tokio::spawn(arrive(
                        kube.clone(),
                        iamlet.imds,
                        scenario,
                        i,
                        start + every * i as u32,
                        pending,
                    ))
                })
                .collect();
            let mut arrivals = Vec::new();
            for task in tasks {
                arrivals.push(task.await.expect("pod"));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            arrivals
        });
        let calls = sts.calls();
        let by_key: HashMap<&str, &scale::fake_sts::Call> = calls
            .iter()
            .map(|c| (c.access_key_id.as_str(), c))
            .collect();
        let mut first_by_session: HashMap<&str, &scale::fake_sts::Call> = HashMap::new();
        let mut per_session: HashMap<&str, usize> = HashMap::new();
        for call in &calls {
            first_by_session
                .entry(call.session_name.as_str())
                .or_insert(call);
            *per_session.entry(call.session_name.as_str()).or_default() += 1;
        }
        let (mut cached, mut reaction, mut sts_ms, mut first) = (vec![], vec![], vec![], vec![]);
        let (mut hits, mut sts_calls) = (0usize, 0usize);
        for arrival in &arrivals {
            let session = arrival.session.as_str();
            sts_calls += per_session.get(session).copied().unwrap_or(0);
            if let Some(call) = first_by_session.get(session) {
                cached.push(ms(call.answered.saturating_duration_since(arrival.added)));
                reaction.push(ms(call.arrived.saturating_duration_since(arrival.added)));
                sts_ms.push(ms(call.answered - call.arrived));
            }
            first.push(ms(arrival.answered - arrival.requested));
            let before = by_key
                .get(arrival.key.as_str())
                .is_some_and(|call| call.answered < arrival.requested);
            if arrival.status == 200 && before {
                hits += 1;
            }
        }
        let p = |values: &mut Vec<f64>| {
            format!(
                "{:>7.1} /{:>7.1}",
                percentile(values, 0.5),
                percentile(values, 0.99)
            )
        };
        println!(
            "{name:30} {:>16} {:>16} {:>16} {:>8.1}% {:>16} {:>9}",
            p(&mut cached),
            p(&mut reaction),
            p(&mut sts_ms),
            hits as f64 * 100.0 / arrivals.len() as f64,
            p(&mut first),
            sts_calls,
        );
    }
    println!("(figures are p50 / p99)");
    iamlet.stop();
}
