//! The broker of server-backed mode: roles and credentials from the kiam server, credentials
//! cached by (pod IP, role) until their refresh window (kiam agents cache nothing and pay a
//! round trip on every request).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::client::{CallError, KiamClient};
use super::proto;
use crate::broker::{Broker, Error, PodRole};
use crate::clock::{Clock, SystemClock};
use crate::credentials::{self, Credentials, Trouble};
use crate::pods::Pod;
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
    base_role_arn: BaseRoleArn,
    cache: moka::future::Cache<Key, Arc<Credentials>>,
    clock: Arc<dyn Clock>,
}

impl KiamBroker {
    pub fn new(
        client: KiamClient,
        base_role_arn: BaseRoleArn,
        refresh_before: Duration,
    ) -> KiamBroker {
        Self::with_clock(client, base_role_arn, refresh_before, Arc::new(SystemClock))
    }

    /// As [`KiamBroker::new`], telling time by `clock`.
    pub fn with_clock(
        client: KiamClient,
        base_role_arn: BaseRoleArn,
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
        let role_arn =
            RoleArn::resolve(&role, &self.base_role_arn).map_err(|source| Error::BadRole {
                pod: pod.key(),
                source,
            })?;
        Ok((PodRole { pod, role_arn }, role))
    }
}

impl Broker for KiamBroker {
    async fn role(&self, ip: IpAddr) -> Result<PodRole, Error> {
        self.pod_role(ip).await.map(|(role, _)| role)
    }

    async fn credentials(
        &self,
        ip: IpAddr,
        name: &str,
    ) -> Result<(PodRole, Arc<Credentials>), Error> {
        let (role, annotated) = self.pod_role(ip).await?;
        if role.role_arn.name() != name {
            return Err(Error::WrongRole {
                pod: role.pod.key(),
                requested: name.to_owned(),
            });
        }
        // Ask with the role as the server stated it, as kiam agents do.
        let fetch = async {
            match self.client.pod_credentials(ip, &annotated).await {
                Ok(answer) => {
                    to_credentials(&role.role_arn, answer, self.clock.now()).map(Arc::new)
                }
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
        Ok((role, credentials))
    }

    fn ready(&self) -> bool {
        self.client.healthy()
    }
}

/// The server's answer as credentials; anything but `Success` is a refusal, as from STS.
fn to_credentials(
    role_arn: &RoleArn,
    answer: proto::Credentials,
    now: SystemTime,
) -> Result<Credentials, Error> {
    if answer.code != "Success" {
        return Err(Error::Credentials(credentials::Error::Refused {
            role_arn: role_arn.clone(),
            message: format!("kiam server answered {}", answer.code),
        }));
    }
    let parse = |text: &str| {
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .map(SystemTime::from)
    };
    let expiration = parse(&answer.expiration).map_err(|err| {
        Error::Credentials(credentials::Error::Unavailable {
            role_arn: role_arn.clone(),
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
