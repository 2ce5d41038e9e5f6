//! The token front end to end on the real kube-apiserver: pods carry the wiring in their spec,
//! the test projects their tokens as the kubelet does (TokenRequest, bound to the pod, with the
//! volume's audience), and iamlet, under the RBAC deploy/ ships, checks each token against the
//! keys it fetched from `/openid/v1/jwks` and the pod it names against its own node's pods.
//! The client is raw HTTP here, so every answer is seen whole; the SDKs behind iptables are in
//! `tests/container_credentials_sdks.rs`.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};
use support::apiserver::{self, IAMLET_TOKEN, create_namespace};
use support::http::{Reply, get, ip, request_for};
use support::iamlet::{Iamlet, Setup};
use support::wired::{self, PodSpec, create_service_account, resign, run_pod};
use support::{eventually, moto, rust_sdk};

const WITHIN: Duration = Duration::from_secs(30);
const HOST: &str = "169.254.170.23";
const PATH: &str = "/v1/credentials";
const ROLES: &str = "arn:aws:iam::123456789012:role/";

/// iamlet for `node`, with the token front on loopback.
fn start_iamlet(dir: &std::path::Path, node: &str) -> Iamlet {
    let kubeconfig = apiserver::shared().kubeconfig(IAMLET_TOKEN);
    let setup = Setup {
        sts: moto::shared().url(),
        pods_source: "kubernetes".into(),
        env: vec![
            ("KUBECONFIG".into(), kubeconfig.display().to_string()),
            ("NODE_NAME".into(), node.into()),
        ],
        extra: "[container_credentials]\nenabled = true\nlisten = \"127.0.0.1:0\"\n".into(),
        ..Setup::default()
    };
    Iamlet::start(dir, &setup)
}

/// A GET of the credentials path with `token` (if any), from 127.0.0.1.
async fn ask(to: SocketAddr, token: Option<&str>) -> Reply {
    let headers: Vec<(&str, &str)> = token.map(|t| ("Authorization", t)).into_iter().collect();
    request_for(HOST, ip("127.0.0.1"), to, "GET", PATH, &headers).await
}

/// The token the kubelet projected for `namespace/name`, read from the file its SDK reads.
async fn projected(admin: &kube::Client, namespace: &str, name: &str) -> String {
    let root = tempfile::tempdir().expect("root");
    let env = wired::project(admin, namespace, name, root.path()).await;
    assert_eq!(
        env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")
            .map(String::as_str),
        Some(wired::FULL_URI)
    );
    std::fs::read_to_string(&env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]).expect("token file")
}

