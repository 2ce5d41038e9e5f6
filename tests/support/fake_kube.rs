//! A scripted fake of the Kubernetes API server's list/watch protocol, for what a real server
//! cannot be made to do on demand: compacting history (watches from an old resourceVersion get
//! a `410 Expired` ERROR event and must relist), cutting watch streams mid-flight, sending
//! bookmarks, and holding a list back. It keeps the protocol honest: every change gets the
//! next resourceVersion, lists carry the current one, watches replay what came after the
//! version they ask for, the `spec.nodeName` field selector filters pods, and lists are paged
//! by `limit` and `continue` from a consistent snapshot, as the API server pages from etcd.
//! The real kube-rs client in iamlet talks to it unmodified, over plain HTTP.
//!
//! For scale runs it holds objects as their JSON (a 50 000-pod cluster fits in a few hundred
//! MB), loads a cluster in bulk ([`FakeKube::load_pods`]), and counts the bytes of every list
//! and watch body it sends ([`FakeKube::bytes_sent`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pods,
    Namespaces,
}

/// An object as stored: its JSON (with its resourceVersion) and, for a pod, its node.
#[derive(Clone)]
struct Stored {
    node: Option<String>,
    json: Bytes,
}

impl Stored {
    fn new(object: &Value) -> Stored {
        Stored {
            node: pod_node(object).map(str::to_owned),
            json: Bytes::from(serde_json::to_vec(object).expect("json")),
        }
    }
}

struct Watch {
    id: u64,
    kind: Kind,
    node: Option<String>,
    sender: mpsc::UnboundedSender<Result<Frame<Bytes>, std::io::Error>>,
}

/// A list being paged: the items as they were at `rv`, served `limit` at a time.
struct Snapshot {
    rv: u64,
    items: Arc<Vec<Stored>>,
}

/// Lists being paged at once, at most; the oldest is forgotten (its token then gets 410).
const SNAPSHOTS_KEPT: usize = 16;

#[derive(Default)]
struct State {
    rv: u64,
    compacted_before: u64,
    pods: BTreeMap<String, Stored>,
    namespaces: BTreeMap<String, Stored>,
    history: Vec<(u64, Kind, &'static str, Stored)>,
    watches: Vec<Watch>,
    requests: Vec<String>,
    hold_namespace_list: bool,
    /// While set, every request is answered 503, as an API server that is down behind its
    /// load balancer.
    unreachable: bool,
    next_watch: u64,
    snapshots: BTreeMap<u64, Snapshot>,
    next_snapshot: u64,
}

#[derive(Clone)]
pub struct FakeKube {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    sent: Arc<AtomicU64>,
}

fn pod_node(pod: &Value) -> Option<&str> {
    pod["spec"]["nodeName"].as_str()
}

impl State {
    fn record(&mut self, kind: Kind, event: &'static str, mut object: Value) {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let (store, id) = match kind {
            Kind::Pods => (&mut self.pods, "uid"),
            Kind::Namespaces => (&mut self.namespaces, "name"),
        };
        let id = object["metadata"][id]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let stored = Stored::new(&object);
        if event == "DELETED" {
            store.remove(&id);
        } else {
            store.insert(id, stored.clone());
        }
        let line = event_line(event, &stored.json);
        self.watches.retain(|watch| {
            if watch.kind != kind || !matches_node(watch.node.as_deref(), kind, &stored) {
                return !watch.sender.is_closed();
            }
            watch.sender.send(Ok(Frame::data(line.clone()))).is_ok()
        });
        self.history.push((self.rv, kind, event, stored));
    }
}

fn matches_node(node: Option<&str>, kind: Kind, object: &Stored) -> bool {
    kind != Kind::Pods || node.is_none() || object.node.as_deref() == node
}

