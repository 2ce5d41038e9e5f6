//! The node image is real: deploy/image/build.sh builds it offline with podman, from a root
//! filesystem made with mmdebstrap and this build's iamlet, and what the image holds runs:
//! its iamlet, its iptables (both backends) and its CA certificates, from its root filesystem,
//! in a network namespace with a pod routed through it.
//!
//! `podman run` is not permitted in this sandbox: the OCI runtime's setrlimit needs
//! CAP_SYS_RESOURCE, which the sandbox lacks. So the test mounts the image, copies its root
//! filesystem and runs the entrypoint's binary in it with chroot, as the container would (the
//! runtime would provide /dev; the test makes /dev/null).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::iamlet::{Iamlet, Setup, pod};
use support::netns::{Netns, PodNet};
use support::{moto, repo};

/// Why the image cannot be built and run here, if it cannot.
fn unavailable() -> Option<String> {
    if let Some(reason) = support::netns::unavailable() {
        return Some(reason);
    }
    for tool in ["podman", "mmdebstrap"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Some(format!(
                "{tool} is not installed; run `bash .ci/setup` as root"
            ));
        }
    }
    None
}

macro_rules! require_image_tools {
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

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn podman(args: &[&str]) -> String {
    let out = Command::new("podman").args(args).output().expect("podman");
    assert!(out.status.success(), "podman {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// An image built by deploy/image/build.sh, removed on drop.
struct Image {
    name: String,
    arch: String,
}

impl Image {
    fn build(context: &Path) -> Image {
        let name = format!("localhost/iamlet-image-test:{}", std::process::id());
        let out = Command::new("bash")
            .arg(repo().join("deploy/image/build.sh"))
            .env("IMAGE", &name)
            .env("IAMLET_BINARY", env!("CARGO_BIN_EXE_iamlet"))
            .env("CONTEXT_DIR", context)
            .output()
            .expect("run build.sh");
        assert!(out.status.success(), "build.sh:\n{}", text(&out));
        let arch = podman(&["image", "inspect", &name, "--format", "{{.Architecture}}"]);
        Image { name, arch }
    }

    /// A writable copy of the image's root filesystem, in `into`.
    fn root_filesystem(&self, into: &Path) -> PathBuf {
        let mounted = podman(&["image", "mount", &self.name]);
        let root = into.join("root");
        std::fs::create_dir_all(&root).expect("root");
        let out = Command::new("cp")
            .args(["-a", &format!("{mounted}/."), &root.display().to_string()])
            .output()
            .expect("cp");
        podman(&["image", "unmount", &self.name]);
        assert!(out.status.success(), "copy: {}", text(&out));
        // What the container runtime would mount.
        std::fs::create_dir_all(root.join("dev")).expect("dev");
        let out = Command::new("mknod")
            .args(["-m", "666"])
            .arg(root.join("dev/null"))
            .args(["c", "1", "3"])
            .output()
            .expect("mknod");
        assert!(out.status.success(), "mknod: {}", text(&out));
        root
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let per_arch = format!("{}-{}", self.name, self.arch);
        let _ = Command::new("podman")
            .args(["rmi", "--force", &self.name, &per_arch])
            .output();
    }
}

/// `program args` from the image's root, in `ns`.
fn in_image(ns: &Netns, root: &Path, program: &str, args: &[&str]) -> Output {
    let [sh, rest @ ..] = support::iamlet::in_root(root);
    let mut sh_args: Vec<&str> = rest.iter().map(String::as_str).collect();
    sh_args.push(program);
    sh_args.extend(args);
    ns.run(Path::new(&sh), &sh_args, &[])
}

#[test]
fn the_image_runs_iamlet_and_its_iptables_in_both_backends() {
    require_image_tools!();
    let work = tempfile::tempdir().expect("tempdir");
    let image = Image::build(&work.path().join("context"));

    // What the container starts, and as what.
    let entrypoint = podman(&[
        "image",
        "inspect",
        &image.name,
        "--format",
        "{{json .Config.Entrypoint}} {{json .Config.Cmd}}",
    ]);
    assert_eq!(
        entrypoint,
        r#"["/usr/local/bin/iamlet"] ["agent","--config","/etc/iamlet/iamlet.toml"]"#
    );
    let root = image.root_filesystem(work.path());
    assert!(
        root.join("etc/ssl/certs/ca-certificates.crt").exists(),
        "no CA certificates: iamlet could not reach STS over TLS"
    );
    assert!(!root.join("usr/bin/apt").exists(), "more than iamlet needs");

    let node = Netns::create();
    let out = in_image(&node, &root, "/usr/local/bin/iamlet", &["--version"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("iamlet {}", env!("CARGO_PKG_VERSION")),
        "{}",
        text(&out)
    );
    let pod_net = PodNet::create_under(&node);
    let moto = moto::start(Some(&node.name));

    // A legacy node, detected from the image's own iptables-*-save; then nft, as configured.
    let legacy_rules = [
        &["-t", "nat", "-N", "KUBE-SERVICES"][..],
        &["-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"],
        &["-t", "nat", "-A", "KUBE-SERVICES", "-j", "RETURN"],
    ];
    for rule in legacy_rules {
        let out = in_image(&node, &root, "iptables-legacy", rule);
        assert!(out.status.success(), "{}", text(&out));
    }
    for (backend_setting, backend) in [("auto", "legacy"), ("nft", "nft")] {
        let setup = Setup {
            imds_listen: format!("{}:8181", pod_net.host_ip),
            sts: moto.url(),
            extra: format!(
                "[iptables]\nenabled = true\nhost_interface = \"imlt+\"\nbackend = \"{backend_setting}\"\n"
            ),
            pods: vec![pod(&pod_net.ip.to_string(), "shop", "web-0", Some("web"))],
            ..Setup::default()
        };
        let log = work.path().join(format!("iamlet-{backend}.log"));
        let mut iamlet = Iamlet::start_in_image(&root, &node.name, &setup, &log);
        let chosen = format!("\"backend\":\"{backend}\"");
        assert!(iamlet.log().contains(&chosen), "{}", iamlet.log());

        let save = format!("iptables-{backend}-save");
        let rules =
            String::from_utf8_lossy(&in_image(&node, &root, &save, &[]).stdout).into_owned();
        assert!(
            rules.contains("-j IAMLET") && rules.contains("--to-destination"),
            "{backend}: no rule in the image's {save}:\n{rules}"
        );
        // A pod reaches the image's iamlet through 169.254.169.254 and gets its credentials.
        let credentials = "http://169.254.169.254/latest/meta-data/iam/security-credentials/";
        let curl = |url: &str| {
            let out = pod_net.run(Path::new("curl"), &["-sS", "--max-time", "5", url], &[]);
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert_eq!(curl(credentials), "web", "{}", iamlet.log());
        let document: serde_json::Value =
            serde_json::from_str(&curl(&format!("{credentials}web"))).expect("JSON");
        assert_eq!(document["Code"], "Success", "{document}");
        assert!(iamlet.stop().success(), "{}", iamlet.log());

        let out = in_image(
            &node,
            &root,
            "/usr/local/bin/iamlet",
            &[
                "iptables",
                "uninstall",
                "--config",
                "/etc/iamlet/iamlet.toml",
            ],
        );
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            text(&out).contains(&format!("iptables backend: {backend}")),
            "{}",
            text(&out)
        );
        let rules =
            String::from_utf8_lossy(&in_image(&node, &root, &save, &[]).stdout).into_owned();
        assert!(!rules.contains("IAMLET"), "left behind:\n{rules}");
    }
}
