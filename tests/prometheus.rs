//! Monitoring, with a real Prometheus (Debian's `prometheus` 2.42 and its `promtool`): it
//! scrapes a running iamlet's admin port and the series come back through its HTTP API; the
//! shipped alerting rules pass promtool's checks and unit tests, load into that Prometheus and
//! stay quiet for a healthy iamlet; every query of the Grafana dashboard names series iamlet
//! exports and is accepted by Prometheus.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::http::{get, ip};
use support::iamlet::{Iamlet, Setup, pod};
use support::{eventually, moto, repo};

/// Why Prometheus cannot run here, if it cannot.
fn unavailable() -> Option<String> {
    for program in ["prometheus", "promtool", "curl"] {
        let found = Command::new(program)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !found {
            return Some(format!(
                "{program} is not installed; run `bash .ci/setup` as root (Debian's prometheus)"
            ));
        }
    }
    None
}

macro_rules! require_prometheus {
    () => {
        if let Some(reason) = unavailable() {
            assert!(
                std::env::var_os("CI").is_none(),
                "in CI these tests must run: {reason}"
            );
            eprintln!("skipped: {reason}");
            return;
        }
    };
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|err| panic!("run {program}: {err}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?}:\n{text}");
    text
}

#[test]
fn alerting_rules_pass_promtool_and_the_prometheusrule_has_the_same_groups() {
    require_prometheus!();
    let checked = run(
        "promtool",
        &["check", "rules", "deploy/monitoring/rules.yaml"],
    );
    assert!(checked.contains("SUCCESS: 7 rules found"), "{checked}");
    run(
        "promtool",
        &["test", "rules", "tests/prometheus/rules_test.yaml"],
    );
    // The Prometheus Operator's copy must not drift from the plain rule file.
    let python = support::peer_program("python3");
    let same = "import sys, yaml\n\
        plain = yaml.safe_load(open('deploy/monitoring/rules.yaml'))\n\
        crd = yaml.safe_load(open('deploy/monitoring/prometheusrule.yaml'))\n\
        sys.exit(0 if crd['spec'] == plain else 'prometheusrule.yaml differs from rules.yaml')";
    run(python.to_str().expect("path"), &["-c", same]);
}

/// A Prometheus scraping `target` every second, with the shipped rules loaded; stopped on drop.
struct Prometheus {
    addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        let rules = repo().join("deploy/monitoring/rules.yaml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: iamlet\n    static_configs:\n      - targets: [\"{target}\"]\n",
                rules.display()
            ),
        )
        .expect("write config");
        let addr: SocketAddr = ([127, 0, 0, 1], support::free_port()).into();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        assert!(
            support::wait_for_port(addr, Duration::from_secs(60)),
            "prometheus did not listen on {addr}"
        );
        Prometheus {
            addr,
            child,
            _dir: dir,
        }
    }

    /// GET on Prometheus's HTTP API; the `data` of a successful answer.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let url = format!("http://{}{path}", self.addr);
        let mut command = Command::new("curl");
        command.args(["-sSG", "--max-time", "10", &url]);
        for (name, value) in params {
            command.args(["--data-urlencode", &format!("{name}={value}")]);
        }
        let out = command.output().expect("run curl");
        let body: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|err| {
            panic!(
                "{path} {params:?}: not JSON ({err}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(body["status"], "success", "{path} {params:?}: {body}");
        body["data"].clone()
    }

    /// The value of an instant query that returns one series, if it returns one.
    fn value(&self, query: &str) -> Option<f64> {
        let data = self.api("/api/v1/query", &[("query", query)]);
        let result = data["result"].as_array()?;
        match result.as_slice() {
            [series] => series["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every sample name the exposition has: a counter `x` is sampled as `x_total`, a histogram
/// as `x_bucket`, `x_sum` and `x_count`.
fn exported_series(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|suffix| format!("{name}{suffix}")));
    }
    names
}

/// The iamlet series a PromQL expression names.
fn series_in(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("iamlet_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        found.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    found
}

/// Every `expr` of every panel target in the dashboard.
fn dashboard_queries(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).expect("read dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is valid JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            queries.push((title, target["expr"].as_str().expect("expr").to_owned()));
        }
    }
    queries
}