/// One line of a watch stream: `{"type":EVENT,"object":OBJECT}`.
fn event_line(event: &str, object: &[u8]) -> Bytes {
    let mut line = Vec::with_capacity(object.len() + 40);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(event.as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    line.extend_from_slice(object);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

/// A pod object as the API server returns it.
pub fn pod(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    ip: &str,
    role: Option<&str>,
) -> Value {
    let mut annotations = serde_json::Map::new();
    if let Some(role) = role {
        annotations.insert("iam.amazonaws.com/role".into(), json!(role));
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "annotations": annotations},
        "spec": {"nodeName": node, "serviceAccountName": "default", "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

/// What a pod of a real workload carries, for [`full_pod`].
#[derive(Debug, Clone)]
pub struct Workload<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub node: &'a str,
    /// `None` while the pod is Pending (scheduled, its sandbox not up yet).
    pub ip: Option<&'a str>,
    pub role: Option<&'a str>,
    pub service_account: &'a str,
}

/// A pod as a real cluster's API server returns one of a Deployment's pods: labels, owner,
/// managed fields, a container with environment, probes, resources and mounts, conditions and
/// container statuses; about 4 KB of JSON, most of which iamlet must read past and drop.
pub fn full_pod(pod: &Workload<'_>) -> Value {
    let app = pod.name.rsplitn(3, '-').last().unwrap_or(pod.name);
    let mut annotations = serde_json::Map::new();
    annotations.insert(
        "kubectl.kubernetes.io/restartedAt".into(),
        json!("2026-11-20T10:12:44Z"),
    );
    if let Some(role) = pod.role {
        annotations.insert("iam.amazonaws.com/role".into(), json!(role));
    }
    let time = "2026-11-26T06:00:00Z";
    let mut status = json!({
        "phase": "Pending",
        "qosClass": "Burstable",
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": time}
        ],
        "hostIP": "10.0.3.17",
        "hostIPs": [{"ip": "10.0.3.17"}],
        "startTime": time
    });
    if let Some(ip) = pod.ip {
        status["phase"] = json!("Running");
        status["podIP"] = json!(ip);
        status["podIPs"] = json!([{"ip": ip}]);
        status["conditions"] = json!([
            {"type": "PodReadyToStartContainers", "status": "True", "lastProbeTime": null, "lastTransitionTime": time},
            {"type": "Initialized", "status": "True", "lastProbeTime": null, "lastTransitionTime": time},
            {"type": "Ready", "status": "True", "lastProbeTime": null, "lastTransitionTime": time},
            {"type": "ContainersReady", "status": "True", "lastProbeTime": null, "lastTransitionTime": time},
            {"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": time}
        ]);
        status["containerStatuses"] = json!([{
            "name": "app", "state": {"running": {"startedAt": time}}, "lastState": {},
            "ready": true, "restartCount": 0, "image": format!("registry.example.com/{app}:1.24.3"),
            "imageID": format!("registry.example.com/{app}@sha256:9b2c1a0c5e8d7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a"),
            "containerID": format!("containerd://{}", pod.uid.replace('-', "")), "started": true
        }]);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "generateName": format!("{app}-7d4b9c8f6-"),
            "namespace": pod.namespace,
            "uid": pod.uid,
            "creationTimestamp": time,
            "labels": {"app.kubernetes.io/name": app, "app.kubernetes.io/part-of": pod.namespace, "pod-template-hash": "7d4b9c8f6"},
            "annotations": annotations,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-7d4b9c8f6"),
                "uid": "5c0b3a9e-1f2d-4c6b-8a7e-9d0c1b2a3f4e", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "time": time, "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app.kubernetes.io/name": {}, "f:pod-template-hash": {}},
                   "f:ownerReferences": {".": {}, "k:{\"uid\":\"5c0b3a9e-1f2d-4c6b-8a7e-9d0c1b2a3f4e\"}": {}}},
                   "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:env": {}, "f:image": {}, "f:name": {}, "f:ports": {}, "f:readinessProbe": {}, "f:resources": {}}},
                   "f:serviceAccountName": {}, "f:terminationGracePeriodSeconds": {}}}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": time, "fieldsType": "FieldsV1", "subresource": "status",
                 "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:hostIP": {}, "f:phase": {}, "f:podIP": {}, "f:startTime": {}}}}
            ]
        },
        "spec": {
            "nodeName": pod.node,
            "serviceAccountName": pod.service_account,
            "serviceAccount": pod.service_account,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler",
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
            "securityContext": {"runAsNonRoot": true, "fsGroup": 2000},
            "containers": [{
                "name": "app",
                "image": format!("registry.example.com/{app}:1.24.3"),
                "imagePullPolicy": "IfNotPresent",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "env": [
                    {"name": "AWS_REGION", "value": "eu-west-1"},
                    {"name": "LOG_LEVEL", "value": "info"},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}
                ],
                "resources": {"limits": {"memory": "512Mi"}, "requests": {"cpu": "100m", "memory": "256Mi"}},
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http", "scheme": "HTTP"},
                    "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
                "volumeMounts": [{"name": "kube-api-access-x7k2p", "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File"
            }],
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
            ]}}],
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            ]
        },
        "status": status
    })
}

