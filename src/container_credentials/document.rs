//! The JSON the token front answers with: the container-credentials document SDKs parse
//! (never the IMDS shape), or an error with a code and a message (never credentials).

use serde::Serialize;

use crate::credentials::Credentials;
use crate::imds::timestamp;
use crate::policy::RoleArn;

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialDocument<'a> {
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    /// RFC 3339, whole seconds, UTC.
    expiration: String,
    /// botocore keeps the account id only from this path.
    account_id: &'a str,
}

/// The credentials of `role_arn`.
pub fn credentials(credentials: &Credentials, role_arn: &RoleArn) -> String {
    to_json(&CredentialDocument {
        access_key_id: &credentials.access_key_id,
        secret_access_key: &credentials.secret_access_key,
        token: &credentials.session_token,
        expiration: timestamp(credentials.expiration),
        account_id: role_arn.account(),
    })
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ErrorDocument<'a> {
    code: &'a str,
    message: &'a str,
}

/// An error: `Code` for programs, `Message` for people. aws-config and botocore show both.
pub fn error(code: &str, message: &str) -> String {
    to_json(&ErrorDocument { code, message })
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Serializing these plain structs cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn the_document_is_the_container_credentials_shape() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let role = RoleArn::parse("arn:aws:iam::123456789012:role/team/web").expect("arn");
        let doc = credentials(
            &Credentials {
                access_key_id: "AKID".into(),
                secret_access_key: "SECRET".into(),
                session_token: "TOKEN".into(),
                expiration: now + Duration::from_millis(3_600_500),
                last_updated: now,
            },
            &role,
        );
        let json: serde_json::Value = serde_json::from_str(&doc).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "AccessKeyId": "AKID",
                "SecretAccessKey": "SECRET",
                "Token": "TOKEN",
                "Expiration": "2023-11-14T23:13:20Z",
                "AccountId": "123456789012",
            })
        );
    }

    #[test]
    fn errors_carry_a_code_and_a_message_only() {
        let json: serde_json::Value =
            serde_json::from_str(&error("InvalidToken", "the token has expired")).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"Code": "InvalidToken", "Message": "the token has expired"})
        );
    }
}
