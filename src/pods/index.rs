//! The IP → pod index: a pure data structure fed by the watch loop (`watch.rs`), read by every
//! request. It decides which pod, if any, owns an IP:
//!
//! - only pods that are not on the host network and not finished claim their IP;
//! - pods are kept by uid, so a delete for an old pod never removes its same-named successor;
//! - an IP claimed by two live pods is refused until one claim goes, whatever order the add
//!   and delete events arrive in: a new pod never gets an old pod's role by IP reuse;
//! - a relist is buffered and swapped in whole at `InitDone`.
//!
//! Namespaces (for their `permitted` policy) are indexed the same way.
//!
//! Beside the claim of a pod that alone owns an IP, a reader may keep what it decided about
//! that pod (the broker: its role under policy, [`PodIndex::remember`]), so that requests need
//! not decide again. Such a memo goes the moment anything it was decided from changes: any
//! change to the IP's claims (the pod changed, went, finished, moved, or another pod claimed
//! the IP), a relist, or a change to any namespace's policy.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use super::{Found, Memo};
use crate::pod::Pod;
use crate::policy::NamespacePolicy;

/// What the index keeps of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    pub pod: Arc<Pod>,
    pub ip: Option<IpAddr>,
    pub host_network: bool,
    /// Succeeded or Failed: the pod's IP may already be someone else's.
    pub finished: bool,
}

impl PodRecord {
    /// The IP this pod may be served on, if any.
    fn claim(&self) -> Option<IpAddr> {
        if self.host_network || self.finished {
            None
        } else {
            self.ip.map(|ip| ip.to_canonical())
        }
    }
}

/// A watch event, as the index sees it (mirrors kube's `watcher::Event`).
#[derive(Debug, Clone)]
pub enum Change<T> {
    Apply(T),
    Delete(T),
    Init,
    InitApply(T),
    InitDone,
}

/// What an IP resolves to, on the request path ([`PodIndex::recall`]).
#[derive(Debug, Clone)]
pub enum Recall {
    Found(Found),
    Unknown,
    /// Claimed by more than one live pod: refuse, never guess.
    Conflict,
}

/// What an IP resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Arc<Pod>),
    Unknown,
    /// Claimed by more than one live pod: refuse, never guess.
    Conflict(Vec<String>),
}

/// A record in the index, found by its pod's uid: the uid is not stored twice (for
/// `iamlet server`, the index holds every pod in the cluster).
struct ByUid(PodRecord);

impl Borrow<str> for ByUid {
    fn borrow(&self) -> &str {
        &self.0.pod.uid
    }
}

impl Hash for ByUid {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `str` hashes, which `Borrow<str>` requires.
        self.0.pod.uid.as_str().hash(state);
    }
}

impl PartialEq for ByUid {
    fn eq(&self, other: &ByUid) -> bool {
        self.0.pod.uid == other.0.pod.uid
    }
}

impl Eq for ByUid {}

/// The pods, and the IPs they claim: the picture readers see, or one being relisted.
#[derive(Default)]
struct Pods {
    by_uid: HashSet<ByUid>,
    /// The live pods claiming each IP (the same `Arc`s as their records): one, or a conflict.
    claims: HashMap<IpAddr, Vec<Arc<Pod>>>,
    /// What a reader remembered about the sole owner of an IP; dropped with any change to
    /// that IP's claims (and with the whole picture at a relist).
    memos: HashMap<IpAddr, Remembered>,
}

#[derive(Default)]
struct State {
    pods: Pods,
    /// A relist in progress, built as it arrives and swapped in whole at `InitDone` (not kept
    /// as a list to be indexed then: for `iamlet server`, that list alone is megabytes).
    pod_relist: Option<Pods>,
    pods_synced: bool,
    namespaces: HashMap<String, Arc<NamespacePolicy>>,
    /// Moves on with every change to the namespaces' policies: a memo made before is stale.
    namespaces_version: u64,
    namespace_relist: Option<HashMap<String, Arc<NamespacePolicy>>>,
    namespaces_synced: bool,
}

