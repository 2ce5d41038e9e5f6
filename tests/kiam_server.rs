//! `iamlet server` end to end, on the real kube-apiserver: pods on several nodes, the server
//! under the RBAC deploy/ ships for it, and two kinds of client. One shares no code with
//! iamlet: Python grpcio stubs generated from the repository's `kiam.proto`
//! (tests/py/kiam_client.py), which checks answers and exact error texts as kiam agents see
//! them. The other is iamlet's own agent in server-backed mode, with no AWS credentials, no
//! API access and no node IMDS, serving a real SDK.

mod support;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use serde_json::{Value, json};
use support::apiserver::{self, SERVER_TOKEN, STRANGER_TOKEN, create_namespace, run_pod};
use support::http::{get, ip};
use support::iamlet::Iamlet;
use support::pki::Ca;
use support::{eventually, moto, rust_sdk, sts_front};

const WITHIN: Duration = Duration::from_secs(30);
const ACCOUNT_BASE: &str = "arn:aws:iam::123456789012:role/";
/// The DNS names on the server's certificate (DNS only, as cert-manager issues them).
const SERVER_NAMES: [&str; 2] = ["iamlet-server.test", "localhost"];

/// The certificates of one test: a CA, the server's certificate and a client's, as files.
struct Pki {
    ca: Ca,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki {
            ca: Ca::new("iamlet-test-ca"),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        std::fs::write(pki.path("ca.crt"), pki.ca.pem()).expect("ca");
        pki.issue_server(&SERVER_NAMES);
        let client = pki.ca.client("iamlet-agent");
        std::fs::write(pki.path("client.crt"), client.cert_pem).expect("client cert");
        std::fs::write(pki.path("client.key"), client.key_pem).expect("client key");
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a new server certificate for `names`, as cert-manager does on renewal.
    fn issue_server(&self, names: &[&str]) {
        let server = self.ca.server(names);
        std::fs::write(self.path("tls.key"), server.key_pem).expect("key");
        std::fs::write(self.path("tls.crt"), server.cert_pem).expect("cert");
    }
}

/// A running `iamlet server` and what it was started with.
struct Server {
    iamlet: Iamlet,
    pki: Pki,
    _dir: tempfile::TempDir,
}

fn start_server(token: &str, sts: &str, extra: &str) -> Server {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n\
             reload_interval = \"200ms\"\n{extra}\n\
             [admin]\nlisten = \"127.0.0.1:0\"\nstatus_socket = \"{}\"\n\n\
             [aws]\nregion = \"us-east-1\"\nsts_endpoint = \"{sts}\"\nbase_role_arn = \"{ACCOUNT_BASE}\"\n",
            pki.path("tls.crt").display(),
            pki.path("tls.key").display(),
            pki.path("ca.crt").display(),
            dir.path().join("status.sock").display(),
        ),
    )
    .expect("config");
    let kubeconfig = apiserver::shared().kubeconfig(token);
    let iamlet = Iamlet::start_server(
        &config,
        &dir.path().join("server.log"),
        &[("KUBECONFIG".into(), kubeconfig.display().to_string())],
    );
    Server {
        iamlet,
        pki,
        _dir: dir,
    }
}

impl Server {
    async fn wait_ready(&self) {
        eventually("iamlet server is ready", WITHIN, || self.iamlet.ready()).await;
    }

    /// Runs `calls` through the Python client, presenting `identity` (certificate and key
    /// files) or none, trusting `ca` and checking the server's certificate for `name`.
    fn python(
        &self,
        calls: &Value,
        name: &str,
        ca: &Path,
        identity: Option<(&Path, &Path)>,
    ) -> Vec<Value> {
        let repo = support::repo();
        let mut command = Command::new(support::peer_program("python3"));
        command
            .arg(repo.join("tests/py/kiam_client.py"))
            .arg(repo.join("src/kiam"))
            .arg(self.iamlet.grpc.to_string())
            .arg(name)
            .arg(ca);
        if let Some((cert, key)) = identity {
            command.arg(cert).arg(key);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the Python kiam client");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin
                .write_all(calls.to_string().as_bytes())
                .expect("write calls");
        }
        let out = child.wait_with_output().expect("python");
        assert!(
            out.status.success(),
            "the Python client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON results")
    }

    /// As [`Server::python`], as a kiam agent with this test's client certificate.
    fn kiam_agent(&self, calls: Value) -> Vec<Value> {
        self.python(
            &calls,
            SERVER_NAMES[0],
            &self.pki.path("ca.crt"),
            Some((&self.pki.path("client.crt"), &self.pki.path("client.key"))),
        )
    }
}

fn unknown(details: &str) -> Value {
    json!({"code": "UNKNOWN", "details": details})
}

fn is_kiam_time(text: &str) -> bool {
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time::PrimitiveDateTime::parse(text, &format).is_ok()
}

