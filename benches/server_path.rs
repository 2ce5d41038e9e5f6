//! The server-backed path (issue 11, target 2), as ratios within one run and counts.
//!
//! - **(A) `iamlet server`'s warm `GetPodCredentials`**, over mutual TLS from a tonic client
//!   with N calls in flight (spread over up to `CONNECTIONS` HTTP/2 connections, as several
//!   agents would make), against a floor: a bare tonic server in a process of its own (this
//!   binary, re-run with `--serve-floor`), serving the same `kiam.KiamService` with the same
//!   certificates and client certificates required, answering every `GetPodCredentials` with
//!   the very message iamlet server answered (decoded once, cloned per call).
//! - **(B) a warm hit at the agent**: credential GETs with keep-alive from `WORKERS` clients
//!   (as scenario (a) of benches/imds_load.rs) at an agent in server-backed mode pointed at that
//!   iamlet server, against a standalone agent (static pod table, STS at moto), same run. The
//!   CPU column is the agent's own; a server-backed hit may also cost the server's.
//! - **(C) RPCs per request**, counted by iamlet server (`iamlet_server_calls_total`, every
//!   code): for warm hits at the server-backed agent, and for a new pod's first request (a
//!   single credential GET; the SDK's whole sequence).
//!
//! iamlet server watches a fake API server (tests/support/fake_kube.rs) holding the pod at
//! 127.0.0.2 (role `web`, namespace `shop` permitting every role of the account); new pods for
//! (C) are added to it. The configurations take turns for `ROUNDS` rounds; each figure is the
//! median over the rounds and each ratio the median of the ratios within a round (see
//! benches/latency/mod.rs). Latency by percentile is drawn to `docs/bench/server_path.svg`.
//!
//! Run: `cargo bench --bench server_path` (needs moto from `bash .ci/setup`; about 2 minutes);
//! `cargo bench --bench server_path -- rpc` runs (A) alone.

#[path = "../tests/support/mod.rs"]
mod support;

mod latency;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use iamlet::kiam::proto::kiam_service_client::KiamServiceClient;
use iamlet::kiam::proto::kiam_service_server::{KiamService, KiamServiceServer};
use iamlet::kiam::proto::{
    Credentials, GetHealthRequest, GetPodCredentialsRequest, GetPodRoleRequest, HealthStatus, Role,
};
use latency::{Curve, Floor, Panel, Run, Window};
use prost::Message as _;
use support::fake_kube::{FakeKube, namespace, pod};
use support::iamlet::{Iamlet, Setup};
use support::pki::Ca;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Calls in flight against iamlet server and its floor: one (latency alone), and many.
const IN_FLIGHT: [usize; 2] = [1, 16];
/// HTTP/2 connections the calls in flight are spread over, at most.
const CONNECTIONS: usize = 4;
/// Pod clients at once against the agents.
const WORKERS: usize = 16;
const WARM_UP: Duration = Duration::from_millis(500);
const MEASURE: Duration = Duration::from_secs(2);
const ROUNDS: usize = 9;
const WITHIN: Duration = Duration::from_secs(30);
const POD_IP: &str = "127.0.0.2";
const ROLE: &str = "web";
const BASE_ROLE_ARN: &str = "arn:aws:iam::123456789012:role/";
const SERVER_NAME: &str = "localhost";
const LISTING: &str = "/latest/meta-data/iam/security-credentials/";
const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/web";
const TOKEN_PATH: &str = "/latest/api/token";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const FLOOR_FLAG: &str = "--serve-floor";
/// The encoded `Credentials` the floor answers with, in the certificates' directory.
const FLOOR_MESSAGE: &str = "credentials.bin";
/// Fair share stays on (its bookkeeping is part of every request) with bounds no client of
/// this benchmark reaches, as in benches/imds_load.rs.
const UNBOUNDED_FAIR_SHARE: &str = "client_max_connections = 1000000\n\
     client_max_requests = 1000000\n\
     client_requests_per_second = 1e12\n\
     client_burst = 4000000000\n";
const SERVER_CALLS: &str = "iamlet_server_calls_total";

/// The certificates of the run, as files in `dir`: a CA, the server's (for `localhost`) and a
/// client's, which iamlet server, the floor, the bench's tonic client and the server-backed
/// agent all use.
struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    client_cert: String,
    client_key: String,
}

