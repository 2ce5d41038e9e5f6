//! The node's real IMDS, for the few paths pods may read through iamlet (region, availability
//! zone, instance identity…). A path is proxied only when it is plain (no `..`, no escapes),
//! not one of the node's secrets, and admitted by the allow-list.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use regex::RegexSet;

/// What SDKs read from IMDS besides credentials. Each is anchored as `^(?:…)$`.
pub const DEFAULT_ALLOW: &[&str] = &[
    "/latest/meta-data/placement/(region|availability-zone|availability-zone-id)/?",
    "/latest/meta-data/(instance-id|instance-type|ami-id|local-ipv4|local-hostname|hostname|mac)/?",
    "/latest/meta-data/services/(domain|partition)/?",
    "/latest/dynamic/instance-identity/(document|signature|pkcs7|rsa2048)/?",
];

/// Path segments that are never proxied, whatever the allow-list says: the node's role and
/// its credentials, its instance identity credentials, user-data, and the token API. Compared
/// without regard to case, so `IAM` or `User-Data` cannot slip past to an upstream that is
/// lenient about case.
const NEVER: &[&str] = &["iam", "identity-credentials", "user-data", "api"];

/// Largest upstream body passed on.
const MAX_BODY: usize = 1024 * 1024;

const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const UPSTREAM_TOKEN_TTL: Duration = Duration::from_secs(21_600);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("imds.upstream {0:?} is not an http:// URL with a host")]
    BadUpstream(String),
    #[error("imds.proxy_allow[{index}] {pattern:?} is not a valid regex: {source}")]
    BadPattern {
        index: usize,
        pattern: String,
        source: regex::Error,
    },
    #[error("the node's IMDS at {uri} did not answer: {message}")]
    Unreachable { uri: String, message: String },
    #[error("the node's IMDS answered {status} for {uri}")]
    Status { uri: String, status: StatusCode },
}

