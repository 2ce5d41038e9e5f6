//! Load and latency of the credential path, as ratios against a floor measured in the same run.
//!
//! The floor is a bare hyper HTTP/1.1 server, in a process of its own like iamlet, answering
//! each request with a body of the size iamlet answers it with (a token, the role name, a
//! credential document). iamlet serves a cache hit for the pod at 127.0.0.2, once with tokens
//! optional and once with tokens required, with fair share on but bounds far above the load.
//! Three scenarios, each from `WORKERS` clients at once:
//!
//! - **keep-alive**: credential GETs back to back on one connection per client;
//! - **SDK sequence**: what an SDK does to get credentials: PUT a token, GET the role listing,
//!   GET the credentials, with the token (in both token modes: SDKs send one anyway);
//! - **new connection**: one credential GET per connection (the client resets it after the
//!   answer, so no TIME_WAIT piles up on loopback).
//!
//! Without a token, a GET with tokens required would be refused; the floor and iamlet with
//! tokens required are sent the token, iamlet with tokens optional is not (except in the SDK
//! sequence). The configurations take turns for `ROUNDS` rounds, so that machine noise spreads
//! evenly; each figure is the median over the rounds, and each ratio the median of the ratios
//! taken within a round (target and floor ran back to back). Latency by percentile (the round
//! of median throughput) is drawn to `docs/bench/latency.svg`.
//!
//! Run: `cargo bench --bench imds_load` (needs moto from `bash .ci/setup`; about 2 minutes);
//! `cargo bench --bench imds_load -- new-connection` runs one scenario (`keep-alive`,
//! `sdk-sequence`, `new-connection`) and draws nothing.

#[path = "../tests/support/mod.rs"]
mod support;

mod latency;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use latency::{Curve, Floor, Panel, Run, Window};
use support::iamlet::{Iamlet, Setup, pod};
use tokio::net::TcpStream;

const WORKERS: usize = 16;
const WARM_UP: Duration = Duration::from_millis(500);
const MEASURE: Duration = Duration::from_secs(2);
const ROUNDS: usize = 5;
const POD_IP: &str = "127.0.0.2";
const LISTING: &str = "/latest/meta-data/iam/security-credentials/";
const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/web";
const TOKEN_PATH: &str = "/latest/api/token";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const FLOOR_FLAG: &str = "--serve-floor";
/// Fair share stays on (its bookkeeping is part of every request) with bounds no client of
/// this benchmark reaches.
const UNBOUNDED_FAIR_SHARE: &str = "client_max_connections = 1000000\n\
     client_max_requests = 1000000\n\
     client_requests_per_second = 1e12\n\
     client_burst = 4000000000\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    KeepAlive,
    SdkSequence,
    NewConnection,
}

impl Scenario {
    const ALL: [Scenario; 3] = [
        Scenario::KeepAlive,
        Scenario::SdkSequence,
        Scenario::NewConnection,
    ];

    /// How the scenario is named on the command line.
    fn name(self) -> &'static str {
        match self {
            Scenario::KeepAlive => "keep-alive",
            Scenario::SdkSequence => "sdk-sequence",
            Scenario::NewConnection => "new-connection",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Scenario::KeepAlive => "(a) credential GETs, keep-alive",
            Scenario::SdkSequence => "(b) SDK sequence: PUT token, GET role, GET credentials",
            Scenario::NewConnection => "(c) one credential GET per new connection",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Scenario::SdkSequence => "sequences/s",
            Scenario::KeepAlive | Scenario::NewConnection => "req/s",
        }
    }
}

struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// The server's process.
    pid: u32,
    /// The token sent with single GETs (the SDK sequence fetches its own).
    token: Option<String>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == FLOOR_FLAG) {
        serve_floor(&args[at + 1..]);
        return;
    }
    // `cargo bench --bench imds_load -- new-connection` runs only the scenarios named (and
    // draws no picture).
    let named: Vec<&String> = args[1..].iter().filter(|a| !a.starts_with('-')).collect();
    let scenarios: Vec<Scenario> = Scenario::ALL
        .into_iter()
        .filter(|s| named.is_empty() || named.iter().any(|n| *n == s.name()))
        .collect();
    let pod_ip: IpAddr = POD_IP.parse().expect("ip");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");

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
                pods: vec![pod(POD_IP, "shop", "web-0", Some("web"))],
                log_level: "info".into(),
                imds_extra: UNBOUNDED_FAIR_SHARE.into(),
                ..Setup::default()
            },
        )
    };
    let optional = start(&dirs[0], "optional");
    let required = start(&dirs[1], "required");
    let token = runtime.block_on(support::http::token(pod_ip, required.imds));
    // The floor answers with bodies of the sizes iamlet answers with.
    let document = runtime.block_on(support::http::get(pod_ip, optional.imds, CREDENTIALS, None));
    assert_eq!(document.status, 200, "{document:?}");
    let (document_bytes, token_bytes) = (document.body.len().to_string(), token.len().to_string());
    let floor = Floor::start(
        FLOOR_FLAG,
        &[
            document_bytes.as_ref(),
            token_bytes.as_ref(),
            "web".as_ref(),
        ],
    );

    let targets = [
        Target {
            name: "floor: bare hyper",
            addr: floor.addr,
            pid: floor.pid(),
            token: Some(token.clone()),
        },
        Target {
            name: "iamlet, tokens optional",
            addr: optional.imds,
            pid: optional.pid() as u32,
            token: None,
        },
        Target {
            name: "iamlet, tokens required",
            addr: required.imds,
            pid: required.pid() as u32,
            token: Some(token.clone()),
        },
    ];
    let mut runs: Vec<Vec<Vec<Run>>> = vec![vec![Vec::new(); targets.len()]; scenarios.len()];
    for _ in 0..ROUNDS {
        for (s, scenario) in scenarios.iter().enumerate() {
            for (t, target) in targets.iter().enumerate() {
                let run = runtime.block_on(load(*scenario, pod_ip, target));
                runs[s][t].push(run);
            }
        }
    }
    drop(floor);

    println!(
        "{} on {}: {WORKERS} clients, {MEASURE:?} per run, {ROUNDS} interleaved rounds \
         (medians over the rounds; ratios paired within each round)",
        latency::today(),
        latency::machine()
    );
    for (scenario, per_target) in scenarios.iter().zip(&runs) {
        let rows: Vec<(&str, &[Run])> = targets
            .iter()
            .zip(per_target)
            .map(|(target, runs)| (target.name, runs.as_slice()))
            .collect();
        println!("\n{}\n", scenario.title());
        print!("{}", latency::table(scenario.unit(), &rows));
    }
    if scenarios.len() < Scenario::ALL.len() {
        return;
    }
    let colors = [latency::FLOOR, latency::FIRST, latency::SECOND];
    let panels: Vec<Panel<'_>> = scenarios
        .iter()
        .zip(&runs)
        .map(|(scenario, per_target)| Panel {
            title: scenario.title(),
            curves: targets
                .iter()
                .zip(per_target)
                .zip(colors)
                .map(|((target, runs), color)| Curve {
                    name: target.name,
                    color,
                    run: latency::median(runs),
                })
                .collect(),
        })
        .collect();
    let picture = support::repo().join("docs/bench/latency.svg");
    latency::percentile_plot(
        &picture,
        "iamlet's credential path against a bare hyper server: latency by percentile \
         (the round of median throughput)",
        &panels,
    )
    .expect("draw the picture");
    println!("\nlatency by percentile drawn to {}", picture.display());
}

/// One run of `scenario` against `target` from `WORKERS` clients at `from`.
async fn load(scenario: Scenario, from: IpAddr, target: &Target) -> Run {
    let window = Window::new(WARM_UP, MEASURE);
    let to = target.addr;
    let workers = (0..WORKERS).map(|_| {
        let token = target.token.clone();
        async move {
            let mut latencies = Vec::new();
            match scenario {
                Scenario::KeepAlive => {
                    let mut sender = connect(from, to).await;
                    while window.open(Instant::now()) {
                        let sent = Instant::now();
                        get(&mut sender, CREDENTIALS, token.as_deref()).await;
                        window.keep(sent, &mut latencies);
                    }
                }
                Scenario::SdkSequence => {
                    let mut sender = connect(from, to).await;
                    while window.open(Instant::now()) {
                        let sent = Instant::now();
                        sdk_sequence(&mut sender).await;
                        window.keep(sent, &mut latencies);
                    }
                }
                Scenario::NewConnection => {
                    while window.open(Instant::now()) {
                        let sent = Instant::now();
                        let (mut sender, connection) = handshake(from, to, true).await;
                        let mut connection = std::pin::pin!(connection);
                        tokio::select! {
                            biased;
                            _ = get(&mut sender, CREDENTIALS, token.as_deref()) => {}
                            ended = &mut connection => panic!("connection ended: {ended:?}"),
                        }
                        // Dropped unfinished: reset, not shut down, so that no TIME_WAIT is
                        // left behind (a run makes tens of thousands of connections).
                        window.keep(sent, &mut latencies);
                    }
                }
            }
            latencies
        }
    });
    latency::drive(window, target.pid, workers).await
}

