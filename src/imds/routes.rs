//! The pod-facing request handler. Every answer a pod can get is decided here, and broker
//! errors become HTTP answers in exactly one function, [`broker_error`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};

use super::fair_share::{Limit, RequestTicket};
use super::{State, TokenPolicy, document, token};
use crate::broker::{self, Broker};
use crate::credentials;
use crate::metrics::Metrics;
use crate::pod::Pod;

// Header names made once: a name given as text is parsed on every lookup.
const TOKEN_HEADER: HeaderName = HeaderName::from_static("x-aws-ec2-metadata-token");
const TOKEN_TTL_HEADER: HeaderName =
    HeaderName::from_static("x-aws-ec2-metadata-token-ttl-seconds");
/// Headers that say a request came through a proxy (`Forwarded` is RFC 7239's form).
const PROXY_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("forwarded"),
];

const CREDENTIALS_PREFIX: &str = "/latest/meta-data/iam/security-credentials";

/// What a request asks for; also its `route` label in logs and metrics. Paths are taken as
/// they are: never decoded or normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    Token,
    Metadata(Metadata<'a>),
}

/// The metadata routes: GETs, behind the token check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metadata<'a> {
    Iam,
    RoleName,
    Credentials(&'a str),
    Info,
    Upstream(&'a str),
}

impl<'a> Route<'a> {
    /// The route of a request for `path` (the URI's path, without the query).
    pub fn of(path: &'a str) -> Route<'a> {
        let metadata = match path {
            "/latest/api/token" => return Route::Token,
            "/latest/meta-data/iam" | "/latest/meta-data/iam/" => Metadata::Iam,
            "/latest/meta-data/iam/info" | "/latest/meta-data/iam/info/" => Metadata::Info,
            _ => match path.strip_prefix(CREDENTIALS_PREFIX) {
                Some("" | "/") => Metadata::RoleName,
                Some(rest) => match rest.strip_prefix('/') {
                    Some(name) => Metadata::Credentials(name.strip_suffix('/').unwrap_or(name)),
                    None => Metadata::Upstream(path),
                },
                None => Metadata::Upstream(path),
            },
        };
        Route::Metadata(metadata)
    }

    pub fn label(self) -> &'static str {
        match self {
            Route::Token => "token",
            Route::Metadata(Metadata::Iam) => "iam",
            Route::Metadata(Metadata::RoleName) => "role",
            Route::Metadata(Metadata::Credentials(_)) => "credentials",
            Route::Metadata(Metadata::Info) => "info",
            Route::Metadata(Metadata::Upstream(_)) => "upstream",
        }
    }
}

/// An answer, and the pod it was for (for the request log line).
struct Outcome {
    response: Response<Full<Bytes>>,
    pod: Option<PodLabel>,
}

/// The pod an answer was for, as the request log line names it: named only when the line is
/// written, so that a request logged at a level that is off pays nothing for it.
enum PodLabel {
    Pod(Arc<Pod>),
    Named(String),
}

impl From<&Arc<Pod>> for PodLabel {
    fn from(pod: &Arc<Pod>) -> Self {
        PodLabel::Pod(pod.clone())
    }
}

impl From<String> for PodLabel {
    fn from(name: String) -> Self {
        PodLabel::Named(name)
    }
}

impl std::fmt::Display for PodLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // As `Pod::key`.
            PodLabel::Pod(pod) if pod.namespace.is_empty() => f.write_str(&pod.name),
            PodLabel::Pod(pod) => write!(f, "{}/{}", pod.namespace, pod.name),
            PodLabel::Named(name) => f.write_str(name),
        }
    }
}

/// `-` where an answer was for no pod.
struct LoggedPod<'a>(&'a Option<PodLabel>);

impl std::fmt::Display for LoggedPod<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(pod) => pod.fmt(f),
            None => f.write_str("-"),
        }
    }
}

