//! What the interceptors report, aggregated over every replica.
//!
//! Replicas are found through the EndpointSlices of the interceptors' admin Service (or a fixed
//! list). Two channels per replica:
//! - `GET /events`, held open: wake events arrive the moment a route's first request is held,
//!   and are re-broadcast to the scalers at once (push, no tick);
//! - `GET /queue`, sampled every interval: concurrency is summed over replicas, and request
//!   counts are turned into per-replica deltas, so requests that started and finished between
//!   two samples still count as activity and feed the request rate.
//!
//! A replica that cannot be reached keeps its last concurrency until it answers again or
//! leaves the Service, so one bad replica never fails the metric.
//!
//! When a route last had a request comes from the interceptors themselves (`IdleMs` in
//! `/queue`: how long ago, by their own clock), not from what this controller happened to see,
//! so a restarted or newly elected controller knows at its first sample how long each route
//! has been idle.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use kube::Api;
use serde::Deserialize;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// `namespace/name` of an HTTPScaledObject.
pub type RouteKey = String;

/// A wake: a route's first request was held on some interceptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wake {
    /// The route.
    pub route: RouteKey,
    /// When the interceptor held the request (Unix µs), if it said.
    pub held_at_us: Option<u64>,
}

/// How long request-count history is kept (longer than any sane rate window).
const HISTORY: Duration = Duration::from_secs(15 * 60);

/// An event stream that says nothing for this long is dead: the interceptor sends a `ping`
/// every 15 s, so three missed pings.
const EVENTS_IDLE_TIMEOUT: Duration = Duration::from_secs(45);

/// Longest event line accepted. The largest is `hello`, which lists every route's counts
/// (about 100 bytes each: 4 MiB is some 40,000 routes).
const MAX_EVENT_LINE: usize = 4 << 20;

/// One route's counts in `/queue`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
struct QueueCounts {
    #[serde(rename = "Concurrency")]
    concurrency: u64,
    #[serde(rename = "RequestCount")]
    request_count: u64,
    /// How long ago the replica last saw a request start or end (absent from interceptors
    /// that do not report it).
    #[serde(rename = "IdleMs", default)]
    idle_ms: Option<u64>,
}

#[derive(Debug, Default)]
struct Replica {
    last: HashMap<RouteKey, QueueCounts>,
    reachable: bool,
}

#[derive(Debug, Default)]
struct RouteHistory {
    /// Requests seen since the controller started, summed over replicas.
    seen: u64,
    /// `(time, seen)` after each sample.
    samples: VecDeque<(Instant, u64)>,
    last_active: Option<Instant>,
    concurrency: u64,
}

/// A route's aggregated metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RouteMetrics {
    /// Requests in flight now, held ones included, over all replicas.
    pub concurrency: f64,
    /// When a request was last in flight or counted; `None` if never seen.
    pub last_active: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    replicas: HashMap<String, Replica>,
    routes: HashMap<RouteKey, RouteHistory>,
}

/// The aggregate, shared by the scalers.
#[derive(Debug)]
pub struct Interceptors {
    state: Mutex<State>,
    wakes: broadcast::Sender<Wake>,
    sampled: watch::Sender<u64>,
    client: Client<HttpConnector, Empty<Bytes>>,
}

/// Where interceptor replicas are found.
#[derive(Clone, Debug)]
pub enum Discovery {
    /// The ready endpoints of this admin Service (`namespace`, `name`, port name or number).
    Service {
        /// Namespace of the Service.
        namespace: String,
        /// Name of the Service.
        name: String,
        /// The admin port's name in the EndpointSlices (empty: the first port).
        port_name: String,
    },
    /// A fixed list of `host:port` admin addresses.
    Static(Vec<String>),
}

