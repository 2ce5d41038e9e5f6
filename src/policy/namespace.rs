//! A namespace's `iam.amazonaws.com/permitted` policy, compiled once per namespace change, and
//! the denials it gives.

use super::RoleArn;

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
    /// A kiam client asked for a role that is not the one the pod is annotated with.
    #[error("the pod asked for role {requested:?}, which is not the role it is annotated with")]
    NotItsRole { requested: String },
}

impl Denial {
    /// Every [`Denial::reason`], for metrics that must exist before the first denial.
    pub const REASONS: [&'static str; 6] = [
        "namespace_unannotated",
        "not_permitted",
        "invalid_pattern",
        "unknown_namespace",
        "server",
        "not_its_role",
    ];

    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::Unannotated { .. } => "namespace_unannotated",
            Denial::NotPermitted { .. } => "not_permitted",
            Denial::InvalidPattern { .. } => "invalid_pattern",
            Denial::UnknownNamespace { .. } => "unknown_namespace",
            Denial::ByServer => "server",
            Denial::NotItsRole { .. } => "not_its_role",
        }
    }
}

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

    /// Whether `self` and `other` decide alike: the same kind, from the same pattern.
    pub fn same_as(&self, other: &NamespacePolicy) -> bool {
        match (self, other) {
            (NamespacePolicy::Unannotated, NamespacePolicy::Unannotated)
            | (NamespacePolicy::Unrestricted, NamespacePolicy::Unrestricted) => true,
            (NamespacePolicy::Permits(a), NamespacePolicy::Permits(b)) => a.as_str() == b.as_str(),
            (
                NamespacePolicy::Invalid { pattern: a, .. },
                NamespacePolicy::Invalid { pattern: b, .. },
            ) => a == b,
            _ => false,
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

#[cfg(test)]
mod tests {
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
    fn a_pattern_cannot_break_out_of_its_anchors() {
        // Anchored naively as ^(?:a)|(?:.*)$, this would permit every role.
        let policy = NamespacePolicy::from_annotation(Some("a)|(?:.*"));
        assert!(matches!(policy, NamespacePolicy::Invalid { .. }));
        assert!(policy.decide("shop", &arn("admin"), false).is_err());
    }

    #[test]
    fn every_reason_is_listed() {
        let denials = [
            Denial::Unannotated {
                namespace: String::new(),
            },
            Denial::NotPermitted {
                namespace: String::new(),
                role: String::new(),
                pattern: String::new(),
            },
            Denial::InvalidPattern {
                namespace: String::new(),
                pattern: String::new(),
                error: String::new(),
            },
            Denial::UnknownNamespace {
                namespace: String::new(),
            },
            Denial::ByServer,
            Denial::NotItsRole {
                requested: String::new(),
            },
        ];
        let reasons: Vec<&str> = denials.iter().map(Denial::reason).collect();
        assert_eq!(reasons, Denial::REASONS);
    }

    #[test]
    fn denials_name_the_pattern_as_written() {
        let policy = NamespacePolicy::from_annotation(Some("arn:.*:role/a"));
        let denial = policy.decide("shop", &arn("b"), false).expect_err("denied");
        assert!(denial.to_string().contains("\"arn:.*:role/a\""), "{denial}");
    }
}
