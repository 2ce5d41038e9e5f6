//! The seam between the pod-facing server and everything behind it. The IMDS server asks only
//! "which role does the pod at this IP have?" and "credentials for this IP and role"; the
//! standalone stack (pods + policy + cache + STS) answers here, a kiam server could too.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use crate::clock::Clock;
use crate::credentials::{self, AssumeRoleRequest, Cache, CredentialSource, Credentials};
use crate::pods::{Pod, PodLookup};
use crate::policy::{self, BaseRoleArn, RoleArn, SessionName};

/// A pod and the role it is entitled to.
#[derive(Debug, Clone)]
pub struct PodRole {
    pub pod: Arc<Pod>,
    pub role_arn: RoleArn,
}

/// Why a pod gets no role or no credentials. The IMDS server turns these into HTTP answers in
/// one place (`imds::routes`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("no pod is known at {0}")]
    UnknownPod(IpAddr),
    #[error("pod {pod} has no role")]
    NoRole { pod: String },
    #[error("pod {pod} has an unusable role annotation: {source}")]
    BadRole { pod: String, source: policy::Error },
    #[error("pod {pod} asked for role {requested:?}, which is not its role")]
    WrongRole { pod: String, requested: String },
    #[error(transparent)]
    Credentials(#[from] credentials::Error),
}

pub trait Broker: Send + Sync + 'static {
    /// The role of the pod at `ip`.
    fn role(&self, ip: IpAddr) -> impl Future<Output = Result<PodRole, Error>> + Send;

    /// Credentials for the pod at `ip`, which asked for role `name`: only its own role is served.
    fn credentials(
        &self,
        ip: IpAddr,
        name: &str,
    ) -> impl Future<Output = Result<(PodRole, Credentials), Error>> + Send;

    /// Whether everything behind the broker is ready to answer (`/readyz`).
    fn ready(&self) -> bool;
}

/// Standalone mode: this node's pods, policy, and STS through the cache.
pub struct Standalone<P, S, C> {
    pods: P,
    base_role_arn: BaseRoleArn,
    session_template: String,
    cache: Cache<S, C>,
}

impl<P: PodLookup, S: CredentialSource, C: Clock> Standalone<P, S, C> {
    pub fn new(
        pods: P,
        base_role_arn: BaseRoleArn,
        session_template: String,
        cache: Cache<S, C>,
    ) -> Self {
        Standalone {
            pods,
            base_role_arn,
            session_template,
            cache,
        }
    }
}

impl<P: PodLookup, S: CredentialSource, C: Clock> Broker for Standalone<P, S, C> {
    async fn role(&self, ip: IpAddr) -> Result<PodRole, Error> {
        let pod = self.pods.lookup(ip).await.ok_or(Error::UnknownPod(ip))?;
        let annotation = pod
            .annotations
            .role
            .as_deref()
            .ok_or_else(|| Error::NoRole { pod: pod.key() })?;
        let role_arn =
            RoleArn::resolve(annotation, &self.base_role_arn).map_err(|source| Error::BadRole {
                pod: pod.key(),
                source,
            })?;
        Ok(PodRole { pod, role_arn })
    }

    async fn credentials(&self, ip: IpAddr, name: &str) -> Result<(PodRole, Credentials), Error> {
        let role = self.role(ip).await?;
        if role.role_arn.name() != name {
            return Err(Error::WrongRole {
                pod: role.pod.key(),
                requested: name.to_owned(),
            });
        }
        let request = AssumeRoleRequest {
            role_arn: role.role_arn.clone(),
            session_name: SessionName::for_pod(&self.session_template, &role.pod),
            external_id: role.pod.annotations.external_id.clone(),
        };
        let credentials = self.cache.get(&request).await?;
        Ok((role, credentials))
    }

    fn ready(&self) -> bool {
        self.pods.ready()
    }
}
