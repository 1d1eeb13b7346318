//! Per-route load: requests in flight (held ones included), held requests, the ever-growing
//! request count, the moment of last activity, per-endpoint in-flight leases, and the
//! keep-awake deadlines backends asked for (`Wakegate-Keep-Awake`).
//!
//! A keep-awake deadline counts as activity until it passes: the route is busy while one is
//! ahead, and its idle time (what scale-down waits on) runs from the later of the last request
//! and the last deadline. Deadlines are kept per endpoint, because "I am still working" is said
//! by one backend instance: a later header from the same endpoint replaces its deadline, `0`
//! releases it, and another replica's answer leaves it alone.
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
                        idle_ms: e.value().last_busy_ago().map(millis),
                        keep_awake_ms: e.value().keep_awake_left().map(millis),
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

    /// Keep-awake deadlines ahead, per route, as Unix milliseconds (for `/status`).
    pub fn kept_awake(&self) -> BTreeMap<String, u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.routes
            .iter()
            .filter_map(|e| {
                let left = e.value().keep_awake_left()?;
                Some((e.key().to_string(), millis(now + left)))
            })
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
    /// Milliseconds since the route was last busy: a request started or ended, or a
    /// keep-awake deadline passed (0 while a request is in flight or a deadline is ahead;
    /// absent when there has been neither since this interceptor started). Wakegate's
    /// addition: relative, so no two machines' clocks are compared, and it lets a restarted
    /// controller know how long a route has really been idle.
    #[serde(rename = "IdleMs", default, skip_serializing_if = "Option::is_none")]
    pub idle_ms: Option<u64>,
    /// Milliseconds until the latest keep-awake deadline a backend asked for (absent when none
    /// is ahead). Wakegate's addition, relative for the same reason.
    #[serde(
        rename = "KeepAwakeMs",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub keep_awake_ms: Option<u64>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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
    /// The latest keep-awake deadline over all endpoints, as one more than milliseconds since
    /// `epoch`; 0 when none was ever set. Read on every idle check, so it is an atomic; the map
    /// behind it is touched only when a backend sends the header.
    keep_awake_until_ms: AtomicU64,
    /// Keep-awake deadlines per endpoint (milliseconds since `epoch`).
    keep_awake: Mutex<HashMap<Endpoint, u64>>,
    /// Signalled when a keep-awake deadline changes, so an idle timer is set again.
    keep_awake_changed: Notify,
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
            keep_awake_until_ms: AtomicU64::new(0),
            keep_awake: Mutex::new(HashMap::new()),
            keep_awake_changed: Notify::new(),
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

    /// How long the route has been quiet: since the later of the last request's start or end
    /// and the last keep-awake deadline, or since start. Zero while a request is in flight or
    /// a keep-awake deadline is ahead. Scale-down waits on this.
    pub fn idle_for(&self) -> Duration {
        if self.in_flight() > 0 {
            return Duration::ZERO;
        }
        let request = self.last_active_ms.load(Ordering::Acquire);
        let keep_awake = self.keep_awake_until_ms.load(Ordering::Acquire);
        let last = Duration::from_millis(request.max(keep_awake).saturating_sub(1));
        self.epoch.elapsed().saturating_sub(last)
    }

    /// [`RouteLoad::idle_for`], or `None` when the route has had neither a request nor a
    /// keep-awake deadline since start.
    pub fn last_busy_ago(&self) -> Option<Duration> {
        let never = self.last_active_ms.load(Ordering::Acquire) == 0
            && self.keep_awake_until_ms.load(Ordering::Acquire) == 0;
        (!never).then(|| self.idle_for())
    }

    /// Time left until the latest keep-awake deadline; `None` when none is ahead.
    pub fn keep_awake_left(&self) -> Option<Duration> {
        let until = self.keep_awake_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return None;
        }
        let left = Duration::from_millis(until - 1).saturating_sub(self.epoch.elapsed());
        (!left.is_zero()).then_some(left)
    }

    /// Records a backend's `Wakegate-Keep-Awake`: `endpoint` keeps the route up for `for_`
    /// from now (replacing what it asked before), or releases its deadline with zero.
    pub fn keep_awake(&self, endpoint: &Endpoint, for_: Duration) {
        let now = self.now_ms();
        let mut deadlines = self.keep_awake.lock().unwrap_or_else(|e| e.into_inner());
        if for_.is_zero() {
            deadlines.remove(endpoint);
        } else {
            let until = now.saturating_add(millis(for_));
            match deadlines.get_mut(endpoint) {
                Some(at) => *at = until,
                None => {
                    deadlines.insert(endpoint.clone(), until);
                }
            }
        }
        // Passed deadlines are history: the latest one stays in the atomic (scale-down counts
        // from it), the map keeps only what is ahead.
        deadlines.retain(|_, until| *until > now);
        let latest = deadlines.values().copied().max();
        drop(deadlines);
        match latest {
            Some(until) => self
                .keep_awake_until_ms
                .store(until.saturating_add(1), Ordering::Release),
            // Nothing ahead any more: the route has been busy until now, not until a deadline
            // that was released early.
            None => {
                let was = self.keep_awake_until_ms.load(Ordering::Acquire);
                if was > now.saturating_add(1) {
                    self.keep_awake_until_ms
                        .store(now.saturating_add(1), Ordering::Release);
                }
            }
        }
        self.keep_awake_changed.notify_waiters();
    }

    /// A future that completes when a keep-awake deadline changes. Enable it before reading
    /// [`RouteLoad::keep_awake_left`].
    pub fn keep_awake_changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.keep_awake_changed.notified()
    }

    fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// `at` in milliseconds since `epoch`.
    fn ms_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Records activity at `now`, a time the caller has read anyway.
    fn touch_at(&self, now: Instant) {
        self.last_active_ms
            .fetch_max(self.ms_at(now).saturating_add(1), Ordering::AcqRel);
    }

    /// Counts a request in: in flight until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.start_request_at(Instant::now())
    }

    /// Counts a request in as of `now` (the request's arrival, read by the caller): one clock
    /// read per request less.
    pub fn start_request_at(self: &Arc<Self>, now: Instant) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.touch_at(now);
        InFlight(Some(self.clone()))
    }

    fn end_request_at(&self, now: Instant) {
        self.touch_at(now);
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.went_idle.notify_waiters();
        }
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
pub struct InFlight(Option<Arc<RouteLoad>>);