/// A memo, the pod it is about, and the namespace policies' version it was made under.
struct Remembered {
    pod: Arc<Pod>,
    namespaces: u64,
    memo: Memo,
}

impl Pods {
    fn insert(&mut self, record: PodRecord) {
        self.remove(&record.pod.uid);
        if let Some(ip) = record.claim() {
            self.memos.remove(&ip);
            let owners = self.claims.entry(ip).or_default();
            owners.push(record.pod.clone());
            if owners.len() > 1 {
                let names: Vec<String> = owners.iter().map(|pod| pod.key()).collect();
                tracing::warn!(%ip, pods = ?names, "IP claimed by more than one live pod; serving none of them until it clears");
            }
        }
        self.by_uid.insert(ByUid(record));
    }

    fn remove(&mut self, uid: &str) {
        let Some(ByUid(old)) = self.by_uid.take(uid) else {
            return;
        };
        if let Some(ip) = old.claim()
            && let Some(owners) = self.claims.get_mut(&ip)
        {
            self.memos.remove(&ip);
            owners.retain(|owner| owner.uid != uid);
            if owners.is_empty() {
                self.claims.remove(&ip);
            }
        }
    }
}

impl Pods {
    /// `record` and whether it may be served by IP.
    fn known(&self, record: &PodRecord) -> super::Known {
        use super::Standing;
        // Finished first: a pod-bound token is served for any pod not finished (host network
        // or not), so `Finished` must never hide behind another standing.
        let standing = if record.finished {
            Standing::Finished
        } else if record.host_network {
            Standing::HostNetwork
        } else {
            match record.claim().and_then(|ip| self.claims.get(&ip)) {
                None => Standing::NoIp,
                Some(owners) if owners.len() == 1 => Standing::Servable,
                Some(owners) => Standing::Conflict(
                    owners
                        .iter()
                        .filter(|owner| owner.uid != record.pod.uid)
                        .map(|owner| owner.key())
                        .collect(),
                ),
            }
        };
        super::Known {
            pod: record.pod.clone(),
            ip: record.ip,
            standing,
        }
    }
}

/// The index, shared between the watch loop (writer) and requests (readers).
pub struct PodIndex {
    state: RwLock<State>,
    changed: watch::Sender<u64>,
}

impl Default for PodIndex {
    fn default() -> Self {
        PodIndex {
            state: RwLock::default(),
            changed: watch::Sender::new(0),
        }
    }
}

impl PodIndex {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(&self) {
        self.changed.send_modify(|version| *version += 1);
    }

    pub fn apply_pod(&self, change: Change<PodRecord>) {
        {
            let mut state = self.write();
            match change {
                Change::Apply(record) => state.pods.insert(record),
                Change::Delete(record) => state.pods.remove(&record.pod.uid),
                Change::Init => state.pod_relist = Some(Pods::default()),
                Change::InitApply(record) => {
                    state.pod_relist.get_or_insert_default().insert(record);
                }
                Change::InitDone => {
                    // The relisted picture comes without memos: nothing decided before stands.
                    state.pods = state.pod_relist.take().unwrap_or_default();
                    state.pods_synced = true;
                }
            }
        }
        self.notify();
    }

    pub fn apply_namespace(&self, change: Change<(String, NamespacePolicy)>) {
        {
            let mut state = self.write();
            // A namespace event that leaves its policy as it was (a label, its status) keeps
            // what was decided under it.
            let unchanged = match &change {
                Change::Apply((name, policy)) => state
                    .namespaces
                    .get(name)
                    .is_some_and(|known| known.same_as(policy)),
                Change::Delete(_) | Change::InitDone => false,
                Change::Init | Change::InitApply(_) => true,
            };
            if !unchanged {
                state.namespaces_version += 1;
            }
            match change {
                Change::Apply(_) if unchanged => {}
                Change::Apply((name, policy)) => {
                    state.namespaces.insert(name, Arc::new(policy));
                }
                Change::Delete((name, _)) => {
                    state.namespaces.remove(&name);
                }
                Change::Init => state.namespace_relist = Some(HashMap::new()),
                Change::InitApply((name, policy)) => {
                    state
                        .namespace_relist
                        .get_or_insert_default()
                        .insert(name, Arc::new(policy));
                }
                Change::InitDone => {
                    state.namespaces = state.namespace_relist.take().unwrap_or_default();
                    state.namespaces_synced = true;
                }
            }
        }
        self.notify();
    }

