//! A real kube-apiserver (v1.20.2, built from Debian's source package by
//! `.ci/kube-apiserver`) on a real etcd, on loopback. Authentication is a static token file:
//! `admin` (system:masters), tokens that authenticate as iamlet's ServiceAccounts
//! (`system:serviceaccount:iamlet-system:iamlet` for the agent, `…:iamlet-server` for the
//! server), and a `stranger` with no rights. The RBAC that deploy/ ships is applied as it is,
//! so iamlet runs with exactly those permissions.
//! No kubelet or scheduler runs: tests create pods with `spec.nodeName` set and set their IP
//! through the status subresource.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const ADMIN_TOKEN: &str = "admin-token";
pub const IAMLET_TOKEN: &str = "iamlet-token";
pub const STRANGER_TOKEN: &str = "stranger-token";
pub const SERVER_TOKEN: &str = "iamlet-server-token";

pub struct ApiServer {
    pub url: String,
    dir: PathBuf,
    _keep: tempfile::TempDir,
    _processes: Vec<Tied>,
}

/// A child process that dies with the test process: it runs under a shell that kills it when
/// its stdin (a pipe from us) closes.
struct Tied(#[allow(dead_code)] Child);

fn tied(command_line: &str, log: &Path) -> Tied {
    let script = format!(
        "{command_line} >{} 2>&1 & p=$!; cat >/dev/null; kill $p",
        log.display()
    );
    let child = Command::new("bash")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn");
    Tied(child)
}

/// Where `.ci/kube-apiserver` caches the binary.
fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("IAMLET_KUBE_APISERVER") {
        return Some(PathBuf::from(path));
    }
    let cache = std::env::var_os("IAMLET_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/iamlet"))
        })?;
    let path = cache.join("kube-apiserver-v1.20.2");
    path.exists().then_some(path)
}

/// Why the real API server cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    if binary().is_none() {
        return Some(
            "no kube-apiserver built: run `bash .ci/setup` as root (it runs .ci/kube-apiserver)"
                .into(),
        );
    }
    for tool in ["etcd", "openssl", "kubectl"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            return Some(format!(
                "{tool} is not installed: run `bash .ci/setup` as root"
            ));
        }
    }
    None
}

/// Skips the calling test where the real API server cannot run; in CI it must.
#[macro_export]
macro_rules! require_apiserver {
    () => {
        if let Some(reason) = support::apiserver::unavailable() {
            support::skip(&reason);
            return;
        }
    };
}

fn run(dir: &Path, program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .expect(program);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One API server for the whole test binary.
pub fn shared() -> &'static ApiServer {
    static SERVER: OnceLock<ApiServer> = OnceLock::new();
    SERVER.get_or_init(start)
}

