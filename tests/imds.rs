//! The IMDS behaviour real SDKs depend on, line by line (DESIGN.md), over HTTP against the
//! real binary, with moto as STS and a fake node IMDS upstream. A client bound to 127.0.0.x is
//! the pod with that IP.

mod support;

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use support::http::{self, get, ip, request, token};
use support::iamlet::{Iamlet, Setup, pod};
use support::{moto, sts_front, upstream};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

fn web0() -> IpAddr {
    ip("127.0.0.2")
}

/// The pod table most tests use.
fn pods() -> Vec<support::iamlet::StaticPod> {
    vec![
        pod("127.0.0.2", "shop", "web-0", Some("web")),
        pod("127.0.0.3", "shop", "web-1", Some("web")),
        pod("127.0.0.4", "batch", "job-0", Some("team/batch")),
        pod("127.0.0.5", "shop", "no-role", None),
        pod("127.0.0.6", "shop", "denied", Some("denied-role")),
        pod("127.0.0.7", "shop", "slow", Some("slow-role")),
    ]
}

struct World {
    _dir: tempfile::TempDir,
    iamlet: Iamlet,
    sts: sts_front::StsFront,
    node: upstream::FakeImds,
}

fn start(change: impl FnOnce(&mut Setup)) -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let sts = sts_front::start(([127, 0, 0, 1], 0).into(), moto::shared().addr);
    let node = upstream::start();
    let mut setup = Setup {
        sts: sts.url(),
        upstream: node.url(),
        pods: pods(),
        ..Setup::default()
    };
    change(&mut setup);
    let iamlet = Iamlet::start(dir.path(), &setup);
    World {
        _dir: dir,
        iamlet,
        sts,
        node,
    }
}

fn is_imds_time(text: &str) -> bool {
    // YYYY-MM-DDTHH:MM:SSZ, whole seconds.
    let b = text.as_bytes();
    b.len() == 20
        && text.ends_with('Z')
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && text[..19].bytes().filter(u8::is_ascii_digit).count() == 14
}

fn parse_time(text: &str) -> SystemTime {
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    let parsed = time::PrimitiveDateTime::parse(text, &format).expect("IMDS time");
    SystemTime::from(parsed.assume_utc())
}

// ---- tokens --------------------------------------------------------------------------------