impl Outcome {
    fn text(status: StatusCode, body: impl Into<Bytes>) -> Outcome {
        let mut response = Response::new(Full::new(body.into()));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        Outcome {
            response,
            pod: None,
        }
    }

    fn for_pod(mut self, pod: impl Into<PodLabel>) -> Outcome {
        self.pod = Some(pod.into());
        self
    }
}

/// Entry point for one request from `remote`.
pub async fn handle<B: Broker>(
    state: Arc<State<B>>,
    remote: SocketAddr,
    admitted: Result<RequestTicket, Limit>,
    request: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let ip = remote.ip().to_canonical();
    let path = request.uri().path();
    let route = Route::of(path);
    let _in_flight = InFlight::new(&state.metrics);
    let outcome = match admitted {
        Ok(_ticket) => {
            let mut work = std::pin::pin!(dispatch(
                &state,
                ip,
                route,
                request.method(),
                request.headers()
            ));
            // A cache hit is answered at the first poll: the timeout (a timer) is set only
            // for work that has to wait (a new pod, STS, the node's IMDS, the kiam server).
            match futures::poll!(work.as_mut()) {
                Poll::Ready(outcome) => outcome,
                Poll::Pending => match tokio::time::timeout(state.request_timeout, work).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        Outcome::text(StatusCode::GATEWAY_TIMEOUT, "iamlet: request timed out\n")
                    }
                },
            }
        }
        Err(limit) => over_share(limit),
    };
    let status = outcome.response.status().as_u16();
    let elapsed = started.elapsed();
    state
        .metrics
        .observe_request(route.label(), status, elapsed);
    tracing::debug!(
        client = %ip,
        pod = %LoggedPod(&outcome.pod),
        route = route.label(),
        method = %request.method(),
        path,
        status,
        // Whole microseconds in milliseconds: "0.147", not "0.14742100000000002".
        duration_ms = elapsed.as_micros() as f64 / 1000.0,
        "imds request"
    );
    outcome.response
}

async fn dispatch<B: Broker>(
    state: &State<B>,
    ip: IpAddr,
    route: Route<'_>,
    method: &Method,
    headers: &HeaderMap,
) -> Outcome {
    match route {
        Route::Token if method == Method::PUT => issue_token(state, ip, headers),
        Route::Token => method_not_allowed("PUT"),
        Route::Metadata(_) if method != Method::GET && method != Method::HEAD => {
            method_not_allowed("GET, HEAD")
        }
        Route::Metadata(metadata) => match check_token(state, ip, headers) {
            Ok(()) => answer(state, ip, metadata).await,
            Err(reason) => Outcome::text(StatusCode::UNAUTHORIZED, reason),
        },
    }
}

/// A metadata GET that passed the token check.
async fn answer<B: Broker>(state: &State<B>, ip: IpAddr, metadata: Metadata<'_>) -> Outcome {
    match metadata {
        Metadata::Iam => match state.broker.role(ip).await {
            Ok(role) => {
                Outcome::text(StatusCode::OK, "info\nsecurity-credentials/").for_pod(&role.pod)
            }
            Err(err) => broker_error(err, state.clock.now()),
        },
        Metadata::RoleName => match state.broker.role(ip).await {
            // Exactly the name: aws-sdk-rust fails on a trailing newline.
            Ok(role) => {
                Outcome::text(StatusCode::OK, role.role.name().to_owned()).for_pod(&role.pod)
            }
            Err(err) => broker_error(err, state.clock.now()),
        },
        Metadata::Info => match state.broker.role(ip).await {
            Ok(role) => match role.role.arn() {
                Some(arn) => Outcome::text(StatusCode::OK, document::info(arn, state.clock.now()))
                    .for_pod(&role.pod),
                // Server-backed mode without aws.base_role_arn knows only the role's name.
                None => Outcome::text(
                    StatusCode::NOT_FOUND,
                    "iamlet: this node does not know the account of the pod's role\n",
                )
                .for_pod(&role.pod),
            },
            Err(err) => broker_error(err, state.clock.now()),
        },
        Metadata::Credentials(name) => match state.broker.credentials(ip, name).await {
            Ok((role, credentials)) => {
                Outcome::text(StatusCode::OK, state.documents.credentials(&credentials))
                    .for_pod(&role.pod)
            }
            Err(err) => broker_error(err, state.clock.now()),
        },
        // Boxed: the HTTP client's future is large, and rarely needed.
        Metadata::Upstream(path) => Box::pin(proxy(state, path)).await,
    }
}