impl Interceptors {
    /// Starts discovery, event streams and sampling every `interval`, until `stop`.
    pub fn start(
        client: kube::Client,
        discovery: Discovery,
        interval: Duration,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(1)));
        http.set_nodelay(true);
        let this = Arc::new(Self {
            state: Mutex::new(State::default()),
            wakes: broadcast::channel(1024).0,
            sampled: watch::channel(0).0,
            client: Client::builder(TokioExecutor::new()).build(http),
        });
        let (addrs_tx, addrs_rx) = watch::channel(Vec::<String>::new());
        match discovery {
            Discovery::Static(addrs) => {
                addrs_tx.send_replace(addrs);
            }
            Discovery::Service {
                namespace,
                name,
                port_name,
            } => {
                tokio::spawn(discover(
                    client,
                    namespace,
                    name,
                    port_name,
                    addrs_tx,
                    stop.clone(),
                ));
            }
        }
        tokio::spawn(this.clone().manage_streams(addrs_rx.clone(), stop.clone()));
        tokio::spawn(this.clone().sample_loop(addrs_rx, interval, stop));
        this
    }

    /// Wake events: the route whose first request was just held somewhere.
    pub fn wakes(&self) -> broadcast::Receiver<Wake> {
        self.wakes.subscribe()
    }

    /// Changes after every sample round.
    pub fn sampled(&self) -> watch::Receiver<u64> {
        self.sampled.subscribe()
    }

    /// The metrics of one route.
    pub fn metrics(&self, route: &str) -> RouteMetrics {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .routes
            .get(route)
            .map_or_else(RouteMetrics::default, |h| RouteMetrics {
                concurrency: h.concurrency as f64,
                last_active: h.last_active,
            })
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

    async fn sample_loop(
        self: Arc<Self>,
        addrs: watch::Receiver<Vec<String>>,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let current: Vec<String> = addrs.borrow().clone();
            let results =
                futures_util::future::join_all(current.iter().map(|addr| self.fetch_queue(addr)))
                    .await;
            self.record(&current, results);
            self.sampled.send_modify(|n| *n += 1);
        }
    }

    async fn fetch_queue(&self, addr: &str) -> Option<HashMap<RouteKey, QueueCounts>> {
        let uri = format!("http://{addr}/queue").parse().ok()?;
        let fetch = async {
            let rsp = self.client.get(uri).await.ok()?;
            if !rsp.status().is_success() {
                return None;
            }
            let body = rsp.into_body().collect().await.ok()?.to_bytes();
            serde_json::from_slice(&body).ok()
        };
        tokio::time::timeout(Duration::from_secs(2), fetch)
            .await
            .ok()
            .flatten()
    }

    /// Folds one sample round into the aggregate. Pure bookkeeping, no I/O.
    fn record(&self, addrs: &[String], results: Vec<Option<HashMap<RouteKey, QueueCounts>>>) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let live: HashSet<&String> = addrs.iter().collect();
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

    /// Keeps one `/events` stream open per replica.
    async fn manage_streams(
        self: Arc<Self>,
        mut addrs: watch::Receiver<Vec<String>>,
        stop: CancellationToken,
    ) {
        let mut streams: HashMap<String, CancellationToken> = HashMap::new();
        loop {
            let current: HashSet<String> = addrs.borrow_and_update().iter().cloned().collect();
            streams.retain(|addr, token| {
                let keep = current.contains(addr);
                if !keep {
                    token.cancel();
                }
                keep
            });
            for addr in current {
                if let std::collections::hash_map::Entry::Vacant(slot) = streams.entry(addr.clone())
                {
                    let token = stop.child_token();
                    tokio::spawn(self.clone().follow_events(addr, token.clone()));
                    slot.insert(token);
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                changed = addrs.changed() => if changed.is_err() { return },
            }
        }
    }

    async fn follow_events(self: Arc<Self>, addr: String, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let ended = tokio::select! {
                () = stop.cancelled() => return,
                ended = self.read_events(&addr) => ended,
            };
            if ended {
                backoff = Duration::from_millis(100);
            }
            tracing::debug!(%addr, "interceptor event stream ended; reconnecting");
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Reads one `/events` stream until it ends. True if it was connected at all.
    async fn read_events(&self, addr: &str) -> bool {
        let Ok(uri) = format!("http://{addr}/events").parse() else {
            return false;
        };
        let Ok(rsp) = self.client.get(uri).await else {
            return false;
        };
        if !rsp.status().is_success() {
            return false;
        }
        tracing::debug!(%addr, "following interceptor events");
        let body = rsp.into_body().into_data_stream();
        match read_lines(body, EVENTS_IDLE_TIMEOUT, MAX_EVENT_LINE, |line| {
            self.on_event(addr, line)
        })
        .await
        {
            StreamEnd::Closed => {}
            StreamEnd::Silent => {
                tracing::warn!(%addr, timeout = ?EVENTS_IDLE_TIMEOUT, "interceptor event stream silent; reconnecting");
            }
            StreamEnd::LineTooLong => {
                tracing::warn!(%addr, limit = MAX_EVENT_LINE, "interceptor event line too long; reconnecting");
            }
        }
        true
    }

    /// A held request is activity, before any sample shows it.
    fn woke(&self, route: &str) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .routes
            .entry(route.to_owned())
            .or_default()
            .last_active = Some(Instant::now());
    }

    fn on_event(&self, addr: &str, line: &[u8]) {
        let Ok(event) = serde_json::from_slice::<serde_json::Value>(line) else {
            return;
        };
        match event["type"].as_str() {
            Some("wake") => {
                if let Some(route) = event["route"].as_str() {
                    tracing::debug!(%addr, route, "wake");
                    self.woke(route);
                    let _ = self.wakes.send(Wake {
                        route: route.to_owned(),
                        held_at_us: event["atUs"].as_u64(),
                    });
                }
            }
            // On (re)connect: requests already in flight there may be held ones.
            Some("hello") => {
                if let Some(queue) = event["queue"].as_object() {
                    for (route, counts) in queue {
                        if counts["Concurrency"].as_u64().unwrap_or(0) > 0 {
                            self.woke(route);
                            let _ = self.wakes.send(Wake {
                                route: route.clone(),
                                held_at_us: None,
                            });
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// Why an event stream stopped being read.
#[derive(Debug, PartialEq, Eq)]
enum StreamEnd {
    /// It ended or failed.
    Closed,
    /// Nothing arrived, not even a ping, for the idle timeout: a vanished peer leaves no FIN.
    Silent,
    /// A line grew past the limit.
    LineTooLong,
}

/// Feeds each newline-terminated line of `body` to `on_line`, until the stream ends, stays
/// silent for `idle`, or a line passes `max` bytes.
async fn read_lines<S, E>(
    body: S,
    idle: Duration,
    max: usize,
    mut on_line: impl FnMut(&[u8]),
) -> StreamEnd
where
    S: futures_util::Stream<Item = Result<Bytes, E>>,
{
    futures_util::pin_mut!(body);
    let mut buf = Vec::new();
    loop {
        let chunk = match tokio::time::timeout(idle, body.next()).await {
            Ok(Some(Ok(chunk))) => chunk,
            Ok(Some(Err(_)) | None) => return StreamEnd::Closed,
            Err(_) => return StreamEnd::Silent,
        };
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            on_line(&line);
        }
        if buf.len() > max {
            return StreamEnd::LineTooLong;
        }
    }
}

/// `wakegate_controller_interceptor_replicas{state="known|answering"}` and
/// `wakegate_controller_sample_rounds_total`, read from the aggregate at scrape time.
struct ReplicaCollector {
    interceptors: Arc<Interceptors>,
    gauge: prometheus::IntGaugeVec,
    /// Sample rounds since start (each is followed by the standalone scaler's decisions).
    rounds: prometheus::IntCounter,
}

impl prometheus::core::Collector for ReplicaCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut descs = self.gauge.desc();
        descs.extend(self.rounds.desc());
        descs
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let (known, answering) = self.interceptors.replicas();
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.gauge.with_label_values(&["known"]).set(gauge(known));
        self.gauge
            .with_label_values(&["answering"])
            .set(gauge(answering));
        let rounds = *self.interceptors.sampled.borrow();
        self.rounds.inc_by(rounds.saturating_sub(self.rounds.get()));
        let mut families = self.gauge.collect();
        families.extend(self.rounds.collect());
        families
    }
}

impl Interceptors {
    /// Registers the replica gauge into `registry`.
    pub fn register(self: &Arc<Self>, registry: &prometheus::Registry) -> prometheus::Result<()> {
        let gauge = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "wakegate_controller_interceptor_replicas",
                "Interceptor replicas known, and how many answered the last sample",
            ),
            &["state"],
        )?;
        let rounds = prometheus::IntCounter::new(
            "wakegate_controller_sample_rounds_total",
            "Rounds of /queue samples over the interceptor replicas since start",
        )?;
        registry.register(Box::new(ReplicaCollector {
            interceptors: self.clone(),
            gauge,
            rounds,
        }))
    }
}

/// Follows the admin Service's EndpointSlices into a list of `ip:port`.
async fn discover(
    client: kube::Client,
    namespace: String,
    service: String,
    port_name: String,
    addrs: watch::Sender<Vec<String>>,
    stop: CancellationToken,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut slices: HashMap<String, Vec<String>> = HashMap::new();
    let mut relist: HashMap<String, Vec<String>> = HashMap::new();
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => return,
            next = stream.next() => next,
        };
        let event = match next {
            Some(Ok(event)) => event,
            Some(Err(err)) => {
                tracing::warn!(error = %err, "watching the interceptor admin Service failed; retrying");
                continue;
            }
            None => return,
        };
        match event {
            watcher::Event::Apply(slice) => {
                slices.insert(
                    slice.metadata.name.clone().unwrap_or_default(),
                    ready_addrs(&slice, &port_name),
                );
            }
            watcher::Event::Delete(slice) => {
                slices.remove(&slice.metadata.name.clone().unwrap_or_default());
            }
            watcher::Event::Init => {
                relist.clear();
                continue;
            }
            watcher::Event::InitApply(slice) => {
                relist.insert(
                    slice.metadata.name.clone().unwrap_or_default(),
                    ready_addrs(&slice, &port_name),
                );
                continue;
            }
            watcher::Event::InitDone => slices = std::mem::take(&mut relist),
        }
        let mut all: Vec<String> = slices.values().flatten().cloned().collect();
        all.sort();
        all.dedup();
        addrs.send_if_modified(|current| {
            if *current == all {
                return false;
            }
            tracing::info!(replicas = all.len(), "interceptor replicas changed");
            *current = all;
            true
        });
    }
}

