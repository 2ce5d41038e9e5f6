//! What iamlet knows of a pod, and the annotations it reads, on pods and on namespaces. A leaf:
//! it depends on nothing else in the crate, so that the pod sources (`pods`) and the policy
//! (`policy`) can both use it without depending on each other.

/// The pod annotation naming the pod's role: a name, `path/name`, or a full ARN.
pub const ROLE_ANNOTATION: &str = "iam.amazonaws.com/role";
/// The pod annotation passed to AssumeRole as the external id.
pub const EXTERNAL_ID_ANNOTATION: &str = "iam.amazonaws.com/external-id";
/// The pod annotation that overrides the STS session name.
pub const SESSION_NAME_ANNOTATION: &str = "iam.amazonaws.com/session-name";
/// The namespace annotation: a regex over the role ARNs its pods may have.
pub const PERMITTED_ANNOTATION: &str = "iam.amazonaws.com/permitted";

/// What iamlet knows of a pod: enough to name it in logs and to decide its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub annotations: Annotations,
}

/// The pod annotations iamlet reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Annotations {
    /// [`ROLE_ANNOTATION`], as written.
    pub role: Option<String>,
    /// [`EXTERNAL_ID_ANNOTATION`]
    pub external_id: Option<String>,
    /// [`SESSION_NAME_ANNOTATION`]
    pub session_name: Option<String>,
}

impl Pod {
    /// `namespace/name` for logs; the name alone where the namespace is not known (in
    /// server-backed mode, a pod is known only by its IP).
    pub fn key(&self) -> String {
        if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }
}
