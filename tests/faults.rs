//! Faults around iamlet, against the real binary: STS in every kind of trouble (5xx,
//! throttling, refusals, dropped connections, slowness, iamlet's own credentials expired) and
//! the node's IMDS down. Pods never get a wrong role, keep valid credentials wherever the cache
//! holds them, get a clear 503 on a cold miss during an outage, and recover once STS is back;
//! the node's IMDS being down touches only the proxied paths.

mod support;

use std::net::IpAddr;
use std::time::Duration;

use aws_sdk_sts::config::{Credentials, Region};
use support::http::{get, ip};
use support::iamlet::{Iamlet, Setup, StaticPod, pod};
use support::sts_front::{self, Fault, StsFront};
use support::{eventually, moto, rust_sdk, upstream};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
const WITHIN: Duration = Duration::from_secs(60);

/// Every fault that is an outage (worth riding out), as opposed to a refusal of the role.
const OUTAGES: [Fault; 5] = [
    Fault::ServerError,
    Fault::Throttling,
    Fault::Reset,
    Fault::Slow,
    Fault::ExpiredToken,
];

fn start(
    pods: Vec<StaticPod>,
    extra: &str,
    fault: Option<Fault>,
) -> (tempfile::TempDir, Iamlet, StsFront) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sts = sts_front::start(([127, 0, 0, 1], 0).into(), moto::shared().addr);
    sts.set_fault(fault);
    let setup = Setup {
        sts: sts.url(),
        pods,
        extra: extra.to_owned(),
        log_level: "info".into(),
        ..Setup::default()
    };
    let iamlet = Iamlet::start(dir.path(), &setup);
    (dir, iamlet, sts)
}

/// The credential document iamlet gives the pod at `from` for `role`.
async fn document(iamlet: &Iamlet, from: IpAddr, role: &str) -> (u16, serde_json::Value) {
    let reply = get(from, iamlet.imds, &format!("{CREDS}{role}"), None).await;
    let doc = serde_json::from_str(&reply.body).unwrap_or(serde_json::Value::Null);
    (reply.status, doc)
}