/// A namespace object (metadata-only, as iamlet asks for them).
pub fn namespace(name: &str, permitted: Option<&str>) -> Value {
    let mut annotations = serde_json::Map::new();
    if let Some(permitted) = permitted {
        annotations.insert("iam.amazonaws.com/permitted".into(), json!(permitted));
    }
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": {"name": name, "uid": format!("ns-{name}"), "annotations": annotations}
    })
}

impl FakeKube {
    pub fn start() -> FakeKube {
        let state: Arc<Mutex<State>> = Arc::default();
        let sent: Arc<AtomicU64> = Arc::default();
        let (served, counted) = (state.clone(), sent.clone());
        let addr = super::server::spawn(([127, 0, 0, 1], 0).into(), move |request| {
            let (state, sent) = (served.clone(), counted.clone());
            async move { handle(&state, &sent, request).await }
        });
        FakeKube { addr, state, sent }
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().expect("state"))
    }

    pub fn apply_pod(&self, pod: Value) {
        let event = {
            let uid = pod["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if self.with(|s| s.pods.contains_key(&uid)) {
                "MODIFIED"
            } else {
                "ADDED"
            }
        };
        self.with(|s| s.record(Kind::Pods, event, pod));
    }

    pub fn delete_pod(&self, uid: &str) {
        self.with(|s| {
            if let Some(pod) = s.pods.get(uid) {
                let pod: Value = serde_json::from_slice(&pod.json).expect("stored pod");
                s.record(Kind::Pods, "DELETED", pod);
            }
        });
    }

    /// Puts `pods` in the cluster at once, as a cluster that has run for a while has them:
    /// each gets its resourceVersion, but no history is kept of their arrival (a watch from
    /// before them gets `410 Expired`, as after a compaction). For scale runs.
    pub fn load_pods(&self, pods: impl IntoIterator<Item = Value>) {
        self.with(|s| {
            for mut pod in pods {
                s.rv += 1;
                pod["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                let uid = pod["metadata"]["uid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                s.pods.insert(uid, Stored::new(&pod));
            }
            // A watch from now on is whole; one from before would miss the pods.
            s.compacted_before = s.rv;
        });
    }

    pub fn apply_namespace(&self, namespace: Value) {
        let name = namespace["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let event = if self.with(|s| s.namespaces.contains_key(&name)) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.with(|s| s.record(Kind::Namespaces, event, namespace));
    }

    /// Forgets history: watches resuming from before now get `410 Expired`, and so do lists
    /// continued from before now.
    pub fn compact(&self) {
        self.with(|s| {
            s.compacted_before = s.rv + 1;
            s.history.clear();
            s.snapshots.clear();
        });
    }

    /// Cuts every open watch stream mid-flight (the connection errors out).
    pub fn cut_watches(&self) {
        self.with(|s| {
            for watch in s.watches.drain(..) {
                let _ = watch.sender.send(Err(std::io::Error::other("cut")));
            }
        });
    }

    /// Sends a BOOKMARK at a fresh resourceVersion to every open watch; returns it.
    pub fn bookmark(&self) -> u64 {
        self.with(|s| {
            s.rv += 1;
            let rv = s.rv;
            for watch in &s.watches {
                let kind = if watch.kind == Kind::Pods { "Pod" } else { "PartialObjectMetadata" };
                let object = json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}});
                let object = serde_json::to_vec(&object).expect("json");
                let _ = watch.sender.send(Ok(Frame::data(event_line("BOOKMARK", &object))));
            }
            rv
        })
    }

    /// While unreachable, every request fails (503) and open watches are cut; after, requests
    /// are served again, from where history left off.
    pub fn set_unreachable(&self, unreachable: bool) {
        self.with(|s| s.unreachable = unreachable);
        if unreachable {
            self.cut_watches();
        }
    }

    /// While held, namespace lists are answered only once released.
    pub fn hold_namespace_list(&self, hold: bool) {
        self.with(|s| s.hold_namespace_list = hold);
    }

    /// Requests seen, as "LIST pods" (a list's first page), "LIST pods continued" (a later
    /// page) and "WATCH pods from 7".
    pub fn requests(&self) -> Vec<String> {
        self.with(|s| s.requests.clone())
    }

    /// Bytes of list and watch bodies sent so far (what a client received from the API,
    /// without HTTP headers).
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// iamlet's setup for watching node-1 through this server, its kubeconfig written in `dir`.
    pub fn setup(&self, dir: &std::path::Path, sts: String) -> super::iamlet::Setup {
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, self.kubeconfig("iamlet-token")).expect("kubeconfig");
        super::iamlet::Setup {
            sts,
            pods_source: "kubernetes".into(),
            env: vec![
                ("KUBECONFIG".into(), kubeconfig.display().to_string()),
                ("NODE_NAME".into(), "node-1".into()),
            ],
            ..super::iamlet::Setup::default()
        }
    }

    /// A kubeconfig for this server with `token`.
    pub fn kubeconfig(&self, token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             users:\n- name: iamlet\n  user:\n    token: {token}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: iamlet\n\
             current-context: fake\n",
            self.addr
        )
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(status: u16, value: &Value) -> Response<Body> {
    whole(
        status,
        Bytes::from(serde_json::to_vec(value).expect("json")),
    )
}

