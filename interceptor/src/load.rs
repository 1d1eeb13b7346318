//! Per-route load: requests in flight (held ones included), held requests, the ever-growing
//! request count, the moment of last activity, and per-endpoint in-flight leases.
//!
//! Loads outlive routing tables: a table rebuilt because one route changed keeps every other
//! route's counts. They are hot, per-request counters, so they are atomics behind a `DashMap`
//! keyed by route id; the only lock is the per-endpoint lease map, used only by routes that set a
//! per-endpoint cap, and never held across an `.await`.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde::Serialize;
use tokio::sync::Notify;

use crate::provider::{Endpoint, ReadyEndpoints, RouteId};

/// The registry of route loads, shared by the proxy, the admin server and providers that
/// scale on activity (local mode).
#[derive(Debug)]
pub struct Loads {
    epoch: Instant,
    routes: DashMap<RouteId, Arc<RouteLoad>>,
}

impl Default for Loads {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            routes: DashMap::new(),
        }
    }
}

impl Loads {
    /// The load of `route`, created on first use.
    pub fn get(&self, route: &RouteId) -> Arc<RouteLoad> {
        if let Some(load) = self.routes.get(route) {
            return load.clone();
        }
        self.routes
            .entry(route.clone())
            .or_insert_with(|| Arc::new(RouteLoad::new(self.epoch)))
            .clone()
    }

    /// Forgets routes that are gone and idle, so `/queue` lists only live routes.
    pub fn retain(&self, keep: impl Fn(&RouteId) -> bool) {
        self.routes
            .retain(|id, load| keep(id) || load.in_flight() > 0);
    }

    /// The `/queue` view: `{"<route>": {"Concurrency": n, "RequestCount": n}}`, sorted.
    pub fn queue(&self) -> BTreeMap<String, QueueCounts> {
        self.routes
            .iter()
            .map(|e| {
                (
                    e.key().to_string(),
                    QueueCounts {
                        concurrency: e.value().in_flight(),
                        request_count: e.value().requests(),
                        idle_ms: e
                            .value()
                            .last_request_ago()
                            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    },
                )
            })
            .collect()
    }

    /// Requests held now, per route (for `/status`).
    pub fn held(&self) -> BTreeMap<String, u64> {
        self.routes
            .iter()
            .map(|e| (e.key().to_string(), e.value().held()))
            .collect()
    }

    /// Visits every route's load (for metrics).
    pub fn for_each(&self, mut f: impl FnMut(&RouteId, &RouteLoad)) {
        for e in self.routes.iter() {
            f(e.key(), e.value());
        }
    }
}

/// One route's entry in `/queue`, in the KEDA HTTP Add-on's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct QueueCounts {
    /// Requests in flight now, held ones included.
    #[serde(rename = "Concurrency")]
    pub concurrency: u64,
    /// Requests seen since start; only ever grows.
    #[serde(rename = "RequestCount")]
    pub request_count: u64,
    /// Milliseconds since a request last started or ended here (0 while one is in flight;
    /// absent when none has since this interceptor started). Wakegate's addition: relative, so
    /// no two machines' clocks are compared, and it lets a restarted controller know how long
    /// a route has really been idle.
    #[serde(rename = "IdleMs", default, skip_serializing_if = "Option::is_none")]
    pub idle_ms: Option<u64>,
}

/// The load of one route.
#[derive(Debug)]
pub struct RouteLoad {
    epoch: Instant,
    in_flight: AtomicU64,
    held: AtomicU64,
    requests: AtomicU64,
    /// One more than the milliseconds since `epoch` at the last request start or end; 0 when
    /// no request has been seen.
    last_active_ms: AtomicU64,
    /// Round-robin cursor over ready endpoints.
    cursor: AtomicUsize,
    /// In-flight requests per endpoint, kept only when the route caps them.
    leases: Mutex<HashMap<Endpoint, usize>>,
    /// Signalled when a lease ends, so a held request can take the freed slot.
    released: Notify,
    /// Signalled when the last in-flight request ends, so an idle timer can start.
    went_idle: Notify,
}

