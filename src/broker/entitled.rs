//! The request path of [`Local`]: what policy decided for a pod is decided once and kept with
//! the pod's claim on its IP in the index ([`PodLookup::remember`]), together with what STS is
//! asked for on its behalf and its entry in the credential cache. A request for a pod whose
//! decision is kept costs a lookup by IP and a read of the cached credentials: no regex, no
//! role ARN parsing, no session name, no cache key hashed.
//!
//! The index drops a kept decision the moment anything it was made from changes (the pod, its
//! sole claim on the IP, any namespace's policy), so a decision is never served stale. A
//! refusal is kept as well, and reported (metric, log, Event) on every request, as before.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use super::{Error, Local, PodRole, Role};
use crate::clock::Clock;
use crate::credentials::{AssumeRoleRequest, CredentialSource, Credentials, Held};
use crate::pod::Pod;
use crate::pods::PodLookup;
use crate::policy::{Refusal, RoleArn};

/// What was decided for one version of a pod under its namespace's policy.
struct Decided {
    pod: Arc<Pod>,
    outcome: Result<Arc<Entitled>, Refusal>,
}

/// A pod allowed its role, and what serving it takes.
pub struct Entitled {
    role: PodRole,
    role_arn: RoleArn,
    /// What STS is asked for on the pod's behalf: the cache key.
    request: AssumeRoleRequest,
    /// The cache entry of `request`, held once the pod first asks for credentials.
    held: OnceLock<Held>,
    /// Whether the first serving of this pod's role has been seen to (see
    /// [`super::FirstServed`]): then the requests after it need not ask.
    announced: AtomicBool,
}

impl Entitled {
    pub fn pod(&self) -> &Arc<Pod> {
        &self.role.pod
    }

    pub fn role(&self) -> &PodRole {
        &self.role
    }

    pub fn role_arn(&self) -> &RoleArn {
        &self.role_arn
    }
}

impl<P: PodLookup, S: CredentialSource, C: Clock> Local<P, S, C> {
    /// The pod at `ip` and the role it is allowed, as decided once for it; a refusal is
    /// reported (log, metric, Event) as [`Local::role_of`] does.
    pub async fn entitlement(&self, ip: IpAddr) -> Result<Arc<Entitled>, Error> {
        if let Some(age) = self.pods.too_stale() {
            return Err(Error::Stale { age });
        }
        let found = self.pods.recall(ip).await.ok_or(Error::UnknownPod(ip))?;
        let decided = match found.memo.clone().map(|memo| memo.downcast::<Decided>()) {
            Some(Ok(decided)) => decided,
            _ => {
                let decided = Arc::new(self.decide(&found.pod));
                self.pods.remember(&found, decided.clone());
                decided
            }
        };
        match &decided.outcome {
            Ok(entitled) => Ok(entitled.clone()),
            Err(refusal) => Err(self.refused(&decided.pod, refusal.clone())),
        }
    }

    /// Credentials for a pod [`Local::entitlement`] allowed its role, from the cache.
    pub async fn serve(&self, entitled: &Entitled) -> Result<Arc<Credentials>, Error> {
        let held = entitled
            .held
            .get_or_init(|| self.cache.hold(&entitled.request));
        let credentials = self.cache.get_held(held).await?;
        if !entitled.announced.load(Ordering::Relaxed) {
            entitled.announced.store(true, Ordering::Relaxed);
            self.announce(entitled.pod(), &entitled.request);
        }
        Ok(credentials)
    }

    /// Policy's decision for `pod` under its namespace's policy as it is now.
    fn decide(&self, pod: &Arc<Pod>) -> Decided {
        let namespace = self.pods.namespace_policy(&pod.namespace);
        let outcome = self
            .policy
            .role_for(pod, namespace.as_deref())
            .map(|role_arn| {
                Arc::new(Entitled {
                    request: self.request_for(pod, role_arn.clone()),
                    role: PodRole {
                        pod: pod.clone(),
                        role: Role::Arn(role_arn.clone()),
                    },
                    role_arn,
                    held: OnceLock::new(),
                    announced: AtomicBool::new(false),
                })
            });
        Decided {
            pod: pod.clone(),
            outcome,
        }
    }
}
