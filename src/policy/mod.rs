//! Policy: which IAM role a pod may have, and what STS is asked in its name. Pure functions over
//! plain data; no I/O.
//!
//! - `arn`: role ARNs, and resolving a pod's annotation against the base ARN;
//! - `namespace`: a namespace's `permitted` regex and the denials it gives;
//! - `session`: the STS session name template;
//! - here: [`Policy`], which puts them together for one pod.

mod arn;
mod namespace;
mod session;

pub use arn::{BaseRoleArn, Error, RoleArn};
pub use namespace::{Denial, NamespacePolicy};
pub use session::{SESSION_NAME_PLACEHOLDERS, SessionName, check_session_template};

use crate::pod::Pod;

/// The `[policy]` section.
#[derive(Debug, Clone, PartialEq, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Role for pods without an `iam.amazonaws.com/role` annotation; empty = none.
    pub default_role: String,
    /// Let namespaces without `iam.amazonaws.com/permitted` permit every role (kiam permits
    /// nothing there; so does iamlet by default).
    pub allow_unannotated_namespaces: bool,
}

/// Everything that decides a pod's role, from the configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    pub base_role_arn: BaseRoleArn,
    pub default_role: Option<String>,
    pub allow_unannotated_namespaces: bool,
    pub session_name_template: String,
    /// Tag sessions with the pod's namespace and service account (and name, when the session
    /// name template already splits sessions per pod).
    pub session_tags: bool,
}

/// Why a pod has no usable role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NoRole,
    BadRole(Error),
    Denied(RoleArn, Denial),
}

impl Policy {
    /// The role `pod` may have, given its namespace's policy (`None`: namespace unknown).
    pub fn role_for(
        &self,
        pod: &Pod,
        namespace: Option<&NamespacePolicy>,
    ) -> Result<RoleArn, Refusal> {
        let annotation = pod
            .annotations
            .role
            .as_deref()
            .or(self.default_role.as_deref())
            .ok_or(Refusal::NoRole)?;
        let role = RoleArn::resolve(annotation, &self.base_role_arn).map_err(Refusal::BadRole)?;
        let decision = match namespace {
            Some(policy) => policy.decide(&pod.namespace, &role, self.allow_unannotated_namespaces),
            None => Err(Denial::UnknownNamespace {
                namespace: pod.namespace.clone(),
            }),
        };
        match decision {
            Ok(()) => Ok(role),
            Err(denial) => Err(Refusal::Denied(role, denial)),
        }
    }

    /// The STS session name for `pod`.
    pub fn session_name(&self, pod: &Pod) -> SessionName {
        SessionName::for_pod(&self.session_name_template, pod)
    }

    /// The session tags for `pod`, sorted by key; none unless `session_tags` is on. The pod
    /// name is a tag only when the session name template has `{pod}`: otherwise it would split
    /// the one session that a workload's replicas share.
    pub fn session_tags(&self, pod: &Pod) -> Vec<(String, String)> {
        if !self.session_tags {
            return Vec::new();
        }
        let mut tags = vec![
            ("kubernetes-namespace".to_owned(), pod.namespace.clone()),
            (
                "kubernetes-service-account".to_owned(),
                pod.service_account.clone(),
            ),
        ];
        if self.session_name_template.contains("{pod}") {
            tags.push(("kubernetes-pod-name".to_owned(), pod.name.clone()));
        }
        tags.sort();
        tags
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::{Annotations, Pod};

    fn policy(default_role: Option<&str>) -> Policy {
        Policy {
            base_role_arn: BaseRoleArn::parse("arn:aws:iam::123456789012:role/").expect("base"),
            default_role: default_role.map(str::to_owned),
            allow_unannotated_namespaces: false,
            session_name_template: "{namespace}.{service_account}".into(),
            session_tags: false,
        }
    }

    #[test]
    fn session_tags_name_the_pod_only_when_sessions_are_per_pod() {
        let mut policy = policy(None);
        assert!(policy.session_tags(&pod(None)).is_empty(), "off by default");
        policy.session_tags = true;
        let keys: Vec<String> = policy
            .session_tags(&pod(None))
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["kubernetes-namespace", "kubernetes-service-account"]);
        policy.session_name_template = "{pod}".into();
        let tags = policy.session_tags(&pod(None));
        assert!(tags.contains(&("kubernetes-pod-name".to_owned(), "web-0".to_owned())));
    }

    fn pod(role: Option<&str>) -> Pod {
        Pod {
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: "u".into(),
            service_account: "web".into(),
            annotations: Annotations {
                role: role.map(str::to_owned),
                ..Annotations::default()
            },
        }
    }

    #[test]
    fn annotation_then_default_then_nothing() {
        let open = NamespacePolicy::from_annotation(Some(".*"));
        let role = policy(None)
            .role_for(&pod(Some("web")), Some(&open))
            .expect("role");
        assert_eq!(role.name(), "web");
        assert_eq!(
            policy(None).role_for(&pod(None), Some(&open)),
            Err(Refusal::NoRole)
        );
        let role = policy(Some("basic"))
            .role_for(&pod(None), Some(&open))
            .expect("default role");
        assert_eq!(role.name(), "basic");
    }

    #[test]
    fn the_default_role_obeys_the_namespace_too() {
        let strict = NamespacePolicy::from_annotation(Some(".*/web"));
        let refusal = policy(Some("basic")).role_for(&pod(None), Some(&strict));
        assert!(matches!(
            refusal,
            Err(Refusal::Denied(_, Denial::NotPermitted { .. }))
        ));
    }

    #[test]
    fn an_unknown_namespace_denies() {
        let refusal = policy(None).role_for(&pod(Some("web")), None);
        assert!(matches!(
            refusal,
            Err(Refusal::Denied(_, Denial::UnknownNamespace { .. }))
        ));
    }

    #[test]
    fn a_malformed_annotation_is_a_bad_role() {
        let open = NamespacePolicy::from_annotation(Some(".*"));
        let refusal = policy(None).role_for(&pod(Some("a b")), Some(&open));
        assert!(matches!(refusal, Err(Refusal::BadRole(_))));
    }
}
