//! The cluster's service-account signing keys and issuer, as the API server publishes them
//! (`/openid/v1/jwks`, `/.well-known/openid-configuration`), read with iamlet's own Kubernetes
//! client. They are fetched at start, again every `jwks_refresh_interval` (so a key the
//! cluster drops stops being trusted), and at once when a token names a key id that is not in
//! the set (a key rotation), at most once per [`MIN_REFETCH`]: made-up key ids cost the API
//! server one request per 10 s, however many arrive.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::jwt::KeySet;

/// Fewest seconds between two fetches caused by unknown key ids.
pub const MIN_REFETCH: Duration = Duration::from_secs(10);
/// Longest wait for one fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

const JWKS_PATH: &str = "/openid/v1/jwks";
const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// Where the cluster's keys come from: the API server, or a fake in tests.
pub trait KeySource: Send + Sync + 'static {
    /// The issuer the cluster writes in its tokens' `iss`.
    fn issuer(&self) -> impl Future<Output = Result<String, FetchError>> + Send;
    /// The JWKS document.
    fn key_set(&self) -> impl Future<Output = Result<Vec<u8>, FetchError>> + Send;
}

/// Why the keys or the issuer could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("GET {path} from the API server failed: {message}")]
    Request { path: &'static str, message: String },
    #[error("{path}: {message}")]
    Document { path: &'static str, message: String },
    #[error("the key set has no key iamlet can verify with (RS256, ES256, ES384)")]
    NoUsableKey,
    #[error("the API server did not answer within {}s", FETCH_TIMEOUT.as_secs())]
    Timeout,
}

/// The API server, asked with iamlet's own client (RBAC: `get` on both paths).
pub struct ApiServerKeys(pub kube::Client);

impl ApiServerKeys {
    async fn get(&self, path: &'static str) -> Result<String, FetchError> {
        let request = hyper::http::Request::get(path)
            .body(Vec::new())
            .map_err(|err| FetchError::Request {
                path,
                message: err.to_string(),
            })?;
        self.0
            .request_text(request)
            .await
            .map_err(|err| FetchError::Request {
                path,
                message: err.to_string(),
            })
    }
}

impl KeySource for ApiServerKeys {
    async fn issuer(&self) -> Result<String, FetchError> {
        #[derive(serde::Deserialize)]
        struct Discovery {
            issuer: String,
        }
        let text = self.get(DISCOVERY_PATH).await?;
        let discovery: Discovery =
            serde_json::from_str(&text).map_err(|err| FetchError::Document {
                path: DISCOVERY_PATH,
                message: err.to_string(),
            })?;
        Ok(discovery.issuer)
    }

    async fn key_set(&self) -> Result<Vec<u8>, FetchError> {
        Ok(self.get(JWKS_PATH).await?.into_bytes())
    }
}

/// What tokens are checked against now.
#[derive(Debug, PartialEq, Eq)]
pub struct Trust {
    pub issuer: String,
    pub keys: KeySet,
    /// Moves on whenever the issuer or the keys change, so that tokens verified under the
    /// old ones are checked again.
    pub generation: u64,
}

/// The keys trusted now, kept current.
pub struct Keys<K> {
    source: K,
    /// `container_credentials.issuer`; `None` = the API server's discovery document says.
    configured_issuer: Option<String>,
    current: RwLock<Option<Arc<Trust>>>,
    /// One fetch at a time; when the last one started (for the unknown-key-id rate limit).
    fetching: tokio::sync::Mutex<Option<Instant>>,
    last_error: Mutex<Option<FetchError>>,
}

impl<K: KeySource> Keys<K> {
    pub fn new(source: K, configured_issuer: Option<String>) -> Self {
        Keys {
            source,
            configured_issuer,
            current: RwLock::new(None),
            fetching: tokio::sync::Mutex::new(None),
            last_error: Mutex::new(None),
        }
    }

    /// The keys and issuer trusted now; `None` until the first fetch succeeds.
    pub fn current(&self) -> Option<Arc<Trust>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `Ok` once keys are in; else why not (for `/readyz`).
    pub fn readiness(&self) -> Result<(), String> {
        if self.current().is_some() {
            return Ok(());
        }
        let last_error = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Err(match last_error {
            Some(err) => format!("the cluster's service-account keys cannot be fetched: {err}"),
            None => "the cluster's service-account keys have not been fetched yet".to_owned(),
        })
    }

    /// Fetches now, whatever the rate limit says (start-up and the periodic refresh).
    pub async fn refresh(&self) -> Result<Arc<Trust>, FetchError> {
        let mut last = self.fetching.lock().await;
        *last = Some(Instant::now());
        self.fetch().await
    }

    /// A token named a key id that is not in the set seen at `generation`: fetches again,
    /// unless another request just did (then its result is used) or the last fetch is less
    /// than [`MIN_REFETCH`] ago. Returns newer keys, if there are any.
    pub async fn refetch_for_unknown_key(&self, generation: u64) -> Option<Arc<Trust>> {
        let mut last = self.fetching.lock().await;
        if let Some(trust) = self.current()
            && trust.generation != generation
        {
            return Some(trust);
        }
        if last.is_some_and(|at| at.elapsed() < MIN_REFETCH) {
            return None;
        }
        *last = Some(Instant::now());
        let trust = self.fetch().await.ok()?;
        (trust.generation != generation).then_some(trust)
    }

    /// Fetches the issuer and keys and swaps them in. Call with `fetching` held.
    async fn fetch(&self) -> Result<Arc<Trust>, FetchError> {
        let fetched = tokio::time::timeout(FETCH_TIMEOUT, async {
            let issuer = match &self.configured_issuer {
                Some(issuer) => issuer.clone(),
                None => self.source.issuer().await?,
            };
            let document = self.source.key_set().await?;
            let keys = KeySet::parse(&document).map_err(|err| FetchError::Document {
                path: JWKS_PATH,
                message: err.to_string(),
            })?;
            if keys.is_empty() {
                return Err(FetchError::NoUsableKey);
            }
            Ok((issuer, keys))
        })
        .await
        .unwrap_or(Err(FetchError::Timeout));
        let (issuer, keys) = match fetched {
            Ok(fetched) => fetched,
            Err(err) => {
                *self
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(err.clone());
                return Err(err);
            }
        };
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(trust) = current.as_ref()
            && trust.issuer == issuer
            && trust.keys == keys
        {
            return Ok(trust.clone());
        }
        let generation = current.as_ref().map_or(1, |trust| trust.generation + 1);
        tracing::info!(
            issuer = issuer.as_str(),
            key_ids = ?keys.kids(),
            "trusting the cluster's service-account keys"
        );
        let trust = Arc::new(Trust {
            issuer,
            keys,
            generation,
        });
        *current = Some(trust.clone());
        Ok(trust)
    }

    /// Keeps the keys current until `cancel`: every `interval`, and with backoff (1 s
    /// doubling to a minute, never longer than `interval`) while fetches fail.
    pub async fn run(&self, interval: Duration, cancel: CancellationToken) {
        let mut failures: u32 = 0;
        loop {
            let delay = match self.refresh().await {
                Ok(_) => {
                    if failures > 0 {
                        tracing::info!("the cluster's service-account keys can be fetched again");
                    }
                    failures = 0;
                    interval
                }
                Err(err) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %err, failures, "cannot fetch the cluster's service-account keys; tokens are checked against the last ones fetched, if any");
                    BACKOFF_FIRST
                        .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(16)))
                        .min(BACKOFF_MAX)
                        .min(interval)
                }
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container_credentials::testing::{ISSUER, Signer, jwks};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A cluster whose published keys the test changes, counting fetches.
    #[derive(Default)]
    struct FakeCluster {
        document: Mutex<Vec<u8>>,
        fail: Mutex<bool>,
        fetches: AtomicUsize,
    }

    impl FakeCluster {
        fn publish(&self, document: Vec<u8>) {
            *self.document.lock().expect("lock") = document;
        }
    }

    impl KeySource for Arc<FakeCluster> {
        async fn issuer(&self) -> Result<String, FetchError> {
            Ok(ISSUER.to_owned())
        }

        async fn key_set(&self) -> Result<Vec<u8>, FetchError> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            if *self.fail.lock().expect("lock") {
                return Err(FetchError::Request {
                    path: JWKS_PATH,
                    message: "connection refused".into(),
                });
            }
            Ok(self.document.lock().expect("lock").clone())
        }
    }

    fn keys_of(cluster: &Arc<FakeCluster>) -> Keys<Arc<FakeCluster>> {
        Keys::new(cluster.clone(), None)
    }

    #[tokio::test(start_paused = true)]
    async fn an_unknown_key_id_refetches_at_most_once_per_interval() {
        let cluster = Arc::new(FakeCluster::default());
        let old = Signer::cluster();
        cluster.publish(jwks(&[&old]));
        let keys = keys_of(&cluster);
        let first = keys.refresh().await.expect("keys");
        assert_eq!(first.generation, 1);
        assert_eq!(cluster.fetches.load(Ordering::SeqCst), 1);

        // Too soon after the last fetch: no request to the API server.
        assert!(keys.refetch_for_unknown_key(1).await.is_none());
        assert_eq!(cluster.fetches.load(Ordering::SeqCst), 1);

        // The cluster rotates; a token with the new key id arrives later.
        let new = Signer::p256("rotated");
        cluster.publish(jwks(&[&old, &new]));
        tokio::time::advance(MIN_REFETCH).await;
        let rotated = keys.refetch_for_unknown_key(1).await.expect("new keys");
        assert_eq!(rotated.generation, 2);
        assert_eq!(rotated.keys.kids(), ["cluster-rsa", "rotated"]);
        // A request that saw the old set learns of the new one without another fetch.
        assert_eq!(
            keys.refetch_for_unknown_key(1).await.map(|t| t.generation),
            Some(2)
        );
        assert_eq!(cluster.fetches.load(Ordering::SeqCst), 2);

        // A flood of made-up key ids: one fetch per interval, no new generation.
        for _ in 0..100 {
            assert!(keys.refetch_for_unknown_key(2).await.is_none());
        }
        tokio::time::advance(MIN_REFETCH).await;
        assert!(keys.refetch_for_unknown_key(2).await.is_none());
        assert_eq!(cluster.fetches.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn periodic_refresh_drops_removed_keys_and_survives_failures() {
        let cluster = Arc::new(FakeCluster::default());
        let (a, b) = (Signer::cluster(), Signer::p256("b"));
        cluster.publish(jwks(&[&a, &b]));
        let keys = Arc::new(keys_of(&cluster));
        assert!(keys.readiness().is_err());
        let cancel = CancellationToken::new();
        let runner = {
            let (keys, cancel) = (keys.clone(), cancel.clone());
            tokio::spawn(async move { keys.run(Duration::from_secs(600), cancel).await })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            keys.current().expect("keys").keys.kids(),
            ["b", "cluster-rsa"]
        );
        assert!(keys.readiness().is_ok());

        // The cluster drops key b: gone after the next refresh.
        cluster.publish(jwks(&[&a]));
        tokio::time::sleep(Duration::from_secs(601)).await;
        let trust = keys.current().expect("keys");
        assert_eq!(trust.keys.kids(), ["cluster-rsa"]);
        assert_eq!(trust.generation, 2);

        // The API server goes away: the last keys stay, and fetches back off.
        *cluster.fail.lock().expect("lock") = true;
        let before = cluster.fetches.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(600 + 1 + 2 + 4)).await;
        assert_eq!(cluster.fetches.load(Ordering::SeqCst), before + 4);
        assert_eq!(keys.current().expect("kept").generation, 2);

        // An empty set never replaces a good one.
        *cluster.fail.lock().expect("lock") = false;
        cluster.publish(br#"{"keys":[]}"#.to_vec());
        assert_eq!(keys.refresh().await, Err(FetchError::NoUsableKey));
        assert_eq!(keys.current().expect("kept").keys.kids(), ["cluster-rsa"]);
        cancel.cancel();
        runner.await.expect("runner");
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_says_why_keys_are_missing() {
        let cluster = Arc::new(FakeCluster::default());
        *cluster.fail.lock().expect("lock") = true;
        let keys = keys_of(&cluster);
        assert!(keys.refresh().await.is_err());
        let why = keys.readiness().expect_err("not ready");
        assert!(why.contains("connection refused"), "{why}");
    }
}