/// The caller ARN STS sees for a container-credentials document.
async fn caller(document: &Value) -> String {
    let config = aws_sdk_sts::config::Builder::new()
        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
        .region(aws_sdk_sts::config::Region::new("us-east-1"))
        .endpoint_url(moto::shared().url())
        .http_client(rust_sdk::http_client())
        .credentials_provider(aws_sdk_sts::config::Credentials::new(
            document["AccessKeyId"].as_str().expect("key"),
            document["SecretAccessKey"].as_str().expect("secret"),
            document["Token"].as_str().map(str::to_owned),
            None,
            "token-front-test",
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

fn assumed(role: &str, session: &str) -> String {
    format!("arn:aws:sts::123456789012:assumed-role/{role}/{session}")
}

/// Asserts a JSON error with `code`, and no credentials in it.
fn refused(reply: &Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{reply:?}");
    let body = reply.json();
    assert_eq!(body["Code"], code, "{reply:?}");
    assert!(body["Message"].as_str().is_some_and(|m| !m.is_empty()));
    for field in ["AccessKeyId", "SecretAccessKey", "Token"] {
        assert!(body.get(field).is_none(), "{field} in an error: {body}");
    }
}

fn pod<'a>(namespace: &'a str, name: &'a str, node: &'a str, ip: &'a str) -> PodSpec<'a> {
    PodSpec {
        namespace,
        name,
        node,
        ip,
        role: Some("tok-web"),
        service_account: "web",
        host_network: false,
        wired: true,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wired_pods_get_their_own_role_by_token_from_any_address() {
    require_apiserver!();
    let admin = apiserver::shared().admin().await;
    let (ns, node) = ("tok-good", "node-tok-good");
    create_namespace(&admin, ns, Some(&format!("{ROLES}tok-.*"))).await;
    for account in ["web", "agent"] {
        create_service_account(&admin, ns, account).await;
    }
    run_pod(&admin, &pod(ns, "web-0", node, "127.0.0.41")).await;
    run_pod(
        &admin,
        &PodSpec {
            role: Some("tok-agent"),
            service_account: "agent",
            host_network: true,
            ..pod(ns, "node-agent", node, "127.0.0.1")
        },
    )
    .await;
    run_pod(
        &admin,
        &PodSpec {
            wired: false,
            ..pod(ns, "legacy", node, "127.0.0.42")
        },
    )
    .await;

    let dir = tempfile::tempdir().expect("tempdir");
    let iamlet = start_iamlet(dir.path(), node);
    eventually("ready, with the cluster's keys", WITHIN, || iamlet.ready()).await;
    let front = iamlet.container_credentials;
    assert!(
        iamlet
            .log()
            .contains("trusting the cluster's service-account keys")
    );

    // The pod's own token: its own role, whatever address the request comes from.
    let token = projected(&admin, ns, "web-0").await;
    let reply = ask(front, Some(&token)).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let document = reply.json();
    assert_eq!(document["AccountId"], "123456789012");
    let expiration = document["Expiration"].as_str().expect("expiration");
    assert!(expiration.ends_with('Z') && !expiration.contains('.'));
    assert!(document.get("Code").is_none(), "the IMDS shape: {document}");
    assert_eq!(caller(&document).await, assumed("tok-web", "tok-good.web"));
    let elsewhere = request_for(
        HOST,
        ip("127.0.0.99"),
        front,
        "GET",
        PATH,
        &[("Authorization", &token)],
    )
    .await;
    assert_eq!(elsewhere.status, 200);
    // `Authorization: Bearer <token>` is accepted too.
    let bearer = format!("Bearer {token}");
    assert_eq!(ask(front, Some(&bearer)).await.status, 200);
    // As is the Host with its port.
    let with_port = request_for(
        "169.254.170.23:80",
        ip("127.0.0.1"),
        front,
        "GET",
        PATH,
        &[("Authorization", &token)],
    )
    .await;
    assert_eq!(with_port.status, 200);

    // A host-network pod, which IMDS never serves: its role by its token.
    let token = projected(&admin, ns, "node-agent").await;
    let reply = ask(front, Some(&token)).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        caller(&reply.json()).await,
        assumed("tok-agent", "tok-good.agent")
    );

    // A pod without the wiring keeps its role through IMDS.
    let imds = get(
        ip("127.0.0.42"),
        iamlet.imds,
        "/latest/meta-data/iam/security-credentials/",
        None,
    )
    .await;
    assert_eq!((imds.status, imds.body.as_str()), (200, "tok-web"));

    assert!(
        iamlet
            .metric(
                "iamlet_container_credentials_requests_total{route=\"credentials\",status=\"200\"}"
            )
            .await
            >= 5.0
    );
    // Every answer came from the cache, prefetched before iamlet said it was ready: also the
    // host-network pod's, which only the token front serves.
    assert_eq!(
        iamlet.metric("iamlet_credential_cache_misses_total").await,
        0.0
    );
    // Neither tokens nor credentials reach the log, and each request has its debug line.
    let log = iamlet.log();
    assert!(!log.contains(token.trim()), "a token in the log");
    assert!(!log.contains(&token[..40]), "part of a token in the log");
    let secret = document["SecretAccessKey"].as_str().expect("secret");
    assert!(!log.contains(secret), "a secret key in the log");
    assert!(log.contains("container credentials request"));
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .expect("epoch")
        .as_secs()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tokens_and_bad_requests_get_clear_refusals_and_no_credentials() {
    require_apiserver!();
    let server = apiserver::shared();
    let admin = server.admin().await;
    let (ns, node) = ("tok-bad", "node-tok-bad");
    create_namespace(&admin, ns, Some(&format!("{ROLES}tok-.*"))).await;
    create_service_account(&admin, ns, "web").await;
    let uid = run_pod(&admin, &pod(ns, "web-0", node, "127.0.0.51")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let iamlet = start_iamlet(dir.path(), node);
    eventually("ready, with the cluster's keys", WITHIN, || iamlet.ready()).await;
    let front = iamlet.container_credentials;
    let good = projected(&admin, ns, "web-0").await;
    assert_eq!(ask(front, Some(&good)).await.status, 200);

    let cluster_key = std::fs::read_to_string(server.signing_key()).expect("sa.key");
    let attacker_key = {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .output()
            .expect("openssl");
        String::from_utf8(out.stdout).expect("pem")
    };
    let now = support::wall_clock();
    let cases: Vec<(&str, String, &str)> = vec![
        // Signed by someone else under the cluster's key id.
        (
            "forged",
            resign(&good, &attacker_key, |_| {}),
            "does not verify",
        ),
        // The cluster's signature over other claims.
        (
            "tampered",
            {
                let forged = resign(&good, &cluster_key, |c| {
                    c["kubernetes.io"]["pod"]["name"] = json!("other")
                });
                let signature = good.rsplit_once('.').expect("dots").1;
                format!("{}.{signature}", forged.rsplit_once('.').expect("dots").0)
            },
            "does not verify",
        ),
        // Truly the cluster's, but expired.
        (
            "expired",
            resign(&good, &cluster_key, |c| {
                c["iat"] = json!(unix(now) - 7200);
                c["nbf"] = json!(unix(now) - 7200);
                c["exp"] = json!(unix(now) - 60);
            }),
            "expired",
        ),
        (
            "not yet valid",
            resign(&good, &cluster_key, |c| {
                c["nbf"] = json!(unix(now) + 600);
            }),
            "not valid yet",
        ),
        // A real token of the pod, for another audience (as for STS web identity).
        (
            "wrong audience",
            wired::mint(&admin, ns, "web", "web-0", &uid, "sts.amazonaws.com", 3600).await,
            "audience",
        ),
        (
            "another issuer",
            resign(&good, &cluster_key, |c| {
                c["iss"] = json!("https://evil.example")
            }),
            "issuer",
        ),
        ("garbage", "hello".to_owned(), "malformed"),
        ("oversized", "a".repeat(12 * 1024), "longer than"),
    ];
    let mut table = Vec::new();
    for (case, token, says) in &cases {
        let reply = ask(front, Some(token)).await;
        refused(&reply, 401, "InvalidToken");
        let message = reply.json()["Message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains(says), "{case}: {message}");
        table.push(format!("{case:16} {} {message}", reply.status));
    }
    eprintln!("{}", table.join("\n"));
    refused(&ask(front, None).await, 401, "MissingToken");
    refused(&ask(front, Some("Bearer")).await, 401, "MissingToken");
    for (reason, at_least) in [
        ("signature", 2.0),
        ("expired", 1.0),
        ("audience", 1.0),
        ("issuer", 1.0),
        ("not_yet_valid", 1.0),
        ("missing_token", 2.0),
    ] {
        let series = format!("iamlet_container_credentials_refusals_total{{reason=\"{reason}\"}}");
        assert!(iamlet.metric(&series).await >= at_least, "{series}");
    }

    // Names are refused (DNS rebinding), and so is anything but GET /v1/credentials.
    let token = [("Authorization", good.as_str())];
    let from = ip("127.0.0.1");
    for host in [
        "iamlet.example",
        "169.254.170.23.nip.io",
        "127.0.0.1",
        "localhost:8183",
    ] {
        let reply = request_for(host, from, front, "GET", PATH, &token).await;
        refused(&reply, 421, "InvalidHost");
    }
    refused(
        &request_for(
            HOST,
            from,
            front,
            "GET",
            "/latest/meta-data/iam/security-credentials/",
            &token,
        )
        .await,
        404,
        "NotFound",
    );
    let post = request_for(HOST, from, front, "POST", PATH, &token).await;
    refused(&post, 405, "MethodNotAllowed");
    assert_eq!(post.header("allow"), Some("GET"));
    assert_eq!(
        iamlet
            .metric("iamlet_container_credentials_requests_total{route=\"other\",status=\"404\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn valid_tokens_of_pods_this_node_must_not_serve_are_forbidden() {
    require_apiserver!();
    let admin = apiserver::shared().admin().await;
    let (ns, node) = ("tok-deny", "node-tok-deny");
    create_namespace(&admin, ns, Some(&format!("{ROLES}tok-.*"))).await;
    create_service_account(&admin, ns, "web").await;
    run_pod(&admin, &pod(ns, "doomed", node, "127.0.0.61")).await;
    run_pod(
        &admin,
        &pod(ns, "elsewhere", "node-tok-other", "127.0.0.62"),
    )
    .await;
    run_pod(
        &admin,
        &PodSpec {
            role: None,
            ..pod(ns, "no-role", node, "127.0.0.63")
        },
    )
    .await;
    run_pod(
        &admin,
        &PodSpec {
            role: Some("admin"),
            ..pod(ns, "greedy", node, "127.0.0.64")
        },
    )
    .await;
    run_pod(&admin, &pod(ns, "job", node, "127.0.0.65")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let iamlet = start_iamlet(dir.path(), node);
    eventually("ready, with the cluster's keys", WITHIN, || iamlet.ready()).await;
    let front = iamlet.container_credentials;
    let pods = Api::<Pod>::namespaced(admin.clone(), ns);

    // Another node's pod: a valid token, and not this node's to serve.
    let reply = ask(front, Some(&projected(&admin, ns, "elsewhere").await)).await;
    refused(&reply, 403, "PodNotOnThisNode");
    refused(
        &ask(front, Some(&projected(&admin, ns, "no-role").await)).await,
        403,
        "NoRole",
    );

    // Denied by its namespace's policy: the reason in the body, an Event on the pod, a metric.
    let reply = ask(front, Some(&projected(&admin, ns, "greedy").await)).await;
    refused(&reply, 403, "ForbiddenByPolicy");
    let message = reply.json()["Message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("not permitted by namespace tok-deny"),
        "{message}"
    );
    assert!(
        iamlet
            .metric("iamlet_policy_denials_total{reason=\"not_permitted\"}")
            .await
            >= 1.0
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin.clone(), ns);
    eventually("an IamRoleForbidden Event on the pod", WITHIN, || async {
        events.list(&Default::default()).await.is_ok_and(|list| {
            list.items.iter().any(|e| {
                e.reason.as_deref() == Some("IamRoleForbidden")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("greedy")
            })
        })
    })
    .await;

    // A finished pod's token is refused.
    let job = projected(&admin, ns, "job").await;
    assert_eq!(ask(front, Some(&job)).await.status, 200);
    let done = json!({"status": {"phase": "Succeeded"}});
    pods.patch_status("job", &PatchParams::default(), &Patch::Merge(&done))
        .await
        .expect("finish");
    eventually("the finished pod's token refused", WITHIN, || async {
        ask(front, Some(&job)).await.status == 403
    })
    .await;
    refused(&ask(front, Some(&job)).await, 403, "PodFinished");

    // A deleted pod's token stops working once the delete is seen, although it is still
    // a valid token of the cluster's until it expires.
    let doomed = projected(&admin, ns, "doomed").await;
    assert_eq!(ask(front, Some(&doomed)).await.status, 200);
    pods.delete("doomed", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete");
    eventually("the deleted pod's token refused", WITHIN, || async {
        ask(front, Some(&doomed)).await.status == 403
    })
    .await;
    refused(&ask(front, Some(&doomed)).await, 403, "PodNotOnThisNode");
    assert!(
        iamlet
            .metric("iamlet_container_credentials_refusals_total{reason=\"not_on_this_node\"}")
            .await
            >= 2.0
    );
}
