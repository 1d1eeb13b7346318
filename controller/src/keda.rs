//! KEDA's external scaler service (`externalscaler.ExternalScaler`), for `external-push`
//! triggers.
//!
//! - `StreamIsActive` pushes `true` the moment an interceptor holds a route's first request
//!   (KEDA then scales 0 -> 1 at once). KEDA ignores a pushed `false`; scale-to-zero goes
//!   through its polling and `cooldownPeriod`.
//! - `IsActive` is true while requests are in flight, or when any request was seen within the
//!   activity window (KEDA's polling interval), so sparse traffic between two polls keeps the
//!   route awake; KEDA's cooldown (the route's `scaledownPeriod`) then runs from the last one.
//!   It is also true while a backend's keep-awake deadline (`Wakegate-Keep-Awake`, as the
//!   interceptors report it) is ahead, so the cooldown runs from that deadline.
//! - `GetMetrics` reports concurrency or request rate as a float, and never rounds a non-zero
//!   value to a zero integer.
//! - `StreamMetricSpec` sends the metric specs at once and again whenever the route changes, so
//!   an edited `targetValue` reaches the HPA without recreating anything.
//!
//! Which route a ScaledObject means comes from its trigger metadata: `interceptorRoute: <name>`
//! (an InterceptorRoute: metrics `http_<name>_concurrency` and/or `http_<name>_rate`, and no
//! metric spec until the route exists, so KEDA falls back to CPU), or `httpScaledObject:
//! <name>` (an HTTPScaledObject: one metric `http-<namespace>-<name>`, as the add-on names it).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use wakegate_crds::ScalingMetric;

use crate::interceptors::Interceptors;
use crate::metrics::ControllerMetrics;
use crate::proto::external_scaler_server::ExternalScaler;
use crate::proto::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};
use crate::routes::{RouteEntry, Routes};

/// The scaler service.
pub struct KedaScaler {
    /// Accepted routes.
    pub routes: Arc<Routes>,
    /// Aggregated interceptor counts and wakes.
    pub interceptors: Arc<Interceptors>,
    /// Requests seen this recently make a route active (KEDA's polling interval).
    pub activity_window: Duration,
    /// Metrics.
    pub metrics: ControllerMetrics,
    /// Ends open `StreamIsActive` streams on shutdown, so the server can drain.
    pub stop: tokio_util::sync::CancellationToken,
}

/// Which route a ScaledObject's trigger names, and how its metrics are named.
struct Target {
    /// `namespace/name`.
    key: String,
    /// The route, if this controller has accepted it.
    route: Option<RouteEntry>,
    /// `interceptorRoute` metadata (rather than `httpScaledObject`).
    interceptor_route: bool,
    /// The route's name.
    name: String,
}

