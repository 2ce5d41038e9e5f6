//! The credential cache: one entry per [`AssumeRoleRequest`], so every pod that STS would see as
//! the same identity shares one session. Concurrent misses for one key wait on a single call.
//!
//! Cached credentials are served only while more than `refresh_before` remains: SDKs misbehave
//! with credentials close to expiry (botocore extends them itself, Java v1 refetches on every call).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::{AssumeRoleRequest, CredentialSource, Credentials, Error};
use crate::clock::Clock;

type Slot = Arc<tokio::sync::Mutex<Option<Credentials>>>;

pub struct Cache<S, C> {
    source: S,
    clock: C,
    refresh_before: Duration,
    slots: Mutex<HashMap<AssumeRoleRequest, Slot>>,
}

impl<S: CredentialSource, C: Clock> Cache<S, C> {
    pub fn new(source: S, clock: C, refresh_before: Duration) -> Self {
        Cache {
            source,
            clock,
            refresh_before,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Credentials for `request`, from the cache while they are fresh, else from the source.
    pub async fn get(&self, request: &AssumeRoleRequest) -> Result<Credentials, Error> {
        let slot = self.slot(request);
        // Holding the slot's lock across the fetch is the single flight: later callers for the
        // same key wait here and then find the fresh entry.
        let mut entry = slot.lock().await;
        if let Some(cached) = entry.as_ref()
            && cached.remaining(self.clock.now()) > self.refresh_before
        {
            return Ok(cached.clone());
        }
        let fresh = self.source.assume_role(request).await?;
        *entry = Some(fresh.clone());
        Ok(fresh)
    }

    fn slot(&self, request: &AssumeRoleRequest) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        // Clone the key only when it is new: this runs on every credential request.
        if let Some(slot) = slots.get(request) {
            return slot.clone();
        }
        slots.entry(request.clone()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::policy::{RoleArn, SessionName};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Clone)]
    struct CountingSource {
        calls: Arc<AtomicUsize>,
        clock: ManualClock,
        lifetime: Duration,
    }

    impl CredentialSource for CountingSource {
        async fn assume_role(&self, _: &AssumeRoleRequest) -> Result<Credentials, Error> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            let now = self.clock.now();
            Ok(Credentials {
                access_key_id: format!("AKID{n}"),
                secret_access_key: "secret".into(),
                session_token: "token".into(),
                expiration: now + self.lifetime,
                last_updated: now,
            })
        }
    }

    fn request(role: &str) -> AssumeRoleRequest {
        AssumeRoleRequest {
            role_arn: RoleArn::parse(&format!("arn:aws:iam::123456789012:role/{role}"))
                .expect("valid arn"),
            session_name: SessionName::sanitize("ns.sa"),
            external_id: None,
        }
    }

    fn cache(clock: &ManualClock) -> (Cache<CountingSource, ManualClock>, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let source = CountingSource {
            calls: calls.clone(),
            clock: clock.clone(),
            lifetime: Duration::from_secs(3600),
        };
        let cache = Cache::new(source, clock.clone(), Duration::from_secs(1800));
        (cache, calls)
    }

    #[tokio::test]
    async fn same_identity_shares_one_session() {
        let clock = ManualClock::default();
        let (cache, calls) = cache(&clock);
        let first = cache.get(&request("a")).await.expect("credentials");
        let second = cache.get(&request("a")).await.expect("credentials");
        assert_eq!(first.access_key_id, second.access_key_id);
        cache.get(&request("b")).await.expect("credentials");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn concurrent_misses_make_one_call() {
        let clock = ManualClock::default();
        let (cache, calls) = cache(&clock);
        let cache = Arc::new(cache);
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(&request("a")).await })
            })
            .collect();
        for task in tasks {
            task.await.expect("task").expect("credentials");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn never_serves_credentials_inside_the_refresh_window() {
        let clock = ManualClock::default();
        let (cache, calls) = cache(&clock);
        let first = cache.get(&request("a")).await.expect("credentials");
        clock.advance(Duration::from_secs(29 * 60));
        let still = cache.get(&request("a")).await.expect("credentials");
        assert_eq!(still.access_key_id, first.access_key_id);
        clock.advance(Duration::from_secs(2 * 60));
        let renewed = cache.get(&request("a")).await.expect("credentials");
        assert_ne!(renewed.access_key_id, first.access_key_id);
        assert!(renewed.remaining(clock.now()) > Duration::from_secs(1800));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
