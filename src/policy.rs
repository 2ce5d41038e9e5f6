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
