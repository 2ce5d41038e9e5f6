//! The static pod table, for running without a cluster (local runs, tests, single hosts).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::{Known, PodLookup, Standing, StaticPod};
use crate::pod::{Annotations, Pod};
use crate::policy::NamespacePolicy;

#[derive(Debug)]
pub struct StaticPods {
    by_ip: HashMap<IpAddr, Arc<Pod>>,
    /// Never changes: the table is fixed for the life of the process.
    changes: tokio::sync::watch::Sender<u64>,
    /// The operator's table is the policy.
    unrestricted: Arc<NamespacePolicy>,
}

impl StaticPods {
    /// Builds the table; entries were validated with the configuration (unique IPs).
    pub fn new(entries: &[StaticPod]) -> StaticPods {
        let by_ip = entries
            .iter()
            .map(|entry| {
                let pod = Pod {
                    namespace: entry.namespace.clone(),
                    name: entry.name.clone(),
                    uid: format!("static:{}/{}", entry.namespace, entry.name),
                    service_account: entry.service_account.clone(),
                    annotations: Annotations {
                        role: entry.role.clone(),
                        external_id: entry.external_id.clone(),
                        session_name: entry.session_name.clone(),
                    },
                };
                (entry.ip.to_canonical(), Arc::new(pod))
            })
            .collect();
        StaticPods {
            by_ip,
            changes: tokio::sync::watch::Sender::new(0),
            unrestricted: Arc::new(NamespacePolicy::Unrestricted),
        }
    }
}

impl PodLookup for StaticPods {
    async fn lookup(&self, ip: IpAddr) -> Option<Arc<Pod>> {
        self.by_ip.get(&ip.to_canonical()).cloned()
    }

    fn namespace_policy(&self, _namespace: &str) -> Option<Arc<NamespacePolicy>> {
        Some(self.unrestricted.clone())
    }

    fn ready(&self) -> bool {
        true
    }

    fn snapshot(&self) -> Vec<Arc<Pod>> {
        self.by_ip.values().cloned().collect()
    }

    fn readiness(&self) -> Result<String, String> {
        Ok(format!("static pod table of {} pods", self.by_ip.len()))
    }

    fn known(&self) -> Vec<Known> {
        self.by_ip
            .iter()
            .map(|(ip, pod)| Known {
                pod: pod.clone(),
                ip: Some(*ip),
                standing: Standing::Servable,
            })
            .collect()
    }

    fn knows(&self, uid: &str) -> bool {
        self.by_ip.values().any(|pod| pod.uid == uid)
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}
