//! The static pod table, for running without a cluster (local runs, tests, single hosts).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use super::{Found, Known, Memo, PodLookup, Standing, StaticPod};
use crate::pod::{Annotations, Pod};
use crate::policy::NamespacePolicy;

#[derive(Debug)]
pub struct StaticPods {
    by_ip: HashMap<IpAddr, Entry>,
    /// Never changes: the table is fixed for the life of the process.
    changes: tokio::sync::watch::Sender<u64>,
    /// The operator's table is the policy.
    unrestricted: Arc<NamespacePolicy>,
}

/// A pod of the table, and what was remembered about it (the table never changes, so once
/// remembered it holds for the life of the process).
struct Entry {
    pod: Arc<Pod>,
    memo: OnceLock<Memo>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry").field("pod", &self.pod).finish()
    }
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
                let indexed = Entry {
                    pod: Arc::new(pod),
                    memo: OnceLock::new(),
                };
                (entry.ip.to_canonical(), indexed)
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
        self.by_ip.get(&ip.to_canonical()).map(|e| e.pod.clone())
    }

    async fn recall(&self, ip: IpAddr) -> Option<Found> {
        let ip = ip.to_canonical();
        self.by_ip.get(&ip).map(|entry| Found {
            pod: entry.pod.clone(),
            memo: entry.memo.get().cloned(),
            ip,
            namespaces: 0,
        })
    }

    fn remember(&self, found: &Found, memo: Memo) {
        if let Some(entry) = self.by_ip.get(&found.ip)
            && Arc::ptr_eq(&entry.pod, &found.pod)
        {
            let _ = entry.memo.set(memo);
        }
    }

    fn namespace_policy(&self, _namespace: &str) -> Option<Arc<NamespacePolicy>> {
        Some(self.unrestricted.clone())
    }

    fn ready(&self) -> bool {
        true
    }

    fn snapshot(&self) -> Vec<Arc<Pod>> {
        self.by_ip.values().map(|e| e.pod.clone()).collect()
    }

    fn readiness(&self) -> Result<String, String> {
        Ok(format!("static pod table of {} pods", self.by_ip.len()))
    }

    fn known(&self) -> Vec<Known> {
        self.by_ip
            .iter()
            .map(|(ip, entry)| Known {
                pod: entry.pod.clone(),
                ip: Some(*ip),
                standing: Standing::Servable,
            })
            .collect()
    }

    fn knows(&self, uid: &str) -> bool {
        self.by_ip.values().any(|entry| entry.pod.uid == uid)
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}