impl Pki {
    fn new() -> Pki {
        let ca = Ca::new("server-path-ca");
        let server = ca.server(&[SERVER_NAME]);
        let client = ca.client("iamlet-agent");
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).expect("certificate file")
        };
        write("ca.crt", &ca.pem());
        write("tls.crt", &server.cert_pem);
        write("tls.key", &server.key_pem);
        write("client.crt", &client.cert_pem);
        write("client.key", &client.key_pem);
        Pki {
            ca_pem: ca.pem(),
            client_cert: client.cert_pem,
            client_key: client.key_pem,
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The `[kiam]` section of an agent using the server at `addr`.
    fn kiam_section(&self, addr: SocketAddr) -> String {
        format!(
            "[kiam]\nserver = \"{SERVER_NAME}:{}\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            addr.port(),
            self.path("client.crt").display(),
            self.path("client.key").display(),
            self.path("ca.crt").display(),
        )
    }

    /// A mutual-TLS channel to the kiam service at `addr`, connected.
    async fn channel(&self, addr: SocketAddr) -> Channel {
        let tls = ClientTlsConfig::new()
            .domain_name(SERVER_NAME)
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.client_cert, &self.client_key));
        Endpoint::from_shared(format!("https://{addr}"))
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await
            .expect("connect to the kiam service")
    }
}

/// A gRPC server measured in (A).
struct RpcTarget {
    name: &'static str,
    addr: SocketAddr,
    pid: u32,
}

