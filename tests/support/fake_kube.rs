//! A scripted fake of the Kubernetes API server's list/watch protocol, for what a real server
//! cannot be made to do on demand: compacting history (watches from an old resourceVersion get
//! a `410 Expired` ERROR event and must relist), cutting watch streams mid-flight, sending
//! bookmarks, and holding a list back. It keeps the protocol honest: every change gets the
//! next resourceVersion, lists carry the current one, watches replay what came after the
//! version they ask for, and the `spec.nodeName` field selector filters pods.
//! The real kube-rs client in iamlet talks to it unmodified, over plain HTTP.

use std::collections::BTreeMap;
use std::net::SocketAddr;
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

struct Watch {
    id: u64,
    kind: Kind,
    node: Option<String>,
    sender: mpsc::UnboundedSender<Result<Frame<Bytes>, std::io::Error>>,
}

#[derive(Default)]
struct State {
    rv: u64,
    compacted_before: u64,
    pods: BTreeMap<String, Value>,
    namespaces: BTreeMap<String, Value>,
    history: Vec<(u64, Kind, &'static str, Value)>,
    watches: Vec<Watch>,
    requests: Vec<String>,
    hold_namespace_list: bool,
    /// While set, every request is answered 503, as an API server that is down behind its
    /// load balancer.
    unreachable: bool,
    next_watch: u64,
}

#[derive(Clone)]
pub struct FakeKube {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
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
        if event == "DELETED" {
            store.remove(&id);
        } else {
            store.insert(id, object.clone());
        }
        self.history.push((self.rv, kind, event, object.clone()));
        let line = event_line(event, &object);
        self.watches.retain(|watch| {
            if watch.kind != kind || !matches_node(watch.node.as_deref(), kind, &object) {
                return !watch.sender.is_closed();
            }
            watch.sender.send(Ok(Frame::data(line.clone()))).is_ok()
        });
    }
}

fn matches_node(node: Option<&str>, kind: Kind, object: &Value) -> bool {
    kind != Kind::Pods || node.is_none() || pod_node(object) == node
}

fn event_line(event: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": event, "object": object})).expect("json");
    line.push(b'\n');
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
        let served = state.clone();
        let addr = super::server::spawn(([127, 0, 0, 1], 0).into(), move |request| {
            let state = served.clone();
            async move { handle(&state, request).await }
        });
        FakeKube { addr, state }
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
            if let Some(pod) = s.pods.get(uid).cloned() {
                s.record(Kind::Pods, "DELETED", pod);
            }
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

    /// Forgets history: watches resuming from before now get `410 Expired`.
    pub fn compact(&self) {
        self.with(|s| {
            s.compacted_before = s.rv + 1;
            s.history.clear();
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

    /// Requests seen, as "LIST pods" / "WATCH pods from 7".
    pub fn requests(&self) -> Vec<String> {
        self.with(|s| s.requests.clone())
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
    let body = Full::new(Bytes::from(serde_json::to_vec(value).expect("json")))
        .map_err(|never| match never {})
        .boxed();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(body)
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

async fn handle(
    state: &Arc<Mutex<State>>,
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
    let what = if kind == Kind::Pods {
        "pods"
    } else {
        "namespaces"
    };
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|rv| rv.parse().ok())
            .unwrap_or(0);
        let (sender, receiver) = mpsc::unbounded_channel();
        {
            let mut s = state.lock().expect("state");
            s.requests.push(format!("WATCH {what} from {from}"));
            if from < s.compacted_before {
                let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {from} ({})", s.compacted_before),
                    "reason": "Expired", "code": 410});
                let _ = sender.send(Ok(Frame::data(event_line("ERROR", &status))));
                drop(sender);
            } else {
                for (rv, k, event, object) in &s.history {
                    if *rv > from && *k == kind && matches_node(node.as_deref(), kind, object) {
                        let _ = sender.send(Ok(Frame::data(event_line(event, object))));
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
        let stream = futures::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|frame| (frame, receiver))
        });
        return Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .expect("response");
    }
    // A list.
    let mut noted_hold = false;
    loop {
        let held = {
            let mut s = state.lock().expect("state");
            let held = kind == Kind::Namespaces && s.hold_namespace_list;
            if held && !noted_hold {
                // So a test can see the list was asked for and is being held.
                s.requests.push(format!("HELD LIST {what}"));
                noted_hold = true;
            }
            if !held {
                s.requests.push(format!("LIST {what}"));
                let items: Vec<Value> = match kind {
                    Kind::Pods => s
                        .pods
                        .values()
                        .filter(|p| matches_node(node.as_deref(), kind, p))
                        .cloned()
                        .collect(),
                    Kind::Namespaces => s.namespaces.values().cloned().collect(),
                };
                let (api_version, list_kind) = match kind {
                    Kind::Pods => ("v1", "PodList"),
                    Kind::Namespaces => ("meta.k8s.io/v1", "PartialObjectMetadataList"),
                };
                return full(
                    200,
                    &json!({"apiVersion": api_version, "kind": list_kind,
                    "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
                );
            }
            held
        };
        if held {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
