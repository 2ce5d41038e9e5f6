//! Prometheus metrics, served on the admin port in the OpenMetrics text format (the only one
//! prometheus-client writes: `# TYPE x counter` over `x_total` samples, ending in `# EOF`), with
//! OpenMetrics' content type, [`CONTENT_TYPE`]. Prometheus asks for OpenMetrics first and parses
//! it by that content type.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::credentials;

/// Every `kind` of `iamlet_sts_assume_role_errors_total` (`credentials::Trouble` labels and
/// refusals).
const STS_ERROR_KINDS: [&str; 4] = ["refused", "throttled", "server_error", "network"];
/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The `route` labels of pod-facing requests (`imds::Route::label`), and the statuses they
/// usually end in: their series are resolved once, not looked up on every request.
const IMDS_ROUTES: [&str; 6] = ["token", "iam", "role", "credentials", "info", "upstream"];
const IMDS_STATUSES: [u16; 8] = [200, 400, 401, 403, 404, 405, 503, 504];

/// One route's request series, resolved on first use (so that a series still appears only
/// once something was counted in it).
#[derive(Default)]
struct RouteSeries {
    duration: OnceLock<Histogram>,
    statuses: [OnceLock<Counter>; IMDS_STATUSES.len()],
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StsErrorLabels {
    kind: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<RouteLabels>,
    sts_calls: Counter,
    sts_errors: Family<StsErrorLabels, Counter>,
    sts_duration: Histogram,
    denials: Family<ReasonLabels, Counter>,
    cache_hits: Counter,
    cache_misses: Counter,
    refreshes: Family<OutcomeLabels, Counter>,
    stale_served: Counter,
    served_remaining: Histogram,
    cache_entries: prometheus_client::metrics::gauge::Gauge,
    kiam_calls: Family<CallLabels, Counter>,
    kiam_duration: HistogramFamily<MethodLabels>,
    server_calls: Family<CallLabels, Counter>,
    server_duration: HistogramFamily<MethodLabels>,
    api_contact: Family<ResourceLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    container_requests: Family<RequestLabels, Counter>,
    container_request_duration: HistogramFamily<RouteLabels>,
    container_refusals: Family<ReasonLabels, Counter>,
    ready: prometheus_client::metrics::gauge::Gauge,
    in_flight: prometheus_client::metrics::gauge::Gauge,
    fair_share_refusals: Family<LimitLabels, Counter>,
    /// Handles into `requests` and `request_duration`, by [`IMDS_ROUTES`] index.
    imds_series: [RouteSeries; IMDS_ROUTES.len()],
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Cheap to clone; every clone records into the same registry.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

fn latency_histogram() -> Histogram {
    // 0.25 ms to ~8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("iamlet");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "imds_requests",
            "Pod-facing IMDS requests by route and HTTP status",
            requests.clone(),
        );
        let request_duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "imds_request_duration_seconds",
            "Time to answer a pod-facing IMDS request, by route",
            request_duration.clone(),
        );
        let sts_calls = Counter::default();
        registry.register(
            "sts_assume_role_calls",
            "AssumeRole calls made to STS",
            sts_calls.clone(),
        );
        let sts_errors = Family::<StsErrorLabels, Counter>::default();
        registry.register(
            "sts_assume_role_errors",
            "Failed AssumeRole calls, by kind (refused, throttled, server_error, network)",
            sts_errors.clone(),
        );
        let sts_duration = latency_histogram();
        registry.register(
            "sts_assume_role_duration_seconds",
            "Time taken by STS AssumeRole calls",
            sts_duration.clone(),
        );
        let denials = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "policy_denials",
            "Roles refused by namespace policy, by reason",
            denials.clone(),
        );
        let cache_hits = Counter::default();
        registry.register(
            "credential_cache_hits",
            "Credential requests answered from the cache",
            cache_hits.clone(),
        );
        let cache_misses = Counter::default();
        registry.register(
            "credential_cache_misses",
            "Credential requests that had to wait for STS",
            cache_misses.clone(),
        );
        let refreshes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "credential_refreshes",
            "Background fetches (prefetch and refresh-ahead), by outcome",
            refreshes.clone(),
        );
        let stale_served = Counter::default();
        registry.register(
            "credential_stale_served",
            "Credentials served inside the refresh window because STS was in trouble",
            stale_served.clone(),
        );
        // One minute to twelve hours.
        let served_remaining = Histogram::new([
            60.0, 300.0, 900.0, 1200.0, 1500.0, 1800.0, 2400.0, 3000.0, 3600.0, 7200.0, 21600.0,
            43200.0,
        ]);
        registry.register(
            "credential_served_remaining_seconds",
            "Lifetime left on credentials when they are served",
            served_remaining.clone(),
        );
        let cache_entries = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "credential_cache_entries",
            "Identities (role, session name, external id, tags) cached",
            cache_entries.clone(),
        );
        let kiam_calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "kiam_calls",
            "Calls (attempts) to the kiam server, by method and gRPC code",
            kiam_calls.clone(),
        );
        let kiam_duration: HistogramFamily<MethodLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "kiam_call_duration_seconds",
            "Time taken by one call (attempt) to the kiam server, by method",
            kiam_duration.clone(),
        );
        let server_calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "server_calls",
            "Calls answered by iamlet server, by method and gRPC code",
            server_calls.clone(),
        );
        let server_duration: HistogramFamily<MethodLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "server_call_duration_seconds",
            "Time iamlet server took to answer a call, by method",
            server_duration.clone(),
        );
        let api_contact =
            Family::<ResourceLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "kubernetes_last_contact_timestamp_seconds",
            "When the API server last answered about pods or namespaces (a watch event, a list, a renewed watch), by resource; time() minus it is the age of iamlet's view of pods",
            api_contact.clone(),
        );
        let container_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "container_credentials_requests",
            "Requests to the token front (container credentials), by route and HTTP status",
            container_requests.clone(),
        );
        let container_request_duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "container_credentials_request_duration_seconds",
            "Time to answer a request to the token front, by route",
            container_request_duration.clone(),
        );
        let container_refusals = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "container_credentials_refusals",
            "Token front requests refused (401 and 403), by reason",
            container_refusals.clone(),
        );
        // Series that alerts watch with increase() exist from the start at 0: a series born at
        // its first error would show no increase for it.
        for kind in STS_ERROR_KINDS {
            drop(sts_errors.get_or_create(&StsErrorLabels { kind }));
        }
        for reason in crate::policy::Denial::REASONS {
            drop(denials.get_or_create(&ReasonLabels { reason }));
        }
        let ready = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "ready",
            "1 when iamlet can answer pods (what /readyz says), else 0",
            ready.clone(),
        );
        let in_flight = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "imds_requests_in_flight",
            "Pod-facing IMDS requests being answered now",
            in_flight.clone(),
        );
        let fair_share_refusals = Family::<LimitLabels, Counter>::default();
        registry.register(
            "imds_fair_share_refusals",
            "Connections and requests refused because one client (pod IP) was over its share, \
             by limit (connections, requests, rate)",
            fair_share_refusals.clone(),
        );
        Metrics(Arc::new(Inner {
            imds_series: Default::default(),
            container_requests,
            container_request_duration,
            container_refusals,
            ready,
            api_contact,
            server_calls,
            server_duration,
            in_flight,
            fair_share_refusals,
            kiam_calls,
            kiam_duration,
            cache_hits,
            cache_misses,
            refreshes,
            stale_served,
            served_remaining,
            cache_entries,
            denials,
            registry,
            requests,
            request_duration,
            sts_calls,
            sts_errors,
            sts_duration,
        }))
    }
}

