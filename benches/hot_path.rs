//! Micro-benchmarks of the pieces of a cache hit, so that a regression in `imds_load` can be
//! traced to the piece that caused it: the IP lookup (with the decision kept beside it), the
//! policy decision made once per pod, the token check, the credential document, fair share,
//! the credential cache, the request metrics, and the whole broker hit (everything but HTTP).
//!
//! Run: `cargo bench --bench hot_path` (about a minute; no peers needed). Criterion keeps its
//! last results in `target/criterion` and reports the change against them on the next run.

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use iamlet::broker::{Broker, Local};
use iamlet::clock::{Clock, SystemClock};
use iamlet::credentials::{
    self, AssumeRoleRequest, Cache, CredentialSource, Credentials, RateLimiter,
};
use iamlet::imds::{ClientLimits, Documents, FairShare, TokenKey};
use iamlet::metrics::Metrics;
use iamlet::pod::{Annotations, Pod};
use iamlet::pods::index::{Change, PodIndex, PodRecord, Recall};
use iamlet::pods::{StaticPod, StaticPods};
use iamlet::policy::{BaseRoleArn, NamespacePolicy, Policy, SessionName};

const ACCOUNT_BASE: &str = "arn:aws:iam::123456789012:role/";

fn pod(i: usize) -> Pod {
    Pod {
        namespace: format!("team-{}", i % 20),
        name: format!("web-{i}"),
        uid: format!("0b5c3a52-8f0e-4a53-9d2c-{i:012}"),
        service_account: "web".to_owned(),
        annotations: Annotations {
            role: Some(format!("team-{}-web", i % 20)),
            ..Annotations::default()
        },
    }
}

fn ip(i: usize) -> IpAddr {
    IpAddr::from([10, 1, (i / 250) as u8, (i % 250) as u8 + 1])
}

/// An index of `pods` pods in 20 namespaces, each namespace permitting its own roles.
fn index(pods: usize) -> PodIndex {
    let index = PodIndex::default();
    index.apply_namespace(Change::Init);
    for n in 0..20 {
        let policy = NamespacePolicy::from_annotation(Some(&format!(
            "arn:aws:iam::123456789012:role/team-{n}-.*"
        )));
        index.apply_namespace(Change::InitApply((format!("team-{n}"), policy)));
    }
    index.apply_namespace(Change::InitDone);
    index.apply_pod(Change::Init);
    for i in 0..pods {
        index.apply_pod(Change::InitApply(PodRecord {
            pod: Arc::new(pod(i)),
            ip: Some(ip(i)),
            host_network: false,
            finished: false,
        }));
    }
    index.apply_pod(Change::InitDone);
    index
}

fn policy() -> Policy {
    Policy {
        base_role_arn: BaseRoleArn::parse(ACCOUNT_BASE).expect("base"),
        default_role: None,
        allow_unannotated_namespaces: false,
        session_name_template: "{namespace}.{service_account}".to_owned(),
        session_tags: false,
    }
}

fn ip_lookup(c: &mut Criterion) {
    for pods in [250, 10_000] {
        let index = index(pods);
        let at = ip(pods / 2);
        // What the broker keeps beside the claim after the first request.
        if let Recall::Found(found) = index.recall(at) {
            index.remember(&found, Arc::new(()));
        }
        c.bench_function(
            &format!("ip lookup: pod and kept decision, {pods} pods"),
            |b| {
                b.iter(|| match index.recall(black_box(at)) {
                    Recall::Found(found) => found.memo.is_some(),
                    Recall::Unknown | Recall::Conflict => false,
                })
            },
        );
    }
}

fn policy_decision(c: &mut Criterion) {
    let policy = policy();
    let pod = pod(7);
    let namespace =
        NamespacePolicy::from_annotation(Some("arn:aws:iam::123456789012:role/team-7-.*"));
    // Made once per pod (and again when the pod or a namespace changes), not per request.
    c.bench_function(
        "policy decision: role, namespace regex, session name",
        |b| {
            b.iter(|| {
                let role = policy
                    .role_for(black_box(&pod), Some(&namespace))
                    .expect("permitted");
                let session = SessionName::for_pod(&policy.session_name_template, &pod);
                (role, session, policy.session_tags(&pod))
            })
        },
    );
}

