//! How fresh the pod index is: when iamlet last heard from the API server about pods, and
//! about namespaces. A watch that keeps failing (API server unreachable, token expired, RBAC
//! removed) leaves the index frozen, and a pod IP freed and reused meanwhile could be answered
//! with the old pod's role; so iamlet measures the age of its last good contact and, past
//! `pods.max_staleness`, does what `pods.when_stale` says.
//!
//! Contact is observed where it happens: a layer on the Kubernetes client notes every
//! successful answer to a pod or namespace list or watch, and every frame a watch stream
//! brings (events, bookmarks) or its clean end. A quiet, healthy watch still shows contact,
//! because the watch is renewed at least every quarter of `pods.max_staleness`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use hyper::body::{Body, Frame};
use hyper::{Request, Response};
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::metrics::Metrics;

/// What iamlet does when its view of pods is older than `pods.max_staleness`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenStale {
    /// Answer no pod (503) and report not ready until contact is back: an IP reused while
    /// iamlet could not see it is never answered with the old pod's role.
    #[default]
    Refuse,
    /// Keep answering from the last known pods (available through API outages, at the risk
    /// above); the staleness is still reported.
    Serve,
}

/// The API resources whose contact is tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Pods,
    Namespaces,
}

impl Resource {
    pub fn label(self) -> &'static str {
        match self {
            Resource::Pods => "pods",
            Resource::Namespaces => "namespaces",
        }
    }

    /// The resource a request to the API server is about, if it is one that is tracked: the
    /// cluster-wide list/watch paths the watch loop uses.
    fn of(path: &str) -> Option<Resource> {
        match path {
            "/api/v1/pods" => Some(Resource::Pods),
            "/api/v1/namespaces" => Some(Resource::Namespaces),
            _ => None,
        }
    }
}

/// The last good contact with the API, per resource.
pub struct Freshness {
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    /// Unix milliseconds of the last contact; 0 = never.
    pods: AtomicU64,
    namespaces: AtomicU64,
    /// When tracking began: before any contact, the age counts from here.
    started: SystemTime,
}

impl Freshness {
    pub fn new(clock: Arc<dyn Clock>, metrics: Metrics) -> Freshness {
        let started = clock.now();
        Freshness {
            clock,
            metrics,
            pods: AtomicU64::new(0),
            namespaces: AtomicU64::new(0),
            started,
        }
    }

    /// Notes a good contact about `resource` now.
    pub fn touch(&self, resource: Resource) {
        let now = unix_millis(self.clock.now());
        let slot = match resource {
            Resource::Pods => &self.pods,
            Resource::Namespaces => &self.namespaces,
        };
        slot.fetch_max(now, Ordering::Relaxed);
        self.metrics
            .set_api_contact(resource.label(), now as f64 / 1000.0);
    }

    /// The age of the older of the two: how stale the index may be.
    pub fn age(&self) -> Duration {
        let oldest = self
            .pods
            .load(Ordering::Relaxed)
            .min(self.namespaces.load(Ordering::Relaxed));
        let since = if oldest == 0 {
            self.started
        } else {
            SystemTime::UNIX_EPOCH + Duration::from_millis(oldest)
        };
        self.clock.now().duration_since(since).unwrap_or_default()
    }
}

fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// The staleness policy: how old the view may get (`pods.max_staleness`) and what happens
/// then (`pods.when_stale`).
pub struct Staleness {
    pub freshness: Arc<Freshness>,
    pub max: Duration,
    pub when: WhenStale,
}

impl Staleness {
    /// The view's age, when it is too old to answer from.
    pub fn too_stale(&self) -> Option<Duration> {
        let age = self.freshness.age();
        (self.when == WhenStale::Refuse && age > self.max).then_some(age)
    }

    /// For `/readyz`: `Ok` with the age of the last contact, or `Err` when the view is too
    /// stale to answer from.
    pub fn describe(&self) -> Result<String, String> {
        let age = self.freshness.age();
        let ago = humantime::format_duration(Duration::from_secs(age.as_secs()));
        match (age > self.max, self.when) {
            (false, _) => Ok(format!("last contact with the Kubernetes API {ago} ago")),
            (true, WhenStale::Serve) => Ok(format!(
                "no contact with the Kubernetes API for {ago}; still serving the pods known \
                 before (pods.when_stale = \"serve\")"
            )),
            (true, WhenStale::Refuse) => Err(format!(
                "no contact with the Kubernetes API for {ago}; no pod is served until it is \
                 back (pods.when_stale = \"refuse\")"
            )),
        }
    }

