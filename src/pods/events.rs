//! Kubernetes Events on pods whose role is denied (reason `IamRoleForbidden`), so the people
//! who own the pod see why in `kubectl describe pod`. At most one per pod and role every
//! `INTERVAL`; a full queue drops events rather than slow a request.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The least time between two Events for the same pod and role.
pub const INTERVAL: Duration = Duration::from_secs(300);

/// A denial to report.
#[derive(Debug, Clone)]
pub struct Denied {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    pub role: String,
    pub reason: String,
}

/// The sending side, held by the broker.
pub type DenialSender = mpsc::Sender<Denied>;

/// Publishes denials from `denials` as Events until `cancel`. `instance` names this iamlet
/// (its node, or the server's pod) as the Events' reporting instance.
pub async fn run(
    client: kube::Client,
    instance: String,
    mut denials: mpsc::Receiver<Denied>,
    cancel: CancellationToken,
) {
    let reporter = Reporter {
        controller: "iamlet".to_owned(),
        instance: Some(instance),
    };
    let recorder = Recorder::new(client, reporter);
    let mut last: HashMap<(String, String), Instant> = HashMap::new();
    loop {
        let denied = tokio::select! {
            () = cancel.cancelled() => return,
            denied = denials.recv() => match denied {
                Some(denied) => denied,
                None => return,
            },
        };
        let key = (denied.uid.clone(), denied.role.clone());
        let now = Instant::now();
        if last
            .get(&key)
            .is_some_and(|at| now.duration_since(*at) < INTERVAL)
        {
            continue;
        }
        last.insert(key, now);
        last.retain(|_, at| now.duration_since(*at) < INTERVAL);
        let reference = ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            namespace: Some(denied.namespace.clone()),
            name: Some(denied.pod.clone()),
            uid: Some(denied.uid.clone()),
            ..ObjectReference::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "IamRoleForbidden".to_owned(),
            note: Some(truncate(
                &format!("role {} denied: {}", denied.role, denied.reason),
                1024,
            )),
            action: "AssumeRole".to_owned(),
            secondary: None,
        };
        if let Err(err) = recorder.publish(&event, &reference).await {
            tracing::warn!(pod = %format!("{}/{}", denied.namespace, denied.pod), error = %err, "cannot record a denial Event");
        }
    }
}

fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}