/// The ready `ip:port` admin addresses in one slice.
fn ready_addrs(slice: &EndpointSlice, port_name: &str) -> Vec<String> {
    let port = slice.ports.as_ref().and_then(|ports| {
        ports
            .iter()
            .find(|p| port_name.is_empty() || p.name.as_deref() == Some(port_name))
            .and_then(|p| p.port)
    });
    let Some(port) = port else { return Vec::new() };
    slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|e| e.addresses.iter())
        .map(|a| {
            if a.contains(':') {
                format!("[{a}]:{port}")
            } else {
                format!("{a}:{port}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(&str, u64, u64)]) -> Option<HashMap<RouteKey, QueueCounts>> {
        Some(
            pairs
                .iter()
                .map(|(r, c, n)| {
                    (
                        (*r).to_owned(),
                        QueueCounts {
                            concurrency: *c,
                            request_count: *n,
                            idle_ms: None,
                        },
                    )
                })
                .collect(),
        )
    }

    fn aggregate() -> Interceptors {
        Interceptors {
            state: Mutex::new(State::default()),
            wakes: broadcast::channel(8).0,
            sampled: watch::channel(0).0,
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sums_replicas_counts_sparse_requests_and_tolerates_an_unreachable_one() {
        let agg = aggregate();
        let addrs = vec!["a".to_owned(), "b".to_owned()];
        agg.record(
            &addrs,
            vec![counts(&[("ns/r", 2, 0)]), counts(&[("ns/r", 3, 0)])],
        );
        assert_eq!(agg.metrics("ns/r").concurrency, 5.0);
        tokio::time::advance(Duration::from_secs(10)).await;
        // b is unreachable: its last concurrency (3) still counts.
        agg.record(&addrs, vec![counts(&[("ns/r", 0, 30)]), None]);
        assert_eq!(agg.metrics("ns/r").concurrency, 3.0);
        assert_eq!(agg.replicas(), (2, 1));
        // 30 requests in 10 s on a.
        let rate = agg.rate("ns/r", Duration::from_secs(60), Duration::from_secs(1));
        assert!((rate - 3.0).abs() < 1e-9, "{rate}");
        // b leaves the Service: its concurrency goes with it.
        let only_a = vec!["a".to_owned()];
        tokio::time::advance(Duration::from_secs(10)).await;
        let before = agg.metrics("ns/r").last_active;
        agg.record(&only_a, vec![counts(&[("ns/r", 0, 31)])]);
        let after = agg.metrics("ns/r");
        assert_eq!(after.concurrency, 0.0);
        // One quick request between samples is still activity.
        assert!(after.last_active > before);
        tokio::time::advance(Duration::from_secs(10)).await;
        agg.record(&only_a, vec![counts(&[("ns/r", 0, 31)])]);
        assert_eq!(
            agg.metrics("ns/r").last_active,
            after.last_active,
            "no requests: no activity"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_replica_counts_from_zero() {
        let agg = aggregate();
        let addrs = vec!["a".to_owned()];
        agg.record(&addrs, vec![counts(&[("r", 0, 100)])]);
        tokio::time::advance(Duration::from_secs(1)).await;
        agg.record(&addrs, vec![counts(&[("r", 0, 104)])]);
        let rate = agg.rate("r", Duration::from_secs(1), Duration::from_secs(1));
        assert!(
            (rate - 4.0).abs() < 1e-9,
            "the 100 counted before the first sample are a baseline: {rate}"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        agg.record(&addrs, vec![counts(&[("r", 0, 4)])]);
        let rate = agg.rate("r", Duration::from_secs(1), Duration::from_secs(1));
        assert!((rate - 4.0).abs() < 1e-9, "{rate}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_controller_learns_how_long_a_route_has_been_idle_from_the_interceptors() {
        let agg = aggregate();
        tokio::time::advance(Duration::from_secs(600)).await;
        let addrs = vec!["a".to_owned(), "b".to_owned()];
        let with_idle = |idle: u64| {
            Some(HashMap::from([(
                "ns/r".to_owned(),
                QueueCounts {
                    concurrency: 0,
                    request_count: 7,
                    idle_ms: Some(idle),
                },
            )]))
        };
        // Its first sample is a baseline for counts, but the idle time is known at once: the
        // latest activity over the replicas (b saw a request 3 s ago, a 120 s ago).
        agg.record(&addrs, vec![with_idle(120_000), with_idle(3_000)]);
        let last = agg.metrics("ns/r").last_active.unwrap();
        assert_eq!(Instant::now().duration_since(last), Duration::from_secs(3));
        // A replica that says nothing of idleness (an older interceptor) changes nothing.
        tokio::time::advance(Duration::from_secs(1)).await;
        agg.record(&addrs, vec![counts(&[("ns/r", 0, 7)]), with_idle(4_000)]);
        assert_eq!(agg.metrics("ns/r").last_active, Some(last));
    }

    #[tokio::test(start_paused = true)]
    async fn an_event_stream_is_dropped_when_silent_or_when_a_line_is_too_long() {
        use futures_util::stream;
        let idle = Duration::from_secs(45);
        // Pings every 15 s keep it alive; then silence ends it.
        let pings = stream::unfold(0, |n| async move {
            if n < 4 {
                tokio::time::sleep(Duration::from_secs(15)).await;
                Some((
                    Ok::<_, std::io::Error>(Bytes::from_static(b"{\"type\":\"ping\"}\n")),
                    n + 1,
                ))
            } else {
                std::future::pending().await
            }
        });
        let started = Instant::now();
        let mut lines = 0;
        let end = read_lines(pings, idle, 1024, |_| lines += 1).await;
        assert_eq!(end, StreamEnd::Silent);
        assert_eq!(lines, 4);
        assert_eq!(started.elapsed(), Duration::from_secs(60 + 45));
        // A line that never ends.
        let flood = stream::repeat_with(|| Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 512])));
        assert_eq!(
            read_lines(flood, idle, 4096, |_| {}).await,
            StreamEnd::LineTooLong
        );
        // Split lines are put together.
        let parts = stream::iter(
            ["{\"type\":", "\"wake\"}\n{\"ty", "pe\":\"ping\"}\n"]
                .map(|p| Ok::<_, std::io::Error>(Bytes::from_static(p.as_bytes()))),
        );
        let mut seen = Vec::new();
        let end = read_lines(parts, idle, 4096, |l| seen.push(l.to_vec())).await;
        assert_eq!(end, StreamEnd::Closed);
        assert_eq!(
            seen,
            [
                b"{\"type\":\"wake\"}\n".to_vec(),
                b"{\"type\":\"ping\"}\n".to_vec()
            ]
        );
    }
}
