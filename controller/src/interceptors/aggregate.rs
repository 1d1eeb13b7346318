//! Folding sample rounds into per-route metrics: concurrency summed over replicas, request
//! counts turned into per-replica deltas, the request rate over a window, and when each route
//! last had a request. Pure bookkeeping, no I/O.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use super::{Interceptors, QueueCounts, RouteKey, RouteMetrics, HISTORY};

impl Interceptors {
    /// The metrics of one route.
    pub fn metrics(&self, route: &str) -> RouteMetrics {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let keep_awake_until = state
            .replicas
            .values()
            .filter_map(|r| r.keep_awake.get(route).copied())
            .chain(state.departed_keep_awake.get(route).copied())
            .max();
        let mut metrics = state
            .routes
            .get(route)
            .map_or_else(RouteMetrics::default, |h| RouteMetrics {
                concurrency: h.concurrency as f64,
                last_active: h.last_active,
                keep_awake_until: None,
            });
        let now = Instant::now();
        // A deadline counts as activity until it passes, so the scale-down period runs from it
        // even when the replica that reported it no longer answers.
        if let Some(until) = keep_awake_until {
            let busy = until.min(now);
            metrics.last_active = Some(metrics.last_active.map_or(busy, |t| t.max(busy)));
        }
        metrics.keep_awake_until = keep_awake_until.filter(|t| *t > now);
        metrics
    }

    /// Requests per second over `window`, from samples in `granularity` buckets.
    pub fn rate(&self, route: &str, window: Duration, granularity: Duration) -> f64 {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(h) = state.routes.get(route) else {
            return 0.0;
        };
        let Some(&(now, seen_now)) = h.samples.back() else {
            return 0.0;
        };
        let from = now.checked_sub(window).unwrap_or(now);
        // The last sample at or before the window start (or the oldest we have).
        let base = h
            .samples
            .iter()
            .rev()
            .find(|(t, _)| *t <= from)
            .or_else(|| h.samples.front())
            .copied();
        match base {
            Some((t, seen)) if now > t => {
                let span = (now - t).max(granularity).as_secs_f64();
                (seen_now - seen) as f64 / span
            }
            _ => 0.0,
        }
    }

    /// Number of replicas known, and how many answered the last sample.
    pub fn replicas(&self) -> (usize, usize) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (
            state.replicas.len(),
            state.replicas.values().filter(|r| r.reachable).count(),
        )
    }

    /// Folds one sample round into the aggregate. Pure bookkeeping, no I/O.
    pub(super) fn record(
        &self,
        addrs: &[String],
        results: Vec<Option<HashMap<RouteKey, QueueCounts>>>,
    ) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let live: HashSet<&String> = addrs.iter().collect();
        let state = &mut *state;
        // A departed replica's passed deadline is the route's last busy moment; keep that
        // much of it.
        for (route, until) in &state.departed_keep_awake {
            if *until <= now {
                let h = state.routes.entry(route.clone()).or_default();
                h.last_active = Some(h.last_active.map_or(*until, |t| t.max(*until)));
            }
        }
        state.departed_keep_awake.retain(|_, until| *until > now);
        for (addr, replica) in &state.replicas {
            if live.contains(addr) {
                continue;
            }
            for (route, until) in &replica.keep_awake {
                if *until > now {
                    let kept = state
                        .departed_keep_awake
                        .entry(route.clone())
                        .or_insert(*until);
                    *kept = (*kept).max(*until);
                }
            }
        }
        state.replicas.retain(|addr, _| live.contains(addr));
        let mut deltas: HashMap<RouteKey, u64> = HashMap::new();
        // The latest activity any replica that answered reports, per route.
        let mut reported: HashMap<RouteKey, Instant> = HashMap::new();
        for (addr, result) in addrs.iter().zip(results) {
            let replica = state.replicas.entry(addr.clone()).or_default();
            match result {
                Some(counts) => {
                    // The first answer of a replica is a baseline: what it counted before this
                    // controller saw it is history, not new requests.
                    let baseline = !replica.reachable && replica.last.is_empty();
                    for (route, c) in &counts {
                        let before = replica.last.get(route).map_or(0, |p| p.request_count);
                        // A restarted replica starts counting from zero again.
                        let delta = match (baseline, c.request_count >= before) {
                            (true, _) => 0,
                            (false, true) => c.request_count - before,
                            (false, false) => c.request_count,
                        };
                        *deltas.entry(route.clone()).or_default() += delta;
                        if let Some(idle) = c.idle_ms {
                            let at = now.checked_sub(Duration::from_millis(idle)).unwrap_or(now);
                            let latest = reported.entry(route.clone()).or_insert(at);
                            *latest = (*latest).max(at);
                        }
                    }
                    replica.keep_awake = counts
                        .iter()
                        .filter_map(|(route, c)| {
                            Some((route.clone(), now + Duration::from_millis(c.keep_awake_ms?)))
                        })
                        .collect();
                    replica.last = counts;
                    replica.reachable = true;
                }
                // Unreachable: keep its last counts, so its concurrency still counts.
                None => replica.reachable = false,
            }
        }
        let mut concurrency: HashMap<RouteKey, u64> = HashMap::new();
        for replica in state.replicas.values() {
            for (route, c) in &replica.last {
                *concurrency.entry(route.clone()).or_default() += c.concurrency;
            }
        }
        let routes: HashSet<RouteKey> = concurrency
            .keys()
            .chain(deltas.keys())
            .chain(reported.keys())
            .cloned()
            .collect();
        for route in routes {
            let h = state.routes.entry(route.clone()).or_default();
            let delta = deltas.get(&route).copied().unwrap_or(0);
            h.concurrency = concurrency.get(&route).copied().unwrap_or(0);
            h.seen += delta;
            if delta > 0 || h.concurrency > 0 {
                h.last_active = Some(now);
            }
            if let Some(&at) = reported.get(&route) {
                h.last_active = Some(h.last_active.map_or(at, |t| t.max(at)));
            }
            h.samples.push_back((now, h.seen));
            while h
                .samples
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > HISTORY)
            {
                h.samples.pop_front();
            }
        }
    }
}
