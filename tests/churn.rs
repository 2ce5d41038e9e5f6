//! The churn invariant of the IP → pod index, through its public API: a seeded property-based
//! run of pod adds, deletes, phase changes and IP reuse, with watch events reordered across
//! pods, duplicated, and replaced by relists. After every step, each IP is answered exactly the
//! pod that alone claims it in what the watch has delivered, or nothing, and never a pod that
//! has given it up; a pod whose current state has arrived is never shadowed by an older one.
//!
//! The model: `truth` is the cluster; every change of a pod queues an event for that pod
//! (Kubernetes keeps one object's events in order, but pods' events interleave freely);
//! `view` is what the delivered events say. Relists supersede queued events, as a watcher's
//! relist after 410 Gone does.
//!
//! The request path recalls, with the pod, what was decided for it and remembered beside its
//! claim ([`PodIndex::remember`]); after every step, each IP's memo is remembered anew, and a
//! memo recalled must be about the very version of the pod the index holds now, made since the
//! last change to any namespace: a decision is never served stale.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use iamlet::pod::{Annotations, Pod};
use iamlet::pods::index::{Change, Lookup, PodIndex, PodRecord, Recall};
use iamlet::policy::NamespacePolicy;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// A handful of IPs and names, so reuse is the rule, not the exception.
const IPS: u8 = 5;
const NAMES: u8 = 4;
/// The policies a namespace event may carry.
const PERMITTED: [&str; 2] = [".*", "arn:aws:iam::123456789012:role/.*"];
const SEED: [u8; 32] = *b"iamlet-churn-invariant-seed-0001";
const CASES: u32 = 48;
const STEPS: std::ops::Range<usize> = 200..400;
const MIN_STEPS: usize = 10_000;

#[derive(Debug, Clone)]
enum Action {
    /// A new pod (new uid; a name that may be reused), pending or already with an IP.
    Create {
        name: u8,
        ip: Option<u8>,
        host_network: bool,
    },
    /// A pending pod gets its IP (or a running one moves: rare, but the index must cope).
    AssignIp {
        pod: u8,
        ip: u8,
    },
    /// Succeeded or Failed.
    Finish {
        pod: u8,
    },
    Delete {
        pod: u8,
    },
    /// The next queued event of some pod arrives.
    Deliver {
        pod: u8,
    },
    /// The last delivered event of some pod arrives again.
    Duplicate {
        pod: u8,
    },
    /// The watch relists: Init, then the current pods (shuffled, some twice), then InitDone,
    /// with lookups checked between the items.
    Relist {
        order: u64,
        duplicates: u8,
    },
    /// A namespace event, with one of two policies (the same as before, or not), or the
    /// namespaces are relisted.
    Namespace {
        relist: bool,
        permitted: usize,
    },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (0..NAMES, proptest::option::weighted(0.5, 0..IPS), proptest::bool::weighted(0.1))
            .prop_map(|(name, ip, host_network)| Action::Create { name, ip, host_network }),
        3 => (any::<u8>(), 0..IPS).prop_map(|(pod, ip)| Action::AssignIp { pod, ip }),
        2 => any::<u8>().prop_map(|pod| Action::Finish { pod }),
        2 => any::<u8>().prop_map(|pod| Action::Delete { pod }),
        8 => any::<u8>().prop_map(|pod| Action::Deliver { pod }),
        2 => any::<u8>().prop_map(|pod| Action::Duplicate { pod }),
        1 => (any::<u64>(), 0u8..3).prop_map(|(order, duplicates)| Action::Relist { order, duplicates }),
        1 => (proptest::bool::weighted(0.3), 0..PERMITTED.len())
            .prop_map(|(relist, permitted)| Action::Namespace { relist, permitted }),
    ]
}

#[derive(Debug, Clone, PartialEq)]
struct State {
    name: u8,
    ip: Option<u8>,
    host_network: bool,
    finished: bool,
}

impl State {
    fn claim(&self) -> Option<u8> {
        if self.host_network || self.finished {
            None
        } else {
            self.ip
        }
    }
}

#[derive(Debug, Clone)]
enum Event {
    Apply(String, State),
    Delete(String, State),
}

/// What the test remembers beside a claim: the pod it was about, and when.
struct Memo {
    pod: Arc<Pod>,
    namespaces: u64,
}

#[derive(Default)]
struct Model {
    /// Changes to namespaces' policies so far (a relist counts as one).
    namespaces: u64,
    /// The namespace's policy now: an index into [`PERMITTED`].
    permitted: Option<usize>,
    next_uid: usize,
    truth: BTreeMap<String, State>,
    queued: HashMap<String, VecDeque<Event>>,
    view: BTreeMap<String, State>,
    last_delivered: HashMap<String, Event>,
}

