//! The proxy's Prometheus metrics, registered into a registry that `main` owns.
//!
//! Labels are bounded: route ids come from configuration, methods are folded to the standard set,
//! codes are HTTP status codes and error kinds come from a fixed enum. Gauges of in-flight and
//! held requests are read from [`Loads`] at scrape time rather than kept twice.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::load::Loads;

/// Latency buckets from 1 ms to 60 s: cold starts and slow upstreams live at the top.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The KEDA HTTP Add-on's request-duration buckets, kept so its dashboards read ours.
const ADDON_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Counters and histograms the proxy updates per request: Wakegate's own (`wakegate_*`, keyed by
/// the route id) and, for add-on users' dashboards and alerts, the KEDA HTTP Add-on's
/// (`interceptor_*`, keyed by `route_name` and `route_namespace`).
#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    addon_requests: IntCounterVec,
    addon_duration: HistogramVec,
    addon_rejections: IntCounterVec,
    addon_cold_start: HistogramVec,
    requests: IntCounterVec,
    duration: HistogramVec,
    cold_starts: IntCounterVec,
    cold_start_wait: HistogramVec,
    upstream_errors: IntCounterVec,
    client_errors: IntCounterVec,
    failovers: IntCounterVec,
}

impl ProxyMetrics {
    /// Creates the metrics and registers them, plus the load gauges, into `registry`.
    pub fn register(registry: &Registry, loads: Arc<Loads>) -> prometheus::Result<Self> {
        let addon = [
            "code",
            "method",
            "route_name",
            "route_namespace",
            "cold_start",
        ];
        let metrics = Self {
            addon_requests: IntCounterVec::new(
                Opts::new(
                    "interceptor_request_count_total",
                    "Requests answered (the KEDA HTTP Add-on's metric)",
                ),
                &addon,
            )?,
            addon_duration: HistogramVec::new(
                HistogramOpts::new(
                    "interceptor_request_duration_seconds",
                    "Time from request arrival to the end of the response (the KEDA HTTP Add-on's metric)",
                )
                .buckets(ADDON_BUCKETS.to_vec()),
                &addon,
            )?,
            addon_rejections: IntCounterVec::new(
                Opts::new(
                    "interceptor_cold_start_rejections_total",
                    "Requests turned away at a cold start because the hold cap was reached (the KEDA HTTP Add-on's metric)",
                ),
                &["route_name", "route_namespace"],
            )?,
            addon_cold_start: HistogramVec::new(
                HistogramOpts::new(
                    "interceptor_cold_start_duration_seconds",
                    "Time a request waited for a ready endpoint, by outcome: warm, waited, timeout, cancelled (the KEDA HTTP Add-on's 0.16 metric)",
                )
                .buckets(ADDON_BUCKETS.to_vec()),
                &["route_name", "route_namespace", "outcome"],
            )?,
            requests: IntCounterVec::new(
                Opts::new(
                    "wakegate_requests_total",
                    "Requests answered, by route, method and status code",
                ),
                &["route", "method", "code"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "wakegate_request_duration_seconds",
                    "Time from request arrival to the end of the response body",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["route"],
            )?,
            cold_starts: IntCounterVec::new(
                Opts::new(
                    "wakegate_cold_starts_total",
                    "Requests that were held for a cold start and then forwarded",
                ),
                &["route"],
            )?,
            cold_start_wait: HistogramVec::new(
                HistogramOpts::new(
                    "wakegate_cold_start_wait_seconds",
                    "Time a held request waited for a ready endpoint",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["route"],
            )?,
            failovers: IntCounterVec::new(
                Opts::new(
                    "wakegate_failovers_total",
                    "Held requests sent to the failover target after the cold-start timeout",
                ),
                &["route"],
            )?,
            upstream_errors: IntCounterVec::new(
                Opts::new(
                    "wakegate_upstream_errors_total",
                    "Requests that failed upstream, by route and kind",
                ),
                &["route", "kind"],
            )?,
            client_errors: IntCounterVec::new(
                Opts::new(
                    "wakegate_client_errors_total",
                    "Requests that failed because of the client (malformed, gone, too slow), by route and kind",
                ),
                &["route", "kind"],
            )?,
        };
        registry.register(Box::new(metrics.addon_requests.clone()))?;
        registry.register(Box::new(metrics.addon_duration.clone()))?;
        registry.register(Box::new(metrics.addon_rejections.clone()))?;
        registry.register(Box::new(metrics.addon_cold_start.clone()))?;
        registry.register(Box::new(metrics.requests.clone()))?;
        registry.register(Box::new(metrics.client_errors.clone()))?;
        registry.register(Box::new(metrics.duration.clone()))?;
        registry.register(Box::new(metrics.cold_starts.clone()))?;
        registry.register(Box::new(metrics.cold_start_wait.clone()))?;
        registry.register(Box::new(metrics.upstream_errors.clone()))?;
        registry.register(Box::new(metrics.failovers.clone()))?;
        registry.register(Box::new(LoadCollector::new(loads)?))?;
        Ok(metrics)
    }

    /// The handles of `route`'s per-request series, resolved now so that a request costs no
    /// label hashing (made when the route table is built).
    pub fn route(&self, route: &str) -> RouteMetrics {
        let (namespace, name) = addon_route(route);
        RouteMetrics {
            duration: self.duration.with_label_values(&[route]),
            warm: self
                .addon_cold_start
                .with_label_values(&[name, namespace, "warm"]),
            answered: arc_swap::ArcSwap::from_pointee(Vec::new()),
            metrics: self.clone(),
            route: route.into(),
        }
    }

    /// Records one answered request; `cold` when it waited for a cold start.
    pub fn request(
        &self,
        route: &str,
        method: &Method,
        code: StatusCode,
        elapsed: Duration,
        cold: bool,
    ) {
        let seconds = elapsed.as_secs_f64();
        if !route.is_empty() {
            self.duration.with_label_values(&[route]).observe(seconds);
        }
        self.answered(route, method, code, cold).record(seconds);
    }

    /// The series keyed by method and code, looked up by label.
    fn answered(&self, route: &str, method: &Method, code: StatusCode, cold: bool) -> Answered {
        let (namespace, name) = addon_route(route);
        let labels = [
            code.as_str(),
            addon_method(method),
            name,
            namespace,
            if cold { "true" } else { "false" },
        ];
        Answered {
            requests: self.requests.with_label_values(&[
                route,
                method_label(method),
                code.as_str(),
            ]),
            addon_requests: self.addon_requests.with_label_values(&labels),
            addon_duration: self.addon_duration.with_label_values(&labels),
        }
    }

    /// Records how a request's wait for an endpoint ended: `warm` (none needed), `waited`,
    /// `timeout` or `cancelled`.
    pub fn cold_start_outcome(&self, route: &str, outcome: &'static str, waited: Duration) {
        let (namespace, name) = addon_route(route);
        self.addon_cold_start
            .with_label_values(&[name, namespace, outcome])
            .observe(waited.as_secs_f64());
    }

    /// Records a request turned away by a hold cap.
    pub fn cold_start_rejection(&self, route: &str) {
        let (namespace, name) = addon_route(route);
        self.addon_rejections
            .with_label_values(&[name, namespace])
            .inc();
    }

    /// Records a request that was held and then got an endpoint.
    pub fn cold_start(&self, route: &str, waited: Duration) {
        self.cold_starts.with_label_values(&[route]).inc();
        self.cold_start_wait
            .with_label_values(&[route])
            .observe(waited.as_secs_f64());
    }

    /// Records a request sent to the failover target.
    pub fn failover(&self, route: &str) {
        self.failovers.with_label_values(&[route]).inc();
    }

    /// Records a client's failure of a bounded `kind`; `route` is empty before routing.
    pub fn client_error(&self, route: &str, kind: &'static str) {
        self.client_errors.with_label_values(&[route, kind]).inc();
    }

    /// Records an upstream failure of a bounded `kind`.
    pub fn upstream_error(&self, route: &str, kind: &'static str) {
        self.upstream_errors.with_label_values(&[route, kind]).inc();
    }
}

/// One route's per-request series. The ones keyed by method, code and cold start are resolved on
/// first use and kept in a small copy-on-write list (a lock-free read); past
/// `MAX_ANSWERED` combinations they are looked up by label each time.
pub struct RouteMetrics {
    duration: Histogram,
    warm: Histogram,
    answered: arc_swap::ArcSwap<Vec<(u32, Answered)>>,
    metrics: ProxyMetrics,
    route: Box<str>,
}

/// The series one kind of answer (method, code, cold start) updates.
#[derive(Clone)]
struct Answered {
    requests: IntCounter,
    addon_requests: IntCounter,
    addon_duration: Histogram,
}

impl Answered {
    fn record(&self, seconds: f64) {
        self.requests.inc();
        self.addon_requests.inc();
        self.addon_duration.observe(seconds);
    }
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl RouteMetrics {
    /// Method, code and cold-start combinations kept resolved per route.
    const MAX_ANSWERED: usize = 32;

    /// Records one answered request, as [`ProxyMetrics::request`] does.
    pub fn request(&self, method: &Method, code: StatusCode, elapsed: Duration, cold: bool) {
        let key = (method_index(method) << 11) | (u32::from(code.as_u16()) << 1) | u32::from(cold);
        let seconds = elapsed.as_secs_f64();
        self.duration.observe(seconds);
        {
            let list = self.answered.load();
            if let Some((_, answered)) = list.iter().find(|(k, _)| *k == key) {
                return answered.record(seconds);
            }
            if list.len() >= Self::MAX_ANSWERED {
                return self
                    .metrics
                    .answered(&self.route, method, code, cold)
                    .record(seconds);
            }
        }
        let answered = self.metrics.answered(&self.route, method, code, cold);
        answered.record(seconds);
        self.answered.rcu(|list| {
            let mut list = Vec::clone(list);
            if !list.iter().any(|(k, _)| *k == key) {
                list.push((key, answered.clone()));
            }
            list
        });
    }

    /// Records a request that needed no wait (the add-on's `warm` outcome).
    pub fn warm(&self) {
        self.warm.observe(0.0);
    }
}

/// `(route_namespace, route_name)` of a route id: `namespace/name` in Kubernetes, a bare name
/// (no namespace) in local mode.
fn addon_route(route: &str) -> (&str, &str) {
    route.split_once('/').unwrap_or(("", route))
}

/// The add-on's method label: the standard methods, anything else `_OTHER`.
fn addon_method(method: &Method) -> &'static str {
    match method_label(method) {
        "other" => "_OTHER",
        known => known,
    }
}

/// A method's place in the standard set (10 for any other), for keys.
fn method_index(method: &Method) -> u32 {
    match *method {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::DELETE => 3,
        Method::HEAD => 4,
        Method::OPTIONS => 5,
        Method::PATCH => 6,
        Method::CONNECT => 7,
        Method::TRACE => 8,
        _ => 10,
    }
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Reads in-flight and held gauges from [`Loads`] at scrape time.
struct LoadCollector {
    loads: Arc<Loads>,
    in_flight: IntGaugeVec,
    held: IntGaugeVec,
    /// The add-on's `interceptor_request_concurrency`.
    concurrency: IntGaugeVec,
    kept_awake: IntGauge,
    keep_awake_left: prometheus::GaugeVec,
    descs: Vec<Desc>,
}

impl LoadCollector {
    fn new(loads: Arc<Loads>) -> prometheus::Result<Self> {
        let in_flight = IntGaugeVec::new(
            Opts::new(
                "wakegate_in_flight_requests",
                "Requests in flight now, held ones included",
            ),
            &["route"],
        )?;
        let held = IntGaugeVec::new(
            Opts::new(
                "wakegate_held_requests",
                "Requests held now, waiting for a ready endpoint",
            ),
            &["route"],
        )?;
        let concurrency = IntGaugeVec::new(
            Opts::new(
                "interceptor_request_concurrency",
                "Requests in flight now, held ones included (the KEDA HTTP Add-on's metric)",
            ),
            &["route_name", "route_namespace"],
        )?;
        let kept_awake = IntGauge::new(
            "wakegate_routes_kept_awake",
            "Routes whose backend asked to be kept awake (Wakegate-Keep-Awake) past now",
        )?;
        let keep_awake_left = prometheus::GaugeVec::new(
            Opts::new(
                "wakegate_keep_awake_remaining_seconds",
                "Time until a route's latest keep-awake deadline, for routes kept awake",
            ),
            &["route"],
        )?;
        let descs = in_flight
            .desc()
            .into_iter()
            .chain(held.desc())
            .chain(concurrency.desc())
            .chain(kept_awake.desc())
            .chain(keep_awake_left.desc())
            .cloned()
            .collect();
        Ok(Self {
            loads,
            in_flight,
            held,
            concurrency,
            kept_awake,
            keep_awake_left,
            descs,
        })
    }
}

impl Collector for LoadCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.in_flight.reset();
        self.held.reset();
        self.concurrency.reset();
        self.keep_awake_left.reset();
        let mut kept_awake = 0;
        self.loads.for_each(|route, load| {
            let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.in_flight
                .with_label_values(&[route.as_ref()])
                .set(gauge(load.in_flight()));
            self.held
                .with_label_values(&[route.as_ref()])
                .set(gauge(load.held()));
            let (namespace, name) = addon_route(route);
            self.concurrency
                .with_label_values(&[name, namespace])
                .set(gauge(load.in_flight()));
            if let Some(left) = load.keep_awake_left() {
                kept_awake += 1;
                self.keep_awake_left
                    .with_label_values(&[route.as_ref()])
                    .set(left.as_secs_f64());
            }
        });
        self.kept_awake.set(kept_awake);
        let mut families = self.in_flight.collect();
        families.extend(self.held.collect());
        families.extend(self.concurrency.collect());
        families.extend(self.kept_awake.collect());
        families.extend(self.keep_awake_left.collect());
        families
    }
}

#[cfg(test)]
mod tests {
    use prometheus::Encoder as _;

