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
//! The module is the request's way through: `discovery` finds the replicas, `events` keeps a
//! stream open to each, `sampling` polls their `/queue`, and `aggregate` folds the samples
//! into per-route metrics.
//!
//! When a route last had a request comes from the interceptors themselves (`IdleMs` in
//! `/queue`: how long ago, by their own clock), not from what this controller happened to see,
//! so a restarted or newly elected controller knows at its first sample how long each route
//! has been idle. Keep-awake deadlines come the same way (`KeepAwakeMs`: how long until the
//! latest one a backend asked for), so they survive a controller restart too.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod aggregate;
mod discovery;
mod events;
mod sampling;

/// `namespace/name` of an HTTPScaledObject.
pub type RouteKey = String;

/// A wake: a route's first request was held on some interceptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wake {
    /// The route.
    pub route: RouteKey,
    /// When the interceptor held the request (Unix µs), if it said.
    pub held_at_us: Option<u64>,
    /// The held request's W3C `traceparent`, when the interceptor traces.
    pub traceparent: Option<String>,
}

impl Wake {
    /// A span for handling this wake, joined to the held request's trace when the wake
    /// carries one. Nothing when traces are off.
    pub fn span(&self, name: &'static str) -> tracing::Span {
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let span = tracing::info_span!(
            target: wakegate_telemetry::TARGET,
            "wake",
            otel.name = name,
            otel.kind = "internal",
            wakegate.route = %self.route,
        );
        let parent = self
            .traceparent
            .as_deref()
            .and_then(wakegate_telemetry::context::from_traceparent);
        if let Some(parent) = parent {
            use opentelemetry::trace::TraceContextExt as _;
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
        }
        span
    }
}

/// How long request-count history is kept (longer than any sane rate window).
const HISTORY: Duration = Duration::from_secs(15 * 60);

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
    /// How long until the latest keep-awake deadline a backend asked for through this replica
    /// (absent when none is ahead, or from interceptors that do not report it).
    #[serde(rename = "KeepAwakeMs", default)]
    keep_awake_ms: Option<u64>,
}

#[derive(Debug, Default)]
struct Replica {
    last: HashMap<RouteKey, QueueCounts>,
    reachable: bool,
    /// Keep-awake deadlines from the replica's last answer. A replica that stops answering
    /// keeps them until they pass: a backend was promised that time, and the replica that
    /// promised it may only be unreachable from here.
    keep_awake: HashMap<RouteKey, Instant>,
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
    /// The latest keep-awake deadline any replica reports for the route (`Wakegate-Keep-Awake`
    /// from its backend), if one is ahead: the route is active until then.
    pub keep_awake_until: Option<Instant>,
}

impl RouteMetrics {
    /// Whether a keep-awake deadline is still ahead at `now`.
    pub fn kept_awake(&self, now: Instant) -> bool {
        self.keep_awake_until.is_some_and(|t| t > now)
    }
}

#[derive(Debug, Default)]
struct State {
    replicas: HashMap<String, Replica>,
    /// Keep-awake deadlines of replicas that left the Service (an interceptor rollout), kept
    /// until they pass: what a backend was promised does not end with the replica it told.
    departed_keep_awake: HashMap<RouteKey, Instant>,
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
                tokio::spawn(discovery::discover(
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
}

#[cfg(test)]
mod tests {
    use super::events::{read_lines, StreamEnd};
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
                            keep_awake_ms: None,
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
    async fn keep_awake_is_the_latest_deadline_over_replicas_and_outlives_an_unreachable_or_departed_one(
    ) {
        let agg = aggregate();
        let kept = |ms: Option<u64>| {
            Some(HashMap::from([(
                "ns/r".to_owned(),
                QueueCounts {
                    // Kept awake is busy; otherwise this replica saw nothing for an hour.
                    idle_ms: Some(if ms.is_some() { 0 } else { 3_600_000 }),
                    keep_awake_ms: ms,
                    ..QueueCounts::default()
                },
            )]))
        };
        let addrs = vec!["a".to_owned(), "b".to_owned()];
        // A new controller's first sample: a deadline reported is known at once.
        agg.record(&addrs, vec![kept(Some(60_000)), kept(Some(600_000))]);
        let m = agg.metrics("ns/r");
        assert!(m.kept_awake(Instant::now()));
        assert_eq!(
            m.keep_awake_until.unwrap() - Instant::now(),
            Duration::from_secs(600),
            "the latest over replicas"
        );
        // b cannot be reached: its promise stands.
        tokio::time::advance(Duration::from_secs(10)).await;
        agg.record(&addrs, vec![kept(Some(50_000)), None]);
        assert_eq!(
            agg.metrics("ns/r").keep_awake_until.unwrap() - Instant::now(),
            Duration::from_secs(590)
        );
        // b leaves the Service (a rollout): its promise still stands until it passes.
        let only_a = vec!["a".to_owned()];
        agg.record(&only_a, vec![kept(None)]);
        assert!(agg.metrics("ns/r").kept_awake(Instant::now()));
        tokio::time::advance(Duration::from_secs(595)).await;
        let passed_at = Instant::now() - Duration::from_secs(5);
        agg.record(&only_a, vec![kept(None)]);
        let m = agg.metrics("ns/r");
        assert_eq!(m.keep_awake_until, None, "passed");
        assert_eq!(
            m.last_active,
            Some(passed_at),
            "the route was busy until the deadline: scale-down runs from it"
        );

        // A deadline released on a replica (`0`) is gone at its next sample.
        let agg = aggregate();
        agg.record(&only_a, vec![kept(Some(60_000))]);
        assert!(agg.metrics("ns/r").kept_awake(Instant::now()));
        agg.record(&only_a, vec![kept(None)]);
        assert!(!agg.metrics("ns/r").kept_awake(Instant::now()));
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
                    keep_awake_ms: None,
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