fn ip(n: u8) -> IpAddr {
    IpAddr::from([10, 0, 0, n + 1])
}

fn record(uid: &str, state: &State) -> PodRecord {
    PodRecord {
        pod: Arc::new(Pod {
            namespace: "churn".into(),
            name: format!("web-{}", state.name),
            uid: uid.to_owned(),
            service_account: "default".into(),
            annotations: Annotations {
                role: Some(format!("role-of-{uid}")),
                ..Annotations::default()
            },
        }),
        ip: state.ip.map(ip),
        host_network: state.host_network,
        finished: state.finished,
    }
}

impl Model {
    /// The uid at `pick` among pods that exist in the cluster now.
    fn existing(&self, pick: u8) -> Option<String> {
        let uids: Vec<&String> = self.truth.keys().collect();
        (!uids.is_empty()).then(|| uids[usize::from(pick) % uids.len()].clone())
    }

    fn change(&mut self, uid: &str, state: State) {
        self.truth.insert(uid.to_owned(), state.clone());
        self.queued
            .entry(uid.to_owned())
            .or_default()
            .push_back(Event::Apply(uid.to_owned(), state));
    }

    fn deliver(&mut self, index: &PodIndex, event: Event) {
        match &event {
            Event::Apply(uid, state) => {
                self.view.insert(uid.clone(), state.clone());
                index.apply_pod(Change::Apply(record(uid, state)));
            }
            Event::Delete(uid, state) => {
                self.view.remove(uid);
                index.apply_pod(Change::Delete(record(uid, state)));
            }
        }
        let uid = match &event {
            Event::Apply(uid, _) | Event::Delete(uid, _) => uid.clone(),
        };
        self.last_delivered.insert(uid, event);
    }

    fn step(&mut self, index: &PodIndex, action: &Action) {
        match *action {
            Action::Create {
                name,
                ip,
                host_network,
            } => {
                self.next_uid += 1;
                let uid = format!("uid-{}", self.next_uid);
                let state = State {
                    name,
                    ip,
                    host_network,
                    finished: false,
                };
                self.change(&uid, state);
            }
            Action::AssignIp { pod, ip } => {
                if let Some(uid) = self.existing(pod) {
                    let mut state = self.truth[&uid].clone();
                    if !state.finished {
                        state.ip = Some(ip);
                        self.change(&uid, state);
                    }
                }
            }
            Action::Finish { pod } => {
                if let Some(uid) = self.existing(pod) {
                    let mut state = self.truth[&uid].clone();
                    state.finished = true;
                    self.change(&uid, state);
                }
            }
            Action::Delete { pod } => {
                if let Some(uid) = self.existing(pod) {
                    let state = self.truth.remove(&uid).expect("exists");
                    self.queued
                        .entry(uid.clone())
                        .or_default()
                        .push_back(Event::Delete(uid, state));
                }
            }
            Action::Deliver { pod } => {
                let waiting: Vec<String> = {
                    let mut uids: Vec<String> = self
                        .queued
                        .iter()
                        .filter(|(_, events)| !events.is_empty())
                        .map(|(uid, _)| uid.clone())
                        .collect();
                    uids.sort();
                    uids
                };
                if !waiting.is_empty() {
                    let uid = &waiting[usize::from(pod) % waiting.len()];
                    let event = self
                        .queued
                        .get_mut(uid)
                        .and_then(VecDeque::pop_front)
                        .expect("queued");
                    self.deliver(index, event);
                }
            }
            Action::Duplicate { pod } => {
                let mut uids: Vec<&String> = self.last_delivered.keys().collect();
                uids.sort();
                if !uids.is_empty() {
                    let uid = uids[usize::from(pod) % uids.len()].clone();
                    let event = self.last_delivered[&uid].clone();
                    self.deliver(index, event);
                }
            }
            Action::Namespace { relist, permitted } => {
                let policy = || {
                    (
                        "churn".to_owned(),
                        NamespacePolicy::from_annotation(Some(PERMITTED[permitted])),
                    )
                };
                if relist {
                    index.apply_namespace(Change::Init);
                    index.apply_namespace(Change::InitApply(policy()));
                    index.apply_namespace(Change::InitDone);
                } else {
                    index.apply_namespace(Change::Apply(policy()));
                }
                // An event that leaves the policy as it was (a label changed) need not
                // forget what was decided; any other must.
                if relist || self.permitted != Some(permitted) {
                    self.namespaces += 1;
                }
                self.permitted = Some(permitted);
            }
            Action::Relist { order, duplicates } => {
                let mut items: Vec<(String, State)> = self
                    .truth
                    .iter()
                    .map(|(u, s)| (u.clone(), s.clone()))
                    .collect();
                for i in 0..usize::from(duplicates).min(items.len()) {
                    items.push(items[i].clone());
                }
                // A deterministic shuffle from the action's own number.
                let mut rng = order;
                for i in (1..items.len()).rev() {
                    rng = rng
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    items.swap(i, (rng >> 33) as usize % (i + 1));
                }
                index.apply_pod(Change::Init);
                for (uid, state) in &items {
                    index.apply_pod(Change::InitApply(record(uid, state)));
                    // Mid-relist, readers still see the previous complete picture.
                    self.check(index);
                }
                index.apply_pod(Change::InitDone);
                self.view = self.truth.clone();
                self.queued.clear();
                self.last_delivered = self
                    .truth
                    .iter()
                    .map(|(u, s)| (u.clone(), Event::Apply(u.clone(), s.clone())))
                    .collect();
            }
        }
    }

