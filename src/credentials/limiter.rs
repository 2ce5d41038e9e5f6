//! The STS rate limit: a token bucket (`sts_qps` refill, `sts_burst` capacity) that no rollout
//! or mass refresh can exceed. A request a pod is waiting on goes before background work
//! (prefetch, refresh): background callers wait while any request is waiting.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Who is asking: a pod waiting on its answer, or the cache working ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Request,
    Background,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
    requests_waiting: usize,
}

pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
}

impl RateLimiter {
    pub fn new(per_second: f64, burst: u32) -> RateLimiter {
        let burst = f64::from(burst.max(1));
        RateLimiter {
            per_second: per_second.max(0.001),
            burst,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                refilled: Instant::now(),
                requests_waiting: 0,
            }),
        }
    }

    /// Waits for a token. Dropping the future while it waits (the pod hung up, the request
    /// timed out) withdraws its place in the queue.
    pub async fn acquire(&self, priority: Priority) {
        let mut waiting: Option<RequestWaiting<'_>> = None;
        loop {
            let wait = {
                let mut bucket = self.lock();
                let now = Instant::now();
                let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
                bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
                bucket.refilled = now;
                let yield_to_requests =
                    priority == Priority::Background && bucket.requests_waiting > 0;
                if !yield_to_requests && bucket.tokens >= 1.0 {
                    bucket.tokens -= 1.0;
                    // `waiting`, if any, leaves the queue as it drops, after the lock.
                    return;
                }
                if priority == Priority::Request && waiting.is_none() {
                    bucket.requests_waiting += 1;
                    waiting = Some(RequestWaiting { limiter: self });
                }
                let missing = (1.0 - bucket.tokens).max(0.0);
                Duration::from_secs_f64((missing / self.per_second).max(0.001))
            };
            tokio::time::sleep(wait).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.bucket.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A request counted in `requests_waiting`; uncounted exactly once, when it gets its token or
/// when its future is dropped, so a request that gave up never holds background work back.
struct RequestWaiting<'a> {
    limiter: &'a RateLimiter,
}

impl Drop for RequestWaiting<'_> {
    fn drop(&mut self) {
        let mut bucket = self.limiter.lock();
        bucket.requests_waiting = bucket.requests_waiting.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn never_more_than_burst_plus_rate() {
        let limiter = Arc::new(RateLimiter::new(10.0, 5));
        let started = Instant::now();
        let times = Arc::new(Mutex::new(Vec::new()));
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let limiter = limiter.clone();
                let times = times.clone();
                tokio::spawn(async move {
                    limiter.acquire(Priority::Background).await;
                    times.lock().expect("times").push(started.elapsed());
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        let times = times.lock().expect("times").clone();
        // In any window of one second: at most burst + rate.
        for start in &times {
            let in_window = times
                .iter()
                .filter(|t| **t >= *start && **t < *start + Duration::from_secs(1))
                .count();
            assert!(in_window <= 15, "{in_window} acquisitions within a second");
        }
        // And it is not slower than the rate allows: 95 tokens after the burst at 10/s.
        assert!(
            started.elapsed() <= Duration::from_millis(9_600),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_request_goes_before_background_work() {
        let limiter = Arc::new(RateLimiter::new(1.0, 1));
        limiter.acquire(Priority::Background).await; // empty the bucket
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..3 {
            let (limiter, order) = (limiter.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                limiter.acquire(Priority::Background).await;
                order.lock().expect("order").push(format!("background-{i}"));
            }));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (l, o) = (limiter.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            l.acquire(Priority::Request).await;
            o.lock().expect("order").push("request".to_owned());
        }));
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(order.lock().expect("order")[0], "request");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_gives_up_does_not_hold_background_work_back() {
        let limiter = RateLimiter::new(1.0, 1);
        limiter.acquire(Priority::Background).await; // empty the bucket
        // A pod's request waits for a token, then its SDK hangs up: the future is dropped.
        let gave_up = tokio::time::timeout(
            Duration::from_millis(100),
            limiter.acquire(Priority::Request),
        )
        .await;
        assert!(
            gave_up.is_err(),
            "the request should still have been waiting"
        );
        // Background work gets the next token (within a second at 1/s), not never.
        let background = tokio::time::timeout(
            Duration::from_secs(5),
            limiter.acquire(Priority::Background),
        )
        .await;
        assert!(
            background.is_ok(),
            "background work waits forever behind a request that left"
        );
    }
}