fn whole(status: u16, body: Bytes) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body).map_err(|never| match never {}).boxed())
        .expect("response")
}

fn query(request: &Request<hyper::body::Incoming>) -> BTreeMap<String, String> {
    request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace("%3D", "=").replace("%3d", "=")))
        .collect()
}

/// What a `continue` token names: a snapshot, and where in it the next page starts.
fn parse_continue(token: &str) -> Option<(u64, usize)> {
    let (snapshot, offset) = token.split_once('-')?;
    Some((snapshot.parse().ok()?, offset.parse().ok()?))
}

async fn handle(
    state: &Arc<Mutex<State>>,
    sent: &Arc<AtomicU64>,
    request: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let path = request.uri().path().to_owned();
    if state.lock().expect("state").unreachable {
        return full(
            503,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503,
                "reason": "ServiceUnavailable", "message": "the server is currently unable to handle the request"}),
        );
    }
    if request.method() == hyper::Method::POST
        && path.starts_with("/apis/events.k8s.io/v1/namespaces/")
    {
        let body = request
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let event: Value = serde_json::from_slice(&body).unwrap_or_default();
        let line = format!(
            "EVENT {} {} on {}/{}: {}",
            event["type"].as_str().unwrap_or_default(),
            event["reason"].as_str().unwrap_or_default(),
            event["regarding"]["namespace"].as_str().unwrap_or_default(),
            event["regarding"]["name"].as_str().unwrap_or_default(),
            event["note"].as_str().unwrap_or_default(),
        );
        state.lock().expect("state").requests.push(line);
        return full(201, &event);
    }
    let kind = match path.as_str() {
        "/api/v1/pods" => Kind::Pods,
        "/api/v1/namespaces" => Kind::Namespaces,
        other => {
            return full(
                404,
                &json!({"kind": "Status", "code": 404, "message": format!("{other} not found")}),
            );
        }
    };
    let query = query(&request);
    let node = query
        .get("fieldSelector")
        .and_then(|selector| selector.strip_prefix("spec.nodeName="))
        .map(str::to_owned);
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return watch(state, sent, kind, node, &query);
    }
    // A list, perhaps held back.
    let mut noted_hold = false;
    loop {
        {
            let mut s = state.lock().expect("state");
            let held = kind == Kind::Namespaces && s.hold_namespace_list;
            if !held {
                let response = list(&mut s, kind, node.as_deref(), &query);
                sent.fetch_add(response.0.len() as u64, Ordering::Relaxed);
                return whole(response.1, response.0);
            }
            if !noted_hold {
                // So a test can see the list was asked for and is being held.
                s.requests.push(format!("HELD LIST {}", what(kind)));
                noted_hold = true;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn what(kind: Kind) -> &'static str {
    match kind {
        Kind::Pods => "pods",
        Kind::Namespaces => "namespaces",
    }
}

/// A list (or the next page of one) as the API server answers it: the body and its status.
fn list(
    s: &mut State,
    kind: Kind,
    node: Option<&str>,
    query: &BTreeMap<String, String>,
) -> (Bytes, u16) {
    let limit: Option<usize> = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0);
    let (snapshot_id, offset) = match query.get("continue").filter(|c| !c.is_empty()) {
        None => {
            s.requests.push(format!("LIST {}", what(kind)));
            let store = match kind {
                Kind::Pods => &s.pods,
                Kind::Namespaces => &s.namespaces,
            };
            let items: Vec<Stored> = store
                .values()
                .filter(|object| matches_node(node, kind, object))
                .cloned()
                .collect();
            s.next_snapshot += 1;
            let id = s.next_snapshot;
            s.snapshots.insert(
                id,
                Snapshot {
                    rv: s.rv,
                    items: Arc::new(items),
                },
            );
            while s.snapshots.len() > SNAPSHOTS_KEPT {
                s.snapshots.pop_first();
            }
            (id, 0)
        }
        Some(token) => {
            s.requests.push(format!("LIST {} continued", what(kind)));
            match parse_continue(token).filter(|(id, _)| s.snapshots.contains_key(id)) {
                Some(at) => at,
                None => {
                    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "reason": "Expired", "code": 410,
                        "message": "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter."});
                    return (Bytes::from(serde_json::to_vec(&status).expect("json")), 410);
                }
            }
        }
    };
    let snapshot = &s.snapshots[&snapshot_id];
    let (rv, items) = (snapshot.rv, snapshot.items.clone());
    let end = limit.map_or(items.len(), |limit| (offset + limit).min(items.len()));
    let page = &items[offset.min(end)..end];
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if end < items.len() {
        metadata["continue"] = json!(format!("{snapshot_id}-{end}"));
        metadata["remainingItemCount"] = json!(items.len() - end);
    } else {
        s.snapshots.remove(&snapshot_id);
    }
    let (api_version, list_kind) = match kind {
        Kind::Pods => ("v1", "PodList"),
        Kind::Namespaces => ("meta.k8s.io/v1", "PartialObjectMetadataList"),
    };
    let mut body = Vec::with_capacity(page.iter().map(|o| o.json.len() + 1).sum::<usize>() + 200);
    body.extend_from_slice(
        format!("{{\"apiVersion\":\"{api_version}\",\"kind\":\"{list_kind}\",\"metadata\":{metadata},\"items\":[")
            .as_bytes(),
    );
    for (i, object) in page.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&object.json);
    }
    body.extend_from_slice(b"]}");
    (Bytes::from(body), 200)
}

