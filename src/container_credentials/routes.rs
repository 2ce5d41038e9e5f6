//! The token front's request handler. Every answer a client can get is decided here, and every
//! refusal becomes an HTTP answer in one function, [`Refusal::answer`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};

use super::document;
use super::jwt::{BoundPod, Rejection};
use super::keys::KeySource;
use super::verifier::Refused;
use super::{CREDENTIALS_PATH, HOSTS, State};
use crate::broker;
use crate::clock::Clock;
use crate::credentials::{self, CredentialSource, Credentials};
use crate::pods::{PodLookup, Standing};
use crate::policy::RoleArn;

/// What a request asks for; also its `route` label in logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Credentials,
    Other,
}

impl Route {
    fn of(path: &str) -> Route {
        if path == CREDENTIALS_PATH {
            Route::Credentials
        } else {
            Route::Other
        }
    }

    fn label(self) -> &'static str {
        match self {
            Route::Credentials => "credentials",
            Route::Other => "other",
        }
    }
}

/// Credentials for a pod.
struct Served {
    pod: String,
    role_arn: RoleArn,
    credentials: Arc<Credentials>,
}

/// Why a request gets no credentials.
enum Refusal {
    Host,
    NotFound,
    Method,
    MissingToken,
    Token(Rejection),
    NoKeys,
    NotOnThisNode(Arc<BoundPod>),
    Finished(Arc<BoundPod>),
    Mismatch(Arc<BoundPod>),
    Broker(Arc<BoundPod>, broker::Error),
    Timeout,
}

/// An answer, and what the request log line says about it.
struct Outcome {
    response: Response<Full<Bytes>>,
    pod: Option<String>,
    code: &'static str,
}

impl Outcome {
    fn json(status: StatusCode, body: String, code: &'static str) -> Outcome {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Outcome {
            response,
            pod: None,
            code,
        }
    }

    fn error(status: StatusCode, code: &'static str, message: &str) -> Outcome {
        Outcome::json(status, document::error(code, message), code)
    }

    fn for_pod(self, pod: &BoundPod) -> Outcome {
        self.with_pod(pod.key())
    }

    fn with_pod(mut self, pod: String) -> Outcome {
        self.pod = Some(pod);
        self
    }
}

/// Entry point for one request from `remote`.
pub async fn handle<P, S, C, K>(
    state: Arc<State<P, S, C, K>>,
    remote: SocketAddr,
    request: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>>
where
    P: PodLookup,
    S: CredentialSource,
    C: Clock,
    K: KeySource,
{
    let started = Instant::now();
    let route = Route::of(request.uri().path());
    let answered = tokio::time::timeout(
        state.request_timeout,
        answer(
            &state,
            route,
            request.method(),
            request.uri(),
            request.headers(),
        ),
    )
    .await
    .unwrap_or(Err(Refusal::Timeout));
    let outcome = match answered {
        Ok(served) => Outcome::json(
            StatusCode::OK,
            document::credentials(&served.credentials, &served.role_arn),
            "Success",
        )
        .with_pod(served.pod),
        Err(refusal) => refusal.answer(&state.metrics),
    };
    let status = outcome.response.status().as_u16();
    let elapsed = started.elapsed();
    state
        .metrics
        .observe_container_request(route.label(), status, elapsed);
    tracing::debug!(
        client = %remote.ip().to_canonical(),
        pod = outcome.pod.as_deref().unwrap_or("-"),
        route = route.label(),
        method = %request.method(),
        status,
        code = outcome.code,
        // Whole microseconds in milliseconds: "0.147", not "0.14742100000000002".
        duration_ms = elapsed.as_micros() as f64 / 1000.0,
        "container credentials request"
    );
    outcome.response
}

async fn answer<P, S, C, K>(
    state: &State<P, S, C, K>,
    route: Route,
    method: &Method,
    uri: &hyper::Uri,
    headers: &HeaderMap,
) -> Result<Served, Refusal>
where
    P: PodLookup,
    S: CredentialSource,
    C: Clock,
    K: KeySource,
{
    if !addressed_to_us(uri, headers) {
        return Err(Refusal::Host);
    }
    if route == Route::Other {
        return Err(Refusal::NotFound);
    }
    if method != Method::GET {
        return Err(Refusal::Method);
    }
    let token = token(headers).ok_or(Refusal::MissingToken)?;
    let bound = state
        .verifier
        .verify(token)
        .await
        .map_err(|refused| match refused {
            Refused::Token(rejection) => Refusal::Token(rejection),
            Refused::NoKeys => Refusal::NoKeys,
        })?;
    let known = state
        .local
        .pod_by_uid(&bound.uid)
        .await
        .map_err(|err| Refusal::Broker(bound.clone(), err))?
        .ok_or_else(|| Refusal::NotOnThisNode(bound.clone()))?;
    if known.standing == Standing::Finished {
        return Err(Refusal::Finished(bound));
    }
    let pod = known.pod;
    if pod.namespace != bound.namespace
        || pod.name != bound.name
        || pod.service_account != bound.service_account
    {
        return Err(Refusal::Mismatch(bound));
    }
    let role_arn = state
        .local
        .role_of(&pod)
        .map_err(|err| Refusal::Broker(bound.clone(), err))?;
    let credentials = state
        .local
        .credentials_for(&pod, role_arn.clone())
        .await
        .map_err(|err| Refusal::Broker(bound.clone(), err))?;
    Ok(Served {
        pod: pod.key(),
        role_arn,
        credentials,
    })
}

/// Whether the request is for 169.254.170.23 (the `Host`, and the authority of an
/// absolute-form target, if any). Names are refused: that is the defence against DNS
/// rebinding, where a browser on the node is led to send a page's requests here.
fn addressed_to_us(uri: &hyper::Uri, headers: &HeaderMap) -> bool {
    let mut hosts = headers.get_all(HOST).iter();
    let host_ok = match (hosts.next(), hosts.next()) {
        (Some(host), None) => host.to_str().is_ok_and(|host| HOSTS.contains(&host)),
        _ => false,
    };
    let authority_ok = uri
        .authority()
        .is_none_or(|authority| HOSTS.contains(&authority.as_str()));
    host_ok && authority_ok
}

/// The token in `Authorization`: the header's whole value, as the SDKs send it (or after
/// `Bearer `), without surrounding whitespace.
fn token(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return None;
    };
    let value = value.to_str().ok()?.trim();
    if value.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = match value.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("bearer ") => value[7..].trim_start(),
        _ => value,
    };
    (!token.is_empty()).then_some(token)
}

