//! The SDK × case table: unmodified boto3, the AWS CLI, aws-sdk-js-v3 and aws-config (Rust)
//! as pods, against the token front, through iamlet's own iptables rules. A "node" network
//! namespace runs iamlet (iptables on, the token front on), moto, and a fake of the node's real
//! IMDS; it has a default route, as nodes do. Pods are namespaces routed through it, and
//! pods on the real kube-apiserver (which iamlet reaches through a forwarder into the node's
//! namespace, under the RBAC deploy/ ships). Each wired pod's token is projected as the kubelet
//! does and its SDK is given the pod's own environment: `AWS_CONTAINER_CREDENTIALS_FULL_URI`
//! (169.254.170.23, DNATed by iamlet's rule) and `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`.
//!
//! Cases, for every SDK: its own pod's token (its own role); a forged, an expired and a
//! wrong-audience token, another node's pod's token and a deleted pod's token (refused, and no
//! falling back to IMDS, although the SDK's own pod has a role there); a host-network pod's
//! token from the node's own namespace (its role, which IMDS never gives); and a pod without
//! the wiring (its role through IMDS, as before).

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use serde_json::json;
use support::apiserver::{self, IAMLET_TOKEN, create_namespace};
use support::delay_proxy::DelayProxy;
use support::iamlet::{Iamlet, Setup};
use support::netns::{Netns, PodNet};
use support::wired::{self, PodSpec, create_service_account, resign, run_pod};
use support::{eventually, moto, repo, rust_sdk, upstream};

const WITHIN: Duration = Duration::from_secs(30);
const NODE: &str = "node-sdk";
const NS: &str = "sdk";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Sdk {
    Boto3,
    AwsCli,
    JsV3,
    RustAwsConfig,
}

const ALL: [Sdk; 4] = [Sdk::Boto3, Sdk::AwsCli, Sdk::JsV3, Sdk::RustAwsConfig];

impl Sdk {
    /// Its pod's name, service account and role.
    fn pod(self) -> &'static str {
        match self {
            Sdk::Boto3 => "boto3",
            Sdk::AwsCli => "awscli",
            Sdk::JsV3 => "js",
            Sdk::RustAwsConfig => "rust",
        }
    }
}

/// The node: its namespace (with a default route, and the node's real IMDS), moto, and a
/// forwarder to the API server inside it.
struct Node {
    ns: Netns,
    moto: moto::Moto,
    api: DelayProxy,
    /// The node's own address (its "eth0"): a host-network pod's IP.
    ip: &'static str,
}