/// An agent measured in (B).
struct AgentTarget {
    name: &'static str,
    addr: SocketAddr,
    pid: u32,
    /// The process that answers its calls (iamlet server, for the server-backed agent).
    backing: Option<u32>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == FLOOR_FLAG) {
        serve_floor(&args[at + 1..]);
        return;
    }
    // `cargo bench --bench server_path -- rpc` runs (A) alone, and draws nothing.
    let rpc_only = args[1..].iter().any(|a| a == "rpc");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let pod_ip: IpAddr = POD_IP.parse().expect("ip");
    let pki = Pki::new();
    let moto = support::moto::shared();

    let kube = FakeKube::start();
    kube.apply_namespace(namespace("shop", Some(&format!("{BASE_ROLE_ARN}.*"))));
    kube.apply_pod(pod(
        "shop",
        "web-0",
        "uid-web-0",
        "node-1",
        POD_IP,
        Some(ROLE),
    ));
    let server_dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(server_dir.path(), &pki, &kube, &moto.url());

    // The floor answers with the message iamlet server answers with.
    let answer = runtime.block_on(async {
        support::eventually("iamlet server is ready", WITHIN, || server.ready()).await;
        let mut client = KiamServiceClient::new(pki.channel(server.grpc).await);
        client
            .get_pod_credentials(credentials_request())
            .await
            .expect("GetPodCredentials")
            .into_inner()
    });
    assert_eq!(answer.code, "Success", "{answer:?}");
    std::fs::write(pki.path(FLOOR_MESSAGE), answer.encode_to_vec()).expect("message");
    let floor = Floor::start(FLOOR_FLAG, &[pki.dir.path().as_os_str()]);

    let agent_dirs: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let standalone = Iamlet::start(
        agent_dirs[0].path(),
        &Setup {
            sts: moto.url(),
            pods: vec![support::iamlet::pod(POD_IP, "shop", "web-0", Some(ROLE))],
            log_level: "info".into(),
            imds_extra: UNBOUNDED_FAIR_SHARE.into(),
            ..Setup::default()
        },
    );
    let backed = Iamlet::start(
        agent_dirs[1].path(),
        &Setup {
            log_level: "info".into(),
            imds_extra: UNBOUNDED_FAIR_SHARE.into(),
            extra: pki.kiam_section(server.grpc),
            ..Setup::default()
        },
    );
    runtime.block_on(async {
        for agent in [&standalone, &backed] {
            support::eventually("the agent is ready", WITHIN, || agent.ready()).await;
            support::eventually("the agent serves the pod", WITHIN, || async {
                support::http::get(pod_ip, agent.imds, CREDENTIALS, None)
                    .await
                    .status
                    == 200
            })
            .await;
        }
    });

    let rpc_targets = [
        RpcTarget {
            name: "floor: bare tonic, fixed answer",
            addr: floor.addr,
            pid: floor.pid(),
        },
        RpcTarget {
            name: "iamlet server",
            addr: server.grpc,
            pid: server.pid() as u32,
        },
    ];
    let agent_targets = [
        AgentTarget {
            name: "agent, standalone",
            addr: standalone.imds,
            pid: standalone.pid() as u32,
            backing: None,
        },
        AgentTarget {
            name: "agent, server-backed",
            addr: backed.imds,
            pid: backed.pid() as u32,
            backing: Some(server.pid() as u32),
        },
    ];
    let mut rpc_runs = vec![vec![Vec::new(); rpc_targets.len()]; IN_FLIGHT.len()];
    let mut agent_runs = vec![Vec::new(); agent_targets.len()];
    // iamlet server's CPU per hit at the server-backed agent, µs, one figure per round.
    let mut backing_cpu = Vec::new();
    for _ in 0..ROUNDS {
        for (i, in_flight) in IN_FLIGHT.iter().enumerate() {
            for (t, target) in rpc_targets.iter().enumerate() {
                let run = runtime.block_on(rpc_load(&pki, target, *in_flight));
                rpc_runs[i][t].push(run);
            }
        }
        if rpc_only {
            continue;
        }
        for (t, target) in agent_targets.iter().enumerate() {
            let (run, backing) = runtime.block_on(agent_load(pod_ip, target));
            if let Some(backing) = backing {
                backing_cpu.push(backing.as_secs_f64() * 1e6 / run.latencies.len().max(1) as f64);
            }
            agent_runs[t].push(run);
        }
    }
    drop(floor);

    println!(
        "{} on {}: {MEASURE:?} per run, {ROUNDS} interleaved rounds \
         (medians over the rounds; ratios paired within each round)",
        latency::today(),
        latency::machine()
    );
    for (in_flight, per_target) in IN_FLIGHT.iter().zip(&rpc_runs) {
        let rows: Vec<(&str, &[Run])> = rpc_targets
            .iter()
            .zip(per_target)
            .map(|(target, runs)| (target.name, runs.as_slice()))
            .collect();
        println!("\n{}\n", rpc_title(*in_flight));
        print!("{}", latency::table("calls/s", &rows));
    }
    let rows: Vec<(&str, &[Run])> = agent_targets
        .iter()
        .zip(&agent_runs)
        .map(|(target, runs)| (target.name, runs.as_slice()))
        .collect();
    if rpc_only {
        return;
    }
    println!("\n{}\n", AGENT_TITLE);
    print!("{}", latency::table("req/s", &rows));
    backing_cpu.sort_by(f64::total_cmp);
    println!(
        "\n(the first row is the baseline; CPU is the agent's own.) Each server-backed hit also \
         cost iamlet server {:.1} µs of CPU (median over the rounds).",
        backing_cpu[backing_cpu.len() / 2]
    );

    let counts = runtime.block_on(count_rpcs(&kube, &pki, &server, &backed));
    println!("\n(C) RPCs answered by iamlet server (iamlet_server_calls_total, every code)\n");
    println!("| requests at the server-backed agent | GetPodRole | GetPodCredentials |");
    println!("|---|---:|---:|");
    for count in &counts {
        println!(
            "| {} | {} | {} |",
            count.what, count.pod_role, count.pod_credentials
        );
    }

    let last = IN_FLIGHT.len() - 1;
    let rpc_panel = rpc_title(IN_FLIGHT[last]);
    let panels = [
        Panel {
            title: &rpc_panel,
            curves: curves(&rpc_targets.each_ref().map(|t| t.name), &rpc_runs[last]),
        },
        Panel {
            title: AGENT_TITLE,
            curves: curves(&agent_targets.each_ref().map(|t| t.name), &agent_runs),
        },
    ];
    let picture = support::repo().join("docs/bench/server_path.svg");
    latency::percentile_plot(
        &picture,
        "The server-backed path: latency by percentile (the round of median throughput)",
        &panels,
    )
    .expect("draw the picture");
    println!("\nlatency by percentile drawn to {}", picture.display());
}

const AGENT_TITLE: &str = "(B) credential GETs at the agent, keep-alive, warm";

fn rpc_title(in_flight: usize) -> String {
    format!("(A) warm GetPodCredentials over mutual TLS, {in_flight} in flight")
}

fn curves<'a>(names: &[&'a str], runs: &'a [Vec<Run>]) -> Vec<Curve<'a>> {
    names
        .iter()
        .zip(runs)
        .zip([latency::FLOOR, latency::FIRST])
        .map(|((name, runs), color)| Curve {
            name,
            color,
            run: latency::median(runs),
        })
        .collect()
}

fn credentials_request() -> GetPodCredentialsRequest {
    GetPodCredentialsRequest {
        ip: POD_IP.into(),
        role: ROLE.into(),
    }
}

