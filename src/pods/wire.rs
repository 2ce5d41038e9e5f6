//! What iamlet reads of a pod off the wire. The API server sends whole pods, 4 to 10 KB of JSON
//! each (managed fields, containers, volumes, conditions, statuses); iamlet needs a handful of
//! fields. [`WirePod`] is a pod resource for kube-rs whose deserializer keeps those fields and
//! skips the rest as it parses, without allocating for it.
//!
//! Parsing into k8s-openapi's full `Pod` allocated about 15 KB per pod only to drop it, and the
//! few strings kept were left scattered through the freed memory, which the allocator then
//! could not give back: an agent with 250 pods held 8 MB more than an idle one, a server
//! another ~500 B per pod in the cluster.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::pod::{EXTERNAL_ID_ANNOTATION, ROLE_ANNOTATION, SESSION_NAME_ANNOTATION};

/// A pod as the index needs it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WirePod {
    /// Name, namespace, uid, resourceVersion (the watcher resumes from it), and iamlet's own
    /// annotations; nothing else.
    pub metadata: ObjectMeta,
    pub service_account: Option<String>,
    pub host_network: bool,
    /// `status.phase`.
    pub phase: Option<String>,
    /// `status.podIP`, else the first of `status.podIPs`.
    pub ip: Option<String>,
}

impl kube::Resource for WirePod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Wire {
    metadata: WireMeta,
    spec: Option<WireSpec>,
    status: Option<WireStatus>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct WireMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    #[serde(deserialize_with = "own_annotations")]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct WireSpec {
    service_account_name: Option<String>,
    host_network: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct WireStatus {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<WireIp>>,
}

#[derive(Deserialize)]
struct WireIp {
    ip: String,
}

impl<'de> Deserialize<'de> for WirePod {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = Wire::deserialize(deserializer)?;
        let spec = wire.spec.unwrap_or_default();
        let status = wire.status.unwrap_or_default();
        let ip = status.pod_ip.filter(|ip| !ip.is_empty()).or_else(|| {
            status
                .pod_ips
                .and_then(|ips| ips.into_iter().next())
                .map(|first| first.ip)
        });
        Ok(WirePod {
            metadata: ObjectMeta {
                name: wire.metadata.name,
                namespace: wire.metadata.namespace,
                uid: wire.metadata.uid,
                resource_version: wire.metadata.resource_version,
                annotations: wire.metadata.annotations,
                ..ObjectMeta::default()
            },
            service_account: spec.service_account_name,
            host_network: spec.host_network.unwrap_or(false),
            phase: status.phase,
            ip,
        })
    }
}

/// The annotations iamlet reads; the others (`kubectl.kubernetes.io/last-applied-configuration`
/// alone can be kilobytes) are skipped unread.
fn own_annotations<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Own;

    impl<'de> Visitor<'de> for Own {
        type Value = Option<BTreeMap<String, String>>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map of annotations")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_map(Own)
        }

        fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
            let mut own = BTreeMap::new();
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if [
                    ROLE_ANNOTATION,
                    EXTERNAL_ID_ANNOTATION,
                    SESSION_NAME_ANNOTATION,
                ]
                .contains(&key.as_ref())
                {
                    own.insert(key.into_owned(), map.next_value::<String>()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(Some(own))
        }
    }

    deserializer.deserialize_option(Own)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_index_needs_and_nothing_else() {
        let json = r#"{"apiVersion":"v1","kind":"Pod",
            "metadata":{"name":"web-0","namespace":"shop","uid":"u-1","resourceVersion":"42",
              "labels":{"app":"web"},
              "annotations":{"iam.amazonaws.com/role":"web","kubectl.kubernetes.io/last-applied-configuration":"{\"a\":1}",
                "iam.amazonaws.com/external-id":"x-1","iam.amazonaws.com/session-name":"s"},
              "managedFields":[{"manager":"kubelet","fieldsV1":{"f:status":{}}}]},
            "spec":{"serviceAccountName":"web","hostNetwork":false,"containers":[{"name":"app","image":"app"}]},
            "status":{"phase":"Running","podIP":"10.1.2.3","podIPs":[{"ip":"10.1.2.3"}],"conditions":[]}}"#;
        let pod: WirePod = serde_json::from_str(json).expect("pod");
        assert_eq!(pod.metadata.name.as_deref(), Some("web-0"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(pod.metadata.uid.as_deref(), Some("u-1"));
        assert_eq!(pod.metadata.resource_version.as_deref(), Some("42"));
        let annotations = pod.metadata.annotations.expect("annotations");
        assert_eq!(
            annotations.keys().collect::<Vec<_>>(),
            [
                EXTERNAL_ID_ANNOTATION,
                ROLE_ANNOTATION,
                SESSION_NAME_ANNOTATION
            ]
        );
        assert!(pod.metadata.labels.is_none() && pod.metadata.managed_fields.is_none());
        assert_eq!(pod.service_account.as_deref(), Some("web"));
        assert!(!pod.host_network);
        assert_eq!(pod.phase.as_deref(), Some("Running"));
        assert_eq!(pod.ip.as_deref(), Some("10.1.2.3"));
    }

    #[test]
    fn a_pending_pod_has_no_ip_and_nulls_are_absent() {
        let json = r#"{"metadata":{"name":"web-1","namespace":"shop","uid":"u-2","annotations":null},
            "spec":{"hostNetwork":true},"status":{"phase":"Pending","podIP":null}}"#;
        let pod: WirePod = serde_json::from_str(json).expect("pod");
        assert_eq!(pod.ip, None);
        assert_eq!(pod.metadata.annotations, None);
        assert!(pod.host_network);
        let bare: WirePod = serde_json::from_str(r#"{"metadata":{"name":"x"}}"#).expect("pod");
        assert_eq!(bare.phase, None);
    }

    #[test]
    fn the_first_of_pod_ips_when_pod_ip_is_missing() {
        let json = r#"{"metadata":{"name":"v6"},"status":{"podIPs":[{"ip":"fd00::5"},{"ip":"10.0.0.5"}]}}"#;
        let pod: WirePod = serde_json::from_str(json).expect("pod");
        assert_eq!(pod.ip.as_deref(), Some("fd00::5"));
    }
}
