//! Interception for real, in network namespaces: a "node" namespace runs iamlet with iptables
//! enabled, moto, and a fake of the node's real IMDS on 169.254.169.254:80 that holds the
//! node's secret. "Pods" are namespaces routed through the node. boto3 in a pod, with no
//! endpoint override, must get its own role's credentials from 169.254.169.254; the node's
//! secret must never reach a pod while the rule stands. The rule goes into the iptables
//! backend (legacy or nft) that the node's own rules are in.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use support::iamlet::{Iamlet, Setup, pod};
use support::netns::{Netns, PodNet};
use support::{moto, repo, upstream};

struct Node {
    ns: Netns,
    with_role: PodNet,
    without_role: PodNet,
    moto: moto::Moto,
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        let ns = Netns::create();
        let with_role = PodNet::create_under(&ns);
        let without_role = PodNet::create_under(&ns);
        // The node's own IMDS, as EC2 provides it: iamlet must keep pods away from it.
        ns.run(
            Path::new("ip"),
            &["addr", "add", "169.254.169.254/32", "dev", "lo"],
            &[],
        );
        ns.enter(|| upstream::start_at(([169, 254, 169, 254], 80).into()));
        let moto = moto::start(Some(&ns.name));
        Node {
            ns,
            with_role,
            without_role,
            moto,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn start_iamlet(&self, iptables_extra: &str) -> Iamlet {
        let setup = Setup {
            // The node-side address of the first pod link: a node IP that pods are routed to.
            imds_listen: format!("{}:8181", self.with_role.host_ip),
            sts: self.moto.url(),
            upstream: "http://169.254.169.254".into(),
            extra: format!(
                "[iptables]\nenabled = true\nhost_interface = \"imlt+\"\nreconcile_interval = \"200ms\"\n{iptables_extra}\n"
            ),
            pods: vec![
                pod(&self.with_role.ip.to_string(), "shop", "web-0", Some("web")),
                pod(&self.without_role.ip.to_string(), "shop", "no-role", None),
            ],
            netns: Some(self.ns.name.clone()),
            ..Setup::default()
        };
        Iamlet::start(self.dir.path(), &setup)
    }

    /// boto3 in `pod`, with its default credential chain and no IMDS endpoint override.
    fn boto3(&self, pod: &PodNet) -> Output {
        let home = tempfile::tempdir().expect("home");
        let script = repo()
            .join("tests/sdk/boto3_identity.py")
            .display()
            .to_string();
        let sts = format!("http://{}:{}", pod.host_ip, self.moto.addr.port());
        let env = [
            ("HOME", home.path().display().to_string()),
            (
                "AWS_CONFIG_FILE",
                home.path().join("none").display().to_string(),
            ),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                home.path().join("none").display().to_string(),
            ),
        ];
        pod.run(&support::peer_program("python3"), &[&script, &sts], &env)
    }

