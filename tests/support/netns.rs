//! Pods as network namespaces: each gets a veth pair to the host and its own address, so an
//! unmodified SDK process inside it reaches iamlet from that address. Needs root; tests say
//! why they skip without it. Everything made here is removed on drop, and namespaces left by a
//! test process that died are removed by the next one.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU8, Ordering};

const PREFIX: &str = "imlt";

/// Why network-namespace tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("network-namespace tests need root".to_owned());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("network-namespace tests need iproute2 (`ip`)".to_owned());
    }
    None
}

/// Skips the calling test, saying why, where namespaces cannot be made. In CI they must run.
#[macro_export]
macro_rules! require_netns {
    () => {
        if let Some(reason) = support::netns::unavailable() {
            support::skip(&reason);
            return;
        }
    };
}

/// Runs `ip args`, asserting success.
fn ip(args: &[&str]) -> Output {
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A network namespace of its own, with loopback up.
pub struct Netns {
    pub name: String,
}

static NEXT: AtomicU8 = AtomicU8::new(1);

impl Netns {
    pub fn create() -> Netns {
        remove_orphans();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("{PREFIX}{}n{n}", std::process::id());
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// `program args` inside the namespace, with exactly `env` (plus PATH).
    pub fn command(&self, program: &Path, args: &[&str], env: &[(&str, String)]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name])
            .arg(program)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        for (name, value) in env {
            command.env(name, value);
        }
        command
    }

    pub fn run(&self, program: &Path, args: &[&str], env: &[(&str, String)]) -> Output {
        self.command(program, args, env)
            .output()
            .expect("run in namespace")
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it opens are inside.
    pub fn enter<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open namespace");
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("namespace thread")
    }
}

impl Netns {
    /// Gives the namespace its own /etc/hosts (`ip netns exec` bind-mounts it over /etc/hosts).
    pub fn hosts(&self, lines: &str) {
        let dir = format!("/etc/netns/{}", self.name);
        std::fs::create_dir_all(&dir).expect("netns etc");
        std::fs::write(
            format!("{dir}/hosts"),
            format!("127.0.0.1 localhost\n{lines}"),
        )
        .expect("hosts");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

/// A pod: a namespace joined by a veth pair to its host (this machine, or a node namespace),
/// with address 10.X.N.2/30, the host side 10.X.N.1 and the default route through it.
pub struct PodNet {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub host_ip: Ipv4Addr,
    host_if: String,
    host_ns: Option<String>,
}

impl PodNet {
    /// A pod whose host is this machine.
    pub fn create() -> PodNet {
        Self::link(None)
    }

    /// A pod whose host is `node`.
    pub fn create_under(node: &Netns) -> PodNet {
        Self::link(Some(node.name.clone()))
    }

    fn link(host_ns: Option<String>) -> PodNet {
        let ns = Netns::create();
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let x = 100 + (pid % 100) as u8;
        let host_if = format!("{PREFIX}{}h{n}", pid % 100_000);
        let pod_if = format!("{PREFIX}{}p{n}", pid % 100_000);
        let host_ip = Ipv4Addr::new(10, x, n, 1);
        let pod_ip = Ipv4Addr::new(10, x, n, 2);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &pod_if, "netns", &ns.name,
        ]);
        let on_host: Vec<&str> = match &host_ns {
            Some(node) => {
                ip(&["link", "set", &host_if, "netns", node]);
                vec!["-n", node]
            }
            None => vec![],
        };
        let host = |args: &[&str]| ip(&[on_host.as_slice(), args].concat());
        host(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        host(&["link", "set", &host_if, "up"]);
        let pod = |args: &[&str]| ip(&[&["-n", ns.name.as_str()][..], args].concat());
        pod(&["addr", "add", &format!("{pod_ip}/30"), "dev", &pod_if]);
        pod(&["link", "set", &pod_if, "up"]);
        pod(&["route", "add", "default", "via", &host_ip.to_string()]);
        PodNet {
            ns,
            ip: pod_ip,
            host_ip,
            host_if,
            host_ns,
        }
    }

    pub fn run(&self, program: &Path, args: &[&str], env: &[(&str, String)]) -> Output {
        self.ns.run(program, args, env)
    }

    /// Adds another address on the host side, reachable from the pod through its default route.
    pub fn add_host_address(&self, address: Ipv4Addr) {
        let mut args = Vec::new();
        if let Some(node) = &self.host_ns {
            args.extend(["-n", node.as_str()]);
        }
        let address = format!("{address}/32");
        args.extend([
            "addr",
            "add",
            address.as_str(),
            "dev",
            self.host_if.as_str(),
        ]);
        ip(&args);
    }

    pub fn enter<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        self.ns.enter(f)
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both; a namespace (and its pair) may
        // otherwise linger while anything still holds a reference to it.
        let mut command = Command::new("ip");
        if let Some(node) = &self.host_ns {
            command.args(["-n", node]);
        }
        let _ = command.args(["link", "del", &self.host_if]).output();
    }
}

/// Deletes namespaces and host links of earlier test processes that are gone.
fn remove_orphans() {
    if let Ok(links) = Command::new("ip").args(["-o", "link"]).output() {
        for line in String::from_utf8_lossy(&links.stdout).lines() {
            let Some(name) = line
                .split(": ")
                .nth(1)
                .map(|n| n.split('@').next().unwrap_or(n))
            else {
                continue;
            };
            let Some(rest) = name.strip_prefix(PREFIX) else {
                continue;
            };
            // Host links are named PREFIX<pid % 100000>h<n>.
            let Some((suffix, _)) = rest.split_once('h') else {
                continue;
            };
            if !process_alive(|pid| (pid % 100_000).to_string() == suffix) {
                let _ = Command::new("ip").args(["link", "del", name]).output();
            }
        }
    }
    let Ok(listing) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&listing.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('n').next().unwrap_or_default();
        if !pid.is_empty() && !process_alive(|p| p.to_string() == pid) {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// Whether a running process's id satisfies `matches`.
fn process_alive(matches: impl Fn(u32) -> bool) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .any(matches)
}