/// An iamlet in server-backed mode whose kiam server is not there: it keeps trying.
fn server_backed_iamlet(dir: &Path) -> Iamlet {
    let dir = dir.join("server-backed");
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = support::pki::Ca::new("prometheus-test-ca");
    let client = ca.client("iamlet-agent");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("ca");
    std::fs::write(dir.join("client.pem"), client.cert_pem).expect("cert");
    std::fs::write(dir.join("client.key"), client.key_pem).expect("key");
    let setup = Setup {
        extra: format!(
            "[kiam]\nserver = \"127.0.0.1:{}\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            support::free_port(),
            dir.join("client.pem").display(),
            dir.join("client.key").display(),
            dir.join("ca.pem").display(),
        ),
        log_level: "info".into(),
        ..Setup::default()
    };
    Iamlet::start(&dir, &setup)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_iamlet_and_reads_the_series_back() {
    require_prometheus!();
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup {
        sts: moto::shared().url(),
        pods: vec![pod("127.0.0.2", "shop", "web-0", Some("web"))],
        log_level: "info".into(),
        ..Setup::default()
    };
    let iamlet = Iamlet::start(dir.path(), &setup);
    let role = "/latest/meta-data/iam/security-credentials/";
    for _ in 0..3 {
        assert_eq!(
            get(ip("127.0.0.2"), iamlet.imds, role, None).await.status,
            200
        );
    }
    let credentials = get(ip("127.0.0.2"), iamlet.imds, &format!("{role}web"), None).await;
    assert_eq!(credentials.status, 200, "{}", credentials.body);
    assert_eq!(
        get(ip("127.0.0.9"), iamlet.imds, role, None).await.status,
        404
    );

    // What is served is what it says it is: OpenMetrics text, with OpenMetrics' content type.
    let metrics = get(iamlet.admin.ip(), iamlet.admin, "/metrics", None).await;
    assert_eq!(
        metrics.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(metrics.body.ends_with("# EOF\n"), "{}", metrics.body);
    let mut exported = exported_series(&metrics.body);
    // The kiam client's series exist only in server-backed mode, once it has made a call.
    let server_backed = server_backed_iamlet(dir.path());
    let kiam_called = || async {
        let metrics = get(
            server_backed.admin.ip(),
            server_backed.admin,
            "/metrics",
            None,
        )
        .await;
        metrics.body.contains("iamlet_kiam_calls_total{")
    };
    eventually(
        "the kiam client has called",
        Duration::from_secs(30),
        kiam_called,
    )
    .await;
    let metrics = get(
        server_backed.admin.ip(),
        server_backed.admin,
        "/metrics",
        None,
    )
    .await;
    exported.extend(exported_series(&metrics.body));

    let prometheus = Prometheus::start(iamlet.admin);
    let sample = "iamlet_imds_requests_total{route=\"role\",status=\"200\"}";
    let scraped = || async { prometheus.value(sample) == Some(3.0) };
    eventually(
        "Prometheus has iamlet's request count",
        Duration::from_secs(60),
        scraped,
    )
    .await;
    assert_eq!(
        prometheus.value("iamlet_imds_requests_total{route=\"role\",status=\"404\"}"),
        Some(1.0)
    );
    assert_eq!(
        prometheus.value("iamlet_imds_requests_total{route=\"credentials\",status=\"200\"}"),
        Some(1.0)
    );
    assert_eq!(prometheus.value("up{job=\"iamlet\"}"), Some(1.0));
    assert_eq!(prometheus.value("iamlet_ready"), Some(1.0));
    let sts_calls = prometheus.value("iamlet_sts_assume_role_calls_total");
    assert!(sts_calls.is_some_and(|calls| calls >= 1.0), "{sts_calls:?}");
    let buckets = "count(iamlet_imds_request_duration_seconds_bucket{route=\"role\"})";
    assert!(prometheus.value(buckets).is_some_and(|n| n > 1.0));

    // The scrape itself went without complaint, and the types came through.
    let targets = prometheus.api("/api/v1/targets", &[]);
    let target = &targets["activeTargets"][0];
    assert_eq!(target["health"], "up", "{target}");
    assert_eq!(target["lastError"], "", "{target}");
    let metadata = prometheus.api("/api/v1/metadata", &[("metric", "iamlet_imds_requests")]);
    assert_eq!(
        metadata["iamlet_imds_requests"][0]["type"], "counter",
        "{metadata}"
    );

    // The shipped rules evaluate without error against the real series, and a healthy
    // iamlet raises none of them.
    let evaluated = || async {
        let groups = prometheus.api("/api/v1/rules", &[]);
        let rules: Vec<Value> = groups["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        rules.len() == 7
            && rules
                .iter()
                .all(|rule| rule["lastEvaluation"].as_str() != Some("0001-01-01T00:00:00Z"))
    };
    eventually(
        "the rules have been evaluated",
        Duration::from_secs(30),
        evaluated,
    )
    .await;
    let groups = prometheus.api("/api/v1/rules", &[]);
    for rule in groups["groups"][0]["rules"].as_array().expect("rules") {
        assert_eq!(rule["health"], "ok", "{rule}");
        assert_eq!(rule["state"], "inactive", "{rule}");
    }

    // Every dashboard query names series iamlet exports, and Prometheus accepts it.
    let queries = dashboard_queries(&repo().join("deploy/monitoring/grafana-dashboard.json"));
    assert!(queries.len() >= 15, "{queries:?}");
    for (panel, expr) in queries {
        let named = series_in(&expr);
        assert!(
            !named.is_empty() || expr.contains("up{"),
            "{panel}: {expr} names no series"
        );
        for series in named {
            assert!(
                exported.contains(&series),
                "{panel}: {series} is not a series iamlet exports ({exported:?})"
            );
        }
        let query = expr
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*");
        prometheus.api("/api/v1/query", &[("query", &query)]);
    }
}
