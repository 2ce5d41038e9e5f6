//! The STS `AssumeRole` source.

use std::time::{Duration, SystemTime};

use aws_sdk_sts::config::http::HttpResponse;
use aws_sdk_sts::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sts::operation::assume_role::AssumeRoleError;

use super::{AssumeRoleRequest, CredentialSource, Credentials, Error, Trouble};
use crate::clock::{Clock, SystemClock};
use crate::metrics::Metrics;
use crate::policy::RoleArn;

/// Calls STS `AssumeRole` with iamlet's own AWS credentials.
#[derive(Clone)]
pub struct StsSource {
    client: aws_sdk_sts::Client,
    session_duration: Duration,
    metrics: Metrics,
    clock: std::sync::Arc<dyn Clock>,
}

impl StsSource {
    pub fn new(client: aws_sdk_sts::Client, session_duration: Duration, metrics: Metrics) -> Self {
        StsSource {
            client,
            session_duration,
            metrics,
            clock: std::sync::Arc::new(SystemClock),
        }
    }

    /// The same source with `clock` for the credentials' `last_updated`.
    pub fn with_clock(self, clock: impl Clock) -> Self {
        StsSource {
            clock: std::sync::Arc::new(clock),
            ..self
        }
    }
}

impl CredentialSource for StsSource {
    async fn assume_role(&self, request: &AssumeRoleRequest) -> Result<Credentials, Error> {
        let started = std::time::Instant::now();
        let duration_secs = i32::try_from(self.session_duration.as_secs()).unwrap_or(i32::MAX);
        let result = self
            .client
            .assume_role()
            .role_arn(request.role_arn.as_str())
            .role_session_name(request.session_name.as_str())
            .set_external_id(request.external_id.clone())
            .set_tags(session_tags(&request.tags))
            .duration_seconds(duration_secs)
            .send()
            .await;
        let outcome = match result {
            Ok(output) => output
                .credentials
                .map(|c| Credentials {
                    access_key_id: c.access_key_id,
                    secret_access_key: c.secret_access_key,
                    session_token: c.session_token,
                    expiration: SystemTime::try_from(c.expiration)
                        .unwrap_or(SystemTime::UNIX_EPOCH),
                    last_updated: self.clock.now(),
                })
                .ok_or_else(|| Error::Unavailable {
                    role: request.role_arn.to_string(),
                    kind: Trouble::ServerError,
                    message: "STS answered without credentials".to_owned(),
                }),
            Err(err) => Err(classify(&request.role_arn, err)),
        };
        self.metrics
            .observe_sts_call(started.elapsed(), outcome.as_ref().err());
        outcome
    }
}

/// Throttling codes that STS answers with a 4xx status but that are worth retrying.
const THROTTLING_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
];

/// Codes that say iamlet's own credentials (or clock) are at fault, not the pod's role: they
/// must not be kept as a refusal of the role, which would outlive the renewal of iamlet's
/// credentials until pods or policy change.
const OWN_CREDENTIAL_CODES: &[&str] = &[
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidClientTokenId",
    "RequestExpired",
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "MissingAuthenticationToken",
];

fn classify(role_arn: &RoleArn, err: SdkError<AssumeRoleError, HttpResponse>) -> Error {
    let role = role_arn.to_string();
    match &err {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("Unknown");
            let message = format!(
                "{code}: {}",
                service.err().message().unwrap_or("no message")
            );
            let status = service.raw().status().as_u16();
            if OWN_CREDENTIAL_CODES.contains(&code) {
                Error::Unavailable {
                    role,
                    kind: Trouble::OwnCredentials,
                    message,
                }
            } else if status == 429 || THROTTLING_CODES.contains(&code) {
                Error::Unavailable {
                    role,
                    kind: Trouble::Throttled,
                    message,
                }
            } else if status >= 500 {
                Error::Unavailable {
                    role,
                    kind: Trouble::ServerError,
                    message,
                }
            } else {
                Error::Refused { role, message }
            }
        }
        _ => Error::Unavailable {
            role,
            kind: Trouble::Network,
            message: crate::telemetry::chain(&err),
        },
    }
}

fn session_tags(tags: &[(String, String)]) -> Option<Vec<aws_sdk_sts::types::Tag>> {
    if tags.is_empty() {
        return None;
    }
    let tags = tags
        .iter()
        .filter_map(|(key, value)| {
            aws_sdk_sts::types::Tag::builder()
                .key(key)
                .value(value)
                .build()
                .ok()
        })
        .collect();
    Some(tags)
}
