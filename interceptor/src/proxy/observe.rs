//! What a request keeps for its trace and its access log line, when either is on.
//!
//! The spans follow OpenTelemetry's HTTP conventions:
//! - a server span per proxied request, named `{method} {route}`, continuing the client's
//!   `traceparent` when it sends one;
//! - `hold`, its child for the time the request was held for a cold target, ending with how it
//!   ended (`wakegate.hold.outcome`: `released`, `timed_out`, `failed_over`, `client_gone`);
//! - a client span for the upstream exchange (request sent to response headers), whose context
//!   is the `traceparent` the upstream gets.
//!
//! Spans are built with their real start times: a request parked before hyper served it began
//! its span (and its hold) when it was parked. With traces and the access log both off a
//! request carries no `Observed` at all; the one check is whether the tracer exists.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method, StatusCode, Version};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, Span};
use tokio::time::Instant;

use crate::access_log::{AccessLog, Entry};
use crate::client_conn::ClientConn;
use crate::provider::Endpoint;

/// A request's server span.
pub(crate) struct RequestTrace {
    tracer: &'static SdkTracer,
    span: Span,
    /// The request's arrival, on both clocks: its spans' times are read off one anchor, so a
    /// hold that began at the arrival starts exactly with the server span.
    since: Instant,
    since_wall: SystemTime,
}

impl RequestTrace {
    /// Starts the server span of a request that arrived at `since`, under the trace its
    /// headers carry (or a new one).
    pub(crate) fn start<B>(
        tracer: &'static SdkTracer,
        req: &http::Request<B>,
        host: &str,
        route: &str,
        client: &ClientConn,
        since: Instant,
    ) -> Self {
        let (method, headers, path, version) =
            (req.method(), req.headers(), req.uri().path(), req.version());
        let parent = wakegate_telemetry::context::extract(headers);
        let mut attributes = vec![
            KeyValue::new("http.request.method", method.as_str().to_owned()),
            KeyValue::new("url.path", path.to_owned()),
            KeyValue::new("url.scheme", if client.is_tls() { "https" } else { "http" }),
            KeyValue::new("server.address", host.to_owned()),
            KeyValue::new("client.address", client.remote().ip().to_string()),
            KeyValue::new(
                "network.protocol.version",
                match version {
                    Version::HTTP_2 => "2",
                    Version::HTTP_10 => "1.0",
                    _ => "1.1",
                },
            ),
            KeyValue::new("wakegate.route", route.to_owned()),
        ];
        if let Some(agent) = headers
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
        {
            attributes.push(KeyValue::new("user_agent.original", agent.to_owned()));
        }
        let since_wall = SystemTime::now()
            .checked_sub(since.elapsed())
            .unwrap_or_else(SystemTime::now);
        let span = tracer
            .span_builder(format!("{method} {route}"))
            .with_kind(SpanKind::Server)
            .with_start_time(since_wall)
            .with_attributes(attributes)
            .start_with_context(tracer, &parent);
        Self {
            tracer,
            span,
            since,
            since_wall,
        }
    }

    /// The wall-clock time of `at`, read off the request's arrival.
    fn wall(&self, at: Instant) -> SystemTime {
        match at.checked_duration_since(self.since) {
            Some(after) => self.since_wall.checked_add(after),
            None => self.since_wall.checked_sub(self.since.duration_since(at)),
        }
        .unwrap_or(self.since_wall)
    }

    /// The server span's context: the parent of the request's other spans, and what the wake
    /// event carries to the controller.
    pub(crate) fn context(&self) -> &SpanContext {
        self.span.span_context()
    }

    fn child_context(&self) -> Context {
        Context::new().with_remote_span_context(self.context().clone())
    }

    /// Records a hold from `since` to now, and how it ended.
    pub(crate) fn held(&self, since: Instant, outcome: &'static str) {
        let mut hold = self
            .tracer
            .span_builder("hold")
            .with_kind(SpanKind::Internal)
            .with_start_time(self.wall(since))
            .with_attributes([KeyValue::new("wakegate.hold.outcome", outcome)])
            .start_with_context(self.tracer, &self.child_context());
        if outcome != "released" && outcome != "failed_over" {
            hold.set_status(Status::error(outcome));
        }
        hold.end();
    }

