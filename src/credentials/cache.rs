//! The credential cache: one entry per [`AssumeRoleRequest`] (role, session name, external id,
//! session tags), so every pod that STS would see as the same identity shares one session.
//!
//! - **Prefetch**: [`Cache::sync`] is told the keys that live pods need (the broker follows the
//!   pod index); a new key is fetched in the background at once, so a pod's first request is
//!   a hit. A key no pod needs any more stops refreshing, but its credentials are kept while
//!   they are still servable: a pod of that identity arriving meanwhile (churn, a rollout
//!   replacing the last pod) is served them without a call; after that the key is evicted.
//! - **Refresh ahead**: each entry's task refreshes [`REFRESH_LEAD`] (at most a tenth of the
//!   margin) before only `refresh_before` is left, so a served credential keeps more than
//!   `refresh_before` in normal operation. The lead is small and fixed: every second of it is
//!   lost from each session's servable time, and a random one (the jitter this replaced, up to
//!   3 minutes) cost a call per identity every few hours. Keys fetched together come due
//!   together, but no more of them than the rate limiter let through together.
//! - **Single flight**: a request and the refresh task of one key take the entry's lock, so
//!   concurrent misses make one STS call.
//! - **STS trouble**: on throttling, 5xx or timeouts the last good credentials are served until
//!   they truly expire, while the task retries with exponential backoff and jitter.
//!   A refusal (AccessDenied…) is kept and answered without asking STS again until pods or
//!   policy change ([`Cache::sync`] moves the generation on), and no sooner than the same
//!   backoff after it: where pods change all the time (a busy cluster, for `iamlet server`), a
//!   refused identity would otherwise be asked at every sync, up to ten times a second, and
//!   take the rate limiter's tokens from the refreshes.
//! - **Rate limit**: every STS call takes a token from the [`RateLimiter`]; requests first.
//! - **Hits take no lock**: an entry's servable credentials are also published outside its
//!   lock, so a hit reads them without waiting behind a refresh; and whoever asks for a key
//!   on every request (the broker, once per pod) can [`Cache::hold`] its entry rather than
//!   look the key up each time.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rand::Rng;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::limiter::{Priority, RateLimiter};
use super::{AssumeRoleRequest, CredentialSource, Credentials, Error};
use crate::clock::Clock;
use crate::metrics::Metrics;

/// Largest number of distinct identities kept (bounded memory).
const MAX_ENTRIES: u64 = 100_000;
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(120);
/// How long before the refresh point a refresh starts: time for STS to answer (tens of
/// milliseconds within a region). A request arriving while a slower answer is still out waits
/// for the rest of it, and gets the new credentials.
const REFRESH_LEAD: Duration = Duration::from_secs(1);

struct State {
    credentials: Option<Arc<Credentials>>,
    /// A refusal, and the generation it was given in.
    refused: Option<(Error, u64)>,
    failures: u32,
    /// When the refresh task should next call STS (backoff jitter fixed when set).
    due: SystemTime,
}

impl Default for State {
    fn default() -> Self {
        State {
            credentials: None,
            refused: None,
            failures: 0,
            due: SystemTime::UNIX_EPOCH,
        }
    }
}

struct Entry {
    state: tokio::sync::Mutex<State>,
    stop: CancellationToken,
    /// Whether a pod needs this identity now ([`Cache::sync`]); an unwanted entry is not
    /// refreshed.
    wanted: AtomicBool,
    /// Wakes a refresh task waiting for the entry to be wanted again.
    wanted_again: Notify,
    /// The credentials in `state`, published for hits that take no lock; written with `state`
    /// held.
    published: ArcSwapOption<Credentials>,
}

impl Entry {
    /// Ends the entry's life when it leaves the cache: its refresh task stops, and its
    /// credentials are no longer published, so that whoever still holds it looks the key up
    /// again and is answered what the cache answers now (a refusal included) rather than what
    /// this entry last had.
    fn retire(&self) {
        self.stop.cancel();
        self.published.store(None);
    }
}

/// An entry held by whoever asks for its key often, and the key.
pub struct Held {
    entry: Arc<Entry>,
    request: AssumeRoleRequest,
}

struct Inner<S, C> {
    source: S,
    clock: C,
    refresh_before: Duration,
    limiter: RateLimiter,
    metrics: Metrics,
    entries: moka::sync::Cache<AssumeRoleRequest, Arc<Entry>>,
    generation: watch::Sender<u64>,
}