    /// `curl` in `pod` for `path` on 169.254.169.254: (succeeded, body).
    fn fetch(&self, pod: &PodNet, path: &str) -> (bool, String) {
        let url = format!("http://169.254.169.254{path}");
        let out = pod.run(Path::new("curl"), &["-sS", "--max-time", "5", &url], &[]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// The nat table as iptables-nft sees it (the backend of a node with no rules yet).
    fn iptables_save(&self) -> String {
        self.save(NFT)
    }

    /// The nat table in one backend.
    fn save(&self, backend: Backend) -> String {
        let out = self.ns.run(Path::new(backend.save), &["-t", "nat"], &[]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn iptables(&self, args: &[&str]) {
        self.run_in(NFT, args);
    }

    fn run_in(&self, backend: Backend, args: &[&str]) {
        let out = self.ns.run(Path::new(backend.program), args, &[]);
        assert!(
            out.status.success(),
            "{} {args:?}: {}",
            backend.program,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Rules like those kube-proxy and kubelet leave on a node, in `backend`: a services
    /// chain with a jump from PREROUTING, and, with `hint`, kubelet's KUBE-IPTABLES-HINT chain.
    fn node_rules(&self, backend: Backend, hint: bool) {
        self.run_in(backend, &["-t", "nat", "-N", "KUBE-SERVICES"]);
        self.run_in(
            backend,
            &["-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"],
        );
        self.run_in(
            backend,
            &["-t", "nat", "-A", "OUTPUT", "-j", "KUBE-SERVICES"],
        );
        self.run_in(
            backend,
            &["-t", "nat", "-A", "KUBE-SERVICES", "-j", "RETURN"],
        );
        if hint {
            self.run_in(backend, &["-t", "mangle", "-N", "KUBE-IPTABLES-HINT"]);
        }
    }

    fn uninstall(&self) -> Output {
        let binary = PathBuf::from(env!("CARGO_BIN_EXE_iamlet"));
        self.ns.run(&binary, &["iptables", "uninstall"], &[])
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Waits (bounded) until the nat table satisfies `ready`.
fn wait_for_rules(node: &Node, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let rules = node.iptables_save();
        if ready(&rules) || Instant::now() > deadline {
            return rules;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An iptables backend's programs.
#[derive(Clone, Copy)]
struct Backend {
    program: &'static str,
    save: &'static str,
}

const LEGACY: Backend = Backend {
    program: "iptables-legacy",
    save: "iptables-legacy-save",
};
const NFT: Backend = Backend {
    program: "iptables-nft",
    save: "iptables-nft-save",
};

fn intercepting(rules: &str) -> bool {
    rules.contains("-j IAMLET") && rules.contains("--to-destination")
}

#[test]
fn pods_reach_iamlet_at_169_254_169_254_and_never_the_node() {
    require_netns!();
    let node = Node::new();
    let mut iamlet = node.start_iamlet("");

    let out = node.boto3(&node.with_role);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout(&out),
        "arn:aws:sts::123456789012:assumed-role/web/shop.default"
    );
    // Reconciling a correct table changes nothing: after several rounds, nothing was restored.
    let rounds = |log: &str| log.matches("interception rule checked: intact").count();
    let deadline = Instant::now() + Duration::from_secs(15);
    while rounds(&iamlet.log()) < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(rounds(&iamlet.log()) >= 5, "{}", iamlet.log());
    assert!(
        !iamlet.log().contains("restored"),
        "the rule churns:\n{}",
        iamlet.log()
    );
    // Proxied paths come from the node's IMDS through iamlet; its secrets do not.
    assert_eq!(
        node.fetch(&node.with_role, "/latest/meta-data/placement/region"),
        (true, "eu-west-1".into())
    );
    let (_, user_data) = node.fetch(&node.with_role, "/latest/user-data");
    assert!(
        !user_data.contains("bootstrap"),
        "user-data leaked: {user_data}"
    );

    let out = node.boto3(&node.without_role);
    assert!(
        !out.status.success(),
        "a pod without a role got credentials: {}",
        stdout(&out)
    );
    let (_, body) = node.fetch(
        &node.without_role,
        "/latest/meta-data/iam/security-credentials/node-role",
    );
    assert!(
        !body.contains(upstream::NODE_SECRET),
        "the node's credentials leaked"
    );

    // A flushed chain and a deleted jump both come back.
    node.iptables(&["-t", "nat", "-F", "IAMLET"]);
    let rules = wait_for_rules(&node, intercepting);
    assert!(
        intercepting(&rules),
        "the DNAT rule was not restored:\n{rules}"
    );
    node.iptables(&[
        "-t",
        "nat",
        "-D",
        "PREROUTING",
        "-m",
        "comment",
        "--comment",
        "iamlet-imds-interception",
        "-j",
        "IAMLET",
    ]);
    let rules = wait_for_rules(&node, intercepting);
    assert!(intercepting(&rules), "the jump was not restored:\n{rules}");
    assert!(iamlet.log().contains("restored"));
    assert_eq!(
        stdout(&node.boto3(&node.with_role)),
        "arn:aws:sts::123456789012:assumed-role/web/shop.default"
    );

    // Fail closed: iamlet stops, the rule stays, and pods get nothing rather than the node's IMDS.
    assert!(iamlet.stop().success());
    assert!(
        intercepting(&node.iptables_save()),
        "the rule went with iamlet"
    );
    let (reached, body) = node.fetch(
        &node.with_role,
        "/latest/meta-data/iam/security-credentials/node-role",
    );
    assert!(
        !reached && !body.contains(upstream::NODE_SECRET),
        "a pod reached the node's IMDS: {body}"
    );

    // Uninstall removes everything, and says so when there is nothing left.
    let out = node.uninstall();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = node.iptables_save();
    assert!(!rules.contains("IAMLET"), "left behind:\n{rules}");
    let out = node.uninstall();
    assert!(out.status.success());
    assert!(stdout(&out).contains("nothing to remove"));
}

#[test]
fn remove_on_exit_takes_the_rule_away() {
    require_netns!();
    let node = Node::new();
    let mut iamlet = node.start_iamlet("remove_on_exit = true");
    assert!(intercepting(&node.iptables_save()));
    assert!(iamlet.stop().success());
    let rules = node.iptables_save();
    assert!(!rules.contains("IAMLET"), "left behind:\n{rules}");
    // The documented trade-off: with the rule gone, pods reach the node's own IMDS.
    let (reached, _) = node.fetch(&node.with_role, "/latest/meta-data/placement/region");
    assert!(reached);
}

/// The backend iamlet logged it chose.
fn chosen_backend(iamlet: &Iamlet) -> String {
    iamlet
        .log()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|event| event["message"] == "iptables backend chosen")
        .and_then(|event| event["backend"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no backend choice logged:\n{}", iamlet.log()))
}

#[test]
fn on_a_legacy_node_the_rule_goes_into_legacy() {
    require_netns!();
    let node = Node::new();
    // kube-proxy's rules in legacy (an older node); kubelet's hint chain absent, so the rule
    // counts decide. nft holds nothing.
    node.node_rules(LEGACY, false);
    let mut iamlet = node.start_iamlet("");
    assert_eq!(chosen_backend(&iamlet), "legacy");
    assert!(intercepting(&node.save(LEGACY)), "{}", node.save(LEGACY));
    assert!(!node.save(NFT).contains("IAMLET"), "{}", node.save(NFT));
    // Pods really are intercepted by the legacy rule.
    let out = node.boto3(&node.with_role);
    assert_eq!(
        stdout(&out),
        "arn:aws:sts::123456789012:assumed-role/web/shop.default",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The legacy rule is repaired like any other.
    node.run_in(LEGACY, &["-t", "nat", "-F", "IAMLET"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !intercepting(&node.save(LEGACY)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(intercepting(&node.save(LEGACY)), "not restored in legacy");
    assert!(iamlet.stop().success());

    // Uninstall detects the same backend and removes the rule from it.
    let out = node.uninstall();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout(&out).contains("iptables backend: legacy"),
        "{}",
        stdout(&out)
    );
    assert!(
        !node.save(LEGACY).contains("IAMLET"),
        "{}",
        node.save(LEGACY)
    );
    assert!(
        node.save(LEGACY).contains("KUBE-SERVICES"),
        "the node's rules went too"
    );
}

#[test]
fn kubelets_hint_chain_outweighs_rule_counts_and_the_config_outweighs_both() {
    require_netns!();
    let node = Node::new();
    // More rules in legacy (leftovers), but kubelet marks nft as the node's backend.
    node.node_rules(LEGACY, false);
    node.node_rules(NFT, true);
    node.run_in(NFT, &["-t", "nat", "-D", "OUTPUT", "-j", "KUBE-SERVICES"]);
    let mut iamlet = node.start_iamlet("");
    assert_eq!(chosen_backend(&iamlet), "nft");
    assert!(intercepting(&node.save(NFT)), "{}", node.save(NFT));
    assert!(
        !node.save(LEGACY).contains("IAMLET"),
        "{}",
        node.save(LEGACY)
    );
    assert!(iamlet.stop().success());
    assert!(node.uninstall().status.success());
    assert!(!node.save(NFT).contains("IAMLET"));

    // iptables.backend overrides detection.
    let mut iamlet = node.start_iamlet("backend = \"legacy\"");
    assert_eq!(chosen_backend(&iamlet), "legacy");
    assert!(intercepting(&node.save(LEGACY)), "{}", node.save(LEGACY));
    assert!(!node.save(NFT).contains("IAMLET"), "{}", node.save(NFT));
    assert!(iamlet.stop().success());
}
