//! The broker of server-backed mode: roles and credentials from the kiam server, credentials
//! cached by (pod IP, role) until their refresh window (kiam agents cache nothing and pay a
//! round trip on every request). The node needs to know nothing: role names are taken from the
//! annotation as the server states it; `aws.base_role_arn`, when set, only lets `iam/info`
//! name the full ARN of relative role names.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::client::{CallError, KiamClient};
use super::proto;
use crate::broker::{Broker, Error, FirstServed, PodRole, PodStatus, Role};
use crate::clock::{Clock, SystemClock};
use crate::credentials::{self, Credentials, Trouble};
use crate::pod::Pod;
use crate::policy::{BaseRoleArn, Denial, RoleArn};

type Key = (IpAddr, String);

struct UntilRefresh {
    refresh_before: Duration,
    clock: Arc<dyn Clock>,
}

impl moka::Expiry<Key, Arc<Credentials>> for UntilRefresh {
    fn expire_after_create(
        &self,
        _key: &Key,
        value: &Arc<Credentials>,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(
            value
                .remaining(self.clock.now())
                .saturating_sub(self.refresh_before),
        )
    }
}

pub struct KiamBroker {
    client: KiamClient,
    base_role_arn: Option<BaseRoleArn>,
    cache: moka::future::Cache<Key, Arc<Credentials>>,
    served: FirstServed,
    clock: Arc<dyn Clock>,
}

impl KiamBroker {
    pub fn new(
        client: KiamClient,
        base_role_arn: Option<BaseRoleArn>,
        refresh_before: Duration,
    ) -> KiamBroker {
        Self::with_clock(client, base_role_arn, refresh_before, Arc::new(SystemClock))
    }

    /// As [`KiamBroker::new`], telling time by `clock`.
    pub fn with_clock(
        client: KiamClient,
        base_role_arn: Option<BaseRoleArn>,
        refresh_before: Duration,
        clock: Arc<dyn Clock>,
    ) -> KiamBroker {
        let cache = moka::future::Cache::builder()
            .max_capacity(100_000)
            .expire_after(UntilRefresh {
                refresh_before,
                clock: clock.clone(),
            })
            .build();
        KiamBroker {
            client,
            base_role_arn,
            cache,
            served: FirstServed::default(),
            clock,
        }
    }

    /// The pod at `ip` as far as this mode knows it (its IP; the server knows the rest), its
    /// role as the server states it, and that role as an ARN.
    async fn pod_role(&self, ip: IpAddr) -> Result<(PodRole, String), Error> {
        let pod = Arc::new(Pod {
            namespace: String::new(),
            name: ip.to_string(),
            uid: String::new(),
            service_account: String::new(),
            annotations: Default::default(),
        });
        let role = match self.client.pod_role(ip).await {
            Ok(role) if role.trim().is_empty() => return Err(Error::NoRole { pod: pod.key() }),
            Ok(role) => role,
            Err(CallError::NoPod) => return Err(Error::UnknownPod(ip)),
            Err(CallError::Forbidden) => {
                return Err(Error::Forbidden {
                    pod: pod.key(),
                    denial: Denial::ByServer,
                });
            }
            Err(CallError::Failed(message)) => return Err(Error::Unavailable(message)),
        };
        let resolved = match &self.base_role_arn {
            Some(base) => RoleArn::resolve(&role, base).map(Role::Arn),
            None if role.trim().starts_with("arn:") => RoleArn::parse(role.trim()).map(Role::Arn),
            None => RoleArn::name_in(&role).map(|name| Role::Name(name.to_owned())),
        };
        let role_ref = resolved.map_err(|error| Error::BadRole {
            pod: pod.key(),
            error,
        })?;
        Ok((
            PodRole {
                pod,
                role: role_ref,
            },
            role,
        ))
    }
}

// The futures are boxed: the gRPC calls behind them make them large, and the pod-facing
// server's request future (which holds either mode's) would otherwise be as large, and be
// copied as such, in standalone mode too.
impl Broker for KiamBroker {
    fn role(&self, ip: IpAddr) -> impl Future<Output = Result<PodRole, Error>> + Send {
        Box::pin(async move { self.pod_role(ip).await.map(|(role, _)| role) })
    }

    fn credentials(
        &self,
        ip: IpAddr,
        name: &str,
    ) -> impl Future<Output = Result<(PodRole, Arc<Credentials>), Error>> + Send {
        Box::pin(self.credentials_of(ip, name))
    }

    fn readiness(&self) -> Result<String, String> {
        if self.client.healthy() {
            Ok("the kiam server answers GetHealth".to_owned())
        } else {
            Err("the kiam server has not answered GetHealth".to_owned())
        }
    }

    /// Only what this node has cached: in this mode the server knows the pods.
    fn status(&self) -> Vec<PodStatus> {
        let mut lines: Vec<PodStatus> = self
            .cache
            .iter()
            .map(|(key, credentials)| PodStatus {
                ip: Some(key.0),
                pod: "-".to_owned(),
                role: Ok(key.1.clone()),
                expires: Some(credentials.expiration),
            })
            .collect();
        lines.sort_by(|a, b| (a.ip, &a.role).cmp(&(b.ip, &b.role)));
        lines
    }
}

impl KiamBroker {
    async fn credentials_of(
        &self,
        ip: IpAddr,
        name: &str,
    ) -> Result<(PodRole, Arc<Credentials>), Error> {
        let (role, annotated) = self.pod_role(ip).await?;
        if role.role.name() != name {
            return Err(Error::WrongRole {
                pod: role.pod.key(),
                requested: name.to_owned(),
            });
        }
        // Ask with the role as the server stated it, as kiam agents do.
        let fetch = async {
            match self.client.pod_credentials(ip, &annotated).await {
                Ok(answer) => to_credentials(&role.role, answer, self.clock.now()).map(Arc::new),
                Err(CallError::Forbidden) => Err(Error::Forbidden {
                    pod: role.pod.key(),
                    denial: Denial::ByServer,
                }),
                Err(CallError::NoPod) => Err(Error::UnknownPod(ip)),
                Err(CallError::Failed(message)) => Err(Error::Unavailable(message)),
            }
        };
        let credentials = self
            .cache
            .try_get_with((ip, annotated.clone()), fetch)
            .await
            .map_err(|err| (*err).clone())?;
        if self.served.first(&ip.to_string(), &annotated) {
            tracing::info!(pod = %ip, role = annotated.as_str(), "serving a pod its role for the first time");
        }
        Ok((role, credentials))
    }
}

/// The server's answer as credentials; anything but `Success` is a refusal, as from STS.
fn to_credentials(
    role: &Role,
    answer: proto::Credentials,
    now: SystemTime,
) -> Result<Credentials, Error> {
    if answer.code != "Success" {
        return Err(Error::Credentials(credentials::Error::Refused {
            role: role.to_string(),
            message: format!("kiam server answered {}", answer.code),
        }));
    }
    let parse = |text: &str| {
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .map(SystemTime::from)
    };
    let expiration = parse(&answer.expiration).map_err(|err| {
        Error::Credentials(credentials::Error::Unavailable {
            role: role.to_string(),
            kind: Trouble::ServerError,
            message: format!(
                "kiam server sent an unreadable expiration {:?}: {err}",
                answer.expiration
            ),
        })
    })?;
    Ok(Credentials {
        access_key_id: answer.access_key_id,
        secret_access_key: answer.secret_access_key,
        session_token: answer.token,
        expiration,
        last_updated: parse(&answer.last_updated).unwrap_or(now),
    })
}