/// `iamlet server` watching `kube` cluster-wide, with STS at `sts`, logging at info.
fn start_server(dir: &Path, pki: &Pki, kube: &FakeKube, sts: &str) -> Iamlet {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kube.kubeconfig("iamlet-token")).expect("kubeconfig");
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\nstatus_socket = \"{}\"\n\n\
             [aws]\nregion = \"us-east-1\"\nsts_endpoint = \"{sts}\"\nbase_role_arn = \"{BASE_ROLE_ARN}\"\n\n\
             [pods]\nsource = \"kubernetes\"\n",
            pki.path("tls.crt").display(),
            pki.path("tls.key").display(),
            pki.path("ca.crt").display(),
            dir.join("status.sock").display(),
        ),
    )
    .expect("config");
    Iamlet::start_server_logging(
        &config,
        &dir.join("server.log"),
        "info",
        &[("KUBECONFIG".into(), kubeconfig.display().to_string())],
    )
}

/// One run of warm `GetPodCredentials` calls against `target`, `in_flight` at once.
async fn rpc_load(pki: &Pki, target: &RpcTarget, in_flight: usize) -> Run {
    let mut channels = Vec::new();
    for _ in 0..in_flight.min(CONNECTIONS) {
        channels.push(pki.channel(target.addr).await);
    }
    let window = Window::new(WARM_UP, MEASURE);
    let workers = (0..in_flight).map(|i| {
        let mut client = KiamServiceClient::new(channels[i % channels.len()].clone());
        async move {
            let mut latencies = Vec::new();
            while window.open(Instant::now()) {
                let sent = Instant::now();
                let answer = client
                    .get_pod_credentials(credentials_request())
                    .await
                    .expect("GetPodCredentials");
                assert_eq!(answer.get_ref().code, "Success");
                window.keep(sent, &mut latencies);
            }
            latencies
        }
    });
    latency::drive(window, target.pid, workers).await
}

/// One run of credential GETs with keep-alive at `target` from `WORKERS` clients at `from`,
/// and the CPU time the process behind it (if any) spent over the same window.
async fn agent_load(from: IpAddr, target: &AgentTarget) -> (Run, Option<Duration>) {
    let window = Window::new(WARM_UP, MEASURE);
    let measure_from = tokio::time::Instant::now() + WARM_UP;
    let backing = target.backing.map(|pid| {
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from).await;
            let before = latency::cpu_time(pid);
            tokio::time::sleep_until(measure_from + MEASURE).await;
            latency::cpu_time(pid).saturating_sub(before)
        })
    });
    let to = target.addr;
    let workers = (0..WORKERS).map(|_| async move {
        let mut latencies = Vec::new();
        let mut sender = connect(from, to).await;
        while window.open(Instant::now()) {
            let sent = Instant::now();
            get(&mut sender, CREDENTIALS, None).await;
            window.keep(sent, &mut latencies);
        }
        latencies
    });
    let run = latency::drive(window, target.pid, workers).await;
    let backing = match backing {
        Some(task) => Some(task.await.expect("CPU sampler")),
        None => None,
    };
    (run, backing)
}

/// An HTTP/1.1 connection from `from` to `to`, driven in the background.
async fn connect(from: IpAddr, to: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind");
    socket.set_nodelay(true).expect("nodelay");
    let stream = socket.connect(to).await.expect("connect");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    sender
}

/// A request that must be answered 200; the body.
async fn send(
    sender: &mut SendRequest<Empty<Bytes>>,
    request: hyper::http::request::Builder,
) -> Bytes {
    let request = request
        .header("host", "169.254.169.254")
        .body(Empty::new())
        .expect("request");
    sender.ready().await.expect("connection ready");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200, "{response:?}");
    response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
}

async fn get(sender: &mut SendRequest<Empty<Bytes>>, path: &str, token: Option<&str>) -> Bytes {
    let mut request = Request::get(path);
    if let Some(token) = token {
        request = request.header(TOKEN_HEADER, token);
    }
    send(sender, request).await
}

/// What some requests at the agent cost in calls answered by iamlet server.
struct Count {
    what: String,
    pod_role: f64,
    pod_credentials: f64,
}

