//! KEDA's external scaler service (`externalscaler.ExternalScaler`), for `external-push`
//! triggers.
//!
//! - `StreamIsActive` pushes `true` the moment an interceptor holds a route's first request
//!   (KEDA then scales 0 -> 1 at once). KEDA ignores a pushed `false`; scale-to-zero goes
//!   through its polling and `cooldownPeriod`.
//! - `IsActive` is true while requests are in flight, or when any request was seen within the
//!   activity window (KEDA's polling interval), so sparse traffic between two polls keeps the
//!   route awake; KEDA's cooldown (the route's `scaledownPeriod`) then runs from the last one.
//! - `GetMetrics` reports concurrency or request rate as a float, and never rounds a non-zero
//!   value to a zero integer.

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

impl KedaScaler {
    fn route(&self, r: &ScaledObjectRef) -> Result<(String, RouteEntry), Status> {
        let name = r
            .scaler_metadata
            .get("httpScaledObject")
            .filter(|n| !n.is_empty())
            .unwrap_or(&r.name);
        let key = format!("{}/{name}", r.namespace);
        match self.routes.get(&key) {
            Some(route) => Ok((key, route)),
            None => Err(Status::not_found(format!(
                "no valid HTTPScaledObject {key} is known to this controller (check its status)"
            ))),
        }
    }

    fn active(&self, key: &str) -> bool {
        let m = self.interceptors.metrics(key);
        m.concurrency > 0.0
            || m.last_active
                .is_some_and(|t| Instant::now().duration_since(t) < self.activity_window)
    }

    fn value(&self, key: &str, route: &RouteEntry) -> (f64, f64) {
        match route.spec.metric {
            ScalingMetric::Concurrency { target } => {
                (self.interceptors.metrics(key).concurrency, target)
            }
            ScalingMetric::RequestRate {
                target,
                window,
                granularity,
            } => (self.interceptors.rate(key, window, granularity), target),
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
        let (key, _) = self.route(request.get_ref())?;
        Ok(Response::new(IsActiveResponse {
            result: self.active(&key),
        }))
    }

    type StreamIsActiveStream = ActiveStream;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<ActiveStream>, Status> {
        let (key, _) = self.route(request.get_ref())?;
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

    // The integer fields are deprecated in the proto, but older KEDA releases still read them.
    #[allow(deprecated)]
    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let (_, route) = self.route(request.get_ref())?;
        let (_, target) = self.value("", &route);
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: route.name.clone(),
                target_size: target.ceil() as i64,
                target_size_float: target,
            }],
        }))
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
        let (key, route) = self.route(&r)?;
        let (value, _) = self.value(&key, &route);
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: if req.metric_name.is_empty() {
                    route.name.clone()
                } else {
                    req.metric_name
                },
                // Never rounded down to zero: 0.2 requests per second is still traffic.
                metric_value: value.ceil() as i64,
                metric_value_float: value,
            }],
        }))
    }
}
