//! The JSON documents IMDS answers with, in the exact shape real SDKs parse.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use serde::Serialize;
use time::OffsetDateTime;
use time::macros::format_description;

use crate::credentials::Credentials;
use crate::policy::RoleArn;

/// IMDS times: UTC, whole seconds, `Z` (botocore mis-parses fractional seconds).
pub fn timestamp(time: SystemTime) -> String {
    let format = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    OffsetDateTime::from(time)
        .format(&format)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialDocument<'a> {
    code: &'static str,
    last_updated: String,
    #[serde(rename = "Type")]
    kind: &'static str,
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    expiration: String,
}

/// `…/iam/security-credentials/<role>` on success.
pub fn credentials(credentials: &Credentials) -> String {
    to_json(&CredentialDocument {
        code: "Success",
        last_updated: timestamp(credentials.last_updated),
        kind: "AWS-HMAC",
        access_key_id: &credentials.access_key_id,
        secret_access_key: &credentials.secret_access_key,
        token: &credentials.session_token,
        expiration: timestamp(credentials.expiration),
    })
}

/// Credential documents, each encoded once for the credentials it shows (a refresh brings new
/// ones) rather than on every request. A small table keyed by the credentials' identity: each
/// slot keeps the credentials it was encoded from, so that a slot can never answer for other
/// credentials, and a new encoding replaces whatever shared its slot.
pub struct Documents {
    slots: Box<[ArcSwapOption<Encoded>]>,
}

struct Encoded {
    credentials: Arc<Credentials>,
    body: Bytes,
}

/// Slots in [`Documents`]: far more than the identities one node serves at once.
const DOCUMENT_SLOTS: usize = 256;

impl Default for Documents {
    fn default() -> Self {
        Documents {
            slots: (0..DOCUMENT_SLOTS)
                .map(|_| ArcSwapOption::empty())
                .collect(),
        }
    }
}

impl Documents {
    /// The document for `credentials` ([`credentials`]), encoded on first use.
    pub fn credentials(&self, credentials: &Arc<Credentials>) -> Bytes {
        // Fibonacci hashing of the address: allocations are aligned, so the low bits say little.
        let address = Arc::as_ptr(credentials) as usize as u64;
        let slot = (address.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as usize % DOCUMENT_SLOTS;
        let slot = &self.slots[slot];
        if let Some(encoded) = &*slot.load()
            && Arc::ptr_eq(&encoded.credentials, credentials)
        {
            return encoded.body.clone();
        }
        let body = Bytes::from(self::credentials(credentials));
        slot.store(Some(Arc::new(Encoded {
            credentials: credentials.clone(),
            body: body.clone(),
        })));
        body
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct FailureDocument<'a> {
    code: &'static str,
    message: &'a str,
    last_updated: String,
}

/// What EC2 answers when the role cannot be assumed: 200, with a code SDKs recognise.
pub fn unauthorized(message: &str, now: SystemTime) -> String {
    to_json(&FailureDocument {
        code: "AssumeRoleUnauthorizedAccess",
        message,
        last_updated: timestamp(now),
    })
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct InfoDocument {
    code: &'static str,
    last_updated: String,
    instance_profile_arn: String,
    instance_profile_id: String,
}

/// `…/iam/info`, describing the pod's role.
pub fn info(role_arn: &RoleArn, now: SystemTime) -> String {
    to_json(&InfoDocument {
        code: "Success",
        last_updated: timestamp(now),
        instance_profile_arn: role_arn.instance_profile_arn(),
        instance_profile_id: instance_profile_id(role_arn),
    })
}

/// A stable, opaque id in the shape of IAM's (`AIPA…`), derived from the role ARN.
fn instance_profile_id(role_arn: &RoleArn) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(role_arn.as_str().as_bytes());
    let mut id = String::from("AIPA");
    for byte in &digest[..8] {
        id.push_str(&format!("{byte:02X}"));
    }
    id
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Serializing these plain structs cannot fail.
    serde_json::to_string_pretty(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps_are_whole_seconds_utc() {
        let time = UNIX_EPOCH + Duration::from_millis(1_700_000_000_987);
        assert_eq!(timestamp(time), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn documents_are_encoded_once_per_credentials_and_never_mixed_up() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let issued = |key: &str| {
            Arc::new(Credentials {
                access_key_id: key.into(),
                secret_access_key: "SECRET".into(),
                session_token: "TOKEN".into(),
                expiration: now + Duration::from_secs(3600),
                last_updated: now,
            })
        };
        let documents = Documents::default();
        // More credentials than slots: every one still gets its own document.
        let all: Vec<_> = (0..DOCUMENT_SLOTS * 2)
            .map(|i| issued(&format!("AKID{i}")))
            .collect();
        for _ in 0..2 {
            for (i, credentials) in all.iter().enumerate() {
                let body = documents.credentials(credentials);
                assert_eq!(body, credentials_document(credentials));
                let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
                assert_eq!(json["AccessKeyId"], format!("AKID{i}"));
            }
        }
        // The same credentials asked again are answered from the memo: the very same bytes.
        let first = documents.credentials(&all[0]);
        let again = documents.credentials(&all[0]);
        assert_eq!(first.as_ptr(), again.as_ptr());
    }

    fn credentials_document(credentials: &Credentials) -> String {
        super::credentials(credentials)
    }

    #[test]
    fn credential_document_has_every_field_sdks_read() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let doc = credentials(&Credentials {
            access_key_id: "AKID".into(),
            secret_access_key: "SECRET".into(),
            session_token: "TOKEN".into(),
            expiration: now + Duration::from_secs(3600),
            last_updated: now,
        });
        let json: serde_json::Value = serde_json::from_str(&doc).expect("json");
        assert_eq!(json["Code"], "Success");
        assert_eq!(json["Type"], "AWS-HMAC");
        assert_eq!(json["AccessKeyId"], "AKID");
        assert_eq!(json["SecretAccessKey"], "SECRET");
        assert_eq!(json["Token"], "TOKEN");
        assert_eq!(json["LastUpdated"], "2023-11-14T22:13:20Z");
        assert_eq!(json["Expiration"], "2023-11-14T23:13:20Z");
    }
}
