//! The pod-facing server: what pods take for the EC2 instance metadata service.
//!
//! Routes (everything under `/latest`):
//!
//! | method | path | answer |
//! |---|---|---|
//! | PUT | `/api/token` | an IMDSv2 session token, bound to the client IP; the TTL header echoed |
//! | GET | `/meta-data/iam/` | `info` and `security-credentials/`, for a pod with a role |
//! | GET | `/meta-data/iam/security-credentials/` (or without `/`) | the pod's role name |
//! | GET | `/meta-data/iam/security-credentials/<name>` | the pod's credentials, if `<name>` is its role |
//! | GET | `/meta-data/iam/info` | the pod's role as an instance profile |
//! | GET | anything else | proxied to the node's IMDS if the allow-list admits it, else 404 |
//!
//! With `tokens = "required"` every GET needs a valid token; an invalid token is refused in
//! either mode. Every connection and request first passes the client's fair share
//! ([`fair_share`]): past it, a connection is closed and a request answered 503.

mod document;
pub mod fair_share;
mod proxy;
mod routes;
mod token;

pub use document::{Documents, credentials as credential_document, timestamp};
pub use fair_share::{ClientLimits, FairShare};
pub use proxy::Error as UpstreamError;
pub use proxy::{DEFAULT_ALLOW, Upstream, check_upstream, compile_allow_list};
pub use routes::{Metadata, Route};
pub use token::KeyError;
pub use token::TokenKey;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::clock::Clock;
use crate::http_server::{self, Limits};
use crate::metrics::Metrics;

/// The `[imds]` section.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Pod-facing address; the iptables rule sends pods' 169.254.169.254:80 here.
    pub listen: std::net::SocketAddr,
    pub tokens: TokenPolicy,
    /// Where the token signing key is kept, so tokens survive restarts.
    pub token_key_file: PathBuf,
    /// The node's real IMDS.
    pub upstream: String,
    /// Regexes (anchored at both ends) of paths proxied to the node's IMDS.
    pub proxy_allow: Vec<String>,
    /// Longest time spent on one request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Longest wait for a request's headers, and for the next request on an idle connection.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// How long shutdown waits for in-flight requests.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Fair share: connections one client (pod IP) may hold open at once.
    pub client_max_connections: usize,
    /// Fair share: requests from one client being answered at once.
    pub client_max_requests: usize,
    /// Fair share: requests per second one client may make, over time.
    pub client_requests_per_second: f64,
    /// Fair share: requests one client may make at once after a quiet spell.
    pub client_burst: u32,
}

impl Config {
    /// The first fair-share key with an unusable value, and why.
    pub fn fair_share_problem(&self) -> Option<(&'static str, &'static str)> {
        if self.client_max_connections == 0 {
            Some(("imds.client_max_connections", "must be at least 1"))
        } else if self.client_max_requests == 0 {
            Some(("imds.client_max_requests", "must be at least 1"))
        } else if !(self.client_requests_per_second.is_finite()
            && self.client_requests_per_second > 0.0)
        {
            Some((
                "imds.client_requests_per_second",
                "must be a number above 0",
            ))
        } else if self.client_burst == 0 {
            Some(("imds.client_burst", "must be at least 1"))
        } else {
            None
        }
    }

    /// The fair-share bounds for one client.
    pub fn client_limits(&self) -> ClientLimits {
        ClientLimits {
            max_connections: self.client_max_connections,
            max_requests: self.client_max_requests,
            requests_per_second: self.client_requests_per_second,
            burst: self.client_burst,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: ([127, 0, 0, 1], 8181).into(),
            tokens: TokenPolicy::Optional,
            token_key_file: PathBuf::from("/var/lib/iamlet/imds-token.key"),
            upstream: "http://169.254.169.254".to_owned(),
            proxy_allow: DEFAULT_ALLOW.iter().map(|p| (*p).to_owned()).collect(),
            request_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            max_connections: 4096,
            shutdown_grace: Duration::from_secs(5),
            client_max_connections: 128,
            client_max_requests: 64,
            client_requests_per_second: 200.0,
            client_burst: 1000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenPolicy {
    /// IMDSv1 GETs without a token are answered.
    Optional,
    /// Every GET needs a valid token (IMDSv2 only).
    Required,
}

/// Everything a request handler needs.
pub struct State<B> {
    pub broker: B,
    pub tokens: TokenKey,
    pub token_policy: TokenPolicy,
    pub upstream: Upstream,
    pub metrics: Metrics,
    pub request_timeout: Duration,
    /// Wall time for tokens and documents.
    pub clock: Arc<dyn Clock>,
    /// Per-client bounds on connections, requests in flight and request rate.
    pub fair_share: FairShare,
    /// Credential documents, encoded once per credentials.
    pub documents: Documents,
}

/// Serves pods on `listener` until `cancel` fires.
pub async fn serve<B: Broker>(
    listener: TcpListener,
    state: Arc<State<B>>,
    limits: Limits,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let fair_share = state.fair_share.clone();
    http_server::serve_admitting(
        listener,
        limits,
        cancel,
        move |remote| fair_share.connection(remote.ip()).ok(),
        move |remote, connection: &fair_share::ConnectionTicket, request| {
            // Admitted now, through the connection's client: no lookup.
            let admitted = connection.request();
            routes::handle(state.clone(), remote, admitted, request)
        },
    )
    .await
}