    /// How long a watch may stay open without a word before it is renewed, so that a quiet,
    /// healthy watch shows contact well within `max`: a quarter of it, 1 s to 290 s.
    pub fn watch_timeout_secs(&self) -> u32 {
        u32::try_from((self.max / 4).as_secs().clamp(1, 290)).unwrap_or(290)
    }

    /// Logs once when the view becomes too old and once when contact is back, until `cancel`.
    pub async fn report(&self, cancel: tokio_util::sync::CancellationToken) {
        let mut stale = false;
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let age = self.freshness.age();
            if !stale && age > self.max {
                stale = true;
                match self.when {
                    WhenStale::Refuse => tracing::warn!(
                        age = %humantime::format_duration(Duration::from_secs(age.as_secs())),
                        "no contact with the Kubernetes API past pods.max_staleness: pods are not served until it is back (pods.when_stale = \"refuse\")"
                    ),
                    WhenStale::Serve => tracing::warn!(
                        age = %humantime::format_duration(Duration::from_secs(age.as_secs())),
                        "no contact with the Kubernetes API past pods.max_staleness: still serving the pods known before (pods.when_stale = \"serve\"); a reused IP could get its old pod's role"
                    ),
                }
            } else if stale && age <= self.max {
                stale = false;
                tracing::info!("contact with the Kubernetes API is back");
            }
        }
    }
}

/// The Kubernetes client layer that notes contact in a [`Freshness`].
#[derive(Clone)]
pub struct ContactLayer(pub Arc<Freshness>);

impl<S> tower::Layer<S> for ContactLayer {
    type Service = ContactService<S>;

    fn layer(&self, inner: S) -> ContactService<S> {
        ContactService {
            inner,
            freshness: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ContactService<S> {
    inner: S,
    freshness: Arc<Freshness>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, RequestBody, ResponseBody> tower::Service<Request<RequestBody>> for ContactService<S>
where
    S: tower::Service<Request<RequestBody>, Response = Response<ResponseBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    ResponseBody: 'static,
{
    type Response = Response<ContactBody<ResponseBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(
        &mut self,
        request: Request<RequestBody>,
    ) -> BoxFuture<Result<Self::Response, S::Error>> {
        let resource = Resource::of(request.uri().path());
        let answer = self.inner.call(request);
        let freshness = self.freshness.clone();
        Box::pin(async move {
            let response = answer.await?;
            let resource = resource.filter(|_| response.status().is_success());
            if let Some(resource) = resource {
                freshness.touch(resource);
            }
            Ok(response.map(|inner| ContactBody {
                inner,
                contact: resource.map(|resource| (freshness, resource)),
            }))
        })
    }
}

/// A response body that notes contact with every frame and at its clean end.
pub struct ContactBody<B> {
    inner: B,
    contact: Option<(Arc<Freshness>, Resource)>,
}

impl<B: Body + Unpin> Body for ContactBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Poll::Ready(None | Some(Ok(_))), Some((freshness, resource))) =
            (&polled, &self.contact)
        {
            freshness.touch(*resource);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TokioClock;

    #[tokio::test(start_paused = true)]
    async fn the_age_is_that_of_the_older_contact() {
        let freshness = Freshness::new(Arc::new(TokioClock::default()), Metrics::default());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(freshness.age(), Duration::from_secs(10), "never in contact");
        freshness.touch(Resource::Pods);
        freshness.touch(Resource::Namespaces);
        tokio::time::advance(Duration::from_secs(3)).await;
        freshness.touch(Resource::Pods);
        tokio::time::advance(Duration::from_secs(2)).await;
        // Pods 2 s ago, namespaces 5 s ago: the index is as old as its older half.
        assert_eq!(freshness.age().as_secs(), 5);
    }

    #[test]
    fn only_the_watched_paths_count() {
        assert_eq!(Resource::of("/api/v1/pods"), Some(Resource::Pods));
        assert_eq!(
            Resource::of("/api/v1/namespaces"),
            Some(Resource::Namespaces)
        );
        assert_eq!(
            Resource::of("/apis/events.k8s.io/v1/namespaces/shop/events"),
            None
        );
    }
}
