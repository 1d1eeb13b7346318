//! Sampling each replica's `/queue` every interval, and the metrics about the replicas.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Interceptors, QueueCounts, RouteKey};

impl Interceptors {
    pub(super) async fn sample_loop(
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
