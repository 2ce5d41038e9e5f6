//! Server-backed mode: instead of watching pods and calling STS itself, iamlet asks a remote
//! kiam-compatible server over mutual TLS gRPC (package `kiam`, service `KiamService`), so
//! worker nodes need neither `sts:AssumeRole` nor Kubernetes API access.
//!
//! - `proto`: the generated protocol code (`kiam.proto` beside this file);
//! - `tls`: the client certificate, key and CA, re-read when their files change;
//! - `client`: balancing over every address behind the server name, deadlines and retries;
//! - `broker`: the [`crate::broker::Broker`] the pod-facing server uses in this mode, with a
//!   cache by (pod IP, role);
//! - `server`: `iamlet server`, the kiam-compatible server itself.

mod balance;
mod broker;
pub mod client;
pub mod server;
mod tls;

pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("kiam");
}

pub use broker::KiamBroker;
pub use client::KiamClient;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `[kiam]` section.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `host:port` of the kiam server; non-empty switches iamlet to server-backed mode. Every
    /// address the host resolves to is used (a headless Service).
    pub server: String,
    /// Client certificate (PEM).
    pub cert: PathBuf,
    /// Client key (PEM).
    pub key: PathBuf,
    /// CA bundle the server's certificate must chain to (PEM).
    pub ca: PathBuf,
    /// Time allowed for one call to the server, retries included.
    #[serde(with = "humantime_serde")]
    pub request_deadline: Duration,
    /// How often the server name is resolved again.
    #[serde(with = "humantime_serde")]
    pub resolve_interval: Duration,
    /// How often the certificate files are checked for changes (rotation by cert-manager).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: String::new(),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            ca: PathBuf::new(),
            request_deadline: Duration::from_secs(5),
            resolve_interval: Duration::from_secs(30),
            reload_interval: Duration::from_secs(10),
        }
    }
}

impl Config {
    pub fn enabled(&self) -> bool {
        !self.server.is_empty()
    }

    /// The host and port of `server`.
    pub fn host_port(&self) -> Option<(&str, u16)> {
        let (host, port) = self.server.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = port.parse().ok()?;
        (!host.is_empty()).then_some((host, port))
    }
}

/// The error texts kiam servers answer with (gRPC status UNKNOWN), which agents act on:
/// GetPodCredentials for an unknown IP (retried by agents),
pub const NO_POD_FOUND: &str = "no pod found";
/// GetPodRole for an unknown IP (kiam v4 passes its pod cache's error on; retried too),
pub const POD_NOT_FOUND: &str = "pod not found";
/// and a policy refusal (not retried).
pub const FORBIDDEN: &str = "forbidden by policy";

/// A gRPC code as a metric label.
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::Unavailable => "unavailable",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission_denied",
        Code::Internal => "internal",
        Code::Cancelled => "cancelled",
        _ => "other",
    }
}
