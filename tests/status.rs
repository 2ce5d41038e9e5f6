//! "Who got what", without debug logs: `iamlet status` lists every pod iamlet knows with its
//! role or why it has none, over a Unix socket pods have no route to; and the first time a pod
//! is served a role, one `info` line says so.

mod support;

use std::process::Command;
use std::time::Duration;

use support::fake_kube::{FakeKube, namespace, pod};
use support::http::{get, ip};
use support::iamlet::{Iamlet, Setup};
use support::{eventually, moto};

const WITHIN: Duration = Duration::from_secs(10);
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

fn status(config: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_iamlet"))
        .args(["status", "--config"])
        .arg(config)
        .env_clear()
        .output()
        .expect("run iamlet status")
}

/// The line of the status table for `pod_ip`.
fn line_for<'a>(table: &'a str, pod_ip: &str) -> &'a str {
    table
        .lines()
        .find(|line| line.starts_with(&format!("{pod_ip} ")))
        .unwrap_or_else(|| panic!("no line for {pod_ip}:\n{table}"))
}

#[tokio::test]
async fn status_shows_who_got_what_and_why_not() {
    let fake = FakeKube::start();
    fake.apply_namespace(namespace("shop", Some("arn:aws:iam::123456789012:role/.*")));
    fake.apply_namespace(namespace("locked", None));
    fake.apply_pod(pod(
        "shop",
        "web-0",
        "u1",
        "node-1",
        "127.0.0.2",
        Some("web"),
    ));
    fake.apply_pod(pod(
        "locked",
        "app",
        "u2",
        "node-1",
        "127.0.0.3",
        Some("web"),
    ));
    fake.apply_pod(pod("shop", "plain", "u3", "node-1", "127.0.0.4", None));
    let mut host = pod("shop", "agent", "u4", "node-1", "127.0.0.5", Some("web"));
    host["spec"]["hostNetwork"] = true.into();
    fake.apply_pod(host);
    fake.apply_pod(pod("shop", "old", "u5", "node-1", "127.0.0.6", Some("web")));
    fake.apply_pod(pod("shop", "new", "u6", "node-1", "127.0.0.6", Some("web")));
    let dir = tempfile::tempdir().expect("tempdir");
    let setup: Setup = fake.setup(dir.path(), moto::shared().url());
    let iamlet = Iamlet::start(dir.path(), &setup);
    eventually("ready", WITHIN, || iamlet.ready()).await;
    for _ in 0..3 {
        let reply = get(ip("127.0.0.2"), iamlet.imds, &format!("{CREDS}web"), None).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }

    let out = status(&dir.path().join("iamlet.toml"));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let web = line_for(&table, "127.0.0.2");
    assert!(web.contains("shop/web-0"), "{web}");
    assert!(web.contains("arn:aws:iam::123456789012:role/web"), "{web}");
    assert!(web.contains("expire "), "credentials cached: {web}");
    assert!(
        line_for(&table, "127.0.0.3").contains(
            "none: denied: namespace locked has no iam.amazonaws.com/permitted annotation"
        ),
        "{table}"
    );
    assert!(
        line_for(&table, "127.0.0.4").contains("none: no role annotation"),
        "{table}"
    );
    assert!(
        line_for(&table, "127.0.0.5").contains("none: host network"),
        "{table}"
    );
    let conflicts: Vec<&str> = table
        .lines()
        .filter(|line| line.starts_with("127.0.0.6 "))
        .collect();
    assert_eq!(conflicts.len(), 2, "{table}");
    assert!(
        conflicts
            .iter()
            .all(|line| line.contains("none: IP conflict with shop/"))
    );
    // No secret in the table.
    assert!(!table.contains("SecretAccessKey") && !table.contains("Token"));

    // Three requests, one info line.
    let first_served = iamlet
        .log()
        .lines()
        .filter(|line| line.contains("serving a pod its role for the first time"))
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert_eq!(first_served.len(), 1, "{first_served:?}");
    let event: serde_json::Value = serde_json::from_str(&first_served[0]).expect("json log");
    assert_eq!(event["level"], "INFO");
    assert_eq!(event["pod"], "shop/web-0");
    assert_eq!(event["role"], "arn:aws:iam::123456789012:role/web");
    assert_eq!(event["session_name"], "shop.default");
}

#[test]
fn status_without_a_running_iamlet_says_what_it_tried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("iamlet.toml");
    let socket = dir.path().join("nobody.sock");
    std::fs::write(
        &config,
        format!("[admin]\nstatus_socket = \"{}\"\n", socket.display()),
    )
    .expect("config");
    let out = status(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&socket.display().to_string()), "{stderr}");
}

#[tokio::test]
async fn a_denied_pod_retrying_is_logged_once_and_counted_every_time() {
    let fake = FakeKube::start();
    fake.apply_namespace(namespace("locked", None));
    fake.apply_pod(pod(
        "locked",
        "app",
        "u1",
        "node-1",
        "127.0.0.2",
        Some("web"),
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let iamlet = Iamlet::start(dir.path(), &fake.setup(dir.path(), moto::shared().url()));
    eventually("ready", WITHIN, || iamlet.ready()).await;
    // An SDK's retry loop on a denied role.
    for _ in 0..5 {
        let reply = get(ip("127.0.0.2"), iamlet.imds, CREDS, None).await;
        assert_eq!(reply.status, 404, "{}", reply.body);
    }
    let denied = iamlet
        .metric("iamlet_policy_denials_total{reason=\"namespace_unannotated\"}")
        .await;
    assert_eq!(denied, 5.0);
    let logged = iamlet.log().matches("role denied by policy").count();
    assert_eq!(logged, 1, "{}", iamlet.log());
}