/// The client for the node's IMDS.
pub struct Upstream {
    base: String,
    client: Client<HttpConnector, Empty<Bytes>>,
    allow: RegexSet,
    timeout: Duration,
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

impl Upstream {
    pub fn new(base: &str, allow: &[String], timeout: Duration) -> Result<Upstream, Error> {
        check_upstream(base)?;
        let allow = compile_allow_list(allow)?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        Ok(Upstream {
            base: base.trim_end_matches('/').to_owned(),
            client: Client::builder(TokioExecutor::new()).build(connector),
            allow,
            timeout,
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// Whether a pod may read `path` from the node's IMDS.
    pub fn admits(&self, path: &str) -> bool {
        is_plain(path)
            && !path.split('/').any(|segment| {
                NEVER
                    .iter()
                    .any(|never| never.eq_ignore_ascii_case(segment))
            })
            && self.allow.is_match(path)
    }

    /// GETs `path` from the node's IMDS with iamlet's own IMDSv2 token. Nothing of the pod's
    /// request is passed on: no headers, so no `X-Forwarded-For` either.
    pub async fn get(&self, path: &str) -> Result<(StatusCode, Bytes), Error> {
        let token = self.token().await;
        let (status, body) = self.get_with(path, token.as_deref()).await?;
        if status == StatusCode::UNAUTHORIZED && token.is_some() {
            // The node's IMDS restarted or the token aged out early: one fresh try.
            *self.token.lock().await = None;
            let token = self.token().await;
            return self.get_with(path, token.as_deref()).await;
        }
        Ok((status, body))
    }

    async fn get_with(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> Result<(StatusCode, Bytes), Error> {
        let mut request = Request::get(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.header(TOKEN_HEADER, token);
        }
        self.send(request).await
    }

    /// iamlet's own upstream token, or none where the node's IMDS has no token API (IMDSv1).
    async fn token(&self) -> Option<String> {
        let mut cached = self.token.lock().await;
        if let Some((token, expires)) = cached.as_ref()
            && Instant::now() < *expires
        {
            return Some(token.clone());
        }
        let request = Request::builder()
            .method(Method::PUT)
            .uri(format!("{}/latest/api/token", self.base))
            .header(TOKEN_TTL_HEADER, UPSTREAM_TOKEN_TTL.as_secs());
        match self.send(request).await {
            Ok((StatusCode::OK, body)) => {
                let token = String::from_utf8_lossy(&body).trim().to_owned();
                let refresh_at = Instant::now() + UPSTREAM_TOKEN_TTL - Duration::from_secs(300);
                *cached = Some((token.clone(), refresh_at));
                Some(token)
            }
            Ok(_) | Err(_) => None,
        }
    }

    async fn send(
        &self,
        request: hyper::http::request::Builder,
    ) -> Result<(StatusCode, Bytes), Error> {
        let uri = request
            .uri_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let unreachable = |message: String| Error::Unreachable {
            uri: uri.clone(),
            message,
        };
        let request = request
            .body(Empty::new())
            .map_err(|err| unreachable(err.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|err| unreachable(err.to_string()))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|err| unreachable(err.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.timeout)))?
    }

    /// The node's instance profile ARN, from its IMDS `iam/info` (for `aws.base_role_arn`
    /// autodetection at start-up; never on a pod's behalf).
    pub async fn instance_profile_arn(&self) -> Result<String, Error> {
        let path = "/latest/meta-data/iam/info";
        let token = self.token().await;
        let (status, body) = self.get_with(path, token.as_deref()).await?;
        if status != StatusCode::OK {
            return Err(Error::Status {
                uri: format!("{}{path}", self.base),
                status,
            });
        }
        let info: serde_json::Value =
            serde_json::from_slice(&body).map_err(|err| Error::Unreachable {
                uri: format!("{}{path}", self.base),
                message: format!("not JSON: {err}"),
            })?;
        info.get("InstanceProfileArn")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| Error::Unreachable {
                uri: format!("{}{path}", self.base),
                message: "no InstanceProfileArn in the answer".to_owned(),
            })
    }
}

/// Checks that `base` is an `http://` URL with a host (the node's IMDS speaks plain HTTP).
pub fn check_upstream(base: &str) -> Result<(), Error> {
    let uri: Uri = base
        .parse()
        .map_err(|_| Error::BadUpstream(base.to_owned()))?;
    if uri.scheme_str() == Some("http") && uri.host().is_some() {
        Ok(())
    } else {
        Err(Error::BadUpstream(base.to_owned()))
    }
}

/// Compiles the allow-list, each pattern anchored at both ends.
pub fn compile_allow_list(patterns: &[String]) -> Result<RegexSet, Error> {
    for (index, pattern) in patterns.iter().enumerate() {
        regex::Regex::new(pattern).map_err(|source| Error::BadPattern {
            index,
            pattern: pattern.clone(),
            source,
        })?;
    }
    RegexSet::new(patterns.iter().map(|p| format!("^(?:{p})$"))).map_err(|source| {
        Error::BadPattern {
            index: 0,
            pattern: patterns.join(" "),
            source,
        }
    })
}

/// A plain absolute path: `[A-Za-z0-9._-]` segments, no `.` or `..` segment, no empty segment
/// but a trailing one. Anything else (escapes, traversal) is never proxied.
fn is_plain(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    !rest.is_empty()
        && rest.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(allow: &[&str]) -> Upstream {
        let allow: Vec<String> = allow.iter().map(|p| (*p).to_owned()).collect();
        Upstream::new("http://169.254.169.254", &allow, Duration::from_secs(1)).expect("valid")
    }

    #[test]
    fn default_allow_list_admits_what_sdks_read() {
        let upstream = upstream(DEFAULT_ALLOW);
        for path in [
            "/latest/meta-data/placement/region",
            "/latest/meta-data/placement/availability-zone/",
            "/latest/meta-data/instance-id",
            "/latest/dynamic/instance-identity/document",
        ] {
            assert!(upstream.admits(path), "{path} refused");
        }
    }

    #[test]
    fn secrets_and_tricks_are_never_proxied() {
        // Even an allow-list that admits everything never reaches these.
        let upstream = upstream(&[".*"]);
        for path in [
            "/latest/user-data",
            "/latest/meta-data/iam/info",
            "/latest/meta-data/iam/security-credentials/node-role",
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "/latest/api/token",
            "/latest/User-Data",
            "/latest/meta-data/IAM/security-credentials/node-role",
            "/latest/API/token",
            "/latest/meta-data/placement/../iam/info",
            "/latest/meta-data/placement/%2e%2e/iam/info",
            "/latest//meta-data",
            "latest/meta-data",
            "/",
        ] {
            assert!(!upstream.admits(path), "{path} admitted");
        }
        assert!(upstream.admits("/latest/meta-data/ami-id"));
    }

    #[test]
    fn allow_list_is_anchored() {
        let upstream = upstream(&["/latest/meta-data/instance-id"]);
        assert!(upstream.admits("/latest/meta-data/instance-id"));
        assert!(!upstream.admits("/latest/meta-data/instance-id-x"));
        assert!(!upstream.admits("/x/latest/meta-data/instance-id"));
    }

    #[test]
    fn bad_patterns_are_named() {
        let err = compile_allow_list(&["ok".to_owned(), "(".to_owned()]).expect_err("bad");
        assert!(err.to_string().contains("imds.proxy_allow[1]"), "{err}");
    }
}
