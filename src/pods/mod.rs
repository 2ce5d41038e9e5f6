//! Pod identity: which pod stands behind a source IP. This source is the static table
//! from the configuration (`[[pods.static]]`); the Kubernetes watch sits behind the same trait.

mod static_table;

pub use static_table::StaticPods;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The `[pods]` section.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub source: Source,
    /// The node whose pods are served; defaults to the `NODE_NAME` environment variable.
    pub node_name: String,
    /// The pod table used when `source = "static"`.
    #[serde(rename = "static")]
    pub static_pods: Vec<StaticPod>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    #[default]
    Kubernetes,
    Static,
}

/// One `[[pods.static]]` entry: a pod that iamlet serves without asking Kubernetes.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StaticPod {
    pub ip: IpAddr,
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_name: Option<String>,
}

fn default_service_account() -> String {
    "default".to_owned()
}

/// What iamlet knows of a pod: enough to name it in logs and to decide its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub annotations: Annotations,
}

/// The pod annotations iamlet reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Annotations {
    /// `iam.amazonaws.com/role`
    pub role: Option<String>,
    /// `iam.amazonaws.com/external-id`
    pub external_id: Option<String>,
    /// `iam.amazonaws.com/session-name`
    pub session_name: Option<String>,
}

impl Pod {
    /// `namespace/name`, for logs.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Finds the pod behind a source IP.
pub trait PodLookup: Send + Sync + 'static {
    /// The pod that owns `ip` now, if one does and may be served.
    fn lookup(&self, ip: IpAddr) -> impl Future<Output = Option<Arc<Pod>>> + Send;
    /// Whether the source has a complete picture yet (`/readyz`).
    fn ready(&self) -> bool;
}
