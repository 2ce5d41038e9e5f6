//! Policy: which IAM role a pod's annotation names, and the STS session name it gets.
//! Pure functions over plain data; no I/O.

use std::fmt;

use crate::pods::Pod;

/// A full IAM role ARN, e.g. `arn:aws:iam::123456789012:role/path/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoleArn(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("role {0:?} is not a role ARN (want arn:<partition>:iam::<account>:role/<name>)")]
    NotARoleArn(String),
    #[error("role {0:?} is empty or malformed")]
    BadRoleName(String),
    #[error(
        "base role ARN {0:?} is malformed (want arn:<partition>:iam::<account>:role/, with the trailing slash)"
    )]
    BadBaseArn(String),
    #[error("instance profile ARN {0:?} is malformed")]
    BadInstanceProfileArn(String),
}

impl RoleArn {
    /// Accepts a full role ARN.
    pub fn parse(arn: &str) -> Result<RoleArn, Error> {
        let bad = || Error::NotARoleArn(arn.to_owned());
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        let [prefix, partition, service, region, account, resource] = parts[..] else {
            return Err(bad());
        };
        let valid = prefix == "arn"
            && !partition.is_empty()
            && service == "iam"
            && region.is_empty()
            && !account.is_empty()
            && account.bytes().all(|b| b.is_ascii_digit())
            && resource.strip_prefix("role/").is_some_and(valid_role_path);
        if valid {
            Ok(RoleArn(arn.to_owned()))
        } else {
            Err(bad())
        }
    }