impl Refusal {
    /// The one place where refusals become answers, are counted by reason, and where the
    /// ones an operator acts on are logged above `debug`.
    fn answer(self, metrics: &crate::metrics::Metrics) -> Outcome {
        use StatusCode as S;
        let refused = |reason: &'static str| metrics.observe_container_refusal(reason);
        match self {
            Refusal::Host => Outcome::error(
                S::MISDIRECTED_REQUEST,
                "InvalidHost",
                "iamlet answers only requests for http://169.254.170.23/v1/credentials",
            ),
            Refusal::NotFound => {
                Outcome::error(S::NOT_FOUND, "NotFound", "the only path is /v1/credentials")
            }
            Refusal::Method => {
                let mut outcome =
                    Outcome::error(S::METHOD_NOT_ALLOWED, "MethodNotAllowed", "use GET");
                outcome
                    .response
                    .headers_mut()
                    .insert(ALLOW, HeaderValue::from_static("GET"));
                outcome
            }
            Refusal::MissingToken => {
                refused("missing_token");
                Outcome::error(
                    S::UNAUTHORIZED,
                    "MissingToken",
                    "send the pod's projected service-account token in Authorization \
                     (AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE)",
                )
            }
            Refusal::Token(rejection) => {
                refused(rejection.label());
                Outcome::error(S::UNAUTHORIZED, "InvalidToken", &rejection.to_string())
            }
            Refusal::NoKeys => Outcome::error(
                S::SERVICE_UNAVAILABLE,
                "KeysUnavailable",
                "iamlet has not fetched the cluster's service-account keys yet; try again",
            ),
            Refusal::NotOnThisNode(pod) => {
                refused("not_on_this_node");
                Outcome::error(
                    S::FORBIDDEN,
                    "PodNotOnThisNode",
                    &format!(
                        "the token's pod {} (uid {}) is not running on this node",
                        pod.key(),
                        pod.uid
                    ),
                )
                .for_pod(&pod)
            }
            Refusal::Finished(pod) => {
                refused("pod_finished");
                Outcome::error(
                    S::FORBIDDEN,
                    "PodFinished",
                    &format!("the token's pod {} has finished", pod.key()),
                )
                .for_pod(&pod)
            }
            Refusal::Mismatch(pod) => {
                refused("pod_mismatch");
                Outcome::error(
                    S::FORBIDDEN,
                    "TokenDoesNotMatchPod",
                    "the token's pod name, namespace or service account is not the pod's",
                )
                .for_pod(&pod)
            }
            Refusal::Broker(pod, err) => broker_error(&pod, err, refused).for_pod(&pod),
            Refusal::Timeout => Outcome::error(
                S::GATEWAY_TIMEOUT,
                "Timeout",
                "iamlet could not answer in time; try again",
            ),
        }
    }
}