impl InFlight {
    /// Counts the request out as of `now`, a time the caller has read anyway.
    pub fn end_at(mut self, now: Instant) {
        if let Some(load) = self.0.take() {
            load.end_request_at(now);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(load) = self.0.take() {
            load.end_request_at(Instant::now());
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
                keep_awake_ms: None,
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
    fn keep_awake_deadlines_are_per_endpoint_replaced_and_released() {
        let load = Loads::default().get(&"r".into());
        let (a, b) = (
            Endpoint::new("a:1".parse().unwrap()),
            Endpoint::new("b:1".parse().unwrap()),
        );
        assert_eq!(load.keep_awake_left(), None);
        assert_eq!(load.last_busy_ago(), None, "nothing has happened yet");

        load.keep_awake(&a, Duration::from_secs(600));
        let left = load.keep_awake_left().unwrap();
        assert!(
            left > Duration::from_secs(590) && left <= Duration::from_secs(600),
            "{left:?}"
        );
        assert_eq!(
            load.idle_for(),
            Duration::ZERO,
            "a deadline ahead counts as busy"
        );
        assert_eq!(load.last_busy_ago(), Some(Duration::ZERO));

        // Another endpoint's shorter deadline does not shorten a's.
        load.keep_awake(&b, Duration::from_secs(60));
        assert!(load.keep_awake_left().unwrap() > Duration::from_secs(590));
        // a's later answer replaces a's deadline: b's is now the latest.
        load.keep_awake(&a, Duration::from_secs(30));
        let left = load.keep_awake_left().unwrap();
        assert!(
            left > Duration::from_secs(50) && left <= Duration::from_secs(60),
            "{left:?}"
        );
        // b releases: a's 30 s remain.
        load.keep_awake(&b, Duration::ZERO);
        assert!(load.keep_awake_left().unwrap() <= Duration::from_secs(30));
        // a releases too: nothing ahead, and the route was busy until now, not until the
        // released deadline.
        load.keep_awake(&a, Duration::ZERO);
        assert_eq!(load.keep_awake_left(), None);
        assert!(load.idle_for() < Duration::from_secs(1));
        let q = Loads::default();
        let l = q.get(&"r".into());
        l.keep_awake(&a, Duration::from_secs(5));
        let counts = q.queue()["r"];
        assert_eq!(counts.idle_ms, Some(0));
        assert!(
            counts
                .keep_awake_ms
                .is_some_and(|ms| ms > 4000 && ms <= 5000),
            "{counts:?}"
        );
        assert_eq!(q.kept_awake().len(), 1);
    }

    #[test]
    fn a_passed_deadline_is_when_idleness_starts() {
        let load = Loads::default().get(&"r".into());
        let a = Endpoint::new("a:1".parse().unwrap());
        drop(load.start_request());
        load.keep_awake(&a, Duration::from_millis(1));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while load.keep_awake_left().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the deadline never passed"
            );
            std::thread::yield_now();
        }
        assert!(load.idle_for() < Duration::from_secs(1));
        assert_eq!(load.keep_awake_left(), None);
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
