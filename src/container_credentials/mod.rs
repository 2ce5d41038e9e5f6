//! The token front: credentials for pods that prove who they are with their projected
//! service-account token, not with their IP address. Unmodified SDKs speak it (the
//! container-credentials protocol of ECS and EKS Pod Identity) once a pod has
//! `AWS_CONTAINER_CREDENTIALS_FULL_URI=http://169.254.170.23/v1/credentials` and
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` naming a token projected with the configured
//! audience.
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/v1/credentials` | with `Authorization: <token>`: the token's pod's credentials |
//!
//! A request flows through:
//! 1. `Host` must be `169.254.170.23` (or `169.254.170.23:80`), never a name: else 421;
//! 2. [`verifier`]: the token, checked on the node ([`jwt`]) against the cluster's keys
//!    ([`keys`]), kept once verified until it expires; else 401;
//! 3. the pod it is bound to must be in this node's pod index with the same uid, name,
//!    namespace and service account, and not finished (host-network pods are served here);
//!    else 403;
//! 4. the same [`Local`] stack as the IMDS front: namespace policy (a denial is a 403 with
//!    its Event and metric), session name, the prefetching cache, STS; a refusal by STS is a
//!    403, STS trouble a 503.
//!
//! Answers are JSON: the credential document with `AccountId` on 200, `Code` and `Message`
//! otherwise; never the IMDS shape, never credentials with an error. No token or credential
//! is logged.

mod document;
pub mod jwt;
pub mod keys;
mod routes;
pub mod verifier;

#[cfg(test)]
mod testing;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::Local;
use crate::clock::{Clock, SystemClock};
use crate::credentials::CredentialSource;
use crate::http_server::{self, Limits};
use crate::metrics::Metrics;
use crate::pods::PodLookup;
use crate::supervisor::Supervisor;
use keys::{ApiServerKeys, KeySource, Keys};
use verifier::Verifier;

/// The one path served.
pub const CREDENTIALS_PATH: &str = "/v1/credentials";
/// The `Host` values answered: the EKS Pod Identity address the SDKs accept over plain
/// HTTP, with or without the default port.
pub const HOSTS: [&str; 2] = ["169.254.170.23", "169.254.170.23:80"];

/// The `[container_credentials]` section.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Serve the token front (standalone mode with the Kubernetes pod source only).
    pub enabled: bool,
    /// Its address; with `iptables.enabled`, pods' (and the node's) 169.254.170.23:80 is sent
    /// here.
    pub listen: SocketAddr,
    /// The audience pods' projected tokens are requested for.
    pub audience: String,
    /// The cluster's service-account issuer; empty = read from the API server's
    /// `/.well-known/openid-configuration`.
    pub issuer: String,
    /// How often the cluster's keys are fetched again (besides on an unknown key id).
    #[serde(with = "humantime_serde")]
    pub jwks_refresh_interval: Duration,
    /// Verified tokens kept (until each expires).
    pub token_cache_size: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            enabled: false,
            listen: ([127, 0, 0, 1], 8183).into(),
            audience: "iamlet".to_owned(),
            issuer: String::new(),
            jwks_refresh_interval: Duration::from_secs(600),
            token_cache_size: 10_000,
        }
    }
}

/// Everything a request handler needs.
pub struct State<P, S, C, K> {
    pub local: Arc<Local<P, S, C>>,
    pub verifier: Verifier<K>,
    pub metrics: Metrics,
    pub request_timeout: Duration,
}

/// Serves the token front on `listener` until `cancel` fires.
pub async fn serve<P, S, C, K>(
    listener: TcpListener,
    state: Arc<State<P, S, C, K>>,
    limits: Limits,
    cancel: CancellationToken,
) -> std::io::Result<()>
where
    P: PodLookup,
    S: CredentialSource,
    C: Clock,
    K: KeySource,
{
    http_server::serve(listener, limits, cancel, move |remote, request| {
        routes::handle(state.clone(), remote, request)
    })
    .await
}

/// The token front of the agent: its listener and state, and the keys it keeps current.
pub struct Front<P, S, C> {
    listener: TcpListener,
    state: Arc<State<P, S, C, ApiServerKeys>>,
    keys: Arc<Keys<ApiServerKeys>>,
    refresh_interval: Duration,
}

impl<P: PodLookup, S: CredentialSource, C: Clock> Front<P, S, C> {
    /// The front on `listener`, in front of `local`, reading the cluster's keys with `client`
    /// (iamlet's own Kubernetes client).
    pub fn new(
        config: &Config,
        listener: TcpListener,
        local: Arc<Local<P, S, C>>,
        client: kube::Client,
        metrics: Metrics,
        request_timeout: Duration,
    ) -> Self {
        let issuer = Some(config.issuer.trim().to_owned()).filter(|issuer| !issuer.is_empty());
        let keys = Arc::new(Keys::new(ApiServerKeys(client), issuer));
        let verifier = Verifier::new(
            keys.clone(),
            config.audience.clone(),
            Arc::new(SystemClock),
            config.token_cache_size,
        );
        Front {
            listener,
            state: Arc::new(State {
                local,
                verifier,
                metrics,
                request_timeout,
            }),
            keys,
            refresh_interval: config.jwks_refresh_interval,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        crate::app::local_addr(&self.listener)
    }

    /// `Ok` once the cluster's keys are in; else why not.
    pub fn readiness(&self) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
        let keys = self.keys.clone();
        move || keys.readiness()
    }

    /// Serves, and keeps the keys current, under `supervisor`.
    pub fn spawn(self, supervisor: &Supervisor, limits: Limits) {
        supervisor.spawn(
            "container credentials server",
            serve(self.listener, self.state, limits, supervisor.cancel()),
        );
        let (keys, cancel) = (self.keys, supervisor.cancel());
        let interval = self.refresh_interval;
        supervisor.spawn_infallible("service-account key refresh", async move {
            keys.run(interval, cancel).await;
        });
    }
}
