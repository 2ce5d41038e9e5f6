//! Tokens to pods: [`jwt::verify`] against the cluster's [`Keys`], with verified tokens kept
//! until they expire (bounded), so an SDK asking again with the same token costs a hash and a
//! lookup, not a signature check. The cache is keyed by the token's SHA-256, so the token
//! itself is not kept, and it is checked against the current keys: a token verified under keys
//! the cluster has since dropped is verified again (and refused).
//!
//! Whether the pod is still there is not cached: the caller asks the pod index every time, so
//! a deleted pod's token stops working as soon as the delete is seen.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use super::jwt::{self, BoundPod, Expected, Rejection};
use super::keys::{KeySource, Keys, Trust};
use crate::clock::Clock;

/// Why a token was not turned into a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The token is not good (401).
    Token(Rejection),
    /// The cluster's keys have not been fetched yet (503).
    NoKeys,
}

struct Entry {
    pod: Arc<BoundPod>,
    expires: SystemTime,
    /// The trust generation it was verified under.
    generation: u64,
    /// How long the cache may keep it (until the token expires).
    lifetime: Duration,
}

struct UntilExpiry;

impl moka::Expiry<[u8; 32], Arc<Entry>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        entry: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(entry.lifetime)
    }
}

pub struct Verifier<K> {
    keys: Arc<Keys<K>>,
    audience: String,
    clock: Arc<dyn Clock>,
    verified: moka::sync::Cache<[u8; 32], Arc<Entry>>,
}

impl<K: KeySource> Verifier<K> {
    /// Keeps up to `capacity` verified tokens.
    pub fn new(keys: Arc<Keys<K>>, audience: String, clock: Arc<dyn Clock>, capacity: u64) -> Self {
        Verifier {
            keys,
            audience,
            clock,
            verified: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .expire_after(UntilExpiry)
                .build(),
        }
    }

    /// The pod `token` was issued for, if the token is good now.
    pub async fn verify(&self, token: &str) -> Result<Arc<BoundPod>, Refused> {
        if token.len() > jwt::MAX_TOKEN_BYTES {
            return Err(Refused::Token(Rejection::TooLarge));
        }
        let trust = self.keys.current().ok_or(Refused::NoKeys)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = self.clock.now();
        if let Some(entry) = self.verified.get(&digest)
            && entry.generation == trust.generation
            && now < entry.expires
        {
            return Ok(entry.pod.clone());
        }
        let verified = match self.check(token, &trust, now) {
            Err(Rejection::UnknownKey) => {
                match self.keys.refetch_for_unknown_key(trust.generation).await {
                    Some(newer) => self.check(token, &newer, now).map(|v| (v, newer)),
                    None => Err(Rejection::UnknownKey),
                }
            }
            other => other.map(|v| (v, trust)),
        };
        let (verified, trust) = verified.map_err(Refused::Token)?;
        let pod = Arc::new(verified.pod);
        self.verified.insert(
            digest,
            Arc::new(Entry {
                pod: pod.clone(),
                expires: verified.expires,
                generation: trust.generation,
                lifetime: verified.expires.duration_since(now).unwrap_or_default(),
            }),
        );
        Ok(pod)
    }

    fn check(
        &self,
        token: &str,
        trust: &Trust,
        now: SystemTime,
    ) -> Result<jwt::Verified, Rejection> {
        let expected = Expected {
            issuer: &trust.issuer,
            audience: &self.audience,
        };
        jwt::verify(token, &trust.keys, expected, now)
    }

    /// Verified tokens kept now (for tests and metrics).
    pub fn cached(&self) -> u64 {
        self.verified.run_pending_tasks();
        self.verified.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container_credentials::keys::FetchError;
    use crate::container_credentials::testing::{AUDIENCE, ISSUER, Signer, claims, jwks};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Cluster {
        document: Mutex<Vec<u8>>,
        fetches: AtomicUsize,
    }

    impl KeySource for Arc<Cluster> {
        async fn issuer(&self) -> Result<String, FetchError> {
            Ok(ISSUER.to_owned())
        }
        async fn key_set(&self) -> Result<Vec<u8>, FetchError> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            Ok(self.document.lock().expect("lock").clone())
        }
    }

