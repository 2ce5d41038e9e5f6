//! What the scale benchmarks share: a fake STS with a set answer time, the iamlet binary run
//! with a config of the benchmark's own (fixed admin port, so start-up can be timed from the
//! first instant), its memory from /proc, and percentiles.
#![allow(dead_code)] // Each benchmark uses a different part.

pub mod fake_sts;
pub mod plot;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support;
use crate::support::fake_kube::FakeKube;

pub const BASE_ROLE_ARN: &str = "arn:aws:iam::123456789012:role/";

/// Which iamlet runs, and how.
pub enum Kind {
    /// `iamlet agent` for node-1's pods.
    Agent,
    /// `iamlet server`, cluster-wide, with mutual TLS files in its directory.
    Server,
}

/// A running iamlet (agent or server), started from its first instant.
pub struct Process {
    child: Option<Child>,
    pub started: Instant,
    pub admin: SocketAddr,
    pub imds: SocketAddr,
    pub log: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Process {
    /// Starts iamlet against `kube` and `sts`, with `extra` TOML appended to its config.
    pub fn start(kind: Kind, kube: &FakeKube, sts: &str, extra: &str) -> Process {
        let dir = tempfile::tempdir().expect("tempdir");
        let admin: SocketAddr = ([127, 0, 0, 1], support::free_port()).into();
        let imds: SocketAddr = ([127, 0, 0, 1], support::free_port()).into();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kube.kubeconfig("iamlet-token")).expect("kubeconfig");
        let mut config = format!(
            "[imds]\nlisten = \"{imds}\"\ntoken_key_file = \"{key}\"\nupstream = \"http://127.0.0.1:9\"\n\n\
             [admin]\nlisten = \"{admin}\"\nstatus_socket = \"{status}\"\n\n\
             [aws]\nregion = \"us-east-1\"\nsts_endpoint = \"{sts}\"\nbase_role_arn = \"{BASE_ROLE_ARN}\"\n\n\
             [pods]\nsource = \"kubernetes\"\nnode_name = \"node-1\"\n\n{extra}\n",
            key = dir.path().join("imds-token.key").display(),
            status = dir.path().join("status.sock").display(),
        );
        let command = match kind {
            Kind::Agent => "agent",
            Kind::Server => {
                let ca = support::pki::Ca::new("scale-ca");
                let server = ca.server(&["localhost"]);
                std::fs::write(dir.path().join("ca.crt"), ca.pem()).expect("ca");
                std::fs::write(dir.path().join("tls.crt"), server.cert_pem).expect("cert");
                std::fs::write(dir.path().join("tls.key"), server.key_pem).expect("key");
                config.push_str(&format!(
                    "[server]\nlisten = \"127.0.0.1:{}\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
                    support::free_port(),
                    dir.path().join("tls.crt").display(),
                    dir.path().join("tls.key").display(),
                    dir.path().join("ca.crt").display(),
                ));
                "server"
            }
        };
        let config_path = dir.path().join("iamlet.toml");
        std::fs::write(&config_path, config).expect("config");
        let log = dir.path().join("iamlet.log");
        let log_file = std::fs::File::create(&log).expect("log");
        let started = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_iamlet"))
            .args([command, "--config"])
            .arg(&config_path)
            .args(["--log-format", "json", "--log-level", "info"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("AWS_ACCESS_KEY_ID", "AKIDNODEOWN")
            .env("AWS_SECRET_ACCESS_KEY", "node-own-secret")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("KUBECONFIG", &kubeconfig)
            .envs(child_env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start iamlet");
        Process {
            child: Some(child),
            started,
            admin,
            imds,
            log,
            dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    /// Polls `/readyz` every `every` until it answers 200; the time since start.
    pub async fn wait_ready(&mut self, every: Duration, within: Duration) -> Duration {
        let deadline = self.started + within;
        loop {
            if let Ok(stream) = tokio::net::TcpStream::connect(self.admin).await {
                drop(stream);
                let reply = support::http::get(self.admin.ip(), self.admin, "/readyz", None).await;
                if reply.status == 200 {
                    return self.started.elapsed();
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("iamlet exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "iamlet not ready within {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(every).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn memory(&self) -> Memory {
        memory(self.pid())
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Extra environment for iamlet, from `SCALE_CHILD_ENV` (`NAME=VALUE` pairs, space-separated),
/// to try allocator settings such as `MALLOC_ARENA_MAX=1` without a rebuild.
fn child_env() -> Vec<(String, String)> {
    std::env::var("SCALE_CHILD_ENV")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A process's memory, in bytes (threads counted), from /proc/PID/status.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// Resident set now (VmRSS): anonymous (heap, stacks) plus file-backed (the binary's
    /// pages that were touched).
    pub rss: u64,
    /// Peak resident set (VmHWM).
    pub hwm: u64,
    pub anon: u64,
    pub file: u64,
    pub threads: u64,
}

pub fn memory(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    Memory {
        rss: field("VmRSS:") * 1024,
        hwm: field("VmHWM:") * 1024,
        anon: field("RssAnon:") * 1024,
        file: field("RssFile:") * 1024,
        threads: field("Threads:"),
    }
}

pub const MIB: f64 = 1024.0 * 1024.0;

/// The `p`-th percentile (0..=1) of `values` (sorted here).
pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return f64::NAN;
    }
    let at = ((values.len() as f64 - 1.0) * p).round() as usize;
    values[at.min(values.len() - 1)]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The machine, for the record: `nproc` and the CPU model.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            line.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("{cpus} CPUs, {model}")
}

/// The repository root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Namespaces in every simulated cluster; a cluster's namespaces do not grow with its pods.
pub const NAMESPACES: usize = 50;
/// Identities (role and service account) among node-1's pods.
pub const NODE_IDENTITIES: usize = 20;
/// Identities among the other nodes' pods.
pub const CLUSTER_IDENTITIES: usize = 200;
/// Pods per other node, as on a node at the kubelet's default `maxPods`.
pub const PODS_PER_NODE: usize = 110;

/// Puts a cluster in `kube`: the namespaces (each permitting every role), `on_node` pods on
/// node-1 and `others` on other nodes, all as real pods look (`full_pod`).
pub fn load_cluster(kube: &FakeKube, on_node: usize, others: usize) {
    use support::fake_kube::{Workload, full_pod, namespace};
    for k in 0..NAMESPACES {
        kube.apply_namespace(namespace(
            &format!("team-{k}"),
            Some(&format!("{BASE_ROLE_ARN}.*")),
        ));
    }
    let node_pods = (0..on_node).map(|i| {
        let identity = i % NODE_IDENTITIES;
        full_pod(&Workload {
            namespace: &format!("team-{identity}"),
            name: &format!("app{identity}-7d4b9c8f6-{i:05}"),
            uid: &format!("0b5e2c1a-0000-4000-8000-{i:012}"),
            node: "node-1",
            ip: Some(&node_ip(i)),
            role: Some(&format!("role-{identity}")),
            service_account: "app",
        })
    });
    let other_pods = (0..others).map(|i| {
        let identity = i % CLUSTER_IDENTITIES;
        full_pod(&Workload {
            namespace: &format!("team-{}", identity % NAMESPACES),
            name: &format!("svc{identity}-7d4b9c8f6-{i:06}"),
            uid: &format!("7f3d9a2b-0000-4000-8000-{i:012}"),
            node: &format!("node-{}", 2 + i / PODS_PER_NODE),
            ip: Some(&format!(
                "10.{}.{}.{}",
                (i >> 16) & 255,
                (i >> 8) & 255,
                i & 255
            )),
            role: Some(&format!("svc-role-{identity}")),
            service_account: &format!("sa-{}", identity / NAMESPACES),
        })
    });
    kube.load_pods(node_pods.chain(other_pods));
}

/// The IP of node-1's pod `i`: a loopback address, so the benchmark can stand for the pod.
pub fn node_ip(i: usize) -> String {
    format!("127.1.{}.{}", i / 250, 1 + i % 250)
}