#[tokio::test]
async fn token_put_without_body_or_length_echoes_the_ttl() {
    let world = start(|_| {});
    // No body and no Content-Length, as some SDKs send it.
    let reply = request(
        web0(),
        world.iamlet.imds,
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", "300")],
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(!reply.body.trim().is_empty());
    assert_eq!(
        reply.header("x-aws-ec2-metadata-token-ttl-seconds"),
        Some("300")
    );
}

#[tokio::test]
async fn token_ttl_must_be_1_to_21600() {
    let world = start(|_| {});
    for ttl in [
        None,
        Some("0"),
        Some("21601"),
        Some("-5"),
        Some("soon"),
        Some(""),
    ] {
        let headers: Vec<(&str, &str)> = ttl
            .map(|t| vec![("X-aws-ec2-metadata-token-ttl-seconds", t)])
            .unwrap_or_default();
        let reply = request(
            web0(),
            world.iamlet.imds,
            "PUT",
            "/latest/api/token",
            &headers,
        )
        .await;
        assert_eq!(reply.status, 400, "ttl {ttl:?}: {reply:?}");
        assert!(
            reply.body.contains("21600"),
            "the error says the range: {}",
            reply.body
        );
    }
    for ttl in ["1", "21600"] {
        let headers = [("X-aws-ec2-metadata-token-ttl-seconds", ttl)];
        let reply = request(
            web0(),
            world.iamlet.imds,
            "PUT",
            "/latest/api/token",
            &headers,
        )
        .await;
        assert_eq!(reply.status, 200, "ttl {ttl}");
    }
}

#[tokio::test]
async fn token_put_through_a_proxy_is_forbidden() {
    let world = start(|_| {});
    let reply = request(
        web0(),
        world.iamlet.imds,
        "PUT",
        "/latest/api/token",
        &[
            ("X-aws-ec2-metadata-token-ttl-seconds", "60"),
            ("X-Forwarded-For", "10.9.9.9"),
        ],
    )
    .await;
    assert_eq!(reply.status, 403);
    let reply = get(web0(), world.iamlet.imds, "/latest/api/token", None).await;
    assert_eq!(reply.status, 405, "tokens are only PUT");
}

#[tokio::test]
async fn optional_mode_answers_v1_but_never_an_invalid_token() {
    let world = start(|_| {});
    let imds = world.iamlet.imds;
    assert_eq!(get(web0(), imds, CREDS, None).await.status, 200);
    let valid = token(web0(), imds).await;
    assert_eq!(get(web0(), imds, CREDS, Some(&valid)).await.status, 200);
    assert_eq!(get(web0(), imds, CREDS, Some("forged")).await.status, 401);
    // A token minted for one pod is worthless from another.
    assert_eq!(
        get(ip("127.0.0.3"), imds, CREDS, Some(&valid)).await.status,
        401
    );
}

#[tokio::test]
async fn required_mode_refuses_requests_without_a_valid_token() {
    let world = start(|setup| setup.tokens = "required".into());
    let imds = world.iamlet.imds;
    let reply = get(web0(), imds, CREDS, None).await;
    assert_eq!(reply.status, 401);
    assert!(reply.body.contains("token is required"), "{}", reply.body);
    let valid = token(web0(), imds).await;
    let reply = get(web0(), imds, CREDS, Some(&valid)).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "web"));
    assert_eq!(
        get(web0(), imds, &format!("{CREDS}web"), Some(&valid))
            .await
            .status,
        200
    );
    assert_eq!(
        get(ip("127.0.0.3"), imds, CREDS, Some(&valid)).await.status,
        401
    );
    assert_eq!(get(web0(), imds, CREDS, Some("forged")).await.status, 401);
    // Proxied paths need a token too.
    let region = "/latest/meta-data/placement/region";
    assert_eq!(get(web0(), imds, region, None).await.status, 401);
    assert_eq!(get(web0(), imds, region, Some(&valid)).await.status, 200);
}

#[tokio::test]
async fn tokens_survive_a_restart_with_the_same_key_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup {
        tokens: "required".into(),
        pods: pods(),
        ..Setup::default()
    };
    let mut first = Iamlet::start(dir.path(), &setup);
    let minted = token(web0(), first.imds).await;
    assert!(first.stop().success());

    let second = Iamlet::start(dir.path(), &setup);
    assert_eq!(
        get(web0(), second.imds, CREDS, Some(&minted)).await.status,
        200
    );
    drop(second);

    // A different key (another node, or a wiped key file) does not accept it.
    let other = tempfile::tempdir().expect("tempdir");
    let third = Iamlet::start(other.path(), &setup);
    assert_eq!(
        get(web0(), third.imds, CREDS, Some(&minted)).await.status,
        401
    );
}

// ---- roles and credentials -----------------------------------------------------------------

#[tokio::test]
async fn role_listing_is_exactly_the_role_name() {
    let world = start(|_| {});
    let imds = world.iamlet.imds;
    for path in [CREDS, CREDS.trim_end_matches('/')] {
        let reply = get(web0(), imds, path, None).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, "web", "no trailing newline, nothing else");
    }
    // A role with a path lists its name only, as EC2 does.
    let reply = get(ip("127.0.0.4"), imds, CREDS, None).await;
    assert_eq!(reply.body, "batch");
    let iam = get(web0(), imds, "/latest/meta-data/iam/", None).await;
    assert_eq!(iam.body, "info\nsecurity-credentials/");
}

#[tokio::test]
async fn pods_without_a_role_and_unknown_addresses_get_nothing() {
    let world = start(|_| {});
    let imds = world.iamlet.imds;
    for client in [ip("127.0.0.5"), ip("127.0.0.99")] {
        for path in [
            CREDS,
            "/latest/meta-data/iam/info",
            "/latest/meta-data/iam/security-credentials/web",
        ] {
            let reply = get(client, imds, path, None).await;
            assert_eq!(reply.status, 404, "{client} {path}: {reply:?}");
            assert!(!reply.body.contains("AccessKeyId"));
        }
    }
}