    /// Resolves a pod's role annotation: a full ARN is kept; `name`, `path/name` and
    /// `/path/name` are joined to `base` (`arn:aws:iam::123456789012:role/`).
    pub fn resolve(annotation: &str, base: &BaseRoleArn) -> Result<RoleArn, Error> {
        let annotation = annotation.trim();
        if annotation.starts_with("arn:") {
            return RoleArn::parse(annotation);
        }
        let relative = annotation.trim_start_matches('/');
        if !valid_role_path(relative) {
            return Err(Error::BadRoleName(annotation.to_owned()));
        }
        RoleArn::parse(&format!("{}{relative}", base.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The role's name: what IMDS lists under `iam/security-credentials/`, without its path.
    pub fn name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or_default()
    }

    /// The matching instance profile ARN, as IMDS `iam/info` reports it.
    pub fn instance_profile_arn(&self) -> String {
        self.0.replacen(":role/", ":instance-profile/", 1)
    }
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Role path and name: segments of IAM's allowed characters, no empty segment.
fn valid_role_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 512
        && path.split('/').all(|segment| {
            !segment.is_empty()
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
        })
}

/// The prefix that relative role names are joined to: `arn:<partition>:iam::<account>:role/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseRoleArn(String);

impl BaseRoleArn {
    pub fn parse(base: &str) -> Result<BaseRoleArn, Error> {
        let bad = || Error::BadBaseArn(base.to_owned());
        let name = base.strip_suffix('/').ok_or_else(bad)?;
        // A base is a role ARN whose name is still to come: check it as one with a stand-in name.
        RoleArn::parse(&format!("{name}/x")).map_err(|_| bad())?;
        Ok(BaseRoleArn(base.to_owned()))
    }

    /// Derives the base from the node's instance profile ARN (IMDS `iam/info`):
    /// `arn:aws:iam::123456789012:instance-profile/x` → `arn:aws:iam::123456789012:role/`.
    pub fn from_instance_profile(arn: &str) -> Result<BaseRoleArn, Error> {
        let bad = || Error::BadInstanceProfileArn(arn.to_owned());
        let (account_part, _) = arn.split_once(":instance-profile/").ok_or_else(bad)?;
        BaseRoleArn::parse(&format!("{account_part}:role/")).map_err(|_| bad())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An STS role session name: 2 to 64 characters of `[\w+=,.@-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionName(String);

impl SessionName {
    const MAX: usize = 64;

    /// Makes any text a valid session name: disallowed characters become `-`, the result is
    /// cut to 64 characters, and one shorter than 2 is padded with `-`.
    pub fn sanitize(raw: &str) -> SessionName {
        let mut name: String = raw
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .take(Self::MAX)
            .collect();
        while name.len() < 2 {
            name.push('-');
        }
        SessionName(name)
    }

    /// The session name for `pod`: its `session-name` annotation if set, else `template` with
    /// `{namespace}`, `{service_account}` and `{pod}` filled in.
    pub fn for_pod(template: &str, pod: &Pod) -> SessionName {
        if let Some(name) = pod.annotations.session_name.as_deref() {
            return SessionName::sanitize(name);
        }
        let filled = template
            .replace("{namespace}", &pod.namespace)
            .replace("{service_account}", &pod.service_account)
            .replace("{pod}", &pod.name);
        SessionName::sanitize(&filled)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A namespace's `iam.amazonaws.com/permitted` annotation: a regex anchored as `^(…)$` and
/// matched against the full role ARN (kiam's rule).
#[derive(Debug, Clone)]
pub enum NamespacePolicy {
    /// No annotation: nothing is permitted unless configured otherwise.
    Unannotated,
    Permits(regex::Regex),
    /// The annotation is not a valid regex: everything is denied.
    Invalid {
        pattern: String,
        error: String,
    },
    /// Sources without namespaces (the static table): the operator's table is the policy.
    Unrestricted,
}

/// Why a role was refused for a pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("namespace {namespace} has no iam.amazonaws.com/permitted annotation")]
    Unannotated { namespace: String },
    #[error("role {role} is not permitted by namespace {namespace} (permitted: {pattern:?})")]
    NotPermitted {
        namespace: String,
        role: String,
        pattern: String,
    },
    #[error(
        "namespace {namespace}'s permitted annotation {pattern:?} is not a valid regex: {error}"
    )]
    InvalidPattern {
        namespace: String,
        pattern: String,
        error: String,
    },
    #[error("namespace {namespace} is not known (yet)")]
    UnknownNamespace { namespace: String },
    #[error("the kiam server's policy forbids it")]
    ByServer,
}

impl Denial {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::Unannotated { .. } => "namespace_unannotated",
            Denial::NotPermitted { .. } => "not_permitted",
            Denial::InvalidPattern { .. } => "invalid_pattern",
            Denial::UnknownNamespace { .. } => "unknown_namespace",
            Denial::ByServer => "server",
        }
    }
}

/// The annotation that holds a namespace's policy.
pub const PERMITTED_ANNOTATION: &str = "iam.amazonaws.com/permitted";

impl NamespacePolicy {
    pub fn from_annotation(annotation: Option<&str>) -> NamespacePolicy {
        match annotation {
            None => NamespacePolicy::Unannotated,
            // The pattern must be a regex on its own before it is anchored: `a)|(?:.*` would
            // otherwise close the anchoring group and permit every role.
            Some(pattern) => match regex::Regex::new(pattern)
                .and_then(|_| regex::Regex::new(&format!("^(?:{pattern})$")))
            {
                Ok(regex) => NamespacePolicy::Permits(regex),
                Err(err) => NamespacePolicy::Invalid {
                    pattern: pattern.to_owned(),
                    error: err.to_string(),
                },
            },
        }
    }

    /// Whether pods in `namespace` may have `role`. `allow_unannotated` relaxes kiam's rule
    /// that a namespace without the annotation permits nothing.
    pub fn decide(
        &self,
        namespace: &str,
        role: &RoleArn,
        allow_unannotated: bool,
    ) -> Result<(), Denial> {
        match self {
            NamespacePolicy::Unrestricted => Ok(()),
            NamespacePolicy::Unannotated if allow_unannotated => Ok(()),
            NamespacePolicy::Unannotated => Err(Denial::Unannotated {
                namespace: namespace.to_owned(),
            }),
            NamespacePolicy::Permits(regex) if regex.is_match(role.as_str()) => Ok(()),
            NamespacePolicy::Permits(regex) => Err(Denial::NotPermitted {
                namespace: namespace.to_owned(),
                role: role.to_string(),
                pattern: unanchored(regex.as_str()).to_owned(),
            }),
            NamespacePolicy::Invalid { pattern, error } => Err(Denial::InvalidPattern {
                namespace: namespace.to_owned(),
                pattern: pattern.clone(),
                error: error.clone(),
            }),
        }
    }
}

fn unanchored(anchored: &str) -> &str {
    anchored
        .strip_prefix("^(?:")
        .and_then(|rest| rest.strip_suffix(")$"))
        .unwrap_or(anchored)
}

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

/// The placeholders a session name template may use.
pub const SESSION_NAME_PLACEHOLDERS: &[&str] = &["{namespace}", "{service_account}", "{pod}"];

/// Checks a session name template: every `{…}` must be a known placeholder.
pub fn check_session_template(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in {template:?}"))?;
        let placeholder = &rest[open..open + close + 1];
        if !SESSION_NAME_PLACEHOLDERS.contains(&placeholder) {
            return Err(format!(
                "unknown placeholder {placeholder} (known: {})",
                SESSION_NAME_PLACEHOLDERS.join(", ")
            ));
        }
        rest = &rest[open + close + 1..];
    }
    if template.trim().is_empty() {
        return Err("the template is empty".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::{Annotations, Pod};

    fn base() -> BaseRoleArn {
        BaseRoleArn::parse("arn:aws:iam::123456789012:role/").expect("valid base")
    }

    #[test]
    fn relative_names_join_the_base() {
        for (annotation, want) in [
            ("web", "arn:aws:iam::123456789012:role/web"),
            ("team/web", "arn:aws:iam::123456789012:role/team/web"),
            ("/team/web", "arn:aws:iam::123456789012:role/team/web"),
        ] {
            let arn = RoleArn::resolve(annotation, &base()).expect("resolves");
            assert_eq!(arn.as_str(), want, "{annotation}");
            assert_eq!(arn.name(), "web");
        }
    }

    #[test]
    fn full_arns_are_kept_even_across_accounts() {
        let arn =
            RoleArn::resolve("arn:aws-cn:iam::999999999999:role/x/y", &base()).expect("resolves");
        assert_eq!(arn.as_str(), "arn:aws-cn:iam::999999999999:role/x/y");
        assert_eq!(arn.name(), "y");
    }

    #[test]
    fn malformed_roles_are_refused() {
        for bad in [
            "",
            "/",
            "a//b",
            "a b",
            "web/",
            "arn:aws:s3:::bucket",
            "arn:aws:iam::12x:role/a",
        ] {
            assert!(
                RoleArn::resolve(bad, &base()).is_err(),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn base_is_derived_from_the_instance_profile() {
        let base = BaseRoleArn::from_instance_profile(
            "arn:aws:iam::123456789012:instance-profile/nodes/eks-node",
        )
        .expect("derives");
        assert_eq!(base.as_str(), "arn:aws:iam::123456789012:role/");
        assert!(BaseRoleArn::from_instance_profile("garbage").is_err());
        assert!(BaseRoleArn::parse("arn:aws:iam::123456789012:role").is_err());
    }

    #[test]
    fn instance_profile_arn_mirrors_the_role() {
        let arn = RoleArn::parse("arn:aws:iam::123456789012:role/a/b").expect("valid");
        assert_eq!(
            arn.instance_profile_arn(),
            "arn:aws:iam::123456789012:instance-profile/a/b"
        );
    }

    #[test]
    fn session_names_follow_sts_rules() {
        assert_eq!(SessionName::sanitize("ns.sa").as_str(), "ns.sa");
        assert_eq!(SessionName::sanitize("a b/c:d").as_str(), "a-b-c-d");
        assert_eq!(SessionName::sanitize("").as_str(), "--");
        assert_eq!(SessionName::sanitize("x").as_str(), "x-");
        assert_eq!(SessionName::sanitize(&"n".repeat(100)).as_str().len(), 64);
        assert_eq!(SessionName::sanitize("é").as_str(), "--");
    }

    fn pod(session_name: Option<&str>) -> Pod {
        Pod {
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: "uid-1".into(),
            service_account: "web".into(),
            annotations: Annotations {
                role: Some("web".into()),
                external_id: None,
                session_name: session_name.map(str::to_owned),
            },
        }
    }

    #[test]
    fn session_name_template_and_override() {
        let template = "{namespace}.{service_account}";
        assert_eq!(
            SessionName::for_pod(template, &pod(None)).as_str(),
            "shop.web"
        );
        assert_eq!(
            SessionName::for_pod("{pod}@{namespace}", &pod(None)).as_str(),
            "web-0@shop"
        );
        assert_eq!(
            SessionName::for_pod(template, &pod(Some("batch job"))).as_str(),
            "batch-job"
        );
    }

    #[test]
    fn templates_with_unknown_placeholders_are_refused() {
        assert!(check_session_template("{namespace}.{service_account}.{pod}").is_ok());
        assert!(check_session_template("{node}").is_err());
        assert!(check_session_template("{namespace").is_err());
        assert!(check_session_template(" ").is_err());
    }
}

#[cfg(test)]
mod namespace_tests {
    use super::*;

    fn arn(name: &str) -> RoleArn {
        RoleArn::parse(&format!("arn:aws:iam::123456789012:role/{name}")).expect("valid")
    }

    #[test]
    fn the_pattern_is_anchored_to_the_whole_arn() {
        let policy =
            NamespacePolicy::from_annotation(Some("arn:aws:iam::123456789012:role/shop-.*"));
        assert!(policy.decide("shop", &arn("shop-web"), false).is_ok());
        assert!(policy.decide("shop", &arn("admin"), false).is_err());
        // A pattern that would match a substring does not match the whole ARN.
        let loose = NamespacePolicy::from_annotation(Some("shop-web"));
        assert!(matches!(
            loose.decide("shop", &arn("shop-web"), false),
            Err(Denial::NotPermitted { .. })
        ));
        // Alternation stays inside the anchors: `a|b` is ^(?:a|b)$, not ^a|b$.
        let either = NamespacePolicy::from_annotation(Some(".*/x|.*/y"));
        assert!(either.decide("shop", &arn("x"), false).is_ok());
        assert!(either.decide("shop", &arn("y-admin"), false).is_err());
    }

    #[test]
    fn no_annotation_permits_nothing_unless_relaxed() {
        let policy = NamespacePolicy::from_annotation(None);
        assert!(matches!(
            policy.decide("shop", &arn("web"), false),
            Err(Denial::Unannotated { .. })
        ));
        assert!(policy.decide("shop", &arn("web"), true).is_ok());
    }

    #[test]
    fn an_invalid_pattern_denies_without_panicking() {
        let policy = NamespacePolicy::from_annotation(Some("(unclosed"));
        let denial = policy
            .decide("shop", &arn("web"), true)
            .expect_err("denied");
        assert_eq!(denial.reason(), "invalid_pattern");
        assert!(denial.to_string().contains("(unclosed"));
    }

    #[test]
    fn denials_name_the_pattern_as_written() {
        let policy = NamespacePolicy::from_annotation(Some("arn:.*:role/a"));
        let denial = policy.decide("shop", &arn("b"), false).expect_err("denied");
        assert!(denial.to_string().contains("\"arn:.*:role/a\""), "{denial}");
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;
    use crate::pods::{Annotations, Pod};

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
