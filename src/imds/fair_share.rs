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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// One client's counts. Requests are admitted with atomics alone, through the connection
/// they arrive on (which holds its client): the map of clients is locked only when a
/// connection opens or closes.
struct Client {
    connections: AtomicUsize,
    requests: AtomicUsize,
    /// The request rate as a virtual scheduling time (GCRA, an exact token bucket in one
    /// number): nanoseconds after [`Inner::epoch`] by which the requests admitted so far would
    /// have been paid for at `requests_per_second`. The bucket is full once it is past.
    paid_until: AtomicU64,
}

impl Client {
    fn new() -> Arc<Client> {
        Arc::new(Client {
            connections: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            paid_until: AtomicU64::new(0),
        })
    }
}

struct Inner {
    limits: ClientLimits,
    clients: Mutex<HashMap<IpAddr, Arc<Client>>>,
    metrics: Metrics,
    epoch: Instant,
    /// Nanoseconds one request costs at `requests_per_second`.
    interval: u64,
    /// How far ahead of now requests may have been paid: `burst` of them.
    tolerance: u64,
}

/// Cheap to clone; clones share the counts.
#[derive(Clone)]
pub struct FairShare(Arc<Inner>);

/// Held while a connection is open; uncounts it on drop. Requests on the connection are
/// admitted through it ([`ConnectionTicket::request`]).
pub struct ConnectionTicket {
    share: FairShare,
    ip: IpAddr,
    client: Arc<Client>,
}

/// Held while a request is answered; uncounts it on drop.
pub struct RequestTicket {
    share: FairShare,
    ip: IpAddr,
    client: Arc<Client>,
}

impl FairShare {
    pub fn new(limits: ClientLimits, metrics: Metrics) -> FairShare {
        // At least a nanosecond: a rate too high to tell from "unbounded" in nanoseconds is
        // a billion a second, which still admits `burst` at once.
        let interval = 1e9 / limits.requests_per_second;
        let interval = if interval.is_finite() {
            (interval.round() as u64).max(1)
        } else {
            u64::MAX
        };
        FairShare(Arc::new(Inner {
            limits,
            clients: Mutex::new(HashMap::new()),
            metrics,
            epoch: Instant::now(),
            interval,
            tolerance: interval.saturating_mul(u64::from(limits.burst.max(1))),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, Arc<Client>>> {
        self.0
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        u64::try_from(Instant::now().duration_since(self.0.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The client at `ip`, tracked from now on if it was not.
    fn client(&self, ip: IpAddr) -> Arc<Client> {
        self.lock().entry(ip).or_insert_with(Client::new).clone()
    }

    fn refuse<T>(&self, ip: IpAddr, limit: Limit) -> Result<T, Limit> {
        self.0.metrics.observe_fair_share_refusal(limit.label());
        tracing::debug!(client = %ip, limit = limit.label(), "fair share: refused");
        Err(limit)
    }

    /// Admits a new connection from `ip`, or refuses it when `ip` has too many open.
    pub fn connection(&self, ip: IpAddr) -> Result<ConnectionTicket, Limit> {
        let ip = ip.to_canonical();
        let client = {
            let mut clients = self.lock();
            let client = clients.entry(ip).or_insert_with(Client::new);
            // Counted under the map's lock, so that `forget_if_idle` cannot drop a client
            // between this check and the count.
            if client.connections.load(Ordering::Acquire) >= self.0.limits.max_connections {
                drop(clients);
                return self.refuse(ip, Limit::Connections);
            }
            client.connections.fetch_add(1, Ordering::AcqRel);
            client.clone()
        };
        Ok(ConnectionTicket {
            share: self.clone(),
            ip,
            client,
        })
    }

    /// Admits a request from `ip`, or says which bound it is past. The server admits requests
    /// through the connection they arrive on instead ([`ConnectionTicket::request`]), which
    /// needs no lookup.
    pub fn request(&self, ip: IpAddr) -> Result<RequestTicket, Limit> {
        let ip = ip.to_canonical();
        let client = self.client(ip);
        self.admit(ip, client)
    }

    fn admit(&self, ip: IpAddr, client: Arc<Client>) -> Result<RequestTicket, Limit> {
        if client.requests.fetch_add(1, Ordering::AcqRel) >= self.0.limits.max_requests {
            client.requests.fetch_sub(1, Ordering::AcqRel);
            return self.refuse(ip, Limit::Requests);
        }
        if !self.pay(&client) {
            client.requests.fetch_sub(1, Ordering::AcqRel);
            return self.refuse(ip, Limit::Rate);
        }
        Ok(RequestTicket {
            share: self.clone(),
            ip,
            client,
        })
    }

    /// Takes one request's worth from `client`'s bucket, if it holds one.
    fn pay(&self, client: &Client) -> bool {
        let now = self.now();
        let mut paid_until = client.paid_until.load(Ordering::Acquire);
        loop {
            let next = paid_until.max(now).saturating_add(self.0.interval);
            if next - now > self.0.tolerance {
                return false;
            }
            match client.paid_until.compare_exchange_weak(
                paid_until,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(current) => paid_until = current,
            }
        }
    }

    /// Forgets the client at `ip` if it holds nothing and its bucket is full again (so memory
    /// follows the active clients only).
    fn forget_if_idle(&self, ip: IpAddr) {
        let now = self.now();
        let mut clients = self.lock();
        if let Some(client) = clients.get(&ip)
            && client.connections.load(Ordering::Acquire) == 0
            && client.requests.load(Ordering::Acquire) == 0
            && client.paid_until.load(Ordering::Acquire) <= now
        {
            clients.remove(&ip);
        }
    }

    /// Clients currently tracked (tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.lock().len()
    }
}

impl ConnectionTicket {
    /// Admits a request arriving on this connection, or says which bound it is past.
    pub fn request(&self) -> Result<RequestTicket, Limit> {
        self.share.admit(self.ip, self.client.clone())
    }
}

impl Drop for ConnectionTicket {
    fn drop(&mut self) {
        if self.client.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.share.forget_if_idle(self.ip);
        }
    }
}

impl Drop for RequestTicket {
    fn drop(&mut self) {
        if self.client.requests.fetch_sub(1, Ordering::AcqRel) == 1
            && self.client.connections.load(Ordering::Acquire) == 0
        {
            self.share.forget_if_idle(self.ip);
        }
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
