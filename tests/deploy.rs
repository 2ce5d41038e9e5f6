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
            assert!(
                std::env::var_os("CI").is_none(),
                "in CI kubectl must be there: {err}"
            );
            eprintln!("skipped: kubectl not found ({err}); run `bash .ci/setup` as root");
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

#[test]
fn only_standalone_gets_kubernetes_api_rights() {
    let Some(standalone) = render("standalone") else {
        return;
    };
    let Some(server_backed) = render("server-backed") else {
        return;
    };
    assert!(standalone.contains("kind: ClusterRole\n"));
    for rule in ["- pods", "- namespaces", "- events"] {
        assert!(standalone.contains(rule), "standalone RBAC lacks {rule}");
    }
    assert!(!standalone.contains("- secrets"), "more rights than needed");
    assert!(!server_backed.contains("kind: ClusterRole"));
    assert!(server_backed.contains("automountServiceAccountToken: false"));
    assert!(server_backed.contains("secretName: iamlet-agent-tls"));
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