fn issue_token<B>(state: &State<B>, ip: IpAddr, headers: &HeaderMap) -> Outcome {
    // EC2 refuses token requests that passed through a proxy, so tokens never leave the host.
    if PROXY_HEADERS.iter().any(|name| headers.contains_key(name)) {
        return Outcome::text(
            StatusCode::FORBIDDEN,
            "iamlet: token requests carrying X-Forwarded-For or Forwarded are refused\n",
        );
    }
    let ttl = token_ttl(headers);
    let Some(ttl) = ttl else {
        return Outcome::text(
            StatusCode::BAD_REQUEST,
            format!(
                "iamlet: {TOKEN_TTL_HEADER} must be a whole number of seconds from {} to {}\n",
                token::TTL_RANGE.start(),
                token::TTL_RANGE.end()
            ),
        );
    };
    let minted = state
        .tokens
        .mint(ip, Duration::from_secs(ttl), state.clock.now());
    let mut outcome = Outcome::text(StatusCode::OK, minted);
    // aws-sdk-rust refuses a token whose answer does not repeat the TTL.
    outcome
        .response
        .headers_mut()
        .insert(TOKEN_TTL_HEADER.clone(), HeaderValue::from(ttl));
    outcome
}

/// The requested token lifetime: exactly one TTL header, plain decimal digits (no sign, no
/// exponent), within EC2's range; `None` for anything else.
fn token_ttl(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(&TOKEN_TTL_HEADER).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return None;
    };
    let text = value.to_str().ok()?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u64>()
        .ok()
        .filter(|ttl| token::TTL_RANGE.contains(ttl))
}

/// Whether the request may proceed; the reason for a 401 when not.
fn check_token<B>(state: &State<B>, ip: IpAddr, headers: &HeaderMap) -> Result<(), &'static str> {
    match headers.get(&TOKEN_HEADER) {
        Some(value) => {
            let valid = value
                .to_str()
                .is_ok_and(|token| state.tokens.verify(token, ip, state.clock.now()));
            if valid {
                Ok(())
            } else {
                Err("iamlet: the session token is invalid or expired\n")
            }
        }
        None if state.token_policy == TokenPolicy::Required => {
            Err("iamlet: a session token is required (PUT /latest/api/token)\n")
        }
        None => Ok(()),
    }
}

async fn proxy<B>(state: &State<B>, path: &str) -> Outcome {
    if !state.upstream.admits(path) {
        return Outcome::text(
            StatusCode::NOT_FOUND,
            format!("iamlet: {path} is not served to pods\n"),
        );
    }
    match state.upstream.get(path).await {
        Ok((status, body)) => Outcome::text(status, body),
        Err(err) => {
            tracing::warn!(error = %err, "the node's IMDS failed a proxied request");
            Outcome::text(
                StatusCode::BAD_GATEWAY,
                "iamlet: the node's metadata service did not answer\n",
            )
        }
    }
}

/// Counts a request in `iamlet_imds_requests_in_flight` for as long as it lives, including
/// when the client hangs up and the request is dropped.
struct InFlight<'a>(&'a Metrics);

impl<'a> InFlight<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.track_in_flight(1);
        InFlight(metrics)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.track_in_flight(-1);
    }
}