/// Cheap to clone; clones share the entries.
pub struct Cache<S, C> {
    inner: Arc<Inner<S, C>>,
}

impl<S, C> Clone for Cache<S, C> {
    fn clone(&self) -> Self {
        Cache {
            inner: self.inner.clone(),
        }
    }
}

impl<S: CredentialSource, C: Clock> Cache<S, C> {
    pub fn new(
        source: S,
        clock: C,
        refresh_before: Duration,
        limiter: RateLimiter,
        metrics: Metrics,
    ) -> Self {
        let entries = moka::sync::Cache::builder()
            .max_capacity(MAX_ENTRIES)
            .eviction_listener(|_key, entry: Arc<Entry>, _cause| entry.retire())
            .build();
        Cache {
            inner: Arc::new(Inner {
                source,
                clock,
                refresh_before,
                limiter,
                metrics,
                entries,
                generation: watch::Sender::new(0),
            }),
        }
    }

    /// Credentials for `request`, for a pod waiting on them.
    /// Shared, not copied: a hit costs a reference count, not a copy of the token.
    pub async fn get(&self, request: &AssumeRoleRequest) -> Result<Arc<Credentials>, Error> {
        let entry = self.entry(request);
        self.get_entry(&entry, request).await
    }

    /// The entry for `request`, to be asked with [`Cache::get_held`] from now on.
    pub fn hold(&self, request: &AssumeRoleRequest) -> Held {
        Held {
            entry: self.entry(request),
            request: request.clone(),
        }
    }

    /// As [`Cache::get`] for the held entry's key, without looking the key up. Should the
    /// entry have been evicted meanwhile, the key is looked up anew.
    pub async fn get_held(&self, held: &Held) -> Result<Arc<Credentials>, Error> {
        if let Some(hit) = self.hit(&held.entry) {
            return Ok(hit);
        }
        if held.entry.stop.is_cancelled() {
            return self.get(&held.request).await;
        }
        Box::pin(self.get_locked(&held.entry, &held.request)).await
    }

    /// The entry's published credentials, if they may be served now.
    fn hit(&self, entry: &Entry) -> Option<Arc<Credentials>> {
        let inner = &self.inner;
        let now = inner.clock.now();
        let published = entry.published.load();
        let published = published.as_ref()?;
        let remaining = published.remaining(now);
        if remaining > inner.refresh_before {
            inner.metrics.observe_cache_hit(remaining);
            Some(published.clone())
        } else {
            None
        }
    }

    async fn get_entry(
        &self,
        entry: &Entry,
        request: &AssumeRoleRequest,
    ) -> Result<Arc<Credentials>, Error> {
        if let Some(hit) = self.hit(entry) {
            return Ok(hit);
        }
        // Boxed: waiting for STS makes a large future, which a hit should not carry (or copy).
        Box::pin(self.get_locked(entry, request)).await
    }

    /// [`Cache::get`] past the published credentials: under the entry's lock, calling STS if
    /// need be.
    async fn get_locked(
        &self,
        entry: &Entry,
        request: &AssumeRoleRequest,
    ) -> Result<Arc<Credentials>, Error> {
        let inner = &self.inner;
        let mut state = entry.state.lock().await;
        let now = inner.clock.now();
        if let Some(cached) = &state.credentials
            && cached.remaining(now) > inner.refresh_before
        {
            inner.metrics.observe_cache_hit(cached.remaining(now));
            return Ok(cached.clone());
        }
        if let Some((refusal, generation)) = &state.refused
            && (*generation == *inner.generation.borrow() || now < state.due)
        {
            return Err(refusal.clone());
        }
        inner.metrics.observe_cache_miss();
        inner.limiter.acquire(Priority::Request).await;
        let fetched = inner.source.assume_role(request).await;
        match inner.store(entry, &mut state, fetched) {
            Ok(fresh) => {
                inner
                    .metrics
                    .observe_served(fresh.remaining(inner.clock.now()));
                Ok(fresh)
            }
            Err(err @ Error::Unavailable { .. }) => match &state.credentials {
                // STS is in trouble: the last good credentials, while they last.
                Some(last) if last.remaining(inner.clock.now()) > Duration::ZERO => {
                    inner
                        .metrics
                        .observe_stale_served(last.remaining(inner.clock.now()));
                    Ok(last.clone())
                }
                _ => Err(err),
            },
            Err(err) => Err(err),
        }
    }