fn broker_error(pod: &BoundPod, err: broker::Error, refused: impl Fn(&'static str)) -> Outcome {
    use StatusCode as S;
    use broker::Error;
    match err {
        Error::NoRole { .. } => {
            refused("no_role");
            Outcome::error(S::FORBIDDEN, "NoRole", "the pod has no IAM role annotation")
        }
        Error::BadRole { ref error, .. } => {
            refused("bad_role");
            tracing::warn!(pod = %pod.key(), %error, "role annotation refused");
            Outcome::error(
                S::FORBIDDEN,
                "InvalidRoleAnnotation",
                &format!("the pod's role annotation is not a valid role: {error}"),
            )
        }
        Error::Forbidden { ref denial, .. } => {
            // Logged, counted and reported as an Event by the broker.
            refused("forbidden");
            Outcome::error(
                S::FORBIDDEN,
                "ForbiddenByPolicy",
                &format!("forbidden by policy: {denial}"),
            )
        }
        Error::Credentials(credentials::Error::Refused {
            ref role,
            ref message,
        }) => {
            refused("sts_refused");
            // Logged at `warn` by the cache when STS said so.
            tracing::debug!(pod = %pod.key(), role, message, "STS refusal served");
            Outcome::error(
                S::FORBIDDEN,
                "AssumeRoleUnauthorizedAccess",
                &format!("STS refused to assume {role}: {message}"),
            )
        }
        Error::Credentials(ref source @ credentials::Error::Unavailable { .. }) => {
            tracing::warn!(pod = %pod.key(), error = %source, "no credentials: STS unavailable");
            Outcome::error(
                S::SERVICE_UNAVAILABLE,
                "CredentialsUnavailable",
                "credentials are temporarily unavailable (STS); try again",
            )
        }
        Error::Stale { .. } => Outcome::error(
            S::SERVICE_UNAVAILABLE,
            "PodsUnknown",
            "iamlet's view of pods is stale (no contact with the Kubernetes API); try again",
        ),
        // Only IP lookups, kiam servers and clients naming a role give these.
        Error::UnknownPod(_) | Error::WrongRole { .. } | Error::Unavailable(_) => {
            tracing::error!(pod = %pod.key(), error = %err, "unexpected broker error on the token front");
            Outcome::error(
                S::INTERNAL_SERVER_ERROR,
                "InternalError",
                "iamlet could not answer",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                hyper::header::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    #[test]
    fn only_the_link_local_address_is_answered() {
        let origin: hyper::Uri = "/v1/credentials".parse().expect("uri");
        for ok in ["169.254.170.23", "169.254.170.23:80"] {
            assert!(addressed_to_us(&origin, &headers(&[("host", ok)])), "{ok}");
        }
        for bad in [
            "evil.example",
            "169.254.170.23.nip.io",
            "169.254.170.23:8183",
            "127.0.0.1",
            "localhost",
            "[fd00:ec2::23]",
            "169.254.170.2",
            "",
        ] {
            assert!(
                !addressed_to_us(&origin, &headers(&[("host", bad)])),
                "{bad}"
            );
        }
        assert!(!addressed_to_us(&origin, &headers(&[])), "no Host");
        assert!(!addressed_to_us(
            &origin,
            &headers(&[("host", "169.254.170.23"), ("host", "evil.example")])
        ));
        let absolute: hyper::Uri = "http://evil.example/v1/credentials".parse().expect("uri");
        assert!(!addressed_to_us(
            &absolute,
            &headers(&[("host", "169.254.170.23")])
        ));
    }

    #[test]
    fn the_token_is_the_authorization_value() {
        let token_of = |pairs: &[(&str, &str)]| token(&headers(pairs)).map(str::to_owned);
        assert_eq!(
            token_of(&[("authorization", "eyJ.a.b")]).as_deref(),
            Some("eyJ.a.b")
        );
        assert_eq!(
            token_of(&[("authorization", "Bearer eyJ.a.b")]).as_deref(),
            Some("eyJ.a.b")
        );
        assert_eq!(
            token_of(&[("authorization", "  eyJ.a.b \t")]).as_deref(),
            Some("eyJ.a.b")
        );
        assert_eq!(token_of(&[]), None);
        assert_eq!(token_of(&[("authorization", "")]), None);
        assert_eq!(token_of(&[("authorization", "Bearer ")]), None);
        assert_eq!(
            token_of(&[("authorization", "a"), ("authorization", "b")]),
            None,
            "two tokens are none"
        );
    }
}
