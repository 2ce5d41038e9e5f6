//! deploy/: every overlay renders with kustomize, validates strictly against the Kubernetes
//! schemas (offline), has what a node daemon needs, and carries an iamlet.toml that iamlet
//! accepts with the environment the DaemonSet gives it.

mod support;

use std::process::Command;

const OVERLAYS: [&str; 2] = ["standalone", "server-backed"];

/// The rendered overlay, or `None` (with the reason printed) where kubectl is missing outside CI.
fn render(overlay: &str) -> Option<String> {
    let dir = support::repo().join("deploy/overlays").join(overlay);
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