    /// Starts the client span of the upstream exchange, and names it in `headers`.
    pub(crate) fn upstream(
        &self,
        method: &Method,
        endpoint: &Endpoint,
        headers: &mut HeaderMap,
    ) -> Span {
        let authority = endpoint.authority();
        let span = self
            .tracer
            .span_builder(method.as_str().to_owned())
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("http.request.method", method.as_str().to_owned()),
                KeyValue::new("server.address", authority.host().to_owned()),
                KeyValue::new("server.port", i64::from(authority.port_u16().unwrap_or(80))),
            ])
            .start_with_context(self.tracer, &self.child_context());
        wakegate_telemetry::context::inject(span.span_context(), headers);
        span
    }

    fn finish(mut self, status: StatusCode, cold: bool, bytes: u64) {
        self.span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
        self.span
            .set_attribute(KeyValue::new("wakegate.cold_start", cold));
        self.span
            .set_attribute(KeyValue::new("http.response.body.size", bytes as i64));
        if status.is_server_error() {
            self.span
                .set_attribute(KeyValue::new("error.type", status.as_u16().to_string()));
            self.span.set_status(Status::error(""));
        }
        self.span.end();
    }
}

/// Ends an upstream client span with the response's status, or the error that ended it.
pub(crate) fn upstream_ended(mut span: Box<Span>, status: Result<StatusCode, &str>) {
    match status {
        Ok(status) => {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status.as_u16()),
            ));
            if status.is_server_error() {
                span.set_status(Status::error(""));
            }
        }
        Err(kind) => {
            span.set_attribute(KeyValue::new("error.type", kind.to_owned()));
            span.set_status(Status::error(kind.to_owned()));
        }
    }
    span.end();
}

/// A request's trace and access-log bookkeeping, kept in its `Completion`.
pub(crate) struct Observed {
    pub(crate) trace: Option<RequestTrace>,
    /// The path, kept for the access log only.
    path: Option<String>,
    client: IpAddr,
    /// The endpoint the request went to.
    pub(crate) upstream: Option<Endpoint>,
    /// How long it was held for a cold start.
    pub(crate) cold_wait: Option<Duration>,
    /// Response body bytes passed on.
    pub(crate) bytes: u64,
    /// When the current hold began, while the request is held.
    pub(crate) holding: Option<Instant>,
}

impl Observed {
    /// The bookkeeping a request needs, or `None` with traces and the access log off.
    pub(crate) fn new(
        trace: Option<RequestTrace>,
        access_log: bool,
        path: &str,
        client: &ClientConn,
    ) -> Option<Box<Self>> {
        (trace.is_some() || access_log).then(|| {
            Box::new(Self {
                trace,
                path: access_log.then(|| path.to_owned()),
                client: client.remote().ip(),
                upstream: None,
                cold_wait: None,
                bytes: 0,
                holding: None,
            })
        })
    }

    /// Records the hold that ended now, if the request was held.
    pub(crate) fn hold_ended(&mut self, outcome: &'static str) {
        if let Some(since) = self.holding.take() {
            if let Some(trace) = &self.trace {
                trace.held(since, outcome);
            }
        }
    }

    /// Ends the spans and writes the access log line, as the request's response ends.
    pub(crate) fn finish(
        mut self: Box<Self>,
        log: Option<&AccessLog>,
        route: &str,
        method: &Method,
        status: StatusCode,
        duration: Duration,
        cold: bool,
    ) {
        // Still held when the request ended: the client left, or the request timed out.
        self.hold_ended(if status == super::error::CLIENT_CLOSED_REQUEST {
            "client_gone"
        } else {
            "timed_out"
        });
        let trace_id = self
            .trace
            .as_ref()
            .map(|t| t.context().trace_id().to_string());
        if let (Some(log), Some(path)) = (log, &self.path) {
            let upstream = self.upstream.as_ref().map(|e| e.authority().as_str());
            log.record(&Entry {
                route,
                method,
                path,
                status,
                bytes: self.bytes,
                duration,
                cold_wait: self.cold_wait,
                upstream,
                trace_id,
                client: self.client,
            });
        }
        if let Some(trace) = self.trace.take() {
            trace.finish(status, cold, self.bytes);
        }
    }
}
