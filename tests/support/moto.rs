//! moto_server as the STS peer. One per test binary, shared, tied to the test process by a
//! pipe: when the process ends, the pipe closes and the wrapper shell stops moto.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

pub struct Moto {
    pub addr: SocketAddr,
    _lifeline: Mutex<Child>,
}

impl Moto {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// moto listening on every address of this host (so network-namespace pods reach it too).
pub fn shared() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| start(None))
}

/// moto on every address of network namespace `netns` (this machine's when `None`). The
/// returned address is the one to use from inside that namespace.
pub fn start(netns: Option<&str>) -> Moto {
    let port = super::free_port();
    let program = super::peer_program("moto_server");
    let exec = netns
        .map(|ns| format!("ip netns exec {ns} "))
        .unwrap_or_default();
    let script = format!(
        "{exec}\"{}\" -H 0.0.0.0 -p {port} >/dev/null 2>&1 & moto=$!; cat >/dev/null; kill $moto",
        program.display()
    );
    let child = Command::new("bash")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .spawn()
        .expect("start moto_server");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let ready = match netns {
        None => super::wait_for_port(addr, Duration::from_secs(120)),
        Some(ns) => {
            let path = format!("/run/netns/{ns}");
            std::thread::spawn(move || {
                let file = std::fs::File::open(&path).expect("open namespace");
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                super::wait_for_port(addr, Duration::from_secs(120))
            })
            .join()
            .expect("wait thread")
        }
    };
    assert!(ready, "moto_server did not start on {addr}");
    Moto {
        addr,
        _lifeline: Mutex::new(child),
    }
}
