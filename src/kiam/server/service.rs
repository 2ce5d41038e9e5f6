//! `kiam.KiamService` on the [`Local`] broker: kiam v4's semantics, so that kiam v3/v4 agents
//! (and iamlet's own, in server-backed mode) can be pointed at `iamlet server` unchanged.
//! Broker errors become gRPC statuses in exactly one place, [`status`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Code, Request, Response, Status};

use crate::broker::{Broker, Error, Local};
use crate::clock::Clock;
use crate::credentials::{self, CredentialSource};
use crate::imds::timestamp;
use crate::kiam::proto::kiam_service_server::KiamService;
use crate::kiam::proto::{
    Credentials, GetHealthRequest, GetPodCredentialsRequest, GetPodRoleRequest, HealthStatus, Role,
};
use crate::kiam::{FORBIDDEN, NO_POD_FOUND, POD_NOT_FOUND};
use crate::metrics::Metrics;
use crate::pods::PodLookup;
use crate::policy::Denial;

pub struct Service<P, S, C> {
    broker: Arc<Local<P, S, C>>,
    metrics: Metrics,
}

impl<P, S, C> Service<P, S, C> {
    pub fn new(broker: Arc<Local<P, S, C>>, metrics: Metrics) -> Self {
        Service { broker, metrics }
    }
}

impl<P: PodLookup, S: CredentialSource, C: Clock> Service<P, S, C> {
    async fn pod_role(&self, ip: &str) -> Result<Role, Status> {
        let pod = self
            .broker
            .pod(parse_ip(ip)?)
            .await
            // kiam v4 answers GetPodRole with its pod cache's error text.
            .map_err(|_| Status::unknown(POD_NOT_FOUND))?;
        Ok(Role {
            name: self.broker.role_annotation(&pod).to_owned(),
        })
    }

    async fn pod_credentials(&self, ip: &str, requested: &str) -> Result<Credentials, Status> {
        let broker = &self.broker;
        // Decided once per pod and policy change, as for the agent's pods: a warm call
        // matches no regex and hashes no cache key.
        let entitled = broker.entitlement(parse_ip(ip)?).await.map_err(status)?;
        let role_arn = entitled.role_arn();
        // As kiam's RequestingAnnotatedRolePolicy: the role asked for must be the pod's own,
        // compared as ARNs ("web" and "arn:…:role/web" are one role).
        if broker.resolve(requested).ok().as_ref() != Some(role_arn) {
            let denial = Denial::NotItsRole {
                requested: requested.to_owned(),
            };
            return Err(status(broker.deny(
                entitled.pod(),
                role_arn.as_str(),
                denial,
            )));
        }
        let credentials = broker.serve(&entitled).await.map_err(status)?;
        Ok(Credentials {
            code: "Success".to_owned(),
            r#type: "AWS-HMAC".to_owned(),
            access_key_id: credentials.access_key_id.clone(),
            secret_access_key: credentials.secret_access_key.clone(),
            token: credentials.session_token.clone(),
            expiration: timestamp(credentials.expiration),
            last_updated: timestamp(credentials.last_updated),
        })
    }

    /// Counts and times one call, by method and gRPC code.
    fn observe<T>(&self, method: &'static str, started: Instant, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        self.metrics
            .observe_server_call(method, super::super::code_label(code), started.elapsed());
    }
}

fn parse_ip(ip: &str) -> Result<IpAddr, Status> {
    ip.trim()
        .parse()
        .map_err(|_| Status::invalid_argument(format!("ip {ip:?} is not an IP address")))
}

/// The one place where broker errors become gRPC statuses: the texts kiam agents act on for a
/// missing pod and a policy refusal, and codes that tell a refusal by STS (not retried) from
/// STS trouble (retried).
fn status(err: Error) -> Status {
    match err {
        Error::UnknownPod(_) => Status::unknown(NO_POD_FOUND),
        Error::NoRole { .. }
        | Error::BadRole { .. }
        | Error::Forbidden { .. }
        | Error::WrongRole { .. } => {
            tracing::debug!(error = %err, "refused GetPodCredentials");
            Status::unknown(FORBIDDEN)
        }
        Error::Credentials(credentials::Error::Refused { .. }) => {
            // Logged at `warn` by the cache when STS said so.
            tracing::debug!(error = %err, "STS refusal served");
            Status::permission_denied(err.to_string())
        }
        Error::Stale { .. } => {
            tracing::warn!(error = %err, "refused: the view of pods is stale");
            Status::unavailable(err.to_string())
        }
        Error::Credentials(credentials::Error::Unavailable { .. }) | Error::Unavailable(_) => {
            tracing::warn!(error = %err, "no credentials: STS unavailable");
            Status::unavailable(err.to_string())
        }
    }
}

#[tonic::async_trait]
impl<P: PodLookup, S: CredentialSource, C: Clock> KiamService for Service<P, S, C> {
    async fn get_pod_role(
        &self,
        request: Request<GetPodRoleRequest>,
    ) -> Result<Response<Role>, Status> {
        let started = Instant::now();
        let result = self.pod_role(&request.get_ref().ip).await;
        self.observe("GetPodRole", started, &result);
        tracing::debug!(ip = request.get_ref().ip, ok = result.is_ok(), "GetPodRole");
        result.map(Response::new)
    }

    async fn get_pod_credentials(
        &self,
        request: Request<GetPodCredentialsRequest>,
    ) -> Result<Response<Credentials>, Status> {
        let started = Instant::now();
        let GetPodCredentialsRequest { ip, role } = request.get_ref();
        let result = self.pod_credentials(ip, role).await;
        self.observe("GetPodCredentials", started, &result);
        tracing::debug!(ip, role, ok = result.is_ok(), "GetPodCredentials");
        result.map(Response::new)
    }

    async fn get_health(
        &self,
        _request: Request<GetHealthRequest>,
    ) -> Result<Response<HealthStatus>, Status> {
        let started = Instant::now();
        let result = match self.broker.readiness() {
            Ok(_) => Ok(HealthStatus {
                message: "ok".to_owned(),
            }),
            Err(reason) => Err(Status::unavailable(reason)),
        };
        self.observe("GetHealth", started, &result);
        result.map(Response::new)
    }
}
