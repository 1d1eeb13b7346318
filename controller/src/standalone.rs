//! The standalone scaler: Wakegate scales workloads itself, through their `/scale`
//! subresource, where KEDA is absent. A wake is acted on the moment it arrives, in its own task,
//! never behind a sweep; everything else is re-decided after each sample of the interceptors'
//! counts. Replica counts come from watches ([`Workloads`]): a wake at zero is one `/scale`
//! patch with the watched resourceVersion as its precondition, and a sweep reads nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;
use serde_json::json;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use wakegate_crds::{ScalingMetric, Workload};

use crate::decide::{decide, wanted, Reason, ScaleDecision, ScaleInput};
use crate::interceptors::{Interceptors, Wake};
use crate::metrics::ControllerMetrics;
use crate::routes::{RouteEntry, Routes};
use crate::workloads::{WorkloadKey, Workloads};
use tracing::Instrument as _;

/// Scales the routes' workloads until `stop`.
pub struct StandaloneScaler {
    /// The kube client.
    pub client: Client,
    /// Accepted routes.
    pub routes: Arc<Routes>,
    /// Aggregated interceptor counts and wakes.
    pub interceptors: Arc<Interceptors>,
    /// Metrics.
    pub metrics: ControllerMetrics,
    /// How long a higher replica count wanted recently holds off a scale-in above zero.
    pub stabilization: Duration,
    /// When this controller started.
    pub started: Instant,
    /// Watched replica counts.
    pub workloads: Arc<Workloads>,
}