fn start() -> ApiServer {
    let keep = tempfile::tempdir().expect("tempdir");
    let dir = keep.path().to_owned();
    // Certificates: rustls wants the server's IP in a subjectAltName.
    run(
        &dir,
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=iamlet-test-ca",
        ],
    );
    run(
        &dir,
        "openssl",
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=kube-apiserver",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("ext");
    run(
        &dir,
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
    run(&dir, "openssl", &["genrsa", "-out", "sa.key", "2048"]);
    run(
        &dir,
        "openssl",
        &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"],
    );
    std::fs::write(
        dir.join("tokens.csv"),
        format!(
            "{ADMIN_TOKEN},admin,admin-uid,\"system:masters\"\n\
             {IAMLET_TOKEN},system:serviceaccount:iamlet-system:iamlet,iamlet-uid,\"system:serviceaccounts,system:serviceaccounts:iamlet-system\"\n\
             {STRANGER_TOKEN},stranger,stranger-uid\n\
             {SERVER_TOKEN},system:serviceaccount:iamlet-system:iamlet-server,iamlet-server-uid,\"system:serviceaccounts,system:serviceaccounts:iamlet-system\"\n"
        ),
    )
    .expect("tokens");

    let client_port = super::free_port();
    let peer_port = super::free_port();
    let etcd = tied(
        &format!(
            "etcd --name iamlet-test --data-dir {d}/etcd --listen-client-urls http://127.0.0.1:{client_port} \
             --advertise-client-urls http://127.0.0.1:{client_port} --listen-peer-urls http://127.0.0.1:{peer_port} \
             --initial-advertise-peer-urls http://127.0.0.1:{peer_port} --initial-cluster iamlet-test=http://127.0.0.1:{peer_port}",
            d = dir.display()
        ),
        &dir.join("etcd.log"),
    );
    assert!(
        super::wait_for_port(
            ([127, 0, 0, 1], client_port).into(),
            Duration::from_secs(30)
        ),
        "etcd did not start"
    );
    let port = super::free_port();
    let d = dir.display();
    let apiserver = tied(
        &format!(
            "{bin} --etcd-servers=http://127.0.0.1:{client_port} --bind-address=127.0.0.1 \
             --advertise-address=127.0.0.1 --secure-port={port} --insecure-port=0 --cert-dir={d}/certs \
             --tls-cert-file={d}/server.crt --tls-private-key-file={d}/server.key \
             --token-auth-file={d}/tokens.csv --authorization-mode=RBAC \
             --service-account-issuer=https://kubernetes.default.svc --service-account-key-file={d}/sa.pub \
             --service-account-signing-key-file={d}/sa.key --api-audiences=https://kubernetes.default.svc \
             --service-cluster-ip-range=10.96.0.0/16 --disable-admission-plugins=ServiceAccount \
             --enable-priority-and-fairness=false",
            bin = binary().expect("binary").display()
        ),
        &dir.join("apiserver.log"),
    );
    let server = ApiServer {
        url: format!("https://127.0.0.1:{port}"),
        dir: dir.clone(),
        _keep: keep,
        _processes: vec![etcd, apiserver],
    };
    server.wait_ready();
    // deploy/'s ServiceAccount and RBAC, exactly as shipped.
    let admin = server.kubeconfig(ADMIN_TOKEN);
    let kubectl = |args: &[&str]| {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&admin)
            .args(args)
            .output()
            .expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let repo = super::repo();
    kubectl(&[
        "apply",
        "--validate=false",
        "-f",
        &repo
            .join("deploy/base/namespace.yaml")
            .display()
            .to_string(),
    ]);
    kubectl(&[
        "apply",
        "--validate=false",
        "-n",
        "iamlet-system",
        "-f",
        &repo
            .join("deploy/base/serviceaccount.yaml")
            .display()
            .to_string(),
    ]);
    for rbac in [
        "deploy/overlays/standalone/rbac.yaml",
        "deploy/overlays/server-backed/server-rbac.yaml",
        "deploy/components/startup-taint/rbac.yaml",
    ] {
        kubectl(&[
            "apply",
            "--validate=false",
            "-n",
            "iamlet-system",
            "-f",
            &repo.join(rbac).display().to_string(),
        ]);
    }
    server
}

impl ApiServer {
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let url = format!("{}/readyz", self.url);
        while Instant::now() < deadline {
            let out = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
                .arg(self.dir.join("ca.crt"))
                .args(["-H", &format!("Authorization: Bearer {ADMIN_TOKEN}"), &url])
                .output()
                .expect("curl");
            if out.stdout == b"200" {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let log = std::fs::read_to_string(self.dir.join("apiserver.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        panic!(
            "kube-apiserver not ready within 120 s:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    /// The cluster's service-account signing key (PKCS#8 PEM), as
    /// `--service-account-signing-key-file`.
    pub fn signing_key(&self) -> PathBuf {
        self.dir.join("sa.key")
    }

    /// Writes a kubeconfig for `token` and returns its path.
    pub fn kubeconfig(&self, token: &str) -> PathBuf {
        self.kubeconfig_at(token, &self.url)
    }

    /// A kubeconfig for `token` that reaches the API server at `url` (through a proxy; the
    /// server's certificate names 127.0.0.1 and localhost).
    pub fn kubeconfig_at(&self, token: &str, url: &str) -> PathBuf {
        use base64::Engine;
        let ca = std::fs::read(self.dir.join("ca.crt")).expect("ca");
        let ca = base64::engine::general_purpose::STANDARD.encode(ca);
        let name = format!(
            "{token}-{}.kubeconfig",
            url.rsplit(':').next().unwrap_or_default()
        );
        let path = self.dir.join(name);
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\n\
             users:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: u\n\
             current-context: test\n",
            url
        );
        // Whole or not at all: tests running at once write the same file, and a client that
        // read it half-written would find no current context.
        let partial = tempfile::NamedTempFile::new_in(&self.dir).expect("tempfile");
        std::fs::write(partial.path(), text).expect("kubeconfig");
        partial.persist(&path).expect("kubeconfig");
        path
    }

    /// A kube client with admin rights, for the test's own changes.
    pub async fn admin(&self) -> kube::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kubeconfig =
            kube::config::Kubeconfig::read_from(self.kubeconfig(ADMIN_TOKEN)).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("config");
        kube::Client::try_from(config).expect("client")
    }
}

/// Creates namespace `name`, with `permitted` as its `iam.amazonaws.com/permitted` policy.
pub async fn create_namespace(client: &kube::Client, name: &str, permitted: Option<&str>) {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, PostParams};
    let mut annotations = serde_json::Map::new();
    if let Some(permitted) = permitted {
        annotations.insert("iam.amazonaws.com/permitted".into(), permitted.into());
    }
    let namespace: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "annotations": annotations}
    }))
    .expect("namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create namespace");
}

/// Creates a pod bound to `node` and, as its kubelet would, reports it running at `pod_ip`.
pub async fn run_pod(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    node: &str,
    pod_ip: &str,
    role: Option<&str>,
    host_network: bool,
) {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, Patch, PatchParams, PostParams};
    let mut annotations = serde_json::Map::new();
    if let Some(role) = role {
        annotations.insert("iam.amazonaws.com/role".into(), role.into());
    }
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"nodeName": node, "hostNetwork": host_network, "containers": [{"name": "app", "image": "app"}]}
    }))
    .expect("pod");
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let status = serde_json::json!({"status": {"phase": "Running", "podIP": pod_ip, "podIPs": [{"ip": pod_ip}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("set pod status");
}