impl RouteLoad {
    fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            in_flight: AtomicU64::new(0),
            held: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            last_active_ms: AtomicU64::new(0),
            cursor: AtomicUsize::new(0),
            leases: Mutex::new(HashMap::new()),
            released: Notify::new(),
            went_idle: Notify::new(),
        }
    }

    /// Requests in flight now, held ones included.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Requests held waiting for a ready endpoint.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }

    /// Requests seen since start.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// How long since a request last started or ended (zero while one is in flight).
    pub fn idle_for(&self) -> Duration {
        if self.in_flight() > 0 {
            return Duration::ZERO;
        }
        let last = self
            .last_active_ms
            .load(Ordering::Acquire)
            .saturating_sub(1);
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }

    /// How long since a request last started or ended (zero while one is in flight); `None`
    /// when no request has been seen since start.
    pub fn last_request_ago(&self) -> Option<Duration> {
        (self.last_active_ms.load(Ordering::Acquire) > 0).then(|| self.idle_for())
    }

    fn touch(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1);
        self.last_active_ms.fetch_max(now, Ordering::AcqRel);
    }

    /// Counts a request in: in flight until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.touch();
        InFlight(self.clone())
    }

    /// Counts a request as held until the guard drops, and says how many were held before it
    /// (0: the route just went from none held to one).
    pub fn hold(self: &Arc<Self>) -> (Held, u64) {
        let before = self.held.fetch_add(1, Ordering::AcqRel);
        (Held(self.clone()), before)
    }

    /// A future that completes when a per-endpoint lease ends. Create it (and enable it) before
    /// trying [`RouteLoad::pick`] so a release in between is not missed.
    pub fn released(&self) -> tokio::sync::futures::Notified<'_> {
        self.released.notified()
    }

    /// A future that completes when the last request in flight ends. Enable it before checking
    /// [`RouteLoad::in_flight`].
    pub fn went_idle(&self) -> tokio::sync::futures::Notified<'_> {
        self.went_idle.notified()
    }

    /// Picks an endpoint for one request: round-robin, or with a cap, the least-loaded endpoint
    /// still under it. `None` when nothing is ready or every endpoint is at its cap.
    pub fn pick(
        self: &Arc<Self>,
        ready: &ReadyEndpoints,
        cap: Option<NonZeroUsize>,
    ) -> Option<(Endpoint, Option<EndpointLease>)> {
        let endpoints = ready.as_slice();
        if endpoints.is_empty() {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let Some(cap) = cap else {
            return Some((endpoints[start % endpoints.len()].clone(), None));
        };
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let chosen = (0..endpoints.len())
            .map(|i| &endpoints[(start + i) % endpoints.len()])
            .map(|ep| (leases.get(ep).copied().unwrap_or(0), ep))
            .filter(|(n, _)| *n < cap.get())
            .min_by_key(|(n, _)| *n)
            .map(|(_, ep)| ep.clone())?;
        *leases.entry(chosen.clone()).or_insert(0) += 1;
        drop(leases);
        let lease = EndpointLease {
            load: self.clone(),
            endpoint: chosen.clone(),
        };
        Some((chosen, Some(lease)))
    }
}

/// A request counted in flight; dropping it counts the request out.
#[derive(Debug)]
pub struct InFlight(Arc<RouteLoad>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.went_idle.notify_waiters();
        }
    }
}

/// A request counted as held; dropping it counts the request out of the held set.
#[derive(Debug)]
pub struct Held(Arc<RouteLoad>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A slot on one endpoint under a per-endpoint cap; dropping it frees the slot.
#[derive(Debug)]
pub struct EndpointLease {
    load: Arc<RouteLoad>,
    endpoint: Endpoint,
}

impl Drop for EndpointLease {
    fn drop(&mut self) {
        let mut leases = self.load.leases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = leases.get_mut(&self.endpoint) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                leases.remove(&self.endpoint);
            }
        }
        drop(leases);
        self.load.released.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(addrs: &[&str]) -> ReadyEndpoints {
        addrs
            .iter()
            .map(|a| Endpoint::new(a.parse().unwrap()))
            .collect()
    }

    #[test]
    fn counts_follow_guards() {
        let loads = Loads::default();
        let load = loads.get(&"r".into());
        let a = load.start_request();
        let (held, before) = load.hold();
        assert_eq!(before, 0);
        assert_eq!(load.hold().1, 1, "a second held request is not the first");
        let _b = load.start_request();
        assert_eq!((load.in_flight(), load.held(), load.requests()), (2, 1, 2));
        drop(held);
        assert_eq!(load.hold().1, 0, "none held again: the next is the first");
        drop(a);
        assert_eq!((load.in_flight(), load.held(), load.requests()), (1, 0, 2));
        let q = loads.queue();
        assert_eq!(
            q["r"],
            QueueCounts {
                concurrency: 1,
                request_count: 2,
                idle_ms: Some(0),
            },
            "busy: idle for nothing"
        );
        drop(_b);
        assert_eq!(loads.queue()["r"].concurrency, 0);
    }

    #[test]
    fn round_robin_without_cap() {
        let load = Loads::default().get(&"r".into());
        let ready = endpoints(&["a:1", "b:1"]);
        let picks: Vec<String> = (0..4)
            .map(|_| load.pick(&ready, None).unwrap().0.to_string())
            .collect();
        assert_eq!(picks, ["a:1", "b:1", "a:1", "b:1"]);
        assert!(load.pick(&ReadyEndpoints::none(), None).is_none());
    }

    #[test]
    fn cap_spreads_over_endpoints_and_frees_on_drop() {
        let load = Loads::default().get(&"r".into());
        let ready = endpoints(&["a:1", "b:1"]);
        let cap = NonZeroUsize::new(2);
        let leases: Vec<_> = (0..4).map(|_| load.pick(&ready, cap).unwrap()).collect();
        let on_a = leases
            .iter()
            .filter(|(e, _)| e.to_string() == "a:1")
            .count();
        assert_eq!(on_a, 2, "four requests under a cap of two spread evenly");
        assert!(
            load.pick(&ready, cap).is_none(),
            "all endpoints are at the cap"
        );
        drop(leases.into_iter().next());
        assert!(
            load.pick(&ready, cap).is_some(),
            "a dropped lease frees a slot"
        );
    }

    #[test]
    fn retain_keeps_busy_routes() {
        let loads = Loads::default();
        let busy = loads.get(&"busy".into());
        let _guard = busy.start_request();
        loads.get(&"idle".into());
        loads.retain(|_| false);
        assert_eq!(loads.queue().keys().collect::<Vec<_>>(), ["busy"]);
    }
}