    /// A clock the test moves.
    struct TestClock(Mutex<SystemTime>);

    impl Clock for TestClock {
        fn now(&self) -> SystemTime {
            *self.0.lock().expect("lock")
        }
    }

    struct World {
        cluster: Arc<Cluster>,
        clock: Arc<TestClock>,
        verifier: Verifier<Arc<Cluster>>,
    }

    fn start() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    async fn world(signers: &[&Signer]) -> World {
        let cluster = Arc::new(Cluster {
            document: Mutex::new(jwks(signers)),
            fetches: AtomicUsize::new(0),
        });
        let keys = Arc::new(Keys::new(cluster.clone(), None));
        keys.refresh().await.expect("keys");
        let clock = Arc::new(TestClock(Mutex::new(start())));
        let verifier = Verifier::new(keys, AUDIENCE.to_owned(), clock.clone(), 100);
        World {
            cluster,
            clock,
            verifier,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_verified_token_is_kept_until_it_expires() {
        let cluster = Signer::cluster();
        let w = world(&[&cluster]).await;
        let token = cluster.sign(&claims(start()));
        assert_eq!(
            w.verifier.verify(&token).await.expect("valid").name,
            "web-0"
        );
        assert_eq!(w.verifier.cached(), 1);
        assert!(w.verifier.verify(&token).await.is_ok());
        assert_eq!(w.verifier.cached(), 1);
        // At its expiry, the kept verification is not used, and the token is refused.
        *w.clock.0.lock().expect("lock") = start() + Duration::from_secs(3600);
        assert_eq!(
            w.verifier.verify(&token).await,
            Err(Refused::Token(Rejection::Expired))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_of_a_rotated_key_verify_after_one_refetch() {
        let old = Signer::cluster();
        let w = world(&[&old]).await;
        let new = Signer::p256("rotated");
        *w.cluster.document.lock().expect("lock") = jwks(&[&old, &new]);
        tokio::time::advance(crate::container_credentials::keys::MIN_REFETCH).await;
        let token = new.sign(&claims(start()));
        assert!(w.verifier.verify(&token).await.is_ok());
        assert_eq!(w.cluster.fetches.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_key_is_not_trusted_from_the_cache() {
        let (a, b) = (Signer::cluster(), Signer::p256("b"));
        let w = world(&[&a, &b]).await;
        let token = b.sign(&claims(start()));
        assert!(w.verifier.verify(&token).await.is_ok());
        *w.cluster.document.lock().expect("lock") = jwks(&[&a]);
        w.verifier.keys.refresh().await.expect("refresh");
        assert_eq!(
            w.verifier.verify(&token).await,
            Err(Refused::Token(Rejection::UnknownKey))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_not_cached_and_the_cache_is_bounded() {
        let cluster = Signer::cluster();
        let w = world(&[&cluster]).await;
        let forged = Signer::attacker(&cluster.kid).sign(&claims(start()));
        for _ in 0..3 {
            assert_eq!(
                w.verifier.verify(&forged).await,
                Err(Refused::Token(Rejection::Signature))
            );
        }
        assert_eq!(w.verifier.cached(), 0);
        for i in 0..300 {
            let mut claims = claims(start());
            claims["jti"] = serde_json::json!(i);
            assert!(w.verifier.verify(&cluster.sign(&claims)).await.is_ok());
        }
        assert!(w.verifier.cached() <= 100, "{}", w.verifier.cached());
    }

    #[tokio::test(start_paused = true)]
    async fn before_the_keys_arrive_nothing_verifies() {
        let cluster = Arc::new(Cluster {
            document: Mutex::new(Vec::new()),
            fetches: AtomicUsize::new(0),
        });
        let keys = Arc::new(Keys::new(cluster, None));
        let clock = Arc::new(TestClock(Mutex::new(start())));
        let verifier = Verifier::new(keys, AUDIENCE.to_owned(), clock, 10);
        let token = Signer::cluster().sign(&claims(start()));
        assert_eq!(verifier.verify(&token).await, Err(Refused::NoKeys));
    }
}