impl Node {
    fn new() -> Node {
        let ns = Netns::create();
        let ip_in = |args: &[&str]| {
            let out = ns.run(Path::new("ip"), args, &[]);
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        };
        // A node has a default route; without one, its processes could not even try
        // 169.254.170.23 (the route is looked up before the OUTPUT rule rewrites it).
        // (A veth pair inside the namespace: this kernel has no dummy links.)
        ip_in(&[
            "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1",
        ]);
        ip_in(&["addr", "add", "192.0.2.10/24", "dev", "uplink0"]);
        ip_in(&["link", "set", "uplink0", "up"]);
        ip_in(&["link", "set", "uplink1", "up"]);
        ip_in(&["route", "add", "default", "via", "192.0.2.1"]);
        ip_in(&["addr", "add", "169.254.169.254/32", "dev", "lo"]);
        ns.enter(|| upstream::start_at(([169, 254, 169, 254], 80).into()));
        let moto = moto::start(Some(&ns.name));
        let listener = ns.enter(|| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"));
        let apiserver: SocketAddr = apiserver::shared()
            .url
            .trim_start_matches("https://")
            .parse()
            .expect("API server address");
        let api = DelayProxy::start_on(listener, apiserver, Duration::ZERO);
        Node {
            ns,
            moto,
            api,
            ip: "192.0.2.10",
        }
    }

    /// `curl` in the node's namespace for the credentials path, with the token in `file`
    /// (none if `None`): (status, body).
    fn credentials(&self, file: Option<&Path>) -> (u16, String) {
        let mut args = vec![
            "-sS".to_owned(),
            "--max-time".into(),
            "5".into(),
            "-w".into(),
            "\n%{http_code}".into(),
        ];
        if let Some(file) = file {
            let token = std::fs::read_to_string(file).expect("token");
            args.extend(["-H".into(), format!("Authorization: {token}")]);
        }
        args.push(wired::FULL_URI.into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.ns.run(Path::new("curl"), &args, &[]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (status.trim().parse().unwrap_or(0), body.to_owned())
    }
}

/// GET `path` on iamlet's admin port, which is inside the node's namespace.
fn admin_get(node: &Node, admin: SocketAddr, path: &'static str) -> support::http::Reply {
    node.ns.enter(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(support::http::get(admin.ip(), admin, path, None))
    })
}

/// The value of a metric line (`name{labels}`), 0 if absent.
fn metric(node: &Node, admin: SocketAddr, series: &str) -> f64 {
    iamlet::metrics::value_in(&admin_get(node, admin, "/metrics").body, series)
}

/// One SDK's results: each case and what its run printed (the caller ARN, or the error).
type Column = Vec<(&'static str, Result<String, String>)>;

/// Where an SDK runs, and the environment it gets.
struct Run<'a> {
    ns: &'a Netns,
    env: Vec<(String, String)>,
    sts: String,
}

/// The caller ARN STS sees for `sdk`'s default credential chain, or the error it printed.
fn caller(sdk: Sdk, run: &Run<'_>) -> Result<String, String> {
    let home = tempfile::tempdir().expect("home");
    let mut env = vec![
        ("HOME".to_owned(), home.path().display().to_string()),
        (
            "AWS_CONFIG_FILE".into(),
            home.path().join("none").display().to_string(),
        ),
        (
            "AWS_SHARED_CREDENTIALS_FILE".into(),
            home.path().join("none").display().to_string(),
        ),
    ];
    env.extend(run.env.iter().cloned());
    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let sts = run.sts.as_str();
    let output = match sdk {
        Sdk::Boto3 => {
            let script = repo().join("tests/sdk/boto3_identity.py");
            let script = script.display().to_string();
            run.ns
                .run(&support::peer_program("python3"), &[&script, sts], &env)
        }
        Sdk::AwsCli => run.ns.run(
            &support::peer_program("aws"),
            &[
                "sts",
                "get-caller-identity",
                "--endpoint-url",
                sts,
                "--region",
                "us-east-1",
                "--query",
                "Arn",
                "--output",
                "text",
            ],
            &env,
        ),
        Sdk::JsV3 => {
            let script = repo().join("tests/js/identity.mjs").display().to_string();
            run.ns.run(&PathBuf::from("node"), &[&script, sts], &env)
        }
        Sdk::RustAwsConfig => {
            let env: Vec<(String, String)> =
                env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            let sts = sts.to_owned();
            return run.ns.enter(move || rust_caller(env, sts));
        }
    };
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// aws-config's default chain, unmodified, with the pod's environment.
fn rust_caller(env: Vec<(String, String)>, sts: String) -> Result<String, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let vars: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .env(aws_types::os_shim_internal::Env::from_slice(&vars))
            .http_client(rust_sdk::http_client())
            .region(aws_sdk_sts::config::Region::new("us-east-1"))
            .endpoint_url(&sts)
            .load()
            .await;
        let identity = aws_sdk_sts::Client::new(&config)
            .get_caller_identity()
            .send()
            .await
            .map_err(|err| format!("{}", aws_sdk_sts::error::DisplayErrorContext(err)))?;
        Ok(identity.arn.unwrap_or_default())
    })
}

fn assumed(role: &str, session: &str) -> String {
    format!("arn:aws:sts::123456789012:assumed-role/{role}/{session}")
}

/// The wiring of a pod's spec with the token file `file` instead of its own.
fn wiring(file: &Path) -> Vec<(String, String)> {
    vec![
        (
            "AWS_CONTAINER_CREDENTIALS_FULL_URI".into(),
            wired::FULL_URI.into(),
        ),
        (
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE".into(),
            file.display().to_string(),
        ),
    ]
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .expect("epoch")
        .as_secs()
}

/// The cases where a token must be refused, and their token files.
const REFUSED: [&str; 5] = [
    "forged",
    "expired",
    "wrong audience",
    "another node's pod",
    "deleted pod",
];

