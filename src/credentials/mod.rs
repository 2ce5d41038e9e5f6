//! Credentials: what a pod is handed, where they come from (`CredentialSource`, STS), and the
//! cache in front of the source.

mod cache;
mod limiter;
mod sts;

pub use cache::{Cache, Held};
pub use limiter::{Priority, RateLimiter};
pub use sts::StsSource;

use std::fmt;
use std::future::Future;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::policy::{RoleArn, SessionName};

/// The `[credentials]` section.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Lifetime asked of STS for each session.
    #[serde(with = "humantime_serde")]
    pub session_duration: Duration,
    /// Cached credentials with less than this left are never served; they are fetched anew.
    #[serde(with = "humantime_serde")]
    pub refresh_before: Duration,
    /// STS session name: `{namespace}`, `{service_account}` and `{pod}` are replaced.
    pub session_name: String,
    /// Pass `kubernetes-namespace` and `kubernetes-service-account` (and `kubernetes-pod-name`
    /// when the session name has `{pod}`) as session tags, for ABAC.
    pub session_tags: bool,
    /// AssumeRole calls per second, at most, over time.
    pub sts_qps: f64,
    /// AssumeRole calls at once, at most, after a quiet spell.
    pub sts_burst: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            session_duration: Duration::from_secs(3600),
            refresh_before: Duration::from_secs(30 * 60),
            session_name: "{namespace}.{service_account}".to_owned(),
            session_tags: false,
            sts_qps: 20.0,
            sts_burst: 20,
        }
    }
}

/// What STS is asked for; also the cache key, so pods that STS would see as one identity
/// share one session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AssumeRoleRequest {
    pub role_arn: RoleArn,
    pub session_name: SessionName,
    pub external_id: Option<String>,
    /// Session tags, sorted by key; empty unless `session_tags` is on.
    pub tags: Vec<(String, String)>,
}

/// A temporary credential. `Debug` never shows the secret parts.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: SystemTime,
    pub last_updated: SystemTime,
}

impl Credentials {
    /// Time left before expiry, as seen at `now` (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expiration.duration_since(now).unwrap_or_default()
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &"<redacted>")
            .field("expiration", &self.expiration)
            .finish()
    }
}

/// Why credentials could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// STS answered and said no (AccessDenied, a malformed request…): asking again won't help.
    #[error("STS refused to assume {role}: {message}")]
    Refused { role: String, message: String },
    /// STS could not be reached or was in trouble (throttling, 5xx, timeout): worth a retry.
    #[error("STS unavailable ({kind}) while assuming {role}: {message}")]
    Unavailable {
        role: String,
        kind: Trouble,
        message: String,
    },
}

/// What kind of trouble STS was in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    Throttled,
    ServerError,
    /// Timeouts, refused connections, DNS: STS was not reached or did not answer.
    Network,
    /// STS refused iamlet's own credentials (expired, invalid, clock skew): a fault of this
    /// node, not of the pod's role, and over once iamlet's credentials are renewed.
    OwnCredentials,
}

impl Trouble {
    pub fn label(self) -> &'static str {
        match self {
            Trouble::Throttled => "throttled",
            Trouble::ServerError => "server_error",
            Trouble::Network => "network",
            Trouble::OwnCredentials => "own_credentials",
        }
    }
}

impl std::fmt::Display for Trouble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Something that turns an [`AssumeRoleRequest`] into credentials: STS in production, fakes in
/// tests, decorators (rate limits, metrics) around either.
pub trait CredentialSource: Send + Sync + 'static {
    fn assume_role(
        &self,
        request: &AssumeRoleRequest,
    ) -> impl Future<Output = Result<Credentials, Error>> + Send;
}