impl Metrics {
    /// A pod-facing request began (`+1`) or ended (`-1`).
    pub fn track_in_flight(&self, delta: i64) {
        self.0.in_flight.inc_by(delta);
    }

    pub fn observe_fair_share_refusal(&self, limit: &'static str) {
        self.0
            .fair_share_refusals
            .get_or_create(&LimitLabels { limit })
            .inc();
    }

    pub fn observe_request(&self, route: &'static str, status: u16, elapsed: Duration) {
        let inner = &self.0;
        let Some(series) = IMDS_ROUTES
            .iter()
            .position(|known| *known == route)
            .map(|at| &inner.imds_series[at])
        else {
            inner
                .requests
                .get_or_create(&RequestLabels { route, status })
                .inc();
            inner
                .request_duration
                .get_or_create(&RouteLabels { route })
                .observe(elapsed.as_secs_f64());
            return;
        };
        let count = |status| {
            inner
                .requests
                .get_or_create(&RequestLabels { route, status })
                .clone()
        };
        match IMDS_STATUSES.iter().position(|known| *known == status) {
            Some(at) => series.statuses[at].get_or_init(|| count(status)).inc(),
            None => count(status).inc(),
        };
        series
            .duration
            .get_or_init(|| {
                inner
                    .request_duration
                    .get_or_create(&RouteLabels { route })
                    .clone()
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_sts_call(&self, elapsed: Duration, error: Option<&credentials::Error>) {
        self.0.sts_calls.inc();
        self.0.sts_duration.observe(elapsed.as_secs_f64());
        if let Some(error) = error {
            let kind = match error {
                credentials::Error::Refused { .. } => "refused",
                credentials::Error::Unavailable { kind, .. } => kind.label(),
            };
            self.0
                .sts_errors
                .get_or_create(&StsErrorLabels { kind })
                .inc();
        }
    }

    pub fn observe_cache_hit(&self, remaining: Duration) {
        self.0.cache_hits.inc();
        self.observe_served(remaining);
    }

    pub fn observe_cache_miss(&self) {
        self.0.cache_misses.inc();
    }

    pub fn observe_served(&self, remaining: Duration) {
        self.0.served_remaining.observe(remaining.as_secs_f64());
    }

    pub fn observe_stale_served(&self, remaining: Duration) {
        self.0.stale_served.inc();
        self.observe_served(remaining);
    }

    pub fn observe_refresh(&self, outcome: &'static str) {
        self.0
            .refreshes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn set_cache_entries(&self, entries: u64) {
        self.0
            .cache_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    pub fn observe_kiam_call(&self, method: &'static str, code: &'static str, elapsed: Duration) {
        self.0
            .kiam_calls
            .get_or_create(&CallLabels { method, code })
            .inc();
        self.0
            .kiam_duration
            .get_or_create(&MethodLabels { method })
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_server_call(&self, method: &'static str, code: &'static str, elapsed: Duration) {
        self.0
            .server_calls
            .get_or_create(&CallLabels { method, code })
            .inc();
        self.0
            .server_duration
            .get_or_create(&MethodLabels { method })
            .observe(elapsed.as_secs_f64());
    }

    pub fn set_api_contact(&self, resource: &'static str, unix_seconds: f64) {
        self.0
            .api_contact
            .get_or_create(&ResourceLabels { resource })
            .set(unix_seconds);
    }

    pub fn observe_container_request(&self, route: &'static str, status: u16, elapsed: Duration) {
        self.0
            .container_requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
        self.0
            .container_request_duration
            .get_or_create(&RouteLabels { route })
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_container_refusal(&self, reason: &'static str) {
        self.0
            .container_refusals
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn observe_denial(&self, reason: &'static str) {
        self.0.denials.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Records what `/readyz` says, for alerting on it.
    pub fn set_ready(&self, ready: bool) {
        self.0.ready.set(i64::from(ready));
    }

    /// The registry in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.0.registry);
        text
    }
}

/// The value of one series (`name{labels}`, exactly as exposed) in `exposition` (what
/// [`Metrics::encode`] writes and `/metrics` serves), 0 if it is absent: for tests and tools
/// that read the metrics back.
pub fn value_in(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerted_series_exist_before_their_first_event() {
        let text = Metrics::default().encode();
        for kind in STS_ERROR_KINDS {
            let series = format!("iamlet_sts_assume_role_errors_total{{kind=\"{kind}\"}} 0");
            assert!(text.contains(&series), "{series} missing:\n{text}");
        }
        assert!(text.contains("iamlet_policy_denials_total{reason=\"not_permitted\"} 0"));
        assert!(text.contains("iamlet_credential_stale_served_total 0"));
        assert!(text.ends_with("# EOF\n"), "not OpenMetrics:\n{text}");
    }

    #[test]
    fn readiness_is_a_gauge() {
        let metrics = Metrics::default();
        metrics.set_ready(true);
        assert!(metrics.encode().contains("iamlet_ready 1\n"));
        metrics.set_ready(false);
        assert!(metrics.encode().contains("iamlet_ready 0\n"));
    }
}
