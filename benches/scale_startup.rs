//! Start-up (issue 11, target 6): from process start to `/readyz` answering 200, with 250 pods
//! (20 identities) on the node, against the fake API server and a fake STS that answers after
//! `STS_DELAY`. Ready means: lists of pods and namespaces in, and every identity asked of STS
//! once (the cache is warm).
//!
//! The baseline, in the same run, is one STS round: the 20 identities' AssumeRole calls made at
//! once by iamlet's own STS source (same SDK, same HTTP stack, same fake STS) from this
//! process. Target: ready ≤ 1 s + one STS round. `/readyz` is polled every 5 ms from the
//! instant before the process is spawned; phases come from iamlet's own log timestamps.
//!
//! Run: `cargo bench --bench scale_startup` (under a minute).

#[path = "scale/mod.rs"]
mod scale;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use aws_credential_types::provider::SharedCredentialsProvider;
use iamlet::credentials::{AssumeRoleRequest, CredentialSource, StsSource};
use iamlet::metrics::Metrics;
use iamlet::policy::{RoleArn, SessionName};
use scale::fake_sts::FakeSts;
use scale::{Kind, NODE_IDENTITIES, Process, ms, percentile};
use support::fake_kube::FakeKube;

const ON_NODE: usize = 250;
const OTHERS: usize = 1_000;
const STS_DELAY: Duration = Duration::from_millis(100);
const RUNS: usize = 7;

/// One round of the node's identities, at once, through iamlet's STS source.
async fn sts_round(source: &StsSource) -> Duration {
    let started = Instant::now();
    let calls = (0..NODE_IDENTITIES).map(|identity| async move {
        let request = AssumeRoleRequest {
            role_arn: RoleArn::parse(&format!("{}role-{identity}", scale::BASE_ROLE_ARN))
                .expect("arn"),
            session_name: SessionName::sanitize(&format!("team-{identity}.app")),
            external_id: None,
            tags: Vec::new(),
        };
        source.assume_role(&request).await.expect("credentials");
    });
    futures::future::join_all(calls).await;
    started.elapsed()
}

/// Milliseconds from `spawned` (wall clock) to the first log line with `message` (and `what`).
fn phase(log: &str, spawned: std::time::SystemTime, message: &str, what: Option<&str>) -> f64 {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|event| {
            event["message"].as_str() == Some(message)
                && what.is_none_or(|w| event["what"].as_str() == Some(w))
        })
        .and_then(|event| {
            let stamp = event["timestamp"].as_str()?;
            let at =
                time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339)
                    .ok()?;
            let at = std::time::SystemTime::from(at);
            Some(ms(at.duration_since(spawned).unwrap_or_default()))
        })
        .unwrap_or(f64::NAN)
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let sts = FakeSts::start(STS_DELAY);
    let kube = FakeKube::start();
    scale::load_cluster(&kube, ON_NODE, OTHERS);

    let mut config = iamlet::Config::default();
    config.aws.region = "us-east-1".into();
    config.aws.sts_endpoint = sts.url();
    let credentials =
        aws_credential_types::Credentials::new("AKIDBENCH", "bench-secret", None, None, "bench");
    let client = runtime
        .block_on(iamlet::mode::sts_client(
            &config,
            Some(SharedCredentialsProvider::new(credentials)),
        ))
        .expect("sts client");
    let source = StsSource::new(client, Duration::from_secs(3600), Metrics::default());
    runtime.block_on(sts_round(&source)); // connections and the SDK warmed up, as in iamlet

    let (mut rounds, mut ready, mut over, mut lists, mut serving) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..RUNS {
        let round = runtime.block_on(sts_round(&source));
        let spawned = support::wall_clock();
        let mut iamlet = Process::start(Kind::Agent, &kube, &sts.url(), "");
        let took =
            runtime.block_on(iamlet.wait_ready(Duration::from_millis(5), Duration::from_secs(60)));
        let log = iamlet.log();
        iamlet.stop();
        serving.push(phase(&log, spawned, "iamlet is serving", None));
        lists.push(
            phase(
                &log,
                spawned,
                "list received; watching for changes",
                Some("pods"),
            )
            .max(phase(
                &log,
                spawned,
                "list received; watching for changes",
                Some("namespaces"),
            )),
        );
        rounds.push(ms(round));
        ready.push(ms(took));
        over.push(ms(took) - ms(round));
    }
    println!("machine: {}", scale::machine());
    println!(
        "{ON_NODE} pods ({NODE_IDENTITIES} identities) on the node, {OTHERS} elsewhere; STS answers after {STS_DELAY:?}; {RUNS} starts"
    );
    let row = |name: &str, values: &mut Vec<f64>| {
        let max = values.iter().copied().fold(f64::MIN, f64::max);
        println!(
            "{name:40} p50 {:>7.1} ms   max {:>7.1} ms",
            percentile(values, 0.5),
            max
        );
    };
    row("baseline: one STS round (20 at once)", &mut rounds);
    row("start → 'iamlet is serving' (log)", &mut serving);
    row("start → both lists received (log)", &mut lists);
    row("start → /readyz 200", &mut ready);
    row("start → /readyz 200, less one STS round", &mut over);
    println!("target: start → /readyz ≤ 1000 ms + one STS round");
}
