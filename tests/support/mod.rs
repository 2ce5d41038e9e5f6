//! Harness for the integration tests: real peers (moto for STS, the iamlet binary, SDK
//! clients) and small in-process servers where no real peer exists (a fake node IMDS, an STS
//! front that counts calls and refuses chosen roles).
#![allow(dead_code)] // Each test binary uses a different part of the harness.

pub mod apiserver;
pub mod delay_proxy;
pub mod fake_kiam;
pub mod fake_kube;
pub mod http;
pub mod iamlet;
pub mod moto;
pub mod netns;
pub mod pki;
pub mod rust_sdk;
pub mod server;
pub mod sts_front;
pub mod upstream;
pub mod wired;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A TCP port that was free a moment ago, for a process that must be told its port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until something accepts connections at `addr`.
pub fn wait_for_port(addr: SocketAddr, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A peer program from `.ci/setup`'s venv, else from PATH.
pub fn peer_program(name: &str) -> PathBuf {
    let venv = repo().join(".peers/venv/bin").join(name);
    if venv.exists() {
        return venv;
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.exists());
    on_path.unwrap_or_else(|| panic!("{name} not found: run `bash .ci/setup` first"))
}

/// Records that the calling test cannot run here and is skipping, saying why. Under `CI` a
/// skip is a failure. `.ci/test` sets `SKIPPED_TESTS_LOG` (not an `IAMLET_*` name: iamlet refuses
/// unknown ones, and children inherit it) to a file where each skip leaves a line,
/// so its summary counts the test as skipped rather than passed.
pub fn skip(reason: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "in CI this test must run: {reason}"
    );
    eprintln!("skipped: {reason}");
    if let Some(path) = std::env::var_os("SKIPPED_TESTS_LOG") {
        use std::io::Write;
        let line = format!(
            "{}: {reason}\n",
            std::thread::current().name().unwrap_or("?")
        );
        let _ = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .and_then(|mut file| file.write_all(line.as_bytes()));
    }
}

/// The wall clock, for comparing with times that a separate process (iamlet, a fake server)
/// wrote. iamlet's own code takes an injected clock; clippy refuses `SystemTime::now` elsewhere.
#[allow(
    clippy::disallowed_methods,
    reason = "tests compare with times another process read from the same wall clock"
)]
pub fn wall_clock() -> std::time::SystemTime {
    std::time::SystemTime::now()
}

/// Polls `check` until it holds, for at most `within`: watch events, refreshes and restarts
/// take a moment to show. Panics naming `what` if it never does.
pub async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    within: Duration,
    check: impl Fn() -> F,
) {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never happened within {within:?}: {what}");
}

/// As [`eventually`], with `context` (say, the tail of a process's log) in the panic message,
/// so that a failure in CI says what the system under test was doing.
pub async fn eventually_explained<F: std::future::Future<Output = bool>>(
    what: &str,
    within: Duration,
    check: impl Fn() -> F,
    context: impl Fn() -> String,
) {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "never happened within {within:?}: {what}\n--- context ---\n{}",
        context()
    );
}
