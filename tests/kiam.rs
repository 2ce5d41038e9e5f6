//! Server-backed mode against a fake kiam server (tonic, mutual TLS, certificates made here):
//! the happy path with a real SDK, policy refusals, retries within the deadline (with both of
//! kiam's wordings of an unknown pod), a server that starts late or restarts, certificate
//! rotation, certificates that must be refused, balancing over every address behind the
//! server name, and by latency: a distant server (behind a delaying proxy) gets few calls
//! until the near one stops.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::delay_proxy::DelayProxy;
use support::fake_kiam::{Answer, FakeKiam, Script, ServerTls};
use support::http::{get, ip};
use support::iamlet::{Iamlet, Setup};
use support::pki::Ca;
use support::{eventually, moto, rust_sdk};

const WITHIN: Duration = Duration::from_secs(20);
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

/// A CA, the client certificate iamlet presents, and the files iamlet reads them from.
struct Pki {
    ca: Ca,
    dir: tempfile::TempDir,
    client_der: Vec<u8>,
}

impl Pki {
    fn new() -> Pki {
        let ca = Ca::new("kiam-test-ca");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("ca");
        let mut pki = Pki {
            ca,
            dir,
            client_der: Vec::new(),
        };
        pki.rotate_client("iamlet-agent-1");
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a new client certificate and key, as cert-manager would on rotation.
    fn rotate_client(&mut self, name: &str) {
        let client = self.ca.client(name);
        // Key first, then certificate: a reader between the two sees a mismatch and retries.
        std::fs::write(self.path("client.key"), client.key_pem).expect("key");
        std::fs::write(self.path("client.pem"), client.cert_pem).expect("cert");
        self.client_der = client.der;
    }

    fn server_tls(&self, ca: &Ca, names: &[&str]) -> ServerTls {
        let server = ca.server(names);
        ServerTls {
            cert_pem: server.cert_pem,
            key_pem: server.key_pem,
            client_ca_pem: self.ca.pem(),
        }
    }

    fn kiam_section(&self, server: &str, deadline: &str) -> String {
        format!(
            "[kiam]\nserver = \"{server}\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n\
             request_deadline = \"{deadline}\"\nreload_interval = \"200ms\"\nresolve_interval = \"1s\"\n",
            self.path("client.pem").display(),
            self.path("client.key").display(),
            self.path("ca.pem").display(),
        )
    }
}

fn start_iamlet(dir: &std::path::Path, kiam: String, netns: Option<String>) -> Iamlet {
    let setup = Setup {
        imds_listen: format!("127.0.0.1:{}", support::free_port()),
        extra: kiam,
        netns,
        ..Setup::default()
    };
    Iamlet::start(dir, &setup)
}

fn localhost(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

/// A fake kiam server on localhost answering role "web" for the pod at 127.0.0.1, and iamlet
/// in server-backed mode using it.
struct World {
    script: Script,
    iamlet: Iamlet,
    _server: FakeKiam,
    _dir: tempfile::TempDir,
}

impl World {
    fn start(pki: &Pki, server_tls: &ServerTls, deadline: &str) -> World {
        let script = Script::default();
        script.answer("127.0.0.1", Answer::Role("web".into()));
        let server = FakeKiam::start(
            localhost(0),
            server_tls,
            script.clone(),
            &moto::shared().url(),
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let server_name = format!("localhost:{}", server.addr.port());
        let iamlet = start_iamlet(dir.path(), pki.kiam_section(&server_name, deadline), None);
        World {
            script,
            iamlet,
            _server: server,
            _dir: dir,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_sdk_gets_its_role_through_the_kiam_server() {
    let pki = Pki::new();
    let World { script, iamlet, .. } =
        &World::start(&pki, &pki.server_tls(&pki.ca, &["localhost"]), "5s");
    eventually("ready once GetHealth answers", WITHIN, || iamlet.ready()).await;

    let imds = format!("http://{}", iamlet.imds);
    let arn = rust_sdk::caller_identity(&imds, &moto::shared().url()).await;
    assert_eq!(
        arn.as_deref(),
        Ok("arn:aws:sts::123456789012:assumed-role/web/kiam-fake")
    );
    // The agent's cache: more credential requests, no more GetPodCredentials.
    for _ in 0..3 {
        let reply = get(ip("127.0.0.1"), iamlet.imds, &format!("{CREDS}web"), None).await;
        assert_eq!(reply.json()["Code"], "Success");
    }
    assert_eq!(script.count("GetPodCredentials"), 1);
    // Every call came with the client certificate iamlet was given.
    assert!(
        script
            .calls()
            .iter()
            .all(|c| c.client_cert.as_deref() == Some(pki.client_der.as_slice()))
    );
    assert!(
        iamlet
            .metric("iamlet_kiam_calls_total{method=\"GetPodRole\",code=\"ok\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn forbidden_is_final_and_an_unknown_pod_is_retried_within_the_deadline() {
    let pki = Pki::new();
    let World { script, iamlet, .. } =
        &World::start(&pki, &pki.server_tls(&pki.ca, &["localhost"]), "1s");
    eventually("ready", WITHIN, || iamlet.ready()).await;
    script.answer("127.0.0.5", Answer::Forbidden);
    // Two requests of a 1 s deadline each fit before `later`.
    let later = Instant::now() + Duration::from_secs(4);
    // GetPodRole says "pod not found", as real kiam servers do.
    script.answer("127.0.0.6", Answer::NoPodUntil(later, "web".into()));
    // GetPodCredentials says "no pod found".
    script.answer("127.0.0.7", Answer::NoCredentialsUntil(later, "web".into()));
    let calls_for = |ip: &str, method: &str| {
        script
            .calls()
            .iter()
            .filter(|c| c.ip == ip && c.method == method)
            .count()
    };
    let unknown = "iamlet: no pod is known at this address";

    let denied = get(ip("127.0.0.5"), iamlet.imds, CREDS, None).await;
    assert_eq!(
        (denied.status, denied.body.trim()),
        (404, "iamlet: forbidden by policy")
    );
    assert_eq!(
        calls_for("127.0.0.5", "GetPodRole"),
        1,
        "forbidden was retried"
    );

    // Unknown for longer than the deadline: retried, then 404.
    let role = get(ip("127.0.0.6"), iamlet.imds, CREDS, None).await;
    assert_eq!((role.status, role.body.trim()), (404, unknown));
    assert!(
        calls_for("127.0.0.6", "GetPodRole") > 2,
        "pod not found was not retried"
    );
    let credentials = get(ip("127.0.0.7"), iamlet.imds, &format!("{CREDS}web"), None).await;
    assert_eq!(
        (credentials.status, credentials.body.trim()),
        (404, unknown)
    );
    assert!(
        calls_for("127.0.0.7", "GetPodCredentials") > 2,
        "no pod found was not retried"
    );
    // Once the server knows the pods: found.
    eventually("found once the server knows the pod", WITHIN, || async {
        let found = get(ip("127.0.0.6"), iamlet.imds, CREDS, None).await;
        (found.status, found.body.as_str()) == (200, "web")
    })
    .await;
    eventually(
        "credentials once the server knows the pod",
        WITHIN,
        || async {
            let found = get(ip("127.0.0.7"), iamlet.imds, &format!("{CREDS}web"), None).await;
            found.status == 200 && found.json()["Code"] == "Success"
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_starts_late_or_restarts_is_followed() {
    let pki = Pki::new();
    let script = Script::default();
    script.answer("127.0.0.1", Answer::Role("web".into()));
    let port = support::free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    // No server yet: iamlet starts anyway and says it is not ready.
    let iamlet = start_iamlet(
        dir.path(),
        pki.kiam_section(&format!("localhost:{port}"), "1s"),
        None,
    );
    let reply = get(ip("127.0.0.1"), iamlet.admin, "/readyz", None).await;
    assert_eq!(reply.status, 503);
    assert!(reply.body.contains("kiam"), "{}", reply.body);
    assert_eq!(
        get(ip("127.0.0.1"), iamlet.imds, CREDS, None).await.status,
        503
    );

    let tls = pki.server_tls(&pki.ca, &["localhost"]);
    let server = FakeKiam::start(localhost(port), &tls, script.clone(), &moto::shared().url());
    eventually("ready once the server is up", WITHIN, || iamlet.ready()).await;
    assert_eq!(
        get(ip("127.0.0.1"), iamlet.imds, CREDS, None).await.body,
        "web"
    );

    server.stop();
    eventually("not ready while it is down", WITHIN, || async {
        !iamlet.ready().await
    })
    .await;
    let server = FakeKiam::start(localhost(port), &tls, script.clone(), &moto::shared().url());
    eventually("served again after the restart", WITHIN, || async {
        get(ip("127.0.0.1"), iamlet.imds, CREDS, None).await.body == "web"
    })
    .await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_client_certificate_is_used_without_a_restart() {
    let mut pki = Pki::new();
    let World { script, iamlet, .. } =
        &World::start(&pki, &pki.server_tls(&pki.ca, &["localhost"]), "5s");
    eventually("ready", WITHIN, || iamlet.ready()).await;
    let first = pki.client_der.clone();
    pki.rotate_client("iamlet-agent-2");
    let second = pki.client_der.clone();
    eventually("a call with the rotated certificate", WITHIN, || async {
        get(ip("127.0.0.1"), iamlet.imds, CREDS, None).await;
        script
            .calls()
            .iter()
            .any(|c| c.client_cert.as_deref() == Some(second.as_slice()))
    })
    .await;
    assert_ne!(first, second);
    assert!(iamlet.log().contains("kiam certificates changed"));
}

/// iamlet must refuse a server whose certificate does not check out: it never becomes ready,
/// and no call reaches the server's handlers.
async fn refused_server(server_tls: ServerTls, pki: &Pki) {
    let World { script, iamlet, .. } = &World::start(pki, &server_tls, "1s");
    let reply = get(ip("127.0.0.1"), iamlet.imds, CREDS, None).await;
    assert_eq!(reply.status, 503, "{reply:?}");
    // Its health check has met the server and failed, and readiness follows health checks.
    eventually("a failed GetHealth against the server", WITHIN, || async {
        let metrics = get(iamlet.admin.ip(), iamlet.admin, "/metrics", None).await;
        metrics.body.lines().any(|line| {
            line.starts_with("iamlet_kiam_calls_total{method=\"GetHealth\",code=\"")
                && !line.contains("code=\"ok\"")
                && !line.ends_with(" 0")
        })
    })
    .await;
    assert!(!iamlet.ready().await);
    assert!(
        script.calls().is_empty(),
        "a call got through: {:?}",
        script.calls()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let stranger = Ca::new("someone-else");
    refused_server(pki.server_tls(&stranger, &["localhost"]), &pki).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_certificate_for_another_name_is_refused() {
    let pki = Pki::new();
    refused_server(pki.server_tls(&pki.ca, &["kiam.elsewhere.example"]), &pki).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_without_a_certificate_is_refused_by_the_server() {
    use iamlet::kiam::proto::{GetHealthRequest, kiam_service_client::KiamServiceClient};
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let pki = Pki::new();
    let script = Script::default();
    let server = FakeKiam::start(
        localhost(0),
        &pki.server_tls(&pki.ca, &["localhost"]),
        script.clone(),
        &moto::shared().url(),
    );
    let tls = ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(Certificate::from_pem(pki.ca.pem()));
    let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{}", server.addr.port()))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls");
    let outcome = match endpoint.connect().await {
        Ok(channel) => KiamServiceClient::new(channel)
            .get_health(GetHealthRequest {})
            .await
            .map(|_| ())
            .map_err(|s| s.to_string()),
        Err(err) => Err(err.to_string()),
    };
    assert!(
        outcome.is_err(),
        "a client without a certificate was served"
    );
    assert!(script.calls().is_empty());
}

/// `kiam.test:port` naming two addresses of this host, seen from a network namespace of its
/// own (its /etc/hosts): `near`, the namespace's gateway, and `far`, another address on the
/// same link. iamlet runs in the namespace.
struct TwoAddresses {
    net: support::netns::PodNet,
    near: SocketAddr,
    far: SocketAddr,
}

impl TwoAddresses {
    fn create() -> TwoAddresses {
        let net = support::netns::PodNet::create();
        let [a, b, c, _] = net.host_ip.octets();
        let far = Ipv4Addr::new(a, b, c, 200);
        net.add_host_address(far);
        net.ns
            .hosts(&format!("{} kiam.test\n{far} kiam.test\n", net.host_ip));
        let port = support::free_port();
        TwoAddresses {
            near: (IpAddr::V4(net.host_ip), port).into(),
            far: (IpAddr::V4(far), port).into(),
            net,
        }
    }

    fn start_iamlet(&self, pki: &Pki, dir: &std::path::Path) -> Iamlet {
        let server = format!("kiam.test:{}", self.near.port());
        start_iamlet(
            dir,
            pki.kiam_section(&server, "5s"),
            Some(self.net.ns.name.clone()),
        )
    }

    /// Runs `task` inside the namespace, where iamlet's ports are.
    fn run<F, Fut>(&self, task: F) -> Fut::Output
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future,
        Fut::Output: Send + 'static,
    {
        self.net.enter(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(task())
        })
    }
}

/// Waits (inside the namespace) until iamlet is ready.
async fn ready_in_netns(admin: SocketAddr) {
    eventually("ready", WITHIN, || async {
        get(ip("127.0.0.1"), admin, "/readyz", None).await.status == 200
    })
    .await;
}

/// Asks for the pod's credentials `times` times, one after the other; how often it got them.
async fn fetch_credentials(imds: SocketAddr, times: usize) -> usize {
    let mut served = 0;
    for _ in 0..times {
        let reply = get(ip("127.0.0.1"), imds, &format!("{CREDS}web"), None).await;
        if reply.status == 200 && reply.json()["Code"] == "Success" {
            served += 1;
        }
    }
    served
}

/// Calls (attempts) to the kiam servers that did not succeed, from iamlet's metrics.
async fn failed_attempts(admin: SocketAddr) -> f64 {
    let metrics = get(ip("127.0.0.1"), admin, "/metrics", None).await.body;
    metrics
        .lines()
        .filter(|line| {
            line.starts_with("iamlet_kiam_calls_total{") && !line.contains("code=\"ok\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A fake kiam server answering role "web" for the pod at 127.0.0.1.
fn web_server(bind: SocketAddr, tls: &ServerTls, script: &Script) -> FakeKiam {
    script.answer("127.0.0.1", Answer::Role("web".into()));
    FakeKiam::start(bind, tls, script.clone(), &moto::shared().url())
}

#[test]
fn every_address_behind_the_server_name_is_used() {
    require_netns!();
    let pki = Pki::new();
    let names = TwoAddresses::create();
    let tls = pki.server_tls(&pki.ca, &["kiam.test"]);
    let (one, two) = (Script::default(), Script::default());
    let _first = web_server(names.near, &tls, &one);
    let _second = web_server(names.far, &tls, &two);
    let dir = tempfile::tempdir().expect("tempdir");
    let iamlet = names.start_iamlet(&pki, dir.path());
    let (imds, admin) = (iamlet.imds, iamlet.admin);
    let served = names.run(move || async move {
        ready_in_netns(admin).await;
        fetch_credentials(imds, 40).await
    });
    assert_eq!(served, 40);
    // Every call counts, GetHealth too: the balancer tries each new address at once, and
    // then prefers the faster, which may be either.
    let (a, b) = (one.calls().len(), two.calls().len());
    assert!(
        a > 0 && b > 0,
        "one address was never used: {a} and {b} calls"
    );
}

/// The share of calls a server got: `(its calls, all calls)` between two counts.
fn share(server: (usize, usize), other: (usize, usize)) -> (usize, usize) {
    let got = server.1 - server.0;
    (got, got + other.1 - other.0)
}

#[test]
fn calls_stay_with_the_near_server_and_move_while_it_is_down() {
    require_netns!();
    let pki = Pki::new();
    let names = TwoAddresses::create();
    let tls = pki.server_tls(&pki.ca, &["kiam.test"]);
    let (near, far) = (Script::default(), Script::default());
    let near_server = web_server(names.near, &tls, &near);
    // The far server, reached through a proxy that delays every chunk by 40 ms each way, as
    // a server in another zone (or a slow one) would be.
    let far_server = web_server(localhost(0), &tls, &far);
    let _far_proxy = DelayProxy::start(names.far, far_server.addr, Duration::from_millis(40));
    let dir = tempfile::tempdir().expect("tempdir");
    let iamlet = names.start_iamlet(&pki, dir.path());
    let (imds, admin) = (iamlet.imds, iamlet.admin);
    let counts = || (near.calls().len(), far.calls().len());
    names.run(move || ready_in_netns(admin));

    // Both healthy: the near one gets (nearly) every call.
    let before = counts();
    let served = names.run(move || fetch_credentials(imds, 200));
    let after = counts();
    let (near_got, total) = share((before.0, after.0), (before.1, after.1));
    eprintln!(
        "both healthy: near {near_got}/{total}, far {}/{total}",
        total - near_got
    );
    assert_eq!(served, 200, "the pod did not always get its credentials");
    assert!(
        near_got * 10 >= total * 9,
        "the near server got {near_got} of {total} calls"
    );

    // The near one stops: the calls move to the far one at once, and the pod keeps getting
    // its credentials. (A balancer that found the dead server cheap, because it fails fast,
    // would try it first on every call.)
    near_server.stop();
    let failed_before = names.run(move || failed_attempts(admin));
    let before = counts();
    let served = names.run(move || fetch_credentials(imds, 50));
    let after = counts();
    let failed = names.run(move || failed_attempts(admin)) - failed_before;
    eprintln!(
        "near stopped: far got {} calls for 50 requests; {failed} failed attempts",
        after.1 - before.1
    );
    assert_eq!(served, 50, "the pod lost its credentials");
    assert!(after.1 - before.1 >= 50, "the far server missed calls");
    assert!(
        failed <= 2.0,
        "calls kept going to the stopped server: {failed} failed attempts"
    );

    // It comes back, and the calls with it.
    let _near_server = web_server(names.near, &tls, &near);
    let near_calls = near.clone();
    let returned = near.calls().len();
    names.run(move || async move {
        eventually("a call to the near server again", WITHIN, || async {
            fetch_credentials(imds, 1).await;
            near_calls.calls().len() > returned
        })
        .await;
    });
    let before = counts();
    let served = names.run(move || fetch_credentials(imds, 100));
    let after = counts();
    let (near_got, total) = share((before.0, after.0), (before.1, after.1));
    eprintln!(
        "near back: near {near_got}/{total}, far {}/{total}",
        total - near_got
    );
    assert_eq!(served, 100);
    assert!(
        near_got * 10 >= total * 9,
        "the near server got {near_got} of {total} calls after it came back"
    );
}
