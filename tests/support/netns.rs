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
            assert!(
                std::env::var_os("CI").is_none(),
                "in CI these tests must run: {reason}"
            );
            eprintln!("skipped: {reason}");
            return;
        }
    };
}

pub struct PodNet {
    pub name: String,
    host_if: String,
    pub ip: Ipv4Addr,
    pub host_ip: Ipv4Addr,
}

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

impl PodNet {
    /// A namespace with address 10.X.N.2/30, its host side 10.X.N.1, X from this process id.
    pub fn create() -> PodNet {
        static NEXT: AtomicU8 = AtomicU8::new(1);
        remove_orphans();
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let x = 100 + (pid % 100) as u8;
        let name = format!("{PREFIX}{pid}n{n}");
        let host_if = format!("{PREFIX}{}h{n}", pid % 100_000);
        let pod_if = format!("{PREFIX}{}p{n}", pid % 100_000);
        let host_ip = Ipv4Addr::new(10, x, n, 1);
        let pod_ip = Ipv4Addr::new(10, x, n, 2);
        ip(&["netns", "add", &name]);
        let net = PodNet {
            name: name.clone(),
            host_if: host_if.clone(),
            ip: pod_ip,
            host_ip,
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &pod_if, "netns", &name,
        ]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut full = vec!["netns", "exec", &name, "ip"];
            full.extend_from_slice(args);
            ip(&full);
        };
        inside(&["addr", "add", &format!("{pod_ip}/30"), "dev", &pod_if]);
        inside(&["link", "set", &pod_if, "up"]);
        inside(&["link", "set", "lo", "up"]);
        inside(&["route", "add", "default", "via", &host_ip.to_string()]);
        net
    }

    /// Runs `program args` inside the namespace with exactly `env` (plus PATH).
    pub fn run(&self, program: &Path, args: &[&str], env: &[(&str, String)]) -> Output {
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
        command.output().expect("run in namespace")
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it opens are the pod's.
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

impl Drop for PodNet {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both; the namespace may otherwise linger
        // (and its pair with it) while anything still holds a reference to it.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
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