#[test]
fn every_sdk_gets_its_own_pods_role_by_token_through_iamlets_rules() {
    require_netns!();
    require_apiserver!();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let admin = runtime.block_on(apiserver::shared().admin());
    let node = Node::new();
    let nets: HashMap<&str, PodNet> = ALL
        .iter()
        .map(|sdk| sdk.pod())
        .chain(["legacy"])
        .map(|name| (name, PodNet::create_under(&node.ns)))
        .collect();
    let ips: HashMap<&str, String> = nets
        .iter()
        .map(|(n, net)| (*n, net.ip.to_string()))
        .collect();

    // The pods, on the API server.
    runtime.block_on(async {
        create_namespace(&admin, NS, Some("arn:aws:iam::123456789012:role/sdk-.*")).await;
        for account in ["boto3", "awscli", "js", "rust", "host", "legacy", "other"] {
            create_service_account(&admin, NS, account).await;
        }
        let roles: HashMap<&str, String> = ips.keys().map(|n| (*n, format!("sdk-{n}"))).collect();
        for (name, ip) in &ips {
            let spec = PodSpec {
                namespace: NS,
                name,
                node: NODE,
                ip,
                role: Some(&roles[name]),
                service_account: name,
                host_network: false,
                wired: *name != "legacy",
            };
            run_pod(&admin, &spec).await;
        }
        for (name, node_name, ip, host) in [
            ("host", NODE, node.ip, true),
            ("elsewhere", "node-sdk-other", "10.250.0.9", false),
            ("doomed", NODE, "10.250.0.10", false),
        ] {
            let account = if name == "host" { "host" } else { "other" };
            let spec = PodSpec {
                namespace: NS,
                name,
                node: node_name,
                ip,
                role: Some(if host { "sdk-host" } else { "sdk-other" }),
                service_account: account,
                host_network: host,
                wired: true,
            };
            run_pod(&admin, &spec).await;
        }
    });

    // iamlet on the node, with iptables and the token front on its node address.
    let first = &nets["boto3"];
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = apiserver::shared().kubeconfig_at(
        IAMLET_TOKEN,
        &format!("https://127.0.0.1:{}", node.api.addr.port()),
    );
    let setup = Setup {
        imds_listen: format!("{}:8181", first.host_ip),
        sts: node.moto.url(),
        upstream: "http://169.254.169.254".into(),
        pods_source: "kubernetes".into(),
        env: vec![
            ("KUBECONFIG".into(), kubeconfig.display().to_string()),
            ("NODE_NAME".into(), NODE.into()),
        ],
        extra: format!(
            "[iptables]\nenabled = true\nhost_interface = \"imlt+\"\nreconcile_interval = \"200ms\"\n\n\
             [container_credentials]\nenabled = true\nlisten = \"{}:8183\"\n",
            first.host_ip
        ),
        netns: Some(node.ns.name.clone()),
        ..Setup::default()
    };
    let iamlet = Iamlet::start(dir.path(), &setup);
    let admin_port = iamlet.admin;
    runtime.block_on(eventually(
        "ready, with the cluster's keys",
        WITHIN,
        || async { admin_get(&node, admin_port, "/readyz").status == 200 },
    ));
    let rules = String::from_utf8_lossy(
        &node
            .ns
            .run(Path::new("iptables-save"), &["-t", "nat"], &[])
            .stdout,
    )
    .into_owned();
    assert!(
        rules.contains(
            "-A OUTPUT -m comment --comment iamlet-container-credentials -j IAMLET-LOCAL"
        ),
        "{rules}"
    );

    // Tokens, projected as the kubelet does, and the bad ones.
    let root = tempfile::tempdir().expect("root");
    let (envs, files) = runtime.block_on(async {
        let mut envs = HashMap::new();
        for name in ALL
            .iter()
            .map(|sdk| sdk.pod())
            .chain(["host", "elsewhere", "doomed"])
        {
            let pod_root = root.path().join(name);
            envs.insert(name, wired::project(&admin, NS, name, &pod_root).await);
        }
        let file =
            |name: &str| PathBuf::from(&envs[name]["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]);
        let good = std::fs::read_to_string(file("boto3")).expect("token");
        let cluster_key =
            std::fs::read_to_string(apiserver::shared().signing_key()).expect("sa.key");
        let now = support::wall_clock();
        let boto3_uid = Api::<Pod>::namespaced(admin.clone(), NS)
            .get("boto3")
            .await
            .expect("pod")
            .metadata
            .uid
            .expect("uid");
        let bad = [
            ("forged", resign(&good, &wired::new_rsa_key(), |_| {})),
            (
                "expired",
                resign(&good, &cluster_key, |c| {
                    c["iat"] = json!(unix(now) - 7200);
                    c["nbf"] = json!(unix(now) - 7200);
                    c["exp"] = json!(unix(now) - 60);
                }),
            ),
            (
                "wrong audience",
                wired::mint(
                    &admin,
                    NS,
                    "boto3",
                    "boto3",
                    &boto3_uid,
                    "sts.amazonaws.com",
                    3600,
                )
                .await,
            ),
        ];
        let mut files: HashMap<&str, PathBuf> = HashMap::new();
        for (case, token) in bad {
            let path = root.path().join(case.replace(' ', "-"));
            std::fs::write(&path, token).expect("write");
            files.insert(case, path);
        }
        files.insert("another node's pod", file("elsewhere"));
        files.insert("deleted pod", file("doomed"));
        (envs, files)
    });

    // The node's own processes: nothing without a token; their IMDS is still the node's.
    let (status, body) = node.credentials(None);
    assert_eq!(status, 401, "{body}");
    assert!(!body.contains("AccessKeyId"), "{body}");
    let out = node.ns.run(
        Path::new("curl"),
        &[
            "-sS",
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 60",
            "http://169.254.169.254/latest/api/token",
        ],
        &[],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "node-upstream-token",
        "the node's IMDS traffic must reach the node's IMDS"
    );

    // The deleted pod: its token works, then it is deleted, and it stops working.
    let doomed = files["deleted pod"].clone();
    assert_eq!(node.credentials(Some(&doomed)).0, 200);
    runtime.block_on(async {
        Api::<Pod>::namespaced(admin.clone(), NS)
            .delete("doomed", &DeleteParams::default().grace_period(0))
            .await
            .expect("delete");
    });
    runtime.block_on(eventually(
        "the deleted pod's token refused",
        WITHIN,
        || async { node.credentials(Some(&doomed)).0 == 403 },
    ));
    let imds_served = "iamlet_imds_requests_total{route=\"credentials\",status=\"200\"}";
    let tokens_served =
        "iamlet_container_credentials_requests_total{route=\"credentials\",status=\"200\"}";
    let served_before = metric(&node, admin_port, tokens_served);

    // Every SDK, every token case, each SDK in a thread of its own.
    let sts_for = |net: &PodNet| format!("http://{}:{}", net.host_ip, node.moto.addr.port());
    let node_sts = node.moto.url();
    let results: Vec<(Sdk, Column)> = std::thread::scope(|scope| {
        let handles: Vec<_> = ALL
            .iter()
            .map(|&sdk| {
                let net = &nets[sdk.pod()];
                let (envs, files, node, node_sts) = (&envs, &files, &node, &node_sts);
                let sts = sts_for(net);
                scope.spawn(move || {
                    let mut column = Vec::new();
                    let own = Run {
                        ns: &net.ns,
                        env: envs[sdk.pod()].clone().into_iter().collect(),
                        sts: sts.clone(),
                    };
                    column.push(("own pod's token", caller(sdk, &own)));
                    for case in REFUSED {
                        let run = Run {
                            ns: &net.ns,
                            env: wiring(&files[case]),
                            sts: sts.clone(),
                        };
                        column.push((case, caller(sdk, &run)));
                    }
                    let host = Run {
                        ns: &node.ns,
                        env: envs["host"].clone().into_iter().collect(),
                        sts: node_sts.clone(),
                    };
                    column.push(("host-network pod", caller(sdk, &host)));
                    (sdk, column)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("SDK thread"))
            .collect()
    });
    // None of that went through IMDS: the token front served every success.
    assert_eq!(metric(&node, admin_port, imds_served), 0.0);
    let served = metric(&node, admin_port, tokens_served) - served_before;

    // Then, without the wiring: IMDS, as before.
    let legacy = &nets["legacy"];
    let legacy_results: Vec<(Sdk, Result<String, String>)> = ALL
        .iter()
        .map(|&sdk| {
            let run = Run {
                ns: &legacy.ns,
                env: Vec::new(),
                sts: sts_for(legacy),
            };
            (sdk, caller(sdk, &run))
        })
        .collect();

    // The table, then the verdicts.
    let mut table = vec![format!(
        "| case | {} |",
        ALL.map(|sdk| format!("{sdk:?}")).join(" | ")
    )];
    table.push(format!("|---|{}", "---|".repeat(ALL.len())));
    let cell = |result: &Result<String, String>| match result {
        Ok(arn) => format!("`{}`", arn.rsplit(":assumed-role/").next().unwrap_or(arn)),
        Err(_) => "refused".to_owned(),
    };
    let cases: Vec<&str> = results[0].1.iter().map(|(case, _)| *case).collect();
    for (i, case) in cases.iter().enumerate() {
        let cells: Vec<String> = results
            .iter()
            .map(|(_, column)| cell(&column[i].1))
            .collect();
        table.push(format!("| {case} | {} |", cells.join(" | ")));
    }
    let cells: Vec<String> = legacy_results.iter().map(|(_, r)| cell(r)).collect();
    table.push(format!(
        "| pod without the wiring (IMDS) | {} |",
        cells.join(" | ")
    ));
    eprintln!("{}", table.join("\n"));
    // What a user sees when refused: each SDK's own words, with iamlet's reason in them.
    for (sdk, column) in &results {
        if let Some((_, Err(error))) = column.iter().find(|(case, _)| *case == "expired") {
            let said = error
                .lines()
                .rev()
                .find(|l| l.contains("rror") || l.contains("401"))
                .unwrap_or("");
            eprintln!("{sdk:?}, expired token: {said}");
        }
    }

    for (sdk, column) in &results {
        for (case, result) in column {
            let want = match *case {
                "own pod's token" => Some(assumed(
                    &format!("sdk-{}", sdk.pod()),
                    &format!("sdk.{}", sdk.pod()),
                )),
                "host-network pod" => Some(assumed("sdk-host", "sdk.host")),
                _ => None,
            };
            match want {
                Some(want) => assert_eq!(result.as_ref(), Ok(&want), "{sdk:?}, {case}"),
                None => assert!(
                    result.is_err(),
                    "{sdk:?} got credentials with a {case} token: {result:?}"
                ),
            }
        }
    }
    for (sdk, result) in &legacy_results {
        assert_eq!(
            result.as_ref(),
            Ok(&assumed("sdk-legacy", "sdk.legacy")),
            "{sdk:?} without the wiring"
        );
    }
    assert!(
        served >= 2.0 * ALL.len() as f64,
        "{served} answers from the token front"
    );
    // The refusals were iamlet's: 401s and 403s by reason, not unreachable endpoints.
    for reason in ["signature", "expired", "audience", "not_on_this_node"] {
        let series = format!("iamlet_container_credentials_refusals_total{{reason=\"{reason}\"}}");
        assert!(
            metric(&node, admin_port, &series) >= ALL.len() as f64,
            "{series}"
        );
    }
    assert!(metric(&node, admin_port, imds_served) >= ALL.len() as f64);

    // The node's rule is repaired like the pods' rule, and uninstall takes both away.
    let save = || {
        let out = node.ns.run(Path::new("iptables-save"), &["-t", "nat"], &[]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let iptables = |args: &[&str]| {
        let out = node.ns.run(Path::new("iptables"), args, &[]);
        assert!(out.status.success(), "iptables {args:?}: {out:?}");
    };
    iptables(&["-t", "nat", "-F", "IAMLET-LOCAL"]);
    runtime.block_on(eventually("the node's rule restored", WITHIN, || async {
        save().contains("-A IAMLET-LOCAL -d 169.254.170.23/32")
    }));
    assert_eq!(node.credentials(Some(&files["expired"])).0, 401);
    drop(iamlet);
    let out = node.ns.run(
        Path::new(env!("CARGO_BIN_EXE_iamlet")),
        &["iptables", "uninstall"],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    let rules = save();
    assert!(!rules.contains("IAMLET"), "left behind:\n{rules}");
}
