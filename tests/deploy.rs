//! deploy/: every overlay renders with kustomize, validates strictly against the Kubernetes
//! schemas (offline), has what a node daemon needs, and carries an iamlet.toml that iamlet
//! accepts with the environment the DaemonSet gives it. An overlay of one's own sets the image
//! and the CNI's interfaces in one place each; the monitoring kustomization scrapes the port
//! the DaemonSet declares.

mod support;

use std::process::Command;

const OVERLAYS: [&str; 2] = ["standalone", "server-backed"];

/// The rendered overlay, or `None` (with the reason printed) where kubectl is missing outside CI.
fn render(overlay: &str) -> Option<String> {
    render_dir(&format!("deploy/overlays/{overlay}"))
}

/// `kubectl kustomize` of a directory of the repository.
fn render_dir(dir: &str) -> Option<String> {
    let overlay = dir;
    let dir = support::repo().join(dir);
    let out = match Command::new("kubectl").arg("kustomize").arg(&dir).output() {
        Ok(out) => out,
        Err(err) => {
            support::skip(&format!(
                "kubectl not found ({err}); run `bash .ci/setup` as root"
            ));
            return None;
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kustomize {overlay}: {stderr}");
    assert!(
        !stderr.contains("deprecated"),
        "kustomize {overlay} warns: {stderr}"
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs kubernetes-validate --strict on rendered manifests.
fn validate_strictly(overlay: &str, rendered: &str) {
    let validator = support::peer_program("kubernetes-validate");
    let file = tempfile::NamedTempFile::new().expect("tempfile");
    std::fs::write(file.path(), rendered).expect("write");
    let out = Command::new(&validator)
        .args(["--strict", "--quiet"])
        .arg(file.path())
        .output()
        .expect("run kubernetes-validate");
    assert!(
        out.status.success(),
        "{overlay} does not validate:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn overlays_render_and_validate_strictly() {
    let validator = support::peer_program("kubernetes-validate");
    for overlay in OVERLAYS {
        let Some(rendered) = render(overlay) else {
            return;
        };
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        std::fs::write(file.path(), &rendered).expect("write");
        let out = Command::new(&validator)
            .args(["--strict", "--quiet"])
            .arg(file.path())
            .output()
            .expect("run kubernetes-validate");
        assert!(
            out.status.success(),
            "{overlay} does not validate:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_daemonset_has_what_a_node_daemon_needs() {
    for overlay in OVERLAYS {
        let Some(rendered) = render(overlay) else {
            return;
        };
        for needed in [
            "kind: DaemonSet",
            "hostNetwork: true",
            "- NET_ADMIN",
            "- ALL",
            "fieldPath: spec.nodeName",
            "fieldPath: status.hostIP",
            "value: $(HOST_IP):8181",
            "value: $(HOST_IP):8182",
            "value: $(HOST_IP):8183",
            "name: admin",
            "name: IAMLET_IPTABLES__HOST_INTERFACE",
            "path: /run/xtables.lock",
            "path: /var/lib/iamlet",
            "- operator: Exists",
            "type: RollingUpdate",
            "- health",
            "readOnlyRootFilesystem: true",
            "name: iamlet-config-",
        ] {
            assert!(rendered.contains(needed), "{overlay}: missing {needed:?}");
        }
    }
}

/// The rendered overlay's objects, parsed (with the venv's PyYAML).
fn objects(overlay: &str) -> Option<Vec<serde_json::Value>> {
    let rendered = render(overlay)?;
    let mut python = Command::new(support::peer_program("python3"))
        .args([
            "-c",
            "import sys, json, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    {
        use std::io::Write;
        let mut stdin = python.stdin.take().expect("stdin");
        stdin.write_all(rendered.as_bytes()).expect("write");
    }
    let out = python.wait_with_output().expect("python");
    assert!(out.status.success(), "cannot parse the {overlay} overlay");
    Some(serde_json::from_slice(&out.stdout).expect("json"))
}

fn find<'a>(objects: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The rules granted to ServiceAccount `account` through ClusterRoleBindings, as
/// (resource, verb) pairs.
fn rights_of(objects: &[serde_json::Value], account: &str) -> Vec<(String, String)> {
    let mut rights = Vec::new();
    for binding in objects.iter().filter(|o| o["kind"] == "ClusterRoleBinding") {
        let bound = binding["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["kind"] == "ServiceAccount" && s["name"] == account);
        if !bound {
            continue;
        }
        let role = find(
            objects,
            "ClusterRole",
            binding["roleRef"]["name"].as_str().unwrap_or_default(),
        );
        for rule in role["rules"].as_array().into_iter().flatten() {
            let resources = rule["resources"].as_array().into_iter().flatten();
            let urls = rule["nonResourceURLs"].as_array().into_iter().flatten();
            for resource in resources.chain(urls) {
                for verb in rule["verbs"].as_array().into_iter().flatten() {
                    rights.push((
                        resource.as_str().unwrap_or_default().to_owned(),
                        verb.as_str().unwrap_or_default().to_owned(),
                    ));
                }
            }
        }
    }
    rights.sort();
    rights.dedup();
    rights
}

fn pairs(rights: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut pairs: Vec<_> = rights
        .iter()
        .map(|(r, v)| ((*r).to_owned(), (*v).to_owned()))
        .collect();
    pairs.sort();
    pairs
}

/// What the Kubernetes pod source needs: read pods, list and watch namespaces, write Events.
const POD_SOURCE_RIGHTS: [(&str, &str); 7] = [
    ("events", "create"),
    ("events", "patch"),
    ("namespaces", "list"),
    ("namespaces", "watch"),
    ("pods", "get"),
    ("pods", "list"),
    ("pods", "watch"),
];

/// What the token front needs: the cluster's issuer and keys.
const TOKEN_FRONT_RIGHTS: [(&str, &str); 2] = [
    ("/.well-known/openid-configuration", "get"),
    ("/openid/v1/jwks", "get"),
];

#[test]
fn only_what_reads_pods_gets_kubernetes_api_rights() {
    let Some(standalone) = objects("standalone") else {
        return;
    };
    let Some(server_backed) = objects("server-backed") else {
        return;
    };
    // Standalone: the agent reads pods and the cluster's token keys; exactly those rights.
    let agent_rights: Vec<_> = POD_SOURCE_RIGHTS
        .into_iter()
        .chain(TOKEN_FRONT_RIGHTS)
        .collect();
    assert_eq!(rights_of(&standalone, "iamlet"), pairs(&agent_rights));
    // Server-backed: the agents get nothing, not even a token; the server reads pods.
    assert!(rights_of(&server_backed, "iamlet").is_empty());
    let agents = find(&server_backed, "DaemonSet", "iamlet");
    assert_eq!(
        agents["spec"]["template"]["spec"]["automountServiceAccountToken"],
        false
    );
    assert_eq!(
        rights_of(&server_backed, "iamlet-server"),
        pairs(&POD_SOURCE_RIGHTS)
    );
    let rendered = render("server-backed").unwrap_or_default();
    assert!(rendered.contains("secretName: iamlet-agent-tls"));
    assert!(!rendered.contains("- secrets"), "more rights than needed");
}

#[test]
fn the_server_is_deployed_for_availability() {
    let Some(objects) = objects("server-backed") else {
        return;
    };
    let server = find(&objects, "Deployment", "iamlet-server");
    let spec = &server["spec"]["template"]["spec"];
    assert_eq!(server["spec"]["replicas"], 2);
    let spread: Vec<&str> = spec["topologySpreadConstraints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["topologyKey"].as_str())
        .collect();
    assert!(
        spread.contains(&"topology.kubernetes.io/zone"),
        "{spread:?}"
    );
    let container = &spec["containers"][0];
    assert_eq!(container["args"][0], "server");
    let probe = container["readinessProbe"]["exec"]["command"].to_string();
    assert!(
        probe.contains("\"iamlet\",\"health\",\"--ready\""),
        "{probe}"
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    let secrets: Vec<&str> = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["secret"]["secretName"].as_str())
        .collect();
    assert_eq!(secrets, ["iamlet-server-tls"]);

    let budget = find(&objects, "PodDisruptionBudget", "iamlet-server");
    assert_eq!(budget["spec"]["minAvailable"], 1);
    assert_eq!(
        budget["spec"]["selector"]["matchLabels"],
        server["spec"]["selector"]["matchLabels"]
    );
    let service = find(&objects, "Service", "iamlet-server");
    assert_eq!(service["spec"]["clusterIP"], "None", "must be headless");
    assert_eq!(service["spec"]["ports"][0]["port"], 9610);
}

#[test]
fn both_sides_get_certificates_with_dns_names_only() {
    let Some(objects) = objects("server-backed") else {
        return;
    };
    let certificate = |name| find(&objects, "Certificate", name);
    let (server, agent) = (certificate("iamlet-server"), certificate("iamlet-agent"));
    assert_eq!(server["spec"]["secretName"], "iamlet-server-tls");
    assert_eq!(agent["spec"]["secretName"], "iamlet-agent-tls");
    for (certificate, usage) in [(server, "server auth"), (agent, "client auth")] {
        let spec = &certificate["spec"];
        assert!(
            spec["ipAddresses"].is_null() && spec["uris"].is_null(),
            "{spec}"
        );
        assert!(spec["dnsNames"].as_array().is_some_and(|n| !n.is_empty()));
        assert!(
            spec["usages"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|u| u == usage),
            "{spec}"
        );
        // One CA signs both sides, so each trusts the other.
        assert_eq!(spec["issuerRef"]["name"], "iamlet-ca");
    }
    // The host the agents dial is on the server's certificate.
    let agent_config =
        std::fs::read_to_string(support::repo().join("deploy/overlays/server-backed/iamlet.toml"))
            .expect("iamlet.toml");
    let host = agent_config
        .lines()
        .find_map(|line| line.strip_prefix("server = \""))
        .and_then(|rest| rest.split(':').next())
        .expect("kiam.server");
    assert!(
        server["spec"]["dnsNames"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n == host),
        "{host} is not on the server certificate"
    );
    // cert-manager's own objects have no schema offline: check the issuers exist.
    find(&objects, "Issuer", "iamlet-ca");
    find(&objects, "Issuer", "iamlet-selfsigned");
}

#[test]
fn the_server_config_passes_config_check() {
    let file = support::repo().join("deploy/overlays/server-backed/server.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_iamlet"))
        .args(["config", "check"])
        .arg(file)
        .output()
        .expect("run iamlet");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `iamlet config check` on an overlay's config, with the DaemonSet's environment.
fn check(overlay: &str) -> std::process::Output {
    let file = support::repo()
        .join("deploy/overlays")
        .join(overlay)
        .join("iamlet.toml");
    Command::new(env!("CARGO_BIN_EXE_iamlet"))
        .args(["config", "check"])
        .arg(file)
        .env("NODE_NAME", "node-1")
        .env("HOST_IP", "10.0.0.1")
        .env("IAMLET_IMDS__LISTEN", "10.0.0.1:8181")
        .env("IAMLET_ADMIN__LISTEN", "10.0.0.1:8182")
        .env("IAMLET_CONTAINER_CREDENTIALS__LISTEN", "10.0.0.1:8183")
        .env("IAMLET_IPTABLES__HOST_INTERFACE", "cali+")
        .output()
        .expect("run iamlet")
}

#[test]
fn overlay_configs_pass_config_check() {
    for overlay in OVERLAYS {
        let out = check(overlay);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{overlay}: {stderr}");
    }
}

#[test]
fn the_startup_taint_component_renders_and_validates() {
    let Some(plain) = render("standalone") else {
        return;
    };
    // An overlay of the user's, beside the repository's (kustomize wants relative paths): the
    // standalone overlay plus the component.
    let target = support::repo().join("target");
    std::fs::create_dir_all(&target).expect("target");
    let dir = tempfile::tempdir_in(&target).expect("tempdir");
    let deploy = support::repo().join("deploy");
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  \
         - ../../deploy/overlays/standalone\ncomponents:\n  - ../../deploy/components/startup-taint\n",
    )
    .expect("kustomization");
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir.path())
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!plain.contains("IAMLET_PODS__STARTUP_TAINT"));
    assert!(rendered.contains("name: IAMLET_PODS__STARTUP_TAINT"));
    assert!(rendered.contains("value: iamlet.io/agent-not-ready"));
    assert!(rendered.contains("- nodes"));
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, &rendered).expect("write");
    let out = Command::new(support::peer_program("kubernetes-validate"))
        .args(["--strict", "--quiet"])
        .arg(&file)
        .arg(deploy.join("components/startup-taint/policy.yaml"))
        .output()
        .expect("kubernetes-validate");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_overlay_of_your_own_sets_image_and_host_interface_in_one_place() {
    // Nothing but the DaemonSet's environment sets the interfaces: not the overlays' files.
    for overlay in OVERLAYS {
        let file = support::repo()
            .join("deploy/overlays")
            .join(overlay)
            .join("iamlet.toml");
        let config = std::fs::read_to_string(&file).expect("read");
        assert!(
            !config
                .lines()
                .any(|line| line.starts_with("host_interface")),
            "{overlay}/iamlet.toml sets it again"
        );
        // The shipped image is a placeholder that says how to set it.
        let Some(rendered) = render(overlay) else {
            return;
        };
        assert!(rendered.contains("image: iamlet\n"), "{overlay}");
    }
    let daemonset =
        std::fs::read_to_string(support::repo().join("deploy/base/daemonset.yaml")).expect("read");
    assert!(daemonset.contains("kustomize edit set image iamlet="));

    let Some(mine) = render_dir("deploy/examples/my-cluster") else {
        return;
    };
    validate_strictly("deploy/examples/my-cluster", &mine);
    assert!(
        mine.contains("image: ghcr.io/example/iamlet:0.1.0"),
        "{mine}"
    );
    assert!(!mine.contains("image: iamlet\n"), "the placeholder is left");
    assert_eq!(
        mine.matches("name: IAMLET_IPTABLES__HOST_INTERFACE")
            .count(),
        1,
        "{mine}"
    );
    let setting = "name: IAMLET_IPTABLES__HOST_INTERFACE\n          value: lxc+";
    assert!(mine.contains(setting), "the patch did not take:\n{mine}");
}

#[test]
fn monitoring_scrapes_the_port_the_daemonset_declares() {
    let Some(monitoring) = render_dir("deploy/monitoring") else {
        return;
    };
    assert!(monitoring.contains("kind: PodMonitor"));
    assert!(monitoring.contains("kind: PrometheusRule"));
    assert!(monitoring.contains("    port: admin\n"), "{monitoring}");
    assert!(monitoring.contains("namespace: iamlet-system"));
    let Some(standalone) = render("standalone") else {
        return;
    };
    assert!(standalone.contains("- containerPort: 8182\n          name: admin"));
}