/// iamlet server's count of answered calls of `method`, every code.
async fn server_calls(server: &Iamlet, method: &str) -> f64 {
    let reply = support::http::get(server.admin.ip(), server.admin, "/metrics", None).await;
    assert_eq!(reply.status, 200);
    let series = format!("{SERVER_CALLS}{{method=\"{method}\",");
    reply
        .body
        .lines()
        .filter(|line| line.starts_with(&series))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The calls iamlet server answered while `requests` ran, divided by `per`.
async fn counted<F: std::future::Future<Output = ()>>(
    server: &Iamlet,
    what: String,
    per: f64,
    requests: F,
) -> Count {
    let role_before = server_calls(server, "GetPodRole").await;
    let credentials_before = server_calls(server, "GetPodCredentials").await;
    requests.await;
    Count {
        what,
        pod_role: (server_calls(server, "GetPodRole").await - role_before) / per,
        pod_credentials: (server_calls(server, "GetPodCredentials").await - credentials_before)
            / per,
    }
}

/// (C): the calls a warm hit costs, and those a new pod's first request costs: a pod the
/// server knows (it answered GetPodRole for it, before counting) and the agent has not seen.
async fn count_rpcs(kube: &FakeKube, pki: &Pki, server: &Iamlet, agent: &Iamlet) -> Vec<Count> {
    const HITS: usize = 200;
    let pod_ip: IpAddr = POD_IP.parse().expect("ip");
    let mut counts = vec![
        counted(
            server,
            format!("a warm credential GET (mean of {HITS}, keep-alive)"),
            HITS as f64,
            async {
                let mut sender = connect(pod_ip, agent.imds).await;
                for _ in 0..HITS {
                    get(&mut sender, CREDENTIALS, None).await;
                }
            },
        )
        .await,
    ];
    let client = KiamServiceClient::new(pki.channel(server.grpc).await);
    for (ip, sdk) in [("127.0.0.3", false), ("127.0.0.4", true)] {
        let name = format!("web-{ip}");
        kube.apply_pod(pod("shop", &name, &name, "node-1", ip, Some(ROLE)));
        let known = || {
            let mut client = client.clone();
            async move {
                let request = GetPodRoleRequest { ip: ip.into() };
                client
                    .get_pod_role(request)
                    .await
                    .is_ok_and(|role| role.get_ref().name == ROLE)
            }
        };
        support::eventually("iamlet server knows the new pod", WITHIN, known).await;
        let from: IpAddr = ip.parse().expect("ip");
        let what = if sdk {
            "a new pod's SDK sequence: PUT token, GET listing, GET credentials"
        } else {
            "a new pod's first request: one credential GET"
        };
        let count = counted(server, what.into(), 1.0, async {
            let mut sender = connect(from, agent.imds).await;
            if sdk {
                let put = Request::put(TOKEN_PATH).header(TTL_HEADER, "21600");
                let token = send(&mut sender, put).await;
                let token = std::str::from_utf8(&token).expect("token");
                let role = get(&mut sender, LISTING, Some(token)).await;
                let role = std::str::from_utf8(&role).expect("role");
                get(&mut sender, &format!("{LISTING}{role}"), Some(token)).await;
            } else {
                get(&mut sender, CREDENTIALS, None).await;
            }
        })
        .await;
        counts.push(count);
    }
    counts
}

/// The floor's service: fixed answers, nothing looked up.
struct FloorService {
    credentials: Credentials,
}

#[tonic::async_trait]
impl KiamService for FloorService {
    async fn get_pod_role(
        &self,
        _request: tonic::Request<GetPodRoleRequest>,
    ) -> Result<tonic::Response<Role>, tonic::Status> {
        Ok(tonic::Response::new(Role { name: ROLE.into() }))
    }

    async fn get_pod_credentials(
        &self,
        _request: tonic::Request<GetPodCredentialsRequest>,
    ) -> Result<tonic::Response<Credentials>, tonic::Status> {
        Ok(tonic::Response::new(self.credentials.clone()))
    }

    async fn get_health(
        &self,
        _request: tonic::Request<GetHealthRequest>,
    ) -> Result<tonic::Response<HealthStatus>, tonic::Status> {
        Ok(tonic::Response::new(HealthStatus {
            message: "ok".into(),
        }))
    }
}

/// The floor: tonic's server on a multi-threaded runtime, with the server certificate and
/// client certificates required from the CA (tonic's rustls, as iamlet server's), answering
/// with the message in `DIR`.
fn serve_floor(args: &[String]) {
    let [port, dir] = args else {
        panic!("{FLOOR_FLAG} PORT DIR");
    };
    latency::exit_with_benchmark();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = Path::new(dir);
    let read = |name: &str| std::fs::read(dir.join(name)).expect("floor file");
    let credentials = Credentials::decode(read(FLOOR_MESSAGE).as_slice()).expect("message");
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(Identity::from_pem(read("tls.crt"), read("tls.key")))
        .client_ca_root(Certificate::from_pem(read("ca.crt")));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        tonic::transport::Server::builder()
            .tls_config(tls)
            .expect("tls")
            .add_service(KiamServiceServer::new(FloorService { credentials }))
            .serve(addr)
            .await
            .expect("serve");
    });
}