impl StandaloneScaler {
    /// Runs until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let this = Arc::new(self);
        let mut wakes = this.interceptors.wakes();
        // Wakes have their own path: each is handled in its own task the moment it arrives.
        tokio::spawn({
            let this = this.clone();
            let stop = stop.clone();
            async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        wake = wakes.recv() => match wake {
                            Ok(wake) => {
                                let this = this.clone();
                                tokio::spawn(async move { this.on_wake(&wake).await });
                            }
                            Err(broadcast::error::RecvError::Lagged(_)) => {}
                            Err(broadcast::error::RecvError::Closed) => return,
                        },
                    }
                }
            }
        });
        this.sweep(stop).await;
    }

    /// Re-decides every route after each sample, until `stop`.
    async fn sweep(&self, stop: CancellationToken) {
        let mut sampled = self.interceptors.sampled();
        let mut recent: HashMap<String, VecDeque<(Instant, i32)>> = HashMap::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                changed = sampled.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let targets: Vec<Target> = self.routes.all().into_iter().filter_map(Target::of).collect();
                    for route in &targets {
                        self.evaluate(route, &mut recent).await;
                    }
                    let keys: Vec<String> = targets.iter().map(|r| format!("{}/{}", r.entry.namespace, r.entry.name)).collect();
                    recent.retain(|k, _| keys.contains(k));
                }
            }
        }
    }

    fn api(&self, route: &Target) -> Api<DynamicObject> {
        let (group, version) = match route.workload.api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", route.workload.api_version.as_str()),
        };
        let gvk = GroupVersionKind::gvk(group, version, &route.workload.kind);
        Api::namespaced_with(
            self.client.clone(),
            &route.entry.namespace,
            &ApiResource::from_gvk(&gvk),
        )
    }

    /// A held request at a workload at zero: scale to `max(1, min)` now, in a span joined to
    /// the held request's trace.
    async fn on_wake(&self, wake: &Wake) {
        let span = wake.span("wake");
        self.wake(wake).instrument(span).await;
    }

    async fn wake(&self, wake: &Wake) {
        let Some(route) = self.routes.get(&wake.route).and_then(Target::of) else {
            tracing::debug!(route = %wake.route, "wake for a route whose workload this controller does not scale");
            return;
        };
        if route.entry.other_owner.is_some() {
            return;
        }
        let api = self.api(&route);
        let to = route.workload.min_replicas.max(1);
        let woke = match self.workloads.get(&workload_key(&route)) {
            Some(seen) if seen.replicas > 0 => return,
            // At zero as last watched: one patch, which fails if the workload changed since.
            Some(seen) => match self
                .patch_scale(&api, &route, to, Some(&seen.resource_version))
                .await
            {
                Ok(()) => {
                    self.scaled(&route, to, Reason::Wake);
                    true
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    self.wake_by_reading(&api, &route, to).await
                }
                Err(err) => {
                    tracing::warn!(workload = %route.workload.target_workload(), error = %err, "cannot scale the workload");
                    false
                }
            },
            None => self.wake_by_reading(&api, &route, to).await,
        };
        if woke {
            if let Some(latency) = self.metrics.wake_latency(wake.held_at_us, "scale") {
                tracing::info!(route = %wake.route, replicas = to, wake_latency_us = latency.as_micros() as u64, "woke workload");
            }
        }
    }

    /// A wake for a workload whose replicas are not watched (or changed under the watch): read
    /// `/scale`, and patch it if it is at zero.
    async fn wake_by_reading(&self, api: &Api<DynamicObject>, route: &Target, to: i32) -> bool {
        let current = match api.get_scale(&route.workload.name).await {
            Ok(scale) => scale.spec.and_then(|s| s.replicas).unwrap_or(0),
            Err(err) => {
                tracing::warn!(workload = %route.workload.target_workload(), error = %err, "cannot read the workload's scale");
                return false;
            }
        };
        current == 0 && self.scale(api, route, to, Reason::Wake).await
    }

    async fn evaluate(
        &self,
        route: &Target,
        recent: &mut HashMap<String, VecDeque<(Instant, i32)>>,
    ) {
        if route.entry.other_owner.is_some() {
            return;
        }
        let key = format!("{}/{}", route.entry.namespace, route.entry.name);
        let api = self.api(route);
        let current = match self.workloads.get(&workload_key(route)) {
            Some(seen) => seen.replicas,
            None => match api.get_scale(&route.workload.name).await {
                Ok(scale) => scale.spec.and_then(|s| s.replicas).unwrap_or(0),
                Err(err) => {
                    tracing::debug!(route = %key, error = %err, "cannot read the workload's scale");
                    return;
                }
            },
        };
        let m = self.interceptors.metrics(&key);
        // With both metrics, the larger replica demand wins: the metric asking for more
        // replicas per its target is the one decided on.
        let (value, target) = route
            .entry
            .spec
            .metrics
            .iter()
            .map(|metric| match metric {
                ScalingMetric::Concurrency { target } => (m.concurrency, *target),
                ScalingMetric::RequestRate {
                    target,
                    window,
                    granularity,
                } => (self.interceptors.rate(&key, *window, *granularity), *target),
            })
            .max_by(|a, b| (a.0 / a.1).total_cmp(&(b.0 / b.1)))
            .unwrap_or((m.concurrency, 1.0));
        let now = Instant::now();
        let history = recent.entry(key.clone()).or_default();
        while history
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > self.stabilization)
        {
            history.pop_front();
        }
        let mut input = ScaleInput {
            current,
            min: route.workload.min_replicas,
            max: route.workload.max_replicas,
            value,
            target,
            in_flight: m.concurrency,
            // Never seen active by any interceptor since this controller started: count from
            // the start, so a restart cannot make a warm workload look idle. A keep-awake
            // deadline ahead is busy time; once it passes, the interceptors' idle time runs
            // from it.
            idle_for: if m.kept_awake(now) {
                Duration::ZERO
            } else {
                now.duration_since(m.last_active.unwrap_or(self.started))
            },
            scaledown_period: route.workload.scaledown_period,
            in_initial_cooldown: route.entry.created.is_some_and(|c| {
                SystemTime::now().duration_since(c).unwrap_or_default()
                    < route.workload.initial_cooldown
            }),
            recent_max: 0,
        };
        history.push_back((now, wanted(&input)));
        input.recent_max = history.iter().map(|(_, w)| *w).max().unwrap_or(0);
        if let ScaleDecision::ScaleTo(to, reason) = decide(&input) {
            self.scale(&api, route, to, reason).await;
        }
    }

    async fn scale(
        &self,
        api: &Api<DynamicObject>,
        route: &Target,
        to: i32,
        reason: Reason,
    ) -> bool {
        match self.patch_scale(api, route, to, None).await {
            Ok(()) => {
                self.scaled(route, to, reason);
                true
            }
            Err(err) => {
                tracing::warn!(workload = %route.workload.target_workload(), error = %err, "cannot scale the workload");
                false
            }
        }
    }

    /// Patches the replicas through `/scale`; with `version`, only if the workload is still at
    /// that resourceVersion (409 otherwise).
    async fn patch_scale(
        &self,
        api: &Api<DynamicObject>,
        route: &Target,
        to: i32,
        version: Option<&str>,
    ) -> Result<(), kube::Error> {
        let patch = match version {
            Some(rv) => json!({"metadata": {"resourceVersion": rv}, "spec": {"replicas": to}}),
            None => json!({"spec": {"replicas": to}}),
        };
        let span = tracing::info_span!(
            target: wakegate_telemetry::TARGET,
            "scale",
            otel.name = "PATCH scale",
            otel.kind = "client",
            wakegate.workload = %route.workload.target_workload(),
            k8s.namespace.name = %route.entry.namespace,
            wakegate.replicas = to,
            otel.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let patched = api
            .patch_scale(
                &route.workload.name,
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .instrument(span.clone())
            .await
            .map(|_| ());
        if let Err(err) = &patched {
            span.record("otel.status_code", "error");
            span.record(
                "error.type",
                match err {
                    kube::Error::Api(s) => s.code.to_string(),
                    _ => "request".to_owned(),
                },
            );
        }
        patched
    }

    fn scaled(&self, route: &Target, to: i32, reason: Reason) {
        self.metrics.scaled(reason.as_str());
        tracing::info!(route = %format!("{}/{}", route.entry.namespace, route.entry.name), workload = %route.workload.target_workload(), replicas = to, reason = reason.as_str(), "scaled");
    }
}

/// A route whose workload the standalone scaler scales: an HTTPScaledObject's, or an
/// InterceptorRoute's named by its `wakegate.dev/scale-target-ref` annotation.
struct Target {
    entry: RouteEntry,
    workload: Workload,
}

impl Target {
    fn of(entry: RouteEntry) -> Option<Self> {
        let workload = entry.spec.workload.clone()?;
        Some(Self { entry, workload })
    }
}

fn workload_key(route: &Target) -> WorkloadKey {
    WorkloadKey {
        api_version: route.workload.api_version.clone(),
        kind: route.workload.kind.clone(),
        namespace: route.entry.namespace.clone(),
        name: route.workload.name.clone(),
    }
}