#[tokio::test]
async fn credential_document_is_what_sdks_parse() {
    let world = start(|_| {});
    let reply = get(web0(), world.iamlet.imds, &format!("{CREDS}web"), None).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let doc = reply.json();
    assert_eq!(doc["Code"], "Success");
    assert_eq!(doc["Type"], "AWS-HMAC");
    for field in ["AccessKeyId", "SecretAccessKey", "Token"] {
        assert!(
            doc[field].as_str().is_some_and(|v| !v.is_empty()),
            "{field} missing"
        );
    }
    for field in ["LastUpdated", "Expiration"] {
        let value = doc[field].as_str().expect("a time");
        assert!(is_imds_time(value), "{field} = {value:?}");
    }
    // The default one-hour session: well over the 30 minutes SDKs need.
    let left = parse_time(doc["Expiration"].as_str().expect("time"))
        .duration_since(support::wall_clock())
        .unwrap_or_default();
    assert!(left > Duration::from_secs(50 * 60), "only {left:?} left");
    // The trailing-slash form is the same resource.
    let again = get(web0(), world.iamlet.imds, &format!("{CREDS}web/"), None).await;
    assert_eq!(again.json()["AccessKeyId"], doc["AccessKeyId"]);
}

#[tokio::test]
async fn another_pods_role_is_not_found() {
    let world = start(|_| {});
    // Let the prefetch of the batch pod's role land first.
    support::eventually(
        "the batch role prefetched",
        Duration::from_secs(10),
        || async { world.sts.assume_role_calls("batch") > 0 },
    )
    .await;
    let before = world.sts.assume_role_calls("batch");
    assert_eq!(before, 1, "prefetched once");
    let reply = get(web0(), world.iamlet.imds, &format!("{CREDS}batch"), None).await;
    assert_eq!(reply.status, 404);
    assert!(!reply.body.contains("AccessKeyId"));
    let after = world.sts.assume_role_calls("batch");
    assert_eq!(after, before, "an STS call for a refused role");
}

#[tokio::test]
async fn sts_refusal_is_served_as_assume_role_unauthorized_access() {
    let world = start(|_| {});
    let reply = get(
        ip("127.0.0.6"),
        world.iamlet.imds,
        &format!("{CREDS}denied-role"),
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "as EC2 does");
    let doc = reply.json();
    assert_eq!(doc["Code"], "AssumeRoleUnauthorizedAccess");
    assert!(
        doc["Message"]
            .as_str()
            .is_some_and(|m| m.contains("AccessDenied")),
        "{doc}"
    );
    assert!(doc.get("AccessKeyId").is_none());
    assert!(world.iamlet.log().contains("STS refused AssumeRole"));
}

#[tokio::test]
async fn iam_info_describes_the_pods_role_not_the_nodes() {
    let world = start(|_| {});
    let reply = get(
        web0(),
        world.iamlet.imds,
        "/latest/meta-data/iam/info",
        None,
    )
    .await;
    assert_eq!(reply.status, 200);
    let doc = reply.json();
    assert_eq!(doc["Code"], "Success");
    assert_eq!(
        doc["InstanceProfileArn"],
        "arn:aws:iam::123456789012:instance-profile/web"
    );
    assert!(
        !reply.body.contains("210987654321"),
        "the node's account leaked"
    );
    assert!(world.node.seen().iter().all(|r| !r.path.contains("/iam/")));
}

#[tokio::test]
async fn replicas_of_one_workload_share_one_sts_session() {
    let world = start(|_| {});
    let imds = world.iamlet.imds;
    let a = get(web0(), imds, &format!("{CREDS}web"), None).await.json();
    let b = get(ip("127.0.0.3"), imds, &format!("{CREDS}web"), None)
        .await
        .json();
    assert_eq!(a["AccessKeyId"], b["AccessKeyId"]);
    assert_eq!(world.sts.assume_role_calls("web"), 1);
}

// ---- the upstream proxy --------------------------------------------------------------------

