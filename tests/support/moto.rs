//! moto_server as the STS peer. One per test binary, shared, tied to the test process by a
//! pipe: when the process ends, the pipe closes and the wrapper shell stops moto.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

pub struct Moto {
    pub addr: SocketAddr,
    /// Host the pods should use (differs from `addr` for tests in network namespaces).
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
    MOTO.get_or_init(|| start("0.0.0.0"))
}

fn start(host: &str) -> Moto {
    let port = super::free_port();
    let program = super::peer_program("moto_server");
    let script = format!(
        "\"{}\" -H {host} -p {port} >/dev/null 2>&1 & moto=$!; cat >/dev/null; kill $moto",
        program.display()
    );
    let child = Command::new("bash")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .spawn()
        .expect("start moto_server");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    assert!(
        super::wait_for_port(addr, Duration::from_secs(30)),
        "moto_server did not start on {addr}"
    );
    Moto {
        addr,
        _lifeline: Mutex::new(child),
    }
}