    pub fn lookup(&self, ip: IpAddr) -> Lookup {
        let state = self.read();
        match state.pods.claims.get(&ip.to_canonical()).map(Vec::as_slice) {
            None | Some([]) => Lookup::Unknown,
            Some([pod]) => Lookup::Found(pod.clone()),
            Some(pods) => Lookup::Conflict(pods.iter().map(|pod| pod.key()).collect()),
        }
    }

    /// The pod at `ip`, waiting up to `wait` for the watch to bring it (a pod's first request
    /// can beat its watch event). Woken by index changes, not polling.
    pub async fn find(&self, ip: IpAddr, wait: Duration) -> Option<Arc<Pod>> {
        self.find_recalled(ip, wait).await.map(|found| found.pod)
    }

    /// The pod that alone claims `ip`, with what was remembered about it if that still holds;
    /// nothing for an IP that no pod, or more than one, claims.
    pub fn recall(&self, ip: IpAddr) -> Recall {
        let ip = ip.to_canonical();
        let state = self.read();
        if let Some(remembered) = state.pods.memos.get(&ip)
            && remembered.namespaces == state.namespaces_version
        {
            return Recall::Found(Found {
                pod: remembered.pod.clone(),
                memo: Some(remembered.memo.clone()),
                ip,
                namespaces: state.namespaces_version,
            });
        }
        match state.pods.claims.get(&ip).map(Vec::as_slice) {
            None | Some([]) => Recall::Unknown,
            Some([pod]) => Recall::Found(Found {
                pod: pod.clone(),
                memo: None,
                ip,
                namespaces: state.namespaces_version,
            }),
            Some(_) => Recall::Conflict,
        }
    }

