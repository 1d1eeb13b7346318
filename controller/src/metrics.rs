//! The controller's Prometheus metrics, registered into the registry `main` owns.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// Reconcile, scaling and wake metrics.
#[derive(Clone, Debug)]
pub struct ControllerMetrics {
    reconciles: IntCounterVec,
    reconcile_duration: HistogramVec,
    scale_actions: IntCounterVec,
    wake_latency: HistogramVec,
}

impl ControllerMetrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            reconciles: IntCounterVec::new(
                Opts::new("wakegate_controller_reconciles_total", "Reconciles of HTTPScaledObjects, by outcome"),
                &["outcome"],
            )?,
            reconcile_duration: HistogramVec::new(
                HistogramOpts::new("wakegate_controller_reconcile_duration_seconds", "Time spent in one reconcile"),
                &[],
            )?,
            scale_actions: IntCounterVec::new(
                Opts::new("wakegate_controller_scale_actions_total", "Replica changes made by the standalone scaler, by reason"),
                &["reason"],
            )?,
            wake_latency: HistogramVec::new(
                HistogramOpts::new(
                    "wakegate_controller_wake_latency_seconds",
                    "From the first held request on an interceptor to the scale call (standalone) or the StreamIsActive push (KEDA)",
                )
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
                &["action"],
            )?,
        };
        registry.register(Box::new(m.reconciles.clone()))?;
        registry.register(Box::new(m.reconcile_duration.clone()))?;
        registry.register(Box::new(m.scale_actions.clone()))?;
        registry.register(Box::new(m.wake_latency.clone()))?;
        Ok(m)
    }

    /// Records a reconcile; `error` is the error kind when it failed.
    pub fn reconciled(&self, took: Duration, error: Option<&str>) {
        self.reconciles
            .with_label_values(&[error.unwrap_or("ok")])
            .inc();
        self.reconcile_duration
            .with_label_values(&[] as &[&str])
            .observe(took.as_secs_f64());
    }

    /// Records a replica change.
    pub fn scaled(&self, reason: &str) {
        self.scale_actions.with_label_values(&[reason]).inc();
    }

    /// Records the latency from a held request (Unix µs) to `action` (`scale` or `push`).
    pub fn wake_latency(&self, held_at_us: Option<u64>, action: &str) -> Option<Duration> {
        let held_at = UNIX_EPOCH + Duration::from_micros(held_at_us?);
        let latency = SystemTime::now()
            .duration_since(held_at)
            .unwrap_or_default();
        self.wake_latency
            .with_label_values(&[action])
            .observe(latency.as_secs_f64());
        Some(latency)
    }
}