    /// When the cached credentials for `request` expire, if any are cached (for `iamlet
    /// status`). Never fetches, and never creates an entry; `None` while a fetch holds it.
    pub fn expiry(&self, request: &AssumeRoleRequest) -> Option<SystemTime> {
        let entry = self.inner.entries.get(request)?;
        let state = entry.state.try_lock().ok()?;
        state.credentials.as_ref().map(|c| c.expiration)
    }

    /// How many identities the cache holds that STS has not been asked for yet (whatever its
    /// answer will be): after a start, `/readyz` waits for none, so that a restarted iamlet is
    /// warm before it says it is ready. An identity being fetched right now counts.
    pub fn unfetched(&self) -> usize {
        self.inner
            .entries
            .iter()
            .filter(|(_, entry)| {
                entry.state.try_lock().map_or(true, |state| {
                    state.credentials.is_none() && state.refused.is_none() && state.failures == 0
                })
            })
            .count()
    }

    /// Makes the cache follow `wanted`: new keys are fetched in the background now, keys no
    /// longer wanted stop refreshing and are evicted once their credentials are no longer
    /// servable (at once if they hold none), and refusals may be retried (pods or policy
    /// changed).
    pub fn sync(&self, wanted: &HashSet<AssumeRoleRequest>) {
        self.inner
            .generation
            .send_modify(|generation| *generation += 1);
        let now = self.inner.clock.now();
        let spent: Vec<AssumeRoleRequest> = self
            .inner
            .entries
            .iter()
            .filter(|(key, _)| !wanted.contains(&**key))
            .filter(|(_, entry)| {
                entry.wanted.store(false, Ordering::Release);
                // A fetch in flight holds the lock: decide at the next sync.
                entry.state.try_lock().is_ok_and(|state| {
                    state
                        .credentials
                        .as_ref()
                        .is_none_or(|c| c.remaining(now) <= self.inner.refresh_before)
                })
            })
            .map(|(key, _)| (*key).clone())
            .collect();
        for key in spent {
            self.inner.entries.invalidate(&key);
        }
        for key in wanted {
            let entry = self.entry(key);
            if !entry.wanted.swap(true, Ordering::AcqRel) {
                entry.wanted_again.notify_one();
            }
        }
        self.inner.entries.run_pending_tasks();
        self.inner
            .metrics
            .set_cache_entries(self.inner.entries.entry_count());
    }

    /// The entry for `request`, created (with its refresh task) on first use.
    fn entry(&self, request: &AssumeRoleRequest) -> Arc<Entry> {
        self.inner.entries.get_with_by_ref(request, || {
            let entry = Arc::new(Entry {
                state: tokio::sync::Mutex::new(State::default()),
                stop: CancellationToken::new(),
                wanted: AtomicBool::new(true),
                wanted_again: Notify::new(),
                published: ArcSwapOption::empty(),
            });
            tokio::spawn(supervised(
                self.inner.clone(),
                request.clone(),
                entry.clone(),
            ));
            entry
        })
    }
}

impl<S: CredentialSource, C: Clock> Inner<S, C> {
    /// Records the outcome of an STS call in `state`, and when the next one is due.
    fn store(
        &self,
        entry: &Entry,
        state: &mut State,
        fetched: Result<Credentials, Error>,
    ) -> Result<Arc<Credentials>, Error> {
        let now = self.clock.now();
        match fetched {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                // Refresh just before only `refresh_before` is left.
                let margin = fresh.remaining(now).saturating_sub(self.refresh_before);
                state.due = now + margin - REFRESH_LEAD.min(margin / 10);
                state.credentials = Some(fresh.clone());
                entry.published.store(Some(fresh.clone()));
                if entry.stop.is_cancelled() {
                    // Evicted while STS answered: a holder must look the key up again, not
                    // be served from here (see `Entry::retire`).
                    entry.published.store(None);
                }
                state.refused = None;
                state.failures = 0;
                Ok(fresh)
            }
            Err(refusal @ Error::Refused { .. }) => {
                // Logged here, once per answer from STS: the requests it is then served to
                // (an SDK retrying, say) log it at `debug` only.
                tracing::warn!(error = %refusal, "STS refused AssumeRole");
                // Authoritative: the old credentials are not served any more either.
                state.credentials = None;
                entry.published.store(None);
                state.refused = Some((refusal.clone(), *self.generation.borrow()));
                state.failures = state.failures.saturating_add(1);
                state.due = now + backoff(state.failures);
                Err(refusal)
            }
            Err(err) => {
                state.failures = state.failures.saturating_add(1);
                state.due = now + backoff(state.failures);
                Err(err)
            }
        }
    }

    /// Time until the refresh task should call STS for this entry.
    fn until_due(&self, state: &State) -> Duration {
        state
            .due
            .duration_since(self.clock.now())
            .unwrap_or_default()
    }
}