    use super::*;

    fn scrape(registry: &Registry) -> String {
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    /// A route's resolved handles update exactly the series the label lookups do, past the
    /// resolved list's bound too.
    #[test]
    fn resolved_route_handles_count_what_label_lookups_count() {
        let (by_label, resolved) = (Registry::new(), Registry::new());
        let a = ProxyMetrics::register(&by_label, Arc::new(Loads::default())).unwrap();
        let b = ProxyMetrics::register(&resolved, Arc::new(Loads::default())).unwrap();
        let route = b.route("ns/app");
        // Resolving creates the route's series (at zero) in both.
        let _ = a.route("ns/app");
        let methods = [
            Method::GET,
            Method::POST,
            Method::from_bytes(b"BREW").unwrap(),
        ];
        for i in 0..400u16 {
            let method = &methods[usize::from(i) % 3];
            let code = StatusCode::from_u16(200 + i % 40).unwrap();
            let cold = i % 7 == 0;
            let elapsed = Duration::from_micros(u64::from(i) * 97);
            a.request("ns/app", method, code, elapsed, cold);
            route.request(method, code, elapsed, cold);
        }
        assert!(route.answered.load().len() <= RouteMetrics::MAX_ANSWERED);
        let text = scrape(&resolved);
        assert!(text.contains("interceptor_request_count_total{code=\"200\",cold_start=\"true\",method=\"GET\",route_name=\"app\",route_namespace=\"ns\"} 1"));
        assert!(text.contains("method=\"_OTHER\""));
        let expected = scrape(&by_label);
        let differ: Vec<_> = expected
            .lines()
            .zip(text.lines())
            .filter(|(a, b)| a != b)
            .take(5)
            .collect();
        assert!(differ.is_empty(), "{differ:#?}");
        assert_eq!(expected.lines().count(), text.lines().count());
    }
}