fn seconds_until(text: &str) -> i64 {
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    let at = time::PrimitiveDateTime::parse(text, &format)
        .expect("time")
        .assume_utc();
    (at - time::OffsetDateTime::now_utc()).whole_seconds()
}

/// The caller ARN STS sees for credentials a kiam client was given.
async fn caller(credentials: &Value) -> String {
    let config = aws_sdk_sts::config::Builder::new()
        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
        .region(aws_sdk_sts::config::Region::new("us-east-1"))
        .endpoint_url(moto::shared().url())
        .http_client(rust_sdk::http_client())
        .credentials_provider(aws_sdk_sts::config::Credentials::new(
            credentials["access_key_id"].as_str().expect("key"),
            credentials["secret_access_key"].as_str().expect("secret"),
            credentials["token"].as_str().map(str::to_owned),
            None,
            "kiam-test",
        ))
        .build();
    aws_sdk_sts::Client::from_conf(config)
        .get_caller_identity()
        .send()
        .await
        .expect("GetCallerIdentity")
        .arn
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kiam_client_gets_kiam_v4_answers_for_pods_on_every_node() {
    require_apiserver!();
    let admin = apiserver::shared().admin().await;
    create_namespace(&admin, "srv-a", Some(&format!("{ACCOUNT_BASE}srv-.*"))).await;
    create_namespace(&admin, "srv-b", None).await;
    let job_arn = format!("{ACCOUNT_BASE}srv-job");
    for (namespace, name, node, pod_ip, role) in [
        ("srv-a", "web", "node-1", "10.61.0.1", Some("srv-web")),
        (
            "srv-a",
            "job",
            "node-2",
            "10.61.0.2",
            Some(job_arn.as_str()),
        ),
        ("srv-a", "plain", "node-3", "10.61.0.3", None),
        ("srv-b", "other", "node-1", "10.61.0.4", Some("srv-web")),
        ("srv-a", "greedy", "node-2", "10.61.0.5", Some("admin")),
    ] {
        run_pod(&admin, namespace, name, node, pod_ip, role, false).await;
    }
    let front = sts_front::start(([127, 0, 0, 1], 0).into(), moto::shared().addr);
    let server = start_server(SERVER_TOKEN, &front.url(), "");
    server.wait_ready().await;
    // Prefetched, as in the agent: each permitted identity is fetched before it is asked for.
    eventually(
        "both permitted identities are prefetched",
        WITHIN,
        || async {
            front.assume_role_calls("srv-web") == 1 && front.assume_role_calls("srv-job") == 1
        },
    )
    .await;

    let answers = server.kiam_agent(json!([
        {"method": "GetHealth"},
        {"method": "GetPodRole", "ip": "10.61.0.1"},
        {"method": "GetPodRole", "ip": "10.61.0.2"},
        {"method": "GetPodRole", "ip": "10.61.0.3"},
        {"method": "GetPodRole", "ip": "10.61.9.9"},
        {"method": "GetPodCredentials", "ip": "10.61.0.1", "role": "srv-web"},
        {"method": "GetPodCredentials", "ip": "10.61.0.2", "role": job_arn},
        {"method": "GetPodCredentials", "ip": "10.61.0.1", "role": "srv-job"},
        {"method": "GetPodCredentials", "ip": "10.61.0.4", "role": "srv-web"},
        {"method": "GetPodCredentials", "ip": "10.61.0.5", "role": "admin"},
        {"method": "GetPodCredentials", "ip": "10.61.0.3", "role": ""},
        {"method": "GetPodCredentials", "ip": "10.61.9.9", "role": "srv-web"},
    ]));
    assert_eq!(answers[0], json!({"ok": {"message": "ok"}}));
    // GetPodRole: the annotation exactly as written, empty without one.
    assert_eq!(answers[1], json!({"ok": {"name": "srv-web"}}));
    assert_eq!(answers[2], json!({"ok": {"name": job_arn}}));
    assert_eq!(answers[3], json!({"ok": {"name": ""}}));
    assert_eq!(answers[4], unknown("pod not found"));
    for (answer, want) in [
        (&answers[5], "assumed-role/srv-web/srv-a.default"),
        (&answers[6], "assumed-role/srv-job/srv-a.default"),
    ] {
        let credentials = &answer["ok"];
        assert_eq!(credentials["code"], "Success", "{answer}");
        assert_eq!(credentials["type"], "AWS-HMAC");
        for field in ["expiration", "last_updated"] {
            let text = credentials[field].as_str().expect("time");
            assert!(is_kiam_time(text), "{field} {text:?}");
        }
        let left = seconds_until(credentials["expiration"].as_str().expect("expiration"));
        assert!(left > 30 * 60, "only {left}s left");
        let arn = caller(credentials).await;
        assert!(arn.ends_with(want), "{arn}");
    }
    // Another pod's role, an unannotated namespace, a role the namespace does not permit, a
    // pod without a role: forbidden, not retried by agents.
    for answer in &answers[7..=10] {
        assert_eq!(answer, &unknown("forbidden by policy"));
    }
    assert_eq!(answers[11], unknown("no pod found"));
    // Both answers came from the cache: no STS call on the request path.
    assert_eq!(
        (
            front.assume_role_calls("srv-web"),
            front.assume_role_calls("srv-job")
        ),
        (1, 1)
    );
    assert_eq!(
        server
            .iamlet
            .metric("iamlet_credential_cache_misses_total")
            .await,
        0.0
    );
    assert!(
        front.assume_role_calls("admin") == 0,
        "a denied role reached STS"
    );

    // Denials are counted and reported on the pod, as in the agent.
    assert!(
        server
            .iamlet
            .metric("iamlet_policy_denials_total{reason=\"not_permitted\"}")
            .await
            >= 1.0
    );
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(admin.clone(), "srv-a");
    eventually("an IamRoleForbidden Event on srv-a/greedy", WITHIN, || {
        let events = events.clone();
        async move {
            events
                .list(&Default::default())
                .await
                .map(|list| {
                    list.items.iter().any(|event| {
                        event.reason.as_deref() == Some("IamRoleForbidden")
                            && event.involved_object.name.as_deref() == Some("greedy")
                    })
                })
                .unwrap_or(false)
        }
    })
    .await;
    assert!(
        server
            .iamlet
            .metric("iamlet_server_calls_total{method=\"GetPodCredentials\",code=\"ok\"}")
            .await
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_without_a_certificate_or_from_another_ca_are_refused_at_the_handshake() {
    require_apiserver!();
    let server = start_server(SERVER_TOKEN, &moto::shared().url(), "");
    server.wait_ready().await;
    let health = json!([{"method": "GetHealth"}]);
    let ca = server.pki.path("ca.crt");

    let anonymous = server.python(&health, SERVER_NAMES[0], &ca, None);
    assert_eq!(anonymous[0]["code"], "UNAVAILABLE", "{anonymous:?}");

    let stranger = Ca::new("another-ca").client("iamlet-agent");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("c.crt"), stranger.cert_pem).expect("cert");
    std::fs::write(dir.path().join("c.key"), stranger.key_pem).expect("key");
    let foreign = server.python(
        &health,
        SERVER_NAMES[0],
        &ca,
        Some((&dir.path().join("c.crt"), &dir.path().join("c.key"))),
    );
    assert_eq!(foreign[0]["code"], "UNAVAILABLE", "{foreign:?}");
    assert!(
        server.iamlet.log().contains("TLS handshake refused"),
        "{}",
        server.iamlet.log()
    );
    assert_eq!(
        server
            .iamlet
            .metric("iamlet_server_calls_total{method=\"GetHealth\",code=\"ok\"}")
            .await,
        0.0,
        "a refused client reached the service"
    );
    // And a proper client is still served.
    assert_eq!(
        server.kiam_agent(health)[0],
        json!({"ok": {"message": "ok"}})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_server_certificate_is_used_without_a_restart() {
    require_apiserver!();
    let server = start_server(SERVER_TOKEN, &moto::shared().url(), "");
    server.wait_ready().await;
    let health = json!([{"method": "GetHealth"}]);
    let identity = (server.pki.path("client.crt"), server.pki.path("client.key"));
    let ask_as = |name: &str| {
        server.python(
            &health,
            name,
            &server.pki.path("ca.crt"),
            Some((&identity.0, &identity.1)),
        )
    };
    // The certificate in use does not name rotated.test yet.
    assert_eq!(ask_as("rotated.test")[0]["code"], "UNAVAILABLE");
    server.pki.issue_server(&["rotated.test"]);
    eventually("the renewed certificate is served", WITHIN, || async {
        ask_as("rotated.test")[0] == json!({"ok": {"message": "ok"}})
    })
    .await;
    assert!(server.iamlet.log().contains("server certificates changed"));
}

#[tokio::test(flavor = "multi_thread")]
async fn get_health_is_ok_only_once_the_watches_are_synced() {
    require_apiserver!();
    // A token without RBAC: the lists never arrive.
    let server = start_server(STRANGER_TOKEN, &moto::shared().url(), "");
    let answers = server.kiam_agent(json!([{"method": "GetHealth"}]));
    assert_eq!(answers[0]["code"], "UNAVAILABLE", "{answers:?}");
    assert!(!server.iamlet.ready().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn assume_role_arn_is_assumed_first_and_signs_every_assume_role() {
    require_apiserver!();
    let admin = apiserver::shared().admin().await;
    create_namespace(
        &admin,
        "srv-chain",
        Some(&format!("{ACCOUNT_BASE}chain-.*")),
    )
    .await;
    run_pod(
        &admin,
        "srv-chain",
        "app",
        "node-4",
        "10.62.0.1",
        Some("chain-app"),
        false,
    )
    .await;
    let front = sts_front::start(([127, 0, 0, 1], 0).into(), moto::shared().addr);
    let server_role = format!("{ACCOUNT_BASE}iamlet-server-role");
    let server = start_server(
        SERVER_TOKEN,
        &front.url(),
        &format!("assume_role_arn = \"{server_role}\""),
    );
    server.wait_ready().await;
    let answers = server.kiam_agent(json!([
        {"method": "GetPodCredentials", "ip": "10.62.0.1", "role": "chain-app"},
    ]));
    assert_eq!(answers[0]["ok"]["code"], "Success", "{answers:?}");
    assert!(
        caller(&answers[0]["ok"])
            .await
            .ends_with("assumed-role/chain-app/srv-chain.default")
    );

    let signers = front.signers();
    let issued = front.issued();
    // The server's role: assumed once, with iamlet's own credentials.
    let own: Vec<_> = signers
        .iter()
        .filter(|(arn, _)| *arn == server_role)
        .collect();
    assert_eq!(own.len(), 1, "{signers:?}");
    assert_eq!(own[0].1, "AKIDNODEOWN");
    let server_key = issued
        .iter()
        .find(|(arn, _)| *arn == server_role)
        .map(|(_, key)| key.clone())
        .expect("the server role was issued credentials");
    // Every pod role: assumed with the server role's credentials.
    let pods: Vec<_> = signers
        .iter()
        .filter(|(arn, _)| *arn != server_role)
        .collect();
    assert!(!pods.is_empty());
    for (arn, key) in pods {
        assert_eq!(key, &server_key, "{arn} was assumed as {key}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_knows_nothing_serves_a_real_sdk_through_iamlet_server() {
    require_apiserver!();
    let admin = apiserver::shared().admin().await;
    create_namespace(&admin, "srv-e2e", Some(&format!("{ACCOUNT_BASE}e2e-.*"))).await;
    // This test process is the pod, at 127.0.0.1, on a node of its own.
    run_pod(
        &admin,
        "srv-e2e",
        "web",
        "node-5",
        "127.0.0.1",
        Some("e2e-web"),
        false,
    )
    .await;
    let server = start_server(SERVER_TOKEN, &moto::shared().url(), "");
    server.wait_ready().await;

    // The agent: no [aws] section, no [pods], no AWS credentials or KUBECONFIG in its
    // environment, and a node IMDS that does not answer.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[imds]\nlisten = \"127.0.0.1:{}\"\ntoken_key_file = \"{}\"\nupstream = \"http://127.0.0.1:9\"\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\nstatus_socket = \"{}\"\n\n\
             [kiam]\nserver = \"localhost:{}\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n\
             request_deadline = \"2s\"\n",
            support::free_port(),
            dir.path().join("token.key").display(),
            dir.path().join("status.sock").display(),
            server.iamlet.grpc.port(),
            server.pki.path("client.crt").display(),
            server.pki.path("client.key").display(),
            server.pki.path("ca.crt").display(),
        ),
    )
    .expect("config");
    let agent = Iamlet::start_bare(&config, &dir.path().join("agent.log"));
    eventually("the agent is ready", WITHIN, || agent.ready()).await;

    let imds = format!("http://{}", agent.imds);
    let arn = rust_sdk::caller_identity(&imds, &moto::shared().url())
        .await
        .expect("the SDK got credentials");
    assert!(
        arn.ends_with("assumed-role/e2e-web/srv-e2e.default"),
        "{arn}"
    );
    let role = get(
        ip("127.0.0.1"),
        agent.imds,
        "/latest/meta-data/iam/security-credentials/",
        None,
    )
    .await;
    assert_eq!((role.status, role.body.as_str()), (200, "e2e-web"));

    // The pod goes: the server forgets its IP, and the agent stops serving it.
    Api::<Pod>::namespaced(admin.clone(), "srv-e2e")
        .delete("web", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete");
    eventually(
        "the deleted pod's IP is unknown to the server",
        WITHIN,
        || async {
            server.kiam_agent(json!([
                {"method": "GetPodCredentials", "ip": "127.0.0.1", "role": "e2e-web"},
            ]))[0]
                == unknown("no pod found")
        },
    )
    .await;
    let gone = get(
        IpAddr::from([127, 0, 0, 1]),
        agent.imds,
        "/latest/meta-data/iam/security-credentials/",
        None,
    )
    .await;
    assert_eq!(gone.status, 404, "{}", gone.body);
    assert!(
        !agent.log().contains("AKIDNODEOWN"),
        "the agent had AWS credentials of its own"
    );
}