    /// As [`PodIndex::find`], with what was remembered about the pod.
    pub async fn find_recalled(&self, ip: IpAddr, wait: Duration) -> Option<Found> {
        // The pod is there on almost every request: look before subscribing to changes.
        match self.recall(ip) {
            Recall::Found(found) => return Some(found),
            Recall::Conflict => return None,
            Recall::Unknown => {}
        }
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Looked at again after subscribing: a change in between is not missed.
            match self.recall(ip) {
                Recall::Found(found) => return Some(found),
                Recall::Conflict => return None,
                Recall::Unknown => {}
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return None,
            }
        }
    }

    /// Keeps `memo` beside the claim `found` was found by, if that pod still alone claims the
    /// IP in the same version and no namespace changed since; otherwise keeps nothing.
    pub fn remember(&self, found: &Found, memo: Memo) {
        let mut state = self.write();
        let unchanged = state.namespaces_version == found.namespaces
            && matches!(
                state.pods.claims.get(&found.ip).map(Vec::as_slice),
                Some([pod]) if Arc::ptr_eq(pod, &found.pod)
            );
        if unchanged {
            let remembered = Remembered {
                pod: found.pod.clone(),
                namespaces: found.namespaces,
                memo,
            };
            state.pods.memos.insert(found.ip, remembered);
        }
    }

    /// Every pod that owns its IP alone now: the pods that could be served.
    pub fn servable(&self) -> Vec<Arc<Pod>> {
        let state = self.read();
        state
            .pods
            .claims
            .values()
            .filter_map(|owners| match owners.as_slice() {
                [pod] => Some(pod.clone()),
                _ => None,
            })
            .collect()
    }

    /// Every live pod on the pod network (not the host's), with or without its IP yet, and
    /// whether or not another pod claims the same IP: the pods that will ask the IMDS front for
    /// credentials (for prefetching). A pod is listed here from the moment it is scheduled to
    /// this node, typically a second or more before its sandbox has an IP, which is time enough
    /// to fetch its credentials before its first request. Nothing is served from this list.
    pub fn on_pod_network(&self) -> Vec<Arc<Pod>> {
        self.read()
            .pods
            .by_uid
            .iter()
            .map(|ByUid(record)| record)
            .filter(|record| !record.host_network && !record.finished)
            .map(|record| record.pod.clone())
            .collect()
    }

    /// Whether a pod with `uid` is in the index, servable or not.
    pub fn contains(&self, uid: &str) -> bool {
        self.read().pods.by_uid.contains(uid)
    }

    /// Every pod in the index, and whether it may be served by IP (for `iamlet status`).
    pub fn known(&self) -> Vec<super::Known> {
        let state = self.read();
        state
            .pods
            .by_uid
            .iter()
            .map(|ByUid(record)| state.pods.known(record))
            .collect()
    }

    /// The pod with uid `uid`, whatever its network or IP, and its standing.
    pub fn by_uid(&self, uid: &str) -> Option<super::Known> {
        let state = self.read();
        state
            .pods
            .by_uid
            .get(uid)
            .map(|ByUid(record)| state.pods.known(record))
    }

    /// The pod with uid `uid`, waiting up to `wait` for the watch to bring it (a pod can ask
    /// before its watch event arrives). Woken by index changes, not polling.
    pub async fn find_uid(&self, uid: &str, wait: Duration) -> Option<super::Known> {
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(known) = self.by_uid(uid) {
                return Some(known);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return None,
            }
        }
    }

    /// Every pod that has not finished, whatever its network or IP: those a pod-bound token
    /// could be served for.
    pub fn live(&self) -> Vec<Arc<Pod>> {
        self.read()
            .pods
            .by_uid
            .iter()
            .map(|ByUid(record)| record)
            .filter(|record| !record.finished)
            .map(|record| record.pod.clone())
            .collect()
    }

    /// A receiver that changes whenever the index does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The policy of namespace `name`; `None` while it is unknown.
    pub fn namespace(&self, name: &str) -> Option<Arc<NamespacePolicy>> {
        self.read().namespaces.get(name).cloned()
    }

    /// Whether both the pod and namespace lists have been received in full.
    pub fn synced(&self) -> bool {
        let state = self.read();
        state.pods_synced && state.namespaces_synced
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::Annotations;

    const IP: &str = "10.1.2.3";

    fn record(uid: &str, name: &str, role: &str) -> PodRecord {
        PodRecord {
            pod: Arc::new(Pod {
                namespace: "shop".into(),
                name: name.into(),
                uid: uid.into(),
                service_account: "default".into(),
                annotations: Annotations {
                    role: Some(role.into()),
                    ..Annotations::default()
                },
            }),
            ip: Some(IP.parse().expect("ip")),
            host_network: false,
            finished: false,
        }
    }

    fn role_at(index: &PodIndex) -> Option<String> {
        match index.lookup(IP.parse().expect("ip")) {
            Lookup::Found(pod) => pod.annotations.role.clone(),
            Lookup::Unknown | Lookup::Conflict(_) => None,
        }
    }

    fn synced(index: &PodIndex) {
        index.apply_pod(Change::Init);
        index.apply_pod(Change::InitDone);
    }

    #[test]
    fn a_pod_is_found_by_its_ip() {
        let index = PodIndex::default();
        synced(&index);
        index.apply_pod(Change::Apply(record("u1", "web-0", "web")));
        assert_eq!(role_at(&index).as_deref(), Some("web"));
    }

    #[test]
    fn a_deleted_pod_is_gone_at_once() {
        let index = PodIndex::default();
        index.apply_pod(Change::Apply(record("u1", "web-0", "web")));
        index.apply_pod(Change::Delete(record("u1", "web-0", "web")));
        assert_eq!(role_at(&index), None);
    }

    #[test]
    fn ip_reuse_delete_then_add_serves_the_new_pod() {
        let index = PodIndex::default();
        index.apply_pod(Change::Apply(record("old", "admin-0", "admin")));
        index.apply_pod(Change::Delete(record("old", "admin-0", "admin")));
        index.apply_pod(Change::Apply(record("new", "web-0", "web")));
        assert_eq!(role_at(&index).as_deref(), Some("web"));
    }

    #[test]
    fn ip_reuse_add_before_delete_refuses_until_the_old_pod_goes() {
        let index = PodIndex::default();
        index.apply_pod(Change::Apply(record("old", "admin-0", "admin")));
        index.apply_pod(Change::Apply(record("new", "web-0", "web")));
        // Two live claims: neither role is served, least of all the old pod's.
        assert!(
            matches!(index.lookup(IP.parse().expect("ip")), Lookup::Conflict(names) if names.len() == 2)
        );
        index.apply_pod(Change::Delete(record("old", "admin-0", "admin")));
        assert_eq!(role_at(&index).as_deref(), Some("web"));
    }

    #[test]
    fn ip_reuse_when_the_old_pod_finishes_first() {
        let index = PodIndex::default();
        index.apply_pod(Change::Apply(record("old", "job-0", "admin")));
        let mut finished = record("old", "job-0", "admin");
        finished.finished = true;
        index.apply_pod(Change::Apply(finished));
        assert_eq!(role_at(&index), None, "a finished pod is not served");
        index.apply_pod(Change::Apply(record("new", "web-0", "web")));
        assert_eq!(role_at(&index).as_deref(), Some("web"));
    }

    #[test]
    fn a_stale_delete_for_a_recreated_pod_keeps_the_new_one() {
        // StatefulSet pods come back with the same name and a new uid.
        let index = PodIndex::default();
        index.apply_pod(Change::Apply(record("uid-2", "web-0", "web")));
        index.apply_pod(Change::Delete(record("uid-1", "web-0", "web")));
        assert_eq!(role_at(&index).as_deref(), Some("web"));
    }

    #[test]
    fn host_network_pods_are_never_indexed() {
        let index = PodIndex::default();
        let mut host = record("u1", "node-agent", "admin");
        host.host_network = true;
        index.apply_pod(Change::Apply(host));
        assert_eq!(index.lookup(IP.parse().expect("ip")), Lookup::Unknown);
    }

    #[test]
    fn a_pod_changing_ip_releases_the_old_one() {
        let index = PodIndex::default();
        index.apply_pod(Change::Apply(record("u1", "web-0", "web")));
        let mut moved = record("u1", "web-0", "web");
        moved.ip = Some("10.9.9.9".parse().expect("ip"));
        index.apply_pod(Change::Apply(moved));
        assert_eq!(role_at(&index), None);
        assert!(matches!(
            index.lookup("10.9.9.9".parse().expect("ip")),
            Lookup::Found(_)
        ));
    }

    #[test]
    fn known_pods_say_why_they_are_not_served() {
        use crate::pods::Standing;
        let index = PodIndex::default();
        index.apply_pod(Change::Apply(record("a", "web-0", "web")));
        index.apply_pod(Change::Apply(record("b", "web-1", "web")));
        let mut host = record("c", "agent", "admin");
        host.host_network = true;
        index.apply_pod(Change::Apply(host));
        let mut known = index.known();
        known.sort_by(|x, y| x.pod.uid.cmp(&y.pod.uid));
        let standings: Vec<_> = known.iter().map(|k| k.standing.clone()).collect();
        assert_eq!(
            standings,
            [
                Standing::Conflict(vec!["shop/web-1".to_owned()]),
                Standing::Conflict(vec!["shop/web-0".to_owned()]),
                Standing::HostNetwork,
            ]
        );
    }

    #[test]
    fn pods_are_found_by_uid_whatever_their_network() {
        let index = PodIndex::default();
        let mut host = record("h", "node-agent", "admin");
        host.host_network = true;
        index.apply_pod(Change::Apply(host));
        index.apply_pod(Change::Apply(record("a", "web-0", "web")));
        index.apply_pod(Change::Apply(record("b", "web-1", "web")));
        let standing = |uid: &str| index.by_uid(uid).map(|known| known.standing);
        assert_eq!(standing("h"), Some(crate::pods::Standing::HostNetwork));
        // An IP conflict does not matter to a token.
        assert!(matches!(
            standing("a"),
            Some(crate::pods::Standing::Conflict(_))
        ));
        assert_eq!(standing("nope"), None);
        assert_eq!(index.live().len(), 3);

        let mut finished = record("h", "node-agent", "admin");
        finished.host_network = true;
        finished.finished = true;
        index.apply_pod(Change::Apply(finished));
        assert_eq!(standing("h"), Some(crate::pods::Standing::Finished));
        assert_eq!(index.live().len(), 2);
        index.apply_pod(Change::Delete(record("a", "web-0", "web")));
        assert_eq!(standing("a"), None, "a deleted pod is gone by uid too");
    }

    #[tokio::test(start_paused = true)]
    async fn find_uid_waits_for_the_pod_to_arrive() {
        let index = Arc::new(PodIndex::default());
        let writer = index.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            writer.apply_pod(Change::Apply(record("u1", "web-0", "web")));
        });
        let found = index.find_uid("u1", Duration::from_millis(900)).await;
        assert_eq!(found.map(|k| k.pod.name.clone()).as_deref(), Some("web-0"));
        let started = tokio::time::Instant::now();
        assert!(
            index
                .find_uid("u2", Duration::from_millis(900))
                .await
                .is_none()
        );
        assert_eq!(started.elapsed(), Duration::from_millis(900));
    }

    #[test]
    fn relists_are_swapped_in_whole() {
        let index = PodIndex::default();
        index.apply_pod(Change::Apply(record("gone", "old-0", "admin")));
        index.apply_pod(Change::Init);
        index.apply_pod(Change::InitApply(record("u1", "web-0", "web")));
        // Mid-relist, readers still see the previous complete picture.
        assert_eq!(role_at(&index).as_deref(), Some("admin"));
        index.apply_pod(Change::InitDone);
        assert_eq!(role_at(&index).as_deref(), Some("web"));
        assert_eq!(index.servable().len(), 1);
    }

    /// What a test remembers about a pod: its uid.
    fn remember_uid(index: &PodIndex) -> Option<String> {
        match index.recall(IP.parse().expect("ip")) {
            Recall::Found(found) => {
                let uid = found.pod.uid.clone();
                index.remember(&found, Arc::new(uid.clone()));
                Some(uid)
            }
            Recall::Unknown | Recall::Conflict => None,
        }
    }

    /// The uid remembered for whoever is found at the IP now, if anything is remembered.
    fn recalled(index: &PodIndex) -> Option<String> {
        match index.recall(IP.parse().expect("ip")) {
            Recall::Found(found) => found.memo.map(|memo| {
                let uid = memo.downcast::<String>().expect("a uid");
                assert_eq!(*uid, found.pod.uid, "a memo recalled for another pod");
                (*uid).clone()
            }),
            Recall::Unknown | Recall::Conflict => None,
        }
    }

    #[test]
    fn a_memo_is_kept_with_the_pod_until_anything_it_was_made_from_changes() {
        let index = PodIndex::default();
        index.apply_pod(Change::Apply(record("u1", "web-0", "web")));
        assert_eq!(recalled(&index), None, "nothing remembered yet");
        assert_eq!(remember_uid(&index).as_deref(), Some("u1"));
        assert_eq!(recalled(&index).as_deref(), Some("u1"));

        // A new version of the pod (an annotation changed, say) forgets it.
        index.apply_pod(Change::Apply(record("u1", "web-0", "admin")));
        assert_eq!(recalled(&index), None);
        remember_uid(&index);

        // A change to any namespace's policy forgets it too (it may be the pod's namespace).
        let permitting = |pattern: &str| {
            Change::Apply((
                "shop".to_owned(),
                NamespacePolicy::from_annotation(Some(pattern)),
            ))
        };
        index.apply_namespace(permitting(".*"));
        assert_eq!(recalled(&index), None);
        remember_uid(&index);
        // An event that leaves the policy as it was (a label changed) does not.
        index.apply_namespace(permitting(".*"));
        assert_eq!(recalled(&index).as_deref(), Some("u1"));
        index.apply_namespace(permitting("arn:.*"));
        assert_eq!(recalled(&index), None);
        remember_uid(&index);

        // Another pod claiming the IP: nothing is served, nothing recalled.
        index.apply_pod(Change::Apply(record("u2", "web-1", "web")));
        assert!(matches!(
            index.recall(IP.parse().expect("ip")),
            Recall::Conflict
        ));
        index.apply_pod(Change::Delete(record("u1", "web-0", "web")));
        assert_eq!(recalled(&index), None, "u2's claim starts with nothing");
        assert_eq!(remember_uid(&index).as_deref(), Some("u2"));

        // Finished, the pod gives up its IP, and its memo with it.
        let mut finished = record("u2", "web-1", "web");
        finished.finished = true;
        index.apply_pod(Change::Apply(finished));
        assert!(matches!(
            index.recall(IP.parse().expect("ip")),
            Recall::Unknown
        ));
        index.apply_pod(Change::Apply(record("u3", "web-2", "web")));
        assert_eq!(recalled(&index), None);
        remember_uid(&index);

        // A relist starts afresh.
        index.apply_pod(Change::Init);
        index.apply_pod(Change::InitApply(record("u3", "web-2", "web")));
        assert_eq!(
            recalled(&index).as_deref(),
            Some("u3"),
            "not before InitDone"
        );
        index.apply_pod(Change::InitDone);
        assert_eq!(recalled(&index), None);
    }

    #[test]
    fn a_memo_made_before_a_change_is_not_kept() {
        let index = PodIndex::default();
        index.apply_pod(Change::Apply(record("u1", "web-0", "web")));
        let Recall::Found(before) = index.recall(IP.parse().expect("ip")) else {
            panic!("found")
        };
        // The pod changes while its memo is being made: the memo is dropped, not kept.
        index.apply_pod(Change::Apply(record("u1", "web-0", "admin")));
        index.remember(&before, Arc::new("u1".to_owned()));
        assert_eq!(recalled(&index), None);

        let Recall::Found(before) = index.recall(IP.parse().expect("ip")) else {
            panic!("found")
        };
        index.apply_namespace(Change::Apply((
            "shop".to_owned(),
            NamespacePolicy::from_annotation(None),
        )));
        index.remember(&before, Arc::new("u1".to_owned()));
        assert_eq!(recalled(&index), None);
    }

    #[test]
    fn pods_without_an_ip_yet_are_live_but_not_servable() {
        let index = PodIndex::default();
        let mut pending = record("u1", "web-0", "web");
        pending.ip = None;
        index.apply_pod(Change::Apply(pending));
        let mut host = record("u2", "agent", "admin");
        host.host_network = true;
        index.apply_pod(Change::Apply(host));
        let mut done = record("u3", "job-0", "batch");
        done.finished = true;
        index.apply_pod(Change::Apply(done));
        assert!(index.servable().is_empty());
        let live: Vec<String> = index
            .on_pod_network()
            .iter()
            .map(|p| p.uid.clone())
            .collect();
        assert_eq!(
            live,
            ["u1"],
            "only the pending pod will ask for credentials"
        );
    }

    #[test]
    fn synced_needs_both_lists() {
        let index = PodIndex::default();
        assert!(!index.synced());
        synced(&index);
        assert!(!index.synced());
        index.apply_namespace(Change::Init);
        index.apply_namespace(Change::InitDone);
        assert!(index.synced());
    }

    #[tokio::test(start_paused = true)]
    async fn find_waits_for_the_pod_to_arrive() {
        let index = Arc::new(PodIndex::default());
        let writer = index.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            writer.apply_pod(Change::Apply(record("u1", "web-0", "web")));
        });
        let found = index
            .find(IP.parse().expect("ip"), Duration::from_millis(900))
            .await;
        assert_eq!(found.map(|p| p.name.clone()).as_deref(), Some("web-0"));
    }

    #[tokio::test(start_paused = true)]
    async fn find_gives_up_after_the_wait() {
        let index = PodIndex::default();
        let started = tokio::time::Instant::now();
        let found = index
            .find(IP.parse().expect("ip"), Duration::from_millis(900))
            .await;
        assert_eq!(found, None);
        assert_eq!(started.elapsed(), Duration::from_millis(900));
    }
}