    /// The invariant, for every IP.
    fn check(&self, index: &PodIndex) {
        self.check_memos(index);
        let mut servable = HashSet::new();
        for n in 0..IPS {
            let claimants: Vec<&String> = self
                .view
                .iter()
                .filter(|(_, state)| state.claim() == Some(n))
                .map(|(uid, _)| uid)
                .collect();
            let found = match index.lookup(ip(n)) {
                Lookup::Found(pod) => {
                    assert_eq!(
                        pod.annotations.role.as_deref(),
                        Some(format!("role-of-{}", pod.uid).as_str()),
                        "a pod answered with another pod's role"
                    );
                    Some(pod.uid.clone())
                }
                Lookup::Unknown | Lookup::Conflict(_) => None,
            };
            match claimants.as_slice() {
                [only] => {
                    assert_eq!(
                        found.as_deref(),
                        Some(only.as_str()),
                        "{} must be served",
                        ip(n)
                    );
                    servable.insert((*only).clone());
                }
                _ => assert_eq!(found, None, "{} has {} claimants", ip(n), claimants.len()),
            }
            // Against the cluster: a pod whose current state has arrived, and which holds the
            // IP alone in the cluster, is never shadowed by another pod's role.
            let holders: Vec<&String> = self
                .truth
                .iter()
                .filter(|(_, state)| state.claim() == Some(n))
                .map(|(uid, _)| uid)
                .collect();
            if let [holder] = holders.as_slice()
                && self.queued.get(*holder).is_none_or(VecDeque::is_empty)
                && let Some(found) = &found
            {
                assert_eq!(
                    found,
                    *holder,
                    "{} answered for a pod that gave it up",
                    ip(n)
                );
            }
        }
        let indexed: HashSet<String> = index.servable().iter().map(|p| p.uid.clone()).collect();
        assert_eq!(indexed, servable, "servable() disagrees with lookups");
    }

    /// The request path agrees with lookups, and recalls only memos about the pod as it is
    /// now, made since the last namespace change; then each IP's memo is remembered anew.
    fn check_memos(&self, index: &PodIndex) {
        for n in 0..IPS {
            let recalled = index.recall(ip(n));
            match (index.lookup(ip(n)), &recalled) {
                (Lookup::Found(pod), Recall::Found(found)) => {
                    assert_eq!(pod.uid, found.pod.uid, "recall and lookup disagree");
                    if let Some(memo) = &found.memo {
                        let memo = memo.clone().downcast::<Memo>().expect("a test memo");
                        assert!(
                            Arc::ptr_eq(&memo.pod, &pod),
                            "{} recalled a memo made for another version or pod",
                            ip(n)
                        );
                        assert_eq!(
                            memo.namespaces,
                            self.namespaces,
                            "{} recalled a memo made before a namespace changed",
                            ip(n)
                        );
                    }
                }
                (Lookup::Unknown, Recall::Unknown) | (Lookup::Conflict(_), Recall::Conflict) => {}
                (lookup, recall) => panic!("{}: lookup {lookup:?}, recall {recall:?}", ip(n)),
            }
            if let Recall::Found(found) = recalled {
                let memo = Memo {
                    pod: found.pod.clone(),
                    namespaces: self.namespaces,
                };
                index.remember(&found, Arc::new(memo));
            }
        }
    }
}

#[test]
fn an_ip_is_answered_only_for_the_pod_that_alone_holds_it() {
    let steps = AtomicUsize::new(0);
    let config = Config {
        cases: CASES,
        rng_algorithm: RngAlgorithm::ChaCha,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &SEED));
    let result = runner.run(&proptest::collection::vec(action(), STEPS), |actions| {
        let index = PodIndex::default();
        let mut model = Model::default();
        for action in &actions {
            model.step(&index, action);
            model.check(&index);
            steps.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    let steps = steps.load(Ordering::Relaxed);
    eprintln!("{steps} churn steps checked");
    assert!(steps >= MIN_STEPS, "only {steps} steps");
}