/// The client is over its fair share: 503 with `Retry-After`, which SDKs' IMDS clients retry
/// (several retry 5xx but not 429).
fn over_share(limit: Limit) -> Outcome {
    let what = match limit {
        Limit::Connections => "connections",
        Limit::Requests => "requests at once",
        Limit::Rate => "requests per second",
    };
    let mut outcome = Outcome::text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("iamlet: too many {what} from this address; retry shortly\n"),
    );
    outcome
        .response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    outcome
}

fn method_not_allowed(allow: &'static str) -> Outcome {
    let mut outcome = Outcome::text(
        StatusCode::METHOD_NOT_ALLOWED,
        "iamlet: method not allowed\n",
    );
    outcome
        .response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    outcome
}

/// The one place where broker errors become answers, and where the ones an operator acts on
/// are logged above `debug`.
fn broker_error(err: broker::Error, now: SystemTime) -> Outcome {
    use broker::Error;
    match err {
        Error::UnknownPod(_) => Outcome::text(
            StatusCode::NOT_FOUND,
            "iamlet: no pod is known at this address\n",
        ),
        Error::NoRole { pod } => {
            Outcome::text(StatusCode::NOT_FOUND, "iamlet: this pod has no IAM role\n").for_pod(pod)
        }
        Error::BadRole { ref pod, .. } => {
            tracing::warn!(error = %err, "role annotation refused");
            Outcome::text(
                StatusCode::NOT_FOUND,
                "iamlet: this pod's role annotation is not a valid role\n",
            )
            .for_pod(pod.clone())
        }
        Error::Forbidden { pod, .. } => {
            // Logged, counted and reported as an Event by the broker.
            Outcome::text(StatusCode::NOT_FOUND, "iamlet: forbidden by policy\n").for_pod(pod)
        }
        Error::WrongRole { ref pod, .. } => {
            tracing::info!(error = %err, "credentials for another role refused");
            Outcome::text(StatusCode::NOT_FOUND, "iamlet: not this pod's role\n")
                .for_pod(pod.clone())
        }
        Error::Credentials(ref source @ credentials::Error::Refused { ref message, .. }) => {
            // Logged at `warn` by the cache when STS said so; this is one request served it.
            tracing::debug!(error = %source, "STS refusal served");
            Outcome::text(StatusCode::OK, document::unauthorized(message, now))
        }
        Error::Stale { .. } => {
            tracing::debug!(error = %err, "refused: the view of pods is stale");
            Outcome::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "iamlet: its view of pods is stale (no contact with the Kubernetes API); try again\n",
            )
        }
        Error::Unavailable(ref message) => {
            tracing::warn!(error = %message, "no answer for a pod");
            Outcome::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "iamlet: credentials are temporarily unavailable\n",
            )
        }
        Error::Credentials(ref source @ credentials::Error::Unavailable { .. }) => {
            tracing::warn!(error = %source, "no credentials: STS unavailable");
            Outcome::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "iamlet: credentials are temporarily unavailable\n",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_recognised_with_and_without_trailing_slash() {
        let of = |path: &str| match Route::of(path) {
            Route::Token => "token".to_owned(),
            Route::Metadata(metadata) => format!("{metadata:?}"),
        };
        assert_eq!(of("/latest/api/token"), "token");
        assert_eq!(of(CREDENTIALS_PREFIX), "RoleName");
        assert_eq!(of(&format!("{CREDENTIALS_PREFIX}/")), "RoleName");
        assert_eq!(
            of(&format!("{CREDENTIALS_PREFIX}/web")),
            "Credentials(\"web\")"
        );
        assert_eq!(
            of(&format!("{CREDENTIALS_PREFIX}/web/")),
            "Credentials(\"web\")"
        );
        assert_eq!(of("/latest/meta-data/iam/info"), "Info");
        assert_eq!(
            of("/latest/meta-data/iam/security-credentialsX"),
            "Upstream(\"/latest/meta-data/iam/security-credentialsX\")"
        );
    }
}