fn token_check(c: &mut Criterion) {
    let key = TokenKey::random();
    let client: IpAddr = "10.1.0.9".parse().expect("ip");
    let now = SystemClock.now();
    let token = key.mint(client, Duration::from_secs(21_600), now);
    c.bench_function("token: verify a token seen before (every GET)", |b| {
        b.iter(|| key.verify(black_box(&token), client, now))
    });
    let mut ttl = 0;
    c.bench_function("token: verify a new token (HMAC)", |b| {
        b.iter_batched(
            || {
                ttl += 1;
                key.mint(client, Duration::from_secs(ttl), now)
            },
            |token| key.verify(black_box(&token), client, now),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("token: mint (PUT /latest/api/token)", |b| {
        b.iter(|| key.mint(black_box(client), Duration::from_secs(21_600), now))
    });
}

fn issued() -> Credentials {
    let now = SystemClock.now();
    Credentials {
        access_key_id: "ASIAQWERTYUIOPASDFGH".to_owned(),
        secret_access_key: "x".repeat(40),
        session_token: "t".repeat(800),
        expiration: now + Duration::from_secs(3600),
        last_updated: now,
    }
}

fn document_encoding(c: &mut Criterion) {
    let documents = Documents::default();
    let credentials = Arc::new(issued());
    c.bench_function("document: encode (once per credentials)", |b| {
        b.iter(|| iamlet::imds::credential_document(black_box(&credentials)))
    });
    documents.credentials(&credentials);
    c.bench_function("document: encoded before (every request)", |b| {
        b.iter(|| documents.credentials(black_box(&credentials)))
    });
}

fn fair_share(c: &mut Criterion) {
    let runtime = runtime();
    let _entered = runtime.enter();
    let share = FairShare::new(
        ClientLimits {
            max_connections: 128,
            max_requests: 64,
            requests_per_second: 1e9,
            burst: u32::MAX,
        },
        Metrics::default(),
    );
    let connection = share.connection(ip(1)).expect("admitted");
    c.bench_function("fair share: admit a request on a connection", |b| {
        b.iter(|| drop(black_box(connection.request())))
    });
}

fn metrics(c: &mut Criterion) {
    let metrics = Metrics::default();
    c.bench_function("metrics: count and time a request", |b| {
        b.iter(|| metrics.observe_request(black_box("credentials"), 200, Duration::from_micros(80)))
    });
}

/// STS as a constant: every call succeeds at once.
struct Issuer;

impl CredentialSource for Issuer {
    async fn assume_role(
        &self,
        _request: &AssumeRoleRequest,
    ) -> Result<Credentials, credentials::Error> {
        Ok(issued())
    }
}

/// The output of a future that must not wait (a hit), polled once.
fn ready<F: std::future::IntoFuture>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future.into_future());
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => panic!("a hit had to wait"),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn cache() -> Cache<Issuer, SystemClock> {
    Cache::new(
        Issuer,
        SystemClock,
        Duration::from_secs(30 * 60),
        RateLimiter::new(100.0, 100),
        Metrics::default(),
    )
}

fn credential_cache(c: &mut Criterion) {
    let runtime = runtime();
    let cache = cache();
    let request = AssumeRoleRequest {
        role_arn: iamlet::policy::RoleArn::parse(&format!("{ACCOUNT_BASE}web")).expect("arn"),
        session_name: SessionName::sanitize("shop.web"),
        external_id: None,
        tags: Vec::new(),
    };
    let held = runtime.block_on(async {
        let held = cache.hold(&request);
        cache.get_held(&held).await.expect("fetched");
        held
    });
    c.bench_function("credential cache: hit on a held entry", |b| {
        b.iter(|| ready(cache.get_held(black_box(&held))))
    });
    c.bench_function("credential cache: hit by key", |b| {
        b.iter(|| ready(cache.get(black_box(&request))))
    });
}

fn broker_hit(c: &mut Criterion) {
    let runtime = runtime();
    let _entered = runtime.enter();
    let pods = StaticPods::new(&[StaticPod {
        ip: ip(1),
        namespace: "shop".to_owned(),
        name: "web-0".to_owned(),
        role: Some("web".to_owned()),
        service_account: "web".to_owned(),
        external_id: None,
        session_name: None,
    }]);
    let broker = Local::new(pods, policy(), cache(), Metrics::default(), None);
    runtime
        .block_on(broker.credentials(ip(1), "web"))
        .expect("first served");
    c.bench_function("broker: credentials for a pod, cache hit", |b| {
        b.iter(|| ready(broker.credentials(black_box(ip(1)), "web")))
    });
}

fn quick() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = hot_path;
    config = quick();
    targets = ip_lookup, policy_decision, token_check, document_encoding, fair_share, metrics,
        credential_cache, broker_hit
}
criterion_main!(hot_path);