/// A metric name as KEDA and the HPA accept it: KEDA's normalisation (`/`, `.`, `:` and other
/// unsafe characters become `-`).
fn normalized(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

impl Target {
    /// The metrics KEDA sees for this target: `(name, metric)`.
    fn metrics(&self) -> Vec<(String, ScalingMetric)> {
        let Some(route) = &self.route else {
            return Vec::new();
        };
        if !self.interceptor_route {
            let name = normalized(&format!("http-{}", self.key));
            return route
                .spec
                .metrics
                .first()
                .map(|m| vec![(name, m.clone())])
                .unwrap_or_default();
        }
        route
            .spec
            .metrics
            .iter()
            .map(|m| {
                let suffix = match m {
                    ScalingMetric::Concurrency { .. } => "concurrency",
                    ScalingMetric::RequestRate { .. } => "rate",
                };
                (
                    format!("http_{}_{suffix}", normalized(&self.name)),
                    m.clone(),
                )
            })
            .collect()
    }
}

/// The target a ScaledObject's trigger names, from `routes`.
fn target_in(routes: &Routes, r: &ScaledObjectRef) -> Target {
    let (name, interceptor_route) = match r
        .scaler_metadata
        .get("interceptorRoute")
        .filter(|n| !n.is_empty())
    {
        Some(name) => (name, true),
        None => (
            r.scaler_metadata
                .get("httpScaledObject")
                .filter(|n| !n.is_empty())
                .unwrap_or(&r.name),
            false,
        ),
    };
    let key = format!("{}/{name}", r.namespace);
    Target {
        route: routes.get(&key),
        key,
        interceptor_route,
        name: name.clone(),
    }
}

fn not_found(target: &Target) -> Status {
    let kind = if target.interceptor_route {
        "InterceptorRoute"
    } else {
        "HTTPScaledObject"
    };
    Status::not_found(format!(
        "no valid {kind} {} is known to this controller (check its status)",
        target.key
    ))
}

impl KedaScaler {
    /// The target, which must exist.
    fn route(&self, r: &ScaledObjectRef) -> Result<Target, Status> {
        let target = target_in(&self.routes, r);
        match target.route {
            Some(_) => Ok(target),
            None => Err(not_found(&target)),
        }
    }

    fn active(&self, key: &str) -> bool {
        let m = self.interceptors.metrics(key);
        let now = Instant::now();
        m.concurrency > 0.0
            || m.kept_awake(now)
            || m.last_active
                .is_some_and(|t| now.duration_since(t) < self.activity_window)
    }

    fn value(&self, key: &str, metric: &ScalingMetric) -> f64 {
        match metric {
            ScalingMetric::Concurrency { .. } => self.interceptors.metrics(key).concurrency,
            ScalingMetric::RequestRate {
                window,
                granularity,
                ..
            } => self.interceptors.rate(key, *window, *granularity),
        }
    }

    // The integer fields are deprecated in the proto, but older KEDA releases still read them.
    #[allow(deprecated)]
    fn specs(target: &Target) -> GetMetricSpecResponse {
        GetMetricSpecResponse {
            metric_specs: target
                .metrics()
                .into_iter()
                .map(|(name, m)| MetricSpec {
                    metric_name: name,
                    target_size: m.target().ceil() as i64,
                    target_size_float: m.target(),
                })
                .collect(),
        }
    }
}

type ActiveStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for KedaScaler {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let target = self.route(request.get_ref())?;
        // An interceptorRoute trigger is also active while any of its metrics is above 0 (the
        // add-on's rule: a request rate over a window longer than the activity window counts).
        let result = self.active(&target.key)
            || (target.interceptor_route
                && target
                    .metrics()
                    .iter()
                    .any(|(_, m)| self.value(&target.key, m) > 0.0));
        Ok(Response::new(IsActiveResponse { result }))
    }

    type StreamIsActiveStream = ActiveStream;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<ActiveStream>, Status> {
        let key = self.route(request.get_ref())?.key;
        let wakes = self.interceptors.wakes();
        let initial = self.active(&key);
        let metrics = self.metrics.clone();
        let stop = self.stop.clone();
        tracing::info!(route = %key, "KEDA is streaming activity");
        let state = (wakes, Some(initial), key);
        let stream = futures_util::stream::unfold(state, move |(mut wakes, first, key)| {
            let (metrics, stop) = (metrics.clone(), stop.clone());
            async move {
                if let Some(active) = first {
                    return Some((Ok(IsActiveResponse { result: active }), (wakes, None, key)));
                }
                loop {
                    let wake = tokio::select! {
                        () = stop.cancelled() => return None,
                        wake = wakes.recv() => wake,
                    };
                    match wake {
                        Ok(wake) if wake.route == key => {
                            // The push is the wake's whole work here: KEDA scales from it.
                            let _span = wake.span("StreamIsActive push").entered();
                            if let Some(latency) = metrics.wake_latency(wake.held_at_us, "push") {
                                tracing::info!(route = %key, wake_latency_us = latency.as_micros() as u64, "pushed active to KEDA");
                            }
                            return Some((
                                Ok(IsActiveResponse { result: true }),
                                (wakes, None, key),
                            ));
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let target = target_in(&self.routes, request.get_ref());
        // An InterceptorRoute that does not exist (yet) has no metric spec: KEDA falls back
        // to CPU until it does. An unknown HTTPScaledObject is an error, as it always was.
        if target.route.is_none() && !target.interceptor_route {
            return Err(not_found(&target));
        }
        Ok(Response::new(Self::specs(&target)))
    }

    #[allow(deprecated)]
    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let req = request.into_inner();
        let r = req
            .scaled_object_ref
            .ok_or_else(|| Status::invalid_argument("scaledObjectRef is required"))?;
        let target = self.route(&r)?;
        let metrics = target.metrics();
        // KEDA asks for one metric by name (its `s<index>-` prefix stripped); an empty or
        // unknown name gets every metric of the route.
        let asked: Vec<&(String, ScalingMetric)> =
            match metrics.iter().find(|(name, _)| *name == req.metric_name) {
                Some(one) => vec![one],
                None => metrics.iter().collect(),
            };
        Ok(Response::new(GetMetricsResponse {
            metric_values: asked
                .into_iter()
                .map(|(name, m)| {
                    let value = self.value(&target.key, m);
                    MetricValue {
                        metric_name: name.clone(),
                        // Never rounded down to zero: 0.2 requests per second is still traffic.
                        metric_value: value.ceil() as i64,
                        metric_value_float: value,
                    }
                })
                .collect(),
        }))
    }

    type StreamMetricSpecStream =
        Pin<Box<dyn Stream<Item = Result<GetMetricSpecResponse, Status>> + Send>>;

    async fn stream_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamMetricSpecStream>, Status> {
        let r = request.into_inner();
        let routes = self.routes.clone();
        let stop = self.stop.clone();
        let mut changes = routes.changes();
        // The current specs go out at once.
        changes.mark_changed();
        let state = (changes, None::<GetMetricSpecResponse>);
        let stream = futures_util::stream::unfold(state, move |(mut changes, last)| {
            let (routes, stop, r) = (routes.clone(), stop.clone(), r.clone());
            async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return None,
                        changed = changes.changed() => changed.ok()?,
                    }
                    let target = target_in(&routes, &r);
                    let specs = KedaScaler::specs(&target);
                    if last.as_ref() != Some(&specs) {
                        return Some((Ok(specs.clone()), (changes, Some(specs))));
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