/// Whose credentials `doc` holds, as STS (moto) sees them.
async fn whoami(doc: &serde_json::Value) -> String {
    let field = |name: &str| doc[name].as_str().expect(name).to_owned();
    let credentials = Credentials::new(
        field("AccessKeyId"),
        field("SecretAccessKey"),
        Some(field("Token")),
        None,
        "iamlet",
    );
    let config = aws_sdk_sts::Config::builder()
        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
        .http_client(rust_sdk::http_client())
        .region(Region::new("us-east-1"))
        .credentials_provider(credentials)
        .endpoint_url(moto::shared().url())
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

#[tokio::test(flavor = "multi_thread")]
async fn a_warm_pod_keeps_valid_credentials_through_every_sts_outage() {
    // 15-minute sessions refreshed with 14m55s left: refreshes come due within seconds, so
    // each fault meets refreshes and the pod's own misses.
    let extra = "[credentials]\nsession_duration = \"15m\"\nrefresh_before = \"14m55s\"\n";
    let (_dir, iamlet, sts) = start(
        vec![pod("127.0.0.2", "shop", "web-0", Some("warm"))],
        extra,
        None,
    );
    let web = ip("127.0.0.2");
    let (status, good) = document(&iamlet, web, "warm").await;
    assert_eq!(status, 200);
    let mut good_key = good["AccessKeyId"].clone();

    for fault in OUTAGES {
        sts.set_fault(Some(fault));
        let calls = sts.assume_role_calls("warm");
        // Once the cached credentials are inside their refresh window, the pod's request (or
        // the background refresh) meets the fault at STS.
        eventually("STS asked under the fault", WITHIN, || async {
            document(&iamlet, web, "warm").await;
            sts.assume_role_calls("warm") > calls
        })
        .await;
        let (status, doc) = document(&iamlet, web, "warm").await;
        assert_eq!(status, 200, "{fault:?}: {doc}");
        assert_eq!(doc["Code"], "Success", "{fault:?}: {doc}");
        if fault != Fault::Slow {
            // STS failed: the last good credentials, still valid.
            assert_eq!(doc["AccessKeyId"], good_key, "{fault:?}");
        }
        assert_eq!(
            whoami(&doc).await,
            assumed("warm", "shop.default"),
            "{fault:?}"
        );
        // Slow is not down: the refresh lands, and its credentials are the last good ones now.
        good_key = doc["AccessKeyId"].clone();
    }
    assert!(
        iamlet
            .metric("iamlet_sts_assume_role_errors_total{kind=\"own_credentials\"}")
            .await
            > 0.0
    );
    assert_eq!(
        iamlet
            .metric("iamlet_sts_assume_role_errors_total{kind=\"refused\"}")
            .await,
        0.0,
        "an outage was taken for a refusal"
    );
    // STS is back: fresh credentials, the pod's own role.
    sts.set_fault(None);
    eventually("fresh credentials after the outages", WITHIN, || async {
        let (_, doc) = document(&iamlet, web, "warm").await;
        doc["Code"] == "Success" && doc["AccessKeyId"] != good_key
    })
    .await;
    let (_, doc) = document(&iamlet, web, "warm").await;
    assert_eq!(whoami(&doc).await, assumed("warm", "shop.default"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_miss_during_an_outage_is_a_clear_503_and_recovers() {
    // One pod per fault, all cold: STS is failing from the start, so no prefetch landed.
    let faults = [
        ("server-error", Fault::ServerError),
        ("throttling", Fault::Throttling),
        ("reset", Fault::Reset),
        ("expired-token", Fault::ExpiredToken),
        ("slow", Fault::Slow),
        ("access-denied", Fault::AccessDenied),
    ];
    let pods: Vec<StaticPod> = faults
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            pod(
                &format!("127.0.0.{}", i + 2),
                "shop",
                name,
                Some(&format!("cold-{name}")),
            )
        })
        .collect();
    let (_dir, iamlet, sts) = start(pods, "", Some(Fault::ServerError));
    eventually("every prefetch failed", WITHIN, || async {
        faults
            .iter()
            .all(|(name, _)| sts.assume_role_calls(&format!("cold-{name}")) > 0)
    })
    .await;

    for (i, (name, fault)) in faults.iter().enumerate() {
        let from = ip(&format!("127.0.0.{}", i + 2));
        let role = format!("cold-{name}");
        // A refusal is for one role: the front refuses every role named `…denied…`. Put on
        // all of STS, it would also refuse the background retries of the other pods' roles,
        // and iamlet would rightly keep those refusals (until pods or policy change).
        let global = (*fault != Fault::AccessDenied).then_some(*fault);
        sts.set_fault(global);
        let reply = get(from, iamlet.imds, &format!("{CREDS}{role}"), None).await;
        assert!(
            !reply.body.contains("SecretAccessKey") || *fault == Fault::Slow,
            "{fault:?}"
        );
        match fault {
            Fault::Slow => {
                // Slow is not down: the answer comes within the request's time.
                assert_eq!(reply.status, 200, "{fault:?}: {reply:?}");
                assert_eq!(reply.json()["Code"], "Success");
                assert_eq!(whoami(&reply.json()).await, assumed(&role, "shop.default"));
            }
            Fault::AccessDenied => {
                // STS says no for this role: as EC2 answers it, not an outage.
                assert_eq!(reply.status, 200, "{reply:?}");
                assert_eq!(reply.json()["Code"], "AssumeRoleUnauthorizedAccess");
            }
            _ => {
                assert_eq!(reply.status, 503, "{fault:?}: {reply:?}");
                assert!(
                    reply.body.contains("temporarily unavailable"),
                    "{}",
                    reply.body
                );
            }
        }
        // Back to a plain outage, so the pods not yet asked stay cold.
        sts.set_fault(Some(Fault::ServerError));
    }

    // STS is back: every pod gets its own role, except the one STS refused.
    sts.set_fault(None);
    for (i, (name, fault)) in faults.iter().enumerate() {
        let from = ip(&format!("127.0.0.{}", i + 2));
        let role = format!("cold-{name}");
        if *fault == Fault::AccessDenied {
            let (status, doc) = document(&iamlet, from, &role).await;
            assert_eq!(
                (status, doc["Code"].as_str()),
                (200, Some("AssumeRoleUnauthorizedAccess"))
            );
            continue;
        }
        let last = std::sync::Mutex::new(String::new());
        support::eventually_explained(
            &format!("{role} recovered"),
            WITHIN,
            || async {
                let (status, doc) = document(&iamlet, from, &role).await;
                *last.lock().expect("last") = format!("{status} {doc}");
                doc["Code"] == "Success"
            },
            || {
                let log = iamlet.log();
                let lines: Vec<&str> = log.lines().collect();
                format!(
                    "last answer: {}\niamlet's log (tail):\n{}",
                    last.lock().expect("last"),
                    lines[lines.len().saturating_sub(40)..].join("\n")
                )
            },
        )
        .await;
        let (_, doc) = document(&iamlet, from, &role).await;
        assert_eq!(
            whoami(&doc).await,
            assumed(&role, "shop.default"),
            "{fault:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_nodes_imds_down_fails_proxied_paths_only() {
    // Down as in nothing listening (connection refused), and as in a listener that accepts
    // and never answers.
    let refused = format!("http://127.0.0.1:{}", support::free_port());
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_url = format!("http://{}", silent.local_addr().expect("addr"));
    let held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for stream in silent.incoming().take(16) {
            open.push(stream);
        }
    });
    for upstream_url in [refused, silent_url] {
        let dir = tempfile::tempdir().expect("tempdir");
        let sts = sts_front::start(([127, 0, 0, 1], 0).into(), moto::shared().addr);
        let setup = Setup {
            sts: sts.url(),
            upstream: upstream_url.clone(),
            pods: vec![pod("127.0.0.2", "shop", "web-0", Some("web"))],
            ..Setup::default()
        };
        let iamlet = Iamlet::start(dir.path(), &setup);
        let web = ip("127.0.0.2");
        let region = get(web, iamlet.imds, "/latest/meta-data/placement/region", None).await;
        assert_eq!(region.status, 502, "{upstream_url}: {region:?}");
        assert!(region.body.contains("did not answer"), "{}", region.body);
        // Everything iamlet answers itself is untouched.
        let (status, doc) = document(&iamlet, web, "web").await;
        assert_eq!(
            (status, doc["Code"].as_str()),
            (200, Some("Success")),
            "{upstream_url}"
        );
        assert_eq!(whoami(&doc).await, assumed("web", "shop.default"));
        let info = get(web, iamlet.imds, "/latest/meta-data/iam/info", None).await;
        assert_eq!(info.status, 200);
        let name = get(web, iamlet.imds, CREDS, None).await;
        assert_eq!((name.status, name.body.as_str()), (200, "web"));
        assert!(!iamlet.log().contains(upstream::NODE_SECRET));
    }
    drop(held);
}
