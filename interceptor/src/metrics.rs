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
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::load::Loads;

/// Latency buckets from 1 ms to 60 s: cold starts and slow upstreams live at the top.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Counters and histograms the proxy updates per request.
#[derive(Clone, Debug)]
pub struct ProxyMetrics {
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
        let metrics = Self {
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

    /// Records one answered request.
    pub fn request(&self, route: &str, method: &Method, code: StatusCode, elapsed: Duration) {
        self.requests
            .with_label_values(&[route, method_label(method), code.as_str()])
            .inc();
        if !route.is_empty() {
            self.duration
                .with_label_values(&[route])
                .observe(elapsed.as_secs_f64());
        }
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
        let descs = in_flight
            .desc()
            .into_iter()
            .chain(held.desc())
            .cloned()
            .collect();
        Ok(Self {
            loads,
            in_flight,
            held,
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
        self.loads.for_each(|route, load| {
            let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.in_flight
                .with_label_values(&[route.as_ref()])
                .set(gauge(load.in_flight()));
            self.held
                .with_label_values(&[route.as_ref()])
                .set(gauge(load.held()));
        });
        let mut families = self.in_flight.collect();
        families.extend(self.held.collect());
        families
    }
}
