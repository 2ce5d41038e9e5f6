//! Role ARNs: parsing, and resolving a pod's role annotation (a name, `path/name` or a full ARN)
//! against the base that relative names join.

use std::fmt;
use std::sync::Arc;

/// A full IAM role ARN, e.g. `arn:aws:iam::123456789012:role/path/name`. The text is shared:
/// a role ARN goes into every answer for a pod, and copying it costs a count, not a copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoleArn(Arc<str>);

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
            Ok(RoleArn(arn.into()))
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

    /// The name of the role an annotation names, without resolving it to an ARN (a node in
    /// server-backed mode need not know the account): the last segment of a full ARN, a
    /// `path/name` or a `name`.
    pub fn name_in(annotation: &str) -> Result<&str, Error> {
        let annotation = annotation.trim();
        if annotation.starts_with("arn:") {
            RoleArn::parse(annotation)?;
        } else if !valid_role_path(annotation.trim_start_matches('/')) {
            return Err(Error::BadRoleName(annotation.to_owned()));
        }
        Ok(annotation.rsplit('/').next().unwrap_or_default())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The role's name: what IMDS lists under `iam/security-credentials/`, without its path.
    pub fn name(&self) -> &str {
        // Asked on every request for a pod: a byte search, not a string pattern.
        let at = self
            .0
            .bytes()
            .rposition(|b| b == b'/')
            .map_or(0, |slash| slash + 1);
        &self.0[at..]
    }

    /// The account the role is in (what container-credential answers call `AccountId`).
    pub fn account(&self) -> &str {
        // Checked by `parse`: arn:<partition>:iam::<account>:role/…
        self.0.split(':').nth(4).unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use super::*;
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
        assert_eq!(arn.account(), "999999999999");
    }

    #[test]
    fn names_are_found_without_a_base() {
        for (annotation, want) in [
            ("web", "web"),
            ("team/web", "web"),
            ("/team/web", "web"),
            ("arn:aws:iam::123456789012:role/team/web", "web"),
        ] {
            assert_eq!(RoleArn::name_in(annotation), Ok(want), "{annotation}");
        }
        for bad in ["", "a//b", "a b", "web/", "arn:aws:s3:::bucket"] {
            assert!(RoleArn::name_in(bad).is_err(), "{bad:?} was accepted");
        }
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
}
