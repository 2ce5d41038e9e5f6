//! Fair share between pods: bounds per source IP on open connections, requests in flight and
//! request rate, so one runaway pod (a retry loop, a connection leak) cannot starve the others.
//!
//! - A connection past `client_max_connections` is closed at once, before it holds anything
//!   (SDKs retry a refused connection).
//! - A request past `client_max_requests` in flight, or past the `client_requests_per_second`
//!   bucket (`client_burst` deep), is answered 503 with `Retry-After: 1`, which every SDK's
//!   IMDS client retries, and counted in `iamlet_imds_fair_share_refusals_total{limit}`.
//!
//! The defaults are far above what any SDK does (a cold pod asks a handful of times; SDKs cache
//! credentials for hours): they only ever bind a pod that is misbehaving.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::time::Instant;

use crate::metrics::Metrics;

/// The per-client bounds (`[imds]` `client_*` keys).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientLimits {
    pub max_connections: usize,
    pub max_requests: usize,
    pub requests_per_second: f64,
    pub burst: u32,
}

/// Which bound refused a request or connection; its `limit` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Connections,
    Requests,
    Rate,
}

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::Requests => "requests",
            Limit::Rate => "rate",
        }
    }
}

struct Client {
    connections: usize,
    requests: usize,
    tokens: f64,
    refilled: Instant,
}

struct Inner {
    limits: ClientLimits,
    clients: Mutex<HashMap<IpAddr, Client>>,
    metrics: Metrics,
}

/// Cheap to clone; clones share the counts.
#[derive(Clone)]
pub struct FairShare(Arc<Inner>);

/// Held while a connection is open; uncounts it on drop.
pub struct ConnectionTicket {
    share: FairShare,
    ip: IpAddr,
}

/// Held while a request is answered; uncounts it on drop.
pub struct RequestTicket {
    share: FairShare,
    ip: IpAddr,
}

impl FairShare {
    pub fn new(limits: ClientLimits, metrics: Metrics) -> FairShare {
        FairShare(Arc::new(Inner {
            limits,
            clients: Mutex::new(HashMap::new()),
            metrics,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, Client>> {
        self.0
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn client<'a>(&self, clients: &'a mut HashMap<IpAddr, Client>, ip: IpAddr) -> &'a mut Client {
        let burst = f64::from(self.0.limits.burst.max(1));
        let client = clients.entry(ip).or_insert_with(|| Client {
            connections: 0,
            requests: 0,
            tokens: burst,
            refilled: Instant::now(),
        });
        let now = Instant::now();
        let elapsed = now.duration_since(client.refilled).as_secs_f64();
        client.tokens = (client.tokens + elapsed * self.0.limits.requests_per_second).min(burst);
        client.refilled = now;
        client
    }

    fn refuse<T>(&self, ip: IpAddr, limit: Limit) -> Result<T, Limit> {
        self.0.metrics.observe_fair_share_refusal(limit.label());
        tracing::debug!(client = %ip, limit = limit.label(), "fair share: refused");
        Err(limit)
    }

    /// Admits a new connection from `ip`, or refuses it when `ip` has too many open.
    pub fn connection(&self, ip: IpAddr) -> Result<ConnectionTicket, Limit> {
        let ip = ip.to_canonical();
        {
            let mut clients = self.lock();
            let client = self.client(&mut clients, ip);
            if client.connections >= self.0.limits.max_connections {
                drop(clients);
                return self.refuse(ip, Limit::Connections);
            }
            client.connections += 1;
        }
        Ok(ConnectionTicket {
            share: self.clone(),
            ip,
        })
    }

    /// Admits a request from `ip`, or says which bound it is past.
    pub fn request(&self, ip: IpAddr) -> Result<RequestTicket, Limit> {
        let ip = ip.to_canonical();
        {
            let mut clients = self.lock();
            let client = self.client(&mut clients, ip);
            let refused = if client.requests >= self.0.limits.max_requests {
                Some(Limit::Requests)
            } else if client.tokens < 1.0 {
                Some(Limit::Rate)
            } else {
                client.tokens -= 1.0;
                client.requests += 1;
                None
            };
            if let Some(limit) = refused {
                drop(clients);
                return self.refuse(ip, limit);
            }
        }
        Ok(RequestTicket {
            share: self.clone(),
            ip,
        })
    }

    /// Takes one connection or request off `ip`'s count, forgetting a client that holds
    /// nothing and whose bucket is full again (so memory follows the active clients only).
    fn release(&self, ip: IpAddr, connection: bool) {
        let mut clients = self.lock();
        let burst = f64::from(self.0.limits.burst.max(1));
        let client = self.client(&mut clients, ip);
        if connection {
            client.connections = client.connections.saturating_sub(1);
        } else {
            client.requests = client.requests.saturating_sub(1);
        }
        if client.connections == 0 && client.requests == 0 && client.tokens >= burst {
            clients.remove(&ip);
        }
    }

    /// Clients currently tracked (tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.lock().len()
    }
}

impl Drop for ConnectionTicket {
    fn drop(&mut self) {
        self.share.release(self.ip, true);
    }
}

impl Drop for RequestTicket {
    fn drop(&mut self) {
        self.share.release(self.ip, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const POD: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 7));
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 8));

    fn share(max_connections: usize, max_requests: usize, rate: f64, burst: u32) -> FairShare {
        FairShare::new(
            ClientLimits {
                max_connections,
                max_requests,
                requests_per_second: rate,
                burst,
            },
            Metrics::default(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn connections_are_bounded_per_client_and_released() {
        let share = share(2, 100, 100.0, 100);
        let a = share.connection(POD).expect("first");
        let _b = share.connection(POD).expect("second");
        assert_eq!(share.connection(POD).err(), Some(Limit::Connections));
        // Another pod is not affected by this one's count.
        let _c = share.connection(OTHER).expect("another pod");
        drop(a);
        assert!(
            share.connection(POD).is_ok(),
            "a closed connection frees its place"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_flight_are_bounded_per_client() {
        let share = share(100, 2, 1000.0, 1000);
        let a = share.request(POD).expect("first");
        let _b = share.request(POD).expect("second");
        assert_eq!(share.request(POD).err(), Some(Limit::Requests));
        assert!(share.request(OTHER).is_ok());
        drop(a);
        assert!(share.request(POD).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn request_rate_is_a_token_bucket_per_client() {
        let share = share(100, 100, 10.0, 5);
        for _ in 0..5 {
            drop(share.request(POD).expect("within the burst"));
        }
        assert_eq!(share.request(POD).err(), Some(Limit::Rate));
        assert!(
            share.request(OTHER).is_ok(),
            "another pod has its own bucket"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(share.request(POD).is_ok(), "one token back after 1/rate");
        assert_eq!(share.request(POD).err(), Some(Limit::Rate));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_clients_are_forgotten_once_their_bucket_is_full() {
        let share = share(10, 10, 10.0, 5);
        drop(share.connection(POD).expect("admitted"));
        assert_eq!(share.tracked(), 0, "nothing held and the bucket untouched");
        drop(share.request(POD).expect("admitted"));
        assert_eq!(share.tracked(), 1, "its bucket is one token short");
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(share.connection(POD).expect("admitted"));
        assert_eq!(share.tracked(), 0);
    }
}
