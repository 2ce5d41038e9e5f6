//! Load and latency of the credential path, as ratios against a floor measured in the same run.
//!
//! The floor is a bare hyper HTTP/1.1 server, in a process of its own like iamlet, answering
//! every request with a body the size of a credential document. iamlet serves a cache hit for
//! the pod at 127.0.0.2, with tokens optional and with tokens required. The configurations take
//! turns for `ROUNDS` rounds, so machine noise spreads evenly, and the median round is reported.
//!
//! Run: `cargo bench --bench imds_load` (needs the peers from `bash .ci/setup` for moto).

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use support::iamlet::{Iamlet, Setup, pod};

const CONNECTIONS: usize = 16;
const WARM_UP: Duration = Duration::from_millis(500);
const MEASURE: Duration = Duration::from_secs(3);
const ROUNDS: usize = 3;
const PATH: &str = "/latest/meta-data/iam/security-credentials/web";
const BASELINE_FLAG: &str = "--serve-baseline";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == BASELINE_FLAG) {
        serve_baseline(&args[at + 1]);
        return;
    }
    let pod_ip: IpAddr = "127.0.0.2".parse().expect("ip");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");

    let baseline_port = support::free_port();
    let mut baseline = std::process::Command::new(std::env::current_exe().expect("self"))
        .args([BASELINE_FLAG, &baseline_port.to_string()])
        .spawn()
        .expect("baseline server");
    let baseline_addr: SocketAddr = ([127, 0, 0, 1], baseline_port).into();
    assert!(support::wait_for_port(
        baseline_addr,
        Duration::from_secs(10)
    ));

    let moto = support::moto::shared();
    let dirs: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let start = |dir: &tempfile::TempDir, tokens: &str| {
        Iamlet::start(
            dir.path(),
            &Setup {
                tokens: tokens.into(),
                sts: moto.url(),
                pods: vec![pod("127.0.0.2", "shop", "web-0", Some("web"))],
                log_level: "info".into(),
                ..Setup::default()
            },
        )
    };
    let optional = start(&dirs[0], "optional");
    let required = start(&dirs[1], "required");
    let token = runtime.block_on(support::http::token(pod_ip, required.imds));

    let targets: [(&str, SocketAddr, Option<&str>); 3] = [
        ("floor: bare hyper, same body size", baseline_addr, None),
        ("iamlet, tokens optional", optional.imds, None),
        ("iamlet, tokens required", required.imds, Some(&token)),
    ];
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); targets.len()];
    for _ in 0..ROUNDS {
        for (i, (_, addr, token)) in targets.iter().enumerate() {
            results[i].push(runtime.block_on(load(pod_ip, *addr, *token)));
        }
    }
    let _ = baseline.kill();
    let _ = baseline.wait();

    let medians: Vec<Run> = results.into_iter().map(median).collect();
    let floor = medians[0];
    println!(
        "{CONNECTIONS} connections, {MEASURE:?} per run, median of {ROUNDS} interleaved rounds"
    );
    println!(
        "{:38} {:>10} {:>9} {:>9} {:>12} {:>11}",
        "target", "req/s", "p50 µs", "p99 µs", "req/s ratio", "p99 ratio"
    );
    for ((name, _, _), run) in targets.iter().zip(&medians) {
        println!(
            "{name:38} {:>10.0} {:>9.0} {:>9.0} {:>12.2} {:>11.2}",
            run.rps,
            run.p50_us,
            run.p99_us,
            run.rps / floor.rps,
            run.p99_us / floor.p99_us
        );
    }
}

#[derive(Debug, Clone, Copy)]
struct Run {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    runs[runs.len() / 2]
}

/// `CONNECTIONS` keep-alive connections from `from`, each sending GETs back to back.
async fn load(from: IpAddr, to: SocketAddr, token: Option<&str>) -> Run {
    let started = Instant::now();
    let measure_from = started + WARM_UP;
    let stop = measure_from + MEASURE;
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let token = token.map(str::to_owned);
            tokio::spawn(async move {
                let stream = support::http::connect(from, to).await;
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .expect("handshake");
                tokio::spawn(connection);
                let mut latencies = Vec::new();
                loop {
                    let sent = Instant::now();
                    if sent >= stop {
                        break;
                    }
                    let mut request = Request::get(PATH).header("host", "169.254.169.254");
                    if let Some(token) = &token {
                        request = request.header("x-aws-ec2-metadata-token", token);
                    }
                    let request = request.body(Empty::<Bytes>::new()).expect("request");
                    let response = sender.send_request(request).await.expect("response");
                    assert_eq!(response.status(), 200);
                    let _ = response.into_body().collect().await.expect("body");
                    if sent >= measure_from {
                        latencies.push(sent.elapsed());
                    }
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("load task"));
    }
    all.sort();
    let pct =
        |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1e6;
    Run {
        rps: all.len() as f64 / MEASURE.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

/// The floor: hyper's HTTP/1.1 server on a multi-threaded runtime, answering a fixed body.
fn serve_baseline(port: &str) {
    use std::convert::Infallible;
    let body = Bytes::from(format!(
        "{{\"Code\":\"Success\",\"Pad\":\"{}\"}}",
        "x".repeat(780)
    ));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}"))
            .await
            .expect("bind");
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            let body = body.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request| {
                    let body = body.clone();
                    async move {
                        Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(body)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