/// A watch: history after the asked-for version (or `410 Expired`), then changes as they come,
/// until `timeoutSeconds`.
fn watch(
    state: &Arc<Mutex<State>>,
    sent: &Arc<AtomicU64>,
    kind: Kind,
    node: Option<String>,
    query: &BTreeMap<String, String>,
) -> Response<Body> {
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0);
    let (sender, receiver) = mpsc::unbounded_channel();
    {
        let mut s = state.lock().expect("state");
        s.requests.push(format!("WATCH {} from {from}", what(kind)));
        if from < s.compacted_before {
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from} ({})", s.compacted_before),
                "reason": "Expired", "code": 410});
            let status = serde_json::to_vec(&status).expect("json");
            let _ = sender.send(Ok(Frame::data(event_line("ERROR", &status))));
            drop(sender);
        } else {
            for (rv, k, event, object) in &s.history {
                if *rv > from && *k == kind && matches_node(node.as_deref(), kind, object) {
                    let _ = sender.send(Ok(Frame::data(event_line(event, &object.json))));
                }
            }
            s.next_watch += 1;
            let id = s.next_watch;
            s.watches.push(Watch {
                id,
                kind,
                node,
                sender,
            });
            // As the API server does, end the watch cleanly after timeoutSeconds.
            if let Some(timeout) = query.get("timeoutSeconds").and_then(|t| t.parse().ok()) {
                let state = state.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_secs(timeout)).await;
                    state
                        .lock()
                        .expect("state")
                        .watches
                        .retain(|watch| watch.id != id);
                });
            }
        }
    }
    let sent = sent.clone();
    let stream = futures::stream::unfold(receiver, move |mut receiver| {
        let sent = sent.clone();
        async move {
            let frame = receiver.recv().await?;
            if let Ok(data) = frame.as_ref().map(|f| f.data_ref().map(Bytes::len)) {
                sent.fetch_add(data.unwrap_or(0) as u64, Ordering::Relaxed);
            }
            Some((frame, receiver))
        }
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("response")
}