#[tokio::test]
async fn allowed_paths_are_proxied_without_the_pods_headers() {
    let world = start(|_| {});
    let reply = request(
        web0(),
        world.iamlet.imds,
        "GET",
        "/latest/meta-data/placement/region",
        &[("X-Forwarded-For", "10.1.1.1"), ("X-Custom", "pod-header")],
    )
    .await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "eu-west-1"));
    let seen = world.node.seen();
    let proxied = seen
        .iter()
        .find(|r| r.path == "/latest/meta-data/placement/region")
        .expect("the node's IMDS was asked");
    let names: Vec<&str> = proxied.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert!(!names.contains(&"x-forwarded-for"), "{names:?}");
    assert!(!names.contains(&"x-custom"), "{names:?}");
    // iamlet used its own IMDSv2 token with the node's IMDS.
    assert!(
        proxied
            .headers
            .iter()
            .any(|(n, v)| n == "x-aws-ec2-metadata-token" && v == "node-upstream-token")
    );
}

#[tokio::test]
async fn the_nodes_secrets_are_never_proxied() {
    let world = start(|setup| setup.imds_extra = "proxy_allow = [\".*\"]".into());
    for path in [
        "/latest/user-data",
        "/latest/meta-data/iam/security-credentials/node-role",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "/latest/meta-data/placement/../iam/security-credentials/node-role",
        "/latest/meta-data/placement/%2e%2e/iam/security-credentials/node-role",
        "/latest//user-data",
    ] {
        let reply = get(web0(), world.iamlet.imds, path, None).await;
        assert_eq!(reply.status, 404, "{path}: {reply:?}");
        assert!(!reply.body.contains(upstream::NODE_SECRET));
        assert!(!reply.body.contains("bootstrap"));
    }
    let asked: Vec<String> = world.node.seen().into_iter().map(|r| r.path).collect();
    assert!(
        asked
            .iter()
            .all(|p| !p.contains("user-data") && !p.contains("security-credentials")),
        "the node's IMDS was asked for {asked:?}"
    );
}

#[tokio::test]
async fn the_default_allow_list_blocks_what_it_does_not_name() {
    let world = start(|_| {});
    let reply = get(
        web0(),
        world.iamlet.imds,
        "/latest/meta-data/tags/instance/Name",
        None,
    )
    .await;
    assert_eq!(reply.status, 404);
    let reply = get(
        web0(),
        world.iamlet.imds,
        "/latest/meta-data/instance-id",
        None,
    )
    .await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn a_custom_allow_list_replaces_the_default() {
    let world = start(|setup| {
        setup.imds_extra = "proxy_allow = [\"/latest/meta-data/tags/instance/[A-Za-z]+\"]".into();
    });
    let imds = world.iamlet.imds;
    let tag = get(web0(), imds, "/latest/meta-data/tags/instance/Name", None).await;
    assert_eq!(
        (tag.status, tag.body.as_str()),
        (200, "upstream:/latest/meta-data/tags/instance/Name")
    );
    assert_eq!(
        get(web0(), imds, "/latest/meta-data/instance-id", None)
            .await
            .status,
        404
    );
}

// ---- admin port, limits, logs, shutdown ----------------------------------------------------

#[tokio::test]
async fn admin_endpoints_live_only_on_the_admin_port() {
    let world = start(|_| {});
    let admin = world.iamlet.admin;
    let local = ip("127.0.0.1");
    assert_eq!(get(local, admin, "/healthz", None).await.status, 200);
    // Ready once every pod's role has been asked of STS (the table has stalled roles too).
    support::eventually("ready", Duration::from_secs(30), || async {
        get(local, admin, "/readyz", None).await.status == 200
    })
    .await;
    get(web0(), world.iamlet.imds, &format!("{CREDS}web"), None).await;
    get(web0(), world.iamlet.imds, "/latest/user-data", None).await;
    let metrics = get(local, admin, "/metrics", None).await.body;
    for series in [
        "iamlet_imds_requests_total{route=\"credentials\",status=\"200\"} 1",
        "iamlet_imds_requests_total{route=\"upstream\",status=\"404\"} 1",
        "iamlet_imds_request_duration_seconds_count{route=\"credentials\"} 1",
        // Prefetched: the pod's request was a hit.
        "iamlet_credential_cache_hits_total 1",
        "iamlet_credential_cache_misses_total 0",
    ] {
        assert!(
            metrics.contains(series),
            "{series} missing from:\n{metrics}"
        );
    }
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(
            get(web0(), world.iamlet.imds, path, None).await.status,
            404,
            "{path} on the pod port"
        );
    }
}

