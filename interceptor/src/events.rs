//! Wake events: the push half of the wake path to the controller.
//!
//! The proxy core publishes an event the moment a route's first request is held. The admin
//! server streams them as newline-delimited JSON on `GET /events`, one stream per subscriber
//! (the controller keeps one open to every interceptor replica), so a wake reaches the
//! controller without any polling tick:
//!
//! ```text
//! {"type":"hello","queue":{"ns/app":{"Concurrency":3,"RequestCount":17}}}
//! {"type":"wake","route":"ns/app","target":"ns/app","at":1795653932178,"atUs":1795653932178042,"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
//! {"type":"ready","route":"ns/app","target":"ns/app","at":1795653932480,"atUs":1795653932480311}
//! {"type":"served","route":"ns/app","target":"ns/app","at":1795653932482,"atUs":1795653932481940}
//! {"type":"ping"}
//! ```
//!
//! `ready` marks the moment the held requests of a wake were released (the target's first
//! endpoint became ready, as the proxy saw it), once per wake; load testers use the pair to split
//! a cold start into boot time and proxy overhead. `served` follows when the first released
//! request's response headers arrive from the target (its first byte, as the proxy saw it); the
//! dashboard draws the three as a wake's phases.
//!
//! `hello` comes first, with the counts at subscription time, so a controller that connects
//! while requests are already held sees them at once. `ping` comes every 15 s so either side
//! notices a dead peer.

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::SpanContext;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::provider::{RouteId, TargetId};

/// One wake or ready event.
#[derive(Clone, Debug, Serialize)]
pub struct Wake {
    /// `wake`, `ready` or `served`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The route whose first request is held.
    pub route: RouteId,
    /// Its target.
    pub target: TargetId,
    /// When the request was held, in Unix milliseconds.
    pub at: u64,
    /// The same, in Unix microseconds, for measuring wake latency.
    #[serde(rename = "atUs")]
    pub at_us: u64,
    /// The W3C `traceparent` of the request that raised the wake, when traces are on: the
    /// controller's wake and scale spans join its trace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// The broadcaster of wake events.
#[derive(Clone, Debug)]
pub struct WakeEvents(broadcast::Sender<Wake>);

impl Default for WakeEvents {
    fn default() -> Self {
        Self(broadcast::channel(1024).0)
    }
}

impl WakeEvents {
    /// Publishes a wake; nobody listening is fine.
    pub fn publish(&self, route: &RouteId, target: &TargetId, trace: Option<&SpanContext>) {
        self.send("wake", route, target, trace);
    }

    /// Publishes that the first request released after a wake got its response headers.
    pub fn publish_served(&self, route: &RouteId, target: &TargetId) {
        self.send("served", route, target, None);
    }

    /// Publishes that a wake's held requests were released.
    pub fn publish_ready(&self, route: &RouteId, target: &TargetId) {
        self.send("ready", route, target, None);
    }

    fn send(
        &self,
        kind: &'static str,
        route: &RouteId,
        target: &TargetId,
        trace: Option<&SpanContext>,
    ) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let _ = self.0.send(Wake {
            kind,
            route: route.clone(),
            target: target.clone(),
            at: now.as_millis() as u64,
            at_us: now.as_micros() as u64,
            traceparent: trace.map(wakegate_telemetry::context::traceparent),
        });
    }

    /// A new subscription.
    pub fn subscribe(&self) -> broadcast::Receiver<Wake> {
        self.0.subscribe()
    }
}