/// An HTTP/1.1 connection from `from` to `to`, driven in the background.
async fn connect(from: IpAddr, to: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let (sender, connection) = handshake(from, to, false).await;
    tokio::spawn(connection);
    sender
}

type Connection = hyper::client::conn::http1::Connection<TokioIo<TcpStream>, Empty<Bytes>>;

/// An HTTP/1.1 connection from `from` to `to`, for the caller to drive; with `reset`, dropping
/// it resets it.
async fn handshake(
    from: IpAddr,
    to: SocketAddr,
    reset: bool,
) -> (SendRequest<Empty<Bytes>>, Connection) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind");
    socket.set_nodelay(true).expect("nodelay");
    if reset {
        socket.set_zero_linger().expect("linger");
    }
    let stream = socket.connect(to).await.expect("connect");
    hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake")
}

/// A GET that must be answered 200; the body.
async fn get(sender: &mut SendRequest<Empty<Bytes>>, path: &str, token: Option<&str>) -> Bytes {
    let mut request = Request::get(path).header("host", "169.254.169.254");
    if let Some(token) = token {
        request = request.header(TOKEN_HEADER, token);
    }
    send(sender, request).await
}

async fn send(
    sender: &mut SendRequest<Empty<Bytes>>,
    request: hyper::http::request::Builder,
) -> Bytes {
    let request = request.body(Empty::new()).expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200, "{response:?}");
    response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
}

/// PUT a token, GET the role listing, GET the credentials of the role listed.
async fn sdk_sequence(sender: &mut SendRequest<Empty<Bytes>>) {
    let token = send(
        sender,
        Request::put(TOKEN_PATH)
            .header("host", "169.254.169.254")
            .header(TTL_HEADER, "21600"),
    )
    .await;
    let token = std::str::from_utf8(&token).expect("token");
    let role = get(sender, LISTING, Some(token)).await;
    let role = std::str::from_utf8(&role).expect("role name");
    let path = format!("{LISTING}{role}");
    get(sender, &path, Some(token)).await;
}

/// The floor: hyper's HTTP/1.1 server on a multi-threaded runtime, answering each route with a
/// fixed body of the size iamlet answers it with, and the headers iamlet sends.
fn serve_floor(args: &[String]) {
    use std::convert::Infallible;
    let [port, document_bytes, token_bytes, role] = args else {
        panic!("{FLOOR_FLAG} PORT DOCUMENT_BYTES TOKEN_BYTES ROLE");
    };
    latency::exit_with_benchmark();
    let size = |text: &str| text.parse::<usize>().expect("a size");
    let document = Bytes::from(format!(
        "{{\"Code\":\"Success\",\"Pad\":\"{}\"}}",
        "x".repeat(size(document_bytes).saturating_sub(26))
    ));
    let token = Bytes::from("t".repeat(size(token_bytes)));
    let role = Bytes::from(role.clone());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}"))
            .await
            .expect("bind");
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            let (document, token, role) = (document.clone(), token.clone(), role.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    let path = request.uri().path();
                    let (body, ttl) = if path == TOKEN_PATH {
                        (token.clone(), request.headers().get(TTL_HEADER).cloned())
                    } else if path == LISTING {
                        (role.clone(), None)
                    } else {
                        (document.clone(), None)
                    };
                    let mut response = hyper::Response::new(http_body_util::Full::new(body));
                    response.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("text/plain"),
                    );
                    if let Some(ttl) = ttl {
                        response.headers_mut().insert(TTL_HEADER, ttl);
                    }
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