#[tokio::test]
async fn sts_errors_are_counted() {
    let world = start(|_| {});
    let path = format!("{CREDS}denied-role");
    get(ip("127.0.0.6"), world.iamlet.imds, &path, None).await;
    let refused = world
        .iamlet
        .metric("iamlet_sts_assume_role_errors_total{kind=\"refused\"}");
    assert!(refused.await >= 1.0);
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let world = start(|_| {});
    let huge = "x".repeat(64 * 1024);
    let reply = request(web0(), world.iamlet.imds, "GET", CREDS, &[("X-Big", &huge)]).await;
    assert_eq!(reply.status, 431);
}

#[tokio::test]
async fn silent_connections_are_closed() {
    use tokio::io::AsyncReadExt;
    let world = start(|setup| setup.imds_extra = "idle_timeout = \"1s\"".into());
    let mut stream = http::connect(web0(), world.iamlet.imds).await;
    let mut buf = [0u8; 64];
    // Nothing is sent; iamlet must hang up rather than hold the connection forever.
    let read = tokio::time::timeout(Duration::from_secs(15), stream.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "connection still open: {read:?}"
    );
}

#[tokio::test]
async fn a_request_that_takes_too_long_is_answered_504() {
    let world = start(|setup| {
        setup.imds_extra = "request_timeout = \"300ms\"".into();
        setup.pods = vec![pod("127.0.0.7", "shop", "stalled", Some("stall-role"))];
    });
    // The prefetch of its role is stalled at STS for longer than the request may take.
    let path = format!("{CREDS}stall-role");
    let reply = get(ip("127.0.0.7"), world.iamlet.imds, &path, None).await;
    assert_eq!(reply.status, 504);
}

#[tokio::test]
async fn shutdown_drains_requests_in_flight() {
    let mut world = start(|_| {});
    let imds = world.iamlet.imds;
    // A proxied path the node's IMDS answers slowly: in flight inside iamlet for a while.
    let in_flight = tokio::spawn(async move {
        get(ip("127.0.0.7"), imds, support::upstream::SLOW_PATH, None).await
    });
    support::eventually(
        "the request is in flight",
        Duration::from_secs(10),
        || async { world.iamlet.metric("iamlet_imds_requests_in_flight").await >= 1.0 },
    )
    .await;
    let status = tokio::task::spawn_blocking(move || {
        let status = world.iamlet.stop();
        (status, world.iamlet.log())
    });
    let reply = in_flight.await.expect("request task");
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (
            200,
            format!("upstream:{}", support::upstream::SLOW_PATH).as_str()
        ),
        "the in-flight request was cut: {reply:?}"
    );
    let (status, log) = status.await.expect("stop");
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(log.contains("SIGTERM received"));
}

#[tokio::test]
async fn logs_name_the_pod_but_never_a_secret() {
    let world = start(|_| {});
    let token = token(web0(), world.iamlet.imds).await;
    let doc = get(
        web0(),
        world.iamlet.imds,
        &format!("{CREDS}web"),
        Some(&token),
    )
    .await
    .json();
    let log = world.iamlet.log();
    let request_line = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|event| event["message"] == "imds request" && event["route"] == "credentials")
        .unwrap_or_else(|| panic!("no request line in:\n{log}"));
    assert_eq!(request_line["pod"], "shop/web-0");
    assert_eq!(request_line["status"], 200);
    assert!(request_line["duration_ms"].is_number());
    for secret in [
        doc["SecretAccessKey"].as_str().expect("secret"),
        doc["Token"].as_str().expect("token"),
        &token,
        "node-own-secret",
    ] {
        assert!(!log.contains(secret), "a secret reached the log");
    }
}

#[tokio::test]
async fn role_names_resolve_under_the_nodes_account_when_no_base_is_set() {
    // The fake node IMDS's instance profile is in account 210987654321.
    let world = start(|setup| setup.base_role_arn = String::new());
    let reply = get(
        web0(),
        world.iamlet.imds,
        "/latest/meta-data/iam/info",
        None,
    )
    .await;
    assert_eq!(
        reply.json()["InstanceProfileArn"],
        "arn:aws:iam::210987654321:instance-profile/web"
    );
    assert!(
        world
            .iamlet
            .log()
            .contains("arn:aws:iam::210987654321:role/")
    );
}