/// Exponential backoff with ±20% jitter: 1 s, 2 s, 4 s… up to two minutes.
fn backoff(failures: u32) -> Duration {
    let base = BACKOFF_FIRST
        .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(16)))
        .min(BACKOFF_MAX);
    base.mul_f64(rand::rng().random_range(0.8..1.2))
}

/// Runs an entry's refresh task; should it ever panic, the entry is dropped (its stop token
/// fires through the eviction listener) rather than left unrefreshed, and the next request or
/// prefetch for the key starts a fresh one. Restarting is safe here: an entry holds nothing
/// that cannot be fetched again.
async fn supervised<S: CredentialSource, C: Clock>(
    inner: Arc<Inner<S, C>>,
    key: AssumeRoleRequest,
    entry: Arc<Entry>,
) {
    use futures::FutureExt;
    let outcome = std::panic::AssertUnwindSafe(refresh(inner.clone(), key.clone(), entry))
        .catch_unwind()
        .await;
    if outcome.is_err() {
        tracing::error!(role = %key.role_arn, "a credential refresh task panicked; the entry is dropped and will be fetched anew");
        inner.entries.invalidate(&key);
    }
}

/// An entry's life: fetch now (prefetch), then refresh ahead of expiry, until evicted.
async fn refresh<S: CredentialSource, C: Clock>(
    inner: Arc<Inner<S, C>>,
    key: AssumeRoleRequest,
    entry: Arc<Entry>,
) {
    let mut generations = inner.generation.subscribe();
    let mut delay = Duration::ZERO;
    loop {
        tokio::select! {
            () = entry.stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        let refused = {
            let state = entry.state.lock().await;
            delay = inner.until_due(&state);
            state
                .refused
                .as_ref()
                .is_some_and(|(_, generation)| *generation == *generations.borrow_and_update())
        };
        if refused {
            // Refused: ask STS again only once pods or policy have changed.
            tokio::select! {
                () = entry.stop.cancelled() => return,
                changed = generations.changed() => if changed.is_err() { return },
            }
            delay = Duration::ZERO;
            continue;
        }
        if !delay.is_zero() {
            continue;
        }
        if !entry.wanted.load(Ordering::Acquire) {
            // No pod needs it: no call until one does (the entry is evicted meanwhile once
            // its credentials are spent).
            tokio::select! {
                () = entry.stop.cancelled() => return,
                () = entry.wanted_again.notified() => {}
            }
            continue;
        }
        // Take a token before the lock: a request for this key must not queue behind us.
        tokio::select! {
            () = entry.stop.cancelled() => return,
            () = inner.limiter.acquire(Priority::Background) => {}
        }
        let mut state = entry.state.lock().await;
        if !inner.until_due(&state).is_zero() && state.refused.is_none() {
            // A request refreshed it while we waited for the token.
            delay = inner.until_due(&state);
            continue;
        }
        let fetched = inner.source.assume_role(&key).await;
        let outcome = match &fetched {
            Ok(_) => "ok",
            Err(Error::Refused { .. }) => "refused",
            Err(Error::Unavailable { .. }) => "unavailable",
        };
        inner.metrics.observe_refresh(outcome);
        match inner.store(&entry, &mut state, fetched) {
            // Logged by `store`.
            Ok(_) | Err(Error::Refused { .. }) => {}
            Err(err) => {
                tracing::warn!(error = %err, failures = state.failures, "background credential refresh failed");
            }
        }
        delay = inner.until_due(&state);
    }
}

#[cfg(test)]
mod tests;
