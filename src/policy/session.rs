//! STS session names: the template, its placeholders, and STS's rules for the result.

use crate::pod::Pod;

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
    use crate::pod::{Annotations, Pod};
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
